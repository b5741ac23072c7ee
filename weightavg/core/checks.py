"""Argument checks shared by every method and face: each error names the argument, its value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``value`` is a finite number in the given interval.

    Args:
        name: the argument's name as the user wrote it.
        value: what the user passed.
        low, high: bounds (``None`` for unbounded).
        low_open, high_open: exclude the bound itself.
        integer: require an ``int`` (``bool`` is refused).
    """
    kind = "an int" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(f"{name}={value!r} must be {kind}, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        interval = f"{opening}{left}, {right}{closing}"
        raise ValueError(f"{name}={value!r} is out of range: allowed {interval}")


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def check_device(device: Any) -> torch.device | None:
    """``None`` or a ``torch.device`` parsed from ``device``; ``ValueError`` naming it when torch cannot parse it."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(
            f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda:0', torch.device('npu', 0)): {error}"
        ) from None
