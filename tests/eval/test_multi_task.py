"""`emma eval --tasks`: task and group names as one run, one combined report, skipped tasks with the
import command that provides them (run here, then the task runs), and the same run against an
OpenAI-compatible server with a bounded number of requests in flight."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cxr_releases import chexpert_release
from PIL import Image
from typer.testing import CliRunner

from emma.annotate.scripted_teacher import ScriptedRequest, ScriptedTeacher
from emma.cli import app
from emma.errors import InputError
from emma.eval.suite import (
    RELEASE_PLACEHOLDER,
    SUITE_PLOT,
    SUITES,
    expand_tasks,
    import_command,
    run_suite,
)
from emma.eval.tasks import TASKS, get_task

TESTS = Path(__file__).resolve().parents[1]
VQA_RAD_JSON = TESTS / "data" / "fixtures" / "vqa-rad" / "VQA_RAD_Dataset_Public.json"
TINY_FAMILY = "llava_onevision"
runner = CliRunner()


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def vqa_rad_release(folder: Path) -> Path:
    """A VQA-RAD release folder: the fixture JSON and small images (synpic404 stays missing)."""
    folder.mkdir(parents=True)
    shutil.copy(VQA_RAD_JSON, folder / VQA_RAD_JSON.name)
    (folder / "images").mkdir()
    for i in (1, 2, 3, 9):
        small = np.random.default_rng(i).integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 48)).save(folder / f"images/synpic{i}.jpg")
    return folder


def test_task_lists_mix_tasks_and_groups() -> None:
    assert SUITES["radiology-vqa"] == ("vqa-rad", "slake-en", "pathvqa")
    assert not set(SUITES) & set(TASKS)  # a name is a task or a group, never both
    assert expand_tasks("radiology-vqa") == ("vqa-rad", "slake-en", "pathvqa")
    assert expand_tasks(" pmc-vqa , Radiology_VQA,vqa-rad ,") == ("pmc-vqa", "vqa-rad", "slake-en", "pathvqa")
    assert expand_tasks("chexpert,chest-xray") == ("chexpert", "chexpert-14", "padchest", "chestxray14")
    with pytest.raises(InputError, match="unknown suite or task 'vqa-radd'"):
        expand_tasks("vqa-rad,vqa-radd")
    with pytest.raises(InputError, match="no tasks"):
        expand_tasks(" , ")


def test_import_commands_write_where_the_suite_looks(tmp_path: Path) -> None:
    root = tmp_path / "my data"
    assert import_command(get_task("vqa-rad"), root) == (
        f"emma data import vqa-rad --src {RELEASE_PLACEHOLDER} --out '{root / 'vqa-rad'}'"
    )
    assert import_command(get_task("chexpert-14"), None) == (
        f"emma data import chexpert --src {RELEASE_PLACEHOLDER} --out data/chexpert"
    )
    # a task importing with options of its own gets its own folder and the options as flags
    zh = shlex.split(import_command(get_task("slake-zh"), root))
    assert zh[3] == "slake" and zh[zh.index("--out") + 1] == str(root / "slake-zh")
    assert zh[-2:] == ["--lang", "zh"]
    assert shlex.split(import_command(get_task("slake-en"), root))[-2:] == ["--lang", "en"]


def test_cli_tasks_skip_then_import_then_run_and_resume(tmp_path: Path, tiny_model_dir: Any) -> None:
    model = tiny_model_dir(TINY_FAMILY)
    root = tmp_path / "data"
    root.mkdir()
    out = tmp_path / "run"
    args = ["eval", "--tasks", "vqa-rad,slake-en", "--model", model, "--data-root", root, "--out", out]
    args += ["--limit", "2", "--bootstrap", "100"]
    first = invoke(*args, "--json")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["suite"] == "vqa-rad,slake-en" and summary["task_names"] == ["vqa-rad", "slake-en"]
    by_task = {t["task"]: t for t in summary["tasks"]}
    assert {t: v["status"] for t, v in by_task.items()} == {"vqa-rad": "skipped", "slake-en": "skipped"}
    assert "not downloaded" in by_task["vqa-rad"]["reason"]
    md = (out / "suite.md").read_text()
    assert by_task["vqa-rad"]["import_command"] in md and by_task["slake-en"]["import_command"] in md
    assert not (out / SUITE_PLOT).exists()  # nothing ran: nothing to plot

    # the printed command, with the release folder filled in, is what makes the task run
    release = vqa_rad_release(tmp_path / "VQA_RAD release")
    words = shlex.split(by_task["vqa-rad"]["import_command"])
    assert words[:3] == ["emma", "data", "import"]
    words[words.index(RELEASE_PLACEHOLDER)] = str(release)
    imported = invoke(*words[1:])
    assert imported.exit_code == 0, imported.output

    second = invoke(*args)  # the table output, with the remaining import command
    assert second.exit_code == 0, second.output
    assert "emma data import slake" in second.output
    summary = json.loads((out / "suite.json").read_text())
    vqa = next(t for t in summary["tasks"] if t["task"] == "vqa-rad")
    assert vqa["status"] == "done" and vqa["data"] == str(root / "vqa-rad") and vqa["import_command"] is None
    results = json.loads((out / "vqa-rad" / "results.json").read_text())
    assert vqa["n"] == results["n"] == 2 and vqa["metrics"] == results["metrics"]
    assert vqa["ci95"] == results["ci95"][results["headline"]]
    # the combined report: summary table, the plot, every metric of each task with its CI
    md = (out / "suite.md").read_text()
    assert "| vqa-rad | done | 2 |" in md and f"![headline metric by task]({SUITE_PLOT})" in md
    assert "## vqa-rad" in md and all(f"| {m} |" in md for m in results["metrics"])
    assert (out / SUITE_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resumable per task: a rerun generates nothing new
    cache = (out / "vqa-rad" / "predictions.jsonl").read_text()
    third = invoke(*args, "--json")
    assert third.exit_code == 0, third.output
    assert (out / "vqa-rad" / "predictions.jsonl").read_text() == cache
    assert json.loads(third.stdout)["tasks"][0]["metrics"] == vqa["metrics"]


def oracle(answers: dict[str, str]) -> Any:
    """A served model that knows VQA-RAD's answers by question, and says "no" to finding questions."""

    def answer(request: ScriptedRequest) -> str:
        question = request.last_user_text.splitlines()[0].strip()
        return answers.get(question, "no")

    return answer


def test_remote_engine_runs_the_same_tasks_with_bounded_concurrency(tmp_path: Path) -> None:
    root = tmp_path / "data"
    vqa_rad_release(root / "vqa-rad")
    src, _ = chexpert_release(tmp_path / "cx", n_train=20, n_valid=40)
    shutil.move(src, root / "chexpert")
    rows = json.loads(VQA_RAD_JSON.read_text())
    answers = {" ".join(r["question"].split()): str(r["answer"]).strip() for r in rows}
    with ScriptedTeacher(oracle(answers), latency_s=0.3, model="served-7b") as server:
        suite = run_suite(
            "vqa-rad,chexpert,pathvqa",
            out=tmp_path / "remote",
            data_root=root,
            model=server.spec,
            limit=6,
            batch_size=1,
            concurrency=3,
            n_resamples=100,
        )
        stats = server.stats
    status = {t.task: t.status for t in suite.tasks}
    assert status == {"vqa-rad": "done", "chexpert": "done", "pathvqa": "skipped"}
    # at most 3 requests in flight, and the bound is reached (each call carries 3 requests)
    assert stats.max_in_flight == 3 and suite.concurrency == 3 and suite.batch_size == 3
    by_task = {t.task: t for t in suite.tasks}
    assert stats.answered == (by_task["vqa-rad"].n or 0) + (by_task["chexpert"].n or 0)
    # the oracle's answers are scored as right by the same scorer our own model goes through
    assert by_task["vqa-rad"].value == 1.0 and by_task["chexpert"].n == 6
    assert json.loads((tmp_path / "remote" / "suite.json").read_text())["concurrency"] == 3

    # `emma eval --task` (one task) takes the same bound
    with ScriptedTeacher(oracle(answers), latency_s=0.3) as server:
        single = invoke(
            "eval",
            "--task",
            "chexpert",
            "--data",
            root / "chexpert",
            "--model",
            server.spec,
            "--out",
            tmp_path / "single",
            "--limit",
            5,
            "--concurrency",
            2,
            "--bootstrap",
            100,
        )
        assert single.exit_code == 0, single.output
        assert server.stats.max_in_flight == 2 and server.stats.answered == 5


def test_cli_tasks_argument_errors(tmp_path: Path) -> None:
    base = ["eval", "--tasks", "radiology-vqa", "--model", "emma-tiny", "--out", tmp_path / "x"]
    bad = invoke(*base, "--predictions", tmp_path / "p.jsonl", "--split", "test")
    assert bad.exit_code == 2 and "--predictions, --split apply to one --task" in bad.output
    assert invoke("eval", "--tasks", "radiology-vqa").exit_code == 2
    unknown = invoke("eval", "--tasks", "vqa-rad,nope", "--model", "emma-tiny", "--out", tmp_path / "y")
    assert unknown.exit_code == 2 and "unknown suite or task 'nope'" in unknown.output
    # --concurrency bounds a remote server; an in-process model is refused before anything loads
    local = invoke(*base, "--data", f"vqa-rad={tmp_path}", "--concurrency", "2")
    assert local.exit_code == 2 and "openai: server" in local.output
    two = invoke("eval", "--task", "vqa-rad", "--data", tmp_path, "--data", tmp_path, "--model", "emma-tiny")
    assert two.exit_code == 2 and "one --data folder" in two.output
    root = invoke("eval", "--task", "vqa-rad", "--data", tmp_path, "--data-root", tmp_path, "--model", "x")
    assert root.exit_code == 2 and "--data-root applies to --tasks" in root.output
