"""One place turns a model reference into a model: a trained component named ``mlflow:<run_id>``
resolves the same way for `esvr simulate`, `esvr evaluate` and the roles every stage loads.

A real MLflow run (the run folder's SQLite store) holds a real LoRA adapter of the tiny Llama as
its ``adapter`` artifact; the seeker is the stub OpenAI server on 127.0.0.1.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from esvr.flows.config import PipelineConfig
from esvr.models.config import ModelConfig


def _adapter(tiny_llama: Path, folder: Path) -> Path:
    """A LoRA adapter of the tiny Llama with its component.json, as training writes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from esvr.tasks.common.roles import write_component

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(folder)
    write_component(folder, base=f"hf:{tiny_llama}", component="supporter", stage="sft")
    return folder


def _config(run_dir: Path, base_url: str) -> PipelineConfig:
    seeker = {"spec": "openai:stub", "base_url": base_url, "max_retries": 1}
    return PipelineConfig.model_validate(
        {
            "run": {"out_dir": str(run_dir), "experiment": "roles-test"},
            "models": {"supporter": seeker, "seeker": seeker, "judge": seeker, "persona_writer": seeker},
            "simulate": {
                "emotion": False,
                "max_turns": 1,
                "alternatives": False,
                "reask": 0,
                "fallback": "fail",
                "supporter_max_tokens": 8,
                "concurrency": 2,
            },
        }
    )


@pytest.fixture()
def logged_adapter(tiny_llama: Path, tmp_path: Path, stub_server, monkeypatch) -> tuple[PipelineConfig, str]:
    """(config, run id) of a finished MLflow run in the config's run folder that logged an adapter."""
    import mlflow

    from esvr.flows import tracking

    monkeypatch.setenv("ESVR_CACHE_DIR", str(tmp_path / "cache"))  # downloaded components go here
    config = _config(tmp_path / "run", stub_server.base_url)
    tracking.setup(config)
    with mlflow.start_run(run_name="supporter.sft.value") as run:
        mlflow.log_artifacts(str(_adapter(tiny_llama, tmp_path / "trained" / "adapter")), artifact_path="adapter")
    return config, run.info.run_id


def test_mlflow_reference_resolves_alike_for_every_role_and_the_evaluation(logged_adapter, tiny_llama: Path, tmp_path: Path):
    from esvr.flows.evaluate import supporter_model
    from esvr.tasks.common.roles import model_config
    from esvr.tasks.evaluation.evaluate import SupporterUnderTest

    config, run_id = logged_adapter
    downloaded = tmp_path / "cache" / "components" / run_id / "adapter"
    expected = ModelConfig(spec=f"hf:{tiny_llama}+{downloaded.resolve()}")
    assert model_config(f"mlflow:{run_id}") == expected
    row = SupporterUnderTest(name="Ours (SFT)")
    assert supporter_model(config, row, f"mlflow:{run_id}", tmp_path / "evaluate") == expected
    assert model_config("") is None and model_config(None) is None and model_config(expected) is expected
    assert model_config("openai:gpt-4o-mini") == ModelConfig(spec="openai:gpt-4o-mini")


def test_simulate_command_takes_a_supporter_from_an_mlflow_run(logged_adapter, tmp_path: Path, prefect_harness):
    from test_evaluate import write_personas

    from esvr.flows.cli import main
    from esvr.flows.config import dump_config
    from esvr.tasks.simulation.simulate import load_dialogues

    config, run_id = logged_adapter
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(dump_config(config))
    personas = write_personas(tmp_path / "personas.jsonl")
    status = main(
        [
            "simulate",
            "--config",
            str(recipe),
            "--personas",
            str(personas),
            "--split",
            "test",
            "--supporter",
            f"mlflow:{run_id}",
            "--tvd",
            "",
            "--rg",
            "",
        ]
    )
    # The tiny random adapter writes no usable reply, so the stage fails (no usable dialogue) after
    # keeping its dialogues: what matters here is which supporter they were made with.
    assert status == 1
    dialogues = load_dialogues(config.run.out_dir / "simulate" / "main" / "dialogues.jsonl")
    adapter = (tmp_path / "cache" / "components" / run_id / "adapter").resolve()
    assert len(dialogues) == 2 and all(f"+{adapter}@" in d["supporter"] for d in dialogues), [d["supporter"] for d in dialogues]
