"""Embedded orchestration: Prefect and MLflow with no server, everything under the run folder.

With no ``PREFECT_API_URL`` set, Prefect starts its temporary local server; with no
``MLFLOW_TRACKING_URI`` set, MLflow writes to SQLite. Both, plus persisted task results and the
response cache, live under the run folder, so one folder is one self-contained run that can be
deleted, copied or compared. Setting those two variables is the only switch to real servers.

`prepare` must run before Prefect is imported: Prefect reads its settings at import time. The CLI
calls it first thing; tests set the same variables in ``conftest.py``. The run folder's layout is
`esvr.tasks.common.paths.RunPaths`; the chat models a run loads are shared through
`esvr.tasks.common.roles`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from esvr.tasks.common.paths import RunPaths


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
