"""The runner's bridge to the scorers: one uniform shape per scored item, no scoring rule of its own.

Every rule lives in :mod:`emma.eval.extract`, :mod:`emma.eval.scorers`, :mod:`emma.eval.compat`,
:mod:`emma.eval.report_metrics` and :mod:`emma.eval.judge`; an adapter only calls them and returns,
per item, a :class:`Scored`: the scorer's own object, the item's *per-sample values* (its contribution
to each metric it counts in: a metric is the mean of its values, which is what the bootstrap CIs, the
breakdowns, the ablation deltas and ``emma eval compare`` resample), whether it is correct, what was
extracted and the parse status.

Report metrics are corpus statistics (corpus BLEU is not a mean of sentence BLEU), so the report
adapter computes its metrics and CIs from the summed statistics (``report_metrics.report_statistic``)
and its per-sample values carry other names (``sentence_bleu4``, ``rouge_l``, ``sample_clinical_f1``)
for paired comparisons.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emma.data.schema import TaskType
from emma.errors import DataFormatError, InputError
from emma.eval.tasks import EvalItem, TaskDef

CI_LEVEL = 0.95
# The runner's answers by sample id (None: no prediction) and each answer's word_logprobs by sample id.
Texts = Mapping[str, str | None]
WordLogprobs = Mapping[str, Mapping[str, float] | None]

MISSING = "missing"  # parse status of an evaluated sample without a prediction


@dataclass
class Scored:
    """One item's score in the harness's uniform shape."""

    score: Any  # the scorer's object (SampleScore, GroundingScore, ReportSampleScore)
    values: dict[str, float]  # per-sample contribution to each metric it counts in
    correct: bool | None
    extracted: Any
    status: str


def metric_values(scored: Sequence[Scored]) -> dict[str, list[float]]:
    """Per-metric lists of per-sample values (in item order)."""
    out: dict[str, list[float]] = {}
    for s in scored:
        for k, v in s.values.items():
            out.setdefault(k, []).append(v)
    return out


def mean_ci(values: Sequence[float], n_resamples: int, seed: int) -> list[float]:
    """Percentile bootstrap CI of the mean of ``values`` (:func:`emma.eval.stats.bootstrap_mean_ci`)."""
    from emma.eval.stats import bootstrap_mean_ci

    return list(bootstrap_mean_ci(values, n_resamples=n_resamples, seed=seed, level=CI_LEVEL))


def mean_cis(values: Mapping[str, Sequence[float]], n_resamples: int, seed: int) -> dict[str, list[float]]:
    """:func:`mean_ci` of each metric's per-sample values."""
    return {k: mean_ci(v, n_resamples, seed) for k, v in values.items() if len(v)}


class Adapter:
    """Base adapter: per-item scoring, aggregate metrics, counts, CIs."""

    name = "emma"  # the scorer label recorded in results.json (a compat scorer names itself)
    headline = "overall_accuracy"

    @property
    def breakdown_metric(self) -> str:
        """The per-sample metric shown by group (a mean of per-sample values)."""
        return self.headline

    def score_batch(
        self, items: Sequence[EvalItem], texts: Texts, logprobs: WordLogprobs | None = None
    ) -> list[Scored]:
        """Score every item; ``logprobs`` (id → the engine's word_logprobs) is read by the adapters that
        use it (finding classification: AUROC) and ignored by the others."""
        return [self.score(item, texts.get(item.id)) for item in items]

    def score(self, item: EvalItem, prediction: str | None) -> Scored:
        raise NotImplementedError

    def metrics(self, scored: Sequence[Scored]) -> dict[str, float | None]:
        """Each metric's value; ``None`` for one that cannot be computed honestly (a failed judge)."""
        raise NotImplementedError

    def counts(self, scored: Sequence[Scored]) -> dict[str, int]:
        raise NotImplementedError

    def cis(self, scored: Sequence[Scored], n_resamples: int, seed: int) -> dict[str, list[float]]:
        return mean_cis(metric_values(scored), n_resamples, seed)

    def config(self) -> dict[str, Any]:
        return {"scorer": self.name}


class VqaAdapter(Adapter):
    """Closed / open / multiple-choice questions (emma.eval.scorers, or emma.eval.compat)."""

    def __init__(self, compat: str | None = None, headline: str = "overall_accuracy") -> None:
        from emma.eval import scorers

        self._scorers = scorers
        self.headline = headline
        self.judged = False  # set once judge verdicts are attached (judge_* metrics appear)
        if compat is None:
            self._fn = scorers.score_vqa
        else:
            from emma.eval import compat as compat_mod

            if compat not in compat_mod.COMPAT_MODES:
                raise InputError(
                    f"unknown compat mode {compat!r} (known: {', '.join(compat_mod.COMPAT_MODES)})"
                )
            self._fn = compat_mod.score_vqa_medevalkit
            self.name = compat_mod.COMPAT_LABEL

    @staticmethod
    @functools.lru_cache(maxsize=65536)
    def _values(score: Any, judged: bool) -> tuple[tuple[str, float], ...]:
        from emma.eval.scorers import vqa_values

        return tuple((k, float(v[0])) for k, v in vqa_values([score], include_judge=judged).items())

    def wrap(self, item: EvalItem, s: Any, judge_values: bool | None = None) -> Scored:
        """``judge_values``: whether the per-sample values carry judge_* (default: once judged); False
        for every item of a pass where the judge failed on some (no judge metric for that pass)."""
        extracted = s.extracted
        if s.kind == "choice" and isinstance(extracted, int) and item.sample.gold.options:
            extracted = f"{chr(ord('A') + extracted)}. {item.sample.gold.options[extracted]}"
        judged = self.judged if judge_values is None else judge_values
        return Scored(s, dict(self._values(s, judged)), bool(s.correct), extracted, s.status)

    def score(self, item: EvalItem, prediction: str | None) -> Scored:
        return self.wrap(item, self._fn(item.sample.gold, item.sample.task, prediction))

    def metrics(self, scored: Sequence[Scored]) -> dict[str, float | None]:
        return self._scorers.aggregate_vqa([s.score for s in scored], include_judge=self.judged or None)

    def counts(self, scored: Sequence[Scored]) -> dict[str, int]:
        return dict(self._scorers.count_vqa([s.score for s in scored], include_judge=self.judged or None))


class GroundingAdapter(Adapter):
    """Boxes read with :func:`emma.infer.grounding.parse_model_boxes` in the family's convention, with the
    image sizes the model saw after its processor's resize (``processor``: the engine's, as ``emma chat``
    and ``emma serve`` read boxes; None: the family's released defaults, e.g. for a predictions file),
    scored one-to-one with :func:`emma.eval.scorers.score_grounding` (IoU >= 0.5)."""

    headline = "recall_at_iou50"

    def __init__(self, family: str | None, processor: Any = None) -> None:
        from emma.eval import scorers
        from emma.infer.grounding import parse_model_boxes
        from emma.infer.modes import model_sizes
        from emma.model.families import resolve_family

        self._scorers = scorers
        self._parse = parse_model_boxes
        self._model_sizes = model_sizes
        self.family = resolve_family(family)
        self.processor = processor

    def score(self, item: EvalItem, prediction: str | None) -> Scored:
        sizes = [(int(r.width or 0), int(r.height or 0)) for r in item.images]
        if any(w <= 0 or h <= 0 for w, h in sizes):
            raise DataFormatError(f"sample {item.id}: image size unknown; cannot convert boxes")
        gold = list(item.sample.gold.boxes)
        boxes: list[Any] = []
        if prediction is None or not prediction.strip():
            s = self._scorers.score_grounding(None, gold, status="empty")
        else:
            seen = self._model_sizes(self.family.name, self.processor, sizes)
            boxes = [b for b in self._parse(prediction, self.family, sizes, seen).boxes if b.image_index == 0]
            s = self._scorers.score_grounding(boxes or None, gold)
        values = {k: float(v[0]) for k, v in self._scorers.grounding_values([s]).items()}
        extracted = [[round(v, 1) for v in b.as_tuple()] for b in boxes]
        correct = s.status == "ok" and s.hits == s.n_gold
        return Scored(s, values, correct, extracted, s.status)

    def metrics(self, scored: Sequence[Scored]) -> dict[str, float | None]:
        return self._scorers.grounding_metrics([s.score for s in scored])

    def counts(self, scored: Sequence[Scored]) -> dict[str, int]:
        scores = [s.score for s in scored]
        return {
            "n": len(scores),
            "n_gold_boxes": sum(s.n_gold for s in scores),
            "n_pred_boxes": sum(s.n_pred for s in scores),
            "hits_at_iou50": sum(s.hits for s in scores),
            "grounding_unparseable": sum(s.status != "ok" for s in scores),
        }

    def config(self) -> dict[str, Any]:
        return {
            "scorer": self.name,
            "box_family": self.family.name,
            "box_convention": str(self.family.box_convention),
            "matching": "one-to-one greedy by IoU; recall and precision at IoU >= 0.5",
        }


class ReportAdapter(Adapter):
    """Report generation: BLEU-4, ROUGE-L, clinical-finding F1 (emma.eval.report_metrics), optional extras."""

    headline = "clinical_f1_micro"

    @property
    def breakdown_metric(self) -> str:
        return "sample_clinical_f1"

    def __init__(self) -> None:
        from emma.eval import report_metrics

        self._rm = report_metrics
        self.optional: dict[str, float] = {}
        self.unavailable: dict[str, str] = {}

    def score_batch(
        self, items: Sequence[EvalItem], texts: Texts, logprobs: WordLogprobs | None = None
    ) -> list[Scored]:
        preds = [texts.get(it.id) or "" for it in items]
        refs = [it.sample.gold.answer or "" for it in items]
        samples = self._rm.score_report_samples(preds, refs)
        out = []
        for it, pred, s in zip(items, preds, samples):
            status = "ok" if pred.strip() else ("empty" if texts.get(it.id) is not None else MISSING)
            values = {"sentence_bleu4": s.bleu4, "rouge_l": s.rouge_l, "sample_clinical_f1": s.clinical_f1}
            out.append(Scored(s, values, None, sorted(s.predicted), status))
        self._optional(preds, refs)
        return out

    def _optional(self, preds: list[str], refs: list[str]) -> None:
        for name in self._rm.OPTIONAL_METRICS:
            metric = self._rm.optional_metric(name)
            if metric.available:
                self.optional[name] = metric(preds, refs)
            else:
                self.unavailable[name] = metric.message

    def metrics(self, scored: Sequence[Scored]) -> dict[str, float | None]:
        return {**self._rm.aggregate_report_scores([s.score for s in scored]), **self.optional}

    def counts(self, scored: Sequence[Scored]) -> dict[str, int]:
        return {
            "n": len(scored),
            "empty": sum(s.status == "empty" for s in scored),
            "missing": sum(s.status == MISSING for s in scored),
        }

    def cis(self, scored: Sequence[Scored], n_resamples: int, seed: int) -> dict[str, list[float]]:
        from emma.eval.stats import bootstrap_ci

        samples = [s.score for s in scored]
        index = np.arange(len(samples))
        out = {}
        for metric in self._rm.REPORT_METRICS:
            stat = self._rm.report_statistic(samples, metric)
            lo, hi = bootstrap_ci(index, stat=stat, n_resamples=n_resamples, seed=seed, level=CI_LEVEL)
            out[metric] = [lo, hi]
        return out

    def config(self) -> dict[str, Any]:
        return {
            "scorer": self.name,
            "report_metrics": self._rm.metrics_config(),
            "optional_metrics_unavailable": dict(self.unavailable),
        }


def make_adapter(task: TaskDef, *, compat: str | None, family: str | None, processor: Any = None) -> Adapter:
    if compat is not None and task.scorer not in ("vqa", "choice"):
        raise InputError(f"--compat applies to VQA and multiple-choice tasks, not {task.kind}")
    if task.scorer == "vqa":
        return VqaAdapter(compat)
    if task.scorer == "choice":
        return VqaAdapter(compat, headline="choice_accuracy")
    if task.scorer == "grounding":
        return GroundingAdapter(family, processor)
    if task.scorer == "report":
        return ReportAdapter()
    if task.scorer == "classification":
        from emma.eval.findings import FindingsAdapter

        return FindingsAdapter(task.findings, multi=TaskType.CLASSIFICATION in task.task_types)
    raise InputError(f"task {task.name}: scorer {task.scorer!r} is not supported by the runner")


@dataclass(frozen=True)
class JudgePass:
    """One pass of the judge over a scored run: the re-wrapped scores, the judge's counts and errors."""

    scored: list[Scored]
    counts: dict[str, int]
    errors: list[str]  # distinct messages of the answers the judge failed on (empty: all judged)


def apply_judge(
    adapter: VqaAdapter, judge: Any, items: Sequence[EvalItem], scored: Sequence[Scored]
) -> JudgePass:
    """Attach LLM-judge verdicts to the open questions (closed and choice are never judged).

    Open answers that are empty or missing are not sent (no verdict: counted as not accepted). An answer
    the judge failed on is marked ``judge_error`` (never a rejection); if any is, the judge metrics of
    this pass are ``None`` and its per-sample values carry none.
    """
    from emma.eval.judge import JudgeItem, judge_counts, judge_errors

    todo = [
        (k, JudgeItem(it.id, it.sample.question or "", it.sample.gold.answer or "", s.score.located))
        for k, (it, s) in enumerate(zip(items, scored))
        if s.score.kind == "open" and s.status == "ok"
    ]
    verdicts = judge.judge([j for _, j in todo]) if todo else []
    by_index = {k: v for (k, _), v in zip(todo, verdicts)}
    adapter.judged = True
    errors = judge_errors(verdicts)
    out = []
    for k, (it, s) in enumerate(zip(items, scored)):
        v = by_index.get(k)
        score = s.score.with_judge(v.correct if v else None, error=v is not None and v.status == "error")
        out.append(adapter.wrap(it, score, judge_values=not errors))
    return JudgePass(out, judge_counts(verdicts), errors)
