"""``python -m weightavg.train``: the Hydra app end to end, as a newcomer runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import clean_environment
from weightavg import load_into_module
from weightavg.train import Classifier
from weightavg.wiseft import ALPHAS


def run_app(tmp_path: Path, *overrides: str, warnings: str = "ignore") -> subprocess.CompletedProcess[str]:
    env = {**clean_environment(), "PYTHONWARNINGS": warnings}
    command = [sys.executable, "-m", "weightavg.train", f"hydra.run.dir={tmp_path}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def accuracy_table(stdout: str, column: int = 0) -> dict[str, float]:
    """Row -> test accuracy; ``column=1``: on the original domain (printed after ``|`` for a shifted run)."""
    rows = stdout.split("test accuracy", 1)[1].splitlines()[1:]
    table = {}
    for line in rows:
        if not line[:1].isalnum() or line.startswith(("averaged weights", "merged model", "final model")):
            continue
        if ":" in line.split("  ", 1)[0]:  # a note line ("averaging: ..."), not a row
            continue
        first, *rest = line.split(" | ")
        key, value = first.rsplit(maxsplit=1)
        table[key] = float(([value, *rest])[column])
    return table


def test_app_trains_with_several_averagers_and_writes_them(tmp_path: Path) -> None:
    result = run_app(
        tmp_path,
        "averaging=ema",
        "averaging.decay=0.99",
        "+averaging@extra_averaging.swa=swa",
        "extra_averaging.swa.start=0.5",
        "trainer.max_epochs=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = accuracy_table(result.stdout)
    assert set(table) == {"live", "averaging EMA(decay=0.99)", "extra_averaging.swa SWA(start=0.5)"}
    exports = {"averaging EMA(decay=0.99)": "averaging", "extra_averaging.swa SWA(start=0.5)": "swa"}
    assert_rows_are_the_exports(table, {row: tmp_path / stem for row, stem in exports.items()})


def assert_rows_are_the_exports(table: dict[str, float], exports: dict[str, Path]) -> None:
    """Each averaged row's test accuracy is that of the weights the run exported for it, scored here afresh (the
    table prints 4 places), and far above chance (10 digit classes). An export without buffers (NoLoCo's slow
    weights) is evaluated as the app does: over the model the run ended with (``model.safetensors``)."""
    from weightavg.train import accuracy, load_dataset

    test = load_dataset("digits")[2]
    for row, stem in exports.items():
        model = Classifier(64, 10)
        load_into_module(model, stem.parent / "model.safetensors")
        load_into_module(model, stem.with_suffix(".safetensors"), strict=False)
        assert table[row] == pytest.approx(accuracy(model, test), abs=5e-5), row
        assert table[row] > 0.5, table


def run_pretrained_on_original(weights: Path) -> float:
    from weightavg.train import accuracy, load_dataset

    model = Classifier(64, 10)
    load_into_module(model, weights)
    return accuracy(model, load_dataset("digits")[2])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("averaging.dtype=float8", "averaging: dtype='float8'"),
        ("averaging.device=tpu9", "averaging: device='tpu9'"),
        ("averaging.export_path=/nonexistent/dir/x.safetensors", "export_path='/nonexistent/dir/x.safetensors'"),
        ("trainer.threads=0", "trainer.threads=0"),
    ],
)
def test_every_bad_value_is_one_line_before_training(tmp_path: Path, override: str, message: str) -> None:
    """The real command: non-zero exit, one clear line, no traceback, and nothing trained (no metrics written)."""
    result = run_app(tmp_path, override, "trainer.max_epochs=1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if "invalid configuration" in line]
    assert len(lines) == 1 and message in lines[0], result.stderr[-3000:]
    assert not (tmp_path / "metrics.csv").exists() or "train_loss" not in (tmp_path / "metrics.csv").read_text()
    assert not Path("/nonexistent/dir").exists()


def test_help_describes_every_field() -> None:
    from omegaconf import OmegaConf

    from weightavg.train import TrainConfig

    result = subprocess.run(
        [sys.executable, "-m", "weightavg.train", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**clean_environment(), "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = OmegaConf.structured(TrainConfig)
    names = [k for k in config if k != "defaults"]
    fields = [f"{group}.{key}" for group in ("data", "model", "trainer") for key in config[group]]
    for name in [*names, *fields]:
        if name in ("data", "model", "trainer"):
            continue
        described = [line for line in result.stdout.splitlines() if line.split()[:1] == [name]]
        assert described and len(described[0].split()) > 2, f"--help does not describe {name}"


def test_threads_progress_and_metrics_log(tmp_path: Path) -> None:
    result = run_app(tmp_path, "averaging=none", "trainer.max_epochs=1", "trainer.threads=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 torch thread(s) (trainer.threads)" in result.stdout
    header, *rows = (tmp_path / "metrics.csv").read_text().splitlines()  # Lightning's CSV logger in the run folder
    assert {"train_loss", "val_acc", "epoch", "step"} <= set(header.split(",")) and rows


def test_the_run_folder_warning_of_the_csv_logger_is_not_shown(tmp_path: Path) -> None:
    """Hydra's .hydra/ is in the run folder; Lightning would warn that "previous log files ... will be deleted"."""
    result = run_app(tmp_path, "averaging=none", "trainer.max_epochs=1", warnings="default")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / ".hydra").is_dir() and (tmp_path / "metrics.csv").is_file()
    assert "exists and is not empty" not in result.stderr, result.stderr[-3000:]


def test_invalid_value_exits_nonzero_naming_the_field(tmp_path: Path) -> None:
    result = run_app(tmp_path, "averaging.decay=1.5")
    assert result.returncode != 0
    assert "averaging: decay=1.5 is out of range: allowed [0, 1)" in result.stderr


def test_no_averaging_option_in_process(tmp_path: Path) -> None:
    from hydra import compose, initialize

    from weightavg.train import register_train_configs, run

    register_train_configs()
    with initialize(version_base=None, config_path=None):
        cfg = compose("weightavg_train", overrides=["averaging=none", "trainer.max_epochs=1", f"output_dir={tmp_path}"])
    assert list(run(cfg)) == ["live"]
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]  # only the final model


def test_wiseft_and_zscl_from_a_pretrained_run_on_a_shifted_domain(tmp_path: Path) -> None:
    from hydra import compose, initialize

    from weightavg.train import register_train_configs, run

    register_train_configs()
    with initialize(version_base=None, config_path=None):
        cfg = compose(
            "weightavg_train",
            overrides=["averaging=none", "trainer.max_epochs=2", f"output_dir={tmp_path / 'pretrain'}"],
        )
    run(cfg)
    pretrained = tmp_path / "pretrain" / "model.safetensors"

    wiseft = run_app(
        tmp_path / "wiseft",
        "averaging=wiseft",
        "data.shift=invert",
        f"model.init_from={pretrained}",
        "trainer.max_epochs=1",
    )
    assert wiseft.returncode == 0, wiseft.stderr[-3000:]
    table = accuracy_table(wiseft.stdout)
    chosen = next(key for key in table if key.startswith("averaging WiSEFT(alpha="))
    assert "averaging WiSE-FT anchor (alpha=0)" in table
    # The row's alpha is the best of the sweep the run reported on the first validation set (ties: the smallest).
    report = re.search(r"WiSE-FT val_acc by alpha: (\w+): ([^;]+);.*chose alpha=([\d.]+)", wiseft.stderr)
    assert report is not None, wiseft.stderr[-3000:]
    curve = {float(a): float(v) for a, v in (pair.split("=") for pair in report[2].split(", "))}
    assert report[1] == "val" and sorted(curve) == list(ALPHAS)
    picked = float(report[3])
    assert curve[picked] == max(curve.values()) and chosen == f"averaging WiSEFT(alpha={picked:g})"
    # WiSE-FT's point is the original domain: every row is scored there too, and the anchor (the pretrained
    # weights) is far above chance on it (it scored 0.011 on the inverted digits alone: the table's old anchor row).
    original = accuracy_table(wiseft.stdout, column=1)
    assert set(original) == set(table)
    pretrained_score = run_pretrained_on_original(pretrained)
    anchor = original["averaging WiSE-FT anchor (alpha=0)"]
    assert anchor == pytest.approx(pretrained_score, abs=5e-5)  # printed to 4 places
    assert original["averaging WiSE-FT anchor (alpha=0)"] > 0.5
    assert (tmp_path / "wiseft" / "averaging.png").is_file()
    assert "val_original" in wiseft.stderr + wiseft.stdout  # the sweep reports both validation sets

    # A fixed alpha sweeps nothing: the app must not ask it for a figure or validation names (it refused them).
    fixed = run_app(
        tmp_path / "fixed",
        "averaging=wiseft",
        "averaging.alpha=0.3",
        "data.shift=invert",
        f"model.init_from={pretrained}",
        "trainer.max_epochs=1",
    )
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "averaging WiSEFT(alpha=0.3)" in accuracy_table(fixed.stdout)
    assert not list((tmp_path / "fixed").glob("*.png"))
    # The row is the exported interpolation (the model the app leaves at alpha=0.3), scored on the original domain.
    row = accuracy_table(fixed.stdout, column=1)["averaging WiSEFT(alpha=0.3)"]
    assert row == pytest.approx(run_pretrained_on_original(tmp_path / "fixed" / "averaging.safetensors"), abs=5e-5)
    assert row != pytest.approx(anchor, abs=5e-5)

    zscl = run_app(
        tmp_path / "zscl",
        "averaging=zscl",
        "averaging.every_n_steps=5",
        "data.shift=invert",
        f"model.init_from={pretrained}",
        "trainer.max_epochs=1",
    )
    assert zscl.returncode == 0, zscl.stderr[-3000:]
    assert set(accuracy_table(zscl.stdout)) == {"live", "averaging ZSCL(every_n_steps=5)"}
    model = Classifier(64, 10)
    load_into_module(model, tmp_path / "zscl" / "averaging.safetensors")
    bad = run_app(tmp_path / "bad", "averaging=wiseft", "model.init_from=/nonexistent.safetensors")
    assert bad.returncode == 2 and "model.init_from='/nonexistent.safetensors'" in bad.stderr


def test_lcsc_in_the_app(tmp_path: Path) -> None:
    result = run_app(
        tmp_path,
        "averaging=lcsc",
        "averaging.every_n_steps=10",
        "averaging.keep=4",
        "averaging.method=greedy",
        "trainer.max_epochs=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = accuracy_table(result.stdout)
    assert set(table) == {"live", "averaging LCSC(method=greedy)"}
    model = Classifier(64, 10)
    load_into_module(model, tmp_path / "averaging.safetensors")


def test_ewa_in_the_small_vit_ends_with_the_dense_architecture(tmp_path: Path) -> None:
    result = run_app(
        tmp_path,
        "model.arch=vit",
        "averaging=ewa",
        "averaging.beta=0.5",
        "+averaging@extra_averaging.ema=ema",
        "extra_averaging.ema.decay=0.9",
        "trainer.max_epochs=2",
        "data.train_size=256",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = accuracy_table(result.stdout)
    ewa_row = "averaging EWA(beta=0.5, num_experts=4), merged"
    assert set(table) == {"live", ewa_row}, table
    dense = Classifier(64, 10, arch="vit")
    for name in ("averaging.safetensors", "model.safetensors"):  # EWA's export and the final model: both dense
        load_into_module(dense, tmp_path / name)  # raises on any missing, unexpected or mis-shaped tensor
        assert torch.isfinite(dense.net.blocks[1].mlp[0].weight).all()


def test_ewa_needs_the_transformer(tmp_path: Path) -> None:
    result = run_app(tmp_path, "averaging=ewa", "trainer.max_epochs=1")
    assert result.returncode == 2
    assert "model.arch='mlp'" in result.stderr and "model.arch=vit" in result.stderr


def test_noloco_over_two_processes_with_the_local_strategy(tmp_path: Path) -> None:
    result = run_app(
        tmp_path,
        "averaging=noloco",
        "averaging.sync_every=5",
        "trainer.strategy=local_ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = accuracy_table(result.stdout)  # printed once, by rank 0
    assert set(table) == {"live", "averaging NoLoCo(sync_every=5) slow weights"}, table
    assert_rows_are_the_exports(table, {"averaging NoLoCo(sync_every=5) slow weights": tmp_path / "averaging"})
    assert result.stdout.count("test accuracy") == 1
