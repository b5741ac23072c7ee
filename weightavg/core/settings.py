"""Settings declared once: typed dataclass fields with a docstring each, checked when built, shared by every face.

A method's settings (``weightavg.methods.ema.EMASettings``, ...) are a dataclass; its rule subclasses them and each
face (Lightning callback, optimizer wrapper) inherits the same fields, so ``inspect.signature``, IDEs and type checkers
show every knob and a new setting appears everywhere at once. ``EngineOptions`` is the one group of engine settings
(``weightavg.Averager``'s) that the faces share. The Hydra configs are generated from the faces' signatures
(``weightavg.config``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, TypeVar

import torch

from weightavg.core.averager import NONFINITE, NonFinite
from weightavg.core.binding import BufferPolicy, check_buffer_policy, check_patterns
from weightavg.core.checks import check_bool, check_choice, check_device, outside_stacklevel, resolve_dtype


class Settings:
    """Base of every settings dataclass: ``__post_init__`` is cooperative, so a class combining several settings
    groups checks all of them (each group checks its own fields, then calls ``super().__post_init__()``)."""

    def __post_init__(self) -> None:
        return None


class Frozen:
    """Fields that cannot be assigned after construction (what ``dataclass(frozen=True)`` gives, for dataclasses whose
    settings other, mutable classes inherit): rules are immutable values; build another with ``dataclasses.replace``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen", False):
            raise dataclasses.FrozenInstanceError(
                f"cannot assign to field {name!r} of {type(self).__name__}: build another with "
                f"dataclasses.replace(rule, {name}=...)"
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r} of {type(self).__name__}")

    def _freeze(self) -> None:
        object.__setattr__(self, "_frozen", True)


class ReadSettings:
    """Base of the faces: the method's settings, read when the face was built, cannot be assigned later (the
    assignment would be silently ignored, or skip the checks); their other attributes stay assignable."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("_rule_fields", ()):
            raise AttributeError(
                f"{type(self).__name__}.{name} is a setting of its method, read when it was built: build another "
                f"{type(self).__name__} with {name}={value!r}"
            )
        super().__setattr__(name, value)

    def _read_settings(self, *sources: object, except_: tuple[str, ...] = ()) -> None:
        """Mark the fields of ``sources`` (settings classes or rule instances) as read when the face was built, so
        that assigning them later is refused (``except_``: fields the face itself keeps up to date)."""
        names = {f.name for source in sources if dataclasses.is_dataclass(source) for f in dataclasses.fields(source)}
        names = (names | set(self.__dict__.get("_rule_fields", ()))) - set(except_) - {"_"}
        object.__setattr__(self, "_rule_fields", frozenset(names))


def setting_values(obj: object, group: type) -> dict[str, Any]:
    """The values ``obj`` holds for the fields of the settings dataclass ``group`` (``obj`` inherits them)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(group) if f.init}  # type: ignore[arg-type]


def argument_types(target: type) -> dict[str, Any]:
    """The resolved type of each constructor argument of ``target``: for a settings dataclass its fields' types
    (each resolved in the module that declares it), else its ``__init__``'s annotations."""
    if dataclasses.is_dataclass(target):
        return typing.get_type_hints(target)
    return typing.get_type_hints(target.__init__)  # type: ignore[misc]


def describe_arguments(*classes: type) -> None:
    """Append an ``Args:`` section, generated from the field docstrings, to each class's docstring, so ``help()``
    and IDEs show what every argument does (the docs' tables come from the same docstrings)."""
    for cls in classes:
        docs = field_docs(cls)
        lines = ["", "    Args (generated from the settings' declarations):"]
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.init and f.name != "_":
                text = " ".join(docs.get(f.name, "").split())
                wrapped = textwrap.wrap(f"{f.name}: {text}", width=112)
                lines += [f"        {wrapped[0]}", *(f"            {line}" for line in wrapped[1:])]
        cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + "\n".join(lines) + "\n"


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal right after the field, as Sphinx reads it), from every
    dataclass in ``cls``'s MRO; a subclass's own docstring for a field wins."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if "__dataclass_fields__" not in vars(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a frozen application): fields keep their names only
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


@dataclass(eq=False, repr=False)
class DtypeOption(Settings):
    """The dtype the engine keeps an average in (the one engine setting every face takes)."""

    _: KW_ONLY
    dtype: torch.dtype | str | None = None
    """The average's dtype (``torch.float32`` or ``"float32"``); default fp32 for fp16/bf16 weights, else the live
    dtype; ``"live"`` keeps each tensor's own dtype."""

    def __post_init__(self) -> None:
        if self.dtype is not None:
            resolve_dtype(self.dtype, extra=("live",))
        super().__post_init__()


@dataclass(eq=False, repr=False)
class TensorOptions(Settings):
    """Which of the model's tensors the engine keeps, and where (the engine settings of every face, also of those
    that keep copies rather than averages: WiSE-FT's anchor, LCSC's combinations)."""

    _: KW_ONLY
    buffers: BufferPolicy = "average"
    """Floating buffers (BatchNorm statistics): ``"average"`` them like the weights, ``"copy"`` the live value, or
    ``"ignore"`` them; integer buffers are copied unless ``"ignore"``."""
    include: str | Sequence[str] | None = None
    """Glob patterns (``fnmatch``) on ``state_dict`` names (a tied tensor's first name, without ``torch.compile``'s
    ``_orig_mod.`` or DDP's ``module.``): follow only the matching tensors. A pattern that matches nothing is refused
    when the averager is built, quoting it and listing names that exist."""
    exclude: str | Sequence[str] | None = None
    """Glob patterns on ``state_dict`` names, as for ``include``: leave the matching tensors out."""
    device: torch.device | str | None = None
    """Where the average (WiSE-FT's anchor, LCSC's combination buffer) lives (e.g. ``"cpu"`` to keep accelerator
    memory free); default: beside each live tensor."""

    def __post_init__(self) -> None:
        check_buffer_policy(self.buffers)
        check_patterns(self.include, "include")
        check_patterns(self.exclude, "exclude")
        check_device(self.device)
        super().__post_init__()


@dataclass(eq=False, repr=False)
class EngineOptions(TensorOptions, DtypeOption):
    """How the engine keeps an average (``weightavg.Averager``'s settings), the same in every face."""

    _: KW_ONLY
    contiguous: bool = False
    """Re-home the live tensors of each dtype group into one flat buffer when binding, so an update is one kernel per
    group instead of one per tensor; single-process Lightning runs only."""
    nonfinite: NonFinite = "warn"
    """NaN/inf in the live weights, which would poison the average for good. ``"warn"``: updates are unchanged; the
    first check that finds a non-finite average warns once, naming the averager and the first such tensor.
    ``"skip"``: each update reduces the live weights to a finite flag on the device and, where it is false, leaves
    the whole average unchanged (no host sync; the step still counts); warns once. ``"error"``: as ``"skip"``, and the
    next check raises ``FloatingPointError``. Checks (one device read) run before each validation swap, in
    ``averaged()``, ``state_dict()`` and ``save()``; ``"skip"``/``"error"`` cost one extra read per update."""

    def __post_init__(self) -> None:
        check_bool("contiguous", self.contiguous)
        check_choice("nonfinite", self.nonfinite, NONFINITE)
        super().__post_init__()

    def engine_options(self) -> dict[str, Any]:
        """These settings as keyword arguments for ``weightavg.Averager``."""
        return setting_values(self, EngineOptions)


def averager_options(face: object) -> dict[str, Any]:
    """A face's ``weightavg.Averager`` keyword arguments: its ``EngineOptions``, or, for a face that keeps copies of
    the weights rather than averages (``TensorOptions`` only: WiSE-FT's anchor, LCSC's combinations), those with
    each tensor's own dtype."""
    if isinstance(face, EngineOptions):
        return face.engine_options()
    return {**setting_values(face, TensorOptions), "dtype": "live"}


T = TypeVar("T", bound=type)


def renamed_arguments(**renamed: str) -> Callable[[T], T]:
    """Let a face's constructor take the former name of a renamed setting (``old="new"``) with a ``FutureWarning``,
    for one release; ``inspect.signature`` and type checkers see the new names only."""

    def decorate(cls: T) -> T:
        init = vars(cls)["__init__"]  # the dataclass-generated one

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            for old, new in renamed.items():
                if old in kwargs and kwargs[old] is None:  # not given (a config's empty former field)
                    del kwargs[old]
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{cls.__name__}() got {old}= and {new}=: {old} is the former name of {new}")
                    warnings.warn(
                        f"{cls.__name__}({old}=...) is now {cls.__name__}({new}=...): {old} will be removed",
                        FutureWarning,
                        stacklevel=outside_stacklevel(),
                    )
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__  # type: ignore[misc]
        # Read by the Hydra configs, which take the former names too (weightavg.config.builds).
        cls.__renamed_arguments__ = {**getattr(cls, "__renamed_arguments__", {}), **renamed}  # type: ignore[attr-defined]
        return cls

    return decorate
