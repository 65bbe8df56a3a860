"""DICOM series → 3D volume with a correct affine, geometry checks, and volume → images for a VLM.

Conventions (those of nibabel / NIfTI):

* ``Volume.data[i, j, k]``: ``i`` = column index, ``j`` = row index, ``k`` = slice index, float32 in
  modality units (Hounsfield units for CT).
* ``Volume.affine`` maps ``(i, j, k, 1)`` to RAS+ millimetres (x increases towards the patient's Right,
  y towards Anterior, z towards Superior), i.e. DICOM LPS with x and y negated.

Slices are sorted by their position along the slice normal ``cross(row cosines, column cosines)``,
never by InstanceNumber, and the third affine column is the actual step between slice positions, so
gantry-tilted and oblique stacks get a correct (sheared / oblique) affine.

Why one file (~960 lines): grouping, sorting, affine and geometry checks are one computation over a
series (each step needs the previous one's invariants), and sampling reads the geometry it builds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff, io_orientation
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as PydicomSequence

from emma.errors import CorruptFileError, ImageTooLargeError, InputError, MixedSeriesError, SeriesError
from emma.io import dicom, mosaic
from emma.io.image import ModelImage
from emma.io.limits import DEFAULT_LIMITS, Limits
from emma.io.paths import check_path
from emma.io.provenance import Provenance, Step
from emma.io.windows import Window, gray_to_rgb, to_uint8

Plane = Literal["axial", "coronal", "sagittal"]
SliceMode = Literal["slice", "slab", "mip"]

PLANE_AXIS: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}  # slicing axis in RAS order
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

DUPLICATE_TOL_MM = 0.01  # positions closer than this along the normal are the same slice
SPACING_RTOL = 0.05  # a slice spacing this far (relative) from the median is reported as a gap
SPACING_ATOL_MM = 0.01
IOP_TOL = 1e-4  # orientation differences below this are noise
IOP_REPORT_TOL = 1e-2  # ... below this are tolerated and reported; above, SeriesError
PIXEL_SPACING_RTOL = 1e-4
PIXEL_SPACING_REPORT_RTOL = 1e-2
TILT_TOL_DEGREES = 0.1
OBLIQUE_TOL_DEGREES = 0.5
OBLIQUE_LABEL_DEGREES = 30.0  # a normal further than this from every axis is labelled "oblique"
MAX_DISPLAY_SIDE = 2048  # square-pixel resampling never makes an image side longer than this


# --------------------------------------------------------------------------------------------------
# Data classes


@dataclass
class GeometryReport:
    """What was found about a stack's geometry; JSON-able via :meth:`as_dict`, never PHI."""

    n_slices: int
    slice_spacing: float | None = None  # median distance between slices along the normal, mm
    gaps: list[dict[str, float]] = field(default_factory=list)  # irregular spacings
    duplicates: list[dict[str, float]] = field(default_factory=list)  # repeated positions (one kept)
    mixed_geometry: list[str] = field(default_factory=list)  # small, tolerated header differences
    gantry_tilt: bool = False
    tilt_degrees: float = 0.0  # angle between the slice step and the slice normal
    oblique: bool = False
    oblique_degrees: float = 0.0  # largest angle of a row/column direction from the nearest axis
    orientation: str = "axial"  # axial / coronal / sagittal / oblique (from the slice normal)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # informational (time point chosen, files skipped)
    ok: bool = True

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("slice_spacing", "tilt_degrees", "oblique_degrees"):
            if out[key] is not None:
                out[key] = round(float(out[key]), 4)
        return out


@dataclass
class Volume:
    """A 3D image in modality units with its RAS+ affine (see the module docstring for conventions)."""

    data: np.ndarray  # float32 (I, J, K)
    affine: np.ndarray  # 4x4, (i, j, k, 1) -> RAS+ mm
    spacing: tuple[float, float, float]  # lengths of the affine's first three columns, mm
    modality: str | None  # DICOM Modality ("CT", "MR", ...); None for NIfTI
    header: Dataset | None  # first slice's header (DICOM) for VOI defaults; None for NIfTI
    source: str  # path as given
    geometry: GeometryReport
    format: str = "dicom-series"  # provenance format of images sampled from it ("nifti" for NIfTI)
    steps: list[Step] = field(default_factory=list)  # load-time transforms (time point chosen, ...)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.data.shape[0]), int(self.data.shape[1]), int(self.data.shape[2]))

    def axcodes(self) -> str:
        """Orientation codes of the voxel axes, e.g. ``"LPS"`` for a plain axial DICOM stack."""
        return "".join(str(c) for c in aff2axcodes(self.affine))

    def canonical(self) -> Volume:
        """The same volume with axes flipped / permuted to the closest RAS+ orientation."""
        ornt = io_orientation(self.affine)
        data = np.ascontiguousarray(apply_orientation(self.data, ornt))
        affine = self.affine @ inv_ornt_aff(ornt, self.data.shape)
        return replace(self, data=data, affine=affine, spacing=voxel_sizes(affine))


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Lengths of the first three affine columns (nibabel's voxel sizes)."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


class SeriesGroups(dict[str, list[Path]]):
    """``SeriesInstanceUID -> files``, plus counts of files that were skipped (no PHI)."""

    def __init__(self, groups: dict[str, list[Path]], skipped: dict[str, int]) -> None:
        super().__init__(groups)
        self.skipped: dict[str, int] = dict(skipped)

    @property
    def notes(self) -> list[str]:
        labels = {
            "not_dicom": "non-DICOM or corrupt",
            "no_image": "DICOM without an image",
            "too_large": "over-size",
            "unreadable": "unreadable",
        }
        return [f"skipped {n} {labels.get(k, k)} file(s)" for k, n in self.skipped.items() if n]


# --------------------------------------------------------------------------------------------------
# Finding and grouping files


def find_dicom_files(folder: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS) -> list[Path]:
    """Every visible regular file under ``folder`` (recursive, sorted); more than ``limits.max_slices``
    raises ImageTooLargeError. Whether each one is DICOM is decided when it is read."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if not path.is_file():
                continue
            found.append(path)
            if len(found) > limits.max_slices:
                limits.check_slices(len(found), what=f"{root} (files found so far)")
    return found


def _read_headers(
    paths: Iterable[Path], limits: Limits
) -> tuple[dict[str, list[tuple[Path, Dataset]]], dict[str, int]]:
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    skipped = {"not_dicom": 0, "no_image": 0, "too_large": 0, "unreadable": 0}
    for path in paths:
        try:
            ds = dicom.read_dataset(path, limits, stop_before_pixels=True)
        except CorruptFileError:
            skipped["not_dicom"] += 1
            continue
        except ImageTooLargeError:
            skipped["too_large"] += 1
            continue
        except OSError:
            skipped["unreadable"] += 1
            continue
        if not _header_parses(ds):
            skipped["not_dicom"] += 1
            continue
        if not ds.get("Rows") or not ds.get("Columns"):
            skipped["no_image"] += 1
            continue
        uid = str(ds.get("SeriesInstanceUID") or "")
        groups.setdefault(uid, []).append((Path(path), ds))
    return groups, skipped


# The top-level elements this module reads from a header (grouping, ordering, geometry, description).
_HEADER_KEYWORDS = (
    "Rows",
    "Columns",
    "NumberOfFrames",
    "InstanceNumber",
    "AcquisitionNumber",
    "SeriesInstanceUID",
    "SeriesNumber",
    "Modality",
    "RescaleType",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
)


def _header_parses(ds: Dataset) -> bool:
    """Whether every element this module reads parses (pydicom converts a value when it is first read,
    and raises on one that does not fit its VR); a header where one does not is a corrupt file. Quiet:
    pydicom's validation warnings would quote the values (PHI)."""
    try:
        with dicom.quiet_pydicom():
            for keyword in _HEADER_KEYWORDS:
                ds.get(keyword)
    except Exception:  # noqa: BLE001 — pydicom raises many types on a value it cannot convert
        return False
    return True


def group_series(paths: Iterable[Path], limits: Limits = DEFAULT_LIMITS) -> SeriesGroups:
    """Group image files by SeriesInstanceUID from header-only reads.

    Non-DICOM or corrupt files, files over ``limits.max_file_bytes``, unreadable files and DICOM files
    without an image are skipped and counted in ``.skipped``.
    """
    path_list = [Path(p) for p in paths]
    limits.check_slices(len(path_list), what="file list")
    groups, skipped = _read_headers(path_list, limits)
    return SeriesGroups({uid: [p for p, _ in items] for uid, items in groups.items()}, skipped)


def _resolve_files(
    folder_or_files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], limits: Limits
) -> tuple[list[Path], str]:
    if isinstance(folder_or_files, (str, os.PathLike)):
        items = [Path(folder_or_files)]
        source = str(folder_or_files)
    else:
        items = [Path(p) for p in folder_or_files]
        source = str(items[0].parent) if len(items) > 1 else (str(items[0]) if items else "")
    files: list[Path] = []
    for item in items:
        check_path(item)
        if item.is_dir():
            files.extend(find_dicom_files(item, limits))
        elif item.is_file():
            files.append(item)
        else:
            raise InputError(f"{item}: not a file or folder")
        limits.check_slices(len(files), what=source)
    return files, source


# Series are shown to people by an index and a technical description, never by their UIDs (identifiers
# under PS3.15) nor by free text typed at the scanner (SeriesDescription, ProtocolName: possible PHI).
MAX_LISTED_SERIES = 10


def _series_number(ds: Dataset) -> int | None:
    value = ds.get("SeriesNumber")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def ordered_series(groups: dict[str, list[tuple[Path, Dataset]]]) -> list[str]:
    """The series UIDs of ``groups`` in the order their 1-based indices follow: by SeriesNumber (absent
    last), then modality, then UID (only to make ties stable; never shown)."""

    def key(uid: str) -> tuple[bool, int, str, str]:
        ds = groups[uid][0][1]
        number = _series_number(ds)
        return (number is None, number or 0, str(ds.get("Modality") or ""), uid)

    return sorted(groups, key=key)


def describe_series(headers: list[tuple[Path, Dataset]]) -> str:
    """``"MR series 5, axial, 2 files of 384x384 (mosaic)"``, from header fields that identify no one."""
    ds = headers[0][1]
    parts = [f"{_modality(ds) or 'unknown modality'} series"]
    number = _series_number(ds)
    if number is not None:
        parts.append(str(number))
    text = " ".join(parts)
    iop = _vec(ds.get("ImageOrientationPatient"), 6)
    if iop is not None and np.linalg.norm(np.cross(iop[:3], iop[3:])) > 0.5:
        text += f", {_orientation_label(np.cross(iop[:3], iop[3:]))}"
    n = len(headers)
    size = f"{_int(ds.get('Columns'), 0)}x{_int(ds.get('Rows'), 0)}"
    text += f", {n} file{'s' if n != 1 else ''} of {size}"
    if mosaic.is_mosaic(ds):
        text += " (mosaic)"
    return text


def _series_list(groups: dict[str, list[tuple[Path, Dataset]]], order: list[str]) -> str:
    listed = "; ".join(
        f"{i}: {describe_series(groups[u])}" for i, u in enumerate(order[:MAX_LISTED_SERIES], 1)
    )
    more = f"; and {len(order) - MAX_LISTED_SERIES} more" if len(order) > MAX_LISTED_SERIES else ""
    return listed + more


def _select_series(
    groups: dict[str, list[tuple[Path, Dataset]]],
    series: int | None,
    series_uid: str | None,
    source: str,
    notes: list[str],
) -> tuple[int, list[tuple[Path, Dataset]]]:
    """The chosen series' 1-based index and headers: by ``series`` (index), else ``series_uid`` (the full
    UID, for library callers), else the only one."""
    if not groups:
        extra = f" ({'; '.join(notes)})" if notes else ""
        raise SeriesError(f"{source}: no DICOM images found{extra}")
    order = ordered_series(groups)
    if series is not None:
        if not 1 <= series <= len(order):
            raise SeriesError(
                f"{source}: no series {series}; it holds {len(order)} series ({_series_list(groups, order)})"
            )
        return series, groups[order[series - 1]]
    if series_uid is not None:
        if series_uid not in groups:
            raise SeriesError(f"{source}: the given SeriesInstanceUID is not among its {len(order)} series")
        return order.index(series_uid) + 1, groups[series_uid]
    if len(order) > 1:
        raise MixedSeriesError(
            f"{source}: {len(order)} series found ({_series_list(groups, order)}); choose one with --series N"
        )
    return 1, groups[order[0]]


# --------------------------------------------------------------------------------------------------
# Per-slice header geometry


@dataclass(frozen=True, eq=False)
class _SliceRef:
    """One 2D image of a series: a single-frame file, or one frame of an enhanced multi-frame file."""

    path: Path
    frame: int | None  # frame within the file; None = every frame of a classic multi-frame object
    n_frames: int
    rows: int
    cols: int
    ipp: np.ndarray | None
    iop: np.ndarray | None
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns)
    instance: int


def _vec(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an IS/DS of "inf"
        return default


def _spacing_pair(value: Any) -> tuple[float, float] | None:
    arr = _vec(value, 2)
    if arr is None or np.any(arr <= 0):
        return None
    return (float(arr[0]), float(arr[1]))


def _first_item(value: Any) -> Dataset | None:
    """The first item of a sequence value; None when it is empty or not a sequence (another VR)."""
    if isinstance(value, PydicomSequence) and len(value) and isinstance(value[0], Dataset):
        return value[0]
    return None


def _functional_value(item: Dataset, shared: Dataset | None, sequence: str, keyword: str) -> Any:
    """``keyword`` of a functional group macro (per frame, else shared); None when absent or when it
    does not parse."""
    try:
        for group in (item, shared):
            inner = _first_item(group.get(sequence)) if group is not None else None
            if inner is not None and keyword in inner:
                return inner.get(keyword)
    except Exception:  # noqa: BLE001 — pydicom raises many types on a value it cannot convert
        return None
    return None


def _slice_refs(path: Path, ds: Dataset) -> list[_SliceRef]:
    rows, cols = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
    n_frames = max(1, _int(ds.get("NumberOfFrames"), 1))
    instance = _int(ds.get("InstanceNumber"), 0)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if n_frames > 1 and isinstance(per_frame, PydicomSequence) and len(per_frame) == n_frames:
        shared = _first_item(ds.get("SharedFunctionalGroupsSequence"))
        refs = []
        for f, item in enumerate(per_frame):
            refs.append(
                _SliceRef(
                    path=path,
                    frame=f,
                    n_frames=n_frames,
                    rows=rows,
                    cols=cols,
                    ipp=_vec(
                        _functional_value(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3
                    ),
                    iop=_vec(
                        _functional_value(
                            item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"
                        ),
                        6,
                    ),
                    pixel_spacing=_spacing_pair(
                        _functional_value(item, shared, "PixelMeasuresSequence", "PixelSpacing")
                    ),
                    instance=instance,
                )
            )
        return refs
    spacing = _spacing_pair(ds.get("PixelSpacing")) or _spacing_pair(ds.get("ImagerPixelSpacing"))
    return [
        _SliceRef(
            path=path,
            frame=0 if n_frames == 1 else None,
            n_frames=n_frames,
            rows=rows,
            cols=cols,
            ipp=_vec(ds.get("ImagePositionPatient"), 3),
            iop=_vec(ds.get("ImageOrientationPatient"), 6),
            pixel_spacing=spacing,
            instance=instance,
        )
    ]


def _slice_thickness(ds: Dataset) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = dicom.finite_float(ds.get(keyword))
        if value is not None and value > 0:
            return value
    return None


def _angle_to_axis(vec: np.ndarray) -> float:
    unit = vec / np.linalg.norm(vec)
    return math.degrees(math.acos(min(1.0, float(np.max(np.abs(unit))))))


def _orientation_label(normal: np.ndarray) -> str:
    if _angle_to_axis(normal) > OBLIQUE_LABEL_DEGREES:
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def geometry_from_affine(affine: np.ndarray, shape: Sequence[int]) -> GeometryReport:
    """A geometry report for a volume known only by its affine (NIfTI, mosaic)."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    col_i, col_j, col_k = m[:, 0], m[:, 1], m[:, 2]
    normal = np.cross(col_i, col_j)
    normal /= np.linalg.norm(normal)
    step = col_k / np.linalg.norm(col_k)
    tilt = math.degrees(math.acos(min(1.0, abs(float(np.dot(step, normal))))))
    oblique = max(_angle_to_axis(col_i), _angle_to_axis(col_j))
    report = GeometryReport(
        n_slices=int(shape[2]) if len(shape) > 2 else 1,
        slice_spacing=float(abs(np.dot(col_k, normal))),
        gantry_tilt=tilt > TILT_TOL_DEGREES,
        tilt_degrees=tilt,
        oblique=oblique > OBLIQUE_TOL_DEGREES,
        oblique_degrees=oblique,
        orientation=_orientation_label(normal),
    )
    if report.gantry_tilt:
        report.warnings.append(
            f"sheared stack (tilt {tilt:.1f} degrees): reformatted planes are not de-sheared"
        )
    report.ok = not report.warnings
    return report


@dataclass
class _Stack:
    refs: list[_SliceRef]  # sorted by position, one per kept slice
    affine: np.ndarray  # RAS
    rows: int
    cols: int
    report: GeometryReport


def _check_same_geometry(
    refs: list[_SliceRef], what: str, report: GeometryReport
) -> tuple[np.ndarray, tuple[float, float]]:
    """Raise SeriesError on mixed sizes / orientations / pixel spacings; report small differences."""
    sizes = {(r.rows, r.cols) for r in refs}
    if len(sizes) > 1:
        raise SeriesError(f"{what}: mixed image sizes ({len(sizes)} different rows x columns)")
    iops = np.stack([r.iop for r in refs if r.iop is not None])
    iop_dev = float(np.max(np.abs(iops - iops[0])))
    if iop_dev > IOP_REPORT_TOL:
        n_orient = len({tuple(np.round(v, 2)) for v in iops})
        raise SeriesError(f"{what}: mixed orientations ({n_orient} different ImageOrientationPatient)")
    if iop_dev > IOP_TOL:
        report.mixed_geometry.append(f"orientation differs by up to {iop_dev:.2g} between images")
    spacings = [r.pixel_spacing for r in refs]
    if all(s is None for s in spacings):
        report.warnings.append("no PixelSpacing: 1 mm pixels assumed")
        return iops[0], (1.0, 1.0)
    if any(s is None for s in spacings):
        raise SeriesError(f"{what}: PixelSpacing missing in some images")
    ps = np.array(spacings, dtype=np.float64)
    ps_dev = float(np.max(np.abs(ps - ps[0]) / ps[0]))
    if ps_dev > PIXEL_SPACING_REPORT_RTOL:
        raise SeriesError(f"{what}: mixed pixel spacings (up to {ps_dev:.1%} apart)")
    if ps_dev > PIXEL_SPACING_RTOL:
        report.mixed_geometry.append(f"pixel spacing differs by up to {ps_dev:.2%} between images")
    return iops[0], (float(ps[0, 0]), float(ps[0, 1]))


def _analyse(refs: list[_SliceRef], first_ds: Dataset, what: str) -> _Stack:
    """Sort, deduplicate and check a series' slices from headers alone; build the affine."""
    if any(r.frame is None for r in refs):
        raise SeriesError(
            f"{what}: multi-frame image without per-frame positions is not a volume; read the file as 2D"
        )
    report = GeometryReport(n_slices=len(refs))
    missing = [r for r in refs if r.ipp is None or r.iop is None]
    if missing:
        if len(refs) != 1:
            raise SeriesError(
                f"{what}: {len(missing)} of {len(refs)} images lack "
                "ImagePositionPatient/ImageOrientationPatient"
            )
        ref = refs[0]
        spacing = ref.pixel_spacing or (1.0, 1.0)
        report.warnings.append("single 2D image without patient geometry: axial orientation assumed")
        refs = [replace(ref, ipp=np.zeros(3), iop=np.array([1.0, 0, 0, 0, 1.0, 0]), pixel_spacing=spacing)]

    iop, (row_spacing, col_spacing) = _check_same_geometry(refs, what, report)
    row_cos, col_cos = iop[:3], iop[3:]
    if np.linalg.norm(row_cos) < 0.5 or np.linalg.norm(col_cos) < 0.5:
        raise SeriesError(f"{what}: degenerate ImageOrientationPatient")
    row_cos = row_cos / np.linalg.norm(row_cos)
    col_cos = col_cos / np.linalg.norm(col_cos)
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 0.5:
        raise SeriesError(f"{what}: ImageOrientationPatient rows and columns are not perpendicular")
    normal /= np.linalg.norm(normal)

    positions = np.array([float(np.dot(normal, r.ipp)) for r in refs])  # type: ignore[arg-type]
    order = sorted(
        range(len(refs)), key=lambda n: (positions[n], refs[n].instance, str(refs[n].path), refs[n].frame)
    )

    kept: list[int] = []
    duplicates: list[dict[str, float]] = []
    for n in order:
        if kept and positions[n] - positions[kept[-1]] <= DUPLICATE_TOL_MM:
            if duplicates and duplicates[-1]["position_mm"] == round(positions[kept[-1]], 3):
                duplicates[-1]["count"] += 1
            else:
                duplicates.append({"position_mm": round(float(positions[kept[-1]]), 3), "count": 2})
            continue
        kept.append(n)
    if duplicates:
        dropped = len(order) - len(kept)
        report.duplicates = duplicates
        report.warnings.append(
            f"{len(duplicates)} slice position(s) repeated: kept one image each, dropped {dropped}"
        )

    sorted_refs = [refs[n] for n in kept]
    ipps = np.stack([r.ipp for r in sorted_refs])  # type: ignore[misc]
    pos = positions[kept]
    report.n_slices = len(sorted_refs)
    if len(sorted_refs) == 1:
        thickness = _slice_thickness(first_ds) or 1.0
        step = normal * thickness
        report.slice_spacing = thickness
    else:
        diffs = np.diff(pos)
        median = float(np.median(diffs))
        report.slice_spacing = median
        tol = max(SPACING_ATOL_MM, SPACING_RTOL * median)
        irregular = np.abs(diffs - median) > tol
        for gap in np.flatnonzero(irregular).tolist():
            report.gaps.append(
                {
                    "index": gap + 1,
                    "position_mm": round(float(pos[gap + 1]), 3),
                    "spacing_mm": round(float(diffs[gap]), 4),
                }
            )
        if report.gaps:
            report.warnings.append(
                f"{len(report.gaps)} irregular slice spacing(s) (median {median:.4g} mm): "
                "slices stacked as found"
            )
        steps = np.diff(ipps, axis=0)
        regular = steps[~irregular] if np.any(~irregular) else steps
        step = regular.mean(axis=0)

    tilt = math.degrees(math.acos(min(1.0, abs(float(np.dot(step / np.linalg.norm(step), normal))))))
    report.tilt_degrees = tilt
    report.gantry_tilt = tilt > TILT_TOL_DEGREES
    if report.gantry_tilt:
        report.warnings.append(
            f"gantry tilt / sheared stack ({tilt:.1f} degrees): affine is sheared; "
            "reformatted planes are not de-sheared"
        )
    report.oblique_degrees = max(_angle_to_axis(row_cos), _angle_to_axis(col_cos))
    report.oblique = report.oblique_degrees > OBLIQUE_TOL_DEGREES
    report.orientation = _orientation_label(normal)
    if report.mixed_geometry:
        report.warnings.append("small header differences between images: " + "; ".join(report.mixed_geometry))
    report.ok = not report.warnings

    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_spacing  # i: column index moves along the row direction
    lps[:3, 1] = col_cos * row_spacing  # j: row index moves along the column direction
    lps[:3, 2] = step
    lps[:3, 3] = ipps[0]
    ref0 = sorted_refs[0]
    return _Stack(refs=sorted_refs, affine=LPS_TO_RAS @ lps, rows=ref0.rows, cols=ref0.cols, report=report)


# --------------------------------------------------------------------------------------------------
# Loading


def _series_headers(
    folder_or_files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    series: int | None,
    series_uid: str | None,
    limits: Limits,
) -> tuple[str, str, list[tuple[Path, Dataset]], list[str]]:
    """The source label, a name for messages (``"<source> series N"``), the series' headers, notes."""
    files, source = _resolve_files(folder_or_files, limits)
    groups, skipped = _read_headers(files, limits)
    notes = SeriesGroups({}, skipped).notes
    index, headers = _select_series(groups, series, series_uid, source, notes)
    what = f"{source} series {index}"
    limits.check_slices(len(headers), what=what)
    return source, what, headers, notes


def _modality(ds: Dataset) -> str | None:
    value = ds.get("Modality")
    return str(value) if value else None


def _units(ds: Dataset) -> str | None:
    """Units of the modality values: RescaleType when given, HU for CT, else unknown."""
    rescale_type = ds.get("RescaleType")
    if rescale_type:
        return str(rescale_type)
    return "HU" if _modality(ds) == "CT" else None


def _decoded_values(
    ds: Dataset, limits: Limits, rows: int, cols: int, what: str, frames: list[int] | None = None
) -> np.ndarray:
    """Modality values ``(F, H, W)`` of ``frames`` of a file (all frames when None)."""
    stored = dicom.decode_frames(ds, limits, frames=frames)
    if stored.ndim != 3:
        raise SeriesError(f"{what}: colour images cannot form a volume")
    if stored.shape[1:] != (rows, cols):
        raise SeriesError(
            f"{what}: pixel array {stored.shape[1:]} does not match Rows/Columns {(rows, cols)}"
        )
    return np.asarray(dicom.modality_values(ds, stored, frame_indices=frames), dtype=np.float32)


def _load_mosaic(
    source: str,
    what: str,
    headers: list[tuple[Path, Dataset]],
    notes: list[str],
    time_index: int,
    limits: Limits,
) -> Volume:
    # Each file is one time point: order by acquisition, then instance number.
    timeline = sorted(
        headers,
        key=lambda h: (
            _int(h[1].get("AcquisitionNumber"), 0),
            _int(h[1].get("InstanceNumber"), 0),
            str(h[0]),
        ),
    )
    if not -len(timeline) <= time_index < len(timeline):
        raise SeriesError(f"{what}: time_index {time_index} out of range (0..{len(timeline) - 1})")
    index = time_index % len(timeline)
    path, header = timeline[index]
    geom = mosaic.mosaic_geometry(header)
    for _, other in timeline:
        if (other.get("Rows"), other.get("Columns")) != (header.get("Rows"), header.get("Columns")):
            raise SeriesError(f"{what}: mosaic files of different sizes")
    limits.check_image(geom.tile_rows, geom.tile_cols, geom.n_images, what=what)
    ds = dicom.read_dataset(path, limits)
    values = _decoded_values(ds, limits, int(header.Rows), int(header.Columns), what)
    data = mosaic.unmosaic(values[0], geom).astype(np.float32, copy=False)
    affine = geom.affine()
    report = geometry_from_affine(affine, data.shape)
    report.slice_spacing = geom.slice_spacing
    report.notes = [*notes, f"Siemens mosaic: time point {index} of {len(timeline)}, {geom.n_images} slices"]
    if not geom.normal_from_csa:
        report.warnings.append("mosaic slice normal not in CSA header: cross(row, column) assumed")
        report.ok = False
    steps = [
        Step(op="modality_lut", params={"applied": "per file", "units": _units(header)}),
        Step(op="unmosaic", params={"n_images": geom.n_images, "tiles_per_side": geom.tiles_per_side}),
    ]
    if len(timeline) > 1:
        steps.append(Step(op="select_volume", params={"index": index, "of": len(timeline)}))
    return Volume(
        data=data,
        affine=affine,
        spacing=voxel_sizes(affine),
        modality=_modality(header),
        header=header,
        source=source,
        geometry=report,
        format="dicom-series",
        steps=steps,
    )


def load_series(
    folder_or_files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    series: int | None = None,
    series_uid: str | None = None,
    time_index: int = 0,
    limits: Limits = DEFAULT_LIMITS,
) -> Volume:
    """Read one DICOM series (a folder, or a list of files / folders) into a :class:`Volume`.

    Several series need a choice: ``series``, the 1-based index that :func:`series_summary` (``emma
    info``) lists, or ``series_uid``, the full SeriesInstanceUID; else MixedSeriesError, whose message
    lists them by index and description. Slices are sorted along the slice normal; Siemens mosaics give
    the volume at ``time_index``.
    """
    source, what, headers, notes = _series_headers(folder_or_files, series, series_uid, limits)
    if mosaic.is_mosaic(headers[0][1]):
        return _load_mosaic(source, what, headers, notes, time_index, limits)

    refs = [ref for path, ds in headers for ref in _slice_refs(path, ds)]
    limits.check_slices(len(refs), what=what)
    stack = _analyse(refs, headers[0][1], what)
    stack.report.notes = [*notes, *stack.report.notes]
    k = len(stack.refs)
    limits.check_image(stack.rows, stack.cols, k, what=what)

    header_by_path = {path: ds for path, ds in headers}
    # (volume slice, frame in file); frame None for single-frame files
    slots: dict[Path, list[tuple[int, int | None]]] = {}
    for index, ref in enumerate(stack.refs):
        slots.setdefault(ref.path, []).append((index, ref.frame if ref.n_frames > 1 else None))
    data = np.empty((stack.cols, stack.rows, k), dtype=np.float32)
    for path, wanted in slots.items():
        ds = dicom.read_dataset(path, limits)
        frames = [frame for _, frame in wanted if frame is not None] or None
        values = _decoded_values(ds, limits, stack.rows, stack.cols, what, frames)
        for m, (index, _) in enumerate(wanted):
            data[:, :, index] = values[m].T
    first_header = header_by_path[stack.refs[0].path]
    return Volume(
        data=data,
        affine=stack.affine,
        spacing=voxel_sizes(stack.affine),
        modality=_modality(first_header),
        header=first_header,
        source=source,
        geometry=stack.report,
        format="dicom-series",
        steps=[Step(op="modality_lut", params={"applied": "per file", "units": _units(first_header)})],
    )


def series_summary(
    folder: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS, *, series: int | None = None
) -> list[dict[str, Any]]:
    """Header-only summary of every series under ``folder`` for ``emma info`` (no PHI, no UIDs, no
    decoding), each with the 1-based ``index`` that ``series=`` / ``--series`` chooses; with ``series``,
    that one only."""
    files, source = _resolve_files(folder, limits)
    groups, skipped = _read_headers(files, limits)
    notes = SeriesGroups({}, skipped).notes
    order = ordered_series(groups)
    if series is not None:
        _select_series(groups, series, None, source, notes)  # the same out-of-range error as loading
    out: list[dict[str, Any]] = []
    for index, uid in enumerate(order, 1):
        if series is not None and index != series:
            continue
        headers = groups[uid]
        ds = headers[0][1]
        entry: dict[str, Any] = {
            "index": index,
            "description": describe_series(headers),
            "series_number": _series_number(ds),
            "modality": _modality(ds),
            "files": len(headers),
            "rows": _int(ds.get("Rows"), 0),
            "columns": _int(ds.get("Columns"), 0),
            "mosaic": mosaic.is_mosaic(ds),
        }
        what = f"{source} series {index}"
        try:
            if entry["mosaic"]:
                geom = mosaic.mosaic_geometry(ds)
                report = geometry_from_affine(geom.affine(), geom.shape)
                report.slice_spacing = geom.slice_spacing
                report.notes = [f"Siemens mosaic: {len(headers)} time point(s) of {geom.n_images} slices"]
                entry.update(rows=geom.tile_rows, columns=geom.tile_cols)
                spacing = [geom.pixel_spacing[0], geom.pixel_spacing[1]]
            else:
                refs = [ref for path, h in headers for ref in _slice_refs(path, h)]
                stack = _analyse(refs, ds, what)
                report = stack.report
                spacing = [
                    float(np.linalg.norm(stack.affine[:3, 1])),
                    float(np.linalg.norm(stack.affine[:3, 0])),
                ]
            report.notes = [*notes, *report.notes]
            entry.update(
                pixel_spacing=[round(s, 4) for s in spacing],
                slice_spacing=None if report.slice_spacing is None else round(report.slice_spacing, 4),
                n_slices=report.n_slices,
                orientation=report.orientation,
                geometry=report.as_dict(),
            )
        except SeriesError as exc:
            entry["error"] = str(exc)
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------------
# Volume → images


def _centres(length: int, n: int) -> list[int]:
    """``n`` evenly spaced indices in ``[0, length)``: centres of ``n`` equal bins (no duplicates)."""
    count = max(1, min(n, length))
    return [min(length - 1, int((m + 0.5) * length / count)) for m in range(count)]


def _to_display(image: np.ndarray) -> np.ndarray:
    """RAS-canonical 2D slice ``(a, b)`` -> radiological display ``(rows, cols)``.

    For every plane the two remaining canonical axes increase towards Right/Anterior/Superior; the
    display puts the higher one (b) at the top and the first one (a) running from its high end on the
    left: axial (R on the left, A at the top), coronal (R on the left, S at the top), sagittal
    (A on the left, S at the top).
    """
    return np.ascontiguousarray(image.T[::-1, ::-1])


def _square_pixels(
    gray: Image.Image, row_mm: float, col_mm: float
) -> tuple[Image.Image, dict[str, Any] | None]:
    if row_mm <= 0 or col_mm <= 0 or abs(row_mm / col_mm - 1.0) <= 1e-3:
        return gray, None
    target = min(row_mm, col_mm)
    width = gray.width * col_mm / target
    height = gray.height * row_mm / target
    scale = min(1.0, MAX_DISPLAY_SIDE / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    params = {
        "from": [gray.width, gray.height],
        "to": list(size),
        "reason": "square_pixels",
        "pixel_mm": [round(col_mm, 4), round(row_mm, 4)],
        "filter": "bilinear",
    }
    return gray.resize(size, Image.Resampling.BILINEAR), params


def sample_slices(
    volume: Volume,
    *,
    plane: Plane = "axial",
    n: int = 8,
    mode: SliceMode = "slice",
    slab_mm: float = 10.0,
    window: Window | str | None = None,
) -> list[ModelImage]:
    """``n`` evenly spaced images of ``volume`` in an anatomical ``plane``, in radiological display.

    ``mode="slice"``: single slices; ``"slab"``: mean over ``slab_mm`` around each position; ``"mip"``:
    maximum over ``slab_mm`` (``n=1``: one whole-volume MIP). The volume is first reoriented to the
    closest RAS+ orientation; values are windowed with :func:`emma.io.dicom.apply_voi` (explicit or
    preset window, else the file's VOI, else a percentile window shared by all images), and pixels are
    resampled to be square. Every step is recorded in each image's provenance.
    """
    if plane not in PLANE_AXIS:
        raise ValueError(f"unknown plane {plane!r}: use axial, coronal or sagittal")
    if mode not in ("slice", "slab", "mip"):
        raise ValueError(f"unknown mode {mode!r}: use slice, slab or mip")
    if n < 1:
        raise ValueError("n must be at least 1")
    if not slab_mm > 0:
        raise ValueError("slab_mm must be positive")

    canon = volume.canonical()
    data = canon.data
    pre_steps = [s.model_copy(deep=True) for s in volume.steps]
    pre_steps.append(Step(op="reorient", params={"from": volume.axcodes(), "to": "RAS"}))

    chosen: str = plane
    axis = PLANE_AXIS[plane]
    in_plane = [a for a in range(3) if a != axis]
    flat = [a for a in range(3) if data.shape[a] == 1]
    if data.shape[axis] > 1 and len(flat) == 1 and flat[0] in in_plane:
        # A single slice asked for in another plane: show it in its own plane instead.
        axis = flat[0]
        in_plane = [a for a in range(3) if a != axis]
        chosen = next(p for p, a in PLANE_AXIS.items() if a == axis)
        pre_steps.append(Step(op="plane_fallback", params={"requested": plane, "used": chosen}))

    length = data.shape[axis]
    spacing = canon.spacing
    windows_idx: list[tuple[int | None, int, int]]  # (centre, first, end) along the slicing axis
    if mode == "mip" and n == 1:
        windows_idx = [(None, 0, length)]
    else:
        thick = 1 if mode == "slice" else max(1, round(slab_mm / spacing[axis]))
        half = thick // 2
        windows_idx = []
        for c in _centres(length, n):
            lo = max(0, c - half)
            hi = min(length, lo + thick)
            lo = max(0, hi - thick)
            windows_idx.append((c, lo, hi))

    planes: list[np.ndarray] = []
    for _, lo, hi in windows_idx:
        block = np.take(data, np.arange(lo, hi), axis=axis)
        if mode == "slab":
            flat2d = block.mean(axis=axis, dtype=np.float64).astype(np.float32)
        elif mode == "mip":
            flat2d = block.max(axis=axis)
        else:
            flat2d = np.take(block, 0, axis=axis)
        planes.append(_to_display(flat2d))
    stack = np.stack(planes).astype(np.float32, copy=False)
    nonfinite = ~np.isfinite(stack)
    if nonfinite.any():
        finite = stack[~nonfinite]
        fill = float(finite.min()) if finite.size else 0.0
        stack[nonfinite] = fill
        pre_steps.append(Step(op="fill_nonfinite", params={"value": fill, "count": int(nonfinite.sum())}))

    voi_prov = Provenance(source=volume.source, format=volume.format)
    unit = dicom.apply_voi(stack, volume.header, window, voi_prov)
    invert = volume.header is not None and dicom.is_monochrome1(volume.header)
    # display rows run along in_plane[1], columns along in_plane[0]
    row_mm, col_mm = spacing[in_plane[1]], spacing[in_plane[0]]

    images: list[ModelImage] = []
    for m, (centre, lo, hi) in enumerate(windows_idx):
        prov = Provenance(
            source=volume.source,
            format=volume.format,
            plane=chosen,
            slice_index=centre,
            steps=[s.model_copy(deep=True) for s in pre_steps],
        )
        prov.add("sample", mode=mode, axis=axis, range=[lo, hi], slab_mm=None if mode == "slice" else slab_mm)
        prov.steps.extend(s.model_copy(deep=True) for s in voi_prov.steps)
        if invert:
            prov.add("invert", reason="MONOCHROME1")
        gray = to_uint8(unit[m], invert=invert)
        prov.add("to_uint8")
        pil, resize = _square_pixels(Image.fromarray(gray), row_mm, col_mm)
        if resize is not None:
            prov.add("resize", **resize)
        images.append(ModelImage(pixels=gray_to_rgb(np.asarray(pil, dtype=np.uint8)), provenance=prov))
    return images
