"""Golden vectors for Chinese closed answers (SLAKE-zh): yes/no expressions and non-yes/no golds."""

from __future__ import annotations

import pytest

from emma.data.schema import TaskType
from emma.eval.extract import extract_closed, extract_yes_no
from emma.eval.scorers import score_vqa
from emma.text.normalize import has_cjk, normalize_answer, yes_no_value

CLOSED = TaskType.CLOSED_VQA

# ------------------------------------------------------------------------------------------ yes/no


@pytest.mark.parametrize(
    ("text", "value", "status"),
    [
        # the brief's golden cases
        ("是的，有骨折", "yes", "ok"),
        ("不是", "no", "ok"),
        ("没有", "no", "ok"),
        ("有", "yes", "ok"),
        ("无明显异常", "no", "ok"),
        ("异常", None, "unparseable"),
        # bare answers
        ("是", "yes", "ok"),
        ("是。", "yes", "ok"),
        ("否", "no", "ok"),
        ("不", "no", "ok"),
        ("对", "yes", "ok"),
        ("对的", "yes", "ok"),
        ("不对", "no", "ok"),
        ("存在", "yes", "ok"),
        ("不存在", "no", "ok"),
        # negated forms beat their positive substrings; the leading expression wins
        ("不是，是正常的", "no", "ok"),
        ("没有骨折", "no", "ok"),
        ("图中没有骨折", "no", "ok"),
        ("这不是CT", "no", "ok"),
        ("肝脏未见异常", "no", "ok"),
        ("未发现结节", "no", "ok"),
        ("不存在骨折", "no", "ok"),
        ("有骨折", "yes", "ok"),
        ("存在骨折", "yes", "ok"),
        ("是的，没有骨折", "yes", "ok"),  # like "Yes, there is no fracture"
        ("不，没有", "no", "ok"),
        ("否，肺部清晰", "no", "ok"),
        # not yes/no words: normal/abnormal, hedges, "whether", mid-clause copula/verbs
        ("正常", None, "unparseable"),
        ("不正常", None, "unparseable"),  # like "not normal"
        ("两侧不对称", None, "unparseable"),
        ("不对称", None, "unparseable"),
        ("不确定", None, "unparseable"),
        ("无法确定", None, "unparseable"),
        ("无法判断是否有骨折", None, "unparseable"),
        ("有无骨折需要进一步检查", None, "unparseable"),
        ("有没有骨折不清楚", None, "unparseable"),
        ("是不是骨折很难说", None, "unparseable"),
        ("有可能", None, "unparseable"),
        ("这是CT", None, "unparseable"),  # like "This is CT"
        ("图中有骨折", None, "unparseable"),  # like "There is a fracture"
        ("对比剂增强", None, "unparseable"),
        # located answers and mixed English
        ("答案：否", "no", "ok"),
        ("<think>应该是有</think><answer>没有</answer>", "no", "ok"),
        (r"\boxed{是}", "yes", "ok"),
        ("Yes，有骨折", "yes", "ok"),
        ("没有, yes", "no", "ok"),
        ("图中no骨折", "no", "ok"),
        ("nothing 骨折", None, "unparseable"),
        # empty and garbage
        ("", None, "empty"),
        ("<answer>　</answer>", None, "empty"),
        ("，。？！", None, "unparseable"),
        ("骨折", None, "unparseable"),
    ],
)
def test_zh_yes_no(text: str, value: str | None, status: str) -> None:
    ex = extract_yes_no(text)
    assert (ex.value, ex.status) == (value, status)


def test_language_parameter() -> None:
    assert has_cjk("是") and has_cjk("CT 扫描") and not has_cjk("yes, no")
    assert extract_yes_no("是", lang="en").status == "unparseable"  # explicit English: token rules
    assert extract_yes_no("yes", lang="zh").value == "yes"
    assert extract_yes_no("not normal", lang="zh").status == "unparseable"
    with pytest.raises(ValueError):
        extract_yes_no("是", lang="fr")  # type: ignore[arg-type]


def test_english_unchanged_and_auto_detected() -> None:
    for text, value in [("Yes, there is no fracture", "yes"), ("There is no fracture", "no"), ("No.", "no")]:
        assert extract_yes_no(text).value == value
    for text in ["The image is abnormal", "normal", "not normal", "Nothing notable"]:
        assert extract_yes_no(text).status == "unparseable"


# ----------------------------------------------------------------------------------- yes/no golds


@pytest.mark.parametrize(
    "gold",
    ["是", "是的", "对", "对的", "有", "存在", "否", "不", "不是", "不对", "没有", "无", "不存在", "未见"],
)
def test_perfect_prediction_is_correct(gold: str) -> None:
    assert score_vqa(gold, CLOSED, gold).correct


@pytest.mark.parametrize(
    ("gold", "prediction", "correct"),
    [
        # the substring bug: 是 inside 不是, 有 inside 没有
        ("是", "不是", False),
        ("有", "没有", False),
        ("否", "不是", True),
        ("没有", "没有", True),
        ("无", "没有", True),
        # polarity, not wording: 有 answers a 是 gold (and vice versa)
        ("是", "有", True),
        ("有", "是的，有骨折", True),
        ("否", "无明显异常", True),
        ("是", "无明显异常", False),
        ("否", "异常", False),  # unparseable: wrong, never a "no"
        ("是", "正常", False),
        # an English gold with a Chinese answer (auto-detected)
        ("yes", "是的", True),
        ("no", "不是", True),
        ("no", "是", False),
    ],
)
def test_score_zh_yes_no(gold: str, prediction: str, correct: bool) -> None:
    s = score_vqa(gold, CLOSED, prediction)
    assert s.correct is correct
    assert s.gold == yes_no_value(gold)


def test_score_zh_unparseable_status() -> None:
    s = score_vqa("否", CLOSED, "异常")
    assert (s.status, s.extracted, s.correct) == ("unparseable", None, False)
    assert score_vqa("是", CLOSED, "").status == "empty"


# ------------------------------------------------------------------------------ non-yes/no golds


@pytest.mark.parametrize(
    ("text", "gold", "value", "status"),
    [
        ("左", "左", "左", "ok"),
        ("左侧", "左", "左", "ok"),
        ("病灶位于左肺。", "左肺", "左肺", "ok"),
        ("肝脏", "肝脏", "肝脏", "ok"),
        ("右", "左", "右", "ok"),  # parsed, wrong
        # negated occurrences do not count
        ("不是左边而是右边", "左", "不是左边而是右边", "ok"),
        ("不是左边而是右边", "右", "右", "ok"),
        ("不在左侧而在右侧", "左", "不在左侧而在右侧", "ok"),
        ("病灶并非位于左肺", "左肺", "病灶并非位于左肺", "ok"),
        ("不，左侧", "左", "左", "ok"),  # punctuation ends the negation
        ("左侧，不是右侧", "左", "左", "ok"),
        # Latin golds inside Chinese answers: whole words
        ("这是CT", "CT", "ct", "ok"),
        ("这是 CT 图像", "ct", "ct", "ok"),
        ("这不是CT，是MRI", "CT", "这不是ct 是mri", "ok"),
        ("这不是CT，是MRI", "MRI", "mri", "ok"),
        ("CTA", "CT", "cta", "ok"),
        # normal/abnormal golds are ordinary closed answers
        ("异常", "异常", "异常", "ok"),
        ("不正常", "正常", "不正常", "ok"),
        ("正常", "正常", "正常", "ok"),
        ("", "左", None, "empty"),
        ("。。。", "左", None, "unparseable"),
    ],
)
def test_zh_closed_other_gold(text: str, gold: str, value: str | None, status: str) -> None:
    ex = extract_closed(text, gold)
    assert (ex.value, ex.status) == (value, status)
    assert score_vqa(gold, CLOSED, text).correct == (value == normalize_answer(gold))


def test_english_closed_unchanged() -> None:
    assert extract_closed("left, not right", "right").value == "right"  # English known limit stays
    assert extract_closed("leftward", "left").value == "leftward"
    assert extract_closed("The image is abnormal", "No").status == "unparseable"
