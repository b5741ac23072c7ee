"""The SWA wrapper: ``weightavg.methods.swa``'s settings around an inner optimizer."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

from weightavg.core.schedules import Unit
from weightavg.core.settings import EngineOptions, describe_arguments, setting_values
from weightavg.methods.swa import SWA as SWARule
from weightavg.methods.swa import SWASettings
from weightavg.optim.base import AveragingOptimizer, WrapperOptions


@dataclass(eq=False, repr=False)
class SWA(EngineOptions, SWASettings, WrapperOptions, AveragingOptimizer):  # signature: last base's fields first
    """``optimizer`` plus a stochastic weight average of its parameters (``weightavg.methods.SWA``).

    ``SWA(opt)`` averages from the first step on, as ``torch.optim.swa_utils.AveragedModel`` does when updated after
    every step: ``start`` defaults to 0 (a fraction of 0 needs no ``total_steps``). Give a later start as a fraction
    of ``total_steps`` (pass ``total_steps=``), or in steps/epochs with ``start_unit``. The Lightning callback's
    default is 0.75 of the run (the paper's last quarter) because a Trainer knows the run's length; a plain loop's
    wrapper does not. In a plain loop the natural unit is the step, so ``every_unit`` defaults to ``"step"`` here
    (the Lightning callback samples per epoch by default): ``SWA(opt, start=1000, start_unit="step", every=100)``.
    With ``every_unit="epoch"``, call ``opt.epoch_end()`` at the end of each epoch. Pair with
    ``torch.optim.swa_utils.SWALR`` on the inner optimizer for the SWA learning rate; the wrapper never changes it.

    Its arguments: ``WrapperOptions``, the method's ``SWASettings`` (with this face's defaults below) and
    ``EngineOptions`` (Args below).
    """

    start: float = 0.0  # this face's defaults (see above); the settings' docstrings hold
    _: KW_ONLY
    every_unit: Unit = "step"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._start_wrapping(SWARule(**setting_values(self, SWASettings)))


describe_arguments(SWA)
