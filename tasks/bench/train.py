"""`esvr bench train`: step time, tokens/s, memory and MFU of the project's LoRA trainers.

One LoRA SFT and one DPO measurement run through `esvr.models.training.train_sft` /
`train_dpo` with the trainer settings of a recipe (default ``configs/paper.yaml``: the TVD's SFT
section, ``train_tvd.train``, and the final reference generator's DPO section,
``train_rg.<final_setting>.dpo``), on synthetic conversations whose every training sequence is
exactly ``max_length`` tokens long (the trainers cut the over-long completions at the end).
``--generate`` measures the ``hf`` chat backend's generation throughput at several batch sizes.

The model is random: on CUDA one of Llama-3-8B's shape (hidden 4096, 32 layers, 32 heads, 8 KV
heads, intermediate 14336, vocabulary 128256) in bf16; on CPU the tests' tiny Llama. Its vocabulary
is a word-level tokenizer built here (one word, one token), so lengths are exact and nothing is
downloaded. The trainers load their base model from a path; here they are handed the model built
in memory instead (an 8B checkpoint would be a 16 GB write and read per measurement).

MFU follows the usual convention: model FLOPs per token / peak dense bf16 FLOP/s, with
6·N per trained token for SFT (N: every parameter of the base model; attention-score FLOPs and
gradient-checkpointing recomputation not counted) and 8·N for DPO (the policy's 6·N plus the
reference forward pass, 2·N, on the same chosen and rejected tokens). With LoRA no weight gradient
of the base is computed, so the work actually needed is smaller: the LoRA-aware figure counts 4·N
for SFT (forward + activation gradients) and 6·N for DPO.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from esvr.models.config import ConfigError

#: the LlamaConfig fields that make a shape, in the order of each shape's row below
_SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
)
#: Llama-3-8B(-Instruct)'s shape, the paper's base model
LLAMA3_8B: dict[str, Any] = dict(
    zip(_SHAPE_FIELDS, (4096, 14336, 32, 32, 8, 128256, 8192, False)), rope_theta=500000.0, rms_norm_eps=1e-5
)
#: the tests' tiny random Llama (`tiny_llama` in tests/conftest.py), with SmolLM2's vocabulary size
TINY: dict[str, Any] = dict(zip(_SHAPE_FIELDS, (64, 128, 2, 4, 2, 49152, 4096, True)))
SHAPES: dict[str, dict[str, Any]] = {"llama3-8b": LLAMA3_8B, "tiny": TINY}

#: dense bf16 tensor-core peaks (no sparsity), TFLOP/s; the first name found in the device name wins
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]

#: the goal this bench reports on: LoRA SFT of the 8B shape at 2,048 tokens on one GPU
GOAL_MFU, GOAL_LENGTH = 0.40, 2048

_SPECIALS = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


# --------------------------------------------------------------------------------------------
# Synthetic model, tokenizer and data
# --------------------------------------------------------------------------------------------


def word_tokenizer(vocab_size: int):
    """A tokenizer of `vocab_size` words ``t<id>`` (plus chat markers): one word, one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    vocab.update({f"t{i}": i for i in range(len(_SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", chat_template=_CHAT_TEMPLATE
    )


def random_words(rng: np.random.Generator, n: int, vocab_size: int) -> str:
    return " ".join(f"t{i}" for i in rng.integers(len(_SPECIALS), vocab_size, size=n))


def build_model(shape: dict[str, Any], tokenizer, dtype, device: str, attn: str, seed: int = 0):
    """A randomly initialised Llama of `shape` with `tokenizer`'s special tokens, built directly on
    `device` (no CPU copy of 8B)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn)


def sft_rows(n: int, max_length: int, vocab_size: int, seed: int = 0) -> list[dict[str, Any]]:
    """Conversations whose prompt is a quarter of `max_length` and whose completion overflows it."""
    rng = np.random.default_rng(seed)
    part = max(1, max_length // 8)
    return [
        {
            "prompt": [
                {"role": "system", "content": random_words(rng, part, vocab_size)},
                {"role": "user", "content": random_words(rng, part, vocab_size)},
            ],
            "completion": [{"role": "assistant", "content": random_words(rng, max_length, vocab_size)}],
        }
        for _ in range(n)
    ]


def dpo_rows(n: int, max_length: int, vocab_size: int, seed: int = 0) -> list[dict[str, Any]]:
    rows = sft_rows(n, max_length, vocab_size, seed)
    rng = np.random.default_rng(seed + 1)
    return [
        {
            "prompt": r["prompt"],
            "chosen": r["completion"],
            "rejected": [{"role": "assistant", "content": random_words(rng, max_length, vocab_size)}],
        }
        for r in rows
    ]


@contextlib.contextmanager
def in_memory_base(load: Callable[[bool], Any], tokenizer) -> Iterator[None]:
    """Let `train_sft`/`train_dpo` train `load(bf16)` instead of reading their base from a path."""
    from esvr.models import training

    original = training.load_base

    def load_base(base_model_path, bf16, sft_adapter_dir=None):
        return load(bf16), tokenizer

    training.load_base = load_base
    try:
        yield
    finally:
        training.load_base = original


# --------------------------------------------------------------------------------------------
# Machine facts
# --------------------------------------------------------------------------------------------


def peak_bf16_flops(device_name: str) -> float | None:
    for name, tflops in PEAK_BF16_TFLOPS:
        if name.lower() in device_name.lower():
            return tflops * 1e12
    return None


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gb() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9, "torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux: the process's high-water mark since it started
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "process peak RSS"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }
    for pkg in ("trl", "peft", "datasets", "accelerate"):
        with contextlib.suppress(Exception):
            info[pkg] = __import__(pkg).__version__
    if cuda:
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 1e9
    return info


def available_attn() -> list[str]:
    from transformers.utils import is_flash_attn_2_available

    return ["sdpa", "eager"] + (["flash_attention_2"] if is_flash_attn_2_available() else [])


# --------------------------------------------------------------------------------------------
# Training measurements
# --------------------------------------------------------------------------------------------


def _step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time and tokens at every optimizer step; LoRA weights before and after training."""

        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []
            self.lora_before: dict[str, Any] = {}
            self.lora_change = 0.0
            self.trainable = 0

        def on_init_end(self, args, state, control, **kw):
            # the Trainer's own count of the tokens it fed the model (padding excluded)
            args.include_num_input_tokens_seen = "non_padding"

        def on_train_begin(self, args, state, control, model=None, **kw):
            lora = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self.lora_before = {n: p.detach().float().cpu().clone() for n, p in lora.items()}
            _reset_peak()
            self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

        def on_step_end(self, args, state, control, **kw):
            _sync()
            self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

        def on_train_end(self, args, state, control, model=None, **kw):
            after = {n: p.detach().float().cpu() for n, p in model.named_parameters() if n in self.lora_before}
            self.lora_change = max(
                (float((after[n] - b).abs().max()) for n, b in self.lora_before.items() if n in after), default=0.0
            )

    return StepClock()


def _figures(clock, warmup: int, flops_per_token: float, lora_flops_per_token: float, peak: float | None) -> dict[str, Any]:
    intervals = [(t1 - t0, k1 - k0) for (t0, k0), (t1, k1) in zip(clock.marks, clock.marks[1:])]
    timed = intervals[warmup:] or intervals[-1:]
    step_time = statistics.median(t for t, _ in timed)
    tokens_per_step = sum(k for _, k in timed) / len(timed)
    tokens_per_s = tokens_per_step / step_time
    out: dict[str, Any] = {
        "step_times_s": [round(t, 6) for t, _ in intervals],
        "warmup_steps": min(warmup, len(intervals) - len(timed)),
        "timed_steps": len(timed),
        "step_time_s": step_time,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "lora_flops_per_token": lora_flops_per_token,
        "mfu": flops_per_token * tokens_per_s / peak if peak else None,
        "mfu_lora": lora_flops_per_token * tokens_per_s / peak if peak else None,
        "trainable_params": clock.trainable,
        "lora_max_abs_change": clock.lora_change,
        "lora_weights_changed": clock.lora_change > 0,
    }
    out["peak_memory_gb"], out["peak_memory_kind"] = _peak_memory_gb()
    return out


def measure_training(
    kind: str,
    cfg,
    *,
    shape: dict[str, Any],
    tokenizer,
    device: str,
    attn: str,
    steps: int,
    warmup: int,
    peak: float | None,
    out_dir: Path,
    seed: int = 0,
) -> dict[str, Any]:
    """One `train_sft` or `train_dpo` run of warmup + steps optimizer steps; its figures."""
    import torch
    from datasets import Dataset

    from esvr.models.training import precision_flags, train_dpo, train_sft

    bf16, gc_on = precision_flags(cfg)
    n_rows = (warmup + steps) * cfg.batch_size * cfg.grad_accum
    rows = (sft_rows if kind == "sft" else dpo_rows)(n_rows, cfg.max_length, shape["vocab_size"], seed)
    n_params: list[int] = []

    def load(bf16_flag: bool):
        model = build_model(shape, tokenizer, torch.bfloat16 if bf16_flag else torch.float32, device, attn, seed)
        n_params.append(sum(p.numel() for p in model.parameters()))
        return model

    clock = _step_clock()
    base = f"synthetic:{'x'.join(str(shape[k]) for k in ('hidden_size', 'num_hidden_layers'))}"
    started = time.perf_counter()
    with in_memory_base(load, tokenizer):
        if kind == "sft":
            result = train_sft(base, Dataset.from_list(rows), None, cfg, out_dir / kind, callbacks=[clock])
        else:
            result = train_dpo(base, None, Dataset.from_list(rows), None, cfg, out_dir / kind, callbacks=[clock])
    wall = time.perf_counter() - started
    n = n_params[0]
    # SFT: forward 2N + backward 4N; DPO adds the reference forward (2N) on the same tokens.
    flops, lora_flops = (6 * n, 4 * n) if kind == "sft" else (8 * n, 6 * n)
    out = {
        "kind": kind,
        "n_params": n,
        "max_length": cfg.max_length,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "lora_r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "target_modules": cfg.target_modules,
        "bf16": bf16,
        "gradient_checkpointing": gc_on,
        "attn": attn,
        "train_loss": result.metrics.get("train_loss"),
        "wall_s": wall,
        **_figures(clock, warmup, flops, lora_flops, peak),
    }
    del result, clock
    _free()
    return out


# --------------------------------------------------------------------------------------------
# Generation through the hf chat backend
# --------------------------------------------------------------------------------------------


def measure_generation(
    *,
    shape: dict[str, Any],
    tokenizer,
    device: str,
    attn: str,
    batch_sizes: list[int],
    new_tokens: int,
    prompt_tokens: int,
    repeats: int = 2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """New tokens per second of `HFChat.chat_batch` at each batch size (prefill included), best of `repeats`."""
    import torch

    from esvr.models import hf_backend
    from esvr.models.chat import ChatRequest

    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # what load_causal_lm uses
    model = build_model(shape, tokenizer, dtype, device, attn, seed).eval()
    chat = hf_backend.HFChat(
        f"synthetic:{shape['hidden_size']}x{shape['num_hidden_layers']}", device=device, weights=(model, tokenizer)
    )
    rng = np.random.default_rng(seed)
    results = []
    try:
        for batch in batch_sizes:
            chat.batch_size = batch
            best: dict[str, Any] | None = None
            _reset_peak()
            for r in range(repeats):
                requests = [
                    ChatRequest.build(
                        [{"role": "user", "content": random_words(rng, prompt_tokens, shape["vocab_size"])}],
                        max_tokens=new_tokens,
                        temperature=0.0,
                        seed=r,
                    )
                    for _ in range(batch)
                ]
                before = chat.usage.completion_tokens
                _sync()
                t0 = time.perf_counter()
                chat.chat_batch(requests)
                _sync()
                wall = time.perf_counter() - t0
                made = chat.usage.completion_tokens - before
                if best is None or made / wall > best["tokens_per_s"]:
                    best = {"batch_size": batch, "new_tokens": made, "wall_s": wall, "tokens_per_s": made / wall}
            assert best is not None
            best["prompt_tokens"] = prompt_tokens
            best["max_new_tokens"] = new_tokens
            best["peak_memory_gb"], best["peak_memory_kind"] = _peak_memory_gb()
            results.append(best)
    finally:
        chat.close()
        model = None
        _free()
    return results


# --------------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------------


def recipe_train_configs(data: Mapping[str, Any], path: str | os.PathLike[str] = "the recipe"):
    """(SFT, DPO) `TrainConfig`s of a resolved recipe (`esvr.flows.recipe.read_recipe`):
    ``train_tvd.train`` and ``train_rg.<final_setting>.dpo``. `path` names it in errors."""
    from pydantic import ValidationError

    from esvr.models.training import TrainConfig

    rg = data.get("train_rg") or {}
    setting = rg.get("final_setting", "single_turn")
    sections = {
        "train_tvd.train": (data.get("train_tvd") or {}).get("train"),
        f"train_rg.{setting}.dpo": (rg.get(setting) or {}).get("dpo"),
    }
    configs = []
    for key, section in sections.items():
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: no {key} section to take the trainer settings from")
        try:
            configs.append(TrainConfig.model_validate(section))
        except ValidationError as err:
            raise ConfigError(f"{path}: {key}: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}") from None
    return tuple(configs), list(sections)


def bench_train(
    *,
    recipe: Mapping[str, Any],
    config: str | os.PathLike[str] = "configs/paper.yaml",
    model: str = "auto",
    sft: bool = True,
    dpo: bool = True,
    generate: bool = False,
    steps: int = 6,
    warmup: int = 2,
    max_length: int | None = None,
    batch_size: int | None = None,
    dpo_batch_size: int | None = None,
    grad_accum: int = 1,
    gradient_checkpointing: bool | None = None,
    attn: str = "sdpa",
    gen_batch_sizes: tuple[int, ...] = (1, 8, 32, 64),
    gen_new_tokens: int | None = None,
    gen_prompt_tokens: int | None = None,
    peak_tflops: float | None = None,
    json_path: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure, print one line per measurement and the goal line last; return every number.

    `max_length` None: the recipe's on CUDA, 128 on CPU. `batch_size`/`dpo_batch_size` None: the
    recipe's. `grad_accum` 1: one micro-batch per timed step. `gradient_checkpointing` None: the
    trainers' rule (on with CUDA).
    """
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shape_name = model if model != "auto" else ("llama3-8b" if cuda else "tiny")
    if shape_name not in SHAPES:
        raise ConfigError(f"--model must be one of auto, {', '.join(SHAPES)}; got {model!r}")
    if attn not in available_attn():
        raise ConfigError(f"--attn {attn} is not available here (available: {', '.join(available_attn())})")
    if steps < 1 or warmup < 0 or grad_accum < 1:
        raise ConfigError("--steps and --grad-accum must be at least 1, --warmup at least 0")
    shape = SHAPES[shape_name]
    (sft_cfg, dpo_cfg), sections = recipe_train_configs(recipe, config)
    info = machine_info()
    peak = peak_tflops * 1e12 if peak_tflops else (peak_bf16_flops(info["device"]) if cuda else None)
    report: dict[str, Any] = {
        "machine": info,
        "recipe": str(config),
        "sections": {"sft": sections[0], "dpo": sections[1]},
        "model": shape_name,
        "shape": shape,
        "peak_bf16_flops": peak,
        "mfu_convention": "model FLOPs per token x tokens/s / peak dense bf16 FLOP/s; SFT 6N, DPO 8N "
        "(N = all base parameters; attention scores and recomputation not counted); "
        "LoRA-aware: SFT 4N, DPO 6N",
        "measurements": [],
        "generation": [],
    }
    print_fn(
        f"machine: {info['device']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"trl {info.get('trl', '?')}, peft {info.get('peft', '?')}" + (f", peak bf16 {peak / 1e12:.0f} TFLOP/s" if peak else "")
    )
    print_fn(
        f"model: {shape_name} shape, random weights, attention {attn}; settings from {config} "
        f"({sections[0]} for SFT, {sections[1]} for DPO)"
    )

    def save() -> None:
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(report, indent=2))

    tokenizer = word_tokenizer(shape["vocab_size"])
    # the model every measurement builds
    measured: dict[str, Any] = dict(shape=shape, tokenizer=tokenizer, device=device, attn=attn)
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="esvr-bench-train-"))
    try:
        common = dict(
            max_steps=warmup + steps,
            grad_accum=grad_accum,
            launcher="inprocess",
            eval_strategy="no",
            select_best=False,
            max_train_examples=None,
            logging_steps=1,
        )
        if gradient_checkpointing is not None:
            common["gradient_checkpointing"] = gradient_checkpointing
        # each kind: the recipe's section with the bench's overrides, when it is measured at all
        plan = [("sft", sft, sft_cfg, batch_size), ("dpo", dpo, dpo_cfg, dpo_batch_size)]
        runs = [
            (
                kind,
                recipe_cfg.model_copy(
                    update={
                        **common,
                        "batch_size": batch or recipe_cfg.batch_size,
                        "max_length": max_length or (recipe_cfg.max_length if cuda else 128),
                    }
                ),
            )
            for kind, wanted, recipe_cfg, batch in plan
            if wanted
        ]
        for kind, cfg in runs:
            try:
                m = measure_training(kind, cfg, **measured, steps=steps, warmup=warmup, peak=peak, out_dir=work)
            except torch.OutOfMemoryError as exc:
                _free()
                m = {
                    "kind": kind,
                    "max_length": cfg.max_length,
                    "batch_size": cfg.batch_size,
                    "error": f"out of memory: {str(exc).splitlines()[0]}",
                }
                print_fn(f"{kind}: {cfg.max_length} tokens x batch {cfg.batch_size}: out of memory")
            else:
                print_fn(format_measurement(m))
            report["measurements"].append(m)
            save()
        if generate:
            new = gen_new_tokens or (32 if cuda else 8)
            prompt = gen_prompt_tokens or (256 if cuda else 32)
            try:
                report["generation"] = measure_generation(
                    **measured, batch_sizes=list(gen_batch_sizes), new_tokens=new, prompt_tokens=prompt
                )
            except torch.OutOfMemoryError as exc:
                _free()
                report["generation_error"] = f"out of memory: {str(exc).splitlines()[0]}"
                print_fn(f"generate: out of memory ({report['generation_error']})")
            for g in report["generation"]:
                print_fn(
                    f"generate (hf backend), batch {g['batch_size']}: {g['tokens_per_s']:,.1f} new tokens/s "
                    f"({g['new_tokens']} tokens in {g['wall_s']:.2f} s, prompt {g['prompt_tokens']} tokens, prefill included), "
                    f"peak {g['peak_memory_gb']:.1f} GB"
                )
    finally:
        if out_dir is None:  # the adapters the trainers wrote
            shutil.rmtree(work, ignore_errors=True)
    report["goal"] = goal_line(report, cuda)
    save()
    print_fn(report["goal"])
    return report


def format_measurement(m: dict[str, Any]) -> str:
    mfu = (
        "MFU n/a on CPU"
        if m["mfu"] is None and m["peak_memory_kind"] == "process peak RSS"
        else (
            "MFU n/a (peak FLOP/s unknown: --peak-tflops)"
            if m["mfu"] is None
            else f"MFU {m['mfu']:.1%} ({m['flops_per_token'] // m['n_params']}N), LoRA-aware {m['mfu_lora']:.1%} ({m['lora_flops_per_token'] // m['n_params']}N)"
        )
    )
    return (
        f"{m['kind']}: {m['max_length']} tokens x batch {m['batch_size']} x accum {m['grad_accum']}, "
        f"gradient checkpointing {'on' if m['gradient_checkpointing'] else 'off'}, {'bf16' if m['bf16'] else 'fp32'}, "
        f"{_count(m['n_params'])} params: step {m['step_time_s']:.3f} s (median of {m['timed_steps']}), "
        f"{m['tokens_per_s']:,.0f} tokens/s, peak {m['peak_memory_gb']:.1f} GB ({m['peak_memory_kind']}), {mfu}"
    )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def goal_line(report: dict[str, Any], cuda: bool) -> str:
    head = f"goal: LoRA SFT at {GOAL_LENGTH:,} tokens >= {GOAL_MFU:.0%} MFU (6N):"
    if not cuda:
        return f"{head} n/a on CPU"
    sft = [m for m in report["measurements"] if m["kind"] == "sft" and "error" not in m]
    if not sft:
        return f"{head} n/a (no SFT measured)"
    m = sft[0]
    if m["max_length"] != GOAL_LENGTH:
        return f"{head} n/a (SFT measured at {m['max_length']} tokens)"
    if m["mfu"] is None:
        return f"{head} n/a (peak FLOP/s of {report['machine']['device']} unknown: pass --peak-tflops)"
    return f"{head} {'PASS' if m['mfu'] >= GOAL_MFU else 'MISSED'} ({m['mfu']:.1%} on {report['machine']['device']})"
