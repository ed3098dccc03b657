"""MedQA (USMLE, four options), scored by the option letter.

    MedQA()                     # subset="latentmas300": medqa/medqa.json, the 300 LatentMAS uses
    MedQA(subset="us1273")      # medqa/US_4_options_phrases_no_exclude_test.jsonl, full test (1273)

Read from local files only (set ``GCACHE_DATA_DIR`` or ``data_dir``); there is no hub path.
Letters are mapped exactly: ``us1273`` has ``answer_idx``; in ``medqa.json`` the answer
text is compared for *equality* with each option's text after its "X. " prefix
(LatentMAS matches substrings, which is ambiguous for idx 155: options VII, VIIa, X, XII,
answer X; equality gives C). The stem of ``medqa.json`` is its ``query`` without the
options and the trailing "Choose the correct option." (its ``question`` repeats the options twice).
"""

from __future__ import annotations

import json

from .base import LETTERS, ChoiceTask, Example, format_choices, read_jsonl

SUBSETS = {
    "latentmas300": "medqa/medqa.json",
    "us1273": "medqa/US_4_options_phrases_no_exclude_test.jsonl",
}
_SUFFIX = "\nChoose the correct option."


def _latentmas_record(i: int, row: dict) -> tuple[str, list[str], str]:
    """(stem, option texts, letter) of one medqa.json record."""
    prefixes = [f"{letter}. " for letter in LETTERS]
    if len(row["options"]) != 4 or [o[:3] for o in row["options"]] != prefixes:
        raise ValueError(
            f"medqa.json record {i}: options must be 'A. ..'..'D. ..', got {row['options']!r}"
        )
    options = [o[3:] for o in row["options"]]
    matches = [
        LETTERS[k] for k, text in enumerate(options) if text.strip() == row["answer"].strip()
    ]
    if len(matches) != 1:
        raise ValueError(
            f"medqa.json record {i}: answer {row['answer']!r} equals {len(matches)} options, expected 1"
        )
    listing = "\n" + "\n".join(row["options"]) + _SUFFIX
    if not row["query"].endswith(listing):
        raise ValueError(
            f"medqa.json record {i}: query does not end with its options and {_SUFFIX.strip()!r}"
        )
    return row["query"][: -len(listing)], options, matches[0]


class MedQA(ChoiceTask):
    name = "medqa"
    domain = "medical"
    answer_format = "Give the final answer as \\boxed{X}, where X is the letter (A, B, C or D) of the correct option."

    def __init__(self, *, subset: str = "latentmas300", **kwargs):
        if subset not in SUBSETS:
            raise ValueError(f"task 'medqa': subset={subset!r} is not one of {sorted(SUBSETS)}")
        super().__init__(**kwargs)
        self.subset = subset

    def _load(self) -> list[Example]:
        relpath = SUBSETS[self.subset]
        path = self._local_file(relpath)
        if path is None:
            raise FileNotFoundError(
                f"task 'medqa' (subset={self.subset!r}) reads local files only and {relpath} was not found "
                f"under data_dir={str(self.data_dir)!r}; set GCACHE_DATA_DIR or data_dir"
            )
        examples = []
        if self.subset == "latentmas300":
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}: line {exc.lineno} is not valid JSON ({exc.msg})"
                ) from exc
            for i, row in enumerate(rows):
                stem, options, letter = _latentmas_record(i, row)
                examples.append(
                    self._example(
                        f"medqa/{i}",
                        stem,
                        options,
                        letter,
                        {"index": i, "idx": row["idx"], "pid": row["pid"]},
                    )
                )
        else:
            for i, row in enumerate(read_jsonl(path)):
                options = [row["options"][letter] for letter in LETTERS]
                if row["options"].get(row["answer_idx"]) != row["answer"]:
                    raise ValueError(
                        f"{path}: record {i}: options[{row['answer_idx']!r}] != answer {row['answer']!r}"
                    )
                examples.append(
                    self._example(
                        f"medqa-us/{i}",
                        row["question"],
                        options,
                        row["answer_idx"],
                        {"index": i, "step": row.get("meta_info")},
                    )
                )
        return examples

    def _example(self, id_: str, stem: str, options: list[str], letter: str, meta: dict) -> Example:
        return Example(
            id=id_,
            question=format_choices(stem, options),
            answer=letter,
            meta={**meta, "options": options, "subset": self.subset},
        )
