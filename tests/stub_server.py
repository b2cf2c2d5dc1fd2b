"""The test double for the chat backends: the bench's OpenAI-compatible server on 127.0.0.1
(`esvr.tasks.bench.simulate.FakeOpenAIServer`) answering from a function of the request.

Faults, latency and the switches that mimic lesser servers (``ignore_n``, ``logprobs=False``,
``empty_choices``, ``drop_message``) are the server's own. A reply can script a distribution over
its first token for ``logprobs``: ``'<dist>{"Yes": 0.7, "No": 0.3}'``.

    with StubServer(reply=lambda req: "hello") as server:
        model = OpenAIChat("stub", base_url=server.base_url)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from esvr.tasks.bench.simulate import FakeOpenAIServer

Reply = Callable[[dict[str, Any]], str]


def echo_last_user(request: dict[str, Any]) -> str:
    users = [m["content"] for m in request.get("messages", []) if m.get("role") == "user"]
    return f"echo: {users[-1] if users else ''}"


@dataclass(eq=False, repr=False)
class StubServer(FakeOpenAIServer):
    listed_models = ("stub",)

    reply: Reply = field(default=echo_last_user, kw_only=True)

    def texts(self, request: dict[str, Any], n: int) -> list[str]:
        return [self.reply(request) for _ in range(n)]

    def token_logprobs(self, text: str, top: int) -> list[dict[str, Any]]:
        if not text.startswith("<dist>"):
            return super().token_logprobs(text, top)
        dist = json.loads(text[len("<dist>") :])
        best = max(dist, key=dist.get)
        alts = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in dist.items() if p > 0]
        return [{"token": best, "logprob": math.log(dist[best]), "bytes": None, "top_logprobs": alts[: max(top, 1)]}]
