"""Training progress: a rich progress bar for transformers' ``Trainer``, loggers, and per-stage summaries.

- :class:`RichProgressCallback`: a ``TrainerCallback`` showing step/total, loss, learning rate,
  samples/s and ETA on stderr (replaces transformers' tqdm bar: pass ``disable_tqdm=True``). It keeps the
  log history and, at the end of training, writes ``training_summary.json`` and ``loss.png`` into its
  ``out_dir`` (see :func:`write_summary`).
- :func:`default_report_to`: TensorBoard by default, plus Weights & Biases when ``WANDB_PROJECT`` is set
  (and ``wandb`` is installed).
- :func:`write_summary`: summary JSON + loss curve from a ``log_history`` (the list transformers keeps in
  ``trainer.state.log_history`` / ``trainer_state.json``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from emma.io.dicom import finite_float

SUMMARY_FILE = "training_summary.json"
LOSS_PLOT = "loss.png"


def default_report_to(requested: Sequence[str] | None = None) -> list[str]:
    """``requested`` if given; else ["tensorboard"] (if installed) + ["wandb"] when WANDB_PROJECT is set."""
    if requested is not None:
        return list(requested)
    out: list[str] = []
    if (
        importlib.util.find_spec("tensorboard") is not None
        or importlib.util.find_spec("tensorboardX") is not None
    ):
        out.append("tensorboard")
    if os.environ.get("WANDB_PROJECT") and importlib.util.find_spec("wandb") is not None:
        out.append("wandb")
    return out


def loss_points(log_history: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """``(step, loss)`` of every training log entry carrying a finite loss."""
    points: list[tuple[int, float]] = []
    for entry in log_history:
        loss = finite_float(entry.get("loss"))
        if loss is not None and "step" in entry:
            points.append((int(entry["step"]), loss))
    return points


def plot_loss(points: Sequence[tuple[int, float]], path: Path, title: str = "training loss") -> Path:
    """A PNG of the loss curve (an empty axes with a note when there are no points)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, marker="o" if len(points) < 30 else None, linewidth=1.5)
        else:
            ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def write_summary(
    out_dir: str | Path,
    log_history: Sequence[dict[str, Any]],
    *,
    stage: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``training_summary.json`` and ``loss.png`` into ``out_dir``; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = loss_points(log_history)
    final = next((e for e in reversed(log_history) if "train_runtime" in e), {})
    summary: dict[str, Any] = {
        "stage": stage,
        "steps": max((int(e["step"]) for e in log_history if "step" in e), default=0),
        "first_loss": points[0][1] if points else None,
        "last_loss": points[-1][1] if points else None,
        "min_loss": min((p[1] for p in points), default=None),
        "train_loss": finite_float(final.get("train_loss")),
        "train_runtime_s": finite_float(final.get("train_runtime")),
        "train_samples_per_second": finite_float(final.get("train_samples_per_second")),
        "train_steps_per_second": finite_float(final.get("train_steps_per_second")),
        "loss_curve": [{"step": s, "loss": v} for s, v in points],
        "log_history": [dict(e) for e in log_history],
    }
    if extra:
        summary.update(extra)
    tmp = out / f".{SUMMARY_FILE}.part"
    tmp.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    tmp.replace(out / SUMMARY_FILE)
    plot_loss(points, out / LOSS_PLOT, title=f"{stage} loss" if stage else "training loss")
    return summary


class RichProgressCallback(TrainerCallback):
    """Rich progress bar (loss, lr, samples/s, ETA) + summary files at the end of training."""

    def __init__(
        self,
        out_dir: str | Path | None = None,
        *,
        stage: str = "",
        console: Console | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.stage = stage
        self.console = console or Console(stderr=True)
        self.extra = dict(extra or {})
        self._progress: Progress | None = None
        self._task: Any = None
        self._start = 0.0
        self._start_step = 0
        self._samples_per_step = 1
        self.summary: dict[str, Any] | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        self._samples_per_step = max(
            1, args.train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        )
        self._start = time.perf_counter()
        self._start_step = state.global_step
        self._progress = Progress(
            TextColumn(f"[bold]{self.stage or 'train'}[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[sps]} samples/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=state.max_steps or None, completed=state.global_step, loss="-", lr="-", sps="-"
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._progress is None:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        done = state.global_step - self._start_step
        self._progress.update(
            self._task, completed=state.global_step, sps=f"{done * self._samples_per_step / elapsed:.2f}"
        )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._progress is None or not logs:
            return
        fields: dict[str, str] = {}
        loss = finite_float(logs.get("loss"))
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        lr = finite_float(logs.get("learning_rate"))
        if lr is not None:
            fields["lr"] = f"{lr:.2e}"
        if fields:
            self._progress.update(self._task, **fields)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.out_dir is not None and state.is_world_process_zero:
            self.summary = write_summary(self.out_dir, state.log_history, stage=self.stage, extra=self.extra)
