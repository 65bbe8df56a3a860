"""Quality gates of the annotation pipeline: box sanity, teacher/report agreement, duplicate images.

Each gate gives a reason code (the ``Item.rejected`` value of :mod:`emma.annotate.runner`) and a one-line
detail that names findings from the labeler's vocabulary, numbers and sample ids only (never report text).

**Box sanity** (:func:`sanitize_box`). A box is a canonical box (pixels of the original image) or any
:class:`~emma.data.schema.CoordSpace`; it is converted to pixels with its image's size, then:

- more than :data:`OVERSHOOT_TOLERANCE` of a side beyond an edge → ``box_out_of_range``; a smaller
  overshoot is clipped to the image (and counted as clipped);
- zero width or height after clipping → ``box_degenerate``;
- a side shorter than ``max(min_size_px, min_size_fraction * image side)`` → ``box_too_small``;
- an area of at least ``max_area_fraction`` of the image → ``box_whole_image`` (a box around the
  whole image localises nothing);
- an image index the sample does not have → ``box_out_of_range``.

**Agreement** (:func:`agreement`). The teacher's findings and the report are both read with the one
rule-based labeler (:func:`emma.text.labeler.label_report`), so the comparison is in one vocabulary.
Findings the report marks uncertain are left out on both sides; "No Finding" and "Support Devices" are
not scored; CheXpert's hierarchy is applied (a positive Edema, Consolidation, Pneumonia, Atelectasis or
Lung Lesion makes Lung Opacity positive, Cardiomegaly makes Enlarged Cardiomediastinum positive), so a
teacher saying "opacity" for a report's "consolidation" is not a disagreement. The score is the Dice
(F1) overlap of the two positive sets (teacher-uncertain counts as positive: the teacher named it):
1.0 when both are empty (both read the study as normal), ``None`` when there is no report to compare
with. Below the threshold the item is rejected ``disagreement`` with the missed and unsupported findings
in the detail. Dice rather than accuracy over all findings: a report's many explicit negatives ("no
pneumothorax, no effusion, ...") would otherwise hide a missed or invented finding.

**Duplicate images** (:func:`find_duplicates`, :class:`DuplicateGate`). A pre-pass over the input in
output order computes each image's 64-bit perceptual hash (``imagehash.phash``, as
:mod:`emma.data.split` does) and keeps an incremental multi-index (the pigeonhole blocks of
:mod:`emma.data.split`); a sample with an image within ``threshold`` bits of an image of an earlier
kept sample is a duplicate of that sample, and :class:`DuplicateGate` rejects it ``duplicate_image``
with the first sample's id. The pass is separate from the teacher steps so that the gate stays a pure
function of the sample (deterministic under concurrency, Ray and resume); it reads every image once and
holds the hashes of kept images in memory (8 bytes plus the index entries per image; use threshold 0,
an exact pHash match, for tens of millions of images).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from PIL import Image

from emma.annotate.steps import Ask, Item, prompt_hash, reject
from emma.data.schema import Box, CoordSpace, Sample
from emma.errors import EmmaError
from emma.text.labeler import (
    FINDINGS,
    NO_FINDING,
    POSITIVE,
    SUPPORT_DEVICES,
    UNCERTAIN,
    label_report,
)

log = logging.getLogger(__name__)

# Reason codes (``Item.rejected``) produced by the gates of this module.
BOX_OUT_OF_RANGE = "box_out_of_range"
BOX_DEGENERATE = "box_degenerate"
BOX_TOO_SMALL = "box_too_small"
BOX_WHOLE_IMAGE = "box_whole_image"
DISAGREEMENT = "disagreement"
DUPLICATE_IMAGE = "duplicate_image"

OVERSHOOT_TOLERANCE = 0.05  # fraction of a side a box may overshoot an edge and still be clipped
MIN_BOX_PX = 4.0
MIN_BOX_FRACTION = 0.01
MAX_BOX_AREA_FRACTION = 0.95
DEFAULT_AGREEMENT_THRESHOLD = 0.5
DEFAULT_PHASH_THRESHOLD = 4
MAX_PHASH_THRESHOLD = 16

SCORED_FINDINGS: tuple[str, ...] = tuple(f for f in FINDINGS if f not in (NO_FINDING, SUPPORT_DEVICES))
HIERARCHY: dict[str, tuple[str, ...]] = {
    "Lung Opacity": ("Edema", "Consolidation", "Pneumonia", "Atelectasis", "Lung Lesion"),
    "Enlarged Cardiomediastinum": ("Cardiomegaly",),
}

Size = tuple[int, int]  # (width, height)


# ------------------------------------------------------------------------------------------ boxes


@dataclass(frozen=True)
class BoxCheck:
    """The outcome of :func:`sanitize_box`: the kept (possibly clipped) pixel box, or a reason code."""

    box: Box | None
    reason: str | None = None
    clipped: bool = False

    @property
    def ok(self) -> bool:
        return self.box is not None


@dataclass(frozen=True)
class BoxLimits:
    """Bounds of :func:`sanitize_box` (see the module docstring)."""

    overshoot: float = OVERSHOOT_TOLERANCE
    min_size_px: float = MIN_BOX_PX
    min_size_fraction: float = MIN_BOX_FRACTION
    max_area_fraction: float = MAX_BOX_AREA_FRACTION

    def __post_init__(self) -> None:
        if not 0 <= self.overshoot < 1:
            raise ValueError("overshoot must be within [0, 1)")
        if self.min_size_px < 0 or not 0 <= self.min_size_fraction < 1:
            raise ValueError("minimum box size must be non-negative (fraction below 1)")
        if not 0 < self.max_area_fraction <= 1:
            raise ValueError("max_area_fraction must be within (0, 1]")


DEFAULT_BOX_LIMITS = BoxLimits()


def sanitize_box(box: Box, image_sizes: Sequence[Size], limits: BoxLimits = DEFAULT_BOX_LIMITS) -> BoxCheck:
    """Check one box against its image: a pixel box clipped to the image, or the reason it is rejected."""
    if not 0 <= box.image_index < len(image_sizes):
        return BoxCheck(None, BOX_OUT_OF_RANGE)
    width, height = image_sizes[box.image_index]
    if width <= 0 or height <= 0:
        return BoxCheck(None, BOX_OUT_OF_RANGE)
    pixel = box if box.space is CoordSpace.PIXEL else box.to_space(CoordSpace.PIXEL, width, height)
    x1, y1, x2, y2 = pixel.as_tuple()
    tol_x, tol_y = limits.overshoot * width, limits.overshoot * height
    if x1 < -tol_x or y1 < -tol_y or x2 > width + tol_x or y2 > height + tol_y:
        return BoxCheck(None, BOX_OUT_OF_RANGE)
    cx1, cy1 = max(0.0, min(x1, width)), max(0.0, min(y1, height))
    cx2, cy2 = max(0.0, min(x2, width)), max(0.0, min(y2, height))
    clipped = (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
    w, h = cx2 - cx1, cy2 - cy1
    if w <= 0 or h <= 0:
        return BoxCheck(None, BOX_DEGENERATE)
    if w < max(limits.min_size_px, limits.min_size_fraction * width) or h < max(
        limits.min_size_px, limits.min_size_fraction * height
    ):
        return BoxCheck(None, BOX_TOO_SMALL)
    if w * h >= limits.max_area_fraction * width * height:
        return BoxCheck(None, BOX_WHOLE_IMAGE)
    kept = pixel.model_copy(update={"x1": cx1, "y1": cy1, "x2": cx2, "y2": cy2, "space": CoordSpace.PIXEL})
    return BoxCheck(kept, None, clipped)


def grounding_reason(message: str) -> str:
    """Reason code of one message from :func:`emma.infer.grounding.parse_model_boxes` about a dropped box."""
    if "far outside" in message or "refers to image" in message:
        return BOX_OUT_OF_RANGE
    if "degenerate" in message or "out of order" in message:
        return BOX_DEGENERATE
    return "invalid_boxes"


# -------------------------------------------------------------------------------------- agreement


def with_hierarchy(labels: Mapping[str, int]) -> dict[str, int]:
    """Labels with CheXpert's parents made positive (uncertain) when a child is positive (uncertain)."""
    out = dict(labels)
    for parent, children in HIERARCHY.items():
        values = [labels[c] for c in children if c in labels]
        if POSITIVE in values:
            out[parent] = POSITIVE
        elif UNCERTAIN in values and out.get(parent) != POSITIVE:
            out[parent] = UNCERTAIN
    return out


def findings_labels(phrases: Iterable[str], text: str = "") -> dict[str, int]:
    """Labeler reading of a teacher's finding phrases (each a positive statement) and free text."""
    sentences = [" ".join(p.split()).rstrip(".") for p in phrases if p and p.strip()]
    body = ". ".join(s for s in sentences if s)
    joined = f"{body}. {text}" if body else text
    return label_report(joined) if joined.strip() else {}


@dataclass(frozen=True)
class Agreement:
    """Teacher vs report positive findings (labeler vocabulary); ``score`` None without a report."""

    score: float | None
    matched: tuple[str, ...] = ()
    missed: tuple[str, ...] = ()  # positive in the report, not named by the teacher
    unsupported: tuple[str, ...] = ()  # named by the teacher, not positive in the report

    def detail(self, threshold: float) -> str:
        parts = [f"agreement {self.score:.2f} < {threshold:.2f}" if self.score is not None else "no report"]
        if self.missed:
            parts.append("missed: " + ", ".join(self.missed))
        if self.unsupported:
            parts.append("unsupported: " + ", ".join(self.unsupported))
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "score": None if self.score is None else round(self.score, 4),
            "matched": list(self.matched),
            "missed": list(self.missed),
            "unsupported": list(self.unsupported),
        }


def agreement(teacher: Mapping[str, int], report: Mapping[str, int] | None) -> Agreement:
    """Dice overlap of the positive findings of the teacher and of the report (see the module docstring).

    ``report`` None or empty (no report text, nothing the labeler could read) gives ``score=None``.
    """
    if not report:
        return Agreement(None)
    r = with_hierarchy(report)
    t = with_hierarchy(teacher)
    uncertain = {f for f in SCORED_FINDINGS if r.get(f) == UNCERTAIN}
    r_pos = {f for f in SCORED_FINDINGS if r.get(f) == POSITIVE}
    t_pos = {f for f in SCORED_FINDINGS if t.get(f) in (POSITIVE, UNCERTAIN) and f not in uncertain}
    both = r_pos & t_pos
    order = {f: i for i, f in enumerate(SCORED_FINDINGS)}

    def ordered(names: set[str]) -> tuple[str, ...]:
        return tuple(sorted(names, key=order.__getitem__))

    score = 1.0 if not r_pos and not t_pos else 2 * len(both) / (len(r_pos) + len(t_pos))
    return Agreement(score, ordered(both), ordered(r_pos - t_pos), ordered(t_pos - r_pos))


# ------------------------------------------------------------------------------------- duplicates


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash (``imagehash.phash``, the hash :mod:`emma.data.split` uses)."""
    import imagehash

    return int(str(imagehash.phash(image)), 16)


def _blocks(threshold: int) -> list[tuple[int, int]]:
    """``threshold + 1`` disjoint (shift, mask) bit blocks covering 64 bits: two hashes within
    ``threshold`` bits agree on at least one block (pigeonhole), as in :mod:`emma.data.split`."""
    n = min(threshold + 1, 64)
    edges = [round(i * 64 / n) for i in range(n + 1)]
    return [(lo, (1 << (hi - lo)) - 1) for lo, hi in pairwise(edges)]


class PerceptualIndex:
    """Incremental near-duplicate search over 64-bit hashes (multi-index hashing)."""

    def __init__(self, threshold: int = DEFAULT_PHASH_THRESHOLD) -> None:
        if not 0 <= threshold <= MAX_PHASH_THRESHOLD:
            raise ValueError(f"perceptual-hash threshold must be within 0..{MAX_PHASH_THRESHOLD}")
        self.threshold = threshold
        self._blocks = _blocks(threshold)
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._blocks]
        self._hashes: list[int] = []
        self._owners: list[str] = []

    def __len__(self) -> int:
        return len(self._hashes)

    def nearest(self, value: int) -> tuple[str, int] | None:
        """(owner, distance) of the closest indexed hash within the threshold (earliest on ties)."""
        best: tuple[int, int] | None = None  # (distance, index)
        for (shift, mask), table in zip(self._blocks, self._tables):
            for i in table.get((value >> shift) & mask, ()):
                d = (self._hashes[i] ^ value).bit_count()
                if d <= self.threshold and (best is None or (d, i) < best):
                    best = (d, i)
        return None if best is None else (self._owners[best[1]], best[0])

    def add(self, value: int, owner: str) -> None:
        i = len(self._hashes)
        self._hashes.append(value)
        self._owners.append(owner)
        for (shift, mask), table in zip(self._blocks, self._tables):
            table.setdefault((value >> shift) & mask, []).append(i)


@dataclass(frozen=True)
class Duplicate:
    """Sample ``sample`` repeats (image ``image`` of it) an image of the earlier sample ``first``."""

    first: str
    image: int
    distance: int


@dataclass
class DuplicateScan:
    duplicates: dict[str, Duplicate] = field(default_factory=dict)
    samples: int = 0
    images: int = 0
    unreadable: int = 0


def find_duplicates(
    samples: Iterable[Sample],
    open_image: Callable[[Any], Image.Image],
    *,
    threshold: int = DEFAULT_PHASH_THRESHOLD,
) -> DuplicateScan:
    """Samples whose images repeat an image of an earlier sample, in the order given.

    ``open_image(ref)`` decodes an :class:`~emma.data.schema.ImageRef` (``Dataset.open_image``).
    Identical content (same ``sha256``) is a duplicate without decoding. Unreadable images are counted
    and skipped (the annotation run reports them per sample). Only images of kept (non-duplicate)
    samples are indexed, so every duplicate points at the first sample of its group.
    """
    scan = DuplicateScan()
    index = PerceptualIndex(threshold)
    by_sha: dict[str, str] = {}
    for sample in samples:
        scan.samples += 1
        found: Duplicate | None = None
        hashes: list[tuple[str | None, int]] = []
        for k, ref in enumerate(sample.images):
            scan.images += 1
            if ref.sha256 and ref.sha256 in by_sha and by_sha[ref.sha256] != sample.id:
                found = found or Duplicate(by_sha[ref.sha256], k, 0)
                continue
            try:
                with open_image(ref) as image:
                    value = phash(image)
            except (EmmaError, OSError, ValueError):
                scan.unreadable += 1
                continue
            hit = index.nearest(value)
            if hit is not None and hit[0] != sample.id:
                found = found or Duplicate(hit[0], k, hit[1])
            hashes.append((ref.sha256, value))
        if found is not None:
            scan.duplicates[sample.id] = found
            continue
        for sha, value in hashes:
            index.add(value, sample.id)
            if sha:
                by_sha.setdefault(sha, sample.id)
    log.info(
        "duplicate scan: %d samples, %d images, %d duplicates, %d unreadable",
        scan.samples,
        scan.images,
        len(scan.duplicates),
        scan.unreadable,
    )
    return scan


class DuplicateGate:
    """A step that rejects the samples :func:`find_duplicates` found (``duplicate_image``).

    Pure: it only looks the sample id up in the precomputed map, so concurrency, Ray and resume give
    the same output. It asks the teacher nothing.
    """

    name = "dedup"

    def __init__(self, duplicates: Mapping[str, Duplicate], *, threshold: int = DEFAULT_PHASH_THRESHOLD):
        self.duplicates = dict(duplicates)
        self.threshold = threshold
        self.prompt_hash = prompt_hash(self.name, "phash", threshold)

    def __call__(self, item: Item, images: list[Image.Image], ask: Ask) -> list[Item]:
        dup = self.duplicates.get(item.sample.id)
        if dup is None:
            return [item]
        detail = f"image {dup.image} duplicates sample {dup.first} (pHash distance {dup.distance})"
        return [reject(item, DUPLICATE_IMAGE, detail)]
