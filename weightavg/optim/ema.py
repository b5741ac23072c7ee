"""The EMA wrapper: ``weightavg.methods.ema``'s settings around an inner optimizer."""

from __future__ import annotations

from dataclasses import dataclass

from weightavg.core.settings import EngineOptions, describe_arguments, setting_values
from weightavg.methods.ema import EMA as EMARule
from weightavg.methods.ema import EMASettings
from weightavg.optim.base import AveragingOptimizer, WrapperOptions


@dataclass(eq=False, repr=False)
class EMA(EngineOptions, EMASettings, WrapperOptions, AveragingOptimizer):  # signature: last base's fields first
    """``optimizer`` plus an exponential moving average of its parameters (``weightavg.methods.EMA``).

    Its arguments: ``WrapperOptions``, the method's ``EMASettings`` and ``EngineOptions`` (Args below).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> opt = EMA(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.99)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()
        >>> with opt.averaged():
        ...     _ = model(torch.randn(8, 4))
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._start_wrapping(EMARule(**setting_values(self, EMASettings)))


describe_arguments(EMA)
