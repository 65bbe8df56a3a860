"""One entry point from a model spec string to an :class:`~emma.infer.engine.Engine`.

``openai:BASE_URL#MODEL`` gives an :class:`OpenAIEngine` (API key from ``EMMA_OPENAI_API_KEY`` or
``OPENAI_API_KEY``); every other spec (``emma-tiny``, a local folder, a hub id) is loaded in-process
with :func:`emma.model.registry.load_model` behind a :class:`TransformersEngine`.
"""

from __future__ import annotations

import os
from typing import Any

from emma.infer.engine import Engine

_ENGINE_KEYS = ("max_batch_size", "max_prompt_tokens")
_OPENAI_KEYS = ("api_key", "concurrency", "max_retries", "timeout", "family")


def _openai_parts(spec: str) -> tuple[str, str]:
    from emma.model.registry import parse_spec

    parsed = parse_spec(spec)
    if parsed.kind != "openai":
        raise ValueError(f"not an openai: spec: {spec!r}")
    return str(parsed.base_url), str(parsed.model)


def load_engine(spec: str, **kw: Any) -> Engine:
    """An engine for ``spec``.

    Keyword arguments: for ``openai:`` specs ``api_key``, ``concurrency``, ``max_retries``, ``timeout``,
    ``family``; otherwise ``max_batch_size`` and ``max_prompt_tokens`` go to the TransformersEngine and
    the rest (``device``, ``dtype``, ``quantization``, ``allow_download``) to ``load_model``.
    """
    if spec.strip().lower().startswith("openai:"):
        from emma.infer.openai_engine import OpenAIEngine

        unknown = sorted(set(kw) - set(_OPENAI_KEYS))
        if unknown:
            raise ValueError(f"options not used by an openai: model: {', '.join(unknown)}")
        base_url, model = _openai_parts(spec)
        options = dict(kw)
        if options.get("api_key") is None:
            options["api_key"] = os.environ.get("EMMA_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY")
        return OpenAIEngine(base_url, model, **options)

    from emma.infer.transformers_engine import TransformersEngine
    from emma.model.registry import load_model

    engine_options = {k: kw.pop(k) for k in _ENGINE_KEYS if k in kw}
    return TransformersEngine(load_model(spec, **kw), **engine_options)
