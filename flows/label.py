"""Flow `label`: threads.parquet -> labels.parquet (valence, sentiment, 20 value probabilities).

Stage 2 of the DAG (paper §4): every unique utterance of the ingested threads is labelled once.
Finished chunks are cached on disk under the stage folder, keyed by their content and the
labelers' fingerprints, so an interrupted run resumes where it stopped; the whole task is also
cached across runs by the threads' content and the label config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from prefect import flow, task

from esvr.flows import tracking
from esvr.flows.config import PipelineConfig
from esvr.flows.runtime import RunPaths, chat_model
from esvr.tasks.caching import cache_policy, path_digest
from esvr.tasks.label import LabelConfig, label_threads

LABEL_PROMPTS = {
    "llm": ["labeling/value_llm.txt"],
    "emollama": ["labeling/emollama_valence.txt", "labeling/emollama_sentiment.txt"],
}


def labelers(config: PipelineConfig):
    """The configured detector and scorer; chat models (llm, emollama) are shared and cached."""
    from esvr.models.emotion import load_emotion_scorer
    from esvr.models.value_detector import load_value_detector

    cfg = config.label
    vchat = chat_model(cfg.values.model, config) if cfg.values.backend == "llm" else None
    echat = chat_model(cfg.emotion.model, config) if cfg.emotion.backend == "emollama" else None
    return load_value_detector(cfg.values, vchat), load_emotion_scorer(cfg.emotion, echat)


def labelers_identity(cfg: LabelConfig) -> str:
    """What the cache key needs beyond the config: the content of the head file in use."""
    from esvr.models.value_detector import DEFAULT_HEAD

    if cfg.values.backend == "embedding":
        return path_digest(Path(cfg.values.head) if cfg.values.head else DEFAULT_HEAD)
    return ""


@task(
    cache_policy=cache_policy("esvr.models.value_detector", "esvr.models.emotion", exclude=["make_labelers"]),
    persist_result=True,
)
def label_task(
    threads: Path, out: str, cfg: LabelConfig, identity: str, make_labelers: Callable[[], tuple] | None = None
) -> dict[str, str]:
    """Keyed on the threads' content, the label section and the head file; `out` is a str so the
    key does not follow the output folder's (changing) content. The labelers are built only when
    the task runs: a cache hit loads no encoder (~7 s of a cached demo re-run)."""
    detector, scorer = make_labelers() if make_labelers else (None, None)
    return {k: str(v) for k, v in label_threads(threads, out, cfg, detector=detector, scorer=scorer).items()}


@flow(name="label", log_prints=True)
def label_flow(config: PipelineConfig, threads: str | Path | None = None) -> dict[str, str]:
    """Label `threads` (default: the run folder's ingest/threads.parquet); returns artifact paths."""
    paths = RunPaths(config.run.out_dir.resolve())
    threads_path = Path(threads) if threads else paths.out_dir / "ingest" / "threads.parquet"
    if not threads_path.is_file():
        raise FileNotFoundError(f"label: threads file not found: {threads_path} (run the ingest stage first)")
    cfg = config.label
    with tracking.flow_run(
        "label", config, section="label", prompts=LABEL_PROMPTS.get(cfg.values.backend, []) + LABEL_PROMPTS.get(cfg.emotion.backend, [])
    ):
        result = label_task(threads_path, str(paths.stage("label")), cfg, labelers_identity(cfg), lambda: labelers(config))
        stats = json.loads(Path(result["stats"]).read_text())
        tracking.log_metrics({f"label.{k}": v for k, v in stats.items()})
        tracking.log_artifact(result["stats"], "label")
        print(f"labelled {int(stats['utterances'])} utterances -> {result['labels']}")
        return {"labels": result["labels"], "label_stats": result["stats"]}
