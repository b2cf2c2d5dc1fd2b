"""The chat front end's crisis guard: each kind of risky phrasing, figures of speech, the session's
recent turns, the labelled phrasings' table in docs/supporter.md, and the event log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esvr.tasks.simulation.crisis import (
    RECENT_TURNS,
    CrisisGuard,
    check_message,
    main,
    normalize,
    phrasings_table,
    safe_reply,
    score_phrasings,
)

ROOT = Path(__file__).resolve().parents[1]
PHRASINGS = ROOT / "tests" / "fixtures" / "crisis_phrasings.jsonl"
UNSEEN = ROOT / "tests" / "fixtures" / "crisis_phrasings_unseen.jsonl"

POSITIVE = [
    # direct
    "I want to kill myself.",
    "i'm going to end my life tonight",
    "I've been thinking about suicide a lot",
    "Honestly I just want to die",
    "I feel suicidal",
    "I wish I were dead",
    # indirect
    "I don't want to be here anymore.",
    "Everyone would be better off without me.",
    "my family would be better off without me",
    "I just want to end it all",
    "There's no reason to live anymore",
    "I have nothing left to live for",
    "I don't want to wake up tomorrow",
    "I won't be around much longer, so it doesn't matter",
    "I wrote my goodbye letter yesterday",
    "I've been saving up my pills",
    "I\u2019m thinking of taking my own life",  # curly apostrophe
    "I don't want to exist",
    # self-harm
    "I started cutting again last week",
    "I keep hurting myself when I'm upset",
    "I've been cutting myself",
    "I self-harm when it gets bad",
    "I want to burn myself",
]

NEGATIVE = [
    "This workout is killing me",
    "I'd kill for a coffee right now",
    "My feet are killing me after that hike",
    "You're killing me, that joke was great",
    "I'm dying to see that movie",
    "I died laughing at the video",
    "I need to cut myself some slack",
    "I keep beating myself up about the exam, I beat myself up all the time",
    "I don't want to be here at this job anymore, I'm looking for a new one",  # job context still flagged? see below
    "My boss stresses me out and I can't sleep",
    "I'm worried about my friend's health",
    "We watched a documentary about the history of suicide prevention hotlines",  # flagged: keyword (conservative)
    "I just want to kill time before the meeting",
    "I'm so tired of studying",
    "I feel lonely since I moved to a new city",
]

# Conservative by design: these harmless sentences still contain a sign the screen cannot tell
# from a real one, and get the safe reply (a false alarm costs less than a miss).
CONSERVATIVE = {
    "I don't want to be here at this job anymore, I'm looking for a new one",
    "We watched a documentary about the history of suicide prevention hotlines",
}


@pytest.mark.parametrize("text", POSITIVE)
def test_signs_of_crisis_are_flagged(text):
    result = check_message(text)
    assert result.flagged, text
    assert result.category in {"suicide", "self_harm"} and result.rule


@pytest.mark.parametrize("text", [t for t in NEGATIVE if t not in CONSERVATIVE])
def test_idioms_and_ordinary_distress_are_not_flagged(text):
    assert not check_message(text).flagged, (text, check_message(text))


@pytest.mark.parametrize("text", sorted(CONSERVATIVE))
def test_ambiguous_mentions_err_on_the_safe_side(text):
    assert check_message(text).flagged


def test_an_idiom_does_not_hide_a_real_sign():
    assert check_message("This week is killing me and honestly I want to kill myself").flagged
    assert check_message("I'd kill for some sleep. Everyone would be better off without me.").flagged


def test_self_harm_category():
    assert check_message("I relapsed into cutting").category == "self_harm"
    assert check_message("I want to end it all").category == "suicide"


def test_safe_reply_points_to_crisis_help():
    text = safe_reply()
    assert "988" in text and "findahelpline.com" in text and "emergency" in text


def test_guard_logs_events_without_the_message(tmp_path: Path):
    log = tmp_path / "events" / "crisis.jsonl"
    guard = CrisisGuard(log, session="s1")
    secret = "I don't want to be here anymore, my name is Alice Example"
    assert guard.check(secret, turn=3).flagged
    assert not guard.check("I'm tired of my commute", turn=4).flagged
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and guard.events == 1
    event = json.loads(lines[0])
    assert event["session"] == "s1" and event["turn"] == 3 and event["category"] == "suicide"
    assert event["rule"] == "not_be_here" and event["message_chars"] == len(secret)
    assert "Alice" not in lines[0] and "here anymore" not in lines[0]


# Each kind of phrasing the keyword screen once missed, a few of each (the labelled set has more).
KINDS = {
    "no apostrophe": ["i dont want to be here anymore", "im going to kill myself", "i cant go on living like this"],
    "informal": ["i wanna die", "gonna kms tbh", "ngl i wanna unalive myself", "i rly dont wanna wake up tmrw"],
    "act already done": [
        "I took all my pills",
        "I took a whole bottle of sleeping pills",
        "i took like 40 tylenol",
        "I overdosed an hour ago",
        "I drank bleach",
    ],
    "plan with a time": [
        "I'm going to end it tonight",
        "This is my last night alive",
        "I'll be gone by tomorrow morning",
        "Tonight is the night",
    ],
    "hopelessness": [
        "I have no reason to keep living anymore",
        "it seems like there is no point to it all",
        "I wish I had just been killed then",
    ],
    "euphemism": [
        "I just want to end it",
        "I can't do this anymore",
        "I'm done with life",
        "I want it all to stop",
        "This is goodbye",
    ],
    "obfuscated": [
        "k i l l m y s e l f",
        "I want to k1ll mys3lf",
        "I want to d!e",
        "$uicide",
        "I w\u200bant to die",
        "I want to k i l l myself",
        "s-u-i-c-i-d-e",
        "I want to dieeee",
        "I want to kíll myself",
        "ｓｕｉｃｉｄｅ",
    ],
}


@pytest.mark.parametrize(("kind", "text"), [(k, t) for k, texts in KINDS.items() for t in texts])
def test_each_kind_of_risky_phrasing_is_flagged(kind, text):
    assert check_message(text).flagged, (kind, text, normalize(text))


FIGURES_OF_SPEECH = [
    "this exam is killing me",
    "I'd rather die than give that speech again",
    "That cake is to die for",
    "I'm bored to death",
    "She killed it on stage",
    "I overdosed on coffee today",
    "I'm going to end it with my boyfriend tonight",
    "I cut myself shaving",
    "The Suicide Squad movie was fun",
    "My phone is dying",
    "I'm so embarrassed I could die",
    "I took my pills this morning like the doctor said",
    "I had too many drinks last night",
    "I don't want to wake up early tomorrow",
    "lets finish this conversation",
    "Man I am not sure if I can finish this class",
    "loneliness is killing me",
]


@pytest.mark.parametrize("text", FIGURES_OF_SPEECH)
def test_figures_of_speech_and_everyday_mentions_are_not_flagged(text):
    assert not check_message(text).flagged, (text, normalize(text), check_message(text))


def test_normalize_reads_what_people_type():
    assert normalize("I DON\u2019T wanna d1e rn") == "i do not want to die right now"
    assert normalize("k\u200bill my$elf, k i l l m-y-s-e-l-f") == "kill myself . killmyself"  # spaced letters run into one word
    assert normalize("Im soooo tired") == "i am tired"  # fillers dropped, stretched letters shortened


def test_a_follow_up_is_judged_with_the_recent_turns():
    saving = "I have been saving up my pills for weeks"
    follow_up = "Tonight I'm going to take them all"
    assert check_message(saving).flagged
    assert not check_message(follow_up).flagged  # alone, it names no risk
    assert check_message(follow_up, [saving]).rule == "follow_up_after_sign"
    # means named earlier, without a sign: taking all of them, or using the gun, is one
    assert check_message("I think I'll take all of them", ["I've got a bottle of sleeping pills"]).rule == "follow_up_on_means"
    assert check_message("I'm going to use it", ["My dad keeps a gun in the closet"]).flagged
    # harmless follow-ups stay harmless
    assert not check_message("Thanks, I called the number and talked to someone", ["I want to kill myself"]).flagged
    assert not check_message("I'll take them tomorrow", ["My doctor gave me new meds"]).flagged
    assert not check_message("I'll do it tomorrow", ["This exam is killing me"]).flagged
    assert not check_message("thanks, you can do it", ["I want to kill myself"]).flagged  # not the person's act
    # only the last RECENT_TURNS messages count
    old = [saving] + ["I went for a walk"] * RECENT_TURNS
    assert not check_message(follow_up, old).flagged


def test_the_chat_session_gives_the_guard_its_recent_turns(stub_server, tmp_path: Path):
    from supporter_script import script

    from esvr.flows.chat import ChatSession
    from esvr.models.backends import load_chat_model
    from esvr.models.config import ModelConfig

    stub_server.reply = script
    model = load_chat_model(ModelConfig(spec="openai:stub", base_url=stub_server.base_url))
    chat = ChatSession(model, guard=CrisisGuard(tmp_path / "crisis.jsonl", session="s"))
    assert chat.respond("I have been saving up my pills for weeks").crisis
    calls = stub_server.calls
    reply = chat.respond("Tonight I'm going to take them all")
    assert reply.crisis and reply.text == safe_reply() and stub_server.calls == calls
    events = [json.loads(line) for line in (tmp_path / "crisis.jsonl").read_text().splitlines()]
    assert [e["rule"] for e in events] == ["method", "follow_up_after_sign"] and events[1]["turn"] == 2


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("path", [PHRASINGS, UNSEEN], ids=["phrasings", "unseen"])
def test_docs_show_the_guards_figures_on_the_labelled_phrasings(path: Path):
    table = phrasings_table(score_phrasings(_rows(path)))
    assert table in (ROOT / "docs" / "supporter.md").read_text(), f"docs/supporter.md: refresh the table of {path.name}"


def test_no_false_alarm_and_few_misses_on_the_labelled_phrasings():
    rows = _rows(PHRASINGS) + _rows(UNSEEN)
    assert {r["label"] for r in rows} == {0, 1} and len(rows) > 150
    false_alarms = [r["text"] for r in rows if not r["label"] and check_message(r["text"], r.get("recent", ())).flagged]
    misses = [r["text"] for r in rows if r["label"] and not check_message(r["text"], r.get("recent", ())).flagged]
    assert false_alarms == []
    assert len(misses) <= 2, misses


def test_the_esconv_scan(capsys, tmp_path: Path):
    dialogues = [
        {
            "dialog": [
                {"speaker": "seeker", "content": "I have been saving my pills"},
                {"speaker": "supporter", "content": "do it"},
            ]
        },
        {"dialog": [{"speaker": "seeker", "content": "hi"}, {"speaker": "seeker", "content": "I'll take them all tonight"}]},
    ]
    path = tmp_path / "esconv.json"
    path.write_text(json.dumps(dialogues))
    assert main([str(path), "--esconv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["2 conversations, 3 seeker messages, 1 flagged", "conversation 0 (method): I have been saving my pills"]


def test_the_table_command(capsys, tmp_path: Path):
    assert main([str(PHRASINGS)]) == 0
    assert "**recall**" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="missing.jsonl: cannot read"):
        main([str(tmp_path / "missing.jsonl")])


@pytest.mark.parametrize("text", ["I feel ill today", "that's odd this time", "I want to dye my hair", "I'm ill and I will rest"])
def test_spellings_that_look_like_chat_forms_stay_themselves(text):
    assert not check_message(text).flagged, normalize(text)
    assert check_message("ill end it tonight").flagged  # "ill" before a verb is "I'll"
    assert check_message("i od'd on my meds").flagged


# --------------------------------------------------------------------------------------------
# the chat model's second pass
# --------------------------------------------------------------------------------------------

MISSED_BY_RULES = "After everyone's asleep I'm going to take the pills"


def _judge(server, answer: dict[str, float]):
    from esvr.models.openai_backend import OpenAIChat

    server.reply = lambda req: "<dist>" + json.dumps(answer)
    return OpenAIChat("stub", base_url=server.base_url, max_retries=0)


def test_the_judge_adds_a_sign_the_rules_miss(stub_server, tmp_path: Path):
    assert not check_message(MISSED_BY_RULES).flagged
    guard = CrisisGuard(tmp_path / "events.jsonl", session="j", judge=_judge(stub_server, {"suicide": 0.7, "none": 0.3}))
    result = guard.check(MISSED_BY_RULES, turn=2, recent=["I feel like a burden"])
    assert result.flagged and result.rule == "llm_judge" and result.category == "suicide"
    prompt = json.dumps(stub_server.requests[-1]["messages"])
    assert "I feel like a burden" in prompt and "take the pills" in prompt  # it reads the recent turns too
    assert json.loads((tmp_path / "events.jsonl").read_text())["rule"] == "llm_judge"


def test_the_judge_never_overrules_the_rules(stub_server):
    guard = CrisisGuard(judge=_judge(stub_server, {"none": 1.0}))
    assert guard.check("I want to kill myself").rule == "kill_self"
    assert stub_server.calls == 0  # a sign the rules see needs no judge
    assert not guard.check("I had a long day at work").flagged and stub_server.calls == 1
    guard.judge = _judge(stub_server, {"self_harm": 0.3, "suicide": 0.1, "none": 0.6})
    assert not guard.check("I had a long day at work").flagged  # below the threshold


def test_a_failing_judge_leaves_the_rules_answer(caplog):
    from esvr.models.openai_backend import OpenAIChat

    guard = CrisisGuard(judge=OpenAIChat("stub", base_url="http://127.0.0.1:9/v1", max_retries=0, timeout_s=2))
    assert guard.check("I want to end it tonight").flagged
    assert not guard.check("I had a long day at work").flagged
    assert "the judge failed" in caplog.text


def test_esvr_chat_asks_an_openai_judge_and_not_the_bundled_model(stub_server, tmp_path: Path):
    from esvr.flows.chat import open_session
    from esvr.flows.config import load_config

    stub_server.reply = lambda req: '<dist>{"suicide": 0.9, "none": 0.1}'
    judge = ["models.judge=openai:stub", f"models.judge.base_url={stub_server.base_url}"]
    config = load_config(None, [f"run.out_dir={tmp_path}", *judge])
    with open_session(config, "openai:stub", tvd="", rg="") as (session, banner):
        assert "crisis guard: rules + openai:stub@" in banner
        reply = session.respond(MISSED_BY_RULES)
    assert reply.crisis and stub_server.calls == 1  # the judge's call; no supporter call
    with open_session(load_config(None, [f"run.out_dir={tmp_path}"]), "openai:stub", tvd="", rg="") as (session, banner):
        assert session.guard.judge is None and "crisis guard: rules;" in banner
