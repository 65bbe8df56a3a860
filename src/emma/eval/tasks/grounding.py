"""Grounding questions derived from SLAKE's organ boxes.

SLAKE ships, per image, boxes of the organs it shows (``detection.json``; the importer stores them in
canonical pixels as ``gold.boxes`` of every question about that image). The grounding task asks, once
per (image, organ label), for the organ's box; every box of that label on the image is a gold box.
The question text is fixed (:data:`GROUNDING_QUESTION`) and family-neutral: each model answers in its
own box syntax and coordinate convention, which the scorer reads with that family's fixed convention.

Derived sample ids are ``"<image key>/<label>"`` (image key: the SLAKE image folder ``xmlab<N>``,
else the image's content hash); a derived sample repeats for every question about the same image and
is evaluated once.
"""

from __future__ import annotations

from emma.data.schema import Box, Gold, Sample, TaskType
from emma.eval.tasks.base import derived_question

GROUNDING_QUESTION = "Locate the {label} in this image and give its bounding box."


def image_key(sample: Sample) -> str:
    if sample.meta.study_key:
        return sample.meta.study_key
    ref = sample.images[0] if sample.images else None
    return (ref.sha256 or ref.path or sample.id)[:16] if ref is not None else sample.id


def boxes_by_label(boxes: list[Box]) -> dict[str, list[Box]]:
    grouped: dict[str, list[Box]] = {}
    for box in boxes:
        if box.image_index != 0 or not (box.label or "").strip():
            continue
        grouped.setdefault(" ".join(box.label.split()), []).append(box)  # type: ignore[union-attr]
    return grouped


def derive_organ_grounding(sample: Sample) -> list[Sample]:
    """One grounding sample per labelled organ on the sample's first image (none without boxes)."""
    if not sample.images or not sample.gold.boxes:
        return []
    key = image_key(sample)
    out: list[Sample] = []
    for label, boxes in sorted(boxes_by_label(sample.gold.boxes).items()):
        question = GROUNDING_QUESTION.format(label=label.lower())
        gold = Gold(answer=label, boxes=boxes)
        out.append(
            derived_question(
                sample,
                f"{key}/{label}",
                TaskType.GROUNDING,
                question,
                gold,
                question_type=label,
                answer_type=None,
            )
        )
    return out
