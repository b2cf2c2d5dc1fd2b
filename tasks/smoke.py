"""The foundation's minimal stage: proves the chat stack, the cache and tracking work end to end.

It asks the configured supporter model for one reply and one scored choice. Later stages follow
the same shape: a plain function that does the work, a cached `@task` that wraps it and builds
what it needs (models are loaded inside the task, so a cache hit loads nothing).
"""

from __future__ import annotations

from pathlib import Path

import orjson
from prefect import task

from esvr.flows.config import ModelConfig, SmokeConfig
from esvr.flows.runtime import chat_model
from esvr.models.chat import ChatModel
from esvr.tasks.caching import cache_policy


def smoke_check(model: ChatModel, settings: SmokeConfig) -> dict:
    """One greedy reply and one distribution over answers."""
    reply = model.chat([{"role": "user", "content": settings.prompt}], max_tokens=settings.max_tokens)[0]
    dist = model.score_choices([{"role": "user", "content": settings.question}], settings.choices)
    return {"model": model.cache_id, "prompt": settings.prompt, "reply": reply, "question": settings.question, "choices": dist}


def write_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return path


@task(cache_policy=cache_policy("esvr.models.chat", "esvr.models.hf_backend"), persist_result=True)
def smoke_task(model: ModelConfig, settings: SmokeConfig, out_dir: Path, use_cache: bool = True) -> str:
    chat = chat_model(model, out_dir, cache=use_cache)
    return str(write_json(smoke_check(chat, settings), out_dir / "smoke" / "smoke.json"))
