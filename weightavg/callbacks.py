"""Lightning face: ``weightavg.callbacks.EMA(...)`` and ``weightavg.callbacks.SWA(...)``.

Each callback hosts one ``weightavg.Averager``; this file only maps Trainer events onto it (optimizer steps, epoch
ends, validation, checkpoints, the end of fit). The averaging math lives in ``weightavg.methods``.

Several averagers may share a run. Two roles go to one callback each, by their order in ``Trainer(callbacks=...)``:

- the *validator*, the first callback with ``validate_with="average"``: validation runs on its average;
- the *owner*, the first callback with ``apply_at_end=True``: its average goes into the checkpoint's ``state_dict``
  and into the model at the end of fit; the live weights are saved beside it (checkpoint key ``LIVE_KEY``) and put
  back on resume.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from weightavg.core.averager import Averager
from weightavg.core.binding import BufferPolicy, check_buffer_policy
from weightavg.core.checks import check_choice, check_device, check_number
from weightavg.core.rule import Rule
from weightavg.core.schedules import StartUnit, Unit, Warmup
from weightavg.methods.ema import EMA as EMARule
from weightavg.methods.swa import SWA as SWARule

ValidateWith = Literal["average", "live"]
#: Checkpoint key of the live weights, saved beside a ``state_dict`` that holds an average.
LIVE_KEY = "weightavg_live_weights"


class AveragingCallback(Callback):
    """Host any averaging rule in a Lightning ``Trainer``.

    Args:
        rule: the method's rule (``weightavg.methods.EMA(...)``, ...).
        validate_with: ``"average"`` to validate on this callback's average (once it has had an update; before
            that validation uses the live weights), or ``"live"``. With several averagers the first one set to
            ``"average"`` is used; the Trainer logs which.
        apply_at_end: at the end of fit, leave the averaged weights in the model (the live ones are discarded).
            With several averagers the first one with ``apply_at_end=True`` does it, and its average is also what
            checkpoints hold under ``state_dict``.
        export_path: write the averaged weights as safetensors here at the end of fit (global rank 0).
        name: a unique name for this averager (its checkpoint ``state_key`` is ``weightavg[<name>]``); default: the
            rule's compact repr, e.g. ``EMA(decay=0.999)``. Two identical averagers need distinct names: Lightning
            refuses two callbacks with one ``state_key`` when the Trainer is built.
        buffers, include, exclude, device, dtype, contiguous: as for ``weightavg.Averager`` (``contiguous=True``:
            one update kernel per dtype group instead of one per tensor; single-process runs only).
    """

    def __init__(
        self,
        rule: Rule,
        *,
        validate_with: ValidateWith = "average",
        apply_at_end: bool = True,
        export_path: str | os.PathLike[str] | None = None,
        name: str | None = None,
        buffers: BufferPolicy = "average",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        contiguous: bool = False,
    ) -> None:
        # Everything that can be checked before training is checked here, not after hours of it.
        if not isinstance(rule, Rule):
            raise TypeError(f"rule={rule!r} must be an averaging rule such as weightavg.methods.EMA(...)")
        check_choice("validate_with", validate_with, ("average", "live"))
        check_buffer_policy(buffers)
        check_device(device)
        if export_path is not None and not isinstance(export_path, (str, os.PathLike)):
            raise TypeError(f"export_path={export_path!r} must be a path (str or os.PathLike) or None")
        if not isinstance(apply_at_end, bool):
            raise TypeError(f"apply_at_end={apply_at_end!r} must be a bool")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name={name!r} must be a non-empty string or None")
        self.rule = rule
        self.validate_with = validate_with
        self.apply_at_end = apply_at_end
        self.export_path = export_path
        self.name = name or repr(rule)
        self._engine_kwargs: dict[str, Any] = {
            "buffers": buffers, "include": include, "exclude": exclude, "device": device, "dtype": dtype,
            "contiguous": contiguous,
        }
        self.averager: Averager | None = None
        self._pending_state: dict[str, Any] | None = None
        self._validates = False
        self._owns_model = False
        self._swapped_for_validation = False
        self._applied = False
        self._fitting = False  # between on_fit_start and the end of training: the averager belongs to this fit
        self._accept_state = True  # whether a checkpoint being restored is for fitting (else its state is ignored)
        self._peers: list[AveragingCallback] = []

    @property
    @override
    def state_key(self) -> str:
        return f"weightavg[{self.name}]"

    # ------------------------------------------------------------------ roles and binding
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        ours = [cb for cb in trainer.callbacks if isinstance(cb, AveragingCallback)]  # type: ignore[attr-defined]
        validator = next((cb for cb in ours if cb.validate_with == "average"), None)
        owner = next((cb for cb in ours if cb.apply_at_end), None)
        for cb in ours:
            cb._peers = ours
            cb._validates = cb is validator
            cb._owns_model = cb is owner
        if len(ours) > 1 and self is ours[0]:
            rank_zero_info(
                f"weightavg: validation uses {validator.name if validator else 'the live weights'}; "
                f"the model ends with {owner.name if owner else 'the live weights'}"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Bound here, after the strategy has moved and converted the model (device, bf16-true), so the averages sit
        # beside the tensors that training will actually update. Each fit() starts a fresh average (a new Trainer
        # restarts its step counters); trainer.fit(ckpt_path=...) is how an average continues.
        if self._engine_kwargs["contiguous"] and trainer.world_size > 1:
            raise ValueError(
                "contiguous=True re-homes the model's tensors, which callbacks can only do after the strategy has "
                f"wrapped the model; it is not supported with {trainer.world_size} processes: use contiguous=False"
            )
        total = trainer.estimated_stepping_batches
        total_steps = int(total) if math.isfinite(total) else None
        self.averager = Averager(pl_module, self.rule, total_steps=total_steps, **self._engine_kwargs)
        self._applied = False
        self._fitting = True
        self.check_model(trainer, pl_module)
        if self._pending_state is not None:
            self.averager.load_state_dict(self._pending_state)
            self._pending_state = None

    def check_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse, when fit starts, what this averager could only fail on at the end of fit."""

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
        if trainer.global_step > 0:
            averager.step(trainer.global_step)  # a repeated global_step (gradient accumulation) is ignored
        # The epoch's last batch counts as its end, so an epoch-wise average is fresh for the validation that
        # Lightning runs before on_train_epoch_end.
        if batch_idx + 1 == trainer.num_training_batches:
            averager.epoch_end(trainer.current_epoch + 1)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bound().epoch_end(trainer.current_epoch + 1)  # no-op when the last batch already counted

    # ------------------------------------------------------------------ evaluation on the average
    def _swap_in_for_evaluation(self) -> None:
        averager = self.averager
        if self._validates and averager is not None and averager.has_average and not averager.is_swapped:
            averager.refresh()
            averager.swap()
            self._swapped_for_validation = True

    def _swap_back_after_evaluation(self) -> None:
        if self._swapped_for_validation:
            self._bound().swap()
            self._swapped_for_validation = False

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in_for_evaluation()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_validation_end, not on_validation_epoch_end: the LightningModule's own on_validation_epoch_end (which
        # Lightning calls after the callbacks') must still see the weights that were validated.
        self._swap_back_after_evaluation()

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not any(peer._applied for peer in self._peers):  # after fit, test what the model ends with
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
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.averager is None:
            return {"averaging": self._pending_state} if self._pending_state is not None else {}
        return {"averaging": self.averager.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "averaging" not in state_dict or not self._accept_state:
            return  # validate/test/predict from a checkpoint need no averaging state
        if self._fitting and self.averager is not None:
            self.averager.load_state_dict(state_dict["averaging"])  # strategies that restore after setup
        else:
            self._pending_state = state_dict["averaging"]  # applied when fit binds a fresh averager

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self is (self._peers[0] if self._peers else self):
            self._save_live_weights(pl_module, checkpoint)
        averager = self.averager
        if not self._owns_model or averager is None or not averager.has_average or self._applied:
            return  # after fit the model itself holds this average (and whatever was done to it since)
        # The model's state_dict gets this average (so load_from_checkpoint gives the averaged model), whether or
        # not some average is swapped in right now.
        model_state = checkpoint["state_dict"]
        current = pl_module.state_dict()
        aliases = averager.aliases()
        for name, tensor in averager.averaged_tensors().items():
            for key in (name, *aliases[name]):
                if key in model_state:
                    model_state[key] = tensor.detach().to(dtype=current[key].dtype, device=current[key].device)

    def _save_live_weights(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Save the live model state beside a ``state_dict`` that holds (or may hold) an average.

        The live state is the model's own, except where an averager has its average swapped in (for validation, or
        for good after fit): there the averager holds the live tensors.
        """
        swapped = [p.averager for p in self._peers if p.averager is not None and p.averager.is_swapped]
        owner_writes = any(p._owns_model and p.averager is not None and p.averager.has_average for p in self._peers)
        if not swapped and not owner_writes:
            return
        live = dict(pl_module.state_dict())
        for averager in swapped:
            aliases = averager.aliases()
            for name, tensor in averager.live_tensors().items():
                for key in (name, *aliases[name]):
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
        if live is not None and self is (self._peers[0] if self._peers else self):
            # The Trainer has just loaded state_dict (an average) into the model; put the live weights back. The
            # first averager does it whatever the names, so training never continues from an average by mistake.
            pl_module.load_state_dict(live)


class EMA(AveragingCallback):
    """Exponential moving average of the weights (``weightavg.methods.EMA``) as a Lightning callback.

    Example:
        >>> trainer = pl.Trainer(callbacks=[EMA(decay=0.999), EMA(decay=0.9999), SWA(start=0.75)])  # doctest: +SKIP
    """

    def __init__(
        self,
        decay: float | None = None,
        *,
        half_life: float | None = None,
        warmup: Warmup = "none",
        gamma: float = 1.0,
        power: float = 2 / 3,
        every_n_steps: int = 1,
        start_step: int = 0,
        scale_decay: bool = True,
        **options: Any,
    ) -> None:
        rule = EMARule(
            decay=decay, half_life=half_life, warmup=warmup, gamma=gamma, power=power,
            every_n_steps=every_n_steps, start_step=start_step, scale_decay=scale_decay,
        )
        super().__init__(rule, **options)


class SWA(AveragingCallback):
    """Stochastic weight averaging (``weightavg.methods.SWA``) as a Lightning callback.

    The callback never touches the optimizer or LR scheduler: return ``torch.optim.swa_utils.SWALR`` (or any
    schedule) from ``configure_optimizers`` for the SWA phase. At the end of fit, BatchNorm statistics of the
    average are recomputed with one pass over the training data (``recompute_bn``) before export and apply.

    Args:
        start, start_unit, every, every_unit: see ``weightavg.methods.SWA``; ``start`` defaults to 75% of the run.
        recompute_bn: recompute BatchNorm statistics of the average at the end of fit (models with BatchNorm only);
            checked when fit starts: the statistics must be in the average (not ``buffers="ignore"``/excluded).
        bn_input: maps a training batch to the model's input for that pass; default ``batch[0]`` for list/tuple
            batches and the batch itself otherwise.
        bn_batches: batches for that pass; default one epoch of the training data (required when its length is
            unknown, e.g. an infinite iterable dataset). Several train loaders (a list or dict) are read in turn.
    """

    def __init__(
        self,
        start: float = 0.75,
        *,
        start_unit: StartUnit = "fraction",
        every: int = 1,
        every_unit: Unit = "epoch",
        recompute_bn: bool = True,
        bn_input: Callable[[Any], Any] | None = None,
        bn_batches: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(SWARule(start=start, start_unit=start_unit, every=every, every_unit=every_unit), **options)
        if bn_batches is not None:
            check_number("bn_batches", bn_batches, low=1, integer=True)
        self.recompute_bn = recompute_bn
        self.bn_input = bn_input
        self.bn_batches = bn_batches

    @override
    def check_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.recompute_bn or not self._bound().check_update_bn(pl_module):
            return
        if self.bn_batches is None and not math.isfinite(trainer.num_training_batches):
            raise ValueError(
                "SWA(recompute_bn=True) needs bn_batches=... when the training data has no length "
                "(or recompute_bn=False)"
            )

    @override
    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.recompute_bn:
            return
        limit = self.bn_batches or int(trainer.num_training_batches)

        def batches() -> Iterator[Any]:
            loaders: Any = trainer.train_dataloader
            if isinstance(loaders, dict):
                loaders = list(loaders.values())
            for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
                yield from loader

        def inputs() -> Iterator[list[Any]]:
            for batch in islice(batches(), limit):
                batch = trainer.strategy.batch_to_device(batch)
                if self.bn_input is not None:
                    batch = self.bn_input(batch)
                elif isinstance(batch, (list, tuple)):
                    batch = batch[0]
                yield [trainer.precision_plugin.convert_input(batch)]

        with trainer.precision_plugin.forward_context():
            self._bound().update_bn(inputs(), pl_module)
