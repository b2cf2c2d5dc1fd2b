"""One place turns a config into models: every stage, the CLI and the chat build their chat models,
trained components and labelers here (the simulation's agents are built from these by
`esvr.tasks.simulation.simulate.opened_agents`).

A model is named by a spec (``default``, ``openai:<model>``, ``hf:<path>[+<adapter>]``), a
`ModelConfig`, or a trained component: ``mlflow:<run_id>`` (or ``mlflow:<run_id>/<artifact_path>``),
the adapter that training run logged as its ``adapter`` artifact, downloaded once into the local
cache; or the path of an adapter folder. A trained component's folder holds a ``component.json``
beside its weights that records the base checkpoint it was trained from. `model_config` turns any
of these into the `ModelConfig` that every loader here takes.

Chat models are shared per process (`chat_model`): supporter, seeker, persona writer and judge are
often the same local model, and loading it once keeps the demo within its memory budget. The run
folder's response cache wraps them when enabled. Stages call these functions themselves, inside
their cached tasks, so a cache hit loads no model; `release_models` frees them all before training.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esvr.models.config import ModelConfig
from esvr.models.default_model import base_checkpoint
from esvr.models.memory import return_freed_memory
from esvr.tasks.common.paths import RunPaths

if TYPE_CHECKING:
    from esvr.models.chat import ChatModel, ResponseCache
    from esvr.models.emotion import EmotionConfig, EmotionScorer
    from esvr.models.value_detector import ValueDetector, ValueDetectorConfig

COMPONENT_FILE = "component.json"

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------
# References: specs, trained components, the base checkpoint
# --------------------------------------------------------------------------------------------


def model_config(ref: ModelConfig | str | None) -> ModelConfig | None:
    """The model a reference names: None and '' name none, a `ModelConfig` is itself, a string is
    a spec or a trained component (``mlflow:<run_id>``, an adapter folder)."""
    if ref is None or isinstance(ref, ModelConfig):
        return ref
    if not ref.strip():
        return None
    return ModelConfig(spec=resolve_component(ref))


def base_model(base: str) -> ModelConfig:
    """``models.base`` (a checkpoint folder, hub id, 'default' or 'hf:...') as a chat model; its
    folder is `esvr.models.default_model.base_checkpoint`."""
    return ModelConfig(spec=base if base == "default" or base.startswith("hf:") else f"hf:{base}")


def write_component(adapter_dir: PathLike, *, base: str, component: str, **meta: Any) -> Path:
    """Record what `adapter_dir` is: the base spec it adapts, the component, and free metadata."""
    path = Path(adapter_dir) / COMPONENT_FILE
    path.write_text(json.dumps({"base": base, "component": component, **meta}, indent=2, default=str))
    return path


def component_spec(adapter_dir: PathLike) -> str:
    """``hf:<base path>+<adapter_dir>`` for an adapter folder with a component.json."""
    folder = Path(adapter_dir)
    meta_path = folder / COMPONENT_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not a trained component: no {COMPONENT_FILE} in it")
    meta = json.loads(meta_path.read_text())
    if "base" not in meta:
        raise ValueError(f"{meta_path}: no 'base' key")
    return f"hf:{base_checkpoint(meta['base'])}+{folder.resolve()}"


def _cache_dir() -> Path:
    from esvr.models.default_model import cache_root

    return cache_root() / "components"


def resolve_component(ref: str, cache_dir: PathLike | None = None) -> str:
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
# Chat models, loaded once per process
# --------------------------------------------------------------------------------------------

_models: dict[tuple, ChatModel] = {}
_models_lock = threading.Lock()


def response_cache(run_dir: PathLike) -> ResponseCache:
    """The run folder's response cache: re-runs are free and a crashed run resumes."""
    from esvr.models.chat import ResponseCache

    return ResponseCache(RunPaths(Path(run_dir).resolve()).response_cache)


def chat_model(model: ModelConfig, run_dir: PathLike | None, cache: bool = True) -> ChatModel:
    """The chat model a config names, shared by every stage in this process, answered through the
    run folder's response cache when `cache` (and a run folder) is given."""
    from esvr.models.backends import load_chat_model
    from esvr.models.chat import CachedChatModel

    key = (model.spec, model.base_url, model.device)
    with _models_lock:
        backend = _models.get(key)
        if backend is None:
            backend = load_chat_model(model)
            _models[key] = backend
    if not cache or run_dir is None:
        return backend
    return CachedChatModel(backend, response_cache(run_dir))


def loaded_models() -> dict[str, ChatModel]:
    """The chat models this process has loaded, by spec: their usage counters go to MLflow."""
    with _models_lock:
        return {key[0]: model for key, model in _models.items()}


def release_models() -> None:
    """Free every loaded chat model (e.g. before a training stage needs the memory)."""
    with _models_lock:
        for model in _models.values():
            model.close()
        _models.clear()
    return_freed_memory(if_freed=True)


def is_adapter(model: ModelConfig) -> bool:
    return model.spec.startswith("hf:") and "+" in model.spec


def own_model(model: ModelConfig, run_dir: PathLike | None = None, use_cache: bool = True) -> ChatModel:
    """A model loaded for one use, outside the shared pool (answered through the run folder's
    response cache when `use_cache` and a run folder are given); the caller closes it."""
    from esvr.models.backends import load_chat_model

    return load_chat_model(model, response_cache(run_dir) if use_cache and run_dir is not None else None)


@contextmanager
def opened_model(model: ModelConfig, run_dir: PathLike, use_cache: bool = True) -> Iterator[ChatModel]:
    """A chat model for an evaluation: trained components (an adapter in the spec) are loaded
    for this use and freed afterwards; plain models come from the process-wide shared pool."""
    if not is_adapter(model):
        yield chat_model(model, run_dir, cache=use_cache)
        return
    chat = own_model(model, run_dir, use_cache)
    try:
        yield chat
    finally:
        chat.close()
        del chat
        return_freed_memory(if_freed=True)


# --------------------------------------------------------------------------------------------
# Labelers
# --------------------------------------------------------------------------------------------


def emotion_scorer(cfg: EmotionConfig | None, run_dir: PathLike | None, use_cache: bool = True) -> EmotionScorer | None:
    """The emotion scorer a ``label.emotion`` section names (None: none); emollama's chat model
    comes from the shared pool."""
    if cfg is None:
        return None
    from esvr.models.emotion import load_emotion_scorer

    echat = chat_model(cfg.model, run_dir, cache=use_cache) if cfg.backend == "emollama" else None
    return load_emotion_scorer(cfg, echat)


def value_threshold(cfg: ValueDetectorConfig) -> float:
    """The decision threshold of the detector `cfg` names, without loading its model: the
    configured one, else the backend's (the embedding head's validation-tuned threshold, Schroter
    et al.'s 0.26 for hf, 0.5 for llm), as `load_value_detector` applies them."""
    from esvr.models.value_detector import DEFAULT_HEAD, SCHROTER_THRESHOLD, ValueHead

    if cfg.threshold is not None:
        return float(cfg.threshold)
    if cfg.backend == "embedding":
        return float(ValueHead.load(Path(cfg.head) if cfg.head else DEFAULT_HEAD).threshold)
    return SCHROTER_THRESHOLD if cfg.backend == "hf" else 0.5


def value_detector(cfg: ValueDetectorConfig, run_dir: PathLike | None, use_cache: bool = True) -> ValueDetector:
    """The value detector a ``label.values`` section names; llm's chat model comes from the pool."""
    from esvr.models.value_detector import load_value_detector

    vchat = chat_model(cfg.model, run_dir, cache=use_cache) if cfg.backend == "llm" else None
    return load_value_detector(cfg, vchat)


def labelers(
    values: ValueDetectorConfig, emotion: EmotionConfig, run_dir: PathLike | None = None, use_cache: bool = True
) -> tuple[ValueDetector, EmotionScorer]:
    """The label stage's detector and scorer (the ESConv analysis and benchmarks use the same)."""
    scorer = emotion_scorer(emotion, run_dir, use_cache)
    assert scorer is not None
    return value_detector(values, run_dir, use_cache), scorer
