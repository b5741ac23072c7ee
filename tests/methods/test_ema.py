"""weightavg.methods.ema: decay schedules against their closed forms, the rule in an engine, checks, pickling."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from weightavg import EMA, Averager, Clock, Rule


def run(rule: EMA, values: list[float]) -> tuple[Averager, list[bool]]:
    """Bind at values[0], then one optimizer step per later value; float64 averages."""
    parameter = nn.Parameter(torch.tensor([values[0]], dtype=torch.float64))
    averager = Averager([parameter], rule)
    updated = []
    for value in values[1:]:
        with torch.no_grad():
            parameter.fill_(value)
        updated.append(averager.step())
    return averager, updated


def average(averager: Averager) -> float:
    return float(averager.averaged_tensors()["0"][0])


def reference_ema(values: list[float], decay_at: object, start_step: int = 0) -> float:
    """The rule written plainly: copy at the start step, then avg = d_t * avg + (1 - d_t) * live."""
    avg = values[0] if start_step == 0 else None
    for step, live in enumerate(values[1:], start=1):
        if step < start_step:
            continue
        if avg is None:
            avg = live
            continue
        d = decay_at(step - start_step)  # type: ignore[operator]
        avg = d * avg + (1 - d) * live
    assert avg is not None
    return avg


TRAJECTORY = [float(v) for v in torch.randn(120, generator=torch.Generator().manual_seed(0), dtype=torch.float64)]


@pytest.mark.parametrize("t", [1, 2, 5, 10, 100, 1000, 10**5, 10**7])
def test_power_warmup_closed_form(t: int) -> None:
    for decay, gamma, power in [(0.999, 1.0, 2 / 3), (0.9999, 1.0, 3 / 4), (0.99, 10.0, 0.5)]:
        rule = EMA(decay=decay, warmup="power", gamma=gamma, power=power)
        assert rule.decay_at(t) == pytest.approx(min(decay, 1 - (1 + t / gamma) ** -power), rel=1e-12)


@pytest.mark.parametrize("t", [1, 2, 5, 10, 100, 1000, 10**5])
def test_tf_warmup_closed_form(t: int) -> None:
    rule = EMA(decay=0.999, warmup="tf")
    assert rule.decay_at(t) == pytest.approx(min(0.999, (1 + t) / (10 + t)), rel=1e-12)
    assert EMA(decay=0.999, warmup="none").decay_at(t) == 0.999


@pytest.mark.parametrize("half_life", [1, 10, 693.5, 1e4])
def test_half_life(half_life: float) -> None:
    rule = EMA(half_life=half_life, warmup="none")
    assert rule.base_decay == pytest.approx(0.5 ** (1 / half_life), rel=1e-12)
    # The weight of a sample halves every half_life steps.
    assert rule.base_decay**half_life == pytest.approx(0.5, rel=1e-9)


def test_default_decay() -> None:
    assert EMA().base_decay == 0.999
    assert EMA(decay=0.0, warmup="none").base_decay == 0.0


def test_warmup_counts_steps_from_the_start_step() -> None:
    rule = EMA(decay=0.999, warmup="power", start_step=50)
    for t in (1, 7, 300):
        assert rule.decay_at(50 + t) == EMA(decay=0.999, warmup="power").decay_at(t)


@pytest.mark.parametrize(
    "rule",
    [
        EMA(decay=0.9, warmup="none"),
        EMA(decay=0.97, warmup="power"),
        EMA(decay=0.97, warmup="power", gamma=3.0, power=0.75),
        EMA(decay=0.95, warmup="tf"),
        EMA(half_life=7, warmup="none"),
        EMA(decay=0.9, warmup="none", start_step=10),
        EMA(decay=0.95, warmup="tf", start_step=4),
    ],
    ids=repr,
)
def test_trajectory_matches_the_rule_written_as_a_loop(rule: EMA) -> None:
    def decay_at(t: int) -> float:
        base = 0.5 ** (1 / rule.half_life) if rule.half_life is not None else rule.decay
        assert base is not None
        if rule.warmup == "power":
            return min(base, 1 - (1 + t / rule.gamma) ** -rule.power)
        if rule.warmup == "tf":
            return min(base, (1 + t) / (10 + t))
        return base

    averager, updated = run(rule, TRAJECTORY)
    assert updated == [step >= rule.start_step for step in range(1, len(TRAJECTORY))]
    assert average(averager) == pytest.approx(reference_ema(TRAJECTORY, decay_at, rule.start_step), rel=1e-12)


@pytest.mark.parametrize("every", [2, 4, 5])
def test_every_n_steps_keeps_the_time_constant(every: int) -> None:
    """Live weights jump from p0 to c after binding: every-step EMA gives c + (p0 - c) d^s after s steps; updating
    every n steps with d^n lands on the same value at each update."""
    decay, p0, c, steps = 0.97, 2.0, -1.0, 40
    averager, updated = run(EMA(decay=decay, warmup="none", every_n_steps=every), [p0] + [c] * steps)
    assert updated == [step % every == 0 for step in range(1, steps + 1)]
    last_update = steps - steps % every
    assert average(averager) == pytest.approx(c + (p0 - c) * decay**last_update, rel=1e-12)
    unscaled, _ = run(EMA(decay=decay, warmup="none", every_n_steps=every, scale_decay=False), [p0] + [c] * steps)
    assert average(unscaled) == pytest.approx(c + (p0 - c) * decay ** (last_update // every), rel=1e-12)


def test_every_n_steps_counts_from_the_last_update() -> None:
    rule = EMA(decay=0.5, warmup="none", every_n_steps=3, start_step=4)
    _, updated = run(rule, [0.0] * 13)
    # 12 steps: copy at step 4 (the start), then every third step after it: 7, 10.
    assert [step for step, done in enumerate(updated, start=1) if done] == [4, 7, 10]


def test_a_jumping_step_counter_keeps_the_time_constant() -> None:
    """Two optimizers stepping per batch advance the step counter by 2: each update then decays by decay**2."""
    decay = 0.9
    model = nn.Linear(1, 1, bias=False)
    averager = Averager(model, EMA(decay=decay, warmup="none"))
    expected = float(model.weight)
    for k in range(1, 11):
        with torch.no_grad():
            model.weight.fill_(float(k))
        assert averager.step(2 * k)
        expected = decay**2 * expected + (1 - decay**2) * k
    assert float(averager.averaged_tensors()["weight"]) == pytest.approx(expected, rel=1e-6)


def test_start_step_rule_weights() -> None:
    rule = EMA(decay=0.9, warmup="none", start_step=3)
    assert rule.weight("bind", Clock(0, 0), 0) is None
    assert rule.weight("step", Clock(2, 0), 0) is None
    assert rule.weight("step", Clock(3, 0), 0) == 1.0  # the first update copies
    assert rule.weight("step", Clock(4, 0, last_update_step=3), 1) == pytest.approx(1 - 0.9)
    assert rule.weight("epoch", Clock(4, 1), 1) is None
    immediate = EMA(decay=0.9, warmup="none")
    assert immediate.weight("bind", Clock(0, 0), 0) == 1.0
    assert immediate.weight("bind", Clock(0, 0), 1) is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"decay": 1.5}, ValueError, r"decay=1.5 is out of range: allowed \[0, 1\)"),
        ({"decay": -0.1}, ValueError, r"decay=-0.1 is out of range"),
        ({"decay": 1.0}, ValueError, r"decay=1.0 is out of range"),
        ({"decay": float("nan")}, ValueError, r"decay=nan must be finite"),
        ({"decay": "0.9"}, TypeError, r"decay='0.9' must be a number"),
        ({"decay": True}, TypeError, r"decay=True must be a number"),
        ({"half_life": 0}, ValueError, r"half_life=0 is out of range"),
        ({"decay": 0.9, "half_life": 10}, ValueError, r"decay=0.9 and half_life=10 both set the decay"),
        ({"warmup": "foo"}, ValueError, r"warmup='foo' is not allowed; choose one of 'none', 'power', 'tf'"),
        ({"gamma": 0}, ValueError, r"gamma=0 is out of range"),
        ({"power": -1.0}, ValueError, r"power=-1.0 is out of range"),
        ({"every_n_steps": 0}, ValueError, r"every_n_steps=0 is out of range: allowed \[1, inf\)"),
        ({"every_n_steps": 2.0}, TypeError, r"every_n_steps=2.0 must be an int"),
        ({"start_step": -1}, ValueError, r"start_step=-1 is out of range"),
        ({"start_step": 1.5}, TypeError, r"start_step=1.5 must be an int"),
    ],
)
def test_bad_input(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        EMA(**kwargs)


def test_rule_pickles_and_compares_equal() -> None:
    rule = EMA(decay=0.99, warmup="power", every_n_steps=4, start_step=10)
    copy = pickle.loads(pickle.dumps(rule))
    assert copy == rule and hash(copy) == hash(rule)
    assert copy != EMA(decay=0.99, warmup="power", every_n_steps=4, start_step=11)
    assert isinstance(rule, Rule)
    assert [copy.decay_at(t) for t in range(11, 30)] == [rule.decay_at(t) for t in range(11, 30)]


def test_repr_is_compact_and_evaluates_back() -> None:
    assert repr(EMA()) == "EMA(decay=0.999)"  # canonical: the default decay is written
    assert repr(EMA(decay=0.99)) == "EMA(decay=0.99)"
    rule = EMA(decay=0.99, warmup="power", every_n_steps=4)
    text = repr(rule)
    assert "gamma" not in text and "start_step" not in text and "scale_decay" not in text
    assert eval(text, {"EMA": EMA}) == rule
