"""Golden vectors for the scorers (emma.eval.scorers) and the labelled MedEvalKit reproduction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emma.data.schema import Box, CoordSpace, Gold, TaskType
from emma.eval import compat
from emma.eval.scorers import (
    PRF,
    SampleScore,
    aggregate_vqa,
    canonical_boxes,
    classification_metrics,
    count_vqa,
    grounding_metrics,
    iou,
    match_boxes,
    precision_recall_f1,
    roc_auc,
    score_choice,
    score_grounding,
    score_vqa,
    summarize_vqa,
    token_scores,
    vqa_values,
)

CLOSED, OPEN, MC = TaskType.CLOSED_VQA, TaskType.OPEN_VQA, TaskType.MULTIPLE_CHOICE
VQA_RAD_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "vqa-rad"


def vqa_rad_like() -> list[tuple[str, TaskType]]:
    """A synthetic set with the VQA-RAD test distribution: 133 no / 118 yes / 21 other closed, 179 open."""
    other = ["left", "right", "ct", "mri", "axial", "x-ray", "male"]
    golds = [("no", CLOSED)] * 133 + [("yes", CLOSED)] * 118
    golds += [(other[i % len(other)], CLOSED) for i in range(21)]
    golds += [(f"finding number {i}", OPEN) for i in range(179)]
    return golds


# ------------------------------------------------------------------------------------ VQA per sample


def test_closed_yes_no_failure_cases() -> None:
    # "the image is abnormal" is NOT a "no"
    s = score_vqa(Gold(answer="no"), CLOSED, "The image is abnormal")
    assert (s.correct, s.status) == (False, "unparseable")
    # "yes, there is no fracture" reads as yes
    assert score_vqa("yes", CLOSED, "Yes, there is no fracture").correct
    assert not score_vqa("no", CLOSED, "Yes, there is no fracture").correct
    assert score_vqa("No", CLOSED, "No.").correct
    assert score_vqa("no", CLOSED, "There is no fracture").correct
    assert not score_vqa("no", CLOSED, "not normal").correct


def test_closed_other_gold() -> None:
    s = score_vqa("Left", CLOSED, "The mass is on the left side.")
    assert (s.correct, s.extracted, s.gold) == (True, "left", "left")
    assert not score_vqa("left", CLOSED, "leftward").correct
    assert not score_vqa("left", CLOSED, "right").correct


def test_open_metrics_golden() -> None:
    s = score_vqa("left lung", OPEN, "The left lung is affected")
    assert s.kind == "open" and s.status == "ok"
    assert s.exact_match is False and s.correct is False
    # pred tokens [left, lung, is, affected] (article dropped), gold [left, lung]
    assert s.token_recall == pytest.approx(1.0)
    assert s.token_f1 == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    s = score_vqa("Left Lung", OPEN, "Answer: the left lung.")
    assert s.exact_match and s.correct and s.token_f1 == 1.0
    s = score_vqa("pleural effusion", OPEN, "effusion")
    assert s.token_recall == pytest.approx(0.5)
    assert s.token_f1 == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    # recall counts gold tokens with multiplicity
    assert token_scores("lung", "lung lung") == pytest.approx((1.0, 0.5, 2 / 3))
    s = score_vqa("left lung", OPEN, "")
    assert (s.status, s.token_f1, s.token_recall, s.exact_match) == ("empty", 0.0, 0.0, False)


def test_score_choice() -> None:
    gold = Gold(answer="Effusion", options=["Pneumonia", "Effusion", "Normal"], answer_index=1)
    assert score_vqa(gold, MC, "B").correct
    assert score_choice(gold, "effusion").correct
    s = score_choice(gold, "I cannot determine")
    assert (s.correct, s.status, s.extracted) == (False, "unparseable", None)
    with pytest.raises(ValueError):
        score_choice(Gold(answer="x"), "A")
    with pytest.raises(ValueError):
        score_vqa("x", TaskType.REPORT, "text")


# ---------------------------------------------------------------------------------------- aggregates


def test_all_no_on_vqa_rad_distribution() -> None:
    scores = [score_vqa(g, t, "no") for g, t in vqa_rad_like()]
    m, c = aggregate_vqa(scores), count_vqa(scores)
    assert c["n_closed"] == 272 and c["n_open"] == 179 and c["n"] == 451
    assert m["closed_accuracy"] == pytest.approx(133 / 272)
    assert c["closed_correct"] == 133
    assert m["closed_unparseable"] == 0.0
    assert m["open_exact_match"] == 0.0
    assert m["overall_accuracy"] == pytest.approx(133 / 451)
    assert "judge_accuracy" not in m


@pytest.mark.skipif(not (VQA_RAD_DIR / "VQA_RAD_Dataset_Public.json").is_file(), reason="no VQA-RAD data")
def test_all_no_on_real_vqa_rad_test() -> None:
    from emma.data.sources.vqa_rad import row_to_sample

    rows = json.loads((VQA_RAD_DIR / "VQA_RAD_Dataset_Public.json").read_text())
    samples = [s for s in map(row_to_sample, rows) if s is not None and s.meta.split == "test"]
    scores = [score_vqa(s.gold, s.task, "No.") for s in samples]
    m, c = aggregate_vqa(scores), count_vqa(scores)
    assert (c["n"], c["n_closed"], c["n_open"]) == (451, 272, 179)
    assert m["closed_accuracy"] == pytest.approx(133 / 272)
    # a perfect prediction set scores 1.0 on the real data too
    perfect = [score_vqa(s.gold, s.task, s.gold.answer) for s in samples]
    assert all(v == 1.0 for k, v in aggregate_vqa(perfect).items() if not k.endswith("unparseable"))


def test_perfect_predictions_score_one_everywhere() -> None:
    golds = vqa_rad_like()
    scores = [score_vqa(g, t, g) for g, t in golds]
    mc = Gold(answer="b", options=["a", "b", "c"], answer_index=1)
    scores += [score_vqa(mc, MC, "B")] * 10
    m = aggregate_vqa(scores)
    for name in ["closed_accuracy", "open_exact_match", "open_token_recall", "open_token_f1",
                 "choice_accuracy", "overall_accuracy"]:  # fmt: skip
        assert m[name] == 1.0, name
    assert m["closed_unparseable"] == 0.0 and m["choice_unparseable"] == 0.0
    summary = summarize_vqa(scores, n_resamples=200)
    assert summary.ci95["closed_accuracy"] == (1.0, 1.0)
    assert set(summary.ci95) == set(summary.metrics)


def test_unparseable_and_empty_are_counted_and_wrong() -> None:
    preds = ["yes", "", "The image is abnormal", "!!!", None, "no"]
    scores = [score_vqa("yes", CLOSED, p) for p in preds]
    m, c = aggregate_vqa(scores), count_vqa(scores)
    assert m["closed_accuracy"] == pytest.approx(1 / 6)  # denominator: all closed questions
    assert m["closed_unparseable"] == pytest.approx(4 / 6)
    assert (c["closed_unparseable"], c["closed_empty"]) == (4, 2)
    assert "open_exact_match" not in m and "choice_accuracy" not in m  # no empty-denominator metrics
    assert aggregate_vqa([]) == {}


def test_judge_adds_metrics_and_never_touches_rule_based_ones() -> None:
    closed = [score_vqa("yes", CLOSED, "yes"), score_vqa("no", CLOSED, "yes"), score_vqa("no", CLOSED, "no")]
    opened = [score_vqa("left lung", OPEN, "left lung"), score_vqa("mass", OPEN, "a tumour"),
              score_vqa("ct", OPEN, "computed tomography"), score_vqa("brain", OPEN, "liver")]  # fmt: skip
    base = aggregate_vqa(closed + opened)
    assert "judge_accuracy" not in base
    verdicts = [True, True, True, None]  # one open question left unjudged
    judged = closed[:1] + [closed[1].with_judge(True)] + closed[2:]  # a verdict on a closed one is ignored
    judged += [s.with_judge(v) for s, v in zip(opened, verdicts)]
    m, c = aggregate_vqa(judged), count_vqa(judged)
    for name, value in base.items():
        assert m[name] == value, name  # rule-based numbers unchanged
    assert m["closed_accuracy"] == pytest.approx(2 / 3)
    assert m["judge_accuracy"] == pytest.approx(3 / 4)  # unjudged counts as not accepted
    # closed hits counted exactly once: 2 closed (rules) + 3 open (judge) over 7
    assert m["judge_overall_accuracy"] == pytest.approx(5 / 7)
    assert (c["open_judged"], c["open_unjudged"], c["judge_correct"]) == (3, 1, 3)
    values = vqa_values(judged)
    assert {k: float(v.mean()) for k, v in values.items()} == m


def test_a_judge_failure_makes_judge_metrics_null_not_zero() -> None:
    opened = [score_vqa("left lung", OPEN, "left lung"), score_vqa("mass", OPEN, "a tumour")]
    closed = [score_vqa("yes", CLOSED, "yes")]
    failed = closed + [opened[0].with_judge(True), opened[1].with_judge(None, error=True)]
    m, c = aggregate_vqa(failed), count_vqa(failed)
    assert m["judge_accuracy"] is None and m["judge_overall_accuracy"] is None
    assert m["closed_accuracy"] == 1.0  # rule-based metrics still there
    assert (c["open_judged"], c["open_unjudged"], c["open_judge_errors"]) == (1, 1, 1)
    assert "judge_accuracy" not in vqa_values(failed)  # no per-sample values to bootstrap
    assert summarize_vqa(failed, n_resamples=100).metrics["judge_accuracy"] is None
    # the same answer merely left without a verdict (empty, not sent) is a rejection, not a failure
    unjudged = closed + [opened[0].with_judge(True), opened[1].with_judge(None)]
    assert aggregate_vqa(unjudged)["judge_accuracy"] == 0.5


# ----------------------------------------------------------------------------------------- grounding


def test_iou_golden() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0  # touching corners
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # degenerate, no division by zero


def test_each_predicted_box_matched_at_most_once() -> None:
    gold = [(0, 0, 10, 10), (1, 1, 11, 11)]
    pred = [(0, 0, 10, 10)]  # one prediction overlapping both gold boxes
    ious, matches = match_boxes(pred, gold)
    assert matches == [(0, 0)]
    assert ious.tolist() == [1.0, 0.0]
    s = score_grounding(pred, gold)
    assert (s.hits, s.recall, s.precision) == (1, 0.5, 1.0)
    # greedy by IoU: the best pair first, then the rest
    pred2 = [(1, 1, 11, 11), (0, 0, 10, 10)]
    ious, matches = match_boxes(pred2, gold)
    assert sorted(matches) == [(0, 1), (1, 0)] and ious.tolist() == [1.0, 1.0]
    # duplicates of the same prediction do not count twice
    s = score_grounding([(0, 0, 10, 10)] * 3, [(0, 0, 10, 10)])
    assert (s.recall, s.precision) == (1.0, pytest.approx(1 / 3))


def test_grounding_one_convention_no_oracle() -> None:
    width, height = 500, 400
    gold = [Box(x1=100, y1=100, x2=200, y2=200)]  # canonical pixels
    # the same box as a 0-1000 model writes it, read correctly
    pred_norm = Box(x1=200, y1=250, x2=400, y2=500, space=CoordSpace.NORM1000)
    good = score_grounding(canonical_boxes([pred_norm], width, height), gold)
    assert good.mean_iou == pytest.approx(1.0) and good.recall == 1.0
    # the same numbers taken in the wrong convention (as pixels) score low: no best-of-readings
    wrong = score_grounding([(200, 250, 400, 500)], gold)
    assert wrong.mean_iou < 0.1 and wrong.recall == 0.0
    # a box in another space is refused instead of silently reinterpreted
    with pytest.raises(ValueError, match="canonical"):
        score_grounding([pred_norm], gold)


def test_grounding_metrics_aggregate() -> None:
    gold = [(0, 0, 10, 10)]
    scores = [
        score_grounding([(0, 0, 10, 10)], gold),  # perfect
        score_grounding([(5, 0, 15, 10)], gold),  # IoU 1/3: a miss at 0.5
        score_grounding(None, gold),  # nothing parsed
        score_grounding([], gold),  # parsed, no box
    ]
    m = grounding_metrics(scores)
    assert m["mean_iou"] == pytest.approx((1 + 1 / 3) / 4)
    assert m["recall_at_iou50"] == pytest.approx(1 / 4)
    assert m["precision_at_iou50"] == pytest.approx(1 / 4)
    assert m["grounding_unparseable"] == pytest.approx(1 / 4)
    perfect = grounding_metrics([score_grounding(gold, gold)] * 5)
    assert perfect == {"mean_iou": 1.0, "recall_at_iou50": 1.0, "precision_at_iou50": 1.0,
                       "grounding_unparseable": 0.0}  # fmt: skip
    assert score_grounding([(0, 0, 10, 5)], gold).hits == 1  # IoU exactly 0.5 counts


# ------------------------------------------------------------------------------------ classification


def test_precision_recall_f1_named_fields() -> None:
    prf = precision_recall_f1(tp=2, fp=1, fn=3)
    assert isinstance(prf, PRF) and not isinstance(prf, tuple)
    assert prf.precision == pytest.approx(2 / 3)
    assert prf.recall == pytest.approx(2 / 5)
    assert prf.f1 == pytest.approx(2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5))
    assert prf.support == 5
    assert precision_recall_f1(0, 0, 0) == PRF(0.0, 0.0, 0.0, 0)


def test_classification_macro_f1() -> None:
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", None, "c"]
    r = classification_metrics(y_true, y_pred)
    assert r.labels == ("a", "b", "c")
    assert r.per_class["a"] == PRF(1.0, 2 / 3, 0.8, 3)
    assert r.per_class["b"] == PRF(0.5, 0.5, 0.5, 2)
    assert r.per_class["c"] == PRF(1.0, 1.0, 1.0, 1)
    assert r.macro.f1 == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert r.accuracy == pytest.approx(4 / 6)
    assert r.n_unparseable == 1
    perfect = classification_metrics(y_true, y_true)
    assert perfect.metrics() == {"accuracy": 1.0, "macro_precision": 1.0, "macro_recall": 1.0, "macro_f1": 1.0,
                                 "unparseable": 0.0, "macro_auc": 1.0}  # fmt: skip


def test_roc_auc_rank_based() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)  # ties: average ranks
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert roc_auc([1, 0], [0.0, 1.0]) == 0.0
    # against the pairwise definition on random data with ties
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 10, 300).astype(float)
    pos, neg = s[y == 1], s[y == 0]
    pairwise = (np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])) / (
        pos.size * neg.size
    )
    assert roc_auc(y, s) == pytest.approx(pairwise)
    with pytest.raises(ValueError):
        roc_auc([1, 1], [0.2, 0.3])


def test_classification_auc_from_scores() -> None:
    y_true = ["a", "b", "a", "b"]
    scores = {"a": [0.9, 0.2, 0.6, 0.7], "b": [0.1, 0.8, 0.4, 0.3]}
    r = classification_metrics(y_true, ["a", "b", "a", "a"], scores=scores)
    assert r.macro_auc == pytest.approx(
        (roc_auc([1, 0, 1, 0], scores["a"]) + roc_auc([0, 1, 0, 1], scores["b"])) / 2
    )


# ---------------------------------------------------------------------------- --compat medevalkit


def test_compat_medevalkit_reproduces_published_bugs() -> None:
    mek = compat.score_vqa_medevalkit
    # substring yes/no: "abnormal" contains "no"
    assert mek("no", CLOSED, "The image is abnormal").correct
    assert mek("no", CLOSED, "not normal").correct
    # both "yes" and "no" present: wrong whatever the gold
    assert not mek("yes", CLOSED, "Yes, there is no fracture").correct
    assert not mek("no", CLOSED, "Yes, there is no fracture").correct
    # fuzzy fallback maps "I cannot determine" to some option
    choices = ["A. Pneumonia", "B. Effusion", "C. Normal"]
    forced = compat.most_similar_index([c.lower() for c in choices], "i cannot determine")
    assert compat.judge_choice(choices, "abc"[forced], "I cannot determine")
    gold = Gold(answer="Normal", options=["Pneumonia", "Effusion", "Normal"], answer_index=forced)
    s = mek(gold, MC, "I cannot determine")
    assert s.correct and s.scorer == compat.COMPAT_LABEL
    # EMMA's own scorer: unparseable and wrong
    assert score_vqa(gold, MC, "I cannot determine").status == "unparseable"
    # P/R/F1 order bug: "precision" holds F1, "recall" holds precision, "f1" holds recall
    reported = compat.open_scores("left lung", "left lung is affected")
    true_p, true_r = 2 / 4, 2 / 2
    assert reported["precision"] == pytest.approx(2 * true_p * true_r / (true_p + true_r))
    assert reported["recall"] == pytest.approx(true_p)
    assert reported["f1"] == pytest.approx(true_r)
    # closed/open decided by the gold: a non-yes/no closed answer is scored as open
    assert mek("left", CLOSED, "left").kind == "open"


def test_compat_changes_the_vqa_rad_all_no_number() -> None:
    golds = vqa_rad_like()
    preds = ["The image is abnormal"] * len(golds)
    ours = aggregate_vqa([score_vqa(g, t, p) for (g, t), p in zip(golds, preds)])
    theirs_scores = [compat.score_vqa_medevalkit(g, t, p) for (g, t), p in zip(golds, preds)]
    theirs = aggregate_vqa(theirs_scores)
    assert ours["closed_accuracy"] == 0.0
    assert ours["closed_unparseable"] == pytest.approx(251 / 272)  # the 21 other answers parse (wrong)
    assert count_vqa(theirs_scores)["n_closed"] == 251
    assert theirs["closed_accuracy"] == pytest.approx(133 / 251)
    assert all(s.scorer == "compat:medevalkit" for s in theirs_scores)
    assert all(isinstance(s, SampleScore) for s in theirs_scores)
