"""EMA update and validation-swap cost of ``weightavg`` against torch, Lightning and the memory-bandwidth floor.

    python benchmarks/bench_ema.py [--device cpu|cuda|...] [--repeats N] [--threads N] [--quick]

All implementations run interleaved in one process (round-robin, the order rotated every repeat) and each reports the
median over the repeats; ``docs/benchmarks.md`` explains the method and records a run. Nothing here is mocked: torch's
``AveragedModel`` and Lightning's own ``EMAWeightAveraging`` callback are built and driven as in training.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn
from torch.profiler import ProfilerActivity, profile

import weightavg

try:
    import resource
except ImportError:  # not on Windows; the page-fault column then reads "-"
    resource = None  # type: ignore[assignment]

DECAY = 0.999
WEIGHT = 1.0 - DECAY
# Bytes moved per averaged element: the fp32 floor reads avg and live and writes avg (3 x 4 B); an fp32 average of a
# bf16 model ideally reads avg (4 B) and live (2 B) and writes avg (4 B) in a single pass.
FLOOR_BYTES = 12
BF16_IDEAL_BYTES = 10

# Targets (docs/benchmarks.md).
MAX_X_FLOOR = 1.25
MIN_X_VS_LIGHTNING = 8.0
MAX_OVERHEAD_US_PER_TENSOR = 2.0
MAX_SWAP_US_PER_TENSOR = 2.0

Case = Callable[[], object]


@dataclass(frozen=True)
class Shape:
    """A stack of ``blocks`` x (Linear(width, width), LayerNorm(width)): four tensors per block, no buffers."""

    label: str
    width: int
    blocks: int


# 25,430,912 parameters in 416 tensors and 2,007,720 parameters in 208 tensors: the sizes of ANCHORS.md.
BIG = Shape("(a) big", width=493, blocks=104)
SMALL = Shape("(b) small", width=195, blocks=52)


class Stack(pl.LightningModule):
    """The benchmarked model; a LightningModule so that Lightning's callback can bind to it as in a real run."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        blocks = ((nn.Linear(shape.width, shape.width), nn.LayerNorm(shape.width)) for _ in range(shape.blocks))
        self.layers = nn.Sequential(*itertools.chain.from_iterable(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # type: ignore[no-any-return]


def minor_page_faults() -> int | None:
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def model_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median over repeats (what the targets use), the quartiles and the best repeat; and the
    host's minor page faults per call (fresh memory being mapped), where the OS reports them."""

    median_s: float
    q1_s: float
    q3_s: float
    best_s: float
    faults_per_call: float | None

    @property
    def ms(self) -> float:
        return self.median_s * 1e3


# ---------------------------------------------------------------------------------------------------- measurement
@dataclass(frozen=True)
class Runner:
    """Where and how long to measure."""

    device: torch.device
    repeats: int
    warmup: int  # at least 1
    min_sample_s: float

    def sync(self) -> None:
        """Wait for the device to finish queued work (nothing to wait for on the CPU, whose kernels are synchronous)."""
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)

    def agree(self, count: int) -> int:
        """The number of calls per sample to use, given this process's calibration (other processes may need to
        agree: see ``bench_noloco``)."""
        return count

    def start_sample(self) -> None:
        """Called, untimed, right before each timed sample (and warmup call)."""
        self.sync()

    def time(self, cases: dict[str, Case]) -> dict[str, Timing]:
        """Seconds per call of each case, sampled round-robin so that every case sees the same machine noise.

        Each sample times enough back-to-back calls to last ``min_sample_s`` (calibrated during the warmup), so timer
        resolution and the cost of a synchronize are negligible even for sub-millisecond cases. The order of the cases
        rotates every repeat, and the garbage collector is off while timing.
        """
        calls: dict[str, int] = {}
        for name, case in cases.items():
            for _ in range(self.warmup):
                self.start_sample()
                start = time.perf_counter()
                case()
                self.sync()
            # The last warmup call sets how many calls one sample makes.
            calls[name] = self.agree(
                max(1, min(1000, math.ceil(self.min_sample_s / max(time.perf_counter() - start, 1e-9))))
            )
        samples: dict[str, list[float]] = {name: [] for name in cases}
        faults = dict.fromkeys(cases, 0)
        names = list(cases)
        gc.collect()
        gc.disable()
        try:
            for repeat in range(self.repeats):
                shift = repeat % len(names)
                for name in names[shift:] + names[:shift]:
                    case, count = cases[name], calls[name]
                    self.start_sample()
                    faults_before = minor_page_faults()
                    start = time.perf_counter()
                    for _ in range(count):
                        case()
                    self.sync()
                    samples[name].append((time.perf_counter() - start) / count)
                    faults[name] += (minor_page_faults() or 0) - (faults_before or 0)
        finally:
            gc.enable()
        timings = {}
        for name, values in samples.items():
            quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
            per_call = None if resource is None else faults[name] / (calls[name] * self.repeats)
            timings[name] = Timing(statistics.median(values), quartiles[0], quartiles[2], min(values), per_call)
        return timings


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop lines, which go straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_allocations(case: Case, runner: Runner) -> tuple[int, int]:
    """(allocations, bytes) that the allocators of the host and the device report while ``case`` runs.

    Read from ``torch.profiler`` with ``profile_memory=True``: every op that takes storage from an allocator shows a
    positive self memory usage, on the host or on the device.
    """
    activities = [ProfilerActivity.CPU]
    device_activity = getattr(ProfilerActivity, runner.device.type.upper(), None)  # CUDA, XPU, ... where known
    if runner.device.type != "cpu" and device_activity is not None:
        activities.append(device_activity)
    runner.sync()
    with quiet_stderr(), profile(activities=activities, profile_memory=True) as prof:
        case()
        runner.sync()
    count = total = 0
    for event in prof.events():
        used = max(event.self_cpu_memory_usage, 0) + max(getattr(event, "self_device_memory_usage", 0), 0)
        if used > 0:
            count += 1
            total += used
    return count, total


def extra_peak_bytes(case: Case, device: torch.device) -> int | None:
    """Peak device memory above the starting point while ``case`` runs (``None`` on the CPU, which keeps no stats)."""
    if device.type == "cpu":
        return None
    torch.accelerator.synchronize(device)
    before = torch.accelerator.memory_allocated(device)
    torch.accelerator.reset_peak_memory_stats(device)
    case()
    torch.accelerator.synchronize(device)
    return int(torch.accelerator.max_memory_allocated(device) - before)


# ---------------------------------------------------------------------------------------------------- implementations
def torch_update(average_model: AveragedModel, module: nn.Module) -> Case:
    return lambda: average_model.update_parameters(module)


def lightning_callback(module: Stack) -> EMAWeightAveraging:
    """Lightning's EMA callback, bound to ``module`` by its own ``setup`` as at the start of ``fit``.

    ``setup`` reads only the module (its device, ``configure_model``), so a bare Trainer stands in for the fitting one.
    The callback's update is ``self._average_model.update_parameters(pl_module)`` once its step check passes, and its
    validation swap is ``self._swap_models(pl_module)`` at the start and at the end of the validation epoch.
    """
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    callback = EMAWeightAveraging(decay=DECAY)
    callback.setup(trainer, module, stage="fit")
    return callback


def lightning_update(callback: EMAWeightAveraging, module: Stack) -> Case:
    if callback._average_model is None:
        raise RuntimeError("Lightning's callback has no average model; was setup() called with stage='fit'?")
    return torch_update(callback._average_model, module)


def flat_floor(numel: int, device: torch.device) -> Case:
    """One ``lerp_`` over a single contiguous fp32 buffer with as many elements as the model: the bandwidth floor."""
    average = torch.rand(numel, device=device)
    live = torch.rand(numel, device=device)
    return lambda: average.lerp_(live, WEIGHT)


def hand_foreach_lerp(module: nn.Module) -> Case:
    """``torch._foreach_lerp_`` over lists collected once: what a careful hand-written EMA does."""
    live = [t.detach() for t in model_tensors(module)]
    average = [t.clone() for t in live]
    return lambda: torch._foreach_lerp_(average, live, WEIGHT)


def hand_mixed_precision(module: nn.Module) -> Case:
    """An fp32 average of low-precision weights by hand: ``avg * decay + weight * live`` in two foreach launches."""
    live = [t.detach() for t in model_tensors(module)]
    average = [t.float() for t in live]

    def update() -> None:
        torch._foreach_mul_(average, DECAY)
        torch._foreach_add_(average, live, alpha=WEIGHT)

    return update


def weightavg_step(module: nn.Module, contiguous: bool = False) -> tuple[weightavg.Averager, Case]:
    averager = weightavg.Averager(module, weightavg.EMA(decay=DECAY, warmup="none"), contiguous=contiguous)
    return averager, averager.step


# ---------------------------------------------------------------------------------------------------- sections
@dataclass
class Row:
    name: str
    timing: Timing


@dataclass
class UpdateResult:
    shape: Shape
    numel: int
    tensors: int
    rows: list[Row]

    def get(self, name: str) -> Timing:
        return next(row.timing for row in self.rows if row.name == name)


FLOOR = "floor: flat `lerp_` over one buffer"
WEIGHTAVG = "weightavg `Averager(model, EMA).step()`"
WEIGHTAVG_FLAT = "weightavg `Averager(model, EMA, contiguous=True).step()`"
HAND = "hand-written `torch._foreach_lerp_`"
TORCH_MULTI = "torch `AveragedModel(multi_avg_fn=get_ema_multi_avg_fn)`"
TORCH_AVG_FN = "torch `AveragedModel(avg_fn=get_ema_avg_fn)`"
LIGHTNING = "Lightning `EMAWeightAveraging` update"
WEIGHTAVG_SWAP = "weightavg `swap(); swap()`"
LIGHTNING_SWAP = "Lightning `_swap_models` x2"


@dataclass
class SwapRow:
    shape: Shape
    tensors: int
    name: str
    timing: Timing
    allocations: tuple[int, int]
    peak_bytes: int | None
    pointers_ok: bool | None


def pointer_swap_check(averager: weightavg.Averager, module: nn.Module) -> bool:
    """Swapped in, the model's tensors use the averager's own storage; swapped out, their original storage again."""
    tensors = model_tensors(module)
    live = [t.data_ptr() for t in tensors]
    averaged = {t.data_ptr() for t in averager.averaged_tensors().values()}
    averager.swap()
    swapped_in = all(t.data_ptr() in averaged for t in tensors)
    averager.swap()
    return swapped_in and [t.data_ptr() for t in tensors] == live


def bench_fp32(shape: Shape, runner: Runner) -> tuple[UpdateResult, list[SwapRow]]:
    """Update cost of every implementation, then the validation swap of weightavg and Lightning, on one model."""
    module = Stack(shape).to(runner.device)
    tensors = model_tensors(module)
    numel = sum(t.numel() for t in tensors)
    averager, step = weightavg_step(module)
    # contiguous=True re-homes the model's tensors into one buffer: give it its own copy of the model.
    _, flat_step = weightavg_step(copy.deepcopy(module), contiguous=True)
    callback = lightning_callback(module)
    torch_multi = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(DECAY))  # type: ignore[no-untyped-call]
    torch_single = AveragedModel(module, avg_fn=get_ema_avg_fn(DECAY))  # type: ignore[no-untyped-call]
    updates: dict[str, Case] = {
        FLOOR: flat_floor(numel, runner.device),
        WEIGHTAVG: step,
        WEIGHTAVG_FLAT: flat_step,
        HAND: hand_foreach_lerp(module),
        TORCH_MULTI: torch_update(torch_multi, module),
        TORCH_AVG_FN: torch_update(torch_single, module),
        LIGHTNING: lightning_update(callback, module),
    }
    timings = runner.time(updates)
    update = UpdateResult(shape, numel, len(tensors), [Row(name, timings[name]) for name in updates])

    def weightavg_round_trip() -> None:
        averager.swap()
        averager.swap()

    def lightning_round_trip() -> None:
        callback._swap_models(module)
        callback._swap_models(module)

    swaps: dict[str, Case] = {WEIGHTAVG_SWAP: weightavg_round_trip, LIGHTNING_SWAP: lightning_round_trip}
    timings = runner.time(swaps)
    checks = {WEIGHTAVG_SWAP: pointer_swap_check(averager, module), LIGHTNING_SWAP: None}
    rows = [
        SwapRow(
            shape,
            len(tensors),
            name,
            timings[name],
            count_allocations(case, runner),
            extra_peak_bytes(case, runner.device),
            checks[name],
        )
        for name, case in swaps.items()
    ]
    return update, rows


BF16_WEIGHTAVG = "weightavg `Averager(bf16 model, EMA).step()` (fp32 average)"
BF16_HAND = "hand-written `_foreach_mul_` + `_foreach_add_`"


def bench_bf16(shape: Shape, runner: Runner) -> UpdateResult:
    """Update cost of an fp32 average of a bf16 model (the engine's default average dtype for bf16 weights)."""
    module = Stack(shape).to(device=runner.device, dtype=torch.bfloat16)
    tensors = model_tensors(module)
    numel = sum(t.numel() for t in tensors)
    averager, step = weightavg_step(module)
    if any(t.dtype != torch.float32 for t in averager.averaged_tensors().values()):
        raise RuntimeError("expected the engine's default fp32 average for a bf16 model")
    cases: dict[str, Case] = {
        FLOOR: flat_floor(numel, runner.device),
        BF16_WEIGHTAVG: step,
        BF16_HAND: hand_mixed_precision(module),
    }
    timings = runner.time(cases)
    return UpdateResult(shape, numel, len(tensors), [Row(name, timings[name]) for name in cases])


# ---------------------------------------------------------------------------------------------------- report
def gigabytes_per_s(numel: int, bytes_per_element: int, seconds: float) -> float:
    return numel * bytes_per_element / seconds / 1e9


TIMING_COLUMNS = "ms (median) | IQR ms | best ms"
TIMING_ALIGN = "---:|---:|---:"


def timing_cells(t: Timing) -> str:
    return f"{t.ms:.3f} | {t.q1_s * 1e3:.3f}-{t.q3_s * 1e3:.3f} | {t.best_s * 1e3:.3f}"


def update_table(result: UpdateResult) -> list[str]:
    floor = result.get(FLOOR).median_s
    lightning = result.get(LIGHTNING).median_s
    lines = [
        f"### EMA update, model {result.shape.label}: {result.numel:,} parameters in {result.tensors} tensors "
        f"({result.numel * 4 / 1e6:.1f} MB fp32)",
        "",
        f"Floor bandwidth: {gigabytes_per_s(result.numel, FLOOR_BYTES, floor):.1f} GB/s "
        f"({FLOOR_BYTES} B per element in {floor * 1e3:.2f} ms).",
        "",
        f"| implementation | {TIMING_COLUMNS} | x floor | us/tensor over floor | Lightning / this | page faults/call |",
        f"|---|{TIMING_ALIGN}|---:|---:|---:|---:|",
    ]
    for row in result.rows:
        t = row.timing
        overhead = (t.median_s - floor) / result.tensors * 1e6
        faults = "-" if t.faults_per_call is None else f"{t.faults_per_call:.0f}"
        lines.append(
            f"| {row.name} | {timing_cells(t)} | {t.median_s / floor:.2f} | {overhead:.2f} | "
            f"{lightning / t.median_s:.1f} | {faults} |"
        )
    return lines


def format_bytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e5 else f"{count} B"


def swap_table(rows: list[SwapRow]) -> list[str]:
    lines = [
        "### Validation swap round trip (swap in + swap out)",
        "",
        f"| model | implementation | {TIMING_COLUMNS} | us/tensor | allocations (profiler) | storage check |",
        f"|---|---|{TIMING_ALIGN}|---:|---:|---|",
    ]
    for row in rows:
        count, total = row.allocations
        allocations = f"{count} ({format_bytes(total)})"
        if row.peak_bytes is not None:
            allocations += f"; peak +{format_bytes(row.peak_bytes)}"
        check = {None: "-", True: "pointer swap, storage restored", False: "FAILED"}[row.pointers_ok]
        lines.append(
            f"| {row.shape.label}, {row.tensors} tensors | {row.name} | {timing_cells(row.timing)} | "
            f"{row.timing.median_s / row.tensors * 1e6:.2f} | {allocations} | {check} |"
        )
    return lines


def bf16_table(result: UpdateResult) -> list[str]:
    floor = result.get(FLOOR).median_s
    ideal = floor * BF16_IDEAL_BYTES / FLOOR_BYTES
    lines = [
        f"### bf16 model, fp32 average, model {result.shape.label}: {result.numel:,} parameters in {result.tensors} "
        "tensors",
        "",
        f"| implementation | {TIMING_COLUMNS} | x ideal |",
        f"|---|{TIMING_ALIGN}|---:|",
        f"| ideal: {BF16_IDEAL_BYTES} B/element at the floor's "
        f"{gigabytes_per_s(result.numel, FLOOR_BYTES, floor):.1f} GB/s | {ideal * 1e3:.3f} | - | - | 1.00 |",
    ]
    lines += [f"| {row.name} | {timing_cells(row.timing)} | {row.timing.median_s / ideal:.2f} |" for row in result.rows]
    return lines


# (what, unit, passes) for each measured target, in the order of ``target_values``.
TARGETS: list[tuple[str, str, Callable[[float], bool]]] = [
    (f"(a) weightavg update <= {MAX_X_FLOOR}x floor", "x", lambda v: v <= MAX_X_FLOOR),
    (f"(a) weightavg >= {MIN_X_VS_LIGHTNING:g}x faster than Lightning", "x", lambda v: v >= MIN_X_VS_LIGHTNING),
    (
        f"(b) weightavg overhead beyond the floor <= {MAX_OVERHEAD_US_PER_TENSOR:g} us/tensor",
        " us",
        lambda v: v <= MAX_OVERHEAD_US_PER_TENSOR,
    ),
    (f"(a) weightavg contiguous=True <= {MAX_X_FLOOR}x floor", "x", lambda v: v <= MAX_X_FLOOR),
    (
        f"(a) weightavg contiguous=True >= {MIN_X_VS_LIGHTNING:g}x faster than Lightning",
        "x",
        lambda v: v >= MIN_X_VS_LIGHTNING,
    ),
    (
        f"(b) weightavg contiguous=True overhead beyond the floor <= {MAX_OVERHEAD_US_PER_TENSOR:g} us/tensor",
        " us",
        lambda v: v <= MAX_OVERHEAD_US_PER_TENSOR,
    ),
    (
        f"swap round trip <= {MAX_SWAP_US_PER_TENSOR:g} us/tensor (worse of the two models)",
        " us",
        lambda v: v <= MAX_SWAP_US_PER_TENSOR,
    ),
]


def target_values(big: UpdateResult, small: UpdateResult, swaps: list[SwapRow], *, best: bool) -> list[float]:
    def seconds(timing: Timing) -> float:
        return timing.best_s if best else timing.median_s

    return [
        seconds(big.get(WEIGHTAVG)) / seconds(big.get(FLOOR)),
        seconds(big.get(LIGHTNING)) / seconds(big.get(WEIGHTAVG)),
        (seconds(small.get(WEIGHTAVG)) - seconds(small.get(FLOOR))) / small.tensors * 1e6,
        seconds(big.get(WEIGHTAVG_FLAT)) / seconds(big.get(FLOOR)),
        seconds(big.get(LIGHTNING)) / seconds(big.get(WEIGHTAVG_FLAT)),
        (seconds(small.get(WEIGHTAVG_FLAT)) - seconds(small.get(FLOOR))) / small.tensors * 1e6,
        max(seconds(row.timing) / row.tensors * 1e6 for row in swaps if row.name == WEIGHTAVG_SWAP),
    ]


def verdicts(big: UpdateResult, small: UpdateResult, swaps: list[SwapRow]) -> list[str]:
    """PASS/FAIL of each target on the medians; the best repeats are shown beside them to tell noise from cost."""
    lines = ["### Targets", "", "| target | on medians | on best repeats |", "|---|---|---|"]
    medians = target_values(big, small, swaps, best=False)
    bests = target_values(big, small, swaps, best=True)
    for (label, unit, passes), median, best in zip(TARGETS, medians, bests, strict=True):
        cells = [f"{'PASS' if passes(value) else 'FAIL'} {value:.2f}{unit}" for value in (median, best)]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    ours = [row for row in swaps if row.name == WEIGHTAVG_SWAP]
    clean = all(row.allocations[0] == 0 and not row.peak_bytes and row.pointers_ok for row in ours)
    lines.append(
        f"| weightavg swap allocates no storage and restores the live storage | {'PASS' if clean else 'FAIL'} | - |"
    )
    return lines


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, cuda:1, xpu, mps, ...)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed samples per implementation (default 30; 5 quick)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats and shorter samples (about 30 s on 2 cores)"
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 30
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be at least 1")
    if args.threads < 1:
        parser.error(f"--threads={args.threads} must be at least 1")
    args.warmup = 1 if args.quick else 5
    args.min_sample_s = 0.005 if args.quick else 0.03
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    runner = Runner(device, args.repeats, args.warmup, args.min_sample_s)
    started = time.perf_counter()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"

    # No global no_grad(): each implementation runs under the grad mode it gets in training and handles it itself.
    big, big_swaps = bench_fp32(BIG, runner)
    small, small_swaps = bench_fp32(SMALL, runner)
    swaps = big_swaps + small_swaps
    bf16 = bench_bf16(BIG, runner)

    header = [
        "## weightavg EMA benchmark",
        "",
        f"torch {torch.__version__}, lightning {version('lightning')}, Python {platform.python_version()}; "
        f"device {device} ({platform.machine()}, {os.cpu_count()} CPUs), {torch.get_num_threads()} threads; "
        f"decay {DECAY}; {args.repeats} interleaved repeats per implementation, medians; load average at start {load}",
    ]
    blocks = [header, update_table(big), update_table(small), swap_table(swaps), bf16_table(bf16)]
    blocks.append(verdicts(big, small, swaps))
    print("\n\n".join("\n".join(block) for block in blocks))
    print(f"\n(took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
