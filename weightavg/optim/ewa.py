"""The EWA wrapper: ``weightavg.methods.ewa``'s mixtures shared after each step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from weightavg.core.settings import (
    Settings,
    describe_arguments,
)
from weightavg.methods.ewa import ShareSettings, share_all, to_dense
from weightavg.optim.base import InnerOptimizer, check_module


@dataclass(eq=False, repr=False)
class ConvertedModel(Settings):
    """The model whose mixtures EWA's wrapper averages."""

    model: nn.Module
    """The converted model (``weightavg.ewa.to_moe(model)`` first; the inner optimizer built over its parameters)."""

    def __post_init__(self) -> None:
        check_module("model", self.model)
        super().__post_init__()


@dataclass(eq=False, repr=False)
class EWA(ShareSettings, ConvertedModel, InnerOptimizer, Optimizer):  # signature: last base's fields first
    """``optimizer`` plus EWA's expert-weights averaging (``weightavg.methods.ewa``) after every step.

    Convert the model first (``weightavg.ewa.to_moe(model)``), build the inner optimizer over its parameters, then
    wrap it; when training ends, ``opt.merge()`` turns every mixture back into its dense FFN (the optimizer is done
    with the model then).

    Its arguments: ``InnerOptimizer``, ``ConvertedModel`` and the method's ``ShareSettings`` (Args below).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_mixtures(self.model, "weightavg.optim.EWA")
        self.steps = 0
        optimizer = self.optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        Optimizer.__init__(self, params, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state

    def current_beta(self) -> float:
        """The share rate after the steps done so far."""
        return self.beta_at(self.steps)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        with torch.enable_grad():
            loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.steps += 1
        share_all(self.model, self.current_beta())
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def merge(self) -> int:
        """Turn every mixture into its dense FFN (experts' mean); returns how many were merged."""
        return to_dense(self.model)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizer": self.optimizer.state_dict(), "ewa": {"steps": self.steps}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer", "ewa"}:
            raise ValueError("state_dict must come from EWA.state_dict() (keys 'ewa' and 'optimizer')")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.steps = int(state_dict["ewa"]["steps"])
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state


describe_arguments(EWA)
