"""A scripted OpenAI-compatible HTTP server on 127.0.0.1: a test double for the chat backends.

It speaks the part of the Chat Completions API the pipeline uses (``n``, ``stop``, ``logprobs`` /
``top_logprobs``, ``stream``, ``usage``) over real HTTP, so the real ``openai`` client and our
retry logic run unchanged against it. Replies come from a function of the request; faults
(HTTP 429/500, slow replies) can be queued to test retries and timeouts; a fixed latency per call
makes concurrency measurable. Switches make it behave like servers that lack features:
``ignore_n`` (one choice whatever ``n`` asks, as ``transformers serve``, Ollama, llama.cpp do),
``logprobs=False`` (the reply carries no log-probabilities), ``empty_choices`` (HTTP 200 with
``choices: []``) and ``drop_message`` (choices without a ``message``).

    with StubServer(reply=lambda req: "hello") as server:
        model = OpenAIChat("stub", base_url=server.base_url)
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = Callable[[dict[str, Any]], str]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is a scripted case here, not an error worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def echo_last_user(request: dict[str, Any]) -> str:
    users = [m["content"] for m in request.get("messages", []) if m.get("role") == "user"]
    return f"echo: {users[-1] if users else ''}"


class StubServer:
    def __init__(
        self,
        reply: Reply = echo_last_user,
        *,
        latency_s: float = 0.0,
        port: int = 0,
        ignore_n: bool = False,
        logprobs: bool = True,
        empty_choices: bool = False,
        drop_message: bool = False,
    ):
        self.reply = reply
        self.latency_s = latency_s
        self.ignore_n = ignore_n
        self.logprobs = logprobs
        self.empty_choices = empty_choices
        self.drop_message = drop_message
        #: queued faults, consumed one per request: an int status code, or ("slow", seconds)
        self.faults: deque[int | tuple[str, float]] = deque()
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._in_flight = 0
        self.max_in_flight = 0
        self._httpd = _QuietServer(("127.0.0.1", port), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> StubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> StubServer:
        return self.__enter__()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def calls(self) -> int:
        return len(self.requests)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send_json(200, {"object": "list", "data": [{"id": "stub", "object": "model"}]})
                else:
                    self._send_json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append(request)
                    fault = server.faults.popleft() if server.faults else None
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                try:
                    if not self.path.rstrip("/").endswith("/chat/completions"):
                        return self._send_json(404, {"error": {"message": f"no route {self.path}"}})
                    if isinstance(fault, int):
                        return self._send_json(fault, {"error": {"message": f"injected {fault}", "type": "stub"}})
                    if isinstance(fault, tuple) and fault[0] == "slow":
                        time.sleep(fault[1])
                    if server.latency_s:
                        time.sleep(server.latency_s)
                    self._complete(request)
                finally:
                    with server._lock:
                        server._in_flight -= 1

            def _complete(self, request: dict[str, Any]) -> None:
                n = 1 if server.ignore_n else int(request.get("n") or 1)
                texts = [server.reply(request) for _ in range(n)]
                stops = request.get("stop") or []
                for i, t in enumerate(texts):
                    for s in [stops] if isinstance(stops, str) else stops:
                        if s in t:
                            t = t[: t.index(s)]
                    texts[i] = t
                if request.get("stream"):
                    return self._stream(texts[0])
                choices = []
                for i, text in enumerate(texts):
                    choice: dict[str, Any] = {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                    if request.get("logprobs") and server.logprobs:
                        choice["logprobs"] = {"content": _logprobs(text, int(request.get("top_logprobs") or 0))}
                    if server.drop_message:
                        del choice["message"]
                    choices.append(choice)
                if server.empty_choices:
                    choices = []
                prompt_tokens = sum(len(m.get("content", "").split()) for m in request.get("messages", []))
                completion_tokens = sum(len(t.split()) for t in texts)
                self._send_json(
                    200,
                    {
                        "id": f"stub-{time.time_ns()}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": request.get("model", "stub"),
                        "choices": choices,
                        "usage": {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens,
                        },
                    },
                )

            def _stream(self, text: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                pieces = [w + " " for w in text.split(" ")] if text else []
                for piece in pieces:
                    event = {
                        "id": "stub",
                        "object": "chat.completion.chunk",
                        "created": int(time.time()),
                        "model": "stub",
                        "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                    }
                    self._chunk(f"data: {json.dumps(event)}\n\n".encode())
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        return Handler


def _logprobs(text: str, top: int) -> list[dict[str, Any]]:
    """Word-level tokens of the reply, each certain (logprob 0), as the logprobs field shows them.

    A reply function can return ``"<dist>" + json`` to script a distribution over the first
    token instead: ``<dist>{"Yes": 0.7, "No": 0.3}``.
    """
    if text.startswith("<dist>"):
        dist = json.loads(text[len("<dist>") :])
        best = max(dist, key=dist.get)
        alts = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in dist.items() if p > 0]
        return [{"token": best, "logprob": math.log(dist[best]), "bytes": None, "top_logprobs": alts[: max(top, 1)]}]
    tokens = [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))]
    return [
        {"token": t, "logprob": 0.0, "bytes": None, "top_logprobs": [{"token": t, "logprob": 0.0, "bytes": None}]} for t in tokens
    ]
