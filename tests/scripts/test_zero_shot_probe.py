"""``scripts/zero_shot_probe.py``'s probe set: every image the model card counts is installed and loads."""

from __future__ import annotations

import importlib
import random
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module("zero_shot_probe")


def test_all_nine_probe_images_load_with_balanced_questions(probe: ModuleType) -> None:
    images = probe.probe_images()
    assert [i.name for i in images] == [
        "US1", "OBXXXX1A", "ALOKA", "echo-pl", "echo-px", "MR2", "RG3", "retina", "ihc"
    ]  # fmt: skip
    rng = random.Random(0)
    rows = [row for image in images for row in probe.questions(image, rng)]
    assert len(rows) == 32  # the card's 32 questions: 18 closed, 9 modality, 5 organ
    closed = [gold for kind, _, gold in rows if kind == "closed"]
    assert closed.count("yes") == closed.count("no") == 9
    for image in images:
        pil = image.load()
        assert pil.width >= 64 and pil.height >= 64 and pil.mode in ("RGB", "L", "RGBA", "I;16")
