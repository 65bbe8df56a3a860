"""Where a task's samples come from: an imported dataset folder, or an official release imported once.

``--data DIR`` is either

- a canonical dataset folder (it has ``dataset.json``): opened as it is; or
- an official release folder: imported once with the task's importer into a cache folder and opened
  from there. The cache folder is ``$EMMA_CACHE/eval-data/<importer>-<key>`` when ``EMMA_CACHE`` is
  set, else ``<run out dir>/data-cache/<importer>-<key>``; ``key`` hashes the resolved source path,
  the importer, its options and the modification times of the source folder and of its top-level
  entries, so an edited release is imported again. An interrupted import resumes (the importers are
  resumable) from ``<cache folder>.partial`` and is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emma.data.store import MANIFEST, Dataset, open_dataset
from emma.errors import DataFormatError

ImporterFn = Callable[..., Any]


@dataclass(frozen=True)
class DataSource:
    """How a task's dataset was obtained (recorded in results.json)."""

    dataset: Dataset
    src: str  # the --data folder as given (resolved)
    imported: bool  # True when an official release was imported into ``cache``
    cache: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "data": self.src,
            "dataset_name": self.dataset.name,
            "dataset_root": str(self.dataset.root),
            "imported_from_release": self.imported,
            "cache": self.cache,
        }


def is_canonical(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _mtimes(src: Path) -> list[tuple[str, int]]:
    entries = [(".", src.stat().st_mtime_ns)]
    for child in sorted(src.iterdir()):
        try:
            entries.append((child.name, child.stat().st_mtime_ns))
        except OSError:
            continue
    return entries


def cache_key(src: Path, importer: str, options: Mapping[str, Any]) -> str:
    payload = {
        "src": str(src.resolve()),
        "importer": importer,
        "options": {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in sorted(options.items())},
        "mtimes": _mtimes(src),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_root(out_dir: Path | None) -> Path:
    env = os.environ.get("EMMA_CACHE")
    if env:
        return Path(env) / "eval-data"
    if out_dir is None:
        raise DataFormatError("importing a release needs an output folder (--out) or EMMA_CACHE")
    return Path(out_dir) / "data-cache"


def resolve_data(
    data_dir: Path,
    importer_name: str,
    importer: ImporterFn,
    options: Mapping[str, Any],
    *,
    out_dir: Path | None,
) -> DataSource:
    """Open ``data_dir`` as a dataset, importing an official release once into the cache if needed."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataFormatError(f"{data_dir}: no such data folder")
    src = data_dir.resolve()
    if is_canonical(src):
        return DataSource(open_dataset(src), str(src), imported=False)
    key = cache_key(src, importer_name, options)
    final = cache_root(out_dir) / f"{importer_name}-{key}"
    if not is_canonical(final):
        partial = final.with_name(final.name + ".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        importer(src, partial, resume=partial.exists(), **dict(options))
        os.replace(partial, final)
    return DataSource(open_dataset(final), str(src), imported=True, cache=str(final))
