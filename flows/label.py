"""Flow `label`: threads.parquet -> labels.parquet (valence, sentiment, 20 value probabilities).

Stage 2 of the DAG (paper §4): every unique utterance of the ingested threads is labelled once.
Labels are stored per utterance under the stage folder (keyed by utt_id, text digest and the
labelers' fingerprints), so a run labels only what the store lacks: a new dump's utterances, or
what an interrupted run left; the whole task is also
cached across runs by the threads' content and the label config. With ``orchestration.task_runner``
dask or ray the chunks are labelled on the cluster's workers, one task each (same chunk files,
same labels.parquet), and ``label_chunks.json`` records which worker process labelled which.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from prefect import flow, task

from esvr.flows import tracking
from esvr.flows.caching import cache_policy
from esvr.flows.config import OrchestrationConfig, PipelineConfig
from esvr.flows.task_runners import map_runner, uses_cluster
from esvr.tasks.common.hashing import path_digest
from esvr.tasks.common.paths import RunPaths
from esvr.tasks.common.roles import labelers as build_labelers
from esvr.tasks.labeling.label import LabelConfig, label_on_runner, label_threads

#: the stage's code: every task's cache key follows its source
STAGE = "esvr.tasks.labeling"

LABEL_PROMPTS = {
    "llm": ["labeling/value_llm.txt"],
    "emollama": ["labeling/emollama_valence.txt", "labeling/emollama_sentiment.txt"],
}


def labelers(config: PipelineConfig):
    """The configured detector and scorer; chat models (llm, emollama) are shared and cached."""
    return build_labelers(config.label.values, config.label.emotion, config.run.out_dir.resolve(), config.models.cache)


def labelers_identity(cfg: LabelConfig) -> str:
    """What the cache key needs beyond the config: the content of the head file in use."""
    from esvr.models.value_detector import DEFAULT_HEAD

    if cfg.values.backend == "embedding":
        return path_digest(Path(cfg.values.head) if cfg.values.head else DEFAULT_HEAD)
    return ""


@task(
    cache_policy=cache_policy(
        STAGE,
        "esvr.models.value_detector",
        "esvr.models.emotion",
        exclude=["make_labelers", "orchestration", "run_dir", "use_cache"],
    ),
    persist_result=True,
)
def label_task(
    threads: Path,
    out: str,
    cfg: LabelConfig,
    identity: str,
    make_labelers: Callable[[], tuple] | None = None,
    orchestration: OrchestrationConfig | None = None,
    run_dir: str | None = None,
    use_cache: bool = True,
) -> dict[str, str]:
    """Keyed on the threads' content, the label section and the head file; `out` is a str so the
    key does not follow the output folder's (changing) content, and where the chunks ran is not
    part of it (the labels are the same). The labelers are built only when the task runs: a cache
    hit loads no encoder (~7 s of a cached demo re-run)."""
    if orchestration is not None and uses_cluster(orchestration):
        result = label_on_runner(threads, out, cfg, map_runner(orchestration), run_dir or str(Path(out).parent), use_cache)
    else:
        detector, scorer = make_labelers() if make_labelers else (None, None)
        result = label_threads(threads, out, cfg, detector=detector, scorer=scorer)
    return {k: str(v) for k, v in result.items()}


@flow(name="label", log_prints=True)
def label_flow(config: PipelineConfig, threads: str | Path | None = None) -> dict[str, str]:
    """Label `threads` (default: the run folder's ingest/threads.parquet); returns artifact paths."""
    paths = RunPaths(config.run.out_dir.resolve())
    threads_path = Path(threads) if threads else paths.out_dir / "ingest" / "threads.parquet"
    if not threads_path.is_file():
        hint = "" if threads else " (run the ingest stage first)"
        raise FileNotFoundError(f"label: threads file not found: {threads_path}{hint}")
    cfg = config.label
    with tracking.flow_run(
        "label",
        config,
        section="label",
        prompts=LABEL_PROMPTS.get(cfg.values.backend, []) + LABEL_PROMPTS.get(cfg.emotion.backend, []),
    ):
        result = label_task(
            threads_path,
            str(paths.stage("label")),
            cfg,
            labelers_identity(cfg),
            lambda: labelers(config),
            config.orchestration,
            str(paths.out_dir),
            config.models.cache,
        )
        stats = json.loads(Path(result["stats"]).read_text())
        tracking.log_metrics({f"label.{k}": v for k, v in stats.items()})
        tracking.log_artifact(result["stats"], "label")
        if "chunks" in result:
            tracking.log_artifact(result["chunks"], "label")
            print(
                f"labelled {len(json.loads(Path(result['chunks']).read_text()))} chunks on "
                f"{int(stats['workers'])} {config.orchestration.task_runner} worker process(es)"
            )
        print(
            f"labels of {int(stats['utterances'])} utterances ({int(stats['new_utterances'])} labelled now, "
            f"{int(stats['cached_utterances'])} from the store) -> {result['labels']}"
        )
        return {"labels": result["labels"], "label_stats": result["stats"]}
