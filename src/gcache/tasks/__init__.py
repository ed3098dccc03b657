"""Benchmark tasks: loading, splits, answer extraction and rewards.

    from gcache.tasks import build_task
    task = build_task("gsm8k", seed=0)      # or "arith", "lookup", "gpqa", "medqa", "humaneval", "mbppplus"
    splits = task.splits()                  # {"train": [Example...], "val": [...], "test": [...]}
    rewards = task.reward(completions, splits["val"][: len(completions)])

Every task sets ``domain`` (the default agent roster) and ``answer_format`` (the sentence
that tells the model how to write its final answer); ``target_text(example)`` is the
reference answer in that format.
"""

from __future__ import annotations

from .arith import Arith
from .base import Example, Task
from .gpqa import GPQA
from .gsm8k import GSM8K
from .humaneval import HumanEvalPlus
from .lookup import Lookup
from .mbppplus import MbppPlus
from .medqa import MedQA

__all__ = ["TASKS", "build_task", "Example", "Task"]

TASKS: dict[str, type[Task]] = {
    "arith": Arith,
    "lookup": Lookup,
    "gsm8k": GSM8K,
    "gpqa": GPQA,
    "medqa": MedQA,
    "humaneval": HumanEvalPlus,
    "mbppplus": MbppPlus,
}


def build_task(name: str, **kwargs) -> Task:
    """The task called ``name``, built with ``kwargs`` (sizes, seed, data_dir, task options)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
    return TASKS[name](**kwargs)
