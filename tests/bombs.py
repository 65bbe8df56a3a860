"""Hostile inputs for the decoding bounds (tests and ``benchmarks/bench_serve_bombs.py``): files whose
headers promise far more than their bytes, built without ever holding what they would decode to."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

_CHUNK = 1024 * 1024


def _image_dataset(rows: int, columns: int, frames: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, columns
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def _meta(ds: Dataset, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = generate_uid()
    return meta


def _elements(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def _pixel_header(length: int) -> bytes:
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)  # explicit VR LE, 4-byte length


def _file(ds: Dataset, syntax: str, body: bytes) -> bytes:
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, _meta(ds, syntax), enforce_standard=True)
    out.write(body)
    return out.getvalue()


def deflate_bomb(
    inflated_bytes: int = 400 * 1024**2, rows: int = 512, columns: int = 512, *, frames: int | None = None
) -> bytes:
    """A Deflated Explicit VR Little Endian CT whose pixel data (zeros) inflate to ``inflated_bytes``:
    a few hundred KB on disk. Its header is consistent (frames = pixel bytes / frame bytes) unless
    ``frames`` says otherwise (a small image in the header, a bomb in the pixel data)."""
    frame = rows * columns * 2
    frames_in_data = max(1, inflated_bytes // frame)
    ds = _image_dataset(rows, columns, frames_in_data if frames is None else frames)
    frames = frames_in_data
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(_elements(ds) + _pixel_header(frames * frame))]
    zeros = bytes(_CHUNK)
    left = frames * frame
    while left:
        n = min(left, _CHUNK)
        parts.append(compressor.compress(zeros if n == _CHUNK else bytes(n)))
        left -= n
    parts.append(compressor.flush())
    return _file(ds, DeflatedExplicitVRLittleEndian, b"".join(parts))


def deflated_ct(pixels: np.ndarray) -> bytes:
    """A small valid Deflated Explicit VR Little Endian CT of ``pixels`` (uint16, (rows, columns))."""
    ds = _image_dataset(int(pixels.shape[0]), int(pixels.shape[1]), 1)
    data = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(_elements(ds) + _pixel_header(len(data)) + data) + compressor.flush()
    return _file(ds, DeflatedExplicitVRLittleEndian, body)


def multiframe_ct(frames: int, rows: int, columns: int, *, truncate_pixels: bool = False) -> bytes:
    """An uncompressed multi-frame CT (a ramp); with ``truncate_pixels`` its pixel data stop after one
    frame, so only a reader that refuses it from the header alone answers anything but "corrupt"."""
    ds = _image_dataset(rows, columns, frames)
    n = frames * rows * columns
    written = rows * columns if truncate_pixels else n
    data = (np.arange(written, dtype=np.uint32) % 4096).astype("<u2").tobytes()
    return _file(ds, ExplicitVRLittleEndian, _elements(ds) + _pixel_header(n * 2) + data)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (8-bit RGB) and whose image data are garbage: any
    reader that decodes it fails; one that checks the header first refuses it by size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib") + chunk(b"IEND", b"")


def big_png(width: int, height: int) -> bytes:
    """A real, valid grayscale PNG of ``width`` x ``height`` (a few bright squares on black): it
    compresses to tens of KB and decodes to width x height pixels."""
    image = Image.new("L", (width, height), 0)
    for k in range(8):
        x = (k + 1) * width // 10
        image.paste(200, (x, x * height // width, x + width // 40, x * height // width + height // 40))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
