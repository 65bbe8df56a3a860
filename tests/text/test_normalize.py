"""emma.text.normalize: answer normalisation, tokens and yes/no golds (the one definition of each)."""

from __future__ import annotations

import pytest

from emma.text.normalize import contains_phrase, has_cjk, is_yes_no, normalize_answer, tokens, yes_no_value


def test_normalize_and_tokens() -> None:
    assert normalize_answer("The  Left-Lung!") == "left lung"
    assert normalize_answer("An X-ray, a CT.") == "x ray ct"
    assert normalize_answer("ＹＥＳ") == "yes"  # NFKC full-width
    assert normalize_answer("theory") == "theory"  # articles only as whole words
    assert tokens("Is it the right one?") == ["is", "it", "right", "one"]
    assert tokens("肺部有结节, the X-ray") == ["肺", "部", "有", "结", "节", "x", "ray"]
    assert tokens("") == []
    assert tokens("!!! ...") == []


def test_has_cjk_and_contains_phrase() -> None:
    assert has_cjk("是") and has_cjk("CT 扫描") and has_cjk("カ") and not has_cjk("yes, no")
    assert contains_phrase(["left", "lower", "lobe"], ["lower", "lobe"])
    assert not contains_phrase(["left", "lower", "lobes"], ["lower", "lobe"])  # whole tokens only
    assert not contains_phrase(["a"], [])


def test_yes_no_gold_values() -> None:
    for gold in ["是", "是的", "对", "对的", "有", "存在", "Yes", "是。"]:
        assert yes_no_value(gold) == "yes", gold
    for gold in ["否", "不", "不是", "不对", "没有", "无", "不存在", "未见", "未发现", "no"]:
        assert yes_no_value(gold) == "no", gold
    for gold in ["正常", "异常", "不正常", "左", "CT", "是否", "有无", "无法"]:
        assert yes_no_value(gold) is None and not is_yes_no(gold), gold


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # what the former importer-only copy (data/sources/_common.is_yes_no) also accepted
        ("yes", True),
        (" No. ", True),
        ("YES", True),
        # where the two copies disagreed: the one rule now follows the scorer's reading of a gold
        ("Yes!", True),
        ("no?", True),
        ("ＮＯ", True),
        ("是", True),
        ("没有", True),
        # never yes/no
        ("yes, small", False),
        ("yes no", False),
        ("normal", False),
        ("", False),
    ],
)
def test_is_yes_no(answer: str, expected: bool) -> None:
    assert is_yes_no(answer) is expected
