"""One DICOM file → model-ready images, done by the standard (PS3.3 C.7.6.3, C.11).

The pipeline for grayscale pixel data, per frame::

    stored values → Modality LUT (rescale slope/intercept or LUT) → VOI (explicit window or preset,
    else the file's VOI LUT, else the file's window, else a robust percentile window) → MONOCHROME1
    inversion → uint8 with clipping (never wraparound) → RGB

Colour pixel data (RGB, YBR_* converted to RGB by the decoder, PALETTE COLOR through its LUTs) goes
straight to 8-bit RGB. Every step is recorded in the image's :class:`Provenance`.

Bounds (file size, pixels per frame, frames) are checked before anything large is decoded. Errors are
typed (:mod:`emma.errors`) with one-line messages that name the source path and tag keywords, never a
value read from the file (values may be PHI).

Why one file (~840 lines): the standard's pixel pipeline (bounds → decode → modality LUT → VOI →
photometric) is one ordered transform; each stage is a small function in that order.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, convert_color_space, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from emma.errors import (
    CorruptFileError,
    ImageTooLargeError,
    NoPixelDataError,
    UnsupportedTransferSyntaxError,
)
from emma.io.deflate import read_deflated
from emma.io.image import ModelImage
from emma.io.limits import DEFAULT_LIMITS, Limits
from emma.io.provenance import Provenance, Step
from emma.io.windows import (
    VOIFunction,
    Window,
    apply_window,
    parse_window,
    percentile_window,
    window_params,
)

__all__ = [
    "HEADER_DEFER_BYTES",
    "apply_voi",
    "check_pixel_bounds",
    "decode_frames",
    "dicom_images",
    "dicom_summary",
    "finite_float",
    "is_monochrome1",
    "modality_values",
    "read_dataset",
]

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_UNDEFINED_LENGTH = 0xFFFFFFFF
# First tag groups of a DICOM stream written without the 128-byte preamble: file meta or identifying.
_BARE_START_GROUPS = {0x0002, 0x0008}
_YBR_TO_CONVERT = {"YBR_FULL", "YBR_FULL_422"}
# Header-level reads (``emma info``): values over this size (pixel data) stay in the file, see read_dataset.
HEADER_DEFER_BYTES = 64 * 1024
PERCENTILE_LOW = 0.5
PERCENTILE_HIGH = 99.5


# --------------------------------------------------------------------------------------------- reading


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom's value validation off and its warnings ignored: their messages quote element values (PHI).

    pydicom's own context manager swaps a process-wide setting for the duration.
    """
    with pydicom_config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def read_dataset(
    path: str | os.PathLike[str],
    limits: Limits = DEFAULT_LIMITS,
    *,
    stop_before_pixels: bool = False,
    defer_size: int | None = None,
) -> Dataset:
    """Read one DICOM file after checking its size; unreadable or truncated files raise CorruptFileError.

    Files without the 128-byte preamble are accepted when they start like a DICOM stream (group 0002 or
    0008); their transfer syntax is then taken from the encoding pydicom detected. Pixel data are not
    decoded here (see :func:`decode_frames`). A Deflated Explicit VR Little Endian file is inflated
    within ``limits.max_file_bytes`` (:mod:`emma.io.deflate`), else ImageTooLargeError.

    ``stop_before_pixels`` leaves the pixel data out of the dataset (so neither their presence nor their
    completeness is known); ``defer_size`` (pydicom's) keeps them in it but leaves every value over that
    many bytes in the file until it is accessed: a header-level read that still says whether the file
    has pixel data and checks that they are all there (:data:`HEADER_DEFER_BYTES`).
    """
    path = Path(path)
    limits.check_file(path)  # FileNotFoundError / IsADirectoryError pass through as OSError
    size = path.stat().st_size
    with path.open("rb") as f, quiet_pydicom():  # open errors (missing, permissions, ...) stay OSError
        try:
            deflated = read_deflated(f, path, limits.max_file_bytes, stop_before_pixels=stop_before_pixels)
            if deflated is not None:  # inflated within limits.max_file_bytes, never unbounded
                ds, size = deflated
                _check_complete(ds, path, size, stop_before_pixels)
                return ds
            try:
                ds = pydicom.dcmread(
                    f, stop_before_pixels=stop_before_pixels, defer_size=defer_size, force=False
                )
            except InvalidDicomError:
                f.seek(0)
                ds = _read_without_preamble(f, path, stop_before_pixels, defer_size)
        except (CorruptFileError, ImageTooLargeError):
            raise
        except Exception as exc:
            # pydicom raises many types (even OSError) on garbage, and its messages may quote values
            raise CorruptFileError(f"{path}: not a readable DICOM file ({type(exc).__name__})") from None
        _check_complete(ds, path, size, stop_before_pixels)
    return ds


def _read_without_preamble(
    f: BinaryIO, path: Path, stop_before_pixels: bool, defer_size: int | None = None
) -> Dataset:
    head = f.read(8)
    f.seek(0)
    if len(head) < 8:
        raise CorruptFileError(f"{path}: not a DICOM file (too short)")
    group_le = int.from_bytes(head[:2], "little")
    group_be = int.from_bytes(head[:2], "big")
    if group_le not in _BARE_START_GROUPS and group_be not in _BARE_START_GROUPS:
        raise CorruptFileError(f"{path}: not a DICOM file (no DICM marker)")
    ds = pydicom.dcmread(f, stop_before_pixels=stop_before_pixels, defer_size=defer_size, force=True)
    if not any(kw in ds for kw in ("SOPClassUID", "Rows", "Modality", *_PIXEL_KEYWORDS)):
        raise CorruptFileError(f"{path}: not a DICOM file (no DICM marker, no recognisable elements)")
    if not ds.file_meta.get("TransferSyntaxUID"):
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            raise CorruptFileError(f"{path}: cannot determine the transfer syntax")
        ds.file_meta.TransferSyntaxUID = _syntax_for_encoding(implicit, little)
    return ds


def _syntax_for_encoding(implicit: bool, little: bool) -> UID:
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _check_complete(ds: Dataset, path: Path, size: int, stop_before_pixels: bool) -> None:
    """Detect truncation pydicom tolerates: short element values (or, for a value left in the file by
    ``defer_size``, one that would end past the end of the file), or parsing that stopped early at EOF.

    pydicom drops the whole top-level dataset when an undefined-length element runs into EOF (it only
    warns), so an empty dataset is treated as truncated too.
    """
    if len(ds) == 0:
        raise CorruptFileError(f"{path}: no data elements (truncated or empty file)")
    # Only the element read last can be cut short: the reader builds the dataset in file order, and the
    # highest tag is the last one in a well-formed file; both are checked.
    tags = {next(reversed(ds.keys())), max(ds.keys())}
    last_tell, last_end = -1, None
    for tag in tags:
        try:
            elem = ds.get_item(tag, keep_deferred=True)  # a deferred value stays in the file
        except Exception:
            raise CorruptFileError(f"{path}: invalid element {_keyword(tag)}") from None
        if not isinstance(elem, RawDataElement):
            if getattr(elem, "file_tell", None) is not None and elem.file_tell > last_tell:
                last_tell, last_end = elem.file_tell, None  # parsed sequence: its end is unknown
            continue
        value = elem.value
        end: int | None = None
        if elem.length != _UNDEFINED_LENGTH:
            end = elem.value_tell + elem.length
            short = isinstance(value, bytes | bytearray) and len(value) < elem.length
            if short or (value is None and end > size):  # read short, or deferred past the end of file
                raise CorruptFileError(f"{path}: truncated file ({_keyword(elem.tag)} is incomplete)")
        elif isinstance(value, bytes | bytearray):
            end = elem.value_tell + len(value) + 8  # the sequence delimiter item
        if elem.value_tell > last_tell:
            last_tell, last_end = elem.value_tell, end
    # pydicom reads elements until fewer than 8 bytes are left; more means it stopped at a truncated one.
    if not stop_before_pixels and last_end is not None and size - last_end >= 8:
        raise CorruptFileError(f"{path}: truncated file (data end early)")


def _keyword(tag: int) -> str:
    return pydicom.datadict.keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# ------------------------------------------------------------------------------------- element access


def _get(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get`` that turns an unparsable value into CorruptFileError (without quoting the value);
    quiet, as pydicom converts a value when it is first read and its warnings would quote it."""
    try:
        with quiet_pydicom():
            return ds.get(keyword, default)
    except Exception:
        raise CorruptFileError(f"{_what(ds)}: invalid {keyword} element") from None


def _first(value: Any) -> Any:
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return value[0] if len(value) else None
    return value


def _value(ds: Dataset, keyword: str) -> Any:
    """First value of an element; None when absent or empty."""
    value = _first(_get(ds, keyword))
    return None if value is None or value == "" else value


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float; None when it is not one."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _float(ds: Dataset, keyword: str) -> float | None:
    """First value of a numeric element as float; None when absent, empty or not a finite number."""
    value = _value(ds, keyword)
    return None if value is None else finite_float(value)


def _number(ds: Dataset, keyword: str, what: str) -> float | None:
    """First value of a numeric element that the pixel values depend on (rescale slope / intercept):
    None when absent or empty, CorruptFileError when it is not a finite number. Unlike a window, which
    has a standard fallback, a wrong rescale would silently change every value (Hounsfield units)."""
    value = _value(ds, keyword)
    if value is None:
        return None
    out = finite_float(value)
    if out is None:
        raise CorruptFileError(f"{what}: invalid {keyword} element (not a number)")
    return out


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _value(ds, keyword)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an IS/DS of "inf"
        raise CorruptFileError(f"{_what(ds)}: invalid {keyword} element") from None


def header_int(ds: Dataset, keyword: str) -> int | None:
    """First value of an integer element (Rows, NumberOfFrames, ...): None when absent or empty,
    CorruptFileError when it does not parse as a finite number (its value is never quoted)."""
    return _int(ds, keyword)


def _sequence_item(ds: Dataset, keyword: str) -> Dataset | None:
    """The first item of sequence ``keyword``; None when absent or empty, CorruptFileError when the
    element is not a sequence (e.g. written with another VR)."""
    value = _get(ds, keyword)
    if value is None or (isinstance(value, pydicom.sequence.Sequence) and len(value) == 0):
        return None
    if not isinstance(value, pydicom.sequence.Sequence) or not isinstance(value[0], Dataset):
        raise CorruptFileError(f"{_what(ds)}: invalid {keyword} element (not a sequence)")
    return value[0]


def _str(ds: Dataset, keyword: str) -> str | None:
    value = _first(_get(ds, keyword))
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _what(ds: Dataset) -> str:
    filename = getattr(ds, "filename", None)
    return str(filename) if isinstance(filename, str | os.PathLike) else "<dataset>"


def _n_frames(ds: Dataset) -> int:
    n = _int(ds, "NumberOfFrames")
    if n is None or n == 0:
        return 1
    if n < 0:
        raise CorruptFileError(f"{_what(ds)}: invalid NumberOfFrames element")
    return n


def is_monochrome1(ds: Dataset) -> bool:
    """True when the file displays low values bright (Photometric Interpretation MONOCHROME1)."""
    return (_str(ds, "PhotometricInterpretation") or "").upper() == "MONOCHROME1"


def _functional_item(ds: Dataset, sequence: str, frame: int | None) -> Dataset | None:
    """The item of ``sequence`` (e.g. PixelValueTransformationSequence) for ``frame`` of an enhanced
    multi-frame object: the per-frame group first, then the shared group; None when absent."""
    try:
        groups: list[Any] = []
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame and frame is not None and frame < len(per_frame):
            groups.append(per_frame[frame])
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            groups.append(shared[0])
        for group in groups:
            items = group.get(sequence)
            if items:
                return items[0]
    except Exception:
        raise CorruptFileError(f"{_what(ds)}: invalid functional groups ({sequence})") from None
    return None


# ---------------------------------------------------------------------------------------- decoding


def check_pixel_bounds(ds: Dataset, limits: Limits, what: str) -> tuple[int, int, int]:
    """Check Rows x Columns and NumberOfFrames against ``limits`` before any pixel data is decoded;
    returns ``(rows, columns, frames)``."""
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    if rows is None or columns is None:
        raise CorruptFileError(f"{what}: pixel data without Rows/Columns")
    frames = _n_frames(ds)
    limits.check_image(rows, columns, frames, what=what)
    return rows, columns, frames


def _transfer_syntax(ds: Dataset, what: str) -> UID:
    file_meta = getattr(ds, "file_meta", None)
    uid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not uid:
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            raise CorruptFileError(f"{what}: no TransferSyntaxUID in the file meta information")
        return _syntax_for_encoding(implicit, little)
    return UID(str(uid))


@dataclass(frozen=True)
class _Color:
    """How colour pixel data was made RGB: the file's photometric interpretation and the RGB bit depth."""

    photometric: str
    bits: int


def _frame_indices(frames: Sequence[int] | None, n_frames: int, what: str) -> list[int] | None:
    if frames is None:
        return None
    indices = [int(i) for i in frames]
    if not indices:
        raise ValueError(f"{what}: no frames selected")
    bad = [i for i in indices if not 0 <= i < n_frames]
    if bad:
        raise ValueError(f"{what}: frame index {bad[0]} out of range (the file has {n_frames} frames)")
    return indices


def _decode(
    ds: Dataset, limits: Limits, indices: list[int] | None, what: str
) -> tuple[np.ndarray, _Color | None]:
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        raise NoPixelDataError(f"{what}: no pixel data ({_str(ds, 'Modality') or 'unknown'} object)")
    check_pixel_bounds(ds, limits, what)
    tsyntax = _transfer_syntax(ds, what)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(
            f"{what}: no decoder for transfer syntax {tsyntax.name} ({tsyntax})"
        ) from None
    if not decoder.is_available:
        raise UnsupportedTransferSyntaxError(
            f"{what}: decoder plugins for {tsyntax.name} ({tsyntax}) are not installed"
        )
    samples = _int(ds, "SamplesPerPixel") or 1
    photometric = (_str(ds, "PhotometricInterpretation") or "").upper()
    try:
        if indices is None:
            arr, changes = decoder.as_array(ds, as_rgb=True)
            arr = _as_frames(arr, samples)
        else:
            parts = [decoder.as_array(ds, index=i, as_rgb=True) for i in indices]
            changes = parts[0][1] if parts else {}
            arr = np.stack([_as_frames(a, samples)[0] for a, _ in parts]) if parts else np.empty((0,))
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(
            f"{what}: pixel data in {tsyntax.name} with this layout cannot be decoded"
        ) from None
    except Exception as exc:
        # length mismatches, invalid group 0028 values, broken fragments, or every plugin failing
        raise CorruptFileError(
            f"{what}: cannot decode {tsyntax.name} pixel data ({_decode_reason(exc)})"
        ) from None
    except BaseException as exc:
        if not _is_plugin_panic(exc):
            raise
        raise CorruptFileError(f"{what}: cannot decode {tsyntax.name} pixel data (decoder failed)") from None

    if samples == 3:
        decoded_as = str(changes.get("photometric_interpretation", photometric)).upper()
        if decoded_as in _YBR_TO_CONVERT:
            arr = convert_color_space(arr, decoded_as, "RGB")
        bits = _int(ds, "BitsStored") or arr.dtype.itemsize * 8
        return arr, _Color(photometric=photometric, bits=min(bits, arr.dtype.itemsize * 8))
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception:
            raise CorruptFileError(f"{what}: invalid palette colour lookup tables") from None
        # LUT entries are 8 or 16 bits (descriptor's third value); pydicom returns uint8 or uint16
        return rgb, _Color(photometric=photometric, bits=8 if rgb.dtype.itemsize == 1 else 16)
    if samples != 1:
        raise CorruptFileError(f"{what}: unsupported SamplesPerPixel {samples}")
    return arr, None


def _is_plugin_panic(exc: BaseException) -> bool:
    """A decoder written in Rust that panicked on corrupt data (pylibjpeg-rle does): pyo3 raises its
    ``PanicException``, a BaseException that ``except Exception`` does not catch."""
    return type(exc).__name__ == "PanicException" and type(exc).__module__ == "pyo3_runtime"


def _decode_reason(exc: Exception) -> str:
    text = str(exc)
    if "less than expected" in text:
        return "pixel data are truncated"
    if "all available plugins" in text:
        return "corrupt data, or a variant the installed decoders do not support"
    return type(exc).__name__


def _as_frames(arr: np.ndarray, samples: int) -> np.ndarray:
    """(H, W[, S]) or (F, H, W[, S]) → (F, H, W[, S])."""
    single_ndim = 2 if samples == 1 else 3
    return arr[None] if arr.ndim == single_ndim else arr


def decode_frames(
    ds: Dataset, limits: Limits = DEFAULT_LIMITS, *, frames: Sequence[int] | None = None
) -> np.ndarray:
    """Decoded pixel values: ``(F, H, W)`` stored values for grayscale, ``(F, H, W, 3)`` RGB for colour.

    YBR_FULL / YBR_FULL_422 / YBR_RCT / YBR_ICT are returned as RGB, PALETTE COLOR through its LUTs.
    ``frames`` selects frame indices (only those are decoded). Bounds are checked first.
    """
    what = _what(ds)
    indices = _frame_indices(frames, _n_frames(ds), what) if frames is not None else None
    with quiet_pydicom():
        arr, _ = _decode(ds, limits, indices, what)
    return arr


# ------------------------------------------------------------------------------------ modality LUT


@dataclass(frozen=True)
class _Lut:
    table: np.ndarray  # entries as stored, 1-D
    first_mapped: int
    bits: int


def _read_lut(ds: Dataset, item: Dataset, what: str, name: str) -> _Lut:
    """Parse one LUT item (LUTDescriptor + LUTData), US or OW, per PS3.3 C.11.1.1 / C.11.2.1.1."""
    try:
        descriptor = [int(v) for v in item.LUTDescriptor]
        elem = item["LUTData"]
        data = elem.value
    except Exception:
        raise CorruptFileError(f"{what}: invalid {name} (LUTDescriptor/LUTData)") from None
    if len(descriptor) != 3:
        raise CorruptFileError(f"{what}: invalid {name} LUTDescriptor")
    n_entries, first_mapped, bits = descriptor
    n_entries = n_entries or 65536
    if first_mapped >= 32768 and (_int(ds, "PixelRepresentation") or 0) == 1:
        first_mapped -= 65536  # an SS value read as US
    if isinstance(data, bytes | bytearray):
        implicit, little = ds.original_encoding
        file_meta = getattr(ds, "file_meta", None)
        if file_meta is not None and file_meta.get("TransferSyntaxUID"):
            little = UID(str(file_meta.TransferSyntaxUID)).is_little_endian
        endian = "<" if little is not False else ">"
        if len(data) >= 2 * n_entries:
            table = np.frombuffer(bytes(data[: 2 * n_entries]), dtype=f"{endian}u2")
        elif bits == 8 and len(data) >= n_entries:
            table = np.frombuffer(bytes(data[:n_entries]), dtype=np.uint8)
        else:
            raise CorruptFileError(f"{what}: {name} LUTData shorter than its descriptor")
    else:
        values = data if isinstance(data, list | tuple | pydicom.multival.MultiValue) else [data]
        try:
            table = np.asarray([int(v) for v in values], dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise CorruptFileError(f"{what}: invalid {name} LUTData") from None
    if table.size == 0:
        raise CorruptFileError(f"{what}: empty {name} LUTData")
    if not 1 <= bits <= 16:
        bits = int(max(int(table.max()), 1)).bit_length()
    return _Lut(table=table.astype(np.float32), first_mapped=first_mapped, bits=bits)


def _lut_lookup(values: np.ndarray, lut: _Lut, table: np.ndarray) -> np.ndarray:
    """``table[clip(round(values) - first_mapped, 0, n - 1)]``: inputs below/above the LUT map to its ends."""
    idx = np.rint(values.astype(np.float32, copy=False))
    idx -= np.float32(lut.first_mapped)
    np.nan_to_num(idx, copy=False, nan=0.0)  # float pixel data: NaN maps to the first entry
    np.clip(idx, 0, table.size - 1, out=idx)
    return table[idx.astype(np.intp)]


@dataclass(frozen=True)
class _Modality:
    lut: _Lut | None  # Modality LUT Sequence, else
    slopes: list[float]  # one rescale per frame of the object (or a single one for all frames)
    intercepts: list[float]
    source: str  # "lut_sequence" | "rescale" | "functional_groups" | "none"

    def params(self, frame: int) -> dict[str, Any]:
        if self.lut is not None:
            return {
                "lut_sequence": True,
                "entries": int(self.lut.table.size),
                "first_mapped": self.lut.first_mapped,
                "bits": self.lut.bits,
            }
        k = frame if len(self.slopes) > 1 else 0
        return {"slope": self.slopes[k], "intercept": self.intercepts[k], "source": self.source}


def _modality(ds: Dataset) -> _Modality:
    what = _what(ds)
    item = _sequence_item(ds, "ModalityLUTSequence")
    if item is not None:
        return _Modality(_read_lut(ds, item, what, "ModalityLUTSequence"), [1.0], [0.0], "lut_sequence")
    slope, intercept = _number(ds, "RescaleSlope", what), _number(ds, "RescaleIntercept", what)
    if slope is not None or intercept is not None:
        return _Modality(None, [_valid_slope(slope)], [intercept or 0.0], "rescale")
    if _get(ds, "PerFrameFunctionalGroupsSequence") or _get(ds, "SharedFunctionalGroupsSequence"):
        slopes, intercepts, found = [], [], False
        for frame in range(_n_frames(ds)):
            item = _functional_item(ds, "PixelValueTransformationSequence", frame)
            s = _number(item, "RescaleSlope", what) if item is not None else None
            b = _number(item, "RescaleIntercept", what) if item is not None else None
            found = found or s is not None or b is not None
            slopes.append(_valid_slope(s))
            intercepts.append(b or 0.0)
        if found:
            if len(set(zip(slopes, intercepts, strict=True))) == 1:
                slopes, intercepts = slopes[:1], intercepts[:1]
            return _Modality(None, slopes, intercepts, "functional_groups")
    return _Modality(None, [1.0], [0.0], "none")


def _valid_slope(slope: float | None) -> float:
    # A zero slope would flatten the image; files carrying it mean "no rescale".
    return 1.0 if slope is None or slope == 0.0 else slope


def modality_values(
    ds: Dataset, stored: np.ndarray, *, frame_indices: Sequence[int] | None = None
) -> np.ndarray:
    """Modality LUT output as float32 (Hounsfield units for CT): Modality LUT Sequence, else rescale
    slope/intercept (top level, or per frame from enhanced functional groups), else the stored values.

    ``stored`` is ``(F, H, W)`` (or ``(H, W)``); ``frame_indices`` names the file frames it holds when
    it is a subset (per-frame rescale). Signed stored values come from the decoder already signed.
    """
    return _modality_values(_modality(ds), stored, frame_indices)


def _modality_values(
    modality: _Modality, stored: np.ndarray, frame_indices: Sequence[int] | None
) -> np.ndarray:
    if modality.lut is not None:
        return _lut_lookup(stored, modality.lut, modality.lut.table)
    if len(modality.slopes) == 1:  # always a fresh float32 array: callers may work on it in place
        slope, intercept = modality.slopes[0], modality.intercepts[0]
        if slope != 1.0:
            out = np.multiply(stored, np.float32(slope), dtype=np.float32)
            if intercept != 0.0:
                out += np.float32(intercept)
            return out
        if intercept != 0.0:
            return np.add(stored, np.float32(intercept), dtype=np.float32)
        return stored.astype(np.float32)
    out = stored.astype(np.float32)
    frames = list(frame_indices) if frame_indices is not None else list(range(out.shape[0]))
    if out.ndim != 3 or len(frames) != out.shape[0]:
        raise ValueError("per-frame rescale needs stored values shaped (F, H, W) matching frame_indices")
    for k, frame in enumerate(frames):
        out[k] *= np.float32(modality.slopes[frame])
        out[k] += np.float32(modality.intercepts[frame])
    return out


# ------------------------------------------------------------------------------------------------ VOI


def _file_window(ds: Dataset) -> tuple[Window | None, dict[str, Any]]:
    """The file's first window (top level, else enhanced functional groups) or None; notes if invalid."""
    holder: Dataset | None = ds
    if _get(ds, "WindowCenter") is None or _get(ds, "WindowWidth") is None:
        holder = _functional_item(ds, "FrameVOILUTSequence", 0)
    if holder is None:
        return None, {}
    center, width = _float(holder, "WindowCenter"), _float(holder, "WindowWidth")
    if center is None or width is None:
        return None, ({"file_window_invalid": True} if "WindowCenter" in holder else {})
    name = (_str(holder, "VOILUTFunction") or "LINEAR").upper()
    try:
        function = VOIFunction(name)
    except ValueError:
        function = VOIFunction.LINEAR  # C.11.2.1.3: unknown/absent function means LINEAR
    if width <= 0 or (function is VOIFunction.LINEAR and width < 1):
        return None, {"file_window_invalid": True}
    return Window(center, width, function), {}


def _file_voi_lut(ds: Dataset) -> _Lut | None:
    item = _sequence_item(ds, "VOILUTSequence")
    if item is None:
        return None
    if "LUTDescriptor" not in item or "LUTData" not in item:
        return None
    return _read_lut(ds, item, _what(ds), "VOILUTSequence")


def _percentile_window(values: np.ndarray, what: str) -> Window:
    flat = values.reshape(-1)
    sample = flat[:: max(1, flat.size // 1_000_000)]
    if sample.dtype.kind == "f" and not np.isfinite(sample).all():
        # float pixel data, or a rescale that overflows float32 (e.g. RescaleSlope 1e38)
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            raise CorruptFileError(f"{what}: no finite pixel values (after the modality LUT)")
    return percentile_window(sample, PERCENTILE_LOW, PERCENTILE_HIGH)


def _unit_window(values: np.ndarray, window: Window) -> np.ndarray:
    """:func:`emma.io.windows.apply_window` with one allocation (same float32 arithmetic)."""
    if window.function is VOIFunction.SIGMOID:
        return apply_window(values, window)
    x = values.astype(np.float32, copy=False)
    c, w = np.float32(window.center), np.float32(window.width)
    if window.function is VOIFunction.LINEAR_EXACT:
        lo, span = c - w / 2, w
    else:
        span = max(w - 1, np.float32(1))
        lo = c - 0.5 - span / 2
    out = np.subtract(x, lo, dtype=np.float32)
    out *= 1.0 / span
    np.clip(out, 0.0, 1.0, out=out)
    return out


def apply_voi(
    values: np.ndarray,
    ds: Dataset | None,
    window: Window | str | None,
    prov: Provenance,
) -> np.ndarray:
    """VOI transform of modality values to float32 in ``[0, 1]``, recorded as one "voi" step in ``prov``.

    Priority: ``window`` (a :class:`Window`, or a preset name / ``"C,W"``) → the file's VOI LUT
    Sequence (normalised by the LUT's output bit depth) → the file's first WindowCenter/WindowWidth
    with its VOILUTFunction → a robust percentile window. ``values`` may be one frame or a whole volume.
    """
    extra: dict[str, Any] = {}
    if isinstance(window, Window):
        prov.add("voi", **window_params(window, "explicit"))
        return _unit_window(values, window)
    if isinstance(window, str):
        parsed, label = parse_window(window)
        prov.add("voi", **window_params(parsed, label))
        return _unit_window(values, parsed)
    if window is not None:
        raise TypeError(f"window must be a Window, a string or None, not {type(window).__name__}")
    if ds is not None:
        lut = _file_voi_lut(ds)
        if lut is not None:
            top = max(float(2**lut.bits - 1), float(lut.table.max()), 1.0)
            table = np.clip(lut.table / np.float32(top), 0.0, 1.0).astype(np.float32)
            prov.add(
                "voi",
                source="file:voi_lut",
                entries=int(lut.table.size),
                first_mapped=lut.first_mapped,
                bits=lut.bits,
            )
            return _lut_lookup(values, lut, table)
        file_window, extra = _file_window(ds)
        if file_window is not None:
            prov.add("voi", **window_params(file_window, "file:window"))
            return _unit_window(values, file_window)
    fallback = _percentile_window(values, prov.source)
    prov.add(
        "voi", **window_params(fallback, "percentile"), low=PERCENTILE_LOW, high=PERCENTILE_HIGH, **extra
    )
    return _unit_window(values, fallback)


# ------------------------------------------------------------------------------------------ pipeline


def _unit_to_uint8(unit: np.ndarray, invert: bool) -> np.ndarray:
    """:func:`emma.io.windows.to_uint8` done in place on ``unit`` (which this module owns; it comes from
    :func:`apply_voi`, already clipped to [0, 1], so the clip is not repeated)."""
    if invert:
        np.subtract(1.0, unit, out=unit)
    unit *= 255.0
    np.rint(unit, out=unit)
    return unit.astype(np.uint8)


def _color_to_uint8(rgb: np.ndarray, color: _Color) -> tuple[np.ndarray, dict[str, Any]]:
    if rgb.dtype == np.uint8 and color.bits <= 8:
        return rgb, {"bits": 8, "method": "none"}
    top = float(2**color.bits - 1)
    scaled = rgb.astype(np.float32)
    scaled *= np.float32(255.0 / top)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8), {"bits": color.bits, "method": "scale"}


def dicom_images(
    path_or_ds: str | os.PathLike[str] | Dataset,
    *,
    window: Window | str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    frames: Sequence[int] | None = None,
    source: str | None = None,
) -> list[ModelImage]:
    """One DICOM file (or dataset) → one RGB uint8 :class:`ModelImage` per frame, with provenance.

    Grayscale: modality LUT → VOI (``window`` overrides the file) → MONOCHROME1 inversion → uint8.
    Colour: RGB (after YBR/palette conversion) scaled to 8 bits; ``window`` does not apply.
    ``frames`` selects frame indices (default all); the VOI window is shared by the selected frames.
    """
    # quiet throughout: pydicom converts element values when they are first read, and its validation
    # warnings would quote them (PHI)
    with quiet_pydicom():
        return _dicom_images(path_or_ds, window=window, limits=limits, frames=frames, source=source)


def _dicom_images(
    path_or_ds: str | os.PathLike[str] | Dataset,
    *,
    window: Window | str | None,
    limits: Limits,
    frames: Sequence[int] | None,
    source: str | None,
) -> list[ModelImage]:
    if isinstance(path_or_ds, Dataset):
        ds = path_or_ds
        src = source or _what(ds)
    else:
        ds = read_dataset(path_or_ds, limits)
        src = source or str(path_or_ds)
    n_frames = _n_frames(ds)
    indices = _frame_indices(frames, n_frames, src)
    arr, color = _decode(ds, limits, indices, src)
    frame_ids = indices if indices is not None else list(range(arr.shape[0]))

    shared = Provenance(source=src, format="dicom")
    per_frame_steps: list[list[Step]]
    if color is not None:
        rgb8, to8 = _color_to_uint8(arr, color)
        shared.add("color", photometric=color.photometric, to="RGB", window_ignored=window is not None)
        shared.add("to_uint8", **to8)
        per_frame_steps = [[] for _ in frame_ids]
        frames_rgb = [np.ascontiguousarray(rgb8[k]) for k in range(len(frame_ids))]
    else:
        modality = _modality(ds)
        values = _modality_values(modality, arr, frame_ids)
        del arr
        unit = apply_voi(values, ds, window, shared)
        del values
        if "PixelData" not in ds:  # float pixel data may hold NaN/inf
            np.nan_to_num(unit, copy=False, nan=0.0)
        invert = is_monochrome1(ds)
        if invert:
            shared.add("invert", reason="MONOCHROME1")
        gray8 = _unit_to_uint8(unit, invert)
        shared.add("to_uint8", method="round_clip", range=[0, 255])
        per_frame_steps = [[Step(op="modality_lut", params=modality.params(i))] for i in frame_ids]
        frames_rgb = [np.stack((gray8[k],) * 3, axis=-1) for k in range(len(frame_ids))]

    images = []
    for k, i in enumerate(frame_ids):
        shared_steps = (
            shared.steps if len(frame_ids) == 1 else [s.model_copy(deep=True) for s in shared.steps]
        )
        steps = per_frame_steps[k] + shared_steps
        prov = Provenance(source=src, format="dicom", frame=i, steps=steps)
        images.append(ModelImage(pixels=frames_rgb[k], provenance=prov))
    return images


# ------------------------------------------------------------------------------------------- summary


def _floats(ds: Dataset, keyword: str) -> list[float] | None:
    value = _get(ds, keyword)
    if value is None or value == "":
        return None
    values = value if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if all(np.isfinite(out)) else None


def dicom_summary(ds: Dataset) -> dict[str, Any]:
    """JSON-able technical summary of a dataset: geometry, encoding, windowing. No PHI and no UIDs
    except the transfer syntax (a standard UID)."""
    with quiet_pydicom():  # values are converted as they are read: no validation warning quotes one
        return _dicom_summary(ds)


def _dicom_summary(ds: Dataset) -> dict[str, Any]:
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    sop_class = _get(ds, "SOPClassUID")
    spacing = _floats(ds, "PixelSpacing") or _floats(ds, "ImagerPixelSpacing")
    thickness = _float(ds, "SliceThickness")
    if spacing is None or thickness is None:
        measures = _functional_item(ds, "PixelMeasuresSequence", 0)
        if measures is not None:
            spacing = spacing or _floats(measures, "PixelSpacing")
            thickness = thickness if thickness is not None else _float(measures, "SliceThickness")
    file_window, _ = _file_window(ds)
    modality = _modality(ds)
    image_type = _get(ds, "ImageType")
    return {
        "modality": _str(ds, "Modality"),
        "body_part": _str(ds, "BodyPartExamined"),
        "sop_class": UID(str(sop_class)).name if sop_class else None,
        "image_type": [str(v) for v in image_type]
        if isinstance(image_type, list | pydicom.multival.MultiValue)
        else None,
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "frames": _n_frames(ds),
        "samples_per_pixel": _int(ds, "SamplesPerPixel"),
        "photometric_interpretation": _str(ds, "PhotometricInterpretation"),
        "bits_allocated": _int(ds, "BitsAllocated"),
        "bits_stored": _int(ds, "BitsStored"),
        "pixel_representation": _int(ds, "PixelRepresentation"),
        "pixel_spacing": spacing,
        "slice_thickness": thickness,
        "transfer_syntax": {"name": UID(str(ts)).name, "uid": str(ts)} if ts else None,
        "has_pixel_data": any(kw in ds for kw in _PIXEL_KEYWORDS),
        "window": (
            {"center": file_window.center, "width": file_window.width, "function": str(file_window.function)}
            if file_window is not None
            else None
        ),
        "has_voi_lut": bool(_get(ds, "VOILUTSequence")),
        "has_modality_lut": modality.lut is not None,
        "rescale_slope": modality.slopes[0] if modality.lut is None else None,
        "rescale_intercept": modality.intercepts[0] if modality.lut is None else None,
        "rescale_source": modality.source,
    }
