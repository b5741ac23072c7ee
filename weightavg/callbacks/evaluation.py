"""Lightning evaluation helpers shared by the callbacks that score candidates (WiSE-FT's alphas, LCSC's
combinations) or recompute BatchNorm statistics (SWA, LCSC): validation runs, metric passes, figures, and the option
groups that configure them (``FitnessOptions``, ``BatchNormOptions``)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass
from itertools import islice
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping

from weightavg.core.averager import Averager
from weightavg.core.call import Forward, eval_mode
from weightavg.core.checks import check_bool, check_callable, check_choice, check_number, outside_stacklevel
from weightavg.core.settings import Settings
from weightavg.methods.swa import has_batchnorm_to_recompute, update_bn


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


def check_fitness(monitor: Any, metric: Any) -> None:
    """Refuse at construction a fitness given twice, or a ``monitor`` that cannot name a logged metric (whether it
    is logged is checked at fit's first validation: ``AveragingCallback._check_monitor_logged``)."""
    if monitor is not None and metric is not None:
        raise ValueError("give monitor= (a metric validation_step logs) or metric= (computed here), not both")
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise ValueError(f"monitor={monitor!r} must be the name of a logged validation metric, e.g. 'val_acc'")


@dataclass(eq=False, repr=False)
class FitnessOptions(Settings):
    """How a callback that chooses among candidates (WiSE-FT's alphas, LCSC's combinations) scores each one on the
    validation data when fit ends."""

    _: KW_ONLY
    monitor: str | None = None
    """A metric the module logs in ``validation_step`` (e.g. ``"val_acc"``): Lightning's validation loop runs once
    per candidate. Other weightavg callbacks stay out of these runs; loggers receive only this callback's metrics. A
    ``monitor`` that ``validation_step`` does not log is refused at fit's first validation."""
    mode: Literal["max", "min"] = "max"
    """Whether the best candidate has the largest (``"max"``) or the smallest value of the fitness."""
    metric: Any = None
    """Instead of ``monitor``: a ``torchmetrics.Metric`` (cloned per dataloader) or a function
    ``metric(outputs, targets) -> number`` (averaged over examples), computed by this callback's own pass over the
    validation data: ``outputs = forward(module, batch[0])``, targets ``batch[1]``."""
    forward: Forward | None = None
    """``forward(module, inputs) -> outputs`` for ``metric``; default ``module(inputs)``."""
    progress: bool = True
    """Show a progress bar over the evaluations when the Trainer shows its own progress bar (not with
    ``enable_progress_bar=False``) and stderr is a terminal."""

    def __post_init__(self) -> None:
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise TypeError(f"monitor={self.monitor!r} must be the name of a metric validation_step logs, or None")
        check_choice("mode", self.mode, ("max", "min"))
        check_fitness(self.monitor, self.metric)
        if self.metric is not None and not callable(self.metric):
            raise TypeError(f"metric={self.metric!r} must be a torchmetrics.Metric or a function (outputs, targets)")
        check_callable("forward", self.forward)
        check_bool("progress", self.progress)
        if self.forward is not None and self.metric is None:
            warnings.warn(
                f"{type(self).__name__}: forward= is ignored without metric= (it computes the outputs that metric "
                "scores; with monitor= the module's own validation_step runs)",
                UserWarning,
                stacklevel=outside_stacklevel(),
            )
        super().__post_init__()

    @property
    def scores(self) -> bool:
        """Whether candidates are scored (``monitor`` or ``metric`` given)."""
        return self.monitor is not None or self.metric is not None


@dataclass(eq=False, repr=False)
class BatchNormOptions(Settings):
    """A pass over the training data that recomputes the BatchNorm statistics of the result at the end of fit (SWA's
    average, LCSC's chosen combination), before it is exported and applied; a no-op for models without BatchNorm."""

    _: KW_ONLY
    recompute_bn: bool = True
    """Recompute BatchNorm statistics of the result at the end of fit (models with BatchNorm only); checked when fit
    starts: the statistics must be in the average (not ``buffers="ignore"``/excluded)."""
    bn_input: Callable[[Any], Any] | None = None
    """Maps a training batch to the model's input for that pass; default ``batch[0]`` for list/tuple batches and the
    batch itself otherwise."""
    bn_batches: int | None = None
    """Batches for that pass; default one epoch of the training data (required when its length is unknown, e.g. an
    infinite iterable dataset). Several train loaders (a list or dict) are read in turn."""

    def __post_init__(self) -> None:
        if self.bn_batches is not None:
            check_number("bn_batches", self.bn_batches, low=1, integer=True)
        check_bool("recompute_bn", self.recompute_bn)
        check_callable("bn_input", self.bn_input)
        super().__post_init__()


def check_batchnorm_pass(
    trainer: pl.Trainer, pl_module: pl.LightningModule, averager: Averager, bn_batches: int | None, who: str
) -> None:
    """Refuse at fit start a BatchNorm recomputation (``recompute_batchnorm``) that could only fail after training:
    statistics not in the average, a LightningModule without ``forward`` (the pass calls the module, as
    ``torch.optim.swa_utils.update_bn`` does), or training data without a length and no ``bn_batches``. A model
    without BatchNorm passes (nothing is recomputed)."""
    if not has_batchnorm_to_recompute(averager, pl_module):
        return
    if getattr(pl_module.forward, "__func__", None) is pl.LightningModule.forward:  # not overridden
        raise ValueError(
            f"{who} recomputes BatchNorm statistics by calling the model on training batches, but "
            f"{type(pl_module).__name__} defines no forward(): define forward(), or pass recompute_bn=False"
        )
    if bn_batches is None and not math.isfinite(trainer.num_training_batches):
        # A run bounded by max_steps alone has not loaded its training data yet (Lightning does it after
        # on_fit_start): load it now to know its length, as Lightning's own estimate of the run's steps does.
        trainer.fit_loop.setup_data()
    if bn_batches is None and not math.isfinite(trainer.num_training_batches):
        raise ValueError(f"{who} needs bn_batches=... when the training data has no length (or recompute_bn=False)")


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
        update_bn(averager, inputs(), pl_module)
