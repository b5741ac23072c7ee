"""Batched tensor kernels: the only arithmetic the engine and the methods run on weights.

Each kernel has a ``torch._foreach_*`` path (one launch per list, the default) and a plain per-tensor loop, chosen by
``foreach`` (as torch's ``_multi_tensor_adam`` / ``_single_tensor_adam``); ``tests/core/test_kernels.py`` checks that
both agree, in float64, with the formula written out. Coefficients are Python floats, so no kernel reads a device
value back to the host. The methods (NoLoCo's outer steps, EWA's share, LCSC's combinations, WiSE-FT's interpolation)
use these kernels; no ``torch._foreach_*`` call is written elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

Tensors = list[torch.Tensor]

# Elements staged per batch when sources must be cast (or guarded) before the ``lerp_``: 1 MiB of fp32 on the CPU,
# so the staged copy is still in cache when ``lerp_`` reads it back (3.5x faster than ``mul_`` + ``add_`` over a
# 25M-element bf16 model on 2 cores); 16 MiB elsewhere, where each launch must carry enough work to hide its cost
# and the buffer still fits a data-centre GPU's L2. Either way the temporary is bounded, not model-sized.
STAGE_ELEMENTS_CPU = 1 << 18
STAGE_ELEMENTS = 1 << 22


def lerp_(
    targets: Tensors, sources: Tensors, weight: float, *, foreach: bool = True, enabled: torch.Tensor | None = None
) -> None:
    """``target <- target + weight * (source - target)`` for each pair (torch's ``lerp_``); an exact copy when
    ``weight == 1``.

    Targets and sources may differ in dtype (an fp32 average of bf16 weights). Then each source is first cast to the
    target's dtype (exact for bf16/fp16 into fp32) into a bounded staging buffer, batch by batch, and lerped from
    there: the result is bit for bit a ``lerp_`` in the target's precision, never the ``mul_`` + ``add_`` form, whose
    two roundings of the whole target per update drift at high decay (0.999999: error 1.8x the true movement over
    1e5 steps, against ~56x less for ``lerp_``).

    Args:
        enabled: a 0-dim bool tensor on the targets' device. Where it is ``False`` every target is left exactly as
            it is (each source is replaced by its target, and ``lerp(t, t, w) == t``): an update skipped on the
            device, without reading the flag back to the host. Sources then always go through the staging buffer.
    """
    if not targets:
        return
    if enabled is None and weight == 1.0:
        copy_(targets, sources, foreach=foreach)
        return
    if enabled is None and targets[0].dtype == sources[0].dtype:
        if foreach:
            torch._foreach_lerp_(targets, sources, weight)
            return
        for target, source in zip(targets, sources, strict=True):
            target.lerp_(source, weight)
        return
    _staged_lerp_(targets, sources, weight, foreach=foreach, enabled=enabled)


def _staged_lerp_(
    targets: Tensors, sources: Tensors, weight: float, *, foreach: bool, enabled: torch.Tensor | None
) -> None:
    """``lerp_`` against sources cast (and, with ``enabled``, guarded) into a staging buffer of the targets' dtype.

    Both paths split the tensors into the same pieces, so they run the same elementwise ``lerp_`` on every element.
    """
    first = targets[0]
    limit = STAGE_ELEMENTS_CPU if first.device.type == "cpu" else STAGE_ELEMENTS
    total = sum(t.numel() for t in targets if t.is_contiguous())
    buffer = first.new_empty(min(limit, total), dtype=first.dtype)
    for batch in _pieces(targets, sources, limit):
        offset = 0
        staged = []
        for target, _ in batch:
            if target.dim() == 1 and offset + target.numel() <= buffer.numel():
                staged.append(buffer.narrow(0, offset, target.numel()))
                offset += target.numel()
            else:  # a non-contiguous tensor, staged whole in its own temporary
                staged.append(torch.empty_like(target))
        pieces, originals = [t for t, _ in batch], [s for _, s in batch]
        if enabled is not None:
            for stage, target, source in zip(staged, pieces, originals, strict=True):
                torch.where(enabled, source, target, out=stage)
        elif foreach:
            torch._foreach_copy_(staged, originals)
        else:
            for stage, source in zip(staged, originals, strict=True):
                stage.copy_(source)
        if weight == 1.0:  # lerp_ at 1 keeps a NaN or inf of the target; a copy does not
            copy_(pieces, staged, foreach=foreach)
        elif foreach:
            torch._foreach_lerp_(pieces, staged, weight)
        else:
            for piece, stage in zip(pieces, staged, strict=True):
                piece.lerp_(stage, weight)


def _pieces(targets: Tensors, sources: Tensors, limit: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Batches of (target, source) pairs of at most ``limit`` elements together: contiguous tensors as flat slices
    (a large one split across batches), others whole and alone."""
    batch: list[tuple[torch.Tensor, torch.Tensor]] = []
    size = 0
    for target, source in zip(targets, sources, strict=True):
        if target.numel() == 0:
            continue
        if not (target.is_contiguous() and source.is_contiguous()):
            yield [(target, source)]
            continue
        flat_target, flat_source = target.view(-1), source.view(-1)
        for start in range(0, flat_target.numel(), limit):
            piece = flat_target[start : start + limit]
            if size + piece.numel() > limit:
                yield batch
                batch, size = [], 0
            batch.append((piece, flat_source[start : start + limit]))
            size += piece.numel()
    if batch:
        yield batch


def copy_(targets: Tensors, sources: Tensors, *, foreach: bool = True) -> None:
    """``target <- source`` for each pair (casting dtype and moving device as needed)."""
    if not targets:
        return
    if foreach:
        torch._foreach_copy_(targets, sources)
        return
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


def add_(targets: Tensors, sources: Tensors, alpha: float = 1.0, *, foreach: bool = True) -> None:
    """``target <- target + alpha * source`` for each pair (``alpha=-1``: subtract)."""
    if not targets:
        return
    if foreach:
        torch._foreach_add_(targets, sources, alpha=alpha)
        return
    for target, source in zip(targets, sources, strict=True):
        target.add_(source, alpha=alpha)


def mul_(targets: Tensors, factor: float, *, foreach: bool = True) -> None:
    """``target <- factor * target`` for each tensor."""
    if not targets:
        return
    if foreach:
        torch._foreach_mul_(targets, factor)
        return
    for target in targets:
        target.mul_(factor)


def div_(targets: Tensors, divisor: float, *, foreach: bool = True) -> None:
    """``target <- target / divisor`` for each tensor (a true division: a mean rounds once, not as ``* (1 / n)``)."""
    if not targets:
        return
    if foreach:
        torch._foreach_div_(targets, divisor)
        return
    for target in targets:
        target.div_(divisor)


def zero_(targets: Tensors, *, foreach: bool = True) -> None:
    """``target <- 0`` for each tensor."""
    if not targets:
        return
    if foreach:
        torch._foreach_zero_(targets)
        return
    for target in targets:
        target.zero_()


def max_abs(tensors: Tensors, *, foreach: bool = True) -> Tensors:
    """Each tensor's largest absolute value (its inf-norm), as 0-dim tensors on its device (NaN where it holds one);
    the tensors must not be empty."""
    if not tensors:
        return []
    if foreach:
        return list(torch._foreach_norm(tensors, ord=float("inf")))
    return [torch.linalg.vector_norm(tensor, ord=float("inf")) for tensor in tensors]
