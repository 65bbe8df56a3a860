"""Model specs: one string names a model, :func:`load_model` turns it into a loaded model + processor.

Spec forms (see :func:`parse_spec`):

- ``emma-tiny``: the embedded default model (shipped as a delta on SmolLM2-135M-Instruct, rebuilt into
  the cache on first use: :mod:`emma.model.emma_tiny`).
- a local folder holding a transformers checkpoint (``config.json``).
- a Hugging Face hub id ``org/name`` (optionally ``org/name@revision``): downloaded only for such a spec,
  only when ``allow_download`` is true, and never when ``HF_HUB_OFFLINE`` is set (then only the local
  hub cache is used).
- ``openai:BASE_URL#MODEL``: a model behind any OpenAI-compatible server (served by
  :class:`emma.infer.openai_engine.OpenAIEngine`, not loaded here).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from emma.errors import InputError
from emma.model.loading import (
    CheckpointError,
    DeviceError,
    LoadedModel,
    ModelLoadError,
    UnsupportedModelError,
    load_local,
)

__all__ = [
    "EMMA_TINY",
    "CheckpointError",
    "DeviceError",
    "LoadedModel",
    "ModelLoadError",
    "ModelNotAvailableError",
    "ModelSpec",
    "ModelSpecError",
    "SpecKind",
    "UnsupportedModelError",
    "emma_tiny_dir",
    "load_model",
    "parse_spec",
    "resolve_folder",
    "resolve_hub",
]

SpecKind = Literal["emma-tiny", "emma-tiny-init", "tiny", "local", "hub", "openai"]

EMMA_TINY = "emma-tiny"
EMMA_TINY_INIT = "emma-tiny:init"  # emma-tiny's untrained start (the recipe's base), built on first use
TINY_PREFIX = "tiny:"  # tiny:<family>: a tiny random model of a family (tests, smoke recipes)
OPENAI_PREFIX = "openai:"
_MAX_SPEC_CHARS = 1024
# Hub ids as the hub accepts them: "org/name", each part 1-96 of [A-Za-z0-9._-], not starting with
# '.' or '-'; no "..", no "--" runs at the ends. An optional "@revision" (branch, tag or commit).
_HUB_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,95}"
_HUB_RE = re.compile(rf"^(?P<repo>{_HUB_PART}/{_HUB_PART})(?:@(?P<rev>[A-Za-z0-9._/-]{{1,128}}))?$")
_HUB_FILES = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken")
_MODEL_NAME_RE = re.compile(r"^[^\s\x00-\x1f\x7f]{1,256}$")


class ModelSpecError(InputError):
    """A model spec string that names nothing loadable (bad syntax, missing folder, ...)."""


class ModelNotAvailableError(InputError):
    """A well-formed spec whose model is not available here (not installed, not cached, offline)."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec; which fields are set depends on ``kind``."""

    kind: SpecKind
    path: Path | None = None  # local
    repo_id: str | None = None  # hub
    revision: str | None = None  # hub
    base_url: str | None = None  # openai
    model: str | None = None  # openai
    family: str | None = None  # tiny
    encoder: str | None = None  # emma-tiny-init: a packaged image encoder other than the default

    @property
    def name(self) -> str:
        """A short display name (model id or folder name), never a secret."""
        if self.kind == "local" and self.path is not None:
            return self.path.name or str(self.path)
        if self.kind == "hub" and self.repo_id:
            return self.repo_id
        if self.kind == "openai" and self.model:
            return self.model
        if self.kind == "tiny" and self.family:
            return f"tiny-{self.family}"
        if self.kind == "emma-tiny-init":
            return EMMA_TINY_INIT + (f":{self.encoder}" if self.encoder else "")
        return EMMA_TINY


def _one_line(text: str, limit: int = 80) -> str:
    """``text`` shortened to one printable line (safe to echo in an error message)."""
    flat = "".join(ch if ch.isprintable() else "?" for ch in " ".join(text.split()))
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec string; :class:`ModelSpecError` (an InputError) with a one-line reason if bad.

    Resolution order: ``emma-tiny``, ``emma-tiny:init[:<encoder>]``, ``tiny:<family>``; ``openai:``; an existing path (must be a folder with
    ``config.json``); something path-like that does not exist (error); a hub id.
    """
    if not isinstance(spec, str):
        raise ModelSpecError("model spec must be a string")
    text = spec.strip()
    if not text:
        raise ModelSpecError(
            "empty model spec: give emma-tiny, a local folder, a hub id (org/name) or openai:URL#MODEL"
        )
    if len(text) > _MAX_SPEC_CHARS:
        raise ModelSpecError(f"model spec too long ({len(text)} characters, at most {_MAX_SPEC_CHARS})")
    if text.lower() == EMMA_TINY:
        return ModelSpec(kind="emma-tiny")
    if text.lower() == EMMA_TINY_INIT:
        return ModelSpec(kind="emma-tiny-init")
    if text.lower().startswith(EMMA_TINY_INIT + ":"):
        from emma.model.vision_encoders import ENCODERS

        encoder = text[len(EMMA_TINY_INIT) + 1 :].lower()
        if encoder not in ENCODERS:
            raise ModelSpecError(
                f"unknown emma-tiny encoder {_one_line(encoder)!r} (known: {', '.join(ENCODERS)})"
            )
        return ModelSpec(kind="emma-tiny-init", encoder=encoder)
    if text.lower().startswith(TINY_PREFIX):
        from emma.model.tiny_families import TINY_FAMILIES

        family = text[len(TINY_PREFIX) :]
        if family not in TINY_FAMILIES:
            raise ModelSpecError(
                f"unknown tiny family {_one_line(family)!r} (known: {', '.join(TINY_FAMILIES)})"
            )
        return ModelSpec(kind="tiny", family=family)
    if text.lower().startswith(OPENAI_PREFIX):
        return _parse_openai(text[len(OPENAI_PREFIX) :])
    path = Path(text).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte, ...
        raise ModelSpecError(f"unusable model path: {_one_line(text)}") from None
    if exists:
        if not path.is_dir():
            raise ModelSpecError(f"model path is a file, not a model folder: {_one_line(text)}")
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model folder has no config.json: {_one_line(text)}")
        return ModelSpec(kind="local", path=path.resolve())
    if _looks_like_path(text):
        raise ModelSpecError(f"model folder not found: {_one_line(text)}")
    match = _HUB_RE.match(text)
    if match and not _bad_hub_id(match.group("repo")):
        return ModelSpec(kind="hub", repo_id=match.group("repo"), revision=match.group("rev"))
    raise ModelSpecError(
        f"unrecognised model spec {_one_line(text)!r}: give emma-tiny, a local folder with config.json, "
        "a hub id (org/name) or openai:URL#MODEL"
    )


def _looks_like_path(text: str) -> bool:
    if text.startswith(("/", "./", "../", "~", ".\\")) or "\\" in text or text in (".", ".."):
        return True
    head = text.split("@", 1)[0]  # a hub revision may contain slashes (refs/pr/1)
    return head.count("/") > 1 or head.endswith("/")


def _bad_hub_id(repo: str) -> bool:
    return any(".." in part or "--" in part or part.endswith((".", "-")) for part in repo.split("/"))


def _parse_openai(rest: str) -> ModelSpec:
    base_url, sep, model = rest.partition("#")
    base_url, model = base_url.strip(), model.strip()
    if not sep or not model:
        raise ModelSpecError("openai spec needs a model name: openai:BASE_URL#MODEL")
    if not _MODEL_NAME_RE.match(model):
        raise ModelSpecError(
            "openai model name must be 1-256 characters without spaces or control characters"
        )
    try:
        parts = urlsplit(base_url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ModelSpecError(f"openai base URL is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ModelSpecError("openai base URL must start with http:// or https://")
    if not parts.hostname:
        raise ModelSpecError("openai base URL has no host")
    if parts.username or parts.password:
        raise ModelSpecError("openai base URL must not carry credentials; pass the API key separately")
    if parts.query or any(ch.isspace() for ch in base_url):
        raise ModelSpecError("openai base URL must not contain a query string or spaces")
    return ModelSpec(kind="openai", base_url=base_url.rstrip("/"), model=model)


def emma_tiny_dir() -> Path:
    """The full model folder of the embedded default model, or :class:`ModelNotAvailableError`.

    The package ships emma-tiny as a delta on SmolLM2-135M-Instruct (``emma/assets/emma-tiny``);
    :func:`emma.model.emma_tiny.materialize` verifies its checksum and rebuilds the full model into the
    cache on first use (no network).
    """
    from emma.model.emma_tiny import DeltaError, materialize

    try:
        return materialize()
    except DeltaError as exc:
        raise ModelNotAvailableError(
            f"{exc}; or pass a local model folder, a hub id (org/name) or openai:URL#MODEL"
        ) from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub(spec: ModelSpec, *, allow_download: bool = True, trust_remote_code: bool = False) -> Path:
    """Local folder of a hub model: the hub cache, downloading only when allowed and not offline.

    Only configs, safetensors weights, tokenizer files and chat templates are fetched (plus ``*.py`` with
    ``trust_remote_code``): never pickled ``.bin`` weights.
    """
    assert spec.kind == "hub" and spec.repo_id
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    local_only = not allow_download or _hub_offline()
    patterns = list(_HUB_FILES) + (["*.py"] if trust_remote_code else [])
    try:
        folder = snapshot_download(
            spec.repo_id, revision=spec.revision, local_files_only=local_only, allow_patterns=patterns
        )
    except LocalEntryNotFoundError:
        why = "downloads are disabled" if not allow_download else "HF_HUB_OFFLINE is set"
        raise ModelNotAvailableError(
            f"hub model {spec.repo_id} is not in the local cache and {why}"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelNotAvailableError(
            f"could not download hub model {spec.repo_id}: {_one_line(str(exc), 160)}"
        ) from None
    return Path(folder)


def resolve_folder(spec: ModelSpec, *, allow_download: bool = True, trust_remote_code: bool = False) -> Path:
    """The local folder of any spec but ``openai:`` (built, materialized or downloaded as needed)."""
    if spec.kind == "emma-tiny":
        return emma_tiny_dir()
    if spec.kind == "emma-tiny-init":
        from emma.model.emma_tiny import init_dir

        return init_dir(encoder=spec.encoder) if spec.encoder else init_dir()
    if spec.kind == "tiny":
        assert spec.family is not None
        from emma.model.tiny_families import build_tiny

        return build_tiny(spec.family)
    if spec.kind == "hub":
        return resolve_hub(spec, allow_download=allow_download, trust_remote_code=trust_remote_code)
    if spec.kind == "local" and spec.path is not None:
        return spec.path
    raise ModelSpecError("openai: specs name a remote server, not local weights")


def load_model(
    spec: str | ModelSpec,
    *,
    device: str = "auto",
    dtype: str = "auto",
    quantization: str | None = None,
    allow_download: bool = True,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load the model a spec names with ``AutoModelForImageTextToText`` + its processor.

    ``device``: "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N". ``dtype``: "auto" (bf16
    on CUDA, fp32 on CPU), "fp32", "bf16", "fp16" (CUDA only). ``quantization``: None, "4bit" or "8bit"
    (bitsandbytes, CUDA only). Raises typed InputErrors (:class:`ModelSpecError`,
    :class:`ModelNotAvailableError`, :class:`ModelLoadError`) with one-line messages.
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    if parsed.kind == "openai":
        raise ModelSpecError(
            "openai: specs name a remote server; use emma.infer.factory.load_engine for them"
        )
    folder = resolve_folder(parsed, allow_download=allow_download, trust_remote_code=trust_remote_code)
    name = parsed.name
    local = load_local(
        folder, device=device, dtype=dtype, quantization=quantization, trust_remote_code=trust_remote_code
    )
    return dataclasses.replace(local, name=name)
