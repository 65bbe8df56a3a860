"""Contamination check: how much of the evaluated split a training set already holds.

``emma eval --train-data DIR`` compares the training set (a canonical dataset folder: its ``train``
split when it has one, else every split) with exactly the samples evaluated (after ``--limit``), with
the leakage machinery of :mod:`emma.data.split`: exact image overlap (SHA-256 of the stored bytes),
perceptual near-duplicates (pHash within ``phash_threshold`` bits), normalised question overlap and
(image, question) pair overlap. The result is recorded in ``results.json`` and shown in the report;
it never changes a metric.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from emma.data.schema import ImageRef, Sample
from emma.data.split import compare_splits
from emma.data.store import Dataset, decode_image, open_dataset
from emma.errors import DataFormatError, EmmaError

_TRAIN = "__train__"
_EVAL = "__eval__"


class _Combined:
    """The training set and the evaluated samples seen as one dataset by the leakage checker."""

    def __init__(self, train: Dataset, train_splits: list[str], eval_ds: Dataset, samples: Sequence[Sample]):
        self.train = train
        self.train_splits = train_splits
        self.eval_ds = eval_ds
        self.samples = samples
        self.manifest = {"name": f"{train.name} vs evaluated split"}

    def iter_samples(self, split: str | None = None) -> Iterator[Sample]:
        if split == _EVAL:
            yield from self.samples
            return
        for s in self.train_splits:
            yield from self.train.iter_samples(s)

    def image_bytes(self, ref: ImageRef) -> bytes:
        last: Exception | None = None
        for ds in (self.train, self.eval_ds):
            try:
                return ds.image_bytes(ref)
            except EmmaError as exc:  # the ref belongs to the other dataset
                last = exc
        assert last is not None
        raise last

    def open_image(self, ref: ImageRef) -> Image.Image:
        return decode_image(self.image_bytes(ref), what="image")


def check_contamination(
    train_dir: Path, eval_dataset: Dataset, samples: Sequence[Sample], *, phash_threshold: int = 4
) -> dict[str, Any]:
    """Overlap between the training set at ``train_dir`` and the evaluated ``samples`` (JSON-able)."""
    train_dir = Path(train_dir)
    try:
        train = open_dataset(train_dir)
    except DataFormatError as exc:
        raise DataFormatError(f"--train-data must be a dataset folder (with dataset.json): {exc}") from None
    splits = ["train"] if "train" in train.splits else list(train.splits)
    combined = _Combined(train, splits, eval_dataset, samples)
    pair, earlier = compare_splits(combined, _TRAIN, _EVAL, phash_threshold=phash_threshold)
    n = max(len(samples), 1)
    images = max(pair.later_images, 1)
    return {
        "train_data": str(train_dir.resolve()),
        "train_dataset": train.name,
        "train_splits": splits,
        "train_samples": earlier.samples,
        "train_images": earlier.images,
        "evaluated_samples": pair.later_samples,
        "evaluated_images": pair.later_images,
        "exact_image_overlap": pair.exact_image_overlap,
        "exact_image_overlap_rate": pair.exact_image_overlap / images,
        "near_duplicate_images": pair.near_duplicate_images,
        "phash_threshold": phash_threshold,
        "question_overlap": pair.question_overlap,
        "question_overlap_rate": pair.question_overlap / n,
        "image_question_overlap": pair.image_question_overlap,
        "image_question_overlap_rate": pair.image_question_overlap / n,
        "exact_examples": pair.exact_examples,
        "near_duplicate_examples": [e.model_dump() for e in pair.near_duplicate_examples],
        "contaminated": bool(
            pair.exact_image_overlap or pair.near_duplicate_images or pair.image_question_overlap
        ),
    }
