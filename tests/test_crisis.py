"""The chat front end's crisis guard: positive and negative examples, indirect phrasings, event log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esvr.tasks.simulation.crisis import CrisisGuard, check_message, safe_reply

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
