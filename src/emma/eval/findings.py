"""Finding classification (CheXpert, PadChest, ChestX-ray14): per-finding and macro metrics, AUROC from
the probability of "yes", clustered bootstrap CIs, and the runner's adapter for these tasks.

Two question forms (:mod:`emma.eval.tasks.findings`) reduce to the same table of **(image, finding)
pairs**, each with a gold label (1/0), a prediction (1, 0, or none when the answer could not be parsed
or is missing) and, where the engine exposed log-probabilities, a score ``P(yes)``:

- **per finding** ("Does this chest X-ray show cardiomegaly?"): one closed question per pair; the answer
  is read with :func:`emma.eval.extract.extract_yes_no` (yes → 1, no → 0);
- **which findings** ("Which of the following findings does this chest X-ray show: ...?"): one question
  per image; the answer is read with :func:`emma.eval.extract.extract_findings` (named → 1, not named
  → 0, for every finding of the question with a known gold label).

Metrics (present only where defined):

- ``accuracy``: correct pairs / all pairs; an unparseable or missing answer is wrong (never guessed);
- ``f1.<finding>``: F1 of the positive class (:func:`emma.eval.scorers.precision_recall_f1`): an
  unparseable answer on a positive pair is a false negative, on a negative pair neither a TP nor an FP;
  defined for findings with at least one positive pair; ``macro_f1``: their unweighted mean;
- ``auroc.<finding>``: rank AUROC (:func:`emma.eval.scorers.roc_auc`) of ``P(yes)`` over the pairs that
  have a score, for findings with both classes among them; ``macro_auroc``: their mean. Per-finding
  form only. ``P(yes) = p_yes / (p_yes + p_no)`` from the engine's ``word_logprobs`` (each the summed
  probability of the tokens spelling the word as the first generated token): exact for in-process
  engines; from a server's top alternatives for OpenAI-compatible engines, where a word none of whose
  tokens is listed is taken as probability 0 (its true value is below every listed alternative; counted
  as ``auroc_one_sided``), and a pair where neither word is listed has no score (``auroc_no_score``);
- ``macro_f1`` and (per-finding form) ``macro_auroc`` are always reported, ``null`` when undefined
  (no positive pair; no score or a single class), never a made-up 0;
- ``unparseable``: share of questions whose answer could not be parsed or is missing;
- ``exact_match`` (which-findings form): images whose every known finding is right.

Confidence intervals are 95 % percentile bootstrap intervals that resample **images** (all pairs of an
image together: :func:`emma.eval.stats.cluster_bootstrap_cis`); a metric undefined in a replicate (an
F1 without positives, an AUROC without both classes) is left out of that replicate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from emma.errors import DataFormatError
from emma.eval.extract import Extraction, extract_findings, extract_yes_no
from emma.eval.score_adapters import CI_LEVEL, MISSING, Adapter, Scored, Texts, WordLogprobs
from emma.eval.scorers import precision_recall_f1, roc_auc
from emma.eval.tasks import EvalItem
from emma.eval.tasks.findings import IMAGE_KEY

YES_NO_WORDS = ("yes", "no")


def yes_probability(logprobs: Mapping[str, float] | None) -> tuple[float | None, bool]:
    """``(P(yes), one_sided)`` from word log-probabilities: ``p_yes / (p_yes + p_no)``; a word that is
    absent counts as probability 0 (``one_sided``); ``(None, False)`` when neither is present."""
    if not logprobs:
        return None, False
    yes, no = logprobs.get("yes"), logprobs.get("no")
    if yes is None and no is None:
        return None, False
    if yes is None:
        return 0.0, True
    if no is None:
        return 1.0, True
    return 1.0 / (1.0 + math.exp(no - yes)), False


@dataclass(frozen=True)
class FindingPair:
    """One (image, finding) pair: gold 1/0, prediction 1/0/None (unparseable or missing), P(yes)."""

    image: str
    finding: str
    gold: int
    pred: int | None
    score: float | None = None


@dataclass(frozen=True)
class FindingScore:
    """One evaluated question: its pairs and how its answer was read."""

    pairs: tuple[FindingPair, ...]
    status: str  # "ok" / "unparseable" / "empty" / "missing"
    extracted: Any
    one_sided: bool = False


class PairTable:
    """The pairs of a run as arrays, for metrics and their clustered bootstrap."""

    def __init__(self, pairs: Sequence[FindingPair], findings: Sequence[str]) -> None:
        names = list(findings) + sorted({p.finding for p in pairs} - set(findings))
        images = sorted({p.image for p in pairs})
        self.image_index = {k: i for i, k in enumerate(images)}
        self.findings = names
        self.n_images = len(images)
        self.cluster = np.array([self.image_index[p.image] for p in pairs], dtype=np.int64)
        self.gold = np.array([p.gold == 1 for p in pairs], dtype=bool)
        self.pred_pos = np.array([p.pred == 1 for p in pairs], dtype=bool)
        self.correct = np.array([p.pred is not None and p.pred == p.gold for p in pairs], dtype=bool)
        self.score = np.array([np.nan if p.score is None else p.score for p in pairs], dtype=np.float64)
        by_finding: dict[str, list[int]] = {}
        for i, p in enumerate(pairs):
            by_finding.setdefault(p.finding, []).append(i)
        self.rows = {f: np.array(by_finding[f], dtype=np.int64) for f in names if f in by_finding}

    def metrics(self, cluster_counts: NDArray[np.int64] | None = None) -> dict[str, float]:
        """The pair metrics (module docstring); ``cluster_counts``: bootstrap multiplicity per image."""
        w = (
            np.ones(self.cluster.size, dtype=np.int64)
            if cluster_counts is None
            else cluster_counts[self.cluster]
        )
        out: dict[str, float] = {}
        total = int(w.sum())
        if total:
            out["accuracy"] = float(w[self.correct].sum() / total)
        f1s: list[float] = []
        aucs: list[float] = []
        for name, rows in self.rows.items():
            wr, gold, pos = w[rows], self.gold[rows], self.pred_pos[rows]
            tp, fp, fn = int(wr[gold & pos].sum()), int(wr[~gold & pos].sum()), int(wr[gold & ~pos].sum())
            if tp + fn:
                f1 = precision_recall_f1(tp, fp, fn).f1
                out[f"f1.{name}"] = f1
                f1s.append(f1)
            scored = ~np.isnan(self.score[rows]) & (wr > 0)
            if scored.any():
                y = np.repeat(gold[scored], wr[scored])
                if 0 < y.sum() < y.size:
                    auc = roc_auc(y, np.repeat(self.score[rows][scored], wr[scored]))
                    out[f"auroc.{name}"] = auc
                    aucs.append(auc)
        if f1s:
            out["macro_f1"] = float(np.mean(f1s))
        if aucs:
            out["macro_auroc"] = float(np.mean(aucs))
        return out


class QuestionTable:
    """Question-level shares (unparseable; exact match for the which-findings form) per image cluster."""

    def __init__(self, scores: Sequence[FindingScore], table: PairTable, multi: bool) -> None:
        self.multi = multi
        self.cluster = np.array(
            [table.image_index[s.pairs[0].image] if s.pairs else -1 for s in scores], dtype=np.int64
        )
        self.parsed = np.array([s.status == "ok" for s in scores], dtype=bool)
        self.exact = np.array(
            [s.status == "ok" and all(p.pred == p.gold for p in s.pairs) for s in scores], dtype=bool
        )

    def metrics(self, cluster_counts: NDArray[np.int64] | None = None) -> dict[str, float]:
        if cluster_counts is None:
            w = np.ones(self.cluster.size, dtype=np.int64)
        else:
            w = np.where(self.cluster >= 0, cluster_counts[np.maximum(self.cluster, 0)], 1)
        total = int(w.sum())
        if not total:
            return {}
        out = {"unparseable": float(w[~self.parsed].sum() / total)}
        if self.multi:
            out["exact_match"] = float(w[self.exact].sum() / total)
        return out


class FindingsAdapter(Adapter):
    """The runner's adapter for finding-classification tasks (scorer ``"classification"``)."""

    headline = "macro_f1"

    def __init__(self, findings: Sequence[str], *, multi: bool) -> None:
        self.findings = tuple(findings)
        self.multi = multi  # the which-findings form (else one closed question per finding)

    @property
    def breakdown_metric(self) -> str:
        return "exact_match" if self.multi else "accuracy"

    def score_batch(
        self, items: Sequence[EvalItem], texts: Texts, logprobs: WordLogprobs | None = None
    ) -> list[Scored]:
        return [self.score(item, texts.get(item.id), (logprobs or {}).get(item.id)) for item in items]

    def score(
        self, item: EvalItem, prediction: str | None, logprobs: Mapping[str, float] | None = None
    ) -> Scored:
        sample = item.sample
        image = str(sample.meta.extra.get(IMAGE_KEY) or sample.id)
        if self.multi:
            s = self._score_which(item, image, prediction)
            values = {
                "exact_match": float(s.status == "ok" and all(p.pred == p.gold for p in s.pairs)),
                "unparseable": float(s.status != "ok"),
            }
            correct = bool(values["exact_match"])
        else:
            s = self._score_closed(item, image, prediction, logprobs)
            values = {
                "accuracy": float(s.pairs[0].pred == s.pairs[0].gold),
                "unparseable": float(s.status != "ok"),
            }
            correct = bool(values["accuracy"])
        return Scored(s, values, correct, s.extracted, s.status)

    def _score_closed(
        self, item: EvalItem, image: str, prediction: str | None, logprobs: Mapping[str, float] | None
    ) -> FindingScore:
        sample = item.sample
        finding = str(sample.meta.extra.get("finding") or sample.meta.question_type or "")
        gold = (sample.gold.answer or "").strip().lower()
        if gold not in YES_NO_WORDS or not finding:
            raise DataFormatError(f"sample {item.id}: a finding question needs a finding and a yes/no gold")
        ext = extract_yes_no(prediction, "en") if prediction is not None else Extraction(None, "empty")
        status = MISSING if prediction is None else ext.status
        pred = None if ext.value is None else int(ext.value == "yes")
        p_yes, one_sided = yes_probability(logprobs)
        pair = FindingPair(image, finding, int(gold == "yes"), pred, p_yes)
        return FindingScore((pair,), status, {"answer": ext.value, "p_yes": p_yes}, one_sided)

    def _score_which(self, item: EvalItem, image: str, prediction: str | None) -> FindingScore:
        sample = item.sample
        options = list(sample.gold.options or [])
        if not options or not sample.gold.labels:
            raise DataFormatError(f"sample {item.id}: a which-findings question needs options and labels")
        ext = extract_findings(prediction, options) if prediction is not None else Extraction(None, "empty")
        status = MISSING if prediction is None else ext.status
        chosen = {options[i] for i in ext.value} if isinstance(ext.value, tuple) else None
        pairs = tuple(
            FindingPair(image, f, int(v), None if chosen is None else int(f in chosen))
            for f, v in sample.gold.labels.items()
        )
        extracted = None if chosen is None else [f for f in options if f in chosen]
        return FindingScore(pairs, status, extracted)

    # --------------------------------------------------------------------------------- aggregates

    def _tables(self, scored: Sequence[Scored]) -> tuple[PairTable, QuestionTable]:
        scores = [s.score for s in scored]
        pairs = PairTable([p for s in scores for p in s.pairs], self.findings)
        return pairs, QuestionTable(scores, pairs, self.multi)

    def metrics(self, scored: Sequence[Scored]) -> dict[str, float | None]:
        pairs, questions = self._tables(scored)
        out: dict[str, float | None] = {"macro_f1": None}  # None: no finding has a positive pair
        if not self.multi:
            out["macro_auroc"] = None  # None: no scores (no log-probabilities) or one class only
        out.update({**pairs.metrics(), **questions.metrics()})
        rank = {f: i for i, f in enumerate(pairs.findings)}
        return dict(sorted(out.items(), key=lambda kv: _order(kv[0], rank)))

    def cis(self, scored: Sequence[Scored], n_resamples: int, seed: int) -> dict[str, list[float]]:
        from emma.eval.stats import cluster_bootstrap_cis

        pairs, questions = self._tables(scored)
        if pairs.n_images == 0:
            return {}

        def stat(counts: NDArray[np.int64]) -> dict[str, float]:
            return {**pairs.metrics(counts), **questions.metrics(counts)}

        cis = cluster_bootstrap_cis(pairs.n_images, stat, n_resamples=n_resamples, seed=seed, level=CI_LEVEL)
        return {k: [lo, hi] for k, (lo, hi) in cis.items()}

    def counts(self, scored: Sequence[Scored]) -> dict[str, int]:
        scores = [s.score for s in scored]
        pairs = [p for s in scores for p in s.pairs]
        out = {
            "n": len(scores),
            "n_images": len({p.image for p in pairs}),
            "n_pairs": len(pairs),
            "positive_pairs": sum(p.gold for p in pairs),
            "unparseable": sum(s.status == "unparseable" for s in scores),
            "empty": sum(s.status == "empty" for s in scores),
            "missing": sum(s.status == MISSING for s in scores),
        }
        if not self.multi:
            out["auroc_scored"] = sum(p.score is not None for p in pairs)
            out["auroc_no_score"] = sum(p.score is None for p in pairs)
            out["auroc_one_sided"] = sum(s.one_sided for s in scores)
        return out

    def config(self) -> dict[str, Any]:
        return {
            "scorer": self.name,
            "findings": list(self.findings),
            "auroc": "P(yes) = p_yes / (p_yes + p_no) at the first generated token (engine word_logprobs)",
            "ci": "95% percentile bootstrap over images (clustered)",
        }


def _order(name: str, rank: Mapping[str, int]) -> tuple[int, int]:
    """Report order: the macro and question-level metrics, then F1 and AUROC per finding in set order."""
    head = ("macro_f1", "macro_auroc", "accuracy", "exact_match", "unparseable")
    if name in head:
        return head.index(name), 0
    kind, _, finding = name.partition(".")
    return len(head) + (0 if kind == "f1" else 1), rank.get(finding, len(rank))
