"""Trained components (TVD, RG, supporter) as chat model specs that configs can name.

A trained component is a LoRA adapter folder with a ``component.json`` beside its weights that
records the base checkpoint it was trained from. Configs reference it in one of three ways, and
`resolve_component` turns each into the spec `load_chat_model` takes:

- ``hf:<base>+<adapter_dir>``: already a spec, returned unchanged;
- ``mlflow:<run_id>`` (or ``mlflow:<run_id>/<artifact_path>``): the adapter logged as that
  training run's ``adapter`` artifact, downloaded once into the local cache;
- a path to an adapter folder that holds ``component.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task

from esvr.flows.config import ModelConfig
from esvr.models.training import TrainConfig
from esvr.tasks.caching import cache_policy

COMPONENT_FILE = "component.json"


def base_model_path(spec: str) -> str:
    """The local folder or hub id of a base checkpoint spec ('default', 'hf:<path>', '<path>')."""
    spec = spec[3:] if spec.startswith("hf:") else spec
    if "+" in spec:
        raise ValueError(f"base model {spec!r} names an adapter; a base is a plain checkpoint")
    if spec == "default":
        from esvr.models.default_model import ensure_default_model

        return str(ensure_default_model())
    return spec


def write_component(adapter_dir: str | os.PathLike[str], *, base: str, component: str, **meta: Any) -> Path:
    """Record what `adapter_dir` is: the base spec it adapts, the component, and free metadata."""
    path = Path(adapter_dir) / COMPONENT_FILE
    path.write_text(json.dumps({"base": base, "component": component, **meta}, indent=2, default=str))
    return path


def component_spec(adapter_dir: str | os.PathLike[str]) -> str:
    """``hf:<base path>+<adapter_dir>`` for an adapter folder with a component.json."""
    folder = Path(adapter_dir)
    meta_path = folder / COMPONENT_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not a trained component: no {COMPONENT_FILE} in it")
    meta = json.loads(meta_path.read_text())
    if "base" not in meta:
        raise ValueError(f"{meta_path}: no 'base' key")
    return f"hf:{base_model_path(meta['base'])}+{folder.resolve()}"


def _cache_dir() -> Path:
    from esvr.models.default_model import cache_root

    return cache_root() / "components"


def resolve_component(ref: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A chat model spec for a component reference (see the module docstring).

    Specs that are not component references ('default', 'openai:...', 'hf:...') pass through.
    MLflow downloads use the current tracking URI (``MLFLOW_TRACKING_URI`` or the run folder's).
    """
    ref = ref.strip()
    if ref == "default" or ref.startswith(("hf:", "openai:")):
        return ref
    if ref.startswith("mlflow:"):
        body = ref[len("mlflow:") :].strip("/")
        run_id, _, artifact_path = body.partition("/")
        if not run_id:
            raise ValueError(f"component reference {ref!r}: expected mlflow:<run_id>[/<artifact_path>]")
        artifact_path = artifact_path or "adapter"
        target = Path(cache_dir or _cache_dir()) / run_id / artifact_path
        if not (target / COMPONENT_FILE).is_file():
            import mlflow

            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(target.parent))
            except Exception as exc:  # noqa: BLE001 - MLflow raises several types; the message matters
                raise FileNotFoundError(
                    f"component {ref!r}: cannot download artifact '{artifact_path}' of MLflow run {run_id} "
                    f"from {mlflow.get_tracking_uri()}: {exc}"
                ) from exc
        return component_spec(target)
    path = Path(ref)
    if path.is_dir():
        return component_spec(path)
    raise ValueError(
        f"component reference {ref!r}: expected 'hf:<base>+<adapter>', 'mlflow:<run_id>' or an adapter folder with {COMPONENT_FILE}"
    )


# --------------------------------------------------------------------------------------------
# Training as a cached Prefect task, and its MLflow record
# --------------------------------------------------------------------------------------------


def prompts_digest(names: list[str]) -> str:
    """Content digest of prompt files: a task whose output depends on wording keys on it."""
    import hashlib

    from esvr.prompts import prompt_path

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(names):
        h.update(name.encode())
        h.update(prompt_path(name).read_bytes())
    return h.hexdigest()


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
    base_path = base_model_path(base.spec)
    prefix = f"{meta.get('stage', kind)}/"
    if kind == "sft":
        result = train_sft(base_path, splits["train"], eval_ds, cfg, out, mlflow_run_id=run_id, metric_prefix=prefix)
    elif kind == "dpo":
        result = train_dpo(base_path, sft_adapter, splits["train"], eval_ds, cfg, out, mlflow_run_id=run_id, metric_prefix=prefix)
    else:
        raise ValueError(f"unknown training kind {kind!r}; expected 'sft' or 'dpo'")
    write_component(result.adapter_dir, base=base.spec, trained_from=str(data), sft_adapter=sft_adapter, **meta)
    return {**result.to_json(), "metric_prefix": prefix, "logged_run_id": run_id}


@task(
    name="train_lora",
    cache_policy=cache_policy("esvr.models.training", exclude=["run_id"]),
    persist_result=True,
    # libraries print bytecode listings while hashing functions; step metrics go to MLflow instead
    log_prints=False,
)
def train_lora_task(
    kind: str,
    base: ModelConfig,
    data: Path,
    sft_adapter: Path | None,
    cfg: TrainConfig,
    out: Path,
    meta: dict[str, Any],
    run_id: str | None = None,
) -> dict[str, Any]:
    """`train_lora` as a cached Prefect task.

    Keyed by the dataset's and the base weights' content, the SFT adapter's content, the config
    and the trainer's source; not by the MLflow run id, so a re-run reuses the adapter and
    `log_training` replays its step metrics into the new run.
    """
    return train_lora(kind, base, data, sft_adapter, cfg, out, meta, run_id)


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


@contextmanager
def opened_model(model: ModelConfig, out_dir: Path, use_cache: bool = True) -> Iterator[Any]:
    """A chat model for an evaluation: trained components (an adapter in the spec) are loaded
    for this use and freed afterwards; plain models come from the process-wide shared pool."""
    from esvr.flows.runtime import RunPaths, chat_model, return_freed_memory
    from esvr.models.chat import ResponseCache, load_chat_model

    if model.spec.startswith("hf:") and "+" in model.spec:
        cache = ResponseCache(RunPaths(Path(out_dir).resolve()).response_cache) if use_cache else None
        chat = load_chat_model(model.to_spec(), cache)
        try:
            yield chat
        finally:
            chat.close()
            del chat
            return_freed_memory()
    else:
        yield chat_model(model, out_dir, cache=use_cache)
