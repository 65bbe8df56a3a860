"""PadChest (Bustos et al., Medical Image Analysis 2020): 160k chest X-rays of 67k patients, Spanish
reports labelled with 174 radiographic findings, 19 differential diagnoses and 104 locations.

Official release layout (``src``)::

    PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz]
                  ImageID, ImageDir, StudyID, PatientID, Projection, MethodLabel, Labels, ...
    <ImageDir>/<ImageID>     the images, in the numbered folders of the release's zip files (0 ... 54)

Images may also sit directly in ``src/`` or in ``src/images/`` (all zips unpacked into one folder).
PadChest's PNGs are 16-bit: they are windowed to 8 bits once at import through EMMA's preprocessing
path (a percentile window, recorded in each image's provenance).

License: CC BY-SA 4.0 (``"CC-BY-SA-4.0"``); EMMA redistributes nothing.

Labels. ``Labels`` is a Python-literal list of label strings (``"['pleural effusion', 'cardiomegaly']"``);
entries are stripped and empty ones dropped. A row whose list is missing, unreadable or empty is
skipped (``invalid_record``); an image labelled ``exclude`` (the authors' exclusion) is left out
(``excluded``). ``gold.labels`` = 1 for every label of the image, and 0 for each of
:data:`FREQUENT_FINDINGS` the image does not have; ``meta.findings`` = the labels except
:data:`NON_FINDINGS` (``normal``, ``unchanged``, ...). ``MethodLabel`` (``Physician`` for the 27% of
images labelled by radiologists, ``RNN_model`` for the rest) is kept in ``meta.extra["label_method"]``.

Splits. PadChest has no official split: by patient with :func:`~._cxr.patient_split`, 80 % train,
10 % validation, 10 % test (every image of a patient in one split).

Mapping: ``id`` = ``ImageID`` without its extension; ``meta.extra``: ``view`` (``frontal`` for PA, AP
and AP_horizontal; ``lateral`` for L; else ``None``), ``projection`` (``Projection``), ``label_method``,
``image_dir``. ``patient_key`` / ``study_key``: pseudonyms of ``PatientID`` / ``StudyID``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Unpack

from emma.data.sources import _cxr
from emma.data.sources._common import INVALID_RECORD, clean_text, source_folder, source_ref
from emma.data.sources._importer import DatasetInfo, ImportKwargs, ImportReport, ImportRun, import_records
from emma.errors import DataFormatError

NAME = "padchest"
LICENSE = "CC-BY-SA-4.0"
INFO = DatasetInfo(NAME, LICENSE, "PadChest (Bustos et al., Medical Image Analysis 2020)")
LABELS_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
REQUIRED = ("ImageID", "ImageDir", "StudyID", "PatientID", "Projection", "MethodLabel", "Labels")
SPLITS: tuple[tuple[str, float], ...] = (("train", 0.8), ("validation", 0.1), ("test", 0.1))
EXCLUDED = "excluded"
#: Labels that name no radiographic finding (left out of ``meta.findings`` and of the finding set).
NON_FINDINGS = frozenset({"normal", "unchanged", "exclude", "suboptimal study"})
#: PadChest's differential-diagnosis labels (its taxonomy's second group) that occur among its frequent
#: labels: not radiographic findings.
DIAGNOSES = frozenset(
    {
        "COPD signs",
        "pneumonia",
        "heart insufficiency",
        "emphysema",
        "tuberculosis",
        "pulmonary fibrosis",
        "lung metastasis",
    }
)
#: The 12 most frequent radiographic findings among the 39,053 physician-labelled images (counted per
#: image over every projection, leaving out NON_FINDINGS and DIAGNOSES), most frequent first.
FREQUENT_FINDINGS: tuple[str, ...] = (
    "chronic changes",
    "cardiomegaly",
    "aortic elongation",
    "scoliosis",
    "vertebral degenerative changes",
    "air trapping",
    "interstitial pattern",
    "pleural effusion",
    "costophrenic angle blunting",
    "aortic atheromatosis",
    "apical pleural thickening",
    "kyphosis",
)
_VIEWS = {"PA": _cxr.FRONTAL, "AP": _cxr.FRONTAL, "AP_HORIZONTAL": _cxr.FRONTAL, "L": _cxr.LATERAL}


def parse_labels(value: str) -> list[str] | None:
    """The ``Labels`` cell as a list of stripped, non-empty labels (order kept, duplicates dropped);
    ``None`` when it is not a Python-literal list of strings."""
    text = value.strip()
    if not text.startswith("["):
        return None
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
        return None
    out: list[str] = []
    for label in parsed:
        label = " ".join(label.split())
        if label and label not in out:
            out.append(label)
    return out


def image_path(src: Path, image_dir: str, image_id: str) -> tuple[Path, str] | None:
    """Where an image is: ``<ImageDir>/<ImageID>``, else ``images/<ImageID>``, else ``<ImageID>``."""
    rel_id = _cxr.safe_relpath(image_id)
    if rel_id is None or len(rel_id.parts) != 1:
        return None
    candidates = []
    if image_dir.isdigit():
        candidates.append(f"{int(image_dir)}/{image_id}")
    candidates += [f"images/{image_id}", image_id]
    for rel in candidates:
        if (src / rel).is_file():
            return src / rel, rel
    return src / candidates[0], candidates[0]  # missing: counted as such


def import_padchest(src: Path, out: Path, **options: Unpack[ImportKwargs]) -> ImportReport:
    """Import PadChest from its release folder ``src`` (labels CSV + image folders) into ``out``."""
    src, out = Path(src), Path(out)
    table = _cxr.find_table(source_folder(src, NAME), [LABELS_CSV])
    if table is None:
        raise DataFormatError(f"{NAME}: missing {LABELS_CSV}[.gz] in {src}")

    def add_record(run: ImportRun, row: dict[str, str]) -> None:
        image_id = clean_text(row["ImageID"])
        patient = clean_text(row["PatientID"])
        study = clean_text(row["StudyID"])
        labels = parse_labels(row["Labels"])
        located = image_path(src, clean_text(row["ImageDir"]), image_id) if image_id else None
        if not labels or located is None or not patient or not study:
            run.skip(INVALID_RECORD)
            return
        if "exclude" in labels:
            run.filter(EXCLUDED)
            return
        path, rel = located
        gold = {label: 1 for label in labels} | {f: 0 for f in FREQUENT_FINDINGS if f not in labels}
        projection = clean_text(row["Projection"]) or None
        sample = _cxr.finding_sample(
            dataset=NAME,
            license=LICENSE,
            sid=image_id.rsplit(".", 1)[0],
            image=source_ref(NAME, rel),
            labels=gold,
            positives=[label for label in labels if label not in NON_FINDINGS],
            split=_cxr.patient_split(NAME, patient, SPLITS),
            patient=patient,
            study=study,
            view=_VIEWS.get((projection or "").upper()),
            projection=projection,
            extra={
                "label_method": clean_text(row["MethodLabel"]) or None,
                "image_dir": clean_text(row["ImageDir"]) or None,
            },
        )
        _cxr.add_image_sample(run, sample, NAME, path, rel)

    rows = (row for _, row in _cxr.iter_table(table, REQUIRED))
    report = import_records(INFO, src, out, options, rows, add_record)
    report.notes.append(
        "no official split: patients split 80/10/10 (train/validation/test) by a hash of PatientID"
    )
    return report
