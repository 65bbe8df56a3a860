"""Readers for chest X-ray report generation benchmarks: IU X-ray and MIMIC-CXR.

Both write a canonical dataset of ``report`` samples (importer signature, resumable). The gold is the
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
import functools
import gzip
import hashlib
import io
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

from emma.data.schema import Gold, Meta, Sample, TaskType, Turn
from emma.data.sources._common import (
    INVALID_RECORD,
    ImportReport,
    ImportRun,
    ProgressFn,
    clean_text,
    read_json,
    source_ref,
)
from emma.data.store import DatasetFormat
from emma.errors import DataFormatError
from emma.io.limits import DEFAULT_LIMITS, Limits

IU_NAME = "iu-xray"
IU_CITATION = "IU X-ray / Open-i (Demner-Fushman et al., JAMIA 2016)"
IU_LICENSE = "Open-i"
MIMIC_NAME = "mimic-cxr"
MIMIC_CITATION = "MIMIC-CXR (Johnson et al., Scientific Data 2019)"
MIMIC_LICENSE = "PhysioNet-CHDL-1.5.0"
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


def _report_sample(
    dataset: str,
    license: str,
    sid: str,
    split: str,
    findings: str,
    impression: str | None,
    image_keys: list[str],
    *,
    patient: str | None = None,
    study: str | None = None,
) -> Sample:
    return Sample(
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
            license=license,
            patient_key=_key(dataset, patient) if patient else None,
            study_key=_key(dataset, study or sid),
            extra={"impression": impression} if impression else {},
        ),
    )


def _safe_rel(value: Any) -> Path | None:
    rel = Path(clean_text(value))
    if not rel.parts or rel.is_absolute() or ".." in rel.parts:
        return None
    return rel


def _read_r2gen(run: ImportRun, src: Path, dataset: str, license: str) -> None:
    data = read_json(src / "annotation.json")
    if not isinstance(data, dict):
        raise DataFormatError(f"{src / 'annotation.json'}: expected an object of split lists")
    images = src / "images"
    for split_name, records in data.items():
        split = _SPLITS.get(str(split_name).lower())
        if split is None or not isinstance(records, list):
            continue
        for rec in records:
            if run.full:
                return
            if not isinstance(rec, dict):
                run.skip(INVALID_RECORD)
                continue
            sid = clean_text(rec.get("id"))
            findings = clean_text(rec.get("report"))
            paths = rec.get("image_path") or []
            rels = [_safe_rel(p) for p in (paths if isinstance(paths, list) else [paths])]
            if not sid or not rels or any(r is None for r in rels):
                run.skip(INVALID_RECORD)
                continue
            if not findings:
                run.filter(NO_FINDINGS)
                continue
            keys = [f"images/{r}" for r in rels]
            sample = _report_sample(
                dataset,
                license,
                sid,
                split,
                findings,
                None,
                keys,
                patient=clean_text(rec.get("subject_id")) or None,
                study=clean_text(rec.get("study_id")) or None,
            )
            run.add(sample, [images / r for r in rels if r is not None], image_keys=keys)


def _open_report(run: ImportRun, src: Path, split: str) -> None:
    xml_dir = src / "ecgen-radiology"
    png_dir = next((d for d in (src / "NLMCXR_png", src / "images") if d.is_dir()), None)
    if png_dir is None:
        raise DataFormatError(f"{IU_NAME}: missing NLMCXR_png/ (or images/) in {src}")
    for path in sorted(xml_dir.glob("*.xml"), key=lambda p: (len(p.stem), p.stem)):
        if run.full:
            return
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError):
            run.skip(INVALID_RECORD)
            continue
        sections = {
            (el.get("Label") or "").strip().lower(): " ".join((el.text or "").split())
            for el in root.iter("AbstractText")
        }
        image_ids = [el.get("id") for el in root.iter("parentImage") if el.get("id")]
        findings = sections.get("findings", "")
        if not image_ids or any(_safe_rel(i) is None for i in image_ids):
            run.skip(INVALID_RECORD)
            continue
        if not findings:
            run.filter(NO_FINDINGS)
            continue
        keys = [f"{png_dir.name}/{i}.png" for i in image_ids]
        sample = _report_sample(
            IU_NAME,
            IU_LICENSE,
            f"openi-{path.stem}",
            split,
            findings,
            sections.get("impression") or None,
            keys,
        )
        run.add(sample, [src / k for k in keys], image_keys=keys)


def read_iu_xray(
    src: Path,
    out: Path,
    *,
    limit: int | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    limits: Limits = DEFAULT_LIMITS,
    format: DatasetFormat = "jsonl",
) -> ImportReport:
    """Read IU X-ray (R2Gen annotation.json layout or the Open-i XML release) into ``out``."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataFormatError(f"{IU_NAME}: source folder {src} does not exist")
    report = ImportReport(dataset=IU_NAME, src=str(src), out=str(out), license=IU_LICENSE)
    if (src / "annotation.json").is_file():
        reader = functools.partial(_read_r2gen, src=src, dataset=IU_NAME, license=IU_LICENSE)
    elif (src / "ecgen-radiology").is_dir():
        reader = functools.partial(_open_report, src=src, split="test")
        report.notes.append("Open-i has no official split: every study is in 'test'")
    else:
        raise DataFormatError(f"{IU_NAME}: neither annotation.json nor ecgen-radiology/ in {src}")
    with ImportRun(
        report,
        out,
        limit=limit,
        resume=resume,
        progress=progress,
        limits=limits,
        source=IU_CITATION,
        format=format,
    ) as run:
        reader(run)
    return report


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


def _mimic_official(run: ImportRun, src: Path) -> None:
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
    for (subject, study), dicoms in studies.items():
        if run.full:
            return
        if not (subject.isdigit() and study.isdigit()) or any(_safe_rel(d) is None for d in dicoms):
            run.skip(INVALID_RECORD)
            continue
        rel_dir = f"files/p{subject[:2]}/p{subject}"
        text = None
        for base in (src, src / "reports"):
            report_path = base / rel_dir / f"s{study}.txt"
            if report_path.is_file():
                text = report_path.read_text(encoding="utf-8", errors="replace")
                break
        if text is None:
            run.skip("missing_report")
            continue
        sections = report_sections(text)
        findings = sections.get("findings", "")
        if not findings:
            run.filter(NO_FINDINGS)
            continue
        keys = [f"{rel_dir}/s{study}/{d}.jpg" for d in dicoms]
        sample = _report_sample(
            MIMIC_NAME,
            MIMIC_LICENSE,
            f"s{study}",
            split_of[(subject, study)],
            findings,
            sections.get("impression"),
            keys,
            patient=subject,
            study=study,
        )
        run.add(sample, [src / k for k in keys], image_keys=keys)


def read_mimic_cxr(
    src: Path,
    out: Path,
    *,
    limit: int | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    limits: Limits = DEFAULT_LIMITS,
    format: DatasetFormat = "jsonl",
) -> ImportReport:
    """Read MIMIC-CXR (R2Gen annotation.json layout or the official JPG + reports release) into ``out``."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataFormatError(f"{MIMIC_NAME}: source folder {src} does not exist")
    report = ImportReport(dataset=MIMIC_NAME, src=str(src), out=str(out), license=MIMIC_LICENSE)
    if (src / "annotation.json").is_file():
        reader = functools.partial(_read_r2gen, src=src, dataset=MIMIC_NAME, license=MIMIC_LICENSE)
    elif any((src / f"mimic-cxr-2.0.0-split.{ext}").is_file() for ext in ("csv", "csv.gz")):
        reader = functools.partial(_mimic_official, src=src)
    else:
        raise DataFormatError(
            f"{MIMIC_NAME}: neither annotation.json nor mimic-cxr-2.0.0-split.csv[.gz] in {src}"
        )
    with ImportRun(
        report,
        out,
        limit=limit,
        resume=resume,
        progress=progress,
        limits=limits,
        source=MIMIC_CITATION,
        format=format,
    ) as run:
        reader(run)
    return report
