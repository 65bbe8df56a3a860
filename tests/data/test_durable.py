"""Crash-safe primitives (emma.data.durable) and dataset resume from every state a kill can leave."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from emma.data.durable import (
    LOCK_FILE,
    FolderBusyError,
    append_lines,
    atomic_write,
    cut_torn_tail,
    exclusive_folder,
    remove_stale_temporaries,
)
from emma.data.schema import Meta, Sample, Turn
from emma.data.store import DatasetWriter, open_dataset
from emma.eval.predictions import Prediction, PredictionCache


def _sample(sid: str, split: str = "train") -> Sample:
    return Sample(
        id=sid, task="caption", turns=[Turn(role="user", content=f"q {sid}")], meta=Meta(split=split)
    )


def _line(sid: str, split: str = "train") -> bytes:
    return _sample(sid, split).model_dump_json().encode() + b"\n"


# ------------------------------------------------------------------------------------------ primitives


def test_cut_torn_tail_keeps_whole_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"a":1}\n{"a":2}\n{"a":')
    assert cut_torn_tail(path) == 5
    assert path.read_bytes() == b'{"a":1}\n{"a":2}\n'
    assert cut_torn_tail(path) == 0
    path.write_bytes(b'{"no newline at all"')
    assert cut_torn_tail(path) == 20 and path.read_bytes() == b""


def test_append_lines_after_a_cut_never_continues_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    append_lines(path, ['{"k":1}'])
    with path.open("ab") as f:
        f.write(b'{"k":2, "torn')  # a kill in the middle of a write
    cut_torn_tail(path)
    append_lines(path, ['{"k":3}', '{"k":4}'])
    assert [json.loads(x)["k"] for x in path.read_text().splitlines()] == [1, 3, 4]


def test_atomic_write_leaves_old_or_new_and_stale_temporaries_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    atomic_write(path, "old")
    (tmp_path / ".results.json.abc123.tmp").write_text("half of a killed write")
    atomic_write(path, b"new")
    assert path.read_text() == "new"
    assert remove_stale_temporaries(tmp_path, "results.json") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_folder_lock_refuses_a_second_writer_and_dies_with_its_holder(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    with (
        exclusive_folder(folder),
        pytest.raises(FolderBusyError, match=f"pid {os.getpid()}"),
        exclusive_folder(folder),
    ):
        pass
    with exclusive_folder(folder):  # released on exit
        pass
    # a holder killed with SIGKILL never leaves a stale lock
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom emma.data.durable import exclusive_folder\n"
            f"with exclusive_folder({str(folder)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == b"held"
    with pytest.raises(FolderBusyError, match=f"pid {child.pid}"), exclusive_folder(folder):
        pass
    child.send_signal(signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 5
    while True:
        try:
            with exclusive_folder(folder):
                break
        except FolderBusyError:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert (folder / LOCK_FILE).exists()


# --------------------------------------------------------------------------------- dataset resume


def test_resume_commits_a_part_file_and_cuts_its_torn_line(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "samples").mkdir(parents=True)
    (root / "samples" / "train.jsonl.part").write_bytes(_line("a") + _line("b") + b'{"id": "c", "ta')
    (root / "samples" / ".train.jsonl.x1.tmp").write_bytes(b"half a rewrite")
    with DatasetWriter(root, name="t", resume=True) as w:
        assert w.has("a") and w.has("b") and not w.has("c")
        w.add(_sample("c"))
    assert [s.id for s in open_dataset(root)] == ["a", "b", "c"]
    assert sorted(p.name for p in (root / "samples").iterdir()) == ["train.jsonl"]


def test_resume_merges_a_part_beside_a_committed_file_and_drops_repeated_ids(tmp_path: Path) -> None:
    """States two overlapping writers (before the folder lock) could leave: resumed, never refused."""
    root = tmp_path / "ds"
    (root / "samples").mkdir(parents=True)
    (root / "samples" / "train.jsonl").write_bytes(_line("a") + _line("b") + _line("a"))
    (root / "samples" / "train.jsonl.part").write_bytes(_line("b") + _line("c"))
    (root / "samples" / "rejected.jsonl").write_bytes(_line("c", "rejected") + _line("d", "rejected"))
    with DatasetWriter(root, name="t", resume=True) as w:
        assert w.counts == {"train": 3, "rejected": 1}
        w.add(_sample("e"))
    ds = open_dataset(root)
    assert [s.id for s in ds.iter_samples("train")] == ["a", "b", "c", "e"]
    assert [s.id for s in ds.iter_samples("rejected")] == ["d"]
    assert sorted(p.name for p in (root / "samples").iterdir()) == ["rejected.jsonl", "train.jsonl"]
    with DatasetWriter(root, name="t", resume=True) as w:  # and again: nothing more to repair
        assert w.counts == {"train": 4, "rejected": 1}


def test_resume_drops_repeated_ids_of_parquet_shards(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    for name in ("one", "two"):
        with DatasetWriter(tmp_path / name, name="t", format="parquet") as w:
            w.add(_sample("a"), [image])
            w.add(_sample("b" if name == "one" else "c"), [image])
    root = tmp_path / "one"
    (tmp_path / "two" / "shards" / "train-00000.parquet").rename(root / "shards" / "train-00001.parquet")
    with DatasetWriter(root, name="t", format="parquet", resume=True) as w:
        assert w.counts == {"train": 3}
    assert [s.id for s in open_dataset(root)] == ["a", "b", "c"]


# ---------------------------------------------------------------------------------- prediction cache


def test_prediction_cache_cuts_a_torn_line_and_keeps_the_first_of_a_key(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    cache = PredictionCache(path)
    p = Prediction(id="1", prompt_hash="h", model="m", decoding="d", ablation="none", prediction="yes")
    cache.append([p])
    with path.open("a") as f:
        f.write(json.dumps({**json.loads(p.to_json()), "prediction": "no"}) + "\n")  # a repeated key
        f.write('{"v": 1, "id": "2", "pred')  # torn
    reopened = PredictionCache(path)
    assert len(reopened) == 1 and reopened.get(p.key).prediction == "yes"  # type: ignore[union-attr]
    assert path.read_text().endswith("}\n")
