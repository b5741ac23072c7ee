"""Checkpoint combination on real data: LCSC against simple recipes, and greedy soups of fine-tunes.

    apt-get install -y dataset-fashion-mnist    # Fashion-MNIST IDX files in /usr/share/datasets/fashion-mnist
    pip install --no-deps ccexam                # the pretrained MNIST CNN (weights in ccexam/weights/mnist.pth)
    pip install -e ".[docs]"                    # weightavg itself, scikit-learn, matplotlib
    python docs/experiments/lcsc_combination.py             # 5 seeds: ~8.5 CPU-minutes on one thread (512 s wall)
    python docs/experiments/lcsc_combination.py --quick     # 2 seeds, small searches, 2 fine-tunes: a ~35 s smoke test

Part 1, LCSC (Liu et al., ICLR 2025) over the snapshots of ONE short noisy SGD run. For two datasets (scikit-learn
digits, the design notes' pilot; Fashion-MNIST, whose 10k validation and 10k test images resolve 0.01 points) and
several seeds, a one-hidden-layer ReLU MLP (no BatchNorm, so there are no running statistics to recompute) is trained
with SGD at a constant, deliberately high learning rate, wrapped as
``weightavg.optim.LCSC(torch.optim.SGD(...), module=model, every_n_steps=N, keep=12)``. After T steps the last 12
snapshots are combined by

- (a) ``last``: the last snapshot (the live weights at step T);
- (b) ``best EMA``: the EMA-equivalent coefficients ``ema_weights(12, g)`` with g picked on the VALIDATION split among
  the decays that also seed the search (0.5, 0.8, 0.9, 0.95);
- (c) ``uniform``: 1/12 each;
- (d) ``LCSC (val acc)``: ``opt.search(evaluate, method="lcsc", settings=SearchSettings(seed=seed))`` with the default
  search (16 + 25 x 12 = 316 candidates), fitness = validation accuracy (maximised);
- (d') ``LCSC (val NLL)``: the same search with fitness = validation cross-entropy (minimised), a continuous fitness;
- (e) ``4x run``: the same run continued to 4T steps at the same learning rate (identical to a fresh 4T-step run with
  the same seed: the first T steps are shared), last checkpoint; for reference also the uniform average of ITS last 12
  snapshots.

Everything chosen (decay, coefficients) is chosen on the validation split; every number in the tables is measured on
the separate test split. The initial LCSC population contains (a), (b)'s candidates and (c), so on the validation
split LCSC can only tie or beat them: the question is whether that survives on the test split.

Part 2, greedy soup (Wortsman et al. 2022, "Model soups"): from one shared start, ``ccexam.models.MNISTNet(28)`` with
its shipped MNIST weights, k = 8 fine-tunes on scikit-learn digits put into MNIST's 28x28 format (as in
``wiseft_shift.py``) with different learning rates, augmentation, label smoothing, epochs and data order. Per seed
of the whole procedure a fresh random split: 997 train / 300 validation / 500 test. The fine-tunes are held in a
``SnapshotStore``; ``Combiner.choose("greedy", evaluate, greedy_rule=...)`` ranks them by validation accuracy and
adds each next one if the uniform soup's validation accuracy improves (``strict``, the official code) or does not drop
(``not_worse``, the paper's text). Reported on test: the best single fine-tune picked on validation, the uniform soup
of all 8, both greedy soups, and, as an oracle reference only, the best single fine-tune on test.

Library checks per run (they raise if violated): ``opt.combined(w)`` equals the hand-computed sum of the stored
snapshots for a random ``w`` with negative entries; the last snapshot equals the live weights; the live weights are
unchanged after each search; the greedy soup's validation score is not below the best single's.

Writes ``<out>/lcsc_combination.json`` (every number, every search history) and ``<out>/lcsc_combination.png``, and
prints the markdown tables. ``--quick`` writes ``lcsc_combination_quick.*`` so it never overwrites the real results.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weightavg.core.snapshots import SnapshotStore
from weightavg.methods.lcsc import Combiner, SearchSettings, ema_weights, uniform_weights
from weightavg.optim import LCSC
from weightavg.train import load_dataset

Split = tuple[torch.Tensor, torch.Tensor]
MEAN, STD = 0.1307, 0.3081  # MNIST normalisation, as ccexam's MNISTNet was trained with


# -------------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class RunConfig:
    """One dataset's short noisy SGD run (part 1)."""

    dataset: str
    label: str
    hidden: int
    batch_size: int
    lr: float
    momentum: float
    steps: int  # T, the short run; the long run is 4T
    every: int  # snapshot interval in optimizer steps
    keep: int  # snapshots kept (the last ones)


RUNS = (
    # The design notes' pilot: digits, snapshots every 10 steps, the last 12. 1,078 train / 359 val / 360 test.
    RunConfig("digits", "digits (MLP 64-128-10)", 128, 32, 0.3, 0.9, 200, 10, 12),
    # Fashion-MNIST: 50k train / 10k val (the last 10k training images) / 10k test; T = 600 steps = 0.77 epoch.
    RunConfig("fashion_mnist", "Fashion-MNIST (MLP 784-256-10)", 256, 64, 0.1, 0.9, 600, 20, 12),
)
LONGER = 4
FITNESSES = ("acc", "nll")  # LCSC fitness: validation accuracy (max) or validation cross-entropy (min)
BUDGETS = (6, 16, 40, 76, 136, 196)  # evaluations: initial recipes, initial population, ~2, 5, 10, 15 generations


@dataclass(frozen=True)
class Recipe:
    """One fine-tune of the pretrained CNN (part 2)."""

    lr: float
    augment: bool  # random translation by up to 2 pixels each way
    label_smoothing: float
    epochs: int

    def describe(self) -> str:
        parts = [f"lr {self.lr:g}", "shift aug" if self.augment else "no aug"]
        if self.label_smoothing:
            parts.append(f"ls {self.label_smoothing:g}")
        return ", ".join(parts)


RECIPES = (  # all from the same pretrained weights; each also gets its own data order (and augmentation draws)
    Recipe(0.01, False, 0.0, 3), Recipe(0.01, True, 0.0, 3), Recipe(0.02, False, 0.0, 3), Recipe(0.003, False, 0.0, 3),
    Recipe(0.003, True, 0.0, 3), Recipe(0.01, False, 0.1, 3), Recipe(0.005, False, 0.0, 5), Recipe(0.005, True, 0.1, 3),
)
N_TEST, N_VAL = 500, 300


# -------------------------------------------------------------------------------------------------------- helpers
def mlp(features: int, hidden: int, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


@torch.no_grad()
def scores(model: nn.Module, split: Split, batch: int = 5000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    x, y = split
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        logits = model(x[i : i + batch])
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
        loss += float(F.cross_entropy(logits.double(), y[i : i + batch], reduction="sum"))
    model.train(was_training)
    return correct / len(y), loss / len(y)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def max_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return max(float((a[name].double() - b[name].double()).abs().max()) for name in a)


class Batches:
    """Minibatch indices from reshuffled epochs; one generator, so a continued run sees the same stream."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.order = torch.randperm(n, generator=generator)
        self.position = 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.n:
            self.order, self.position = torch.randperm(self.n, generator=self.generator), 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch


def first_best(history: Sequence[Mapping[str, Any]], mode: str) -> Mapping[str, Any]:
    """The history entry with the best fitness, the earliest of ties (the one ``lcsc_search`` keeps)."""
    sign = 1.0 if mode == "max" else -1.0
    return max(history, key=lambda h: sign * float(h["fitness"]))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ----------------------------------------------------------------------------------------------- part 1: LCSC
def run_lcsc_seed(cfg: RunConfig, data: tuple[Split, Split, Split], seed: int, settings: SearchSettings,
                  long_factor: int) -> dict[str, Any]:
    """One short run, every recipe and both searches on its last snapshots, then the run continued to 4T."""
    train, val, test = data
    torch.manual_seed(seed)
    model = mlp(train[0].shape[1], cfg.hidden)
    opt = LCSC(torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum), module=model,
               every_n_steps=cfg.every, keep=cfg.keep)
    batches = Batches(len(train[1]), cfg.batch_size, torch.Generator().manual_seed(seed))
    losses: list[float] = []

    def train_for(steps: int) -> None:
        model.train()
        for _ in range(steps):
            idx = batches.next()
            opt.zero_grad()
            loss = F.cross_entropy(model(train[0][idx]), train[1][idx])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))

    start = time.perf_counter()
    train_for(cfg.steps)
    train_s = time.perf_counter() - start
    live = state_copy(model)
    snapshots = opt.store.snapshots
    k = len(snapshots)
    steps_kept = [s.step for s in snapshots]

    # Library checks: the optimizer face against a hand-made combination, and the last snapshot against the live model.
    checks: dict[str, float] = {}
    probe = torch.randn(k, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
    probe = probe - probe.mean() + 1.0 / k  # sums to 1, several entries negative
    by_hand: dict[str, torch.Tensor] = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in live.items()}
    for snapshot, weight in zip(snapshots, probe.tolist(), strict=True):
        with opt.store.open(snapshot) as tensors:
            for name in by_hand:
                by_hand[name] += weight * tensors[name].double()
    with opt.combined(probe):
        checks["combined_vs_by_hand"] = max_diff(model.state_dict(), by_hand)
    with opt.combined(torch.eye(k, dtype=torch.float64)[-1]):
        checks["last_snapshot_vs_live"] = max_diff(model.state_dict(), live)
    checks["live_after_combined"] = max_diff(model.state_dict(), live)

    def measure(weights: Sequence[float] | torch.Tensor) -> dict[str, float]:
        with opt.combined(weights):
            (va, vl), (ta, tl) = scores(model, val), scores(model, test)
        return {"val_acc": va, "val_nll": vl, "test_acc": ta, "test_nll": tl}

    methods: dict[str, dict[str, Any]] = {}
    methods["last"] = {**measure(torch.eye(k, dtype=torch.float64)[-1]), "weights": [0.0] * (k - 1) + [1.0]}
    methods["uniform"] = {**measure(uniform_weights(k)), "weights": uniform_weights(k).tolist()}
    emas: dict[float, dict[str, Any]] = {
        decay: {**measure(ema_weights(k, decay)), "weights": ema_weights(k, decay).tolist()}
        for decay in settings.decays
    }
    best_decay = max(settings.decays, key=lambda d: emas[d]["val_acc"])  # ties: the first (smallest) decay
    methods["best_ema"] = {**emas[best_decay], "decay": best_decay}

    searches: dict[str, dict[str, Any]] = {}
    for fitness in FITNESSES:
        mode = "max" if fitness == "acc" else "min"
        column = 0 if fitness == "acc" else 1

        def evaluate(column: int = column) -> float:
            return scores(model, val)[column]

        begin = time.perf_counter()
        result = opt.search(evaluate, method="lcsc", settings=replace(settings, seed=seed), mode=mode)
        seconds = time.perf_counter() - begin
        checks[f"live_after_search_{fitness}"] = max_diff(model.state_dict(), live)
        weights = result.weights
        methods[f"lcsc_{fitness}"] = {**measure(weights), "weights": weights}
        # The best-so-far curve; the best of the initial recipes (last, uniform, EMA decays) is the first 6 entries.
        history = result.history
        # The candidate the search would have returned after fewer evaluations (the first best so far; the first 6
        # evaluations are the initial recipes: last, uniform, EMA for each decay), measured on both splits.
        by_budget: dict[str, dict[str, float]] = {}
        for budget in (*(b for b in BUDGETS if b < len(history)), len(history)):
            pick = first_best(history[:budget], mode)
            by_budget["all" if budget == len(history) else str(budget)] = {
                "evaluation": int(pick["evaluation"]), **measure(list(pick["weights"]))  # type: ignore[call-overload]
            }
        chosen = torch.tensor(first_best(history, mode)["weights"])  # type: ignore[arg-type]
        checks[f"first_best_vs_result_{fitness}"] = float((chosen - torch.tensor(weights)).abs().max())
        searches[fitness] = {
            "mode": mode, "fitness": result.fitness, "evaluations": result.evaluations,
            "cache_hits": result.cache_hits, "seconds": seconds,
            "best_so_far": [float(h["best"]) for h in history],  # type: ignore[arg-type]
            "fitness_per_evaluation": [float(h["fitness"]) for h in history],  # type: ignore[arg-type]
            "generation": [int(h["generation"]) for h in history],  # type: ignore[call-overload]
            "min_coefficient": min(weights), "max_coefficient": max(weights),
            "negative_coefficients": sum(w < 0 for w in weights), "l1_norm": sum(abs(w) for w in weights),
            "by_budget": by_budget,
        }

    # Continue the same run to 4T steps at the same learning rate (== a fresh 4T-step run with this seed).
    begin = time.perf_counter()
    train_for((long_factor - 1) * cfg.steps)
    long_train_s = time.perf_counter() - begin
    long_live = state_copy(model)
    with opt.combined(torch.eye(len(opt.store), dtype=torch.float64)[-1]):
        checks["long_last_snapshot_vs_live"] = max_diff(model.state_dict(), long_live)
    (va, vl), (ta, tl) = scores(model, val), scores(model, test)
    methods["long_last"] = {"val_acc": va, "val_nll": vl, "test_acc": ta, "test_nll": tl}
    methods["long_uniform"] = measure(uniform_weights(len(opt.store)))
    if max(checks.values()) > 1e-5:
        raise AssertionError(f"{cfg.dataset} seed {seed}: library check failed: {checks}")
    total = time.perf_counter() - start
    print(
        f"  {cfg.dataset} seed {seed}: test acc last {100 * methods['last']['test_acc']:.2f}, "
        f"EMA({best_decay}) {100 * methods['best_ema']['test_acc']:.2f}, "
        f"uniform {100 * methods['uniform']['test_acc']:.2f}, LCSC/acc {100 * methods['lcsc_acc']['test_acc']:.2f}, "
        f"LCSC/nll {100 * methods['lcsc_nll']['test_acc']:.2f}, "
        f"{long_factor}x {100 * methods['long_last']['test_acc']:.2f}"
        f" | searches {searches['acc']['seconds']:.0f}s + {searches['nll']['seconds']:.0f}s, total {total:.0f}s",
        flush=True,
    )
    return {
        "seed": seed, "snapshot_steps": steps_kept, "methods": methods, "ema_by_decay": emas,
        "best_decay": best_decay, "searches": searches, "checks_max_abs_diff": checks,
        "train_loss_last_100": statistics.fmean(losses[cfg.steps - 100 : cfg.steps]),
        "seconds": {"train_T": train_s, "train_rest": long_train_s, "total": total},
    }


LCSC_METHODS = ("last", "best_ema", "uniform", "lcsc_acc", "lcsc_nll", "long_last", "long_uniform")
LCSC_LABELS = {
    "last": "(a) last checkpoint",
    "best_ema": "(b) best EMA (decay on val)",
    "uniform": "(c) uniform average",
    "lcsc_acc": "(d) LCSC, fitness val acc",
    "lcsc_nll": "(d') LCSC, fitness val NLL",
    "long_last": "(e) 4x run, last checkpoint",
    "long_uniform": "4x run, uniform of its last 12",
}
BASELINES = ("last", "best_ema", "uniform", "long_last")


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """a - b per seed: mean, sample std, and wins / ties / losses of a."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, std = mean_std(diffs)
    return {"mean": mean, "std": std, "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs), "per_seed": diffs}


def summarise_lcsc(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"accuracy": {}, "val_accuracy": {}, "test_nll": {}, "paired": {}, "search": {}}
    for m in LCSC_METHODS:
        summary["accuracy"][m] = mean_std([r["methods"][m]["test_acc"] for r in runs])
        summary["val_accuracy"][m] = mean_std([r["methods"][m]["val_acc"] for r in runs])
        summary["test_nll"][m] = mean_std([r["methods"][m]["test_nll"] for r in runs])
    for fitness in FITNESSES:
        ours = [r["methods"][f"lcsc_{fitness}"]["test_acc"] for r in runs]
        ours_val = [r["methods"][f"lcsc_{fitness}"]["val_acc"] for r in runs]
        summary["paired"][fitness] = {
            base: {"test": paired(ours, [r["methods"][base]["test_acc"] for r in runs]),
                   "val": paired(ours_val, [r["methods"][base]["val_acc"] for r in runs])}
            for base in BASELINES
        }
        # Against the better of EMA and uniform as chosen on validation (what one would otherwise deploy).
        pick = [r["methods"]["best_ema" if r["methods"]["best_ema"]["val_acc"] > r["methods"]["uniform"]["val_acc"]
                              else "uniform"] for r in runs]
        summary["paired"][fitness]["ema_or_uniform_on_val"] = {
            "test": paired(ours, [p["test_acc"] for p in pick]), "val": paired(ours_val, [p["val_acc"] for p in pick])
        }
        s = [r["searches"][fitness] for r in runs]
        summary["search"][fitness] = {
            "evaluations": mean_std([x["evaluations"] for x in s]),
            "cache_hits": mean_std([x["cache_hits"] for x in s]),
            "seconds": mean_std([x["seconds"] for x in s]),
            "seconds_per_evaluation": mean_std([x["seconds"] / x["evaluations"] for x in s]),
            "min_coefficient": [x["min_coefficient"] for x in s],
            "max_coefficient": [x["max_coefficient"] for x in s],
            "negative_coefficients": [x["negative_coefficients"] for x in s],
            "l1_norm": [x["l1_norm"] for x in s],
            "val_gain_over_initial_recipes": [x["best_so_far"][-1] - x["best_so_far"][5] for x in s],
            "by_budget": {
                budget: {
                    split: mean_std([x["by_budget"][budget][f"{split}_acc"] for x in s]) for split in ("val", "test")
                }
                | {"evaluation_found": [x["by_budget"][budget]["evaluation"] for x in s]}
                for budget in s[0]["by_budget"]
            },
        }
    summary["train_T_seconds"] = mean_std([r["seconds"]["train_T"] for r in runs])
    summary["best_decays"] = [r["best_decay"] for r in runs]
    return summary


# ------------------------------------------------------------------------------------------ part 2: greedy soup
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
    return (x - MEAN) / STD, torch.tensor(digits.target).long()


def pretrained() -> nn.Module:
    """ccexam's MNIST CNN with its shipped weights (421,642 parameters, no BatchNorm, no dropout)."""
    import ccexam
    from ccexam.models import MNISTNet

    model: nn.Module = MNISTNet(28)
    model.load_state_dict(torch.load(Path(ccexam.__file__).parent / "weights" / "mnist.pth", map_location="cpu"))
    return model


def shift(x: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Each image translated by a random whole number of pixels in [-pixels, pixels] per axis (a roll: what leaves
    one side comes in at the other, which is background for these centred digits with their empty border)."""
    moves = torch.randint(-pixels, pixels + 1, (len(x), 2), generator=generator).tolist()
    return torch.stack([img.roll((dr, dc), dims=(1, 2)) for img, (dr, dc) in zip(x, moves, strict=True)])


def fine_tune(recipe: Recipe, train: Split, seed: int, batch_size: int = 32) -> nn.Module:
    model = pretrained()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9)
    steps = recipe.epochs * math.ceil(len(train[1]) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(train[1]), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            x = shift(train[0][idx], gen) if recipe.augment else train[0][idx]
            opt.zero_grad()
            loss = F.cross_entropy(model(x), train[1][idx], label_smoothing=recipe.label_smoothing)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            schedule.step()
    return model


def run_soup_seed(seed: int, digits: Split, recipes: Sequence[Recipe]) -> dict[str, Any]:
    """Split, k fine-tunes from the shared start, then greedy (strict / not_worse) and uniform soups."""
    start = time.perf_counter()
    order = torch.randperm(len(digits[1]), generator=torch.Generator().manual_seed(seed))
    test_idx, val_idx, train_idx = order[:N_TEST], order[N_TEST : N_TEST + N_VAL], order[N_TEST + N_VAL :]
    train, val, test = ((digits[0][i], digits[1][i]) for i in (train_idx, val_idx, test_idx))
    zero_shot = pretrained()
    store = SnapshotStore(None)
    ingredients: list[dict[str, Any]] = []
    model: nn.Module = zero_shot
    for i, recipe in enumerate(recipes):
        model = fine_tune(recipe, train, seed=1000 * seed + i)
        (va, _), (ta, _) = scores(model, val), scores(model, test)
        store.add(model.state_dict(), step=i, metrics={"val_acc": va})
        ingredients.append({"recipe": recipe.describe(), "val_acc": va, "test_acc": ta})
    fine_tune_s = time.perf_counter() - start
    combiner = Combiner(model, store)
    live = state_copy(model)

    def evaluate() -> float:
        return scores(model, val)[0]

    def measure(weights: Sequence[float] | torch.Tensor) -> dict[str, float]:
        with combiner.combined(weights):
            return {"val_acc": scores(model, val)[0], "test_acc": scores(model, test)[0]}

    k = len(recipes)
    best_val = max(range(k), key=lambda i: ingredients[i]["val_acc"])  # ties: the first
    best_test = max(range(k), key=lambda i: ingredients[i]["test_acc"])
    out: dict[str, Any] = {
        "zero_shot": {"val_acc": scores(zero_shot, val)[0], "test_acc": scores(zero_shot, test)[0]},
        "best_single_val": {**ingredients[best_val], "index": best_val},
        "best_single_test_oracle": {**ingredients[best_test], "index": best_test},
        "uniform": measure(uniform_weights(k)),
    }
    for rule in ("strict", "not_worse"):
        result = combiner.choose("greedy", evaluate, greedy_rule=rule)
        chosen = [i for i, w in enumerate(result.weights) if w > 0]
        out[f"greedy_{rule}"] = {**measure(result.weights), "ingredients": chosen,
                                 "evaluations": result.evaluations, "history": result.history}
        if out[f"greedy_{rule}"]["val_acc"] < ingredients[best_val]["val_acc"]:
            raise AssertionError(f"soup seed {seed}: greedy ({rule}) is below the best single on validation")
    checks = {"live_after_soups": max_diff(model.state_dict(), live)}
    if checks["live_after_soups"] > 1e-6:
        raise AssertionError(f"soup seed {seed}: live weights changed: {checks}")
    total = time.perf_counter() - start
    print(
        f"  soup seed {seed}: zero-shot {100 * out['zero_shot']['test_acc']:.1f}, singles test "
        f"{[round(100 * g['test_acc'], 1) for g in ingredients]}, "
        f"best-on-val {100 * ingredients[best_val]['test_acc']:.1f}"
        f", uniform {100 * out['uniform']['test_acc']:.1f}, greedy {100 * out['greedy_strict']['test_acc']:.1f} "
        f"{out['greedy_strict']['ingredients']}, not_worse {100 * out['greedy_not_worse']['test_acc']:.1f} "
        f"{out['greedy_not_worse']['ingredients']} | {total:.0f}s",
        flush=True,
    )
    return {"seed": seed, "ingredients": ingredients, **out, "checks_max_abs_diff": checks,
            "seconds": {"fine_tunes": fine_tune_s, "total": total}}


SOUP_METHODS = ("zero_shot", "best_single_val", "uniform", "greedy_strict", "greedy_not_worse",
                "best_single_test_oracle")
SOUP_LABELS = {
    "zero_shot": "pretrained start (no fine-tuning)",
    "best_single_val": "best single fine-tune (picked on val)",
    "uniform": "uniform soup (all k)",
    "greedy_strict": "greedy soup, strict",
    "greedy_not_worse": "greedy soup, not_worse",
    "best_single_test_oracle": "best single on TEST (oracle, not a method)",
}


def summarise_soup(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "accuracy": {m: mean_std([r[m]["test_acc"] for r in runs]) for m in SOUP_METHODS},
        "val_accuracy": {m: mean_std([r[m]["val_acc"] for r in runs]) for m in SOUP_METHODS},
        "paired_vs_best_single": {
            m: paired([r[m]["test_acc"] for r in runs], [r["best_single_val"]["test_acc"] for r in runs])
            for m in ("uniform", "greedy_strict", "greedy_not_worse")
        },
        "greedy_sizes": {rule: [len(r[f"greedy_{rule}"]["ingredients"]) for r in runs]
                         for rule in ("strict", "not_worse")},
        "single_test_acc_by_recipe": [mean_std([r["ingredients"][i]["test_acc"] for r in runs])
                                      for i in range(len(runs[0]["ingredients"]))],
    }
    return summary


# ------------------------------------------------------------------------------------------------------- report
def pct(pair: Sequence[float]) -> str:
    return f"{100 * pair[0]:.2f} ± {100 * pair[1]:.2f}"


def signed(entry: Mapping[str, Any]) -> str:
    return (f"{100 * entry['mean']:+.2f} ± {100 * entry['std']:.2f} "
            f"({entry['wins']}/{entry['ties']}/{entry['losses']})")


def lcsc_tables(cfg: RunConfig, summary: Mapping[str, Any], runs: Sequence[dict[str, Any]]) -> str:
    n = len(runs)
    lines = [f"### {cfg.label}: T = {cfg.steps} steps, batch {cfg.batch_size}, SGD lr {cfg.lr} momentum "
             f"{cfg.momentum}, snapshots every {cfg.every} steps, last {cfg.keep}; {n} seeds", "",
             "| combination | test acc (%) | val acc (%) | test NLL |", "|---|---|---|---|"]
    for m in LCSC_METHODS:
        nll = summary["test_nll"][m]
        lines.append(f"| {LCSC_LABELS[m]} | {pct(summary['accuracy'][m])} | {pct(summary['val_accuracy'][m])} "
                     f"| {nll[0]:.4f} ± {nll[1]:.4f} |")
    lines += ["", "Paired differences, LCSC minus baseline, in points (mean ± std over seeds; wins/ties/losses):", "",
              "| baseline | LCSC (val acc): test | LCSC (val acc): val | LCSC (val NLL): test | LCSC (val NLL): val |",
              "|---|---|---|---|---|"]
    for base in (*BASELINES, "ema_or_uniform_on_val"):
        label = "better of EMA/uniform (on val)" if base == "ema_or_uniform_on_val" else LCSC_LABELS[base]
        row = [signed(summary["paired"][f][base][split]) for f in FITNESSES for split in ("test", "val")]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    s = summary["search"]
    lines += ["", "Search cost and coefficients (per seed):", "",
              "| fitness | evaluations | cache hits | wall s / search | ms / evaluation | min w | max w "
              "| # negative | sum abs w | val gain over the initial recipes (acc: points; NLL: nats) |",
              "|---" * 10 + "|"]
    for f in FITNESSES:
        x = s[f]
        gain = x["val_gain_over_initial_recipes"]
        gain_text = ", ".join(f"{(100 if f == 'acc' else 1) * g:+.3g}" for g in gain)
        lines.append(
            f"| val {f} | {x['evaluations'][0]:.0f} | {x['cache_hits'][0]:.1f} | {x['seconds'][0]:.1f} ± "
            f"{x['seconds'][1]:.1f} | {1000 * x['seconds_per_evaluation'][0]:.1f} | "
            f"{', '.join(f'{v:.2f}' for v in x['min_coefficient'])} | "
            f"{', '.join(f'{v:.2f}' for v in x['max_coefficient'])}"
            f" | {', '.join(str(v) for v in x['negative_coefficients'])} | "
            f"{', '.join(f'{v:.2f}' for v in x['l1_norm'])} | {gain_text} |"
        )
    budgets = list(s[FITNESSES[0]]["by_budget"])
    lines += ["", "The search stopped early: accuracy (%) of its best candidate after n evaluations (n = 6: the best "
              "of the initial recipes last / uniform / EMA on val; 16: the initial population), mean ± std (the NLL "
              "search picks by val NLL, so its val accuracy need not rise):", "",
              "| fitness | split | " + " | ".join(f"n = {b}" for b in budgets) + " |",
              "|---" * (len(budgets) + 2) + "|"]
    for f in FITNESSES:
        for split in ("val", "test"):
            cells = " | ".join(pct(s[f]["by_budget"][b][split]) for b in budgets)
            lines.append(f"| val {f} | {split} | {cells} |")
    lines += ["", f"EMA decays picked on val per seed: {summary['best_decays']}; training the short run took "
              f"{summary['train_T_seconds'][0]:.1f} s per seed."]
    return "\n".join(lines)


def soup_table(summary: Mapping[str, Any], runs: Sequence[dict[str, Any]], recipes: Sequence[Recipe]) -> str:
    n = len(runs)
    lines = [f"### Greedy soup: {len(recipes)} fine-tunes of MNISTNet on digits (28x28), {n} seeds of the whole "
             "procedure", "", "| model | test acc (%) | val acc (%) | minus best single (test, pts; W/T/L) |",
             "|---|---|---|---|"]
    for m in SOUP_METHODS:
        diff = summary["paired_vs_best_single"].get(m)
        lines.append(f"| {SOUP_LABELS[m]} | {pct(summary['accuracy'][m])} | {pct(summary['val_accuracy'][m])} | "
                     f"{signed(diff) if diff else ''} |")
    lines += ["", "| recipe | test acc (%) of the single fine-tune |", "|---|---|"]
    for recipe, acc in zip(recipes, summary["single_test_acc_by_recipe"], strict=True):
        lines.append(f"| {recipe.describe()}, {recipe.epochs} epochs | {pct(acc)} |")
    lines += ["", f"Greedy soup sizes per seed: strict {summary['greedy_sizes']['strict']}, not_worse "
              f"{summary['greedy_sizes']['not_worse']}; ingredients (recipe indices): "
              f"{[r['greedy_strict']['ingredients'] for r in runs]} / "
              f"{[r['greedy_not_worse']['ingredients'] for r in runs]}"]
    return "\n".join(lines)


def plot(lcsc: Mapping[str, Any], soup: Mapping[str, Any] | None, path: Path) -> None:
    """Row 1: best-so-far validation fitness per seed (val-acc searches) and test accuracy per method; row 2: the
    found coefficients per snapshot, and the greedy-soup comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    cmap = plt.get_cmap("tab10")
    for col, cfg in enumerate(RUNS):
        runs = lcsc[cfg.dataset]["runs"]
        ax = axes[0, col]
        for j, run in enumerate(runs):
            curve = np.array(run["searches"]["acc"]["best_so_far"]) * 100
            ax.plot(np.arange(1, len(curve) + 1), curve, color=cmap(j % 10), label=f"seed {run['seed']}")
            ax.scatter(np.arange(1, len(curve) + 1), np.array(run["searches"]["acc"]["fitness_per_evaluation"]) * 100,
                       s=2, color=cmap(j % 10), alpha=0.25)
            for m, marker in (("last", "v"), ("uniform", "s")):
                ax.plot([0], [100 * run["methods"][m]["val_acc"]], marker, color=cmap(j % 10), markersize=5)
        best = [100 * min(r["methods"]["best_ema"]["val_acc"], r["methods"]["uniform"]["val_acc"]) for r in runs]
        top = [100 * r["searches"]["acc"]["best_so_far"][-1] for r in runs]
        ax.set_ylim(min(best) - 1.0, max(top) + 0.5)
        ax.axvline(16.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set(xlabel="fitness evaluation (first 16: initial population)", ylabel="validation accuracy (%)",
               title=f"{cfg.label}: LCSC search, best so far\n(dots: each candidate; at x=0: v last, s uniform)")
        ax.legend(fontsize=7, ncol=2)
        ax = axes[1, col]
        steps = np.array(runs[0]["snapshot_steps"])
        for j, run in enumerate(runs):
            ax.plot(steps, run["methods"]["lcsc_acc"]["weights"], "o-", color=cmap(j % 10), markersize=3,
                    label=f"LCSC seed {run['seed']}")
            ax.plot(steps, run["methods"]["lcsc_nll"]["weights"], "x:", color=cmap(j % 10), markersize=4,
                    linewidth=0.8)
        ax.plot(steps, uniform_weights(len(steps)).numpy(), "k--", label="uniform")
        decays = sorted(set(lcsc[cfg.dataset]["summary"]["best_decays"]))
        for decay in decays:
            ax.plot(steps, ema_weights(len(steps), decay).numpy(), color="grey", linewidth=1.5,
                    label=f"EMA {decay} (picked on val)")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set(xlabel="snapshot step", ylabel="coefficient",
               title=f"{cfg.label}: found coefficients\n(o- fitness val acc, x: fitness val NLL)")
        ax.legend(fontsize=7, ncol=2)
    ax = axes[0, 2]
    width = 0.13
    shown = LCSC_METHODS[1:]
    for col, cfg in enumerate(RUNS):
        runs = lcsc[cfg.dataset]["runs"]
        for j, m in enumerate(shown):
            diffs = [100 * (r["methods"][m]["test_acc"] - r["methods"]["last"]["test_acc"]) for r in runs]
            mean, std = mean_std(diffs)
            x = col + (j - (len(shown) - 1) / 2) * width
            ax.bar(x, mean, width, yerr=std, color=cmap(j + 1), capsize=2, label=LCSC_LABELS[m] if col == 0 else None)
            ax.plot([x] * len(diffs), diffs, ".", color="black", markersize=3, alpha=0.6)
    ax.set_xticks(range(len(RUNS)), [cfg.dataset for cfg in RUNS])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set(ylabel="test accuracy minus the last checkpoint's (points)",
           title="Test accuracy minus the last checkpoint's, per seed\n(bar: mean ± std of the paired difference; "
                 "dots: seeds)")
    ax.legend(fontsize=7)
    ax = axes[1, 2]
    if soup is not None:
        summary = soup["summary"]
        names = list(SOUP_METHODS)
        means = [100 * summary["accuracy"][m][0] for m in names]
        stds = [100 * summary["accuracy"][m][1] for m in names]
        colors = ["lightgrey", "tab:blue", "tab:orange", "tab:green", "tab:olive", "white"]
        ax.bar(range(len(names)), means, yerr=stds, color=colors, edgecolor="black", capsize=3)
        for run in soup["runs"]:
            ax.plot(range(len(names)), [100 * run[m]["test_acc"] for m in names], ".", color="black", alpha=0.5)
        short = [f"pretrained\n({means[0]:.1f}%)", "best single\n(picked on val)", "uniform soup\n(all k)",
                 "greedy soup\nstrict", "greedy soup\nnot_worse", "best single\non TEST (oracle)"]
        ax.set_xticks(range(len(names)), short, fontsize=7)
        low = min(100 * min(r[m]["test_acc"] for r in soup["runs"]) for m in names[1:])
        ax.set_ylim(low - 1.5, 100)
        ax.set(ylabel="test accuracy (%)",
               title=f"Greedy soup: {len(soup['recipes'])} fine-tunes of a pretrained MNIST CNN on digits\n"
                     f"(test accuracy, mean ± std over {len(soup['runs'])} seeds; dots: seeds)")
    fig.suptitle("Checkpoint combination: selection on the validation split, numbers on the test split")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- main
def main() -> None:
    repo = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 of each LCSC run and of the soup procedure")
    parser.add_argument("--soup-seeds", type=int, default=None, help="seeds of the soup procedure (default: --seeds)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 seeds, a 16 + 2 x 12 search, 2 one-epoch fine-tunes, 2k F-MNIST images")
    parser.add_argument("--skip-soup", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=repo / "docs" / "figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = SearchSettings()
    recipes: Sequence[Recipe] = RECIPES
    seeds = args.seeds
    if args.quick:
        seeds = min(seeds, 2)
        settings = replace(settings, generations=2)
        recipes = [replace(r, epochs=1) for r in RECIPES[:2]]
    soup_seeds = seeds if args.soup_seeds is None else args.soup_seeds
    if args.quick:
        soup_seeds = min(soup_seeds, 2)
    start = time.perf_counter()
    cpu_start = time.process_time()

    lcsc: dict[str, Any] = {}
    texts: list[str] = []
    for cfg in RUNS:
        train, val, test = load_dataset(cfg.dataset)
        if args.quick and cfg.dataset == "fashion_mnist":
            val, test = (val[0][:2000], val[1][:2000]), (test[0][:2000], test[1][:2000])
        print(f"{cfg.label}: train {len(train[1])}, val {len(val[1])}, test {len(test[1])}", flush=True)
        runs = [run_lcsc_seed(cfg, (train, val, test), seed, settings, LONGER) for seed in range(seeds)]
        summary = summarise_lcsc(runs)
        lcsc[cfg.dataset] = {"config": asdict(cfg), "sizes": [len(s[1]) for s in (train, val, test)],
                             "summary": summary, "runs": runs}
        texts.append(lcsc_tables(cfg, summary, runs))

    soup: dict[str, Any] | None = None
    if not args.skip_soup:
        digits = digits28()
        print(f"greedy soup: {len(recipes)} recipes, {soup_seeds} seeds", flush=True)
        soup_runs = [run_soup_seed(seed, digits, recipes) for seed in range(soup_seeds)]
        soup_summary = summarise_soup(soup_runs)
        soup = {"recipes": [asdict(r) | {"label": r.describe()} for r in recipes], "split": [997, N_VAL, N_TEST],
                "summary": soup_summary, "runs": soup_runs}
        texts.append(soup_table(soup_summary, soup_runs, recipes))

    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print()
    print("\n\n".join(texts))
    print(f"\nwall time {wall:.0f}s, process CPU time {cpu:.0f}s")
    stem = "lcsc_combination_quick" if args.quick else "lcsc_combination"
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "description": "LCSC vs last / best EMA / uniform / 4x run over one noisy SGD run's last 12 snapshots; "
                       "greedy soup of fine-tunes from a shared pretrained start. Chosen on val, reported on test.",
        "command": f"python docs/experiments/lcsc_combination.py --seeds {args.seeds}"
                   + (f" --soup-seeds {args.soup_seeds}" if args.soup_seeds is not None else "")
                   + (" --quick" if args.quick else ""),
        "search_settings": asdict(settings), "longer_factor": LONGER, "fitnesses": list(FITNESSES),
        "lcsc": lcsc, "soup": soup, "labels": {"lcsc": LCSC_LABELS, "soup": SOUP_LABELS},
        "wall_seconds": wall, "process_cpu_seconds": cpu, "threads": args.threads,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "tables_markdown": "\n\n".join(texts),
    }
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    plot(lcsc, soup, args.out / f"{stem}.png")
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")


if __name__ == "__main__":
    main()
