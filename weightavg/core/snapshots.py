"""Snapshots of a model's weights saved along a run, and their linear combinations streamed with constant memory.

``SnapshotStore`` keeps snapshots as safetensors files in a folder (atomic writes, optionally from a background
thread, a manifest beside them) or in host memory, keeps the last ``keep`` of them, and finds an interrupted run's
snapshots again. ``combine`` computes ``sum_i w_i * theta_i`` from any snapshots, reading one snapshot at a time and
accumulating in fp32 (or fp64), so memory stays at about one model plus one snapshot whatever their number.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightavg.core import io, kernels
from weightavg.core.checks import check_number

MANIFEST = "manifest.json"
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
        return {"step": self.step, "epoch": self.epoch, "metrics": dict(self.metrics),
                "file": None if self.path is None else self.path.name}


class SnapshotStore:
    """Snapshots of a run, on disk (``directory``) or in host memory (``directory=None``).

    Args:
        directory: the folder for ``snapshot-<step>.safetensors`` files and ``manifest.json``. Snapshots already
            there (an interrupted run's) are found again; ``discard_after(step)`` drops those newer than the
            checkpoint a run resumes from.
        keep: keep only the newest ``keep`` snapshots (older files are deleted at the next ``add``; opening a folder
            deletes nothing, so a resumed run can still discard newer ones and keep the older); ``None`` keeps all.
        background: write files from a background thread (the tensors are copied to host memory first, so training
            can go on changing them; at most two snapshots wait, then ``add`` waits for the writer). A write is
            atomic (temporary file, fsync, rename) and enters the manifest only once complete, so a killed writer
            never leaves a listed but partial file. ``flush()`` waits for pending writes; errors surface at the next
            ``add``/``flush``.

    Example:
        >>> store = SnapshotStore(None, keep=3)
        >>> model = nn.Linear(2, 2)
        >>> for step in range(5):
        ...     _ = store.add(model.state_dict(), step=step)
        >>> [s.step for s in store.snapshots]
        [2, 3, 4]
    """

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, *, keep: int | None = None, background: bool = False
    ) -> None:
        if keep is not None:
            check_number("keep", keep, low=1, integer=True)
        if not isinstance(background, bool):
            raise TypeError(f"background={background!r} must be a bool")
        if background and directory is None:
            raise ValueError("background=True writes files: give a directory (snapshots in memory need no writer)")
        self.directory = None if directory is None else Path(directory)
        self.keep = keep
        self._snapshots: list[SnapshotInfo] = []
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[SnapshotInfo, dict[str, torch.Tensor], dict[str, str]] | None] | None = None
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._snapshots = self._recover()
            self._write_manifest()  # rebuilt from the files: a missing or stale manifest is repaired at once
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
        with open_weights(snapshot.path) as tensors:
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
        """
        self._raise_pending()
        check_number("step", step, low=0, integer=True)
        clean = {str(k): float(v) for k, v in (metrics or {}).items()}
        newest = self._last_step
        if newest is not None and step <= newest:
            raise ValueError(
                f"step={step} is not after the newest snapshot's step {newest}; a resumed run calls "
                "discard_after(step) with the step it resumes from"
            )
        # Copies: the model trains on while the snapshot waits to be written (and safetensors refuses shared storage).
        host = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
        self._last_step = step
        if self.directory is None:
            snapshot = SnapshotInfo(step, epoch, clean)
            self._memory[step] = host
            self._commit(snapshot)
            return snapshot
        snapshot = SnapshotInfo(step, epoch, clean, self.directory / f"snapshot-{step:09d}.safetensors")
        metadata = {_META: json.dumps({"step": step, "epoch": epoch, "metrics": clean})}
        metadata.update(io.aliases_metadata({k: tuple(v) for k, v in (aliases or {}).items()}))
        if self._queue is not None:
            self._queue.put((snapshot, host, metadata))
        else:
            self._write(snapshot, host, metadata)
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

    def discard_after(self, step: int) -> None:
        """Drop snapshots taken after ``step`` (those of an interrupted run past the checkpoint it resumes from)."""
        self.flush()
        with self._lock:
            dropped = [s for s in self._snapshots if s.step > step]
            self._snapshots = [s for s in self._snapshots if s.step <= step]
        for snapshot in dropped:
            self._forget(snapshot)
        self._last_step = self._snapshots[-1].step if self._snapshots else None
        self._write_manifest()

    def _write_loop(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._write(*item)
            except BaseException as error:  # kept for the caller: a writer thread has nobody else to tell
                self._error = error
            finally:
                self._queue.task_done()

    def _write(self, snapshot: SnapshotInfo, host: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        assert snapshot.path is not None
        io.save_safetensors(host, snapshot.path, metadata=metadata, copy=False)  # add() made the host copies
        self._commit(snapshot)

    def _commit(self, snapshot: SnapshotInfo) -> None:
        with self._lock:
            self._snapshots.append(snapshot)
            dropped = [] if self.keep is None else self._snapshots[: -self.keep]
            self._snapshots = self._snapshots[len(dropped):]
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
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a snapshot into {self.directory} failed: {error}") from error

    def _recover(self) -> list[SnapshotInfo]:
        """Snapshots already in the folder: every complete file, described by its own metadata (the manifest is
        rewritten from them, so a run killed between a rename and a manifest update loses nothing)."""
        assert self.directory is not None
        # Writes that never completed: our temporaries, and the hidden ``.tmpXXXXXX`` that safetensors writes through.
        for pattern in (".snapshot-*.tmp", f".{MANIFEST}.*.tmp", ".tmp*"):
            for leftover in self.directory.glob(pattern):
                if leftover.is_file():
                    leftover.unlink(missing_ok=True)
        found = []
        for path in sorted(self.directory.glob("snapshot-*.safetensors")):
            try:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as handle:
                    meta = json.loads((handle.metadata() or {})[_META])
            except Exception:  # not one of ours, or damaged: leave it alone, do not list it
                continue
            found.append(SnapshotInfo(int(meta["step"]), meta.get("epoch"), dict(meta.get("metrics", {})), path))
        found.sort(key=lambda s: s.step)
        return found


@contextmanager
def open_weights(path: str | os.PathLike[str]) -> Iterator[Mapping[str, torch.Tensor]]:
    """A lazy name -> tensor mapping over a safetensors file (memory-mapped; each tensor read on access)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        yield _LazyTensors(handle)


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

    Sources are read one at a time (memory-mapped files, in-memory snapshots or mappings), each added with one batched
    ``add_`` per tensor group into an accumulator of ``dtype`` (fp32, or fp64 on request): memory is one model's
    accumulator plus one source, whatever their number.

    Args:
        sources: snapshots (of ``store``, or files), safetensors paths, or name -> tensor mappings; oldest first
            (the last one gives the integer buffers).
        weights: one coefficient per source (any real numbers; LCSC's may be negative).
        into: a module (its ``state_dict`` tensors are overwritten in place, cast to their dtype) or a mapping of
            tensors to fill; the accumulator lives on their device. Without it the result stays on ``device``.
        store: the store that holds in-memory snapshots.
        dtype: accumulation dtype (``torch.float32`` or ``torch.float64``).
        device: where to accumulate without ``into`` (default CPU).

    Returns:
        Name -> combined tensor (the accumulator's; cast copies are in ``into``).

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
    targets = None if into is None else (
        dict(into.state_dict(keep_vars=True)) if isinstance(into, nn.Module) else dict(into)
    )
    accumulators: dict[str, torch.Tensor] = {}
    integers: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Size] | None = None
    for index, (source, weight) in enumerate(zip(sources, coefficients, strict=True)):
        with _open_source(source, store) as tensors:
            shapes = _shapes(tensors)
            if expected is None:
                expected = shapes
                if targets is not None:
                    io.check_keys({k: v.shape for k, v in targets.items() if k in shapes}, shapes,
                                  source="sources[0]", against="into")
                for name, shape in shapes.items():
                    place = targets[name].device if targets is not None and name in targets else torch.device(
                        device or "cpu")
                    accumulators[name] = torch.zeros(shape, dtype=dtype, device=place)
            else:
                io.check_keys(expected, shapes, source=f"sources[{index}]", against="sources[0]")
            floating, loaded = [], []
            for name in expected:
                tensor = tensors[name]
                if tensor.is_floating_point():
                    floating.append(accumulators[name])
                    loaded.append(tensor.to(device=accumulators[name].device, dtype=dtype))
                elif index == len(sources) - 1:
                    integers[name] = tensor.to(accumulators[name].device)
            if floating:
                torch._foreach_add_(floating, loaded, alpha=weight)
    result = {name: integers.get(name, acc) for name, acc in accumulators.items()}
    if targets is not None:
        names = [name for name in result if name in targets]
        kernels.copy_([targets[name].data for name in names], [result[name] for name in names])
    return result


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    """Shapes without reading the tensors of a memory-mapped file."""
    if isinstance(tensors, _LazyTensors):
        return tensors.shapes()
    return {name: tensors[name].shape for name in tensors}


@contextmanager
def _open_source(source: SnapshotSource, store: SnapshotStore | None) -> Iterator[Mapping[str, torch.Tensor]]:
    if isinstance(source, SnapshotInfo):
        if source.path is not None:
            with open_weights(source.path) as tensors:
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
        if not Path(source).is_file():
            raise FileNotFoundError(f"sources: no such file {str(source)!r}")
        with open_weights(source) as tensors:
            yield tensors
        return
    raise TypeError(f"sources: {type(source).__name__} is not a snapshot, a safetensors path or a tensor mapping")
