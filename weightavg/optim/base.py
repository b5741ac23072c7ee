"""The optimizer-wrapper host every wrapper shares: ``AveragingOptimizer`` (a ``torch.optim.Optimizer`` that
shares the inner optimizer's ``param_groups`` and state, steps it, then updates the method's engine) and its option
groups."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from weightavg.core.averager import Averager
from weightavg.core.checks import STATE_VERSION, check_number, check_output_file, check_state_version
from weightavg.core.rule import Rule
from weightavg.core.settings import ReadSettings, Settings, averager_options
from weightavg.methods import swa


def check_module(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise ``TypeError`` unless ``value`` is an ``nn.Module`` (or ``None`` when ``optional``): a string or a number
    would otherwise fail deep inside binding (a string even iterates, as characters)."""
    if value is None and optional:
        return
    if not isinstance(value, nn.Module):
        allowed = "an nn.Module or None" if optional else "an nn.Module"
        raise TypeError(f"{name}={value!r} must be the model ({allowed}), got {type(value).__name__}")


@dataclass(eq=False, repr=False)
class InnerOptimizer(Settings):
    """The optimizer a wrapper steps (every wrapper's first argument)."""

    optimizer: Optimizer
    """The inner optimizer; its ``param_groups`` and ``state`` are shared, so LR schedulers, gradient clipping and
    ``zero_grad`` keep acting on it. ``add_param_group`` raises: add groups to the inner optimizer before wrapping
    (the average is bound to the parameters present when the wrapper is built)."""

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(self.optimizer).__name__}")
        super().__post_init__()


@dataclass(eq=False, repr=False)
class WrapperOptions(InnerOptimizer):
    """``InnerOptimizer`` and what the wrappers of averages take besides the method's settings (EMA, SWA, ZSCL)."""

    _: KW_ONLY
    module: nn.Module | None = None
    """The model; when given, tensors are named as in its ``state_dict`` and its buffers are followed too (under
    ``buffers``). Without it only the optimizer's parameters are averaged, named by position."""
    total_steps: int | None = None
    """The run's total optimizer steps, for starts given as a fraction of training."""

    def __post_init__(self) -> None:
        check_module("module", self.module, optional=True)
        if self.total_steps is not None:
            check_number("total_steps", self.total_steps, low=1, integer=True)
        super().__post_init__()


@dataclass(eq=False, repr=False)
class ModelOptions(InnerOptimizer):
    """``InnerOptimizer`` and the model, for the wrappers that keep copies of the model's whole state by name
    (WiSE-FT's anchor, LCSC's snapshots)."""

    _: KW_ONLY
    module: nn.Module
    """The model: every floating entry of its ``state_dict`` (buffers included, under ``buffers``) is kept by name."""

    def __post_init__(self) -> None:
        check_module("module", self.module)
        super().__post_init__()


class WrapperHost(ReadSettings, Optimizer):
    """The optimizer-wrapper face's host, the base of every wrapper: it shares the inner optimizer's
    ``param_groups`` and state, and holds the face's one step path and one state path for every method.

    ``step()`` steps the inner optimizer, then calls the method's ``on_step(step)`` once (``step`` counts the
    wrapper's optimizer steps, restored by ``load_state_dict``). ``state_dict()`` is ``{"optimizer": ...}`` plus the
    method's parts (``method_state()``), each loaded back by ``load_method_state`` after every part was checked
    (``check_method_state``), so a refused state changes nothing.
    """

    optimizer: Optimizer

    def _share_inner_optimizer(self, params: list[torch.Tensor]) -> None:
        optimizer = self.optimizer
        # Optimizer.__init__ sets up the hook registries; the groups and state are then the inner optimizer's own.
        Optimizer.__init__(self, params, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Step the inner optimizer, then the method (``on_step``)."""
        self.check_can_step()
        with torch.enable_grad():
            loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.on_step(self.steps_done() + 1)
        return loss

    def steps_done(self) -> int:
        """Optimizer steps done so far (the face's one step counter)."""
        raise NotImplementedError

    def check_can_step(self) -> None:
        """Raise if a step now would be wrong (weights swapped in; ZSCL between tasks), before the inner step."""

    def on_step(self, step: int) -> None:
        """After inner optimizer step ``step``, once: the method's work (update, snapshot, share, outer step)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "param_groups") or self.param_groups is not self.optimizer.param_groups:
            super().add_param_group(param_group)  # Optimizer.__init__ building its throwaway groups
            return
        raise NotImplementedError(
            "add the parameter group to the inner optimizer before wrapping it: the method is bound to the "
            "parameters present when the wrapper is built"
        )

    def method_state(self) -> dict[str, Any]:
        """The method's parts of ``state_dict()`` (key -> state), beside ``"optimizer"``."""
        return {}

    def check_method_state(self, state: dict[str, Any]) -> None:
        """Raise if the method's parts of ``state`` cannot be loaded (called before anything is loaded)."""

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Load the method's parts of ``state`` (after the inner optimizer's)."""

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state and the method's, together, with the layout's ``version``."""
        return {"version": STATE_VERSION, "optimizer": self.optimizer.state_dict(), **self.method_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        check_state_version(state_dict, type(self).__name__)
        keys = {"optimizer", *self.method_state()}
        given = set(state_dict) - {"version"} if isinstance(state_dict, dict) else None
        if not isinstance(state_dict, dict) or given != keys:
            raise ValueError(
                f"state_dict must come from {type(self).__name__}.state_dict() (keys {sorted(keys)}), got keys "
                f"{sorted(state_dict) if isinstance(state_dict, dict) else state_dict!r}"
            )
        self.check_method_state(state_dict)  # refuse before touching the inner optimizer
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.load_method_state(state_dict)
        # The inner optimizer's load_state_dict replaces its param_groups and state objects: share the new ones.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state


class AveragingOptimizer(WrapperHost):
    """Wrap an optimizer so that every ``step()`` also updates an average of its parameters under a rule: the base
    of every wrapper that keeps an engine (all but EWA's).

    A method's wrapper declares its fields from ``WrapperOptions``, the method's settings
    (``weightavg.methods.ema.EMASettings``) and the engine's ``EngineOptions`` (``weightavg.core.settings``), then
    hands its rule to ``_start_wrapping``. Its step counter is the engine's (``averager.step_count``).
    """

    def _engine_options(self) -> dict[str, Any]:
        """The ``Averager`` settings of this wrapper's average (``weightavg.core.settings.averager_options``)."""
        return averager_options(self)

    def _start_wrapping(self, rule: Rule) -> None:
        optimizer, module = self.optimizer, getattr(self, "module", None)  # WrapperOptions' or ModelOptions'
        params = [p for group in optimizer.param_groups for p in group["params"]]
        target: nn.Module | Iterable[torch.Tensor] = module if module is not None else params
        # Kept to bind afresh (ZSCL binds a new ensemble at each task's start).
        self._bind = functools.partial(
            Averager,
            target,
            rule,
            parameters=params if module is not None else None,
            total_steps=getattr(self, "total_steps", None),  # WrapperOptions' (copies need none)
            **self._engine_options(),
        )
        self.averager = self._bind()
        self._share_inner_optimizer(params)
        self._read_settings(rule)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.averager.rule!r}, {self.optimizer!r})"

    def steps_done(self) -> int:
        return self.averager.step_count

    def check_can_step(self) -> None:
        if self.averager.is_swapped:
            raise RuntimeError(
                "step() while other weights are swapped into the model (inside averaged() or interpolated()): "
                "the optimizer would train them; step outside the with-block"
            )

    def on_step(self, step: int) -> None:
        self.averager.step(step)  # updates the average if the rule says so

    def epoch_end(self) -> bool:
        """Mark the end of an epoch (for rules that sample per epoch, e.g. ``SWA(every_unit="epoch")``)."""
        return self.averager.epoch_end()

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Evaluate with the averaged weights: ``with opt.averaged(): evaluate(model)``; live weights return after.

        Before the first update there is no average yet; the body then runs on the live weights, with a warning.
        """
        if not self.averager.has_average:
            warnings.warn("no averaging update has happened yet; evaluating the live weights", stacklevel=3)
            yield
            return
        with self.averager.averaged():
            yield

    def copy_to_model(self) -> None:
        """Overwrite the live weights with the average (e.g. at the end of training)."""
        self.averager.copy_to_model()

    def save_averaged(self, path: str | os.PathLike[str]) -> None:
        """Export the averaged weights as safetensors (atomic write; a folder or an unwritable path is refused)."""
        check_output_file("path", path)
        self.averager.save(path)

    def update_bn(self, loader: Iterable[Any], model: nn.Module, device: torch.device | None = None) -> None:
        """Recompute BatchNorm statistics of the averaged weights with a pass over ``loader``
        (``torch.optim.swa_utils.update_bn``), and keep them in the average. ``model`` must be the bound module."""
        swa.update_bn(self.averager, loader, model, device)

    def method_state(self) -> dict[str, Any]:
        """``"averaging"``, the engine's state, and the method's own parts (``extra_state``)."""
        return {"averaging": self.averager.state_dict(), **self.extra_state()}

    def check_method_state(self, state: dict[str, Any]) -> None:
        self.averager.check_state(state["averaging"])
        self.check_extra_state(state)

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.averager.load_state_dict(state["averaging"])
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        """A method's own state beyond the average (ZSCL: the teacher and the task count)."""
        return {}

    def check_extra_state(self, state: dict[str, Any]) -> None:
        """Raise if the method's own part of ``state`` cannot be loaded (called before anything is loaded)."""

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None
