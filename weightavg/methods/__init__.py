"""Averaging rules, one file each: the method's math and schedule, nothing about tensors or frameworks."""

from weightavg.methods.ema import EMA
from weightavg.methods.swa import SWA
from weightavg.methods.zscl import ZSCL

__all__ = ["EMA", "SWA", "ZSCL"]
