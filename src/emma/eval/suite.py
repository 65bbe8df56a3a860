"""Many tasks with one model as one run, skipping what is not downloaded (``emma eval --tasks``,
``emma eval suite``).

:data:`SUITES` names groups of tasks: ``emma-table`` is the table of EMMA's claim (VQA-RAD, SLAKE-en,
PathVQA, GMAI-MMBench, CheXpert, PadChest), ``radiology-vqa`` the three open VQA benchmarks,
``chest-xray`` the finding-classification tasks. :func:`expand_tasks` turns a comma list mixing task and
group names (``vqa-rad,chest-xray``) into task names. :func:`run_suite` runs each task through
:func:`emma.eval.runner.run_eval` with one engine loaded once (in-process, or an ``openai:`` server with
at most ``concurrency`` requests in flight):

- **Data.** A task's folder is ``--data TASK=DIR`` when given, else the first existing, non-empty one of
  ``<data root>/<task name>`` and ``<data root>/<importer name>`` (e.g. ``data/slake`` for ``slake-en``):
  a canonical dataset or the official release (imported once, as ``emma eval --data`` does). A task with
  no folder is **skipped** ("not downloaded"), never failed, and its summary carries the
  ``emma data import`` command that puts it where the next run looks (:func:`import_command`).
- **Runs.** Each task writes its own run folder ``<out>/<task>`` (results.json, per_sample.jsonl,
  reports, prediction cache): a rerun resumes every task from its cache. A task that fails (a bad
  release layout, a missing split) is recorded with its one-line error and the suite goes on.
- **Summary.** ``<out>/suite.json``, ``<out>/suite.md`` and ``<out>/suite_headline.png``, rewritten
  after every task: per task its status, data folder, ``n``, every metric with its 95 % CI, the
  headline metric and the run folder (every number is the task's own results.json), and a plot of each
  task's headline metric with its CI.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from emma.data.durable import atomic_write, exclusive_folder
from emma.errors import EmmaError, InputError
from emma.eval.tasks import TASKS, TaskDef, get_task
from emma.infer.engine import Engine

SUITE_FILE = "suite.json"
SUITE_REPORT = "suite.md"
SUITE_PLOT = "suite_headline.png"
RELEASE_PLACEHOLDER = "RELEASE_DIR"  # in an import command: the downloaded release folder
REMOTE_CONCURRENCY = 8  # requests in flight to an openai: server unless --concurrency says otherwise

SUITES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "emma-table": ("vqa-rad", "slake-en", "pathvqa", "gmai-mmbench", "chexpert", "padchest"),
        "chest-xray": ("chexpert", "chexpert-14", "padchest", "chestxray14"),
        "radiology-vqa": ("vqa-rad", "slake-en", "pathvqa"),
    }
)
# How an importer option of a task (TaskDef.importer_options) is spelled on `emma data import`.
_IMPORT_FLAGS: Mapping[str, str] = MappingProxyType(
    {"languages": "--lang", "access": "--access", "uncertainty": "--uncertainty"}
)

Status = Literal["done", "skipped", "failed"]
TaskProgress = Callable[[str, int, int], None]  # (task, done, total)


@dataclass
class SuiteTask:
    """One task of a suite run: what happened and, when it ran, its numbers."""

    task: str
    status: Status
    data: str | None = None
    out: str | None = None
    reason: str | None = None  # why skipped or failed (one line)
    import_command: str | None = None  # skipped: the `emma data import` that provides its data
    n: int | None = None
    headline: str | None = None
    value: float | None = None
    ci95: list[float] | None = None  # of the headline metric
    metrics: dict[str, float | None] = field(default_factory=dict)  # every metric of results.json
    metrics_ci95: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class SuiteRun:
    name: str  # as asked: a suite name, a task name or a comma list of both
    model: str
    out: Path
    task_names: tuple[str, ...] = ()
    batch_size: int | None = None
    concurrency: int | None = None  # bound on requests in flight to an openai: server it loaded
    tasks: list[SuiteTask] = field(default_factory=list)

    @property
    def failed(self) -> list[SuiteTask]:
        return [t for t in self.tasks if t.status == "failed"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "suite": self.name,
            "task_names": list(self.task_names),
            "model": self.model,
            "batch_size": self.batch_size,
            "concurrency": self.concurrency,
            "tasks": [asdict(t) for t in self.tasks],
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def expand_tasks(spec: str) -> tuple[str, ...]:
    """Task names of ``spec``: a suite name, a task name or a comma list of both, in the order given,
    each task once (``vqa-rad,radiology-vqa`` → vqa-rad, slake-en, pathvqa)."""
    names = [_key(part) for part in spec.split(",") if part.strip()]
    if not names:
        raise InputError("no tasks given: name tasks and/or suites, comma-separated")
    out: list[str] = []
    for name in names:
        if name in SUITES:
            out.extend(SUITES[name])
        elif name in TASKS:
            out.append(name)
        else:
            raise InputError(
                f"unknown suite or task '{name}' (suites: {', '.join(SUITES)}; tasks: {', '.join(TASKS)})"
            )
    return tuple(dict.fromkeys(out))


def default_out(spec: str, model: str) -> Path:
    """``runs/<tasks>-<model>``: one folder per (tasks, model), so two models never share a summary."""
    who = model.split("#")[-1] if model.lower().startswith("openai:") else Path(model).name or model

    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "run"

    return Path("runs") / f"{slug(spec)}-{slug(who)}"


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


def import_command(task: TaskDef, data_root: Path | None) -> str:
    """The ``emma data import`` command that writes ``task``'s data where a suite run looks for it
    (``<data root>/<importer>``, or ``<data root>/<task>`` when the task imports with options of its own,
    e.g. slake-zh's ``--lang zh``); the release folder is :data:`RELEASE_PLACEHOLDER`."""
    from emma.data.sources import get_importer

    importer = get_importer(task.importer).name
    folder = task.name if task.importer_options else importer
    root = data_root if data_root is not None else Path("data")
    words = ["emma", "data", "import", importer, "--src", RELEASE_PLACEHOLDER, "--out", str(root / folder)]
    for option, value in task.importer_options.items():
        flag = _IMPORT_FLAGS.get(option, "--" + option.replace("_", "-"))
        for item in value if isinstance(value, (list, tuple)) else [value]:
            words += [flag, str(item)]
    return shlex.join(words)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def _is_remote(model: str) -> bool:
    return model.strip().lower().startswith("openai:")


def open_engine(
    model: str, *, batch_size: int, concurrency: int | None = None
) -> tuple[Engine, int, int | None]:
    """The engine of ``model``, the number of requests to send per ``generate`` call and the bound on
    requests in flight (None in-process).

    In-process: batches of ``batch_size``. An ``openai:`` server: at most ``concurrency`` requests in
    flight (:data:`REMOTE_CONCURRENCY` when None; the :class:`~emma.infer.openai_engine.OpenAIEngine`
    enforces it), and each call carries at least that many requests so that the bound is reached.
    """
    from emma.infer.factory import load_engine

    if not _is_remote(model):
        if concurrency is not None:
            raise InputError(
                "--concurrency bounds the requests in flight to an openai: server; an in-process model "
                "batches with --batch-size"
            )
        return load_engine(model, max_batch_size=batch_size), batch_size, None
    bound = REMOTE_CONCURRENCY if concurrency is None else concurrency
    if bound < 1:
        raise InputError(f"--concurrency must be >= 1, got {bound}")
    return load_engine(model, concurrency=bound), max(batch_size, bound), bound


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
    concurrency: int | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    progress: TaskProgress | None = None,
) -> SuiteRun:
    """Run every task of ``name`` (a suite name, a task name or a comma list of both; module docstring);
    ``model`` is loaded once unless ``engine`` is given (``concurrency``: see :func:`open_engine`).
    Returns the summary, also written to ``<out>/suite.json``, ``suite.md`` and ``suite_headline.png``."""
    tasks = [get_task(t) for t in expand_tasks(name)]
    data = {_key(k): v for k, v in (data or {}).items()}
    unknown = sorted(set(data) - {t.name for t in tasks})
    if unknown:
        raise InputError(f"--data names task(s) not in suite {name}: {', '.join(unknown)}")
    if model is None and engine is None:
        raise InputError("a suite needs a model (--model)")
    if engine is not None and concurrency is not None:
        raise InputError("concurrency applies to the engine a suite loads from --model, not a given engine")
    located = {t.name: locate_data(t, data_root, data) for t in tasks}
    out = Path(out)
    suite = SuiteRun(
        name=name,
        model=model or (engine.model_name if engine else "?"),
        out=out,
        task_names=tuple(t.name for t in tasks),
        batch_size=batch_size,
    )
    with exclusive_folder(out, "evaluation suite"):
        own_engine = engine is None and any(path is not None for path, _ in located.values())
        if own_engine:
            assert model is not None
            engine, suite.batch_size, suite.concurrency = open_engine(
                model, batch_size=batch_size, concurrency=concurrency
            )
        try:
            _run_tasks(suite, tasks, located, engine, data_root, model, limit, n_resamples, seed, progress)
        finally:
            if own_engine and engine is not None:
                engine.close()
        write_summary(suite)
    return suite


def _run_tasks(
    suite: SuiteRun,
    tasks: list[TaskDef],
    located: Mapping[str, tuple[Path | None, str]],
    engine: Engine | None,
    data_root: Path | None,
    model: str | None,
    limit: int | None,
    n_resamples: int,
    seed: int,
    progress: TaskProgress | None,
) -> None:
    from emma.eval.runner import EvalOptions, run_eval

    out = suite.out
    for task in tasks:
        path, why = located[task.name]
        if path is None:
            command = import_command(task, data_root)
            suite.tasks.append(SuiteTask(task.name, "skipped", reason=why, import_command=command))
            continue
        options = EvalOptions(
            task=task.name,
            data=path,
            model=model,
            out=out / task.name,
            limit=limit,
            batch_size=suite.batch_size or 8,
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
            write_summary(suite)
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
                metrics=dict(res["metrics"]),
                metrics_ci95={k: list(v) for k, v in res["ci95"].items() if v},
            )
        )
        write_summary(suite)  # a killed suite keeps the summary of the tasks it finished


def write_summary(suite: SuiteRun) -> None:
    """``suite.json``, ``suite.md`` and (with matplotlib and a headline to show) ``suite_headline.png``."""
    plot = plot_headlines(suite)
    if plot is not None:
        atomic_write(suite.out / SUITE_PLOT, plot)
    atomic_write(suite.out / SUITE_FILE, json.dumps(suite.as_dict(), indent=2, ensure_ascii=False) + "\n")
    atomic_write(suite.out / SUITE_REPORT, render_markdown(suite, plotted=plot is not None))


def plot_headlines(suite: SuiteRun) -> bytes | None:
    """Each done task's headline metric with its 95 % CI (0-1 metrics only); None without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    from emma.eval.run_report import plot_breakdown

    table = {
        f"{t.task}: {t.headline}": {"value": t.value, "ci95": t.ci95, "n": t.n}
        for t in suite.tasks
        if t.status == "done" and t.value is not None and 0.0 <= t.value <= 1.0
    }
    return plot_breakdown("task", table, "headline metric") if table else None


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"


def render_markdown(suite: SuiteRun, *, plotted: bool = False) -> str:
    lines = [
        f"# Suite {suite.name}: {suite.model}",
        "",
        f"Tasks: {', '.join(suite.task_names)}."
        + (f" Requests in flight: at most {suite.concurrency}." if suite.concurrency else ""),
        "",
        "| task | status | n | metric | value | 95% CI | run / reason |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in suite.tasks:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        where = t.out if t.status == "done" else (t.reason or "")
        lines.append(
            f"| {t.task} | {t.status} | {t.n or '-'} | {t.headline or '-'} | {value} | {_ci(t.ci95)} "
            f"| {_cell(where)} |"
        )
    if plotted:
        lines += ["", f"![headline metric by task]({SUITE_PLOT})"]
    skipped = [t for t in suite.tasks if t.import_command]
    if skipped:
        lines += [
            "",
            "## Not downloaded",
            "",
            f"Import each one (`{RELEASE_PLACEHOLDER}`: its release), then rerun:",
            "",
        ]
        lines += ["```bash", *(t.import_command or "" for t in skipped), "```"]
    for t in suite.tasks:
        if t.status != "done":
            continue
        lines += ["", f"## {t.task}", "", f"n = {t.n}; headline: {t.headline}; run: {t.out}", ""]
        lines += ["| metric | value | 95% CI |", "| --- | --- | --- |"]
        for metric, value in t.metrics.items():
            shown = "-" if value is None else f"{value:.4f}"
            lines.append(f"| {_cell(metric)} | {shown} | {_ci(t.metrics_ci95.get(metric))} |")
    return "\n".join(lines) + "\n"
