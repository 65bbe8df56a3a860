"""Siemens mosaic: un-tiling, geometry, and agreement with dcm2niix's conversion of real data."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from emma.errors import SeriesError
from emma.io.mosaic import LPS_TO_RAS, is_mosaic, mosaic_geometry, unmosaic
from emma.io.volume import load_series, sample_slices, series_summary

NIBABEL_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"
QA = Path(__file__).resolve().parents[3] / "shared" / "data" / "dcm-qa-orientation"
QA_CASES = {"axasc35": "ax_asc_35sl_6", "corasc35": "cor_asc_35sl_16", "sagasc35": "sag_asc_35sl_22"}
QA_LABELS = {"axasc35": "axial", "corasc35": "coronal", "sagasc35": "sagittal"}


def _qa_root() -> Path:
    if (QA / "dicom").is_dir() and (QA / "reference").is_dir():
        return QA
    pytest.skip("dcm-qa-orientation data not present")


def _nibabel_wrapper(ds: pydicom.Dataset):  # noqa: ANN202 - nibabel's own mosaic reader, as an oracle
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import dicomwrappers

        return dicomwrappers.wrapper_from_data(ds)


def test_unmosaic_tile_order() -> None:
    geom_header = pydicom.dcmread(NIBABEL_DATA / "csa_slice_norm.dcm", stop_before_pixels=True)
    geom = mosaic_geometry(geom_header)
    assert (geom.n_images, geom.tiles_per_side, geom.tile_rows, geom.tile_cols) == (32, 6, 64, 64)
    tiles = np.arange(36, dtype=np.float32)  # tile k filled with k (32 real slices, 4 padding tiles)
    image = np.repeat(np.repeat(tiles.reshape(6, 6), 64, axis=0), 64, axis=1)
    image[5, 7] = -1.0  # row 5, column 7 of tile 0
    image[64 + 3, 2 * 64 + 9] = -2.0  # row 3, column 9 of tile 8 (second tile row, third column)
    vol = unmosaic(image, geom)
    assert vol.shape == (64, 64, 32)
    for k in range(32):
        values = set(np.unique(vol[:, :, k]))
        assert k in values
    assert vol[7, 5, 0] == -1.0 and vol[9, 3, 8] == -2.0
    with pytest.raises(SeriesError):
        unmosaic(image[:-1], geom)


def test_geometry_matches_nibabel_wrapper() -> None:
    ds = pydicom.dcmread(NIBABEL_DATA / "csa_slice_norm.dcm", stop_before_pixels=True)
    assert is_mosaic(ds)
    geom = mosaic_geometry(ds)
    assert geom.normal_from_csa
    wrapper = _nibabel_wrapper(ds)
    # nibabel's wrapper maps (row, column, slice) to LPS; ours maps (column, row, slice) to RAS
    ours_lps = LPS_TO_RAS @ geom.affine()
    np.testing.assert_allclose(ours_lps[:, [1, 0, 2, 3]], wrapper.affine, atol=1e-5)
    # the mosaic correction moves the stored corner by half of (mosaic - tile) pixels along rows and columns
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    ps = [float(v) for v in ds.PixelSpacing]
    expected = ipp + iop[:3] * ps[1] * (384 - 64) / 2 + iop[3:] * ps[0] * (384 - 64) / 2
    np.testing.assert_allclose(geom.first_position, expected, atol=1e-6)


def test_not_a_mosaic() -> None:
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    assert not is_mosaic(ds)
    with pytest.raises(SeriesError):
        mosaic_geometry(ds)


@pytest.mark.parametrize("case", sorted(QA_CASES))
def test_matches_dcm2niix_reference(case: str) -> None:
    root = _qa_root()
    ref = nib.as_closest_canonical(nib.load(root / "reference" / f"{QA_CASES[case]}.nii"))
    ref_data = np.asarray(ref.dataobj)  # raw stored int16 (no scaling in the reference)
    for t in (0, 1):
        vol = load_series(root / "dicom" / case, time_index=t)
        assert vol.modality == "MR" and vol.data.shape == (64, 64, 35)
        canon = vol.canonical()
        assert canon.data.shape == ref_data.shape[:3]
        np.testing.assert_array_equal(canon.data, ref_data[..., t].astype(np.float32))
        np.testing.assert_allclose(canon.affine, ref.affine, atol=1e-3)
        assert vol.geometry.orientation == QA_LABELS[case]
        assert f"time point {t} of 2" in vol.geometry.notes[-1]
    with pytest.raises(SeriesError, match="time_index"):
        load_series(root / "dicom" / case, time_index=2)


def test_single_mosaic_file_and_images(tmp_path: Path) -> None:
    root = _qa_root()
    first = sorted((root / "dicom" / "axasc35").iterdir())[0]
    local = tmp_path / "one.dcm"
    shutil.copyfile(first, local)  # a temporary copy outside the repository
    vol = load_series([local])
    assert vol.data.shape == (64, 64, 35) and vol.spacing[2] == pytest.approx(3.6, abs=1e-4)
    assert [s.op for s in vol.steps] == ["modality_lut", "unmosaic"]
    images = sample_slices(vol, plane="sagittal", n=2)
    assert len(images) == 2
    # 64 slices of 3.25 mm wide, 35 x 3.6 mm tall, resampled to square 3.25 mm pixels
    assert images[0].pixels.shape == (round(35 * 3.6 / 3.25), 64, 3)
    assert images[0].provenance.steps[1].op == "unmosaic"


def test_series_summary_of_mosaics() -> None:
    root = _qa_root()
    for case, label in QA_LABELS.items():
        (entry,) = series_summary(root / "dicom" / case)
        assert entry["mosaic"] and entry["files"] == 2 and entry["modality"] == "MR"
        assert (entry["rows"], entry["columns"], entry["n_slices"]) == (64, 64, 35)
        assert entry["orientation"] == label
        json.dumps(entry)
