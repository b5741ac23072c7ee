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
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from weightavg.core.averager import Averager
from weightavg.core.binding import BufferPolicy
from weightavg.core.checks import check_choice
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
        buffers, include, exclude, device, dtype: as for ``weightavg.Averager``.
    """

    def __init__(
        self,
        rule: Rule,
        *,
        validate_with: ValidateWith = "average",
        apply_at_end: bool = True,
        export_path: str | None = None,
        name: str | None = None,
        buffers: BufferPolicy = "average",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        check_choice("validate_with", validate_with, ("average", "live"))
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
        }
        self.averager: Averager | None = None
        self._module: pl.LightningModule | None = None
        self._pending_state: dict[str, Any] | None = None
        self._validates = False
        self._owns_model = False
        self._swapped_for_validation = False
        self._applied = False
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
        # beside the tensors that training will actually update.
        total = trainer.estimated_stepping_batches
        total_steps = int(total) if math.isfinite(total) else None
        if self.averager is not None and self._module is pl_module and not self._applied:
            self.averager.total_steps = total_steps  # a further fit() of the same model continues the average
        else:
            self.averager = Averager(pl_module, self.rule, total_steps=total_steps, **self._engine_kwargs)
            self._module = pl_module
        self._applied = False
        if self._pending_state is not None:
            self.averager.load_state_dict(self._pending_state)
            self._pending_state = None

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

    # ------------------------------------------------------------------ validation
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        averager = self.averager
        usable = averager is not None and averager.has_average and not averager.is_swapped
        if self._validates and usable and not self._applied:
            self._bound().swap()
            self._swapped_for_validation = True

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped_for_validation:
            self._bound().swap()
            self._swapped_for_validation = False

    # ------------------------------------------------------------------ end of fit
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        averager = self._bound()
        if not averager.has_average:
            rank_zero_info(f"weightavg: {self.name} never updated (start not reached); the live weights stay")
            return
        self.finalize(trainer, pl_module)
        if self.export_path is not None and trainer.is_global_zero:
            averager.save(self.export_path)
        if self._owns_model:
            averager.copy_to_model()
            self._applied = True

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Last work on the average before it is exported and applied (SWA recomputes BatchNorm statistics)."""

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.averager is None:
            return dict(self._pending_state or {})
        return {"averaging": self.averager.state_dict()}

    def _live_weights(self) -> dict[str, torch.Tensor]:
        """The live weights, also while this or another averager has its average swapped in."""
        live = self.averager.live_tensors() if self.averager is not None else {}
        for peer in self._peers:
            if peer is not self and peer.averager is not None and peer.averager.is_swapped:
                live.update((k, v) for k, v in peer.averager.live_tensors().items() if k in live)
        return live

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "averaging" not in state_dict:
            return
        if self.averager is None:
            self._pending_state = state_dict["averaging"]
        else:
            self.averager.load_state_dict(state_dict["averaging"])

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        averager = self.averager
        if not self._owns_model or averager is None or not averager.has_average or self._applied:
            return
        # The model's state_dict gets the average (so load_from_checkpoint gives the averaged model); the live
        # weights travel in this callback's state. Correct whether or not the average is swapped in right now.
        checkpoint[LIVE_KEY] = self._live_weights()
        model_state = checkpoint["state_dict"]
        live = dict(pl_module.state_dict())
        aliases = averager.aliases()
        for name, tensor in averager.averaged_tensors().items():
            for key in (name, *aliases[name]):
                if key in model_state:
                    model_state[key] = tensor.detach().to(dtype=live[key].dtype, device=live[key].device)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = [key for key in checkpoint.get("callbacks", {}) if key.startswith("weightavg[")]
        if saved and self.state_key not in saved:
            rank_zero_warn(
                f"weightavg: the checkpoint holds no state for {self.state_key} (it has {saved}); this averager "
                "starts afresh. Give averagers a fixed name=... to resume them after changing their arguments."
            )
        live = checkpoint.get(LIVE_KEY)
        if live is None or self is not next(iter(self._peers), self):
            return
        # The Trainer has just loaded state_dict (an average) into the model; put the live weights back. The first
        # averager does it whatever the names, so training never continues from an average by mistake.
        targets = dict(pl_module.state_dict(keep_vars=True))
        with torch.no_grad():
            for name, tensor in live.items():
                if name not in targets:
                    raise ValueError(f"checkpoint's live weights hold {name!r}, which the model does not have")
                targets[name].copy_(tensor)


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
        rule = EMARule(decay, half_life, warmup, gamma, power, every_n_steps, start_step, scale_decay)
        super().__init__(rule, **options)


class SWA(AveragingCallback):
    """Stochastic weight averaging (``weightavg.methods.SWA``) as a Lightning callback.

    The callback never touches the optimizer or LR scheduler: return ``torch.optim.swa_utils.SWALR`` (or any
    schedule) from ``configure_optimizers`` for the SWA phase. At the end of fit, BatchNorm statistics of the
    average are recomputed with one pass over the training data (``recompute_bn``) before export and apply.

    Args:
        start, start_unit, every, every_unit: see ``weightavg.methods.SWA``; ``start`` defaults to 75% of the run.
        recompute_bn: recompute BatchNorm statistics of the average at the end of fit (models with BatchNorm only).
        bn_input: maps a training batch to the model's input for that pass; default ``batch[0]`` for list/tuple
            batches and the batch itself otherwise.
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
        **options: Any,
    ) -> None:
        super().__init__(SWARule(start, start_unit, every, every_unit), **options)
        self.recompute_bn = recompute_bn
        self.bn_input = bn_input

    @override
    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.recompute_bn:
            return

        def inputs() -> Iterator[list[Any]]:
            loaders = trainer.train_dataloader
            loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
            for loader in loaders:
                for batch in loader:
                    batch = trainer.strategy.batch_to_device(batch)
                    if self.bn_input is not None:
                        batch = self.bn_input(batch)
                    elif isinstance(batch, (list, tuple)):
                        batch = batch[0]
                    yield [trainer.precision_plugin.convert_input(batch)]

        with trainer.precision_plugin.forward_context():
            self._bound().update_bn(inputs(), pl_module)
