"""Rewards: the reference answer in the answer format scores 1.0 for every example of every
non-code task (code tasks: test_tasks_code.py), wrong answers 0.0, unscorable replies None."""

from __future__ import annotations

import pytest

from gcache.tasks import TASKS, build_task

TEXT_TASKS = [
    ("gsm8k", {}),
    ("gpqa", {}),
    ("medqa", {}),
    ("medqa", {"subset": "us1273"}),
    ("arith", {}),
]


def wrong_answer(task, example) -> str:
    if task.domain == "math":
        return f"\\boxed{{{int(example.answer) + 1}}}"
    return "\\boxed{" + next(c for c in "ABCD" if c != example.answer) + "}"


@pytest.mark.parametrize(("name", "kwargs"), TEXT_TASKS)
def test_target_text_round_trip_for_every_example(data_dir, name, kwargs):
    task = build_task(name, data_dir=data_dir, **kwargs)
    examples = task.load_examples()
    targets = [task.target_text(ex) for ex in examples]
    if name == "arith":  # asks for the bare number: the target is the number itself
        assert targets == [ex.answer for ex in examples]
    else:
        assert all(t.startswith("\\boxed{") for t in targets)
    assert task.reward(targets, examples) == [1.0] * len(examples)
    # the same answer inside a longer reply still scores
    replies = [f"Let me think step by step. ... So the final answer is {t}." for t in targets[:50]]
    assert task.reward(replies, examples[:50]) == [1.0] * 50
    assert task.reward([wrong_answer(task, ex) for ex in examples], examples) == [0.0] * len(
        examples
    )


@pytest.mark.parametrize("name", sorted(TASKS))
def test_unscorable_reply_is_none(data_dir, name):
    task = build_task(name, data_dir=data_dir)
    example = task.load_examples()[0]
    assert task.reward([None], [example]) == [None]


def test_reply_without_answer_scores_zero(data_dir):
    gsm = build_task("gsm8k", data_dir=data_dir)
    gpqa = build_task("gpqa", data_dir=data_dir)
    assert gsm.reward(["I am not sure."], gsm.load_examples()[:1]) == [0.0]
    assert gpqa.reward(["A tricky question about quantum states."], gpqa.load_examples()[:1]) == [
        0.0
    ]


def test_numeric_answers_compare_with_tolerance(data_dir):
    task = build_task("gsm8k", data_dir=data_dir)
    ex = task.load_examples()[0]  # answer 18
    replies = [
        "#### 18",
        "The answer is 18.00",
        "\\boxed{\\$18}",
        "\\boxed{18 \\text{ dollars}}",
        "18.0",
    ]
    assert task.reward(replies, [ex] * len(replies)) == [1.0] * len(replies)
    # shapes of real small-model replies: a "#### n" step header, a subtraction at the end
    small_model = [
        "#### 1 Add the two amounts. 10 + 8 = 18",
        "Tom has 20 cards, 18 of them red. 20 - 18",
    ]
    assert task.reward(small_model, [ex] * 2) == [1.0, 1.0]
    big = next(e for e in task.load_examples() if e.answer == "1450000")
    assert task.reward(
        ["\\boxed{1,450,000}", "\\boxed{1450000.0}", "\\boxed{145000}"], [big] * 3
    ) == [1.0, 1.0, 0.0]


def test_score_details_fields(data_dir):
    task = build_task("medqa", data_dir=data_dir)
    ex = task.load_examples()[0]
    right, wrong = task.score_details(
        [f"The answer is ({ex.answer})", "A patient presents..."], [ex, ex]
    )
    assert right == {"extracted": ex.answer, "correct": True, "reward": 1.0}
    assert wrong == {"extracted": None, "correct": False, "reward": 0.0}
    assert task.extract_answer("Answer: B") == "B"
    assert task.score_details([f"answer: {ex.answer.lower()}"], [ex])[0]["correct"] is True
    assert task.extract_answer("I think a b c") is None


def test_lengths_must_pair_up(data_dir):
    task = build_task("arith")
    with pytest.raises(ValueError, match="got 2 completions for 1 examples"):
        task.reward(["1", "2"], task.load_examples()[:1])


def test_answer_format_matches_target_text(data_dir):
    for name in TASKS:
        task = build_task(name, data_dir=data_dir)
        target = task.target_text(task.load_examples()[0])
        if task.domain == "code":
            assert (
                "```python" in task.answer_format
                and target.startswith("```python\n")
                and target.endswith("\n```")
            )
        elif name in ("arith", "lookup"):
            assert "only the final number" in task.answer_format and target == task.load_examples()[0].answer
        else:
            assert "\\boxed{" in task.answer_format and target.startswith("\\boxed{")
