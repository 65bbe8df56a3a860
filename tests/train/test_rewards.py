"""Reward functions on golden cases, malformed completions, and box IoU under each family's resize."""

from __future__ import annotations

import pytest

from emma.data.schema import Box
from emma.infer.grounding import boxes_prompt_text
from emma.model.families import model_image_size
from emma.train.rewards import (
    BoxIoUReward,
    ChoiceReward,
    ClosedReward,
    FormatReward,
    LengthAbstainReward,
    OpenF1Reward,
    RewardStats,
    build_rewards,
    completion_text,
)

MALFORMED = [None, "", "   ", "{not json", '{"bbox_2d": [1, 2', "\x00\x01garbage"]


def _msgs(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_closed_golden_and_conversational() -> None:
    r = ClosedReward()
    out = r(
        [None] * 4,
        [
            "Yes.",
            _msgs("The answer is no"),
            [{"role": "assistant", "content": [{"type": "text", "text": "yes"}]}],
            "no",
        ],
        task=["closed_vqa"] * 4,
        answer=["yes", "no", "no", "no"],
    )
    assert out == [1.0, 1.0, 0.0, 1.0]
    assert r.stats.parse_failures["closed_correct"] == 0


def test_open_f1_and_choice() -> None:
    f1 = OpenF1Reward()(
        [None, None],
        ["left lower lobe", "right kidney"],
        task=["open_vqa", "open_vqa"],
        answer=["left lower lobe", "left kidney"],
    )
    assert f1[0] == pytest.approx(1.0)
    assert f1[1] == pytest.approx(0.5)
    choice = ChoiceReward()(
        [None] * 3,
        ["B", "(A) pneumothorax", "Pneumonia"],
        task=["multiple_choice"] * 3,
        options=[["effusion", "pneumonia"]] * 3,
        answer_index=[1, 1, None],
        answer=[None, None, "B"],
    )
    assert choice == [1.0, 0.0, 1.0]


def test_not_applicable_rows_are_none() -> None:
    out = ClosedReward()([None, None], ["yes", "yes"], task=["open_vqa", "closed_vqa"], answer=["x", "yes"])
    assert out == [None, 1.0]
    assert FormatReward()([None], ["{}"], response_format=["text"]) == [None]


@pytest.mark.parametrize(
    "reward,kwargs",
    [
        (ClosedReward, {"task": "closed_vqa", "answer": "yes"}),
        (OpenF1Reward, {"task": "open_vqa", "answer": "left lobe"}),
        (ChoiceReward, {"task": "multiple_choice", "options": ["a cat", "a dog"], "answer_index": 0}),
        (
            BoxIoUReward,
            {
                "task": "grounding",
                "boxes": [[10, 10, 50, 50]],
                "image_sizes": [[100, 100]],
                "family": "internvl",
            },
        ),
        (FormatReward, {"response_format": "structured"}),
    ],
)
def test_malformed_completions_score_zero_and_are_counted(reward: type, kwargs: dict) -> None:
    stats = RewardStats()
    r = reward(stats)
    n = len(MALFORMED)
    out = r([None] * n, MALFORMED, **{k: [v] * n for k, v in kwargs.items()})
    assert out == [0.0] * n
    # Open answers are free text: garbage with word tokens is a readable (wrong) answer, F1 0.
    expected = 3 if reward is OpenF1Reward else n
    assert stats.parse_failures[r.__name__] == expected
    assert stats.scored[r.__name__] == n
    assert stats.errors[r.__name__] == 0


def test_weird_completion_shapes_never_raise() -> None:
    weird = [
        123,
        [{"role": "assistant", "content": None}],
        [{"bad": 1}],
        {"role": "assistant", "content": "yes"},
    ]
    out = ClosedReward()([None] * 4, weird, task=["closed_vqa"] * 4, answer=["yes"] * 4)
    assert out[:3] == [0.0, 0.0, 0.0] and out[3] == 1.0
    assert completion_text(None) is None


def test_boxes_out_of_range_score_zero() -> None:
    stats = RewardStats()
    r = BoxIoUReward(stats)
    far = "<box>[[5000, 5000, 9000, 9000]]</box>"
    inverted = "<box>[[500, 500, 100, 100]]</box>"
    out = r(
        [None, None],
        [far, inverted],
        task=["grounding"] * 2,
        boxes=[[[10, 10, 50, 50]]] * 2,
        image_sizes=[[[100, 100]]] * 2,
        family=["internvl"] * 2,
    )
    assert out == [0.0, 0.0]
    assert stats.parse_failures["box_iou"] == 2


@pytest.mark.parametrize("size", [(1800, 1200), (333, 517)])
def test_box_iou_resize_aware_qwen25_vs_norm1000(size: tuple[int, int]) -> None:
    w, h = size
    gold = Box(x1=w * 0.5, y1=h * 0.5, x2=w * 0.75, y2=h * 0.75)
    qwen_text = boxes_prompt_text([gold], "qwen2_5_vl", [size])
    norm_text = boxes_prompt_text([gold], "internvl", [size])
    assert qwen_text != norm_text
    r = BoxIoUReward()

    def score(text: str, family: str) -> float:
        return r(
            [None],
            [text],
            task=["grounding"],
            boxes=[[list(gold.as_tuple())]],
            image_sizes=[[list(size)]],
            family=[family],
        )[0]

    assert score(qwen_text, "qwen2_5_vl") == pytest.approx(1.0, abs=0.03)
    assert score(norm_text, "internvl") == pytest.approx(1.0, abs=0.03)
    assert score(norm_text, "qwen3_vl") == pytest.approx(1.0, abs=0.03)  # another 0-1000 family
    # The wrong convention lands elsewhere.
    assert score(norm_text, "qwen2_5_vl") < 0.3
    assert score(qwen_text, "internvl") < 0.3
    # Explicit model sizes (a processor with other resize settings) are honoured.
    mw, mh = model_image_size("qwen2_5_vl", w, h)
    half = (mw // 2, mh // 2)
    text_half = boxes_prompt_text([gold], "qwen2_5_vl", [size], [half])
    out = r(
        [None],
        [text_half],
        task=["grounding"],
        boxes=[[list(gold.as_tuple())]],
        image_sizes=[[list(size)]],
        model_sizes=[[list(half)]],
        family=["qwen2_5_vl"],
    )
    assert out[0] == pytest.approx(1.0, abs=0.03)


def test_format_and_length_shaping() -> None:
    valid = '{"findings": [], "impression": "normal chest", "triage": "non-urgent", "abstain": false}'
    stats = RewardStats()
    fmt = FormatReward(stats)([None, None], [valid, "cannot determine"], response_format=["structured"] * 2)
    # Whether the example is complete enough for DiagnosticOutput decides the first; abstention is valid.
    assert fmt[1] == 1.0
    length = LengthAbstainReward(max_chars=10)
    out = length([None] * 4, ["yes", "cannot determine", "x" * 20, ""])
    assert out == [0.0, pytest.approx(0.2), pytest.approx(-1.0), -1.0]
    assert length([None], ["x" * 15])[0] == pytest.approx(-0.5)


def test_build_rewards_weights() -> None:
    funcs, weights, stats = build_rewards({"closed": 1.0, "length": 0.1, "format": 0.0})
    assert [f.__name__ for f in funcs] == ["closed_correct", "length_abstain"]
    assert weights == [1.0, 0.1]
    assert all(f.stats is stats for f in funcs)
    with pytest.raises(ValueError, match="unknown reward"):
        build_rewards({"nope": 1.0})
