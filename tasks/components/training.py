"""LoRA training of a pipeline component (TVD, RG, supporter) on a saved dataset, and its MLflow record.

`train_lora` trains one adapter (SFT or DPO, `esvr.models.training`) on the train/dev splits of a
dataset folder and records in its ``component.json`` what it is, so that configs can name it
(`esvr.tasks.common.roles`); `log_training` puts the outcome into the training's MLflow run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esvr.models.config import ModelConfig
from esvr.models.default_model import base_checkpoint
from esvr.models.training import TrainConfig
from esvr.tasks.common.roles import write_component


def train_lora(
    kind: str,
    base: ModelConfig,
    data: Path,
    sft_adapter: Path | None,
    cfg: TrainConfig,
    out: Path,
    meta: dict[str, Any],
    run_id: str | None = None,
) -> dict[str, Any]:
    """Train one LoRA adapter (SFT or DPO) on the train/dev splits of a saved dataset.

    `base` is a ModelConfig naming the base checkpoint (by content in the cache key); `meta`
    (component, stage, setting) goes into the adapter's component.json. Returns the
    TrainResult as JSON plus the run id it logged to live.
    """
    from datasets import load_from_disk

    from esvr.models.training import train_dpo, train_sft

    # in memory: maps over a disk-loaded dataset write cache-*.arrow files into `data`, which would
    # change its content digest and miss this task's cache on every later run
    splits = load_from_disk(str(data), keep_in_memory=True)
    missing = [s for s in ("train", "dev") if s not in splits]
    if missing:
        raise ValueError(f"{data}: dataset lacks split(s) {missing}; has {list(splits)}")
    eval_ds = splits["dev"] if len(splits["dev"]) else None
    base_path = base_checkpoint(base.spec)
    prefix = f"{meta.get('stage', kind)}/"
    if kind == "sft":
        result = train_sft(base_path, splits["train"], eval_ds, cfg, out, mlflow_run_id=run_id, metric_prefix=prefix)
    elif kind == "dpo":
        result = train_dpo(base_path, sft_adapter, splits["train"], eval_ds, cfg, out, mlflow_run_id=run_id, metric_prefix=prefix)
    else:
        raise ValueError(f"unknown training kind {kind!r}; expected 'sft' or 'dpo'")
    write_component(result.adapter_dir, base=base.spec, trained_from=str(data), sft_adapter=sft_adapter, **meta)
    return {**result.to_json(), "metric_prefix": prefix, "logged_run_id": run_id}


def log_training(result: dict[str, Any], run_id: str, metric_prefix: str = "") -> None:
    """Record a training outcome in its MLflow run: final metrics, adapter artifact, and the
    per-step history when the adapter came from the cache (trained while another run was live)."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    now = int(time.time() * 1000)
    batch: list[Metric] = []
    if result.get("logged_run_id") != run_id:
        prefix = result.get("metric_prefix", "")
        for entry in result.get("log_history", []):
            step = int(entry.get("step", 0))
            batch += [
                Metric(f"{prefix}{k}", float(v), now, step)
                for k, v in entry.items()
                if k not in ("step",) and isinstance(v, (int, float)) and not isinstance(v, bool)
            ]
    final_step = int(result["metrics"].get("global_step", 0))
    batch += [Metric(f"{metric_prefix}final.{k}", float(v), now, final_step) for k, v in result["metrics"].items()]
    for i in range(0, len(batch), 900):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=batch[i : i + 900])
    adapter = Path(result["adapter_dir"])
    client.log_artifacts(run_id, str(adapter), artifact_path="adapter")
    training_json = adapter.parent / "training.json"
    if training_json.exists():
        client.log_artifact(run_id, str(training_json))
