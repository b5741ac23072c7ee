"""The framework-free engine: binding, batched kernels, swaps, state and safetensors io. Imports torch only."""

from weightavg.core.averager import Averager
from weightavg.core.binding import BufferPolicy, Entry
from weightavg.core.io import load_into_module
from weightavg.core.rule import Clock, Rule, Snapshot

__all__ = ["Averager", "BufferPolicy", "Clock", "Entry", "Rule", "Snapshot", "load_into_module"]
