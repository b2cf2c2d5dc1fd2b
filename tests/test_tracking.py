"""What a flow run logs to MLflow: the whole config at the top, a section when nested, usage counters."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlflow
from mlflow.tracking import MlflowClient

from esvr.flows import tracking
from esvr.flows.config import flatten, load_config
from esvr.models.chat import Usage


def test_a_run_logs_every_param_of_its_config_past_mlflows_batch_size(tmp_path: Path):
    config = load_config(None, [f"run.out_dir={tmp_path}"])
    expected = tracking.safe_params(flatten(config))
    assert len(expected) > 100  # more than one MLflow batch
    with tracking.flow_run("pipeline", config) as top:
        with tracking.flow_run("simulate", config, section="simulate") as nested:
            pass
    client = MlflowClient()
    assert client.get_run(top.info.run_id).data.params == expected
    section = {k: v for k, v in expected.items() if k.startswith("simulate.")}
    assert section and client.get_run(nested.info.run_id).data.params == section


def test_usage_of_every_model_is_logged(tmp_path: Path):
    config = load_config(None, [f"run.out_dir={tmp_path}"])
    models = {"judge": SimpleNamespace(usage=Usage(calls=3, retries=1)), "openai:a/b": SimpleNamespace(usage=Usage(failures=2))}
    with tracking.flow_run("evaluate", config) as run:
        tracking.log_usage(models)
    metrics = MlflowClient().get_run(run.info.run_id).data.metrics
    assert metrics["usage.judge.calls"] == 3 and metrics["usage.judge.retries"] == 1
    assert metrics["usage.openai_a_b.failures"] == 2
    assert len(metrics) == 2 * len(Usage().as_metrics(""))
    assert mlflow.active_run() is None
