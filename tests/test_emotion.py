"""Emotion scorer: EmoLLMs reply parsing, the emollama backend over a chat model, the VADER default."""

from __future__ import annotations

import pytest

from esvr.models.chat import ChatModel
from esvr.models.emotion import (
    EmoLlamaScorer,
    EmotionConfig,
    EmotionScore,
    VaderEmotionScorer,
    load_emotion_scorer,
    parse_sentiment,
    parse_valence,
    vader_class,
)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("0.879", 0.879),
        (">>0.879", 0.879),
        ("Intensity Score: 0.5", 0.5),
        ("Intensity Score:\n\n.75", 0.75),
        ("1", 1.0),
        ("0", 0.0),
        ("0,6", 0.6),
        ("The valence intensity is 0.3.", 0.3),
        ("**0.42**", 0.42),
        ("75%", 0.75),
        ("Score: 0.2 (fairly negative)", 0.2),
    ],
)
def test_parse_valence_good(reply: str, expected: float):
    assert parse_valence(reply) == pytest.approx(expected)


@pytest.mark.parametrize("reply", ["", "I cannot tell.", "-0.2", "5", "seven", "   "])
def test_parse_valence_broken(reply: str):
    assert parse_valence(reply) is None


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("-3: very negative emotional state can be inferred", -3),
        (">>-3: very negative emotional state can be inferred", -3),
        ("2", 2),
        ("+1", 1),
        ("Intensity Class: 1: slightly positive mental state can be inferred", 1),
        ("\u22122", -2),
        ("**3**", 3),
        ("0: neutral or mixed mental state can be inferred", 0),
        ("moderately negative mental state can be inferred", -2),
        ("The writer seems very positive.", 3),
        ("neutral", 0),
    ],
)
def test_parse_sentiment_good(reply: str, expected: int):
    assert parse_sentiment(reply) == expected


@pytest.mark.parametrize("reply", ["", "I don't know", "7", "2.5", "-5"])
def test_parse_sentiment_broken(reply: str):
    assert parse_sentiment(reply) is None


class ScriptedEmoLlama(ChatModel):
    """A chat model at the edge of the world that answers by task, with scripted replies."""

    cache_id = "scripted-emollama"

    def __init__(self, valence_reply: str, sentiment_reply: str):
        super().__init__()
        self.replies = {"valence": valence_reply, "sentiment": sentiment_reply}
        self.seen: list[str] = []

    def _generate(self, requests):
        out = []
        for r in requests:
            content = r.messages[-1][1]
            self.seen.append(content)
            out.append([self.replies["valence" if "Intensity Score:" in content else "sentiment"]])
        return out

    def _score(self, messages, choices):
        return {c: 1.0 for c in choices}


def test_emollama_scorer_uses_emollms_formats():
    chat = ScriptedEmoLlama(">>0.879", "2: moderately positive emotional state can be inferred")
    scorer = load_emotion_scorer(EmotionConfig(backend="emollama"), chat)
    assert scorer.score(["Happy Birthday!", "Thanks a lot"]) == [EmotionScore(0.879, 2)] * 2
    assert len(chat.seen) == 4
    first = chat.seen[0]
    assert first.startswith("Human: \nTask: Evaluate the valence intensity of the writer's mental state")
    assert "Text: Happy Birthday!\nIntensity Score:\n\nAssistant:\n" in first
    assert "Intensity Class:" in chat.seen[1] and "-3: very negative mental state can be inferred" in chat.seen[1]
    plain = EmoLlamaScorer(chat, wrap_human_assistant=False)
    plain.score(["x"])
    assert chat.seen[-2].startswith("Task: ")


def test_emollama_scorer_falls_back_on_broken_replies():
    only_valence = EmoLlamaScorer(ScriptedEmoLlama("0.9", "no idea"))
    assert only_valence.score(["a"]) == [EmotionScore(0.9, 2)]  # round(0.9 * 6 - 3) = 2
    assert only_valence.parse_failures == {"valence": 0, "sentiment": 1}
    only_class = EmoLlamaScorer(ScriptedEmoLlama("hmm", "-3"))
    assert only_class.score(["a"]) == [EmotionScore(0.0, -3)]
    neither = EmoLlamaScorer(ScriptedEmoLlama("", ""))
    assert neither.score(["a", "b"]) == [EmotionScore(0.5, 0)] * 2
    assert neither.parse_failures == {"valence": 2, "sentiment": 2}


def test_emollama_needs_a_chat_model():
    with pytest.raises(ValueError, match="chat model"):
        load_emotion_scorer(EmotionConfig(backend="emollama"))


def test_vader_default():
    scorer = load_emotion_scorer(EmotionConfig())
    assert isinstance(scorer, VaderEmotionScorer)
    pos, neg, empty = scorer.score(["Thank you so much, I feel a lot better now!", "I hate my life, everything is awful.", ""])
    assert pos.valence > 0.75 and pos.sentiment >= 2 and pos.is_positive()
    assert neg.valence < 0.25 and neg.sentiment <= -2 and not neg.is_positive()
    assert empty == EmotionScore(0.5, 0)


def test_vader_class_cut_points():
    assert [vader_class(c) for c in (-0.9, -0.5, -0.2, 0.0, 0.04, 0.05, 0.34, 0.35, 0.65, 1.0)] == [
        -3,
        -2,
        -1,
        0,
        0,
        1,
        1,
        2,
        3,
        3,
    ]


def test_label_stage_scores_vader_in_a_worker_process_with_the_same_results():
    import os

    from esvr.models.emotion import ProcessEmotionScorer
    from esvr.tasks.labeling.label import for_batches

    texts = ["Thank you so much, I feel a lot better now!", "I hate my life, everything is awful.", "", "ok"]
    worker = for_batches(load_emotion_scorer(EmotionConfig()), EmotionConfig())
    assert isinstance(worker, ProcessEmotionScorer)
    try:
        pending = worker.submit(texts)  # returns before the scores exist: the caller encodes meanwhile
        assert pending.result(timeout=60) == VaderEmotionScorer().score(texts)
        (pid,) = worker._pool._processes  # type: ignore[union-attr]
        assert pid != os.getpid()
        assert worker.fingerprint == VaderEmotionScorer().fingerprint  # label caches stay valid
    finally:
        worker.close()
    assert worker._pool is None
    inline = for_batches(VaderEmotionScorer(), EmotionConfig(worker_process=False))
    assert isinstance(inline, VaderEmotionScorer) and inline.submit(texts).result() == worker.score(texts)
    worker.close()


# --------------------------------------------------------------------------------------------
# VADER on real-looking Reddit text: typographic apostrophes, long posts
# --------------------------------------------------------------------------------------------

#: long vents that open with kind words about the person who hurt or was lost: whole-text VADER
#: sums those words' valences and calls the post positive
CHEATING_VENT = (
    "Me and my boyfriend were together for six years and I honestly thought we had the best, happiest, most loving "
    "relationship in the world, and all our friends always said how perfect and sweet we were together. "
    "Last night I found out he\u2019s been cheating on me for a year, with my best friend of all people. "
    "I saw the texts. I feel sick. I keep crying in the shower so my roommate won\u2019t hear. "
    "I feel so stupid and humiliated. Every memory feels like a lie now. "
    "I\u2019m angry at him, I\u2019m angry at her, and I\u2019m angry at myself for missing every sign. "
    "I called in sick today because I can\u2019t face anyone. I feel completely alone."
)
GRIEF_VENT = (
    "My best friend Jake died in a car accident on Saturday. We\u2019d been best friends since we were six, "
    "he was the funniest, kindest, most generous guy I\u2019ve ever known, and everyone loved him. "
    "I got the call from his mom at 2am. I keep thinking it\u2019s a mistake. "
    "The funeral is on Thursday and I\u2019m supposed to speak and I\u2019m terrified. "
    "I\u2019m so sad. I feel empty. I keep reaching for my phone to text him and then it hits me again. "
    "I\u2019m angry that this happened to him of all people. Nothing feels real and I can\u2019t sleep."
)


def test_typographic_apostrophes_keep_vaders_negation():
    scorer = VaderEmotionScorer()
    curly, straight = scorer.score(["I don\u2019t like this", "I don't like this"])
    assert curly == straight
    assert curly.sentiment < 0 and not curly.is_positive()


@pytest.mark.parametrize("vent", [CHEATING_VENT, GRIEF_VENT], ids=["partner-cheating", "friend-died"])
def test_a_long_negative_vent_scores_negative(vent: str):
    (score,) = VaderEmotionScorer().score([vent])
    assert score.sentiment < 0 and score.valence < 0.5 and not score.is_positive()
    (whole,) = VaderEmotionScorer(sentence_words=None).score([vent])
    assert whole.sentiment > 0  # what whole-text scoring said, the reason for scoring by sentence


def test_long_texts_get_the_mean_of_their_sentences_compounds():
    from esvr.models.text import normalize_text, split_sentences

    scorer = VaderEmotionScorer(sentence_words=60)
    sentences = split_sentences(normalize_text(CHEATING_VENT))
    expected = sum(scorer.analyzer.polarity_scores(s)["compound"] for s in sentences) / len(sentences)
    assert scorer.compound(CHEATING_VENT) == pytest.approx(expected)
    short = "I feel sick. Thank you for listening though, it helps."
    assert scorer.compound(short) == scorer.analyzer.polarity_scores(short)["compound"]  # 10 words: whole
    assert VaderEmotionScorer(sentence_words=5).compound(short) != scorer.compound(short)


def test_sentence_words_reaches_the_worker_process_and_the_fingerprint():
    from esvr.tasks.labeling.label import for_batches

    cfg = EmotionConfig(sentence_words=None)
    worker = for_batches(load_emotion_scorer(cfg), cfg)
    try:
        assert worker.score([GRIEF_VENT]) == VaderEmotionScorer(None).score([GRIEF_VENT])
        assert worker.fingerprint == VaderEmotionScorer(None).fingerprint != VaderEmotionScorer().fingerprint
    finally:
        worker.close()


def test_reddit_fixture_scores_do_not_depend_on_typographic_forms():
    """Every utterance scores as its ASCII-typed twin would: the class moves that apostrophes,
    quotes and entities caused (docs/labeling.md) are gone."""
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(__file__).parent / "fixtures" / "reddit_utterances.jsonl").open()]
    texts = [r["text"] for r in rows]
    twins = [t.replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"').replace("&amp;", "&") for t in texts]
    scorer = VaderEmotionScorer()
    assert scorer.score(texts) == scorer.score(twins)
    raw = [vader_class(scorer.analyzer.polarity_scores(t)["compound"]) for t in texts]
    assert sum(a != s.sentiment for a, s in zip(raw, scorer.score(texts))) >= len(texts) // 5
