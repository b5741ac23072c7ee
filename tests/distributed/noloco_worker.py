"""The NoLoCo / DiLoCo gloo runs of ``test_noloco_gloo.py``: ``python noloco_worker.py OUT 2 3 4`` runs a world of 2,
then 3, then 4 processes on CPU (one forked process per rank). Each rank runs every scenario of its world size and
saves what it records to ``OUT/world<size>/<scenario>-rank<r>.pt`` (or ``{"error": traceback}``); the test process
computes the references and compares. Each rank trains a small float64 model on its own data.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import distributed_c10d

sys.path.insert(0, str(Path(__file__).parents[2]))

from weightavg.optim import DiLoCo, NoLoCo

SYNC_EVERY, OUTER_LR, OUTER_MOMENTUM, MIXING = 3, 0.7, 0.5, 0.3
NEVER = 10**9  # sync_every for runs whose outer steps the scenario calls itself
WORLD_TIMEOUT = 90.0  # seconds for one world's ranks (all its scenarios); a hang ends there

# Every collective of torch.distributed (and the object-passing ones built on them): none may run while NoLoCo trains.
COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "broadcast",
    "broadcast_object_list",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_coalesced",
    "all_gather_object",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "reduce",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
)


class CollectiveCalled(RuntimeError):
    """Raised by the spies that stand in for collectives while NoLoCo trains."""


@contextmanager
def no_collectives() -> Iterator[None]:
    """Replace every collective, in ``torch.distributed`` and in ``distributed_c10d`` (where they live and call each
    other), by a function that raises; the real ones return afterwards. Point-to-point ops stay real."""
    saved: list[tuple[Any, str, Any]] = []

    def spy(name: str) -> Callable[..., None]:
        def called(*args: Any, **kwargs: Any) -> None:
            raise CollectiveCalled(f"torch.distributed.{name} called while NoLoCo trains")

        return called

    for module in (dist, distributed_c10d):
        for name in COLLECTIVES:
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, spy(name))
    try:
        yield
    finally:
        for module, name, function in saved:
            setattr(module, name, function)


def small_model(seed: int, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    return model.to(dtype)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    """One inner step on this rank's own batch for ``step`` (the same batch in every run)."""
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(10_000 * (rank + 1) + step)
    x, y = torch.randn(8, 4, generator=generator), torch.randn(8, 2, generator=generator)
    nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
    opt.step()
    opt.zero_grad()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in model.parameters()])


def slow(opt: NoLoCo | DiLoCo) -> torch.Tensor:
    return torch.cat([t.flatten().double() for t in opt.averager.averaged_tensors().values()])


def momentum(opt: NoLoCo | DiLoCo) -> torch.Tensor:
    return torch.cat([m.flatten().double() for m in opt.replica.state_dict()["momentum"]])


def inner_sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


# --------------------------------------------------------------------------------------------------- scenarios
def train(rank: int, world: int, group_size: int = 2) -> dict[str, Any]:
    """NoLoCo through ``opt.step()`` for 4 outer steps with every collective forbidden once the wrapper is built;
    ranks start from different weights (the start broadcast must unify them); then ``average_replicas()``."""
    model = small_model(seed=100 + rank)
    own_start = flat(model)
    opt = NoLoCo(inner_sgd(model), SYNC_EVERY, OUTER_LR, OUTER_MOMENTUM, group_size, seed=3)
    start, start_slow = flat(model), slow(opt)
    peers, outer_steps = [], []
    sync_step_seconds = 0.0  # wall time of the steps that run an outer step: the waits happen inside them
    with no_collectives():
        try:
            dist.all_reduce(torch.zeros(1))
            spy_works = False
        except CollectiveCalled:
            spy_works = True
        for step in range(1, 4 * SYNC_EVERY + 1):
            started = time.perf_counter()
            if step % SYNC_EVERY == 0:  # this step's opt.step() runs the outer step
                peers.append(opt.replica.peers())
                outer_steps.append(opt.replica.outer_steps)
            train_step(model, opt, rank, step)
            if step % SYNC_EVERY == 0:
                sync_step_seconds += time.perf_counter() - started
        train_step(model, opt, rank, 4 * SYNC_EVERY + 1)  # theta apart again (NoLoCo keeps a pair's phi equal)
    final, final_slow = flat(model), slow(opt)
    opt.average_replicas()
    return {
        "own_start": own_start,
        "start": start,
        "start_slow": start_slow,
        "spy_works": spy_works,
        "peers": peers,
        "outer_steps": outer_steps,
        "traffic": opt.traffic.as_dict(),
        "sync_step_seconds": sync_step_seconds,
        "final": final,
        "final_slow": final_slow,
        "averaged": flat(model),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "dtype_groups": len(opt.averager.tensor_groups()),
    }


def diloco_under_spy(rank: int, world: int) -> dict[str, Any]:
    """DiLoCo's outer step (an all-reduce) must trip the spy: the spy sees the library's calls."""
    model = small_model(seed=0)
    opt = DiLoCo(inner_sgd(model), NEVER, broadcast_start=False)
    train_step(model, opt, rank, 1)
    with no_collectives():
        try:
            opt.replica.sync()
        except CollectiveCalled as error:
            return {"caught": str(error)}
    return {"caught": None}


def manual_syncs(rank: int, opt: NoLoCo | DiLoCo, model: nn.Module, outer_steps: int = 3) -> dict[str, Any]:
    """Two inner steps, then the outer step called by hand, ``outer_steps`` times; theta, phi, momentum around each."""
    record: dict[str, Any] = {"phi0": slow(opt), "theta": [], "phi": [], "momentum": [], "after": [], "peers": []}
    for outer in range(outer_steps):
        for inner in range(2):
            train_step(model, opt, rank, 2 * outer + inner)
        record["theta"].append(flat(model))
        if isinstance(opt, NoLoCo):
            record["peers"].append(opt.replica.peers())
        opt.replica.sync()
        record["phi"].append(slow(opt))
        record["momentum"].append(momentum(opt))
        record["after"].append(flat(model))
    record["traffic"] = opt.traffic.as_dict()
    record["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    record["slow_bytes"] = sum(t.numel() * t.element_size() for t in opt.averager.averaged_tensors().values())
    record["slow_dtypes"] = [str(t.dtype) for t in opt.averager.averaged_tensors().values()]
    return record


def formula(
    rank: int,
    world: int,
    mixing: float | None,
    group_size: int = 2,
    broadcast_start: bool = True,
    dtype: torch.dtype = torch.float64,
    process_group: Any = None,
) -> dict[str, Any]:
    """NoLoCo's outer steps called by hand, collectives forbidden (every rank builds the same model)."""
    model = small_model(seed=0, dtype=dtype)
    opt = NoLoCo(
        inner_sgd(model),
        NEVER,
        OUTER_LR,
        OUTER_MOMENTUM,
        group_size,
        mixing=mixing,
        seed=11,
        broadcast_start=broadcast_start,
        process_group=process_group,
    )
    with no_collectives():
        return manual_syncs(rank, opt, model)


def subgroup(rank: int, world: int) -> dict[str, Any]:
    """NoLoCo over the process group of global ranks 1, 2, 3 (group ranks 0, 1, 2); global rank 0 stays out."""
    group = dist.new_group([1, 2, 3])
    if rank == 0:
        return {"member": False}
    record = formula(rank, world, MIXING, process_group=group)
    return {**record, "member": True, "group_rank": dist.get_rank(group)}


def diloco(rank: int, world: int) -> dict[str, Any]:
    model = small_model(seed=100 + rank)  # the start broadcast gives every rank rank 0's weights
    opt = DiLoCo(inner_sgd(model), NEVER, outer_lr=OUTER_LR, outer_momentum=0.9, nesterov=True)
    return manual_syncs(rank, opt, model)


def pair_vs_diloco(rank: int, world: int) -> dict[str, Any]:
    """The same training under NoLoCo (b == c) and heavy-ball DiLoCo with the same outer lr and momentum."""
    results = {}
    for name in ("noloco", "diloco"):
        model = small_model(seed=100 + rank)
        opt: NoLoCo | DiLoCo
        if name == "noloco":
            opt = NoLoCo(inner_sgd(model), SYNC_EVERY, outer_lr=OUTER_LR, outer_momentum=OUTER_MOMENTUM)
        else:
            opt = DiLoCo(inner_sgd(model), SYNC_EVERY, outer_lr=OUTER_LR, outer_momentum=OUTER_MOMENTUM, nesterov=False)
        for step in range(1, 4 * SYNC_EVERY + 1):
            train_step(model, opt, rank, step)
        results[name] = {"theta": flat(model), "phi": slow(opt), "outer_steps": opt.replica.outer_steps}
    return results


def resume(rank: int, world: int, mixing: float | None) -> dict[str, Any]:
    """15 steps straight, against 7 steps, each rank saving its own state, fresh objects loading it, 8 more steps."""

    def build(seed: int) -> tuple[nn.Module, NoLoCo]:
        model = small_model(seed)
        return model, NoLoCo(inner_sgd(model), SYNC_EVERY, OUTER_LR, OUTER_MOMENTUM, mixing=mixing, seed=5)

    def snapshot(model: nn.Module, opt: NoLoCo) -> dict[str, Any]:
        traffic = opt.traffic.as_dict()
        del traffic["wait_seconds"]
        return {
            "theta": flat(model),
            "phi": slow(opt),
            "momentum": momentum(opt),
            "inner": opt.replica.inner_steps,
            "outer": opt.replica.outer_steps,
            "traffic": traffic,
            "sgd": torch.cat([s["momentum_buffer"].flatten() for s in opt.optimizer.state.values()]),
        }

    model, opt = build(seed=100 + rank)
    for step in range(1, 16):
        train_step(model, opt, rank, step)
    straight = snapshot(model, opt)

    model, opt = build(seed=100 + rank)
    for step in range(1, 8):
        train_step(model, opt, rank, step)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    model, opt = build(seed=200 + rank)  # other weights; its start broadcast runs on every rank alike
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    for step in range(8, 16):
        train_step(model, opt, rank, step)
    return {"straight": straight, "resumed": snapshot(model, opt)}


SCENARIOS: dict[int, dict[str, Callable[[int, int], dict[str, Any]]]] = {
    2: {
        "train": train,
        "spy-diloco": diloco_under_spy,
        "pair-vs-diloco": pair_vs_diloco,
        "resume": lambda r, w: resume(r, w, None),
        "resume-mixing": lambda r, w: resume(r, w, MIXING),
        "formula-bf16": lambda r, w: formula(r, w, None, dtype=torch.bfloat16),
        "formula-bf16-mixing": lambda r, w: formula(r, w, MIXING, dtype=torch.bfloat16),
    },
    3: {
        "train": train,
        "formula": lambda r, w: formula(r, w, None),
        "formula-mixing": lambda r, w: formula(r, w, MIXING),
        "diloco": diloco,
    },
    4: {
        "train": train,
        "train-groups-of-3": lambda r, w: train(r, w, group_size=3),
        "formula": lambda r, w: formula(r, w, None, broadcast_start=False),
        "formula-mixing": lambda r, w: formula(r, w, MIXING),
        "formula-groups-of-3": lambda r, w: formula(r, w, MIXING, group_size=3),
        "subgroup": subgroup,
    },
}


def run_rank(rank: int, size: int, port: int, folder: Path) -> None:
    """One rank (a forked child): join the world, run its scenarios, save each record; exit 1 if one failed."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size))
    dist.init_process_group("gloo", rank=rank, world_size=size, timeout=timedelta(seconds=WORLD_TIMEOUT / 2))
    failed = False
    try:
        for name, scenario in SCENARIOS[size].items():
            try:
                result = scenario(rank, size)
            except Exception:
                result, failed = {"error": traceback.format_exc()}, True
            torch.save(result, folder / f"{name}-rank{rank}.pt")
            dist.barrier()  # the next scenario starts together (and a rank that failed does not run ahead)
    finally:
        dist.destroy_process_group()
    sys.exit(1 if failed else 0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    """``noloco_worker.py OUT SIZE...``: for each world size in turn, fork its ranks (which inherit this process's
    imports: torch, weightavg and the torch._dynamo that optimizers import on first use, seconds per process) and
    wait for them, killing them at ``WORLD_TIMEOUT``; ``OUT/world<size>/exit.json`` has their exit codes."""
    torch.set_num_threads(1)
    out, sizes = Path(sys.argv[1]), [int(size) for size in sys.argv[2:]]
    model = small_model(seed=0)
    train_step(model, NoLoCo(inner_sgd(model), NEVER), 0, 0)  # the lazy imports, once, before forking
    context = multiprocessing.get_context("fork")
    for size in sizes:
        folder = out / f"world{size}"
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        ranks = [context.Process(target=run_rank, args=(rank, size, port, folder)) for rank in range(size)]
        for process in ranks:
            process.start()
        deadline = time.monotonic() + WORLD_TIMEOUT
        for process in ranks:
            process.join(max(0.1, deadline - time.monotonic()))
        timed_out = any(process.is_alive() for process in ranks)
        for process in ranks:
            if process.is_alive():
                process.kill()
                process.join()
        exit_codes = [process.exitcode for process in ranks]
        (folder / "exit.json").write_text(json.dumps({"exit_codes": exit_codes, "timed_out": timed_out}))
        print(f"world {size}: exit codes {exit_codes}, timed out {timed_out}", flush=True)


if __name__ == "__main__":
    main()
