"""weightavg.methods.zscl: the weight-ensemble rule through a real Averager against the paper's loop in float64,
the distillation loss against its formula, the Distillation teacher and reference stream, and the continual-learning
metrics against hand-written loops."""

from __future__ import annotations

import copy
import io
import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from weightavg import Averager
from weightavg.core.rule import Clock
from weightavg.methods.zscl import ZSCL, Distillation, continual_metrics, kd_loss


def bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def float64_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: t.detach().clone().double() if t.is_floating_point() else t.detach().clone()
        for name, t in model.state_dict().items()
    }


@torch.no_grad()
def optimizer_step(model: nn.Module, generator: torch.Generator) -> None:
    """Stand-in for an optimizer step: new live values for every state tensor (BatchNorm counts one batch)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            tensor.copy_(values.abs() + 0.1 if name.endswith("running_var") else values)
        else:
            tensor.add_(1)


def paper_loop(model: nn.Module, averager: Averager | None, steps: int, interval: int, seed: int) -> dict:
    """ZSCL's loop (official code) in float64, driving ``averager`` alongside with the same live weights."""
    generator = torch.Generator().manual_seed(seed)
    theta_hat = float64_state(model)  # task start: a copy
    n = 0
    for i in range(steps):
        optimizer_step(model, generator)
        merged = averager.step() if averager is not None else None
        theta = float64_state(model)
        if i % interval == 0:
            n += 1
            theta_hat = {
                name: (n * theta_hat[name] + theta[name]) / (n + 1) if theta[name].is_floating_point() else theta[name]
                for name in theta
            }
        assert merged is None or merged == (i % interval == 0), i
    return theta_hat


def assert_average(averager: Averager, expected: dict[str, torch.Tensor]) -> None:
    averaged = averager.averaged_tensors()
    assert set(averaged) == set(expected)
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(averaged[name].double(), value, rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(averaged[name], value), name


# ---------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("interval", [1, 3, 10])
@pytest.mark.parametrize("steps", [1, 2, 12, 31])
def test_weight_ensemble_matches_the_papers_loop(interval: int, steps: int) -> None:
    model = bn_net(0)
    averager = Averager(model, ZSCL(every_n_steps=interval))
    expected = paper_loop(model, averager, steps, interval, seed=steps)
    assert_average(averager, expected)
    assert averager.num_updates == 1 + len(range(0, steps, interval))
    # The live weights were never touched by the ensemble.
    generator = torch.Generator().manual_seed(steps)
    reference = bn_net(0)
    for _ in range(steps):
        optimizer_step(reference, generator)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_second_task_starts_from_the_ensemble() -> None:
    model = bn_net(0)
    averager = Averager(model, ZSCL(every_n_steps=3))
    expected_first = paper_loop(model, averager, 8, 3, seed=1)
    averager.copy_to_model()  # the task ends with the ensemble, and the next one starts from it
    assert_average(averager, expected_first)
    second = Averager(model, ZSCL(every_n_steps=3))
    expected_second = paper_loop(model, second, 7, 3, seed=2)
    assert_average(second, expected_second)
    # The reference above restarted from the first task's ensemble, not from the first task's live weights.
    assert not torch.allclose(expected_first["0.weight"], float64_state(bn_net(0))["0.weight"])


@pytest.mark.parametrize("interval, stride", [(4, 2), (3, 2), (2, 2), (5, 3)])
def test_jumping_step_counter_keeps_the_interval_in_elapsed_steps(interval: int, stride: int) -> None:
    model = bn_net(0)
    averager = Averager(model, ZSCL(every_n_steps=interval))
    generator = torch.Generator().manual_seed(7)
    theta_hat, n = float64_state(model), 0
    last_merge: int | None = None
    merges = []
    for call in range(1, 16):
        optimizer_step(model, generator)
        step = stride * call  # e.g. two optimizers each counting a step per batch
        merged = averager.step(step=step)
        # The first step merges; then a merge whenever `interval` steps have passed since the last one.
        due = last_merge is None or step - last_merge >= interval
        assert merged == due, step
        if due:
            merges.append(step)
            last_merge = step
            n += 1
            theta = float64_state(model)
            theta_hat = {
                name: (n * theta_hat[name] + theta[name]) / (n + 1) if theta[name].is_floating_point() else theta[name]
                for name in theta
            }
    assert_average(averager, theta_hat)
    gaps = {b - a for a, b in itertools.pairwise(merges)}
    assert gaps == {stride * math.ceil(interval / stride)}


def test_rule_weights_and_argument_check() -> None:
    rule = ZSCL(every_n_steps=2)
    assert rule.weight("bind", Clock(0, 0), 0) == 1.0
    assert rule.weight("epoch", Clock(5, 1), 3) is None
    assert rule.weight("step", Clock(1, 0, last_update_step=0), 1) == 0.5
    assert rule.weight("step", Clock(2, 0, last_update_step=1), 2) is None
    assert rule.weight("step", Clock(3, 0, last_update_step=1), 2) == pytest.approx(1 / 3)
    assert "every_n_steps=2" in repr(rule)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="every_n_steps"):
            ZSCL(every_n_steps=bad)
    with pytest.raises(TypeError, match="every_n_steps"):
        ZSCL(every_n_steps=2.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- kd_loss
def kd_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of sum_k -softmax(t/T)_k * log_softmax(s/T)_k, written out in float64."""
    s = student.double().reshape(-1, student.shape[-1]) / temperature
    t = teacher.double().reshape(-1, teacher.shape[-1]) / temperature
    total = torch.zeros((), dtype=torch.float64)
    for row in range(s.shape[0]):
        p = torch.exp(t[row]) / torch.exp(t[row]).sum()
        log_q = s[row] - torch.log(torch.exp(s[row]).sum())
        total = total + (-(p * log_q)).sum()
    return temperature**2 * total / s.shape[0]


@pytest.mark.parametrize("shape", [(5, 4), (3, 6, 7), (1, 2)])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_loss_matches_the_formula(shape: tuple[int, ...], temperature: float) -> None:
    generator = torch.Generator().manual_seed(len(shape) * 10 + int(temperature * 4))
    student = torch.randn(shape, generator=generator) * 3
    teacher = torch.randn(shape, generator=generator) * 3
    loss = kd_loss(student, teacher, temperature)
    assert loss.shape == ()
    torch.testing.assert_close(loss.double(), kd_reference(student, teacher, temperature), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 4)])
def test_kd_loss_gradient_is_the_gradient_of_the_kl_divergence(shape: tuple[int, ...]) -> None:
    temperature = 2.0
    generator = torch.Generator().manual_seed(3)
    student = (torch.randn(shape, generator=generator) * 2).requires_grad_()
    teacher = (torch.randn(shape, generator=generator) * 2).requires_grad_()
    kd_loss(student, teacher, temperature).backward()
    assert teacher.grad is None, "the teacher carries no gradient"

    student64 = student.detach().double().requires_grad_()
    p = torch.softmax(teacher.detach().double() / temperature, dim=-1)
    log_q = torch.log_softmax(student64 / temperature, dim=-1)
    kl = (p * (torch.log(p) - log_q)).sum(-1).mean() * temperature**2
    kl.backward()
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=1e-5, atol=1e-7)


def test_kd_loss_errors() -> None:
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        kd_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError):
        kd_loss(torch.zeros(2, 3, 4), torch.zeros(6, 4))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), bad)


# ---------------------------------------------------------------------------------------------- Distillation
def stochastic_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def plain_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def inputs(count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 4, generator=generator) for _ in range(count)]


@torch.no_grad()
def train_a_little(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator)
            tensor.add_(noise.abs() if name.endswith("running_var") else noise)
        else:
            tensor.add_(4)


def test_teacher_is_the_original_module_in_eval_mode() -> None:
    model = stochastic_net(0)
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    distillation = Distillation(inputs())
    distillation.bind(model)
    original = copy.deepcopy(model).eval()
    train_a_little(model, seed=1)
    model.train()
    stats = {name: t.clone() for name, t in model.state_dict().items() if "running" in name or "num_batches" in name}

    x = torch.randn(6, 4)
    first = distillation.teacher_outputs(x)
    second = distillation.teacher_outputs(x)
    assert not first.requires_grad
    torch.testing.assert_close(first, original(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(first, second), "the teacher runs without dropout"
    assert model.training and all(m.training for m in model.modules())
    for name, value in stats.items():
        assert torch.equal(model.state_dict()[name], value), f"{name} moved under teacher calls"
    with torch.no_grad():
        assert not torch.allclose(model.eval()(x), first)


def test_loss_is_weighted_kd_against_the_teacher_on_the_next_batch() -> None:
    model = plain_net(0)
    batches = inputs(3)
    distillation = Distillation(batches, weight=5.0, temperature=2.0)
    distillation.bind(model)
    original = copy.deepcopy(model)
    train_a_little(model, seed=1)
    for call in range(7):
        x = batches[call % 3]
        expected = 5.0 * kd_reference(model(x), original(x), 2.0)
        model.zero_grad()
        loss = distillation.loss()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert distillation.consumed == 7


def test_reference_batches_cycle_in_order() -> None:
    x = torch.randn(10, 4)
    loader = DataLoader(TensorDataset(x, torch.arange(10)), batch_size=4)  # batches of 4, 4, 2
    distillation = Distillation(loader)
    seen = [distillation.next_inputs() for _ in range(8)]
    expected = [x[0:4], x[4:8], x[8:10]] * 3
    for got, want in zip(seen, expected, strict=False):
        assert torch.equal(got, want)
    # transfer applies to the whole batch before the inputs are picked.
    doubled = distillation.next_inputs(lambda batch: [batch[0] * 2, batch[1]])
    assert torch.equal(doubled, expected[8] * 2)
    custom = Distillation(loader, reference_input=lambda batch: batch[1])
    assert torch.equal(custom.next_inputs(), torch.arange(4))


class Reiterable:
    """A re-iterable without ``len`` (a streaming source)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)


class Stream(IterableDataset):
    """A streaming dataset (no ``len``), the usual source of a DataLoader over unlabeled data."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.rows = torch.cat(batches)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.rows)


def reference_of(kind: str, batches: list[torch.Tensor]) -> object:
    """The same batches of 5 as a list, a map-style loader, a re-iterable without len, or a streaming loader."""
    if kind == "list":
        return batches
    if kind == "loader":
        return DataLoader(TensorDataset(torch.cat(batches)), batch_size=5)
    if kind == "unsized":
        return Reiterable(batches)
    return DataLoader(Stream(batches), batch_size=5)


@pytest.mark.parametrize("kind", ["list", "loader", "unsized", "stream"])
def test_reference_sources_are_cycled(kind: str) -> None:
    batches = inputs(3, seed=5)
    distillation = Distillation(reference_of(kind, batches))  # type: ignore[arg-type]
    distillation.bind(plain_net(0))
    for call in range(7):
        assert torch.equal(distillation.next_inputs(), batches[call % 3]), call


@pytest.mark.parametrize("kind", ["list", "loader", "unsized", "stream"])
@pytest.mark.parametrize("consumed", [2, 4, 7])
def test_state_round_trip_resumes_at_the_same_next_batch(kind: str, consumed: int) -> None:
    batches = inputs(3, seed=5)
    reference = reference_of(kind, batches)
    model = plain_net(0)
    original = Distillation(reference, weight=2.0)  # type: ignore[arg-type]
    original.bind(model)
    train_a_little(model, seed=1)
    for _ in range(consumed):
        original.next_inputs()
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed_model = copy.deepcopy(model)  # the resumed run's model holds the trained weights, not the teacher's
    resumed = Distillation(reference, weight=2.0)  # type: ignore[arg-type]
    resumed.bind(resumed_model)
    resumed.load_state_dict(state)
    assert resumed.consumed == consumed
    for call in range(5):
        expected_batch = batches[(consumed + call) % 3]
        loss = original.loss()
        torch.testing.assert_close(resumed.loss(), loss, rtol=0, atol=0)
        x = expected_batch
        torch.testing.assert_close(
            loss.double(), 2.0 * kd_reference(model(x), plain_net(0)(x), 2.0), rtol=1e-5, atol=1e-6, msg=f"call {call}"
        )


def test_bad_reference_raises_type_error() -> None:
    batches = inputs(2)
    for bad in (iter(batches), (b for b in batches), torch.randn(3, 4), "abc", 5):
        with pytest.raises(TypeError, match="reference"):
            Distillation(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight"):
        Distillation(batches, weight=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        Distillation(batches, temperature=0.0)


def test_unbound_and_empty_reference_errors() -> None:
    distillation = Distillation(inputs(2))
    with pytest.raises(RuntimeError, match="bind"):
        distillation.teacher_outputs(torch.zeros(1, 4))
    with pytest.raises(RuntimeError, match="bind"):
        distillation.state_dict()
    empty = Distillation([])
    empty.bind(plain_net(0))
    with pytest.raises(ValueError, match="no batches"):
        empty.next_inputs()


@pytest.mark.parametrize("source", ["state_dict", "module", "path"])
def test_bind_with_given_teacher_weights(source: str, tmp_path: Path) -> None:
    model = plain_net(0)
    teacher = plain_net(1)
    if source == "state_dict":
        given: object = {**teacher.state_dict(), "unused.weight": torch.zeros(2)}
    elif source == "module":
        given = teacher
    else:
        given = tmp_path / "teacher.pt"
        torch.save(teacher.state_dict(), given)
    distillation = Distillation(inputs())
    distillation.bind(model, given)  # type: ignore[arg-type]
    x = torch.randn(4, 4)
    with torch.no_grad():
        torch.testing.assert_close(distillation.teacher_outputs(x), teacher(x), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(distillation.teacher_outputs(x), model(x))


def test_bind_with_teacher_missing_a_key_names_it() -> None:
    state = plain_net(1).state_dict()
    del state["2.bias"]
    with pytest.raises(ValueError, match=r"teacher.*2\.bias"):
        Distillation(inputs()).bind(plain_net(0), state)


def test_rebinding_to_a_new_module_object_keeps_the_first_teacher() -> None:
    model = plain_net(0)
    original = copy.deepcopy(model)
    distillation = Distillation(inputs())
    distillation.bind(model)
    train_a_little(model, seed=1)
    restored = copy.deepcopy(model)  # e.g. a new task's model object holding the trained weights
    distillation.bind(restored)
    distillation.bind(restored, plain_net(2).state_dict())  # a source is ignored once a teacher is taken
    x = torch.randn(4, 4)
    with torch.no_grad():
        torch.testing.assert_close(distillation.teacher_outputs(x), original(x), rtol=1e-6, atol=1e-6)
    # The student is the new module object.
    train_a_little(restored, seed=2)
    with torch.no_grad():
        x = inputs(3)[0]
        expected = kd_reference(restored(x), original(x), 2.0)
    torch.testing.assert_close(distillation.loss().double(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- metrics
def test_continual_metrics_match_hand_written_loops() -> None:
    generator = torch.Generator().manual_seed(0)
    matrix = (torch.rand(4, 4, generator=generator, dtype=torch.float64) * 100).tolist()
    tasks = 4
    transfers = []
    for task in range(1, tasks):
        before = [matrix[stage][task] for stage in range(task)]
        transfers.append(sum(before) / len(before))
    transfer = sum(transfers) / len(transfers)
    avg = sum(matrix[s][t] for s in range(tasks) for t in range(tasks)) / tasks**2
    last = sum(matrix[-1]) / tasks

    result = continual_metrics(matrix)
    assert result.transfer == pytest.approx(transfer, rel=1e-12)
    assert result.avg == pytest.approx(avg, rel=1e-12)
    assert result.last == pytest.approx(last, rel=1e-12)
    from_tensor = continual_metrics(torch.tensor(matrix, dtype=torch.float32))
    assert from_tensor.transfer == pytest.approx(transfer, rel=1e-6)


def test_continual_metrics_errors_and_one_task() -> None:
    for bad in ([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [1.0, 2.0], [], [[]]):
        with pytest.raises(ValueError, match="square"):
            continual_metrics(bad)
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN"):
            continual_metrics([[1.0, value], [3.0, 4.0]])
    one = continual_metrics([[80.0]])
    assert math.isnan(one.transfer) and one.avg == 80.0 and one.last == 80.0
