"""Text normalisation before the labelers, and the sentence splitter of long texts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esvr.models.text import normalize_text, split_sentences

FIXTURE = Path(__file__).parent / "fixtures" / "reddit_utterances.jsonl"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("I don\u2019t like this", "I don't like this"),
        ("\u2018fine\u2019 she said", "'fine' she said"),
        ("\u201cwhy me?\u201d", '"why me?"'),
        ("\u00abnon\u00bb", '"non"'),
        ("tired\u2014not sleepy tired", "tired - not sleepy tired"),
        ("2010\u20132015", "2010 - 2015"),
        ("self\u2011doubt", "self-doubt"),
        ("Work &amp; school", "Work & school"),
        ("&gt; quoted &lt;3", "> quoted <3"),
        ("wait\u2026 what", "wait... what"),
        ("a\u00a0b\tc   d", "a b c d"),
        ("first\u200b line&#x200B;", "first line"),
        ("para one  \n\n\n\n  para two", "para one\n\npara two"),
        ("  padded  ", "padded"),
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_text(raw: str | None, expected: str):
    assert normalize_text(raw) == expected


def test_normalize_text_is_idempotent_on_real_looking_text():
    texts = [json.loads(line)["text"] for line in FIXTURE.read_text().splitlines()]
    assert sum("\u2019" in t for t in texts) > len(texts) // 2  # the fixture is what it claims to be
    for t in texts:
        once = normalize_text(t)
        assert normalize_text(once) == once
        assert once.isascii()


def test_split_sentences():
    text = 'I saw the texts. I feel sick!! Why?\nNo full stop here\nHe said "stop." Then left... ok'
    assert split_sentences(text) == [
        "I saw the texts.",
        "I feel sick!!",
        "Why?",
        "No full stop here",
        'He said "stop."',
        "Then left...",
        "ok",
    ]
    assert split_sentences("") == []
    assert split_sentences("one sentence without end") == ["one sentence without end"]
