"""Embedded orchestration: Prefect and MLflow with no server, everything under the run folder.

With no ``PREFECT_API_URL`` set, Prefect starts its temporary local server; with no
``MLFLOW_TRACKING_URI`` set, MLflow writes to SQLite. Both, plus persisted task results and the
response cache, live under the run folder, so one folder is one self-contained run that can be
deleted, copied or compared. Setting those two variables is the only switch to real servers.

`prepare` must run before Prefect is imported: Prefect reads its settings at import time. The CLI
calls it first thing; tests set the same variables in ``conftest.py``.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from esvr.flows.config import ModelConfig
    from esvr.models.chat import ChatModel


@dataclass(frozen=True)
class RunPaths:
    out_dir: Path

    @property
    def prefect_home(self) -> Path:
        return self.out_dir / ".prefect"

    @property
    def results(self) -> Path:
        return self.out_dir / ".prefect" / "results"

    @property
    def mlflow_db(self) -> Path:
        return self.out_dir / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.out_dir / "mlartifacts"

    @property
    def response_cache(self) -> Path:
        return self.out_dir / "cache" / "responses.sqlite"

    def stage(self, name: str) -> Path:
        """The folder a stage writes its artifacts to."""
        path = self.out_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def default_tracking_uri(out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"


def prepare(out_dir: str | os.PathLike[str]) -> RunPaths:
    """Point Prefect at the run folder, unless the environment already chose a server.

    MLflow needs no variable: `tracking.setup` uses ``MLFLOW_TRACKING_URI`` when the user set it,
    else the run folder's SQLite file.
    """
    paths = RunPaths(Path(out_dir).resolve())
    paths.out_dir.mkdir(parents=True, exist_ok=True)
    if "prefect" in sys.modules and "PREFECT_HOME" not in os.environ:
        # Too late to move Prefect's home for this process; results still go to the run folder.
        pass
    os.environ.setdefault("PREFECT_HOME", str(paths.prefect_home))
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(paths.results))
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server's start-up budget: cold starts take ~11 s here, slower under load.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # Torch's busy-waiting OpenMP threads steal the second core from tokenizers and Prefect.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return paths


# --------------------------------------------------------------------------------------------
# Chat models, loaded once per process
# --------------------------------------------------------------------------------------------

_models: dict[tuple, "ChatModel"] = {}
_models_lock = threading.Lock()


def chat_model(model: "ModelConfig", out_dir: str | os.PathLike[str], cache: bool = True) -> "ChatModel":
    """The chat model a config names, shared by every stage in this process.

    Supporter, seeker, persona writer and judge are often the same local model; loading it once
    keeps the demo within its memory budget. The response cache (under the run folder ``out_dir``)
    wraps it when enabled. Tasks call this themselves, so a cached task never loads a model.
    """
    from esvr.models.chat import CachedChatModel, ResponseCache, load_chat_model

    spec = model.to_spec()
    key = (spec.spec, spec.base_url, spec.device)
    with _models_lock:
        backend = _models.get(key)
        if backend is None:
            backend = load_chat_model(spec)
            _models[key] = backend
    if not cache:
        return backend
    return CachedChatModel(backend, ResponseCache(RunPaths(Path(out_dir).resolve()).response_cache))


def loaded_models() -> dict[str, "ChatModel"]:
    """The chat models this process has loaded, by spec: their usage counters go to MLflow."""
    with _models_lock:
        return {key[0]: model for key, model in _models.items()}


def release_models() -> None:
    """Free every loaded chat model (e.g. before a training stage needs the memory)."""
    with _models_lock:
        for model in _models.values():
            model.close()
        _models.clear()
    return_freed_memory()


def return_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system.

    glibc keeps freed memory in its arenas: without `malloc_trim` a stage that loaded a model
    leaves the process ~2 GB larger for every later stage (measured on the demo), which counts
    against its 6 GB budget as if the model were still loaded.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
