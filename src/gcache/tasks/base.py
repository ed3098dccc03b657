"""What every task shares: the ``Example`` record, data loading, splits and the scoring API.

A task is a subclass of :class:`Task` that sets ``name``, ``domain`` and
``answer_format`` and implements ``_load`` (records -> Examples), ``extract_answer``,
``score_one`` (or ``score_details`` for batched scoring) and ``target_text``. Tasks of one
answer kind subclass it through :class:`NumberTask` (the final number), :class:`ChoiceTask`
(an option letter) or ``code_eval.CodeTask`` (a program run against tests), which implement
the scoring::

    task = build_task("gsm8k", seed=0)          # from gcache.tasks
    splits = task.splits()                      # {"train": [...], "val": [...], "test": [...]}
    ex = splits["val"][0]
    task.reward(["... so \\\\boxed{18}"], [ex])  # [1.0] if 18 is right

Data come from ``data_dir`` (else the environment variable ``GCACHE_DATA_DIR``) laid out
like the offline copies (``<dir>/gsm8k/test.jsonl`` ...), or from the Hugging Face hub
when ``source="hub"`` (or ``"auto"`` and no local file).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .extract import extract_choice, extract_number, score_choice, score_number

__all__ = [
    "Example",
    "Task",
    "DATA_DIR_ENV",
    "read_jsonl",
    "load_hub_rows",
    "format_choices",
    "check_pairs",
]

LETTERS = "ABCD"  # the options of multiple-choice tasks
log = logging.getLogger(__name__)

DATA_DIR_ENV = "GCACHE_DATA_DIR"
SOURCES = ("auto", "local", "hub")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Example:
    """One question of a task."""

    id: str  # stable unique id, e.g. "gsm8k/17", "HumanEval/0", "Mbpp/2", "gpqa/<record id>"
    question: str  # full problem text shown to the agents (options lettered A-D included)
    answer: str  # canonical reference: a number string, an option letter, or reference code
    meta: dict = field(default_factory=dict)  # task specific: tests, entry_point, options, index...
    # Tasks whose facts are held by the agents (lookup): agent i's text, and the oracle
    # communication graph as (src, dst) agent pairs, dst == -1 the judger. Empty otherwise.
    agent_facts: tuple[str, ...] = ()
    oracle_edges: tuple[tuple[int, int], ...] = ()


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON Lines file (``.gz`` is decompressed); a bad line names file and line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}: line {lineno} is a JSON {type(record).__name__}, expected an object"
                )
            records.append(record)
    return records


def load_hub_rows(dataset_id: str, config: str | None, split: str, *, task: str) -> list[dict]:
    """Rows of a Hugging Face dataset split as plain dicts (needs the optional ``datasets``)."""
    try:
        import datasets  # lazy: an optional dependency, only needed without local files
    except ImportError as exc:
        raise ImportError(
            f"task {task!r}: loading {dataset_id!r} from the Hugging Face hub needs the `datasets` "
            f"package: pip install 'gcache[hub]' (or point {DATA_DIR_ENV} at local copies)"
        ) from exc
    log.info(
        "loading %s (config=%s, split=%s) from the Hugging Face hub", dataset_id, config, split
    )
    return [dict(row) for row in datasets.load_dataset(dataset_id, config, split=split)]


def format_choices(question: str, options: list[str], letters: str = "ABCD") -> str:
    """A multiple-choice question as shown to the agents: the stem, then "A. option" lines."""
    if len(options) > len(letters):
        raise ValueError(f"{len(options)} options but only the letters {letters!r}")
    lines = [f"{letter}. {text}" for letter, text in zip(letters, options, strict=False)]
    return question.strip() + "\n" + "\n".join(lines)


def _split_count(size: Any, n: int, which: str, task: str) -> int:
    """An int is a count; a float in (0, 1) a fraction of the n examples."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise TypeError(
            f"task {task!r}: {which}_size must be an int count or a float fraction in (0, 1), got {size!r}"
        )
    if isinstance(size, float):
        if not 0.0 < size < 1.0:
            raise ValueError(
                f"task {task!r}: {which}_size={size!r} as a fraction must lie in (0, 1)"
            )
        return round(size * n)
    if size < 0:
        raise ValueError(f"task {task!r}: {which}_size={size!r} must be >= 0")
    return size


class Task(ABC):
    """Base class of the benchmark tasks (directly, or through one answer kind: NumberTask, ChoiceTask,
    CodeTask)."""

    name: str = ""
    domain: str = ""  # "math" | "science" | "medical" | "code" | "lookup": chooses the default agent roster
    answer_format: str = ""  # one sentence: how the final answer must be written
    oracle_graphs: bool = False  # every example carries `oracle_edges` (the graph that answers it)

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike | None = None,
        source: str = "auto",
        val_size: int | float = 0.1,
        test_size: int | float = 0.5,
        train_size: int | float | None = None,
        seed: int = 0,
        question_ids: list[int | str] | None = None,
    ):
        if source not in SOURCES:
            raise ValueError(f"task {self.name!r}: source={source!r} is not one of {SOURCES}")
        env_dir = os.environ.get(DATA_DIR_ENV)
        self.data_dir = (
            Path(data_dir) if data_dir is not None else (Path(env_dir) if env_dir else None)
        )
        self.source = source
        for which, size in (("val", val_size), ("test", test_size), ("train", train_size)):
            if size is not None:
                _split_count(size, 0, which, self.name)  # type and range now; counts in splits()
        self.val_size, self.test_size, self.train_size = val_size, test_size, train_size
        self.seed = seed
        self.question_ids = list(question_ids) if question_ids is not None else None
        self._examples: list[Example] | None = None

    # ------------------------------------------------------------------ data

    def _local_file(self, relpath: str) -> Path | None:
        """The local file to read, or None when the hub should be used instead.

        Raises FileNotFoundError for ``source="local"`` when the file is missing.
        """
        if self.source == "hub":
            return None
        path = self.data_dir / relpath if self.data_dir is not None else None
        if path is not None and path.is_file():
            return path
        if self.source == "local":
            where = (
                f"{path} does not exist"
                if path
                else f"no data directory given and {DATA_DIR_ENV} is not set"
            )
            raise FileNotFoundError(
                f"task {self.name!r}: {where}; pass data_dir=... or set {DATA_DIR_ENV} to a directory "
                f"holding {relpath}"
            )
        return None

    def _rows(
        self, relpath: str, hub_id: str, hub_config: str | None, hub_split: str
    ) -> list[dict]:
        """Records of the local JSONL file ``relpath`` if there is one, else of the hub dataset."""
        path = self._local_file(relpath)
        if path is not None:
            return read_jsonl(path)
        try:
            return load_hub_rows(hub_id, hub_config, hub_split, task=self.name)
        except ImportError:
            raise
        except Exception as exc:  # add what was tried locally to the hub's own error
            local = (
                f"{self.data_dir / relpath} does not exist"
                if self.data_dir
                else f"{DATA_DIR_ENV} is not set"
            )
            raise RuntimeError(
                f"task {self.name!r}: {local}, and loading {hub_id!r} from the Hugging Face hub failed: {exc}"
            ) from exc

    @abstractmethod
    def _load(self) -> list[Example]:
        """All records of the task in file order (local files, else the hub)."""

    def load_examples(self) -> list[Example]:
        """All examples in file order (loaded once, then cached)."""
        if self._examples is None:
            self._examples = self._load()
            ids = [ex.id for ex in self._examples]
            if len(set(ids)) != len(ids):
                raise ValueError(f"task {self.name!r}: example ids are not unique")
            log.info("task %s: %d examples", self.name, len(self._examples))
        return self._examples

    def _select(self, examples: list[Example]) -> list[Example]:
        by_id = {ex.id: ex for ex in examples}
        chosen = []
        for qid in self.question_ids:
            if isinstance(qid, int) and not isinstance(qid, bool) and 0 <= qid < len(examples):
                chosen.append(examples[qid])
            elif isinstance(qid, str) and qid in by_id:
                chosen.append(by_id[qid])
            else:
                raise ValueError(
                    f"task {self.name!r}: question id {qid!r} not found; use an index in "
                    f"0..{len(examples) - 1} or an example id such as {examples[0].id!r}"
                )
        if not chosen:
            raise ValueError(f"task {self.name!r}: question_ids is empty")
        return chosen

    def splits(self) -> dict[str, list[Example]]:
        """Disjoint train/val/test lists from a seeded permutation (each in file order).

        Test is carved out first, then val; train is the rest, capped at ``train_size``.
        With ``question_ids`` every split is exactly that selection (for debugging).
        """
        examples = self.load_examples()
        if self.question_ids is not None:
            chosen = self._select(examples)
            return {split: list(chosen) for split in SPLITS}
        n = len(examples)
        n_test = _split_count(self.test_size, n, "test", self.name)
        n_val = _split_count(self.val_size, n, "val", self.name)
        order = list(range(n))
        random.Random(self.seed).shuffle(order)
        parts = {
            "test": order[:n_test],
            "val": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
        if self.train_size is not None:
            parts["train"] = parts["train"][: _split_count(self.train_size, n, "train", self.name)]
        for split, idx in parts.items():
            if not idx:
                raise ValueError(
                    f"task {self.name!r}: split {split!r} is empty ({n} examples, test_size={self.test_size!r}, "
                    f"val_size={self.val_size!r}, train_size={self.train_size!r})"
                )
        return {split: [examples[i] for i in sorted(parts[split])] for split in SPLITS}

    # ------------------------------------------------------------------ scoring

    @abstractmethod
    def extract_answer(self, completion: str) -> str | None:
        """The answer a reply commits to, or None when it gives none."""

    def score_one(self, completion: str, example: Example) -> dict:
        """Details of one reply; must hold "extracted", "correct" and "reward" (float or None).
        Tasks define this, or override `score_details` to score a batch at once (code tasks)."""
        raise TypeError(f"{type(self).__name__} defines neither score_one nor score_details")

    def score_details(self, completions: list[str], examples: list[Example]) -> list[dict]:
        """Per reply: the extracted answer, whether it is correct, and the reward."""
        check_pairs(completions, examples)
        return [self.score_one(c, ex) for c, ex in zip(completions, examples, strict=True)]

    def reward(self, completions: list[str], examples: list[Example]) -> list[float | None]:
        """trl-style reward: 1.0 right, 0.0 wrong, None when the example cannot be scored."""
        return [d["reward"] for d in self.score_details(completions, examples)]

    @abstractmethod
    def target_text(self, example: Example) -> str:
        """The reference answer written as ``answer_format`` asks (teacher-forcing target)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, data_dir={str(self.data_dir)!r}, seed={self.seed})"



class NumberTask(Task):
    """A task answered with a number: the reply's final number, compared as a value."""

    def extract_answer(self, completion: str) -> str | None:
        return extract_number(completion)

    def score_one(self, completion: str, example: Example) -> dict:
        return score_number(completion, example.answer)

    def target_text(self, example: Example) -> str:
        return example.answer


class ChoiceTask(Task):
    """A multiple-choice task (options A-D): the letter the reply commits to."""

    def extract_answer(self, completion: str) -> str | None:
        return extract_choice(completion, LETTERS)

    def score_one(self, completion: str, example: Example) -> dict:
        return score_choice(completion, example.answer, LETTERS)

    def target_text(self, example: Example) -> str:
        return f"\\boxed{{{example.answer}}}"


def check_pairs(completions: list, examples: list) -> None:
    """Completions and examples must pair up one to one."""
    if len(completions) != len(examples):
        raise ValueError(
            f"got {len(completions)} completions for {len(examples)} examples; they must pair up"
        )
