"""The teacher (retries, backoff, circuit breaker, batching), the durable store and the scripted teacher server."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from emma.annotate.scripted_teacher import ScriptedTeacher, echo_answer, fail_every, fail_first, fail_when
from emma.annotate.store import ResultStore, result_key
from emma.annotate.teacher import (
    CircuitBreaker,
    CircuitPolicy,
    RetryPolicy,
    Teacher,
    TeacherError,
    classify_failure,
    load_teacher,
    teacher_name,
)
from emma.infer.types import GenerationResponse, Message, SamplingParams

NO_WAIT = RetryPolicy(max_retries=3, base_s=0.0, max_s=0.0)


def _ask(teacher: Teacher, text: str = "hello") -> str:
    return teacher.ask([Message.text("user", text)])


# ------------------------------------------------------------------------------------ scripted teacher


def test_scripted_teacher_serves_openai_chat_and_bounds_concurrency() -> None:
    with ScriptedTeacher(latency_s=0.05, max_concurrent=2, model="m") as lb:
        assert lb.spec == f"openai:{lb.url}#m" and lb.capacity == 40
        models = httpx.get(f"{lb.url}/models").json()
        assert models["data"][0]["id"] == "m"
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        with ThreadPoolExecutor(6) as pool:
            t0 = time.monotonic()
            answers = list(
                pool.map(lambda _: httpx.post(f"{lb.url}/chat/completions", json=body).json(), range(6))
            )
            elapsed = time.monotonic() - t0
        assert lb.stats.max_in_flight == 2 and lb.stats.max_waiting >= 1  # beyond K, requests wait
        assert elapsed >= 3 * 0.05 * 0.9  # 6 requests through 2 slots of 50 ms
        texts = {a["choices"][0]["message"]["content"] for a in answers}
        assert len(texts) == 1 and json.loads(texts.pop())["images"] == 0  # deterministic answer
        assert httpx.post(f"{lb.url}/chat/completions", json={"nope": 1}).status_code == 400


def test_scripted_teacher_faults() -> None:
    faults = fail_when(lambda r: "boom" in r.text, "503")
    with ScriptedTeacher(faults=faults) as lb:
        ok = {"model": "x", "messages": [{"role": "user", "content": "fine"}]}
        bad = {"model": "x", "messages": [{"role": "user", "content": "boom"}]}
        assert httpx.post(f"{lb.url}/chat/completions", json=ok).status_code == 200
        assert httpx.post(f"{lb.url}/chat/completions", json=bad).status_code == 503
    with ScriptedTeacher(faults=fail_first(1, "drop")) as lb, pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{lb.url}/chat/completions", json=ok)
    with ScriptedTeacher(faults=fail_first(1, "invalid_json")) as lb:
        r = httpx.post(f"{lb.url}/chat/completions", json=ok)
        with pytest.raises(json.JSONDecodeError):
            r.json()
    pick = fail_every(3, "429", offset=1)
    seen = [pick(type("R", (), {"index": i})()) for i in range(7)]  # type: ignore[arg-type]
    assert seen == [None, "429", None, None, "429", None, None]
    with pytest.raises(ValueError):
        fail_first(1, "teapot")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------- teacher


@pytest.mark.parametrize("fault", ["429", "500", "503", "drop", "invalid_json"])
def test_retryable_faults_are_retried_once_each_layer(fault: str) -> None:
    with ScriptedTeacher(faults=fail_first(2, fault)) as lb:  # type: ignore[arg-type]
        with load_teacher(lb.spec, retry=NO_WAIT, timeout=5) as teacher:
            answer = _ask(teacher)
        assert json.loads(answer)["echo"]
        # exactly 3 requests: the openai client does not retry on top of the teacher
        assert lb.stats.requests == 3
    assert teacher.stats()["retries"] == 2 and teacher.stats()["failed"] == {}


def test_gives_up_after_the_retries_with_the_reason() -> None:
    with ScriptedTeacher(faults=fail_first(100, "429")) as lb:
        with load_teacher(lb.spec, retry=NO_WAIT) as teacher, pytest.raises(TeacherError) as err:
            _ask(teacher, "secret patient text")
        assert lb.stats.requests == 4
    assert err.value.reason == "rate_limited" and err.value.attempts == 4 and err.value.status == 429
    assert "secret" not in str(err.value) and "loopback fault" not in str(err.value)  # no content
    assert teacher.stats()["failed"] == {"rate_limited": 1}


def test_stall_times_out_and_is_retried() -> None:
    with ScriptedTeacher(faults=fail_first(1, "stall"), stall_s=5) as lb:
        with load_teacher(lb.spec, retry=NO_WAIT, timeout=0.3) as teacher:
            t0 = time.monotonic()
            assert json.loads(_ask(teacher))["echo"]
            assert time.monotonic() - t0 < 2
        assert lb.stats.faults["stall"] == 1


def test_backoff_is_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(max_retries=5, base_s=0.5, max_s=3.0)
    rng = random.Random(0)
    for retry, cap in enumerate([0.5, 1.0, 2.0, 3.0, 3.0]):
        delays = [policy.delay(retry, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8 and min(delays) < cap * 0.2  # spread over the whole range
    slept: list[float] = []
    with ScriptedTeacher(faults=fail_first(3, "500")) as lb:
        teacher = load_teacher(lb.spec, retry=RetryPolicy(max_retries=3, base_s=0.01, max_s=1.0), seed=1)
        teacher._sleep = slept.append  # record the waits instead of sleeping
        with teacher:
            _ask(teacher)
    assert len(slept) == 3 and slept[0] <= 0.01 and slept[1] <= 0.02 and slept[2] <= 0.04


def test_unusable_input_is_not_retried() -> None:
    class Refusing:
        model_name = "refusing"
        family = None

        def __init__(self) -> None:
            self.calls = 0

        def generate(self, requests):  # type: ignore[no-untyped-def]
            self.calls += 1
            return [
                GenerationResponse(r.request_id, "", "error", error="too long", error_kind="prompt_too_long")
                for r in requests
            ]

    engine = Refusing()
    teacher = Teacher(engine, spec="refusing", retry=NO_WAIT, in_process=False)  # type: ignore[arg-type]
    with pytest.raises(TeacherError) as err:
        _ask(teacher)
    assert err.value.reason == "input" and engine.calls == 1
    assert teacher.breaker.state == "closed"


@pytest.mark.parametrize(
    ("error", "kind", "reason"),
    [
        ("HTTP 429 from the model server: slow down", None, "rate_limited"),
        ("HTTP 503 from the model server: x", None, "server_error"),
        ("HTTP 408 from the model server: x", None, "timeout"),
        ("HTTP 400 from the model server: bad", None, "input"),
        ("HTTP 404 from the model server: no model", None, "input"),
        ("the model server timed out", None, "timeout"),
        ("cannot connect to the model server", None, "connection"),
        ("RuntimeError: CUDA out of memory", "engine", "engine"),
        ("PromptTooLongError: ...", "prompt_too_long", "input"),
    ],
)
def test_classify_failure(error: str, kind: str | None, reason: str) -> None:
    response = GenerationResponse("r", "", "error", error=error, error_kind=kind)  # type: ignore[arg-type]
    assert classify_failure(response)[0] == reason


def test_circuit_breaker_states() -> None:
    now = [0.0]
    breaker = CircuitBreaker(CircuitPolicy(failures=3, cooldown_s=10), clock=lambda: now[0])
    for _ in range(2):
        assert breaker.acquire()
        breaker.failure()
    breaker.success()  # a success resets the count
    for _ in range(3):
        assert breaker.acquire()
        breaker.failure()
    assert breaker.state == "open" and not breaker.acquire() and breaker.opened == 1
    now[0] = 10.0
    assert breaker.state == "half_open"
    assert breaker.acquire() and not breaker.acquire()  # exactly one probe
    breaker.failure()  # the probe failed: open again, for a new cool-down
    assert breaker.state == "open"
    now[0] = 20.0
    assert breaker.acquire()
    breaker.success()
    assert breaker.state == "closed" and breaker.acquire() and breaker.acquire()


def test_open_circuit_fails_fast_without_requests() -> None:
    now = [0.0]
    down = threading.Event()
    down.set()
    with ScriptedTeacher(faults=lambda r: "500" if down.is_set() else None) as lb:
        teacher = Teacher(
            load_teacher(lb.spec).engine,
            spec=lb.spec,
            retry=RetryPolicy(max_retries=1, base_s=0, max_s=0),
            circuit=CircuitPolicy(failures=4, cooldown_s=30),
            clock=lambda: now[0],
        )
        with teacher:
            for _ in range(2):
                with pytest.raises(TeacherError, match="server_error"):
                    _ask(teacher)
            assert lb.stats.requests == 4
            with pytest.raises(TeacherError) as err:
                _ask(teacher)
            assert err.value.reason == "circuit_open" and lb.stats.requests == 4  # nothing sent
            down.clear()
            now[0] = 31.0  # cool-down over: the next call probes and closes the circuit
            assert json.loads(_ask(teacher))["echo"]
            assert teacher.breaker.state == "closed" and lb.stats.requests == 5


def test_remote_concurrency_is_bounded() -> None:
    with ScriptedTeacher(latency_s=0.03) as lb:
        with load_teacher(lb.spec, concurrency=3) as teacher, ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: _ask(teacher, f"q{i}"), range(16)))
        assert lb.stats.max_in_flight == 3


def test_teacher_name_leaves_out_where_the_model_is_served() -> None:
    assert teacher_name("openai:http://10.0.0.5:8000/v1#Qwen/Qwen2.5-VL-72B") == "openai:Qwen/Qwen2.5-VL-72B"
    assert teacher_name("emma-tiny") == "emma-tiny"
    with pytest.raises(ValueError, match="not used"):
        load_teacher("openai:http://127.0.0.1:9/v1#m", device="cpu")


def test_in_process_teacher_batches_concurrent_calls(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    teacher = load_teacher(
        str(tiny_model_dir("qwen2_5_vl")), concurrency=4, sampling=SamplingParams(max_new_tokens=2)
    )
    sizes: list[int] = []
    generate = teacher.engine.generate

    def spy(requests):  # type: ignore[no-untyped-def]
        sizes.append(len(requests))
        time.sleep(0.05)  # let the other callers queue up behind this batch
        return generate(requests)

    teacher.engine.generate = spy  # type: ignore[method-assign]
    with teacher, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _ask(teacher, f"question {i}"), range(8)))
    assert len(answers) == 8 and all(isinstance(a, str) for a in answers)
    assert sum(sizes) == 8 and max(sizes) > 1 and max(sizes) <= 4  # batched, never over the batch size
    assert teacher.in_process and teacher.family == "qwen2_5_vl"


# ---------------------------------------------------------------------------------------------- store


def test_store_round_trip_and_first_record_wins(tmp_path: Path) -> None:
    k1, k2 = result_key("a", "1"), result_key("a", "2")
    with ResultStore(tmp_path / "s", fsync="always") as store:
        assert store.put_answer(k1, "één answer\nwith a newline", "2020-01-01T00:00:00+00:00")
        store.put_done(k2, ["x", "y"])
        store.put_answer(k1, "a later duplicate")
        assert store.get(k1) is None  # records written by this process are not indexed (see module doc)
    with ResultStore(tmp_path / "s") as store:
        rec = store.get(k1)
        assert rec is not None and rec.answer == "één answer\nwith a newline" and rec.time.startswith("2020")
        assert store.get(k2).outputs == ["x", "y"]  # type: ignore[union-attr]
        assert len(store) == 2 and k1 in store and result_key("zz") not in store
    assert len(list((tmp_path / "s" / "segments").glob("*.jsonl"))) == 1


def test_store_ignores_torn_lines_and_writers_keep_their_own_segments(tmp_path: Path) -> None:
    keys = [result_key("k", str(i)) for i in range(5)]
    with ResultStore(tmp_path / "s") as store:
        for i, k in enumerate(keys[:3]):
            store.put_answer(k, f"answer {i}")
    seg = next((tmp_path / "s" / "segments").glob("*.jsonl"))
    data = seg.read_bytes()
    # a killed writer: the last record cut in half, garbage in the middle of another file
    seg.write_bytes(data[: len(data) - 9])
    (tmp_path / "s" / "segments" / "other.jsonl").write_bytes(
        b"\x00\x00\x00\n" + b'{"k":"' + keys[3].encode() + b'","t":"t","a":"ok"}\n'
    )
    with ResultStore(tmp_path / "s") as store:
        assert store.torn == 2
        assert store.get(keys[0]).answer == "answer 0"  # type: ignore[union-attr]
        assert store.get(keys[2]) is None  # torn: asked again
        assert store.get(keys[3]).answer == "ok"  # type: ignore[union-attr]
        store.put_answer(keys[2], "again")
    with ResultStore(tmp_path / "s") as store:
        assert store.get(keys[2]).answer == "again"  # type: ignore[union-attr]
    assert seg.read_bytes() == data[: len(data) - 9]  # never touched by another writer
    assert len(list((tmp_path / "s" / "segments").glob("*.jsonl"))) == 3


def test_store_concurrent_writers(tmp_path: Path) -> None:
    """Threads of one process and several store objects (as Ray workers) write without losing a record."""
    stores = [ResultStore(tmp_path / "s") for _ in range(3)]
    keys = [result_key("c", str(i)) for i in range(300)]

    def put(i: int) -> None:
        stores[i % 3].put_answer(keys[i], f"v{i}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(300)))
    for s in stores:
        s.close()
    with ResultStore(tmp_path / "s") as store:
        assert len(store) == 300
        assert all(store.get(k).answer == f"v{i}" for i, k in enumerate(keys))  # type: ignore[union-attr]


def test_store_rejects_bad_keys_and_closed_writes(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s")
    with pytest.raises(ValueError):
        store.put_answer("not-a-key", "x")
    store.close()
    from emma.errors import DataFormatError

    with pytest.raises(DataFormatError):
        store.put_answer(result_key("x"), "x")
    assert echo_answer  # the default answer function is exported
