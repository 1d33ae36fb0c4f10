"""Property tests for the exact budget-constrained rank allocator (fimlora.allocate) and plan_rank_map."""

from __future__ import annotations

import itertools
import math
import random
import warnings
from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fimlora.allocate import allocate_ranks, uniform_ranks
from fimlora.config import FimConfig
from fimlora.initialize import plan_rank_map

PROPERTY = settings(max_examples=200, deadline=None)
# Tests that allocate twice per example (and draw up to 60 modules) run fewer examples to stay fast.
PAIRED = settings(max_examples=100, deadline=None)


# -- strategies -------------------------------------------------------------------------------------
@dataclass
class Problem:
    """One allocation problem: scores, per-module bounds, costs and a feasible budget."""

    scores: dict[str, float]
    lo: dict[str, int]
    hi: dict[str, int]
    costs: dict[str, int]
    budget: int
    unit: str  # "ranks" or "params"

    def allocate(self, scores: dict[str, float] | None = None) -> dict[str, int]:
        scores = self.scores if scores is None else scores
        kwargs = {"budget_ranks": self.budget} if self.unit == "ranks" else {"budget_params": self.budget}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # all-zero draws warn; tested separately
            result = allocate_ranks(scores, costs=self.costs, r_min=self.lo, r_max=self.hi, **kwargs)
        return dict(result)

    def weight(self, name: str) -> int:
        return 1 if self.unit == "ranks" else self.costs[name]


_log_uniform = st.floats(min_value=-12.0, max_value=6.0).map(lambda e: 10.0**e)


@st.composite
def score_lists(draw: st.DrawFn, n: int) -> list[float]:
    """Scores with zeros, ties (values from a small pool) and a dynamic range of 1e-12 .. 1e6."""
    pool = draw(st.lists(_log_uniform, min_size=1, max_size=4))
    # Small integers make remainders tie exactly (1.5 vs 4.5), where float noise must not decide.
    small_int = st.integers(1, 6).map(float)
    one = st.one_of(st.just(0.0), st.sampled_from(pool), _log_uniform, small_int)
    return draw(st.lists(one, min_size=n, max_size=n))


@st.composite
def problems(draw: st.DrawFn, unit: str, same_bounds: bool = False) -> Problem:
    n = draw(st.integers(min_value=1, max_value=60))
    names = [f"layer.{i}.{draw(st.sampled_from(['q', 'k', 'v', 'o']))}" for i in range(n)]
    scores = draw(score_lists(n))
    if same_bounds:
        lo_all = draw(st.integers(1, 8))
        hi_all = lo_all + draw(st.integers(0, 64))
        lo = dict.fromkeys(names, lo_all)
        hi = dict.fromkeys(names, hi_all)
        cost_all = draw(st.integers(2, 5000))
        costs = dict.fromkeys(names, cost_all)
    else:
        lo = {m: draw(st.integers(1, 8)) for m in names}
        hi = {m: lo[m] + draw(st.integers(0, 64)) for m in names}
        costs = {m: draw(st.integers(2, 5000)) for m in names}
    w = {m: 1 if unit == "ranks" else costs[m] for m in names}
    low = sum(w[m] * lo[m] for m in names)
    high = sum(w[m] * hi[m] for m in names)
    budget = draw(st.integers(low, high))
    return Problem(dict(zip(names, scores, strict=True)), lo, hi, costs, budget, unit)


either_unit = st.sampled_from(["ranks", "params"]).flatmap(problems)


# -- budget and bounds -------------------------------------------------------------------------------
@PROPERTY
@given(problems("ranks"))
def test_rank_budget_is_exact_and_bounds_hold(p: Problem) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = allocate_ranks(p.scores, budget_ranks=p.budget, r_min=p.lo, r_max=p.hi, metadata={"tag": 1})
    ranks = dict(result)
    assert list(ranks) == list(p.scores)
    assert sum(ranks.values()) == p.budget
    assert result.metadata["allocation"]["total_rank"] == p.budget
    assert result.metadata["tag"] == 1
    for m, r in ranks.items():
        assert isinstance(r, int)
        assert p.lo[m] <= r <= p.hi[m], m


@PROPERTY
@given(problems("params"))
def test_param_budget_is_respected_and_slack_is_below_one_rank(p: Problem) -> None:
    ranks = p.allocate()
    for m, r in ranks.items():
        assert p.lo[m] <= r <= p.hi[m], m
    used = sum(r * p.costs[m] for m, r in ranks.items())
    assert used <= p.budget
    growable = [p.costs[m] for m, r in ranks.items() if r < p.hi[m]]
    slack = p.budget - used
    # Either every module is full, or not even one more rank of the cheapest growable module fits.
    assert not growable or slack < min(growable)


# -- monotone, deterministic, invariant -----------------------------------------------------------------
@PROPERTY
@given(st.sampled_from(["ranks", "params"]).flatmap(lambda u: problems(u, same_bounds=True)))
def test_larger_score_never_gets_smaller_rank(p: Problem) -> None:
    ranks = p.allocate()
    for a, b in itertools.permutations(p.scores, 2):
        if p.scores[b] > p.scores[a]:
            assert ranks[b] >= ranks[a], (a, b, p.scores[a], p.scores[b])


@PAIRED
@given(either_unit)
def test_deterministic(p: Problem) -> None:
    assert p.allocate() == p.allocate()


@PAIRED
@given(either_unit, st.randoms(use_true_random=False))
def test_invariant_to_insertion_order(p: Problem, rnd: random.Random) -> None:
    names = list(p.scores)
    rnd.shuffle(names)
    shuffled = {m: p.scores[m] for m in names}
    assert p.allocate(shuffled) == p.allocate()


@PAIRED
@given(either_unit, st.sampled_from([7.3, 1e-3, 0.37, 1e4]))
def test_invariant_to_score_scale(p: Problem, factor: float) -> None:
    scaled = {m: s * factor for m, s in p.scores.items()}
    assert p.allocate(scaled) == p.allocate()


@st.composite
def small_integer_problems(draw: st.DrawFn) -> tuple[Problem, list[str]]:
    """Few modules with small integer scores and costs, where exact ties are common; plus a permutation."""
    unit = draw(st.sampled_from(["ranks", "params"]))
    n = draw(st.integers(2, 6))
    names = [f"m{i}" for i in range(n)]
    scores = {m: float(draw(st.integers(0, 4))) for m in names}
    assume(any(scores.values()))
    costs = {m: draw(st.sampled_from([2, 4, 6, 8])) for m in names}
    hi = draw(st.integers(2, 20))
    w = dict.fromkeys(names, 1) if unit == "ranks" else costs
    budget = draw(st.integers(sum(w.values()), sum(w.values()) * hi))
    problem = Problem(scores, dict.fromkeys(names, 1), dict.fromkeys(names, hi), costs, budget, unit)
    return problem, draw(st.permutations(names))


@settings(max_examples=300, deadline=None)  # small problems are cheap; exact ties need many draws
@given(small_integer_problems())
def test_exact_ties_are_invariant_to_order_and_scale(case: tuple[Problem, list[str]]) -> None:
    p, perm = case
    expected = p.allocate()
    assert p.allocate({m: p.scores[m] for m in perm}) == expected
    for factor in (7.3, 0.1, 1e-7, 1e5):
        assert p.allocate({m: s * factor for m, s in p.scores.items()}) == expected, factor


def test_exact_tie_is_invariant_to_order_and_scale() -> None:
    # lambda = 7/3: continuous ranks 7, 7, 9.33, 9.33, 2.33; one unit is left and three remainders tie,
    # so it goes to the larger score, then the smaller name: c.
    scores = {"a": 3.0, "b": 3.0, "c": 4.0, "d": 4.0, "e": 1.0}
    expected = {"a": 7, "b": 7, "c": 10, "d": 9, "e": 2}
    for perm in itertools.permutations(scores):
        for factor in (1.0, 7.3, 1e-7):
            got = allocate_ranks({m: scores[m] * factor for m in perm}, budget_ranks=35, r_min=1, r_max=11)
            assert got == expected, (perm, factor)


def test_exact_integer_shares_under_param_budget_are_invariant_to_order_and_scale() -> None:
    # Only a, e, f, g are above r_min = 1; lambda = 2/3 gives e and f the exact integers 4 and 2. After
    # flooring, 6 parameters are left: a (remainder 2/3) costs too much, g (1/3) takes 2, then e (score 6,
    # remainder 0) takes the last 4.
    scores = {"a": 4.0, "b": 0.0, "c": 1.0, "d": 1.0, "e": 6.0, "f": 3.0, "g": 5.0}
    costs = {"a": 8, "b": 6, "c": 2, "d": 6, "e": 4, "f": 8, "g": 2}
    expected = {"a": 2, "b": 1, "c": 1, "d": 1, "e": 5, "f": 2, "g": 4}
    for perm in itertools.islice(itertools.permutations(scores), 0, 5040, 97):
        for factor in (1.0, 7.3, 0.1, 1e-7, 1e5):
            got = allocate_ranks(
                {m: scores[m] * factor for m in perm}, budget_params=74, costs=costs, r_min=1, r_max=10
            )
            assert got == expected, (perm, factor)
            assert got.parameter_count({m: (c, 0) for m, c in costs.items()}) == 74


def test_scale_invariance_on_exact_half_tie() -> None:
    # Continuous ranks are 1.5 and 4.5: the remainders tie exactly, so the larger score gets the unit.
    # Float noise from the scale (or the bisection) must not flip that tie.
    for factor in (1.0, 7.3, 0.1, 3.0, 1e-7):
        scores = {"a": 1.0 * factor, "b": 3.0 * factor}
        assert allocate_ranks(scores, budget_ranks=6, r_min=1, r_max=8) == {"a": 1, "b": 5}, factor


# -- proportionality and uniform cases -------------------------------------------------------------------
@PROPERTY
@given(
    st.integers(1, 60).flatmap(lambda n: st.lists(st.floats(1e-3, 1e3), min_size=n, max_size=n)), st.data()
)
def test_ranks_within_one_of_proportional_share(scores: list[float], data: st.DataObject) -> None:
    total = sum(scores)
    # The budget must give the smallest score at least rank 1 so that no module is clamped.
    smallest_budget = math.ceil(total / min(scores))
    budget = data.draw(st.integers(smallest_budget, smallest_budget + 5000))
    named = {f"m{i}": s for i, s in enumerate(scores)}
    ranks = allocate_ranks(named, budget_ranks=budget, r_min=1, r_max=budget)
    for m, s in named.items():
        assert abs(ranks[m] - budget * s / total) <= 1, (m, ranks[m], budget * s / total)


@PROPERTY
@given(
    st.integers(1, 60),
    st.sampled_from([0.5, 1e-12, 1e6, 3.0]),
    st.integers(1, 4),
    st.integers(0, 40),
    st.data(),
)
def test_equal_scores_give_ranks_within_one(
    n: int, value: float, lo: int, extra: int, data: st.DataObject
) -> None:
    budget = data.draw(st.integers(n * lo, n * (lo + extra)))
    ranks = allocate_ranks(
        {f"m{i}": value for i in range(n)}, budget_ranks=budget, r_min=lo, r_max=lo + extra
    )
    assert max(ranks.values()) - min(ranks.values()) <= 1
    assert ranks.total_rank == budget


@PROPERTY
@given(st.integers(1, 60), st.integers(0, 40), st.data())
def test_zero_scores_warn_and_fall_back_to_uniform(n: int, extra: int, data: st.DataObject) -> None:
    budget = data.draw(st.integers(n, n * (1 + extra)))
    names = [f"m{i}" for i in range(n)]
    with pytest.warns(UserWarning, match="all module scores are zero"):
        ranks = allocate_ranks(dict.fromkeys(names, 0.0), budget_ranks=budget, r_min=1, r_max=1 + extra)
    assert max(ranks.values()) - min(ranks.values()) <= 1
    assert ranks.total_rank == budget
    assert ranks == allocate_ranks(dict.fromkeys(names, 1.0), budget_ranks=budget, r_min=1, r_max=1 + extra)


def test_uniform_ranks() -> None:
    assert uniform_ranks(["a", "b"], 4) == {"a": 4, "b": 4}
    with pytest.raises(ValueError, match="`r` must be a positive integer"):
        uniform_ranks(["a"], 0)


# -- hand-computed examples ------------------------------------------------------------------------------
def test_hand_computed_proportional_example() -> None:
    assert allocate_ranks({"a": 1.0, "b": 3.0}, budget_ranks=8, r_min=1, r_max=8) == {"a": 2, "b": 6}


def test_hand_computed_clamped_example_redistributes_the_remainder() -> None:
    # Unclamped shares of 12 would be 1.2, 1.2, 9.6; c stops at r_max = 6 and the other 6 ranks are
    # split evenly between a and b.
    ranks = allocate_ranks({"a": 1.0, "b": 1.0, "c": 8.0}, budget_ranks=12, r_min=1, r_max=6)
    assert ranks == {"a": 3, "b": 3, "c": 6}


def test_hand_computed_r_min_clamp() -> None:
    # Shares of 10 would be 0.1 and 9.9; a is raised to r_min = 2 and b gets the rest.
    assert allocate_ranks({"a": 1.0, "b": 99.0}, budget_ranks=10, r_min=2, r_max=10) == {"a": 2, "b": 8}


def test_hand_computed_param_example() -> None:
    # Costs 10 and 30, budget 200: lambda * (1 * 10 + 3 * 30) = 200 -> ranks 2 and 6, exactly 200 params.
    ranks = allocate_ranks(
        {"a": 1.0, "b": 3.0}, budget_params=200, costs={"a": 10, "b": 30}, r_min=1, r_max=8
    )
    assert ranks == {"a": 2, "b": 6}
    assert ranks.metadata["allocation"]["total_params"] == 200


def test_zero_score_module_stays_at_r_min_while_others_can_grow() -> None:
    assert allocate_ranks({"a": 0.0, "b": 1.0}, budget_ranks=9, r_min=2, r_max=16) == {"a": 2, "b": 7}


def test_budget_left_over_by_full_modules_is_spread_evenly() -> None:
    # c is full at r_max = 10; the zero-score modules must take the rest, and they share it evenly.
    scores = {"a": 0.0, "b": 0.0, "c": 1.0}
    assert allocate_ranks(scores, budget_ranks=18, r_min=1, r_max=10) == {"a": 4, "b": 4, "c": 10}
    costs = dict.fromkeys(scores, 2)
    ranks = allocate_ranks(scores, budget_params=36, costs=costs, r_min=1, r_max=10)
    assert ranks == {"a": 4, "b": 4, "c": 10}


# -- errors ----------------------------------------------------------------------------------------------
def test_infeasible_rank_budget_states_the_range() -> None:
    with pytest.raises(ValueError, match=r"feasible range is \[6, 24\]"):
        allocate_ranks({"a": 1.0, "b": 1.0, "c": 1.0}, budget_ranks=25, r_min=2, r_max=8)
    with pytest.raises(ValueError, match=r"budget_ranks=5 is infeasible.*\[6, 24\]"):
        allocate_ranks({"a": 1.0, "b": 1.0, "c": 1.0}, budget_ranks=5, r_min=2, r_max=8)


def test_infeasible_param_budget_states_the_range() -> None:
    with pytest.raises(ValueError, match=r"budget_params=10 is infeasible.*\[20, 160\]"):
        allocate_ranks({"a": 1.0, "b": 2.0}, budget_params=10, costs={"a": 5, "b": 15}, r_min=1, r_max=8)


def test_budget_must_be_given_exactly_once() -> None:
    with pytest.raises(ValueError, match="exactly one of `budget_ranks` and `budget_params`"):
        allocate_ranks({"a": 1.0}, budget_ranks=2, budget_params=10, costs={"a": 5})
    with pytest.raises(ValueError, match="exactly one of `budget_ranks` and `budget_params`"):
        allocate_ranks({"a": 1.0})


def test_param_budget_needs_costs() -> None:
    with pytest.raises(ValueError, match="`budget_params` needs `costs`"):
        allocate_ranks({"a": 1.0}, budget_params=10)
    with pytest.raises(ValueError, match="`costs` has no entry for module 'b'"):
        allocate_ranks({"a": 1.0, "b": 1.0}, budget_params=10, costs={"a": 5})


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, -math.inf])
def test_bad_score_names_the_module(bad: float) -> None:
    with pytest.raises(ValueError, match="score of module 'layer.3.v' must be finite and >= 0"):
        allocate_ranks({"layer.0.q": 1.0, "layer.3.v": bad}, budget_ranks=4)


def test_non_numeric_score_names_the_module() -> None:
    with pytest.raises(ValueError, match="score of module 'x' is not a number"):
        allocate_ranks({"x": "high"}, budget_ranks=4)  # type: ignore[dict-item]


def test_r_min_above_r_max_names_the_module() -> None:
    with pytest.raises(ValueError, match=r"r_min \(5\) > r_max \(4\) for module 'b'"):
        allocate_ranks({"a": 1.0, "b": 1.0}, budget_ranks=8, r_min={"a": 1, "b": 5}, r_max=4)


def test_missing_per_module_bound_names_the_module() -> None:
    with pytest.raises(ValueError, match="`r_max` has no entry for module 'b'"):
        allocate_ranks({"a": 1.0, "b": 1.0}, budget_ranks=4, r_max={"a": 4})


def test_empty_scores() -> None:
    with pytest.raises(ValueError, match="`scores` is empty"):
        allocate_ranks({}, budget_ranks=4)


@pytest.mark.parametrize("bad", [True, 8.0, 0, -3])
def test_budget_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match=r"`budget_ranks` must be a positive integer"):
        allocate_ranks({"a": 1.0, "b": 1.0}, budget_ranks=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`budget_params` must be a positive integer"):
        allocate_ranks({"a": 1.0}, budget_params=bad, costs={"a": 4})  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [True, 2.0, 0])
def test_bounds_and_costs_must_be_positive_ints(bad: object) -> None:
    # r_min may be 0 (a module may be dropped): tests/unit/test_rank_zero.py
    if bad != 0:
        with pytest.raises(ValueError, match="`r_min` must be an integer >= 0"):
            allocate_ranks({"a": 1.0}, budget_ranks=4, r_min=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`r_max\['a'\]` must be a positive integer"):
        allocate_ranks({"a": 1.0}, budget_ranks=4, r_max={"a": bad})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"`costs\['a'\]` must be a positive integer"):
        allocate_ranks({"a": 1.0}, budget_params=4, costs={"a": bad})  # type: ignore[dict-item]


# -- plan_rank_map ---------------------------------------------------------------------------------------
SHAPES = {"a": (64, 32), "b": (128, 128), "c": (16, 256)}  # full ranks 32, 128, 16
# Names without layers: normalize="kind" would make every score 1, so the plans below name the raw scores
# ("none", the default) explicitly (the warning for that case is tested in test_fim_core.py).


def test_plan_default_rank_budget_is_r_times_modules() -> None:
    rm = plan_rank_map({"a": 1.0, "b": 2.0, "c": 3.0}, SHAPES, FimConfig(normalize="none"), r=8)
    assert rm.total_rank == 8 * 3
    assert rm.metadata["lora_r"] == 8
    assert all(4 <= v <= 32 for v in rm.values())  # default bounds [r // 2, 4 r]


def test_plan_default_param_budget_is_r_times_total_cost() -> None:
    cfg = FimConfig(budget_unit="params", normalize="none")
    rm = plan_rank_map({"a": 1.0, "b": 2.0, "c": 3.0}, SHAPES, cfg, r=8)
    costs = {n: i + o for n, (i, o) in SHAPES.items()}
    budget = 8 * sum(costs.values())
    used = rm.parameter_count(SHAPES)
    assert used <= budget
    growable = [costs[n] for n, v in rm.items() if v < min(4 * 8, min(SHAPES[n]))]
    assert not growable or budget - used < min(growable)
    assert rm.metadata["allocation"]["budget_params"] == budget
    assert rm.metadata["uniform_params"] == budget


def test_plan_explicit_budget_is_used() -> None:
    rm = plan_rank_map(
        {"a": 1.0, "b": 2.0, "c": 3.0}, SHAPES, FimConfig(budget_ranks=30, normalize="none"), r=8
    )
    assert rm.total_rank == 30


def test_plan_default_r_max_is_capped_at_full_rank() -> None:
    # c dominates the scores but its full rank is 16 < 4 r = 32: it is capped, not an error.
    rm = plan_rank_map({"a": 1e-6, "b": 1e-6, "c": 1.0}, SHAPES, FimConfig(normalize="none"), r=8)
    assert rm["c"] == 16
    assert rm.total_rank == 24


def test_plan_explicit_r_max_above_full_rank_names_module_and_limit() -> None:
    with pytest.raises(ValueError, match=r"r_max=20 is above .*=16 of module 'c'.*r_max <= 16"):
        plan_rank_map({"a": 1.0, "b": 1.0, "c": 1.0}, SHAPES, FimConfig(r_max=20), r=8)


def test_plan_explicit_r_max_at_full_rank_is_fine() -> None:
    rm = plan_rank_map({"a": 1.0, "b": 1.0, "c": 100.0}, SHAPES, FimConfig(r_max=16, normalize="none"), r=8)
    assert rm["c"] == 16


def test_plan_r_min_above_full_rank_names_module() -> None:
    with pytest.raises(ValueError, match=r"r_min=20 exceeds the full rank .*=16 of module 'c'.*at most 16"):
        plan_rank_map({"a": 1.0, "b": 1.0, "c": 1.0}, SHAPES, FimConfig(r_min=20), r=8)


def test_plan_scores_without_shape() -> None:
    with pytest.raises(ValueError, match=r"no shape for modules \['d'\]"):
        plan_rank_map({"a": 1.0, "d": 1.0}, SHAPES, FimConfig(), r=8)


@PROPERTY
@given(
    st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=30),
    st.integers(1, 16),
    st.sampled_from(["ranks", "params"]),
    st.data(),
)
def test_plan_default_budget_property(
    shapes_list: list[tuple[int, int]], r: int, unit: str, data: st.DataObject
) -> None:
    shapes = {f"m{i}": s for i, s in enumerate(shapes_list)}
    assume(all(min(s) >= max(1, r // 2) for s in shapes_list))  # r_min must fit every module
    scores = dict(zip(shapes, data.draw(score_lists(len(shapes))), strict=True))
    cfg = FimConfig(budget_unit=unit)  # type: ignore[arg-type]
    hi = {n: min(4 * r, min(s)) for n, s in shapes.items()}
    lo = max(1, r // 2)
    costs = {n: a + b for n, (a, b) in shapes.items()}
    budget = r * len(shapes) if unit == "ranks" else r * sum(costs.values())
    w = dict.fromkeys(shapes, 1) if unit == "ranks" else costs
    feasible = sum(w[n] * lo for n in shapes) <= budget <= sum(w[n] * hi[n] for n in shapes)
    if not feasible:
        with pytest.raises(ValueError, match="infeasible"):
            plan_rank_map(scores, shapes, cfg, r=r)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rm = plan_rank_map(scores, shapes, cfg, r=r)
    for n, v in rm.items():
        assert lo <= v <= hi[n]
    used = sum(w[n] * v for n, v in rm.items())
    if unit == "ranks":
        assert used == budget
    else:
        assert used <= budget
        growable = [costs[n] for n, v in rm.items() if v < hi[n]]
        assert not growable or budget - used < min(growable)
