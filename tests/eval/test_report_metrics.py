"""Report-generation metrics: BLEU-4 / ROUGE-L known values, clinical F1 by hand, bootstrap statistics,
optional extras that say why they are unavailable."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from emma.eval.report_metrics import (
    OPTIONAL_METRICS,
    REPORT_METRICS,
    MetricUnavailableError,
    OptionalMetric,
    clinical_f1_by_finding,
    metrics_config,
    optional_metric,
    per_sample_report_scores,
    positive_findings,
    report_scores,
    report_statistic,
    score_report_samples,
)
from emma.eval.stats import bootstrap_ci


def test_identical_reports_score_perfectly() -> None:
    reports = [
        "No pneumothorax. Small left pleural effusion.",
        "Moderate cardiomegaly with mild pulmonary edema.",
        "The lungs are clear.",
    ]
    scores = report_scores(reports, reports)
    assert set(scores) == set(REPORT_METRICS)
    assert scores["bleu4"] == pytest.approx(100.0)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["clinical_f1_micro"] == 1.0 and scores["clinical_f1_macro"] == 1.0
    for row in per_sample_report_scores(reports, reports):
        assert row["bleu4"] == pytest.approx(100.0) and row["rouge_l"] == pytest.approx(1.0)
        assert row["clinical_f1"] == 1.0


def test_disjoint_text_scores_zero() -> None:
    scores = report_scores(["alpha beta gamma delta epsilon"], ["one two three four five"])
    assert scores["bleu4"] == 0.0 and scores["rouge_l"] == 0.0


def test_bleu_is_corpus_bleu_and_case_insensitive() -> None:
    import sacrebleu

    preds = ["The heart is enlarged .", "No pleural effusion is seen", "small right pneumothorax"]
    refs = ["the heart is mildly enlarged .", "No pleural effusion", "Large right pneumothorax is present"]
    expected = sacrebleu.corpus_bleu([p.lower() for p in preds], [[r.lower() for r in refs]]).score
    assert report_scores(preds, refs)["bleu4"] == pytest.approx(expected)
    # the corpus value is not the mean of sentence BLEU
    mean_sentence = np.mean([r["bleu4"] for r in per_sample_report_scores(preds, refs)])
    assert not math.isclose(mean_sentence, expected, rel_tol=1e-3)


def test_rouge_l_known_value() -> None:
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" (5 of 6 tokens each)
    [row] = per_sample_report_scores(["the cat sat on the mat"], ["the cat is on the mat"])
    assert row["rouge_l"] == pytest.approx(5 / 6)


def test_clinical_f1_hand_computed() -> None:
    preds = [
        "Small left pleural effusion. No pneumothorax.",  # effusion
        "Cardiomegaly and mild pulmonary edema.",  # cardiomegaly, edema
        "Possible pneumonia.",  # uncertain → not positive
        "The lungs are clear.",  # no finding
    ]
    refs = [
        "Small left pleural effusion and a small pneumothorax.",  # effusion, pneumothorax
        "Cardiomegaly. No edema.",  # cardiomegaly
        "Right lower lobe pneumonia.",  # pneumonia
        "Normal chest.",  # no finding
    ]
    assert positive_findings(preds[2]) == frozenset()
    assert positive_findings(preds[2], uncertain="positive") == {"Pneumonia"}
    # TP: effusion, cardiomegaly, no finding = 3; FP: edema = 1; FN: pneumothorax, pneumonia = 2
    scores = report_scores(preds, refs)
    assert scores["clinical_precision_micro"] == pytest.approx(3 / 4)
    assert scores["clinical_recall_micro"] == pytest.approx(3 / 5)
    assert scores["clinical_f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    # per finding: effusion 1, cardiomegaly 1, no finding 1, edema 0, pneumothorax 0, pneumonia 0;
    # the 8 findings no report asserts are left out of the macro average
    assert scores["clinical_f1_macro"] == pytest.approx(3 / 6)
    by = clinical_f1_by_finding(score_report_samples(preds, refs))
    assert by["Edema"]["fp"] == 1 and by["Edema"]["f1"] == 0.0
    assert by["Pleural Effusion"]["f1"] == 1.0 and by["Pleural Effusion"]["support"] == 1
    assert math.isnan(by["Fracture"]["f1"])
    rows = per_sample_report_scores(preds, refs)
    assert [r["clinical_f1"] for r in rows] == pytest.approx([2 / 3, 2 / 3, 0.0, 1.0])
    assert [(r["clinical_tp"], r["clinical_fp"], r["clinical_fn"]) for r in rows] == [
        (1, 0, 1),
        (1, 1, 0),
        (0, 0, 1),
        (1, 0, 0),
    ]
    # counting uncertain as positive turns the pneumonia miss into a hit
    lenient = report_scores(preds, refs, uncertain="positive")
    assert lenient["clinical_f1_micro"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))


def test_empty_prediction_is_scored_not_crashing() -> None:
    rows = per_sample_report_scores(["", "   "], ["Small effusion.", "The lungs are clear."])
    assert [r["bleu4"] for r in rows] == [0.0, 0.0] and [r["rouge_l"] for r in rows] == [0.0, 0.0]
    assert [r["clinical_fn"] for r in rows] == [1.0, 1.0]  # an empty report asserts nothing
    with pytest.raises(ValueError):
        report_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        report_scores([], [])


def test_report_statistic_resamples_corpus_metrics() -> None:
    preds = ["small left effusion", "no pneumothorax", "cardiomegaly", "clear lungs", "large effusion"]
    refs = [
        "small left pleural effusion",
        "no pneumothorax",
        "mild cardiomegaly",
        "clear lungs",
        "no effusion",
    ]
    samples = score_report_samples(preds, refs)
    full = report_scores(preds, refs)
    idx = np.arange(len(samples))
    for name in REPORT_METRICS:
        stat = report_statistic(samples, name)
        assert stat(idx) == pytest.approx(full[name])
        # a resample with sample 3 twice = the metric of that corpus
        rows = np.array([[0, 1, 2, 3, 3], [4, 4, 4, 4, 4]])
        expected = [report_scores([preds[i] for i in r], [refs[i] for i in r])[name] for r in rows]
        assert stat(rows, axis=1) == pytest.approx(expected)
    lo, hi = bootstrap_ci(idx, stat=report_statistic(samples, "bleu4"), n_resamples=200, seed=0)
    assert lo <= full["bleu4"] <= hi
    with pytest.raises(ValueError):
        report_statistic(samples, "cider")


def test_metrics_config_records_what_was_measured() -> None:
    config = metrics_config()
    assert "tok:13a" in config["bleu4"] and "case:lc" in config["bleu4"]
    assert "rougeL" in config["rouge_l"] and "uncertain counted as negative" in config["clinical_f1"]


def test_optional_metrics_say_why_they_cannot_run() -> None:
    for name in OPTIONAL_METRICS:
        metric = optional_metric(name)
        assert isinstance(metric, OptionalMetric)
        if metric.available:
            continue
        assert metric.message.startswith("not available: ")
        with pytest.raises(MetricUnavailableError, match="not available"):
            metric(["a"], ["a"])
    packages = {
        "radgraph_f1": "radgraph",
        "chexbert_f1": "f1chexbert",
        "bertscore": "bert_score",
        "cider": "pycocoevalcap",
    }
    for name, module in packages.items():
        if importlib.util.find_spec(module) is None:
            assert optional_metric(name).message == f"not available: install {module.replace('_', '-')}"
    assert optional_metric("RadGraph").name == "radgraph_f1"
    assert optional_metric("chexbert-f1").name == "chexbert_f1"
    with pytest.raises(ValueError, match="unknown optional metric"):
        optional_metric("bleu7")
