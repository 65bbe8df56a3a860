"""emma.io.raster: PNG/JPEG/TIFF/BMP to model-ready RGB, high bit depth windowing, bounds, corruption."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import assert_uint8_matches, linear_exact_window, linear_window, to_uint8_reference
from PIL import Image

from emma.errors import CorruptFileError, ImageTooLargeError, InputError
from emma.io.limits import Limits
from emma.io.load import SourceFormat, detect_format, load_images
from emma.io.raster import raster_images, raster_summary
from emma.io.windows import Window


def steps(image) -> dict[str, dict]:
    return {s.op: s.params for s in image.provenance.steps}


def gray(image) -> np.ndarray:
    px = image.pixels
    assert px.dtype == np.uint8 and px.shape[2] == 3
    assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 0], px[..., 2])
    return px[..., 0]


def test_16bit_png_uses_percentile_window_not_shift(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(1000, 3000, size=(40, 50)).astype(np.uint16)  # 12-bit data in 16-bit PNG
    values[0, :4] = 65535  # a few hot pixels
    path = tmp_path / "xray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    (image,) = raster_images(path)
    assert image.provenance.format == "png" and image.provenance.frame == 0
    voi = steps(image)["voi"]
    assert voi["source"] == "percentile" and voi["function"] == "LINEAR_EXACT"
    lo, hi = np.percentile(values.astype(np.float64), [0.5, 99.5])
    assert_uint8_matches(gray(image), linear_exact_window(values, (lo + hi) / 2, hi - lo))
    body = gray(image)[1:]
    assert body.min() <= 3 and body.max() >= 252  # full contrast; >> 8 would give values 3..11 only
    assert gray(image)[0, 0] == 255  # 65535 clips to white, no wraparound


def test_16bit_png_explicit_window(tmp_path):
    values = np.array([[0, 255, 256, 1000], [2000, 2047, 4000, 65535]], dtype=np.uint16)
    path = tmp_path / "w.png"
    Image.fromarray(values).save(path)
    (image,) = raster_images(path, window="2000,4001")
    assert steps(image)["voi"]["source"] == "explicit"
    assert np.array_equal(gray(image), to_uint8_reference(linear_window(values, 2000, 4001)))
    (preset,) = raster_images(path, window=Window(1000.0, 2000.0))
    assert np.array_equal(gray(preset), to_uint8_reference(linear_window(values, 1000, 2000)))


def test_8bit_gray_png_passes_through(tmp_path):
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = tmp_path / "g.png"
    Image.fromarray(values).save(path)
    (image,) = raster_images(path)
    assert np.array_equal(gray(image), values)
    assert "voi" not in steps(image)
    (windowed,) = raster_images(path, window="100.3,50")  # an explicit window applies to 8-bit gray too
    assert steps(windowed)["voi"]["source"] == "explicit"
    assert_uint8_matches(gray(windowed), linear_window(values, 100.3, 50))


def test_rgba_and_palette_to_rgb(tmp_path):
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 7
    path = tmp_path / "a.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    (image,) = raster_images(path)
    assert np.array_equal(image.pixels, rgba[..., :3])
    assert steps(image)["convert"]["alpha"] == "dropped"

    pal = Image.new("P", (3, 2))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2, 2, 1, 0])
    ppath = tmp_path / "p.png"
    pal.save(ppath)
    (pimg,) = raster_images(ppath)
    expected = np.array(
        [[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[0, 0, 255], [0, 255, 0], [255, 0, 0]]], np.uint8
    )
    assert np.array_equal(pimg.pixels, expected)


def test_multipage_tiff_frames_and_16bit_tiff(tmp_path):
    pages = [np.full((6, 7), v, dtype=np.uint16) for v in (100, 2000, 40000)]
    for page in pages:
        page[0, 0] = 0
        page[-1, -1] = 50000
    path = tmp_path / "stack.tif"
    first, *rest = (Image.fromarray(p) for p in pages)
    first.save(path, save_all=True, append_images=rest)
    images = raster_images(path, window="25000,50000")
    assert [im.provenance.frame for im in images] == [0, 1, 2]
    assert all(im.provenance.format == "tiff" for im in images)
    for page, im in zip(pages, images, strict=True):
        assert np.array_equal(gray(im), to_uint8_reference(linear_window(page, 25000, 50000)))
    assert raster_summary(path)["frames"] == 3
    with pytest.raises(ImageTooLargeError):
        raster_images(path, limits=Limits(max_frames=2))


def test_float_tiff_with_nan(tmp_path):
    values = np.linspace(-1.0, 1.0, 30, dtype=np.float32).reshape(5, 6)
    values[0, 0] = np.nan
    path = tmp_path / "f.tif"
    Image.fromarray(values, mode="F").save(path)
    (image,) = raster_images(path)
    out = gray(image)
    assert out[0, 0] == 0 and out[-1, -1] == 255
    assert np.all(np.diff(out.ravel()[1:].astype(int)) >= 0)


def test_jpeg_and_bmp_colour(tmp_path):
    rng = np.random.default_rng(1)
    rgb = np.repeat(np.repeat(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8), 8, 0), 8, 1)
    jpg, bmp = tmp_path / "c.jpg", tmp_path / "c.bmp"
    Image.fromarray(rgb).save(jpg, quality=95, subsampling=0)
    Image.fromarray(rgb).save(bmp)
    (j,) = raster_images(jpg)
    (b,) = raster_images(bmp)
    assert j.provenance.format == "jpeg" and b.provenance.format == "bmp"
    assert np.array_equal(b.pixels, rgb)
    assert np.abs(j.pixels.astype(int) - rgb.astype(int)).mean() < 6


def test_exif_orientation_applied(tmp_path):
    rgb = np.zeros((10, 20, 3), dtype=np.uint8)
    rgb[:, :10] = 255  # left half white
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "o.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    (image,) = raster_images(path)
    assert image.pixels.shape == (20, 10, 3)
    assert steps(image)["exif_transpose"]["orientation"] == 6
    assert image.pixels[:8, :, 0].mean() > 200 and image.pixels[12:, :, 0].mean() < 50  # white now on top


def test_corrupt_and_truncated_files(tmp_path):
    values = np.random.default_rng(2).integers(0, 65535, size=(64, 64)).astype(np.uint16)
    good = tmp_path / "good.png"
    Image.fromarray(values).save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError):
        raster_images(truncated)
    random_file = tmp_path / "random.png"
    random_file.write_bytes(random.Random(3).randbytes(2048))
    with pytest.raises(CorruptFileError):
        raster_images(random_file)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(CorruptFileError):
        raster_summary(text)
    with pytest.raises(FileNotFoundError):
        raster_images(tmp_path / "missing.png")


def test_size_checked_before_decoding(tmp_path):
    # a PNG header claiming 20000 x 20000 pixels with almost no data: decoding would fail as truncated,
    # so ImageTooLargeError proves the bound is checked first
    big = Image.new("L", (20000, 20000))
    path = tmp_path / "big.png"
    big.save(path)
    data = path.read_bytes()
    path.write_bytes(data[:200])
    with pytest.raises(ImageTooLargeError):
        raster_images(path, limits=Limits(max_pixels=10_000_000))
    small = tmp_path / "small.png"
    Image.new("L", (50, 50)).save(small)
    with pytest.raises(ImageTooLargeError):
        raster_images(small, limits=Limits(max_pixels=2000))
    with pytest.raises(ImageTooLargeError):
        raster_images(small, limits=Limits(max_file_bytes=10))


def test_raster_summary(tmp_path):
    path = tmp_path / "s.png"
    Image.fromarray(np.zeros((3, 5), dtype=np.uint16)).save(path)
    summary = raster_summary(path)
    json.dumps(summary)
    assert summary["format"] == "png" and summary["width"] == 5 and summary["height"] == 3
    assert summary["bits_per_sample"] == 16 and summary["grayscale"] is True and summary["frames"] == 1


def test_source_label(tmp_path: Path):
    path = tmp_path / "x.png"
    Image.new("RGB", (2, 2)).save(path)
    (image,) = raster_images(path, source="case/x.png")
    assert image.provenance.source == "case/x.png"


def test_window_is_ignored_for_colour_and_recorded(tmp_path: Path):
    rgb = np.zeros((3, 4, 3), dtype=np.uint8)
    rgb[..., 1] = 90
    path = tmp_path / "c.png"
    Image.fromarray(rgb).save(path)
    (image,) = raster_images(path, window="lung")
    assert np.array_equal(image.pixels, rgb)
    assert steps(image)["color"]["window_ignored"] is True


# ------------------------------------------------------------------------------- in-memory input


class _Unseekable(io.RawIOBase):
    """A binary stream that can only be read forwards (a socket or pipe)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_bytes_and_file_objects_take_the_path_route(tmp_path: Path):
    rng = np.random.default_rng(4)
    values = rng.integers(1000, 3000, size=(30, 20)).astype(np.uint16)
    path = tmp_path / "x16.png"
    Image.fromarray(values).save(path)
    data = path.read_bytes()
    (ref,) = raster_images(path, window="2000,1500")
    with path.open("rb") as fh:
        inputs = [data, bytearray(data), memoryview(data), io.BytesIO(data), fh, _Unseekable(data)]
        outputs = [raster_images(x, window="2000,1500")[0] for x in inputs]
    for out in outputs:
        assert np.array_equal(out.pixels, ref.pixels)
        assert out.provenance.steps == ref.provenance.steps and out.provenance.format == "png"
        assert out.provenance.source == "<memory>"
    (labelled,) = raster_images(data, source="upload:3")
    assert labelled.provenance.source == "upload:3"
    prefixed = io.BytesIO(b"junk" + data)
    prefixed.read(4)  # a stream not at its start is read from where it is
    assert np.array_equal(raster_images(prefixed, window="2000,1500")[0].pixels, ref.pixels)
    tiff = io.BytesIO()
    first, *rest = (Image.fromarray(np.full((4, 5), v, dtype=np.uint8)) for v in (10, 200))
    first.save(tiff, format="TIFF", save_all=True, append_images=rest)
    frames = raster_images(tiff.getvalue())
    assert [im.provenance.frame for im in frames] == [0, 1] and frames[1].pixels[0, 0, 0] == 200


def test_in_memory_bounds_and_errors_name_the_source(tmp_path: Path):
    big = Image.new("L", (20000, 20000))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    header_only = buf.getvalue()[:200]  # decoding would fail as truncated: the bound comes first
    with pytest.raises(ImageTooLargeError, match="^img 1: "):
        raster_images(header_only, limits=Limits(max_pixels=10_000_000), source="img 1")
    small = io.BytesIO()
    Image.new("L", (50, 50)).save(small, format="PNG")
    with pytest.raises(ImageTooLargeError, match="bytes, over the limit of 10"):
        raster_images(small.getvalue(), limits=Limits(max_file_bytes=10))
    with pytest.raises(ImageTooLargeError, match="bytes, over the limit of 10"):
        raster_images(_Unseekable(small.getvalue()), limits=Limits(max_file_bytes=10))
    with pytest.raises(CorruptFileError, match="^img 2: not a supported image"):
        raster_images(random.Random(5).randbytes(2048), source="img 2")
    with pytest.raises(CorruptFileError, match="<memory>"):
        raster_images(small.getvalue()[: len(small.getvalue()) // 2])
    with pytest.raises(TypeError):
        raster_images(12345)  # type: ignore[arg-type]


def test_load_images_from_memory(tmp_path: Path, testdata):
    rgb = np.zeros((6, 8, 3), dtype=np.uint8)
    rgb[..., 2] = 150
    path = tmp_path / "c.png"
    Image.fromarray(rgb).save(path)
    data = path.read_bytes()
    assert (
        detect_format(data) is SourceFormat.RASTER and detect_format(io.BytesIO(data)) is SourceFormat.RASTER
    )
    (from_path,) = load_images(path)
    (from_bytes,) = load_images(data, source="upload:0")
    (from_file,) = load_images(io.BytesIO(data))
    assert np.array_equal(from_bytes.pixels, from_path.pixels) and np.array_equal(from_file.pixels, rgb)
    assert from_bytes.provenance.source == "upload:0" and from_file.provenance.source == "<memory>"
    with pytest.raises(ImageTooLargeError):
        load_images(data, limits=Limits(max_pixels=10))
    dicom = Path(testdata("CT_small.dcm")).read_bytes()
    assert detect_format(dicom) is SourceFormat.DICOM
    with pytest.raises(InputError, match="read from a file"):
        load_images(dicom)
    assert detect_format(b"\x1f\x8b" + b"\0" * 400) is SourceFormat.NIFTI
    assert detect_format(b"\0" * 344 + b"n+1\0") is SourceFormat.NIFTI
