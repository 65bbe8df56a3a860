"""Answer normalisation and yes/no golds: the one definition used by data, eval, annotate and train.

**Normalisation** (:func:`normalize_answer`): Unicode NFKC, lowercase, every character that is not a
letter, digit or whitespace becomes a space, the articles *a / an / the* are removed, whitespace is
collapsed. :func:`tokens` splits the normalised text on whitespace, with each CJK ideograph / kana
its own token (Chinese has no spaces). Numbers are not spelled out (``"4"`` ≠ ``"four"``).

**Yes/no golds** (:func:`yes_no_value`, :func:`is_yes_no`): a text is a yes/no answer when, normalised,
it is ``yes`` / ``no`` or one of the Chinese yes/no expressions of :data:`ZH_YES_NO_RULES` (是, 是的, 对,
对的, 有, 存在 → yes; 否, 不, 不是, 不对, 没有, 无, 不存在, 未见, 未发现 → no). So ``"Yes."``, ``"NO!"``,
``"ＹＥＳ"`` and ``"是"`` are yes/no; ``"yes, small"`` and ``"normal"`` are not. Importers use it to file a
sample as closed, the scorers to compare polarities, annotation to word yes/no questions: one rule, so
a sample an importer calls closed is one the scorer reads as yes/no.

How a *model's answer* is read as yes/no (leading word, Chinese clause positions) is extraction, in
:mod:`emma.eval.extract`, which builds on :data:`ZH_YES_NO_RULES`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Literal

YES_NO_WORDS = frozenset({"yes", "no"})

#: CJK ideographs and kana, as a regex character-class body (each is a token of its own).
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
#: One token of normalised text: a CJK character, or a run of other non-space characters.
TOKEN_RE = re.compile(rf"[{CJK}]|[^\s{CJK}]+")

_NON_WORD_RE = re.compile(r"[^\w\s]|_")
_ARTICLES_RE = re.compile(r"\b(?:a|an|the)\b")
_CJK_RE = re.compile(rf"[{CJK}]")


def normalize_answer(text: str) -> str:
    """NFKC, lowercase, punctuation/symbols → spaces, articles removed, whitespace collapsed."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = _NON_WORD_RE.sub(" ", t)
    t = _ARTICLES_RE.sub(" ", t)
    return " ".join(t.split())


def tokens(text: str) -> list[str]:
    """Tokens of the normalised text: whitespace-separated words, each CJK character on its own."""
    return TOKEN_RE.findall(normalize_answer(text))


def has_cjk(text: str) -> bool:
    """Whether ``text`` contains a CJK ideograph or kana."""
    return _CJK_RE.search(text) is not None


def contains_phrase(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    """Whether ``needle`` occurs as a contiguous run of whole tokens in ``haystack`` (empty → False)."""
    if not needle:
        return False
    return f" {' '.join(needle)} " in f" {' '.join(haystack)} "


# ------------------------------------------------------------------------------------------- yes / no

#: Where a Chinese expression counts when an answer is scanned: ``"any"`` anywhere, ``"start"`` at a
#: clause start, ``"clause"`` as a whole clause (:mod:`emma.eval.extract`).
ZhPosition = Literal["any", "start", "clause"]

#: Chinese yes/no expressions: ``(expression, position, polarity)``; polarity ``None`` = never yes/no
#: (a question word or an unrelated word that contains a yes/no character, skipped as a unit).
ZH_YES_NO_RULES: tuple[tuple[str, ZhPosition, str | None], ...] = (
    ("不是", "any", "no"), ("没有", "any", "no"), ("无", "any", "no"), ("不存在", "any", "no"),
    ("未见", "any", "no"), ("未发现", "any", "no"),
    ("否", "start", "no"), ("不", "clause", "no"), ("不对", "clause", "no"),
    ("是的", "start", "yes"), ("是", "start", "yes"), ("对的", "start", "yes"), ("有", "start", "yes"),
    ("存在", "start", "yes"), ("对", "clause", "yes"),
    ("是否", "any", None), ("是不是", "any", None), ("有没有", "any", None), ("有无", "any", None),
    ("能否", "any", None), ("可否", "any", None), ("与否", "any", None), ("否则", "any", None),
    ("否认", "any", None), ("无法", "any", None), ("无论", "any", None), ("无关", "any", None),
    ("无从", "any", None), ("无名", "any", None), ("有可能", "any", None), ("有些", "any", None),
    ("有点", "any", None), ("有时", "any", None),
)  # fmt: skip
_ZH_GOLD: dict[str, str] = {w: p for w, _, p in ZH_YES_NO_RULES if p is not None}


def yes_no_value(gold: str) -> str | None:
    """The polarity (``"yes"`` / ``"no"``) of a yes/no answer (English or Chinese), else ``None``."""
    g = normalize_answer(gold)
    if g in YES_NO_WORDS:
        return g
    return _ZH_GOLD.get(g.replace(" ", ""))


def is_yes_no(answer: str) -> bool:
    """Whether ``answer`` is a yes/no answer (see the module docstring)."""
    return yes_no_value(answer) is not None
