"""The ZSCL callback: ``weightavg.methods.zscl``'s weight ensemble per task and its distillation loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from typing_extensions import override

from weightavg.callbacks.host import AveragingCallback, CallbackOptions
from weightavg.core.settings import EngineOptions, describe_arguments, setting_values
from weightavg.methods.zscl import ZSCL as ZSCLRule
from weightavg.methods.zscl import DistillationSettings, EnsembleSettings


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


describe_arguments(ZSCL)
