"""weightavg.core.snapshots: the snapshot store (memory, disk, background writer), its recovery after an interrupted
or killed run, and ``combine`` against a float64 sum written out here, in place into modules, with constant memory."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from weightavg.core import io
from weightavg.core.snapshots import MANIFEST, SnapshotInfo, SnapshotStore, combine, open_weights

REPO = Path(__file__).resolve().parents[2]


def bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def random_states(k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """K float32 state dicts shaped like ``bn_net`` (BatchNorm's step counter differs in each)."""
    generator = torch.Generator().manual_seed(seed)
    template = bn_net().state_dict()
    states = []
    for i in range(k):
        state = {}
        for name, tensor in template.items():
            if tensor.is_floating_point():
                state[name] = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            else:
                state[name] = torch.full_like(tensor, 100 + i)
        states.append(state)
    return states


def reference_sum(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i theta_i in float64, one tensor at a time; integer entries from the last state."""
    out = {}
    for name in states[0]:
        if states[0][name].is_floating_point():
            total = torch.zeros(states[0][name].shape, dtype=torch.float64)
            for state, weight in zip(states, weights, strict=True):
                total = total + weight * state[name].double()
            out[name] = total
        else:
            out[name] = states[-1][name].clone()
    return out


def make_store(kind: str, folder: Path, keep: int | None = None) -> SnapshotStore:
    if kind == "memory":
        return SnapshotStore(None, keep=keep)
    return SnapshotStore(folder, keep=keep, background=kind == "background")


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def manifest_of(folder: Path) -> list[dict]:
    return json.loads((folder / MANIFEST).read_text())["snapshots"]


def contents(store: SnapshotStore, snapshot: SnapshotInfo) -> dict[str, torch.Tensor]:
    with store.open(snapshot) as tensors:
        return {name: tensors[name].clone() for name in tensors}


def assert_same_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(found) == set(expected)
    for name in expected:
        assert found[name].dtype == expected[name].dtype, name
        assert torch.equal(found[name], expected[name]), name


# ---------------------------------------------------------------------------------------------------- the store
@pytest.mark.parametrize("kind", ["memory", "disk", "background"])
def test_keep_keeps_the_newest_snapshots(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "snaps"
    store = make_store(kind, folder, keep=3)
    states = random_states(6)
    for i, state in enumerate(states):
        returned = store.add(state, step=10 * i, epoch=i // 2, metrics={"loss": 1.0 / (i + 1), "acc": i})
        assert returned.step == 10 * i
    store.flush()
    kept = store.snapshots
    assert [s.step for s in kept] == [30, 40, 50]
    assert [s.epoch for s in kept] == [1, 2, 2]
    assert [s.metrics for s in kept] == [{"loss": 1.0 / (i + 1), "acc": float(i)} for i in (3, 4, 5)]
    assert len(store) == 3
    for snapshot, state in zip(kept, states[3:], strict=True):
        assert_same_tensors(contents(store, snapshot), state)
    if kind == "memory":
        assert all(s.path is None for s in kept)
        assert not folder.exists()
    else:
        names = [f"snapshot-{step:09d}.safetensors" for step in (30, 40, 50)]
        assert [s.path for s in kept] == [folder / name for name in names]
        assert files_in(folder) == sorted([*names, MANIFEST])  # older files deleted, no temporaries left
        assert manifest_of(folder) == [
            {"step": 10 * i, "epoch": i // 2, "metrics": {"loss": 1.0 / (i + 1), "acc": float(i)}, "file": name}
            for i, name in zip((3, 4, 5), names, strict=True)
        ]
    store.close()


@pytest.mark.parametrize("kind", ["memory", "disk", "background"])
def test_snapshots_are_copies_of_the_model(tmp_path: Path, kind: str) -> None:
    model = bn_net()
    store = make_store(kind, tmp_path / "snaps")
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    store.add(model.state_dict(), step=1)
    with torch.no_grad():  # training goes on at once, before a background writer had time to write
        for tensor in model.state_dict().values():
            tensor.add_(7)
    store.flush()
    assert_same_tensors(contents(store, store.snapshots[0]), before)
    store.close()


@pytest.mark.parametrize("kind", ["memory", "disk", "background"])
def test_steps_must_increase(tmp_path: Path, kind: str) -> None:
    store = make_store(kind, tmp_path / "snaps")
    state = random_states(1)[0]
    store.add(state, step=5)
    with pytest.raises(ValueError, match="step=5"):
        store.add(state, step=5)
    with pytest.raises(ValueError, match="step=3"):
        store.add(state, step=3)
    store.add(state, step=6)
    store.flush()
    assert [s.step for s in store.snapshots] == [5, 6]
    store.close()
    if kind != "memory":  # a store opened on the folder knows the newest step too
        reopened = SnapshotStore(tmp_path / "snaps")
        with pytest.raises(ValueError, match="step=6"):
            reopened.add(state, step=6)
        reopened.add(state, step=7)
        assert [s.step for s in reopened.snapshots] == [5, 6, 7]


@pytest.mark.parametrize("kind", ["memory", "disk", "background"])
def test_discard_after_drops_newer_snapshots_and_allows_their_steps_again(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "snaps"
    store = make_store(kind, folder)
    states = random_states(7, seed=3)
    for i, state in enumerate(states[:5]):
        store.add(state, step=10 * i, metrics={"loss": float(i)})
    store.discard_after(25)
    assert [s.step for s in store.snapshots] == [0, 10, 20]
    if kind != "memory":
        assert files_in(folder) == sorted([f"snapshot-{s:09d}.safetensors" for s in (0, 10, 20)] + [MANIFEST])
        assert [entry["step"] for entry in manifest_of(folder)] == [0, 10, 20]
    # The resumed run takes new snapshots at the discarded steps.
    store.add(states[5], step=30)
    store.add(states[6], step=40)
    store.flush()
    assert [s.step for s in store.snapshots] == [0, 10, 20, 30, 40]
    assert_same_tensors(contents(store, store.snapshots[3]), states[5])
    assert_same_tensors(contents(store, store.snapshots[4]), states[6])
    assert_same_tensors(contents(store, store.snapshots[2]), states[2])
    store.discard_after(-1)
    assert store.snapshots == []
    store.add(states[0], step=0)
    store.flush()
    assert [s.step for s in store.snapshots] == [0]
    store.close()


def fill(folder: Path, n: int = 4, keep: int | None = None) -> tuple[list[SnapshotInfo], list[dict[str, torch.Tensor]]]:
    store = SnapshotStore(folder, keep=keep)
    states = random_states(n, seed=1)
    for i, state in enumerate(states):
        store.add(state, step=3 * i + 1, epoch=i, metrics={"loss": 2.0 - i / 4})
    store.close()
    return store.snapshots, states


def test_recovery_finds_snapshots_with_their_metadata(tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    written, states = fill(folder, keep=3)
    recovered = SnapshotStore(folder)
    assert recovered.snapshots == written
    assert [s.step for s in written] == [4, 7, 10]
    for snapshot, state in zip(recovered.snapshots, states[1:], strict=True):
        assert_same_tensors(contents(recovered, snapshot), state)
    assert [entry["step"] for entry in manifest_of(folder)] == [4, 7, 10]


@pytest.mark.parametrize("damage", ["deleted", "stale", "garbage"])
def test_recovery_rebuilds_the_manifest_from_file_metadata(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "snaps"
    written, states = fill(folder)
    manifest = folder / MANIFEST
    expected_manifest = manifest_of(folder)
    if damage == "deleted":
        manifest.unlink()
    elif damage == "stale":  # e.g. killed between a file's rename and the manifest update, and after a deletion
        stale = {
            "version": 1,
            "snapshots": [
                {"step": 1, "epoch": 0, "metrics": {}, "file": "snapshot-000000001.safetensors"},
                {"step": 99, "epoch": 9, "metrics": {"loss": 0.0}, "file": "snapshot-000000099.safetensors"},
            ],
        }
        manifest.write_text(json.dumps(stale))
    else:
        manifest.write_text("{not json")
    before = manifest.read_bytes() if manifest.exists() else None
    recovered = SnapshotStore(folder)
    assert recovered.snapshots == written
    for snapshot, state in zip(recovered.snapshots, states, strict=True):
        assert_same_tensors(contents(recovered, snapshot), state)
    # Opening only reads (a live writer may own the folder); the writer's first write repairs the manifest.
    assert (manifest.read_bytes() if manifest.exists() else None) == before
    recovered.discard_after(10)
    assert manifest.is_file()
    assert manifest_of(folder) == expected_manifest


def test_the_writer_removes_killed_writers_temporaries_only_and_foreign_files_stay_unlisted(tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    written, _ = fill(folder, n=2)
    data = written[-1].path.read_bytes()  # type: ignore[union-attr]
    mark = io.TEMPORARY_MARK
    leftovers = [folder / f".snapshot-000000011.safetensors{mark}4242-x1y2", folder / f".{MANIFEST}{mark}4243-ab"]
    leftovers[0].write_bytes(data[: len(data) // 2])
    leftovers[1].write_bytes(data)  # even a complete temporary: it was never renamed, so never committed
    # A live writer's temporary (locked, as a writer holds it until its rename), and files that are not ours.
    live_handle, live = io._locked_temporary(folder / "snapshot-000000012.safetensors")
    foreign = [folder / ".tmpAbC123", folder / ".snapshot-000000013.safetensors.tmp"]
    for path in foreign:
        path.write_bytes(b"someone else's")
    save_file({"w": torch.ones(3)}, str(folder / "snapshot-000000030.safetensors"))  # valid, but not one of ours
    save_file({"w": torch.ones(3)}, str(folder / "snapshot-000000031.safetensors"), metadata={"other": "x"})
    recovered = SnapshotStore(folder)
    assert recovered.snapshots == written
    assert all(path.exists() for path in leftovers)  # opening removes nothing: they may be a live writer's
    try:
        recovered.add(random_states(1)[0], step=5)  # the writer's first write removes the killed writers' leftovers
        assert not any(path.exists() for path in leftovers)
        assert Path(live).exists()  # but never a live writer's temporary
    finally:
        os.close(live_handle)
    assert all(path.exists() for path in foreign)
    assert [s.step for s in recovered.snapshots] == [1, 4, 5]
    assert [entry["step"] for entry in manifest_of(folder)] == [1, 4, 5]
    assert (folder / "snapshot-000000030.safetensors").exists()  # foreign files are left alone
    assert io.remove_stale_temporaries(folder) == [Path(live)]  # once its writer is gone, it is a leftover too


DAMAGES = {
    "truncated": lambda data: data[: len(data) // 2],
    "one byte short": lambda data: data[:-1],
    "zeros": lambda data: b"\x00" * 64,
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_snapshot_file_is_refused_by_name_or_skipped_with_a_warning(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "snaps"
    written, _ = fill(folder, n=4)
    victim = written[1].path
    assert victim is not None
    victim.write_bytes(DAMAGES[damage](victim.read_bytes()))
    for read_only in (False, True):
        with pytest.raises(ValueError, match=f"{victim}.*damaged.*skip_damaged=True"):
            SnapshotStore(folder, read_only=read_only)
    with pytest.warns(UserWarning, match=f"skipping damaged snapshot file {victim}"):
        skipping = SnapshotStore(folder, read_only=True, skip_damaged=True)
    assert skipping.snapshots == [written[0], *written[2:]]
    assert [path for path, _ in skipping.skipped] == [victim]
    assert victim.exists()  # left alone


# ------------------------------------------------------------------------------------------- background writer
def test_background_writer_gives_the_same_results_as_the_foreground(tmp_path: Path) -> None:
    states = random_states(7, seed=5)
    stores = {
        mode: SnapshotStore(tmp_path / mode, keep=4, background=mode == "background")
        for mode in ("foreground", "background")
    }
    for store in stores.values():
        for i, state in enumerate(states):
            store.add(state, step=2 * i, epoch=i, metrics={"loss": 0.5 * i})
        store.flush()
    fore, back = stores["foreground"], stores["background"]
    assert [s.describe() for s in back.snapshots] == [s.describe() for s in fore.snapshots]
    assert [s.step for s in back.snapshots] == [6, 8, 10, 12]
    assert files_in(tmp_path / "background") == files_in(tmp_path / "foreground")
    assert manifest_of(tmp_path / "background") == manifest_of(tmp_path / "foreground")
    for a, b in zip(fore.snapshots, back.snapshots, strict=True):
        assert_same_tensors(load_file(str(b.path)), load_file(str(a.path)))
    for store in stores.values():
        store.close()
        store.close()  # closing twice is allowed


def test_flush_waits_for_every_pending_write(tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    store = SnapshotStore(folder, background=True)
    big = torch.arange(2_000_000, dtype=torch.float32)  # 8 MB per snapshot: writes take a while
    for step in range(1, 5):
        store.add({"w": big + step}, step=step)
    store.flush()
    names = [f"snapshot-{step:09d}.safetensors" for step in range(1, 5)]
    assert files_in(folder) == sorted([*names, MANIFEST])
    assert [entry["file"] for entry in manifest_of(folder)] == names
    for step, name in enumerate(names, start=1):
        assert torch.equal(load_file(str(folder / name))["w"], big + step)
    store.close()


def test_many_quick_background_adds_with_keep(tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    store = SnapshotStore(folder, keep=3, background=True)
    for step in range(60):
        store.add({"w": torch.full((50,), float(step)), "n": torch.tensor(step)}, step=step, metrics={"loss": step})
    store.close()
    assert [s.step for s in store.snapshots] == [57, 58, 59]
    assert files_in(folder) == sorted([f"snapshot-{s:09d}.safetensors" for s in (57, 58, 59)] + [MANIFEST])
    assert [entry["step"] for entry in manifest_of(folder)] == [57, 58, 59]
    for snapshot in store.snapshots:
        tensors = load_file(str(snapshot.path))
        assert torch.equal(tensors["w"], torch.full((50,), float(snapshot.step)))
        assert int(tensors["n"]) == snapshot.step
    assert SnapshotStore(folder).snapshots == store.snapshots


def replace_folder_by_file(folder: Path) -> None:
    """Makes every write into ``folder`` fail, also for root (who ignores permission bits)."""
    shutil.rmtree(folder)
    folder.write_text("not a folder")


def test_background_write_error_surfaces_at_flush(tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    store = SnapshotStore(folder, background=True)
    store.add({"w": torch.ones(3)}, step=1)
    store.flush()
    replace_folder_by_file(folder)
    store.add({"w": torch.ones(3)}, step=2)  # queued: the failure is the writer thread's
    with pytest.raises(RuntimeError, match="snaps"):
        store.flush()
    assert [s.step for s in store.snapshots] == [1]  # the failed write is not listed
    store.close()


def test_background_write_error_surfaces_at_the_next_add(tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    store = SnapshotStore(folder, background=True)
    store.add({"w": torch.ones(3)}, step=0)  # the writer's first write claims the folder (in the caller's thread)
    store.flush()
    replace_folder_by_file(folder)
    store.add({"w": torch.ones(3)}, step=1)
    deadline = time.monotonic() + 10
    step = 2
    with pytest.raises(RuntimeError, match="snaps"):
        while time.monotonic() < deadline:  # some add after the writer met the error must raise it
            store.add({"w": torch.ones(3)}, step=step)
            step += 1
            time.sleep(0.01)
    assert [s.step for s in store.snapshots] == [0]
    store.close()


def test_foreground_write_error_raises_at_add(tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    store = SnapshotStore(folder)
    replace_folder_by_file(folder)
    with pytest.raises(OSError):
        store.add({"w": torch.ones(3)}, step=0)
    assert store.snapshots == []


# ------------------------------------------------------------------------------------------ killed writer
WRITERS = r"""
import os, sys, traceback
import torch
from weightavg.core.snapshots import SnapshotStore
torch.set_num_threads(1)


def write_forever(folder, background, size):
    store = SnapshotStore(folder, keep=4, background=background)
    base = torch.arange(size, dtype=torch.float32)
    step = 0
    while True:
        step += 1
        store.add({"big": base + step, "small": torch.full((3,), -float(step)), "count": torch.tensor(step)},
                  step=step, epoch=step // 3, metrics={"loss": 1.0 / step})
        if background and step % 3 == 0:
            store.flush()  # at most three snapshots queued


# One import of torch, then one forked writer per folder (argv: size, then folder and 0/1 for background pairs).
size, specs = int(sys.argv[1]), sys.argv[2:]
children = []
for folder, background in zip(specs[::2], specs[1::2]):
    pid = os.fork()
    if pid == 0:
        try:
            write_forever(folder, background == "1", size)
        except BaseException:
            traceback.print_exc()
        os._exit(1)
    children.append(pid)
print(*children, flush=True)
for pid in children:
    _, status = os.waitpid(pid, 0)
    print(pid, os.waitstatus_to_exitcode(status), flush=True)
"""
SIZE = 3_000_000  # 12 MB per snapshot; base + step stays exact in float32


@functools.cache
def writer_base() -> torch.Tensor:
    return torch.arange(SIZE, dtype=torch.float32)


def written_by_writer(step: int) -> dict[str, torch.Tensor]:
    """What the writer saved at ``step`` (``arange + step`` is exact in float32 below 2**24)."""
    return {"big": writer_base() + step, "small": torch.full((3,), -float(step)), "count": torch.tensor(step)}


def writing_snapshot_bytes(folder: Path) -> bool:
    """Whether a snapshot's bytes are being written in ``folder``: a temporary (hidden) file holding some, or any file
    holding some but fewer than a whole snapshot's."""
    for path in folder.iterdir():
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # renamed or deleted meanwhile
            continue
        if size >= 1_000_000 and (path.name.startswith(".") or size < 4 * SIZE):
            return True
    return False


def test_a_killed_writer_never_leaves_a_listed_partial_snapshot(tmp_path: Path) -> None:
    chance = random.Random(1234)
    # (background writer?, when to kill it once two snapshots exist: while a snapshot's bytes are being written, as
    # soon as a temporary file exists, or after a random delay; in any case at most 3 s later)
    trials = [(False, "bytes"), (True, "bytes"), (False, "temporary"), (True, chance.uniform(0.0, 0.2))]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    folders = [tmp_path / f"run{index}" for index in range(len(trials))]
    specs = [
        str(item) for folder, (background, _) in zip(folders, trials, strict=True) for item in (folder, int(background))
    ]
    launcher = subprocess.Popen(
        [sys.executable, "-c", WRITERS, str(SIZE), *specs],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    pids: list[int] = []
    ready_at: dict[int, float] = {}
    killed: set[int] = set()
    deadline = time.monotonic() + 60
    try:
        pids = [int(pid) for pid in launcher.stdout.readline().split()]  # type: ignore[union-attr]
        assert len(pids) == len(trials), launcher.stderr.read()  # type: ignore[union-attr]
        while len(killed) < len(pids) and time.monotonic() < deadline:
            assert launcher.poll() is None, launcher.stderr.read()  # type: ignore[union-attr]
            for index, folder in enumerate(folders):
                if index in killed:
                    continue
                if index not in ready_at:
                    if folder.is_dir() and len(list(folder.glob("snapshot-*.safetensors"))) >= 2:
                        ready_at[index] = time.monotonic()
                    continue
                when = trials[index][1]
                if when == "bytes":
                    due = writing_snapshot_bytes(folder)
                elif when == "temporary":
                    due = any(path.name.startswith(".") for path in folder.iterdir())
                else:
                    due = time.monotonic() >= ready_at[index] + float(when)
                due = due or time.monotonic() >= ready_at[index] + 3.0
                if due:
                    os.kill(pids[index], signal.SIGKILL)
                    killed.add(index)
            time.sleep(0.0005)
    finally:
        for index, pid in enumerate(pids):
            if index not in killed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        out, err = launcher.communicate(timeout=30)  # every writer reaped: nothing writes any more
    assert killed == set(range(len(trials))), f"some writer never wrote two snapshots: {err}"
    exits = dict(line.split() for line in out.splitlines())
    assert exits == {str(pid): str(-signal.SIGKILL) for pid in pids}, err  # killed, not crashed
    runs = [(folder, pid) for folder, pid in zip(folders, pids, strict=True)]
    leftovers = {}
    try:
        for index, (folder, _) in enumerate(runs):
            store = SnapshotStore(folder)
            listed = store.snapshots
            steps = [s.step for s in listed]
            assert len(steps) >= 2, (index, steps)
            assert steps == list(range(steps[0], steps[0] + len(steps))), (index, steps)  # none missing in between
            for snapshot in listed:
                assert snapshot.epoch == snapshot.step // 3
                assert snapshot.metrics == {"loss": 1.0 / snapshot.step}
                with open_weights(snapshot.path) as tensors:  # type: ignore[arg-type]
                    found = {name: tensors[name].clone() for name in tensors}
                assert_same_tensors(found, written_by_writer(snapshot.step))
            store.discard_after(steps[-1])  # what a resuming writer does first: it cleans its own leftovers
            assert not list(folder.glob(f".*{io.TEMPORARY_MARK}*")), index  # the interrupted write's temporary is gone
            # Every complete snapshot file in the folder is listed; nothing else named like a snapshot is.
            assert sorted(folder.glob("snapshot-*.safetensors")) == [s.path for s in listed]
            # Nothing else is left behind: the folder is the writer's alone, so any other file is debris of the killed
            # write (a snapshot-sized orphan per kill would fill the disk of a run that is preempted often).
            extra = sorted(set(files_in(folder)) - {s.path.name for s in listed} - {MANIFEST})  # type: ignore[union-attr]
            if extra:
                leftovers[index] = [(name, (folder / name).stat().st_size) for name in extra]
    finally:  # 60 MB per run: do not leave them to pytest's kept temporary folders
        for folder, _ in runs:
            shutil.rmtree(folder, ignore_errors=True)
    assert not leftovers, f"files left by killed writers after recovery: {leftovers}"


# ---------------------------------------------------------------------------------------------------- combine
def sources_for(kind: str, states: list[dict[str, torch.Tensor]], folder: Path) -> tuple[list, SnapshotStore | None]:
    if kind == "mappings":
        return list(states), None
    if kind == "memory":
        store = SnapshotStore(None)
        for i, state in enumerate(states):
            store.add(state, step=i)
        return store.snapshots, store
    store = SnapshotStore(folder)
    for i, state in enumerate(states):
        store.add(state, step=i)
    if kind == "disk":
        return store.snapshots, None  # files need no store
    if kind == "paths":
        return [str(s.path) for s in store.snapshots[:2]] + [s.path for s in store.snapshots[2:]], None
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["disk", "memory", "paths", "mappings"])
def test_combine_matches_a_float64_weighted_sum(tmp_path: Path, kind: str) -> None:
    states = random_states(5, seed=11)
    weights = (torch.randn(5, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3).tolist()
    assert any(w < 0 for w in weights) and any(w > 0 for w in weights)
    sources, store = sources_for(kind, states, tmp_path / "snaps")
    expected = reference_sum(states, weights)
    for dtype, tolerance in ((torch.float32, 2e-5), (torch.float64, 1e-12)):
        result = combine(sources, weights, store=store, dtype=dtype)
        assert set(result) == set(expected)
        for name, value in expected.items():
            if value.is_floating_point():
                assert result[name].dtype == dtype, name
                assert torch.allclose(result[name].double(), value, rtol=0, atol=tolerance), name
            else:
                assert result[name].dtype == value.dtype, name
                assert torch.equal(result[name], value), name  # integer buffers: the last source's
    # Weights as a tensor are accepted too.
    result = combine(sources, torch.tensor(weights, dtype=torch.float64), store=store, dtype=torch.float64)
    assert torch.allclose(result["0.weight"], expected["0.weight"], rtol=0, atol=1e-12)


def test_combine_into_a_bf16_module_in_place(tmp_path: Path) -> None:
    states = random_states(4, seed=4)
    weights = [0.7, -0.4, 1.5, -0.8]
    sources, _ = sources_for("disk", states, tmp_path / "snaps")
    model = bn_net(seed=9).to(torch.bfloat16)
    before = dict(model.state_dict(keep_vars=True))
    pointers = {name: t.data_ptr() for name, t in before.items()}
    parameters = list(model.parameters())
    result = combine(sources, weights, into=model)
    expected = reference_sum(states, weights)
    after = model.state_dict(keep_vars=True)
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    for name, tensor in after.items():
        assert tensor is before[name], name  # the same tensor objects, overwritten in place
        assert tensor.data_ptr() == pointers[name], name
        if expected[name].is_floating_point():
            assert tensor.dtype == torch.bfloat16, name
            assert torch.equal(tensor.detach(), result[name].to(torch.bfloat16)), name
            assert torch.allclose(tensor.detach().double(), expected[name], rtol=2**-7, atol=1e-2), name
        else:
            assert torch.equal(tensor, expected[name]), name  # num_batches_tracked of the last snapshot
    output = model(torch.randn(5, 4, dtype=torch.bfloat16))  # still a working model
    assert output.dtype == torch.bfloat16


def test_combine_into_a_mapping_of_tensors(tmp_path: Path) -> None:
    states = random_states(3, seed=8)
    weights = [0.2, 0.3, 0.5]
    targets = {
        name: torch.zeros_like(t, dtype=torch.float64) if t.is_floating_point() else torch.zeros_like(t)
        for name, t in states[0].items()
    }
    pointers = {name: t.data_ptr() for name, t in targets.items()}
    combine(states, weights, into=targets, dtype=torch.float64)
    expected = reference_sum(states, weights)
    for name, tensor in targets.items():
        assert tensor.data_ptr() == pointers[name]
        assert torch.allclose(tensor.double(), expected[name].double(), rtol=0, atol=1e-12), name


def test_float64_accumulation_beats_float32_on_cancelling_weights() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=generator, dtype=torch.float32)
    drift = torch.randn(4096, generator=generator, dtype=torch.float32) * 1e-3
    states = [{"w": x}, {"w": x + drift}, {"w": x - drift}]
    big = 2.0e5
    weights = [-big, big + 1.0, 0.5]  # large coefficients that cancel (LCSC's can be large and negative)
    expected = reference_sum(states, weights)["w"]
    error32 = (combine(states, weights)["w"].double() - expected).abs().max().item()
    error64 = (combine(states, weights, dtype=torch.float64)["w"] - expected).abs().max().item()
    assert error64 < 1e-8
    assert error32 > 1e-4  # float32 loses digits to the cancellation ...
    assert error64 < error32 / 1000  # ... that float64 keeps


def test_combine_errors(tmp_path: Path) -> None:
    states = random_states(3, seed=2)
    with pytest.raises(ValueError, match="weights"):
        combine(states, [0.5, 0.5])
    with pytest.raises(ValueError, match="weights"):
        combine([], [])
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"weights\[1\]"):
            combine(states, [0.3, bad, 0.7])
    missing = {k: v for k, v in states[1].items() if k != "1.running_var"}
    with pytest.raises(ValueError, match=r"sources\[1\].*1\.running_var"):
        combine([states[0], missing, states[2]], [1.0, 1.0, 1.0])
    extra = {**states[2], "extra.weight": torch.ones(2)}
    with pytest.raises(ValueError, match=r"sources\[2\].*extra\.weight"):
        combine([states[0], states[1], extra], [1.0, 1.0, 1.0])
    reshaped = {**states[1], "3.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"sources\[1\].*3\.bias"):
        combine([states[0], reshaped, states[2]], [1.0, 1.0, 1.0])
    wrong_model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 5))
    with pytest.raises(ValueError, match=r"3\.weight"):
        combine(states, [1.0, 1.0, 1.0], into=wrong_model)
    with pytest.raises(ValueError, match="dtype"):
        combine(states, [1.0, 1.0, 1.0], dtype=torch.float16)
    store = SnapshotStore(None)
    for i, state in enumerate(states):
        store.add(state, step=i)
    with pytest.raises(ValueError, match="store="):
        combine(store.snapshots, [1.0, 1.0, 1.0])
    with pytest.raises(FileNotFoundError):
        combine([tmp_path / "nothing.safetensors"], [1.0])


# -------------------------------------------------------------------------------------------- constant memory
MEASURE = r"""
import json, sys, torch
from pathlib import Path
from typing import Any
from weightavg.core.snapshots import combine
torch.set_num_threads(1)


def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


paths = sys.argv[1:]
warm = combine(paths[:1], [1.0])  # first use of every code path, then freed
del warm
growth = {}
for k in (2, len(paths)):
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start = status("VmRSS")
    result = combine(paths[:k], [(-1.0) ** i * (i + 1) for i in range(k)])
    growth[k] = status("VmHWM") - start
    result_bytes = sum(t.numel() * t.element_size() for t in result.values())
    del result
print(json.dumps({"growth": growth, "result_bytes": result_bytes}))
"""


def test_combine_memory_does_not_grow_with_the_number_of_snapshots(tmp_path: Path) -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to read and reset the peak RSS")
    shapes = {
        "a.weight": (2000, 2500),
        "a.bias": (2000,),
        "b.weight": (2500, 2400),
        "b.bias": (2500,),
        "c.weight": (1000, 1000),
        "n": (),
    }
    paths = []
    for i in range(12):  # twelve distinct ~48 MB snapshots on disk
        state = {name: torch.full(shape, 0.5 + i) if name != "n" else torch.tensor(i) for name, shape in shapes.items()}
        path = tmp_path / f"s{i}.safetensors"
        save_file(state, str(path))
        paths.append(str(path))
        del state
    model_bytes = sum(4 * torch.Size(shape).numel() for shape in shapes.values())
    assert 45e6 < model_bytes < 55e6
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, *paths], capture_output=True, text=True, timeout=120, env=env
        )
    finally:  # 580 MB of files: do not leave them to pytest's kept temporary folders
        for path in paths:
            Path(path).unlink()
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout)
    growth = {int(k): v for k, v in measured["growth"].items()}
    assert measured["result_bytes"] >= model_bytes
    assert growth[2] >= 0.9 * model_bytes, growth  # the measurement sees at least the accumulator
    assert growth[12] < growth[2] + model_bytes, growth  # about one accumulator plus one snapshot, whatever K


LCSC_PEAK = r"""
import json, sys, torch
from pathlib import Path
from torch import nn
import weightavg.core.snapshots as snapshots
from weightavg.methods.lcsc import Combiner
torch.set_num_threads(1)
snapshots._CHUNK_BYTES = 4 << 20  # below the 20 MB weights: every group is bounded by one tensor


def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


def reset():
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
    return status("VmRSS")


model = nn.Sequential(nn.Linear(2000, 2500), nn.Linear(2500, 2000))  # 40 MB of fp32
store = snapshots.SnapshotStore(None if sys.argv[2] == "memory" else sys.argv[1], keep=2)
combiner = Combiner(model, store)
measured = {"size": sum(p.numel() * 4 for p in model.parameters())}
for step in (1, 2, 3):  # the third take is into a full store
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * step)
    start = reset()
    combiner.take(step=step)
    measured[f"take{step}"] = status("VmHWM") - start
combiner.load([0.25, 0.75])  # first use of every code path
add, anonymous = torch._foreach_add_, []


def sampled(*args, **kwargs):  # anonymous memory (not the files' mapped pages) where it peaks: at each add
    anonymous.append(status("RssAnon"))
    return add(*args, **kwargs)


torch._foreach_add_ = sampled
start, anonymous_start = reset(), status("RssAnon")
combiner.load([-0.5, 1.5])
measured["load"] = status("VmHWM") - start
measured["load_anonymous"] = max(anonymous) - anonymous_start
torch._foreach_add_ = add
reference = {}  # the same sum written out: fp32 zeros plus each snapshot times its weight, oldest first
for snapshot, weight in zip(store.snapshots, [-0.5, 1.5]):
    with store.open(snapshot) as tensors:
        for name, tensor in tensors.items():
            reference.setdefault(name, torch.zeros(tensor.shape)).add_(tensor, alpha=weight)
got = combiner.averager.averaged_tensors()
measured["identical"] = sorted(got) == sorted(reference) and all(torch.equal(got[k], reference[k]) for k in reference)
print(json.dumps(measured))
"""


@pytest.mark.parametrize("where", ["memory", "files"])
def test_lcsc_snapshots_and_combinations_add_no_model_sized_copy(tmp_path: Path, where: str) -> None:
    """Peaks of a 40 MB model's LCSC: taking a snapshot into a full in-memory store holds ``keep`` copies, not
    ``keep + 1``; a synchronous file snapshot streams from the live tensors (it used to copy the model first);
    combining into the Combiner's fp32 buffer sums in place (it used to add a model-sized fp32 accumulator), reading
    files through their mapped pages; the result is bit-identical to the sum written out."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to read and reset the peak RSS")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", LCSC_PEAK, str(tmp_path / "snaps"), where],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout)
    size = measured["size"]
    assert size > 39e6 and measured["identical"], measured
    assert measured["take3"] < 0.25 * size, measured
    if where == "memory":
        assert measured["take1"] > 0.9 * size, measured  # the measurement sees the copy a memory store must hold
        assert measured["load"] < 0.25 * size, measured
    else:
        assert measured["take1"] < 0.25 * size, measured
        assert measured["load_anonymous"] < 0.25 * size, measured
        assert measured["load"] < 1.25 * size, measured  # at most one snapshot's mapped pages


def test_combine_in_place_handles_tied_and_aliased_targets_and_checks_before_writing() -> None:
    """Summing into ``into`` in place stays correct when two names share one tensor (tied weights) and when a source
    is ``into``'s own tensors; a source of the wrong shape is refused before ``into`` changes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    net[1].weight = net[0].weight  # tied: state_dict lists the tensor under both names
    other = {name: torch.randn_like(t) for name, t in net.state_dict().items()}
    other["1.weight"] = other["0.weight"]
    own = {name: t.detach().clone().double() for name, t in net.state_dict().items()}
    combine([net.state_dict(), other], [0.25, 0.75], into=net)
    expected = 0.25 * own["0.weight"] + 0.75 * other["0.weight"].double()
    torch.testing.assert_close(net[0].weight.double(), expected, rtol=1e-6, atol=1e-7)
    assert net[1].weight is net[0].weight
    before = net[0].weight.detach().clone()
    bad = {name: torch.zeros(6, 3) for name in other}
    with pytest.raises(ValueError, match=r"sources\[1\]"):
        combine([other, bad], [0.5, 0.5], into=net)
    assert torch.equal(net[0].weight, before)


# ------------------------------------------------------------------------------------------- failed writes, readers
FULL_DISK = r"""
import os, resource, signal, sys, torch
from weightavg.core.snapshots import SnapshotStore
torch.set_num_threads(1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE then fails with EFBIG, as a full disk does
folder, background = sys.argv[1], sys.argv[2] == "1"
store = SnapshotStore(folder, background=background)
store.add({"w": torch.zeros(10)}, step=1)
store.flush()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
try:
    store.add({"w": torch.ones(1_000_000)}, step=2)
    store.flush()
    print("NO ERROR")
except Exception as error:
    print("ERROR", type(error).__name__, error)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is free again: the same step is retried
store.add({"w": torch.ones(1_000_000)}, step=2)
store.close()
print("STEPS", [s.step for s in store.snapshots], sorted(os.listdir(folder)))
"""


@pytest.mark.parametrize("background", [False, True])
def test_a_failed_write_names_the_file_and_the_same_step_can_be_retried(tmp_path: Path, background: bool) -> None:
    folder = tmp_path / "snaps"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(folder), str(int(background))],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    error, steps = done.stdout.splitlines()[-2:]
    assert error.startswith("ERROR") and str(folder / "snapshot-000000002.safetensors") in error, error
    assert "File too large" in error
    names = ["manifest.json", "snapshot-000000001.safetensors", "snapshot-000000002.safetensors"]
    assert steps == f"STEPS [1, 2] {names}", steps  # retried, and no temporary left by the failed write
    assert torch.equal(load_file(str(folder / names[2]))["w"], torch.ones(1_000_000))


def folder_state(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_mode, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_opening_a_folder_to_read_changes_nothing_in_it(tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    written, states = fill(folder, n=3)
    (folder / f".snapshot-000000011.safetensors{io.TEMPORARY_MARK}1-abcd").write_bytes(b"a writer's temporary")
    (folder / MANIFEST).write_text('{"version": 1, "snapshots": []}')  # stale: a writer is about to rewrite it
    folder_mtime = folder.stat().st_mtime_ns
    before = folder_state(folder)
    for read_only in (True, False):
        store = SnapshotStore(folder, read_only=read_only)
        assert store.snapshots == written
        got = combine(store.snapshots, [1.0, 0.0, 0.0])
        assert_same_tensors(
            {k: v for k, v in got.items() if v.is_floating_point()},
            {k: v for k, v in states[0].items() if v.is_floating_point()},
        )
    assert folder_state(folder) == before and folder.stat().st_mtime_ns == folder_mtime
    with pytest.raises(RuntimeError, match="read_only=True"):
        SnapshotStore(folder, read_only=True).add(states[0], step=99)


LIVE_WRITERS = r"""
import os, sys, time, torch
from pathlib import Path
from typing import Any
from weightavg.core.snapshots import SnapshotStore
torch.set_num_threads(1)
stop, pids = Path(sys.argv[1]), []
for folder, background in zip(sys.argv[2::2], sys.argv[3::2]):
    pid = os.fork()
    if pid == 0:
        store, step = SnapshotStore(folder, keep=4, background=background == "1"), 0
        while not stop.exists():
            step += 1
            store.add({"w": torch.full((200_000,), float(step)), "n": torch.tensor(step)}, step=step)
        store.close()
        os._exit(0)
    pids.append(pid)
print(*[os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids], flush=True)
"""


def test_reading_a_folder_that_runs_are_writing_never_breaks_them(tmp_path: Path) -> None:
    """``python -m weightavg.combine`` (its ``main``) on folders that a foreground and a background writer keep writing:
    each read gives a uniform average of consecutive snapshots or a one-line error saying to read again; the writers
    never fail, and their folders end as they would alone (the newest four snapshots and their manifest)."""
    from weightavg import combine as command

    folders, stop = [tmp_path / "fore", tmp_path / "back"], tmp_path / "stop"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    specs = [str(item) for folder, bg in zip(folders, ("0", "1"), strict=True) for item in (folder, bg)]
    writers = subprocess.Popen(
        [sys.executable, "-c", LIVE_WRITERS, str(stop), *specs], env=env, text=True, stdout=subprocess.PIPE
    )
    outcomes: list[tuple[int, str]] = []
    try:
        deadline = time.monotonic() + 60
        while not all(len(list(f.glob("snapshot-*"))) >= 2 for f in folders if f.is_dir()) or not all(
            f.is_dir() for f in folders
        ):
            assert time.monotonic() < deadline and writers.poll() is None
            time.sleep(0.05)
        end = time.monotonic() + 8
        while time.monotonic() < end:
            for folder in folders:
                output, stderr = tmp_path / "out.safetensors", io_text()
                with contextlib.redirect_stderr(stderr):
                    code = command.main([str(folder), "--output", str(output), "--no-progress"])
                outcomes.append((code, stderr.getvalue()))
                if code == 0:
                    w, n = load_file(str(output))["w"], int(load_file(str(output))["n"])
                    assert torch.equal(w, torch.full_like(w, float(w[0])))  # no torn file
                    k = round((n - float(w[0])) * 2) + 1  # mean of k consecutive steps ending at n
                    assert 1 <= k <= 5 and abs(float(w[0]) - (n - (k - 1) / 2)) < 1e-3, (n, float(w[0]))  # fp32 sums
    finally:
        stop.write_text("")
        out, _ = writers.communicate(timeout=60)
    assert out.split() == ["0", "0"], out  # both writers finished cleanly
    for code, message in outcomes:
        assert code == 0 or (code == 2 and "read the folder again" in message), message
    assert sum(code == 0 for code, _ in outcomes) >= len(outcomes) // 4, outcomes
    for folder in folders:
        steps = [entry["step"] for entry in manifest_of(folder)]
        assert len(steps) == 4 and files_in(folder) == sorted(
            [MANIFEST, *(f"snapshot-{s:09d}.safetensors" for s in steps)]
        )


def io_text() -> Any:
    import io as text_io

    return text_io.StringIO()
