"""emma.io.dicom: real pydicom test files and synthetic pitfall files with independently computed
expectations (the DICOM standard's formulas, evaluated in float64 in dicom_factory)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import (
    assert_uint8_matches,
    linear_exact_window,
    linear_window,
    sigmoid_window,
    to_uint8_reference,
)
from pydicom.dataset import Dataset

from emma.errors import (
    CorruptFileError,
    EmmaError,
    ImageTooLargeError,
    NoPixelDataError,
    UnsupportedTransferSyntaxError,
)
from emma.io.dicom import (
    HEADER_DEFER_BYTES,
    apply_voi,
    check_pixel_bounds,
    decode_frames,
    dicom_images,
    dicom_summary,
    is_monochrome1,
    modality_values,
    read_dataset,
)
from emma.io.limits import Limits
from emma.io.provenance import Provenance
from emma.io.windows import VOIFunction, Window


def ops(image) -> list[str]:
    return [step.op for step in image.provenance.steps]


def step(image, op: str) -> dict:
    (found,) = (s.params for s in image.provenance.steps if s.op == op)
    return found


def gray(image) -> np.ndarray:
    px = image.pixels
    assert px.dtype == np.uint8 and px.ndim == 3 and px.shape[2] == 3
    assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 0], px[..., 2])
    return px[..., 0]


# ------------------------------------------------------------------------------------- real files


def test_rg1_uncompressed_and_jpeg2000_agree(testdata):
    unc = dicom_images(testdata("RG1_UNCI.dcm"))
    j2k = dicom_images(testdata("RG1_J2KI.dcm"))
    assert len(unc) == len(j2k) == 1
    a, b = gray(unc[0]).astype(int), gray(j2k[0]).astype(int)
    assert a.shape == (1955, 1841)
    assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 8


def test_rg1_monochrome1_follows_the_file_window_then_inverts(testdata):
    path = testdata("RG1_UNCI.dcm")
    (image,) = dicom_images(path)
    assert ops(image) == ["modality_lut", "voi", "invert", "to_uint8"]
    assert step(image, "voi") == {
        "source": "file:window",
        "center": 15000.0,
        "width": 30000.0,
        "function": "LINEAR",
    }
    stored = pydicom.dcmread(path).pixel_array
    assert_uint8_matches(gray(image), linear_window(stored, 15000, 30000), invert=True)
    px = gray(image).astype(float)
    lung = px[400:900, 450:650].mean()  # right lung field (image left)
    mediastinum = px[400:900, 850:1000].mean()  # spine / mediastinum
    assert lung + 30 < mediastinum  # air dark, dense tissue bright


def test_ct_small_hounsfield_units(testdata):
    path = testdata("CT_small.dcm")
    ds = read_dataset(path)
    stored = decode_frames(ds)
    assert stored.shape == (1, 128, 128) and stored.dtype == np.int16
    hu = modality_values(ds, stored)
    assert hu.dtype == np.float32
    reference = pydicom.dcmread(path).pixel_array.astype(np.float64) * 1.0 - 1024.0
    np.testing.assert_array_equal(hu[0], reference)
    (image,) = dicom_images(path, window="abdomen")
    assert step(image, "modality_lut") == {"slope": 1.0, "intercept": -1024.0, "source": "rescale"}
    assert step(image, "voi")["source"] == "preset:abdomen"
    assert_uint8_matches(gray(image), linear_window(reference, 40, 400))


def test_mr_small_file_window(testdata):
    path = testdata("MR_small.dcm")
    (image,) = dicom_images(path)
    assert step(image, "voi")["source"] == "file:window"
    assert_uint8_matches(gray(image), linear_window(pydicom.dcmread(path).pixel_array, 600, 1600))


def test_emri_multiframe_gives_ten_images(testdata):
    path = testdata("emri_small.dcm")
    images = dicom_images(path)
    assert len(images) == 10
    assert [im.provenance.frame for im in images] == list(range(10))
    assert all(im.pixels.shape == (64, 64, 3) for im in images)
    stored = pydicom.dcmread(path).pixel_array
    assert not np.array_equal(gray(images[0]), gray(images[5]))
    # a subset of frames with a fixed window gives exactly the same frames
    full = dicom_images(path, window="200,400")
    subset = dicom_images(path, window="200,400", frames=[7, 2])
    assert [im.provenance.frame for im in subset] == [7, 2]
    assert np.array_equal(subset[0].pixels, full[7].pixels)
    assert np.array_equal(subset[1].pixels, full[2].pixels)
    assert_uint8_matches(gray(full[7]), linear_window(stored[7], 200, 400))
    with pytest.raises(ValueError):
        dicom_images(path, frames=[10])
    with pytest.raises(ValueError):
        dicom_images(path, frames=[])


def test_sc_rgb_jpeg_ybr_full_is_colour(testdata):
    path = testdata("SC_rgb_jpeg_dcmtk.dcm")
    (image,) = dicom_images(path)
    assert ops(image) == ["color", "to_uint8"]
    assert step(image, "color")["photometric"] == "YBR_FULL"
    px = image.pixels.astype(int)
    # the test image has horizontal bands: red, light red, green, light green, blue, light blue, ...
    expected = {
        5: (255, 0, 0),
        15: (255, 128, 128),
        25: (0, 255, 0),
        35: (128, 255, 128),
        45: (0, 0, 255),
        55: (128, 128, 255),
    }
    for row, rgb in expected.items():
        assert np.abs(px[row, 50] - np.array(rgb)).max() <= 8, row
    assert decode_frames(read_dataset(path)).shape == (1, 100, 100, 3)


def test_uncompressed_ybr_full_matches_rgb_reference(testdata):
    reference = dicom_images(testdata("SC_rgb.dcm"))[0].pixels.astype(int)
    ybr = dicom_images(testdata("SC_ybr_full_uncompressed.dcm"))[0].pixels.astype(int)
    assert np.abs(ybr - reference).max() <= 8


def test_ybr_rct_jpeg2000_lossless_equals_uncompressed(testdata):
    j2k = dicom_images(testdata("US1_J2KR.dcm"))[0]
    unc = dicom_images(testdata("US1_UNCR.dcm"))[0]
    assert step(j2k, "color")["photometric"] == "YBR_RCT"
    assert np.array_equal(j2k.pixels, unc.pixels)


def test_jpeg_lossless_decodes_with_plugin(testdata):
    path = testdata("JPEG-LL.dcm")
    ds = read_dataset(path)
    stored = decode_frames(ds)
    assert stored.shape == (1, 1024, 256)
    assert np.array_equal(stored[0], pydicom.dcmread(path).pixel_array)
    assert stored.max() > stored.min()
    (image,) = dicom_images(ds)
    assert image.pixels.shape == (1024, 256, 3)


def test_real_voi_lut_sequence(testdata):
    path = testdata("vlut_04.dcm")
    raw = pydicom.dcmread(path)
    item = raw.VOILUTSequence[0]
    lut = np.asarray(item.LUTData, dtype=np.float64)
    n, first, bits = item.LUTDescriptor
    stored = raw.pixel_array.astype(np.int64)
    unit = lut[np.clip(stored - first, 0, n - 1)] / (2**bits - 1)
    (image,) = dicom_images(path)
    assert step(image, "voi")["source"] == "file:voi_lut"
    assert_uint8_matches(gray(image), unit)


def test_real_modality_lut_sequence(testdata):
    path = testdata("mlut_18.dcm")
    raw = pydicom.dcmread(path)
    item = raw.ModalityLUTSequence[0]
    lut = np.asarray(item.LUTData, dtype=np.float64)
    n, first, _ = item.LUTDescriptor
    stored = raw.pixel_array.astype(np.int64)
    expected = lut[np.clip(stored - first, 0, n - 1)]
    ds = read_dataset(path)
    np.testing.assert_array_equal(modality_values(ds, decode_frames(ds))[0], expected)
    (image,) = dicom_images(path)
    assert step(image, "modality_lut")["lut_sequence"] is True


def test_enhanced_ct_functional_groups(testdata):
    path = testdata("eCT_Supplemental.dcm")
    images = dicom_images(path)
    assert len(images) == 2
    assert step(images[0], "modality_lut") == {
        "slope": 1.0,
        "intercept": -1024.0,
        "source": "functional_groups",
    }
    assert step(images[0], "voi") == {
        "source": "file:window",
        "center": 49.0,
        "width": 102.0,
        "function": "LINEAR",
    }
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert_uint8_matches(gray(images[1]), linear_window(stored[1] - 1024.0, 49, 102))


def test_palette_colour(testdata):
    path = testdata("OBXXXX1A.dcm")
    (image,) = dicom_images(path)
    assert step(image, "color")["photometric"] == "PALETTE COLOR"
    raw = pydicom.dcmread(path)
    rgb16 = pydicom.pixels.apply_color_lut(raw.pixel_array, raw).astype(np.float64)
    expected = np.rint(rgb16 * 255.0 / 65535.0)
    assert np.abs(image.pixels.astype(np.float64) - expected).max() <= 1


def test_truncated_and_non_pixel_files(testdata, tmp_path):
    with pytest.raises(CorruptFileError):
        dicom_images(testdata("MR_truncated.dcm"))
    with pytest.raises(NoPixelDataError):
        dicom_images(testdata("rtplan.dcm"))
    random_file = tmp_path / "random.dcm"
    random_file.write_bytes(random.Random(1).randbytes(4096))
    with pytest.raises(CorruptFileError):
        read_dataset(random_file)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(CorruptFileError):
        dicom_images(empty)
    with pytest.raises(FileNotFoundError):
        dicom_images(tmp_path / "missing.dcm")


def test_truncated_jpeg2000_fragment_is_corrupt(testdata):
    with pytest.raises(CorruptFileError):
        dicom_images(testdata("emri_small_jpeg_2k_lossless_too_short.dcm"))


@pytest.mark.parametrize("fraction", [0.01, 0.2, 0.5, 0.9, 0.999])
def test_truncated_copies_are_corrupt(testdata, tmp_path, fraction):
    data = Path(testdata("CT_small.dcm")).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CorruptFileError):
        dicom_images(cut)


def test_damaged_files_raise_only_typed_errors(testdata, tmp_path):
    rng = random.Random(7)
    sources = [
        Path(testdata(n)).read_bytes() for n in ("CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG-LL.dcm")
    ]
    target = tmp_path / "damaged.dcm"
    for _ in range(60):
        data = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 12)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        target.write_bytes(bytes(data))
        try:
            images = dicom_images(target)
        except EmmaError:
            continue
        assert all(im.pixels.dtype == np.uint8 for im in images)


def test_limits_checked_before_decoding(testdata, dicom_file):
    with pytest.raises(ImageTooLargeError):
        dicom_images(testdata("RG1_UNCI.dcm"), limits=Limits(max_pixels=1000 * 1000))
    with pytest.raises(ImageTooLargeError):
        read_dataset(testdata("CT_small.dcm"), Limits(max_file_bytes=1000))
    small = np.zeros((4, 4), dtype=np.uint16)
    # headers claim far more than the pixel data holds: decoding would fail as truncated, so the typed
    # ImageTooLargeError shows the bounds are checked first
    huge = dicom_file(small, extra={"Rows": 60000, "Columns": 60000})
    with pytest.raises(ImageTooLargeError):
        dicom_images(huge)
    many = dicom_file(small, extra={"NumberOfFrames": 5000})
    with pytest.raises(ImageTooLargeError):
        dicom_images(many)
    with pytest.raises(ImageTooLargeError):
        check_pixel_bounds(read_dataset(many), Limits(), "many")
    with pytest.raises(ImageTooLargeError):
        dicom_images(dicom_file(np.zeros((2, 4, 4), np.uint16)), limits=Limits(max_frames=1))


# -------------------------------------------------------------------------------- synthetic pitfalls


def test_slope_intercept(dicom_file):
    stored = np.array([[-10, 0, 37, 250], [333, 421, 511, 600]], dtype=np.int16)
    path = dicom_file(stored, rescale=(2.0, -1000.0))
    ds = read_dataset(path)
    hu = modality_values(ds, decode_frames(ds))
    np.testing.assert_array_equal(hu[0], stored.astype(np.float64) * 2.0 - 1000.0)
    (image,) = dicom_images(path, window="40,400")
    assert step(image, "modality_lut") == {"slope": 2.0, "intercept": -1000.0, "source": "rescale"}
    assert np.array_equal(gray(image), to_uint8_reference(linear_window(stored * 2.0 - 1000.0, 40, 400)))


def _patch_ds_value(path: Path, tag: bytes, value: bytes) -> Path:
    """Overwrite an explicit-VR DS element's value in the file, keeping its length (pydicom refuses to
    write such values)."""
    raw = path.read_bytes()
    at = raw.index(tag + b"DS")
    length = int.from_bytes(raw[at + 6 : at + 8], "little")
    path.write_bytes(raw[: at + 8] + value.ljust(length) + raw[at + 8 + length :])
    return path


@pytest.mark.parametrize(
    ("tag", "keyword"), [(b"\x28\x00\x53\x10", "RescaleSlope"), (b"\x28\x00\x52\x10", "RescaleIntercept")]
)
def test_a_rescale_that_is_not_a_number_is_an_error_not_identity(dicom_file, tag, keyword):
    path = _patch_ds_value(dicom_file(np.zeros((4, 4), np.int16), rescale=(2.5, -1000.0)), tag, b"JA")
    with pytest.raises(CorruptFileError, match=f"invalid {keyword} element") as info:
        dicom_images(path)
    assert "JA" not in str(info.value)  # element values are never quoted
    with pytest.raises(CorruptFileError, match=keyword):
        dicom_summary(read_dataset(path))
    # a number, even a zero slope (which files carry to mean "no rescale"), is read as before
    zero = _patch_ds_value(dicom_file(np.zeros((4, 4), np.int16), rescale=(2.5, -1000.0)), tag, b"0")
    (image,) = dicom_images(zero)
    assert step(image, "modality_lut") == {"slope": 1.0 if keyword == "RescaleSlope" else 2.5,
                                           "intercept": -1000.0 if keyword == "RescaleSlope" else 0.0,
                                           "source": "rescale"}  # fmt: skip


def test_signed_pixels_with_unused_high_bits(dicom_file):
    values = np.array([[-2048, -1000, -5, 0], [5, 300, 1200, 2047]], dtype=np.int16)
    packed = (values.astype(np.int32) & 0x0FFF).astype(np.int16)  # 12 bits stored, high bits zero
    path = dicom_file(packed, bits_stored=12, rescale=(1.0, -24.0), window=(-100.0, 1000.0))
    ds = read_dataset(path)
    assert ds.PixelRepresentation == 1
    stored = decode_frames(ds)
    np.testing.assert_array_equal(stored[0], values)  # sign-extended from bit 11
    np.testing.assert_array_equal(modality_values(ds, stored)[0], values - 24.0)
    (image,) = dicom_images(path)
    assert np.array_equal(gray(image), to_uint8_reference(linear_window(values - 24.0, -100, 1000)))


def test_unsigned_pixels_ignore_bits_above_bits_stored(dicom_file):
    values = np.array([[0, 7, 1000], [2047, 3000, 4095]], dtype=np.uint16)
    dirty = values | np.uint16(0xF000)  # e.g. overlay bits left in the unused high bits
    path = dicom_file(dirty, bits_stored=12, window=(2048.0, 4096.0), modality="OT")
    stored = decode_frames(read_dataset(path))
    np.testing.assert_array_equal(stored[0], values)
    (image,) = dicom_images(path)
    assert np.array_equal(gray(image), to_uint8_reference(linear_window(values, 2048, 4096)))


def test_monochrome1_inverts_after_window(dicom_file):
    stored = np.array([[0, 100, 1000], [2100, 3000, 4095]], dtype=np.uint16)
    path = dicom_file(
        stored, photometric="MONOCHROME1", bits_stored=12, window=(2048.0, 4096.0), modality="CR"
    )
    ds = read_dataset(path)
    assert is_monochrome1(ds)
    (image,) = dicom_images(path)
    assert ops(image) == ["modality_lut", "voi", "invert", "to_uint8"]
    out = gray(image)
    assert np.array_equal(out, to_uint8_reference(linear_window(stored, 2048, 4096), invert=True))
    assert out[0, 0] == 255 and out[1, 2] == 0  # low stored value bright, high stored value dark


def test_voi_lut_sequence_beats_window_and_clips_out_of_range_inputs(dicom_file):
    stored = np.array([[0, 9, 10, 11, 100], [200, 265, 266, 300, 4000]], dtype=np.uint16)
    table = np.round(np.sqrt(np.arange(256) / 255.0) * 255.0).astype(int)
    path = dicom_file(stored, voi_lut=([256, 10, 8], table.tolist()), window=(100.0, 50.0), modality="OT")
    (image,) = dicom_images(path)
    assert step(image, "voi") == {"source": "file:voi_lut", "entries": 256, "first_mapped": 10, "bits": 8}
    index = np.clip(stored.astype(np.int64) - 10, 0, 255)  # below first → first entry, above → last
    expected = table[index].astype(np.uint8)  # 8-bit LUT output maps 1:1 onto uint8
    assert np.array_equal(gray(image), expected)
    assert gray(image)[1, 4] == 255  # 4000 is past the LUT end, not wrapped around


def test_sigmoid(dicom_file):
    stored = np.array([[0, 60, 90, 101], [110, 130, 170, 400]], dtype=np.uint16)
    path = dicom_file(stored, window=(100.0, 50.0), voi_lut_function="SIGMOID", modality="OT")
    (image,) = dicom_images(path)
    assert step(image, "voi")["function"] == "SIGMOID"
    assert np.array_equal(gray(image), to_uint8_reference(sigmoid_window(stored, 100, 50)))


def test_linear_exact(dicom_file):
    stored = np.array([[0, 84, 85, 86, 90], [100, 113, 115, 116, 300]], dtype=np.uint16)
    path = dicom_file(stored, window=(100.2, 30.0), voi_lut_function="LINEAR_EXACT", modality="OT")
    (image,) = dicom_images(path)
    assert step(image, "voi")["function"] == "LINEAR_EXACT"
    expected = to_uint8_reference(linear_exact_window(stored, 100.2, 30.0))
    assert np.array_equal(gray(image), expected)
    # LINEAR with the same numbers differs (half-pixel offset, width - 1): the function matters
    assert not np.array_equal(expected, to_uint8_reference(linear_window(stored, 100.2, 30.0)))


def test_multi_valued_window_takes_the_first(dicom_file):
    stored = np.array([[-300, -150, 0, 41], [97, 170, 230, 900]], dtype=np.int16)
    path = dicom_file(stored, window=([40.0, 400.0], [400.0, 2000.0]))
    (image,) = dicom_images(path)
    assert step(image, "voi")["center"] == 40.0 and step(image, "voi")["width"] == 400.0
    assert np.array_equal(gray(image), to_uint8_reference(linear_window(stored, 40, 400)))


def test_uncompressed_ybr_full_converted_with_standard_equations(dicom_file):
    rgb = np.array(
        [
            [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]],
            [[10, 20, 30], [200, 100, 50], [90, 180, 45], [0, 0, 0]],
        ],
        dtype=np.float64,
    )
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # PS3.3 C.7.6.3.1.2 (YBR_FULL)
    y = 0.2990 * r + 0.5870 * g + 0.1140 * b
    cb = -0.1687 * r - 0.3313 * g + 0.5000 * b + 128
    cr = 0.5000 * r - 0.4187 * g - 0.0813 * b + 128
    ybr = np.clip(np.rint(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)
    path = dicom_file(ybr, photometric="YBR_FULL", modality="OT", window=(40.0, 400.0))
    (image,) = dicom_images(path, window="lung")
    assert step(image, "color") == {"photometric": "YBR_FULL", "to": "RGB", "window_ignored": True}
    assert np.abs(image.pixels.astype(int) - rgb.astype(int)).max() <= 2


def test_multiframe_frames_and_provenance(dicom_file):
    stack = np.stack([np.full((3, 4), v, dtype=np.uint16) for v in (100, 1000, 3000)])
    stack[1, 0, 0] = 2500
    path = dicom_file(stack, bits_stored=12, window=(2000.0, 4000.0), modality="OT")
    images = dicom_images(path)
    assert [im.provenance.frame for im in images] == [0, 1, 2]
    assert all(im.provenance.format == "dicom" and im.provenance.source == str(path) for im in images)
    for k, im in enumerate(images):
        assert np.array_equal(gray(im), to_uint8_reference(linear_window(stack[k], 2000, 4000)))
    images[0].provenance.steps[0].params["slope"] = 99.0  # provenance is not shared between frames
    assert step(images[1], "modality_lut")["slope"] == 1.0


def test_sixteen_bit_values_never_wrap(dicom_file):
    stored = np.array([[0, 255, 256, 257, 1000], [4095, 30000, 60000, 65534, 65535]], dtype=np.uint16)
    path = dicom_file(stored, window=(32768.0, 65536.0), modality="OT")
    out = gray(dicom_images(path)[0]).ravel()
    assert np.all(np.diff(out.astype(int)) >= 0)  # monotonic: 256 is not 0, 65535 is not 255 - 256
    assert np.array_equal(out, to_uint8_reference(linear_window(stored, 32768, 65536)).ravel())


def test_percentile_fallback_ignores_outliers(dicom_file):
    rng = np.random.default_rng(3)
    body = rng.integers(100, 200, size=(50, 50)).astype(np.int16)
    body[0, :3] = 30000
    body[1, :3] = -30000
    path = dicom_file(body, rescale=(1.0, 0.0))
    (image,) = dicom_images(path)
    params = step(image, "voi")
    assert params["source"] == "percentile" and params["function"] == "LINEAR_EXACT"
    lo, hi = np.percentile(body.astype(np.float64), [0.5, 99.5])
    assert params["center"] == pytest.approx((lo + hi) / 2, abs=1e-3)
    assert_uint8_matches(gray(image), linear_exact_window(body, (lo + hi) / 2, hi - lo))
    inner = gray(image)[2:, :]
    assert inner.min() <= 3 and inner.max() >= 252  # min/max scaling would squeeze these to ~127


def test_explicit_window_and_preset_override_the_file(dicom_file):
    stored = np.array([[-1000, -650, -400, 3], [12, 17, 41, 1500]], dtype=np.int16)
    path = dicom_file(stored, rescale=(1.0, 0.0), window=(40.0, 400.0))
    (lung,) = dicom_images(path, window="lung")
    assert step(lung, "voi") == {
        "source": "preset:lung",
        "center": -600.0,
        "width": 1500.0,
        "function": "LINEAR",
    }
    assert np.array_equal(gray(lung), to_uint8_reference(linear_window(stored, -600, 1500)))
    (explicit,) = dicom_images(path, window=Window(0.0, 100.0, VOIFunction.LINEAR_EXACT))
    assert step(explicit, "voi")["source"] == "explicit"
    assert np.array_equal(gray(explicit), to_uint8_reference(linear_exact_window(stored, 0, 100)))
    (text,) = dicom_images(path, window="10,20")
    assert step(text, "voi")["source"] == "explicit"
    assert np.array_equal(gray(text), to_uint8_reference(linear_window(stored, 10, 20)))
    (file_window,) = dicom_images(path)
    assert step(file_window, "voi")["source"] == "file:window"
    with pytest.raises(ValueError):
        dicom_images(path, window="not-a-preset")


def test_invalid_file_window_falls_back_to_percentile(dicom_file):
    stored = np.arange(20, dtype=np.int16).reshape(4, 5)
    path = dicom_file(stored, window=(10.0, 0.0))
    (image,) = dicom_images(path)
    assert step(image, "voi")["source"] == "percentile"
    assert step(image, "voi")["file_window_invalid"] is True


def test_per_frame_functional_group_rescale(dicom_file):
    groups = []
    for k in range(3):
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = 1.0, float(100 * k)
        group = Dataset()
        group.PixelValueTransformationSequence = [transform]
        groups.append(group)
    stack = np.stack([np.arange(12, dtype=np.uint16).reshape(3, 4) + 10 * k for k in range(3)])
    path = dicom_file(stack, modality="OT", extra={"PerFrameFunctionalGroupsSequence": groups})
    ds = read_dataset(path)
    values = modality_values(ds, decode_frames(ds))
    for k in range(3):
        np.testing.assert_array_equal(values[k], stack[k] + 100.0 * k)
    only_two = modality_values(ds, decode_frames(ds, frames=[2]), frame_indices=[2])
    np.testing.assert_array_equal(only_two[0], stack[2] + 200.0)
    (image,) = dicom_images(path, frames=[2], window="250,100")
    assert step(image, "modality_lut") == {"slope": 1.0, "intercept": 200.0, "source": "functional_groups"}
    assert np.array_equal(gray(image), to_uint8_reference(linear_window(stack[2] + 200.0, 250, 100)))


def test_unsupported_transfer_syntaxes(dicom_file, tmp_path):
    pixels = np.zeros((8, 8), dtype=np.uint8)
    mpeg2 = dicom_file(pixels, transfer_syntax="1.2.840.10008.1.2.4.100", encapsulated_frames=[b"\x00" * 64])
    with pytest.raises(UnsupportedTransferSyntaxError):
        dicom_images(mpeg2)
    # JPEG XL: a UID pydicom does not know; same length as the MPEG2 UID, so patch it in place
    jpegxl = tmp_path / "jpegxl.dcm"
    jpegxl.write_bytes(mpeg2.read_bytes().replace(b"1.2.840.10008.1.2.4.100", b"1.2.840.10008.1.2.4.110"))
    assert str(read_dataset(jpegxl).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.110"
    with pytest.raises(UnsupportedTransferSyntaxError):
        dicom_images(jpegxl)


def test_no_pixel_data_synthetic(dicom_file):
    with pytest.raises(NoPixelDataError):
        dicom_images(dicom_file(None, modality="SR"))


def test_file_without_preamble(dicom_file):
    stored = np.array([[0, 50], [150, 200]], dtype=np.uint16)
    path = dicom_file(stored, window=(100.0, 201.0), preamble=False, modality="OT")
    assert path.read_bytes()[128:132] != b"DICM"
    (image,) = dicom_images(path)
    assert np.array_equal(gray(image), to_uint8_reference(linear_window(stored, 100, 201)))


def test_bare_stream_of_garbage_is_corrupt(tmp_path):
    rng = random.Random(5)
    for k in range(20):
        path = tmp_path / f"garbage{k}.dcm"
        path.write_bytes(b"\x08\x00" + rng.randbytes(rng.randint(10, 2000)))
        with pytest.raises(CorruptFileError):
            dicom_images(path)


def test_apply_voi_directly_on_a_volume():
    volume = np.linspace(-1000, 1000, 2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    prov = Provenance(source="vol", format="dicom-series")
    unit = apply_voi(volume, None, None, prov)
    assert unit.dtype == np.float32 and unit.shape == volume.shape
    assert unit.min() >= 0.0 and unit.max() <= 1.0
    assert [s.op for s in prov.steps] == ["voi"] and prov.steps[0].params["source"] == "percentile"
    prov2 = Provenance(source="vol", format="dicom-series")
    unit2 = apply_voi(volume, None, "bone", prov2)
    np.testing.assert_allclose(unit2, linear_window(volume, 400, 1800), atol=1e-6)
    assert volume.min() == -1000.0  # input untouched


def test_summary_is_json_and_phi_free(dicom_file, testdata):
    stored = np.zeros((4, 6), dtype=np.int16)
    path = dicom_file(
        stored, rescale=(1.0, -1024.0), window=([40.0, 80.0], [400.0, 800.0]), slice_thickness=2.5
    )
    ds = read_dataset(path)
    summary = dicom_summary(ds)
    text = json.dumps(summary)
    for secret in ("Synthetic", "SYN-0001", ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
        assert secret not in text
    assert summary["rows"] == 4 and summary["columns"] == 6 and summary["frames"] == 1
    assert summary["window"] == {"center": 40.0, "width": 400.0, "function": "LINEAR"}
    assert summary["rescale_intercept"] == -1024.0 and summary["slice_thickness"] == 2.5
    assert summary["transfer_syntax"]["uid"] == "1.2.840.10008.1.2.1"
    assert summary["sop_class"] == "CT Image Storage"
    assert summary["pixel_spacing"] == [0.7, 0.7]
    real = dicom_summary(read_dataset(testdata("RG1_J2KI.dcm"), stop_before_pixels=True))
    json.dumps(real)
    assert real["photometric_interpretation"] == "MONOCHROME1" and real["bits_stored"] == 15
    assert real["transfer_syntax"]["name"].startswith("JPEG 2000")


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "RG1_J2KI.dcm", "CT_small.dcm"])
def test_header_read_knows_the_pixel_data_without_loading_them(testdata, name):
    ds = read_dataset(testdata(name), defer_size=HEADER_DEFER_BYTES)
    assert dicom_summary(ds)["has_pixel_data"] is True
    pixel = ds.get_item(0x7FE00010, keep_deferred=True)
    size = os.path.getsize(testdata(name))
    if size > 2 * HEADER_DEFER_BYTES and pixel.length != 0xFFFFFFFF:  # native, large: left in the file
        assert pixel.value is None
    # stop_before_pixels cannot tell: the element is not read at all
    assert dicom_summary(read_dataset(testdata(name), stop_before_pixels=True))["has_pixel_data"] is False


@pytest.mark.parametrize(
    ("name", "fraction"), [("RG1_UNCI.dcm", 0.5), ("CT_small.dcm", 0.6), ("RG1_J2KI.dcm", 0.5)]
)
def test_header_read_of_a_file_cut_inside_the_pixel_data_is_corrupt(testdata, tmp_path, name, fraction):
    data = Path(testdata(name)).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CorruptFileError, match="truncated"):
        read_dataset(cut, defer_size=HEADER_DEFER_BYTES)


def test_dataset_input_and_source_label(testdata):
    ds = read_dataset(testdata("CT_small.dcm"))
    (image,) = dicom_images(ds, source="case-7/ct.dcm", window="brain")
    assert image.provenance.source == "case-7/ct.dcm" and image.provenance.frame == 0
    assert os.fspath(ds.filename) == testdata("CT_small.dcm")
