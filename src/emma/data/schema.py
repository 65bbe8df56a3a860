"""The canonical sample: every dataset, annotation job, trainer and evaluator speaks this schema.

Boxes are stored in canonical pixels of the original image ``(x1, y1, x2, y2)`` unless their
``space`` says otherwise; :meth:`Box.to_space` converts between pixel, 0-1000 and 0-1 spaces.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from emma.io.provenance import Provenance

SCHEMA_VERSION = 1


class TaskType(StrEnum):
    CLOSED_VQA = "closed_vqa"
    OPEN_VQA = "open_vqa"
    MULTIPLE_CHOICE = "multiple_choice"
    REPORT = "report"
    GROUNDING = "grounding"
    CAPTION = "caption"
    REASONING = "reasoning"
    CLASSIFICATION = "classification"  # multi-label findings of an image: gold.labels {finding: 0/1}


class CoordSpace(StrEnum):
    PIXEL = "pixel"  # pixels of the original image (canonical)
    NORM1000 = "norm1000"  # 0-1000 relative (Qwen2-VL, Qwen3-VL, InternVL)
    NORM1 = "norm1"  # 0-1 relative

    def scale(self, width: int, height: int) -> tuple[float, float]:
        """Units per original pixel along x and y."""
        if self is CoordSpace.PIXEL:
            return 1.0, 1.0
        full = 1000.0 if self is CoordSpace.NORM1000 else 1.0
        return full / width, full / height


class Box(BaseModel):
    model_config = ConfigDict(frozen=True)

    x1: float
    y1: float
    x2: float
    y2: float
    space: CoordSpace = CoordSpace.PIXEL
    label: str | None = None
    image_index: int = 0  # which of the sample's images the box is on

    @model_validator(mode="after")
    def _ordered(self) -> Box:
        if not (self.x2 >= self.x1 and self.y2 >= self.y1):
            raise ValueError(f"box corners out of order: ({self.x1}, {self.y1}, {self.x2}, {self.y2})")
        return self

    def to_space(self, space: CoordSpace, width: int, height: int) -> Box:
        """Convert to ``space``; ``width``/``height`` are those of the original image."""
        if width <= 0 or height <= 0:
            raise ValueError(f"invalid image size {width}x{height}")
        sx_from, sy_from = self.space.scale(width, height)
        sx_to, sy_to = space.scale(width, height)
        fx, fy = sx_to / sx_from, sy_to / sy_from
        return self.model_copy(
            update={
                "x1": self.x1 * fx,
                "y1": self.y1 * fy,
                "x2": self.x2 * fx,
                "y2": self.y2 * fy,
                "space": space,
            }
        )

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


class ImageRef(BaseModel):
    """An image of a sample: a path (relative to the dataset root, or absolute) or a content hash."""

    path: str | None = None  # JSONL stores: relative path of the image file
    sha256: str | None = None  # content hash (Parquet stores keep images by hash)
    width: int | None = None
    height: int | None = None
    provenance: Provenance | None = None

    @model_validator(mode="after")
    def _located(self) -> ImageRef:
        if self.path is None and self.sha256 is None:
            raise ValueError("an image needs a path or a sha256")
        return self


class Turn(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str
    images: list[int] = Field(default_factory=list)  # indices into Sample.images shown with this turn


class Gold(BaseModel):
    answer: str | None = None
    options: list[str] | None = None  # multiple choice, in display order (A, B, C, ...)
    answer_index: int | None = None  # index into options
    boxes: list[Box] = Field(default_factory=list)
    labels: dict[str, Any] = Field(default_factory=dict)  # e.g. {"pneumothorax": 1, "effusion": -1}

    @model_validator(mode="after")
    def _option_in_range(self) -> Gold:
        if self.answer_index is not None and (
            not self.options or not 0 <= self.answer_index < len(self.options)
        ):
            raise ValueError("answer_index must point into options")
        return self


class Meta(BaseModel):
    modality: str | None = None  # "xray", "ct", "mri", "us", "pathology", "fundus", ...
    body_part: str | None = None  # "head", "chest", "abdomen", ...
    findings: list[str] = Field(default_factory=list)
    split: str | None = None  # "train", "validation", "test"
    source: str | None = None  # dataset name, e.g. "vqa-rad"
    license: str | None = None
    patient_key: str | None = None  # pseudonymous key for leakage checks (never a real ID)
    study_key: str | None = None
    question_type: str | None = None  # dataset's own question category
    answer_type: str | None = None  # "closed" | "open" as the dataset labels it
    extra: dict[str, Any] = Field(default_factory=dict)


class Sample(BaseModel):
    """One training / evaluation example."""

    id: str
    task: TaskType
    images: list[ImageRef] = Field(default_factory=list)
    turns: list[Turn]
    gold: Gold = Field(default_factory=Gold)
    meta: Meta = Field(default_factory=Meta)
    schema_version: int = SCHEMA_VERSION

    @field_validator("id")
    @classmethod
    def _nonempty_id(cls, v: str) -> str:
        if not v:
            raise ValueError("sample id must not be empty")
        return v

    @model_validator(mode="after")
    def _image_indices(self) -> Sample:
        n = len(self.images)
        for turn in self.turns:
            for i in turn.images:
                if not 0 <= i < n:
                    raise ValueError(f"turn refers to image {i} but the sample has {n}")
        for box in self.gold.boxes:
            if not 0 <= box.image_index < max(n, 1):
                raise ValueError(f"box refers to image {box.image_index} but the sample has {n}")
        return self

    @property
    def question(self) -> str | None:
        """The first user turn's text (the question for VQA tasks)."""
        return next((t.content for t in self.turns if t.role == "user"), None)
