"""One harness over every averaging rule: the promises each method keeps, checked the same way for all.

Each case builds a rule; the harness drives it through a real ``Averager`` on a BatchNorm model with a real
optimizer and checks: the rule pickles and compares equal (ddp_spawn, Hydra), its repr is compact and rebuilds it,
the average of a bf16 model is fp32, integer buffers are copied, a state round trip mid-run resumes bit-identically,
and the average matches the rule applied by hand in float64 (``avg <- lerp(avg, live, weight)`` at the events where
the rule gives a weight; every rule promises that form).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn

import weightavg.methods as methods
from weightavg import Averager, Clock, Snapshot
from weightavg.core.rule import Rule

RULES: dict[str, Callable[[], Rule]] = {
    "ema": lambda: methods.EMA(decay=0.9, warmup="none", every_n_steps=2),
    "ema_warmup": lambda: methods.EMA(decay=0.99, warmup="power", power=0.75),
    "swa": lambda: methods.SWA(start=3, start_unit="step", every=2, every_unit="step"),
    "swa_epoch": lambda: methods.SWA(start=1, start_unit="epoch", every=1, every_unit="epoch"),
    "zscl": lambda: methods.ZSCL(every_n_steps=3),
    "snapshot": lambda: Snapshot(),
}
STEPS, STEPS_PER_EPOCH = 14, 4


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def run(net: nn.Module, averager: Averager, start: int, stop: int, optimizer: torch.optim.Optimizer) -> None:
    for step in range(start, stop):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        averager.step(step + 1)
        if (step + 1) % STEPS_PER_EPOCH == 0:
            averager.epoch_end((step + 1) // STEPS_PER_EPOCH)


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_pickles_compares_and_rebuilds_from_its_repr(name: str) -> None:
    rule = RULES[name]()
    assert pickle.loads(pickle.dumps(rule)) == rule
    namespace = {**vars(methods), "Snapshot": Snapshot}
    assert eval(repr(rule), namespace) == rule
    assert isinstance(rule, Rule)


@pytest.mark.parametrize("name", sorted(RULES))
def test_average_follows_the_rule_by_hand_in_float64(name: str) -> None:
    rule = RULES[name]()
    net = model()
    averager = Averager(net, rule)
    reference = {k: v.double().clone() for k, v in net.state_dict().items()}  # averages start as copies
    bind = rule.weight("bind", Clock(0, 0), 0)
    assert bind in (None, 1.0)  # a rule either copies when bound or waits for its start
    updates = 1 if bind else 0
    last_step, last_epoch = (0, 0) if bind else (None, None)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    for step in range(STEPS):
        run(net, averager, step, step + 1, optimizer)
        events = [("step", step + 1, step // STEPS_PER_EPOCH)]
        if (step + 1) % STEPS_PER_EPOCH == 0:
            events.append(("epoch", step + 1, (step + 1) // STEPS_PER_EPOCH))
        for event, at_step, at_epoch in events:
            clock = Clock(at_step, at_epoch, None, last_step, last_epoch)
            weight = rule.weight(event, clock, updates)  # type: ignore[arg-type]
            if weight is None:
                continue
            for key, value in net.state_dict().items():
                if value.is_floating_point():
                    reference[key] = reference[key] + weight * (value.double() - reference[key])
                else:
                    reference[key] = value.double().clone()
            updates, last_step, last_epoch = updates + 1, clock.step, clock.epoch
    assert averager.num_updates == updates
    for key, value in averager.averaged_tensors().items():
        torch.testing.assert_close(value.double(), reference[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", sorted(RULES))
def test_state_round_trip_mid_run_is_bit_identical(name: str) -> None:
    net_a = model()
    averager_a = Averager(net_a, RULES[name]())
    run(net_a, averager_a, 0, STEPS, opt_a := torch.optim.SGD(net_a.parameters(), lr=0.2, momentum=0.9))

    net_b = model()
    averager_b = Averager(net_b, RULES[name]())
    opt_b = torch.optim.SGD(net_b.parameters(), lr=0.2, momentum=0.9)
    run(net_b, averager_b, 0, 6, opt_b)
    saved = copy.deepcopy((net_b.state_dict(), opt_b.state_dict(), averager_b.state_dict()))
    net_c = model()
    opt_c = torch.optim.SGD(net_c.parameters(), lr=0.2, momentum=0.9)
    net_c.load_state_dict(saved[0])
    opt_c.load_state_dict(saved[1])
    averager_c = Averager(net_c, RULES[name]())
    averager_c.load_state_dict(saved[2])
    run(net_c, averager_c, 6, STEPS, opt_c)
    assert averager_a.num_updates == averager_c.num_updates
    for key, value in averager_a.averaged_tensors().items():
        assert torch.equal(value, averager_c.averaged_tensors()[key]), key
    del opt_a


@pytest.mark.parametrize("name", sorted(RULES))
def test_low_precision_models_get_fp32_averages_and_integer_buffers_are_copied(name: str) -> None:
    net = model().to(torch.bfloat16)
    averager = Averager(net, RULES[name]())
    averaged = averager.averaged_tensors()
    assert averaged["0.weight"].dtype == torch.float32
    assert averaged["1.num_batches_tracked"].dtype == torch.int64
    assert averaged["0.weight"].device == net[0].weight.device
    with averager.averaged():  # swapped in the live dtype
        assert net[0].weight.dtype == torch.bfloat16
