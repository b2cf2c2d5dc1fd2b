"""LoRA SFT and DPO on the tiny random Llama (models/training.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from esvr.models.training import TrainConfig, stack_adapters, train_dpo, train_sft

PROMPT = [{"role": "system", "content": "You support people."}, {"role": "user", "content": "I failed my exam and feel awful."}]


def sft_data(n: int = 6) -> Dataset:
    return Dataset.from_list(
        [
            {
                "prompt": PROMPT,
                "completion": [{"role": "assistant", "content": f"That is hard; one exam does not define you ({i})."}],
                "example_id": str(i),
            }
            for i in range(n)
        ]
    )


def dpo_data(n: int = 6) -> Dataset:
    return Dataset.from_list(
        [
            {
                "prompt": PROMPT,
                "chosen": [{"role": "assistant", "content": "That is hard. What would help you now?"}],
                "rejected": [{"role": "assistant", "content": "Exams are pointless anyway, forget it."}],
            }
            for _ in range(n)
        ]
    )


CFG = TrainConfig(max_steps=2, batch_size=2, learning_rate=5e-3, max_length=128, logging_steps=1)


class WeightWatch(TrainerCallback):
    """Snapshots LoRA and base parameters at the start and end of training."""

    def on_train_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kw):  # noqa: ANN001
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}

    def moved(self, lora: bool) -> list[str]:
        return [n for n in self.before if ("lora_" in n) == lora and not torch.equal(self.before[n], self.after[n])]


@pytest.fixture(scope="module")
def sft_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("sft")
    watch = WeightWatch()
    result = train_sft(tiny_llama, sft_data(), sft_data(2), CFG, tmp / "out", callbacks=[watch])
    return result, watch


def test_sft_trains_lora_only(sft_run, tiny_llama: Path):
    # per-step MLflow logging is checked on the flows (tests/test_tvd_rg.py), with a real store
    result, watch = sft_run
    assert watch.moved(lora=True), "no LoRA weight changed"
    assert not watch.moved(lora=False), f"base weights changed: {watch.moved(lora=False)[:3]}"
    assert math.isfinite(result.metrics["train_loss"]) and math.isfinite(result.metrics["eval_loss"])
    assert result.metrics["global_step"] == 2 and result.metrics["n_train"] == 6
    losses = [x["loss"] for x in result.log_history if "loss" in x]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["r"] == CFG.lora_r and saved["lora_alpha"] == CFG.lora_alpha
    assert (result.adapter_dir.parent / "training.json").exists()


def test_sft_adapter_reloads_through_the_chat_interface(sft_run, tiny_llama: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from esvr.models.backends import load_chat_model

    result, _ = sft_run
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    plain = base(ids).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(result.adapter_dir)).eval()
    assert not torch.allclose(plain, tuned(ids).logits), "the reloaded adapter changes nothing"
    chat = load_chat_model(f"hf:{tiny_llama}+{result.adapter_dir}")
    try:
        reply = chat.chat(PROMPT, max_tokens=4)
        assert len(reply) == 1 and isinstance(reply[0], str)
    finally:
        chat.close()


def test_sft_drops_prompts_that_leave_no_room(tiny_llama: Path, tmp_path: Path):
    long_prompt = [{"role": "user", "content": "word " * 400}]
    data = Dataset.from_list(
        [{"prompt": long_prompt, "completion": [{"role": "assistant", "content": "ok"}]}] * 2 + list(sft_data(2))
    )
    cfg = CFG.model_copy(update={"max_steps": 1})
    result = train_sft(tiny_llama, data, None, cfg, tmp_path)
    assert result.metrics["dropped_overlong_train"] == 2 and result.metrics["n_train"] == 2


def test_dpo_from_sft_uses_sft_as_reference_and_stacks_adapters(sft_run, tiny_llama: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft_result, _ = sft_run
    watch = WeightWatch()
    cfg = CFG.model_copy(update={"lora_r": 4, "lora_alpha": 16, "beta": 0.5})
    result = train_dpo(tiny_llama, sft_result.adapter_dir, dpo_data(), dpo_data(2), cfg, tmp_path / "dpo", callbacks=[watch])
    assert watch.moved(lora=True) and not watch.moved(lora=False)
    assert math.isfinite(result.metrics["train_loss"])
    first = next(x for x in result.log_history if "rewards/margins" in x)
    # step 1 logs before any update: policy == reference == base + SFT, so every reward is 0
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert result.adapter_dir == tmp_path / "dpo" / "adapter"

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(sft_result.adapter_dir))
    two_step = PeftModel.from_pretrained(merged.merge_and_unload(), str(tmp_path / "dpo" / "dpo_only")).eval()
    stacked = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(result.adapter_dir)).eval()
    assert torch.allclose(two_step(ids).logits, stacked(ids).logits, atol=1e-5)
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == CFG.lora_r + 4


def test_dpo_without_sft_saves_a_plain_adapter(tiny_llama: Path, tmp_path: Path):
    cfg = CFG.model_copy(update={"max_steps": 1})
    result = train_dpo(tiny_llama, None, dpo_data(4), None, cfg, tmp_path)
    assert (result.adapter_dir / "adapter_model.safetensors").exists() and not (tmp_path / "dpo_only").exists()


@pytest.mark.slow
def test_the_accelerate_launcher_runs_the_same_trainer_in_a_subprocess(sft_run, tiny_llama: Path, tmp_path: Path):
    """`launcher: accelerate` (one process here): the datasets and the config cross to
    ``python -m esvr.models.training``, whose training.json comes back as the result."""
    sft_result, _ = sft_run
    cfg = CFG.model_copy(update={"max_steps": 1, "launcher": "accelerate", "num_processes": 1})
    result = train_dpo(tiny_llama, sft_result.adapter_dir, dpo_data(4), None, cfg, tmp_path, metric_prefix="dpo.")
    assert result.adapter_dir == tmp_path / "adapter" and result.metrics["global_step"] == 1.0
    assert json.loads((tmp_path / "train_config.json").read_text())["launcher"] == "inprocess"
    assert (tmp_path / "data" / "train").is_dir() and not (tmp_path / "data" / "eval").exists()
    # base + SFT + DPO stacked, as in process
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == 2 * CFG.lora_r
    assert (tmp_path / "dpo_only" / "training.json").is_file()


def test_stack_adapters_refuses_what_it_cannot_represent(tmp_path: Path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        stack_adapters(bad, bad, tmp_path / "out")


@pytest.mark.gpu
def test_sft_on_cuda_uses_bf16_and_checkpointing(tiny_llama: Path, tmp_path: Path):
    result = train_sft(tiny_llama, sft_data(4), None, CFG, tmp_path)
    assert result.metrics["bf16"] == float(torch.cuda.is_bf16_supported())
    assert result.metrics["gradient_checkpointing"] == 1.0
    assert math.isfinite(result.metrics["train_loss"])


def test_narrow_logprob_tiles_on_cpu_give_the_same_log_probs(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch):
    """The CPU memory fix changes only how TRL's fused LM head tiles the vocabulary, not its results."""
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    from esvr.models.training import CPU_LOGPROB_VOCAB_CHUNK, fit_logprob_tiles_to_cpu

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    trl_utils.add_fused_lm_head(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = -100  # the prompt part, as in DPO and completion-only SFT

    def log_probs() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs

    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    wide = log_probs()
    fit_logprob_tiles_to_cpu()
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == CPU_LOGPROB_VOCAB_CHUNK < model.config.vocab_size
    torch.testing.assert_close(log_probs(), wide, rtol=1e-5, atol=1e-5)
    assert wide[:, 8:].abs().sum() > 0  # real log-probs, not a masked-out zero tensor
