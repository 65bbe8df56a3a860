"""Shared plumbing of the chest X-ray classification importers (CheXpert, PadChest, ChestX-ray14).

Each of them writes one ``classification`` sample per image:

- ``gold.labels``: ``{finding: 1 | 0}`` in the dataset's own label names, every finding of the
  dataset's label set whose value is known (after CheXpert's uncertainty policy, see
  :mod:`.chexpert`); ``meta.findings``: the positive findings;
- one user turn (:data:`FINDINGS_INSTRUCTION`, with the image) and one assistant turn listing the
  positive findings (``"Cardiomegaly, pleural effusion."``, ``"No finding."``), also ``gold.answer``;
- ``meta.patient_key`` / ``meta.study_key``: pseudonymous keys (:func:`pseudonym`: a SHA-256 of the
  dataset name and the dataset's own identifier, never the identifier itself), used by the leakage
  check (``emma data check``); ``meta.extra["view"]`` (``frontal`` / ``lateral`` / ``None``) and
  ``meta.extra["projection"]`` (the dataset's projection code).

Splits are by patient: a dataset's official split where it has one, otherwise
:func:`patient_split`, a deterministic function of the patient identifier, so that every image of a
patient lands in the same split.

High bit depth images (PadChest's 16-bit PNGs) go through EMMA's one preprocessing path
(:func:`emma.io.raster.raster_images`: a percentile window, never ``>> 8``) once at import, and are
stored as 8-bit PNGs whose provenance records the window; 8-bit files are stored as they are.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from emma.data.schema import Gold, ImageRef, Meta, Sample, TaskType
from emma.data.sources._common import CORRUPT_IMAGE, IMAGE_TOO_LARGE, MISSING_IMAGE, qa_turns, source_ref
from emma.data.sources._importer import ImportRun
from emma.errors import CorruptFileError, DataFormatError, ImageTooLargeError

FINDINGS_INSTRUCTION = "Which findings does this chest X-ray show?"
NO_FINDING_ANSWER = "No finding."
FRONTAL = "frontal"
LATERAL = "lateral"
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def pseudonym(dataset: str, value: str) -> str:
    """A pseudonymous key for a dataset's patient or study identifier (16 hex digits of SHA-256)."""
    return hashlib.sha256(f"{dataset}:{value}".encode()).hexdigest()[:16]


def patient_split(dataset: str, patient: str, fractions: Sequence[tuple[str, float]]) -> str:
    """The split of every image of ``patient``: a uniform hash of the identifier placed on ``fractions``
    (``(split, share)`` pairs in order, shares summing to 1). Deterministic, independent of row order."""
    digest = hashlib.sha256(f"{dataset}-split:{patient}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split, share in fractions:
        edge += share
        if u < edge:
            return split
    return fractions[-1][0]


def display_name(finding: str) -> str:
    """A finding label as words: ``Pleural_Thickening`` → ``pleural thickening``."""
    return " ".join(finding.replace("_", " ").split()).lower()


def findings_answer(positives: Sequence[str], uncertain: Sequence[str] = ()) -> str:
    """The assistant text: the positive findings, then any uncertain ones, or ``No finding.``."""
    if positives:
        text = ", ".join(display_name(f) for f in positives)
        text = text[0].upper() + text[1:] + "."
    else:
        text = NO_FINDING_ANSWER
    if uncertain:
        text += " Uncertain: " + ", ".join(display_name(f) for f in uncertain) + "."
    return text


def finding_sample(
    *,
    dataset: str,
    license: str,
    sid: str,
    image: ImageRef,
    labels: dict[str, int],
    positives: Sequence[str],
    split: str,
    patient: str,
    study: str,
    view: str | None,
    projection: str | None,
    uncertain: Sequence[str] = (),
    extra: dict[str, object] | None = None,
) -> Sample:
    """One image's classification sample (see the module docstring)."""
    answer = findings_answer(positives, uncertain)
    return Sample(
        id=sid,
        task=TaskType.CLASSIFICATION,
        images=[image],
        turns=qa_turns(FINDINGS_INSTRUCTION, answer),
        gold=Gold(answer=answer, labels=dict(labels)),
        meta=Meta(
            modality="xray",
            body_part="chest",
            findings=list(positives),
            split=split,
            source=dataset,
            license=license,
            patient_key=pseudonym(dataset, patient),
            study_key=pseudonym(dataset, study),
            extra={"view": view, "projection": projection, **(extra or {})},
        ),
    )


def safe_relpath(value: str) -> PurePosixPath | None:
    """A relative path inside the release (``None`` for absolute paths, ``..`` or an empty value)."""
    rel = PurePosixPath(value.strip().replace("\\", "/"))
    if not value.strip() or rel.is_absolute() or ".." in rel.parts or not rel.parts:
        return None
    return rel


# ------------------------------------------------------------------------------------------ tables


def find_table(src: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` (each also tried with ``.gz``) that exists in ``src``."""
    for name in names:
        for candidate in (src / name, src / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def iter_table(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV (plain or gzip) as ``(line number, {column: value})``, streamed; only the header's
    named columns are kept. Raises DataFormatError naming the file for a missing column or bad data."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataFormatError(f"{path}: missing column(s) {', '.join(missing)}")
            named = [(i, h) for i, h in enumerate(header) if h]
            for row in reader:
                if not row:
                    continue
                yield reader.line_num, {h: (row[i] if i < len(row) else "") for i, h in named}
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataFormatError(f"{path}: unreadable table ({type(exc).__name__})") from None


# ------------------------------------------------------------------------------------------ images


def prepare_image(run: ImportRun, dataset: str, path: Path, rel: str) -> tuple[ImageRef, Path | bytes] | str:
    """The image ref and what the store reads for one source image, or the reason it is skipped.

    8-bit files are passed as they are (the store checks them); high bit depth grayscale is windowed to
    8 bits through :func:`emma.io.raster.raster_images` and passed as PNG bytes with its provenance.
    """
    if not path.is_file():
        return MISSING_IMAGE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                mode = im.mode
    except (UnidentifiedImageError, SyntaxError, ValueError, OSError, Image.DecompressionBombError):
        mode = ""  # the store's own check reports it (corrupt or too large)
    if mode not in _HIGH_DEPTH_MODES:
        return source_ref(dataset, rel), path
    from emma.data.store import encode_png
    from emma.io.raster import raster_images

    try:
        run.limits.check_file(path)
        images = raster_images(path, limits=run.limits, source=f"{dataset}:{rel}")
    except ImageTooLargeError:
        return IMAGE_TOO_LARGE
    except CorruptFileError:
        return CORRUPT_IMAGE
    if len(images) != 1:
        return CORRUPT_IMAGE
    return ImageRef(path=rel, provenance=images[0].provenance), encode_png(images[0].to_pil())


def add_image_sample(run: ImportRun, sample: Sample, dataset: str, path: Path, rel: str) -> None:
    """Prepare the sample's one image (:func:`prepare_image`) and write the sample, or count the skip."""
    if run.resume and run.writer.has(sample.id):
        run.add(sample, [path], image_keys=[rel])  # counted as resumed; the image is not read again
        return
    prepared = prepare_image(run, dataset, path, rel)
    if isinstance(prepared, str):
        run.skip(prepared)
        return
    ref, image = prepared
    run.add(sample.model_copy(update={"images": [ref]}), [image], image_keys=[rel])
