"""Optimizer-wrapper face: averaging for plain training loops, without Lightning.

``weightavg.optim.EMA(optimizer, ...)`` is a ``torch.optim.Optimizer`` that shares the inner optimizer's
``param_groups`` and state, steps it, then updates the average. One wrapper per method, each in its own module of
this package and short: a method's settings (``weightavg.methods``) hosted by ``AveragingOptimizer``
(``weightavg.optim.base``). The averaging math lives in ``weightavg.methods``.
"""

from weightavg.optim.base import (
    AveragingOptimizer,
    InnerOptimizer,
    ModelOptions,
    WrapperHost,
    WrapperOptions,
    check_module,
)
from weightavg.optim.ema import EMA
from weightavg.optim.ewa import EWA, ConvertedModel
from weightavg.optim.lcsc import LCSC
from weightavg.optim.noloco import DiLoCo, NoLoCo, ReplicaOptions, check_process_group
from weightavg.optim.swa import SWA
from weightavg.optim.wiseft import WiSEFT
from weightavg.optim.zscl import ZSCL

__all__ = [
    "EMA",
    "EWA",
    "LCSC",
    "SWA",
    "ZSCL",
    "AveragingOptimizer",
    "ConvertedModel",
    "DiLoCo",
    "InnerOptimizer",
    "ModelOptions",
    "NoLoCo",
    "ReplicaOptions",
    "WiSEFT",
    "WrapperHost",
    "WrapperOptions",
    "check_module",
    "check_process_group",
]
