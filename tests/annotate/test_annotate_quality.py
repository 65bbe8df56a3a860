"""Quality gates: box sanity, teacher/report agreement, duplicate images by perceptual hash."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from emma.annotate.quality import (
    BOX_DEGENERATE,
    BOX_OUT_OF_RANGE,
    BOX_TOO_SMALL,
    BOX_WHOLE_IMAGE,
    DUPLICATE_IMAGE,
    BoxLimits,
    DuplicateGate,
    PerceptualIndex,
    agreement,
    find_duplicates,
    findings_labels,
    grounding_reason,
    sanitize_box,
)
from emma.annotate.steps import Item
from emma.data.schema import Box, CoordSpace, Sample, TaskType, Turn
from emma.data.store import DatasetWriter, open_dataset
from emma.infer.grounding import parse_model_boxes
from emma.io.load import load_images

SIZES = [(200, 100)]


def _box(x1: float, y1: float, x2: float, y2: float, **kw: object) -> Box:
    return Box(x1=x1, y1=y1, x2=x2, y2=y2, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ boxes


def test_box_inside_is_kept_unchanged() -> None:
    check = sanitize_box(_box(10, 20, 60, 70, label="effusion"), SIZES)
    assert check.ok and not check.clipped and check.reason is None
    assert (
        check.box is not None and check.box.as_tuple() == (10, 20, 60, 70) and check.box.label == "effusion"
    )


def test_small_overshoot_is_clipped_large_is_rejected() -> None:
    clipped = sanitize_box(_box(-5, -2, 205, 60), SIZES)  # 2.5% / 2% past the edges: within 5%
    assert clipped.ok and clipped.clipped
    assert clipped.box is not None and clipped.box.as_tuple() == (0, 0, 200, 60)
    far = sanitize_box(_box(10, 10, 260, 60), SIZES)  # 30% past the right edge
    assert far.box is None and far.reason == BOX_OUT_OF_RANGE


def test_degenerate_too_small_and_whole_image() -> None:
    assert sanitize_box(_box(200, 10, 205, 50), SIZES).reason == BOX_DEGENERATE  # nothing left after clipping
    assert sanitize_box(_box(10, 10, 13, 50), SIZES).reason == BOX_TOO_SMALL  # 3 px wide
    assert sanitize_box(_box(1, 0, 200, 99), SIZES).reason == BOX_WHOLE_IMAGE
    # the minimum size is also relative to the side: 1% of 2000 px is 20 px
    assert sanitize_box(_box(10, 10, 25, 50), [(2000, 100)]).reason == BOX_TOO_SMALL
    assert sanitize_box(_box(10, 10, 25, 50), [(2000, 100)], BoxLimits(min_size_fraction=0.0)).ok


def test_other_spaces_are_converted_and_bad_image_index_rejected() -> None:
    check = sanitize_box(_box(100, 200, 500, 800, space=CoordSpace.NORM1000), SIZES)
    assert check.box is not None
    assert check.box.space is CoordSpace.PIXEL and check.box.as_tuple() == pytest.approx((20, 20, 100, 80))
    assert sanitize_box(_box(1, 1, 50, 50, image_index=1), SIZES).reason == BOX_OUT_OF_RANGE


def test_box_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        BoxLimits(max_area_fraction=0.0)
    with pytest.raises(ValueError):
        BoxLimits(overshoot=1.5)


def test_grounding_messages_map_to_reason_codes() -> None:
    far = parse_model_boxes("<box>[[100,100,1900,500]]</box>", None, SIZES)  # 0-1000: far past the edge
    assert not far.boxes and [grounding_reason(m) for m in far.errors] == [BOX_OUT_OF_RANGE]
    flat = parse_model_boxes("<box>[[100,100,100,500]]</box>", None, SIZES)
    assert not flat.boxes and [grounding_reason(m) for m in flat.errors] == [BOX_DEGENERATE]
    other = parse_model_boxes("<box image=3>[[100,100,300,500]]</box>", None, SIZES)
    assert [grounding_reason(m) for m in other.errors] == [BOX_OUT_OF_RANGE]
    assert grounding_reason("box tag 0 group 0: not a number") == "invalid_boxes"


# -------------------------------------------------------------------------------------- agreement


def test_findings_phrases_are_read_as_positive_statements() -> None:
    labels = findings_labels(["small left pneumothorax", "rib fracture"], "No pleural effusion.")
    assert labels["Pneumothorax"] == 1 and labels["Fracture"] == 1 and labels["Pleural Effusion"] == 0
    assert findings_labels([], "") == {}


def test_agreement_scores_positive_findings() -> None:
    report = {"Pneumothorax": 1, "Pleural Effusion": 1, "Fracture": 0}
    full = agreement({"Pneumothorax": 1, "Pleural Effusion": 1}, report)
    assert full.score == 1.0 and full.matched == ("Pneumothorax", "Pleural Effusion")
    half = agreement({"Pneumothorax": 1}, report)
    assert half.score == pytest.approx(2 / 3) and half.missed == ("Pleural Effusion",)
    wrong = agreement({"Fracture": 1}, report)
    assert wrong.score == 0.0 and wrong.unsupported == ("Fracture",)
    assert "missed: Pneumothorax, Pleural Effusion" in wrong.detail(0.5)
    assert "unsupported: Fracture" in wrong.detail(0.5)


def test_many_report_negatives_do_not_hide_a_miss() -> None:
    report = {"Pneumothorax": 0, "Pleural Effusion": 0, "Consolidation": 0, "Edema": 0, "Cardiomegaly": 1}
    assert agreement({"Pneumonia": 1}, report).score == 0.0


def test_agreement_hierarchy_uncertain_normal_and_missing_report() -> None:
    # the teacher's "opacity" agrees with the report's consolidation through CheXpert's hierarchy
    opacity = agreement({"Lung Opacity": 1}, {"Consolidation": 1})
    assert opacity.score == pytest.approx(2 / 3) and opacity.matched == ("Lung Opacity",)
    # a finding the report is unsure about is not scored on either side
    assert agreement({"Pneumonia": 1}, {"Pneumonia": -1, "No Finding": 1}).score == 1.0
    # both read the study as normal
    assert agreement({"No Finding": 1}, {"No Finding": 1, "Pneumothorax": 0}).score == 1.0
    assert agreement({"Pneumothorax": 1}, None).score is None
    assert agreement({"Pneumothorax": 1}, {}).score is None


# ------------------------------------------------------------------------------------- duplicates


def test_perceptual_index_finds_near_hashes_only() -> None:
    index = PerceptualIndex(threshold=4)
    base = 0x0123456789ABCDEF
    index.add(base, "a")
    index.add(base ^ 0b1, "b")  # 1 bit from a
    assert index.nearest(base ^ 0b111) == ("b", 2)  # a is 3 bits away, b 2
    assert index.nearest(base ^ 0b110) == ("a", 2)  # a is 2 bits away, b 3
    assert index.nearest(base ^ 0x3FF) is None  # 10 bits away
    exact = PerceptualIndex(threshold=0)
    exact.add(base, "a")
    assert exact.nearest(base) == ("a", 0) and exact.nearest(base ^ 1) is None
    with pytest.raises(ValueError):
        PerceptualIndex(threshold=40)


def test_perceptual_index_prefers_the_nearest_then_the_earliest() -> None:
    index = PerceptualIndex(threshold=4)
    base = 0xFFFF0000FFFF0000
    index.add(base ^ 0b11, "first")  # 2 bits from base
    index.add(base ^ 0b1100, "second")  # 2 bits from base
    index.add(base ^ 0b1, "third")  # 1 bit from base
    assert index.nearest(base) == ("third", 1)
    tie = PerceptualIndex(threshold=4)
    tie.add(base ^ 0b11, "first")
    tie.add(base ^ 0b1100, "second")
    assert tie.nearest(base) == ("first", 2)


def _real_images() -> tuple[Image.Image, Image.Image]:
    ct = load_images(get_testdata_file("CT_small.dcm"))[0].to_pil()
    mr = load_images(get_testdata_file("MR_small.dcm"))[0].to_pil()
    return ct, mr


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _sample(sid: str, split: str = "train") -> Sample:
    from emma.data.schema import ImageRef, Meta

    return Sample(
        id=sid,
        task=TaskType.OPEN_VQA,
        images=[ImageRef(path=f"{sid}.png")],
        turns=[Turn(role="user", content="What is shown?", images=[0]), Turn(role="assistant", content="x")],
        meta=Meta(split=split),
    )


def test_find_duplicates_on_real_images(tmp_path: Path) -> None:
    ct, mr = _real_images()
    root = tmp_path / "src"
    with DatasetWriter(root, name="dups") as writer:
        writer.add(_sample("ct-1"), [ct])
        writer.add(_sample("mr-1"), [mr])
        writer.add(_sample("ct-jpeg"), [_jpeg(ct)])  # the same picture, re-encoded: other bytes, near pHash
        writer.add(_sample("ct-copy", "test"), [ct])  # identical content in a later split
        writer.add(_sample("ct-broken"), [ct.rotate(90)])
    ds = open_dataset(root)
    samples = [s for split in ("train", "test") for s in ds.iter_samples(split)]
    scan = find_duplicates(samples, ds.open_image, threshold=4)
    assert scan.samples == 5 and scan.images == 5 and scan.unreadable == 0
    assert set(scan.duplicates) == {"ct-jpeg", "ct-copy"}
    assert scan.duplicates["ct-jpeg"].first == "ct-1" and scan.duplicates["ct-jpeg"].distance <= 4
    assert scan.duplicates["ct-copy"].first == "ct-1" and scan.duplicates["ct-copy"].distance == 0
    # a rotated CT is a different picture
    assert "ct-broken" not in scan.duplicates


def test_find_duplicates_counts_unreadable_images() -> None:
    ct, _ = _real_images()
    from emma.data.schema import ImageRef

    good, bad = _sample("a"), _sample("b")

    def open_image(ref: ImageRef) -> Image.Image:
        if ref.path == "b.png":
            raise OSError("unreadable")
        return ct.copy()

    scan = find_duplicates([good, bad], open_image)
    assert scan.unreadable == 1 and scan.duplicates == {}


def test_duplicate_gate_rejects_the_later_sample_and_passes_others() -> None:
    from emma.annotate.quality import Duplicate

    gate = DuplicateGate({"b": Duplicate(first="a", image=0, distance=2)}, threshold=4)
    kept = gate(Item(_sample("a")), [], ask=None)  # type: ignore[arg-type]
    assert kept[0].rejected is None and kept[0].sample.id == "a"
    out = gate(Item(_sample("b")), [], ask=None)  # type: ignore[arg-type]
    assert out[0].rejected == DUPLICATE_IMAGE
    assert out[0].detail == "image 0 duplicates sample a (pHash distance 2)"
    assert DuplicateGate({}, threshold=0).prompt_hash != gate.prompt_hash
