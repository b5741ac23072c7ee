"""The NoLoCo and DiLoCo wrappers: ``weightavg.methods.noloco``'s outer steps under ``torch.distributed``."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch

from weightavg.core.checks import check_bool
from weightavg.core.rule import Snapshot
from weightavg.core.settings import DtypeOption, Settings, describe_arguments, setting_values
from weightavg.methods.noloco import (
    DiLoCoRule,
    DiLoCoSettings,
    NoLoCoRule,
    NoLoCoSettings,
    Replica,
    Traffic,
    average_replicas,
)
from weightavg.optim.base import AveragingOptimizer, InnerOptimizer


def check_process_group(process_group: Any) -> None:
    """Raise ``TypeError`` unless ``process_group`` is ``None`` (the world) or a ``torch.distributed`` group: in one
    process nothing would use it, so a wrong value would pass unnoticed until a multi-process run."""
    import torch.distributed as dist

    if process_group is None:
        return
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(
            f"process_group={process_group!r} must be a torch.distributed process group (e.g. "
            f"torch.distributed.new_group(ranks)) or None for the world, got {type(process_group).__name__}"
        )


@dataclass(eq=False, repr=False)
class ReplicaOptions(Settings):
    """Which processes NoLoCo's and DiLoCo's wrappers average over, and how they start."""

    _: KW_ONLY
    process_group: Any = None
    """The ranks that average (default: the world)."""
    broadcast_start: bool = True
    """Start every replica from rank 0's weights (one broadcast when the wrapper is built)."""

    def __post_init__(self) -> None:
        check_process_group(self.process_group)
        check_bool("broadcast_start", self.broadcast_start)
        super().__post_init__()


class _OuterOptimizer(AveragingOptimizer):
    """NoLoCo and DiLoCo: the inner optimizer's steps, and every ``sync_every`` of them an outer step on slow weights
    that the engine holds (at least fp32, one flat buffer per dtype group; the model's tensors are re-homed into
    flat buffers too, so each group travels as one message)."""

    module = None  # the optimizer's parameters, named by position
    total_steps = None
    dtype: torch.dtype | str | None
    process_group: Any
    broadcast_start: bool

    def _engine_options(self) -> dict[str, Any]:
        return {"buffers": "average", "contiguous": True, "dtype": self.dtype}

    def _start_outer(self, rule: NoLoCoRule | DiLoCoRule) -> None:
        self._start_wrapping(Snapshot())
        self.replica = Replica(self.averager, rule, self.process_group)
        if self.broadcast_start:
            self.replica.broadcast_start()
        self._read_settings(rule)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.replica.rule!r}, {self.optimizer!r})"

    def on_step(self, step: int) -> None:
        """After an inner step: the outer step when it is due (every ``sync_every`` steps)."""
        super().on_step(step)  # counts the step (the slow weights' rule never updates them by itself)
        self.replica.inner_step()

    @property
    def traffic(self) -> Traffic:
        """Bytes sent, communication operations and seconds waited by this rank's outer steps so far."""
        return self.replica.traffic

    def slow_weights(self) -> AbstractContextManager[None]:
        """Evaluate with this replica's slow weights: ``with opt.slow_weights(): evaluate(model)``."""
        return self.averager.averaged()

    def average_replicas(self) -> None:
        """Average the model over every rank (one all-reduce; for the end of training, e.g. before export)."""
        average_replicas([t for live, _ in self.averager.tensor_groups() for t in live], self.replica.group)

    def extra_state(self) -> dict[str, Any]:
        return {"outer": self.replica.state_dict()}

    def check_extra_state(self, state: dict[str, Any]) -> None:
        self.replica.check_state(state["outer"])

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.replica.load_state_dict(state["outer"])


@dataclass(eq=False, repr=False)
class NoLoCo(DtypeOption, ReplicaOptions, NoLoCoSettings, InnerOptimizer, _OuterOptimizer):  # last base's fields first
    """NoLoCo (``weightavg.methods.noloco``): each replica trains alone and, every ``sync_every`` inner steps,
    averages with ``group_size - 1`` random peers by point-to-point messages through a momentum outer step. No
    all-reduce and no broadcast during training; run one process per replica (torchrun) with a process group whose
    backend has point-to-point ops (gloo, nccl), and do not wrap the model in DistributedDataParallel.

    Its arguments: ``InnerOptimizer``, the method's ``NoLoCoSettings``, ``ReplicaOptions`` and ``DtypeOption`` (the
    slow weights' and momentum's dtype; default fp32 for fp16/bf16 parameters, else theirs) (Args below).

    Example (under torchrun)::

        opt = NoLoCo(torch.optim.AdamW(model.parameters(), lr=1e-3), sync_every=50)
        for x, y in loader:                      # this rank's own shard
            loss_fn(model(x), y).backward()
            opt.step(); opt.zero_grad()
        print(opt.traffic)
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._start_outer(NoLoCoRule(**setting_values(self, NoLoCoSettings)))


@dataclass(eq=False, repr=False)
class DiLoCo(DtypeOption, ReplicaOptions, DiLoCoSettings, InnerOptimizer, _OuterOptimizer):  # last base's fields first
    """DiLoCo (``weightavg.methods.noloco``): each replica trains alone and, every ``sync_every`` inner steps, the
    replicas all-reduce the pseudo-gradient (slow minus fast weights) and apply outer SGD to the slow weights, with
    Nesterov momentum (as ``torch.optim.SGD(nesterov=True)``) or heavy-ball.

    Its arguments: ``InnerOptimizer``, the method's ``DiLoCoSettings``, then as for ``NoLoCo``.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._start_outer(DiLoCoRule(**setting_values(self, DiLoCoSettings)))


describe_arguments(NoLoCo, DiLoCo)
