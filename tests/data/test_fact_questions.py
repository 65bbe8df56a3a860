"""Fact questions: balanced yes/no questions on each train image's organ and modality labels."""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from emma.cli import app
from emma.data.schema import Gold, Meta, Sample, TaskType, Turn
from emma.data.sources.fact_questions import (
    BODY_PART_WORDINGS,
    MODALITY_WORDINGS,
    build_fact_questions,
    fact_questions,
)
from emma.data.store import DatasetWriter, open_dataset
from emma.errors import InputError


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _vqa(sid: str, split: str, body_part: str | None, modality: str | None = None) -> Sample:
    return Sample(
        id=sid,
        task=TaskType.CLOSED_VQA,
        turns=[Turn(role="user", content="Is there a mass?"), Turn(role="assistant", content="no")],
        gold=Gold(answer="no"),
        meta=Meta(split=split, body_part=body_part, modality=modality),
    )


@pytest.fixture()
def vqa(tmp_path: Path) -> Path:
    """Six train images (head, chest, abdomen twice each; two with a modality), one with a body part
    outside the disjoint regions, one test-only image."""
    root = tmp_path / "vqa"
    parts = ["head", "chest", "abdomen", "head", "chest", "abdomen"]
    with DatasetWriter(root, name="toy-vqa", license="CC0-1.0") as writer:
        for i, part in enumerate(parts):
            modality = {0: "ct", 1: "xray"}.get(i)
            writer.add(_vqa(f"s{i}", "train", part, modality), [_png(i)])
        writer.add(_vqa("odd", "train", "whole body"), [_png(10)])
        writer.add(_vqa("t0", "test", "head"), [_png(20)])
    return root


def _questions(out: Path) -> list[Sample]:
    return list(open_dataset(out).iter_samples("train"))


def test_questions_are_balanced_and_name_the_right_values(vqa: Path, tmp_path: Path) -> None:
    report = build_fact_questions(vqa, tmp_path / "out")
    samples = _questions(tmp_path / "out")
    assert report.images == 7 and report.dicom_images == 0
    assert report.questions == len(samples) == 6 * 2 + 2 * 2  # six body parts, two modalities
    answers = Counter((s.meta.question_type, s.gold.answer) for s in samples)
    assert answers == {
        ("BODY_PART", "yes"): 6,
        ("BODY_PART", "no"): 6,
        ("MODALITY", "yes"): 2,
        ("MODALITY", "no"): 2,
    }
    for s in samples:
        assert s.task is TaskType.CLOSED_VQA and s.meta.split == "train"
        question, answer = s.turns[0].content, s.turns[1].content
        assert answer == s.gold.answer and s.turns[0].images == [0]
        own = s.meta.body_part if s.meta.question_type == "BODY_PART" else s.meta.modality
        assert own is not None
        wordings = BODY_PART_WORDINGS if s.meta.question_type == "BODY_PART" else MODALITY_WORDINGS
        named = [w for w in wordings if question.startswith(w.split("{value}")[0])]
        assert named, question
        assert (own in question) == (answer == "yes")
    # the test-only image and the body part outside the disjoint regions get no question
    assert all(s.meta.body_part != "whole body" for s in samples)
    test_image = open_dataset(vqa)
    test_shas = {ref.sha256 for t in test_image.iter_samples("test") for ref in t.images}
    assert not test_shas & {s.images[0].sha256 for s in samples}


def test_same_seed_same_questions_and_test_split_refused(vqa: Path, tmp_path: Path) -> None:
    build_fact_questions(vqa, tmp_path / "a", seed=3)
    build_fact_questions(vqa, tmp_path / "b", seed=3)

    def text(out: Path) -> list[tuple[str, str]]:
        return sorted((s.id, s.turns[0].content) for s in _questions(out))

    assert text(tmp_path / "a") == text(tmp_path / "b")
    with pytest.raises(InputError, match="never from test"):
        build_fact_questions(vqa, tmp_path / "c", split="test")


def test_fact_questions_need_a_second_value() -> None:
    rng = random.Random(0)
    assert fact_questions({"body_part": "head"}, {"body_part": ["head"]}, rng) == []
    pairs = fact_questions({"body_part": "head"}, {"body_part": ["chest", "head"]}, rng)
    assert [(k, a) for k, _, a in pairs] == [("body_part", "yes"), ("body_part", "no")]
    assert "head" in pairs[0][1] and "chest" in pairs[1][1]


def test_dicom_files_and_cli(vqa: Path, tmp_path: Path) -> None:
    ct = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    mr = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    report = build_fact_questions(vqa, tmp_path / "out", dicom_files=[ct, mr])
    assert report.dicom_images == 2
    dicom = [s for s in _questions(tmp_path / "out") if s.meta.source == "dicom-header"]
    assert Counter(s.gold.answer for s in dicom if s.meta.question_type == "MODALITY") == {"yes": 2, "no": 2}
    result = CliRunner().invoke(app, ["data", "facts", str(vqa), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "16 questions about 7 images" in result.output
