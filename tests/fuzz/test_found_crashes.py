"""Regression tests of the crashes the fuzz battery found in emma.io, each on the input it found (shrunk):
a real pydicom test file with one or two header elements changed. Each used to raise an untyped
exception (TypeError, OverflowError, ValueError, pydicom's BytesLengthException, a Rust panic) or a
misleading error; each now gets a typed EmmaError, or loads."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from dicom_mutations import Mutation, Seed, Value, seed, write

from emma.errors import CorruptFileError
from emma.io.deid import DeidConfig, deidentify_path, is_deidentified
from emma.io.load import describe, load_images
from emma.io.mosaic import is_mosaic
from emma.io.plan import plan_images
from emma.io.volume import load_series

DEID = DeidConfig(key=b"fuzz-key-0123456789abcdef-not-secret")


def mutated(tmp_path: Path, name: str, *changes: Mutation) -> Path:
    path = tmp_path / f"{Path(name).stem}-mutated.dcm"
    assert write(seed(name), list(changes), path)
    return path


def test_image_type_of_a_numeric_vr_is_not_a_mosaic(tmp_path: Path) -> None:
    # was: TypeError ('int' object is not iterable) in load and plan
    path = mutated(tmp_path, "CT_small.dcm", Mutation("ImageType", Value("SS", [7])))
    assert len(load_images(path)) == 1
    assert plan_images(path).count == 1
    assert not is_mosaic(pydicom.dcmread(path))


def test_rows_of_an_odd_length_is_a_corrupt_file(tmp_path: Path) -> None:
    # was: pydicom's BytesLengthException from the plan (the server's header check)
    path = mutated(tmp_path, "CT_small.dcm", Mutation("Rows", Value("US", b"\0" * 9, raw=True)))
    for call in (plan_images, load_images):
        with pytest.raises(CorruptFileError, match="invalid Rows"):
            call(path)


def test_infinite_rows_is_a_corrupt_file(tmp_path: Path) -> None:
    # was: OverflowError (cannot convert float infinity to integer)
    path = mutated(tmp_path, "CT_small.dcm", Mutation("Rows", Value("DS", "inf")))
    for call in (plan_images, load_images, describe):
        with pytest.raises(CorruptFileError, match="invalid Rows"):
            call(path)


def test_multi_valued_columns_are_planned_from_the_first_value(tmp_path: Path) -> None:
    # was: TypeError (int() of a MultiValue) in the plan
    path = mutated(tmp_path, "MR_small.dcm", Mutation("Columns", Value("US", [64, 2, 3])))
    assert plan_images(path).source_pixels == 64 * 64
    with pytest.raises(CorruptFileError):
        load_images(path)


def test_a_panicking_rust_decoder_is_a_corrupt_file(tmp_path: Path) -> None:
    # was: pyo3's PanicException from pylibjpeg-rle (a BaseException: it went through every
    # `except Exception`, the server's included)
    path = mutated(tmp_path, "MR_small_RLE.dcm", Mutation("Rows", Value("US", [7])))
    with pytest.raises(CorruptFileError, match="cannot decode RLE Lossless"):
        load_images(path)


def test_lut_data_that_are_not_numbers_are_corrupt(tmp_path: Path) -> None:
    # was: ValueError (int() of text) in emma info and loading
    path = mutated(tmp_path, "mlut_18.dcm", Mutation("LUTData", Value("UI", "+\x1fE")))
    for call in (describe, load_images):
        with pytest.raises(CorruptFileError, match="invalid ModalityLUTSequence LUTData"):
            call(path)


@pytest.mark.parametrize("keyword", ["ModalityLUTSequence", "VOILUTSequence"])
def test_a_lut_sequence_of_another_vr_is_corrupt(tmp_path: Path, keyword: str) -> None:
    # was: TypeError ('int' object is not subscriptable)
    path = mutated(tmp_path, "CT_small.dcm", Mutation(keyword, Value("US", [7])))
    with pytest.raises(CorruptFileError, match=f"invalid {keyword} element"):
        load_images(path)


def test_a_flat_image_at_a_huge_intercept_loads(tmp_path: Path) -> None:
    # was: ValueError from the percentile window (width 0: lo + 1.0 == lo at 1e16)
    path = mutated(tmp_path, "CT_small.dcm", Mutation("RescaleIntercept", Value("DS", "-1.3e16")))
    (image,) = load_images(path)
    voi = next(step for step in image.provenance.steps if step.op == "voi")
    assert voi.params["source"] == "percentile" and voi.params["width"] > 0


def test_a_rescale_that_overflows_float32_is_corrupt(tmp_path: Path) -> None:
    # was: ValueError ("image has no finite values")
    path = mutated(
        tmp_path,
        "CT_small.dcm",
        Mutation("RescaleSlope", Value("DS", "1e38")),
        Mutation("RescaleIntercept", Value("DS", "3.3e38")),
    )
    with pytest.raises(CorruptFileError, match="no finite pixel values"):
        load_images(path)


def test_deid_rewrites_a_file_meta_element_of_a_wrong_vr(tmp_path: Path) -> None:
    # was: OutputError "cannot write the output (OSError: None)": the input's MediaStorageSOPClassUID
    # had VR US, kept when deid set its value, and pydicom could not encode it
    path = mutated(tmp_path, "MR_small.dcm", Mutation("MediaStorageSOPClassUID", Value("US", [])))
    out = tmp_path / "out.dcm"
    deidentify_path(path, out, DEID)
    clean = pydicom.dcmread(out)
    assert is_deidentified(clean)
    assert clean.file_meta["MediaStorageSOPClassUID"].VR == "UI"
    assert clean.file_meta.MediaStorageSOPClassUID == clean.SOPClassUID


def _series(folder: Path, *changes: Mutation) -> None:
    """CT_small as three slices 5 mm apart, the middle one with ``changes``."""
    folder.mkdir()
    base = seed("CT_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(base.data))
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    for k in range(3):
        ds.SOPInstanceUID = f"1.2.3.4.{k + 1}"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [x, y, z + 5.0 * k]
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        slice_seed = Seed(f"slice {k}", buf.getvalue(), base.implicit, base.little)
        assert write(slice_seed, list(changes) if k == 1 else [], folder / f"s{k}.dcm")


def test_a_series_slice_with_an_unparsable_rows_is_skipped_as_corrupt(tmp_path: Path) -> None:
    # was: pydicom's BytesLengthException while grouping the folder's series
    folder = tmp_path / "series"
    _series(folder, Mutation("Rows", Value("US", b"\x12k\x01\xadSL\x974]", raw=True)))
    assert sorted(load_series(folder).shape) == [2, 128, 128]
    (entry,) = describe(folder)["series"]
    assert entry["files"] == 2


def test_a_vanishing_temperature_decodes_greedily() -> None:
    # was: 500 engine_error from the server ("probability tensor contains either inf, nan or element
    # < 0"): logits divided by temperature 7.6e-123 overflow float32
    from emma.infer.transformers_engine import TransformersEngine
    from emma.infer.types import GenerationRequest, Message, SamplingParams
    from emma.model.tiny_families import load_tiny

    assert SamplingParams(temperature=7.57e-123).greedy and SamplingParams(temperature=float("nan")).greedy
    assert not SamplingParams(temperature=0.7).greedy
    engine = TransformersEngine(load_tiny("llava"), max_batch_size=2)
    prompt = [Message.text("user", "K")]
    tiny, greedy = engine.generate(
        [
            GenerationRequest(
                messages=prompt, sampling=SamplingParams(max_new_tokens=3, temperature=7.57e-123)
            ),
            GenerationRequest(messages=prompt, sampling=SamplingParams(max_new_tokens=3, temperature=0.0)),
        ]
    )
    assert tiny.finish_reason != "error", tiny.error
    assert tiny.text == greedy.text


def test_the_server_answers_a_panicking_decoder_with_400(tmp_path: Path) -> None:
    # the RLE file above as a data URL: the decoder runs in a worker thread of the server, where the
    # panic used to escape every handler
    import base64

    from fastapi.testclient import TestClient

    from emma.infer.transformers_engine import TransformersEngine
    from emma.model.tiny_families import load_tiny
    from emma.serve.app import ServeSettings, create_app

    path = mutated(tmp_path, "MR_small_RLE.dcm", Mutation("Rows", Value("US", [7])))
    url = "data:application/dicom;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    engine = TransformersEngine(load_tiny("llava"), max_batch_size=1)
    settings = ServeSettings(api_key=None, static_dir=None, max_body_bytes=1024**2, memory_budget_mb=64)
    with TestClient(create_app(engine, settings)) as client:
        response = client.post("/v1/emma/preview", json={"images": [url]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_image"
    assert "cannot decode RLE Lossless" in response.json()["error"]["message"]


def test_a_lone_surrogate_in_the_text_is_refused_plainly() -> None:
    # was: "cannot build the prompt: TypeError: TextEncodeInput must be Union[...]" from the tokenizer
    # (a JSON body's "\ud800" escape reaches the engine as a lone surrogate)
    from emma.errors import InputError
    from emma.infer.transformers_engine import TransformersEngine
    from emma.infer.types import GenerationRequest, Message
    from emma.model.tiny_families import load_tiny

    engine = TransformersEngine(load_tiny("llava"), max_batch_size=1)
    with pytest.raises(InputError, match="not valid Unicode"):
        engine.count_tokens(GenerationRequest(messages=[Message.text("user", "abc \ud800 def")]))
    assert engine.count_tokens(GenerationRequest(messages=[Message.text("user", "abc \u00e9 def")])) > 0
