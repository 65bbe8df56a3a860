"""A small synthetic labelled VQA dataset (noise images, chest and abdomen questions) for holdout tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from emma.data.schema import Gold, ImageRef, Meta, Sample, TaskType, Turn
from emma.data.store import DatasetWriter


def noise(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(32, 32), dtype=np.uint8), mode="L")


def vqa(
    sid: str,
    question: str,
    answer: str,
    *,
    split: str,
    body_part: str,
    qtype: str = "PRES",
    labels: dict[str, int] | None = None,
) -> Sample:
    return Sample(
        id=sid,
        task=TaskType.CLOSED_VQA if answer in ("yes", "no") else TaskType.OPEN_VQA,
        images=[ImageRef(path="pending.png")],  # replaced by the writer
        turns=[Turn(role="user", content=question, images=[0]), Turn(role="assistant", content=answer)],
        gold=Gold(answer=answer, labels=labels or {}),
        meta=Meta(split=split, body_part=body_part, question_type=qtype, source="synthetic"),
    )


def write_synthetic(root: Path) -> Path:
    """Chest and abdomen questions on 8 images; image 1 (abdomen) is also asked about in a chest question."""
    rows = [
        # (id, question, answer, split, body_part, image seed, labels)
        ("c1", "Is there a pneumothorax?", "no", "train", "chest", 10, {"pneumothorax": 0}),
        ("c2", "Is the heart enlarged?", "yes", "train", "chest", 11, None),
        ("c3", "Is this an abdominal film?", "no", "train", "chest", 12, None),  # names the group
        ("c4", "Is the lung clear?", "yes", "train", "chest", 1, None),  # a held-out image
        ("c5", "Is the heart normal?", "yes", "test", "chest", 13, None),
        ("c6", "Is there an effusion?", "no", "test", "chest", 14, None),
        ("a1", "Is the liver normal?", "yes", "train", "abdomen", 1, None),
        ("a2", "Is the bowel dilated?", "no", "train", "abdomen", 2, None),
        ("a3", "Is there free air?", "no", "test", "abdomen", 3, None),
        ("a4", "What organ is enlarged?", "spleen", "test", "abdomen", 4, None),
    ]
    with DatasetWriter(root, name="synthetic", license="CC0-1.0") as writer:
        for sid, q, a, split, part, seed, labels in rows:
            writer.add(vqa(sid, q, a, split=split, body_part=part, labels=labels), [noise(seed)])
    return root
