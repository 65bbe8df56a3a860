"""Image URLs of a request → model-ready images, through EMMA's one preprocessing path.

A ``data:<mime>;base64,...`` URL (any image type EMMA reads: PNG, JPEG, TIFF, ..., DICOM
``application/dicom``, NIfTI ``application/x-nifti`` / ``application/gzip``) is decoded and bounded,
then read by :func:`emma.io.load.load_images` exactly as ``emma chat`` reads a file: a raster image
(PNG, JPEG, TIFF, BMP, WebP, GIF) straight from memory, DICOM and NIfTI from a private temporary file
(mode 0600 in a 0700 folder) that is deleted at once. A remote ``http(s)`` URL is
refused unless remote images are allowed and its host is on the allow-list; it is then fetched with a
size and time bound, following at most a few redirects and only within the same host. ``file:`` URLs,
plain paths and any other scheme are always refused.

Decoding runs in a worker thread, one image at a time, with pydicom's value validation and warnings
silenced (their messages can quote element values, i.e. PHI). Error messages name the image by its
index in the request, never by a path, URL or value.

Before any pixel is decoded, each image's header is read (:func:`emma.io.plan.plan_images`): the images
it gives count against ``max_images`` and its pixels (frames x rows x columns, voxels of a volume)
against ``max_request_pixels`` (413), and the memory decoding it takes is reserved in the request's
:class:`~emma.serve.budget.Ledger` (413 if it can never fit the budget, 503 while others use it).
Images are downscaled to ``fit`` (what the served model can use) as they are decoded, and the
reservation then shrinks to what the request keeps.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from PIL import Image

from emma.errors import ImageTooLargeError, InputError
from emma.io.dicom import quiet_pydicom
from emma.io.image import ImageFit, ModelImage
from emma.io.limits import Limits
from emma.io.load import VolumeSampling, load_images
from emma.io.plan import ImagePlan, plan_images
from emma.io.windows import Window, parse_window
from emma.serve.budget import HELD_BYTES_PER_PIXEL, Ledger, OverBudget, Reservation
from emma.serve.schemas import ImageOptions
from emma.serve.security import APIError, host_allowed, over_budget_error

DICOM_TYPES = ("application/dicom", "application/dicom+binary", "image/dicom")
NIFTI_TYPES = (
    "application/x-nifti",
    "application/nifti",
    "image/nifti",
    "application/gzip",
    "application/x-gzip",
)
OTHER_TYPES = ("application/octet-stream",)
RASTER_SUFFIXES = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/tiff": ".tif",
    "image/bmp": ".bmp",
    "image/webp": ".webp",
    "image/gif": ".gif",
}
_IN_MEMORY_SUFFIXES = frozenset(RASTER_SUFFIXES.values())  # read without a temporary file
MAX_REDIRECTS = 3


def _too_large(message: str) -> APIError:
    return APIError(413, message, code="image_too_large")


def _bad_image(message: str, code: str = "invalid_image") -> APIError:
    return APIError(400, message, code=code, param="messages")


_WHITESPACE = re.compile(r"\s")
B64_CHUNK_CHARS = 4 * 1024 * 1024  # base64 characters decoded at a time (a multiple of 4)


def parse_data_url(url: str, *, max_bytes: int, index: int) -> tuple[str, bytearray]:
    """``(media type, bytes)`` of a base64 data URL of an accepted type; 400/413 otherwise.

    The payload is decoded in slices straight into a buffer of its final size: no copy of the (up to
    ~85 MB) base64 text is made besides one slice (a URL with whitespace in its payload is the rare
    exception, decoded from one copy without it)."""
    comma = url.find(",", 0, 1024)  # the header is short; a URL without a comma near its start is not one
    params = [p.strip().lower() for p in url[len("data:") : max(comma, len("data:"))].split(";")]
    mime = params[0] or "text/plain"
    if comma < 0 or "base64" not in params[1:]:
        raise _bad_image(f"image {index}: malformed data URL (expected data:<type>;base64,<data>)")
    if not (mime.startswith("image/") or mime in DICOM_TYPES + NIFTI_TYPES + OTHER_TYPES):
        raise _bad_image(
            f"image {index}: unsupported media type in the data URL", code="unsupported_media_type"
        )
    text, start = url, comma + 1
    if ((len(text) - start) * 3) // 4 > max_bytes + 3:
        raise _too_large(f"image {index}: over the limit of {max_bytes} bytes")
    if _WHITESPACE.search(text, start):
        text, start = "".join(text[start:].split()), 0
    n = len(text) - start
    padding = (text[-1] == "=") + (text[-2] == "=") if n >= 4 else 0
    out = bytearray((n // 4) * 3 - padding if n % 4 == 0 else 0)
    try:
        if n % 4:
            raise binascii.Error("incorrect padding")
        at = 0
        for i in range(start, len(text), B64_CHUNK_CHARS):
            chunk = binascii.a2b_base64(text[i : i + B64_CHUNK_CHARS], strict_mode=True)
            out[at : at + len(chunk)] = chunk
            at += len(chunk)
        if at != len(out):
            raise binascii.Error("length mismatch")
    except (binascii.Error, ValueError):
        raise _bad_image(f"image {index}: invalid base64 in the data URL") from None
    if not out:
        raise _bad_image(f"image {index}: empty image")
    if len(out) > max_bytes:
        raise _too_large(f"image {index}: over the limit of {max_bytes} bytes")
    return mime, out


def file_suffix(data: bytes | bytearray, mime: str) -> str:
    """A file name suffix that makes :func:`emma.io.load.detect_format` read ``data`` as what it is."""
    if data[:2] == b"\x1f\x8b":
        return ".nii.gz"  # the only gzip-wrapped format EMMA reads
    if data[128:132] == b"DICM":
        return ".dcm"
    if data[344:348] in (b"n+1\0", b"ni1\0"):
        return ".nii"
    if mime in DICOM_TYPES:
        return ".dcm"
    return RASTER_SUFFIXES.get(mime, "")


def resolve_window(spec: str | None) -> Window | None:
    if spec is None or not spec.strip():
        return None
    try:
        return parse_window(spec)[0]
    except ValueError:
        raise APIError(
            400, 'unknown window: use a preset name (e.g. "lung") or "CENTER,WIDTH"', code="invalid_window"
        ) from None


def held_bytes(images: Sequence[ModelImage]) -> int:
    """What a request keeps for its model-ready images until it ends (see emma.serve.budget)."""
    return sum(im.width * im.height for im in images) * HELD_BYTES_PER_PIXEL


class _Staged:
    """One image of a request, fetched and planned from its header, not decoded yet: its bytes (a
    raster, read from memory) or its private temporary file (DICOM, NIfTI). :meth:`close` frees both."""

    def __init__(self, index: int, data: bytes | bytearray, mime: str) -> None:
        self.index = index
        self.label = f"image {index}"
        self.suffix = file_suffix(data, mime)
        self.data: bytes | bytearray | None = data
        self.path: Path | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.plan: ImagePlan | None = None

    @property
    def hide(self) -> tuple[str, ...]:
        """Strings that must not reach a message (the temporary path)."""
        if self.path is None:
            return ()
        return (str(self.path), str(self.path.parent), self.path.name)

    def source(self) -> bytes | bytearray | Path:
        if self.suffix in _IN_MEMORY_SUFFIXES:
            assert self.data is not None
            return self.data
        if self.path is None:
            assert self.data is not None
            self._tmp = tempfile.TemporaryDirectory(prefix="emma-serve-")
            path = Path(self._tmp.name) / f"upload{self.suffix}"
            with open(path, "xb") as fh:  # TemporaryDirectory is 0700; the file never outlives it
                fh.write(self.data)
            self.path, self.data = path, None
        return self.path

    def close(self) -> None:
        self.data = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class ImageResolver:
    """Turns a request's image URLs into model-ready images under the server's bounds."""

    def __init__(
        self,
        *,
        limits: Limits,
        max_images: int,
        max_request_pixels: int | None = None,
        fit: ImageFit | None = None,
        allow_remote_images: bool = False,
        allowed_domains: Sequence[str] = (),
        remote_timeout_s: float = 10.0,
        retry_after_s: int = 1,
    ) -> None:
        self.limits = limits
        self.max_images = max_images
        self.max_request_pixels = max_request_pixels
        self.fit = fit
        self.retry_after_s = retry_after_s
        self.allow_remote_images = allow_remote_images
        self.allowed_domains = tuple(allowed_domains)
        self.remote_timeout_s = remote_timeout_s
        # Decoding is serialised: the pydicom/warnings switches are process-wide, and one image at a
        # time bounds the memory that decoding can take.
        self._lock = threading.Lock()

    async def resolve(
        self, urls: Sequence[str], options: ImageOptions, ledger: Ledger | None = None
    ) -> list[list[ModelImage]]:
        """The images of each URL, in order (a volume or multi-frame file gives several). Every image
        is fetched and planned from its header first, and the request's totals checked, before any of
        them is decoded; each decoding is reserved in ``ledger`` when given."""
        if urls and self.max_images == 0:
            raise APIError(400, "the served model takes no images (text-only)", code="images_not_supported")
        if len(urls) > self.max_images:
            raise APIError(
                413,
                f"{len(urls)} images in one request, over the limit of {self.max_images}",
                code="too_many_images",
            )
        window = resolve_window(options.window)
        sampling = VolumeSampling(plane=options.plane, n=options.slices, mode=options.volume_mode)
        staged: list[_Staged] = []
        try:
            for index, url in enumerate(urls):
                mime, data = await self.fetch(url, index)
                staged.append(_Staged(index, data, mime))
                del data
                await asyncio.to_thread(self._plan, staged[-1], sampling)
            self._check_totals([item.plan for item in staged if item.plan is not None])
            out: list[list[ModelImage]] = []
            for item in staged:
                out.append(await asyncio.to_thread(self._decode, item, window, sampling, ledger))
                item.close()
        finally:
            for item in staged:
                await asyncio.to_thread(item.close)
        if sum(len(group) for group in out) > self.max_images:  # plans never undercount: a guard
            raise self._too_many_images()
        return out

    def _too_many_images(self) -> APIError:
        return APIError(
            413,
            f"the request's images give more than {self.max_images} model images "
            "(volumes and multi-frame files count each sampled slice or frame)",
            code="too_many_images",
        )

    def _check_totals(self, plans: Sequence[ImagePlan]) -> None:
        """The request's model images and decoded pixels, summed from the plans, against the bounds."""
        if sum(p.count for p in plans) > self.max_images:
            raise self._too_many_images()
        pixels = sum(p.source_pixels for p in plans)
        if self.max_request_pixels is not None and pixels > self.max_request_pixels:
            raise APIError(
                413,
                f"the request's images hold {pixels} pixels (frames x rows x columns, voxels of volumes), "
                f"over this server's limit of {self.max_request_pixels} per request",
                code="too_many_pixels",
            )

    def _plan(self, item: _Staged, sampling: VolumeSampling) -> None:
        """Read one staged image's header (no pixel data) into ``item.plan``."""
        with self._lock:
            source = item.source()
            with _decode_errors(item.label, item.hide), quiet_pydicom():
                item.plan = plan_images(source, sampling=sampling, limits=self.limits, source=item.label)

    def _decode(
        self, item: _Staged, window: Window | None, sampling: VolumeSampling, ledger: Ledger | None
    ) -> list[ModelImage]:
        """Decode one planned image, its decoding reserved first, the reservation then shrunk to what
        the request keeps of it."""
        reservation: Reservation | None = None
        if ledger is not None and item.plan is not None:
            try:
                reservation = ledger.reserve(item.plan.decode_bytes, f"decoding {item.label}")
            except OverBudget as exc:
                raise over_budget_error(exc, self.retry_after_s, never_code="image_too_large") from None
        try:
            with self._lock:
                source = item.source()
                with _decode_errors(item.label, item.hide), quiet_pydicom():
                    images = load_images(
                        source,
                        window=window,
                        sampling=sampling,
                        limits=self.limits,
                        source=None if isinstance(source, Path) else item.label,
                        fit=self.fit,
                    )
        except BaseException:
            if reservation is not None and ledger is not None:
                ledger.shrink(reservation, 0)
            raise
        if reservation is not None and ledger is not None:
            ledger.shrink(reservation, held_bytes(images))
        for image in images:
            image.provenance.source = f"upload:{item.index}"
        if not images:
            raise _bad_image(f"{item.label}: no image in the file")
        return images

    async def fetch(self, url: str, index: int) -> tuple[str, bytes | bytearray]:
        """``(media type, bytes)`` of one image URL; only data: URLs and allowed http(s) hosts."""
        scheme = url.split(":", 1)[0].strip().lower() if ":" in url else ""
        if scheme == "data":
            return parse_data_url(url.strip(), max_bytes=self.limits.max_file_bytes, index=index)
        if scheme in ("http", "https"):
            return await self._fetch_remote(url.strip(), index)
        raise _bad_image(
            f"image {index}: unsupported image URL (send a data: URL; file paths and file: URLs are refused)",
            code="unsupported_image_url",
        )

    async def _fetch_remote(self, url: str, index: int) -> tuple[str, bytes]:
        if not self.allow_remote_images:
            raise _bad_image(
                f"image {index}: remote image URLs are refused by this server; send the image as a data: URL",
                code="remote_image_refused",
            )
        first_host = urlsplit(url).hostname
        max_bytes = self.limits.max_file_bytes
        current = url
        try:
            async with (
                asyncio.timeout(self.remote_timeout_s),
                httpx.AsyncClient(timeout=self.remote_timeout_s, follow_redirects=False) as client,
            ):
                for _hop in range(MAX_REDIRECTS + 1):
                    parts = urlsplit(current)
                    if parts.scheme not in ("http", "https") or not host_allowed(
                        parts.hostname, self.allowed_domains
                    ):
                        raise _bad_image(
                            f"image {index}: the image URL's host is not on this server's allow-list",
                            code="remote_image_refused",
                        )
                    if parts.hostname != first_host:
                        raise _bad_image(
                            f"image {index}: redirect to another host refused", code="remote_image_refused"
                        )
                    async with client.stream("GET", current) as response:
                        if response.is_redirect:
                            location = response.headers.get("location", "")
                            current = str(response.url.join(location))
                            continue
                        if response.status_code != 200:
                            raise _bad_image(
                                f"image {index}: the remote server answered {response.status_code}",
                                code="remote_image_failed",
                            )
                        declared = response.headers.get("content-length", "")
                        if declared.isdigit() and int(declared) > max_bytes:
                            raise _too_large(f"image {index}: over the limit of {max_bytes} bytes")
                        buf = bytearray()
                        async for chunk in response.aiter_bytes():
                            buf += chunk
                            if len(buf) > max_bytes:
                                raise _too_large(f"image {index}: over the limit of {max_bytes} bytes")
                        mime = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                        return mime, bytes(buf)
                raise _bad_image(f"image {index}: too many redirects", code="remote_image_failed")
        except TimeoutError:
            raise _bad_image(
                f"image {index}: fetching the remote image timed out", code="remote_image_failed"
            ) from None
        except httpx.HTTPError as exc:
            raise _bad_image(
                f"image {index}: could not fetch the remote image ({type(exc).__name__})",
                code="remote_image_failed",
            ) from None

    def decode(
        self, data: bytes | bytearray, mime: str, index: int, window: Window | None, sampling: VolumeSampling
    ) -> list[ModelImage]:
        """One image's bytes → model-ready images, planned (bounded from the header) then decoded, the
        temporary file of a DICOM or NIfTI deleted before returning."""
        item = _Staged(index, data, mime)
        try:
            self._plan(item, sampling)
            assert item.plan is not None
            self._check_totals([item.plan])
            return self._decode(item, window, sampling, None)
        finally:
            item.close()


@contextlib.contextmanager
def _decode_errors(label: str, hide: Sequence[str]) -> Iterator[None]:
    """emma.io's errors → the server's 413/400, naming the image by ``label``, never by a path."""
    try:
        yield
    except ImageTooLargeError as exc:
        raise _too_large(_clean(str(exc), hide, label)) from None
    except Image.DecompressionBombError:
        raise _too_large(f"{label}: too many pixels") from None
    except InputError as exc:
        raise _bad_image(_clean(str(exc), hide, label)) from None
    except (ValueError, OSError, MemoryError) as exc:
        raise _bad_image(f"{label}: could not be decoded ({type(exc).__name__})") from None


def _clean(message: str, hide: Sequence[str], label: str) -> str:
    """The first line of a library message with the temporary path (``hide``) replaced by the label."""
    first = message.strip().splitlines()[0] if message.strip() else "unreadable image"
    for token in hide:
        first = first.replace(token, label)
    if label not in first:
        first = f"{label}: {first}"
    return first[:300]


def png_data_url(image: ModelImage) -> str:
    """``data:image/png;base64,...`` of a model-ready image (lossless: the exact pixels the model sees)."""
    buf = io.BytesIO()
    image.to_pil().save(buf, format="PNG", compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
