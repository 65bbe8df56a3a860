"""The model-ready image: what every reader hands to training, evaluation and serving."""

from __future__ import annotations

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
