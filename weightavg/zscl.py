"""ZSCL's standalone parts (``weightavg.methods.zscl``): the KD loss, the distillation helper and the continual
learning metrics. The faces are ``weightavg.callbacks.ZSCL`` and ``weightavg.optim.ZSCL``."""

from weightavg.methods.zscl import ContinualMetrics, Distillation, continual_metrics, kd_loss

__all__ = ["ContinualMetrics", "Distillation", "continual_metrics", "kd_loss"]
