"""Cost of one NoLoCo / DiLoCo outer step of ``weightavg`` against the reference code's per-parameter exchange and the
floors of the transport and of the local arithmetic, with two gloo processes on CPU.

    python benchmarks/bench_noloco.py [--device cpu] [--repeats N] [--threads N] [--quick]

The script starts W = 2 processes itself (``torch.multiprocessing``, forked where the OS allows; MASTER_ADDR
127.0.0.1, a free port, GLOO_SOCKET_IFNAME=lo, ``--threads`` torch threads per process, default 1). Both ranks build
the same models from their own seeds (the replicas differ, so the first outer step moves something) and run every row
in lockstep: a barrier before each sample (outside the timing), the rows interleaved round-robin with the order
rotated every repeat, the number of calls per sample agreed between the ranks. Each row reports rank 0's median over
the repeats beside its quartiles and best repeat, and rank 1's median. Only ratios between rows measured side by side
mean anything; nothing here asserts an absolute time. The models are stacks of ``nn.Linear(width, width)`` (two
tensors each): ~5M parameters in 150 tensors and ~25M in 200 (``--quick``: ~1M in 100).

Rows (one outer step each, fp32; bytes and messages are what one rank sends per outer step):

1. weightavg NoLoCo: ``weightavg.optim.NoLoCo(inner, sync_every=...).replica.sync()``, fast path (mixing = outer_lr):
   the model lives in one flat buffer; the step draws the pair, exchanges that buffer with the peer through
   ``dist.batch_isend_irecv`` (one send and one receive), forms the mean and the momentum update with flat
   ``_foreach`` ops and copies the slow weights into the model.
2. reference: the reference code's way (gensyn-ai/noloco), written plainly here: per parameter a blocking
   ``dist.send`` / ``dist.recv`` of the fp32 tensor with the peer (the even rank sends first, so the pair does not
   deadlock) into a receive tensor allocated per parameter (``empty_like``: no zero fill), then the same update
   (``mean = (theta + theirs) / 2``, ``delta <- a delta + b (mean - phi)``, ``phi += delta``, ``theta <- phi``) in a
   Python loop. With W = 2 the pair is the world, so it draws no permutation. Checked equal to row 1 after one step.
3. weightavg DiLoCo: ``weightavg.optim.DiLoCo(...).replica.sync()``, for reference: one all-reduce of the flat
   pseudo-gradient, then Nesterov outer SGD with flat ops. (Bytes: the ring estimate ``2 (W - 1) / W`` of the buffer
   that ``traffic`` counts; for W = 2 one model size, like NoLoCo.)
4. floors. (a) transport: one ``isend`` / ``irecv`` pair of one flat fp32 buffer with as many elements as the model,
   through ``batch_isend_irecv`` as in row 1: the least that exchanging the model can cost over this backend.
   (b) arithmetic: one in-place ``mul_`` over a flat fp32 buffer the model's size (1 read + 1 write, 8 B/element):
   less local work than any outer step does. Row 1's flat ops move about 80 B/element (ten such floors: mean by
   copy/add/div, momentum by mul/add/add, slow weights by add, model by copy); the least an unfused update can move
   is about 28 B/element (read theta, theirs, phi, delta; write delta, phi, theta).

Page faults per call are rank 0's, from ``getrusage``: fresh memory being mapped, process-wide (gloo's own threads
and buffers count too). The reference's per-parameter temporaries show none: the allocator reuses what the previous
parameter freed.

Rank 0's times include waiting for rank 1 inside the exchange: that is the cost of a synchronised outer step.
Flush-to-zero is on in both processes (``torch.set_flush_denormal``), so momenta that decay over many repeated outer
steps never reach denormal numbers, which a real run's fresh inner steps keep away too.

Recorded figures, 2026-11-28, 2-vCPU AMD EPYC VM (32 MB L3), torch 2.13.0+cpu, Python 3.11, gloo over loopback, 1
thread per process, default sizes and repeats (15). The machine was shared with another experiment of 4-8 processes
(load average 8.0 at the start, 9.0 at the end), so both ranks and the gloo threads competed for the two cores: only
ratios within one run mean anything. Rank 0's medians, ms and x transport floor (x arithmetic floor):

| row | (a) 5.0M, 150 tensors | (b) 25.1M, 200 tensors |
|---|---:|---:|
| 1. weightavg NoLoCo `replica.sync()` | 68.4: 2.95 (19.8) | 327: 3.43 (19.0) |
| 2. reference, per-parameter `send`/`recv` | 540: 23.3 (157) | 982: 10.3 (57.1) |
| 3. weightavg DiLoCo `replica.sync()` | 65.1: 2.81 (18.9) | 333: 3.50 (19.4) |
| 4a. transport floor (one flat exchange) | 23.2: 1.00 (6.71), 0.87 GB/s | 95.2: 1.00 (5.54), 1.05 GB/s |
| 4b. arithmetic floor (one flat `mul_`) | 3.45: 0.15 (1.00) | 17.2: 0.18 (1.00) |
| reference / weightavg NoLoCo | 7.90 | 3.01 |
| weightavg NoLoCo's wait in its exchange | 27.1 ms | 118 ms |

Every row sends one model size per rank per outer step (20.0 MB, 100.2 MB); the reference in 150 / 200 blocking
messages, weightavg in one. The reference's best repeats (139 ms, 713 ms) are far below its medians: its ~3 ms per
message is mostly waiting for the other process to be scheduled, which the load makes worse. An earlier run at load
6.1 -> 7.7 gave reference / NoLoCo 7.02 and 3.12, NoLoCo x transport 2.42 and 3.09.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing import get_all_start_methods
from torch.multiprocessing.spawn import start_processes

sys.path.insert(0, str(Path(__file__).parent))

from bench_ema import TIMING_ALIGN, TIMING_COLUMNS, Case, Runner, Timing, timing_cells

from weightavg.optim import DiLoCo, NoLoCo

WORLD = 2
OUTER_LR = 0.7  # NoLoCo's defaults (b = c, the fast path)
OUTER_MOMENTUM = 0.5
NEVER = 10**9  # sync_every: the benchmark calls the outer step itself
PEER_TIMEOUT = timedelta(seconds=300)  # a hung exchange fails here instead of hanging the run


@dataclass(frozen=True)
class Shape:
    """``layers`` x ``nn.Linear(width, width)``: two tensors per layer."""

    label: str
    width: int
    layers: int

    @property
    def tensors(self) -> int:
        return 2 * self.layers

    @property
    def numel(self) -> int:
        return self.layers * (self.width * self.width + self.width)

    def build(self) -> nn.Sequential:
        return nn.Sequential(*(nn.Linear(self.width, self.width) for _ in range(self.layers)))


SMALL = Shape("(a) ~5M", width=258, layers=75)  # 5,011,650 parameters in 150 tensors
BIG = Shape("(b) ~25M", width=500, layers=100)  # 25,050,000 parameters in 200 tensors
QUICK = Shape("(q) ~1M", width=141, layers=50)  # 1,001,100 parameters in 100 tensors


@dataclass(frozen=True)
class Settings:
    port: int
    threads: int
    repeats: int
    warmup: int
    min_sample_s: float
    shapes: tuple[Shape, ...]


# ---------------------------------------------------------------------------------------------------- measurement
class LockstepRunner(Runner):
    """``bench_ema.Runner`` for cases that talk to the other rank: both ranks run the same cases the same number of
    times in the same order, a barrier (untimed) starting every sample."""

    def agree(self, count: int) -> int:
        """The larger of the two ranks' call counts, so that both make the same calls."""
        value = torch.tensor([count], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())

    def start_sample(self) -> None:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------- implementations
class ReferenceNoLoCo:
    """The reference code's outer step, per parameter: blocking ``send``/``recv`` with the peer, then the update."""

    def __init__(self, model: nn.Module, outer_lr: float = OUTER_LR, outer_momentum: float = OUTER_MOMENTUM) -> None:
        self.params = [p.detach() for p in model.parameters()]
        self.slow = [p.clone() for p in self.params]
        self.momentum = [torch.zeros_like(p) for p in self.params]
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        self.bytes_sent = self.messages = self.syncs = 0

    @torch.no_grad()
    def sync(self) -> None:
        rank = dist.get_rank()
        peer = 1 - rank  # W = 2: the pair is the world
        for theta, phi, delta in zip(self.params, self.slow, self.momentum, strict=True):
            theirs = torch.empty_like(theta)
            if rank % 2 == 0:
                dist.send(theta, dst=peer)
                dist.recv(theirs, src=peer)
            else:
                dist.recv(theirs, src=peer)
                dist.send(theta, dst=peer)
            mean = (theta + theirs) / 2
            delta.mul_(self.outer_momentum).add_(mean - phi, alpha=self.outer_lr)
            phi.add_(delta)
            theta.copy_(phi)
            self.bytes_sent += theta.numel() * theta.element_size()
            self.messages += 1
        self.syncs += 1


def transport_floor(numel: int, peer: int) -> Case:
    """One flat fp32 buffer of ``numel`` elements sent to the peer while the peer's arrives: one send, one receive."""
    send = torch.rand(numel)
    receive = torch.empty(numel)

    def exchange() -> None:
        ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, receive, peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    return exchange


def arithmetic_floor(numel: int) -> Case:
    """One in-place ``mul_`` over a flat fp32 buffer of ``numel`` elements (a sign flip: values stay normal)."""
    flat = torch.rand(numel)
    return lambda: flat.mul_(-1.0)


# ---------------------------------------------------------------------------------------------------- one model
NOLOCO = "1. weightavg NoLoCo `replica.sync()`"
REFERENCE = "2. reference: per-parameter blocking `send`/`recv` + loop"
DILOCO = "3. weightavg DiLoCo `replica.sync()` (all-reduce)"
TRANSPORT = "4a. floor: one flat `isend`/`irecv` exchange"
ARITHMETIC = "4b. floor: one flat `mul_` (8 B/element)"


@dataclass
class Row:
    timing: Timing
    bytes_sent: float  # per rank per outer step
    messages: str  # sent per rank per outer step


def parameters_of(model: nn.Module) -> Iterator[torch.Tensor]:
    return (p.detach() for p in model.parameters())


@torch.no_grad()
def check_same_step(ours: nn.Module, reference: nn.Module, start: nn.Module, label: str) -> None:
    """After one outer step from the same weights, weightavg's model and the reference's agree, and both moved."""
    for mine, theirs in zip(parameters_of(ours), parameters_of(reference), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=f"{label}: weightavg and reference differ")
    if all(torch.equal(a, b) for a, b in zip(parameters_of(ours), parameters_of(start), strict=True)):
        raise RuntimeError(f"{label}: the outer step changed nothing")


def bench_shape(shape: Shape, runner: LockstepRunner, rank: int) -> tuple[dict[str, Row], float]:
    """Every row on one model; returns the rows and weightavg NoLoCo's mean seconds waiting in its exchange."""
    torch.manual_seed(1000 + rank)  # each replica its own weights
    start = shape.build()
    noloco_model, reference_model, diloco_model = (copy.deepcopy(start) for _ in range(3))
    noloco = NoLoCo(
        torch.optim.SGD(noloco_model.parameters(), lr=0.1),
        sync_every=NEVER,
        outer_lr=OUTER_LR,
        outer_momentum=OUTER_MOMENTUM,
        broadcast_start=False,
    )
    reference = ReferenceNoLoCo(reference_model)
    diloco = DiLoCo(torch.optim.SGD(diloco_model.parameters(), lr=0.1), sync_every=NEVER, broadcast_start=False)

    noloco.replica.sync()
    reference.sync()
    check_same_step(noloco_model, reference_model, start, shape.label)
    del start

    cases: dict[str, Case] = {
        NOLOCO: noloco.replica.sync,
        REFERENCE: reference.sync,
        DILOCO: diloco.replica.sync,
        TRANSPORT: transport_floor(shape.numel, 1 - rank),
        ARITHMETIC: arithmetic_floor(shape.numel),
    }
    timings = runner.time(cases)
    model_bytes = shape.numel * 4
    ours, theirs, dil = noloco.traffic, reference, diloco.traffic
    rows = {
        NOLOCO: Row(timings[NOLOCO], ours.bytes_sent / ours.syncs, f"{ours.operations / ours.syncs / 2:g} (batched)"),
        REFERENCE: Row(timings[REFERENCE], theirs.bytes_sent / theirs.syncs, f"{theirs.messages / theirs.syncs:g}"),
        DILOCO: Row(timings[DILOCO], dil.bytes_sent / dil.syncs, f"{dil.operations / dil.syncs:g} all-reduce"),
        TRANSPORT: Row(timings[TRANSPORT], model_bytes, "1"),
        ARITHMETIC: Row(timings[ARITHMETIC], 0, "0"),
    }
    return rows, ours.wait_seconds / ours.syncs


def shape_table(shape: Shape, rows: dict[str, Row], rank1_ms: dict[str, float], wait_s: float) -> list[str]:
    transport = rows[TRANSPORT].timing.median_s
    arithmetic = rows[ARITHMETIC].timing.median_s
    model_bytes = shape.numel * 4
    lines = [
        f"### {shape.label}: {shape.numel:,} parameters in {shape.tensors} tensors ({model_bytes / 1e6:.1f} MB fp32), "
        f"{shape.layers} x Linear({shape.width}, {shape.width})",
        "",
        f"| row (rank 0) | {TIMING_COLUMNS} | rank 1 ms | x transport floor | x arithmetic floor | "
        "MB sent/rank/step | messages sent/rank/step | page faults/call |",
        f"|---|{TIMING_ALIGN}|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        t = row.timing
        faults = "-" if t.faults_per_call is None else f"{t.faults_per_call:.0f}"
        lines.append(
            f"| {name} | {timing_cells(t)} | {rank1_ms[name]:.3f} | {t.median_s / transport:.2f} | "
            f"{t.median_s / arithmetic:.2f} | {row.bytes_sent / 1e6:.1f} | {row.messages} | {faults} |"
        )
    noloco = rows[NOLOCO].timing.median_s
    reference = rows[REFERENCE].timing.median_s
    lines += [
        "",
        f"Messages per rank per outer step: reference {shape.tensors} sends + {shape.tensors} receives (one per "
        "parameter) vs weightavg 1 send + 1 receive (one per dtype group).",
        f"reference / weightavg NoLoCo: {reference / noloco:.2f}x. Transport floor: "
        f"{model_bytes / transport / 1e9:.2f} GB/s each way; arithmetic floor: "
        f"{model_bytes * 2 / arithmetic / 1e9:.1f} GB/s (8 B/element). weightavg NoLoCo waited "
        f"{wait_s * 1e3:.1f} ms per outer step in its exchange (`traffic.wait_seconds`, mean over all its steps).",
    ]
    return lines


# ---------------------------------------------------------------------------------------------------- processes
def worker(rank: int, settings: Settings) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(settings.port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(settings.threads)
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=PEER_TIMEOUT)
    try:
        runner = LockstepRunner(torch.device("cpu"), settings.repeats, settings.warmup, settings.min_sample_s)
        for shape in settings.shapes:
            rows, wait_s = bench_shape(shape, runner, rank)
            medians: list[dict[str, float] | None] = [None] * WORLD
            dist.all_gather_object(medians, {name: row.timing.ms for name, row in rows.items()})
            if rank == 0:
                rank1 = medians[1]
                assert rank1 is not None
                print("\n".join(shape_table(shape, rows, rank1, wait_s)) + "\n", flush=True)
            del rows
            gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_average() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="only cpu (gloo); kept for the benchmarks' common flags")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per row (default 15; 5 quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (default 1)")
    parser.add_argument("--quick", action="store_true", help="one ~1M-parameter model, fewer repeats: a smoke run")
    args = parser.parse_args(argv)
    if torch.device(args.device).type != "cpu":
        parser.error(f"--device={args.device}: this benchmark runs gloo on the CPU only")
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    for flag in ("repeats", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}={getattr(args, flag)} must be at least 1")
    args.warmup = 1 if args.quick else 2
    args.min_sample_s = 0.005 if args.quick else 0.02
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shapes = (QUICK,) if args.quick else (SMALL, BIG)
    settings = Settings(free_port(), args.threads, args.repeats, args.warmup, args.min_sample_s, shapes)
    print(
        f"## weightavg NoLoCo outer-step benchmark\n\ntorch {torch.__version__}, Python {platform.python_version()}; "
        f"W={WORLD} gloo processes on {platform.machine()} ({os.cpu_count()} CPUs), {args.threads} thread(s) each; "
        f"{args.repeats} interleaved lockstep repeats per row, rank 0's medians; load average at start "
        f"{load_average()}\n",
        flush=True,
    )
    started = time.perf_counter()
    # Forked where possible: the ranks inherit the imports instead of repeating them (Lightning's, via bench_ema).
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    start_processes(worker, args=(settings,), nprocs=WORLD, join=True, start_method=method)  # type: ignore[no-untyped-call]
    print(f"(took {time.perf_counter() - started:.0f} s; load average at end {load_average()})")


if __name__ == "__main__":
    main()
