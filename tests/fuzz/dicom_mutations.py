"""Mutations of real DICOM files for the fuzz battery: header elements given odd values (written as raw
bytes, so that even values pydicom would refuse to encode reach the file), and byte edits.

Seeds are files that packages carry (pydicom's test files, pydicom-data), read without network; a missing
seed fails (install the test extra), it is never skipped.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from fuzzing import weighted
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from emma.io.dicom import quiet_pydicom

SEEDS = (
    "CT_small.dcm",  # CT, explicit VR little endian, rescale + window
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEG2000.dcm",
    "JPEG-lossy.dcm",
    "SC_rgb_small_odd.dcm",
    "SC_ybr_full_uncompressed.dcm",
    "examples_palette.dcm",
    "rtplan.dcm",  # no pixel data
    "image_dfl.dcm",  # deflated explicit VR little endian
    "no_meta.dcm",  # no preamble, no file meta
    "emri_small.dcm",  # multi-frame MR (pydicom-data)
    "liver.dcm",  # enhanced multi-frame (functional groups, pydicom-data)
    "mlut_18.dcm",  # modality LUT sequence (pydicom-data)
    "vlut_04.dcm",  # VOI LUT sequence (pydicom-data)
)

# Elements the readers act on (geometry, pixel description, LUTs, windows, enhanced groups, series
# sorting) and elements de-identification rewrites (names, dates, times, UIDs, character set).
KEYWORDS = (
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PlanarConfiguration",
    "PhotometricInterpretation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "ModalityLUTSequence",
    "VOILUTSequence",
    "LUTDescriptor",
    "LUTData",
    "RedPaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "ImageType",
    "Modality",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
    "PixelValueTransformationSequence",
    "FrameVOILUTSequence",
    "PixelMeasuresSequence",
    "PlanePositionSequence",
    "BurnedInAnnotation",
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientAge",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AcquisitionDateTime",
    "ContentDate",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyDescription",
    "PatientIdentityRemoved",
    "PixelData",
)
META_KEYWORDS = ("TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID")
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",  # deflated
    "1.2.840.10008.1.2.2",  # big endian
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",  # JPEG-LS
    "1.2.840.10008.1.2.4.90",  # JPEG 2000
    "1.2.840.10008.1.2.4.100",  # MPEG2 (no decoder)
    "1.2.840.10008.1.2.5",  # RLE
    "1.2.840.10008.1.2.4.201",  # HTJ2K
    "1.2.3.4",  # unknown
    "",
    "not a uid",
)


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    implicit: bool
    little: bool


def _seed(name: str) -> Seed:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is missing: install the test extra (pydicom-data)"
    data = Path(path).read_bytes()
    with quiet_pydicom():
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    implicit, little = ds.original_encoding
    return Seed(name, data, bool(implicit), little is not False)


_SEEDS: dict[str, Seed] = {}


def seed(name: str) -> Seed:
    if name not in _SEEDS:
        _SEEDS[name] = _seed(name)
    return _SEEDS[name]


# ------------------------------------------------------------------------------------------ values

_WEIRD_TEXT = (
    "",
    " ",
    "\\",
    "\\\\\\",
    "0",
    "-0",
    "1",
    "-1",
    "JA",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e400",
    "-1e400",
    "1e-400",
    "4294967296",
    "18446744073709551616",
    "9" * 40,
    "1\\2\\3",
    "1\\\\3",
    "0.5\\nan",
    "MOSAIC",
    "ORIGINAL\\PRIMARY\\MOSAIC",
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL_422",
    "PALETTE COLOR",
    "SIGMOID",
    "LINEAR_EXACT",
    "ISO_IR 100",
    "ISO 2022 IR 87",
    "GB18030",
    "ISO_IR 192",
    "19000101",
    "99991231",
    "00000000",
    "2023-01-15",
    "240000",
    "235960.9999999",
    "20231301120000.000000+9999",
    "090Y",
    "999Y",
    "-01Y",
    "YES",
    "^^^^",
    "=\u00e9=\u4e2d",
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.88.11",
)
_text = st.one_of(
    st.sampled_from(_WEIRD_TEXT),
    st.text(st.characters(codec="latin-1", exclude_characters="\x00"), max_size=24),
    st.text(max_size=8),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.lists(st.sampled_from(("", "0", "1.5", "-1", "x", "1e9")), min_size=2, max_size=4).map("\\".join),
)
_INT_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "UV": "Q", "SV": "q", "AT": "L"}
_FLOAT_FORMATS = {"FL": "f", "FD": "d", "OF": "f", "OD": "d"}
_BYTES_VRS = ("OB", "OW", "UN", "OL", "OV")
_EDGES = (0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 31, 32, 33, 64, 255, 256, 4096, 32767, 32768, 65535)


def _ints(vr: str) -> st.SearchStrategy[list[int]]:
    bits = struct.calcsize("<" + _INT_FORMATS[vr]) * 8
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if vr[0] == "S" else (0, 2**bits - 1)
    one = st.one_of(st.sampled_from([e for e in _EDGES if lo <= e <= hi] + [lo, hi]), st.integers(lo, hi))
    return st.one_of(one.map(lambda v: [v]), st.lists(one, max_size=4))


@dataclass(frozen=True)
class Value:
    """An element value to write as it is (``raw``: already bytes; else encoded for ``vr``)."""

    vr: str
    value: Any
    raw: bool = False

    def encode(self, little: bool) -> bytes:
        """The value's bytes in the file's byte order (string values padded to even length)."""
        if self.raw:
            return bytes(self.value)
        order = "<" if little else ">"
        if self.vr in _INT_FORMATS:
            return struct.pack(f"{order}{len(self.value)}{_INT_FORMATS[self.vr]}", *self.value)
        if self.vr in _FLOAT_FORMATS:
            return struct.pack(f"{order}{len(self.value)}{_FLOAT_FORMATS[self.vr]}", *self.value)
        if self.vr in _BYTES_VRS:
            data = bytes(self.value)
            return data + b"\0" if len(data) % 2 else data
        data = str(self.value).encode("utf-8")
        return data + (b"\0" if self.vr == "UI" else b" ") if len(data) % 2 else data

    def __repr__(self) -> str:
        return f"{self.vr}{' raw' if self.raw else ''} {self.value!r:.100}"


def value_for(vr: str) -> st.SearchStrategy[Value]:
    """Values of ``vr``: edge, out-of-range and garbage ones, or bytes of any length (a value that does
    not even fit the VR: an odd-length US, a 3-byte FL)."""
    if vr in _INT_FORMATS:
        typed = _ints(vr)
    elif vr in _FLOAT_FORMATS:
        width = 32 if _FLOAT_FORMATS[vr] == "f" else 64
        typed = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=width), max_size=4)
    elif vr in _BYTES_VRS:
        typed = st.binary(max_size=64)
    else:
        typed = _text
    raw = st.builds(Value, st.just(vr), st.binary(max_size=12), st.just(True))
    return weighted((2, st.builds(Value, st.just(vr), typed)), (1, raw))


_OTHER_VRS = ("US", "SS", "UL", "SL", "FL", "FD", "DS", "IS", "CS", "LO", "PN", "DA", "TM", "UI", "OB", "UN")


# --------------------------------------------------------------------------------------- mutations


@dataclass(frozen=True)
class Mutation:
    """Give ``keyword`` the ``value`` (None: delete it) in the ``where``-th dataset holding it, or in
    the top level (the file meta for its keywords); ``empty_sequence`` replaces a sequence by one
    with no items, or with one empty item."""

    keyword: str
    value: Value | None
    where: int = 0
    empty_items: int = 0

    def __str__(self) -> str:
        if self.value is None:
            return f"{self.keyword}: deleted (#{self.where})"
        if self.value.vr == "SQ":
            return f"{self.keyword}: SQ with {self.empty_items} empty items (#{self.where})"
        return f"{self.keyword} = {self.value!r} (#{self.where})"


def element_vr(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    vr = dictionary_VR(tag)
    return vr.split(" or ")[0]


def _mutation(keyword: str) -> st.SearchStrategy[Mutation]:
    own = element_vr(keyword)
    where = st.integers(0, 5)
    delete = st.builds(Mutation, st.just(keyword), st.none(), where)
    other_vr = st.builds(Mutation, st.just(keyword), st.sampled_from(_OTHER_VRS).flatmap(value_for), where)
    if own == "SQ":
        same = st.builds(Mutation, st.just(keyword), st.just(Value("SQ", None)), where, st.integers(0, 2))
    else:
        same = st.builds(Mutation, st.just(keyword), value_for(own), where)
    return weighted((1, delete), (1, other_vr), (3, same))


mutations = st.lists(
    weighted(
        (3, st.sampled_from(KEYWORDS).flatmap(_mutation)),
        (
            1,
            st.builds(
                Mutation,
                st.just("TransferSyntaxUID"),
                st.builds(Value, st.just("UI"), st.sampled_from(TRANSFER_SYNTAXES)),
            ),
        ),
        (1, st.sampled_from(META_KEYWORDS).flatmap(_mutation)),
    ),
    min_size=1,
    max_size=4,
)


def _items(ds: Dataset, limit: int) -> list[Dataset]:
    """The first ``limit`` items of each sequence of ``ds`` (elements that no longer parse are passed over:
    an earlier mutation may have made them garbage)."""
    out: list[Dataset] = []
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if raw is None or (raw.VR != "SQ" and (raw.VR is not None or not _is_sequence_tag(tag))):
            continue
        try:
            value = ds[tag].value
        except Exception:  # noqa: BLE001
            continue
        if isinstance(value, Sequence):
            out.extend(list(value)[:limit])
    return out


def _is_sequence_tag(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def _datasets(ds: Dataset) -> list[Dataset]:
    """The top level, then the first items of its sequences (two levels deep)."""
    out = [ds]
    for item in _items(ds, 4):
        out.append(item)
        out.extend(_items(item, 2))
    return out


def apply(ds: Dataset, mutation: Mutation, implicit: bool, little: bool) -> None:
    tag = tag_for_keyword(mutation.keyword)
    assert tag is not None, mutation.keyword
    if mutation.keyword in META_KEYWORDS:
        if getattr(ds, "file_meta", None) is None:
            ds.file_meta = FileMetaDataset()
        target: Dataset = ds.file_meta
        implicit, little = False, True  # the file meta is always explicit VR little endian
    else:
        holding = [d for d in _datasets(ds) if tag in d]
        target = holding[mutation.where % len(holding)] if holding else ds
    if mutation.value is None:
        if tag in target:
            del target[tag]
    elif mutation.value.vr == "SQ":
        items = []
        for _ in range(mutation.empty_items):
            item = Dataset()
            item.set_original_encoding(implicit, little, None)
            items.append(item)
        target[tag] = DataElement(tag, "SQ", Sequence(items))
    else:
        data = mutation.value.encode(little)
        target[tag] = RawDataElement(BaseTag(tag), mutation.value.vr, len(data), data, 0, implicit, little)


def write(seed: Seed, changes: list[Mutation], path: Path) -> bool:
    """Write ``seed`` with ``changes`` to ``path`` in the seed's own encoding, new values as raw bytes;
    False when pydicom cannot write the result (e.g. a changed character set makes it re-encode)."""
    with quiet_pydicom():
        ds = pydicom.dcmread(io.BytesIO(seed.data), force=True)
        for change in changes:
            apply(ds, change, seed.implicit, seed.little)
        writing = pydicom_config.settings.writing_validation_mode
        pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
        try:
            with path.open("wb") as fh:
                pydicom.dcmwrite(
                    fh,
                    ds,
                    implicit_vr=seed.implicit,
                    little_endian=seed.little,
                    enforce_file_format=False,
                    force_encoding=True,
                )
        except Exception:  # noqa: BLE001 — pydicom refuses some mutations on write: not a file
            return False
        finally:
            pydicom_config.settings.writing_validation_mode = writing
    return True


@st.composite
def byte_edits(draw: st.DrawFn, size: int) -> list[tuple[str, int, bytes]]:
    """A few edits of a file of ``size`` bytes: overwrite / insert / delete bytes, mostly in the header
    (past the preamble, in the first 4 KiB), or, now and then, truncate it."""
    edits = []
    header = st.integers(min(132, size - 1), min(size, 4096) - 1)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("overwrite",) * 4 + ("insert", "delete") * 2 + ("truncate",)))
        at = draw(weighted((2, header), (1, st.integers(0, size - 1))))
        data = draw(
            st.one_of(
                st.binary(min_size=1, max_size=8),
                st.sampled_from(
                    (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xff\xfe\x00\xe0", b"SQ", b"UN")
                ),
            )
        )
        edits.append((kind, at, data))
    return edits


def edit_bytes(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, at, chunk in edits:
        at = min(at, max(len(buf) - 1, 0))
        if kind == "overwrite":
            buf[at : at + len(chunk)] = chunk
        elif kind == "insert":
            buf[at:at] = chunk
        elif kind == "delete":
            del buf[at : at + len(chunk)]
        else:
            del buf[at:]
    return bytes(buf)
