"""Batched tensor kernels: the only arithmetic the engine runs on weights.

Each kernel has a ``torch._foreach_*`` path (one launch per list) and a plain per-tensor loop for reference; tests
check that both agree. Weights are Python floats, so no kernel reads a device value back to the host.
"""

from __future__ import annotations

import torch

Tensors = list[torch.Tensor]


def lerp_(targets: Tensors, sources: Tensors, weight: float, *, foreach: bool = True) -> None:
    """``target <- target + weight * (source - target)`` for each pair; exact copy when ``weight == 1``.

    Targets and sources may differ in dtype (an fp32 average of bf16 weights): then the update is
    ``target * (1 - weight) + weight * source`` in the target's precision, two launches instead of one.
    """
    if not targets:
        return
    if weight == 1.0:
        copy_(targets, sources, foreach=foreach)
        return
    same_dtype = targets[0].dtype == sources[0].dtype
    if foreach:
        if same_dtype:
            torch._foreach_lerp_(targets, sources, weight)
        else:
            torch._foreach_mul_(targets, 1.0 - weight)
            torch._foreach_add_(targets, sources, alpha=weight)
        return
    for target, source in zip(targets, sources, strict=True):
        if same_dtype:
            target.lerp_(source, weight)
        else:
            target.mul_(1.0 - weight).add_(source, alpha=weight)


def copy_(targets: Tensors, sources: Tensors, *, foreach: bool = True) -> None:
    """``target <- source`` for each pair (casting dtype and moving device as needed)."""
    if not targets:
        return
    if foreach:
        torch._foreach_copy_(targets, sources)
        return
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)
