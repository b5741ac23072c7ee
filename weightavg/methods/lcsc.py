"""Checkpoint combination: coefficients ``w`` for ``theta(w) = sum_i w_i theta_i`` over K snapshots of one run.

- Uniform soup: ``w_i = 1/K``. Greedy soup (Wortsman et al. 2022, "Model soups"): rank candidates by a held-out
  metric, start from the best, add each next one if the uniform soup's held-out metric improves (the code: strictly;
  the paper: "not worse"; ``greedy_rule`` picks).
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
from dataclasses import KW_ONLY, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from weightavg.core import io
from weightavg.core.averager import Averager
from weightavg.core.binding import BufferPolicy
from weightavg.core.checks import check_bool, check_choice, check_directory, check_number, outside_stacklevel
from weightavg.core.progress import progress_bar
from weightavg.core.rule import Snapshot
from weightavg.core.settings import Settings
from weightavg.core.snapshots import MEMORY, SnapshotInfo, SnapshotStore, combine
from weightavg.methods.swa import update_bn

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
    """Knobs of the LCSC search (the design notes' example defaults: 16 + 25 x 12 = 316 evaluations)."""

    population: int = 16
    """Candidates kept each generation."""
    parents: int | None = None
    """The best candidates children are bred from (at most ``population``); default ``min(4, population)``."""
    children: int = 12
    """New candidates per generation."""
    generations: int = 25
    """Rounds of breeding (0: score the initial population only)."""
    mutation_rate: float = 0.3
    """Probability that a child's coefficient is mutated."""
    mutation_std: float = 0.1
    """Standard deviation of a mutation, in coefficient units."""
    init_std: float = 0.05
    """Standard deviation of the perturbations that fill the initial population."""
    norm_bound: float | None = 10.0
    """Bound on ``sum |w|`` (at least 1; ``None``: unbounded)."""
    decays: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    """EMA decays whose equivalent coefficients seed the initial population."""
    seed: int = 0
    """Seeds every random draw; the search is deterministic given it and the fitness."""

    def __post_init__(self) -> None:
        check_number("population", self.population, low=1, integer=True)
        if self.parents is None:
            object.__setattr__(self, "parents", min(4, self.population))  # frozen: resolved once, here
        for name in ("parents", "children"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("generations", self.generations, low=0, integer=True)
        assert self.parents is not None
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


Method = Literal["lcsc", "greedy", "uniform", "ema", "metric", "last"]
Fitness = Callable[[torch.Tensor], float]


@dataclass(eq=False, repr=False)
class SnapshotSettings(Settings):
    """When snapshots are taken and where they are kept (checked when built)."""

    every_n_steps: int | None = None
    """Snapshot interval in optimizer steps (required by the optimizer wrapper; the Lightning callback may count
    epochs instead, and snapshots every epoch when neither is given)."""
    _: KW_ONLY
    keep: int | None = 12
    """How many of the newest snapshots to keep (``None``: all)."""
    directory: str | os.PathLike[str] | None = None
    """Where the snapshot files go (found again when a run resumes), or ``":memory:"`` to keep them in host memory
    (``keep`` copies of the model in RAM, lost on a crash, not found on resume). The callback's default is a folder
    of its own under the Trainer's ``default_root_dir``; the wrapper needs one."""
    background: bool = False
    """Write snapshot files from a background thread (a checkpoint or ``state_dict()`` waits for pending writes)."""
    overwrite: bool = False
    """A fresh run in a folder that holds snapshots is refused unless ``overwrite=True``, which deletes them; a
    resumed run keeps those up to its restored step and drops the rest."""

    def __post_init__(self) -> None:
        if self.every_n_steps is not None:
            check_number("every_n_steps", self.every_n_steps, low=1, integer=True)
        if self.keep is not None:
            check_number("keep", self.keep, low=1, integer=True)
        check_directory("directory", self.directory)
        check_bool("background", self.background)
        check_bool("overwrite", self.overwrite)
        if self.background and self.directory == MEMORY:
            raise ValueError(
                f"background=True writes snapshot files; directory={MEMORY!r} keeps them in memory (no writer needed)"
            )
        super().__post_init__()


@dataclass(eq=False, repr=False)
class CombineSettings(Settings):
    """How the coefficients are chosen (every recipe's options, checked when built whichever ``method`` uses them,
    so that a mistake surfaces where they are given, not after training or a long search)."""

    _: KW_ONLY
    method: Method = "lcsc"
    """The recipe, a name in ``RECIPES``: ``lcsc``, ``greedy``, ``uniform``, ``ema``, ``metric`` or ``last``
    (``lcsc`` and ``greedy`` need a fitness; the others are scored with it when there is one)."""
    settings: SearchSettings | Mapping[str, Any] | None = None
    """The ``SearchSettings`` of ``method="lcsc"`` (a mapping of its fields in configs); ``None``: the defaults."""
    decay: float = 0.9
    """For ``method="ema"``: the decay whose EMA-equivalent coefficients are used, in [0, 1)."""
    penalty: float = 1.0
    """For ``method="metric"``: the penalty factor ``p`` (>= 0; 0 is uniform, larger concentrates on the best)."""
    by: Literal["loss", "step"] = "loss"
    """For ``method="metric"``: weight each snapshot by its recorded ``metric_key`` (a loss) or by its step."""
    metric_key: str = "train_loss"
    """For ``method="metric", by="loss"``: the metric recorded with each snapshot (what the module logged when it
    was taken, or ``opt.record(...)``)."""
    greedy_rule: Literal["strict", "not_worse"] = "strict"
    """For ``method="greedy"``: add a candidate if the soup's score improves (``"strict"``, the code) or does not
    get worse (``"not_worse"``, the paper)."""
    dtype: str | torch.dtype = "float32"
    """The accumulation dtype of combinations: ``"float32"`` or ``"float64"`` (never below the model's own: a float64
    model's combinations sum in float64)."""

    def __post_init__(self) -> None:
        check_choice("method", self.method, tuple(RECIPES))
        if isinstance(self.settings, Mapping):  # a config node
            given = dict(self.settings)
            try:
                self.settings = SearchSettings(**given)
            except TypeError as error:  # an unknown field: name the argument and the fields there are
                known = [f.name for f in fields(SearchSettings)]
                raise TypeError(f"settings={given!r}: {error}; SearchSettings has {known}") from None
        if self.settings is not None and not isinstance(self.settings, SearchSettings):
            raise TypeError(f"settings={self.settings!r} must be a weightavg.methods.lcsc.SearchSettings or None")
        check_number("decay", self.decay, low=0.0, high=1.0, high_open=True)
        check_number("penalty", self.penalty, low=0.0)
        check_choice("by", self.by, ("loss", "step"))
        if not isinstance(self.metric_key, str) or not self.metric_key:
            raise ValueError(
                f"metric_key={self.metric_key!r} must be the non-empty name of a logged metric, e.g. 'train_loss'"
            )
        check_choice("greedy_rule", self.greedy_rule, ("strict", "not_worse"))
        combine_dtype(self.dtype)
        if self.warn_unused_options:
            self.warn_unused()
        super().__post_init__()

    #: Whether options of recipes other than ``method`` are warned about when built: by the faces that run one recipe
    #: (the callback; the command calls ``warn_unused``), not by the wrapper, whose settings are the defaults of
    #: ``search()``, nor by the settings a search is run with.
    warn_unused_options: ClassVar[bool] = False

    def warn_unused(self) -> None:
        """Warn about each option of another recipe than ``method`` set to a non-default value (it is ignored)."""
        used = set(RECIPES[self.method].options)
        defaults = {f.name: f.default for f in fields(CombineSettings)}
        for recipe in RECIPES.values():
            for option in recipe.options:
                value = getattr(self, option)
                if option not in used and value != defaults[option] and value is not None:
                    users = [r.name for r in RECIPES.values() if option in r.options]
                    warnings.warn(
                        f"{type(self).__name__}: {option}={value!r} is ignored with method={self.method!r} (it is "
                        f"for method={' or '.join(map(repr, users))})",
                        UserWarning,
                        stacklevel=outside_stacklevel(),
                    )

    @property
    def search_settings(self) -> SearchSettings:
        """The search knobs in effect."""
        return self.settings if isinstance(self.settings, SearchSettings) else SearchSettings()

    @property
    def accumulation_dtype(self) -> torch.dtype:
        return combine_dtype(self.dtype)

    def recipe(self) -> dict[str, Any]:
        """These settings as keyword arguments (``dataclasses.replace`` / ``CombineSettings(**...)``)."""
        return {f.name: getattr(self, f.name) for f in fields(CombineSettings) if f.init and f.name != "_"}


def recipe_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` to ``CombineSettings`` fields, with the former name ``rule`` of ``greedy_rule`` taken (and warned
    about) for one release."""
    if "rule" in changes:
        if "greedy_rule" in changes:
            raise TypeError("got rule= and greedy_rule=: rule is the former name of greedy_rule")
        warnings.warn(
            "rule= is now greedy_rule= (the greedy soup's rule); rule will be removed",
            FutureWarning,
            stacklevel=outside_stacklevel(),
        )
        changes = {**changes, "greedy_rule": changes["rule"]}
        del changes["rule"]
    return changes


@dataclass(frozen=True)
class Recipe:
    """One way of choosing the coefficients: an entry of ``RECIPES``."""

    name: str
    description: str
    """One line: what the coefficients are."""
    paper: str
    """Where the recipe comes from."""
    needs_fitness: bool
    """Whether it is driven by a fitness (else a fitness, when given, only scores its result)."""
    choose: Callable[[Sequence[SnapshotInfo], Fitness | None, CombineSettings, Mode, bool], SearchResult]
    """``choose(snapshots, fitness, settings, mode, progress) -> SearchResult``."""
    options: tuple[str, ...] = ()
    """The ``CombineSettings`` fields it reads (another recipe's, set to a non-default value, is warned about)."""


def _scored(weights: torch.Tensor, fitness: Fitness | None, mode: Mode, method: str) -> SearchResult:
    """A recipe's fixed coefficients, scored once by ``fitness`` when there is one."""
    value = math.nan if fitness is None else float(fitness(weights))
    scored: list[dict[str, object]] = [] if fitness is None else [{"evaluation": 1, "fitness": value}]
    return SearchResult([float(w) for w in weights], value, mode, len(scored), 0, scored, {"method": method})


def _lcsc(
    snapshots: Sequence[SnapshotInfo], fitness: Fitness | None, settings: CombineSettings, mode: Mode, progress: bool
) -> SearchResult:
    assert fitness is not None
    return lcsc_search(fitness, len(snapshots), settings=settings.search_settings, mode=mode, progress=progress)


def _greedy(
    snapshots: Sequence[SnapshotInfo], fitness: Fitness | None, settings: CombineSettings, mode: Mode, progress: bool
) -> SearchResult:
    assert fitness is not None
    k = len(snapshots)
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

    soup = greedy_soup(singles, lambda indices: score(uniform_over(indices)), mode=mode, rule=settings.greedy_rule)
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
        {"method": "greedy", "greedy_rule": settings.greedy_rule},
    )


def _uniform(
    snapshots: Sequence[SnapshotInfo], fitness: Fitness | None, settings: CombineSettings, mode: Mode, progress: bool
) -> SearchResult:
    return _scored(uniform_weights(len(snapshots)), fitness, mode, "uniform")


def _ema(
    snapshots: Sequence[SnapshotInfo], fitness: Fitness | None, settings: CombineSettings, mode: Mode, progress: bool
) -> SearchResult:
    return _scored(ema_weights(len(snapshots), settings.decay), fitness, mode, "ema")


def _metric(
    snapshots: Sequence[SnapshotInfo], fitness: Fitness | None, settings: CombineSettings, mode: Mode, progress: bool
) -> SearchResult:
    if settings.by == "loss":
        missing = [s.step for s in snapshots if settings.metric_key not in s.metrics]
        if missing:
            raise ValueError(
                f"metric_key={settings.metric_key!r} was not recorded with the snapshots of steps {missing}; log it "
                "(self.log in training_step, opt.record(...)) or weight by='step'"
            )
        values = [s.metrics[settings.metric_key] for s in snapshots]
    else:
        values = [float(s.step) for s in snapshots]
    return _scored(metric_weights(values, settings.penalty, by=settings.by), fitness, mode, "metric")


def _last(
    snapshots: Sequence[SnapshotInfo], fitness: Fitness | None, settings: CombineSettings, mode: Mode, progress: bool
) -> SearchResult:
    return _scored(torch.eye(len(snapshots), dtype=torch.float64)[-1], fitness, mode, "last")


#: Every recipe by name; it drives the callback, the optimizer wrapper, the Hydra config and
#: ``python -m weightavg.combine`` (whose ``--method`` lists these).
RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            "lcsc",
            "evolutionary search for coefficients (sum 1, negatives allowed) on the fitness",
            "Liu et al., ICLR 2025, Linear Combination of Saved Checkpoints (search reconstructed)",
            True,
            _lcsc,
            ("settings",),
        ),
        Recipe(
            "greedy",
            "greedy soup: add snapshots best-first while the uniform soup's fitness improves",
            "Wortsman et al., ICML 2022, Model soups",
            True,
            _greedy,
            ("greedy_rule",),
        ),
        Recipe(
            "uniform",
            "the mean of the snapshots (uniform soup)",
            "Wortsman et al., ICML 2022, Model soups",
            False,
            _uniform,
        ),
        Recipe(
            "ema",
            "the coefficients an EMA with decay over the snapshots would give",
            "Liu et al., ICLR 2025 (its EMA baseline)",
            False,
            _ema,
            ("decay",),
        ),
        Recipe(
            "metric",
            "metric-weighted: by each snapshot's recorded loss or its step, with a penalty factor",
            "Choi and Yu 2025, Metrics-Weighted Averaging (formula reconstructed)",
            False,
            _metric,
            ("penalty", "by", "metric_key"),
        ),
        Recipe("last", "the newest snapshot alone", "the baseline", False, _last),
    )
}
METHODS: tuple[str, ...] = tuple(RECIPES)


def choose_weights(
    recipe: CombineSettings,
    snapshots: Sequence[SnapshotInfo],
    fitness: Fitness | None,
    *,
    mode: Mode = "max",
    progress: bool = False,
) -> SearchResult:
    """Coefficients over ``snapshots`` (oldest first) by ``recipe.method`` (``RECIPES``). ``fitness(weights)``
    scores a combination; it drives ``lcsc`` and ``greedy`` (which need it) and scores the other recipes' result
    when given. In ``lcsc`` and ``greedy`` a non-finite fitness counts as the worst possible score (a diverged
    candidate never wins); ``progress`` shows a bar over their evaluations."""
    if not isinstance(recipe, CombineSettings):
        raise TypeError(f"recipe={recipe!r} must be a weightavg.methods.lcsc.CombineSettings")
    check_choice("mode", mode, ("max", "min"))
    check_bool("progress", progress)
    if fitness is not None and not callable(fitness):
        raise TypeError(f"fitness={fitness!r} must be a function weights -> number, or None")
    if not snapshots:
        raise ValueError("there are no snapshots to combine")
    chosen = RECIPES[recipe.method]
    if chosen.needs_fitness and fitness is None:
        raise ValueError(f"method={recipe.method!r} needs a fitness to score candidates (monitor=, metric=, evaluate)")
    return chosen.choose(snapshots, fitness, recipe, mode, progress)


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
        recipe: CombineSettings | Method,
        evaluate: Callable[[], float] | None,
        *,
        mode: Mode = "max",
        progress: bool = False,
        **changes: Any,
    ) -> SearchResult:
        """Coefficients by ``recipe`` (``CombineSettings``, or a method name with ``changes`` to its fields, e.g.
        ``choose("greedy", evaluate, greedy_rule="not_worse")``) over the store's snapshots (oldest first);
        ``evaluate`` (a held-out score of the model as it is) drives ``lcsc`` and ``greedy`` and scores the others'
        result."""
        changes = recipe_changes(changes)
        if isinstance(recipe, CombineSettings):
            recipe = replace(recipe, **changes) if changes else recipe
        else:
            recipe = CombineSettings(method=recipe, **changes)
        fitness = None if evaluate is None else self.fitness(evaluate)
        return choose_weights(recipe, self.store.snapshots, fitness, mode=mode, progress=progress)

    def apply(self, weights: Sequence[float] | torch.Tensor, *, bn_loader: Iterable[Any] | None = None) -> None:
        """Write the combination into the model's own tensors (in place); with ``bn_loader``, recompute the
        combination's BatchNorm statistics first (one pass, ``torch.optim.swa_utils.update_bn``)."""
        self.load(weights)
        if bn_loader is not None:
            update_bn(self.averager, bn_loader, self._module)
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
