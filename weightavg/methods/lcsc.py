"""Checkpoint combination: coefficients ``w`` for ``theta(w) = sum_i w_i theta_i`` over K snapshots of one run.

- Uniform soup: ``w_i = 1/K``. Greedy soup (Wortsman et al. 2022, "Model soups"): rank candidates by a held-out
  metric, start from the best, add each next one if the uniform soup's held-out metric improves (the code: strictly;
  the paper: "not worse"; ``rule`` picks).
- EMA-equivalent: what an EMA with decay ``g`` over the K snapshots would be: ``w_0 = g^(K-1)``,
  ``w_i = (1 - g) g^(K-1-i)`` for ``i >= 1``.
- Metric-weighted averaging (Choi and Yu 2025, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted
  Averaging"): weights from each snapshot's training loss or step with one penalty factor ``p``. Reconstruction (the
  paper's exact formula is not reproduced here): ``w_i ∝ (L_i / min L)^(-p)`` by loss, ``w_i ∝ (s_i / max s)^p`` by
  step; ``p = 0`` is uniform, larger ``p`` concentrates on the best or latest.
- LCSC (Liu et al., ICLR 2025, "Linear Combination of Saved Checkpoints Makes Consistency and Diffusion Models
  Better"): ``w`` found by evolutionary search on any fitness. The search code was never released; this is the
  reconstruction of the design notes, every knob configurable: ``sum(w) = 1`` by projection, negative coefficients
  allowed within an L1 bound; the initial population holds the last snapshot alone, the uniform soup, EMA-equivalent
  weights for several decays and Gaussian perturbations of them; each generation draws children from the best
  ``parents`` by uniform crossover and sparse Gaussian mutation, projects them, and keeps the best ``population``.
  Evaluations are cached and the search is deterministic under its seed.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from weightavg.core import io
from weightavg.core.averager import Averager
from weightavg.core.binding import BufferPolicy
from weightavg.core.checks import check_choice, check_number
from weightavg.core.progress import progress_bar
from weightavg.core.rule import Snapshot
from weightavg.core.snapshots import SnapshotInfo, SnapshotStore, combine

Mode = Literal["max", "min"]


def _check_count(k: int) -> None:
    check_number("k", k, low=1, integer=True)


def uniform_weights(k: int) -> torch.Tensor:
    """``1/K`` each (float64)."""
    _check_count(k)
    return torch.full((k,), 1.0 / k, dtype=torch.float64)


def ema_weights(k: int, decay: float) -> torch.Tensor:
    """The coefficients an EMA with ``decay`` applied to the K snapshots in order (the first copied) would give."""
    _check_count(k)
    check_number("decay", decay, low=0.0, high=1.0, high_open=True)
    exponents = torch.arange(k - 1, -1, -1, dtype=torch.float64)
    weights = (1.0 - decay) * decay**exponents
    weights[0] = decay ** (k - 1)
    return weights


def metric_weights(values: Sequence[float], penalty: float, *, by: Literal["loss", "step"] = "loss") -> torch.Tensor:
    """Metric-weighted averaging: ``∝ (L_i / min L)^(-p)`` by loss (positive losses), ``∝ (s_i / max s)^p`` by step.

    Raises:
        ValueError: for a negative penalty, an empty list, non-positive losses or negative steps.
    """
    check_choice("by", by, ("loss", "step"))
    check_number("penalty", penalty, low=0.0)
    table = torch.as_tensor([float(v) for v in values], dtype=torch.float64)
    if table.numel() == 0 or not torch.isfinite(table).all():
        raise ValueError(f"values={list(values)!r} must be a non-empty list of finite numbers")
    if by == "loss":
        if (table <= 0).any():
            raise ValueError(f"values={list(values)!r}: losses must be positive to weight by loss")
        raw = (table / table.min()) ** (-penalty)
    else:
        if (table < 0).any() or table.max() <= 0:
            raise ValueError(f"values={list(values)!r}: steps must be >= 0 with a positive maximum")
        raw = (table / table.max()) ** penalty
    return raw / raw.sum()


def project(weights: torch.Tensor, norm_bound: float | None = None) -> torch.Tensor:
    """Onto ``sum(w) = 1`` (``w += (1 - sum w) / K``), then, if ``sum |w|`` exceeds ``norm_bound``, shrunk toward the
    uniform soup until it does not (the sum stays 1)."""
    w = weights.to(torch.float64)
    k = w.numel()
    w = w + (1.0 - w.sum()) / k
    if norm_bound is None or float(w.abs().sum()) <= norm_bound:
        return w
    uniform = torch.full_like(w, 1.0 / k)
    low, high = 0.0, 1.0
    for _ in range(60):  # the L1 norm of uniform + s * (w - uniform) grows with s: bisect
        middle = (low + high) / 2
        if float((uniform + middle * (w - uniform)).abs().sum()) <= norm_bound:
            low = middle
        else:
            high = middle
    return uniform + low * (w - uniform)


@dataclass(frozen=True)
class GreedySoup:
    """What ``greedy_soup`` chose: candidate indices (in the order added), the soup's score, and every trial."""

    ingredients: list[int]
    score: float
    trials: list[tuple[int, float, bool]]  # (candidate, soup score with it, kept)


def greedy_soup(
    scores: Sequence[float],
    soup_score: Callable[[list[int]], float],
    *,
    mode: Mode = "max",
    rule: Literal["strict", "not_worse"] = "strict",
) -> GreedySoup:
    """Greedy soup over candidates with held-out ``scores``; ``soup_score(indices)`` evaluates the uniform soup of
    those candidates on the same held-out data. Never worse than the best single candidate on that data."""
    check_choice("mode", mode, ("max", "min"))
    check_choice("rule", rule, ("strict", "not_worse"))
    if not scores:
        raise ValueError("scores=[] is empty: give one held-out score per candidate")
    sign = 1.0 if mode == "max" else -1.0
    order = sorted(range(len(scores)), key=lambda i: (-sign * float(scores[i]), i))
    ingredients = [order[0]]
    best = float(scores[order[0]])
    trials: list[tuple[int, float, bool]] = []
    for candidate in order[1:]:
        score = float(soup_score([*ingredients, candidate]))
        better = sign * score > sign * best if rule == "strict" else sign * score >= sign * best
        trials.append((candidate, score, better))
        if better:
            ingredients.append(candidate)
            best = score
    return GreedySoup(ingredients, best, trials)


@dataclass(frozen=True)
class SearchSettings:
    """Knobs of the LCSC search (the design notes' example defaults: 16 + 25 x 12 = 316 evaluations).

    Attributes:
        population: candidates kept each generation.
        parents: the best candidates children are bred from.
        children: new candidates per generation.
        generations: rounds of breeding.
        mutation_rate: probability that a child's coefficient is mutated.
        mutation_std: standard deviation of a mutation (in coefficient units).
        init_std: standard deviation of the perturbations that fill the initial population.
        norm_bound: bound on ``sum |w|`` (``None``: unbounded).
        decays: EMA decays whose equivalent coefficients seed the initial population.
        seed: seeds every random draw; the search is deterministic given it and the fitness.
    """

    population: int = 16
    parents: int = 4
    children: int = 12
    generations: int = 25
    mutation_rate: float = 0.3
    mutation_std: float = 0.1
    init_std: float = 0.05
    norm_bound: float | None = 10.0
    decays: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("population", "parents", "children"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("generations", self.generations, low=0, integer=True)
        if self.parents > self.population:
            raise ValueError(f"parents={self.parents} must not exceed population={self.population}")
        check_number("mutation_rate", self.mutation_rate, low=0.0, high=1.0)
        check_number("mutation_std", self.mutation_std, low=0.0)
        check_number("init_std", self.init_std, low=0.0)
        if self.norm_bound is not None:
            check_number("norm_bound", self.norm_bound, low=1.0)
        for decay in self.decays:
            check_number("decays", decay, low=0.0, high=1.0, high_open=True)
        check_number("seed", self.seed, integer=True)


@dataclass
class SearchResult:
    """The best coefficients, their fitness, and the whole history (one entry per fitness evaluation)."""

    weights: list[float]
    fitness: float
    mode: str
    evaluations: int
    cache_hits: int
    history: list[dict[str, object]] = field(default_factory=list)  # {"evaluation", "generation", "fitness", "best"}
    settings: dict[str, object] = field(default_factory=dict)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result as JSON (atomically; missing folders are created, as for exports)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return io.write_text_atomically(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SearchResult:
        data = json.loads(Path(path).read_text())
        if "decays" in data.get("settings", {}):
            data["settings"]["decays"] = tuple(data["settings"]["decays"])  # JSON has no tuples
        return cls(**data)


def lcsc_search(
    fitness: Callable[[torch.Tensor], float],
    k: int,
    *,
    settings: SearchSettings | None = None,
    mode: Mode = "max",
    progress: bool = False,
) -> SearchResult:
    """Evolutionary search for LCSC coefficients over ``k`` snapshots (oldest first).

    Args:
        fitness: ``fitness(weights) -> number`` for float64 coefficients summing to 1 (e.g. combine the snapshots
            with them and score a validation split). Called once per distinct candidate (results are cached).
        k: the number of snapshots.
        settings: the search knobs (``SearchSettings``).
        mode: ``"max"`` or ``"min"`` the fitness.
        progress: show a progress bar over evaluations (tqdm).
    """
    _check_count(k)
    check_choice("mode", mode, ("max", "min"))
    settings = settings or SearchSettings()
    generator = torch.Generator().manual_seed(settings.seed)
    sign = 1.0 if mode == "max" else -1.0
    cache: dict[tuple[float, ...], float] = {}
    history: list[dict[str, object]] = []
    hits = 0
    total = settings.population + settings.generations * settings.children
    bar = progress_bar(total, "LCSC search", enabled=progress)
    best_value = -math.inf

    def evaluate(weights: torch.Tensor, generation: int) -> float:
        nonlocal hits, best_value
        key = tuple(round(float(w), 12) for w in weights)
        if key in cache:
            hits += 1
            if bar is not None:  # a candidate scored before still counts, or the bar would end short of its total
                bar.update(1)
            return cache[key]
        value = float(fitness(weights.clone()))
        if not math.isfinite(value):
            value = -sign * math.inf  # a failed candidate never wins
        cache[key] = value
        best_value = max(best_value, sign * value)
        history.append(
            {
                "evaluation": len(history) + 1,
                "generation": generation,
                "fitness": value,
                "best": sign * best_value,
                "weights": list(key),
            }
        )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(best=f"{sign * best_value:.5g}")
        return value

    seeds = [torch.eye(k, dtype=torch.float64)[-1], uniform_weights(k)]
    seeds += [ema_weights(k, decay) for decay in settings.decays]
    population: list[torch.Tensor] = []
    for candidate in seeds:
        if len(population) < settings.population:
            population.append(project(candidate, settings.norm_bound))
    while len(population) < settings.population:
        base = seeds[len(population) % len(seeds)]
        noise = torch.randn(k, generator=generator, dtype=torch.float64) * settings.init_std
        population.append(project(base + noise, settings.norm_bound))
    scored = [(evaluate(w, 0), w) for w in population]

    for generation in range(1, settings.generations + 1):
        scored.sort(key=lambda pair: -sign * pair[0])
        parents = [w for _, w in scored[: settings.parents]]
        children = []
        for _ in range(settings.children):
            pick = torch.randint(len(parents), (2,), generator=generator)
            mask = torch.rand(k, generator=generator) < 0.5
            child = torch.where(mask, parents[int(pick[0])], parents[int(pick[1])])
            mutate = torch.rand(k, generator=generator) < settings.mutation_rate
            noise = torch.randn(k, generator=generator, dtype=torch.float64) * settings.mutation_std
            children.append(project(child + mutate * noise, settings.norm_bound))
        scored += [(evaluate(child, generation), child) for child in children]
        scored.sort(key=lambda pair: -sign * pair[0])
        scored = scored[: settings.population]
    if bar is not None:
        bar.close()
    scored.sort(key=lambda pair: -sign * pair[0])
    best_fitness, best = scored[0]
    return SearchResult(
        weights=[float(w) for w in best],
        fitness=best_fitness,
        mode=mode,
        evaluations=len(history),
        cache_hits=hits,
        history=history,
        settings=asdict(settings),
    )


def combine_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.float32``/``torch.float64`` from a dtype or its name (configs write names)."""
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype!r} must be float32 or float64 (the accumulation dtype of combinations)")
    assert isinstance(resolved, torch.dtype)
    return resolved


Method = Literal["lcsc", "uniform", "ema", "metric", "greedy", "last"]
METHODS: tuple[str, ...] = ("lcsc", "uniform", "ema", "metric", "greedy", "last")


def check_options(
    *,
    method: Any,
    mode: Any = "max",
    settings: Any = None,
    decay: Any = 0.9,
    penalty: Any = 1.0,
    by: Any = "loss",
    metric_key: Any = "train_loss",
    rule: Any = "strict",
    progress: Any = False,
) -> None:
    """Check every option of ``choose_weights`` at once, whatever ``method`` uses, so that a mistake surfaces where
    the options are given (a callback's or command's construction), not after training or a long search.

    Raises:
        TypeError, ValueError: naming the option, its value and what is allowed.
    """
    check_choice("method", method, METHODS)
    check_choice("mode", mode, ("max", "min"))
    if settings is not None and not isinstance(settings, SearchSettings):
        raise TypeError(f"settings={settings!r} must be a weightavg.methods.lcsc.SearchSettings or None")
    check_number("decay", decay, low=0.0, high=1.0, high_open=True)
    check_number("penalty", penalty, low=0.0)
    check_choice("by", by, ("loss", "step"))
    if not isinstance(metric_key, str) or not metric_key:
        raise ValueError(f"metric_key={metric_key!r} must be the non-empty name of a logged metric, e.g. 'train_loss'")
    check_choice("rule", rule, ("strict", "not_worse"))
    if not isinstance(progress, bool):
        raise TypeError(f"progress={progress!r} must be a bool")


def choose_weights(
    method: Method,
    snapshots: Sequence[SnapshotInfo],
    fitness: Callable[[torch.Tensor], float] | None,
    *,
    mode: Mode = "max",
    settings: SearchSettings | None = None,
    decay: float = 0.9,
    penalty: float = 1.0,
    by: Literal["loss", "step"] = "loss",
    metric_key: str = "train_loss",
    rule: Literal["strict", "not_worse"] = "strict",
    progress: bool = False,
) -> SearchResult:
    """Coefficients over ``snapshots`` (oldest first) by ``method``. ``fitness(weights)`` scores a combination; it
    drives ``lcsc`` and ``greedy`` (which need it) and scores the other recipes' result when given. Every option is
    checked first (``check_options``), before any evaluation. In ``lcsc`` and ``greedy`` a non-finite fitness counts
    as the worst possible score (a diverged candidate never wins); ``progress`` shows a bar over their evaluations."""
    check_options(
        method=method,
        mode=mode,
        settings=settings,
        decay=decay,
        penalty=penalty,
        by=by,
        metric_key=metric_key,
        rule=rule,
        progress=progress,
    )
    if fitness is not None and not callable(fitness):
        raise TypeError(f"fitness={fitness!r} must be a function weights -> number, or None")
    k = len(snapshots)
    if k == 0:
        raise ValueError("there are no snapshots to combine")
    if method in ("lcsc", "greedy") and fitness is None:
        raise ValueError(f"method={method!r} needs a fitness to score candidates (monitor=, metric=, evaluate)")
    if method == "lcsc":
        assert fitness is not None
        return lcsc_search(fitness, k, settings=settings, mode=mode, progress=progress)
    if method == "greedy":
        assert fitness is not None
        sign = 1.0 if mode == "max" else -1.0
        bar = progress_bar(2 * k - 1, "greedy soup", enabled=progress)  # k singles, then k - 1 soups

        def score(weights: torch.Tensor) -> float:
            value = float(fitness(weights))
            if bar is not None:
                bar.update(1)
            return value if math.isfinite(value) else -sign * math.inf  # as in lcsc_search: failures never win

        singles = [score(torch.eye(k, dtype=torch.float64)[i]) for i in range(k)]

        def uniform_over(indices: list[int]) -> torch.Tensor:
            weights = torch.zeros(k, dtype=torch.float64)
            weights[indices] = 1.0 / len(indices)
            return weights

        soup = greedy_soup(singles, lambda indices: score(uniform_over(indices)), mode=mode, rule=rule)
        if bar is not None:
            bar.close()
        history: list[dict[str, object]] = [
            {"evaluation": i + 1, "candidate": i, "fitness": value} for i, value in enumerate(singles)
        ]
        history += [
            {"evaluation": k + n + 1, "candidate": c, "fitness": v, "kept": kept}
            for n, (c, v, kept) in enumerate(soup.trials)
        ]
        return SearchResult(
            [float(w) for w in uniform_over(soup.ingredients)],
            soup.score,
            mode,
            len(history),
            0,
            history,
            {"method": method, "rule": rule},
        )
    if method == "uniform":
        weights = uniform_weights(k)
    elif method == "ema":
        weights = ema_weights(k, decay)
    elif method == "last":
        weights = torch.eye(k, dtype=torch.float64)[-1]
    else:
        if by == "loss":
            missing = [s.step for s in snapshots if metric_key not in s.metrics]
            if missing:
                raise ValueError(
                    f"metric_key={metric_key!r} was not recorded with the snapshots of steps {missing}; log it "
                    "(self.log in training_step, opt.record(...)) or weight by='step'"
                )
            values = [s.metrics[metric_key] for s in snapshots]
        else:
            values = [float(s.step) for s in snapshots]
        weights = metric_weights(values, penalty, by=by)
    value = math.nan if fitness is None else fitness(weights)
    scored: list[dict[str, object]] = [] if fitness is None else [{"evaluation": 1, "fitness": value}]
    return SearchResult([float(w) for w in weights], value, mode, len(scored), 0, scored, {"method": method})


class Combiner:
    """Combinations of a store's snapshots evaluated in the live model, and the choice of coefficients.

    Holds one model-sized buffer (in the live dtype, beside the model) that a combination is streamed into and swapped
    in by pointer, so the live weights are never touched while candidates are evaluated. Both faces use it.

    Args:
        module: the model the snapshots were taken from.
        store: the ``SnapshotStore`` holding them.
        buffers, include, exclude: which tensors the snapshots hold (as for ``weightavg.Averager``).
        dtype: accumulation dtype of the combination (``torch.float32`` or ``torch.float64``).
        averager: an ``Averager`` already bound to ``module`` (live dtype) to use as the buffer.
    """

    def __init__(
        self,
        module: nn.Module,
        store: SnapshotStore,
        *,
        buffers: BufferPolicy = "average",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        averager: Averager | None = None,
    ) -> None:
        self.store = store
        self._module = module
        self.averager = averager or Averager(
            module, Snapshot(), buffers=buffers, include=include, exclude=exclude, dtype="live"
        )
        self.dtype = dtype

    def take(self, *, step: int, epoch: int | None = None, metrics: Mapping[str, float] | None = None) -> None:
        """Add the live weights to the store as a snapshot."""
        self.store.add(
            self.averager.live_tensors(), step=step, epoch=epoch, metrics=metrics, aliases=self.averager.aliases()
        )

    def load(self, weights: Sequence[float] | torch.Tensor) -> None:
        """Stream ``sum_i w_i theta_i`` into the buffer (not into the model)."""
        if self.averager.is_swapped:
            self.averager.swap()
        combine(
            self.store.snapshots, weights, into=self.averager.averaged_tensors(), store=self.store, dtype=self.dtype
        )

    @contextmanager
    def combined(self, weights: Sequence[float] | torch.Tensor) -> Iterator[None]:
        """Run the body with the combination in the model; the live weights return afterwards."""
        self.load(weights)
        with self.averager.averaged():
            yield

    def fitness(self, evaluate: Callable[[], float]) -> Callable[[torch.Tensor], float]:
        """``weights -> evaluate()`` with that combination in the model."""

        def score(weights: torch.Tensor) -> float:
            with self.combined(weights):
                return float(evaluate())

        return score

    def choose(
        self,
        method: Method,
        evaluate: Callable[[], float] | None,
        *,
        mode: Mode = "max",
        settings: SearchSettings | None = None,
        decay: float = 0.9,
        penalty: float = 1.0,
        by: Literal["loss", "step"] = "loss",
        metric_key: str = "train_loss",
        rule: Literal["strict", "not_worse"] = "strict",
        progress: bool = False,
    ) -> SearchResult:
        """Coefficients by ``method`` over the store's snapshots (oldest first); ``evaluate`` (a held-out score of
        the model as it is) drives ``lcsc`` and ``greedy`` and scores the others' result when given."""
        fitness = None if evaluate is None else self.fitness(evaluate)
        return choose_weights(
            method,
            self.store.snapshots,
            fitness,
            mode=mode,
            settings=settings,
            decay=decay,
            penalty=penalty,
            by=by,
            metric_key=metric_key,
            rule=rule,
            progress=progress,
        )

    def apply(self, weights: Sequence[float] | torch.Tensor, *, bn_loader: Iterable[Any] | None = None) -> None:
        """Write the combination into the model's own tensors (in place); with ``bn_loader``, recompute the
        combination's BatchNorm statistics first (one pass, ``torch.optim.swa_utils.update_bn``)."""
        self.load(weights)
        if bn_loader is not None:
            self.averager.update_bn(bn_loader, self._module)
        self.check_statistics()
        self.averager.copy_to_model()

    def check_statistics(self) -> bool:
        """Warn (and return ``False``) when the combination in the buffer holds a negative BatchNorm running variance,
        which negative coefficients can produce: recompute the statistics (``torch.optim.swa_utils.update_bn``)."""
        negative = [
            name
            for name, tensor in self.averager.averaged_tensors().items()
            if name.endswith("running_var") and tensor.is_floating_point() and bool((tensor < 0).any())
        ]
        if negative:
            warnings.warn(
                f"the combination has negative BatchNorm running variances in {negative[:3]}; recompute the statistics "
                "(torch.optim.swa_utils.update_bn) or use non-negative coefficients",
                stacklevel=3,
            )
        return not negative
