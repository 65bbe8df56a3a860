"""The task registry, data resolution and the task-layout readers (tiny fixtures, images made here)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from emma.data.schema import TaskType
from emma.data.sources import run_importer
from emma.data.sources.mc_benchmarks import import_gmai_mmbench, import_mmmu_med
from emma.data.sources.report_datasets import (
    REPORT_INSTRUCTION,
    import_iu_xray,
    import_mimic_cxr,
    report_sections,
)
from emma.data.store import open_dataset
from emma.errors import DataFormatError
from emma.eval.runner import EvalOptions, run_eval
from emma.eval.tasks import TASKS, get_task, open_task_data
from emma.eval.tasks.data import resolve_data

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def make_images(root: Path, rels: Iterable[str], size: tuple[int, int] = (64, 48)) -> None:
    for k, rel in enumerate(rels):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(k + 1)
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.Resampling.NEAREST).save(path)


def copy_fixture(name: str, tmp_path: Path, images: Iterable[str]) -> Path:
    src = tmp_path / name
    shutil.copytree(FIXTURES / name, src)
    make_images(src, images)
    return src


@pytest.fixture
def slake_release(tmp_path: Path) -> Path:
    return copy_fixture(
        "slake", tmp_path, ["Slake1.0/imgs/xmlab0/source.jpg", "Slake1.0/imgs/xmlab1/source.jpg"]
    )


def items_of(
    task: str, root: Path, split: str | None = None, skipped: dict[str, int] | None = None
) -> list[Any]:
    t = get_task(task)
    return list(t.items(open_dataset(root).iter_samples(split or t.default_split), skipped))


def write_predictions(path: Path, rows: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in rows.items()))
    return path


# ---------------------------------------------------------------------------------------- registry


def test_registry_holds_every_task_with_fixed_prompts() -> None:
    expected = {
        "vqa-rad": "vqa",
        "slake-en": "vqa",
        "slake-zh": "vqa",
        "pathvqa": "vqa",
        "pmc-vqa": "mc",
        "omnimedvqa": "mc",
        "gmai-mmbench": "mc",
        "mmmu-med": "mc",
        "iu-xray": "report",
        "mimic-cxr": "report",
        "slake-grounding": "grounding",
        "chexpert": "classification",
        "chexpert-14": "classification",
        "chexpert-which": "classification",
        "padchest": "classification",
        "padchest-which": "classification",
        "chestxray14": "classification",
        "chestxray14-which": "classification",
    }
    assert {name: t.kind for name, t in TASKS.items()} == expected
    for t in TASKS.values():
        assert t.decoding.temperature == 0.0
        assert all("{question}" in p for p in t.prompts.values())
        cfg = t.config()
        assert cfg["prompts"] == dict(t.prompts) and cfg["name"] == t.name
    assert get_task("VQA_RAD").name == "vqa-rad"
    with pytest.raises(DataFormatError, match="unknown task"):
        get_task("medqa")


def test_release_is_imported_once_into_a_keyed_cache(
    slake_release: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.delenv("EMMA_CACHE", raising=False)
    calls: list[tuple[Path, Path, dict[str, Any]]] = []

    def importer(src: Path, out: Path, **kw: Any) -> Any:
        calls.append((src, out, kw))
        return run_importer("slake", src, out, **kw)

    out = tmp_path / "run"
    first = resolve_data(slake_release, "slake", importer, {"languages": ("en",)}, out_dir=out)
    second = resolve_data(slake_release, "slake", importer, {"languages": ("en",)}, out_dir=out)
    assert len(calls) == 1 and calls[0][2] == {"resume": False, "languages": ("en",)}
    assert first.imported and first.cache == second.cache
    assert Path(first.cache or "").parent == out / "data-cache"
    other = resolve_data(slake_release, "slake", importer, {"languages": ("zh",)}, out_dir=out)
    assert other.cache != first.cache and len(calls) == 2  # options are part of the key
    os.utime(slake_release / "Slake1.0", ns=(1, 1))  # an edited release is imported again
    resolve_data(slake_release, "slake", importer, {"languages": ("en",)}, out_dir=out)
    assert len(calls) == 3
    monkeypatch.setenv("EMMA_CACHE", str(tmp_path / "cache"))
    env = resolve_data(slake_release, "slake", importer, {"languages": ("en",)}, out_dir=out)
    assert Path(env.cache or "").parent == tmp_path / "cache" / "eval-data"
    # a canonical dataset folder is opened as it is
    canonical = resolve_data(Path(env.cache or ""), "slake", importer, {}, out_dir=out)
    assert not canonical.imported and len(calls) == 4


# ------------------------------------------------------------------------------------------- SLAKE


def test_slake_languages_are_never_mixed(slake_release: Path, tmp_path: Path) -> None:
    en = open_task_data(get_task("slake-en"), slake_release, out_dir=tmp_path / "a").dataset
    zh = open_task_data(get_task("slake-zh"), slake_release, out_dir=tmp_path / "b").dataset
    en_items, zh_items = items_of("slake-en", en.root), items_of("slake-zh", zh.root)
    assert [it.id for it in en_items] == ["100", "101", "103"]
    assert [it.id for it in zh_items] == ["102", "104", "105"]
    assert all(it.prompt.endswith("Answer the question using a single word or phrase.") for it in en_items)
    assert all(it.prompt.endswith("请用一个词或短语回答问题。") for it in zh_items)
    # a dataset imported with both languages is still split by question language
    both = tmp_path / "both"
    run_importer("slake", slake_release, both, languages=("en", "zh"))
    skipped: dict[str, int] = {}
    assert [it.id for it in items_of("slake-en", both, skipped=skipped)] == ["100", "101", "103"]
    assert skipped == {"language zh": 3}
    assert [it.id for it in items_of("slake-zh", both)] == ["102", "104", "105"]


def test_slake_grounding_items_and_scores(slake_release: Path, tmp_path: Path) -> None:
    ds = open_task_data(get_task("slake-grounding"), slake_release, out_dir=tmp_path / "g").dataset
    items = items_of("slake-grounding", ds.root)
    assert [it.id for it in items] == [
        "xmlab0/Kidney",
        "xmlab0/Liver",
        "xmlab0/Spleen",
        "xmlab1/Left Lung",
        "xmlab1/Right Lung",
    ]
    kidney, liver = items[0], items[1]
    assert kidney.task_type is TaskType.GROUNDING and len(kidney.sample.gold.boxes) == 2
    assert liver.sample.gold.boxes[0].as_tuple() == (10.0, 12.0, 40.0, 32.0)  # [x, y, w, h] → pixels
    assert liver.prompt == "Locate the liver in this image and give its bounding box."

    def norm(box: tuple[float, ...]) -> str:  # the generic family's convention: 0-1000 of the image
        x1, y1, x2, y2 = box
        return f"[{x1 / 64 * 1000:.0f},{y1 / 48 * 1000:.0f},{x2 / 64 * 1000:.0f},{y2 / 48 * 1000:.0f}]"

    perfect = {
        it.id: "<box>[" + ",".join(norm(b.as_tuple()) for b in it.sample.gold.boxes) + "]</box>"
        for it in items
    }
    run = run_eval(
        EvalOptions(
            task="slake-grounding",
            data=ds.root,
            predictions=write_predictions(tmp_path / "p.jsonl", perfect),
            out=tmp_path / "run",
            n_resamples=200,
        )
    )
    m = run.results["metrics"]
    assert m["recall_at_iou50"] == 1.0 and m["precision_at_iou50"] == 1.0 and m["mean_iou"] > 0.95
    assert run.results["config"]["box_convention"] == "norm1000"
    # one predicted box may match one gold box only: a single kidney box twice finds one kidney
    left_kidney = norm(kidney.sample.gold.boxes[0].as_tuple())
    partial = {**perfect, kidney.id: f"<box>[{left_kidney},{left_kidney}]</box>", liver.id: "the liver"}
    run2 = run_eval(
        EvalOptions(
            task="slake-grounding",
            data=ds.root,
            predictions=write_predictions(tmp_path / "q.jsonl", partial),
            out=tmp_path / "run2",
            n_resamples=200,
        )
    )
    rows = {r["id"]: r for r in run2.rows}
    assert rows[kidney.id]["values"]["recall_at_iou50"] == 0.5
    assert rows[kidney.id]["values"]["precision_at_iou50"] == 0.5
    assert rows[liver.id]["parse_status"] == "unparseable"
    assert run2.results["metrics"]["recall_at_iou50"] == pytest.approx((3 + 0.5 + 0) / 5)


# -------------------------------------------------------------------------------------- GMAI-MMBench


def test_gmai_mmbench_reader_and_scoring(tmp_path: Path) -> None:
    src = copy_fixture("gmai_mmbench", tmp_path, ["images/g0.png", "images/g1.png"])
    report = import_gmai_mmbench(src, tmp_path / "ds")
    assert report.by_split == {"validation": 2}
    assert report.filtered == {"no_answer": 1} and report.skipped == {"invalid_record": 1}  # C of two options
    items = items_of("gmai-mmbench", tmp_path / "ds")
    a, b = items
    assert a.id == "validation-0" and a.sample.gold.options == ["CT", "MRI", "X-ray"]
    assert b.sample.gold.answer_index == 1 and len(b.sample.gold.options or []) == 5
    assert a.prompt.splitlines()[1:4] == ["A. CT", "B. MRI", "C. X-ray"]
    assert a.question_type == "Modality Recognition" and a.modality == "ct"
    preds = {a.id: "A", b.id: "(B) Pneumothorax"}
    run = run_eval(
        EvalOptions(
            task="gmai-mmbench",
            data=tmp_path / "ds",
            predictions=write_predictions(tmp_path / "p.jsonl", preds),
            out=tmp_path / "run",
            n_resamples=200,
        )
    )
    assert run.results["metrics"]["choice_accuracy"] == 1.0
    bad = {a.id: "I cannot determine the answer", b.id: "E"}
    run2 = run_eval(
        EvalOptions(
            task="gmai-mmbench",
            data=tmp_path / "ds",
            predictions=write_predictions(tmp_path / "q.jsonl", bad),
            out=tmp_path / "run2",
            n_resamples=200,
        )
    )
    assert run2.results["metrics"]["choice_accuracy"] == 0.0
    assert run2.results["metrics"]["choice_unparseable"] == 0.5  # no fuzzy fallback to an option
    assert run2.rows[1]["extracted"] == "E. Fracture"


def test_gmai_mmbench_base64_images_and_row_references(tmp_path: Path) -> None:
    src = tmp_path / "gmai"
    src.mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 77, np.uint8)).save(buf, format="PNG")
    encoded = base64.b64encode(buf.getvalue()).decode()
    with (FIXTURES / "gmai_mmbench" / "GMAI-MMBench_VAL.tsv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for row in rows:
        row["image"] = encoded if row["index"] == "0" else "0"  # VLMEvalKit: a short value names a row
        del row["image_path"]
    with (src / "GMAI-MMBench_VAL.tsv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    import_gmai_mmbench(src, tmp_path / "ds")
    items = items_of("gmai-mmbench", tmp_path / "ds")
    assert len(items) == 2 and items[0].images[0].sha256 == items[1].images[0].sha256
    assert (items[0].images[0].width, items[0].images[0].height) == (30, 20)


# ---------------------------------------------------------------------------------------------- MMMU


MMMU_IMAGES = [
    "Clinical_Medicine/images/c1.png",
    "Clinical_Medicine/images/c2a.png",
    "Clinical_Medicine/images/c2b.png",
    "Pharmacy/images/p1.png",
    "Art/images/a1.png",
]


def check_mmmu(root: Path) -> None:
    items = items_of("mmmu-med", root)
    assert [it.id for it in items] == ["validation_Clinical_Medicine_1", "validation_Clinical_Medicine_2"]
    one, two = items
    assert one.sample.gold.options == ["Aortic arch", "Pulmonary artery", "Left atrium", "Trachea"]
    assert one.sample.gold.answer_index == 1 and one.question_type == "Clinical_Medicine"
    assert one.prompt.startswith("<image 1> What does the arrow point to?\nA. Aortic arch")
    assert len(two.images) == 2 and two.sample.gold.options == ["<image 1>", "<image 2>"]
    assert two.images[0].sha256 != two.images[1].sha256


def test_mmmu_med_reader_json(tmp_path: Path) -> None:
    src = copy_fixture("mmmu", tmp_path, MMMU_IMAGES)
    report = import_mmmu_med(src, tmp_path / "ds")
    assert report.filtered == {"open_question": 1, "no_answer": 1}  # Art is not a medical subject
    assert report.by_split == {"validation": 2}
    check_mmmu(tmp_path / "ds")


def test_mmmu_med_reader_parquet(tmp_path: Path) -> None:
    json_src = copy_fixture("mmmu", tmp_path, MMMU_IMAGES)
    src = tmp_path / "parquet"
    (src / "Clinical_Medicine").mkdir(parents=True)
    records = json.loads((json_src / "Clinical_Medicine" / "validation.json").read_text())
    for rec in records:
        for k in range(1, 8):
            rel = rec.get(f"image_{k}")
            rec[f"image_{k}"] = (
                {"bytes": (json_src / "Clinical_Medicine" / rel).read_bytes(), "path": Path(rel).name}
                if rel
                else None
            )
    pq.write_table(
        pa.Table.from_pylist(records), src / "Clinical_Medicine" / "validation-00000-of-00001.parquet"
    )
    import_mmmu_med(src, tmp_path / "ds")
    check_mmmu(tmp_path / "ds")


# ------------------------------------------------------------------------------------------- reports


def test_iu_xray_r2gen_layout(tmp_path: Path) -> None:
    rels = [
        "images/CXR1_1_IM-0001/0.png",
        "images/CXR1_1_IM-0001/1.png",
        "images/CXR2_1_IM-0002/0.png",
        "images/CXR2_1_IM-0002/1.png",
        "images/CXR3_1_IM-0003/0.png",
        "images/CXR4_1_IM-0004/0.png",
    ]
    src = copy_fixture("iu_xray_r2gen", tmp_path, rels)
    report = import_iu_xray(src, tmp_path / "ds")
    assert report.by_split == {"test": 2, "train": 1} and report.filtered == {"no_findings": 1}
    items = items_of("iu-xray", tmp_path / "ds")
    assert [it.id for it in items] == ["CXR2_1_IM-0002", "CXR3_1_IM-0003"]
    assert len(items[0].images) == 2 and items[0].prompt == REPORT_INSTRUCTION
    assert items[0].sample.gold.answer == "Heart size is normal. There is a small right pleural effusion."
    assert (items[0].modality, items[0].body_part) == ("xray", "chest")


def test_iu_xray_openi_layout(tmp_path: Path) -> None:
    rels = [
        "NLMCXR_png/CXR1_1_IM-0001-3001.png",
        "NLMCXR_png/CXR1_1_IM-0001-4001.png",
        "NLMCXR_png/CXR2_1_IM-0002-1001.png",
    ]
    src = copy_fixture("iu_xray_openi", tmp_path, rels)
    report = import_iu_xray(src, tmp_path / "ds")
    assert report.by_split == {"test": 1} and report.filtered == {"no_findings": 1}
    (item,) = items_of("iu-xray", tmp_path / "ds")
    assert item.id == "openi-1" and len(item.images) == 2
    assert item.sample.gold.answer == "The cardiac silhouette is enlarged. Lungs are clear. No pneumothorax."
    assert item.sample.meta.extra["impression"] == "Cardiomegaly."


def test_mimic_cxr_official_layout(tmp_path: Path) -> None:
    rels = [
        "files/p10/p10000032/s50000001/d1a.jpg",
        "files/p10/p10000032/s50000001/d1b.jpg",
        "files/p10/p10000032/s50000002/d2a.jpg",
        "files/p11/p11000011/s51000003/d3a.jpg",
    ]
    src = copy_fixture("mimic_cxr", tmp_path, rels)
    report = import_mimic_cxr(src, tmp_path / "ds")
    assert report.by_split == {"test": 1, "train": 1} and report.filtered == {"no_findings": 1}
    (item,) = items_of("mimic-cxr", tmp_path / "ds")
    assert item.id == "s50000001" and len(item.images) == 1  # the lateral view is left out
    assert (
        item.sample.gold.answer
        == "There is a moderate left pleural effusion. The heart size is normal. No pneumothorax."
    )
    assert item.sample.meta.extra["impression"] == "Left pleural effusion."
    assert item.sample.meta.patient_key and "10000032" not in item.sample.meta.patient_key


def test_report_sections() -> None:
    text = "EXAMINATION: CHEST\nFINDINGS:\n Small effusion.\n  No pneumothorax.\nIMPRESSION: Effusion."
    assert report_sections(text) == {
        "examination": "CHEST",
        "findings": "Small effusion. No pneumothorax.",
        "impression": "Effusion.",
    }


def test_report_task_scoring(tmp_path: Path) -> None:
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    rels = [
        "images/CXR1_1_IM-0001/0.png",
        "images/CXR1_1_IM-0001/1.png",
        "images/CXR2_1_IM-0002/0.png",
        "images/CXR2_1_IM-0002/1.png",
        "images/CXR3_1_IM-0003/0.png",
        "images/CXR4_1_IM-0004/0.png",
    ]
    src = copy_fixture("iu_xray_r2gen", tmp_path, rels)
    items_root = tmp_path / "ds"
    import_iu_xray(src, items_root)
    perfect = {it.id: it.sample.gold.answer for it in items_of("iu-xray", items_root)}
    run = run_eval(
        EvalOptions(
            task="iu-xray",
            data=items_root,
            predictions=write_predictions(tmp_path / "p.jsonl", perfect),
            out=tmp_path / "run",
            n_resamples=200,
        )
    )
    m = run.results["metrics"]
    assert m["bleu4"] == pytest.approx(100.0) and m["rouge_l"] == pytest.approx(1.0)
    assert m["clinical_f1_micro"] == 1.0 and m["clinical_f1_macro"] == 1.0
    assert run.results["ci95"]["bleu4"] == pytest.approx([100.0, 100.0])
    assert "report_metrics" in run.results["config"]
    swapped = dict(zip(perfect, reversed(list(perfect.values()))))
    run2 = run_eval(
        EvalOptions(
            task="iu-xray",
            data=items_root,
            predictions=write_predictions(tmp_path / "q.jsonl", swapped),
            out=tmp_path / "run2",
            n_resamples=200,
        )
    )
    assert run2.results["metrics"]["clinical_f1_micro"] < 1.0 and run2.results["metrics"]["bleu4"] < 50
