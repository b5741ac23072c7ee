"""Run a module with other tensors in place of its own (a teacher's, a candidate's), without touching the module."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: ``forward(module, inputs) -> outputs``: how a face calls the user's model (default ``module(inputs)``).
Forward = Callable[[nn.Module, Any], Any]


class _Bound(nn.Module):
    """``forward(module, inputs)`` as a module's forward, so ``functional_call`` can replace the tensors it uses."""

    def __init__(self, module: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.module = module
        self.forward_fn = forward

    def forward(self, inputs: Any) -> Any:
        return self.forward_fn(self.module, inputs)


def call_with(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], inputs: Any, forward: Forward | None = None
) -> Any:
    """``forward(module, inputs)`` computed with ``tensors`` (state_dict names) in place of the module's own.

    Entries not in ``tensors`` keep the module's values; tied names follow each other. The module is unchanged
    afterwards (``torch.func.functional_call``).
    """
    if forward is None:
        return torch.func.functional_call(module, dict(tensors), (inputs,), strict=False)
    bound = _Bound(module, forward)
    return torch.func.functional_call(bound, {f"module.{k}": v for k, v in tensors.items()}, (inputs,), strict=False)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run the body with every submodule in eval mode; each one's own mode returns afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested lists, tuples, named tuples, dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch
