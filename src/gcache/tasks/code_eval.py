"""Scoring of the code tasks (HumanEval+, MBPP+): outputs in one process, comparisons in another.

Both tasks use the EvalPlus "OriginFmt" tests, where one loop checks every base and
plus input::

    for i, (inp, exp) in enumerate(zip(inputs, results)):   # or: for i, inp in enumerate(inputs):
        assertion(candidate(*inp), exp, 0)

A reply is scored in two sandbox runs. The **recorder** (the reply's code, then
:func:`record_outputs`: the test's ``inputs`` and a loop) calls the candidate on each
input and sends its return value out as a note in a data-only format: tagged JSON of
None, bool, int, float (nan, inf), str, bytes, complex, list, tuple, dict, set, frozenset,
range, dict views, Counter/OrderedDict/defaultdict/deque, Fraction, Decimal, numeric
numpy scalars and arrays, ``re.Match`` (its string, span, groups) and builtin iterators
(consumed). Anything else, subclasses included, fails to encode: that input fails. The
recorder holds neither the expected values nor the test's helpers. The **harness**
(:func:`harness_program`: the test's code and the notes, no reply code) decodes the
values (numpy scalars as the Python numbers they hold, arrays at 64 bits: ``float16(3000)
== 3001``) and runs the test's own comparisons on them, one input at a time
(:func:`instrument_test`). Before the test's ``assertion(out, exp, atol)`` sees an output,
the harness checks it against the expected value (``_gcache_unlike``): the same kind at
every depth (a bool is not a number, int and float are both numbers, a list is not a
tuple, mappings are mappings, sets sets, an array is neither a list nor a number), the
same lengths, keys and numpy shapes; where the assertion compares ``set(out)`` with
``set(exp)`` only the set's items are checked (:func:`comparison_test`). The tests'
np.allclose would otherwise pass ``[]`` for 3.5 (it broadcasts) and a tuple for a list. An
output whose JSON is over 256 KiB (or past 3 MiB in a run, or holding an int of over 4300
digits) goes as a SHA-256 digest of a canonical binary form and passes only if the
expected value has the same digest: large outputs are compared exactly (no float
tolerance, no reordering).

Counts come only from ``SANDBOX_TALLY`` calls on the lines after the reply's code (see
``sandbox``, :func:`tally_lines`). A reply passes iff the recorder ran to its end with one
note per input and the harness passed every input; the fraction is the share of inputs
passed (a crashed recorder keeps the notes it sent, a timed-out one none). Records with
raised ``meta["limits"]`` get them for both runs.

Protected: exiting early, printing or forging results, calling ``SANDBOX_TALLY``; and the
comparisons themselves: always-equal objects, rebound ``assertion``/numpy helpers, patched
builtins, reading ``exp`` or ``ref_func``, mutating the inputs ``ref_func`` sees; outputs
of another kind, length, keys or shape than expected, and numpy's low precisions. Not
protected: the recorder is the reply's process, so a note is the reply's word about its
return value (it can send any data it could have returned); a reply sees the inputs and
can hard-code answers; a test that checks nothing (the ``re.Match`` assertion of MBPP+
737, 787, 794 asserts nothing) passes anything.
"""

from __future__ import annotations

import os
import re
from abc import abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .base import Example, Task, check_pairs
from .extract import extract_code
from .sandbox import SandboxResult, run_program

__all__ = [
    "instrument_test",
    "comparison_test",
    "record_outputs",
    "harness_program",
    "tally_lines",
    "score_programs",
    "HEADER",
    "HARNESS_HEADER",
    "FOOTER",
]

# The single-line body of the test loop, captured with its indentation.
_LOOP = re.compile(
    r"^(?P<ind>[ \t]*)(?P<head>for i, (?:\(inp, exp\) in enumerate\(zip\(inputs, results\)\)"
    r"|inp in enumerate\(inputs\)):)[ \t]*\n(?P=ind)[ \t]+(?P<body>\S[^\n]*)$",
    re.M,
)
# The test's comparison function, down to its last indented line.
_ASSERTION = re.compile(
    r"^def assertion\(out, exp, atol\):\n(?P<body>(?:[ \t]*\n|[ \t]+\S[^\n]*\n)+)", re.M
)
_INPUTS = re.compile(r"^[ \t]*inputs = (?P<src>\S[^\n]*)$", re.M)
_TALLY_CALL = re.compile(r'\bSANDBOX_TALLY\("(\w+)"')
_OUTPUT = "output"  # the recorder's tally (and kept note) per input

# Encoding of return values (both processes) and decoding (the harness only). The encoder
# runs in the reply's process, so it is the reply's to change: what it sends is only ever
# decoded into the types below, which compare as they always do.
_CODEC = r'''
def _gcache_codec():
    """Return values as tagged JSON, or a digest (written by gcache.tasks.code_eval)."""
    import json, marshal, sys
    dumps, loads = json.dumps, json.loads
    scalars = frozenset({type(None), bool, int, float, str})
    plain = scalars.issuperset
    batch, max_depth = 1024, 100
    factories = {None: None, int: "int", float: "float", str: "str", bool: "bool",
                 list: "list", dict: "dict", set: "set", tuple: "tuple"}
    consumed = {}  # id -> (iterator, its items): an output is encoded up to twice

    def pairs(items, depth):
        return [[encode(k, depth), encode(v, depth)] for k, v in items]

    def encode(x, depth=0):
        t = type(x)
        if t in scalars:
            return x
        if depth > max_depth:
            raise ValueError("output nested too deeply")
        depth += 1
        if t is list:
            return x if plain(map(type, x)) else [encode(e, depth) for e in x]
        if t is tuple:
            return {"t": x if plain(map(type, x)) else [encode(e, depth) for e in x]}
        if t is dict:
            return {"d": pairs(dict.items(x), depth)}
        if t is set or t is frozenset:  # sorted: equal sets encode alike
            return {"s" if t is set else "f": sorted((encode(e, depth) for e in x), key=dumps)}
        if t is complex:
            return {"c": [x.real, x.imag]}
        if t is bytes or t is bytearray:
            return {"b" if t is bytes else "ba": x.hex()}
        if t is range:
            return {"r": [x.start, x.stop, x.step]}
        name = f"{t.__module__}.{t.__qualname__}"
        if name in ("collections.Counter", "collections.OrderedDict"):
            return {name[12:]: pairs(dict.items(x), depth)}
        if name == "collections.defaultdict":
            return {"defaultdict": [factories.get(x.default_factory), pairs(dict.items(x), depth)]}
        if name == "collections.deque":
            return {"deque": [[encode(e, depth) for e in x], x.maxlen]}
        if name in ("builtins.dict_keys", "builtins.dict_values"):
            return {name[9:]: [encode(e, depth) for e in x]}
        if name == "builtins.dict_items":
            return {"dict_items": pairs(x, depth)}
        if name == "fractions.Fraction":
            return {"Fraction": [int(x.numerator), int(x.denominator)]}
        if name == "decimal.Decimal":
            return {"Decimal": str(x)}
        if name == "re.Match":
            return {"Match": [encode(x.string, depth), list(x.span()), encode(x.groups(), depth)]}
        np = sys.modules.get("numpy")
        if np is not None and (t is np.ndarray or isinstance(x, np.generic)):
            if x.dtype.kind not in "biufc" or x.dtype.fields:
                raise TypeError(f"a numpy {x.dtype} value is not plain data")
            if t is np.ndarray:
                return {"ndarray": [x.dtype.str, list(x.shape), encode(x.tolist(), depth)]}
            return {"numpy": [x.dtype.str, encode(x.item(), depth)]}
        if hasattr(t, "__next__") and t.__module__ in ("builtins", "itertools"):
            items = consumed.setdefault(id(x), (x, list(x)))[1]
            return {"iter": [encode(e, depth) for e in items]}
        raise TypeError(f"{name} is not plain data")

    def big(part):
        return any((type(e) is list or type(e) is tuple) and len(e) > batch for e in part)

    def chunks(x, depth=0):
        """The JSON text of encode(x) in pieces: long lists and tuples a batch at a time."""
        t = type(x)
        if (t is list or t is tuple) and len(x) > batch:
            yield "[" if t is list else '{"t": ['
            for start in range(0, len(x), batch):
                if start:
                    yield ", "
                part = list(x[start:start + batch])
                if big(part):
                    for j, e in enumerate(part):
                        if j:
                            yield ", "
                        yield from chunks(e, depth + 1)
                else:
                    yield dumps(encode(part, depth))[1:-1]
            yield "]" if t is list else "]}"
        else:
            yield dumps(encode(x, depth))

    def pieces(x, depth=0):
        """A canonical binary form of encode(x): marshal (version 2: no references), a batch at
        a time, each piece tagged (and long lists and tuples led by their length)."""
        t = type(x)
        if (t is list or t is tuple) and len(x) > batch:
            yield (b"L" if t is list else b"T") + len(x).to_bytes(8, "little")
            for start in range(0, len(x), batch):
                part = list(x[start:start + batch])
                if big(part):
                    for e in part:
                        yield from pieces(e, depth + 1)
                else:
                    yield b"B" + marshal.dumps(encode(part, depth), 2)
        else:
            yield b"E" + marshal.dumps(encode(x, depth), 2)

    def digest(x):
        """(SHA-256 of x's canonical binary form, its length in bytes)."""
        import hashlib
        h, size = hashlib.sha256(), 0
        for piece in pieces(x):
            h.update(piece)
            size += len(piece)
        return h.hexdigest(), size

    def note(x, sent, per_output=2**18, per_run=3 * 2**20):
        """The recorder's note for one return value: ["=", its encoding] while that is short,
        else ["#", its digest, length]."""
        limit, text, size, parts = min(per_output, per_run - sent[0]), None, 0, []
        digits = getattr(sys, "set_int_max_str_digits", None)  # Python >= 3.10.7
        old = sys.get_int_max_str_digits() if digits else None
        try:
            if digits:
                digits(4300)  # longer ints (slow to print) go by digest
            try:
                for chunk in chunks(x):
                    size += len(chunk)
                    parts.append(chunk)
                    if size > limit:
                        break
                else:
                    text = "".join(parts)
            except ValueError as exc:
                if "integer string conversion" not in str(exc):
                    raise
            finally:
                if digits:
                    digits(old)
            if text is None:
                return dumps(["#", *digest(x)])
        finally:
            consumed.clear()
        sent[0] += len(text)
        return '["=", ' + text + "]"

    def error(exc):
        """The recorder's note for an input whose call (or encoding) raised `exc`."""
        try:
            text = f"{type(exc).__name__}: {str(exc)[:300]}"
        except Exception:
            text = "an exception that cannot be shown"
        return dumps(["!", text[:400]])

    def decode(node):
        t = type(node)
        if t is list:
            return [decode(e) for e in node] if {list, dict} & set(map(type, node)) else node
        if t is not dict:
            return node
        if len(node) != 1:
            raise ValueError("malformed output")
        (tag, v), = node.items()
        if tag in ("t", "s", "f", "iter", "dict_keys", "dict_values"):
            items = decode(checked(v, list))
            kind = {"t": tuple, "s": set, "f": frozenset, "iter": iter}.get(tag)
            if kind is not None:
                return kind(items)
            if tag == "dict_keys":
                return dict.fromkeys(items).keys()
            return dict(enumerate(items)).values()
        if tag in ("d", "dict_items"):
            mapping = decode_pairs(v)
            return mapping if tag == "d" else mapping.items()
        import collections
        if tag in ("Counter", "OrderedDict"):
            return getattr(collections, tag)(decode_pairs(v))
        if tag == "defaultdict":
            factory, items = checked(v, list, 2)
            kinds = {name: kind for kind, name in factories.items()}
            return collections.defaultdict(kinds[factory], decode_pairs(items))
        if tag == "deque":
            items, maxlen = checked(v, list, 2)
            if maxlen is not None:
                checked(maxlen, int)
            return collections.deque(decode(checked(items, list)), maxlen)
        if tag == "c":
            real, imag = checked(v, list, 2)
            return complex(checked(real, (int, float)), checked(imag, (int, float)))
        if tag in ("b", "ba"):
            return (bytes if tag == "b" else bytearray).fromhex(checked(v, str))
        if tag == "r":
            return range(*[checked(n, int) for n in checked(v, list, 3)])
        if tag == "Fraction":
            from fractions import Fraction
            return Fraction(*[checked(n, int) for n in checked(v, list, 2)])
        if tag == "Decimal":
            from decimal import Decimal
            return Decimal(checked(v, str))
        if tag == "Match":
            string, span, groups = checked(v, list, 3)
            start, end = [checked(n, int) for n in checked(span, list, 2)]
            return Match(decode(string), (start, end), checked(decode(groups), tuple))
        if tag == "numpy":  # a scalar: the Python number it holds (float16(3000) == 3001)
            dtype, value = checked(v, list, 2)
            return checked(decode(value), python_types[numpy_kind(dtype)])
        if tag == "ndarray":  # at 64 bits, whatever precision the reply used
            import numpy as np
            dtype, shape, data = checked(v, list, 3)
            array = np.array(decode(data), dtype=wide_dtypes[numpy_kind(dtype)])
            shape = tuple(checked(n, int) for n in checked(shape, list))
            return array if array.shape == shape else array.reshape(shape)
        raise ValueError(f"unknown output tag {tag!r}")

    python_types = {"b": bool, "i": int, "u": int, "f": float, "c": complex}
    wide_dtypes = {"b": "?", "i": "i8", "u": "u8", "f": "f8", "c": "c16"}

    def numpy_kind(dtype):
        return checked(dtype, str, pattern=r"[<>|=][biufc][0-9]{1,2}")[1]

    def decode_pairs(items):
        entries = [checked(p, list, 2) for p in checked(items, list)]
        return {decode(k): decode(v) for k, v in entries}

    def checked(value, kind, length=None, pattern=None):
        if type(value) not in (kind if type(kind) is tuple else (kind,)):
            raise ValueError("malformed output")
        if length is not None and len(value) != length:
            raise ValueError("malformed output")
        if pattern is not None:
            import re
            if re.fullmatch(pattern, value) is None:
                raise ValueError("malformed output")
        return value

    class Match:
        """A reply's re.Match rebuilt from its data (string, span of group 0, groups); like a
        Match it is true and compares by identity."""

        __slots__ = ("string", "_span", "_groups")

        def __init__(self, string, span, groups):
            self.string, self._span, self._groups = string, span, groups

        def span(self):
            return self._span

        def start(self):
            return self._span[0]

        def end(self):
            return self._span[1]

        def group(self, *indices):
            values = [self.string[self._span[0]:self._span[1]] if n == 0 else self._groups[n - 1]
                      for n in (indices or (0,))]
            return values[0] if len(values) == 1 else tuple(values)

        def groups(self, default=None):
            return tuple(default if g is None else g for g in self._groups)

        def __repr__(self):
            return f"<re.Match object; span={self._span!r}, match={self.group()!r}>"

    return {"note": note, "error": error, "digest": digest, "decode": decode, "loads": loads}

'''

# The recorder's header: the encoder. Names start with _gcache_ (the reply's own stay free).
HEADER = (
    _CODEC
    + '''_gcache_note, _gcache_error = (lambda c: (c["note"], c["error"]))(_gcache_codec())

'''
)

# The harness's header: the codec, numpy imported on first use (the tests import it, most
# comparisons never touch it: ~50 ms a run), the outputs by input and the failure message.
HARNESS_HEADER = (
    _CODEC
    + '''_gcache_codec = _gcache_codec()


def _gcache_lazy_numpy():
    """The tests import numpy; most comparisons never use it: import it on first use."""
    import sys, types

    class Unloaded:  # numpy.ndarray before numpy is imported: no value is one yet
        pass

    class Lazy(types.ModuleType):
        def __getattr__(self, name):
            if sys.modules.get("numpy") is self:
                if name == "ndarray":
                    return Unloaded
                del sys.modules["numpy"]
            import numpy
            return getattr(numpy, name)

    sys.modules.setdefault("numpy", Lazy("numpy"))


_gcache_lazy_numpy()


class _GcacheRaised(Exception):
    """What the candidate raised (or why it has no output) for one input."""


_GCACHE_KINDS = {bool: "bool", int: "number", float: "number", complex: "number",
                 set: "set", frozenset: "set"}
_GCACHE_LEAVES = frozenset({"bool", "number", str, bytes, type(None)})  # kinds with no parts


def _gcache_kind(x):
    """What x compares as: a bool, a number, a mapping (dict and its subclasses), a set, else
    its own type (a list is not a tuple)."""
    return _GCACHE_KINDS.get(type(x)) or ("mapping" if isinstance(x, dict) else type(x))


def _gcache_unlike(out, exp):
    """Why `out` cannot stand for `exp` (None if it can): another kind (a bool is not a number,
    a list is not a tuple, an array is neither), length, set of keys or numpy shape, at any
    depth. The tests' np.allclose broadcasts ([] is close to 3.5) and ignores types."""
    kind = _gcache_kind(exp)
    if _gcache_kind(out) != kind:
        return f" is {type(out).__name__}, not {type(exp).__name__}"
    if kind is list or kind is tuple or kind == "set":
        if len(out) != len(exp):
            return f" has {len(out)} items, not {len(exp)}"
        if kind == "set":  # each expected item against its equal in the output (1 == 1.0 == True)
            items = {item: item for item in out}
            for e in exp:
                reason = _gcache_unlike(items[e], e) if e in items else None
                if reason:
                    return f" item {e!r}"[:200] + reason
        else:
            kinds = _GCACHE_KINDS.get  # at C speed: a long list of numbers is the usual output
            types = list(map(type, exp))
            leaves = list(map(kinds, types, types))
            if _GCACHE_LEAVES.issuperset(leaves):
                types = list(map(type, out))
                if leaves == list(map(kinds, types, types)):
                    return None
            for k, (o, e) in enumerate(zip(out, exp)):
                reason = _gcache_unlike(o, e)
                if reason:
                    return f"[{k}]{reason}"
    elif kind == "mapping":
        if out.keys() != exp.keys():
            return " has other keys"
        keys = {key: key for key in out}
        for k, e in exp.items():
            reason = _gcache_unlike(keys[k], k)
            if reason:
                return f" key {k!r}"[:200] + reason
            reason = _gcache_unlike(out[keys[k]], e)
            if reason:
                return f"[{k!r}]"[:200] + reason
    elif getattr(kind, "__module__", None) == "numpy" and kind.__name__ == "ndarray":
        if out.shape != exp.shape:
            return f" has shape {out.shape}, not {exp.shape}"
    return None


def _gcache_output(i, *expected, check=None):
    """The candidate's return value for input i, decoded; raises _GcacheRaised if it has none,
    AssertionError if ``check`` ("same", or "set": as the test's sets) finds it unlike the
    expected value."""
    if i >= len(_gcache_records):
        raise _GcacheRaised("no output: the program ended before this input")
    note = _gcache_codec["loads"](_gcache_records[i])
    if type(note) is not list or not note:
        raise ValueError("malformed output")
    if note[0] == "=" and len(note) == 2:
        out = _gcache_codec["decode"](note[1])
        if check == "same":
            reason = _gcache_unlike(out, expected[0])
            if reason:
                raise AssertionError("the output" + reason)
        elif check == "set" and type(out) in (list, tuple, set, frozenset):
            reason = _gcache_unlike(set(out), set(expected[0]))
            if reason:
                raise AssertionError("the output's set" + reason)
        return out
    if note[0] == "!" and len(note) == 2 and type(note[1]) is str:
        raise _GcacheRaised(note[1])
    if note[0] == "#" and len(note) == 3:
        if not expected:
            raise _GcacheRaised("a long output (sent by digest) cannot be compared here")
        exp = expected[0]
        if hasattr(type(exp), "__next__") or list(_gcache_codec["digest"](exp)) != note[1:]:
            raise _GcacheRaised("the output (a long one, compared by digest) is not the expected one")
        return exp
    raise ValueError("malformed output")


def _gcache_failure(i, inp, exc):
    """One failing test input, for the score's message."""
    try:
        what = str(exc) if type(exc) is _GcacheRaised else f"{type(exc).__name__}: {str(exc)[:300]}"
        return f"test {i}: input {repr(inp)[:200]}: {what}"
    except Exception:
        return f"test {i}: {type(exc).__name__}"

'''
)

FOOTER = '\n\nSANDBOX_TALLY("finished")\n'

# The recorder's loop, after the reply's code: the test's inputs, one note per input.
_RECORDER = """

def _gcache_inputs():
    from math import inf, nan
    return {inputs}


def _gcache_record():
    _gcache_sent = [0]
    for _gcache_inp in _gcache_inputs():
        try:
            _gcache_out = _gcache_note({entry}(*_gcache_inp), _gcache_sent)
        except Exception as _gcache_exc:
            _gcache_out = _gcache_error(_gcache_exc)
        SANDBOX_TALLY("{output}", 1, _gcache_out)


_gcache_record()
"""


def instrument_test(test: str) -> tuple[str, bool]:
    """(test with its input loop counting pass/fail per input, whether the loop was found)."""

    def wrap(m: re.Match) -> str:
        ind = m.group("ind")
        return (
            f'{ind}SANDBOX_TALLY("total", len(inputs))\n'
            f"{ind}{m.group('head')}\n"
            f"{ind}    try:\n"
            f"{ind}        {m.group('body')}\n"
            f"{ind}    except Exception as _gcache_exc:\n"
            f'{ind}        SANDBOX_TALLY("failed", 1, _gcache_failure(i, inp, _gcache_exc))\n'
            f"{ind}    else:\n"
            f'{ind}        SANDBOX_TALLY("passed")'
        )

    instrumented, count = _LOOP.subn(wrap, test)
    return instrumented, count > 0


def comparison_test(test: str, entry: str) -> tuple[str, str]:
    """(the harness's test, the source of the test's inputs) for an OriginFmt `test` whose
    loop calls `entry(*inp)`: in the harness's test the loop compares ``_gcache_output(i)``,
    the candidate's decoded output, instead of calling it, and counts per input.

    Raises ValueError for a test of another shape (not one loop calling `entry` once, not
    one ``inputs = ...`` line: a literal, which may use ``inf`` and ``nan``)."""
    if not re.fullmatch(r"[A-Za-z_]\w*", entry):
        raise ValueError(f"no entry point to call: {entry!r}")
    loops = list(_LOOP.finditer(test))
    inputs = list(_INPUTS.finditer(test))
    if len(loops) != 1 or len(inputs) != 1:
        raise ValueError(
            f"expected one input loop and one `inputs = ...`, found {len(loops)} and {len(inputs)}"
        )
    call = re.escape(entry) + r"\(\*inp\)"
    body = loops[0].group("body")
    m = re.fullmatch(rf"assertion\({call}, (?P<exp>.+), (?P<atol>[\w.+-]+)\)", body)
    if m:  # the expected value is passed along: to check the output's shape, and a long
        # output's digest is compared with it
        check = _output_check(test)
        new = (
            f"assertion(_gcache_output(i, (_gcache_exp := {m.group('exp')})"
            f"{f', check={check!r}' if check else ''}), _gcache_exp, {m.group('atol')})"
        )
    else:
        new, count = re.subn(rf"(?<![\w.]){call}", "_gcache_output(i)", body)
        if count != 1:
            raise ValueError(f"the loop calls {entry}(*inp) {count} times: {body!r}")
    start, end = loops[0].span("body")
    instrumented, _ = instrument_test(test[:start] + new + test[end:])
    return instrumented, inputs[0].group("src")


def _output_check(test: str) -> str | None:
    """How the harness checks an output against the expected value before the test's
    ``assertion(out, exp, atol)`` compares them: "same" (kind, length, keys, numpy shape; see
    ``_gcache_unlike``) where the assertion compares them as they are, exactly or with
    np.allclose; "set" where it compares ``set(out)`` with ``set(exp)`` (any iterable will do,
    the items are checked); None for any other assertion (MBPP+ 737, 787, 794: not None)."""
    m = _ASSERTION.search(test)
    body = m.group("body") if m else ""
    if re.search(r"^\s+out = set\(out\)\n\s+exp = set\(exp\)$", body, re.M):
        return "set"
    if "np.allclose(out, exp," in body and not re.search(r"^\s+(?:out|exp) =", body, re.M):
        return "same"
    return None


def record_outputs(example: Example) -> str:
    """The recorder's code that follows a reply's code: the test's inputs, and a loop that
    notes the entry point's return value (or exception) for each."""
    return _RECORDER.format(
        inputs=example.meta["inputs"], entry=example.meta["entry_point"], output=_OUTPUT
    )


def harness_program(example: Example, notes: list[str]) -> str:
    """The program that runs ``example``'s comparisons on the recorder's ``notes``."""
    return HARNESS_HEADER + f"_gcache_records = {notes!r}\n\n" + example.meta["test"] + FOOTER


def tally_lines(program: str, test: str) -> dict[str, list[int]]:
    """The lines of ``program`` (newlines normalised to ``\\n``) whose ``SANDBOX_TALLY`` calls
    count: those of its last copy of ``test`` (which follows the reply's code) and after it."""
    start = program.rfind(test)
    if start < 0:
        raise ValueError("the test is not part of the program")
    first = program.count("\n", 0, start) + 1
    lines: dict[str, list[int]] = {}
    for number, line in enumerate(program[start:].split("\n"), first):
        for name in _TALLY_CALL.findall(line):
            lines.setdefault(name, []).append(number)
    return lines


def _score_one(
    program: str, example: Example, limits: dict
) -> tuple[SandboxResult, SandboxResult | None]:
    """(the recorder's run, the harness's run or None when there is nothing to compare)."""
    recorder = run_program(
        program,
        tally_lines=tally_lines(program, _unix_newlines(record_outputs(example))),
        keep_notes=(_OUTPUT,),
        **limits,
    )
    notes = recorder.records.get(_OUTPUT, [])
    if not notes or recorder.tampered:
        return recorder, None
    harness = _unix_newlines(harness_program(example, notes))
    return recorder, run_program(
        harness, tally_lines=tally_lines(harness, _unix_newlines(example.meta["test"])), **limits
    )


def score_programs(
    programs: list[str | None],
    examples: list[Example],
    codes: list[str | None],
    *,
    timeout: float,
    memory_mb: int,
    max_workers: int | None,
) -> list[dict]:
    """Run the assembled recorders (None = not runnable) and their harnesses; per program the
    score details."""
    runnable = [k for k, p in enumerate(programs) if p is not None]
    # a record known to be slow or memory-hungry may raise (never lower) the limits
    limits = {
        k: {
            "timeout": max(timeout, examples[k].meta.get("limits", {}).get("timeout", 0)),
            "memory_mb": max(memory_mb, examples[k].meta.get("limits", {}).get("memory_mb", 0)),
        }
        for k in runnable
    }
    # longest first, so a slow record does not start last and stretch the batch's wall time
    order = sorted(runnable, key=lambda k: -limits[k]["timeout"])
    workers = (os.cpu_count() or 1) if max_workers is None else max_workers
    if workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
    results = {}
    if order:
        with ThreadPoolExecutor(max_workers=min(workers, len(order))) as pool:
            # Python reads "\r\n" and "\r" as "\n"; normalised, tally_lines counts lines as it does
            runs = pool.map(
                lambda k: _score_one(_unix_newlines(programs[k]), examples[k], limits[k]), order
            )
            results = dict(zip(order, runs, strict=True))
    details = []
    for k, (example, code) in enumerate(zip(examples, codes, strict=True)):
        if code is None or k not in results:
            reason = "no reply" if code is None else f"unscorable: {example.meta.get('broken')}"
            details.append(
                {
                    "extracted": code,
                    "passed": None,
                    "correct": None,
                    "reward": None,
                    "fraction": None,
                    "tests_passed": None,
                    "tests_total": None,
                    "status": "unscored",
                    "message": reason,
                    "wall_seconds": 0.0,
                }
            )
            continue
        details.append(_details(code, *results[k]))
    return details


def _details(code: str, recorder: SandboxResult, harness: SandboxResult | None) -> dict:
    checked = harness.tally if harness is not None else {}
    total, n_ok = checked.get("total"), checked.get("passed", 0)
    passed = (
        recorder.passed
        and not recorder.tampered
        and recorder.tally.get("finished") == 1
        and harness is not None
        and harness.passed
        and not harness.tampered
        and checked.get("finished") == 1
        and not checked.get("failed")
        and total is not None
        and 0 < total == n_ok == recorder.tally.get(_OUTPUT)
    )
    fraction = 1.0 if passed else 0.0
    if not passed and total and not recorder.tampered:
        fraction = min(n_ok, total) / total
    if passed:
        status = "passed"
    elif not recorder.passed:
        status = recorder.status
    elif harness is not None and not harness.passed:
        status = harness.status
    else:
        status = "failed"
    message = recorder.tampered or recorder.message
    if harness is not None:
        message = message or harness.message or harness.notes.get("failed", "")
    if not message and not passed and recorder.tally.get("finished") != 1:
        message = "the program ended before the last test input"
    return {
        "extracted": code,
        "passed": passed,
        "correct": passed,
        "reward": float(passed),
        "fraction": fraction,  # share of test inputs (base + plus) passed
        "tests_passed": n_ok if total else None,
        "tests_total": total,
        "status": status,
        "message": message,
        "wall_seconds": recorder.wall_seconds + (harness.wall_seconds if harness else 0.0),
    }


def _unix_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def score_replies(
    completions: list[str | None],
    examples: list[Example],
    assemble: Callable[[str, Example], str],
    *,
    timeout: float,
    memory_mb: int,
    max_workers: int | None,
) -> list[dict]:
    """Extract each reply's code, assemble its recorder (`assemble`) and score it: per reply
    the extracted code, passed, fraction of test inputs passed, status."""
    check_pairs(completions, examples)
    codes = [
        extract_code(c, ex.meta["entry_point"]) if isinstance(c, str) else None
        for c, ex in zip(completions, examples, strict=True)
    ]
    programs = [
        assemble(code, ex) if code is not None and not ex.meta["broken"] else None
        for code, ex in zip(codes, examples, strict=True)
    ]
    return score_programs(
        programs, examples, codes, timeout=timeout, memory_mb=memory_mb, max_workers=max_workers
    )


class CodeTask(Task):
    """A task answered with a Python program: the reply's code block, run on the task's test
    inputs (`assemble_program`) and compared by the test's harness; the reward is 1.0 iff
    every test input passes."""

    domain = "code"
    answer_format = "Give the complete Python function in a single ```python code block."

    def __init__(self, *, timeout: float = 20.0, memory_mb: int = 1024, max_workers: int | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.timeout, self.memory_mb, self.max_workers = timeout, memory_mb, max_workers  # per program

    @staticmethod
    @abstractmethod
    def assemble_program(code: str, example: Example) -> str:
        """The recorder the sandbox runs: ``HEADER``, the reply's code (with what it needs
        from the problem), then :func:`record_outputs` and ``FOOTER``."""

    def extract_answer(self, completion: str) -> str | None:
        return extract_code(completion) if isinstance(completion, str) else None

    def score_details(self, completions: list[str], examples: list[Example]) -> list[dict]:
        """Per reply: extracted code, passed, fraction of test inputs passed, sandbox status."""
        return score_replies(completions, examples, self.assemble_program, timeout=self.timeout,
                             memory_mb=self.memory_mb, max_workers=self.max_workers)
