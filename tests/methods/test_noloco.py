"""weightavg.methods.noloco and the NoLoCo / DiLoCo optimizer wrappers in one process (a replica alone: no process
group, so a group of one): the seeded peer groups against the rule written out, the outer steps against the paper's
formula in float64 and against ``torch.optim.SGD`` on the slow weights, fp32 slow weights for bf16 models, an exact
state round trip, argument checks and the traffic counters. The multi-process behaviour is in
``tests/distributed/test_noloco_gloo.py``."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn

from weightavg.methods.noloco import DiLoCoRule, NoLoCoRule, Replica, peer_groups
from weightavg.optim import DiLoCo, NoLoCo

OUTER_LR, OUTER_MOMENTUM, SYNC_EVERY = 0.7, 0.5, 3


@pytest.fixture(autouse=True)
def _alone() -> None:
    assert not (dist.is_available() and dist.is_initialized()), "these tests need a replica without a process group"


def small_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """A two-layer tanh network (23 parameters), initialised from ``seed`` without touching the global generator."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    return model.to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 4, generator=generator).to(dtype), torch.randn(8, 2, generator=generator).to(dtype)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    x, y = batch(step, next(model.parameters()).dtype)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def flat(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one float64 vector (a copy)."""
    return torch.cat([p.detach().flatten().double() for p in model.parameters()])


def slow(opt: NoLoCo | DiLoCo) -> torch.Tensor:
    """The slow weights phi as one float64 vector (a copy), in the model's parameter order."""
    return torch.cat([t.flatten().double() for t in opt.averager.averaged_tensors().values()])


def momentum(opt: NoLoCo | DiLoCo) -> torch.Tensor:
    return torch.cat([m.flatten().double() for m in opt.replica.state_dict()["momentum"]])


def record_fast_weights(model: nn.Module, inner: torch.optim.Optimizer) -> list[torch.Tensor]:
    """theta after every inner step, taken by a post-step hook of the inner optimizer (before any outer step)."""
    thetas: list[torch.Tensor] = []
    inner.register_step_post_hook(lambda *_: thetas.append(flat(model)))
    return thetas


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str, tol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=msg)


# ------------------------------------------------------------------------------------------------- peer groups
def documented_permutation(world: int, outer_step: int, seed: int) -> list[int]:
    """The permutation of one outer step, from a CPU generator seeded by (seed, outer step) as documented."""
    digest = hashlib.blake2b(f"{seed}:{outer_step}".encode(), digest_size=4).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    return torch.randperm(world, generator=generator).tolist()


def groups_by_hand(perm: list[int], size: int) -> list[list[int]]:
    """k = max(1, W // n) groups; group j = perm[j], perm[j + k], ... up to index k n (n ranks, or all W when W < n);
    the leftovers perm[k n:] join groups 0, 1, ... one each, in turn."""
    world = len(perm)
    k = max(1, world // size)
    groups = [[perm[i] for i in range(j, min(world, k * size), k)] for j in range(k)]
    for index in range(k * size, world):
        groups[(index - k * size) % k].append(perm[index])
    return groups


def partition(groups: list[list[int]]) -> frozenset[frozenset[int]]:
    return frozenset(frozenset(g) for g in groups)


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("world", range(1, 10))
def test_peer_groups_follow_the_documented_rule(world: int, size: int) -> None:
    for seed in (0, 7):
        for outer_step in range(6):
            groups = peer_groups(world, size, outer_step, seed)
            perm = documented_permutation(world, outer_step, seed)
            assert groups == groups_by_hand(perm, size), (world, size, outer_step, seed)
            members = sorted(rank for group in groups for rank in group)
            assert members == list(range(world)), groups  # every rank in exactly one group
            sizes = sorted(len(group) for group in groups)
            if world < size:
                assert sizes == [world]  # one group of everyone
            else:
                assert len(groups) == world // size
                assert sizes[0] >= size and sizes[-1] - sizes[0] <= 1, groups
                if world % size == 0:
                    assert sizes == [size] * (world // size)
            assert peer_groups(world, size, outer_step, seed) == groups  # a pure function of its inputs


def test_peer_groups_examples_from_the_docstring() -> None:
    assert peer_groups(1, 2, 0) == [[0]]
    for step in range(5):
        assert sorted(peer_groups(3, 2, step)[0]) == [0, 1, 2]  # W = 3, n = 2: one triple
        assert sorted(map(len, peer_groups(5, 2, step))) == [2, 3]


@pytest.mark.parametrize("world", range(4, 10))
def test_peer_groups_change_with_the_outer_step(world: int) -> None:
    by_step = [partition(peer_groups(world, 2, step)) for step in range(12)]
    assert len(set(by_step)) > 1, f"the same pairs at every outer step for W={world}"


@pytest.mark.parametrize("world", range(4, 10))
def test_peer_groups_depend_on_the_seed(world: int) -> None:
    steps = range(12)
    by_seed = {seed: [partition(peer_groups(world, 2, step, seed)) for step in steps] for seed in (0, 1, 12345)}
    assert by_seed[0] != by_seed[1] and by_seed[0] != by_seed[12345] and by_seed[1] != by_seed[12345]


def test_peer_groups_errors() -> None:
    with pytest.raises(ValueError, match="world_size=0"):
        peer_groups(0, 2, 0)
    with pytest.raises(ValueError, match="group_size=1"):
        peer_groups(4, 1, 0)


# --------------------------------------------------------------------------------------- one replica, NoLoCo
def noloco_by_hand(
    phis: list[torch.Tensor], thetas: list[torch.Tensor], delta: torch.Tensor, i: int, a: float, b: float, c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's outer step for member ``i`` of a group (lists over the group, float64):
    delta_i <- a delta_i - b mean_G(phi - theta) - c (phi_i - mean_G(phi)); phi_i <- phi_i + delta_i."""
    mean_gap = sum(phi - theta for phi, theta in zip(phis, thetas, strict=True)) / len(phis)
    mean_phi = sum(phis) / len(phis)
    delta = a * delta - b * mean_gap - c * (phis[i] - mean_phi)
    return phis[i] + delta, delta


@pytest.mark.parametrize("mixing", [None, 0.3])
def test_noloco_alone_follows_the_formula(mixing: float | None) -> None:
    model = small_model()
    start = flat(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    thetas = record_fast_weights(model, inner)
    opt = NoLoCo(inner, SYNC_EVERY, OUTER_LR, OUTER_MOMENTUM, mixing=mixing)
    assert opt.replica.world_size == 1 and opt.replica.peers() == []
    assert torch.equal(slow(opt), start) and torch.equal(flat(model), start)  # phi starts at theta
    phi, delta = start.clone(), torch.zeros_like(start)  # the reference's own state, never reset from the code's
    c = OUTER_LR if mixing is None else mixing
    held = slow(opt)
    for step in range(1, 4 * SYNC_EVERY + 1):
        train_step(model, opt, step)
        if step % SYNC_EVERY:
            assert torch.equal(slow(opt), held), f"phi moved between outer steps (step {step})"
            assert torch.equal(flat(model), thetas[-1])
            continue
        phi, delta = noloco_by_hand([phi], [thetas[-1]], delta, 0, OUTER_MOMENTUM, OUTER_LR, c)
        held = slow(opt)
        assert_close(held, phi, f"phi after step {step}")
        assert_close(momentum(opt), delta, f"momentum after step {step}")
        assert torch.equal(flat(model), held), "theta <- phi after the outer step"
        assert (phi - thetas[-1]).abs().max() > 1e-3  # the outer step did something
    assert (opt.replica.inner_steps, opt.replica.outer_steps) == (4 * SYNC_EVERY, 4)


# --------------------------------------------------------------------------------------- one replica, DiLoCo
@pytest.mark.parametrize("nesterov", [True, False])
def test_diloco_alone_is_torch_sgd_on_the_slow_weights(nesterov: bool) -> None:
    model = small_model()
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    thetas = record_fast_weights(model, inner)
    opt = DiLoCo(inner, SYNC_EVERY, outer_lr=0.7, outer_momentum=0.9, nesterov=nesterov)
    reference = nn.Parameter(flat(model))
    outer = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=nesterov)
    for step in range(1, 4 * SYNC_EVERY + 1):
        train_step(model, opt, step)
        if step % SYNC_EVERY == 0:
            reference.grad = reference.detach() - thetas[-1]  # the pseudo-gradient of the only replica
            outer.step()
            assert_close(slow(opt), reference.detach(), f"phi after step {step}")
            assert_close(momentum(opt), outer.state[reference]["momentum_buffer"], f"momentum after step {step}")
            assert torch.equal(flat(model), slow(opt)), "theta <- phi after the outer step"
    with pytest.raises(TypeError, match="NoLoCo"):
        opt.replica.peers()


# ------------------------------------------------------------------------------------------- dtypes, layout
@pytest.mark.parametrize("method", [NoLoCo, DiLoCo])
def test_bf16_model_gets_fp32_slow_weights(method: type[NoLoCo] | type[DiLoCo]) -> None:
    model = small_model(dtype=torch.bfloat16)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    thetas = record_fast_weights(model, inner)
    opt = method(inner, SYNC_EVERY, outer_lr=OUTER_LR, outer_momentum=OUTER_MOMENTUM)
    averaged = opt.averager.averaged_tensors()
    assert [t.dtype for t in averaged.values()] == [torch.float32] * 4
    assert [t.shape for t in averaged.values()] == [p.shape for p in model.parameters()]
    assert all(m.dtype == torch.float32 for m in opt.replica.state_dict()["momentum"])
    phi = flat(model)
    for step in range(1, SYNC_EVERY + 1):
        train_step(model, opt, step)
    # One outer step from zero momentum: NoLoCo alone and heavy-ball or Nesterov DiLoCo alone all give phi - lr * g
    # (Nesterov: phi - lr (g + m g)).
    gap = phi - thetas[-1]
    expected = phi - OUTER_LR * (1 + OUTER_MOMENTUM) * gap if method is DiLoCo else phi - OUTER_LR * gap
    assert_close(slow(opt), expected, "fp32 phi after the outer step", tol=1e-6)
    for parameter, value in zip(model.parameters(), averaged.values(), strict=True):
        assert parameter.dtype == torch.bfloat16
        assert torch.equal(parameter.detach(), value.to(torch.bfloat16)), "theta <- phi, rounded to bf16"


def test_dtype_argument_sets_the_slow_weights_dtype() -> None:
    model = small_model(dtype=torch.float32)
    opt = NoLoCo(torch.optim.SGD(model.parameters(), lr=0.1), dtype=torch.float64)
    assert {t.dtype for t in opt.averager.averaged_tensors().values()} == {torch.float64}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_parameters_stay_the_same_objects() -> None:
    model = small_model()
    parameters = list(model.parameters())
    inner = torch.optim.SGD(parameters, lr=0.1, momentum=0.9)
    opt = NoLoCo(inner, SYNC_EVERY)
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], parameters, strict=True))
    for step in range(1, 2 * SYNC_EVERY + 1):
        train_step(model, opt, step)
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    assert set(inner.state) == set(parameters)  # the inner optimizer keeps stepping the model's own parameters


def test_slow_weights_context_swaps_phi_in_and_back() -> None:
    model = small_model()
    opt = NoLoCo(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=4)
    for step in range(1, 7):  # one outer step, then two inner steps: theta != phi
        train_step(model, opt, step)
    live, phi = flat(model), slow(opt)
    assert not torch.equal(live, phi)
    with opt.slow_weights():
        assert torch.equal(flat(model), phi)
        with pytest.raises(RuntimeError, match=r"step\(\)"):
            opt.step()
    assert torch.equal(flat(model), live)
    train_step(model, opt, 7)  # stepping works again after the block


# -------------------------------------------------------------------------------------------------- state
def build(method: type[NoLoCo] | type[DiLoCo], seed: int) -> tuple[nn.Module, NoLoCo | DiLoCo]:
    model = small_model(seed)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, method(inner, SYNC_EVERY, outer_lr=OUTER_LR, outer_momentum=OUTER_MOMENTUM)


def roundtrip(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("load_model_first", [False, True])
@pytest.mark.parametrize("method", [NoLoCo, DiLoCo])
def test_state_round_trip_is_exact(method: type[NoLoCo] | type[DiLoCo], load_model_first: bool) -> None:
    model, opt = build(method, seed=0)
    for step in range(1, 16):
        train_step(model, opt, step)
    straight = flat(model), slow(opt), momentum(opt), opt.replica.outer_steps, opt.traffic.syncs

    model, opt = build(method, seed=0)
    for step in range(1, 8):  # stop between outer steps (after step 6's, before step 9's)
        train_step(model, opt, step)
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    assert isinstance(saved, dict) and set(saved["opt"]) == {"version", "optimizer", "averaging", "outer"}
    fresh = small_model(seed=1)  # other weights: everything must come from the saved state
    if load_model_first:
        fresh.load_state_dict(saved["model"])
    resumed = method(
        torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9),
        SYNC_EVERY,
        outer_lr=OUTER_LR,
        outer_momentum=OUTER_MOMENTUM,
    )
    if not load_model_first:
        fresh.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    assert resumed.replica.inner_steps == 7
    for step in range(8, 16):
        train_step(fresh, resumed, step)
    again = flat(fresh), slow(resumed), momentum(resumed), resumed.replica.outer_steps, resumed.traffic.syncs
    for name, a, b in zip(("theta", "phi", "momentum"), straight[:3], again[:3], strict=True):
        assert torch.equal(a, b), name
    assert straight[3:] == again[3:] == (5, 5)  # outer steps and syncs


def test_load_state_dict_refuses_foreign_states() -> None:
    _, opt = build(NoLoCo, seed=0)
    state = opt.state_dict()
    with pytest.raises(ValueError, match="outer"):
        opt.load_state_dict({"optimizer": state["optimizer"], "averaging": state["averaging"]})
    with pytest.raises(ValueError, match="extra"):
        opt.load_state_dict({**state, "extra": 1})
    with pytest.raises(ValueError, match="momentum"):
        opt.replica.load_state_dict({"inner_steps": 0})
    other = NoLoCo(torch.optim.SGD(nn.Linear(4, 2).double().parameters(), lr=0.1))
    with pytest.raises(ValueError):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="momentum"):
        opt.replica.load_state_dict(other.replica.state_dict())


# --------------------------------------------------------------------------------------------------- errors
NOLOCO_ERRORS: list[tuple[dict[str, object], type[Exception], str]] = [
    ({"sync_every": 0}, ValueError, "sync_every=0"),
    ({"sync_every": 2.5}, TypeError, "sync_every=2.5"),
    ({"outer_lr": 0}, ValueError, "outer_lr=0"),
    ({"outer_lr": float("nan")}, ValueError, "outer_lr=nan"),
    ({"outer_momentum": 1.0}, ValueError, "outer_momentum=1.0"),
    ({"outer_momentum": -0.1}, ValueError, "outer_momentum=-0.1"),
    ({"group_size": 1}, ValueError, "group_size=1"),
    ({"mixing": -0.5}, ValueError, "mixing=-0.5"),
    ({"seed": -1}, ValueError, "seed=-1"),
]
DILOCO_ERRORS: list[tuple[dict[str, object], type[Exception], str]] = [
    ({"sync_every": 0}, ValueError, "sync_every=0"),
    ({"outer_lr": 0}, ValueError, "outer_lr=0"),
    ({"outer_momentum": 1.0}, ValueError, "outer_momentum=1.0"),
    ({"nesterov": "yes"}, TypeError, "nesterov='yes'"),
]


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "message"),
    [(NoLoCo, *case) for case in NOLOCO_ERRORS] + [(DiLoCo, *case) for case in DILOCO_ERRORS],
)
def test_bad_arguments_are_refused_before_touching_the_model(
    make: Callable[..., NoLoCo | DiLoCo], kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    rule = NoLoCoRule if make is NoLoCo else DiLoCoRule
    with pytest.raises(error, match=message):
        rule(**kwargs)  # type: ignore[arg-type]
    model = small_model()
    pointers = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(error, match=message):
        make(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    assert [p.data_ptr() for p in model.parameters()] == pointers  # not re-homed into a flat buffer


def test_rules_are_frozen() -> None:
    with pytest.raises(AttributeError):
        NoLoCoRule().outer_lr = 0.1  # type: ignore[misc]
    assert DiLoCoRule().nesterov is True and NoLoCoRule().one_tensor and not NoLoCoRule(mixing=0.3).one_tensor


# -------------------------------------------------------------------------------------------------- traffic
@pytest.mark.parametrize("method", [NoLoCo, DiLoCo])
def test_no_traffic_without_a_process_group(method: type[NoLoCo] | type[DiLoCo]) -> None:
    model, opt = build(method, seed=0)
    for step in range(1, 4 * SYNC_EVERY + 2):
        train_step(model, opt, step)
    assert opt.traffic.as_dict() == {"bytes_sent": 0, "operations": 0, "wait_seconds": 0.0, "syncs": 4}
    live = flat(model)
    opt.average_replicas()  # alone: nothing to average with
    assert torch.equal(flat(model), live)


def test_replica_alone_without_the_wrapper() -> None:
    """The method object on an engine built by hand: inner_step() syncs on every sync_every-th call only."""
    from weightavg.core.averager import Averager
    from weightavg.core.rule import Snapshot

    model = small_model()
    replica = Replica(Averager(list(model.parameters()), Snapshot(), contiguous=True), NoLoCoRule(sync_every=2))
    assert [replica.inner_step() for _ in range(5)] == [False, True, False, True, False]
    assert replica.outer_steps == 2 and replica.traffic.syncs == 2


def test_a_state_with_another_seed_is_refused_before_anything_loads() -> None:
    model = small_model()
    saved = NoLoCo(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync_every=2, seed=3)
    model(torch.ones(2, model[0].in_features, dtype=torch.float64)).sum().backward()
    saved.step()
    state = saved.state_dict()
    fresh_model = small_model(seed=1)
    fresh = NoLoCo(torch.optim.SGD(fresh_model.parameters(), lr=0.1, momentum=0.9), sync_every=2, seed=4)
    with pytest.raises(ValueError, match="saved with seed=3; this replica has seed=4"):
        fresh.load_state_dict(state)
    assert fresh.optimizer.state == {} and fresh.replica.inner_steps == 0  # nothing was loaded
