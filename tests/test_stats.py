"""Statistics of a study: hand-computed references for the tests, intervals, aggregation over
seeds, Markdown and pictures."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from gcache.stats import (
    aggregate,
    cluster_bootstrap,
    mcnemar_exact,
    paired_bootstrap,
    seed_question_interval,
    sign_flip_test,
    study_figures,
    study_markdown,
    wilson_interval,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def pairs(b11: int, b10: int, b01: int, b00: int) -> tuple[list[bool], list[bool]]:
    """Paired correctness lists with the given 2x2 table (first index: a right, second: b right)."""
    a = [True] * b11 + [True] * b10 + [False] * b01 + [False] * b00
    b = [True] * b11 + [False] * b10 + [True] * b01 + [False] * b00
    return a, b


# ---- wilson, imports ----


def test_wilson_interval_equals_hand_values():
    # 5/10: centre (0.5 + 1.96²/20) / (1 + 1.96²/10) = 0.5, half 1.96·sqrt(0.025 + 0.0096)/1.38416
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # 0/10 and 10/10: the bound away from the edge is z²/(n + z²) = 3.8416/13.8416 from it
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27755), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.72245, 1.0), abs=1e-4)
    # 17/40: centre (0.425 + 0.04802) / 1.09604 = 0.43157, half 1.96·sqrt(0.0061094 + 0.0006003)/1.09604
    assert wilson_interval(17, 40) == pytest.approx((0.28509, 0.57805), abs=1e-4)


def test_stats_does_not_import_torch_or_hydra():
    code = "import sys, gcache.stats; print('torch' in sys.modules, 'hydra' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---- McNemar ----


def test_mcnemar_hand_table():
    a, b = pairs(b11=5, b10=9, b01=1, b00=3)
    result = mcnemar_exact(a, b)
    assert (result["n"], result["b10"], result["b01"]) == (18, 9, 1)
    # 2 * (C(10,0) + C(10,1)) / 2^10
    assert result["p_value"] == pytest.approx(0.021484375, abs=0)
    # The test is symmetric in the two methods; only the table's orientation changes.
    swapped = mcnemar_exact(b, a)
    assert (swapped["b10"], swapped["b01"], swapped["p_value"]) == (1, 9, result["p_value"])


def test_mcnemar_more_hand_values():
    # b01=3, b10=5: 2 * (1 + 8 + 28 + 56) / 2^8
    assert mcnemar_exact(*pairs(0, 5, 3, 0))["p_value"] == pytest.approx(186 / 256, abs=0)
    # Balanced discordance caps at 1.
    assert mcnemar_exact(*pairs(2, 4, 4, 2))["p_value"] == 1.0
    # All 20 discordant pairs one way: 2 / 2^20
    assert mcnemar_exact(*pairs(0, 20, 0, 0))["p_value"] == pytest.approx(2 / 2**20, abs=0)


def test_mcnemar_no_discordant_pairs():
    result = mcnemar_exact(*pairs(b11=7, b10=0, b01=0, b00=4))
    assert result == {"n": 11, "b01": 0, "b10": 0, "p_value": 1.0}
    assert mcnemar_exact([], [])["p_value"] == 1.0


def test_mcnemar_rejects_unpaired():
    with pytest.raises(ValueError):
        mcnemar_exact([True, False], [True])


# ---- paired bootstrap ----


def test_bootstrap_big_difference_and_none():
    a, b = pairs(b11=30, b10=50, b01=0, b00=20)  # mean(a) = 0.8, mean(b) = 0.3
    big = paired_bootstrap([float(x) for x in a], [float(x) for x in b], iterations=4000)
    assert big["diff"] == pytest.approx(0.5)
    assert big["ci95"][0] < 0.5 < big["ci95"][1]
    # Differences are 1 on half the questions and 0 on the rest: standard error 0.05, so the
    # percentile interval is about 0.5 +- 1.96 * 0.05.
    assert big["ci95"] == pytest.approx([0.402, 0.598], abs=0.015)
    assert big["p_value"] < 0.001

    a = [1.0, 0.0] * 50
    b = [0.0, 1.0] * 50  # same mean, every pair discordant
    none = paired_bootstrap(a, b, iterations=4000)
    assert none["diff"] == 0.0
    assert none["ci95"][0] < 0 < none["ci95"][1]
    assert none["p_value"] > 0.5

    same = paired_bootstrap(a, a, iterations=1000)
    assert same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0


def test_bootstrap_covers_true_difference():
    # Accuracies 0.7 vs 0.5 on 200 questions, 60 repetitions: the 95% interval covers the
    # true difference 0.2 in most of them (a wrong interval, e.g. unpaired or of the wrong
    # scale, would not).
    rng = np.random.default_rng(123)
    covered = 0
    reps = 60
    for rep in range(reps):
        a = (rng.random(200) < 0.7).astype(float)
        b = (rng.random(200) < 0.5).astype(float)
        ci = paired_bootstrap(list(a), list(b), iterations=1000, seed=rep)["ci95"]
        covered += ci[0] <= 0.2 <= ci[1]
    assert covered / reps >= 0.85


def test_bootstrap_empty():
    assert paired_bootstrap([], [])["diff"] is None


# ---- seed and question interval ----


def test_seed_question_interval_contains_mean_and_narrows():
    small = seed_question_interval([[1, 0, 1, 1, 0] * 4] * 3, iterations=3000)
    large = seed_question_interval([[1, 0, 1, 1, 0] * 100] * 3, iterations=3000)
    for result in (small, large):
        assert result["mean"] == pytest.approx(0.6)
        assert result["ci95"][0] < 0.6 < result["ci95"][1]
    assert large["ci95"][1] - large["ci95"][0] < 0.5 * (small["ci95"][1] - small["ci95"][0])


def test_seed_question_interval_one_seed_is_question_bootstrap():
    # 400 questions at p = 0.5: the question bootstrap's interval is about 0.5 +- 1.96*0.025.
    result = seed_question_interval([[1.0, 0.0] * 200], iterations=10000)
    assert result["seeds"] == 1
    assert result["ci95"] == pytest.approx([0.451, 0.549], abs=0.01)


def test_seed_question_interval_counts_seed_variation():
    # Seeds that disagree widen the interval far beyond what the questions alone give.
    seeds = [[1.0] * 200 + [0.0] * 800, [1.0] * 500 + [0.0] * 500, [1.0] * 800 + [0.0] * 200]
    result = seed_question_interval(seeds, iterations=3000)
    assert result["mean"] == pytest.approx(0.5)
    assert result["ci95"][1] - result["ci95"][0] > 0.2
    pooled = seed_question_interval([sum(seeds, [])], iterations=3000)
    assert pooled["ci95"][1] - pooled["ci95"][0] < 0.05


def test_seed_question_interval_empty():
    assert seed_question_interval([[], []])["mean"] is None
    assert seed_question_interval([[np.nan, np.nan]])["mean"] is None


def test_seeds_repeating_the_same_answers_do_not_narrow_the_interval():
    # The seeds answer the same questions: three identical copies are no more evidence than one
    # (resampled inside each seed on its own, 1 seed gave width 0.086 and 3 copies 0.050).
    one = np.array([[1.0, 0.0, 1.0, 1.0, 0.0] * 100])
    widths = [np.diff(seed_question_interval(np.repeat(one, k, 0), iterations=4000)["ci95"])[0] for k in (1, 3)]
    assert widths[1] == pytest.approx(widths[0], abs=0.006) and widths[0] == pytest.approx(0.086, abs=0.006)


@pytest.mark.parametrize("questions,seeds", [(100, 3), (164, 3), (100, 5), (164, 5)])
def test_seed_question_interval_covers_the_true_accuracy(questions, seeds):
    # Question difficulty Beta(0.3, 0.3) (true accuracy 0.5), the same questions in every seed, 300
    # replications. Measured: 0.98, 0.97, 0.98, 0.95 (resampling inside each seed: 0.88, 0.84, 0.75, 0.77).
    rng = np.random.default_rng(1)
    hits = 0
    for rep in range(300):
        p = rng.beta(0.3, 0.3, size=questions)  # (Q,)
        scores = (rng.random((seeds, questions)) < p).astype(float)  # (S, Q)
        low, high = seed_question_interval(scores, iterations=1000, seed=rep)["ci95"]
        hits += low <= 0.5 <= high
    assert hits / 300 >= 0.93


def test_seed_question_interval_aligns_questions_and_skips_unscored_ones():
    # seed 1 did not score question 2: its mean is over questions 0 and 1
    result = seed_question_interval([[1.0, 0.0, 1.0], [1.0, 1.0, np.nan]], iterations=2000)
    assert result["mean"] == pytest.approx((2 / 3 + 1.0) / 2) and result["questions"] == 3 and result["seeds"] == 2


# ---- pooled over seeds: questions are the units ----


def test_sign_flip_hand_cases():
    # Question sums over two seeds: q0 (+1, +1) -> 2, q1 (+1, 0) -> 1, q2 (-1, unscored) -> -1.
    # S = 2 and |±2 ±1 ±1| over the 8 sign vectors is 4, 2, 2, 0, 0, 2, 2, 4: P(|S*| >= 2) = 6/8.
    result = sign_flip_test([[1.0, 1.0, -1.0], [1.0, 0.0, np.nan]])
    assert (result["questions"], result["pairs"], result["nonzero"]) == (3, 5, 3)
    assert result["diff"] == pytest.approx(2 / 5)
    assert result["p_value"] == 0.75 and result["exact"] is True
    # Three seeds, sums 3, 3, 2, 1 and a question whose seeds cancel: only all-plus and
    # all-minus reach |S| = 9, so p = 2/16; the cancelling question flips nothing.
    diffs = [[1, 1, 1, 1, 1], [1, 1, 1, 0, -1], [1, 1, 0, 0, 0]]
    result = sign_flip_test(np.array(diffs, dtype=float))
    assert result["nonzero"] == 4 and result["p_value"] == 2 / 16
    # One seed of 0/1 rewards: the test is McNemar's (discordant pairs flip, concordant are 0).
    a, b = pairs(b11=5, b10=9, b01=1, b00=3)
    one = sign_flip_test([[float(x) - float(y) for x, y in zip(a, b, strict=True)]])
    assert one["p_value"] == pytest.approx(mcnemar_exact(a, b)["p_value"], abs=0)
    # Nothing differs, or nothing scored.
    assert sign_flip_test([[1.0, -1.0], [-1.0, 1.0]])["p_value"] == 1.0
    empty = sign_flip_test([[np.nan, np.nan]])
    assert (empty["pairs"], empty["diff"], empty["p_value"]) == (0, None, None)


def test_sign_flip_exact_equals_enumeration_and_monte_carlo_is_close():
    rng = np.random.default_rng(7)
    sums = rng.integers(-3, 4, size=14).astype(float)
    signs = np.array(list(itertools.product([1, -1], repeat=len(sums))))  # (2^14, 14)
    brute = float(np.mean(np.abs(signs @ sums) >= abs(sums.sum())))
    assert sign_flip_test(sums[None])["p_value"] == pytest.approx(brute, abs=1e-12)  # integer grid
    # Fractional sums: enumerated when at most 16 questions differ ...
    thirds = sign_flip_test(sums[None] / 3)
    assert thirds["exact"] is True and thirds["p_value"] == pytest.approx(brute, abs=1e-12)
    # ... Monte Carlo (seeded) beyond; the p-value does not depend on the scale of the sums.
    many = rng.integers(-3, 4, size=60).astype(float)
    many[0] += 10
    exact = sign_flip_test(many[None])
    approx = sign_flip_test(many[None] / 3, iterations=20000, seed=1)
    assert exact["exact"] is True and approx["exact"] is False and approx["iterations"] == 20000
    assert approx["p_value"] == pytest.approx(exact["p_value"], abs=0.015)
    assert sign_flip_test(many[None] / 3, iterations=20000, seed=1) == approx


def test_sign_flip_holds_its_level_when_seeds_repeat_questions():
    # Under the null (each question's difference symmetric about 0), three seeds that repeat
    # the same per-question results: the question-level test rejects at most about 5% of the
    # time; McNemar over the pooled (seed, question) pairs rejects far more often.
    rng = np.random.default_rng(0)
    reps, ours, pooled = 300, 0, 0
    for _ in range(reps):
        d = rng.choice([-1.0, 0.0, 1.0], size=30, p=[0.25, 0.5, 0.25])
        three = np.repeat(d[None], 3, axis=0)  # (3 seeds, 30 questions)
        ours += sign_flip_test(three)["p_value"] < 0.05
        flat = three.ravel()
        pooled += mcnemar_exact(list(flat > 0), list(flat < 0))["p_value"] < 0.05
    assert ours / reps <= 0.08
    assert pooled / reps >= 0.2


def test_cluster_bootstrap_covers_when_seeds_repeat_questions():
    # 40 questions, true mean difference 0.2; each seed keeps a question's difference with
    # probability 0.8 (else draws afresh), so seeds are strongly correlated. The cluster interval
    # covers 0.2 in most repetitions.
    rng = np.random.default_rng(3)
    values, probs = [-1.0, 0.0, 1.0], [0.1, 0.6, 0.3]
    reps, covered = 80, 0
    for rep in range(reps):
        d = rng.choice(values, size=40, p=probs)
        seeds = [np.where(rng.random(40) < 0.8, d, rng.choice(values, size=40, p=probs)) for _ in range(3)]
        ci = cluster_bootstrap(np.array(seeds), iterations=1000, seed=rep)["ci95"]
        covered += ci[0] <= 0.2 <= ci[1]
    assert covered / reps >= 0.85


def test_cluster_bootstrap_pairs_and_empty():
    result = cluster_bootstrap([[1.0, 0.0, np.nan], [1.0, np.nan, np.nan]], iterations=500)
    assert (result["questions"], result["pairs"]) == (2, 3)  # q2 was never scored
    assert result["diff"] == pytest.approx(2 / 3)
    assert 0.0 <= result["ci95"][0] <= 2 / 3 <= result["ci95"][1] <= 1.0
    assert cluster_bootstrap([[np.nan]])["ci95"] is None


def repeated_study(seeds: int) -> dict[int, list[dict]]:
    """The same 40 per-question results on every seed: gcache right on q0..q24, `single` on
    q0..q9 and q30..q34, so 15 questions only gcache got right and 5 only `single` did."""
    rows = []
    for q in range(40):
        rows.append(record(q, "gcache", float(q < 25)))
        rows.append(record(q, "single", float(q < 10 or 30 <= q < 35)))
    return {s: rows for s in range(seeds)}


def md_cell(text: str, method: str, column: str) -> str:
    """A cell of the comparisons table of `study_markdown`."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| method |") and column in line)
    cols = [c.strip() for c in lines[header].strip("|").split("|")]
    row = next(line for line in lines[header:] if line.startswith(f"| {method} |"))
    return [c.strip() for c in row.strip("|").split("|")][cols.index(column)]


def test_pooled_comparison_does_not_count_repeated_seeds_as_evidence():
    # Repeating the same results over 3 seeds adds no information about the questions: the
    # pooled p-value and the interval must be those of one seed.
    one = aggregate(repeated_study(1), iterations=4000)
    three = aggregate(repeated_study(3), iterations=4000)
    # One seed: 15 vs 5 discordant, exact McNemar 2 * P(Binomial(20, 1/2) <= 5) = 0.0414.
    assert md_cell(study_markdown(one, "one"), "single", "p pooled") == "0.041"
    assert md_cell(study_markdown(three, "three"), "single", "p pooled") == "0.041"
    width = {n: s["comparisons"]["single"]["pooled"]["bootstrap"]["ci95"] for n, s in (("one", one), ("three", three))}
    assert width["three"][1] - width["three"][0] == pytest.approx(width["one"][1] - width["one"][0], abs=0.02)
    p_one, p_three = (s["comparisons"]["single"]["pooled"]["p_value"] for s in (one, three))
    assert p_one == p_three == pytest.approx(2 * sum(math.comb(20, k) for k in range(6)) / 2**20)


def test_pooled_interval_is_wider_than_naive_pairs_bootstrap_on_repeated_data():
    summary = aggregate(repeated_study(3), iterations=4000)
    pooled = summary["comparisons"]["single"]["pooled"]
    ref = [float(q < 25) for q in range(40)] * 3
    other = [float(q < 10 or 30 <= q < 35) for q in range(40)] * 3
    naive = paired_bootstrap(ref, other, iterations=4000)["ci95"]  # 120 "independent" pairs
    cluster = pooled["bootstrap"]["ci95"]
    # Three copies of each question: the naive interval is about sqrt(3) times too narrow.
    assert cluster[1] - cluster[0] > 1.5 * (naive[1] - naive[0])


# ---- aggregate ----


def record(qid: int, method: str, reward, tokens: int = 10, seconds: float = 1.0) -> dict:
    return {
        "id": f"q{qid}", "method": method, "reward": reward, "decoded_tokens": tokens,
        "prompt_tokens": 2 * tokens, "seconds": seconds, "peak_cache_bytes": 0, "edges": [],
    }


def constructed_study() -> dict[int, list[dict]]:
    """3 seeds x 40 questions. gcache right on the first k_seed questions (30, 28, 32);
    `single` right on the first 10 only (a subset of gcache's); `close` equals gcache but for
    one question per seed; `better` is right everywhere."""
    study = {}
    for seed, k in zip([0, 1, 2], [30, 28, 32], strict=True):
        rows = []
        for q in range(40):
            rows.append(record(q, "single", float(q < 10), tokens=5, seconds=0.5))
            rows.append(record(q, "gcache", float(q < k), tokens=20, seconds=2.0))
            rows.append(record(q, "close", float(q < k) if q != 0 else 0.0, tokens=20))
            rows.append(record(q, "better", 1.0))
        study[seed] = rows
    return study


def test_aggregate_means_order_and_json():
    summary = aggregate(constructed_study(), iterations=2000)
    assert list(summary["methods"]) == ["single", "gcache", "close", "better"]
    assert summary["seeds"] == [0, 1, 2]
    g = summary["methods"]["gcache"]
    assert [p["accuracy"] for p in g["per_seed"]] == [0.75, 0.7, 0.8]
    assert g["accuracy"] == pytest.approx(0.75)
    assert g["ci95"][0] < 0.75 < g["ci95"][1]
    assert g["decoded_tokens_per_question"] == 20 and g["prompt_tokens_per_question"] == 40
    assert g["seconds_per_question"] == 2.0
    assert summary["methods"]["single"]["accuracy"] == pytest.approx(0.25)
    assert summary["methods"]["single"]["seconds_per_question"] == 0.5
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary


def test_aggregate_comparisons_and_significance():
    summary = aggregate(constructed_study(), iterations=2000)
    comparisons = summary["comparisons"]
    assert list(comparisons) == ["single", "close", "better"]

    single = comparisons["single"]
    assert single["significant_every_seed"] is True
    assert [p["mcnemar"]["b10"] for p in single["per_seed"]] == [20, 18, 22]
    assert single["per_seed"][0]["mcnemar"]["p_value"] == pytest.approx(2 / 2**20, abs=0)
    pooled = single["pooled"]
    assert (pooled["pairs"], pooled["questions"], pooled["b10"], pooled["b01"]) == (120, 40, 60, 0)
    assert pooled["diff"] == pooled["bootstrap"]["diff"] == pytest.approx(0.5)
    # Questions 10..27 differ on every seed, 28..31 on some: 22 questions, all one way.
    assert pooled["permutation"]["nonzero"] == 22 and pooled["permutation"]["exact"] is True
    assert pooled["p_value"] == pytest.approx(2 / 2**22, abs=0)

    # One discordant question per seed: never significant.
    close = comparisons["close"]
    assert close["significant_every_seed"] is False
    assert all(p["mcnemar"]["p_value"] == 1.0 for p in close["per_seed"])

    # Significant, but the other method is the better one.
    better = comparisons["better"]
    assert all(p["mcnemar"]["p_value"] < 0.05 for p in better["per_seed"])
    assert better["significant_every_seed"] is False
    assert better["pooled"]["bootstrap"]["diff"] == pytest.approx(-0.25)


def test_aggregate_significance_needs_every_seed():
    study = constructed_study()
    # On seed 2 `single` matches gcache exactly: no longer significant on every seed.
    study[2] = [
        {**r, "reward": float(int(r["id"][1:]) < 32)} if r["method"] == "single" else r
        for r in study[2]
    ]
    summary = aggregate(study, iterations=500)
    assert summary["comparisons"]["single"]["per_seed"][2]["mcnemar"]["p_value"] == 1.0
    assert summary["comparisons"]["single"]["significant_every_seed"] is False


def test_aggregate_none_rewards_excluded_pairwise():
    study = constructed_study()
    # gcache cannot score q0 on seed 0 (it got it right otherwise); single cannot score q39.
    study[0] = [
        {**r, "reward": None}
        if (r["method"], r["id"]) in {("gcache", "q0"), ("single", "q39")}
        else r
        for r in study[0]
    ]
    summary = aggregate(study, iterations=500)
    g0 = summary["methods"]["gcache"]["per_seed"][0]
    assert (g0["questions"], g0["scored"]) == (40, 39)
    assert g0["accuracy"] == pytest.approx(29 / 39)
    single0 = summary["comparisons"]["single"]["per_seed"][0]["mcnemar"]
    assert single0["n"] == 38
    assert (single0["b10"], single0["b01"]) == (20, 0)  # q0 was concordant (both right)
    assert summary["comparisons"]["better"]["per_seed"][0]["mcnemar"]["n"] == 39
    pooled = summary["comparisons"]["single"]["pooled"]
    assert (pooled["pairs"], pooled["questions"]) == (118, 40)  # q0 and q39 still scored on seeds 1, 2


def test_aggregate_without_reference():
    summary = aggregate({0: [record(0, "single", 1.0)]}, iterations=100)
    assert summary["comparisons"] == {}
    assert summary["methods"]["single"]["accuracy"] == 1.0


# ---- markdown ----


def test_markdown_has_no_nan_and_dashes_absent_values():
    study = constructed_study()
    # A method with nothing scored and no cost fields, and a seed where `close` did not run.
    study[0] += [{"id": f"q{q}", "method": "broken", "reward": None} for q in range(40)]
    study[1] = [r for r in study[1] if r["method"] != "close"]
    summary = aggregate(study, iterations=200)
    text = study_markdown(summary, "arith, 3 seeds")
    assert text.startswith("# arith, 3 seeds\n")
    assert "nan" not in text.lower()
    broken = next(line for line in text.splitlines() if line.startswith("| broken |"))
    assert broken.count("—") >= 5
    close = next(
        line for line in text.splitlines() if line.startswith("| close |") and "+" in line
    )
    assert "—" in close  # seed 1's p-value
    single = next(
        line for line in text.splitlines() if line.startswith("| single |") and "+0.500" in line
    )
    assert "60/0" in single and single.rstrip().endswith("| yes |")
    assert "0: 0.750, 1: 0.700, 2: 0.800" in text


def test_markdown_names_the_pooled_test_and_interval_under_the_table():
    text = study_markdown(aggregate(constructed_study(), iterations=200), "arith")
    lines = text[: text.index("## Compute per question")].splitlines()  # the comparisons' section
    last_row = max(i for i, line in enumerate(lines) if line.startswith("| better |"))
    sentence = next((line for line in lines[last_row + 1:] if line.strip()), "")
    assert "sign-flip permutation test over questions (exact or Monte Carlo: column p pooled by)" in sentence
    assert "cluster bootstrap that resamples questions with all their seeds (200 resamples)" in sentence
    assert md_cell(text, "better", "p pooled by") == "exact (integer grid)"


def test_the_exact_sign_flip_grid_has_a_limit_and_the_table_names_monte_carlo_past_it():
    # One seed, 0/1 rewards: 10,001 questions only the reference got right is past the integer grid
    # (questions x (2 x sum + 1) > SIGN_FLIP_GRID), so the p-value is Monte Carlo, and study.md says so.
    past = sign_flip_test(np.ones((1, 10_001)), iterations=200)
    assert not past["exact"] and past["how"].startswith("Monte Carlo (200 draws; 10001 questions past")
    within = sign_flip_test(np.ones((1, 9_000)), iterations=200)
    assert within["exact"] and within["how"] == "exact (integer grid)"
    assert sign_flip_test(np.array([[0.5, -0.25, 1.0]]))["how"] == "exact (enumeration)"
    records = [{"id": q, "method": m, "reward": 1.0 if m == "gcache" else 0.0} for q in range(10_001)
               for m in ("gcache", "single")]
    text = study_markdown(aggregate({0: records}, iterations=200), "big")
    assert md_cell(text, "single", "p pooled by").startswith("Monte Carlo (200 draws")


def test_the_comparison_shows_both_accuracies_on_the_pairs_it_compares():
    # Seeds score different questions: gcache 1.0 on its 4 scored questions, single 0.5 on its 4, but on
    # the 2 questions both scored they tie; the table's pair columns say so next to diff 0.
    gcache = [{"id": q, "method": "gcache", "reward": r} for q, r in enumerate([1.0, 1.0, 1.0, 1.0, None, None])]
    single = [{"id": q, "method": "single", "reward": r} for q, r in enumerate([None, None, 1.0, 1.0, 0.0, 0.0])]
    summary = aggregate({0: gcache + single}, iterations=200)
    assert summary["methods"]["gcache"]["accuracy"] == 1.0 and summary["methods"]["single"]["accuracy"] == 0.5
    pooled = summary["comparisons"]["single"]["pooled"]
    assert (pooled["reference_accuracy"], pooled["method_accuracy"], pooled["diff"], pooled["pairs"]) == (1.0, 1.0, 0.0, 2)
    text = study_markdown(summary, "mixed")
    assert (md_cell(text, "single", "gcache acc"), md_cell(text, "single", "method acc")) == ("1.000", "1.000")
    assert "which the accuracies above need not be" in text


# ---- figures ----


def history(seed: int, with_edges: bool = True) -> list[dict]:
    rows = []
    for step in range(0, 50, 10):
        row = {"step": step, "reward": 0.1 * seed}
        if step % 20 == 0:
            row["val/accuracy"] = 0.2 + 0.01 * step
        if with_edges:
            row["p_oracle"] = 0.5 + 0.01 * step
            row["p_distractor"] = 0.5 - 0.01 * step
        rows.append(row)
    return rows


def test_figures_written(tmp_path):
    summary = aggregate(constructed_study(), iterations=200)
    paths = study_figures(summary, {s: history(s) for s in range(3)}, tmp_path / "fig")
    assert sorted(p.name for p in paths) == ["comparison.png", "curves.png", "edges.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_figures_skipped_when_absent(tmp_path):
    empty = {"reference": "gcache", "seeds": [], "methods": {}, "comparisons": {}}
    bare = {0: [{"step": 0, "reward": 0.5}], 1: [{"step": 0, "val/accuracy": None}]}
    assert study_figures(empty, bare, tmp_path) == []
    assert list(tmp_path.iterdir()) == []

    nan_only = {0: [{"step": 0, "val/accuracy": math.nan}]}
    only_curves = {0: history(0, with_edges=False)}
    assert study_figures(empty, nan_only, tmp_path) == []
    assert [p.name for p in study_figures(empty, only_curves, tmp_path)] == ["curves.png"]


def test_compute_per_question_divides_accuracy_by_each_cost():
    def rows(method, rewards, tokens, agents, seconds, handed):
        return [{"id": f"q{q}", "method": method, "reward": r, "prompt_tokens": tokens, "agents_run": agents,
                 "seconds": seconds, "handed_bytes": handed, "decoded_tokens": 3} for q, r in enumerate(rewards)]

    study = {0: rows("gcache", [1.0, 1.0, 1.0, 0.0], 200, 1, 0.5, 46_080)
             + rows("fixed-full", [1.0, 0.0, 1.0, 0.0], 800, 4, 2.0, 184_320)}
    text = study_markdown(aggregate(study, reference="gcache", iterations=200), "compute")
    section = text[text.index("## Compute per question"):]
    assert md_cell(section, "gcache", "prompt tok/q") == "200.0"
    assert md_cell(section, "gcache", "agents run/q") == "1.00"
    assert md_cell(section, "gcache", "bytes read/q") == "46.1 kB"
    assert md_cell(section, "gcache", "acc per 1k prompt tok") == "3.750"  # 0.75 / 0.2
    assert md_cell(section, "fixed-full", "acc per 1k prompt tok") == "0.625"  # 0.5 / 0.8
    assert md_cell(section, "fixed-full", "acc per agent run") == "0.125"  # 0.5 / 4
    assert md_cell(section, "gcache", "acc per s") == "1.500"  # 0.75 / 0.5


def test_routing_counts_what_the_judger_read_against_the_oracle_graph():
    def row(q, method, senders, oracle):
        return {"id": f"q{q}", "method": method, "reward": 1.0, "judger_senders": senders, "oracle_edges": oracle}

    one_hop = [[2, -1]]
    chain = [[0, 1], [1, -1]]  # agent 0 -> agent 1 -> judger: the judger needs agent 1, agent 0 is relevant
    study = {
        0: [row(0, "gcache", [2], one_hop), row(1, "gcache", [2, 3], one_hop), row(2, "gcache", [3], one_hop),
            row(3, "gcache", [0, 1], chain), row(4, "gcache", [1, 3], chain),
            *(row(q, "single", [], one_hop) for q in range(3))],
        1: [row(0, "gcache", [2, 3, 0], one_hop)],
    }
    summary = aggregate(study, reference="gcache", iterations=100)
    g = summary["routing"]["gcache"]
    # Seed 0's five records and seed 1's one: needed read in q0, q1, q3, q4 and seed 1's q0.
    assert g["reads_needed"] == pytest.approx(5 / 6)
    assert g["exact"] == pytest.approx(2 / 6)  # seed 0's q0 and q3 (agent 0 belongs to the chain)
    assert g["distractors_per_question"] == pytest.approx((0 + 1 + 1 + 0 + 1 + 2) / 6)
    assert g["by_needed"]["2"]["questions"] == 4 and g["by_needed"]["2"]["confused"] == {3: 3, 0: 1}
    assert g["by_needed"]["1"]["reads_needed"] == 1.0 and g["by_needed"]["1"]["confused"] == {3: 1}
    assert summary["routing"]["single"]["reads_needed"] == 0.0
    assert aggregate({0: [record(0, "x", 1.0)]}, iterations=10)["routing"] == {}  # no oracle graphs

    summary["agents"] = ["door", "locker", "train", "room"]
    summary["training"] = {0: {"steps": 24, "first_step_p_oracle_above_0.9": 12.0,
                               "first_step_p_distractor_below_0.1": 18.0, "last_p_oracle": 0.97,
                               "last_p_distractor": 0.04},
                           1: {"steps": 24, "first_step_p_oracle_above_0.9": None,
                               "first_step_p_distractor_below_0.1": None, "last_p_oracle": 0.6,
                               "last_p_distractor": 0.3}}
    text = study_markdown(summary, "routing")
    section = text[text.index("## Routing"):text.index("## Compute") if "## Compute" in text else None]
    assert "| 0 | 24 | 12 | 18 | 0.970 | 0.040 |" in section and "| 1 | 24 | never | never | 0.600 | 0.300 |" in section
    assert md_cell(section, "gcache", "reads needed") == "0.833"
    assert md_cell(section, "single", "distractors read/q") == "0.00"
    assert "| train | 4 | 0.750 | 0.250 | 1.00 | room (3), door (1) |" in section
    assert "| locker | 2 | 1.000 | 0.500 | 0.50 | room (1) |" in section


def test_first_step_over_or_under_a_threshold():
    from gcache.stats import first_step

    history = [{"step": 0, "p": 0.5}, {"step": 6, "p": 0.9}, {"step": 12, "p": 0.95}, {"step": 18, "p": 0.99}]
    assert first_step(history, "p", above=0.9) == 12.0
    assert first_step(history, "p", above=0.99) is None
    assert first_step(history, "p", below=0.91) == 0.0 and first_step(history, "p", below=0.5) is None
    with pytest.raises(ValueError, match="exactly one of above= and below="):
        first_step(history, "p", above=0.5, below=0.9)


def test_routing_during_training_per_validation_step_and_what_was_confused_most():
    from gcache.stats import most_confused, routing_by_step

    def row(step, senders, keeper):
        return {"step": step, "id": f"q{keeper}", "judger_senders": senders, "oracle_edges": [[keeper, -1]]}

    completions = [row(0, [0, 1, 2, 3], 2), row(0, [0, 2], 1), row(0, [1], 1), row(0, [3], 2),
                   row(6, [2], 2), row(6, [1, 0], 1), row(12, [2], 2), {"step": 12, "id": "x"}]  # no graph: skipped
    during = routing_by_step(completions)
    assert list(during) == ["0", "6", "12"]
    assert during["0"]["reads_needed"] == 0.5 and during["0"]["exact"] == 0.25
    assert during["0"]["distractors_per_question"] == pytest.approx((3 + 2 + 0 + 1) / 4)
    # Needed 2 read 3 twice (q0, q3), 0 and 1 once; needed 1 read 0 and 2 once each.
    assert most_confused(during["0"]) == [("2", 3, 2), ("1", 0, 1), ("1", 2, 1)]
    assert during["12"]["exact"] == 1.0 and most_confused(during["12"]) == []

    summary = aggregate({0: [record(0, "gcache", 1.0)]}, iterations=10)
    summary.update(routing_during_training=during, agents=["door", "locker", "train", "room"])
    text = study_markdown(summary, "during")
    assert "| 0 | 4 | 0.500 | 0.250 | 1.50 | train → room (2), locker → door (1), locker → train (1) |" in text
    assert "| 12 | 1 | 1.000 | 1.000 | 0.00 | none |" in text
