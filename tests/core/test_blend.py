"""weightavg.core: blends of an anchor with the live weights (WiSE-FT in the engine), weight import from modules,
state dicts and files, and the helpers that run a module with other tensors (``call_with``, ``eval_mode``,
``to_device``). Every number is checked against a float64 reference written out here."""

from __future__ import annotations

import copy
from collections import OrderedDict, namedtuple
from pathlib import Path

import pytest
import torch
from torch import nn

from weightavg import EMA, Averager, load_into_module
from weightavg.core.call import call_with, eval_mode, to_device
from weightavg.core.io import read_weights
from weightavg.core.rule import Snapshot
from weightavg.methods.wiseft import apply_blend, blend, blend_alpha, blended


def bn_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


@torch.no_grad()
def drift(model: nn.Module, seed: int) -> None:
    """Move every state tensor as a training step would (integer buffers count up)."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            if name.endswith("running_var"):
                noise = noise.abs()
            tensor.add_(noise.to(tensor.dtype))
        else:
            tensor.add_(3)


def float64_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: t.detach().clone().double() if t.is_floating_point() else t.detach().clone()
        for name, t in model.state_dict().items()
    }


def exact_state(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {name: (t.data_ptr(), t.detach().clone()) for name, t in model.state_dict().items()}


def anchored(dtype: torch.dtype = torch.float32, **engine: object) -> tuple[nn.Module, Averager, dict, dict]:
    """A BatchNorm model, a Snapshot anchor of its initial weights, then drifted live weights.

    Returns the model, the averager, and float64 copies of the anchor and of the live weights."""
    model = bn_net(0, dtype)
    anchor = float64_state(model)
    averager = Averager(model, Snapshot(), **engine)  # type: ignore[arg-type]
    drift(model, seed=1)
    drift(model, seed=2)
    return model, averager, anchor, float64_state(model)


def blend_reference(anchor: dict, live: dict, alpha: float) -> dict[str, torch.Tensor]:
    return {
        name: (1 - alpha) * anchor[name] + alpha * live[name] if live[name].is_floating_point() else live[name]
        for name in live
    }


def assert_holds(model: nn.Module, expected: dict[str, torch.Tensor], rtol: float = 1e-6, atol: float = 1e-6) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(state[name].double(), value, rtol=rtol, atol=atol, msg=name)
        else:
            assert state[name].dtype == value.dtype and torch.equal(state[name], value), name


def assert_restored(model: nn.Module, before: dict[str, tuple[int, torch.Tensor]]) -> None:
    for name, tensor in model.state_dict().items():
        pointer, values = before[name]
        assert tensor.data_ptr() == pointer, f"{name}: live storage not restored"
        assert torch.equal(tensor, values), f"{name}: live values changed"


# ---------------------------------------------------------------------------------------------- blend
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_blend_puts_the_anchor_live_mix_into_params_and_float_buffers(alpha: float) -> None:
    model, averager, anchor, live = anchored()
    blend(averager, alpha)
    assert averager.is_swapped and blend_alpha(averager) == alpha
    assert_holds(model, blend_reference(anchor, live, alpha))
    # Integer buffers keep their live values, which differ from the anchor's.
    assert int(model[1].num_batches_tracked) == int(live["1.num_batches_tracked"]) == 6
    assert int(anchor["1.num_batches_tracked"]) == 0


def test_blend_moves_running_stats_too() -> None:
    model, averager, anchor, live = anchored()
    blend(averager, 0.5)
    expected = 0.5 * anchor["1.running_var"] + 0.5 * live["1.running_var"]
    torch.testing.assert_close(model[1].running_var.double(), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(model[1].running_var.double(), live["1.running_var"])


def test_swap_after_blend_restores_the_exact_live_storage() -> None:
    model, averager, _, _ = anchored()
    before = exact_state(model)
    params = list(model.parameters())
    blend(averager, 0.3)
    assert any(t.data_ptr() != before[n][0] for n, t in model.state_dict().items() if t.is_floating_point())
    averager.swap()
    assert not averager.is_swapped and blend_alpha(averager) is None
    assert_restored(model, before)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))


def test_a_second_blend_starts_from_the_live_weights_again() -> None:
    model, averager, anchor, live = anchored()
    blend(averager, 0.3)
    blend(averager, 0.8)
    assert blend_alpha(averager) == 0.8
    assert_holds(model, blend_reference(anchor, live, 0.8))
    compounded = blend_reference(anchor, blend_reference(anchor, live, 0.3), 0.8)
    assert not torch.allclose(model[0].weight.double(), compounded["0.weight"])
    averager.swap()
    assert_holds(model, live, rtol=0, atol=0)


def test_blended_context_restores_the_live_weights() -> None:
    model, averager, anchor, live = anchored()
    before = exact_state(model)
    with blended(averager, 0.4):
        assert blend_alpha(averager) == 0.4
        assert_holds(model, blend_reference(anchor, live, 0.4))
    assert not averager.is_swapped
    assert_restored(model, before)


def test_blended_context_restores_on_exception() -> None:
    model, averager, _, _ = anchored()
    before = exact_state(model)
    with pytest.raises(KeyError, match="inside"), blended(averager, 0.4):
        raise KeyError("inside")
    assert not averager.is_swapped and blend_alpha(averager) is None
    assert_restored(model, before)


def test_blended_context_restores_a_previous_blend() -> None:
    model, averager, anchor, live = anchored()
    blend(averager, 0.3)
    with blended(averager, 0.9):
        assert_holds(model, blend_reference(anchor, live, 0.9))
    assert blend_alpha(averager) == 0.3
    assert_holds(model, blend_reference(anchor, live, 0.3))
    averager.swap()
    assert_holds(model, live, rtol=0, atol=0)


def test_blended_context_restores_the_average_when_it_was_swapped_in() -> None:
    model, averager, anchor, live = anchored()
    averager.swap()  # the plain swap puts every followed tensor of the snapshot in, integer buffers included
    assert_holds(model, anchor, rtol=0, atol=0)
    with blended(averager, 0.6):
        assert_holds(model, blend_reference(anchor, live, 0.6))
    assert averager.is_swapped and blend_alpha(averager) is None
    assert_holds(model, anchor, rtol=0, atol=0)
    averager.swap()
    assert_holds(model, live, rtol=0, atol=0)


def test_blend_while_the_average_is_swapped_in_uses_the_live_weights() -> None:
    model, averager, anchor, live = anchored()
    before = exact_state(model)
    averager.swap()
    blend(averager, 0.7)
    assert blend_alpha(averager) == 0.7
    assert_holds(model, blend_reference(anchor, live, 0.7))
    averager.swap()
    assert_restored(model, before)


@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0, 1.5])
def test_apply_blend_changes_the_live_tensors_in_place(alpha: float) -> None:
    model, averager, anchor, live = anchored()
    params = {name: (p, p.data_ptr()) for name, p in model.named_parameters()}
    apply_blend(averager, alpha)
    assert not averager.is_swapped
    assert_holds(model, blend_reference(anchor, live, alpha))
    for name, p in model.named_parameters():
        assert p is params[name][0] and p.data_ptr() == params[name][1], name
    # The anchor itself is unchanged: a blend of 0 now gives it back.
    blend(averager, 0.0)
    assert_holds(model, {**anchor, "1.num_batches_tracked": live["1.num_batches_tracked"]}, rtol=0, atol=0)


def test_apply_blend_takes_a_blend_out_first() -> None:
    model, averager, anchor, live = anchored()
    blend(averager, 0.9)
    apply_blend(averager, 0.2)
    assert not averager.is_swapped and blend_alpha(averager) is None
    assert_holds(model, blend_reference(anchor, live, 0.2))


def test_update_is_refused_while_blended() -> None:
    model = bn_net(0)
    averager = Averager(model, EMA(decay=0.5, warmup="none"))
    drift(model, seed=1)
    blend(averager, 0.5)
    with pytest.raises(RuntimeError, match="swap"):
        averager.update(0.5)
    with pytest.raises(RuntimeError, match="swap"):
        averager.step()
    assert averager.num_updates == 1 and averager.step_count == 0
    averager.swap()
    assert averager.step()


@pytest.mark.parametrize("dtype, expected", [("live", torch.bfloat16), (None, torch.float32)])
def test_snapshot_dtype_of_bf16_models(dtype: str | None, expected: torch.dtype) -> None:
    model = bn_net(0, torch.bfloat16)
    anchor = float64_state(model)
    averager = Averager(model, Snapshot(), dtype=dtype)
    for name, tensor in averager.averaged_tensors().items():
        if tensor.is_floating_point():
            assert tensor.dtype == expected, name
            assert torch.equal(tensor.double(), anchor[name]), name
    drift(model, seed=1)
    live = float64_state(model)
    blend(averager, 0.25)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == (torch.bfloat16 if tensor.is_floating_point() else torch.long), name
    # Computed in bf16 at the end: a few bf16 ulps of the float64 reference.
    assert_holds(model, blend_reference(anchor, live, 0.25), rtol=2e-2, atol=2e-2)


def test_cpu_anchor_device() -> None:
    model, averager, anchor, live = anchored(device="cpu")
    assert all(t.device.type == "cpu" for t in averager.averaged_tensors().values())
    blend(averager, 0.4)
    assert_holds(model, blend_reference(anchor, live, 0.4))


def test_extrapolation_beyond_one() -> None:
    model, averager, anchor, live = anchored()
    blend(averager, 1.5)
    expected = blend_reference(anchor, live, 1.5)
    torch.testing.assert_close(expected["0.bias"], -0.5 * anchor["0.bias"] + 1.5 * live["0.bias"])
    assert_holds(model, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["blend", "apply_blend", "blended"])
@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_non_finite_alpha_raises_value_error_naming_alpha(method: str, alpha: float) -> None:
    model, averager, _, _ = anchored()
    before = exact_state(model)
    with pytest.raises(ValueError, match="alpha"):
        if method == "blended":
            with blended(averager, alpha):
                pass
        else:
            {"blend": blend, "apply_blend": apply_blend}[method](averager, alpha)
    assert not averager.is_swapped
    assert_restored(model, before)


# ---------------------------------------------------------------------------------------------- load_weights
def other_weights(seed: int = 5) -> nn.Sequential:
    model = bn_net(seed)
    drift(model, seed=seed + 100)
    return model


def assert_average_is(averager: Averager, expected: dict[str, torch.Tensor]) -> None:
    averaged = averager.averaged_tensors()
    assert set(averaged) == set(expected)
    for name, value in expected.items():
        assert torch.equal(averaged[name], value.to(averaged[name].dtype)), name


def test_load_weights_from_a_module() -> None:
    model, averager, _, live = anchored()
    source = other_weights()
    averager.load_weights(source)
    assert_average_is(averager, source.state_dict())
    blend(averager, 0.0)
    assert_holds(model, {**float64_state(source), "1.num_batches_tracked": live["1.num_batches_tracked"]}, 0, 0)


def test_load_weights_from_a_state_dict_ignores_extra_keys() -> None:
    _, averager, _, _ = anchored()
    source = other_weights().state_dict()
    averager.load_weights({**source, "extra.weight": torch.ones(3), "head.scale": torch.zeros(2, 2)})
    assert_average_is(averager, source)


def test_load_weights_missing_key_names_the_key_and_the_argument() -> None:
    _, averager, anchor, _ = anchored()
    source = other_weights().state_dict()
    del source["0.bias"]
    with pytest.raises(ValueError, match=r"anchor.*0\.bias"):
        averager.load_weights(source, argument="anchor")
    # Nothing was imported.
    for name, tensor in averager.averaged_tensors().items():
        assert torch.equal(tensor.double() if tensor.is_floating_point() else tensor, anchor[name]), name


def test_load_weights_mis_shaped_entry_raises() -> None:
    _, averager, _, _ = anchored()
    source = other_weights().state_dict()
    source["3.weight"] = torch.zeros(4, 7)
    with pytest.raises(ValueError, match=r"3\.weight"):
        averager.load_weights(source)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def test_load_weights_into_a_tied_module_accepts_either_name() -> None:
    torch.manual_seed(0)
    model = Tied()
    averager = Averager(model, Snapshot())
    assert averager.aliases()["embed.weight"] == ("head.weight",)
    torch.manual_seed(1)
    source = Tied()
    only_alias = {k: v for k, v in source.state_dict().items() if k != "embed.weight"}
    assert "head.weight" in only_alias
    averager.load_weights(only_alias)
    assert torch.equal(averager.averaged_tensors()["embed.weight"], source.embed.weight)
    averager.load_weights(Tied())  # something else, then the module itself
    averager.load_weights(source)
    assert torch.equal(averager.averaged_tensors()["embed.weight"], source.embed.weight)
    assert torch.equal(averager.averaged_tensors()["mix.weight"], source.mix.weight)


def test_load_weights_from_files(tmp_path: Path) -> None:
    source = other_weights()
    expected = source.state_dict()

    ema = Averager(source, EMA(decay=0.5, warmup="none"))
    saved = ema.save(tmp_path / "average.safetensors")
    model_file = ema.save_model(tmp_path / "model.safetensors")
    torch.save(expected, tmp_path / "weights.pt")
    torch.save({"state_dict": expected, "epoch": 3, "global_step": 17}, tmp_path / "last.ckpt")

    for path in (saved, model_file, tmp_path / "weights.pt", tmp_path / "last.ckpt"):
        _, averager, _, _ = anchored()
        averager.load_weights(path)
        assert_average_is(averager, expected)
        averager.load_weights(str(path))
        assert_average_is(averager, expected)


def test_load_weights_from_a_tied_safetensors_export(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = Tied()
    Averager(source, Snapshot()).save(tmp_path / "tied.safetensors")
    torch.manual_seed(4)
    model = Tied()
    averager = Averager(model, Snapshot())
    averager.load_weights(tmp_path / "tied.safetensors")
    for name, tensor in source.state_dict().items():
        if name in averager.averaged_tensors():
            assert torch.equal(averager.averaged_tensors()[name], tensor), name
    fresh = Tied()
    load_into_module(fresh, tmp_path / "tied.safetensors")
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.head.weight, source.embed.weight)


def test_read_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="anchor"):
        read_weights(tmp_path / "missing.safetensors", argument="anchor")
    with pytest.raises(FileNotFoundError, match="anchor"):
        read_weights(str(tmp_path / "missing.pt"), argument="anchor")
    for wrong in (3, None, [torch.zeros(2)], torch.zeros(2)):
        with pytest.raises(TypeError, match="anchor"):
            read_weights(wrong, argument="anchor")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="anchor"):
        read_weights({"w": [1.0, 2.0]}, argument="anchor")  # type: ignore[dict-item]
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="anchor"):
        read_weights(tmp_path / "list.pt", argument="anchor")
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="anchor"):
        read_weights(tmp_path / "garbage.bin", argument="anchor")


def test_save_model_writes_the_blend_in_the_model(tmp_path: Path) -> None:
    _, averager, anchor, live = anchored()
    blend(averager, 0.3)
    path = averager.save_model(tmp_path / "blend.safetensors")
    averager.swap()
    fresh = bn_net(9)
    load_into_module(fresh, path)
    expected = blend_reference(anchor, live, 0.3)
    assert_holds(fresh, expected)
    assert int(fresh[1].num_batches_tracked) == int(live["1.num_batches_tracked"])
    # Without a blend, save_model writes the live weights.
    load_into_module(fresh, averager.save_model(tmp_path / "live.safetensors"))
    assert_holds(fresh, live, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- call_with etc.
def test_call_with_equals_a_loaded_copy_and_leaves_the_module_alone() -> None:
    model = bn_net(0)
    drift(model, seed=1)
    model.eval()
    before = exact_state(model)
    tensors = other_weights(7).state_dict()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))

    reference = copy.deepcopy(model)
    reference.load_state_dict(tensors)
    torch.testing.assert_close(call_with(model, tensors, x), reference(x), rtol=0, atol=0)
    assert_restored(model, before)

    # Only some entries: the rest keep the module's own values.
    partial = {"3.weight": tensors["3.weight"], "1.running_mean": tensors["1.running_mean"]}
    reference = copy.deepcopy(model)
    reference.load_state_dict(partial, strict=False)
    torch.testing.assert_close(call_with(model, partial, x), reference(x), rtol=0, atol=0)
    assert not torch.allclose(reference(x), model(x))
    assert_restored(model, before)


def test_call_with_a_custom_forward() -> None:
    model = bn_net(0).eval()
    before = exact_state(model)
    tensors = other_weights(7).state_dict()
    inputs = {"features": torch.randn(4, 5, generator=torch.Generator().manual_seed(0)), "scale": 3.0}

    def forward(module: nn.Module, batch: dict) -> torch.Tensor:
        return module(batch["features"]).log_softmax(-1) * batch["scale"]

    reference = copy.deepcopy(model)
    reference.load_state_dict(tensors)
    torch.testing.assert_close(call_with(model, tensors, inputs, forward), forward(reference, inputs), rtol=0, atol=0)
    assert_restored(model, before)


def test_call_with_a_tied_module_follows_the_alias() -> None:
    torch.manual_seed(0)
    model = Tied()
    torch.manual_seed(1)
    other = Tied()
    tokens = torch.tensor([[0, 3, 5], [1, 2, 4]])
    reference = copy.deepcopy(model)
    reference.embed.weight.data.copy_(other.embed.weight.data)
    out = call_with(model, {"head.weight": other.embed.weight.detach()}, tokens)
    torch.testing.assert_close(out, reference(tokens), rtol=0, atol=0)
    assert not torch.equal(model.embed.weight, other.embed.weight)


@pytest.mark.parametrize("raise_inside", [False, True])
def test_eval_mode_restores_mixed_training_flags(raise_inside: bool) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(2), nn.Dropout(0.1)))
    model.train()
    model[1].eval()
    model[2][0].eval()
    flags = [m.training for m in model.modules()]
    assert flags == [True, True, False, True, False, True]
    try:
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            if raise_inside:
                raise RuntimeError("inside")
    except RuntimeError:
        assert raise_inside
    assert [m.training for m in model.modules()] == flags


def test_to_device_walks_nested_containers() -> None:
    Pair = namedtuple("Pair", ["inputs", "mask"])
    batch = {
        "x": torch.ones(2),
        "nested": [torch.zeros(3), (torch.arange(4), "label", 5), Pair(torch.ones(1), None)],
        "ordered": OrderedDict(a=torch.ones(2, 2)),
        "plain": 1.5,
    }
    moved = to_device(batch, torch.device("meta"))
    assert set(moved) == set(batch)
    assert moved["x"].device.type == "meta" and moved["x"].shape == (2,)
    first, second, third = moved["nested"]
    assert isinstance(moved["nested"], list) and first.device.type == "meta"
    assert isinstance(second, tuple) and second[0].device.type == "meta" and second[0].dtype == torch.long
    assert second[1:] == ("label", 5)
    assert isinstance(third, Pair) and third.inputs.device.type == "meta" and third.mask is None
    assert moved["ordered"]["a"].device.type == "meta" and moved["ordered"]["a"].shape == (2, 2)
    assert moved["plain"] == 1.5
    assert batch["x"].device.type == "cpu"


def test_read_weights_detects_safetensors_by_content_and_loads_checkpoints_with_python_objects(tmp_path: Path) -> None:
    import argparse

    model = nn.Linear(3, 2)
    averager = Averager(model, EMA(decay=0.9, warmup="none"))
    averager.save(tmp_path / "average.bin")  # any suffix
    loaded = nn.Linear(3, 2)
    load_into_module(loaded, tmp_path / "average.bin")
    assert torch.equal(loaded.weight, model.weight)
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": argparse.Namespace(lr=0.1)}, tmp_path / "hparams.ckpt"
    )
    with pytest.warns(UserWarning, match="weights_only=False"):
        weights = read_weights(tmp_path / "hparams.ckpt", argument="anchor")
    assert torch.equal(weights["weight"], model.weight)
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match=r"anchor=.*notes\.txt"):
        read_weights(tmp_path / "notes.txt", argument="anchor")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("anchor_device", [None, "cpu"])
def test_gpu_blends_stay_on_the_models_device_without_host_sync(anchor_device: str | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).cuda().to(torch.bfloat16)
    theta_0 = {k: v.detach().double().cpu() for k, v in model.state_dict().items()}
    anchor = Averager(model, Snapshot(), dtype="live", device=anchor_device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    theta_1 = {k: v.detach().double().cpu() for k, v in model.state_dict().items()}
    assert all(t.dtype == torch.bfloat16 for t in anchor.averaged_tensors().values() if t.is_floating_point())
    if anchor_device is None:  # a host anchor copies to the device: that is a transfer, not a sync to check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        blend(anchor, 0.3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "cuda", name
        if tensor.is_floating_point():
            expected = 0.7 * theta_0[name] + 0.3 * theta_1[name]
            torch.testing.assert_close(tensor.double().cpu(), expected, rtol=2e-2, atol=2e-2)
    anchor.swap()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.double().cpu(), theta_1[name]), name
