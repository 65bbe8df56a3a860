"""Converters between the canonical :class:`~emma.data.schema.Sample` and the formats others speak.

Every ``from_*`` returns ``(sample, images)`` where ``images`` (bytes or paths) is what
``DatasetWriter.add(sample, images)`` takes, so ``writer.add(*from_llava(record))`` imports a record.

Which image goes with which turn: ``Turn.images``. Images of a sample that no turn shows are shown with
the first user turn (before its own). Each format then carries:

- TRL conversational (``to_trl`` / ``from_trl``): roles, turn texts, which images each turn shows
  (``{"type": "image"}`` parts, placed before the turn's text) and the image pixels. Not carried: id,
  task, gold (except as an answer turn), meta, image provenance/paths, the order of text and image
  parts within a turn. ``to_trl`` appends ``gold.answer`` as the assistant turn when the sample's last
  turn is not already one.
- ShareGPT / LLaVA (``to_llava`` / ``from_llava``): id, roles (human / gpt / system), turn texts, one
  ``<image>`` tag per image in the turn that shows it, image paths. Not carried: task, gold, meta, image
  sha256 / size / provenance. A turn text that already holds ``<image>`` tags keeps them in place when
  their number matches the images it shows.
- OpenAI chat (``to_openai_messages`` / ``from_openai_messages``): roles, turn texts, which images each
  turn shows and their bytes (data URLs). Not carried: id, task, gold, meta, provenance. Only data:
  URLs are decoded; http(s) and other URLs are refused (nothing reaches outside).

Boxes in text: ``format_boxes`` / ``parse_boxes`` for ``<box>[[x1,y1,x2,y2],...]</box>``. The text form
carries the four coordinates only (not the label, space or image index of a :class:`Box`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from PIL import Image
from pydantic import ValidationError

from emma.data.schema import Box, CoordSpace, Gold, ImageRef, Meta, Sample, TaskType, Turn
from emma.data.store import decode_image, encode_png
from emma.errors import DataFormatError, ImageTooLargeError
from emma.io.limits import DEFAULT_LIMITS, Limits

ImageLoader = Callable[[ImageRef], Image.Image]
ImageUrlFn = Callable[[ImageRef], str]
ImagePathFn = Callable[[ImageRef], str]

IMAGE_TAG = "<image>"
_LLAVA_FROM = {"system": "system", "user": "human", "assistant": "gpt"}
_R = TypeVar("_R", bound=str)
_LLAVA_ROLE = {"system": "system", "human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
Role = Literal["system", "user", "assistant"]
_ROLE_FROM_LLAVA: dict[str, Role] = {"system": "system", "human": "user", "gpt": "assistant"}
_TRL_ROLE: dict[str, Role] = {"system": "system", "user": "user", "assistant": "assistant"}
_OPENAI_ROLE: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}
_MIME = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}


# ------------------------------------------------------------------------------------------- shared


def shown_images(sample: Sample) -> list[list[int]]:
    """For each turn, the indices of the images it shows; unshown images go to the first user turn."""
    shown = [list(turn.images) for turn in sample.turns]
    referenced = {i for turn in sample.turns for i in turn.images}
    unshown = [i for i in range(len(sample.images)) if i not in referenced]
    if unshown:
        first_user = next((k for k, t in enumerate(sample.turns) if t.role == "user"), None)
        if first_user is None:
            raise DataFormatError(f"sample {sample.id!r}: images but no user turn to show them with")
        shown[first_user] = unshown + shown[first_user]
    return shown


def _make_sample(
    sample_id: str,
    task: TaskType,
    refs: list[ImageRef],
    turns: list[Turn],
    gold: Gold | None,
    meta: Meta | None,
) -> Sample:
    try:
        return Sample(
            id=sample_id, task=task, images=refs, turns=turns, gold=gold or Gold(), meta=meta or Meta()
        )
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        loc = ".".join(str(x) for x in first.get("loc", ())) or "sample"
        raise DataFormatError(f"record {sample_id!r}: {loc}: {first.get('msg', 'invalid')}") from None


def _bytes_ref(data: bytes, limits: Limits, what: str) -> ImageRef:
    image = decode_image(data, limits=limits, what=what)
    return ImageRef(sha256=hashlib.sha256(data).hexdigest(), width=image.width, height=image.height)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: expected text, got {type(value).__name__}")
    return value


def _message_role(
    message: Any, roles: Mapping[str, _R], where: str, key: str = "role", what: str = "role"
) -> _R:
    """``roles[message[key]]`` of one chat message; DataFormatError for a non-object or another value."""
    if not isinstance(message, Mapping):
        raise DataFormatError(f"{where}: expected an object")
    role = roles.get(str(message.get(key)))
    if role is None:
        raise DataFormatError(f"{where}: unsupported {what} {str(message.get(key))[:20]!r}")
    return role


def _parts(message: Mapping[str, Any], where: str) -> list[tuple[Any, Mapping[str, Any]]]:
    """A chat message's content as ``(type, part)`` pairs (a string content: one text part; a part that
    is not an object: type None); DataFormatError for other content."""
    content = message.get("content")
    if isinstance(content, str):
        return [("text", {"type": "text", "text": content})]
    if not isinstance(content, list):
        raise DataFormatError(f"{where}: content must be text or a list of parts")
    return [(part.get("type"), part) if isinstance(part, Mapping) else (None, {}) for part in content]


# ---------------------------------------------------------------------------------------------- TRL


def to_trl(sample: Sample, image_loader: ImageLoader, *, add_answer: bool = True) -> dict[str, Any]:
    """A TRL conversational vision record ``{"messages": [...], "images": [PIL...]}``.

    ``image_loader`` turns a ref into a PIL image (e.g. ``Dataset.open_image``). Images are listed in the
    order of their ``{"type": "image"}`` parts. With ``add_answer``, ``gold.answer`` becomes the assistant
    message when the sample does not end with one.
    """
    messages: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for turn, indices in zip(sample.turns, shown_images(sample), strict=True):
        content: list[dict[str, Any]] = [{"type": "image"} for _ in indices]
        content.append({"type": "text", "text": turn.content})
        images.extend(image_loader(sample.images[i]) for i in indices)
        messages.append({"role": turn.role, "content": content})
    last_is_answer = bool(sample.turns) and sample.turns[-1].role == "assistant"
    if add_answer and not last_is_answer and sample.gold.answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": sample.gold.answer}]})
    return {"messages": messages, "images": images}


def from_trl(
    record: Mapping[str, Any],
    *,
    sample_id: str,
    task: TaskType = TaskType.OPEN_VQA,
    gold: Gold | None = None,
    meta: Meta | None = None,
) -> tuple[Sample, list[bytes]]:
    """A sample from a TRL conversational record; its PIL images come back PNG-encoded."""
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise DataFormatError(f"record {sample_id!r}: 'messages' must be a list")
    pil_images = record.get("images") or []
    turns: list[Turn] = []
    shown = 0
    for k, message in enumerate(messages):
        where = f"record {sample_id!r} message {k}"
        role = _message_role(message, _TRL_ROLE, where)
        texts: list[str] = []
        n_images = 0
        for kind, part in _parts(message, where):
            if kind == "image":
                n_images += 1
            elif kind == "text":
                texts.append(_text(part.get("text"), where))
            else:
                raise DataFormatError(f"{where}: unsupported content part {kind!r}")
        turns.append(Turn(role=role, content="\n".join(texts), images=list(range(shown, shown + n_images))))
        shown += n_images
    if shown != len(pil_images):
        raise DataFormatError(f"record {sample_id!r}: {shown} image parts but {len(pil_images)} images")
    encoded: list[bytes] = []
    refs: list[ImageRef] = []
    for i, image in enumerate(pil_images):
        if not isinstance(image, Image.Image):
            raise DataFormatError(
                f"record {sample_id!r} image {i}: expected a PIL image, got {type(image).__name__}"
            )
        data = encode_png(image)
        encoded.append(data)
        refs.append(ImageRef(sha256=hashlib.sha256(data).hexdigest(), width=image.width, height=image.height))
    return _make_sample(sample_id, task, refs, turns, gold, meta), encoded


# ------------------------------------------------------------------------------------ ShareGPT / LLaVA


def _default_image_path(ref: ImageRef) -> str:
    if ref.path is None:
        raise DataFormatError("image ref without a path; pass image_path_fn (e.g. from a dataset)")
    return ref.path


def to_llava(sample: Sample, image_path_fn: ImagePathFn | None = None) -> dict[str, Any]:
    """A ShareGPT / LLaVA record ``{"id", "image", "conversations"}``; ``image`` is a list for several images.

    ``image_path_fn`` names each image (default: ``ref.path``, relative to the dataset folder in a JSONL
    dataset).
    """
    path_of = image_path_fn or _default_image_path
    conversations: list[dict[str, str]] = []
    paths: list[str] = []
    for turn, indices in zip(sample.turns, shown_images(sample), strict=True):
        tags = turn.content.count(IMAGE_TAG)
        if tags == 0:
            value = f"{IMAGE_TAG}\n" * len(indices) + turn.content
        elif tags == len(indices):
            value = turn.content
        else:
            raise DataFormatError(
                f"sample {sample.id!r}: a turn text holds {tags} {IMAGE_TAG} tags but shows {len(indices)} images"
            )
        conversations.append({"from": _LLAVA_FROM[turn.role], "value": value})
        paths.extend(path_of(sample.images[i]) for i in indices)
    record: dict[str, Any] = {"id": sample.id}
    if paths:
        record["image"] = paths[0] if len(paths) == 1 else paths
    record["conversations"] = conversations
    return record


def _strip_tags(value: str) -> str:
    text = re.sub(r"^(?:<image>\n?)+", "", value)
    text = re.sub(r"(?:\n?<image>)+$", "", text)
    return text.replace(IMAGE_TAG, "")


def _resolve(image: str, image_root: Path | None, where: str) -> Path:
    path = Path(image)
    if image_root is None:
        return path
    root = image_root.resolve()
    if path.is_absolute() or not (root / path).resolve().is_relative_to(root):
        raise DataFormatError(f"{where}: image path {image!r} points outside {image_root}")
    return image_root / path


def from_llava(
    record: Mapping[str, Any],
    *,
    task: TaskType = TaskType.OPEN_VQA,
    image_root: str | Path | None = None,
    sample_id: str | None = None,
    gold: Gold | None = None,
    meta: Meta | None = None,
) -> tuple[Sample, list[Path]]:
    """A sample from a ShareGPT / LLaVA record, and the image files to store (under ``image_root``).

    ``<image>`` tags are removed from the text; each counts as one image of its turn, in order. With
    ``image_root`` the paths must stay inside it.
    """
    sid = sample_id if sample_id is not None else record.get("id")
    if sid is None or isinstance(sid, (dict, list)) or str(sid) == "":
        raise DataFormatError("LLaVA record without an id")
    sid = str(sid)
    image = record.get("image", record.get("images"))
    if image is not None and not isinstance(image, (str, list)):
        raise DataFormatError(f"record {sid!r}: 'image' must be a path or a list of paths")
    names: list[str] = [] if image is None else [image] if isinstance(image, str) else list(image)
    for name in names:
        _text(name, f"record {sid!r} image")
    conversations = record.get("conversations")
    if not isinstance(conversations, list):
        raise DataFormatError(f"record {sid!r}: 'conversations' must be a list")
    turns: list[Turn] = []
    shown = 0
    for k, message in enumerate(conversations):
        where = f"record {sid!r} turn {k}"
        speaker = _message_role(message, _LLAVA_ROLE, where, key="from", what="speaker")
        value = _text(message.get("value"), where)
        n = value.count(IMAGE_TAG)
        turns.append(
            Turn(
                role=_ROLE_FROM_LLAVA[speaker],
                content=_strip_tags(value),
                images=list(range(shown, shown + n)),
            )
        )
        shown += n
    if shown != len(names):
        raise DataFormatError(f"record {sid!r}: {shown} {IMAGE_TAG} tags but {len(names)} images")
    root = Path(image_root) if image_root is not None else None
    paths = [_resolve(name, root, f"record {sid!r}") for name in names]
    refs = [ImageRef(path=name) for name in names]
    return _make_sample(sid, task, refs, turns, gold, meta), paths


# ------------------------------------------------------------------------------------------ OpenAI


def data_url(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> str:
    """``data:image/...;base64,...`` for encoded image bytes (the media type read from the bytes)."""
    image = decode_image(data, limits=limits)
    return f"data:{_MIME[image.format or '']};base64,{base64.b64encode(data).decode('ascii')}"


def image_data_url(image: Image.Image) -> str:
    """A PNG data URL for a PIL image."""
    return f"data:image/png;base64,{base64.b64encode(encode_png(image)).decode('ascii')}"


def decode_data_url(url: str, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The bytes of a base64 ``data:image/...`` URL; any other URL is refused (nothing is fetched)."""
    scheme = url.split(":", 1)[0].strip().lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise DataFormatError(
            "remote image URLs are refused: EMMA fetches nothing from the network; send the image as a data: URL"
        )
    if scheme != "data":
        shown = re.sub(r"[^a-z0-9+.-]", "?", scheme[:16])
        raise DataFormatError(f"unsupported image URL scheme {shown!r}: only data: URLs are accepted")
    header, comma, payload = url.split(":", 1)[1].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    if not comma or "base64" not in params[1:]:
        raise DataFormatError("malformed image data URL: expected data:image/<type>;base64,<data>")
    if not params[0].startswith("image/"):
        raise DataFormatError(f"data URL media type {params[0][:40]!r} is not an image")
    if len(payload) > limits.max_file_bytes * 4 // 3 + 4:
        raise ImageTooLargeError(f"data URL image over the limit of {limits.max_file_bytes} bytes")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise DataFormatError("malformed image data URL: invalid base64") from None


def to_openai_messages(sample: Sample, image_url_fn: ImageUrlFn) -> list[dict[str, Any]]:
    """OpenAI chat messages; user turns are part lists with ``image_url`` parts before the text.

    ``image_url_fn`` gives each image's URL, e.g. ``lambda ref: data_url(dataset.image_bytes(ref))``.
    System and assistant turns are plain strings (OpenAI takes images in user messages only).
    """
    messages: list[dict[str, Any]] = []
    for turn, indices in zip(sample.turns, shown_images(sample), strict=True):
        if turn.role == "user":
            parts: list[dict[str, Any]] = [
                {"type": "image_url", "image_url": {"url": image_url_fn(sample.images[i])}} for i in indices
            ]
            parts.append({"type": "text", "text": turn.content})
            messages.append({"role": "user", "content": parts})
        elif indices:
            raise DataFormatError(f"sample {sample.id!r}: OpenAI chat takes images in user messages only")
        else:
            messages.append({"role": turn.role, "content": turn.content})
    return messages


def from_openai_messages(
    messages: Sequence[Mapping[str, Any]],
    *,
    sample_id: str,
    task: TaskType = TaskType.OPEN_VQA,
    gold: Gold | None = None,
    meta: Meta | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[Sample, list[bytes]]:
    """A sample from OpenAI chat messages and the decoded bytes of their data-URL images."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataFormatError("OpenAI messages must be a list")
    turns: list[Turn] = []
    images: list[bytes] = []
    refs: list[ImageRef] = []
    for k, message in enumerate(messages):
        where = f"message {k}"
        role = _message_role(message, _OPENAI_ROLE, where)
        texts: list[str] = []
        indices: list[int] = []
        for kind, part in _parts(message, where):
            if kind == "text":
                texts.append(_text(part.get("text"), where))
            elif kind == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, Mapping) else spec
                data = decode_data_url(_text(url, where), limits=limits)
                refs.append(_bytes_ref(data, limits, f"{where} image"))
                indices.append(len(images))
                images.append(data)
            else:
                raise DataFormatError(f"{where}: unsupported content part {str(kind)[:30]!r}")
        turns.append(Turn(role=role, content="\n".join(texts), images=indices))
    return _make_sample(sample_id, task, refs, turns, gold, meta), images


# ------------------------------------------------------------------------------------------- boxes

_BOX_RE = re.compile(r"<box>(.*?)</box>", re.DOTALL)
_GROUP_RE = re.compile(r"\[([^\[\]]*)\]")
_ONLY_BRACKETS_RE = re.compile(r"[\s,\[\]]*")


def _num(value: float, ndigits: int | None) -> str:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"box coordinate {v} is not finite")
    if ndigits is not None:
        v = round(v, ndigits)
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def format_boxes(boxes: Iterable[Box | Sequence[float]], *, ndigits: int | None = None) -> str:
    """``<box>[[x1,y1,x2,y2],...]</box>``; integral values print as integers, others exactly (or rounded)."""
    groups = []
    for box in boxes:
        coords = box.as_tuple() if isinstance(box, Box) else tuple(box)
        if len(coords) != 4:
            raise ValueError(f"a box needs 4 coordinates, got {len(coords)}")
        groups.append("[" + ",".join(_num(c, ndigits) for c in coords) + "]")
    return "<box>[" + ",".join(groups) + "]</box>"


def parse_boxes(
    text: str, *, space: CoordSpace = CoordSpace.PIXEL, image_index: int = 0
) -> tuple[list[Box], list[str]]:
    """Boxes from every ``<box>...</box>`` in ``text`` and one message per malformed part; never raises.

    Inside a tag: ``[[x1,y1,x2,y2],...]`` or ``[x1,y1,x2,y2]``. A group that is not four finite numbers
    with ``x2 >= x1`` and ``y2 >= y1`` is reported, not repaired. Text without tags gives ``([], [])``.
    """
    if not isinstance(text, str):
        return [], [f"expected text, got {type(text).__name__}"]
    boxes: list[Box] = []
    errors: list[str] = []
    matches = list(_BOX_RE.finditer(text))
    for t, match in enumerate(matches):
        inner = match.group(1)
        groups = _GROUP_RE.findall(inner)
        if not groups:
            errors.append(f"box tag {t}: no [x1,y1,x2,y2] list")
            continue
        if not _ONLY_BRACKETS_RE.fullmatch(_GROUP_RE.sub("", inner)):
            errors.append(f"box tag {t}: unexpected text around the coordinates")
            continue
        for g, group in enumerate(groups):
            where = f"box tag {t} group {g}"
            items = group.split(",")
            if len(items) != 4:
                errors.append(f"{where}: expected 4 numbers, got {len(items)}")
                continue
            try:
                coords = [float(item) for item in items]
            except ValueError:
                errors.append(f"{where}: not a number")
                continue
            if not all(math.isfinite(c) for c in coords):
                errors.append(f"{where}: not a finite number")
                continue
            try:
                boxes.append(
                    Box(
                        x1=coords[0],
                        y1=coords[1],
                        x2=coords[2],
                        y2=coords[3],
                        space=space,
                        image_index=image_index,
                    )
                )
            except ValidationError:
                errors.append(f"{where}: corners out of order")
    opened, closed = text.count("<box>"), text.count("</box>")
    if opened > len(matches):
        errors.append(f"{opened - len(matches)} unclosed <box> tag(s)")
    if closed > len(matches):
        errors.append(f"{closed - len(matches)} stray </box> tag(s)")
    return boxes, errors
