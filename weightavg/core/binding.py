"""Binding: find the tensors of a module (or a list of parameters) that an averager follows.

Only collection lives here: which tensors, under which names, averaged or copied. No arithmetic.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import nn

BufferPolicy = Literal["average", "copy", "ignore"]
BUFFER_POLICIES: tuple[str, ...] = get_args(BufferPolicy)


class Owner(NamedTuple):
    """Where a followed tensor lives in its module: ``module._parameters[attr]`` or ``module._buffers[attr]``.

    Both can be replaced after binding: ``Module.to()`` makes new buffer objects, and ``module.weight =
    nn.Parameter(...)`` or ``load_state_dict(assign=True)`` new parameter objects; the engine looks them up here.
    """

    module: nn.Module
    attr: str
    parameter: bool

    def current(self) -> torch.Tensor | None:
        slots = self.module._parameters if self.parameter else self.module._buffers
        return slots.get(self.attr)


@dataclass(frozen=True)
class Entry:
    """One tensor the averager follows.

    Attributes:
        names: every name the tensor has in the module's ``state_dict`` (tied tensors have several); the first is
            the canonical name used in averaging state and exports.
        tensor: the live tensor itself (the ``Parameter`` object for parameters, so that a later ``param.data``
            swap can never leave a stale view behind).
        averaged: ``True`` to average, ``False`` to copy the live value at each update (integer buffers, or buffers
            under the ``"copy"`` policy).
    """

    names: tuple[str, ...]
    tensor: torch.Tensor
    averaged: bool
    # The submodule and attribute holding it (none for bare tensors), to follow a replaced object.
    owner: Owner | None = None

    @property
    def name(self) -> str:
        return self.names[0]


def check_buffer_policy(buffers: str) -> None:
    if buffers not in BUFFER_POLICIES:
        allowed = ", ".join(map(repr, BUFFER_POLICIES))
        raise ValueError(f"buffers={buffers!r} is not a buffer policy; allowed: {allowed}")


def _selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude))


def _patterns(value: str | Sequence[str] | None, argument: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable):
        raise TypeError(f"{argument}={value!r} must be a glob pattern or a sequence of glob patterns (str)")
    patterns = tuple(value)
    if not all(isinstance(pattern, str) for pattern in patterns):
        raise TypeError(f"{argument}={value!r} must be a glob pattern or a sequence of glob patterns (str)")
    return patterns


def _check_patterns_match(
    patterns: tuple[str, ...] | None, argument: str, canonical: list[str], aliases: list[str], module: str
) -> None:
    """Raise ``ValueError`` quoting the first pattern of ``argument`` that matches no canonical name (a typo would
    otherwise average everything, or nothing it meant to), with a few of the names that exist."""
    if patterns is None:
        return
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(name, pattern) for name in canonical):
            continue
        tied = [name for name in aliases if fnmatch.fnmatchcase(name, pattern)]
        if tied:
            hint = f"; it matches only tied names {tied[:5]}, and patterns match each tensor's first name"
        else:
            shown = ", ".join(map(repr, canonical[:8])) + (", ..." if len(canonical) > 8 else "")
            hint = f"; names in module {module} include {shown}"
        what = "parameter or persistent buffer"
        raise ValueError(f"{argument}={list(patterns)!r}: pattern {pattern!r} matches no {what}{hint}")


def _named_slots(module: nn.Module, *, parameters: bool) -> dict[int, tuple[list[str], Owner]]:
    """Map id(tensor) -> (its names in the state_dict, its first owner), for the parameters or the persistent
    buffers, in ``state_dict`` order."""
    found: dict[int, tuple[list[str], Owner]] = {}
    for prefix, submodule in module.named_modules(remove_duplicate=False):
        slots = submodule._parameters if parameters else submodule._buffers
        for attr, tensor in slots.items():
            if tensor is None or (not parameters and attr in submodule._non_persistent_buffers_set):
                continue
            names, _ = found.setdefault(id(tensor), ([], Owner(submodule, attr, parameters)))
            names.append(f"{prefix}.{attr}" if prefix else attr)
    return found


def bind_module(
    module: nn.Module,
    *,
    buffers: BufferPolicy = "average",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    parameters: Iterable[torch.Tensor] | None = None,
) -> list[Entry]:
    """Collect a module's parameters and persistent buffers in ``state_dict`` order.

    Args:
        module: the live model.
        buffers: ``"average"`` floating buffers, ``"copy"`` them, or ``"ignore"`` them. Integer buffers are copied
            under the first two policies.
        include: glob patterns (``fnmatch``) on canonical names; when given, only matching tensors are followed.
        exclude: glob patterns on canonical names to leave out.
        parameters: restrict the parameters to these objects (the optimizer wrapper passes its own); every one must
            belong to ``module``.

    Raises:
        ValueError: on an unknown buffer policy, a parameter not in ``module``, or nothing floating to average.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    check_buffer_policy(buffers)
    include_patterns = _patterns(include, "include")
    exclude_patterns = _patterns(exclude, "exclude")

    param_slots = _named_slots(module, parameters=True)
    param_names = {key: names for key, (names, _) in param_slots.items()}
    param_objects: dict[int, torch.Tensor] = {id(param): param for param in module.parameters()}
    all_param_names = param_names
    if parameters is not None:
        wanted = [id(p) for p in parameters]
        missing = [i for i in wanted if i not in param_objects]
        if missing:
            raise ValueError(
                f"module= does not own {len(missing)} of the optimizer's parameters; pass the module the optimizer "
                "was built from"
            )
        wanted_set = set(wanted)
        param_names = {k: v for k, v in param_names.items() if k in wanted_set}

    buffer_names = _named_slots(module, parameters=False)
    canonical = [names[0] for names in all_param_names.values()] + [names[0] for names, _ in buffer_names.values()]
    aliases = [name for names in all_param_names.values() for name in names[1:]]
    aliases += [name for names, _ in buffer_names.values() for name in names[1:]]
    _check_patterns_match(include_patterns, "include", canonical, aliases, type(module).__name__)
    _check_patterns_match(exclude_patterns, "exclude", canonical, aliases, type(module).__name__)

    entries: list[Entry] = []
    for key, names in param_names.items():
        tensor = param_objects[key]
        if _selected(names[0], include_patterns, exclude_patterns):
            entries.append(Entry(tuple(names), tensor, averaged=_is_float(tensor), owner=param_slots[key][1]))

    if buffers != "ignore":
        buffer_objects = {id(b): b for b in module.buffers()}
        for key, (names, owner) in buffer_names.items():
            tensor = buffer_objects[key]
            if _selected(names[0], include_patterns, exclude_patterns):
                averaged = buffers == "average" and _is_float(tensor)
                entries.append(Entry(tuple(names), tensor, averaged=averaged, owner=owner))
    _require_floating(entries, f"module {type(module).__name__}")
    return entries


def bind_tensors(tensors: Iterable[torch.Tensor], *, prefix: str = "") -> list[Entry]:
    """Follow bare tensors (an optimizer's parameters without a module); names are ``{prefix}{index}``."""
    entries: list[Entry] = []
    seen: set[int] = set()
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"expected tensors to average, got {type(tensor).__name__} at index {index}")
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        entries.append(Entry((f"{prefix}{index}",), tensor, averaged=_is_float(tensor)))
    _require_floating(entries, "the given parameters")
    return entries


def _is_float(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point()


def _require_floating(entries: list[Entry], what: str) -> None:
    if not any(entry.averaged for entry in entries):
        raise ValueError(
            f"{what} has no floating parameters or buffers to average (after include/exclude and the buffer policy); "
            "averaging needs at least one floating tensor"
        )
