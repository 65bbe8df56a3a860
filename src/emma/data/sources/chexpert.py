"""CheXpert (Irvin et al., AAAI 2019): chest radiographs with 14 report-derived observations.

Official release layout (``src``: the ``CheXpert-v1.0-small`` or ``CheXpert-v1.0`` folder)::

    train.csv            Path, Sex, Age, Frontal/Lateral, AP/PA, then the 14 observations
    valid.csv            the same columns: 234 studies labelled by radiologists (no uncertain labels)
    train/patient<N>/study<M>/view<K>_<frontal|lateral>.jpg
    valid/patient<N>/study<M>/view<K>_<frontal|lateral>.jpg

``Path`` values start with the release folder's name (``CheXpert-v1.0-small/train/...``); that first
component is dropped and the rest is read relative to ``src`` (a path without it is read as it is).

License: Stanford University CheXpert Dataset Research Use Agreement (``"CheXpert-RUA"``); EMMA
redistributes nothing.

Splits (official, patient-disjoint): ``train.csv`` → ``train``, ``valid.csv`` → ``validation`` (the set
papers report on; the hidden test set is not part of the release).

Labels. Each observation is ``1.0`` (positive), ``0.0`` (negative), ``-1.0`` (uncertain) or blank (not
mentioned in the report). Blank → 0, as the CheXpert labeler defines it (not mentioned = not found).
Uncertain labels follow the ``uncertainty`` policy of the CheXpert paper:

- ``u-ignore`` (default): the observation is left out of ``gold.labels`` for that image (unknown);
  the assistant text lists it after ``Uncertain:``;
- ``u-zeros``: uncertain → 0;
- ``u-ones``: uncertain → 1.

Mapping to :class:`~emma.data.schema.Sample` (see :mod:`._cxr`): one ``classification`` sample per
image; ``id`` = the image path without the release folder and extension
(``train/patient00001/study1/view1_frontal``); ``gold.labels`` over :data:`OBSERVATIONS`;
``meta.extra``: ``view`` (``Frontal/Lateral``), ``projection`` (``AP/PA``; blank for laterals),
``raw_labels`` (``{observation: 1 | 0 | -1 | None}`` as in the CSV), ``uncertain`` (the uncertain
observations) and ``uncertainty_policy``. ``patient_key`` / ``study_key`` are pseudonyms of the
``patient<N>`` and ``patient<N>/study<M>`` path components.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Unpack

from emma.data.sources import _cxr
from emma.data.sources._common import INVALID_RECORD, clean_text, source_folder, source_ref
from emma.data.sources._importer import DatasetInfo, ImportKwargs, ImportReport, ImportRun, import_records
from emma.errors import DataFormatError
from emma.text.labeler import CHEXPERT_FINDINGS

NAME = "chexpert"
LICENSE = "CheXpert-RUA"
INFO = DatasetInfo(NAME, LICENSE, "CheXpert (Irvin et al., AAAI 2019)")
OBSERVATIONS: tuple[str, ...] = CHEXPERT_FINDINGS  # the 14 observations, in the CSV's column order
#: The five observations of the CheXpert competition (the paper's evaluation set).
COMPETITION: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
SPLIT_FILES: tuple[tuple[str, str], ...] = (("train.csv", "train"), ("valid.csv", "validation"))
REQUIRED = ("Path", "Frontal/Lateral", *OBSERVATIONS)

UncertaintyPolicy = Literal["u-ignore", "u-zeros", "u-ones"]
POLICIES: tuple[str, ...] = ("u-ignore", "u-zeros", "u-ones")


def check_policy(policy: str) -> UncertaintyPolicy:
    key = policy.strip().lower().replace("_", "-")
    if key not in POLICIES:
        raise DataFormatError(f"{NAME}: unknown uncertainty policy {policy!r} (known: {', '.join(POLICIES)})")
    return key  # type: ignore[return-value]


def raw_label(value: str) -> int | None | str:
    """A CSV cell as 1 / 0 / -1, ``None`` for blank, or the text itself when it is none of these."""
    text = value.strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    if number in (1.0, 0.0, -1.0):
        return int(number)
    return text


def apply_policy(raw: dict[str, int | None], policy: UncertaintyPolicy) -> tuple[dict[str, int], list[str]]:
    """``gold.labels`` under ``policy`` (blank → 0), and the uncertain observations."""
    labels: dict[str, int] = {}
    uncertain: list[str] = []
    for name, value in raw.items():
        if value == -1:
            uncertain.append(name)
            if policy == "u-zeros":
                labels[name] = 0
            elif policy == "u-ones":
                labels[name] = 1
        else:
            labels[name] = 1 if value == 1 else 0
    return labels, uncertain


def release_relpath(path: str) -> str | None:
    """The image path inside ``src``: the CSV's ``Path`` without the release folder component."""
    rel = _cxr.safe_relpath(path)
    if rel is None:
        return None
    parts = rel.parts
    if len(parts) > 1 and parts[0].lower().startswith("chexpert-v1.0"):
        parts = parts[1:]
    return "/".join(parts)


def import_chexpert(
    src: Path, out: Path, *, uncertainty: str = "u-ignore", **options: Unpack[ImportKwargs]
) -> ImportReport:
    """Import CheXpert from its release folder ``src`` (``train.csv``, ``valid.csv``, images) into ``out``."""
    src, out = Path(src), Path(out)
    policy = check_policy(uncertainty)
    source_folder(src, NAME)
    tables = [
        (path, split) for name, split in SPLIT_FILES if (path := _cxr.find_table(src, [name])) is not None
    ]
    if not tables:
        raise DataFormatError(f"{NAME}: neither train.csv nor valid.csv in {src}")
    n_uncertain = 0

    def add_record(run: ImportRun, record: tuple[str, dict[str, str]]) -> None:
        nonlocal n_uncertain
        split, row = record
        rel = release_relpath(row["Path"])
        raw = {name: raw_label(row[name]) for name in OBSERVATIONS}
        parts = rel.split("/") if rel else []
        if rel is None or len(parts) < 3 or any(isinstance(v, str) for v in raw.values()):
            run.skip(INVALID_RECORD)
            return
        values: dict[str, int | None] = {k: v for k, v in raw.items() if not isinstance(v, str)}
        labels, uncertain = apply_policy(values, policy)
        n_uncertain += bool(uncertain)
        positives = [f for f in OBSERVATIONS if labels.get(f) == 1 and f != "No Finding"]
        view_text = clean_text(row.get("Frontal/Lateral")).lower()
        sample = _cxr.finding_sample(
            dataset=NAME,
            license=LICENSE,
            sid=rel.rsplit(".", 1)[0],
            image=source_ref(NAME, rel),
            labels=labels,
            positives=positives,
            split=split,
            patient=parts[-3],
            study=f"{parts[-3]}/{parts[-2]}",
            view=_cxr.FRONTAL if view_text == "frontal" else _cxr.LATERAL if view_text == "lateral" else None,
            projection=clean_text(row.get("AP/PA")) or None,
            uncertain=uncertain if policy == "u-ignore" else (),
            extra={"raw_labels": values, "uncertain": uncertain, "uncertainty_policy": policy},
        )
        _cxr.add_image_sample(run, sample, NAME, src / rel, rel)

    rows = ((split, row) for path, split in tables for _, row in _cxr.iter_table(path, REQUIRED))
    report = import_records(INFO, src, out, options, rows, add_record)
    report.notes.append(f"uncertainty policy {policy}; blank labels (not mentioned) read as 0")
    if n_uncertain:
        report.notes.append(f"{n_uncertain} image(s) have at least one uncertain (-1) label")
    return report
