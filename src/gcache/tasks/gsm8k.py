"""GSM8K: grade-school math word problems (test split, 1319), scored by the final number.

    task = GSM8K()                        # reads $GCACHE_DATA_DIR/gsm8k/test.jsonl
    task.reward(["... \\\\boxed{18}"], [task.load_examples()[0]])   # [1.0]

Hub fallback: ``openai/gsm8k`` (config "main", split "test"). The reference answer is
the number after ``####`` in the worked solution (thousands separators removed); the
worked solution is kept in ``meta["solution"]``.
"""

from __future__ import annotations

from .base import Example, NumberTask
from .extract import parse_number


class GSM8K(NumberTask):
    name = "gsm8k"
    domain = "math"
    answer_format = "Give the final answer as \\boxed{number}."

    def __init__(self, *, hub_id: str = "openai/gsm8k", **kwargs):
        super().__init__(**kwargs)
        self.hub_id = hub_id

    def _load(self) -> list[Example]:
        rows = self._rows("gsm8k/test.jsonl", self.hub_id, "main", "test")
        examples = []
        for i, row in enumerate(rows):
            if "####" not in row["answer"]:
                raise ValueError(f"task 'gsm8k': record {i} has no '#### <number>' in its answer")
            final = parse_number(row["answer"].rsplit("####", 1)[1])
            if final is None:
                raise ValueError(
                    f"task 'gsm8k': record {i}: no number after '####' in {row['answer'][-40:]!r}"
                )
            examples.append(
                Example(
                    id=f"gsm8k/{i}",
                    question=row["question"],
                    answer=final,
                    meta={"index": i, "solution": row["answer"]},
                )
            )
        return examples

    def target_text(self, example: Example) -> str:
        return f"\\boxed{{{example.answer}}}"
