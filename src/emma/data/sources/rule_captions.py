"""Image–caption pairs built by rules from what a dataset already says (no teacher, no labelling).

For the alignment stage of a recipe that trains a vision tower from scratch (emma-tiny): every image of
a VQA dataset's *train* split gets one caption assembled from

- its body part / organ label and modality when the dataset records them (``meta``), and
- each train question–answer pair about it turned into a statement ("Is there a fracture?" + "no" →
  "There is no fracture."; "What organ is shown?" + "brain" → "What organ is shown: brain.").

Images of DICOM files (for example those carried by ``pydicom``'s and ``pydicom-data``'s test files) get a
caption from their header (Modality, BodyPartExamined) through :func:`dicom_caption_samples`.

The test split is never read: :func:`build_rule_captions` refuses it, so a caption cannot carry a test
answer. Statements keep the dataset's own words; the rules only change the sentence's form.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from emma.data.schema import ImageRef, Meta, Sample, TaskType
from emma.data.sources._common import qa_turns
from emma.data.store import Dataset, DatasetWriter, open_dataset
from emma.errors import InputError

__all__ = [
    "CAPTION_PROMPTS",
    "MODALITY_WORDS",
    "modality_stated",
    "CaptionBuildReport",
    "ImageFacts",
    "build_rule_captions",
    "collect_image_facts",
    "dicom_caption_samples",
    "open_train_split",
    "package_dicom_files",
    "qa_statement",
]

CAPTION_PROMPTS = (
    "Describe this image.",
    "What does this image show?",
    "Give a short description of this medical image.",
)
MODALITY_WORDS = {
    "ct": "CT",
    "mr": "MRI",
    "mri": "MRI",
    "xray": "X-ray",
    "x-ray": "X-ray",
    "cr": "X-ray",
    "dx": "X-ray",
    "us": "ultrasound",
    "ultrasound": "ultrasound",
    "pathology": "pathology",
    "fundus": "fundus",
    "mg": "mammography",
    "xa": "angiography",
    "pt": "PET",
    "nm": "nuclear medicine",
}
# What a question or answer says about the modality, by pattern (lower-cased text).
_MODALITY_PATTERNS = {
    "CT": re.compile(r"\bct\b|computed tomograph"),
    "MRI": re.compile(
        r"\bmri?\b|\bflair\b|\bt[12]\b|\bt[12][- ]weighted|\bdwi\b|diffusion[- ]weighted|\badc\b"
    ),
    "X-ray": re.compile(r"\bx-?\s?rays?\b|\bradiograph|\bcxr\b|plain film"),
    "ultrasound": re.compile(r"ultrasound|sonogra"),
}
# "Is this (a|an) CT ...", "Was this image taken with ...": a yes/no question about this image itself
_ABOUT_THIS = re.compile(r"^(?:is|was) (?:this|it|the image|this image|this study|this film|this scan)\b")
# An open question that asks for the modality
_ASKS_MODALITY = re.compile(
    r"modality|type of (?:image|imaging|scan|study)|kind of (?:image|imaging|scan)|taken with|what imaging"
)
_YES = {"yes", "y", "true"}
_NO = {"no", "n", "false"}
# "Is there X" / "Are there X" → "There is/are (no) X"
_THERE = re.compile(r"^(is|are) there (?P<rest>.+)$", re.IGNORECASE)
# "Is this (image) X" → "This (image) is (not) X"
_THIS = re.compile(r"^is (?P<subj>this(?: image| film| scan| study)?|it) (?P<rest>.+)$", re.IGNORECASE)
# "Is/Are the X Y" (copula) → "The X is/are (not) Y"
_COPULA = re.compile(
    r"^(?P<verb>is|are) (?P<subj>the [a-z0-9' -]+?) (?P<rest>(?:normal|abnormal|enlarged|present|visible|seen|located|in|on|at|of|to|larger|smaller|more|less|dilated|displaced|[a-z]+ed)\b.*)$",
    re.IGNORECASE,
)


def _one_modality(text: str) -> str | None:
    found = [name for name, pattern in _MODALITY_PATTERNS.items() if pattern.search(text)]
    return found[0] if len(found) == 1 else None


def modality_stated(question: str, answer: str) -> str | None:
    """The modality a question–answer pair states about its image, or None: "Is this a CT scan?" + "yes"
    → "CT"; "What imaging modality was used?" + "MR - FLAIR" → "MRI". Only a single, unambiguous modality
    counts ("Is this a CT or an MRI?" + "yes" says nothing; a "no" never names one)."""
    q, a = " ".join(question.lower().split()), " ".join(answer.lower().split()).rstrip(".")
    if a in _YES:
        return _one_modality(q) if _ABOUT_THIS.match(q) and " or " not in q else None
    if a in _NO:
        return None
    return _one_modality(a) if _ASKS_MODALITY.search(q) else None


def _clean(text: str) -> str:
    return " ".join(text.strip().rstrip("?.! ").split())


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def qa_statement(question: str, answer: str) -> str:
    """One statement saying what a question–answer pair says (rules for yes/no forms, else "Q: A.")."""
    q = _clean(question)
    a = " ".join(answer.strip().split())
    low = a.lower().rstrip(".")
    if low in _YES or low in _NO:
        positive = low in _YES
        if m := _THERE.match(q):
            verb = m.group(1).lower()
            # "no a fracture" / "no any nodules" → "no fracture" / "no nodules"; "any" also goes when positive
            rest = re.sub(
                r"^any\s+" if positive else r"^(?:a|an|any)\s+", "", m.group("rest"), flags=re.IGNORECASE
            )
            return _sentence(f"there {verb} {'' if positive else 'no '}{rest}")
        if m := _THIS.match(q):
            return _sentence(f"{m.group('subj').lower()} is {'' if positive else 'not '}{m.group('rest')}")
        if m := _COPULA.match(q):
            verb = m.group("verb").lower()
            return _sentence(f"{m.group('subj')} {verb} {'' if positive else 'not '}{m.group('rest')}")
        return _sentence(f"{q}? {'Yes' if positive else 'No'}")
    return _sentence(f"{q}: {a}")


@dataclass
class ImageFacts:
    """What a dataset says about one image: its labels and its train QA pairs as statements."""

    ref: ImageRef
    body_part: str | None = None
    modality: str | None = None
    statements: list[str] = field(default_factory=list)
    source_ids: list[str] = field(default_factory=list)
    stated_modalities: set[str] = field(default_factory=set)  # what train QA pairs say (modality_stated)


@dataclass(frozen=True)
class CaptionBuildReport:
    images: int
    statements: int
    dicom_images: int
    out: Path


def _answer(sample: Sample) -> str | None:
    if sample.gold.answer is not None:
        return sample.gold.answer
    for turn in sample.turns:
        if turn.role == "assistant":
            return turn.content
    return None


def _question(sample: Sample) -> str | None:
    for turn in sample.turns:
        if turn.role == "user":
            return turn.content
    return None


def collect_image_facts(dataset: Dataset, split: str) -> dict[str, ImageFacts]:
    """Per image (by content hash) of ``split``'s single-image VQA samples: its labels and statements."""
    by_image: dict[str, ImageFacts] = {}
    for sample in dataset.iter_samples(split):
        if len(sample.images) != 1 or sample.task not in (TaskType.CLOSED_VQA, TaskType.OPEN_VQA):
            continue
        ref = sample.images[0]
        question, answer = _question(sample), _answer(sample)
        if question is None or answer is None or ref.sha256 is None:
            continue
        facts = by_image.setdefault(ref.sha256, ImageFacts(ref=ref))
        facts.body_part = facts.body_part or sample.meta.body_part
        facts.modality = facts.modality or sample.meta.modality
        stated = modality_stated(question, answer)
        if stated is not None and not sample.meta.modality:
            facts.stated_modalities.add(stated)
        statement = qa_statement(question, answer)
        if statement not in facts.statements:
            facts.statements.append(statement)
            facts.source_ids.append(sample.id)
    for facts in by_image.values():  # a modality the QA pairs state, when the labels give none
        if facts.modality is None and len(facts.stated_modalities) == 1:
            facts.modality = next(iter(facts.stated_modalities))
    return by_image


def _header(facts: ImageFacts) -> str:
    modality = MODALITY_WORDS.get((facts.modality or "").lower(), facts.modality)
    part = facts.body_part
    if modality and part:
        return _sentence(f"{modality} image of the {part}")
    if part:
        return f"Medical image of the {part}."
    if modality:
        return _sentence(f"{modality} image")
    return ""


def _caption_sample(sample_id: str, ref: ImageRef, caption: str, prompt: str, meta: Meta) -> Sample:
    return Sample(
        id=sample_id,
        task=TaskType.CAPTION,
        images=[ref],
        turns=qa_turns(prompt, caption),
        meta=meta,
    )


def dicom_caption_samples(files: Iterable[Path]) -> Iterator[tuple[Sample, bytes]]:
    """(caption sample, PNG bytes) for each readable single-image DICOM file with a Modality in its
    header; the caption says modality and body part (e.g. "CT image of the head."). Unreadable,
    multi-frame and header-less files are skipped."""
    import pydicom
    import pydicom.errors

    from emma.data.store import encode_png
    from emma.errors import EmmaError
    from emma.io.dicom import quiet_pydicom
    from emma.io.load import load_images

    for path in files:
        try:
            with quiet_pydicom():
                header = pydicom.dcmread(str(path), stop_before_pixels=True)
            modality = str(getattr(header, "Modality", "") or "").strip().lower()
            if modality not in MODALITY_WORDS or int(getattr(header, "NumberOfFrames", 1) or 1) != 1:
                continue
            images = load_images(path)
        except (EmmaError, OSError, ValueError, AttributeError, pydicom.errors.InvalidDicomError):
            continue
        if len(images) != 1:
            continue
        part = str(getattr(header, "BodyPartExamined", "") or "").strip().lower() or None
        data = encode_png(images[0].to_pil())
        digest = hashlib.sha256(data).hexdigest()
        ref = ImageRef(sha256=digest, provenance=images[0].provenance)
        facts = ImageFacts(ref=ref, body_part=part, modality=modality)
        caption = _header(facts)
        if not caption:
            continue
        sid = "dicom-" + digest[:16]
        meta = Meta(
            modality=MODALITY_WORDS.get(modality, modality),
            body_part=part,
            split="train",
            source="dicom-header",
        )
        yield _caption_sample(sid, ref, caption, CAPTION_PROMPTS[0], meta), data


def package_dicom_files() -> list[Path]:
    """DICOM files that installed packages carry: pydicom's test files and ``pydicom-data``'s
    (``data_store``) when installed. Never downloads."""
    import importlib.util

    roots = []
    for module, sub in (("pydicom.data", "test_files"), ("data_store", "data")):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            roots.append(Path(spec.origin).parent / sub)
    files: list[Path] = []
    for root in roots:
        if root.is_dir():
            files += sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ""))
    return files


def open_train_split(source: str | Path, split: str, what: str) -> Dataset:
    """Open ``source`` for building ``what`` from its ``split``: never the test split."""
    if split.strip().lower() == "test":
        raise InputError(f"{what} are built from a training split only, never from test")
    dataset = open_dataset(source)
    if split not in dataset.splits:
        raise InputError(f"{source} has no split {split!r} (has: {', '.join(dataset.splits)})")
    return dataset


def build_rule_captions(
    source: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    dicom_files: Iterable[Path] = (),
    prompts_per_image: int = 1,
    max_statements: int = 8,
    seed: int = 0,
) -> CaptionBuildReport:
    """Write a caption dataset (split ``train``) for the images of ``source``'s ``split``.

    Each image gets ``prompts_per_image`` samples (different caption prompts, each with at most
    ``max_statements`` of the image's statements in a seeded order, so that captions stay short and
    several samples cover different facts). ``dicom_files`` adds header captions of DICOM files.
    Refuses the test split.
    """
    dataset = open_train_split(source, split, "captions")
    if max_statements < 1:
        raise InputError("max_statements must be >= 1")
    if not 1 <= prompts_per_image <= len(CAPTION_PROMPTS):
        raise InputError(f"prompts_per_image must be 1..{len(CAPTION_PROMPTS)}")
    facts_by_image = collect_image_facts(dataset, split)
    statements = dicom_count = 0
    with DatasetWriter(
        out,
        name=f"{dataset.name}-rule-captions",
        license=dataset.manifest.license,
        source=f"rule captions of {dataset.name} ({split} split)",
        description="Captions assembled by rules from the dataset's own labels and train QA pairs.",
    ) as writer:
        for sha, facts in sorted(facts_by_image.items()):
            rng = random.Random(f"{seed}:{sha}")
            image = dataset.image_bytes(facts.ref)
            meta = Meta(
                modality=facts.modality,
                body_part=facts.body_part,
                split="train",
                source=dataset.name,
                license=dataset.manifest.license,
                extra={"from_samples": facts.source_ids},
            )
            statements += len(facts.statements)
            for k in range(prompts_per_image):
                order = list(facts.statements)
                rng.shuffle(order)
                caption = " ".join(s for s in [_header(facts), *order[:max_statements]] if s)
                writer.add(
                    _caption_sample(f"{sha[:16]}-{k}", facts.ref, caption, CAPTION_PROMPTS[k], meta), [image]
                )
        for sample, data in dicom_caption_samples(dicom_files):
            if not writer.has(sample.id):
                writer.add(sample, [data])
                dicom_count += 1
    return CaptionBuildReport(len(facts_by_image), statements, dicom_count, Path(out))
