"""The scheduled scan's downstream half in one process: new dumps are labelled alone, the datasets
rebuilt, and nothing runs when nothing is new. (The deployed form, with training on the gpu pool's
deployments, is tests/test_integration_deploy.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from conftest import ONE_STEP_TRAINING, demo_recipe

from esvr.flows.config import load_config
from esvr.flows.ingest import ingest_new_dumps
from esvr.flows.refresh import RefreshError, datasets_digest, dump_tags, refresh_flow
from esvr.tasks.reddit.sample_dump import make_sample_dump


def test_new_dumps_are_labelled_alone_and_rebuild_the_datasets(prefect_harness, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dumps = tmp_path / "dumps"
    make_sample_dump(dumps, months=["2021-06"], posts=40)
    recipe = demo_recipe(tmp_path / "recipe.yaml", tmp_path / "run", dumps, run={"experiment": "rerun-test"})
    run = tmp_path / "run"

    def label_stats() -> dict:
        return json.loads((run / "label" / "label_stats.json").read_text())

    first = ingest_new_dumps(None, str(recipe), 0, "none")
    assert Path(first["datasets_manifest"]).is_file()
    first_ids = set(pl.read_parquet(first["labels"])["utt_id"].to_list())
    assert label_stats()["new_utterances"] == len(first_ids) > 0
    first_datasets = datasets_digest(run / "datasets")

    newer = tmp_path / "newer"
    make_sample_dump(newer, months=["2021-06", "2021-07"], posts=80, seed=1)
    for name in ("RS_2021-07.zst", "RC_2021-07.zst"):
        shutil.copy(newer / name, dumps / name)
    second = ingest_new_dumps(None, str(recipe), 0, "none")
    second_ids = set(pl.read_parquet(second["labels"])["utt_id"].to_list())
    stats = label_stats()
    assert stats["new_utterances"] == len(second_ids - first_ids) > 0
    assert stats["cached_utterances"] == len(first_ids)
    assert datasets_digest(run / "datasets") != first_datasets
    assert dump_tags(run / "ingest", ["RS_2021-07.zst", "RC_2021-07.zst"]) == {
        "esvr.dumps": "RC_2021-06.zst,RC_2021-07.zst,RS_2021-06.zst,RS_2021-07.zst",
        "esvr.new_dumps": "RC_2021-07.zst,RS_2021-07.zst",
    }

    # nothing new: the scan stops there
    assert ingest_new_dumps(None, str(recipe), 0, "none") == {}
    assert label_stats() == stats

    # unchanged datasets train nothing (training on deployments would need the recipe file here)
    config = load_config(recipe)
    assert "labels" in refresh_flow(config, second["threads"], [], None, "deployments")
    elsewhere = load_config(recipe, [f"run.out_dir={tmp_path / 'elsewhere'}"])  # datasets new there
    with pytest.raises(RefreshError, match="needs the recipe file"):
        refresh_flow(elsewhere, second["threads"], [], None, "deployments")


def test_a_scan_that_starts_while_another_is_at_work_does_nothing(prefect_harness, tmp_path: Path):
    from esvr.flows.runtime import run_folder_lock

    dumps = tmp_path / "dumps"
    make_sample_dump(dumps, months=["2021-06"], posts=20)
    recipe = demo_recipe(tmp_path / "recipe.yaml", tmp_path / "run", dumps)
    with run_folder_lock(tmp_path / "run", shared=False):  # the scan before it, still labelling
        assert ingest_new_dumps(None, str(recipe), 0, "none") == {}
    assert not (tmp_path / "run" / "ingest").exists()


def test_a_scan_that_trains_here_logs_component_runs_tagged_with_its_dumps(prefect_harness, tmp_path: Path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dumps = tmp_path / "dumps"
    make_sample_dump(dumps, months=["2021-06"], posts=60)
    recipe = demo_recipe(
        tmp_path / "recipe.yaml",
        tmp_path / "run",
        dumps,
        run={"experiment": "train-here"},
        **ONE_STEP_TRAINING,
    )
    result = ingest_new_dumps(None, str(recipe), 0, "here")
    assert {"tvd", "rg"} <= result.keys()
    ml = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    experiment = ml.get_experiment_by_name("train-here")
    for component in ("tvd", "rg"):
        trained = ml.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`esvr.component` = '{component}' and tags.`esvr.training_stage` = 'sft'",
        )
        assert [r.data.tags["esvr.new_dumps"] for r in trained] == ["RC_2021-06.zst,RS_2021-06.zst"], component
        assert trained[0].info.status == "FINISHED"
