"""The foundation's minimal stage: proves the chat stack, the cache and tracking work end to end.

It asks the configured supporter model for one reply and one scored choice. Every stage has the
same shape: its config section and plain functions here, and a flow (``esvr.flows``) that wraps
them in a cached Prefect task; models are loaded inside the task, so a cache hit loads nothing.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from esvr.models.chat import ChatModel
from esvr.models.config import ModelConfig, Section
from esvr.tasks.common.roles import chat_model


class SmokeConfig(Section):
    """One reply and one scored choice from the configured model."""

    prompt: str = "In one sentence, what helps a friend who feels overwhelmed?"
    choices: list[str] = ["Yes", "No"]
    question: str = "Is listening without judgment a way to support someone? Answer Yes or No."
    max_tokens: int = 40


def smoke_check(model: ChatModel, settings: SmokeConfig) -> dict:
    """One greedy reply and one distribution over answers."""
    reply = model.chat([{"role": "user", "content": settings.prompt}], max_tokens=settings.max_tokens)[0]
    dist = model.score_choices([{"role": "user", "content": settings.question}], settings.choices)
    return {"model": model.cache_id, "prompt": settings.prompt, "reply": reply, "question": settings.question, "choices": dist}


def write_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return path


def smoke(model: ModelConfig, settings: SmokeConfig, out_dir: Path, use_cache: bool = True) -> str:
    """The stage: ``<out_dir>/smoke/smoke.json``; returns its path."""
    chat = chat_model(model, out_dir, cache=use_cache)
    return str(write_json(smoke_check(chat, settings), out_dir / "smoke" / "smoke.json"))
