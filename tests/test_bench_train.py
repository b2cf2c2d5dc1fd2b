"""`esvr bench train` (tasks/bench/train.py): what it measures through the real trainers.

Runs on CPU with the tiny model in seconds; the gpu test runs the same bench on CUDA with a small
shape (the 8B one is for the device check, infra/gpu/device_check.sh). This file imports nothing
beyond the bench's own chain (no Prefect, no MLflow at import), so the GPU machine can run it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from esvr.flows.recipe import read_recipe
from esvr.tasks.bench.train import SHAPES, bench_train, recipe_train_configs, word_tokenizer

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper.yaml"
MEASUREMENT_FIELDS = {
    "kind",
    "n_params",
    "max_length",
    "batch_size",
    "grad_accum",
    "lora_r",
    "lora_alpha",
    "bf16",
    "gradient_checkpointing",
    "attn",
    "step_times_s",
    "step_time_s",
    "timed_steps",
    "tokens_per_step",
    "tokens_per_s",
    "flops_per_token",
    "mfu",
    "mfu_lora",
    "peak_memory_gb",
    "peak_memory_kind",
    "trainable_params",
    "lora_weights_changed",
    "train_loss",
}


def lora_params(shape: dict, r: int) -> int:
    """LoRA A and B of q/k/v/o per layer: r x (in + out) each."""
    h = shape["hidden_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return shape["num_hidden_layers"] * r * ((h + h) * 2 + (h + kv) * 2)


def short_bench(out: Path, **options) -> dict:
    """The paper recipe's bench for 1 warm-up and 2 timed steps, with generation; `bench.json` and
    the trainers' work folder under `out`."""
    return bench_train(
        recipe=read_recipe(PAPER),
        config=PAPER,
        steps=2,
        warmup=1,
        generate=True,
        json_path=out / "bench.json",
        out_dir=out / "work",
        **options,
    )


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory):
    if torch.cuda.is_available():
        pytest.skip("the CPU path of the bench")
    out = tmp_path_factory.mktemp("bench-train")
    lines: list[str] = []
    report = short_bench(out, max_length=64, gen_batch_sizes=(1, 4), gen_new_tokens=4, print_fn=lines.append)
    return report, lines, out / "bench.json"


@pytest.mark.slow
def test_cpu_bench_measures_steps_of_full_length_sequences(cpu_run):
    report, _, _ = cpu_run
    sft, dpo = report["measurements"]
    assert (sft["kind"], dpo["kind"]) == ("sft", "dpo")
    for m in (sft, dpo):
        assert m["max_length"] == 64 and m["timed_steps"] == 2 and len(m["step_times_s"]) == 3
        assert all(t > 0 for t in m["step_times_s"]) and m["step_time_s"] > 0
        assert m["tokens_per_s"] == pytest.approx(m["tokens_per_step"] / m["step_time_s"])
        assert math.isfinite(m["train_loss"])
        assert m["peak_memory_kind"] == "process peak RSS" and m["peak_memory_gb"] > 0
        assert m["mfu"] is None  # no peak FLOP/s on CPU
        assert not m["bf16"] and not m["gradient_checkpointing"]  # the trainers' CPU rule
    # every sequence fills max_length exactly: SFT rows, and DPO's chosen + rejected of each pair
    assert sft["tokens_per_step"] == sft["batch_size"] * 64
    assert dpo["tokens_per_step"] == 2 * dpo["batch_size"] * 64


@pytest.mark.slow
def test_cpu_bench_trains_the_recipes_lora(cpu_run):
    report, _, _ = cpu_run
    sft, dpo = report["measurements"]
    # the recipe's settings: TVD SFT batch 4, RG DPO batch 2, r 8 on q/k/v/o
    assert (sft["batch_size"], dpo["batch_size"], sft["lora_r"], sft["lora_alpha"]) == (4, 2, 8, 16)
    assert report["model"] == "tiny" and sft["n_params"] > 0
    for m in (sft, dpo):
        assert m["trainable_params"] == lora_params(SHAPES["tiny"], 8)
        assert m["lora_weights_changed"] and m["lora_max_abs_change"] > 0
        assert m["flops_per_token"] == (6 if m["kind"] == "sft" else 8) * m["n_params"]


@pytest.mark.slow
def test_cpu_bench_writes_every_number_and_ends_with_the_goal_line(cpu_run):
    report, lines, path = cpu_run
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(report))
    for m in saved["measurements"]:
        assert MEASUREMENT_FIELDS <= set(m), MEASUREMENT_FIELDS - set(m)
    assert {"machine", "recipe", "sections", "shape", "mfu_convention", "goal", "generation"} <= set(saved)
    assert saved["sections"] == {"sft": "train_tvd.train", "dpo": "train_rg.single_turn.dpo"}
    assert lines[-1] == saved["goal"] == "goal: LoRA SFT at 2,048 tokens >= 40% MFU (6N): n/a on CPU"
    assert any(line.startswith("sft: 64 tokens x batch 4") for line in lines)


@pytest.mark.slow
def test_cpu_bench_measures_generation_of_the_hf_backend(cpu_run):
    report, lines, _ = cpu_run
    gen = report["generation"]
    assert [g["batch_size"] for g in gen] == [1, 4]
    for g in gen:
        assert 0 < g["new_tokens"] <= g["batch_size"] * 4
        assert g["tokens_per_s"] == pytest.approx(g["new_tokens"] / g["wall_s"])
    assert sum(line.startswith("generate (hf backend), batch") for line in lines) == 2


def test_recipe_settings_are_the_resolved_configs():
    """The bench reads the recipe without Prefect; it must agree with the pipeline's own loader."""
    from esvr.flows.config import load_config

    (sft, dpo), sections = recipe_train_configs(read_recipe(PAPER), PAPER)
    config = load_config(PAPER)
    assert sft == config.train_tvd.train
    assert dpo == config.train_rg.single_turn.dpo
    assert sections == ["train_tvd.train", "train_rg.single_turn.dpo"]
    assert (sft.max_length, sft.lora_r, sft.lora_alpha) == (2048, 8, 16)


def test_word_tokenizer_is_one_token_per_word_and_renders_prompts_as_prefixes():
    tok = word_tokenizer(1000)
    prompt = [{"role": "user", "content": "t10 t11 t12"}]
    full = prompt + [{"role": "assistant", "content": "t13 t14"}]
    p_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    f_ids = tok.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
    assert f_ids[: len(p_ids)] == p_ids  # TRL's completion mask starts where the prompt ends
    assert len(f_ids) - len(p_ids) == 3  # two words and the end marker
    assert tok.unk_token_id not in f_ids and len(tok) == 1000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "no-such-recipe.yaml"], "config file not found: /"),
        (["--steps", "0"], "--steps and --grad-accum must be at least 1"),
    ],
)
def test_cli_mistakes_end_in_one_line(argv, message, capsys: pytest.CaptureFixture[str]):
    from esvr.flows.cli import main

    assert main(["bench", "train", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert argv[0] != "--config" or "no-such-recipe.yaml\n" in err


def test_cli_names_an_attention_that_is_not_installed(capsys: pytest.CaptureFixture[str]):
    from transformers.utils import is_flash_attn_2_available

    from esvr.flows.cli import main

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    assert main(["bench", "train", "--config", str(PAPER), "--attn", "flash_attention_2"]) == 2
    assert "--attn flash_attention_2 is not available here (available: sdpa, eager)" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_bench_small_shape_uses_bf16_the_recipes_checkpointing_and_reports_mfu(tmp_path: Path):
    report = short_bench(tmp_path, model="tiny", max_length=256, gen_batch_sizes=(1, 8), gen_new_tokens=8)
    # paper.yaml turns checkpointing off for its 2,048-token SFT; DPO leaves it to the CUDA default (on)
    checkpointing = {"sft": False, "dpo": True}
    for m in report["measurements"]:
        assert "error" not in m, m
        assert m["bf16"] == torch.cuda.is_bf16_supported() and m["gradient_checkpointing"] == checkpointing[m["kind"]]
        assert m["peak_memory_kind"] == "torch.cuda.max_memory_allocated" and m["peak_memory_gb"] > 0
        assert m["tokens_per_s"] == pytest.approx(m["tokens_per_step"] / m["step_time_s"])
        assert m["lora_weights_changed"]
        if report["peak_bf16_flops"]:
            assert 0 < m["mfu"] < 1
    assert report["measurements"][0]["tokens_per_step"] == 4 * 256
    assert all(g["tokens_per_s"] > 0 for g in report["generation"])
    # the tiny shape is not the goal's measurement
    assert report["goal"].endswith("n/a (SFT measured at 256 tokens)")
