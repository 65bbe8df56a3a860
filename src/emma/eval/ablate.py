"""Image ablations: the same questions with a blank, noise or mismatched image.

A model that answers as well without the right image is answering from text priors; the report shows
the metric deltas between the ablated and the normal run, with paired CIs.

- ``blank``: every image replaced by a black RGB image of the same size.
- ``noise``: every image replaced by uniform RGB noise of the same size, seeded per sample
  (``seed`` and the sample id), so a rerun or a resumed run shows the same noise.
- ``shuffle``: every sample is shown the images of another evaluated sample whose images differ
  (by content hash): a seeded permutation of the evaluated items, with a donor whose images equal the
  sample's own replaced by the next one in the permutation that differs. Image slot ``j`` takes the
  donor's image ``j`` (its last image when it has fewer).

The ablation and its seed are part of the prediction cache key and recorded in results.json.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
from PIL import Image

from emma.errors import InputError

AblationMode = Literal["blank", "noise", "shuffle"]
ABLATIONS: tuple[str, ...] = get_args(AblationMode)


def check_mode(mode: str) -> AblationMode:
    if mode not in ABLATIONS:
        raise InputError(f"unknown ablation {mode!r} (blank, noise or shuffle)")
    return mode  # type: ignore[return-value]


def blank_like(image: Image.Image) -> Image.Image:
    """A black RGB image of the same size."""
    return Image.new("RGB", image.size, (0, 0, 0))


def _sample_seed(seed: int, key: str) -> list[int]:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return [seed, int.from_bytes(digest[:8], "little")]


def noise_like(image: Image.Image, seed: int, key: str) -> Image.Image:
    """Uniform RGB noise of the same size, determined by ``seed`` and ``key`` (the sample id)."""
    rng = np.random.default_rng(_sample_seed(seed, key))
    w, h = image.size
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), mode="RGB")


def shuffle_donors(image_keys: Sequence[str], seed: int) -> list[int]:
    """For each item, the index of the item whose images it is shown (never one with the same images).

    Raises InputError when fewer than two distinct image sets are evaluated.
    """
    n = len(image_keys)
    if len(set(image_keys)) < 2:
        raise InputError("--ablate shuffle needs at least two evaluated samples with different images")
    perm = np.random.default_rng(seed).permutation(n).tolist()
    donors: list[int] = []
    for i in range(n):
        k = i
        while image_keys[perm[k % n]] == image_keys[i]:
            k += 1
        donors.append(int(perm[k % n]))
    return donors


def ablate_images(
    mode: AblationMode,
    images: Sequence[Image.Image],
    *,
    seed: int,
    key: str,
    donor_images: Sequence[Image.Image] | None = None,
) -> list[Image.Image]:
    """The images a sample is shown under ``mode`` (``donor_images`` required for ``shuffle``)."""
    if mode == "blank":
        return [blank_like(im) for im in images]
    if mode == "noise":
        return [noise_like(im, seed, f"{key}/{j}") for j, im in enumerate(images)]
    if not donor_images:
        raise ValueError("shuffle needs the donor's images")
    return [donor_images[min(j, len(donor_images) - 1)] for j in range(len(images))]
