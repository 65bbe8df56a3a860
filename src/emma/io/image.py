"""The model-ready image: what every reader hands to training, evaluation and serving."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from emma.io.provenance import Provenance


@dataclass
class ModelImage:
    """An RGB uint8 image ``(H, W, 3)`` plus the provenance of every transform that made it."""

    pixels: np.ndarray
    provenance: Provenance

    def __post_init__(self) -> None:
        if self.pixels.dtype != np.uint8 or self.pixels.ndim != 3 or self.pixels.shape[2] != 3:
            raise ValueError(f"ModelImage needs (H, W, 3) uint8, got {self.pixels.shape} {self.pixels.dtype}")

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.pixels, mode="RGB")


@dataclass(frozen=True)
class ImageFit:
    """The largest model-ready image worth keeping for a model: a bigger image is downscaled when it is
    decoded (aspect ratio kept), since the model's processor would only shrink it further.

    ``cover``: (width, height) of a fixed-size view (a processor that squashes or crops to it): the
    image is shrunk until one side reaches the view, both sides staying at least the view's.
    ``max_side``: longest side (processors that resize the longest edge). ``max_pixels``: area
    (processors with a pixel budget, or tiling up to a number of tiles). ``reason`` is recorded in the
    provenance of every resized image.
    """

    cover: tuple[int, int] | None = None
    max_side: int | None = None
    max_pixels: int | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        values = [*(self.cover or ()), self.max_side, self.max_pixels]
        if any(v is not None and v < 1 for v in values):
            raise ValueError(f"ImageFit bounds must be positive: {self}")

    def scale(self, width: int, height: int) -> float:
        """The factor (at most 1) an image of ``width`` x ``height`` is scaled by."""
        s = 1.0
        if self.cover is not None:
            s = min(s, max(self.cover[0] / width, self.cover[1] / height))
        if self.max_side is not None:
            s = min(s, self.max_side / max(width, height))
        if self.max_pixels is not None:
            s = min(s, math.sqrt(self.max_pixels / (width * height)))
        return s

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the model-ready image made from one of ``width`` x ``height``."""
        if width < 1 or height < 1:
            raise ValueError(f"invalid image size {width}x{height}")
        s = self.scale(width, height)
        if s >= 1.0:
            return width, height
        return max(1, round(width * s)), max(1, round(height * s))


def fit_array(pixels: np.ndarray, fit: ImageFit | None, prov: Provenance) -> np.ndarray:
    """``pixels`` (uint8, ``(H, W)`` or ``(H, W, 3)``) downscaled to ``fit`` (Lanczos, after an exact
    box reduction by an integer factor for large ratios), recorded as a "resize" step; unchanged when
    it already fits. The full-resolution array is not kept."""
    if fit is None:
        return pixels
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    target = fit.size_for(width, height)
    if target == (width, height):
        return pixels
    image = Image.fromarray(np.ascontiguousarray(pixels))
    resized = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0)
    del image
    prov.add(
        "resize",
        **{"from": [width, height], "to": list(target), "method": "lanczos", "reason": fit.reason},
    )
    return np.array(resized, dtype=np.uint8)


def fit_image(image: ModelImage, fit: ImageFit | None) -> ModelImage:
    """A :class:`ModelImage` downscaled to ``fit`` (see :func:`fit_array`); the same object when it fits."""
    if fit is None or fit.size_for(image.width, image.height) == (image.width, image.height):
        return image
    pixels = fit_array(image.pixels, fit, image.provenance)
    return ModelImage(pixels=np.ascontiguousarray(pixels), provenance=image.provenance)
