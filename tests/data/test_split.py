"""Leakage checks and dataset statistics."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from emma.data.schema import Gold, ImageRef, Meta, Sample, TaskType, Turn
from emma.data.split import (
    LeakageReport,
    _blocks,
    _nearest_brute,
    _nearest_multi_index,
    check_leakage,
    nearest_within,
    split_order,
)
from emma.data.stats import dataset_stats
from emma.data.store import DatasetWriter, open_dataset

FIXTURES = Path(__file__).parent / "fixtures"


def smooth_image(seed: int, shift: int = 0, size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)).astype(np.int16)
    return Image.fromarray(np.clip(pixels + shift, 0, 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def phash_distance(a: bytes, b: bytes) -> int:
    return imagehash.phash(Image.open(io.BytesIO(a))) - imagehash.phash(Image.open(io.BytesIO(b)))


def vqa(
    sample_id: str, split: str, question: str, *, patient: str | None = None, study: str | None = None
) -> Sample:
    return Sample(
        id=sample_id,
        task=TaskType.CLOSED_VQA,
        images=[ImageRef(path=f"{sample_id}.png")],  # placeholder: the writer stores the image
        turns=[Turn(role="user", content=question, images=[0]), Turn(role="assistant", content="yes")],
        gold=Gold(answer="yes"),
        meta=Meta(split=split, patient_key=patient, study_key=study),
    )


# ------------------------------------------------------------------------------------------- hashing


def reference_nearest(queries: list[int], base: list[int], t: int) -> list[int]:
    """Pure-Python oracle: the smallest Hamming distance to any base hash, or -1 when over ``t``."""
    out = []
    for q in queries:
        d = min((q ^ b).bit_count() for b in base)
        out.append(d if d <= t else -1)
    return out


@pytest.mark.parametrize("threshold", [0, 1, 4, 8])
def test_brute_force_and_multi_index_agree_with_oracle(threshold: int) -> None:
    rng = np.random.default_rng(threshold)
    base = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    queries = []
    for i in range(200):
        if i % 2:  # plant a neighbour: flip k random bits of a base hash
            h = int(base[i])
            for bit in rng.choice(64, size=int(rng.integers(0, threshold + 3)), replace=False):
                h ^= 1 << int(bit)
            queries.append(h)
        else:
            queries.append(int(rng.integers(0, 2**63)) * 2)
    q = np.array(queries, dtype=np.uint64)
    expected = reference_nearest(queries, [int(b) for b in base], threshold)
    for fn in (_nearest_brute, _nearest_multi_index):
        index, dist = fn(q, base, threshold)
        got = [int(d) if i >= 0 else -1 for i, d in zip(index, dist)]
        assert got == expected, fn.__name__
        for qi, (i, d) in enumerate(zip(index, dist)):
            if i >= 0:
                assert (int(q[qi]) ^ int(base[i])).bit_count() == d <= threshold
    assert sum(d >= 0 for d in expected) >= 25  # planted neighbours exist (k <= t flips: most of 100)


def test_blocks_partition_64_bits() -> None:
    for t in (0, 3, 4, 10, 32):
        blocks = _blocks(t)
        assert len(blocks) == t + 1
        covered = 0
        for shift, mask in blocks:
            assert covered & (mask << shift) == 0
            covered |= mask << shift
        assert covered == 2**64 - 1


def test_nearest_within_handles_empty_inputs() -> None:
    index, _dist = nearest_within(np.array([1, 2], dtype=np.uint64), np.array([], dtype=np.uint64), 4)
    assert index.tolist() == [-1, -1]


def test_split_order() -> None:
    assert split_order(["test", "extra", "train", "validation"]) == ["train", "validation", "extra", "test"]


# ------------------------------------------------------------------------------------------- leakage


@pytest.fixture
def leaky_dataset(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """train: A, B, C; validation: D (near-dup of A); test: A (exact), E (new), B2 (near-dup of B), C (exact)."""
    imgs = {
        "A": png_bytes(smooth_image(1)),
        "B": png_bytes(smooth_image(2)),
        "C": png_bytes(smooth_image(3)),
        "D": png_bytes(smooth_image(1, shift=10)),
        "E": png_bytes(smooth_image(5)),
        "B2": png_bytes(smooth_image(2, shift=-10)),
    }
    root = tmp_path / "leaky"
    with DatasetWriter(root, name="leaky") as w:
        w.add(vqa("t1", "train", "Is there a fracture?", patient="p1", study="s1"), [imgs["A"]])
        w.add(vqa("t2", "train", "Is the heart enlarged?", patient="p2", study="s2"), [imgs["B"]])
        w.add(vqa("t3", "train", "Is there an effusion?", patient="p3", study="s3"), [imgs["C"]])
        w.add(vqa("v1", "validation", "Any pneumothorax?", patient="p4", study="s4"), [imgs["D"]])
        w.add(vqa("x1", "test", "is there a FRACTURE", patient="p1", study="s9"), [imgs["A"]])  # same pair
        w.add(vqa("x2", "test", "Is the heart enlarged?", patient="p5", study="s5"), [imgs["E"]])
        w.add(vqa("x3", "test", "Is the lung normal?", patient="p6", study="s6"), [imgs["B2"]])
        w.add(vqa("x4", "test", "Is the liver normal?", patient="p7", study="s7"), [imgs["C"]])
    return root, imgs


def test_leakage_counts_match_independent_computation(leaky_dataset: tuple[Path, dict[str, bytes]]) -> None:
    root, imgs = leaky_dataset
    # Independent check of the premise: near-dups are close, unrelated images far.
    assert phash_distance(imgs["A"], imgs["D"]) <= 4 and phash_distance(imgs["B"], imgs["B2"]) <= 4
    for other in ("A", "B", "C", "D"):
        assert phash_distance(imgs["E"], imgs[other]) > 4

    report = check_leakage(open_dataset(root), phash_threshold=4)
    assert list(report.splits) == ["train", "validation", "test"]
    assert report.splits["test"].samples == 4 and report.splits["test"].images == 4
    assert [(p.earlier, p.later) for p in report.pairs] == [
        ("train", "validation"),
        ("train", "test"),
        ("validation", "test"),
    ]

    tt = report.pair("train", "test")
    assert tt.later_images == 4 and tt.exact_image_overlap == 2  # A and C
    assert tt.near_duplicate_images == 1  # B2 ~ B (A is exact, so not counted again)
    (ex,) = tt.near_duplicate_examples
    assert (ex.later_sample, ex.earlier_sample) == ("x3", "t2")
    assert ex.distance == phash_distance(imgs["B2"], imgs["B"])
    assert tt.question_overlap == 2  # "is there a FRACTURE" and "Is the heart enlarged?"
    assert tt.image_question_overlap == 1  # (A, "is there a fracture") only
    assert (tt.patient_overlap, tt.later_patients) == (1, 4)
    assert (tt.study_overlap, tt.later_studies) == (0, 4)
    assert tt.leaked

    tv = report.pair("train", "validation")
    assert tv.exact_image_overlap == 0 and tv.near_duplicate_images == 1
    assert tv.near_duplicate_examples[0].distance == phash_distance(imgs["D"], imgs["A"])

    vt = report.pair("validation", "test")
    # Test image A is a near-duplicate of validation image D.
    assert vt.exact_image_overlap == 0 and vt.near_duplicate_images == 1
    assert report.has_leakage

    strict = check_leakage(root, phash_threshold=0)
    assert strict.pair("train", "test").near_duplicate_images == sum(
        phash_distance(imgs["B2"], imgs[o]) == 0 for o in ("A", "B", "C")
    )
    round_trip = LeakageReport.model_validate_json(report.model_dump_json())
    assert round_trip.pair("train", "test").exact_image_overlap == 2
    assert json.loads(report.model_dump_json())["has_leakage"] is True


def test_clean_split_reports_no_leakage(tmp_path: Path) -> None:
    root = tmp_path / "clean"
    with DatasetWriter(root, name="clean") as w:
        w.add(vqa("a", "train", "Is there a mass?"), [png_bytes(smooth_image(11))])
        w.add(vqa("b", "test", "Is there a fracture?"), [png_bytes(smooth_image(12))])
    report = check_leakage(root)
    pair = report.pair("train", "test")
    assert pair.exact_image_overlap == 0 and pair.near_duplicate_images == 0
    assert pair.patient_overlap is None and pair.study_overlap is None
    assert not pair.leaked and not report.has_leakage
    with pytest.raises(ValueError, match="phash_threshold"):
        check_leakage(root, phash_threshold=40)


def test_single_split_has_no_pairs(tmp_path: Path) -> None:
    root = tmp_path / "one"
    with DatasetWriter(root, name="one") as w:
        w.add(vqa("a", "train", "q"), [png_bytes(smooth_image(1))])
    report = check_leakage(root)
    assert report.pairs == [] and not report.has_leakage


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_leakage_on_imported_vqa_rad_fixture(tmp_path: Path, fmt: str) -> None:
    from emma.data.sources import import_vqa_rad

    src = tmp_path / "vqa-rad"
    shutil.copytree(FIXTURES / "vqa-rad", src)
    (src / "images").mkdir()
    smooth_image(1).save(src / "images/synpic1.jpg", quality=95)
    smooth_image(2).save(src / "images/synpic2.jpg", quality=95)
    smooth_image(2, shift=8).save(src / "images/synpic3.jpg", quality=95)
    import_vqa_rad(src, tmp_path / "out", format=fmt)  # type: ignore[arg-type]
    assert open_dataset(tmp_path / "out").format == fmt
    pair = check_leakage(tmp_path / "out").pair("train", "test")
    assert (pair.exact_image_overlap, pair.later_images) == (1, 2)  # synpic1
    assert pair.near_duplicate_images == 1  # synpic3 ~ synpic2
    ex = pair.near_duplicate_examples[0]
    assert ex.later_image == "vqa-rad:images/synpic3.jpg" and ex.earlier_image == "vqa-rad:images/synpic2.jpg"
    expected = phash_distance(
        (src / "images/synpic3.jpg").read_bytes(), (src / "images/synpic2.jpg").read_bytes()
    )
    assert ex.distance == expected
    assert (pair.study_overlap, pair.later_studies) == (1, 2)


# ------------------------------------------------------------------------------------------- stats


def test_stats_counts(leaky_dataset: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    root, _ = leaky_dataset
    stats = dataset_stats(root)
    assert stats.samples == 8 and stats.images == 6
    assert stats.by_split == {"train": 3, "validation": 1, "test": 4}
    assert stats.counts["task"] == {"closed_vqa": 8}
    assert stats.counts["modality"] == {"unknown": 8}
    assert stats.splits["test"].images == 4

    from emma.data.sources import import_slake

    slake = tmp_path / "slake"
    shutil.copytree(FIXTURES / "slake", slake)
    for i in range(3):
        path = slake / "Slake1.0" / "imgs" / f"xmlab{i}" / "source.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        smooth_image(20 + i).save(path)
    import_slake(slake, tmp_path / "slake-out")
    s = dataset_stats(tmp_path / "slake-out")
    assert s.by_split == {"train": 3, "validation": 1, "test": 1}
    assert s.counts["modality"] == {"ct": 2, "xray": 2, "mri": 1}
    assert s.counts["body_part"] == {"abdomen": 2, "chest": 2, "head": 1}
    assert s.counts["answer_type"] == {"open": 3, "closed": 2}
    assert s.splits["train"].counts["task"] == {"open_vqa": 2, "closed_vqa": 1}
    assert s.images == 3
