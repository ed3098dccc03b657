"""Code rewards that trivial replies cannot earn: an output of another kind, length, set of
keys or numpy shape than the expected value fails its input, and numpy values compare at 64
bits (see ``code_eval``: ``_gcache_unlike``, the decoder).

The scan hands every HumanEval+ and MBPP+ harness the notes that a reply's recorder would send
(made by the recorder's own codec) and runs the harness's test on them, many problems and
replies to a process; a smaller sample goes through the sandbox end to end, both runs, and
must agree with it."""

from __future__ import annotations

import collections
import json
import logging
import math
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gcache.tasks.code_eval import FOOTER, HARNESS_HEADER, HEADER
from gcache.tasks.humaneval import HumanEvalPlus
from gcache.tasks.mbppplus import MbppPlus

log = logging.getLogger(__name__)

# name -> what the reply returns, whatever its arguments (`args`)
TRIVIAL = {
    "[]": "[]",
    "()": "()",
    "None": "None",
    "0": "0",
    "0.0": "0.0",
    '""': '""',
    "{}": "{}",
    "True": "True",
    "False": "False",
    "inf": "float('inf')",
    "nan": "float('nan')",
    "echo": "args[0]",
    "float16(0)": "numpy.float16(0)",
    "array([])": "numpy.array([])",
}

# Problems where a trivial reply passes, and why: the only ones. No other problem expects one
# of these values (or the first argument) for every input, so no trivial reply is right.
CHECKS_NOTHING = (
    "the OriginFmt assertion computes `exact_match = exp == (out is not None)` and never "
    "asserts it (EvalPlus's own evaluator asserts it): every output passes"
)
TRIVIAL_PASSES = {f"Mbpp/{n}": CHECKS_NOTHING for n in (737, 787, 794)}


# Runs harness tests in one process: each problem's test once per trial (a list of recorder
# notes) in a fresh copy of the harness's globals, as a harness program runs it once, with
# SANDBOX_TALLY counting here instead of in the sandbox. A trial stops at its first failing
# input: the rest cannot make it pass.
_SCAN = r'''
import json, sys


class _ScanFailed(BaseException):
    pass


def _scan(problems):
    """{problem id: {trial: [passed as the scorer counts a pass, the first failure]}}."""
    harness, verdicts = dict(globals()), {}
    for problem in problems:
        code = compile(problem["test"], "<harness>", "exec")
        verdicts[problem["id"]] = trials = {}
        for name, records in problem["trials"].items():
            counts = {}

            def SANDBOX_TALLY(tally, amount=1, note=None):
                if tally == "failed":
                    raise _ScanFailed(note)
                counts[tally] = counts.get(tally, 0) + amount

            globals()["_gcache_records"] = records  # where _gcache_output reads them
            try:
                exec(code, dict(harness, SANDBOX_TALLY=SANDBOX_TALLY))
            except _ScanFailed as failed:
                trials[name] = [False, failed.args[0]]
                continue
            except BaseException as exc:
                trials[name] = [False, f"{type(exc).__name__}: {exc}"[:300]]
                continue
            total = counts.get("total")
            trials[name] = [counts.get("finished") == 1 and total is not None
                            and 0 < total == counts.get("passed") == len(records), ""]
    return verdicts


print("\n" + json.dumps(_scan(json.loads(sys.stdin.read()))))
'''


def recorder_notes(example, replies: dict[str, str], solution: str = "") -> dict[str, list[str]]:
    """Per reply (an expression of `args`, with numpy, collections and `solution`'s names),
    the notes its recorder sends: one per input, by the recorder's own codec."""
    namespace = {}
    exec(HEADER, namespace)
    note, error = namespace["_gcache_note"], namespace["_gcache_error"]
    inputs = eval(example.meta["inputs"], {"inf": math.inf, "nan": math.nan})
    names = {"numpy": np, "collections": collections}
    exec(solution, names)
    trials = {}
    for name, expression in replies.items():
        reply = eval(f"lambda *args: {expression}", names)
        sent, notes = [0], []
        for inp in inputs:
            try:
                notes.append(note(reply(*inp), sent))
            except Exception as exc:
                notes.append(error(exc))
        trials[name] = notes
    return trials


def reference_solution(example) -> str:
    """The canonical solution's code, with what it needs from the problem."""
    return "\n".join(example.meta.get("test_imports", [])) + "\n" + example.answer


def scan_chunk(examples, replies: dict[str, str], with_solution: bool) -> dict[str, dict]:
    """{example id: {reply name: [passed, first failure]}} for `examples`, from one process
    (which imports numpy once: most of a small harness's time)."""
    problems = [
        {
            "id": ex.id,
            "test": ex.meta["test"] + FOOTER,
            "trials": recorder_notes(ex, replies, reference_solution(ex) if with_solution else ""),
        }
        for ex in examples
    ]
    run = subprocess.run(
        [sys.executable, "-I", "-c", HARNESS_HEADER + _SCAN],
        input=json.dumps(problems),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().rsplit("\n", 1)[-1])


def scan(examples, replies=TRIVIAL, *, with_solution=False, chunks=16) -> dict[str, dict]:
    """{example id: {reply name: [passed, first failure]}}: `chunks` processes, two at a time.
    With `with_solution` the replies can call the problem's canonical solution."""
    parts = [examples[k::chunks] for k in range(chunks) if examples[k::chunks]]
    verdicts = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for part in pool.map(lambda part: scan_chunk(part, replies, with_solution), parts):
            verdicts.update(part)
    return verdicts


def passing(verdicts: dict[str, dict[str, list]]) -> dict[str, list[str]]:
    """{reply name: sorted ids of the problems it passes}."""
    ids: dict[str, list[str]] = {}
    for example_id, by_reply in verdicts.items():
        for name, (passed, _) in by_reply.items():
            ids.setdefault(name, [])
            if passed:
                ids[name].append(example_id)
    return {name: sorted(found) for name, found in ids.items()}


@pytest.fixture(scope="module")
def tasks():
    return {"humaneval": HumanEvalPlus(max_workers=2), "mbpp": MbppPlus(max_workers=2)}


@pytest.fixture(scope="module")
def problems(tasks):
    """Every HumanEval+ and MBPP+ problem, by id."""
    return {ex.id: ex for task in tasks.values() for ex in task.load_examples()}


def test_each_test_gets_the_check_its_assertion_calls_for(problems):
    """"same" wherever the assertion compares out with exp as they are; "set" where it compares
    their sets (EvalPlus's MBPP_OUTPUT_SET_EQ_TASKS); none for the not-None assertion and
    HumanEval/32 (whose loop computes a polynomial of the output, with no expected value)."""
    checks = {}
    for example_id, ex in problems.items():
        (line,) = [line for line in ex.meta["test"].split("\n") if "_gcache_output(i" in line]
        check = re.search(r"check='(\w+)'", line)
        checks.setdefault(check and check.group(1), set()).add(example_id)
    sets = {f"Mbpp/{n}" for n in (2, 7, 111, 140, 232, 579, 769)}
    assert checks.pop("set") == sets
    assert checks.pop(None) == {"HumanEval/32", *TRIVIAL_PASSES}
    assert set(checks) == {"same"} and len(checks["same"]) == 542 - len(sets) - 4


def test_trivial_replies_pass_only_problems_whose_test_checks_nothing(problems):
    """All 14 trivial replies on all 542 problems (~20 s on 2 cores): each passes only the
    problems listed in TRIVIAL_PASSES. Before the kind/length/shape check and the 64-bit
    decoding, `[]` and `()` passed 30 problems (np.allclose([], 3.5) is true)."""
    examples = list(problems.values())
    assert len(examples) == 164 + 378 and not any(ex.meta["broken"] for ex in examples)
    start = time.monotonic()
    verdicts = scan(examples)
    log.info("trivial-reply scan: %d problems x %d replies in %.1f s",
             len(examples), len(TRIVIAL), time.monotonic() - start)
    assert set(verdicts) == set(problems)
    found = passing(verdicts)
    wrong = {name: [i for i in ids if i not in TRIVIAL_PASSES] for name, ids in found.items()}
    assert wrong == {name: [] for name in TRIVIAL}, wrong
    assert found == {name: sorted(TRIVIAL_PASSES) for name in TRIVIAL}  # the list is not stale


E2E_PROBLEMS = ["HumanEval/2", "HumanEval/55", "Mbpp/2", "Mbpp/14", "Mbpp/737"]


def test_trivial_replies_score_in_the_sandbox_as_in_the_scan(tasks, problems):
    """Real replies, both sandbox runs, on a sample (a float, an int, a set-compared, a
    float-by-division and a check-nothing problem): the scan's verdicts, reward 0 but where
    TRIVIAL_PASSES says."""
    examples = [problems[i] for i in E2E_PROBLEMS]
    verdicts = scan(examples, chunks=1)
    for ex in examples:
        task = tasks["humaneval" if ex.id.startswith("HumanEval/") else "mbpp"]
        entry = ex.meta["entry_point"]
        replies = [f"```python\nimport numpy\ndef {entry}(*args):\n    return {expr}\n```"
                   for expr in TRIVIAL.values()]
        details = task.score_details(replies, [ex] * len(replies))
        rewards = dict(zip(TRIVIAL, (d["reward"] for d in details), strict=True))
        assert rewards == {name: float(v[0]) for name, v in verdicts[ex.id].items()}, ex.id
        assert set(rewards.values()) == {1.0 if ex.id in TRIVIAL_PASSES else 0.0}, ex.id


def test_a_float16_fib_fails_in_the_sandbox(tasks, problems):
    """numpy.float16(3000) == 3001: a fib returning float16 infinity past n = 24 passed all 45
    inputs of HumanEval/55 while the harness compared numpy scalars at the reply's precision."""
    reply = (
        "```python\nimport numpy\ndef fib(n):\n    if n > 24:\n"
        "        return numpy.float16('inf')\n    a, b = 0, 1\n    for _ in range(n):\n"
        "        a, b = b, a + b\n    return a\n```"
    )
    ex = problems["HumanEval/55"]
    (details,) = tasks["humaneval"].score_details([reply], [ex])
    inputs = eval(ex.meta["inputs"])
    assert details["reward"] == 0.0
    assert details["tests_passed"] == sum(n <= 24 for (n,) in inputs) < len(inputs)


# (problem, reply over the canonical solution, whether it passes): right answers of another
# number type, numpy scalar or mapping type pass; another container, a bool for a number (or
# the reverse), a one-item list or array for a number, a set's 0 for False fail. Each of
# the failing ones passed before (np.allclose broadcasts and ignores types; 1 == True).
VARIANTS = [
    ("HumanEval/2", "numpy.float64(truncate_number(*args))", True),
    ("HumanEval/2", "int(x) if (x := truncate_number(*args)) == 0 else x", True),  # 0 for 0.0
    ("HumanEval/55", "numpy.int64(fib(*args))", True),
    ("HumanEval/55", "float(fib(*args)) if args[0] < 70 else fib(*args)", True),  # exact floats
    ("HumanEval/0", "numpy.bool_(has_close_elements(*args))", True),
    ("HumanEval/111", "collections.Counter(histogram(*args))", True),
    ("Mbpp/88", "dict(freq_count(*args))", True),  # a dict where a Counter is expected
    ("Mbpp/2", "list(similar_elements(*args))", True),  # the test compares sets
    ("HumanEval/21", "tuple(rescale_to_unit(*args))", False),
    ("HumanEval/4", "[mean_absolute_deviation(*args)]", False),
    ("HumanEval/2", "numpy.array([truncate_number(*args)])", False),
    ("HumanEval/0", "int(has_close_elements(*args))", False),
    ("Mbpp/2", "tuple(int(x) if type(x) is bool else x for x in similar_elements(*args))", False),
]


def test_right_values_of_another_number_type_pass_and_other_kinds_fail(problems):
    by_problem: dict[str, dict[str, str]] = {}
    for example_id, expression, _ in VARIANTS:
        by_problem.setdefault(example_id, {})[expression] = expression
    verdicts = {}
    for example_id, replies in by_problem.items():
        verdicts.update(scan([problems[example_id]], replies, with_solution=True, chunks=1))
    results = {(i, e): verdicts[i][e][0] for i, e, _ in VARIANTS}
    assert results == {(i, e): passes for i, e, passes in VARIANTS}, {
        (i, e): verdicts[i][e][1][:200] for i, e, _ in VARIANTS
    }


def harness():
    namespace = {}
    exec(HARNESS_HEADER, namespace)
    return namespace


def test_outputs_must_have_the_expected_kind_length_keys_and_shape():
    unlike = harness()["_gcache_unlike"]
    alike = [
        (3, 3.0), (3.0, 3), (1j, 1.0), ([1, 2.0], [1.0, 2]), ((1, "a"), (2, "b")),
        ({"a": [1]}, Counter(a=[1])), (frozenset({1}), {1.0}), (None, None), ("", "x"),
        (np.zeros((2, 3)), np.ones((2, 3))), ({1: {2: (3,)}}, {1.0: {2: (3.5,)}}),
    ]  # fmt: skip
    for out, exp in alike:  # the values themselves are the test's comparison's to judge
        assert unlike(out, exp) is None, (out, exp)
    unlike_ = [  # (output, expected, why not)
        ([], 3.5, " is list, not float"),
        ((), [1.0], " is tuple, not list"),
        ([1.0], 1.0, " is list, not float"),
        (True, 1, " is bool, not int"),
        (0, False, " is int, not bool"),
        (None, 0, " is NoneType, not int"),
        ("1", 1, " is str, not int"),
        ([1, 2], [1], " has 2 items, not 1"),
        ([[1], [2, 3]], [[1], [2]], "[1] has 2 items, not 1"),
        ([(1, True)], [(1, 1)], "[0][1] is bool, not int"),
        ({"a": 1}, {"b": 1}, " has other keys"),
        ({1: 1}, {True: 1}, " key True is int, not bool"),
        ({"a": [1]}, {"a": (1,)}, "['a'] is list, not tuple"),
        ({1, 2}, {True, 2}, " item True is int, not bool"),
        ({1, 2}, {1, 2, 3}, " has 2 items, not 3"),
        (np.zeros(0), np.zeros(3), " has shape (0,), not (3,)"),
        (np.zeros(3), [0.0] * 3, " is ndarray, not list"),
    ]
    for out, exp, reason in unlike_:
        assert unlike(out, exp) == reason, (out, exp)


def test_set_compared_outputs_are_checked_item_by_item():
    """Where the test compares set(out) with set(exp), any iterable container will do, but its
    items are checked like any output."""
    h, recorder = harness(), {}
    exec(HEADER, recorder)
    h["_gcache_records"] = [recorder["_gcache_note"](v, [0]) for v in ([1, 2], (0, 2), "ab")]
    assert h["_gcache_output"](0, (2, 1), check="set") == [1, 2]
    with pytest.raises(AssertionError, match="the output's set item False is int, not bool"):
        h["_gcache_output"](1, (False, 2), check="set")
    assert h["_gcache_output"](2, ("a", "b"), check="set") == "ab"  # not a container: the test's
    assert h["_gcache_output"](1, (False, 2)) == (0, 2)  # no check asked: the test's own
    with pytest.raises(AssertionError, match="the output is tuple, not list"):
        h["_gcache_output"](1, [0, 2], check="same")

