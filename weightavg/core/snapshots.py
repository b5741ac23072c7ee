"""Snapshots of a model's weights saved along a run, and their linear combinations streamed with constant memory.

``SnapshotStore`` keeps snapshots as safetensors files in a folder (atomic writes, optionally from a background
thread, a manifest beside them) or in host memory, keeps the last ``keep`` of them, and finds an interrupted run's
snapshots again (opening a folder only reads it; the writer alone repairs it, at its first write). ``combine``
computes ``sum_i w_i * theta_i`` from any snapshots, reading one snapshot at a time and accumulating in fp32 (or
fp64), so memory stays at about one model plus one snapshot whatever their number.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightavg.core import io, kernels
from weightavg.core.checks import check_number

MANIFEST = "manifest.json"
#: The ``directory`` that keeps snapshots in host memory instead of files (SQLite's spelling for an in-memory
#: database): ``keep`` copies of the model in RAM, lost on a crash and not found again on resume.
MEMORY = ":memory:"
_META = "weightavg.snapshot"


@dataclass(frozen=True)
class SnapshotInfo:
    """One saved set of weights.

    Attributes:
        step, epoch: training time when it was taken (optimizer steps and epochs done).
        metrics: numbers logged with it (e.g. the training loss), for metric-weighted averaging and greedy soups.
        path: its safetensors file (``None`` for snapshots held in memory).
    """

    step: int
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    path: Path | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "metrics": dict(self.metrics),
            "file": None if self.path is None else self.path.name,
        }


class SnapshotStore:
    """Snapshots of a run, on disk (``directory``) or in host memory (``directory=None`` or ``MEMORY``).

    Args:
        directory: the folder for ``snapshot-<step>.safetensors`` files and ``manifest.json``. Snapshots already
            there (an interrupted run's) are found again; ``discard_after(step)`` drops those newer than the
            checkpoint a run resumes from. Opening a folder only reads it (a run may be writing it); the writer
            removes leftover temporaries and rewrites the manifest at its first ``add``/``discard_after``.
        keep: keep only the newest ``keep`` snapshots (older files are deleted at the next ``add``; opening a folder
            deletes nothing, so a resumed run can still discard newer ones and keep the older); ``None`` keeps all.
            In memory, the oldest is dropped before the new one is copied, so at most ``keep`` copies are held.
        background: write files from a background thread (the tensors are copied to host memory first, so training
            can go on changing them; at most two snapshots wait, then ``add`` waits for the writer). A write is
            atomic (temporary file, fsync, rename, fsync of the folder) and enters the manifest only once complete,
            so a killed writer never leaves a listed but partial file. ``flush()`` waits for pending writes (call it
            before saving a checkpoint that counts on them); errors surface at the next ``add``/``flush``.
        read_only: only read the folder (``add``/``discard_after`` raise); the folder must exist.
        skip_damaged: a ``snapshot-*.safetensors`` file that cannot be read (truncated, corrupt) is skipped with a
            warning naming it (and listed in ``skipped``) instead of refused with ``ValueError``.

    Example:
        >>> store = SnapshotStore(None, keep=3)
        >>> model = nn.Linear(2, 2)
        >>> for step in range(5):
        ...     _ = store.add(model.state_dict(), step=step)
        >>> [s.step for s in store.snapshots]
        [2, 3, 4]
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        keep: int | None = None,
        background: bool = False,
        read_only: bool = False,
        skip_damaged: bool = False,
    ) -> None:
        if keep is not None:
            check_number("keep", keep, low=1, integer=True)
        for flag, value in (("background", background), ("read_only", read_only), ("skip_damaged", skip_damaged)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag}={value!r} must be a bool")
        if isinstance(directory, str) and directory == MEMORY:
            directory = None
        if background and directory is None:
            raise ValueError("background=True writes files: give a directory (snapshots in memory need no writer)")
        if read_only and (directory is None or background):
            raise ValueError("read_only=True reads a folder: give a directory, and no background writer")
        self.directory = None if directory is None else Path(directory)
        self.keep = keep
        self.read_only, self.skip_damaged = read_only, skip_damaged
        #: Damaged files skipped when the folder was opened (``skip_damaged=True``), with the reason.
        self.skipped: list[tuple[Path, str]] = []
        self._snapshots: list[SnapshotInfo] = []
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[SnapshotInfo, dict[str, torch.Tensor], dict[str, str]] | None] | None = None
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None
        self._failed: SnapshotInfo | None = None  # the background write that failed
        self._unwritten: list[SnapshotInfo] = []  # the background writes dropped after it
        self._claimed = False  # whether this writer has cleaned the folder (at its first write)
        if self.directory is not None:
            if read_only:
                if not self.directory.is_dir():
                    raise FileNotFoundError(f"directory={str(self.directory)!r} is not a folder of snapshots")
            else:
                self.directory.mkdir(parents=True, exist_ok=True)
            self._snapshots = self._recover()
        # The newest step added, written or not (a background write may still be queued).
        self._last_step: int | None = self._snapshots[-1].step if self._snapshots else None
        if background:
            self._queue = queue.Queue(maxsize=2)  # back-pressure: at most two snapshots wait in host memory
            self._worker = threading.Thread(target=self._write_loop, name="weightavg-snapshots", daemon=True)
            self._worker.start()

    # ------------------------------------------------------------------ reading
    @property
    def snapshots(self) -> list[SnapshotInfo]:
        """The complete snapshots, oldest first."""
        with self._lock:
            return list(self._snapshots)

    def __len__(self) -> int:
        return len(self.snapshots)

    @contextmanager
    def open(self, snapshot: SnapshotInfo) -> Iterator[Mapping[str, torch.Tensor]]:
        """Name -> tensor of one snapshot: memory-mapped from its file (read lazily), or the held tensors."""
        if snapshot.path is None:
            yield self._memory[snapshot.step]
            return
        with open_snapshot_file(snapshot) as tensors:
            yield tensors

    # ------------------------------------------------------------------ writing
    def add(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        step: int,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        aliases: Mapping[str, Sequence[str]] | None = None,
    ) -> SnapshotInfo:
        """Save a snapshot of ``tensors`` (copied to host memory now; written now or by the background thread).

        Raises:
            ValueError: for a step not after the newest snapshot's (resume with ``discard_after`` first).
            OSError: a failed write (e.g. a full disk), naming the file; nothing is listed and the step may be
                retried.
        """
        self._raise_pending()
        self._check_writable()
        check_number("step", step, low=0, integer=True)
        clean = {str(k): float(v) for k, v in (metrics or {}).items()}
        newest = self._last_step
        if newest is not None and step <= newest:
            raise ValueError(
                f"step={step} is not after the newest snapshot's step {newest}; a resumed run calls "
                "discard_after(step) with the step it resumes from"
            )
        if self.directory is None:
            # Drop the oldest before copying the new one: a full store holds ``keep`` copies, not ``keep + 1``.
            with self._lock:
                excess = 0 if self.keep is None else len(self._snapshots) - self.keep + 1
                dropped = self._snapshots[: max(excess, 0)]
                self._snapshots = self._snapshots[len(dropped) :]
            for old in dropped:
                self._forget(old)
        else:
            self._claim()
        if self.directory is not None and self._queue is None:
            # Written now: streamed from the tensors' own memory (host copies only of device or strided ones, one at a
            # time), never a model-sized copy.
            host = {name: t.detach() for name, t in tensors.items()}
        else:
            # Copies, one allocation each: the model trains on while the snapshot is held or waits to be written.
            host = {
                name: torch.empty_like(t, device="cpu", memory_format=torch.contiguous_format).copy_(t.detach())
                for name, t in tensors.items()
            }
        if self.directory is None:
            snapshot = SnapshotInfo(step, epoch, clean)
            self._memory[step] = host
            self._last_step = step
            self._commit(snapshot)
            return snapshot
        snapshot = SnapshotInfo(step, epoch, clean, self.directory / f"snapshot-{step:09d}.safetensors")
        metadata = {_META: json.dumps({"step": step, "epoch": epoch, "metrics": clean})}
        metadata.update(io.aliases_metadata({k: tuple(v) for k, v in (aliases or {}).items()}))
        if self._queue is not None:
            self._queue.put((snapshot, host, metadata))
            self._last_step = step  # queued: the next add must be newer (a failed write resets it)
        else:
            self._write(snapshot, host, metadata)  # raises before _last_step moves: the step may be retried
            self._last_step = step
        return snapshot

    def flush(self) -> None:
        """Wait until every snapshot added so far is on disk and in the manifest."""
        if self._queue is not None:
            self._queue.join()
        self._raise_pending()

    def close(self) -> None:
        """Flush and stop the background writer (a store can be closed more than once)."""
        if self._queue is not None and self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._queue, self._worker = None, None
        self._raise_pending()

    def discard_after(self, step: int) -> list[SnapshotInfo]:
        """Drop snapshots taken after ``step`` (those of an interrupted run past the checkpoint it resumes from);
        returns the dropped ones."""
        self.flush()
        self._check_writable()
        self._claim()
        with self._lock:
            dropped = [s for s in self._snapshots if s.step > step]
            self._snapshots = [s for s in self._snapshots if s.step <= step]
        for snapshot in dropped:
            self._forget(snapshot)
        self._last_step = self._snapshots[-1].step if self._snapshots else None
        self._write_manifest()
        return dropped

    def _check_writable(self) -> None:
        if self.read_only:
            raise RuntimeError(f"this SnapshotStore reads {self.directory} (read_only=True): it cannot write there")

    def _claim(self) -> None:
        """The writer's first write: remove what its own interrupted writes left (temporaries) and rebuild the
        manifest from the files. Never done by merely opening a folder: a reader would break a live writer."""
        if self._claimed or self.directory is None:
            return
        # Writes that never completed: temporaries of killed writers (a live writer's stay locked, and are kept).
        io.remove_stale_temporaries(self.directory)
        self._claimed = True
        self._write_manifest()  # rebuilt from the files: a missing or stale manifest is repaired

    def _write_loop(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._write(*item)
                else:
                    self._unwritten.append(item[0])  # after a failure nothing more is written until it is raised
            except BaseException as error:  # kept for the caller: a writer thread has nobody else to tell
                self._failed = item[0] if item is not None else None
                self._error = error
            finally:
                self._queue.task_done()

    def _write(self, snapshot: SnapshotInfo, host: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        assert snapshot.path is not None
        try:
            io.save_safetensors(host, snapshot.path, metadata=metadata)
            _fsync_folder(snapshot.path.parent)  # the rename itself is durable before the snapshot is listed
        except Exception as error:  # e.g. a full disk: name the snapshot (the OS names at most the temporary)
            if isinstance(error, OSError) and error.errno is not None:
                raise OSError(
                    error.errno, f"could not write snapshot step {snapshot.step} ({error.strerror})", str(snapshot.path)
                ) from error
            # safetensors reports its own I/O failures (a full disk, a file size limit) as a SafetensorError
            raise OSError(f"could not write snapshot step {snapshot.step} to {snapshot.path}: {error}") from error
        self._commit(snapshot)

    def _commit(self, snapshot: SnapshotInfo) -> None:
        with self._lock:
            self._snapshots.append(snapshot)
            dropped = [] if self.keep is None else self._snapshots[: -self.keep]
            self._snapshots = self._snapshots[len(dropped) :]
        for old in dropped:
            self._forget(old)
        self._write_manifest()

    def _forget(self, snapshot: SnapshotInfo) -> None:
        self._memory.pop(snapshot.step, None)
        if snapshot.path is not None:
            snapshot.path.unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        if self.directory is None:
            return
        with self._lock:
            listed = [s.describe() for s in self._snapshots]
        text = json.dumps({"version": 1, "snapshots": listed}, indent=1)
        io.write_text_atomically(self.directory / MANIFEST, text)

    def _raise_pending(self) -> None:
        if self._error is None:
            return
        if self._queue is not None:
            self._queue.join()  # the writes queued after the failure are dropped: wait until all are accounted for
        error, failed, unwritten = self._error, self._failed, list(self._unwritten)
        self._error, self._failed, self._unwritten = None, None, []
        # Nothing past the newest written snapshot is on disk: those steps may be added again.
        with self._lock:
            self._last_step = self._snapshots[-1].step if self._snapshots else None
        lost = [s.step for s in ([] if failed is None else [failed]) + unwritten]
        raise RuntimeError(
            f"writing snapshots into {self.directory} failed: {error}; steps {lost} were not written (the newest on "
            f"disk is step {self._last_step}; add them again once the cause is fixed)"
        ) from error

    def _recover(self) -> list[SnapshotInfo]:
        """Snapshots already in the folder: every complete file, described by its own metadata (the writer rewrites
        the manifest from them, so a run killed between a rename and a manifest update loses nothing). Reads only."""
        assert self.directory is not None
        found = []
        for path in sorted(self.directory.glob("snapshot-*.safetensors")):
            try:
                with io.open_safetensors(path, label=f"snapshot file {path}") as handle:
                    text = (handle.metadata() or {}).get(_META)
                if text is None:
                    continue  # a complete safetensors file that is not one of ours: leave it alone, unlisted
                meta = json.loads(text)
                info = SnapshotInfo(int(meta["step"]), meta.get("epoch"), dict(meta.get("metrics", {})), path)
            except FileNotFoundError:
                continue  # deleted since it was listed (the writer keeps only ``keep``): not damaged
            except Exception as error:  # truncated or corrupt: never dropped silently
                reason = error.reason if isinstance(error, io.DamagedFileError) else io.describe_error(error)
                if not self.skip_damaged:
                    raise io.DamagedFileError(
                        f"snapshot file {path} is damaged and cannot be read ({reason}); move it out of the folder, "
                        "or skip damaged files explicitly (SnapshotStore(..., skip_damaged=True), "
                        "python -m weightavg.combine --skip-damaged)"
                    ) from error
                warnings.warn(f"weightavg: skipping damaged snapshot file {path} ({reason})", stacklevel=3)
                self.skipped.append((path, reason))
                continue
            found.append(info)
        found.sort(key=lambda s: s.step)
        return found


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX: the folder's own entry list must reach the disk)."""
    if os.name != "posix":
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextmanager
def open_weights(path: str | os.PathLike[str], *, label: str | None = None) -> Iterator[Mapping[str, torch.Tensor]]:
    """A lazy name -> tensor mapping over a safetensors file (memory-mapped; each tensor read on access). A missing,
    truncated or corrupt file raises naming it (as ``label``, by default its path)."""
    with io.open_safetensors(path, label=label or repr(str(path))) as handle:
        yield _LazyTensors(handle)


@contextmanager
def open_snapshot_file(snapshot: SnapshotInfo) -> Iterator[Mapping[str, torch.Tensor]]:
    """``open_weights`` of a listed snapshot's file; ``FileNotFoundError`` saying to list again if it was deleted since
    it was listed (a run writing the folder deletes its oldest snapshots: a reader of a live folder may see that)."""
    assert snapshot.path is not None
    with ExitStack() as stack:
        try:
            tensors = stack.enter_context(open_weights(snapshot.path, label=f"snapshot file {snapshot.path}"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"snapshot file {snapshot.path} (step {snapshot.step}) was deleted after its folder was read (a run "
                "writing the folder keeps only its newest snapshots); read the folder again"
            ) from None
        yield tensors


class _LazyTensors(Mapping[str, torch.Tensor]):
    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._keys = list(handle.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        tensor: torch.Tensor = self._handle.get_tensor(key)
        return tensor

    def shapes(self) -> dict[str, torch.Size]:
        return {key: torch.Size(self._handle.get_slice(key).get_shape()) for key in self._keys}

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


_CHUNK_BYTES = 64 * 2**20  # what combine holds of one source at a time (beyond what the file's page cache holds)

SnapshotSource = SnapshotInfo | Mapping[str, torch.Tensor] | str | os.PathLike[str]


@torch.no_grad()
def combine(
    sources: Sequence[SnapshotSource],
    weights: Sequence[float] | torch.Tensor,
    *,
    into: nn.Module | Mapping[str, torch.Tensor] | None = None,
    store: SnapshotStore | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """``sum_i weights[i] * sources[i]`` over floating entries; integer entries from the last source.

    Sources are read one at a time (memory-mapped files, in-memory snapshots or mappings), each added with batched
    ``add_`` ops into an accumulator of ``dtype`` (fp32, or fp64 on request), or of the ``into`` tensor's own dtype
    where that is wider (a float64 model sums in float64). Memory beyond ``into`` and the sources is at most 64 MiB of
    one source's tensors at a time plus, for each ``into`` tensor not of that dtype (or without ``into``), an
    accumulator of its size: ``into`` tensors of that dtype are summed in place (the same result). Every
    source's names and shapes are checked first, so an error there leaves ``into`` unchanged.

    Args:
        sources: snapshots (of ``store``, or files), safetensors paths, or name -> tensor mappings; oldest first
            (the last one gives the integer buffers).
        weights: one coefficient per source (any real numbers; LCSC's may be negative).
        into: a module (its ``state_dict`` tensors are overwritten in place, cast to their dtype) or a mapping of
            tensors to fill; the accumulator lives on their device. Without it the result stays on ``device``.
        store: the store that holds in-memory snapshots.
        dtype: accumulation dtype (``torch.float32`` or ``torch.float64``; at least the ``into`` tensor's).
        device: where to accumulate without ``into`` (default CPU).

    Returns:
        Name -> combined tensor (``into``'s own where it was summed in place, else the accumulator).

    Raises:
        ValueError: naming the argument when lengths differ, a weight is not finite, or the sources' keys or shapes
            differ from the first's (or ``into``'s).
    """
    coefficients = [float(w) for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(coefficients) != len(sources) or not sources:
        raise ValueError(f"weights has {len(coefficients)} entries for {len(sources)} sources; give one per source")
    for index, weight in enumerate(coefficients):
        check_number(f"weights[{index}]", weight)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype!r} must be torch.float32 or torch.float64")
    targets = (
        None
        if into is None
        else (io.read_weights(into, argument="into") if isinstance(into, nn.Module) else dict(into))
    )
    # Every source's names and shapes are checked before anything is written: a bad source leaves ``into`` as it was.
    expected: dict[str, torch.Size] = {}
    for index, source in enumerate(sources):
        with _open_source(source, store) as tensors:
            shapes = _shapes(tensors)
        if index == 0:
            expected = shapes
            if targets is not None:
                io.check_keys(
                    {k: v.shape for k, v in targets.items() if k in shapes},
                    shapes,
                    source=_label(sources, 0),
                    against="into",
                )
        else:
            io.check_keys(expected, shapes, source=_label(sources, index), against=_label(sources, 0))
    # A target of the accumulation dtype is the accumulator itself (no model-sized fp32 copy beside it), unless a
    # source shares its memory; the sums are the same either way.
    shared = {
        t.untyped_storage().data_ptr() for source in sources if isinstance(source, Mapping) for t in source.values()
    }
    accumulators: dict[str, torch.Tensor] = {}
    in_place: set[str] = set()
    for name, shape in expected.items():
        target = None if targets is None else targets.get(name)
        free = target is not None and target.untyped_storage().data_ptr() not in shared
        # Never below the target's own precision: a float64 model's combination sums in float64.
        wanted = dtype if target is None or not target.is_floating_point() else torch.promote_types(dtype, target.dtype)
        if target is not None and free and target.dtype == wanted:
            accumulators[name] = target.data
            in_place.add(name)
            shared.add(target.untyped_storage().data_ptr())  # a tied name (same tensor) gets its own accumulator
        else:
            place = torch.device(device or "cpu") if target is None else target.device
            accumulators[name] = torch.empty(shape, dtype=wanted, device=place)
    kernels.zero_(list(accumulators.values()))
    integers: dict[str, torch.Tensor] = {}
    for index, (source, weight) in enumerate(zip(sources, coefficients, strict=True)):
        with _open_source(source, store) as tensors:
            floating: list[torch.Tensor] = []
            loaded: list[torch.Tensor] = []
            pending = 0
            for name in expected:
                tensor = tensors[name]  # read from a file: a copy, so groups of _CHUNK_BYTES bound what is held
                if tensor.is_floating_point():
                    floating.append(accumulators[name])
                    loaded.append(tensor.to(device=accumulators[name].device, dtype=accumulators[name].dtype))
                    pending += loaded[-1].numel() * loaded[-1].element_size()
                    if pending >= _CHUNK_BYTES:
                        kernels.add_(floating, loaded, weight)
                        floating, loaded, pending = [], [], 0
                elif index == len(sources) - 1:
                    integers[name] = tensor.to(accumulators[name].device)
            if floating:
                kernels.add_(floating, loaded, weight)
    result = {name: integers.get(name, acc) for name, acc in accumulators.items()}
    if targets is not None:
        names = [name for name in result if name in targets and name not in in_place]
        kernels.copy_([targets[name].data for name in names], [result[name] for name in names])
    return result


def _label(sources: Sequence[SnapshotSource], index: int) -> str:
    """``sources[i]``, with the file it is where there is one (errors name what the user can look at)."""
    source = sources[index]
    path = (
        source.path if isinstance(source, SnapshotInfo) else source if isinstance(source, (str, os.PathLike)) else None
    )
    return f"sources[{index}]" if path is None else f"sources[{index}] ({os.fspath(path)})"


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    """Shapes without reading the tensors of a memory-mapped file."""
    if isinstance(tensors, _LazyTensors):
        return tensors.shapes()
    return {name: tensors[name].shape for name in tensors}


@contextmanager
def _open_source(source: SnapshotSource, store: SnapshotStore | None) -> Iterator[Mapping[str, torch.Tensor]]:
    if isinstance(source, SnapshotInfo):
        if source.path is not None:
            with open_snapshot_file(source) as tensors:
                yield tensors
            return
        if store is None:
            raise ValueError("an in-memory snapshot needs store= (the SnapshotStore that holds it)")
        with store.open(source) as tensors:
            yield tensors
        return
    if isinstance(source, Mapping):
        yield source
        return
    if isinstance(source, (str, os.PathLike)):
        with open_weights(source, label=f"sources: {str(source)!r}") as tensors:
            yield tensors
        return
    raise TypeError(f"sources: {type(source).__name__} is not a snapshot, a safetensors path or a tensor mapping")
