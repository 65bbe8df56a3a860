"""emma.infer.grounding: every box syntax, family conventions, bad boxes reported, overlays."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from emma.data.schema import Box, CoordSpace
from emma.infer.grounding import MAX_BOXES, boxes_prompt_text, parse_model_boxes, render_overlay
from emma.model.families import FAMILIES

SIZE = (1001, 701)  # not a multiple of 28; Qwen2.5-VL sees it as 1008 x 700


def coords(box: Box) -> tuple[float, float, float, float]:
    return box.as_tuple()


# ------------------------------------------------------------------------------------ native syntax


def test_qwen25_json_in_resized_pixels() -> None:
    text = 'Found it.\n```json\n[\n  {"bbox_2d": [504, 350, 1008, 700], "label": "effusion"}\n]\n```'
    result = parse_model_boxes(text, "qwen2_5_vl", [SIZE])
    assert result.errors == []
    [box] = result.boxes
    assert coords(box) == pytest.approx((500.5, 350.5, 1001, 701))
    assert box.label == "effusion" and box.image_index == 0 and box.space is CoordSpace.PIXEL


def test_qwen25_json_uses_given_model_sizes() -> None:
    text = '{"bbox_2d": [10, 20, 30, 40]}'
    result = parse_model_boxes(text, "qwen2_5_vl", [(1000, 800)], model_sizes=[(500, 400)])
    assert coords(result.boxes[0]) == pytest.approx((20, 40, 60, 80))


def test_qwen3_json_is_norm1000() -> None:
    text = '[{"bbox_2d": [500, 500, 1000, 1000], "label": "mass"}, {"bbox_2d": [0, 0, 100, 100], "image_index": 1}]'
    result = parse_model_boxes(text, "qwen3_vl", [SIZE, (200, 100)])
    assert result.errors == []
    assert coords(result.boxes[0]) == pytest.approx((500.5, 350.5, 1001, 701))
    assert coords(result.boxes[1]) == pytest.approx((0, 0, 20, 10))
    assert result.boxes[1].image_index == 1


def test_qwen2_tokens() -> None:
    text = (
        "The <|object_ref_start|>left rib fracture<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
        " and <|box_start|>(0, 0), (1000, 1000)<|box_end|>"
    )
    result = parse_model_boxes(text, "qwen2_vl", [(500, 1000)])
    assert result.errors == []
    assert [coords(b) for b in result.boxes] == [
        pytest.approx((50, 200, 150, 400)),
        pytest.approx((0, 0, 500, 1000)),
    ]
    assert [b.label for b in result.boxes] == ["left rib fracture", None]


def test_internvl_ref_box_with_several_boxes() -> None:
    text = "<ref>nodules</ref><box>[[100, 100, 200, 200], [500, 500, 600, 600]]</box>"
    result = parse_model_boxes(text, "internvl", [(2000, 1000)])
    assert [coords(b) for b in result.boxes] == [
        pytest.approx((200, 100, 400, 200)),
        pytest.approx((1000, 500, 1200, 600)),
    ]
    assert all(b.label == "nodules" for b in result.boxes)


@pytest.mark.parametrize("family", ["idefics3", "llava", "llava_onevision", "gemma3", None])
def test_emma_box_form_for_families_without_a_trained_convention(family: str | None) -> None:
    text = 'Opacity <box>[[250,500,500,1000]]</box>; on the lateral view <box image="1">[[0,0,500,500]]</box>'
    result = parse_model_boxes(text, family, [(400, 200), (100, 100)])
    assert result.errors == []
    assert coords(result.boxes[0]) == pytest.approx((100, 100, 200, 200))
    assert (result.boxes[1].image_index, coords(result.boxes[1])) == (1, pytest.approx((0, 0, 50, 50)))


def test_boxes_come_back_in_text_order_across_syntaxes() -> None:
    text = '<box>[[0,0,10,10]]</box> {"bbox_2d": [20, 20, 30, 30]} <|box_start|>(40,40),(50,50)<|box_end|>'
    result = parse_model_boxes(text, "internvl", [(1000, 1000)])
    assert [b.x1 for b in result.boxes] == [0, 20, 40]


def test_text_without_boxes() -> None:
    result = parse_model_boxes("No acute findings.", "qwen2_5_vl", [SIZE])
    assert result.boxes == [] and result.errors == []


# ----------------------------------------------------------------------------------- bad boxes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<box>100,200,300,400</box>", "no [x1,y1,x2,y2] list"),
        ("<box>[[100,200,300]]</box>", "expected 4 numbers, got 3"),
        ("<box>[[300,200,100,400]]</box>", "corners out of order"),
        ("<box>[[nan,200,300,400]]</box>", "not a finite number"),
        ("<box>[[1e999,200,300,400]]</box>", "not a finite number"),
        ("<box>[[0,0,1000000000,400]]</box>", "far outside"),
        ("<box>[[-200,0,100,100]]</box>", "far outside"),
        ("<box image=3>[[0,0,10,10]]</box>", "refers to image 3 but there are 1"),
        ("<box page=1>[[0,0,10,10]]</box>", "unrecognised attributes"),
        ("<box>[[0,0,10,10]]", "unclosed <box>"),
        ("<box>[[5,5,5,10]]</box>", "degenerate"),
        ("<|box_start|>(1,2),(3)<|box_end|>", "expected (x1,y1),(x2,y2)"),
        ("<|box_start|>(1,2),(3,4)", "unclosed <|box_start|>"),
        ('{"bbox_2d": [1, 2, 3]}', "expected 4 numbers, got 3"),
        ('{"bbox_2d": ["a", 2, 3, 4]}', "not a number"),
        ('{"bbox_2d": 5}', "not a [x1, y1, x2, y2] list"),
        ('{"bbox_2d": [1, 2, 3, 4], "image_index": -1}', "image index"),
    ],
)
def test_malformed_boxes_are_reported_not_raised(text: str, message: str) -> None:
    result = parse_model_boxes(f"The finding: {text} end.", "internvl", [(1000, 1000)])
    assert result.boxes == []
    assert any(message in e for e in result.errors), result.errors


def test_good_boxes_survive_next_to_bad_ones() -> None:
    text = "<box>[[0,0,100,100],[5,5,1,1],[100,100,200,200]]</box>"
    result = parse_model_boxes(text, "internvl", [(1000, 1000)])
    assert [coords(b) for b in result.boxes] == [(0, 0, 100, 100), (100, 100, 200, 200)]
    assert len(result.errors) == 1 and "group 1" in result.errors[0]


def test_slightly_out_of_range_boxes_are_clipped_and_reported() -> None:
    result = parse_model_boxes(
        "<box>[[-10,100,1020,1030]]</box> <box>[[0,0,5,5]]</box>", "internvl", [(1000, 500)]
    )
    assert coords(result.boxes[0]) == (0, 50, 1000, 500)
    assert result.clipped == [0]
    assert len(result.errors) == 1 and "clipped" in result.errors[0]


def test_qwen25_box_past_the_resized_edge_is_clipped() -> None:
    result = parse_model_boxes('{"bbox_2d": [0, 0, 1020, 700]}', "qwen2_5_vl", [SIZE])
    assert coords(result.boxes[0]) == pytest.approx((0, 0, 1001, 701))
    assert result.clipped == [0]


def test_no_image_means_every_box_is_rejected() -> None:
    result = parse_model_boxes("<box>[[0,0,10,10]]</box>", "internvl", [])
    assert result.boxes == [] and "there are 0" in result.errors[0]


def test_bounds_and_odd_input() -> None:
    many = "<box>[[0,0,10,10]]</box>" * (MAX_BOXES + 5)
    result = parse_model_boxes(many, "internvl", [(100, 100)])
    assert len(result.boxes) == MAX_BOXES and "5 boxes over the limit" in result.errors[0]
    assert parse_model_boxes(None, "internvl", [(100, 100)]).errors == ["expected text, got NoneType"]  # type: ignore[arg-type]
    unknown = parse_model_boxes("<box>[[0,0,500,500]]</box>", "not-a-family", [(100, 100)])
    assert coords(unknown.boxes[0]) == (0, 0, 50, 50) and "unknown model family" in unknown.errors[0]


def test_label_text_never_appears_in_messages() -> None:
    result = parse_model_boxes("<ref>John Smith</ref><box>[[0,0,9000,10]]</box>", "internvl", [(100, 100)])
    assert result.errors and all("John" not in e for e in result.errors)


# ------------------------------------------------------------------------------- writing boxes


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prompt_text_round_trips_for_every_family(family: str) -> None:
    sizes = [SIZE, (640, 480)]
    boxes = [
        Box(x1=100.1, y1=70.1, x2=600.6, y2=420.6, label="consolidation"),
        Box(x1=64, y1=48, x2=320, y2=240, image_index=1),
    ]
    text = boxes_prompt_text(boxes, family, sizes)
    result = parse_model_boxes(text, family, sizes)
    assert result.errors == []
    assert [b.image_index for b in result.boxes] == [0, 1]
    assert result.boxes[0].label == "consolidation"
    for got, want in zip(result.boxes, boxes, strict=True):
        tolerance = max(sizes[want.image_index]) / 1000 + 1  # integer rounding in the family's units
        assert coords(got) == pytest.approx(coords(want), abs=tolerance)


def test_prompt_text_golden_forms() -> None:
    box = [Box(x1=100.1, y1=70.1, x2=200.2, y2=140.2, label="mass")]
    assert boxes_prompt_text(box, "internvl", [SIZE]) == "<ref>mass</ref><box>[[100,100,200,200]]</box>"
    assert boxes_prompt_text(box, "gemma3", [SIZE]) == "<ref>mass</ref><box>[[100,100,200,200]]</box>"
    assert boxes_prompt_text(box, "qwen2_vl", [SIZE]) == (
        "<|object_ref_start|>mass<|object_ref_end|><|box_start|>(100,100),(200,200)<|box_end|>"
    )
    assert boxes_prompt_text(box, "qwen2_5_vl", [SIZE]) == (
        '```json\n[\n  {"bbox_2d": [101, 70, 202, 140], "label": "mass"}\n]\n```'
    )
    assert (
        boxes_prompt_text(box, "qwen2_5_vl", [SIZE], syntax="emma")
        == "<ref>mass</ref><box>[[101,70,202,140]]</box>"
    )
    norm = [Box(x1=100, y1=100, x2=200, y2=200, space=CoordSpace.NORM1000, image_index=1)]
    assert boxes_prompt_text(norm, "qwen2_vl", [SIZE, SIZE]) == "<box image=1>[[100,100,200,200]]</box>"
    with pytest.raises(ValueError):
        boxes_prompt_text(norm, "internvl", [SIZE])


# ----------------------------------------------------------------------------------------- overlay


def changed_pixels(before: Image.Image, after: Image.Image) -> set[tuple[int, int]]:
    diff = np.any(np.asarray(before.convert("RGB")) != np.asarray(after), axis=2)
    ys, xs = np.nonzero(diff)
    return set(zip(xs.tolist(), ys.tolist(), strict=True))


def test_overlay_draws_exactly_the_box_outline() -> None:
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    out = render_overlay(image, [Box(x1=50, y1=20, x2=150, y2=80)], labels=False)
    assert out.size == image.size and out is not image
    assert np.all(np.asarray(image) == 255)  # the input is untouched
    outline = {(x, y) for x in range(50, 150) for y in (20, 79)} | {
        (x, y) for x in (50, 149) for y in range(20, 80)
    }
    assert changed_pixels(image, out) == outline


def test_overlay_label_is_drawn_next_to_the_box_only() -> None:
    image = Image.new("L", (400, 300), 0)  # grayscale input comes back RGB
    box = Box(x1=100, y1=150, x2=300, y2=250, label="pneumothorax")
    plain = render_overlay(image, [box], labels=False)
    labelled = render_overlay(image, [box])
    assert labelled.mode == "RGB"
    extra = changed_pixels(plain, labelled)
    assert extra  # the label was drawn
    assert all(100 <= x < 300 and 100 <= y < 150 for x, y in extra)  # just above the box's left part


def test_overlay_scales_lines_and_filters_images() -> None:
    image = Image.new("RGB", (1200, 900), (0, 0, 0))
    box = Box(x1=100, y1=100, x2=500, y2=500)
    drawn = changed_pixels(image, render_overlay(image, [box], labels=False))
    assert {(100, 300), (103, 300)} <= drawn and (104, 300) not in drawn  # 4 px line at 1200 px
    other = Box(x1=100, y1=100, x2=500, y2=500, image_index=1)
    assert changed_pixels(image, render_overlay(image, [other], image_index=0)) == set()
    norm = Box(x1=100, y1=100, x2=500, y2=500, space=CoordSpace.NORM1000)
    assert changed_pixels(image, render_overlay(image, [norm], labels=False)) == changed_pixels(
        image, render_overlay(image, [Box(x1=120, y1=90, x2=600, y2=450)], labels=False)
    )


def test_json_labels_with_quotes_and_escapes() -> None:
    text = '{"bbox_2d": [0, 0, 10, 10], "label": "patient\'s \\"left\\" lung"} {\'bbox_2d\': [0, 0, 5, 5], \'label\': \'rib\'}'
    result = parse_model_boxes(text, "qwen3_vl", [(1000, 1000)])
    assert [b.label for b in result.boxes] == ['patient\'s "left" lung', "rib"]
