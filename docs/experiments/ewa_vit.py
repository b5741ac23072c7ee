"""EWA (experts weights averaging) on a small ViT, Fashion-MNIST, CPU: does training some MLPs as mixtures whose
experts are pulled together, then merging them, beat plain dense training of the same architecture?

    apt-get install -y dataset-fashion-mnist     # real data: /usr/share/datasets/fashion-mnist
    pip install matplotlib                       # or: pip install -e .[docs]
    python docs/experiments/ewa_vit.py           # full grid (15 runs), 42 min on a shared 2-core CPU, 1 thread
    python docs/experiments/ewa_vit.py --quick   # smoke run, ~30 s (writes ewa_vit_quick.*)

A ViT written here (7x7 patches -> 16 tokens + cls, learned position embedding, pre-norm blocks, width 64, depth 4,
4 heads, MLP hidden 128, each block's MLP an ``nn.Sequential(Linear, GELU, Linear)`` called ``mlp``) is trained with
AdamW (lr 1e-3, weight decay 0.05), batch 128 (78 steps an epoch), 10 epochs (one linear warm-up epoch, then a cosine
decay to 0) on the first 10k Fashion-MNIST training images, no augmentation. Conditions, each for seeds 0, 1, 2 with
the same initial weights and the same minibatch order per seed:

- ``dense``: the ViT as is.
- ``moe``: ``weightavg.ewa.to_moe`` turns the MLPs of blocks 2 and 4 (the default selection) into random-partition
  mixtures of N=4 experts; no weight sharing (beta=0); merged (experts' mean) at the end.
- ``ewa_b``: the same plus the EWA update after every optimizer step, through ``weightavg.optim.EWA``, beta ramped
  linearly from 0 to b over the first 40% of the steps, then constant; merged at the end (``opt.merge()``).

After every epoch: validation accuracy (the last 10k training images, never trained on) in eval mode (a mixture then
computes the merged model) and the experts' RMS spread around their mean. At the end: test accuracy (10k test images)
before and after ``to_dense`` (with the max abs logit difference), parameter counts, training wall time. Nothing is
chosen on the test set. The conditions of one seed run back to back, so that wall-time ratios compare runs made
close together (on a machine shared with other work they still swing widely; the per-step cost is better measured
by interleaving steps).

Writes ``<out>/ewa_vit.png`` and ``<out>/ewa_vit.json`` (every number; rewritten after each run) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightavg.ewa import mixtures, to_dense, to_moe
from weightavg.optim import EWA
from weightavg.train import load_dataset

Split = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------- model
class Block(nn.Module):
    """Pre-norm transformer block; ``mlp`` is the FFN EWA may turn into a mixture."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, patch: int = 7, dim: int = 64, depth: int = 4, heads: int = 4, hidden: int = 128,
                 classes: int = 10, image: int = 28) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))  # type: ignore[no-any-return]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ----------------------------------------------------------------------------------------------------- conditions
@dataclass(frozen=True)
class Condition:
    name: str
    label: str
    experts: int  # 0: dense, no conversion
    beta: float  # EWA share rate at full strength (0: mixture without sharing)
    select: str | None = None  # None: to_moe's default (every other block's MLP)


CONDITIONS = {
    c.name: c
    for c in (
        Condition("dense", "dense", 0, 0.0),
        Condition("moe", "mixture N=4, no EWA", 4, 0.0),
        Condition("ewa0.1", "EWA N=4, beta 0.1", 4, 0.1),
        Condition("ewa0.3", "EWA N=4, beta 0.3", 4, 0.3),
        Condition("ewa0.5", "EWA N=4, beta 0.5", 4, 0.5),
        # Optional extras (not in the default grid):
        Condition("ewa0.3_n2", "EWA N=2, beta 0.3", 2, 0.3),
        Condition("ewa0.3_all", "EWA N=4, beta 0.3, all blocks", 4, 0.3, "blocks.*.mlp"),
    )
}
DEFAULT_CONDITIONS = ("dense", "moe", "ewa0.1", "ewa0.3", "ewa0.5")


# --------------------------------------------------------------------------------------------------------- one run
def run(cond: Condition, seed: int, data: tuple[Split, Split, Split], args: argparse.Namespace) -> dict[str, Any]:
    """Train one condition with one seed; return its curves, final numbers and checks."""
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = data
    torch.manual_seed(seed)
    model = ViT(args.patch, args.dim, args.depth, args.heads, args.hidden)
    dense_params = count(model)
    init_checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    reference_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted: list[str] = []
    if cond.experts:
        # Before the optimizer: the mixtures' parameters are new tensors. Own seed stream for the token partitions.
        converted = to_moe(model, cond.select, num_experts=cond.experts, seed=1000 + 10 * seed)
    train_params = count(model)

    steps_per_epoch = len(train_y) // args.batch_size  # the last partial batch is dropped
    total = steps_per_epoch * args.epochs
    warmup = steps_per_epoch * args.warmup_epochs
    ramp = round(args.ramp_fraction * total)
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(inner, factor)
    opt: torch.optim.Optimizer = EWA(inner, model, beta=cond.beta, ramp_steps=ramp) if cond.experts else inner

    order = torch.Generator().manual_seed(seed)  # the same minibatch order in every condition of this seed
    curves: dict[str, list[float]] = {"val_acc": [], "train_loss": [], "spread": [], "beta": []}
    spread_per_layer: list[list[float]] = []
    train_seconds = 0.0
    started = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        begin = time.perf_counter()
        perm = torch.randperm(len(train_y), generator=order)
        losses = []
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            schedule.step()
            losses.append(float(loss.detach()))
        train_seconds += time.perf_counter() - begin
        curves["val_acc"].append(accuracy(logits_of(model, val_x), val_y))
        curves["train_loss"].append(statistics.fmean(losses))
        layers = [layer.spread() for layer in mixtures(model)]
        spread_per_layer.append(layers)
        curves["spread"].append(statistics.fmean(layers) if layers else math.nan)
        curves["beta"].append(opt.current_beta() if isinstance(opt, EWA) else 0.0)

    # The deployed model: eval-mode mixtures (experts' mean) must equal the merged dense model.
    before = logits_of(model, test_x)
    with torch.no_grad():  # the scale the spread compares with: RMS of the merged weights, per mixture
        mean_rms = [
            math.sqrt(sum(float(t.pow(2).sum()) for t in layer.mean_tensors().values())
                      / sum(t.numel() for t in layer.mean_tensors().values()))
            for layer in mixtures(model)
        ]
    merged = opt.merge() if isinstance(opt, EWA) else to_dense(model)
    after = logits_of(model, test_x)
    shapes_match = {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference_shapes
    result = {
        "condition": cond.name, "seed": seed, "converted": converted, "merged": merged,
        "init_checksum": init_checksum,
        "test_acc": accuracy(after, test_y), "test_acc_before_merge": accuracy(before, test_y),
        "merge_max_abs_logit_diff": float((before - after).abs().max()),
        "final_val_acc": curves["val_acc"][-1],
        "params": {"dense": dense_params, "training": train_params, "after_merge": count(model)},
        "state_dict_matches_dense": shapes_match,
        "curves": curves, "spread_per_layer": spread_per_layer, "final_mean_weight_rms_per_layer": mean_rms,
        "steps": total, "steps_per_epoch": steps_per_epoch, "ramp_steps": ramp if cond.experts else 0,
        "train_seconds": train_seconds, "total_seconds": time.perf_counter() - started,
    }
    if not shapes_match or result["params"]["after_merge"] != dense_params or result["merge_max_abs_logit_diff"] > 1e-4:
        raise AssertionError(f"{cond.name} seed {seed}: merge check failed: {result['params']}, "
                             f"logit diff {result['merge_max_abs_logit_diff']}, shapes match {shapes_match}")
    return result


# -------------------------------------------------------------------------------------------------------- summary
def summarise(runs: list[dict[str, Any]], names: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    by = {(r["condition"], r["seed"]): r for r in runs}
    summary: dict[str, Any] = {}
    for name in names:
        rs = [by[(name, s)] for s in seeds]
        acc = [r["test_acc"] for r in rs]
        entry: dict[str, Any] = {
            "test_acc": mean_std(acc), "test_acc_per_seed": acc,
            "final_val_acc": mean_std([r["final_val_acc"] for r in rs]),
            "final_spread": mean_std([r["curves"]["spread"][-1] for r in rs]) if CONDITIONS[name].experts else None,
            "train_seconds": mean_std([r["train_seconds"] for r in rs]),
            "params": rs[0]["params"],
            "max_merge_logit_diff": max(r["merge_max_abs_logit_diff"] for r in rs),
        }
        if name != "dense":
            base = [by[("dense", s)] for s in seeds]
            diffs = [r["test_acc"] - b["test_acc"] for r, b in zip(rs, base, strict=True)]
            val_diffs = [r["final_val_acc"] - b["final_val_acc"] for r, b in zip(rs, base, strict=True)]
            ratios = [r["train_seconds"] / b["train_seconds"] for r, b in zip(rs, base, strict=True)]
            entry["vs_dense"] = {
                "test_diff_per_seed": diffs, "test_diff": mean_std(diffs),
                "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
                "losses": sum(d < 0 for d in diffs),
                "val_diff_per_seed": val_diffs, "val_diff": mean_std(val_diffs),
                "time_ratio_per_seed": ratios, "time_ratio": mean_std(ratios),
            }
        summary[name] = entry
    return summary


def markdown_table(summary: dict[str, Any], seeds: Sequence[int]) -> str:
    lines = [
        "| condition | test acc (%) mean ± std | per seed (" + ", ".join(map(str, seeds)) + ") "
        "| vs dense, paired (per seed) | vs dense mean ± std | val acc (%) | final spread | train time / dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in summary.items():
        m, s = e["test_acc"]
        per = ", ".join(f"{100 * a:.2f}" for a in e["test_acc_per_seed"])
        vm, vs = e["final_val_acc"]
        if "vs_dense" in e:
            d = e["vs_dense"]
            per_d = ", ".join(f"{100 * x:+.2f}" for x in d["test_diff_per_seed"])
            dm, ds = d["test_diff"]
            diff = f"{100 * dm:+.2f} ± {100 * ds:.2f} ({d['wins']}W/{d['ties']}T/{d['losses']}L)"
            ratio = f"{d['time_ratio'][0]:.2f}x"
        else:
            per_d, diff, ratio = "-", "-", "1x"
        spread = f"{e['final_spread'][0]:.2e}" if e["final_spread"] else "-"
        lines.append(f"| {CONDITIONS[name].label} | {100 * m:.2f} ± {100 * s:.2f} | {per} | {per_d} | {diff} "
                     f"| {100 * vm:.2f} ± {100 * vs:.2f} | {spread} | {ratio} |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    colors = dict(zip(names, plt.get_cmap("tab10").colors, strict=False))  # type: ignore[attr-defined]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=150)
    for i, name in enumerate(names):
        e = summary[name]
        per_seed = [100 * a for a in e["test_acc_per_seed"]]
        jitter = [i + 0.08 * (k - (len(per_seed) - 1) / 2) for k in range(len(per_seed))]
        left.scatter(jitter, per_seed, color=colors[name], s=18, alpha=0.7, zorder=3)
        m, s = e["test_acc"]
        left.errorbar([i + 0.3], [100 * m], yerr=[100 * s], fmt="D", ms=6, color=colors[name], capsize=4, zorder=4)
    for k in range(len(args.seeds)):  # thin lines join the same seed across conditions (paired design)
        left.plot(range(len(names)), [100 * summary[n]["test_acc_per_seed"][k] for n in names], color="gray",
                  lw=0.6, alpha=0.5, zorder=1, label="same seed" if k == 0 else None)
    left.set_xticks(range(len(names)), [CONDITIONS[n].label.replace(", ", "\n") for n in names], fontsize=8)
    left.set_ylabel("test accuracy after merge (%)")
    left.set_title("test accuracy: seeds (dots), mean ± std (diamonds)", fontsize=10)
    left.grid(alpha=0.3, axis="y")
    left.legend(fontsize=8, loc="lower right")

    epochs = range(1, args.epochs + 1)
    for name in names:
        if not CONDITIONS[name].experts:
            continue
        curves = torch.tensor([r["curves"]["spread"] for r in runs if r["condition"] == name])
        right.plot(epochs, curves.mean(0), color=colors[name], marker="o", ms=3, label=CONDITIONS[name].label)
    ramp_epochs = args.ramp_fraction * args.epochs
    right.axvline(ramp_epochs, color="gray", ls=":", lw=1)
    right.annotate(" end of beta ramp", (ramp_epochs, 0.02), xycoords=("data", "axes fraction"), fontsize=8,
                   color="gray")
    right.set_yscale("log")
    right.set_xlabel("epoch")
    right.set_ylabel("expert spread (RMS distance to mean), mean over layers")
    right.set_title(f"expert spread after each epoch, mean over seeds {', '.join(map(str, args.seeds))}", fontsize=10)
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=8)
    fig.suptitle(
        f"EWA on a ViT (dim {args.dim}, depth {args.depth}, MLP {args.hidden}), Fashion-MNIST, "
        f"{args.train_size} train images, {args.epochs} epochs, AdamW lr {args.lr} cosine", fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 640 images, 2 epochs, seeds 0 1, 1k validation / test images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--conditions", nargs="+", default=list(DEFAULT_CONDITIONS), choices=list(CONDITIONS))
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--train-size", type=int, default=10000, help="first N of the 50k training images")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--ramp-fraction", type=float, default=0.4, help="beta ramp length, fraction of all steps")
    parser.add_argument("--patch", type=int, default=7)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="1 measured faster than 2 on the 2-core machine")
    args = parser.parse_args()
    stem, eval_size = "ewa_vit", None
    if args.quick:
        args.train_size, args.epochs, args.seeds, stem, eval_size = 640, 2, args.seeds[:2], "ewa_vit_quick", 1000

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train, val, test = load_dataset("fashion_mnist")
    image = (-1, 1, 28, 28)
    data = (
        (train[0][: args.train_size].reshape(image), train[1][: args.train_size]),
        (val[0][:eval_size].reshape(image), val[1][:eval_size]),
        (test[0][:eval_size].reshape(image), test[1][:eval_size]),
    )
    print(f"Fashion-MNIST: {len(data[0][1])} train, {len(data[1][1])} validation, {len(data[2][1])} test; "
          f"{args.threads} thread(s); conditions {args.conditions}; seeds {args.seeds}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}

    def save(summary: dict[str, Any] | None = None) -> None:
        record = {
            "settings": settings, "conditions": {n: asdict(CONDITIONS[n]) for n in args.conditions},
            "torch": torch.__version__, "summary": summary, "runs": runs,
            "seconds": time.perf_counter() - started,
        }
        (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))

    for seed in args.seeds:  # the conditions of one seed back to back: fair wall-time ratios on a shared machine
        for name in args.conditions:
            r = run(CONDITIONS[name], seed, data, args)
            runs.append(r)
            save()
            spread = f", spread {r['curves']['spread'][-1]:.2e}" if r["converted"] else ""
            print(f"seed {seed} {name:>10}: test {100 * r['test_acc']:.2f} (before merge "
                  f"{100 * r['test_acc_before_merge']:.2f}, max |logit diff| {r['merge_max_abs_logit_diff']:.1e}), "
                  f"val {100 * r['final_val_acc']:.2f}{spread}, params {r['params']['training']:,} -> "
                  f"{r['params']['after_merge']:,}, train {r['train_seconds']:.0f} s", flush=True)

    summary = summarise(runs, args.conditions, args.seeds)
    save(summary)
    plot(runs, summary, args, args.out / f"{stem}.png")
    print(f"\nFashion-MNIST test accuracy ({len(data[2][1])} images) after merge; differences paired by seed:\n")
    print(markdown_table(summary, args.seeds))
    print(f"\nwrote {args.out / (stem + '.png')} and {args.out / (stem + '.json')} "
          f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
