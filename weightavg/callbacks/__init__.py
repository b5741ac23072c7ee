"""Lightning face: one callback per method (``weightavg.callbacks.EMA(...)``, ``SWA``, ``WiSEFT``, ``ZSCL``,
``LCSC``, ``EWA``, ``NoLoCo``, ``DiLoCo``), each in its own module of this package and short: a method's settings
(``weightavg.methods``) hosted by ``AveragingCallback`` (``weightavg.callbacks.host``, where the Trainer details and
the roles of several averagers in one run are explained). The Lightning evaluation helpers they share are in
``weightavg.callbacks.evaluation``; the ``local_ddp`` strategy NoLoCo and DiLoCo train under is
``weightavg.callbacks.strategy`` (its name registered with Lightning when this package is imported). The averaging
math lives in ``weightavg.methods``.
"""

from weightavg.callbacks.ema import EMA
from weightavg.callbacks.evaluation import BatchNormOptions, FitnessOptions
from weightavg.callbacks.ewa import EWA
from weightavg.callbacks.host import (
    LIVE_KEY,
    MARKER_KEY,
    AveragingCallback,
    CallbackOptions,
    CheckpointWeights,
    HostOptions,
    OutputOptions,
    ValidateWith,
)
from weightavg.callbacks.lcsc import LCSC
from weightavg.callbacks.noloco import DiLoCo, NoLoCo, OuterOptions
from weightavg.callbacks.swa import SWA
from weightavg.callbacks.wiseft import WiSEFT
from weightavg.callbacks.zscl import ZSCL

__all__ = [
    "EMA",
    "EWA",
    "LCSC",
    "LIVE_KEY",
    "MARKER_KEY",
    "SWA",
    "ZSCL",
    "AveragingCallback",
    "BatchNormOptions",
    "CallbackOptions",
    "CheckpointWeights",
    "DiLoCo",
    "FitnessOptions",
    "HostOptions",
    "NoLoCo",
    "OuterOptions",
    "OutputOptions",
    "ValidateWith",
    "WiSEFT",
]
