"""Raster images (PNG, JPEG, TIFF, BMP, GIF, WebP) → model-ready RGB uint8 images with provenance.

- 8-bit grayscale → RGB; RGBA / LA → alpha dropped; palette, CMYK, YCbCr → RGB; EXIF orientation
  applied (recorded).
- High bit depth grayscale (16-bit PNG/TIFF: PIL modes ``I;16*``, 32-bit ``I``, float ``F``) → float →
  explicit window / preset or a robust percentile window → uint8 with clipping. Never ``>> 8``, never
  wraparound.
- Multi-page TIFF (and animated GIF/WebP) → one image per frame.

Input is a file path, or the file's content in memory (``bytes``) or a binary file object (read from
its current position), e.g. an upload the server has decoded, so there is no temporary file; all take
the same path through here. Bounds (byte size first) are checked after :func:`PIL.Image.open` (which
reads only the header) and before any pixel data is decoded.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from emma.errors import CorruptFileError, ImageTooLargeError
from emma.io.image import ImageFit, ModelImage, fit_array
from emma.io.limits import DEFAULT_LIMITS, Limits
from emma.io.provenance import Provenance
from emma.io.windows import (
    Window,
    apply_window,
    gray_to_rgb,
    parse_window,
    percentile_window,
    to_uint8,
    window_params,
)

__all__ = ["RASTER_FORMATS", "RasterSource", "raster_geometry", "raster_images", "raster_summary"]

# A file path, a file's content, or a binary file object (read from its current position).
RasterSource: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO
MEMORY_LABEL = "<memory>"  # names in-memory input in provenance and messages when no source is given

# PIL format name → provenance format. Only these decoders are enabled (no EPS/PDF/... plugins).
RASTER_FORMATS: dict[str, str] = {
    "PNG": "png",
    "JPEG": "jpeg",
    "MPO": "jpeg",
    "TIFF": "tiff",
    "BMP": "bmp",
    "GIF": "gif",
    "WEBP": "webp",
}
_OPEN_FORMATS = ["PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP"]  # the JPEG plugin also yields MPO
_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_EXIF_ORIENTATION = 0x0112
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
)


def open_input(source: RasterSource, limits: Limits, label: str | None = None) -> tuple[Path | BinaryIO, str]:
    """``(what PIL opens, its label)`` after the byte-size bound: a :class:`Path`, or a seekable binary
    stream over the content (a file object not at its start, or not seekable, is read from where it is,
    bounded, into memory: PIL reads a stream from its start)."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        limits.check_file(path)
        return path, str(path)
    what = label or MEMORY_LABEL
    if isinstance(source, bytes | bytearray | memoryview):
        size = memoryview(source).nbytes
        stream: BinaryIO = io.BytesIO(source)
    elif callable(getattr(source, "read", None)):
        stream = source  # type: ignore[assignment]
        if getattr(stream, "seekable", lambda: False)() and stream.tell() == 0:
            size = stream.seek(0, io.SEEK_END)
            stream.seek(0)
        else:
            data = stream.read(limits.max_file_bytes + 1)
            size, stream = len(data), io.BytesIO(data)
    else:
        raise TypeError(f"expected a path, bytes or a binary file object, got {type(source).__name__}")
    if size > limits.max_file_bytes:
        raise ImageTooLargeError(f"{what}: file is {size} bytes, over the limit of {limits.max_file_bytes}")
    return stream, what


def _open(fp: Path | BinaryIO, what: str | Path) -> Image.Image:
    try:
        return Image.open(fp, formats=_OPEN_FORMATS)
    except Image.DecompressionBombError:
        raise ImageTooLargeError(f"{what}: image dimensions over the decoder's safety bound") from None
    except UnidentifiedImageError:
        raise CorruptFileError(f"{what}: not a supported image (PNG, JPEG, TIFF, BMP, GIF, WebP)") from None
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as exc:
        raise CorruptFileError(f"{what}: unreadable image header ({type(exc).__name__})") from None


def _n_frames(im: Image.Image, what: str | Path) -> int:
    try:
        return int(getattr(im, "n_frames", 1))
    except _DECODE_ERRORS as exc:
        raise CorruptFileError(f"{what}: unreadable frame directory ({type(exc).__name__})") from None


def _resolve_window(window: Window | str | None) -> tuple[Window | None, str]:
    if isinstance(window, Window):
        return window, "explicit"
    if isinstance(window, str):
        return parse_window(window)
    return None, ""


def _gray_to_uint8(
    values: np.ndarray, window: Window | None, label: str, prov: Provenance, *, fallback: bool
) -> np.ndarray:
    """Window grayscale ``values`` to uint8: the given window, else (when ``fallback``) a percentile one,
    else the values unchanged (already 8-bit)."""
    if window is None and not fallback:
        return values.astype(np.uint8, copy=False)
    x = values.astype(np.float32, copy=False)
    finite = np.isfinite(x) if x.dtype.kind == "f" else None
    has_nonfinite = finite is not None and not finite.all()
    if window is None:
        sample = x[finite] if has_nonfinite else x
        if sample.size == 0:
            raise CorruptFileError(f"{prov.source}: image has no finite pixel values")
        window, label = percentile_window(sample), "percentile"
    prov.add("voi", **window_params(window, label))
    unit = apply_window(x, window)
    if has_nonfinite:
        unit = np.nan_to_num(unit, nan=0.0)
    prov.add("to_uint8", method="round_clip", range=[0, 255])
    return to_uint8(unit)


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF: ignore it rather than refuse the image
        return 1


def _frame_to_rgb(
    im: Image.Image, window: Window | None, label: str, prov: Provenance, fit: ImageFit | None = None
) -> np.ndarray:
    """One decoded frame → RGB uint8, downscaled to ``fit`` at the cheapest point: grayscale after its
    window (one byte per pixel), colour as the PIL image, before the RGB array is made."""
    mode = im.mode
    if mode in _HIGH_DEPTH_MODES:
        prov.add("decode", mode=mode)
        gray = _gray_to_uint8(np.asarray(im), window, label, prov, fallback=True)
        return gray_to_rgb(fit_array(gray, fit, prov))
    if mode in ("L", "LA", "1", "La"):
        if mode != "L":
            im = im.convert("L")
            prov.add(
                "convert",
                mode_from=mode,
                mode_to="L",
                alpha="dropped" if "A" in mode or "a" in mode else None,
            )
        gray = _gray_to_uint8(np.asarray(im), window, label, prov, fallback=False)
        return gray_to_rgb(fit_array(gray, fit, prov))
    if mode != "RGB":
        converted = im.convert("RGB")
        prov.add(
            "convert", mode_from=mode, mode_to="RGB", alpha="dropped" if "A" in mode or "a" in mode else None
        )
        im = converted
    if window is not None:
        prov.add("color", to="RGB", window_ignored=True)
    if fit is not None and fit.size_for(*im.size) != im.size:
        target = fit.size_for(*im.size)
        prov.add(
            "resize",
            **{"from": list(im.size), "to": list(target), "method": "lanczos", "reason": fit.reason},
        )
        im = im.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0)
    return np.array(im, dtype=np.uint8)


def raster_images(
    path: RasterSource,
    *,
    window: Window | str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    source: str | None = None,
    fit: ImageFit | None = None,
) -> list[ModelImage]:
    """Read a PNG/JPEG/TIFF/BMP/GIF/WebP file → one RGB uint8 :class:`ModelImage` per frame/page.

    ``path`` is a file path, the file's content (``bytes``) or a binary file object; ``source`` labels
    the images' provenance (default: the path, or ``"<memory>"``) and, for in-memory input, the error
    messages. ``window`` (a :class:`Window`, preset name or ``"C,W"``) applies to grayscale images; high
    bit depth grayscale without a window gets a percentile window. Byte size, pixel size and frame count
    are checked against ``limits`` before decoding; unreadable or truncated files raise CorruptFileError.
    ``fit`` downscales each frame as it is decoded (a "resize" provenance step), so no full-resolution
    frame is kept.
    """
    fp, what = open_input(path, limits, source)
    src = source or what
    win, label = _resolve_window(window)
    images: list[ModelImage] = []
    with _open(fp, what) as im:
        fmt = RASTER_FORMATS.get(im.format or "", (im.format or "image").lower())
        n = _n_frames(im, what)
        width, height = im.size
        limits.check_image(height, width, n, what=src)
        for i in range(n):
            try:
                if i:
                    im.seek(i)
                w, h = im.size
                limits.check_image(h, w, n, what=src)
                im.load()
                prov = Provenance(source=src, format=fmt, frame=i)
                frame = im
                orientation = _exif_orientation(im)
                if orientation in range(2, 9):
                    frame = ImageOps.exif_transpose(im)
                    prov.add("exif_transpose", orientation=orientation)
                pixels = _frame_to_rgb(frame, win, label, prov, fit)
                del frame
            except (ImageTooLargeError, CorruptFileError):
                raise
            except _DECODE_ERRORS as exc:
                raise CorruptFileError(
                    f"{src}: truncated or corrupt image data in frame {i} ({type(exc).__name__})"
                ) from None
            images.append(ModelImage(pixels=np.ascontiguousarray(pixels), provenance=prov))
    return images


def raster_geometry(
    source: RasterSource, limits: Limits = DEFAULT_LIMITS, label: str | None = None
) -> tuple[int, int, int]:
    """``(width, height, frames)`` from the header alone (no pixel data decoded), checked against
    ``limits`` as :func:`raster_images` checks them."""
    fp, what = open_input(source, limits, label)
    with _open(fp, what) as im:
        width, height = im.size
        frames = _n_frames(im, what)
    limits.check_image(height, width, frames, what=what)
    return width, height, frames


def raster_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """JSON-able header summary (no pixel decoding, no embedded text/metadata that could hold PHI)."""
    path = Path(path)
    what = str(path)
    with _open(path, what) as im:
        mode = im.mode
        bits = {"1": 1, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 32, "F": 32}.get(mode, 8)
        dpi = im.info.get("dpi")
        return {
            "format": RASTER_FORMATS.get(im.format or "", (im.format or "").lower()),
            "mode": mode,
            "width": im.size[0],
            "height": im.size[1],
            "frames": _n_frames(im, what),
            "bits_per_sample": bits,
            "grayscale": mode in _HIGH_DEPTH_MODES or mode in ("1", "L", "LA", "La"),
            "has_alpha": mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info,
            "dpi": [float(v) for v in dpi] if isinstance(dpi, tuple) else None,
        }
