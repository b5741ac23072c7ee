"""Checkpoint snapshots and their combinations in ``weightavg``: cost against torch.save, safetensors and the floors.

    python benchmarks/bench_snapshots.py [--device cpu|cuda|...] [--repeats N] [--threads N] [--quick] [--dir PATH]

Two questions, on ``bench_ema``'s big (25.4M parameters) and small (2.0M) models:

1. What does one snapshot cost the training loop? ``SnapshotStore.add(model.state_dict(), step=i)`` for a store in
   memory, on disk in the foreground (copy, atomic write, fsync, rename, manifest) and on disk with
   ``background=True`` (the time until ``add`` returns, the writer idle), against ``torch.save`` and safetensors'
   ``save_file`` into the same folder, ``save_file`` + fsync (what a durable foreground write needs at least), a plain
   host copy ``{k: v.detach().to("cpu", copy=True)}`` (what ``add`` must do before it returns) and the bandwidth floor
   (one flat ``copy_`` of the model's bytes into a preallocated host buffer). Each call that writes is followed,
   untimed, by ``flush()`` for the background store and ``os.sync()``, so that no case pays for the write-back of
   another. The background writer's throughput is timed separately: N adds in a row, then ``flush()``.
2. What does ``combine(K snapshot files, weights, into=model)`` cost for K = 2, 6, 12? Per snapshot, against the
   floor of reading one snapshot file (``safetensors.torch.load_file``) plus one ``torch._foreach_add_`` into fp32
   accumulators, and at the largest K against the naive way (load all K state dicts, sum them, ``load_state_dict``);
   and the growth of the peak resident memory with K, both ways, each case in a fresh subprocess
   (``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs`` once the model is built).

Timed cases run interleaved, the order rotated every repeat, with ``bench_ema``'s runner (``Runner``, ``Timing``);
reported are medians, quartiles and the best repeat, and the host's minor page faults per call (fresh memory being
mapped, which costs a lot on a virtual machine). All files go into one temporary folder (``--dir``, default the
system's temporary directory), at most about 1 GB at a time, removed at the end. Snapshot files are read back while
still in the page cache (they were just written), as right after training. On a loaded machine (load average above
the idle cores) run with ``--threads 1``: with 2 threads the per-tensor cases stall on OpenMP regions waiting for a
descheduled thread (``docs/benchmarks.md``), and the report says so in a note.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from bench_ema import BIG, SMALL, Case, Runner, Shape, Stack, Timing, minor_page_faults, timing_cells

import weightavg
from weightavg.core.snapshots import SnapshotInfo, SnapshotStore, combine

Settle = Callable[[], object]

KS = (2, 6, 12)
DISK_BUDGET_BYTES = 1_000_000_000  # snapshot files on disk at a time, at most (combine cycles through fewer files)
WRITER_ADDS = 4  # background adds in a row for the writer's throughput (2 with --quick)
MEMORY_PROCESSES = 2  # peak-memory subprocesses at a time


# ---------------------------------------------------------------------------------------------------- measurement
def time_settled(runner: Runner, cases: dict[str, tuple[Case, Settle | None]]) -> dict[str, Timing]:
    """Seconds per call of each case, as ``Runner.time`` (round-robin, order rotated, gc off), but each call is timed
    alone and followed by its untimed ``settle`` (a flush, a sync): calls that leave work behind do not bill it to
    whichever case runs next. A sample is the mean of enough calls to last ``runner.min_sample_s`` (at most 20)."""

    def one_call(case: Case, settle: Settle | None) -> tuple[float, int]:
        faults_before = minor_page_faults() or 0
        runner.sync()
        start = time.perf_counter()
        result = case()
        runner.sync()
        elapsed = time.perf_counter() - start
        faults = (minor_page_faults() or 0) - faults_before
        del result  # freed after the clock stops, as a snapshot kept by the caller would be
        if settle is not None:
            settle()
        return elapsed, faults

    calls: dict[str, int] = {}
    for name, (case, settle) in cases.items():
        elapsed = 0.0
        for _ in range(runner.warmup):
            elapsed, _ = one_call(case, settle)
        calls[name] = max(1, min(20, math.ceil(runner.min_sample_s / max(elapsed, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in cases}
    faults = dict.fromkeys(cases, 0)
    names = list(cases)
    gc.collect()
    gc.disable()
    try:
        for repeat in range(runner.repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                case, settle = cases[name]
                total = 0.0
                for _ in range(calls[name]):
                    elapsed, count = one_call(case, settle)
                    total += elapsed
                    faults[name] += count
                samples[name].append(total / calls[name])
    finally:
        gc.enable()
    return {name: summarize(values, faults[name] / (calls[name] * runner.repeats)) for name, values in samples.items()}


def summarize(values: list[float], faults_per_call: float | None) -> Timing:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return Timing(statistics.median(values), quartiles[0], quartiles[2], min(values), faults_per_call)


def state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def drain(store: SnapshotStore) -> Settle:
    def settle() -> None:
        store.flush()
        os.sync()

    return settle


# ---------------------------------------------------------------------------------------------------- 1. snapshots
FLOOR = "floor: one flat `copy_` into a preallocated host buffer"
HOST_COPY = "host copy `{k: v.detach().to('cpu', copy=True)}`"
MEMORY_ADD = "weightavg `add`, memory store (keep=1)"
TORCH_SAVE = "`torch.save(model.state_dict(), path)` (no fsync)"
SAVE_FILE = "safetensors `save_file(model.state_dict(), path)` (no fsync)"
SAVE_FILE_FSYNC = "safetensors `save_file` + fsync"
DISK_ADD = "weightavg `add`, disk store, foreground (keep=1)"
BACKGROUND_ADD = "weightavg `add`, disk store, `background=True`: until it returns"


@dataclass
class SnapshotResult:
    shape: Shape
    numel: int
    tensors: int
    nbytes: int
    timings: dict[str, Timing]
    writer_per_snapshot: Timing  # N background adds then flush, divided by N
    writer_add_return: Timing  # each of those adds, until it returned (the writer busy with the earlier ones)
    writer_adds: int


def bench_snapshots(shape: Shape, runner: Runner, folder: Path, writer_adds: int) -> SnapshotResult:
    module = Stack(shape).to(runner.device)
    numel = sum(t.numel() for t in module.state_dict().values())
    nbytes = state_bytes(module)
    folder.mkdir(parents=True)
    steps = itertools.count(1)
    memory = SnapshotStore(None, keep=1)
    disk = SnapshotStore(folder / "foreground", keep=1)
    background = SnapshotStore(folder / "background", keep=1, background=True)
    source = torch.rand(nbytes // 4, device=runner.device)
    target = torch.empty(nbytes // 4)
    torch_path, safetensors_path = folder / "anchor.pt", folder / "anchor.safetensors"

    def host_copy() -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def save_file_fsync() -> None:
        save_file(module.state_dict(), safetensors_path)
        fsync_file(safetensors_path)

    cases: dict[str, tuple[Case, Settle | None]] = {
        FLOOR: (lambda: target.copy_(source), None),
        HOST_COPY: (host_copy, None),
        MEMORY_ADD: (lambda: memory.add(module.state_dict(), step=next(steps)), None),
        TORCH_SAVE: (lambda: torch.save(module.state_dict(), torch_path), os.sync),
        SAVE_FILE: (lambda: save_file(module.state_dict(), safetensors_path), os.sync),
        SAVE_FILE_FSYNC: (save_file_fsync, os.sync),
        DISK_ADD: (lambda: disk.add(module.state_dict(), step=next(steps)), os.sync),
        BACKGROUND_ADD: (lambda: background.add(module.state_dict(), step=next(steps)), drain(background)),
    }
    timings = time_settled(runner, cases)

    # The writer's throughput: adds in a row (each returns once its copy is queued), then flush.
    per_snapshot: list[float] = []
    returns: list[float] = []
    for _ in range(max(2, runner.repeats // 2)):
        start = time.perf_counter()
        for _ in range(writer_adds):
            called = time.perf_counter()
            background.add(module.state_dict(), step=next(steps))
            returns.append(time.perf_counter() - called)
        background.flush()
        per_snapshot.append((time.perf_counter() - start) / writer_adds)
        os.sync()
    background.close()
    disk.close()
    return SnapshotResult(
        shape,
        numel,
        len(module.state_dict()),
        nbytes,
        timings,
        summarize(per_snapshot, None),
        summarize(returns, None),
        writer_adds,
    )


def snapshot_table(result: SnapshotResult) -> list[str]:
    floor = result.timings[FLOOR].median_s
    copy = result.timings[HOST_COPY].median_s
    durable = result.timings[SAVE_FILE_FSYNC].median_s
    lines = [
        f"### One snapshot, model {result.shape.label}: {result.numel:,} parameters in {result.tensors} tensors "
        f"({result.nbytes / 1e6:.1f} MB)",
        "",
        f"Floor bandwidth: {result.nbytes / floor / 1e9:.1f} GB/s (one flat copy of the model's bytes in "
        f"{floor * 1e3:.2f} ms).",
        "",
        "| what runs | ms (median) | IQR ms | best ms | x floor | x host copy | x `save_file` + fsync "
        "| page faults/call |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in result.timings.items():
        faults = "-" if t.faults_per_call is None else f"{t.faults_per_call:.0f}"
        lines.append(
            f"| {name} | {timing_cells(t)} | {t.median_s / floor:.1f} | {t.median_s / copy:.2f} | "
            f"{t.median_s / durable:.2f} | {faults} |"
        )
    return lines


def writer_table(results: list[SnapshotResult]) -> list[str]:
    lines = [
        "### Background writer throughput (N adds in a row, then `flush()`)",
        "",
        "| model | N | ms per snapshot (median) | IQR ms | best ms | MB/s | x foreground `add` | x `save_file` + fsync "
        "| `add` returns while the writer is busy: ms (median) | IQR ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        t, back = result.writer_per_snapshot, result.writer_add_return
        lines.append(
            f"| {result.shape.label} | {result.writer_adds} | {timing_cells(t)} | "
            f"{result.nbytes / t.median_s / 1e6:.0f} | {t.median_s / result.timings[DISK_ADD].median_s:.2f} | "
            f"{t.median_s / result.timings[SAVE_FILE_FSYNC].median_s:.2f} | {back.ms:.1f} | "
            f"{back.q1_s * 1e3:.1f}-{back.q3_s * 1e3:.1f} |"
        )
    return lines


# ---------------------------------------------------------------------------------------------------- 2. combine
COMBINE_FLOOR = "floor: `load_file` of one snapshot + one `_foreach_add_`"


def naive_combine(paths: list[str], weights: list[float], module: nn.Module, device: torch.device) -> None:
    """The usual way: every state dict loaded, then summed key by key, then loaded into the model."""
    loaded = [load_file(path, device=str(device)) for path in paths]
    module.load_state_dict({k: sum(w * sd[k] for w, sd in zip(weights, loaded, strict=True)) for k in loaded[0]})


@dataclass
class CombineResult:
    shape: Shape
    nbytes: int
    distinct: int  # distinct snapshot files; sources cycle through them
    timings: dict[tuple[int, str], Timing]  # (K, "weightavg") for each K, (largest K, "naive"), (1, "floor")
    peaks: dict[tuple[int, str], int | None]  # peak resident-memory growth in bytes, (K, way)


def bench_combine(
    shape: Shape, runner: Runner, folder: Path, ks: tuple[int, ...], measure_memory: bool, log: Callable[[str], None]
) -> CombineResult:
    module = Stack(shape).to(runner.device)
    nbytes = state_bytes(module)
    distinct = max(1, min(max(ks), DISK_BUDGET_BYTES // (nbytes + 1_000_000)))
    log(f"combinations, model {shape.label}: writing {distinct} snapshot files")
    store = SnapshotStore(folder)
    with torch.no_grad():
        for step in range(distinct):
            for tensor in module.state_dict().values():
                tensor.add_(0.01)
            store.add(module.state_dict(), step=step)
    snapshots = store.snapshots
    paths = [str(s.path) for s in snapshots]

    def sources(k: int) -> list[SnapshotInfo]:
        return [snapshots[i % distinct] for i in range(k)]

    accumulators = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in module.state_dict().items()}

    def floor() -> None:
        loaded = load_file(paths[0], device=str(runner.device))
        torch._foreach_add_([accumulators[k] for k in loaded], list(loaded.values()), alpha=0.5)

    cases: dict[str, Case] = {COMBINE_FLOOR: floor}
    keys: dict[str, tuple[int, str]] = {COMBINE_FLOOR: (1, "floor")}
    for k in ks:
        weights = [1.0 / k] * k
        chosen = sources(k)
        cases[f"weightavg K={k}"] = functools.partial(combine, chosen, weights, into=module)
        keys[f"weightavg K={k}"] = (k, "weightavg")
    # The naive way's time only at the largest K (a reference; its memory is what section 2 compares at every K).
    high = max(ks)
    naive_paths = [str(s.path) for s in sources(high)]
    cases[f"naive K={high}"] = lambda: naive_combine(naive_paths, [1.0 / high] * high, module, runner.device)
    keys[f"naive K={high}"] = (high, "naive")
    log(f"combinations, model {shape.label}: timing")
    timings = runner.time(cases)
    peaks: dict[tuple[int, str], int | None] = {}
    if measure_memory:
        log(f"combinations, model {shape.label}: peak memory, {2 * len(ks)} subprocesses")
        cells = [(k, way) for k in ks for way in ("weightavg", "naive")]
        growths = peak_growths(
            shape, [[str(s.path) for s in sources(k)] for k, _ in cells], [way for _, way in cells], runner.device
        )
        peaks = dict(zip(cells, growths, strict=True))
    store.close()
    return CombineResult(shape, nbytes, distinct, {keys[name]: t for name, t in timings.items()}, peaks)


# Run in a fresh interpreter (torch, safetensors and weightavg's snapshots only): build the model, reset the peak
# resident set to the current one, combine, print the peak's growth in bytes.
MEMORY_CHILD = """
import json, sys
import torch
from torch import nn
from safetensors.torch import load_file
from weightavg.core.snapshots import combine

config = json.loads(sys.argv[1])
torch.set_num_threads(config["threads"])
device = torch.device(config["device"])
width, blocks = config["width"], config["blocks"]
module = nn.Module()
module.layers = nn.Sequential(*[m for _ in range(blocks) for m in (nn.Linear(width, width), nn.LayerNorm(width))])
module.to(device)
paths, weights = config["paths"], [1.0 / len(config["paths"])] * len(config["paths"])

def status(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field + ":"))

with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status("VmRSS")
with torch.no_grad():
    if config["way"] == "weightavg":
        result = combine(paths, weights, into=module)
    else:
        loaded = [load_file(path, device=str(device)) for path in paths]
        result = {k: sum(w * sd[k] for w, sd in zip(weights, loaded)) for k in loaded[0]}
        module.load_state_dict(result)
print(json.dumps({"growth": status("VmHWM") - before}))
"""


def peak_growths(shape: Shape, paths: list[list[str]], ways: list[str], device: torch.device) -> list[int | None]:
    """Peak resident memory above the built model's while combining each ``paths[i]`` the ``ways[i]`` way, each in
    a fresh process (two at a time: a peak does not depend on timing); ``None`` where ``/proc`` cannot tell (not
    Linux) or the process failed."""
    if not Path("/proc/self/clear_refs").exists():
        return [None] * len(paths)
    root = str(Path(weightavg.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    threads = max(1, torch.get_num_threads() // MEMORY_PROCESSES)

    def start(files: list[str], way: str) -> subprocess.Popen[str]:
        config = {
            "threads": threads,
            "device": str(device),
            "width": shape.width,
            "blocks": shape.blocks,
            "paths": files,
            "way": way,
        }
        return subprocess.Popen(
            [sys.executable, "-c", MEMORY_CHILD, json.dumps(config)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def result(process: subprocess.Popen[str]) -> int | None:
        out, err = process.communicate()
        if process.returncode != 0:
            print(f"(memory subprocess failed: {err.strip().splitlines()[-1:]})", file=sys.stderr)
            return None
        return int(json.loads(out.strip().splitlines()[-1])["growth"])

    growths: list[int | None] = []
    for first in range(0, len(paths), MEMORY_PROCESSES):
        batch = [
            start(files, way)
            for files, way in zip(
                paths[first : first + MEMORY_PROCESSES], ways[first : first + MEMORY_PROCESSES], strict=True
            )
        ]
        growths += [result(process) for process in batch]
    return growths


def marginal_per_snapshot(result: CombineResult, ks: tuple[int, ...], *, best: bool = False) -> float:
    """Seconds each further snapshot adds to ``combine``: the slope between the smallest and the largest K, of the
    medians (or of the best repeats)."""
    low, high = min(ks), max(ks)

    def seconds(k: int) -> float:
        timing = result.timings[(k, "weightavg")]
        return timing.best_s if best else timing.median_s

    return (seconds(high) - seconds(low)) / (high - low)


def combine_table(result: CombineResult, ks: tuple[int, ...]) -> list[str]:
    floor = result.timings[(1, "floor")]
    lines = [
        f"### Combination `combine(K files, weights, into=model)`, model {result.shape.label} "
        f"({result.nbytes / 1e6:.1f} MB per snapshot; sources cycle through {result.distinct} distinct files)",
        "",
        "| K | implementation | ms (median) | IQR ms | best ms | ms per snapshot | x floor per snapshot | naive / this "
        "| page faults/call |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| 1 | {COMBINE_FLOOR} | {timing_cells(floor)} | {floor.ms:.1f} | 1.00 | - | "
        f"{floor.faults_per_call or 0:.0f} |",
    ]
    high = max(ks)
    naive = result.timings[(high, "naive")].median_s
    rows = [(k, "weightavg", "weightavg `combine`") for k in ks]
    rows.append((high, "naive", "naive: load all K with `load_file`, sum, `load_state_dict`"))
    for k, way, label in rows:
        t = result.timings[(k, way)]
        versus = f"{naive / t.median_s:.2f}" if k == high else "-"
        lines.append(
            f"| {k} | {label} | {timing_cells(t)} | {t.ms / k:.1f} | {t.median_s / k / floor.median_s:.2f} | "
            f"{versus} | {t.faults_per_call or 0:.0f} |"
        )
    slope = marginal_per_snapshot(result, ks)
    best = marginal_per_snapshot(result, ks, best=True)
    fixed = result.timings[(min(ks), "weightavg")].median_s - slope * min(ks)
    lines += [
        "",
        f"Each further snapshot (slope of the medians from K={min(ks)} to K={high}): {slope * 1e3:.1f} ms, "
        f"{slope / floor.median_s:.2f}x the floor (best repeats: {best * 1e3:.1f} ms, {best / floor.best_s:.2f}x); "
        f"the fixed part (intercept: zeroed fp32 accumulators, the copy into the model) {fixed * 1e3:.1f} ms.",
    ]
    return lines


def memory_table(results: list[CombineResult], ks: tuple[int, ...]) -> list[str]:
    lines = [
        "### Peak resident memory growth while combining (VmHWM above the built model, fresh process per cell)",
        "",
        "| model | K | weightavg `combine` MB | x one snapshot | naive MB | x one snapshot |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        if not result.peaks:
            continue
        for k in ks:
            cells = []
            for way in ("weightavg", "naive"):
                growth = result.peaks.get((k, way))
                cells += ["-", "-"] if growth is None else [f"{growth / 1e6:.0f}", f"{growth / result.nbytes:.2f}"]
            lines.append(f"| {result.shape.label} | {k} | {' | '.join(cells)} |")
    return lines


# ---------------------------------------------------------------------------------------------------- summary
def summary(snapshots: list[SnapshotResult], combines: list[CombineResult], ks: tuple[int, ...]) -> list[str]:
    lines = ["### Summary", ""]
    for result in snapshots:
        t = result.timings
        copy, durable = t[HOST_COPY].median_s, t[SAVE_FILE_FSYNC].median_s
        lines.append(
            f"- {result.shape.label}: memory `add` {t[MEMORY_ADD].ms:.1f} ms ({t[MEMORY_ADD].median_s / copy:.2f}x the "
            f"host copy); foreground disk `add` {t[DISK_ADD].ms:.1f} ms ({t[DISK_ADD].median_s / durable:.2f}x "
            f"`save_file` + fsync, {t[DISK_ADD].median_s / t[TORCH_SAVE].median_s:.2f}x `torch.save`); background "
            f"`add` returns in {t[BACKGROUND_ADD].ms:.1f} ms ({t[BACKGROUND_ADD].median_s / copy:.2f}x the host copy), "
            f"its writer takes {result.writer_per_snapshot.ms:.1f} ms per snapshot."
        )
    for combined in combines:
        slope = marginal_per_snapshot(combined, ks)
        floor = combined.timings[(1, "floor")].median_s
        high = max(ks)
        ratio = combined.timings[(high, "naive")].median_s / combined.timings[(high, "weightavg")].median_s
        line = (
            f"- {combined.shape.label}: `combine` costs {slope * 1e3:.1f} ms per further snapshot "
            f"({slope / floor:.2f}x the read + add floor); at K={high} the naive way takes {ratio:.2f}x its time"
        )
        peaks = [combined.peaks.get((k, "weightavg")) for k in ks]
        naive_peaks = [combined.peaks.get((k, "naive")) for k in ks]
        if all(p is not None for p in peaks + naive_peaks):
            ours = [p / combined.nbytes for p in peaks if p is not None]
            theirs = [p / combined.nbytes for p in naive_peaks if p is not None]
            low, top = f"{min(ours):.1f}", f"{max(ours):.1f}"
            spread = low if low == top else f"{low}-{top}"
            line += (
                f"; its peak memory growth stays at {spread} snapshots for K={min(ks)}..{high}, the naive way's grows "
                f"from {theirs[0]:.1f} to {theirs[-1]:.1f}"
            )
        lines.append(line + ".")
    return lines


# ---------------------------------------------------------------------------------------------------- main
def filesystem(path: Path) -> str:
    """The mount (device and type) that holds ``path``, from /proc/mounts where there is one."""
    try:
        with open("/proc/mounts") as handle:
            mounts = [line.split()[:3] for line in handle]
    except OSError:
        return "unknown filesystem"
    resolved = str(path.resolve())
    best = max(
        (m for m in mounts if resolved == m[1] or resolved.startswith(m[1].rstrip("/") + "/")),
        key=lambda m: len(m[1]),
        default=None,
    )
    return "unknown filesystem" if best is None else f"{best[2]} on {best[0]} mounted at {best[1]}"


def progress(started: float, message: str) -> None:
    """A line on stderr, so that a long run shows where it is (the report itself goes to stdout)."""
    print(f"[{time.perf_counter() - started:4.0f} s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device", default="cpu", help="torch device of the model (cpu, cuda, ...); snapshot files are on the host"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed samples per snapshot case (default 10; 3 quick); combination cases take half as many (at least 2)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 3 repeats, N=2 writer adds, K=2 and 4, memory of the big model"
    )
    parser.add_argument("--dir", default=None, help="folder for the temporary files (default: the system's temp dir)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be at least 1")
    if args.threads < 1:
        parser.error(f"--threads={args.threads} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runner = Runner(device, args.repeats, 1 if args.quick else 2, 0.005 if args.quick else 0.03)
    ks = (2, 4) if args.quick else KS
    writer_adds = 2 if args.quick else WRITER_ADDS
    started = time.perf_counter()
    loads = os.getloadavg() if hasattr(os, "getloadavg") else None
    load = "n/a" if loads is None else ", ".join(f"{value:.2f}" for value in loads)
    root = Path(tempfile.mkdtemp(prefix="weightavg-bench-snapshots-", dir=args.dir))
    try:
        snapshots = []
        for index, shape in enumerate((BIG, SMALL)):
            progress(started, f"snapshots, model {shape.label}")
            snapshots.append(bench_snapshots(shape, runner, root / f"snapshots-{index}", writer_adds))
            shutil.rmtree(root / f"snapshots-{index}")
        # Combination cases take 0.1 s to seconds each: one warmup call, and half the repeats (at least 2).
        combine_runner = dataclasses.replace(runner, warmup=1, repeats=max(2, (args.repeats + 1) // 2))
        combines = []
        for index, shape in enumerate((BIG, SMALL)):
            measure_memory = shape == BIG or not args.quick
            combines.append(
                bench_combine(
                    shape,
                    combine_runner,
                    root / f"combine-{index}",
                    ks,
                    measure_memory,
                    functools.partial(progress, started),
                )
            )
            shutil.rmtree(root / f"combine-{index}")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    header = [
        "## weightavg snapshot benchmark",
        "",
        f"torch {torch.__version__}, safetensors {version('safetensors')}, Python {platform.python_version()}; "
        f"device {device} ({platform.machine()}, {os.cpu_count()} CPUs), {torch.get_num_threads()} threads; "
        f"{runner.repeats} interleaved repeats per snapshot case, {combine_runner.repeats} per combination case, "
        f"medians; files in {root.parent} ({filesystem(root.parent)}); "
        f"load average at start {load}",
    ]
    cpus, threads = os.cpu_count() or 1, torch.get_num_threads()
    if loads is not None and threads > 1 and loads[0] > cpus - threads + 1:
        header += [
            "",
            f"Note: the load average at start ({loads[0]:.1f} on {cpus} CPUs) leaves fewer idle cores than "
            f"threads: with {threads} threads every OpenMP region can wait for a descheduled thread "
            "and the per-tensor cases slow down many times over (docs/benchmarks.md); `--threads 1` is much less "
            "sensitive to such load.",
        ]
    blocks = [header, *(snapshot_table(result) for result in snapshots), writer_table(snapshots)]
    blocks += [combine_table(result, ks) for result in combines]
    blocks += [memory_table(combines, ks), summary(snapshots, combines, ks)]
    print("\n\n".join("\n".join(block) for block in blocks))
    print(f"\n(took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
