"""``--compat medevalkit``: a reproduction of the MedEvalKit-style closed/open/multiple-choice scoring.

**For comparison only, never the default.** Results scored here carry ``scorer="compat:medevalkit"``
(:data:`COMPAT_LABEL`) on every :class:`~emma.eval.scorers.SampleScore`, and the harness labels every
output made with it. The point is to show how far a published number moves under the published
scorer, e.g. on the same predictions::

    emma eval --task vqa-rad --predictions preds.jsonl              # EMMA's rules
    emma eval --task vqa-rad --predictions preds.jsonl --compat medevalkit

Behaviour reproduced (written from the published behaviour, not copied), **bugs included**:

1. Answer location: the last ``\\boxed{}`` (else the string ``"None"``), else the concatenated
   ``<answer>`` tags; then, for each marker in a fixed list (``**answer**:``, ``**answer**``,
   ``*answer*:``, ``**answer:**``, ``answer is``, ``answer:``, ``答案:``, ``final answer``,
   ``final answer is``) present in the lowercased text, the text is cut after its last occurrence,
   one marker after the other.
2. Closed vs open is decided by the **gold**: yes/no gold → closed, anything else → open (so VQA-RAD's
   21 closed questions with other answers are scored as open, and ``n_closed`` is 251, not 272).
3. Yes/no by **substring**: correct when exactly one of ``"yes"`` / ``"no"`` occurs as a substring
   of the answer and the gold occurs as a substring. Hence "the image is abnormal" (``no`` inside
   ``abnormal``) is a correct "no", "there is no fracture" is a correct "no", "not normal" is a
   correct "no", and "yes, there is no fracture" is wrong whatever the gold.
4. Open: exact match of the lowercased located answer; token precision/recall/F1 on **sets** of
   whitespace tokens, returned in the order ``(f1, precision, recall)`` but read as
   ``(precision, recall, f1)``. The reported "recall" is therefore the precision and the reported
   "F1" the recall; :func:`score_vqa_medevalkit` reproduces the reported values:
   ``token_recall`` = reported "recall" (really precision), ``token_f1`` = reported "f1" (really
   recall).
5. Multiple choice: letter / option-text comparisons on the first sentence of the answer; anything
   else falls back to the option most similar by ``difflib`` ratio (so "I cannot determine" is mapped
   to some option and may count as correct).

Not reproduced: the LLM-judge path (EMMA's judge only adds ``judge_*`` metrics) and BLEU/ROUGE.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from emma.data.schema import Gold, TaskType
from emma.eval.extract import OPTION_LETTERS
from emma.eval.scorers import SampleScore

COMPAT_LABEL = "compat:medevalkit"
COMPAT_MODES = ("medevalkit",)

_MARKERS = (
    "**answer**:",
    "**answer**",
    "*answer*:",
    "**answer:**",
    "answer is",
    "answer:",
    "答案:",
    "final answer",
    "final answer is",
)


def boxed_content(text: str) -> str:
    """Content of the last ``\\boxed{...}`` (balanced braces, stripped), else the string ``"None"``."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return "None"
    body = text[start + len("\\boxed{") :]
    depth = 0
    for i, ch in enumerate(body):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == -1:
                return body[:i].strip()
    return "None"


def tag_content(text: str, tag: str) -> str:
    """Every ``<tag>...</tag>`` content joined by spaces; the whole text when there is none."""
    if not text:
        return ""
    open_t, close_t = f"<{tag}>", f"</{tag}>"
    parts = []
    start = text.find(open_t)
    while start != -1:
        end = text.find(close_t, start + len(open_t))
        if end == -1:
            break
        parts.append(text[start + len(open_t) : end])
        start = text.find(open_t, end + len(close_t))
    joined = " ".join(parts).strip() if parts else ""
    return joined or text


def parse_response(response: str) -> str:
    """MedEvalKit-style answer location (behaviour 1)."""
    response = response.lower()
    if "boxed" in response:
        response = boxed_content(response)
    elif "<answer>" in response:
        response = tag_content(response, "answer")
    for marker in _MARKERS:
        if marker in response:
            response = response.split(marker)[-1]
    return response


def prepare_response(response: str) -> str:
    """The pre-processing done on every VQA response before the judgement functions."""
    boxed = boxed_content(response)
    if boxed != "None":
        response = boxed
    elif "<answer>" in response:
        response = tag_content(response, "answer")
    return response.lower().strip()


def judge_yes_no(answer: str, response: str) -> bool:
    """Substring yes/no judgement (behaviour 3, with its bugs)."""
    answer = answer.lower()
    response = parse_response(response).replace("\n", "").replace(".", "")
    if ("yes" in response) ^ ("no" in response):
        return answer in response
    return False


def open_scores(answer: str, response: str) -> dict[str, float]:
    """Open-question scores as reported (behaviour 4, order bug included)."""
    answer = answer.lower()
    response = parse_response(response)
    pred, gold = set(response.lower().split()), set(answer.lower().split())
    if not pred or not gold:
        f1 = precision = recall = 0.0
    else:
        common = pred & gold
        precision, recall = len(common) / len(pred), len(common) / len(gold)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    reported_precision, reported_recall, reported_f1 = f1, precision, recall  # the published order bug
    return {
        "em": float(response == answer),
        "precision": reported_precision,
        "recall": reported_recall,
        "f1": reported_f1,
    }


def judge_choice(choices: Sequence[str], answer: str, response: str) -> bool:
    """Multiple-choice judgement with the fuzzy fallback (behaviour 5).

    ``choices`` are the displayed options (``"A. text"``), ``answer`` the gold letter or text.
    """
    letters = [chr(ord("a") + i) for i in range(len(choices))]
    response = response.lower()
    first_block = response.split("\n\n")[0]
    last_block_head = response.split("\n\n")[-1].split(".")[0]
    if first_block in letters:
        response = first_block
    elif last_block_head in letters:
        response = last_block_head
    response = parse_response(response)
    lowered = [c.lower() for c in choices]
    response = response.strip().lower().replace("\n", "")
    head = response.split(".")[0].split(":")[-1]
    answer = answer.strip().lower()
    if head == answer:
        return True
    if head in letters:
        return lowered[ord(head) - ord("a")] == answer
    if head in lowered:
        return answer in letters and head == lowered[ord(answer) - ord("a")]
    best = most_similar_index(lowered, response)
    return letters[best] == answer or lowered[best] == answer


def most_similar_index(choices: Sequence[str], response: str) -> int:
    """The fuzzy fallback: the choice with the highest ``difflib`` ratio (first on ties; 0 if all 0)."""
    best, best_ratio = 0, 0.0
    for i, choice in enumerate(choices):
        ratio = difflib.SequenceMatcher(None, choice, response).ratio()
        if ratio > best_ratio:
            best, best_ratio = i, ratio
    return best


def score_vqa_medevalkit(
    sample_gold: Gold | str, task_type: TaskType | str, prediction: str | None
) -> SampleScore:
    """A :class:`SampleScore` as MedEvalKit would count it (labelled ``scorer="compat:medevalkit"``).

    The ``status`` is always ``"ok"``: that scorer has no notion of an unparseable answer.
    """
    text = prediction or ""
    if TaskType(task_type) is TaskType.MULTIPLE_CHOICE:
        if isinstance(sample_gold, str) or not sample_gold.options or sample_gold.answer_index is None:
            raise ValueError("multiple choice needs a Gold with options and answer_index")
        choices = [f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(sample_gold.options)]
        gold_letter = OPTION_LETTERS[sample_gold.answer_index]
        ok = judge_choice(choices, gold_letter, tag_content(text, "answer"))
        return SampleScore("choice", "ok", ok, None, sample_gold.answer_index, text, scorer=COMPAT_LABEL)
    answer = sample_gold if isinstance(sample_gold, str) else sample_gold.answer
    if answer is None:
        raise ValueError("the sample has no gold answer")
    gold = answer.lower().strip()
    response = prepare_response(text)
    if gold in ("yes", "no"):
        ok = judge_yes_no(gold, response)
        return SampleScore("closed", "ok", ok, None, gold, response, scorer=COMPAT_LABEL)
    s = open_scores(gold, response)
    em = bool(s["em"])
    return SampleScore(
        "open", "ok", em, response, gold, response, em, s["recall"], s["f1"], scorer=COMPAT_LABEL
    )
