"""Scoring of the code tasks (HumanEval+, MBPP+): instrument the tests, run them, count.

Both tasks use the EvalPlus "OriginFmt" tests, where one loop checks every base and
plus input::

    for i, (inp, exp) in enumerate(zip(inputs, results)):   # or: for i, inp in enumerate(inputs):
        assertion(candidate(*inp), exp, 0)

:func:`instrument_test` wraps that loop's body so that one failing input is counted
instead of ending the run, and the program ends with a check that every input passed.
The counts travel back in the sandbox's ``SANDBOX_DETAILS``, giving the fraction of
tests passed. A reply passes only if the program reaches that final check (a
``sys.exit(0)`` half-way does not pass). When a run ends early (timeout, crash), the
fraction counts the inputs that passed before it, over all inputs (0 after a timeout,
whose counts are lost). Records listed with raised ``meta["limits"]`` (known slow or
memory-hungry reference solutions) get those limits instead of the task's defaults.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .base import Example, check_pairs
from .extract import extract_code
from .sandbox import run_many

__all__ = ["instrument_test", "score_programs", "HEADER", "FOOTER"]

# The single-line body of the test loop, captured with its indentation.
_LOOP = re.compile(
    r"^(?P<ind>[ \t]*)(?P<head>for i, (?:\(inp, exp\) in enumerate\(zip\(inputs, results\)\)"
    r"|inp in enumerate\(inputs\)):)[ \t]*\n(?P=ind)[ \t]+(?P<body>\S[^\n]*)$",
    re.M,
)

HEADER = '''
SANDBOX_DETAILS = globals().get("SANDBOX_DETAILS", {})


class _GcacheTally:
    """Counts test inputs; written by gcache.tasks.code_eval."""

    def __init__(self):
        SANDBOX_DETAILS.update(tests_passed=0, tests_failed=0, tests_total=None, first_failure=None, finished=False)

    def expect(self, n):
        SANDBOX_DETAILS["tests_total"] = (SANDBOX_DETAILS["tests_total"] or 0) + n

    def ok(self):
        SANDBOX_DETAILS["tests_passed"] += 1

    def fail(self, i, inp, exc):
        SANDBOX_DETAILS["tests_failed"] += 1
        if SANDBOX_DETAILS["first_failure"] is None:
            SANDBOX_DETAILS["first_failure"] = (
                f"test {i}: input {repr(inp)[:200]}: {type(exc).__name__}: {str(exc)[:300]}"
            )

    def finish(self):
        SANDBOX_DETAILS["finished"] = True
        if SANDBOX_DETAILS["tests_failed"]:
            raise AssertionError(
                f"{SANDBOX_DETAILS['tests_failed']} of {SANDBOX_DETAILS['tests_total']} tests failed; "
                f"first: {SANDBOX_DETAILS['first_failure']}"
            )


_gcache_tally = _GcacheTally()

'''

FOOTER = "\n\n_gcache_tally.finish()\n"


def instrument_test(test: str) -> tuple[str, bool]:
    """(test with its input loop counting pass/fail per input, whether the loop was found)."""

    def wrap(m: re.Match) -> str:
        ind = m.group("ind")
        return (
            f"{ind}_gcache_tally.expect(len(inputs))\n"
            f"{ind}{m.group('head')}\n"
            f"{ind}    try:\n"
            f"{ind}        {m.group('body')}\n"
            f"{ind}    except Exception as _gcache_exc:\n"
            f"{ind}        _gcache_tally.fail(i, inp, _gcache_exc)\n"
            f"{ind}    else:\n"
            f"{ind}        _gcache_tally.ok()"
        )

    instrumented, count = _LOOP.subn(wrap, test)
    return instrumented, count > 0


def score_programs(
    programs: list[str | None],
    examples: list[Example],
    codes: list[str | None],
    *,
    timeout: float,
    memory_mb: int,
    max_workers: int | None,
) -> list[dict]:
    """Run the assembled programs (None = not runnable) and turn each result into score details."""
    runnable = [k for k, p in enumerate(programs) if p is not None]
    # a record known to be slow or memory-hungry may raise (never lower) the limits
    limits = [
        {
            "timeout": max(timeout, examples[k].meta.get("limits", {}).get("timeout", 0)),
            "memory_mb": max(memory_mb, examples[k].meta.get("limits", {}).get("memory_mb", 0)),
        }
        for k in runnable
    ]
    # longest first, so a slow record does not start last and stretch the batch's wall time
    order = sorted(range(len(runnable)), key=lambda j: -limits[j]["timeout"])
    runs = run_many(
        [programs[runnable[j]] for j in order],
        max_workers=max_workers,
        limits=[limits[j] for j in order],
    )
    results = {runnable[j]: run for j, run in zip(order, runs, strict=True)}
    details = []
    for k, (example, code) in enumerate(zip(examples, codes, strict=True)):
        if code is None or k not in results:
            reason = "no reply" if code is None else f"unscorable: {example.meta.get('broken')}"
            details.append(
                {
                    "extracted": code,
                    "passed": None,
                    "correct": None,
                    "reward": None,
                    "fraction": None,
                    "tests_passed": None,
                    "tests_total": None,
                    "status": "unscored",
                    "message": reason,
                    "wall_seconds": 0.0,
                }
            )
            continue
        result = results[k]
        info = result.details
        total, n_ok = info.get("tests_total"), info.get("tests_passed", 0)
        # total is None when the test had no recognisable input loop: then plain pass/fail
        passed = (
            result.passed
            and bool(info.get("finished"))
            and not info.get("tests_failed")
            and total != 0
        )
        fraction = 1.0 if passed else (n_ok / total if total else 0.0)
        details.append(
            {
                "extracted": code,
                "passed": passed,
                "correct": passed,
                "reward": float(passed),
                "fraction": fraction,  # share of test inputs (base + plus) passed
                "tests_passed": n_ok if total else None,
                "tests_total": total,
                "status": "passed"
                if passed
                else ("failed" if result.status == "passed" else result.status),
                "message": result.message or info.get("first_failure") or "",
                "wall_seconds": result.wall_seconds,
            }
        )
    return details


def score_replies(
    completions: list[str | None],
    examples: list[Example],
    assemble: Callable[[str, Example], str],
    *,
    timeout: float,
    memory_mb: int,
    max_workers: int | None,
) -> list[dict]:
    """Extract each reply's code, assemble it with its tests (`assemble`) and run it in the
    sandbox: per reply the extracted code, passed, fraction of test inputs passed, status."""
    check_pairs(completions, examples)
    codes = [
        extract_code(c, ex.meta["entry_point"]) if isinstance(c, str) else None
        for c, ex in zip(completions, examples, strict=True)
    ]
    programs = [
        assemble(code, ex) if code is not None and not ex.meta["broken"] else None
        for code, ex in zip(codes, examples, strict=True)
    ]
    return score_programs(programs, examples, codes, timeout=timeout, memory_mb=memory_mb, max_workers=max_workers)
