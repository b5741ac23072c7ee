"""The EMA callback: ``weightavg.methods.ema``'s settings hosted by ``AveragingCallback``."""

from __future__ import annotations

from dataclasses import dataclass

from weightavg.callbacks.host import AveragingCallback, CallbackOptions
from weightavg.core.settings import EngineOptions, describe_arguments, setting_values
from weightavg.methods.ema import EMA as EMARule
from weightavg.methods.ema import EMASettings


@dataclass(eq=False, repr=False)
class EMA(EngineOptions, CallbackOptions, EMASettings, AveragingCallback):  # signature: last base's fields first
    """Exponential moving average of the weights (``weightavg.methods.EMA``) as a Lightning callback.

    Its arguments: the method's ``EMASettings``, then ``CallbackOptions`` and ``EngineOptions`` (Args below)
    (``inspect.signature`` and IDEs list them all).

    Example:
        >>> trainer = pl.Trainer(callbacks=[EMA(decay=0.999), EMA(decay=0.9999), SWA(start=0.75)])  # doctest: +SKIP
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._start_hosting(EMARule(**setting_values(self, EMASettings)), EMASettings)


describe_arguments(EMA)
