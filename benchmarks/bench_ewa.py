"""EWA cost of ``weightavg``: the share update against a naive loop and the memory-bandwidth floor, and what turning
FFNs into random-partition mixtures costs a training step and an evaluation.

    python benchmarks/bench_ewa.py [--device cpu|cuda|...] [--repeats N] [--step-repeats N] [--threads N] [--quick]

Everything runs in one process with ``bench_ema``'s runner: each section's rows interleaved round-robin (the order
rotated every repeat), the median over the repeats reported beside the quartiles and the best repeat. Only ratios
between rows measured side by side mean anything; nothing here asserts an absolute time.

A. Share update, W_i <- (1 - beta) W_i + beta/(N-1) sum_{j != i} W_j over every expert tensor of every mixture
   (beta 0.3, N = 4), on ViT FFN sizes: a 12-block ViT whose every other MLP is converted (6 mixtures of
   fc1/GELU/fc2). ViT-S: dim 384, hidden 1536; ViT-B: dim 768, hidden 3072 (``--quick``: ViT-Ti, 192/768 only).

   - floor, 1 read + 1 write: one in-place ``mul_`` over a flat fp32 buffer with as many elements as all the experts
     (8 B per element). Every expert element changes, so any implementation must read and write each one at least
     once: nothing can move less. A fused one-pass kernel (each group of N co-located elements read once, mean
     formed in registers, N results written) would reach it.
   - reference, 2 reads + 1 write: one ``lerp_`` of a flat buffer toward a second one of the same size (12 B per
     element): the least a two-pass algorithm moves (one pass to read everything for the mean, one to read and
     write everything for the update; the mean itself is only 1/N of the elements). weightavg's update is such an
     algorithm, so its ratio to this row is its implementation overhead and the ratio to the floor adds the
     algorithmic gap.
   - weightavg ``share_all(model, beta)``: per mixture, ``stack.mean(0)`` of each stacked tensor and one
     ``torch._foreach_lerp_`` toward the (broadcast) means.
   - naive: what a research script writes with separate expert modules (an ``nn.ModuleList`` of N FFNs per layer):
     clone every expert tensor, then per layer, expert and tensor ``(1 - beta) * W_i + beta/(N-1) * sum(others)``
     and ``copy_`` back. Checked equal to weightavg's result before timing.

   GB/s columns count 8 B per expert element (the floor's traffic) for every row, so they compare like for like.

B. Training and evaluation with mixtures, a 4-block pre-norm ViT encoder (attention + MLP, dim 384, 6 heads) on
   tokens [64, 65, 384] (``--quick``: [16, 65, 192], 3 heads); the converted copy has N = 4 mixtures in blocks 2
   and 4 (``to_moe`` default: every other ``*.mlp``).

   - forward + backward (``zero_grad(set_to_none=True)`` then ``model(x).sum().backward()``), dense vs converted.
     FLOPs are equal, so mixtures / dense is the overhead of the random partition (permutation, gathers, scatter),
     of the N smaller matmuls, and of the backward through the stacked parameters.
   - eval forward under ``no_grad``, dense vs converted: a mixture in eval mode runs the FFN with the experts' mean
     (checked equal to ``to_dense``'s model before timing), computed on every call; the row ``mean_tensors()`` times
     that computation alone, for every mixture of the model.
   - the same rows for one FFN alone (dense MLP vs one mixture), where the overhead is not diluted by attention and
     unconverted blocks.

Recorded figures after the forward became ``unbind``, 2026-11-27, ``--threads 1`` (load 1.1 -> 1.4, the quietest
run): A ViT-S ``share_all`` 2.64x floor (1.55x reference), naive loop 14.8x (8.7x); ViT-B 4.53x (2.88x), naive 31.5x
(20.0x); B encoder forward + backward 0.93, one FFN 1.02; eval 1.01 and 1.20 (best repeats 1.00 and 1.05; measured
while a since-removed cache of the mean was in place, so add the ``mean_tensors()`` row: 0.5% of the encoder's eval
forward).

Earlier figures (before those two changes), 2-vCPU AMD EPYC VM (32 MB L3), torch 2.13.0+cpu, default sizes. The
machine was shared and loaded by other jobs throughout (load average 1.8 to 9), which hits 2-thread runs hardest
(every multi-threaded kernel can wait for a descheduled thread), so only ratios within one run mean anything.
Medians; A as x floor (x reference), B as mixtures / dense:

| row | --threads 2, load 1.8 -> 3.8 | --threads 1, load 4.1 -> 4.4 |
|---|---:|---:|
| A ViT-S, weightavg `share_all` | 19.6 (13.5); best repeats 5.0 | 3.27 (1.70) |
| A ViT-S, naive loop | 85.3 (59.0) | 13.9 (7.25) |
| A ViT-B, weightavg `share_all` | 6.83 (4.49) | 3.18 (1.73) |
| A ViT-B, naive loop | 45.4 (29.8) | 19.0 (10.3) |
| A reference / floor (12 vs 8 B per element) | 1.45, 1.52 | 1.92, 1.84 |
| B encoder forward + backward | 1.25 | 1.09 |
| B one FFN forward + backward | 1.44 | 1.15 |
| B encoder eval forward | 0.87 | 0.96 |
| B one FFN eval forward | 1.13 | 1.02 |
| B `mean_tensors()` / mixtures' eval forward (encoder) | 0.064 | 0.004 |

A second default run that started at load 5.1 and ended at 9 gave share x floor 7.75 (ViT-S) and 10.1 (ViT-B), and
2.17 for one FFN's forward + backward: not comparable.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from bench_ema import TIMING_ALIGN, TIMING_COLUMNS, Case, Runner, Timing, timing_cells

from weightavg.ewa import RandomPartitionMoE, mixtures, share_all, to_dense, to_moe

BETA = 0.3  # the linear ramp's default maximum
NUM_EXPERTS = 4
FLOOR_BYTES = 8  # 1 read + 1 write of each fp32 expert element
REFERENCE_BYTES = 12  # 2 reads + 1 write


# ---------------------------------------------------------------------------------------------------- models
class Mlp(nn.Module):
    """timm's ViT MLP layout: fc1, GELU, fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # type: ignore[no-any-return]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out)  # type: ignore[no-any-return]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))  # type: ignore[no-any-return]


class Encoder(nn.Module):
    """A ViT's transformer blocks (no patch embedding or head: the input is already tokens)."""

    def __init__(self, dim: int, depth: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ShareShape:
    label: str
    dim: int
    hidden: int
    heads: int
    depth: int  # blocks; every other MLP becomes a mixture


VIT_TI = ShareShape("ViT-Ti", dim=192, hidden=768, heads=3, depth=12)
VIT_S = ShareShape("ViT-S", dim=384, hidden=1536, heads=6, depth=12)
VIT_B = ShareShape("ViT-B", dim=768, hidden=3072, heads=12, depth=12)


@dataclass(frozen=True)
class StepShape:
    label: str
    batch: int
    tokens: int
    dim: int
    heads: int
    depth: int


STEP = StepShape("4-block ViT-S encoder", batch=64, tokens=65, dim=384, heads=6, depth=4)
STEP_QUICK = StepShape("4-block ViT-Ti encoder", batch=16, tokens=65, dim=192, heads=3, depth=4)


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.01) -> None:
    """Make the experts of every mixture differ (they start as copies), so that the checks compare something."""
    for moe in mixtures(model):
        for stack in moe.stacks():
            stack.add_(torch.randn_like(stack), alpha=scale)


# ---------------------------------------------------------------------------------------------------- A. share
def naive_experts(model: nn.Module) -> list[nn.ModuleList]:
    """Per mixture of ``model``, N separate FFN modules holding the same values as its stacked experts."""
    layers = []
    with torch.no_grad():
        for moe in mixtures(model):
            experts = nn.ModuleList(copy.deepcopy(moe.template) for _ in range(moe.num_experts))
            for index, expert in enumerate(experts):
                for parameter, stack in zip(expert.parameters(), moe.stacks(), strict=True):
                    parameter.copy_(stack[index])
            layers.append(experts)
    return layers


@torch.no_grad()
def naive_share(layers: list[nn.ModuleList], beta: float) -> None:
    """The update as a research script writes it: a loop over layers, experts and tensors, from cloned old values."""
    for experts in layers:
        n = len(experts)
        parameters = [list(expert.parameters()) for expert in experts]
        old = [[p.detach().clone() for p in expert] for expert in parameters]
        for i in range(n):
            for k, parameter in enumerate(parameters[i]):
                others = sum(old[j][k] for j in range(n) if j != i)
                parameter.copy_((1 - beta) * old[i][k] + beta / (n - 1) * others)


@dataclass
class ShareResult:
    shape: ShareShape
    layers: int
    numel: int  # expert elements over all mixtures
    tensors: int  # stacked tensors over all mixtures
    timings: dict[str, Timing]


FLOOR = "floor: flat `mul_` (1 read + 1 write)"
REFERENCE = "reference: flat `lerp_` (2 reads + 1 write)"
WEIGHTAVG_SHARE = "weightavg `share_all(model, beta)`"
NAIVE_SHARE = "naive loop over layers/experts/tensors"


def bench_share(shape: ShareShape, runner: Runner) -> ShareResult:
    device = runner.device
    model = Encoder(shape.dim, shape.depth, shape.heads, shape.hidden).to(device)
    to_moe(model, num_experts=NUM_EXPERTS)
    perturb(model)
    layers = naive_experts(model)
    stacks = [stack for moe in mixtures(model) for stack in moe.stacks()]
    numel = sum(stack.numel() for stack in stacks)

    # Check: one update of each from the same values gives the same experts.
    before = [stack.detach().clone() for stack in stacks]
    share_all(model, BETA)
    naive_share(layers, BETA)
    for moe, experts in zip(mixtures(model), layers, strict=True):
        for k, stack in enumerate(moe.stacks()):
            naive = torch.stack([list(expert.parameters())[k].detach() for expert in experts])
            if not torch.allclose(stack, naive, rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"{shape.label}: weightavg's share and the naive loop disagree")
    if all(torch.equal(a, b) for a, b in zip(before, stacks, strict=True)):
        raise RuntimeError(f"{shape.label}: share_all changed nothing")
    del before

    flat = torch.rand(numel, device=device)
    target = torch.rand(numel, device=device)
    coefficient = BETA * NUM_EXPERTS / (NUM_EXPERTS - 1)

    def floor() -> None:
        flat.mul_(-1.0)  # a sign flip: values stay normal however many times it runs

    def reference() -> None:
        flat.lerp_(target, coefficient)

    cases: dict[str, Case] = {
        FLOOR: floor,
        REFERENCE: reference,
        WEIGHTAVG_SHARE: lambda: share_all(model, BETA),
        NAIVE_SHARE: lambda: naive_share(layers, BETA),
    }
    timings = runner.time(cases)
    return ShareResult(shape, len(layers), numel, len(stacks), timings)


def share_table(result: ShareResult) -> list[str]:
    floor = result.timings[FLOOR].median_s
    reference = result.timings[REFERENCE].median_s
    shape = result.shape
    lines = [
        f"### A. Share update, {shape.label} FFNs (dim {shape.dim}, hidden {shape.hidden}): {result.layers} mixtures "
        f"of N={NUM_EXPERTS}, {result.numel:,} expert elements in {result.tensors} stacked tensors "
        f"({result.numel * 4 / 1e6:.1f} MB fp32), beta {BETA}",
        "",
        f"| implementation | {TIMING_COLUMNS} | x floor (8 B/el) | x reference (12 B/el) | GB/s at 8 B/el |",
        f"|---|{TIMING_ALIGN}|---:|---:|---:|",
    ]
    for name, t in result.timings.items():
        rate = result.numel * FLOOR_BYTES / t.median_s / 1e9
        lines.append(
            f"| {name} | {timing_cells(t)} | {t.median_s / floor:.2f} | {t.median_s / reference:.2f} | {rate:.1f} |"
        )
    reference_rate = result.numel * REFERENCE_BYTES / reference / 1e9
    lines += ["", f"(The reference row moves {REFERENCE_BYTES} B/element: {reference_rate:.1f} GB/s of real traffic.)"]
    return lines


# ---------------------------------------------------------------------------------------------------- B. training
@dataclass
class StepResult:
    title: str
    rows: list[tuple[str, Timing, str]]  # name, timing, the row it is compared with


def train_case(model: nn.Module, x: torch.Tensor) -> Case:
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    return step


def eval_case(model: nn.Module, x: torch.Tensor) -> Case:
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    return forward


def mean_case(model: nn.Module) -> Case:
    layers = mixtures(model)

    def means() -> None:
        with torch.no_grad():
            for moe in layers:
                moe.mean_tensors()

    return means


def check_eval_is_merged(converted: nn.Module, x: torch.Tensor, label: str) -> None:
    merged = copy.deepcopy(converted)
    to_dense(merged)
    converted.eval()
    merged.eval()
    with torch.no_grad():
        if not torch.allclose(converted(x), merged(x), rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"{label}: the mixtures' eval forward differs from the merged model's")


def bench_steps(shape: StepShape, runner: Runner) -> list[StepResult]:
    device = runner.device
    hidden = 4 * shape.dim
    x = torch.randn(shape.batch, shape.tokens, shape.dim, device=device)

    dense = Encoder(shape.dim, shape.depth, shape.heads, hidden).to(device)
    converted = copy.deepcopy(dense)
    names = to_moe(converted, num_experts=NUM_EXPERTS)
    perturb(converted)
    check_eval_is_merged(converted, x, shape.label)
    # Separate copies for eval, so the train and eval rows never share grad state.
    dense_eval, converted_eval = copy.deepcopy(dense), copy.deepcopy(converted)
    where = ", ".join(names)
    cases: dict[str, Case] = {
        "dense: forward + backward": train_case(dense, x),
        f"mixtures ({where}): forward + backward": train_case(converted, x),
        "dense: eval forward": eval_case(dense_eval, x),
        "mixtures: eval forward": eval_case(converted_eval, x),
        f"`mean_tensors()` of the {len(names)} mixtures (in every eval forward)": mean_case(converted_eval),
    }
    timings = runner.time(cases)
    keys = list(cases)
    base = {keys[0]: keys[0], keys[1]: keys[0], keys[2]: keys[2], keys[3]: keys[2], keys[4]: keys[3]}
    title = (
        f"### B. {shape.label}, tokens [{shape.batch}, {shape.tokens}, {shape.dim}], {shape.heads} heads, "
        f"MLP hidden {hidden}; mixtures of N={NUM_EXPERTS}"
    )
    stack = StepResult(title, [(name, timings[name], base[name]) for name in keys])
    del dense, converted, dense_eval, converted_eval
    gc.collect()

    ffn = Mlp(shape.dim, hidden).to(device)
    moe = RandomPartitionMoE(copy.deepcopy(ffn), NUM_EXPERTS, seed=0).to(device)
    perturb(moe)
    check_eval_is_merged(moe, x, f"{shape.label} FFN")
    ffn_eval, moe_eval = copy.deepcopy(ffn), copy.deepcopy(moe)
    cases = {
        "dense FFN: forward + backward": train_case(ffn, x),
        "one mixture: forward + backward": train_case(moe, x),
        "dense FFN: eval forward": eval_case(ffn_eval, x),
        "one mixture: eval forward": eval_case(moe_eval, x),
        "`mean_tensors()` of the mixture": mean_case(moe_eval),
    }
    timings = runner.time(cases)
    keys = list(cases)
    base = {keys[0]: keys[0], keys[1]: keys[0], keys[2]: keys[2], keys[3]: keys[2], keys[4]: keys[3]}
    title = f"### B. One FFN alone (dim {shape.dim}, hidden {hidden}) on the same tokens"
    alone = StepResult(title, [(name, timings[name], base[name]) for name in keys])
    return [stack, alone]


def step_table(result: StepResult) -> list[str]:
    timings = {name: timing for name, timing, _ in result.rows}
    lines = [
        result.title,
        "",
        f"| row | {TIMING_COLUMNS} | ratio | to |",
        f"|---|{TIMING_ALIGN}|---:|---|",
    ]
    for name, timing, base in result.rows:
        ratio = timing.median_s / timings[base].median_s
        lines.append(f"| {name} | {timing_cells(timing)} | {ratio:.3f} | {'-' if base == name else base} |")
    return lines


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, cuda:1, xpu, mps, ...)")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per share row (default 20; 5 quick)")
    parser.add_argument(
        "--step-repeats", type=int, default=None, help="timed samples per training/eval row (default 7; 3 quick)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="small shapes, fewer repeats: a smoke run")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 20
    if args.step_repeats is None:
        args.step_repeats = 3 if args.quick else 7
    for flag in ("repeats", "step_repeats", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be at least 1")
    args.warmup = 1 if args.quick else 3
    args.min_sample_s = 0.005 if args.quick else 0.03
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    share_runner = Runner(device, args.repeats, args.warmup, args.min_sample_s)
    # A training step takes long enough that one call is a sample; one warmup call each.
    step_runner = Runner(device, args.step_repeats, 1, args.min_sample_s)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(
        f"## weightavg EWA benchmark\n\ntorch {torch.__version__}, Python {platform.python_version()}; device {device} "
        f"({platform.machine()}, {os.cpu_count()} CPUs), {torch.get_num_threads()} threads; {args.repeats} "
        f"interleaved repeats per share row, {args.step_repeats} per training/eval row, medians; load average at "
        f"start {load}\n",
        flush=True,
    )
    cpus = os.cpu_count() or 1
    if hasattr(os, "getloadavg") and os.getloadavg()[0] + args.threads > cpus + 0.5:
        print(
            f"Note: load {os.getloadavg()[0]:.1f} + {args.threads} threads exceeds the {cpus} CPUs; a multi-threaded "
            "kernel then waits for descheduled threads and every time grows erratically"
            + (" (compare with --threads 1).\n" if args.threads > 1 else ".\n"),
            flush=True,
        )
    started = time.perf_counter()
    for shape in (VIT_TI,) if args.quick else (VIT_S, VIT_B):
        print("\n".join(share_table(bench_share(shape, share_runner))) + "\n", flush=True)
        gc.collect()
    for result in bench_steps(STEP_QUICK if args.quick else STEP, step_runner):
        print("\n".join(step_table(result)) + "\n", flush=True)
    end_load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"(took {time.perf_counter() - started:.0f} s; load average at end {end_load})")


if __name__ == "__main__":
    main()
