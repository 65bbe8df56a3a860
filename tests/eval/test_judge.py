"""LLM-as-judge: verdict parsing, and caching through a real OpenAIEngine talking to a scripted
OpenAI-shaped test peer on loopback (a test peer, not a product)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from emma.eval.judge import (
    JUDGE_PROMPT_HASH,
    JUDGE_SYSTEM,
    JUDGE_TEMPLATE,
    Judge,
    JudgeItem,
    Verdict,
    VerdictCache,
    judge_counts,
    judge_errors,
    judge_metrics,
    parse_verdict,
)
from emma.infer.factory import load_engine


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("CORRECT", 1),
        ("INCORRECT", 0),
        ("correct.", 1),
        ("  Incorrect!\n", 0),
        ("**CORRECT**", 1),
        ("Verdict: INCORRECT", 0),
        ("Incorrect - the lesion is on the left, not the right.", 0),
        ("CORRECT. The candidate names the same organ.", 1),
        ("<think>the reference says liver; the candidate says liver</think>\nCORRECT", 1),
        ("The candidate is close.\nVerdict: CORRECT", 1),
        ("The answer is not correct.", None),  # not a leading verdict word: no guessing
        ("The answer is correct", None),
        ("maybe", None),
        ("", None),
        ("CORRECTNESS unclear", None),
        ("<think>CORRECT or INCORRECT? unsure", None),
    ],
)
def test_parse_verdict(reply: str, verdict: int | None) -> None:
    assert parse_verdict(reply) == verdict


def test_prompt_is_fixed_and_hashed() -> None:
    import hashlib

    assert (
        hashlib.sha256(f"{JUDGE_SYSTEM}\x00{JUDGE_TEMPLATE}".encode()).hexdigest()[:16] == JUDGE_PROMPT_HASH
    )
    assert set(re.findall(r"{(\w+)}", JUDGE_TEMPLATE)) == {"question", "reference", "prediction"}


# --------------------------------------------------------------------------- scripted test peer


@dataclass
class PeerState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    bodies: list[dict[str, Any]] = field(default_factory=list)


def _field(prompt: str, name: str) -> str:
    m = re.search(rf"^{name}: (.*)$", prompt, re.M)
    assert m is not None, prompt
    return m.group(1).strip()


def _script(body: dict[str, Any]) -> str:
    """Deterministic judge: CORRECT when candidate == reference (case-insensitive), a non-answer when
    the candidate contains '???', a 'thinking' reply for 'think', else INCORRECT."""
    prompt = body["messages"][-1]["content"]
    reference, candidate = _field(prompt, "Reference answer"), _field(prompt, "Candidate answer")
    if "???" in candidate:
        return "I am not sure about this one."
    if "think" in candidate:
        return "<think>compare</think>Verdict: CORRECT"
    return "CORRECT" if candidate.lower() == reference.lower() else "INCORRECT"


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.state.lock:
            self.server.state.bodies.append(body)
        text = _script(body)
        payload = {
            "id": "j",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
        }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def peer(loopback_http: Callable[[type[BaseHTTPRequestHandler], Any], str]) -> tuple[str, PeerState]:
    state = PeerState()
    return loopback_http(_Handler, state), state


ITEMS = [
    JudgeItem("1", "Which organ is shown?", "liver", "Liver"),
    JudgeItem("2", "Where is the lesion?", "left lobe", "right lobe"),
    JudgeItem("3", "What is the finding?", "pneumothorax", "??? hard to say"),
    JudgeItem("4", "What modality?", "ct", "let me think: CT"),
]


def test_judge_verdicts_metrics_and_cache(peer: tuple[str, PeerState], tmp_path: Path) -> None:
    url, state = peer
    cache = tmp_path / "judge_cache.jsonl"
    engine = load_engine(f"openai:{url}#judge-a", api_key="k")
    judge = Judge(engine, cache_path=cache, batch_size=3)

    verdicts = judge.judge(ITEMS)
    assert [v.verdict for v in verdicts] == [1, 0, None, 1]
    assert [v.status for v in verdicts] == ["ok", "ok", "unparseable", "ok"]
    assert [v.correct for v in verdicts] == [True, False, None, True]
    assert not any(v.cached for v in verdicts)
    assert len(state.bodies) == 4
    body = state.bodies[0]
    assert body["model"] == "judge-a" and body["temperature"] == 0.0 and body["seed"] == 0
    assert body["messages"][0] == {"role": "system", "content": JUDGE_SYSTEM}
    # the judge only adds judge_* numbers; unparseable counts as not accepted
    metrics = judge_metrics(verdicts)
    assert metrics == {"judge_accuracy": 0.5}
    assert judge_counts(verdicts) == {
        "judge_n": 4,
        "judge_unparseable": 1,
        "judge_errors": 0,
        "judge_cached": 0,
    }
    assert judge.config()["prompt_hash"] == JUDGE_PROMPT_HASH and judge.config()["judge_model"] == "judge-a"

    records = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(records) == 4
    assert {r["sample_id"] for r in records} == {"1", "2", "3", "4"}
    assert all(r["judge_model"] == "judge-a" and r["prompt_hash"] == JUDGE_PROMPT_HASH for r in records)

    # a re-run (new process: new Judge, same cache file) asks nothing
    again = Judge(load_engine(f"openai:{url}#judge-a"), cache_path=cache).judge(ITEMS)
    assert len(state.bodies) == 4
    assert [v.verdict for v in again] == [1, 0, None, 1] and all(v.cached for v in again)
    assert judge_counts(again)["judge_cached"] == 4

    # a changed prediction is asked again; so is a corrected gold answer; the rest stays cached
    changed = [
        ITEMS[0],
        JudgeItem("2", "Where is the lesion?", "left lobe", "left lobe"),
        JudgeItem("3", "What is the finding?", "??? pneumothorax", "??? hard to say"),
        ITEMS[3],
    ]
    third = Judge(load_engine(f"openai:{url}#judge-a"), cache_path=cache).judge(changed)
    assert len(state.bodies) == 6
    assert [v.cached for v in third] == [True, False, False, True]
    assert third[1].verdict == 1

    # another judge model shares nothing with the first
    other = Judge(load_engine(f"openai:{url}#judge-b"), cache_path=cache).judge(ITEMS[:2])
    assert len(state.bodies) == 8 and not any(v.cached for v in other)


def test_duplicates_are_asked_once_and_a_torn_cache_line_is_ignored(
    peer: tuple[str, PeerState], tmp_path: Path
) -> None:
    url, state = peer
    cache = tmp_path / "c.jsonl"
    judge = Judge(load_engine(f"openai:{url}#judge-a"), cache_path=cache)
    judge.judge([ITEMS[0], ITEMS[0], ITEMS[1]])
    assert len(state.bodies) == 2
    with cache.open("a") as f:
        f.write('{"judge_model": "judge-a", "prompt_ha')  # killed mid-write
    reloaded = VerdictCache(cache)
    assert len(reloaded) == 2 and reloaded.skipped_lines == 1
    more = Judge(load_engine(f"openai:{url}#judge-a"), cache_path=cache).judge([ITEMS[0], ITEMS[2]])
    assert [v.cached for v in more] == [True, False] and len(state.bodies) == 3
    assert len(VerdictCache(cache)) == 3  # the torn line did not swallow the new record


def test_transport_errors_are_not_cached(tmp_path: Path) -> None:
    # nothing listens on this port: every request fails, and nothing is cached
    engine = load_engine("openai:http://127.0.0.1:9/v1#judge-a", max_retries=0, timeout=2)
    judge = Judge(engine, cache_path=tmp_path / "c.jsonl")
    verdicts = judge.judge(ITEMS[:2])
    assert [v.status for v in verdicts] == ["error", "error"]
    assert all(v.verdict is None and v.error for v in verdicts)
    assert judge_counts(verdicts)["judge_errors"] == 2
    assert judge_metrics(verdicts) == {"judge_accuracy": None}  # no verdict is never a rejection
    assert not (tmp_path / "c.jsonl").exists() or (tmp_path / "c.jsonl").read_text() == ""


class _DownHandler(BaseHTTPRequestHandler):
    """A judge server that is up but answers every request 503 (counted)."""

    server: Any

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.state.lock:
            self.server.state.bodies.append({})
        data = b'{"error": {"message": "overloaded"}}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_a_judge_that_is_down_is_asked_one_batch_only(
    loopback_http: Callable[[type[BaseHTTPRequestHandler], Any], str], tmp_path: Path
) -> None:
    state = PeerState()
    url = loopback_http(_DownHandler, state)
    items = [JudgeItem(str(i), "q", "liver", "liver") for i in range(10)]
    engine = load_engine(f"openai:{url}#j", max_retries=0, timeout=5)
    judge = Judge(engine, cache_path=tmp_path / "c.jsonl", batch_size=3)
    verdicts = judge.judge(items)
    assert len(state.bodies) == 3  # the first batch failed entirely: the other 7 are not sent
    assert [v.status for v in verdicts] == ["error"] * 10
    assert "not asked" in (verdicts[-1].error or "")
    assert len(judge_errors(verdicts)) == 2  # the server's error, then "not asked: ..." quoting it
    assert judge_metrics(verdicts) == {"judge_accuracy": None}


def test_partial_judge_failure_gives_no_accuracy(peer: tuple[str, PeerState], tmp_path: Path) -> None:
    url, _ = peer
    good = Judge(load_engine(f"openai:{url}#judge-a"), cache_path=tmp_path / "c.jsonl").judge(ITEMS[:2])
    failed = Verdict("9", None, "error", "", False, "timeout")
    assert judge_metrics(good) == {"judge_accuracy": 0.5}
    assert judge_metrics([*good, failed]) == {"judge_accuracy": None}
    assert judge_counts([*good, failed])["judge_errors"] == 1
