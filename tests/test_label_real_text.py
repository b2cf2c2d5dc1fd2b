"""The label stage on real-looking Reddit text: every labeler reads the normalised text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from esvr.tasks.common.roles import labelers
from esvr.tasks.labeling.label import LabelConfig, collect_utterances, label_threads, read_labels
from esvr.tasks.reddit.ingest import THREADS_SCHEMA

FIXTURE = Path(__file__).parent / "fixtures" / "reddit_utterances.jsonl"


def reddit_texts() -> list[str]:
    return [json.loads(line)["text"] for line in FIXTURE.read_text().splitlines()]


def ascii_twin(text: str) -> str:
    """The text as typed on a keyboard that has only ASCII quotes, with Reddit's escaping undone."""
    for typographic, plain in (("\u2019", "'"), ("\u201c", '"'), ("\u201d", '"'), ("\u2014", " - "), ("&amp;", "&")):
        text = text.replace(typographic, plain)
    return text


def write_chains(path: Path, chains: list[tuple[str, str, str]]) -> Path:
    """One thread per (post, comment, OP's reply)."""

    def turn(uid: str, role: str, text: str) -> dict:
        return {"utt_id": uid, "role": role, "author": role, "text": text, "score": 2, "created_utc": 1_600_000_000}

    rows = [
        {
            "thread_id": f"t{i}",
            "post_id": f"p{i}",
            "subreddit": "offmychest",
            "created_utc": 1_600_000_000,
            "dump": "RS_test",
            "turns": [turn(f"p{i}", "op", post), turn(f"c{i}", "commenter", comment), turn(f"o{i}", "op", reply)],
            "siblings": [],
        }
        for i, (post, comment, reply) in enumerate(chains)
    ]
    pl.DataFrame(rows, schema=THREADS_SCHEMA).write_parquet(path)
    return path


def write_threads(path: Path, texts: list[str]) -> Path:
    """One chain per text: the text is the OP's post, a short comment, the OP's thanks."""
    return write_chains(path, [(text, "I hear you.", "Thanks.") for text in texts])


@pytest.fixture(scope="module")
def default_labelers():
    cfg = LabelConfig()
    return labelers(cfg.values, cfg.emotion)


def test_collect_utterances_normalises_the_texts(tmp_path: Path):
    utts = collect_utterances(write_threads(tmp_path / "threads.parquet", ["I don\u2019t know &amp; I can\u2019t\u00a0sleep"]))
    assert utts.filter(pl.col("utt_id") == "p0")["text"].item() == "I don't know & I can't sleep"


def test_every_labeler_reads_reddit_text_as_its_ascii_twin(tmp_path: Path, default_labelers):
    """Typographic apostrophes, quotes, dashes and HTML entities change no label, of either labeler."""
    texts = reddit_texts()
    assert any(ascii_twin(t) != t for t in texts)
    detector, scorer = default_labelers
    cfg = LabelConfig(progress=False)
    as_posted = read_labels(
        label_threads(write_threads(tmp_path / "a.parquet", texts), tmp_path / "a", cfg, detector=detector, scorer=scorer)[
            "labels"
        ]
    )
    as_typed = read_labels(
        label_threads(
            write_threads(tmp_path / "b.parquet", [ascii_twin(t) for t in texts]),
            tmp_path / "b",
            cfg,
            detector=detector,
            scorer=scorer,
        )["labels"]
    )
    assert as_posted["utt_id"].to_list() == as_typed["utt_id"].to_list()
    assert as_posted["sentiment"].to_list() == as_typed["sentiment"].to_list()
    assert np.allclose(as_posted["valence"].to_numpy(), as_typed["valence"].to_numpy())
    np.testing.assert_allclose(np.stack(as_posted["values"].to_numpy()), np.stack(as_typed["values"].to_numpy()), atol=1e-6)
