"""MLflow helpers: one MLflow run per flow run, nested for sub-flows.

Each flow opens `flow_run(...)`; inside it, params (the flattened config), prompt files,
metrics and artifacts go to that run. Secrets never reach MLflow: config keys that look like
credentials are dropped, credentials inside URLs (``https://user:key@host``, ``?api-key=``) are
masked, and model configs only ever hold the *name* of the variable with the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from esvr.flows.config import PipelineConfig, flatten
from esvr.flows.runtime import default_tracking_uri
from esvr.models.redact import redact_urls
from esvr.prompts import PROMPTS_DIR
from esvr.tasks.common.paths import RunPaths

# The key's last part names a credential ("models.judge.api_key", "hub.token"); "max_tokens" or
# "api_key_env" (the variable's *name*) are ordinary settings.
_SECRET = re.compile(r"(?:^|[._])(api_?key|token|secret|password|passwd)$", re.IGNORECASE)
_MAX_PARAM_LEN = 500


# The user's choice of tracking server, read once: mlflow.set_tracking_uri() writes the same
# variable, so reading it later would make one run's folder leak into the next in one process.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None


def use_tracking_uri(config: PipelineConfig) -> str:
    """Point MLflow at the user's server, else at the run folder's SQLite file."""
    uri = USER_TRACKING_URI or default_tracking_uri(tracking_dir(config))
    mlflow.set_tracking_uri(uri)
    return uri


def tracking_dir(config: PipelineConfig) -> Path:
    """The run folder that holds the embedded MLflow store (a variant logs to its parent's)."""
    return (config.run.tracking_dir or config.run.out_dir).resolve()


def setup(config: PipelineConfig) -> str:
    """Select the tracking server and the experiment; returns the experiment id."""
    out_dir = tracking_dir(config)
    uri = use_tracking_uri(config)
    name = config.run.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        # With the embedded SQLite store, artifacts go to the run folder rather than ./mlruns.
        location = RunPaths(out_dir).mlflow_artifacts.as_uri() if uri.startswith("sqlite:") else None
        try:
            experiment_id = mlflow.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created concurrently
            experiment_id = mlflow.get_experiment_by_name(name).experiment_id  # type: ignore[union-attr]  # it exists now
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def safe_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as MLflow takes them: no credentials, values as bounded strings."""
    out = {}
    for key, value in params.items():
        if _SECRET.search(key):
            continue
        text = "" if value is None else redact_urls(str(value))
        out[key] = text if len(text) <= _MAX_PARAM_LEN else text[: _MAX_PARAM_LEN - 3] + "..."
    return out


@contextmanager
def flow_run(
    name: str,
    config: PipelineConfig,
    *,
    section: str | None = None,
    tags: Mapping[str, str] | None = None,
    prompts: Iterable[str] = (),
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for a flow run: nested under the active one, or top-level.

    A top-level run logs the whole flattened config; a nested run logs only its own section,
    so the stage runs stay readable in MLflow's comparison view.
    """
    if mlflow.active_run() is None:
        setup(config)
    nested = mlflow.active_run() is not None
    all_tags = {"esvr.stage": name, "esvr.run_name": config.run.name, **config.run.tags, **(tags or {})}
    with mlflow.start_run(run_name=name, nested=nested, tags=all_tags) as run:
        if not nested:
            params = flatten(config)
        elif section is not None:
            params = flatten(getattr(config, section), prefix=f"{section}.")
        else:
            params = {}
        mlflow.log_params(safe_params(params))  # MLflow splits it into batches of its size
        log_prompts(prompts)
        try:
            yield run
        except BaseException as exc:
            if stopped(exc):  # the run was stopped, it did not fail
                mlflow.end_run("KILLED")
            raise


def stopped(exc: BaseException) -> bool:
    """Whether `exc` stops a run from outside: Ctrl-C, or SIGTERM (as Prefect's flow engine
    raises it while a flow runs, or as the CLI turns it into Ctrl-C)."""
    from prefect.exceptions import TerminationSignal

    return isinstance(exc, (KeyboardInterrupt, TerminationSignal))


def log_prompts(names: Iterable[str]) -> None:
    """Log prompt files (paths relative to prompts/) under the run's ``prompts/`` artifacts."""
    for name in names:
        path = PROMPTS_DIR / name
        subdir = str(Path("prompts") / Path(name).parent)
        mlflow.log_artifact(str(path), artifact_path=subdir.rstrip("/."))


def log_metrics(metrics: Mapping[str, float | int], step: int | None = None) -> None:
    clean = {re.sub(r"[^\w\-. /:]", "_", k): float(v) for k, v in metrics.items() if v is not None}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_usage(models: Mapping[str, Any] | None = None) -> None:
    """Token and call counters of chat models (default: every model this process loaded)."""
    if models is None:
        from esvr.tasks.common.roles import loaded_models

        models = loaded_models()
    counters: dict[str, float] = {}
    for name, model in models.items():
        counters.update(model.usage.as_metrics(f"usage.{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[-60:]}"))
    log_metrics(counters)
