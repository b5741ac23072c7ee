"""SWA (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better Generalization"): the equal-weight
running average of the weights sampled after a start point.

    n <- n + 1;  avg <- avg + (live - avg) / n        at each sample (the first sample copies)

``SWASettings`` declares the settings once; the rule ``SWA`` and every face inherit them (the faces choose their own
defaults for ``start`` and ``every_unit``: a Trainer knows the run's length, a plain loop does not). An average of
weights is not an average of their BatchNorm statistics: ``update_bn`` recomputes them with one pass over the data
(``torch.optim.swa_utils.update_bn`` with the average swapped in), for SWA and LCSC's combinations alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch
from torch import nn

from weightavg.core.averager import Averager
from weightavg.core.checks import check_choice, check_number
from weightavg.core.rule import Clock, Event, NotACallback, canonical_eq, canonical_hash, compact_repr
from weightavg.core.schedules import START_UNITS, UNITS, StartUnit, Unit, reached
from weightavg.core.settings import Frozen, Settings, describe_arguments


def has_batchnorm_to_recompute(averager: Averager, module: nn.Module) -> bool:
    """Whether ``module`` has BatchNorm statistics to recompute; raise if they are not all in ``averager``.

    Raises:
        ValueError: when a running mean or variance is not followed (``buffers="ignore"``, an ``exclude``, or a
            module that is not the bound one): recomputing would overwrite the live statistics.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    stats = [t for m in norms for t in (m.running_mean, m.running_var) if t is not None]
    if not averager.follows(stats):
        raise ValueError(
            "recomputing BatchNorm statistics needs them in the average (buffers='average' or 'copy', running "
            "mean and variance not excluded, and the module the averager is bound to; the optimizer wrapper "
            "needs module=)"
        )
    return bool(stats)


def update_bn(averager: Averager, inputs: Iterable[Any], module: nn.Module, device: torch.device | None = None) -> None:
    """Recompute the BatchNorm statistics of ``averager``'s average with one pass over ``inputs`` and keep them in
    the average (``torch.optim.swa_utils.update_bn`` run with the average swapped in). A model without BatchNorm is
    left alone. ``inputs`` yields batches (``batch[0]`` is fed when a batch is a list or tuple)."""
    if not has_batchnorm_to_recompute(averager, module):
        return
    with averager.averaged():
        torch.optim.swa_utils.update_bn(inputs, module, device)
        averager.commit_swapped_buffers()


@dataclass(eq=False, repr=False)
class SWASettings(Settings):
    """The settings of a stochastic weight average (checked when built)."""

    start: float = 0.75
    """Where sampling starts: a fraction of the run's optimizer steps in [0, 1] (``start_unit="fraction"``, needs the
    run's total steps), or a number of optimizer steps or epochs done."""
    _: KW_ONLY
    start_unit: StartUnit = "fraction"
    """The unit of ``start``: ``"fraction"``, ``"step"`` or ``"epoch"``."""
    every: int = 1
    """Sample every n-th step or epoch."""
    every_unit: Unit = "epoch"
    """When samples are taken: ``"epoch"`` (the paper: once per epoch, or per LR cycle) or ``"step"``."""

    def __post_init__(self) -> None:
        check_choice("start_unit", self.start_unit, START_UNITS)
        if self.start_unit == "fraction":
            check_number("start", self.start, low=0.0, high=1.0)
        else:
            # Configs write numbers as floats: a whole 2.0 is the step/epoch 2, a 2.5 is refused.
            if isinstance(self.start, float) and self.start.is_integer():
                object.__setattr__(self, "start", int(self.start))
            check_number("start", self.start, low=0, integer=True)
        check_number("every", self.every, low=1, integer=True)
        check_choice("every_unit", self.every_unit, UNITS)
        super().__post_init__()


@dataclass(eq=False, repr=False)
class SWA(SWASettings, Frozen, NotACallback):
    """Stochastic weight averaging: an equal-weight average of weight samples.

    Samples are taken at events of ``every_unit`` (after an optimizer step, or at an epoch's end): the first at the
    first event once the start point is reached (it copies the live weights), then each time ``every`` steps or
    epochs have passed since the last sample. The settings are ``SWASettings``'s (Args below).

    Pair SWA with a constant or cyclic learning rate in the averaging phase (``torch.optim.swa_utils.SWALR``); SWA
    never touches the optimizer or its scheduler. Recompute BatchNorm statistics of the average at the end.

    Raises:
        ValueError: on a negative start, a fraction above 1, an unknown unit, or ``every < 1``.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._freeze()

    def weight(self, event: Event, clock: Clock, num_updates: int) -> float | None:
        if event != self.every_unit or not reached(self.start, self.start_unit, clock):
            return None
        if num_updates == 0:
            return 1.0
        if event == "step":
            count, last = clock.step, clock.last_update_step
        else:
            count, last = clock.epoch, clock.last_update_epoch
        if count - (last or 0) < self.every:
            return None
        return 1.0 / (num_updates + 1)

    def __repr__(self) -> str:
        # A fraction is a float (``start=1`` reads ``start=1.0``); steps and epochs are ints.
        return compact_repr(self, start=float(self.start) if self.start_unit == "fraction" else self.start)

    __eq__ = canonical_eq
    __hash__ = canonical_hash

    def validate_clock(self, clock: Clock) -> None:
        reached(self.start, self.start_unit, clock)


describe_arguments(SWA)
