"""Scoring of the code tasks (HumanEval+, MBPP+): instrument the tests, run them, count.

Both tasks use the EvalPlus "OriginFmt" tests, where one loop checks every base and
plus input::

    for i, (inp, exp) in enumerate(zip(inputs, results)):   # or: for i, inp in enumerate(inputs):
        assertion(candidate(*inp), exp, 0)

:func:`instrument_test` wraps that loop's body so that one failing input is counted
instead of ending the run, and the program ends with ``FOOTER``'s "finished" mark. The
counts go out of band through the sandbox's ``SANDBOX_TALLY``, which counts only calls
made from the lines of the test and footer (:func:`tally_lines`: after the reply's code
in the program), so a reply cannot add to them, print or write a result, or end early
(``sys.exit(0)``, ``os._exit(0)``) and pass; a reply that calls ``SANDBOX_TALLY`` itself
scores 0. A reply passes iff the program ran to its end and every input passed.
When a run ends early (timeout, crash), the fraction counts the inputs that passed
before it, over all inputs (0 after a timeout, whose counts are lost). Records listed
with raised ``meta["limits"]`` (known slow or memory-hungry reference solutions) get
those limits instead of the task's defaults. What the tests' own comparisons cannot be
protected from (they share the reply's interpreter) is listed in ``sandbox``.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Callable

from .base import Example, Task, check_pairs
from .extract import extract_code
from .sandbox import run_many

__all__ = ["instrument_test", "tally_lines", "score_programs", "HEADER", "FOOTER"]

# The single-line body of the test loop, captured with its indentation.
_LOOP = re.compile(
    r"^(?P<ind>[ \t]*)(?P<head>for i, (?:\(inp, exp\) in enumerate\(zip\(inputs, results\)\)"
    r"|inp in enumerate\(inputs\)):)[ \t]*\n(?P=ind)[ \t]+(?P<body>\S[^\n]*)$",
    re.M,
)
_TALLY_CALL = re.compile(r'\bSANDBOX_TALLY\("(\w+)"')

HEADER = '''

def _gcache_failure(i, inp, exc):
    """One failing test input, for the score's message (written by gcache.tasks.code_eval)."""
    try:
        return f"test {i}: input {repr(inp)[:200]}: {type(exc).__name__}: {str(exc)[:300]}"
    except Exception:
        return f"test {i}: {type(exc).__name__}"

'''

FOOTER = '\n\nSANDBOX_TALLY("finished")\n'


def instrument_test(test: str) -> tuple[str, bool]:
    """(test with its input loop counting pass/fail per input, whether the loop was found)."""

    def wrap(m: re.Match) -> str:
        ind = m.group("ind")
        return (
            f'{ind}SANDBOX_TALLY("total", len(inputs))\n'
            f"{ind}{m.group('head')}\n"
            f"{ind}    try:\n"
            f"{ind}        {m.group('body')}\n"
            f"{ind}    except Exception as _gcache_exc:\n"
            f'{ind}        SANDBOX_TALLY("failed", 1, _gcache_failure(i, inp, _gcache_exc))\n'
            f"{ind}    else:\n"
            f'{ind}        SANDBOX_TALLY("passed")'
        )

    instrumented, count = _LOOP.subn(wrap, test)
    return instrumented, count > 0


def tally_lines(program: str, test: str) -> dict[str, list[int]]:
    """The lines of ``program`` (newlines normalised to ``\\n``) whose ``SANDBOX_TALLY`` calls
    count: those of its last copy of ``test`` (which follows the reply's code) and after it."""
    start = program.rfind(test)
    if start < 0:
        raise ValueError("the test is not part of the program")
    first = program.count("\n", 0, start) + 1
    lines: dict[str, list[int]] = {}
    for number, line in enumerate(program[start:].split("\n"), first):
        for name in _TALLY_CALL.findall(line):
            lines.setdefault(name, []).append(number)
    return lines


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
    # Python reads "\r\n" and "\r" as "\n" anyway; normalised, tally_lines counts lines as it does
    normalised = {k: _unix_newlines(programs[k]) for k in runnable}
    # a record known to be slow or memory-hungry may raise (never lower) the limits
    limits = [
        {
            "timeout": max(timeout, examples[k].meta.get("limits", {}).get("timeout", 0)),
            "memory_mb": max(memory_mb, examples[k].meta.get("limits", {}).get("memory_mb", 0)),
            "tally_lines": tally_lines(normalised[k], _unix_newlines(examples[k].meta["test"])),
        }
        for k in runnable
    ]
    # longest first, so a slow record does not start last and stretch the batch's wall time
    order = sorted(range(len(runnable)), key=lambda j: -limits[j]["timeout"])
    runs = run_many(
        [normalised[runnable[j]] for j in order],
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
        tally = result.tally
        # total is None when the test had no recognisable input loop: then plain pass/fail
        total, n_ok = tally.get("total"), tally.get("passed", 0)
        passed = (
            result.passed
            and not result.tampered
            and tally.get("finished") == 1
            and not tally.get("failed")
            and (total is None or 0 < total == n_ok)
        )
        fraction = 1.0 if passed else 0.0
        if not passed and total and not result.tampered:
            fraction = min(n_ok, total) / total
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
                "message": result.tampered or result.message or result.notes.get("failed", ""),
                "wall_seconds": result.wall_seconds,
            }
        )
    return details


def _unix_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


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
    return score_programs(
        programs, examples, codes, timeout=timeout, memory_mb=memory_mb, max_workers=max_workers
    )


class CodeTask(Task):
    """A task answered with a Python program: the reply's code block, assembled with the task's
    tests (`assemble_program`) and run in the sandbox; the reward is 1.0 iff every test passes."""

    domain = "code"
    answer_format = "Give the complete Python function in a single ```python code block."

    def __init__(self, *, timeout: float = 20.0, memory_mb: int = 1024, max_workers: int | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.timeout, self.memory_mb, self.max_workers = timeout, memory_mb, max_workers  # per program

    @staticmethod
    @abstractmethod
    def assemble_program(code: str, example: Example) -> str:
        """The program the sandbox runs: the reply's code, the task's tests and the harness."""

    def extract_answer(self, completion: str) -> str | None:
        return extract_code(completion) if isinstance(completion, str) else None

    def score_details(self, completions: list[str], examples: list[Example]) -> list[dict]:
        """Per reply: extracted code, passed, fraction of test inputs passed, sandbox status."""
        return score_replies(completions, examples, self.assemble_program, timeout=self.timeout,
                             memory_mb=self.memory_mb, max_workers=self.max_workers)
