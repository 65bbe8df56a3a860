"""The contract of an annotation step and what steps use: items, ``ask``, hashes, provenance, rejects.

A *step* (``coarse``, ``roi``, ``fine``, ``synth``, ``refine``, ``verify``, ...) is a callable
``step(item, images, ask) -> list[Item]``: it gets one accepted item and its decoded images and
returns 0..n items, each accepted or rejected with a reason code. A step must be a pure function of
its inputs and of the answers ``ask`` gives it: deterministic, no clock, randomness only from
:func:`seeded_rng` (seeded from the sample id). It must not change the item it gets (return copies). The ``ask`` a
step gets (:class:`BoundAsk`) answers from the durable store when it can; :mod:`emma.annotate.runner` explains the keys. The runner runs steps over a dataset; this module is what a step imports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from emma.annotate.store import ResultStore, result_key
from emma.annotate.teacher import Teacher
from emma.data.schema import Sample
from emma.infer.types import ImagePart, Message, SamplingParams, TextPart

__all__ = [
    "Ask",
    "BoundAsk",
    "Item",
    "Step",
    "item_hash",
    "prompt_hash",
    "provenance",
    "record_provenance",
    "reject",
    "seeded_rng",
]


# --------------------------------------------------------------------------------------------- contract


@dataclass
class Item:
    """One sample on its way through the steps.

    ``rejected`` is None for an accepted item, else a short reason code (``invalid_json``,
    ``box_out_of_range``, ``leak``, ...) with a one-line ``detail`` (no PHI).

    ``images`` is set only when the item's images are not the input sample's (crops, sub-figures):
    they are then given to later steps and stored with the item (the writer makes the refs; give the
    sample refs of the same length or none, e.g. ``sample.model_copy(update={"images": []})``). Items a
    step makes from such an item inherit its ``images`` unless the step sets them. Otherwise
    (``None``) the images are those the ``sample.images`` refs name among the input sample's.
    """

    sample: Sample
    rejected: str | None = None
    detail: str = ""
    images: list[Image.Image] | None = None
    step: str = ""  # filled by the runner: the step that rejected the item


@runtime_checkable
class Ask(Protocol):
    """The teacher as a step sees it: bound to one item and step, answers stored durably.

    ``teacher`` is the teacher's identity (provenance), ``family`` its model family (box
    conventions; None if unknown). Raises :class:`~emma.annotate.teacher.TeacherError`.
    """

    teacher: str
    family: str | None

    def __call__(
        self, messages: Sequence[Message], *, call: str = "main", sampling: SamplingParams | None = None
    ) -> str: ...


@runtime_checkable
class Step(Protocol):
    """One pipeline step (see the module doc). ``prompt_hash``: :func:`prompt_hash` of its templates."""

    name: str
    prompt_hash: str

    def __call__(self, item: Item, images: list[Image.Image], ask: Ask) -> list[Item]: ...


def prompt_hash(*parts: Any) -> str:
    """16 hex digits of SHA-256 over JSON of ``parts`` (prompt templates and parameters of a step)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def item_hash(sample: Sample) -> str:
    """The content hash of a sample as stored (SHA-256 of its JSON, id included)."""
    return hashlib.sha256(sample.model_dump_json().encode("utf-8")).hexdigest()


def seeded_rng(*parts: str) -> random.Random:
    """A random generator seeded from strings (the sample id, the step name): the only randomness allowed."""
    seed = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return random.Random(int.from_bytes(seed[:8], "big"))


def provenance(
    step_name: str,
    step_prompt_hash: str,
    ask: Ask,
    *,
    confidence: float,
    source: str = "teacher",
) -> dict[str, Any]:
    """The provenance of what a step produced, for ``sample.meta.extra["annotation"][step_name]``.

    ``time`` is the time of the latest teacher answer the step used on this item as stored (the time
    of the original call, also in a resumed run), None when it asked nothing (``source`` then says
    where the field came from, e.g. ``"dataset"`` or ``"report"``).
    """
    times = getattr(ask, "times", [])
    return {
        "teacher": ask.teacher,
        "prompt_hash": step_prompt_hash,
        "stage": step_name,
        "time": max(times) if times else None,
        "confidence": float(confidence),
        "source": source,
    }


def record_provenance(sample: Sample, step_name: str, record: dict[str, Any]) -> Sample:
    """A copy of ``sample`` with ``meta.extra["annotation"][step_name] = record``."""
    extra = dict(sample.meta.extra)
    annotation = dict(extra.get("annotation") or {})
    annotation[step_name] = record
    extra["annotation"] = annotation
    return sample.model_copy(update={"meta": sample.meta.model_copy(update={"extra": extra})})


def reject(item: Item, reason: str, detail: str = "") -> Item:
    """``item`` rejected with ``reason`` (a short code) and a one-line ``detail`` (no PHI)."""
    return Item(item.sample, rejected=reason, detail=" ".join(detail.split())[:300], images=item.images)


# ------------------------------------------------------------------------------------------ bound ask


def _image_digest(image: Image.Image) -> str:
    h = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _request_digest(messages: Sequence[Message], sampling: SamplingParams, digests: dict[int, str]) -> str:
    h = hashlib.sha256()
    for m in messages:
        h.update(f"\x00{m.role}\x00".encode())
        for part in m.content:
            if isinstance(part, TextPart):
                h.update(b"t" + len(part.text).to_bytes(8, "big") + part.text.encode("utf-8"))
            elif isinstance(part, ImagePart):
                d = digests.get(id(part.image))
                if d is None:
                    d = digests[id(part.image)] = _image_digest(part.image)
                h.update(b"i" + d.encode())
    h.update(json.dumps(asdict(sampling), sort_keys=True, default=str).encode())
    return h.hexdigest()


class BoundAsk:
    """The :class:`Ask` given to one step on one item (see the module doc for its key)."""

    def __init__(
        self,
        teacher: Teacher,
        store: ResultStore,
        step: Step,
        item_sha: str,
        counters: Counter[str],
        flight: threading.Semaphore | None = None,
    ) -> None:
        self._teacher_obj = teacher
        self._flight = flight
        self._store = store
        self._step = step
        self._item_sha = item_sha
        self._counters = counters
        self._local: dict[str, tuple[str, str]] = {}  # this step call's answers (a repeated request)
        self._digests: dict[int, str] = {}
        self.teacher = teacher.name
        self.family = teacher.family
        self.times: list[str] = []

    def __call__(
        self, messages: Sequence[Message], *, call: str = "main", sampling: SamplingParams | None = None
    ) -> str:
        params = sampling or self._teacher_obj.sampling
        key = result_key(
            "answer",
            self._item_sha,
            self._step.name,
            self.teacher,
            self._step.prompt_hash,
            call,
            _request_digest(messages, params, self._digests),
        )
        if key in self._local:
            answer, t = self._local[key]
            self.times.append(t)
            return answer
        record = self._store.get(key)
        if record is not None and record.answer is not None:
            self._counters["cached"] += 1
            answer, t = record.answer, record.time
        else:
            with self._flight or contextlib.nullcontext():  # a slot is freed once its answer is stored
                answer = self._teacher_obj.ask(messages, sampling=params)
                t = self._store.put_answer(key, answer)
            self._counters["asked"] += 1
        self._local[key] = (answer, t)
        self.times.append(t)
        return answer
