"""Shared test fixtures: a small BatchNorm network and the scikit-learn digits data (real, tiny, offline)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


def digits_loaders(batch_size: int = 64, train_size: int = 512, val_size: int = 256) -> tuple[DataLoader, DataLoader]:
    x, y = digits_tensors()
    train = TensorDataset(x[:train_size], y[:train_size])
    val = TensorDataset(x[train_size : train_size + val_size], y[train_size : train_size + val_size])
    # No shuffling: a resumed run must see the same batches as an uninterrupted one.
    return DataLoader(train, batch_size=batch_size), DataLoader(val, batch_size=128)


def small_net(hidden: int = 32, batchnorm: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(64, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(), nn.Linear(hidden, 10)]
    return nn.Sequential(*layers)


class DigitsModule(pl.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.1, batchnorm: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = small_net(hidden, batchnorm)
        self.val_accuracies: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        accuracy = (self(x).argmax(-1) == y).float().mean()
        self.log("val_acc", accuracy, prog_bar=False)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(prefix="weightavg-"),
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def fit_digits(
    module: pl.LightningModule,
    callbacks: list[pl.Callback],
    epochs: int,
    *,
    seed: int = 0,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """Fit ``module`` (built by the caller after seeding) on the digits loaders; return the Trainer."""
    train, val = digits_loaders()
    run = trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kwargs)
    run.fit(module, train, val, ckpt_path=ckpt_path)
    return run


def clean_environment() -> dict[str, str]:
    """``os.environ`` without distributed launch variables (a stale MASTER_PORT makes a child's store collide)."""
    from tests.conftest import LAUNCH_VARIABLES

    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}


def run_ddp_script(folder: Path, *mode: str) -> str:
    """Run ``tests/faces/ddp_script.py`` with two gloo processes (Lightning relaunches it); return its stdout."""
    script = Path(__file__).parent / "faces" / "ddp_script.py"
    env = {**clean_environment(), "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run(
        [sys.executable, str(script), str(folder), *mode],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[1],
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout
