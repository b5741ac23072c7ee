"""NoLoCo (Kolehmainen et al. 2025, "NoLoCo: No-all-reduce Low Communication Training Method for Large Models") and
DiLoCo (Douillard et al. 2023), its all-reduce baseline: data-parallel replicas that train alone for ``H`` inner steps
and then average through an outer step on per-replica slow weights.

Per replica i: fast weights theta_i (the model, trained by the inner optimizer), slow weights phi_i and outer momentum
delta_i (zeros). Every ``sync_every`` inner steps:

- **NoLoCo**: the ranks are split into groups of ``group_size`` by a permutation drawn from a generator seeded by
  a hash of (``seed``, outer step): identical on every rank, no message needed. With k = W // n groups, group j is
  ``perm[j], perm[j + k], ...``; when n does not divide W, the W - k n leftover ranks ``perm[k n:]`` join groups
  0, 1, ... one each (so W = 3, n = 2 averages as one triple; W = 1 is a group of one). Within its group G::

      Delta_i = phi_i - theta_i
      delta_i <- a delta_i - b mean_G(Delta) - c (phi_i - mean_G(phi))       a: outer_momentum, b: outer_lr, c: mixing
      phi_i   <- phi_i + delta_i;   theta_i <- phi_i

  With b == c (the default) this is ``delta_i <- a delta_i + b (mean_G(theta) - phi_i)``: only theta travels. The
  exchange is point-to-point (``isend``/``irecv`` with the group's peers): no all-reduce, no broadcast.
- **DiLoCo**: the pseudo-gradient ``g = mean_i(phi - theta_i)`` by one all-reduce, then outer SGD on phi with
  momentum ``m`` (``buf <- m buf + g``) and Nesterov (``phi <- phi - lr (g + m buf)``, as ``torch.optim.SGD``) or
  heavy-ball (``phi <- phi - lr buf``). With two ranks, NoLoCo equals heavy-ball DiLoCo exactly.

Slow weights live in the engine (an ``Averager`` with a ``Snapshot`` rule, ``contiguous=True``): at least fp32, one
flat buffer per (device, dtype) group, so an outer step is a handful of flat ops and one message per group and peer.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from weightavg.core import kernels
from weightavg.core.averager import Averager
from weightavg.core.checks import check_bool, check_number
from weightavg.core.rule import canonical_eq, canonical_hash, check_saved_rule, compact_repr
from weightavg.core.settings import Frozen, Settings, describe_arguments

Tensors = list[torch.Tensor]


def peer_groups(world_size: int, group_size: int, outer_step: int, seed: int = 0) -> list[list[int]]:
    """NoLoCo's groups for one outer step: the same on every rank (a seeded permutation, no communication)."""
    check_number("world_size", world_size, low=1, integer=True)
    check_number("group_size", group_size, low=2, integer=True)
    # torch's CPU generator keeps 32 bits of its seed: hash (seed, step) into them, so both matter.
    key = hashlib.blake2b(f"{seed}:{outer_step}".encode(), digest_size=4).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key, "little"))
    perm = torch.randperm(world_size, generator=generator).tolist()
    count = max(1, world_size // group_size)
    groups = [perm[j : count * group_size : count] for j in range(count)]
    for index, rank in enumerate(perm[count * group_size :]):
        groups[index % count].append(rank)
    return groups


@dataclass(eq=False, repr=False)
class NoLoCoSettings(Settings):
    """NoLoCo's settings (defaults from the paper's code: H = 50, outer lr = mixing = 0.7, momentum 0.5, pairs)."""

    sync_every: int = 50
    """H, inner optimizer steps between outer steps."""
    outer_lr: float = 0.7
    """b, the outer learning rate (> 0)."""
    outer_momentum: float = 0.5
    """a, the outer momentum, in [0, 1)."""
    group_size: int = 2
    """n, replicas per group (2: pairs); leftovers join groups one each (W = 3: one triple)."""
    _: KW_ONLY
    mixing: float | None = None
    """c, the pull toward the group's mean slow weights; ``None`` = ``outer_lr``, when only the fast weights travel
    (one tensor per group and peer)."""
    seed: int = 0
    """Seeds the groups' permutations (the same on every rank)."""

    def __post_init__(self) -> None:
        check_number("sync_every", self.sync_every, low=1, integer=True)
        check_number("outer_lr", self.outer_lr, low=0.0, low_open=True)
        check_number("outer_momentum", self.outer_momentum, low=0.0, high=1.0, high_open=True)
        if self.mixing is not None:
            check_number("mixing", self.mixing, low=0.0)
        check_number("group_size", self.group_size, low=2, integer=True)
        check_number("seed", self.seed, low=0, integer=True)
        super().__post_init__()


@dataclass(eq=False, repr=False)
class NoLoCoRule(NoLoCoSettings, Frozen):
    """NoLoCo's outer step as a rule (the settings are ``NoLoCoSettings``'s)."""

    method_name = "NoLoCo"  # the callbacks' default name

    def __post_init__(self) -> None:
        super().__post_init__()
        self._freeze()

    def __repr__(self) -> str:
        # mixing=None means "equal to outer_lr": both spellings read the same (the outer step is the same).
        mixing = None if self.mixing is None or self.mixing == self.outer_lr else self.mixing
        return compact_repr(self, mixing=mixing).replace("Rule(", "(", 1)  # NoLoCo(sync_every=10)

    __eq__ = canonical_eq
    __hash__ = canonical_hash

    @property
    def one_tensor(self) -> bool:
        """Whether the fast path applies (mixing == outer_lr): only the fast weights are exchanged."""
        return self.mixing is None or self.mixing == self.outer_lr


@dataclass(eq=False, repr=False)
class DiLoCoSettings(Settings):
    """DiLoCo's settings (paper: H = 500, outer SGD lr 0.7, Nesterov momentum 0.9)."""

    sync_every: int = 500
    """H, inner optimizer steps between outer steps."""
    outer_lr: float = 0.7
    """The outer SGD's learning rate (> 0)."""
    outer_momentum: float = 0.9
    """The outer SGD's momentum, in [0, 1)."""
    nesterov: bool = True
    """Nesterov momentum (as ``torch.optim.SGD(nesterov=True)``); ``False``: heavy-ball."""

    def __post_init__(self) -> None:
        check_number("sync_every", self.sync_every, low=1, integer=True)
        check_number("outer_lr", self.outer_lr, low=0.0, low_open=True)
        check_number("outer_momentum", self.outer_momentum, low=0.0, high=1.0, high_open=True)
        check_bool("nesterov", self.nesterov)
        super().__post_init__()


@dataclass(eq=False, repr=False)
class DiLoCoRule(DiLoCoSettings, Frozen):
    """DiLoCo's outer step as a rule (the settings are ``DiLoCoSettings``'s)."""

    method_name = "DiLoCo"  # the callbacks' default name

    def __post_init__(self) -> None:
        super().__post_init__()
        self._freeze()

    def __repr__(self) -> str:
        return compact_repr(self).replace("Rule(", "(", 1)

    __eq__ = canonical_eq
    __hash__ = canonical_hash


@dataclass
class Traffic:
    """What the outer steps cost this rank: bytes it sent, communication operations it posted, seconds it waited."""

    bytes_sent: int = 0
    operations: int = 0
    wait_seconds: float = 0.0
    syncs: int = 0

    def as_dict(self) -> dict[str, float]:
        return {
            "bytes_sent": self.bytes_sent,
            "operations": self.operations,
            "wait_seconds": self.wait_seconds,
            "syncs": self.syncs,
        }


@dataclass
class Replica:
    """One process's outer state: slow weights (in ``averager``), momentum, counters; ``inner_step()`` after every
    inner optimizer step runs the outer step when it is due.

    Args:
        averager: an ``Averager(params, Snapshot(), contiguous=True)`` over the trained tensors (its averages are phi).
        rule: ``NoLoCoRule`` or ``DiLoCoRule``.
        group: the process group (default: the world); without an initialised process group the replica is alone.
    """

    averager: Averager
    rule: NoLoCoRule | DiLoCoRule
    group: Any = None
    inner_steps: int = 0
    outer_steps: int = 0
    traffic: Traffic = field(default_factory=Traffic)

    def __post_init__(self) -> None:
        self.momentum: list[Tensors] = [[torch.zeros_like(a) for a in avg] for _, avg in self.averager.tensor_groups()]
        self._received: dict[tuple[int, int, int], torch.Tensor] = {}

    def _pairs(self) -> list[tuple[Tensors, Tensors]]:
        pairs = self.averager.tensor_groups()
        if [len(avg) for _, avg in pairs] != [len(m) for m in self.momentum]:
            raise RuntimeError(
                "the model's parameters no longer share the flat layout the outer step was built on (moved or "
                "re-homed after the wrapper or callback was built, e.g. model.to() or share_memory()); build it after "
                "moving the model"
            )
        return pairs

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_available() and dist.is_initialized() else 0

    @torch.no_grad()
    def broadcast_start(self, src: int = 0) -> None:
        """Make every replica start from rank ``src``'s weights (fast and slow): once, before training."""
        if self.world_size > 1:
            for live, _ in self._pairs():
                for tensor in live:
                    dist.broadcast(tensor, self._global(src), group=self.group)
        self.averager.update(1.0)

    def inner_step(self) -> bool:
        """Count one inner optimizer step; run the outer step when ``sync_every`` divides the count."""
        self.inner_steps += 1
        if self.inner_steps % self.rule.sync_every:
            return False
        self.sync()
        return True

    @torch.no_grad()
    def sync(self) -> None:
        """The outer step now (NoLoCo with this step's group, or DiLoCo's all-reduce), then theta <- phi."""
        if isinstance(self.rule, NoLoCoRule):
            self._noloco(self.rule)
        else:
            self._diloco(self.rule)
        for live, avg in self._pairs():
            kernels.copy_(live, avg)
        self.outer_steps += 1
        self.traffic.syncs += 1

    def peers(self) -> list[int]:
        """This rank's NoLoCo partners (ranks within ``group``) at the coming outer step."""
        if not isinstance(self.rule, NoLoCoRule):
            raise TypeError("peers() is NoLoCo's; DiLoCo averages over every rank")
        rank = self.rank
        groups = peer_groups(self.world_size, self.rule.group_size, self.outer_steps, self.rule.seed)
        return [peer for peer in next(g for g in groups if rank in g) if peer != rank]

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _exchange(self, sends: Tensors, peers: list[int]) -> list[Tensors]:
        """Send ``sends`` to every peer and receive theirs (point-to-point only); one list per peer."""
        received = [[self._buffer(slot, i, t) for i, t in enumerate(sends)] for slot in range(len(peers))]
        ops = []
        for slot, peer in enumerate(peers):
            target = self._global(peer)
            for tensor, buffer in zip(sends, received[slot], strict=True):
                ops.append(dist.P2POp(dist.isend, tensor, target, self.group))
                ops.append(dist.P2POp(dist.irecv, buffer, target, self.group))
        if not ops:
            return received
        works = dist.batch_isend_irecv(ops)
        started = time.perf_counter()
        for work in works:
            work.wait()
        self.traffic.wait_seconds += time.perf_counter() - started
        self.traffic.operations += len(ops)
        self.traffic.bytes_sent += len(peers) * sum(t.numel() * t.element_size() for t in sends)
        return received

    def _buffer(self, slot: int, index: int, like: torch.Tensor) -> torch.Tensor:
        key = (slot, index, like.numel())
        buffer = self._received.get(key)
        if buffer is None or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._received[key] = torch.empty_like(like)
        return buffer

    def _mean(self, slot: int, like: Tensors, sources: list[Tensors]) -> Tensors:
        """The mean of ``sources`` (the group's tensors in rank order, so every member adds in the same order and
        gets bit-identical results), in persistent buffers shaped like ``like`` (the slow weights: at least fp32)."""
        out = [self._buffer(slot, i, t) for i, t in enumerate(like)]
        kernels.copy_(out, sources[0])
        for tensors in sources[1:]:
            kernels.add_(out, tensors)
        if len(sources) > 1:
            kernels.div_(out, float(len(sources)))
        return out

    def _noloco(self, rule: NoLoCoRule) -> None:
        peers = self.peers()
        pairs = self._pairs()
        lives = [t for live, _ in pairs for t in live]
        slows = [t for _, avg in pairs for t in avg]
        received = self._exchange(lives if rule.one_tensor else lives + slows, peers)
        # The group in rank order: this rank's own tensors, or the slot its peer's arrived in.
        members = sorted([(self.rank, -1), *((peer, slot) for slot, peer in enumerate(peers))])
        thetas = [lives if slot < 0 else received[slot][: len(lives)] for _, slot in members]
        mean_theta = self._mean(-2, slows, thetas)
        momentum = [m for group in self.momentum for m in group]
        kernels.mul_(momentum, rule.outer_momentum)
        kernels.add_(momentum, mean_theta, rule.outer_lr)
        if rule.one_tensor:
            kernels.add_(momentum, slows, -rule.outer_lr)
        else:
            mixing = rule.mixing if rule.mixing is not None else rule.outer_lr
            phis = [slows if slot < 0 else received[slot][len(lives) :] for _, slot in members]
            mean_phi = self._mean(-3, slows, phis)
            kernels.add_(momentum, mean_phi, mixing - rule.outer_lr)
            kernels.add_(momentum, slows, -mixing)
        kernels.add_(slows, momentum)

    def _diloco(self, rule: DiLoCoRule) -> None:
        world = self.world_size
        pairs = self._pairs()
        slows = [t for _, avg in pairs for t in avg]
        gradient = [self._buffer(-1, i, s) for i, s in enumerate(slows)]
        kernels.copy_(gradient, slows)
        kernels.add_(gradient, [t for live, _ in pairs for t in live], -1.0)
        if world > 1:
            works = [dist.all_reduce(g, group=self.group, async_op=True) for g in gradient]
            started = time.perf_counter()
            for work in works:
                work.wait()  # type: ignore[union-attr]
            self.traffic.wait_seconds += time.perf_counter() - started
            self.traffic.operations += len(works)
            # A ring all-reduce sends 2 (W - 1) / W of the buffer from each rank.
            self.traffic.bytes_sent += sum(2 * (world - 1) * g.numel() * g.element_size() // world for g in gradient)
            kernels.div_(gradient, float(world))
        momentum = [m for group in self.momentum for m in group]
        kernels.mul_(momentum, rule.outer_momentum)
        kernels.add_(momentum, gradient)
        if rule.nesterov:
            kernels.add_(gradient, momentum, rule.outer_momentum)
            kernels.add_(slows, gradient, -rule.outer_lr)
        else:
            kernels.add_(slows, momentum, -rule.outer_lr)

    def state_dict(self) -> dict[str, Any]:
        """Momentum, counters and the rule, this rank's own (save one per rank); the slow weights are the
        ``averager``'s state, saved beside it."""
        return {
            "momentum": [m.clone() for group in self.momentum for m in group],
            "inner_steps": self.inner_steps,
            "outer_steps": self.outer_steps,
            "rule": repr(self.rule),
            "seed": getattr(self.rule, "seed", None),  # NoLoCo's groups: a resumed run must draw the same ones
            "traffic": self.traffic.as_dict(),
        }

    def check_state(self, state: Any) -> None:
        """Raise unless ``state`` (from ``state_dict()``) fits this replica: same method, seed and parameters."""
        if not isinstance(state, dict) or "momentum" not in state:
            raise ValueError("state must come from Replica.state_dict() (it has no 'momentum' entry)")
        check_saved_rule(state.get("rule"), self.rule, what="outer state")  # another method raises
        seed = getattr(self.rule, "seed", None)
        if state.get("seed", seed) != seed:
            raise ValueError(
                f"the state was saved with seed={state['seed']!r}; this replica has seed={seed!r} (its "
                "peer groups would differ from the saved run's): build it with the saved seed"
            )
        momentum = [m for group in self.momentum for m in group]
        if [tuple(m.shape) for m in state["momentum"]] != [tuple(m.shape) for m in momentum]:
            raise ValueError("the saved momentum does not match these parameters (another model or grouping)")

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        message = check_saved_rule(state.get("rule"), self.rule, what="outer state")
        if message is not None:
            warnings.warn(message, stacklevel=2)  # other settings of the same method (e.g. outer_lr) continue
        momentum = [m for group in self.momentum for m in group]
        kernels.copy_(momentum, list(state["momentum"]))
        self.inner_steps, self.outer_steps = int(state["inner_steps"]), int(state["outer_steps"])
        traffic = state.get("traffic", {})
        self.traffic = Traffic(
            int(traffic.get("bytes_sent", 0)),
            int(traffic.get("operations", 0)),
            float(traffic.get("wait_seconds", 0.0)),
            int(traffic.get("syncs", 0)),
        )


@torch.no_grad()
def average_replicas(tensors: Tensors, group: Any = None) -> None:
    """Replace ``tensors`` on every rank by their mean over the ranks (one all-reduce: for the end of training)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, group=group)
        tensor.div_(dist.get_world_size(group))


__all__ = ["DiLoCoRule", "NoLoCoRule", "Replica", "Traffic", "average_replicas", "peer_groups"]


describe_arguments(NoLoCoRule, DiLoCoRule)
