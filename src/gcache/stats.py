"""Statistics for comparing methods over seeds and questions: intervals, paired tests, a study
summary, its Markdown tables and its pictures. Every seed is evaluated on the same questions, so
pooled comparisons take questions, not (seed, question) pairs, as the independent units.

Pure functions over the records `gcache.evaluate` writes to results.jsonl (one dict per
(question, method): "id", "method", "reward" 0/1 or None, "decoded_tokens", "prompt_tokens",
"seconds", ...) and over training histories (one dict per logging point: "step",
"val/accuracy", "val/p_oracle", "val/p_distractor", "reward", any of them possibly missing; files
written before issue 30 say "p_oracle" and "p_distractor": `history_rows`).
No torch, no model: `gcache.study` feeds these functions and writes what they return.

    summary = aggregate({0: records_seed0, 1: records_seed1, 2: records_seed2})
    Path("study.md").write_text(study_markdown(summary, "arith, 3 seeds"))
    study_figures(summary, {0: history0, 1: history1, 2: history2}, Path("."))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ALPHA = 0.05
# Bootstrap resamples are drawn in blocks so memory stays at about this many indices.
_BLOCK_INDICES = 2_000_000
# The exact sign-flip test on the integer grid costs questions x (2 x sum + 1) operations: up to this.
SIGN_FLIP_GRID = 2e8


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved at 0 and 1 and small n)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """Exact McNemar test of two methods' correctness on the same questions (a[i], b[i] paired).

    b10 counts questions a got right and b wrong, b01 the reverse. Under the null the b01 + b10
    discordant pairs split like a fair coin, so the two-sided p-value is
    min(1, 2 * P[Binomial(b01 + b10, 1/2) <= min(b01, b10)]), exact; 1.0 with no discordant pairs.
    """
    if len(a) != len(b):
        raise ValueError(f"paired lists differ in length: {len(a)} vs {len(b)}")
    b10 = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b01 = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    discordant = b01 + b10
    tail = sum(math.comb(discordant, k) for k in range(min(b01, b10) + 1))
    p = min(1.0, 2 * tail / 2**discordant)  # no discordant pairs: 2 * 1 / 1, capped to 1
    return {"n": len(a), "b01": b01, "b10": b10, "p_value": float(p)}


def _resampled_means(rng: np.random.Generator, scores: np.ndarray, count: int) -> np.ndarray:
    """Means of `count` resamples (with replacement) of `scores`; (count,)."""
    n = len(scores)
    block = max(1, _BLOCK_INDICES // max(n, 1))
    out = np.empty(count)
    for start in range(0, count, block):
        stop = min(count, start + block)
        idx = rng.integers(0, n, size=(stop - start, n))  # (block, n)
        out[start:stop] = scores[idx].mean(axis=1)
    return out


def _percentile_ci(samples: np.ndarray) -> list[float]:
    low, high = np.percentile(samples, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return [float(low), float(high)]


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, iterations: int = 10000, seed: int = 0
) -> dict[str, Any]:
    """Paired bootstrap of mean(a) - mean(b) over the same questions (a[i], b[i] paired).

    Questions are resampled with replacement, keeping pairs together; the 95% interval is the
    percentile interval of the resampled differences. The two-sided p-value is twice the smaller
    share of resampled differences on either side of zero (each share counted with +1 so it is
    never 0), capped at 1: it is below 0.05 about when the interval excludes zero.
    """
    if len(a) != len(b):
        raise ValueError(f"paired lists differ in length: {len(a)} vs {len(b)}")
    if not a:
        return {"n": 0, "diff": None, "ci95": None, "p_value": None, "iterations": iterations}
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)  # (n,)
    boot = _resampled_means(np.random.default_rng(seed), diffs, iterations)  # (iterations,)
    below = (np.count_nonzero(boot <= 0) + 1) / (iterations + 1)
    above = (np.count_nonzero(boot >= 0) + 1) / (iterations + 1)
    return {
        "n": len(diffs),
        "diff": float(diffs.mean()),
        "ci95": _percentile_ci(boot),
        "p_value": float(min(1.0, 2 * min(below, above))),
        "iterations": iterations,
    }


def seed_question_interval(
    scores: Any, *, iterations: int = 10000, seed: int = 0
) -> dict[str, Any]:
    """Mean accuracy over seeds with a 95% interval that counts both sources of variation.

    scores: (seeds, questions), question q in the same column for every seed, NaN where a seed did
    not score it. Two-way bootstrap: each iteration draws as many seeds as there are and as many
    questions as there are, both with replacement, the drawn questions the same for every drawn seed
    (the seeds answer the same questions: resampling each seed's questions on its own would count a
    question repeated over seeds as new evidence, and the interval would narrow with every seed);
    its value is the mean over the drawn seeds of each one's mean over its scored drawn questions.
    The interval is the 2.5 and 97.5 percentiles of these values; the point estimate is the mean
    of the per-seed means. With one seed this is a plain bootstrap over questions. Seeds without
    scores are left out; with none left mean and interval are None.
    """
    matrix = np.atleast_2d(np.asarray(scores, dtype=float))
    if matrix.size:
        matrix = matrix[~np.all(np.isnan(matrix), axis=1)]  # seeds with scores
        matrix = matrix[:, ~np.all(np.isnan(matrix), axis=0)] if len(matrix) else matrix  # questions scored
    result = {"mean": None, "ci95": None, "seeds": len(matrix) if matrix.size else 0,
              "questions": matrix.shape[1] if matrix.size else 0, "method": "seed x question bootstrap"}
    if not matrix.size:
        return result
    n_seeds, n_questions = matrix.shape
    scored = (~np.isnan(matrix)).astype(float).T  # (questions, seeds)
    values = np.nan_to_num(matrix).T  # (questions, seeds)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_INDICES // max(n_questions, n_seeds))
    boot = np.empty(iterations)
    for start in range(0, iterations, block):
        count = min(block, iterations - start)
        # how often each question / seed is drawn in each resample (a draw of indices, counted)
        questions = rng.multinomial(n_questions, np.full(n_questions, 1 / n_questions), size=count)  # (c, Q)
        seeds = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=count)  # (c, S)
        sums, counts = questions @ values, questions @ scored  # (c, S) per seed over the drawn questions
        means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        weights = seeds * (counts > 0)  # a drawn seed that scored none of the drawn questions drops out
        boot[start : start + count] = (weights * means).sum(1) / np.maximum(weights.sum(1), 1)
    per_seed = np.nanmean(matrix, axis=1)  # (S,)
    result.update(mean=float(per_seed.mean()), ci95=_percentile_ci(boot))
    return result


def _question_sums(diffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per question: sum of the scored differences over seeds and how many seeds scored it;
    questions no seed scored are dropped. diffs: (seeds, questions), NaN = not scored."""
    diffs = np.atleast_2d(np.asarray(diffs, dtype=float))
    counts = np.count_nonzero(~np.isnan(diffs), axis=0)  # (questions,)
    sums = np.nansum(diffs, axis=0)  # (questions,)
    keep = counts > 0
    return sums[keep], counts[keep]


def sign_flip_test(diffs: Any, *, iterations: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Paired permutation test of "no difference" with questions as the units.

    diffs: (seeds, questions) of reference minus method, NaN where a pair is not scored. Seeds
    reuse the same questions, so pairs are not independent; questions are. Under the null the
    two methods are exchangeable on each question, so each question's sum over seeds T_q is as
    likely to have either sign; the statistic is S = sum_q T_q (so diff = S / pairs) and the
    two-sided p-value is P(|sum_q ±T_q| >= |S|) over the sign flips. Exact when every T_q is a
    whole number (0/1 rewards; computed on the integer grid while questions x grid size <=
    `SIGN_FLIP_GRID`, about 10,000 discordant questions of one seed) or when at most 16 questions
    have T_q != 0 (enumeration); otherwise Monte Carlo with `iterations` seeded draws,
    (hits + 1) / (iterations + 1). "how" says which, and why. One seed of 0/1 rewards gives
    McNemar's p.
    """
    sums, counts = _question_sums(diffs)
    pairs = int(counts.sum())
    result = {"questions": len(sums), "pairs": pairs, "nonzero": 0, "diff": None, "p_value": None,
              "exact": True, "iterations": 0, "method": "sign-flip permutation over questions", "how": "exact"}
    if not pairs:
        return result
    t = np.abs(sums[sums != 0])  # (m,) only questions whose seeds do not cancel can flip S
    observed = abs(float(sums.sum()))
    result.update(nonzero=len(t), diff=float(sums.sum() / pairs))
    if not len(t):
        result["p_value"] = 1.0
        return result
    whole = bool(np.all(t == np.round(t)))
    if whole and len(t) * (2 * t.sum() + 1) <= SIGN_FLIP_GRID:
        p = _sign_flip_integer(t.astype(np.int64), int(round(observed)))
        result["how"] = "exact (integer grid)"
    elif len(t) <= 16:
        signs = 1 - 2 * ((np.arange(2 ** len(t))[:, None] >> np.arange(len(t))) & 1)  # (2^m, m)
        p = float(np.mean(np.abs(signs @ t) >= observed - 1e-9 * t.sum()))
        result["how"] = "exact (enumeration)"
    else:
        rng = np.random.default_rng(seed)
        block = max(1, _BLOCK_INDICES // len(t))
        hits = 0
        for start in range(0, iterations, block):
            signs = 1 - 2 * rng.integers(0, 2, size=(min(block, iterations - start), len(t)))
            hits += int(np.count_nonzero(np.abs(signs @ t) >= observed - 1e-9 * t.sum()))
        p = (hits + 1) / (iterations + 1)
        why = "fractional rewards" if not whole else f"{len(t)} questions past the exact grid's size"
        result.update(exact=False, iterations=iterations, how=f"Monte Carlo ({iterations} draws; {why})")
    result["p_value"] = float(min(1.0, p))
    return result


def _sign_flip_integer(t: np.ndarray, observed: int) -> float:
    """P(|sum ±t_i| >= observed) for fair independent signs; t: (m,) positive integers. The
    distribution of the sum is built one question at a time on the grid -sum(t)..sum(t)."""
    total = int(t.sum())
    dist = np.zeros(2 * total + 1)  # dist[total + s] = P(sum = s)
    dist[total] = 1.0
    for v in t:  # the support stays within +-total, so np.roll never wraps anything non-zero
        dist = 0.5 * (np.roll(dist, int(v)) + np.roll(dist, -int(v)))
    grid = np.abs(np.arange(-total, total + 1))
    return float(dist[grid >= observed].sum())


def cluster_bootstrap(diffs: Any, *, iterations: int = 10000, seed: int = 0) -> dict[str, Any]:
    """95% interval of the pooled mean difference, resampling questions (with all their seeds).

    diffs: (seeds, questions) of reference minus method, NaN where a pair is not scored. Each
    resample draws as many questions as there are, with replacement, keeping every seed's pair of
    a drawn question; its value is the mean over the drawn pairs (sum of T_q / sum of counts).
    Resampling (seed, question) pairs instead would treat repeats of a question as new evidence.
    """
    sums, counts = _question_sums(diffs)
    n = len(sums)
    result = {"questions": n, "pairs": int(counts.sum()), "diff": None, "ci95": None,
              "iterations": iterations, "method": "cluster bootstrap over questions"}
    if not n:
        return result
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_INDICES // n)
    boot = np.empty(iterations)
    for start in range(0, iterations, block):
        stop = min(iterations, start + block)
        idx = rng.integers(0, n, size=(stop - start, n))  # (block, questions)
        boot[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    result.update(diff=float(sums.sum() / counts.sum()), ci95=_percentile_ci(boot))
    return result


def _correct(reward: float) -> bool:
    # Rewards are 0/1; anything above one half counts as a right answer.
    return reward > 0.5


def _mean_of(rows: Sequence[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(sum(values) / len(values)) if values else None


def _by_method(records: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """method -> question id -> record; a later duplicate of a (question, method) replaces it."""
    out: dict[str, dict[str, dict]] = {}
    for r in records:
        out.setdefault(r["method"], {})[str(r["id"])] = r
    return out


def aggregate(
    records_by_seed: Mapping[int, Sequence[dict]],
    reference: str = "gcache",
    *,
    iterations: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """Study summary of evaluation records from several seeds (all values JSON-serialisable).

    "methods" (in first-seen order): accuracy = mean over seeds of each seed's accuracy on its
    scored questions, "ci95" from `seed_question_interval`, "per_seed" accuracies with Wilson
    intervals, and decoded/prompt tokens and seconds per question over all records.
    "comparisons" (every method but `reference`): per seed, McNemar and a paired bootstrap of
    reference minus method on the questions both scored (reward not None); "pooled" over seeds:
    pair and question counts, b10/b01 summed, diff = mean over (seed, question) pairs, p_value
    from `sign_flip_test` ("permutation") and the interval from `cluster_bootstrap`
    ("bootstrap"), both with questions as the units since every seed repeats them;
    "significant_every_seed" is true when every seed has pairs, p < 0.05 and more questions
    only the reference got right than only the method did.
    """
    seeds = list(records_by_seed)
    tables = {s: _by_method(records_by_seed[s]) for s in seeds}
    names = list(dict.fromkeys(r["method"] for s in seeds for r in records_by_seed[s]))
    methods = {name: _method_summary([tables[s].get(name, {}) for s in seeds], seeds, iterations, seed)
               for name in names}
    comparisons: dict[str, dict] = {}
    if reference in methods:
        for name in names:
            if name != reference:
                comparisons[name] = _comparison(
                    [(s, tables[s].get(reference, {}), tables[s].get(name, {})) for s in seeds], reference,
                    iterations, seed)
    routing = {name: r for name in names
               if (r := routing_summary([row for s in seeds for row in tables[s].get(name, {}).values()]))}
    ablation = [{"part": part, "with": a, "without": b,
                 **_comparison([(s, tables[s].get(a, {}), tables[s].get(b, {})) for s in seeds], a, iterations, seed)}
                for a, b, part in ablation_pairs(records_by_seed)]
    return {"reference": reference, "seeds": seeds, "methods": methods, "comparisons": comparisons,
            "routing": routing, **({"ablation": ablation} if ablation else {})}


def ablation_pairs(records_by_seed: Mapping[int, Sequence[dict]]) -> list[tuple[str, str, str]]:
    """The pairs of methods that say what each trained part adds, among the methods evaluated: (with the
    part, without it, the part). `fixed-<topology>` is the graph `gcache-fuser-only` ran (its records'
    config), so the fuser alone is compared with that graph read plainly."""
    records = [r for rows in records_by_seed.values() for r in rows]
    names = {r["method"] for r in records}
    graph = next((r.get("config", {}).get("graph") for r in records if r["method"] == "gcache-fuser-only"), None)
    fixed = f"fixed-{graph}" if graph else None
    pairs = [("gcache", "gcache-policy-only", "the fuser, on the learned graph"),
             ("gcache-fuser-only", fixed, "the fuser alone, on every agent -> judger"),
             ("gcache", "gcache-fuser-only", "the learned graph, given the fuser"),
             ("gcache-policy-only", fixed, "the learned graph alone"),
             ("gcache-fuser-only", "gcache-fuser-other-question", "the fuser's signal of its own question")]
    return [(a, b, part) for a, b, part in pairs if a in names and b in names]


def routing_summary(records: Sequence[dict]) -> dict[str, Any] | None:
    """What the judger read against the task's oracle graph, over records that carry both
    `judger_senders` and `oracle_edges` (None when none does).

    Relevant = the agents of the oracle graph; needed = its senders into the judger (-1). Per
    record: "reads_needed" when the judger read every needed agent, "exact" when it also read
    no other agent, "distractors" = agents read outside the oracle graph. "by_needed" groups the
    records by their needed agents (e.g. "2": questions keeper 2 answers) with the same rates
    and how often each distractor was read ("confused": agent -> count, most read first).
    """
    rows = [r for r in records if r.get("oracle_edges") and r.get("judger_senders") is not None]
    if not rows:
        return None
    groups: dict[str, list[tuple[bool, bool, list[int]]]] = {}
    for r in rows:
        edges = [tuple(e) for e in r["oracle_edges"]]
        needed = sorted({i for i, j in edges if j == -1})
        relevant = {i for i, _ in edges} | {j for _, j in edges if j != -1}
        read = set(r["judger_senders"])
        distractors = sorted(read - relevant)
        reads_needed = set(needed) <= read
        groups.setdefault(",".join(map(str, needed)), []).append((reads_needed, reads_needed and not distractors,
                                                                    distractors))

    def rates(items):
        confused: dict[int, int] = {}
        for _, _, distractors in items:
            for d in distractors:
                confused[d] = confused.get(d, 0) + 1
        return {
            "questions": len(items),
            "reads_needed": sum(x[0] for x in items) / len(items),
            "exact": sum(x[1] for x in items) / len(items),
            "distractors_per_question": sum(len(x[2]) for x in items) / len(items),
            "confused": dict(sorted(confused.items(), key=lambda kv: (-kv[1], kv[0]))),
        }

    return {**rates([x for items in groups.values() for x in items]),
            "by_needed": {k: rates(groups[k]) for k in sorted(groups, key=lambda k: [int(x) for x in k.split(",")])}}


def routing_by_step(records: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """`routing_summary` of validation completions (records with a "step"), per step in order."""
    steps = sorted({int(r["step"]) for r in records if r.get("step") is not None})
    out = {}
    for step in steps:
        summary = routing_summary([r for r in records if r.get("step") == step])
        if summary:
            out[str(step)] = summary
    return out


def most_confused(routing: dict[str, Any], top: int = 3) -> list[tuple[str, int, int]]:
    """The `top` (needed agents, distractor read, times) pairs of a `routing_summary`, most frequent first."""
    pairs = [(needed, agent, count) for needed, r in routing["by_needed"].items()
             for agent, count in r["confused"].items()]
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))[:top]


def first_step(history: Sequence[dict], key: str, *, above: float | None = None,
               below: float | None = None) -> float | None:
    """The first step of `history` whose `key` is over `above` or under `below` (None if none was)."""
    if (above is None) == (below is None):
        raise ValueError("first_step: give exactly one of above= and below=")
    steps, values = _series(history, key)
    return next((step for step, value in zip(steps, values, strict=True)
                 if (value > above if above is not None else value < below)), None)


def _method_summary(rows_by_seed: list[dict], seeds: list[int], iterations: int, seed: int) -> dict[str, Any]:
    """One method of `aggregate`: its records by seed ({question: record} per seed)."""
    per_seed, score_lists, rows_all = [], [], []
    questions = list(dict.fromkeys(q for table in rows_by_seed for q in table))
    matrix = []  # (seeds, questions): the interval resamples questions jointly over seeds
    for s, table in zip(seeds, rows_by_seed, strict=True):
        rows = list(table.values())
        if not rows:
            continue
        rows_all += rows
        matrix.append([float(table[q]["reward"]) if q in table and table[q].get("reward") is not None else np.nan
                       for q in questions])
        scores = [float(r["reward"]) for r in rows if r.get("reward") is not None]
        score_lists.append(scores)
        acc = sum(scores) / len(scores) if scores else None
        per_seed.append({
            "seed": s,
            "questions": len(rows),
            "scored": len(scores),
            "accuracy": float(acc) if acc is not None else None,
            "ci95": list(wilson_interval(sum(scores), len(scores))) if scores else None,
        })
    interval = seed_question_interval(np.array(matrix) if matrix else np.empty((0, 0)), iterations=iterations,
                                      seed=seed)
    return {
        "accuracy": interval["mean"],
        "ci95": interval["ci95"],
        "interval": interval["method"],
        "seeds": [p["seed"] for p in per_seed],
        "per_seed": per_seed,
        "questions": len(rows_all),
        "scored": sum(len(x) for x in score_lists),
        "decoded_tokens_per_question": _mean_of(rows_all, "decoded_tokens"),
        "prompt_tokens_per_question": _mean_of(rows_all, "prompt_tokens"),
        "seconds_per_question": _mean_of(rows_all, "seconds"),
        "agents_run_per_question": _mean_of(rows_all, "agents_run"),
        "handed_bytes_per_question": _mean_of(rows_all, "handed_bytes"),
    }


def _comparison(pairs: list[tuple[int, dict, dict]], reference: str, iterations: int, seed: int) -> dict[str, Any]:
    """The reference against one method of `aggregate`: (seed, reference's {question: record}, the
    method's) per seed; questions both scored."""
    per_seed, scored = [], []
    b10 = b01 = 0
    for s, ref_rows, other_rows in pairs:
        ids = [
            q for q in ref_rows
            if q in other_rows
            and ref_rows[q].get("reward") is not None
            and other_rows[q].get("reward") is not None
        ]
        ref = [float(ref_rows[q]["reward"]) for q in ids]
        other = [float(other_rows[q]["reward"]) for q in ids]
        scored.append({q: x - y for q, x, y in zip(ids, ref, other, strict=True)})
        mcnemar = mcnemar_exact([_correct(x) for x in ref], [_correct(x) for x in other])
        b10 += mcnemar["b10"]
        b01 += mcnemar["b01"]
        per_seed.append({
            "seed": s,
            "mcnemar": mcnemar,
            "bootstrap": paired_bootstrap(ref, other, iterations=iterations, seed=seed),
        })
    significant = bool(per_seed) and all(
        p["mcnemar"]["n"] > 0
        and p["mcnemar"]["p_value"] < ALPHA
        and p["mcnemar"]["b10"] > p["mcnemar"]["b01"]
        for p in per_seed
    )
    # The same questions recur over seeds: pooled inference treats questions as the units.
    questions = list(dict.fromkeys(q for d in scored for q in d))
    diffs = np.array([[d.get(q, np.nan) for q in questions] for d in scored])  # (seeds, questions)
    test = sign_flip_test(diffs, iterations=iterations, seed=seed)
    return {
        "reference": reference,
        "per_seed": per_seed,
        "pooled": {
            "pairs": test["pairs"],
            "questions": test["questions"],
            "b10": b10,
            "b01": b01,
            # both methods' accuracy on these same pairs (diff = their difference), which the method
            # table's accuracies (each on the questions it scored) need not equal
            "reference_accuracy": _mean(paired[0]) if (paired := _paired_rewards(pairs)) else None,
            "method_accuracy": _mean(paired[1]) if paired else None,
            "diff": test["diff"],
            "p_value": test["p_value"],
            "permutation": test,
            "bootstrap": cluster_bootstrap(diffs, iterations=iterations, seed=seed),
        },
        "significant_every_seed": significant,
    }


def _paired_rewards(pairs: list[tuple[int, dict, dict]]) -> tuple[list[float], list[float]] | None:
    """The reference's and the method's rewards over every (seed, question) pair both scored."""
    ref, other = [], []
    for _, ref_rows, other_rows in pairs:
        for q, row in ref_rows.items():
            if q in other_rows and row.get("reward") is not None and other_rows[q].get("reward") is not None:
                ref.append(float(row["reward"]))
                other.append(float(other_rows[q]["reward"]))
    return (ref, other) if ref else None


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def _fmt_ci(ci: Sequence[float] | None, spec: str = ".3f") -> str:
    if not ci:
        return "—"
    return f"{_fmt(ci[0], spec)} – {_fmt(ci[1], spec)}"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def study_markdown(summary: dict, title: str) -> str:
    """Markdown of an `aggregate` summary: a table per method, then the paired comparisons
    against the reference. Absent values print as "—"."""
    ref = summary["reference"]
    seeds = summary["seeds"]
    lines = [f"# {title}".rstrip(), ""]
    cols = ["method", "accuracy", "95% CI (seeds+questions)", "per seed", "decoded tok/q",
            "prompt tok/q", "s/q"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, m in summary["methods"].items():
        per_seed = ", ".join(f"{p['seed']}: {_fmt(p['accuracy'])}" for p in m["per_seed"]) or "—"
        lines.append(
            f"| {name} | {_fmt(m['accuracy'])} | {_fmt_ci(m['ci95'])} | {per_seed} | "
            f"{_fmt(m['decoded_tokens_per_question'], '.1f')} | "
            f"{_fmt(m['prompt_tokens_per_question'], '.1f')} | {_fmt(m['seconds_per_question'], '.2f')} |"
        )
    lines += ["", "accuracy = the mean over seeds of each seed's accuracy on the questions that method scored; "
              "95% CI = a bootstrap drawing seeds and questions, the same drawn questions for every seed."]
    if summary["comparisons"]:
        lines += [
            "",
            f"## Paired comparisons: {ref} minus each method",
            "",
            "On the (seed, question) pairs both methods scored, which the accuracies above need not be: "
            f"{ref} acc and method acc = their accuracies on these pairs, diff = {ref} minus method; p seed = exact "
            f"McNemar per seed; b10/b01 = (seed, question) pairs only {ref} / only the method got right.",
            "",
        ]
        cols = ["method", "questions", "pairs", f"{ref} acc", "method acc", "diff", "95% CI", "b10/b01"]
        cols += [f"p seed {s}" for s in seeds] + ["p pooled", "p pooled by", f"{ref} significantly better on every seed"]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        iterations = 0
        for name, c in summary["comparisons"].items():
            by_seed = {p["seed"]: p for p in c["per_seed"]}
            pooled = c["pooled"]
            p_seeds = [
                _fmt_p(by_seed[s]["mcnemar"]["p_value"]) if s in by_seed and by_seed[s]["mcnemar"]["n"] else "—"
                for s in seeds
            ]
            iterations = pooled["bootstrap"]["iterations"]
            row = [
                name, str(pooled["questions"]), str(pooled["pairs"]), _fmt(pooled.get("reference_accuracy")),
                _fmt(pooled.get("method_accuracy")), _fmt(pooled["diff"], "+.3f"),
                _fmt_ci(pooled["bootstrap"]["ci95"], "+.3f"), f"{pooled['b10']}/{pooled['b01']}",
                *p_seeds, _fmt_p(pooled["p_value"]), pooled["permutation"].get("how", "—") if pooled["pairs"] else "—",
                "yes" if c["significant_every_seed"] else "no",
            ]
            lines.append("| " + " | ".join(row) + " |")
        lines += [
            "",
            "p pooled is a paired sign-flip permutation test over questions (exact or Monte Carlo: "
            "column p pooled by) that flips all "
            "seeds of a question together, and the 95% CI is a cluster bootstrap that resamples "
            f"questions with all their seeds ({iterations} resamples), so a question repeated over "
            "seeds counts as one question, not as new evidence.",
        ]
    lines += ablation_markdown(summary)
    lines += routing_markdown(summary)
    lines += compute_markdown(summary)
    return "\n".join(lines) + "\n"


def ablation_markdown(summary: dict) -> list[str]:
    """"What each trained part adds": the `ablation` pairs of an `aggregate` summary (empty without)."""
    if not summary.get("ablation"):
        return []
    lines = ["", "## What each trained part adds", "",
             "Each row: the method with the part minus the method without it, on the (seed, question) pairs both "
             "scored; 95% CI = cluster bootstrap over questions, p = paired sign-flip test over questions.", ""]
    cols = ["part", "with", "without", "with acc", "without acc", "diff", "95% CI", "b10/b01", "p pooled"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in summary["ablation"]:
        pooled = row["pooled"]
        lines.append("| " + " | ".join([
            row["part"], row["with"], row["without"], _fmt(pooled.get("reference_accuracy")),
            _fmt(pooled.get("method_accuracy")), _fmt(pooled["diff"], "+.3f"), _fmt_ci(pooled["bootstrap"]["ci95"], "+.3f"),
            f"{pooled['b10']}/{pooled['b01']}", _fmt_p(pooled["p_value"])]) + " |")
    return lines


def routing_markdown(summary: dict) -> list[str]:
    """"Routing": how the graph learned (per seed, from the validation history in
    summary["training"]) and what each method's judger read against the oracle graph
    (summary["routing"]), with what the reference method confused. Agents are named by
    summary["agents"] when given. Empty without oracle graphs."""
    routing, training = summary.get("routing") or {}, summary.get("training") or {}
    names = summary.get("agents") or []

    def name(agents: str) -> str:  # "2" or "0,2" (a routing_summary key) -> "Train Keeper" or "agent 0 + …"
        return " + ".join(names[int(i)] if int(i) < len(names) else f"agent {i}" for i in str(agents).split(","))

    lines: list[str] = []
    learned = {s: t for s, t in training.items() if t.get("last_p_oracle") is not None}
    if learned:
        lines += ["", "Validation of the trained graph policy: p(oracle) is the mean probability "
                  "of the oracle graph's edges, p(distractor) of the other agents' edges into the judger.", "",
                  "| seed | steps | first step p(oracle) > 0.9 | first step p(distractor) < 0.1 | last p(oracle) "
                  "| last p(distractor) |",
                  "|---|---|---|---|---|---|"]

        def step(value) -> str:
            return "never" if value is None else f"{value:.0f}"

        for s, t in learned.items():
            lines.append(f"| {s} | {t.get('steps', '—')} | {step(t.get('first_step_p_oracle_above_0.9'))} | "
                         f"{step(t.get('first_step_p_distractor_below_0.1'))} | "
                         f"{_fmt(t['last_p_oracle'])} | {_fmt(t.get('last_p_distractor'))} |")
    during = summary.get("routing_during_training") or {}
    if during:
        lines += ["", "What the judger read on the validation questions during training (all seeds); most "
                  "confused = the distractors read most often, as needed agent → agent read (times).", "",
                  "| step | questions | reads needed | exact | distractors read/q | most confused |",
                  "|---|---|---|---|---|---|"]
        for step, r in during.items():
            confused = ", ".join(f"{name(needed)} → {name(agent)} ({n})"
                                 for needed, agent, n in most_confused(r)) or "none"
            lines.append(f"| {step} | {r['questions']} | {_fmt(r['reads_needed'])} | {_fmt(r['exact'])} | "
                         f"{_fmt(r['distractors_per_question'], '.2f')} | {confused} |")
    if routing:
        lines += ["", "What the judger read on the test questions: needed = the oracle graph's senders into the "
                  "judger; exact = those and no agent outside the oracle graph.", "",
                  "| method | reads needed | exact | distractors read/q |", "|---|---|---|---|"]
        for method, r in routing.items():
            lines.append(f"| {method} | {_fmt(r['reads_needed'])} | {_fmt(r['exact'])} | "
                         f"{_fmt(r['distractors_per_question'], '.2f')} |")
        ref = summary.get("reference")
        if ref in routing:
            lines += ["", f"What {ref} confused, by the agent the question needs (all seeds):", "",
                      "| needed | questions | reads needed | exact | distractors read/q | distractors read most |",
                      "|---|---|---|---|---|---|"]
            for needed, r in routing[ref]["by_needed"].items():
                most = ", ".join(f"{name(a)} ({n})" for a, n in list(r["confused"].items())[:3]) or "none"
                lines.append(f"| {name(needed)} | {r['questions']} | "
                             f"{_fmt(r['reads_needed'])} | {_fmt(r['exact'])} | "
                             f"{_fmt(r['distractors_per_question'], '.2f')} | {most} |")
    return ["", "## Routing", *lines] if lines else []


def compute_markdown(summary: dict) -> list[str]:
    """"Compute per question": what each method spent (prompt tokens, agents run, seconds, bytes the
    judger read from other agents) and its accuracy per unit of each, so a learned graph's saving
    against a fixed one is read next to what it costs in accuracy. Empty when no record has costs."""
    methods = summary["methods"]
    if not any(m.get("prompt_tokens_per_question") is not None for m in methods.values()):
        return []

    def per(acc, unit, scale=1.0):
        return None if acc is None or not unit else acc / unit * scale

    cols = ["method", "accuracy", "prompt tok/q", "agents run/q", "s/q", "bytes read/q",
            "acc per 1k prompt tok", "acc per agent run", "acc per s"]
    lines = ["", "## Compute per question", "",
             "Prompt tokens count every agent that ran and the judger; bytes read are the keys and values "
             "(or text) the judger read from other agents; the last three columns divide accuracy by each cost.",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, m in methods.items():
        acc, tokens, agents, secs = (m.get(k) for k in ("accuracy", "prompt_tokens_per_question",
                                                         "agents_run_per_question", "seconds_per_question"))
        lines.append("| " + " | ".join([
            name, _fmt(acc), _fmt(tokens, ".1f"), _fmt(agents, ".2f"), _fmt(secs, ".2f"),
            _fmt_bytes(m.get("handed_bytes_per_question")), _fmt(per(acc, tokens, 1000.0)),
            _fmt(per(acc, agents)), _fmt(per(acc, secs)),
        ]) + " |")
    return lines


def _fmt_bytes(value) -> str:
    if value is None:
        return "—"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


# history.jsonl before issue 30 named the edge probabilities without their split; readers accept both.
HISTORY_RENAMED = {"p_oracle": "val/p_oracle", "p_distractor": "val/p_distractor"}


def history_rows(history: Sequence[dict]) -> list[dict]:
    """history.jsonl rows under summary.json's metric names (`val/p_oracle`, `val/p_distractor`),
    whichever names they were written with (the current name wins where a row has both)."""
    rows = []
    for row in history:
        renamed = {HISTORY_RENAMED.get(k, k): v for k, v in row.items() if k in HISTORY_RENAMED}
        rows.append({**renamed, **{k: v for k, v in row.items() if k not in HISTORY_RENAMED}})
    return rows


def _series(history: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the points of `history` that carry a finite `key`."""
    points = [
        (float(h["step"]), float(h[key]))
        for h in history
        if h.get(key) is not None and math.isfinite(float(h[key])) and h.get("step") is not None
    ]
    return [p[0] for p in points], [p[1] for p in points]


def text_colour(rgba: Sequence[float]) -> str:
    """"black" or "white": the text colour of higher contrast on a background of colour `rgba`
    (WCAG relative luminance; black from a luminance of about 0.18 up)."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else "white"


def integer_steps(ax) -> None:
    """Whole training steps on the x axis (no 0.25-step ticks)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def accuracy_bars(ax, names: Sequence[str], accuracy: Sequence[float], err=None, colours=None) -> None:
    """Bars of accuracies on a 0-1 axis, each with its value written on it; a bar at 0 (no height)
    is drawn as a thick line at the base so that it is seen, not taken for a missing method."""
    colours = list(colours) if colours is not None else ["#4c72b0"] * len(names)
    x = list(range(len(names)))
    ax.bar(x, accuracy, yerr=err, capsize=4, color=colours, error_kw={"ecolor": "0.3"})
    for i, (value, colour) in enumerate(zip(accuracy, colours, strict=True)):
        if value <= 0:
            ax.plot([i - 0.4, i + 0.4], [0, 0], color=colour, lw=4, solid_capstyle="butt", clip_on=False,
                    zorder=4, gid="zero-bar")
        # beside the error bar's line (x = i), on the bar's top: above it, or inside when there is no room
        if value < 0.93:
            ax.text(i + 0.06, value + 0.015, f"{value:.2f}", ha="left", va="bottom", fontsize=8, color="black")
        else:  # in the colour that reads on the bar
            import matplotlib.colors as mcolors

            ax.text(i + 0.06, value - 0.015, f"{value:.2f}", ha="left", va="top", fontsize=8,
                    color=text_colour(mcolors.to_rgba(colour)))
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)


def study_figures(
    summary: dict, histories_by_seed: Mapping[int, Sequence[dict]], out_dir: Path, title: str = ""
) -> list[Path]:
    """Write curves.png (validation accuracy over steps per seed), edges.png (probability of
    oracle edges, solid, and distractor edges, dashed, per seed) and comparison.png (accuracy per
    method with 95% intervals); a picture whose data are absent is skipped. Each picture's title
    holds `title` (the study's task and model) and the study's directory. Histories may use the
    names of history.jsonl before issue 30 (`p_oracle`, `history_rows`). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    histories_by_seed = {s: history_rows(h) for s, h in histories_by_seed.items()}
    heading = " · ".join(part for part in (title, f"study {out_dir.resolve().name}") if part)

    def save(fig, name: str, what: str) -> None:
        path = out_dir / name
        fig.suptitle(f"{heading}\n{what}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    curves = {s: _series(h, "val/accuracy") for s, h in histories_by_seed.items()}
    if any(steps for steps, _ in curves.values()):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for i, (s, (steps, values)) in enumerate(curves.items()):
            if steps:
                ax.plot(steps, values, marker="o", ms=3, color=colours[i % len(colours)], label=f"seed {s}")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(-0.02, 1.02)
        integer_steps(ax)
        ax.legend()
        save(fig, "curves.png", "validation accuracy per seed (deterministic graph, greedy decoding)")

    edges = {
        s: (_series(h, "val/p_oracle"), _series(h, "val/p_distractor")) for s, h in histories_by_seed.items()
    }
    if any(o[0] or d[0] for o, d in edges.values()):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for i, (s, (oracle, distractor)) in enumerate(edges.items()):
            colour = colours[i % len(colours)]
            if oracle[0]:
                ax.plot(*oracle, color=colour, linestyle="-", label=f"seed {s} oracle")
            if distractor[0]:
                ax.plot(*distractor, color=colour, linestyle="--", label=f"seed {s} distractor")
        ax.set_xlabel("training step")
        ax.set_ylabel("edge probability")
        ax.set_ylim(-0.02, 1.02)
        integer_steps(ax)
        ax.legend(fontsize="small")
        save(fig, "edges.png", "validation: p(oracle edges), solid; p(distractor edges into the judger), dashed")

    rows = [(n, m) for n, m in summary.get("methods", {}).items() if m.get("accuracy") is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(rows) + 1.5), 4.2))
        names = [n for n, _ in rows]
        acc = [m["accuracy"] for _, m in rows]
        err = [
            [m["accuracy"] - m["ci95"][0] if m.get("ci95") else 0.0 for _, m in rows],
            [m["ci95"][1] - m["accuracy"] if m.get("ci95") else 0.0 for _, m in rows],
        ]
        reference = summary.get("reference")
        accuracy_bars(ax, names, acc, err, ["#c44e52" if n == reference else "#4c72b0" for n in names])
        # Each seed's accuracy as a dot on its method's bar: how much seeds disagree.
        for x, (_, m) in enumerate(rows):
            ys = [p["accuracy"] for p in m.get("per_seed", []) if p.get("accuracy") is not None]
            ax.scatter([x] * len(ys), ys, color="black", s=10, zorder=5, clip_on=False)
        ax.set_ylabel("accuracy (95% CI, seeds + questions)")
        save(fig, "comparison.png", "test accuracy per method; dots: each seed")
    return written
