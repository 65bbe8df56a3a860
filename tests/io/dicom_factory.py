"""Synthetic DICOM files for tests: every pitfall of the pixel pipeline, written with plain pydicom.

``make_dicom(path, pixels, ...)`` writes one file in the DICOM file format and returns its path. The
pixel encoding is written here by hand (not by emma), so tests compare emma's output against values
computed independently from the standard's formulas.

Shapes: grayscale ``(H, W)`` or ``(F, H, W)``; colour (``photometric`` RGB / YBR_FULL) ``(H, W, 3)`` or
``(F, H, W, 3)``. The dtype decides Bits Allocated and Pixel Representation (uint8/int8/uint16/int16/
uint32/int32). Geometry keywords serve series/volume tests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

COLOR_PHOTOMETRICS = {"RGB", "YBR_FULL"}


def _lut_item(descriptor: Sequence[int], data: Sequence[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [int(v) for v in descriptor]
    item["LUTDescriptor"].VR = "SS" if int(descriptor[1]) < 0 else "US"
    item.LUTData = [int(v) for v in data]
    item["LUTData"].VR = "US"
    return item


def make_dicom(  # noqa: C901 - a test factory: one branch per optional DICOM feature
    path: str | os.PathLike[str],
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    modality: str = "CT",
    sop_class_uid: str | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float | Sequence[float], float | Sequence[float]] | None = None,
    voi_lut_function: str | None = None,
    voi_lut: tuple[Sequence[int], Sequence[int]] | None = None,
    modality_lut: tuple[Sequence[int], Sequence[int]] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    encapsulated_frames: Sequence[bytes] | None = None,
    image_position: Sequence[float] | None = None,
    image_orientation: Sequence[float] | None = (1, 0, 0, 0, 1, 0),
    pixel_spacing: Sequence[float] | None = (0.7, 0.7),
    slice_thickness: float | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    instance_number: int | None = None,
    extra: dict[str, Any] | None = None,
    preamble: bool = True,
) -> Path:
    """Write a synthetic DICOM file and return its path.

    - ``rescale``: (slope, intercept); ``window``: (center(s), width(s)), lists give multi-valued
      windows; ``voi_lut`` / ``modality_lut``: (LUTDescriptor, LUTData) for one sequence item.
    - ``pixels=None`` writes no Pixel Data (e.g. an SR-like object); ``encapsulated_frames`` writes
      those bytes as encapsulated Pixel Data for a compressed ``transfer_syntax`` (``pixels`` then only
      supplies the geometry and dtype).
    - ``extra``: any further keyword → value set on the dataset (after everything else).
    - ``preamble=False`` writes a bare dataset stream: no preamble, no DICM marker, no file meta.
    """
    path = Path(path)
    is_color = photometric in COLOR_PHOTOMETRICS
    sop_class = sop_class_uid or (CTImageStorage if modality == "CT" else SecondaryCaptureImageStorage)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = "SYN-0001"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    if frame_of_reference_uid is not None:
        ds.FrameOfReferenceUID = frame_of_reference_uid
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    if image_position is not None:
        ds.ImagePositionPatient = [float(v) for v in image_position]
    if image_orientation is not None and image_position is not None:
        ds.ImageOrientationPatient = [float(v) for v in image_orientation]
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    if slice_thickness is not None:
        ds.SliceThickness = slice_thickness

    if pixels is not None:
        arr = np.asarray(pixels)
        if arr.dtype.kind not in "iu" or arr.dtype.itemsize not in (1, 2, 4):
            raise ValueError(f"unsupported dtype {arr.dtype}")
        frames_ndim = 4 if is_color else 3
        if arr.ndim not in (frames_ndim - 1, frames_ndim):
            raise ValueError(f"bad shape {arr.shape} for {photometric}")
        multi = arr.ndim == frames_ndim
        rows, columns = arr.shape[int(multi)], arr.shape[int(multi) + 1]
        bits_allocated = arr.dtype.itemsize * 8
        ds.SamplesPerPixel = 3 if is_color else 1
        ds.PhotometricInterpretation = photometric
        if is_color:
            ds.PlanarConfiguration = 0
        if multi:
            ds.NumberOfFrames = arr.shape[0]
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated = bits_allocated
        ds.BitsStored = bits_stored or bits_allocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
        if encapsulated_frames is not None:
            ds.PixelData = encapsulate(list(encapsulated_frames))
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            if len(data) % 2:
                data += b"\x00"
            ds.PixelData = data
            ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"

    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut_function is not None:
        ds.VOILUTFunction = voi_lut_function
    if voi_lut is not None:
        ds.VOILUTSequence = [_lut_item(*voi_lut)]
    if modality_lut is not None:
        item = _lut_item(*modality_lut)
        item.ModalityLUTType = "HU"
        ds.ModalityLUTSequence = [item]
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)

    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        del ds.file_meta
        ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR, to [0, 1], in float64 (independent reference)."""
    x = np.asarray(x, dtype=np.float64)
    y = (x - (center - 0.5)) / (width - 1) + 0.5
    y = np.where(x <= center - 0.5 - (width - 1) / 2, 0.0, y)
    y = np.where(x > center - 0.5 + (width - 1) / 2, 1.0, y)
    return y


def linear_exact_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.2 LINEAR_EXACT, to [0, 1], in float64."""
    x = np.asarray(x, dtype=np.float64)
    y = (x - center) / width + 0.5
    y = np.where(x <= center - width / 2, 0.0, y)
    y = np.where(x > center + width / 2, 1.0, y)
    return y


def sigmoid_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.1 SIGMOID, to [0, 1], in float64."""
    x = np.asarray(x, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))


def to_uint8_reference(unit: np.ndarray, invert: bool = False) -> np.ndarray:
    """[0, 1] → uint8 by rounding; asserts no value sits on a rounding tie (so float32 agrees)."""
    unit = np.asarray(unit, dtype=np.float64)
    if invert:
        unit = 1.0 - unit
    scaled = np.clip(unit, 0.0, 1.0) * 255.0
    frac = scaled - np.floor(scaled)
    assert not np.any(np.abs(frac - 0.5) < 1e-3), "test data sits on a rounding tie; pick other values"
    return np.rint(scaled).astype(np.uint8)


def assert_uint8_matches(actual: np.ndarray, unit: np.ndarray, invert: bool = False) -> None:
    """``actual`` uint8 equals round(255 * unit) exactly, except within 1e-3 of a rounding tie (±1).

    For real images whose values are not chosen by the test; float32 vs float64 may differ at ties.
    """
    unit = np.asarray(unit, dtype=np.float64)
    if invert:
        unit = 1.0 - unit
    scaled = np.clip(unit, 0.0, 1.0) * 255.0
    near_tie = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-3
    expected = np.rint(scaled).astype(np.int64)
    diff = np.abs(np.asarray(actual, dtype=np.int64) - expected)
    assert actual.shape == expected.shape
    assert int(diff[~near_tie].max(initial=0)) == 0, "uint8 output differs from the reference"
    assert int(diff.max(initial=0)) <= 1
