"""The ZSCL wrapper: ``weightavg.methods.zscl``'s ensemble per task and distillation, for plain loops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from weightavg.core.call import to_device
from weightavg.core.settings import EngineOptions, describe_arguments, setting_values
from weightavg.methods.zscl import ZSCL as ZSCLRule
from weightavg.methods.zscl import DistillationSettings, EnsembleSettings
from weightavg.optim.base import AveragingOptimizer, WrapperOptions


@dataclass(eq=False, repr=False)
class ZSCL(EngineOptions, DistillationSettings, EnsembleSettings, WrapperOptions, AveragingOptimizer):
    """``optimizer`` plus ZSCL's weight ensemble and distillation (``weightavg.methods.zscl``), for plain loops.

    The first task starts when the wrapper is built; ``start_task()`` starts the next one (the model first takes
    the finished task's ensemble, so each task starts from the previous ensemble), and ``end_task()`` ends the last.
    Evaluate the ensemble with ``with opt.averaged():``. With ``reference=`` (needs ``module=``), add
    ``opt.distillation_loss()`` to the loss; it draws the next reference batch, moved to the model's device.

    Its arguments: ``WrapperOptions``, the method's ``EnsembleSettings`` and ``DistillationSettings`` (the teacher
    defaults to the model when the wrapper is built) and ``EngineOptions`` (Args below).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reference is not None and self.module is None:
            raise ValueError("distillation (reference=) runs the model: pass module= as well")
        self._start_wrapping(ZSCLRule(**setting_values(self, EnsembleSettings)))
        self.distillation = self.build_distillation()
        if self.distillation is not None and self.module is not None:
            self.distillation.bind(self.module, self.teacher)
        self.task = 0
        self._ended = False

    def distillation_loss(self) -> torch.Tensor:
        """``distill_weight * KD`` on the next reference batch; add it to the task loss before ``backward()``."""
        if self.distillation is None:
            raise RuntimeError("this ZSCL wrapper does not distill: build it with reference= (and module=)")
        device = next(iter(self.averager.live_tensors().values())).device
        return self.distillation.loss(lambda batch: to_device(batch, device))

    def check_can_step(self) -> None:
        super().check_can_step()
        if self._ended:
            raise RuntimeError("the task has ended (end_task()); call start_task() before stepping again")

    def end_task(self, apply: bool = True) -> None:
        """End the task: put its ensemble into the model (in place), or with ``apply=False`` keep the live weights
        (e.g. a distillation-only ablation)."""
        if apply:
            self.averager.copy_to_model()
        self._ended = True

    def start_task(self) -> None:
        """End the running task (unless ``end_task()`` did) and start the next one: a fresh ensemble of the model."""
        if not self._ended:
            self.end_task()
        self.averager = self._bind()
        self.task += 1
        self._ended = False

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"task": self.task, "task_ended": self._ended}
        if self.distillation is not None:
            state["distillation"] = self.distillation.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.task = int(state["task"])
        self._ended = bool(state["task_ended"])
        if self.distillation is not None:
            self.distillation.load_state_dict(state["distillation"])


describe_arguments(ZSCL)
