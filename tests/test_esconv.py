"""ESConv loading and the paper's §3.2 analysis, with statistics checked by hand on a fixture."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import shared_data

from esvr.prompts import value_names
from esvr.tasks.common.esconv import LoadReport, load_esconv
from esvr.tasks.labeling.analyze_esconv import (
    HIGH,
    LOW,
    AnalyzeESConvConfig,
    SeekerTurns,
    analyze_esconv,
    group_statistics,
    mann_whitney,
    plot_figure,
    split_groups,
)


def _dialog(names: tuple[str, str], initial, final, turns: list[tuple[int, str]]) -> dict:
    seeker, supporter = names
    survey = {"seeker": {}, "supporter": {}}
    if initial is not None:
        survey["seeker"]["initial_emotion_intensity"] = initial
    if final is not None:
        survey["seeker"]["final_emotion_intensity"] = final
    return {
        "experience_type": "Current Experience",
        "emotion_type": "sadness",
        "problem_type": "job crisis",
        "situation": "lost my job",
        "survey_score": survey,
        "dialog": [{"speaker": seeker if who == 0 else supporter, "annotation": {}, "content": text} for who, text in turns],
    }


@pytest.fixture()
def esconv_file(tmp_path: Path) -> Path:
    turns = [(0, "Hi"), (0, "I lost my job."), (1, "I am sorry."), (0, "Thank you, I feel better now."), (1, "Good!")]
    data = [
        _dialog(("seeker", "supporter"), "5", "1", turns),  # high
        _dialog(("speaker", "listener"), "5", "2", turns),  # high
        _dialog(("usr", "sys"), "5", "4", turns),  # low
        _dialog(("Seeker", "Supporter"), "5", "3", turns),  # low
        _dialog(("seeker", "supporter"), "5", "5", turns),  # outside both groups
        _dialog(("seeker", "supporter"), "4", "1", turns),  # other initial intensity
        _dialog(("seeker", "supporter"), "5", None, turns),  # missing final
        _dialog(("seeker", "supporter"), None, "2", turns),  # missing initial
        _dialog(("seeker", "supporter"), "5", "n/a", turns),  # unparsable final
    ]
    data[0]["dialog"][2]["annotation"] = {"strategy": "Reflection of feelings"}
    data[0]["dialog"][1]["annotation"] = {"feedback": "4"}
    path = tmp_path / "esconv.json"
    path.write_text(json.dumps(data))
    return path


def test_load_normalizes_speakers_and_survey(esconv_file: Path):
    report = LoadReport()
    dialogues = load_esconv(esconv_file, report)
    assert len(dialogues) == 9 and report.dialogues == 9
    for d in dialogues[:4]:
        assert [u.role for u in d.utterances] == ["seeker", "seeker", "supporter", "seeker", "supporter"]
        assert d.seeker_turns() == ["Hi I lost my job.", "Thank you, I feel better now."]
        assert d.turns()[1] == ("supporter", "I am sorry.")
    d0 = dialogues[0]
    assert (d0.initial_intensity, d0.final_intensity) == (5, 1)
    assert d0.utterances[2].strategy == "Reflection of feelings" and d0.utterances[1].feedback == 4
    assert dialogues[6].final_intensity is None and dialogues[8].final_intensity is None
    assert report.missing_survey["final_emotion_intensity"] == 2
    assert report.missing_survey["initial_emotion_intensity"] == 1
    assert report.missing_survey["empathy"] == 9  # absent everywhere in the fixture: counted, not fatal
    assert load_esconv(esconv_file.parent)[0].dialog_id == "0"  # a folder holding the file works too


def test_load_errors_name_the_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_esconv(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="not found: external/ESConv.json"):
        load_esconv("external/ESConv.json")  # a relative path, not a hub dataset id
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_esconv(bad)


def test_load_json_lines_with_usr_sys_and_turn_strategies(tmp_path: Path):
    # the shape PPDPP and thu-coai/esconv distribute: one dialogue per line, strategy on the turn
    lines = [
        {
            "emotion_type": "anxiety",
            "problem_type": "job crisis",
            "situation": "I am on short term disability and afraid I will lose my job.",
            "survey_score": {"seeker": {"initial_emotion_intensity": "5", "final_emotion_intensity": "2"}},
            "dialog": [
                {"text": "Hello good afternoon.", "speaker": "usr"},
                {"text": "Hi, good afternoon.", "speaker": "sys", "strategy": "Question"},
                {"text": "I'm anxious that I will lose my job.", "speaker": "usr"},
                {"text": "Losing a job is frightening.", "speaker": "sys", "strategy": ["Reflection of feelings"]},
            ],
        },
        {
            "emotion_type": "sadness",
            "problem_type": "breakup with partner",
            "situation": "My girlfriend left me.",
            "dialog": [
                {"text": "She left me last week.", "speaker": "usr"},
                {"text": "I am so sorry.", "speaker": "sys", "strategy": "Affirmation and Reassurance"},
            ],
        },
    ]
    path = tmp_path / "train.txt"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    report = LoadReport()
    dialogues = load_esconv(path, report)
    assert [d.problem_type for d in dialogues] == ["job crisis", "breakup with partner"]
    d0 = dialogues[0]
    assert [u.role for u in d0.utterances] == ["seeker", "supporter", "seeker", "supporter"]
    assert [u.strategy for u in d0.utterances] == [None, "Question", None, "Reflection of feelings"]
    assert (d0.initial_intensity, d0.final_intensity) == (5, 2)
    assert dialogues[1].utterances[1].strategy == "Affirmation and Reassurance"
    assert report.dialogues == 2 and not report.unknown_speakers
    assert report.missing_survey["final_emotion_intensity"] == 1
    # a folder holding only a .jsonl file; one dialogue alone on its line is a file too
    folder = tmp_path / "esconv"
    folder.mkdir()
    (folder / "esconv.jsonl").write_text(json.dumps(lines[1]) + "\n")
    assert [d.situation for d in load_esconv(folder)] == ["My girlfriend left me."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_esconv(bad)


def test_split_groups(esconv_file: Path):
    groups, skipped = split_groups(load_esconv(esconv_file), AnalyzeESConvConfig())
    assert [d.dialog_id for d in groups[HIGH]] == ["0", "1"]
    assert [d.dialog_id for d in groups[LOW]] == ["2", "3"]
    assert skipped == {
        "final_intensity_outside_groups": 1,
        "other_initial_intensity": 1,
        "missing_final_intensity": 2,
        "missing_initial_intensity": 1,
    }


def test_analysis_without_survey_intensities_fails_naming_the_file_that_has_them(tmp_path: Path):
    turns = [(0, "I lost my job."), (1, "I am sorry."), (0, "Thanks.")]
    path = tmp_path / "esconv.jsonl"
    path.write_text("\n".join(json.dumps(_dialog(("usr", "sys"), None, None, turns)) for _ in range(3)))
    # the labelers are never reached: the load already shows there is nothing to compare
    with pytest.raises(ValueError) as exc:
        analyze_esconv(path, tmp_path / "out", AnalyzeESConvConfig(), None, None)  # type: ignore[arg-type]
    message = str(exc.value)
    assert "esconv.jsonl" in message and "'initial_emotion_intensity': 3" in message
    assert "ESConv.json of github.com/thu-coai/Emotional-Support-Conversation" in message
    assert not (tmp_path / "out" / "summary.json").exists()


# --------------------------------------------------------------------------------------------
# statistics by hand
# --------------------------------------------------------------------------------------------


def _row(**probs: float) -> list[float]:
    row = [0.1] * 20
    for key, p in probs.items():
        row[int(key[1:])] = p
    return row


def _turns(dialog_id: str, group: str, rows: list[list[float]], sentiment: list[int]) -> SeekerTurns:
    # valence on the class's place of the 0..1 scale: classes >= 1 lie above 0.5, 0 on it
    valence = (np.array(sentiment) + 3) / 6
    return SeekerTurns(dialog_id, group, [f"t{i}" for i in range(len(rows))], np.array(rows), np.array(sentiment), valence)


@pytest.fixture()
def records() -> list[SeekerTurns]:
    return [
        # counts per value (threshold 0.5, positive = valence > 0.5, i.e. class >= 1 here):
        _turns("h1", HIGH, [_row(v0=0.9, v1=0.6), _row(v0=0.8)], [2, -1]),  # v0 1, v1 1 -> 2
        _turns("h2", HIGH, [_row(v0=0.7), _row(v0=0.9, v2=0.95)], [1, 3]),  # v0 2, v2 1 -> 3
        _turns("h3", HIGH, [_row(v0=0.6, v1=0.7), _row(v0=0.6, v3=0.8)], [1, 1]),  # v0 2, v1 1, v3 1 -> 4
        _turns("l1", LOW, [_row(v0=0.9), _row(v1=0.2)], [-2, 0]),  # nothing positive -> 0
        _turns("l2", LOW, [_row(v0=0.8)], [1]),  # v0 1 -> 1
    ]


def test_group_statistics_by_hand(records: list[SeekerTurns]):
    stats = group_statistics(records, threshold=0.5, cfg=AnalyzeESConvConfig())
    assert stats["n"] == {HIGH: 3, LOW: 2}
    assert stats["mean_positive_values"] == {HIGH: pytest.approx(3.0), LOW: pytest.approx(0.5)}
    assert stats["positive_turn_share"][HIGH] == pytest.approx(5 / 6)
    assert stats["positive_turn_share"][LOW] == pytest.approx(1 / 3)
    # totals high [2, 3, 4] vs low [0, 1]: every high beats every low, U = 6; exact two-sided p = 2/10
    assert stats["total_test"]["U"] == pytest.approx(6.0)
    assert stats["total_test"]["p"] == pytest.approx(0.2)
    rows = {r["value"]: r for r in stats["values"]}
    v = value_names()
    # v0: high [1, 2, 2] vs low [0, 1]: U = 1 + 0.5 + 2 * 2 = 5.5
    assert rows[v[0]]["mean_high"] == pytest.approx(5 / 3) and rows[v[0]]["mean_low"] == pytest.approx(0.5)
    assert rows[v[0]]["U"] == pytest.approx(5.5)
    # v1: high [1, 0, 1] vs low [0, 0]: U = 2 * 2 + 2 * 0.5 = 5
    assert rows[v[1]]["U"] == pytest.approx(5.0) and rows[v[1]]["mean_high"] == pytest.approx(2 / 3)
    # a value nobody expresses: U = n1 n2 / 2, p = 1, not significant
    assert rows[v[19]]["U"] == pytest.approx(3.0) and rows[v[19]]["p"] == 1.0 and not rows[v[19]]["significant"]
    # per turn, aligned at the end; non-positive turns count 0
    assert stats["turn_positions"] == [-4, -3, -2, -1]
    high_last = stats["per_turn_mean_prob"][HIGH][3]
    assert high_last[0] == pytest.approx((0 + 0.9 + 0.6) / 3)
    assert stats["per_turn_mean_prob"][LOW][3][0] == pytest.approx((0 + 0.8) / 2)
    assert stats["per_turn_mean_prob"][LOW][2][0] == pytest.approx(0.0)  # only l1 has a 2nd-last turn, negative
    assert all(math.isnan(x) for x in stats["per_turn_mean_prob"][HIGH][0])  # nobody has 4 turns


def test_mann_whitney_matches_scipy_and_edge_cases():
    assert mann_whitney([1, 2, 3], [4, 5]) == (pytest.approx(0.0), pytest.approx(0.2))
    u, p = mann_whitney([], [1])
    assert math.isnan(u) and math.isnan(p)


def test_figure_is_written(records: list[SeekerTurns], tmp_path: Path):
    stats = group_statistics(records, threshold=0.5, cfg=AnalyzeESConvConfig())
    path = plot_figure(stats, tmp_path / "fig.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# the whole analysis with the default labelers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelers():
    from esvr.models.emotion import EmotionConfig, load_emotion_scorer
    from esvr.models.value_detector import ValueDetectorConfig, load_value_detector

    return load_value_detector(ValueDetectorConfig()), load_emotion_scorer(EmotionConfig())


def test_analysis_on_failed_esconv(labelers, tmp_path: Path):
    path = shared_data("esconv", "FailedESConv.json")
    paths = analyze_esconv(path, tmp_path, AnalyzeESConvConfig(), *labelers)
    stats = json.loads(paths["summary"].read_text())
    # initial 5: final 1 (4) + final 2 (2) -> high 6; final 3 (2) + final 4 (5) -> low 7
    assert stats["n"] == {HIGH: 6, LOW: 7}
    assert stats["dialogues"] == 196
    assert stats["skipped"]["missing_final_intensity"] == 23
    assert stats["skipped"]["final_intensity_outside_groups"] == 34  # 5 -> 5
    assert len(stats["values"]) == 20 and all(0 <= r["p"] <= 1 for r in stats["values"])
    turns = pl.read_parquet(paths["turns"])
    assert turns["dialog_id"].n_unique() == 13 and turns["position"].max() == -1 and turns["position"].min() >= -4
    assert pl.read_csv(paths["table_csv"]).height == 20
    assert paths["figure"].stat().st_size > 10_000
    assert "Mann-Whitney" in paths["table_md"].read_text()


def test_analyze_esconv_flow_logs_table_and_figure(prefect_harness, esconv_file: Path, tmp_path: Path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # see test_label_flow.py

    from esvr.flows.analyze_esconv import analyze_esconv_flow
    from esvr.flows.config import load_config

    config = load_config(None, [f"run.out_dir={tmp_path / 'run'}", "run.experiment=esconv-test"])
    result = analyze_esconv_flow(config, str(esconv_file))
    assert Path(result["esconv_figure"]).is_file()
    summary = json.loads(Path(result["esconv_summary"]).read_text())
    assert summary["n"] == {HIGH: 2, LOW: 2} and summary["missing_survey_fields"]["final_emotion_intensity"] == 2
    mlflow.set_tracking_uri(f"sqlite:///{(tmp_path / 'run').resolve() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["esconv-test"], filter_string="tags.`esvr.stage` = 'analyze_esconv'")
    assert len(runs) == 1 and runs["metrics.esconv.n_high"].iloc[0] == 2
    assert runs["metrics.esconv.skipped.missing_final_intensity"].iloc[0] == 2
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(runs["run_id"].iloc[0], "analyze_esconv")}
    assert {"analyze_esconv/figure.png", "analyze_esconv/values.md", "analyze_esconv/values.csv"} <= logged
    with pytest.raises(FileNotFoundError, match="no ESConv given"):
        analyze_esconv_flow(config)
