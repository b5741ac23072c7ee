"""One step path and one state path per face: every callback's method work runs once per optimizer step
(``on_optimizer_step``, behind the Lightning face's one guard), and every wrapper's once per ``step()``
(``on_step``), with the step count carried across a resume; every state is versioned. Counted against Lightning's own
optimizer-step count and against the steps taken by hand."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import weightavg.callbacks as cb
import weightavg.optim as wo
from tests.helpers import DigitsModule, fit_digits
from weightavg.core.checks import STATE_VERSION
from weightavg.ewa import to_moe

CALLBACKS: dict[str, Callable[[], Any]] = {
    "EMA": lambda: cb.EMA(decay=0.9),
    "SWA": lambda: cb.SWA(start=0.0, every_unit="step", recompute_bn=False),
    "WiSEFT": lambda: cb.WiSEFT(),
    "ZSCL": lambda: cb.ZSCL(),
    "LCSC": lambda: cb.LCSC(every_n_steps=2, directory=":memory:", method="uniform", recompute_bn=False),
    "EWA": lambda: cb.EWA(num_experts=2, select="net.0"),
}


class OptimizerStepCounter(pl.Callback):
    """Lightning's own count: the optimizer steps it ran (``on_before_optimizer_step`` fires once per step)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_before_optimizer_step(self, *args: Any) -> None:
        self.steps += 1


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_each_callback_does_its_work_once_per_optimizer_step_under_gradient_accumulation(name: str) -> None:
    callback = CALLBACKS[name]()
    seen: list[int] = []
    hook = callback.on_optimizer_step

    def spy(trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        seen.append(step)
        hook(trainer, pl_module, step)

    callback.on_optimizer_step = spy  # type: ignore[method-assign]
    counter = OptimizerStepCounter()
    pl.seed_everything(0, verbose=False)
    # 8 batches an epoch, 3 per optimizer step: steps end mid-epoch and an epoch's last step is a partial one
    run = fit_digits(DigitsModule(), [counter, callback], 2, accumulate_grad_batches=3)
    assert counter.steps == run.global_step == 6
    assert seen == list(range(1, counter.steps + 1))
    if name == "LCSC":  # its work: a snapshot every 2 steps
        assert [s.step for s in callback._combiner().store.snapshots] == [2, 4, 6]


def _wrapper(name: str) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    if name == "EWA":
        to_moe(model, "0", num_experts=2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    build: dict[str, Callable[[], Any]] = {
        "EMA": lambda: wo.EMA(sgd, decay=0.9),
        "SWA": lambda: wo.SWA(sgd),
        "WiSEFT": lambda: wo.WiSEFT(sgd, module=model),
        "ZSCL": lambda: wo.ZSCL(sgd),
        "LCSC": lambda: wo.LCSC(sgd, module=model, every_n_steps=2, directory=":memory:"),
        "EWA": lambda: wo.EWA(sgd, model=model),
    }
    return model, build[name]()


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_each_wrapper_does_its_work_once_per_step_and_counts_on_after_a_resume(name: str) -> None:
    def spied(opt: Any) -> list[int]:
        seen: list[int] = []
        hook = opt.on_step
        opt.on_step = lambda step: (seen.append(step), hook(step))[1]
        return seen

    def train(model: nn.Module, opt: Any, steps: int) -> None:
        for _ in range(steps):
            model(torch.randn(3, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    model, opt = _wrapper(name)
    seen = spied(opt)
    train(model, opt, 3)
    assert seen == [1, 2, 3] and opt.steps_done() == 3
    state = opt.state_dict()
    model, resumed = _wrapper(name)
    with pytest.warns(UserWarning, match="does not hold") if name == "LCSC" else nullcontext():
        resumed.load_state_dict(state)  # an in-memory store is not found again: said so
    assert resumed.steps_done() == 3
    seen = spied(resumed)
    train(model, resumed, 2)
    assert seen == [4, 5] and resumed.steps_done() == 5


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_every_wrapper_state_is_versioned_and_a_newer_one_is_refused_before_anything_changes(name: str) -> None:
    model, opt = _wrapper(name)
    for _ in range(2):  # LCSC snapshots the second
        model(torch.randn(3, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    assert state["version"] == STATE_VERSION == 1
    _, fresh = _wrapper(name)
    before = {k: v.clone() for k, v in fresh.optimizer.state_dict()["state"].items()}
    with pytest.raises(ValueError, match=r"newer weightavg \(state version 2; this one reads up to 1\)"):
        fresh.load_state_dict({**state, "version": 2})
    assert fresh.optimizer.state_dict()["state"] == before and fresh.steps_done() == 0
    older = {k: v for k, v in state.items() if k != "version"}  # written before the version was recorded
    with pytest.warns(UserWarning, match="does not hold") if name == "LCSC" else nullcontext():
        fresh.load_state_dict(older)
    assert fresh.steps_done() == 2


def test_every_callback_state_is_versioned_and_a_newer_one_is_refused() -> None:
    for name, build in CALLBACKS.items():
        callback = build()
        if not isinstance(callback, cb.AveragingCallback):
            continue  # EWA's state is the model's and the Trainer's (its step count)
        assert callback.state_dict()["version"] == STATE_VERSION, name
        with pytest.raises(ValueError, match="newer weightavg"):
            callback.load_state_dict({"version": STATE_VERSION + 1})
