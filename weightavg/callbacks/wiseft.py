"""The WiSE-FT callback: a sweep over ``weightavg.methods.wiseft``'s interpolations when fit ends."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from weightavg.callbacks.evaluation import (
    FitnessOptions,
    _require_matplotlib,
    draw_curves,
    logged_validation,
    metric_on_loaders,
)
from weightavg.callbacks.host import OutputOptions, _Finisher, log_to_loggers, trainer_shows_progress
from weightavg.core.checks import check_bool, check_output_file, outside_stacklevel
from weightavg.core.progress import progress_bar
from weightavg.core.rule import Snapshot
from weightavg.core.settings import TensorOptions, describe_arguments
from weightavg.methods.wiseft import ALPHAS, WiSEFTSettings, blend, blend_alpha, choose_alpha


@dataclass(eq=False, repr=False)
class WiSEFT(TensorOptions, OutputOptions, FitnessOptions, WiSEFTSettings, _Finisher):  # last base's fields first
    """WiSE-FT (``weightavg.methods.wiseft``): when fit ends, evaluate ``(1 - alpha) * theta_0 + alpha * theta_1``
    for every ``alpha`` on the validation dataloaders, pick one, and leave the model there.

    theta_0 (the zero-shot anchor) is the model's weights when fit starts, or ``anchor=``; it is kept on the model's
    device (``device="cpu"`` keeps it in host memory) and in checkpoints, so a resumed fine-tuning run interpolates
    toward the same anchor. theta_1 is the model at the end of fit: put this callback after an averager with
    ``apply_at_end=True`` to interpolate toward that average instead of the live weights. Without ``monitor`` or
    ``metric`` nothing is evaluated: the interpolation is ``alpha`` (default 0.5, the paper's choice without tuning),
    and another grid or ``select_on`` is refused.

    Its arguments: the method's ``WiSEFTSettings``, the ``FitnessOptions`` that score each alpha, this callback's own
    below, ``OutputOptions`` and ``TensorOptions`` (``buffers="copy"`` takes floating buffers from theta_1 like
    integer ones; excluded tensors stay at theta_1) (Args below).

    After fit, ``curves`` maps each dataloader name to ``{alpha: value}`` and ``alpha`` holds the choice (the given
    ``alpha`` stays in ``fixed_alpha``).
    """

    _: KW_ONLY
    select_on: int | str = 0
    """The validation dataloader (index, or a name from ``dataloader_names``) whose metric picks alpha (with
    ``monitor``/``metric`` only)."""
    dataloader_names: Sequence[str] | None = None
    """Names of the validation dataloaders, in order (default ``dataloader_0``, ...)."""
    apply_at_end: bool = True
    """Leave the model at the chosen alpha; else the sweep only reports and the model ends at theta_1."""
    figure_path: str | os.PathLike[str] | None = None
    """Draw metric vs alpha per dataloader, with the straight line between the endpoints, as an image (needs
    matplotlib)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("apply_at_end", self.apply_at_end)
        select_on, names = self.select_on, self.dataloader_names
        if isinstance(select_on, bool) or not isinstance(select_on, (int, str)):
            raise TypeError(f"select_on={select_on!r} must be a dataloader index (int) or name (str)")
        if isinstance(select_on, int) and select_on < 0:
            raise ValueError(f"select_on={select_on} must be a dataloader index >= 0 or a name")
        if names is not None:
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise TypeError(f"dataloader_names={names!r} must be a list of names, one per dataloader")
            if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
                raise ValueError(f"dataloader_names={names!r} must be distinct non-empty strings")
            self.dataloader_names = list(names)
        if isinstance(select_on, str) and (names is None or select_on not in names):
            raise ValueError(f"select_on={select_on!r} is not one of dataloader_names={names!r}")
        if not self.scores:
            self._check_without_sweep()
        if self.figure_path is not None:
            if not self.scores:
                raise ValueError("figure_path= draws the sweep, which needs monitor= or metric=")
            _require_matplotlib("figure_path")
            check_output_file("figure_path", self.figure_path)
        self.fixed_alpha = self.alpha if self.scores or self.alpha is not None else 0.5
        self.alpha = self.fixed_alpha  # the interpolation in effect: given, or chosen when fit ends
        self.name = self.name or "WiSEFT"
        self.curves: dict[str, dict[float, float]] = {}
        self._logged: dict[float, dict[str, Any]] = {}
        self._start_hosting(Snapshot())
        self._read_settings(WiSEFTSettings, except_=("alpha",))  # alpha: the interpolation in effect, kept here

    def _check_without_sweep(self) -> None:
        """Refuse sweep arguments that a run without ``monitor``/``metric`` would ignore where they change which
        alpha the user expects (``alphas``, ``select_on``); warn where the run is the same without them."""
        if self.alphas != ALPHAS:
            raise ValueError(
                f"alphas={list(self.alphas)!r} is a grid to sweep, which needs monitor= (a metric validation_step "
                "logs) or metric=; without them no alpha is evaluated: give alpha= for a fixed interpolation"
            )
        if self.select_on != 0:
            raise ValueError(
                f"select_on={self.select_on!r} picks the dataloader whose metric chooses alpha, which needs monitor= "
                "or metric=; without them alpha is fixed (alpha=, default 0.5)"
            )
        if self.dataloader_names is not None:
            warnings.warn(
                f"WiSEFT: dataloader_names={self.dataloader_names!r} is ignored without monitor= or metric= (no sweep "
                "runs; alpha is fixed)",
                UserWarning,
                stacklevel=outside_stacklevel(),
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restoring = "averaging" in self._pending
        super().on_fit_start(trainer, pl_module)
        self.alpha = self.fixed_alpha  # a new fit chooses afresh
        if not restoring and self.anchor is not None:
            self._bound().load_weights(self.anchor, argument="anchor")

    @override
    def check_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse at fit start a sweep that could only fail after training: no validation data, names or
        ``select_on`` that do not fit the dataloaders."""
        if not self.scores:
            return
        count = len(self._validation_loaders(trainer))
        if count == 0:
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
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fitting = False
        averager = self._bound()
        averager.refresh()
        if self.scores:
            try:
                self.curves = self._run_suspending_peers(lambda: self._sweep(trainer, pl_module))
            finally:
                if blend_alpha(averager) is not None:
                    averager.swap()
        self.alpha = self._choose()
        if self.alpha in self._logged:  # what the module logged for the chosen alpha, not for the last one swept
            trainer.callback_metrics.update(self._logged[self.alpha])
        self._logged = {}
        self._log(trainer)
        blend(averager, self.alpha)
        if self.export_path is not None and trainer.is_global_zero:
            averager.save_model(self.export_path)
        if self.figure_path is not None and trainer.is_global_zero and self.curves:
            draw_curves(self.curves, self.figure_path, chosen=self.alpha, ylabel=self.monitor or "metric")
        if self.apply_at_end:
            self._applied = True  # by pointer: the live weights stay in the averager for later checkpoints
        else:
            averager.swap()

    # ------------------------------------------------------------------ the sweep
    def _sweep(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[float, float]]:
        averager = self._bound()
        loaders = self._validation_loaders(trainer)
        if not loaders:
            raise ValueError("WiSEFT evaluates alphas on the validation dataloaders, but this fit has none")
        names = self.dataloader_names or [f"dataloader_{i}" for i in range(len(loaders))]
        if len(names) != len(loaders):
            raise ValueError(f"dataloader_names={names!r} names {len(names)} dataloaders; the fit has {len(loaders)}")
        curves: dict[str, dict[float, float]] = {name: {} for name in names}
        self._logged = {}
        alphas = self.evaluated_alphas()
        enabled = trainer_shows_progress(trainer, self.progress)
        bar = progress_bar(len(alphas), "WiSE-FT sweep", enabled=enabled, unit="alpha")
        try:
            for alpha in alphas:
                blend(averager, alpha)
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

    def _choose(self) -> float:
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


describe_arguments(WiSEFT)
