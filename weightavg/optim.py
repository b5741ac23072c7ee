"""Optimizer-wrapper face: averaging for plain training loops, without Lightning.

``weightavg.optim.EMA(optimizer, ...)`` is a ``torch.optim.Optimizer`` that shares the inner optimizer's
``param_groups`` and state, steps it, then updates the average. The averaging math lives in ``weightavg.methods``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from weightavg.core.averager import Averager
from weightavg.core.binding import BufferPolicy
from weightavg.core.call import to_device
from weightavg.core.checks import check_bool, check_directory, check_number
from weightavg.core.io import WeightSource
from weightavg.core.rule import Rule, Snapshot
from weightavg.core.schedules import Unit
from weightavg.core.settings import (
    DtypeOption,
    EngineOptions,
    ReadSettings,
    Settings,
    describe_arguments,
    setting_values,
)
from weightavg.core.snapshots import MEMORY, SnapshotStore
from weightavg.methods.ema import EMA as EMARule
from weightavg.methods.ema import EMASettings
from weightavg.methods.ewa import ShareSettings, share_all, to_dense
from weightavg.methods.lcsc import Combiner, Method, SearchResult, combine_dtype
from weightavg.methods.noloco import (
    DiLoCoRule,
    DiLoCoSettings,
    NoLoCoRule,
    NoLoCoSettings,
    Replica,
    Traffic,
    average_replicas,
)
from weightavg.methods.swa import SWA as SWARule
from weightavg.methods.swa import SWASettings
from weightavg.methods.wiseft import ALPHAS, check_alphas
from weightavg.methods.zscl import ZSCL as ZSCLRule
from weightavg.methods.zscl import DistillationSettings, EnsembleSettings


def check_module(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise ``TypeError`` unless ``value`` is an ``nn.Module`` (or ``None`` when ``optional``): a string or a number
    would otherwise fail deep inside binding (a string even iterates, as characters)."""
    if value is None and optional:
        return
    if not isinstance(value, nn.Module):
        allowed = "an nn.Module or None" if optional else "an nn.Module"
        raise TypeError(f"{name}={value!r} must be the model ({allowed}), got {type(value).__name__}")


@dataclass(eq=False, repr=False)
class InnerOptimizer(Settings):
    """The optimizer a wrapper steps (every wrapper's first argument)."""

    optimizer: Optimizer
    """The inner optimizer; its ``param_groups`` and ``state`` are shared, so LR schedulers, gradient clipping and
    ``zero_grad`` keep acting on it. ``add_param_group`` raises: add groups to the inner optimizer before wrapping
    (the average is bound to the parameters present when the wrapper is built)."""

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(self.optimizer).__name__}")
        super().__post_init__()


@dataclass(eq=False, repr=False)
class WrapperOptions(InnerOptimizer):
    """``InnerOptimizer`` and what the wrappers of averages take besides the method's settings (EMA, SWA, ZSCL)."""

    _: KW_ONLY
    module: nn.Module | None = None
    """The model; when given, tensors are named as in its ``state_dict`` and its buffers are followed too (under
    ``buffers``). Without it only the optimizer's parameters are averaged, named by position."""
    total_steps: int | None = None
    """The run's total optimizer steps, for starts given as a fraction of training."""

    def __post_init__(self) -> None:
        check_module("module", self.module, optional=True)
        if self.total_steps is not None:
            check_number("total_steps", self.total_steps, low=1, integer=True)
        super().__post_init__()


@dataclass(eq=False, repr=False)
class _WrapperHost(WrapperOptions, EngineOptions):
    """The options of wrappers whose own settings are not declared as a dataclass yet (checked and defaulted here)."""


class AveragingOptimizer(ReadSettings, Optimizer):
    """Wrap an optimizer so that every ``step()`` also updates an average of its parameters under a rule: the base
    of every optimizer wrapper.

    A method's wrapper declares its fields from ``WrapperOptions``, the method's settings
    (``weightavg.methods.ema.EMASettings``) and the engine's ``EngineOptions`` (``weightavg.core.settings``), then
    hands its rule to ``_start_wrapping``.
    """

    optimizer: Optimizer
    module: nn.Module | None

    def __init__(self, optimizer: Optimizer, rule: Rule, **options: Any) -> None:
        """For wrappers whose settings are not a dataclass yet: ``options`` are ``WrapperOptions`` and
        ``EngineOptions`` fields, checked and defaulted by them."""
        try:
            given = _WrapperHost(optimizer, **options)
        except TypeError as error:  # an unknown keyword: name this wrapper, not the private options holder
            raise TypeError(str(error).replace("_WrapperHost.__init__()", f"{type(self).__name__}()")) from None
        for option in dataclasses.fields(_WrapperHost):
            setattr(self, option.name, getattr(given, option.name))
        self._start_wrapping(rule)

    def _engine_options(self) -> dict[str, Any]:
        """The ``Averager`` settings of this wrapper's average (its ``EngineOptions`` fields)."""
        return setting_values(self, EngineOptions)

    def _start_wrapping(self, rule: Rule) -> None:
        optimizer, module = self.optimizer, self.module
        params = [p for group in optimizer.param_groups for p in group["params"]]
        target: nn.Module | Iterable[torch.Tensor] = module if module is not None else params
        # Kept to bind afresh (ZSCL binds a new ensemble at each task's start).
        self._bind = functools.partial(
            Averager,
            target,
            rule,
            parameters=params if module is not None else None,
            total_steps=self.total_steps,  # type: ignore[attr-defined]
            **self._engine_options(),
        )
        self.averager = self._bind()
        # Optimizer.__init__ sets up the hook registries; the groups and state are then the inner optimizer's own.
        Optimizer.__init__(self, params, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self._read_settings(rule)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.averager.rule!r}, {self.optimizer!r})"

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Step the inner optimizer, then update the average if the rule says so."""
        self._check_can_step()
        if self.averager.is_swapped:
            raise RuntimeError(
                "step() while other weights are swapped into the model (inside averaged() or interpolated()): "
                "the optimizer would train them; step outside the with-block"
            )
        with torch.enable_grad():
            loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.averager.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "param_groups") or self.param_groups is not self.optimizer.param_groups:
            super().add_param_group(param_group)  # Optimizer.__init__ building its throwaway groups
            return
        raise NotImplementedError(
            "add the parameter group to the inner optimizer before wrapping it: the average is bound to the "
            "parameters present when the wrapper is built"
        )

    def epoch_end(self) -> bool:
        """Mark the end of an epoch (for rules that sample per epoch, e.g. ``SWA(every_unit="epoch")``)."""
        return self.averager.epoch_end()

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Evaluate with the averaged weights: ``with opt.averaged(): evaluate(model)``; live weights return after.

        Before the first update there is no average yet; the body then runs on the live weights, with a warning.
        """
        if not self.averager.has_average:
            warnings.warn("no averaging update has happened yet; evaluating the live weights", stacklevel=3)
            yield
            return
        with self.averager.averaged():
            yield

    def copy_to_model(self) -> None:
        """Overwrite the live weights with the average (e.g. at the end of training)."""
        self.averager.copy_to_model()

    def save_averaged(self, path: str) -> None:
        """Export the averaged weights as safetensors (atomic write)."""
        self.averager.save(path)

    def update_bn(self, loader: Iterable[Any], model: nn.Module, device: torch.device | None = None) -> None:
        """Recompute BatchNorm statistics of the averaged weights with a pass over ``loader``
        (``torch.optim.swa_utils.update_bn``), and keep them in the average. ``model`` must be the bound module."""
        self.averager.update_bn(loader, model, device)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state and the averaging state, together."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "averaging": self.averager.state_dict(),
            **self._extra_state(),
        }

    def _check_can_step(self) -> None:
        """Raise if the method's state forbids a step now (ZSCL between tasks)."""

    def _extra_state(self) -> dict[str, Any]:
        """A method's own state beyond the average (ZSCL: the teacher and the task count)."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        """Raise if the method's own part of ``state`` cannot be loaded (called before anything is loaded)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        keys = {"optimizer", "averaging", *self._extra_state()}
        if not isinstance(state_dict, dict) or set(state_dict) != keys:
            raise ValueError(
                f"state_dict must come from {type(self).__name__}.state_dict() (keys {sorted(keys)}), got keys "
                f"{sorted(state_dict) if isinstance(state_dict, dict) else state_dict!r}"
            )
        self.averager.check_state(state_dict["averaging"])  # refuse before touching the inner optimizer
        self._check_extra_state(state_dict)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.averager.load_state_dict(state_dict["averaging"])
        self._load_extra_state(state_dict)
        # The inner optimizer's load_state_dict replaces its param_groups and state objects: share the new ones.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state


@dataclass(eq=False, repr=False)
class EMA(EngineOptions, EMASettings, WrapperOptions, AveragingOptimizer):  # signature: last base's fields first
    """``optimizer`` plus an exponential moving average of its parameters (``weightavg.methods.EMA``).

    Its arguments: ``WrapperOptions``, the method's ``EMASettings`` and ``EngineOptions`` (Args below).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> opt = EMA(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.99)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()
        >>> with opt.averaged():
        ...     _ = model(torch.randn(8, 4))
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._start_wrapping(EMARule(**setting_values(self, EMASettings)))


@dataclass(eq=False, repr=False)
class SWA(EngineOptions, SWASettings, WrapperOptions, AveragingOptimizer):  # signature: last base's fields first
    """``optimizer`` plus a stochastic weight average of its parameters (``weightavg.methods.SWA``).

    ``SWA(opt)`` averages from the first step on, as ``torch.optim.swa_utils.AveragedModel`` does when updated after
    every step: ``start`` defaults to 0 (a fraction of 0 needs no ``total_steps``). Give a later start as a fraction
    of ``total_steps`` (pass ``total_steps=``), or in steps/epochs with ``start_unit``. The Lightning callback's
    default is 0.75 of the run (the paper's last quarter) because a Trainer knows the run's length; a plain loop's
    wrapper does not. In a plain loop the natural unit is the step, so ``every_unit`` defaults to ``"step"`` here
    (the Lightning callback samples per epoch by default): ``SWA(opt, start=1000, start_unit="step", every=100)``.
    With ``every_unit="epoch"``, call ``opt.epoch_end()`` at the end of each epoch. Pair with
    ``torch.optim.swa_utils.SWALR`` on the inner optimizer for the SWA learning rate; the wrapper never changes it.

    Its arguments: ``WrapperOptions``, the method's ``SWASettings`` (with this face's defaults below) and
    ``EngineOptions`` (Args below).
    """

    start: float = 0.0  # this face's defaults (see above); the settings' docstrings hold
    _: KW_ONLY
    every_unit: Unit = "step"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._start_wrapping(SWARule(**setting_values(self, SWASettings)))


class WiSEFT(AveragingOptimizer):
    """``optimizer`` plus the zero-shot anchor theta_0 for WiSE-FT (``weightavg.methods.wiseft``).

    theta_0 is the model's state (``module=``, buffers included) when the wrapper is built, or ``anchor=``; stepping
    fine-tunes theta_1 as usual. Then ``with opt.interpolated(alpha): evaluate(model)`` evaluates
    ``(1 - alpha) * theta_0 + alpha * theta_1`` (swapped in, the live weights return after), ``opt.sweep(evaluate)``
    does it for a grid, and ``opt.apply(alpha)`` makes one permanent.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> opt = WiSEFT(torch.optim.SGD(model.parameters(), lr=0.1), module=model)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()
        >>> with opt.interpolated(0.5):
        ...     _ = model(torch.randn(8, 4))
        >>> opt.apply(0.5)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        module: nn.Module,
        anchor: WeightSource | None = None,
        buffers: BufferPolicy = "average",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"module={module!r} must be the model (an nn.Module): WiSE-FT interpolates every floating entry of "
                "its state, buffers included, matched by name"
            )
        super().__init__(
            optimizer,
            Snapshot(),
            module=module,
            buffers=buffers,
            include=include,
            exclude=exclude,
            device=device,
            dtype="live",
        )
        if anchor is not None:
            self.averager.load_weights(anchor, argument="anchor")

    def interpolated(self, alpha: float) -> AbstractContextManager[None]:
        """``with opt.interpolated(alpha):`` the model holds ``(1 - alpha) * theta_0 + alpha * theta_1``."""
        return self.averager.blended(alpha)

    def sweep(self, evaluate: Callable[[], Any], alphas: Sequence[float] = ALPHAS) -> dict[float, Any]:
        """``{alpha: evaluate()}`` with each interpolation in the model in turn; the live weights return after."""
        results = {}
        for alpha in check_alphas(alphas):
            with self.interpolated(alpha):
                results[alpha] = evaluate()
        return results

    def apply(self, alpha: float) -> None:
        """Make the interpolation at ``alpha`` the model's weights, in place (theta_0 is kept)."""
        self.averager.apply_blend(alpha)

    def save_interpolated(self, path: str | os.PathLike[str], alpha: float) -> None:
        """Export the interpolation at ``alpha`` as safetensors (atomic write)."""
        with self.interpolated(alpha):
            self.averager.save_model(path)


@dataclass(eq=False, repr=False)
class ZSCL(EngineOptions, DistillationSettings, EnsembleSettings, WrapperOptions, AveragingOptimizer):
    """``optimizer`` plus ZSCL's weight ensemble and distillation (``weightavg.methods.zscl``), for plain loops.

    The first task starts when the wrapper is built; ``start_task()`` starts the next one (the model first takes
    the finished task's ensemble, so each task starts from the previous ensemble), and ``end_task()`` ends the last.
    Evaluate the ensemble with ``with opt.averaged():``. With ``reference=`` (needs ``module=``), add
    ``opt.distillation_loss()`` to the loss; it draws the next reference batch, moved to the model's device.

    Its arguments: ``WrapperOptions``, the method's ``EnsembleSettings`` and ``DistillationSettings`` (the teacher
    defaults to the model when the wrapper is built) and ``EngineOptions`` (Args below).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reference is not None and self.module is None:
            raise ValueError("distillation (reference=) runs the model: pass module= as well")
        self._start_wrapping(ZSCLRule(**setting_values(self, EnsembleSettings)))
        self.distillation = self.build_distillation()
        if self.distillation is not None and self.module is not None:
            self.distillation.bind(self.module, self.teacher)
        self.task = 0
        self._ended = False

    def distillation_loss(self) -> torch.Tensor:
        """``distill_weight * KD`` on the next reference batch; add it to the task loss before ``backward()``."""
        if self.distillation is None:
            raise RuntimeError("this ZSCL wrapper does not distill: build it with reference= (and module=)")
        device = next(iter(self.averager.live_tensors().values())).device
        return self.distillation.loss(lambda batch: to_device(batch, device))

    def _check_can_step(self) -> None:
        if self._ended:
            raise RuntimeError("the task has ended (end_task()); call start_task() before stepping again")

    def end_task(self, apply: bool = True) -> None:
        """End the task: put its ensemble into the model (in place), or with ``apply=False`` keep the live weights
        (e.g. a distillation-only ablation)."""
        if apply:
            self.averager.copy_to_model()
        self._ended = True

    def start_task(self) -> None:
        """End the running task (unless ``end_task()`` did) and start the next one: a fresh ensemble of the model."""
        if not self._ended:
            self.end_task()
        self.averager = self._bind()
        self.task += 1
        self._ended = False

    def _extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"task": self.task, "task_ended": self._ended}
        if self.distillation is not None:
            state["distillation"] = self.distillation.state_dict()
        return state

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.task = int(state["task"])
        self._ended = bool(state["task_ended"])
        if self.distillation is not None:
            self.distillation.load_state_dict(state["distillation"])


def _rank_folder(folder: Path) -> Path:
    """``folder/rank<N>`` under ``torch.distributed`` with several processes (each writes its own snapshots, no two
    race on one manifest), else ``folder``."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        return folder / f"rank{torch.distributed.get_rank()}"
    return folder


class LCSC(AveragingOptimizer):
    """``optimizer`` plus snapshots of the model every ``every_n_steps`` steps, combined afterwards
    (``weightavg.methods.lcsc``): ``opt.search(evaluate)`` runs LCSC's evolutionary search (or a soup / EMA /
    metric-weighted recipe), ``with opt.combined(weights):`` evaluates any combination, ``opt.apply(weights)``
    keeps one.

    Args:
        optimizer: the inner optimizer.
        module: the model (snapshots hold its parameters and buffers by ``state_dict`` name).
        every_n_steps: snapshot interval in optimizer steps.
        keep: keep the newest ``keep`` snapshots (``None``: all).
        directory: where snapshot files go (found again on resume; ``load_state_dict`` drops those past the restored
            step). Required: a folder (relative ones are relative to the working directory; under
            ``torch.distributed`` with several processes each rank writes its own ``rank<N>`` subfolder), or
            ``":memory:"`` to keep the snapshots in host memory (``keep`` copies of the model in RAM, lost on a
            crash, not found on resume).
        background: write files from a background thread (``state_dict()`` waits for pending writes).
        overwrite: a fresh run (no ``load_state_dict`` before the first ``step()``) in a folder that holds snapshots
            is refused at that first step unless ``overwrite=True``, which deletes them. A resumed run keeps the
            snapshots up to its restored step and drops those past it.
        dtype: accumulation dtype of combinations (``"float32"`` or ``"float64"``).
        buffers, include, exclude: which tensors the snapshots hold (as for ``weightavg.Averager``).

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

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        module: nn.Module,
        every_n_steps: int,
        keep: int | None = 12,
        directory: str | os.PathLike[str] | None = None,
        background: bool = False,
        overwrite: bool = False,
        dtype: str | torch.dtype = "float32",
        buffers: BufferPolicy = "average",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
    ) -> None:
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite={overwrite!r} must be a bool")
        if not isinstance(module, nn.Module):
            raise TypeError(f"module={module!r} must be the model (an nn.Module): snapshots are taken by name")
        check_number("every_n_steps", every_n_steps, low=1, integer=True)
        if directory is None:
            raise ValueError(
                "directory= is required: a folder for the snapshot files (keep of them, each the model's size), or "
                f"directory={MEMORY!r} to hold them in host memory (lost on a crash, not found on resume)"
            )
        check_directory("directory", directory)
        if not (isinstance(directory, str) and directory == MEMORY):
            directory = _rank_folder(Path(directory).expanduser())
        super().__init__(
            optimizer, Snapshot(), module=module, buffers=buffers, include=include, exclude=exclude, dtype="live"
        )
        self.every_n_steps = every_n_steps
        self.store = SnapshotStore(directory, keep=keep, background=background)
        self.combiner = Combiner(module, self.store, dtype=combine_dtype(dtype), averager=self.averager)
        self.steps = 0
        self._metrics: dict[str, float] = {}
        self.overwrite = overwrite
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

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        if not self._started:
            self._start_fresh()  # before the inner step: a refused run has changed nothing
        loss = super().step(closure)
        self.steps += 1
        if self.steps % self.every_n_steps == 0:
            self.combiner.take(step=self.steps, metrics=self._metrics)
        return loss

    def search(
        self, evaluate: Callable[[], float] | None = None, *, method: Method = "lcsc", **options: Any
    ) -> SearchResult:
        """Coefficients over the snapshots taken so far by ``method`` (see ``Combiner.choose``: ``mode``,
        ``settings``, ``decay``, ``penalty``, ``by``, ``metric_key``, ``rule``, ``progress``); ``evaluate()`` scores
        the model as it is (a held-out metric) and is called with each candidate swapped in."""
        self.store.flush()
        return self.combiner.choose(method, evaluate, **options)

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
        raise NotImplementedError("LCSC keeps snapshots, not one average: use combined(weights) or search()")
        yield  # pragma: no cover

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapper's state; first waits until every snapshot taken so far is on disk (background writes), so a
        checkpoint never counts on snapshots that a crash right after it would lose."""
        self.store.flush()
        return super().state_dict()

    def _extra_state(self) -> dict[str, Any]:
        return {"lcsc": {"steps": self.steps}}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["lcsc"]["steps"])
        self.store.discard_after(self.steps)  # an interrupted run's snapshots past the restored step
        self._started = True


@dataclass(eq=False, repr=False)
class ConvertedModel(Settings):
    """The model whose mixtures EWA's wrapper averages."""

    model: nn.Module
    """The converted model (``weightavg.ewa.to_moe(model)`` first; the inner optimizer built over its parameters)."""

    def __post_init__(self) -> None:
        check_module("model", self.model)
        super().__post_init__()


@dataclass(eq=False, repr=False)
class EWA(ShareSettings, ConvertedModel, InnerOptimizer, Optimizer):  # signature: last base's fields first
    """``optimizer`` plus EWA's expert-weights averaging (``weightavg.methods.ewa``) after every step.

    Convert the model first (``weightavg.ewa.to_moe(model)``), build the inner optimizer over its parameters, then
    wrap it; when training ends, ``opt.merge()`` turns every mixture back into its dense FFN (the optimizer is done
    with the model then).

    Its arguments: ``InnerOptimizer``, ``ConvertedModel`` and the method's ``ShareSettings`` (Args below).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_mixtures(self.model, "weightavg.optim.EWA")
        self.steps = 0
        optimizer = self.optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        Optimizer.__init__(self, params, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state

    def current_beta(self) -> float:
        """The share rate after the steps done so far."""
        return self.beta_at(self.steps)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        with torch.enable_grad():
            loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.steps += 1
        share_all(self.model, self.current_beta())
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def merge(self) -> int:
        """Turn every mixture into its dense FFN (experts' mean); returns how many were merged."""
        return to_dense(self.model)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizer": self.optimizer.state_dict(), "ewa": {"steps": self.steps}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer", "ewa"}:
            raise ValueError("state_dict must come from EWA.state_dict() (keys 'ewa' and 'optimizer')")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.steps = int(state_dict["ewa"]["steps"])
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state


def check_process_group(process_group: Any) -> None:
    """Raise ``TypeError`` unless ``process_group`` is ``None`` (the world) or a ``torch.distributed`` group: in one
    process nothing would use it, so a wrong value would pass unnoticed until a multi-process run."""
    import torch.distributed as dist

    if process_group is None:
        return
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(
            f"process_group={process_group!r} must be a torch.distributed process group (e.g. "
            f"torch.distributed.new_group(ranks)) or None for the world, got {type(process_group).__name__}"
        )


@dataclass(eq=False, repr=False)
class ReplicaOptions(Settings):
    """Which processes NoLoCo's and DiLoCo's wrappers average over, and how they start."""

    _: KW_ONLY
    process_group: Any = None
    """The ranks that average (default: the world)."""
    broadcast_start: bool = True
    """Start every replica from rank 0's weights (one broadcast when the wrapper is built)."""

    def __post_init__(self) -> None:
        check_process_group(self.process_group)
        check_bool("broadcast_start", self.broadcast_start)
        super().__post_init__()


class _OuterOptimizer(AveragingOptimizer):
    """NoLoCo and DiLoCo: the inner optimizer's steps, and every ``sync_every`` of them an outer step on slow weights
    that the engine holds (at least fp32, one flat buffer per dtype group; the model's tensors are re-homed into
    flat buffers too, so each group travels as one message)."""

    module = None  # the optimizer's parameters, named by position
    total_steps = None
    dtype: torch.dtype | str | None
    process_group: Any
    broadcast_start: bool

    def _engine_options(self) -> dict[str, Any]:
        return {"buffers": "average", "contiguous": True, "dtype": self.dtype}

    def _start_outer(self, rule: NoLoCoRule | DiLoCoRule) -> None:
        self._start_wrapping(Snapshot())
        self.replica = Replica(self.averager, rule, self.process_group)
        if self.broadcast_start:
            self.replica.broadcast_start()
        self._read_settings(rule)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.replica.rule!r}, {self.optimizer!r})"

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Step the inner optimizer; run the outer step when it is due (every ``sync_every`` steps)."""
        loss = super().step(closure)
        self.replica.inner_step()
        return loss

    @property
    def traffic(self) -> Traffic:
        """Bytes sent, communication operations and seconds waited by this rank's outer steps so far."""
        return self.replica.traffic

    def slow_weights(self) -> AbstractContextManager[None]:
        """Evaluate with this replica's slow weights: ``with opt.slow_weights(): evaluate(model)``."""
        return self.averager.averaged()

    def average_replicas(self) -> None:
        """Average the model over every rank (one all-reduce; for the end of training, e.g. before export)."""
        average_replicas([t for live, _ in self.averager.tensor_groups() for t in live], self.replica.group)

    def _extra_state(self) -> dict[str, Any]:
        return {"outer": self.replica.state_dict()}

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        self.replica.check_state(state["outer"])

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.replica.load_state_dict(state["outer"])


@dataclass(eq=False, repr=False)
class NoLoCo(DtypeOption, ReplicaOptions, NoLoCoSettings, InnerOptimizer, _OuterOptimizer):  # last base's fields first
    """NoLoCo (``weightavg.methods.noloco``): each replica trains alone and, every ``sync_every`` inner steps,
    averages with ``group_size - 1`` random peers by point-to-point messages through a momentum outer step. No
    all-reduce and no broadcast during training; run one process per replica (torchrun) with a process group whose
    backend has point-to-point ops (gloo, nccl), and do not wrap the model in DistributedDataParallel.

    Its arguments: ``InnerOptimizer``, the method's ``NoLoCoSettings``, ``ReplicaOptions`` and ``DtypeOption`` (the
    slow weights' and momentum's dtype; default fp32 for fp16/bf16 parameters, else theirs) (Args below).

    Example (under torchrun)::

        opt = NoLoCo(torch.optim.AdamW(model.parameters(), lr=1e-3), sync_every=50)
        for x, y in loader:                      # this rank's own shard
            loss_fn(model(x), y).backward()
            opt.step(); opt.zero_grad()
        print(opt.traffic)
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._start_outer(NoLoCoRule(**setting_values(self, NoLoCoSettings)))


@dataclass(eq=False, repr=False)
class DiLoCo(DtypeOption, ReplicaOptions, DiLoCoSettings, InnerOptimizer, _OuterOptimizer):  # last base's fields first
    """DiLoCo (``weightavg.methods.noloco``): each replica trains alone and, every ``sync_every`` inner steps, the
    replicas all-reduce the pseudo-gradient (slow minus fast weights) and apply outer SGD to the slow weights, with
    Nesterov momentum (as ``torch.optim.SGD(nesterov=True)``) or heavy-ball.

    Its arguments: ``InnerOptimizer``, the method's ``DiLoCoSettings``, then as for ``NoLoCo``.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._start_outer(DiLoCoRule(**setting_values(self, DiLoCoSettings)))


describe_arguments(EMA, SWA, ZSCL, NoLoCo, DiLoCo, EWA)
