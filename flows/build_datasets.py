"""Flow `build_datasets`: threads + labels -> TVD, RG-SFT and RG-DPO datasets (paper §4-5, App. B).

Stage 3 of the DAG. Single-turn and multi-turn settings, train/dev/test split by post, saved with
`datasets` in TRL's conversational formats under ``<run>/datasets/``; statistics (successes,
duplicates, DPO pairs dropped, split sizes, target value counts) go to MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task

from esvr.flows import tracking
from esvr.flows.caching import cache_policy
from esvr.flows.config import PipelineConfig
from esvr.tasks.common.paths import RunPaths
from esvr.tasks.common.roles import value_threshold
from esvr.tasks.components.datasets import DatasetsConfig, build_datasets, stats_metrics

PROMPTS = ["tvd/system.txt", "tvd/user.txt", "rg/system.txt", "rg/user.txt"]
#: the stage's code: every task's cache key follows its source
STAGE = "esvr.tasks.components"


@task(
    name="build_datasets",
    cache_policy=cache_policy(STAGE, prompts=PROMPTS),
    persist_result=True,
    log_prints=False,  # `datasets` prints bytecode listings while fingerprinting
)
def build_datasets_task(threads: Path, labels: Path, cfg: DatasetsConfig, out: Path, positive_valence: float) -> str:
    """`build_datasets` as a cached task (keyed by the inputs' content, the config, the prompt
    files and the builders' source); returns the manifest's path."""
    build_datasets(threads, labels, cfg, out, positive_valence)
    return str(Path(out) / "manifest.json")


@flow(name="build_datasets", log_prints=True)
def build_datasets_flow(
    config: PipelineConfig, threads: str | Path | None = None, labels: str | Path | None = None
) -> dict[str, str]:
    """Build every dataset; defaults read the run folder's ingest/ and label/ outputs."""
    paths = RunPaths(config.run.out_dir.resolve())
    threads_path = Path(threads) if threads else paths.out_dir / "ingest" / "threads.parquet"
    labels_path = Path(labels) if labels else paths.out_dir / "label" / "labels.parquet"
    for what, given, path, stage in (("threads", threads, threads_path, "ingest"), ("labels", labels, labels_path, "label")):
        if not path.is_file():
            hint = "" if given else f" (run the {stage} stage first)"
            raise FileNotFoundError(f"build_datasets: {what} file not found: {path}{hint}")
    with tracking.flow_run("build_datasets", config, section="datasets", prompts=PROMPTS):
        cfg = config.datasets
        if cfg.value_threshold is None:  # a value is observed where the labelling detector says so
            cfg = cfg.model_copy(update={"value_threshold": value_threshold(config.label.values)})
        # "positive" is the label section's one definition (label.emotion.positive_valence)
        positive = config.label.emotion.positive_valence
        manifest_path = build_datasets_task(threads_path, labels_path, cfg, paths.stage("datasets"), positive)
        manifest = json.loads(Path(manifest_path).read_text())
        tracking.log_metrics({f"datasets.{k}": v for k, v in stats_metrics(manifest).items()})
        tracking.log_artifact(manifest_path, "datasets")
        for setting, stats in manifest["stats"].items():
            sizes = ", ".join(
                f"{k} {stats.get(f'{k}.train', 0)}/{stats.get(f'{k}.dev', 0)}/{stats.get(f'{k}.test', 0)}"
                for k in ("tvd", "rg_sft", "rg_dpo")
            )
            print(f"{setting}: {stats.get('success', 0)} successes -> train/dev/test {sizes}")
        return {"datasets": manifest["root"], "datasets_manifest": str(manifest_path)}
