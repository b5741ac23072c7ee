"""weightavg.methods.ewa against plain reference computations: the partition covers every token once, the update is
the paper's formula, the merge equals a dense FFN with averaged weights, and state round trips."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from weightavg.ewa import RandomPartitionMoE, default_ffn_names, linear_ramp, mixtures, share_all, to_dense, to_moe


def ffn(dim: int = 6, hidden: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = ffn(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class Tiny(nn.Module):
    def __init__(self, blocks: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block() for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def perturb(moe: RandomPartitionMoE, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stack in moe.stacks():
            stack.add_(torch.randn(stack.shape, generator=generator))


@pytest.mark.parametrize("shape", [(3, 7, 6), (11, 6), (1, 1, 6)])
@pytest.mark.parametrize("experts", [2, 4, 5])
def test_each_token_goes_through_exactly_one_expert_and_returns_in_place(shape: tuple[int, ...], experts: int) -> None:
    torch.manual_seed(0)
    moe = RandomPartitionMoE(ffn(), experts, seed=3)
    perturb(moe)
    x = torch.randn(shape)
    out = moe(x)
    assert out.shape == x.shape
    tokens = x.reshape(-1, 6)
    # Reference: the same permutation drawn plainly, split into near-equal groups, each token through its expert.
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(3))
    groups = torch.tensor_split(order, experts)
    assert sorted(torch.cat(groups).tolist()) == list(range(tokens.shape[0]))  # every token exactly once
    assert max(len(g) for g in groups) - min(len(g) for g in groups) <= 1
    expected = torch.empty_like(tokens)
    for index, group in enumerate(groups):
        expert = copy.deepcopy(moe.template)
        expert.load_state_dict(moe.expert_tensors(index))
        expected[group] = expert(tokens[group])
    torch.testing.assert_close(out.reshape(-1, 6), expected)


def test_the_update_is_the_papers_formula_in_one_batched_op() -> None:
    moe = RandomPartitionMoE(ffn(), 4)
    perturb(moe)
    before = [stack.detach().double().clone() for stack in moe.stacks()]
    moe.share(0.3)
    n = 4
    for old, new in zip(before, moe.stacks(), strict=True):
        for i in range(n):
            others = sum(old[j] for j in range(n) if j != i)
            expected = (1 - 0.3) * old[i] + 0.3 / (n - 1) * others
            torch.testing.assert_close(new[i].double(), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(new.double().mean(0), old.mean(0), rtol=1e-6, atol=1e-6)  # the mean is kept
    moe.share((n - 1) / n)  # collapses every expert onto the mean
    assert moe.spread() < 1e-6
    with pytest.raises(ValueError, match=r"beta=0\.9"):
        moe.share(0.9)


def test_eval_mode_and_the_merge_compute_the_dense_ffn_with_averaged_weights() -> None:
    torch.manual_seed(0)
    model = Tiny()
    names = to_moe(model, num_experts=3)
    assert names == ["blocks.1.mlp", "blocks.3.mlp"] == default_ffn_names(Tiny())
    for moe in mixtures(model):
        perturb(moe, seed=len(moe.names))
    x = torch.randn(2, 5, 6)
    reference = Tiny()
    for name in names:
        moe = model.get_submodule(name)
        dense = reference.get_submodule(name)
        with torch.no_grad():
            for parameter_name, stack in zip(moe.names, moe.stacks(), strict=True):
                dense.get_parameter(parameter_name).copy_(stack.mean(0))
    for other in ("blocks.0", "blocks.2"):
        reference.get_submodule(other).load_state_dict(model.get_submodule(other).state_dict())
    for i in (1, 3):
        reference.blocks[i].norm.load_state_dict(model.blocks[i].norm.state_dict())
    model.eval()
    torch.testing.assert_close(model(x), reference(x))
    parameters = sum(p.numel() for p in Tiny().parameters())
    assert to_dense(model) == 2
    assert not mixtures(model)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert [type(m) for m in model.modules()] == [type(m) for m in Tiny().modules()]
    torch.testing.assert_close(model(x), reference(x))


def test_state_round_trip_and_selection() -> None:
    torch.manual_seed(0)
    model = Tiny()
    to_moe(model, "blocks.*.mlp", num_experts=2, seed=5)
    assert len(mixtures(model)) == 4
    share_all(model, 0.25)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = Tiny()
    to_moe(restored, "blocks.*.mlp", num_experts=2, seed=5)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, 3, 6)
    torch.testing.assert_close(restored(x), model(x))  # same weights, same seeded partitions
    with pytest.raises(ValueError, match="matches no submodule"):
        to_moe(Tiny(), "nothing.*")
    with pytest.raises(ValueError, match="already a mixture"):
        to_moe(model, "blocks.0.mlp")
    with pytest.raises(ValueError, match="num_experts=1"):
        RandomPartitionMoE(ffn(), 1)
    picked = to_moe(Tiny(), lambda name, module: name == "blocks.2.mlp")
    assert picked == ["blocks.2.mlp"]


def test_linear_ramp() -> None:
    assert [linear_ramp(s, 0.3, 10) for s in (0, 5, 10, 20)] == pytest.approx([0.0, 0.15, 0.3, 0.3])
    assert linear_ramp(7, 0.2, 0) == 0.2


def test_optimizer_wrapper_shares_after_each_step_and_resumes() -> None:
    from weightavg.optim import EWA

    def build() -> tuple[Tiny, EWA]:
        torch.manual_seed(0)
        model = Tiny()
        to_moe(model, num_experts=3, seed=1)
        return model, EWA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, beta=0.4, ramp_steps=4)

    def train(model: Tiny, opt: EWA, steps: range) -> None:
        for step in steps:
            x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    model, opt = build()
    # One step by hand: SGD, then every stack moves toward its mean with beta = 0.4 * 1/4.
    reference = copy.deepcopy(model)
    train(model, opt, range(1))
    inner = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    inner.zero_grad()
    reference(torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0))).pow(2).mean().backward()
    inner.step()
    for moe in mixtures(reference):
        with torch.no_grad():
            for stack in moe.stacks():
                mean = stack.mean(0, keepdim=True)
                stack.copy_(stack + 0.1 * 3 / 2 * (mean - stack))
    for key, value in reference.state_dict().items():
        if torch.is_tensor(value):  # (each mixture's permutation stream is its extra state)
            torch.testing.assert_close(model.state_dict()[key], value, msg=key)

    full_model, full_opt = build()
    train(full_model, full_opt, range(8))
    part_model, part_opt = build()
    train(part_model, part_opt, range(3))
    state = copy.deepcopy((part_model.state_dict(), part_opt.state_dict()))
    resumed_model, resumed_opt = build()
    resumed_model.load_state_dict(state[0])
    resumed_opt.load_state_dict(state[1])
    train(resumed_model, resumed_opt, range(3, 8))
    for key, value in full_model.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, resumed_model.state_dict()[key]), key
    assert full_opt.merge() == 2 and not mixtures(full_model)
    with pytest.raises(ValueError, match="to_moe"):
        EWA(torch.optim.SGD(Tiny().parameters(), lr=0.1), Tiny())


def test_eval_follows_every_change_of_the_experts() -> None:
    """Eval mode computes the merged FFN from the experts as they are now: after an optimizer step, share, a load, and
    with other weights swapped in by pointer and rewritten in place (WiSE-FT blends, LCSC candidates do that)."""

    def check(moe: RandomPartitionMoE, x: torch.Tensor) -> None:
        with torch.no_grad():
            torch.testing.assert_close(moe(x), moe.to_dense()(x))

    torch.manual_seed(0)
    moe = RandomPartitionMoE(ffn(), num_experts=3)
    perturb(moe)
    moe.eval()
    x = torch.randn(4, 6)
    check(moe, x)
    opt = torch.optim.SGD(moe.parameters(), lr=0.5)
    moe.train()
    moe(x).pow(2).sum().backward()
    opt.step()
    moe.eval()
    check(moe, x)
    moe.share(0.5)
    check(moe, x)
    other = RandomPartitionMoE(ffn(), num_experts=3)
    perturb(other, seed=3)
    moe.load_state_dict(other.state_dict())
    check(moe, x)
    buffers = [stack.detach().clone() for stack in moe.stacks()]
    saved = [stack.data for stack in moe.stacks()]
    for stack, buffer in zip(moe.stacks(), buffers, strict=True):
        stack.data = buffer  # swapped in by pointer, as the engine does
    for scale in (2.0, -1.0):
        for buffer in buffers:
            buffer.mul_(scale)  # rewritten in place: the parameters' own version counters do not move
        check(moe, x)
    for stack, data in zip(moe.stacks(), saved, strict=True):
        stack.data = data
    moe(x).sum().backward()  # grad enabled: the mean is part of the graph
    assert all(stack.grad is not None and stack.grad.abs().sum() > 0 for stack in moe.stacks())


def test_bad_selections_leave_the_model_untouched() -> None:
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"matches both 'blocks\.1' and 'blocks\.1\.mlp'"):
        to_moe(model, ["blocks.1", "blocks.1.mlp"])
    with pytest.raises(TypeError, match="select=3 must be"):
        to_moe(model, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed='x' must be an int or None"):
        to_moe(model, seed="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'blocks\.0\.norm' \(LayerNorm\) has buffers|matches"):
        to_moe(nn.Sequential(nn.BatchNorm1d(6), ffn()), "*")
    assert not mixtures(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    empty = RandomPartitionMoE(ffn(), num_experts=3)
    assert empty(torch.zeros(0, 6)).shape == (0, 6) and empty(torch.zeros(2, 0, 6)).shape == (2, 0, 6)
