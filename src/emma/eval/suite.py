"""Named suites: several tasks run with one model as one command, skipping what is not downloaded.

:data:`SUITES` names them; ``emma-table`` is the table of EMMA's claim (VQA-RAD, SLAKE-en, PathVQA,
GMAI-MMBench, CheXpert, PadChest). :func:`run_suite` runs each task of a suite through
:func:`emma.eval.runner.run_eval` with one engine loaded once:

- **Data.** A task's folder is ``--data TASK=DIR`` when given, else the first existing, non-empty one of
  ``<data root>/<task name>`` and ``<data root>/<importer name>`` (e.g. ``data/slake`` for ``slake-en``):
  a canonical dataset or the official release (imported once, as ``emma eval --data`` does). A task with
  no folder is **skipped** ("not downloaded"), never failed.
- **Runs.** Each task writes its own run folder ``<out>/<task>`` (results.json, per_sample.jsonl,
  reports, prediction cache): a rerun resumes every task from its cache. A task that fails (a bad
  release layout, a missing split) is recorded with its one-line error and the suite goes on.
- **Summary.** ``<out>/suite.json`` and ``<out>/suite.md``: per task its status, data folder, ``n``, the
  headline metric with its 95 % CI and the run folder; every number is the task's own results.json.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from emma.data.durable import atomic_write, exclusive_folder
from emma.errors import EmmaError, InputError
from emma.eval.tasks import TaskDef, get_task
from emma.infer.engine import Engine

SUITE_FILE = "suite.json"
SUITE_REPORT = "suite.md"

SUITES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "emma-table": ("vqa-rad", "slake-en", "pathvqa", "gmai-mmbench", "chexpert", "padchest"),
        "chest-xray": ("chexpert", "chexpert-14", "padchest", "chestxray14"),
    }
)

Status = Literal["done", "skipped", "failed"]
TaskProgress = Callable[[str, int, int], None]  # (task, done, total)


@dataclass
class SuiteTask:
    """One task of a suite run: what happened and, when it ran, its headline number."""

    task: str
    status: Status
    data: str | None = None
    out: str | None = None
    reason: str | None = None  # why skipped or failed (one line)
    n: int | None = None
    headline: str | None = None
    value: float | None = None
    ci95: list[float] | None = None


@dataclass
class SuiteRun:
    name: str
    model: str
    out: Path
    tasks: list[SuiteTask] = field(default_factory=list)

    @property
    def failed(self) -> list[SuiteTask]:
        return [t for t in self.tasks if t.status == "failed"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "suite": self.name,
            "model": self.model,
            "tasks": [asdict(t) for t in self.tasks],
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }


def get_suite(name: str) -> tuple[str, ...]:
    key = name.strip().lower().replace("_", "-")
    if key not in SUITES:
        raise InputError(f"unknown suite '{name}' (known: {', '.join(SUITES)})")
    return SUITES[key]


def _usable(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def locate_data(task: TaskDef, data_root: Path | None, data: Mapping[str, Path]) -> tuple[Path | None, str]:
    """The task's data folder and, when there is none, what was looked for."""
    if task.name in data:
        given = Path(data[task.name])
        return (given, "") if given.is_dir() else (None, f"--data {task.name}={given} is not a folder")
    if data_root is None:
        return None, "no --data-root and no --data for it"
    candidates = list(dict.fromkeys([data_root / task.name, data_root / task.importer]))
    for candidate in candidates:
        if _usable(candidate):
            return candidate, ""
    return None, "not downloaded (looked for " + ", ".join(str(c) for c in candidates) + ")"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def run_suite(
    name: str,
    *,
    out: Path,
    data_root: Path | None = None,
    data: Mapping[str, Path] | None = None,
    model: str | None = None,
    engine: Engine | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    n_resamples: int = 2000,
    seed: int = 0,
    progress: TaskProgress | None = None,
) -> SuiteRun:
    """Run every task of suite ``name`` (module docstring); ``model`` is loaded once unless ``engine``
    is given. Returns the summary, also written to ``<out>/suite.json`` and ``<out>/suite.md``."""
    tasks = [get_task(t) for t in get_suite(name)]
    data = dict(data or {})
    unknown = sorted(set(data) - {t.name for t in tasks})
    if unknown:
        raise InputError(f"--data names task(s) not in suite {name}: {', '.join(unknown)}")
    if model is None and engine is None:
        raise InputError("a suite needs a model (--model)")
    located = {t.name: locate_data(t, data_root, data) for t in tasks}
    out = Path(out)
    suite = SuiteRun(name=name, model=model or (engine.model_name if engine else "?"), out=out)
    with exclusive_folder(out, "evaluation suite"):
        own_engine = engine is None and any(path is not None for path, _ in located.values())
        if own_engine:
            from emma.infer.factory import load_engine

            assert model is not None
            remote = model.strip().lower().startswith("openai:")
            engine = load_engine(model) if remote else load_engine(model, max_batch_size=batch_size)
        try:
            _run_tasks(
                suite, tasks, located, engine, out, model, limit, batch_size, n_resamples, seed, progress
            )
        finally:
            if own_engine and engine is not None:
                engine.close()
        atomic_write(out / SUITE_FILE, json.dumps(suite.as_dict(), indent=2, ensure_ascii=False) + "\n")
        atomic_write(out / SUITE_REPORT, render_markdown(suite))
    return suite


def _run_tasks(
    suite: SuiteRun,
    tasks: list[TaskDef],
    located: Mapping[str, tuple[Path | None, str]],
    engine: Engine | None,
    out: Path,
    model: str | None,
    limit: int | None,
    batch_size: int,
    n_resamples: int,
    seed: int,
    progress: TaskProgress | None,
) -> None:
    from emma.eval.runner import EvalOptions, run_eval

    for task in tasks:
        path, why = located[task.name]
        if path is None:
            suite.tasks.append(SuiteTask(task.name, "skipped", reason=why))
            continue
        options = EvalOptions(
            task=task.name,
            data=path,
            model=model,
            out=out / task.name,
            limit=limit,
            batch_size=batch_size,
            n_resamples=n_resamples,
            seed=seed,
        )
        report = functools.partial(progress, task.name) if progress is not None else None
        try:
            run = run_eval(options, engine=engine, progress=report)
        except EmmaError as exc:
            suite.tasks.append(
                SuiteTask(
                    task.name, "failed", data=str(path), out=str(out / task.name), reason=_one_line(exc)
                )
            )
            continue
        res = run.results
        head = res["headline"]
        value = res["metrics"].get(head)
        suite.tasks.append(
            SuiteTask(
                task.name,
                "done",
                data=str(path),
                out=str(run.out),
                n=int(res["n"]),
                headline=head,
                value=None if value is None else float(value),
                ci95=res["ci95"].get(head),
            )
        )


def render_markdown(suite: SuiteRun) -> str:
    lines = [
        f"# Suite {suite.name}: {suite.model}",
        "",
        "| task | status | n | metric | value | 95% CI | run / reason |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in suite.tasks:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        ci = f"[{t.ci95[0]:.4f}, {t.ci95[1]:.4f}]" if t.ci95 else "-"
        where = t.out if t.status == "done" else (t.reason or "")
        where = where.replace("|", "\\|")
        lines.append(
            f"| {t.task} | {t.status} | {t.n or '-'} | {t.headline or '-'} | {value} | {ci} | {where} |"
        )
    return "\n".join(lines) + "\n"
