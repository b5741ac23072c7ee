"""The Lightning host every averaging callback shares: its option groups and ``AveragingCallback``, which
maps Trainer events (optimizer steps, epoch ends, validation, checkpoints, the end of fit) onto a method's engine.

Several averagers may share a run. Two roles go to one callback each, by their order in ``Trainer(callbacks=...)``:

- the *validator*, the first callback with ``validate_with="average"``: validation runs on its average (a callback
  with ``validate_with="both"`` validates its average a second time, its metrics under ``metric_prefix``);
- the *owner*, the first averager with ``apply_at_end=True``: its average goes into the model at the end of fit.
  *Finishers* (WiSE-FT, LCSC, NoLoCo's final mean) put their own result in after it, from what the model holds then.

The checkpoint's ``state_dict`` holds the validator's average (without a validator, the first ``"both"`` callback's,
else the owner's; see ``checkpoint_weights``), so that ``ModelCheckpoint(monitor=...)`` saves the weights it
measured; the live weights are saved beside it (checkpoint key ``LIVE_KEY``) and put back on resume, and
``MARKER_KEY`` says what ``state_dict`` holds. Loading weights into the model never writes into an average.

Each averager logs ``updates`` (and an EMA its ``decay``) under ``weightavg/<name>/`` every ``log_every_n_steps``
optimizer steps, straight to the Trainer's loggers.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from weightavg.callbacks.evaluation import run_validation
from weightavg.core.averager import Averager
from weightavg.core.checks import (
    STATE_VERSION,
    check_bool,
    check_choice,
    check_name,
    check_output_file,
    check_state_version,
)
from weightavg.core.rule import Rule
from weightavg.core.settings import ReadSettings, Settings, averager_options
from weightavg.methods.ema import EMA as EMARule

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
    """Write this callback's result (its average; WiSE-FT's chosen interpolation, LCSC's chosen combination, EWA's
    merged model) as safetensors here at the end of fit (global rank 0), atomically and one tensor at a time; missing
    folders are created, and a path that could not be written is refused when the callback is built."""
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


class OptimizerSteps(Callback):
    """The Lightning face's one once-per-optimizer-step guard, the base of every weightavg callback: Lightning calls
    ``on_train_batch_end`` after every batch, several times per optimizer step under gradient accumulation;
    ``on_optimizer_step(trainer, pl_module, step)`` runs once after each optimizer step (``step`` counts the run's
    optimizer steps, a resumed fit's included)."""

    _last_step = -1

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # restored by then when a fit resumes

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._last_step:
            self._last_step = step
            self.on_optimizer_step(trainer, pl_module, step)

    def on_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """After optimizer step ``step``, once."""


class AveragingCallback(ReadSettings, OptimizerSteps):
    """Host any averaging rule in a Lightning ``Trainer``: the base of every averaging callback.

    A method's callback declares its fields from the method's settings (``weightavg.methods.ema.EMASettings``), the
    host's ``CallbackOptions`` and the engine's ``EngineOptions`` (``weightavg.core.settings``), then hands its rule
    to ``_start_hosting``; every Trainer detail lives here.
    """

    #: Whether this callback puts its own result into the model at the end of fit, from what the model holds then
    #: (WiSE-FT, LCSC: ``_Finisher``); such callbacks must come after the owner that applies an average.
    _finisher: ClassVar[bool] = False
    #: For a finisher: whether its result is computed from what the model holds then (WiSE-FT interpolates toward it,
    #: NoLoCo averages it over ranks), or replaces it (LCSC combines snapshots of the live weights).
    _starts_from_model: ClassVar[bool] = True
    rule: Rule
    name: str | None  # the given name; the rule's repr once hosting starts
    validate_with: ValidateWith
    apply_at_end: bool
    export_path: str | os.PathLike[str] | None
    checkpoint_weights: CheckpointWeights
    resume_from_average: bool

    def _engine_options(self) -> dict[str, Any]:
        """The ``Averager`` settings of this callback's average (``weightavg.core.settings.averager_options``)."""
        return averager_options(self)

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
        owner = next((cb for cb in ours if cb.apply_at_end and not cb._finisher), None)
        writer = validator or both or owner
        for cb in ours:
            cb._peers = ours
            cb._validates = cb is validator
            cb._owns_model = cb is owner
            cb._writes_checkpoint = cb is writer
        finishers = [cb for cb in ours if cb._finisher and cb.apply_at_end]
        if owner is not None and finishers and ours.index(finishers[0]) < ours.index(owner):
            first = finishers[0].name
            raise ValueError(
                f"{first} comes before {owner.name} (apply_at_end=True) in Trainer(callbacks=...): {owner.name} "
                f"would replace {first}'s result when fit ends. Put {first} after it to start from its average, or "
                "set apply_at_end=False on one of them"
            )
        if stage == "fit" and self is ours[0]:
            _warn_on_checkpoint_mismatch(trainer, ours, validator, writer)
        if stage == "fit" and self.validate_with == "both":
            self._check_early_stopping_order(trainer)
        if self is ours[0]:
            ends = owner.name if owner else "the live weights"
            for finisher in finishers:  # in the order they finish
                if finisher._starts_from_model:
                    ends = f"{finisher.name}'s result (from {ends})"
                    continue
                if owner is not None and stage == "fit":
                    rank_zero_warn(
                        f"weightavg: {finisher.name} (apply_at_end=True) puts its combination of snapshots of the live "
                        f"weights into the model when fit ends, which discards {owner.name}'s average (apply_at_end="
                        f"True): set apply_at_end=False on one of them (or combine {owner.name}'s exports instead)"
                    )
                ends = f"{finisher.name}'s result"
            if len(ours) > 1:
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
        if engine.get("contiguous") and trainer.strategy.model is not pl_module:
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

    def _bound(self) -> Averager:
        if self.averager is None:
            raise RuntimeError(f"{self.name} is not bound to a model yet (it binds when fit starts)")
        return self.averager

    # ------------------------------------------------------------------ training events
    @override
    def on_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self._bound().step(step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # on_optimizer_step, once a step
        averager = self._bound()
        step = trainer.global_step
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
        parts = {**self._pending, **{key: part.state_dict() for key, part in self._bound_parts().items()}}
        return {"version": STATE_VERSION, **parts}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._accept_state:
            return  # validate/test/predict from a checkpoint need no averaging state
        check_state_version(state_dict, str(self.name))
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


class _Finisher(AveragingCallback):
    """A callback that puts its own result into the model when fit ends, computed from what the model holds then
    (WiSE-FT, LCSC): it validates on the live weights and comes after the averager whose average it starts from."""

    _finisher = True
    validate_with: ValidateWith = "live"
    checkpoint_weights: CheckpointWeights = "average"
    resume_from_average: bool = False

    def _run_suspending_peers(self, work: Callable[[], Any]) -> Any:
        """``work()`` with every other weightavg callback kept out of the validation runs it makes."""
        for peer in self._peers:
            peer._suspended = True
        try:
            return work()
        finally:
            for peer in self._peers:
                peer._suspended = False

    def _validation_loaders(self, trainer: pl.Trainer) -> list[Any]:
        """Fit's validation dataloaders, set up now (an empty list when there are none or validation is off)."""
        loop = trainer.fit_loop.epoch_loop.val_loop
        try:
            loop.setup_data()
        except MisconfigurationException:  # Lightning's "val_dataloader must be implemented"
            return []
        loaders = trainer.val_dataloaders
        if loop.skip or loaders is None:
            return []
        return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]

    @override
    def step_metrics(self, step: int) -> dict[str, float]:
        return {}  # a copy taken once (WiSE-FT's anchor) or snapshots (LCSC): no average to follow during fit

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._check_monitor_logged(trainer, getattr(self, "monitor", None))
