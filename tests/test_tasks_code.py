"""HumanEval+ and MBPP+: program assembly, per-test fractions, forged passes, the output
codec, broken records, and the full reference-solution check (slow)."""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections import Counter, OrderedDict, defaultdict, deque
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

from gcache.tasks.base import Example
from gcache.tasks.code_eval import (
    FOOTER,
    HEADER,
    CodeTask,
    comparison_test,
    harness_program,
    instrument_test,
    record_outputs,
    score_programs,
    tally_lines,
)
from gcache.tasks.humaneval import KNOWN_BROKEN as HE_BROKEN
from gcache.tasks.humaneval import TEST_FIXES, HumanEvalPlus
from gcache.tasks.humaneval import assemble_program as assemble_humaneval
from gcache.tasks.mbppplus import HEAVY_TESTS, MbppPlus
from gcache.tasks.mbppplus import KNOWN_BROKEN as MBPP_BROKEN
from gcache.tasks.mbppplus import assemble_program as assemble_mbpp

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
        assert ex.meta["entry_point"] and ex.meta["inputs"].startswith("["), ex.id
        assert "_gcache_output(i" in ex.meta["test"] and not ex.meta["broken"], ex.id


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
    with pytest.raises(ValueError, match="one input loop"):
        comparison_test(test, "candidate")  # such a record is unscorable


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


# Replies that pass by subverting the test's comparisons rather than by being right. Each
# scored 1.0 on every record below while the comparisons ran in the reply's process
# (checked on that code); the answer underneath is wrong.
COMPARISON_FORGERIES = {
    "always_equal_object": (
        "class _Anything:\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "    def __ne__(self, other):\n"
        "        return False\n"
        "    __hash__ = object.__hash__\n"
        "def {entry}(*args):\n"
        "    return _Anything()\n"
    ),
    "float_subclass_equal_to_everything": (
        "class _Float(float):\n"
        "    __eq__ = lambda self, other: True\n"
        "    __ne__ = lambda self, other: False\n"
        "    __hash__ = float.__hash__\n"
        "def {entry}(*args):\n"
        "    return _Float(-1.0)\n"
    ),
    # the test looks `assertion` up before calling the candidate, which then swaps its code
    "rebound_assertion": (
        "def {entry}(*args):\n"
        "    if 'assertion' in globals():\n"
        "        globals()['assertion'].__code__ = (lambda out, exp, atol: None).__code__\n"
        "    return -1.0\n"
    ),
    "patched_numpy_allclose": (
        "import numpy\n"
        "numpy.allclose = lambda *args, **kwargs: True\n"
        "def {entry}(*args):\n"
        "    return -1.0\n"
    ),
    # the test's is_floats(exp), or numpy.isclose right after it looked at the candidate's
    # value, hands the expected value to isinstance: copy it into the (mutable, 0-d array)
    # return value before the comparison reads it
    "patched_isinstance": (
        "import builtins, numpy\n"
        "_isinstance, _box, _last = builtins.isinstance, numpy.zeros(()), [None]\n"
        "def _spy(obj, cls):\n"
        "    if type(obj) is float and (cls is float or _last[0] is _box):\n"
        "        _box[...] = obj\n"
        "    _last[0] = obj\n"
        "    return _isinstance(obj, cls)\n"
        "builtins.isinstance = _spy\n"
        "def {entry}(*args):\n"
        "    return _box\n"
    ),
    # numpy.isclose computes abs(x - y) <= atol + rtol * abs(y) with the builtin abs
    "patched_abs": (
        "import builtins\n"
        "builtins.abs = lambda x: x * 0\n"
        "def {entry}(*args):\n"
        "    return -1.0\n"
    ),
    # zip(inputs, results) hands the candidate the expected value as its input
    "patched_zip": (
        "import builtins, sys\n"
        "_zip = builtins.zip\n"
        "def _expected_as_input(*its):\n"
        "    here = sys._getframe(0).f_code.co_filename\n"
        "    if len(its) != 2 or sys._getframe(1).f_code.co_filename != here:\n"
        "        return _zip(*its)  # not the test's loop (numpy's import zips too)\n"
        "    expected = list(its[1])\n"
        "    return _zip([(('expected', e),) for e in expected], expected)\n"
        "builtins.zip = _expected_as_input\n"
        "def {entry}(*args):\n"
        "    if args and type(args[0]) is tuple and args[0][:1] == ('expected',):\n"
        "        return args[0][1]\n"
        "    return -1.0\n"
    ),
    "expected_value_from_the_callers_frame": (
        "import sys\n"
        "def {entry}(*args):\n"
        "    return sys._getframe(1).f_locals.get('exp', -1.0)\n"
    ),
    "reference_function_of_the_test": (
        "def {entry}(*args):\n"
        "    return globals()['ref_func'](*args) if 'ref_func' in globals() else -1.0\n"
    ),
    # the test calls ref_func(*inp) after the candidate: empty the input, return what
    # the reference makes of an empty list
    "emptied_input_of_the_reference": (
        "from collections import Counter\n"
        "def {entry}(items):\n"
        "    items.clear()\n"
        "    return Counter()\n"
    ),
}
# float-valued records with the usual assertion (exact match, else np.allclose for floats);
# the reference-function forgery needs records whose test calls ref_func
FORGERY_RECORDS = {
    "reference_function_of_the_test": [("humaneval", "HumanEval/14"), ("mbpp", "Mbpp/88")],
    "emptied_input_of_the_reference": [("mbpp", "Mbpp/88")],  # HumanEval+'s are immutable
}
FLOAT_RECORDS = [("humaneval", "HumanEval/2"), ("mbpp", "Mbpp/139")]


@pytest.mark.parametrize("forgery", sorted(COMPARISON_FORGERIES))
def test_forged_comparisons_score_zero(humaneval, mbpp, forgery):
    """A reply cannot pass by making the test's comparisons lie: they run in another process."""
    tasks = {"humaneval": humaneval, "mbpp": mbpp}
    for task_name, example_id in FORGERY_RECORDS.get(forgery, FLOAT_RECORDS):
        task, ex = tasks[task_name], by_id(tasks[task_name], example_id)
        code = COMPARISON_FORGERIES[forgery].format(entry=ex.meta["entry_point"])
        (details,) = task.score_details([f"```python\n{code}```"], [ex])
        assert details["reward"] == 0.0 and details["fraction"] < 1.0, (example_id, details)


def test_tally_lines_are_the_recorders_own(humaneval, mbpp):
    """A reply that carries a copy of the recorder does not get its lines counted."""
    for task, assemble, example_id in [
        (humaneval, assemble_humaneval, "HumanEval/2"),
        (mbpp, assemble_mbpp, "Mbpp/2"),
    ]:
        ex = by_id(task, example_id)
        recorder = record_outputs(ex)
        program = assemble(ex.answer + "\n\n" + recorder + "\n", ex)
        lines = tally_lines(program, recorder)
        first_line = program.count("\n", 0, program.rfind(recorder)) + 1
        assert sorted(lines) == ["finished", "output"]
        assert all(n >= first_line for ns in lines.values() for n in ns)
        assert lines["finished"] == [program.count("\n")]  # FOOTER's line, the last one
        assert "results" not in program and "assertion" not in program  # no expected values


def test_harness_holds_the_tests_comparisons_and_no_reply_code(humaneval, mbpp):
    for task, example_id in [(humaneval, "HumanEval/14"), (mbpp, "Mbpp/88")]:
        ex = by_id(task, example_id)
        harness = harness_program(ex, ['["=", 1]'])
        assert "_gcache_records = ['[\"=\", 1]']" in harness
        assert "def ref_func" in harness and "def assertion" in harness
        compare = (
            "assertion(_gcache_output(i, (_gcache_exp := ref_func(*inp)), check='same'), "
            "_gcache_exp, 0)"
        )
        assert compare in harness
        tallies = sorted(tally_lines(harness, ex.meta["test"]))
        assert tallies == ["failed", "finished", "passed", "total"]


def test_a_reply_that_records_twice_does_not_pass(humaneval):
    ex = by_id(humaneval, "HumanEval/2")
    twice = (
        "def truncate_number(number):\n"
        "    if not globals().get('again'):\n"
        "        globals()['again'] = True\n"
        "        _gcache_record()\n"
        "    return number % 1.0\n"
    )
    (details,) = humaneval.score_details([twice], [ex])
    assert details["reward"] == 0.0


def codec():
    """The recorder's codec, run here (HEADER defines it; the harness uses the same one)."""
    namespace = {}
    exec(HEADER, namespace)
    return namespace["_gcache_codec"]()


def round_trip(value):
    c = codec()
    kind, data = json.loads(c["note"](value, [0]))
    assert kind == "="
    return c["decode"](data)


def test_return_values_travel_as_data_of_their_own_type():
    values = [
        None, True, 0, -5, 7**5000, 1.5, -0.0, float("inf"), "caf\u00e9 \ud800", b"\x00\xff",
        bytearray(b"ab"), 1 + 2j, [1, [2, (3,)]], (), (1, "a", None), {1: "a", (2, 3): [4.0]},
        {1, 2, 3}, frozenset({"a"}), set(), range(1, 10, 2), Counter("abca"),
        OrderedDict(b=1, a=2), defaultdict(list, a=[1]), deque([1, 2], maxlen=5),
        Fraction(1, 3), Decimal("1.10"), {}.keys(), {1: 2}.items(), list(range(5000)),
        [(k, str(k)) for k in range(3000)],
    ]  # fmt: skip
    for value in values:
        decoded = round_trip(value)
        assert type(decoded) is type(value) and decoded == value, value
    assert math.isnan(round_trip(float("nan")))
    # numpy values at 64 bits: scalars as the Python numbers they hold, arrays widened
    numbers = [
        (np.float64(1.5), 1.5), (np.int32(3), 3), (np.bool_(True), True), (np.complex64(1j), 1j),
        (np.uint64(2**64 - 1), 2**64 - 1), (np.float16(3000), 3000.0),
        (np.float32(0.1), float(np.float32(0.1))),
    ]  # fmt: skip
    for value, number in numbers:
        decoded = round_trip(value)
        assert type(decoded) is type(number) and decoded == number, value
    assert np.float16(3000) == 3001 and round_trip(np.float16(3000)) != 3001
    arrays = [
        (np.array([[1.0, 2.0]]), np.float64), (np.zeros((0, 3), dtype=np.int8), np.int64),
        (np.array(2j, dtype=np.complex64), np.complex128), (np.array([True]), np.bool_),
        (np.array([3000], dtype=np.float16), np.float64),
        (np.array([1], dtype=np.uint8), np.uint64),
    ]  # fmt: skip
    for array, wide in arrays:
        decoded = round_trip(array)
        assert decoded.dtype == wide and decoded.shape == array.shape
        assert np.array_equal(decoded, array)
    assert not np.array_equal(round_trip(np.array([3000], dtype=np.float16)), [3001])
    assert list(round_trip(iter([1, (2,)]))) == [1, (2,)]  # iterators: consumed, then an iterator
    assert round_trip(x for x in "ab").__next__() == "a"
    match = round_trip(re.search(r"(b)(c)?", "abc"))
    assert (match.span(), match.group(), match.groups()) == ((1, 3), "bc", ("b", "c"))
    assert match.string == "abc"


def test_long_outputs_go_by_digest():
    c = codec()
    for value in [7**6000, list(range(10**5)), "x" * 2**18, [(1, "a")] * 20000]:
        kind, digest, size = json.loads(c["note"](value, [0]))
        assert kind == "#" and [digest, size] == list(c["digest"](value)), value
    assert c["digest"]([1, 2]) != c["digest"]((1, 2)) != c["digest"]([1.0, 2])
    assert c["digest"]({1, 2, 3}) == c["digest"]({3, 2, 1})
    kind, *_ = json.loads(c["note"](dict.fromkeys(range(10**5)), [0]))
    assert kind == "#"
    kind, *_ = json.loads(c["note"]("x" * 1000, [3 * 2**20 - 10]))  # the run's budget is spent
    assert kind == "#"


def test_anything_but_plain_data_fails_to_encode():
    class Anything:
        def __eq__(self, other):
            return True

    class Number(int):
        pass

    cycle = []
    cycle.append(cycle)
    for value in [Anything(), Number(3), [1, Anything()], {"k": Number(1)}, len, cycle,
                  np.array([None], dtype=object), type, Exception("x")]:  # fmt: skip
        with pytest.raises((TypeError, ValueError)):
            codec()["note"](value, [0])


def test_malformed_notes_do_not_decode():
    decode = codec()["decode"]
    for node in [{"x": 1}, {"t": 5}, {"t": [], "s": []}, {"ndarray": ["|O8", [1], [None]]},
                 {"s": [[1]]}, {"defaultdict": ["os.system", []]}, {"c": ["1", 2]},
                 {"numpy": ["<f2", "1"]}, {"numpy": ["<i8", 1.5]}, {"numpy": ["<f8", True]},
                 {"ndarray": ["<i8", [1], [10**30]]}]:  # fmt: skip
        with pytest.raises(Exception):  # noqa: B017 - any error fails that input
            decode(node)


SYNTHETIC_TEST = """
def assertion(out, exp, atol):
    assert out == exp

def ref_func(n):
    return [(k, str(k)) for k in range(n)]

inputs = [[3], [30000], [40000]]
for i, inp in enumerate(inputs):
    assertion(pairs(*inp), ref_func(*inp), 0)
"""


def test_large_outputs_are_compared_by_digest():
    test, inputs = comparison_test(SYNTHETIC_TEST, "pairs")
    ex = Example("synthetic/0", "", "", {"test": test, "inputs": inputs, "entry_point": "pairs"})
    right = "def pairs(n):\n    return [(k, str(k)) for k in range(n)]\n"
    wrong = "def pairs(n):\n    return [(k, str(k)) for k in range(n)][:: 1 if n < 35000 else -1]\n"
    programs = [HEADER + code + "\n\n" + record_outputs(ex) + FOOTER for code in (right, wrong)]
    details = score_programs(
        programs, [ex, ex], [right, wrong], timeout=20, memory_mb=1024, max_workers=2
    )
    assert [d["reward"] for d in details] == [1.0, 0.0]
    assert details[1]["tests_passed"] == 2 and details[1]["tests_total"] == 3
    assert "compared by digest" in details[1]["message"]


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
    assert new.replace("candidate(*inp)", "_gcache_output(i)") in ex.meta["test"]
    # with the upstream test, even the canonical solution fails every input ...
    rows = humaneval._rows("humaneval/HumanEvalPlus-OriginFmt.jsonl.gz", humaneval.hub_id, None, "test")
    row = next(r for r in rows if r["task_id"] == "HumanEval/32")
    assert old in row["test"]
    test, inputs = comparison_test(row["test"], "candidate")
    meta = {**ex.meta, "test": test + "\n\ncheck(None)\n", "inputs": inputs}
    broken = ex.__class__(ex.id, ex.question, ex.answer, meta)
    (details,) = humaneval.score_details([humaneval.target_text(ex)], [broken])
    assert details["reward"] == 0.0 and details["tests_passed"] == 0 < details["tests_total"]
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
