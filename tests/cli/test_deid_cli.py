"""End-to-end tests of `emma deid IN OUT` through the typer app."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from emma.cli import app
from emma.io.deid import DeidConfig, remap_uid

runner = CliRunner()

NAME = "Vexbridge^Ottoline"
PATIENT_ID = "PID-55501-VX"
BIRTH = "19580214"
PHI = [NAME, "Vexbridge", PATIENT_ID, BIRTH]


def run(*args: object, env: dict[str, str] | None = None):
    base = {"EMMA_DEID_KEY": ""}  # never pick up a key from the calling environment
    return runner.invoke(app, [str(a) for a in args], env={**base, **(env or {})})


def assert_clean(result) -> None:
    text = result.output + (result.stderr or "")
    for value in PHI:
        assert value not in text
    assert "Traceback" not in text


def make_inputs(folder: Path) -> Path:
    """Three slices of one study built from the real CT_small file, with planted PHI, plus a text file."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base.PatientName = NAME
    base.PatientID = PATIENT_ID
    base.PatientBirthDate = BIRTH
    study, series = generate_uid(), generate_uid()
    for k in range(3):
        ds = base.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        ds.save_as(folder / f"{NAME.replace('^', '_')}_{k}.dcm", enforce_file_format=True)
    (folder / "notes.txt").write_text("not a DICOM file")
    return folder


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.dcm"))}


def test_key_file_is_created_private_and_makes_runs_reproducible(tmp_path: Path) -> None:
    src = make_inputs(tmp_path / "in")
    key_file = tmp_path / "secrets" / "deid.key"
    first = run("deid", src, tmp_path / "out1", "--key-file", key_file)
    assert first.exit_code == 0, first.output
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_bytes().strip()
    assert len(key) >= 32 and key.decode() not in first.output + first.stderr  # the key is never printed
    assert "written" in first.stdout and "3" in first.stdout
    assert "created key file" in first.stderr
    assert_clean(first)

    second = run("deid", src, tmp_path / "out2", "--key-file", key_file)
    assert second.exit_code == 0
    assert "created key file" not in second.stderr
    a, b = outputs(tmp_path / "out1"), outputs(tmp_path / "out2")
    assert len(a) == 3 and a == b  # same names, same bytes

    # the outputs are keyed by exactly that key
    original = pydicom.dcmread(sorted(src.glob("*.dcm"))[0])
    expected_study = remap_uid(DeidConfig(key=key).key, original.StudyInstanceUID)
    assert all(name.startswith(expected_study + "/") for name in a)
    for name, raw in a.items():
        for value in PHI:
            assert value.encode() not in raw
        back = pydicom.dcmread(tmp_path / "out1" / name)
        assert back.PatientIdentityRemoved == "YES"
        assert np.array_equal(back.pixel_array, original.pixel_array)


def test_env_key_is_reproducible_and_no_key_warns(tmp_path: Path) -> None:
    src = make_inputs(tmp_path / "in")
    env = {"EMMA_DEID_KEY": "an-environment-key-of-enough-length"}
    r1 = run("deid", src, tmp_path / "e1", env=env)
    r2 = run("deid", src, tmp_path / "e2", env=env)
    assert r1.exit_code == r2.exit_code == 0
    assert outputs(tmp_path / "e1") == outputs(tmp_path / "e2")
    assert "one-off random key" not in r1.stderr

    r3 = run("deid", src, tmp_path / "r1")
    r4 = run("deid", src, tmp_path / "r2")
    assert r3.exit_code == r4.exit_code == 0
    assert "one-off random key" in r3.stderr
    assert set(outputs(tmp_path / "r1")).isdisjoint(outputs(tmp_path / "r2"))  # fresh UIDs each run
    assert_clean(r3)


def test_json_report(tmp_path: Path) -> None:
    src = make_inputs(tmp_path / "in")
    result = run("deid", src, tmp_path / "out", "--json", env={"EMMA_DEID_KEY": "x" * 32})
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["written"] == 3 and report["skipped_non_dicom"] == 1 and report["failed"] == []
    assert report["actions"]["private_removed"] > 0 and report["actions"]["uids_remapped"] >= 3
    assert len(report["outputs"]) == 3 and all(name.endswith(".dcm") for name in report["outputs"])
    assert_clean(result)


def test_options_are_applied(tmp_path: Path) -> None:
    src = make_inputs(tmp_path / "in")
    result = run(
        "deid", src, tmp_path / "out", "--keep-descriptions", "--keep-patient-characteristics",
        "--shift-times", "--layout", "mirror", env={"EMMA_DEID_KEY": "y" * 32},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "out").glob("*.dcm"))  # mirror layout: flat like the input
    assert len(files) == 3
    back = pydicom.dcmread(files[0])
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert back.StudyDescription == original.StudyDescription
    assert back.PatientSex == original.PatientSex
    assert [i.CodeValue for i in back.DeidentificationMethodCodeSequence] == ["113100", "113107", "113108"]
    assert "Times shifted per patient" in list(back.DeidentificationMethod)


def test_corrupt_file_gives_partial_exit_and_summary(tmp_path: Path) -> None:
    src = make_inputs(tmp_path / "in")
    good = sorted(src.glob("*.dcm"))[0].read_bytes()
    (src / "broken.dcm").write_bytes(good[:-200])
    result = run("deid", src, tmp_path / "out", env={"EMMA_DEID_KEY": "z" * 32})
    assert result.exit_code == 1
    assert "failed: broken.dcm" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "error: 1 file(s) could not be de-identified"
    assert len(outputs(tmp_path / "out")) == 3
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.suffix != ".dcm"]
    assert_clean(result)


@pytest.mark.parametrize(
    "case",
    ["missing input", "not dicom", "corrupt single file", "short env key", "short key file", "key in out",
     "bad layout"],
)  # fmt: skip
def test_bad_input_gives_one_line_error_and_exit_2(tmp_path: Path, case: str) -> None:
    src = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    env = {"EMMA_DEID_KEY": "k" * 32}
    args: list[object] = ["deid", src, out]
    if case == "missing input":
        args = ["deid", tmp_path / "nope", out]
    elif case == "not dicom":
        args = ["deid", src / "notes.txt", out]
    elif case == "corrupt single file":
        broken = tmp_path / "broken.dcm"
        broken.write_bytes(sorted(src.glob("*.dcm"))[0].read_bytes()[:-200])
        args = ["deid", broken, tmp_path / "single.dcm"]
    elif case == "short env key":
        env = {"EMMA_DEID_KEY": "short"}
    elif case == "short key file":
        (tmp_path / "k").write_text("abc")
        args += ["--key-file", tmp_path / "k"]
    elif case == "key in out":
        args += ["--key-file", out / "deid.key"]
    elif case == "bad layout":
        args += ["--layout", "flat"]
    result = run(*args, env=env)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert_clean(result)
    if case == "corrupt single file":
        assert not (tmp_path / "single.dcm").exists()
    if case == "key in out":
        assert not (out / "deid.key").exists()


@pytest.mark.parametrize("case", ["file in the way", "read-only folder"])
def test_an_unwritable_output_is_blamed_not_the_input(tmp_path: Path, case: str) -> None:
    src = sorted(make_inputs(tmp_path / "in").glob("*.dcm"))[0]
    if case == "file in the way":
        (tmp_path / "ro").write_text("a file, not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
    out = tmp_path / "ro" / "x.dcm"
    result = run("deid", src, out, env={"EMMA_DEID_KEY": "k" * 32})
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {out}: cannot write the output"), line
    assert src.name not in line
    assert_clean(result)


def test_retain_safe_private_keeps_a_siemens_mosaic_loadable(tmp_path: Path) -> None:
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    series = shared / "dcm-qa-orientation" / "dicom" / "axasc35"
    if not series.is_dir():
        pytest.skip("dcm-qa-orientation Siemens mosaics not present")
    env = {"EMMA_DEID_KEY": "k" * 32}
    plain = run("deid", series, tmp_path / "plain", env=env)
    assert plain.exit_code == 0 and "Siemens mosaic lost its CSA image header" in plain.stdout
    assert run("info", tmp_path / "plain", "--json").stdout.count('"error"') == 1
    kept = run("deid", series, tmp_path / "kept", "--retain-safe-private", "--json", env=env)
    assert kept.exit_code == 0, kept.output
    assert json.loads(kept.stdout)["warnings"] == []
    info = json.loads(run("info", tmp_path / "kept", "--json").stdout)
    assert info["series"][0]["n_slices"] == 35 and "error" not in info["series"][0]
