"""EMA: the exponential moving average of the weights over optimizer steps (the whole rule; the engine does the rest).

avg <- decay_t * avg + (1 - decay_t) * live        after optimizer step t  (== lerp(avg, live, 1 - decay_t))

``EMASettings`` declares the settings once; the rule ``EMA`` and every face (``weightavg.callbacks.EMA``,
``weightavg.optim.EMA``, the Hydra config ``averaging=ema``) inherit them.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

from weightavg.core.checks import check_bool, check_choice, check_number
from weightavg.core.rule import Clock, Event, NotACallback, canonical_eq, canonical_hash, compact_repr
from weightavg.core.schedules import WARMUPS, Warmup, decay_from_half_life, warmed_decay
from weightavg.core.settings import Frozen, Settings, describe_arguments


@dataclass(eq=False, repr=False)
class EMASettings(Settings):
    """The settings of an exponential moving average (checked when built)."""

    decay: float | None = None
    """The decay per optimizer step, in [0, 1); 0.999 when neither ``decay`` nor ``half_life`` is given."""
    _: KW_ONLY
    half_life: float | None = None
    """The decay as a half-life in optimizer steps, ``decay = 0.5 ** (1 / half_life)`` (instead of ``decay``)."""
    warmup: Warmup = "power"
    """``"power"``: ``min(decay, 1 - (1 + t / gamma) ** -power)`` (timm, ema-pytorch); ``"tf"``:
    ``min(decay, (1 + t) / (10 + t))``; ``"none"``: the decay from the first step. ``t`` counts optimizer steps since
    ``start_step``."""
    gamma: float = 1.0
    """The power warmup's step scale (timm's ``inv_gamma``); > 0."""
    power: float = 2 / 3
    """The power warmup's exponent (> 0): 2/3 for long runs (~0.999 after ~31k steps), 3/4 for short ones."""
    every_n_steps: int = 1
    """Optimizer steps between updates, counted from the last update (the start copy included)."""
    start_step: int = 0
    """Optimizer steps before averaging starts (the average is then a copy of the live weights)."""
    scale_decay: bool = True
    """Raise the decay to the number of steps since the last update, so ``every_n_steps`` keeps the time constant."""

    def __post_init__(self) -> None:
        if self.decay is not None and self.half_life is not None:
            raise ValueError(f"decay={self.decay!r} and half_life={self.half_life!r} both set the decay; give only one")
        if self.decay is not None:
            check_number("decay", self.decay, low=0.0, high=1.0, high_open=True)
        if self.half_life is not None:
            check_number("half_life", self.half_life, low=0.0, low_open=True)
        check_choice("warmup", self.warmup, WARMUPS)
        check_number("gamma", self.gamma, low=0.0, low_open=True)
        check_number("power", self.power, low=0.0, low_open=True)
        check_number("every_n_steps", self.every_n_steps, low=1, integer=True)
        check_number("start_step", self.start_step, low=0, integer=True)
        check_bool("scale_decay", self.scale_decay)
        super().__post_init__()


@dataclass(eq=False, repr=False)
class EMA(EMASettings, Frozen, NotACallback):
    """Exponential moving average of the weights.

    The average becomes a copy of the live weights once ``start_step`` optimizer steps are done (at binding when
    ``start_step`` is 0); after that, once ``every_n_steps`` optimizer steps have passed since the last update, it
    applies ``avg <- lerp(avg, live, 1 - d)`` with

    - ``d = decay_t ** k`` when ``scale_decay`` (default), ``k`` the steps since the last update (``every_n_steps``,
      or more if the step counter jumped): skipping steps keeps the time constant, so ``every_n_steps=4`` averages
      over the same span of training as ``every_n_steps=1``;
    - ``decay_t = decay`` (``warmup="none"``), ``min(decay, 1 - (1 + t / gamma) ** -power)`` (``"power"``, timm and
      ema-pytorch), or ``min(decay, (1 + t) / (10 + t))`` (``"tf"``), where ``t`` counts steps since ``start_step``.

    The settings are ``EMASettings``'s (Args below).

    Raises:
        ValueError: on a decay outside [0, 1), a non-positive half-life, ``every_n_steps < 1``, a negative start, an
            unknown warmup, or both ``decay`` and ``half_life``.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._freeze()

    @property
    def base_decay(self) -> float:
        """The decay per optimizer step before any warmup."""
        if self.half_life is not None:
            return decay_from_half_life(self.half_life)
        return 0.999 if self.decay is None else self.decay

    def weight(self, event: Event, clock: Clock, num_updates: int) -> float | None:
        if event == "epoch" or clock.step < self.start_step:
            return None
        if num_updates == 0:
            return 1.0
        elapsed = clock.step - (clock.last_update_step or 0)
        if event == "bind" or elapsed < self.every_n_steps:
            return None
        return 1.0 - self.decay_at(clock.step) ** (elapsed if self.scale_decay else 1)

    def decay_at(self, step: int) -> float:
        """The per-step decay at optimizer step ``step``, warmup included (before any ``every_n_steps`` scaling)."""
        return warmed_decay(self.base_decay, step - self.start_step, self.warmup, self.gamma, self.power)

    def __repr__(self) -> str:
        # The decay however it was given (default, decay= or half_life=): ``EMA()`` reads ``EMA(decay=0.999)``.
        return compact_repr(self, decay=float(self.base_decay), half_life=None)

    __eq__ = canonical_eq
    __hash__ = canonical_hash

    def validate_clock(self, clock: Clock) -> None:
        return None


describe_arguments(EMA)
