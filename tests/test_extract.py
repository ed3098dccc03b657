"""Answer extraction: numbers, option letters and code blocks, on tricky replies."""

from __future__ import annotations

import pytest

from gcache.tasks.extract import (
    extract_choice,
    extract_code,
    extract_number,
    find_boxed,
    numbers_equal,
)

NUMBER_CASES = [
    ("The answer is 18.", "18"),
    ("so she makes \\boxed{\\$1,234.50} in total", "1234.5"),
    ("\\boxed{18 \\text{ dollars}}", "18"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("First 3 + 4 = 7, then \\boxed{\\frac{3}{4}} of that", "0.75"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5"),
    ("The final answer is $\\boxed{1,450,000}$.", "1450000"),
    ("The answer is: $18.", "18"),
    ("The answer is 3 + 4 = 7", "7"),  # the value after the last "=", not the first number
    ("The answer is 3/4 cup", "0.75"),
    ("It drops by 10 degrees, so the change is -10.", "-10"),
    ("She gets 12 - 5 = 7 apples.", "7"),  # "- 5" is subtraction, not a negative number
    ("The temperature is \u221210 degrees", "-10"),  # unicode minus
    ("About 50% of the class", "50"),
    ("answer: 18.00", "18"),
    ("\\boxed{2} is wrong, the answer is 5", "5"),  # the last explicit marker wins
    (
        "The answer is 5. Check: 5 * 2 = 10 and 10 / 2 = 5, then 99 others",
        "5",
    ),  # marker beats a later bare number
    ("\\boxed{\\text{x} = 12}", "12"),
    ("\\boxed{{12}}", "12"),  # nested braces
    ("x = \\frac{3}{4}", "0.75"),  # no marker: the last number, a fraction
    ("She has 1,234 apples and 56 pears", "56"),
    ("**Answer:** 42 marbles", "42"),
]

NUMBER_NONE = [
    "",
    "I don't know.",
    "The answer is unclear.",
    "\\boxed{}",
    "mp3 player",  # digits inside a word are not numbers
    "Version B of the plan",
]


@pytest.mark.parametrize(("reply", "expected"), NUMBER_CASES)
def test_extract_number(reply, expected):
    assert extract_number(reply) == expected


@pytest.mark.parametrize("reply", NUMBER_NONE)
def test_extract_number_none(reply):
    assert extract_number(reply) is None


def test_numbers_equal_tolerance():
    assert numbers_equal("18", "18.0")
    assert numbers_equal("18.00", "18")
    assert numbers_equal("1,234.5", "1234.50")
    assert numbers_equal("0.3333333", "\\frac{1}{3}")
    assert not numbers_equal("18", "18.1")
    assert not numbers_equal("1450001", "1,450,000")  # large answers must match to the unit
    assert not numbers_equal(None, "18")
    assert not numbers_equal("abc", "18")


def test_find_boxed_nested():
    assert find_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x{y}z}") == [
        (2, "\\frac{1}{2}"),
        (24, "x{y}z"),
    ]
    assert find_boxed("\\boxed{unclosed") == []


CHOICE_CASES = [
    ("\\boxed{C}", "C"),
    ("\\boxed{\\text{C}}", "C"),
    ("The final answer is $\\boxed{\\textbf{(B)}}$", "B"),
    ("Answer: C", "C"),
    ("The answer is (C).", "C"),
    ("answer is (b)", "B"),  # lower case counts when delimited
    ("The correct answer is option D because ...", "D"),
    ("(C)", "C"),
    ("C) Hypertension", "C"),
    ("After thinking: **C**", "C"),
    ("C", "C"),
    ("  B.\n", "B"),
    ("Answer: **A**", "A"),
    ("A patient with fever... The answer is B.", "B"),  # the article A is not an answer
    (
        "The answer is A. Option (D) is wrong because it is rare.",
        "A",
    ),  # strong marker beats a later weak one
    ("I first thought \\boxed{A}, but the answer is C", "C"),  # the last explicit marker wins
    ("Option A is unlikely; option C fits best", "C"),
    ("Considering everything.\nC. Hypertension", "C"),
    ("answer: $\\boxed{D}$", "D"),
    ("**Answer:** C", "C"),
    ("Answer: (A) Hypertension", "A"),
]

CHOICE_NONE = [
    "A patient presents with fever.",
    "A 45-year-old man comes to the clinic.",
    "the answer is a bit unclear",
    "Vitamin B12 deficiency is common.",
    "CAD is the most likely cause.",  # letters inside a word
    "**A patient** is described",
    "Type A personality",
    "Both B and C are plausible.",
    "Answer: Hypertension",
    "Option E",  # not an allowed letter
    "A. foo\nB. bar\nC. baz\nD. qux",  # only repeats the option list
    "",
]


@pytest.mark.parametrize(("reply", "expected"), CHOICE_CASES)
def test_extract_choice(reply, expected):
    assert extract_choice(reply) == expected


@pytest.mark.parametrize("reply", CHOICE_NONE)
def test_extract_choice_none(reply):
    assert extract_choice(reply) is None


def test_extract_choice_respects_allowed_letters():
    assert extract_choice("The answer is E", letters="ABCDE") == "E"
    assert extract_choice("The answer is E", letters="ABCD") is None


def test_extract_code_prefers_block_defining_entry_point():
    reply = (
        "Helper:\n```python\ndef helper(x):\n    return x\n```\n"
        "Solution:\n```python\ndef add(a, b):\n    return a + b\n```\nTest:\n```python\nprint(add(1, 2))\n```"
    )
    assert extract_code(reply, "add") == "def add(a, b):\n    return a + b"
    assert extract_code(reply) == "print(add(1, 2))"  # no entry point: the last python block


def test_extract_code_without_fence_and_unterminated_fence():
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1"
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n") == "def f():\n    return 1"
    assert extract_code("```\nx = 1\n```") == "x = 1"
