"""The openai: backend against servers that lack features, and the local `transformers serve` launcher.

The fast tests run over real HTTP against the stub server switched to behave like such servers;
the slow one starts the real `transformers serve` on the bundled model.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import pytest
from stub_server import StubServer

from esvr.models.chat import ChatError
from esvr.models.local_server import LocalServerError, list_models, serve_transformers
from esvr.models.openai_backend import OpenAIChat, choice_named

USER = [{"role": "user", "content": "hello there"}]
LOGGER = "esvr.models.openai_backend"


def make(server: StubServer, name: str | None = None, **kwargs) -> OpenAIChat:
    """A backend on the stub; a fresh model name unless given, since warnings are once per process."""
    return OpenAIChat(name or f"stub-{uuid.uuid4().hex[:8]}", base_url=server.base_url, **kwargs)


def warnings_about(caplog, feature: str) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    return [m for m in messages if f"does not support {feature}" in m]


# -- n --------------------------------------------------------------------------------------------
def test_ignored_n_falls_back_to_one_request_per_sample_with_distinct_seeds(stub_server, caplog):
    stub_server.ignore_n = True
    stub_server.reply = lambda req: f"seed {req['seed']}"
    model = make(stub_server)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert model.chat(USER, n=3, temperature=0.7, seed=10) == ["seed 10", "seed 11", "seed 12"]
    assert [r["n"] for r in stub_server.requests] == [3, 1, 1]
    assert model.lacks == {"n"}
    [warning] = warnings_about(caplog, "n")
    assert stub_server.base_url in warning and model.model in warning and "1 of n=3" in warning


def test_after_the_fallback_later_calls_go_straight_to_single_samples(stub_server, caplog):
    stub_server.ignore_n = True
    stub_server.reply = lambda req: f"seed {req['seed']}"
    model = make(stub_server)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model.chat(USER, n=2, temperature=0.7)
        first = stub_server.calls
        assert model.chat(USER, n=4, temperature=0.7, seed=5) == ["seed 5", "seed 6", "seed 7", "seed 8"]
        # a second object for the same server and model warns no more
        make(stub_server, model.model).chat(USER, n=2, temperature=0.7)
    assert [r["n"] for r in stub_server.requests[first : first + 4]] == [1, 1, 1, 1]
    assert len(warnings_about(caplog, "n")) == 1


def test_each_server_gets_its_own_warning(caplog):
    name = f"shared-{uuid.uuid4().hex[:8]}"
    with StubServer(ignore_n=True) as one, StubServer(ignore_n=True) as two:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            make(one, name).chat(USER, n=2)
            make(two, name).chat(USER, n=2)
    assert len(warnings_about(caplog, "n")) == 2


def test_a_server_that_honours_n_is_asked_once_and_never_warned(stub_server, caplog):
    model = make(stub_server)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert len(model.chat(USER, n=3, temperature=0.7)) == 3
        model.score_choices(USER, ["echo", "other"])
    assert stub_server.calls == 2 and model.lacks == set()
    assert not [r for r in caplog.records if r.name == LOGGER]


# -- malformed replies are bounded errors ----------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3])
def test_empty_choices_is_a_chat_error_naming_server_and_model_not_a_loop(stub_server, n):
    stub_server.empty_choices = True
    model = make(stub_server)
    start = time.monotonic()
    with pytest.raises(ChatError) as err:
        model.chat(USER, n=n)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert stub_server.base_url in message and f"model {model.model}" in message and "no choices" in message
    assert stub_server.calls == 1 and model.usage.failures == 1


def test_single_samples_that_come_back_empty_end_in_a_chat_error(stub_server):
    stub_server.ignore_n = True
    model = make(stub_server)
    model.chat(USER, n=2)  # learns that the server ignores n
    stub_server.empty_choices = True
    calls = stub_server.calls
    with pytest.raises(ChatError, match="no choices"):
        model.chat(USER, n=3)
    assert stub_server.calls - calls <= 3


def test_a_choice_without_a_message_is_a_chat_error(stub_server):
    stub_server.drop_message = True
    model = make(stub_server)
    with pytest.raises(ChatError, match=rf"model {model.model}.*without a message"):
        model.score_choices(USER, ["Yes", "No"])
    assert stub_server.calls == 1


# -- scoring without log-probabilities -------------------------------------------------------------
def test_scoring_without_logprobs_parses_the_greedy_reply(stub_server, caplog):
    stub_server.logprobs = False
    stub_server.reply = lambda req: "I'd say Dialogue B."
    model = make(stub_server)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dist = model.score_choices(USER, ["Dialogue A", "Dialogue B", "Tie"])
        assert dist == {"Dialogue A": 0.0, "Dialogue B": 1.0, "Tie": 0.0}
        stub_server.reply = lambda req: "4/5"
        assert model.score_choices(USER, ["1", "2", "3", "4", "5"])["4"] == 1.0
    assert stub_server.requests[0]["logprobs"] is True
    assert "logprobs" not in stub_server.requests[1]  # straight to the fallback
    assert stub_server.requests[1]["temperature"] == 0.0
    [warning] = warnings_about(caplog, "logprobs")
    assert stub_server.base_url in warning and model.model in warning


def test_a_reply_that_names_no_choice_scores_uniform_and_is_counted(stub_server):
    stub_server.logprobs = False
    stub_server.reply = lambda req: "I cannot decide."
    model = make(stub_server)
    dist = model.score_choices(USER, ["Yes", "No", "Maybe"])
    assert dist == pytest.approx({"Yes": 1 / 3, "No": 1 / 3, "Maybe": 1 / 3})
    assert model.usage.unmatched_scores == 1


def test_async_scoring_uses_the_same_fallback(stub_server):
    import asyncio

    stub_server.logprobs = False
    stub_server.reply = lambda req: "no"
    model = make(stub_server)
    assert asyncio.run(model.ascore_choices(USER, ["Yes", "No"])) == {"Yes": 0.0, "No": 1.0}
    assert model.lacks == {"logprobs"}


@pytest.mark.parametrize(
    ("reply", "choices", "named"),
    [
        ("I'd say Dialogue B.", ["Dialogue A", "Dialogue B", "Tie"], "Dialogue B"),
        ("4/5", ["1", "2", "3", "4", "5"], "4"),
        ("Score: 14", ["1", "4"], None),  # whole numbers only
        ("YES, clearly", ["Yes", "No"], "Yes"),
        ("Dialogue B", ["Dialogue", "Dialogue B"], "Dialogue B"),
        ("nothing here", ["Yes", "No"], None),
    ],
)
def test_choice_named(reply, choices, named):
    assert choice_named(reply, choices) == named


# -- the launcher, without starting a model --------------------------------------------------------
def test_launcher_refuses_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(LocalServerError, match="no config.json"):
        with serve_transformers(tmp_path):
            pass


def test_launcher_names_an_unreadable_model_config(tmp_path):
    (tmp_path / "config.json").write_text("not json")
    with pytest.raises(LocalServerError, match=rf"{tmp_path}: cannot read its model config"):
        with serve_transformers(tmp_path):
            pass


def test_launcher_refuses_a_busy_port(tmp_path, stub_server):
    (tmp_path / "config.json").write_text("{}")
    port = int(stub_server.base_url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(LocalServerError, match="already in use"):
        with serve_transformers(tmp_path, port=port):
            pass


@pytest.mark.slow  # starts the real CLI: about 10 s on two cores
def test_launcher_quotes_the_log_when_the_server_dies(tmp_path):
    # a model folder transformers cannot load: the server exits while loading it
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    start = time.monotonic()
    with pytest.raises(LocalServerError, match=r"exited with code .*end of its log") as err:
        with serve_transformers(tmp_path, name="broken", startup_timeout_s=120):
            pass
    assert "Error" in str(err.value).split("end of its log:")[1]  # the server's own last words
    assert time.monotonic() - start < 120


# -- the real server -------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_transformers_serve_through_the_backend(default_model_dir, tmp_path, caplog):
    start = time.monotonic()
    with serve_transformers(default_model_dir, log_path=tmp_path / "server.log") as server:
        ready_s = time.monotonic() - start
        assert server.model == "SmolLM2-135M-Instruct"
        assert list_models(server.base_url) == ["SmolLM2-135M-Instruct"]
        model = OpenAIChat(server.model, base_url=server.base_url, timeout_s=120)
        try:
            with caplog.at_level(logging.WARNING, logger=LOGGER):
                [reply] = model.chat([{"role": "user", "content": "Say hello."}], max_tokens=8)
                assert reply.strip()
                # the server samples at temperature > 0 (the launcher's generation config), one seed each
                ask = [{"role": "user", "content": "Write one sentence about the sea."}]
                replies = model.chat(ask, n=3, temperature=1.0, max_tokens=12)
                assert len(replies) == 3 and len(set(replies)) > 1
                assert model.chat(ask, max_tokens=12) == model.chat(ask, max_tokens=12, seed=1)  # greedy
                dist = model.score_choices([{"role": "user", "content": "Is the sky blue? Answer Yes or No."}], ["Yes", "No"])
        finally:
            model.close()
        assert set(dist) == {"Yes", "No"} and sum(dist.values()) == pytest.approx(1.0)
        assert model.lacks == {"n", "logprobs"}
        assert len(warnings_about(caplog, "n")) == 1 and len(warnings_about(caplog, "logprobs")) == 1
        pid = server.pid
        os.killpg(pid, 0)  # alive while the context is open
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    print(f"transformers serve: ready in {ready_s:.1f} s, whole test {time.monotonic() - start:.1f} s")
