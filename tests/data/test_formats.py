"""Format converters: round trips through TRL, LLaVA and OpenAI records with real PNG images; box text."""

from __future__ import annotations

import base64
import hashlib
import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emma.data.formats import (
    data_url,
    decode_data_url,
    format_boxes,
    from_llava,
    from_openai_messages,
    from_trl,
    image_data_url,
    parse_boxes,
    to_llava,
    to_openai_messages,
    to_trl,
)
from emma.data.schema import Box, CoordSpace, Gold, ImageRef, Meta, Sample, TaskType, Turn
from emma.data.store import Dataset, DatasetWriter, open_dataset
from emma.errors import DataFormatError, ImageTooLargeError
from emma.io.limits import Limits
from emma.io.provenance import Provenance


def pixels(seed: int, width: int = 12, height: int = 9) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 11 + seed * 40) % 256, (y * 23 + seed) % 256, (x + y + 7 * seed) % 256], -1).astype(
        np.uint8
    )


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def conversation() -> Sample:
    """Two images: the first shown with the first question, the second with the follow-up."""
    prov = Provenance(source="cxr.dcm", format="dicom").add("invert")
    return Sample(
        id="case-7",
        task=TaskType.REASONING,
        images=[ImageRef(path="a.png", provenance=prov), ImageRef(path="b.png")],
        turns=[
            Turn(role="system", content="You are a radiology assistant."),
            Turn(role="user", content="What do you see?", images=[0]),
            Turn(role="assistant", content="A right pneumothorax."),
            Turn(role="user", content="And on the follow-up film?\nCompare.", images=[1]),
            Turn(role="assistant", content="Resolved after drain placement."),
        ],
        gold=Gold(answer="pneumothorax", boxes=[Box(x1=1, y1=1, x2=5, y2=6)]),
        meta=Meta(modality="xray", body_part="chest"),
    )


@pytest.fixture()
def stored(tmp_path: Path) -> tuple[Dataset, Sample]:
    with DatasetWriter(tmp_path / "ds", name="fmt") as w:
        sample = w.add(conversation(), [png(pixels(1)), png(pixels(2, 7, 5))])
    return open_dataset(tmp_path / "ds"), sample


# ------------------------------------------------------------------------------------------------ TRL


def test_trl_record_shape_and_round_trip(stored: tuple[Dataset, Sample], tmp_path: Path) -> None:
    ds, sample = stored
    record = to_trl(sample, ds.open_image)
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert record["messages"][1]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "What do you see?"},
    ]
    assert record["messages"][2]["content"] == [{"type": "text", "text": "A right pneumothorax."}]
    assert len(record["images"]) == 2
    np.testing.assert_array_equal(np.asarray(record["images"][0]), pixels(1))
    np.testing.assert_array_equal(np.asarray(record["images"][1]), pixels(2, 7, 5))

    back, images = from_trl(record, sample_id=sample.id, task=sample.task, gold=sample.gold, meta=sample.meta)
    assert back.turns == sample.turns
    assert (back.id, back.task, back.gold, back.meta) == (sample.id, sample.task, sample.gold, sample.meta)
    assert [(r.width, r.height) for r in back.images] == [(12, 9), (7, 5)]
    assert [r.sha256 for r in back.images] == [hashlib.sha256(b).hexdigest() for b in images]
    # what from_trl returns is what a writer stores
    with DatasetWriter(tmp_path / "again", name="again") as w:
        again = w.add(back, images)
    ds2 = open_dataset(tmp_path / "again")
    np.testing.assert_array_equal(np.asarray(ds2.open_image(again.images[1])), pixels(2, 7, 5))


def test_trl_appends_the_gold_answer_and_shows_unreferenced_images() -> None:
    sample = Sample(
        id="q1",
        task=TaskType.CLOSED_VQA,
        images=[ImageRef(path="x.png")],
        turns=[Turn(role="user", content="Is there a fracture?")],  # the image is on no turn
        gold=Gold(answer="yes"),
    )
    loaded: list[ImageRef] = []

    def loader(ref: ImageRef) -> Image.Image:
        loaded.append(ref)
        return Image.fromarray(pixels(3))

    record = to_trl(sample, loader)
    assert record["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a fracture?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
    ]
    assert loaded == [sample.images[0]] and len(record["images"]) == 1
    assert len(to_trl(sample, loader, add_answer=False)["messages"]) == 1


def test_from_trl_rejects_inconsistent_records() -> None:
    ok = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]}
    with pytest.raises(DataFormatError, match="1 image parts but 0 images"):
        from_trl(ok, sample_id="x")
    with pytest.raises(DataFormatError, match="expected a PIL image"):
        from_trl({**ok, "images": [b"png bytes"]}, sample_id="x")
    with pytest.raises(DataFormatError, match="role"):
        from_trl({"messages": [{"role": "tool", "content": "x"}]}, sample_id="x")
    with pytest.raises(DataFormatError, match="content part"):
        from_trl({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, sample_id="x")
    plain, images = from_trl({"messages": [{"role": "user", "content": "plain text"}]}, sample_id="x")
    assert plain.turns == [Turn(role="user", content="plain text")] and images == []


# ------------------------------------------------------------------------------------------- LLaVA


def test_llava_record_shape_and_round_trip(stored: tuple[Dataset, Sample], tmp_path: Path) -> None:
    ds, sample = stored
    record = to_llava(sample)
    assert record["id"] == "case-7"
    assert record["image"] == [sample.images[0].path, sample.images[1].path]
    assert record["conversations"] == [
        {"from": "system", "value": "You are a radiology assistant."},
        {"from": "human", "value": "<image>\nWhat do you see?"},
        {"from": "gpt", "value": "A right pneumothorax."},
        {"from": "human", "value": "<image>\nAnd on the follow-up film?\nCompare."},
        {"from": "gpt", "value": "Resolved after drain placement."},
    ]
    back, paths = from_llava(record, task=sample.task, image_root=ds.root)
    assert back.id == sample.id and back.turns == sample.turns
    assert [r.path for r in back.images] == [r.path for r in sample.images]
    assert [p.read_bytes() for p in paths] == [ds.image_bytes(r) for r in sample.images]
    # the paths are real files: a new dataset imports them unchanged
    with DatasetWriter(tmp_path / "copy", name="copy") as w:
        copy = w.add(back, paths)
    assert [r.sha256 for r in copy.images] == [r.sha256 for r in sample.images]


def test_llava_single_image_tag_positions_and_errors(tmp_path: Path) -> None:
    one = Sample(
        id="1",
        task=TaskType.OPEN_VQA,
        images=[ImageRef(path="img/1.png")],
        turns=[Turn(role="user", content="Describe.", images=[0]), Turn(role="assistant", content="Normal.")],
    )
    record = to_llava(one)
    assert record["image"] == "img/1.png" and record["conversations"][0]["value"] == "<image>\nDescribe."
    assert from_llava(record)[0] == one.model_copy(update={"task": TaskType.OPEN_VQA})

    trailing = {
        "id": 5,
        "image": "a.png",
        "conversations": [{"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": "ok"}],
    }
    sample, paths = from_llava(trailing)
    assert sample.id == "5" and sample.turns[0] == Turn(role="user", content="Describe.", images=[0])
    assert paths == [Path("a.png")]

    # tags already in the text stay where they are when they match the images shown
    inline = one.model_copy(update={"turns": [Turn(role="user", content="Here: <image> what?", images=[0])]})
    assert to_llava(inline)["conversations"][0]["value"] == "Here: <image> what?"

    with pytest.raises(DataFormatError, match="2 <image> tags but 1 images"):
        from_llava(
            {"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"}]}
        )
    with pytest.raises(DataFormatError, match="speaker"):
        from_llava({"id": "x", "conversations": [{"from": "robot", "value": "hi"}]})
    with pytest.raises(DataFormatError, match="outside"):
        from_llava(
            {"id": "x", "image": "../secret.png", "conversations": [{"from": "human", "value": "<image>"}]},
            image_root=tmp_path,
        )
    with pytest.raises(DataFormatError, match="without an id"):
        from_llava({"conversations": []})
    with pytest.raises(DataFormatError, match="image_path_fn"):
        to_llava(one.model_copy(update={"images": [ImageRef(sha256="ab" * 32)]}))


# ------------------------------------------------------------------------------------------ OpenAI


def test_openai_messages_shape_and_round_trip(stored: tuple[Dataset, Sample], tmp_path: Path) -> None:
    ds, sample = stored
    messages = to_openai_messages(sample, lambda ref: data_url(ds.image_bytes(ref)))
    assert messages[0] == {"role": "system", "content": "You are a radiology assistant."}
    assert messages[2] == {"role": "assistant", "content": "A right pneumothorax."}
    user = messages[1]["content"]
    assert [p["type"] for p in user] == ["image_url", "text"] and user[1]["text"] == "What do you see?"
    url = user[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == ds.image_bytes(sample.images[0])

    back, images = from_openai_messages(messages, sample_id=sample.id, task=sample.task)
    assert back.turns == sample.turns
    assert images == [ds.image_bytes(r) for r in sample.images]  # the same bytes, not re-encoded
    assert [(r.sha256, r.width, r.height) for r in back.images] == [
        (r.sha256, r.width, r.height) for r in sample.images
    ]
    with DatasetWriter(tmp_path / "api", name="api", format="parquet") as w:
        assert [r.sha256 for r in w.add(back, images).images] == [r.sha256 for r in sample.images]


def test_openai_refuses_remote_and_malformed_urls() -> None:
    def user(url: str) -> list[dict[str, object]]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    for url in ("https://example.org/x.png", "HTTP://10.0.0.1/x.png"):
        with pytest.raises(DataFormatError, match="remote image URLs are refused"):
            from_openai_messages(user(url), sample_id="x")
    with pytest.raises(DataFormatError, match="scheme 'file'"):
        from_openai_messages(user("file:///etc/passwd"), sample_id="x")
    with pytest.raises(DataFormatError, match="base64"):
        decode_data_url("data:image/png,rawbytes")
    with pytest.raises(DataFormatError, match="invalid base64"):
        decode_data_url("data:image/png;base64,@@@@")
    with pytest.raises(DataFormatError, match="not an image"):
        decode_data_url("data:text/html;base64," + base64.b64encode(b"<script>").decode())
    big = image_data_url(Image.fromarray(pixels(1, 40, 40)))
    with pytest.raises(ImageTooLargeError):
        decode_data_url(big, limits=Limits(max_file_bytes=100))
    with pytest.raises(ImageTooLargeError):
        from_openai_messages(user(big), sample_id="x", limits=Limits(max_pixels=100))
    with pytest.raises(DataFormatError, match="role"):
        from_openai_messages([{"role": "tool", "content": "x"}], sample_id="x")
    assert decode_data_url(image_data_url(Image.fromarray(pixels(4)))) == png(pixels(4))


def test_openai_images_only_in_user_turns() -> None:
    sample = Sample(
        id="x",
        task=TaskType.OPEN_VQA,
        images=[ImageRef(path="a.png")],
        turns=[Turn(role="user", content="q"), Turn(role="assistant", content="see", images=[0])],
    )
    with pytest.raises(DataFormatError, match="user messages only"):
        to_openai_messages(sample, lambda ref: "data:image/png;base64,")


# ------------------------------------------------------------------------------------------- boxes


def test_format_boxes_text_form() -> None:
    boxes = [Box(x1=10, y1=20, x2=30.5, y2=40), Box(x1=0.125, y1=0.25, x2=0.5, y2=1, space=CoordSpace.NORM1)]
    assert format_boxes(boxes) == "<box>[[10,20,30.5,40],[0.125,0.25,0.5,1]]</box>"
    assert format_boxes([(1.234567, 2, 3, 4)], ndigits=2) == "<box>[[1.23,2,3,4]]</box>"
    assert format_boxes([]) == "<box>[]</box>"
    with pytest.raises(ValueError):
        format_boxes([(1, 2, 3)])
    with pytest.raises(ValueError):
        format_boxes([(1, 2, float("inf"), 4)])


def test_parse_boxes_round_trip_and_tolerance() -> None:
    boxes = [Box(x1=12, y1=7.5, x2=400, y2=301.25), Box(x1=0, y1=0, x2=0, y2=0)]
    parsed, errors = parse_boxes("The nodule: " + format_boxes(boxes) + ".")
    assert errors == [] and [b.as_tuple() for b in parsed] == [b.as_tuple() for b in boxes]
    parsed, errors = parse_boxes(
        "<box>[ 1, 2 ,3,4 ]</box> and <box>[[5,6,7,8]]</box>", space=CoordSpace.NORM1000
    )
    assert errors == [] and [b.as_tuple() for b in parsed] == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert all(b.space is CoordSpace.NORM1000 for b in parsed)
    assert parse_boxes("no finding") == ([], [])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<box>[[1,2,3]]</box>", "expected 4 numbers, got 3"),
        ("<box>[[1,2,a,4]]</box>", "not a number"),
        ("<box>[[1,2,nan,4]]</box>", "not a finite number"),
        ("<box>[[30,2,10,4]]</box>", "corners out of order"),
        ("<box>around here</box>", "no [x1,y1,x2,y2] list"),
        ("<box>[[1,2,3,4]] roughly</box>", "unexpected text"),
        ("<box>[[1,2,3,4]]", "unclosed <box>"),
        ("[[1,2,3,4]]</box>", "stray </box>"),
    ],
)
def test_parse_boxes_reports_malformed_input(text: str, message: str) -> None:
    boxes, errors = parse_boxes(text)
    assert boxes == [] and len(errors) == 1 and message in errors[0]


def test_parse_boxes_keeps_good_boxes_beside_bad_ones_and_never_raises() -> None:
    boxes, errors = parse_boxes("<box>[[1,2,3,4],[9,9,1,1],[5,6,7,8]]</box>")
    assert [b.as_tuple() for b in boxes] == [(1, 2, 3, 4), (5, 6, 7, 8)] and len(errors) == 1
    rng = random.Random(0)
    alphabet = "<box>/[],.-0123456789 eE+naif\n"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        out_boxes, out_errors = parse_boxes(text)
        assert all(b.x2 >= b.x1 and b.y2 >= b.y1 for b in out_boxes)
        assert all(isinstance(e, str) for e in out_errors)
    assert parse_boxes(None)[1] == ["expected text, got NoneType"]  # type: ignore[arg-type]
