"""Decoding bounds in emma.io: Deflate DICOM inflated within the file bound, header-level plans, and
images downscaled to what a model uses as they are decoded (recorded in their provenance)."""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bombs import deflate_bomb, deflated_ct, multiframe_ct, png_header_only, write
from PIL import Image
from pydicom.data import get_testdata_file

from emma.errors import CorruptFileError, ImageTooLargeError
from emma.io.deflate import BoundedInflater
from emma.io.image import ImageFit
from emma.io.limits import Limits
from emma.io.load import SourceFormat, VolumeSampling, describe, load_images
from emma.io.plan import DECODE_BYTES_PER_PIXEL, plan_images

MIB = 1024**2


# -------------------------------------------------------------------------------------------- deflate


def test_deflated_dicom_reads_as_the_same_pixels(tmp_path: Path) -> None:
    stored = (np.arange(48 * 64, dtype=np.uint16) * 7 % 3000).reshape(48, 64)
    path = write(tmp_path / "deflated.dcm", deflated_ct(stored))
    [image] = load_images(path, window="40,400")
    assert image.pixels.shape == (48, 64, 3)
    assert describe(path)["transfer_syntax"]["name"] == "Deflated Explicit VR Little Endian"
    # the same pixels as the package's deflated example read by pydicom itself
    example = Path(get_testdata_file("image_dfl.dcm"))  # type: ignore[arg-type]
    import pydicom

    reference = pydicom.dcmread(example).pixel_array
    [ours] = load_images(example)
    assert ours.pixels.shape[:2] == reference.shape[:2]


def test_deflate_bomb_is_refused_within_the_file_bound(tmp_path: Path) -> None:
    path = write(tmp_path / "bomb.dcm", deflate_bomb(inflated_bytes=64 * MIB))
    assert path.stat().st_size < 200_000
    limits = Limits(max_file_bytes=4 * MIB)
    with pytest.raises(ImageTooLargeError, match="inflate to more than the limit of 4194304"):
        load_images(path, limits=limits)
    # the header alone is read without inflating the pixel data
    plan = plan_images(path, limits=limits)
    assert plan.format is SourceFormat.DICOM and plan.count == 64 * MIB // (512 * 512 * 2)


def test_bounded_inflater_never_inflates_past_its_limit() -> None:
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    raw = compressor.compress(bytes(32 * MIB)) + compressor.flush()
    stream = BoundedInflater(io.BytesIO(raw), 3 * MIB, "x")
    assert stream.read(10) == bytes(10) and stream.inflated <= 10 + 1024 * 1024  # only what was asked
    with pytest.raises(ImageTooLargeError):
        stream.read(32 * MIB)  # an announced length is not allocated ahead of the data
    assert stream.inflated <= 3 * MIB + 1
    whole = BoundedInflater(io.BytesIO(raw[: len(raw) // 2]), 64 * MIB, "x")
    whole.seek(0, io.SEEK_END)
    assert whole.tell() == whole.inflated < 32 * MIB  # a truncated stream ends where its data end
    with pytest.raises(CorruptFileError):
        BoundedInflater(io.BytesIO(b"\xff" * 100), MIB, "x").read(5)


# ----------------------------------------------------------------------------------------------- plans


def test_plans_come_from_headers_of_files_that_cannot_be_decoded(tmp_path: Path) -> None:
    frames = write(tmp_path / "frames.dcm", multiframe_ct(512, 16, 16, truncate_pixels=True))
    plan = plan_images(frames)
    assert (plan.count, plan.source_pixels) == (512, 512 * 16 * 16)
    assert plan.decode_bytes == plan.source_pixels * DECODE_BYTES_PER_PIXEL
    with pytest.raises(CorruptFileError):
        load_images(frames)  # decoding would fail: the plan never decoded it
    png = png_header_only(5700, 5700)
    assert plan_images(png).source_pixels == 5700 * 5700
    with pytest.raises(ImageTooLargeError):
        plan_images(png, limits=Limits(max_pixels=4096 * 4096))
    with pytest.raises(ImageTooLargeError):
        plan_images(frames, limits=Limits(max_frames=100))


def test_plan_counts_what_load_images_gives(tmp_path: Path) -> None:
    dicom = write(tmp_path / "four.dcm", multiframe_ct(4, 8, 8))
    assert plan_images(dicom).count == len(load_images(dicom)) == 4
    ct = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    assert plan_images(ct).count == len(load_images(ct)) == 1
    volume = nib.Nifti1Image(np.zeros((20, 16, 12), dtype=np.int16), np.eye(4))
    nifti = tmp_path / "v.nii.gz"
    nib.save(volume, nifti)
    sampling = VolumeSampling(n=5)
    plan = plan_images(nifti, sampling=sampling)
    assert plan.count == len(load_images(nifti, sampling=sampling)) == 5
    assert plan.source_pixels == 20 * 16 * 12
    tiff = io.BytesIO()
    Image.new("L", (30, 20)).save(
        tiff, format="TIFF", save_all=True, append_images=[Image.new("L", (30, 20))]
    )
    assert plan_images(tiff.getvalue()).count == len(load_images(tiff.getvalue())) == 2


# ------------------------------------------------------------------------------------------------- fit


@pytest.mark.parametrize(
    ("fit", "size", "expected"),
    [
        (ImageFit(cover=(224, 224)), (1000, 500), (448, 224)),  # the short side stays at the view
        (ImageFit(cover=(224, 224)), (200, 100), (200, 100)),  # never enlarged
        (ImageFit(max_side=1000), (4000, 1000), (1000, 250)),
        (ImageFit(max_pixels=10_000), (400, 100), (200, 50)),
        (ImageFit(cover=(10, 10), max_side=50), (400, 100), (40, 10)),  # the smaller scale wins
    ],
)
def test_fit_sizes(fit: ImageFit, size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert fit.size_for(*size) == expected


def test_images_are_downscaled_when_decoded_and_the_resize_is_recorded(tmp_path: Path) -> None:
    fit = ImageFit(cover=(32, 32), reason="model:test")
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    [image] = load_images(buf.getvalue(), fit=fit)
    assert (image.width, image.height) == (43, 32)
    step = image.provenance.steps[-1]
    assert step.op == "resize"
    assert step.params == {"from": [400, 300], "to": [43, 32], "method": "lanczos", "reason": "model:test"}
    # the same pixels PIL's own Lanczos resize of the original gives
    expected = np.asarray(rgb.resize((43, 32), Image.Resampling.LANCZOS, reducing_gap=2.0))
    assert np.array_equal(image.pixels, expected)
    gray16 = tmp_path / "g16.png"
    Image.fromarray((np.arange(200 * 100, dtype=np.uint16) * 3).reshape(100, 200)).save(gray16)
    [g] = load_images(gray16, fit=fit)
    assert (g.width, g.height) == (64, 32) and [s.op for s in g.provenance.steps][-2:] == [
        "to_uint8",
        "resize",
    ]
    ct = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    [d] = load_images(ct, fit=fit)
    assert (d.width, d.height) == (32, 32) and d.provenance.steps[-1].op == "resize"
    [unchanged] = load_images(ct, fit=ImageFit(cover=(512, 512)))
    assert (unchanged.width, unchanged.height) == (128, 128)
    assert all(s.op != "resize" for s in unchanged.provenance.steps)
