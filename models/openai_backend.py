"""OpenAI-compatible backend: ``openai:<model>``, OpenAI itself or any compatible server.

Async underneath, with a concurrency limit. The ``openai`` client does the retrying: up to
`max_retries` times with exponential backoff (honouring Retry-After) on 408, 409, 429, 5xx,
timeouts and dropped connections; other errors (400, 401, 404) fail at once because retrying cannot
fix them. Either way the caller gets one `ChatError` naming the model, the server, the attempts and
the cause. The sync API runs the async one on a private event-loop thread (the client's connection
pool and the semaphore belong to one loop), so it works the same from plain code, Prefect tasks and
running event loops.

Servers that lack a feature (older vLLM, Ollama, llama.cpp, ``transformers serve``) often ignore
``n``, ``logprobs`` and ``top_logprobs`` silently and answer 200. The backend notices it from the
reply, warns once per server and model, and from then on goes straight to a fallback: `n` samples
become `n` one-completion requests with distinct seeds, and `score_choices` parses the choice out of
a short greedy reply. Every request the backend makes is bounded: a reply with fewer choices than
asked costs at most `n` more requests, and a reply with no choice at all is a `ChatError`, never
asked again.

The API key is read from the environment variable the spec names; it is never stored or logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import openai

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

from esvr.models.chat import ChatError, ChatModel, ChatRequest, Message
from esvr.models.config import ModelConfig
from esvr.models.redact import redact_url, redact_urls

T = TypeVar("T")
#: reply length when scoring: the answer comes first; a chatty model that names it later still fits
_SCORE_MAX_TOKENS = 16
#: the header in which the openai client numbers its attempts (0 for the first)
_RETRY_COUNT_HEADER = "x-stainless-retry-count"

log = logging.getLogger(__name__)
# One warning per server and model in the process, however many objects talk to it.
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def choice_named(reply: str, choices: Sequence[str]) -> str | None:
    """The allowed choice the reply names first (case-insensitive, whole words), or None.

    "I'd say Dialogue B." names "Dialogue B"; "4/5" names "4". At one position the longer choice
    wins, so "Dialogue B" beats a choice "Dialogue".
    """
    found = []
    for c in choices:
        m = re.search(rf"(?<!\w){re.escape(c.strip())}(?!\w)", reply, flags=re.IGNORECASE) if c.strip() else None
        if m:
            found.append((m.start(), -len(c.strip()), c))
    return min(found)[2] if found else None


@dataclass(eq=False, repr=False)
class OpenAIChat(ChatModel):
    model: str
    _: KW_ONLY
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5

    def __post_init__(self) -> None:
        super().__init__()
        self.cache_id = f"openai:{self.model}@{self.server}"  # logged and stored: never the URL's credentials
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name=f"openai-{self.model}", daemon=True).start()
        self._client: openai.AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None
        #: features this server showed it lacks ("n", "logprobs"); read and set on the private loop
        self.lacks: set[str] = set()

    @classmethod
    def from_spec(cls, spec: ModelConfig) -> OpenAIChat:
        return cls(
            spec.spec.partition(":")[2],
            base_url=spec.base_url,
            api_key_env=spec.api_key_env,
            concurrency=spec.concurrency,
            timeout_s=spec.timeout_s,
            max_retries=spec.max_retries,
        )

    # -- plumbing ---------------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the private loop and wait for it (from any thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await a coroutine that must run on the private loop (client and semaphore live there)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _ensure_client(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        if self._client is None:
            key = os.environ.get(self.api_key_env)
            if not key and self.base_url is None:
                raise ChatError(
                    f"{self.cache_id}: no API key: set the environment variable {self.api_key_env} "
                    "or point base_url at an OpenAI-compatible server"
                )
            self._client = openai.AsyncOpenAI(
                api_key=key or "not-needed", base_url=self.base_url, max_retries=self.max_retries, timeout=self.timeout_s
            )
            self._semaphore = asyncio.Semaphore(self.concurrency)
        assert self._semaphore is not None
        return self._client, self._semaphore

    def _failed(self, what: str, exc: openai.APIError) -> ChatError:
        """The one error a failed call ends in, counted; the client's last request numbers its attempts."""
        retries = int(exc.request.headers.get(_RETRY_COUNT_HEADER, 0))
        self._count(retries=retries, failures=1)
        cause = (
            f"HTTP {exc.status_code}: {exc.message}" if isinstance(exc, openai.APIStatusError) else f"{type(exc).__name__}: {exc}"
        )
        attempts = f"{retries + 1} attempt{'s' if retries else ''}"
        return ChatError(
            f"{self.cache_id}: {what} to {self.server} for model {self.model} failed after {attempts}: {redact_urls(cause)}"
        )

    async def _call(self, what: str, **kwargs: Any) -> Any:
        """One API call, retried by the client; raises ChatError naming model, server and cause."""
        client, semaphore = self._ensure_client()
        try:
            async with semaphore:
                raw = await client.chat.completions.with_raw_response.create(model=self.model, **kwargs)
        except openai.APIError as exc:
            raise self._failed(what, exc) from exc
        response = raw.parse()
        usage = getattr(response, "usage", None)
        self._count(
            calls=1,
            retries=raw.retries_taken,
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        )
        return response

    # -- replies and missing features ------------------------------------------------------------
    @property
    def server(self) -> str:
        return redact_url(self.base_url) if self.base_url else "api.openai.com"

    def _choices(self, response: Any, what: str) -> list[str]:
        """The texts of a reply's choices; a reply without any is a ChatError, never retried."""
        choices = getattr(response, "choices", None)
        texts: list[str] = []
        for c in choices if isinstance(choices, list) else []:
            message = getattr(c, "message", None)
            if message is None:
                texts = []
                break
            texts.append((getattr(message, "content", None) or "").strip())
        if not texts:
            self._count(failures=1)
            shown = "no choices" if not choices else "a choice without a message"
            raise ChatError(f"{self.cache_id}: {what}: malformed reply from {self.server} for model {self.model} ({shown})")
        return texts

    def _lacking(self, feature: str, fallback: str) -> None:
        """Remember that the server lacks a feature, and say so once per server and model."""
        self.lacks.add(feature)
        with _warned_lock:
            if (self.cache_id, feature) in _warned:
                return
            _warned.add((self.cache_id, feature))
        log.warning("server %s (model %s) does not support %s: %s", self.server, self.model, feature, fallback)

    # -- chat -------------------------------------------------------------------------------------
    def _chat_kwargs(self, req: ChatRequest, n: int, seed: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            messages=req.message_dicts(), n=n, temperature=req.temperature, max_tokens=req.max_tokens, seed=seed
        )
        if req.stop:
            kwargs["stop"] = list(req.stop)
        return kwargs

    async def _one_at_a_time(self, req: ChatRequest, first: int) -> list[str]:
        """Samples `first`..`n-1` of a request, one request each; sample k uses seed + k."""

        async def one(k: int) -> str:
            response = await self._call("chat completion", **self._chat_kwargs(req, 1, req.seed + k))
            return self._choices(response, "chat completion")[0]

        return list(await asyncio.gather(*[one(k) for k in range(first, req.n)]))

    async def _achat_request(self, req: ChatRequest) -> list[str]:
        if req.n > 1 and "n" in self.lacks:
            return await self._one_at_a_time(req, 0)
        response = await self._call("chat completion", **self._chat_kwargs(req, req.n, req.seed))
        texts = self._choices(response, "chat completion")
        if len(texts) < req.n:
            self._lacking("n", f"it sent {len(texts)} of n={req.n} completions; sampling one completion per request from now on")
            texts += await self._one_at_a_time(req, len(texts))
        return texts[: req.n]

    def _generate(self, requests: list[ChatRequest]) -> list[list[str]]:
        async def all_of() -> list[list[str]]:
            return list(await asyncio.gather(*[self._achat_request(r) for r in requests]))

        return self._run(all_of())

    async def achat(self, messages: Sequence[Message], **kwargs: Any) -> list[str]:
        return await self._on_loop(self._achat_request(ChatRequest.build(messages, **kwargs)))

    # -- scoring ----------------------------------------------------------------------------------
    async def _ascore(self, messages: list[Message], choices: list[str]) -> dict[str, float]:
        """Distribution over answers from the top log-probabilities of the reply's tokens.

        Walks the greedy reply token by token; at the first position where the answers that are
        still consistent with the text so far diverge, the top alternatives' probabilities are
        summed per answer. Without log-probabilities (the server lacks them, or they do not tell
        the answers apart) the greedy reply decides: all mass on the choice it names first.
        """
        if "logprobs" in self.lacks:
            response = await self._call("scoring", messages=messages, max_tokens=_SCORE_MAX_TOKENS, temperature=0.0)
            return self._by_reply(self._choices(response, "scoring")[0], choices)
        response = await self._call(
            "scoring", messages=messages, max_tokens=_SCORE_MAX_TOKENS, temperature=0.0, logprobs=True, top_logprobs=20
        )
        reply = self._choices(response, "scoring")[0]
        content = getattr(getattr(response.choices[0], "logprobs", None), "content", None)
        if not content and reply:
            self._lacking("logprobs", "scoring choices by parsing a greedy reply from now on")
        if content:
            prefix = ""
            for position in content:
                alive = [c for c in choices if c.startswith(prefix.lstrip())]
                if not alive:
                    break
                consistent = []
                for alt in position.top_logprobs:
                    candidate = (prefix + alt.token).lstrip()
                    subset = [c for c in alive if candidate and (c.startswith(candidate) or candidate.startswith(c))]
                    consistent.append((math.exp(alt.logprob), subset))
                # Decide at the first position whose alternatives tell the answers apart.
                subsets = {tuple(subset) for _, subset in consistent if subset}
                if len(subsets) > 1 or any(len(subset) == 1 for subset in subsets):
                    mass = {c: 0.0 for c in choices}
                    for p, subset in consistent:
                        for c in subset:
                            mass[c] += p / len(subset)
                    if sum(mass.values()) > 0:
                        return mass
                    break
                prefix += position.token
        return self._by_reply(reply, choices)

    def _by_reply(self, reply: str, choices: list[str]) -> dict[str, float]:
        named = choice_named(reply, choices)
        if named is None:  # a reply that names no choice says nothing: uniform, and counted
            self._count(unmatched_scores=1)
            return {c: 1.0 / len(choices) for c in choices}
        return {c: float(c == named) for c in choices}

    def _score(self, messages: list[Message], choices: list[str]) -> dict[str, float]:
        return self._run(self._ascore(messages, choices))

    async def ascore_choices(self, messages: Sequence[Message], choices: Sequence[str]) -> dict[str, float]:
        dist = await self._on_loop(self._ascore([dict(m) for m in messages], list(choices)))
        total = sum(dist.values())
        return {c: (dist[c] / total if total > 0 else 1.0 / len(choices)) for c in choices}

    # -- streaming --------------------------------------------------------------------------------
    def stream(self, messages: Sequence[Message], **kwargs: Any) -> Iterator[str]:
        pieces = self._astream(ChatRequest.build(messages, **kwargs))
        try:
            while (piece := self._run(_next(pieces))) is not None:
                yield piece
        finally:  # a reader that stops early still frees the connection and the concurrency slot
            self._run(pieces.aclose())

    async def _astream(self, req: ChatRequest) -> AsyncGenerator[str, None]:
        client, semaphore = self._ensure_client()
        try:
            async with semaphore:
                stream = await client.chat.completions.create(
                    model=self.model,
                    messages=cast("list[ChatCompletionMessageParam]", req.message_dicts()),
                    temperature=req.temperature,
                    max_tokens=req.max_tokens,
                    stream=True,
                )
                async with stream:
                    async for event in stream:
                        delta = event.choices[0].delta.content if event.choices else None
                        if delta:
                            yield delta
        except openai.APIError as exc:
            raise self._failed("streaming", exc) from exc
        self._count(calls=1)

    def close(self) -> None:
        if self._client is not None:
            try:
                self._run(self._client.close())
            except Exception:  # noqa: BLE001 - closing is best effort; the loop stops regardless
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)


async def _next(pieces: AsyncIterator[str]) -> str | None:
    """The next piece of a stream, None at its end (a coroutine, as the loop thread takes)."""
    return await anext(pieces, None)
