"""`emma eval suite`: the emma-table tasks with one tiny in-process model; missing datasets are skipped,
a broken one fails alone, every number is its task's own results.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cxr_releases import chexpert_release
from PIL import Image
from typer.testing import CliRunner

from emma.cli import app
from emma.errors import InputError
from emma.eval.suite import SUITES, run_suite

TESTS = Path(__file__).resolve().parents[1]
TINY_FAMILY = "llava_onevision"


class CountingEngine:
    """The tiny engine, counting the requests it is sent (one engine for the whole suite)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.requests = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def generate(self, requests: Any) -> Any:
        self.requests += len(requests)
        return self.inner.generate(requests)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("suite-data")
    vqa = root / "vqa-rad"
    shutil.copytree(TESTS / "data" / "fixtures" / "vqa-rad", vqa)
    (vqa / "images").mkdir()
    for i in (1, 2, 3, 9):
        small = np.random.default_rng(i).integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 48)).save(vqa / f"images/synpic{i}.jpg")
    shutil.copytree(TESTS / "eval" / "fixtures" / "gmai_mmbench", root / "gmai-mmbench")
    for k, name in enumerate(("g0", "g1")):
        small = np.random.default_rng(10 + k).integers(0, 256, (6, 8, 3), dtype=np.uint8)
        (root / "gmai-mmbench" / "images").mkdir(exist_ok=True)
        Image.fromarray(small).resize((64, 48)).save(root / "gmai-mmbench" / "images" / f"{name}.png")
    src, _ = chexpert_release(root / "cx", n_train=20, n_valid=40)
    shutil.move(src, root / "chexpert")
    (root / "pathvqa").mkdir()
    (root / "pathvqa" / "README.txt").write_text("not a PathVQA release\n")
    (root / "padchest").mkdir()  # an empty folder is "not downloaded"
    return root


@pytest.fixture(scope="module")
def tiny_engine() -> Any:
    from emma.infer.transformers_engine import TransformersEngine
    from emma.model.tiny_families import load_tiny

    return TransformersEngine(load_tiny(TINY_FAMILY), max_batch_size=4)


def test_suite_runs_what_is_there_and_skips_the_rest(
    data_root: Path, tiny_engine: Any, tmp_path: Path
) -> None:
    assert SUITES["emma-table"] == ("vqa-rad", "slake-en", "pathvqa", "gmai-mmbench", "chexpert", "padchest")
    engine = CountingEngine(tiny_engine)
    out = tmp_path / "suite"
    seen: list[str] = []
    suite = run_suite(
        "emma-table",
        out=out,
        data_root=data_root,
        engine=engine,
        model="tiny",
        limit=3,
        batch_size=3,
        n_resamples=100,
        progress=lambda task, done, total: seen.append(task),
    )
    status = {t.task: t.status for t in suite.tasks}
    assert status == {
        "vqa-rad": "done",
        "slake-en": "skipped",
        "pathvqa": "failed",
        "gmai-mmbench": "done",
        "chexpert": "done",
        "padchest": "skipped",
    }
    by_task = {t.task: t for t in suite.tasks}
    assert "not downloaded" in (by_task["slake-en"].reason or "")
    assert "pathvqa" in (by_task["pathvqa"].reason or "").lower()
    assert set(seen) == {"vqa-rad", "gmai-mmbench", "chexpert"}
    assert engine.requests == sum(by_task[n].n or 0 for n in set(seen)) and by_task["chexpert"].n == 3
    for name in ("vqa-rad", "gmai-mmbench", "chexpert"):
        t = by_task[name]
        results = json.loads((out / name / "results.json").read_text())
        assert t.n == results["n"] and t.headline == results["headline"]
        assert t.value == results["metrics"][t.headline] and t.ci95 == results["ci95"].get(t.headline)
    assert by_task["chexpert"].headline == "macro_f1" or by_task["chexpert"].value is None
    on_disk = json.loads((out / "suite.json").read_text())
    assert [t["task"] for t in on_disk["tasks"]] == list(SUITES["emma-table"])
    md = (out / "suite.md").read_text()
    assert "| pathvqa | failed |" in md and "| padchest | skipped |" in md
    # a rerun resumes every task from its prediction cache
    again = CountingEngine(tiny_engine)
    rerun = run_suite(
        "emma-table",
        out=out,
        data_root=data_root,
        engine=again,
        model="tiny",
        limit=3,
        batch_size=3,
        n_resamples=100,
    )
    assert again.requests == 0
    assert [t.value for t in rerun.tasks] == [t.value for t in suite.tasks]


def test_suite_checks_its_arguments(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown suite"):
        run_suite("nope", out=tmp_path / "s", data_root=data_root, model="x")
    with pytest.raises(InputError, match="not in suite"):
        run_suite("emma-table", out=tmp_path / "s", data={"mimic-cxr": data_root}, model="x")
    # nothing downloaded: no model is loaded (the spec is never resolved), every task skipped
    suite = run_suite("chest-xray", out=tmp_path / "s", data_root=tmp_path / "empty", model="no/such-model")
    assert {t.status for t in suite.tasks} == {"skipped"}


def test_cli_suite_with_a_model_folder(data_root: Path, tmp_path: Path) -> None:
    from emma.model.tiny_families import build_tiny

    model = build_tiny(TINY_FAMILY)
    args = [
        "eval",
        "suite",
        "emma-table",
        "--model",
        str(model),
        "--out",
        str(tmp_path / "s"),
        "--limit",
        "2",
    ]
    args += ["--data", f"chexpert={data_root / 'chexpert'}", "--bootstrap", "100", "--json"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {t["task"]: t["status"] for t in summary["tasks"]}["chexpert"] == "done"
    assert sum(t["status"] == "done" for t in summary["tasks"]) == 1  # no --data-root: the rest skipped
    failing = CliRunner().invoke(
        app,
        [
            "eval",
            "suite",
            "--model",
            str(model),
            "--out",
            str(tmp_path / "f"),
            "--data",
            f"pathvqa={data_root / 'pathvqa'}",
        ],
    )
    assert failing.exit_code == 1 and "failed" in failing.output
    bad = CliRunner().invoke(app, ["eval", "suite", "--model", str(model), "--data", "chexpert"])
    assert bad.exit_code == 2 and "TASK=DIR" in bad.output
