"""LLM-as-judge for open VQA answers, through any :class:`~emma.infer.engine.Engine`.

The judge model may be anything behind the Engine interface, e.g.
``emma.infer.factory.load_engine("openai:http://host:8000/v1#judge-model")``. The judge only ever
*adds* ``judge_*`` numbers beside the rule-based metrics; it never changes them.

- **Fixed prompt.** :data:`JUDGE_SYSTEM` and :data:`JUDGE_TEMPLATE` are recorded in every run's config
  with :data:`JUDGE_PROMPT_HASH` (sha256 of both, 16 hex digits); greedy decoding (temperature 0,
  seed 0).
- **Verdict parsing** (:func:`parse_verdict`): after removing ``<think>…</think>`` blocks and markdown
  emphasis, the reply must be ``CORRECT`` or ``INCORRECT`` (optionally ``Verdict: …``), either alone or
  as its leading word ("Incorrect - the lesion is on the left" → 0), or a ``Verdict: X`` line anywhere.
  Anything else ("the answer is not correct", "maybe") is *unparseable*: verdict ``None``, counted in
  ``judge_unparseable`` and as not accepted.
- **Cache.** Verdicts are appended to a JSONL file keyed by (judge model, prompt hash, sample id,
  prediction hash, reference hash); the reference hash (question + gold answer) is an addition so that
  a corrected gold answer is judged again instead of reusing a stale verdict. Parsed and unparseable
  replies are cached (at temperature 0 the same question gets the same reply); transport errors are
  not, so a re-run asks again. A killed run loses at most the batch in flight; a torn last line is
  ignored on load.
- **A failing judge is loud.** A transport error is verdict ``None`` with status ``"error"``, never a
  rejection. When every request of a batch fails the judge is taken as down and the remaining items are
  not sent (status ``"error"``, not cached). :func:`judge_metrics` is ``None`` when any item has no
  verdict because of an error (an accuracy over part of the answers, or one counting failures as
  rejections, would be a wrong number); :func:`judge_counts` says how many.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from emma.data.durable import append_lines, cut_torn_tail
from emma.errors import require_at_least
from emma.infer.engine import Engine
from emma.infer.types import GenerationRequest, GenerationResponse, Message, SamplingParams

CORRECT = 1
INCORRECT = 0

JUDGE_PROMPT_VERSION = "emma-judge-v1"
JUDGE_SYSTEM = (
    "You are a strict, impartial grader of answers to medical image questions. You compare a candidate "
    "answer with the reference answer written by an expert. You do not see the image: trust the "
    "reference."
)
JUDGE_TEMPLATE = (
    "Question: {question}\n"
    "Reference answer: {reference}\n"
    "Candidate answer: {prediction}\n"
    "\n"
    "Is the candidate answer correct? It is CORRECT if it states the same medical content as the "
    "reference (synonyms, abbreviations, a different word order or extra explanation that does not "
    "contradict the reference are fine). It is INCORRECT if it is wrong, contradicts the reference, is "
    "less specific than the reference in a way that matters, hedges between several answers, or does "
    "not answer.\n"
    "Reply with exactly one word: CORRECT or INCORRECT."
)
JUDGE_PROMPT_HASH = hashlib.sha256(f"{JUDGE_SYSTEM}\x00{JUDGE_TEMPLATE}".encode()).hexdigest()[:16]

VerdictStatus = Literal["ok", "unparseable", "error"]

_THINK = re.compile(r"(?is)<think>.*?(?:</think>|$)")
_MARKDOWN = re.compile(r"[*_`#>]")
_WORD = r"(CORRECT|INCORRECT)"
_ALONE = re.compile(rf"(?:VERDICT\s*[:\-]\s*)?{_WORD}[\s.!]*")
_LEADING = re.compile(rf"(?:VERDICT\s*[:\-]\s*)?{_WORD}\b")
_VERDICT_LINE = re.compile(rf"(?m)^\s*VERDICT\s*[:\-]\s*{_WORD}\b")


def parse_verdict(text: str) -> int | None:
    """``1`` for CORRECT, ``0`` for INCORRECT, ``None`` when the reply is not a clear verdict."""
    cleaned = _MARKDOWN.sub("", _THINK.sub("", text or "")).strip().upper()
    if not cleaned:
        return None
    match = _ALONE.fullmatch(cleaned) or _LEADING.match(cleaned)
    if match is None:
        lines = _VERDICT_LINE.findall(cleaned)
        if not lines:
            return None
        word = lines[-1]
    else:
        word = match.group(1)
    return CORRECT if word == "CORRECT" else INCORRECT


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class JudgeItem:
    """One open question to judge."""

    sample_id: str
    question: str
    reference: str
    prediction: str

    @property
    def prediction_hash(self) -> str:
        return _sha(self.prediction)

    @property
    def reference_hash(self) -> str:
        return _sha(json.dumps([self.question, self.reference], ensure_ascii=False))


@dataclass(frozen=True)
class Verdict:
    sample_id: str
    verdict: int | None  # 1 correct, 0 incorrect, None unparseable or failed
    status: VerdictStatus
    raw: str  # the judge's reply ("" on error)
    cached: bool
    error: str | None = None

    @property
    def correct(self) -> bool | None:
        """For :meth:`emma.eval.scorers.SampleScore.with_judge`: True / False, None without a verdict."""
        return None if self.verdict is None else self.verdict == CORRECT


CacheKey = tuple[str, str, str, str, str]


class VerdictCache:
    """Append-only JSONL store of verdicts; ``path=None`` keeps them in memory only."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._records: dict[CacheKey, dict[str, Any]] = {}
        self.skipped_lines = 0
        if self.path is not None and self.path.exists():
            self._load(self.path)

    @staticmethod
    def key(judge_model: str, prompt_hash: str, item: JudgeItem) -> CacheKey:
        return (judge_model, prompt_hash, item.sample_id, item.prediction_hash, item.reference_hash)

    def _load(self, path: Path) -> None:
        if cut_torn_tail(path):  # a kill's half line: gone before anything is appended after it
            self.skipped_lines += 1
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    key = (
                        str(rec["judge_model"]),
                        str(rec["prompt_hash"]),
                        str(rec["sample_id"]),
                        str(rec["prediction_hash"]),
                        str(rec["reference_hash"]),
                    )
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.skipped_lines += 1  # an unreadable line (never a torn one: cut above)
                    continue
                self._records.setdefault(key, rec)  # a key stored twice keeps its first verdict

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: CacheKey) -> dict[str, Any] | None:
        return self._records.get(key)

    def put_many(self, records: Iterable[tuple[CacheKey, dict[str, Any]]]) -> None:
        lines = []
        for key, rec in records:
            self._records[key] = rec
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        if self.path is None or not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_lines(self.path, (line.rstrip("\n") for line in lines))


class Judge:
    """Judges open answers with an Engine, asking only what the cache does not already hold."""

    def __init__(
        self,
        engine: Engine,
        *,
        cache_path: str | Path | None = None,
        max_new_tokens: int = 16,
        batch_size: int = 64,
    ) -> None:
        require_at_least("batch_size", batch_size, 1)
        self.engine = engine
        self.cache = VerdictCache(cache_path)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @property
    def model(self) -> str:
        return self.engine.model_name

    def config(self) -> dict[str, Any]:
        """What to record in ``results.json``: judge model, prompt, its hash and decoding."""
        return {
            "judge_model": self.model,
            "prompt_version": JUDGE_PROMPT_VERSION,
            "prompt_hash": JUDGE_PROMPT_HASH,
            "system": JUDGE_SYSTEM,
            "template": JUDGE_TEMPLATE,
            "decoding": {"temperature": 0.0, "seed": 0, "max_new_tokens": self.max_new_tokens},
        }

    def request(self, item: JudgeItem) -> GenerationRequest:
        prompt = JUDGE_TEMPLATE.format(
            question=item.question.strip(),
            reference=item.reference.strip(),
            prediction=item.prediction.strip(),
        )
        return GenerationRequest(
            messages=[Message.text("system", JUDGE_SYSTEM), Message.text("user", prompt)],
            sampling=SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0, seed=0),
        )

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """One verdict per item, in order; cached verdicts are reused, the rest asked in batches."""
        keys = [VerdictCache.key(self.model, JUDGE_PROMPT_HASH, it) for it in items]
        todo: dict[CacheKey, JudgeItem] = {}
        for key, item in zip(keys, items):
            if self.cache.get(key) is None and key not in todo:
                todo[key] = item
        fresh: dict[CacheKey, Verdict] = {}
        pending = list(todo.items())
        stopped: str | None = None  # why the rest was not asked
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            if stopped is not None:
                for key, item in chunk:
                    fresh[key] = Verdict(item.sample_id, None, "error", "", False, stopped)
                continue
            responses = self.engine.generate([self.request(item) for _, item in chunk])
            if len(responses) != len(chunk):
                raise RuntimeError(
                    f"judge engine returned {len(responses)} responses for {len(chunk)} requests"
                )
            to_store = []
            for (key, item), resp in zip(chunk, responses):
                verdict = self._verdict(item, resp)
                fresh[key] = verdict
                if verdict.status != "error":
                    to_store.append((key, self._record(key, verdict)))
            self.cache.put_many(to_store)
            if not to_store:  # every request of the batch failed: the judge is down, stop asking
                first = fresh[chunk[0][0]].error or "failed"
                stopped = f"not asked: the judge failed every request of an earlier batch ({first})"
        out = []
        for key, item in zip(keys, items):
            if key in fresh:
                out.append(fresh[key])
                continue
            rec = self.cache.get(key)
            assert rec is not None
            out.append(Verdict(item.sample_id, rec["verdict"], rec["status"], rec["raw"], cached=True))
        return out

    @staticmethod
    def _verdict(item: JudgeItem, resp: GenerationResponse) -> Verdict:
        if resp.finish_reason in ("error", "cancelled"):
            return Verdict(item.sample_id, None, "error", "", False, resp.error or resp.finish_reason)
        value = parse_verdict(resp.text)
        return Verdict(item.sample_id, value, "ok" if value is not None else "unparseable", resp.text, False)

    def _record(self, key: CacheKey, verdict: Verdict) -> dict[str, Any]:
        judge_model, prompt_hash, sample_id, prediction_hash, reference_hash = key
        return {
            "judge_model": judge_model,
            "prompt_hash": prompt_hash,
            "sample_id": sample_id,
            "prediction_hash": prediction_hash,
            "reference_hash": reference_hash,
            "verdict": verdict.verdict,
            "status": verdict.status,
            "raw": verdict.raw,
        }


def judge_metrics(verdicts: Sequence[Verdict]) -> dict[str, float | None]:
    """``judge_accuracy``: accepted / all items (unparseable counts as not accepted); ``None`` when the
    judge failed on any item (transport error: no verdict, so no honest accuracy)."""
    if not verdicts:
        return {}
    if any(v.status == "error" for v in verdicts):
        return {"judge_accuracy": None}
    return {"judge_accuracy": sum(v.verdict == CORRECT for v in verdicts) / len(verdicts)}


def judge_errors(verdicts: Sequence[Verdict]) -> list[str]:
    """The distinct error messages of the failed items, in first-seen order."""
    return list(dict.fromkeys(v.error or "failed" for v in verdicts if v.status == "error"))


def judge_counts(verdicts: Sequence[Verdict]) -> dict[str, int]:
    """``judge_n``, ``judge_unparseable``, ``judge_errors`` and ``judge_cached``."""
    return {
        "judge_n": len(verdicts),
        "judge_unparseable": sum(v.status == "unparseable" for v in verdicts),
        "judge_errors": sum(v.status == "error" for v in verdicts),
        "judge_cached": sum(v.cached for v in verdicts),
    }
