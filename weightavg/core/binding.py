"""Binding: find the tensors of a module (or a list of parameters) that an averager follows.

Only collection lives here: which tensors, under which names, averaged or copied. No arithmetic.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar, get_args

import torch
from torch import nn

BufferPolicy = Literal["average", "copy", "ignore"]
BUFFER_POLICIES: tuple[str, ...] = get_args(BufferPolicy)
T = TypeVar("T")


def wrapped_module(module: nn.Module) -> nn.Module | None:
    """The module a wrapper holds (``torch.compile``'s ``OptimizedModule``, ``DistributedDataParallel``,
    ``DataParallel``), else ``None``. Their attribute (``_orig_mod``, ``module``) is left out of names."""
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner: nn.Module = module.module
        return inner
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        compiled: nn.Module = module._orig_mod
        return compiled
    return None


def _walk(module: nn.Module, name: str = "", key: str = "") -> Iterator[tuple[str, str, nn.Module]]:
    """``(name, key, submodule)`` for every path to a submodule, as ``named_modules(remove_duplicate=False)``:
    ``key`` is its prefix in the module's own ``state_dict``, ``name`` the same without wrappers' attributes."""
    yield name, key, module
    inner = wrapped_module(module)
    for attr, child in module._modules.items():
        if child is None:
            continue
        child_key = f"{key}.{attr}" if key else attr
        child_name = name if child is inner else (f"{name}.{attr}" if name else attr)
        yield from _walk(child, child_name, child_key)


def unwrapped_key(key: str) -> str:
    """``key`` without wrapper prefixes, by spelling: every ``_orig_mod.`` (torch.compile) and a leading
    ``module.`` (DistributedDataParallel, DataParallel)."""
    key = ".".join(part for part in key.split(".") if part != "_orig_mod") if "_orig_mod" in key else key
    return key.removeprefix("module.")


def rekey(found: Mapping[str, T], wanted: Collection[str]) -> dict[str, T]:
    """``found`` with each key that is not ``wanted`` but is a wanted name once its wrapper prefixes are removed
    (``unwrapped_key``: a compiled or DDP model's ``state_dict``) renamed to it; other keys as they are."""
    renamed: dict[str, T] = {}
    for key, value in found.items():
        clean = key if key in wanted else unwrapped_key(key)
        target = clean if clean in wanted and clean not in found else key
        if target in renamed:
            raise ValueError(f"two entries name {target!r} once wrapper prefixes are removed (one is {key!r})")
        renamed[target] = value
    return renamed


def state_dict_names(module: nn.Module) -> dict[str, str]:
    """``module.state_dict()`` key -> its name without wrappers' attributes (``net._orig_mod.weight`` of a
    compiled submodule -> ``net.weight``), the names every export and averaging state uses."""
    names: dict[str, str] = {}
    for name, key, submodule in _walk(module):
        for attr, tensor in [*submodule._parameters.items(), *submodule._buffers.items()]:
            if tensor is not None and attr not in submodule._non_persistent_buffers_set:
                names[f"{key}.{attr}" if key else attr] = f"{name}.{attr}" if name else attr
    return names


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
        names: every name the tensor has in the module's ``state_dict`` (tied tensors have several), without the
            attributes of wrappers (``wrapped_module``); the first is the canonical name used in averaging state and
            exports.
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
    # Its keys in the bound module's own state_dict where wrappers (torch.compile, DDP) make them differ from names.
    keys: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def module_keys(self) -> tuple[str, ...]:
        """Its keys in the bound module's ``state_dict`` (``names`` with wrappers' attributes, if any)."""
        return self.keys or self.names


def check_buffer_policy(buffers: str) -> None:
    if buffers not in BUFFER_POLICIES:
        allowed = ", ".join(map(repr, BUFFER_POLICIES))
        raise ValueError(f"buffers={buffers!r} is not a buffer policy; allowed: {allowed}")


def _selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude))


def check_patterns(value: str | Sequence[str] | None, argument: str) -> tuple[str, ...] | None:
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


class _Slots(NamedTuple):
    names: list[str]  # without wrappers' attributes
    keys: list[str]  # as in the module's state_dict
    owner: Owner


def _named_slots(module: nn.Module, *, parameters: bool) -> dict[int, _Slots]:
    """Map id(tensor) -> its names and ``state_dict`` keys, and its first owner, for the parameters or the
    persistent buffers, in ``state_dict`` order.

    Raises:
        ValueError: when leaving out wrappers' attributes gives two different tensors one name.
    """
    found: dict[int, _Slots] = {}
    named: dict[str, tuple[int, str]] = {}  # name -> (id of its tensor, its first key)
    for prefix, key_prefix, submodule in _walk(module):
        slots = submodule._parameters if parameters else submodule._buffers
        for attr, tensor in slots.items():
            if tensor is None or (not parameters and attr in submodule._non_persistent_buffers_set):
                continue
            entry = found.setdefault(id(tensor), _Slots([], [], Owner(submodule, attr, parameters)))
            name, key = (f"{prefix}.{attr}" if prefix else attr), (f"{key_prefix}.{attr}" if key_prefix else attr)
            owner, first = named.setdefault(name, (id(tensor), key))
            if owner != id(tensor):
                raise ValueError(
                    f"{key!r} and {first!r} of module {type(module).__name__} would both be named {name!r} once the "
                    "wrappers' attributes (torch.compile's _orig_mod, DDP's module) are left out"
                )
            if name not in entry.names:
                entry.names.append(name)
            entry.keys.append(key)
    return found


def bind_module(
    module: nn.Module,
    *,
    buffers: BufferPolicy = "average",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    parameters: Iterable[torch.Tensor] | None = None,
) -> list[Entry]:
    """Collect a module's parameters and persistent buffers in ``state_dict`` order, named as in the module's
    ``state_dict`` less the attributes of wrappers (``torch.compile``, DDP, DataParallel: ``wrapped_module``).

    Args:
        module: the live model.
        buffers: ``"average"`` floating buffers, ``"copy"`` them, or ``"ignore"`` them. Integer buffers are copied
            under the first two policies.
        include: glob patterns (``fnmatch``) on canonical names; when given, only matching tensors are followed.
        exclude: glob patterns on canonical names to leave out.
        parameters: restrict the parameters to these objects (the optimizer wrapper passes its own); every one must
            belong to ``module``.

    Raises:
        ValueError: on an unknown buffer policy, a parameter not in ``module``, nothing floating to average, or
            two tensors given one name by leaving wrappers out.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    check_buffer_policy(buffers)
    include_patterns = check_patterns(include, "include")
    exclude_patterns = check_patterns(exclude, "exclude")

    param_slots = _named_slots(module, parameters=True)
    param_objects: dict[int, torch.Tensor] = {id(param): param for param in module.parameters()}
    chosen = param_slots
    if parameters is not None:
        wanted = [id(p) for p in parameters]
        missing = [i for i in wanted if i not in param_objects]
        if missing:
            raise ValueError(
                f"module= does not own {len(missing)} of the optimizer's parameters; pass the module the optimizer "
                "was built from"
            )
        wanted_set = set(wanted)
        chosen = {k: v for k, v in param_slots.items() if k in wanted_set}

    buffer_slots = _named_slots(module, parameters=False)
    every = [*param_slots.values(), *buffer_slots.values()]
    canonical = [slots.names[0] for slots in every]
    aliases = [name for slots in every for name in slots.names[1:]]
    _check_patterns_match(include_patterns, "include", canonical, aliases, type(module).__name__)
    _check_patterns_match(exclude_patterns, "exclude", canonical, aliases, type(module).__name__)

    def entry(tensor: torch.Tensor, slots: _Slots, averaged: bool) -> Entry:
        keys = () if slots.keys == slots.names else tuple(slots.keys)
        return Entry(tuple(slots.names), tensor, averaged=averaged, owner=slots.owner, keys=keys)

    entries: list[Entry] = []
    for key, slots in chosen.items():
        tensor = param_objects[key]
        if _selected(slots.names[0], include_patterns, exclude_patterns):
            entries.append(entry(tensor, slots, _is_float(tensor)))

    if buffers != "ignore":
        buffer_objects = {id(b): b for b in module.buffers()}
        for key, slots in buffer_slots.items():
            tensor = buffer_objects[key]
            if _selected(slots.names[0], include_patterns, exclude_patterns):
                entries.append(entry(tensor, slots, buffers == "average" and _is_float(tensor)))
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
