"""Balanced yes/no questions about what each train image is (organ, modality), built by rules.

A small VLM fine-tuned on VQA questions can lower its loss from the question alone (most "Is there X?"
answers are predictable from the wording), so it learns little about reading its image. Questions whose
answer the wording cannot predict force it to: every image gets, for each fact the dataset records
about it (body part / organ label, modality), one question whose answer is "yes" (its own value) and
one whose answer is "no" (another value of the same kind, seeded), in one of a few seeded wordings.
Half the answers are "yes", and each value is asked about as often with "yes" as with "no" (in
expectation), so the text alone scores about 50%.

Facts come from the dataset's per-image labels (``meta.body_part``, ``meta.modality``) of the *train*
split (the test split is refused) and from the headers of DICOM files that installed packages carry
(:func:`emma.data.sources.rule_captions.dicom_caption_samples`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from emma.data.schema import Gold, ImageRef, Meta, Sample, TaskType
from emma.data.sources._common import qa_turns
from emma.data.sources.rule_captions import (
    MODALITY_WORDS,
    collect_image_facts,
    dicom_caption_samples,
    open_train_split,
)
from emma.data.store import DatasetWriter

__all__ = ["FactQuestionReport", "build_fact_questions", "fact_questions"]

# {value} is the body part ("chest") or the modality ("CT"); several wordings of each kind.
BODY_PART_WORDINGS = (
    "Is this an image of the {value}?",
    "Does this image show the {value}?",
    "Is this a study of the {value}?",
)
MODALITY_WORDINGS = (
    "Is the imaging modality {value}?",
    "Was this image acquired with {value}?",
    "Is this {value}?",
)
# Body parts asked about: disjoint regions only, so that a "no" is never wrong ("Is this the pancreas?"
# about an abdominal CT could be either). Labels outside this map get no body-part question.
BODY_REGIONS = {
    "head": "head",
    "brain": "head",
    "skull": "head",
    "chest": "chest",
    "thorax": "chest",
    "lung": "chest",
    "abdomen": "abdomen",
    "abd": "abdomen",
    "pancreas": "abdomen",
    "liver": "abdomen",
    "kidney": "abdomen",
}


@dataclass(frozen=True)
class FactQuestionReport:
    images: int
    questions: int
    dicom_images: int
    out: Path


def fact_questions(
    facts: dict[str, str],
    values: dict[str, list[str]],
    rng: random.Random,
) -> list[tuple[str, str, str]]:
    """``(kind, question, answer)`` for one image: per fact kind with at least two known values, one
    "yes" question about its own value and one "no" question about another value."""
    out = []
    for kind, own in sorted(facts.items()):
        others = [v for v in values.get(kind, []) if v != own]
        if not others:
            continue
        wordings = BODY_PART_WORDINGS if kind == "body_part" else MODALITY_WORDINGS
        other = rng.choice(others)
        out.append((kind, rng.choice(wordings).format(value=own), "yes"))
        out.append((kind, rng.choice(wordings).format(value=other), "no"))
    return out


def _question_sample(sample_id: str, ref: ImageRef, question: str, answer: str, meta: Meta) -> Sample:
    return Sample(
        id=sample_id,
        task=TaskType.CLOSED_VQA,
        images=[ref],
        turns=qa_turns(question, answer),
        gold=Gold(answer=answer),
        meta=meta,
    )


def _labels(body_part: str | None, modality: str | None) -> dict[str, str]:
    """The facts asked about: the body region (from :data:`BODY_REGIONS`) and the modality word."""
    facts = {}
    region = BODY_REGIONS.get((body_part or "").strip().lower())
    if region:
        facts["body_part"] = region
    if modality:
        facts["modality"] = MODALITY_WORDS.get(modality.strip().lower(), modality.strip())
    return facts


def build_fact_questions(
    source: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    dicom_files: Iterable[Path] = (),
    seed: int = 0,
) -> FactQuestionReport:
    """Write a closed-VQA dataset (split ``train``) of balanced fact questions about ``source``'s
    ``split`` images (and ``dicom_files``' images). Refuses the test split."""
    dataset = open_train_split(source, split, "fact questions")
    images: list[tuple[str, ImageRef, dict[str, str], bytes | None]] = []
    for sha, found in sorted(collect_image_facts(dataset, split).items()):
        images.append((sha, found.ref, _labels(found.body_part, found.modality), None))
    n_dataset = len(images)
    for sample, data in dicom_caption_samples(dicom_files):
        ref = sample.images[0]
        images.append(
            (ref.sha256 or sample.id, ref, _labels(sample.meta.body_part, sample.meta.modality), data)
        )
    values: dict[str, list[str]] = {}
    for _, _, facts, _ in images:
        for kind, value in facts.items():
            if value not in values.setdefault(kind, []):
                values[kind].append(value)
    for known in values.values():
        known.sort()
    questions = 0
    with DatasetWriter(
        out,
        name=f"{dataset.name}-fact-questions",
        license=dataset.manifest.license,
        source=f"fact questions about the images of {dataset.name} ({split} split) and package DICOM files",
        description="Balanced yes/no questions on each image's organ and modality labels (rules).",
    ) as writer:
        for key, ref, facts, data in images:
            rng = random.Random(f"{seed}:{key}")
            image = data if data is not None else dataset.image_bytes(ref)
            for k, (kind, question, answer) in enumerate(fact_questions(facts, values, rng)):
                meta = Meta(
                    modality=facts.get("modality"),
                    body_part=facts.get("body_part"),
                    split="train",
                    source=dataset.name if data is None else "dicom-header",
                    license=dataset.manifest.license if data is None else None,
                    question_type=kind.upper(),
                    answer_type="closed",
                )
                sid = f"{key[:16]}-fact-{k}"
                if not writer.has(sid):
                    writer.add(_question_sample(sid, ref, question, answer, meta), [image])
                    questions += 1
    return FactQuestionReport(n_dataset, questions, len(images) - n_dataset, Path(out))
