"""The pipeline's stage table: `esvr run`, `run.stages` and the per-stage commands all follow it."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from esvr.flows.cli import STAGE_COMMANDS, STAGE_OPTIONS, build_parser, cmd_stage
from esvr.flows.config import OPTIONAL_STAGES, STAGES, VARIANT_STAGES, PipelineConfig, load_config
from esvr.flows.stages import PIPELINE, STAGES_BY_NAME
from esvr.models.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_the_table_names_the_stages_the_recipe_takes():
    assert [s.name for s in PIPELINE] == OPTIONAL_STAGES + STAGES
    assert [s.name for s in PIPELINE if s.optional] == OPTIONAL_STAGES
    assert [s.name for s in PIPELINE if s.variant_keys] == VARIANT_STAGES


def test_an_unknown_stage_is_refused_at_load_naming_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["run.stages=[ingest, lable]"])
    message = str(err.value)
    assert "run.stages" in message and "'lable'" in message and "\n" not in message


def test_esvr_run_refuses_an_unknown_stage_before_prefect_starts(tmp_path: Path):
    code = f"""
import sys
from esvr.flows.cli import main
status = main(["run", "--out", {str(tmp_path / "run")!r}, "--set", "run.stages=[lable]"])
assert "prefect" not in sys.modules, "Prefect was loaded"
sys.exit(status)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "run.stages" in out.stderr and "lable" in out.stderr and "Traceback" not in out.stderr


def _subcommands() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


def test_every_stage_has_a_command_whose_options_are_its_flows_keywords():
    assert set(STAGE_OPTIONS) <= set(STAGES_BY_NAME) and set(STAGE_COMMANDS) <= set(STAGES_BY_NAME)
    commands = _subcommands()
    for stage in PIPELINE:
        args = commands[stage.command].parse_args([])
        assert args.stage == stage.name
        assert args.func is STAGE_COMMANDS.get(stage.name, cmd_stage)
        keywords = inspect.signature(stage.load().fn).parameters
        if args.func is cmd_stage:
            assert set(args.flow_options) <= set(keywords), stage.name
        assert set(stage.reads) <= set(keywords), stage.name
        if stage.inputs:
            assert set(stage.inputs(PipelineConfig(), {})) <= set(keywords), stage.name


def test_the_stage_commands_keep_their_options():
    commands = _subcommands()
    simulate = commands["simulate"].parse_args(["--personas", "p.jsonl", "--split", "dev", "--split", "test", "--rg", ""])
    assert simulate.flow_options == ["personas_path", "splits", "supporter", "tvd", "rg", "name"]
    assert (simulate.personas_path, simulate.splits, simulate.rg, simulate.name) == (Path("p.jsonl"), ["dev", "test"], "", "main")
    supporter = commands["train-supporter"].parse_args(["--dialogues", "d.jsonl"])
    assert supporter.dialogues_path == Path("d.jsonl") and supporter.personas_path is None
    assert "--personas PERSONAS" in commands["simulate"].format_help()


def test_results_are_published_under_todays_keys():
    simulate, supporter = STAGES_BY_NAME["simulate"], STAGES_BY_NAME["train_supporter"]
    assert simulate.published({"dialogues": "d", "sft_train": "t"}) == {"dialogues": "d", "simulate_sft_train": "t"}
    trained = {"sft": "s", "sft_run": "mlflow:1", "supporter": "s", "supporter_run": "mlflow:1", "table19": "t"}
    assert supporter.published(trained) == {
        "supporter_sft": "s",
        "supporter_sft_run": "mlflow:1",
        "supporter": "s",
        "supporter_supporter_run": "mlflow:1",
        "supporter_table19": "t",
    }
    assert supporter.published(trained, variant="emotion") == {f"emotion_{k}": v for k, v in trained.items()}
    rg = {"rg": "r", "rg_run": "mlflow:2", "rg_single_turn_sft": "r0"}
    assert STAGES_BY_NAME["train_rg"].published(rg) == rg
    assert STAGES_BY_NAME["train_rg"].published(rg, variant="emotion") == {"emotion_rg": "r"}
    assert simulate.published({"dialogues": "d", "sft_train": "t"}, variant="emotion") == {"emotion_dialogues": "d"}


def test_a_variant_trains_its_own_generator_only_when_its_recipe_changes_it():
    from esvr.flows.pipeline import variant_reads

    paper = load_config(ROOT / "configs/paper.yaml")
    emotion = paper.variant("emotion")
    assert [s.name for s in PIPELINE if s.runs_for_variant(emotion, paper)] == VARIANT_STAGES
    same_rg = load_config(None, ["variants={plain: {train_supporter: {reward: emotion}}}"])
    assert [s.name for s in PIPELINE if s.runs_for_variant(same_rg.variant("plain"), same_rg)] == ["simulate", "train_supporter"]
    # a generator trained without values simulates without a target value detector
    assert variant_reads(emotion) == {"tvd": None}
    assert variant_reads(same_rg.variant("plain")) == {}


def test_evaluation_rows_take_the_supporters_and_generators_this_run_trained():
    paper = load_config(ROOT / "configs/paper.yaml")
    evaluate = STAGES_BY_NAME["evaluate"]
    artifacts = {"personas": "p", "rg": "R", "emotion_rg": "ER", "supporter_sft": "s", "supporter_dpo": "d", "emotion_sft": "es"}
    kwargs = evaluate.arguments(paper, artifacts)
    assert (kwargs["personas_path"], kwargs["tvd"], kwargs["rg"]) == ("p", None, "R")
    assert kwargs["supporters"] == {
        "Ours (SFT)": {"model": "s", "rg": "R"},
        "Ours (DPO)": {"model": "d", "rg": "R"},
        "Emotion-Reinforced SFT": {"model": "es", "rg": "ER"},
        # no DPO pair for the variant: its SFT model stands in
        "Emotion-Reinforced DPO": {"model": "es", "rg": "ER"},
    }
    assert evaluate.arguments(paper, {})["supporters"] is None
    report = STAGES_BY_NAME["report"]
    assert report.arguments(paper, {"evaluate_summary": "s.json"}) == {"summaries": ["s.json"]}
    assert report.arguments(paper, {}) == {"summaries": None}
