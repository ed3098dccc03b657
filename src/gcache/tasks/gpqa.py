"""GPQA Diamond: 198 graduate-level science questions with four options, scored by letter.

    task = GPQA()                         # reads $GCACHE_DATA_DIR/gpqa/gpqa_diamond.jsonl
    ex = task.load_examples()[0]
    ex.question                           # question + "A. ...", "B. ...", ...; ex.answer == "C" etc.

The four options (correct + 3 incorrect, whitespace stripped) are shuffled per question
with ``random.Random(f"gpqa:{seed}:{record_id}")``: deterministic, independent of file
order, and the correct letter is roughly uniform over A-D. (simple-evals shuffles with
one shared ``random.Random(0)`` instead, so its letters depend on the row order.)
Hub fallback: ``Idavidrein/gpqa`` config ``gpqa_diamond`` (gated: accept its terms and
log in first; the id is the ``hub_id`` argument), which has the official CSV columns.
Two records repeat an incorrect answer after stripping (recZSGUkn56v9kEp1,
recnGEpF1srQpaqWq); they are kept as published, the correct answer is unique in all.
"""

from __future__ import annotations

import random

from .base import LETTERS, ChoiceTask, Example, format_choices


def _from_csv_row(row: dict) -> dict:
    """Official GPQA CSV / hub columns -> the field names of gpqa_diamond.jsonl."""
    return {
        "record_id": row["Record ID"],
        "question": row["Question"],
        "correct_answer": row["Correct Answer"],
        "incorrect_answers": [row[f"Incorrect Answer {k}"] for k in (1, 2, 3)],
        "high_level_domain": row.get("High-level domain", ""),
        "subdomain": row.get("Subdomain", ""),
    }


class GPQA(ChoiceTask):
    name = "gpqa"
    domain = "science"
    answer_format = "Give the final answer as \\boxed{X}, where X is the letter (A, B, C or D) of the correct option."

    def __init__(
        self, *, hub_id: str = "Idavidrein/gpqa", hub_config: str = "gpqa_diamond", **kwargs
    ):
        super().__init__(**kwargs)
        self.hub_id, self.hub_config = hub_id, hub_config

    def _load(self) -> list[Example]:
        rows = self._rows("gpqa/gpqa_diamond.jsonl", self.hub_id, self.hub_config, "train")
        # the hub has the official CSV columns, the local file the derived JSONL names
        rows = [row if "record_id" in row else _from_csv_row(row) for row in rows]
        examples = []
        for i, row in enumerate(rows):
            correct = row["correct_answer"].strip()
            options = [correct] + [a.strip() for a in row["incorrect_answers"]]
            random.Random(f"gpqa:{self.seed}:{row['record_id']}").shuffle(options)
            letter = LETTERS[options.index(correct)]
            examples.append(
                Example(
                    id=f"gpqa/{row['record_id']}",
                    question=format_choices(row["question"], options),
                    answer=letter,
                    meta={
                        "index": i,
                        "options": options,
                        "domain": row["high_level_domain"],
                        "subdomain": row["subdomain"],
                        "record_id": row["record_id"],
                    },
                )
            )
        return examples
