"""Session-wide fixtures shared by every test package: tiny random-weight models of each family.

- ``tiny_model_dir("qwen2_5_vl")`` → the saved folder of a tiny model (built once, then reused from the
  on-disk cache of :mod:`emma.model.tiny`, also across pytest-xdist workers and runs).
- ``tiny_loaded("qwen2_5_vl")`` → a :class:`emma.model.registry.LoadedModel` on CPU (fp32), loaded once
  per session and shared: do not modify the model, processor or tokenizer you get (copy what you change).

Families: :data:`emma.model.tiny.TINY_FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from emma.model.registry import LoadedModel


@pytest.fixture(scope="session")
def tiny_model_dir() -> Callable[[str], Path]:
    from emma.model.tiny import build_tiny

    def get(family: str) -> Path:
        return build_tiny(family)

    return get


@pytest.fixture(scope="session")
def tiny_loaded() -> Callable[[str], LoadedModel]:
    from emma.model.tiny import load_tiny

    loaded: dict[str, LoadedModel] = {}

    def get(family: str) -> LoadedModel:
        if family not in loaded:
            loaded[family] = load_tiny(family)
        return loaded[family]

    return get
