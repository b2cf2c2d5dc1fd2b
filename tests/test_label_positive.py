"""'Positive' means one thing: label.emotion.positive_valence, read by the label statistics, the
ESConv analysis and the datasets' success rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from test_label_real_text import write_chains

from esvr.flows.config import ConfigError, load_config
from esvr.models.emotion import POSITIVE_VALENCE, EmotionConfig
from esvr.prompts import value_names
from esvr.tasks.components.datasets import DatasetsConfig
from esvr.tasks.labeling.analyze_esconv import HIGH, LOW, AnalyzeESConvConfig, SeekerTurns, group_statistics
from esvr.tasks.labeling.label import LabelConfig, label_threads, read_labels

REPO = Path(__file__).resolve().parents[1]


def test_one_key_and_no_other():
    assert EmotionConfig().positive_valence == POSITIVE_VALENCE == 0.5
    assert not [k for k in DatasetsConfig.model_fields if "valence" in k or "positive" in k]
    assert not [k for k in AnalyzeESConvConfig.model_fields if "valence" in k or "positive" in k or "sentiment" in k]
    # the old per-stage keys are refused with the key's name, not silently ignored
    for old in ("datasets.valence_threshold=0.5", "analyze_esconv.min_positive_sentiment=1"):
        with pytest.raises(ConfigError, match=old.split("=")[0].split(".")[1]):
            load_config(None, [old])


def test_paper_yaml_marks_the_key_as_the_projects_choice():
    text = (REPO / "configs" / "paper.yaml").read_text()
    assert yaml.safe_load(text)["label"]["emotion"]["positive_valence"] == 0.5
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("positive_valence:"))
    comment = " ".join(line.strip() for line in lines[max(0, at - 4) : at] if line.strip().startswith("#"))
    assert "project's choice" in comment


# --------------------------------------------------------------------------------------------
# the label statistics
# --------------------------------------------------------------------------------------------


def _threads(path: Path) -> Path:
    replies = [
        "Thank you so much, that really helps. I feel a lot better now!",
        "It helped a little, I guess.",
        "ok",
        "I hate this, everything is awful.",
    ]
    return write_chains(path, [("I failed my exam.", "You can retake it.", reply) for reply in replies])


def test_label_stats_count_positive_by_the_key(tmp_path: Path):
    from esvr.tasks.common.roles import labelers

    threads = _threads(tmp_path / "threads.parquet")
    detector, scorer = labelers(LabelConfig().values, LabelConfig().emotion)
    shares = {}
    for key in (0.5, 0.75):
        cfg = LabelConfig(progress=False, emotion=EmotionConfig(positive_valence=key))
        out = label_threads(threads, tmp_path / f"label{key}", cfg, detector=detector, scorer=scorer)
        valence = read_labels(out["labels"])["valence"].to_numpy()
        stats = json.loads(Path(out["stats"]).read_text())
        assert stats["positive_share"] == pytest.approx(float((valence > key).mean()), abs=1e-4)
        shares[key] = stats["positive_share"]
    assert shares[0.5] > shares[0.75]


# --------------------------------------------------------------------------------------------
# the ESConv analysis
# --------------------------------------------------------------------------------------------


def test_esconv_positive_turns_follow_the_valence_key_not_the_class():
    """EmoLlama answers valence and class separately and they can disagree: valence decides."""
    rows = np.full((2, 20), 0.1)
    rows[:, 0] = 0.9  # value 0 detected in both turns
    # turn 1: class 1 but valence 0.45; turn 2: class 0 but valence 0.7
    high = SeekerTurns("h", HIGH, ["a", "b"], rows, np.array([1, 0]), np.array([0.45, 0.7]))
    low = SeekerTurns("l", LOW, ["c"], rows[:1], np.array([2]), np.array([0.8]))
    stats = group_statistics([high, low], threshold=0.5, cfg=AnalyzeESConvConfig())
    assert stats["positive_valence"] == POSITIVE_VALENCE
    assert stats["positive_turn_share"] == {HIGH: 0.5, LOW: 1.0}
    assert stats["mean_positive_values"] == {HIGH: 1.0, LOW: 1.0}
    stricter = group_statistics([high, low], threshold=0.5, cfg=AnalyzeESConvConfig(), positive_valence=0.75)
    assert stricter["positive_turn_share"] == {HIGH: 0.0, LOW: 1.0}


# --------------------------------------------------------------------------------------------
# the datasets' success rule, through the flow
# --------------------------------------------------------------------------------------------


def _datasets_inputs(tmp: Path) -> tuple[Path, Path]:
    """Three posts, each OP reply at another valence: 0.55, 0.7, 0.9."""

    valences = {"o0": 0.55, "o1": 0.7, "o2": 0.9}
    threads = write_chains(tmp / "threads.parquet", [(f"text p{i}", f"text c{i}", f"text o{i}") for i in range(3)])
    probs = [0.9, 0.8, 0.7] + [0.01] * (len(value_names()) - 3)
    ids = [f"{k}{i}" for i in range(3) for k in ("p", "c", "o")]
    labels = tmp / "labels.parquet"
    pl.DataFrame(
        {
            "utt_id": ids,
            "valence": [valences.get(u, 0.3) for u in ids],
            "sentiment": [1 if u in valences else -1 for u in ids],
            "values": [probs] * len(ids),
        },
        schema={"utt_id": pl.String, "valence": pl.Float32, "sentiment": pl.Int8, "values": pl.List(pl.Float32)},
    ).write_parquet(labels)
    return threads, labels


def test_the_datasets_flow_takes_positive_from_the_label_section(
    prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from esvr.flows.build_datasets import build_datasets_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    threads, labels = _datasets_inputs(tmp_path)
    successes = {}
    for key in (0.5, 0.8):
        config = load_config(
            None,
            [
                f"run.out_dir={tmp_path / f'run{key}'}",
                "run.experiment=positive-test",
                f"label.emotion.positive_valence={key}",
                "datasets.settings=[single_turn]",
                "datasets.dev_size=0",
                "datasets.test_size=0",
            ],
        )
        result = build_datasets_flow(config, threads, labels)
        manifest = json.loads(Path(result["datasets_manifest"]).read_text())
        assert manifest["positive_valence"] == key
        successes[key] = manifest["stats"]["single_turn"]["success"]
    assert successes == {0.5: 3, 0.8: 1}
