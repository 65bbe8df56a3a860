"""A scripted OpenAI-compatible server that takes ``vllm serve``'s command line, for the launcher tests.

Not vLLM (which cannot run on this CPU machine, see docs/deployment.md) and not posing as it: a real
HTTP server (standard library) that the tests start as the "vllm" executable through
``launch_engine(..., command=[python, this file])``. It parses the options EMMA passes to ``vllm
serve``, requires ``VLLM_API_KEY`` as vLLM does, answers ``/health``, ``/v1/models`` and
``/v1/chat/completions`` (whole and ``stream: true`` SSE) with a deterministic answer (the words of the
last user text, reversed), and appends one JSON line per event to ``$SCRIPTED_RECORD``: its argv at
start, each request (image parts counted), and how each stream ended (``done`` or ``disconnected``
after N chunks). ``--chunk-delay-s`` slows streams; ``--start-delay-s`` delays listening;
``--exit-code N`` exits at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _record(event: dict[str, Any]) -> None:
    path = os.environ.get("SCRIPTED_RECORD")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")


def _answer(messages: list[dict[str, Any]]) -> tuple[str, int]:
    """The last user message's text words reversed, and how many image parts the request had."""
    images = 0
    text = ""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            images += sum(1 for part in content if part.get("type") == "image_url")
            parts = [part.get("text", "") for part in content if part.get("type") == "text"]
            content = " ".join(parts)
        if message.get("role") == "user":
            text = str(content)
    return " ".join(reversed(text.split())) or "empty", images


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 — the base class's name
        pass

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        key = os.environ.get("VLLM_API_KEY")
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._json(401, {"error": "Unauthorized"})
            return False
        return True

    def do_GET(self) -> None:
        options = self.server.options  # type: ignore[attr-defined]
        if self.path == "/health":
            self._json(200, {})
        elif self.path == "/v1/models":
            if self._authorised():
                self._json(
                    200, {"object": "list", "data": [{"id": options.served_model_name, "object": "model"}]}
                )
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._json(404, {"error": "not found"})
            return
        if not self._authorised():
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        options = self.server.options  # type: ignore[attr-defined]
        text, images = _answer(body.get("messages", []))
        _record(
            {
                "event": "request",
                "model": body.get("model"),
                "images": images,
                "stream": bool(body.get("stream")),
            }
        )
        if images > options.max_images:
            self._json(400, {"error": {"message": f"at most {options.max_images} images per prompt"}})
            return
        words = text.split()[: int(body.get("max_tokens") or 16)]
        if not body.get("stream"):
            usage = {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words)},
                "finish_reason": "stop",
            }
            self._json(
                200,
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": options.served_model_name,
                    "choices": [choice],
                    "usage": usage,
                },
            )
            return
        self._stream(words, options)

    def _stream(self, words: list[str], options: argparse.Namespace) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        sent = 0

        def event(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        try:
            for i, word in enumerate(words):
                delta = word if i == 0 else " " + word
                event(
                    {
                        "id": "c1",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": options.served_model_name,
                        "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}],
                    }
                )
                sent += 1
                time.sleep(options.chunk_delay_s)
            event(
                {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": options.served_model_name,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                }
            )
            usage = {"prompt_tokens": 7, "completion_tokens": sent, "total_tokens": 7 + sent}
            event(
                {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": options.served_model_name,
                    "choices": [],
                    "usage": usage,
                }
            )
            event("[DONE]")
        except (BrokenPipeError, ConnectionResetError):
            _record({"event": "stream", "end": "disconnected", "chunks": sent, "of": len(words)})
            return
        _record({"event": "stream", "end": "done", "chunks": sent, "of": len(words)})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("verb", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--limit-mm-per-prompt", default='{"image": 1}')
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--chat-template")
    parser.add_argument("--chunk-delay-s", type=float, default=0.0)
    parser.add_argument("--start-delay-s", type=float, default=0.0)
    parser.add_argument("--exit-code", type=int)
    options = parser.parse_args(argv)
    _record(
        {"event": "start", "argv": argv, "pid": os.getpid(), "has_key": bool(os.environ.get("VLLM_API_KEY"))}
    )
    if options.exit_code is not None:
        print(f"scripted server: exiting with {options.exit_code}", file=sys.stderr)
        return options.exit_code
    options.max_images = int(json.loads(options.limit_mm_per_prompt)["image"])
    time.sleep(options.start_delay_s)
    server = ThreadingHTTPServer((options.host, options.port), Handler)
    server.daemon_threads = True
    server.options = options  # type: ignore[attr-defined]
    server.serve_forever(poll_interval=0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
