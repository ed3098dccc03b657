"""HumanEval+ (164 problems): complete a Python function; reward 1.0 iff every test passes.

    task = HumanEvalPlus(timeout=20.0, max_workers=2)
    ex = task.load_examples()[0]
    task.score_details(["```python\\n" + ex.answer + "\\n```"], [ex])[0]["fraction"]   # 1.0

Tests: the EvalPlus ``HumanEvalPlus-OriginFmt`` file (local ``humaneval/HumanEvalPlus-OriginFmt.jsonl.gz``,
hub ``evalplus/humanevalplus``). Chosen over the native file because its ``check(candidate)``
already holds the expected outputs of every base and plus input (the native file stores
inputs only; expected outputs would have to be computed by running the canonical
solution, ~120k calls), and because it is exactly what the hub dataset ships, so local and
hub data go through the same code.

A reply is scored in two runs (see ``code_eval``). The recorder is: the prompt (imports and
helper functions such as ``poly``) + the reply's code (a full definition of the entry point
overrides the prompt's stub; a reply without it is taken as the function body) + the test's
inputs and the loop that records the entry point's outputs. The harness is the test, its
loop comparing those outputs per input, + ``check(None)``.
"""

from __future__ import annotations

import logging
import re
import textwrap

from .base import Example
from .code_eval import FOOTER, HEADER, CodeTask, comparison_test, record_outputs

log = logging.getLogger(__name__)

# Upstream records whose tests are wrong, with the reason. Each is either repaired by
# TEST_FIXES (then scored normally) or, if not, unscorable (reward None).
KNOWN_BROKEN = {
    "HumanEval/32": (
        "OriginFmt test asserts `_poly(*candidate(*inp), inp) <= 0.0001`: arguments swapped "
        "(_poly(xs, x) is called with the root as coefficients) and no abs(), so every solution "
        "fails; repaired to `abs(_poly(*inp, candidate(*inp))) <= 0.0001` (the original HumanEval check)"
    ),
}
TEST_FIXES = {
    "HumanEval/32": (
        "assert _poly(*candidate(*inp), inp) <= 0.0001",
        "assert abs(_poly(*inp, candidate(*inp))) <= 0.0001",
    ),
}


def assemble_program(code: str, example: Example) -> str:
    """The recorder of ``code``'s (a reply's extracted code) outputs on ``example``'s inputs."""
    entry = example.meta["entry_point"]
    prompt = example.meta["prompt"]
    if re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(entry)}\s*\(", code, re.M):
        solution = prompt + "\n\n" + code  # the reply's definition replaces the prompt's stub
    else:
        first = next((line for line in code.splitlines() if line.strip()), "")
        body = code if first[:1].isspace() else textwrap.indent(code, "    ")
        solution = prompt.rstrip("\n") + "\n" + body  # a body continuing the prompt's signature
    return HEADER + solution + "\n\n" + record_outputs(example) + FOOTER


class HumanEvalPlus(CodeTask):
    name = "humaneval"
    assemble_program = staticmethod(assemble_program)

    def __init__(self, *, hub_id: str = "evalplus/humanevalplus", **kwargs):
        super().__init__(**kwargs)  # timeout, memory_mb, max_workers: see CodeTask
        self.hub_id = hub_id

    def _load(self) -> list[Example]:
        rows = self._rows("humaneval/HumanEvalPlus-OriginFmt.jsonl.gz", self.hub_id, None, "test")
        examples = []
        for i, row in enumerate(rows):
            test, broken = row["test"], KNOWN_BROKEN.get(row["task_id"])
            if row["task_id"] in TEST_FIXES:
                old, new = TEST_FIXES[row["task_id"]]
                if old in test:
                    test, broken = test.replace(old, new), None
                else:
                    log.warning(
                        "%s: the known upstream test bug is not there any more; fix not applied",
                        row["task_id"],
                    )
            try:
                test, inputs = comparison_test(test, "candidate")
                test += "\n\ncheck(None)\n"
            except ValueError as exc:
                log.warning("%s: unscorable test: %s", row["task_id"], exc)
                test, inputs, broken = "", "", broken or f"test not in the OriginFmt shape: {exc}"
            question = (
                f"Complete the following Python function:\n```python\n{row['prompt'].strip()}\n```"
            )
            examples.append(
                Example(
                    id=row["task_id"],
                    question=question,
                    answer=row["prompt"] + row["canonical_solution"],
                    meta={
                        "index": i,
                        "prompt": row["prompt"],
                        "entry_point": row["entry_point"],
                        "test": test,  # the harness's: the comparisons, on recorded outputs
                        "inputs": inputs,  # the source of the test's inputs, for the recorder
                        "broken": broken,
                    },
                )
            )
        return examples

    def target_text(self, example: Example) -> str:
        return f"```python\n{example.answer.strip(chr(10))}\n```"
