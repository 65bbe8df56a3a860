"""Why a path cannot be used: missing, a broken symbolic link, a symbolic link loop; through emma.io."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from emma.errors import InputError
from emma.io.deid import DeidConfig, deidentify_path
from emma.io.load import describe, load_images
from emma.io.paths import check_path
from emma.io.volume import load_series


def test_each_reason_has_its_own_message(tmp_path: Path) -> None:
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")  # a -> b -> a
    os.symlink(tmp_path / "gone", tmp_path / "broken")
    (tmp_path / "file.dcm").write_bytes(b"x")
    os.symlink(tmp_path / "file.dcm", tmp_path / "good")
    with pytest.raises(InputError, match="symbolic link loop"):
        check_path(tmp_path / "a")
    with pytest.raises(InputError, match="broken symbolic link"):
        check_path(tmp_path / "broken")
    with pytest.raises(InputError, match="no such file or folder"):
        check_path(tmp_path / "missing")
    assert check_path(tmp_path / "good") == tmp_path / "good"  # a working link is followed


def test_every_reader_says_loop_for_a_loop(tmp_path: Path) -> None:
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    loop = tmp_path / "a"
    calls = [
        lambda: load_images(loop),
        lambda: describe(loop),
        lambda: load_series([loop]),
        lambda: deidentify_path(loop, tmp_path / "out", DeidConfig(key=b"k" * 32)),
    ]
    for call in calls:
        with pytest.raises(InputError, match="symbolic link loop") as info:
            call()
        assert "no such file" not in str(info.value)
