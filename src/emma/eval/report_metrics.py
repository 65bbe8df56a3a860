"""Report-generation metrics: BLEU-4, ROUGE-L and an offline clinical-finding F1.

- ``bleu4``: sacrebleu corpus BLEU (4-grams, ``13a`` tokenizer, lowercased, sacrebleu's default ``exp``
  smoothing) on sacrebleu's 0-100 scale. The per-sample value is sacrebleu's sentence BLEU (effective
  order); the corpus value is *not* the mean of sentence BLEU but BLEU of the summed n-gram statistics,
  which :func:`report_statistic` recomputes for each bootstrap resample.
- ``rouge_l``: rouge-score ROUGE-L F-measure (Porter stemming; rouge-score's tokenizer keeps only
  ``[a-z0-9]`` words, so it is for English reports), averaged over samples; 0-1.
- ``clinical_f1_micro`` / ``clinical_f1_macro`` (+ ``clinical_precision_micro``,
  ``clinical_recall_micro``): prediction and reference are labelled with
  :func:`emma.text.labeler.label_report` over CheXpert's 14 observations (No Finding included). A
  finding is *positive* when its label is 1. **Uncertain (-1) counts as negative** by default
  (``uncertain="negative"``; ``"positive"`` is the other common convention): "possible pneumonia" in
  a generated report earns no credit for, and is not penalised against, a reference that says
  "pneumonia". Micro F1 pools TP/FP/FN over findings and samples; macro F1 averages the per-finding
  F1 over the findings with at least one positive in the predictions or the references (a finding
  that no report mentions has no defined F1 and is left out, not counted as 0 or 1). With no positive
  anywhere both are 1.0 (complete agreement on "nothing").

Optional extras (CIDEr, METEOR, BERTScore, RadGraph-F1, CheXbert-F1): :func:`optional_metric` returns an
:class:`OptionalMetric` that computes only when its package and model files are already present, and
otherwise says what is missing. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from emma.errors import EmmaError
from emma.text.labeler import CHEXPERT_FINDINGS, POSITIVE, UNCERTAIN, label_report

UncertainPolicy = Literal["negative", "positive"]

REPORT_METRICS: tuple[str, ...] = (
    "bleu4",
    "rouge_l",
    "clinical_f1_micro",
    "clinical_f1_macro",
    "clinical_precision_micro",
    "clinical_recall_micro",
)

_BLEU_OPTIONS: dict[str, Any] = {"lowercase": True, "tokenize": "13a"}


@cache
def _bleu() -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(**_BLEU_OPTIONS)


@cache
def _sentence_bleu() -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True, **_BLEU_OPTIONS)


@cache
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def positive_findings(text: str, uncertain: UncertainPolicy = "negative") -> frozenset[str]:
    """The CheXpert findings a report asserts (label 1; also -1 when ``uncertain="positive"``)."""
    accepted = {POSITIVE, UNCERTAIN} if uncertain == "positive" else {POSITIVE}
    labels = label_report(text)
    return frozenset(f for f in CHEXPERT_FINDINGS if labels.get(f) in accepted)


@dataclass(frozen=True)
class ReportSampleScore:
    """One prediction/reference pair: sufficient statistics for the corpus metrics and per-sample values."""

    bleu_stats: tuple[int, ...]  # sacrebleu: sys_len, ref_len, correct 1-4, total 1-4
    bleu4: float  # sentence BLEU, 0-100
    rouge_l: float
    predicted: frozenset[str]  # positive CheXpert findings
    reference: frozenset[str]

    @property
    def tp(self) -> int:
        return len(self.predicted & self.reference)

    @property
    def fp(self) -> int:
        return len(self.predicted - self.reference)

    @property
    def fn(self) -> int:
        return len(self.reference - self.predicted)

    @property
    def clinical_f1(self) -> float:
        """Sample-level F1 of the positive findings (1.0 when neither report asserts any)."""
        return _f1(self.tp, self.fp, self.fn)

    def as_dict(self) -> dict[str, float]:
        return {
            "bleu4": self.bleu4,
            "rouge_l": self.rouge_l,
            "clinical_f1": self.clinical_f1,
            "clinical_tp": float(self.tp),
            "clinical_fp": float(self.fp),
            "clinical_fn": float(self.fn),
        }


def _f1(tp: float, fp: float, fn: float) -> float:
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2 * tp / denominator


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    for name, texts in (("prediction", predictions), ("reference", references)):
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"{name} {i} is {type(t).__name__}, not str")


def score_report_samples(
    predictions: Sequence[str], references: Sequence[str], *, uncertain: UncertainPolicy = "negative"
) -> list[ReportSampleScore]:
    """Per-pair statistics and values; ``aggregate_report_scores`` turns them into corpus metrics."""
    _check(predictions, references)
    bleu_stats = _bleu()._extract_corpus_statistics(list(predictions), [list(references)])
    sentence_bleu, rouge = _sentence_bleu(), _rouge()
    out = []
    for pred, ref, stats in zip(predictions, references, bleu_stats):
        out.append(
            ReportSampleScore(
                bleu_stats=tuple(int(x) for x in stats),
                bleu4=float(sentence_bleu.sentence_score(pred, [ref]).score),
                rouge_l=float(rouge.score(ref, pred)["rougeL"].fmeasure),
                predicted=positive_findings(pred, uncertain),
                reference=positive_findings(ref, uncertain),
            )
        )
    return out


def _bleu_from_stats(stats: Sequence[float]) -> float:
    return float(_bleu()._compute_score_from_stats([int(round(x)) for x in stats]).score)


def _finding_counts(samples: Sequence[ReportSampleScore]) -> np.ndarray:
    """``(n, 14, 3)`` TP / FP / FN per sample and finding."""
    counts = np.zeros((len(samples), len(CHEXPERT_FINDINGS), 3), dtype=np.int64)
    for i, s in enumerate(samples):
        for j, f in enumerate(CHEXPERT_FINDINGS):
            p, r = f in s.predicted, f in s.reference
            counts[i, j] = (p and r, p and not r, r and not p)
    return counts


def _clinical_from_counts(tp_fp_fn: np.ndarray) -> dict[str, float]:
    """Micro/macro metrics from summed ``(14, 3)`` counts."""
    tp, fp, fn = (float(x) for x in tp_fp_fn.sum(axis=0))
    per_finding = [(float(a), float(b), float(c)) for a, b, c in tp_fp_fn]
    defined = [_f1(a, b, c) for a, b, c in per_finding if a + b + c > 0]
    return {
        "clinical_f1_micro": _f1(tp, fp, fn),
        "clinical_f1_macro": float(np.mean(defined)) if defined else 1.0,
        "clinical_precision_micro": tp / (tp + fp) if tp + fp else 1.0 if fn == 0 else 0.0,
        "clinical_recall_micro": tp / (tp + fn) if tp + fn else 1.0 if fp == 0 else 0.0,
    }


def aggregate_report_scores(samples: Sequence[ReportSampleScore]) -> dict[str, float]:
    """Corpus metrics (:data:`REPORT_METRICS`) of scored samples."""
    if not samples:
        raise ValueError("no samples to score")
    summed = np.sum([s.bleu_stats for s in samples], axis=0)
    metrics = {
        "bleu4": _bleu_from_stats(summed),
        "rouge_l": float(np.mean([s.rouge_l for s in samples])),
    }
    metrics.update(_clinical_from_counts(_finding_counts(samples).sum(axis=0)))
    return {name: metrics[name] for name in REPORT_METRICS}


def report_scores(
    predictions: Sequence[str], references: Sequence[str], *, uncertain: UncertainPolicy = "negative"
) -> dict[str, float]:
    """``bleu4`` (0-100), ``rouge_l``, ``clinical_f1_micro``, ``clinical_f1_macro`` and micro P/R."""
    return aggregate_report_scores(score_report_samples(predictions, references, uncertain=uncertain))


def per_sample_report_scores(
    predictions: Sequence[str], references: Sequence[str], *, uncertain: UncertainPolicy = "negative"
) -> list[dict[str, float]]:
    """Per pair: sentence ``bleu4``, ``rouge_l``, sample ``clinical_f1`` and its TP/FP/FN counts."""
    return [s.as_dict() for s in score_report_samples(predictions, references, uncertain=uncertain)]


def clinical_f1_by_finding(samples: Sequence[ReportSampleScore]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and counts per CheXpert finding (F1 is NaN where no report has it)."""
    counts = _finding_counts(samples).sum(axis=0)
    out = {}
    for f, (tp, fp, fn) in zip(CHEXPERT_FINDINGS, counts):
        tp, fp, fn = int(tp), int(fp), int(fn)
        out[f] = {
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"),
            "f1": _f1(tp, fp, fn) if tp + fp + fn else float("nan"),
            "tp": float(tp),
            "fp": float(fp),
            "fn": float(fn),
            "support": float(tp + fn),
        }
    return out


def report_statistic(samples: Sequence[ReportSampleScore], metric: str) -> Callable[..., Any]:
    """A statistic of *sample indices* for :func:`emma.eval.stats.bootstrap_ci` on a corpus metric.

    ``bootstrap_ci(np.arange(n), stat=report_statistic(samples, "bleu4"))`` resamples the samples and
    recomputes corpus BLEU (or pooled clinical F1) from their summed statistics for each resample.
    """
    if metric not in REPORT_METRICS:
        raise ValueError(f"unknown report metric {metric!r}; known: {', '.join(REPORT_METRICS)}")
    bleu = np.array([s.bleu_stats for s in samples], dtype=np.int64)
    rouge = np.array([s.rouge_l for s in samples], dtype=np.float64)
    counts = _finding_counts(samples)

    def one(idx: np.ndarray) -> float:
        if metric == "bleu4":
            return _bleu_from_stats(bleu[idx].sum(axis=0))
        if metric == "rouge_l":
            return float(rouge[idx].mean())
        return _clinical_from_counts(counts[idx].sum(axis=0))[metric]

    def stat(indices: ArrayLike, axis: int | None = None) -> Any:
        arr = np.asarray(indices).astype(np.int64)
        if arr.ndim == 1:
            return one(arr)
        if axis not in (1, -1):
            raise ValueError("resamples must be the rows of a 2-D index array (axis=1)")
        return np.array([one(row) for row in arr], dtype=np.float64)

    return stat


def metrics_config(uncertain: UncertainPolicy = "negative") -> dict[str, str]:
    """What exactly was measured, for ``results.json``'s config."""
    from importlib.metadata import version

    return {
        "bleu4": f"sacrebleu {_bleu().get_signature()} (corpus BLEU, 0-100)",
        "rouge_l": f"rouge-score {version('rouge-score')} rougeL F-measure, Porter stemmer, mean over samples",
        "clinical_f1": (
            "emma.text.labeler (rule-based, CheXpert 14 incl. No Finding); positive = label 1; "
            f"uncertain counted as {uncertain}; macro over findings with a positive"
        ),
    }


# --------------------------------------------------------------------------- optional extras


class MetricUnavailableError(EmmaError):
    """An optional metric whose package or model files are not present."""


@dataclass(frozen=True)
class OptionalMetric:
    """An optional report metric: computes only when ``available``; ``message`` says why not."""

    name: str
    available: bool
    message: str
    _compute: Callable[[Sequence[str], Sequence[str]], float] | None = None

    def __call__(self, predictions: Sequence[str], references: Sequence[str]) -> float:
        if not self.available or self._compute is None:
            raise MetricUnavailableError(f"{self.name}: {self.message}")
        _check(predictions, references)
        return float(self._compute(predictions, references))


def _has_package(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _hf_cached(repo_or_path: str, filename: str = "config.json") -> bool:
    """True when a hub model is already in the local cache (or is a local folder); never downloads."""
    if Path(repo_or_path).is_dir():
        return (Path(repo_or_path) / filename).is_file()
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_or_path, filename), str)
    except Exception:  # noqa: BLE001 — any failure means "not found locally"
        return False


def _simple_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _cider(**_: Any) -> OptionalMetric:
    if not _has_package("pycocoevalcap"):
        return OptionalMetric("cider", False, "not available: install pycocoevalcap")

    def compute(preds: Sequence[str], refs: Sequence[str]) -> float:
        from pycocoevalcap.cider.cider import Cider

        gts = {i: [" ".join(_simple_tokens(r))] for i, r in enumerate(refs)}
        res = {i: [" ".join(_simple_tokens(p))] for i, p in enumerate(preds)}
        score, _ = Cider().compute_score(gts, res)
        return float(score)

    return OptionalMetric("cider", True, "ok: pycocoevalcap CIDEr-D, lowercased word tokens", compute)


def _meteor(**_: Any) -> OptionalMetric:
    if not _has_package("nltk"):
        return OptionalMetric("meteor", False, "not available: install nltk and its wordnet data")
    import nltk

    for resource in ("corpora/wordnet", "corpora/wordnet.zip"):
        try:
            nltk.data.find(resource)
            break
        except LookupError:
            continue
    else:
        return OptionalMetric(
            "meteor", False, "not available: NLTK wordnet data not found (python -m nltk.downloader wordnet)"
        )

    def compute(preds: Sequence[str], refs: Sequence[str]) -> float:
        from nltk.translate.meteor_score import meteor_score

        return float(
            np.mean([meteor_score([_simple_tokens(r)], _simple_tokens(p)) for p, r in zip(preds, refs)])
        )

    return OptionalMetric("meteor", True, "ok: nltk METEOR, mean over samples", compute)


def _bertscore(model_type: str = "roberta-large", **_: Any) -> OptionalMetric:
    if not _has_package("bert_score"):
        return OptionalMetric("bertscore", False, "not available: install bert-score")
    if not _hf_cached(model_type):
        return OptionalMetric(
            "bertscore", False, f"not available: model weights not found locally for {model_type}"
        )

    def compute(preds: Sequence[str], refs: Sequence[str]) -> float:
        from bert_score import score

        _, _, f = score(list(preds), list(refs), model_type=model_type, verbose=False)
        return float(f.mean())

    return OptionalMetric("bertscore", True, f"ok: bert-score F1 with {model_type}", compute)


def _radgraph(model_type: str = "radgraph-xl", **_: Any) -> OptionalMetric:
    if not _has_package("radgraph"):
        return OptionalMetric("radgraph_f1", False, "not available: install radgraph")
    try:
        from radgraph.radgraph import CACHE_DIR  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 — a broken install is "not available" too
        return OptionalMetric("radgraph_f1", False, f"not available: radgraph does not import ({exc})")
    model_dir = Path(CACHE_DIR) / model_type
    if not model_dir.is_dir() or not any(model_dir.iterdir()):
        return OptionalMetric("radgraph_f1", False, f"not available: model weights not found in {model_dir}")

    def compute(preds: Sequence[str], refs: Sequence[str]) -> float:
        from radgraph import F1RadGraph  # type: ignore[import-not-found]

        mean_reward, *_ = F1RadGraph(reward_level="partial", model_type=model_type)(
            refs=list(refs), hyps=list(preds)
        )
        return float(mean_reward)

    return OptionalMetric("radgraph_f1", True, f"ok: radgraph F1RadGraph partial, {model_type}", compute)


def _chexbert(**_: Any) -> OptionalMetric:
    if not _has_package("f1chexbert"):
        return OptionalMetric("chexbert_f1", False, "not available: install f1chexbert")
    try:
        from f1chexbert.f1chexbert import CACHE_DIR  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001
        return OptionalMetric("chexbert_f1", False, f"not available: f1chexbert does not import ({exc})")
    checkpoint = Path(CACHE_DIR) / "chexbert.pth"
    if not checkpoint.is_file() or not _hf_cached("bert-base-uncased", "vocab.txt"):
        return OptionalMetric(
            "chexbert_f1", False, f"not available: model weights not found ({checkpoint}, bert-base-uncased)"
        )

    def compute(preds: Sequence[str], refs: Sequence[str]) -> float:
        from f1chexbert import F1CheXbert  # type: ignore[import-not-found]

        _, _, report, _ = F1CheXbert()(hyps=list(preds), refs=list(refs))
        return float(report["micro avg"]["f1-score"])

    return OptionalMetric("chexbert_f1", True, "ok: f1chexbert micro F1 over 14 observations", compute)


_OPTIONAL: dict[str, Callable[..., OptionalMetric]] = {
    "cider": _cider,
    "meteor": _meteor,
    "bertscore": _bertscore,
    "radgraph_f1": _radgraph,
    "chexbert_f1": _chexbert,
}
OPTIONAL_METRICS: tuple[str, ...] = tuple(_OPTIONAL)


def optional_metric(name: str, **options: Any) -> OptionalMetric:
    """``cider``, ``meteor``, ``bertscore``, ``radgraph_f1`` or ``chexbert_f1``, if it can run here.

    Checks that the package and its model files are present (nothing is downloaded); an unavailable
    metric has ``available=False`` and a ``message`` such as ``"not available: install radgraph"``.
    """
    key = name.strip().lower().replace("-", "_")
    key = {"radgraph": "radgraph_f1", "chexbert": "chexbert_f1", "bert_score": "bertscore"}.get(key, key)
    if key not in _OPTIONAL:
        raise ValueError(f"unknown optional metric {name!r}; known: {', '.join(OPTIONAL_METRICS)}")
    return _OPTIONAL[key](**options)
