"""``backend="ray"``: the same steps as Ray Data map_batches on a local single-node Ray (2 CPUs)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from annotate_test_steps import make_source, make_steps

from emma.annotate.runner import REJECTED_SPLIT, Teacher, TeacherConfig, run_pipeline
from emma.annotate.scripted_teacher import ScriptedTeacher
from emma.errors import InputError

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'emma-med[ray]')")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own deprecated settings

HERE = Path(__file__).resolve().parent
_TIME_RE = re.compile(r'"time":"[^"]*"')


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},  # the test steps, importable by the workers
    )
    yield
    ray.shutdown()


def _lines(out: Path, split: str) -> list[str]:
    path = out / "samples" / f"{split}.jsonl"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return [_TIME_RE.sub("", line) for line in text.splitlines()]


def test_ray_backend_matches_local_and_resumes(tmp_path: Path, local_ray: None) -> None:
    src = make_source(tmp_path / "src", 36, splits=("train", "test"))
    with ScriptedTeacher(max_concurrent=4, latency_s=0.002) as lb:
        local = run_pipeline(make_steps(), src, tmp_path / "local", lb.spec, concurrency=4, progress=False)
        # a first run stopped after 10 inputs, then the rest on Ray: the 10 are skipped by the workers
        run_pipeline(make_steps(), src, tmp_path / "ray", lb.spec, concurrency=4, limit=10, progress=False)
        asked = lb.stats.answered
        stats = run_pipeline(
            make_steps(),
            src,
            tmp_path / "ray",
            TeacherConfig(lb.spec),
            concurrency=4,
            backend="ray",
            ray_options={"batch_size": 4, "num_cpus": 0.5},
            progress=False,
        )
        ray_asked = lb.stats.answered - asked
    assert stats.backend == "ray" and stats.inputs == 36
    assert stats.skipped == 10 and stats.processed == 26
    assert ray_asked == stats.teacher_calls > 0
    for split in ("train", "test", REJECTED_SPLIT):
        assert _lines(tmp_path / "ray", split) == _lines(
            tmp_path / "local", split
        )  # same samples, same order
    assert stats.accepted + sum(stats.rejected.values()) < local.accepted + sum(local.rejected.values())
    saved = json.loads((tmp_path / "ray" / "run_stats.json").read_text())
    assert saved["backend"] == "ray" and saved["completed"]


def test_ray_backend_needs_a_teacher_spec(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", 2)
    with ScriptedTeacher() as lb:
        from emma.annotate.teacher import load_teacher

        teacher: Teacher = load_teacher(lb.spec)
        with teacher, pytest.raises(InputError, match="teacher spec"):
            run_pipeline(make_steps(), src, tmp_path / "out", teacher, backend="ray", progress=False)
