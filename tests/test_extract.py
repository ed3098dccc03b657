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

# Shapes of real SmolLM2-135M replies where a minus between two numbers was read as a sign.
BINARY_MINUS_CASES = [
    ("Janet has 6 apples and gives 2 to her friend, so she has 6 - 2 =", "2"),
    ("He had 20 dollars and spent 15 on lunch. 20 - 15", "15"),
    ("She had 10 cookies.\nShe ate 3 of them: 10 -3", "3"),
    ("The team scored (3 + 4) - 2", "2"),  # after a closing parenthesis
    ("The price drops from 12 \u2212 5", "5"),  # unicode minus
    # negative numbers stay negative
    ("The temperature at night is -5 degrees", "-5"),
    ("The change in temperature is -3", "-3"),
    ("So 3 - 7 = -4", "-4"),
    ("The change is (-2) degrees.", "-2"),
    ("The answer is -3.", "-3"),
    ("The high was 12\n-5 is the low", "-5"),  # a minus opening a line is a sign
]

# "#### n" as a step header (text follows on its line) vs. as the final answer.
GSM8K_MARKER_CASES = [
    ("#### 1 Jack rides 10 km. So 10 + 2 = 12", "12"),
    (
        "#### 1. Find the cost of the apples\nThe apples cost 3 * 4 = 12 dollars.\n"
        "#### 2. Find the total\n12 + 5 = 17",
        "17",
    ),
    ("#### Step 1\nShe bakes 24 cookies and eats 4, so 24 - 4 = 20", "20"),
    ("#### 2 Tom has 5 apples and buys 3 more. 5 + 3 = 8\n#### 8", "8"),
    ("#### 1 Compute the sum\n3 + 4 = 7\n\\boxed{7}", "7"),
    ("#### 1 First add them: 3 + 4 = 7. The answer is 7.\nThen 9 more", "7"),
    # the final-answer marker keeps working, and beats numbers after it
    ("The total is 10 + 8 = 18.\n#### 18", "18"),
    ("The total is 10 + 8 = 18.\n#### 18.", "18"),
    ("#### 18\n\nQuestion: A farmer has 30 cows and sells 5.", "18"),
    ("It gets colder by 3 degrees each hour.\n#### -3\nNext: 12 hours", "-3"),
    ("She pays 1,000 + 200.\n#### $1,200 \nThat is 2 payments", "1200"),
    ("#### 6 - 2 = 4\nThen 7 more", "4"),
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


@pytest.mark.parametrize(("reply", "expected"), BINARY_MINUS_CASES)
def test_extract_number_binary_minus_is_not_a_sign(reply, expected):
    assert extract_number(reply) == expected


@pytest.mark.parametrize(("reply", "expected"), GSM8K_MARKER_CASES)
def test_extract_number_gsm8k_marker_only_at_line_end(reply, expected):
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

# A lower-case letter right after an explicit answer marker, ending its sentence.
LOWER_CASE_CHOICE_CASES = [
    ("answer: c", "C"),
    ("the answer is (b)", "B"),
    ("Answer: (d).", "D"),
    ("final answer is a", "A"),
    ("So the final answer is a.", "A"),
    ("**Answer:** c", "C"),
    ("The answer is c.\nThe patient has a fever, which fits.", "C"),
    ("The patient is febrile. Answer: b\n", "B"),
    ("The correct answer is option d.", "D"),
]

LOWER_CASE_CHOICE_NONE = [
    "a patient presents with fever",
    "I think a b c",
    "c is the most likely",
    "(b) and (c) are both possible",  # lower case without a marker
    "the answer is a mix of b and c",
    "The answer is a patient-specific one",
    "answer is d because it is common",  # not at a sentence end: fail closed
    "The answer is e",  # not an allowed letter
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


@pytest.mark.parametrize(("reply", "expected"), LOWER_CASE_CHOICE_CASES)
def test_extract_choice_lower_case_after_marker(reply, expected):
    assert extract_choice(reply) == expected


@pytest.mark.parametrize("reply", LOWER_CASE_CHOICE_NONE)
def test_extract_choice_lower_case_without_marker_is_none(reply):
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
