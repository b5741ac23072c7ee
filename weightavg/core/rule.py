"""What a method's rule is: a small picklable object that says, at each event, whether and how much to average.

The engine (``Averager``) owns tensors and counters; a rule owns only hyperparameters and the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args, runtime_checkable

Event = Literal["bind", "step", "epoch"]


@dataclass(frozen=True)
class Clock:
    """Training time at an event.

    Attributes:
        step: optimizer steps done (1 after the first ``optimizer.step()``).
        epoch: epochs done (1 at the end of the first epoch).
        total_steps: optimizer steps the whole run will take, when known (needed for starts given as a fraction).
        last_update_step, last_update_epoch: the clock at the last update (``None`` before the first). Rules space
            updates by the time elapsed since then, so a step counter that jumps (two optimizers stepping per
            batch) neither skips updates nor changes an EMA's time constant.
    """

    step: int
    epoch: int
    total_steps: int | None = None
    last_update_step: int | None = None
    last_update_epoch: int | None = None


@runtime_checkable
class Rule(Protocol):
    """An averaging rule: ``avg <- lerp(avg, live, weight)`` at the events where ``weight`` is not ``None``.

    ``event`` is ``"bind"`` when the averager is created (a weight of 1 makes the average a copy of the live weights
    right away), ``"step"`` after each optimizer step, and ``"epoch"`` at each epoch's end. ``num_updates`` counts the
    updates done so far (0 before the first, which must have weight 1).
    """

    def weight(self, event: Event, clock: Clock, num_updates: int) -> float | None: ...

    def validate_clock(self, clock: Clock) -> None:
        """Raise ``ValueError`` if this rule cannot run with this clock (e.g. a fraction without total steps)."""
        ...


def compact_repr(rule: object, **resolved: Any) -> str:
    """The rule's canonical text ``Name(field=value, ...)``: equal settings give equal text however they were spelled
    (``EMA()`` and ``EMA(decay=0.999)`` both read ``EMA(decay=0.999)``), so names and saved states derived from it
    do not depend on the spelling.

    A field is written when its value differs from the field's default. ``resolved`` gives the effective value of
    fields whose stored value is a placeholder or has several spellings (EMA's ``decay=None`` is 0.999; a half-life
    is a decay), written as given; a resolved value of ``None`` leaves the field out. Whole numbers in other ``float``
    fields are written as floats (``gamma=2`` reads ``gamma=2.0``).
    """
    import dataclasses

    parts = []
    for f in dataclasses.fields(rule):  # type: ignore[arg-type]
        if f.name in resolved:
            value = resolved[f.name]
            if value is None:
                continue
        else:
            value = getattr(rule, f.name)
            if _float_field(f) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
        if f.default is dataclasses.MISSING or value != f.default or type(value) is not type(f.default):
            parts.append(f"{f.name}={value!r}")
    return f"{type(rule).__name__}({', '.join(parts)})"


def _float_field(f: Any) -> bool:
    """Whether a dataclass field is annotated ``float`` or ``float | None`` (as text under postponed annotations)."""
    if isinstance(f.type, str):
        return f.type.replace(" ", "") in ("float", "float|None", "None|float", "Optional[float]")
    return f.type is float or float in get_args(f.type)


def canonical_eq(rule: object, other: object) -> bool:
    """Rules are equal when their canonical texts are (``EMA() == EMA(decay=0.999)``): same method, same settings."""
    return type(other) is type(rule) and repr(other) == repr(rule)


def canonical_hash(rule: object) -> int:
    return hash((type(rule).__name__, repr(rule)))


def method_of(text: str) -> str:
    """The method's name in a rule's text: ``"EMA"`` for ``"EMA(decay=0.999)"``."""
    return text.split("(", 1)[0].strip()


def same_rule(saved: str, rule: object) -> bool:
    """Whether the rule text ``saved`` (from a state written by this or an older version, whose texts left out
    defaults) describes ``rule``: rebuilt from its literal arguments when it can be, else compared as text."""
    if saved == repr(rule):
        return True
    import ast

    try:
        call = ast.parse(saved, mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            return False
        settings = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords if keyword.arg}
        return repr(type(rule)(**settings)) == repr(rule)
    except Exception:  # not literal arguments, or settings this version refuses: a different rule
        return False


def check_saved_rule(saved: Any, rule: object, *, what: str) -> str | None:
    """Compare the rule text saved in a state with the running ``rule``.

    Another method raises ``ValueError``: its average means something else (an EMA is not an SWA's running mean).
    The same method with other settings (a decay changed on resume) is allowed: the returned message names both, for
    the caller to warn with. A state without a saved rule (written before rules were saved) returns a message too.

    Args:
        saved: the state's ``"rule"`` entry (``None`` when absent).
        rule: the rule this object runs.
        what: names the state in messages (e.g. ``"averaging state"``).
    """
    if saved is None:
        return f"weightavg: the {what} records no rule (an older checkpoint); loading it into {rule!r} unchecked"
    if not isinstance(saved, str):
        raise ValueError(f"the {what} has rule={saved!r}; expected the rule's text, e.g. {rule!r}")
    if method_of(saved) != method_of(repr(rule)):
        raise ValueError(
            f"the {what} was saved by {saved} and cannot continue as {rule!r}: another method's average means "
            "something else. Load it into the same method, or give this averager another name= to start afresh"
        )
    if same_rule(saved, rule):
        return None
    return (
        f"weightavg: the {what} was saved by {saved}; it continues under the new settings {rule!r} (the average so "
        "far keeps what the old settings made of it)"
    )


@dataclass(frozen=True)
class Snapshot:
    """The rule of a frozen copy: take the live weights when bound, never update.

    WiSE-FT's zero-shot anchor and ZSCL's teacher are snapshots; the engine swaps, blends, saves and restores them
    like any average.
    """

    def weight(self, event: Event, clock: Clock, num_updates: int) -> float | None:
        return 1.0 if event == "bind" else None

    def validate_clock(self, clock: Clock) -> None:
        return None


#: Attributes Lightning looks up on every object in ``Trainer(callbacks=...)`` besides its ``on_*`` hooks.
_CALLBACK_ATTRIBUTES = frozenset({"setup", "teardown", "state_key", "state_dict", "load_state_dict"})


class NotACallback:
    """Base of the rules exported at the top level (``weightavg.EMA``, ...): a rule passed to ``Trainer(callbacks=...)``
    by mistake gets an error naming the callback to use instead of Lightning's bare ``AttributeError``."""

    if not TYPE_CHECKING:  # hidden from mypy, which would otherwise accept any attribute of a rule

        def __getattr__(self, name: str) -> object:
            if name.startswith("on_") or name in _CALLBACK_ATTRIBUTES:
                kind = type(self).__name__
                raise AttributeError(
                    f"{kind}(...) from weightavg / weightavg.methods is the averaging rule, not a Lightning callback "
                    f"(it has no {name!r}): pass weightavg.callbacks.{kind}(...) to Trainer(callbacks=...), or use "
                    f"weightavg.optim.{kind}(optimizer, ...) in a plain loop"
                )
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
