"""Predictions: the resumable generation cache of a run, and user-supplied prediction files.

**Cache** (:class:`PredictionCache`, ``<out>/predictions.jsonl``): one JSON object per generated
answer, appended as soon as its batch returns (write, flush, ``fsync``), so a killed run loses at most
the batch in flight. A record is keyed by the sample id, the prompt hash (prompt text, system prompt
and image identities), the model, the decoding settings and the ablation: a changed prompt, model,
decoding or ablation is generated again, never served from a stale entry. On open, a torn last line
(a kill in the middle of a write) is cut off; a key stored twice keeps its first record. Failed
generations are not cached (a resumed run retries them).

**Prediction files** (:func:`read_prediction_file`): JSON Lines with ``{"id": "<sample id>",
"prediction": "<model text>"}`` per line. Numeric ids are read as their text (VQA-RAD's qids); a
``null`` prediction is an empty answer; lines that are not such objects are counted and reported,
never fatal; an id given twice keeps its last line and is reported. An optional ``"logprobs"``
object (``{"yes": -0.1, "no": -2.4}``: the log-probabilities of answer words as the first generated
token, what engines report as ``word_logprobs``) feeds the AUROC of finding-classification tasks; a
line whose ``logprobs`` is not an object of finite numbers is invalid.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emma.data.durable import append_lines, cut_torn_tail
from emma.data.jsonl import json_lines
from emma.errors import DataFormatError

log = logging.getLogger(__name__)

CACHE_FILE = "predictions.jsonl"
CACHE_VERSION = 1


@dataclass(frozen=True)
class CacheKey:
    id: str
    prompt_hash: str
    model: str
    decoding: str
    ablation: str = "none"

    def text(self) -> str:
        return "\x1f".join((self.id, self.prompt_hash, self.model, self.decoding, self.ablation))


@dataclass
class Prediction:
    """One generated answer as cached."""

    id: str
    prompt_hash: str
    model: str
    decoding: str
    ablation: str
    prediction: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    logprobs: dict[str, float] | None = None  # the engine's word_logprobs, when the request asked

    @property
    def key(self) -> CacheKey:
        return CacheKey(self.id, self.prompt_hash, self.model, self.decoding, self.ablation)

    def to_json(self) -> str:
        return json.dumps({"v": CACHE_VERSION, **asdict(self)}, ensure_ascii=False)

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any]) -> Prediction:
        return cls(
            id=str(obj["id"]),
            prompt_hash=str(obj["prompt_hash"]),
            model=str(obj["model"]),
            decoding=str(obj["decoding"]),
            ablation=str(obj.get("ablation", "none")),
            prediction=str(obj["prediction"]),
            finish_reason=str(obj.get("finish_reason", "stop")),
            prompt_tokens=int(obj.get("prompt_tokens", 0)),
            completion_tokens=int(obj.get("completion_tokens", 0)),
            latency_s=float(obj.get("latency_s", 0.0)),
            logprobs=_logprobs(obj.get("logprobs")),
        )


def _logprobs(value: Any) -> dict[str, float] | None:
    """A ``{word: log-probability}`` object, or None; TypeError / ValueError for anything else."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError("logprobs must be an object")
    out: dict[str, float] = {}
    for word, lp in value.items():
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp) or lp > 0:
            raise ValueError("logprobs must map words to finite log-probabilities (<= 0)")
        out[str(word)] = float(lp)
    return out


class PredictionCache:
    """The append-only, resumable cache of a run's generations (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._records: dict[CacheKey, Prediction] = {}
        self.invalid_lines = 0
        if self.path.exists():
            cut_torn_tail(self.path)
            with self.path.open("r", encoding="utf-8") as fh:
                for _, obj in json_lines(fh):
                    try:
                        record = Prediction.from_obj(obj)  # INVALID: TypeError
                    except (KeyError, TypeError, ValueError):
                        self.invalid_lines += 1
                        continue
                    self._records.setdefault(record.key, record)
            if self.invalid_lines:
                log.warning("%s: %d unreadable line(s) ignored", self.path, self.invalid_lines)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._records

    def get(self, key: CacheKey) -> Prediction | None:
        return self._records.get(key)

    def append(self, records: Iterable[Prediction]) -> int:
        """Append new records durably (one write, flush and fsync); returns how many were new."""
        new = [r for r in records if r.key not in self._records]
        unique: dict[CacheKey, Prediction] = {}
        for r in new:
            unique.setdefault(r.key, r)
        if not unique:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_lines(self.path, (r.to_json() for r in unique.values()))
        self._records.update(unique)
        return len(unique)


@dataclass
class PredictionFile:
    """The predictions of a user-supplied file, and what was wrong with it."""

    predictions: dict[str, str]
    invalid_lines: list[int] = field(default_factory=list)  # 1-based line numbers
    logprobs: dict[str, dict[str, float]] = field(default_factory=dict)  # id → word log-probabilities
    duplicate_ids: list[str] = field(default_factory=list)


def read_prediction_file(path: str | os.PathLike[str]) -> PredictionFile:
    """Read ``{"id", "prediction"}`` JSON Lines (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such predictions file")
    out = PredictionFile(predictions={})
    seen: set[str] = set()
    try:
        fh = path.open("r", encoding="utf-8-sig")
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    with fh:
        try:
            for lineno, obj in json_lines(fh):
                if not isinstance(obj, dict) or "id" not in obj or "prediction" not in obj:
                    out.invalid_lines.append(lineno)
                    continue
                sid, pred = obj["id"], obj["prediction"]
                if isinstance(sid, bool) or not isinstance(sid, (str, int)) or str(sid) == "":
                    out.invalid_lines.append(lineno)
                    continue
                if pred is not None and not isinstance(pred, str):
                    out.invalid_lines.append(lineno)
                    continue
                try:
                    logprobs = _logprobs(obj.get("logprobs"))
                except (TypeError, ValueError):
                    out.invalid_lines.append(lineno)
                    continue
                key = str(sid)
                if key in seen:
                    out.duplicate_ids.append(key)
                seen.add(key)
                out.predictions[key] = pred or ""
                if logprobs is not None:
                    out.logprobs[key] = logprobs
                else:
                    out.logprobs.pop(key, None)
        except UnicodeDecodeError:
            raise DataFormatError(f"{path}: not UTF-8 text") from None
    return out
