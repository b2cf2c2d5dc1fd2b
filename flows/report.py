"""Flow `report`: evaluation runs (by MLflow id or tag, or summary files) -> report.md + plots.

Tables like the paper's Tables 2 and 3 (with its significance marks), ES-Skills per-criterion bars
and ES-Value win ratios, written to ``<run>/report/`` and logged to MLflow as a `report` run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow

from esvr.flows import tracking
from esvr.flows.config import PipelineConfig
from esvr.tasks.common.paths import RunPaths
from esvr.tasks.evaluation.report import build_report, find_runs, load_summary, summary_from_run


@flow(name="report", log_prints=True)
def report_flow(
    config: PipelineConfig,
    run_ids: list[str] | None = None,
    tags: dict[str, str] | None = None,
    summaries: list[str | Path] | None = None,
    title: str = "ES-VR evaluation report",
) -> dict[str, str]:
    """Build the report from `summaries` (summary.json files), else from the evaluate runs named by
    `run_ids`, else those matching `tags`, else the newest evaluate run of ``run.experiment``.
    Returns {'report': <run>/report/report.md}."""
    run = RunPaths(config.run.out_dir.resolve())
    out_dir = run.stage("report")
    with tracking.flow_run("report", config, tags={"esvr.kind": "report"}) as active:
        if summaries:
            loaded = [(str(p), load_summary(p)) for p in summaries]
        else:
            ids = find_runs(config.run.experiment, run_ids or [], tags)
            with tempfile.TemporaryDirectory() as tmp:
                loaded = [(rid, summary_from_run(rid, tmp)) for rid in ids]
        result = build_report(loaded, out_dir, title=title)
        import mlflow

        mlflow.set_tag("esvr.report.sources", ",".join(label for label, _ in loaded)[:500])
        tracking.log_artifact(out_dir, "report")
        print(f"report on {len(loaded)} evaluation(s): {result['report']} (MLflow run {active.info.run_id})")
        return {"report": result["report"]}
