import math

import numpy as np
import pytest

from emma.io.windows import (
    PRESETS,
    VOIFunction,
    Window,
    apply_window,
    parse_window,
    percentile_window,
    to_uint8,
)


def standard_linear(x: float, c: float, w: float) -> float:
    """DICOM PS3.3 C.11.2.1.2.1, written out literally with y in [0, 1]."""
    if x <= c - 0.5 - (w - 1) / 2:
        return 0.0
    if x > c - 0.5 + (w - 1) / 2:
        return 1.0
    return (x - (c - 0.5)) / (w - 1) + 0.5


def standard_linear_exact(x: float, c: float, w: float) -> float:
    if x <= c - w / 2:
        return 0.0
    if x > c + w / 2:
        return 1.0
    return (x - c) / w + 0.5


@pytest.mark.parametrize("c,w", [(40, 400), (-600, 1500), (40, 80), (2047.5, 4096), (10, 2)])
def test_linear_and_linear_exact_match_the_standard(c: float, w: float) -> None:
    xs = np.linspace(c - w, c + w, 101)
    lin = apply_window(xs, Window(c, w))
    exact = apply_window(xs, Window(c, w, VOIFunction.LINEAR_EXACT))
    for x, a, b in zip(xs, lin, exact, strict=True):
        assert a == pytest.approx(standard_linear(float(x), c, w), abs=1e-5)
        assert b == pytest.approx(standard_linear_exact(float(x), c, w), abs=1e-5)


def test_sigmoid_matches_the_standard() -> None:
    xs = np.array([-200.0, 0.0, 40.0, 100.0, 500.0])
    out = apply_window(xs, Window(40, 400, VOIFunction.SIGMOID))
    expected = [1 / (1 + math.exp(-4 * (x - 40) / 400)) for x in xs]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[2] == pytest.approx(0.5)


def test_presets_and_explicit_parsing() -> None:
    for name in ["lung", "mediastinum", "abdomen", "liver", "bone", "brain", "subdural", "stroke"]:
        window, label = parse_window(name)
        assert window == PRESETS[name] and label == f"preset:{name}"
    assert parse_window(" 40, 400 ") == (Window(40, 400), "explicit")
    with pytest.raises(ValueError, match="unknown window"):
        parse_window("lungs")
    with pytest.raises(ValueError):
        parse_window("40,0")


def test_percentile_window_ignores_outliers_unlike_min_max() -> None:
    rng = np.random.default_rng(0)
    img = rng.normal(100, 10, size=(256, 256))
    img[0, :5] = 30000  # a few hot pixels (burned-in text, metal)
    w = percentile_window(img)
    assert w.center - w.width / 2 > 50 and w.center + w.width / 2 < 150
    out = to_uint8(apply_window(img, w))
    assert 100 < np.median(out) < 160  # contrast kept where min/max scaling would crush it to ~0


def test_to_uint8_clips_and_inverts_without_wraparound() -> None:
    unit = np.array([-0.5, 0.0, 0.5, 1.0, 1.7], dtype=np.float32)
    assert to_uint8(unit).tolist() == [0, 0, 128, 255, 255]
    assert to_uint8(unit, invert=True).tolist() == [255, 255, 128, 0, 0]
