"""Small, deterministic pipeline steps and a dataset builder for the runner tests (H1).

They are real :class:`emma.annotate.runner.Step` implementations (they ask the teacher through ``ask``,
parse its JSON, reject with reasons, record provenance, fan out into several items and crop images),
written against the loopback teacher's default answer (``{"echo": <16 hex>, "images": n}``). They live
in an importable module so that a subprocess (the kill test) and Ray workers can load them too.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from emma.annotate.steps import Item, prompt_hash, provenance, record_provenance, reject, seeded_rng
from emma.data.schema import ImageRef, Sample, Turn
from emma.data.store import DatasetWriter
from emma.infer.types import ImagePart, Message, TextPart

COARSE_TEMPLATE = "Describe the image. Question: {q}"
SYNTH_TEMPLATE = "Write question {k} about sample {sid} (variant {v})."
VERIFY_TEMPLATE = "Answer from the image alone: {q}"


def _echo(text: str) -> str | None:
    try:
        obj = json.loads(text)
        echo = obj["echo"]
    except (ValueError, KeyError, TypeError):
        return None
    return echo if isinstance(echo, str) and len(echo) == 16 else None


def _with(sample: Sample, **meta: object) -> Sample:
    return sample.model_copy(update={"meta": sample.meta.model_copy(update=meta)})


class Coarse:
    name = "coarse"
    prompt_hash = prompt_hash("coarse", COARSE_TEMPLATE)

    def __call__(self, item: Item, images: list[Image.Image], ask: object) -> list[Item]:
        q = item.sample.question or ""
        msg = Message("user", [*(ImagePart(im) for im in images), TextPart(COARSE_TEMPLATE.format(q=q))])
        echo = _echo(ask([msg]))  # type: ignore[operator]
        if echo is None:
            return [reject(item, "invalid_json", "coarse answer is not the expected JSON")]
        if echo[0] in "01":
            return [reject(item, "low_confidence", f"echo starts with {echo[0]}")]
        sample = _with(item.sample, findings=[f"echo-{echo}"], modality="xray")
        record = provenance(self.name, self.prompt_hash, ask, confidence=0.5 + int(echo[1], 16) / 32)  # type: ignore[arg-type]
        return [Item(record_provenance(sample, self.name, record))]


class Synth:
    """Two questions per input; the second on a crop of the first image (a new image)."""

    name = "synth"
    prompt_hash = prompt_hash("synth", SYNTH_TEMPLATE)

    def __call__(self, item: Item, images: list[Image.Image], ask: object) -> list[Item]:
        rng = seeded_rng(item.sample.id, self.name)
        out: list[Item] = []
        for k in range(2):
            v = rng.randint(0, 9)
            text = SYNTH_TEMPLATE.format(k=k, sid=item.sample.id, v=v)
            echo = _echo(ask([Message.text("user", text)], call=f"q{k}"))  # type: ignore[operator]
            if echo is None:
                out.append(reject(item, "invalid_json", f"question {k}"))
                continue
            turns = [
                Turn(role="user", content=f"q{k}-{echo}", images=[0]),
                Turn(role="assistant", content=echo[:4]),
            ]
            sample = item.sample.model_copy(update={"id": f"{item.sample.id}~q{k}", "turns": turns})
            record = provenance(self.name, self.prompt_hash, ask, confidence=0.9)  # type: ignore[arg-type]
            sample = record_provenance(sample, self.name, record)
            if k == 1 and images:
                crop = images[0].crop((0, 0, max(1, images[0].width // 2), max(1, images[0].height // 2)))
                out.append(Item(sample.model_copy(update={"images": []}), images=[crop]))
            else:
                out.append(Item(sample))
        return out


class Verify:
    name = "verify"
    prompt_hash = prompt_hash("verify", VERIFY_TEMPLATE)

    def __call__(self, item: Item, images: list[Image.Image], ask: object) -> list[Item]:
        msg = Message(
            "user",
            [*(ImagePart(im) for im in images), TextPart(VERIFY_TEMPLATE.format(q=item.sample.question))],
        )
        echo = _echo(ask([msg]))  # type: ignore[operator]
        if echo is None:
            return [reject(item, "invalid_json", "verify answer")]
        if echo[-1] in "0":
            return [reject(item, "verify_failed", "the verifier could not answer")]
        return [
            Item(
                record_provenance(
                    item.sample, self.name, provenance(self.name, self.prompt_hash, ask, confidence=1.0)
                )
            )
        ]  # type: ignore[arg-type]


def make_steps() -> list[object]:
    return [Coarse(), Synth(), Verify()]


def make_source(
    root: Path, n: int, *, fmt: str = "jsonl", splits: tuple[str, ...] = ("train",), size: int = 12
) -> Path:
    """A small dataset of ``n`` samples (one image each, a few shared) spread over ``splits``."""
    with DatasetWriter(root, name="h1-src", format=fmt, shard_size=50) as w:  # type: ignore[arg-type]
        for i in range(n):
            color = (i * 37 % 256, i * 11 % 256, (i // 5) * 7 % 256)  # every 5th-or-so image differs
            image = Image.new("RGB", (size, size), color)
            sample = Sample(
                id=f"s{i:05d}",
                task="caption",
                images=[ImageRef(sha256="0" * 64)],
                turns=[Turn(role="user", content=f"what is shown in study {i}?", images=[0])],
            )
            w.add(_with(sample, split=splits[i % len(splits)]), [image])
    return root


class ScriptedAsk:
    """A stand-in for the runner's bound ``ask`` in unit tests of single steps: answers each call from
    ``answers`` (one text for every call, or a dict by call name whose values are a text, an exception
    to raise or a function of the messages), records the requests, and stamps the n-th call with the
    time ``2026-01-<day>T00:00:<n>``."""

    def __init__(self, answers: object, family: str | None = None, day: int = 1) -> None:
        self.answers = answers
        self.teacher = "scripted"
        self.family = family
        self.day = day
        self.times: list[str] = []
        self.calls: list[tuple[str, list[Message]]] = []

    def __call__(self, messages: object, *, call: str = "main", sampling: object = None) -> str:
        self.calls.append((call, list(messages)))  # type: ignore[call-overload]
        answer = self.answers[call] if isinstance(self.answers, dict) else self.answers
        if isinstance(answer, Exception):
            raise answer
        self.times.append(f"2026-01-{self.day:02d}T00:00:{len(self.times):02d}+00:00")
        return answer(list(messages)) if callable(answer) else str(answer)  # type: ignore[call-overload]
