"""The engine: averaged copies of a model's tensors, updated by batched kernels, swapped in without copies.

``Averager`` binds to a module (or bare parameters), groups tensors by device and dtype once, and asks a method's
rule what to do at each event. It knows no method and imports neither Lightning nor Hydra.
"""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from weightavg.core import io, kernels
from weightavg.core.binding import BufferPolicy, Entry, Owner, bind_module, bind_tensors, rekey
from weightavg.core.checks import check_choice, check_device, check_number, resolve_dtype
from weightavg.core.rule import Clock, Event, Rule, check_saved_rule

STATE_VERSION = 1
# Counters every state holds (``last_update_*`` came later and default to ``last_*``).
_COUNTERS = ("num_updates", "step_count", "epoch_count", "last_step", "last_epoch")

#: What an averager does when the live weights hold NaN or inf (see ``Averager``'s ``nonfinite``).
NonFinite = Literal["warn", "skip", "error"]
NONFINITE: tuple[NonFinite, ...] = ("warn", "skip", "error")


#: ``derive(out, average, live)``: fill ``out`` from an averaged group's average and live tensors (``swap_in_derived``).
Derive = Callable[[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]], None]


@dataclass
class _Group:
    """Tensors that one kernel launch updates: same live device/dtype, same average device/dtype, same kind."""

    live: list[torch.Tensor]
    avg: list[torch.Tensor]
    averaged: bool
    # Tensors with the live dtype/device holding the average while it is swapped in; ``avg`` itself when the
    # average already has the live dtype and device (then a swap moves pointers only).
    views: list[torch.Tensor] | None = None
    # Copies of the live tensors on the average's device, used when the two devices differ.
    staging: list[torch.Tensor] | None = None
    direct: bool = True
    names: list[str] = field(default_factory=list)
    owners: list[Owner | None] = field(default_factory=list)
    # (slot dicts, attributes) of the owners, for a fast identity check of every live tensor (built when needed).
    slots: tuple[list[dict[str, Any]], list[str]] | None = None
    # With ``contiguous=True``: (flat average, flat live storage) that every tensor of the group views, and the
    # live tensors' data pointers when bound (the layout holds while they are unchanged).
    flat: tuple[torch.Tensor, torch.Tensor] | None = None
    pointers: list[int] = field(default_factory=list)
    # Live-dtype buffers that hold a blend of the average and the live weights while it is swapped in.
    work: list[torch.Tensor] | None = None
    # The live tensors' (device, dtype) when bound: ``model.half()`` / ``model.to(...)`` keep the Parameter objects
    # but change this, and the group's averages, staging and swap buffers no longer fit them.
    spec: tuple[torch.device, torch.dtype] | None = None


def _check_live(group: _Group, *, every: bool) -> None:
    """Raise ``RuntimeError`` naming the first followed tensor whose device, dtype (or, with ``every``, shape) is no
    longer what it was when bound. ``every=False`` checks each group's first tensor only (the per-update check)."""
    count = len(group.live) if every else 1
    for index in range(count):
        live = group.live[index]
        device, dtype = group.spec or (live.device, live.dtype)
        now = (live.device, live.dtype, tuple(live.shape))
        then = (device, dtype, tuple(group.avg[index].shape))
        if now != then:
            raise RuntimeError(
                f"weightavg: {group.names[index]!r} changed after the averager was built (device, dtype, shape: "
                f"{then} -> {now}, e.g. model.half() or model.to(...)); the average cannot follow it: convert or move "
                "the model before building the averager"
            )


@torch.no_grad()
def _make_flat(group: _Group) -> None:
    """Re-home a group's live tensors into one flat buffer (and its averages into another), so that an update is a
    single ``lerp_`` over each: no per-tensor launch cost. Skipped unless every tensor is dense and contiguous."""
    if len(group.live) < 2 or not all(t.is_contiguous() and t.layout == torch.strided for t in group.live):
        return
    sizes = [t.numel() for t in group.live]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    first = group.live[0]
    # Already laid out back to back (another contiguous averager bound first)? Then share that layout.
    rehome = not _viewing_one_buffer(group.live, sizes)
    if rehome:
        flat_live = torch.empty(sum(sizes), dtype=first.dtype, device=first.device)
    else:
        flat_live = first.detach().new_empty(0)
        flat_live.set_(first.untyped_storage(), first.storage_offset(), (sum(sizes),), (1,))
    flat_avg = torch.empty(sum(sizes), dtype=group.avg[0].dtype, device=flat_live.device)
    averages = []
    for tensor, average, offset, size in zip(group.live, group.avg, offsets, sizes, strict=True):
        avg_view = flat_avg.narrow(0, offset, size)
        avg_view.copy_(average.reshape(-1))
        averages.append(avg_view.view_as(tensor))
        if rehome:
            live_view = flat_live.narrow(0, offset, size)
            live_view.copy_(tensor.detach().reshape(-1))
            tensor.data = live_view.view_as(tensor)
    group.avg = averages
    group.flat = (flat_avg, flat_live)
    group.pointers = [t.data_ptr() for t in group.live]


def _viewing_one_buffer(tensors: list[torch.Tensor], sizes: list[int]) -> bool:
    """Whether the tensors are consecutive, back-to-back slices of one storage (an existing flat layout)."""
    storage = tensors[0].untyped_storage().data_ptr()
    offset = tensors[0].storage_offset()
    for tensor, size in zip(tensors, sizes, strict=True):
        if tensor.untyped_storage().data_ptr() != storage or tensor.storage_offset() != offset:
            return False
        offset += size
    return True


def _flat_intact(group: _Group) -> bool:
    """Whether the live tensors still view the flat buffer; if something re-homed their storage (a ``param.data =``
    assignment), fall back to per-tensor batched updates for good, with a warning. (Replaced Parameter objects, as
    from ``load_state_dict(assign=True)``, are re-homed into the buffer by ``Averager._follow``.)"""
    if [t.data_ptr() for t in group.live] == group.pointers:
        return True
    warnings.warn(
        "weightavg: the model's tensors no longer share the contiguous buffer (moved or reassigned after binding); "
        "falling back to per-tensor batched updates",
        stacklevel=4,
    )
    group.flat = None
    return False


def _nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A bool device tensor, one entry per tensor: whether it holds NaN or inf (its max-norm is not finite; empty
    tensors, which have no max-norm, are finite)."""
    filled = [t.detach() for t in tensors if t.numel()]
    flags = ~torch.isfinite(torch.stack(kernels.max_abs(filled))) if filled else None
    if len(filled) == len(tensors) and flags is not None:
        return flags
    # Empty tensors among them (rare): scatter by a host-built index (a small copy to the device).
    full = torch.zeros(len(tensors), dtype=torch.bool, device=tensors[0].device)
    if flags is not None:
        full[[i for i, t in enumerate(tensors) if t.numel()]] = flags
    return full


def _placement(requested: torch.device | None, live: torch.device) -> torch.device:
    """Where an average lives: ``live`` unless another device was asked for (``"cuda"`` and ``"cuda:0"`` on a
    ``cuda:0`` tensor, or ``"cpu:0"`` on a CPU tensor, are the same place)."""
    if requested is None or requested.type != live.type:
        return requested or live
    if requested.index is None or live.index is None or requested.index == live.index:
        return live
    return requested


def _average_dtype(live: torch.dtype, requested: torch.dtype | str | None, averaged: bool) -> torch.dtype:
    if not averaged or requested == "live":
        return live
    if isinstance(requested, torch.dtype):
        return requested
    return torch.float32 if live in (torch.float16, torch.bfloat16) else live


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """``None``, ``"live"`` (each tensor's own dtype), a floating ``torch.dtype``, or its name (``"float32"``, as Hydra
    configs write it)."""
    return None if dtype is None else resolve_dtype(dtype, extra=("live",))


class Averager:
    """Averaged copies of a model's weights, driven by a rule.

    Args:
        target: the live ``nn.Module`` (parameters and persistent buffers, by ``state_dict`` name) or an iterable of
            tensors (named by position).
        rule: the method's rule (``weightavg.methods.EMA(...)``, ``weightavg.methods.SWA(...)``, ...).
        buffers: ``"average"``, ``"copy"`` or ``"ignore"`` floating buffers (integer buffers are always copied).
        include, exclude: glob patterns on names selecting which tensors to follow.
        parameters: with a module, follow only these parameters (and the module's buffers).
        device: where the averages live; default: each live tensor's own device.
        dtype: dtype of the averages (or its name); default fp32 for fp16/bf16 tensors and the live dtype otherwise;
            ``"live"`` keeps each tensor's own dtype (snapshots, which never accumulate, lose nothing by it).
        total_steps: the run's total optimizer steps, for starts given as a fraction of training.
        contiguous: re-home the live tensors of each (device, dtype) group into one flat buffer, so an update is one
            ``lerp_`` per group instead of one kernel per tensor (the per-tensor cost of foreach on CPU). Opt-in: it
            changes where the model's tensors live; bind after moving the model and before wrapping it for DDP.
            If the model's tensors are re-homed later (``model.to()``), updates fall back to per-tensor ones.
        nonfinite: what to do when the live weights hold NaN or inf, which would poison the average for good.
            Checks read the device back only where the host waits anyway: ``refresh()`` (before the faces' swaps),
            ``averaged()``, ``state_dict()`` and ``save()``. ``"warn"`` (default): the update path is unchanged; a
            check that finds a non-finite average warns once, naming the averager and the first such tensor.
            ``"skip"``: each update first reduces the live weights to a finite flag on the device and, where it is
            false, leaves the whole average (copied buffers included) as it was, with no host sync; a check warns
            once. The step still counts (``num_updates`` is a host counter), so for SWA a skipped sample's share
            goes to the samples before it. ``"error"``: as ``"skip"``, and the next check raises
            ``FloatingPointError`` (the average saved so far stays finite). Both cost one extra read of the live
            weights per update.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> from weightavg.methods import EMA
        >>> averager = Averager(model, EMA(decay=0.9))
        >>> averager.step()   # after each optimizer.step()
        True
        >>> with averager.averaged():
        ...     _ = model(torch.zeros(1, 4))
    """

    def __init__(
        self,
        target: nn.Module | Iterable[torch.Tensor],
        rule: Rule,
        *,
        buffers: BufferPolicy = "average",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        parameters: Iterable[torch.Tensor] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        total_steps: int | None = None,
        contiguous: bool = False,
        nonfinite: NonFinite = "warn",
    ) -> None:
        if not isinstance(rule, Rule):
            raise TypeError(f"rule={rule!r} must be an averaging rule such as weightavg.methods.EMA(...)")
        dtype = _resolve_dtype(dtype)
        if total_steps is not None:
            check_number("total_steps", total_steps, low=1, integer=True)
        self.rule = rule
        self.total_steps = total_steps
        if not isinstance(target, (nn.Module, Iterable)) or isinstance(target, torch.Tensor):
            raise TypeError(
                f"target={target!r} must be an nn.Module or an iterable of tensors (e.g. model.parameters())"
            )
        if parameters is not None and not isinstance(target, nn.Module):
            raise ValueError("parameters= restricts a module's parameters; with a list of tensors, pass just those")
        if isinstance(target, nn.Module):
            entries = bind_module(target, buffers=buffers, include=include, exclude=exclude, parameters=parameters)
        else:
            if include is not None or exclude is not None:
                raise ValueError("include=/exclude= select tensors by name and need a module target")
            entries = bind_tensors(target)
        self.entries: list[Entry] = entries
        self.device = check_device(device)
        if not isinstance(contiguous, bool):
            raise TypeError(f"contiguous={contiguous!r} must be a bool")
        self.contiguous = contiguous
        check_choice("nonfinite", nonfinite, NONFINITE)
        self.nonfinite: NonFinite = nonfinite
        #: How warnings and errors name this averager; the faces set their own names.
        self.label = repr(rule)
        self._nonfinite_reported = False
        self.dtype = dtype
        self._groups = self._make_groups(entries)
        # With nonfinite="skip"/"error": per group, a device flag per floating live tensor, set once it held NaN/inf.
        self._seen_nonfinite: list[torch.Tensor | None] = [None] * len(self._groups)
        # Entries in group order, for swaps and state; built once.
        self._live = [t for g in self._groups for t in g.live]
        self._avg = [t for g in self._groups for t in g.avg]
        self._names = [n for g in self._groups for n in g.names]
        self._saved: list[torch.Tensor] | None = None
        self._derived: Hashable | None = None  # the tag of the derived weights swapped in, if some are
        self.num_updates = 0
        self.step_count = 0
        self.epoch_count = 0
        self._last_step: int | None = None
        self._last_epoch: int | None = None
        self._last_update_step: int | None = None
        self._last_update_epoch: int | None = None
        rule.validate_clock(self.clock)
        self._event("bind")

    # ------------------------------------------------------------------ binding
    def _make_groups(self, entries: list[Entry]) -> list[_Group]:
        groups: dict[tuple[Any, ...], _Group] = {}
        with torch.no_grad():
            for entry in entries:
                live = entry.tensor
                avg_device = _placement(self.device, live.device)
                avg_dtype = _average_dtype(live.dtype, self.dtype, entry.averaged)
                key = (live.device, live.dtype, avg_device, avg_dtype, entry.averaged)
                group = groups.get(key)
                if group is None:
                    direct = avg_device == live.device and avg_dtype == live.dtype
                    group = groups[key] = _Group([], [], entry.averaged, direct=direct, spec=(live.device, live.dtype))
                    if avg_device != live.device:
                        group.staging = []
                group.live.append(live)
                group.avg.append(live.detach().to(device=avg_device, dtype=avg_dtype, copy=True))
                if group.staging is not None:
                    group.staging.append(torch.empty_like(group.avg[-1]))
                group.names.append(entry.name)
                group.owners.append(entry.owner)
        for group in groups.values():
            if self.contiguous and group.averaged and group.staging is None:
                _make_flat(group)
            if group.direct:
                group.views = group.avg
        return list(groups.values())

    def tensor_groups(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """(live tensors, averages) of each averaged group, for methods that run their own arithmetic on them
        (NoLoCo's outer step): one flat tensor each where the group is contiguous, else the group's tensors."""
        self._follow()
        pairs = []
        for group in self._groups:
            if not group.averaged:
                continue
            if group.flat is not None and _flat_intact(group):
                pairs.append(([group.flat[1]], [group.flat[0]]))
            else:
                pairs.append((group.live, group.avg))
        return pairs

    @property
    def names(self) -> list[str]:
        """Canonical names of the followed tensors, in the engine's order."""
        return list(self._names)

    @property
    def clock(self) -> Clock:
        return self._clock_at(self.step_count, self.epoch_count)

    def _clock_at(self, step: int, epoch: int) -> Clock:
        return Clock(step, epoch, self.total_steps, self._last_update_step, self._last_update_epoch)

    @property
    def has_average(self) -> bool:
        """Whether at least one update has happened (before that, the average is meaningless)."""
        return self.num_updates > 0

    @property
    def is_swapped(self) -> bool:
        """Whether the model currently holds other weights than the live ones: the average (inside ``averaged()`` or
        after ``swap()``) or a blend (after ``blend()``)."""
        return self._saved is not None

    @property
    def derived_tag(self) -> Hashable | None:
        """The ``tag`` of the weights ``swap_in_derived`` put into the model, or ``None`` when none are in."""
        return self._derived

    # ------------------------------------------------------------------ updates
    def step(self, step: int | None = None) -> bool:
        """Signal that an optimizer step has happened; update the average if the rule says so.

        Args:
            step: optimizer steps done so far (e.g. Lightning's ``trainer.global_step``); default: one more than
                last time. A repeated value is ignored, so calling this once per batch under gradient accumulation
                with the true step count is safe.

        Returns:
            Whether the average was updated.
        """
        if step is None:
            step = self.step_count + 1
        if step == self._last_step:
            return False
        if self._last_update_step is not None and step < self._last_update_step:
            raise ValueError(
                f"step={step} is before the last update (step {self._last_update_step}); the step count must not "
                "go backwards (bind a new averager for a new run, or load the state of this one)"
            )
        updated = self._event("step", self._clock_at(step, self.epoch_count))
        self.step_count = self._last_step = step
        return updated

    def epoch_end(self, epoch: int | None = None) -> bool:
        """Signal the end of an epoch (``epoch`` = epochs done); update if the rule says so. Repeats are ignored."""
        if epoch is None:
            epoch = self.epoch_count + 1
        if epoch == self._last_epoch:
            return False
        updated = self._event("epoch", self._clock_at(self.step_count, epoch))
        self.epoch_count = self._last_epoch = epoch
        return updated

    def _event(self, event: Event, clock: Clock | None = None) -> bool:
        """Ask the rule about ``event`` at ``clock``; update if it gives a weight. Counters are committed by the
        caller only after the update succeeded, so a refused update (e.g. while swapped) can be retried."""
        clock = clock or self.clock
        weight = self.rule.weight(event, clock, self.num_updates)
        if weight is None:
            return False
        self.update(weight)
        self.num_updates += 1
        self._last_update_step, self._last_update_epoch = clock.step, clock.epoch
        return True

    @torch.no_grad()
    def update(self, weight: float) -> None:
        """``avg <- avg + weight * (live - avg)`` for averaged tensors; copied tensors take the live value.

        One batched ``lerp_`` per group; where the average's dtype differs from the live one (an fp32 average of
        bf16 weights), the live values are cast into a bounded staging buffer first, so the update is a true fp32
        ``lerp_`` (``kernels.lerp_``). ``weight`` is a Python float, so nothing waits on the device.
        """
        if self._saved is not None:
            raise RuntimeError("cannot update the average while it is swapped into the model; swap back first")
        self._follow()
        for group in self._groups:
            _check_live(group, every=False)
        enabled = self._live_finite() if self.nonfinite != "warn" else None
        for group in self._groups:
            guard = None if enabled is None else enabled.to(group.avg[0].device, non_blocking=True)
            if group.flat is not None and _flat_intact(group):
                flat_avg, flat_live = group.flat
                kernels.lerp_([flat_avg], [flat_live], weight, enabled=guard)
                continue
            sources = group.live
            if group.staging is not None:
                kernels.copy_(group.staging, group.live)
                sources = group.staging
            if group.averaged:
                kernels.lerp_(group.avg, sources, weight, enabled=guard)
            elif guard is not None:
                kernels.lerp_(group.avg, sources, 1.0, enabled=guard)  # a guarded copy
            else:
                kernels.copy_(group.avg, sources)

    def _live_finite(self) -> torch.Tensor:
        """A 0-dim bool device tensor: whether every floating live tensor is finite now; records which were not.
        The max-norm of a tensor is finite exactly when all its values are (and cannot overflow)."""
        flags = []
        for index, group in enumerate(self._groups):
            if not group.live[0].is_floating_point():
                continue
            bad = _nonfinite(group.live)
            seen = self._seen_nonfinite[index]
            self._seen_nonfinite[index] = bad if seen is None else seen | bad
            flags.append(bad.any())
        if not flags:
            return torch.ones((), dtype=torch.bool, device=self._groups[0].live[0].device)
        first = flags[0].device
        return ~torch.stack([flag.to(first, non_blocking=True) for flag in flags]).any()

    def check_finite(self) -> None:
        """Apply the ``nonfinite`` policy now (this reads the device): warn once, or raise, if NaN/inf entered the
        average (``"warn"``) or an update was skipped for it (``"skip"``, ``"error"``). Called by ``refresh()``,
        ``averaged()``, ``state_dict()`` and ``save()``.

        Raises:
            FloatingPointError: with ``nonfinite="error"``, once the live weights held NaN or inf at an update.
        """
        name = self._first_nonfinite()
        if name is None:
            return
        what, fix = (
            ("entered the average", "its values are NaN/inf from now on; nonfinite='skip' leaves such updates out")
            if self.nonfinite == "warn"
            else ("was in the live weights at an update", "that update left the average unchanged")
        )
        message = f"weightavg: {self.label}: a non-finite value (NaN or inf) {what}, first in {name!r}; {fix}"
        if self.nonfinite == "error":
            raise FloatingPointError(f"{message} (nonfinite='error')")
        if not self._nonfinite_reported:
            self._nonfinite_reported = True
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _first_nonfinite(self) -> str | None:
        """The first tensor (engine order) recorded non-finite by guarded updates, else the first averaged tensor
        holding NaN/inf."""
        for group, seen in zip(self._groups, self._seen_nonfinite, strict=True):
            if seen is not None and bool(seen.any()):
                return group.names[int(seen.nonzero()[0, 0])]
        for group in self._groups:
            if not (group.averaged and group.avg[0].is_floating_point()):
                continue
            bad = _nonfinite(group.avg)
            if bool(bad.any()):
                return group.names[int(bad.nonzero()[0, 0])]
        return None

    def refresh(self) -> None:
        """Apply the ``nonfinite`` policy and follow replaced tensor objects (``_follow``). Called by the faces
        before swaps; a no-op while swapped in.

        Raises:
            RuntimeError: if a followed tensor now has another device, dtype or shape than when the averager was
                built, or was removed from its module.
        """
        if self._saved is not None:
            return
        self.check_finite()
        self._follow()

    @torch.no_grad()
    def _follow(self) -> None:
        """Follow tensors whose module now holds another object under their name: ``Module.to()``/``.cpu()`` make
        new buffers, and ``module.weight = nn.Parameter(...)`` or ``load_state_dict(assign=True)`` new parameters.
        A replacement with the same device, dtype and shape is followed from now on (inside a contiguous group its
        values move into the flat buffer, and the old object keeps a copy of its own); any other raises. Host-only
        (an identity check per tensor, no device work unless something was replaced); run before every update,
        swap and export, so the average never silently tracks a tensor the model no longer uses."""
        changed = False
        for group in self._groups:
            if group.slots is None:
                group.slots = (
                    [o.module._parameters if o.parameter else o.module._buffers for o in group.owners if o],
                    [o.attr for o in group.owners if o],
                )
            dicts, attrs = group.slots
            if not dicts or (
                len(dicts) == len(group.live) and all(map(operator.is_, map(dict.get, dicts, attrs), group.live))
            ):
                continue  # bare tensors (no module), or nothing replaced: the common case, ~30 ns a tensor
            for index, owner in enumerate(group.owners):
                if owner is None:
                    continue
                old, current = group.live[index], owner.current()
                if current is old:
                    continue
                name = group.names[index]
                kind = "parameter" if owner.parameter else "buffer"
                if current is None:
                    raise RuntimeError(
                        f"weightavg: {kind} {name!r} was removed from its module after the averager was built; the "
                        "average cannot follow it: build the averager for the model as it is now"
                    )
                then = (old.device, old.dtype, tuple(old.shape))
                now = (current.device, current.dtype, tuple(current.shape))
                if now != then:
                    raise RuntimeError(
                        f"weightavg: {kind} {name!r} was replaced after the averager was built by a tensor with "
                        f"another device, dtype or shape ({then} -> {now}, e.g. model.to(...), model.half() with "
                        "swapped tensors, or load_state_dict(assign=True) of other tensors); the average cannot "
                        "follow it: convert or move the model before building the averager"
                    )
                if group.flat is not None and group.pointers[index] == old.data_ptr():
                    flat_live = group.flat[1]
                    offset = group.avg[index].storage_offset() - group.flat[0].storage_offset()
                    view = flat_live.narrow(0, offset, old.numel()).view_as(old)
                    old.data = old.detach().clone()  # the old object (an optimizer may hold it) keeps its values
                    view.copy_(current.detach())
                    current.data = view
                    group.pointers[index] = current.data_ptr()
                group.live[index] = current
                changed = True
        if changed:
            self._live = [t for g in self._groups for t in g.live]

    # ------------------------------------------------------------------ swapping
    @torch.no_grad()
    def swap(self) -> None:
        """Put the averaged weights into the model, or the live weights back if they are swapped in.

        Same-dtype, same-device tensors exchange storage pointers (``tensor.data``); no tensor is copied and
        nothing is allocated. Where the average has another dtype or device, it is first cast into a persistent
        buffer of the live dtype (allocated on the first swap). Restoring is exact: the live storage itself returns.
        """
        if self._saved is not None:
            for tensor, saved in zip(self._live, self._saved, strict=False):
                tensor.data = saved
            self._saved = None
            self._derived = None
            self._follow()  # a tensor replaced while swapped in: the old object got its storage back above
            return
        self._follow()
        views: list[torch.Tensor] = []
        for group in self._groups:
            _check_live(group, every=True)
        for group in self._groups:
            if group.views is None:
                group.views = [torch.empty_like(live) for live in group.live]
            if not group.direct:
                kernels.copy_(group.views, group.avg)
            views.extend(group.views)
        self._saved = [tensor.data for tensor in self._live]
        for tensor, view in zip(self._live, views, strict=False):
            tensor.data = view

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Run the body with the averaged weights in the model; the live weights return afterwards, even on error."""
        if self._saved is not None:
            yield
            return
        self.check_finite()
        self.swap()
        try:
            yield
        finally:
            if self._saved is not None:  # unless the body already put the live weights back (copy_to_model)
                self.swap()

    # ------------------------------------------------------------------ derived weights (WiSE-FT's blends)
    @torch.no_grad()
    def swap_in_derived(self, derive: Derive, tag: Hashable) -> None:
        """Put weights derived from the average and the live weights into the model, by pointer.

        For each averaged group, ``derive(out, average, live)`` fills ``out``, one work buffer per tensor in the live
        dtype (allocated on the first call: one model's worth), with kernels (``weightavg.core.kernels``); those are
        swapped in. Copied tensors (integer buffers, ``buffers="copy"``) keep their live values. Called again, it
        derives from the live weights again (the average, if swapped in, is taken out first); ``swap()`` puts the
        live weights back exactly, and ``derived_tag`` is ``tag`` until then (``weightavg.methods.wiseft.blend``).
        """
        if self._saved is not None and self._derived is None:
            self.swap()  # the plain average is in: take it out first
        if self._saved is None:
            self._follow()
        live = self._saved if self._saved is not None else [tensor.data for tensor in self._live]
        views: list[torch.Tensor] = []
        start = 0
        for group in self._groups:
            sources = live[start : start + len(group.live)]
            start += len(group.live)
            if not group.averaged:
                views.extend(sources)
                continue
            if group.work is None:
                group.work = [torch.empty_like(source) for source in sources]
            derive(group.work, group.avg, sources)
            views.extend(group.work)
        self._saved = live
        for tensor, view in zip(self._live, views, strict=False):
            tensor.data = view
        self._derived = tag

    @torch.no_grad()
    def derive_into_live(self, derive: Callable[[list[torch.Tensor], list[torch.Tensor]], None]) -> None:
        """``derive(live, average)`` changes the averaged groups' live tensors in place (the average given in the
        live dtype and device), so the model keeps its storage (optimizers and contiguous layouts stay valid); the
        live weights are swapped back first."""
        if self._saved is not None:
            self.swap()
        self._follow()
        for group in self._groups:
            if not group.averaged:
                continue
            average = group.avg
            if not group.direct:
                if group.work is None:
                    group.work = [torch.empty_like(live) for live in group.live]
                kernels.copy_(group.work, group.avg)
                average = group.work
            derive(group.live, average)

    @torch.no_grad()
    def commit_swapped_buffers(self) -> None:
        """While swapped in, take the model's current buffer values (not parameters) into the average, e.g. after
        recomputing BatchNorm statistics on the averaged model. Groups swapped in by pointer already share storage;
        others are copied back, and parameters are left alone so a wider-precision average is never rounded."""
        if self._saved is None:
            raise RuntimeError("commit_swapped_buffers() needs the average swapped in")
        for group in self._groups:
            if group.direct or group.views is None:
                continue
            buffers = [i for i, live in enumerate(group.live) if not isinstance(live, nn.Parameter)]
            kernels.copy_([group.avg[i] for i in buffers], [group.views[i] for i in buffers])

    def follows(self, tensors: Iterable[torch.Tensor]) -> bool:
        """Whether every one of ``tensors`` is a live tensor this averager follows (after ``refresh()``)."""
        self.refresh()
        followed = {id(t) for t in self._live}
        return all(id(t) in followed for t in tensors)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the live weights with the average (the model keeps the averaged weights from now on)."""
        if self._saved is not None:
            self.swap()
        self._follow()
        for group in self._groups:
            kernels.copy_(group.live, group.avg)

    # ------------------------------------------------------------------ views of the state
    def averaged_tensors(self) -> dict[str, torch.Tensor]:
        """Canonical name -> averaged tensor (the engine's own storage; in the average's dtype)."""
        return dict(zip(self._names, self._avg, strict=False))

    def live_tensors(self) -> dict[str, torch.Tensor]:
        """Canonical name -> live weights, also while the average is swapped in."""
        if self._saved is None:
            self._follow()
        live = self._saved if self._saved is not None else [t.detach() for t in self._live]
        return dict(zip(self._names, live, strict=False))

    def aliases(self) -> dict[str, tuple[str, ...]]:
        """Canonical name -> the other ``state_dict`` names of the same (tied) tensor."""
        return {entry.name: entry.names[1:] for entry in self.entries}

    def module_keys(self) -> dict[str, tuple[str, ...]]:
        """Canonical name -> every key of the tensor in the bound module's own ``state_dict``: its names, or where
        the module holds wrappers (``torch.compile``, DDP) the keys with their attributes (``net._orig_mod.weight``
        for ``net.weight``)."""
        return {entry.name: entry.module_keys for entry in self.entries}

    def _named(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` keyed by this averager's names: a compiled or DDP model's keys (``_orig_mod.``, a leading
        ``module.``) are accepted for them."""
        return rekey(tensors, {name for entry in self.entries for name in entry.names})

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything that affects future updates: the averages, the counters and the rule's description.

        Tensors are the engine's own (not copies), like ``nn.Module.state_dict()``.
        """
        self.check_finite()
        return {
            "version": STATE_VERSION,
            "rule": repr(self.rule),
            "averaged": self.averaged_tensors(),
            "num_updates": self.num_updates,
            "step_count": self.step_count,
            "epoch_count": self.epoch_count,
            "last_step": self._last_step,
            "last_epoch": self._last_epoch,
            "last_update_step": self._last_update_step,
            "last_update_epoch": self._last_update_epoch,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; raises ``ValueError`` naming missing, unexpected or mis-shaped tensors, a
        missing counter, or another method's state (``check_state``). A state of the same method saved with other
        settings (a decay changed on resume) loads with a warning naming the old and new rule."""
        self.check_state(state)
        message = check_saved_rule(state.get("rule"), self.rule, what="averaging state")
        if message is not None:
            warnings.warn(message, stacklevel=2)
        averaged = self._named(state["averaged"])
        for name, tensor in zip(self._names, self._avg, strict=False):
            tensor.copy_(averaged[name])
        self.num_updates = int(state["num_updates"])
        self.step_count = int(state["step_count"])
        self.epoch_count = int(state["epoch_count"])
        self._last_step = state["last_step"]
        self._last_epoch = state["last_epoch"]
        # States written before these keys existed: the last update happened at the last step/epoch seen.
        self._last_update_step = state.get("last_update_step", state["last_step"])
        self._last_update_epoch = state.get("last_update_epoch", state["last_epoch"])

    def check_state(self, state: Any) -> None:
        """Raise unless ``state`` could be loaded now (same model, same method, supported version, every counter,
        not swapped in). A state of the same method with other settings loads, with a warning naming both, when
        ``load_state_dict`` loads it; one without a saved rule (older versions) loads with a warning."""
        if not isinstance(state, dict) or "averaged" not in state:
            raise ValueError("state must be a dict returned by Averager.state_dict() (it has no 'averaged' entry)")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"averaging state version {state.get('version')!r} is not supported ({STATE_VERSION})")
        missing = [key for key in _COUNTERS if key not in state]
        if missing:
            raise ValueError(
                f"averaging state is missing {', '.join(map(repr, missing))} (it has {sorted(state)}); it must be a "
                "complete dict returned by Averager.state_dict()"
            )
        # Another method's average is refused here; other settings of the same method warn when loaded.
        check_saved_rule(state.get("rule"), self.rule, what="averaging state")
        self._check_tensors(self._named(state["averaged"]), source="averaging state")
        if self._saved is not None:
            raise RuntimeError("cannot load averaging state while the average is swapped in; swap back first")

    def _check_tensors(self, tensors: dict[str, torch.Tensor], *, source: str) -> None:
        expected = {name: tensor.shape for name, tensor in zip(self._names, self._avg, strict=False)}
        io.check_keys(expected, {name: t.shape for name, t in tensors.items()}, source=source)

    # ------------------------------------------------------------------ safetensors
    def save(self, path: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> Path:
        """Export the averaged weights as safetensors, atomically. ``dtype`` casts floating tensors on the way out.

        Peak memory: the engine's own tensors are streamed to the file (``io.save_safetensors``) with no copy when
        they are contiguous host tensors (flat-buffer views too); a cast (``dtype=``) or an accelerator average is
        converted one tensor at a time, so the transient peak is the largest tensor, not the model.
        """
        self.check_finite()
        tensors = io.CastView(self.averaged_tensors(), dtype)
        return io.save_safetensors(tensors, path, metadata=io.aliases_metadata(self.aliases()))

    def save_model(self, path: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> Path:
        """Export what the model holds now (the live weights, or the average or blend swapped in) as safetensors,
        atomically, under the followed tensors' names."""
        if self._saved is None:
            self._follow()
        tensors = {
            name: t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()
            for name, t in zip(self._names, self._live, strict=False)
        }
        return io.save_safetensors(tensors, path, metadata=io.aliases_metadata(self.aliases()))

    @torch.no_grad()
    def load(self, path: str | os.PathLike[str]) -> None:
        """Import averaged weights written by ``save`` (names and shapes must match; a compiled or DDP model's
        prefixed names are accepted)."""
        tensors = self._named(io.load_safetensors(path))
        self._check_tensors(tensors, source=f"path={str(path)!r}")
        self._import(tensors)

    @torch.no_grad()
    def load_weights(self, source: io.WeightSource, *, argument: str = "weights") -> None:
        """Make the average a copy of ``source``: a module, a state dict, or a safetensors / torch checkpoint path
        (a Lightning ``.ckpt`` gives its ``state_dict``). Every followed tensor must be there (under its name or a
        tied alias) with its shape; entries the averager does not follow are ignored.

        Raises:
            ValueError: naming the missing and mis-shaped entries, and ``argument`` as the source.
        """
        found = self._named(io.read_weights(source, argument=argument))
        aliases = self.aliases()
        tensors = {}
        for name in self._names:
            key = next((key for key in (name, *aliases[name]) if key in found), None)
            if key is not None:
                tensors[name] = found[key]
        label = (
            f"{argument}={str(source)!r}"
            if isinstance(source, (str, os.PathLike))
            else f"{argument} (a {type(source).__name__})"
        )
        self._check_tensors(tensors, source=label)
        self._import(tensors)

    def _import(self, tensors: dict[str, torch.Tensor]) -> None:
        if self._saved is not None:
            raise RuntimeError("cannot import weights while the average is swapped in; swap back first")
        for name, tensor in zip(self._names, self._avg, strict=False):
            tensor.copy_(tensors[name])
        self.num_updates = max(self.num_updates, 1)
        # The import counts as an update now: the next one decays it by the steps elapsed from here.
        self._last_update_step, self._last_update_epoch = self.step_count, self.epoch_count
