"""Argument checks shared by every method and face: each error names the argument, its value and what is allowed."""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``value`` is a finite number in the given interval.

    Args:
        name: the argument's name as the user wrote it.
        value: what the user passed.
        low, high: bounds (``None`` for unbounded).
        low_open, high_open: exclude the bound itself.
        integer: require an ``int`` (``bool`` is refused).
    """
    kind = "an int" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(f"{name}={value!r} must be {kind}, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        interval = f"{opening}{left}, {right}{closing}"
        raise ValueError(f"{name}={value!r} is out of range: allowed {interval}")


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def check_device(device: Any) -> torch.device | None:
    """``None`` or a ``torch.device`` parsed from ``device`` that this machine has; ``TypeError``/``ValueError``
    naming it otherwise: unparsable, ``"meta"`` (no storage: an average there could never be evaluated or saved), or
    an accelerator this build or machine lacks (torch itself would fail only at the first copy, with an
    ``AssertionError`` such as "Torch not compiled with CUDA enabled")."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device={device!r} must be a torch.device, its name (e.g. 'cpu', 'cuda:0') or None")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(
            f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda:0', torch.device('npu', 0)): {error}"
        ) from None
    if parsed.type == "meta":
        raise ValueError(f"device={device!r}: meta tensors hold no values, so an average cannot live there")
    _check_available(device, parsed)
    return parsed


def _check_available(device: Any, parsed: torch.device) -> None:
    """Raise ``ValueError`` when ``parsed`` names an accelerator that is missing here or an index past its count.

    Asks the backend's module (``torch.cuda``, ``torch.xpu``, ``torch.npu``, ... as registered by plugins) without
    creating a tensor, so nothing is initialised on the device before a launcher forks its processes.
    """
    if parsed.type == "cpu":
        return
    if parsed.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, parsed.type, None)
        if backend is None or not hasattr(backend, "is_available"):
            return  # a backend this check cannot ask: torch reports any problem at the first copy
        available = bool(backend.is_available())
        count = int(backend.device_count()) if available and hasattr(backend, "device_count") else 0
    if not available:
        raise ValueError(
            f"device={device!r}: {parsed.type.upper()} is not available on this build/machine (torch "
            f"{torch.__version__}); use device=None (the live tensors' device) or 'cpu'"
        )
    if parsed.index is not None and count and parsed.index >= count:
        raise ValueError(f"device={device!r}: this machine has {count} {parsed.type} device(s), indices 0..{count - 1}")


def check_bool(name: str, value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is a ``bool``: the string ``"false"`` is truthy, so accepting anything
    truthy would silently turn a switch on."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be True or False, got {type(value).__name__}")


def check_name(value: Any, name: str = "name") -> None:
    """Raise unless ``value`` is ``None`` (the default name) or a non-empty string (never replaced silently)."""
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name}={value!r} must be a non-empty string or None, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name}={value!r} must be a non-empty string or None (None: the default name)")


#: Dtypes an average, a snapshot or a combination can be kept in (``torch`` attribute names, as configs write them).
FLOATING_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")


def resolve_dtype(dtype: Any, *, name: str = "dtype", extra: Sequence[str] = ()) -> torch.dtype | str:
    """The ``torch.dtype`` that ``dtype`` (a dtype or its name) stands for, or one of the ``extra`` words as it is.

    Raises ``TypeError``/``ValueError`` naming the argument and listing the allowed names: float8 and integer dtypes
    are refused (no averaging kernel runs in them), so ``dtype="float8"`` fails when it is given, not when fit starts.
    """
    allowed = ", ".join(map(repr, (*FLOATING_DTYPES, *extra)))
    if isinstance(dtype, str) and dtype in extra:
        return dtype
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)  # also the aliases "half", "float", "double"
        if resolved not in {getattr(torch, allowed_name) for allowed_name in FLOATING_DTYPES}:
            raise ValueError(f"{name}={dtype!r} is not an allowed dtype; choose one of {allowed}")
        assert isinstance(resolved, torch.dtype)
        return resolved
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name}={dtype!r} must be a torch.dtype or its name ({allowed}), got {type(dtype).__name__}")
    if str(dtype).removeprefix("torch.") not in FLOATING_DTYPES:
        raise ValueError(f"{name}={dtype!r} is not an allowed dtype; choose one of {allowed}")
    return dtype


def check_path(name: str, value: Any) -> str | os.PathLike[str]:
    """``value`` if it is a non-empty path (``str`` or ``os.PathLike``); ``TypeError``/``ValueError`` naming it."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}={value!r} must be a path (str or os.PathLike), got {type(value).__name__}")
    if not os.fspath(value):
        raise ValueError(f"{name}={value!r} is empty: give a file path")
    return value


def check_output_file(name: str, value: Any) -> None:
    """Refuse, before any work, a file path that a run could only fail to write at its end.

    ``None`` passes. The path must not be a folder; its missing parent folders are created when the file is written,
    so the nearest existing ancestor must be a folder in which a file can be created: checked by creating and
    removing an empty temporary file there (exact for read-only mounts, ACLs and root alike; nothing is left behind).
    """
    if value is None:
        return
    path = Path(check_path(name, value)).expanduser()
    if path.is_dir():
        raise ValueError(f"{name}={os.fspath(value)!r} is a folder: give the path of the file to write")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{name}={os.fspath(value)!r} cannot be written: {str(ancestor)!r} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".weightavg-write-check-", dir=ancestor)
    except OSError as error:
        raise ValueError(
            f"{name}={os.fspath(value)!r} cannot be written: no file can be created in {str(ancestor)!r} "
            f"({error.strerror or error})"
        ) from None
    os.close(handle)
    os.unlink(probe)


def check_directory(name: str, value: Any) -> None:
    """``None``, ``":memory:"`` or a path that is a folder or does not exist yet (it is created); refuse a file or a
    non-path."""
    if value is None or (isinstance(value, str) and value == ":memory:"):
        return
    path = Path(check_path(name, value)).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name}={os.fspath(value)!r} is a file, not a folder: give a folder for the snapshot files")


def check_callable(name: str, value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is ``None`` or callable (a function given where a number was meant)."""
    if value is not None and not callable(value):
        raise TypeError(f"{name}={value!r} must be a function or None, got {type(value).__name__}")


def outside_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that points at the first caller outside weightavg (and outside the
    ``__init__`` that ``dataclasses`` generates), however deep the settings checks that warn are nested."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename.startswith(package)
        or (frame.f_code.co_filename == "<string>" and frame.f_code.co_name == "__init__")  # dataclasses' __init__
    ):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


#: The version of the faces' checkpoint states (a callback's ``state_dict``, a wrapper's): states without one were
#: written before it was recorded (version 1, the same layout).
STATE_VERSION = 1


def check_state_version(state: Any, owner: str) -> None:
    """Refuse a state written by a newer weightavg (a layout this version cannot read), naming both versions."""
    version = state.get("version", 1) if isinstance(state, dict) else 1
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{owner}: the state's version={version!r} is not a weightavg state version")
    if version > STATE_VERSION:
        raise ValueError(
            f"{owner}: the state was written by a newer weightavg (state version {version}; this one reads up to "
            f"{STATE_VERSION}): upgrade weightavg to load it"
        )
