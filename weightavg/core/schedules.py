"""Schedules shared by the methods: EMA decay warmups, half-lives, and start points in steps, epochs or fractions.

Pure functions of Python numbers; nothing here touches a tensor.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from weightavg.core.rule import Clock

Warmup = Literal["none", "power", "tf"]
WARMUPS: tuple[str, ...] = get_args(Warmup)
StartUnit = Literal["fraction", "step", "epoch"]
START_UNITS: tuple[str, ...] = get_args(StartUnit)
Unit = Literal["step", "epoch"]
UNITS: tuple[str, ...] = get_args(Unit)


def decay_from_half_life(half_life: float) -> float:
    """The per-step decay whose weight on a sample halves every ``half_life`` steps: ``0.5 ** (1 / half_life)``."""
    return float(0.5 ** (1.0 / half_life))


def warmed_decay(decay: float, t: int, warmup: Warmup, gamma: float = 1.0, power: float = 2 / 3) -> float:
    """Decay after ``t`` steps of averaging under a warmup.

    - ``"none"``: ``decay``.
    - ``"power"`` (timm, ema-pytorch): ``min(decay, 1 - (1 + t / gamma) ** -power)``.
    - ``"tf"`` (TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``): ``min(decay, (1 + t) / (10 + t))``.
    """
    if warmup == "power":
        return min(decay, 1.0 - float((1.0 + t / gamma) ** -power))
    if warmup == "tf":
        return min(decay, (1.0 + t) / (10.0 + t))
    return decay


def start_step_of_fraction(fraction: float, total_steps: int) -> int:
    """First optimizer step at or after ``fraction`` of ``total_steps``."""
    # Rounded first so that 0.55 * 100 == 55.000000000000007 still starts at step 55.
    return math.ceil(round(fraction * total_steps, 9))


def reached(start: float, unit: StartUnit, clock: Clock) -> bool:
    """Whether a start point given in ``unit`` has been reached at ``clock``."""
    if unit == "epoch":
        return clock.epoch >= start
    if unit == "step":
        return clock.step >= start
    if start == 0:
        return True  # 0 of any run is its first step: no total needed (optim.SWA(opt) averages from the start)
    if clock.total_steps is None:
        raise ValueError(
            f"start={start!r} with start_unit='fraction' needs the run's total optimizer steps: pass total_steps=... "
            "(the Lightning callbacks read it from the Trainer)"
        )
    return clock.step >= start_step_of_fraction(start, clock.total_steps)
