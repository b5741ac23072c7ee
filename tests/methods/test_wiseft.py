"""weightavg.methods.wiseft: interpolation against float64 references (plain and Fisher-weighted), the paper's
exactness property for a linear head on a shared encoder, diagonal Fisher against a per-example loop, and the
alpha-grid helpers."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from weightavg.methods.wiseft import ALPHAS, check_alphas, choose_alpha, diagonal_fisher, interpolate


def bn_net(seed: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)


@torch.no_grad()
def fine_tune(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` moved as fine-tuning would (float entries drift, BatchNorm has counted batches)."""
    tuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tuned.state_dict().items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            tensor.add_((noise.abs() if name.endswith("running_var") else noise).to(tensor.dtype))
        else:
            tensor.add_(11)
    return tuned


def reference(theta_0: dict, theta_1: dict, alpha: float) -> dict[str, torch.Tensor]:
    return {
        name: (1 - alpha) * theta_0[name].double() + alpha * t1.double() if t1.is_floating_point() else t1
        for name, t1 in theta_1.items()
    }


def assert_state(result: dict, expected: dict, dtype: torch.dtype = torch.float32, tol: float = 1e-6) -> None:
    assert set(result) == set(expected)
    for name, value in expected.items():
        if value.is_floating_point():
            assert result[name].dtype == dtype, name
            torch.testing.assert_close(result[name].double(), value, rtol=tol, atol=tol, msg=name)
        else:
            assert result[name].dtype == value.dtype and torch.equal(result[name], value), name


# ---------------------------------------------------------------------------------------------- interpolate
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0, 1.25, -0.2])
def test_interpolate_modules_matches_float64_reference(alpha: float) -> None:
    zero_shot = bn_net(0)
    fine_tuned = fine_tune(zero_shot, seed=1)
    theta_0, theta_1 = zero_shot.state_dict(), fine_tuned.state_dict()
    result = interpolate(zero_shot, fine_tuned, alpha)
    assert_state(result, reference(theta_0, theta_1, alpha))
    # Integer buffers are fine_tuned's (11 counted batches), not zero_shot's (0).
    assert int(result["1.num_batches_tracked"]) == 11
    # Inputs are untouched.
    assert torch.equal(zero_shot[0].weight, theta_0["0.weight"]) and int(zero_shot[1].num_batches_tracked) == 0


def test_interpolate_state_dicts_and_paths(tmp_path: Path) -> None:
    zero_shot = bn_net(0)
    fine_tuned = fine_tune(zero_shot, seed=2)
    theta_0 = {k: v.clone() for k, v in zero_shot.state_dict().items()}
    theta_1 = {k: v.clone() for k, v in fine_tuned.state_dict().items()}
    expected = reference(theta_0, theta_1, 0.4)
    assert_state(interpolate(theta_0, theta_1, 0.4), expected)

    save_file(theta_0, str(tmp_path / "zero_shot.safetensors"))
    torch.save(theta_1, tmp_path / "fine_tuned.pt")
    torch.save({"state_dict": theta_1, "epoch": 9}, tmp_path / "fine_tuned.ckpt")
    assert_state(interpolate(tmp_path / "zero_shot.safetensors", tmp_path / "fine_tuned.pt", 0.4), expected)
    assert_state(interpolate(str(tmp_path / "zero_shot.safetensors"), tmp_path / "fine_tuned.ckpt", 0.4), expected)
    assert_state(interpolate(zero_shot, tmp_path / "fine_tuned.ckpt", 0.4), expected)


def test_interpolate_mismatched_keys_and_shapes_raise_naming_them() -> None:
    theta_0 = bn_net(0).state_dict()
    theta_1 = fine_tune(bn_net(0), seed=1).state_dict()
    with pytest.raises(ValueError, match=r"3\.bias"):
        interpolate({k: v for k, v in theta_0.items() if k != "3.bias"}, theta_1, 0.5)
    with pytest.raises(ValueError, match=r"3\.bias"):
        interpolate(theta_0, {k: v for k, v in theta_1.items() if k != "3.bias"}, 0.5)
    with pytest.raises(ValueError, match=r"extra\.scale"):
        interpolate({**theta_0, "extra.scale": torch.ones(1)}, theta_1, 0.5)
    with pytest.raises(ValueError, match=r"0\.weight"):
        interpolate({**theta_0, "0.weight": torch.zeros(6, 4)}, theta_1, 0.5)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            interpolate(theta_0, theta_1, bad)


def test_interpolate_bf16_is_computed_in_fp32_and_returned_as_bf16() -> None:
    zero_shot = bn_net(0, torch.bfloat16)
    fine_tuned = fine_tune(zero_shot, seed=3)
    alpha = 0.3
    result = interpolate(zero_shot, fine_tuned, alpha)
    expected = reference(zero_shot.state_dict(), fine_tuned.state_dict(), alpha)
    in_bf16 = 0
    for name, value in expected.items():
        if not value.is_floating_point():
            assert torch.equal(result[name], value)
            continue
        assert result[name].dtype == torch.bfloat16, name
        # One rounding of the (nearly exact) fp32 value: the float64 value rounded to bf16.
        assert torch.equal(result[name], value.to(torch.bfloat16)), name
        t0, t1 = zero_shot.state_dict()[name], fine_tuned.state_dict()[name]
        in_bf16 += int(((1 - alpha) * t0 + alpha * t1 != value.to(torch.bfloat16)).sum())
    assert in_bf16 > 0, "bf16 arithmetic would round the same here; the test could not tell the two apart"


class Encoded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(7, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_exactness_with_a_shared_frozen_encoder_and_a_linear_head(alpha: float) -> None:
    torch.manual_seed(0)
    zero_shot = Encoded().double()
    fine_tuned = copy.deepcopy(zero_shot)
    with torch.no_grad():
        fine_tuned.head.weight.add_(torch.randn_like(fine_tuned.head.weight))
        fine_tuned.head.bias.add_(torch.randn_like(fine_tuned.head.bias))
    x = torch.randn(32, 7, dtype=torch.float64)
    logits_0, logits_1 = zero_shot(x), fine_tuned(x)

    merged = Encoded().double()
    merged.load_state_dict(interpolate(zero_shot, fine_tuned, alpha))
    expected = (1 - alpha) * logits_0 + alpha * logits_1
    torch.testing.assert_close(merged(x), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(logits_0, logits_1)


# ---------------------------------------------------------------------------------------------- Fisher-weighted
def fisher_reference(theta_0: dict, theta_1: dict, fishers: tuple[dict, dict], alpha: float, floor: float) -> dict:
    out = reference(theta_0, theta_1, alpha)
    for name in fishers[0]:
        f0 = fishers[0][name].double().clamp(min=floor)
        f1 = fishers[1][name].double().clamp(min=floor)
        t0, t1 = theta_0[name].double(), theta_1[name].double()
        out[name] = ((1 - alpha) * f0 * t0 + alpha * f1 * t1) / ((1 - alpha) * f0 + alpha * f1)
    return out


@pytest.mark.parametrize("floor", [1e-8, 0.25])
@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.7])
def test_fisher_weighted_interpolation_matches_the_formula(alpha: float, floor: float) -> None:
    zero_shot = bn_net(0)
    fine_tuned = fine_tune(zero_shot, seed=4)
    theta_0, theta_1 = zero_shot.state_dict(), fine_tuned.state_dict()
    generator = torch.Generator().manual_seed(5)
    fishers: tuple[dict, dict] = ({}, {})
    for name in ("0.weight", "0.bias", "3.weight"):  # the rest has no Fisher: interpolated plainly
        for fisher in fishers:
            values = torch.rand(theta_1[name].shape, generator=generator) * 2
            values[values < 0.6] = 0.0  # zeros that the floor must lift
            fisher[name] = values
    result = interpolate(zero_shot, fine_tuned, alpha, fisher=fishers, fisher_floor=floor)
    expected = fisher_reference(theta_0, theta_1, fishers, alpha, floor)
    assert_state(result, expected, tol=1e-5)
    plain = reference(theta_0, theta_1, alpha)
    assert not torch.allclose(result["0.weight"].double(), plain["0.weight"], atol=1e-3)
    torch.testing.assert_close(result["3.bias"].double(), plain["3.bias"], rtol=1e-6, atol=1e-6)


def test_fisher_keys_in_only_one_raise_naming_them() -> None:
    theta_0 = bn_net(0).state_dict()
    theta_1 = fine_tune(bn_net(0), seed=1).state_dict()
    f = {"0.weight": torch.ones(6, 5)}
    with pytest.raises(ValueError, match=r"3\.weight"):
        interpolate(theta_0, theta_1, 0.5, fisher=(f, {**f, "3.weight": torch.ones(3, 6)}))
    with pytest.raises(ValueError, match=r"0\.weight"):
        interpolate(theta_0, theta_1, 0.5, fisher=({"0.weight": torch.ones(5, 6)}, {"0.weight": torch.ones(5, 6)}))
    with pytest.raises(TypeError, match="fisher"):
        interpolate(theta_0, theta_1, 0.5, fisher=(f,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fisher_floor"):
        interpolate(theta_0, theta_1, 0.5, fisher=(f, f), fisher_floor=0.0)


# ---------------------------------------------------------------------------------------------- diagonal Fisher
def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def data(seed: int, count: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 5, generator=generator), torch.randint(0, 3, (count,), generator=generator)


def fisher_loop(model: nn.Module, examples: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """The definition, one example at a time: mean of squared gradients of log p(y | x), in eval mode."""
    model = copy.deepcopy(model).double().eval()
    totals = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for x, y in examples:
        model.zero_grad()
        log_probs = torch.log_softmax(model(x.double().unsqueeze(0)), dim=-1)
        log_probs[0, y].backward()
        for name, p in model.named_parameters():
            totals[name] += p.grad.square()
    return {name: total / len(examples) for name, total in totals.items()}


def test_empirical_fisher_matches_a_per_example_loop() -> None:
    model = mlp(0)
    batches = [data(1, 5), data(2, 7)]
    result = diagonal_fisher(model, batches, labels="empirical")
    expected = fisher_loop(model, [(x[i], int(y[i])) for x, y in batches for i in range(len(x))])
    assert set(result) == set(expected)
    for name, value in expected.items():
        assert result[name].dtype == torch.float32 and result[name].shape == value.shape
        torch.testing.assert_close(result[name].double(), value, rtol=1e-5, atol=1e-7, msg=name)
    # max_batches stops early: the first batch alone.
    first = diagonal_fisher(model, batches, labels="empirical", max_batches=1)
    expected_first = fisher_loop(model, [(batches[0][0][i], int(batches[0][1][i])) for i in range(5)])
    for name, value in expected_first.items():
        torch.testing.assert_close(first[name].double(), value, rtol=1e-5, atol=1e-7, msg=name)


def test_empirical_fisher_of_a_batchnorm_model_uses_eval_mode_and_restores_modes() -> None:
    model = bn_net(0)
    with torch.no_grad():  # running statistics far from a batch's own, so train mode would give other numbers
        model[1].running_mean.fill_(0.7)
        model[1].running_var.fill_(3.0)
    model.train()
    model[2].eval()
    modes = [m.training for m in model.modules()]
    stats = (model[1].running_mean.clone(), model[1].running_var.clone(), model[1].num_batches_tracked.clone())
    x, y = data(3, 10)
    result = diagonal_fisher(model, [(x, y)], labels="empirical")
    expected = fisher_loop(model, [(x[i], int(y[i])) for i in range(10)])
    for name, value in expected.items():
        torch.testing.assert_close(result[name].double(), value, rtol=1e-5, atol=1e-7, msg=name)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[1].running_mean, stats[0]) and torch.equal(model[1].running_var, stats[1])
    assert torch.equal(model[1].num_batches_tracked, stats[2])


def test_sampled_fisher_is_reproducible_per_seed() -> None:
    model = mlp(0)
    batches = [data(1, 6)[0], data(2, 6)[0]]  # bare inputs: labels come from the model
    first = diagonal_fisher(model, batches, labels="sample", seed=3)
    again = diagonal_fisher(model, batches, labels="sample", seed=3)
    other = diagonal_fisher(model, batches, labels="sample", seed=4)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_sampled_fisher_estimates_the_expectation_over_the_models_own_predictions() -> None:
    model = mlp(0)
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([1.0, 0.0, -1.0]))  # a clear, not one-hot, preference
    x, _ = data(6, 4)
    repeats = 400
    sampled = diagonal_fisher(model, [x] * repeats, labels="sample", seed=0)

    # The Fisher proper: sum over classes of p(y | x) * squared gradient, averaged over x.
    probabilities = torch.softmax(model(x).double(), dim=-1).detach()
    exact: dict[str, torch.Tensor] = {}
    by_argmax: dict[str, torch.Tensor] = {}
    for i in range(len(x)):
        for label in range(3):
            per_label = fisher_loop(model, [(x[i], label)])
            for name, value in per_label.items():
                exact[name] = exact.get(name, 0) + probabilities[i, label] * value / len(x)
                if label == int(probabilities[i].argmax()):
                    by_argmax[name] = by_argmax.get(name, 0) + value / len(x)
    for name in exact:
        relative = abs(sampled[name].double().sum() - exact[name].sum()) / exact[name].sum()
        assert relative < 0.1, (name, float(relative))
        wrong = abs(by_argmax[name].sum() - exact[name].sum()) / exact[name].sum()
        assert wrong > 0.3, (name, float(wrong))


def test_diagonal_fisher_argument_errors() -> None:
    model = mlp(0)
    x, _ = data(1, 4)
    with pytest.raises(ValueError, match="labels"):
        diagonal_fisher(model, [x], labels="true")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empirical"):
        diagonal_fisher(model, [x], labels="empirical")
    with pytest.raises(ValueError, match="batches"):
        diagonal_fisher(model, [], labels="sample")
    with pytest.raises(ValueError, match="max_batches"):
        diagonal_fisher(model, [x], max_batches=0)


# ---------------------------------------------------------------------------------------------- alpha grid
def test_alphas_grid_is_the_papers() -> None:
    assert len(ALPHAS) == 11 and ALPHAS[0] == 0.0 and ALPHAS[-1] == 1.0
    assert all(math.isclose(b - a, 0.1, abs_tol=1e-12) for a, b in itertools.pairwise(ALPHAS))
    assert ALPHAS[5] == 0.5


def test_choose_alpha_max_min_ties_and_nan() -> None:
    curve = {0.0: 0.62, 0.2: 0.9, 0.4: 0.91, 0.6: 0.88, 1.0: 0.94}
    assert choose_alpha(curve) == 1.0
    assert choose_alpha(curve, mode="min") == 0.0
    assert choose_alpha({0.8: 0.9, 0.3: 0.9, 0.5: 0.7, 0.1: 0.9}) == 0.1
    assert choose_alpha({0.9: 0.1, 0.6: 0.1, 0.2: 0.5}, mode="min") == 0.6
    assert choose_alpha({0.0: float("nan"), 0.5: 0.3, 1.0: 0.2}) == 0.5
    assert choose_alpha({0.0: float("nan"), 0.5: 0.3, 1.0: 0.2}, mode="min") == 1.0
    with pytest.raises(ValueError, match="curve"):
        choose_alpha({0.0: float("nan"), 1.0: float("nan")})
    with pytest.raises(ValueError, match="curve"):
        choose_alpha({})
    with pytest.raises(ValueError, match="mode"):
        choose_alpha(curve, mode="best")  # type: ignore[arg-type]


def test_check_alphas() -> None:
    assert check_alphas([0, 0.5, 1]) == (0.0, 0.5, 1.0)
    assert check_alphas(ALPHAS) == ALPHAS
    assert check_alphas(x / 4 for x in range(3)) == (0.0, 0.25, 0.5)
    with pytest.raises(ValueError, match="empty"):
        check_alphas([])
    with pytest.raises(ValueError, match="repeat"):
        check_alphas([0.1, 0.5, 0.1])
    with pytest.raises(ValueError, match="alphas"):
        check_alphas([0.1, float("nan")])
    for bad in ("0.5", 0.5, None, [0.1, "0.2"], [True]):
        with pytest.raises(TypeError, match="alphas"):
            check_alphas(bad)  # type: ignore[arg-type]


def test_fisher_weighting_refuses_extrapolation() -> None:
    zero, fine = nn.Linear(3, 2), nn.Linear(3, 2)
    fisher = {name: torch.ones_like(p) for name, p in fine.named_parameters()}
    with pytest.raises(ValueError, match=r"alpha=1.2 is out of range: allowed \[0, 1\]"):
        interpolate(zero, fine, 1.2, fisher=(fisher, fisher))
    interpolate(zero, fine, 1.2)  # plain interpolation extrapolates


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight


def test_interpolate_fills_tied_names_missing_from_a_file(tmp_path: Path) -> None:
    from safetensors.torch import save_model

    torch.manual_seed(0)
    zero, fine = Tied(), Tied()
    save_model(zero, str(tmp_path / "zero.safetensors"))  # names the tied tensor once
    merged = interpolate(tmp_path / "zero.safetensors", fine, 0.25)
    expected = 0.75 * zero.embed.weight.detach().double() + 0.25 * fine.embed.weight.detach().double()
    for name in ("embed.weight", "head.weight"):
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-7)
