"""Shared fixtures for emma.io tests: real pydicom test files (skipped when absent) and a synthetic
DICOM factory bound to the test's tmp_path (see dicom_factory.make_dicom)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicom_factory import make_dicom


def testdata_path(name: str) -> str:
    """Path of a pydicom / pydicom-data test file, or skip the test. Never downloads."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover
        pytest.skip("pydicom test data not installed")
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return str(path)


@pytest.fixture
def testdata() -> Callable[[str], str]:
    """``testdata("CT_small.dcm")`` → local path of a pydicom test file (skips when absent)."""
    return testdata_path


@pytest.fixture
def dicom_file(tmp_path: Path) -> Callable[..., Path]:
    """``dicom_file(pixels, **make_dicom_kwargs)`` → a new synthetic DICOM file under tmp_path."""
    counter = itertools.count()

    def make(pixels: np.ndarray | None, name: str | None = None, **kwargs: Any) -> Path:
        return make_dicom(tmp_path / (name or f"synthetic_{next(counter):03d}.dcm"), pixels, **kwargs)

    return make
