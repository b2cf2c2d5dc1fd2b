"""Flow `ingest`: Pushshift dumps -> threads.parquet (+ rejects.ndjson, stats.json). Stage 1, paper §4.

Each dump is staged by a cached task keyed by its content (the same dump at another path is not
recomputed); the manifest in the stage folder makes the merge incremental: a new monthly dump is
streamed alone, then every staged dump is merged into the threads. With no dumps configured, the
demo writes the sample dump first. `ingest_new_dumps` is the scheduled deployment's entry point:
it ingests the new dumps and hands them downstream (`esvr.flows.refresh`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from prefect import flow, task

from esvr.flows import tracking
from esvr.flows.caching import cache_policy
from esvr.flows.config import PipelineConfig, load_config
from esvr.flows.refresh import Train, refresh_flow
from esvr.flows.runtime import run_folder_lock
from esvr.tasks.common.locks import LockBusy
from esvr.tasks.common.paths import RunPaths
from esvr.tasks.reddit.ingest import (
    MANIFEST,
    IngestConfig,
    IngestError,
    StageResult,
    find_new_dumps,
    flat_counts,
    ingest_dumps,
    stage_dump,
)
from esvr.tasks.reddit.sample_dump import make_sample_dump

#: the stage's code: every task's cache key follows its source
STAGE = "esvr.tasks.reddit"


# Keyed by the stage folder, whose name holds the dump's SHA-256 (from the manifest) and the filters'
# fingerprint: the dump's own content digest would read a multi-GB file a second time.
@task(cache_policy=cache_policy(STAGE, exclude=["dump"]), persist_result=True)
def stage_dump_task(dump: Path, out_stage_dir: Path, cfg: IngestConfig) -> dict:
    result = stage_dump(dump, out_stage_dir, cfg)
    return {"stats": result.stats, "error": result.error}


def _stage_via_task(dump: Path, stage_dir: Path, cfg: IngestConfig) -> StageResult:
    # a cache hit is only good while the staged files are still there
    fresh = not (stage_dir / "stats.json").exists()
    out = stage_dump_task.with_options(refresh_cache=fresh)(Path(dump), stage_dir, cfg)
    return StageResult(out["stats"], out["error"])


@task(cache_policy=cache_policy(STAGE), persist_result=True)
def sample_dump_task(out_dir: Path, seed: int, posts: int = 150) -> list[str]:
    paths = make_sample_dump(out_dir, seed=seed, posts=posts)
    return [str(p) for p in paths["submissions"] + paths["comments"]]


def stage_dir(config: PipelineConfig) -> Path:
    return Path(config.ingest.out_dir) if config.ingest.out_dir else RunPaths(config.run.out_dir.resolve()).stage("ingest")


@flow(name="ingest", log_prints=True)
def ingest_flow(config: PipelineConfig) -> dict[str, str]:
    """Returns the artifact paths: threads, ingest_rejects, ingest_stats, ingest_manifest."""
    cfg = config.ingest
    out = stage_dir(config)
    with tracking.flow_run("ingest", config, section="ingest"):
        dumps = [Path(d) for d in cfg.dumps]
        if not dumps:
            sample = out / "sample_dump"
            missing = not all((sample / n).exists() for n in ("RS_2021-06.zst", "RC_2021-06.zst"))
            dumps = [
                Path(p) for p in sample_dump_task.with_options(refresh_cache=missing)(sample, config.run.seed, cfg.sample_posts)
            ]
            print(f"no dumps configured (ingest.dumps): using the generated sample dump in {sample}")
        try:
            result = ingest_dumps(dumps, out, cfg, stage_fn=_stage_via_task)
        finally:
            stats_path = out / "stats.json"
            if stats_path.exists():
                summary = json.loads(stats_path.read_text())
                tracking.log_metrics(flat_counts(summary))
                tracking.log_artifact(stats_path, "ingest")
        rejects = result.rejects
        if rejects.stat().st_size < 20 << 20:
            tracking.log_artifact(rejects, "ingest")
        t = result.summary["threads"]
        print(
            f"threads: {t['threads']} ({t['single_turn']} single-turn, {t['multi_turn']} multi-turn) from "
            f"{t['posts']} posts; staged now: {result.staged_now or 'none'}, reused: {result.reused or 'none'}"
        )
        return {
            "threads": str(result.threads),
            "ingest_rejects": str(rejects),
            "ingest_stats": str(result.stats),
            "ingest_manifest": str(result.manifest),
        }


@flow(name="ingest-new-dumps", log_prints=True)
def ingest_new_dumps(
    folder: str | None = None,
    config_path: str | None = None,
    min_age_s: float = 60.0,
    train: Train = "deployments",
) -> dict[str, str]:
    """Scheduled entry point: ingest the dumps in `folder` (default ingest.dumps_dir) not ingested
    yet, then carry them downstream (`esvr.flows.refresh`: label the new utterances, rebuild the
    datasets, retrain TVD and RG when the datasets changed, on the `gpu` deployments by default).
    A scan that finds no new dump does nothing else.

    A scan holds the run folder (as `esvr run` does): one that starts while another is still at
    work (a long label or training run past the next scheduled time) does nothing, and the next
    scan takes the dumps up; two at once would ingest the same new dump twice."""
    config = load_config(config_path)
    folder_path = Path(folder) if folder else config.ingest.dumps_dir
    if folder_path is None:
        raise IngestError("ingest_new_dumps: no folder given and ingest.dumps_dir is not set")
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(run_folder_lock(config.run.out_dir, shared=False))
        except LockBusy as busy:
            print(f"{busy}: this scan does nothing; the next one takes the new dumps up")
            return {}
        out = stage_dir(config)
        new = find_new_dumps(folder_path, out / MANIFEST, min_age_s=min_age_s)
        if not new:
            print(f"no new dumps in {folder_path}")
            return {}
        print(f"new dumps: {[p.name for p in new]}")
        config.ingest.dumps = new
        result = ingest_flow(config)
        return {**result, **refresh_flow(config, result["threads"], [p.name for p in new], config_path, train)}
