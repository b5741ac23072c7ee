"""The Lightning face, tested with real ``Trainer`` runs on the digits data against independent references."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from tests.helpers import DigitsModule, digits_loaders, fit_digits, run_ddp_script, trainer
from weightavg import load_into_module
from weightavg.callbacks import EMA, LIVE_KEY, SWA, AveragingCallback


class Recorder(pl.Callback):
    """Records the live weights (float64) at fit start and after every optimizer step; put it before averagers."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.epoch_end_steps: list[int] = []

    def _record(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.steps.append(trainer.global_step)
        self.weights.append({k: v.detach().double().clone() for k, v in module.state_dict().items()})

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._record(trainer, module)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.steps[-1]:
            self._record(trainer, module)

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.epoch_end_steps.append(trainer.global_step)


class LiveAtEnd(pl.Callback):
    """Copies the live weights at the end of fit, before an averager applies its average (put it first)."""

    state: dict[str, torch.Tensor]

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}


class ValidationWeights(pl.Callback):
    """Records the weights the model holds during each validation (put it after the averagers)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.seen.append({k: v.detach().clone() for k, v in module.state_dict().items()})


def ema_reference(recorder: Recorder, decay: float) -> dict[str, torch.Tensor]:
    """The EMA rule written plainly in float64: copy at fit start, then avg = d*avg + (1-d)*live per step."""
    avg = {k: v.clone() for k, v in recorder.weights[0].items()}
    for weights in recorder.weights[1:]:
        for k, v in weights.items():
            if v.is_floating_point():
                avg[k] = decay * avg[k] + (1 - decay) * v
            else:
                avg[k] = v.clone()
    return avg


def swa_reference(recorder: Recorder, sample_steps: list[int]) -> dict[str, torch.Tensor]:
    """Plain mean of the live weights at the given optimizer steps."""
    samples = [w for s, w in zip(recorder.steps, recorder.weights, strict=False) if s in sample_steps]
    assert len(samples) == len(sample_steps)
    return {k: torch.stack([s[k] for s in samples]).mean(0) for k in samples[0] if samples[0][k].is_floating_point()}


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], **tol: Any) -> None:
    assert actual, "nothing to compare"
    for name, value in actual.items():
        if name in expected and value.is_floating_point():
            torch.testing.assert_close(
                value.double(), expected[name].double(), **tol, msg=lambda m, n=name: f"{n}: {m}"
            )


def fit(
    callbacks: list[pl.Callback], epochs: int = 3, seed: int = 0, ckpt_path: str | None = None, **trainer_kwargs: Any
) -> tuple[pl.Trainer, DigitsModule]:
    pl.seed_everything(seed, verbose=False)
    model = DigitsModule()
    return fit_digits(model, callbacks, epochs, ckpt_path=ckpt_path, **trainer_kwargs), model


def test_several_averagers_match_references_and_keep_separate_state(tmp_path: Path) -> None:
    recorder, live = Recorder(), LiveAtEnd()
    fast, slow, swa = EMA(decay=0.9, warmup="none"), EMA(decay=0.99, warmup="none"), SWA(start=0.5, every_unit="epoch")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _run, model = fit([live, recorder, fast, slow, swa, checkpoint], epochs=4, enable_checkpointing=True)

    assert_close(fast._bound().averaged_tensors(), ema_reference(recorder, 0.9), rtol=1e-5, atol=1e-6)
    assert_close(slow._bound().averaged_tensors(), ema_reference(recorder, 0.99), rtol=1e-5, atol=1e-6)
    # SWA from half of the 32 steps, sampled at the end of epochs 2, 3 and 4 (steps 16, 24, 32). BatchNorm
    # statistics were recomputed at the end, so compare the parameters only.
    swa_expected = swa_reference(recorder, recorder.epoch_end_steps[1:])
    params = {k: v for k, v in swa._bound().averaged_tensors().items() if "running" not in k}
    assert_close(params, swa_expected, rtol=1e-5, atol=1e-6)

    # The first averager owns the model: it ends with that average; live weights were different.
    for name, value in fast._bound().averaged_tensors().items():
        torch.testing.assert_close(model.state_dict()[name], value.to(model.state_dict()[name].dtype))
    assert not torch.equal(live.state["net.0.weight"], model.state_dict()["net.0.weight"])

    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert {fast.state_key, slow.state_key, swa.state_key} <= set(saved["callbacks"])
    assert len({fast.state_key, slow.state_key, swa.state_key}) == 3


def test_validation_uses_the_average_and_live_weights_before_the_first_update() -> None:
    seen = ValidationWeights()
    recorder = Recorder()
    # start_step beyond the first epoch: the first validation must see live weights, later ones the average.
    ema = EMA(decay=0.9, warmup="none", start_step=10, apply_at_end=False)
    fit([recorder, ema, seen], epochs=2)
    first_epoch_end = recorder.weights[recorder.steps.index(8)]
    assert_close(seen.seen[0], first_epoch_end, rtol=0, atol=0)
    averaged = ema._bound().averaged_tensors()
    # The second validation ran at step 16 with the average of steps 10..16; the average was only updated by then.
    assert not torch.equal(seen.seen[1]["net.0.weight"], recorder.weights[-1]["net.0.weight"].float())
    torch.testing.assert_close(seen.seen[1]["net.0.weight"], averaged["net.0.weight"])


def test_validate_with_live_and_apply_at_end_off() -> None:
    seen, recorder = ValidationWeights(), Recorder()
    ema = EMA(decay=0.9, warmup="none", validate_with="live", apply_at_end=False)
    _, model = fit([recorder, ema, seen], epochs=1)
    assert_close(seen.seen[0], recorder.weights[-1], rtol=0, atol=0)
    assert_close(model.state_dict(), recorder.weights[-1], rtol=0, atol=0)


def _resume_pair(tmp_path: Path, make_callbacks: Any, saver: pl.Callback | None = None, **kwargs: Any) -> None:
    """Uninterrupted 4 epochs versus 2 epochs, a checkpoint, and a resumed run to 4: bit-identical weights."""
    live_a = LiveAtEnd()
    full = make_callbacks()
    _, model_a = fit([live_a, *full], epochs=4, **kwargs)

    first = make_callbacks()
    # A saver must run before the averagers' hooks; a ModelCheckpoint is moved last by Lightning anyway.
    first = [saver, *first] if saver is not None else [*first, ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    fit(first, epochs=2, enable_checkpointing=True, **kwargs)
    ckpt = str(tmp_path / "last.ckpt")
    live_b = LiveAtEnd()
    resumed = make_callbacks()
    _, model_b = fit([live_b, *resumed], epochs=4, ckpt_path=ckpt, **kwargs)

    for key in live_a.state:
        assert torch.equal(live_a.state[key], live_b.state[key]), f"live {key} differs after resume"
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), f"final (averaged) {key} differs after resume"
    for cb_a, cb_b in zip(full, resumed, strict=False):
        for key, value in cb_a._bound().averaged_tensors().items():
            assert torch.equal(value, cb_b._bound().averaged_tensors()[key]), f"{cb_a.name} {key} differs"
        assert cb_a._bound().num_updates == cb_b._bound().num_updates


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    _resume_pair(tmp_path, lambda: [EMA(decay=0.95), SWA(start=1, start_unit="epoch", every=4, every_unit="step")])


class SaveWhileSwapped(pl.Callback):
    """Writes last.ckpt during validation, before the averager swaps the live weights back (put it first)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            assert any(isinstance(cb, AveragingCallback) and cb._swapped_for_validation for cb in trainer.callbacks)
            trainer.save_checkpoint(self.path / "last.ckpt")


def test_resume_from_checkpoint_written_while_swapped(tmp_path: Path) -> None:
    _resume_pair(tmp_path, lambda: [EMA(decay=0.95, warmup="none")], saver=SaveWhileSwapped(tmp_path))


def test_checkpoint_state_dict_holds_the_average(tmp_path: Path) -> None:
    ema = EMA(decay=0.9, warmup="none")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    live = LiveAtEnd()
    fit([live, ema, checkpoint], epochs=2, enable_checkpointing=True)
    loaded = DigitsModule.load_from_checkpoint(tmp_path / "last.ckpt")
    for name, value in ema._bound().averaged_tensors().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    live_saved = saved[LIVE_KEY]
    for name, value in live_saved.items():
        assert torch.equal(value, live.state[name])


def test_gradient_accumulation_counts_optimizer_steps() -> None:
    recorder = Recorder()
    ema = EMA(decay=0.9, warmup="none")
    fit([recorder, ema], epochs=2, accumulate_grad_batches=3)
    # 8 batches per epoch -> 3 optimizer steps per epoch (the last one flushes a partial accumulation).
    assert recorder.steps[-1] == 6
    assert ema._bound().num_updates == 1 + 6
    assert_close(ema._bound().averaged_tensors(), ema_reference(recorder, 0.9), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_precisions(precision: str) -> None:
    recorder = Recorder()
    ema = EMA(decay=0.9, warmup="none", apply_at_end=False)
    _, model = fit([recorder, ema], epochs=1, precision=precision)
    averaged = ema._bound().averaged_tensors()
    assert averaged["net.0.weight"].dtype == torch.float32
    assert model.net[0].weight.dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    tol = {"rtol": 1e-5, "atol": 1e-6}
    assert_close(averaged, ema_reference(recorder, 0.9), **tol)


def test_export_path_writes_the_average(tmp_path: Path) -> None:
    path = tmp_path / "ema.safetensors"
    ema = EMA(decay=0.9, warmup="none", export_path=str(path))
    _, model = fit([ema], epochs=1)
    fresh = DigitsModule()
    load_into_module(fresh, path)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value)


def assert_statistics_recomputed(swa: SWA, model: DigitsModule) -> None:
    """Independent reference: a copy of the model holding the averaged parameters, statistics from torch's update_bn
    over one epoch of the training loader."""
    averaged = swa._bound().averaged_tensors()
    reference = DigitsModule()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param.copy_(averaged[name])
    train, _ = digits_loaders()
    torch.optim.swa_utils.update_bn(train, reference)
    for name in ("net.1.running_mean", "net.1.running_var"):
        torch.testing.assert_close(averaged[name], reference.state_dict()[name])


def test_swa_recomputes_batchnorm_statistics_on_the_average() -> None:
    swa = SWA(start=0.5, apply_at_end=False)
    _, model = fit([swa], epochs=2)
    assert_statistics_recomputed(swa, model)


@pytest.mark.parametrize("bounded", ["max_epochs", "max_steps"])
def test_swa_recomputes_batchnorm_statistics_whether_epochs_or_steps_bound_the_run(bounded: str) -> None:
    """A run bounded by ``max_steps`` alone loads its training data only after fit starts; the recompute (one epoch
    of it, 8 batches) is still possible and equals torch's ``update_bn`` over the loader."""
    swa = SWA(start=0.0, every_unit="step", apply_at_end=False)
    if bounded == "max_epochs":
        _, model = fit([swa], epochs=1)
    else:
        pl.seed_everything(0, verbose=False)
        model = DigitsModule()
        trainer(max_steps=12, callbacks=[swa]).fit(model, *digits_loaders())
    assert_statistics_recomputed(swa, model)


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"decay=1\.5.*\[0, 1\)"):
        EMA(decay=1.5, warmup="none")
    with pytest.raises(ValueError, match="validate_with='averaged'"):
        EMA(decay=0.9, warmup="none", validate_with="averaged")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_n_steps=0"):
        EMA(every_n_steps=0)
    with pytest.raises(ValueError, match="start=-1"):
        SWA(start=-1, start_unit="step")
    with pytest.raises(RuntimeError, match="state_key"):
        fit([EMA(decay=0.9), EMA(decay=0.9)], epochs=1)
    fit([EMA(decay=0.9), EMA(decay=0.9, name="twin")], epochs=1)  # distinct names coexist


def test_resume_with_changed_arguments_continues_from_live_weights(tmp_path: Path) -> None:
    """A renamed averager finds no state of its own, but training must still continue from the live weights."""
    live = LiveAtEnd()
    fit([live, EMA(decay=0.9), ModelCheckpoint(dirpath=tmp_path, save_last=True)], epochs=1, enable_checkpointing=True)
    started = Recorder()
    with pytest.warns(UserWarning, match=r"no state for weightavg\[EMA\(decay=0.8\)\]"):
        fit([started, EMA(decay=0.8)], epochs=2, ckpt_path=str(tmp_path / "last.ckpt"))
    for name, value in live.state.items():
        assert torch.equal(started.weights[0][name].to(value.dtype), value), name


@pytest.mark.slow
def test_ddp_two_gloo_processes(tmp_path: Path) -> None:
    assert "DDP OK" in run_ddp_script(tmp_path)


def test_resume_from_swapped_checkpoint_without_an_owner(tmp_path: Path) -> None:
    """No averager puts its average in the model, yet a checkpoint written mid-validation holds the swapped average:
    the live weights saved beside it must make the resume exact."""
    _resume_pair(tmp_path, lambda: [EMA(decay=0.95, apply_at_end=False)], saver=SaveWhileSwapped(tmp_path))


def test_checkpoint_saved_after_fit_resumes_exactly(tmp_path: Path) -> None:
    live_a = LiveAtEnd()
    fit([live_a, EMA(decay=0.95, warmup="none")], epochs=4)
    first, _ = fit([EMA(decay=0.95, warmup="none")], epochs=2)
    first.save_checkpoint(tmp_path / "after.ckpt")  # the model holds the average now
    live_b = LiveAtEnd()
    fit([live_b, EMA(decay=0.95, warmup="none")], epochs=4, ckpt_path=str(tmp_path / "after.ckpt"))
    for key, value in live_a.state.items():
        assert torch.equal(value, live_b.state[key]), key


class SeenAtTest(pl.Callback):
    def __init__(self) -> None:
        self.seen: dict[str, torch.Tensor] = {}

    def on_test_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.seen = {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_test_and_validate_from_a_checkpoint_use_the_average(tmp_path: Path) -> None:
    ema = EMA(decay=0.9, warmup="none")
    fit([ema, ModelCheckpoint(dirpath=tmp_path, save_last=True)], epochs=2, enable_checkpointing=True)
    averaged = ema._bound().averaged_tensors()
    model = DigitsModule()
    seen = SeenAtTest()
    _, val = digits_loaders()
    trainer(callbacks=[EMA(decay=0.9, warmup="none"), seen]).test(model, val, ckpt_path=str(tmp_path / "last.ckpt"))
    for name, value in averaged.items():
        torch.testing.assert_close(seen.seen[name], value)


def test_test_after_fit_without_apply_uses_the_average() -> None:
    ema, seen = EMA(decay=0.9, warmup="none", apply_at_end=False), SeenAtTest()
    run, model = fit([ema, seen], epochs=1)
    _, val = digits_loaders()
    run.test(model, val)
    for name, value in ema._bound().averaged_tensors().items():
        torch.testing.assert_close(seen.seen[name], value)
    assert not ema._bound().is_swapped


class EpochEndProbe(DigitsModule):
    """Records the weights its own on_validation_epoch_end sees, and can fail in validation."""

    def __init__(self, fail_at_epoch: int | None = None) -> None:
        super().__init__()
        self.fail_at_epoch = fail_at_epoch
        self.at_epoch_end: list[torch.Tensor] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.current_epoch == self.fail_at_epoch:
            raise RuntimeError("interrupted during validation")
        super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self.at_epoch_end.append(self.net[0].weight.detach().clone())


def test_module_hooks_see_the_validated_weights_and_interruptions_restore_live() -> None:
    pl.seed_everything(0, verbose=False)
    model, ema = EpochEndProbe(), EMA(decay=0.9, warmup="none", apply_at_end=False)
    seen = ValidationWeights()
    train, val = digits_loaders()
    trainer(max_epochs=1, callbacks=[ema, seen]).fit(model, train, val)
    torch.testing.assert_close(model.at_epoch_end[0], seen.seen[0]["net.0.weight"])

    pl.seed_everything(0, verbose=False)
    model, ema = EpochEndProbe(fail_at_epoch=1), EMA(decay=0.9, warmup="none", apply_at_end=False)
    live = Recorder()
    with pytest.raises(RuntimeError, match="interrupted during validation"):
        trainer(max_epochs=3, callbacks=[live, ema]).fit(model, train, val)
    assert not ema._bound().is_swapped
    assert torch.equal(model.net[0].weight.detach().double(), live.weights[-1]["net.0.weight"])


def test_swa_refuses_a_batchnorm_recompute_it_cannot_do_before_training() -> None:
    recorder = Recorder()
    with pytest.raises(ValueError, match="recomputing BatchNorm statistics needs them in the average"):
        fit([recorder, SWA(start=0.5, exclude="*running_var")], epochs=2)
    assert recorder.steps == [0]  # refused at fit start, not after training


def test_swa_warns_when_its_average_is_a_single_sample() -> None:
    """Per-epoch samples in a run of one epoch (max_steps over one pass): the 'average' is one set of weights."""
    swa = SWA(start=0.5, apply_at_end=False)
    with pytest.warns(
        UserWarning, match=r"SWA.* averaged a single sample \(every=1, every_unit='epoch', in \d+ optimizer steps\)"
    ):
        fit([swa], epochs=1)
    assert swa._bound().num_updates == 1
    per_step = SWA(start=0.5, every_unit="step", apply_at_end=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*single sample")
        fit([per_step], epochs=1)
    assert per_step._bound().num_updates > 1


def test_contiguous_layout_in_a_trainer() -> None:
    recorder, ema = Recorder(), EMA(decay=0.9, warmup="none", contiguous=True, apply_at_end=False)
    fit([recorder, ema], epochs=2)
    assert any(group.flat is not None for group in ema._bound()._groups)
    assert_close(ema._bound().averaged_tensors(), ema_reference(recorder, 0.9), rtol=1e-5, atol=1e-6)


def test_evaluating_a_checkpoint_after_fit_and_fitting_again(tmp_path: Path) -> None:
    """After fit (the average swapped in for good), Lightning restores callbacks for validate/test too: their
    averaging state must be ignored there, and must not leak into a later, fresh fit."""
    ema, seen = EMA(decay=0.9, warmup="none"), SeenAtTest()
    run, model = fit(
        [ema, seen, ModelCheckpoint(dirpath=tmp_path, save_last=True)], epochs=2, enable_checkpointing=True
    )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    _, val = digits_loaders()
    run.validate(model, val, ckpt_path=str(tmp_path / "last.ckpt"))
    run.test(model, val, ckpt_path=str(tmp_path / "last.ckpt"))
    for name, value in saved.items():
        assert torch.equal(seen.seen[name], value), name

    fresh_ema, recorder = EMA(decay=0.9, warmup="none", apply_at_end=False), Recorder()
    trainer(callbacks=[fresh_ema]).validate(DigitsModule(), val, ckpt_path=str(tmp_path / "last.ckpt"))
    fit([recorder, fresh_ema], epochs=1)  # a plain fit: starts from its own weights, not the checkpoint's state
    assert fresh_ema._bound().num_updates == 1 + recorder.steps[-1]
    assert_close(fresh_ema._bound().averaged_tensors(), ema_reference(recorder, 0.9), rtol=1e-5, atol=1e-6)


def test_nonfinite_policy_is_checked_at_construction_and_reaches_the_engine() -> None:
    with pytest.raises(ValueError, match=r"nonfinite='never'"):
        EMA(nonfinite="never")
    model = DigitsModule()
    callback = EMA(decay=0.5, nonfinite="error", name="guarded", apply_at_end=False)
    fit_trainer = pl.Trainer(
        max_steps=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    train, _ = digits_loaders()
    fit_trainer.fit(model, train)
    assert callback.averager is not None and callback.averager.nonfinite == "error"
    with torch.no_grad():
        model.net[0].weight[0, 0] = float("nan")
    callback.averager.step()
    with pytest.raises(FloatingPointError, match=r"guarded.*first in 'net.0.weight'"):
        callback.averager.state_dict()


class ReloadedWithAssign(DigitsModule):
    """Model surgery in the middle of fit: at the start of epoch 2 the weights are loaded with
    ``load_state_dict(assign=True)`` (new Parameter objects) and a new optimizer trains those."""

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.load_state_dict({k: v.clone() for k, v in self.state_dict().items()}, assign=True)
            self.trainer.optimizers = [torch.optim.SGD(self.parameters(), lr=self.hparams.lr)]


def test_parameters_replaced_during_fit_are_followed() -> None:
    recorder, ema = Recorder(), EMA(decay=0.9, warmup="none", apply_at_end=False)
    pl.seed_everything(0, verbose=False)
    model = ReloadedWithAssign()
    first = model.net[0].weight
    fit_digits(model, [recorder, ema], 3)
    assert model.net[0].weight is not first
    assert_close(ema._bound().averaged_tensors(), ema_reference(recorder, 0.9), rtol=1e-5, atol=1e-6)


class CompiledDigits(DigitsModule):
    """DigitsModule with its network compiled in ``__init__``: every ``state_dict`` key has ``net._orig_mod.``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = torch.compile(self.net, backend="aot_eager")  # type: ignore[assignment]


def test_a_compiled_submodule_averages_checkpoints_exports_and_resumes(tmp_path: Path) -> None:
    """A LightningModule with ``torch.compile``d layers: the average equals the same run uncompiled; the export has
    the plain names (it loads into the uncompiled module); the checkpoint's ``state_dict`` holds the average under
    the compiled keys and its live weights restore; a resumed run ends bit-identical to an uninterrupted one."""
    pl.seed_everything(0, verbose=False)
    plain_run = EMA(decay=0.9, warmup="none")
    plain = DigitsModule()
    fit_digits(plain, [plain_run], 2)

    def compiled_fit(epochs: int, callbacks: list[pl.Callback], **kwargs: Any) -> CompiledDigits:
        pl.seed_everything(0, verbose=False)
        model = CompiledDigits()
        fit_digits(model, callbacks, epochs, **kwargs)
        return model

    live = LiveAtEnd()
    ema = EMA(decay=0.9, warmup="none", export_path=tmp_path / "ema.safetensors")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    compiled = compiled_fit(2, [live, ema, checkpoint], enable_checkpointing=True)
    average = ema._bound().averaged_tensors()
    assert sorted(average) == sorted(plain_run._bound().averaged_tensors())  # plain names
    assert_close(average, plain_run._bound().averaged_tensors(), rtol=1e-5, atol=1e-6)
    exported = DigitsModule()
    load_into_module(exported, tmp_path / "ema.safetensors")
    exported.load_state_dict(load_file(str(tmp_path / "ema.safetensors")))  # torch's strict load, plain names
    assert_close(dict(exported.state_dict()), average)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert sorted(saved["state_dict"]) == sorted(compiled.state_dict())
    for name, value in average.items():
        key = name.replace("net.", "net._orig_mod.", 1)
        torch.testing.assert_close(saved["state_dict"][key], value)
        assert torch.equal(saved[LIVE_KEY][key], live.state[key])
    assert sorted(saved["callbacks"][ema.state_key]["averaging"]["averaged"]) == sorted(average)

    full, resumed = EMA(decay=0.9, warmup="none"), EMA(decay=0.9, warmup="none")
    compiled_fit(4, [full])
    compiled_fit(4, [resumed], ckpt_path=str(tmp_path / "last.ckpt"))
    for name, value in full._bound().averaged_tensors().items():
        assert torch.equal(value, resumed._bound().averaged_tensors()[name]), name
