"""`esvr bench simulate`: simulation throughput against an OpenAI-compatible server with fixed latency.

The bench starts a scripted server on 127.0.0.1 that answers every chat completion after a fixed
delay (a stand-in for a remote API whose latency, not its throughput, is the limit) with
well-formed replies for each role: seeker sentences that end with [END] after a set number of
turns, supporter replies in the 4-step template, alternative replies with the reversed decision,
target values and reference responses. It then simulates the same personas at concurrency 1 and
at concurrency 32 (no response cache, so every call reaches the server) and reports dialogues per
minute, the speedup, and LLM calls per supporter turn.

The scripted replies are also what the tests use (`ScriptedChat` is the same script as a
`ChatModel`, for tests that need no server at all), and `FakeOpenAIServer`, with its switches for
faults and lesser servers, is the tests' stand-in for every OpenAI-compatible server.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import KW_ONLY, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

from esvr.models.chat import ChatModel, ChatRequest, Message
from esvr.prompts import load_prompt
from esvr.tasks.simulation.supporter import strategy_names

# --------------------------------------------------------------------------------------------
# The script
# --------------------------------------------------------------------------------------------


@dataclass
class Script:
    """What the scripted model says. The seeker ends after `end_after` supporter turns."""

    end_after: int = 3
    #: every supporter reply at this (1-based) attempt or earlier ignores the template
    broken_supporter_attempts: int = 0
    #: situations per persona-writer request
    situations: int = 4
    calls: int = field(default=0, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _starts(self, text: str, prompt: str) -> bool:
        return text.strip().startswith(load_prompt(prompt).strip()[:40])

    def reply(self, messages: list[Message], n: int = 1) -> list[str]:
        with self.lock:
            self.calls += 1
        return [self._reply(messages, k) for k in range(n)]

    def _reply(self, messages: list[Message], k: int) -> str:
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        last = messages[-1]["content"] if messages else ""
        digest = int(hashlib.sha256(json.dumps(messages).encode()).hexdigest()[:8], 16)
        if self._starts(system, "seeker/system.txt"):
            turns = sum(1 for m in messages[2:] if m["role"] == "user")
            if turns >= self.end_after:
                return "Thank you so much, I feel a lot better now. [END]"
            return f"I still feel uneasy about it, especially after what happened in week {turns}."
        if self._starts(system, "supporter/system.txt"):
            if self._starts(last, "supporter/alternative.txt"):
                reverse = "No" if "must begin with 'No'" in last else "Yes"
                return (
                    "Step 3. Whether to use the reference response\n"
                    f"-Reasoning: {reverse}, the other approach fits better here.\n"
                    "Step 4. The therapist's next strategy and utterance\n"
                    "-Strategy: Self-disclosure\n"
                    "-Response: I once felt stuck in a similar way, and talking it through helped me a lot."
                )
            attempt = sum(1 for m in messages if m["role"] == "assistant") + 1
            if attempt <= self.broken_supporter_attempts:
                return "I think you should relax and take a deep breath."
            used = "Yes" if digest % 2 else "No"
            strategy = strategy_names()[digest % 7]  # never 'Others'
            return (
                "Step 1. The patient's issues and current state\n"
                "-Reasoning: The patient is worried and has not yet said what worries them most.\n"
                "Step 2. Key points of the reference response\n"
                "-Reasoning: The reference invites the patient to name what would help.\n"
                "Step 3. Whether to use the reference response\n"
                f"-Reasoning: {used}, because it fits the patient's state.\n"
                "Step 4. The therapist's next strategy and utterance\n"
                f"-Strategy: {strategy}\n"
                f"-Response: You have shown real strength in facing this, so what would help you most right now (#{digest % 997})?"
            )
        if self._starts(system, "tvd/system.txt"):
            return "Achievement, Benevolence: caring, Self-direction: action"
        if self._starts(system, "rg/system.txt"):
            return "It sounds like you have been carrying a lot; what would make tomorrow a little easier?"
        if self._starts(system, "personas/situations_system.txt"):
            topic = re.search(r"topic: (.+)", last)
            value = re.search(r"Human value: (.+)", last)
            t = topic.group(1).strip().lower() if topic else "life"
            v = value.group(1).strip().lower() if value else "my values"
            templates = [
                "I worry about {t} because {v} matters so much to me.",
                "My family keeps pushing me on {t}, and it clashes with {v}.",
                "Since last spring I have felt that {t} leaves no room for {v} in my life.",
                "Every time my friends mention {t}, I feel ashamed that I value {v}.",
                "At work nobody understands why {v} shapes how I handle {t}.",
                "I lie awake at night thinking {t} might cost me {v} forever.",
            ]
            return "\n".join(f"{i + 1}. " + templates[i % len(templates)].format(t=t, v=v) for i in range(self.situations))
        if self._starts(system, "personas/alignment_system.txt"):
            # numbered situations, not the prompt's own "1. Situations:" / "2. Human value:" items
            n = len(re.findall(r"^\d+\. (?!Situations:|Human value:)", last, re.MULTILINE))
            return "\n".join(f"situation: s{i}\n- Reasoning: fits.\n- Rating: {5 if i % 3 else 2}" for i in range(n))
        if self._starts(system, "personas/emotion_system.txt"):
            return ["Anxiety", "Fear", "Anxiety", "Sadness", "Anxiety"][k % 5]
        if self._starts(system, "personas/demographics_system.txt"):
            return "Age: 30s / Gender: Female / Occupation: Graphic Designer"
        return "Okay."


class ScriptedChat(ChatModel):
    """The script as a ChatModel, with an optional fixed latency per call (tests, no server)."""

    def __init__(self, script: Script | None = None, latency_s: float = 0.0, cache_id: str = "scripted"):
        super().__init__()
        self.script = script or Script()
        self.latency_s = latency_s
        self.cache_id = cache_id

    def _generate(self, requests: list[ChatRequest]) -> list[list[str]]:
        if self.latency_s:
            time.sleep(self.latency_s)
        self._count(calls=len(requests))
        return [self.script.reply(r.message_dicts(), r.n) for r in requests]

    def _score(self, messages: list[Message], choices: list[str]) -> dict[str, float]:
        self._count(calls=1)
        return {c: 1.0 if i == 0 else 0.5 for i, c in enumerate(choices)}

    async def achat(self, messages: Any, **kwargs: Any) -> list[str]:
        import asyncio

        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        self._count(calls=1)
        return self.script.reply([dict(m) for m in messages], kwargs.get("n", 1))


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is an expected case here, not an error worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass(eq=False, repr=False)
class FakeOpenAIServer:
    """An OpenAI-compatible /v1 on 127.0.0.1 answering from a `Script`.

    It speaks the part of the Chat Completions API the pipeline uses (``n``, ``stop``, ``logprobs``
    / ``top_logprobs``, ``stream``, ``usage``, ``GET /models``) over real HTTP, so the real
    ``openai`` client runs unchanged against it. One thread per connection, so concurrent calls
    wait their latency in parallel: the server is never the bottleneck at the concurrencies the
    bench uses. `texts` decides the replies; a subclass may answer from something else.

    Switches make it behave like lesser servers: ``ignore_n`` (one choice whatever ``n`` asks, as
    ``transformers serve``, Ollama, llama.cpp do), ``logprobs=False`` (no log-probabilities),
    ``empty_choices`` (HTTP 200 with ``choices: []``), ``drop_message`` (choices without a
    ``message``). `faults` queues failures, one per request: an HTTP status (sent with a
    Retry-After of `retry_after_s`, as a busy server does) or ``("slow", seconds)``.
    """

    listed_models: ClassVar[tuple[str, ...]] = ("fake",)

    script: Script = field(default_factory=Script)
    latency_s: float = 0.0
    _: KW_ONLY
    port: int = 0
    ignore_n: bool = False
    logprobs: bool = True
    empty_choices: bool = False
    drop_message: bool = False
    retry_after_s: float = 0.01
    faults: deque[int | tuple[str, float]] = field(default_factory=deque)
    #: every request body, in the order they came
    requests: list[dict[str, Any]] = field(default_factory=list)
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        self._in_flight = 0
        self._lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", self.port), self._handler())
        # a short poll makes close() quick: shutdown waits for the serving loop to look up
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def calls(self) -> int:
        return len(self.requests)

    def start(self) -> FakeOpenAIServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- what it answers ----------------------------------------------------------------------
    def texts(self, request: dict[str, Any], n: int) -> list[str]:
        """The `n` reply texts for a request."""
        return self.script.reply(request.get("messages", []), n)

    def token_logprobs(self, text: str, top: int) -> list[dict[str, Any]]:
        """The reply's words as tokens, each certain (log-probability 0), as ``logprobs.content`` shows them."""
        tokens = [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))]
        return [
            {"token": t, "logprob": 0.0, "bytes": None, "top_logprobs": [{"token": t, "logprob": 0.0, "bytes": None}]}
            for t in tokens
        ]

    def completion(self, request: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        """The reply texts (after the stop sequences) and the completion body for a request."""
        texts = self.texts(request, 1 if self.ignore_n else int(request.get("n") or 1))
        stops = request.get("stop") or []
        for s in [stops] if isinstance(stops, str) else stops:
            texts = [t[: t.index(s)] if s in t else t for t in texts]
        choices: list[dict[str, Any]] = []
        for i, text in enumerate(texts):
            choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            if request.get("logprobs") and self.logprobs:
                choice["logprobs"] = {"content": self.token_logprobs(text, int(request.get("top_logprobs") or 0))}
            if self.drop_message:
                del choice["message"]
            choices.append(choice)
        prompt_tokens = sum(len(m.get("content", "").split()) for m in request.get("messages", []))
        completion_tokens = sum(len(t.split()) for t in texts)
        body = {
            "id": f"chatcmpl-{time.time_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "fake"),
            "choices": [] if self.empty_choices else choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return texts, body

    # -- HTTP ---------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in two writes: without this, Nagle + delayed ACK add 40 ms
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
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

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.rstrip("/").endswith("/models"):
                    self._send_json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.listed_models]})
                else:
                    self._send_json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.requests.append(request)
                    fault = server.faults.popleft() if server.faults else None
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                try:
                    if not self.path.rstrip("/").endswith("/chat/completions"):
                        return self._send_json(404, {"error": {"message": f"no route {self.path}"}})
                    if isinstance(fault, int):
                        retry_after = {"Retry-After-Ms": str(int(server.retry_after_s * 1000))}
                        return self._send_json(fault, {"error": {"message": f"injected {fault}", "type": "fake"}}, retry_after)
                    if isinstance(fault, tuple) and fault[0] == "slow":
                        time.sleep(fault[1])
                    if server.latency_s:
                        time.sleep(server.latency_s)
                    texts, body = server.completion(request)
                    if request.get("stream"):
                        return self._stream(texts[0] if texts else "")
                    self._send_json(200, body)
                finally:
                    with server._lock:
                        server._in_flight -= 1

            def _stream(self, text: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for piece in [w + " " for w in text.split(" ")] if text else []:
                    event = {
                        "id": "chatcmpl-stream",
                        "object": "chat.completion.chunk",
                        "created": int(time.time()),
                        "model": "fake",
                        "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                    }
                    self._chunk(f"data: {json.dumps(event)}\n\n".encode())
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        return Handler


# --------------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------------


def bench_personas(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"bench-{i:04d}",
            "split": "test",
            "problem": "Career and Work-Related Challenges",
            "subcategory": "Job loss or career setbacks",
            "value": "Achievement",
            "situation": f"I lost my job last month and I keep doubting myself ({i}).",
            "emotion": "Anxiety",
            "age": "30s",
            "gender": "Female",
            "occupation": "Designer",
        }
        for i in range(n)
    ]


def _openai(base_url: str, name: str, concurrency: int) -> ChatModel:
    import os

    from esvr.models.config import ModelConfig
    from esvr.tasks.common.roles import own_model

    # the key is never checked by the fake server; the client insists on one being set
    os.environ.setdefault("ESVR_BENCH_KEY", "unused")
    return own_model(
        ModelConfig(
            spec=f"openai:{name}", base_url=base_url, api_key_env="ESVR_BENCH_KEY", concurrency=concurrency, max_retries=2
        )
    )


def bench_simulate(
    *,
    latency_s: float = 1.0,
    dialogues_c1: int = 4,
    dialogues_cN: int = 32,
    concurrency: int = 32,
    end_after: int = 3,
    with_components: bool = True,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Dialogues/min at concurrency 1 and `concurrency`, speedup, calls per supporter turn."""
    from esvr.tasks.simulation.simulate import EndRules, SimulateConfig, build_agents, simulate_dialogues

    cfg = SimulateConfig(max_turns=20, emotion=False)
    results: dict[str, Any] = {"latency_s": latency_s, "end_after": end_after, "concurrency": concurrency}
    tmp = tempfile.TemporaryDirectory() if out_dir is None else None
    root = Path(tmp.name if tmp else out_dir)  # type: ignore[arg-type]  # out_dir is given when tmp is not
    try:
        with FakeOpenAIServer(Script(end_after=end_after), latency_s=latency_s) as server:
            # one set of clients for both runs, warmed up first: client start-up is not throughput
            models = {
                role: _openai(server.base_url, f"fake-{role}", 2 * concurrency) for role in ("supporter", "seeker", "tvd", "rg")
            }
            agents = build_agents(
                cfg,
                models["supporter"],
                models["seeker"],
                tvd_model=models["tvd"] if with_components else None,
                rg_model=models["rg"] if with_components else None,
            )
            agents.rules = EndRules(max_turns=20)
            warm = [dict(p, id=f"warmup-{p['id']}") for p in bench_personas(2)]
            simulate_dialogues(warm, root / "bench_warmup.jsonl", agents, concurrency=2)
            for conc, n in ((1, dialogues_c1), (concurrency, dialogues_cN)):
                path = root / f"bench_c{conc}.jsonl"
                path.unlink(missing_ok=True)
                summary = simulate_dialogues(bench_personas(n), path, agents, concurrency=conc)
                if summary.errors:
                    raise RuntimeError(
                        f"bench at concurrency {conc}: {len(summary.errors)} dialogues failed: {summary.errors[:3]}"
                    )
                results[f"c{conc}"] = {
                    "dialogues": summary.written,
                    "elapsed_s": round(summary.elapsed_s, 2),
                    "dialogues_per_min": round(summary.dialogues_per_min, 2),
                    "supporter_turns": summary.supporter_turns,
                    "calls": summary.calls,
                    "calls_per_supporter_turn": round(summary.calls_per_supporter_turn, 2),
                }
            for m in models.values():
                m.close()
    finally:
        if tmp:
            tmp.cleanup()
    c1, cn = results["c1"], results[f"c{concurrency}"]
    results["speedup"] = round(cn["dialogues_per_min"] / c1["dialogues_per_min"], 2) if c1["dialogues_per_min"] else 0.0
    results["target"] = round(0.8 * concurrency, 1)
    results["calls_per_supporter_turn"] = cn["calls_per_supporter_turn"]
    return results


def format_bench(results: dict[str, Any]) -> str:
    conc = results["concurrency"]
    lines = [
        f"fake OpenAI server on 127.0.0.1, {results['latency_s']} s per call; seeker ends after {results['end_after']} supporter turns",
    ]
    for key in ("c1", f"c{conc}"):
        r = results[key]
        lines.append(
            f"concurrency {key[1:]:>3}: {r['dialogues']} dialogues in {r['elapsed_s']} s = {r['dialogues_per_min']} dialogues/min; "
            f"calls {r['calls']}"
        )
    lines.append(f"target speedup >= {results['target']}: {'met' if results['speedup'] >= results['target'] else 'NOT met'}")
    lines.append(
        f"simulate: speedup {results['speedup']} at concurrency {conc}, {results['calls_per_supporter_turn']} calls per supporter turn"
    )
    return "\n".join(lines)
