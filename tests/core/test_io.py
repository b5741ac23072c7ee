"""weightavg.core.io: safetensors export and import of averages, atomic writes, errors that name the key."""

from __future__ import annotations

import contextlib
import io as io_module
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import weightavg
from weightavg import EMA, Averager, load_into_module
from weightavg.core import io


class TiedNet(nn.Module):
    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 10, bias=False)
        if tied:
            self.head.weight = self.embed.weight


@torch.no_grad()
def drift(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.add_(torch.rand(tensor.shape, generator=generator))
        else:
            tensor.add_(1)


def averaged_model(tied: bool = True, **engine: object) -> tuple[nn.Module, Averager]:
    model = TiedNet(tied)
    averager = Averager(model, EMA(decay=0.5, warmup="none"), **engine)  # type: ignore[arg-type]
    for step in range(1, 4):
        drift(model, step)
        averager.step()
    return model, averager


def test_save_load_round_trip(tmp_path: Path) -> None:
    _, averager = averaged_model()
    path = averager.save(tmp_path / "ema.safetensors")
    assert path == tmp_path / "ema.safetensors"
    on_disk = load_file(path)
    assert set(on_disk) == set(averager.names)
    for name, tensor in averager.averaged_tensors().items():
        assert torch.equal(on_disk[name], tensor)

    fresh = Averager(TiedNet(), EMA(decay=0.5, warmup="none", start_step=100))
    assert not fresh.has_average
    fresh.load(path)
    assert fresh.has_average
    for name, tensor in averager.averaged_tensors().items():
        assert torch.equal(fresh.averaged_tensors()[name], tensor)


def test_save_casts_floating_tensors_only(tmp_path: Path) -> None:
    _, averager = averaged_model()
    on_disk = load_file(averager.save(tmp_path / "half.safetensors", dtype=torch.bfloat16))
    for name, tensor in averager.averaged_tensors().items():
        if tensor.is_floating_point():
            assert on_disk[name].dtype == torch.bfloat16
            assert torch.equal(on_disk[name], tensor.to(torch.bfloat16))
        else:
            assert torch.equal(on_disk[name], tensor)


def test_save_while_swapped_writes_the_average_and_creates_folders(tmp_path: Path) -> None:
    _, averager = averaged_model()
    with averager.averaged():
        path = averager.save(tmp_path / "a" / "b" / "ema.safetensors")
    on_disk = load_file(path)
    for name, tensor in averager.averaged_tensors().items():
        assert torch.equal(on_disk[name], tensor)


@pytest.mark.parametrize("tied", [True, False])
def test_load_into_module_fills_tied_aliases(tmp_path: Path, tied: bool) -> None:
    _, averager = averaged_model(tied=True)
    path = averager.save(tmp_path / "ema.safetensors")
    target = TiedNet(tied=tied)  # an untied twin gets the shared weight under both names
    load_into_module(target, path)
    state = target.state_dict()
    assert set(state) == {*averager.names, "head.weight"}
    averaged = averager.averaged_tensors()
    for name, tensor in state.items():
        assert torch.equal(tensor, averaged["embed.weight" if name == "head.weight" else name]), name
    assert weightavg.load_into_module is load_into_module


def test_load_into_module_partial_export(tmp_path: Path) -> None:
    _, averager = averaged_model(buffers="ignore")
    path = averager.save(tmp_path / "params.safetensors")
    target = TiedNet()
    with pytest.raises(ValueError, match=r"missing keys \['norm.running_mean', 'norm.running_var', 'norm.num_b"):
        load_into_module(target, path)
    running_mean = target.norm.running_mean.clone()
    load_into_module(target, path, strict=False)
    assert torch.equal(target.norm.running_mean, running_mean)
    assert torch.equal(target.embed.weight, averager.averaged_tensors()["embed.weight"])


def test_load_errors_name_the_keys_and_the_file(tmp_path: Path) -> None:
    path = averaged_model()[1].save(tmp_path / "ema.safetensors")
    wider = nn.Module()
    wider.embed = nn.Embedding(10, 5)
    wider.norm = nn.BatchNorm1d(4)
    wider.head = nn.Linear(5, 10, bias=False)
    wider.extra = nn.Linear(2, 2)
    expected = (
        r"path='.*ema.safetensors' does not match the averaged model: missing keys \['extra.weight', 'extra.bias'\]"
        r".*mis-shaped keys \[embed.weight: expected \(10, 5\), found \(10, 4\); head.weight"
    )
    with pytest.raises(ValueError, match=expected):
        load_into_module(wider, path)
    # The averager of the untied model follows head.weight on its own; the file has it only as an alias.
    with pytest.raises(
        ValueError,
        match=r"path='.*ema.safetensors' does not match the averaged model: "
        r"missing keys \['head.weight', 'extra.weight', 'extra.bias'\], "
        r"mis-shaped keys \[embed.weight: expected \(10, 5\), found \(10, 4\)\]",
    ):
        Averager(wider, EMA()).load(path)
    smaller = nn.Module()
    smaller.embed = nn.Embedding(10, 4)
    with pytest.raises(ValueError, match=r"unexpected keys \[") as error:
        Averager(smaller, EMA()).load(path)
    for name in ("norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"):
        assert repr(name) in str(error.value)
    assert "missing" not in str(error.value)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match=r"path='.*absent.safetensors': no such safetensors file"):
        averaged_model()[1].load(missing)
    with pytest.raises(FileNotFoundError, match=r"absent.safetensors"):
        load_into_module(TiedNet(), missing)


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_the_old_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    _, averager = averaged_model()
    path = averager.save(tmp_path / "ema.safetensors")
    old_bytes = path.read_bytes()
    drift_model, changed = averaged_model()
    drift(drift_model, 7)
    changed.step()

    def write_half_then_fail(tensors: dict, file: BinaryIO, metadata: dict | None = None) -> None:
        file.write(b"partial")
        file.flush()
        assert path.read_bytes() == old_bytes, "must write to a temporary file, not the target"
        raise failure

    monkeypatch.setattr(io, "_write_safetensors", write_half_then_fail)
    with pytest.raises(type(failure)):
        changed.save(path)
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["ema.safetensors"], "no temporary file may remain"

    monkeypatch.undo()
    changed.save(path)
    assert os.listdir(tmp_path) == ["ema.safetensors"]
    assert torch.equal(load_file(path)["embed.weight"], changed.averaged_tensors()["embed.weight"])


def test_check_keys_lists_every_problem() -> None:
    expected = {"a": torch.Size([2]), "b": torch.Size([3, 1]), "c": torch.Size([])}
    found = {"a": torch.Size([2]), "b": torch.Size([3]), "d": torch.Size([1])}
    with pytest.raises(ValueError, match=r"^here does not match") as error:
        io.check_keys(expected, found, source="here")
    message = str(error.value)
    assert "missing keys ['c']" in message
    assert "unexpected keys ['d']" in message
    assert "mis-shaped keys [b: expected (3, 1), found (3,)]" in message
    io.check_keys(expected, dict(expected), source="here")


SAVE_PEAK = r"""
import json, sys, torch
from pathlib import Path
from torch import nn
from weightavg import EMA, Averager
torch.set_num_threads(1)


def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


model = nn.Sequential(nn.Linear(2000, 2500), nn.Linear(2500, 2000))  # 40 MB of fp32
averager = Averager(model, EMA(decay=0.5), contiguous=sys.argv[2] == "1")
averager.step()
averager.save(sys.argv[1] + ".warm")  # first use of every code path
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
start = status("VmRSS")
averager.save(sys.argv[1])
size = sum(t.numel() * t.element_size() for t in averager.averaged_tensors().values())
print(json.dumps({"growth": status("VmHWM") - start, "average_bytes": size}))
"""


@pytest.mark.parametrize("contiguous", [False, True])
def test_save_streams_the_average_without_a_model_sized_copy(tmp_path: Path, contiguous: bool) -> None:
    """The peak RSS of ``Averager.save`` of a 40 MB CPU average grows by well under the average's size (it used to
    copy every tensor, then safetensors turned each into bytes: about two averages more); the file still loads."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to read and reset the peak RSS")
    path = tmp_path / "avg.safetensors"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", SAVE_PEAK, str(path), str(int(contiguous))],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout)
    assert measured["average_bytes"] > 39e6
    assert measured["growth"] < 0.25 * measured["average_bytes"], measured
    loaded = load_file(str(path))
    assert sorted(loaded) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert loaded["0.weight"].shape == (2500, 2000) and loaded["0.weight"].dtype == torch.float32
    path.unlink()
    Path(str(path) + ".warm").unlink()


KILLED_EXPORTS = r"""
import contextlib, json, os, random, signal, sys, time, torch
from pathlib import Path
from safetensors.torch import load_file
from weightavg.core import io
torch.set_num_threads(1)
target, chance = Path(sys.argv[1]), random.Random(1234)


def export(value):
    io.save_safetensors({"w": torch.full((8_000_000,), float(value))}, target)  # 32 MB


export(0)
start = time.monotonic()
export(0)
duration = time.monotonic() - start
trials = []
for value in range(1, 25):
    pid = os.fork()
    if pid == 0:
        export(value)
        os._exit(0)
    time.sleep(chance.uniform(0.0, 1.3 * duration))
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)  # a real kill at a random moment of the export (or just after it)
    _, status = os.waitpid(pid, 0)
    w = load_file(str(target))["w"]
    complete = bool(torch.equal(w, torch.full_like(w, float(w[0]))))
    leftovers = sorted(p.name for p in target.parent.iterdir() if p != target)
    trials.append([value, os.waitstatus_to_exitcode(status), float(w[0]), complete, leftovers])
export(99)
print(json.dumps({"trials": trials, "after": sorted(os.listdir(target.parent))}))
"""


def test_killed_exports_leave_the_old_or_new_file_and_the_next_export_removes_their_temporaries(
    tmp_path: Path,
) -> None:
    """Exports SIGKILLed at random moments: the target is always the previous or the new complete file, and each
    export removes the temporaries earlier killed ones left (they used to stay, up to model size each)."""
    folder = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORTS, str(folder / "avg.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    current, killed_with_leftover = 0.0, 0
    for value, code, found, complete, leftovers in result["trials"]:
        assert complete and found in (current, float(value)), (value, found, current)
        current = found
        assert all(io.TEMPORARY_MARK in name and name.startswith(".avg.safetensors") for name in leftovers), leftovers
        assert len(leftovers) <= 1, leftovers  # this export's own, at most: earlier ones were removed
        if code == 0:
            assert leftovers == [], leftovers  # a completed export leaves nothing behind
        killed_with_leftover += bool(leftovers)
    assert killed_with_leftover >= 2, result["trials"]  # the kills did hit exports mid-write
    assert result["after"] == ["avg.safetensors"]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_every_load_names_a_damaged_file(tmp_path: Path, damage: str) -> None:
    from weightavg import combine as command
    from weightavg.core.snapshots import combine

    _, averager = averaged_model()
    path = averager.save(tmp_path / "ema.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    quoted = f"'{path}'"
    for load, label in (
        (lambda: averager.load(path), f"path={quoted}"),
        (lambda: averager.load_weights(path, argument="anchor"), f"anchor={quoted}"),
        (lambda: load_into_module(TiedNet(), path), f"path={quoted}"),
        (lambda: combine([path], [1.0]), quoted),
    ):
        with pytest.raises(io.DamagedFileError, match=rf"{re.escape(label)} is damaged"):
            load()
    output = tmp_path / "out.safetensors"
    stderr = io_module.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert command.main([str(path), "--output", str(output), "--no-progress"]) == 2
    assert str(path) in stderr.getvalue() and "damaged" in stderr.getvalue(), stderr.getvalue()
