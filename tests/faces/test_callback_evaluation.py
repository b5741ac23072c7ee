"""The Lightning face around evaluation, checkpoints and logging: what validation, test and checkpoints hold, with
real ``Trainer`` runs on the digits data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset

from tests.faces.test_callbacks import Recorder, assert_close, ema_reference, fit, swa_reference
from tests.helpers import DigitsModule, digits_loaders, digits_tensors, fit_digits, trainer
from weightavg.callbacks import EMA, LIVE_KEY, MARKER_KEY, SWA, WiSEFT


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


class LossModule(DigitsModule):
    """Logs the validation loss, a metric that tells any two sets of weights apart."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))


def fit_loss(
    callbacks: list[pl.Callback], epochs: int = 3, ckpt_path: str | None = None, **kwargs: Any
) -> tuple[pl.Trainer, LossModule]:
    pl.seed_everything(0, verbose=False)
    model = LossModule()
    return fit_digits(model, callbacks, epochs, ckpt_path=ckpt_path, **kwargs), model


def revalidated_loss(path: str) -> float:
    fresh = LossModule()
    fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    _, val = digits_loaders()
    return float(trainer().validate(fresh, val, verbose=False)[0]["val_loss"])


@pytest.mark.parametrize("validate_with", ["average", "live"])
def test_the_best_checkpoint_scores_what_model_checkpoint_recorded(tmp_path: Path, validate_with: str) -> None:
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", mode="min", save_top_k=1)
    weights = "average" if validate_with == "average" else "live"
    ema = EMA(
        decay=0.9,
        warmup="none",
        apply_at_end=False,
        validate_with=validate_with,  # type: ignore[arg-type]
        checkpoint_weights=weights,
    )
    fit_loss([ema, best], enable_checkpointing=True)
    torch.testing.assert_close(
        revalidated_loss(best.best_model_path), float(best.best_model_score), rtol=1e-6, atol=1e-7
    )
    marker = torch.load(best.best_model_path, weights_only=False)[MARKER_KEY]
    assert marker["state_dict"] == ("average" if validate_with == "average" else "live")


def test_a_monitor_on_other_weights_than_saved_is_warned_at_fit_start(tmp_path: Path) -> None:
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")
    with pytest.warns(UserWarning, match=r"measured on EMA.*average but the checkpoints' state_dict holds the live"):
        fit_loss([EMA(decay=0.9, warmup="none", checkpoint_weights="live"), best], epochs=1, enable_checkpointing=True)


def test_checkpoint_weights_live_resumes_without_the_callback_from_the_live_weights(tmp_path: Path) -> None:
    live = Recorder()
    ema = EMA(decay=0.9, warmup="none", validate_with="live", checkpoint_weights="live")
    fit_loss([live, ema, ModelCheckpoint(dirpath=tmp_path, save_last=True)], epochs=1, enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved[MARKER_KEY]["state_dict"] == "live"
    for name, value in saved["state_dict"].items():
        assert torch.equal(value.double(), live.weights[-1][name]), name
    averaged = saved["callbacks"][ema.state_key]["averaging"]["averaged"]
    for name, value in ema._bound().averaged_tensors().items():
        assert torch.equal(averaged[name], value), name


def test_a_checkpoint_with_an_average_but_no_live_weights_is_refused(tmp_path: Path) -> None:
    fit_loss(
        [EMA(decay=0.9, warmup="none"), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        epochs=2,
        enable_checkpointing=True,
    )
    # Written during fit: state_dict holds the average. Drop its live weights.
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    stripped = tmp_path / "stripped.ckpt"
    assert state[MARKER_KEY]["state_dict"] == "average"
    del state[LIVE_KEY]
    torch.save(state, stripped)
    recorder = Recorder()
    with pytest.raises(ValueError, match=LIVE_KEY):
        fit_loss([recorder, EMA(decay=0.9, warmup="none")], epochs=3, ckpt_path=str(stripped))
    fit_loss([EMA(decay=0.9, warmup="none", resume_from_average=True)], epochs=3, ckpt_path=str(stripped))  # opted in

    del state["callbacks"][EMA(decay=0.9, warmup="none").state_key]["averaging"]
    torch.save(state, stripped)
    with pytest.warns(UserWarning, match=r"holds no \['averaging'\] state"):
        fit_loss([EMA(decay=0.9, warmup="none", resume_from_average=True)], epochs=3, ckpt_path=str(stripped))


def test_ema_warms_up_by_default_in_every_face() -> None:
    """The default EMA is ema-pytorch's power warmup (gamma=1, power=2/3) up to decay 0.999, in every face; the
    callback's average matches that schedule written plainly in float64."""
    import hydra.utils
    from omegaconf import OmegaConf

    import weightavg.optim
    from weightavg.config import EMAConfig
    from weightavg.methods import EMA as EMARule

    assert EMARule().warmup == "power"
    assert EMA().rule == EMARule()
    model = torch.nn.Linear(2, 2)
    wrapper = weightavg.optim.EMA(torch.optim.SGD(model.parameters(), lr=0.1))
    assert wrapper.averager.rule == EMARule()
    built = hydra.utils.instantiate(OmegaConf.structured(EMAConfig()))
    assert built.rule == EMARule()

    recorder, ema = Recorder(), EMA(apply_at_end=False)
    fit([recorder, ema], epochs=2)
    avg = {k: v.clone() for k, v in recorder.weights[0].items()}
    for t, weights in enumerate(recorder.weights[1:], start=1):
        decay = min(0.999, 1 - (1 + t) ** (-2 / 3))
        for k, v in weights.items():
            avg[k] = decay * avg[k] + (1 - decay) * v if v.is_floating_point() else v.clone()
    assert_close(ema._bound().averaged_tensors(), avg, rtol=1e-5, atol=1e-6)


def test_averagers_log_updates_and_decay_to_the_loggers_at_lightnings_cadence(tmp_path: Path) -> None:
    """A real CSVLogger run: rows every log_every_n_steps optimizer steps, at Lightning's own step (optimizer steps
    before the batch), hold EMA's update count and warmed decay and SWA's number averaged, in closed form."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    ema = EMA(decay=0.9, name="ema", apply_at_end=False)  # power warmup: min(0.9, 1 - (1 + t) ** (-2 / 3))
    swa = SWA(start=2, start_unit="step", every_unit="step", name="swa", validate_with="live", apply_at_end=False)
    fit_loss([ema, swa], epochs=2, logger=CSVLogger(tmp_path, version=0), log_every_n_steps=3)
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    ema_rows = {int(r["step"]): r for r in rows if r.get("weightavg/ema/updates")}
    swa_rows = {int(r["step"]): r for r in rows if r.get("weightavg/swa/updates")}
    assert sorted(ema_rows) == sorted(swa_rows) == [2, 5, 8, 11, 14]  # optimizer steps 3, 6, ..., 15 of 16
    for row_step, row in ema_rows.items():
        step = row_step + 1
        assert float(row["weightavg/ema/updates"]) == step + 1  # the copy at binding, then one per step
        assert float(row["weightavg/ema/decay"]) == pytest.approx(min(0.9, 1 - (1 + step) ** (-2 / 3)), rel=1e-12)
        assert float(swa_rows[row_step]["weightavg/swa/updates"]) == step - 1  # steps 2..step


def evaluated_loss(model: torch.nn.Module) -> float:
    """The validation loss of ``model`` computed by hand (Lightning averages the two equal batches' means)."""
    _, val = digits_loaders()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(x), y) for x, y in val]
    return float(torch.stack(losses).mean())


def test_validate_with_both_logs_live_and_average_under_their_own_names(tmp_path: Path) -> None:
    import copy

    best = ModelCheckpoint(dirpath=tmp_path, monitor="weightavg/ema/val_loss", mode="min", save_top_k=1)
    ema = EMA(decay=0.9, warmup="none", name="ema", validate_with="both", apply_at_end=False)
    run, model = fit_loss([ema, best], epochs=2, enable_checkpointing=True)
    metrics = run.callback_metrics
    model.eval()
    averaged = copy.deepcopy(model)
    averaged.load_state_dict(ema._bound().averaged_tensors(), strict=False)
    live, average = evaluated_loss(model), evaluated_loss(averaged)
    assert live != pytest.approx(average)
    assert float(metrics["val_loss"]) == pytest.approx(live, rel=1e-6)
    assert float(metrics["weightavg/ema/val_loss"]) == pytest.approx(average, rel=1e-6)
    # Item 11 holds: the best checkpoint (ranked on the average) holds the average and scores what was recorded.
    torch.testing.assert_close(
        revalidated_loss(best.best_model_path), float(best.best_model_score), rtol=1e-6, atol=1e-7
    )
    with pytest.warns(
        UserWarning,
        match=r"monitor='val_loss'\) ranks by a metric measured on the live weights.*monitor 'weightavg/ema/val_loss'",
    ):
        both = EMA(decay=0.9, name="ema", validate_with="both")
        fit_loss([both, ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")], epochs=1, enable_checkpointing=True)


def test_early_stopping_on_the_prefixed_metric_at_validation_end_must_follow_the_callback() -> None:
    """After the callback it reads the average's metric (a threshold every loss meets stops after epoch 0 of 3);
    before it, it would run before the average's pass and find no metric: refused at fit start."""

    def stopper() -> EarlyStopping:
        return EarlyStopping("weightavg/ema/val_loss", stopping_threshold=1e9, check_on_train_epoch_end=False)

    after = stopper()
    run, _ = fit_loss([EMA(decay=0.9, name="ema", validate_with="both"), after], epochs=3)
    assert run.current_epoch == 1 and after.stopped_epoch == 0
    with pytest.raises(ValueError, match=r"EarlyStopping\(monitor='weightavg/ema/val_loss'\) checks at validation end"):
        fit_loss([stopper(), EMA(decay=0.9, name="ema", validate_with="both")], epochs=3)


SWEEP_SCRIPT = """
import sys, torch
from tests.helpers import DigitsModule, fit_digits
from weightavg.callbacks import LCSC, WiSEFT
from weightavg.methods.lcsc import SearchSettings
torch.set_num_threads(1)
search = SearchSettings(population=4, parents=2, children=2, generations=2)
callback = (
    WiSEFT(monitor="val_acc")
    if sys.argv[2] == "wiseft"
    else LCSC(every_n_steps=2, keep=3, monitor="val_acc", settings=search, directory=":memory:")
)
fit_digits(DigitsModule(), [callback], 1, enable_progress_bar=sys.argv[1] == "bar")
"""


def sweep_output(progress_bar: str, callback: str = "wiseft") -> str:
    """A WiSE-FT (or LCSC) fit in a child process whose stdout and stderr are a real terminal (a pseudo-terminal)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from tests.helpers import clean_environment

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new one is 0 columns wide
    child = subprocess.Popen(
        [sys.executable, "-c", SWEEP_SCRIPT, progress_bar, callback],
        stdout=follower,
        stderr=follower,
        cwd=Path(__file__).parents[2],
        env={**clean_environment(), "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert child.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_the_wiseft_sweep_shows_progress_with_the_trainers_progress_bar_only(capfd: pytest.CaptureFixture[str]) -> None:
    shown = sweep_output("bar")
    assert "WiSE-FT sweep: 100%" in shown and "11/11" in shown
    assert "WiSE-FT sweep" not in sweep_output("none")  # enable_progress_bar=False
    pl.seed_everything(0, verbose=False)
    fit_digits(DigitsModule(), [WiSEFT(monitor="val_acc")], 1, enable_progress_bar=True)
    assert "WiSE-FT sweep" not in capfd.readouterr().err  # not a terminal


def test_the_lcsc_search_shows_progress_with_the_trainers_progress_bar_only() -> None:
    shown = sweep_output("bar", "lcsc")
    assert "LCSC search: 100%" in shown, shown[-2000:]
    assert "LCSC search" not in sweep_output("none", "lcsc")
