"""Generic LoRA trainers: SFT and DPO with TRL, for every trained component of the pipeline.

The target value detector, the reference generator and the supporter model all train through
these two functions; a component only brings its datasets (TRL's conversational formats) and a
`TrainConfig`:

- `train_sft(base_model_path, train_ds, eval_ds, cfg, out_dir)`: rows ``{"prompt": [messages],
  "completion": [messages]}``; the loss covers the completion only.
- `train_dpo(base_model_path, sft_adapter_dir_or_None, train_ds, eval_ds, cfg, out_dir)`: rows
  ``{"prompt": [...], "chosen": [...], "rejected": [...]}``.

Both return a `TrainResult` whose ``adapter_dir`` holds a plain PEFT LoRA adapter of the base
model, so the component loads as the chat spec ``hf:<base>+<adapter_dir>``.

DPO from an SFT adapter (the paper trains DPO on top of SFT with other LoRA hyperparameters,
Table 6): the SFT adapter is merged into the base weights in memory, and a fresh LoRA with the DPO
settings trains on top. TRL's ``ref_model=None`` then uses that model with the new adapter
disabled as the reference, which is exactly the SFT policy, at no extra memory. The result is
exported as one stacked adapter of rank r_sft + r_dpo (`stack_adapters`) that reproduces
base + SFT + DPO exactly, so no merged copy of the base model is ever written to disk. The DPO-only
adapter is kept beside it (``dpo_only/``).

On CUDA, bf16 and gradient checkpointing switch on by themselves (TRL's defaults, which break or
slow CPU runs, are overridden there); for several GPUs, `launch` runs the same code under
``accelerate launch`` (``python -m esvr.models.training``). Per-step metrics go to the MLflow run
that is active when training starts (or the one named), from the main process only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from esvr.models.config import Section
from esvr.models.default_model import base_checkpoint
from esvr.models.memory import mark_freed

if TYPE_CHECKING:
    from transformers import Trainer
    from typing_extensions import Unpack  # typing's own from Python 3.11

#: a path given as a string or a path object
StrPath = str | os.PathLike[str]

# A completion needs room after its prompt: a prompt that leaves fewer tokens than this before
# `max_length` is dropped rather than trained on with its completion truncated to nothing.
MIN_COMPLETION_TOKENS = 16


class TrainConfig(Section):
    """One LoRA training run (SFT or DPO). Defaults are the CPU-safe, paper-neutral choices."""

    learning_rate: float = 5e-5
    epochs: float = 1.0
    #: > 0 stops after that many optimizer steps whatever `epochs` says (demo runs)
    max_steps: int = -1
    batch_size: int = 2
    eval_batch_size: int | None = None
    grad_accum: int = 1
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    #: the attention projections, the usual LoRA targets for Llama-family models (the paper does
    #: not say which modules it adapted); "all-linear" is accepted too
    target_modules: list[str] | str = ["q_proj", "k_proj", "v_proj", "o_proj"]
    #: DPO's KL strength (TRL's default; the paper does not report it)
    beta: float = 0.1
    #: prompt + completion tokens; longer ones are cut at the end, prompts that leave no room for
    #: a completion are dropped and counted
    max_length: int = 1024
    #: fraction of the steps spent warming the learning rate up
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    logging_steps: int = 1
    #: when to compute the dev loss during training; it is always computed once at the end
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: int | None = None
    #: keep the checkpoint with the lowest dev loss (saves one per evaluation)
    select_best: bool = False
    #: None = on when CUDA is available (bf16 only where the GPU supports it); off on CPU
    bf16: bool | None = None
    gradient_checkpointing: bool | None = None
    #: caps on the data actually used (demo runs); None = everything
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    seed: int = 0
    #: 'accelerate' runs training in a subprocess under `accelerate launch` (several GPUs)
    launcher: Literal["inprocess", "accelerate"] = "inprocess"
    #: processes for 'accelerate' (None: accelerate's own config / all visible GPUs)
    num_processes: int | None = None


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, float]
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"adapter_dir": str(self.adapter_dir), "metrics": self.metrics, "log_history": self.log_history}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        return cls(Path(data["adapter_dir"]), data["metrics"], data.get("log_history", []))


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def precision_flags(cfg: TrainConfig) -> tuple[bool, bool]:
    """(bf16, gradient_checkpointing): explicit settings win; otherwise on with CUDA, off without."""
    import torch

    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else (cuda and torch.cuda.is_bf16_supported())
    gc = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cuda
    return bool(bf16), bool(gc)


#: vocabulary columns per tile of TRL's chunked log-probabilities when training on CPU (see below)
CPU_LOGPROB_VOCAB_CHUNK = 4096


def fit_logprob_tiles_to_cpu() -> None:
    """Narrow the tiles of TRL's chunked log-probabilities when there is no GPU.

    TRL's trainers never build the full logits: they score [4096 tokens x 32768 vocabulary]
    tiles. Without Triton (CPU) a tile goes through plain torch ops, and each op makes another
    tile-sized temporary (0.3 GB each for the demo's 2.2k-token DPO pair in fp32). With
    4096-column tiles the demo's supporter stage peaked at 3.6 GiB instead of 5.4 GiB, and its DPO
    steps took 29 s instead of 40 (`esvr run --config configs/demo.yaml`, docs/training.md).
    That was the demo's highest stage. On CUDA, TRL's Triton kernel is left as it is.
    """
    import torch
    import trl.trainer.utils as trl_utils

    if torch.cuda.is_available():
        return
    if not hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        raise RuntimeError(
            "trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE is gone: re-check the CPU tile fix for this TRL version"
        )
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, CPU_LOGPROB_VOCAB_CHUNK)


def load_base(base_model_path: StrPath, bf16: bool, sft_adapter_dir: StrPath | None = None):
    """(model, tokenizer): the base checkpoint, with an SFT adapter merged in when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = base_checkpoint(base_model_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
    if sft_adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(sft_adapter_dir)).merge_and_unload()
    return model, tokenizer


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def fit_to_length(ds, tokenizer, max_length: int, completion_columns: list[str]):
    """Keep the training columns and drop rows whose prompt leaves no room for a completion.

    TRL truncates at the end (``keep_start``), so an over-long prompt would lose its whole
    completion and contribute a loss over zero tokens. Returns (dataset, dropped count).
    """
    columns = ["prompt", *completion_columns]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"training data lacks column(s) {missing}; it has {ds.column_names}")
    ds = ds.select_columns(columns)
    if len(ds) == 0:
        return ds, 0

    def prompt_tokens(row: dict[str, Any]) -> int:
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    keep = [i for i, row in enumerate(ds) if prompt_tokens(row) + MIN_COMPLETION_TOKENS <= max_length]
    return ds.select(keep), len(ds) - len(keep)


def _cap(ds, n: int | None, seed: int):
    if ds is None or n is None or len(ds) <= n:
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def _mlflow_callback(run_id: str | None, prefix: str):
    from transformers import TrainerCallback

    class MLflowStepLogger(TrainerCallback):
        """Logs every Trainer log line (loss, lr, grad norm, DPO rewards...) to one MLflow run.

        Uses the client with an explicit run id rather than the fluent API: Prefect runs tasks in
        worker threads, where MLflow's thread-local active run is not visible.
        """

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if run_id is None or not logs or not state.is_world_process_zero:
                return
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            now = int(time.time() * 1000)
            metrics = [
                Metric(f"{prefix}{k}", float(v), now, state.global_step)
                for k, v in logs.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ]
            if metrics:
                MlflowClient().log_batch(run_id, metrics=metrics)

    return MLflowStepLogger()


def _active_run_id(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    if os.environ.get("ESVR_MLFLOW_RUN_ID"):
        return os.environ["ESVR_MLFLOW_RUN_ID"]
    try:
        import mlflow

        run = mlflow.active_run()
    except Exception:  # noqa: BLE001 - tracking is optional for a trainer
        return None
    return run.info.run_id if run else None


#: TrainConfig fields that TRL's configs take as they are, under the same name or another one
_SAME_NAME = ("learning_rate", "max_steps", "weight_decay", "logging_steps", "eval_steps", "max_length", "seed")
_RENAMED = {
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    # transformers reads a value below 1 as a fraction of the steps
    "warmup_ratio": "warmup_steps",
    "lr_scheduler": "lr_scheduler_type",
}


def _common_args(cfg: TrainConfig, out_dir: Path, has_eval: bool, bf16: bool, gc: bool) -> dict[str, Any]:
    eval_strategy = cfg.eval_strategy if has_eval else "no"
    select_best = cfg.select_best and eval_strategy != "no"
    args: dict[str, Any] = {name: getattr(cfg, name) for name in _SAME_NAME}
    args.update({trl_name: getattr(cfg, name) for name, trl_name in _RENAMED.items()})
    args.update(
        output_dir=str(out_dir / "checkpoints"),
        per_device_eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        save_strategy=eval_strategy if select_best else "no",
        save_steps=cfg.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=select_best,
        metric_for_best_model="eval_loss",
        bf16=bf16,
        gradient_checkpointing=gc,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not _cuda(),
    )
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _finish(trainer, out_dir: Path, adapter_dir: Path, extra: dict[str, float], started: float) -> TrainResult:
    """Final dev loss, adapter saved, figures collected into a TrainResult and training.json."""
    train_out = trainer.train()
    metrics: dict[str, float] = {
        "train_loss": float(train_out.training_loss),
        "global_step": float(trainer.state.global_step),
        "train_runtime_s": float(train_out.metrics.get("train_runtime", time.time() - started)),
    }
    steps = max(1, trainer.state.global_step)
    metrics["step_time_s"] = metrics["train_runtime_s"] / steps
    if trainer.eval_dataset is not None and len(trainer.eval_dataset) > 0:
        for k, v in trainer.evaluate().items():
            if isinstance(v, (int, float)):
                metrics[k if k.startswith("eval_") else f"eval_{k}"] = float(v)
    metrics.update(extra)
    result = TrainResult(adapter_dir, metrics, [dict(x) for x in trainer.state.log_history])
    if trainer.is_world_process_zero():  # under `accelerate launch`, one process writes
        trainer.save_model(str(adapter_dir))
        (out_dir / "training.json").write_text(json.dumps(result.to_json(), indent=2))
    return result


# --------------------------------------------------------------------------------------------
# SFT and DPO
# --------------------------------------------------------------------------------------------


def _fitted(train_ds, eval_ds, tokenizer, cfg: TrainConfig, cols: list[str], what: str):
    """(train, eval or None, counts): both sets capped and cut to what fits `cfg.max_length`."""
    if len(train_ds) == 0:
        raise ValueError(f"the {what}s are empty: the stage that builds them found nothing to train on (see its stats)")
    train_ds, dropped = fit_to_length(_cap(train_ds, cfg.max_train_examples, cfg.seed), tokenizer, cfg.max_length, cols)
    eval_dropped = 0
    if eval_ds is not None:
        eval_ds, eval_dropped = fit_to_length(_cap(eval_ds, cfg.max_eval_examples, cfg.seed), tokenizer, cfg.max_length, cols)
        eval_ds = eval_ds if len(eval_ds) else None
    if len(train_ds) == 0:
        raise ValueError(
            f"no {what} fits max_length={cfg.max_length} ({dropped} dropped as over-long); "
            "raise max_length or shorten the prompts"
        )
    counts = {
        "n_train": float(len(train_ds)),
        "n_eval": float(len(eval_ds) if eval_ds is not None else 0),
        "dropped_overlong_train": float(dropped),
        "dropped_overlong_eval": float(eval_dropped),
    }
    return train_ds, eval_ds, counts


class TrainOptions(TypedDict, total=False):
    """The keyword options of `train_sft` and `train_dpo`."""

    #: per-step metrics go to this MLflow run, else to the active one, else nowhere
    mlflow_run_id: str | None
    #: prepended to every metric name
    metric_prefix: str
    #: extra transformers ``TrainerCallback``s (in-process runs only)
    callbacks: list | None


def train_sft(
    base_model_path: StrPath, train_ds, eval_ds, cfg: TrainConfig, out_dir: StrPath, **options: Unpack[TrainOptions]
) -> TrainResult:
    """LoRA SFT on prompt/completion data; the adapter lands in ``out_dir/adapter``.

    `base_model_path`: a local checkpoint folder, a hub id, or 'default'. `eval_ds` may be None.
    """
    return train("sft", base_model_path, train_ds, eval_ds, cfg, out_dir, **options)


def train_dpo(
    base_model_path: StrPath,
    sft_adapter_dir: StrPath | None,
    train_ds,
    eval_ds,
    cfg: TrainConfig,
    out_dir: StrPath,
    **options: Unpack[TrainOptions],
) -> TrainResult:
    """LoRA DPO on prompt/chosen/rejected data, starting from (base + SFT adapter) when given.

    The SFT adapter is merged into the base in memory; a fresh LoRA (cfg's r/alpha/dropout)
    trains on top with the merged model as the reference. ``out_dir/adapter`` receives one
    stacked adapter equivalent to base + SFT + DPO (loadable as ``hf:<base>+<adapter>``);
    ``out_dir/dpo_only`` the DPO LoRA alone (an adapter of the merged model).
    """
    return train("dpo", base_model_path, train_ds, eval_ds, cfg, out_dir, sft_adapter_dir=sft_adapter_dir, **options)


#: per kind: the columns a row trains on beside its prompt, and what a row is called in errors
_COLUMNS = {"sft": (["completion"], "SFT training example"), "dpo": (["chosen", "rejected"], "DPO training pair")}


def train(
    kind: Literal["sft", "dpo"],
    base_model_path: StrPath,
    train_ds,
    eval_ds,
    cfg: TrainConfig,
    out_dir: StrPath,
    *,
    sft_adapter_dir: StrPath | None = None,
    **options: Unpack[TrainOptions],
) -> TrainResult:
    """`train_sft` or `train_dpo`: the one body both run (an SFT adapter is for DPO only)."""
    if cfg.launcher == "accelerate":
        argv = [kind, "--base", str(base_model_path), "--metric-prefix", options.get("metric_prefix", "")]
        argv += ["--sft-adapter", str(sft_adapter_dir)] if sft_adapter_dir is not None else []
        return launch(argv, train_ds, eval_ds, cfg, out_dir, options.get("mlflow_run_id"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    bf16, gc = precision_flags(cfg)
    fit_logprob_tiles_to_cpu()
    try:
        model, tokenizer = load_base(base_model_path, bf16, sft_adapter_dir)
        columns, what = _COLUMNS[kind]
        train_ds, eval_ds, counts = _fitted(train_ds, eval_ds, tokenizer, cfg, columns, what)
        args = _common_args(cfg, out, eval_ds is not None, bf16, gc)
        run_id = _active_run_id(options.get("mlflow_run_id"))
        common = dict(
            model=model,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=lora_config(cfg),
            callbacks=[_mlflow_callback(run_id, options.get("metric_prefix", "")), *(options.get("callbacks") or [])],
        )
        trainer: Trainer
        if kind == "sft":
            from trl import SFTConfig, SFTTrainer

            trainer = SFTTrainer(args=SFTConfig(**args, completion_only_loss=True), **common)
        else:
            from trl import DPOConfig, DPOTrainer

            # no reference model: TRL then uses the model with the new adapter disabled, base + SFT
            trainer = DPOTrainer(ref_model=None, args=DPOConfig(**args, beta=cfg.beta), **common)
        extra = {**counts, "bf16": float(bf16), "gradient_checkpointing": float(gc)}
        if sft_adapter_dir is None:
            return _finish(trainer, out, out / "adapter", extra, started)
        result = _finish(trainer, out, out / "dpo_only", extra, started)
        result.adapter_dir = out / "adapter"
        if trainer.is_world_process_zero():
            stack_adapters(sft_adapter_dir, out / "dpo_only", out / "adapter", base_model_path=base_checkpoint(base_model_path))
            shutil.copy2(out / "training.json", out / "dpo_only" / "training.json")
            (out / "training.json").write_text(json.dumps(result.to_json(), indent=2))
        return result
    finally:
        mark_freed()  # the model and the trainer go with this frame: the caller's collection has work


# --------------------------------------------------------------------------------------------
# Stacking two LoRA adapters into one
# --------------------------------------------------------------------------------------------


def _lora_tensors(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    for key in ("use_dora", "modules_to_save"):
        if config.get(key):
            raise ValueError(f"{adapter_dir}: cannot stack an adapter with {key}={config[key]!r}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: cannot stack an adapter with per-module rank or alpha patterns")
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, tuple[Any, Any]] = {}
    for key in weights:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            pairs[module] = (weights[key], weights[f"{module}.lora_B.weight"])
        elif not key.endswith(".lora_B.weight"):
            raise ValueError(f"{adapter_dir}: unexpected tensor {key!r} (only LoRA A/B weights can be stacked)")
    return config, pairs


def _scaling(config: dict[str, Any]) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def stack_adapters(
    first_dir: StrPath,
    second_dir: StrPath,
    out_dir: StrPath,
    *,
    base_model_path: str | None = None,
) -> Path:
    """One LoRA adapter equal to applying `first` and then `second` (trained on base + first).

    LoRA deltas add: s1·B1·A1 + s2·B2·A2 = [s1·B1 | s2·B2] · [A1; A2], so the stacked adapter has
    rank r1 + r2 with alpha = rank (scaling 1) and the scalings folded into B. Modules adapted by
    only one of the two get zero blocks for the other. Exact up to floating point.
    """
    import torch
    from safetensors.torch import save_file

    first, second, out = Path(first_dir), Path(second_dir), Path(out_dir)
    c1, w1 = _lora_tensors(first)
    c2, w2 = _lora_tensors(second)
    r1, r2 = c1["r"], c2["r"]
    s1, s2 = _scaling(c1), _scaling(c2)
    tensors: dict[str, torch.Tensor] = {}
    for module in sorted(set(w1) | set(w2)):
        ref_a, ref_b = w1.get(module) or w2.get(module)  # type: ignore[misc]  # the module is in one of them
        in_f, out_f = ref_a.shape[1], ref_b.shape[0]
        a1, b1 = w1.get(module, (torch.zeros(r1, in_f), torch.zeros(out_f, r1)))
        a2, b2 = w2.get(module, (torch.zeros(r2, in_f), torch.zeros(out_f, r2)))
        tensors[f"{module}.lora_A.weight"] = torch.cat([a1.float(), a2.float()], dim=0).contiguous()
        tensors[f"{module}.lora_B.weight"] = torch.cat([s1 * b1.float(), s2 * b2.float()], dim=1).contiguous()
    config = dict(c2)
    rank = r1 + r2
    config.update(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        lora_dropout=0.0,
        rank_pattern={},
        alpha_pattern={},
        target_modules=sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in tensors}),
    )
    if base_model_path is not None:
        config["base_model_name_or_path"] = base_model_path
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (tmp / "stacked_from.json").write_text(json.dumps({"first": str(first), "second": str(second)}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (second / name).exists():
            shutil.copy2(second / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------------------------
# Several GPUs: the same trainers under `accelerate launch`
# --------------------------------------------------------------------------------------------


def launch(
    argv: list[str], train_ds, eval_ds, cfg: TrainConfig, out_dir: StrPath, mlflow_run_id: str | None = None
) -> TrainResult:
    """Run `main` with `argv` (the kind, base and options) in ``accelerate launch`` subprocesses
    (one per GPU).

    The datasets are written next to the output; the subprocesses log to the same MLflow run
    (by id) and the main process writes ``training.json``, which this function reads back.
    """
    out = Path(out_dir)
    data = out / "data"
    out.mkdir(parents=True, exist_ok=True)
    train_ds.save_to_disk(str(data / "train"))
    if eval_ds is not None:
        eval_ds.save_to_disk(str(data / "eval"))
    inner = cfg.model_copy(update={"launcher": "inprocess"})
    (out / "train_config.json").write_text(inner.model_dump_json())
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.num_processes:
        cmd += ["--num_processes", str(cfg.num_processes)]
    cmd += ["-m", "esvr.models.training", *argv, "--data", str(data), "--out", str(out)]
    cmd += ["--config", str(out / "train_config.json")]
    env = dict(os.environ)
    run_id = _active_run_id(mlflow_run_id)
    if run_id:
        env["ESVR_MLFLOW_RUN_ID"] = run_id
    subprocess.run(cmd, check=True, env=env)
    return TrainResult.from_json(json.loads((out / "training.json").read_text()))


def main(argv: list[str] | None = None) -> None:
    import argparse

    from datasets import load_from_disk

    p = argparse.ArgumentParser(prog="python -m esvr.models.training", description="LoRA SFT/DPO (one process of a launch)")
    p.add_argument("kind", choices=["sft", "dpo"])
    p.add_argument("--base", required=True)
    p.add_argument("--data", required=True, help="folder with train/ (and eval/) saved with datasets")
    p.add_argument("--out", required=True)
    p.add_argument("--config", required=True, help="TrainConfig as JSON")
    p.add_argument("--sft-adapter")
    p.add_argument("--metric-prefix", default="")
    a = p.parse_args(argv)
    cfg = TrainConfig.model_validate_json(Path(a.config).read_text())
    data = Path(a.data)
    train_ds = load_from_disk(str(data / "train"))
    eval_ds = load_from_disk(str(data / "eval")) if (data / "eval").exists() else None
    train(a.kind, a.base, train_ds, eval_ds, cfg, a.out, sft_adapter_dir=a.sft_adapter, metric_prefix=a.metric_prefix)


if __name__ == "__main__":
    main()
