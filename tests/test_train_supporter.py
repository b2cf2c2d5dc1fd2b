"""Stage 7 end to end: scripted dialogues -> rollouts -> pairs (Table 19) -> SFT and DPO on the tiny Llama.

The seeker, supporter, TVD, RG and the LLM value detector are the scripted world of
`supporter_script` behind the stub OpenAI server, so rollouts and pairs are deterministic; the
trainers run for real on the tiny random Llama.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from supporter_script import CAREER_REPLY, END_REPLY, PLAIN_REPLY, personas, script

from esvr.flows.config import PipelineConfig
from esvr.models.backends import load_chat_model
from esvr.models.config import ModelConfig
from esvr.tasks.simulation.simulate import SimulateConfig, build_agents, load_dialogues, simulate_dialogues
from esvr.tasks.supporter.preferences import rollout_candidates


def stub_cfg(server) -> dict:
    return {"spec": "openai:stub", "base_url": server.base_url}


def make_agents(server, sim: SimulateConfig):
    model = load_chat_model(ModelConfig(**stub_cfg(server)))
    return build_agents(sim, model, model, tvd_model=model, rg_model=model)


@pytest.fixture()
def dialogues(stub_server, tmp_path: Path) -> Path:
    stub_server.reply = script
    sim = SimulateConfig(emotion=False, supporter_temperature=0.0, seeker_temperature=0.0)
    out = tmp_path / "simulate" / "main" / "dialogues.jsonl"
    summary = simulate_dialogues(personas(), out, make_agents(stub_server, sim), concurrency=4, alternatives=True)
    assert summary.written == 3 and not summary.errors
    return out


def test_rollouts_continue_both_candidates_and_resume(stub_server, dialogues: Path, tmp_path: Path):
    sim = SimulateConfig(emotion=False)
    agents = make_agents(stub_server, sim)
    out = tmp_path / "rollouts.jsonl"
    summary = rollout_candidates(load_dialogues(dialogues), agents, out, horizon=2, max_turns_per_dialogue=2)
    assert summary.turns == 6 and summary.rollouts_written == 12 and not summary.errors
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    by_key = {r["key"]: r for r in rows}
    first_init, first_alt = by_key["p-train-1#1#initial"], by_key["p-train-1#1#alternative"]
    seeker = lambda r: [u["text"] for u in r["continuation"] if u["role"] == "seeker"]  # noqa: E731
    # the candidate is answered first; h=2 means two seeker utterances with a supporter turn between
    assert seeker(first_init) == [CAREER_REPLY, CAREER_REPLY]
    assert seeker(first_alt) == [PLAIN_REPLY, CAREER_REPLY]
    assert [u["role"] for u in first_init["continuation"]] == ["seeker", "supporter", "seeker"]
    assert first_init["end_reason"] == "horizon" and first_init["target_values"] == ["Achievement"]
    # turn 2: the seeker's third answer ends the dialogue before the horizon
    assert seeker(by_key["p-train-1#2#initial"]) == [CAREER_REPLY, END_REPLY.replace(" [END]", "")]
    assert by_key["p-train-1#2#initial"]["end_reason"] == "seeker_end"
    again = rollout_candidates(load_dialogues(dialogues), agents, out, horizon=2, max_turns_per_dialogue=2)
    assert again.rollouts_written == 0 and again.rollouts_existing == 12
    with pytest.raises(ValueError, match="horizon"):
        rollout_candidates(load_dialogues(dialogues), agents, out, horizon=3)


def _config(stub_server, tiny_llama: Path, out_dir: Path, **supporter: object) -> PipelineConfig:
    stub = stub_cfg(stub_server)
    ts = {
        # one step on one or two examples: the prompts are ~1k tokens and the CI has 2 cores
        "sft": {
            "max_steps": 1,
            "batch_size": 2,
            "learning_rate": 5e-3,
            "max_length": 2048,
            "max_train_examples": 2,
            "max_eval_examples": 1,
        },
        "dpo": {
            "max_steps": 1,
            "batch_size": 1,
            "learning_rate": 5e-3,
            "max_length": 2048,
            "max_train_examples": 1,
            "max_eval_examples": 1,
        },
        "dpo_simulations": "prompted",
        "sweep": [{"h": 1, "gamma": 1, "t_diff": 0}, {"h": "all", "gamma": 0.9, "t_diff": 0.5}],
        "selected": {"h": 1, "gamma": 1, "t_diff": 0},
        "value_detector": {"backend": "llm", "model": stub},
    }
    ts.update(supporter)
    return PipelineConfig.model_validate(
        {
            "run": {"out_dir": str(out_dir), "experiment": "test-supporter"},
            "models": {"supporter": stub, "seeker": stub, "judge": stub, "base": f"hf:{tiny_llama}"},
            "simulate": {"emotion": False, "tvd": stub, "rg": stub, "supporter_temperature": 0.0, "seeker_temperature": 0.0},
            "train_supporter": ts,
        }
    )


def _lora_b_norm(adapter: Path) -> float:
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    return float(sum(w.abs().sum() for k, w in weights.items() if "lora_B" in k))


def test_train_supporter_flow_sft_pairs_dpo(prefect_harness, stub_server, dialogues: Path, tiny_llama: Path, tmp_path: Path):
    import json

    from mlflow.tracking import MlflowClient

    from esvr.flows.chat import resolve_supporter
    from esvr.flows.train_supporter import train_supporter_flow

    out_dir = dialogues.parents[2]
    config = _config(stub_server, tiny_llama, out_dir)
    artifacts = train_supporter_flow(config, dialogues)

    # SFT: 9 turns x (initial + alternative) = 18 examples; the LoRA B matrices (zero at init) moved
    stats = json.loads((out_dir / "train_supporter" / "sft" / "sft_data_stats.json").read_text())
    assert stats["train"]["examples"] == 12 and stats["dev"]["examples"] == 6
    sft_adapter = Path(artifacts["sft"].split("+", 1)[1])
    assert _lora_b_norm(sft_adapter) > 0
    assert json.loads((sft_adapter / "component.json").read_text())["component"] == "supporter"

    # Table 19: turns 1-2 of each dialogue: the initial response (about the career) makes the
    # seeker express Achievement, the alternative does not; turn 3 is answered by [END] either way
    table = json.loads((out_dir / "train_supporter" / "dpo" / "preferences_value" / "table19.json").read_text())["table19"]
    for name in ("h=1,gamma=1,t_diff=0", "h=all,gamma=0.9,t_diff=0.5"):
        assert table[name]["train"] == {"candidates": 6, "pairs": 4, "chosen_initial": 4, "chosen_alternative": 0}
        assert table[name]["dev"] == {"candidates": 3, "pairs": 2, "chosen_initial": 2, "chosen_alternative": 0}
    pairs = [
        orjson.loads(line)
        for line in (out_dir / "train_supporter" / "dpo" / "preferences_value" / "pairs_h1_gamma1_t_diff0.jsonl")
        .read_bytes()
        .splitlines()
    ]
    assert "career" in pairs[0]["chosen"][0]["content"] and "calm" in pairs[0]["rejected"][0]["content"]
    assert pairs[0]["prompt"][0]["role"] == "system" and "Achievement" in pairs[0]["prompt"][1]["content"]

    # DPO: trained on top of SFT; the stacked adapter has both ranks, the DPO LoRA moved
    dpo_adapter = Path(artifacts["dpo"].split("+", 1)[1])
    assert artifacts["supporter"] == artifacts["dpo"]
    assert json.loads((dpo_adapter / "adapter_config.json").read_text())["r"] == 16
    assert _lora_b_norm(dpo_adapter.parent / "dpo_only") > 0

    # MLflow: the parent run, SFT and DPO runs with adapters, one run per sweep setting
    client = MlflowClient()
    exp = client.get_experiment_by_name("test-supporter")
    runs = client.search_runs([exp.experiment_id])
    by_stage = {r.data.tags.get("esvr.stage"): r for r in runs}
    assert {"train_supporter", "supporter.sft.value", "supporter.dpo.value.h=1,gamma=1,t_diff=0"} <= set(by_stage)
    setting_runs = [r for r in runs if r.data.tags.get("esvr.stage", "").startswith("supporter.pairs.")]
    assert len(setting_runs) == 2 and all(r.data.metrics["train.pairs"] == 4 for r in setting_runs)
    # the sweep's runs line up in MLflow's Compare (and `esvr compare`): the setting as params, one set of metric names
    assert sorted((r.data.params["h"], r.data.params["gamma"], r.data.params["t_diff"]) for r in setting_runs) == [
        ("1", "1.0", "0.0"),
        ("all", "0.9", "0.5"),
    ]
    assert setting_runs[0].data.metrics.keys() == setting_runs[1].data.metrics.keys()
    dpo_run = by_stage["supporter.dpo.value.h=1,gamma=1,t_diff=0"]
    assert "adapter" in [a.path for a in client.list_artifacts(dpo_run.info.run_id)]

    # `esvr chat --supporter latest` finds the DPO model and the TVD/RG it was trained with
    resolved = resolve_supporter("latest", "test-supporter")
    assert resolved.spec.startswith(f"hf:{tiny_llama}+") and "dpo" in resolved.source
    assert resolved.tvd == "openai:stub"

    # a setting that yields no pairs: DPO is skipped with a message, the SFT model stands
    config = _config(stub_server, tiny_llama, out_dir, selected={"h": 1, "gamma": 1, "t_diff": 5})
    again = train_supporter_flow(config, dialogues)
    assert "dpo" not in again and again["supporter"] == again["sft"] == artifacts["sft"]


def test_an_empty_dev_split_is_saved_and_reads_back(tmp_path):
    """The demo simulates no dev personas: the SFT dataset must still load for training."""
    from datasets import load_from_disk

    from esvr.tasks.supporter.train_supporter import _save_dataset

    path = _save_dataset({"train": [{"prompt": "p", "completion": "c"}], "dev": []}, tmp_path / "sft")
    splits = load_from_disk(str(path), keep_in_memory=True)
    assert len(splits["train"]) == 1 and len(splits["dev"]) == 0
    assert splits["dev"].column_names == ["prompt", "completion"]


def test_no_pairs_at_all_still_saves_an_empty_dataset(tmp_path):
    """0 pairs (nothing cleared T_diff) must reach the DPO stage's clear skip, not a crash."""
    from datasets import load_from_disk

    from esvr.tasks.supporter.train_supporter import _save_dataset

    path = _save_dataset({"train": [], "dev": []}, tmp_path / "dpo", columns=("prompt", "chosen", "rejected"))
    splits = load_from_disk(str(path), keep_in_memory=True)
    assert len(splits["train"]) == 0 and splits["train"].column_names == ["prompt", "chosen", "rejected"]
