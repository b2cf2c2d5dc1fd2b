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

from pathlib import Path

from prefect import flow

from esvr.flows import tracking
from esvr.flows.config import PipelineConfig, load_config
from esvr.flows.memory import StageMemory
from esvr.tasks.common.roles import release_models


def selected(config: PipelineConfig, stage: str) -> bool:
    return config.selected(stage)


def _trained_supporters(
    config: PipelineConfig, trained: dict[str, dict[str, str]], generators: dict[str, str | None]
) -> dict[str, dict[str, str | None]]:
    """Evaluation rows that take this run's trained supporters (``component: pipeline:<name>``).

    `trained`: per branch ('supporter' = the main method, else a variant's name) what
    train_supporter returned; `generators`: each branch's reference generator, so a variant's row
    is simulated with the generator of its own branch (App. G's rows with App. G's RG).
    """
    available: dict[str, tuple[str | None, str]] = {}
    for branch, result in trained.items():
        available[f"{branch}_sft"] = (result.get("sft"), branch)
        available[f"{branch}_dpo"] = (result.get("dpo") or result.get("supporter"), branch)
    rows: dict[str, dict[str, str | None]] = {}
    for row in config.evaluate.supporters:
        if row.component and row.component.startswith("pipeline:"):
            spec, branch = available.get(row.component.removeprefix("pipeline:"), (None, ""))
            if spec:
                rows[row.name] = {"model": spec, "rg": generators.get(branch)}
    return rows


@flow(name="pipeline", log_prints=True)
def pipeline_flow(config: PipelineConfig) -> dict[str, str]:
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
        # Each variant (App. G) trains its own reference generator when its train_rg differs.
        variants = {name: config.variant(name) for name in config.variants}
        generators: dict[str, str | None] = {"supporter": rg}
        for name, vconfig in variants.items():
            generators[name] = rg
            if vconfig.train_rg != config.train_rg and selected(config, "train_rg"):
                from esvr.flows.train_rg import train_rg_flow

                print(f"variant {name}: training its reference generator")
                generators[name] = train_rg_flow(vconfig, datasets=artifacts.get("datasets")).get("rg")
                artifacts[f"{name}_rg"] = generators[name] or ""
                release_models()

        # -- seekers and simulated dialogues (§5.3-5.4) ---------------------------------------------
        if run("personas"):
            from esvr.flows.personas import personas_flow

            artifacts.update(personas_flow(config))
        variant_dialogues: dict[str, str | None] = {}
        if run("simulate"):
            from esvr.flows.simulate import simulate_flow

            sim = simulate_flow(config, personas_path=artifacts.get("personas"), tvd=tvd, rg=rg)
            artifacts.update({f"simulate_{k}" if k != "dialogues" else k: v for k, v in sim.items()})
            for name, vconfig in variants.items():
                # A generator trained without values has no use for target values: no detector.
                vtvd = tvd if vconfig.train_rg.with_values else None
                vsim = simulate_flow(vconfig, personas_path=artifacts.get("personas"), tvd=vtvd, rg=generators[name])
                variant_dialogues[name] = vsim.get("dialogues")
                artifacts[f"{name}_dialogues"] = vsim.get("dialogues") or ""

        # -- the supporter: SFT, then DPO on the look-ahead value reward (§5.3) --------------------
        trained: dict[str, dict[str, str]] = {}
        if run("train_supporter"):
            from esvr.flows.train_supporter import train_supporter_flow

            release_models()
            trained["supporter"] = train_supporter_flow(config, dialogues_path=artifacts.get("dialogues"), tvd=tvd, rg=rg)
            artifacts.update({f"supporter_{k}" if k not in ("supporter",) else k: v for k, v in trained["supporter"].items()})
            release_models()
            for name, vconfig in variants.items():
                vtvd = tvd if vconfig.train_rg.with_values else None
                trained[name] = train_supporter_flow(
                    vconfig, dialogues_path=variant_dialogues.get(name), tvd=vtvd, rg=generators[name]
                )
                artifacts.update({f"{name}_{k}": v for k, v in trained[name].items()})
                release_models()

        # -- evaluation (§6) ------------------------------------------------------------------------
        if run("evaluate"):
            from esvr.flows.evaluate import evaluate_flow

            ev = evaluate_flow(
                config,
                personas_path=artifacts.get("personas"),
                supporters=_trained_supporters(config, trained, generators) or None,
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
        config.run.out_dir = Path(out_dir)
    return pipeline_flow(config)
