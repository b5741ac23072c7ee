"""The SWA callback: ``weightavg.methods.swa``'s settings, with a BatchNorm pass over the average at the end."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from weightavg.callbacks.evaluation import BatchNormOptions, check_batchnorm_pass, recompute_batchnorm
from weightavg.callbacks.host import AveragingCallback, CallbackOptions
from weightavg.core.settings import EngineOptions, describe_arguments, setting_values
from weightavg.methods.swa import SWA as SWARule
from weightavg.methods.swa import SWASettings


@dataclass(eq=False, repr=False)
class SWA(BatchNormOptions, EngineOptions, CallbackOptions, SWASettings, AveragingCallback):  # last base's first
    """Stochastic weight averaging (``weightavg.methods.SWA``) as a Lightning callback.

    The callback never touches the optimizer or LR scheduler: return ``torch.optim.swa_utils.SWALR`` (or any
    schedule) from ``configure_optimizers`` for the SWA phase. At the end of fit, BatchNorm statistics of the
    average are recomputed with one pass over the training data (``recompute_bn``) before export and apply.

    Its arguments: the method's ``SWASettings`` (``start`` defaults to 75% of the run, samples once per epoch),
    ``CallbackOptions``, ``EngineOptions``, then ``BatchNormOptions`` (Args below).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
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


describe_arguments(SWA)
