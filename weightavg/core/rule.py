"""What a method's rule is: a small picklable object that says, at each event, whether and how much to average.

The engine (``Averager``) owns tensors and counters; a rule owns only hyperparameters and the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

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


def compact_repr(rule: object) -> str:
    """``Name(field=value, ...)`` listing only the fields that differ from their defaults (stable, short names)."""
    import dataclasses

    parts = [
        f"{f.name}={getattr(rule, f.name)!r}"
        for f in dataclasses.fields(rule)  # type: ignore[arg-type]
        if f.default is dataclasses.MISSING or getattr(rule, f.name) != f.default
    ]
    return f"{type(rule).__name__}({', '.join(parts)})"


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
