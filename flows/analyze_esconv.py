"""Flow `analyze_esconv`: the paper's §3.2 motivation analysis on ESConv (Figure 2, App. A).

High- vs low-effectiveness dialogues (initial intensity 5, final 1-2 vs 3-4), positive values in
the seeker's last four turns, Mann-Whitney U per value; the table and the figure go to MLflow.
Labelers are those of the `label` section, so the analysis uses the same detector as stage 2.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from prefect import flow, task

from esvr.flows import tracking
from esvr.flows.caching import cache_policy
from esvr.flows.config import PipelineConfig
from esvr.flows.label import LABEL_PROMPTS, STAGE, labelers, labelers_identity
from esvr.tasks.common.paths import RunPaths
from esvr.tasks.labeling.analyze_esconv import HIGH, LOW, AnalyzeESConvConfig, analyze_esconv
from esvr.tasks.labeling.label import LabelConfig


@task(
    cache_policy=cache_policy(
        STAGE, "esvr.tasks.common.esconv", "esvr.models.value_detector", "esvr.models.emotion", exclude=["make_labelers"]
    ),
    persist_result=True,
)
def analyze_task(
    esconv: Path | str,
    out: str,
    cfg: AnalyzeESConvConfig,
    label_cfg: LabelConfig,
    identity: str,
    make_labelers: Callable[[], tuple],
) -> dict[str, str]:
    """Keyed like the label stage; the labelers are built only when the task runs (a cache hit
    loads no encoder)."""
    detector, scorer = make_labelers()
    paths = analyze_esconv(esconv, out, cfg, detector, scorer, label_cfg.emotion.positive_valence)
    return {k: str(v) for k, v in paths.items()}


@flow(name="analyze_esconv", log_prints=True)
def analyze_esconv_flow(config: PipelineConfig, esconv: str | Path | None = None) -> dict[str, str]:
    """Run the analysis on `esconv` (default: config.analyze_esconv.esconv); returns artifact paths."""
    cfg = config.analyze_esconv
    source = esconv or cfg.esconv
    if not source:
        raise FileNotFoundError("analyze_esconv: no ESConv given (pass --esconv PATH_OR_HUB_ID or set analyze_esconv.esconv)")
    # a local file is keyed by its content, a hub id by its name
    source_arg: Path | str = Path(source) if Path(source).exists() else str(source)
    paths = RunPaths(config.run.out_dir.resolve())
    prompts = LABEL_PROMPTS.get(config.label.values.backend, []) + LABEL_PROMPTS.get(config.label.emotion.backend, [])
    with tracking.flow_run("analyze_esconv", config, section="analyze_esconv", prompts=prompts):
        result = analyze_task(
            source_arg,
            str(paths.stage("analyze_esconv")),
            cfg,
            config.label,
            labelers_identity(config.label),
            lambda: labelers(config),
        )
        stats = json.loads(Path(result["summary"]).read_text())
        metrics = {
            "esconv.dialogues": stats["dialogues"],
            "esconv.n_high": stats["n"][HIGH],
            "esconv.n_low": stats["n"][LOW],
            "esconv.mean_positive_values_high": stats["mean_positive_values"][HIGH],
            "esconv.mean_positive_values_low": stats["mean_positive_values"][LOW],
            "esconv.total_U": stats["total_test"]["U"],
            "esconv.total_p": stats["total_test"]["p"],
            "esconv.significant_values": sum(r["significant"] for r in stats["values"]),
        }
        metrics.update({f"esconv.skipped.{k}": v for k, v in stats["skipped"].items()})
        metrics.update({f"esconv.missing.{k}": v for k, v in stats["missing_survey_fields"].items()})
        tracking.log_metrics({k: v for k, v in metrics.items() if v == v})  # NaN when a group is empty
        for name in ("summary", "table_csv", "table_md", "figure"):
            tracking.log_artifact(result[name], "analyze_esconv")
        print(Path(result["table_md"]).read_text())
        return {f"esconv_{k}": v for k, v in result.items()}
