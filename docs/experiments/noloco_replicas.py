"""Data-parallel replicas on label-skewed shards: NoLoCo against DiLoCo, per-step gradient all-reduce and no
communication, on real processes (gloo over loopback, one CPU thread per rank).

    apt-get install -y dataset-fashion-mnist    # Fashion-MNIST IDX files in /usr/share/datasets/fashion-mnist
    pip install -e ".[docs]"                    # weightavg itself, matplotlib
    python docs/experiments/noloco_replicas.py            # W = 4, 3 seeds, settings none + exp: 16 min wall here
                                                          # (2 cores shared with other jobs; 7 min per seed at load 8)
    python docs/experiments/noloco_replicas.py --world 8 --scenarios exp --merge   # + W = 8, setting exp only, into
                                                          # the same JSON/PNG: 8.5 min (docs/figures holds both)
    python docs/experiments/noloco_replicas.py --quick    # 1 seed, 200 steps, 8k images: a ~2 min smoke test
    python docs/experiments/noloco_replicas.py --replot   # redraw figure and tables from the saved JSON

What runs. W processes (``torch.multiprocessing`` with fork; MASTER_ADDR=127.0.0.1, a free port, GLOO_SOCKET_IFNAME=lo,
``torch.set_num_threads(1)`` in each) form one gloo process group. Per seed, 24k Fashion-MNIST training images (a
seeded subset of the 50k training split) are dealt to the W ranks with label skew: for every class, its images are
split over the ranks in Dirichlet(0.5) proportions (Hsu et al. 2019); the per-rank class histograms are in the JSON.
Every rank trains the same MLP 784-256-10 (seeded init, identical on all ranks) with the same inner optimizer,
AdamW(lr 1e-3, betas (0.9, 0.95), weight decay 0.1: DiLoCo's inner settings), batch 32, for the same number of inner
steps (1,000: cut from 1,500 to fit the time budget on this loaded machine), on its own shard only. Methods:

- ``ddp``: the gradients are averaged over the ranks at every step (one flat async ``all_reduce`` and a timed
  ``wait()``; what DistributedDataParallel computes, without its overlap of communication with backward);
- ``diloco50`` / ``diloco100``: ``weightavg.optim.DiLoCo(AdamW, sync_every=H)``: all-reduce of the pseudo-gradient
  every H steps, outer Nesterov SGD (lr 0.7, momentum 0.9: the paper's defaults; H is the only change);
- ``noloco50`` / ``noloco100``: ``weightavg.optim.NoLoCo(AdamW, sync_every=H)``: every H steps each rank averages with
  ONE random peer by point-to-point ``isend``/``irecv`` through the momentum outer step (lr 0.7, momentum 0.5, pairs);
- ``local``: no communication at all (each rank alone on its skewed shard).

Measured. Every 25 steps (setting ``none`` only): validation loss and accuracy (2,000 fixed images of the validation
split) of (a) each replica's own weights, averaged over ranks ("mean replica"), and (b) the average of the replicas'
weights ("averaged model"), plus the replicas' spread sqrt(mean_i ||theta_i - theta_bar||^2) / ||theta_bar||. The
evaluation's own communication (an all-reduce of the weights, a gather, a barrier) is not counted in any traffic and
its time is excluded from waiting and wall times. After training: test accuracy (the 10k test split) of the averaged
model and of each replica. Per rank: bytes sent (``opt.traffic`` for DiLoCo / NoLoCo; for ``ddp`` the same ring
all-reduce estimate DiLoCo's counter uses, 2 (W-1)/W x the gradient bytes per step), seconds spent waiting in
communication (``opt.traffic.wait_seconds``; for ``ddp`` the timed wait), and the wall time of the training loop.

Timing settings per seed and method, with identical data, init and order (so identical weights: the training math
does not depend on timing, which the script checks):

- ``none``: no added delay (the only jitter is the OS scheduling 4+ processes on a shared 2-core machine, which is
  not small: a rank that is descheduled holds up whoever waits for it);
- ``exp``: after each backward each rank sleeps an Exponential(mean 5 ms) time, drawn per rank and per step (the same
  draws for every method): compute time with random per-step jitter;
- ``straggler`` (only with ``--scenarios``): every rank sleeps 3 ms per step, and in each window of 30 steps one rank
  drawn at random (the same on all ranks) is 2x slower (6 ms).

Wall times compare methods within one setting only: on an oversubscribed CPU a sleeping rank frees a core for the
others, so the settings' absolute times do not compare. Nothing is tuned: every setting is fixed above, and the test
split is only read at the end.

Writes ``<out>/noloco_replicas.json`` (settings, shards' class histograms, every curve per seed and rank, checks)
and ``<out>/noloco_replicas.png``, and prints the markdown tables. ``--quick`` writes ``noloco_replicas_quick.*``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from weightavg.optim import DiLoCo, NoLoCo
from weightavg.train import load_dataset

Split = tuple[torch.Tensor, torch.Tensor]
MB = 1e6


# -------------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Method:
    """One data-parallel method: ``kind`` in ddp / diloco / noloco / local; ``sync_every`` = H (1 for ddp)."""

    key: str
    label: str
    kind: str
    sync_every: int


METHODS = (
    Method("ddp", "DDP (grad all-reduce every step)", "ddp", 1),
    Method("diloco50", "DiLoCo H=50", "diloco", 50),
    Method("diloco100", "DiLoCo H=100", "diloco", 100),
    Method("noloco50", "NoLoCo H=50", "noloco", 50),
    Method("noloco100", "NoLoCo H=100", "noloco", 100),
    Method("local", "local only (no communication)", "local", 0),
)
SCENARIOS = ("none", "exp", "straggler")  # the default run: the first two (--scenarios to add straggler)
DEFAULT_SCENARIOS = ("none", "exp")


@dataclass(frozen=True)
class Settings:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    hidden: int = 256
    train_images: int = 24000  # seeded subset of the 50k training split, dealt to the ranks
    alpha: float = 0.5  # Dirichlet concentration of each class's split over the ranks
    eval_every: int = 25
    val_images: int = 2000  # the first 2k of the validation split (fixed)
    jitter_ms: float = 5.0  # scenario exp: Exponential(mean) sleep per rank per step
    straggler_ms: float = 3.0  # scenario straggler: base sleep per step; the slow rank sleeps 2x
    straggler_window: int = 30  # steps between redraws of the slow rank
    diloco_outer_lr: float = 0.7
    diloco_momentum: float = 0.9
    noloco_outer_lr: float = 0.7
    noloco_momentum: float = 0.5


# -------------------------------------------------------------------------------------------------------- helpers
def mlp(features: int, hidden: int, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


@torch.no_grad()
def scores(model: nn.Module, split: Split, batch: int = 5000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model``."""
    x, y = split
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        logits = model(x[i : i + batch])
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
        loss += float(F.cross_entropy(logits.double(), y[i : i + batch], reduction="sum"))
    return correct / len(y), loss / len(y)


class Batches:
    """Minibatch indices from reshuffled epochs of one shard."""

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


def skewed_shards(labels: torch.Tensor, world: int, images: int, alpha: float, seed: int,
                  min_size: int) -> list[np.ndarray]:
    """Indices into the training split for each rank: a seeded subset of ``images``, each class split over the ranks
    in Dirichlet(alpha) proportions; redrawn (same seed stream) until every shard has at least ``min_size``."""
    rng = np.random.default_rng([seed, world, 7])
    subset = rng.permutation(len(labels))[:images]
    sub_labels = labels.numpy()[subset]
    while True:
        shards: list[list[int]] = [[] for _ in range(world)]
        for c in range(10):
            idx = subset[sub_labels == c].copy()
            rng.shuffle(idx)
            cuts = (np.cumsum(rng.dirichlet([alpha] * world)) * len(idx)).astype(int)[:-1]
            for r, part in enumerate(np.split(idx, cuts)):
                shards[r].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shards]


def histograms(labels: torch.Tensor, shards: Sequence[np.ndarray]) -> list[list[int]]:
    return [np.bincount(labels.numpy()[s], minlength=10).tolist() for s in shards]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------- one rank's run
_DATA: dict[str, Split] = {}  # set by the parent before forking the ranks (shared copy-on-write)


class Sleeper:
    """The per-step extra "compute" time of one rank in one scenario (the same draws for every method)."""

    def __init__(self, scenario: str, cfg: Settings, seed: int, rank: int, world: int) -> None:
        self.scenario, self.cfg, self.rank = scenario, cfg, rank
        self.rng = np.random.default_rng([seed, rank, 11])
        windows = cfg.steps // cfg.straggler_window + 1
        self.slow = np.random.default_rng([seed, 13]).integers(0, world, size=windows)  # same on every rank
        self.total = 0.0

    def __call__(self, step: int) -> None:
        if self.scenario == "none":
            return
        if self.scenario == "exp":
            seconds = float(self.rng.exponential(self.cfg.jitter_ms)) / 1000
        else:
            slow = int(self.slow[(step - 1) // self.cfg.straggler_window]) == self.rank
            seconds = self.cfg.straggler_ms * (2.0 if slow else 1.0) / 1000
        self.total += seconds
        time.sleep(seconds)


class Evaluator:
    """Evaluation points: each replica's own scores, the averaged model's (rank 0), the replicas' spread. Collective
    (every rank calls it); its time is returned so that the caller excludes it."""

    def __init__(self, cfg: Settings, rank: int, world: int, features: int) -> None:
        self.rank, self.world = rank, world
        self.avg_model = mlp(features, cfg.hidden)

    @torch.no_grad()
    def average(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(this replica's flat weights, the mean over ranks, this replica's squared distance to the mean)."""
        mine = parameters_to_vector(model.parameters()).detach().clone()
        mean = mine.clone()
        dist.all_reduce(mean)
        mean /= self.world
        return mine, mean, float((mine.double() - mean.double()).pow(2).sum())

    def gather(self, values: Sequence[float]) -> list[list[float]]:
        mine = torch.tensor(list(values), dtype=torch.float64)
        out = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine)
        return [o.tolist() for o in out]

    @torch.no_grad()
    def point(self, model: nn.Module, split: Split, extra: Sequence[float] = ()) -> dict[str, Any]:
        acc, loss = scores(model, split)
        _, mean, sq = self.average(model)
        per_rank = self.gather([acc, loss, sq, *extra])
        record: dict[str, Any] = {}
        if self.rank == 0:
            vector_to_parameters(mean, self.avg_model.parameters())
            avg_acc, avg_loss = scores(self.avg_model, split)
            norm = float(mean.double().norm())
            record = {
                "avg_acc": avg_acc, "avg_loss": avg_loss,
                "replica_acc": [r[0] for r in per_rank], "replica_loss": [r[1] for r in per_rank],
                "spread": math.sqrt(statistics.fmean(r[2] for r in per_rank)) / norm,
                "extra": [r[3:] for r in per_rank],
            }
        dist.barrier()
        return record


def train_run(method: Method, scenario: str, seed: int, cfg: Settings, rank: int, world: int,
              shards: Sequence[np.ndarray]) -> tuple[dict[str, Any], torch.Tensor]:
    """One method, one timing scenario, one seed, on this rank. Returns (rank 0's record, the averaged weights)."""
    train, val, test = _DATA["train"], _DATA["val"], _DATA["test"]
    x_shard, y_shard = train[0][shards[rank]], train[1][shards[rank]]
    torch.manual_seed(seed)
    model = mlp(x_shard.shape[1], cfg.hidden)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    inner = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt: torch.optim.Optimizer
    if method.kind == "diloco":
        opt = DiLoCo(inner, sync_every=method.sync_every, outer_lr=cfg.diloco_outer_lr,
                     outer_momentum=cfg.diloco_momentum, nesterov=True)
    elif method.kind == "noloco":
        opt = NoLoCo(inner, sync_every=method.sync_every, outer_lr=cfg.noloco_outer_lr,
                     outer_momentum=cfg.noloco_momentum, group_size=2, seed=seed)
    else:
        opt = inner
    batches = Batches(len(y_shard), cfg.batch_size, torch.Generator().manual_seed(1000 * seed + rank))
    sleeper = Sleeper(scenario, cfg, seed, rank, world)
    evaluator = Evaluator(cfg, rank, world, x_shard.shape[1])
    evaluate = scenario == "none"
    ddp_wait, ddp_bytes, ddp_syncs = 0.0, 0, 0
    eval_seconds, window_loss, window_count = 0.0, 0.0, 0
    curve: list[dict[str, Any]] = []

    def traffic() -> tuple[int, float, int]:
        if isinstance(opt, NoLoCo | DiLoCo):
            t = opt.traffic
            return t.bytes_sent, t.wait_seconds, t.syncs
        return ddp_bytes, ddp_wait, ddp_syncs

    def eval_point(step: int) -> None:
        nonlocal eval_seconds, window_loss, window_count
        begin = time.perf_counter()
        sent, waited, syncs = traffic()
        train_loss = window_loss / window_count if window_count else float("nan")
        record = evaluator.point(model, val, (train_loss, sent, waited))
        if rank == 0:
            curve.append({"step": step, "syncs": syncs, **record})
        window_loss, window_count = 0.0, 0
        eval_seconds += time.perf_counter() - begin

    dist.barrier()
    start = time.perf_counter()
    if evaluate:
        eval_point(0)
    for step in range(1, cfg.steps + 1):
        idx = batches.next()
        loss = F.cross_entropy(model(x_shard[idx]), y_shard[idx])
        loss.backward()  # type: ignore[no-untyped-call]
        sleeper(step)
        if method.kind == "ddp":
            grads = [p.grad for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
            work = dist.all_reduce(flat, async_op=True)
            begin = time.perf_counter()
            work.wait()  # type: ignore[union-attr]
            ddp_wait += time.perf_counter() - begin
            ddp_bytes += 2 * (world - 1) * flat.numel() * flat.element_size() // world
            ddp_syncs += 1
            flat /= world
            offset = 0
            for g in grads:
                if g is not None:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
        opt.step()
        opt.zero_grad()
        window_loss += float(loss.detach())
        window_count += 1
        if evaluate and step % cfg.eval_every == 0:
            eval_point(step)
    duration = time.perf_counter() - start
    dist.barrier()

    # After training (not timed): the final replicas and their average on the test split.
    sent, waited, syncs = traffic()
    test_acc, test_loss = scores(model, test)
    val_acc, val_loss = scores(model, val)
    _, mean, sq = evaluator.average(model)
    per_rank = evaluator.gather([test_acc, test_loss, val_acc, val_loss, sq, sent, waited, syncs, duration,
                                 duration - eval_seconds, sleeper.total, float(len(y_shard))])
    record: dict[str, Any] = {}
    if rank == 0:
        vector_to_parameters(mean, evaluator.avg_model.parameters())
        avg_test_acc, avg_test_loss = scores(evaluator.avg_model, test)
        avg_val_acc, avg_val_loss = scores(evaluator.avg_model, val)
        column = {name: [r[i] for r in per_rank] for i, name in enumerate(
            ("test_acc", "test_loss", "val_acc", "val_loss", "sq_dist", "bytes_sent", "wait_seconds", "syncs",
             "duration_seconds", "train_seconds", "sleep_seconds", "shard_size"))}
        record = {
            "method": method.key, "scenario": scenario, "seed": seed, "world": world, "parameters": numel,
            "avg_model": {"test_acc": avg_test_acc, "test_loss": avg_test_loss, "val_acc": avg_val_acc,
                          "val_loss": avg_val_loss},
            "mean_replica": {k: statistics.fmean(column[k]) for k in ("test_acc", "test_loss", "val_acc", "val_loss")},
            "per_rank": column,
            "final_spread": math.sqrt(statistics.fmean(column["sq_dist"])) / float(mean.double().norm()),
            "wall_seconds": max(column["train_seconds"]),  # the last rank to finish (evaluation time excluded)
            "curve": curve,
        }
    dist.barrier()
    return record, mean


def worker(rank: int, world: int, port: int, cfg: Settings, seeds: Sequence[int], methods: Sequence[Method],
           scenarios: Sequence[str], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo"})
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=30))
    labels = _DATA["train"][1]
    runs: list[dict[str, Any]] = []
    shard_info: dict[str, Any] = {}
    finals: dict[tuple[str, int], torch.Tensor] = {}
    checks: list[dict[str, Any]] = []
    for seed in seeds:
        shards = skewed_shards(labels, world, cfg.train_images, cfg.alpha, seed, 4 * cfg.batch_size)
        shard_info[str(seed)] = {"sizes": [len(s) for s in shards], "class_histograms": histograms(labels, shards)}
        for scenario in scenarios:
            for method in methods:
                begin = time.perf_counter()
                record, mean = train_run(method, scenario, seed, cfg, rank, world, shards)
                if rank != 0:
                    continue
                key = (method.key, seed)
                if scenario == scenarios[0]:
                    finals[key] = mean
                else:  # the timing must not change the training math
                    diff = float((mean - finals[key]).abs().max())
                    checks.append({"check": "same weights as without delays", "method": method.key, "seed": seed,
                                   "scenario": scenario, "max_abs_diff": diff})
                runs.append(record)
                wait = statistics.fmean(record["per_rank"]["wait_seconds"])
                print(f"  W={world} seed {seed} {scenario:9s} {method.key:9s}: test acc averaged "
                      f"{100 * record['avg_model']['test_acc']:.2f}, mean replica "
                      f"{100 * record['mean_replica']['test_acc']:.2f}, spread {record['final_spread']:.4f}, "
                      f"wait {wait:.2f}s/rank, wall {record['wall_seconds']:.1f}s "
                      f"(run {time.perf_counter() - begin:.0f}s)", flush=True)
    if rank == 0:
        Path(out).write_text(json.dumps({"runs": runs, "shards": shard_info, "checks": checks}))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, cfg: Settings, seeds: Sequence[int], methods: Sequence[Method],
              scenarios: Sequence[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / f"world{world}.json")
        mp.start_processes(  # type: ignore[attr-defined,no-untyped-call]
            worker, args=(world, free_port(), cfg, seeds, methods, scenarios, out), nprocs=world, join=True,
            start_method="fork")
        return dict(json.loads(Path(out).read_text()))


# ------------------------------------------------------------------------------------------------------ summaries
def runs_of(result: dict[str, Any], method: str, scenario: str) -> list[dict[str, Any]]:
    return sorted((r for r in result["runs"] if r["method"] == method and r["scenario"] == scenario),
                  key=lambda r: r["seed"])


def summarise(result: dict[str, Any], methods: Sequence[Method]) -> dict[str, Any]:
    """Per method: accuracies from the first timing setting (all settings train identical weights), bytes, syncs, and
    waiting and wall times per setting."""
    scenarios = result["scenarios"]
    summary: dict[str, Any] = {}
    for m in methods:
        base = runs_of(result, m.key, scenarios[0])
        s: dict[str, Any] = {
            "avg_test_acc": mean_std([r["avg_model"]["test_acc"] for r in base]),
            "replica_test_acc": mean_std([r["mean_replica"]["test_acc"] for r in base]),
            "avg_val_loss": mean_std([r["avg_model"]["val_loss"] for r in base]),
            "replica_val_loss": mean_std([r["mean_replica"]["val_loss"] for r in base]),
            "final_spread": mean_std([r["final_spread"] for r in base]),
            "mb_sent_per_rank": statistics.fmean(b for r in base for b in r["per_rank"]["bytes_sent"]) / MB,
            "syncs": statistics.fmean(x for r in base for x in r["per_rank"]["syncs"]),
            "per_seed": {str(r["seed"]): {"avg_test_acc": r["avg_model"]["test_acc"],
                                         "replica_test_acc": r["mean_replica"]["test_acc"],
                                         "replica_test_acc_per_rank": r["per_rank"]["test_acc"]} for r in base},
            "wait_seconds_per_rank": {}, "wall_seconds": {},
        }
        for scenario in scenarios:
            rs = runs_of(result, m.key, scenario)
            s["wait_seconds_per_rank"][scenario] = mean_std([statistics.fmean(r["per_rank"]["wait_seconds"])
                                                             for r in rs])
            s["wall_seconds"][scenario] = mean_std([r["wall_seconds"] for r in rs])
        summary[m.key] = s
    return summary


def pct(ms: Sequence[float]) -> str:
    return f"{100 * ms[0]:.2f} ± {100 * ms[1]:.2f}"


def tables(world: int, summary: dict[str, Any], result: dict[str, Any], methods: Sequence[Method],
           cfg: Settings) -> str:
    scenarios = result["scenarios"]
    seeds = sorted({r["seed"] for r in result["runs"]})
    lines = [f"### W = {world} ranks, {len(seeds)} seeds, {cfg.steps} inner steps per rank (batch {cfg.batch_size})",
             "", "| method | test acc, averaged model (%) | test acc, mean replica (%) | final spread | MB sent / rank "
             "| syncs | " + " | ".join(f"wait s/rank ({sc})" for sc in scenarios) + " | "
             + " | ".join(f"wall s ({sc})" for sc in scenarios) + " |", "|---" * (6 + 2 * len(scenarios)) + "|"]
    for m in methods:
        s = summary[m.key]
        waits = " | ".join(f"{s['wait_seconds_per_rank'][sc][0]:.2f} ± {s['wait_seconds_per_rank'][sc][1]:.2f}"
                           for sc in scenarios)
        walls = " | ".join(f"{s['wall_seconds'][sc][0]:.1f} ± {s['wall_seconds'][sc][1]:.1f}" for sc in scenarios)
        lines.append(f"| {m.label} | {pct(s['avg_test_acc'])} | {pct(s['replica_test_acc'])} | "
                     f"{s['final_spread'][0]:.4f} | {s['mb_sent_per_rank']:.1f} | {s['syncs']:.0f} | {waits} | "
                     f"{walls} |")
    lines += ["", "Per seed, test accuracy (%) averaged model / mean replica:", "",
              "| method | " + " | ".join(f"seed {sd}" for sd in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for m in methods:
        per = summary[m.key]["per_seed"]
        lines.append(f"| {m.label} | " + " | ".join(
            f"{100 * per[str(sd)]['avg_test_acc']:.2f} / {100 * per[str(sd)]['replica_test_acc']:.2f}"
            for sd in seeds) + " |")
    lines += ["", "Paired differences over seeds (test accuracy points, averaged model; mean ± std, wins/losses):", "",
              "| method | minus DiLoCo H=50 | minus NoLoCo H=50 | minus DDP |", "|---|---|---|---|"]
    for m in methods:
        cells = []
        for other in ("diloco50", "noloco50", "ddp"):
            if other == m.key or other not in summary:
                cells.append("")
                continue
            a, b = summary[m.key]["per_seed"], summary[other]["per_seed"]
            diffs = [100 * (a[str(sd)]["avg_test_acc"] - b[str(sd)]["avg_test_acc"]) for sd in seeds]
            mean, std = mean_std(diffs)
            cells.append(f"{mean:+.2f} ± {std:.2f} ({sum(d > 0 for d in diffs)}/{sum(d < 0 for d in diffs)})")
        lines.append(f"| {m.label} | " + " | ".join(cells) + " |")
    sizes = result["shards"][str(seeds[0])]
    lines += ["", f"Shards of seed {seeds[0]} (images per class 0..9, per rank):", ""]
    lines += [f"- rank {r}: {sizes['sizes'][r]} images, {h}" for r, h in enumerate(sizes["class_histograms"])]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ plot
def mean_curve(runs: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([p["step"] for p in runs[0]["curve"]])
    if key == "replica_loss":
        values = np.array([[statistics.fmean(p["replica_loss"]) for p in r["curve"]] for r in runs])
    else:
        values = np.array([[p[key] for p in r["curve"]] for r in runs])
    return steps, values.mean(0)


def curve_panels(row_axes: Any, result: dict[str, Any], world: int, seeds: int, methods: Sequence[Method],
                 colors: dict[str, Any]) -> None:
    """Setting none's curves: validation loss vs step, vs MB sent, and the replicas' spread."""
    for m in methods:
        rs = runs_of(result, m.key, "none")
        steps, avg = mean_curve(rs, "avg_loss")
        _, rep = mean_curve(rs, "replica_loss")
        row_axes[0].plot(steps, avg, "-", color=colors[m.key], label=m.label)
        row_axes[0].plot(steps, rep, "--", color=colors[m.key], linewidth=1, alpha=0.6)
    ax = row_axes[0]
    ax.set_yscale("log")
    ax.set(xlabel="inner step (per rank)", ylabel="validation loss (2k images)",
           title=f"W={world}: validation loss, mean of {seeds} seeds\n(solid: averaged model; dashed: mean "
                 "replica)")
    ax.legend(fontsize=8)
    ax = row_axes[1]
    for m in methods:
        rs = runs_of(result, m.key, "none")
        steps, avg = mean_curve(rs, "avg_loss")
        sent = np.array([statistics.fmean(e[1] for e in p["extra"]) for p in rs[0]["curve"]]) / MB
        if m.kind == "local":
            ax.axhline(avg[-1], color=colors[m.key], linestyle=":", label=f"{m.label} (0 bytes), final")
            continue
        # Points right after a sync only (between syncs the bytes stay put while the loss moves).
        keep = (sent > 0) & (steps % m.sync_every == 0)
        ax.plot(sent[keep], avg[keep], ".-", color=colors[m.key], label=m.label, markersize=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="MB sent per rank so far (log)", ylabel="validation loss, averaged model",
           title=f"W={world}: val loss (averaged model) vs MB sent per rank,\nat sync points; DDP/DiLoCo: ring "
                 "estimate 2(W-1)/W x buffer; NoLoCo: 1x params/sync")
    ax.legend(fontsize=8)
    ax = row_axes[2]
    for m in methods:
        rs = runs_of(result, m.key, "none")
        steps, spread = mean_curve(rs, "spread")
        keep = spread > 0
        ax.plot(steps[keep], spread[keep], "-", color=colors[m.key], label=m.label)
    ax.set_yscale("log")
    ax.set(xlabel="inner step", ylabel="sqrt(mean_i ||theta_i - mean||^2) / ||mean||",
           title=f"W={world}: replicas' spread, mean of seeds\n(DDP: 0; DiLoCo: 0 right after a sync, not drawn)")
    ax.legend(fontsize=8)


def plot(results: dict[int, dict[str, Any]], summaries: dict[int, dict[str, Any]], methods: Sequence[Method],
         path: Path) -> None:
    """Per world: the setting-none curves (when run), then waiting per rank, wall time and test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(w, kind) for w in sorted(results)
            for kind in (("curves",) if "none" in results[w]["scenarios"] else ()) + ("bars",)]
    plt.rcParams.update({"axes.titlesize": 9})
    fig, axes = plt.subplots(len(rows), 3, figsize=(18, 5.2 * len(rows)), squeeze=False)
    colors = {m.key: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
    for row, (world, kind) in enumerate(rows):
        result, summary = results[world], summaries[world]
        scenarios = result["scenarios"]
        seeds = len({r["seed"] for r in result["runs"]})
        if kind == "curves":
            curve_panels(axes[row], result, world, seeds, methods, colors)
            continue
        width = 0.8 / len(scenarios)
        hatches = ("", "//", "..")
        for col, (key, title) in enumerate((("wait", "seconds waiting in communication per rank (log)"),
                                            ("wall", "training wall time (last rank to finish)"))):
            ax = axes[row, col]
            for j, scenario in enumerate(scenarios):
                for i, m in enumerate(methods):
                    rs = runs_of(result, m.key, scenario)
                    x = i + (j - (len(scenarios) - 1) / 2) * width
                    if key == "wait":
                        dots = [w for r in rs for w in r["per_rank"]["wait_seconds"]]
                    else:
                        dots = [r["wall_seconds"] for r in rs]
                    height = statistics.fmean(dots)
                    if key == "wait" and height == 0:  # local only: nothing to wait for (log axis)
                        ax.text(x, 0.1, "0", ha="center", va="bottom", fontsize=7)
                        continue
                    ax.bar(x, height, width, color=colors[m.key], hatch=hatches[j % 3],
                           edgecolor="black", alpha=0.8, label=scenario if i == 0 else None)
                    ax.text(x, height, f"{height:.2f}" if key == "wait" else f"{height:.1f}", ha="center",
                            va="bottom", fontsize=6)
                    ax.plot([x] * len(dots), dots, ".", color="black", markersize=3, alpha=0.6)
            if key == "wait":
                ax.set_yscale("log")
                ax.set_ylim(bottom=0.08)
            ax.set_xticks(range(len(methods)), [m.label.replace(" (", "\n(") for m in methods], fontsize=7)
            ax.set(ylabel="seconds", title=f"W={world}: {title}\nbars: mean; dots: "
                   + ("each rank of each seed" if key == "wait" else "each seed")
                   + "; hatch: " + " / ".join(scenarios))
            ax.legend(fontsize=8)
        ax = axes[row, 2]
        for i, m in enumerate(methods):
            s = summary[m.key]
            for j, (name, marker) in enumerate((("avg_test_acc", "o"), ("replica_test_acc", "s"))):
                mean, std = s[name]
                per = [100 * v[name] for v in s["per_seed"].values()]
                x = i + (j - 0.5) * 0.3
                ax.errorbar(x, 100 * mean, 100 * std, fmt=marker, color=colors[m.key], capsize=3,
                            label=("averaged model" if j == 0 else "mean replica") if i == 0 else None)
                ax.plot([x] * len(per), per, ".", color="black", markersize=3, alpha=0.5)
        ax.set_xticks(range(len(methods)), [m.label.replace(" (", "\n(") for m in methods], fontsize=7)
        ax.set(ylabel="test accuracy (%), 10k images",
               title=f"W={world}: final test accuracy, mean ± std (dots: seeds)\n"
                     "o averaged model, s mean over replicas")
        ax.legend(fontsize=8)
    fig.suptitle("Data-parallel training on label-skewed Fashion-MNIST shards (Dirichlet 0.5), MLP 784-256-10, "
                 "gloo on one 2-core machine")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finish(results: dict[int, dict[str, Any]], cfg: Settings, commands: Sequence[str], stem: Path,
           wall: float) -> None:
    """Summaries, tables, checks; write ``stem``.json and ``stem``.png."""
    summaries = {w: summarise(results[w], METHODS) for w in sorted(results)}
    texts = [tables(w, summaries[w], results[w], METHODS, cfg) for w in sorted(results)]
    checks = [c for w in results.values() for c in w["checks"]]
    worst = max((c["max_abs_diff"] for c in checks), default=0.0)
    zero_spread = {w: max(r["final_spread"] for r in results[w]["runs"] if r["method"] in ("ddp", "diloco50",
                                                                                          "diloco100"))
                   for w in sorted(results)}
    print()
    print("\n\n".join(texts))
    print(f"\nchecks: max |weights(with delays) - weights(none)| = {worst:.3g} over {len(checks)} runs; final spread "
          f"of DDP / DiLoCo (identical replicas after a sync, up to the round-off of the evaluation's all-reduce) = "
          f"{zero_spread}")
    record = {
        "description": "DDP vs DiLoCo vs NoLoCo vs local-only training of W replicas on label-skewed Fashion-MNIST "
                       "shards (gloo, CPU): validation curves of the averaged model and mean replica, bytes sent, "
                       "waiting under injected compute jitter.",
        "commands": list(commands), "settings": asdict(cfg), "methods": [asdict(m) for m in METHODS],
        "scenarios": {str(w): results[w]["scenarios"] for w in sorted(results)},
        "results": {str(w): results[w] for w in sorted(results)},
        "summary": {str(w): summaries[w] for w in sorted(results)},
        "checks": {"same_weights_with_delays_max_abs_diff": worst, "ddp_diloco_final_spread": zero_spread},
        "wall_seconds": wall, "machine": {"cpus": os.cpu_count(), "threads_per_rank": 1},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "tables_markdown": "\n\n".join(texts),
    }
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    plot(results, summaries, METHODS, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and {stem}.png")


def load(path: Path) -> tuple[dict[int, dict[str, Any]], Settings, list[str], float]:
    """A saved run: (results per world, settings, the commands that made it, wall seconds)."""
    record = json.loads(path.read_text())
    cfg = Settings(**{**record["settings"], "betas": tuple(record["settings"]["betas"])})
    results = {int(w): r for w, r in record["results"].items()}
    for w, r in results.items():  # files written before the settings were stored per world
        r.setdefault("scenarios", record["scenarios"][str(w)] if isinstance(record["scenarios"], dict)
                     else record["scenarios"])
    commands = record.get("commands", [record.get("command", "")])
    return results, cfg, list(commands), float(record.get("wall_seconds", 0.0))


# ---------------------------------------------------------------------------------------------------------- main
def main() -> None:
    repo = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[4], help="world sizes to run (default: 4)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="inner steps per rank (default 1000)")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(DEFAULT_SCENARIOS),
                        help="timing settings (only 'none' records evaluation curves); default: none exp")
    parser.add_argument("--merge", action="store_true",
                        help="add these worlds to the saved JSON (same settings) instead of replacing it")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 200 steps, 8k images")
    parser.add_argument("--out", type=Path, default=repo / "docs" / "figures")
    parser.add_argument("--replot", action="store_true",
                        help="no training: redraw the figure and tables (and their copies in the JSON) from the JSON")
    args = parser.parse_args()
    stem = args.out / ("noloco_replicas_quick" if args.quick else "noloco_replicas")
    if args.replot:
        old = load(stem.with_suffix(".json"))
        finish(old[0], old[1], old[2], stem, old[3])
        return
    torch.set_num_threads(1)
    cfg = Settings()
    scenarios = list(dict.fromkeys(args.scenarios))
    seeds = args.seeds
    if args.quick:
        cfg = replace(cfg, steps=200, train_images=8000, eval_every=50)
        seeds = 1
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    command = ("python docs/experiments/noloco_replicas.py" + (" --quick" if args.quick else "")
               + (f" --world {' '.join(map(str, args.world))}" if args.world != [4] else "")
               + (f" --seeds {args.seeds}" if args.seeds != 3 and not args.quick else "")
               + (f" --steps {args.steps}" if args.steps is not None else "")
               + (f" --scenarios {' '.join(scenarios)}" if scenarios != list(DEFAULT_SCENARIOS) else "")
               + (" --merge" if args.merge else ""))
    results: dict[int, dict[str, Any]] = {}
    commands, wall = [command], 0.0
    if args.merge and stem.with_suffix(".json").exists():
        results, saved, old_commands, wall = load(stem.with_suffix(".json"))
        if asdict(saved) != asdict(cfg):
            raise SystemExit(f"--merge: the saved run used other settings ({saved}); not merging into it")
        results = {w: r for w, r in results.items() if w not in args.world}
        commands = [*old_commands, command]
    train, val, test = load_dataset("fashion_mnist")
    _DATA.update({"train": train, "val": (val[0][: cfg.val_images], val[1][: cfg.val_images]), "test": test})
    print(f"Fashion-MNIST: {cfg.train_images} of {len(train[1])} training images dealt to the ranks, "
          f"val {cfg.val_images}, test {len(test[1])}; {cfg}", flush=True)
    start = time.perf_counter()
    for world in args.world:
        begin = time.perf_counter()
        results[world] = run_world(world, cfg, list(range(seeds)), METHODS, scenarios)
        results[world]["seconds"] = time.perf_counter() - begin
        results[world]["scenarios"] = scenarios
    elapsed = time.perf_counter() - start
    print(f"wall time {elapsed:.0f}s")
    args.out.mkdir(parents=True, exist_ok=True)
    finish(results, cfg, commands, stem, wall + elapsed)

if __name__ == "__main__":
    main()
