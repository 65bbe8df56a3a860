"""Siemens mosaic: one DICOM frame holding a whole 3D volume as a grid of tiles.

Siemens MR (EPI, DWI, fMRI) stores each time point of a 2D multi-slice acquisition as a single image
whose pixel matrix is a square grid of ``ceil(sqrt(N))`` by ``ceil(sqrt(N))`` tiles, one tile per slice
(row-major, first slice top-left, padding tiles at the end). The number of slices and the slice normal
live in the private CSA image header, parsed here with :mod:`nibabel.nicom.csareader`.

ImagePositionPatient of a mosaic refers to the top-left corner of the *whole mosaic* as if it were one
big slice; the true position of the first voxel of the first tile is that corner moved by half the
difference between the mosaic size and the tile size along the row and column directions (the
correction dcm2niix and nibabel apply). Slices then step along the CSA ``SliceNormalVector`` by the
slice spacing, in tile order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from emma.errors import SeriesError

# dicom LPS (x to the patient's left, y posterior) -> NIfTI RAS
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _csareader() -> ModuleType:
    # Importing nibabel.nicom emits a one-off "experimental" UserWarning meant for its DICOM readers;
    # we only use the CSA header parser.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The DICOM readers are highly experimental")
        from nibabel.nicom import csareader

    return csareader


def is_mosaic(ds: Dataset) -> bool:
    """True when ImageType contains MOSAIC (Siemens mosaic storage). An ImageType that does not parse,
    or is not text (a number, bytes), is not a mosaic's."""
    try:
        image_type = ds.get("ImageType")
    except Exception:  # noqa: BLE001 — pydicom raises many types on a value it cannot convert
        return False
    if image_type is None:
        return False
    values = list(image_type) if isinstance(image_type, list | tuple | MultiValue) else [image_type]
    return any(isinstance(v, str) and v.strip().upper() == "MOSAIC" for v in values)


@dataclass(frozen=True)
class MosaicGeometry:
    """Header-level description of one mosaic image (positions in DICOM LPS millimetres)."""

    n_images: int  # slices in the mosaic (NumberOfImagesInMosaic)
    tiles_per_side: int  # ceil(sqrt(n_images))
    tile_rows: int
    tile_cols: int
    row_cosine: np.ndarray  # direction of increasing column index (IOP[:3])
    col_cosine: np.ndarray  # direction of increasing row index (IOP[3:])
    slice_normal: np.ndarray  # direction of increasing tile index (CSA SliceNormalVector)
    first_position: np.ndarray  # LPS position of voxel (row 0, col 0) of tile 0
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    slice_spacing: float  # mm between consecutive tiles
    normal_from_csa: bool  # False when the normal had to be taken from cross(row, col)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape in NIfTI order: (columns, rows, slices)."""
        return (self.tile_cols, self.tile_rows, self.n_images)

    def affine_lps(self) -> np.ndarray:
        """4x4 affine mapping (column, row, tile, 1) to DICOM LPS millimetres."""
        aff = np.eye(4)
        aff[:3, 0] = self.row_cosine * self.pixel_spacing[1]
        aff[:3, 1] = self.col_cosine * self.pixel_spacing[0]
        aff[:3, 2] = self.slice_normal * self.slice_spacing
        aff[:3, 3] = self.first_position
        return aff

    def affine(self) -> np.ndarray:
        """4x4 affine mapping (column, row, tile, 1) to RAS+ millimetres (nibabel convention)."""
        return LPS_TO_RAS @ self.affine_lps()


def _floats(value: Any, n: int, what: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"mosaic: unreadable {what}") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise SeriesError(f"mosaic: {what} needs {n} finite numbers")
    return arr


def _n_images(ds: Dataset, csa: dict[str, Any] | None) -> int:
    reader = _csareader()
    n: int | None = None
    if csa is not None:
        try:
            n = reader.get_n_mosaic(csa)
        except (KeyError, IndexError, TypeError, ValueError):
            n = None
    if not n:
        # Siemens private tag (0019,xx0A) NumberOfImagesInMosaic, in the "SIEMENS MR HEADER" block.
        try:
            block = ds.private_block(0x0019, "SIEMENS MR HEADER")
            n = int(block[0x0A].value)
        except (KeyError, ValueError, TypeError):
            n = None
    if not n or n < 1:
        raise SeriesError("mosaic: number of images in mosaic not found (no Siemens CSA header)")
    return int(n)


def mosaic_geometry(ds: Dataset) -> MosaicGeometry:
    """Read the mosaic layout and geometry from a header (pixels not needed)."""
    reader = _csareader()
    try:
        csa = reader.get_csa_header(ds, "image")
    except Exception as exc:  # CSAReadError and malformed private data of any kind
        raise SeriesError("mosaic: unreadable Siemens CSA image header") from exc
    n_images = _n_images(ds, csa)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise SeriesError("mosaic: Rows/Columns missing")
    tiles = int(np.ceil(np.sqrt(n_images)))
    if rows % tiles or cols % tiles:
        raise SeriesError(f"mosaic: {cols}x{rows} image does not split into {tiles}x{tiles} tiles")
    tile_rows, tile_cols = rows // tiles, cols // tiles

    if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds or "PixelSpacing" not in ds:
        raise SeriesError("mosaic: ImageOrientationPatient/ImagePositionPatient/PixelSpacing missing")
    iop = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient")
    ipp = _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient")
    ps = _floats(ds.PixelSpacing, 2, "PixelSpacing")
    if np.any(ps <= 0):
        raise SeriesError("mosaic: PixelSpacing must be positive")
    row_cos, col_cos = iop[:3], iop[3:]

    normal: np.ndarray | None = None
    if csa is not None:
        try:
            vec = reader.get_slice_normal(csa)
        except (KeyError, IndexError, TypeError, ValueError):
            vec = None
        if vec is not None:
            arr = np.asarray(vec, dtype=np.float64).reshape(-1)
            if arr.shape == (3,) and np.all(np.isfinite(arr)) and np.linalg.norm(arr) > 0.5:
                normal = arr / np.linalg.norm(arr)
    from_csa = normal is not None
    if normal is None:
        normal = np.cross(row_cos, col_cos)

    spacing_value = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    try:
        slice_spacing = float(spacing_value) if spacing_value is not None else 1.0
    except (TypeError, ValueError):
        slice_spacing = 1.0
    if not np.isfinite(slice_spacing) or slice_spacing <= 0:
        slice_spacing = 1.0

    # The stored position is the corner of the whole mosaic: move it to the first tile's first voxel.
    shift_rows = (rows - tile_rows) / 2.0
    shift_cols = (cols - tile_cols) / 2.0
    first = ipp + row_cos * ps[1] * shift_cols + col_cos * ps[0] * shift_rows

    return MosaicGeometry(
        n_images=n_images,
        tiles_per_side=tiles,
        tile_rows=tile_rows,
        tile_cols=tile_cols,
        row_cosine=row_cos,
        col_cosine=col_cos,
        slice_normal=normal,
        first_position=first,
        pixel_spacing=(float(ps[0]), float(ps[1])),
        slice_spacing=slice_spacing,
        normal_from_csa=from_csa,
    )


def unmosaic(image: np.ndarray, geom: MosaicGeometry) -> np.ndarray:
    """Split a ``(rows, columns)`` mosaic into a ``(tile_cols, tile_rows, n_images)`` volume.

    The output follows the NIfTI convention used by :class:`emma.io.volume.Volume`:
    ``out[i, j, k]`` is column ``i``, row ``j`` of tile ``k`` (tiles taken row-major).
    """
    t, tr, tc = geom.tiles_per_side, geom.tile_rows, geom.tile_cols
    if image.shape != (t * tr, t * tc):
        raise SeriesError(f"mosaic: pixel array {image.shape} does not match the header layout")
    # (tile row, row in tile, tile col, col in tile) -> (col in tile, row in tile, tile row, tile col)
    blocks = image.reshape(t, tr, t, tc).transpose(3, 1, 0, 2).reshape(tc, tr, t * t)
    return np.ascontiguousarray(blocks[:, :, : geom.n_images])
