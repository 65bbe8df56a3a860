"""Fuzzing emma.io with mutated real DICOM files: 0 crashes, 0 hangs, bounded memory.

Seeds are real files that packages carry (pydicom's test files, pydicom-data): CT, MR in every
encoding (explicit/implicit little endian, big endian, deflated, no preamble), compressed (RLE, JPEG-LS,
JPEG 2000, lossy JPEG), colour (RGB, YBR, palette), multi-frame and enhanced objects, modality and VOI
LUTs, and a file without pixel data. Each example changes a few header elements (a value of its VR
that is odd, out of range or garbage; a wrong VR; a deletion; a transfer syntax that does not match),
or a few bytes of the written file, and then runs the file through what a user runs on it: the
preprocessing path (:func:`emma.io.load.load_images`), ``emma info`` (:func:`emma.io.load.describe`),
the server's header plan (:func:`emma.io.plan.plan_images`) and de-identification
(:func:`emma.io.deid.deidentify_path`), the last also on a small series folder.

Accepted outcomes: a result, or an :class:`emma.errors.EmmaError` (the typed errors bad input gets).
Anything else (an IndexError from deep inside a reader, a struct.error, a numpy error, ...) is a crash.
"""

from __future__ import annotations

import copy
import io
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dicom_mutations import SEEDS, Mutation, Seed, Value, byte_edits, edit_bytes, mutations, seed, write
from fuzzing import MemoryWatch, fuzz_settings, hard_deadline
from hypothesis import assume, given, note
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from pydicom.data import get_testdata_file

from emma.errors import EmmaError
from emma.io.deid import DeidConfig, deidentify_path, is_deidentified
from emma.io.dicom import quiet_pydicom, read_dataset
from emma.io.limits import Limits
from emma.io.load import VolumeSampling, describe, load_images
from emma.io.plan import plan_images

# Bounds of the battery: what the server uses for uploads, a little tighter, so that a mutated
# Rows/Columns/NumberOfFrames is refused (or decoded) within the memory bound the test checks.
LIMITS = Limits(
    max_file_bytes=16 * 1024**2,
    max_pixels=16 * 1024**2,
    max_frames=256,
    max_slices=64,
    max_total_voxels=32 * 1024**2,
)
SAMPLING = VolumeSampling(n=2)
DEID = DeidConfig(key=b"fuzz-key-0123456789abcdef-not-secret")
MEMORY_GROWTH_MIB = 700.0  # decoding a file at LIMITS takes a few hundred MiB at most


# ------------------------------------------------------------------------------------- the checks


def run_typed(what: str, call: Callable[[], Any]) -> Any:
    """``call()``; an EmmaError is an accepted outcome (returns None), anything else fails the example."""
    try:
        return call()
    except EmmaError as exc:
        if currently_in_test_context():
            note(f"{what}: {type(exc).__name__}: {exc}")
        return None


def exercise_file(path: Path, out: Path) -> None:
    """Everything a user runs on one file: load (two windows), info, plan, de-identify (+ reload)."""
    run_typed("load_images", lambda: load_images(path, limits=LIMITS, sampling=SAMPLING))
    run_typed("load_images lung", lambda: load_images(path, window="lung", limits=LIMITS, sampling=SAMPLING))
    run_typed("describe", lambda: describe(path, LIMITS))
    run_typed("plan_images", lambda: plan_images(path, limits=LIMITS, sampling=SAMPLING))
    target = out / "deid.dcm"
    report = run_typed("deidentify_path", lambda: deidentify_path(path, target, DEID, LIMITS))
    if report is not None:
        clean = read_dataset(target, LIMITS)  # what deid wrote must read back, marked
        assert is_deidentified(clean)
        run_typed("load_images deid", lambda: load_images(target, limits=LIMITS, sampling=SAMPLING))


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="emma-fuzz-dicom-") as tmp:
        yield Path(tmp)


def _fresh(workdir: Path) -> tuple[Path, Path]:
    """An empty input file path and an empty output folder for one example."""
    out = workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    return workdir / "input.dcm", out


@fuzz_settings(examples=300)
@given(name=st.sampled_from(SEEDS), changes=mutations)
def test_header_mutations_give_typed_errors(workdir: Path, name: str, changes: list[Mutation]) -> None:
    path, out = _fresh(workdir)
    note(f"seed {name}: " + "; ".join(map(str, changes)))
    assume(write(seed(name), changes, path))
    with hard_deadline():
        exercise_file(path, out)


@fuzz_settings(examples=300)
@given(name=st.sampled_from(SEEDS), data=st.data())
def test_byte_mutations_give_typed_errors(workdir: Path, name: str, data: st.DataObject) -> None:
    original = seed(name).data
    edits = data.draw(byte_edits(len(original)), label="edits")
    path, out = _fresh(workdir)
    path.write_bytes(edit_bytes(original, edits))
    with hard_deadline():
        exercise_file(path, out)


# A small CT series: CT_small at three slice positions; one file mutated.
def _series(folder: Path, changes: list[Mutation], which: int) -> bool:
    base = seed("CT_small.dcm")
    with quiet_pydicom():
        ds = pydicom.dcmread(io.BytesIO(base.data), force=True)
    for k in range(3):
        copy_ds = copy.deepcopy(ds)
        copy_ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{k + 1}"
        copy_ds.InstanceNumber = k + 1
        position = [float(v) for v in ds.ImagePositionPatient]
        copy_ds.ImagePositionPatient = [position[0], position[1], position[2] + 5.0 * k]
        buf = io.BytesIO()
        with quiet_pydicom():
            copy_ds.save_as(buf, enforce_file_format=True)
        slice_seed = Seed(base.name, buf.getvalue(), base.implicit, base.little)
        if not write(slice_seed, changes if k == which else [], folder / f"s{k}.dcm"):
            return False
    return True


@fuzz_settings(examples=60)
@given(changes=mutations, which=st.integers(0, 2))
def test_series_with_a_mutated_slice_gives_typed_errors(
    workdir: Path, changes: list[Mutation], which: int
) -> None:
    folder, out = workdir / "series", workdir / "series-out"
    for d in (folder, out):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    note(f"slice {which}: " + "; ".join(map(str, changes)))
    assume(_series(folder, changes, which))
    with hard_deadline():
        run_typed("load_images series", lambda: load_images(folder, limits=LIMITS, sampling=SAMPLING))
        run_typed("describe series", lambda: describe(folder, LIMITS))
        report = run_typed("deidentify folder", lambda: deidentify_path(folder, out, DEID, LIMITS))
        if report is not None and report.written:
            run_typed("load_images deid series", lambda: load_images(out, limits=LIMITS, sampling=SAMPLING))


def test_battery_memory_is_bounded(workdir: Path, memory_watch: MemoryWatch) -> None:
    """The whole of a fixed sample of mutations, heavy ones included (frames, size, bits), stays within
    :data:`MEMORY_GROWTH_MIB` of resident memory at its peak."""
    heavy = [
        [Mutation("NumberOfFrames", Value("IS", "256"))],
        [Mutation("Rows", Value("US", [4096])), Mutation("Columns", Value("US", [4096]))],
        [Mutation("Rows", Value("US", [65535])), Mutation("Columns", Value("US", [65535]))],
        [Mutation("BitsAllocated", Value("US", [32])), Mutation("NumberOfFrames", Value("IS", "200"))],
        [Mutation("NumberOfFrames", Value("IS", "4096")), Mutation("Rows", Value("US", [1024]))],
    ]
    for name in SEEDS:
        for changes in heavy:
            path, out = _fresh(workdir)
            if write(seed(name), changes, path):
                with hard_deadline():
                    exercise_file(path, out)
            memory_watch.sample()
    assert memory_watch.growth_mib < MEMORY_GROWTH_MIB, f"peak RSS grew by {memory_watch.growth_mib:.0f} MiB"


def test_seeds_are_real_and_load() -> None:
    """The battery's seeds are there (never skipped) and the unmutated ones with pixel data load."""
    for name in SEEDS:
        s = seed(name)
        assert len(s.data) > 1000, name
    images = load_images(get_testdata_file("CT_small.dcm"), limits=LIMITS)
    assert len(images) == 1 and images[0].pixels.dtype == np.uint8
