"""weightavg.methods.swa: start points in steps, epochs or fractions, sampling period, the running mean, checks."""

from __future__ import annotations

import math
import pickle
from fractions import Fraction

import pytest
import torch
from torch import nn

from weightavg import SWA, Averager, Clock, Rule


def run(
    rule: SWA, steps: int, steps_per_epoch: int = 1, total_steps: int | None = None
) -> tuple[Averager, list[int], list[float]]:
    """Live value = step number; returns the averager, the steps where a sample was taken, and the samples."""
    parameter = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    averager = Averager([parameter], rule, total_steps=total_steps)
    sampled_at, samples = [], []
    for step in range(1, steps + 1):
        with torch.no_grad():
            parameter.fill_(float(step) ** 1.5)
        taken = averager.step()
        if step % steps_per_epoch == 0:
            taken = averager.epoch_end() or taken
        if taken:
            sampled_at.append(step)
            samples.append(float(step) ** 1.5)
    return averager, sampled_at, samples


def average(averager: Averager) -> float:
    return float(averager.averaged_tensors()["0"][0])


def test_start_in_steps_samples_every_step() -> None:
    averager, sampled_at, samples = run(SWA(start=5, start_unit="step", every_unit="step"), steps=20)
    assert sampled_at == list(range(5, 21))
    assert average(averager) == pytest.approx(math.fsum(samples) / len(samples), rel=1e-12)
    assert averager.num_updates == 16


def test_nothing_before_the_start() -> None:
    parameter = nn.Parameter(torch.zeros(1))
    averager = Averager([parameter], SWA(start=3, start_unit="step", every_unit="step"))
    assert not averager.has_average
    assert not averager.step() and not averager.step()
    assert not averager.has_average
    with torch.no_grad():
        parameter.fill_(7.0)
    assert averager.step()
    assert averager.has_average
    assert average(averager) == 7.0  # the first sample copies


def test_every_n_steps_counts_from_the_last_sample() -> None:
    averager, sampled_at, samples = run(SWA(start=4, start_unit="step", every=3, every_unit="step"), steps=20)
    assert sampled_at == [4, 7, 10, 13, 16, 19]
    assert average(averager) == pytest.approx(math.fsum(samples) / len(samples), rel=1e-12)


def test_start_and_sampling_in_epochs() -> None:
    averager, sampled_at, samples = run(SWA(start=2, start_unit="epoch", every=2), steps=40, steps_per_epoch=4)
    # Epochs end at steps 4, 8, ...; sampling from epoch 2 at every second epoch: epochs 2, 4, 6, 8, 10.
    assert sampled_at == [8, 16, 24, 32, 40]
    assert averager.epoch_count == 10
    assert average(averager) == pytest.approx(math.fsum(samples) / len(samples), rel=1e-12)


def test_start_in_epochs_sampling_in_steps() -> None:
    _, sampled_at, _ = run(SWA(start=2, start_unit="epoch", every=2, every_unit="step"), steps=16, steps_per_epoch=4)
    # Epoch 2 ends after step 8, so step sampling starts with step 9, then every second step.
    assert sampled_at == [9, 11, 13, 15]


def test_start_as_fraction_of_total_steps() -> None:
    averager, sampled_at, samples = run(SWA(start=0.75, every_unit="step"), steps=20, total_steps=20)
    assert sampled_at == list(range(15, 21))
    assert average(averager) == pytest.approx(math.fsum(samples) / len(samples), rel=1e-12)
    _, from_start, _ = run(SWA(start=0.0, every_unit="step"), steps=5, total_steps=5)
    assert from_start == [1, 2, 3, 4, 5]
    _, at_end, _ = run(SWA(start=1.0, every_unit="step"), steps=5, total_steps=5)
    assert at_end == [5]


@pytest.mark.parametrize(("fraction", "total_steps"), [("0.55", 100), ("0.07", 100)])
def test_decimal_fraction_starts_at_the_exact_step(fraction: str, total_steps: int) -> None:
    expected = math.ceil(Fraction(fraction) * total_steps)
    _, sampled_at, _ = run(SWA(start=float(fraction), every_unit="step"), steps=total_steps, total_steps=total_steps)
    assert sampled_at[0] == expected


def test_fraction_needs_total_steps() -> None:
    with pytest.raises(ValueError, match=r"start=0.75 with start_unit='fraction' needs .* pass total_steps="):
        Averager([nn.Parameter(torch.zeros(1))], SWA())
    with pytest.raises(ValueError, match=r"total_steps"):
        SWA().validate_clock(Clock(0, 0, None))
    SWA().validate_clock(Clock(0, 0, 100))
    SWA(start=3, start_unit="step").validate_clock(Clock(0, 0, None))


def test_rule_weights() -> None:
    rule = SWA(start=2, start_unit="step", every_unit="step")
    assert rule.weight("bind", Clock(0, 0), 0) is None
    assert rule.weight("step", Clock(1, 0), 0) is None
    assert rule.weight("epoch", Clock(2, 1), 0) is None
    assert rule.weight("step", Clock(2, 0), 0) == 1.0
    assert rule.weight("step", Clock(3, 0), 1) == 0.5
    assert rule.weight("step", Clock(9, 0), 4) == 0.2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"start": -0.1}, ValueError, r"start=-0.1 is out of range: allowed \[0, 1\]"),
        ({"start": 1.5}, ValueError, r"start=1.5 is out of range: allowed \[0, 1\]"),
        ({"start": -1, "start_unit": "step"}, ValueError, r"start=-1 is out of range"),
        ({"start": 2.5, "start_unit": "epoch"}, TypeError, r"start=2.5 must be an int"),
        ({"start_unit": "batch"}, ValueError, r"start_unit='batch' is not allowed; choose one of 'fraction'"),
        ({"every": 0}, ValueError, r"every=0 is out of range"),
        ({"every": 1.5}, TypeError, r"every=1.5 must be an int"),
        ({"every_unit": "batch"}, ValueError, r"every_unit='batch' is not allowed; choose one of 'step', 'epoch'"),
    ],
)
def test_bad_input(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SWA(**kwargs)


def test_rule_pickles_compares_equal_and_has_a_compact_repr() -> None:
    rule = SWA(start=100, start_unit="step", every=10, every_unit="step")
    copy = pickle.loads(pickle.dumps(rule))
    assert copy == rule and hash(copy) == hash(rule)
    assert copy != SWA(start=100, start_unit="step", every=11, every_unit="step")
    assert isinstance(rule, Rule)
    assert repr(SWA()) == "SWA()"
    assert repr(SWA(start=0.5)) == "SWA(start=0.5)"
    assert eval(repr(rule), {"SWA": SWA}) == rule


@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_whole_float_start_is_a_count(unit: str) -> None:
    """Hydra writes ``averaging.start=2`` into a float field: 2.0 must mean step/epoch 2, not an error."""
    rule = SWA(start=2.0, start_unit=unit)  # type: ignore[arg-type]
    assert rule.start == 2 and isinstance(rule.start, int)
    assert rule == SWA(start=2, start_unit=unit)  # type: ignore[arg-type]
