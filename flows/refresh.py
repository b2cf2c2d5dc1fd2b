"""Flow `refresh`: what a new dump changes downstream of ingest, and nothing more.

The scheduled ``ingest-new-dumps`` deployment calls it after ingesting new dumps:

1. `label` labels the utterances the label store lacks (the new dumps' ones; docs/labeling.md);
2. `build_datasets` rebuilds the TVD / RG datasets from the merged threads and labels;
3. only when the datasets' data files changed, the components trained on them (TVD, RG) are
   trained again, as new MLflow runs tagged ``esvr.dumps`` (every dump the threads hold) and
   ``esvr.new_dumps`` (those of this scan). With ``train="deployments"`` they run as the
   ``train-tvd`` and ``train-rg`` deployments on the ``gpu`` work pool (prefect.yaml), as sub-runs
   of this flow that it waits for; ``"here"`` trains in this process, ``"none"`` stops after the
   datasets.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, cast

from prefect import flow

from esvr.flows import tracking
from esvr.flows.build_datasets import build_datasets_flow
from esvr.flows.config import PipelineConfig
from esvr.flows.label import label_flow
from esvr.tasks.common.hashing import file_digest
from esvr.tasks.common.paths import RunPaths
from esvr.tasks.reddit.ingest import load_manifest

#: the deployments (prefect.yaml, flow/deployment) that retrain the components on new datasets
TRAIN_DEPLOYMENTS = ("train-tvd-from-file/train-tvd", "train-rg-from-file/train-rg")

Train = Literal["deployments", "here", "none"]


class RefreshError(RuntimeError):
    """A downstream run that did not complete; the message names it and its state."""


def datasets_digest(root: str | Path) -> str:
    """Digest of the datasets' data files (``*.arrow``, by relative path): what training reads.

    The folders' JSON metadata is left out: `datasets` writes a fingerprint there that need not
    repeat for the same rows."""
    root = Path(root)
    h = hashlib.blake2b(digest_size=20)
    for path in sorted(root.rglob("*.arrow")):
        if not path.name.startswith("cache-"):
            h.update(str(path.relative_to(root)).encode())
            h.update(file_digest(path).encode())
    return h.hexdigest()


def dump_tags(ingest_dir: str | Path, new_dumps: list[str]) -> dict[str, str]:
    """``esvr.dumps``: the dumps behind the threads (file names, sorted); ``esvr.new_dumps``: this scan's."""
    entries = load_manifest(Path(ingest_dir)).get("dumps", {}).values()
    return {
        "esvr.dumps": ",".join(sorted({e["name"] for e in entries})),
        "esvr.new_dumps": ",".join(sorted(new_dumps)),
    }


def train_on_deployments(config: PipelineConfig, config_path: str, tags: dict[str, str]) -> dict[str, str]:
    """Run the training deployments on the recipe file and the run folder; wait for each."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    out: dict[str, str] = {}
    for name in TRAIN_DEPLOYMENTS:
        # called from a flow, it waits for the run and links it as this flow run's sub-run
        run = cast(
            FlowRun,
            run_deployment(
                name,
                parameters={"config_path": config_path, "out_dir": str(config.run.out_dir.resolve()), "tags": tags},
            ),
        )
        if run.state is None or not run.state.is_completed():
            state = run.state.name if run.state else "no state"
            raise RefreshError(f"refresh: deployment {name} ended {state}: {run.state.message if run.state else ''}")
        out[name] = str(run.id)
        print(f"{name}: flow run {run.name} completed")
    return out


def train_here(config: PipelineConfig, tags: dict[str, str]) -> dict[str, str]:
    from esvr.flows.train_rg import train_rg_flow
    from esvr.flows.train_tvd import train_tvd_flow

    tagged = config.model_copy(deep=True)
    tagged.run.tags = {**tagged.run.tags, **tags}
    return {**train_tvd_flow(tagged), **train_rg_flow(tagged)}


@flow(name="refresh", log_prints=True)
def refresh_flow(
    config: PipelineConfig,
    threads: str,
    new_dumps: list[str],
    config_path: str | None = None,
    train: Train = "deployments",
) -> dict[str, str]:
    """Label `threads`, rebuild the datasets and, when they changed, retrain TVD and RG (`train`)."""
    paths = RunPaths(config.run.out_dir.resolve())
    datasets_dir = paths.out_dir / "datasets"
    tags = dump_tags(Path(threads).parent, new_dumps)
    before = datasets_digest(datasets_dir)
    with tracking.flow_run("refresh", config, tags=tags):
        result = dict(label_flow(config, threads))
        result.update(build_datasets_flow(config, threads, result["labels"]))
    if datasets_digest(datasets_dir) == before:
        print("datasets unchanged: the trained components stay as they are")
        return result
    print(f"datasets changed: training TVD and RG ({train}) on {tags['esvr.dumps']}")
    if train == "deployments":
        if config_path is None:
            raise RefreshError("refresh: train='deployments' needs the recipe file (config_path) the deployments read")
        result.update(train_on_deployments(config, config_path, tags))
    elif train == "here":
        result.update(train_here(config, tags))
    return result
