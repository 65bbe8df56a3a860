"""The resumable runner: order, provenance, rejections, faults, bounded look-ahead, kill -9 and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from annotate_test_steps import Coarse, Synth, Verify, make_source, make_steps
from PIL import Image

from emma.annotate.runner import REJECTED_SPLIT, run_pipeline, worker_threads
from emma.annotate.scripted_teacher import ScriptedTeacher
from emma.annotate.steps import Item, item_hash, prompt_hash, seeded_rng
from emma.annotate.store import ResultStore, result_key
from emma.annotate.teacher import CircuitPolicy, RetryPolicy, load_teacher
from emma.data.store import open_dataset
from emma.errors import InputError

HERE = Path(__file__).resolve().parent
FAST_RETRY = RetryPolicy(max_retries=2, base_s=0.001, max_s=0.005)
_TIME_RE = re.compile(r'"time":"[^"]*"')


def _lines(out: Path, split: str) -> list[str]:
    path = out / "samples" / f"{split}.jsonl"
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def _images(out: Path) -> set[str]:
    return {p.name for p in (out / "images").rglob("*.png")}


def _teacher(lb: ScriptedTeacher, **kw: object) -> object:
    return load_teacher(lb.spec, retry=FAST_RETRY, **kw)  # type: ignore[arg-type]


def test_run_writes_in_order_with_provenance_and_rejections(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", 40, splits=("train", "test"))
    with ScriptedTeacher(max_concurrent=3, latency_s=0.002) as lb, _teacher(lb, concurrency=4) as teacher:  # type: ignore[attr-defined]
        stats = run_pipeline(make_steps(), src, tmp_path / "out", teacher, concurrency=4, progress=False)
        assert lb.stats.max_in_flight <= 3
    out = open_dataset(tmp_path / "out")
    # every input accounted for: 2 outputs (accepted or rejected) per input past coarse, 1 otherwise
    train_ids = [json.loads(line)["id"] for line in _lines(tmp_path / "out", "train")]
    assert train_ids == sorted(train_ids)  # input order (ids sort like the inputs)
    rejected = list(out.iter_samples(REJECTED_SPLIT))
    assert stats.rejected_total == len(rejected) > 0
    assert set(stats.rejected) <= {"low_confidence", "verify_failed"}
    for s in rejected:
        info = s.meta.extra["rejected"]
        assert info["reason"] in ("low_confidence", "verify_failed")
        assert info["step"] in ("coarse", "verify") and info["split"] in ("train", "test")
    accepted = list(out.iter_samples("train")) + list(out.iter_samples("test"))
    assert stats.accepted == len(accepted) > 0
    for s in accepted:
        ann = s.meta.extra["annotation"]
        assert set(ann) == {"coarse", "synth", "verify"}
        assert ann["coarse"]["teacher"] == "openai:loopback" and ann["coarse"]["stage"] == "coarse"
        assert ann["coarse"]["prompt_hash"] == Coarse.prompt_hash and ann["coarse"]["time"]
        assert 0.5 <= ann["coarse"]["confidence"] <= 1.0
    crops = [s for s in accepted if s.id.endswith("~q1")]
    assert crops and all(s.images[0].width == 6 for s in crops)  # the crop was stored as a new image
    assert stats.teacher_calls == lb.stats.answered  # every answer asked exactly once
    saved = json.loads((tmp_path / "out" / "run_stats.json").read_text())
    assert saved["accepted"] == stats.accepted and saved["completed"] is True
    assert saved["rejected_total"] == stats.rejected_total


def test_rerun_of_a_finished_run_skips_everything(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", 20)
    with ScriptedTeacher() as lb:
        first = run_pipeline(make_steps(), src, tmp_path / "out", lb.spec, concurrency=2, progress=False)
        before = _lines(tmp_path / "out", "train"), _lines(tmp_path / "out", REJECTED_SPLIT)
        asked = lb.stats.requests
        again = run_pipeline(make_steps(), src, tmp_path / "out", lb.spec, concurrency=2, progress=False)
        assert lb.stats.requests == asked  # nothing asked again
    assert first.processed == 20 and again.skipped == 20 and again.processed == 0
    assert (_lines(tmp_path / "out", "train"), _lines(tmp_path / "out", REJECTED_SPLIT)) == before


def test_shared_store_reuses_answers_in_a_new_output(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", 12)
    store = tmp_path / "answers"
    with ScriptedTeacher() as lb:
        run_pipeline([Coarse()], src, tmp_path / "a", lb.spec, store=store, concurrency=2, progress=False)
        asked = lb.stats.requests
        stats = run_pipeline(
            make_steps(), src, tmp_path / "b", lb.spec, store=store, concurrency=2, progress=False
        )
    assert stats.cached_answers == 12  # the coarse answers came from the store
    assert stats.teacher_calls == lb.stats.requests - asked


def test_output_folder_of_another_run_is_refused(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", 4)
    with ScriptedTeacher() as lb:
        run_pipeline([Coarse()], src, tmp_path / "out", lb.spec, concurrency=1, progress=False)
        with pytest.raises(InputError, match="different annotation run"):
            run_pipeline(make_steps(), src, tmp_path / "out", lb.spec, concurrency=1, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        run_pipeline([Coarse()], src, tmp_path / "other", "openai:http://127.0.0.1:9/v1#m", progress=False)


def test_teacher_failures_reject_items_and_never_stop_the_batch(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", 12)
    # study 3 always gets a 500, study 5 a dropped connection, study 7 a body that is not JSON
    faults = {"study 3?": "500", "study 5?": "drop", "study 7?": "invalid_json"}

    def fault(r):  # type: ignore[no-untyped-def]
        return next((f for marker, f in faults.items() if marker in r.text), None)

    with ScriptedTeacher(faults=fault) as lb, _teacher(lb, concurrency=3, timeout=5) as teacher:  # type: ignore[attr-defined]
        stats = run_pipeline([Coarse()], src, tmp_path / "out", teacher, concurrency=3, progress=False)
        assert lb.stats.faults == {"500": 3, "drop": 3, "invalid_json": 3}  # 1 try + 2 retries each
    rejected = {
        s.id: s.meta.extra["rejected"] for s in open_dataset(tmp_path / "out").iter_samples(REJECTED_SPLIT)
    }
    assert rejected["s00003"]["reason"] == "server_error" and "HTTP 500" in rejected["s00003"]["detail"]
    assert rejected["s00005"]["reason"] == "connection"
    assert rejected["s00007"]["reason"] in ("server_error", "engine")
    assert rejected["s00003"]["step"] == "coarse"
    assert stats.inputs == 12 and stats.processed == 12
    # failures are not stored: a later run asks again
    with ScriptedTeacher() as lb:
        again = run_pipeline(
            [Coarse()],
            src,
            tmp_path / "out2",
            lb.spec,
            store=tmp_path / "out" / "teacher_store",
            progress=False,
        )
    assert again.teacher_calls == 3 and again.cached_answers == 9


def test_stalled_teacher_times_out_and_is_retried(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", 4)
    stalled: set[str] = set()

    def stall_once(r):  # type: ignore[no-untyped-def]
        if "study 2?" in r.text and "study 2?" not in stalled:
            stalled.add("study 2?")
            return "stall"
        return None

    with (
        ScriptedTeacher(faults=stall_once, stall_s=5) as lb,
        _teacher(lb, concurrency=2, timeout=0.4) as teacher,
    ):  # type: ignore[attr-defined]
        t0 = time.monotonic()
        stats = run_pipeline([Coarse()], src, tmp_path / "out", teacher, concurrency=2, progress=False)
        assert time.monotonic() - t0 < 3
    assert stats.teacher_stats["retries"] == 1
    assert stats.rejected.get("timeout") is None and stats.accepted + stats.rejected_total == 4


def test_circuit_breaker_rejects_fast_then_recovers(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", 30)
    down = threading.Event()
    down.set()

    def outage(r):  # type: ignore[no-untyped-def]
        return "503" if down.is_set() else None

    class Recover:
        """Bring the teacher back once the circuit has opened (the step sees the rejections go by)."""

        name = "coarse"
        prompt_hash = Coarse.prompt_hash

        def __init__(self) -> None:
            self.inner = Coarse()
            self.one_at_a_time = threading.Lock()  # one item at a time, whatever the worker threads

        def __call__(self, item, images, ask):  # type: ignore[no-untyped-def]
            with self.one_at_a_time:
                try:
                    return self.inner(item, images, ask)
                except Exception:
                    if item.sample.id >= "s00010" and down.is_set():
                        down.clear()
                        time.sleep(0.25)  # past the cool-down: the next call is the half-open probe
                    raise

    with ScriptedTeacher(faults=outage) as lb:
        teacher = load_teacher(
            lb.spec,
            concurrency=1,
            retry=RetryPolicy(max_retries=1, base_s=0.0, max_s=0.0),
            circuit=CircuitPolicy(failures=4, cooldown_s=0.2),
        )
        with teacher:
            stats = run_pipeline([Recover()], src, tmp_path / "out", teacher, concurrency=1, progress=False)
        served_503 = lb.stats.faults["503"]
    # 4 failed attempts (calls of 2 attempts each, from the worker threads) open the circuit ...
    assert 1 <= stats.rejected["server_error"] <= 3
    assert stats.rejected["circuit_open"] >= 5  # ... then items fail fast, without a request
    # the open circuit kept requests away: 4 to open it, at most a few already past the breaker
    assert served_503 <= 4 + 3
    assert stats.teacher_stats["circuit_opened"] >= 1
    assert stats.accepted + stats.rejected.get("low_confidence", 0) > 0  # closed again: later items pass
    last = _lines(tmp_path / "out", "train")[-1]
    assert json.loads(last)["id"] == "s00029"


class _Boom:
    name = "boom"
    prompt_hash = prompt_hash("boom")

    def __call__(self, item, images, ask):  # type: ignore[no-untyped-def]
        if item.sample.id == "s00001":
            raise KeyError("a bug")
        return [item]


def test_unreadable_image_and_step_bug_are_rejections(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", 4)
    ds = open_dataset(src)
    sample = next(s for s in ds if s.id == "s00002")
    ds.image_path(sample.images[0]).write_bytes(b"not an image at all")
    with ScriptedTeacher() as lb:
        stats = run_pipeline(
            [_Boom(), Coarse()], src, tmp_path / "out", lb.spec, concurrency=2, progress=False
        )
    rejected = {s.id: s for s in open_dataset(tmp_path / "out").iter_samples(REJECTED_SPLIT)}
    assert rejected["s00001"].meta.extra["rejected"]["reason"] == "step_error"
    assert "KeyError at test_annotate_runner.py:" in rejected["s00001"].meta.extra["rejected"]["detail"]
    bad = rejected["s00002"]
    assert bad.meta.extra["rejected"]["reason"] == "unreadable_image"
    assert bad.images == [] and bad.meta.extra["rejected"]["images"][0]["sha256"] == sample.images[0].sha256
    assert stats.rejected["step_error"] == 1 and stats.rejected["unreadable_image"] == 1


def test_look_ahead_is_bounded_by_the_window(tmp_path: Path) -> None:
    """A stuck head-of-line input holds back at most ``window`` inputs: nothing piles up in memory."""
    src = make_source(tmp_path / "src", 60)
    release = threading.Event()
    started: list[str] = []
    lock = threading.Lock()

    class Gate:
        name = "gate"
        prompt_hash = prompt_hash("gate")

        def __call__(self, item, images, ask):  # type: ignore[no-untyped-def]
            with lock:
                started.append(item.sample.id)
            if item.sample.id == "s00000":
                release.wait(10)
            return [item]

    with ScriptedTeacher() as lb:
        done: list[object] = []
        runner = threading.Thread(
            target=lambda: done.append(
                run_pipeline(
                    [Gate()], src, tmp_path / "out", lb.spec, concurrency=4, window=10, progress=False
                )
            )
        )
        runner.start()
        deadline = time.monotonic() + 5
        while len(started) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert len(started) == 10  # the window, not the dataset
        assert not (tmp_path / "out" / "samples" / "train.jsonl.part").exists() or not _lines_part(
            tmp_path / "out"
        )
        release.set()
        runner.join(10)
    assert len(started) == 60 and done


def _lines_part(out: Path) -> list[str]:
    return (out / "samples" / "train.jsonl.part").read_text().splitlines()


def test_parquet_source_and_output(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", 30, fmt="parquet")
    with ScriptedTeacher() as lb:
        stats = run_pipeline(make_steps(), src, tmp_path / "out", lb.spec, concurrency=4, progress=False)
    out = open_dataset(tmp_path / "out")
    assert out.format == "parquet"
    ids = [s.id for s in out.iter_samples("train")]
    assert ids == sorted(ids) and len(ids) == stats.accepted
    for s in out.iter_samples("train"):
        out.open_image(s.images[0])  # every image is stored and readable


def test_seeded_rng_and_item_hash_are_stable() -> None:
    assert seeded_rng("s1", "synth").random() == seeded_rng("s1", "synth").random()
    assert seeded_rng("s1", "synth").random() != seeded_rng("s2", "synth").random()
    assert len(prompt_hash("a", {"b": 1})) == 16 and prompt_hash("a") != prompt_hash("b")


def test_in_process_teacher_runs_the_pipeline(tmp_path: Path, tiny_loaded) -> None:  # type: ignore[no-untyped-def]
    """An in-process model as the teacher (TransformersEngine, batched): its answers are not the JSON the
    steps expect, so every item is rejected with invalid_json, and nothing fails."""
    from emma.annotate.teacher import Teacher
    from emma.infer.transformers_engine import TransformersEngine
    from emma.infer.types import SamplingParams

    src = make_source(tmp_path / "src", 6, size=32)
    engine = TransformersEngine(tiny_loaded("qwen2_5_vl"), max_batch_size=3)
    teacher = Teacher(
        engine, spec="tiny-qwen2_5_vl", concurrency=3, sampling=SamplingParams(max_new_tokens=3)
    )
    with teacher:
        stats = run_pipeline([Coarse()], src, tmp_path / "out", teacher, concurrency=3, progress=False)
    assert stats.rejected == {"invalid_json": 6}
    assert stats.teacher_calls == 6 and stats.teacher_stats["failed"] == {}


# ---------------------------------------------------------------------------------------- kill -9

_CHILD = """
import sys
sys.path.insert(0, {here!r})
from annotate_test_steps import make_steps
from emma.annotate.runner import run_pipeline
run_pipeline(make_steps(), {src!r}, {out!r}, {spec!r}, concurrency=4, progress=False)
"""


def _store_records(store: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in (store / "segments").glob("*.jsonl"))


def _kill_when(proc: subprocess.Popen[bytes], store: Path, records: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"the child ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
            )  # type: ignore[union-attr]
        if (store / "segments").is_dir() and _store_records(store) >= records:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("the child made no progress")


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    n = 150
    src = make_source(tmp_path / "src", n)
    out = tmp_path / "killed"
    with ScriptedTeacher(max_concurrent=4, latency_s=0.003) as lb:
        script = _CHILD.format(here=str(HERE), src=str(src), out=str(out), spec=lb.spec)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        # kill twice at different points, then finish
        for records in (n // 3, n):
            proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, env=env)
            _kill_when(proc, out / "teacher_store", records)
        asked_before_final = lb.stats.answered
        resumed = run_pipeline(make_steps(), src, out, lb.spec, concurrency=4, progress=False)
        total_asked = lb.stats.answered
        clean = run_pipeline(make_steps(), src, tmp_path / "clean", lb.spec, concurrency=4, progress=False)
        clean_asked = lb.stats.answered - total_asked
    assert resumed.skipped > 0 and resumed.cached_answers > 0 and clean.processed == n
    assert resumed.teacher_calls == total_asked - asked_before_final
    # every answer asked at most once per kill beyond the clean run's: a kill loses at most one answer per
    # worker thread (asked, or answered but not yet in the store), i.e. worker_threads(4) = 6 per kill
    assert total_asked <= clean_asked + 2 * worker_threads(4)
    for split in ("train", REJECTED_SPLIT):
        killed_lines, clean_lines = _lines(out, split), _lines(tmp_path / "clean", split)
        ids = [json.loads(line)["id"] for line in killed_lines]
        assert len(ids) == len(set(ids))  # exactly once
        # identical except the answer times (asked at other moments in the clean run)
        assert [_TIME_RE.sub("", x) for x in killed_lines] == [_TIME_RE.sub("", x) for x in clean_lines]
    assert _images(out) == _images(tmp_path / "clean")


def test_provenance_time_is_the_time_of_the_stored_answer(tmp_path: Path) -> None:
    """A run that finds its answers in the store writes their original times, not the time of the run."""
    src = make_source(tmp_path / "src", 5)
    store = tmp_path / "answers"
    with ScriptedTeacher() as lb:
        run_pipeline([Coarse()], src, tmp_path / "a", lb.spec, store=store, progress=False)
        for seg in (store / "segments").glob("*.jsonl"):  # as if asked long ago
            seg.write_text(_TIME_RE.sub('"time":"x"', seg.read_text()).replace('"t":"20', '"t":"19'))
        stats = run_pipeline([Coarse()], src, tmp_path / "b", lb.spec, store=store, progress=False)
    assert stats.teacher_calls == 0 and stats.cached_answers == 5
    for line in _lines(tmp_path / "b", "train"):
        assert json.loads(line)["meta"]["extra"]["annotation"]["coarse"]["time"].startswith("19")


def test_store_key_names_the_item_step_teacher_and_request(tmp_path: Path) -> None:
    """The answer of the first kill-test step is found under the documented key parts."""
    src = make_source(tmp_path / "src", 1)
    with ScriptedTeacher() as lb:
        run_pipeline([Coarse()], src, tmp_path / "out", lb.spec, progress=False)
    sample = next(iter(open_dataset(src)))
    store = ResultStore(tmp_path / "out" / "teacher_store")
    assert len(store) == 2  # one answer, one done marker
    assert item_hash(sample) == item_hash(sample.model_copy())
    wrong = result_key("answer", item_hash(sample), "coarse", "openai:other", Coarse.prompt_hash, "main", "x")
    assert store.get(wrong) is None
    store.close()


def test_items_returned_keep_unknown_images_out(tmp_path: Path) -> None:
    """A step that points a sample at an image its input does not have gets a step_error, not a crash."""
    src = make_source(tmp_path / "src", 2)
    from emma.data.schema import ImageRef

    class Alien:
        name = "alien"
        prompt_hash = prompt_hash("alien")

        def __call__(self, item, images, ask):  # type: ignore[no-untyped-def]
            s = item.sample.model_copy(update={"images": [ImageRef(sha256="f" * 64)]})
            return [Item(s)]

    with ScriptedTeacher() as lb:
        stats = run_pipeline([Alien(), Verify()], src, tmp_path / "out", lb.spec, progress=False)
    assert stats.rejected == {"step_error": 2}


def test_synth_images_are_kept_for_later_steps(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src", 3)
    seen: list[tuple[str, int]] = []

    class Look:
        name = "look"
        prompt_hash = prompt_hash("look")

        def __call__(self, item, images, ask):  # type: ignore[no-untyped-def]
            seen.append((item.sample.id, images[0].width))
            return [Item(item.sample)]

    with ScriptedTeacher() as lb:
        run_pipeline([Synth(), Look()], src, tmp_path / "out", lb.spec, progress=False)
    assert ("s00000~q1", 6) in seen and ("s00000~q0", 12) in seen
    assert isinstance(Image.new("RGB", (1, 1)), Image.Image)
