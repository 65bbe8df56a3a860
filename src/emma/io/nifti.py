"""NIfTI-1/2 → :class:`emma.io.volume.Volume` via nibabel, in the closest canonical RAS+ orientation.

Bounds are checked from the header before any voxel is read; scl_slope / scl_inter are applied by
nibabel (``get_fdata``); a 4D file gives one 3D volume (the first unless ``volume_index`` is given),
recorded in the volume's load steps.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from emma.errors import CorruptFileError, InputError, SeriesError
from emma.io.limits import DEFAULT_LIMITS, Limits
from emma.io.provenance import Step
from emma.io.volume import Volume, geometry_from_affine, voxel_sizes

_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error, struct.error)


def load_nifti(
    path: str | os.PathLike[str],
    limits: Limits = DEFAULT_LIMITS,
    *,
    volume_index: int | None = None,
) -> Volume:
    """Read a NIfTI file into a float32 :class:`Volume` (canonical RAS+, scaling applied).

    Raises CorruptFileError for unreadable files, ImageTooLargeError over ``limits``, SeriesError for
    layouts that are not one 3D scalar volume (5D+, RGB, ``volume_index`` out of range).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    limits.check_file(p)
    try:
        img = nib.load(str(p))
    except _READ_ERRORS as exc:
        raise CorruptFileError(f"{p}: not a readable NIfTI file") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image, nib.Nifti1Pair, nib.Nifti2Pair)):
        raise CorruptFileError(f"{p}: not a NIfTI image")
    if img.get_data_dtype().fields is not None:
        raise SeriesError(f"{p}: RGB / structured NIfTI data is not a scalar volume")

    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 4 and any(s != 1 for s in shape[4:]):
        raise SeriesError(f"{p}: {len(shape)}D NIfTI with non-trivial dimensions beyond the 4th")
    if len(shape) > 4:
        img = nib.funcs.squeeze_image(img)
        shape = tuple(int(s) for s in img.shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise CorruptFileError(f"{p}: invalid NIfTI dimensions {shape}")
    dims3 = (shape + (1, 1))[:3]
    n_volumes = shape[3] if len(shape) == 4 else 1
    limits.check_image(rows=dims3[1], columns=dims3[0], frames=dims3[2], what=str(p))

    steps: list[Step] = []
    index = 0 if volume_index is None else volume_index
    if not -n_volumes <= index < n_volumes:
        raise SeriesError(f"{p}: volume_index {volume_index} out of range (0..{n_volumes - 1})")
    index %= n_volumes

    try:
        if len(shape) == 4:
            img = img.slicer[:, :, :, index]
            steps.append(Step(op="select_volume", params={"index": index, "of": n_volumes}))
        elif len(shape) == 2:
            img = img.__class__(np.asanyarray(img.dataobj)[:, :, None], img.affine, img.header)
        stored_affine, stored_shape = np.asarray(img.affine, dtype=np.float64), img.shape
        from_codes = "".join(str(c) for c in nib.aff2axcodes(stored_affine))
        canon = nib.as_closest_canonical(img)
        data = canon.get_fdata(dtype=np.float32)
    except _READ_ERRORS as exc:
        raise CorruptFileError(f"{p}: NIfTI voxel data unreadable or truncated") from exc
    affine = np.asarray(canon.affine, dtype=np.float64)
    steps.append(Step(op="canonical", params={"from": from_codes, "to": "RAS"}))

    report = geometry_from_affine(stored_affine, stored_shape)  # slices as stored in the file
    if n_volumes > 1:
        report.notes.append(f"4D NIfTI: volume {index} of {n_volumes}")
    header = img.header
    if int(header.get("sform_code", 0)) == 0 and int(header.get("qform_code", 0)) == 0:
        report.warnings.append("no sform/qform: orientation unknown, nibabel's default affine used")
        report.ok = False
    return Volume(
        data=np.ascontiguousarray(data),
        affine=affine,
        spacing=voxel_sizes(affine),
        modality=None,
        header=None,
        source=str(path),
        geometry=report,
        format="nifti",
        steps=steps,
    )
