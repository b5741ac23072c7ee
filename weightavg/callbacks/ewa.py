"""The EWA callback: ``weightavg.methods.ewa``'s mixtures, shared after each step and merged at the end."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from weightavg.callbacks.host import AveragingCallback, OptimizerSteps, OutputOptions
from weightavg.core.checks import check_bool, check_number
from weightavg.core.io import save_safetensors
from weightavg.core.settings import describe_arguments, renamed_arguments
from weightavg.methods.ewa import ConversionSettings, ShareSettings, share_all, to_dense
from weightavg.methods.ewa import mixtures as ewa_mixtures


@renamed_arguments(merge_at_end="apply_at_end")
@dataclass(eq=False, repr=False)
class EWA(OutputOptions, ConversionSettings, ShareSettings, OptimizerSteps):  # signature: last base's fields first
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
    apply_at_end: bool = True
    """Merge the mixtures into dense FFNs when fit ends (else the model keeps its mixtures)."""
    log_spread: bool = True
    """Log ``ewa/spread`` (the largest RMS distance of a layer's experts from their mean) and ``ewa/beta`` at the end
    of each training epoch (one host sync per mixture per epoch)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("beta", self.beta, low=0.0, high=(self.num_experts - 1) / self.num_experts)
        check_bool("apply_at_end", self.apply_at_end)
        check_bool("log_spread", self.log_spread)
        if self.export_path is not None and not self.apply_at_end:
            raise ValueError(
                f"export_path={self.export_path!r} needs apply_at_end=True: the export is the merged model"
            )
        self.name = self.name or "EWA"
        self.converted: list[str] = []

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
        if later and self.apply_at_end:
            raise ValueError(
                f"{later[0].name} comes after {self.name} in Trainer(callbacks=...): {self.name} merges the mixtures "
                f"when fit ends, so {later[0].name} would put its average into tensors that are no longer in the "
                f"model. Put {self.name} last (then it merges what {later[0].name} leaves in the model)"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.check_mixtures(pl_module, f"{self.name} (select matched nothing, or the model was merged)")

    def current_beta(self, step: int) -> float:
        """The share rate after optimizer step ``step``."""
        return self.beta_at(step)

    @override
    def on_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        share_all(pl_module, self.current_beta(step))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = ewa_mixtures(pl_module)
        if self.log_spread and layers:
            pl_module.log("ewa/spread", max(layer.spread() for layer in layers))
            pl_module.log("ewa/beta", self.current_beta(trainer.global_step))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.apply_at_end:
            return
        merged = to_dense(pl_module)
        rank_zero_info(f"weightavg: {self.name} merged {merged} mixtures into dense FFNs")
        if self.export_path is not None and trainer.is_global_zero:
            save_safetensors(pl_module.state_dict(), self.export_path)


describe_arguments(EWA)
