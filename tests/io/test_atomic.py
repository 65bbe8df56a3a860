"""emma.io.atomic: the one atomic-replace primitive (bytes, text, or a temporary path for a writer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from emma.io.atomic import atomic_path, atomic_write, remove_stale_temporaries


def _hidden(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("fsync", [True, False])
def test_atomic_write_replaces_bytes_and_text(tmp_path: Path, fsync: bool) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write(target, b"old", fsync=fsync)
    atomic_write(target, "new ü", fsync=fsync)
    assert target.read_text(encoding="utf-8") == "new ü"
    assert _hidden(target.parent) == []


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "image.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old" and _hidden(tmp_path) == []


def test_atomic_path_publishes_what_the_writer_wrote(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "a.bin", fsync=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.bin.")
        tmp.write_bytes(b"x" * 10)
    assert (tmp_path / "a.bin").read_bytes() == b"x" * 10 and _hidden(tmp_path) == []


def test_remove_stale_temporaries_only_touches_the_targets_own(tmp_path: Path) -> None:
    (tmp_path / ".a.json.k1.tmp").write_bytes(b"")
    (tmp_path / ".a.json.k2.tmp").write_bytes(b"")
    (tmp_path / ".b.json.k3.tmp").write_bytes(b"")
    assert remove_stale_temporaries(tmp_path, "a.json") == 2
    assert [p.name for p in _hidden(tmp_path)] == [".b.json.k3.tmp"]
