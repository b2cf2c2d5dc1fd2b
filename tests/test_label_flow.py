"""The label stage on generated threads: plain functions, chunk cache, and the flow for real."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest

from esvr.flows.config import load_config
from esvr.prompts import value_names
from esvr.tasks.common.roles import labelers
from esvr.tasks.labeling.label import (
    LABELS_SCHEMA,
    LabelConfig,
    collect_utterances,
    label_threads,
    read_labels,
    validate_labels,
)
from esvr.tasks.reddit.ingest import THREADS_SCHEMA


def _turn(uid: str, role: str, text: str) -> dict:
    return {"utt_id": uid, "role": role, "author": "a" + uid, "text": text, "score": 3, "created_utc": 1_600_000_000}


def write_threads(path: Path, n_threads: int = 3) -> Path:
    """Chains of one post: they share the post's utterance (t3_p) and the OP's first comments."""
    rows = []
    for i in range(n_threads):
        rows.append(
            {
                "thread_id": f"p_{i}",
                "post_id": "p",
                "subreddit": "offmychest",
                "created_utc": 1_600_000_000,
                "dump": "RS_test",
                "turns": [
                    _turn("t3_p", "op", "I lost my job today and I feel worthless. My family depends on me."),
                    _turn(f"c{i}", "commenter", f"You are not worthless, friend number {i}. You will find something better."),
                    _turn(f"o{i}", "op", "Thank you so much, that really helps. I will keep trying."),
                ],
                "siblings": [
                    {
                        "turn": 1,
                        "utt_id": f"s{i}",
                        "author": "x",
                        "text": "Sorry to hear that.",
                        "score": 1,
                        "op_replies": [{"utt_id": f"r{i}", "text": "Thanks!"}],
                    }
                ]
                if i < 2
                else [],
            }
        )
    pl.DataFrame(rows, schema=THREADS_SCHEMA).write_parquet(path)
    return path


def test_collect_utterances_once_each(tmp_path: Path):
    utts = collect_utterances(write_threads(tmp_path / "threads.parquet"))
    ids = utts["utt_id"].to_list()
    assert ids[:4] == ["t3_p", "c0", "o0", "c1"]
    assert sorted(ids) == sorted(["t3_p", "c0", "o0", "c1", "o1", "c2", "o2", "s0", "s1", "r0", "r1"])


def test_collect_utterances_names_file_and_column(tmp_path: Path):
    path = tmp_path / "bad.parquet"
    pl.DataFrame({"thread_id": ["x"]}).write_parquet(path)
    with pytest.raises(ValueError, match=r"bad\.parquet: column 'turns' missing"):
        collect_utterances(path)
    with pytest.raises(FileNotFoundError, match="threads file not found"):
        collect_utterances(tmp_path / "nope.parquet")


@pytest.fixture(scope="module")
def default_labelers():
    cfg = LabelConfig()
    return labelers(cfg.values, cfg.emotion)


def test_label_threads_writes_the_contract_and_reuses_chunks(tmp_path: Path, default_labelers):
    threads = write_threads(tmp_path / "threads.parquet")
    cfg = LabelConfig(chunk_size=4, progress=False)
    detector, scorer = default_labelers
    out = label_threads(threads, tmp_path / "label", cfg, detector=detector, scorer=scorer)
    labels = read_labels(out["labels"])
    assert labels.schema == LABELS_SCHEMA and labels.height == 11
    assert labels["utt_id"].to_list()[:3] == ["t3_p", "c0", "o0"]
    probs = np.stack(labels["values"].to_numpy())
    assert probs.shape == (11, 20) and ((probs >= 0) & (probs <= 1)).all()
    by_id = {r["utt_id"]: r for r in labels.iter_rows(named=True)}
    assert by_id["o0"]["sentiment"] > 0 and by_id["t3_p"]["sentiment"] < 0
    # the post's text mentions family and a job: its strongest values are among a plausible few
    top = value_names()[int(np.argmax(by_id["t3_p"]["values"]))]
    assert top in {"Security: personal", "Benevolence: caring", "Achievement", "Power: resources", "Self-direction: action"}
    stats = json.loads(out["stats"].read_text())
    assert stats["utterances"] == 11 and stats["cached_utterances"] == 0
    assert len(list((tmp_path / "label" / "chunks").glob("*.parquet"))) == 3
    again = json.loads(label_threads(threads, tmp_path / "label", cfg, detector=detector, scorer=scorer)["stats"].read_text())
    assert again["cached_utterances"] == 11 and again["new_utterances"] == 0
    assert pl.read_parquet(out["labels"]).equals(labels)


def test_label_threads_labels_only_new_utterances_whatever_their_order(tmp_path: Path, default_labelers):
    """A new dump's threads come first here: every utterance moves, yet only the new ones are labelled."""
    detector, scorer = default_labelers
    cfg = LabelConfig(chunk_size=4, progress=False)
    first = label_threads(write_threads(tmp_path / "threads.parquet"), tmp_path / "label", cfg, detector=detector, scorer=scorer)
    before = read_labels(first["labels"])
    grown = pl.read_parquet(write_threads(tmp_path / "grown.parquet", n_threads=5)).reverse()  # p_4, p_3 first
    grown.write_parquet(tmp_path / "grown.parquet")

    out = label_threads(tmp_path / "grown.parquet", tmp_path / "label", cfg, detector=detector, scorer=scorer)
    stats = json.loads(out["stats"].read_text())
    assert (stats["utterances"], stats["new_utterances"], stats["cached_utterances"]) == (15, 4, 11)
    labels = read_labels(out["labels"])
    assert labels["utt_id"].to_list() == collect_utterances(tmp_path / "grown.parquet")["utt_id"].to_list()
    reused = labels.join(before, on="utt_id", suffix="_before")
    assert reused.height == 11 and (reused["valence"] == reused["valence_before"]).all()

    # an utterance whose text changed (an edited comment) is labelled again, the rest reused
    edited = grown.with_columns(
        pl.col("turns").list.eval(
            pl.when(pl.element().struct.field("utt_id") == "o1")
            .then(pl.element().struct.with_fields(pl.lit("I am furious, nothing helps.").alias("text")))
            .otherwise(pl.element())
        )
    )
    edited.write_parquet(tmp_path / "edited.parquet")
    stats = json.loads(
        label_threads(tmp_path / "edited.parquet", tmp_path / "label", cfg, detector=detector, scorer=scorer)["stats"].read_text()
    )
    assert (stats["new_utterances"], stats["cached_utterances"]) == (1, 14)


class _Retrained:
    """The same detector under another identity: what a retrained value head looks like to the store."""

    def __init__(self, detector):
        self._detector = detector

    def __getattr__(self, name):
        return getattr(self._detector, name)

    @property
    def fingerprint(self) -> str:
        return self._detector.fingerprint + ":retrained"


def test_a_changed_labeler_labels_everything_again(tmp_path: Path, default_labelers):
    detector, scorer = default_labelers
    threads = write_threads(tmp_path / "threads.parquet")
    cfg = LabelConfig(chunk_size=4, progress=False)
    label_threads(threads, tmp_path / "label", cfg, detector=detector, scorer=scorer)
    out = label_threads(threads, tmp_path / "label", cfg, detector=_Retrained(detector), scorer=scorer)
    stats = json.loads(out["stats"].read_text())
    assert (stats["new_utterances"], stats["cached_utterances"]) == (11, 0)
    # both labelers' stores live side by side: going back to the first relabels nothing
    back = json.loads(label_threads(threads, tmp_path / "label", cfg, detector=detector, scorer=scorer)["stats"].read_text())
    assert back["cached_utterances"] == 11


def test_validate_labels_names_the_column():
    bad = pl.DataFrame({"utt_id": ["a"], "valence": [0.5], "sentiment": [1], "values": [[0.1] * 20]})
    with pytest.raises(ValueError, match="'valence' has type"):
        validate_labels(bad, "x.parquet")
    short = pl.DataFrame(
        {"utt_id": ["a"], "valence": [0.5], "sentiment": [1], "values": [[0.1] * 3]},
        schema=LABELS_SCHEMA,
    )
    with pytest.raises(ValueError, match="20 probabilities"):
        validate_labels(short, "x.parquet")


def test_label_flow_is_cached_and_logged(prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from esvr.flows.label import label_flow

    # mlflow.set_tracking_uri (here and in other tests) exports MLFLOW_TRACKING_URI, which the
    # flows prefer over the run folder: start from none, and leave none behind
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    threads = write_threads(tmp_path / "threads.parquet")
    config = load_config(None, [f"run.out_dir={tmp_path / 'run'}", "run.experiment=label-test", "label.progress=false"])
    result = label_flow(config, threads)
    labels = read_labels(result["labels"])
    assert labels.height == 11

    def no_labelers(config):
        raise AssertionError("a cache hit must not load the labelers")

    monkeypatch.setattr("esvr.flows.label.labelers", no_labelers)
    again = label_flow(config, threads, return_state=True)
    assert again.is_completed() and again.result()["labels"] == result["labels"]

    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def task_state() -> str:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[again.state_details.flow_run_id]))
            )
            return [r.state.name for r in runs if r.name.startswith("label_task")][0]

    assert asyncio.run(task_state()) == "Cached"
    mlflow.set_tracking_uri(f"sqlite:///{(tmp_path / 'run').resolve() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["label-test"], filter_string="tags.`esvr.stage` = 'label'")
    assert len(runs) == 2 and (runs["metrics.label.utterances"] == 11).all()
    assert (runs["params.label.values.backend"] == "embedding").all()


def _emollama_reply(request: dict) -> str:
    """EmoLLMs' two task formats: a valence score and an ordinal class, positive for thanks."""
    content = request["messages"][-1]["content"]
    positive = "Thank" in content
    if "Intensity Score:" in content:
        return "0.8" if positive else "0.2"
    if "Intensity Class:" in content:
        return "2: moderately positive mental state can be inferred" if positive else "-2: moderately negative"
    return "?"


def test_label_flow_with_the_emollama_backend(prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The emollama scorer's chat model comes from the run's shared pool, over real HTTP."""
    from stub_server import StubServer

    from esvr.flows.label import label_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    threads = write_threads(tmp_path / "threads.parquet")
    with StubServer(reply=_emollama_reply) as server:
        config = load_config(
            None,
            [
                f"run.out_dir={tmp_path / 'run'}",
                "run.experiment=label-emollama",
                "label.progress=false",
                "label.emotion.backend=emollama",
                "label.emotion.model.spec=openai:emollama",
                f"label.emotion.model.base_url={server.base_url}",
            ],
        )
        result = label_flow(config, threads)
        calls = server.calls
    labels = read_labels(result["labels"])
    by_id = {r["utt_id"]: r for r in labels.iter_rows(named=True)}
    assert labels.height == 11
    assert by_id["o0"]["sentiment"] == 2 and by_id["o0"]["valence"] == pytest.approx(0.8)
    assert by_id["t3_p"]["sentiment"] == -2 and by_id["t3_p"]["valence"] == pytest.approx(0.2)
    assert calls == 22  # a valence and a class prompt per unique utterance
    # both EmoLLMs formats, in their transcript wrapping (the two prompts of a text go out concurrently)
    prompts = [r["messages"][0]["content"] for r in server.requests]
    assert sum(p.startswith("Human: \nTask: Evaluate the valence") for p in prompts) == 11
    assert sum(p.startswith("Human: \nTask: Categorize the text into an ordinal class") for p in prompts) == 11
    stats = json.loads(Path(result["label_stats"]).read_text())
    assert stats["parse_failures_valence"] == 0 and stats["parse_failures_sentiment"] == 0
    # the replies went to the run folder's response cache (one entry per distinct text and prompt)
    from esvr.models.chat import ResponseCache

    distinct = len({r["messages"][0]["content"] for r in server.requests})
    assert distinct == 14 and len(ResponseCache(tmp_path / "run" / "cache" / "responses.sqlite")) == distinct


def test_bench_label_prints_its_figure_last(tmp_path: Path):
    from esvr.tasks.bench.label import bench_label, reddit_like_texts

    texts = reddit_like_texts(200)
    words = sorted(len(t.split()) for t in texts)
    assert 25 <= words[100] <= 60 and words[-1] <= 400
    lines: list[str] = []
    rate = bench_label(n=24, backends=("embedding", "vader"), print_fn=lines.append)
    assert lines[0].startswith("machine: ") and "cores usable" in lines[0]
    assert any(line.startswith("emotion scorer (vader): ") for line in lines)
    assert lines[-1].startswith(f"label: {rate:.1f} utterances/s") and rate > 0
    lines.clear()
    bench_label(n=5, threads_path=write_threads(tmp_path / "threads.parquet"), backends=(), print_fn=lines.append)
    assert "5 utterances of" in lines[1] and lines[-1].startswith("label: ")
