"""NIfTI → Volume: canonical RAS+, scaling, 4D selection, bounds and corrupt files."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from emma.errors import CorruptFileError, ImageTooLargeError, SeriesError
from emma.io.limits import Limits
from emma.io.nifti import load_nifti
from emma.io.volume import sample_slices
from emma.io.windows import Window

EXAMPLE_4D = os.path.join(data_path, "example4d.nii.gz")
ANATOMICAL = os.path.join(data_path, "anatomical.nii")


def canonical_reference(path: str) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.load(path))


def test_packaged_4d_first_and_chosen_volume() -> None:
    ref = canonical_reference(EXAMPLE_4D)
    ref_data = ref.get_fdata()
    vol = load_nifti(EXAMPLE_4D)
    assert vol.data.dtype == np.float32 and vol.data.shape == (128, 96, 24)
    np.testing.assert_array_equal(vol.data, ref_data[..., 0].astype(np.float32))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, ref.header.get_zooms()[:3], atol=1e-5)
    assert vol.axcodes() == "RAS" and vol.format == "nifti" and vol.header is None
    assert "volume 0 of 2" in vol.geometry.notes[0]
    assert vol.steps[0].op == "select_volume" and vol.steps[0].params == {"index": 0, "of": 2}
    # the file's affine is oblique (about 9.3 degrees about x)
    assert vol.geometry.oblique and vol.geometry.oblique_degrees == pytest.approx(9.3, abs=0.1)

    second = load_nifti(EXAMPLE_4D, volume_index=1)
    np.testing.assert_array_equal(second.data, ref_data[..., 1].astype(np.float32))
    assert not np.array_equal(second.data, vol.data)
    with pytest.raises(SeriesError, match="volume_index"):
        load_nifti(EXAMPLE_4D, volume_index=2)


def test_packaged_3d_matches_nibabel_canonical() -> None:
    ref = canonical_reference(ANATOMICAL)
    vol = load_nifti(ANATOMICAL)
    np.testing.assert_array_equal(vol.data, ref.get_fdata().astype(np.float32))
    np.testing.assert_allclose(vol.affine, ref.affine)
    assert vol.geometry.ok and vol.geometry.n_slices == ref.shape[2]


def test_synthetic_lps_affine_is_made_canonical(tmp_path: Path) -> None:
    data = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    affine = np.array(
        [
            [-2.0, 0.0, 0.0, 10.0],
            [0.0, -3.0, 0.0, 20.0],
            [0.0, 0.0, 4.0, -5.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "lps.nii")
    vol = load_nifti(tmp_path / "lps.nii")
    np.testing.assert_array_equal(vol.data, data[::-1, ::-1, :])
    # the first canonical voxel is the old voxel (3, 2, 0): world (10 - 6, 20 - 6, -5)
    expected = np.array(
        [
            [2.0, 0.0, 0.0, 4.0],
            [0.0, 3.0, 0.0, 14.0],
            [0.0, 0.0, 4.0, -5.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    np.testing.assert_allclose(vol.affine, expected)
    assert vol.spacing == (2.0, 3.0, 4.0)
    # every value sits at the same world position before and after
    for ijk in [(0, 0, 0), (3, 1, 1), (2, 2, 0)]:
        value = data[ijk]
        world = affine @ [*ijk, 1]
        new_ijk = np.rint(np.linalg.inv(vol.affine) @ world).astype(int)[:3]
        assert vol.data[tuple(new_ijk)] == value


def _patch_scaling(path: Path, slope: float, inter: float) -> None:
    raw = bytearray(path.read_bytes())
    raw[112:120] = struct.pack("<ff", slope, inter)  # scl_slope, scl_inter in the NIfTI-1 header
    path.write_bytes(bytes(raw))


def test_scl_slope_and_inter_are_applied(tmp_path: Path) -> None:
    stored = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    path = tmp_path / "scaled.nii"
    nib.save(nib.Nifti1Image(stored, np.eye(4)), path)
    _patch_scaling(path, 2.5, -100.0)
    proxy = nib.load(path).dataobj
    assert (proxy.slope, proxy.inter) == (2.5, -100.0)
    vol = load_nifti(path)
    np.testing.assert_allclose(vol.data, stored * 2.5 - 100.0)
    assert vol.data.dtype == np.float32


def test_2d_nifti_becomes_one_slice(tmp_path: Path) -> None:
    data = np.arange(12, dtype=np.float32).reshape(4, 3)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 1.0, 1.0])), tmp_path / "flat.nii")
    vol = load_nifti(tmp_path / "flat.nii")
    assert vol.data.shape == (4, 3, 1)
    np.testing.assert_array_equal(vol.data[:, :, 0], data)


def test_bounds_checked_from_header_before_reading_data(tmp_path: Path) -> None:
    path = tmp_path / "big.nii"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 8), np.int16), np.eye(4)), path)
    # truncate the voxel data: a header-only bounds check must still answer "too large", not "corrupt"
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(ImageTooLargeError):
        load_nifti(path, Limits(max_pixels=32 * 32))
    with pytest.raises(ImageTooLargeError):
        load_nifti(path, Limits(max_total_voxels=64 * 64 * 4))
    with pytest.raises(CorruptFileError):
        load_nifti(path)


def test_corrupt_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"this is not a nifti header" * 20)
    with pytest.raises(CorruptFileError):
        load_nifti(junk)
    raw = Path(EXAMPLE_4D).read_bytes()  # gzip-compressed
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CorruptFileError):
        load_nifti(truncated)


def test_sample_slices_from_nifti_orientation_and_provenance(tmp_path: Path) -> None:
    # RAS data with a marker in the right-anterior-superior corner, stored in LPI voxel order
    ras = np.zeros((10, 12, 8), np.float32)
    ras[-2:, -2:, -2:] = 100.0
    affine_ras = np.diag([2.0, 2.0, 3.0, 1.0])
    img = nib.Nifti1Image(ras, affine_ras).as_reoriented(np.array([[0, -1], [1, -1], [2, -1]]))
    nib.save(img, tmp_path / "lpi.nii.gz")
    vol = load_nifti(tmp_path / "lpi.nii.gz")
    np.testing.assert_array_equal(vol.data, ras)
    (axial,) = sample_slices(vol, plane="axial", n=1, mode="mip", window=Window(50.0, 100.0))
    gray = axial.pixels[:, :, 0]
    assert gray.shape == (12, 10)
    assert gray[0, 0] == 255 and gray[:2, :2].min() == 255 and gray[2:, :].max() == 0  # R left, A top
    (coronal,) = sample_slices(vol, plane="coronal", n=1, mode="mip", window=Window(50.0, 100.0))
    assert coronal.pixels.shape == (12, 10, 3)  # 8 slices x 3 mm -> 12 rows of 2 mm
    assert coronal.pixels[0, 0, 0] == 255 and coronal.pixels[-1, -1, 0] == 0  # R left, S top
    prov = coronal.provenance
    assert prov.format == "nifti" and prov.source.endswith("lpi.nii.gz")
    ops = [s.op for s in prov.steps]
    assert ops[:3] == ["canonical", "reorient", "sample"] and "resize" in ops
    # no file window: a percentile window on the sampled images
    images = sample_slices(vol, plane="sagittal", n=3)
    assert len(images) == 3 and all(im.provenance.plane == "sagittal" for im in images)
    voi = next(s for s in images[0].provenance.steps if s.op == "voi")
    assert voi.params
