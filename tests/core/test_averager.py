"""weightavg.core.averager: updates against float64 loops and torch.optim.swa_utils, swaps, state and resume."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from weightavg import EMA, SWA, Averager
from weightavg.methods.swa import update_bn


def mlp(seed: int = 0, batchnorm: bool = False, hidden: int = 8) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.Tanh(), nn.Linear(hidden, 3)]
    return nn.Sequential(*layers)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    x, y = batch(step)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


@torch.no_grad()
def drift(model: nn.Module, seed: int) -> None:
    """Move every state tensor of the model (any dtype) as a training step would."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator)
            tensor.add_((noise.abs() if name.endswith("running_var") else noise).to(tensor.dtype))
        else:
            tensor.add_(1)


def drifted(model_dtype: torch.dtype = torch.float32, steps: int = 3, **engine: object) -> tuple[nn.Module, Averager]:
    model = mlp(0, batchnorm=True).to(model_dtype)
    averager = Averager(model, EMA(decay=0.5, warmup="none"), **engine)  # type: ignore[arg-type]
    for step in range(1, steps + 1):
        drift(model, seed=step)
        averager.step()
    drift(model, seed=99)  # live weights differ from the average
    return model, averager


def snapshot(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {name: (t.data_ptr(), t.clone()) for name, t in model.state_dict().items()}


def assert_restored(model: nn.Module, before: dict[str, tuple[int, torch.Tensor]]) -> None:
    for name, tensor in model.state_dict().items():
        pointer, values = before[name]
        assert tensor.data_ptr() == pointer, f"{name}: live storage not restored"
        assert torch.equal(tensor, values), f"{name}: live values changed"


# ---------------------------------------------------------------------------------------------- update math
def test_ema_trajectory_matches_float64_loop_and_torch_averaged_model() -> None:
    decay = 0.95
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    averager = Averager(model, EMA(decay=decay, warmup="none"))
    torch_ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    torch_ema.update_parameters(model)  # torch's first update copies, as binding does here
    reference = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    for step in range(1, 301):
        train_step(model, optimizer, step)
        assert averager.step()
        torch_ema.update_parameters(model)
        for name, p in model.named_parameters():
            reference[name] = decay * reference[name] + (1 - decay) * p.detach().double()

    averaged = averager.averaged_tensors()
    torch_averaged = dict(torch_ema.module.named_parameters())
    assert set(averaged) == set(reference)
    for name, exact in reference.items():
        assert averaged[name].dtype == torch.float32
        torch.testing.assert_close(averaged[name].double(), exact, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(averaged[name], torch_averaged[name].detach())
        assert not torch.allclose(averaged[name], model.get_parameter(name)), "average must differ from live"
    assert averager.num_updates == 301


def test_swa_equals_running_mean_of_samples_and_torch_averaged_model() -> None:
    start, every = 10, 5
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    averager = Averager(model, SWA(start=start, start_unit="step", every=every, every_unit="step"))
    torch_swa = AveragedModel(model)
    samples: list[dict[str, torch.Tensor]] = []
    for step in range(1, 61):
        train_step(model, optimizer, step)
        sampled = averager.step()
        assert sampled == (step >= start and step % every == 0)
        if sampled:
            torch_swa.update_parameters(model)
            samples.append({name: p.detach().double().clone() for name, p in model.named_parameters()})

    assert averager.num_updates == len(samples) == 11
    averaged = averager.averaged_tensors()
    torch_averaged = dict(torch_swa.module.named_parameters())
    for name in samples[0]:
        mean = torch.stack([sample[name] for sample in samples]).mean(0)
        torch.testing.assert_close(averaged[name].double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(averaged[name], torch_averaged[name].detach())


def bf16_anchor_run(dtype: torch.dtype | None) -> tuple[Averager, float]:
    """ANCHORS.md: parameter = bf16(p0 + 1e-3 t), t = 1..1000, decay 0.9999, p0 = 1.0."""
    decay, p0, steps = 0.9999, 1.0, 1000
    parameter = nn.Parameter(torch.full((8,), p0, dtype=torch.bfloat16))
    averager = Averager([parameter], EMA(decay=decay, warmup="none"), dtype=dtype)
    held = [p0]
    for t in range(1, steps + 1):
        with torch.no_grad():
            parameter.copy_(torch.full((8,), p0 + 1e-3 * t, dtype=torch.float64))
        held.append(float(parameter.detach()[0]))
        averager.step()
    # Closed form of the EMA of what the model held, in float64: d^T x_0 + sum_t (1 - d) d^(T - t) x_t.
    exact = decay**steps * held[0] + sum((1 - decay) * decay ** (steps - t) * held[t] for t in range(1, steps + 1))
    return averager, exact


def test_fp32_average_of_bf16_model_moves_where_bf16_average_stalls() -> None:
    fp32, exact = bf16_anchor_run(dtype=None)
    bf16, _ = bf16_anchor_run(dtype=torch.bfloat16)
    float64, _ = bf16_anchor_run(dtype=torch.float64)
    assert exact > 1.04
    (fp32_avg,) = fp32.averaged_tensors().values()
    (bf16_avg,) = bf16.averaged_tensors().values()
    (float64_avg,) = float64.averaged_tensors().values()
    assert fp32_avg.dtype == torch.float32 and bf16_avg.dtype == torch.bfloat16 and float64_avg.dtype == torch.float64
    torch.testing.assert_close(fp32_avg.double(), torch.full((8,), exact, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(float64_avg, torch.full((8,), exact, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.equal(bf16_avg, torch.ones(8, dtype=torch.bfloat16)), "a bf16 average rounds every update away"


@pytest.mark.parametrize("contiguous", [False, True])
def test_high_decay_fp32_average_of_bf16_weights_is_as_exact_as_an_fp32_lerp(contiguous: bool) -> None:
    """Decay 0.99999 over bf16 weights that drift steadily: the engine's fp32 average stays within 2x of the mean error
    (against the float64 average of the same bf16 values) of a plain fp32 ``lerp_`` against the exact upcast. The
    former ``mul_`` + ``add_`` update, rounding the whole average twice per step, had 22x that error here."""
    decay, steps = 0.99999, 3000
    generator = torch.Generator().manual_seed(11)
    exact = [torch.randn(size, generator=generator, dtype=torch.float64) for size in (300, 200)]
    velocity = [1e-3 * torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in exact]
    live = [t.bfloat16() for t in exact]
    averager = Averager(live, EMA(decay=decay, warmup="none"), contiguous=contiguous)
    live = [t.data for t in live]  # contiguous=True re-homes the tensors into one buffer
    reference = [t.double() for t in live]
    fp32_lerp = [t.float() for t in live]
    for _ in range(steps):
        for tensor, position, move in zip(live, exact, velocity, strict=True):
            position += move
            tensor.copy_(position)
        averager.step()
        for avg, plain, tensor in zip(reference, fp32_lerp, live, strict=True):
            avg.lerp_(tensor.double(), 1 - decay)
            plain.lerp_(tensor.float(), 1 - decay)

    def error(averages: list[torch.Tensor]) -> float:
        return float(torch.cat([(a.double() - r).abs() for a, r in zip(averages, reference, strict=True)]).mean())

    engine = list(averager.averaged_tensors().values())
    assert all(t.dtype == torch.float32 for t in engine)
    assert error(engine) <= 2 * error(fp32_lerp), (error(engine), error(fp32_lerp))


@pytest.mark.parametrize(
    ("live", "requested", "expected"),
    [
        (torch.float32, None, torch.float32),
        (torch.float64, None, torch.float64),
        (torch.bfloat16, None, torch.float32),
        (torch.float16, None, torch.float32),
        (torch.float32, torch.float64, torch.float64),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    ],
)
def test_average_dtype(live: torch.dtype, requested: torch.dtype | None, expected: torch.dtype) -> None:
    model = mlp(0, batchnorm=True).to(live)
    averager = Averager(model, EMA(), dtype=requested)
    for name, tensor in averager.averaged_tensors().items():
        if name.endswith("num_batches_tracked"):
            assert tensor.dtype == torch.long  # integer buffers keep their dtype
        else:
            assert tensor.dtype == expected, name


def test_bad_dtype_and_total_steps() -> None:
    with pytest.raises(ValueError, match=r"dtype=torch.int64 is not an allowed dtype; choose one of"):
        Averager(mlp(), EMA(), dtype=torch.int64)
    with pytest.raises(ValueError, match=r"total_steps=0 is out of range"):
        Averager(mlp(), EMA(), total_steps=0)
    with pytest.raises(TypeError, match=r"rule=.*must be an averaging rule"):
        Averager(mlp(), 0.999)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- devices
def test_averages_live_on_the_live_tensors_device() -> None:
    model, averager = drifted()
    for name, tensor in averager.averaged_tensors().items():
        assert tensor.device == model.state_dict()[name].device
    _, explicit = drifted(device="cpu")
    assert all(t.device == torch.device("cpu") for t in explicit.averaged_tensors().values())


def test_same_device_spelled_with_an_index_still_swaps_by_pointer() -> None:
    model, averager = drifted(device="cpu:0")
    assert all(group.staging is None for group in averager._groups)
    with averager.averaged():
        for name, tensor in averager.averaged_tensors().items():
            assert model.state_dict()[name].data_ptr() == tensor.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_update_and_swap_do_not_sync_with_the_host() -> None:
    model = mlp(0, batchnorm=True).cuda()
    averager = Averager(model, EMA(decay=0.99, warmup="power", every_n_steps=2))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            averager.step()
        with averager.averaged():
            pass
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_average_of_a_gpu_model() -> None:
    model = mlp(0, batchnorm=True).cuda()
    on_cpu = Averager(model, EMA(decay=0.5, warmup="none"), device="cpu")
    on_gpu = Averager(model, EMA(decay=0.5, warmup="none"))
    for step in range(1, 4):
        drift(model, seed=step)
        on_cpu.step()
        on_gpu.step()
    for name, tensor in on_gpu.averaged_tensors().items():
        assert on_cpu.averaged_tensors()[name].device.type == "cpu"
        torch.testing.assert_close(on_cpu.averaged_tensors()[name], tensor.cpu())
    before = snapshot(model)
    with on_cpu.averaged():
        for name, tensor in model.state_dict().items():
            assert tensor.device.type == "cuda"
            torch.testing.assert_close(tensor.cpu(), on_gpu.averaged_tensors()[name].cpu())
    assert_restored(model, before)


# ---------------------------------------------------------------------------------------------- swapping
def test_swap_puts_the_average_in_and_restores_live_exactly() -> None:
    model, averager = drifted()
    model.eval()
    x = batch(0)[0]
    expected_output = torch.func.functional_call(copy.deepcopy(model), averager.averaged_tensors(), (x,))
    live_output = model(x)
    before = snapshot(model)
    averaged = averager.averaged_tensors()
    with averager.averaged():
        assert averager.is_swapped
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, averaged[name])
            assert tensor.data_ptr() == averaged[name].data_ptr(), "fp32: a swap exchanges pointers only"
        torch.testing.assert_close(model(x), expected_output, rtol=0, atol=0)
        assert not torch.equal(model(x), live_output)
    assert not averager.is_swapped
    assert_restored(model, before)
    for name, tensor in averager.live_tensors().items():
        assert torch.equal(tensor, before[name][1])


def test_swap_restores_live_weights_when_the_body_raises() -> None:
    model, averager = drifted()
    before = snapshot(model)
    with pytest.raises(ZeroDivisionError), averager.averaged():
        _ = 1 / 0
    assert not averager.is_swapped
    assert_restored(model, before)


def test_swap_of_bf16_model_through_the_stash_restores_exactly() -> None:
    model, averager = drifted(model_dtype=torch.bfloat16)
    before = snapshot(model)
    averaged = averager.averaged_tensors()
    assert averaged["0.weight"].dtype == torch.float32
    for _ in range(2):
        with averager.averaged():
            for name, tensor in model.state_dict().items():
                assert tensor.dtype == before[name][1].dtype
                assert torch.equal(tensor, averaged[name].to(tensor.dtype))
        assert_restored(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_swaps_allocate_nothing(dtype: torch.dtype) -> None:
    model, averager = drifted(model_dtype=dtype)
    outside = {t.data_ptr() for t in model.state_dict().values()}
    inside = []
    for _ in range(3):
        with averager.averaged():
            inside.append({t.data_ptr() for t in model.state_dict().values()})
        assert {t.data_ptr() for t in model.state_dict().values()} == outside
    assert inside[0] == inside[1] == inside[2]
    assert inside[0].isdisjoint(outside)
    if dtype == torch.float32:
        assert inside[0] == {t.data_ptr() for t in averager.averaged_tensors().values()}


def test_explicit_swap_and_nested_averaged() -> None:
    model, averager = drifted()
    before = snapshot(model)
    averager.swap()
    assert averager.is_swapped
    with averager.averaged():  # already swapped: stays swapped, does not swap back
        assert averager.is_swapped
    assert averager.is_swapped
    averager.swap()
    assert_restored(model, before)


def test_update_while_swapped_raises() -> None:
    _, averager = drifted()
    with averager.averaged():
        with pytest.raises(RuntimeError, match=r"swapped"):
            averager.update(0.5)
        with pytest.raises(RuntimeError, match=r"swapped"):
            averager.step()
        with pytest.raises(RuntimeError, match=r"swapped"):
            averager.load_state_dict(averager.state_dict())
    with pytest.raises(RuntimeError, match=r"needs the average swapped in"):
        averager.commit_swapped_buffers()


def test_failed_step_while_swapped_does_not_count() -> None:
    _, averager = drifted(steps=3)
    with averager.averaged(), pytest.raises(RuntimeError):
        averager.step()
    assert averager.step_count == 3
    assert averager.step(4)


def test_copy_to_model() -> None:
    model, averager = drifted()
    pointers = {name: t.data_ptr() for name, t in model.state_dict().items()}
    averager.swap()
    averager.copy_to_model()  # swaps back first, then copies into the live storage
    assert not averager.is_swapped
    for name, tensor in model.state_dict().items():
        assert tensor.data_ptr() == pointers[name]
        assert torch.equal(tensor, averager.averaged_tensors()[name])
        assert tensor.data_ptr() != averager.averaged_tensors()[name].data_ptr()


@pytest.mark.parametrize(
    "engine",
    [{}, {"dtype": torch.float64}, {"device": "cpu:0"}, {"buffers": "copy"}],
    ids=["pointer-swap", "float64-average", "staging", "copied-buffers"],
)
def test_update_bn_equals_torch_update_bn_on_a_copy_with_the_average(engine: dict) -> None:
    model, averager = drifted(**engine)
    loader = [batch(i)[0] for i in range(4)]
    averaged = averager.averaged_tensors()
    reference = copy.deepcopy(model)
    reference.load_state_dict({name: tensor.to(torch.float32) for name, tensor in averaged.items()})
    torch.optim.swa_utils.update_bn(loader, reference)

    before = snapshot(model)
    update_bn(averager, loader, model)

    assert_restored(model, before)
    expected = reference.state_dict()
    for name, tensor in averager.averaged_tensors().items():
        if name.startswith("1."):  # the BatchNorm's buffers
            assert torch.equal(tensor.to(expected[name].dtype), expected[name]), name
    assert averager.averaged_tensors()["1.num_batches_tracked"].item() == len(loader)


@pytest.mark.parametrize(
    ("model_dtype", "engine"),
    [
        (torch.float32, {}),
        (torch.float32, {"device": "cpu:0"}),
        (torch.bfloat16, {}),
        (torch.float32, {"dtype": torch.float64}),
    ],
    ids=["pointer-swap", "device-spelled-cpu:0", "bf16-model", "float64-average"],
)
def test_update_bn_leaves_parameter_averages_untouched(model_dtype: torch.dtype, engine: dict) -> None:
    model, averager = drifted(model_dtype=model_dtype, **engine)
    parameters = {name: averager.averaged_tensors()[name].clone() for name, _ in model.named_parameters()}
    update_bn(averager, [batch(i)[0].to(model_dtype) for i in range(4)], model)
    for name, tensor in parameters.items():
        assert torch.equal(averager.averaged_tensors()[name], tensor), name


def test_update_bn_needs_the_statistics_in_the_average() -> None:
    model = mlp(0, batchnorm=True)
    averager = Averager(model, EMA(), buffers="ignore")
    with pytest.raises(ValueError, match=r"recomputing BatchNorm statistics needs them in the average"):
        update_bn(averager, [batch(0)[0]], model)
    plain = mlp(0)
    without_norm = Averager(plain, EMA())
    state = {name: t.clone() for name, t in without_norm.averaged_tensors().items()}
    update_bn(without_norm, [batch(0)[0]], plain)  # nothing to recompute
    assert all(torch.equal(t, state[name]) for name, t in without_norm.averaged_tensors().items())


# ---------------------------------------------------------------------------------------------- counters
def test_repeated_step_value_is_ignored_under_gradient_accumulation() -> None:
    rule = EMA(decay=0.8, warmup="tf")
    accumulate = 3
    plain_model, accumulating_model = mlp(0), mlp(0)
    plain = Averager(plain_model, rule)
    accumulating = Averager(accumulating_model, rule)
    for step in range(1, 6):
        drift(plain_model, seed=step)
        drift(accumulating_model, seed=step)
        assert plain.step()
        updates = [accumulating.step(step) for _ in range(accumulate)]  # once per micro-batch, true step count
        assert updates == [True, False, False]
    assert accumulating.step_count == plain.step_count == 5
    assert accumulating.num_updates == plain.num_updates
    for name, tensor in plain.averaged_tensors().items():
        assert torch.equal(accumulating.averaged_tensors()[name], tensor)


def test_repeated_epoch_value_is_ignored() -> None:
    averager = Averager(mlp(0), SWA(start=0, start_unit="epoch"))
    assert averager.epoch_end(1)
    assert not averager.epoch_end(1)
    assert averager.epoch_end()
    assert averager.epoch_count == 2 and averager.num_updates == 2


def test_start_step_copies_then_averages() -> None:
    decay = 0.5
    value = nn.Parameter(torch.zeros(3))
    averager = Averager([value], EMA(decay=decay, warmup="none", start_step=3))
    assert not averager.has_average
    for step in range(1, 6):
        with torch.no_grad():
            value.fill_(float(step))
        assert averager.step() == (step >= 3)
        assert averager.has_average == (step >= 3)
        if step == 3:
            assert torch.equal(averager.averaged_tensors()["0"], torch.full((3,), 3.0))  # a copy
    # Averaging after the start: 3 -> 0.5 * 3 + 0.5 * 4 -> 0.5 * 3.5 + 0.5 * 5.
    expected = decay * (decay * 3.0 + (1 - decay) * 4.0) + (1 - decay) * 5.0
    torch.testing.assert_close(averager.averaged_tensors()["0"], torch.full((3,), expected))
    assert averager.num_updates == 3


# ---------------------------------------------------------------------------------------------- state
RESUME_RULES = [
    EMA(decay=0.9, warmup="power", every_n_steps=2, start_step=3),
    SWA(start=4, start_unit="step", every=2, every_unit="step"),
    SWA(start=1, start_unit="epoch", every_unit="epoch"),
]


def run_with_optional_resume(rule: object, total: int, resume_at: int | None) -> tuple[nn.Module, Averager]:
    def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Averager]:
        model = mlp(seed, batchnorm=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, optimizer, Averager(model, rule)  # type: ignore[arg-type]

    model, optimizer, averager = build(seed=0)
    for step in range(1, total + 1):
        train_step(model, optimizer, step)
        averager.step()
        if step % 4 == 0:
            averager.epoch_end()
        if step == resume_at:
            buffer = io.BytesIO()
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "avg": averager.state_dict()}
            torch.save(state, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer)
            model, optimizer, averager = build(seed=1)  # fresh objects, different initial weights
            model.load_state_dict(loaded["model"])
            optimizer.load_state_dict(loaded["optimizer"])
            averager.load_state_dict(loaded["avg"])
    return model, averager


@pytest.mark.parametrize("rule", RESUME_RULES, ids=repr)
@pytest.mark.parametrize("resume_at", [2, 7])
def test_resumed_averager_continues_bit_identically(rule: object, resume_at: int) -> None:
    straight_model, straight = run_with_optional_resume(rule, total=14, resume_at=None)
    resumed_model, resumed = run_with_optional_resume(rule, total=14, resume_at=resume_at)
    for name, tensor in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], tensor)
    assert resumed.num_updates == straight.num_updates > 1
    assert (resumed.step_count, resumed.epoch_count) == (straight.step_count, straight.epoch_count)
    for name, tensor in straight.averaged_tensors().items():
        assert torch.equal(resumed.averaged_tensors()[name], tensor), name


def test_state_dict_holds_every_counter() -> None:
    _, averager = drifted(steps=3)
    averager.epoch_end()
    state = averager.state_dict()
    assert state["rule"] == repr(averager.rule)
    assert (state["num_updates"], state["step_count"], state["epoch_count"]) == (4, 3, 1)
    assert (state["last_step"], state["last_epoch"]) == (3, 1)
    assert set(state["averaged"]) == set(averager.names)


def test_loading_state_of_another_model_names_the_keys() -> None:
    source = Averager(mlp(0, batchnorm=True, hidden=8), EMA()).state_dict()
    with pytest.raises(ValueError, match=r"mis-shaped keys \[0.weight: expected \(16, 6\), found \(8, 6\)"):
        Averager(mlp(0, batchnorm=True, hidden=16), EMA()).load_state_dict(source)
    with pytest.raises(
        ValueError, match=r"missing keys \['2.weight', '2.bias'\], unexpected keys \['1.weight', '1.bias', '3.weight'"
    ):
        Averager(mlp(0, batchnorm=False, hidden=8), EMA()).load_state_dict(source)
    extra = nn.Sequential(*mlp(0, batchnorm=True, hidden=8), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"missing keys \['4.weight', '4.bias'\]"):
        Averager(extra, EMA()).load_state_dict(source)


def test_loading_malformed_state_raises() -> None:
    averager = Averager(mlp(), EMA())
    with pytest.raises(ValueError, match=r"no 'averaged' entry"):
        averager.load_state_dict({"num_updates": 1})
    with pytest.raises(ValueError, match=r"version 99 is not supported"):
        averager.load_state_dict({**averager.state_dict(), "version": 99})


# ---------------------------------------------------------------------------------------------- contiguous layout
def test_contiguous_layout_matches_the_per_tensor_path_bit_for_bit(tmp_path: Path) -> None:
    """contiguous=True (one flat lerp per group) against the default foreach path on the same trajectory."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    flat_model = copy.deepcopy(reference)
    plain = Averager(reference, EMA(decay=0.8, warmup="none"))
    flat = Averager(flat_model, EMA(decay=0.8, warmup="none"), contiguous=True)
    assert any(group.flat is not None for group in flat._groups)
    for model in (reference, flat_model):  # the re-homed model still computes the same function
        model.eval()
    x = torch.randn(4, 5)
    assert torch.equal(reference(x), flat_model(x))
    for step in range(1, 8):
        for model in (reference, flat_model):
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.mul_(0.9).add_(0.05 * step)
        assert plain.step() and flat.step()
    for name, tensor in plain.averaged_tensors().items():
        assert torch.equal(tensor, flat.averaged_tensors()[name]), name
    with flat.averaged():
        assert torch.equal(flat_model[0].weight, plain.averaged_tensors()["0.weight"])
    flat.save(tmp_path / "flat.safetensors")  # averages share one buffer: the export must still work
    plain.load(tmp_path / "flat.safetensors")
    resumed = Averager(copy.deepcopy(flat_model), EMA(decay=0.8, warmup="none"), contiguous=True)
    resumed.load_state_dict(flat.state_dict())
    for name, tensor in flat.averaged_tensors().items():
        assert torch.equal(tensor, resumed.averaged_tensors()[name]), name


def test_contiguous_layout_falls_back_when_the_model_is_re_homed() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    averager = Averager(model, EMA(decay=0.5, warmup="none"), contiguous=True)
    model.to(torch.float64).to(torch.float32)  # parameters get new storage
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    expected = {k: 0.5 * v + 0.5 * model.state_dict()[k] for k, v in averager.averaged_tensors().items()}
    with pytest.warns(UserWarning, match="falling back to per-tensor"):
        averager.step()
    for name, tensor in averager.averaged_tensors().items():
        torch.testing.assert_close(tensor, expected[name])


def test_two_contiguous_averagers_share_one_layout() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    first = Averager(model, EMA(decay=0.5, warmup="none"), contiguous=True)
    pointers = [p.data_ptr() for p in model.parameters()]
    second = Averager(model, SWA(start=0, start_unit="step", every_unit="step"), contiguous=True)
    assert [p.data_ptr() for p in model.parameters()] == pointers  # not re-homed a second time
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(2.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither falls back
        first.step()
        second.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(second.averaged_tensors()[name], value)
        torch.testing.assert_close(first.averaged_tensors()[name], 0.5 * value + 0.5 * (value - 2.0))


def test_import_counts_as_an_update_and_steps_cannot_go_back(tmp_path: Path) -> None:
    model = nn.Linear(2, 1, bias=False)
    averager = Averager(model, EMA(decay=0.99, warmup="none"))
    averager.save(tmp_path / "a.safetensors")
    fresh = Averager(model, EMA(decay=0.99, warmup="none"))
    fresh.step(1000)
    fresh.load(tmp_path / "a.safetensors")
    with torch.no_grad():
        model.weight.add_(10.0)
    before = fresh.averaged_tensors()["weight"].clone()
    fresh.step(1001)  # one step after the import: weight 1 - 0.99, not 1 - 0.99 ** 1001
    torch.testing.assert_close(fresh.averaged_tensors()["weight"], before + 0.01 * 10.0)
    with pytest.raises(ValueError, match=r"step=5 is before the last update \(step 1001\)"):
        fresh.step(5)


def test_state_without_last_update_keys_still_loads() -> None:
    model = nn.Linear(2, 1)
    averager = Averager(model, EMA(decay=0.9, warmup="none"))
    averager.step(3)
    state = averager.state_dict()
    del state["last_update_step"], state["last_update_epoch"]
    fresh = Averager(nn.Linear(2, 1), EMA(decay=0.9, warmup="none"))
    fresh.load_state_dict(state)
    assert fresh.clock.last_update_step == 3


# ---------------------------------------------------------------------------------------------- non-finite weights
def nan_run(nonfinite: str, contiguous: bool = False, bad_step: int = 3) -> tuple[nn.Module, Averager, dict]:
    """EMA(0.5) over 5 drifts of an MLP with BatchNorm; at ``bad_step`` the live weights hold a NaN and an inf.
    Returns the model, the averager and the float64 reference that leaves the bad update out."""
    model = mlp(0, batchnorm=True)
    averager = Averager(model, EMA(decay=0.5, warmup="none"), contiguous=contiguous, nonfinite=nonfinite)  # type: ignore[arg-type]
    reference = {name: t.detach().double().clone() for name, t in averager.live_tensors().items()}
    for step in range(1, 6):
        drift(model, seed=step)
        if step == bad_step:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
                model[3].bias[1] = float("inf")
        averager.step()
        if step != bad_step:
            for name, tensor in averager.live_tensors().items():
                if tensor.is_floating_point() and name.endswith(("weight", "bias", "running_mean", "running_var")):
                    reference[name].lerp_(tensor.double(), 0.5)
                else:
                    reference[name] = tensor.double().clone()
        if step == bad_step:
            with torch.no_grad():
                model[0].weight[0, 0] = 0.0
                model[3].bias[1] = 0.0
    return model, averager, reference


@pytest.mark.parametrize("contiguous", [False, True])
def test_nonfinite_skip_leaves_the_bad_update_out_and_warns_once(contiguous: bool) -> None:
    _, averager, reference = nan_run("skip", contiguous)
    averages = averager.averaged_tensors()
    for name, expected in reference.items():
        torch.testing.assert_close(averages[name].double(), expected, rtol=1e-6, atol=1e-6, msg=name)
    with pytest.warns(RuntimeWarning, match=r"EMA\(decay=0.5.*first in '0.weight'.*left the average unchanged"):
        averager.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        averager.state_dict()  # once


def test_nonfinite_error_raises_at_the_next_check_with_the_average_intact(tmp_path: Path) -> None:
    _, averager, reference = nan_run("error")
    for check in (averager.state_dict, averager.refresh, lambda: averager.save(tmp_path / "avg.safetensors")):
        with pytest.raises(FloatingPointError, match=r"first in '0.weight'.*nonfinite='error'"):
            check()
    with pytest.raises(FloatingPointError), averager.averaged():
        pass
    assert not averager.is_swapped
    for name, tensor in averager.averaged_tensors().items():
        torch.testing.assert_close(tensor.double(), reference[name], rtol=1e-6, atol=1e-6, msg=name)
    assert not (tmp_path / "avg.safetensors").exists()


def test_nonfinite_warn_keeps_the_update_path_and_warns_once_at_a_check() -> None:
    _, averager, _ = nan_run("warn", bad_step=5)  # the last update poisons the average
    assert torch.isnan(averager.averaged_tensors()["0.weight"][0, 0])
    assert all(seen is None for seen in averager._seen_nonfinite), "warn adds nothing to the update path"
    with pytest.warns(RuntimeWarning, match=r"first in '0.weight'.*nonfinite='skip'"), averager.averaged():
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        averager.refresh()
        averager.state_dict()


def test_nonfinite_must_be_a_known_policy() -> None:
    with pytest.raises(ValueError, match=r"nonfinite='ignore'.*'warn', 'skip', 'error'"):
        Averager(mlp(), EMA(), nonfinite="ignore")  # type: ignore[arg-type]


# ---------------------------------------------------------------- issue 11: canonical rule texts, state of another rule
def _canonical_cases() -> list[tuple[object, object, object]]:
    from weightavg.methods.noloco import DiLoCoRule, NoLoCoRule
    from weightavg.methods.swa import SWA
    from weightavg.methods.zscl import ZSCL

    # (default spelling, explicit spelling of the same settings, different settings)
    return [
        (EMA(), EMA(decay=0.999), EMA(decay=0.9995)),
        (EMA(gamma=2), EMA(gamma=2.0), EMA(gamma=3.0)),
        (SWA(), SWA(start=0.75), SWA(start=0.5)),
        (SWA(start=1), SWA(start=1.0), SWA(start=2, start_unit="step")),
        (ZSCL(), ZSCL(every_n_steps=100), ZSCL(every_n_steps=10)),
        (NoLoCoRule(), NoLoCoRule(mixing=0.7), NoLoCoRule(mixing=0.5)),
        (DiLoCoRule(), DiLoCoRule(outer_lr=0.7, nesterov=True), DiLoCoRule(nesterov=False)),
    ]


@pytest.mark.parametrize("index", range(7))
def test_rule_text_is_canonical_whatever_the_spelling(index: int) -> None:
    default, explicit, other = _canonical_cases()[index]
    assert repr(default) == repr(explicit)
    assert default == explicit and hash(default) == hash(explicit)
    assert repr(other) != repr(default) and other != default


def test_callback_default_names_do_not_depend_on_spelling() -> None:
    from weightavg import callbacks

    assert callbacks.EMA().state_key == callbacks.EMA(decay=0.999).state_key == "weightavg[EMA(decay=0.999)]"
    assert callbacks.SWA().state_key == callbacks.SWA(start=0.75).state_key
    assert callbacks.EMA().state_key != callbacks.EMA(decay=0.9995).state_key


def test_state_of_another_method_is_refused_and_other_settings_warn() -> None:
    from weightavg.methods.swa import SWA

    source = Averager(mlp(0), EMA(decay=0.9))
    source.step()
    state = source.state_dict()
    with pytest.raises(ValueError, match=r"saved by EMA\(decay=0.9\) and cannot continue as SWA"):
        Averager(mlp(0), SWA(start=0, start_unit="step")).load_state_dict(state)
    with pytest.warns(UserWarning, match=r"saved by EMA\(decay=0.9\).*EMA\(decay=0.95\)"):
        Averager(mlp(0), EMA(decay=0.95)).load_state_dict(state)
    old = {key: value for key, value in state.items() if key != "rule"}
    with pytest.warns(UserWarning, match="records no rule"):
        Averager(mlp(0), EMA(decay=0.9)).load_state_dict(old)
    # A text written before texts were canonical ("EMA()") still matches the same settings: no warning.
    default = Averager(mlp(0), EMA())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default.load_state_dict({**state, "rule": "EMA()"})


def test_state_missing_a_counter_names_it() -> None:
    state = Averager(mlp(0), EMA()).state_dict()
    del state["num_updates"]
    with pytest.raises(ValueError, match="missing 'num_updates'"):
        Averager(mlp(0), EMA()).load_state_dict(state)


def test_model_converted_after_binding_is_refused_naming_the_tensor() -> None:
    """model.double() keeps the Parameter objects but changes their dtype: a swap would put float32 averages into a
    float64 model, an update would mix them; both refuse, naming the tensor and what changed."""
    model = nn.Linear(3, 2)
    averager = Averager(model, EMA(decay=0.5, warmup="none"))
    averager.step()
    model.double()
    with pytest.raises(
        RuntimeError, match=r"'weight' changed after the averager was built .*torch.float32.*torch.float64"
    ):
        averager.step()
    with pytest.raises(RuntimeError, match=r"'weight' changed .*model.half\(\)"):
        averager.swap()
    assert not averager.is_swapped and model.weight.dtype == torch.float64


@pytest.mark.parametrize("contiguous", [False, True])
def test_parameters_replaced_after_binding_are_followed(contiguous: bool) -> None:
    """``load_state_dict(assign=True)`` and ``module.weight = nn.Parameter(...)`` put new Parameter objects into the
    model; the average follows them from then on: each update blends in the new objects' values (checked against
    the EMA rule written out in float64), a swap puts the average into the new objects, and the old objects (an
    optimizer may still hold them) keep their own values, sharing no storage with the model or the average."""
    model = mlp(0)
    averager = Averager(model, EMA(decay=0.5, warmup="none"), contiguous=contiguous)
    reference = {name: t.detach().double().clone() for name, t in model.state_dict().items()}
    old_weight = model[0].weight
    replacement = mlp(1).state_dict()
    model.load_state_dict(replacement, assign=True)
    assert model[0].weight is not old_weight
    model[2].bias = nn.Parameter(torch.full_like(model[2].bias, 3.0))
    for step in range(1, 4):
        drift(model, step)
        averager.step()
        for name, value in model.state_dict().items():
            reference[name] = 0.5 * reference[name] + 0.5 * value.detach().double()
    for name, value in averager.averaged_tensors().items():
        torch.testing.assert_close(value.double(), reference[name], rtol=0, atol=1e-6, msg=name)
    live = {name: t.detach().clone() for name, t in model.state_dict().items()}
    with averager.averaged():
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value.double(), reference[name], rtol=0, atol=1e-6, msg=name)
    for name, value in model.state_dict().items():
        assert torch.equal(value, live[name]), name
    # The old object kept the value it had and owns its storage.
    assert torch.equal(old_weight.detach(), mlp(0)[0].weight.detach())
    with torch.no_grad():
        old_weight.add_(100.0)
    assert torch.equal(model[0].weight.detach(), live["0.weight"])


def test_parameter_replaced_by_another_shape_or_dtype_is_refused_naming_it() -> None:
    model = mlp(0)
    averager = Averager(model, EMA(decay=0.5, warmup="none"))
    model[2].weight = nn.Parameter(torch.zeros(3, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"parameter '2.weight' was replaced .*torch.float32.*torch.float64"):
        averager.step()
    with pytest.raises(RuntimeError, match=r"parameter '2.weight' was replaced"):
        averager.swap()
    assert not averager.is_swapped
    model[2].weight = nn.Parameter(torch.zeros(3, 8))
    assert averager.step()  # a compatible one is followed again
    del model[2].weight
    model[2].register_parameter("weight", None)
    with pytest.raises(RuntimeError, match=r"parameter '2.weight' was removed"):
        averager.step()


def test_parameter_replaced_while_swapped_in_is_followed_after_swapping_back() -> None:
    model = mlp(0)
    averager = Averager(model, EMA(decay=0.5, warmup="none"))
    averager.step()
    old = model[0].weight
    averager.swap()
    model[0].weight = nn.Parameter(torch.full_like(old, 2.0))
    averager.swap()
    assert torch.equal(old.detach(), mlp(0)[0].weight.detach())  # the old object has its live storage back
    assert averager.step()
    expected = 0.5 * mlp(0)[0].weight.detach() + 0.5 * 2.0
    torch.testing.assert_close(averager.averaged_tensors()["0.weight"], expected)
