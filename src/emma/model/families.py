"""Per-family conventions: box coordinates, native box syntax, chat-template quirks and image limits.

Canonical boxes in EMMA are pixels of the *original* image ``(x1, y1, x2, y2)`` (x right, y down,
continuous coordinates: pixel ``i`` spans ``[i, i + 1)``). Each model family reads and writes boxes in
its own convention; :func:`to_canonical` and :func:`from_canonical` convert between the two.

=================  =======================  ===================================================
family             box convention           native box syntax
=================  =======================  ===================================================
qwen2_5_vl         RESIZED_PIXELS           ```json [{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]
qwen3_vl           NORM1000                 same JSON as Qwen2.5-VL, coordinates 0-1000
qwen2_vl           NORM1000                 <|object_ref_start|>label<|object_ref_end|>
                                            <|box_start|>(x1,y1),(x2,y2)<|box_end|>
internvl           NORM1000                 <ref>label</ref><box>[[x1, y1, x2, y2]]</box>
idefics3/SmolVLM   NORM1000 (EMMA's choice) <box>[[x1,y1,x2,y2]]</box> (EMMA's text form)
llava              NORM1000 (EMMA's choice) <box>[[x1,y1,x2,y2]]</box> (EMMA's text form)
llava_onevision    NORM1000 (EMMA's choice) <box>[[x1,y1,x2,y2]]</box> (EMMA's text form)
gemma3 (MedGemma)  NORM1000 (EMMA's choice) <box>[[x1,y1,x2,y2]]</box> (EMMA's text form)
=================  =======================  ===================================================

- **Qwen2.5-VL** was trained on absolute pixel coordinates of the image *as its processor resized it*
  (``smart_resize``: both sides rounded to a multiple of ``patch_size * merge_size`` = 28, the area
  kept within ``[min_pixels, max_pixels]``). A box from it must be scaled by ``original / resized``
  per axis; :func:`model_image_size` reproduces the processor's rule.
- **Qwen2-VL, Qwen3-VL, InternVL** were trained on coordinates relative to the image, scaled to 0-1000.
- **Idefics3 / SmolVLM, LLaVA-1.5, LLaVA-OneVision, Gemma 3 / MedGemma** have no trained box output
  convention (their pre-training has no grounding format). EMMA teaches and reads them the 0-1000
  relative ``<box>[[x1,y1,x2,y2]]</box>`` text form: relative coordinates do not depend on the
  processor's resize, crop or tiling, and small integers tokenize compactly.

EMMA's text form may name the image a box is on when a turn shows several: ``<box image=1>[[...]]</box>``
(0-based index in the order the images were given; default 0). A label may precede a box as
``<ref>label</ref>``.

"Original image" means the image handed to the processor (emma.io's model-ready image), so canonical
boxes line up with what ``/v1/emma/preview`` returns. Qwen2-VL's box tokens are special tokens: decode
with them kept or its boxes are lost. Every family's :class:`FamilySpec` also records whether its chat
template takes a system role (all do; Gemma 3 folds it into the first user turn, LLaVA-1.5 writes it
as plain text), its image placeholder tokens, and EMMA's default image cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from emma.io.image import ImageFit


class BoxConvention(StrEnum):
    PIXELS = "pixels"  # pixels of the original image (canonical)
    RESIZED_PIXELS = "resized_pixels"  # pixels of the image after the processor's resize (Qwen2.5-VL)
    NORM1000 = "norm1000"  # relative to the image, 0-1000
    NORM1 = "norm1"  # relative to the image, 0-1


class BoxSyntax(StrEnum):
    QWEN_JSON = "qwen_json"  # {"bbox_2d": [x1, y1, x2, y2], "label": "..."} in a ```json block
    QWEN2_TOKENS = "qwen2_tokens"  # <|object_ref_start|>l<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)...
    REF_BOX = "ref_box"  # <ref>label</ref><box>[[x1, y1, x2, y2]]</box> (InternVL)
    EMMA = "emma"  # <box>[[x1,y1,x2,y2]]</box>, optionally preceded by <ref>label</ref>


@dataclass(frozen=True)
class SmartResize:
    """Parameters of Qwen's ``smart_resize`` (defaults: the released checkpoints' preprocessor_config)."""

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    """What EMMA needs to know about one model family.

    ``image_tokens``: the first entry is the placeholder the chat template writes into the text for one
    image (the processor expands it); the others are the special tokens that surround or fill it.
    ``max_images``: EMMA's default cap per request (none of these families has a hard architectural
    limit; the context length is the real bound). ``max_image_pixels``: the area above which the
    processor downsizes (informational; emma.io's limits bound what is decoded). ``base_view``: for
    processors that make a fixed-size global view (squash, crop or tile + thumbnail), its default
    (width, height); ``smart_resize``: for the Qwen processors, their resize parameters.
    """

    name: str
    box_convention: BoxConvention
    box_syntax: BoxSyntax
    box_syntax_example: str
    image_tokens: tuple[str, ...]
    max_images: int
    notes: str
    supports_system_role: bool = True
    max_image_pixels: int | None = None
    smart_resize: SmartResize | None = None
    base_view: tuple[int, int] | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)
    model_types: tuple[str, ...] = ()  # transformers config.model_type values (default: the name alone)
    # Module names (transformers 5.x) of the vision tower and of the projector/connector; everything else
    # is the language model. emma.train.freeze decides from these what each training stage trains.
    vision_modules: tuple[str, ...] = ("model.vision_tower",)
    projector_modules: tuple[str, ...] = ("model.multi_modal_projector",)
    # llama.cpp's name for the family when its convert_hf_to_gguf.py writes text model + mmproj (None: no)
    gguf_name: str | None = None
    # ``vllm serve --max-model-len``: the family's trained context, capped at 32768 tokens so that the KV
    # cache of a 2B-8B model fits beside its bf16 weights on one 24 GB card (emma.infer.launch)
    vllm_max_model_len: int = 32768

    def __post_init__(self) -> None:
        if not self.model_types:
            object.__setattr__(self, "model_types", (self.name,))


_QWEN_IMAGE_TOKENS = (
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|image_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
)

# Families without a trained box convention: EMMA's own 0-1000 <box> text boxes, relative to the whole
# original image (infer.grounding parses and converts them).
_EMMA_BOXES: dict[str, Any] = {
    "box_convention": BoxConvention.NORM1000,
    "box_syntax": BoxSyntax.EMMA,
    "box_syntax_example": "<box>[[x1,y1,x2,y2]]</box>",
}

# What the Qwen-VL families share: image tokens, image cap, vision tower; Qwen2-VL and Qwen2.5-VL also
# their resize parameters, Qwen2.5-VL and Qwen3-VL their JSON box syntax.
_QWEN: dict[str, Any] = {
    "image_tokens": _QWEN_IMAGE_TOKENS,
    "max_images": 16,
    "vision_modules": ("model.visual",),
}
_QWEN2_RESIZE = SmartResize(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056)
_QWEN_JSON = {
    "box_syntax": BoxSyntax.QWEN_JSON,
    "box_syntax_example": '```json\n[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]\n```',
}

_SPECS: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="qwen2_5_vl",
        box_convention=BoxConvention.RESIZED_PIXELS,
        **_QWEN_JSON,
        **_QWEN,
        max_image_pixels=_QWEN2_RESIZE.max_pixels,
        smart_resize=_QWEN2_RESIZE,
        projector_modules=("model.visual.merger",),
        gguf_name="Qwen2.5-VL",
        notes=(
            "Boxes are absolute pixels of the image after smart_resize (sides multiples of 28, area in "
            "[min_pixels, max_pixels] from the processor; released default 3136..12845056). ChatML template; "
            "a default system prompt ('You are a helpful assistant.') is inserted when none is given. "
            "Each image costs (h/28)*(w/28) tokens, so large images dominate the context."
        ),
    ),
    FamilySpec(
        name="qwen3_vl",
        model_types=("qwen3_vl", "qwen3_vl_moe"),
        box_convention=BoxConvention.NORM1000,
        **_QWEN_JSON,
        **_QWEN,
        max_image_pixels=16777216,
        smart_resize=SmartResize(patch_size=16, merge_size=2, min_pixels=65536, max_pixels=16777216),
        projector_modules=("model.visual.merger", "model.visual.deepstack_merger_list"),
        gguf_name="Qwen3-VL",
        notes=(
            "Same JSON box syntax as Qwen2.5-VL but coordinates are relative, 0-1000. ChatML template with "
            "a system role (text only; images in a system message are refused by the template). "
            "smart_resize factor 32 (patch 16 x merge 2)."
        ),
    ),
    FamilySpec(
        name="qwen2_vl",
        box_convention=BoxConvention.NORM1000,
        box_syntax=BoxSyntax.QWEN2_TOKENS,
        box_syntax_example="<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>",
        **_QWEN,
        max_image_pixels=_QWEN2_RESIZE.max_pixels,
        smart_resize=_QWEN2_RESIZE,
        projector_modules=("model.visual.merger",),
        gguf_name="Qwen2-VL",
        notes=(
            "Boxes 0-1000 relative, written with special tokens; decode with skip_special_tokens=False "
            "or the box tokens are lost. ChatML template with a default system prompt."
        ),
    ),
    FamilySpec(
        name="idefics3",
        model_types=("idefics3", "smolvlm"),
        aliases=("smolvlm",),
        **_EMMA_BOXES,
        image_tokens=("<image>", "<fake_token_around_image>", "<global-img>"),
        max_images=8,
        base_view=(364, 364),
        vision_modules=("model.vision_model",),
        projector_modules=("model.connector",),
        gguf_name="Idefics3 / SmolVLM",
        vllm_max_model_len=8192,  # SmolVLM's text model (SmolLM2) context
        notes=(
            "No trained box convention: EMMA uses 0-1000 <box> text boxes. The template renders roles as "
            "'System:' / 'User:' / 'Assistant:' with <end_of_utterance>. The processor resizes the longest "
            "edge, splits into tiles of max_image_size (364 Idefics3, 384/512 SmolVLM) plus a square "
            "global view; each tile costs image_seq_len tokens, so images are expensive."
        ),
    ),
    FamilySpec(
        name="fast_vlm",
        aliases=("fastvlm",),
        **_EMMA_BOXES,
        image_tokens=("<image>",),
        max_images=4,
        base_view=(224, 224),
        vllm_max_model_len=8192,  # SmolLM2's context
        notes=(
            "FastVLM: any transformers vision model as the tower (emma-tiny: a ResNet-152), its last "
            "feature map flattened into image tokens through an MLP projector. No trained box convention: "
            "EMMA uses 0-1000 <box> text boxes (relative to the whole original image). The LLaVA processor "
            "squashes each image to its size (emma-tiny: 224x224, 49 tokens); ChatML template."
        ),
    ),
    FamilySpec(
        name="llava",
        **_EMMA_BOXES,
        image_tokens=("<image>",),
        max_images=4,
        base_view=(336, 336),
        gguf_name="LLaVA",
        vllm_max_model_len=4096,  # Vicuna / Llama 2 context
        notes=(
            "No trained box convention: EMMA uses 0-1000 <box> text boxes (relative to the whole original "
            "image). The LLaVA-1.5 template ('USER: <image>\\n... ASSISTANT:') writes a system message as "
            "plain text without a role prefix. The CLIP processor resizes the short side to 336 and "
            "center-crops 336x336, so the edges of non-square images are not seen; pad to square upstream "
            "when the edges matter. Trained on single images: several work but quality drops."
        ),
    ),
    FamilySpec(
        name="llava_onevision",
        **_EMMA_BOXES,
        image_tokens=("<image>",),
        max_images=8,
        base_view=(384, 384),
        projector_modules=("model.multi_modal_projector", "model.image_newline"),
        notes=(
            "No trained box convention: EMMA uses 0-1000 <box> text boxes. Qwen2 ChatML template with a "
            "system role. AnyRes processor: a 384x384 base view plus tiles picked from image_grid_pinpoints "
            "(up to 2304x2304), so one image can cost thousands of tokens."
        ),
    ),
    FamilySpec(
        name="gemma3",
        aliases=("medgemma",),
        **_EMMA_BOXES,
        image_tokens=("<start_of_image>", "<image_soft_token>", "<end_of_image>"),
        max_images=8,
        base_view=(896, 896),
        gguf_name="Gemma 3",
        notes=(
            "No trained box convention (Gemma 3 / MedGemma): EMMA uses 0-1000 <box> text boxes. The template "
            "has no system turn: a system message is folded into the first user turn. The processor squashes "
            "each image to 896x896 (256 soft tokens); pan-and-scan crops are off by default."
        ),
    ),
    FamilySpec(
        name="internvl",
        box_convention=BoxConvention.NORM1000,
        box_syntax=BoxSyntax.REF_BOX,
        box_syntax_example="<ref>label</ref><box>[[x1, y1, x2, y2]]</box>",
        image_tokens=("<IMG_CONTEXT>", "<img>", "</img>"),
        max_images=8,
        base_view=(448, 448),
        gguf_name="InternVL",
        notes=(
            "Boxes 0-1000 relative in <ref>label</ref><box>[[x1, y1, x2, y2]]</box> (transformers-native "
            "InternVL3 '-hf' checkpoints). ChatML template with a system role. The processor tiles the image "
            "into up to max_patches 448x448 crops plus a thumbnail, 256 tokens each."
        ),
    ),
)
FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in _SPECS}

_BY_NAME: dict[str, str] = {alias: key for key, spec in FAMILIES.items() for alias in spec.aliases}
_BY_MODEL_TYPE: dict[str, str] = {mt: key for key, spec in FAMILIES.items() for mt in spec.model_types}


def get_family(name: str) -> FamilySpec:
    """The spec of a family by its key (``qwen2_5_vl``), alias (``smolvlm``) or model_type."""
    key = name.strip().lower().replace("-", "_").replace(".", "_")
    if key in FAMILIES:
        return FAMILIES[key]
    key = _BY_NAME.get(key) or _BY_MODEL_TYPE.get(key) or ""
    if key:
        return FAMILIES[key]
    known = ", ".join(sorted(FAMILIES))
    raise ValueError(f"unknown model family {name[:40]!r}; known: {known}")


def family_for_model_type(model_type: str) -> FamilySpec | None:
    """The family a transformers ``config.model_type`` belongs to, or None when EMMA does not know it."""
    key = _BY_MODEL_TYPE.get(model_type.strip().lower())
    return FAMILIES[key] if key else None


def _as_spec(family: FamilySpec | str | None) -> FamilySpec:
    return resolve_family(family)


# ------------------------------------------------------------------------------------ image sizes


def smart_resize(
    height: int, width: int, *, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Qwen's resize rule, as transformers' ``Qwen2VLImageProcessor`` applies it; returns (height, width).

    Both sides are rounded to the nearest multiple of ``factor`` (Python ``round``: halves to even);
    when the area leaves ``[min_pixels, max_pixels]`` the image is scaled by ``sqrt`` of the area ratio,
    flooring (too large) or ceiling (too small) to multiples of ``factor``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"invalid image size {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio over 200 ({width}x{height}) is not supported by Qwen processors")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _image_processor(processor: Any) -> Any:
    """The image processor of a ProcessorMixin, or ``processor`` itself when it is one."""
    inner = getattr(processor, "image_processor", None)
    return inner if inner is not None else processor


def _lookup(container: Any, key: str) -> Any:
    """``container[key]`` for dicts, ``container.key`` for SizeDict and other objects; None if absent."""
    if container is None:
        return None
    if isinstance(container, dict):
        return container.get(key)
    return getattr(container, key, None)


def _positive_int(value: Any) -> int | None:
    return (
        int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None
    )


def smart_resize_params(family: FamilySpec | str | None, processor: Any = None) -> SmartResize | None:
    """The family's smart_resize parameters, overridden by what ``processor`` (or its image_processor) says."""
    spec = _as_spec(family)
    defaults = spec.smart_resize
    if defaults is None:
        return None
    ip = _image_processor(processor) if processor is not None else None
    size = _lookup(ip, "size")
    min_pixels = (
        _positive_int(_lookup(size, "shortest_edge"))
        or _positive_int(_lookup(size, "min_pixels"))
        or _positive_int(_lookup(ip, "min_pixels"))
        or defaults.min_pixels
    )
    max_pixels = (
        _positive_int(_lookup(size, "longest_edge"))
        or _positive_int(_lookup(size, "max_pixels"))
        or _positive_int(_lookup(ip, "max_pixels"))
        or defaults.max_pixels
    )
    return SmartResize(
        patch_size=_positive_int(_lookup(ip, "patch_size")) or defaults.patch_size,
        merge_size=_positive_int(_lookup(ip, "merge_size")) or defaults.merge_size,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )


def _base_view(spec: FamilySpec, processor: Any) -> tuple[int, int] | None:
    ip = _image_processor(processor) if processor is not None else None
    if ip is not None:
        if spec.name == "idefics3":
            edge = _positive_int(_lookup(_lookup(ip, "max_image_size"), "longest_edge"))
            if edge:
                return edge, edge
        if _lookup(ip, "do_center_crop"):
            crop = _lookup(ip, "crop_size")
            w, h = _positive_int(_lookup(crop, "width")), _positive_int(_lookup(crop, "height"))
            if w and h:
                return w, h
        size = _lookup(ip, "size")
        w, h = _positive_int(_lookup(size, "width")), _positive_int(_lookup(size, "height"))
        if w and h:
            return w, h
        edge = _positive_int(_lookup(size, "shortest_edge"))
        if edge and spec.name == "llava":
            return edge, edge
    return spec.base_view


def image_fit(family: FamilySpec | str | None, processor: Any = None) -> ImageFit | None:
    """The largest image the family's processor makes use of (read from ``processor`` when given, else
    the family's defaults), for downscaling images when they are decoded (:mod:`emma.io.image`).

    Qwen families: the ``smart_resize`` pixel budget. Idefics3/SmolVLM: the longest edge it resizes to.
    LLaVA-OneVision: the largest ``image_grid_pinpoints`` area. InternVL: ``max_patches`` tiles when it
    crops to patches, else its square view. Processors with one fixed view (LLaVA's crop, Gemma 3 and
    FastVLM's squash): the view, both sides kept at least as large. None for an unknown family.
    """
    if family is None:
        return None
    try:
        spec = _as_spec(family)
    except (KeyError, ValueError):
        return None
    reason = f"model:{spec.name}"
    params = smart_resize_params(spec, processor)
    if params is not None:
        return ImageFit(max_pixels=params.max_pixels, reason=reason)
    ip = _image_processor(processor) if processor is not None else None
    if spec.name == "idefics3":
        edge = _positive_int(_lookup(_lookup(ip, "size"), "longest_edge"))
        return ImageFit(max_side=edge or 4 * (spec.base_view or (364, 364))[0], reason=reason)
    if spec.name == "llava_onevision":
        pinpoints = _lookup(ip, "image_grid_pinpoints") or [[2304, 2304]]
        areas = [int(w) * int(h) for w, h in pinpoints if _positive_int(w) and _positive_int(h)]
        return ImageFit(max_pixels=max(areas), reason=reason) if areas else None
    if spec.name == "internvl" and _lookup(ip, "crop_to_patches"):
        size = _lookup(ip, "size")
        w, h = _positive_int(_lookup(size, "width")), _positive_int(_lookup(size, "height"))
        patches = _positive_int(_lookup(ip, "max_patches"))
        if w and h and patches:
            return ImageFit(max_pixels=patches * w * h, reason=reason)
    view = _base_view(spec, processor)
    return ImageFit(cover=view, reason=reason) if view is not None else None


def model_image_size(
    family: FamilySpec | str | None, width: int, height: int, processor: Any = None
) -> tuple[int, int]:
    """(width, height) of the image as the model sees it after the processor's resize.

    Qwen families: ``smart_resize`` with the processor's min/max pixels and ``patch_size * merge_size``
    (the family's released defaults without a processor). Other families: their fixed-size global view
    (LLaVA's center crop, Gemma 3's squash, the base view / thumbnail of tiling processors), read from
    the processor when given. Only Qwen2.5-VL's box convention depends on this size.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"invalid image size {width}x{height}")
    spec = _as_spec(family)
    params = smart_resize_params(spec, processor)
    if params is not None:
        h, w = smart_resize(
            height, width, factor=params.factor, min_pixels=params.min_pixels, max_pixels=params.max_pixels
        )
        return w, h
    return _base_view(spec, processor) or (width, height)


# ------------------------------------------------------------------------------------ conversions

Box4 = tuple[float, float, float, float]


def _scales(
    spec: FamilySpec, width: int, height: int, model_size: tuple[int, int] | None
) -> tuple[float, float]:
    """Units of the family's convention per original-image pixel, along x and y."""
    if width <= 0 or height <= 0:
        raise ValueError(f"invalid image size {width}x{height}")
    convention = spec.box_convention
    if convention is BoxConvention.PIXELS:
        return 1.0, 1.0
    if convention is BoxConvention.NORM1000:
        return 1000.0 / width, 1000.0 / height
    if convention is BoxConvention.NORM1:
        return 1.0 / width, 1.0 / height
    mw, mh = model_size if model_size is not None else model_image_size(spec, width, height)
    if mw <= 0 or mh <= 0:
        raise ValueError(f"invalid model image size {mw}x{mh}")
    return mw / width, mh / height


def _four(xyxy: Any) -> Box4:
    values = tuple(float(v) for v in xyxy)
    if len(values) != 4:
        raise ValueError(f"a box needs 4 coordinates, got {len(values)}")
    return values[0], values[1], values[2], values[3]


def to_canonical(
    xyxy: Any,
    family: FamilySpec | str | None,
    width: int,
    height: int,
    model_size: tuple[int, int] | None = None,
) -> Box4:
    """A box in the family's convention → pixels of the original ``width`` x ``height`` image.

    ``model_size`` is the (width, height) the processor produced (RESIZED_PIXELS families); computed
    with the family's default processor settings when omitted. No clipping or validation here.
    """
    sx, sy = _scales(_as_spec(family), width, height, model_size)
    x1, y1, x2, y2 = _four(xyxy)
    return x1 / sx, y1 / sy, x2 / sx, y2 / sy


def from_canonical(
    xyxy: Any,
    family: FamilySpec | str | None,
    width: int,
    height: int,
    model_size: tuple[int, int] | None = None,
) -> Box4:
    """Pixels of the original ``width`` x ``height`` image → a box in the family's convention."""
    sx, sy = _scales(_as_spec(family), width, height, model_size)
    x1, y1, x2, y2 = _four(xyxy)
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy


# EMMA's own convention, for models whose family is unknown (e.g. a remote OpenAI-compatible server).
GENERIC_FAMILY = FamilySpec(
    name="generic",
    model_types=(),
    **_EMMA_BOXES,
    image_tokens=("<image>",),
    max_images=8,
    notes="Unknown family: EMMA's 0-1000 <box> text form; every native syntax is still parsed.",
)


def resolve_family(family: FamilySpec | str | None) -> FamilySpec:
    """A spec from a spec, a family name, or None (→ :data:`GENERIC_FAMILY`)."""
    if family is None:
        return GENERIC_FAMILY
    if isinstance(family, FamilySpec):
        return family
    if family.strip().lower() == GENERIC_FAMILY.name:
        return GENERIC_FAMILY
    return get_family(family)
