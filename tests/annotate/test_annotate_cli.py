"""``emma annotate`` end to end: the real CLI, runner and store against a scripted OpenAI-compatible teacher on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

import emma.cli.annotate  # noqa: F401 — registers the command on the app
from emma.annotate.scripted_teacher import ScriptedRequest, ScriptedTeacher
from emma.cli import app
from emma.data.schema import Gold, ImageRef, Meta, Sample, TaskType, Turn
from emma.data.store import DatasetWriter, open_dataset
from emma.io.load import load_images

CT_REPORT = "Small left pneumothorax. No pleural effusion."


def teacher_answer(request: ScriptedRequest) -> str:
    """Deterministic answers by stage (from the prompt) and by sample (from its text in the prompt)."""
    prompt = request.last_user_text
    if "classify the study" in prompt:
        if "brain" in prompt:
            return '{"modality": "MRI", "body_part": "head", "view": "axial", "description": "Axial MR."}'
        return json.dumps(
            {
                "modality": "CT",
                "body_part": "chest",
                "view": "axial",
                "description": "Axial CT slice with a small left pneumothorax.",
                "findings": ["left pneumothorax"],
                "confidence": 0.9,
            }
        )
    if "Localise these findings" in prompt:
        return (
            "```json\n"
            + json.dumps([{"bbox_2d": [550, 100, 900, 450], "label": "left pneumothorax"}])
            + "\n```"
        )
    if "[R1]" in prompt:
        return "Axial CT image of the chest showing a small left pneumothorax [R1] along the anterior pleura."
    return "Axial MR image of the brain with normal grey and white matter differentiation."


def _sample(sid: str, text: str, task: TaskType) -> Sample:
    return Sample(
        id=sid,
        task=task,
        images=[ImageRef(path=f"{sid}.png")],
        turns=[Turn(role="user", content="Describe.", images=[0]), Turn(role="assistant", content=text)],
        gold=Gold(answer=text),
        meta=Meta(split="train"),
    )


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    ct = load_images(get_testdata_file("CT_small.dcm"))[0].to_pil()
    mr = load_images(get_testdata_file("MR_small.dcm"))[0].to_pil()
    root = tmp_path / "src"
    with DatasetWriter(root, name="tiny-reports") as writer:
        writer.add(_sample("ct", CT_REPORT, TaskType.REPORT), [ct])
        writer.add(_sample("mr", "An axial brain MR.", TaskType.CAPTION), [mr])
        writer.add(_sample("ct-again", CT_REPORT, TaskType.REPORT), [ct.copy()])
    return root


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["annotate", *args])
    return result.exit_code, result.stdout, result.stderr


def test_annotate_cli_end_to_end_and_resume(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with ScriptedTeacher(teacher_answer, max_concurrent=2) as server:
        args = ["--teacher", server.spec, "--family", "qwen3_vl", "--in", str(source), "--out", str(out)]
        code, stdout, stderr = _invoke(*args, "--concurrency", "2", "--json")
        assert code == 0, stderr
        stats = json.loads(stdout)
        asked = server.stats.requests
        code, stdout, _ = _invoke(*args, "--json", "--quiet")
        assert code == 0 and json.loads(stdout)["skipped"] == 3
        assert server.stats.requests == asked  # the rerun asked the teacher nothing
    assert stats["accepted"] == 2 and stats["rejected"] == {"duplicate_image": 1} and stats["completed"]
    assert (
        stats["teacher_calls"] == asked == 5
    )  # ct: coarse, roi, fine; mr: coarse, fine (no findings: no roi)
    ds = open_dataset(out)
    assert ds.count("train") == 2 and ds.count("rejected") == 1
    ct = next(s for s in ds.iter_samples("train") if s.id == "ct")
    # qwen3_vl boxes are 0-1000 relative: [550, 100, 900, 450] on 128x128 → pixels
    assert ct.gold.boxes[0].as_tuple() == pytest.approx((70.4, 12.8, 115.2, 57.6))
    assert "left pneumothorax <box>[[70,13,115,58]]</box> along" in ct.gold.answer
    assert ct.task is TaskType.CAPTION and ct.meta.modality == "ct" and ct.meta.body_part == "chest"
    assert ct.meta.extra["view"] == "axial" and ct.meta.extra["source_sample"]["answer"] == CT_REPORT
    records = ct.meta.extra["annotation"]
    assert [records[s]["stage"] for s in ("coarse", "roi", "fine")] == ["coarse", "roi", "fine"]
    assert {r["teacher"] for r in records.values()} == {"openai:loopback"}
    assert all(0.0 <= r["confidence"] <= 1.0 and len(r["prompt_hash"]) == 16 for r in records.values())
    mr = next(s for s in ds.iter_samples("train") if s.id == "mr")
    assert mr.meta.modality == "mri" and mr.gold.boxes == [] and "grey and white matter" in mr.gold.answer
    (dup,) = ds.iter_samples("rejected")
    assert dup.id == "ct-again" and dup.meta.extra["rejected"]["reason"] == "duplicate_image"
    assert "sample ct" in dup.meta.extra["rejected"]["detail"]
    with Image.open(ds.image_path(dup.images[0])) as image:  # rejected samples keep their images
        assert image.size == (128, 128)
    assert json.loads((out / "run_stats.json").read_text())["skipped"] == 3


def test_annotate_cli_single_stage_keeps_the_sample_task(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "coarse-only"
    with ScriptedTeacher(teacher_answer) as server:
        code, stdout, stderr = _invoke(
            "--teacher", server.spec, "--in", str(source), "--out", str(out), "--stages", "coarse",
            "--no-dedup", "--limit", "2", "--quiet",
        )  # fmt: skip
    assert code == 0, stderr
    assert "annotated 2 inputs: 2 accepted, 0 rejected" in stdout
    ds = open_dataset(out)
    ct = next(s for s in ds.iter_samples("train") if s.id == "ct")
    assert ct.task is TaskType.REPORT and ct.gold.answer == CT_REPORT
    assert set(ct.meta.extra["annotation"]) == {"coarse"} and ct.meta.findings == ["left pneumothorax"]


def test_annotate_cli_errors_are_one_line_exit_2(source: Path, tmp_path: Path) -> None:
    base = ["--teacher", "openai:http://127.0.0.1:9/v1#none", "--in", str(source)]
    code, _, stderr = _invoke(*base, "--out", str(tmp_path / "o1"), "--stages", "coarse,polish")
    assert code == 2 and stderr.startswith("error: --stages") and stderr.count("\n") == 1
    code, _, stderr = _invoke(*base, "--out", str(tmp_path / "o2"), "--backend", "spark")
    assert code == 2 and "--backend" in stderr
    code, _, stderr = _invoke(*base, "--out", str(tmp_path / "o3"), "--split", "nope")
    assert code == 2 and stderr.startswith("error:") and "nope" in stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    code, _, stderr = _invoke(*base, "--out", str(busy), "--no-dedup")
    assert code == 2 and "not empty" in stderr and (busy / "notes.txt").read_text() == "keep me"
    code, _, stderr = _invoke(*base[:2], "--in", str(tmp_path / "missing"), "--out", str(tmp_path / "o4"))
    assert code == 2 and stderr.startswith("error:")
