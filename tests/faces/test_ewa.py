"""EWA through the Lightning callback: conversion before the optimizers exist, sharing after each step, the merge at
the end, and resume equal to an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from tests.helpers import DigitsModule, digits_loaders, run_ddp_script, trainer
from weightavg.callbacks import EMA, EWA
from weightavg.core.io import read_weights
from weightavg.ewa import mixtures, to_moe
from weightavg.train import ViT


class Spread(pl.Callback):
    """Records the experts' spread after each step (put it after EWA)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        self.values.append(max(layer.spread() for layer in mixtures(module)))


def fit(
    callbacks: list[pl.Callback], epochs: int = 2, ckpt_path: str | None = None, **kwargs: Any
) -> tuple[pl.Trainer, DigitsModule]:
    pl.seed_everything(0, verbose=False)
    model = DigitsModule()
    run = trainer(max_epochs=epochs, callbacks=callbacks, **kwargs)
    run.fit(model, *digits_loaders(), ckpt_path=ckpt_path)
    return run, model


def test_convert_share_and_merge_back_to_the_original_architecture(tmp_path: Path) -> None:
    spread = Spread()
    ewa = EWA(beta=0.5, num_experts=2, select="net.0", export_path=tmp_path / "merged.safetensors")
    _, model = fit([ewa, spread])
    assert ewa.converted == ["net.0"]
    assert max(spread.values) < 1e-6  # beta = (N-1)/N collapses the experts after every step
    assert type(model.net[0]) is nn.Linear and not mixtures(model)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in DigitsModule().parameters())
    exported = read_weights(tmp_path / "merged.safetensors", argument="path")
    for key, value in model.state_dict().items():
        assert torch.equal(exported[key], value), key

    spread = Spread()
    _, kept = fit([EWA(beta=0.0, num_experts=3, select="net.0", apply_at_end=False), spread])
    assert spread.values[-1] > 1e-4  # without sharing the experts drift apart on their own token groups
    assert len(mixtures(kept)) == 1


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    def callback() -> EWA:
        return EWA(beta=0.3, num_experts=3, select="net.0", ramp_steps=5, apply_at_end=False)

    _, full = fit([callback()], epochs=3)
    fit(
        [callback(), ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)],
        epochs=3,
        enable_checkpointing=True,
    )
    _, resumed = fit([callback()], epochs=3, ckpt_path=str(tmp_path / "epoch=0-step=8.ckpt"))
    for key, value in full.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, resumed.state_dict()[key]), key


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"beta=0\.7"):
        EWA(beta=0.7, num_experts=2)
    with pytest.raises(ValueError, match="matches no submodule"):
        fit([EWA(select="missing.*")], epochs=1)


class SmallViT(DigitsModule):
    """The app's small ViT (blocks with ``mlp`` FFNs) on the digits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ViT(64, 10, hidden=32, depth=4, heads=2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class MergedProbe(pl.Callback):
    """At the last validation of fit (model still mixed, in eval mode), the outputs on a fixed batch."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.outputs = x, torch.empty(0)

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        assert mixtures(module) and not module.training
        self.outputs = module(self.x).detach().clone()


def test_transformer_default_selection_validation_sees_the_merged_model() -> None:
    torch.set_num_threads(1)
    x = digits_loaders()[1].dataset.tensors[0][:64]  # type: ignore[attr-defined]
    probe = MergedProbe(x)
    ewa = EWA(beta=0.2, ramp_steps=4)
    pl.seed_everything(0, verbose=False)
    model = SmallViT()
    dense_count = sum(p.numel() for p in model.parameters())
    run = trainer(max_epochs=1, callbacks=[ewa, probe], limit_train_batches=6, limit_val_batches=1)
    run.fit(model, *digits_loaders())
    assert ewa.converted == ["net.blocks.1.mlp", "net.blocks.3.mlp"]  # every other block's FFN
    assert not mixtures(model) and sum(p.numel() for p in model.parameters()) == dense_count
    model.eval()
    torch.testing.assert_close(model(x), probe.outputs, rtol=1e-5, atol=1e-5)  # validated == deployed
    assert float(run.callback_metrics["ewa/spread"]) > 0
    assert float(run.callback_metrics["ewa/beta"]) == pytest.approx(0.2)


def test_with_ema_ewa_merges_the_average_and_must_come_last() -> None:
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match=r"EMA\(decay=0.5\) comes after EWA"):
        fit([EWA(select="net.0", num_experts=2), EMA(decay=0.5)], epochs=1)

    class Keep(pl.Callback):  # the EMA's averaged stacks, read just before EWA merges them
        def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self.stacks = [s.detach().clone() for s in mixtures(module)[0].stacks()]

    keep = Keep()
    _, model = fit([EMA(decay=0.5, warmup="none"), keep, EWA(select="net.0", num_experts=2, beta=0.1)], epochs=1)
    weight, bias = (stack.mean(0) for stack in keep.stacks)
    assert torch.equal(model.net[0].weight, weight) and torch.equal(model.net[0].bias, bias)


def test_ddp_two_gloo_processes_merge_to_the_same_model(tmp_path: Path) -> None:
    assert "DDP EWA OK" in run_ddp_script(tmp_path, "ewa")


def test_a_model_converted_beforehand_is_used_as_it_is() -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = DigitsModule()
    to_moe(model, "net.0", num_experts=2, seed=5)
    layer = mixtures(model)[0]
    ewa = EWA(beta=0.5, num_experts=2, select="nothing.matches.this")
    trainer(max_epochs=1, callbacks=[ewa], limit_train_batches=3).fit(model, digits_loaders()[0])
    assert ewa.converted == [] and layer.seed == 5  # the callback kept the user's mixture (and its seed)
    assert type(model.net[0]) is nn.Linear and not mixtures(model)  # merged at the end of fit
