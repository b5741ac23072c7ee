"""The EWA wrapper: ``weightavg.methods.ewa``'s mixtures shared after each step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from weightavg.core.settings import Settings, describe_arguments
from weightavg.methods.ewa import ShareSettings, share_all, to_dense
from weightavg.optim.base import InnerOptimizer, WrapperHost, check_module


@dataclass(eq=False, repr=False)
class ConvertedModel(Settings):
    """The model whose mixtures EWA's wrapper averages."""

    model: nn.Module
    """The converted model (``weightavg.ewa.to_moe(model)`` first; the inner optimizer built over its parameters)."""

    def __post_init__(self) -> None:
        check_module("model", self.model)
        super().__post_init__()


@dataclass(eq=False, repr=False)
class EWA(ShareSettings, ConvertedModel, InnerOptimizer, WrapperHost):  # signature: last base's fields first
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
        self._share_inner_optimizer([p for group in self.optimizer.param_groups for p in group["params"]])

    def current_beta(self) -> float:
        """The share rate after the steps done so far."""
        return self.beta_at(self.steps)

    def steps_done(self) -> int:
        return self.steps

    def on_step(self, step: int) -> None:
        self.steps = step
        share_all(self.model, self.current_beta())

    def merge(self) -> int:
        """Turn every mixture into its dense FFN (experts' mean); returns how many were merged."""
        return to_dense(self.model)

    def method_state(self) -> dict[str, Any]:
        return {"ewa": {"steps": self.steps}}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["ewa"]["steps"])


describe_arguments(EWA)
