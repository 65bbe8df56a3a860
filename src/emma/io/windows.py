"""VOI windowing (DICOM PS3.3 C.11.2.1.2) and named CT window presets, on float arrays.

Every function maps values to ``[0, 1]`` float32; :func:`to_uint8` then scales to 8 bits with
clipping (never wraparound). Values are in output units of the modality LUT (Hounsfield units for CT).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class VOIFunction(StrEnum):
    LINEAR = "LINEAR"
    LINEAR_EXACT = "LINEAR_EXACT"
    SIGMOID = "SIGMOID"


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: VOIFunction = VOIFunction.LINEAR

    def __post_init__(self) -> None:
        if not np.isfinite(self.center) or not np.isfinite(self.width) or self.width <= 0:
            raise ValueError(f"invalid window center={self.center} width={self.width}")


# Center/width in HU. Sources: common radiology practice (e.g. Radiopaedia "windowing (CT)").
PRESETS: dict[str, Window] = {
    "lung": Window(-600, 1500),
    "mediastinum": Window(50, 350),
    "soft_tissue": Window(50, 400),
    "abdomen": Window(40, 400),
    "liver": Window(60, 160),
    "bone": Window(400, 1800),
    "brain": Window(40, 80),
    "subdural": Window(75, 215),
    "stroke": Window(40, 40),
    "temporal_bone": Window(600, 2800),
    "angio": Window(300, 600),
}


def window_params(window: Window, source: str) -> dict[str, float | str]:
    """The provenance parameters of a window applied (``source``: where it came from)."""
    return {
        "source": source,
        "center": float(window.center),
        "width": float(window.width),
        "function": str(window.function),
    }


def parse_window(spec: str) -> tuple[Window, str]:
    """Parse ``"lung"`` (a preset) or ``"C,W"`` (explicit); returns the window and a provenance label."""
    key = spec.strip().lower()
    if key in PRESETS:
        return PRESETS[key], f"preset:{key}"
    parts = key.split(",")
    if len(parts) == 2:
        try:
            return Window(float(parts[0]), float(parts[1])), "explicit"
        except ValueError:
            pass
    names = ", ".join(sorted(PRESETS))
    raise ValueError(f"unknown window {spec!r}: use a preset ({names}) or CENTER,WIDTH")


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """Map ``values`` through ``window`` to float32 in ``[0, 1]``."""
    x = values.astype(np.float32, copy=False)
    c, w = np.float32(window.center), np.float32(window.width)
    if window.function is VOIFunction.SIGMOID:
        out = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w, dtype=np.float32))
        return out.astype(np.float32, copy=False)
    if window.function is VOIFunction.LINEAR_EXACT:
        lo, span = c - w / 2, w
    else:  # LINEAR: the standard's half-pixel offset and width - 1 span (width >= 1)
        span = max(w - 1, np.float32(1))
        lo = c - 0.5 - span / 2
    out = (x - lo) * (1.0 / span)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def percentile_window(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> Window:
    """Robust fallback window from percentiles (never global min/max), on a strided sample for speed."""
    flat = values.reshape(-1)
    step = max(1, flat.size // 1_000_000)
    lo, hi = np.percentile(flat[::step], [low, high])
    lo, hi = float(lo), float(hi)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("image has no finite values")
    if hi - lo <= 0:  # a flat image; at large magnitudes lo + 1.0 == lo in floating point
        hi = lo + max(1.0, abs(lo) * 2.0**-20)
    return Window(center=(lo + hi) / 2, width=hi - lo, function=VOIFunction.LINEAR_EXACT)


def to_uint8(unit: np.ndarray, invert: bool = False) -> np.ndarray:
    """Scale ``[0, 1]`` floats to uint8 with clipping; ``invert`` for MONOCHROME1 display."""
    if invert:
        unit = 1.0 - unit
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """Stack an ``(H, W)`` uint8 image to ``(H, W, 3)``."""
    return np.stack((gray, gray, gray), axis=-1)
