"""Dataset importers on small fixtures in each dataset's official layout (+ real VQA-RAD when present)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emma.data.schema import CoordSpace, TaskType
from emma.data.sources import (
    IMPORTERS,
    get_importer,
    import_generic,
    import_omnimedvqa,
    import_pathvqa,
    import_pmc_vqa,
    import_slake,
    import_vqa_rad,
)
from emma.data.sources._common import normalize_modality, normalize_question, probe_image
from emma.data.store import open_dataset
from emma.errors import CorruptFileError, DataFormatError, ImageTooLargeError
from emma.io.limits import Limits

FIXTURES = Path(__file__).parent / "fixtures"
REAL_VQA_RAD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "vqa-rad"

# Images each fixture needs: relative path → (seed, (width, height), brightness shift).
# A shift keeps the picture but changes its bytes: a perceptual near-duplicate of the same seed.
IMAGES: dict[str, dict[str, tuple[int, tuple[int, int], int]]] = {
    "vqa-rad": {
        "images/synpic1.jpg": (1, (64, 48), 0),
        "images/synpic2.jpg": (2, (64, 48), 0),
        "images/synpic3.jpg": (2, (64, 48), 8),  # near-duplicate of synpic2
        "images/synpic9.jpg": (9, (64, 48), 0),  # referenced by no question
    },
    "slake": {
        "Slake1.0/imgs/xmlab0/source.jpg": (10, (64, 48), 0),
        "Slake1.0/imgs/xmlab1/source.jpg": (11, (64, 48), 0),
        "Slake1.0/imgs/xmlab2/source.jpg": (12, (64, 48), 0),
    },
    "pathvqa": {
        "pvqa/images/train/train_0000.jpg": (20, (40, 40), 0),
        "pvqa/images/train/train_0001.jpg": (21, (40, 40), 0),
        "pvqa/images/val/val_0000.jpg": (22, (40, 40), 0),
        "pvqa/images/test/test_0000.jpg": (23, (40, 40), 0),
    },
    "pmc-vqa": {
        "images/PMC1000001_Fig1_0.jpg": (30, (48, 32), 0),
        "images/PMC1000001_Fig2_0.jpg": (31, (48, 32), 0),
        "images/PMC1000002_Fig1_0.jpg": (32, (48, 32), 0),
        "images/PMC1000003_Fig1_0.jpg": (33, (48, 32), 0),
        "images/PMC1000001_Fig3_0.jpg": (34, (48, 32), 0),
        "images/PMC1000004_Fig1_0.jpg": (35, (48, 32), 0),
    },
    "omnimedvqa": {
        "Images/ACRIMA/Im001_ACRIMA.png": (40, (32, 32), 0),
        "Images/ACRIMA/Im002_ACRIMA.png": (41, (32, 32), 0),
        "Images/Chest CT Scan/train/0001.png": (42, (32, 32), 0),
        "Images/RestrictedSet/r1.png": (43, (32, 32), 0),
    },
    "generic": {
        "img/a.png": (50, (32, 24), 0),
        "img/b.png": (51, (32, 24), 0),
    },
}


def make_image(path: Path, seed: int, size: tuple[int, int], shift: int = 0) -> None:
    """A smooth random RGB picture (blurred 6x8 noise), so pHash separates seeds and survives JPEG."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)).astype(np.int16)
    image = Image.fromarray(np.clip(pixels + shift, 0, 255).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95) if path.suffix == ".jpg" else image.save(path)


def build_fixture(name: str, tmp_path: Path) -> Path:
    """Copy the committed annotation files of ``name`` and generate its images; return the release root."""
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    for rel, (seed, size, shift) in IMAGES[name].items():
        make_image(root / rel, seed, size, shift)
    return root


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def by_id(root: Path) -> dict[str, object]:
    return {s.id: s for s in open_dataset(root).iter_samples()}


# ------------------------------------------------------------------------------------------- registry


def test_registry_names_and_lookup() -> None:
    assert set(IMPORTERS) == {
        "vqa-rad",
        "slake",
        "pathvqa",
        "pmc-vqa",
        "omnimedvqa",
        "gmai-mmbench",
        "mmmu-med",
        "iu-xray",
        "mimic-cxr",
        "chexpert",
        "padchest",
        "chestxray14",
        "generic",
    }
    assert get_importer("VQA_RAD").fn is import_vqa_rad
    assert get_importer("pmcvqa").fn is import_pmc_vqa
    with pytest.raises(DataFormatError, match="unknown dataset 'nope'"):
        get_importer("nope")
    for spec in IMPORTERS.values():
        doc = __import__(spec.fn.__module__, fromlist=["_"]).__doc__ or ""
        assert "License" in doc and "layout" in doc.lower(), spec.name


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("CT", "ct"),
        ("CT(Computed Tomography)", "ct"),
        ("X-Ray", "xray"),
        ("x_ray.", "xray"),
        ("MRI", "mri"),
        ("MR (Mag-netic Resonance Imaging)", "mri"),
        ("Fundus Photography", "fundus"),
        ("OCT (Optical Coherence Tomography", "oct"),
        ("Microscopy Images", "pathology"),
        ("Dermoscopy", "dermoscopy"),
        ("Ultrasound", "us"),
        ("Infrared Reflectance Imaging", "infrared"),
        ("Something New", "something_new"),
        ("", None),
        (None, None),
    ],
)
def test_normalize_modality(label: str | None, expected: str | None) -> None:
    assert normalize_modality(label) == expected


def test_normalize_question() -> None:
    assert normalize_question("  Is there a  Pneumothorax? ") == "is there a pneumothorax"
    assert normalize_question("IS THERE A PNEUMOTHORAX") == "is there a pneumothorax"


# ------------------------------------------------------------------------------------------- VQA-RAD


def test_vqa_rad_fixture_maps_fields_and_handles_oddities(tmp_path: Path) -> None:
    src = build_fixture("vqa-rad", tmp_path)
    out = tmp_path / "out"
    report = import_vqa_rad(src, out)

    assert report.written == 6 and report.records == 8
    assert report.skipped == {"invalid_record": 1, "missing_image": 1}
    assert report.by_split == {"test": 2, "train": 4}
    assert report.images == 3
    assert any("1 image file(s)" in n for n in report.notes)  # synpic9 is referenced by nothing
    assert any("stray spaces" in n for n in report.notes) and any("JSON numbers" in n for n in report.notes)

    ds = open_dataset(out)
    assert ds.manifest.license == "CC0-1.0" and ds.manifest.name == "vqa-rad"
    assert ds.manifest.counts == {"train": 4, "test": 2}
    samples = by_id(out)
    assert set(samples) == {"0", "1", "2", "3", "4", "5"}

    s0 = samples["0"]
    assert s0.task is TaskType.CLOSED_VQA
    assert [(t.role, t.content, t.images) for t in s0.turns] == [
        ("user", "Are regions of the brain infarcted?", [0]),
        ("assistant", "Yes", []),
    ]
    assert s0.gold.answer == "Yes"
    assert s0.meta.body_part == "head" and s0.meta.modality is None
    assert s0.meta.split == "train" and s0.meta.study_key == "synpic1.jpg"
    assert s0.meta.question_type == "PRES" and s0.meta.answer_type == "closed"
    # The stored image is the source file, byte for byte, found by its content hash.
    ref = s0.images[0]
    assert ref.sha256 == sha_of(src / "images/synpic1.jpg")
    assert ds.image_bytes(ref) == (src / "images/synpic1.jpg").read_bytes()
    assert (ref.width, ref.height) == (64, 48)
    assert ref.provenance is not None and ref.provenance.source == "vqa-rad:images/synpic1.jpg"

    assert samples["1"].task is TaskType.CLOSED_VQA  # "CLOSED " with a trailing space
    assert samples["1"].question == "Is there infarction in the brain?"  # spaces collapsed and stripped
    assert samples["1"].meta.extra["phrase_type"] == "para"
    assert samples["2"].gold.answer == "4" and samples["2"].task is TaskType.OPEN_VQA  # a JSON number
    assert samples["2"].meta.body_part == "chest"
    assert samples["3"].gold.answer == "superficial to the skin"
    assert samples["3"].meta.question_type == "POS, PRES"
    assert samples["4"].meta.split == "test" and samples["5"].meta.split == "test"
    assert samples["5"].meta.body_part == "abdomen" and samples["5"].task is TaskType.OPEN_VQA
    # Two samples on synpic1 share one stored image file.
    assert samples["0"].images[0].path == samples["4"].images[0].path


def test_vqa_rad_limit_then_resume_completes_without_duplicates(tmp_path: Path) -> None:
    src = build_fixture("vqa-rad", tmp_path)
    out = tmp_path / "out"
    first = import_vqa_rad(src, out, limit=3)
    assert first.written == 3 and first.limited
    assert open_dataset(out).count() == 3
    with pytest.raises(DataFormatError, match="already holds a dataset"):
        import_vqa_rad(src, out)
    second = import_vqa_rad(src, out, resume=True)
    assert second.resumed == 3 and second.written == 3 and not second.limited
    ids = [s.id for s in open_dataset(out).iter_samples()]
    assert sorted(ids) == ["0", "1", "2", "3", "4", "5"]
    assert open_dataset(out).manifest.counts == {"train": 4, "test": 2}


def test_vqa_rad_progress_is_reported(tmp_path: Path) -> None:
    src = build_fixture("vqa-rad", tmp_path)
    calls: list[tuple[int, int | None]] = []
    import_vqa_rad(src, tmp_path / "out", progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 8) and calls[-1] == (8, 8)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_vqa_rad_bad_layouts_raise_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="does not exist"):
        import_vqa_rad(tmp_path / "absent", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFormatError, match="missing VQA_RAD_Dataset_Public.json"):
        import_vqa_rad(empty, tmp_path / "out")
    (empty / "VQA_RAD_Dataset_Public.json").write_text("[]")
    with pytest.raises(DataFormatError, match="missing folder .*images"):
        import_vqa_rad(empty, tmp_path / "out")
    (empty / "images").mkdir()
    with pytest.raises(DataFormatError, match="no question rows"):
        import_vqa_rad(empty, tmp_path / "out")
    (empty / "VQA_RAD_Dataset_Public.json").write_text('{"qid": 1}')
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        import_vqa_rad(empty, tmp_path / "out")
    (empty / "VQA_RAD_Dataset_Public.json").write_text('[{"qid": 1, "question": "q"}]')
    with pytest.raises(DataFormatError, match="lack key"):
        import_vqa_rad(empty, tmp_path / "out")
    (empty / "VQA_RAD_Dataset_Public.json").write_text('[{"qid": 1,')
    with pytest.raises(DataFormatError, match="not valid JSON") as info:
        import_vqa_rad(empty, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written for a bad layout


@pytest.mark.skipif(not REAL_VQA_RAD.is_dir(), reason="shared VQA-RAD data not present")
def test_real_vqa_rad_official_counts(tmp_path: Path) -> None:
    report = import_vqa_rad(REAL_VQA_RAD, tmp_path / "vqa-rad")
    assert report.records == 2248 and report.written == 2248 and report.skipped == {}
    assert report.by_split == {"test": 451, "train": 1797}
    assert len(list((REAL_VQA_RAD / "images").glob("*.jpg"))) == 315
    assert report.images == 314  # one image file is referenced by no question
    ds = open_dataset(tmp_path / "vqa-rad")
    tasks: dict[tuple[str, str], int] = {}
    for s in ds.iter_samples():
        key = (s.meta.split or "", str(s.task))
        tasks[key] = tasks.get(key, 0) + 1
        assert s.gold.answer == s.gold.answer.strip() and s.gold.answer
    assert tasks == {
        ("test", "closed_vqa"): 272,
        ("test", "open_vqa"): 179,
        ("train", "closed_vqa"): 1027,
        ("train", "open_vqa"): 770,
    }


# ------------------------------------------------------------------------------------------- SLAKE


def test_slake_fixture(tmp_path: Path) -> None:
    src = build_fixture("slake", tmp_path)
    out = tmp_path / "out"
    report = import_slake(src, out)  # the folder holding Slake1.0/
    assert report.written == 5
    assert report.filtered == {"language:zh": 1}
    assert report.skipped == {"missing_image": 1}
    assert report.by_split == {"test": 1, "train": 3, "validation": 1}
    assert any("1 detection box" in n for n in report.notes)
    assert open_dataset(out).manifest.license == "CC-BY-4.0"

    s = by_id(out)
    liver = s["100"]
    assert liver.task is TaskType.OPEN_VQA and liver.gold.answer == "Liver"
    assert liver.meta.modality == "ct" and liver.meta.body_part == "abdomen"
    assert liver.meta.question_type == "Organ" and liver.meta.study_key == "xmlab0"
    # detection.json [x, y, w, h] → canonical pixel (x1, y1, x2, y2); the out-of-image Kidney box is dropped.
    boxes = {b.label: (b.as_tuple(), b.space) for b in liver.gold.boxes}
    assert boxes == {
        "Liver": ((10.0, 8.0, 30.0, 24.0), CoordSpace.PIXEL),
        "Spleen": ((40.0, 20.0, 50.0, 32.0), CoordSpace.PIXEL),
    }
    assert s["300"].gold.boxes == liver.gold.boxes and s["300"].meta.split == "test"
    assert s["300"].task is TaskType.CLOSED_VQA
    assert (
        s["102"].meta.modality == "xray" and s["102"].meta.body_part == "chest" and s["102"].gold.boxes == []
    )
    assert s["103"].meta.extra["base_type"] == "kvqa" and s["103"].meta.extra["triple"] == [
        "Lung",
        "function",
        "vhead",
    ]
    assert s["200"].meta.split == "validation" and s["200"].meta.modality == "mri"
    assert s["200"].meta.body_part == "head"


def test_slake_languages_and_root_forms(tmp_path: Path) -> None:
    src = build_fixture("slake", tmp_path)
    both = import_slake(src / "Slake1.0", tmp_path / "both", languages=("en", "zh"))
    assert both.written == 6 and both.filtered == {}
    zh = by_id(tmp_path / "both")["101"]
    assert zh.gold.answer == "肝脏" and zh.meta.extra["q_lang"] == "zh"
    shutil.rmtree(src / "Slake1.0" / "imgs")
    with pytest.raises(DataFormatError, match="missing imgs/"):
        import_slake(src, tmp_path / "x")
    with pytest.raises(DataFormatError, match="none of train.json"):
        import_slake(tmp_path / "both", tmp_path / "y")


# ------------------------------------------------------------------------------------------- PathVQA


def test_pathvqa_json_csv_jsonl_layout(tmp_path: Path) -> None:
    src = build_fixture("pathvqa", tmp_path)
    out = tmp_path / "out"
    report = import_pathvqa(src, out)
    assert report.written == 6
    assert report.skipped == {"invalid_record": 1, "missing_image": 1}
    assert report.by_split == {"test": 1, "train": 3, "validation": 2}
    s = by_id(out)
    assert set(s) == {"train-0", "train-1", "train-2", "validation-0", "validation-1", "test-0"}
    assert s["train-0"].task is TaskType.CLOSED_VQA and s["train-0"].meta.answer_type == "closed"
    assert s["train-1"].task is TaskType.OPEN_VQA and s["train-1"].gold.answer == "caseating granuloma"
    assert s["validation-1"].question == "Are the cells, shown here, necrotic?"  # quoted CSV field
    assert s["validation-1"].task is TaskType.CLOSED_VQA
    assert all(x.meta.modality == "pathology" for x in s.values())
    assert s["train-0"].images[0].sha256 == sha_of(src / "pvqa/images/train/train_0000.jpg")
    assert s["train-0"].images[0].sha256 == s["train-1"].images[0].sha256
    assert s["test-0"].meta.study_key == "test_0000"
    assert open_dataset(out).manifest.license == "MIT"


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (str(self.marker),))


def test_pathvqa_pickle_refused_unless_allowed_and_never_runs_code(tmp_path: Path) -> None:
    src = build_fixture("pathvqa", tmp_path)
    qa = src / "pvqa" / "qas" / "train"
    records = json.loads((qa / "train_qa.json").read_text())
    (qa / "train_qa.json").unlink()
    (qa / "train_qa.pkl").write_bytes(pickle.dumps(records, protocol=2))
    with pytest.raises(DataFormatError, match="--allow-pickle"):
        import_pathvqa(src, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    report = import_pathvqa(src, tmp_path / "allowed", allow_pickle=True)
    assert report.by_split["train"] == 3 and report.written == 6

    marker = tmp_path / "pwned"
    (qa / "train_qa.pkl").write_bytes(pickle.dumps([_Evil(marker)]))
    with pytest.raises(DataFormatError, match="only plain lists/dicts"):
        import_pathvqa(src, tmp_path / "evil", allow_pickle=True)
    assert not marker.exists()


def test_pathvqa_parquet_layout(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = []
    for seed in (60, 61):
        buf = io.BytesIO()
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    data = tmp_path / "hf" / "data"
    data.mkdir(parents=True)
    table = pa.table(
        {
            "image": [
                {"bytes": images[0], "path": None},
                {"bytes": images[1], "path": None},
                {"bytes": None, "path": None},
            ],
            "question": ["is this necrosis?", "what organ is shown?", "what is it?"],
            "answer": ["no", "liver", "x"],
        }
    )
    pq.write_table(table.slice(0, 2), data / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(2, 1), data / "test-00000-of-00001.parquet")
    out = tmp_path / "out"
    report = import_pathvqa(tmp_path / "hf", out)
    assert report.written == 2 and report.skipped == {"missing_image": 1}
    s = by_id(out)
    assert s["train-0"].task is TaskType.CLOSED_VQA and s["train-1"].gold.answer == "liver"
    ds = open_dataset(out)
    assert ds.image_bytes(s["train-1"].images[0]) == images[1]
    assert (s["train-1"].images[0].width, s["train-1"].images[0].height) == (30, 20)


def test_pathvqa_bad_layout(tmp_path: Path) -> None:
    (tmp_path / "pvqa" / "qas").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="no qas/"):
        import_pathvqa(tmp_path, tmp_path / "out")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataFormatError, match="missing qas/"):
        import_pathvqa(tmp_path / "nothing", tmp_path / "out")


# ------------------------------------------------------------------------------------------- PMC-VQA


def test_pmc_vqa_fixture(tmp_path: Path) -> None:
    src = build_fixture("pmc-vqa", tmp_path)
    out = tmp_path / "out"
    report = import_pmc_vqa(src, out)
    assert report.written == 5
    assert report.skipped == {"invalid_record": 1, "missing_image": 1}
    assert report.by_split == {"test": 2, "train": 3}
    assert any("1 row(s) whose Answer text differs" in n for n in report.notes)
    s = by_id(out)
    first = s["train-0"]
    assert first.task is TaskType.MULTIPLE_CHOICE
    assert first.gold.options == ["MRI", "CT", "X-ray", "Ultrasound"]  # "A:" prefixes removed
    assert first.gold.answer_index == 1 and first.gold.answer == "CT"
    assert first.turns[0].content == "What imaging modality was used?\nA. MRI\nB. CT\nC. X-ray\nD. Ultrasound"
    assert first.turns[1].content == "B. CT"
    assert first.meta.study_key == "PMC1000001" and first.meta.extra["figure"] == "PMC1000001_Fig1_0.jpg"
    mismatch = s["train-2"]  # label C wins over the Answer text
    assert mismatch.gold.answer_index == 2 and mismatch.gold.answer == "A vessel"
    assert s["test-2"].gold.answer == "Kidney" and s["test-2"].meta.split == "test"
    assert open_dataset(out).manifest.license == "CC-BY-SA-4.0"


def test_pmc_vqa_revised_tables(tmp_path: Path) -> None:
    src = build_fixture("pmc-vqa", tmp_path)
    (src / "train.csv").rename(src / "train_2.csv")
    (src / "test.csv").unlink()
    with pytest.raises(DataFormatError, match="missing train.csv and test.csv"):
        import_pmc_vqa(src, tmp_path / "v1")
    report = import_pmc_vqa(src, tmp_path / "v2", version=2)
    assert report.by_split == {"train": 3}


def test_pmc_vqa_bad_layout(tmp_path: Path) -> None:
    src = tmp_path / "pmc"
    src.mkdir()
    with pytest.raises(DataFormatError, match="missing train.csv and test.csv"):
        import_pmc_vqa(src, tmp_path / "out")
    (src / "train.csv").write_text("Figure_path,Question,Answer\nx.jpg,q,a\n")
    with pytest.raises(DataFormatError, match="missing column"):
        import_pmc_vqa(src, tmp_path / "out")
    shutil.copy(FIXTURES / "pmc-vqa" / "train.csv", src / "train.csv")
    with pytest.raises(DataFormatError, match="missing images/"):
        import_pmc_vqa(src, tmp_path / "out")


# ------------------------------------------------------------------------------------------- OmniMedVQA


def test_omnimedvqa_fixture(tmp_path: Path) -> None:
    src = build_fixture("omnimedvqa", tmp_path)
    out = tmp_path / "out"
    report = import_omnimedvqa(src, out)
    assert report.written == 4
    assert report.skipped == {"invalid_record": 1, "missing_image": 1}
    assert report.by_split == {"test": 4}
    s = by_id(out)
    glaucoma = s["ACRIMA_0000"]
    assert glaucoma.gold.options == ["Yes", "No"] and glaucoma.gold.answer_index == 1
    assert glaucoma.meta.modality == "fundus" and glaucoma.meta.question_type == "Disease Diagnosis"
    assert glaucoma.meta.extra["dataset"] == "ACRIMA" and glaucoma.meta.extra["access"] == "open"
    technique = s["ACRIMA_0001"]  # gt_answer differs from the option only in case
    assert technique.gold.answer_index == 2 and technique.gold.answer == "Fundus photography"
    assert s["Chest CT Scan_0000"].meta.modality == "ct"  # this file spells the key "modality"
    assert s["RestrictedSet_0000"].meta.modality == "mri"
    assert s["RestrictedSet_0000"].meta.extra["access"] == "restricted"

    only_open = import_omnimedvqa(src, tmp_path / "open", access=("open",))
    assert only_open.written == 3


def test_omnimedvqa_bad_layout(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="missing 'QA information/'"):
        import_omnimedvqa(tmp_path, tmp_path / "out")
    (tmp_path / "QA information" / "Open-access").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="no 'QA information/Open-access/\\*.json'"):
        import_omnimedvqa(tmp_path, tmp_path / "out", access=("open",))


# ------------------------------------------------------------------------------------------- generic


def test_generic_fixture(tmp_path: Path) -> None:
    src = build_fixture("generic", tmp_path)
    out = tmp_path / "out"
    report = import_generic(src, out, name="my-set", license="CC-BY-4.0")
    assert report.written == 6
    assert report.skipped == {"invalid_record": 1, "missing_image": 1}
    assert report.by_split == {"test": 2, "train": 3, "validation": 1}
    ds = open_dataset(out)
    assert ds.manifest.name == "my-set" and ds.manifest.license == "CC-BY-4.0"
    s = by_id(out)
    assert s["g1"].task is TaskType.CLOSED_VQA and s["g1"].meta.modality == "xray"
    assert s["g1"].meta.body_part == "chest"
    assert s["g2"].task is TaskType.MULTIPLE_CHOICE and s["g2"].gold.options == ["left", "right"]
    assert s["g2"].gold.answer_index == 1 and s["g2"].gold.answer == "right"  # answer given as letter "B"
    assert s["g3"].task is TaskType.OPEN_VQA and s["g3"].meta.split == "validation"
    assert s["g4"].gold.options == ["upper", "middle", "lower"] and s["g4"].gold.answer_index == 2
    report_sample = s["more-0"]
    assert report_sample.task is TaskType.REPORT and len(report_sample.images) == 2
    assert report_sample.turns[0].images == [0, 1]
    assert report_sample.images[1].sha256 == sha_of(src / "img/b.png")
    assert s["more-1"].meta.modality == "ct" and s["more-1"].meta.split == "train"
    single = import_generic(src / "more.jsonl", tmp_path / "single")
    assert single.written == 2


def test_duplicate_ids_are_skipped_and_counted(tmp_path: Path) -> None:
    make_image(tmp_path / "src" / "a.png", 1, (16, 16))
    rows = [{"id": "same", "image": "a.png", "question": f"q{i}?", "answer": "no"} for i in range(3)]
    (tmp_path / "src" / "ann.json").write_text(json.dumps(rows))
    report = import_generic(tmp_path / "src", tmp_path / "out")
    assert report.written == 1 and report.skipped == {"duplicate_id": 2}
    assert by_id(tmp_path / "out")["same"].question == "q0?"


def test_generic_task_follows_the_scorers_yes_no_rule(tmp_path: Path) -> None:
    # One yes/no rule (emma.text.normalize.is_yes_no) for importers and scorers: what the scorer reads
    # as a yes/no gold is imported as closed, in English and Chinese.
    make_image(tmp_path / "src" / "a.png", 1, (16, 16))
    answers = {"y": "Yes.", "n": "NO!", "zh": "是", "zh-no": "没有", "open": "yes, small", "normal": "normal"}
    rows = [{"id": k, "image": "a.png", "question": "q?", "answer": a} for k, a in answers.items()]
    (tmp_path / "src" / "ann.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    import_generic(tmp_path / "src", tmp_path / "out")
    tasks = {k: s.task for k, s in by_id(tmp_path / "out").items()}
    closed, open_ = TaskType.CLOSED_VQA, TaskType.OPEN_VQA
    assert tasks == {"y": closed, "n": closed, "zh": closed, "zh-no": closed, "open": open_, "normal": open_}


def test_generic_bad_layout(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no .csv, .json or .jsonl"):
        import_generic(tmp_path, tmp_path / "out")
    (tmp_path / "a.csv").write_text("image,question\nx.png,q\n")
    with pytest.raises(DataFormatError, match="missing column.*answer"):
        import_generic(tmp_path, tmp_path / "out")
    (tmp_path / "a.csv").unlink()
    (tmp_path / "a.jsonl").write_text('{"image": "x.png"}\nnot json\n')
    with pytest.raises(DataFormatError, match="line 2 is not valid JSON"):
        import_generic(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------- image bounds


def test_images_are_bounded_and_bad_ones_skipped(tmp_path: Path) -> None:
    src = tmp_path / "g"
    make_image(src / "ok.png", 1, (16, 16))
    make_image(src / "big.png", 2, (200, 100))
    (src / "garbage.jpg").write_bytes(b"this is not an image at all")
    good = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(good, format="JPEG")
    (src / "truncated.jpg").write_bytes(good.getvalue()[:300])  # a sound header, cut-off data
    rows = [
        {"image": name, "question": "q?", "answer": "yes"}
        for name in ("ok.png", "big.png", "garbage.jpg", "truncated.jpg", "ok.png")
    ]
    (src / "ann.json").write_text(json.dumps(rows))
    limits = Limits(max_pixels=10_000)
    report = import_generic(src, tmp_path / "out", limits=limits)
    assert report.written == 2
    assert report.skipped == {"corrupt_image": 2, "image_too_large": 1}
    assert open_dataset(tmp_path / "out").count() == 2

    assert probe_image(src / "ok.png", what="ok") == (16, 16)
    with pytest.raises(ImageTooLargeError):
        probe_image(src / "big.png", what="big", limits=limits)
    with pytest.raises(CorruptFileError):
        probe_image(src / "garbage.jpg", what="garbage")
    with pytest.raises(ImageTooLargeError):
        probe_image((src / "ok.png").read_bytes(), what="bytes", limits=Limits(max_file_bytes=10))
