"""`esvr deploy`: register the deployments of ``prefect.yaml`` on a Prefect server.

``prefect.yaml`` (repository root) is the one description of the deployments; this command only
fills in what depends on the user's run recipe and then hands the file to Prefect's own
``prefect deploy``, so templating, pull steps and schedules behave exactly as Prefect documents:

- every deployment's ``config_path`` parameter becomes the recipe given with ``--config``;
- the ``ingest-new-dumps`` schedule becomes that recipe's ``ingest.schedule_cron``;
- the work pools the deployments name (``cpu``, ``gpu``) are created when missing (process pools),
  so registering works before any worker has started.

The file also holds the deployment entry points of the GPU training stages: like
``pipeline_from_file``, they take a recipe file and overrides (a whole config object is no
parameter to type into the Prefect UI) and run one stage's flow on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

from esvr.flows.config import PipelineConfig, load_config

PROJECT_DIR = Path(__file__).resolve().parents[1]
PREFECT_FILE = PROJECT_DIR / "prefect.yaml"
INGEST_DEPLOYMENT = "ingest-new-dumps"


class DeployError(RuntimeError):
    """A deployment that could not be registered; the message says what to fix."""


# --------------------------------------------------------------------------------------------
# Entry points of the training deployments (gpu work pool)
# --------------------------------------------------------------------------------------------


def _config(
    config_path: str, overrides: list[str] | None, out_dir: str | None, tags: dict[str, str] | None = None
) -> PipelineConfig:
    config = load_config(config_path, list(overrides or []))
    if out_dir:
        config.run.out_dir = Path(out_dir)
    config.run.tags = {**config.run.tags, **(tags or {})}
    return config


@flow(name="train-tvd-from-file", log_prints=True)
def train_tvd_from_file(
    config_path: str, overrides: list[str] | None = None, out_dir: str | None = None, tags: dict[str, str] | None = None
) -> dict[str, str]:
    """Train the target value detector of the run folder's datasets (stage 4); `tags` go on its MLflow
    runs (a scheduled re-run names the dumps the datasets came from)."""
    from esvr.flows.train_tvd import train_tvd_flow

    return train_tvd_flow(_config(config_path, overrides, out_dir, tags))


@flow(name="train-rg-from-file", log_prints=True)
def train_rg_from_file(
    config_path: str, overrides: list[str] | None = None, out_dir: str | None = None, tags: dict[str, str] | None = None
) -> dict[str, str]:
    """Train the reference generator of the run folder's datasets (stage 4); `tags` as for train-tvd."""
    from esvr.flows.train_rg import train_rg_flow

    return train_rg_flow(_config(config_path, overrides, out_dir, tags))


@flow(name="train-supporter-from-file", log_prints=True)
def train_supporter_from_file(config_path: str, overrides: list[str] | None = None, out_dir: str | None = None) -> dict[str, str]:
    """Train the supporter on the run folder's simulated dialogues (stage 7)."""
    from esvr.flows.train_supporter import train_supporter_flow

    return train_supporter_flow(_config(config_path, overrides, out_dir))


# --------------------------------------------------------------------------------------------
# Registering
# --------------------------------------------------------------------------------------------


def load_prefect_file(path: str | Path = PREFECT_FILE) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DeployError(f"no deployments file {path}") from None
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
        raise DeployError(f"{path}: expected a 'deployments' list")
    return data


def resolve_deployments(spec: dict[str, Any], config_path: str, config: PipelineConfig) -> dict[str, Any]:
    """`spec` (a loaded prefect.yaml) with the recipe's path and ingest cron filled in."""
    out = yaml.safe_load(yaml.safe_dump(spec))  # a deep copy without the YAML anchors' sharing
    for dep in out["deployments"]:
        params = dep.setdefault("parameters", {})
        if "config_path" in params:
            params["config_path"] = config_path
        if dep["name"] == INGEST_DEPLOYMENT:
            for schedule in dep.get("schedules") or []:
                if "cron" in schedule:
                    schedule["cron"] = config.ingest.schedule_cron
    return out


def work_pools(spec: dict[str, Any]) -> list[str]:
    return sorted({dep["work_pool"]["name"] for dep in spec["deployments"] if dep.get("work_pool")})


def ensure_work_pools(names: list[str], pool_type: str = "process") -> list[str]:
    """Create the work pools that do not exist yet; returns the ones created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                try:
                    client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
                    created.append(name)
                except ObjectAlreadyExists:  # a worker created it meanwhile
                    pass
    return created


def _prefect_cli() -> list[str]:
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.exists() else [shutil.which("prefect") or "prefect"]


def deploy(
    config_path: str | Path,
    *,
    names: list[str] | None = None,
    prefect_file: str | Path = PREFECT_FILE,
    project_dir: str | Path = PROJECT_DIR,
) -> list[str]:
    """Register the deployments (all, or `names`) on the Prefect server of ``PREFECT_API_URL``.

    `config_path` is written into the deployments as given: a relative path is read by the worker
    relative to its project folder, so give one that exists there (the compose worker mounts
    ./configs; a path under the checkout works for a worker started from it).
    """
    project_dir = Path(project_dir).resolve()
    config_file = Path(config_path)
    if not (config_file if config_file.is_absolute() else project_dir / config_file).exists():
        raise DeployError(f"config file not found: {config_path} (relative paths are read from {project_dir})")
    config = load_config(config_file if config_file.is_absolute() else project_dir / config_file)
    spec = load_prefect_file(prefect_file)
    known = [d["name"] for d in spec["deployments"]]
    chosen = list(names or known)
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise DeployError(f"unknown deployment(s) {unknown}; {prefect_file} has {known}")
    if INGEST_DEPLOYMENT in chosen and config.ingest.dumps_dir is None:
        print(f"note: {config_path} sets no ingest.dumps_dir; runs of {INGEST_DEPLOYMENT} need the 'folder' parameter")
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url
    if not api_url:
        raise DeployError(
            "PREFECT_API_URL is not set: deployments live on a Prefect server, e.g. "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api (docker compose up; docs/deployment.md)"
        )
    resolved = resolve_deployments(spec, str(config_path), config)
    resolved["deployments"] = [d for d in resolved["deployments"] if d["name"] in chosen]
    created = ensure_work_pools(work_pools(resolved))
    if created:
        print(f"created work pool(s): {', '.join(created)}")
    # `prefect deploy` reads the entry points relative to its cwd, the project folder.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="esvr-prefect-", delete=False) as fh:
        yaml.safe_dump(resolved, fh, sort_keys=False)
        tmp = Path(fh.name)
    try:
        cmd = [*_prefect_cli(), "--no-prompt", "deploy", "--prefect-file", str(tmp), "--all"]
        env = {**os.environ, "PREFECT_API_URL": api_url}
        proc = subprocess.run(cmd, cwd=project_dir, env=env, capture_output=True, text=True)
    finally:
        tmp.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise DeployError(f"prefect deploy failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return registered(chosen)


def registered(names: list[str]) -> list[str]:
    """'flow/deployment' of the named deployments on the server (what `prefect deployment run` takes)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        deps = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)))
        flows = {d.flow_id: client.read_flow(d.flow_id).name for d in deps}
    return sorted(f"{flows[d.flow_id]}/{d.name}" for d in deps)
