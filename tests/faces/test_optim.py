"""weightavg.optim: the optimizer-wrapper face for plain training loops."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import weightavg.optim


def mlp(seed: int = 0, batchnorm: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2000 + step)
    return torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def loss_at(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return nn.functional.cross_entropy(model(x), y)


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)


# ---------------------------------------------------------------------------------------------- optimizer plumbing
def test_param_groups_and_state_are_shared_with_the_inner_optimizer() -> None:
    model = mlp()
    inner = sgd(model)
    opt = weightavg.optim.EMA(inner, decay=0.9, warmup="none")
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state

    on_wrapper = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        loss_at(model, 0).backward()
        opt.step()
        on_wrapper.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.15)
    assert all("momentum_buffer" in inner.state[p] for p in model.parameters())

    inner.param_groups[0]["lr"] = 0.7
    assert opt.param_groups[0]["lr"] == 0.7
    # A scheduler on the inner optimizer acts on the wrapper's groups too (from the shared initial_lr, 0.3).
    assert opt.param_groups[0]["initial_lr"] == 0.3
    on_inner = torch.optim.lr_scheduler.LambdaLR(inner, lambda epoch: 0.1 ** (epoch + 1))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.03)
    loss_at(model, 1).backward()
    opt.step()
    on_inner.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.003)


def test_zero_grad_closure_and_add_param_group() -> None:
    model = mlp()
    opt = weightavg.optim.EMA(sgd(model), decay=0.9)
    loss_at(model, 0).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_at(model, 1)
        loss.backward()
        return loss

    before = model[0].weight.detach().clone()
    loss = opt.step(closure)
    assert torch.equal(loss, loss_at(mlp(), 1))
    assert not torch.equal(model[0].weight, before)
    assert opt.averager.step_count == 1
    with pytest.raises(NotImplementedError, match=r"add the parameter group to the inner optimizer"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer, got list"):
        weightavg.optim.EMA(list(model.parameters()), decay=0.9, warmup="none")  # type: ignore[arg-type]
    assert repr(opt).startswith("EMA(EMA(decay=0.9), SGD (")


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, on_step: object = None) -> None:
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss_at(model, step).backward()
        nn.utils.clip_grad_norm_(params, max_norm=0.5)
        optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step()  # type: ignore[operator]


def test_trajectory_equals_plain_sgd_with_a_float64_hand_ema() -> None:
    decay, steps = 0.9, 40
    plain_model = mlp()
    plain = sgd(plain_model)
    hand = {name: p.detach().double().clone() for name, p in plain_model.named_parameters()}

    def hand_ema() -> None:
        for name, p in plain_model.named_parameters():
            hand[name] = decay * hand[name] + (1 - decay) * p.detach().double()

    train(plain_model, plain, steps, hand_ema)

    model = mlp()
    wrapped = weightavg.optim.EMA(sgd(model), decay=decay, warmup="none", module=model, buffers="ignore")
    train(model, wrapped, steps)

    for name, p in model.named_parameters():
        assert torch.equal(p, plain_model.get_parameter(name)), "the wrapper must not change training"
    averaged = wrapped.averager.averaged_tensors()
    assert set(averaged) == set(hand)
    for name, exact in hand.items():
        torch.testing.assert_close(averaged[name].double(), exact, rtol=1e-5, atol=1e-6)


def test_without_module_parameters_are_named_by_position() -> None:
    model = mlp(batchnorm=False)
    opt = weightavg.optim.EMA(sgd(model), decay=0.5, warmup="none")
    assert opt.averager.names == ["0", "1", "2", "3"]
    assert [t.data_ptr() for t in opt.averager.live_tensors().values()] == [p.data_ptr() for p in model.parameters()]


# ---------------------------------------------------------------------------------------------- averaged weights
def test_averaged_evaluates_the_average_and_restores_live() -> None:
    model = mlp()
    opt = weightavg.optim.EMA(sgd(model), decay=0.8, warmup="none", module=model)
    train(model, opt, 5)
    model.eval()
    x = batch(0)[0]
    live = {name: t.clone() for name, t in model.state_dict().items()}
    expected = torch.func.functional_call(copy.deepcopy(model), opt.averager.averaged_tensors(), (x,))
    with opt.averaged():
        output = model(x)
    assert torch.equal(output, expected)
    assert not torch.equal(output, model(x))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, live[name])


def test_averaged_before_the_first_update_warns_and_uses_live_weights() -> None:
    model = mlp()
    opt = weightavg.optim.EMA(sgd(model), decay=0.8, warmup="none", start_step=5)
    train(model, opt, 2)
    live = model[0].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"no averaging update has happened yet"), opt.averaged():
        assert torch.equal(model[0].weight, live)


def test_module_includes_buffers_under_state_dict_names() -> None:
    decay = 0.7
    model = mlp()
    opt = weightavg.optim.EMA(sgd(model), decay=decay, warmup="none", module=model)
    assert set(opt.averager.names) == set(model.state_dict())
    hand = {name: t.double().clone() for name, t in model.state_dict().items() if t.is_floating_point()}

    def hand_ema() -> None:
        for name, t in model.state_dict().items():
            if name in hand:
                hand[name] = decay * hand[name] + (1 - decay) * t.double()

    model.train()
    train(model, opt, 12, hand_ema)
    averaged = opt.averager.averaged_tensors()
    for name in ("1.running_mean", "1.running_var", "0.weight"):
        torch.testing.assert_close(averaged[name].double(), hand[name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(averaged["1.running_mean"], model[1].running_mean)
    assert torch.equal(averaged["1.num_batches_tracked"], model[1].num_batches_tracked)


def test_update_bn_equals_torch_update_bn_on_a_copy_with_the_average() -> None:
    model = mlp()
    opt = weightavg.optim.SWA(sgd(model), start=3, start_unit="step", module=model)
    train(model, opt, 10)
    loader = [batch(100 + i) for i in range(3)]  # (x, y) batches: update_bn feeds batch[0]
    reference = copy.deepcopy(model)
    reference.load_state_dict(opt.averager.averaged_tensors())
    torch.optim.swa_utils.update_bn(loader, reference)
    opt.update_bn(loader, model)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(opt.averager.averaged_tensors()[name], tensor), name


def test_copy_to_model_and_save_averaged(tmp_path: Path) -> None:
    model = mlp()
    opt = weightavg.optim.EMA(sgd(model), decay=0.8, warmup="none", module=model)
    train(model, opt, 4)
    opt.save_averaged(str(tmp_path / "ema.safetensors"))
    on_disk = load_file(tmp_path / "ema.safetensors")
    opt.copy_to_model()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, opt.averager.averaged_tensors()[name])
        assert torch.equal(on_disk[name], tensor)


# ---------------------------------------------------------------------------------------------- SWA
def test_swa_per_epoch() -> None:
    steps_per_epoch, epochs = 3, 5
    model = mlp(batchnorm=False)
    opt = weightavg.optim.SWA(sgd(model), start=2, start_unit="epoch", every_unit="epoch")
    assert not opt.averager.has_average
    samples = []
    step = 0
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            step += 1
            opt.zero_grad()
            loss_at(model, step).backward()
            opt.step()
        assert opt.epoch_end() == (epoch >= 2)
        if epoch >= 2:
            samples.append([p.detach().double().clone() for p in model.parameters()])
    assert opt.averager.num_updates == len(samples) == 4
    for index, tensor in enumerate(opt.averager.averaged_tensors().values()):
        mean = torch.stack([sample[index] for sample in samples]).mean(0)
        torch.testing.assert_close(tensor.double(), mean, rtol=1e-6, atol=1e-7)


def test_swa_fraction_needs_total_steps() -> None:
    model = mlp()
    with pytest.raises(ValueError, match=r"pass total_steps="):
        weightavg.optim.SWA(sgd(model), start=0.5)
    opt = weightavg.optim.SWA(sgd(model), start=0.5, total_steps=10)
    train(model, opt, 10)
    assert opt.averager.num_updates == 6  # steps 5..10


# ---------------------------------------------------------------------------------------------- state
def run(
    total: int, resume_at: int | None, scheduler: bool = False
) -> tuple[nn.Module, weightavg.optim.AveragingOptimizer]:
    def build(seed: int) -> tuple[nn.Module, weightavg.optim.AveragingOptimizer, object]:
        model = mlp(seed)
        opt = weightavg.optim.EMA(sgd(model), decay=0.9, warmup="power", every_n_steps=2, module=model)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5) if scheduler else None

    model, opt, lr_scheduler = build(seed=0)
    for step in range(1, total + 1):
        opt.zero_grad()
        loss_at(model, step).backward()
        opt.step()
        if lr_scheduler is not None:
            lr_scheduler.step()  # type: ignore[attr-defined]
        if step == resume_at:
            buffer = io.BytesIO()
            state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            if lr_scheduler is not None:
                state["scheduler"] = lr_scheduler.state_dict()  # type: ignore[attr-defined]
            torch.save(state, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer)
            model, opt, lr_scheduler = build(seed=1)
            opt.load_state_dict(loaded["optimizer"])
            model.load_state_dict(loaded["model"])
            if lr_scheduler is not None:
                lr_scheduler.load_state_dict(loaded["scheduler"])  # type: ignore[attr-defined]
    return model, opt


@pytest.mark.parametrize(
    ("resume_at", "scheduler"),
    [(3, False), (8, False), (8, True)],
    ids=["early", "late", "late-with-lr-scheduler"],
)
def test_state_dict_round_trip_continues_bit_identically(resume_at: int, scheduler: bool) -> None:
    straight_model, straight = run(15, resume_at=None, scheduler=scheduler)
    resumed_model, resumed = run(15, resume_at=resume_at, scheduler=scheduler)
    for name, tensor in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], tensor), name
    for name, tensor in straight.averager.averaged_tensors().items():
        assert torch.equal(resumed.averager.averaged_tensors()[name], tensor), name
    assert resumed.averager.num_updates == straight.averager.num_updates
    assert resumed.averager.step_count == straight.averager.step_count == 15


def test_groups_and_state_stay_shared_after_load_state_dict() -> None:
    model = mlp()
    inner = sgd(model)
    opt = weightavg.optim.EMA(inner, decay=0.9, warmup="none")
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state


def test_load_state_dict_with_wrong_keys() -> None:
    model = mlp()
    opt = weightavg.optim.EMA(sgd(model), decay=0.9, warmup="none")
    expected = r"EMA.state_dict\(\) \(keys \['averaging', 'optimizer'\]\), got keys \['optimizer'\]"
    with pytest.raises(ValueError, match=expected):
        opt.load_state_dict({"optimizer": opt.optimizer.state_dict()})
    with pytest.raises(ValueError, match=r"got keys \['param_groups', 'state'\]"):
        opt.load_state_dict(opt.optimizer.state_dict())  # the inner optimizer's state alone
    named = weightavg.optim.EMA(sgd(model), decay=0.9, module=model).state_dict()  # names from the module
    with pytest.raises(ValueError, match=r"missing keys \['0', '1', .*unexpected keys \['0.weight', '0.bias'"):
        opt.load_state_dict(named)


def test_refused_state_leaves_the_optimizer_untouched() -> None:
    model = mlp()
    opt = weightavg.optim.EMA(sgd(model), decay=0.9, warmup="none")
    named = weightavg.optim.EMA(torch.optim.SGD(model.parameters(), lr=0.05), decay=0.9, module=model).state_dict()
    with pytest.raises(ValueError, match=r"missing keys"):
        opt.load_state_dict(named)
    assert opt.optimizer.param_groups[0]["lr"] == 0.3


@pytest.mark.slow
def test_works_without_importing_lightning() -> None:
    code = """
import sys
import torch
import weightavg.optim
model = torch.nn.Linear(3, 1)
opt = weightavg.optim.EMA(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.9, warmup="none", module=model)
for _ in range(3):
    opt.zero_grad()
    model(torch.ones(4, 3)).pow(2).mean().backward()
    opt.step()
with opt.averaged():
    model(torch.ones(1, 3))
loaded = sorted(name for name in sys.modules if "lightning" in name)
assert not loaded, loaded
print("averaged", opt.averager.num_updates)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "averaged 4"


def test_nonfinite_policy_reaches_the_engine_and_skips_the_bad_step() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = weightavg.optim.EMA(torch.optim.SGD(model.parameters(), lr=0.0), decay=0.5, nonfinite="skip")
    before = {k: v.clone() for k, v in opt.averager.averaged_tensors().items()}
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    opt.step()
    for name, tensor in opt.averager.averaged_tensors().items():
        assert torch.equal(tensor, before[name]), name
    with pytest.raises(ValueError, match=r"nonfinite='drop'"):
        weightavg.optim.EMA(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="drop")


def test_swa_without_a_start_averages_from_the_first_step_like_averaged_model() -> None:
    """``optim.SWA(opt)`` needs no ``start``: it matches torch's ``AveragedModel`` updated after every step."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    reference = torch.optim.swa_utils.AveragedModel(model)  # copies the weights; first update_parameters copies
    opt = weightavg.optim.SWA(torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(5):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        reference.update_parameters(model)
    with opt.averaged():
        ours = {k: v.clone() for k, v in model.state_dict().items()}
    for key, value in reference.module.state_dict().items():
        torch.testing.assert_close(ours[key], value)


def test_wrapper_refuses_another_methods_state_and_warns_on_changed_settings() -> None:
    from weightavg import optim as wrappers

    model = nn.Linear(3, 2)
    ema = wrappers.EMA(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.9)
    model(torch.ones(1, 3)).sum().backward()
    ema.step()
    state = ema.state_dict()
    swa = wrappers.SWA(torch.optim.SGD(model.parameters(), lr=0.1), start=0, start_unit="step")
    with pytest.raises(ValueError, match=r"saved by EMA\(decay=0.9\) and cannot continue as SWA"):
        swa.load_state_dict(state)
    other = wrappers.EMA(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.99)
    with pytest.warns(UserWarning, match=r"EMA\(decay=0.9\).*EMA\(decay=0.99\)"):
        other.load_state_dict(state)


def test_include_pattern_matching_nothing_is_refused_at_construction() -> None:
    model = mlp()
    with pytest.raises(ValueError, match=r"include=\['2.\*'\]: pattern '2.\*' matches no .*'0.weight'"):
        weightavg.optim.EMA(sgd(model), module=model, include="2.*")  # the head is "3.*"
    averaged = weightavg.optim.EMA(sgd(model), module=model, include="3.*")
    assert averaged.averager.names == ["3.weight", "3.bias"]


def test_model_converted_after_wrapping_is_refused_at_the_next_step_and_swap() -> None:
    model = mlp(batchnorm=False)
    optimizer = weightavg.optim.EMA(sgd(model), module=model)
    loss_at(model, 0).backward()
    optimizer.step()
    model.double()
    with pytest.raises(RuntimeError, match=r"'0.weight' changed after the averager was built"), optimizer.averaged():
        pass
    with pytest.raises(RuntimeError, match=r"'0.weight' changed after the averager was built"):
        optimizer.step()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_model_averages_swaps_and_exports_under_plain_names(tmp_path: Path, backend: str) -> None:
    """``torch.compile(model)`` in a loop: the average equals the EMA rule written out over the live weights; inside
    ``averaged()`` the compiled forward computes with the average (no stale graph, no recompilation); the export
    has the plain names and loads into the uncompiled architecture; the state resumes into an uncompiled run."""
    from torch._dynamo.utils import counters

    net = mlp(batchnorm=False)
    model = torch.compile(net, backend=backend)
    opt = weightavg.optim.EMA(torch.optim.SGD(model.parameters(), lr=0.1), module=model, decay=0.5, warmup="none")
    expected = {k: v.detach().double().clone() for k, v in net.state_dict().items()}
    for step in range(6):
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        for name, value in net.state_dict().items():
            expected[name] = 0.5 * expected[name] + 0.5 * value.double()
    average = opt.averager.averaged_tensors()
    assert sorted(average) == sorted(expected)  # "0.weight", not "_orig_mod.0.weight"
    for name, value in expected.items():
        torch.testing.assert_close(average[name].double(), value, rtol=1e-6, atol=1e-7)
    plain = mlp(seed=1, batchnorm=False)
    opt.averager.save(tmp_path / "ema.safetensors")
    plain.load_state_dict(load_file(str(tmp_path / "ema.safetensors")))  # torch's strict load
    x, _ = batch(99)
    with torch.no_grad():
        model(x)  # the no-grad graph, compiled once
        graphs = counters["stats"]["unique_graphs"]
        with opt.averaged():
            swapped = model(x)
        live = model(x)
    torch.testing.assert_close(swapped, plain(x).detach())
    assert not torch.allclose(live, swapped)
    assert counters["stats"]["unique_graphs"] == graphs  # swapping recompiled nothing
    resumed = mlp(seed=2, batchnorm=False)
    other = weightavg.optim.EMA(torch.optim.SGD(resumed.parameters(), lr=0.1), module=resumed, decay=0.5, warmup="none")
    other.load_state_dict(opt.state_dict())
    for name, value in average.items():
        assert torch.equal(other.averager.averaged_tensors()[name], value)
