"""Small chest X-ray releases built at test time from the REAL label files inside torchxrayvision.

torchxrayvision ships CheXpert's ``train.csv``, PadChest's label CSV and ChestX-ray14's
``Data_Entry_2017_v2020.csv`` (gzipped, in ``torchxrayvision/data``). The helpers here read the first
rows of those files at run time, write them in the official release layout into a temporary folder and
synthesise one small, distinct image per row under the name the CSV expects. Nothing of the CSVs is
copied into the repository. The package is located without importing it (it needs torchvision).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHEXPERT_CSV = "chexpert_train.csv.gz"
PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
NIH_CSV = "Data_Entry_2017_v2020.csv.gz"


def xrv_data() -> Path:
    """``torchxrayvision/data`` (the test is skipped when the package is not installed)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchxrayvision (real CheXpert/PadChest/NIH label files) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def iter_rows(name: str) -> Iterator[tuple[list[str], list[str]]]:
    """``(header, row)`` for each row of a gzipped CSV of torchxrayvision, streamed."""
    with gzip.open(xrv_data() / name, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        for row in reader:
            yield header, row


def head(name: str, n: int) -> tuple[list[str], list[list[str]]]:
    rows: list[list[str]] = []
    header: list[str] = []
    for columns, row in iter_rows(name):
        header = columns
        rows.append(row)
        if len(rows) == n:
            break
    return header, rows


def write_csv(path: Path, header: list[str], rows: list[list[str]], *, gz: bool = False) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(buf.getvalue().encode("utf-8")))
    else:
        path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def synth_image(path: Path, seed: int, *, bits16: bool = False, size: int = 48) -> None:
    """A distinct small grayscale image (8-bit JPEG/PNG, or a 16-bit PNG with 12-bit values)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    base = np.asarray(
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits16:
        values = (base / 255.0 * 3000 + 500).astype(np.uint16)  # 500..3500: white if read as 8 bits
        Image.fromarray(values).save(path)  # PIL writes mode I;16 as a 16-bit PNG
    else:
        Image.fromarray(base.astype(np.uint8)).save(path)


def chexpert_release(root: Path, n_train: int = 240, n_valid: int = 60) -> tuple[Path, list[dict[str, str]]]:
    """``CheXpert-v1.0-small/`` with train.csv (the first ``n_train`` real rows) and valid.csv (the
    next patients' rows, moved under ``valid/``); returns the folder and every row (with its split)."""
    header, rows = head(CHEXPERT_CSV, n_train + n_valid)
    src = root / "CheXpert-v1.0-small"
    train_rows, valid_rows = rows[:n_train], rows[n_train:]
    train_patients = {r[0].split("/")[2] for r in train_rows}
    valid_rows = [r for r in valid_rows if r[0].split("/")[2] not in train_patients]
    valid_rows = [[r[0].replace("/train/", "/valid/", 1), *r[1:]] for r in valid_rows]
    write_csv(src / "train.csv", header, train_rows)
    write_csv(src / "valid.csv", header, valid_rows)
    out: list[dict[str, str]] = []
    for split, group in (("train", train_rows), ("validation", valid_rows)):
        for r in group:
            rec = dict(zip(header, r)) | {"_split": split}
            synth_image(src / r[0].split("/", 1)[1], len(out))
            out.append(rec)
    return src, out


def padchest_release(root: Path, n: int = 300) -> tuple[Path, list[dict[str, str]]]:
    """A PadChest folder: the first ``n`` real rows as the gzipped labels CSV, 16-bit PNGs in
    ``<ImageDir>/<ImageID>``."""
    header, rows = head(PADCHEST_CSV, n)
    src = root / "padchest"
    write_csv(src / PADCHEST_CSV.removesuffix(".gz"), header, rows, gz=True)
    out = []
    for i, r in enumerate(rows):
        rec = dict(zip(header, r))
        synth_image(src / rec["ImageDir"] / rec["ImageID"], 10_000 + i, bits16=True)
        out.append(rec)
    return src, out


def chestxray14_release(root: Path, n: int = 300, lists: bool = True) -> tuple[Path, list[dict[str, str]]]:
    """A ChestX-ray14 folder: the first ``n`` real rows, official-style lists (odd patient ids → test, the
    last row's image in neither list), images split between ``images/`` and ``images_001/images/``."""
    header, rows = head(NIH_CSV, n)
    src = root / "chestxray14"
    write_csv(src / NIH_CSV.removesuffix(".gz"), header, rows)
    out = []
    for i, r in enumerate(rows):
        rec = dict(zip(header, r))
        folder = src / "images" if i % 2 else src / "images_001" / "images"
        synth_image(folder / rec["Image Index"], 20_000 + i)
        out.append(rec)
    if lists:
        test = [r["Image Index"] for r in out[:-1] if int(r["Patient ID"]) % 2]
        train_val = [r["Image Index"] for r in out[:-1] if not int(r["Patient ID"]) % 2]
        (src / "test_list.txt").write_text("\n".join(test) + "\n")
        (src / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    return src, out
