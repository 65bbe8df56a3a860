"""DICOM files in the Deflated Explicit VR Little Endian transfer syntax (PS3.5 A.5), read with a bound.

pydicom inflates such a file in one ``zlib.decompress`` call, with no bound: a 434 KB file can become
400 MB in memory before any header is looked at. Here the dataset is inflated lazily, as pydicom reads
it (a header-only read inflates only up to the pixel data), and refused with
:class:`~emma.errors.ImageTooLargeError` as soon as the inflated dataset passes
``Limits.max_file_bytes``, the same bound a file stored uncompressed has on disk.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset as read_elements
from pydicom.filereader import read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from emma.errors import CorruptFileError, ImageTooLargeError
from emma.io.deid_tables import PIXEL_TAGS

__all__ = ["BoundedInflater", "read_deflated"]

CHUNK_BYTES = 1024 * 1024  # compressed bytes read from the file at a time


class BoundedInflater(io.RawIOBase):
    """A seekable stream over the inflation of a raw deflate stream, inflated only as far as it is read,
    that raises :class:`ImageTooLargeError` once more than ``limit`` bytes would come out."""

    def __init__(self, raw: BinaryIO, limit: int, what: str) -> None:
        super().__init__()
        self._raw = raw
        self._limit = limit
        self._what = what
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._pos = 0
        self._done = False

    @property
    def inflated(self) -> int:
        """Bytes inflated so far."""
        return len(self._buf)

    def _fill(self, upto: int | None) -> None:
        """Inflate until ``upto`` bytes are available (None: all of it), or the stream ends; never more
        than a chunk past ``upto``, never more than one byte past the limit."""
        while not self._done and (upto is None or len(self._buf) < upto):
            data = self._z.unconsumed_tail or self._raw.read(CHUNK_BYTES)
            if not data:
                self._buf += self._z.flush()
                self._done = True
            else:
                want = CHUNK_BYTES if upto is None else max(upto - len(self._buf), CHUNK_BYTES)
                room = self._limit - len(self._buf) + 1
                try:
                    self._buf += self._z.decompress(data, min(want, room))
                except zlib.error:
                    raise CorruptFileError(f"{self._what}: corrupt deflated data") from None
                self._done = self._z.eof
            if len(self._buf) > self._limit:
                raise ImageTooLargeError(
                    f"{self._what}: deflated data inflate to more than the limit of {self._limit} bytes"
                )

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all the rest when negative), inflating only as far as they reach: a
        huge announced length is never allocated ahead of the data that fill it."""
        if size is None or size < 0:
            self._fill(None)
            end = len(self._buf)
        else:
            self._fill(self._pos + size)
            end = min(len(self._buf), self._pos + size)
        if end <= self._pos:
            return b""
        data = bytes(self._buf[self._pos : end])
        self._pos = end
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        self._fill(self._pos + len(view))
        n = max(0, min(len(view), len(self._buf) - self._pos))
        view[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            self._fill(None)
            pos = len(self._buf) + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError("seek before the start of the stream")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        """The whole inflated size (inflates the rest, within the bound)."""
        self._fill(None)
        return len(self._buf)


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in PIXEL_TAGS


def _not_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 0x0002


def read_deflated(
    f: BinaryIO, path: Path, limit: int, *, stop_before_pixels: bool
) -> tuple[Dataset, int] | None:
    """``(dataset, inflated size)`` when ``f`` (at its start) holds a Deflated Explicit VR Little Endian
    file, its dataset inflated within ``limit`` bytes; None for any other file, with ``f`` back at its
    start for the ordinary reader. With ``stop_before_pixels`` only the part before the pixel data is
    inflated (the size returned is then how much was inflated)."""
    try:
        preamble = read_preamble(f, True)  # None (and f at 0) without the 128-byte preamble
        meta = read_elements(f, is_implicit_VR=False, is_little_endian=True, stop_when=_not_meta)
        syntax = meta.get("TransferSyntaxUID")
    except Exception:  # noqa: BLE001 — not a DICOM file meta: the ordinary reader decides what it is
        f.seek(0)
        return None
    if syntax != DeflatedExplicitVRLittleEndian:
        f.seek(0)
        return None
    stream = BoundedInflater(f, limit, str(path))
    try:
        dataset = read_elements(
            stream,
            is_implicit_VR=False,
            is_little_endian=True,
            stop_when=_stop_at_pixels if stop_before_pixels else None,
        )
    except (ImageTooLargeError, CorruptFileError):
        raise
    except EOFError:
        raise CorruptFileError(f"{path}: truncated file (deflated data end early)") from None
    size = stream.inflated if stop_before_pixels else stream.size()
    ds = FileDataset(
        str(path),
        dataset,
        preamble=preamble,
        file_meta=FileMetaDataset(meta),
        is_implicit_VR=False,
        is_little_endian=True,
    )
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds, size
