"""WiSE-FT and ZSCL through the Lightning face (real ``Trainer`` runs) and the optimizer face, against references
written plainly: ``interpolate`` recomputed by hand in float64, the ZSCL ensemble loop of the paper, and
uninterrupted runs for resume."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.faces.test_callbacks import LiveAtEnd, Recorder, assert_close
from tests.helpers import DigitsModule, digits_loaders, digits_tensors, run_ddp_script, small_net, trainer
from weightavg import load_into_module
from weightavg.callbacks import EMA, LIVE_KEY, ZSCL, WiSEFT
from weightavg.optim import ZSCL as ZSCLOptimizer
from weightavg.optim import WiSEFT as WiSEFTOptimizer


def shifted_loader() -> DataLoader:
    """A second validation set: inverted digits (a shifted domain)."""
    x, y = digits_tensors()
    return DataLoader(TensorDataset(1.0 - x[1200:1456], y[1200:1456]), batch_size=128)


def blend_reference(
    theta_0: dict[str, torch.Tensor], theta_1: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    return {
        k: (1 - alpha) * theta_0[k].double() + alpha * theta_1[k].double() if v.is_floating_point() else v
        for k, v in theta_1.items()
    }


@torch.no_grad()
def accuracy_with(state: dict[str, torch.Tensor], loader: DataLoader) -> float:
    model = DigitsModule()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / total


def fit_wiseft(
    callbacks: list[pl.Callback], epochs: int = 2, ckpt_path: str | None = None, **kwargs: Any
) -> tuple[pl.Trainer, DigitsModule]:
    pl.seed_everything(0, verbose=False)
    model = DigitsModule()
    train, val = digits_loaders()
    run = trainer(max_epochs=epochs, callbacks=callbacks, **kwargs)
    run.fit(model, train, [val, shifted_loader()], ckpt_path=ckpt_path)
    return run, model


# ---------------------------------------------------------------------------------------------------------- WiSE-FT
@pytest.mark.parametrize("measure", ["monitor", "torchmetrics", "function"])
def test_wiseft_sweeps_every_alpha_on_every_loader_and_keeps_the_best(tmp_path: Path, measure: str) -> None:
    recorder, live = Recorder(), LiveAtEnd()
    options: dict[str, Any] = {
        "monitor": {"monitor": "val_acc"},
        "torchmetrics": {"metric": torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")},
        "function": {"metric": lambda out, y: (out.argmax(-1) == y).float().mean()},
    }[measure]
    wiseft = WiSEFT(
        alphas=(0.0, 0.25, 0.5, 0.75, 1.0),
        dataloader_names=["id", "shift"],
        select_on="id",
        export_path=tmp_path / "chosen.safetensors",
        figure_path=tmp_path / "curve.png",
        **options,
    )
    run, model = fit_wiseft([recorder, live, wiseft])
    theta_0, theta_1 = recorder.weights[0], live.state
    _, val = digits_loaders()
    loaders = {"id": val, "shift": shifted_loader()}
    for name, loader in loaders.items():
        expected = {a: accuracy_with(blend_reference(theta_0, theta_1, a), loader) for a in wiseft.alphas}
        for alpha, value in expected.items():
            assert wiseft.curves[name][alpha] == pytest.approx(value, abs=1e-6), (name, alpha)
    best = max(wiseft.curves["id"].values())
    assert wiseft.alpha == min(a for a, v in wiseft.curves["id"].items() if v == best)
    assert_close(model.state_dict(), blend_reference(theta_0, theta_1, wiseft.alpha), rtol=1e-6, atol=1e-6)
    exported = DigitsModule()
    load_into_module(exported, tmp_path / "chosen.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(value, exported.state_dict()[key]), key
    assert (tmp_path / "curve.png").stat().st_size > 0
    if measure == "monitor":  # what the trainer reports afterwards is the chosen alpha's validation
        reported = float(run.callback_metrics["val_acc/dataloader_idx_0"])
        assert reported == pytest.approx(wiseft.curves["id"][wiseft.alpha])


def test_wiseft_fixed_alpha_without_metric_and_without_apply() -> None:
    recorder, live = Recorder(), LiveAtEnd()
    fixed = WiSEFT(alpha=0.3)
    _, model = fit_wiseft([recorder, live, fixed])
    assert fixed.alpha == 0.3 and fixed.curves == {}
    assert_close(model.state_dict(), blend_reference(recorder.weights[0], live.state, 0.3), rtol=1e-6, atol=1e-6)
    assert WiSEFT().fixed_alpha == 0.5  # nothing to sweep with: the paper's untuned choice

    report_only = WiSEFT(monitor="val_acc", apply_at_end=False)
    live = LiveAtEnd()
    _, model = fit_wiseft([live, report_only])
    assert report_only.curves and report_only.alpha is not None
    for key, value in model.state_dict().items():
        assert torch.equal(value, live.state[key]), key


def test_wiseft_interpolates_toward_an_average_that_applies_first_and_validators_stay_out() -> None:
    recorder = Recorder()
    ema = EMA(decay=0.8, warmup="none")
    wiseft = WiSEFT(monitor="val_acc", alphas=(0.0, 0.5, 1.0))
    _, model = fit_wiseft([recorder, ema, wiseft])
    theta_1 = {k: v.double() for k, v in ema._bound().averaged_tensors().items()}
    theta_1.update({k: v for k, v in recorder.weights[-1].items() if k not in theta_1})
    _, val = digits_loaders()
    for alpha in wiseft.alphas:  # the EMA validator did not swap itself in during the sweep
        reference = accuracy_with(blend_reference(recorder.weights[0], theta_1, alpha), val)
        assert wiseft.curves["dataloader_0"][alpha] == pytest.approx(reference, abs=1e-6)
    assert_close(model.state_dict(), blend_reference(recorder.weights[0], theta_1, wiseft.alpha), rtol=1e-5, atol=1e-6)


def test_wiseft_anchor_from_a_file_and_bad_arguments(tmp_path: Path) -> None:
    pretrained = DigitsModule()
    torch.save({"state_dict": pretrained.state_dict()}, tmp_path / "pretrained.ckpt")
    live = LiveAtEnd()
    wiseft = WiSEFT(alpha=0.5, anchor=tmp_path / "pretrained.ckpt")
    _, model = fit_wiseft([live, wiseft])
    theta_0 = {k: v.double() for k, v in pretrained.state_dict().items()}
    assert_close(model.state_dict(), blend_reference(theta_0, live.state, 0.5), rtol=1e-6, atol=1e-6)

    with pytest.raises(ValueError, match="select_on='ood'"):
        WiSEFT(monitor="val_acc", select_on="ood", dataloader_names=["id"])
    with pytest.raises(ValueError, match="mode='best'"):
        WiSEFT(monitor="val_acc", mode="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        WiSEFT(monitor="val_acc", metric=lambda o, y: 0.0)
    with pytest.raises(ValueError, match="alphas"):
        WiSEFT(alphas=())
    with pytest.raises(ValueError, match="monitor='missing'"):
        fit_wiseft([WiSEFT(monitor="missing")], epochs=1)
    with pytest.raises(ValueError, match="anchor"):
        fit_wiseft([WiSEFT(alpha=0.5, anchor={"net.0.weight": torch.zeros(32, 64)})], epochs=1)


def test_wiseft_resumed_fine_tuning_keeps_the_original_anchor(tmp_path: Path) -> None:
    full = WiSEFT(monitor="val_acc", alphas=(0.0, 0.5, 1.0))
    _, model_a = fit_wiseft([full], epochs=3)
    fit_wiseft(
        [WiSEFT(monitor="val_acc", alphas=(0.0, 0.5, 1.0)), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        epochs=1,
        enable_checkpointing=True,
    )
    resumed = WiSEFT(monitor="val_acc", alphas=(0.0, 0.5, 1.0))
    _, model_b = fit_wiseft([resumed], epochs=3, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.curves == full.curves and resumed.alpha == full.alpha
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key


def test_checkpoint_after_wiseft_holds_the_live_weights(tmp_path: Path) -> None:
    live = LiveAtEnd()
    run, model = fit_wiseft([live, WiSEFT(alpha=0.5)])
    run.save_checkpoint(tmp_path / "after.ckpt")
    checkpoint = torch.load(tmp_path / "after.ckpt", weights_only=False)
    for key, value in live.state.items():
        assert torch.equal(checkpoint[LIVE_KEY][key], value), key
        assert torch.equal(checkpoint["state_dict"][key], model.state_dict()[key]), key


# ------------------------------------------------------------------------------------------------------------- ZSCL
def zscl_reference(sequence: list[dict[str, torch.Tensor]], every: int) -> dict[str, torch.Tensor]:
    """The paper's loop: copy at the task's start; after step i (from 0), if i % I == 0: n += 1 and
    theta_hat = (n * theta_hat + theta) / (n + 1). ``sequence[0]`` is the start, ``sequence[i + 1]`` after step i."""
    theta_hat = {k: v.clone() for k, v in sequence[0].items()}
    n = 0
    for i, theta in enumerate(sequence[1:]):
        if i % every == 0:
            n += 1
            # Integer buffers (the recorder holds them as float64 too) take the live value.
            theta_hat = {
                k: v.clone() if k.endswith("num_batches_tracked") else (n * theta_hat[k] + v) / (n + 1)
                for k, v in theta.items()
            }
    return theta_hat


class Distilling(DigitsModule):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + ZSCL.distillation_loss(self)


def reference_loader() -> DataLoader:
    x, _ = digits_tensors()
    return DataLoader(TensorDataset(x[1500:1700]), batch_size=40)


def task_loaders(task: int) -> tuple[DataLoader, DataLoader]:
    """Task 0: the digits; task 1: the same digits inverted (a shifted domain)."""
    x, y = digits_tensors()
    if task:
        x = 1.0 - x
    return DataLoader(TensorDataset(x[:512], y[:512]), batch_size=64), DataLoader(
        TensorDataset(x[512:768], y[512:768]), 128
    )


def run_tasks(
    zscl: ZSCL,
    epochs: list[int],
    model: DigitsModule | None = None,
    extra: list[pl.Callback] | None = None,
    ckpt_path: str | None = None,
    first_task: int = 0,
    **kwargs: Any,
) -> DigitsModule:
    model = model or Distilling()
    for task, count in enumerate(epochs, start=first_task):
        train, val = task_loaders(task)
        run = trainer(max_epochs=count, callbacks=[*(extra or []), zscl], **kwargs)
        run.fit(model, train, val, ckpt_path=ckpt_path if task == first_task else None)
    return model


def test_zscl_ensemble_matches_the_paper_across_two_tasks() -> None:
    pl.seed_everything(0, verbose=False)
    recorders = [Recorder(), Recorder()]
    zscl = ZSCL(every_n_steps=3)
    model = Distilling()
    for task, recorder in enumerate(recorders):
        train, val = task_loaders(task)
        trainer(max_epochs=2, callbacks=[recorder, zscl]).fit(model, train, val)
        ensemble = zscl_reference(recorder.weights, 3)
        assert_close(zscl._bound().averaged_tensors(), ensemble, rtol=1e-5, atol=1e-6)
        assert_close(model.state_dict(), ensemble, rtol=1e-5, atol=1e-6)  # the task ends with the ensemble
    # The second task started from the first task's ensemble.
    first_ensemble = zscl_reference(recorders[0].weights, 3)
    assert_close(recorders[1].weights[0], first_ensemble, rtol=1e-5, atol=1e-6)


def test_zscl_distillation_teacher_is_the_original_model_across_tasks() -> None:
    pl.seed_everything(0, verbose=False)
    model = Distilling()
    original = copy.deepcopy(model)
    zscl = ZSCL(every_n_steps=2, reference=reference_loader(), distill_weight=2.0)
    run_tasks(zscl, [1, 1], model=model)
    assert zscl.distillation is not None
    x = digits_tensors()[0][:16]
    original.eval()
    torch.testing.assert_close(zscl.distillation.teacher_outputs(x), original(x).detach())
    assert not torch.allclose(model(x), original(x))
    assert zscl.distillation.consumed == 2 * 8  # one reference batch per training step


class CheckingKD(DigitsModule):
    """Records, inside training_step, the distillation loss next to the rule written plainly: weight * T^2 * mean CE
    between the ORIGINAL model (a copy taken before fit, eval mode) and the current one on the next reference batch."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[tuple[float, float]] = []
        self.original: list[nn.Module] = []  # in a list: not a submodule

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        kd = ZSCL.distillation_loss(self)
        references = [b[0] for b in reference_loader()]
        inputs = references[batch_idx % len(references)]
        teacher = self.original[0].eval()
        with torch.no_grad():
            target = torch.softmax(teacher(inputs) / 2.0, dim=-1)
        plain = -(target * torch.log_softmax(self(inputs) / 2.0, dim=-1)).sum(-1).mean() * 4.0
        self.pairs.append((float(kd), 3.0 * float(plain)))
        return super().training_step(batch, batch_idx) + kd


def test_zscl_distillation_loss_in_training_step_is_the_plain_rule() -> None:
    pl.seed_everything(0, verbose=False)
    model = CheckingKD()
    model.original.append(copy.deepcopy(model))
    zscl = ZSCL(every_n_steps=5, reference=reference_loader(), distill_weight=3.0)
    trainer(max_steps=5, callbacks=[zscl]).fit(model, *task_loaders(0))
    assert len(model.pairs) == 5
    for got, expected in model.pairs:
        assert got == pytest.approx(expected, rel=1e-5)
    assert model.pairs[0][0] > 0


def test_distillation_loss_is_zero_without_a_distilling_zscl() -> None:
    model = Distilling()
    trainer(max_steps=1, callbacks=[ZSCL(every_n_steps=1)]).fit(model, *task_loaders(0))
    assert float(ZSCL.distillation_loss(model)) == 0.0


@pytest.mark.parametrize("resume_task", [0, 1])
def test_zscl_resumed_mid_task_equals_an_uninterrupted_run(tmp_path: Path, resume_task: int) -> None:
    def callback() -> ZSCL:
        return ZSCL(every_n_steps=3, reference=reference_loader(), name="zscl")

    pl.seed_everything(0, verbose=False)
    full = callback()
    live_a = LiveAtEnd()
    model_a = run_tasks(full, [2, 3], extra=[live_a])

    pl.seed_everything(0, verbose=False)
    interrupted = callback()
    model = Distilling()
    if resume_task == 1:
        run_tasks(interrupted, [2], model=model)
    train, val = task_loaders(resume_task)
    epochs = 2 if resume_task == 0 else 3
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, callbacks=[interrupted, checkpoint], enable_checkpointing=True).fit(model, train, val)

    # A new process: a fresh module and callback; the teacher and ensemble come from the checkpoint.
    resumed = callback()
    live_b = LiveAtEnd()
    model_b = run_tasks(
        resumed,
        [epochs] + ([3] if resume_task == 0 else []),
        model=Distilling(),
        extra=[live_b],
        ckpt_path=str(tmp_path / "last.ckpt"),
        first_task=resume_task,
    )
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), f"final {key} differs"
    for key, value in live_a.state.items():
        assert torch.equal(value, live_b.state[key]), f"live {key} differs"
    assert full.distillation is not None and resumed.distillation is not None
    for key, value in full.distillation._teacher()[0].averaged_tensors().items():
        assert torch.equal(value, resumed.distillation._teacher()[0].averaged_tensors()[key]), f"teacher {key}"


# ------------------------------------------------------------------------------------------------- optimizer faces
def test_wiseft_optimizer_interpolates_sweeps_applies_and_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_net()
    theta_0 = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    opt = WiSEFTOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), module=model)
    x, y = digits_tensors()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
        opt.step()
    theta_1 = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    with opt.interpolated(0.3):
        assert_close(model.state_dict(), blend_reference(theta_0, theta_1, 0.3), rtol=1e-6, atol=1e-7)
        with pytest.raises(RuntimeError, match="step"):
            opt.step()
    assert_close(model.state_dict(), theta_1, rtol=0, atol=0)
    curve = opt.sweep(lambda: float(model[0].weight.sum()), alphas=(0.0, 1.0))
    assert curve[0.0] == pytest.approx(float(theta_0["0.weight"].sum()), rel=1e-5)
    opt.save_interpolated(tmp_path / "a.safetensors", 0.6)
    exported = small_net()
    load_into_module(exported, tmp_path / "a.safetensors")
    assert_close(exported.state_dict(), blend_reference(theta_0, theta_1, 0.6), rtol=1e-6, atol=1e-7)
    weight = model[0].weight
    opt.apply(0.6)
    assert model[0].weight is weight
    assert_close(model.state_dict(), blend_reference(theta_0, theta_1, 0.6), rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="module"):
        WiSEFTOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), module=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"anchor \(a dict\) does not match .*missing keys"):
        WiSEFTOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), module=model, anchor={"0.weight": torch.zeros(1)})


def loop(
    opt: torch.optim.Optimizer, model: nn.Module, steps: int, start: int, distill: Any = None
) -> list[dict[str, torch.Tensor]]:
    x, y = digits_tensors()
    seen = []
    for step in range(start, start + steps):
        opt.zero_grad()
        i = (step * 32) % 480
        loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
        if distill is not None:
            loss = loss + distill()
        loss.backward()
        opt.step()
        seen.append({k: v.detach().double().clone() for k, v in model.state_dict().items()})
    return seen


def test_zscl_optimizer_tasks_match_the_paper() -> None:
    torch.manual_seed(0)
    model = small_net()
    opt = ZSCLOptimizer(torch.optim.SGD(model.parameters(), lr=0.2), every_n_steps=4, module=model)
    start = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    seen = loop(opt, model, 10, 0)
    with opt.averaged():
        assert_close(model.state_dict(), zscl_reference([start, *seen], 4), rtol=1e-5, atol=1e-6)
    opt.start_task()  # ends the first task: the model takes its ensemble
    assert opt.task == 1
    start_2 = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    assert_close(start_2, zscl_reference([start, *seen], 4), rtol=1e-5, atol=1e-6)
    seen_2 = loop(opt, model, 7, 10)
    opt.end_task()
    assert_close(model.state_dict(), zscl_reference([start_2, *seen_2], 4), rtol=1e-5, atol=1e-6)
    opt.start_task()
    seen_3 = loop(opt, model, 3, 17)
    opt.end_task(apply=False)  # an ablation that carries the live weights on
    assert_close(model.state_dict(), seen_3[-1], rtol=0, atol=0)


def test_zscl_optimizer_resumes_mid_task_with_distillation() -> None:
    def build(model: nn.Module) -> ZSCLOptimizer:
        teacher = {k: v.clone() for k, v in original.items()}
        return ZSCLOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
            every_n_steps=3,
            module=model,
            reference=reference_loader(),
            distill_weight=0.5,
            teacher=teacher,
        )

    torch.manual_seed(0)
    model_a = small_net()
    original = copy.deepcopy(model_a.state_dict())
    model_b = copy.deepcopy(model_a)
    opt_a = build(model_a)
    loop(opt_a, model_a, 12, 0, opt_a.distillation_loss)

    opt_b = build(model_b)
    loop(opt_b, model_b, 5, 0, opt_b.distillation_loss)
    state = copy.deepcopy({"model": model_b.state_dict(), "opt": opt_b.state_dict()})
    model_c = small_net()
    model_c.load_state_dict(state["model"])
    opt_c = build(model_c)
    opt_c.load_state_dict(state["opt"])
    loop(opt_c, model_c, 7, 5, opt_c.distillation_loss)
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_c.state_dict()[key]), key
    for key, value in opt_a.averager.averaged_tensors().items():
        assert torch.equal(value, opt_c.averager.averaged_tensors()[key]), key
    with pytest.raises(ValueError, match="module="):
        ZSCLOptimizer(torch.optim.SGD(model_a.parameters(), lr=0.1), reference=reference_loader())
    with pytest.raises(RuntimeError, match="reference="):
        ZSCLOptimizer(torch.optim.SGD(model_a.parameters(), lr=0.1), module=model_a).distillation_loss()


def test_ddp_two_gloo_processes_zscl_then_wiseft(tmp_path: Path) -> None:
    assert "DDP ANCHORED OK" in run_ddp_script(tmp_path, "anchored")


# ------------------------------------------------------------------------------------ review findings, kept fixed
class WaitCount(pl.Callback):
    """Records EarlyStopping's state when training ends, before WiSEFT's sweep (put it before WiSEFT)."""

    def __init__(self, early: pl.Callback) -> None:
        self.early = early
        self.state: dict[str, Any] = {}

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.state = dict(self.early.state_dict())


def test_the_sweep_neither_checkpoints_nor_moves_early_stopping(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import EarlyStopping

    early = EarlyStopping(monitor="val_acc/dataloader_idx_0", mode="max", patience=10)
    seen = WaitCount(early)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_acc/dataloader_idx_0", mode="max", save_top_k=5)
    wiseft = WiSEFT(monitor="val_acc", alphas=(0.0, 0.5, 1.0))
    fit_wiseft(
        [early, seen, wiseft, checkpoint],
        epochs=3,
        enable_checkpointing=True,
        check_val_every_n_epoch=2,
        enable_progress_bar=True,
    )  # the progress bar follows the sweep's runs too
    saved = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert saved == ["epoch=1-step=16.ckpt"], saved  # the only real validation; none from the sweep
    assert early.state_dict() == seen.state


def test_wiseft_before_an_applying_average_is_refused_and_evaluation_after_fit_sees_the_final_model() -> None:
    with pytest.raises(ValueError, match=r"WiSEFT comes before EMA\(decay=0.9\)"):
        fit_wiseft([WiSEFT(alpha=0.5), EMA(decay=0.9)], epochs=1)

    from tests.faces.test_callbacks import ValidationWeights

    seen = ValidationWeights()
    run, model = fit_wiseft([EMA(decay=0.9, warmup="none", apply_at_end=False), WiSEFT(alpha=0.5), seen], epochs=1)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    _, val = digits_loaders()
    run.validate(model, val)
    for key, value in seen.seen[-1].items():
        assert torch.equal(value, final[key]), key  # not the EMA average: the model as fit left it


def test_wiseft_configuration_errors_surface_before_training() -> None:
    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders()
    cases: list[tuple[WiSEFT, Any, str]] = [
        (WiSEFT(monitor="val_acc"), None, "has none"),
        (WiSEFT(monitor="val_acc", dataloader_names=["a", "b"]), val, "names 2 dataloaders"),
        (WiSEFT(monitor="val_acc", select_on=3), val, "select_on=3"),
    ]
    for callback, loaders, message in cases:
        run = trainer(max_epochs=3, callbacks=[callback])
        with pytest.raises(ValueError, match=message):
            run.fit(DigitsModule(), train, loaders)
        assert run.global_step == 0, message
    run = trainer(max_epochs=3, callbacks=[WiSEFT(monitor="val_accuracy")])
    with pytest.raises(ValueError, match="monitor='val_accuracy' is not logged"):
        run.fit(DigitsModule(), train, val)
    assert run.global_step == 8  # after the first epoch's validation, not after the whole run

    with pytest.raises(TypeError, match="dataloader_names='id'"):
        WiSEFT(monitor="val_acc", dataloader_names="id")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="select_on=-1"):
        WiSEFT(monitor="val_acc", select_on=-1)
    with pytest.raises(FileNotFoundError, match=r"anchor='missing\.safetensors'"):
        WiSEFT(alpha=0.5, anchor="missing.safetensors")
    with pytest.raises(ValueError, match="figure_path"):
        WiSEFT(alpha=0.5, figure_path="curve.png")


class HookedDistilling(Distilling):
    """A batch-transfer hook written for labelled training batches, as users write them."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return x * 1.0, y


def test_zscl_reference_batches_skip_the_modules_transfer_hooks() -> None:
    model = HookedDistilling()
    zscl = ZSCL(every_n_steps=2, reference=reference_loader())
    trainer(max_steps=3, callbacks=[zscl]).fit(model, *task_loaders(0))
    assert zscl.distillation is not None and zscl.distillation.consumed == 3


def test_distillation_loss_is_zero_outside_training() -> None:
    class SharedStep(Distilling):
        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            self.log("val_kd", ZSCL.distillation_loss(self))

    model = SharedStep()
    zscl = ZSCL(every_n_steps=2, reference=reference_loader())
    trainer(max_epochs=1, callbacks=[zscl], num_sanity_val_steps=2).fit(model, *task_loaders(0))
    assert zscl.distillation is not None and zscl.distillation.consumed == 8  # training steps only
    assert float(ZSCL.distillation_loss(Distilling())) == 0.0  # no Trainer at all


def test_optimizer_contexts_survive_a_permanent_change_inside_them() -> None:
    torch.manual_seed(0)
    model = small_net()
    theta_0 = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    opt = WiSEFTOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), module=model)
    x, y = digits_tensors()
    nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
    opt.step()
    theta_1 = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    with opt.interpolated(0.4):
        opt.apply(0.4)
    assert not opt.averager.is_swapped
    assert_close(model.state_dict(), blend_reference(theta_0, theta_1, 0.4), rtol=1e-6, atol=1e-7)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
    opt.step()  # training goes on from the applied weights

    zscl = ZSCLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), module=model)
    with zscl.averaged():
        zscl.copy_to_model()
    assert not zscl.averager.is_swapped
    zscl.end_task()
    with pytest.raises(RuntimeError, match="start_task"):
        zscl.step()
