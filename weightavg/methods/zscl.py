"""ZSCL (Zheng et al. 2023, "Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language
Models"): keep what a pretrained model knows while learning a sequence of tasks.

Weight ensemble (parameter space), per task: at the task's start the ensemble copies the weights; after the
optimizer step of iteration i (counted from 0 in the task), when ``i % I == 0``:

    n <- n + 1;   ensemble <- (n * ensemble + live) / (n + 1)

so the first merge follows the first step and the starting weights count as one member. The live weights train
undisturbed; the ensemble is what is evaluated, what the task ends with, and where the next task starts.

Distillation (feature space): a frozen teacher, the *original* pretrained model (not the previous task's), and a
stream of unlabeled reference inputs; the loss adds ``lambda * KD`` with

    KD = T^2 * mean over rows of CE(softmax(teacher / T), log_softmax(student / T)),   T = 2.

Metrics over a task sequence come from the accuracy matrix ``A[stage][task]`` (``continual_metrics``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightavg.core import io
from weightavg.core.averager import Averager
from weightavg.core.call import Forward, call_with, eval_mode
from weightavg.core.checks import check_callable, check_number, outside_stacklevel
from weightavg.core.io import WeightSource
from weightavg.core.rule import Clock, Event, NotACallback, Snapshot, canonical_eq, canonical_hash, compact_repr
from weightavg.core.settings import Frozen, Settings, describe_arguments


@dataclass(eq=False, repr=False)
class EnsembleSettings(Settings):
    """The weight ensemble's setting (checked when built)."""

    every_n_steps: int = 100
    """The merge interval I (the paper: 100 on the multi-domain benchmark, 10 class-incremental). Steps are counted
    from the last merge, so a step counter that jumps keeps the interval."""

    def __post_init__(self) -> None:
        check_number("every_n_steps", self.every_n_steps, low=1, integer=True)
        super().__post_init__()


@dataclass(eq=False, repr=False)
class DistillationSettings(Settings):
    """The distillation's settings (checked when built; those that act only with ``reference`` are warned about as
    ignored without it)."""

    _: KW_ONLY
    reference: Any = None
    """Unlabeled reference inputs (a DataLoader; ``(inputs, labels)`` batches give their inputs), cycled; ``None``
    disables distillation."""
    distill_weight: float = 1.0
    """Lambda, the loss weight (1; 5 in the paper's class-incremental setting)."""
    temperature: float = 2.0
    """T, the distillation temperature (2)."""
    teacher: WeightSource | None = None
    """The original model's weights (module, state dict or path); default: the model when the first task starts.
    Kept across tasks and in checkpoints."""
    forward: Forward | None = None
    """``forward(module, inputs) -> outputs`` used for teacher and student; default ``module(inputs)``."""
    reference_input: Callable[[Any], Any] | None = None
    """Maps a reference batch to the model's inputs."""

    def __post_init__(self) -> None:
        check_distillation_knobs(self)
        super().__post_init__()

    def build_distillation(self) -> Distillation | None:
        """The distillation these settings describe (``None`` without ``reference``), not yet bound to a model."""
        if self.reference is None:
            return None
        return Distillation(
            self.reference,
            weight=self.distill_weight,
            temperature=self.temperature,
            forward=self.forward,
            reference_input=self.reference_input,
        )


@dataclass(eq=False, repr=False)
class ZSCL(EnsembleSettings, Frozen, NotACallback):
    """The ZSCL weight-ensemble rule: copy at the task's start (bind), merge after the task's first optimizer step
    and then every ``every_n_steps`` steps with weight ``1 / (n + 1)``. The faces add ``DistillationSettings``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._freeze()

    def weight(self, event: Event, clock: Clock, num_updates: int) -> float | None:
        if event == "bind":
            return 1.0
        if event != "step":
            return None
        if num_updates == 0:
            return 1.0
        if num_updates > 1 and clock.step - (clock.last_update_step or 0) < self.every_n_steps:
            return None
        return 1.0 / (num_updates + 1)

    __repr__ = compact_repr
    __eq__ = canonical_eq
    __hash__ = canonical_hash

    def validate_clock(self, clock: Clock) -> None:
        return None


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """``T^2 * mean_rows CE(softmax(teacher / T), log_softmax(student / T))`` over the last dimension, in at least
    fp32 (bf16/fp16 outputs are widened; float64 stays float64).

    Rows are every index of the leading dimensions (a batch, or batch x tokens). ``teacher`` carries no gradient.
    """
    check_number("temperature", temperature, low=0.0, low_open=True)
    if student.shape != teacher.shape:
        raise ValueError(f"student outputs {tuple(student.shape)} and teacher outputs {tuple(teacher.shape)} differ")
    dtype = torch.promote_types(student.dtype, torch.float32)
    target = F.softmax(teacher.detach().to(dtype) / temperature, dim=-1)
    log_probs = F.log_softmax(student.to(dtype) / temperature, dim=-1)
    return -(target * log_probs).sum(-1).mean() * temperature**2


def _first(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def check_distillation_knobs(settings: DistillationSettings) -> None:
    """Check ZSCL's distillation settings whether or not they are used, and warn about those that only act with
    ``reference=`` when it is missing (the ensemble alone is a sensible run, e.g. an ablation, so no refusal); a
    ``teacher`` without ``reference`` is refused (it would never be used)."""
    check_number("distill_weight", settings.distill_weight, low=0.0)
    check_number("temperature", settings.temperature, low=0.0, low_open=True)
    check_callable("forward", settings.forward)
    check_callable("reference_input", settings.reference_input)
    if settings.reference is not None:
        return
    if settings.teacher is not None:
        raise ValueError("teacher= is the distillation teacher; give reference= inputs to distill on too")
    ignored = [
        f.name
        for f in dataclasses.fields(DistillationSettings)
        if f.name not in ("reference", "teacher") and getattr(settings, f.name) != f.default
    ]
    if ignored:
        warnings.warn(
            f"ZSCL: {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored without reference= "
            "(they configure the distillation, which needs reference inputs); only the weight ensemble runs",
            UserWarning,
            stacklevel=outside_stacklevel(),
        )


class Distillation:
    """ZSCL's feature-space distillation: a frozen teacher and a cycling stream of reference inputs.

    Args:
        reference: unlabeled reference inputs: any re-iterable (a ``DataLoader``); it is cycled. Batches that are
            lists or tuples give their first element (``(inputs, labels)`` loaders work as they are).
        weight: lambda, the loss weight (1 in the paper's multi-domain setting, 5 class-incremental).
        temperature: T (2 in the paper).
        forward: ``forward(module, inputs) -> outputs`` for both teacher and student (e.g. CLIP image features
            against fixed text features); default ``module(inputs)``.
        reference_input: maps a reference batch to the model's inputs; default: as described for ``reference``.

    The teacher is the bound module's weights at ``bind`` (or ``teacher=``), kept in the live dtype beside them and
    evaluated through ``torch.func.functional_call`` in eval mode, so it needs no second model object. The student
    runs in the module's current mode. ``state_dict`` holds the teacher and how many reference batches were drawn, so
    a resumed run draws the same next batch when the reference order is deterministic.
    """

    def __init__(
        self,
        reference: Iterable[Any],
        *,
        weight: float = 1.0,
        temperature: float = 2.0,
        forward: Forward | None = None,
        reference_input: Callable[[Any], Any] | None = None,
    ) -> None:
        if isinstance(reference, (torch.Tensor, str, bytes)) or not isinstance(reference, Iterable):
            raise TypeError(
                f"reference={type(reference).__name__} must be a re-iterable of input batches, e.g. a DataLoader"
            )
        if isinstance(reference, Iterator):
            raise TypeError("reference= is an iterator (read once); pass something re-iterable, e.g. a DataLoader")
        check_number("weight", weight, low=0.0)
        check_number("temperature", temperature, low=0.0, low_open=True)
        self.reference = reference
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.forward = forward
        self.reference_input = reference_input or _first
        self.teacher: Averager | None = None
        self._module: nn.Module | None = None
        self.consumed = 0
        self._iterator: Iterator[Any] | None = None

    def bind(self, module: nn.Module, source: io.WeightSource | None = None) -> None:
        """Take the teacher: ``module``'s current weights, or ``source`` (module, state dict or path) if given.

        Binding again (a new task, or a new module object holding the same model) keeps the teacher already taken.
        """
        previous = self.teacher
        self.teacher = Averager(module, Snapshot(), buffers="copy", dtype="live")
        self._module = module
        if previous is not None:
            self.teacher.load_state_dict(previous.state_dict())
        elif source is not None:
            self.teacher.load_weights(source, argument="teacher")

    def next_inputs(self, transfer: Callable[[Any], Any] | None = None) -> Any:
        """The next reference inputs (after ``transfer``, e.g. a move to the model's device)."""
        if self._iterator is None:
            self._iterator = self._resume_iterator()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.reference)
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError("reference= yielded no batches") from None
        self.consumed += 1
        if transfer is not None:
            batch = transfer(batch)
        return self.reference_input(batch)

    def _resume_iterator(self) -> Iterator[Any]:
        """A fresh pass positioned after the ``consumed`` batches drawn so far (counted over whole cycles)."""
        iterator = iter(self.reference)
        skip = self.consumed
        try:  # a DataLoader over an IterableDataset has __len__ but raises
            length = len(self.reference) if isinstance(self.reference, Sized) else 0
        except TypeError:
            length = 0
        if length > 0:
            skip %= length
        seen = 0
        while skip:
            try:
                next(iterator)
            except StopIteration:
                if seen == 0:
                    raise ValueError("reference= yielded no batches") from None
                skip %= seen  # one whole pass is ``seen`` batches long
                iterator, seen = iter(self.reference), 0
                continue
            skip -= 1
            seen += 1
        return iterator

    def teacher_outputs(self, inputs: Any) -> Any:
        """The teacher's outputs on ``inputs`` (no gradient, eval mode)."""
        teacher, module = self._teacher()
        with torch.no_grad(), eval_mode(module):
            return call_with(module, teacher.averaged_tensors(), inputs, self.forward)

    def loss(self, transfer: Callable[[Any], Any] | None = None) -> torch.Tensor:
        """``weight * kd_loss(student, teacher, temperature)`` on the next reference batch."""
        inputs = self.next_inputs(transfer)
        teacher = self.teacher_outputs(inputs)
        _, module = self._teacher()
        student = self.forward(module, inputs) if self.forward is not None else module(inputs)
        return self.weight * kd_loss(student, teacher, self.temperature)

    def _teacher(self) -> tuple[Averager, nn.Module]:
        if self.teacher is None or self._module is None:
            raise RuntimeError("the distillation teacher is not bound yet (bind(module) first)")
        return self.teacher, self._module

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self._teacher()[0].state_dict(), "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"teacher", "consumed"}:
            raise ValueError("state must come from Distillation.state_dict() (keys 'teacher' and 'consumed')")
        self._teacher()[0].load_state_dict(state["teacher"])
        self.consumed = int(state["consumed"])
        self._iterator = None  # the next draw skips what was consumed


@dataclass(frozen=True)
class ContinualMetrics:
    """ZSCL's summary of a task sequence (accuracies in the matrix's units).

    Attributes:
        transfer: for each task after the first, its mean accuracy over the stages before it was learned; averaged
            over those tasks (zero-shot transfer kept; NaN with one task).
        avg: the mean of every entry (each task over every stage).
        last: the mean of the final row (every task after the whole sequence).
    """

    transfer: float
    avg: float
    last: float


def continual_metrics(matrix: Sequence[Sequence[float]] | torch.Tensor) -> ContinualMetrics:
    """Transfer / Avg / Last from ``matrix[stage][task]``: the accuracy on ``task`` after learning tasks ``0..stage``.

    Raises:
        ValueError: unless the matrix is square (one row per learned task, one column per task), non-empty, finite.
    """
    table = torch.as_tensor(matrix, dtype=torch.float64)
    if table.ndim != 2 or table.shape[0] != table.shape[1] or table.numel() == 0:
        raise ValueError(
            f"matrix of shape {tuple(table.shape)} must be square and non-empty: matrix[stage][task] for T tasks"
        )
    if not torch.isfinite(table).all():
        raise ValueError("matrix holds NaN or infinite entries")
    tasks = table.shape[0]
    before = [table[:task, task].mean() for task in range(1, tasks)]
    transfer = torch.stack(before).mean().item() if before else float("nan")
    return ContinualMetrics(transfer=transfer, avg=table.mean().item(), last=table[-1].mean().item())


describe_arguments(ZSCL)
