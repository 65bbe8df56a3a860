"""CheXpert, PadChest and ChestX-ray14 importers on releases built from the real label files of
torchxrayvision (see tests/cxr_releases.py): headers, value conventions, splits by patient."""

from __future__ import annotations

import ast
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from cxr_releases import (
    PADCHEST_CSV,
    chestxray14_release,
    chexpert_release,
    iter_rows,
    padchest_release,
)
from typer.testing import CliRunner

from emma.cli import app
from emma.data.schema import TaskType
from emma.data.sources import get_importer, run_importer
from emma.data.sources.chestxray14 import FINDINGS as NIH_FINDINGS
from emma.data.sources.chexpert import OBSERVATIONS
from emma.data.sources.padchest import DIAGNOSES, FREQUENT_FINDINGS, NON_FINDINGS
from emma.data.split import check_leakage
from emma.data.store import open_dataset
from emma.errors import DataFormatError


def by_id(out: Path) -> dict[str, object]:
    return {s.id: s for s in open_dataset(out)}


def assert_patients_disjoint(out: Path) -> None:
    report = check_leakage(out)
    for pair in report.pairs:
        assert pair.patient_overlap == 0, (pair.earlier, pair.later)
        assert pair.exact_image_overlap == 0
    patients: dict[str, set[str]] = defaultdict(set)
    for s in open_dataset(out):
        patients[s.meta.patient_key].add(s.meta.split)
    assert all(len(splits) == 1 for splits in patients.values())


# ------------------------------------------------------------------------------------------ CheXpert


def _chexpert_raw(value: str) -> float | None:
    return float(value) if value.strip() else None


@pytest.mark.parametrize("policy", ["u-ignore", "u-zeros", "u-ones"])
def test_chexpert_labels_follow_the_uncertainty_policy(tmp_path: Path, policy: str) -> None:
    src, rows = chexpert_release(tmp_path)
    out = tmp_path / "out"
    report = run_importer("chexpert", src, out, uncertainty=policy)
    samples = by_id(out)
    assert report.written == len(rows) == len(samples)
    assert report.by_split == {
        "train": sum(r["_split"] == "train" for r in rows),
        "validation": sum(r["_split"] == "validation" for r in rows),
    }
    n_uncertain = 0
    for r in rows:
        sid = r["Path"].split("/", 1)[1].rsplit(".", 1)[0]
        s = samples[sid]
        assert s.task is TaskType.CLASSIFICATION and s.meta.split == r["_split"]
        for name in OBSERVATIONS:
            raw = _chexpert_raw(r[name])
            if raw == -1.0:
                n_uncertain += 1
                expected = {"u-ignore": None, "u-zeros": 0, "u-ones": 1}[policy]
            else:
                expected = 1 if raw == 1.0 else 0  # blank = not mentioned = 0
            assert s.gold.labels.get(name) == expected, (sid, name, r[name])
            assert s.meta.extra["raw_labels"][name] == (None if raw is None else int(raw))
        assert s.meta.extra["view"] == r["Frontal/Lateral"].lower()
        assert s.meta.extra["projection"] == (r["AP/PA"] or None)
        assert set(s.meta.findings) == {
            f for f in OBSERVATIONS if s.gold.labels.get(f) == 1 and f != "No Finding"
        }
        assert s.turns[1].content == s.gold.answer
    assert n_uncertain > 20  # the real file's -1 convention is exercised
    assert_patients_disjoint(out)


def test_chexpert_answer_text_and_pseudonymous_keys(tmp_path: Path) -> None:
    src, _rows = chexpert_release(tmp_path, n_train=60, n_valid=0)
    out = tmp_path / "out"
    run_importer("chexpert", src, out)
    samples = by_id(out)
    first = samples["train/patient00001/study1/view1_frontal"]
    # real row 1: No Finding 1, Pneumothorax 0, Support Devices 1
    assert first.gold.answer == "Support devices."
    assert first.gold.labels["No Finding"] == 1 and first.gold.labels["Pneumothorax"] == 0
    two = [s for s in samples.values() if s.id.startswith("train/patient00002/")]
    assert len({s.meta.patient_key for s in two}) == 1 and len({s.meta.study_key for s in two}) == 2
    for s in samples.values():
        assert "patient" not in (s.meta.patient_key or "") and len(s.meta.patient_key or "") == 16
    uncertain = next(s for s in samples.values() if s.meta.extra["uncertain"])
    assert "Uncertain: " in uncertain.gold.answer


def test_chexpert_counts_missing_images_and_refuses_a_bad_layout(tmp_path: Path) -> None:
    src, rows = chexpert_release(tmp_path, n_train=30, n_valid=0)
    (src / rows[3]["Path"].split("/", 1)[1]).unlink()
    report = run_importer("chexpert", src, tmp_path / "out")
    assert report.written == 29 and report.skipped == {"missing_image": 1}
    with pytest.raises(DataFormatError, match="uncertainty policy"):
        run_importer("chexpert", src, tmp_path / "out2", uncertainty="u-maybe")
    (src / "train.csv").write_text("Path,Sex\nx.jpg,Female\n")
    (src / "valid.csv").unlink()
    with pytest.raises(DataFormatError, match="missing column"):
        run_importer("chexpert", src, tmp_path / "out3")
    with pytest.raises(DataFormatError, match="neither train.csv"):
        run_importer("chexpert", tmp_path, tmp_path / "out4")


def test_chexpert_import_resumes_without_duplicates(tmp_path: Path) -> None:
    src, _rows = chexpert_release(tmp_path, n_train=40, n_valid=0)
    out = tmp_path / "out"
    first = run_importer("chexpert", src, out, limit=15)
    assert first.written == 15 and first.limited
    again = run_importer("chexpert", src, out, resume=True)
    assert (again.resumed, again.written) == (15, 25)
    assert len(by_id(out)) == 40


def test_limited_means_a_record_was_left_unread(tmp_path: Path) -> None:
    """One definition for every importer (CheXpert's loop once also said ``limited`` when the limit
    fell on the very last record): ``limited`` only when the limit left a record unread."""
    src, rows = chexpert_release(tmp_path, n_train=10, n_valid=10)
    n_train = sum(r["_split"] == "train" for r in rows)
    assert 0 < n_train < len(rows)
    exact = run_importer("chexpert", src, tmp_path / "exact", limit=len(rows))
    assert exact.written == len(rows) and not exact.limited
    first_table = run_importer("chexpert", src, tmp_path / "train-only", limit=n_train)
    assert first_table.written == n_train and first_table.limited


def test_cli_imports_chexpert_with_a_policy(tmp_path: Path) -> None:
    src, _rows = chexpert_release(tmp_path, n_train=40, n_valid=0)
    runner = CliRunner()
    args = ["data", "import", "chexpert", "--src", str(src), "--out", str(tmp_path / "o"), "--json"]
    result = runner.invoke(app, [*args, "--uncertainty", "u-ones"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["written"] == 40
    samples = by_id(tmp_path / "o")
    assert all(s.meta.extra["uncertainty_policy"] == "u-ones" for s in samples.values())
    bad = runner.invoke(
        app,
        [
            "data",
            "import",
            "padchest",
            "--src",
            str(src),
            "--out",
            str(tmp_path / "p"),
            "--uncertainty",
            "u-ones",
        ],
    )
    assert bad.exit_code == 2 and "--uncertainty does not apply to 'padchest'" in bad.output


# ------------------------------------------------------------------------------------------ PadChest


def test_padchest_list_labels_projections_and_16bit_images(tmp_path: Path) -> None:
    src, rows = padchest_release(tmp_path)
    out = tmp_path / "out"
    report = run_importer("padchest", src, out)
    samples = by_id(out)
    written = 0
    excluded = invalid = 0
    for r in rows:
        sid = r["ImageID"].rsplit(".", 1)[0]
        try:
            labels = [x.strip() for x in ast.literal_eval(r["Labels"]) if x.strip()]
        except (ValueError, SyntaxError):
            labels = []
        if not labels:
            invalid += 1
            assert sid not in samples
            continue
        if "exclude" in labels:
            excluded += 1
            assert sid not in samples
            continue
        written += 1
        s = samples[sid]
        assert {k for k, v in s.gold.labels.items() if v == 1} == set(labels)
        assert {k for k, v in s.gold.labels.items() if v == 0} == set(FREQUENT_FINDINGS) - set(labels)
        assert s.meta.findings == [x for x in dict.fromkeys(labels) if x not in NON_FINDINGS]
        assert s.meta.extra["projection"] == r["Projection"]
        assert s.meta.extra["view"] == {
            "PA": "frontal",
            "AP": "frontal",
            "AP_horizontal": "frontal",
            "L": "lateral",
        }.get(r["Projection"])
        assert s.meta.extra["label_method"] == r["MethodLabel"]
    assert report.written == written and report.filtered.get("excluded", 0) == excluded
    assert report.skipped.get("invalid_record", 0) == invalid
    assert set(report.by_split) <= {"train", "validation", "test"} and len(report.by_split) >= 2
    assert_patients_disjoint(out)
    # 16-bit PNGs went through the one preprocessing path: windowed, not clipped to white
    ds = open_dataset(out)
    s = next(iter(samples.values()))
    ref = s.images[0]
    assert ref.provenance is not None and ref.provenance.source.startswith("padchest:")
    assert any(step.op == "voi" for step in ref.provenance.steps)
    pixels = np.asarray(ds.open_image(ref).convert("L"))
    assert pixels.std() > 20 and (pixels == 255).mean() < 0.5


def test_padchest_parses_spaces_and_empty_entries() -> None:
    from emma.data.sources.padchest import parse_labels

    assert parse_labels("['cardiomegaly', ' pleural effusion', '', 'cardiomegaly']") == [
        "cardiomegaly",
        "pleural effusion",
    ]
    assert parse_labels("['']") == [] and parse_labels("nan") is None and parse_labels("[1, 2]") is None
    assert parse_labels("__import__('os')") is None


def test_padchest_frequent_findings_are_the_published_counts() -> None:
    """FREQUENT_FINDINGS = the 12 most frequent physician-labelled radiographic findings (real CSV)."""
    counts: dict[str, int] = defaultdict(int)
    for header, row in iter_rows(PADCHEST_CSV):
        rec = dict(zip(header, row))
        if rec["MethodLabel"] != "Physician" or not rec["Labels"].startswith("["):
            continue
        for label in {x.strip() for x in ast.literal_eval(rec["Labels"]) if x.strip()}:
            counts[label] += 1
    ranked = [
        k for k, _ in sorted(counts.items(), key=lambda kv: -kv[1]) if k not in NON_FINDINGS | DIAGNOSES
    ]
    assert tuple(ranked[:12]) == FREQUENT_FINDINGS


# ------------------------------------------------------------------------------------- ChestX-ray14


def test_chestxray14_labels_and_official_lists(tmp_path: Path) -> None:
    src, rows = chestxray14_release(tmp_path)
    out = tmp_path / "out"
    report = run_importer("chestxray14", src, out)
    samples = by_id(out)
    assert report.filtered == {"not_in_official_lists": 1} and report.written == len(rows) - 1
    saw_multi = saw_none = False
    for r in rows[:-1]:
        s = samples[r["Image Index"].rsplit(".", 1)[0]]
        labels = r["Finding Labels"].split("|")
        saw_multi |= len(labels) > 1
        saw_none |= labels == ["No Finding"]
        positives = set() if labels == ["No Finding"] else set(labels)
        assert s.gold.labels == {f: int(f in positives) for f in NIH_FINDINGS}
        if int(r["Patient ID"]) % 2:
            assert s.meta.split == "test"
        else:
            assert s.meta.split in ("train", "validation")
        assert s.meta.extra["projection"] == r["View Position"] and s.meta.extra["view"] == "frontal"
    assert saw_multi and saw_none
    assert {"train", "test"} <= set(report.by_split)
    assert_patients_disjoint(out)


def test_chestxray14_without_lists_splits_by_patient(tmp_path: Path) -> None:
    src, _rows = chestxray14_release(tmp_path, n=120, lists=False)
    report = run_importer("chestxray14", src, tmp_path / "out")
    assert report.written == 120 and any("not found" in n for n in report.notes)
    assert_patients_disjoint(tmp_path / "out")


def test_importers_are_registered() -> None:
    for name in ("chexpert", "padchest", "chestxray14", "ChestX-ray14", "nih_chestxray14"):
        assert get_importer(name).fn.__name__.startswith("import_")
