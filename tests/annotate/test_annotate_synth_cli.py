"""``emma synth`` end to end: the real CLI, the real runner and a real OpenAI-compatible HTTP teacher on
loopback (:class:`emma.annotate.scripted_teacher.ScriptedTeacher`) whose scripted answers exercise every task,
a rewrite, each rejection reason, and a rerun that reuses the store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import emma.cli.synth  # noqa: F401 — registers `emma synth` (also registered by emma.cli itself)
from emma.annotate.scripted_teacher import ScriptedRequest, ScriptedTeacher
from emma.annotate.synth import record_of
from emma.annotate.verify import VERIFY_SYSTEM
from emma.cli import app
from emma.data.schema import Box, Gold, ImageRef, Meta, Sample, TaskType, Turn
from emma.data.store import DatasetWriter, open_dataset

runner = CliRunner()

REGION_BOX_1000 = "<box image=1>[[100,400,500,900]]</box>"  # the box below, 0-1000 of a 200 x 100 image


def _source(root: Path) -> Path:
    images = [Image.new("RGB", (200, 100), (30 + 40 * k, 30, 30)) for k in range(3)]
    with DatasetWriter(root, name="src") as writer:
        writer.add(
            Sample(
                id="cxr-1",
                task=TaskType.REPORT,
                turns=[Turn(role="user", content="Describe the radiograph.")],
                gold=Gold(answer="Large left pneumothorax."),
                meta=Meta(modality="xray", body_part="chest", split="test"),
            ),
            [images[0]],
        )
        writer.add(
            Sample(
                id="study-2",
                task=TaskType.REPORT,
                images=[ImageRef(path="frontal.png"), ImageRef(path="lateral.png")],  # replaced when stored
                turns=[Turn(role="user", content="Describe the radiographs.")],
                gold=Gold(
                    answer="Right lower lobe consolidation.",
                    boxes=[Box(x1=20, y1=40, x2=100, y2=90, label="consolidation", image_index=1)],
                ),
                meta=Meta(modality="xray", body_part="chest", split="train"),
            ),
            [images[1], images[2]],
        )
        writer.add(Sample(id="empty", task=TaskType.CAPTION, turns=[], meta=Meta(split="train")))
        # a sample an earlier run rejected: not read unless --split rejected is asked for
        writer.add(
            Sample(
                id="old",
                task=TaskType.REPORT,
                turns=[],
                gold=Gold(answer="Pneumothorax."),
                meta=Meta(split="rejected", extra={"rejected": {"reason": "duplicate_image"}}),
            )
        )
    return root


def _j(**kw: object) -> str:
    return json.dumps(kw)


GENERATED = {
    # (task phrase in the prompt, report word) → the teacher's JSON
    ("from text alone", "pneumothorax"): _j(
        context="Tall 22-year-old with sudden pleuritic pain.",
        question="Which condition fits best?",
        answer="pneumothorax",
        answer_type="open",
    ),
    ("needs reasoning", "pneumothorax"): _j(
        context="The film shows a collapsed lung.",
        question="Which finding explains the dyspnoea?",
        answer="pneumothorax",
        answer_type="open",
        rationale="A pleural line without markings beyond it.",
    ),
    ("multiple-choice", "pneumothorax"): _j(
        question="Which abnormality is present?",
        answer="Pneumothorax",
        category="finding",
        distractors=["Pleural effusion", "Atelectasis", "Cardiomegaly"],
    ),
    ("diagnostic dialogue", "pneumothorax"): _j(
        complaint="Young man, sudden breathlessness.",
        findings="Left apical pleural line.",
        differential=["Pneumothorax", "Bulla"],
        next_step="Chest drain.",
    ),
    ("from text alone", "consolidation"): _j(
        context="Fever and cough; the X-ray shows consolidation.",
        question="What does the film show?",
        answer="consolidation",
        answer_type="open",
    ),
    ("needs reasoning", "consolidation"): "I would rather not.",
    ("marked with a rectangle", "consolidation"): _j(question="What is seen in <region>?", context=""),
    ("asks where the", "consolidation"): _j(question="Where is the consolidation?", context=""),
    ("comparing or combining", "consolidation"): _j(
        question="Which image shows the opacity better?",
        answer="Image 2",
        answer_type="open",
        rationale="The lateral view separates it from the heart.",
        images=[1, 2],
    ),
    ("multiple-choice", "consolidation"): _j(
        question="Which abnormality is present?",
        answer="Consolidation",
        category="finding",
        distractors=["Pneumothorax", "Edema"],
    ),
    ("compound figure", "consolidation"): _j(
        question="Which panel is the lateral view?",
        answer="B",
        answer_type="closed",
        panels=["A", "B"],
    ),
    ("diagnostic dialogue", "consolidation"): _j(
        complaint="Fever and cough for three days.",
        findings="Right lower lobe opacity.",
        differential=["Pneumonia", "Atelectasis"],
        next_step="Antibiotics.",
    ),
}
VERIFIED = {
    "Which condition fits best?": "Pneumothorax.",
    "Which finding explains the dyspnoea?": "pneumothorax",
    "What is seen in": "Consolidation",
    "Where is the consolidation?": REGION_BOX_1000,
    "Which image shows the opacity better?": "Answer: Image 2",
    "Which panel is the lateral view?": "B",
    "sudden breathlessness": "Pulmonary embolism",  # wrong: the dialogue of cxr-1 is unverified
    "Fever and cough for three days": "Pneumonia",
}
_OPTION_RE = re.compile(r"^([A-H])\. (.+)$", re.MULTILINE)


def teacher_answer(request: ScriptedRequest) -> str:
    text = request.last_user_text
    if VERIFY_SYSTEM in request.text:
        if "Options:" in text:  # multiple choice: the option that is the finding of the report
            options = {o.lower(): letter for letter, o in _OPTION_RE.findall(text)}
            return options.get("consolidation") or options["pneumothorax"]
        return next(answer for key, answer in VERIFIED.items() if key in text)
    if "give the answer away" in text:
        if "consolidation" in text.lower().split("answer (must not appear)")[0]:
            return _j(context="The X-ray shows consolidation.", question="What does the film show?")
        return _j(
            context="Sudden dyspnoea after a long flight.", question="Which finding explains the dyspnoea?"
        )
    word = "pneumothorax" if "pneumothorax" in text.lower() else "consolidation"
    return next(answer for (phrase, w), answer in GENERATED.items() if w == word and phrase in text)


def _samples(root: Path) -> dict[str, list[Sample]]:
    ds = open_dataset(root)
    return {split: list(ds.iter_samples(split)) for split in ds.splits}


def test_synth_end_to_end(tmp_path: Path) -> None:
    source = _source(tmp_path / "src")
    out = tmp_path / "out"
    store = tmp_path / "store"
    with ScriptedTeacher(teacher_answer) as teacher:
        args = [
            "synth",
            "--teacher",
            teacher.spec,
            "--in",
            str(source),
            "--out",
            str(out),
            "--store",
            str(store),
        ]
        result = runner.invoke(app, [*args, "--concurrency", "4", "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        stats = json.loads(result.stdout)
        requests = teacher.stats.requests

        assert stats["inputs"] == 3 and stats["accepted"] == 8 and stats["completed"]
        assert stats["rejected"] == {"invalid_json": 1, "leak": 1, "no_task": 1, "unverified": 1}
        assert stats["rejected_by_step"] == {"synth": 2, "refine": 1, "verify": 1}
        assert json.loads((out / "run_stats.json").read_text())["accepted"] == 8

        samples = _samples(out)
        ids = {split: [s.id for s in ss] for split, ss in samples.items()}
        assert ids["test"] == ["cxr-1/text_qa", "cxr-1/single_subimage", "cxr-1/mc_subimage"]
        assert ids["train"] == [
            "study-2/bbox_vqa",
            "study-2/multi_subimage",
            "study-2/mc_subimage",
            "study-2/compound_figure",
            "study-2/dialogue",
        ]
        rejected = {s.id: s.meta.extra["rejected"] for s in samples["rejected"]}
        assert {k: (v["reason"], v["step"]) for k, v in rejected.items()} == {
            "cxr-1/dialogue": ("unverified", "verify"),
            "study-2/text_qa": ("leak", "refine"),
            "study-2/single_subimage": ("invalid_json", "synth"),
            "empty": ("no_task", "synth"),
        }
        assert rejected["cxr-1/dialogue"]["detail"] == "token F1 0.00 < 0.50"
        assert rejected["study-2/text_qa"]["detail"] == "answer_in_context after 1 rewrite(s)"

        by_id = {s.id: s for ss in samples.values() for s in ss}
        for sid in ids["test"] + ids["train"]:
            annotation = by_id[sid].meta.extra["annotation"]
            assert set(annotation) == {"synth", "refine", "verify"}
            assert all(
                a["teacher"] == "openai:loopback" and len(a["prompt_hash"]) == 16 for a in annotation.values()
            )
            assert annotation["synth"]["time"] is not None and annotation["verify"]["time"] is not None
        rewritten = by_id["cxr-1/single_subimage"]
        assert record_of(rewritten).rewrites == 1
        assert (
            rewritten.turns[0].content
            == "Sudden dyspnoea after a long flight.\n\nWhich finding explains the dyspnoea?"
        )
        assert by_id["cxr-1/text_qa"].images == [] and by_id["cxr-1/text_qa"].task is TaskType.OPEN_VQA
        mc = by_id["study-2/mc_subimage"]
        assert mc.gold.options is not None and mc.gold.answer_index is not None
        assert mc.gold.options[mc.gold.answer_index] == "Consolidation" and len(mc.gold.options) == 4

        ds = open_dataset(out)
        figure = by_id["study-2/compound_figure"]
        assert len(figure.images) == 1 and figure.task is TaskType.CLOSED_VQA
        with ds.open_image(figure.images[0]) as image:
            assert image.size == (2 * 384 + 3 * 8, 384 + 2 * 8)
        bbox = by_id["study-2/bbox_vqa"]
        assert [ds.image_bytes(r) for r in bbox.images] == [
            open_dataset(source).image_bytes(r) for r in _samples(source)["train"][0].images
        ]
        if bbox.task is TaskType.GROUNDING:
            assert bbox.gold.boxes[0].as_tuple() == (20, 40, 100, 90)
            assert bbox.turns[1].content == "<ref>consolidation</ref><box image=1>[[20,40,100,90]]</box>"
        else:
            assert bbox.turns[0].content == "What is seen in <box image=1>[[20,40,100,90]]</box>?"
            assert bbox.gold.answer == "consolidation"

        # A second run into a new folder with the same store asks the teacher nothing and writes the same.
        again = tmp_path / "again"
        args2 = [
            "synth",
            "--teacher",
            teacher.spec,
            "--in",
            str(source),
            "--out",
            str(again),
            "--store",
            str(store),
        ]
        result = runner.invoke(app, [*args2, "--quiet"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "8 accepted, 4 rejected" in result.stdout
        assert teacher.stats.requests == requests
        assert _samples(again) == samples


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "text_qa,nope"], "--tasks: unknown synth task 'nope'"),
        (["--backend", "spark"], "--backend: expected local or ray"),
    ],
)
def test_synth_bad_options(tmp_path: Path, extra: list[str], message: str) -> None:
    source = _source(tmp_path / "src")
    args = [
        "synth",
        "--teacher",
        "openai:http://127.0.0.1:9/v1#m",
        "--in",
        str(source),
        "--out",
        str(tmp_path / "o"),
    ]
    result = runner.invoke(app, [*args, *extra])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "o").exists()


def test_synth_missing_input_is_one_line(tmp_path: Path) -> None:
    args = [
        "synth",
        "--teacher",
        "openai:http://127.0.0.1:9/v1#m",
        "--in",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "o"),
    ]
    result = runner.invoke(app, args)
    assert (
        result.exit_code == 2
        and result.output.startswith("error: ")
        and len(result.output.strip().splitlines()) == 1
    )
