"""LCSC and checkpoint combination through the Lightning callback, the optimizer wrapper and the combine command,
against the live weights recorded at the snapshot steps and combined by hand in float64."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file
from torch import nn

from tests.faces.test_callbacks import LiveAtEnd, Recorder, assert_close
from tests.helpers import (
    DigitsModule,
    clean_environment,
    digits_loaders,
    digits_tensors,
    fit_digits,
    run_ddp_script,
    small_net,
    trainer,
)
from weightavg.callbacks import EMA, LCSC
from weightavg.core.io import read_weights
from weightavg.methods.lcsc import SearchResult, SearchSettings
from weightavg.optim import LCSC as LCSCOptimizer

SMALL_SEARCH = SearchSettings(population=5, parents=2, children=3, generations=2, seed=3)


def by_hand(recorder: Recorder, steps: list[int], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * live(step_i) in float64; integer buffers from the last snapshot."""
    states = [recorder.weights[recorder.steps.index(step)] for step in steps]
    return {
        k: states[-1][k]
        if k.endswith("num_batches_tracked")
        else sum(w * s[k] for w, s in zip(weights, states, strict=True))
        for k in states[0]
    }


def parameters_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries a combination sets directly (BatchNorm statistics are recomputed for the chosen one)."""
    return {k: v for k, v in state.items() if "running_" not in k and not k.endswith("num_batches_tracked")}


def recomputed_statistics(expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch's update_bn over one epoch of the training inputs, on a model holding ``expected``."""
    reference = DigitsModule()
    reference.load_state_dict({k: v.to(reference.state_dict()[k].dtype) for k, v in expected.items()})
    train, _ = digits_loaders()
    torch.optim.swa_utils.update_bn([x for x, _ in train], reference)
    return {k: v for k, v in reference.state_dict().items() if "running_" in k}


def fit(
    callbacks: list[pl.Callback], epochs: int = 2, ckpt_path: str | None = None, **kwargs: Any
) -> tuple[pl.Trainer, DigitsModule]:
    pl.seed_everything(0, verbose=False)
    model = DigitsModule()
    return fit_digits(model, callbacks, epochs, ckpt_path=ckpt_path, **kwargs), model


@pytest.mark.parametrize("method", ["uniform", "ema", "last", "metric"])
def test_recipes_combine_the_snapshots_taken_every_n_steps(tmp_path: Path, method: str) -> None:
    recorder = Recorder()
    options: dict[str, Any] = {"by": "step"} if method == "metric" else {}
    lcsc = LCSC(
        every_n_steps=3,
        keep=4,
        method=method,
        directory=tmp_path,
        export_path=tmp_path / "best.safetensors",
        result_path=tmp_path / "result.json",
        **options,
    )
    _, model = fit([recorder, lcsc])
    steps = [s.step for s in lcsc._combiner().store.snapshots]
    assert steps == [6, 9, 12, 15]  # 16 steps, every 3, the newest 4 kept
    assert sorted(p.name for p in tmp_path.glob("snapshot-*")) == [f"snapshot-{s:09d}.safetensors" for s in steps]
    assert lcsc.result is not None
    # Each recipe's coefficients written out here (not read from the result under test): a face that routed method=
    # to another recipe fails.
    reference = {
        "uniform": [0.25] * 4,
        "ema": [0.9**3, 0.1 * 0.9**2, 0.1 * 0.9, 0.1],  # an EMA with decay 0.9 over the 4 snapshots, the first copied
        "last": [0.0, 0.0, 0.0, 1.0],
        "metric": [step / sum(steps) for step in steps],  # by step, penalty 1: (s_i / max s)^1, normalised
    }[method]
    assert lcsc.result.weights == pytest.approx(reference, rel=1e-12, abs=1e-12)
    expected = by_hand(recorder, steps, reference)
    assert_close(parameters_only(model.state_dict()), expected, rtol=1e-5, atol=1e-6)
    assert_close(
        {k: v for k, v in model.state_dict().items() if "running_" in k},
        recomputed_statistics(expected),
        rtol=1e-5,
        atol=1e-6,
    )
    exported = read_weights(tmp_path / "best.safetensors", argument="path")
    for key, value in model.state_dict().items():
        assert torch.equal(exported[key], value), key
    assert SearchResult.load(tmp_path / "result.json").weights == pytest.approx(reference, rel=1e-12, abs=1e-12)


def test_lcsc_search_scores_on_validation_and_leaves_the_best(tmp_path: Path) -> None:
    recorder = Recorder()
    lcsc = LCSC(every_n_steps=4, keep=4, method="lcsc", monitor="val_acc", settings=SMALL_SEARCH, recompute_bn=False)
    run, model = fit([recorder, lcsc])
    assert lcsc.result is not None and lcsc.result.evaluations <= 5 + 2 * 3
    steps = [s.step for s in lcsc._combiner().store.snapshots]
    assert_close(
        parameters_only(model.state_dict()), by_hand(recorder, steps, lcsc.result.weights), rtol=1e-5, atol=1e-6
    )
    _, val = digits_loaders()
    assert run.validate(model, val, verbose=False)[0]["val_acc"] == pytest.approx(lcsc.result.fitness)
    best = max(entry["fitness"] for entry in lcsc.result.history)  # type: ignore[type-var]
    assert lcsc.result.fitness == best
    again = LCSC(every_n_steps=4, keep=4, method="lcsc", monitor="val_acc", settings=SMALL_SEARCH, recompute_bn=False)
    fit([again])
    assert again.result is not None and again.result.history == lcsc.result.history  # deterministic under a seed


class StopAt(pl.Callback):
    """Interrupts training at an optimizer step (a crash in the middle of a fit)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError("stopped")


def test_a_new_fit_does_not_report_the_previous_fits_result() -> None:
    lcsc = LCSC(every_n_steps=4, keep=2, method="uniform", recompute_bn=False)
    fit([lcsc], epochs=1)
    assert lcsc.result is not None
    with pytest.raises(RuntimeError, match="stopped"):
        fit([lcsc, StopAt(3)], epochs=1)
    assert lcsc.result is None


def test_resume_drops_snapshots_past_the_checkpoint_and_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    full = LCSC(every_n_steps=3, keep=None, method="uniform", directory=tmp_path / "full")
    _, model_a = fit([full], epochs=3)

    first = LCSC(every_n_steps=3, keep=None, method="uniform", directory=tmp_path / "resumed")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    fit([first, checkpoint], epochs=2, enable_checkpointing=True)
    # Resume from the first epoch's checkpoint (step 8): the run went on past it, and its snapshots of steps 9, 12
    # and 15 are on disk; they must be dropped and taken again.
    assert [s.step for s in first._combiner().store.snapshots] == [3, 6, 9, 12, 15]
    resumed = LCSC(every_n_steps=3, keep=None, method="uniform", directory=tmp_path / "resumed")
    live = LiveAtEnd()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, model_b = fit([live, resumed], epochs=3, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=8.ckpt"))
    said = [str(w.message) for w in caught if "weightavg" in str(w.message)]
    assert not said, said  # the checkpoint holds what LCSC counts on: nothing to warn about
    assert [s.step for s in resumed._combiner().store.snapshots] == [s.step for s in full._combiner().store.snapshots]
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key


def test_errors_before_training() -> None:
    for callback, message in [
        (LCSC(every_n_steps=2, method="lcsc"), "give monitor="),
        (LCSC(every_n_steps=2, monitor="val_acc", search_on=2), "search_on=2"),
    ]:
        run = trainer(max_epochs=2, callbacks=[callback])
        with pytest.raises(ValueError, match=message):
            run.fit(DigitsModule(), *digits_loaders())
        assert run.global_step == 0
    with pytest.raises(ValueError, match="not both"):
        LCSC(every_n_steps=2, every_n_epochs=1)
    with pytest.raises(ValueError, match="method='best'"):
        LCSC(method="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype='float16'"):
        LCSC(dtype="float16")


def test_a_monitor_typo_fails_at_the_first_validation_naming_the_logged_keys() -> None:
    lcsc = LCSC(every_n_steps=2, monitor="val_accuracy", settings=SMALL_SEARCH, recompute_bn=False)
    run = trainer(max_epochs=3, callbacks=[lcsc])
    with pytest.raises(
        ValueError, match=r"monitor='val_accuracy' is not logged by validation_step; logged: .*'val_acc'"
    ):
        run.fit(DigitsModule(), *digits_loaders())
    assert run.global_step == 8  # after the first epoch's validation, not after three epochs and the search


def loop(opt: torch.optim.Optimizer, model: nn.Module, steps: int, start: int = 0) -> list[dict[str, torch.Tensor]]:
    x, y = digits_tensors()
    seen = []
    for step in range(start, start + steps):
        opt.zero_grad()
        i = (step * 32) % 480
        loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
        loss.backward()
        opt.record(train_loss=float(loss))  # type: ignore[attr-defined]
        opt.step()
        seen.append({k: v.detach().double().clone() for k, v in model.state_dict().items()})
    return seen


def test_optimizer_wrapper_snapshots_searches_combines_and_resumes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_net()
    opt = LCSCOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.2),
        module=model,
        every_n_steps=2,
        keep=3,
        directory=tmp_path,
        background=True,
    )
    seen = loop(opt, model, 10)
    opt.store.flush()  # background writes: the store lists what is on disk
    assert [s.step for s in opt.store.snapshots] == [6, 8, 10]
    live = copy.deepcopy(model.state_dict())
    weights = [0.5, -0.25, 0.75]
    expected = {
        k: sum(w * seen[s - 1][k] for w, s in zip(weights, (6, 8, 10), strict=True))
        for k in seen[0]
        if not k.endswith("num_batches_tracked")
    }
    with opt.combined(weights):
        assert_close(model.state_dict(), expected, rtol=1e-5, atol=1e-6)
    for key, value in live.items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match=r"search\(evaluate\) first"), opt.averaged():
        pass  # method="lcsc" (the default) needs a fitness: nothing chosen yet to evaluate
    result = opt.search(method="metric", penalty=1.0)
    losses = [s.metrics["train_loss"] for s in opt.store.snapshots]
    raw = [(loss / min(losses)) ** -1.0 for loss in losses]
    assert result.weights == pytest.approx([r / sum(raw) for r in raw])
    chosen = [r / sum(raw) for r in raw]
    with opt.averaged():  # the last search's choice, as a float64 sum of the recorded weights
        reference = {
            k: sum(w * seen[s - 1][k].double() for w, s in zip(chosen, (6, 8, 10), strict=True)) for k in expected
        }
        assert_close({k: model.state_dict()[k].double() for k in expected}, reference, rtol=1e-5, atol=1e-6)
    for key, value in live.items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(TypeError, match=r"unknown settings.*'penalties'"):
        opt.search(method="metric", penalties=1.0)

    state = copy.deepcopy(opt.state_dict())
    loop(opt, model, 3, start=10)  # an interrupted run went on and snapshotted step 12
    opt.store.flush()
    restored = LCSCOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.2), module=model, every_n_steps=2, keep=3, directory=tmp_path
    )
    assert [s.step for s in restored.store.snapshots] == [8, 10, 12]
    restored.load_state_dict(state)
    assert [s.step for s in restored.store.snapshots] == [8, 10] and restored.steps == 10
    restored.apply([0.5, 0.5])
    opt.store.close()


def test_combine_command(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_net()
    opt = LCSCOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.2),
        module=model,
        every_n_steps=3,
        keep=None,
        directory=tmp_path / "snaps",
    )
    seen = loop(opt, model, 9)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "weightavg.combine", *args], capture_output=True, text=True, env=env, timeout=300
        )

    out = tmp_path / "out.safetensors"
    done = command(str(tmp_path / "snaps"), "--weights", "2,-1.5,0.5", "--output", str(out), "--dtype", "float64")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"coefficients: [2, -1.5, 0.5]; not scored (no --fitness); written {out}"
    combined = read_weights(out, argument="out")
    expected = {
        k: 2 * seen[2][k] - 1.5 * seen[5][k] + 0.5 * seen[8][k]
        for k in seen[0]
        if not k.endswith("num_batches_tracked")
    }
    assert_close(combined, expected, rtol=1e-5, atol=1e-6)
    assert combined["1.num_batches_tracked"] == seen[8]["1.num_batches_tracked"]
    bad = command(str(tmp_path / "snaps"), "--method", "lcsc", "--output", str(out))
    assert bad.returncode == 2 and "--fitness" in bad.stderr
    missing = command(str(tmp_path / "nothing"), "--output", str(out))
    assert missing.returncode == 2 and "nothing" in missing.stderr


def test_negative_running_variance_is_reported() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = LCSCOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), module=model, every_n_steps=1, keep=2, directory=":memory:"
    )
    for variance in (3.0, 0.5):
        model(torch.randn(4, 4)).sum().backward()
        with torch.no_grad():
            model[1].running_var.fill_(variance)
        opt.step()
        opt.zero_grad()
    with pytest.warns(UserWarning, match="negative BatchNorm running variances"):
        opt.apply([-2.0, 3.0])  # -2 * 3 + 3 * 0.5 < 0
    opt.apply([0.5, 0.5])
    assert opt.combiner.check_statistics()


def test_ddp_two_gloo_processes(tmp_path: Path) -> None:
    assert "DDP LCSC OK" in run_ddp_script(tmp_path, "lcsc")


def test_combine_command_refuses_a_damaged_snapshot_or_skips_it_by_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_net()
    opt = LCSCOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.2),
        module=model,
        every_n_steps=2,
        keep=None,
        directory=tmp_path / "snaps",
    )
    seen = loop(opt, model, 8)
    victim = tmp_path / "snaps" / "snapshot-000000004.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "out.safetensors"
    base = [sys.executable, "-m", "weightavg.combine", str(tmp_path / "snaps"), "--output", str(out)]
    refused = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and str(victim) in refused.stderr and "--skip-damaged" in refused.stderr
    assert not out.exists()
    skipped = subprocess.run([*base, "--skip-damaged"], capture_output=True, text=True, env=env, timeout=300)
    assert skipped.returncode == 0, skipped.stderr
    assert f"skipping damaged snapshot file {victim}" in skipped.stderr
    combined = read_weights(out, argument="out")
    expected = {k: sum(seen[s - 1][k] for s in (2, 6, 8)) / 3 for k in seen[0] if not k.endswith("num_batches_tracked")}
    assert_close(combined, expected, rtol=1e-5, atol=1e-6)


KILLED_AFTER_CHECKPOINT = r"""
import os, signal, sys, time, torch
from torch import nn
sys.path.insert(0, os.getcwd())
from tests.faces.test_lcsc import loop
from tests.helpers import small_net
from weightavg.core import io
from weightavg.optim import LCSC

save = io.save_safetensors


def slow_disk(*args, **kwargs):
    time.sleep(0.5)
    return save(*args, **kwargs)


io.save_safetensors = slow_disk
torch.set_num_threads(1)
torch.manual_seed(0)
model = small_net()
opt = LCSC(torch.optim.SGD(model.parameters(), lr=0.2), module=model, every_n_steps=2, keep=None,
           directory=sys.argv[1], background=True)
loop(opt, model, 6)
torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, sys.argv[2])
os.kill(os.getpid(), signal.SIGKILL)  # right after the checkpoint, snapshots possibly still queued
"""


def test_a_run_killed_right_after_a_checkpoint_resumes_to_the_uninterrupted_combination(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_net()
    full = LCSCOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.2),
        module=model,
        every_n_steps=2,
        keep=None,
        directory=tmp_path / "full",
    )
    loop(full, model, 10)
    full.apply([0.2] * 5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    folder, checkpoint = tmp_path / "killed", tmp_path / "state.pt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_CHECKPOINT, str(folder), str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == -9, done.stderr
    saved = torch.load(checkpoint, weights_only=False)
    model = small_net()
    model.load_state_dict(saved["model"])
    resumed = LCSCOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.2), module=model, every_n_steps=2, keep=None, directory=folder
    )
    resumed.load_state_dict(saved["opt"])
    assert [s.step for s in resumed.store.snapshots] == [2, 4, 6]  # what the checkpoint counted on is on disk
    loop(resumed, model, 4, start=6)
    resumed.apply([0.2] * 5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_fresh_run_in_a_used_folder_is_refused_unless_overwrite_in_both_faces(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_net()
    crashed = LCSCOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.2), module=model, every_n_steps=2, directory=tmp_path / "opt"
    )
    loop(crashed, model, 10)  # a crashed run left snapshots of steps 2..10
    again = LCSCOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.2), module=model, every_n_steps=2, directory=tmp_path / "opt"
    )
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"holds 5 snapshots of an earlier run.*overwrite=True"):
        loop(again, model, 1)
    for key, value in parameters_only(before).items():  # refused before the inner step (forward moved BN stats)
        assert torch.equal(model.state_dict()[key], value), key
    fresh = LCSCOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.2),
        module=model,
        every_n_steps=2,
        directory=tmp_path / "opt",
        overwrite=True,
    )
    loop(fresh, model, 6)
    assert [s.step for s in fresh.store.snapshots] == [2, 4, 6]

    root = tmp_path / "run"
    first = LCSC(every_n_steps=3, keep=None, method="uniform", directory="snaps")
    fit([first], epochs=1, default_root_dir=str(root))
    assert sorted(p.name for p in (root / "snaps").glob("snapshot-*")) == [
        f"snapshot-{s:09d}.safetensors" for s in (3, 6)
    ]
    second = LCSC(every_n_steps=3, keep=None, method="uniform", directory="snaps")
    with pytest.raises(ValueError, match=r"holds 2 snapshots of an earlier run.*ckpt_path"):
        fit([second], epochs=1, default_root_dir=str(root))
    assert len(list((root / "snaps").glob("snapshot-*"))) == 2  # nothing deleted
    third = LCSC(every_n_steps=4, keep=None, method="uniform", directory="snaps", overwrite=True)
    fit([third], epochs=1, default_root_dir=str(root))
    assert [s.step for s in third._combiner().store.snapshots] == [4, 8]


def test_snapshots_default_to_files_under_the_run_folder_and_memory_is_explicit(tmp_path: Path) -> None:
    """No directory=: files in <default_root_dir>/weightavg_snapshots/<name>, where a resumed fit finds them and a
    fresh fit replaces them with a warning; directory=":memory:" holds them in RAM, writing nothing."""
    root = tmp_path / "run"
    first = LCSC(every_n_steps=3, keep=None, method="uniform", recompute_bn=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    fit([first, checkpoint], epochs=2, default_root_dir=str(root), enable_checkpointing=True)
    folder = root / "weightavg_snapshots" / "LCSC"
    assert first._combiner().store.directory == folder
    assert sorted(p.name for p in folder.glob("snapshot-*")) == [
        f"snapshot-{s:09d}.safetensors" for s in (3, 6, 9, 12, 15)
    ]
    resumed = LCSC(every_n_steps=3, keep=None, method="uniform", recompute_bn=False)
    fit([resumed], epochs=2, default_root_dir=str(root), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=8.ckpt"))
    assert [s.step for s in resumed._combiner().store.snapshots] == [3, 6, 9, 12, 15]
    named = LCSC(every_n_steps=3, keep=None, method="uniform", recompute_bn=False, name="soup / run 2")
    fresh = LCSC(every_n_steps=4, keep=None, method="uniform", recompute_bn=False)
    with pytest.warns(UserWarning, match=r"deletes 5 snapshots of an earlier run .*ckpt_path"):
        fit([fresh, named], epochs=1, default_root_dir=str(root))
    assert [s.step for s in fresh._combiner().store.snapshots] == [4, 8]
    assert sorted(p.name for p in folder.glob("snapshot-*")) == [f"snapshot-{s:09d}.safetensors" for s in (4, 8)]
    assert (root / "weightavg_snapshots" / "soup_run_2").is_dir()  # a name made safe for a folder

    memory = LCSC(every_n_steps=3, keep=2, method="uniform", recompute_bn=False, directory=":memory:")
    fit([memory], epochs=1, default_root_dir=str(tmp_path / "memory"))
    assert memory._combiner().store.directory is None
    assert [s.step for s in memory._combiner().store.snapshots] == [3, 6]
    assert not (tmp_path / "memory" / "weightavg_snapshots").exists()
    with pytest.raises(ValueError, match=r"background=True writes snapshot files; directory=':memory:'"):
        LCSC(directory=":memory:", background=True)


def test_optimizer_wrapper_needs_a_directory_or_memory_named_explicitly(tmp_path: Path) -> None:
    model = small_net()
    with pytest.raises(ValueError, match=r"directory= is required.*directory=':memory:'"):
        LCSCOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), module=model, every_n_steps=2)
    opt = LCSCOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), module=model, every_n_steps=2, directory=":memory:"
    )
    loop(opt, model, 4)
    assert opt.store.directory is None and [s.step for s in opt.store.snapshots] == [2, 4]


def test_optimizer_wrapper_ranks_write_their_own_subfolders(tmp_path: Path) -> None:
    """Under torch.distributed with two processes, each rank writes ``directory/rank<N>`` (no two race on one
    manifest)."""
    script = Path(__file__).parents[1] / "distributed" / "torchrun_loop.py"
    env = {**clean_environment(), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*command, str(script), "lcsc", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        names = sorted(p.name for p in (tmp_path / f"rank{rank}").glob("snapshot-*"))
        assert names == [f"snapshot-{s:09d}.safetensors" for s in (2, 4)], (rank, names)
    assert not list(tmp_path.glob("snapshot-*"))


FITNESS_MODULE = """
import math
def good(weights): return -float((weights["w"] - 1.2).pow(2).sum())
def nan(weights): return math.nan
def boom(weights): raise ZeroDivisionError("oops")
not_a_function = 5
"""


def combine_command(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command in a subprocess, importing the worktree's package and ``folder``'s fitness module."""
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), str(folder)]),
    }
    return subprocess.run(
        [sys.executable, "-m", "weightavg.combine", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=folder,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "uniform", "--fitness", "fitness:nan"], "gave no finite score"),
        (["--method", "lcsc", "--fitness", "fitness:nan", "--generations", "1"], "gave no finite score"),
        (["--method", "greedy", "--fitness", "fitness:boom"], "raised ZeroDivisionError: oops"),
        (["--method", "greedy", "--fitness", "nowhere:score"], "no module named 'nowhere'"),
        (["--method", "greedy", "--fitness", "fitness:absent"], "has no attribute 'absent'"),
        (["--method", "greedy", "--fitness", "fitness:not_a_function"], "is not callable"),
        (["--output", "."], "is a folder"),
        (["--weights", "1,a,2"], "must be comma-separated numbers"),
        (["--method", "ema", "--decay", "1.5"], "--decay 1.5 is out of range: allowed [0, 1)"),  # the option's name
        (["--method", "lcsc", "--population", "2", "--parents", "3", "--fitness", "fitness:nan"], "--parents 3"),
        (["s1.safetensors", "broken.safetensors"], "snapshot file broken.safetensors is damaged or truncated"),
        (["s0.safetensors", "s1.safetensors", "--output", "s1.safetensors"], "is one of the snapshots being combined"),
        (["s0.safetensors", "s0.safetensors"], "snapshots given more than once"),
        (["--method", "greddy"], "argument --method: invalid choice: 'greddy'"),  # the parser's errors: one line too
        (["--decay", "abc"], "argument --decay: invalid float value: 'abc'"),
    ],
)
def test_combine_command_reports_failures_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    for i in range(3):
        save_file({"w": torch.full((3,), float(i))}, str(tmp_path / f"s{i}.safetensors"))
    whole = (tmp_path / "s2.safetensors").read_bytes()
    (tmp_path / "broken.safetensors").write_bytes(whole[: len(whole) - 4])  # truncated
    (tmp_path / "fitness.py").write_text(FITNESS_MODULE)
    inputs = (
        [] if any(a.endswith(".safetensors") for a in args) else ["s0.safetensors", "s1.safetensors", "s2.safetensors"]
    )
    output = [] if "--output" in args else ["--output", "out.safetensors"]
    done = combine_command(tmp_path, *inputs, *args, *output)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("weightavg.combine: ") and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_combine_command_names_former_and_ignored_options_in_one_line_each(tmp_path: Path) -> None:
    for i in range(2):
        save_file({"w": torch.full((3,), float(i))}, str(tmp_path / f"s{i}.safetensors"))
    done = combine_command(
        tmp_path, "s0.safetensors", "s1.safetensors", "--rule", "strict", "--decay", "0.5", "--population", "3",
        "--output", "out.safetensors",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "weightavg.combine: --rule is now --greedy-rule (--rule will be removed)",
        "weightavg.combine: the search options are ignored with --method uniform (they are for --method lcsc)",
        "weightavg.combine: --decay 0.5 is ignored with --method uniform (it is for --method ema)",
    ], lines  # (--rule strict is the default: nothing to say about it beyond its new name)
    assert read_weights(tmp_path / "out.safetensors", argument="path")["w"].tolist() == [0.5, 0.5, 0.5]


def test_combine_command_small_population_and_finite_fitness(tmp_path: Path) -> None:
    for i in range(3):
        save_file({"w": torch.full((3,), float(i))}, str(tmp_path / f"s{i}.safetensors"))
    (tmp_path / "fitness.py").write_text(FITNESS_MODULE)
    done = combine_command(
        tmp_path,
        "s0.safetensors",
        "s1.safetensors",
        "s2.safetensors",
        "--method",
        "lcsc",
        "--fitness",
        "fitness:good",
        "--population",
        "2",
        "--generations",
        "2",
        "--output",
        "out.safetensors",
    )
    assert done.returncode == 0, done.stderr  # refused before: "parents=4 must not exceed population=2"
    assert (tmp_path / "out.safetensors").is_file()


def test_combine_command_on_a_full_disk_and_a_read_only_folder(tmp_path: Path) -> None:
    """A real 8 KiB tmpfs (a private mount namespace) that the output does not fit in, then the same read-only."""
    import shutil

    if (
        shutil.which("unshare") is None
        or subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=8k tmpfs {tmp_path}"], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("needs unshare and mount (root or user namespaces) for a real small file system")
    save_file({"w": torch.zeros(100_000)}, str(tmp_path / "big.safetensors"))
    (tmp_path / "full").mkdir()
    root = str(Path(__file__).parents[2])
    script = (
        f"mount -t tmpfs -o size=8k tmpfs full && "
        f"PYTHONPATH={root} {sys.executable} -m weightavg.combine big.safetensors --output full/out.safetensors; "
        f"echo rc=$?; mount -o remount,ro full && "
        f"PYTHONPATH={root} {sys.executable} -m weightavg.combine big.safetensors --output full/out.safetensors; "
        f"echo rc=$?"
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    assert done.stdout.split() == ["rc=2", "rc=2"], done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in done.stderr, done.stderr
    assert "writing --output 'full/out.safetensors' failed" in lines[0] and "No space left" in lines[0]
    assert "--output='full/out.safetensors' cannot be written: no file can be created in 'full'" in lines[1]


def test_an_lcsc_that_applies_after_an_applying_average_says_it_discards_it(tmp_path: Path) -> None:
    """LCSC combines snapshots of the live weights: put in the model after an EMA that applies its average, it
    replaces that average, and says so (and the run's summary line names what the model ends with)."""
    ema = EMA(decay=0.9)
    lcsc = LCSC(every_n_steps=4, method="uniform", directory=tmp_path, recompute_bn=False)
    with pytest.warns(UserWarning, match=r"discards EMA\(decay=0\.9\)'s average"):
        _, model = fit([ema, lcsc], epochs=1)
    weights = lcsc.result.weights if lcsc.result is not None else []
    assert weights == [0.5, 0.5]  # steps 4 and 8: the model holds their mean, not the EMA
    assert not any(
        torch.equal(t, model.state_dict()[k])
        for k, t in ema._bound().averaged_tensors().items()
        if k.endswith("weight")
    )


def test_another_recipes_option_is_warned_about_once_by_the_callback_and_never_by_the_wrapper() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lcsc = LCSC(every_n_steps=4, method="uniform", decay=0.5, directory=":memory:", recompute_bn=False)
        fit([lcsc], epochs=1)
    said = [str(w.message) for w in caught if "is ignored" in str(w.message)]
    assert said == ["LCSC: decay=0.5 is ignored with method='uniform' (it is for method='ema')"], said
    model = small_net()
    opt = LCSCOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), module=model, every_n_steps=1,
                        directory=":memory:", decay=0.5)  # fmt: skip
    loop(opt, model, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decay is the default of search(method="ema"); another recipe ignores it
        assert opt.search(method="uniform").weights == [0.5, 0.5]
