"""weightavg.methods.lcsc: coefficient recipes (uniform, EMA-equivalent, metric-weighted) against their rules applied
by hand in float64, the sum-to-one projection, the greedy soup against its rule written out, and the LCSC evolutionary
search (determinism, caching, constraints, optimum with negative coefficients, seeds, saved results)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from weightavg.core.snapshots import SnapshotStore, combine
from weightavg.methods.lcsc import (
    SearchResult,
    SearchSettings,
    ema_weights,
    greedy_soup,
    lcsc_search,
    metric_weights,
    project,
    uniform_weights,
)


def random_states(k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(5, 3, generator=generator, dtype=torch.float64),
            "b": torch.randn(3, generator=generator, dtype=torch.float64),
            "count": torch.tensor(10 * i),
        }
        for i in range(k)
    ]


def ema_by_hand(states: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """Copy the first snapshot, then avg = g * avg + (1 - g) * theta_i for each next one (integers: the latest)."""
    avg = {name: t.clone() for name, t in states[0].items()}
    for state in states[1:]:
        for name, tensor in state.items():
            if tensor.is_floating_point():
                avg[name] = decay * avg[name] + (1.0 - decay) * tensor
            else:
                avg[name] = tensor.clone()
    return avg


# ------------------------------------------------------------------------------------------- coefficient recipes
def test_uniform_weights() -> None:
    for k in (1, 2, 7):
        weights = uniform_weights(k)
        assert weights.dtype == torch.float64
        assert weights.shape == (k,)
        assert all(float(w) == 1.0 / k for w in weights)
        assert math.isclose(float(weights.sum()), 1.0, abs_tol=1e-15)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="k="):
            uniform_weights(bad)
    with pytest.raises(TypeError, match="k="):
        uniform_weights(2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("decay", [0.0, 0.3, 0.9, 0.999])
@pytest.mark.parametrize("k", [1, 2, 6])
def test_ema_weights_are_an_ema_of_one_hot_snapshots(k: int, decay: float) -> None:
    # The EMA of the unit vectors e_0 .. e_{K-1} is the vector of each snapshot's coefficient.
    basis = [{"w": torch.eye(k, dtype=torch.float64)[i]} for i in range(k)]
    expected = ema_by_hand(basis, decay)["w"]
    weights = ema_weights(k, decay)
    assert weights.dtype == torch.float64
    assert torch.allclose(weights, expected, rtol=0, atol=1e-15)
    assert math.isclose(float(weights.sum()), 1.0, abs_tol=1e-12)


@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_combining_snapshots_with_ema_weights_is_their_ema(tmp_path: Path, decay: float) -> None:
    states = random_states(6, seed=3)
    store = SnapshotStore(tmp_path / "snaps")
    for i, state in enumerate(states):
        store.add(state, step=i)
    expected = ema_by_hand(states, decay)
    combined = combine(store.snapshots, ema_weights(6, decay), dtype=torch.float64)
    for name, value in expected.items():
        if value.is_floating_point():
            assert torch.allclose(combined[name], value, rtol=0, atol=1e-13), name
        else:
            assert torch.equal(combined[name], value), name


def test_ema_weights_errors() -> None:
    for bad in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="decay="):
            ema_weights(4, bad)
    with pytest.raises(ValueError, match="k="):
        ema_weights(0, 0.9)


def metric_by_hand(values: list[float], penalty: float, by: str) -> list[float]:
    if by == "loss":
        best = min(values)
        raw = [(v / best) ** (-penalty) for v in values]
    else:
        last = max(values)
        raw = [(v / last) ** penalty for v in values]
    total = sum(raw)
    return [r / total for r in raw]


@pytest.mark.parametrize(("values", "by"), [([0.5, 0.25, 1.0, 0.4, 0.3], "loss"), ([10, 20, 40, 35, 0], "step")])
def test_metric_weights_follow_the_documented_formula(values: list[float], by: str) -> None:
    for penalty in (0.0, 0.5, 1.0, 3.0):
        weights = metric_weights(values, penalty, by=by)  # type: ignore[arg-type]
        assert weights.dtype == torch.float64
        expected = metric_by_hand(values, penalty, by)
        assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-14)
        assert math.isclose(float(weights.sum()), 1.0, abs_tol=1e-12)
    assert torch.allclose(
        metric_weights(values, 0.0, by=by),
        uniform_weights(len(values)),
        rtol=0,  # type: ignore
        atol=1e-15,
    )


def test_metric_weights_default_to_loss_and_scale_free() -> None:
    losses = [0.8, 0.2, 0.4]
    assert torch.equal(metric_weights(losses, 2.0), metric_weights(losses, 2.0, by="loss"))
    # Weights by loss are proportional to L_i^-p: scaling every loss changes nothing.
    assert torch.allclose(
        metric_weights(losses, 2.0), metric_weights([10 * v for v in losses], 2.0), rtol=0, atol=1e-15
    )
    expected = torch.tensor([0.8**-2, 0.2**-2, 0.4**-2], dtype=torch.float64)
    assert torch.allclose(metric_weights(losses, 2.0), expected / expected.sum(), rtol=0, atol=1e-15)


@pytest.mark.parametrize(("values", "by", "best"), [([0.5, 0.25, 1.0, 0.4], "loss", 1), ([10, 20, 40, 30], "step", 2)])
def test_larger_penalty_is_more_peaked(values: list[float], by: str, best: int) -> None:
    previous_top, previous_entropy = 0.0, math.inf
    for penalty in (0.0, 0.5, 1.0, 2.0, 5.0, 20.0):
        weights = metric_weights(values, penalty, by=by)  # type: ignore[arg-type]
        top = float(weights.max())
        entropy = -float((weights * weights.log()).sum())
        if penalty > 0:
            assert int(weights.argmax()) == best
            assert top > previous_top
            assert entropy < previous_entropy
        previous_top, previous_entropy = top, entropy
    assert previous_top > 0.99  # concentrates on the best (lowest loss / latest step)


def test_metric_weights_errors() -> None:
    with pytest.raises(ValueError, match="penalty="):
        metric_weights([1.0, 2.0], -0.5)
    with pytest.raises(ValueError, match="values="):
        metric_weights([], 1.0)
    with pytest.raises(ValueError, match="values="):
        metric_weights([1.0, float("nan")], 1.0)
    with pytest.raises(ValueError, match="positive"):
        metric_weights([0.5, 0.0], 1.0, by="loss")
    with pytest.raises(ValueError, match="positive"):
        metric_weights([0.5, -1.0], 1.0, by="loss")
    with pytest.raises(ValueError, match="steps"):
        metric_weights([-1, 5], 1.0, by="step")
    with pytest.raises(ValueError, match="steps"):
        metric_weights([0, 0], 1.0, by="step")
    with pytest.raises(ValueError, match="by="):
        metric_weights([1.0], 1.0, by="accuracy")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------- projection
def test_project_onto_sum_one() -> None:
    generator = torch.Generator().manual_seed(0)
    for k in (1, 3, 8):
        w = torch.randn(k, generator=generator, dtype=torch.float64) * 4
        projected = project(w)
        assert projected.dtype == torch.float64
        assert math.isclose(float(projected.sum()), 1.0, abs_tol=1e-12)
        shift = (1.0 - float(w.sum())) / k  # the same shift added to every coefficient
        assert torch.allclose(projected, w + shift, rtol=0, atol=1e-12)
    already = torch.tensor([-0.5, 1.25, 0.25], dtype=torch.float64)
    assert torch.allclose(project(already), already, rtol=0, atol=1e-15)
    assert torch.allclose(project(torch.tensor([2.0, 0.0])), torch.tensor([1.5, -0.5], dtype=torch.float64))


def test_project_respects_the_norm_bound_and_keeps_the_sum() -> None:
    generator = torch.Generator().manual_seed(1)
    for trial in range(20):
        k = 2 + trial % 6
        w = torch.randn(k, generator=generator, dtype=torch.float64) * 5
        free = project(w)
        uniform = torch.full((k,), 1.0 / k, dtype=torch.float64)
        for bound in (1.0, 1.5, 3.0, 10.0):
            bounded = project(w, bound)
            assert math.isclose(float(bounded.sum()), 1.0, abs_tol=1e-12)
            norm = float(bounded.abs().sum())
            if float(free.abs().sum()) <= bound:
                assert torch.equal(bounded, free)  # unchanged within the bound
                continue
            assert norm <= bound + 1e-12
            assert norm >= bound - 1e-9  # shrunk only as far as needed
            # on the segment from the uniform soup to the unbounded projection
            scale = float((bounded - uniform).norm() / (free - uniform).norm())
            assert 0.0 <= scale <= 1.0
            assert torch.allclose(bounded, uniform + scale * (free - uniform), rtol=0, atol=1e-12)


# -------------------------------------------------------------------------------------------------- greedy soup
def greedy_by_hand(scores: list[float], soup_score, maximize: bool, strict: bool):  # type: ignore[no-untyped-def]
    """The official rule: rank by held-out score (stable), start from the best, keep a candidate if the soup with it
    scores better than the soup so far (strictly, or not worse)."""
    ranked = sorted(range(len(scores)), key=lambda i: scores[i], reverse=maximize)
    soup = [ranked[0]]
    best = scores[ranked[0]]
    trials = []
    for candidate in ranked[1:]:
        score = soup_score([*soup, candidate])
        better = score > best if maximize else score < best
        keep = better or (not strict and score == best)
        trials.append((candidate, score, keep))
        if keep:
            soup.append(candidate)
            best = score
    return soup, best, trials


def soup_problem(seed: int, n: int = 7):  # type: ignore[no-untyped-def]
    """Candidates are points; a soup's held-out "accuracy" is minus the squared distance of its mean to a target."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.randint(-8, 9, (n, 2), generator=generator, dtype=torch.int64).double() / 4
    target = torch.tensor([0.3, -0.2], dtype=torch.float64)
    calls: list[list[int]] = []

    def soup_score(indices: list[int]) -> float:
        calls.append(list(indices))
        return -float(((points[indices].mean(0) - target) ** 2).sum())

    scores = [-float(((points[i] - target) ** 2).sum()) for i in range(n)]
    return scores, soup_score, calls


@pytest.mark.parametrize("rule", ["strict", "not_worse"])
@pytest.mark.parametrize("seed", range(6))
def test_greedy_soup_follows_the_rule(seed: int, rule: str) -> None:
    scores, soup_score, calls = soup_problem(seed)
    expected = greedy_by_hand(scores, soup_score, maximize=True, strict=rule == "strict")
    calls.clear()
    soup = greedy_soup(scores, soup_score, rule=rule)  # type: ignore[arg-type]
    assert (soup.ingredients, soup.score, soup.trials) == expected
    assert len(calls) == len(scores) - 1  # one held-out evaluation per candidate after the first
    assert soup.score >= max(scores)  # never worse than the best single candidate
    assert soup.score == soup_score(soup.ingredients)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_soup_mode_min(seed: int) -> None:
    scores, soup_score, _ = soup_problem(seed)
    losses = [-s for s in scores]

    def soup_loss(indices: list[int]) -> float:
        return -soup_score(indices)

    soup = greedy_soup(losses, soup_loss, mode="min")
    assert (soup.ingredients, soup.score, soup.trials) == greedy_by_hand(losses, soup_loss, False, True)
    assert soup.score <= min(losses)
    maximized = greedy_soup(scores, soup_score)
    assert soup.ingredients == maximized.ingredients


def test_strict_and_not_worse_differ_on_a_tie() -> None:
    # Candidate 1 is a copy of the best candidate 0: adding it leaves the soup (and its score) unchanged.
    points = [4.0, 4.0, 1.0, 8.0]
    target = 3.0

    def soup_score(indices: list[int]) -> float:
        mean = sum(points[i] for i in indices) / len(indices)
        return -abs(mean - target)

    scores = [soup_score([i]) for i in range(4)]
    strict = greedy_soup(scores, soup_score, rule="strict")
    lenient = greedy_soup(scores, soup_score, rule="not_worse")
    assert strict.trials[0] == (1, -1.0, False)
    assert lenient.trials[0] == (1, -1.0, True)
    assert strict.ingredients == [0, 2]  # mean 2.5
    assert lenient.ingredients == [0, 1, 2]  # mean 3.0
    assert (strict.ingredients, strict.score, strict.trials) == greedy_by_hand(scores, soup_score, True, True)
    assert (lenient.ingredients, lenient.score, lenient.trials) == greedy_by_hand(scores, soup_score, True, False)
    assert lenient.score > strict.score


def test_greedy_soup_errors() -> None:
    with pytest.raises(ValueError, match="scores"):
        greedy_soup([], lambda indices: 0.0)
    with pytest.raises(ValueError, match="mode="):
        greedy_soup([1.0], lambda indices: 0.0, mode="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rule="):
        greedy_soup([1.0], lambda indices: 0.0, rule="paper")  # type: ignore[arg-type]
    single = greedy_soup([0.7], lambda indices: 0.0)
    assert (single.ingredients, single.score, single.trials) == ([0], 0.7, [])


# -------------------------------------------------------------------------------------------------- LCSC search
TARGET = [-0.6, 0.9, -0.3, 1.0]  # sums to 1, two negative coefficients, L1 norm 2.8
CURVATURE = [1.0, 2.0, 0.5, 1.5]


def quadratic(target: list[float] = TARGET):  # type: ignore[no-untyped-def]
    """Fitness to maximize: minus a weighted squared distance to ``target``; records every call."""
    aim = torch.tensor(target, dtype=torch.float64)
    scale = torch.tensor(CURVATURE[: len(target)], dtype=torch.float64)
    calls: list[torch.Tensor] = []

    def fitness(weights: torch.Tensor) -> float:
        assert weights.dtype == torch.float64
        calls.append(weights.clone())
        return -float((scale * (weights - aim) ** 2).sum())

    return fitness, calls


SMALL = SearchSettings(population=8, parents=3, children=6, generations=10)


def test_search_is_deterministic_for_a_seed() -> None:
    first = lcsc_search(quadratic()[0], 4, settings=SMALL)
    again = lcsc_search(quadratic()[0], 4, settings=SMALL)
    assert again.history == first.history
    assert (again.weights, again.fitness, again.evaluations, again.cache_hits) == (
        first.weights,
        first.fitness,
        first.evaluations,
        first.cache_hits,
    )
    other = lcsc_search(quadratic()[0], 4, settings=SearchSettings(**{**SMALL.__dict__, "seed": 1}))
    assert other.history != first.history
    assert other.settings["seed"] == 1 and first.settings["seed"] == 0


@pytest.mark.parametrize(
    "settings",
    [
        SMALL,
        SearchSettings(population=6, parents=2, children=5, generations=8, mutation_rate=0.0, init_std=0.0),
        SearchSettings(population=4, parents=4, children=3, generations=0),
    ],
)
def test_evaluations_are_counted_and_cached(settings: SearchSettings) -> None:
    fitness, calls = quadratic()
    result = lcsc_search(fitness, 4, settings=settings)
    budget = settings.population + settings.generations * settings.children
    assert len(calls) == result.evaluations == len(result.history)
    assert result.evaluations <= budget
    assert result.evaluations + result.cache_hits == budget  # every candidate is evaluated or found in the cache
    assert [entry["evaluation"] for entry in result.history] == list(range(1, result.evaluations + 1))
    distinct = {tuple(round(float(x), 12) for x in w) for w in calls}
    assert len(distinct) == len(calls)  # the fitness never sees the same candidate twice
    if settings.mutation_rate == 0.0:  # children are crossovers of few parents: many repeats
        assert result.cache_hits > 0


def test_one_snapshot_needs_one_evaluation() -> None:
    fitness, calls = quadratic([1.0])
    result = lcsc_search(fitness, 1, settings=SMALL)
    assert result.weights == [1.0]
    assert len(calls) == result.evaluations == 1
    assert result.cache_hits == SMALL.population + SMALL.generations * SMALL.children - 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_finds_an_optimum_with_negative_coefficients(seed: int) -> None:
    fitness, _ = quadratic()
    settings = SearchSettings(generations=60, seed=seed)
    result = lcsc_search(fitness, 4, settings=settings)
    assert max(abs(w - t) for w, t in zip(result.weights, TARGET, strict=True)) < 0.02
    assert result.weights[0] < 0 and result.weights[2] < 0
    assert result.fitness == fitness(torch.tensor(result.weights, dtype=torch.float64))
    assert result.fitness == max(entry["fitness"] for entry in result.history)  # type: ignore[type-var]


def test_search_finds_large_negative_coefficients() -> None:
    target = [-4.0, 2.5, 3.5, -1.0]  # L1 norm 11: needs a looser bound than the default 10
    fitness, _ = quadratic(target)
    settings = SearchSettings(generations=60, mutation_std=0.5, norm_bound=20.0)
    result = lcsc_search(fitness, 4, settings=settings)
    assert max(abs(w - t) for w, t in zip(result.weights, target, strict=True)) < 0.1


def test_every_candidate_sums_to_one_within_the_norm_bound() -> None:
    target = [-2.0, 1.5, -1.0, 2.5]  # L1 norm 7, outside the bound: the best lies on the bound
    fitness, calls = quadratic(target)
    settings = SearchSettings(generations=30, mutation_std=0.5, norm_bound=3.0, seed=4)
    result = lcsc_search(fitness, 4, settings=settings)
    for weights in calls:
        assert math.isclose(float(weights.sum()), 1.0, abs_tol=1e-12)
        assert float(weights.abs().sum()) <= 3.0 + 1e-12
    for entry in result.history:
        assert math.isclose(sum(entry["weights"]), 1.0, abs_tol=1e-9)  # type: ignore[arg-type]
    assert math.isclose(sum(result.weights), 1.0, abs_tol=1e-12)
    assert sum(abs(w) for w in result.weights) > 2.9  # pressed against the bound


def test_mode_min() -> None:
    fitness, _ = quadratic()

    def loss(weights: torch.Tensor) -> float:
        return -fitness(weights) + 0.25

    result = lcsc_search(loss, 4, settings=SearchSettings(generations=40), mode="min")
    assert result.mode == "min"
    assert max(abs(w - t) for w, t in zip(result.weights, TARGET, strict=True)) < 0.02
    values = [entry["fitness"] for entry in result.history]
    assert result.fitness == min(values)  # type: ignore[type-var]
    running = [min(values[: i + 1]) for i in range(len(values))]  # type: ignore[type-var]
    assert [entry["best"] for entry in result.history] == running
    maximized = lcsc_search(fitness, 4, settings=SearchSettings(generations=40))
    assert maximized.weights == result.weights  # the same search, mirrored


@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("failure", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_fitness_never_wins(mode: str, failure: float) -> None:
    fitness, _ = quadratic()
    sign = 1.0 if mode == "max" else -1.0

    def broken(weights: torch.Tensor) -> float:
        # Fails near the true optimum (and for the last snapshot alone): a diverged model, a NaN metric.
        if float(weights[-1]) > 0.6:
            return failure
        return sign * fitness(weights)

    result = lcsc_search(
        broken, 4, settings=SearchSettings(population=10, parents=3, children=8, generations=15), mode=mode
    )  # type: ignore[arg-type]
    assert math.isfinite(result.fitness)
    assert result.weights[-1] <= 0.6
    assert result.fitness == broken(torch.tensor(result.weights, dtype=torch.float64))
    failed = [entry for entry in result.history if entry["weights"][-1] > 0.6]  # type: ignore[index]
    assert failed  # the last snapshot alone is evaluated first
    assert all(entry["fitness"] == -sign * math.inf for entry in failed)


def test_best_is_at_least_as_good_as_every_seed_of_the_population() -> None:
    fitness, _ = quadratic([0.1, 0.2, 0.3, 0.4])
    k = 4
    settings = SearchSettings(population=8, parents=3, children=6, generations=5, decays=(0.3, 0.6, 0.9))
    result = lcsc_search(fitness, k, settings=settings)
    last = torch.zeros(k, dtype=torch.float64)
    last[-1] = 1.0
    seeds = [last, uniform_weights(k)] + [ema_weights(k, g) for g in settings.decays]
    evaluated = [entry["weights"] for entry in result.history[: len(seeds)]]
    for seed, weights in zip(seeds, evaluated, strict=True):
        assert weights == pytest.approx(seed.tolist(), abs=1e-12)  # the initial population starts with them
    for seed in seeds:
        assert result.fitness >= fitness(seed)


def test_search_result_save_load_round_trip(tmp_path: Path) -> None:
    fitness, _ = quadratic()
    result = lcsc_search(fitness, 4, settings=SMALL)
    path = result.save(tmp_path / "lcsc.json")
    assert path == tmp_path / "lcsc.json"
    stored = json.loads(path.read_text())
    assert stored["weights"] == result.weights and stored["evaluations"] == result.evaluations
    loaded = SearchResult.load(path)
    assert loaded.weights == result.weights
    assert loaded.fitness == result.fitness
    assert loaded.history == result.history
    assert loaded == result  # a saved search comes back as it was
    assert SearchSettings(**loaded.settings) == SMALL  # type: ignore[arg-type]


def test_search_settings_errors() -> None:
    with pytest.raises(ValueError, match="parents=5"):
        SearchSettings(population=4, parents=5)
    for name in ("population", "parents", "children"):
        with pytest.raises(ValueError, match=f"{name}="):
            SearchSettings(**{name: 0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="generations="):
        SearchSettings(generations=-1)
    with pytest.raises(TypeError, match="population="):
        SearchSettings(population=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mutation_rate="):
        SearchSettings(mutation_rate=1.5)
    with pytest.raises(ValueError, match="mutation_std="):
        SearchSettings(mutation_std=-0.1)
    with pytest.raises(ValueError, match="init_std="):
        SearchSettings(init_std=float("nan"))
    with pytest.raises(ValueError, match="norm_bound="):
        SearchSettings(norm_bound=0.5)  # below 1 even the uniform soup breaks it
    with pytest.raises(ValueError, match="decays="):
        SearchSettings(decays=(0.9, 1.0))
    with pytest.raises(TypeError, match="seed="):
        SearchSettings(seed=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode="):
        lcsc_search(quadratic()[0], 4, settings=SMALL, mode="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k="):
        lcsc_search(quadratic()[0], 0, settings=SMALL)
