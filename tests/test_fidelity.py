"""Table 29's simulator fidelity: reference rows, null intervals, checks before spending, tables
written as each is computed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from esvr.models.emotion import VaderEmotionScorer
from esvr.tasks.common.esconv import load_esconv
from esvr.tasks.evaluation.evaluate import FidelityConfig
from esvr.tasks.evaluation.fidelity import (
    CONSTANT_REPLY,
    Candidate,
    Scorers,
    bertscore_f1,
    null_interval,
    reference_replies,
    run_simulator_fidelity,
    seeker_cases,
)

FIXTURES = Path(__file__).parent / "fixtures"


def _openai(server, name: str = "stub"):
    from esvr.models.openai_backend import OpenAIChat

    return OpenAIChat(name, base_url=server.base_url, max_retries=1)


@pytest.fixture(scope="module")
def instruments():
    from esvr.models.value_detector import SentenceEncoder, ValueDetectorConfig, load_value_detector

    return load_value_detector(ValueDetectorConfig()), SentenceEncoder()


def _scorers(instruments, judge=None) -> Scorers:
    detector, encoder = instruments
    return Scorers(emotion=VaderEmotionScorer(), detector=detector, encoder=encoder, judge=judge)


def test_null_interval_holds_chance_and_excludes_a_real_correlation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=80)
    lo, hi = null_interval(x, x + rng.normal(scale=0.3, size=80))
    assert -0.4 < lo < 0 < hi < 0.4  # unrelated pairings of 80 values stay near 0
    assert null_interval([1, 1, 1, 1], [1, 2, 3, 4]) is None  # rho undefined: no interval either


def test_bertscore_matches_identical_and_separates_unrelated(instruments):
    from esvr.tasks.evaluation.fidelity import token_embeddings

    _, encoder = instruments
    a, b, c = token_embeddings(encoder, ["I lost my job last week.", "I lost my job last week.", "The weather is sunny."])
    assert bertscore_f1(a, b) == pytest.approx(1.0, abs=1e-5)
    assert bertscore_f1(a, c) < 0.8
    assert bertscore_f1(a, a[:0]) == 0.0


def test_a_column_a_reference_row_wins_cannot_rank():
    from esvr.tasks.evaluation.fidelity import uninformative_columns

    def row(kind: str, **m: float) -> dict:
        return {"kind": kind, "metrics": m}

    rows = [
        row("reference", value_cosine=0.9, value_euclidean=0.2, bertscore_f1=0.3),
        row("simulator", value_cosine=0.8, value_euclidean=0.5, bertscore_f1=0.4),
        row("simulator", value_cosine=0.7, value_euclidean=0.1, bertscore_f1=0.35),
    ]
    # cosine: the reference is best; distance: lower is better and a simulator wins; BERTScore: a simulator wins
    assert uninformative_columns(rows) == ["value_cosine"]


def test_reference_replies_never_give_a_case_its_own_turn():
    cases = seeker_cases(load_esconv(FIXTURES / "esconv_sample.json"), None, None)
    refs = reference_replies(cases)
    assert all(s != c["real"] for s, c in zip(refs["Shuffled real replies"], cases))
    assert sorted(refs["Shuffled real replies"]) == sorted(c["real"] for c in cases)
    assert refs["Repeat the supporter"][0] == cases[0]["context"][-1][1]
    assert set(refs["Constant reply"]) == {CONSTANT_REPLY}


@pytest.mark.slow  # loads the sentence encoder and the value detector
def test_table_has_reference_rows_intervals_and_the_judge_column(stub_server, instruments, tmp_path: Path):
    def reply(req):
        text = req["messages"][-1]["content"]
        if "Simulated answer" in text:
            return "4"
        last = req["messages"][-1]["content"].split()
        return f"I am still worried, {' '.join(last[: 2 + len(last) % 7])}."  # lengths vary with the context

    stub_server.reply = reply
    dialogues = load_esconv(FIXTURES / "esconv_sample.json")
    model = _openai(stub_server)
    candidates = [
        Candidate("stub", True, lambda: model, "one-shot"),
        Candidate("stub", False, lambda: model, "zero-shot"),
        Candidate("stub-ft", False, lambda: model, "fine-tuned"),
    ]
    result = run_simulator_fidelity(
        dialogues, FidelityConfig(), candidates, _scorers(instruments, judge=model), tmp_path, source="sample"
    )
    rows = {(r["model"], r["prompt"]): r for r in result["simulators"]}
    assert [r["kind"] for r in result["simulators"]] == ["reference"] * 3 + ["simulator"] * 3
    assert ("Repeat the supporter", "reference") in rows and ("stub-ft", "fine-tuned") in rows
    sim = rows[("stub", "one-shot")]
    assert sim["n"] == 9 and sim["metrics"]["judge_content"] == 4.0 and sim["metrics"]["judge_content_parsed"] == 9
    assert 0 < sim["metrics"]["bertscore_f1"] <= 1
    lo, hi = sim["null_95"]["length_corr"]
    assert -1 <= lo < hi <= 1
    assert rows[("Constant reply", "reference")]["metrics"]["v_oc_corr"] is None  # a constant has no correlation
    # greedy, one seed: a local backend batches them (it groups requests by seed)
    assert len({r.get("seed") for r in stub_server.requests}) == 1
    zero_shot_systems = [r["messages"][0]["content"] for r in stub_server.requests if r["messages"][0]["role"] == "system"]
    assert any("example" not in s.lower() for s in zero_shot_systems)
    assert any("Your situation: I might lose my job because of layoffs." in s for s in zero_shot_systems)
    md = (tmp_path / "fidelity.md").read_text()
    assert "| Constant reply | reference | 9 |" in md and "| stub-ft | fine-tuned | 9 |" in md
    assert "[" in md.split("| stub | one-shot |")[1].split("\n")[0]  # the correlation's null interval
    weak = result["uninformative_columns"]
    assert ("cannot rank the simulators" in md) == bool(weak)
    assert json.loads((tmp_path / "fidelity.json").read_text())["uninformative_columns"] == weak


@pytest.mark.slow
def test_inputs_are_checked_before_any_request(stub_server, instruments, tmp_path: Path, caplog):
    stub_server.reply = lambda req: "I still feel bad."
    model = _openai(stub_server)
    candidates = [Candidate("stub", True, lambda: model, "one-shot")]
    only_supporter = tmp_path / "supporter_only.json"
    only_supporter.write_text(json.dumps([{"dialog": [{"speaker": "sys", "text": "Hello."}]}]))
    with pytest.raises(ValueError, match="no seeker turn after a supporter turn"):
        run_simulator_fidelity(
            load_esconv(only_supporter),
            FidelityConfig(),
            candidates,
            _scorers(instruments),
            tmp_path / "a",
            source="x",
            intensity_judge=lambda: model,
        )
    assert stub_server.requests == []
    # no survey intensities: Table 11 is skipped with one warning, Table 29 still runs and is written
    unrated = [json.loads(line) for line in [json.dumps(d) for d in json.loads((FIXTURES / "esconv_sample.json").read_text())]]
    for d in unrated:
        d.pop("survey_score", None)
    path = tmp_path / "unrated.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in unrated))

    def never() -> None:
        raise AssertionError("the intensity judge was built although no dialogue is rated")

    with caplog.at_level(logging.WARNING, logger="esvr.tasks.evaluation.fidelity"):
        result = run_simulator_fidelity(
            load_esconv(path),
            FidelityConfig(),
            candidates,
            _scorers(instruments),
            tmp_path / "b",
            source=str(path),
            intensity_judge=never,
        )
    assert "intensity" not in result
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("ES-Intensity" in w for w in warnings) == 1
    md = (tmp_path / "b" / "fidelity.md").read_text()
    assert "Skipped: ES-Intensity (Table 11)" in md and "| stub | one-shot |" in md


@pytest.mark.slow
def test_each_table_is_written_before_the_next_row_runs(stub_server, instruments, tmp_path: Path):
    stub_server.reply = lambda req: "I am scared of losing everything."
    model = _openai(stub_server)

    def broken():
        raise RuntimeError("the second simulator's server is down")

    candidates = [Candidate("stub", True, lambda: model, "one-shot"), Candidate("down", True, broken, "one-shot")]
    with pytest.raises(RuntimeError, match="server is down"):
        run_simulator_fidelity(
            load_esconv(FIXTURES / "esconv_sample.json"),
            FidelityConfig(),
            candidates,
            _scorers(instruments),
            tmp_path,
            source="sample",
        )
    md = (tmp_path / "fidelity.md").read_text()
    assert "| Shuffled real replies | reference |" in md and "| stub | one-shot |" in md and "| down |" not in md


@pytest.mark.slow
def test_the_command_writes_both_tables_and_logs_them(prefect_harness, stub_server, tmp_path: Path, monkeypatch):
    import mlflow

    from esvr.flows.config import load_config
    from esvr.flows.evaluate import simulator_fidelity_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def reply(req):
        text = req["messages"][-1]["content"]
        if req.get("logprobs"):
            return '<dist>{"The patient shows a low amount of negative emotion.": 1.0}'
        if "Simulated answer" in text:
            return "3"
        return f"I keep thinking about {' '.join(text.split()[:3])}."

    stub_server.reply = reply
    model = {"spec": "openai:stub", "base_url": stub_server.base_url, "max_retries": 1}
    config = load_config(
        Path(__file__).parents[1] / "configs" / "demo.yaml",
        [f"run.out_dir={tmp_path / 'run'}", "run.experiment=fidelity-test", "evaluate.fidelity.zero_shot=false"],
    )
    config.models.seeker = model
    config.models.judge = model
    out = simulator_fidelity_flow(config, FIXTURES / "esconv_sample.json")
    md = Path(out["fidelity"]).read_text()
    assert "| Repeat the supporter | reference | 9 |" in md and "| openai:stub | one-shot | 9 |" in md
    assert "ES-Intensity predictor (paper Table 11)" in md and "| 3.00 |" in md  # the judge's content column
    mlflow.set_tracking_uri(f"sqlite:///{(tmp_path / 'run').resolve() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fidelity-test"])
    assert runs["metrics.fidelity.openai-stub-one-shot.judge_content"].iloc[0] == 3.0
    assert "metrics.fidelity.constant-reply-reference.value_cosine" in runs
