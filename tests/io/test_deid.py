"""De-identification (PS3.15 Annex E basic profile) on synthetic files with known PHI and on real files."""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from emma.errors import CorruptFileError, InputError, SeriesError
from emma.io.deid import (
    BASIC_PROFILE,
    CLASS_UID_KEYWORDS,
    DESCRIPTOR_KEYWORDS,
    PATIENT_CHARACTERISTIC_KEYWORDS,
    Action,
    DeidConfig,
    date_shift_days,
    deidentify_dataset,
    deidentify_path,
    is_deidentified,
    patient_pseudonym,
    phi_keywords_present,
    remap_uid,
    safe_private_tags,
)
from emma.io.volume import load_series

KEY = b"test-key-0123456789abcdef-not-secret"
CONFIG = DeidConfig(key=KEY)

# Known PHI planted in the synthetic files (distinctive so byte searches mean something).
NAME = "Zyxwvut^Quentin"
PATIENT_ID = "MRN-98765-QZ"
BIRTH = "19610723"
OTHER_NAME = "Plumtree^Ophelia"  # referring physician, observer in nested content
INSTITUTION = "Saint Qwerty Hospital"
STUDY_DATE = "20230115"
PHI_STRINGS = [NAME, "Zyxwvut", PATIENT_ID, BIRTH, OTHER_NAME, "Plumtree", INSTITUTION]

GEOMETRY = (
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceThickness",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
)


@pytest.fixture(autouse=True)
def no_phi_in_logs_or_output(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]):
    """Every test: nothing logged, printed or warned may contain the planted PHI."""
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    out, err = capsys.readouterr()
    seen = caplog.text + out + err + "\n".join(str(w.message) for w in caught)
    for phi in PHI_STRINGS:
        assert phi not in seen, f"PHI leaked into logs/output: {phi!r}"


def make_dataset(
    *,
    patient_id: str = PATIENT_ID,
    name: str = NAME,
    study_uid: str = "1.2.3.4.100",
    series_uid: str = "1.2.3.4.100.1",
    sop_uid: str = "1.2.3.4.100.1.1",
    referenced_sop: str | None = None,
    study_date: str = STUDY_DATE,
    acquisition_datetime: str = "20230115093012.250000+0100",
    z: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """A CT instance with PHI in the top level, nested sequences, private tags, overlays and file meta."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "QWERTY_PACS"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = study_uid + ".9"
    ds.Modality = "CT"
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.PatientBirthDate = BIRTH
    ds.PatientSex = "M"
    ds.PatientAge = "094Y"
    ds.OtherPatientIDs = PATIENT_ID + "-OLD"
    ds.PatientAddress = "12 Zyxwvut Lane"
    ds.ReferringPhysicianName = OTHER_NAME
    ds.InstitutionName = INSTITUTION
    ds.AccessionNumber = "ACC" + PATIENT_ID[-4:]
    ds.StudyID = PATIENT_ID[:16]
    ds.StudyDescription = "CT HEAD WITHOUT CONTRAST"
    ds.SeriesDescription = "AXIAL 5MM"
    ds.ImageComments = f"patient {NAME} id {PATIENT_ID}"
    ds.StudyDate = study_date
    ds.StudyTime = "231500"
    ds.SeriesDate = study_date
    ds.SeriesTime = "231612.5"
    ds.ContentDate = study_date
    ds.AcquisitionDateTime = acquisition_datetime
    ds.BurnedInAnnotation = "NO"
    # OtherPatientIDsSequence: an X sequence holding the name and ID
    other = Dataset()
    other.PatientID = PATIENT_ID
    other.IssuerOfPatientID = "QWERTY"
    ds.OtherPatientIDsSequence = Sequence([other])
    # SourceImageSequence: kept, with a UID that must be remapped consistently
    if referenced_sop:
        ref = Dataset()
        ref.ReferencedSOPClassUID = CTImageStorage
        ref.ReferencedSOPInstanceUID = referenced_sop
        ds.SourceImageSequence = Sequence([ref])
    # ContentSequence two levels deep: PN, DT, TextValue with PHI
    inner = Dataset()
    inner.ValueType = "PNAME"
    inner.PersonName = OTHER_NAME
    inner.DateTime = "20230115101500"
    middle = Dataset()
    middle.ValueType = "CONTAINER"
    middle.TextValue = f"seen by {OTHER_NAME} for {NAME}"
    middle.ObservationDateTime = "20230116"
    middle.ContentSequence = Sequence([inner])
    ds.ContentSequence = Sequence([middle])
    # private block with PHI, including a private sequence
    block = ds.private_block(0x0029, "ACME PHI", create=True)
    block.add_new(0x10, "LO", NAME)
    block.add_new(0x11, "LO", PATIENT_ID)
    item = Dataset()
    item.PatientName = NAME
    block.add_new(0x12, "SQ", Sequence([item]))
    # overlay (60xx) and curve (50xx) groups
    ds.add_new(0x60000010, "US", 16)
    ds.add_new(0x60000011, "US", 16)
    ds.add_new(0x60000022, "LO", f"overlay {NAME}")
    ds.add_new(0x60003000, "OW", b"\x00" * 32)
    ds.add_new(0x50000022, "LO", f"curve {NAME}")
    ds.Impressions = f"{NAME}: no acute findings"  # retired Results group 4008
    # pixels and geometry
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4095, size=(16, 12), dtype=np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.5, 0.75]
    ds.SliceThickness = 5.0
    ds.ImagePositionPatient = [-100.0, -120.5, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.PixelData = pixels.tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def all_elements(ds: Dataset):
    """Every element, file meta and nested sequence items included."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        yield from meta.iterall()
    yield from ds.iterall()


def assert_no_phi(ds: Dataset, raw: bytes) -> None:
    for elem in all_elements(ds):
        text = str(elem.value)
        for phi in PHI_STRINGS:
            assert phi not in text, f"{elem.keyword or elem.tag} still holds PHI"
    for phi in PHI_STRINGS:
        assert phi.encode() not in raw
    assert BIRTH.encode() not in raw
    assert STUDY_DATE.encode() not in raw  # every date moved


def written_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def days_between(before: str, after: str) -> int:
    return (
        date.fromisoformat(after[:4] + "-" + after[4:6] + "-" + after[6:8])
        - date(int(before[:4]), int(before[4:6]), int(before[6:8]))
    ).days


# --------------------------------------------------------------------------------------------- the table


def test_profile_table_names_real_attributes() -> None:
    for keyword in [*BASIC_PROFILE, *CLASS_UID_KEYWORDS]:
        assert tag_for_keyword(keyword) is not None, keyword
    assert set(BASIC_PROFILE) >= DESCRIPTOR_KEYWORDS
    assert set(BASIC_PROFILE) >= PATIENT_CHARACTERISTIC_KEYWORDS
    # spot checks against PS3.15 Table E.1-1 (basic profile column)
    assert BASIC_PROFILE["PatientBirthDate"] is Action.ZERO
    assert BASIC_PROFILE["PatientSex"] is Action.ZERO
    assert BASIC_PROFILE["AccessionNumber"] is Action.ZERO
    assert BASIC_PROFILE["PatientAge"] is Action.REMOVE
    assert BASIC_PROFILE["OtherPatientIDsSequence"] is Action.REMOVE
    assert BASIC_PROFILE["InstitutionName"] is Action.REMOVE
    assert BASIC_PROFILE["SOPInstanceUID"] is Action.UID
    for keyword in ("Rows", "PixelData", "ImagePositionPatient", "PixelSpacing", "RescaleSlope", "Modality"):
        assert keyword not in BASIC_PROFILE


def test_config_rejects_a_short_key() -> None:
    with pytest.raises(InputError, match="too short"):
        DeidConfig(key=b"short")


def test_uid_remap_is_keyed_deterministic_and_valid() -> None:
    uid = "1.2.840.113619.2.55.3.604688119.969.1234567890.123"
    new = remap_uid(KEY, uid)
    assert new == remap_uid(KEY, uid)
    assert new != remap_uid(b"another-key-0123456789", uid)
    assert new != remap_uid(KEY, uid + "4")
    assert re.fullmatch(r"2\.25\.(0|[1-9]\d*)", new) and len(new) <= 64
    assert int(new[5:]) < 2**128
    assert (int(new[5:]) >> 76) & 0xF == 8  # UUID version nibble


# --------------------------------------------------------------------------------------------- one dataset


def test_dataset_phi_removed_everywhere_pixels_and_geometry_kept(tmp_path: Path) -> None:
    original = make_dataset()
    original.preamble = NAME.encode().ljust(128, b"\0")  # dual-personality files put data in the preamble
    path = save(original, tmp_path / "in.dcm")
    ds = pydicom.dcmread(path)
    result = deidentify_dataset(ds, CONFIG)
    out = result.dataset
    assert ds.PatientName == NAME  # the input was not touched (deep copy)
    assert (
        out.file_meta.MediaStorageSOPInstanceUID
        == out.SOPInstanceUID
        == remap_uid(KEY, original.SOPInstanceUID)
    )

    saved = save(out, tmp_path / "out.dcm")
    raw = saved.read_bytes()
    back = pydicom.dcmread(saved)
    assert_no_phi(back, raw)
    assert raw[:128] == b"\0" * 128
    for uid in (original.SOPInstanceUID, original.StudyInstanceUID, original.SeriesInstanceUID):
        assert uid.encode() not in raw

    # identity: keyed pseudonyms, zeroed and removed attributes
    expected = patient_pseudonym(original, CONFIG)
    assert re.fullmatch(r"ANON[0-9A-F]{16}", expected)
    assert back.PatientID == expected and str(back.PatientName) == expected
    assert back.PatientBirthDate == "" and back.PatientSex == "" and back.AccessionNumber == ""
    removed = (
        "PatientAge", "OtherPatientIDs", "OtherPatientIDsSequence", "PatientAddress", "InstitutionName",
        "StudyDescription", "SeriesDescription", "ImageComments",
    )  # fmt: skip
    for gone in removed:
        assert gone not in back, gone
    assert back.ReferringPhysicianName == ""
    # private, overlays, curves, file meta AE title
    assert not any(e.tag.is_private for e in back.iterall())
    assert not any(e.tag.group in (0x5000, 0x6000) for e in back.iterall())
    assert "SourceApplicationEntityTitle" not in back.file_meta
    assert result.actions["private_removed"] == 4  # creator + 3 elements
    assert "Impressions" not in back
    assert result.actions["groups_removed"] == 6  # 4 overlay + 1 curve + 1 retired results element
    # nested content: PN emptied two levels down, TextValue removed, DT shifted
    middle = back.ContentSequence[0]
    assert "TextValue" not in middle
    inner = middle.ContentSequence[0]
    assert inner.PersonName == ""
    assert inner.ValueType == "PNAME"
    # markers
    assert back.PatientIdentityRemoved == "YES" and is_deidentified(back)
    assert back.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = [item.CodeValue for item in back.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107"]
    assert all(item.CodingSchemeDesignator == "DCM" for item in back.DeidentificationMethodCodeSequence)
    assert "EMMA deid 1" in list(back.DeidentificationMethod)
    # pixels and geometry untouched
    assert np.array_equal(back.pixel_array, original.pixel_array)
    for keyword in GEOMETRY:
        assert back[keyword].value == original[keyword].value, keyword
    assert back.Modality == "CT" and back.SOPClassUID == CTImageStorage
    assert result.warnings == []


def test_dates_shifted_by_one_per_patient_offset_and_times_kept() -> None:
    ds = make_dataset()
    out = deidentify_dataset(ds, CONFIG).dataset
    days = date_shift_days(ds, CONFIG)
    assert -4015 <= days <= -365
    assert days_between(STUDY_DATE, out.StudyDate) == days
    assert days_between(STUDY_DATE, out.SeriesDate) == days
    assert days_between(STUDY_DATE, out.ContentDate) == days
    # DT keeps its precision, fraction and UTC offset; only the date part moves (whole days)
    assert out.AcquisitionDateTime.endswith("093012.250000+0100")
    assert days_between("20230115", out.AcquisitionDateTime[:8]) == days
    nested = out.ContentSequence[0]
    assert (
        len(nested.ObservationDateTime) == 8 and days_between("20230116", nested.ObservationDateTime) == days
    )
    inner_dt = nested.ContentSequence[0].DateTime
    assert inner_dt.endswith("101500") and days_between("20230115", inner_dt[:8]) == days
    # times of day are kept by default
    assert out.StudyTime == "231500" and out.SeriesTime == "231612.5"
    # another patient gets another offset; the same patient the same one
    other = make_dataset(patient_id="MRN-11111-XX")
    assert date_shift_days(other, CONFIG) != days
    assert date_shift_days(make_dataset(study_date="20200101"), CONFIG) == days


def test_shift_times_moves_date_time_pairs_as_one_instant() -> None:
    config = DeidConfig(key=KEY, shift_times=True)
    ds = make_dataset()
    ds.TimeOfLastCalibration = "235959"  # a time without its date: wraps around midnight
    out = deidentify_dataset(ds, config).dataset

    def instant(d: str, t: str) -> datetime:
        return datetime.strptime(d + t.split(".")[0], "%Y%m%d%H%M%S")

    delta_study = instant(out.StudyDate, out.StudyTime) - instant(ds.StudyDate, ds.StudyTime)
    delta_series = instant(out.SeriesDate, out.SeriesTime) - instant(ds.SeriesDate, ds.SeriesTime)
    assert delta_study == delta_series
    assert out.SeriesTime.endswith(".5")  # fraction kept
    acq_before = datetime.strptime(ds.AcquisitionDateTime[:14], "%Y%m%d%H%M%S")
    acq_after = datetime.strptime(out.AcquisitionDateTime[:14], "%Y%m%d%H%M%S")
    assert acq_after - acq_before == delta_study
    assert delta_study.total_seconds() % 86400 != 0  # the time of day moved (seconds offset is keyed)
    # whole days of the combined shift match the date-only shift of the default mode within one day
    assert abs(delta_study.days - date_shift_days(ds, config)) <= 1
    assert "Times shifted per patient" in list(out.DeidentificationMethod)
    lone = datetime.strptime(out.TimeOfLastCalibration, "%H%M%S")
    assert (lone - datetime.strptime("235959", "%H%M%S")).total_seconds() % 86400 == (
        delta_study.total_seconds() % 86400
    )


@pytest.mark.parametrize(
    "value, kept_suffix",
    [("2023", None), ("202301", None), ("20230115", ""), ("2023011509", "09"), ("20230115093012", "093012"),
     ("20230115093012.5-0500", "093012.5-0500"), ("20230115+0100", "+0100")],
)  # fmt: skip
def test_datetime_precision_and_offset_survive_the_shift(value: str, kept_suffix: str | None) -> None:
    ds = make_dataset(acquisition_datetime=value)
    out = deidentify_dataset(ds, CONFIG).dataset.AcquisitionDateTime
    days = date_shift_days(ds, CONFIG)
    if kept_suffix is None:  # year or month precision: read as the 1st of January, moved, truncated
        moved = date(2023, 1, 1) + timedelta(days=days)
        assert out == f"{moved.year:04d}{moved.month:02d}"[: len(value)]
    else:
        assert out[8:] == kept_suffix
        assert days_between(value[:8], out[:8]) == days


def test_unparseable_dates_are_emptied_not_kept() -> None:
    ds = make_dataset()
    ds.ContentDate = "2023-1X-15"
    ds.AcquisitionDateTime = "garbage"
    result = deidentify_dataset(ds, CONFIG)
    assert result.dataset.ContentDate == ""
    assert result.dataset.AcquisitionDateTime == ""
    assert result.actions["dates_emptied"] == 2


def test_options_keep_descriptions_and_patient_characteristics() -> None:
    config = DeidConfig(key=KEY, keep_descriptions=True, keep_patient_characteristics=True)
    out = deidentify_dataset(make_dataset(), config).dataset
    assert out.StudyDescription == "CT HEAD WITHOUT CONTRAST" and out.SeriesDescription == "AXIAL 5MM"
    assert out.PatientSex == "M"
    assert out.PatientAge == "090Y"  # ages of 90 and over are capped
    assert "ImageComments" not in out  # comments are never kept
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107", "113108"]


def test_burned_in_annotation_warnings(caplog: pytest.LogCaptureFixture) -> None:
    yes = make_dataset()
    yes.BurnedInAnnotation = "YES"
    result = deidentify_dataset(yes, CONFIG)
    assert len(result.warnings) == 1 and "BurnedInAnnotation is YES" in result.warnings[0]
    assert any(
        "BurnedInAnnotation is YES" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
    )

    us_unknown = make_dataset()
    us_unknown.Modality = "US"
    del us_unknown.BurnedInAnnotation
    assert "modality US" in deidentify_dataset(us_unknown, CONFIG).warnings[0]

    us_clean = make_dataset()
    us_clean.Modality = "US"  # BurnedInAnnotation NO: nothing to warn about
    assert deidentify_dataset(us_clean, CONFIG).warnings == []

    ct_unknown = make_dataset()
    del ct_unknown.BurnedInAnnotation  # CT rarely carries burned-in text
    assert deidentify_dataset(ct_unknown, CONFIG).warnings == []

    real_us = pydicom.dcmread(get_testdata_file("US1_J2KR.dcm"))
    assert "BurnedInAnnotation" not in real_us
    assert any("modality US" in w for w in deidentify_dataset(real_us, CONFIG).warnings)


def test_invalid_values_holding_phi_do_not_leak_through_pydicom_warnings(tmp_path: Path) -> None:
    ds = make_dataset()
    # pydicom's validation messages quote the value: "Invalid value for VR DA: '...'"
    for keyword in ("PatientBirthDate", "PatientSex", "ContentDate"):
        del ds[keyword]  # elements keep the validation mode they were created with
    with pydicom_config.disable_value_validation():
        ds.PatientBirthDate = f"{BIRTH} {NAME}"  # DA, regex-validated
        ds.PatientSex = "Zyxwvut"  # CS allows upper case only
        ds.ContentDate = f"{PATIENT_ID}"  # a date pydicom cannot parse: emptied, never quoted
        ds.StationName = f"{NAME} {PATIENT_ID} too long for SH"
        ds.SeriesNumber = "7654321"
        path = save(ds, tmp_path / "bad_values.dcm")
    raw = path.read_bytes()
    assert raw.count(b"7654321 ") == 1
    path.write_bytes(raw.replace(b"7654321 ", b"Zyxwvut "))  # an IS holding a name: pydicom quotes it
    report = deidentify_path(path, tmp_path / "out.dcm", CONFIG)
    back = pydicom.dcmread(tmp_path / "out.dcm")
    assert report.ok and "StationName" not in back
    assert back.SeriesNumber is None  # text in a number: emptied
    assert_no_phi(back, (tmp_path / "out.dcm").read_bytes())
    # the autouse fixture checks that no pydicom warning quoting the values reached logs or warnings


def test_phi_keywords_present_lists_names_only() -> None:
    ds = make_dataset()
    found = phi_keywords_present(ds)
    expected = (
        "PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "ReferringPhysicianName",
        "OtherPatientIDsSequence", "StudyDate", "ImageComments", "PersonName", "TextValue",
    )  # fmt: skip
    for keyword in expected:
        assert keyword in found, keyword
    assert found[-1] == "private tags (4)"
    assert "Rows" not in found and "StudyInstanceUID" not in found
    assert not any(phi in entry for entry in found for phi in PHI_STRINGS)

    clean = deidentify_dataset(ds, CONFIG).dataset
    after = phi_keywords_present(clean)
    assert not any(entry.startswith("private") for entry in after)
    assert "InstitutionName" not in after and "PatientBirthDate" not in after  # removed / emptied
    assert "PatientName" in after  # a pseudonym is still a value: read PatientIdentityRemoved alongside

    real = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    n_private = sum(1 for e in real.iterall() if e.tag.is_private)
    assert n_private > 0 and f"private tags ({n_private})" in phi_keywords_present(real)


# --------------------------------------------------------------------------------------------- folders


def make_study(folder: Path) -> dict[str, Path]:
    """Two CT slices of one patient and study (one referencing the other), one slice of another patient."""
    a = make_dataset(sop_uid="1.2.3.4.100.1.1", z=0.0, seed=1)
    b = make_dataset(sop_uid="1.2.3.4.100.1.2", z=5.0, seed=2, referenced_sop="1.2.3.4.100.1.1")
    b.StudyDate = b.SeriesDate = b.ContentDate = "20230120"  # a later visit date of the same patient
    other = make_dataset(
        patient_id="MRN-22222-ZZ",
        study_uid="1.2.3.4.200",
        series_uid="1.2.3.4.200.1",
        sop_uid="1.2.3.4.200.1.1",
    )
    return {
        "a": save(a, folder / NAME.replace("^", "_") / "slice_a.dcm"),  # PHI in folder names on purpose
        "b": save(b, folder / NAME.replace("^", "_") / "sub" / "slice_b.dcm"),
        "other": save(other, folder / "other" / "x.dcm"),
    }


def test_folder_structure_uids_and_dates_consistent(tmp_path: Path) -> None:
    src, dst = tmp_path / "in", tmp_path / "out"
    paths = make_study(src)
    (src / "README.txt").write_text("not dicom")
    report = deidentify_path(src, dst, CONFIG)
    assert report.ok and len(report.written) == 3 and report.skipped_non_dicom == 1

    outputs = {w.source: dst / w.output for w in report.written}
    by_name = {key: pydicom.dcmread(outputs[p.relative_to(src).as_posix()]) for key, p in paths.items()}
    a, b, other = by_name["a"], by_name["b"], by_name["other"]
    # one study → one new study / series / frame-of-reference UID; instances stay distinct
    assert a.StudyInstanceUID == b.StudyInstanceUID == remap_uid(KEY, "1.2.3.4.100")
    assert a.SeriesInstanceUID == b.SeriesInstanceUID and a.FrameOfReferenceUID == b.FrameOfReferenceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert other.StudyInstanceUID != a.StudyInstanceUID
    for ds in (a, b, other):
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPInstanceUID.startswith("2.25.") and not ds.SOPInstanceUID.startswith("1.2.3.4")
    # the reference from b to a follows a's new UID; class UIDs are not remapped
    assert b.SourceImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert b.SourceImageSequence[0].ReferencedSOPClassUID == CTImageStorage
    # same patient: same day offset on both visits, so the 5-day interval survives
    shift_a = days_between(STUDY_DATE, a.StudyDate)
    assert days_between("20230120", b.StudyDate) == shift_a
    assert days_between(a.StudyDate, b.StudyDate) == 5
    assert days_between(STUDY_DATE, other.StudyDate) != shift_a
    assert a.PatientID == b.PatientID != other.PatientID
    # output names come from new UIDs only (uid layout), never from input names
    for w in report.written:
        assert "Zyxwvut" not in w.output
        study, series, name = w.output.split("/")
        ds = pydicom.dcmread(dst / w.output)
        assert (study, series, name) == (
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID + ".dcm",
        )
    for path in written_files(dst):
        assert_no_phi(pydicom.dcmread(path), path.read_bytes())


def test_rerun_is_idempotent_and_the_key_matters(tmp_path: Path) -> None:
    src = tmp_path / "in"
    make_study(src)
    first = deidentify_path(src, tmp_path / "out1", CONFIG)
    second = deidentify_path(src, tmp_path / "out1", CONFIG)  # same folder again: same files, same bytes
    third = deidentify_path(src, tmp_path / "out2", CONFIG)
    names = [w.output for w in first.written]
    assert names == [w.output for w in second.written] == [w.output for w in third.written]
    assert len(written_files(tmp_path / "out1")) == 3
    for name in names:
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()
    other_key = deidentify_path(src, tmp_path / "out3", DeidConfig(key=b"a-completely-different-key"))
    assert not set(names) & {w.output for w in other_key.written}


def test_mirror_layout_keeps_folders_and_renames_files(tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "case1").mkdir(parents=True)
    save(make_dataset(), src / "case1" / "Zyxwvut.dcm")
    report = deidentify_path(src, tmp_path / "out", CONFIG, layout="mirror")
    (written,) = report.written
    assert written.output == f"case1/{remap_uid(KEY, '1.2.3.4.100.1.1')}.dcm"


def test_output_inside_input_is_not_reprocessed(tmp_path: Path) -> None:
    src = tmp_path / "in"
    make_study(src)
    dst = src / "deid"
    assert len(deidentify_path(src, dst, CONFIG).written) == 3
    assert len(deidentify_path(src, dst, CONFIG).written) == 3
    assert len(written_files(dst)) == 3


def test_corrupt_files_are_reported_and_never_written(tmp_path: Path) -> None:
    src, dst = tmp_path / "in", tmp_path / "out"
    paths = make_study(src)
    good = paths["a"].read_bytes()
    (src / "truncated.dcm").write_bytes(good[: len(good) - 100])  # cut inside the pixel data
    (src / "garbage.dcm").write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(64))
    shutil.copy(get_testdata_file("MR_truncated.dcm"), src / "mr_truncated.dcm")
    (src / "empty.dcm").write_bytes(b"")
    report = deidentify_path(src, dst, CONFIG)
    assert not report.ok
    assert sorted(f.source for f in report.failed) == ["garbage.dcm", "mr_truncated.dcm", "truncated.dcm"]
    assert any("truncated" in f.error for f in report.failed)
    assert report.skipped_non_dicom == 1  # the empty file
    assert len(report.written) == 3
    files = written_files(dst)
    assert len(files) == 3 and not any(p.name.endswith(".part") or p.name.startswith(".") for p in files)
    for path in files:
        assert pydicom.dcmread(path).pixel_array.shape == (16, 12)  # every output is complete


def test_single_file_in_and_errors(tmp_path: Path) -> None:
    path = save(make_dataset(), tmp_path / "one.dcm")
    report = deidentify_path(path, tmp_path / "exact.dcm", CONFIG)
    assert report.written[0].output == "exact.dcm" and (tmp_path / "exact.dcm").exists()
    report = deidentify_path(path, tmp_path / "folder", CONFIG)
    assert (tmp_path / "folder" / report.written[0].output).exists()

    bad = tmp_path / "bad.dcm"
    bad.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CorruptFileError, match="truncated"):
        deidentify_path(bad, tmp_path / "bad_out.dcm", CONFIG)
    assert not (tmp_path / "bad_out.dcm").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    with pytest.raises(InputError, match="no such file"):
        deidentify_path(tmp_path / "missing", tmp_path / "x", CONFIG)
    (tmp_path / "textonly").mkdir()
    (tmp_path / "textonly" / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no DICOM files"):
        deidentify_path(tmp_path / "textonly", tmp_path / "y", CONFIG)


# --------------------------------------------------------------------------------------------- real files


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "RG1_UNCI.dcm", "US1_J2KR.dcm"])
def test_real_files(tmp_path: Path, name: str) -> None:
    source = Path(get_testdata_file(name))
    original = pydicom.dcmread(source)
    phi = [str(original.PatientName), str(original.PatientID)]
    report = deidentify_path(source, tmp_path / "out", CONFIG)
    out_path = tmp_path / "out" / report.written[0].output
    raw = out_path.read_bytes()
    back = pydicom.dcmread(out_path)
    for value in phi:
        assert value.encode() not in raw
    for elem in all_elements(back):
        assert not any(value in str(elem.value) for value in phi)
        assert not elem.tag.is_private
    assert back.SOPInstanceUID == remap_uid(KEY, original.SOPInstanceUID)
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert np.array_equal(back.pixel_array, original.pixel_array)
    for keyword in GEOMETRY:
        if keyword in original:
            assert back[keyword].value == original[keyword].value, keyword
    if original.get("StudyDate"):
        assert days_between(original.StudyDate, back.StudyDate) == date_shift_days(original, CONFIG)
    assert "InstitutionName" not in back and "StationName" not in back
    if name == "US1_J2KR.dcm":
        assert any("modality US" in w for w in report.warnings)
    else:
        assert report.warnings == []


# ------------------------------------------------------------------------ Retain Safe Private (Siemens CSA)

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SIEMENS_MOSAIC = SHARED_DATA / "dcm-qa-orientation" / "dicom" / "axasc35"


def _siemens_series() -> Path:
    if not SIEMENS_MOSAIC.is_dir():
        pytest.skip("dcm-qa-orientation Siemens mosaics not present")
    return SIEMENS_MOSAIC


def test_safe_private_tags_follow_the_creator_block_not_fixed_numbers() -> None:
    ds = Dataset()
    ds.add_new(0x00290010, "LO", "ANOTHER VENDOR")
    ds.add_new(0x00291010, "OB", b"other vendor data")
    ds.add_new(0x00290011, "LO", "SIEMENS CSA HEADER")  # the CSA block is 0029,11xx here
    ds.add_new(0x00291108, "CS", "IMAGE NUM 4")
    ds.add_new(0x00291109, "LO", "20140310")  # a version that is a date: not kept
    ds.add_new(0x00291110, "OB", b"SV10csa")
    ds.add_new(0x00291120, "OB", b"series protocol")  # the series header: not kept
    assert safe_private_tags(ds) == {0x00290011, 0x00291108, 0x00291110}
    out = deidentify_dataset(ds, DeidConfig(key=KEY, retain_safe_private=True)).dataset
    assert [int(e.tag) for e in out if e.tag.is_private] == [0x00290011, 0x00291108, 0x00291110]
    assert out[0x00291110].value == b"SV10csa"
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert "113111" in codes
    plain = deidentify_dataset(ds, CONFIG).dataset
    assert not any(e.tag.is_private for e in plain)
    assert "113111" not in [item.CodeValue for item in plain.DeidentificationMethodCodeSequence]


def test_siemens_mosaic_series_loads_after_deid_only_with_retain_safe_private(tmp_path: Path) -> None:
    series = _siemens_series()
    original = load_series(series)
    first = pydicom.dcmread(sorted(series.iterdir())[0], stop_before_pixels=True)
    secrets = [str(first.get(k)) for k in ("PatientName", "PatientID", "InstitutionName", "StationName",
               "DeviceSerialNumber", "ProtocolName", "StudyDate", "PatientBirthDate", "StudyInstanceUID",
               "SeriesInstanceUID", "FrameOfReferenceUID") if first.get(k)]  # fmt: skip

    plain = deidentify_path(series, tmp_path / "plain", CONFIG)
    assert len(plain.warnings) == 2 and all("Siemens mosaic" in w for w in plain.warnings)
    with pytest.raises(SeriesError, match="mosaic"):
        load_series(tmp_path / "plain")

    kept = deidentify_path(series, tmp_path / "kept", DeidConfig(key=KEY, retain_safe_private=True))
    assert kept.warnings == [] and kept.actions["private_kept"] == 2 * 3  # creator, type, info per file
    volume = load_series(tmp_path / "kept")
    assert np.array_equal(volume.data, original.data)
    np.testing.assert_allclose(volume.affine, original.affine)
    for path in written_files(tmp_path / "kept"):
        raw = path.read_bytes()
        for value in secrets:
            assert value.encode() not in raw, value
        back = pydicom.dcmread(path, stop_before_pixels=True)
        assert {int(e.tag) for e in back if e.tag.is_private} == {0x00290010, 0x00291008, 0x00291010}
