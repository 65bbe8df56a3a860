"""DICOM series → Volume (sorting, affine, geometry report) and Volume → display images."""

from __future__ import annotations

import json
import math
import random
import struct
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from emma.errors import ImageTooLargeError, MixedSeriesError, SeriesError
from emma.io.limits import Limits
from emma.io.nifti import load_nifti
from emma.io.volume import (
    Volume,
    find_dicom_files,
    group_series,
    load_series,
    sample_slices,
    series_summary,
)
from emma.io.windows import Window

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# --------------------------------------------------------------------------------------------------
# A small series factory: every slice is written from its own geometry, independently of the reader.


def write_slice(
    path: Path,
    pixels: np.ndarray,  # (rows, cols) stored values
    *,
    ipp: Sequence[float] | None,
    iop: Sequence[float] | None,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    series_uid: str,
    instance: int = 1,
    slope: float = 1.0,
    intercept: float = -1024.0,
    window: tuple[float, float] | None = (40.0, 400.0),
    thickness: float | None = None,
    photometric: str = "MONOCHROME2",
) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-ID-123"
    ds.InstanceNumber = instance
    if ipp is not None:
        ds.ImagePositionPatient = [round(float(v), 6) for v in ipp]
    if iop is not None:
        ds.ImageOrientationPatient = [round(float(v), 8) for v in iop]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    if thickness is not None:
        ds.SliceThickness = thickness
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(pixels.astype("<i2")).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(
    folder: Path,
    stored_ijk: np.ndarray,  # (cols, rows, slices) stored values, slice k at positions[k]
    positions: Sequence[Sequence[float]],
    *,
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    series_uid: str | None = None,
    instance_numbers: Sequence[int] | None = None,
    shuffle_seed: int | None = None,
    **kwargs: object,
) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    order = list(range(stored_ijk.shape[2]))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for n, k in enumerate(order):
        instance = instance_numbers[k] if instance_numbers is not None else k + 1
        write_slice(
            folder / f"f{n:03d}_{generate_uid()[-6:]}.dcm",
            stored_ijk[:, :, k].T,
            ipp=positions[k],
            iop=iop,
            pixel_spacing=pixel_spacing,
            series_uid=uid,
            instance=instance,
            **kwargs,  # type: ignore[arg-type]
        )
    return uid


def expected_ras(
    ipp: Sequence[float], iop: Sequence[float], spacing: Sequence[float], i: float, j: float
) -> np.ndarray:
    """RAS position of column i, row j of a slice, from the DICOM definition (PS3.3 C.7.6.2.1.1)."""
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    lps = np.asarray(ipp, float) + i * spacing[1] * row + j * spacing[0] * col
    return np.array([-lps[0], -lps[1], lps[2]])


def gradient_volume(shape: tuple[int, int, int]) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return (i * 3 + j * 50 + k * 700).astype(np.int16)


# --------------------------------------------------------------------------------------------------
# Sorting and affine


def test_sorts_by_position_not_instance_number_and_builds_affine(tmp_path: Path) -> None:
    stored = gradient_volume((7, 5, 6))  # 7 columns, 5 rows, 6 slices
    positions = [(-100.0, -80.0, 20.0 + 2.5 * k) for k in range(6)]
    lying_instances = [4, 1, 6, 2, 5, 3]
    write_series(
        tmp_path,
        stored,
        positions,
        pixel_spacing=(0.5, 0.8),  # 0.5 mm between rows, 0.8 mm between columns
        instance_numbers=lying_instances,
        shuffle_seed=3,
        slope=2.0,
        intercept=-1000.0,
    )
    vol = load_series(tmp_path)
    assert vol.data.dtype == np.float32
    assert vol.data.shape == (7, 5, 6)
    np.testing.assert_array_equal(vol.data, stored.astype(np.float32) * 2.0 - 1000.0)
    expected = np.array(
        [
            [-0.8, 0.0, 0.0, 100.0],
            [0.0, -0.5, 0.0, 80.0],
            [0.0, 0.0, 2.5, 20.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    np.testing.assert_allclose(vol.affine, expected, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, (0.8, 0.5, 2.5), atol=1e-6)
    assert vol.modality == "CT"
    assert vol.axcodes() == "LPS"
    geo = vol.geometry
    assert geo.ok and geo.n_slices == 6 and geo.slice_spacing == pytest.approx(2.5)
    assert not geo.gaps and not geo.duplicates and not geo.gantry_tilt and not geo.oblique
    assert geo.orientation == "axial"
    json.dumps(geo.as_dict())


def test_descending_positions_and_list_of_files(tmp_path: Path) -> None:
    stored = gradient_volume((4, 4, 5))
    # slice k lies *below* slice k-1: the reader must still order by position along the normal
    positions = [(0.0, 0.0, -5.0 * k) for k in range(5)]
    write_series(tmp_path, stored, positions)
    files = sorted(tmp_path.iterdir())
    vol = load_series(files)
    np.testing.assert_array_equal(vol.data, stored[:, :, ::-1].astype(np.float32) - 1024.0)
    assert vol.affine[2, 3] == pytest.approx(-20.0)
    assert vol.affine[2, 2] == pytest.approx(5.0)


def test_gantry_tilt_affine_column_is_the_step(tmp_path: Path) -> None:
    tilt = math.radians(15.0)
    iop = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), -math.sin(tilt))  # tilted rows, as a tilted gantry writes
    step_lps = np.array([0.0, 0.0, 3.0])  # table moves along z only
    positions = [np.array([-50.0, -40.0, 10.0]) + k * step_lps for k in range(5)]
    stored = gradient_volume((6, 4, 5))
    write_series(tmp_path, stored, positions, iop=iop, shuffle_seed=1)
    vol = load_series(tmp_path)
    np.testing.assert_allclose(vol.affine[:3, 2], [0.0, 0.0, 3.0], atol=1e-5)
    normal = np.cross(iop[:3], iop[3:])
    assert vol.geometry.gantry_tilt
    assert vol.geometry.tilt_degrees == pytest.approx(15.0, abs=0.01)
    assert vol.geometry.slice_spacing == pytest.approx(float(np.dot(step_lps, normal)), abs=1e-4)
    assert any("tilt" in w for w in vol.geometry.warnings)
    # every voxel centre maps to where the DICOM definition puts it
    for i, j, k in [(0, 0, 0), (5, 3, 4), (2, 1, 3)]:
        np.testing.assert_allclose(
            (vol.affine @ [i, j, k, 1])[:3], expected_ras(positions[k], iop, (1.0, 1.0), i, j), atol=1e-4
        )


def test_step_in_y_and_z_gives_sheared_affine(tmp_path: Path) -> None:
    step_lps = np.array([0.0, 1.0, 4.0])
    positions = [np.array([10.0, 20.0, 30.0]) + k * step_lps for k in range(4)]
    write_series(tmp_path, gradient_volume((3, 3, 4)), positions, shuffle_seed=7)
    vol = load_series(tmp_path)
    np.testing.assert_allclose(vol.affine[:3, 2], [0.0, -1.0, 4.0], atol=1e-5)
    assert vol.geometry.tilt_degrees == pytest.approx(math.degrees(math.atan2(1.0, 4.0)), abs=0.01)


def test_oblique_orientation(tmp_path: Path) -> None:
    a, b = math.radians(20.0), math.radians(10.0)
    row = np.array([math.cos(a), math.sin(a), 0.0])
    col = np.array([-math.sin(a) * math.cos(b), math.cos(a) * math.cos(b), math.sin(b)])
    iop = (*row, *col)
    normal = np.cross(row, col)
    origin = np.array([-30.0, 12.0, 5.0])
    positions = [origin + 2.0 * k * normal for k in range(5)]
    write_series(
        tmp_path, gradient_volume((5, 6, 5)), positions, iop=iop, pixel_spacing=(0.7, 0.9), shuffle_seed=2
    )
    vol = load_series(tmp_path)
    assert vol.geometry.oblique and not vol.geometry.gantry_tilt
    # the column direction is furthest from an axis: its largest component is cos(a) cos(b)
    assert vol.geometry.oblique_degrees == pytest.approx(
        math.degrees(math.acos(math.cos(a) * math.cos(b))), abs=0.01
    )
    for i, j, k in [(0, 0, 0), (4, 5, 4), (1, 3, 2)]:
        np.testing.assert_allclose(
            (vol.affine @ [i, j, k, 1])[:3], expected_ras(positions[k], iop, (0.7, 0.9), i, j), atol=1e-4
        )


# --------------------------------------------------------------------------------------------------
# Geometry problems


def test_gap_is_reported(tmp_path: Path) -> None:
    zs = [0.0, 2.0, 4.0, 8.0, 10.0]  # the slice at 6 mm is missing
    write_series(tmp_path, gradient_volume((3, 3, 5)), [(0.0, 0.0, z) for z in zs], shuffle_seed=4)
    vol = load_series(tmp_path)
    geo = vol.geometry
    assert geo.slice_spacing == pytest.approx(2.0)
    assert geo.gaps == [{"index": 3, "position_mm": 8.0, "spacing_mm": 4.0}]
    assert not geo.ok and any("spacing" in w for w in geo.warnings)
    assert vol.affine[2, 2] == pytest.approx(2.0)  # the regular step, not the gap


def test_duplicate_positions_keep_one_and_report(tmp_path: Path) -> None:
    stored = gradient_volume((3, 3, 5))
    zs = [0.0, 3.0, 3.0, 6.0, 9.0]
    write_series(tmp_path, stored, [(0.0, 0.0, z) for z in zs], instance_numbers=[1, 2, 3, 4, 5])
    vol = load_series(tmp_path)
    assert vol.data.shape == (3, 3, 4)
    assert vol.geometry.duplicates == [{"position_mm": 3.0, "count": 2}]
    assert not vol.geometry.ok
    # the image with the lower InstanceNumber is the one kept
    np.testing.assert_array_equal(vol.data[:, :, 1], stored[:, :, 1] - 1024.0)
    np.testing.assert_array_equal(vol.data[:, :, 2], stored[:, :, 3] - 1024.0)
    assert not vol.geometry.gaps


def test_mixed_rows_raise(tmp_path: Path) -> None:
    uid = generate_uid()
    iop = (1, 0, 0, 0, 1, 0)
    write_slice(tmp_path / "a.dcm", np.zeros((4, 4), np.int16), ipp=(0, 0, 0), iop=iop, series_uid=uid)
    write_slice(tmp_path / "b.dcm", np.zeros((5, 4), np.int16), ipp=(0, 0, 1), iop=iop, series_uid=uid)
    with pytest.raises(SeriesError, match="mixed image sizes"):
        load_series(tmp_path)


def test_mixed_orientation_raises(tmp_path: Path) -> None:
    uid = generate_uid()
    write_slice(
        tmp_path / "a.dcm", np.zeros((4, 4), np.int16), ipp=(0, 0, 0), iop=(1, 0, 0, 0, 1, 0), series_uid=uid
    )
    write_slice(
        tmp_path / "b.dcm", np.zeros((4, 4), np.int16), ipp=(0, 0, 1), iop=(1, 0, 0, 0, 0, -1), series_uid=uid
    )
    with pytest.raises(SeriesError, match="mixed orientations"):
        load_series(tmp_path)


def test_missing_position_raises_for_a_stack_but_not_a_single_image(tmp_path: Path) -> None:
    uid = generate_uid()
    write_slice(
        tmp_path / "a.dcm", np.zeros((4, 4), np.int16), ipp=(0, 0, 0), iop=(1, 0, 0, 0, 1, 0), series_uid=uid
    )
    write_slice(tmp_path / "b.dcm", np.zeros((4, 4), np.int16), ipp=None, iop=None, series_uid=uid)
    with pytest.raises(SeriesError, match="lack ImagePositionPatient"):
        load_series(tmp_path)
    single = tmp_path / "single"
    single.mkdir()
    pixels = np.arange(12, dtype=np.int16).reshape(3, 4)
    write_slice(single / "x.dcm", pixels, ipp=None, iop=None, series_uid=uid, pixel_spacing=(0.5, 0.25))
    vol = load_series(single)
    assert vol.data.shape == (4, 3, 1)
    np.testing.assert_array_equal(vol.data[:, :, 0], pixels.T - 1024.0)
    np.testing.assert_allclose(np.diag(vol.affine)[:2], [-0.25, -0.5])
    assert not vol.geometry.ok and vol.geometry.warnings


def test_two_series_raise_mixed_and_can_be_chosen(tmp_path: Path) -> None:
    uid_a = "1.2.826.0.1.3680043.8.498.100001"
    uid_b = "1.2.826.0.1.3680043.8.498.200002"
    write_series(tmp_path / "a", gradient_volume((3, 3, 3)), [(0, 0, z) for z in (0, 1, 2)], series_uid=uid_a)
    write_series(tmp_path / "b", gradient_volume((4, 4, 2)), [(0, 0, z) for z in (0, 5)], series_uid=uid_b)
    (tmp_path / "notes.txt").write_text("not a dicom file")
    with pytest.raises(MixedSeriesError) as info:
        load_series(tmp_path)
    message = str(info.value)
    # listed by index and description, never by UID or a fragment of one (identifiers under PS3.15)
    assert "2 series" in message and "--series" in message
    assert (
        "1: CT series, axial, 3 files of 3x3" in message and "2: CT series, axial, 2 files of 4x4" in message
    )
    for uid in (uid_a, uid_b):
        assert uid[-6:] not in message
    assert "Doe" not in message and "SECRET" not in message
    assert load_series(tmp_path, series=2).data.shape == (4, 4, 2)
    assert load_series(tmp_path, series=1).data.shape == (3, 3, 3)
    assert load_series(tmp_path, series_uid=uid_b).data.shape == (4, 4, 2)  # the full UID, for libraries
    with pytest.raises(SeriesError, match="no series 3; it holds 2 series") as missing:
        load_series(tmp_path, series=3)
    assert uid_a[-6:] not in str(missing.value)
    with pytest.raises(SeriesError, match="not among") as unknown:
        load_series(tmp_path, series_uid="200002")  # a suffix is not a UID
    assert "200002" not in str(unknown.value)
    # the indices are those of series_summary (emma info), which shows no UID either
    summary = series_summary(tmp_path)
    assert [(s["index"], s["files"]) for s in summary] == [(1, 3), (2, 2)]
    assert all(uid[-6:] not in json.dumps(summary) for uid in (uid_a, uid_b))
    assert [s["index"] for s in series_summary(tmp_path, series=2)] == [2]

    files = find_dicom_files(tmp_path)
    assert len(files) == 6
    groups = group_series(files)
    assert {k: len(v) for k, v in groups.items()} == {uid_a: 3, uid_b: 2}
    assert groups.skipped["not_dicom"] == 1 and "skipped 1" in groups.notes[0]
    (tmp_path / "huge.bin").write_bytes(b"\x00" * 20_000)
    groups = group_series(find_dicom_files(tmp_path), Limits(max_file_bytes=10_000))
    assert len(groups) == 2 and groups.skipped["too_large"] == 1 and groups.skipped["not_dicom"] == 1


def test_series_summary_is_header_only_and_free_of_phi(tmp_path: Path) -> None:
    write_series(
        tmp_path / "ax", gradient_volume((3, 4, 3)), [(0, 0, z) for z in (0, 2, 4)], pixel_spacing=(0.5, 0.6)
    )
    write_series(
        tmp_path / "sag",
        gradient_volume((3, 3, 2)),
        [(x, 0, 0) for x in (0, 3)],
        iop=(0, 1, 0, 0, 0, -1),
    )
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 300)
    summary = series_summary(tmp_path)
    assert len(summary) == 2
    by_orientation = {s["orientation"]: s for s in summary}
    assert set(by_orientation) == {"axial", "sagittal"}
    axial = by_orientation["axial"]
    assert axial["files"] == 3 and axial["rows"] == 4 and axial["columns"] == 3
    assert axial["pixel_spacing"] == [0.5, 0.6] and axial["slice_spacing"] == 2.0
    assert by_orientation["sagittal"]["slice_spacing"] == 3.0
    text = json.dumps(summary)
    assert "Doe" not in text and "SECRET" not in text
    assert "skipped 1" in text


def test_limits_are_checked_before_decoding(tmp_path: Path) -> None:
    write_series(tmp_path, gradient_volume((8, 8, 4)), [(0, 0, z) for z in range(4)])
    with pytest.raises(ImageTooLargeError):
        load_series(tmp_path, limits=Limits(max_total_voxels=8 * 8 * 3))
    with pytest.raises(ImageTooLargeError):
        load_series(tmp_path, limits=Limits(max_slices=3))
    with pytest.raises(ImageTooLargeError):
        find_dicom_files(tmp_path, Limits(max_slices=2))


# --------------------------------------------------------------------------------------------------
# Volume → images: radiological display orientation

PHANTOM_HALF = 47.5  # voxel centres from -47.5 to 47.5 mm in 5 mm steps
MARK_A = 1000.0  # right-anterior-superior corner
MARK_B = 500.0  # left-anterior-inferior corner


def phantom_ras(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Values at RAS positions: two corner markers, 0 elsewhere."""
    out = np.zeros(np.broadcast(x, y, z).shape, dtype=np.float64)
    out[(x > 30) & (y > 30) & (z > 30)] = MARK_A
    out[(x < -30) & (y > 30) & (z < -30)] = MARK_B
    return out


ACQUISITIONS = {
    "axial": (1, 0, 0, 0, 1, 0),
    "coronal": (1, 0, 0, 0, 0, -1),
    "sagittal": (0, 1, 0, 0, 0, -1),
    "axial_flipped": (-1, 0, 0, 0, -1, 0),
}


def write_phantom(folder: Path, iop: Sequence[float], n: int = 20, step: float = 5.0) -> None:
    """Sample the phantom at the voxel centres of an acquisition, as a scanner would, and write it."""
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    idx = np.arange(n)
    ii, jj = np.meshgrid(idx, idx, indexing="ij")  # (i=column, j=row)
    corner = -PHANTOM_HALF * (row + col)
    uid = generate_uid()
    for k in range(n):
        ipp = corner + (-PHANTOM_HALF + step * k) * normal
        lps = ipp[:, None, None] + step * (ii * row[:, None, None] + jj * col[:, None, None])
        values = phantom_ras(-lps[0], -lps[1], lps[2])  # (cols, rows) HU
        write_slice(
            folder / f"s{(k * 7) % n:03d}.dcm",  # file names out of order on purpose
            (values + 1024.0).T.astype(np.int16),
            ipp=ipp,
            iop=iop,
            pixel_spacing=(step, step),
            series_uid=uid,
            instance=n - k,
        )


@pytest.fixture(scope="module", params=sorted(ACQUISITIONS))
def phantom_volume(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Volume:
    folder = tmp_path_factory.mktemp(f"phantom_{request.param}")
    write_phantom(folder, ACQUISITIONS[request.param])
    return load_series(folder)


def marker_blocks(image: np.ndarray) -> dict[str, tuple[float, float]]:
    """Centre (row, col) of the bright (A) and mid-grey (B) markers, as fractions of the image size."""
    gray = image[:, :, 0].astype(float)
    h, w = gray.shape
    out = {}
    for name, lo, hi in (("A", 200, 256), ("B", 90, 170)):
        rows, cols = np.nonzero((gray >= lo) & (gray < hi))
        assert rows.size, f"marker {name} not visible"
        out[name] = ((rows.mean() + 0.5) / h, (cols.mean() + 0.5) / w)
    return out


WINDOW = Window(center=500.0, width=1001.0)  # 0 HU -> 0, 500 -> ~128, 1000 -> 255


@pytest.mark.parametrize(
    ("plane", "where_a", "where_b"),
    [
        # axial, seen from the feet: patient right on image left, anterior at top
        ("axial", ("top", "left"), ("top", "right")),
        # coronal, seen from the front: patient right on image left, superior at top
        ("coronal", ("top", "left"), ("bottom", "right")),
        # sagittal, seen from the patient's left: anterior on image left, superior at top
        ("sagittal", ("top", "left"), ("bottom", "left")),
    ],
)
def test_display_orientation(
    phantom_volume: Volume, plane: str, where_a: tuple[str, str], where_b: tuple[str, str]
) -> None:
    (image,) = sample_slices(phantom_volume, plane=plane, n=1, mode="mip", window=WINDOW)  # type: ignore[arg-type]
    assert image.pixels.shape == (20, 20, 3)
    centres = marker_blocks(image.pixels)
    for name, (vertical, horizontal) in (("A", where_a), ("B", where_b)):
        r, c = centres[name]
        assert (r < 0.5) == (vertical == "top"), (plane, name, centres)
        assert (c < 0.5) == (horizontal == "left"), (plane, name, centres)
        assert 0.05 < min(r, 1 - r) < 0.15 and 0.05 < min(c, 1 - c) < 0.15  # in the corner 4x4 block
    # everything outside the markers is black
    gray = image.pixels[:, :, 0]
    assert int((gray > 0).sum()) == 32
    prov = image.provenance
    assert prov.plane == plane and prov.format == "dicom-series"
    ops = [s.op for s in prov.steps]
    assert ops[:3] == ["modality_lut", "reorient", "sample"] and "voi" in ops and ops[-1] == "to_uint8"


def test_slices_are_evenly_spaced_inferior_to_superior(phantom_volume: Volume) -> None:
    images = sample_slices(phantom_volume, plane="axial", n=4, window=WINDOW)
    assert [im.provenance.slice_index for im in images] == [2, 7, 12, 17]
    # z of canonical slice k is -47.5 + 5k: B (z < -30) only in slice 2, A (z > 30) only in slice 17
    has_a = [bool((im.pixels[:, :, 0] > 200).any()) for im in images]
    has_b = [bool(((im.pixels[:, :, 0] > 90) & (im.pixels[:, :, 0] < 170)).any()) for im in images]
    assert has_a == [False, False, False, True]
    assert has_b == [True, False, False, False]
    assert images[3].pixels[0, 0, 0] == 255 and images[3].pixels[19, 19, 0] == 0


def test_slab_mean_and_mip(phantom_volume: Volume) -> None:
    # canonical axial slice k has z = -47.5 + 5k: A (z > 30) fills k = 16..19, B (z < -30) k = 0..3
    images = sample_slices(phantom_volume, plane="axial", n=2, mode="slab", slab_mm=20.0, window=WINDOW)
    assert [im.provenance.slice_index for im in images] == [5, 15]
    ranges = [next(s for s in im.provenance.steps if s.op == "sample").params["range"] for im in images]
    assert ranges == [[3, 7], [13, 17]]  # 20 mm = 4 slices around each centre
    # slab 13..16 holds A in one slice of four: mean 250 HU; the window maps it to 255 * 250.5 / 1000
    assert abs(int(images[1].pixels[0, 0, 0]) - 64) <= 1
    # slab 3..6 holds B (500 HU) in one slice of four: 125 HU at the top right
    assert abs(int(images[0].pixels[0, 19, 0]) - round(255 * 125.5 / 1000)) <= 1

    mips = sample_slices(phantom_volume, plane="axial", n=2, mode="mip", slab_mm=20.0, window=WINDOW)
    assert mips[1].pixels[0, 0, 0] == 255 and mips[1].pixels[0, 19, 0] == 0
    assert mips[0].pixels[0, 0, 0] == 0 and abs(int(mips[0].pixels[0, 19, 0]) - 128) <= 1

    (middle,) = sample_slices(phantom_volume, plane="axial", n=1, mode="slab", slab_mm=20.0, window=WINDOW)
    assert middle.provenance.slice_index == 10 and int(middle.pixels.max()) == 0  # slices 8..11: empty
    (whole,) = sample_slices(phantom_volume, plane="axial", n=1, mode="mip", window=WINDOW)
    assert whole.provenance.slice_index is None
    assert next(s for s in whole.provenance.steps if s.op == "sample").params["range"] == [0, 20]


def test_non_isotropic_voxels_are_resampled_square(tmp_path: Path) -> None:
    stored = np.zeros((10, 8, 6), np.int16)  # 10 columns x 8 rows, 6 slices of 3 mm, 1 x 1 mm pixels
    stored[:, :, 5] = 2000  # most superior slice bright
    write_series(tmp_path, stored, [(0, 0, 3.0 * k) for k in range(6)], window=None)
    vol = load_series(tmp_path)
    (coronal,) = sample_slices(vol, plane="coronal", n=1, window="0,2000")
    assert coronal.pixels.shape == (18, 10, 3)  # 6 slices * 3 mm tall, 10 mm wide
    resize = next(s for s in coronal.provenance.steps if s.op == "resize")
    assert resize.params["from"] == [10, 6] and resize.params["to"] == [10, 18]
    # superior at top: the bright slice fills the top rows
    assert coronal.pixels[0, 5, 0] > 200 and coronal.pixels[-1, 5, 0] < 50
    (axial,) = sample_slices(vol, plane="axial", n=1)
    assert axial.pixels.shape == (8, 10, 3)
    assert not any(s.op == "resize" for s in axial.provenance.steps)


def test_file_window_is_used_by_default(tmp_path: Path) -> None:
    stored = np.full((4, 4, 3), 1024 + 40, np.int16)  # 40 HU everywhere = centre of the file window
    stored[0, 0, :] = 1024 - 1000  # -1000 HU: far below the window
    write_series(tmp_path, stored, [(0, 0, z) for z in range(3)], window=(40.0, 400.0))
    vol = load_series(tmp_path)
    images = sample_slices(vol, plane="axial", n=3)
    gray = images[0].pixels[:, :, 0]
    assert abs(int(gray[1, 1]) - 128) <= 1  # window centre
    assert gray.min() == 0
    assert any(s.op == "voi" for s in images[0].provenance.steps)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    stored = np.zeros((4, 4, 2), np.int16)
    stored[0, 0, :] = 1000
    write_series(tmp_path, stored, [(0, 0, z) for z in (0, 1)], photometric="MONOCHROME1", intercept=0.0)
    (image,) = sample_slices(load_series(tmp_path), plane="axial", n=1, window="500,1000")
    gray = image.pixels[:, :, 0]
    # high values display dark; a standard axial slice (rows run anterior to posterior, columns right to
    # left) displays as stored, so row 0 / column 0 stays top-left
    assert gray[0, 0] == 0 and gray[3, 3] == 255 and int((gray == 0).sum()) == 1
    assert any(s.op == "invert" for s in image.provenance.steps)


def test_enhanced_multiframe_sorted_by_per_frame_position(tmp_path: Path) -> None:
    rows, cols, z_of_frame = 3, 4, [6.0, 0.0, 9.0, 3.0]  # frames stored out of spatial order
    frames = np.stack([np.full((rows, cols), 100 * (f + 1), np.int16) for f in range(4)])
    frames[:, 0, 1] = 7  # row 0, column 1 of every frame
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.NumberOfFrames = 4
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing = [0.5, 0.25]
    shared = Dataset()
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for f, z in enumerate(z_of_frame):
        position, transform, item = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [10.0, 20.0, z]
        transform.RescaleSlope, transform.RescaleIntercept = 1.0, -10.0 * f  # per-frame rescale
        item.PlanePositionSequence = [position]
        item.PixelValueTransformationSequence = [transform]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = frames.astype("<i2").tobytes()
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)

    vol = load_series(tmp_path)
    assert vol.data.shape == (cols, rows, 4)
    order = np.argsort(z_of_frame)  # frames 1, 3, 0, 2
    for k, f in enumerate(order):
        np.testing.assert_array_equal(vol.data[:, :, k], frames[f].T.astype(np.float32) - 10.0 * f)
    np.testing.assert_allclose(np.diag(vol.affine), [-0.25, -0.5, 3.0, 1.0])
    np.testing.assert_allclose(vol.affine[:3, 3], [-10.0, -20.0, 0.0])
    assert vol.geometry.ok and vol.geometry.slice_spacing == pytest.approx(3.0)


def test_single_slice_falls_back_to_its_own_plane(tmp_path: Path) -> None:
    stored = gradient_volume((5, 4, 1))
    write_series(tmp_path, stored, [(0, 0, 0)])
    vol = load_series(tmp_path)
    (image,) = sample_slices(vol, plane="coronal", n=4)
    assert image.provenance.plane == "axial"
    assert any(s.op == "plane_fallback" for s in image.provenance.steps)
    assert image.pixels.shape == (4, 5, 3)


# --------------------------------------------------------------------------------------------------
# NIfTI and DICOM of the same data


def test_nifti_and_dicom_series_agree(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 3000, size=(6, 5, 4)).astype(np.int16)
    iop = (0, 1, 0, 0, 0, -1)  # sagittal acquisition
    spacing = (0.6, 0.9)
    positions = [(-20.0 + 1.5 * k, -30.0, 40.0) for k in range(4)]
    write_series(
        tmp_path / "dcm", stored, positions, iop=iop, pixel_spacing=spacing, slope=1.0, intercept=-1024.0
    )

    # the NIfTI of the same data, written from the DICOM definition, in a different voxel order
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = (
        row * spacing[1],
        col * spacing[0],
        (1.5, 0, 0),
        positions[0],
    )
    img = nib.Nifti1Image(stored, LPS_TO_RAS @ lps).as_reoriented(np.array([[2, 1], [0, -1], [1, 1]]))
    nib.save(img, tmp_path / "same.nii")  # stored values, voxel axes shuffled
    raw = bytearray((tmp_path / "same.nii").read_bytes())
    raw[112:120] = struct.pack("<ff", 1.0, -1024.0)  # scl_slope / scl_inter = the DICOM rescale
    (tmp_path / "same.nii").write_bytes(bytes(raw))

    from_dicom = load_series(tmp_path / "dcm").canonical()
    from_nifti = load_nifti(tmp_path / "same.nii")
    assert from_dicom.axcodes() == from_nifti.axcodes() == "RAS"
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-5)
    np.testing.assert_array_equal(from_dicom.data, from_nifti.data)
    assert from_dicom.data.min() < 0  # rescale applied in both
    assert from_dicom.geometry.orientation == "sagittal"
    assert from_nifti.geometry.orientation == "coronal"  # the NIfTI stores the voxels as coronal slices


def test_single_real_ct_matches_the_2d_path() -> None:
    from pydicom.data import get_testdata_file

    from emma.io.dicom import dicom_images

    path = Path(get_testdata_file("CT_small.dcm"))
    vol = load_series([path])
    assert vol.data.shape == (128, 128, 1) and vol.modality == "CT"
    (from_volume,) = sample_slices(vol, plane="axial", n=8)
    (from_file,) = dicom_images(path)
    # a standard axial slice displays exactly as the 2D path shows it, with the same VOI
    np.testing.assert_array_equal(from_volume.pixels, from_file.pixels)
    voi_volume = next(s for s in from_volume.provenance.steps if s.op == "voi")
    voi_file = next(s for s in from_file.provenance.steps if s.op == "voi")
    assert voi_volume.params == voi_file.params
