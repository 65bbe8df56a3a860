"""emma.model.families: family lookup, Qwen's smart_resize, model image sizes and box conversions."""

from __future__ import annotations

import dataclasses
import random

import pytest
from PIL import Image
from transformers import (
    Gemma3ImageProcessorPil,
    Idefics3ImageProcessorPil,
    LlavaImageProcessorPil,
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from emma.model.families import (
    FAMILIES,
    GENERIC_FAMILY,
    BoxConvention,
    BoxSyntax,
    family_for_model_type,
    from_canonical,
    get_family,
    model_image_size,
    resolve_family,
    smart_resize,
    to_canonical,
)

EXPECTED_CONVENTIONS = {
    "qwen2_5_vl": BoxConvention.RESIZED_PIXELS,
    "qwen3_vl": BoxConvention.NORM1000,
    "qwen2_vl": BoxConvention.NORM1000,
    "internvl": BoxConvention.NORM1000,
    "idefics3": BoxConvention.NORM1000,
    "llava": BoxConvention.NORM1000,
    "llava_onevision": BoxConvention.NORM1000,
    "gemma3": BoxConvention.NORM1000,
    "fast_vlm": BoxConvention.NORM1000,
}


def test_every_supported_family_is_described() -> None:
    assert set(FAMILIES) == set(EXPECTED_CONVENTIONS)
    for name, spec in FAMILIES.items():
        assert spec.name == name
        assert spec.box_convention is EXPECTED_CONVENTIONS[name]
        assert spec.model_types and spec.image_tokens and spec.max_images >= 1
        assert len(spec.notes) > 40
    assert FAMILIES["qwen2_5_vl"].box_syntax is BoxSyntax.QWEN_JSON
    assert FAMILIES["qwen3_vl"].box_syntax is BoxSyntax.QWEN_JSON
    assert FAMILIES["qwen2_vl"].box_syntax is BoxSyntax.QWEN2_TOKENS
    assert FAMILIES["internvl"].box_syntax is BoxSyntax.REF_BOX
    for name in ("idefics3", "llava", "llava_onevision", "gemma3"):
        assert FAMILIES[name].box_syntax is BoxSyntax.EMMA
        assert "No trained box convention" in FAMILIES[name].notes


def test_lookup_by_name_alias_and_model_type() -> None:
    assert get_family("qwen2_5_vl") is FAMILIES["qwen2_5_vl"]
    assert get_family("Qwen2.5-VL") is FAMILIES["qwen2_5_vl"]
    assert get_family("smolvlm") is FAMILIES["idefics3"]
    assert get_family("medgemma") is FAMILIES["gemma3"]
    assert family_for_model_type("smolvlm") is FAMILIES["idefics3"]
    assert family_for_model_type("qwen3_vl_moe") is FAMILIES["qwen3_vl"]
    assert family_for_model_type("bert") is None
    with pytest.raises(ValueError, match="unknown model family"):
        get_family("gpt2")
    assert resolve_family(None) is GENERIC_FAMILY
    assert resolve_family("generic") is GENERIC_FAMILY


def test_smart_resize_matches_transformers() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        h = rng.randint(1, 6000)
        w = rng.randint(max(1, h // 150), min(6000, h * 150))
        for factor, lo, hi in ((28, 3136, 12845056), (32, 65536, 16777216), (28, 3136, 12544)):
            assert smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi) == hf_smart_resize(
                h, w, factor=factor, min_pixels=lo, max_pixels=hi
            )


def test_qwen25_model_size_golden_and_against_real_processing() -> None:
    # 1001 x 701 is not a multiple of 28: round(1001/28)=36 → 1008, round(701/28)=25 → 700.
    assert model_image_size("qwen2_5_vl", 1001, 701) == (1008, 700)
    # Qwen3-VL: factor 32 and a 65536-pixel minimum.
    assert model_image_size("qwen3_vl", 1001, 701) == (992, 704)
    # With a processor, its min/max pixels apply: 4000x3000 over 1003520 pixels is scaled down.
    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=1003520)
    assert model_image_size("qwen2_5_vl", 4000, 3000, processor) == (1148, 840)
    for width, height in ((4000, 3000), (1001, 701), (57, 300)):
        grid = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"][0]
        seen = (int(grid[2]) * processor.patch_size, int(grid[1]) * processor.patch_size)
        assert model_image_size("qwen2_5_vl", width, height, processor) == seen


def test_model_size_from_a_real_tiny_qwen_processor(tiny_loaded) -> None:
    loaded = tiny_loaded("qwen2_5_vl")
    processor = loaded.processor
    image = Image.new("RGB", (1001, 701))
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    patch = processor.image_processor.patch_size
    assert model_image_size("qwen2_5_vl", 1001, 701, processor) == (
        int(grid[2]) * patch,
        int(grid[1]) * patch,
    )


def test_base_view_sizes_from_processors() -> None:
    assert model_image_size(
        "gemma3", 1001, 701, Gemma3ImageProcessorPil(size={"height": 896, "width": 896})
    ) == (
        896,
        896,
    )
    llava = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert model_image_size("llava", 1001, 701, llava) == (336, 336)
    assert model_image_size(
        "idefics3", 1001, 701, Idefics3ImageProcessorPil(max_image_size={"longest_edge": 384})
    ) == (
        384,
        384,
    )
    assert model_image_size("internvl", 1001, 701) == (448, 448)
    assert model_image_size(None, 1001, 701) == (1001, 701)
    with pytest.raises(ValueError):
        model_image_size("qwen2_5_vl", 0, 10)


def test_qwen25_resized_pixels_golden_both_ways() -> None:
    # model sees 1008x700 for a 1001x701 original
    assert to_canonical((504, 350, 1008, 700), "qwen2_5_vl", 1001, 701) == pytest.approx(
        (500.5, 350.5, 1001, 701)
    )
    assert from_canonical((500.5, 350.5, 1001, 701), "qwen2_5_vl", 1001, 701) == pytest.approx(
        (504, 350, 1008, 700)
    )
    # an explicit model size wins over the default processor settings
    assert to_canonical((10, 10, 20, 20), "qwen2_5_vl", 1000, 500, model_size=(500, 250)) == pytest.approx(
        (20, 20, 40, 40)
    )


@pytest.mark.parametrize(
    "family", ["qwen3_vl", "qwen2_vl", "internvl", "idefics3", "llava", "llava_onevision", "gemma3"]
)
def test_norm1000_golden_both_ways(family: str) -> None:
    assert to_canonical((500, 500, 1000, 1000), family, 1001, 701) == pytest.approx((500.5, 350.5, 1001, 701))
    assert from_canonical((100.1, 70.1, 200.2, 140.2), family, 1001, 701) == pytest.approx(
        (100, 100, 200, 200)
    )


def test_pixels_and_norm1_conventions() -> None:
    pixels = dataclasses.replace(GENERIC_FAMILY, name="px", box_convention=BoxConvention.PIXELS)
    norm1 = dataclasses.replace(GENERIC_FAMILY, name="n1", box_convention=BoxConvention.NORM1)
    assert to_canonical((1, 2, 3, 4), pixels, 640, 480) == (1, 2, 3, 4)
    assert to_canonical((0.5, 0.25, 1, 1), norm1, 640, 480) == pytest.approx((320, 120, 640, 480))
    assert from_canonical((320, 120, 640, 480), norm1, 640, 480) == pytest.approx((0.5, 0.25, 1, 1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_every_family(family: str) -> None:
    rng = random.Random(family)
    for _ in range(50):
        width, height = rng.randint(20, 3000), rng.randint(20, 3000)
        x1, y1 = rng.uniform(0, width / 2), rng.uniform(0, height / 2)
        box = (x1, y1, rng.uniform(x1, width), rng.uniform(y1, height))
        back = to_canonical(from_canonical(box, family, width, height), family, width, height)
        assert back == pytest.approx(box, rel=1e-9, abs=1e-6)


def test_conversion_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        to_canonical((1, 2, 3), "internvl", 100, 100)
    with pytest.raises(ValueError):
        to_canonical((1, 2, 3, 4), "internvl", 0, 100)
