"""MBPP+ (378 problems): write a Python function from a description; reward 1.0 iff all tests pass.

    task = MbppPlus(timeout=20.0, max_workers=2)
    ex = task.load_examples()[0]          # id "Mbpp/2"
    task.reward(["```python\\n" + ex.answer + "\\n```"], [ex])   # [1.0]

Tests: the EvalPlus ``MbppPlus-OriginFmt`` file (local ``mbppplus/MbppPlus-OriginFmt.jsonl.gz``,
hub ``evalplus/mbppplus``), whose ``test`` is a self-contained script with the base and plus
inputs and their expected outputs. Chosen over the native file for the same reasons as
in ``humaneval``: expected outputs are stored (native needs the canonical solution run on
~40k inputs) and it is what the hub dataset ships. The question shows the description
and the first three ``test_list`` asserts as examples (as LatentMAS does). The entry point
is the function the test calls. A reply is scored in two runs (see ``code_eval``): the
recorder, ``test_imports`` + the reply's code + the test's inputs and the loop recording the
entry point's outputs; and the harness, ``test_imports`` + the test script, its loop
comparing those outputs per input.
"""

from __future__ import annotations

import logging
import re

from .base import Example
from .code_eval import FOOTER, HEADER, CodeTask, comparison_test, record_outputs

log = logging.getLogger(__name__)

# Upstream records whose tests are wrong (reason); they are unscorable (reward None).
# None found: every canonical solution passes its test (two only with HEAVY_TESTS limits).
KNOWN_BROKEN: dict[str, str] = {}

# Records whose canonical solution needs more than the default limits to pass its own
# tests (measured on a 2-core machine): reason and the raised limits used for them.
HEAVY_TESTS = {
    "Mbpp/599": (
        "sum_average sums range(1, n + 1) for plus inputs n ~ 1e8 (twelve of them): ~19 s CPU",
        {"timeout": 120.0},
    ),
    "Mbpp/255": (
        "combinations_with_replacement of 5 items taken 77 at a time, computed by both the "
        "solution and the test's ref_func: ~2.2 GB resident, ~15 s",
        {"timeout": 60.0, "memory_mb": 4096},
    ),
}

_ENTRY = re.compile(r"assertion\((\w+)\(\*inp\)")


def assemble_program(code: str, example: Example) -> str:
    """The recorder of ``code``'s (a reply's extracted code) outputs on ``example``'s inputs."""
    imports = "\n".join(example.meta["test_imports"])
    return HEADER + imports + "\n\n" + code + "\n\n" + record_outputs(example) + FOOTER


class MbppPlus(CodeTask):
    name = "mbppplus"
    assemble_program = staticmethod(assemble_program)

    def __init__(self, *, num_shown_tests: int = 3, hub_id: str = "evalplus/mbppplus", **kwargs):
        super().__init__(**kwargs)  # timeout, memory_mb, max_workers: see CodeTask
        self.num_shown_tests, self.hub_id = num_shown_tests, hub_id

    def _load(self) -> list[Example]:
        rows = self._rows("mbppplus/MbppPlus-OriginFmt.jsonl.gz", self.hub_id, None, "test")
        examples = []
        for i, row in enumerate(rows):
            task_id = f"Mbpp/{row['task_id']}"
            entry = _ENTRY.findall(row["test"])
            broken = KNOWN_BROKEN.get(task_id)
            try:
                test, inputs = comparison_test(row["test"], entry[-1] if entry else "")
                test = "\n".join(row["test_imports"]) + "\n\n" + test
            except ValueError as exc:
                log.warning("%s: unscorable test: %s", task_id, exc)
                test, inputs, broken = "", "", broken or f"test not in the OriginFmt shape: {exc}"
            shown = "\n".join(row["test_list"][: self.num_shown_tests])
            examples.append(
                Example(
                    id=task_id,
                    question=f"{row['prompt'].strip()}\nYour code should pass these tests:\n{shown}",
                    answer=row["code"].strip("\n"),
                    meta={
                        "index": i,
                        "entry_point": entry[-1] if entry else None,
                        "test": test,  # the harness's: the comparisons, on recorded outputs
                        "inputs": inputs,  # the source of the test's inputs, for the recorder
                        "test_imports": list(row["test_imports"]),
                        "test_list": list(row["test_list"]),
                        "broken": broken,
                        "limits": HEAVY_TESTS.get(task_id, ("", {}))[1],
                    },
                )
            )
        return examples

    def target_text(self, example: Example) -> str:
        return f"```python\n{example.answer}\n```"
