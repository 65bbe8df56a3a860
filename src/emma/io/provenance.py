"""Provenance: the record of every transform between a file and a model-ready image."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Step(BaseModel):
    """One transform, e.g. ``Step(op="window", params={"center": 40, "width": 400, "source": "preset:abdomen"})``."""

    op: str
    params: dict[str, Any] = Field(default_factory=dict)


class Provenance(BaseModel):
    """Where an image came from and what was done to it, in order."""

    source: str  # file or folder path as given (never PHI)
    format: str  # "dicom", "dicom-series", "nifti", "png", "jpeg", "tiff", ...
    frame: int | None = None  # frame index within a multi-frame object
    slice_index: int | None = None  # slice index within a volume, in the sampled plane
    plane: str | None = None  # "axial" | "coronal" | "sagittal" for volume slices
    steps: list[Step] = Field(default_factory=list)

    def add(self, op: str, **params: Any) -> Provenance:
        self.steps.append(Step(op=op, params=params))
        return self
