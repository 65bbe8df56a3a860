"""Answer extraction: from a model's free text to the answer it gave, or an honest "could not parse".

Extraction is separate from scoring (:mod:`emma.eval.scorers`) and is shared with the training rewards,
so every rule here is deliberate, documented and tested (``tests/eval/test_extract.py``).

**Locating the final answer** (:func:`locate_answer`), in this order:

1. Closed ``<think>...</think>`` blocks are dropped (reasoning models). If nothing is left outside
   them, the text inside is used (tags removed).
2. ``<answer>...</answer>``: the content of the **last** tag (an unclosed last ``<answer>`` runs to the
   end of the text: a truncated generation).
3. ``\\boxed{...}`` inside what step 2 left: the content of the **last** box, braces balanced (nested
   braces kept; ``\\text{..}``-style wrappers unwrapped; an unclosed box runs to the end).
4. Otherwise an answer phrase: ``final answer`` phrases take precedence over plain ``answer:`` /
   ``the answer is`` ones (also ``答案：``); among them the **last** occurrence wins (models restate
   and correct themselves; the last statement is the final one). The answer is the rest of the line
   after the phrase (leading blank lines skipped); a phrase followed by nothing is ignored.
5. Otherwise the whole text.

Surrounding whitespace, markdown emphasis (``*``, backticks) and quotes are stripped.

**Normalisation** (:func:`normalize_answer`): Unicode NFKC, lowercase, every character that is not a
letter, digit or whitespace becomes a space, the articles *a / an / the* are removed, whitespace is
collapsed. :func:`tokens` splits the normalised text on whitespace, with each CJK ideograph / kana
its own token (Chinese has no spaces). Numbers are not spelled out (``"4"`` ≠ ``"four"``).

**Statuses**: ``"empty"`` when the located answer has no visible character (empty prediction, empty
``<answer></answer>``); ``"unparseable"`` when there is text but no answer of the required kind in it;
``"ok"`` otherwise.

**Yes/no** (:func:`extract_yes_no`): the **leading** whole word ``yes`` or ``no`` among the tokens of
the located answer. ``"Yes, there is no fracture"`` → yes; ``"No."`` → no; ``"There is no
fracture"`` → no (``no`` is a whole word there, and it leads). ``abnormal``, ``normal``, ``not``,
``not normal`` are not yes/no words (no substring matching), so ``"The image is abnormal"`` is
unparseable, never a "no".

**Closed, gold not yes/no** (:func:`extract_closed`): correct when the normalised located answer equals
the normalised gold, or the gold's tokens occur as a contiguous whole-word run in it. The value is then
the normalised gold; otherwise the normalised located answer (a parsed, wrong answer). Known limit:
``"left, not right"`` contains gold ``right`` as whole words and counts as right (the rule the issue
fixes; a question's alternatives are not known to the extractor).

**Multiple choice** (:func:`extract_choice`), value = option index:

0. The whole answer equals one option's text (normalised): that option (so an option "E. coli" is
   not read as the letter E).
1. A letter in a decisive position: the whole answer is a letter (``B``, ``(b)``, ``B.``), or the answer
   starts with one followed by ``.``, ``)``, ``:`` or `` - `` (``B. Pneumonia``, ``(B) pneumonia``).
   The letter wins over any option text that follows it, but not over another letter named after
   it (``"(A) or (B)"`` is unparseable).
2. Else letters named anywhere: ``option B`` / ``choice B`` / ``(B)`` (upper-case letter). Exactly one
   distinct letter → it; several → unparseable.
3. A letter beyond the number of options → unparseable.
4. Else option text: exactly one option's full text occurs as whole words in the answer. An option whose every occurrence lies inside the occurrence of a
   longer matched option does not count (``"lobar pneumonia"`` names the option "lobar pneumonia",
   not also "pneumonia"). Several options or none → unparseable.

There is no fuzzy or random fallback: ``"I cannot determine"`` is unparseable.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

ExtractStatus = Literal["ok", "unparseable", "empty"]
OPTION_LETTERS = string.ascii_uppercase
YES_NO_WORDS = frozenset({"yes", "no"})


@dataclass(frozen=True, slots=True)
class Extraction:
    """What was read from a prediction: ``value`` (``None`` unless ``status == "ok"``) and ``located``,
    the located final-answer text it was read from."""

    value: str | int | None
    status: ExtractStatus
    located: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ------------------------------------------------------------------------------------- normalisation

_NON_WORD_RE = re.compile(r"[^\w\s]|_")
_ARTICLES_RE = re.compile(r"\b(?:a|an|the)\b")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN_RE = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")


def normalize_answer(text: str) -> str:
    """NFKC, lowercase, punctuation/symbols → spaces, articles removed, whitespace collapsed."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = _NON_WORD_RE.sub(" ", t)
    t = _ARTICLES_RE.sub(" ", t)
    return " ".join(t.split())


def tokens(text: str) -> list[str]:
    """Tokens of the normalised text: whitespace-separated words, each CJK character on its own."""
    return _TOKEN_RE.findall(normalize_answer(text))


def contains_phrase(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    """Whether ``needle`` occurs as a contiguous run of whole tokens in ``haystack`` (empty → False)."""
    if not needle:
        return False
    return f" {' '.join(needle)} " in f" {' '.join(haystack)} "


# ---------------------------------------------------------------------------------- answer location

_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_THINK_TAG_RE = re.compile(r"</?think>", re.IGNORECASE)
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.DOTALL | re.IGNORECASE)
_BOXED = "\\boxed{"
_LATEX_WRAP_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_PHRASE_RE = re.compile(
    r"(?P<final>\bfinal\s+)?\banswer\b(?:\s*(?:\*\*|__))?"
    r"(?:\s*[:：]|\s+(?:is|would\s+be|will\s+be)\b\s*[:：]?)"
    r"|答案\s*(?:是|为|[:：])",
    re.IGNORECASE,
)
_STRIP_CHARS = " \t\r\n*`\"'“”‘’"


def _last_boxed(text: str) -> str | None:
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    i = start + len(_BOXED)
    depth = 0
    for j in range(i, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                return text[i:j]
            depth -= 1
    return text[i:]  # unclosed box: the rest of the text


def _unwrap_latex(text: str) -> str:
    prev = None
    while prev != text:
        prev, text = text, _LATEX_WRAP_RE.sub(r"\1", text)
    return text


def _after_phrase(text: str) -> str | None:
    matches = list(_PHRASE_RE.finditer(text))
    if not matches:
        return None
    finals = [m for m in matches if m.group("final")]
    for group in (finals, matches):
        for m in reversed(group):
            rest = text[m.end() :].lstrip(_STRIP_CHARS + ":：")
            line = rest.split("\n", 1)[0].strip(_STRIP_CHARS)
            if line:
                return line
    return None


def locate_answer(text: str | None) -> str:
    """The final-answer part of ``text`` (see the module docstring for the rules)."""
    if not text:
        return ""
    s = _THINK_RE.sub(" ", text)
    if not s.strip():
        s = _THINK_TAG_RE.sub(" ", text)
    tags = _ANSWER_TAG_RE.findall(s)
    if tags:
        s = tags[-1]
    boxed = _last_boxed(s)
    if boxed is not None:
        return _unwrap_latex(boxed).strip(_STRIP_CHARS)
    phrase = _after_phrase(s)
    if phrase is not None:
        return phrase
    return s.strip(_STRIP_CHARS)


def _empty(located: str) -> bool:
    return not located.strip()


# ------------------------------------------------------------------------------------------ yes / no


def extract_yes_no(text: str | None) -> Extraction:
    """The leading whole word ``yes``/``no`` of the located answer (see module docstring)."""
    located = locate_answer(text)
    if _empty(located):
        return Extraction(None, "empty", located)
    for tok in tokens(located):
        if tok in YES_NO_WORDS:
            return Extraction(tok, "ok", located)
    return Extraction(None, "unparseable", located)


def is_yes_no(gold: str) -> bool:
    return normalize_answer(gold) in YES_NO_WORDS


def extract_closed(text: str | None, gold: str) -> Extraction:
    """A closed answer: yes/no rules when the gold is yes/no, else exact or whole-word gold match."""
    g = normalize_answer(gold)
    if g in YES_NO_WORDS:
        return extract_yes_no(text)
    located = locate_answer(text)
    if _empty(located):
        return Extraction(None, "empty", located)
    toks = tokens(located)
    if not toks:
        return Extraction(None, "unparseable", located)
    n = " ".join(toks)
    if g and (n == g or contains_phrase(toks, tokens(gold))):
        return Extraction(g, "ok", located)
    return Extraction(normalize_answer(located), "ok", located)


# ---------------------------------------------------------------------------------- multiple choice

_WHOLE_LETTER_RE = re.compile(r"\(?\s*([A-Za-z])\s*\)?\s*[.:)]?")
_LEADING_LETTER_RE = re.compile(r"\(?([A-Z])(?:\)|[.:](?=\s|$)|\s+[-–—]\s)")
_NAMED_LETTER_RE = re.compile(
    r"\b(?:[Oo]ption|[Cc]hoice|OPTION|CHOICE)\b\s*(?:is\s+)?[:#]?\s*\(?([A-Z])\)?(?!\w)|\(([A-Z])\)"
)
_EMPHASIS_RE = re.compile(r"[*`]")


def _letter_index(letter: str, n_options: int) -> int | None:
    i = OPTION_LETTERS.index(letter.upper())
    return i if i < n_options else None


def _named_letters(s: str) -> set[str]:
    return {m.group(1) or m.group(2) for m in _NAMED_LETTER_RE.finditer(s)}


def _occurrences(hay: list[str], needle: list[str]) -> list[tuple[int, int]]:
    k = len(needle)
    return [(i, i + k) for i in range(len(hay) - k + 1) if hay[i : i + k] == needle]


def _option_by_text(located: str, options: Sequence[str]) -> int | None:
    hay = tokens(located)
    opts = [tokens(o) for o in options]
    spans = {i: _occurrences(hay, o) for i, o in enumerate(opts) if o}
    spans = {i: s for i, s in spans.items() if s}

    def covered(i: int) -> bool:
        return all(
            any(
                j != i and len(opts[j]) > len(opts[i]) and a <= s and e <= b
                for j in spans
                for a, b in spans[j]
            )
            for s, e in spans[i]
        )

    matched = [i for i in spans if not covered(i)]
    return matched[0] if len(matched) == 1 else None


def extract_choice(text: str | None, options: Sequence[str]) -> Extraction:
    """The chosen option's index: a letter, or exactly one option's text; otherwise unparseable."""
    if not options:
        raise ValueError("multiple choice needs at least one option")
    if len(options) > len(OPTION_LETTERS):
        raise ValueError(f"at most {len(OPTION_LETTERS)} options are supported")
    located = locate_answer(text)
    if _empty(located):
        return Extraction(None, "empty", located)
    s = _EMPHASIS_RE.sub("", located).strip()
    hay = tokens(located)
    exact = [i for i, o in enumerate(options) if hay and tokens(o) == hay]
    if len(exact) == 1:  # the whole answer is one option's text (also "E. coli" as an option)
        return Extraction(exact[0], "ok", located)
    m = _WHOLE_LETTER_RE.fullmatch(s) or _LEADING_LETTER_RE.match(s)
    if m:
        named = _named_letters(s[m.end() :]) | {m.group(1).upper()}
    else:
        named = _named_letters(s)
    if len(named) == 1:
        idx = _letter_index(named.pop(), len(options))
        return Extraction(idx, "ok", located) if idx is not None else Extraction(None, "unparseable", located)
    if len(named) > 1:
        return Extraction(None, "unparseable", located)
    idx = _option_by_text(located, options)
    if idx is None:
        return Extraction(None, "unparseable", located)
    return Extraction(idx, "ok", located)
