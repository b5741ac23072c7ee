"""The Lightning face around evaluation, checkpoints and logging: what validation, test and checkpoints hold, with
real ``Trainer`` runs on the digits data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset

from tests.faces.test_callbacks import Recorder, assert_close, ema_reference, fit, swa_reference
from tests.helpers import DigitsModule, digits_loaders, digits_tensors, trainer
from weightavg.callbacks import EMA, SWA


class DigitsStream(IterableDataset):  # type: ignore[type-arg]
    """The training digits as a stream without a length (Lightning cannot estimate the run's steps)."""

    def __init__(self, size: int = 512, batch_size: int = 64) -> None:
        x, y = digits_tensors()
        self.x, self.y, self.batch_size = x[:size], y[:size], batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.x), self.batch_size):
            yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]


def fit_stream(callbacks: list[pl.Callback], epochs: int = 2) -> DigitsModule:
    pl.seed_everything(0, verbose=False)
    model = DigitsModule()
    _, val = digits_loaders()
    trainer(max_epochs=epochs, callbacks=callbacks).fit(model, DataLoader(DigitsStream(), batch_size=None), val)
    return model


def test_training_data_without_a_length() -> None:
    """Lightning reports -1 steps for an IterableDataset without max_steps: rules that need no total still work."""
    recorder, ema = Recorder(), EMA(decay=0.9, warmup="none", apply_at_end=False)
    fit_stream([recorder, ema])
    assert recorder.steps[-1] == 16
    assert_close(ema._bound().averaged_tensors(), ema_reference(recorder, 0.9), rtol=1e-5, atol=1e-6)

    recorder, swa = Recorder(), SWA(start=4, start_unit="step", every=4, every_unit="step", recompute_bn=False)
    fit_stream([recorder, swa])
    assert_close(swa._bound().averaged_tensors(), swa_reference(recorder, [4, 8, 12, 16]), rtol=1e-5, atol=1e-6)


def test_a_fraction_start_without_a_length_is_refused_at_fit_start() -> None:
    recorder = Recorder()
    with pytest.raises(ValueError, match=r"SWA.*total optimizer steps.*max_steps"):
        fit_stream([recorder, SWA(start=0.5, recompute_bn=False)])
    assert recorder.steps == [0]  # refused when fit starts, not after training


class ProbeAtTest(pl.Callback):
    """Records the weights and the validation logits of the model at the start of each test."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.logits = torch.empty(0)

    def on_test_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        with torch.no_grad():
            self.logits = module(digits_tensors()[0][512:768])


def logits_of_checkpoint(path: Path) -> torch.Tensor:
    """The independent reference: a fresh model loaded with the checkpoint's state_dict."""
    fresh = DigitsModule()
    fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    fresh.eval()
    with torch.no_grad():
        return fresh(digits_tensors()[0][512:768])


@pytest.mark.parametrize("apply_at_end", [True, False])
def test_testing_a_checkpoint_after_fit_uses_its_weights_and_keeps_the_average(
    tmp_path: Path, apply_at_end: bool
) -> None:
    ema, probe = EMA(decay=0.9, warmup="none", apply_at_end=apply_at_end), ProbeAtTest()
    every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    run, model = fit([ema, probe, every_epoch], epochs=3, enable_checkpointing=True)
    averager = ema._bound()
    before = {k: v.clone() for k, v in averager.averaged_tensors().items()}
    first = tmp_path / "epoch=0.ckpt"  # an earlier checkpoint: neither the final average nor the live weights

    _, val = digits_loaders()
    run.test(model, val, ckpt_path=str(first))
    saved = torch.load(first, weights_only=False)["state_dict"]
    for name, value in saved.items():
        assert torch.equal(probe.weights[name], value), name
    torch.testing.assert_close(probe.logits, logits_of_checkpoint(first), rtol=0, atol=0)
    for name, value in averager.averaged_tensors().items():
        assert torch.equal(value, before[name]), f"the average's {name} changed"

    run.validate(model, val, ckpt_path=str(tmp_path / "epoch=1.ckpt"))  # a second load: the average still holds
    model.load_state_dict(saved)  # and a plain load_state_dict
    for name, value in averager.averaged_tensors().items():
        assert torch.equal(value, before[name]), f"the average's {name} changed"
