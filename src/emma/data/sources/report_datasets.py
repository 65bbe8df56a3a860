"""Importers of chest X-ray report generation benchmarks: IU X-ray and MIMIC-CXR.

Both write a canonical dataset of ``report`` samples (``import_iu_xray`` / ``import_mimic_cxr``, with the
options of every importer: resumable). The gold is the
**FINDINGS** section of the report (the section report-generation benchmarks score); studies without
a findings section are left out and counted (``no_findings``). The impression, when present, is kept
in ``meta.extra["impression"]``. Every image of a study is shown, in the order the release lists them.

**IU X-ray** (Demner-Fushman et al., JAMIA 2016; Open-i), two layouts:

1. The preprocessed release used by most report-generation papers (R2Gen)::

       annotation.json    {"train": [...], "val": [...], "test": [...]}; each record has "id",
                          "report" (the findings text), "image_path" (list, relative to images/)
       images/<id>/0.png, 1.png

   Splits ``train`` / ``val`` → ``validation`` / ``test`` as given.

2. The official Open-i release::

       ecgen-radiology/<n>.xml   one report each: <AbstractText Label="FINDINGS|IMPRESSION|...">,
                                 <parentImage id="CXR1_1_IM-0001-3001"> per image
       NLMCXR_png/<parentImage id>.png   (or images/)

   Open-i defines no split: every study is ``test``.

License: Open-i reports and images are released for research use (recorded as ``"Open-i"``).

**MIMIC-CXR** (Johnson et al., Scientific Data 2019; PhysioNet credentialed access), two layouts:

1. The same R2Gen-style ``annotation.json`` + ``images/`` (records also carry ``study_id``,
   ``subject_id``).
2. The official MIMIC-CXR-JPG release, with the reports of MIMIC-CXR::

       mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, study_id, subject_id, split (train/validate/test)
       mimic-cxr-2.0.0-metadata.csv[.gz]   (optional) dicom_id, ViewPosition: only PA/AP images kept
       files/p<NN>/p<subject>/s<study>/<dicom_id>.jpg
       files/p<NN>/p<subject>/s<study>.txt  (or reports/files/...; mimic-cxr-reports.zip extracted)

   Free-text sections are found by their headers (``FINDINGS:``, ``IMPRESSION:``).

License: PhysioNet Credentialed Health Data License 1.5.0 (``"PhysioNet-CHDL-1.5.0"``). Subject and
study numbers are kept only as salted hashes (``meta.patient_key`` / ``meta.study_key``).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any, Unpack

from emma.data.schema import Gold, Meta, Sample, TaskType, Turn
from emma.data.sources._common import INVALID_RECORD, clean_text, read_json, source_folder, source_ref
from emma.data.sources._importer import DatasetInfo, ImportKwargs, ImportReport, ImportRun, import_records
from emma.errors import DataFormatError

IU_NAME = "iu-xray"
IU_LICENSE = "Open-i"
IU_INFO = DatasetInfo(IU_NAME, IU_LICENSE, "IU X-ray / Open-i (Demner-Fushman et al., JAMIA 2016)")
MIMIC_NAME = "mimic-cxr"
MIMIC_LICENSE = "PhysioNet-CHDL-1.5.0"
MIMIC_INFO = DatasetInfo(MIMIC_NAME, MIMIC_LICENSE, "MIMIC-CXR (Johnson et al., Scientific Data 2019)")
NO_FINDINGS = "no_findings"
REPORT_INSTRUCTION = "Write the findings section of the radiology report for this chest X-ray study."
_SPLITS = {
    "train": "train",
    "val": "validation",
    "validate": "validation",
    "validation": "validation",
    "test": "test",
}
_FRONTAL = frozenset({"PA", "AP"})
_HEADER_RE = re.compile(r"^\s*([A-Z][A-Z /&-]{2,40}):", re.MULTILINE)


def _key(dataset: str, value: str) -> str:
    return hashlib.sha256(f"{dataset}:{value}".encode()).hexdigest()[:16]


def report_sections(text: str) -> dict[str, str]:
    """Sections of a free-text report by their upper-case headers (``FINDINGS:`` → ``"findings"``)."""
    sections: dict[str, str] = {}
    matches = list(_HEADER_RE.finditer(text))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = " ".join(text[m.end() : end].split())
        if body:
            sections[m.group(1).strip().lower()] = body
    return sections


def _add_report(
    run: ImportRun,
    info: DatasetInfo,
    sid: str,
    split: str,
    findings: str,
    impression: str | None,
    images: list[Path],
    image_keys: list[str],
    *,
    patient: str | None = None,
    study: str | None = None,
) -> None:
    """Add a study's report sample (its images in the release's order), or leave out a study whose
    report has no findings section."""
    if not findings:
        run.filter(NO_FINDINGS)
        return
    dataset = info.name
    sample = Sample(
        id=sid,
        task=TaskType.REPORT,
        images=[source_ref(dataset, key) for key in image_keys],
        turns=[
            Turn(role="user", content=REPORT_INSTRUCTION, images=list(range(len(image_keys)))),
            Turn(role="assistant", content=findings),
        ],
        gold=Gold(answer=findings),
        meta=Meta(
            modality="xray",
            body_part="chest",
            split=split,
            source=dataset,
            license=info.license,
            patient_key=_key(dataset, patient) if patient else None,
            study_key=_key(dataset, study or sid),
            extra={"impression": impression} if impression else {},
        ),
    )
    run.add(sample, images, image_keys=image_keys)


def _safe_rel(value: Any) -> Path | None:
    rel = Path(clean_text(value))
    if not rel.parts or rel.is_absolute() or ".." in rel.parts:
        return None
    return rel


def _import_r2gen(info: DatasetInfo, src: Path, out: Path, options: ImportKwargs) -> ImportReport:
    data = read_json(src / "annotation.json")
    if not isinstance(data, dict):
        raise DataFormatError(f"{src / 'annotation.json'}: expected an object of split lists")
    images = src / "images"
    records: list[tuple[str, Any]] = []
    for split_name, split_records in data.items():
        split = _SPLITS.get(str(split_name).lower())
        if split is not None and isinstance(split_records, list):
            records.extend((split, rec) for rec in split_records)

    def add_record(run: ImportRun, record: tuple[str, Any]) -> None:
        split, rec = record
        if not isinstance(rec, dict):
            run.skip(INVALID_RECORD)
            return
        sid = clean_text(rec.get("id"))
        findings = clean_text(rec.get("report"))
        paths = rec.get("image_path") or []
        rels = [_safe_rel(p) for p in (paths if isinstance(paths, list) else [paths])]
        if not sid or not rels or any(r is None for r in rels):
            run.skip(INVALID_RECORD)
            return
        _add_report(
            run,
            info,
            sid,
            split,
            findings,
            None,
            [images / r for r in rels if r is not None],
            [f"images/{r}" for r in rels],
            patient=clean_text(rec.get("subject_id")) or None,
            study=clean_text(rec.get("study_id")) or None,
        )

    return import_records(info, src, out, options, records, add_record)


def _import_openi(src: Path, out: Path, options: ImportKwargs) -> ImportReport:
    png_dir = next((d for d in (src / "NLMCXR_png", src / "images") if d.is_dir()), None)
    if png_dir is None:
        raise DataFormatError(f"{IU_NAME}: missing NLMCXR_png/ (or images/) in {src}")

    def add_record(run: ImportRun, path: Path) -> None:
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError):
            run.skip(INVALID_RECORD)
            return
        sections = {
            (el.get("Label") or "").strip().lower(): " ".join((el.text or "").split())
            for el in root.iter("AbstractText")
        }
        image_ids = [el.get("id") for el in root.iter("parentImage") if el.get("id")]
        findings = sections.get("findings", "")
        if not image_ids or any(_safe_rel(i) is None for i in image_ids):
            run.skip(INVALID_RECORD)
            return
        keys = [f"{png_dir.name}/{i}.png" for i in image_ids]
        impression = sections.get("impression") or None
        _add_report(
            run, IU_INFO, f"openi-{path.stem}", "test", findings, impression, [src / k for k in keys], keys
        )

    reports = sorted((src / "ecgen-radiology").glob("*.xml"), key=lambda p: (len(p.stem), p.stem))
    notes = ["Open-i has no official split: every study is in 'test'"]
    return import_records(IU_INFO, src, out, options, reports, add_record, notes=notes)


def import_iu_xray(src: Path, out: Path, **options: Unpack[ImportKwargs]) -> ImportReport:
    """Import IU X-ray (R2Gen annotation.json layout or the Open-i XML release) into ``out``."""
    src, out = Path(src), Path(out)
    if (source_folder(src, IU_NAME) / "annotation.json").is_file():
        return _import_r2gen(IU_INFO, src, out, options)
    if (src / "ecgen-radiology").is_dir():
        return _import_openi(src, out, options)
    raise DataFormatError(f"{IU_NAME}: neither annotation.json nor ecgen-radiology/ in {src}")


# ------------------------------------------------------------------------------------- MIMIC-CXR


def _read_table(src: Path, stem: str, required: tuple[str, ...]) -> list[dict[str, str]] | None:
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        path = src / name
        if not path.is_file():
            continue
        try:
            raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
            reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")))
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DataFormatError(f"{path}: missing column(s) {', '.join(missing)}")
            return list(reader)
        except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
            raise DataFormatError(f"{path}: unreadable table ({type(exc).__name__})") from None
    return None


def _mimic_studies(src: Path) -> list[tuple[str, str, list[str], str]]:
    """``(subject, study, dicom ids, split)`` of every study in the split table, frontal images only
    when the metadata table is there."""
    rows = _read_table(src, "mimic-cxr-2.0.0-split", ("dicom_id", "study_id", "subject_id", "split"))
    assert rows is not None
    meta = _read_table(src, "mimic-cxr-2.0.0-metadata", ("dicom_id", "ViewPosition"))
    views = {r["dicom_id"]: (r.get("ViewPosition") or "").strip().upper() for r in meta} if meta else None
    studies: dict[tuple[str, str], list[str]] = defaultdict(list)
    split_of: dict[tuple[str, str], str] = {}
    for r in rows:
        key = (clean_text(r["subject_id"]), clean_text(r["study_id"]))
        if views is not None and views.get(r["dicom_id"], "") not in _FRONTAL:
            continue
        studies[key].append(clean_text(r["dicom_id"]))
        split_of[key] = _SPLITS.get(clean_text(r["split"]).lower(), "train")
    return [
        (subject, study, dicoms, split_of[(subject, study)]) for (subject, study), dicoms in studies.items()
    ]


def _add_mimic_study(run: ImportRun, src: Path, record: tuple[str, str, list[str], str]) -> None:
    subject, study, dicoms, split = record
    if not (subject.isdigit() and study.isdigit()) or any(_safe_rel(d) is None for d in dicoms):
        run.skip(INVALID_RECORD)
        return
    rel_dir = f"files/p{subject[:2]}/p{subject}"
    text = None
    for base in (src, src / "reports"):
        report_path = base / rel_dir / f"s{study}.txt"
        if report_path.is_file():
            text = report_path.read_text(encoding="utf-8", errors="replace")
            break
    if text is None:
        run.skip("missing_report")
        return
    sections = report_sections(text)
    keys = [f"{rel_dir}/s{study}/{d}.jpg" for d in dicoms]
    findings, impression = sections.get("findings", ""), sections.get("impression")
    _add_report(
        run,
        MIMIC_INFO,
        f"s{study}",
        split,
        findings,
        impression,
        [src / k for k in keys],
        keys,
        patient=subject,
        study=study,
    )


def import_mimic_cxr(src: Path, out: Path, **options: Unpack[ImportKwargs]) -> ImportReport:
    """Import MIMIC-CXR (R2Gen annotation.json layout or the official JPG + reports release) into ``out``."""
    src, out = Path(src), Path(out)
    if (source_folder(src, MIMIC_NAME) / "annotation.json").is_file():
        return _import_r2gen(MIMIC_INFO, src, out, options)
    if not any((src / f"mimic-cxr-2.0.0-split.{ext}").is_file() for ext in ("csv", "csv.gz")):
        raise DataFormatError(
            f"{MIMIC_NAME}: neither annotation.json nor mimic-cxr-2.0.0-split.csv[.gz] in {src}"
        )
    studies = _mimic_studies(src)
    return import_records(
        MIMIC_INFO, src, out, options, studies, lambda run, record: _add_mimic_study(run, src, record)
    )
