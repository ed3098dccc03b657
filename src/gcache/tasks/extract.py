"""Answer extraction shared by the tasks: numbers, option letters and code blocks.

All extractors take a model reply and return a canonical string, or ``None`` when the
reply holds no answer of that kind::

    >>> extract_number("so she earns \\\\boxed{\\\\$1,234.50} in total")
    '1234.5'
    >>> extract_choice("The answer is (C).")
    'C'
    >>> extract_choice("A patient presents with fever.") is None
    True
    >>> numbers_equal("18.00", "18")
    True

Rules, in order of preference (within one rule the *last* occurrence wins, because
models restate the question and correct themselves before the final answer):

- numbers: explicit markers (``\\boxed{..}``, "the answer is ..", "answer: ..",
  ``#### ..``), whichever comes last; else the last number in the reply. ``#### n``
  is a marker only when nothing but punctuation follows the number on its line
  ("#### 1 Jack rides ..." is a section header). A minus after a number or closing
  bracket on the same line is subtraction ("6 - 2" -> 2), elsewhere a sign ("is -3").
- option letters: strong markers (``\\boxed{C}``, "answer is (C)", "Answer: C"), whichever
  comes last (a lower-case letter there counts when it ends the sentence: "answer: c");
  else weak markers ("(C)", "C)", "**C**", "option C", a line starting
  "C." or "C:", a reply that is only "C"). A capital letter followed by a word
  ("A patient presents ...") is never an answer, nor is a letter inside a word, nor a
  lower-case letter without a marker.
- code: the fenced block defining the entry point (else the last fenced block), or
  the whole reply when it has no fence.
"""

from __future__ import annotations

import functools
import math
import re
from fractions import Fraction

__all__ = [
    "find_boxed",
    "parse_number",
    "extract_number",
    "numbers_equal",
    "extract_choice",
    "extract_code",
    "score_number",
    "score_choice",
]

# ---------------------------------------------------------------------------- boxed


def find_boxed(text: str) -> list[tuple[int, str]]:
    """All ``\\boxed{...}`` / ``\\fbox{...}`` contents as (position, content), braces balanced."""
    found = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found.append((match.start(), text[start:i]))
                    break
    return found


def _unwrap_latex(s: str) -> str:
    """Drop LaTeX wrappers that carry no value: \\text{..} keeps its content, spacing goes."""
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|displaystyle)\b", "", s)
    s = re.sub(r"\\[,;:! ]", " ", s)
    return s.replace("\\%", "%").replace("\\$", "$")


# ---------------------------------------------------------------------------- numbers

# A number token: optional sign (only when not glued to a preceding word or digit; _signed
# drops a binary minus, "6 - 2"), optional currency, digits with optional thousands
# separators, optional decimals.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-−+])?\$?\s?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d+)?|\.\d+)"
)
_FRAC = re.compile(r"(?P<sign>-)?\s*\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_SLASH = re.compile(r"(?<![\w./])(?P<sign>-)?(\d+)\s*/\s*(\d+)(?![\w./])")
_MARKERS = re.compile(r"(?i:(?:final\s+)?answer\s*(?:is|:|=|would be|will be|should be)\s*:?)")
# GSM8K's "#### 72": only a line whose rest holds a number and no words; "#### 1 Jack
# rides 10 km" is a step header the model writes, not its answer.
_FINAL_LINE = re.compile(r"####[ \t]*(?=[^A-Za-z\n]*\d)[^A-Za-z\n]*$", re.M)


def _format(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


def _after_operand(text: str, pos: int) -> bool:
    """True iff ``text[pos]`` follows a digit or closing bracket, spaces aside, on its line."""
    i = pos - 1
    while i >= 0 and text[i] in " \t":
        i -= 1
    return i >= 0 and (text[i].isdigit() or text[i] in ")]}")


def _signed(text: str, match: re.Match) -> str:
    """The matched number, its minus dropped when it is a binary one ("6 - 2" -> "2")."""
    if match.group("sign") and _after_operand(text, match.start("sign")):
        return text[match.end("sign") : match.end()]
    return match.group(0)


def parse_number(text: str) -> str | None:
    """Canonical string of the number a short answer span states, or None.

    Handles ``\\frac{a}{b}``, ``a/b``, ``$``, ``%``, thousands separators, units and a
    trailing period; when the span holds several numbers (``x = 2 + 3 = 5``) the one
    after the last ``=`` and then the last one wins.
    """
    s = _unwrap_latex(text)
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    frac = _FRAC.search(s)
    if frac:
        num, den = (Fraction(x.replace(",", "")) for x in frac.group(2, 3))
        if den != 0:
            value = num / den
            return _format(-value if _signed(s, frac).startswith("-") else value)
    slash = _SLASH.search(s)
    if slash and int(slash.group(3)) != 0:
        value = Fraction(int(slash.group(2)), int(slash.group(3)))
        return _format(-value if _signed(s, slash).startswith("-") else value)
    tokens = list(_NUMBER.finditer(s))
    if not tokens:
        return None
    value = Fraction(tokens[-1].group("num").replace(",", ""))
    return _format(-value if _signed(s, tokens[-1]).startswith(("-", "−")) else value)


def _leading_number(text: str) -> str | None:
    """The number stated right after an answer marker, read up to the end of the sentence.

    "is 18 dollars. Then 3" -> 18; "is 3 + 4 = 7" -> 7 (after the last "="); "is 3/4 cup" -> 0.75.
    """
    span = re.split(r"\n|\.\s|\.$", text, maxsplit=1)[0]
    if "=" in span:
        span = span.rsplit("=", 1)[1]
    span = _unwrap_latex(span)
    fractions = (_FRAC.search(span), _SLASH.search(span))
    found = [(m.start(), 0, _signed(span, m)) for m in fractions if m]
    match = _NUMBER.search(span)
    if match:
        found.append((match.start(), 1, _signed(span, match)))
    return parse_number(min(found)[2]) if found else None


def extract_number(text: str) -> str | None:
    """The final numeric answer of a reply as a canonical string ("18", "-3", "0.75"), or None."""
    if not text:
        return None
    candidates: list[tuple[int, str]] = []
    for pos, content in find_boxed(text):
        value = parse_number(content)
        if value is not None:
            candidates.append((pos, value))
    for match in _MARKERS.finditer(text):
        value = _leading_number(text[match.end() :])
        if value is not None:
            candidates.append((match.start(), value))
    for match in _FINAL_LINE.finditer(text):
        value = _leading_number(match.group(0).removeprefix("####"))
        if value is not None:
            candidates.append((match.start(), value))
    if candidates:
        return max(candidates)[1]
    text = _unwrap_latex(text)
    spans = [(m.end(), 0, _signed(text, m)) for m in _NUMBER.finditer(text)]
    # "\frac{3}{4}" beats its "4"
    spans += [(m.end(), 1, _signed(text, m)) for m in _FRAC.finditer(text)]
    return parse_number(max(spans)[2]) if spans else None


def numbers_equal(
    a: str | None, b: str | None, *, rel_tol: float = 1e-9, abs_tol: float = 1e-6
) -> bool:
    """True iff both strings parse as numbers that agree within the tolerance (18 == 18.0).

    The relative tolerance is tiny so that large answers must match to the unit
    (1450001 != 1450000); the absolute one absorbs rounded decimals (0.3333333 == 1/3).
    """
    if a is None or b is None:
        return False
    x, y = parse_number(str(a)), parse_number(str(b))
    if x is None or y is None:
        return False
    return math.isclose(float(Fraction(x)), float(Fraction(y)), rel_tol=rel_tol, abs_tol=abs_tol)


# ---------------------------------------------------------------------------- option letters


@functools.lru_cache(maxsize=16)
def _choice_patterns(letters: str) -> tuple[re.Pattern, list[re.Pattern], re.Pattern]:
    up, low = letters.upper(), letters.lower()
    end = r"(?![A-Za-z0-9'’-])"  # the letter must not continue a word ("Apple", "B12", "C-section")
    # "answer is C", "Answer: (c)", "correct answer is option **C**", "answer: $\boxed{C}$";
    # a bare lower-case letter only where the sentence ends ("answer: c", not "answer is a bit")
    low_end = r"(?=[*_$)\]}]*(?:[.!]?[ \t]*(?:\n|\Z)|[.!;]\s))"
    strong = re.compile(
        r"(?i:\banswer\s*(?:is|:|=|would be|will be|should be)\s*:?\s*(?:the\s+)?(?:option|choice|letter)?\s*)"
        r"[*_$\s]*(?:\\boxed\{)?(?:\\text(?:bf)?\{)?"
        rf"(?:\(([{up}{low}])\)|([{up}]){end}|([{low}]){low_end})"
    )
    weak = [
        re.compile(rf"\(([{up}])\)"),  # (C)
        re.compile(rf"(?<![\w(\[])([{up}])\)"),  # C)
        re.compile(rf"\*\*\(?([{up}])(?:\)?[.:)]?\*\*|[.:)]\s)"),  # **C**, **C. text**
        re.compile(rf"(?i:\b(?:option|choice))\s+\(?([{up}]){end}"),  # option C
        re.compile(rf"^\s*[*(\[]*([{up}])[*)\]]*[.:]?\s*$"),  # the reply is just "C"
    ]
    line_start = re.compile(rf"(?m)^\s*\(?([{up}])[.:]\s")  # a line "C. Hypertension"
    return strong, weak, line_start


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The option letter a reply commits to (upper case), or None.

    ``letters`` are the allowed option letters. Lower-case letters count only after
    "answer" when delimited like ``(b)`` or ending the sentence ("answer: c."), or in
    ``\\boxed{b}``, so the article "a" ("the answer is a bit unclear") is never an
    answer. A line starting "C. ..." counts only if it is the only such line (a reply that
    merely repeats the lettered options commits to nothing).
    """
    if not text:
        return None
    allowed = set(letters.upper())
    candidates: list[tuple[int, str]] = []
    for pos, content in find_boxed(text):
        inner = _unwrap_latex(content).strip().strip("()[]*$ ")
        match = re.match(r"(?:option\s+|choice\s+)?([A-Za-z])(?![A-Za-z0-9])", inner, re.I)
        if match and match.group(1).upper() in allowed:
            candidates.append((pos, match.group(1).upper()))
    strong, weak, line_start = _choice_patterns(letters)
    for match in strong.finditer(text):
        candidates.append((match.start(), next(filter(None, match.groups())).upper()))
    if candidates:
        return max(candidates)[1]
    for pattern in weak:
        candidates += [(m.start(), m.group(1)) for m in pattern.finditer(text)]
    lines = [(m.start(), m.group(1)) for m in line_start.finditer(text)]
    if len(lines) == 1:
        candidates += lines
    return max(candidates)[1] if candidates else None


# ---------------------------------------------------------------------------- code

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The program in a reply: a fenced block (```python preferred), else the whole reply.

    Among several blocks the last one that defines ``entry_point`` wins, else the last
    Python block, else the last block of any language. An unterminated final fence
    (a reply cut off by the token limit) still counts as a block.
    """
    if text is None:
        return ""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    if not blocks:
        return text.strip("\n")
    if entry_point:
        defining = [b for _, b in blocks if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", b)]
        if defining:
            return defining[-1].strip("\n")
    python = [b for lang, b in blocks if lang in ("python", "py", "python3", "")]
    return (python or [b for _, b in blocks])[-1].strip("\n")


# ---------------------------------------------------------------------------- scoring helpers


def score_number(completion: str | None, reference: str) -> dict:
    """Score a reply against a numeric reference; a non-string reply (failed call) is unscorable."""
    if not isinstance(completion, str):
        return {"extracted": None, "correct": None, "reward": None}
    extracted = extract_number(completion)
    correct = numbers_equal(extracted, reference)
    return {"extracted": extracted, "correct": correct, "reward": float(correct)}


def score_choice(completion: str | None, reference: str, letters: str = "ABCD") -> dict:
    """Score a reply against the correct option letter; a non-string reply is unscorable."""
    if not isinstance(completion, str):
        return {"extracted": None, "correct": None, "reward": None}
    extracted = extract_choice(completion, letters)
    correct = extracted == reference
    return {"extracted": extracted, "correct": correct, "reward": float(correct)}
