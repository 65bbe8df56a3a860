"""Loading a model folder's processor for image + text use, with or without torchvision.

Why this module exists: in transformers 5.x every video processor needs torchvision, and the processors
of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, SmolVLM (v2), LLaVA-OneVision and InternVL declare a
``video_processor`` argument. Without torchvision, ``AutoProcessor.from_pretrained`` cannot build them at
all (it loads the video processor eagerly, transformers issue #48558), and even constructing the class
with ``video_processor=None`` fails its argument check. EMMA never sends video, and its platform is the
PyTorch CPU build without torchvision (PIL image processors), so for those processors we load an
*image-only* subclass of the family's own processor class: same tokenizer, same image processor (through
``AutoImageProcessor``, which picks the PIL backend when torchvision is absent), same chat template and
image-token expansion; only the video sub-processor is left out. ``save_pretrained`` on it writes the
upstream ``processor_class`` name, so saved folders stay standard.

Processors without a video sub-processor (Idefics3, LLaVA, Gemma 3, ...) load through ``AutoProcessor``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

_VIDEO = "video_processor"
_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


class _ImageOnlyMixin:
    """Drops the ``video_processor`` sub-processor of a transformers processor class (see module doc)."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return [a for a in super().get_attributes() if a != _VIDEO]  # type: ignore[misc]

    @classmethod
    def from_args_and_dict(cls, args: list[Any], processor_dict: dict[str, Any], **kwargs: Any) -> Any:
        # ``args`` holds the loaded sub-processors in ``get_attributes`` order; the upstream __init__
        # takes video_processor positionally (right after the tokenizer), so it gets None there.
        full = [a for a in super().get_attributes()]  # type: ignore[misc]
        position = full.index(_VIDEO)
        args = [*args[:position], None, *args[position:]]
        processor_dict = {k: v for k, v in processor_dict.items() if k != _VIDEO}
        return super().from_args_and_dict(args, processor_dict, **kwargs)  # type: ignore[misc]


@functools.cache
def image_only_class(base: type) -> type:
    """An image-only subclass of the processor class ``base`` (same ``__name__``, so saved configs name
    the upstream class); ``base`` itself when it has no video sub-processor."""
    if _VIDEO not in base.get_attributes():  # type: ignore[attr-defined]
        return base
    return type(base.__name__, (_ImageOnlyMixin, base), {"__module__": __name__, "__doc__": base.__doc__})


def processor_class_name(folder: Path) -> str | None:
    """The ``processor_class`` a saved folder declares, else the default for its ``model_type``."""
    for name in _CONFIG_FILES:
        data = _read_json(folder / name)
        value = data.get("processor_class") if data else None
        if isinstance(value, str) and value:
            return value
    config = _read_json(folder / "config.json") or {}
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    value = PROCESSOR_MAPPING_NAMES.get(model_type)
    return value if isinstance(value, str) else None


def load_processor(folder: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The processor of a local model folder, image-only where the upstream class needs a video processor.

    Raises whatever transformers raises for a broken folder (the caller wraps it in a typed error).
    """
    import transformers
    from transformers import AutoProcessor

    path = Path(folder)
    name = processor_class_name(path)
    base = getattr(transformers, name, None) if name else None
    if isinstance(base, type) and hasattr(base, "get_attributes"):
        cls = image_only_class(base)
        if cls is not base:
            return cls.from_pretrained(str(path), local_files_only=True)
    return AutoProcessor.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, local_files_only=True
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
