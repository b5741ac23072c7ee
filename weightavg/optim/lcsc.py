"""The LCSC wrapper: ``weightavg.methods.lcsc``'s snapshots every few steps, combined by a recipe."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from weightavg.core.checks import outside_stacklevel
from weightavg.core.rule import Snapshot
from weightavg.core.settings import TensorOptions, describe_arguments
from weightavg.core.snapshots import MEMORY, SnapshotStore
from weightavg.methods.lcsc import RECIPES, Combiner, CombineSettings, SearchResult, SnapshotSettings, recipe_changes
from weightavg.optim.base import AveragingOptimizer, ModelOptions


def _rank_folder(folder: Path) -> Path:
    """``folder/rank<N>`` under ``torch.distributed`` with several processes (each writes its own snapshots, no two
    race on one manifest), else ``folder``."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        return folder / f"rank{torch.distributed.get_rank()}"
    return folder


@dataclass(eq=False, repr=False)
class LCSC(TensorOptions, CombineSettings, SnapshotSettings, ModelOptions, AveragingOptimizer):  # last base's first
    """``optimizer`` plus snapshots of the model every ``every_n_steps`` steps, combined afterwards
    (``weightavg.methods.lcsc``): ``opt.search(evaluate)`` chooses coefficients by the recipe ``method``
    (``RECIPES``: LCSC's evolutionary search, a soup, EMA-equivalent or metric-weighted coefficients),
    ``with opt.combined(weights):`` evaluates any combination, ``opt.apply(weights)`` keeps one, and
    ``with opt.averaged():`` evaluates the last search's choice.

    ``every_n_steps`` and ``directory`` are required: a folder (relative ones are relative to the working directory;
    under ``torch.distributed`` with several processes each rank writes its own ``rank<N>`` subfolder; snapshots are
    found again on resume and ``load_state_dict`` drops those past the restored step), or ``":memory:"``. A fresh
    run (no ``load_state_dict`` before the first ``step()``) in a folder that holds snapshots is refused at that
    first step unless ``overwrite=True``.

    Its arguments: ``ModelOptions``, the method's ``SnapshotSettings`` and ``CombineSettings`` (the defaults of
    ``search()``) and ``TensorOptions`` (Args below).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> opt = LCSC(sgd, module=model, every_n_steps=2, directory=":memory:")
        >>> for _ in range(6):
        ...     model(torch.randn(8, 4)).pow(2).mean().backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> result = opt.search(lambda: -model(torch.ones(1, 4)).pow(2).sum().item(), method="uniform")
        >>> opt.apply(result.weights)
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.every_n_steps is None:
            raise ValueError("every_n_steps= is required: the snapshot interval in optimizer steps")
        if self.directory is None:
            raise ValueError(
                "directory= is required: a folder for the snapshot files (keep of them, each the model's size), or "
                f"directory={MEMORY!r} to hold them in host memory (lost on a crash, not found on resume)"
            )
        folder = self.directory
        if not (isinstance(folder, str) and folder == MEMORY):
            folder = _rank_folder(Path(folder).expanduser())
        self._start_wrapping(Snapshot())
        self._read_settings(SnapshotSettings, CombineSettings)  # search() takes changes to the recipe instead
        self.store = SnapshotStore(folder, keep=self.keep, background=self.background)
        self.combiner = Combiner(self.module, self.store, dtype=self.accumulation_dtype, averager=self.averager)
        self.result: SearchResult | None = None
        self._metrics: dict[str, float] = {}
        self._started = False  # whether the run's snapshots are settled (first step, or load_state_dict)

    def _start_fresh(self) -> None:
        """A fresh run's first step: an earlier run's snapshots in the folder are refused, or deleted on request."""
        self._started = True
        earlier = self.store.snapshots
        if not earlier:
            return
        if not self.overwrite:
            raise ValueError(
                f"directory={str(self.store.directory)!r} holds {len(earlier)} snapshots of an earlier run (steps "
                f"{[s.step for s in earlier]}); this run starts afresh: resume it with load_state_dict(...) before "
                "the first step, use another directory, or pass overwrite=True to delete them"
            )
        self.store.discard_after(-1)

    def record(self, **metrics: float) -> None:
        """Numbers to save with the next snapshot (e.g. ``opt.record(train_loss=loss.item())`` for metric-weighted
        averaging by loss)."""
        self._metrics.update({name: float(value) for name, value in metrics.items()})

    def check_can_step(self) -> None:
        super().check_can_step()
        if not self._started:
            self._start_fresh()  # before the inner step: a refused run has changed nothing

    def on_step(self, step: int) -> None:
        super().on_step(step)  # counts the step
        assert self.every_n_steps is not None  # required when built
        if step % self.every_n_steps == 0:
            self.combiner.take(step=step, metrics=self._metrics)

    @property
    def steps(self) -> int:
        """Optimizer steps done so far."""
        return self.steps_done()

    def search(
        self,
        evaluate: Callable[[], float] | None = None,
        *,
        mode: Literal["max", "min"] = "max",
        progress: bool = False,
        **changes: Any,
    ) -> SearchResult:
        """Coefficients over the snapshots taken so far by this wrapper's ``CombineSettings``, with ``changes`` to
        them for this search (``method="uniform"``, ``settings=SearchSettings(...)``, ``decay=``, ...); ``evaluate()``
        scores the model as it is (a held-out metric, ``mode`` says whether higher is better) and is called with each
        candidate swapped in. The result is kept in ``result`` (what ``averaged()`` evaluates)."""
        changes = recipe_changes(changes)
        unknown = sorted(set(changes) - set(self.recipe()))
        if unknown:
            raise TypeError(f"search() got unknown settings {unknown}; CombineSettings has {sorted(self.recipe())}")
        self.store.flush()
        recipe = CombineSettings(**{**self.recipe(), **changes})
        self.result = self.combiner.choose(recipe, evaluate, mode=mode, progress=progress)
        return self.result

    def combined(self, weights: Sequence[float] | torch.Tensor) -> AbstractContextManager[None]:
        """``with opt.combined(weights):`` the model holds ``sum_i w_i theta_i``; the live weights return after."""
        self.store.flush()
        return self.combiner.combined(weights)

    def apply(self, weights: Sequence[float] | torch.Tensor, *, bn_loader: Iterable[Any] | None = None) -> None:
        """Write the combination into the model's own tensors (in place); with ``bn_loader``, recompute its
        BatchNorm statistics first with one pass over those batches (``torch.optim.swa_utils.update_bn``)."""
        self.store.flush()
        self.combiner.apply(weights, bn_loader=bn_loader)

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """``with opt.averaged():`` the model holds the combination the last ``search()`` chose (or, before any
        search, the coefficients of ``method`` when it needs no fitness, e.g. ``"uniform"``)."""
        if self.result is None:
            if RECIPES[self.method].needs_fitness:
                raise RuntimeError(
                    f"averaged() evaluates the combination search() chose; method={self.method!r} needs a fitness, "
                    "so call opt.search(evaluate) first (or use combined(weights))"
                )
            self.search()
        assert self.result is not None
        with self.combined(self.result.weights):
            yield

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapper's state; first waits until every snapshot taken so far is on disk (background writes), so a
        checkpoint never counts on snapshots that a crash right after it would lose."""
        self.store.flush()
        return super().state_dict()

    def extra_state(self) -> dict[str, Any]:
        """The steps of the snapshots this state counts on (the step count itself is the engine's)."""
        return {"lcsc": {"snapshots": [s.step for s in self.store.snapshots]}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.store.discard_after(self.steps)  # an interrupted run's snapshots past the restored step
        self._started = True
        expected = state["lcsc"].get("snapshots")  # (states written before it was recorded hold only "steps")
        held = {s.step for s in self.store.snapshots}
        missing = [step for step in expected or () if step not in held]
        if missing:
            warnings.warn(
                f"the state counts on snapshots of steps {missing} that directory={str(self.directory)!r} does not "
                "hold (another folder, or files deleted since): combinations use the snapshots that are there",
                stacklevel=outside_stacklevel(),
            )


describe_arguments(LCSC)
