"""Lightning face: ``weightavg.callbacks.EMA(...)`` and ``weightavg.callbacks.SWA(...)``.

Each callback hosts one ``weightavg.Averager``; this file only maps Trainer events onto it (optimizer steps, epoch
ends, validation, checkpoints, the end of fit). The averaging math lives in ``weightavg.methods``.

Several averagers may share a run. Two roles go to one callback each, by their order in ``Trainer(callbacks=...)``:

- the *validator*, the first callback with ``validate_with="average"``: validation runs on its average (a callback
  with ``validate_with="both"`` validates its average a second time, its metrics under ``metric_prefix``);
- the *owner*, the first callback with ``apply_at_end=True``: its average goes into the model at the end of fit.

The checkpoint's ``state_dict`` holds the validator's average (without a validator, the first ``"both"`` callback's,
else the owner's; see ``checkpoint_weights``), so that ``ModelCheckpoint(monitor=...)`` saves the weights it
measured; the live weights are saved beside it (checkpoint key ``LIVE_KEY``) and put back on resume, and
``MARKER_KEY`` says what ``state_dict`` holds. Loading weights into the model never writes into an average.

Each averager logs ``updates`` (and an EMA its ``decay``) under ``weightavg/<name>/`` every ``log_every_n_steps``
optimizer steps, straight to the Trainer's loggers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, Checkpoint, EarlyStopping
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from weightavg.core.averager import Averager
from weightavg.core.binding import BufferPolicy
from weightavg.core.call import Forward, eval_mode
from weightavg.core.checks import (
    check_bool,
    check_callable,
    check_choice,
    check_directory,
    check_name,
    check_number,
    check_output_file,
)
from weightavg.core.io import WeightSource, save_safetensors
from weightavg.core.progress import progress_bar
from weightavg.core.rule import Rule, Snapshot
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
from weightavg.methods.ewa import ConversionSettings, ShareSettings, share_all, to_dense
from weightavg.methods.ewa import mixtures as ewa_mixtures
from weightavg.methods.lcsc import Combiner, Method, SearchResult, SearchSettings, check_options, combine_dtype
from weightavg.methods.noloco import (
    DiLoCoRule,
    DiLoCoSettings,
    NoLoCoRule,
    NoLoCoSettings,
    Replica,
    average_replicas,
)
from weightavg.methods.swa import SWA as SWARule
from weightavg.methods.swa import SWASettings
from weightavg.methods.wiseft import ALPHAS, check_alphas, choose_alpha
from weightavg.methods.zscl import ZSCL as ZSCLRule
from weightavg.methods.zscl import DistillationSettings, EnsembleSettings
from weightavg.strategies import NAME as LOCAL_DDP
from weightavg.strategies import LocalDDPStrategy

ValidateWith = Literal["average", "live", "both"]
CheckpointWeights = Literal["average", "live"]
#: Checkpoint key of the live weights, saved beside a ``state_dict`` that holds an average.
LIVE_KEY = "weightavg_live_weights"
#: Top-level checkpoint key saying what ``state_dict`` holds (``{"state_dict": "average" | "live", "averager": name,
#: "live_key": LIVE_KEY}``), for code that resumes or loads the checkpoint without the weightavg callbacks.
MARKER_KEY = "weightavg"


@dataclass(eq=False, repr=False)
class OutputOptions(Settings):
    """What every weightavg callback writes and how it is named."""

    _: KW_ONLY
    export_path: str | os.PathLike[str] | None = None
    """Write this callback's result (its average; for EWA the merged model) as safetensors here at the end of fit
    (global rank 0), atomically and one tensor at a time; missing folders are created, and a path that could not be
    written is refused when the callback is built."""
    name: str | None = None
    """A unique name for this callback (an averager's checkpoint ``state_key`` is ``weightavg[<name>]``); default:
    the rule's compact repr, e.g. ``EMA(decay=0.999)`` (``NoLoCo``, ``EWA``, ...). Two identical averagers need
    distinct names."""

    def __post_init__(self) -> None:
        check_output_file("export_path", self.export_path)
        check_name(self.name)
        super().__post_init__()


@dataclass(eq=False, repr=False)
class HostOptions(OutputOptions):
    """How the Lightning host validates, names, exports and checkpoints an average: every averaging callback's
    options, checked when it is built."""

    _: KW_ONLY
    validate_with: ValidateWith = "average"
    """``"average"`` to validate on this callback's average (once it has had an update; before that validation uses
    the live weights), ``"live"``, or ``"both"``: each validation during fit runs on the live weights (metrics under
    their usual names) and then again on this average, whose metrics are logged under ``metric_prefix``
    (``weightavg/<name>/val_loss``: a key ``ModelCheckpoint(monitor=...)`` and ``EarlyStopping`` can use; an
    ``EarlyStopping(check_on_train_epoch_end=False)`` on it must come after this callback, else it is refused at fit
    start). With several averagers the first one set to ``"average"`` is used; the Trainer logs which."""
    checkpoint_weights: CheckpointWeights = "average"
    """What a checkpoint's ``state_dict`` holds when this callback writes it (the callback validation uses, else the
    one with ``apply_at_end=True``): ``"average"`` (``load_from_checkpoint`` gives the averaged model; a resume
    without the weightavg callback would train on from the average) or ``"live"`` (the training weights; the average
    stays in the callback state). The checkpoint says which under its top-level ``MARKER_KEY`` entry."""
    resume_from_average: bool = False
    """Let ``trainer.fit(ckpt_path=...)`` continue from a checkpoint whose ``state_dict`` holds an average but whose
    live weights (``LIVE_KEY``) are missing; refused by default, since training would silently continue from the
    average with the live trajectory's optimizer state."""

    def __post_init__(self) -> None:
        # Everything that can be checked before training is checked here, not after hours of it.
        check_choice("validate_with", self.validate_with, ("average", "live", "both"))
        check_choice("checkpoint_weights", self.checkpoint_weights, ("average", "live"))
        check_bool("resume_from_average", self.resume_from_average)
        super().__post_init__()


@dataclass(eq=False, repr=False)
class CallbackOptions(HostOptions):
    """``HostOptions`` and what the model holds when fit ends (the callbacks of averages: EMA, SWA, ZSCL)."""

    _: KW_ONLY
    apply_at_end: bool = True
    """At the end of fit, leave the averaged weights in the model (the live ones are discarded). With several
    averagers the first one with ``apply_at_end=True`` does it, and its average is also what checkpoints hold under
    ``state_dict``."""

    def __post_init__(self) -> None:
        check_bool("apply_at_end", self.apply_at_end)
        super().__post_init__()


@dataclass(eq=False, repr=False)
class _HostOptions(CallbackOptions, EngineOptions):
    """The options of callbacks whose own settings are not declared as a dataclass yet (checked and defaulted here)."""


class AveragingCallback(ReadSettings, Callback):
    """Host any averaging rule in a Lightning ``Trainer``: the base of every averaging callback.

    A method's callback declares its fields from the method's settings (``weightavg.methods.ema.EMASettings``), the
    host's ``CallbackOptions`` and the engine's ``EngineOptions`` (``weightavg.core.settings``), then hands its rule
    to ``_start_hosting``; every Trainer detail lives here.
    """

    rule: Rule
    name: str | None  # the given name; the rule's repr once hosting starts
    validate_with: ValidateWith
    apply_at_end: bool
    export_path: str | os.PathLike[str] | None
    checkpoint_weights: CheckpointWeights
    resume_from_average: bool

    def __init__(self, rule: Rule, **options: Any) -> None:
        """For callbacks whose settings are not a dataclass yet: ``options`` are ``CallbackOptions`` and
        ``EngineOptions`` fields, checked and defaulted by them."""
        try:
            given = _HostOptions(**options)
        except TypeError as error:  # an unknown keyword: name this callback, not the private options holder
            raise TypeError(str(error).replace("_HostOptions.__init__()", f"{type(self).__name__}()")) from None
        for option in dataclasses.fields(_HostOptions):
            setattr(self, option.name, getattr(given, option.name))
        self._start_hosting(rule)

    def _engine_options(self) -> dict[str, Any]:
        """The ``Averager`` settings of this callback's average (its ``EngineOptions`` fields)."""
        return setting_values(self, EngineOptions)

    def _start_hosting(self, rule: Rule, *settings: type) -> None:
        """Host ``rule``; ``settings`` are the method's settings dataclasses the callback inherits, whose fields it
        has read (assigning them later is refused)."""
        if not isinstance(rule, Rule):
            raise TypeError(f"rule={rule!r} must be an averaging rule such as weightavg.methods.EMA(...)")
        self.rule = rule
        self.name = self.name or repr(rule)
        self.averager: Averager | None = None
        # Checkpoint states restored before fit binds what they belong to (key -> state), applied when it binds.
        self._pending: dict[str, Any] = {}
        self._validates = False
        self._owns_model = False
        self._writes_checkpoint = False  # whether this callback decides what checkpoints hold under state_dict
        self._swapped_for_validation = False
        self._applied = False
        self._fitting = False  # between on_fit_start and the end of training: the averager belongs to this fit
        self._accept_state = True  # whether a checkpoint being restored is for fitting (else its state is ignored)
        self._peers: list[AveragingCallback] = []
        self._suspended = False  # set while a peer evaluates its own weights (WiSEFT's sweep, a "both" pass)
        self._logged_step = -1
        self._monitor_seen = False  # whether this fit's first validation logged ``monitor`` (WiSEFT, LCSC)
        # Set when weights are loaded into the model outside fit (trainer.test(ckpt_path=...)): evaluation then
        # uses them as they are.
        self._loaded_over = False
        self._load_hook: RemovableHandle | None = None
        self._read_settings(*settings)

    @property
    @override
    def state_key(self) -> str:
        return f"weightavg[{self.name}]"

    @property
    def metric_prefix(self) -> str:
        """Where this callback's metrics go in the loggers and ``trainer.callback_metrics``: ``weightavg/<name>/``
        (``updates``, EMA's ``decay``, and with ``validate_with="both"`` the validation metrics of the average)."""
        return f"weightavg/{self.name}/"

    def step_metrics(self, step: int) -> dict[str, float]:
        """What this averager logs every ``log_every_n_steps`` optimizer steps (host numbers: no device sync):
        ``updates`` (the number of updates, for SWA the number of samples averaged) and, for an EMA, ``decay``
        (the per-step decay at ``step``, warmup included)."""
        averager = self._bound()
        metrics = {"updates": float(averager.num_updates)}
        if isinstance(self.rule, EMARule) and step >= self.rule.start_step:
            metrics["decay"] = self.rule.decay_at(step)
        return metrics

    # ------------------------------------------------------------------ roles and binding
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        ours = [cb for cb in trainer.callbacks if isinstance(cb, AveragingCallback)]  # type: ignore[attr-defined]
        validator = next((cb for cb in ours if cb.validate_with == "average"), None)
        both = next((cb for cb in ours if cb.validate_with == "both"), None)
        owner = next((cb for cb in ours if cb.apply_at_end), None)
        writer = validator or both or owner
        for cb in ours:
            cb._peers = ours
            cb._validates = cb is validator
            cb._owns_model = cb is owner
            cb._writes_checkpoint = cb is writer
        interpolators = [cb for cb in ours if cb._finishes_model()]
        if owner is not None and interpolators and ours.index(interpolators[0]) < ours.index(owner):
            raise ValueError(
                f"{interpolators[0].name} comes before {owner.name} (apply_at_end=True) in Trainer(callbacks=...): "
                f"{owner.name} would replace the interpolated model when fit ends. Put {interpolators[0].name} after "
                "it to interpolate toward its average, or set apply_at_end=False on one of them"
            )
        if stage == "fit" and self is ours[0]:
            _warn_on_checkpoint_mismatch(trainer, ours, validator, writer)
        if stage == "fit" and self.validate_with == "both":
            self._check_early_stopping_order(trainer)
        if len(ours) > 1 and self is ours[0]:
            ends = owner.name if owner else "the live weights"
            if interpolators:
                ends = f"{interpolators[-1].name}'s result (from {ends})"
            rank_zero_info(
                f"weightavg: validation uses {validator.name if validator else 'the live weights'}; "
                f"the model ends with {ends}"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Bound here, after the strategy has moved and converted the model (device, bf16-true), so the averages sit
        # beside the tensors that training will actually update. Each fit() starts a fresh average (a new Trainer
        # restarts its step counters); trainer.fit(ckpt_path=...) is how an average continues.
        engine = self._engine_options()
        if engine["contiguous"] and trainer.strategy.model is not pl_module:
            raise ValueError(
                "contiguous=True re-homes the model's tensors, which callbacks can only do after the strategy has "
                f"wrapped the model; it is not supported under {type(trainer.strategy).__name__}, which wraps the "
                "model (DDP registers its gradient buckets at wrap time): use contiguous=False"
            )
        # Lightning reports inf for endless runs and -1 (its max_steps) for data without a length and no max_steps.
        total = trainer.estimated_stepping_batches
        total_steps = int(total) if math.isfinite(total) and total > 0 else None
        try:
            self.averager = Averager(pl_module, self.rule, total_steps=total_steps, **engine)
        except ValueError as error:
            if total_steps is not None or "total optimizer steps" not in str(error):
                raise
            raise ValueError(
                f"{self.name}: the Trainer cannot tell this run's total optimizer steps (the training data has no "
                "length, e.g. an IterableDataset, and max_steps is not set), which a start given as a fraction of "
                "training needs: set Trainer(max_steps=...) or give the start in steps or epochs "
                "(start_unit='step' or 'epoch')"
            ) from error
        self.averager.label = self.name or repr(self.rule)  # never None once hosting started
        self._applied = False
        self._fitting = True
        self._monitor_seen = False
        self._loaded_over = False
        if self._load_hook is not None:
            self._load_hook.remove()
        self._load_hook = pl_module.register_load_state_dict_pre_hook(  # type: ignore[no-untyped-call]
            self._before_model_load
        )
        self.check_model(trainer, pl_module)
        self.bind_extra(trainer, pl_module)
        self._apply_pending()

    def _check_monitor_logged(self, trainer: pl.Trainer, monitor: str | None) -> None:
        """At fit's first validation, refuse a ``monitor`` that ``validation_step`` does not log, naming the logged
        keys: the search or sweep that reads it runs after training, so a typo must surface now."""
        if monitor is None or self._monitor_seen or not self._fitting or trainer.sanity_checking:
            return
        logged = set(trainer.callback_metrics)
        if monitor not in logged and not any(k.startswith(f"{monitor}/dataloader_idx_") for k in logged):
            raise ValueError(
                f"{self.name}: monitor={monitor!r} is not logged by validation_step; logged: {sorted(logged)}"
            )
        self._monitor_seen = True

    def _before_model_load(self, module: torch.nn.Module, *args: Any) -> None:
        """Runs before anything is loaded into the model (Lightning's checkpoint restore, ``load_state_dict``): the
        loaded weights must land in the model's own storage, never in an average that is swapped in by pointer."""
        peers = self._peers or [self]
        for peer in reversed(peers):  # swaps nest in callback order
            peer._swap_back_after_evaluation()
            if not peer._fitting:
                peer._loaded_over = True
        _unshare_from_averages(module, [peer.averager for peer in peers if peer.averager is not None])

    def bind_extra(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bind a method's own state beyond the average (ZSCL's teacher, NoLoCo's outer state) when fit starts,
        before any restored checkpoint state is loaded into it."""

    def check_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse, when fit starts, what this averager could only fail on at the end of fit."""

    def _finishes_model(self) -> bool:
        """Whether this callback puts its own result into the model at the end of fit, from what the model holds
        then (WiSE-FT, LCSC); such callbacks must come after the owner that applies an average."""
        return False

    def _bound(self) -> Averager:
        if self.averager is None:
            raise RuntimeError(f"{self.name} is not bound to a model yet (it binds when fit starts)")
        return self.averager

    # ------------------------------------------------------------------ training events
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        averager = self._bound()
        step = trainer.global_step
        if step > 0:
            averager.step(step)  # a repeated global_step (gradient accumulation) is ignored
        # The epoch's last batch counts as its end, so an epoch-wise average is fresh for the validation that
        # Lightning runs before on_train_epoch_end.
        if batch_idx + 1 == trainer.num_training_batches:
            averager.epoch_end(trainer.current_epoch + 1)
        # Lightning's own cadence and step, as its LearningRateMonitor uses: these rows line up with the module's.
        due = trainer.loggers and trainer._logger_connector.should_update_logs
        if due and self._logged_step != logger_step(trainer):
            self._logged_step = logger_step(trainer)  # once per optimizer step under gradient accumulation
            log_to_loggers(trainer, {self.metric_prefix + k: v for k, v in self.step_metrics(step).items()})

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bound().epoch_end(trainer.current_epoch + 1)  # no-op when the last batch already counted

    # ------------------------------------------------------------------ evaluation on the average
    def _swap_in_for_evaluation(self) -> None:
        averager = self.averager
        if (
            self._validates
            and not self._suspended
            and averager is not None
            and averager.has_average
            and not averager.is_swapped
        ):
            averager.refresh()
            averager.swap()
            self._swapped_for_validation = True

    def _swap_back_after_evaluation(self) -> None:
        if self._swapped_for_validation:
            self._bound().swap()
            self._swapped_for_validation = False

    def _evaluates_the_model_as_it_is(self) -> bool:
        # After fit, evaluate what the model ends with; after a load into the model (trainer.test(ckpt_path=...)),
        # exactly the loaded weights.
        return self._loaded_over or any(peer._applied for peer in self._peers)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._evaluates_the_model_as_it_is():
            self._swap_in_for_evaluation()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_validation_end, not on_validation_epoch_end: the LightningModule's own on_validation_epoch_end (which
        # Lightning calls after the callbacks') must still see the weights that were validated.
        self._swap_back_after_evaluation()
        if self.validate_with == "both" and self._fitting and not trainer.sanity_checking and not self._suspended:
            self._validate_average(trainer)

    def _check_early_stopping_order(self, trainer: pl.Trainer) -> None:
        """Refuse an ``EarlyStopping`` on this average's prefixed metric that checks at validation end and comes
        before this callback: it would run before the average's validation pass and find no metric. (Set up before
        this callback, so its check time is already resolved; one that checks at train-epoch end is fine.)"""
        callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
        for stopper in callbacks[: callbacks.index(self)]:
            monitor = getattr(stopper, "monitor", "")
            if (
                isinstance(stopper, EarlyStopping)
                and monitor.startswith(self.metric_prefix)
                and getattr(stopper, "_check_on_train_epoch_end", None) is False
            ):
                raise ValueError(
                    f"EarlyStopping(monitor={monitor!r}) checks at validation end and comes before {self.name} "
                    f"(validate_with='both') in Trainer(callbacks=...): it would run before {self.name}'s average is "
                    f"validated and find no {monitor!r}. Put EarlyStopping after {self.name}"
                )

    def _validate_average(self, trainer: pl.Trainer) -> None:
        """Run fit's validation loop again on this average (on the live weights before its first update, as
        ``validate_with="average"`` does) and add its metrics under ``metric_prefix``, before checkpoint callbacks
        (which Lightning runs last) read them; the live validation's metrics stay as they were."""
        tables: tuple[dict[str, Any], ...] = (
            trainer.callback_metrics,
            trainer.logged_metrics,
            trainer.progress_bar_metrics,
        )
        saved = [(table, dict(table)) for table in tables]  # the connector's own dicts, which the rerun updates
        averager = self._bound()
        for peer in reversed(self._peers):  # swaps nest in callback order
            peer._swap_back_after_evaluation()
            peer._suspended = True
        swap = averager.has_average
        if swap:
            averager.refresh()
            averager.swap()
        try:
            outputs = run_validation(trainer)
        finally:
            if swap:
                averager.swap()
            for peer in self._peers:
                peer._suspended = False
        measured = {self.metric_prefix + key: value for output in outputs for key, value in output.items()}
        for table, before in saved:
            table.clear()
            table.update(before)
        for table in tables[:2]:
            table.update(measured)
        log_to_loggers(trainer, {key: float(value) for key, value in measured.items()})

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._evaluates_the_model_as_it_is():
            self._swap_in_for_evaluation()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_back_after_evaluation()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_back_after_evaluation()  # never leave the average in the model after an interrupted validation

    # ------------------------------------------------------------------ end of fit
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fitting = False
        averager = self._bound()
        if not averager.has_average:
            rank_zero_info(f"weightavg: {self.name} never updated (start not reached); the live weights stay")
            return
        self.finalize(trainer, pl_module)
        if self.export_path is not None and trainer.is_global_zero:
            averager.save(self.export_path)
        if self._owns_model:
            # Swapped in for good rather than copied over: the live weights stay in the averager, so a checkpoint
            # written after fit still carries them and resumes exactly.
            averager.refresh()
            if not averager.is_swapped:
                averager.swap()
            self._applied = True

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Last work on the average before it is exported and applied (SWA recomputes BatchNorm statistics)."""

    # ------------------------------------------------------------------ checkpoints
    def _state_keys(self) -> set[str]:
        """The checkpoint entries this callback owns (a method with state beyond the average adds its own)."""
        return {"averaging"}

    def _bound_parts(self) -> dict[str, Any]:
        """Key -> the bound object (with ``state_dict``/``load_state_dict``) holding that entry's state, for the
        entries whose object exists now (they are bound when fit starts)."""
        return {} if self.averager is None else {"averaging": self.averager}

    def _apply_pending(self) -> None:
        """Load the states restored before their objects were bound (called once each is bound)."""
        for key, part in self._bound_parts().items():
            if key in self._pending:
                part.load_state_dict(self._pending.pop(key))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self._pending, **{key: part.state_dict() for key, part in self._bound_parts().items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._accept_state:
            return  # validate/test/predict from a checkpoint need no averaging state
        bound = self._bound_parts() if self._fitting else {}
        for key in self._state_keys() & set(state_dict):
            if key in bound:
                bound[key].load_state_dict(state_dict[key])  # strategies that restore after setup
            else:
                self._pending[key] = state_dict[key]  # applied when fit binds its object

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        peers = self._peers or [self]
        if self is peers[0]:
            self._save_live_weights(pl_module, checkpoint)
            writer = next((p for p in peers if p._writes_checkpoint), None)
            holds = "average" if writer is not None and writer._writes_average() else "live"
            if any(p._applied for p in peers):
                holds = "the model at the end of fit"
            checkpoint[MARKER_KEY] = {
                "state_dict": holds,
                "averager": None if writer is None else writer.name,
                "live_key": LIVE_KEY,
            }
            if holds == "live" and LIVE_KEY in checkpoint:  # an average is swapped in for validation right now
                checkpoint["state_dict"].update(
                    {k: v for k, v in checkpoint[LIVE_KEY].items() if k in checkpoint["state_dict"]}
                )
        averager = self.averager
        if not self._writes_checkpoint or averager is None or not self._writes_average() or self._applied:
            return  # after fit the model itself holds this average (and whatever was done to it since)
        # The model's state_dict gets this average (so load_from_checkpoint gives the averaged model), whether or
        # not some average is swapped in right now.
        model_state = checkpoint["state_dict"]
        current = pl_module.state_dict()
        keys = averager.module_keys()  # with a compiled submodule's _orig_mod. where the model has one
        for name, tensor in averager.averaged_tensors().items():
            for key in keys[name]:
                if key in model_state:
                    model_state[key] = tensor.detach().to(dtype=current[key].dtype, device=current[key].device)

    def _writes_average(self) -> bool:
        return self.checkpoint_weights == "average" and self.averager is not None and self.averager.has_average

    def _save_live_weights(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Save the live model state beside a ``state_dict`` that holds (or may hold) an average.

        The live state is the model's own, except where an averager has its average swapped in (for validation, or
        for good after fit): there the averager holds the live tensors.
        """
        # Swaps nest in callback order (the first to swap holds the true live weights), so the first one writes last.
        swapped = [p.averager for p in reversed(self._peers) if p.averager is not None and p.averager.is_swapped]
        owner_writes = any(p._writes_checkpoint and p._writes_average() for p in self._peers)
        if not swapped and not owner_writes:
            return
        live = dict(pl_module.state_dict())
        for averager in swapped:
            keys = averager.module_keys()
            for name, tensor in averager.live_tensors().items():
                for key in keys[name]:
                    live[key] = tensor
        checkpoint[LIVE_KEY] = live

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._accept_state = trainer.state.fn == "fit"
        if not self._accept_state:
            return  # validate/test/predict from a checkpoint evaluate its state_dict: the average
        saved = [key for key in checkpoint.get("callbacks", {}) if key.startswith("weightavg[")]
        if saved and self.state_key not in saved:
            rank_zero_warn(
                f"weightavg: the checkpoint holds no state for {self.state_key} (it has {saved}); this averager "
                "starts afresh. Give averagers a fixed name=... to resume them after changing their arguments."
            )
        live = checkpoint.get(LIVE_KEY)
        marker = checkpoint.get(MARKER_KEY)
        holds = marker.get("state_dict") if isinstance(marker, dict) else None
        if live is None and holds not in (None, "live") and not self.resume_from_average:
            raise ValueError(
                f"the checkpoint's state_dict holds an average ({MARKER_KEY}={marker!r}) but its live weights "
                f"({LIVE_KEY!r}) are missing: training would continue from the average. Restore {LIVE_KEY!r}, or "
                f"pass resume_from_average=True to {self.name} to continue from the average on purpose"
            )
        if saved and self.state_key in saved:
            missing = sorted(self._state_keys() - set(checkpoint["callbacks"][self.state_key]))
            if missing:
                rank_zero_warn(
                    f"weightavg: the checkpoint's {self.state_key} holds no {missing} state; those parts of "
                    f"{self.name} start afresh"
                )
        elif not saved and (live is not None or marker is not None):
            rank_zero_warn(
                f"weightavg: the checkpoint was written with weightavg but holds no state for {self.state_key} (no "
                "'weightavg[...]' callback state at all); this averager starts afresh"
            )
        if live is not None and self is (self._peers[0] if self._peers else self):
            # The Trainer has just loaded state_dict (an average) into the model; put the live weights back. The
            # first averager does it whatever the names, so training never continues from an average by mistake.
            pl_module.load_state_dict(live)


def _warn_on_checkpoint_mismatch(
    trainer: pl.Trainer,
    ours: Sequence[AveragingCallback],
    validator: AveragingCallback | None,
    writer: AveragingCallback | None,
) -> None:
    """Warn when a ``ModelCheckpoint(monitor=...)`` would rank checkpoints by a metric measured on other weights
    than the ones they save (the validated average but live weights saved, or the reverse). A metric under a
    ``validate_with="both"`` callback's ``metric_prefix`` is measured on its average; any other on the validator's
    average, or on the live weights without a validator."""
    saves_average = writer is not None and writer.checkpoint_weights == "average"
    saved = f"{writer.name}'s average" if saves_average and writer is not None else "the live weights"
    for checkpoint in trainer.checkpoint_callbacks:
        monitor = getattr(checkpoint, "monitor", None)
        if monitor is None:
            continue
        both = next((cb for cb in ours if cb.validate_with == "both" and monitor.startswith(cb.metric_prefix)), None)
        source = both or validator
        measured = f"{source.name}'s average" if source is not None else "the live weights"
        if measured != saved:
            rank_zero_warn(
                f"weightavg: ModelCheckpoint(monitor={monitor!r}) ranks by a metric measured on {measured} but the "
                f"checkpoints' state_dict holds {saved}. Validate on what you save (validate_with='average' with "
                "checkpoint_weights='average', validate_with='live' with checkpoint_weights='live', or with "
                f"validate_with='both' monitor {(writer or ours[0]).metric_prefix + monitor.split('/')[-1]!r} for the "
                "average, the plain name for live)"
            )
            return


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning gives the loggers for what the module logs now (its ``LearningRateMonitor`` uses it too):
    optimizer steps before the current batch's."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def log_to_loggers(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Write host numbers straight to the Trainer's loggers at Lightning's current step (global rank 0 writes, as
    the loggers do), as Lightning's ``LearningRateMonitor`` does: nothing goes through ``self.log``, so no device
    tensor, host sync or distributed-reduction warning."""
    if metrics:
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=logger_step(trainer))


def trainer_shows_progress(trainer: pl.Trainer, progress: bool) -> bool:
    """Whether a callback's long loop after training shows a progress bar: when asked (``progress``), on global
    rank 0, when the Trainer's own progress bar is enabled (not ``enable_progress_bar=False``) and stderr, where
    the bar goes, is a terminal."""
    bar = trainer.progress_bar_callback
    enabled = bar is not None and getattr(bar, "is_enabled", True)
    return progress and enabled and trainer.is_global_zero and sys.stderr.isatty()


def _unshare_from_averages(module: torch.nn.Module, averagers: Sequence[Averager]) -> None:
    """Give the model's tensors that hold an averager's own storage (an average swapped in by pointer, e.g. applied
    at the end of fit) a copy of it, so that writing into the model cannot change the average."""
    owned = {t.untyped_storage().data_ptr() for a in averagers for t in a.averaged_tensors().values()}
    if not owned:
        return
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.untyped_storage().data_ptr() in owned:
                tensor.data = tensor.data.clone()


@dataclass(eq=False, repr=False)
class EMA(EngineOptions, CallbackOptions, EMASettings, AveragingCallback):  # signature: last base's fields first
    """Exponential moving average of the weights (``weightavg.methods.EMA``) as a Lightning callback.

    Its arguments: the method's ``EMASettings``, then ``CallbackOptions`` and ``EngineOptions`` (Args below)
    (``inspect.signature`` and IDEs list them all).

    Example:
        >>> trainer = pl.Trainer(callbacks=[EMA(decay=0.999), EMA(decay=0.9999), SWA(start=0.75)])  # doctest: +SKIP
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._start_hosting(EMARule(**setting_values(self, EMASettings)), EMASettings)


@dataclass(eq=False, repr=False)
class SWA(EngineOptions, CallbackOptions, SWASettings, AveragingCallback):  # signature: last base's fields first
    """Stochastic weight averaging (``weightavg.methods.SWA``) as a Lightning callback.

    The callback never touches the optimizer or LR scheduler: return ``torch.optim.swa_utils.SWALR`` (or any
    schedule) from ``configure_optimizers`` for the SWA phase. At the end of fit, BatchNorm statistics of the
    average are recomputed with one pass over the training data (``recompute_bn``) before export and apply.

    Its arguments: the method's ``SWASettings`` (``start`` defaults to 75% of the run, samples once per epoch),
    ``CallbackOptions``, ``EngineOptions``, then the BatchNorm pass below (Args below).
    """

    _: KW_ONLY
    recompute_bn: bool = True
    """Recompute BatchNorm statistics of the average at the end of fit (models with BatchNorm only); checked when fit
    starts: the statistics must be in the average (not ``buffers="ignore"``/excluded)."""
    bn_input: Callable[[Any], Any] | None = None
    """Maps a training batch to the model's input for that pass; default ``batch[0]`` for list/tuple batches and the
    batch itself otherwise."""
    bn_batches: int | None = None
    """Batches for that pass; default one epoch of the training data (required when its length is unknown, e.g. an
    infinite iterable dataset). Several train loaders (a list or dict) are read in turn."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bn_batches is not None:
            check_number("bn_batches", self.bn_batches, low=1, integer=True)
        check_bool("recompute_bn", self.recompute_bn)
        check_callable("bn_input", self.bn_input)
        self._start_hosting(SWARule(**setting_values(self, SWASettings)), SWASettings)

    @override
    def check_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recompute_bn:
            check_batchnorm_pass(trainer, pl_module, self._bound(), self.bn_batches, "SWA(recompute_bn=True)")

    @override
    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rule = self._bound().rule
        if self._bound().num_updates == 1 and isinstance(rule, SWARule):
            # e.g. per-epoch samples over a run that is one epoch long (max_steps over an endless loader)
            rank_zero_warn(
                f"weightavg: {self.name} averaged a single sample (every={rule.every}, "
                f"every_unit={rule.every_unit!r}, in {trainer.global_step} optimizer steps): the average is the "
                "weights at that sample; sample more often (every_unit='step', every=...) or start earlier"
            )
        if self.recompute_bn:
            recompute_batchnorm(trainer, pl_module, self._bound(), self.bn_input, self.bn_batches)


def check_batchnorm_pass(
    trainer: pl.Trainer, pl_module: pl.LightningModule, averager: Averager, bn_batches: int | None, who: str
) -> None:
    """Refuse at fit start a BatchNorm recomputation (``recompute_batchnorm``) that could only fail after training:
    statistics not in the average, a LightningModule without ``forward`` (the pass calls the module, as
    ``torch.optim.swa_utils.update_bn`` does), or training data without a length and no ``bn_batches``. A model
    without BatchNorm passes (nothing is recomputed)."""
    if not averager.check_update_bn(pl_module):
        return
    if getattr(pl_module.forward, "__func__", None) is pl.LightningModule.forward:  # not overridden
        raise ValueError(
            f"{who} recomputes BatchNorm statistics by calling the model on training batches, but "
            f"{type(pl_module).__name__} defines no forward(): define forward(), or pass recompute_bn=False"
        )
    if bn_batches is None and not math.isfinite(trainer.num_training_batches):
        raise ValueError(f"{who} needs bn_batches=... when the training data has no length (or recompute_bn=False)")


def check_fitness(monitor: Any, metric: Any) -> None:
    """Refuse at construction a fitness given twice, or a ``monitor`` that cannot name a logged metric (whether it
    is logged is checked at fit's first validation: ``AveragingCallback._check_monitor_logged``)."""
    if monitor is not None and metric is not None:
        raise ValueError("give monitor= (a metric validation_step logs) or metric= (computed here), not both")
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise ValueError(f"monitor={monitor!r} must be the name of a logged validation metric, e.g. 'val_acc'")


def recompute_batchnorm(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    averager: Averager,
    bn_input: Callable[[Any], Any] | None,
    bn_batches: int | None,
) -> None:
    """Recompute the BatchNorm statistics of ``averager``'s tensors with one pass over the training data (``bn_batches``
    batches, default one epoch; ``bn_input`` maps a batch to the model's input, default ``batch[0]``)."""
    limit = bn_batches or int(trainer.num_training_batches)

    def batches() -> Iterator[Any]:
        loaders: Any = trainer.train_dataloader
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            yield from loader

    def inputs() -> Iterator[list[Any]]:
        for batch in islice(batches(), limit):
            batch = trainer.strategy.batch_to_device(batch)
            if bn_input is not None:
                batch = bn_input(batch)
            elif isinstance(batch, (list, tuple)):
                batch = batch[0]
            yield [trainer.precision_plugin.convert_input(batch)]

    with trainer.precision_plugin.forward_context():
        averager.update_bn(inputs(), pl_module)


class WiSEFT(AveragingCallback):
    """WiSE-FT (``weightavg.methods.wiseft``): when fit ends, evaluate ``(1 - alpha) * theta_0 + alpha * theta_1``
    for every ``alpha`` on the validation dataloaders, pick one, and leave the model there.

    theta_0 (the zero-shot anchor) is the model's weights when fit starts, or ``anchor=``; it is kept on the model's
    device (``device="cpu"`` keeps it in host memory) and in checkpoints, so a resumed fine-tuning run interpolates
    toward the same anchor. theta_1 is the model at the end of fit: put this callback after an averager with
    ``apply_at_end=True`` to interpolate toward that average instead of the live weights.

    Args:
        alphas: the grid to evaluate (default 0, 0.1, ..., 1); another grid needs ``monitor`` or ``metric`` (without
            them nothing is evaluated, so it is refused: give ``alpha=``).
        alpha: a fixed choice (evaluated with the grid when a metric is given); default: the best on ``select_on``,
            or 0.5 (the paper's choice without tuning) when there is no ``monitor``/``metric`` to sweep with.
        select_on: the validation dataloader (index, or a name from ``dataloader_names``) whose metric picks alpha
            (not 0 only with ``monitor``/``metric``; ``dataloader_names`` and ``forward`` without them are warned
            about as ignored).
        monitor: the metric the module logs in ``validation_step`` (e.g. ``"val_acc"``); the sweep runs Lightning's
            validation loop once per alpha. Other weightavg callbacks stay out of these runs, and loggers receive
            only this callback's ``wiseft/...`` metrics.
        mode: ``"max"`` or ``"min"`` for the monitored value.
        metric: instead of ``monitor``, a ``torchmetrics.Metric`` (cloned per dataloader) or a function
            ``metric(outputs, targets) -> number`` (averaged over examples), computed by this callback's own pass over
            the validation data: ``outputs = forward(module, batch[0])``, targets ``batch[1]``.
        forward: ``forward(module, inputs) -> outputs`` for ``metric``; default ``module(inputs)``.
        dataloader_names: names of the validation dataloaders, in order (default ``dataloader_0``, ...).
        anchor: theta_0 from a module, a state dict, a safetensors file or a checkpoint (a Lightning ``.ckpt`` gives
            its ``state_dict``) instead of the weights at fit start.
        apply_at_end: leave the model at the chosen alpha (default); else the sweep only reports and the model ends
            at theta_1.
        export_path: write the chosen interpolation as safetensors (global rank 0).
        figure_path: draw metric-vs-alpha per dataloader, with the straight line between the endpoints, as an image
            (needs matplotlib).
        progress: show a progress bar over the sweep's alphas when the Trainer shows its own progress bar (not with
            ``enable_progress_bar=False``) and stderr is a terminal.
        name, buffers, include, exclude, device: as for ``AveragingCallback`` (``buffers="copy"`` takes floating
            buffers from theta_1 like integer ones; excluded tensors stay at theta_1).

    After fit, ``curves`` maps each dataloader name to ``{alpha: value}`` and ``alpha`` holds the choice.
    """

    def __init__(
        self,
        alphas: Sequence[float] = ALPHAS,
        *,
        alpha: float | None = None,
        select_on: int | str = 0,
        monitor: str | None = None,
        mode: Literal["max", "min"] = "max",
        metric: Any = None,
        forward: Forward | None = None,
        dataloader_names: Sequence[str] | None = None,
        anchor: WeightSource | None = None,
        apply_at_end: bool = True,
        export_path: str | os.PathLike[str] | None = None,
        figure_path: str | os.PathLike[str] | None = None,
        progress: bool = True,
        name: str | None = None,
        buffers: BufferPolicy = "average",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        check_name(name)
        check_bool("progress", progress)
        super().__init__(
            Snapshot(),
            validate_with="live",
            apply_at_end=False,
            export_path=export_path,
            name=name or "WiSEFT",
            buffers=buffers,
            include=include,
            exclude=exclude,
            device=device,
            dtype="live",
        )
        grid = check_alphas(alphas)
        check_bool("apply_at_end", apply_at_end)
        check_callable("forward", forward)
        self._check_sweep_arguments(grid, select_on, monitor, metric, forward, dataloader_names)
        if monitor is None and metric is None and alpha is None:
            alpha = 0.5  # nothing to measure alphas with: the paper's choice without tuning
        if alpha is not None:
            check_number("alpha", alpha)
            grid = tuple(sorted({*grid, float(alpha)}))
        self.alphas = grid
        self.fixed_alpha = None if alpha is None else float(alpha)
        if isinstance(select_on, bool) or not isinstance(select_on, (int, str)):
            raise TypeError(f"select_on={select_on!r} must be a dataloader index (int) or name (str)")
        check_choice("mode", mode, ("max", "min"))
        check_fitness(monitor, metric)
        if metric is not None and not callable(metric):
            raise TypeError(f"metric={metric!r} must be a torchmetrics.Metric or a function (outputs, targets)")
        if isinstance(select_on, int) and select_on < 0:
            raise ValueError(f"select_on={select_on} must be a dataloader index >= 0 or a name")
        if dataloader_names is not None:
            if isinstance(dataloader_names, str) or not isinstance(dataloader_names, Sequence):
                raise TypeError(f"dataloader_names={dataloader_names!r} must be a list of names, one per dataloader")
            names = list(dataloader_names)
            if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
                raise ValueError(f"dataloader_names={dataloader_names!r} must be distinct non-empty strings")
        if isinstance(select_on, str) and (dataloader_names is None or select_on not in dataloader_names):
            raise ValueError(f"select_on={select_on!r} is not one of dataloader_names={dataloader_names!r}")
        if figure_path is not None:
            if monitor is None and metric is None:
                raise ValueError("figure_path= draws the sweep, which needs monitor= or metric=")
            _require_matplotlib("figure_path")
            check_output_file("figure_path", figure_path)
        if anchor is not None and not isinstance(anchor, (nn.Module, Mapping, str, os.PathLike)):
            raise TypeError(
                f"anchor={anchor!r} must be a module, a state dict, a safetensors or checkpoint path, or None"
            )
        if isinstance(anchor, (str, os.PathLike)) and not os.path.isfile(anchor):
            raise FileNotFoundError(f"anchor={str(anchor)!r}: no such file")
        self.select_on = select_on
        self.monitor = monitor
        self.mode = mode
        self.metric = metric
        self.forward = forward
        self.dataloader_names = None if dataloader_names is None else list(dataloader_names)
        self.anchor = anchor
        self.leave_at_alpha = apply_at_end
        self.figure_path = figure_path
        self.progress = progress
        self.curves: dict[str, dict[float, float]] = {}
        self.alpha: float | None = None
        self._logged: dict[float, dict[str, Any]] = {}

    @staticmethod
    def _check_sweep_arguments(
        grid: tuple[float, ...],
        select_on: Any,
        monitor: str | None,
        metric: Any,
        forward: Forward | None,
        dataloader_names: Sequence[str] | None,
    ) -> None:
        """Refuse sweep arguments that a run without ``monitor``/``metric`` would ignore where they change which
        alpha the user expects (``alphas``, ``select_on``); warn where the run is the same without them."""
        if monitor is None and metric is None:
            if grid != ALPHAS:
                raise ValueError(
                    f"alphas={list(grid)!r} is a grid to sweep, which needs monitor= (a metric validation_step logs) "
                    "or metric=; without them no alpha is evaluated: give alpha= for a fixed interpolation"
                )
            if select_on != 0:
                raise ValueError(
                    f"select_on={select_on!r} picks the dataloader whose metric chooses alpha, which needs monitor= "
                    "or metric=; without them alpha is fixed (alpha=, default 0.5)"
                )
            if dataloader_names is not None:
                warnings.warn(
                    f"WiSEFT: dataloader_names={dataloader_names!r} is ignored without monitor= or metric= (no sweep "
                    "runs; alpha is fixed)",
                    UserWarning,
                    stacklevel=3,
                )
        if forward is not None and metric is None:
            warnings.warn(
                "WiSEFT: forward= is ignored without metric= (it computes the outputs that metric scores; with "
                "monitor= the module's own validation_step runs)",
                UserWarning,
                stacklevel=3,
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restoring = "averaging" in self._pending
        super().on_fit_start(trainer, pl_module)
        if not restoring and self.anchor is not None:
            self._bound().load_weights(self.anchor, argument="anchor")

    @override
    def _finishes_model(self) -> bool:
        return self.leave_at_alpha

    @override
    def step_metrics(self, step: int) -> dict[str, float]:
        return {}  # the anchor is a copy taken once: nothing to follow during fit

    @override
    def check_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse at fit start a sweep that could only fail after training: no validation data, names or
        ``select_on`` that do not fit the dataloaders."""
        if self.monitor is None and self.metric is None:
            return
        loop = trainer.fit_loop.epoch_loop.val_loop
        try:
            loop.setup_data()
            count = len(self._loaders(trainer))
        except MisconfigurationException:  # Lightning's "val_dataloader must be implemented"
            count = 0
        if count == 0 or loop.skip:
            raise ValueError(
                f"{self.name} evaluates alphas on the validation dataloaders, but this fit has none (pass "
                "val_dataloaders, keep limit_val_batches > 0), or use a fixed alpha= without monitor/metric"
            )
        if self.dataloader_names is not None and len(self.dataloader_names) != count:
            raise ValueError(
                f"dataloader_names={self.dataloader_names!r} names {len(self.dataloader_names)} dataloaders; this "
                f"fit validates on {count}"
            )
        if isinstance(self.select_on, int) and self.select_on >= count:
            raise ValueError(f"select_on={self.select_on} is not a validation dataloader index (0..{count - 1})")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._check_monitor_logged(trainer, self.monitor)

    @staticmethod
    def _loaders(trainer: pl.Trainer) -> list[Any]:
        loaders = trainer.val_dataloaders
        return list(loaders) if isinstance(loaders, (list, tuple)) else [] if loaders is None else [loaders]

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fitting = False
        averager = self._bound()
        averager.refresh()
        if self.monitor is not None or self.metric is not None:
            for peer in self._peers:
                peer._suspended = True
            try:
                self.curves = self._sweep(trainer, pl_module)
            finally:
                for peer in self._peers:
                    peer._suspended = False
                if averager.blend_alpha is not None:
                    averager.swap()
        self.alpha = self._choose(trainer)
        if self.alpha in self._logged:  # what the module logged for the chosen alpha, not for the last one swept
            trainer.callback_metrics.update(self._logged[self.alpha])
        self._logged = {}
        self._log(trainer)
        averager.blend(self.alpha)
        if self.export_path is not None and trainer.is_global_zero:
            averager.save_model(self.export_path)
        if self.figure_path is not None and trainer.is_global_zero and self.curves:
            draw_curves(self.curves, self.figure_path, chosen=self.alpha, ylabel=self.monitor or "metric")
        if self.leave_at_alpha:
            self._applied = True  # by pointer: the live weights stay in the averager for later checkpoints
        else:
            averager.swap()

    # ------------------------------------------------------------------ the sweep
    def _sweep(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[float, float]]:
        averager = self._bound()
        loop = trainer.fit_loop.epoch_loop.val_loop
        loop.setup_data()
        loaders = self._loaders(trainer)
        if not loaders or loop.skip:
            raise ValueError("WiSEFT evaluates alphas on the validation dataloaders, but this fit has none")
        names = self.dataloader_names or [f"dataloader_{i}" for i in range(len(loaders))]
        if len(names) != len(loaders):
            raise ValueError(f"dataloader_names={names!r} names {len(names)} dataloaders; the fit has {len(loaders)}")
        curves: dict[str, dict[float, float]] = {name: {} for name in names}
        self._logged = {}
        enabled = trainer_shows_progress(trainer, self.progress)
        bar = progress_bar(len(self.alphas), "WiSE-FT sweep", enabled=enabled, unit="alpha")
        try:
            for alpha in self.alphas:
                averager.blend(alpha)
                if self.monitor is not None:
                    values, self._logged[alpha] = logged_validation(trainer, self.monitor, len(loaders))
                else:
                    values = metric_on_loaders(trainer, pl_module, loaders, self.metric, self.forward)
                for name, value in zip(names, values, strict=True):
                    curves[name][alpha] = value
                if bar is not None:
                    bar.set_postfix(alpha=f"{alpha:g}", **{self.monitor or "metric": f"{values[0]:.4g}"})
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return trainer.strategy.broadcast(curves)

    def _choose(self, trainer: pl.Trainer) -> float:
        if self.fixed_alpha is not None:
            return self.fixed_alpha
        names = list(self.curves)
        if isinstance(self.select_on, int):
            if not 0 <= self.select_on < len(names):
                raise ValueError(
                    f"select_on={self.select_on} is not a validation dataloader index (0..{len(names) - 1})"
                )
            key = names[self.select_on]
        else:
            key = self.select_on
        return float(choose_alpha(self.curves[key], mode=self.mode))

    def _log(self, trainer: pl.Trainer) -> None:
        metrics: dict[str, float] = {"wiseft/alpha": float(self.alpha or 0.0)}
        label = self.monitor or "metric"
        for name, curve in self.curves.items():
            for alpha, value in curve.items():
                metrics[f"wiseft/{name}/{label}@alpha={alpha:g}"] = value
        log_to_loggers(trainer, metrics)
        if self.curves:
            table = "; ".join(
                f"{name}: " + ", ".join(f"{a:g}={v:.4g}" for a, v in curve.items())
                for name, curve in self.curves.items()
            )
            rank_zero_info(f"weightavg: WiSE-FT {label} by alpha: {table}; chose alpha={self.alpha:g}")


def run_validation(trainer: pl.Trainer) -> list[dict[str, Any]]:
    """Run fit's validation loop once on the model as it is; return what it logged, one dict per dataloader.

    Loggers, checkpoint callbacks and early stopping are set aside for the run (they belong to fit's own validations),
    so it can be repeated for candidate weights at the end of fit, or for an average inside a validation.
    """
    loop = trainer.fit_loop.epoch_loop.val_loop
    loggers, callbacks, stage = trainer.loggers, trainer.callbacks, trainer.state.stage  # type: ignore[attr-defined]
    trainer.loggers = []
    kept = [cb for cb in callbacks if not isinstance(cb, (Checkpoint, EarlyStopping))]
    trainer.callbacks = kept  # type: ignore[attr-defined]
    trainer.validating = True
    try:
        outputs: list[dict[str, Any]] = loop.run()
    finally:
        trainer.state.stage = stage
        trainer.loggers = loggers
        trainer.callbacks = callbacks  # type: ignore[attr-defined]
    return outputs


def logged_validation(trainer: pl.Trainer, monitor: str, count: int) -> tuple[list[float], dict[str, Any]]:
    """Run fit's validation loop once (``run_validation``); return ``monitor`` per dataloader and everything logged."""
    outputs = run_validation(trainer)
    logged = {key: value for output in outputs for key, value in output.items()}
    values = []
    for index in range(count):
        output = outputs[index] if index < len(outputs) else {}
        key = next((k for k in (monitor, f"{monitor}/dataloader_idx_{index}") if k in output), None)
        if key is None:
            raise ValueError(
                f"monitor={monitor!r} was not logged for validation dataloader {index}; logged: {sorted(output)}"
            )
        values.append(float(output[key]))
    return values, logged


@torch.no_grad()
def metric_on_loaders(
    trainer: pl.Trainer, pl_module: pl.LightningModule, loaders: list[Any], metric: Any, forward: Forward | None
) -> list[float]:
    """``metric`` (a torchmetrics ``Metric``, cloned per loader, or ``metric(outputs, targets)`` averaged over
    examples) of the model as it is, over each validation loader (Lightning's batch limits; reduced across ranks)."""
    import torchmetrics

    limits = trainer.num_val_batches
    values = []
    for index, loader in enumerate(loaders):
        limit = limits[index] if index < len(limits) else float("inf")
        stateful = isinstance(metric, torchmetrics.Metric)
        measure = metric.clone().to(pl_module.device) if stateful else metric
        total = torch.zeros((), dtype=torch.float64, device=pl_module.device)
        count = torch.zeros((), dtype=torch.float64, device=pl_module.device)
        with eval_mode(pl_module), trainer.precision_plugin.forward_context():
            for batch_index, batch in enumerate(loader):
                if batch_index >= limit:
                    break
                batch = trainer.strategy.batch_to_device(batch, dataloader_idx=index)
                inputs = trainer.precision_plugin.convert_input(batch[0])
                outputs = forward(pl_module, inputs) if forward is not None else pl_module(inputs)
                if stateful:
                    measure.update(outputs, batch[1])
                else:
                    size = len(batch[1])
                    total += torch.as_tensor(measure(outputs, batch[1]), dtype=torch.float64) * size
                    count += size
        if stateful:
            values.append(float(measure.compute()))
        else:
            total = trainer.strategy.reduce(total, reduce_op="sum")
            count = trainer.strategy.reduce(count, reduce_op="sum")
            values.append(float(total / count))
    return values


def _require_matplotlib(argument: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            f"{argument}= draws with matplotlib: pip install matplotlib (or pass {argument}=None)"
        ) from None


def draw_curves(
    curves: dict[str, dict[float, float]],
    path: str | os.PathLike[str],
    *,
    chosen: float | None = None,
    ylabel: str = "metric",
) -> None:
    """Metric vs alpha per dataloader, each with the dashed straight line between its endpoints (alpha 0 and 1)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4))  # no pyplot: the process-wide backend and figure registry stay untouched
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, curve in curves.items():
        alphas = sorted(curve)
        (line,) = axes.plot(alphas, [curve[a] for a in alphas], marker="o", label=name)
        if 0.0 in curve and 1.0 in curve:
            axes.plot([0, 1], [curve[0.0], curve[1.0]], linestyle="--", color=line.get_color(), alpha=0.6)
    if chosen is not None:
        axes.axvline(chosen, color="grey", linewidth=0.8)
    axes.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    axes.set_ylabel(ylabel)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


@dataclass(eq=False, repr=False)
class ZSCL(EngineOptions, CallbackOptions, DistillationSettings, EnsembleSettings, AveragingCallback):
    """ZSCL (``weightavg.methods.zscl``): a weight ensemble per task, and optional distillation from the original
    model on reference inputs. A task is one ``fit`` call; reuse the callback object for every task of a sequence.

    The ensemble copies the weights when fit starts, merges after the first optimizer step and every
    ``every_n_steps`` after, is what validation uses, and is what the model holds when fit ends, so the next task
    starts from it. Checkpoints resume it exactly (``trainer.fit(ckpt_path=...)``).

    Distillation (with ``reference=``) adds ``distill_weight * KD`` computed by one line in ``training_step``::

        loss = task_loss + weightavg.callbacks.ZSCL.distillation_loss(self)

    which is zero when no ZSCL callback distills (and outside training, e.g. in a step shared with validation), so an
    ablation changes only the callback's arguments. Reference batches are moved to the model's device without the
    module's batch-transfer hooks (those are written for training batches).

    Its arguments: the method's ``EnsembleSettings`` and ``DistillationSettings`` (``weightavg.methods.zscl``), then
    ``CallbackOptions`` and ``EngineOptions`` (Args below).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._start_hosting(ZSCLRule(**setting_values(self, EnsembleSettings)), EnsembleSettings, DistillationSettings)
        self.distillation = self.build_distillation()
        self._trainer: pl.Trainer | None = None

    @override
    def bind_extra(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        if self.distillation is not None:
            self.distillation.bind(pl_module, self.teacher)

    def loss(self) -> torch.Tensor:
        """``distill_weight * KD`` on the next reference batch (moved and converted like training batches)."""
        if self.distillation is None:
            raise RuntimeError(f"{self.name} does not distill: give it reference= inputs")
        if self._trainer is None:
            raise RuntimeError(f"{self.name} distills only during fit (its teacher is taken when fit starts)")
        trainer = self._trainer
        device = trainer.strategy.root_device

        def transfer(batch: Any) -> Any:
            # Moved without the module's batch-transfer hooks: those are written for training batches.
            return trainer.precision_plugin.convert_input(move_data_to_device(batch, device))

        return self.distillation.loss(transfer)

    @staticmethod
    def distillation_loss(pl_module: pl.LightningModule) -> torch.Tensor:
        """The summed distillation losses of the ZSCL callbacks in ``pl_module``'s Trainer that distill; a zero
        tensor when there are none, outside training (a step shared with validation), or without a Trainer. Add it
        to the loss in ``training_step``."""
        trainer = pl_module._trainer
        running = [] if trainer is None or not trainer.training else trainer.callbacks  # type: ignore[attr-defined]
        callbacks = [cb for cb in running if isinstance(cb, ZSCL)]
        losses = [cb.loss() for cb in callbacks if cb.distillation is not None]
        if not losses:
            return torch.zeros((), device=pl_module.device)
        return torch.stack(losses).sum() if len(losses) > 1 else losses[0]

    @override
    def _state_keys(self) -> set[str]:
        return super()._state_keys() | ({"distillation"} if self.distillation is not None else set())

    @override
    def _bound_parts(self) -> dict[str, Any]:
        parts = super()._bound_parts()
        if self.distillation is not None and self.distillation.teacher is not None:
            parts["distillation"] = self.distillation
        return parts


class LCSC(AveragingCallback):
    """Snapshots during fit, combined at its end (``weightavg.methods.lcsc``): LCSC's evolutionary search, or a
    uniform/greedy soup, EMA-equivalent or metric-weighted coefficients, or the last snapshot.

    During fit the live weights are snapshotted every ``every_n_steps`` optimizer steps (or ``every_n_epochs``) into a
    ``SnapshotStore`` (safetensors files in ``directory``, found again when a run resumes), keeping the newest
    ``keep``. When fit ends the chosen coefficients' combination is streamed into a buffer beside the model
    and swapped in: candidates are scored on validation dataloader ``search_on`` with the module's logged
    ``monitor`` or a ``metric``; the best goes into the model (``apply_at_end``) and ``result_path`` gets the
    coefficients and the search history.

    Args:
        every_n_steps, every_n_epochs: when to snapshot (at most one of them; neither: every epoch).
        keep: how many of the newest snapshots to keep (``None``: all).
        directory: where snapshot files go (global rank 0 writes; every rank reads them at the end, so it must be
            shared); a relative folder is relative to the Trainer's ``default_root_dir`` (stable across resumes,
            unlike a logger's versioned folder). Default: ``weightavg_snapshots/<name>`` there, a folder the callback
            owns (a fresh fit replaces an earlier run's snapshots in it, with a warning). ``":memory:"`` keeps the
            snapshots in host memory instead: ``keep`` copies of the model in RAM, lost on a crash, not found on
            resume.
        background: write snapshot files from a background thread (a checkpoint waits for pending writes).
        overwrite: a fresh fit (no ``ckpt_path``) in a folder holding snapshots is refused when fit starts unless
            ``overwrite=True``, which deletes them; a resumed fit keeps those up to its step and drops the rest.
        method: ``"lcsc"`` (search), ``"greedy"``, ``"uniform"``, ``"ema"``, ``"metric"`` or ``"last"``.
        monitor, metric, forward, mode: the fitness, as for ``WiSEFT`` (needed by ``lcsc`` and ``greedy``; the other
            methods are scored with it when given).
        search_on: the validation dataloader the fitness reads. Under DDP every rank runs the search and rank 0's
            result is used; log ``monitor`` with ``sync_dist=True`` so that it scores every rank's data.
        settings: ``SearchSettings`` of the LCSC search (population, generations, seed, ...).
        decay: for ``method="ema"``. penalty, by, metric_key: for ``method="metric"`` (``metric_key`` is read from
            what the module logs when a snapshot is taken, e.g. ``train_loss``). rule: for ``method="greedy"``.
        apply_at_end: leave the chosen combination in the model (else only ``result`` and the files are produced).
        export_path: write the chosen combination as safetensors. result_path: write ``result`` as JSON.
        dtype: accumulation dtype of combinations (``torch.float32`` or ``torch.float64``).
        progress: show a progress bar over the search's evaluations (``lcsc`` and ``greedy``) when the Trainer shows
            its own progress bar (not with ``enable_progress_bar=False``) and stderr is a terminal.
        recompute_bn, bn_input, bn_batches: recompute the BatchNorm statistics of the chosen combination with one
            pass over the training data before it is exported and applied (as for ``SWA``; candidates during the
            search are scored with combined statistics).
        name, buffers, include, exclude: as for every averager.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        every_n_epochs: int | None = None,
        keep: int | None = 12,
        directory: str | os.PathLike[str] | None = None,
        background: bool = False,
        overwrite: bool = False,
        method: Method = "lcsc",
        monitor: str | None = None,
        metric: Any = None,
        forward: Forward | None = None,
        mode: Literal["max", "min"] = "max",
        search_on: int = 0,
        settings: SearchSettings | Mapping[str, Any] | None = None,
        decay: float = 0.9,
        penalty: float = 1.0,
        by: Literal["loss", "step"] = "loss",
        metric_key: str = "train_loss",
        rule: Literal["strict", "not_worse"] = "strict",
        apply_at_end: bool = True,
        export_path: str | os.PathLike[str] | None = None,
        result_path: str | os.PathLike[str] | None = None,
        dtype: str | torch.dtype = "float32",
        progress: bool = True,
        recompute_bn: bool = True,
        bn_input: Callable[[Any], Any] | None = None,
        bn_batches: int | None = None,
        name: str | None = None,
        buffers: BufferPolicy = "average",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
    ) -> None:
        check_name(name)
        super().__init__(
            Snapshot(),
            validate_with="live",
            apply_at_end=False,
            export_path=export_path,
            name=name or "LCSC",
            buffers=buffers,
            include=include,
            exclude=exclude,
            dtype="live",
        )
        for flag, value in (
            ("background", background),
            ("apply_at_end", apply_at_end),
            ("progress", progress),
            ("recompute_bn", recompute_bn),
        ):
            check_bool(flag, value)
        check_directory("directory", directory)
        check_callable("forward", forward)
        check_callable("metric", metric)
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError(
                f"give every_n_steps={every_n_steps!r} or every_n_epochs={every_n_epochs!r}, not both (when to "
                "snapshot; neither: every epoch)"
            )
        if every_n_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        if every_n_steps is not None:
            check_number("every_n_steps", every_n_steps, low=1, integer=True)
        if every_n_epochs is not None:
            check_number("every_n_epochs", every_n_epochs, low=1, integer=True)
        if keep is not None:
            check_number("keep", keep, low=1, integer=True)
        if background and directory == MEMORY:
            raise ValueError(
                f"background=True writes snapshot files; directory={MEMORY!r} keeps them in memory (no writer needed)"
            )
        check_fitness(monitor, metric)
        check_number("search_on", search_on, low=0, integer=True)
        if isinstance(settings, Mapping):  # a config node
            settings = SearchSettings(**dict(settings))
        # Every recipe's options, whichever ``method`` uses: a mistake surfaces here, not after training.
        check_options(
            method=method,
            mode=mode,
            settings=settings,
            decay=decay,
            penalty=penalty,
            by=by,
            metric_key=metric_key,
            rule=rule,
            progress=progress,
        )
        check_output_file("result_path", result_path)
        check_callable("bn_input", bn_input)
        self.every_n_steps, self.every_n_epochs, self.keep = every_n_steps, every_n_epochs, keep
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite={overwrite!r} must be a bool")
        self.directory, self.background, self.overwrite = directory, background, overwrite
        self._in_memory = isinstance(directory, str) and directory == MEMORY
        self.method: Method = method
        self.monitor, self.metric, self.forward, self.mode = monitor, metric, forward, mode
        self.search_on, self.settings = search_on, settings
        self.decay, self.penalty, self.by, self.metric_key, self.greedy_rule = decay, penalty, by, metric_key, rule
        self.leave_result, self.result_path = apply_at_end, result_path
        self.combine_dtype, self.progress = combine_dtype(dtype), progress
        if bn_batches is not None:
            check_number("bn_batches", bn_batches, low=1, integer=True)
        self.recompute_bn, self.bn_input, self.bn_batches = recompute_bn, bn_input, bn_batches
        self.combiner: Combiner | None = None
        self.result: SearchResult | None = None
        self._last_snapshot_step = -1

    @override
    def _finishes_model(self) -> bool:
        return self.leave_result

    @override
    def check_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.method in ("lcsc", "greedy") and self.monitor is None and self.metric is None:
            raise ValueError(
                f"{self.name}: method={self.method!r} scores candidates: give monitor= (a metric validation_step "
                "logs) or metric="
            )
        if self.monitor is not None or self.metric is not None:
            loop = trainer.fit_loop.epoch_loop.val_loop
            try:
                loop.setup_data()
                count = len(WiSEFT._loaders(trainer))
            except MisconfigurationException:
                count = 0
            if self.search_on >= count or loop.skip:
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
        self.combiner = Combiner(pl_module, store, dtype=self.combine_dtype, averager=self._bound())

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
        # After a checkpoint restored the step count: drop snapshots an interrupted run took past it.
        combiner = self._combiner()
        if trainer.is_global_zero or self._in_memory:
            combiner.store.discard_after(trainer.global_step)
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
        step = trainer.global_step
        if self.every_n_steps is not None and step != self._last_snapshot_step and step % self.every_n_steps == 0:
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
        for peer in self._peers:
            peer._suspended = True
        try:
            self.result = combiner.choose(
                self.method,
                evaluate,
                mode=self.mode,
                settings=self.settings,
                decay=self.decay,
                penalty=self.penalty,
                by=self.by,
                metric_key=self.metric_key,
                rule=self.greedy_rule,
                progress=trainer_shows_progress(trainer, self.progress),
            )
        finally:
            for peer in self._peers:
                peer._suspended = False
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
        rank_zero_info(
            f"weightavg: {self.name} ({self.method}) over {len(combiner.store.snapshots)} snapshots: fitness "
            f"{self.result.fitness:.5g} after {self.result.evaluations} evaluations"
        )
        if self.leave_result:
            averager.refresh()
            averager.swap()  # by pointer: the live weights stay in the averager for later checkpoints
            self._applied = True

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._check_monitor_logged(trainer, self.monitor)

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
        loop = trainer.fit_loop.epoch_loop.val_loop
        loop.setup_data()
        loaders = WiSEFT._loaders(trainer)
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
    def state_dict(self) -> dict[str, Any]:
        # The snapshots are the state: files in ``directory`` are found again on resume. A checkpoint must only be
        # written once every snapshot taken before it is on disk (a background write may still be queued).
        if self.combiner is not None:
            self.combiner.store.flush()
        return {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


@dataclass(eq=False, repr=False)
class EWA(OutputOptions, ConversionSettings, ShareSettings, Callback):  # signature: last base's fields first
    """EWA (``weightavg.methods.ewa``) in a Lightning run: the chosen FFNs become random-partition mixtures when fit
    is set up (before ``configure_optimizers`` and before a checkpoint is restored), their experts are pulled toward
    each other after every optimizer step, and at the end of fit each mixture is merged back into its dense FFN.

    Validation during fit already measures the merged model (a mixture in eval mode computes the dense FFN with the
    experts' mean). A model that is already converted (``weightavg.ewa.to_moe``) is used as it is.

    With averagers of the weights (EMA, SWA, ...) in the same run, put EWA after them in ``Trainer(callbacks=...)``:
    they average the mixtures' expert tensors like any parameter, the one that applies at the end puts its average in
    the mixtures, and EWA then merges that average.

    Its arguments: the method's ``ShareSettings`` and ``ConversionSettings`` (``weightavg.methods.ewa``), the two
    below, and ``OutputOptions`` (``export_path`` writes the merged model's ``state_dict``) (Args below).
    """

    _: KW_ONLY
    merge_at_end: bool = True
    """Merge the mixtures into dense FFNs when fit ends (else the model keeps its mixtures)."""
    log_spread: bool = True
    """Log ``ewa/spread`` (the largest RMS distance of a layer's experts from their mean) and ``ewa/beta`` at the end
    of each training epoch (one host sync per mixture per epoch)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("beta", self.beta, low=0.0, high=(self.num_experts - 1) / self.num_experts)
        check_bool("merge_at_end", self.merge_at_end)
        check_bool("log_spread", self.log_spread)
        if self.export_path is not None and not self.merge_at_end:
            raise ValueError(
                f"export_path={self.export_path!r} needs merge_at_end=True: the export is the merged model"
            )
        self.name = self.name or "EWA"
        self.converted: list[str] = []
        self._last_step = -1

    def __repr__(self) -> str:
        ramp = f", ramp_steps={self.ramp_steps}" if self.ramp_steps else ""
        return f"EWA(beta={self.beta:g}{ramp}, num_experts={self.num_experts})"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or ewa_mixtures(pl_module):
            return
        self.converted = self.convert(pl_module)
        rank_zero_info(f"weightavg: {self.name} turned {self.converted} into mixtures of {self.num_experts} experts")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        later = [cb for cb in callbacks[callbacks.index(self) + 1 :] if isinstance(cb, AveragingCallback)]
        if later and self.merge_at_end:
            raise ValueError(
                f"{later[0].name} comes after {self.name} in Trainer(callbacks=...): {self.name} merges the mixtures "
                f"when fit ends, so {later[0].name} would put its average into tensors that are no longer in the "
                f"model. Put {self.name} last (then it merges what {later[0].name} leaves in the model)"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_mixtures(pl_module, f"{self.name} (select matched nothing, or the model was merged)")
        self._last_step = trainer.global_step

    def current_beta(self, step: int) -> float:
        """The share rate after optimizer step ``step``."""
        return self.beta_at(step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._last_step:  # once per optimizer step (gradient accumulation repeats the step count)
            share_all(pl_module, self.current_beta(step))
            self._last_step = step

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = ewa_mixtures(pl_module)
        if self.log_spread and layers:
            pl_module.log("ewa/spread", max(layer.spread() for layer in layers))
            pl_module.log("ewa/beta", self.current_beta(trainer.global_step))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.merge_at_end:
            return
        merged = to_dense(pl_module)
        rank_zero_info(f"weightavg: {self.name} merged {merged} mixtures into dense FFNs")
        if self.export_path is not None and trainer.is_global_zero:
            save_safetensors(pl_module.state_dict(), self.export_path)


@dataclass(eq=False, repr=False)
class OuterOptions(Settings):
    """What NoLoCo's and DiLoCo's callbacks do besides the outer step."""

    _: KW_ONLY
    average_at_end: bool = False
    """When fit ends, replace every replica by the mean over ranks (one all-reduce), so all ranks end with one model
    (else each keeps its own)."""
    log_traffic: bool = True
    """Log ``bytes_sent``, ``operations``, ``wait_seconds`` and ``syncs`` under ``weightavg/<name>/`` each epoch (this
    rank's own counters; rank 0's reach the loggers)."""

    def __post_init__(self) -> None:
        check_bool("average_at_end", self.average_at_end)
        check_bool("log_traffic", self.log_traffic)
        super().__post_init__()


class _OuterStep(AveragingCallback):
    """NoLoCo and DiLoCo in a Lightning run: slow weights (the engine's average, fp32 for low-precision weights, one
    flat buffer per dtype group) and an outer step every ``sync_every`` optimizer steps. Needs
    ``Trainer(strategy="local_ddp")`` with several processes (any strategy that all-reduces gradients is refused).
    Checkpoints carry each rank's own slow weights, momentum and counters (the strategy writes one file per rank).
    The slow weights are never put into the model at the end of fit (``apply_at_end`` is off).
    """

    apply_at_end = False
    dtype: torch.dtype | str | None
    average_at_end: bool
    log_traffic: bool

    def _engine_options(self) -> dict[str, Any]:
        # The outer step reads whole groups: every parameter, no buffers, one flat buffer per group.
        return {"buffers": "ignore", "contiguous": True, "dtype": self.dtype}

    def _start_outer(self, rule: NoLoCoRule | DiLoCoRule, settings: type) -> None:
        self.name = self.name or rule.method_name
        self._start_hosting(Snapshot(), settings)
        self.outer_rule = rule
        self.replica: Replica | None = None
        self._last_step = -1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        strategy = trainer.strategy
        if stage == "fit" and isinstance(strategy, ParallelStrategy) and not isinstance(strategy, LocalDDPStrategy):
            raise ValueError(
                f"{self.name} with {type(strategy).__name__} needs Trainer(strategy={LOCAL_DDP!r}): "
                f"{type(strategy).__name__} all-reduces gradients every step, so the replicas would never "
                "train apart and the outer step would only add communication"
            )

    @override
    def bind_extra(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.replica = Replica(self._bound(), self.outer_rule)  # on the slow weights: a copy of the synced start
        self._last_step = trainer.global_step

    def _replica(self) -> Replica:
        if self.replica is None:
            raise RuntimeError(f"{self.name} is not bound to a model yet (it binds when fit starts)")
        return self.replica

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._last_step:  # once per optimizer step (gradient accumulation repeats the step count)
            self._replica().inner_step()
            self._last_step = step

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_traffic:  # this rank's own counters (rank 0's reach the loggers): not reduced over ranks
            traffic = self._replica().traffic.as_dict()
            log_to_loggers(trainer, {self.metric_prefix + k: float(v) for k, v in traffic.items()})

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.average_at_end:
            average_replicas([t for live, _ in self._bound().tensor_groups() for t in live])
        super().on_train_end(trainer, pl_module)

    @override
    def _state_keys(self) -> set[str]:
        return super()._state_keys() | {"outer"}

    @override
    def _bound_parts(self) -> dict[str, Any]:
        parts = super()._bound_parts()
        if self.replica is not None:
            parts["outer"] = self.replica
        return parts


@dataclass(eq=False, repr=False)
class NoLoCo(DtypeOption, HostOptions, OuterOptions, NoLoCoSettings, _OuterStep):  # signature: last base's first
    """NoLoCo (``weightavg.methods.noloco``): each replica trains alone and every ``sync_every`` optimizer steps
    averages with ``group_size - 1`` random peers (point-to-point, no all-reduce) through a momentum outer step.

    ``Trainer(strategy="local_ddp", devices=N, callbacks=[NoLoCo()])``; with one process it is a Lookahead-like
    outer step on the replica alone.

    Its arguments: the method's ``NoLoCoSettings``, ``OuterOptions``, ``HostOptions`` (``validate_with`` defaults to
    ``"live"``, the replica's fast weights; ``"average"`` validates its slow weights; ``export_path`` writes rank 0's
    slow weights) and ``DtypeOption`` (the slow weights' dtype) (Args below).
    """

    _: KW_ONLY
    validate_with: ValidateWith = "live"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._start_outer(NoLoCoRule(**setting_values(self, NoLoCoSettings)), NoLoCoSettings)


@dataclass(eq=False, repr=False)
class DiLoCo(DtypeOption, HostOptions, OuterOptions, DiLoCoSettings, _OuterStep):  # signature: last base's first
    """DiLoCo (``weightavg.methods.noloco``): each replica trains alone and every ``sync_every`` optimizer steps
    the replicas all-reduce the pseudo-gradient and apply outer SGD (Nesterov or heavy-ball) to the slow weights.

    Its arguments: the method's ``DiLoCoSettings``, then as for ``NoLoCo``.
    """

    _: KW_ONLY
    validate_with: ValidateWith = "live"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._start_outer(DiLoCoRule(**setting_values(self, DiLoCoSettings)), DiLoCoSettings)


describe_arguments(EMA, SWA, ZSCL, NoLoCo, DiLoCo, EWA)
