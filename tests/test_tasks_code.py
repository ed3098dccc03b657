"""HumanEval+ and MBPP+: program assembly, per-test fractions, broken records, and the full
reference-solution check (slow)."""

from __future__ import annotations

import logging
import random
import time

import pytest

from gcache.tasks.code_eval import CodeTask, instrument_test, tally_lines
from gcache.tasks.humaneval import KNOWN_BROKEN as HE_BROKEN
from gcache.tasks.humaneval import TEST_FIXES, HumanEvalPlus
from gcache.tasks.humaneval import assemble_program as assemble_humaneval
from gcache.tasks.mbppplus import HEAVY_TESTS, MbppPlus
from gcache.tasks.mbppplus import KNOWN_BROKEN as MBPP_BROKEN
from gcache.tasks.mbppplus import assemble_program as assemble_mbpp
from gcache.tasks.sandbox import run_program

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def humaneval():
    return HumanEvalPlus(max_workers=2)


@pytest.fixture(scope="module")
def mbpp():
    return MbppPlus(max_workers=2)


def by_id(task, example_id):
    return next(ex for ex in task.load_examples() if ex.id == example_id)


def return_none(example) -> str:
    return f"```python\ndef {example.meta['entry_point']}(*args, **kwargs):\n    return None\n```"


def test_every_record_has_an_instrumented_test_loop(humaneval, mbpp):
    for ex in humaneval.load_examples() + mbpp.load_examples():
        assert 'SANDBOX_TALLY("total", len(inputs))' in ex.meta["test"], ex.id
        assert ex.meta["entry_point"], ex.id


def test_a_code_task_must_say_how_its_program_is_assembled(humaneval):
    class NoHarness(CodeTask):
        name = "no-harness"

        def _load(self):
            return []

        def target_text(self, example):
            return example.answer

    with pytest.raises(TypeError, match="assemble_program"):
        NoHarness()
    assert humaneval.assemble_program is assemble_humaneval  # the task's own harness scores its replies


def test_instrument_test_leaves_unknown_formats_alone():
    test = "def check(candidate):\n    assert candidate(1) == 2\n"
    assert instrument_test(test) == (test, False)


def test_questions_show_the_problem(humaneval, mbpp):
    he = by_id(humaneval, "HumanEval/0")
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in he.question
    assert he.question.startswith("Complete the following Python function")
    mb = by_id(mbpp, "Mbpp/2")
    assert mb.question.startswith(
        "Write a function to find the shared elements from the given two lists."
    )
    assert "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))" in mb.question
    assert mb.meta["entry_point"] == "similar_elements"
    assert humaneval.domain == mbpp.domain == "code"


def test_reference_round_trip_and_wrong_answer(humaneval, mbpp):
    for task, ids in [(humaneval, ["HumanEval/0", "HumanEval/32"]), (mbpp, ["Mbpp/2", "Mbpp/793"])]:
        examples = [by_id(task, i) for i in ids]
        replies = [f"Here is my solution.\n{task.target_text(ex)}\nDone." for ex in examples]
        replies += [return_none(ex) for ex in examples]
        assert task.reward(replies, examples + examples) == [1.0, 1.0, 0.0, 0.0]


def test_fraction_counts_test_inputs(humaneval):
    ex = by_id(humaneval, "HumanEval/0")
    partial = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    details = humaneval.score_details([partial, humaneval.target_text(ex)], [ex, ex])
    assert details[0]["reward"] == 0.0 and details[0]["status"] == "failed"
    assert 0.0 < details[0]["fraction"] < 1.0
    assert details[0]["tests_total"] == details[1]["tests_total"] > 7  # base (7) + plus inputs
    assert details[0]["tests_passed"] < details[0]["tests_total"]
    assert "test " in details[0]["message"] and "AssertionError" in details[0]["message"]
    assert details[1]["fraction"] == 1.0 and details[1]["tests_passed"] == details[1]["tests_total"]


def test_body_only_completion_continues_the_prompt(humaneval):
    ex = by_id(humaneval, "HumanEval/2")  # truncate_number
    body = "    return number % 1.0\n"
    assert humaneval.reward([body], [ex]) == [1.0]
    assert humaneval.reward(["return number % 1.0"], [ex]) == [1.0]  # unindented body gets indented


def test_early_sys_exit_does_not_pass(humaneval, mbpp):
    he, mb = by_id(humaneval, "HumanEval/2"), by_id(mbpp, "Mbpp/2")
    cheat = "```python\nimport sys\ndef {}(*args):\n    sys.exit(0)\n```"
    details = humaneval.score_details([cheat.format("truncate_number")], [he])
    details += mbpp.score_details([cheat.format("similar_elements")], [mb])
    assert [d["reward"] for d in details] == [0.0, 0.0]
    assert all(d["status"] == "failed" for d in details)


# Replies that try to score without passing. The first five score 1.0 on main's sandbox
# (results in SANDBOX_DETAILS / a report file the program could reach); the marker never did.
FORGERIES = {
    "details_then_exit": (
        "import sys\n"
        "SANDBOX_DETAILS.update(tests_passed=1, tests_failed=0, tests_total=1, finished=True)\n"
        "sys.exit(0)\n"
    ),
    "report_on_every_descriptor_then_os_exit": (
        "import json, os\n"
        "forged = json.dumps({'kind': 'passed', 'details': {'tests_passed': 1, 'tests_failed': 0,\n"
        "    'tests_total': 1, 'finished': True}, 'tally': {'total': 1, 'passed': 1, 'finished': 1}})\n"
        "for fd in range(3, 256):\n"
        "    try:\n"
        "        os.lseek(fd, 0, 0)\n"
        "        os.write(fd, forged.encode() + b'\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    ),
    "harness_counts_then_exit": (
        "import sys\n"
        "try:\n"
        "    SANDBOX_TALLY('total', 1)\n"
        "    SANDBOX_TALLY('passed')\n"
        "    SANDBOX_TALLY('finished')\n"
        "except NameError:  # main's harness object\n"
        "    _gcache_tally.expect(1)\n"
        "    _gcache_tally.ok()\n"
        "    _gcache_tally.finish()\n"
        "except PermissionError:\n"
        "    pass\n"
        "sys.exit(0)\n"
    ),
    "harness_turning_failures_into_passes": (
        "_real_tally = globals().get('SANDBOX_TALLY')\n"
        "def SANDBOX_TALLY(name, amount=1, note=None):\n"
        "    _real_tally('passed' if name == 'failed' else name, amount)\n"
        "if '_GcacheTally' in globals():  # main's harness object\n"
        "    _GcacheTally.fail = lambda self, *args: self.ok()\n"
    ),
    "details_then_exit_in_the_first_call": (
        "import sys\n"
        "SANDBOX_DETAILS.update(tests_passed=10**6, tests_failed=0, tests_total=10**6, finished=True)\n"
        "def _cheat():\n"
        "    sys.exit(0)\n"
    ),
    "pass_marker": "print('passed')\nprint('{\"kind\": \"passed\"}')\n",
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_passes_score_zero(humaneval, mbpp, forgery):
    """Each forgery, put before a function that returns None, on a real problem of each set."""
    cases = [(humaneval, "HumanEval/2", "truncate_number"), (mbpp, "Mbpp/2", "similar_elements")]
    for task, example_id, entry in cases:
        body = "_cheat()" if "_cheat" in FORGERIES[forgery] else "return None"
        reply = f"```python\n{FORGERIES[forgery]}\ndef {entry}(*args):\n    {body}\n```"
        (details,) = task.score_details([reply], [by_id(task, example_id)])
        assert details["reward"] == 0.0 and details["fraction"] < 1.0, (example_id, details)


def test_tally_lines_are_the_tests_own(humaneval, mbpp):
    """A reply that carries a copy of the test does not get its lines counted."""
    for task, assemble, example_id in [
        (humaneval, assemble_humaneval, "HumanEval/2"),
        (mbpp, assemble_mbpp, "Mbpp/2"),
    ]:
        ex = by_id(task, example_id)
        reply = ex.answer + "\n\n" + ex.meta["test"] + "\n"
        program = assemble(reply, ex)
        lines = tally_lines(program, ex.meta["test"])
        first_test_line = program.count("\n", 0, program.rfind(ex.meta["test"])) + 1
        assert sorted(lines) == ["failed", "finished", "passed", "total"]
        assert all(n >= first_test_line for ns in lines.values() for n in ns)
        assert lines["finished"] == [program.count("\n")]  # FOOTER's line, the last one
        numbered = program.split("\n")
        assert numbered[lines["total"][0] - 1].strip() == 'SANDBOX_TALLY("total", len(inputs))'


def test_timeouts_and_unscorable_replies(humaneval):
    ex = by_id(humaneval, "HumanEval/2")
    slow = HumanEvalPlus(timeout=1.0, max_workers=2)
    details = slow.score_details(
        ["def truncate_number(number):\n    while True:\n        pass\n", None], [ex, ex]
    )
    assert (
        details[0]["status"] == "timeout"
        and details[0]["reward"] == 0.0
        and details[0]["fraction"] == 0.0
    )
    assert details[1]["reward"] is None and details[1]["status"] == "unscored"


def test_humaneval32_upstream_test_is_broken_and_repaired(humaneval):
    assert set(TEST_FIXES) <= set(HE_BROKEN)
    ex = by_id(humaneval, "HumanEval/32")
    old, new = TEST_FIXES["HumanEval/32"]
    assert new in ex.meta["test"] and old not in ex.meta["test"]
    # with the upstream test, even the canonical solution fails ...
    broken = ex.__class__(
        ex.id, ex.question, ex.answer, {**ex.meta, "test": ex.meta["test"].replace(new, old)}
    )
    program = assemble_humaneval(ex.answer, broken)
    result = run_program(program, timeout=20, tally_lines=tally_lines(program, broken.meta["test"]))
    assert result.status == "passed" and result.tally["finished"] == 1
    assert "passed" not in result.tally
    assert result.tally["failed"] == result.tally["total"] > 0
    # ... with the repaired one it passes, and a wrong root fails
    assert humaneval.reward([humaneval.target_text(ex)], [ex]) == [1.0]
    wrong = "```python\ndef find_zero(xs):\n    return 0.0\n```"
    assert humaneval.reward([wrong], [ex]) == [0.0]


def test_known_broken_without_fix_is_unscorable():
    task = HumanEvalPlus(max_workers=2)
    examples = task.load_examples()
    ex = examples[5]
    unfixable = ex.__class__(ex.id, ex.question, ex.answer, {**ex.meta, "broken": "test is wrong"})
    assert task.reward([task.target_text(ex)], [unfixable]) == [None]


@pytest.mark.slow
def test_all_reference_solutions_pass_and_wrong_ones_fail(humaneval, mbpp):
    """Every canonical solution of HumanEval+ (164) and MBPP+ (378) passes all base and plus
    tests with the default limits (only records broken upstream and not repaired may fail);
    for 20 sampled tasks a `return None` body and another task's reference fail."""
    start = time.monotonic()
    for task, broken in [(humaneval, HE_BROKEN), (mbpp, MBPP_BROKEN)]:
        examples = task.load_examples()
        rng = random.Random(0)
        sample = rng.sample(examples, 10)
        others = [examples[(examples.index(ex) + 1) % len(examples)] for ex in sample]
        replies = [task.target_text(ex) for ex in examples]
        replies += [return_none(ex) for ex in sample] + [
            task.target_text(other) for other in others
        ]
        details = task.score_details(replies, examples + sample + sample)
        reference, wrong = details[: len(examples)], details[len(examples) :]
        unrepaired = {i for i in broken if i not in TEST_FIXES}
        failing = {
            ex.id: d["message"][:200]
            for ex, d in zip(examples, reference, strict=True)
            if d["reward"] != 1.0
        }
        assert set(failing) == unrepaired, failing
        assert all(
            d["fraction"] == 1.0 and d["tests_total"] > 0 for d in reference if d["reward"] == 1.0
        )
        assert [d["reward"] for d in wrong] == [0.0] * len(wrong), [
            d["message"][:100] for d in wrong
        ]
    elapsed = time.monotonic() - start
    log.info("full reference-solution check took %.1f s", elapsed)
    assert set(HEAVY_TESTS) <= {ex.id for ex in mbpp.load_examples()}
