"""The NoLoCo and DiLoCo callbacks: ``weightavg.methods.noloco``'s outer steps under ``local_ddp``."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ParallelStrategy
from typing_extensions import override

from weightavg.callbacks.host import AveragingCallback, HostOptions, OptimizerSteps, ValidateWith, log_to_loggers
from weightavg.callbacks.strategy import NAME as LOCAL_DDP
from weightavg.callbacks.strategy import LocalDDPStrategy
from weightavg.core.checks import check_bool
from weightavg.core.rule import Snapshot
from weightavg.core.settings import DtypeOption, Settings, describe_arguments, renamed_arguments, setting_values
from weightavg.methods.noloco import DiLoCoRule, DiLoCoSettings, NoLoCoRule, NoLoCoSettings, Replica, average_replicas


@dataclass(eq=False, repr=False)
class OuterOptions(Settings):
    """What NoLoCo's and DiLoCo's callbacks do besides the outer step."""

    _: KW_ONLY
    apply_at_end: bool = False
    """When fit ends, replace every replica by the mean over ranks (one all-reduce), so all ranks end with one model
    (else each keeps its own)."""
    log_traffic: bool = True
    """Log ``bytes_sent``, ``operations``, ``wait_seconds`` and ``syncs`` under ``weightavg/<name>/`` each epoch (this
    rank's own counters; rank 0's reach the loggers)."""

    def __post_init__(self) -> None:
        check_bool("apply_at_end", self.apply_at_end)
        check_bool("log_traffic", self.log_traffic)
        super().__post_init__()


class _OuterStep(AveragingCallback):
    """NoLoCo and DiLoCo in a Lightning run: slow weights (the engine's average, fp32 for low-precision weights, one
    flat buffer per dtype group) and an outer step every ``sync_every`` optimizer steps. Needs
    ``Trainer(strategy="local_ddp")`` with several processes (any strategy that all-reduces gradients is refused).
    Checkpoints carry each rank's own slow weights, momentum and counters (the strategy writes one file per rank).
    The slow weights are never put into the model at the end of fit; ``apply_at_end`` puts the mean of the replicas
    there, from what the model holds then (a finisher, as WiSE-FT: after an averager that applies its average).
    """

    _finisher = True
    dtype: torch.dtype | str | None
    log_traffic: bool

    def _engine_options(self) -> dict[str, Any]:
        # The outer step reads whole groups: every parameter, no buffers, one flat buffer per group.
        return {"buffers": "ignore", "contiguous": True, "dtype": self.dtype}

    def _start_outer(self, rule: NoLoCoRule | DiLoCoRule, settings: type) -> None:
        self.name = self.name or rule.method_name
        self._start_hosting(Snapshot(), settings)
        self.outer_rule = rule
        self.replica: Replica | None = None

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

    def _replica(self) -> Replica:
        if self.replica is None:
            raise RuntimeError(f"{self.name} is not bound to a model yet (it binds when fit starts)")
        return self.replica

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Only the step guard: the slow weights change in outer steps, never at epoch ends or by the averager's rule.
        OptimizerSteps.on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self._replica().inner_step()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_traffic:  # this rank's own counters (rank 0's reach the loggers): not reduced over ranks
            traffic = self._replica().traffic.as_dict()
            log_to_loggers(trainer, {self.metric_prefix + k: float(v) for k, v in traffic.items()})

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.apply_at_end:
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


@renamed_arguments(average_at_end="apply_at_end")
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


@renamed_arguments(average_at_end="apply_at_end")
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


describe_arguments(NoLoCo, DiLoCo)
