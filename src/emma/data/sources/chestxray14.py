"""NIH ChestX-ray14 (Wang et al., CVPR 2017): 112,120 frontal chest X-rays of 30,805 patients with 14
findings mined from their reports.

Official release layout (``src``)::

    Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv)[.gz]
                         Image Index, Finding Labels ("|"-separated, or "No Finding"), Follow-up #,
                         Patient ID, Patient Age, Patient Gender, View Position, ...
    train_val_list.txt   the official train/validation images (one file name a line)
    test_list.txt        the official test images (patient-disjoint from train_val)
    images/<Image Index>             (the release's images_*.tar.gz unpacked into one folder)
    images_<NNN>/images/<Image Index>  (the same, one folder per archive, as mirrored on Kaggle)

License: the NIH Clinical Center releases the data for unrestricted use, asking for attribution and a
citation (``"NIH-unrestricted"``); EMMA redistributes nothing.

Splits. ``test_list.txt`` → ``test``; ``train_val_list.txt`` → ``train``, except 10 % of its patients
(by :func:`~._cxr.patient_split`) → ``validation`` (the release defines no validation set). An image in
neither list is left out (``not_in_official_lists``). Without the two lists every patient is split
70/10/20 (train/validation/test) by the same hash, and the report says so.

Mapping: ``id`` = ``Image Index`` without its extension; ``gold.labels`` over :data:`FINDINGS` (the
release's label names, e.g. ``Pleural_Thickening``; ``No Finding`` = all 0); a label outside the 14
makes the row invalid. ``meta.extra``: ``view`` (``frontal``: every image is PA or AP),
``projection`` (``View Position``), ``follow_up``. ``patient_key``: pseudonym of ``Patient ID``;
``study_key``: of ``Patient ID`` + ``Follow-up #``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Unpack

from emma.data.sources import _cxr
from emma.data.sources._common import INVALID_RECORD, clean_text, source_folder, source_ref
from emma.data.sources._importer import DatasetInfo, ImportKwargs, ImportReport, ImportRun, import_records
from emma.errors import DataFormatError

NAME = "chestxray14"
LICENSE = "NIH-unrestricted"
INFO = DatasetInfo(NAME, LICENSE, "ChestX-ray14 (Wang et al., CVPR 2017)")
TABLES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
REQUIRED = ("Image Index", "Finding Labels", "Patient ID", "View Position")
NO_FINDING = "No Finding"
NOT_LISTED = "not_in_official_lists"
FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
VALIDATION_SPLIT: tuple[tuple[str, float], ...] = (("train", 0.9), ("validation", 0.1))
FALLBACK_SPLIT: tuple[tuple[str, float], ...] = (("train", 0.7), ("validation", 0.1), ("test", 0.2))


def parse_findings(value: str) -> list[str] | None:
    """``Finding Labels`` as a list of the 14 findings (``[]`` for No Finding); ``None`` if a label is
    unknown or the cell is empty."""
    labels = [" ".join(x.split()) for x in value.split("|")]
    labels = [x for x in labels if x]
    if not labels:
        return None
    if labels == [NO_FINDING]:
        return []
    if any(x not in FINDINGS for x in labels):
        return None
    return [f for f in FINDINGS if f in labels]


def read_list(path: Path) -> set[str]:
    try:
        return {line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()}
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: unreadable image list ({type(exc).__name__})") from None


def image_dirs(src: Path) -> list[Path]:
    """``images/`` and every ``images_*/images/`` folder, in name order."""
    dirs = [src / "images"] if (src / "images").is_dir() else []
    dirs += sorted(p / "images" for p in src.glob("images_*") if (p / "images").is_dir())
    return dirs


def import_chestxray14(src: Path, out: Path, **options: Unpack[ImportKwargs]) -> ImportReport:
    """Import ChestX-ray14 from its release folder ``src`` (Data_Entry CSV, lists, images) into ``out``."""
    src, out = Path(src), Path(out)
    table = _cxr.find_table(source_folder(src, NAME), TABLES)
    if table is None:
        raise DataFormatError(f"{NAME}: missing {' or '.join(TABLES)} in {src}")
    dirs = image_dirs(src)
    if not dirs:
        raise DataFormatError(f"{NAME}: no images/ (or images_*/images/) folder in {src}")
    have_lists = (src / TRAIN_VAL_LIST).is_file() and (src / TEST_LIST).is_file()
    train_val = read_list(src / TRAIN_VAL_LIST) if have_lists else set()
    test = read_list(src / TEST_LIST) if have_lists else set()

    def add_record(run: ImportRun, row: dict[str, str]) -> None:
        name = clean_text(row["Image Index"])
        patient = clean_text(row["Patient ID"])
        findings = parse_findings(row["Finding Labels"])
        rel_name = _cxr.safe_relpath(name)
        if findings is None or not patient or rel_name is None or len(rel_name.parts) != 1:
            run.skip(INVALID_RECORD)
            return
        if not have_lists:
            split = _cxr.patient_split(NAME, patient, FALLBACK_SPLIT)
        elif name in test:
            split = "test"
        elif name in train_val:
            split = _cxr.patient_split(NAME, patient, VALIDATION_SPLIT)
        else:
            run.filter(NOT_LISTED)
            return
        folder = next((d for d in dirs if (d / name).is_file()), dirs[0])
        rel = (folder / name).relative_to(src).as_posix()
        follow_up = clean_text(row.get("Follow-up #")) or "0"
        sample = _cxr.finding_sample(
            dataset=NAME,
            license=LICENSE,
            sid=name.rsplit(".", 1)[0],
            image=source_ref(NAME, rel),
            labels={f: int(f in findings) for f in FINDINGS},
            positives=findings,
            split=split,
            patient=patient,
            study=f"{patient}/{follow_up}",
            view=_cxr.FRONTAL,
            projection=clean_text(row["View Position"]) or None,
            extra={"follow_up": follow_up},
        )
        _cxr.add_image_sample(run, sample, NAME, folder / name, rel)

    rows = (row for _, row in _cxr.iter_table(table, REQUIRED))
    report = import_records(INFO, src, out, options, rows, add_record)
    if have_lists:
        report.notes.append(
            "official test list kept; 10% of train_val patients (by a hash of Patient ID) form validation"
        )
    else:
        report.notes.append(
            f"{TRAIN_VAL_LIST} / {TEST_LIST} not found: patients split 70/10/20 by a hash of Patient ID"
        )
    return report
