"""Safetensors export and import of averaged weights: atomic writes, loads whose errors name the offending key."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

ALIASES_KEY = "weightavg.aliases"


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    copy: bool = True,
) -> Path:
    """Write ``tensors`` to ``path`` atomically: a temporary file in the same folder, fsync, then rename.

    A crash mid-write leaves any earlier file at ``path`` intact. The file is streamed one tensor at a time from the
    tensors' own memory: contiguous host tensors (views of one flat buffer included) are written without any copy;
    others (on an accelerator, non-contiguous) are copied to host one at a time, so the transient peak is the largest
    such tensor, never the model. ``copy`` is kept for callers' compatibility and no longer changes anything.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        _write_safetensors(tensors, temporary, metadata=dict(metadata or {}))
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


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


def _write_safetensors(tensors: Mapping[str, torch.Tensor], path: str, *, metadata: dict[str, str]) -> None:
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
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for tensor in tensors.values():
            host = tensor.detach()
            if host.device.type != "cpu" or not host.is_contiguous():
                host = host.to("cpu").contiguous()  # one tensor at a time
            if host.numel():
                file.write(host.reshape(-1).view(torch.uint8).numpy().data)


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, fsync and rename."""
    target = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
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


def load_safetensors(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file into a name -> tensor dict on ``device``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no such safetensors file")
    return load_file(str(path), device=str(device))


def aliases_metadata(aliases: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """Metadata recording the extra names of tied tensors, so a loader can fill every alias."""
    extra = {name: list(names) for name, names in aliases.items() if names}
    return {ALIASES_KEY: json.dumps(extra)} if extra else {}


#: What ``read_weights`` accepts: a module, a name -> tensor mapping, or a path to a safetensors file or a torch
#: checkpoint (a Lightning ``.ckpt``'s ``state_dict`` is used).
WeightSource = torch.nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike[str]


def read_weights(source: WeightSource, *, argument: str) -> dict[str, torch.Tensor]:
    """Name -> tensor from ``source`` (see ``WeightSource``); tied aliases recorded by ``Averager.save`` are filled.

    Modules and mappings give their own tensors (detached, not copied); files are read on the CPU. ``argument``
    names the user's argument in errors.
    """
    if isinstance(source, torch.nn.Module):
        return {name: tensor.detach() for name, tensor in source.state_dict(keep_vars=True).items()}
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
    if _is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_safetensors(path)
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
            raise ValueError(f"{argument}={str(source)!r} is not a loadable torch checkpoint: {error}") from None
        warnings.warn(
            f"{argument}={str(source)!r} holds Python objects besides tensors; it was loaded with weights_only=False "
            "(only pass checkpoints you trust)",
            stacklevel=3,
        )
    except Exception as error:  # not a torch file at all
        raise ValueError(
            f"{argument}={str(source)!r} is neither a safetensors file nor a torch checkpoint: {error}"
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]  # a Lightning checkpoint
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{argument}={str(source)!r} holds a {type(loaded).__name__}, not a state dict")
    return read_weights(loaded, argument=argument)


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file (an 8-byte little-endian header length, then a JSON object),
    whatever its suffix."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size


def load_into_module(module: torch.nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> None:
    """Load weights exported by ``Averager.save`` into a module (tied aliases filled in).

    With ``strict=True``, a key of the module's ``state_dict`` absent from the file, or a key of the file absent from
    the module, raises ``ValueError`` naming it (buffers left out by the buffer policy count as missing: use
    ``strict=False`` to load such partial exports over an existing model).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no such safetensors file")
    tensors = read_weights(path, argument="path")
    own = module.state_dict()
    expected = {name: value.shape for name, value in own.items()}
    found = {name: value.shape for name, value in tensors.items()}
    if strict:
        check_keys(expected, found, source=f"path={str(path)!r}")
    else:
        check_keys({k: v for k, v in expected.items() if k in found}, found, source=f"path={str(path)!r}")
    module.load_state_dict(tensors, strict=strict)
