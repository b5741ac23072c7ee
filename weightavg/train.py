"""``python -m weightavg.train``: a small Hydra app that trains a network on real data with weight averaging.

Examples::

    python -m weightavg.train                                   # digits, EMA(decay=0.999)
    python -m weightavg.train averaging=ema averaging.decay=0.99 trainer.max_epochs=5
    python -m weightavg.train averaging=swa averaging.start=0.5
    python -m weightavg.train averaging=ema +averaging@extra_averaging.swa=swa   # several averagers at once
    python -m weightavg.train data.name=fashion_mnist           # needs Debian's dataset-fashion-mnist
    python -m weightavg.train averaging=none                    # pretrain; the final model is model.safetensors
    python -m weightavg.train averaging=wiseft data.shift=invert model.init_from=PATH   # WiSE-FT from PATH
    python -m weightavg.train averaging=zscl data.shift=invert model.init_from=PATH     # ZSCL, distilling PATH
    python -m weightavg.train averaging=lcsc averaging.every_n_steps=50                 # LCSC over snapshots
    python -m weightavg.train model.arch=vit averaging=ewa trainer.max_epochs=20        # EWA in a small ViT
    python -m weightavg.train averaging=noloco trainer.strategy=local_ddp trainer.devices=4 trainer.accelerator=cpu

It prints the test accuracy of the live weights and of each average, and writes each average as safetensors.
"""

from __future__ import annotations

import copy
import gzip
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.config_store import ConfigStore
from lightning.pytorch.loggers import CSVLogger
from omegaconf import MISSING, DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from weightavg.callbacks import EWA, LCSC, ZSCL, AveragingCallback, DiLoCo, NoLoCo, WiSEFT
from weightavg.config import ConfigError, instantiate_averaging, register_configs
from weightavg.core.averager import _resolve_dtype
from weightavg.core.io import read_weights, save_safetensors
from weightavg.ewa import mixtures, to_dense
from weightavg.methods import wiseft

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class DataConfig:
    name: str = "digits"  # digits (scikit-learn, embedded) or fashion_mnist (Debian's dataset-fashion-mnist)
    batch_size: int = 32
    train_size: int | None = None  # cap on training examples (None: all)
    shift: str = "none"  # none, or invert (1 - x): a second domain; validation then also reports the original one
    reference_size: int = 256  # unlabeled inputs ZSCL distills on (from the original domain's training inputs)


@dataclass
class ModelConfig:
    arch: str = "mlp"  # mlp (BatchNorm MLP, SGD) or vit (a small vision transformer, AdamW; EWA needs it)
    hidden: int = 128  # mlp: hidden width; vit: FFN width (the token width is hidden // 2)
    lr: float | None = None  # None: 0.3 for mlp (a constant, fairly high SGD rate: where averaging pays), 1e-3 for vit
    momentum: float = 0.9  # mlp's SGD momentum
    depth: int = 4  # vit: transformer blocks
    heads: int = 4  # vit: attention heads
    init_from: str | None = None  # start from these weights (safetensors or checkpoint), e.g. an earlier export


@dataclass
class TrainerConfig:
    max_epochs: int = 60  # ~2,000 optimizer steps: long enough for EMA's default decay (0.999, ~1,000 steps)
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"  # local_ddp for NoLoCo/DiLoCo over several processes
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    check_val_every_n_epoch: int = 1
    threads: int = 1  # torch.set_num_threads at start: small models run fastest on one, and results depend on it
    progress_bar: bool | None = None  # Lightning's progress bar; None: on when stderr is a terminal


@dataclass
class TrainConfig:
    defaults: list[Any] = field(
        default_factory=lambda: ["_self_", {"averaging": "ema"}, {"override hydra/help": "weightavg_train"}]
    )
    averaging: Any = MISSING
    extra_averaging: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    output_dir: str = "${hydra:runtime.output_dir}"


Split = tuple[torch.Tensor, torch.Tensor]


def _read_idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return torch.frombuffer(bytearray(raw[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def load_dataset(name: str, seed: int = 0) -> tuple[Split, Split, Split]:
    """(train, validation, test) splits of real data as flat float features in [0, 1] and integer labels.

    ``digits``: scikit-learn's 1,797 8x8 handwritten digits, split 60/20/20 with a fixed permutation.
    ``fashion_mnist``: the 60k/10k IDX files of Debian's ``dataset-fashion-mnist``; validation is the last 10k of
    the training set.
    """
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
        x, y = x[order], y[order]
        a, b = int(0.6 * len(y)), int(0.8 * len(y))
        return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])
    if name == "fashion_mnist":
        if not FASHION_MNIST.is_dir():
            raise FileNotFoundError(
                f"data.name=fashion_mnist needs {FASHION_MNIST} (apt-get install dataset-fashion-mnist); "
                "data.name=digits needs nothing"
            )
        images = [_read_idx(FASHION_MNIST / f"{s}-images-idx3-ubyte.gz") for s in ("train", "t10k")]
        labels = [_read_idx(FASHION_MNIST / f"{s}-labels-idx1-ubyte.gz").long() for s in ("train", "t10k")]
        train_x, test_x = (i.reshape(len(i), -1).float() / 255.0 for i in images)
        return (train_x[:50000], labels[0][:50000]), (train_x[50000:], labels[0][50000:]), (test_x, labels[1])
    raise ValueError(f"data.name={name!r} is not a dataset; choose 'digits' or 'fashion_mnist'")


class Block(nn.Module):
    """A pre-norm transformer block; its FFN is the submodule ``mlp`` (what EWA's default selection converts)."""

    def __init__(self, dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class ViT(nn.Module):
    """A small vision transformer for square grey images given as flat features: 4x4 patches of side/4 pixels."""

    def __init__(self, features: int, classes: int, hidden: int = 128, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        side = round(features**0.5)
        if side * side != features or side % 4:
            raise ValueError(f"model.arch=vit needs square images with a side divisible by 4, got {features} features")
        dim = hidden // 2
        if dim % heads:
            raise ValueError(f"model.hidden={hidden} gives token width {dim}, not divisible by model.heads={heads}")
        self.side, self.patch = side, side // 4
        self.embed = nn.Linear(self.patch * self.patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 17, dim))
        self.blocks = nn.Sequential(*(Block(dim, hidden, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        patches = x.reshape(-1, 4, p, 4, p).permute(0, 1, 3, 2, 4).reshape(-1, 16, p * p)
        tokens = self.embed(patches)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], 1) + self.pos
        out: torch.Tensor = self.head(self.norm(self.blocks(tokens))[:, 0])
        return out


class Classifier(pl.LightningModule):
    """``arch="mlp"``: an MLP with BatchNorm (so SWA's statistics recompute matters), SGD at a constant rate.
    ``arch="vit"``: a small vision transformer (EWA's setting), AdamW at a constant rate."""

    def __init__(
        self,
        features: int,
        classes: int,
        hidden: int = 128,
        lr: float | None = None,
        momentum: float = 0.9,
        arch: str = "mlp",
        depth: int = 4,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if arch == "mlp":
            self.net: nn.Module = nn.Sequential(
                nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, classes)
            )
        elif arch == "vit":
            self.net = ViT(features, classes, hidden, depth, heads)
        else:
            raise ValueError(f"model.arch={arch!r} is not an architecture; choose 'mlp' or 'vit'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(x)
        return logits

    def training_step(self, batch: Split, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss + ZSCL.distillation_loss(self)  # zero unless a ZSCL callback distills

    def validation_step(self, batch: Split, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        lr = self.hparams["lr"]
        if self.hparams["arch"] == "vit":
            return torch.optim.AdamW(self.parameters(), lr=1e-3 if lr is None else lr, weight_decay=0.05)
        return torch.optim.SGD(self.parameters(), lr=0.3 if lr is None else lr, momentum=self.hparams["momentum"])


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on a split."""
    was_training = model.training
    model.eval()
    x, y = split
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    correct = sum(
        int((model(x[i : i + batch_size].to(device, dtype)).argmax(-1).cpu() == y[i : i + batch_size]).sum())
        for i in range(0, len(y), batch_size)
    )
    model.train(was_training)
    return correct / len(y)


class _LiveSnapshot(pl.Callback):
    """Keeps a copy of the live weights at the end of fit, before any averager puts its average in the model."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if mixtures(pl_module):  # EWA's live weights are its mixtures, which the deployed model merges
            pl_module = copy.deepcopy(pl_module)
            to_dense(pl_module)
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


Averaging = AveragingCallback | EWA

#: Config fields that name files the app writes after training: checked before it starts.
OUTPUT_FIELDS = ("export_path", "figure_path", "result_path")


def check_output_path(where: str, key: str, value: Any) -> None:
    """Refuse an output file the app could not write after training: a folder, a missing or unwritable parent."""
    path = Path(str(value))
    problem = None
    if path.is_dir():
        problem = "is a directory"
    elif not path.parent.is_dir():
        problem = f"has no parent folder {str(path.parent)!r} (create it first)"
    elif not os.access(path.parent, os.W_OK):
        problem = f"is in a folder this process cannot write ({str(path.parent)!r})"
    if problem is not None:
        raise ConfigError(f"{where}: {key}={str(value)!r} {problem}; give a file path in a writable folder")


class _FitProgress(pl.Callback):
    """Records whether training took its first step, so errors raised before it are reported as configuration."""

    def __init__(self) -> None:
        self.started = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.started = True


def build_averagers(
    cfg: DictConfig, output_dir: Path, reference: DataLoader[Any] | None = None, val_names: list[str] | None = None
) -> dict[str, Averaging]:
    """Instantiate ``averaging`` and every ``extra_averaging`` entry, defaulting each export path into the run dir.

    WiSE-FT sweeps on the app's ``val_acc`` unless told otherwise; ZSCL distills on ``reference`` when given.
    """
    nodes = {"averaging": cfg.averaging, **{f"extra_averaging.{k}": v for k, v in cfg.extra_averaging.items()}}
    callbacks: dict[str, Averaging] = {}
    for where, node in nodes.items():
        overrides: dict[str, Any] = {}
        target = node.get("_target_", "") if node is not None else ""
        if target.endswith(".WiSEFT"):
            if node.get("monitor") is None and node.get("metric") is None and node.get("alpha") is None:
                overrides["monitor"] = "val_acc"
            sweeps = "monitor" in overrides or node.get("monitor") is not None or node.get("metric") is not None
            if sweeps and node.get("dataloader_names") is None:  # a fixed alpha sweeps nothing: nothing to name/draw
                overrides["dataloader_names"] = val_names
            if sweeps and node.get("figure_path") is None:
                overrides["figure_path"] = str(output_dir / f"{where.replace('extra_averaging.', '')}.png")
        if target.endswith(".LCSC") and node.get("monitor") is None and node.get("metric") is None:
            overrides["monitor"] = "val_acc"
        if target.endswith(".ZSCL") and node.get("reference") is None and reference is not None:
            overrides["reference"] = reference
        for key in OUTPUT_FIELDS:
            if node is not None and node.get(key) is not None:
                check_output_path(where, key, node.get(key))
        if node is not None and node.get("dtype") is not None:
            try:  # the averagers resolve their dtype when fit binds them: check it before any training
                _resolve_dtype(node.get("dtype"))
            except (TypeError, ValueError) as error:
                raise ConfigError(f"{where}: {error}") from error
        callback = instantiate_averaging(node, where=where, **overrides)
        if callback is None:
            continue
        # Every result is exported, except an EWA that keeps its mixtures (its export is the merged model).
        if callback.export_path is None and not (isinstance(callback, EWA) and not callback.apply_at_end):
            callback.export_path = str(output_dir / f"{where.replace('extra_averaging.', '')}.safetensors")
        if node.get("name") is None:
            callback.name = where
        callbacks[where] = callback
    return callbacks


def run(cfg: DictConfig) -> dict[str, float]:
    """Train as configured; return test accuracy of the live weights and of each average."""
    trainer_options: dict[str, Any] = OmegaConf.to_container(cfg.trainer)  # type: ignore[assignment]
    threads, progress_bar = trainer_options.pop("threads"), trainer_options.pop("progress_bar")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"trainer.threads={threads!r} must be a whole number of threads >= 1")
    torch.set_num_threads(threads)
    pl.seed_everything(cfg.seed, verbose=False)
    output_dir = Path(cfg.output_dir)
    print(f"weightavg.train: {threads} torch thread(s) (trainer.threads), run folder {output_dir}")
    try:
        train, val, test = load_dataset(cfg.data.name)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error
    if cfg.data.shift not in ("none", "invert"):
        raise ConfigError(f"data.shift={cfg.data.shift!r} is not a shift; choose 'none' or 'invert'")
    # Unlabeled reference inputs for ZSCL: the original domain's training inputs (only with pretrained weights:
    # distilling toward a random initialisation would only hold training back).
    reference_x = train[0][-cfg.data.reference_size :] if cfg.data.reference_size > 0 else None
    original_val, original_test = val, test
    if cfg.data.shift == "invert":
        train, val, test = ((1.0 - x, y) for x, y in (train, val, test))
    if cfg.data.train_size is not None:
        train = (train[0][: cfg.data.train_size], train[1][: cfg.data.train_size])
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(TensorDataset(*train), batch_size=cfg.data.batch_size, shuffle=True, generator=loader_gen)
    val_loaders = [DataLoader(TensorDataset(*val), batch_size=1024)]
    val_names = ["val"]
    if cfg.data.shift != "none":
        val_loaders.append(DataLoader(TensorDataset(*original_val), batch_size=1024))
        val_names.append("val_original")
    reference = None
    if reference_x is not None and cfg.model.init_from is not None:
        reference = DataLoader(TensorDataset(reference_x), batch_size=cfg.data.batch_size)
    averagers = build_averagers(cfg, output_dir, reference, val_names)
    if any(isinstance(cb, EWA) for cb in averagers.values()) and cfg.model.arch != "vit":
        raise ConfigError(
            f"averaging=ewa needs a transformer's FFNs to mix; model.arch={cfg.model.arch!r}: add model.arch=vit"
        )
    # EWA merges at the end of fit what the averagers before it leave in the model: it goes last.
    averagers = dict(sorted(averagers.items(), key=lambda item: isinstance(item[1], EWA)))
    model_options: dict[str, Any] = OmegaConf.to_container(cfg.model)  # type: ignore[assignment]
    init_from = model_options.pop("init_from")
    try:
        model = Classifier(train[0].shape[1], 10, **model_options)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if init_from is not None:
        try:
            model.load_state_dict(read_weights(init_from, argument="model.init_from"))
        except (FileNotFoundError, ValueError, RuntimeError) as error:
            raise ConfigError(str(error)) from error
    snapshot, progress = _LiveSnapshot(), _FitProgress()
    trainer = pl.Trainer(
        **trainer_options,
        callbacks=[snapshot, progress, *averagers.values()],
        logger=CSVLogger(str(output_dir), name="", version=""),  # metrics.csv in the run folder
        log_every_n_steps=10,  # a digits epoch is 34 steps: Lightning's default 50 would log no training loss
        enable_checkpointing=False,
        enable_progress_bar=sys.stderr.isatty() if progress_bar is None else bool(progress_bar),
        enable_model_summary=False,
        default_root_dir=str(output_dir),
    )
    try:
        with warnings.catch_warnings():
            # The run folder already holds Hydra's .hydra/ (and the app writes only a new metrics.csv there):
            # Lightning's "exists and is not empty ... will be deleted" warning would only alarm.
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            trainer.fit(model, train_loader, val_loaders)
    except (ValueError, TypeError) as error:
        if progress.started:
            raise
        # Raised at fit start (the callbacks' checks that need the Trainer or the model), before any training.
        raise ConfigError(str(error)) from error

    results: dict[str, float] = {}
    original: dict[str, float] = {}  # the same rows on the original domain when training on a shifted one

    def measure(label: str) -> None:
        results[label] = accuracy(model, test)
        if cfg.data.shift != "none":  # WiSE-FT's and ZSCL's point: what the original domain keeps
            original[label] = accuracy(model, original_test)

    for where, callback in averagers.items():
        if isinstance(callback, EWA):
            measure(f"{where} {callback!r}, merged")  # the model ends merged
        elif isinstance(callback, WiSEFT) and callback.averager is not None and callback.alpha is not None:
            with wiseft.blended(callback.averager, callback.alpha):
                measure(f"{where} WiSEFT(alpha={callback.alpha:g})")
            with wiseft.blended(callback.averager, 0.0):
                measure(f"{where} WiSE-FT anchor (alpha=0)")
        elif isinstance(callback, LCSC) and callback.result is not None:
            measure(f"{where} LCSC(method={callback.method})")  # the model holds it
        elif any(isinstance(cb, EWA) for cb in averagers.values()):
            continue  # its average was of the mixtures; what it left in the model is merged in EWA's row
        elif callback.averager is not None and callback.averager.has_average:
            rule = callback.outer_rule if isinstance(callback, NoLoCo | DiLoCo) else callback.rule
            label = f"{where} {rule!r}" + (" slow weights" if isinstance(callback, NoLoCo | DiLoCo) else "")
            with callback.averager.averaged():
                measure(label)
    final = output_dir / "model.safetensors"
    if trainer.is_global_zero:  # with several processes (NoLoCo, DiLoCo) rank 0's replica is the one written
        save_safetensors(model.state_dict(), final)  # what the model ends with (an average, if one applies at end)
    model.load_state_dict(snapshot.state)
    measure("live")
    results = {"live": results.pop("live"), **results}
    if not trainer.is_global_zero:
        return results
    width = max(len(k) for k in results)
    domain = "" if cfg.data.shift == "none" else f", {cfg.data.shift}ed"
    extra = "" if cfg.data.shift == "none" else "  | original domain"
    print(f"\n{'weights':<{width}}  test accuracy ({cfg.data.name}{domain}, {len(test[1])} examples){extra}")
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.4f}" + (f"  | {original[key]:.4f}" if key in original else ""))
    for callback in averagers.values():
        if isinstance(callback, EWA):
            written = callback.export_path is not None and Path(callback.export_path).is_file()
            print(f"merged model of {callback.name}: {callback.export_path if written else 'not exported'}")
            print(
                f"{callback.name}: 'live' is the live mixtures merged to the dense architecture (what EWA deploys), "
                "so it matches the merged row unless another averager changed the model at the end; the dense "
                "baseline (no EWA) is the same command with averaging=none"
            )
        elif callback.export_path is not None and Path(callback.export_path).is_file():
            print(f"averaged weights of {callback.name}: {callback.export_path}")
        else:
            print(f"{callback.name} never updated (its start was not reached): nothing written")
    print(f"final model (model.init_from= for a next run): {final}")
    return results


#: ``--help``'s description of every field of the app's own config (a test checks that none is missing).
FIELD_HELP: dict[str, str] = {
    "averaging": "the averaging method: a group option (ema, swa, wiseft, zscl, lcsc, ewa, noloco, diloco, none); "
    "its fields are the arguments of weightavg.callbacks.<Method> (docs/<method>.md lists each)",
    "extra_averaging": "more averagers in the same run: +averaging@extra_averaging.NAME=OPTION",
    "data.name": "digits (scikit-learn, embedded) or fashion_mnist (Debian's dataset-fashion-mnist)",
    "data.batch_size": "training batch size",
    "data.train_size": "cap on training examples (null: all)",
    "data.shift": "none, or invert (1 - x): train on a second domain; the table then also scores the original one",
    "data.reference_size": "unlabeled original-domain inputs ZSCL distills on (with model.init_from)",
    "model.arch": "mlp (BatchNorm MLP, SGD) or vit (small vision transformer, AdamW; EWA needs it)",
    "model.hidden": "mlp: hidden width; vit: FFN width (token width hidden // 2)",
    "model.lr": "learning rate (null: 0.3 for mlp, 1e-3 for vit)",
    "model.momentum": "mlp's SGD momentum",
    "model.depth": "vit: transformer blocks",
    "model.heads": "vit: attention heads",
    "model.init_from": "start from these weights (safetensors or checkpoint), e.g. an earlier run's model.safetensors",
    "trainer.max_epochs": "training epochs",
    "trainer.accelerator": "Lightning accelerator (auto, cpu, gpu, ...)",
    "trainer.devices": "Lightning devices (several processes: with trainer.strategy=local_ddp)",
    "trainer.strategy": "Lightning strategy; local_ddp for NoLoCo/DiLoCo over several processes",
    "trainer.precision": "Lightning precision (32-true, bf16-mixed, ...)",
    "trainer.accumulate_grad_batches": "batches per optimizer step",
    "trainer.check_val_every_n_epoch": "epochs between validations",
    "trainer.threads": "torch CPU threads, set at start (default 1: fastest for these small models, and "
    "results depend on the thread count)",
    "trainer.progress_bar": "Lightning's progress bar (null: on when stderr is a terminal)",
    "seed": "seed of the initialisation and of the data order",
    "output_dir": "run folder: averages (.safetensors), model.safetensors, metrics.csv (default: Hydra's run dir)",
}


def _help_template() -> str:
    width = max(map(len, FIELD_HELP)) + 2
    fields = "\n".join(f"  {key:<{width}}{text}" for key, text in FIELD_HELP.items())
    return (
        "python -m weightavg.train [OVERRIDES]: train on real data with weight averaging; prints the test accuracy "
        "of the live weights and of each average, writes metrics.csv and the averages into the run folder.\n\n"
        "Fields (override with key=value, e.g. averaging=swa averaging.start=0.5 trainer.max_epochs=5):\n"
        f"{fields}\n\n== Config groups ==\n$APP_CONFIG_GROUPS\n== Config (defaults) ==\n$CONFIG\n"
        "Hydra's own options: --hydra-help\n"
    )


def register_train_configs() -> None:
    """Register the app's config (``weightavg_train``) and the ``averaging`` group; called by ``main``."""
    register_configs()
    store = ConfigStore.instance()
    store.store(
        group="hydra/help",
        name="weightavg_train",
        node={"app_name": "weightavg.train", "header": "", "footer": "", "template": _help_template()},
    )
    store.store(name="weightavg_train", node=TrainConfig)


def _run_cli(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as error:
        print(f"weightavg.train: invalid configuration: {error}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """``python -m weightavg.train [overrides]``: registers the configs (not at import), then runs Hydra."""
    register_train_configs()
    hydra.main(version_base=None, config_name="weightavg_train")(_run_cli)()


if __name__ == "__main__":
    main()
