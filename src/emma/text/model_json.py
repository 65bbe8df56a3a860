"""The JSON object in a model's answer, and the repair of the defects models make: one definition.

Used wherever a model (a teacher, our own model in structured mode) is asked for one JSON object:
:mod:`emma.infer.structured`, :mod:`emma.annotate.pipeline`, :mod:`emma.annotate.synth` and
:mod:`emma.annotate.refine`. Callers validate what they get (schemas, vocabularies, limits).

**Finding the object** (:func:`find_json_object`). The answer is read up to ``max_chars`` characters.
The candidates are, in order, the body of each code fence (```` ``` ```` with an optional language tag;
an unclosed fence runs to the end) that contains ``{``, then the whole answer; each from its first ``{``.
The first candidate that decodes to an object wins: as it is (``repaired=False``), else after
:func:`repair_json` (``repaired=True``). Text after the object is ignored. When no candidate decodes,
``error`` says why for the first one (``"invalid JSON (line L column C)"``, ``"JSON nested too deeply"``)
or ``"no JSON object in the answer"`` when there is no ``{`` at all; it never raises. A JSON array alone
is not an object.

**Repair** (:func:`repair_json`): single-quoted strings, Python literals (``True``/``False``/``None``;
``NaN``/``Infinity`` → ``null``), unquoted keys and single-word values, numbers written ``.5``, ``//``
and ``/* */`` comments, trailing commas, raw newlines and tabs inside strings, mismatched closers, and
truncation (open strings and brackets are closed, a dangling key or comma dropped). For output cut off
inside a list or object, :func:`repair_json_dropping_last` also drops the last, incomplete element: a
caller whose validation rejects the first repair may try it.

**Cost.** Every step is linear in the length of the answer (no regex that backtracks over the whole
text, no copy of the text per bracket or per dropped key), so a hostile answer of ``max_chars``
characters costs milliseconds, not minutes.

Decision (README, dependency table): the `json-repair` package was weighed and not taken. It repairs
differently where callers and tests rely on the rules above (it keeps the keys after a mismatched
closer, reads ``NaN`` as a float NaN, a cut-off ``tr`` as the string ``"tr"`` and a dangling ``"b":``
as ``""``), has no "drop the last, incomplete element" retry, and would be the floor's only third-party
dependency for about 200 lines of code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_JSON_TEXT_CHARS = 100_000
NO_JSON_OBJECT = "no JSON object in the answer"
NESTED_TOO_DEEPLY = "JSON nested too deeply"

_FENCE_RE = re.compile(r"```[ \t]*[A-Za-z0-9]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_DECODER = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class FoundJson:
    """What :func:`find_json_object` read from an answer.

    ``value``: the object, or ``None``. ``repaired``: it needed :func:`repair_json` (also ``True`` when
    the repair was tried and failed). ``error``: why there is no value. ``source``: the candidate text
    (from its ``{``) the value came from, or the first candidate when none decoded; ``None`` without
    any ``{`` (for :func:`repair_json_dropping_last`).
    """

    value: dict[str, Any] | None
    repaired: bool = False
    error: str | None = None
    source: str | None = None


def _candidates(text: str) -> list[str]:
    found = []
    for match in _FENCE_RE.finditer(text):
        body = match.group(1)
        start = body.find("{")
        if start >= 0:
            found.append(body[start:])
    start = text.find("{")
    if start >= 0:
        found.append(text[start:])
    return found


def decode_json(text: str) -> tuple[Any, str | None]:
    """The JSON value at the start of ``text`` (text after it ignored) and ``None``, or ``None`` and
    why it is not JSON. Never raises (deep nesting and over-long numbers are errors too)."""
    try:
        value, _ = _DECODER.raw_decode(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON (line {exc.lineno} column {exc.colno})"
    except RecursionError:
        return None, NESTED_TOO_DEEPLY
    except ValueError:  # e.g. an integer over Python's digit limit
        return None, "invalid JSON (a number too long to read)"
    return value, None


def _read(candidate: str) -> FoundJson:
    """One candidate (it starts with ``{``, so what decodes is an object): as it is, else repaired."""
    value, error = decode_json(candidate)
    if error is None and isinstance(value, dict):
        return FoundJson(value, False, None, candidate)
    if error == NESTED_TOO_DEEPLY:  # the repair keeps the nesting: not worth trying
        return FoundJson(None, False, error, candidate)
    value, error = decode_json(repair_json(candidate))
    if error is None and isinstance(value, dict):
        return FoundJson(value, True, None, candidate)
    return FoundJson(None, True, error or NO_JSON_OBJECT, candidate)


def find_json_object(text: str, *, max_chars: int = MAX_JSON_TEXT_CHARS) -> FoundJson:
    """The first JSON object in a model's answer (see the module docstring); never raises."""
    if not isinstance(text, str):
        return FoundJson(None, error=f"expected text, got {type(text).__name__}")
    first: FoundJson | None = None
    for candidate in _candidates(text[:max_chars]):
        found = _read(candidate)
        if found.value is not None:
            return found
        if first is None:
            first = found
    return first if first is not None else FoundJson(None, error=NO_JSON_OBJECT)


# ------------------------------------------------------------------------------------------ repair

_CLOSER = {"{": "}", "[": "]"}
_LITERALS = {"True": "true", "False": "false", "None": "null", "NaN": "null", "Infinity": "null"}
_CUT_LITERALS = ("true", "false", "null", "none")
_NUMBER_TAIL_RE = re.compile(r"[\d.][.\-+eE]+$")


def repair_json(text: str) -> str:
    """The first JSON object or array in ``text`` with common LLM defects fixed (best effort; see the
    module docstring). Text after the value is dropped; text without ``{`` or ``[`` is returned as it
    is. The result may still be invalid JSON."""
    return _repair(text)[0]


def repair_json_dropping_last(text: str) -> str | None:
    """For output cut off inside a list or object: :func:`repair_json` that also drops the last,
    incomplete element of the innermost open container; ``None`` when ``text`` was not cut off after
    a comma (nothing to drop)."""
    return _repair(text)[1]


def _strip_trailing_comma(out: list[str]) -> None:
    j = len(out) - 1
    while j >= 0 and out[j].isspace():
        j -= 1
    if j >= 0 and out[j] == ",":
        del out[j]


def _cut_literal(word: str) -> str | None:
    """The literal that ``word`` (at the very end of the text) is the start of, if any."""
    lit = next((lit for lit in _CUT_LITERALS if lit.startswith(word.lower())), None)
    return "null" if lit == "none" else lit


def _repair(text: str) -> tuple[str, str | None]:  # noqa: C901 - one pass, one state machine over the characters
    """:func:`repair_json`, and for truncated input a second repair that also drops the last,
    incomplete element of the innermost open list or object (None when the input was complete)."""
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        return text, None
    i, n = min(starts), len(text)
    out: list[str] = []
    stack: list[str] = []
    open_count = {"}": 0, "]": 0}  # closers on the stack, for an O(1) "is it open?"
    # The stack at the last comma, kept without copying it per comma: its first `low` entries are the
    # stack's own (never popped since), the rest were popped since and saved (innermost last popped).
    comma_out: int | None = None  # len(out) at the last comma
    low = 0
    saved: list[str] = []
    quote = ""
    escape = False
    while i < n:
        c = text[i]
        if quote:
            if escape:
                out.append(c)
                escape = False
            elif c == "\\":
                if quote == "'" and text[i + 1 : i + 2] == "'":
                    out.append("'")
                    i += 1
                else:
                    out.append(c)
                    escape = True
            elif c == quote:
                out.append('"')
                quote = ""
            elif c == '"':
                out.append('\\"')
            elif c == "\n":
                out.append("\\n")
            elif c == "\t":
                out.append("\\t")
            else:
                out.append(c)
            i += 1
            continue
        if c in "\"'":
            quote = c
            out.append('"')
        elif c in "{[":
            stack.append(_CLOSER[c])
            open_count[_CLOSER[c]] += 1
            out.append(c)
        elif c in "}]":
            if open_count[c]:
                while stack:
                    if len(stack) - 1 < low:
                        saved.append(stack[-1])
                        low = len(stack) - 1
                    closer = stack.pop()
                    open_count[closer] -= 1
                    _strip_trailing_comma(out)
                    out.append(closer)
                    if closer == c:
                        break
                if not stack:
                    return "".join(out), None
        elif c == ",":
            comma_out, low, saved = len(out), len(stack), []
            out.append(c)
        elif c == "/" and text[i + 1 : i + 2] in ("/", "*"):
            end = text.find("\n", i) if text[i + 1] == "/" else text.find("*/", i + 2)
            i = n if end < 0 else end + (0 if text[i + 1] == "/" else 2)
            continue
        elif c == "." and text[i + 1 : i + 2].isdigit() and not (out and out[-1].isdigit()):
            out.append("0.")
        elif c.isalpha() or c == "_":
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            if out and (out[-1][-1:].isdigit() or out[-1] == "."):
                out.append(word)  # the exponent of a number (1e5)
            elif word in ("true", "false", "null"):
                out.append(word)
            elif word in _LITERALS:
                out.append(_LITERALS[word])
            elif j == n and (lit := _cut_literal(word)) is not None:
                out.append(lit)  # a literal cut off at the end
            else:
                out.append(json.dumps(word))
            i = j
            continue
        else:
            out.append(c)
        i += 1
    if quote:
        if escape:
            out.pop()
        out.append('"')
    dropped = None
    if comma_out is not None:
        at_comma = stack[:low] + saved[::-1]
        dropped = _close_truncated("".join(out[:comma_out]), at_comma)
    return _close_truncated("".join(out), stack), dropped


def _close_truncated(text: str, stack: list[str]) -> str:
    """Make a value cut off mid-way complete: drop a dangling comma, key or number tail, give a
    dangling ``:`` a ``null``, close the open brackets. Linear: works on an end index, not on copies."""
    end = len(text)
    suffix = ""
    key_starts: dict[int, int] | None = None
    while True:
        while end and text[end - 1].isspace():
            end -= 1
        last = text[end - 1] if end else ""
        if last == ",":
            end -= 1
        elif last == ":":
            suffix = " null"
            break
        elif last and last in ".-+eE" and (cut := _number_tail(text, end)) is not None:
            end = cut
        elif stack and stack[-1] == "}" and last == '"':
            if key_starts is None:
                key_starts = _key_starts(text)
            start = key_starts.get(end - 1)
            if start is None:
                break
            end = start
            if text[start] == "{":
                suffix = "{"
                break
        else:
            break
    closed = text[:end] + suffix
    if stack:
        closed = closed.rstrip().removesuffix(",") + "".join(reversed(stack))
    return closed


def _number_tail(text: str, end: int) -> int | None:
    """Where a number's dangling ``.``/``e``/sign tail at ``text[:end]``'s end starts (``1.``, ``2e-``),
    else None."""
    start = end
    while start and text[start - 1] in ".-+eE":
        start -= 1
    return start if _NUMBER_TAIL_RE.search(text, max(start - 1, 0), end) else None


def _key_starts(text: str) -> dict[int, int]:
    """For each closing quote position q: where the leftmost ``{`` or ``,`` + a key string ending at q
    starts (what ``re.search(r'[{,]\\s*"(?:[^"\\\\]|\\\\.)*"$', text[: q + 1])`` finds), for all q in
    one pass instead of one regex scan of the whole text per dropped key."""
    n = len(text)
    close = [-1] * (n + 2)  # close[i]: the quote that ends a string body read from i, -1 none
    for i in range(n - 1, -1, -1):
        c = text[i]
        if c == '"':
            close[i] = i
        elif c == "\\":
            close[i] = close[i + 2] if i + 1 < n and text[i + 1] != "\n" else -1
        else:
            close[i] = close[i + 1]
    starts: dict[int, int] = {}
    for opening in range(n):
        if text[opening] != '"':
            continue
        q = close[opening + 1]
        if q < 0 or q in starts:
            continue
        j = opening - 1
        while j >= 0 and text[j].isspace():
            j -= 1
        if j >= 0 and text[j] in "{,":
            starts[q] = j
    return starts
