"""Dataset storage: real PNG images, both formats, crash and resume, streaming, conversion."""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from emma.data.schema import Box, Gold, ImageRef, Meta, Sample, TaskType, Turn
from emma.data.store import (
    MANIFEST,
    DatasetFormat,
    DatasetWriter,
    Manifest,
    convert,
    encode_png,
    open_dataset,
)
from emma.errors import CorruptFileError, DataFormatError, ImageTooLargeError
from emma.io.limits import Limits
from emma.io.provenance import Provenance

FORMATS: list[DatasetFormat] = ["jsonl", "parquet"]


def pixels(seed: int, width: int = 24, height: int = 16) -> np.ndarray:
    """A deterministic RGB pattern, different for every seed."""
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 7 + seed * 31) % 256
    g = (y * 13 + seed * 17) % 256
    b = (x * y + seed * 5) % 256
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_sample(i: int, *, n_images: int = 1, split: str | None = None) -> Sample:
    return Sample(
        id=f"s{i:04d}",
        task=TaskType.GROUNDING,
        images=[ImageRef(path=f"source/{i}-{k}.png") for k in range(n_images)],  # as imported; rewritten
        turns=[
            Turn(role="user", content=f"Where is the finding? ({i})", images=list(range(n_images))),
            Turn(role="assistant", content="<box>[[1,2,10,12]]</box>"),
        ],
        gold=Gold(
            answer="left apex",
            boxes=[Box(x1=1, y1=2, x2=10, y2=12, label="nodule")],
            labels={"pneumothorax": 1},
        ),
        meta=Meta(modality="xray", body_part="chest", split=split, source="synthetic", findings=["nodule"]),
    )


def image_rows(root: Path) -> int:
    """How many images a dataset folder stores (files or Parquet rows)."""
    parts = sorted((root / "images").glob("part-*.parquet"))
    if parts:
        return sum(pq.read_metadata(p).num_rows for p in parts)
    return sum(1 for p in (root / "images").glob("*/*") if not p.name.startswith("."))


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".part", ".tmp")) or p.name.startswith(".dataset")]


# ------------------------------------------------------------------------------------------ layout


def test_jsonl_layout_refs_and_pixels(tmp_path: Path) -> None:
    arrs = [pixels(k, 20 + k, 10 + k) for k in range(2)]
    file0 = tmp_path / "src0.png"
    file0.write_bytes(png_bytes(arrs[0]))
    prov = Provenance(source="chest.dcm", format="dicom").add("window", center=40, width=400)
    sample = make_sample(1, n_images=2).model_copy(
        update={"images": [ImageRef(path="chest.dcm", provenance=prov), ImageRef(path="other.png")]}
    )
    root = tmp_path / "ds"
    with DatasetWriter(root, name="demo", license="CC-BY-4.0", source="unit test") as w:
        assert not (root / MANIFEST).exists()
        stored = w.add(sample, [file0, Image.fromarray(arrs[1])])
        assert not (root / MANIFEST).exists()  # the manifest is written last

    sha0 = hashlib.sha256(file0.read_bytes()).hexdigest()
    ref0, ref1 = stored.images
    assert ref0.sha256 == sha0 and ref0.path == f"images/{sha0[:2]}/{sha0}.png"
    assert (ref0.width, ref0.height) == (20, 10) and (ref1.width, ref1.height) == (21, 11)
    assert ref0.provenance == prov and ref1.provenance is None
    assert (root / str(ref0.path)).read_bytes() == file0.read_bytes()  # stored as given, not re-encoded
    assert hashlib.sha256((root / str(ref1.path)).read_bytes()).hexdigest() == ref1.sha256
    assert stored.meta.split == "train"  # the default split is recorded in the sample

    lines = (root / "samples" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 1 and Sample.model_validate_json(lines[0]) == stored
    manifest = Manifest.model_validate_json((root / MANIFEST).read_text())
    assert (manifest.name, manifest.license, manifest.source, manifest.format) == (
        "demo",
        "CC-BY-4.0",
        "unit test",
        "jsonl",
    )
    assert manifest.counts == {"train": 1}

    ds = open_dataset(root)
    (back,) = list(ds.iter_samples())
    assert back == stored
    for ref, arr in zip(back.images, arrs, strict=True):
        assert ds.image_path(ref) == root / str(ref.path)
        np.testing.assert_array_equal(np.asarray(ds.open_image(ref).convert("RGB")), arr)
    assert leftovers(root) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_three_samples_sharing_an_image_store_it_once(tmp_path: Path, fmt: DatasetFormat) -> None:
    arr = pixels(3)
    path = tmp_path / "shared.png"
    path.write_bytes(png_bytes(arr))
    root = tmp_path / "ds"
    with DatasetWriter(root, name="shared", format=fmt) as w:
        a = w.add(make_sample(0), [path])
        b = w.add(make_sample(1), [path.read_bytes()])
        c = w.add(make_sample(2), [Path(str(path))])
        # a PIL image is stored once too, however often it is given
        d = w.add(make_sample(3), [Image.fromarray(pixels(4))])
        e = w.add(make_sample(4), [Image.fromarray(pixels(4))])
    assert a.images[0].sha256 == b.images[0].sha256 == c.images[0].sha256
    assert d.images[0].sha256 == e.images[0].sha256 != a.images[0].sha256
    assert image_rows(root) == 2
    ds = open_dataset(root)
    assert ds.count() == 5
    for s in ds.iter_samples():
        expected = pixels(4) if s.id in ("s0003", "s0004") else arr
        np.testing.assert_array_equal(np.asarray(ds.open_image(s.images[0])), expected)
    if fmt == "parquet":
        assert all(s.images[0].path is None for s in ds.iter_samples())
        with pytest.raises(DataFormatError):
            ds.image_path(a.images[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_splits_counts_and_flat_columns(tmp_path: Path, fmt: DatasetFormat) -> None:
    root = tmp_path / "ds"
    with DatasetWriter(root, name="splits", format=fmt, shard_size=3) as w:
        for i in range(7):
            w.add(make_sample(i, split="test" if i % 3 == 0 else None), [Image.fromarray(pixels(i))])
    ds = open_dataset(root)
    assert ds.splits == ["train", "test"]
    assert (ds.count(), ds.count("train"), ds.count("test")) == (7, 4, 3)
    assert [s.id for s in ds.iter_samples("test")] == ["s0000", "s0003", "s0006"]
    assert all(s.meta.split == "train" for s in ds.iter_samples("train"))
    with pytest.raises(DataFormatError, match="no split 'validation'"):
        ds.iter_samples("validation")
    if fmt == "parquet":
        shards = sorted(p.name for p in (root / "shards").iterdir())
        assert shards == ["test-00000.parquet", "train-00000.parquet", "train-00001.parquet"]
        table = pq.read_table(root / "shards" / "train-00000.parquet")
        assert table.column("id").to_pylist() == ["s0001", "s0002", "s0004"]
        assert set(table.column("modality").to_pylist()) == {"xray"}
        assert set(table.column("body_part").to_pylist()) == {"chest"}
        assert set(table.column("source").to_pylist()) == {"synthetic"}
        assert table.column("task").to_pylist() == ["grounding"] * 3
        assert Sample.model_validate_json(table.column("sample_json")[0].as_py()).id == "s0001"


# -------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicate_ids_and_unstored_refs_are_rejected(tmp_path: Path, fmt: DatasetFormat) -> None:
    root = tmp_path / "ds"
    with DatasetWriter(root, name="dup", format=fmt) as w:
        first = w.add(make_sample(1), [Image.fromarray(pixels(1))])
        with pytest.raises(DataFormatError, match="duplicate sample id 's0001'"):
            w.add(make_sample(1), [Image.fromarray(pixels(1))])
        # a ref to an image this dataset does not hold
        foreign = make_sample(2).model_copy(update={"images": [ImageRef(path="elsewhere.png")]})
        with pytest.raises(DataFormatError, match="not stored in this dataset"):
            w.add(foreign)
        # a ref by hash to an image already stored needs no bytes
        again = make_sample(3).model_copy(update={"images": [ImageRef(sha256=first.images[0].sha256)]})
        assert w.add(again).images[0] == first.images[0]
        # more images than refs
        with pytest.raises(DataFormatError, match="2 images given for 1"):
            w.add(again.model_copy(update={"id": "s0004"}), [b"a", b"b"])
        # fewer images than the turns show
        with pytest.raises(DataFormatError, match="1 images given for 2"):
            w.add(make_sample(5, n_images=2), [Image.fromarray(pixels(5))])
        # a sample that does not validate (model_construct skips the checks) is refused
        broken = Sample.model_construct(**{**make_sample(6, n_images=2).__dict__, "images": []})
        with pytest.raises(DataFormatError, match="'s0006': turn refers to image 1 but the sample has 1"):
            w.add(broken, [Image.fromarray(pixels(6))])
        assert not w.has_image(hashlib.sha256(encode_png(Image.fromarray(pixels(6)))).hexdigest())
        assert w.has_image(first.images[0].sha256 or "")
    assert [s.id for s in open_dataset(root).iter_samples()] == ["s0001", "s0003"]
    with pytest.raises(DataFormatError, match="resume=True"):
        DatasetWriter(root, name="dup", format=fmt)
    other: DatasetFormat = "parquet" if fmt == "jsonl" else "jsonl"
    with pytest.raises(DataFormatError, match=f"holds a {fmt} dataset"):
        DatasetWriter(root, name="dup", format=other, resume=True)
    with (
        DatasetWriter(root, name="dup", format=fmt, resume=True) as w,
        pytest.raises(DataFormatError, match="dup"),
    ):
        w.add(make_sample(1), [Image.fromarray(pixels(1))])


def test_bad_images_are_refused(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", name="bad", limits=Limits(max_pixels=100)) as w:
        with pytest.raises(CorruptFileError):
            w.add(make_sample(1), [b"not an image at all"])
        truncated = png_bytes(pixels(1, 8, 8))[:-30]
        with pytest.raises(CorruptFileError):
            w.add(make_sample(2), [truncated])
        with pytest.raises(ImageTooLargeError):
            w.add(make_sample(3), [png_bytes(pixels(3, 20, 20))])
        with pytest.raises(ImageTooLargeError):
            w.add(make_sample(4), [Image.fromarray(pixels(4, 20, 20))])
        with pytest.raises(DataFormatError, match="invalid split"):
            w.add(make_sample(5, split="../evil"), [png_bytes(pixels(5, 8, 8))])
        assert w.counts == {}
    assert open_dataset(tmp_path / "ds").count() == 0


def test_reader_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no dataset.json") as missing:
        open_dataset(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(DataFormatError, match="invalid manifest") as invalid:
        open_dataset(tmp_path)
    (tmp_path / MANIFEST).write_text(
        json.dumps({"name": "x", "format": "csv", "created": "2024-01-01T00:00:00Z"})
    )
    with pytest.raises(DataFormatError, match="format") as wrong:
        open_dataset(tmp_path)
    (tmp_path / MANIFEST).write_text(
        json.dumps({"name": "x", "format": "jsonl", "created": "2024-01-01T00:00:00Z", "counts": {"../x": 1}})
    )
    with pytest.raises(DataFormatError, match="invalid split"):
        open_dataset(tmp_path)
    for exc in (missing, invalid, wrong):
        assert "\n" not in str(exc.value)


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    with DatasetWriter(root, name="bad-lines") as w:
        for i in range(4):
            w.add(make_sample(i), [Image.fromarray(pixels(0))])
    path = root / "samples" / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = '{"id": "s0001", "task": "grounding", "turns": [{"ro'
    path.write_text("\n".join(lines) + "\n")
    it = open_dataset(root).iter_samples()
    assert next(it).id == "s0000"
    with pytest.raises(DataFormatError, match=r"train\.jsonl:2: invalid sample") as err:
        next(it)
    assert "\n" not in str(err.value)
    # valid JSON that breaks the schema (an unknown task) is reported the same way
    lines[1] = lines[0].replace('"grounding"', '"astrology"')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"train\.jsonl:2: invalid sample: task"):
        list(open_dataset(root).iter_samples())


def test_tampered_and_escaping_images_are_caught(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    with DatasetWriter(root, name="tamper") as w:
        stored = w.add(make_sample(1), [Image.fromarray(pixels(1))])
    ds = open_dataset(root)
    ref = stored.images[0]
    (root / str(ref.path)).write_bytes(png_bytes(pixels(2)))
    with pytest.raises(CorruptFileError, match="sha256"):
        ds.image_bytes(ref)
    with pytest.raises(DataFormatError, match="outside the dataset"):
        ds.image_path(ImageRef(path="../../etc/passwd"))
    with pytest.raises(DataFormatError, match="outside the dataset"):
        ds.image_path(ImageRef(path="/etc/passwd"))


# ---------------------------------------------------------------------------------- crash / resume


def shared_items(n: int, distinct: int = 3) -> list[tuple[Sample, list[bytes]]]:
    """n samples over ``distinct`` images (sample i shows image i % distinct); a third in the test split."""
    images = [png_bytes(pixels(k)) for k in range(distinct)]
    return [(make_sample(i, split="test" if i % 3 == 2 else None), [images[i % distinct]]) for i in range(n)]


def run_import(
    root: Path, fmt: DatasetFormat, items: list[tuple[Sample, list[bytes]]], fail_at: int | None = None
) -> int:
    """An importer as real ones are written: resume, skip what is stored, add the rest."""
    added = 0
    with DatasetWriter(root, name="resumable", format=fmt, shard_size=4, resume=True) as w:
        for i, (sample, images) in enumerate(items):
            if w.has(sample.id):
                continue
            if i == fail_at:
                raise RuntimeError("importer crashed")
            w.add(sample, images)
            added += 1
    return added


def check_complete(root: Path, items: list[tuple[Sample, list[bytes]]], distinct: int = 3) -> None:
    ds = open_dataset(root)
    ids = [s.id for s in ds.iter_samples()]
    assert sorted(ids) == sorted(s.id for s, _ in items) and len(ids) == len(set(ids))
    assert ds.count() == len(items)
    assert ds.count("test") == sum(1 for s, _ in items if s.meta.split == "test")
    assert image_rows(root) == distinct
    by_id = {s.id: imgs for s, imgs in items}
    for sample in ds.iter_samples():
        assert ds.image_bytes(sample.images[0]) == by_id[sample.id][0]
    assert leftovers(root) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_after_exception_loses_and_duplicates_nothing(tmp_path: Path, fmt: DatasetFormat) -> None:
    items = shared_items(14)
    root = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        run_import(root, fmt, items, fail_at=9)
    with pytest.raises(DataFormatError):  # no manifest: the dataset is not complete
        open_dataset(root)
    assert run_import(root, fmt, items) == 5  # only the samples after the crash are added
    check_complete(root, items)
    # a second resume of a complete dataset adds nothing and keeps it readable
    assert run_import(root, fmt, items) == 0
    check_complete(root, items)
    assert open_dataset(root).manifest.name == "resumable"


CRASH_SCRIPT = textwrap.dedent(
    """
    import io, os, sys
    import numpy as np
    from PIL import Image
    from emma.data.schema import Sample, Turn, TaskType, Meta
    from emma.data.store import DatasetWriter
    root, fmt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    w = DatasetWriter(root, name="resumable", format=fmt, shard_size=4, resume=True)
    for i in range(n):
        s = Sample.model_validate_json(sys.stdin.readline())
        arr = np.load(io.BytesIO(bytes.fromhex(sys.stdin.readline().strip())))
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        w.add(s, [buf.getvalue()])
    os._exit(3)  # killed: nothing is closed, flushed or cleaned up
    """
)


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_after_hard_kill(tmp_path: Path, fmt: DatasetFormat) -> None:
    items = shared_items(
        11, distinct=11
    )  # no image shared: a lost image is not brought back by a later sample
    root = tmp_path / "ds"
    lines = []
    for i, (sample, _) in enumerate(items[:10]):
        npy = io.BytesIO()
        np.save(npy, pixels(i))
        lines += [sample.model_dump_json(), npy.getvalue().hex()]
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(root), fmt, "10"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    assert not (root / MANIFEST).exists()
    if fmt == "jsonl":  # a torn last line, as a kill during a write leaves it
        with (root / "samples" / "train.jsonl.part").open("a") as f:
            f.write('{"id": "s0010", "task": "groun')
    with DatasetWriter(root, name="resumable", format=fmt, shard_size=4, resume=True) as w:
        done = sum(w.has(s.id) for s, _ in items)
        w.abort()
    # JSONL keeps every flushed line; Parquet keeps the shards closed before the kill: the first train
    # shard (s0000 s0001 s0003 s0004); the open ones (train s0006 s0007 s0009, test s0002 s0005 s0008) are gone
    assert done == (10 if fmt == "jsonl" else 4)
    assert run_import(root, fmt, items) == len(items) - done
    check_complete(root, items, distinct=11)


def test_writer_never_closed_keeps_flushed_lines(tmp_path: Path) -> None:
    items = shared_items(6)
    root = tmp_path / "ds"
    w = DatasetWriter(root, name="resumable", shard_size=4)
    for sample, images in items[:4]:
        w.add(sample, images)
    # the writer is abandoned without close(); a new run resumes beside it
    assert run_import(root, "jsonl", items) == 2
    check_complete(root, items)
    del w


# -------------------------------------------------------------------------------- streaming / convert


def test_streaming_a_few_thousand_samples(tmp_path: Path) -> None:
    root = tmp_path / "big"
    n = 3000
    with DatasetWriter(root, name="big", format="parquet", shard_size=1000) as w:
        shared = Image.fromarray(pixels(0))
        first = w.add(make_sample(0), [shared]).images[0]
        for i in range(1, n):
            w.add(make_sample(i).model_copy(update={"images": [first]}))
    assert sorted(p.name for p in (root / "shards").iterdir()) == [f"train-0000{k}.parquet" for k in range(3)]
    ds = open_dataset(root)
    assert ds.count() == n
    assert inspect.isgenerator(ds.iter_samples())

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    seen = 0
    for k, sample in enumerate(ds.iter_samples()):
        assert sample.id == f"s{k:04d}"
        seen += 1
    stream_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    everything = list(ds.iter_samples())
    list_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert seen == len(everything) == n
    assert stream_peak < list_peak / 4, (stream_peak, list_peak)
    np.testing.assert_array_equal(np.asarray(ds.open_image(everything[-1].images[0])), pixels(0))
    assert image_rows(root) == 1


def test_jsonl_parquet_jsonl_round_trip_is_identical(tmp_path: Path) -> None:
    src = tmp_path / "src"
    prov = Provenance(source="ct.nii.gz", format="nifti", slice_index=12, plane="axial").add(
        "window", preset="lung"
    )
    with DatasetWriter(
        src, name="rt", license="CC0", source="unit", description="round trip", extra={"version": 2}
    ) as w:
        for i in range(9):
            s = make_sample(i, n_images=2, split=["train", "validation", "test"][i % 3])
            s = s.model_copy(update={"images": [ImageRef(path="x", provenance=prov), ImageRef(path="y")]})
            w.add(s, [png_bytes(pixels(i % 4)), Image.fromarray(pixels(10 + i % 2))])
    mid = convert(src, tmp_path / "mid", "parquet", shard_size=4)
    back = convert(tmp_path / "mid", tmp_path / "back", "jsonl")
    original = list(open_dataset(src).iter_samples())
    assert list(back.iter_samples()) == original
    middle = list(mid.iter_samples())
    assert [s.model_copy(update={"images": []}) for s in middle] == [
        s.model_copy(update={"images": []}) for s in original
    ]
    for m, o in zip(middle, original, strict=True):
        assert [r.path for r in m.images] == [None, None]
        assert [r.model_copy(update={"path": None}) for r in o.images] == m.images
        assert [mid.image_bytes(r) for r in m.images] == [(src / str(r.path)).read_bytes() for r in o.images]
    for r in (r for s in original for r in s.images):
        assert (tmp_path / "back" / str(r.path)).read_bytes() == (src / str(r.path)).read_bytes()
    assert image_rows(tmp_path / "mid") == image_rows(tmp_path / "back") == image_rows(src) == 6
    for ds in (mid, back):
        mf = ds.manifest
        assert (mf.name, mf.license, mf.source, mf.description, mf.extra) == (
            "rt",
            "CC0",
            "unit",
            "round trip",
            {"version": 2},
        )
        assert mf.counts == {"train": 3, "validation": 3, "test": 3}
    with pytest.raises(DataFormatError, match="resume=True"):
        convert(src, tmp_path / "mid", "parquet")


def test_parquet_images_across_row_groups_and_parts(tmp_path: Path) -> None:
    root = tmp_path / "many"
    blobs = [png_bytes(pixels(k, 6, 5)) for k in range(75)]
    with DatasetWriter(root, name="many", format="parquet", shard_size=50) as w:
        for k, blob in enumerate(blobs):
            w.add(make_sample(k), [blob])
    parts = sorted((root / "images").glob("part-*.parquet"))
    # the image part is closed with the first sample shard (50 samples), the rest goes to a second part
    assert [pq.read_metadata(p).num_rows for p in parts] == [50, 25]
    assert pq.read_metadata(parts[0]).num_row_groups == 2  # 32 + 18: small groups, read one at a time
    ds = open_dataset(root)
    samples = list(ds.iter_samples())
    for k in [74, 0, 40, 3, 60, 33, 31, 32]:  # out of order: across groups, parts and the group cache
        assert ds.image_bytes(samples[k].images[0]) == blobs[k]


def test_resumed_writer_keeps_the_manifest_fields(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    with DatasetWriter(root, name="keep", license="CC0", description="first", extra={"k": 1}) as w:
        w.add(make_sample(0), [png_bytes(pixels(0))])
    created = open_dataset(root).manifest.created
    with pytest.raises(RuntimeError), DatasetWriter(root, name="keep", resume=True) as w:
        w.add(make_sample(1), [png_bytes(pixels(1))])
        raise RuntimeError("crash")
    assert not (root / MANIFEST).exists()  # the old manifest no longer describes the data
    with DatasetWriter(root, name="keep", resume=True) as w:
        assert w.has("s0000") and w.has("s0001")
        w.add(make_sample(2), [png_bytes(pixels(0))])
    m = open_dataset(root).manifest
    assert (m.license, m.description, m.extra, m.created, m.counts) == (
        "CC0",
        "first",
        {"k": 1},
        created,
        {"train": 3},
    )
    assert leftovers(root) == []
