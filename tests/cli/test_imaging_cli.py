"""End-to-end tests of `emma info` and `emma convert` on real package-carried files."""

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from emma.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def make_series(folder: Path, n: int = 6, prefix: str = "img") -> list[Path]:
    """A shuffled-name axial CT series built from the real CT_small slice, 5 mm apart."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = generate_uid()
    paths = []
    for k in range(n):
        ds = base.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-50.0, -50.0, 5.0 * k]
        ds.InstanceNumber = n - k  # lies about the order on purpose
        path = folder / f"{prefix}_{(k * 7) % n:02d}_{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_info_json_lists_phi_fields_by_name_only() -> None:
    path = get_testdata_file("CT_small.dcm")
    name = str(pydicom.dcmread(path).PatientName)
    result = run("info", path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format"] == "dicom" and info["modality"] == "CT"
    assert info["rows"] == 128 and info["columns"] == 128
    assert "PatientName" in info["phi_fields"]
    assert name not in result.output


def test_info_table_on_a_series_folder(tmp_path: Path) -> None:
    make_series(tmp_path / "s", n=4)
    result = run("info", tmp_path / "s", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["series_count"] == 1
    assert run("info", tmp_path / "s").exit_code == 0


def test_convert_chest_radiograph_to_png_with_provenance(tmp_path: Path) -> None:
    out = tmp_path / "cxr.png"
    result = run("convert", get_testdata_file("RG1_UNCI.dcm"), "-o", out)
    assert result.exit_code == 0, result.output
    img = Image.open(out)
    assert img.mode == "RGB" and img.size == (1841, 1955)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    ops = [s["op"] for s in sidecar["images"][0]["provenance"]["steps"]]
    assert "invert" in ops  # MONOCHROME1
    assert ops.index("invert") > next(i for i, op in enumerate(ops) if op == "voi")


def test_convert_with_preset_changes_pixels(tmp_path: Path) -> None:
    src = get_testdata_file("CT_small.dcm")
    assert run("convert", src, "-o", tmp_path / "a.png").exit_code == 0
    assert run("convert", src, "-o", tmp_path / "b.png", "--window", "bone").exit_code == 0
    a = np.asarray(Image.open(tmp_path / "a.png"))
    b = np.asarray(Image.open(tmp_path / "b.png"))
    assert a.shape == b.shape and not np.array_equal(a, b)
    voi = json.loads((tmp_path / "b.json").read_text())["images"][0]["provenance"]["steps"]
    assert any(s["op"] == "voi" and "bone" in json.dumps(s["params"]) for s in voi)


def test_convert_series_folder_samples_slices(tmp_path: Path) -> None:
    make_series(tmp_path / "series", n=6)
    out = tmp_path / "out"
    result = run("convert", tmp_path / "series", "-o", out, "--slices", "3", "--window", "abdomen")
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    sidecar = json.loads(next(out.glob("*.json")).read_text())
    assert [im["provenance"]["plane"] for im in sidecar["images"]] == ["axial"] * 3


def test_convert_nifti(tmp_path: Path) -> None:
    from nibabel.testing import data_path

    src = Path(data_path) / "anatomical.nii"
    result = run("convert", src, "-o", tmp_path / "n", "--plane", "coronal", "--slices", "2")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "n").glob("*.png"))) == 2


@pytest.mark.parametrize(
    "make_bad",
    [
        lambda p: p.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage"),
        lambda p: p.write_bytes(Path(get_testdata_file("MR_truncated.dcm")).read_bytes()),
        lambda p: p.write_bytes(Path(get_testdata_file("rtplan.dcm")).read_bytes()),
    ],
    ids=["corrupt", "truncated", "no-pixels"],
)
def test_bad_input_gives_one_line_and_no_output(tmp_path: Path, make_bad) -> None:
    src = tmp_path / "bad.dcm"
    make_bad(src)
    out = tmp_path / "out.png"
    result = run("convert", src, "-o", out)
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".out*"))


def test_mixed_series_folder_is_a_clear_error(tmp_path: Path) -> None:
    make_series(tmp_path / "mixed", n=3, prefix="a")
    make_series(tmp_path / "mixed", n=3, prefix="b")
    result = run("convert", tmp_path / "mixed", "-o", tmp_path / "o")
    assert result.exit_code == 2 and "series" in result.output.lower()
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_bad_window_and_missing_file(tmp_path: Path) -> None:
    src = get_testdata_file("CT_small.dcm")
    assert run("convert", src, "-o", tmp_path / "x.png", "--window", "nope").exit_code == 2
    result = run("info", tmp_path / "missing.dcm")
    assert result.exit_code == 2 and "no such file" in result.output


@pytest.mark.parametrize("name", ["CT_small.dcm", "RG1_UNCI.dcm"])
def test_info_reports_pixel_data_and_refuses_a_file_cut_inside_them(tmp_path: Path, name: str) -> None:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed")
    result = run("info", path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["has_pixel_data"] is True
    data = Path(path).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 1000])  # inside PixelData, the last element
    result = run("info", cut)
    assert result.exit_code == 2 and "truncated" in result.output, result.output


def make_two_series(folder: Path) -> None:
    """Two real CT_small series in one folder: series number 7 with 3 slices, 4 with 5 slices."""
    for prefix, n, number in (("a", 3, 7), ("b", 5, 4)):
        for path in make_series(folder, n=n, prefix=prefix):
            ds = pydicom.dcmread(path)
            ds.SeriesNumber = number
            ds.save_as(path, enforce_file_format=True)


def test_a_folder_of_several_series_is_listed_by_index_and_chosen_with_series(tmp_path: Path) -> None:
    make_two_series(tmp_path / "mixed")
    uids = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
        for p in (tmp_path / "mixed").iterdir()
    }
    info = run("info", tmp_path / "mixed", "--json")
    assert info.exit_code == 0, info.output
    listed = json.loads(info.output)["series"]
    assert [(s["index"], s["series_number"], s["files"]) for s in listed] == [(1, 4, 5), (2, 7, 3)]
    assert listed[0]["description"] == "CT series 4, axial, 5 files of 128x128"

    refused = run("convert", tmp_path / "mixed", "-o", tmp_path / "o")
    assert refused.exit_code == 2
    assert "1: CT series 4, axial, 5 files" in refused.output and "--series N" in refused.output
    for text in (info.output, refused.output):
        assert not any(uid[-8:] in text for uid in uids)  # no UID, nor the tail of one

    chosen = run("convert", tmp_path / "mixed", "-o", tmp_path / "o", "--series", "2", "--slices", "8")
    assert chosen.exit_code == 0, chosen.output
    assert len(list((tmp_path / "o").glob("*.png"))) == 3  # series 2 has 3 slices
    one = json.loads(run("info", tmp_path / "mixed", "--series", "1", "--json").output)
    assert [s["index"] for s in one["series"]] == [1]
    assert run("convert", tmp_path / "mixed", "-o", tmp_path / "p", "--series", "3").exit_code == 2
    not_a_folder = run("info", get_testdata_file("CT_small.dcm"), "--series", "1")
    assert not_a_folder.exit_code == 2 and "--series" in not_a_folder.output


def test_a_symbolic_link_loop_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for args in (("info", tmp_path / "a"), ("convert", tmp_path / "a", "-o", tmp_path / "x.png")):
        result = run(*args)
        assert result.exit_code == 2
        assert "symbolic link loop" in result.output and "no such file" not in result.output
