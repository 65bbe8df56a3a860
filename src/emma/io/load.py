"""The one preprocessing path: any supported file or folder → model-ready images with provenance.

Training, evaluation, annotation and serving all call :func:`load_images`, so a DICOM is windowed,
inverted and sampled the same way everywhere (no train/serve skew). Raster images can also be given
as their content in memory (``bytes`` or a binary file object, e.g. a server upload), which goes
through the same raster reader without a temporary file; DICOM and NIfTI are read from files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from emma.errors import InputError
from emma.io.image import ImageFit, ModelImage, fit_image
from emma.io.limits import DEFAULT_LIMITS, Limits
from emma.io.paths import check_path
from emma.io.windows import Window

if TYPE_CHECKING:
    from emma.io.raster import RasterSource

Plane = Literal["axial", "coronal", "sagittal"]
SliceMode = Literal["slice", "slab", "mip"]


class SourceFormat(StrEnum):
    DICOM = "dicom"
    DICOM_SERIES = "dicom-series"
    NIFTI = "nifti"
    RASTER = "raster"


_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_GZIP_MAGIC = b"\x1f\x8b"


def _detect_head(head: bytes) -> SourceFormat:
    """The format of in-memory content from its first bytes: DICOM (``DICM`` marker), NIfTI (its magic,
    or gzip), else raster (whose reader refuses what it does not recognise)."""
    if head[128:132] == b"DICM":
        return SourceFormat.DICOM
    if head[:2] == _GZIP_MAGIC or head[344:348] in (b"n+1\0", b"ni1\0"):
        return SourceFormat.NIFTI
    return SourceFormat.RASTER


def _head(stream: BinaryIO) -> bytes:
    start = stream.tell()
    head = stream.read(352)
    stream.seek(start)
    return head


def detect_format(path: RasterSource) -> SourceFormat:
    """Decide how to read ``path`` from its content first, its name second.

    In-memory content (``bytes`` or a binary file object) is judged by content alone; a DICOM stream
    without the 128-byte preamble is recognised only from a file.
    """
    if isinstance(path, bytes | bytearray | memoryview):
        return _detect_head(bytes(memoryview(path)[:352]))
    if not isinstance(path, str | os.PathLike):
        return _detect_head(_head(path))
    p = check_path(path)
    if p.is_dir():
        return SourceFormat.DICOM_SERIES
    name = p.name.lower()
    with p.open("rb") as fh:
        head = fh.read(352)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return SourceFormat.DICOM
    if name.endswith(_NIFTI_SUFFIXES) or head[344:348] in (b"n+1\0", b"ni1\0"):
        return SourceFormat.NIFTI
    if name.endswith(".dcm"):
        return SourceFormat.DICOM
    if name.endswith(_RASTER_SUFFIXES):
        return SourceFormat.RASTER
    # Content sniffing for extension-less files: a raster PIL recognises, else DICOM without preamble.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p):
            return SourceFormat.RASTER
    except (UnidentifiedImageError, OSError):
        pass
    return SourceFormat.DICOM


@dataclass(frozen=True)
class VolumeSampling:
    """How a 3D volume becomes 2D images for a VLM. ``series``: which series of a DICOM folder holding
    several (the 1-based index ``emma info`` lists; ignored for other inputs)."""

    plane: Plane = "axial"
    n: int = 8
    mode: SliceMode = "slice"
    slab_mm: float = 10.0
    series: int | None = None


def load_images(
    path: RasterSource,
    *,
    window: Window | str | None = None,
    sampling: VolumeSampling = VolumeSampling(),
    limits: Limits = DEFAULT_LIMITS,
    source: str | None = None,
    fit: ImageFit | None = None,
) -> list[ModelImage]:
    """Read a file or a DICOM series folder into RGB uint8 images, each with its provenance.

    2D files give one image per frame; series, NIfTI volumes and mosaics give ``sampling.n`` images in
    ``sampling.plane``. ``window`` is a :class:`Window`, a preset name or ``"C,W"``; ``None`` uses the
    file's own VOI (or a robust percentile window when it has none).

    ``path`` may also be a raster image's content: ``bytes`` or a binary file object (read from its
    current position), bounded by ``limits.max_file_bytes`` before decoding; ``source`` then labels the
    images' provenance and error messages (default ``"<memory>"``). DICOM or NIfTI content in memory
    raises InputError (write it to a file).

    ``fit`` (what the model can use, e.g. from :func:`emma.model.families.image_fit`) downscales every
    image bigger than it as it is made, recorded as a "resize" step in its provenance; raster frames are
    fitted one at a time as they are decoded.
    """
    images = _load(path, window=window, sampling=sampling, limits=limits, source=source, fit=fit)
    for i, image in enumerate(images):  # in place: each full-resolution image is freed as it is replaced
        images[i] = fit_image(image, fit)
    return images


def _load(
    path: RasterSource,
    *,
    window: Window | str | None,
    sampling: VolumeSampling,
    limits: Limits,
    source: str | None,
    fit: ImageFit | None,
) -> list[ModelImage]:
    from emma.io import dicom, mosaic, nifti, raster, volume

    if not isinstance(path, str | os.PathLike):
        fp, what = raster.open_input(path, limits, source)
        fmt = detect_format(fp)
        if fmt is not SourceFormat.RASTER:
            raise InputError(f"{what}: {fmt.value} data are read from a file, not from memory")
        return raster.raster_images(fp, window=window, limits=limits, source=what, fit=fit)
    fmt = detect_format(path)
    if fmt is SourceFormat.RASTER:
        return raster.raster_images(path, window=window, limits=limits, source=source or str(path), fit=fit)
    if fmt is SourceFormat.NIFTI:
        vol = nifti.load_nifti(path, limits=limits)
    elif fmt is SourceFormat.DICOM_SERIES:
        vol = volume.load_series(path, series=sampling.series, limits=limits)
    else:
        ds = dicom.read_dataset(path, limits, stop_before_pixels=True)
        if not mosaic.is_mosaic(ds):
            return dicom.dicom_images(path, window=window, limits=limits, source=str(path))
        vol = volume.load_series([Path(path)], limits=limits)
    return volume.sample_slices(
        vol,
        plane=sampling.plane,
        n=sampling.n,
        mode=sampling.mode,
        slab_mm=sampling.slab_mm,
        window=window,
    )


def describe(
    path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS, *, series: int | None = None
) -> dict[str, Any]:
    """Header-level summary for ``emma info``: no pixel decoding, PHI fields by name only. A DICOM folder
    lists its series by index (``series``: that one only)."""
    from emma.io import deid, dicom, nifti, raster, volume

    fmt = detect_format(path)
    info: dict[str, Any] = {"path": str(path), "format": fmt.value}
    if fmt is SourceFormat.RASTER:
        info.update(raster.raster_summary(path))
    elif fmt is SourceFormat.NIFTI:
        vol = nifti.load_nifti(path, limits=limits)
        info.update(
            {
                "shape": list(vol.data.shape),
                "spacing": [round(float(s), 4) for s in vol.spacing],
                "affine": [[round(float(v), 4) for v in row] for row in vol.affine],
                "geometry": vol.geometry.as_dict(),
            }
        )
    elif fmt is SourceFormat.DICOM_SERIES:
        entries = volume.series_summary(path, limits, series=series)
        info["series_count"] = len(entries)  # 1 with ``series``
        info["series"] = entries
    else:
        # pixel data stay in the file (deferred) but are known to be there, and complete
        ds = dicom.read_dataset(path, limits, defer_size=dicom.HEADER_DEFER_BYTES)
        info.update(dicom.dicom_summary(ds))
        info["phi_fields"] = deid.phi_keywords_present(ds)
    return info
