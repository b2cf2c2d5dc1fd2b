"""Embedded orchestration: Prefect and MLflow with no server, everything under the run folder.

With no ``PREFECT_API_URL`` set, Prefect starts its temporary local server; with no
``MLFLOW_TRACKING_URI`` set, MLflow writes to SQLite. Both, plus persisted task results and the
response cache, live under the run folder, so one folder is one self-contained run that can be
deleted, copied or compared. Setting those two variables is the only switch to real servers.

`prepare` must run before Prefect is imported: Prefect reads its settings at import time. The CLI
calls it first thing; tests set the same variables in ``conftest.py``. `detach_temporary_server`
keeps Ctrl-C (a signal to the whole process group) from killing the temporary server under a flow
that is still reporting its end, and lets the server die with this process on SIGKILL. The run folder's layout is
`esvr.tasks.common.paths.RunPaths`; the chat models a run loads are shared through
`esvr.tasks.common.roles`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from esvr.models.config import ConfigError
from esvr.tasks.common.locks import held_lock
from esvr.tasks.common.paths import RunPaths


def default_tracking_uri(out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"


def prepare(out_dir: str | os.PathLike[str]) -> RunPaths:
    """Point Prefect at the run folder, unless the environment already chose a server.

    MLflow needs no variable: `tracking.setup` uses ``MLFLOW_TRACKING_URI`` when the user set it,
    else the run folder's SQLite file.
    """
    paths = RunPaths(Path(out_dir).resolve())
    usable_run_folder(paths.out_dir)
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


def usable_run_folder(out_dir: Path) -> None:
    """Make the run folder, or refuse in one line naming it: a file there, no permission, no space."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"run folder {out_dir} is a file: give --out (run.out_dir) a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".esvr-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"run folder {out_dir} cannot be written ({exc.strerror}): give --out a writable folder") from None


def _die_with_parent() -> None:  # runs in the forked child, before exec
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when this process dies


class _DetachedPopen(subprocess.Popen):  # type: ignore[type-arg]
    """A child in its own session (no terminal signals) that dies with its parent (Linux)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("start_new_session", True)
        if sys.platform.startswith("linux"):
            kwargs.setdefault("preexec_fn", _die_with_parent)
        super().__init__(*args, **kwargs)


class _DetachedSubprocess:
    """The `subprocess` module as Prefect's server module sees it, with a detached Popen."""

    Popen = _DetachedPopen

    def __getattr__(self, name: str) -> object:
        return getattr(subprocess, name)


def detach_temporary_server() -> None:
    """Start Prefect's temporary server (used when no ``PREFECT_API_URL`` is set) in its own
    session, dying with this process.

    Ctrl-C signals the whole foreground process group: the server, killed at once, left the flow
    retrying its final state report for minutes. Detached, it hears only this process: it stops
    when the interrupted flow has reported and exits (Prefect's exit hook), or, on SIGKILL, with
    this process, so no orphaned server outlives a run.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.server.api import server

    server.subprocess = _DetachedSubprocess()  # type: ignore[assignment]


@contextmanager
def run_folder_lock(out_dir: str | os.PathLike[str], *, shared: bool) -> Iterator[None]:
    """Hold the run folder for one command: `esvr run` alone (`shared` False), stage commands
    beside each other. Two commands on one folder would race on Prefect's database (its schema
    migration) and on the stages' files; the second is refused at once, naming the folder."""
    paths = RunPaths(Path(out_dir).resolve())
    usable_run_folder(paths.out_dir)
    lock = paths.out_dir / ".esvr.lock"
    busy = (
        f"run folder {paths.out_dir} is in use by another esvr command (lock {lock}); "
        "wait for it to end or give this one another --out"
    )
    with held_lock(lock, shared=shared, busy=busy):
        yield
