"""Scorers: per-sample scores and their aggregates for VQA, multiple choice, grounding, classification.

Extraction rules live in :mod:`emma.eval.extract`; this module only compares what was extracted with
the gold and aggregates. Every aggregate reports how many answers could not be parsed.

**VQA** (:func:`score_vqa`, :func:`aggregate_vqa`, :func:`count_vqa`, :func:`vqa_values`). The task
type of the sample (``closed_vqa`` / ``open_vqa`` / ``multiple_choice``) decides the rule, never the
gold's wording. Metrics (each present only when its denominator is non-zero):

- ``closed_accuracy``: correct closed answers / **all** closed questions (unparseable and empty
  answers are wrong, never dropped from the denominator).
- ``closed_unparseable``: share of closed questions whose answer could not be parsed (unparseable or
  empty); ``counts["closed_unparseable"]`` is the number (``counts["closed_empty"]`` the empty part).
- ``open_exact_match``: normalised located answer == normalised gold.
- ``open_token_recall``: share of gold tokens found in the prediction's tokens (LLaVA-Med style,
  counted with multiplicity: a gold token repeated twice needs two occurrences); equals the recall
  inside ``open_token_f1``.
- ``open_token_f1``: SQuAD token F1 (lowercase, punctuation and articles removed, multiset overlap;
  1.0 when both sides have no tokens, 0.0 when only one has none).
- ``choice_accuracy`` / ``choice_unparseable``: the same as closed for multiple-choice questions.
- ``overall_accuracy``: (closed correct + open exact matches + choice correct) / all questions.
- ``judge_accuracy``: only when judge verdicts are present (:attr:`SampleScore.judge_correct` on open
  questions): open questions the judge accepted / **all** open questions (an open question without a
  verdict counts as not accepted; ``counts["open_unjudged"]`` says how many). ``judge_overall_accuracy``
  = (closed correct by the rules + open accepted by the judge + choice correct) / all questions. The
  judge never touches closed or choice questions (a verdict on one is ignored), so rule-based metrics
  are unchanged and no closed hit is dropped or counted twice. An open answer the judge *failed* on
  (:attr:`SampleScore.judge_error`: a transport error, not a rejection) has no verdict and no honest
  substitute: when any exists, both judge metrics are ``None`` in :func:`aggregate_vqa`, absent from
  :func:`vqa_values`, and ``counts["open_judge_errors"]`` says how many.

For confidence intervals, :func:`vqa_values` gives the per-sample values whose mean is each metric
(a bootstrap of those means = a CI of the metric).

**Grounding** (:func:`match_boxes`, :func:`score_grounding`, :func:`grounding_metrics`): boxes in ONE
convention, canonical pixels of the original image ``(x1, y1, x2, y2)``; a :class:`~emma.data.schema.Box`
in another space must be converted first (:func:`canonical_boxes`), and is refused otherwise. Boxes
are matched one-to-one **greedily by IoU** (highest IoU pair first, ties by prediction then gold index;
pairs with IoU 0 never match): deterministic, no scipy needed, the usual detection-evaluation rule.
Each predicted box is used at most once; there is no best-over-boxes or best-over-readings oracle.
Per sample: ``mean_iou`` = mean over gold boxes of the IoU of its match (0 if unmatched);
``recall`` = gold boxes matched with IoU >= threshold / gold boxes; ``precision`` = those hits /
predicted boxes. Aggregates (``mean_iou``, ``recall_at_iou50``, ``precision_at_iou50``,
``grounding_unparseable``) are means over samples, so a sample with no parseable boxes scores 0.

**Classification** (:func:`classification_metrics`, :func:`roc_auc`): per-class
:class:`PRF` (named fields, never a positional tuple), macro F1 = unweighted mean of per-class F1
(scikit-learn's convention), a ``None`` prediction (unparseable) is wrong. AUC is rank-based
(Mann-Whitney U with tied scores given average ranks), numpy only; one-vs-rest macro AUC over classes
that have both positive and negative samples. With hard labels only, each class's score is 1 for
predicted-as-that-class else 0 (AUC of hard predictions = balanced accuracy of that class).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from emma.data.schema import Box, CoordSpace, Gold, TaskType
from emma.eval.extract import ExtractStatus, extract_choice, extract_closed, locate_answer
from emma.eval.stats import bootstrap_cis
from emma.text.normalize import normalize_answer, tokens, yes_no_value

VqaKind = Literal["closed", "open", "choice"]

# ----------------------------------------------------------------------------------------- per sample


@dataclass(frozen=True, slots=True)
class SampleScore:
    """The score of one prediction.

    ``correct``: closed/choice: the extracted answer equals the gold; open: exact match.
    ``extracted``: the extracted value (closed: normalised answer text; choice: option index; open:
    the located answer text). ``gold``: the normalised gold answer (choice: the gold index; a closed
    yes/no gold, English or Chinese: its polarity ``"yes"`` / ``"no"``, e.g. 有 → ``"yes"``).
    Token metrics are set for open questions only. ``judge_correct``: an LLM judge's verdict (open
    questions only count; see :func:`aggregate_vqa`); ``judge_error``: the judge was asked and failed.
    """

    kind: VqaKind
    status: ExtractStatus
    correct: bool
    extracted: str | int | None
    gold: str | int
    located: str = ""
    exact_match: bool | None = None
    token_recall: float | None = None
    token_f1: float | None = None
    judge_correct: bool | None = None
    judge_error: bool = False
    scorer: str = "emma"

    @property
    def parsed(self) -> bool:
        return self.status == "ok"

    def with_judge(self, verdict: bool | None, error: bool = False) -> SampleScore:
        return replace(self, judge_correct=None if error else verdict, judge_error=error)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_scores(prediction: str, gold: str) -> tuple[float, float, float]:
    """SQuAD-style token ``(precision, recall, f1)`` after normalisation (multiset overlap)."""
    p, g = tokens(prediction), tokens(gold)
    if not p or not g:
        same = float(p == g)
        return same, same, same
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    precision, recall = common / len(p), common / len(g)
    return precision, recall, 2 * precision * recall / (precision + recall)


def _gold_answer(gold: Gold | str) -> str:
    answer = gold if isinstance(gold, str) else gold.answer
    if answer is None:
        raise ValueError("the sample has no gold answer")
    return answer


def _kind(task_type: TaskType | str) -> VqaKind:
    t = TaskType(task_type)
    if t is TaskType.CLOSED_VQA:
        return "closed"
    if t is TaskType.OPEN_VQA:
        return "open"
    if t is TaskType.MULTIPLE_CHOICE:
        return "choice"
    raise ValueError(f"task type {t.value!r} is not scored as VQA")


def score_closed(gold: Gold | str, prediction: str | None) -> SampleScore:
    answer = _gold_answer(gold)
    g = yes_no_value(answer) or normalize_answer(answer)  # a yes/no gold (是, 没有, ...): its polarity
    ex = extract_closed(prediction, answer)
    correct = ex.ok and bool(g) and ex.value == g
    return SampleScore("closed", ex.status, correct, ex.value, g, ex.located)


def score_open(gold: Gold | str, prediction: str | None) -> SampleScore:
    answer = _gold_answer(gold)
    g = normalize_answer(answer)
    located = locate_answer(prediction)
    if not located.strip():
        status: ExtractStatus = "empty"
    elif not tokens(located):
        status = "unparseable"
    else:
        status = "ok"
    em = status == "ok" and normalize_answer(located) == g
    _, recall, f1 = token_scores(located, answer)
    if status != "ok":
        recall = f1 = 0.0
    return SampleScore("open", status, em, located, g, located, em, recall, f1)


def score_choice(gold: Gold, prediction: str | None) -> SampleScore:
    """Multiple choice: ``gold.options`` and ``gold.answer_index`` are required."""
    if not gold.options or gold.answer_index is None:
        raise ValueError("a multiple-choice sample needs gold.options and gold.answer_index")
    ex = extract_choice(prediction, gold.options)
    correct = ex.ok and ex.value == gold.answer_index
    return SampleScore("choice", ex.status, correct, ex.value, gold.answer_index, ex.located)


def score_vqa(sample_gold: Gold | str, task_type: TaskType | str, prediction: str | None) -> SampleScore:
    """Score one VQA prediction by the sample's task type (closed, open or multiple choice)."""
    kind = _kind(task_type)
    if kind == "closed":
        return score_closed(sample_gold, prediction)
    if kind == "open":
        return score_open(sample_gold, prediction)
    if isinstance(sample_gold, str):
        raise TypeError("multiple choice needs a Gold with options and answer_index, not a string")
    return score_choice(sample_gold, prediction)


# ----------------------------------------------------------------------------------------- aggregates


def _has_judge(scores: Sequence[SampleScore]) -> bool:
    return any(s.kind == "open" and (s.judge_correct is not None or s.judge_error) for s in scores)


def judge_failed(scores: Sequence[SampleScore]) -> bool:
    """Whether the judge failed on any open answer (then the judge metrics are ``None``)."""
    return any(s.kind == "open" and s.judge_error for s in scores)


def vqa_values(
    scores: Sequence[SampleScore], include_judge: bool | None = None
) -> dict[str, NDArray[np.float64]]:
    """Per-sample values whose mean is each VQA metric (empty metrics left out); for bootstrap CIs."""
    closed = [s for s in scores if s.kind == "closed"]
    opened = [s for s in scores if s.kind == "open"]
    choice = [s for s in scores if s.kind == "choice"]

    def arr(xs: Iterable[float]) -> NDArray[np.float64]:
        return np.fromiter(xs, dtype=np.float64)

    out: dict[str, NDArray[np.float64]] = {}
    if closed:
        out["closed_accuracy"] = arr(s.correct for s in closed)
        out["closed_unparseable"] = arr(not s.parsed for s in closed)
    if opened:
        out["open_exact_match"] = arr(bool(s.exact_match) for s in opened)
        out["open_token_recall"] = arr(s.token_recall or 0.0 for s in opened)
        out["open_token_f1"] = arr(s.token_f1 or 0.0 for s in opened)
    if choice:
        out["choice_accuracy"] = arr(s.correct for s in choice)
        out["choice_unparseable"] = arr(not s.parsed for s in choice)
    if scores:
        out["overall_accuracy"] = arr(s.correct for s in scores)
    judge = _has_judge(scores) if include_judge is None else include_judge
    if judge and not judge_failed(scores):
        if opened:
            out["judge_accuracy"] = arr(s.judge_correct is True for s in opened)
        if scores:
            out["judge_overall_accuracy"] = arr(
                (s.judge_correct is True) if s.kind == "open" else s.correct for s in scores
            )
    return out


def _judge_names(scores: Sequence[SampleScore]) -> list[str]:
    """The judge metrics ``scores`` would have (by their denominators)."""
    names = ["judge_accuracy"] if any(s.kind == "open" for s in scores) else []
    return names + (["judge_overall_accuracy"] if scores else [])


def aggregate_vqa(
    scores: Sequence[SampleScore], include_judge: bool | None = None
) -> dict[str, float | None]:
    """The VQA metrics (see the module docstring). ``include_judge=None``: when any open verdict exists.
    The judge metrics are ``None`` when the judge failed on any open answer."""
    out: dict[str, float | None] = {
        name: float(v.mean()) for name, v in vqa_values(scores, include_judge).items()
    }
    judge = _has_judge(scores) if include_judge is None else include_judge
    if judge and judge_failed(scores):
        out.update(dict.fromkeys(_judge_names(scores)))
    return out


def count_vqa(scores: Sequence[SampleScore], include_judge: bool | None = None) -> dict[str, int]:
    """Counts behind the metrics: ``n``, ``n_closed``, ``n_open``, ``n_choice``, correct/unparseable/empty."""
    c: Counter[str] = Counter()
    for s in scores:
        c["n"] += 1
        if s.kind == "closed":
            c["n_closed"] += 1
            c["closed_correct"] += s.correct
            c["closed_unparseable"] += not s.parsed
            c["closed_empty"] += s.status == "empty"
        elif s.kind == "open":
            c["n_open"] += 1
            c["open_exact"] += bool(s.exact_match)
            c["open_empty"] += s.status == "empty"
            c["open_unparseable"] += not s.parsed
        else:
            c["n_choice"] += 1
            c["choice_correct"] += s.correct
            c["choice_unparseable"] += not s.parsed
            c["choice_empty"] += s.status == "empty"
    keys = ["n", "n_closed", "n_open", "n_choice", "closed_correct", "closed_unparseable", "closed_empty",
            "open_exact", "open_unparseable", "open_empty", "choice_correct", "choice_unparseable",
            "choice_empty"]  # fmt: skip
    out = {k: int(c[k]) for k in keys}
    judge = _has_judge(scores) if include_judge is None else include_judge
    if judge:
        opened = [s for s in scores if s.kind == "open"]
        out["open_judged"] = sum(s.judge_correct is not None for s in opened)
        out["open_unjudged"] = len(opened) - out["open_judged"]
        out["open_judge_errors"] = sum(s.judge_error for s in opened)
        out["judge_correct"] = sum(s.judge_correct is True for s in opened)
    return out


@dataclass(frozen=True, slots=True)
class Summary:
    """Metrics, their bootstrap CIs and the counts of one scored run."""

    metrics: dict[str, float | None]
    ci95: dict[str, tuple[float, float]]
    counts: dict[str, int]
    extra: dict[str, Any] = field(default_factory=dict)


def summarize_vqa(
    scores: Sequence[SampleScore],
    include_judge: bool | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Summary:
    """:func:`aggregate_vqa` + :func:`count_vqa` + percentile bootstrap CIs of every metric."""
    values = vqa_values(scores, include_judge)
    metrics = aggregate_vqa(scores, include_judge)
    cis = bootstrap_cis(values, n_resamples=n_resamples, seed=seed, level=level)
    return Summary(metrics, cis, count_vqa(scores, include_judge))


# ------------------------------------------------------------------------------------------ grounding

BoxLike = Box | Sequence[float]


def canonical_boxes(boxes: Iterable[Box], width: int, height: int) -> list[Box]:
    """``boxes`` converted to canonical pixels of a ``width`` x ``height`` original image."""
    return [b.to_space(CoordSpace.PIXEL, width, height) for b in boxes]


def _box_array(boxes: Sequence[BoxLike], name: str) -> NDArray[np.float64]:
    rows = []
    for b in boxes:
        if isinstance(b, Box):
            if b.space is not CoordSpace.PIXEL:
                raise ValueError(
                    f"{name} box in space {b.space.value!r}: convert to canonical pixels first "
                    "(emma.eval.scorers.canonical_boxes)"
                )
            rows.append(b.as_tuple())
        else:
            t = tuple(float(v) for v in b)
            if len(t) != 4:
                raise ValueError(f"{name} box needs 4 coordinates, got {len(t)}")
            rows.append(t)
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} boxes contain non-finite coordinates")
    return arr


def iou_matrix(pred: Sequence[BoxLike], gold: Sequence[BoxLike]) -> NDArray[np.float64]:
    """IoU of every (predicted, gold) pair, shape ``(len(pred), len(gold))``; inverted boxes have area 0."""
    p, g = _box_array(pred, "predicted"), _box_array(gold, "gold")
    px1, py1, px2, py2 = (p[:, i : i + 1] for i in range(4))
    gx1, gy1, gx2, gy2 = (g[:, i] for i in range(4))
    iw = np.clip(np.minimum(px2, gx2) - np.maximum(px1, gx1), 0, None)
    ih = np.clip(np.minimum(py2, gy2) - np.maximum(py1, gy1), 0, None)
    inter = iw * ih
    area_p = np.clip(px2 - px1, 0, None) * np.clip(py2 - py1, 0, None)
    area_g = np.clip(gx2 - gx1, 0, None) * np.clip(gy2 - gy1, 0, None)
    union = area_p + area_g - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return out.reshape(len(p), len(g))


def iou(a: BoxLike, b: BoxLike) -> float:
    return float(iou_matrix([a], [b])[0, 0])


def match_boxes(
    pred: Sequence[BoxLike], gold: Sequence[BoxLike]
) -> tuple[NDArray[np.float64], list[tuple[int, int]]]:
    """One-to-one greedy matching by IoU.

    Returns ``ious`` (one per gold box: the IoU with its matched prediction, 0.0 when unmatched) and
    ``matches`` (``(pred_index, gold_index)`` pairs, in matching order).
    """
    m = iou_matrix(pred, gold)
    ious = np.zeros(m.shape[1], dtype=np.float64)
    matches: list[tuple[int, int]] = []
    if m.size == 0:
        return ious, matches
    order = np.argsort(-m, axis=None, kind="stable")
    used_p: set[int] = set()
    used_g: set[int] = set()
    n_g = m.shape[1]
    for flat in order:
        i, j = divmod(int(flat), n_g)
        if m[i, j] <= 0.0:
            break
        if i in used_p or j in used_g:
            continue
        used_p.add(i)
        used_g.add(j)
        ious[j] = m[i, j]
        matches.append((i, j))
        if len(used_p) == m.shape[0] or len(used_g) == n_g:
            break
    return ious, matches


@dataclass(frozen=True, slots=True)
class GroundingScore:
    status: ExtractStatus
    n_pred: int
    n_gold: int
    ious: tuple[float, ...]  # per gold box
    matches: tuple[tuple[int, int], ...]
    threshold: float = 0.5

    @property
    def hits(self) -> int:
        return sum(v >= self.threshold - 1e-9 for v in self.ious)

    @property
    def mean_iou(self) -> float:
        return float(np.mean(self.ious)) if self.ious else 0.0

    @property
    def recall(self) -> float:
        return self.hits / self.n_gold if self.n_gold else 0.0

    @property
    def precision(self) -> float:
        return self.hits / self.n_pred if self.n_pred else 0.0


def score_grounding(
    pred: Sequence[BoxLike] | None,
    gold: Sequence[BoxLike],
    threshold: float = 0.5,
    status: ExtractStatus | None = None,
) -> GroundingScore:
    """Score predicted boxes (canonical pixels) against gold; ``pred=None`` means nothing was parsed."""
    if not gold:
        raise ValueError("a grounding sample needs at least one gold box")
    if pred is None or len(pred) == 0:
        st: ExtractStatus = status or ("unparseable" if pred is None else "ok")
        return GroundingScore(st, 0, len(gold), (0.0,) * len(gold), (), threshold)
    ious, matches = match_boxes(pred, gold)
    return GroundingScore(
        status or "ok", len(pred), len(gold), tuple(map(float, ious)), tuple(matches), threshold
    )


def grounding_values(scores: Sequence[GroundingScore]) -> dict[str, NDArray[np.float64]]:
    if not scores:
        return {}
    return {
        "mean_iou": np.array([s.mean_iou for s in scores]),
        "recall_at_iou50": np.array([s.recall for s in scores]),
        "precision_at_iou50": np.array([s.precision for s in scores]),
        "grounding_unparseable": np.array([s.status != "ok" for s in scores], dtype=np.float64),
    }


def grounding_metrics(scores: Sequence[GroundingScore]) -> dict[str, float]:
    """Sample-averaged ``mean_iou``, ``recall_at_iou50``, ``precision_at_iou50``, ``grounding_unparseable``.

    The ``_at_iou50`` names hold for the default threshold 0.5; scores made with another threshold
    are refused rather than mislabelled.
    """
    if any(abs(s.threshold - 0.5) > 1e-12 for s in scores):
        raise ValueError("grounding_metrics reports IoU >= 0.5; score with threshold=0.5")
    return {k: float(v.mean()) for k, v in grounding_values(scores).items()}


# ------------------------------------------------------------------------------------- classification


@dataclass(frozen=True, slots=True)
class PRF:
    """Precision, recall, F1 (0.0 where a denominator is 0) and support (number of true instances)."""

    precision: float
    recall: float
    f1: float
    support: int = 0


def precision_recall_f1(tp: int, fp: int, fn: int) -> PRF:
    """Named precision / recall / F1 from counts (0.0 for an empty denominator)."""
    if min(tp, fp, fn) < 0:
        raise ValueError("counts must be non-negative")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PRF(precision=precision, recall=recall, f1=f1, support=tp + fn)


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Rank-based ROC AUC (Mann-Whitney U, ties get average ranks); needs both classes present."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true and scores differ in length: {y.size} vs {s.size}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative sample")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    ranks = avg_rank[inverse.ravel()]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True, slots=True)
class ClassificationResult:
    labels: tuple[str, ...]
    per_class: dict[str, PRF]
    macro: PRF  # unweighted means of per-class precision, recall and F1
    accuracy: float
    macro_auc: float | None  # None when no class has both positives and negatives
    n: int
    n_unparseable: int

    def metrics(self) -> dict[str, float]:
        out = {
            "accuracy": self.accuracy,
            "macro_precision": self.macro.precision,
            "macro_recall": self.macro.recall,
            "macro_f1": self.macro.f1,
            "unparseable": self.n_unparseable / self.n if self.n else 0.0,
        }
        if self.macro_auc is not None:
            out["macro_auc"] = self.macro_auc
        return out


def classification_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str | None],
    labels: Sequence[str] | None = None,
    scores: ArrayLike | Mapping[str, ArrayLike] | None = None,
) -> ClassificationResult:
    """Single-label classification: per-class P/R/F1, macro F1, accuracy, one-vs-rest macro AUC.

    ``y_pred[i] is None`` = unparseable (wrong). ``labels``: the classes (default: sorted union of
    gold and parsed predictions). ``scores``: optional per-class scores, an ``(n, len(labels))`` array
    or ``{label: (n,) scores}``; without them AUC uses the hard predictions.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} vs {len(y_pred)}")
    n = len(y_true)
    if n == 0:
        raise ValueError("no samples")
    labs = (
        tuple(labels)
        if labels is not None
        else tuple(sorted(set(y_true) | {p for p in y_pred if p is not None}))
    )
    if len(set(labs)) != len(labs):
        raise ValueError("labels must be distinct")
    yt = np.array(list(y_true), dtype=object)
    yp = np.array([p if p is not None else None for p in y_pred], dtype=object)
    per_class: dict[str, PRF] = {}
    for lab in labs:
        t, p = yt == lab, yp == lab
        per_class[lab] = precision_recall_f1(int(np.sum(t & p)), int(np.sum(~t & p)), int(np.sum(t & ~p)))
    k = len(labs)
    macro = PRF(
        precision=sum(v.precision for v in per_class.values()) / k if k else 0.0,
        recall=sum(v.recall for v in per_class.values()) / k if k else 0.0,
        f1=sum(v.f1 for v in per_class.values()) / k if k else 0.0,
        support=n,
    )
    accuracy = float(np.mean([t == p for t, p in zip(y_true, y_pred)]))
    if scores is None:
        score_cols = {lab: (yp == lab).astype(np.float64) for lab in labs}
    elif isinstance(scores, Mapping):
        score_cols = {lab: np.asarray(scores[lab], dtype=np.float64) for lab in labs}
    else:
        mat = np.asarray(scores, dtype=np.float64)
        if mat.shape != (n, k):
            raise ValueError(f"scores must have shape ({n}, {k}), got {mat.shape}")
        score_cols = {lab: mat[:, i] for i, lab in enumerate(labs)}
    aucs = [roc_auc(yt == lab, score_cols[lab]) for lab in labs if 0 < int(np.sum(yt == lab)) < n]
    macro_auc = float(np.mean(aucs)) if aucs else None
    return ClassificationResult(
        labels=labs,
        per_class=per_class,
        macro=macro,
        accuracy=accuracy,
        macro_auc=macro_auc,
        n=n,
        n_unparseable=sum(p is None for p in y_pred),
    )
