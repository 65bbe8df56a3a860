"""Boxes in model answers → canonical boxes on the original images, and overlays to show them.

:func:`parse_model_boxes` reads every box syntax the supported families emit, whatever the family
(a model may answer in another family's form), and converts the coordinates with *the answering
family's* convention (``emma.model.families``):

- EMMA / InternVL: ``<ref>label</ref><box>[[x1,y1,x2,y2],...]</box>``; ``<ref>`` is optional and
  ``<box image=N>`` names the image (0-based, default 0);
- Qwen2.5-VL / Qwen3-VL JSON: objects ``{"bbox_2d": [x1, y1, x2, y2], "label": "..."}`` (fenced or
  not; an optional ``"image_index": N``);
- Qwen2-VL tokens: ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``.

Nothing here raises on model text. A box that is malformed (not four finite numbers), has its corners
out of order, is degenerate (zero width or height), lies far outside the image (more than
:data:`OUT_OF_RANGE_TOLERANCE` of a side beyond an edge) or names an image that does not exist is
rejected and reported in ``errors``; a box slightly past an edge is clipped to the image and reported
too (its index in ``boxes`` is listed in ``clipped``). Messages carry positions and numbers, never text.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

from emma.data.formats import format_boxes, parse_boxes
from emma.data.schema import Box, CoordSpace
from emma.model.families import (
    GENERIC_FAMILY,
    BoxConvention,
    BoxSyntax,
    FamilySpec,
    from_canonical,
    resolve_family,
    to_canonical,
)

Size = tuple[int, int]  # (width, height)
FamilyLike = FamilySpec | str | None

OUT_OF_RANGE_TOLERANCE = 0.05  # fraction of the image side a box may overshoot and still be clipped
MAX_TEXT_CHARS = 200_000  # longer answers are scanned up to here
MAX_BOXES = 256  # boxes kept per answer
MAX_LABEL_CHARS = 120

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_REF_BOX_RE = re.compile(
    r"(?:<ref>(?P<label>[^<]{0,400})</ref>\s*)?<box(?P<attrs>[^<>]{0,40})>(?P<inner>.*?)</box>", re.DOTALL
)
_BOX_OPEN_RE = re.compile(r"<box[^<>]{0,40}>")
_IMAGE_ATTR_RE = re.compile(r"""\s+image\s*=\s*["']?(?P<index>\d{1,6})["']?\s*""")
_QWEN2_RE = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>[^<]{0,400})<\|object_ref_end\|>\s*)?"
    r"<\|box_start\|>(?P<inner>.*?)<\|box_end\|>",
    re.DOTALL,
)
_QWEN2_INNER_RE = re.compile(
    rf"\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*"
)
_JSON_OBJECT_RE = re.compile(r"""\{[^{}]*?["']bbox_2d["'][^{}]*?(?:\}|$)""")
_BBOX_LIST_RE = re.compile(r"""["']bbox_2d["']\s*:\s*\[(?P<inner>[^\[\]]*)\]""")
_JSON_LABEL_RE = re.compile(
    r"""["']label["']\s*:\s*(?:"(?P<dq>(?:[^"\\]|\\.){0,400})"|'(?P<sq>[^']{0,400})')"""
)
_JSON_IMAGE_RE = re.compile(r"""["']image(?:_index)?["']\s*:\s*(?P<index>[^,}\s]{1,20})""")


@dataclass
class GroundingResult:
    """Canonical boxes (pixels of the original images) and one message per rejected or clipped box."""

    boxes: list[Box] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    clipped: list[int] = field(default_factory=list)  # indices into ``boxes`` that were clipped


@dataclass
class _RawBox:
    position: int  # offset in the text, to keep text order across syntaxes
    where: str
    coords: tuple[float, float, float, float]
    label: str | None
    image_index: int


def _clean_label(label: str | None) -> str | None:
    if label is None:
        return None
    text = " ".join(label.split())[:MAX_LABEL_CHARS]
    return text or None


def _finite4(values: Sequence[float]) -> tuple[float, float, float, float] | None:
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return None
    return values[0], values[1], values[2], values[3]


def _scan_ref_box(text: str, raws: list[_RawBox], errors: list[str]) -> None:
    matches = list(_REF_BOX_RE.finditer(text))
    for t, match in enumerate(matches):
        where = f"<box> tag {t}"
        attrs = match.group("attrs")
        image_index = 0
        if attrs:
            attr = _IMAGE_ATTR_RE.fullmatch(attrs)
            if attr is None:
                errors.append(f"{where}: unrecognised attributes (expected image=N)")
                continue
            image_index = int(attr.group("index"))
        boxes, errs = parse_boxes(f"<box>{match.group('inner')}</box>")
        errors.extend(e.replace("box tag 0", where, 1) for e in errs)
        label = _clean_label(match.group("label"))
        for g, box in enumerate(boxes):
            raws.append(_RawBox(match.start(), f"{where} group {g}", box.as_tuple(), label, image_index))
    opened = len(_BOX_OPEN_RE.findall(text))
    if opened > len(matches):
        errors.append(f"{opened - len(matches)} unclosed <box> tag(s)")


def _scan_qwen2(text: str, raws: list[_RawBox], errors: list[str]) -> None:
    matches = list(_QWEN2_RE.finditer(text))
    for t, match in enumerate(matches):
        where = f"<|box_start|> {t}"
        inner = _QWEN2_INNER_RE.fullmatch(match.group("inner"))
        if inner is None:
            errors.append(f"{where}: expected (x1,y1),(x2,y2)")
            continue
        coords = _finite4([float(v) for v in inner.groups()])
        if coords is None:
            errors.append(f"{where}: not a finite number")
            continue
        raws.append(_RawBox(match.start(), where, coords, _clean_label(match.group("label")), 0))
    opened = text.count("<|box_start|>")
    if opened > len(matches):
        errors.append(f"{opened - len(matches)} unclosed <|box_start|> token(s)")


def _json_number(item: str) -> float | None:
    try:
        value = json.loads(item.strip())
    except ValueError:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _json_label(obj: str) -> str | None:
    match = _JSON_LABEL_RE.search(obj)
    if match is None:
        return None
    if match.group("sq") is not None:
        return match.group("sq")
    try:
        return str(json.loads(f'"{match.group("dq")}"'))
    except ValueError:
        return match.group("dq")


def _scan_qwen_json(text: str, raws: list[_RawBox], errors: list[str]) -> None:
    for t, match in enumerate(_JSON_OBJECT_RE.finditer(text)):
        where = f"bbox_2d object {t}"
        obj = match.group(0)
        bbox = _BBOX_LIST_RE.search(obj)
        if bbox is None:
            errors.append(f"{where}: bbox_2d is not a [x1, y1, x2, y2] list")
            continue
        items = bbox.group("inner").split(",")
        if len(items) != 4:
            errors.append(f"{where}: expected 4 numbers, got {len(items)}")
            continue
        numbers = [_json_number(item) for item in items]
        if any(n is None for n in numbers):
            errors.append(f"{where}: not a number")
            continue
        coords = _finite4([n for n in numbers if n is not None])
        if coords is None:
            errors.append(f"{where}: not a finite number")
            continue
        image_index = 0
        image = _JSON_IMAGE_RE.search(obj)
        if image is not None:
            value = image.group("index").strip("\"'")
            if not value.isdigit():
                errors.append(f"{where}: image index is not a non-negative integer")
                continue
            image_index = int(value)
        label = _json_label(obj)
        raws.append(
            _RawBox(
                match.start(),
                where,
                coords,
                _clean_label(label),
                image_index,
            )
        )


def family_or_generic(family: FamilyLike, errors: list[str]) -> FamilySpec:
    """The family's spec; for an unknown name, EMMA's generic convention and a message in ``errors``."""
    try:
        return resolve_family(family)
    except ValueError:
        errors.append("unknown model family; boxes read with EMMA's 0-1000 convention")
        return GENERIC_FAMILY


def canonical_box(
    coords: Sequence[float],
    family: FamilyLike,
    image_index: int,
    image_sizes: Sequence[Size],
    model_sizes: Sequence[Size] | None = None,
    *,
    label: str | None = None,
    where: str = "box",
) -> tuple[Box | None, str | None, bool]:
    """One box in the family's convention → ``(canonical box or None, message or None, clipped)``.

    Validates what :func:`parse_model_boxes` validates; never raises on bad values.
    """
    values = [float(c) for c in coords] if all(isinstance(c, (int, float)) for c in coords) else []
    finite = _finite4(values)
    if finite is None:
        return None, f"{where}: expected 4 finite numbers", False
    if not 0 <= image_index < len(image_sizes):
        return None, f"{where}: refers to image {image_index} but there are {len(image_sizes)}", False
    x1, y1, x2, y2 = finite
    if x2 < x1 or y2 < y1:
        return None, f"{where}: corners out of order", False
    width, height = image_sizes[image_index]
    model_size = (
        model_sizes[image_index] if model_sizes is not None and image_index < len(model_sizes) else None
    )
    try:
        cx1, cy1, cx2, cy2 = to_canonical(finite, family, width, height, model_size)
    except ValueError:
        return None, f"{where}: image {image_index} has an invalid size", False
    tol_x, tol_y = OUT_OF_RANGE_TOLERANCE * width, OUT_OF_RANGE_TOLERANCE * height
    if (
        min(cx1, cx2) < -tol_x
        or max(cx1, cx2) > width + tol_x
        or min(cy1, cy2) < -tol_y
        or max(cy1, cy2) > height + tol_y
    ):
        return None, f"{where}: far outside image {image_index} ({width}x{height}); rejected", False
    clipped = (
        max(0.0, min(cx1, width)),
        max(0.0, min(cy1, height)),
        max(0.0, min(cx2, width)),
        max(0.0, min(cy2, height)),
    )
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, f"{where}: degenerate box (zero width or height); rejected", False
    was_clipped = clipped != (cx1, cy1, cx2, cy2)
    box = Box(
        x1=clipped[0],
        y1=clipped[1],
        x2=clipped[2],
        y2=clipped[3],
        label=_clean_label(label),
        image_index=image_index,
    )
    message = f"{where}: extended past the edge of image {image_index}; clipped" if was_clipped else None
    return box, message, was_clipped


def parse_model_boxes(
    text: str,
    family: FamilyLike,
    image_sizes: Sequence[Size],
    model_sizes: Sequence[Size] | None = None,
) -> GroundingResult:
    """Every box in a model's answer, as canonical pixels of the original images.

    ``image_sizes``: (width, height) of each original image, in the order the model was shown them.
    ``model_sizes``: (width, height) each image had after the processor's resize (only Qwen2.5-VL's
    convention uses it; computed with the family's default processor settings when omitted).
    """
    result = GroundingResult()
    if not isinstance(text, str):
        result.errors.append(f"expected text, got {type(text).__name__}")
        return result
    spec = family_or_generic(family, result.errors)
    if len(text) > MAX_TEXT_CHARS:
        result.errors.append(f"answer longer than {MAX_TEXT_CHARS} characters; only the start was scanned")
        text = text[:MAX_TEXT_CHARS]
    raws: list[_RawBox] = []
    _scan_ref_box(text, raws, result.errors)
    _scan_qwen2(text, raws, result.errors)
    _scan_qwen_json(text, raws, result.errors)
    raws.sort(key=lambda r: r.position)
    if len(raws) > MAX_BOXES:
        result.errors.append(f"{len(raws) - MAX_BOXES} boxes over the limit of {MAX_BOXES} ignored")
        raws = raws[:MAX_BOXES]
    for raw in raws:
        box, message, clipped = canonical_box(
            raw.coords, spec, raw.image_index, image_sizes, model_sizes, label=raw.label, where=raw.where
        )
        if message is not None:
            result.errors.append(message)
        if box is not None:
            if clipped:
                result.clipped.append(len(result.boxes))
            result.boxes.append(box)
    return result


# --------------------------------------------------------------------------------- writing boxes


def _rounded(values: Iterable[float], convention: BoxConvention) -> list[float]:
    if convention is BoxConvention.NORM1:
        return [min(1.0, max(0.0, round(v, 3))) for v in values]
    top = 1000 if convention is BoxConvention.NORM1000 else None
    out: list[float] = []
    for v in values:
        r = float(max(0, round(v)))
        out.append(min(float(top), r) if top is not None else r)
    return out


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def boxes_prompt_text(
    boxes: Iterable[Box],
    family: FamilyLike,
    sizes: Sequence[Size],
    model_sizes: Sequence[Size] | None = None,
    *,
    syntax: Literal["native", "emma"] = "native",
) -> str:
    """Canonical boxes written as the family reads and writes them (training targets, prompts).

    ``sizes``: (width, height) of each original image. ``syntax="native"`` uses the family's own form
    (Qwen JSON, Qwen2-VL tokens, InternVL ``<ref><box>``); ``"emma"`` always uses EMMA's ``<box>`` form.
    Qwen2-VL's tokens cannot name an image, so its boxes on images other than the first use
    ``<box image=N>`` (EMMA's form, same 0-1000 coordinates).
    Coordinates are rounded to integers (3 decimals for 0-1 conventions) and kept in range.
    """
    spec = resolve_family(family)
    form = spec.box_syntax if syntax == "native" else BoxSyntax.EMMA
    items: list[tuple[list[float], str | None, int]] = []
    for box in boxes:
        if not 0 <= box.image_index < len(sizes):
            raise ValueError(f"box on image {box.image_index} but {len(sizes)} image size(s) given")
        width, height = sizes[box.image_index]
        pixel = box if box.space is CoordSpace.PIXEL else box.to_space(CoordSpace.PIXEL, width, height)
        model_size = model_sizes[box.image_index] if model_sizes is not None else None
        coords = from_canonical(pixel.as_tuple(), spec, width, height, model_size)
        items.append((_rounded(coords, spec.box_convention), box.label, box.image_index))
    if form is BoxSyntax.QWEN_JSON:
        objects = []
        for coords, label, image_index in items:
            obj: dict[str, object] = {"bbox_2d": [int(c) if c.is_integer() else c for c in coords]}
            if label:
                obj["label"] = label
            if image_index:
                obj["image_index"] = image_index
            objects.append("  " + json.dumps(obj, ensure_ascii=False))
        return "```json\n[\n" + ",\n".join(objects) + "\n]\n```"
    parts: list[str] = []
    for coords, label, image_index in items:
        if form is BoxSyntax.QWEN2_TOKENS and image_index == 0:
            ref = f"<|object_ref_start|>{label}<|object_ref_end|>" if label else ""
            x1, y1, x2, y2 = (_number(c) for c in coords)
            parts.append(f"{ref}<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>")
        else:
            ref = f"<ref>{label}</ref>" if label else ""
            tag = format_boxes([coords])
            if image_index:
                tag = tag.replace("<box>", f"<box image={image_index}>", 1)
            parts.append(ref + tag)
    return " ".join(parts)


# ---------------------------------------------------------------------------------------- overlay

_PALETTE = ((255, 64, 64), (64, 200, 255), (255, 200, 0), (120, 255, 120), (255, 110, 255), (255, 150, 60))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_overlay(
    image: Image.Image,
    boxes: Iterable[Box],
    *,
    labels: bool = True,
    image_index: int | None = None,
) -> Image.Image:
    """A copy of ``image`` (RGB) with each box drawn as a rectangle and, with ``labels``, its label.

    Boxes are canonical pixels of this image (other spaces are converted with its size). With
    ``image_index``, only the boxes on that image are drawn. The line width scales with the image.
    """
    canvas = image.convert("RGB")  # always a new image
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(max(width, height) / 300))
    font = _font(max(10, round(min(width, height) / 40)))
    for k, box in enumerate(boxes):
        if image_index is not None and box.image_index != image_index:
            continue
        pixel = box if box.space is CoordSpace.PIXEL else box.to_space(CoordSpace.PIXEL, width, height)
        color = _PALETTE[k % len(_PALETTE)]
        x1, y1 = round(pixel.x1), round(pixel.y1)  # pixel edges nearest to the box's edges
        x2, y2 = max(x1, round(pixel.x2) - 1), max(y1, round(pixel.y2) - 1)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
        if labels and box.label:
            left, top, right, bottom = draw.textbbox((0, 0), box.label, font=font)
            tw, th = right - left + 2 * line, bottom - top + 2 * line
            ty = y1 - th if y1 - th >= 0 else y1 + line  # above the box when it fits, else inside
            draw.rectangle((x1, ty, x1 + tw, ty + th), fill=color)
            draw.text((x1 + line - left, ty + line - top), box.label, fill=(0, 0, 0), font=font)
    return canvas
