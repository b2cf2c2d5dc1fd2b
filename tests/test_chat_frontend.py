"""`esvr chat`'s function API and terminal loop against the scripted world (stub OpenAI server)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from supporter_script import script

from esvr.flows.chat import ChatSession, run_terminal
from esvr.models.backends import load_chat_model
from esvr.models.config import ModelConfig
from esvr.tasks.simulation.crisis import CrisisGuard, safe_reply
from esvr.tasks.simulation.supporter import SupporterSettings


def session(server, tmp_path: Path, **kw) -> ChatSession:
    server.reply = script
    model = load_chat_model(ModelConfig(spec="openai:stub", base_url=server.base_url))
    return ChatSession(
        model,
        tvd=model,
        rg=model,
        guard=CrisisGuard(tmp_path / "crisis.jsonl", session="t"),
        settings=SupporterSettings(max_tokens=256),
        **kw,
    )


def test_a_few_turns_with_tvd_and_rg_in_the_loop(stub_server, tmp_path: Path):
    chat = session(stub_server, tmp_path)
    r1 = chat.respond("I lost my job and I feel useless.")
    assert r1.text == "The effort you put into your career shows real strength."
    assert r1.target_values == ["Achievement"] and r1.reference and not r1.crisis
    assert set(r1.reasoning) == {"step1", "step2", "step3", "step4"} and r1.strategy == "Affirmation"
    r2 = chat.respond("Maybe. I still worry about money.")
    assert r2.text and chat.turn == 3
    assert [u["role"] for u in chat.utterances] == ["seeker", "supporter", "seeker", "supporter"]
    # the supporter saw the whole history on turn 2
    last_supporter_prompt = [r for r in stub_server.requests if "Therapist:" in json.dumps(r)][-1]
    assert "I lost my job" in json.dumps(last_supporter_prompt)


def test_crisis_guard_answers_before_any_model_call(stub_server, tmp_path: Path):
    chat = session(stub_server, tmp_path)
    before = stub_server.calls
    reply = chat.respond("Honestly everyone would be better off without me.")
    assert reply.crisis and reply.text == safe_reply() and reply.reasoning is None
    assert stub_server.calls == before  # no TVD, RG or supporter call
    event = json.loads((tmp_path / "crisis.jsonl").read_text().splitlines()[0])
    assert event["rule"] == "better_off_without" and event["turn"] == 1
    # the conversation goes on normally afterwards
    assert not chat.respond("Thanks. I lost my job last week.").crisis


def test_streaming_hands_over_only_the_response(stub_server, tmp_path: Path):
    chat = session(stub_server, tmp_path)
    pieces: list[str] = []
    reply = chat.respond_stream("I lost my job.", pieces.append)
    assert "".join(pieces).strip() == reply.text == "The effort you put into your career shows real strength."
    shown: list[str] = []
    chat.respond_stream("It still hurts.", shown.append, show_reasoning=True)
    assert "Step 1." in "".join(shown) and "-Response:" in "".join(shown)


def test_terminal_loop_streams_replies_and_quits(stub_server, tmp_path: Path):
    chat = session(stub_server, tmp_path)
    stdin = io.StringIO("I lost my job.\n\nI want to end it all\n/quit\n")
    stdout = io.StringIO()
    assert run_terminal(chat, stdin=stdin, stdout=stdout) == 0
    out = stdout.getvalue()
    assert out.startswith("supporter> Hi")
    assert "your career shows real strength" in out and "988" in out
    assert len(chat.replies) == 2 and chat.replies[1].crisis


def test_a_supporter_reference_that_names_nothing_is_a_user_error_naming_the_choices(tmp_path: Path, monkeypatch):
    import pytest

    from esvr.flows.chat import resolve_supporter
    from esvr.models.config import ConfigError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ConfigError, match=r"--supporter 'nosuchrun': expected an MLflow run id .* or 'latest'"):
        resolve_supporter("nosuchrun")
    absent = "0123456789abcdef0123456789abcdef"
    with pytest.raises(
        FileNotFoundError, match=rf"--supporter '{absent}': Run with id={absent} not found in the MLflow store sqlite"
    ):
        resolve_supporter(absent)
