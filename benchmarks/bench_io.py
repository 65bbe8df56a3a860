"""DICOM → model-ready image throughput: emma's pipeline against plain pydicom + numpy.

Claim measured: ``emma.io.dicom.dicom_images`` (bounds checks, truncation check, modality LUT, VOI,
MONOCHROME1 inversion, uint8, RGB, provenance) costs no more than 10% over doing the same steps
directly with pydicom and numpy.

Cases (both paths run in the same process, interleaved, after warm-up; medians over ``--runs``):

- ``RG1_UNCI``: the real pydicom-data CR chest, 1955 x 1841, 15-bit stored, MONOCHROME1, with the
  file's window (both paths read WindowCenter/WindowWidth from the file and invert).
- ``CT series``: ``--slices`` synthetic 512 x 512 int16 CT slices with rescale slope/intercept,
  written to a temporary directory, windowed with the ``abdomen`` preset (40/400), one file at a time.

The baseline is what a careful user writes by hand: ``dcmread`` → ``pixel_array`` → float32 rescale
→ standard LINEAR window → invert when MONOCHROME1 → round to uint8 → stack to RGB. Outputs of the two
paths are compared (max absolute difference reported) so the timings measure the same work.

Usage: ``python benchmarks/bench_io.py [--runs 7] [--slices 64] [--out benchmarks/results/bench_io.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from rich.console import Console
from rich.table import Table

from emma.io.dicom import dicom_images
from emma.io.windows import PRESETS

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_io.json"
TARGET_RATIO = 1.10


# ----------------------------------------------------------------------------------------- baseline


def _first(value: object) -> float:
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def baseline_image(path: Path, window: tuple[float, float] | None) -> np.ndarray:
    """The same steps done directly with pydicom + numpy (one frame)."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    arr = arr * np.float32(slope) + np.float32(intercept)
    center, width = window if window is not None else (_first(ds.WindowCenter), _first(ds.WindowWidth))
    lo = center - 0.5 - (width - 1) / 2  # PS3.3 C.11.2.1.2.1 LINEAR
    arr = np.clip((arr - np.float32(lo)) / np.float32(width - 1), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        arr = 1.0 - arr
    gray = np.rint(arr * 255.0).astype(np.uint8)
    return np.stack([gray, gray, gray], axis=-1)


def emma_image(path: Path, window: str | None) -> np.ndarray:
    (image,) = dicom_images(path, window=window)
    return image.pixels


# ------------------------------------------------------------------------------------ synthetic CT


def write_ct_series(folder: Path, n_slices: int, size: int = 512, seed: int = 0) -> list[Path]:
    """A body-like phantom: air, soft tissue ellipse, lungs, spine; int16 stored = HU + 1024."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2, size / 2
    body = ((yy - cy) / (0.38 * size)) ** 2 + ((xx - cx) / (0.46 * size)) ** 2 <= 1
    lung_l = ((yy - cy * 0.9) / (0.22 * size)) ** 2 + ((xx - cx * 0.6) / (0.14 * size)) ** 2 <= 1
    lung_r = ((yy - cy * 0.9) / (0.22 * size)) ** 2 + ((xx - cx * 1.4) / (0.14 * size)) ** 2 <= 1
    spine = ((yy - cy * 1.45) / (0.06 * size)) ** 2 + ((xx - cx) / (0.06 * size)) ** 2 <= 1
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    hu[body] = 40.0
    hu[lung_l | lung_r] = -850.0
    hu[spine] = 700.0
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(n_slices):
        noisy = hu + rng.normal(0.0, 12.0, size=hu.shape).astype(np.float32)
        stored = np.clip(np.rint(noisy + 1024.0), -2048, 4095).astype(np.int16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "CT"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-180.0, -180.0, float(k) * 2.5]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 2.5
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1.0, -1024.0, "HU"
        ds.WindowCenter, ds.WindowWidth = 40.0, 400.0
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        path = folder / f"ct_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -------------------------------------------------------------------------------------------- timing


@dataclass
class CaseResult:
    name: str
    description: str
    images: int
    megapixels: float
    emma_runs_s: list[float] = field(default_factory=list)
    baseline_runs_s: list[float] = field(default_factory=list)
    max_abs_diff: int = 0
    emma_median_s: float = 0.0
    baseline_median_s: float = 0.0
    ratio: float = 0.0
    emma_images_per_s: float = 0.0
    baseline_images_per_s: float = 0.0

    def finish(self) -> None:
        self.emma_median_s = statistics.median(self.emma_runs_s)
        self.baseline_median_s = statistics.median(self.baseline_runs_s)
        self.ratio = self.emma_median_s / self.baseline_median_s
        self.emma_images_per_s = self.images / self.emma_median_s
        self.baseline_images_per_s = self.images / self.baseline_median_s


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(
    name: str,
    description: str,
    paths: list[Path],
    emma_window: str | None,
    base_window: tuple[float, float] | None,
    runs: int,
    warmup: int,
    repeat: int,
) -> CaseResult:
    """Time both paths over ``paths`` (each run processes every file ``repeat`` times)."""
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    result = CaseResult(
        name=name,
        description=description,
        images=len(paths) * repeat,
        megapixels=len(paths) * repeat * first.Rows * first.Columns / 1e6,
    )
    diffs = [
        int(
            np.abs(
                emma_image(p, emma_window).astype(np.int16) - baseline_image(p, base_window).astype(np.int16)
            ).max()
        )
        for p in paths
    ]
    result.max_abs_diff = max(diffs)

    def emma_all() -> None:
        for _ in range(repeat):
            for p in paths:
                emma_image(p, emma_window)

    def base_all() -> None:
        for _ in range(repeat):
            for p in paths:
                baseline_image(p, base_window)

    for _ in range(warmup):
        emma_all()
        base_all()
    for k in range(runs):  # interleave and alternate the order so drift hits both paths alike
        if k % 2 == 0:
            result.emma_runs_s.append(_time(emma_all))
            result.baseline_runs_s.append(_time(base_all))
        else:
            result.baseline_runs_s.append(_time(base_all))
            result.emma_runs_s.append(_time(emma_all))
    result.finish()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per path (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per path")
    parser.add_argument("--slices", type=int, default=64, help="slices in the synthetic CT series")
    parser.add_argument("--rg1-repeat", type=int, default=5, help="times RG1_UNCI is processed per run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 110))

    from pydicom.data import get_testdata_file

    results: list[CaseResult] = []
    rg1 = get_testdata_file("RG1_UNCI.dcm", download=False)
    if rg1 is None:
        console.print("[yellow]RG1_UNCI.dcm not available (pip install pydicom-data); skipping that case[/]")
    else:
        results.append(
            run_case(
                "RG1_UNCI",
                f"real CR 1955x1841 uint16 (15-bit), MONOCHROME1, file window; x{args.rg1_repeat} per run",
                [Path(rg1)],
                None,
                None,
                args.runs,
                args.warmup,
                args.rg1_repeat,
            )
        )
    abdomen = PRESETS["abdomen"]
    with tempfile.TemporaryDirectory(prefix="emma-bench-ct-") as tmp:
        paths = write_ct_series(Path(tmp), args.slices)
        results.append(
            run_case(
                f"CT {args.slices}x512x512",
                f"synthetic CT series, {args.slices} files 512x512 int16, slope/intercept, preset abdomen",
                paths,
                "abdomen",
                (abdomen.center, abdomen.width),
                args.runs,
                args.warmup,
                1,
            )
        )

    table = Table(title="DICOM → model-ready RGB uint8: emma vs pydicom+numpy baseline (medians)")
    for column in (
        "case",
        "images",
        "emma s",
        "baseline s",
        "emma img/s",
        "baseline img/s",
        "emma/baseline",
        "max |diff|",
    ):
        table.add_column(column, justify="left" if column == "case" else "right")
    for r in results:
        style = "green" if r.ratio <= TARGET_RATIO else "red"
        table.add_row(
            r.name,
            str(r.images),
            f"{r.emma_median_s:.4f}",
            f"{r.baseline_median_s:.4f}",
            f"{r.emma_images_per_s:.1f}",
            f"{r.baseline_images_per_s:.1f}",
            f"[{style}]{r.ratio:.3f}[/]",
            str(r.max_abs_diff),
        )
    console.print(table)

    payload = {
        "benchmark": "bench_io",
        "claim": f"emma dicom_images within {TARGET_RATIO:.2f}x of a direct pydicom+numpy pipeline",
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "numpy": np.__version__,
            "pydicom": pydicom.__version__,
        },
        "settings": {
            "runs": args.runs,
            "warmup": args.warmup,
            "slices": args.slices,
            "rg1_repeat": args.rg1_repeat,
        },
        "cases": [asdict(r) for r in results],
        "all_within_target": all(r.ratio <= TARGET_RATIO for r in results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
