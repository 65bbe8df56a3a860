"""The evaluation runner: items → batched generation through an Engine (cached, resumable) → scores.

:func:`run_eval` does one run:

1. **Items.** The task's dataset is opened (:func:`emma.eval.tasks.open_task_data`), the split's
   samples filtered and turned into :class:`~emma.eval.tasks.EvalItem` s in dataset order (``limit``:
   the first N).
2. **Predictions.** Either generated through an :class:`~emma.infer.engine.Engine` in batches of
   ``batch_size`` requests per ``engine.generate`` call, each batch appended to the prediction cache
   (``<out>/predictions.jsonl``) as soon as it returns, so a killed run resumes without regenerating
   or duplicating anything (:mod:`emma.eval.predictions`); or read from a predictions file (ids the
   split does not have are reported as unknown, evaluated ids without a prediction are scored as
   missing: wrong and unparseable).
3. **Scores.** Per sample through :mod:`emma.eval.score_adapters` with the scorers of
   :mod:`emma.eval.scorers` (``compat="medevalkit"`` swaps in :mod:`emma.eval.compat`, labelled as such
   everywhere), :mod:`emma.eval.report_metrics` and, with a judge, :mod:`emma.eval.judge` (it only adds
   ``judge_*`` metrics); metrics with 95% percentile-bootstrap CIs, counts, and breakdowns by modality,
   body part, question type and (when the samples mix them) source split. With an ablation the same
   questions are also generated with the ablated images and the metric deltas get paired-bootstrap CIs
   and permutation p-values.
   ``train_data`` adds a contamination check (:mod:`emma.eval.contamination`).
   A dataset cut by ``emma data holdout`` adds a ``zero_shot`` block: the recipe, the split's role and
   metrics by group (:mod:`emma.eval.zero_shot`).
4. **Outputs** (written atomically): ``results.json``, ``per_sample.jsonl`` and the Markdown / HTML
   reports with plots (:mod:`emma.eval.run_report`).

:func:`compare_runs` compares two run folders on the samples they share (paired bootstrap and
permutation test per metric).

Why one file (~850 lines): caching, resume and scoring follow one run's life (plan → predict → score →
write) over the same cache keys; the scorers, tasks and report live in their own modules.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from emma.data.durable import atomic_write, exclusive_folder
from emma.data.jsonl import json_lines
from emma.data.store import Dataset
from emma.errors import DataFormatError, EmmaError, InputError
from emma.eval.ablate import ablate_images, check_mode, shuffle_donors
from emma.eval.predictions import CACHE_FILE, CacheKey, Prediction, PredictionCache, read_prediction_file
from emma.eval.score_adapters import (
    CI_LEVEL,
    MISSING,
    ReportAdapter,
    Scored,
    VqaAdapter,
    apply_judge,
    make_adapter,
    mean_cis,
    metric_values,
)
from emma.eval.tasks import DataSource, EvalItem, TaskDef, data_hash, get_task, gold_of, open_task_data
from emma.eval.tasks.base import Decoding
from emma.eval.zero_shot import compare_zero_shot, notes_for, zero_shot_block
from emma.infer.engine import Engine
from emma.infer.types import GenerationRequest, ImagePart, Message, TextPart

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
PER_SAMPLE_FILE = "per_sample.jsonl"
BREAKDOWN_KEYS = ("modality", "body_part", "question_type", "source_split")
# Reported only when the evaluated samples come from several groups: a plain test split is all "test",
# a holdout's zero-shot split gathers the group from every source split (docs/zero-shot.md).
MIXED_ONLY_KEYS = ("source_split",)
ERROR = "error"  # parse status of a sample whose generation failed

ProgressFn = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------- options


@dataclass
class EvalOptions:
    """Everything a run depends on (all of it is recorded in results.json)."""

    task: str
    data: Path
    model: str | None = None  # an Engine spec (emma.infer.factory.load_engine)
    predictions: Path | None = None  # score this file instead of generating
    split: str | None = None  # default: the task's
    out: Path | None = None  # default: runs/<task>-<split>-<model or predictions>[-<ablation>]
    limit: int | None = None
    ablate: str | None = None  # blank | noise | shuffle
    batch_size: int = 8
    judge: str | None = None
    train_data: Path | None = None
    compat: str | None = None  # "medevalkit"
    family: str | None = None  # box convention for grounding predictions (default: the engine's)
    temperature: float | None = None
    max_new_tokens: int | None = None
    seed: int = 0
    n_resamples: int = 2000
    write_report: bool = True


@dataclass
class EvalRun:
    """A finished run: its folder, the results.json content and the per-sample rows."""

    out: Path
    results: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float | None]:
        return dict(self.results["metrics"])

    @property
    def judged_nothing(self) -> bool:
        """A judge was asked and failed on every answer it was sent (the CLI exits non-zero)."""
        counts = self.results["counts"]
        return counts.get("judge_n", 0) > 0 and counts.get("judge_errors", 0) == counts["judge_n"]


# ---------------------------------------------------------------------------------------- helpers


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "run"


def default_out(options: EvalOptions, split: str) -> Path:
    who = options.model or (f"pred-{Path(options.predictions).stem}" if options.predictions else "run")
    who = who.split("#")[-1] if who.lower().startswith("openai:") else Path(who).name or who
    parts = [options.task, split, _slug(who)]
    if options.ablate:
        parts.append(f"ablate-{options.ablate}")
    if options.compat:
        parts.append(f"compat-{options.compat}")
    return Path("runs") / "-".join(parts)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist, key in (("emma-med", "emma"), ("torch", "torch"), ("transformers", "transformers")):
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    if out["emma"] is None:
        from emma import __version__

        out["emma"] = __version__
    return out


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while many long-lived objects are built (samples, scores).

    Building 100k pydantic samples with the collector on makes it rescan the growing heap again and
    again (about 6x slower); they hold no reference cycles, so reference counting frees them anyway.
    The collector's previous state is restored on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default)


# ------------------------------------------------------------------------------------- generation


def _load_images(dataset: Dataset, item: EvalItem) -> list[Image.Image]:
    images = []
    for ref in item.images:
        with dataset.open_image(ref) as im:
            images.append(im.convert("RGB"))
    return images


def build_request(item: EvalItem, images: Sequence[Image.Image], decoding: Decoding) -> GenerationRequest:
    """The request for one item: optional system message, then the images and the prompt text."""
    messages: list[Message] = []
    if item.system:
        messages.append(Message.text("system", item.system))
    parts: list[TextPart | ImagePart] = [ImagePart(im) for im in images]
    parts.append(TextPart(item.prompt))
    messages.append(Message(role="user", content=parts))
    return GenerationRequest(
        messages=messages,
        sampling=decoding.sampling(),
        request_id=f"eval-{item.id}",
        logprob_words=item.logprob_words,
    )


@dataclass
class GenerationStats:
    requested: int = 0  # items generated in this run (not served from the cache)
    cached: int = 0  # items served from the cache
    errors: dict[str, str] = field(default_factory=dict)  # id → one-line error
    engine_calls: int = 0


def generate(
    items: Sequence[EvalItem],
    engine: Engine,
    cache: PredictionCache,
    dataset: Dataset,
    *,
    model_id: str,
    decoding: Decoding,
    batch_size: int,
    ablation: str | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, Prediction], GenerationStats]:
    """Predictions for every item: cached ones reused, the rest generated in batches and cached."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    label = ablation or "none"
    dec = decoding.digest()
    keys = [
        CacheKey(it.id, it.prompt_hash, model_id, dec, f"{label}:{seed}" if ablation else label)
        for it in items
    ]
    stats = GenerationStats()
    pending = [i for i, k in enumerate(keys) if k not in cache]
    stats.cached = len(items) - len(pending)
    donors: list[int] | None = None
    if ablation == "shuffle":
        donors = shuffle_donors(["|".join(r.sha256 or r.path or "" for r in it.images) for it in items], seed)
    done = stats.cached
    if progress is not None:
        progress(done, len(items))
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        requests = []
        for i in batch:
            item = items[i]
            images = _load_images(dataset, item)
            if ablation is not None and images:
                donor = _load_images(dataset, items[donors[i]]) if donors is not None else None
                images = ablate_images(
                    check_mode(ablation), images, seed=seed, key=item.id, donor_images=donor
                )
            requests.append(build_request(item, images, decoding))
        responses = engine.generate(requests)
        stats.engine_calls += 1
        if len(responses) != len(requests):
            raise EmmaError(f"the engine returned {len(responses)} responses for {len(requests)} requests")
        records = []
        for i, response in zip(batch, responses):
            if response.finish_reason == "error":
                stats.errors[items[i].id] = (response.error or "generation failed").splitlines()[0][:200]
                continue
            k = keys[i]
            records.append(
                Prediction(
                    id=k.id,
                    prompt_hash=k.prompt_hash,
                    model=k.model,
                    decoding=k.decoding,
                    ablation=k.ablation,
                    prediction=response.text,
                    finish_reason=response.finish_reason,
                    prompt_tokens=response.prompt_tokens,
                    completion_tokens=response.completion_tokens,
                    latency_s=response.latency_s,
                    logprobs=response.word_logprobs,
                )
            )
        cache.append(records)
        stats.requested += len(batch)
        done += len(batch)
        if progress is not None:
            progress(done, len(items))
    out = {}
    for k in keys:
        record = cache.get(k)
        if record is not None:
            out[k.id] = record
    return out, stats


# --------------------------------------------------------------------------------------- statistics


def breakdowns(
    items: Sequence[EvalItem], scored: Sequence[Scored], headline: str, n_resamples: int, seed: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """For each breakdown key: per group ``n``, the headline metric, its CI and every metric's value."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key in BREAKDOWN_KEYS:
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(str(getattr(item, key) or "unknown"), []).append(i)
        if set(groups) == {"unknown"} or (key in MIXED_ONLY_KEYS and len(groups) < 2):
            continue
        table: dict[str, dict[str, Any]] = {}
        for name in sorted(groups, key=lambda g: (-len(groups[g]), g)):
            vals = metric_values([scored[i] for i in groups[name]])
            metrics = {k: float(np.mean(v)) for k, v in vals.items()}
            head = vals.get(headline)
            table[name] = {
                "n": len(groups[name]),
                "metric": headline,
                "value": metrics.get(headline),
                "ci95": mean_cis({headline: head}, n_resamples, seed)[headline] if head else None,
                "metrics": metrics,
            }
        out[key] = table
    return out


def paired_deltas(
    a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]], n_resamples: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Per metric: ``b - a`` on the ids both have a value for; paired bootstrap CI, permutation p."""
    from emma.eval.stats import paired_bootstrap, permutation_test

    shared = [i for i in a if i in b]
    metrics = sorted({m for i in shared for m in a[i]} & {m for i in shared for m in b[i]})
    out: dict[str, dict[str, Any]] = {}
    for m in metrics:
        ids = [i for i in shared if m in a[i] and m in b[i]]
        if not ids:
            continue
        xa = np.array([a[i][m] for i in ids], dtype=np.float64)
        xb = np.array([b[i][m] for i in ids], dtype=np.float64)
        pb = paired_bootstrap(xa, xb, n_resamples=n_resamples, seed=seed, level=CI_LEVEL)
        out[m] = {
            "n": len(ids),
            "a": pb.stat_a,
            "b": pb.stat_b,
            "delta": pb.delta,
            "ci95": [pb.ci_low, pb.ci_high],
            "p_bootstrap": pb.p_value,
            "p_permutation": permutation_test(xa, xb, n_resamples=max(n_resamples, 1000), seed=seed),
        }
    return out


# -------------------------------------------------------------------------------------------- run


def _decoding(task: TaskDef, options: EvalOptions) -> Decoding:
    d = task.decoding
    return Decoding(
        max_new_tokens=options.max_new_tokens if options.max_new_tokens is not None else d.max_new_tokens,
        temperature=options.temperature if options.temperature is not None else d.temperature,
        top_p=d.top_p,
        seed=options.seed if d.seed is not None else None,
    )


def _row(item: EvalItem, text: str | None, s: Scored, status_override: str | None) -> dict[str, Any]:
    return {
        "id": item.id,
        "prompt": item.prompt,
        "prediction": text,
        "extracted": s.extracted,
        "gold": gold_of(item.sample),
        "correct": s.correct,
        "parse_status": status_override or s.status,
        "task_type": str(item.task_type),
        "modality": item.modality,
        "body_part": item.body_part,
        "question_type": item.question_type,
        "values": s.values,
    }


@dataclass
class _Predictions:
    """Where the texts came from and what to report about it."""

    texts: dict[str, str | None]
    ablated: dict[str, str | None] | None
    model: str
    family: str | None
    status: dict[str, str]  # id → "missing" / "error" (overrides the parse status)
    counts: dict[str, int]
    notes: list[str]
    file_info: dict[str, Any] | None = None
    generation: dict[str, Any] | None = None
    engine: Engine | None = None
    logprobs: dict[str, dict[str, float] | None] = field(default_factory=dict)  # id → word_logprobs
    ablated_logprobs: dict[str, dict[str, float] | None] | None = None


def _from_file(options: EvalOptions, ids: list[str]) -> _Predictions:
    assert options.predictions is not None
    pf = read_prediction_file(options.predictions)
    known = set(ids)
    unknown = sorted(i for i in pf.predictions if i not in known)
    missing = [i for i in ids if i not in pf.predictions]
    notes = []
    if unknown:
        notes.append(f"{len(unknown)} prediction id(s) are not in the evaluated split (ignored)")
    if missing:
        notes.append(f"{len(missing)} evaluated sample(s) have no prediction (scored as missing: wrong)")
    if pf.invalid_lines:
        notes.append(
            f"{len(pf.invalid_lines)} line(s) of the predictions file are not {{id, prediction}} objects"
        )
    return _Predictions(
        texts={i: pf.predictions.get(i) for i in ids},
        ablated=None,
        model=f"predictions:{Path(options.predictions).name}",
        family=options.family,
        status={i: MISSING for i in missing},
        counts={
            "missing_predictions": len(missing),
            "unknown_ids": len(unknown),
            "invalid_lines": len(pf.invalid_lines),
        },
        notes=notes,
        file_info={
            "file": str(Path(options.predictions).resolve()),
            "lines_with_ids": len(pf.predictions),
            "unknown_ids": len(unknown),
            "unknown_id_examples": unknown[:10],
            "missing_ids": len(missing),
            "missing_id_examples": missing[:10],
            "invalid_lines": len(pf.invalid_lines),
            "invalid_line_numbers": pf.invalid_lines[:10],
            "duplicate_ids": len(pf.duplicate_ids),
        },
        logprobs={i: pf.logprobs.get(i) for i in ids},
    )


def _stats_dict(stats: GenerationStats) -> dict[str, Any]:
    return {
        "generated": stats.requested,
        "from_cache": stats.cached,
        "engine_calls": stats.engine_calls,
        "errors": len(stats.errors),
        "error_examples": dict(list(stats.errors.items())[:5]),
    }


def _from_engine(
    options: EvalOptions,
    engine: Engine | None,
    items: list[EvalItem],
    dataset: Dataset,
    decoding: Decoding,
    out: Path,
    progress: ProgressFn | None,
) -> _Predictions:
    if engine is None:
        from emma.infer.factory import load_engine

        assert options.model is not None
        remote = options.model.strip().lower().startswith("openai:")
        engine = (
            load_engine(options.model)
            if remote
            else load_engine(options.model, max_batch_size=options.batch_size)
        )
    model = options.model or engine.model_name
    model_id = f"{model}|{engine.model_name}"
    cache = PredictionCache(out / CACHE_FILE)
    phases = _wrap_progress(progress, 2 if options.ablate else 1)
    common: dict[str, Any] = {"model_id": model_id, "decoding": decoding, "batch_size": options.batch_size}
    base, stats = generate(items, engine, cache, dataset, progress=phases(0), **common)
    generation: dict[str, Any] = _stats_dict(stats)
    errors = dict(stats.errors)
    ablated_texts = None
    ablated_logprobs = None
    if options.ablate:
        ablated, astats = generate(
            items,
            engine,
            cache,
            dataset,
            ablation=options.ablate,
            seed=options.seed,
            progress=phases(1),
            **common,
        )
        generation["ablated"] = _stats_dict(astats)
        errors.update(astats.errors)
        ablated_texts = {it.id: (ablated[it.id].prediction if it.id in ablated else None) for it in items}
        ablated_logprobs = {it.id: ablated[it.id].logprobs for it in items if it.id in ablated}
    notes = []
    if errors:
        notes.append(
            f"{len(errors)} generation(s) failed (scored as wrong; a rerun into this folder retries them)"
        )
    return _Predictions(
        texts={it.id: (base[it.id].prediction if it.id in base else None) for it in items},
        ablated=ablated_texts,
        model=model,
        family=options.family or engine.family,
        status={i: ERROR for i in errors},
        counts={"generation_errors": len(errors)},
        notes=notes,
        generation=generation,
        engine=engine,
        logprobs={it.id: base[it.id].logprobs for it in items if it.id in base},
        ablated_logprobs=ablated_logprobs,
    )


def _judge(options: EvalOptions, out: Path) -> Any:
    from emma.eval.judge import Judge
    from emma.infer.factory import load_engine

    assert options.judge is not None
    return Judge(
        load_engine(options.judge), cache_path=out / "judge_verdicts.jsonl", batch_size=options.batch_size
    )


def run_eval(
    options: EvalOptions,
    *,
    engine: Engine | None = None,
    judge_engine: Engine | None = None,
    progress: ProgressFn | None = None,
) -> EvalRun:
    """One evaluation run (see the module docstring); returns the results and writes the run folder.

    ``engine`` (instead of ``options.model``) and ``judge_engine`` (instead of ``options.judge``) let a
    caller pass engines it built itself.
    """
    task = get_task(options.task)
    if (options.model is None and engine is None) == (options.predictions is None):
        raise InputError("give a model (--model) or a predictions file (--predictions), not both or neither")
    if options.predictions is not None and options.ablate:
        raise InputError("--ablate needs a model: a predictions file has no images to ablate")
    if (options.judge or judge_engine is not None) and task.scorer != "vqa":
        raise InputError("--judge applies to VQA tasks (open questions) only")
    if options.limit is not None and options.limit < 1:
        raise InputError(f"--limit must be >= 1, got {options.limit}")
    if options.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {options.batch_size}")
    if options.ablate:
        check_mode(options.ablate)
    split = options.split or task.default_split
    out = Path(options.out) if options.out is not None else default_out(options, split)
    with exclusive_folder(out, "evaluation run"):  # one writer of the run folder at a time
        return _run_eval_locked(task, options, split, out, engine, judge_engine, progress)


def _run_eval_locked(
    task: TaskDef,
    options: EvalOptions,
    split: str,
    out: Path,
    engine: Engine | None,
    judge_engine: Engine | None,
    progress: ProgressFn | None,
) -> EvalRun:
    source = open_task_data(task, Path(options.data), out_dir=out)
    dataset = source.dataset
    if split not in dataset.splits:
        raise DataFormatError(
            f"{dataset.root}: no split {split!r} for task {task.name} "
            f"(splits: {', '.join(dataset.splits) or 'none'})"
        )
    skipped: dict[str, int] = {}
    with paused_gc():
        items = list(task.items(dataset.iter_samples(split), skipped))
    if options.limit is not None:
        items = items[: options.limit]
    if not items:
        raise DataFormatError(
            f"task {task.name}: no samples to evaluate in split {split!r} of {dataset.root}"
        )
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise DataFormatError(f"task {task.name}: duplicate sample ids in split {split!r}")
    decoding = _decoding(task, options)
    make_adapter(task, compat=options.compat, family=options.family)  # bad options fail before generating

    if options.predictions is None:
        preds = _from_engine(options, engine, items, dataset, decoding, out, progress)
    with paused_gc():
        if options.predictions is not None:
            preds = _from_file(options, ids)
        return _score_and_write(
            task, options, split, out, source, items, skipped, decoding, preds, judge_engine
        )


def _score_and_write(
    task: TaskDef,
    options: EvalOptions,
    split: str,
    out: Path,
    source: DataSource,
    items: list[EvalItem],
    skipped: dict[str, int],
    decoding: Decoding,
    preds: _Predictions,
    judge_engine: Engine | None,
) -> EvalRun:
    """Score the predictions, add the statistics, checks and config, write the run folder."""
    dataset = source.dataset
    engine = preds.engine if task.scorer == "grounding" else None  # box conversion needs its processor
    processor = engine.capabilities.processor if engine is not None else None
    adapter = make_adapter(task, compat=options.compat, family=preds.family, processor=processor)
    notes = list(preds.notes)

    # The headline metrics are always the real-image ones; an ablation only adds its own block.
    scored = adapter.score_batch(items, preds.texts, preds.logprobs)
    ablated = (
        adapter.score_batch(items, preds.ablated, preds.ablated_logprobs)
        if preds.ablated is not None
        else None
    )
    judge_info = None
    if options.judge or judge_engine is not None:
        from emma.eval.judge import Judge

        judge = (
            Judge(judge_engine, cache_path=out / "judge_verdicts.jsonl", batch_size=options.batch_size)
            if judge_engine is not None
            else _judge(options, out)
        )
        assert isinstance(adapter, VqaAdapter)
        real = apply_judge(adapter, judge, items, scored)
        scored = real.scored
        errors = list(real.errors)
        if ablated is not None:
            ablated_pass = apply_judge(adapter, judge, items, ablated)
            ablated = ablated_pass.scored
            errors += [e for e in ablated_pass.errors if e not in errors]
        judge_info = {**judge.config(), "counts": real.counts, "errors": errors[:5]}
        notes.append(
            "judge_* metrics come from an LLM judge on open questions; rule-based metrics are unchanged"
        )
        if real.counts["judge_errors"]:
            notes.append(
                f"the judge failed on {real.counts['judge_errors']} of {real.counts['judge_n']} open answers "
                f"({errors[0]}): judge_* metrics are null; a re-run asks again for those only"
            )
        elif errors:
            notes.append(
                f"the judge failed on some ablated answers ({errors[0]}): ablated judge_* metrics are null"
            )

    metrics = adapter.metrics(scored)
    ci95 = adapter.cis(scored, options.n_resamples, options.seed)
    counts = {**adapter.counts(scored), **preds.counts, "skipped_samples": sum(skipped.values())}
    if judge_info is not None:
        counts.update(judge_info["counts"])
    if adapter.name != "emma":
        notes.append(
            f"scored with {adapter.name}: a reproduction of a published scorer, bugs included; "
            "not EMMA's rules"
        )
    if isinstance(adapter, ReportAdapter):
        for name, message in adapter.unavailable.items():
            notes.append(f"optional metric {name} {message}")

    ablation_block: dict[str, Any] | None = None
    if ablated is not None:
        ablation_block = {
            "mode": options.ablate,
            "seed": options.seed,
            "ablated": {
                "metrics": adapter.metrics(ablated),
                "ci95": adapter.cis(ablated, options.n_resamples, options.seed),
            },
            "delta": paired_deltas(
                {it.id: s.values for it, s in zip(items, scored)},
                {it.id: s.values for it, s in zip(items, ablated)},
                options.n_resamples,
                options.seed,
            ),
        }

    contamination = None
    if options.train_data is not None:
        from emma.eval.contamination import check_contamination

        contamination = check_contamination(Path(options.train_data), dataset, [it.sample for it in items])
        if contamination["contaminated"]:
            notes.append(
                f"contamination: {contamination['exact_image_overlap']} evaluated image(s) and "
                f"{contamination['image_question_overlap']} image-question pair(s) are also in the "
                "training set"
            )
    zero_shot = zero_shot_block(dataset, split, items, scored, adapter, options.n_resamples, options.seed)
    if zero_shot is not None:
        notes += notes_for(zero_shot)
    if task.name == "vqa-rad" and zero_shot is None:
        notes.append(
            "VQA-RAD official split: 202 of the 203 test images also appear in train (with other questions)"
        )

    rows = [_row(it, preds.texts.get(it.id), s, preds.status.get(it.id)) for it, s in zip(items, scored)]
    if ablated is not None and preds.ablated is not None:
        for row, s, it in zip(rows, ablated, items):
            row["ablated_prediction"] = preds.ablated.get(it.id)
            row["ablated_correct"] = s.correct

    results: dict[str, Any] = {
        "task": task.name,
        "split": split,
        "model": preds.model,
        "n": len(items),
        "metrics": metrics,
        "ci95": ci95,
        "counts": counts,
        "headline": adapter.headline,
        "breakdowns": breakdowns(items, scored, adapter.breakdown_metric, options.n_resamples, options.seed),
        "ablation": ablation_block,
        "contamination": contamination,
        "zero_shot": zero_shot,
        "predictions_file": preds.file_info,
        "generation": preds.generation,
        "skipped": dict(sorted(skipped.items())),
        "notes": notes,
        "config": {
            "task": task.config(),
            "prompts": dict(task.prompts),
            "system_prompt": task.system_prompt,
            "decoding": decoding.as_dict(),
            "batch_size": options.batch_size,
            "limit": options.limit,
            "versions": versions(),
            "data_hash": data_hash(items),
            "data": source.as_dict(),
            **adapter.config(),
            "compat": adapter.name if adapter.name != "emma" else None,
            "ablation": options.ablate,
            "seed": options.seed,
            "bootstrap": {"n_resamples": options.n_resamples, "level": CI_LEVEL, "seed": options.seed},
            "judge": judge_info,
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write(out / PER_SAMPLE_FILE, "".join(dumps(r, None) + "\n" for r in rows))
    atomic_write(out / RESULTS_FILE, dumps(results) + "\n")
    if options.write_report:
        from emma.eval.run_report import write_reports

        write_reports(out, results, rows)
    return EvalRun(out, results, rows)


def _wrap_progress(progress: ProgressFn | None, phases: int) -> Callable[[int], ProgressFn | None]:
    """Progress over ``phases`` generation passes as one bar."""

    def phase(k: int) -> ProgressFn | None:
        if progress is None:
            return None

        def report(done: int, total: int) -> None:
            progress(k * total + done, phases * total)

        return report

    return phase


# ------------------------------------------------------------------------------------------ compare


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """A run folder's results.json and its per-sample metric values by sample id."""
    run_dir = Path(run_dir)
    try:
        results = json.loads((run_dir / RESULTS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFormatError(f"{run_dir}: no {RESULTS_FILE} (not an evaluation run folder)") from None
    except json.JSONDecodeError:
        raise DataFormatError(f"{run_dir / RESULTS_FILE}: not valid JSON") from None
    values: dict[str, dict[str, float]] = {}
    path = run_dir / PER_SAMPLE_FILE
    if not path.is_file():
        raise DataFormatError(f"{run_dir}: no {PER_SAMPLE_FILE}")
    with path.open("r", encoding="utf-8") as fh:
        for lineno, row in json_lines(fh):
            try:
                if not isinstance(row, dict):  # INVALID (not JSON) or another JSON value
                    raise TypeError(type(row).__name__)
                values[str(row["id"])] = {str(k): float(v) for k, v in (row.get("values") or {}).items()}
            except (KeyError, TypeError, ValueError):
                raise DataFormatError(f"{path}: line {lineno} is not a per-sample row") from None
    return results, values


def compare_runs(run_a: Path, run_b: Path, *, n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Paired comparison of two runs on their shared sample ids: ``delta = B - A`` per metric."""
    res_a, val_a = load_run(run_a)
    res_b, val_b = load_run(run_b)
    shared = [i for i in val_a if i in val_b]
    zero_shot = compare_zero_shot(res_a, val_a, res_b, val_b, n_resamples, seed)
    if not shared and (zero_shot is None or zero_shot["gap"] is None):
        raise DataFormatError(
            "the two runs share no sample ids (two splits of one holdout recipe compare unpaired)"
        )
    warnings: list[str] = []
    if res_a.get("task") != res_b.get("task"):
        warnings.append(f"different tasks: {res_a.get('task')} vs {res_b.get('task')}")
    if res_a.get("split") != res_b.get("split"):
        warnings.append(f"different splits: {res_a.get('split')} vs {res_b.get('split')}")
    ha, hb = res_a.get("config", {}).get("data_hash"), res_b.get("config", {}).get("data_hash")
    if ha != hb:
        warnings.append(
            "different evaluated samples or golds (data hashes differ): compared on shared ids only"
        )
    for label, res in (("A", res_a), ("B", res_b)):
        if res.get("config", {}).get("compat"):
            warnings.append(f"run {label} was scored with {res['config']['compat']}")
    return {
        "a": {"run": str(Path(run_a)), "model": res_a.get("model"), "n": len(val_a)},
        "b": {"run": str(Path(run_b)), "model": res_b.get("model"), "n": len(val_b)},
        "task": res_a.get("task"),
        "n_shared": len(shared),
        "only_a": len(val_a) - len(shared),
        "only_b": len(val_b) - len(shared),
        "metrics": paired_deltas(
            {i: val_a[i] for i in shared}, {i: val_b[i] for i in shared}, n_resamples, seed
        ),
        "zero_shot": zero_shot,
        "method": "paired percentile bootstrap (CI, p_bootstrap) and paired permutation test (p_permutation)",
        "bootstrap": {"n_resamples": n_resamples, "level": CI_LEVEL, "seed": seed},
        "warnings": warnings,
    }


__all__ = [
    "EvalOptions",
    "EvalRun",
    "GenerationStats",
    "build_request",
    "compare_runs",
    "default_out",
    "generate",
    "load_run",
    "run_eval",
]
