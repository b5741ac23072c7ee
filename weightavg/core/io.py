"""Safetensors export and import of averaged weights: atomic writes that clean up after killed writers, loads whose
errors name the damaged file or the offending key."""

from __future__ import annotations

import glob
import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError, safe_open

from weightavg.core import binding

ALIASES_KEY = "weightavg.aliases"
#: In the name of every temporary file the library writes: ``.{target name}.weightavg-tmp-{pid}-{random}``.
TEMPORARY_MARK = ".weightavg-tmp-"


class DamagedFileError(ValueError):
    """A weights file that cannot be read: truncated, corrupt, or not a safetensors file / torch checkpoint at all.
    The message names the file (and the argument it was given as); ``reason`` is what the reader found."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    copy: bool = True,
) -> Path:
    """Write ``tensors`` to ``path`` atomically (see ``atomic_file``): a crash leaves any earlier file intact.

    The file is streamed one tensor at a time from the tensors' own memory: contiguous host tensors (views of one flat
    buffer included) are written without any copy; others (on an accelerator, non-contiguous) are copied to host one
    at a time, so the transient peak is the largest such tensor, never the model. ``copy`` is kept for callers'
    compatibility and no longer changes anything.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as file:
        _write_safetensors(tensors, file, metadata=dict(metadata or {}))
    return target


@contextmanager
def atomic_file(target: Path) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``target`` when the block ends without error: written to a temporary beside it,
    fsynced, given the usual permissions, renamed over ``target``.

    The temporary, ``.{target name}.weightavg-tmp-{pid}-{random}``, stays locked (``flock``) by its writer until the
    rename; the kernel drops the lock when the writer dies. A write first removes the unlocked temporaries of the same
    target (those of killed writers), never a live writer's. A failed write removes its own temporary.
    """
    remove_stale_temporaries(target.parent, target.name)
    handle, temporary = _locked_temporary(target)
    try:
        with open(handle, "wb", closefd=False) as file:  # every write through the locked descriptor (see below)
            yield file
        os.fsync(handle)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    finally:
        # Closing releases the lock. (Only now: where flock is emulated by POSIX locks, as on NFS, closing any other
        # descriptor of the file would release it too, which is why the file is never reopened.)
        os.close(handle)


def _locked_temporary(target: Path) -> tuple[int, str]:
    """Create and lock a new temporary for ``target``; its descriptor and path."""
    while True:
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}{TEMPORARY_MARK}{os.getpid()}-", dir=target.parent)
        if os.name != "posix":
            return handle, temporary
        import fcntl

        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: write unlocked (no cleaner can lock its leftovers either)
            return handle, temporary
        if os.fstat(handle).st_nlink:
            return handle, temporary
        os.close(handle)  # a cleaner locked it before we did and removed it: take another


def remove_stale_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries that killed writers left in ``folder`` (those of the file ``name``, or of any file):
    the ones no live writer holds locked. Returns the removed paths. Without ``flock`` (not POSIX, or a file system
    without locks) none is removed: a live writer's temporary could not be told from a leftover."""
    if os.name != "posix":
        return []
    import fcntl

    removed = []
    for leftover in folder.glob(f".{'*' if name is None else glob.escape(name)}{TEMPORARY_MARK}*"):
        try:
            handle = os.open(leftover, os.O_RDONLY)
        except OSError:  # renamed or removed meanwhile
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer lives
            if os.path.isfile(leftover):
                leftover.unlink()
                removed.append(leftover)
        except OSError:
            pass  # a live writer's (or already renamed, or no locks here): leave it
        finally:
            os.close(handle)
    return removed


class CastView(Mapping[str, torch.Tensor]):
    """``tensors`` with floating ones cast to ``dtype`` lazily, as each is read (so a writer streaming them holds
    one cast tensor at a time)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> None:
        self._tensors, self._dtype = tensors, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        return tensor.to(self._dtype) if self._dtype is not None and tensor.is_floating_point() else tensor

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype ``self[name]`` will have, without casting."""
        tensor = self._tensors[name]
        return self._dtype if self._dtype is not None and tensor.is_floating_point() else tensor.dtype

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write_safetensors(tensors: Mapping[str, torch.Tensor], file: IO[bytes], *, metadata: dict[str, str]) -> None:
    """Write the safetensors format (8-byte header size, JSON header padded to 8 bytes, raw little-endian data) by
    streaming each tensor's bytes. ``safetensors.torch.save_file`` would first turn every tensor into ``bytes`` (a
    second model-sized copy) and refuses tensors that share storage (views of a flat buffer)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in tensors:
        # A CastView tells the dtype it will give without casting; the shape is the source's either way.
        source = tensors._tensors[name] if isinstance(tensors, CastView) else tensors[name]
        dtype = tensors.dtype_of(name) if isinstance(tensors, CastView) else source.dtype
        if dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {dtype}, which safetensors export does not support")
        size = source.numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(source.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write(len(encoded).to_bytes(8, "little"))
    file.write(encoded)
    for tensor in tensors.values():
        host = tensor.detach()
        if host.device.type != "cpu" or not host.is_contiguous():
            host = host.to("cpu").contiguous()  # one tensor at a time
        if host.numel():
            file.write(host.reshape(-1).view(torch.uint8).numpy().data)


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see ``atomic_file``)."""
    target = Path(path)
    with atomic_file(target) as file:
        file.write(text.encode())
    return target


def check_keys(
    expected: Mapping[str, torch.Size],
    found: Mapping[str, torch.Size],
    *,
    source: str,
    against: str = "the averaged model",
) -> None:
    """Raise ``ValueError`` naming missing, unexpected and mis-shaped keys of ``found`` against ``expected``."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    misshaped = [
        f"{name}: expected {tuple(expected[name])}, found {tuple(found[name])}"
        for name in expected
        if name in found and tuple(found[name]) != tuple(expected[name])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped keys [{'; '.join(misshaped)}]")
    if problems:
        raise ValueError(f"{source} does not match {against}: " + ", ".join(problems))


@contextmanager
def open_safetensors(path: str | os.PathLike[str], *, label: str, device: str = "cpu") -> Iterator[Any]:
    """``safetensors.safe_open`` (memory-mapped, each tensor read on access) for every load in the library: a missing
    file raises ``FileNotFoundError``, a truncated or corrupt one ``DamagedFileError``, both naming it as ``label``
    (e.g. ``"path='avg.safetensors'"``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{label}: no such safetensors file")
    try:
        handle = safe_open(str(path), framework="pt", device=device)
    except (OSError, RuntimeError):  # safetensors' own "unable to open file" is a RuntimeError
        if not Path(path).is_file():  # deleted since the check above
            raise FileNotFoundError(f"{label}: no such safetensors file") from None
        raise
    except SafetensorError as error:
        reason = f"not a complete safetensors file: {error}"
        raise DamagedFileError(f"{label} is damaged or truncated ({reason})", reason) from None
    with handle:
        yield handle


def load_safetensors(
    path: str | os.PathLike[str], device: torch.device | str = "cpu", *, argument: str = "path"
) -> dict[str, torch.Tensor]:
    """Read a safetensors file into a name -> tensor dict on ``device`` (errors as ``open_safetensors``'s)."""
    with open_safetensors(path, label=f"{argument}={str(path)!r}", device=str(device)) as handle:
        return _read_all(handle)


def _read_all(handle: Any) -> dict[str, torch.Tensor]:
    names = handle.keys()  # a safe_open handle is not iterable
    return {name: handle.get_tensor(name) for name in names}


def aliases_metadata(aliases: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """Metadata recording the extra names of tied tensors, so a loader can fill every alias."""
    extra = {name: list(names) for name, names in aliases.items() if names}
    return {ALIASES_KEY: json.dumps(extra)} if extra else {}


#: What ``read_weights`` accepts: a module, a name -> tensor mapping, or a path to a safetensors file or a torch
#: checkpoint (a Lightning ``.ckpt``'s ``state_dict`` is used).
WeightSource = torch.nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike[str]


def read_weights(source: WeightSource, *, argument: str) -> dict[str, torch.Tensor]:
    """Name -> tensor from ``source`` (see ``WeightSource``); tied aliases recorded by ``Averager.save`` are filled.

    Modules and mappings give their own tensors (detached, not copied); files are read on the CPU. A module's names
    leave out its wrappers' attributes (a compiled submodule's ``_orig_mod.``, DDP's ``module.``), as exports do.
    ``argument`` names the user's argument in errors.
    """
    if isinstance(source, torch.nn.Module):
        names = binding.state_dict_names(source)
        return {names.get(key, key): tensor.detach() for key, tensor in source.state_dict(keep_vars=True).items()}
    if isinstance(source, Mapping):
        bad = [name for name, value in source.items() if not isinstance(name, str) or not torch.is_tensor(value)]
        if bad:
            raise TypeError(f"{argument}= must map names (str) to tensors; offending entries: {bad[:5]}")
        return {name: value.detach() for name, value in source.items()}
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"{argument}={source!r} must be an nn.Module, a state dict, or a path to a .safetensors file or a torch "
            "checkpoint"
        )
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}={str(source)!r}: no such file")
    if path.suffix == ".safetensors" or _is_safetensors(path):
        with open_safetensors(path, label=f"{argument}={str(source)!r}") as handle:
            metadata = handle.metadata() or {}
            tensors = _read_all(handle)
        for name, extra in json.loads(metadata.get(ALIASES_KEY, "{}")).items():
            for alias in extra:
                tensors.setdefault(alias, tensors[name])
        return tensors
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A Lightning checkpoint whose hyperparameters hold Python objects (an OmegaConf config, a Namespace) is
        # refused by the weights-only unpickler. The user named this file as their model's weights, as they would
        # for Lightning's own load_from_checkpoint, which unpickles it fully too.
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise DamagedFileError(
                f"{argument}={str(source)!r} is damaged or truncated: it is not a loadable torch checkpoint ({error})"
            ) from None
        warnings.warn(
            f"{argument}={str(source)!r} holds Python objects besides tensors; it was loaded with weights_only=False "
            "(only pass checkpoints you trust)",
            stacklevel=3,
        )
    except Exception as error:  # not a torch file at all, or a truncated one
        raise DamagedFileError(
            f"{argument}={str(source)!r} is damaged or not a weights file: it is neither a complete safetensors file "
            f"nor a loadable torch checkpoint ({describe_error(error)})"
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]  # a Lightning checkpoint
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{argument}={str(source)!r} holds a {type(loaded).__name__}, not a state dict")
    return read_weights(loaded, argument=argument)


def describe_error(error: BaseException) -> str:
    """``Type: message`` on one line (torch's unpickling errors span many)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file (an 8-byte little-endian header length, then a JSON object),
    whatever its suffix."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size


def load_into_module(module: torch.nn.Module, path: WeightSource, *, strict: bool = True) -> None:
    """Load weights exported by ``Averager.save`` (or any ``WeightSource``) into a module, tied aliases filled in.

    Names match with or without wrappers' attributes on either side: a plain export loads into a compiled (or DDP)
    model and a compiled model's weights into the plain architecture. With ``strict=True``, a key of the module's
    ``state_dict`` absent from the file, or a key of the file absent from the module, raises ``ValueError`` naming it
    (buffers left out by the buffer policy count as missing: use ``strict=False`` to load such partial exports over
    an existing model).
    """
    if isinstance(path, (str, os.PathLike)) and not Path(path).is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no such safetensors file")
    label = f"path={str(path)!r}" if isinstance(path, (str, os.PathLike)) else f"path (a {type(path).__name__})"
    names = binding.state_dict_names(module)  # the module's key -> its name without wrappers
    tensors = binding.rekey(read_weights(path, argument="path"), set(names.values()))
    keys = {name: key for key, name in names.items()}
    tensors = {keys.get(name, name): value for name, value in tensors.items()}
    expected = {name: value.shape for name, value in module.state_dict().items()}
    found = {name: value.shape for name, value in tensors.items()}
    if strict:
        check_keys(expected, found, source=label)
    else:
        check_keys({k: v for k, v in expected.items() if k in found}, found, source=label)
    module.load_state_dict(tensors, strict=strict)
