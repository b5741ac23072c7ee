"""The LCSC callback: ``weightavg.methods.lcsc``'s snapshots during fit, combined by a recipe at its end."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from weightavg.callbacks.evaluation import (
    BatchNormOptions,
    FitnessOptions,
    check_batchnorm_pass,
    logged_validation,
    metric_on_loaders,
    recompute_batchnorm,
)
from weightavg.callbacks.host import OptimizerSteps, OutputOptions, _Finisher, trainer_shows_progress
from weightavg.core.checks import STATE_VERSION, check_bool, check_number, check_output_file, check_state_version
from weightavg.core.rule import Snapshot
from weightavg.core.settings import TensorOptions, describe_arguments, renamed_arguments
from weightavg.core.snapshots import MEMORY, SnapshotStore
from weightavg.methods.lcsc import RECIPES, Combiner, CombineSettings, SearchResult, SnapshotSettings


@renamed_arguments(rule="greedy_rule")
@dataclass(eq=False, repr=False)
class LCSC(  # signature: last base's fields first
    BatchNormOptions, TensorOptions, OutputOptions, FitnessOptions, CombineSettings, SnapshotSettings, _Finisher
):
    """Snapshots during fit, combined at its end (``weightavg.methods.lcsc``): LCSC's evolutionary search, or a
    uniform/greedy soup, EMA-equivalent or metric-weighted coefficients, or the last snapshot (``RECIPES``).

    During fit the live weights are snapshotted every ``every_n_steps`` optimizer steps (or ``every_n_epochs``; neither:
    every epoch) into a ``SnapshotStore`` (safetensors files in ``directory``, found again when a run resumes), keeping
    the newest ``keep``. Global rank 0 writes the folder; every rank reads it at the end, so under DDP it must be
    shared (every rank checks before the search). A relative ``directory`` is relative to the Trainer's
    ``default_root_dir`` (stable across resumes, unlike a logger's versioned folder); the default,
    ``weightavg_snapshots/<name>`` there, is a folder the callback owns: a fresh fit replaces an earlier run's
    snapshots in it, with a warning (another folder is refused instead, unless ``overwrite=True``).

    When fit ends the chosen coefficients' combination is streamed into a buffer beside the model and swapped in:
    candidates are scored on validation dataloader ``search_on`` with the module's logged ``monitor`` or a
    ``metric``; the best goes into the model (``apply_at_end``) and ``result_path`` gets the coefficients and the
    search history. Under DDP every rank runs the search and rank 0's result is used; log ``monitor`` with
    ``sync_dist=True`` so that it scores every rank's data.

    Its arguments: the method's ``SnapshotSettings`` and ``CombineSettings``, the ``FitnessOptions`` that score
    candidates (needed by ``lcsc`` and ``greedy``; the other recipes are scored with them when given), this
    callback's own below, ``OutputOptions``, ``TensorOptions`` and ``BatchNormOptions`` (the chosen combination's
    statistics; candidates during the search are scored with combined statistics) (Args below).
    """

    _starts_from_model = False  # its snapshots are of the live weights: an average applied before it is replaced
    warn_unused_options = True  # it runs one recipe: another's options would be ignored

    _: KW_ONLY
    every_n_epochs: int | None = None
    """Snapshot every this many epochs instead of ``every_n_steps`` (at most one of them; neither: every epoch)."""
    search_on: int = 0
    """The validation dataloader the fitness reads."""
    apply_at_end: bool = True
    """Leave the chosen combination in the model (by pointer; the live weights are kept for checkpoints written after
    fit); else only ``result`` and the files are produced."""
    result_path: str | os.PathLike[str] | None = None
    """Write ``result`` (the ``SearchResult``: coefficients and search history) as JSON."""

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and self.every_n_epochs is not None:
            raise ValueError(
                f"give every_n_steps={self.every_n_steps!r} or every_n_epochs={self.every_n_epochs!r}, not both "
                "(when to snapshot; neither: every epoch)"
            )
        super().__post_init__()
        if self.every_n_steps is None and self.every_n_epochs is None:
            self.every_n_epochs = 1
        if self.every_n_epochs is not None:
            check_number("every_n_epochs", self.every_n_epochs, low=1, integer=True)
        check_number("search_on", self.search_on, low=0, integer=True)
        check_bool("apply_at_end", self.apply_at_end)
        check_output_file("result_path", self.result_path)
        self._in_memory = isinstance(self.directory, str) and self.directory == MEMORY
        self.name = self.name or "LCSC"
        self.combiner: Combiner | None = None
        self.result: SearchResult | None = None
        self._last_snapshot_step = -1
        self._expected: list[int] | None = None  # the snapshots a restored checkpoint counts on
        self._start_hosting(Snapshot(), SnapshotSettings, CombineSettings)

    @override
    def check_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if RECIPES[self.method].needs_fitness and not self.scores:
            raise ValueError(
                f"{self.name}: method={self.method!r} scores candidates: give monitor= (a metric validation_step "
                "logs) or metric="
            )
        if self.scores:
            count = len(self._validation_loaders(trainer))
            if self.search_on >= count:
                raise ValueError(
                    f"{self.name} scores candidates on validation dataloader search_on={self.search_on}, but this fit "
                    f"has {count} validation dataloaders"
                )
        if self.recompute_bn:
            check_batchnorm_pass(trainer, pl_module, self._bound(), self.bn_batches, f"{self.name}(recompute_bn=True)")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        folder = self._folder(trainer)
        problem = None
        if folder is not None and not trainer.is_global_zero:
            # Rank 0 alone writes the folder (other ranks would race on its manifest and temporaries); the others
            # open it when fit ends, after a barrier.
            store = SnapshotStore(None)
        else:
            store = SnapshotStore(folder, keep=self.keep, background=self.background)
            earlier = store.snapshots
            if earlier and trainer.ckpt_path is None:  # a fresh fit: they are another run's
                if self.overwrite or self.directory is None:
                    message = f"weightavg: {self.name} deletes {len(earlier)} snapshots of an earlier run in {folder}"
                    if self.directory is None:  # the callback's own default folder: replaced, and said so
                        rank_zero_warn(
                            f"{message} (this fit starts afresh; resume with trainer.fit(..., ckpt_path=...) to keep "
                            "them, or give each run its own directory= or default_root_dir)"
                        )
                    else:
                        rank_zero_info(message)
                    store.discard_after(-1)
                else:
                    problem = (
                        f"{self.name}: directory={str(folder)!r} holds {len(earlier)} snapshots of an earlier run "
                        f"(steps {[s.step for s in earlier]}); this fit starts afresh: resume it with "
                        "trainer.fit(..., ckpt_path=...), use another directory, or pass overwrite=True to delete them"
                    )
        if folder is not None:
            problem = trainer.strategy.broadcast(problem)  # every rank refuses together (none waits for rank 0)
        if problem is not None:
            store.close()
            raise ValueError(problem)
        self.combiner = Combiner(pl_module, store, dtype=self.accumulation_dtype, averager=self._bound())

    def _folder(self, trainer: pl.Trainer) -> Path | None:
        """``directory`` (default ``weightavg_snapshots/<name>``), a relative one under the Trainer's
        ``default_root_dir``; ``None`` in memory."""
        if self._in_memory:
            return None
        if self.directory is None:
            folder = Path("weightavg_snapshots") / (
                re.sub(r"[^A-Za-z0-9._-]+", "_", self.name or "LCSC").strip("._") or "LCSC"
            )
        else:
            folder = Path(self.directory).expanduser()
        return folder if folder.is_absolute() else Path(trainer.default_root_dir) / folder

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # After a checkpoint restored the step count: drop snapshots an interrupted run took past it.
        combiner = self._combiner()
        if trainer.is_global_zero or self._in_memory:
            combiner.store.discard_after(trainer.global_step)
        self._check_expected_snapshots(trainer)
        self._last_snapshot_step = trainer.global_step
        self.result = None  # a new fit's search: never report the previous fit's choice

    def _combiner(self) -> Combiner:
        if self.combiner is None:
            raise RuntimeError(f"{self.name} is not bound to a model yet (it binds when fit starts)")
        return self.combiner

    def _take(self, trainer: pl.Trainer) -> None:
        if not self._in_memory and not trainer.is_global_zero:
            return
        logged = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1)
        }
        self._combiner().take(step=trainer.global_step, epoch=trainer.current_epoch, metrics=logged)
        self._last_snapshot_step = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        OptimizerSteps.on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx)  # the step guard only

    @override
    def on_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            self._take(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if due and trainer.global_step != self._last_snapshot_step:
            self._take(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fitting = False
        combiner = self._combiner()
        combiner.store.flush()
        if not self._in_memory and trainer.world_size > 1:
            self._open_rank_zero_folder(trainer, combiner)
        if not combiner.store.snapshots:
            rank_zero_info(f"weightavg: {self.name} took no snapshot; the live weights stay")
            return
        evaluate = self._evaluator(trainer, pl_module)
        progress = trainer_shows_progress(trainer, self.progress)
        self.result = self._run_suspending_peers(  # this callback is its own CombineSettings
            lambda: combiner.choose(self, evaluate, mode=self.mode, progress=progress)
        )
        # Every rank searched (validation runs are collective); rank 0's choice is everyone's, even when the
        # monitored metric was not synchronised across ranks (log it with sync_dist=True to score all the data).
        self.result = trainer.strategy.broadcast(self.result)
        combiner.load(self.result.weights)
        if self.recompute_bn:  # the chosen combination's own statistics (a no-op without BatchNorm)
            recompute_batchnorm(trainer, pl_module, combiner.averager, self.bn_input, self.bn_batches)
        combiner.check_statistics()
        averager = combiner.averager
        if self.export_path is not None and trainer.is_global_zero:
            averager.save(self.export_path)
        if self.result_path is not None and trainer.is_global_zero:
            self.result.save(self.result_path)
        count = len(combiner.store.snapshots)
        scored = (
            f"fitness {self.result.fitness:.5g} after {self.result.evaluations} evaluations"
            if self.result.evaluations
            else "not scored (no monitor/metric)"
        )
        rank_zero_info(f"weightavg: {self.name} ({self.method}) over {count} snapshots: {scored}")
        if count == 1:  # e.g. the default one snapshot per epoch over an endless loader
            rank_zero_warn(
                f"weightavg: {self.name} combined a single snapshot (every_n_steps={self.every_n_steps}, "
                f"every_n_epochs={self.every_n_epochs}, in {trainer.global_step} optimizer steps): the result is that "
                "snapshot; snapshot more often (every_n_steps=...)"
            )
        if self.apply_at_end:
            averager.refresh()
            averager.swap()  # by pointer: the live weights stay in the averager for later checkpoints
            self._applied = True

    def _open_rank_zero_folder(self, trainer: pl.Trainer, combiner: Combiner) -> None:
        """Ranks other than 0 read the folder rank 0 wrote (reading never modifies it); every rank refuses together
        when one cannot see the same snapshots (a folder on a disk that is not shared), before any collective
        search could wait for it forever."""
        trainer.strategy.barrier("weightavg-lcsc-snapshots")
        folder = self._folder(trainer)
        expected = trainer.strategy.broadcast([s.step for s in combiner.store.snapshots])
        problem = None
        if not trainer.is_global_zero:
            try:
                combiner.store = SnapshotStore(folder, read_only=True)
                seen = [s.step for s in combiner.store.snapshots]
            except (OSError, ValueError) as error:
                seen, problem = [], f"{type(error).__name__}: {error}"
            if seen != expected:
                problem = problem or f"it sees snapshots at steps {seen}"
        if not trainer.strategy.reduce_boolean_decision(problem is None, all=True):
            where = f"this rank ({trainer.global_rank}): {problem}" if problem else "another rank could not"
            raise RuntimeError(
                f"{self.name}: not every rank can read the snapshots rank 0 wrote in {folder} (steps {expected}; "
                f"{where}); with several processes directory= must be a folder every rank can read (a shared file "
                f"system), or directory={MEMORY!r}"
            )

    def _evaluator(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[], float] | None:
        if self.monitor is None and self.metric is None:
            return None
        loaders = self._validation_loaders(trainer)
        if self.search_on >= len(loaders):
            raise ValueError(
                f"search_on={self.search_on} is not a validation dataloader index (there are {len(loaders)})"
            )
        monitor = self.monitor

        def evaluate() -> float:
            if monitor is not None:
                values, _ = logged_validation(trainer, monitor, len(loaders))
            else:
                values = metric_on_loaders(trainer, pl_module, [loaders[self.search_on]], self.metric, self.forward)
                return values[0]
            return values[self.search_on]

        return evaluate

    @override
    def _state_keys(self) -> set[str]:
        return {"snapshots"}  # no average: the snapshots are files, this state lists the ones it counts on

    @override
    def state_dict(self) -> dict[str, Any]:
        """The steps of the snapshots this checkpoint counts on (the files in ``directory`` are the snapshots, found
        again on resume). Written only once every snapshot taken before it is on disk (background writes)."""
        snapshots = self._expected
        if self.combiner is not None:
            self.combiner.store.flush()
            snapshots = [s.step for s in self.combiner.store.snapshots]
        return {"version": STATE_VERSION, "snapshots": list(snapshots or [])}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._accept_state:
            return
        check_state_version(state_dict, str(self.name))
        # Checked when training starts, once the folder is open (checkpoints written before this was recorded hold
        # nothing: nothing to check).
        self._expected = state_dict.get("snapshots")

    def _check_expected_snapshots(self, trainer: pl.Trainer) -> None:
        expected, self._expected = self._expected, None
        if expected is None or not (trainer.is_global_zero or self._in_memory):
            return
        held = {s.step for s in self._combiner().store.snapshots}
        missing = [step for step in expected if step not in held and step <= trainer.global_step]
        if missing:
            rank_zero_warn(
                f"weightavg: {self.name}: the checkpoint counts on snapshots of steps {missing} that "
                f"{'memory' if self._in_memory else repr(str(self._folder(trainer)))} does not hold (another folder, "
                "files deleted since, or snapshots kept in memory): the combination at the end uses the ones there"
            )


describe_arguments(LCSC)
