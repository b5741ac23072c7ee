"""Live vs EMA vs SWA weights over training on Fashion-MNIST: the figure and table in ``docs/ema.md``/``docs/swa.md``.

    apt-get install -y dataset-fashion-mnist     # real data: /usr/share/datasets/fashion-mnist
    pip install matplotlib                       # or: pip install -e .[docs]
    python docs/experiments/ema_swa_curves.py --seeds 0 1 2 --out docs/figures

One Lightning run per seed trains a small BatchNorm CNN with SGD at a constant learning rate and carries two averagers
from ``weightavg.callbacks``: ``EMA(decay=0.998)`` from the first step, and ``SWA`` sampling every 20 optimizer steps
once 2 epochs are done (BatchNorm statistics recomputed at the end of fit by the callback). Both keep the live weights
in the model (``validate_with="live"``, ``apply_at_end=False``). A probe callback measures the held-out validation
accuracy (the last 10k Fashion-MNIST training images, never trained on) of the live weights and of each average a few
times per epoch. After fit, all three are scored on the 10k test set.

Writes ``<out>/ema_swa_curves.png`` and ``<out>/ema_swa_curves.json`` (every number) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from weightavg.callbacks import EMA, SWA, AveragingCallback
from weightavg.train import accuracy, load_dataset

Split = tuple[torch.Tensor, torch.Tensor]
KINDS = ("live", "ema", "swa")


class SmallCNN(pl.LightningModule):
    """A strided 5x5 and a strided 3x3 convolution, each with BatchNorm, then a linear head (9,250 parameters at
    width 8); takes flat 784-pixel inputs."""

    def __init__(self, lr: float, momentum: float, width: int = 8) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, width, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * width * 7 * 7, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Split, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # A constant, fairly high learning rate: the live weights keep bouncing around the optimum, which is the
        # regime where averaging them pays off.
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class Probe(pl.Callback):
    """Every ``every`` optimizer steps (and at the last one), the validation accuracy of the live weights and of each
    average that has had an update; at the last step also the SWA average's test accuracy, before the SWA callback
    recomputes its BatchNorm statistics. Must come after the averaging callbacks, so their update for the step is in.
    """

    def __init__(self, every: int, val: Split, test: Split, averagers: dict[str, AveragingCallback]) -> None:
        self.every = every
        self.val, self.test = val, test
        self.averagers = averagers
        self.curves: dict[str, list[tuple[int, float]]] = {kind: [] for kind in KINDS}
        self.swa_test_before_bn_recompute = math.nan

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every and step != trainer.estimated_stepping_batches:
            return
        self.curves["live"].append((step, accuracy(pl_module, self.val)))
        for kind, callback in self.averagers.items():
            averager = callback.averager
            if averager is not None and averager.has_average:
                with averager.averaged():
                    self.curves[kind].append((step, accuracy(pl_module, self.val)))
                    if kind == "swa" and step == trainer.estimated_stepping_batches:
                        self.swa_test_before_bn_recompute = accuracy(pl_module, self.test)


def run_seed(seed: int, data: tuple[Split, Split, Split], args: argparse.Namespace) -> dict[str, Any]:
    """One Trainer run; returns the validation curves and the final test accuracies."""
    train, val, test = data
    pl.seed_everything(seed, verbose=False)
    loader = DataLoader(
        TensorDataset(*train), batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    steps_per_epoch = len(loader)
    model = SmallCNN(args.lr, args.momentum, args.width)
    ema = EMA(decay=args.ema_decay, validate_with="live", apply_at_end=False, name="ema")
    swa = SWA(
        start=args.swa_start_epoch, start_unit="epoch", every=args.swa_every, every_unit="step",
        validate_with="live", apply_at_end=False, name="swa",
    )
    probe = Probe(max(1, steps_per_epoch // args.evals_per_epoch), val, test, {"ema": ema, "swa": swa})
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[ema, swa, probe], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, loader)

    # apply_at_end=False everywhere: the model holds the live weights. The SWA callback recomputed the BatchNorm
    # statistics of its average at the end of fit; the last probe point (same step) is SWA before that recompute.
    val_acc = {"live": accuracy(model, val)}
    test_acc = {"live": accuracy(model, test)}
    for kind, callback in (("ema", ema), ("swa", swa)):
        assert callback.averager is not None and callback.averager.has_average
        with callback.averager.averaged():
            val_acc[kind] = accuracy(model, val)
            test_acc[kind] = accuracy(model, test)
    return {
        "seed": seed,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": trainer.global_step,
        "curves": probe.curves,
        "swa_val_before_bn_recompute": probe.curves["swa"][-1][1],
        "swa_test_before_bn_recompute": probe.swa_test_before_bn_recompute,
        "final_val": val_acc,
        "test": test_acc,
        "swa_samples": swa.averager.num_updates if swa.averager else 0,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """Test accuracy (%) per seed, then mean ± std over seeds; differences are paired (same seed)."""
    columns = {
        "live": lambda r: r["test"]["live"],
        "EMA": lambda r: r["test"]["ema"],
        "SWA (BN recomputed)": lambda r: r["test"]["swa"],
        "SWA (no BN recompute)": lambda r: r["swa_test_before_bn_recompute"],
        "EMA - live": lambda r: r["test"]["ema"] - r["test"]["live"],
        "SWA - live": lambda r: r["test"]["swa"] - r["test"]["live"],
    }
    values = {name: [100 * get(run) for run in runs] for name, get in columns.items()}
    lines = ["| seed | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for i, run in enumerate(runs):
        cells = [f"{values[name][i]:{'+' if '-' in name else ''}.2f}" for name in columns]
        lines.append(f"| {run['seed']} | " + " | ".join(cells) + " |")
    summary = []
    for name in columns:
        mean, std = mean_std(values[name])
        summary.append(f"{mean:{'+' if '-' in name else ''}.2f} ± {std:.2f}")
    lines.append("| mean ± std | " + " | ".join(summary) + " |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "live": ("live weights", "tab:gray"),
        "ema": (f"EMA (decay={args.ema_decay})", "tab:blue"),
        "swa": (f"SWA (every {args.swa_every} steps from epoch {args.swa_start_epoch})", "tab:orange"),
    }
    steps_per_epoch = runs[0]["steps_per_epoch"]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=150)
    lowest, highest = math.inf, -math.inf
    for kind, (label, color) in styles.items():
        steps = [s for s, _ in runs[0]["curves"][kind]]
        values = torch.tensor([[100 * a for _, a in run["curves"][kind]] for run in runs])
        mean = values.mean(0)
        std = values.std(0) if len(runs) > 1 else torch.zeros_like(mean)
        ax.plot(steps, mean, color=color, lw=1.8, marker="o", ms=2.5, label=label)
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        after_first_epoch = [m for s, m in zip(steps, mean.tolist(), strict=True) if s >= steps_per_epoch]
        lowest = min(lowest, *after_first_epoch)
        highest = max(highest, *(mean + std).tolist())
    final = torch.tensor([100 * run["final_val"]["swa"] for run in runs])
    end = runs[0]["total_steps"]
    ax.errorbar(
        [end + steps_per_epoch * 0.06], [final.mean()], yerr=[final.std() if len(runs) > 1 else 0.0],
        fmt="*", ms=11, color="tab:red", capsize=3, label="SWA after BatchNorm recompute (end of fit)",
    )
    ax.axvline(args.swa_start_epoch * steps_per_epoch, color="tab:orange", ls=":", lw=1)
    ax.annotate(" SWA starts", (args.swa_start_epoch * steps_per_epoch, 0.02), xycoords=("data", "axes fraction"),
                color="tab:orange", fontsize=9)
    # The first epoch (where the EMA still carries the random initialisation) is cut off; the top leaves room for
    # the legend.
    ax.set_ylim(math.floor(lowest) - 1, highest + 2.0)
    ax.set_xlim(0, end + steps_per_epoch * 0.15)
    ax.set_xlabel(f"optimizer steps ({steps_per_epoch} per epoch, batch {args.batch_size})")
    ax.set_ylabel("validation accuracy (%)")
    seeds = ", ".join(str(r["seed"]) for r in runs)
    ax.set_title(
        f"Fashion-MNIST, BatchNorm CNN, SGD lr={args.lr} (constant), momentum={args.momentum}\n"
        f"validation accuracy, mean ± 1 std over seeds {seeds}",
        fontsize=10,
    )
    epochs = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
    epochs.set_xlabel("epochs")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=None, help="first N training images (default: all 50k)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--width", type=int, default=8, help="channels of the first convolution")
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--swa-start-epoch", type=int, default=2)
    parser.add_argument("--swa-every", type=int, default=20)
    parser.add_argument("--evals-per-epoch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    started = time.perf_counter()
    train, val, test = load_dataset("fashion_mnist")
    if args.train_size is not None:
        train = (train[0][: args.train_size], train[1][: args.train_size])
    print(f"Fashion-MNIST: {len(train[1])} train, {len(val[1])} validation, {len(test[1])} test; "
          f"{args.threads} thread(s)")

    runs = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        run = run_seed(seed, (train, val, test), args)
        run["seconds"] = time.perf_counter() - t0
        runs.append(run)
        t = run["test"]
        print(f"seed {seed}: test live {t['live']:.4f}  EMA {t['ema']:.4f}  SWA {t['swa']:.4f}  "
              f"(SWA val before/after BN recompute {run['swa_val_before_bn_recompute']:.4f}/"
              f"{run['final_val']['swa']:.4f}; {run['swa_samples']} SWA samples; {run['seconds']:.0f} s)")

    args.out.mkdir(parents=True, exist_ok=True)
    plot(runs, args, args.out / "ema_swa_curves.png")
    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "torch": torch.__version__, "runs": runs}
    (args.out / "ema_swa_curves.json").write_text(json.dumps(record, indent=1))
    print(f"\nFinal test accuracy (%), Fashion-MNIST test set ({len(test[1])} images), std over seeds:\n")
    print(markdown_table(runs))
    print(f"\nwrote {args.out / 'ema_swa_curves.png'} and {args.out / 'ema_swa_curves.json'} "
          f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
