"""Arith: the embedded default task — small multi-step arithmetic word problems, no download.

    task = Arith()                              # 600 problems of 1-2 steps, data_seed=0
    task = Arith(min_steps=2, max_steps=4)      # harder; Arith(difficulty=3) = exactly 3 steps
    task.load_examples()[0].question
    # e.g. 'Tom has 7 apples. He buys 5 more apples. How many apples does he have now?'

Problems are generated from ``data_seed`` (not the split ``seed``, so the question set
stays fixed while split seeds vary). Each problem keeps a running integer through
``steps`` operations written in plain English: a start (a number, or a product such as
"3 bags with 4 apples in each bag" = one step), then additions and subtractions, and
optionally a final multiplication or exact division that changes the question ("shares
them equally among 3 friends ..."). Scenarios: items, money, shopping, ages, distance,
each with several templates per operation. Answers are non-negative integers with
small operands (the embedded model has 135M parameters). Scored like GSM8K.
"""

from __future__ import annotations

import random

from .base import Example, NumberTask

NAMES = [
    ("Tom", "he"),
    ("Anna", "she"),
    ("Ben", "he"),
    ("Mia", "she"),
    ("Sam", "he"),
    ("Lily", "she"),
    ("Max", "he"),
    ("Emma", "she"),
    ("Leo", "he"),
    ("Sara", "she"),
    ("Jack", "he"),
    ("Nora", "she"),
]
PRONOUNS = {"he": ("he", "him", "his"), "she": ("she", "her", "her")}
RELATIVES = ["sister", "brother", "cousin", "aunt", "uncle", "friend"]

# Templates per scenario. "mid" operations are sentences; "final" ones end the problem
# with their own question; otherwise the scenario's "question" ends it.
SCENARIOS = {
    "items": {
        "things": [
            "apples",
            "marbles",
            "stickers",
            "pencils",
            "books",
            "cookies",
            "cards",
            "shells",
            "balloons",
        ],
        "start": [
            "{name} has {a} {item}.",
            "{name} starts with {a} {item}.",
            "{name} collected {a} {item}.",
        ],
        "start_mul": [
            "{name} buys {a} bags of {item}. Each bag has {b} {item}.",
            "{name} has {a} boxes with {b} {item} in each box.",
            "{name} gets {b} {item} every day for {a} days.",
        ],
        "add": [
            "{He} buys {n} more {item}.",
            "{His} friend gives {him} {n} more {item}.",
            "Then {he} finds {n} more {item}.",
            "{His} mother gives {him} {n} {item}.",
        ],
        "sub": [
            "{He} gives {n} {item} to {his} friend.",
            "{He} loses {n} {item}.",
            "Then {he} gives away {n} {item}.",
            "{He} sells {n} {item}.",
        ],
        "question": [
            "How many {item} does {name} have now?",
            "How many {item} does {he} have now?",
        ],
        "mul_final": [
            "The {item} cost {n} dollars each. How many dollars are all of {his} {item} worth?"
        ],
        "div_final": [
            "{He} shares the {item} equally among {n} friends. How many {item} does each friend get?",
            "{He} puts the {item} into {n} boxes with the same number in each box. "
            "How many {item} are in each box?",
        ],
    },
    "money": {
        "start": ["{name} has {a} dollars.", "{name} saved {a} dollars."],
        "start_mul": [
            "{name} earns {b} dollars each day for {a} days.",
            "{name} sells {a} cups of lemonade for {b} dollars each.",
        ],
        "add": [
            "{He} earns {n} more dollars.",
            "{His} grandmother gives {him} {n} dollars.",
            "Then {he} finds {n} dollars.",
        ],
        "sub": [
            "{He} spends {n} dollars on a book.",
            "{He} buys a toy for {n} dollars.",
            "Then {he} pays {n} dollars for lunch.",
        ],
        "question": [
            "How many dollars does {name} have now?",
            "How much money does {he} have now, in dollars?",
        ],
        "div_final": [
            "{He} splits the money equally among {n} friends. How many dollars does each friend get?"
        ],
    },
    "shopping": {
        "things": ["notebooks", "pens", "apples", "toy cars", "cupcakes", "tickets"],
        "start": ["{name} pays {a} dollars for a shirt.", "{name} spends {a} dollars at the shop."],
        "start_mul": [
            "{name} buys {a} {item} that cost {b} dollars each.",
            "{name} buys {a} {item}. Each one costs {b} dollars.",
        ],
        "add": [
            "{He} also pays {n} dollars for a bag.",
            "Then {he} buys a drink for {n} dollars.",
            "{He} adds a card that costs {n} dollars.",
        ],
        "sub": [
            "{He} has a coupon for {n} dollars off.",
            "The shop gives {him} a discount of {n} dollars.",
        ],
        "question": ["How many dollars does {name} pay in total?"],
        "div_final": [
            "The cost is shared equally by {n} friends. How many dollars does each friend pay?"
        ],
    },
    "ages": {
        "start": ["{name} is {a} years old."],
        "add": ["{New} is {n} years older than {prev}.", "{New} was born {n} years before {prev}."],
        "sub": [
            "{New} is {n} years younger than {prev}.",
            "{New} was born {n} years after {prev}.",
        ],
        "question": ["How old is {prev}?"],
        "add_final": ["How old will {prev} be in {n} years?"],
        "mul_final": ["{New} is {n} times as old as {prev}. How old is {new}?"],
    },
    "distance": {
        "start": [
            "{name} rides {his} bike {a} km on Monday.",
            "{name} walks {a} km in the morning.",
        ],
        "start_mul": [
            "{name} rides {his} bike at {b} km per hour for {a} hours.",
            "{name} runs {b} km every day for {a} days.",
        ],
        "add": [
            "Then {he} goes {n} more km.",
            "After lunch {he} goes another {n} km.",
            "In the evening {he} goes {n} km more.",
        ],
        "question": ["How many km does {name} go in total?"],
        "div_final": [
            "{He} splits the whole way into {n} equal parts. How many km long is each part?"
        ],
    },
}


def _fill(template: str, fields: dict) -> str:
    text = template.format(**fields)
    return text[0].upper() + text[1:]


def generate_problem(rng: random.Random, steps: int) -> tuple[str, int, dict]:
    """One problem with exactly ``steps`` arithmetic operations: (question, answer, meta)."""
    kind = rng.choice(sorted(SCENARIOS))
    sc = SCENARIOS[kind]
    name, gender = rng.choice(NAMES)
    he, him, his = PRONOUNS[gender]
    fields = {
        "name": name,
        "he": he,
        "He": he.capitalize(),
        "him": him,
        "his": his,
        "His": his.capitalize(),
        "item": rng.choice(sc.get("things", ["things"])),
        "prev": name,
    }
    relatives = rng.sample(RELATIVES, len(RELATIVES))
    sentences, ops, used = [], [], set()
    if "start_mul" in sc and rng.random() < 0.35:
        a, b = rng.randint(2, 6), rng.randint(2, 10)
        value, expression = a * b, f"{a} * {b}"
        sentences.append(_fill(rng.choice(sc["start_mul"]), {**fields, "a": a, "b": b}))
        ops.append("mul")
    else:
        value = rng.randint(3, 20)
        expression = str(value)
        sentences.append(_fill(rng.choice(sc["start"]), {**fields, "a": value}))
    question = None  # set by a final operation, else the scenario's question at the end
    while len(ops) < steps:
        last = len(ops) == steps - 1
        divisors = [d for d in range(2, 6) if value % d == 0 and value // d >= 2]
        choices = ["add"] + ["sub"] * ("sub" in sc and value >= 3)
        if last:
            choices += ["add_final"] * ("add_final" in sc) + ["mul_final"] * (
                "mul_final" in sc and value <= 15
            )
            choices += ["div_final"] * ("div_final" in sc and bool(divisors))
        op = rng.choice(choices)
        if op in ("add", "add_final"):
            n = rng.randint(2, 10)  # no 1s anywhere: "1 dollars" reads badly
            value += n
        elif op == "sub":
            n = rng.randint(2, min(10, value - 1))
            value -= n
        elif op == "mul_final":
            n = rng.randint(2, 3 if kind == "ages" else 5)
            value *= n
        else:  # div_final: an exact division
            n = rng.choice(divisors)
            value //= n
        symbol = {"add": "+", "add_final": "+", "sub": "-", "mul_final": "*", "div_final": "//"}[op]
        expression = f"({expression} {symbol} {n})"
        new = f"{name}'s {relatives[len(ops) % len(relatives)]}"
        unused = [t for t in sc[op] if t not in used] or sc[op]  # vary the wording within a problem
        template = rng.choice(unused)
        used.add(template)
        text = _fill(template, {**fields, "n": n, "New": new, "new": new})
        if op.endswith("_final"):
            question = text
        else:
            sentences.append(text)
            fields["prev"] = new  # ages: the next relation refers to the person just introduced
        ops.append(op.removesuffix("_final"))
    question = question or _fill(rng.choice(sc["question"]), fields)
    return (
        " ".join(sentences + [question]),
        value,
        {"steps": steps, "scenario": kind, "ops": ops, "expression": expression},
    )


class Arith(NumberTask):
    name = "arith"
    domain = "math"
    # Small models answer best when asked for the bare number (DESIGN §6); extraction still
    # accepts \boxed{}, "The answer is", or the last number.
    answer_format = "Reply with only the final number."

    def __init__(
        self,
        *,
        num_examples: int = 600,
        min_steps: int = 1,
        max_steps: int = 2,
        difficulty: int | None = None,
        data_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if difficulty is not None:
            min_steps = max_steps = difficulty
        if not 1 <= min_steps <= max_steps:
            raise ValueError(
                f"task 'arith': need 1 <= min_steps <= max_steps, got min_steps={min_steps}, "
                f"max_steps={max_steps}"
            )
        if num_examples < 1:
            raise ValueError(f"task 'arith': num_examples must be >= 1, got {num_examples}")
        self.num_examples, self.data_seed = num_examples, data_seed
        self.min_steps, self.max_steps = min_steps, max_steps

    def _load(self) -> list[Example]:
        rng = random.Random(f"arith:{self.data_seed}")
        examples, seen = [], set()
        for _ in range(self.num_examples * 50):
            if len(examples) == self.num_examples:
                break
            question, answer, meta = generate_problem(
                rng, rng.randint(self.min_steps, self.max_steps)
            )
            if question in seen:
                continue
            seen.add(question)
            i = len(examples)
            examples.append(
                Example(
                    id=f"arith/{i}",
                    question=question,
                    answer=str(answer),
                    meta={"index": i, **meta},
                )
            )
        if len(examples) < self.num_examples:
            raise ValueError(
                f"task 'arith': could only generate {len(examples)} distinct problems, "
                f"num_examples={self.num_examples}"
            )
        return examples
