"""DICOM de-identification after PS3.15 Annex E, Basic Application Level Confidentiality Profile.

What is done to a dataset (every level, sequences included):

* **Table actions** (:data:`BASIC_PROFILE`, keyword → :class:`Action`) for the attributes that Annex E
  names: ``D`` replace with a dummy, ``Z`` empty, ``X`` remove, ``K`` keep, ``U`` remap a UID.
* **Rules by VR** for everything the table does not name: every ``UI`` value that is not a registered
  DICOM UID (SOP classes, transfer syntaxes, ...) or a class UID is remapped; every ``PN`` is emptied;
  ``DA`` / ``DT`` are shifted (see below); ``SQ`` items are cleaned recursively.
* Private elements, curves (50xx), overlays (60xx), the retired Results group (4008) and public elements
  unknown to the data dictionary are removed; values pydicom cannot read are removed, and IS/DS values
  holding letters are emptied.
* **Retain Safe Private Option** (PS3.15 E.3.10, code 113111; ``retain_safe_private``): the private
  elements of the allow-list :data:`SAFE_PRIVATE` are kept, unchanged, with their private creator. The
  list is EMMA's, kept short on purpose: the Siemens CSA *image* header type and info (0029,xx08 and
  0029,xx10 of "SIEMENS CSA HEADER"), which hold acquisition parameters only (slice count and slice normal
  of a mosaic, dwell time, coil, table position) and are what a Siemens mosaic needs to load as a volume.
  Not on it, as checked on the dcm_qa mosaics: the CSA image header *version* (0029,xx09), which holds the
  acquisition date there, and the CSA *series* header (0029,xx20), which carries the scanner protocol with
  the device serial number, the protocol name and the UIDs of other series, whose Siemens digits encode the
  acquisition date and time. Without the option a mosaic loses its CSA header and no longer loads: a
  warning says so.
* The file meta gets the new SOP Instance UID, loses its AE titles and private information, and names
  pydicom as the writing implementation; the 128-byte preamble is zeroed.
* ``PatientIdentityRemoved = YES``, ``DeidentificationMethod`` and ``DeidentificationMethodCodeSequence``
  (113100 Basic Profile, 113107 Retain Longitudinal Temporal Information with Modified Dates, and 113108
  Retain Patient Characteristics when asked), ``LongitudinalTemporalInformationModified = MODIFIED``.
* Pixel data and every geometry / display attribute are untouched. Burned-in text in pixels is *not*
  removed: a warning is returned (and logged, without PHI) when ``BurnedInAnnotation`` is ``YES``, or is
  not ``NO`` in a modality that often carries it (US, SC, OT, XC, ES).

Keyed pseudonymisation (re-running with the same key gives byte-identical output):

* **Dates**: one offset per patient, ``HMAC-SHA256(key, PatientID)`` → a whole number of days between
  365 and 4015 into the past, applied to every ``DA`` and ``DT``. Intervals between a patient's dates
  are preserved exactly. When PatientID is empty the study UID (then a constant) keys the offset.
* **Times**: kept by default (``shift_times=False``): a whole-day shift leaves the time of day intact,
  which is clinically useful (night presentations) and not identifying once the date has moved. With
  ``shift_times=True`` a per-patient offset of 0-86399 s is added too; a ``...Date`` / ``...Time`` pair in
  one dataset (StudyDate + StudyTime) is shifted as one date-time so midnight crossings carry into the
  date, ``DT`` values are shifted as date-times, and a lone ``TM`` wraps around midnight.
* **UIDs**: ``2.25.<128-bit int>`` from ``HMAC-SHA256(key, uid)`` (UUID version 8 layout, RFC 9562), so
  one input UID gives one output UID across files and runs: study / series / frame-of-reference structure
  and references inside sequences stay consistent, distinct UIDs stay distinct.
* **PatientID / PatientName**: ``ANON`` + 16 hex digits of ``HMAC(key, PatientID)``, so patient-level
  grouping (train/test splits) survives. Anyone holding the key can test a guessed PatientID: keep the
  key secret and never store it with the output.

Output files (:func:`deidentify_path`) are named by their new UIDs, never by anything from the input:
``layout="uid"`` (default) writes ``OUT/<new study UID>/<new series UID>/<new SOP UID>.dcm`` (input
folder names are often patient names, so they are not reused); ``layout="mirror"`` keeps the input's
relative folders and only renames the files to ``<new SOP UID>.dcm``.

Nothing read from a file (names, IDs, dates) goes into a log line, a warning or an exception message:
only paths, keywords, modality codes and counts. pydicom's value-validation warnings (which quote values)
are silenced while a file is read, cleaned and written.

Why one file (~980 lines): every action on an element (dummy, zero, remove, UID remap, date shift,
safe-private keep) must see the same config, keys and audit record, in the standard's order; the
standard's tables themselves are data in deid_tables.py.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import logging
import os
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.multival import MultiValue
from pydicom.pixels.utils import get_expected_length
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from emma.errors import CorruptFileError, EmmaError, InputError, OutputError, SeriesError
from emma.io import mosaic
from emma.io.atomic import atomic_path
from emma.io.deid_tables import (
    BASIC_PROFILE,
    BURNED_IN_RISK_MODALITIES,
    CLASS_UID_KEYWORDS,
    CODE_BASIC,
    CODE_MODIFIED_DATES,
    CODE_PATIENT_CHARACTERISTICS,
    CODE_SAFE_PRIVATE,
    DESCRIPTOR_KEYWORDS,
    DICOMDIR_SOP_CLASS,
    FILE_META_REMOVE,
    PATIENT_CHARACTERISTIC_KEYWORDS,
    PIXEL_TAGS,
    SAFE_PRIVATE,
    SECONDARY_CAPTURE_PREFIX,
    Action,
)
from emma.io.dicom import quiet_pydicom, read_dataset
from emma.io.limits import DEFAULT_LIMITS, Limits
from emma.io.paths import check_path

logger = logging.getLogger(__name__)

METHOD_VERSION = "EMMA deid 1"
MIN_KEY_BYTES = 16


Layout = Literal["uid", "mirror"]


# ----------------------------------------------------------------------------------------- config/results


@dataclass(frozen=True)
class DeidConfig:
    """How to de-identify.

    ``key``: secret bytes (at least 16) keying date offsets, UIDs and pseudonyms; keep it away from the
    output. ``keep_descriptions``: keep :data:`DESCRIPTOR_KEYWORDS` (free text, review it).
    ``shift_times``: also shift times of day (see module doc). ``keep_patient_characteristics``: keep sex,
    age (ages of 90 and over are capped at ``090Y``), size, weight (Annex E option 113108).
    ``retain_safe_private``: keep the private elements of :data:`SAFE_PRIVATE` (option 113111).
    """

    key: bytes = field(repr=False)
    keep_descriptions: bool = False
    shift_times: bool = False
    keep_patient_characteristics: bool = False
    retain_safe_private: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes | bytearray):
            raise InputError("de-identification key must be bytes")
        if len(self.key) < MIN_KEY_BYTES:
            raise InputError(f"de-identification key too short: need at least {MIN_KEY_BYTES} bytes")

    def action_for(self, keyword: str) -> Action | None:
        """The table action for ``keyword`` under this configuration, or None when the table is silent."""
        if self.keep_descriptions and keyword in DESCRIPTOR_KEYWORDS:
            return Action.KEEP
        if self.keep_patient_characteristics and keyword in PATIENT_CHARACTERISTIC_KEYWORDS:
            return Action.KEEP
        return BASIC_PROFILE.get(keyword)


@dataclass
class DeidResult:
    """A de-identified dataset, PHI-free warnings, and how many elements each action touched."""

    dataset: Dataset
    warnings: list[str]
    actions: dict[str, int]


@dataclass(frozen=True)
class WrittenFile:
    source: str  # input path relative to ``src`` (POSIX), "" when ``src`` is a file
    output: str  # output path relative to ``dst`` (POSIX), the file name when ``dst`` is a file
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class FailedFile:
    source: str
    error: str  # one line, no PHI


@dataclass
class DeidReport:
    """What :func:`deidentify_path` did. ``ok`` is False when any DICOM file failed."""

    src: Path
    dst: Path
    written: list[WrittenFile] = field(default_factory=list)
    failed: list[FailedFile] = field(default_factory=list)
    skipped_non_dicom: int = 0
    skipped_duplicates: int = 0
    skipped_dicomdir: int = 0
    actions: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def warnings(self) -> list[str]:
        return [f"{w.output}: {msg}" for w in self.written for msg in w.warnings]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary. Written files are listed by output name only: input names often hold
        patient names, and an input → output table would re-identify the outputs. Failed files are listed
        by input path (relative to ``src``) so the operator can find them."""
        return {
            "src": str(self.src),
            "dst": str(self.dst),
            "written": len(self.written),
            "failed": [{"source": f.source, "error": f.error} for f in self.failed],
            "skipped_non_dicom": self.skipped_non_dicom,
            "skipped_duplicates": self.skipped_duplicates,
            "skipped_dicomdir": self.skipped_dicomdir,
            "warnings": self.warnings,
            "actions": dict(sorted(self.actions.items())),
            "outputs": [w.output for w in self.written],
        }


# ----------------------------------------------------------------------------------------- keyed values


def _hmac(key: bytes, purpose: str, value: str) -> bytes:
    return hmac.new(
        key, purpose.encode() + b"\x00" + value.encode("utf-8", "surrogateescape"), hashlib.sha256
    ).digest()


def remap_uid(key: bytes, uid: str) -> str:
    """The keyed replacement of ``uid``: ``2.25.`` + a 128-bit integer laid out as a version-8 UUID."""
    raw = bytearray(_hmac(key, "uid", uid.strip())[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8 (custom)
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 9562 variant
    return f"2.25.{int.from_bytes(raw, 'big')}"


def _pseudonym(key: bytes, patient_key: str) -> str:
    """``ANON`` + 16 upper-case hex digits of HMAC(key, patient key)."""
    return "ANON" + _hmac(key, "patient", patient_key).hex()[:16].upper()


@dataclass(frozen=True)
class _Shift:
    days: int
    seconds: int


def _patient_key(ds: Dataset) -> str:
    for keyword, prefix in (("PatientID", "id:"), ("StudyInstanceUID", "study:")):
        value = _text(ds.get(keyword))
        if value:
            return prefix + value
    return "unknown"


def _shift_for(key: bytes, patient_key: str, shift_times: bool) -> _Shift:
    digest = _hmac(key, "date-offset", patient_key)
    days = -(365 + int.from_bytes(digest[:8], "big") % 3651)
    seconds = int.from_bytes(digest[8:16], "big") % 86400 if shift_times else 0
    return _Shift(days, seconds)


def date_shift_days(ds: Dataset, config: DeidConfig) -> int:
    """The whole-day offset :func:`deidentify_dataset` applies to this (original) dataset's dates."""
    return _shift_for(config.key, _patient_key(ds), config.shift_times).days


def patient_pseudonym(ds: Dataset, config: DeidConfig) -> str:
    """The PatientID / PatientName :func:`deidentify_dataset` gives this (original) dataset's patient."""
    return _pseudonym(config.key, _patient_key(ds))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, DataElement):
        value = value.value
    return str(value).strip() if value is not None else ""


# ----------------------------------------------------------------------------------------- date and time

_DA = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_TM = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?$")
_DT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?$")


def _parse_date(value: str) -> date | None:
    m = _DA.match(value.strip())
    if not m:
        return None
    try:
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


def _parse_time(value: str) -> tuple[time, int, str] | None:
    """(time, number of HH/MM/SS components present, fraction text incl. the dot or '')."""
    m = _TM.match(value.strip())
    if not m:
        return None
    parts = [m[1], m[2], m[3]]
    n = sum(p is not None for p in parts)
    try:
        t = time(int(m[1]), int(m[2] or 0), min(int(m[3] or 0), 59))
    except ValueError:
        return None
    return t, n, m[4] or ""


def _fmt_date(d: date) -> str:
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"  # strftime("%Y") does not zero-pad years before 1000


def _format_time(t: time, n: int, fraction: str) -> str:
    return t.strftime("%H%M%S")[: 2 * n] + (fraction if n == 3 else "")


def _shift_date_value(value: str, shift: _Shift) -> str | None:
    d = _parse_date(value)
    if d is None:
        return None
    try:
        return _fmt_date(d + timedelta(days=shift.days))
    except OverflowError:
        return None


def _shift_time_value(value: str, shift: _Shift) -> str | None:
    parsed = _parse_time(value)
    if parsed is None:
        return None
    t, n, fraction = parsed
    moved = datetime.combine(date(2000, 1, 1), t) + timedelta(seconds=shift.seconds)
    return _format_time(moved.time(), n, fraction)


def _shift_pair(date_value: str, time_value: str, shift: _Shift) -> tuple[str, str] | None:
    d, parsed = _parse_date(date_value), _parse_time(time_value)
    if d is None or parsed is None:
        return None
    t, n, fraction = parsed
    try:
        moved = datetime.combine(d, t) + timedelta(days=shift.days, seconds=shift.seconds)
    except OverflowError:
        return None
    return _fmt_date(moved), _format_time(moved.time(), n, fraction)


def _shift_datetime_value(value: str, shift: _Shift) -> str | None:
    m = _DT.match(value.strip())
    if not m:
        return None
    n = 1 + sum(g is not None for g in m.groups()[1:6])  # components present: year .. second
    try:
        moved = datetime(
            int(m[1]), int(m[2] or 1), int(m[3] or 1), int(m[4] or 0), int(m[5] or 0), min(int(m[6] or 0), 59)
        )
        seconds = shift.seconds if n >= 4 else 0
        moved += timedelta(days=shift.days, seconds=seconds)
    except (ValueError, OverflowError):
        return None
    text = (_fmt_date(moved) + moved.strftime("%H%M%S"))[: 2 + 2 * n]
    if n == 6 and m[7]:
        text += m[7]
    return text + (m[8] or "")


# ----------------------------------------------------------------------------------------- cleaning


def _values(elem: DataElement) -> list[str]:
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def _set_values(elem: DataElement, values: list[str]) -> None:
    elem.value = values[0] if len(values) == 1 else (values if values else elem.empty_value)


def _is_empty(elem: DataElement) -> bool:
    value = elem.value
    if value is None:
        return True
    if isinstance(value, str | bytes | list | tuple | MultiValue | Sequence):
        return len(value) == 0
    return False


def _has_unparsed_number(elem: DataElement) -> bool:
    """True when pydicom kept an IS/DS value as plain text because it is not a number."""
    value = elem.value
    values = value if isinstance(value, MultiValue | list) else [value]
    return any(type(v) is str and re.search(r"[A-Za-z]", v) for v in values)  # "0,5" stays, names go


def _is_removed_group(tag: BaseTag) -> bool:
    """Curves (50xx), overlays (60xx) and the retired Results group (4008: impressions, interpreters)."""
    group = tag.group
    return group == 0x4008 or (group % 2 == 0 and (0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF))


def _keep_uid(keyword: str, value: str) -> bool:
    return keyword in CLASS_UID_KEYWORDS or bool(UID(value).keyword)


class _Cleaner:
    def __init__(self, config: DeidConfig, patient_key: str) -> None:
        self.config = config
        self.shift = _shift_for(config.key, patient_key, config.shift_times)
        self.patient_pseudonym = _pseudonym(config.key, patient_key)
        self.counts: Counter[str] = Counter()

    # one dataset level; sequences recurse
    def clean(self, ds: Dataset) -> None:
        temporal: list[DataElement] = []
        safe = safe_private_tags(ds) if self.config.retain_safe_private else frozenset()
        for tag in list(ds.keys()):
            if tag in safe:
                self.counts["private_kept"] += 1
                continue
            if tag.is_private:
                del ds[tag]
                self.counts["private_removed"] += 1
                continue
            if _is_removed_group(tag):
                del ds[tag]
                self.counts["groups_removed"] += 1
                continue
            try:
                elem = ds[tag]
            except Exception:  # a value pydicom cannot decode: drop it rather than guess
                del ds[tag]
                self.counts["unreadable_removed"] += 1
                continue
            keyword = elem.keyword
            if not keyword:
                del ds[tag]
                self.counts["unknown_removed"] += 1
                continue
            action = self.config.action_for(keyword)
            if action is not None:
                self._apply(ds, elem, action)
            elif elem.VR == "SQ":
                for item in elem.value:
                    self.clean(item)
            elif elem.VR == "UI":
                self._remap(elem)
            elif elem.VR == "PN":
                if not _is_empty(elem):
                    elem.value = elem.empty_value
                    self.counts["emptied"] += 1
            elif elem.VR in ("DA", "DT", "TM"):
                temporal.append(elem)
            elif elem.VR in ("IS", "DS") and _has_unparsed_number(elem):
                elem.value = elem.empty_value  # text where a number belongs: it could be anything
                self.counts["invalid_emptied"] += 1
        if temporal:
            self._shift_temporal(ds, temporal)

    def _apply(self, ds: Dataset, elem: DataElement, action: Action) -> None:
        if action is Action.REMOVE:
            del ds[elem.tag]
            self.counts["removed"] += 1
        elif action is Action.ZERO:
            if not _is_empty(elem):
                elem.value = elem.empty_value
                self.counts["emptied"] += 1
        elif action is Action.DUMMY:
            if elem.keyword == "PatientID":
                original = _text(elem)
                elem.value = (
                    _pseudonym(self.config.key, "id:" + original) if original else self.patient_pseudonym
                )
            else:
                elem.value = self.patient_pseudonym
            self.counts["replaced"] += 1
        elif action is Action.UID:
            self._remap(elem)
        elif action is Action.KEEP:
            if elem.VR == "SQ":
                for item in elem.value:
                    self.clean(item)
            elif elem.keyword == "PatientAge":
                elem.value = _cap_age(_text(elem))

    def _remap(self, elem: DataElement) -> None:
        values = _values(elem)
        if not values:
            return
        new = [v if _keep_uid(elem.keyword, v.strip()) else remap_uid(self.config.key, v) for v in values]
        if new != values:
            _set_values(elem, new)
            self.counts["uids_remapped"] += sum(a != b for a, b in zip(new, values, strict=True))

    def _shift_temporal(self, ds: Dataset, elems: list[DataElement]) -> None:
        by_keyword = {e.keyword: e for e in elems}
        paired: set[str] = set()
        for elem in elems:
            if elem.VR != "DA":
                continue
            partner = by_keyword.get(elem.keyword.replace("Date", "Time"))
            dates = _values(elem)
            if not dates:
                continue
            if self.config.shift_times and partner is not None and partner.VR == "TM":
                times = _values(partner)
                if len(times) == len(dates):
                    paired.add(partner.keyword)
                    pairs = [_shift_pair(d, t, self.shift) for d, t in zip(dates, times, strict=True)]
                    if all(p is not None for p in pairs):
                        _set_values(elem, [p[0] for p in pairs if p])
                        _set_values(partner, [p[1] for p in pairs if p])
                        self.counts["dates_shifted"] += len(dates)
                        self.counts["times_shifted"] += len(times)
                    else:
                        elem.value, partner.value = elem.empty_value, partner.empty_value
                        self.counts["dates_emptied"] += len(dates)
                    continue
            self._shift_each(elem, dates, _shift_date_value, "dates")
        for elem in elems:
            values = _values(elem)
            if not values:
                continue
            if elem.VR == "DT":
                self._shift_each(elem, values, _shift_datetime_value, "dates")
            elif elem.VR == "TM" and self.config.shift_times and elem.keyword not in paired:
                self._shift_each(elem, values, _shift_time_value, "times")

    def _shift_each(
        self, elem: DataElement, values: list[str], fn: Callable[[str, _Shift], str | None], what: str
    ) -> None:
        new = [fn(v, self.shift) for v in values]
        if all(v is not None for v in new):
            _set_values(elem, [v for v in new if v is not None])
            self.counts[f"{what}_shifted"] += len(values)
        else:  # an unparseable date may be anything, so it goes
            elem.value = elem.empty_value
            self.counts[f"{what}_emptied"] += len(values)


def _cap_age(age: str) -> str:
    m = re.match(r"^(\d{3})Y$", age)
    if m and int(m[1]) >= 90:
        return "090Y"
    return age


def _code_item(code: tuple[str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue = code[0]
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = code[1]
    return item


def _mark(ds: Dataset, config: DeidConfig) -> None:
    method = [METHOD_VERSION, "PS3.15 E.1 Basic Profile", "Dates shifted per patient", "UIDs remapped"]
    codes = [CODE_BASIC, CODE_MODIFIED_DATES]
    if config.shift_times:
        method.append("Times shifted per patient")
    if config.keep_descriptions:
        method.append("Descriptions kept")
    if config.keep_patient_characteristics:
        method.append("Patient characteristics kept")
        codes.append(CODE_PATIENT_CHARACTERISTICS)
    if config.retain_safe_private:
        method.append("Safe private kept: Siemens CSA image header")
        codes.append(CODE_SAFE_PRIVATE)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = method
    ds.DeidentificationMethodCodeSequence = Sequence([_code_item(c) for c in codes])
    ds.LongitudinalTemporalInformationModified = "MODIFIED"


def safe_private_tags(ds: Dataset) -> frozenset[BaseTag]:
    """The tags of ``ds`` (this level) that the Retain Safe Private Option keeps: each :data:`SAFE_PRIVATE`
    element present and the private creator of its block."""
    out: set[BaseTag] = set()
    for (group, creator), offsets in SAFE_PRIVATE.items():
        try:
            block = ds.private_block(group, creator)
        except KeyError:  # no such creator in this dataset
            continue
        kept = {block.get_tag(offset) for offset in offsets if block.get_tag(offset) in ds}
        if kept:
            out |= kept | {BaseTag((group << 16) | (block.block_start >> 8))}
    return frozenset(out)


def _mosaic_loads(ds: Dataset) -> bool:
    """Whether ``ds`` is a Siemens mosaic whose geometry (slice count, layout) can be read."""
    if not mosaic.is_mosaic(ds):
        return False
    try:
        mosaic.mosaic_geometry(ds)
    except SeriesError:
        return False
    return True


def _burned_in_warnings(ds: Dataset) -> list[str]:
    burned = _text(ds.get("BurnedInAnnotation")).upper()
    modality = _text(ds.get("Modality")).upper()
    if not modality and _text(ds.get("SOPClassUID")).startswith(SECONDARY_CAPTURE_PREFIX):
        modality = "SC"
    if burned == "YES":
        return ["BurnedInAnnotation is YES: pixels may show identifying text, which was not removed"]
    if burned != "NO" and modality in BURNED_IN_RISK_MODALITIES and "PixelData" in ds:
        return [
            f"modality {modality} without BurnedInAnnotation=NO: pixels may show identifying text, "
            "which was not removed"
        ]
    return []


def _clean_file_meta(ds: Dataset, cleaner: _Cleaner) -> None:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    for tag in FILE_META_REMOVE:
        if tag in meta:
            del meta[tag]
            cleaner.counts["removed"] += 1
    sop = _text(ds.get("SOPInstanceUID"))
    if sop:
        _set_meta(meta, "MediaStorageSOPInstanceUID", "UI", sop)
    elif "MediaStorageSOPInstanceUID" in meta:
        cleaner._remap(meta["MediaStorageSOPInstanceUID"])
    if "SOPClassUID" in ds:
        _set_meta(meta, "MediaStorageSOPClassUID", "UI", ds.SOPClassUID)
    _set_meta(meta, "ImplementationClassUID", "UI", PYDICOM_IMPLEMENTATION_UID)
    _set_meta(meta, "ImplementationVersionName", "SH", f"PYDICOM {pydicom.__version__}"[:16])


def _set_meta(meta: Dataset, keyword: str, vr: str, value: str) -> None:
    """A new file meta element: an input's element of the same tag may carry a wrong VR (e.g. US),
    which assigning the value alone would keep, and which could then not be written."""
    tag = tag_for_keyword(keyword)
    meta[tag] = DataElement(tag, vr, value)


def deidentify_dataset(
    ds: Dataset, config: DeidConfig, *, in_place: bool = False, label: str | None = "dataset"
) -> DeidResult:
    """De-identify ``ds`` (a deep copy unless ``in_place``) under the basic profile and ``config``.

    Returns the dataset, warnings (no PHI) about what could not be cleaned, and action counts. The
    warnings are also logged, prefixed by ``label`` (never a value from the file; None: not logged).
    """
    if not in_place:
        ds = copy.deepcopy(ds)
    with quiet_pydicom():
        patient_key = _patient_key(ds)
        cleaner = _Cleaner(config, patient_key)
        notes = _burned_in_warnings(ds)
        if "EncapsulatedDocument" in ds:
            notes.append("EncapsulatedDocument present: the document content was not cleaned")
        loadable_mosaic = _mosaic_loads(ds)
        cleaner.clean(ds)
        if loadable_mosaic and not _mosaic_loads(ds):
            notes.append(
                "Siemens mosaic lost its CSA image header with the private tags: the output no longer "
                "loads as a volume (use the Retain Safe Private option, --retain-safe-private)"
            )
        if "PatientName" not in ds:
            ds.PatientName = cleaner.patient_pseudonym
        if "PatientID" not in ds:
            ds.PatientID = cleaner.patient_pseudonym
        _mark(ds, config)
        _clean_file_meta(ds, cleaner)
        if getattr(ds, "preamble", None) is not None:
            ds.preamble = b"\x00" * 128
    if label is not None:
        for note in notes:
            logger.warning("deid: %s: %s", label, note)
    return DeidResult(dataset=ds, warnings=notes, actions=dict(cleaner.counts))


# ----------------------------------------------------------------------------------------- PHI report


def phi_keywords_present(ds: Dataset) -> list[str]:
    """Keywords (never values) of non-empty elements that can carry PHI, at any depth, sorted.

    Counts table entries other than K/U, person names and dates; instance UIDs are not listed (they
    are always present; :func:`deidentify_dataset` remaps them). Private elements are summarised as
    ``"private tags (N)"`` (private sequences are not opened). A de-identified file still lists
    PatientName/PatientID (pseudonyms) and its shifted dates: read ``PatientIdentityRemoved`` alongside.
    """
    found: set[str] = set()
    private = 0
    with quiet_pydicom():
        for elem in _walk(ds):
            if elem.tag.is_private:
                private += 1
                continue
            keyword = elem.keyword
            action = BASIC_PROFILE.get(keyword)
            risky = action not in (None, Action.KEEP, Action.UID) or elem.VR in ("PN", "DA", "DT")
            if risky and not _is_empty(elem):
                found.add(keyword)
    out = sorted(found)
    if private:
        out.append(f"private tags ({private})")
    return out


def _walk(ds: Dataset) -> Iterator[DataElement]:
    """Every element at any depth (private sequences not opened), except pixel data: never a PHI field,
    and a header-level read leaves them in the file (reading them here would load them whole)."""
    for tag in list(ds.keys()):
        if tag in PIXEL_TAGS:
            continue
        try:
            elem = ds[tag]
        except Exception:
            continue
        yield elem
        if elem.VR == "SQ" and not tag.is_private:
            for item in elem.value or []:
                yield from _walk(item)


def is_deidentified(ds: Dataset) -> bool:
    """True when the dataset declares ``PatientIdentityRemoved = YES``."""
    return _text(ds.get("PatientIdentityRemoved")).upper() == "YES"


# ----------------------------------------------------------------------------------------- files


def _looks_like_dicom(path: Path) -> bool:
    """DICM magic at 128, or (no preamble) a first element in group 0002 or 0008, little endian."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00")


def _read(path: Path, limits: Limits) -> Dataset:
    """Read one DICOM file whole (:func:`emma.io.dicom.read_dataset`: size bound, truncation check), then
    refuse what cannot be written back faithfully; CorruptFileError on anything unusable."""
    ds = read_dataset(path, limits)
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:  # file meta without it: record how pydicom read the file
        implicit = ds.original_encoding[0]
        meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
        )
    if _is_dicomdir(ds):
        return ds
    if not _text(ds.get("SOPClassUID")) or not _text(ds.get("SOPInstanceUID")):
        raise CorruptFileError(f"{path}: no SOP Class / SOP Instance UID, not a storable DICOM instance")
    _check_pixel_data(ds, path, limits)
    return ds


def _check_pixel_data(ds: Dataset, path: Path, limits: Limits) -> None:
    """Refuse truncated pixel data: a de-identified copy must not look complete when it is not."""
    if "PixelData" not in ds:
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(_text(ds.get("NumberOfFrames")) or 1)
        int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        raise CorruptFileError(f"{path}: pixel data without a valid image description") from None
    limits.check_image(rows, cols, frames, what=str(path))
    data = ds.PixelData
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        try:
            fragments = sum(1 for _ in generate_fragments(data))
        except (ValueError, EOFError, TypeError):
            raise CorruptFileError(f"{path}: broken encapsulated pixel data") from None
        if fragments == 0:
            raise CorruptFileError(f"{path}: encapsulated pixel data without fragments")
        return
    try:
        expected = get_expected_length(ds, unit="bytes")
    except (AttributeError, TypeError, ValueError, KeyError):
        raise CorruptFileError(f"{path}: pixel data without a valid image description") from None
    if len(data) < expected:
        raise CorruptFileError(f"{path}: pixel data truncated ({len(data)} of {expected} bytes)")


def _iter_files(src: Path, exclude: Path | None) -> list[Path]:
    out: list[Path] = []
    for root, dirs, files in os.walk(src, followlinks=False):
        root_path = Path(root)
        if exclude is not None:
            dirs[:] = [d for d in dirs if (root_path / d).resolve() != exclude]
        out.extend(root_path / name for name in files if (root_path / name).is_file())
    return sorted(out, key=lambda p: p.relative_to(src).as_posix())


def _atomic_save(ds: Dataset, target: Path) -> None:
    """Write ``ds`` to a temporary file beside ``target``, then rename it; nothing partial is left.

    A failure to write (permissions, a file where a folder should be, a full disk) is an OutputError
    naming ``target``: the input is fine."""

    def unwritable(exc: OSError) -> OutputError:
        if isinstance(exc, FileExistsError | NotADirectoryError):
            return OutputError(f"{target}: cannot write the output (a file stands where a folder should be)")
        return OutputError(f"{target}: cannot write the output ({type(exc).__name__}: {exc.strerror})")

    try:
        with atomic_path(target) as tmp, quiet_pydicom():
            ds.save_as(tmp, enforce_file_format=True)
    except OSError as exc:
        if exc.errno is None:  # pydicom reports a value it cannot encode as a bare OSError
            raise CorruptFileError(f"{target.name}: cannot be encoded as DICOM (invalid element)") from None
        raise unwritable(exc) from None
    except (AttributeError, TypeError, ValueError, KeyError, struct.error) as exc:
        raise CorruptFileError(f"{target.name}: cannot be encoded as DICOM ({type(exc).__name__})") from None


def _output_rel(ds: Dataset, rel: Path, layout: Layout) -> Path:
    name = f"{_text(ds.get('SOPInstanceUID'))}.dcm"
    if layout == "mirror":
        return rel.parent / name
    study = _text(ds.get("StudyInstanceUID")) or "no-study-uid"
    series = _text(ds.get("SeriesInstanceUID")) or "no-series-uid"
    return Path(study) / series / name


def _is_dicomdir(ds: Dataset) -> bool:
    return _text(ds.file_meta.get("MediaStorageSOPClassUID")) == DICOMDIR_SOP_CLASS


_Skip = Literal["dicomdir", "duplicate"]


def _process(
    path: Path,
    rel: Path,
    *,
    config: DeidConfig,
    limits: Limits,
    dst: Path,
    layout: Layout,
    seen: set[Path],
    target: Path | None = None,
) -> tuple[WrittenFile, DeidResult] | _Skip:
    """Read, clean and write one file (to ``target`` if given, else under ``dst`` by ``layout``).

    Returns what was written, or why it was skipped. Raises EmmaError only: anything unexpected becomes
    a CorruptFileError naming the exception type (pydicom messages may quote values).
    """
    try:
        with quiet_pydicom():
            ds = _read(path, limits)
            if _is_dicomdir(ds):
                return "dicomdir"
        result = deidentify_dataset(ds, config, in_place=True, label=None)
        out_rel = Path(target.name) if target is not None else _output_rel(ds, rel, layout)
        if out_rel in seen:
            return "duplicate"
        _atomic_save(ds, target if target is not None else dst / out_rel)
        for note in result.warnings:  # named by the output: input names may hold PHI
            logger.warning("deid: %s: %s", out_rel.as_posix(), note)
    except EmmaError:
        raise
    except OSError as exc:
        raise InputError(f"{rel.as_posix()}: {type(exc).__name__}: {exc.strerror}") from None
    except Exception as exc:  # one bad file must not stop a batch, nor print values in a traceback
        raise CorruptFileError(
            f"{rel.as_posix()}: unexpected {type(exc).__name__} while de-identifying"
        ) from None
    seen.add(out_rel)
    source = "" if target is not None else rel.as_posix()
    return WrittenFile(source=source, output=out_rel.as_posix(), warnings=tuple(result.warnings)), result


def deidentify_path(
    src: Path,
    dst: Path,
    config: DeidConfig,
    limits: Limits = DEFAULT_LIMITS,
    *,
    layout: Layout = "uid",
) -> DeidReport:
    """De-identify a file or a folder (recursively) into ``dst``.

    A file ``src`` with a ``dst`` ending in ``.dcm`` is written to exactly ``dst``; otherwise ``dst`` is a
    folder laid out by ``layout`` (see module doc). Each output is written atomically (temporary file,
    then ``os.replace``). In a folder, unreadable DICOM files are reported in ``failed`` and skipped,
    non-DICOM files and DICOMDIRs counted and skipped, a second file with an already written SOP
    Instance UID counted as a duplicate. A lone ``src`` file that fails raises its error
    (CorruptFileError, ImageTooLargeError, InputError). Same input and key → byte-identical outputs.
    """
    src, dst = check_path(src), Path(dst)
    report = DeidReport(src=src, dst=dst)
    totals: Counter[str] = Counter()
    if src.is_file():
        if not _looks_like_dicom(src):
            raise CorruptFileError(f"{src}: not a DICOM file")
        target = dst if dst.suffix.lower() == ".dcm" and not dst.is_dir() else None
        outcome = _process(
            src,
            Path(src.name),
            config=config,
            limits=limits,
            dst=dst,
            layout=layout,
            seen=set(),
            target=target,
        )
        if isinstance(outcome, str):
            raise InputError(f"{src}: a DICOMDIR index holds no images to de-identify")
        written, result = outcome
        report.written.append(written)
        report.actions = dict(result.actions)
        return report

    if dst.exists() and not dst.is_dir():
        raise InputError(f"{dst}: output must be a folder when the input is a folder")
    src_resolved, dst_resolved = src.resolve(), dst.resolve()
    if dst_resolved == src_resolved:
        raise InputError(f"{dst}: output folder must differ from the input folder")
    exclude = dst_resolved if dst_resolved.is_relative_to(src_resolved) else None
    seen: set[Path] = set()
    candidates = 0
    for path in _iter_files(src, exclude):
        rel = path.relative_to(src)
        if not _looks_like_dicom(path):
            report.skipped_non_dicom += 1
            continue
        candidates += 1
        try:
            outcome = _process(path, rel, config=config, limits=limits, dst=dst, layout=layout, seen=seen)
        except EmmaError as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            for prefix in (f"{path}: ", f"{rel.as_posix()}: "):
                message = message.removeprefix(prefix)
            report.failed.append(FailedFile(source=rel.as_posix(), error=message))
            logger.warning("deid: %s failed: %s", rel.as_posix(), message)
            continue
        if outcome == "dicomdir":
            report.skipped_dicomdir += 1
        elif outcome == "duplicate":
            report.skipped_duplicates += 1
            logger.warning("deid: an input duplicates an instance already written; skipped")
        else:
            written, result = outcome
            report.written.append(written)
            totals.update(result.actions)
    if candidates == 0:
        raise InputError(f"{src}: no DICOM files found")
    report.actions = dict(totals)
    return report


__all__ = [
    "BASIC_PROFILE",
    "BURNED_IN_RISK_MODALITIES",
    "CLASS_UID_KEYWORDS",
    "DESCRIPTOR_KEYWORDS",
    "PATIENT_CHARACTERISTIC_KEYWORDS",
    "SAFE_PRIVATE",
    "Action",
    "DeidConfig",
    "DeidReport",
    "DeidResult",
    "FailedFile",
    "WrittenFile",
    "date_shift_days",
    "deidentify_dataset",
    "deidentify_path",
    "is_deidentified",
    "patient_pseudonym",
    "phi_keywords_present",
    "remap_uid",
    "safe_private_tags",
]
