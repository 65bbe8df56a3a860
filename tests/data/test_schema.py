import pytest
from pydantic import ValidationError

from emma.data.schema import Box, CoordSpace, Gold, ImageRef, Sample, TaskType, Turn


def test_box_converts_between_spaces_and_back() -> None:
    box = Box(x1=100, y1=50, x2=300, y2=150, label="nodule")
    norm = box.to_space(CoordSpace.NORM1000, width=400, height=200)
    assert norm.as_tuple() == pytest.approx((250, 250, 750, 750))
    unit = norm.to_space(CoordSpace.NORM1, width=400, height=200)
    assert unit.as_tuple() == pytest.approx((0.25, 0.25, 0.75, 0.75))
    back = unit.to_space(CoordSpace.PIXEL, width=400, height=200)
    assert back.as_tuple() == pytest.approx(box.as_tuple())
    assert back.label == "nodule" and back.space is CoordSpace.PIXEL


def test_box_rejects_inverted_corners_and_bad_sizes() -> None:
    with pytest.raises(ValidationError):
        Box(x1=10, y1=10, x2=5, y2=20)
    with pytest.raises(ValueError):
        Box(x1=0, y1=0, x2=1, y2=1).to_space(CoordSpace.NORM1, 0, 10)


def test_sample_validates_image_indices_and_options() -> None:
    turns = [
        Turn(role="user", content="Is there a fracture?", images=[0]),
        Turn(role="assistant", content="no"),
    ]
    sample = Sample(id="1", task=TaskType.CLOSED_VQA, images=[ImageRef(path="a.png")], turns=turns)
    assert sample.question.endswith("fracture?")
    assert Sample.model_validate_json(sample.model_dump_json()) == sample
    with pytest.raises(ValidationError):
        Sample(id="2", task=TaskType.CLOSED_VQA, images=[], turns=turns)
    with pytest.raises(ValidationError):
        Gold(options=["a", "b"], answer_index=2)
    with pytest.raises(ValidationError):
        ImageRef()
