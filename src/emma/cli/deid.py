"""``emma deid``: DICOM de-identification."""

from __future__ import annotations

from emma.cli import app  # noqa: F401
