"""WiSE-FT blend and ZSCL teacher cost of ``weightavg`` against the papers' way and the memory-bandwidth floor.

    python benchmarks/bench_anchored.py [--device cpu|cuda|...] [--repeats N] [--threads N] [--quick]

Rows, run interleaved in one process with ``bench_ema``'s runner (median over repeats, order rotated):

- WiSE-FT, one alpha into the model: ``wiseft.blend(averager, alpha)`` + ``swap()`` back (computed into a
  persistent buffer and swapped in by pointer) against the official scripts' way (a state-dict comprehension
  ``(1 - a) * t0 + a * t1`` then ``load_state_dict``) and the floor: one ``torch.lerp(..., out=)`` over flat buffers
  of the model's size (reads two, writes one, 12 B per fp32 element: the least any blend can move).
- ZSCL teacher forward on a batch of reference inputs: ``Distillation.teacher_outputs`` (the model evaluated with the
  teacher's tensors through ``torch.func.functional_call``, no second module) against a separate deep-copied teacher
  module (the research code's way; one more model object in memory).
- ZSCL ensemble update: the same engine update as EMA/SWA (one batched ``lerp_`` per group); see ``bench_ema.py``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_ema import BIG, SMALL, Runner, Shape, Stack, Timing, timing_cells

import weightavg
from weightavg.methods.wiseft import blend
from weightavg.zscl import Distillation

ALPHA = 0.5


def blend_rows(shape: Shape, runner: Runner) -> tuple[int, int, dict[str, Timing]]:
    module = Stack(shape).to(runner.device)
    theta_0 = {k: v.detach().clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01)
    averager = weightavg.Averager(module, weightavg.Snapshot(), dtype="live")
    averager.load_weights(theta_0)
    numel = sum(p.numel() for p in module.parameters())
    flat = [torch.randn(numel, device=runner.device) for _ in range(3)]

    def ours() -> None:
        blend(averager, ALPHA)
        averager.swap()

    def state_dict_way() -> None:
        theta_1 = module.state_dict()
        module.load_state_dict({k: (1 - ALPHA) * theta_0[k] + ALPHA * theta_1[k] for k in theta_1})

    def floor() -> None:
        torch.lerp(flat[0], flat[1], ALPHA, out=flat[2])

    cases = {"floor": floor, "weightavg blend + swap back": ours, "state-dict comprehension": state_dict_way}
    timings = runner.time(cases)
    return numel, len(list(module.parameters())), timings


def teacher_rows(shape: Shape, runner: Runner, batch: int) -> dict[str, Timing]:
    module = Stack(shape).to(runner.device)
    inputs = torch.randn(batch, shape.width, device=runner.device)
    distillation = Distillation([inputs])
    distillation.bind(module)
    teacher = copy.deepcopy(module).eval().requires_grad_(False)

    def ours() -> None:
        distillation.teacher_outputs(inputs)

    def separate_module() -> None:
        with torch.no_grad():
            teacher(inputs)

    return runner.time({"separate teacher module": separate_module, "weightavg functional teacher": ours})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per row (default 20; 5 quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="reference batch size for the teacher rows")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 20)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runner = Runner(torch.device(args.device), repeats, 1 if args.quick else 3, 0.005 if args.quick else 0.03)
    started = time.perf_counter()
    print(f"# weightavg anchored-methods benchmark ({args.device}, {args.threads} threads, {repeats} repeats)\n")
    for shape in (BIG, SMALL):
        numel, tensors, timings = blend_rows(shape, runner)
        floor = timings["floor"].median_s
        print(f"### WiSE-FT: one alpha into the model, {shape.label}: {numel:,} parameters in {tensors} tensors\n")
        print("| implementation | median ms | q1-q3 ms | best ms | x floor |\n|---|---:|---|---:|---:|")
        for name, timing in timings.items():
            print(f"| {name} | {timing_cells(timing)} | {timing.median_s / floor:.2f} |")
        print()
    for shape in (BIG, SMALL):
        timings = teacher_rows(shape, runner, args.batch)
        base = timings["separate teacher module"].median_s
        print(f"### ZSCL teacher forward, batch {args.batch}, {shape.label}\n")
        print("| implementation | median ms | q1-q3 ms | best ms | x separate module |\n|---|---:|---|---:|---:|")
        for name, timing in timings.items():
            print(f"| {name} | {timing_cells(timing)} | {timing.median_s / base:.2f} |")
        print()
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
