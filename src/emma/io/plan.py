"""What reading a file will give and cost, from its header alone: no pixel data is decoded.

A server bounds a request before it decodes anything with :func:`plan_images`: how many model-ready
images a file gives (frames, or sampled slices of a volume) and how many pixels (voxels) decoding it
touches, checked against ``limits`` on the way. :data:`DECODE_BYTES_PER_PIXEL` turns the pixel count into
the memory decoding may take at its peak (stored values, the decoded array, float VOI buffers and the
RGB output live together for a moment); ``benchmarks/bench_serve_bombs.py`` measures it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from emma.errors import CorruptFileError, InputError
from emma.io import dicom, mosaic, raster
from emma.io.limits import DEFAULT_LIMITS, Limits
from emma.io.load import SourceFormat, VolumeSampling, detect_format

__all__ = ["DECODE_BYTES_PER_PIXEL", "ImagePlan", "plan_images"]

DECODE_BYTES_PER_PIXEL = 16  # peak bytes per decoded pixel (voxel), a conservative bound over formats


@dataclass(frozen=True)
class ImagePlan:
    """``count`` model-ready images from decoding ``source_pixels`` pixels (voxels) of a file."""

    format: SourceFormat
    count: int
    source_pixels: int

    @property
    def decode_bytes(self) -> int:
        """Peak memory decoding the file may take (an estimate from :data:`DECODE_BYTES_PER_PIXEL`)."""
        return self.source_pixels * DECODE_BYTES_PER_PIXEL


def plan_images(
    path: raster.RasterSource,
    *,
    sampling: VolumeSampling = VolumeSampling(),  # noqa: B008 — frozen, as load_images has it
    limits: Limits = DEFAULT_LIMITS,
    source: str | None = None,
) -> ImagePlan:
    """The :class:`ImagePlan` of a single file (or in-memory raster content) from its header, raising
    what :func:`emma.io.load.load_images` would raise for sizes over ``limits`` (ImageTooLargeError)
    or an unreadable header (CorruptFileError). A DICOM series folder is not planned (InputError)."""
    if not isinstance(path, str | os.PathLike):
        width, height, frames = raster.raster_geometry(path, limits, source)
        return ImagePlan(SourceFormat.RASTER, frames, width * height * frames)
    fmt = detect_format(path)
    if fmt is SourceFormat.RASTER:
        width, height, frames = raster.raster_geometry(path, limits, source)
        return ImagePlan(SourceFormat.RASTER, frames, width * height * frames)
    if fmt is SourceFormat.NIFTI:
        return _plan_nifti(Path(path), sampling, limits)
    if fmt is SourceFormat.DICOM_SERIES:
        raise InputError(f"{source or path}: a folder is not planned; plan its files")
    return _plan_dicom(Path(path), sampling, limits)


def _plan_dicom(path: Path, sampling: VolumeSampling, limits: Limits) -> ImagePlan:
    ds = dicom.read_dataset(path, limits, stop_before_pixels=True)
    if dicom.header_int(ds, "Rows") is None or dicom.header_int(ds, "Columns") is None:
        # no image (or a broken one): nothing large to decode; the reader says which
        return ImagePlan(SourceFormat.DICOM, 1, 0)
    rows, columns, frames = dicom.check_pixel_bounds(ds, limits, str(path))
    if mosaic.is_mosaic(ds):
        return ImagePlan(SourceFormat.DICOM, sampling.n, rows * columns * frames)
    return ImagePlan(SourceFormat.DICOM, frames, rows * columns * frames)


def _plan_nifti(path: Path, sampling: VolumeSampling, limits: Limits) -> ImagePlan:
    import nibabel as nib

    limits.check_file(path)
    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception:  # noqa: BLE001 — nibabel raises many types on garbage
        raise CorruptFileError(f"{path}: not a readable NIfTI file") from None
    dims = (*shape, 1, 1)[:3]
    if any(s < 1 for s in dims):
        raise CorruptFileError(f"{path}: invalid NIfTI dimensions {shape}")
    limits.check_image(rows=dims[1], columns=dims[0], frames=dims[2], what=str(path))
    return ImagePlan(SourceFormat.NIFTI, sampling.n, dims[0] * dims[1] * dims[2])
