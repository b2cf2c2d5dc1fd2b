"""The openai: backend against a real OpenAI-compatible HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from esvr.models.backends import load_chat_model
from esvr.models.chat import CachedChatModel, ChatError, ResponseCache
from esvr.models.openai_backend import OpenAIChat

USER = [{"role": "user", "content": "hello there"}]


def make(server, **kwargs) -> OpenAIChat:
    return OpenAIChat("stub", base_url=server.base_url, **kwargs)


def test_chat_n_and_usage(stub_server):
    model = make(stub_server)
    replies = model.chat(USER, n=3, temperature=0.7)
    assert replies == ["echo: hello there"] * 3
    assert model.usage.calls == 1
    assert model.usage.prompt_tokens == 2 and model.usage.completion_tokens == 9
    assert stub_server.requests[0]["n"] == 3 and stub_server.requests[0]["model"] == "stub"


def test_stop_sequences_are_sent(stub_server):
    stub_server.reply = lambda req: "first part STOP second"
    assert make(stub_server).chat(USER, stop=["STOP"]) == ["first part"]
    assert stub_server.requests[0]["stop"] == ["STOP"]


def test_retries_429_and_500_then_succeeds(stub_server):
    stub_server.faults.extend([429, 500, 503])
    model = make(stub_server, max_retries=5)
    assert model.chat(USER) == ["echo: hello there"]
    assert model.usage.retries == 3 and model.usage.calls == 1
    assert stub_server.calls == 4


def test_gives_up_after_bounded_retries_with_a_clear_error(stub_server):
    stub_server.faults.extend([500] * 10)
    model = make(stub_server, max_retries=2)
    with pytest.raises(ChatError) as err:
        model.chat(USER)
    assert "after 3 attempts" in str(err.value) and "openai:stub" in str(err.value)
    assert stub_server.calls == 3
    assert model.usage.failures == 1


def test_client_errors_fail_at_once(stub_server):
    stub_server.faults.append(401)
    model = make(stub_server, max_retries=5)
    with pytest.raises(ChatError, match="HTTP 401"):
        model.chat(USER)
    assert stub_server.calls == 1


def test_slow_reply_times_out_and_is_retried(stub_server):
    stub_server.faults.append(("slow", 2.0))
    model = make(stub_server, timeout_s=0.5, max_retries=2)
    start = time.monotonic()
    assert model.chat(USER) == ["echo: hello there"]
    assert model.usage.retries == 1
    assert time.monotonic() - start < 2.0 + 1.5


def test_dead_server_gives_a_clear_error():
    model = OpenAIChat("stub", base_url="http://127.0.0.1:9/v1", max_retries=1, timeout_s=2)
    with pytest.raises(ChatError, match="failed after 2 attempts.*Connection") as err:
        model.chat(USER)
    assert "http://127.0.0.1:9/v1 for model stub" in str(err.value)
    assert model.usage.retries == 1 and model.usage.failures == 1


def test_missing_api_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("ESVR_TEST_NO_KEY", raising=False)
    model = OpenAIChat("gpt-4o-mini", api_key_env="ESVR_TEST_NO_KEY")
    with pytest.raises(ChatError, match="ESVR_TEST_NO_KEY"):
        model.chat(USER)


def test_cache_answers_a_repeated_request_without_a_call(stub_server, tmp_path: Path):
    cache = ResponseCache(tmp_path / "responses.sqlite")
    model = CachedChatModel(make(stub_server), cache)
    first = model.chat(USER, temperature=0.7, seed=3)
    again = model.chat(USER, temperature=0.7, seed=3)
    assert first == again and stub_server.calls == 1
    model.chat(USER, temperature=0.7, seed=4)  # another seed is another request
    assert stub_server.calls == 2
    # the cache persists: a new process (new objects) gets the answer for free
    fresh = CachedChatModel(make(stub_server), ResponseCache(tmp_path / "responses.sqlite"))
    assert fresh.chat(USER, temperature=0.7, seed=3) == first
    assert stub_server.calls == 2 and fresh.usage.cached_calls == 1


def test_concurrency_limit_is_respected(stub_server):
    stub_server.latency_s = 0.2
    model = make(stub_server, concurrency=3)

    async def many():
        return await asyncio.gather(*[model.achat(USER, seed=i) for i in range(9)])

    start = time.monotonic()
    results = asyncio.run(many())
    elapsed = time.monotonic() - start
    assert len(results) == 9
    assert stub_server.max_in_flight == 3
    assert elapsed >= 3 * 0.2 * 0.9  # three waves


def test_score_choices_from_top_logprobs(stub_server):
    stub_server.reply = lambda req: '<dist>{"Yes": 0.7, "No": 0.2, "Maybe": 0.1}'
    dist = make(stub_server).score_choices(USER, ["Yes", "No"])
    assert dist["Yes"] == pytest.approx(0.7 / 0.9, rel=1e-6)
    assert sum(dist.values()) == pytest.approx(1.0)


def test_score_choices_on_a_shared_prefix(stub_server):
    # "Dialogue A" / "Dialogue B": the first token is shared, the second one decides
    stub_server.reply = lambda req: "Dialogue B"
    dist = make(stub_server).score_choices(USER, ["Dialogue A", "Dialogue B", "Tie"])
    assert dist["Dialogue B"] == pytest.approx(1.0)


def test_stream_yields_pieces(stub_server):
    stub_server.reply = lambda req: "one two three"
    pieces = list(make(stub_server).stream(USER))
    assert len(pieces) == 3 and "".join(pieces).strip() == "one two three"


def test_stream_failure_is_a_bounded_chat_error(stub_server):
    stub_server.faults.extend([503] * 10)
    with pytest.raises(ChatError, match="streaming .* failed after 2 attempts: HTTP 503"):
        list(make(stub_server, max_retries=1).stream(USER))
    assert stub_server.calls == 2


def test_a_stream_left_early_frees_its_concurrency_slot(stub_server):
    stub_server.reply = lambda req: "one two three"
    model = make(stub_server, concurrency=1)
    pieces = model.stream(USER)
    assert next(pieces).strip() == "one"
    pieces.close()
    # with the only slot still held this would wait forever
    assert asyncio.run(asyncio.wait_for(model.achat(USER), 5)) == ["one two three"]


def test_load_chat_model_from_spec(stub_server):
    from esvr.models.config import ModelConfig

    model = load_chat_model(ModelConfig(spec="openai:stub", base_url=stub_server.base_url))
    assert model.chat(USER) == ["echo: hello there"]
