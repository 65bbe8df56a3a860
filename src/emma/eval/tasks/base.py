"""Declarative evaluation tasks: what is asked, of which samples, how it is decoded and scored.

A :class:`TaskDef` names everything that decides a benchmark number, so that the number can be
reproduced and compared: the dataset importer, the split, the language filter, the sample task types
evaluated, the fixed prompt templates (recorded verbatim in every ``results.json``), the decoding
defaults (temperature 0) and the scorer. Nothing about a task is chosen at run time except what the
user passes explicitly (split, limit, ablation), and that is recorded too.

An :class:`EvalItem` is one question as the model sees it: the sample (its gold), the exact prompt
text and the images, plus the breakdown keys (modality, body part, question type).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from emma.data.holdout import SOURCE_SPLIT_KEY
from emma.data.schema import Gold, ImageRef, Sample, TaskType, Turn
from emma.infer.types import SamplingParams

TaskKind = Literal["vqa", "mc", "report", "grounding", "classification"]
ScorerName = Literal["vqa", "choice", "report", "grounding", "classification"]

VQA_TYPES = frozenset({TaskType.CLOSED_VQA, TaskType.OPEN_VQA})


@dataclass(frozen=True)
class Decoding:
    """Decoding defaults of a task (greedy unless a user overrides the temperature)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EvalItem:
    """One evaluated question: the sample (gold), the exact prompt, the images shown, breakdown keys."""

    id: str
    sample: Sample
    prompt: str
    images: tuple[ImageRef, ...]
    system: str | None = None
    logprob_words: tuple[str, ...] = ()  # words whose first-token log-probability the engine reports

    @property
    def task_type(self) -> TaskType:
        return self.sample.task

    @property
    def modality(self) -> str | None:
        return self.sample.meta.modality

    @property
    def body_part(self) -> str | None:
        return self.sample.meta.body_part

    @property
    def question_type(self) -> str | None:
        return self.sample.meta.question_type

    @property
    def source_split(self) -> str | None:
        """The split the sample came from in its source dataset (a holdout's zero-shot split mixes them)."""
        return self.sample.meta.extra.get(SOURCE_SPLIT_KEY) or self.sample.meta.split

    @property
    def prompt_hash(self) -> str:
        """Hash of everything the model is given as text (system + prompt) and of the images' identities."""
        h = hashlib.sha256()
        h.update((self.system or "").encode("utf-8") + b"\x00" + self.prompt.encode("utf-8"))
        for ref in self.images:
            h.update(b"\x00" + (ref.sha256 or ref.path or "").encode("utf-8"))
        return h.hexdigest()[:16]


# A derivation turns one dataset sample into zero or more evaluated samples (e.g. SLAKE organ boxes →
# one grounding question per organ); it must be deterministic.
Derive = Callable[[Sample], list[Sample]]
# A filter keeps a dataset sample (None) or says why the task leaves it out (e.g. a lateral view).
SampleFilter = Callable[[Sample], str | None]


def derived_question(
    source: Sample, sample_id: str, task: TaskType, question: str, gold: Gold, **meta: Any
) -> Sample:
    """A sample a derivation makes from ``source``: ``question`` on its first image, answered by ``gold``;
    ``source``'s meta with the fields in ``meta`` replaced."""
    return Sample(
        id=sample_id,
        task=task,
        images=[source.images[0]],
        turns=[Turn(role="user", content=question, images=[0])],
        gold=gold,
        meta=source.meta.model_copy(update=meta),
    )


@dataclass(frozen=True)
class TaskDef:
    """A registered benchmark task (see the module docstring)."""

    name: str
    kind: TaskKind
    importer: str  # dataset importer: a name of emma.data.sources or of emma.eval.tasks readers
    description: str
    scorer: ScorerName
    prompts: Mapping[str, str]  # sample task type → template; placeholders: {question}
    task_types: frozenset[TaskType]
    decoding: Decoding = field(default_factory=Decoding)
    default_split: str = "test"
    language: str | None = None  # keep only samples whose meta.extra["q_lang"] equals this
    importer_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    system_prompt: str | None = None
    layout: str = ""  # the release layout read (documentation)
    derive: Derive | None = None
    # Sample task types the derivation applies to (None: every sample).
    source_task_types: frozenset[TaskType] | None = None
    sample_filter: SampleFilter | None = None  # applied to dataset samples before the derivation
    findings: tuple[str, ...] = ()  # classification tasks: the finding set, in report order
    logprob_words: tuple[str, ...] = ()  # asked of the engine with every request (e.g. ("yes", "no"))

    def template(self, task_type: TaskType | str) -> str:
        key = str(task_type)
        if key in self.prompts:
            return self.prompts[key]
        if "*" in self.prompts:
            return self.prompts["*"]
        raise KeyError(f"task {self.name} has no prompt for {key}")

    def prompt_for(self, sample: Sample) -> str:
        question = sample.question or ""
        return self.template(sample.task).format(question=question.strip())

    def skip_reason(self, sample: Sample) -> str | None:
        """Why a (derived) sample is not evaluated by this task, or None when it is."""
        if sample.task not in self.task_types:
            return f"task type {sample.task}"
        if self.language is not None:
            lang = str(sample.meta.extra.get("q_lang") or "").strip().lower()
            if lang != self.language:
                return f"language {lang or 'unknown'}"
        if self.kind == "mc" and not sample.gold.options:
            return "no options"
        if self.kind == "mc" and sample.gold.answer_index is None:
            return "no gold answer"
        if self.kind in ("vqa", "report") and not (sample.gold.answer or "").strip():
            return "no gold answer"
        if self.kind == "grounding" and not sample.gold.boxes:
            return "no gold boxes"
        if self.kind == "classification":
            if sample.task is TaskType.CLASSIFICATION and not sample.gold.labels:
                return "no known label"
            if sample.task is not TaskType.CLASSIFICATION and not (sample.gold.answer or "").strip():
                return "unknown label"
        return None

    def items(self, samples: Iterator[Sample], skipped: dict[str, int] | None = None) -> Iterator[EvalItem]:
        """The evaluated items, in dataset order; ``skipped`` counts the samples left out, by reason."""
        seen: set[str] = set()  # derived samples repeat (e.g. once per question about an image)
        for sample in samples:
            if self.sample_filter is not None:
                left_out = self.sample_filter(sample)
                if left_out is not None:
                    if skipped is not None:
                        skipped[left_out] = skipped.get(left_out, 0) + 1
                    continue
            if self.derive is not None and (
                self.source_task_types is None or sample.task in self.source_task_types
            ):
                derived = [s for s in self.derive(sample) if s.id not in seen]
                seen.update(s.id for s in derived)
            else:
                derived = [sample]
            for s in derived:
                reason = self.skip_reason(s)
                if reason is not None:
                    if skipped is not None:
                        skipped[reason] = skipped.get(reason, 0) + 1
                    continue
                yield EvalItem(
                    id=s.id,
                    sample=s,
                    prompt=self.prompt_for(s),
                    images=tuple(s.images),
                    system=self.system_prompt,
                    logprob_words=self.logprob_words,
                )

    def config(self) -> dict[str, Any]:
        """What is recorded in results.json about the task (prompts verbatim)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "importer": self.importer,
            "importer_options": dict(self.importer_options),
            "language": self.language,
            "task_types": sorted(str(t) for t in self.task_types),
            "scorer": self.scorer,
            "system_prompt": self.system_prompt,
            "prompts": dict(self.prompts),
            **({"findings": list(self.findings)} if self.findings else {}),
            **({"logprob_words": list(self.logprob_words)} if self.logprob_words else {}),
            **({"sample_filter": _first_line(self.sample_filter.__doc__)} if self.sample_filter else {}),
        }


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def gold_of(sample: Sample) -> Any:
    """The gold answer as recorded in per_sample.jsonl (JSON-able)."""
    gold = sample.gold
    if sample.task is TaskType.MULTIPLE_CHOICE and gold.options and gold.answer_index is not None:
        letter = chr(ord("A") + gold.answer_index)
        return f"{letter}. {gold.options[gold.answer_index]}"
    if sample.task is TaskType.GROUNDING:
        return [[round(v, 2) for v in b.as_tuple()] for b in gold.boxes]
    return gold.answer


def data_hash(items: list[EvalItem]) -> str:
    """SHA-256 of the evaluated sample ids and golds (order-independent)."""
    rows = sorted(
        (item.id, json.dumps(gold_of(item.sample), sort_keys=True, ensure_ascii=False)) for item in items
    )
    h = hashlib.sha256()
    for sid, gold in rows:
        h.update(sid.encode("utf-8") + b"\x00" + gold.encode("utf-8") + b"\n")
    return h.hexdigest()
