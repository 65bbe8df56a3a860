"""Dataset statistics: sample counts by split, task, modality, body part and answer type.

One streaming pass over the samples; missing values are counted under ``"unknown"``.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from emma.data.schema import Sample
from emma.data.split import dataset_name, split_order

CATEGORIES = ("task", "modality", "body_part", "answer_type")
UNKNOWN = "unknown"


class SplitStats(BaseModel):
    samples: int = 0
    images: int = 0  # distinct images referenced in this split
    counts: dict[str, dict[str, int]] = Field(default_factory=dict)  # category → value → samples


class DatasetStats(BaseModel):
    """Counts over a whole dataset and per split (JSON-able)."""

    dataset: str
    samples: int
    images: int  # distinct images over all splits
    by_split: dict[str, int]
    counts: dict[str, dict[str, int]]  # category → value → samples, all splits together
    splits: dict[str, SplitStats]


def _values(sample: Sample) -> dict[str, str]:
    meta = sample.meta
    return {
        "task": str(sample.task),
        "modality": meta.modality or UNKNOWN,
        "body_part": meta.body_part or UNKNOWN,
        "answer_type": meta.answer_type or UNKNOWN,
    }


def _image_key(sample: Sample, i: int) -> str:
    ref = sample.images[i]
    return ref.sha256 or ref.path or f"{sample.id}:{i}"


def _sorted(counter: Counter[str]) -> dict[str, int]:
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def dataset_stats(dataset: Any) -> DatasetStats:
    """Statistics of ``dataset`` (a store ``Dataset`` or its root folder)."""
    if isinstance(dataset, (str, os.PathLike)):
        from emma.data.store import open_dataset

        dataset = open_dataset(Path(dataset))
    all_counts: dict[str, Counter[str]] = {c: Counter() for c in CATEGORIES}
    all_images: set[str] = set()
    splits: dict[str, SplitStats] = {}
    for split in split_order(dataset.splits):
        counts: dict[str, Counter[str]] = {c: Counter() for c in CATEGORIES}
        images: set[str] = set()
        n = 0
        for sample in dataset.iter_samples(split=split):
            n += 1
            for category, value in _values(sample).items():
                counts[category][value] += 1
                all_counts[category][value] += 1
            images.update(_image_key(sample, i) for i in range(len(sample.images)))
        all_images |= images
        splits[split] = SplitStats(
            samples=n, images=len(images), counts={c: _sorted(v) for c, v in counts.items()}
        )
    return DatasetStats(
        dataset=dataset_name(dataset),
        samples=sum(s.samples for s in splits.values()),
        images=len(all_images),
        by_split={k: v.samples for k, v in splits.items()},
        counts={c: _sorted(v) for c, v in all_counts.items()},
        splits=splits,
    )
