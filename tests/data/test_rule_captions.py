"""Rule captions: QA → statement rules, the caption builder (train split only), DICOM header captions, CLI."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from emma.cli import app
from emma.data.schema import Gold, Meta, Sample, TaskType, Turn
from emma.data.sources.rule_captions import (
    CAPTION_PROMPTS,
    build_rule_captions,
    collect_image_facts,
    dicom_caption_samples,
    modality_stated,
    qa_statement,
)
from emma.data.store import DatasetWriter, open_dataset
from emma.errors import InputError

# Words that only the test split says: no caption may ever contain them.
TEST_ONLY = ("leprechaun", "zebrafish", "unicorn")
B_STATEMENTS = (
    "There is no pneumothorax.",
    "There are nodules.",
    "The heart is enlarged.",
    "This image is not normal.",
    "Which side is the effusion on: left.",
)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _vqa(
    sid: str,
    question: str,
    answer: str,
    split: str,
    *,
    task: TaskType = TaskType.CLOSED_VQA,
    modality: str | None = None,
    body_part: str | None = None,
) -> Sample:
    return Sample(
        id=sid,
        task=task,
        turns=[Turn(role="user", content=question), Turn(role="assistant", content=answer)],
        gold=Gold(answer=answer),
        meta=Meta(split=split, modality=modality, body_part=body_part),
    )


def _make_vqa(root: Path) -> Path:
    """Image A (CT head, 2 distinct train QAs + a duplicate, 1 test QA), image B (X-ray chest, 5 train QAs),
    image C (test split only)."""
    a, b, c = _png(1), _png(2), _png(3)
    with DatasetWriter(root, name="toy-vqa", license="CC0-1.0") as writer:
        writer.add(_vqa("a1", "Is there a fracture?", "no", "train", modality="ct", body_part="head"), [a])
        writer.add(_vqa("a2", "What organ is shown?", "brain", "train", task=TaskType.OPEN_VQA), [a])
        writer.add(_vqa("a3", "is there a  fracture", "No", "train"), [a])  # same statement again
        writer.add(_vqa("a-test", "What is the unicorn sign?", "leprechaun", "test"), [a])
        writer.add(
            _vqa("b1", "Is there pneumothorax?", "no", "train", modality="xray", body_part="chest"), [b]
        )
        writer.add(_vqa("b2", "Are there nodules?", "yes", "train"), [b])
        writer.add(_vqa("b3", "Is the heart enlarged?", "yes", "train"), [b])
        writer.add(_vqa("b4", "Is this image normal?", "no", "train"), [b])
        writer.add(_vqa("b5", "Which side is the effusion on?", "left", "train", task=TaskType.OPEN_VQA), [b])
        writer.add(_vqa("c-test", "Is there a zebrafish?", "yes", "test"), [c])
    return root


@pytest.fixture()
def vqa(tmp_path: Path) -> Path:
    return _make_vqa(tmp_path / "vqa")


def _captions(out: Path) -> list[Sample]:
    return list(open_dataset(out).iter_samples("train"))


def _by_image(samples: list[Sample]) -> dict[str, list[Sample]]:
    grouped: dict[str, list[Sample]] = {}
    for s in samples:
        assert s.images[0].sha256 is not None
        grouped.setdefault(s.images[0].sha256, []).append(s)
    return grouped


def _caption(sample: Sample) -> str:
    assert [t.role for t in sample.turns] == ["user", "assistant"]
    return sample.turns[1].content


# ------------------------------------------------------------------------------------------ qa_statement


@pytest.mark.parametrize(
    ("question", "answer", "statement"),
    [
        ("Is there a fracture?", "no", "There is no fracture."),
        ("Is there a fracture?", "yes", "There is a fracture."),
        ("Is there an effusion?", "No", "There is no effusion."),
        ("Is there any abnormality?", "no", "There is no abnormality."),
        ("Is there evidence of pneumothorax?", "no", "There is no evidence of pneumothorax."),
        ("Are there nodules?", "No", "There are no nodules."),
        ("Are there any nodules?", "yes", "There are nodules."),
        ("Is this an MRI?", "yes", "This is an MRI."),
        ("Is this image normal?", "no", "This image is not normal."),
        ("Is it in the left lung?", "no", "It is not in the left lung."),
        ("Is the heart enlarged?", "no", "The heart is not enlarged."),
        ("Are the kidneys enlarged?", "yes", "The kidneys are enlarged."),
        ("Is the lesion in the left lobe?", "no", "The lesion is not in the left lobe."),
        ("Is the mass located in the liver", "True", "The mass is located in the liver."),
        ("Does the patient have a fracture?", "yes", "Does the patient have a fracture? Yes."),
        ("Can you see the aorta?", "n", "Can you see the aorta? No."),
        ("What organ is shown?", "brain", "What organ is shown: brain."),
        ("  what   organ is shown?? ", " Brain. ", "What organ is shown: Brain."),
        ("Is there a fracture?", "left femur", "Is there a fracture: left femur."),
    ],
)
def test_qa_statement_rules(question: str, answer: str, statement: str) -> None:
    assert qa_statement(question, answer) == statement


@pytest.mark.parametrize(
    ("question", "answer", "modality"),
    [
        ("Is this a CT scan?", "yes", "CT"),
        ("Is this CT scan enhanced by IV contrast?", "Yes", "CT"),
        ("Is this an MRI?", "yes", "MRI"),
        ("Is this a T2 weighted image?", "Yes", "MRI"),
        ("Is this a chest x-ray?", "yes", "X-ray"),
        ("Is this a CT scan?", "no", None),  # a "no" never names the modality
        ("Is this a CT or an MRI?", "yes", None),  # ambiguous
        ("Is there a mass on the CT?", "yes", None),  # not about what the image is
        ("What imaging modality was used?", "MR - FLAIR", "MRI"),
        ("Was this image taken with an MRI or CT scanner?", "CT", "CT"),
        ("What type of image is this?", "PA xray", "X-ray"),
        ("What organ is shown?", "brain", None),
        ("What modality is this?", "CT or MRI", None),
    ],
)
def test_modality_stated(question: str, answer: str, modality: str | None) -> None:
    assert modality_stated(question, answer) == modality


def test_image_facts_take_the_modality_the_train_pairs_state(tmp_path: Path) -> None:
    a, b, c = _png(1), _png(2), _png(3)
    with DatasetWriter(tmp_path / "v", name="toy", license="CC0-1.0") as writer:
        writer.add(_vqa("a1", "Is this an MRI?", "yes", "train", body_part="head"), [a])
        writer.add(_vqa("a2", "Is this a CT?", "no", "train"), [a])
        writer.add(_vqa("b1", "Is this an MRI?", "yes", "train"), [b])  # the label wins over a statement
        writer.add(_vqa("b2", "Is there a mass?", "no", "train", modality="ct"), [b])
        writer.add(_vqa("c1", "Is this a CT scan?", "yes", "train"), [c])  # two modalities stated: none
        writer.add(_vqa("c2", "Which modality?", "MRI", "train", task=TaskType.OPEN_VQA), [c])
    facts = collect_image_facts(open_dataset(tmp_path / "v"), "train")
    by_source = {f.source_ids[0]: f.modality for f in facts.values()}
    assert by_source == {"a1": "MRI", "b1": "ct", "c1": None}


# ------------------------------------------------------------------------------------ build_rule_captions


def test_one_caption_per_image_with_header_and_deduplicated_statements(vqa: Path, tmp_path: Path) -> None:
    report = build_rule_captions(vqa, tmp_path / "out")
    out = open_dataset(tmp_path / "out")
    assert out.splits == ["train"]
    assert out.manifest.license == "CC0-1.0"
    samples = _captions(tmp_path / "out")
    assert report.images == 2 and report.dicom_images == 0 and report.statements == 2 + 5
    assert len(samples) == 2
    grouped = _by_image(samples)
    assert len(grouped) == 2
    by_header = {_caption(s).split(".")[0]: s for s in samples}
    assert set(by_header) == {"CT image of the head", "X-ray image of the chest"}

    a = by_header["CT image of the head"]
    assert a.task == TaskType.CAPTION
    assert a.turns[0].content == CAPTION_PROMPTS[0] and a.turns[0].images == [0]
    text = _caption(a)
    assert text.startswith("CT image of the head. ")
    assert text.count("There is no fracture.") == 1  # a1 and a3 say the same: one statement
    assert "What organ is shown: brain." in text
    assert len(text) == len("CT image of the head. There is no fracture. What organ is shown: brain.")
    assert a.meta.extra["from_samples"] == ["a1", "a2"]
    assert (a.meta.modality, a.meta.body_part, a.meta.split) == ("ct", "head", "train")
    # the caption's image is the very image of the source samples
    assert out.image_bytes(a.images[0]) == _png(1)

    b = _caption(by_header["X-ray image of the chest"])
    assert all(s in b for s in B_STATEMENTS)


def test_captions_never_carry_the_test_split(vqa: Path, tmp_path: Path) -> None:
    build_rule_captions(vqa, tmp_path / "out", prompts_per_image=3, max_statements=8)
    samples = _captions(tmp_path / "out")
    source = open_dataset(vqa)
    test_images = {s.images[0].sha256 for s in source.iter_samples("test")}
    train_images = {s.images[0].sha256 for s in source.iter_samples("train")}
    assert {s.images[0].sha256 for s in samples} == train_images  # image C (test only) is not captioned
    assert test_images - train_images  # ... and it exists
    for sample in samples:
        blob = sample.model_dump_json().lower()
        for word in TEST_ONLY:
            assert word not in blob


@pytest.mark.parametrize("split", ["test", "Test", " TEST "])
def test_builder_refuses_the_test_split(vqa: Path, tmp_path: Path, split: str) -> None:
    with pytest.raises(InputError, match="never from test"):
        build_rule_captions(vqa, tmp_path / "out", split=split)
    assert not (tmp_path / "out").exists()


def test_builder_argument_errors(vqa: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no split 'validation'"):
        build_rule_captions(vqa, tmp_path / "o1", split="validation")
    with pytest.raises(InputError, match="max_statements"):
        build_rule_captions(vqa, tmp_path / "o2", max_statements=0)
    with pytest.raises(InputError, match="prompts_per_image"):
        build_rule_captions(vqa, tmp_path / "o3", prompts_per_image=len(CAPTION_PROMPTS) + 1)


def test_max_statements_caps_each_caption(vqa: Path, tmp_path: Path) -> None:
    build_rule_captions(vqa, tmp_path / "out", max_statements=2, prompts_per_image=3)
    samples = _captions(tmp_path / "out")
    assert len(samples) == 2 * 3
    for group in _by_image(samples).values():
        assert sorted(s.turns[0].content for s in group) == sorted(CAPTION_PROMPTS)
        assert len({s.id for s in group}) == 3
    chest = [_caption(s) for s in samples if _caption(s).startswith("X-ray image of the chest. ")]
    assert len(chest) == 3
    for text in chest:
        assert sum(s in text for s in B_STATEMENTS) == 2
        assert len(text) == len("X-ray image of the chest.") + sum(
            len(s) + 1 for s in B_STATEMENTS if s in text
        )


def test_statement_order_is_seeded(vqa: Path, tmp_path: Path) -> None:
    def chest_captions(seed: int, name: str) -> list[str]:
        build_rule_captions(vqa, tmp_path / name, seed=seed, prompts_per_image=3)
        return [
            _caption(s)
            for s in sorted(_captions(tmp_path / name), key=lambda s: s.id)
            if _caption(s).startswith("X-ray")
        ]

    first = chest_captions(0, "s0")
    assert chest_captions(0, "s0-again") == first
    others = [chest_captions(seed, f"s{seed}") for seed in range(1, 6)]
    assert any(o != first for o in others)  # 5 statements: 120 orders per prompt
    for captions in [first, *others]:  # the order changes, never the content
        assert len(captions) == 3
        assert all(all(s in c for s in B_STATEMENTS) and len(c) == len(first[0]) for c in captions)


def test_only_single_image_vqa_samples_are_captioned(tmp_path: Path) -> None:
    img, other = _png(5), _png(6)
    with DatasetWriter(tmp_path / "mixed", name="mixed") as writer:
        two = _vqa("two", "Is there a fracture?", "yes", "train")
        writer.add(two, [img, other])
        report = Sample(
            id="rep",
            task=TaskType.REPORT,
            meta=Meta(split="train"),
            turns=[
                Turn(role="user", content="Write a report."),
                Turn(role="assistant", content="Findings: none."),
            ],
        )
        writer.add(report, [img])
        writer.add(_vqa("ok", "Is there a mass?", "no", "train"), [img])
    result = build_rule_captions(tmp_path / "mixed", tmp_path / "out")
    samples = _captions(tmp_path / "out")
    assert result.images == 1 and len(samples) == 1
    assert _caption(samples[0]) == "There is no mass."


# ----------------------------------------------------------------------------------------------- DICOM


def _testdata(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    assert found is not None, f"pydicom test file {name} missing"
    return Path(str(found))


def test_dicom_header_captions_and_skips(tmp_path: Path) -> None:
    ct, mr = _testdata("CT_small.dcm"), _testdata("MR_small.dcm")
    head = tmp_path / "ct_head.dcm"
    ds = pydicom.dcmread(str(ct))
    ds.BodyPartExamined = "HEAD"
    ds.save_as(str(head))
    multi = tmp_path / "multi.dcm"
    ds = pydicom.dcmread(str(ct))
    ds.NumberOfFrames = 2
    ds.save_as(str(multi))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all" * 10)
    files = [ct, _testdata("rtplan.dcm"), junk, tmp_path / "missing.dcm", mr, multi, head]

    results = list(dicom_caption_samples(files))
    captions = [(_caption(s), s.meta.modality, s.meta.body_part) for s, _ in results]
    assert captions == [
        ("CT image.", "CT", None),
        ("MRI image.", "MRI", None),
        ("CT image of the head.", "CT", "head"),
    ]
    for sample, png in results:
        assert sample.task == TaskType.CAPTION and sample.id.startswith("dicom-")
        assert sample.turns[0].content == CAPTION_PROMPTS[0]
        assert sample.meta.split == "train" and sample.meta.source == "dicom-header"
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and image.size[0] > 1 and image.size[1] > 1
    # the id is the PNG's hash: the header-edited copy of CT_small shows the same image, so the same id
    assert results[0][0].id == results[2][0].id != results[1][0].id


def test_builder_adds_dicom_captions_once(vqa: Path, tmp_path: Path) -> None:
    ct, mr = _testdata("CT_small.dcm"), _testdata("MR_small.dcm")
    copy = tmp_path / "ct_copy.dcm"
    shutil.copyfile(ct, copy)  # the same image twice: captioned once
    report = build_rule_captions(vqa, tmp_path / "out", dicom_files=[ct, mr, copy])
    assert report.images == 2 and report.dicom_images == 2
    samples = _captions(tmp_path / "out")
    assert len(samples) == 4
    dicom = sorted(_caption(s) for s in samples if s.id.startswith("dicom-"))
    assert dicom == ["CT image.", "MRI image."]


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_data_captions(vqa: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["data", "captions", str(vqa), "--out", str(out), "--prompts", "2"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "2 images captioned from 7 statements" in result.output
    assert open_dataset(out).count("train") == 4

    refused = runner.invoke(
        app,
        ["data", "captions", str(vqa), "--out", str(tmp_path / "o2"), "--split", "test"],
        catch_exceptions=False,
    )
    assert refused.exit_code == 2
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "never from test" in lines[0] and "Traceback" not in refused.output
