"""Flow `pipeline`: the whole DAG of the paper, stage by stage, every stage cached.

Reads like the paper's Figure 3:

    Reddit dumps -> threads -> labels (emotion, 20 values)           §4, App. B
                 -> TVD / RG datasets -> target value detector        §5.1, App. D.1
                                      -> reference generator (SFT+DPO) §5.2, App. D.2
    seeker personas -> simulated dialogues (TVD + RG in the loop)     §5.3-5.4, App. E
                    -> supporter SFT -> look-ahead value reward -> DPO §5.3, App. D.3
                    -> evaluation (ES-Skills, ES-Intensity, ES-Value) -> report   §6

`config.run.stages` picks a subset (a stage whose inputs come from a skipped stage reads them
from the run folder, where an earlier run left them). `analyze_esconv` (paper §3) runs when
`analyze_esconv.esconv` names a file; `smoke` only when asked for.
"""

from __future__ import annotations

from prefect import flow

from esvr.flows import tracking
from esvr.flows.config import PipelineConfig, load_config
from esvr.flows.memory import StageMemory
from esvr.flows.runtime import release_models

STAGES = [
    "ingest",
    "label",
    "analyze_esconv",
    "build_datasets",
    "train_tvd",
    "train_rg",
    "personas",
    "simulate",
    "train_supporter",
    "evaluate",
    "report",
]
#: stages that run only when named in run.stages
OPTIONAL_STAGES = ["smoke"]


def selected(config: PipelineConfig, stage: str) -> bool:
    if config.run.stages:
        return stage in config.run.stages
    if stage == "analyze_esconv":
        return bool(config.analyze_esconv.esconv)
    return stage in STAGES


def check_stages(config: PipelineConfig) -> None:
    unknown = [s for s in config.run.stages if s not in STAGES + OPTIONAL_STAGES]
    if unknown:
        raise ValueError(f"run.stages: unknown stage(s) {unknown}; known: {STAGES + OPTIONAL_STAGES}")


def _trained_supporters(config: PipelineConfig, trained: dict[str, str]) -> dict[str, str]:
    """Evaluation rows that take this run's trained supporters (``component: pipeline:<name>``)."""
    available = {"supporter_sft": trained.get("sft"), "supporter_dpo": trained.get("dpo") or trained.get("supporter")}
    rows = {}
    for row in config.evaluate.supporters:
        if row.component and row.component.startswith("pipeline:"):
            spec = available.get(row.component[len("pipeline:") :])
            if spec:
                rows[row.name] = spec
    return rows


@flow(name="pipeline", log_prints=True)
def pipeline_flow(config: PipelineConfig) -> dict[str, str]:
    check_stages(config)
    artifacts: dict[str, str] = {}

    memory = StageMemory()

    def run(stage: str) -> bool:
        if not selected(config, stage):
            return False
        memory.begin(stage)
        return True

    with tracking.flow_run("pipeline", config, tags={"esvr.kind": "pipeline"}), memory:
        if run("smoke"):
            from esvr.flows.smoke import smoke_flow

            artifacts.update(smoke_flow(config))

        # -- Reddit data (§4) -------------------------------------------------------------------
        if run("ingest"):
            from esvr.flows.ingest import ingest_flow

            artifacts.update(ingest_flow(config))
        if run("label"):
            from esvr.flows.label import label_flow

            artifacts.update(label_flow(config, threads=artifacts.get("threads")))
        if run("analyze_esconv"):
            from esvr.flows.analyze_esconv import analyze_esconv_flow

            artifacts.update(analyze_esconv_flow(config))

        # -- components trained on Reddit (§5.1-5.2) ----------------------------------------------
        if run("build_datasets"):
            from esvr.flows.build_datasets import build_datasets_flow

            artifacts.update(build_datasets_flow(config, threads=artifacts.get("threads"), labels=artifacts.get("labels")))
        release_models()  # training needs the memory the labelers and chat models held
        if run("train_tvd"):
            from esvr.flows.train_tvd import train_tvd_flow

            artifacts.update(train_tvd_flow(config, datasets=artifacts.get("datasets")))
            release_models()
        if run("train_rg"):
            from esvr.flows.train_rg import train_rg_flow

            artifacts.update(train_rg_flow(config, datasets=artifacts.get("datasets")))
            release_models()
        # This run's components, else the recipe's (simulate.tvd / simulate.rg; None = without).
        tvd, rg = artifacts.get("tvd"), artifacts.get("rg")

        # -- seekers and simulated dialogues (§5.3-5.4) ---------------------------------------------
        if run("personas"):
            from esvr.flows.personas import personas_flow

            artifacts.update(personas_flow(config))
        if run("simulate"):
            from esvr.flows.simulate import simulate_flow

            sim = simulate_flow(config, personas_path=artifacts.get("personas"), tvd=tvd, rg=rg)
            artifacts.update({f"simulate_{k}" if k != "dialogues" else k: v for k, v in sim.items()})

        # -- the supporter: SFT, then DPO on the look-ahead value reward (§5.3) --------------------
        trained: dict[str, str] = {}
        if run("train_supporter"):
            from esvr.flows.train_supporter import train_supporter_flow

            release_models()
            trained = train_supporter_flow(config, dialogues_path=artifacts.get("dialogues"), tvd=tvd, rg=rg)
            artifacts.update({f"supporter_{k}" if k not in ("supporter",) else k: v for k, v in trained.items()})
            release_models()

        # -- evaluation (§6) ------------------------------------------------------------------------
        if run("evaluate"):
            from esvr.flows.evaluate import evaluate_flow

            ev = evaluate_flow(
                config,
                personas_path=artifacts.get("personas"),
                supporters=_trained_supporters(config, trained) or None,
                tvd=tvd,
                rg=rg,
            )
            artifacts.update(ev)
        if run("report"):
            from esvr.flows.report import report_flow

            summary = artifacts.get("evaluate_summary")
            artifacts.update(report_flow(config, summaries=[summary] if summary else None))
        tracking.log_usage()
        tracking.log_metrics(memory.metrics())
        print("peak memory per stage:\n" + memory.table())
    return artifacts


@flow(name="pipeline-from-file", log_prints=True)
def pipeline_from_file(config_path: str, overrides: list[str] | None = None, out_dir: str | None = None) -> dict[str, str]:
    """The deployment entry point: parameters are a recipe file and overrides, as on the CLI."""
    config = load_config(config_path, list(overrides or []))
    if out_dir:
        config.run.out_dir = out_dir
    return pipeline_flow(config)
