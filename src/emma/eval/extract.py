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

**Normalisation** (:func:`emma.text.normalize.normalize_answer`, defined there for every package):
Unicode NFKC, lowercase, every character that is not a letter, digit or whitespace becomes a space, the
articles *a / an / the* are removed, whitespace is collapsed. :func:`~emma.text.normalize.tokens` splits
the normalised text on whitespace, with each CJK ideograph / kana its own token (Chinese has no
spaces). Numbers are not spelled out (``"4"`` ≠ ``"four"``).

**Statuses**: ``"empty"`` when the located answer has no visible character (empty prediction, empty
``<answer></answer>``); ``"unparseable"`` when there is text but no answer of the required kind in it;
``"ok"`` otherwise.

**Yes/no** (:func:`extract_yes_no`): the **leading** whole word ``yes`` or ``no`` among the tokens of
the located answer. ``"Yes, there is no fracture"`` → yes; ``"No."`` → no; ``"There is no
fracture"`` → no (``no`` is a whole word there, and it leads). ``abnormal``, ``normal``, ``not``,
``not normal`` are not yes/no words (no substring matching), so ``"The image is abnormal"`` is
unparseable, never a "no".

**Chinese yes/no** (SLAKE-zh; every CJK character is its own token, so the whole-word rule above
cannot tell 是 from 不是). :func:`extract_yes_no` and :func:`extract_closed` take
``lang="en" | "zh" | None``; ``None`` (the default) picks ``"zh"`` when the located answer (or, for
:func:`extract_closed`, the gold) contains a CJK character, else ``"en"`` (pure-ASCII answers are
scored exactly as before). With ``"zh"`` the normalised located answer is scanned left to right for
the expressions below; the **leading** one wins and at each position the **longest** one is tried
first, so negated forms beat their positive substrings (不是 before 是, 没有 before 有, 不存在
before 存在). A *clause* starts at the beginning of the answer or after punctuation/whitespace.

- no, anywhere (like English "no fracture"): 不是, 没有, 无, 不存在, 未见, 未发现;
- no, at a clause start: 否; as a whole clause only: 不, 不对 (so 不正常, 不确定, 不对称 are not "no");
- yes, at a clause start only: 是的, 是, 对的, 有, 存在; as a whole clause: 对. A positive word in
  mid-clause is a copula or verb, not an answer: 这是CT is unparseable, like English "This is CT";
- English ``yes`` / ``no`` as whole words (bounded by space, CJK or the ends), anywhere;
- never yes/no (skipped as a unit, so their characters cannot match): 是否, 是不是, 有没有, 有无,
  能否, 可否, 与否, 否则, 否认, 无法, 无论, 无关, 无从, 无名 (无名骨), 有可能, 有些, 有点, 有时.

正常 / 异常 / 不正常 are not yes/no words (as English normal/abnormal), so 异常 is unparseable; 无明显异常
is "no" (无 leads, like "no abnormality"). ``"是的，有骨折"`` → yes; ``"是的，没有骨折"`` → yes (the
leading expression). The value is always the polarity ``"yes"`` / ``"no"``. A gold is yes/no
(:func:`emma.text.normalize.yes_no_value`) when, normalised, it is ``yes``/``no`` or one of the Chinese
expressions above (是, 是的, 对, 对的, 有, 存在 → yes; 否, 不, 不是, 不对, 没有, 无, 不存在, 未见, 未发现 →
no); the scorer compares polarities, so gold 是 and answer 有 agree, gold 有 and answer 没有 do not.

**Closed, gold not yes/no** (:func:`extract_closed`): correct when the normalised located answer equals
the normalised gold, or the gold's tokens occur as a contiguous whole-word run in it. The value is then
the normalised gold; otherwise the normalised located answer (a parsed, wrong answer). Known limit:
``"left, not right"`` contains gold ``right`` as whole words and counts as right (the rule the issue
fixes; a question's alternatives are not known to the extractor). In ``"zh"`` mode the gold's tokens
must occur as a contiguous run (for CJK: a substring) that is **not negated**: an occurrence
directly preceded by a negator (不 / 没 / 无 / 非 / 未), optionally followed by one of 是 / 在 / 为 / 于 /
有 / 见 / 是在 / 位于 / 属于, does not count. So ``"不是左边而是右边"`` is wrong for gold 左 and right for
gold 右; ``"不，左侧"`` is right for 左 (punctuation ends the negation). Known limit, as in English:
``"左右两侧"`` contains 左.

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

**Findings, multi-label** (:func:`extract_findings`, value = the sorted tuple of option indices named):
the located answer is split into parts at commas, semicolons, line breaks, ``and`` / ``&`` between
words and leading list markers (``-``, ``*``, ``1.``); each part, normalised, must be exactly one
option's name (normalised, so case, articles and punctuation do not matter). One part that names no
option makes the whole answer unparseable (no partial credit for a sentence such as "There is
cardiomegaly"). ``none``, ``none of them``, ``none of the above``, ``no finding(s)`` or ``nothing``
alone is the empty set. A name said twice counts once.

There is no fuzzy or random fallback: ``"I cannot determine"`` is unparseable.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from emma.text.normalize import (
    CJK,
    TOKEN_RE,
    YES_NO_WORDS,
    ZH_YES_NO_RULES,
    contains_phrase,
    has_cjk,
    normalize_answer,
    tokens,
    yes_no_value,
)

ExtractStatus = Literal["ok", "unparseable", "empty"]
OPTION_LETTERS = string.ascii_uppercase


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

Lang = Literal["en", "zh"]

_ZH_POLARITY: dict[str, str | None] = {w: p for w, _, p in ZH_YES_NO_RULES} | {"yes": "yes", "no": "no"}
_POSITION_RE = {"any": "{}", "start": r"(?<!\S){}", "clause": r"(?<!\S){}(?!\S)"}
_ZH_YES_NO_RE = re.compile(
    "|".join(
        [
            _POSITION_RE[pos].format(re.escape(w))
            for w, pos, _ in sorted(ZH_YES_NO_RULES, key=lambda r: -len(r[0]))
        ]
        + [rf"(?<![^\s{CJK}])(?:yes|no)(?![^\s{CJK}])"]
    )
)
_ZH_NEGATED_RE = re.compile(r"[不没无非未](?:是在|位于|属于|[是在为于有见])?$")


def _lang(lang: Lang | None, *texts: str) -> Lang:
    if lang is not None:
        if lang not in ("en", "zh"):
            raise ValueError(f"unknown language {lang!r} (expected 'en', 'zh' or None)")
        return lang
    return "zh" if any(has_cjk(t) for t in texts) else "en"


def _zh_yes_no(located: str) -> str | None:
    for m in _ZH_YES_NO_RE.finditer(normalize_answer(located)):
        polarity = _ZH_POLARITY[m.group(0)]
        if polarity is not None:
            return polarity
    return None


def extract_yes_no(text: str | None, lang: Lang | None = None) -> Extraction:
    """The leading yes/no of the located answer: English whole words or, for ``lang="zh"`` (auto-detected
    from CJK characters when ``None``), the Chinese expressions (see module docstring). Value ``"yes"``
    or ``"no"``."""
    located = locate_answer(text)
    if _empty(located):
        return Extraction(None, "empty", located)
    if _lang(lang, located) == "zh":
        polarity = _zh_yes_no(located)
        if polarity is not None:
            return Extraction(polarity, "ok", located)
        return Extraction(None, "unparseable", located)
    for tok in tokens(located):
        if tok in YES_NO_WORDS:
            return Extraction(tok, "ok", located)
    return Extraction(None, "unparseable", located)


def _zh_gold_found(located: str, gold_toks: list[str]) -> bool:
    """Whether the gold tokens occur in the located answer at least once not directly negated."""
    n = normalize_answer(located)
    spans = [m.span() for m in TOKEN_RE.finditer(n)]
    hay = [n[a:b] for a, b in spans]
    return any(not _ZH_NEGATED_RE.search(n[: spans[i][0]]) for i, _ in _occurrences(hay, gold_toks))


def extract_closed(text: str | None, gold: str, lang: Lang | None = None) -> Extraction:
    """A closed answer: yes/no rules when the gold is yes/no, else exact or whole-word gold match
    (``lang``: see :func:`extract_yes_no`; ``None`` = ``"zh"`` when the gold or the answer has CJK)."""
    located = locate_answer(text)
    language = _lang(lang, gold, located)
    g = normalize_answer(gold)
    if yes_no_value(gold) is not None:
        return extract_yes_no(text, language)
    if _empty(located):
        return Extraction(None, "empty", located)
    toks = tokens(located)
    if not toks:
        return Extraction(None, "unparseable", located)
    gold_toks = tokens(gold)
    if language == "zh":
        found = bool(gold_toks) and (toks == gold_toks or _zh_gold_found(located, gold_toks))
    else:
        found = bool(g) and (" ".join(toks) == g or contains_phrase(toks, gold_toks))
    if found:
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
    named = (_named_letters(s[m.end() :]) | {m.group(1).upper()}) if m else _named_letters(s)
    if len(named) == 1:
        idx = _letter_index(named.pop(), len(options))
        return Extraction(idx, "ok", located) if idx is not None else Extraction(None, "unparseable", located)
    if len(named) > 1:
        return Extraction(None, "unparseable", located)
    idx = _option_by_text(located, options)
    if idx is None:
        return Extraction(None, "unparseable", located)
    return Extraction(idx, "ok", located)


# ---------------------------------------------------------------------------------- findings (multi)

_PART_SPLIT_RE = re.compile(r"[,;\n]|\s+(?:and|&)\s+", re.IGNORECASE)
_LIST_MARKER_RE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
NONE_ANSWERS = frozenset({"none", "none of them", "none of above", "no finding", "no findings", "nothing"})


def extract_findings(text: str | None, options: Sequence[str]) -> Extraction:
    """The set of options named (module docstring): value = sorted tuple of option indices, ``()`` for
    "none"; unparseable when any part of the answer is not exactly one option's name."""
    if not options:
        raise ValueError("a findings question needs at least one option")
    located = locate_answer(text)
    if _empty(located):
        return Extraction(None, "empty", located)
    names: dict[str, int] = {}
    for i, option in enumerate(options):
        key = normalize_answer(option)
        if not key or key in names:
            raise ValueError(f"options must have distinct, non-empty names: {option!r}")
        names[key] = i
    if normalize_answer(located) in NONE_ANSWERS:
        return Extraction((), "ok", located)
    chosen: set[int] = set()
    for part in _PART_SPLIT_RE.split(located):
        key = normalize_answer(_LIST_MARKER_RE.sub("", part))
        if not key:
            continue
        if key not in names:
            return Extraction(None, "unparseable", located)
        chosen.add(names[key])
    if not chosen:
        return Extraction(None, "unparseable", located)
    return Extraction(tuple(sorted(chosen)), "ok", located)
