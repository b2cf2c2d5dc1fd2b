"""A real OpenAI-compatible server on this machine: ``transformers serve`` over a local model folder.

    with serve_transformers(ensure_default_model(), port=8011) as server:
        model = OpenAIChat(server.model, base_url=server.base_url)   # spec "openai:<server.model>"

How ``transformers serve`` names models (transformers 5.x): a request's ``model`` field is a hub id
or a path, resolved against the server's working directory, and loaded on first use; ``/v1/models``
lists the hub cache plus what is loaded, so a model nobody asked for yet is not listed. Given a
model as its argument (``--force-model``), the server loads it before it listens, answers only
requests that name it exactly (HTTP 400 otherwise) and lists it alone in ``/v1/models``, under that
exact string.

So the launcher gives the server a working directory of its own holding a folder ``<name>`` and
pins the server to that relative name. Requests, the ``openai:<name>`` spec and ``/v1/models`` then
all use one short, stable name (default: the model folder's own name, e.g.
``SmolLM2-135M-Instruct``), never a machine-specific absolute path; and because the model is loaded
before the port opens, ``/v1/models`` answering means the model is ready.

The folder ``<name>`` holds symlinks to the model's files, except ``generation_config.json``,
which is a copy with ``do_sample: true``. The server turns sampling off for ``temperature: 0`` but
never on: for a model whose generation config does not sample (SmolLM2's does not) every
temperature would give the greedy reply, and `n` samples would be `n` copies of one.

The server runs on CPU, offline (``HF_HUB_OFFLINE=1``, no update check), in a process group of its
own, so leaving the context stops it and every process it started: SIGTERM to the group, SIGKILL
after a grace period. It ignores ``n``, ``logprobs`` and ``top_logprobs``; the ``openai:`` backend
falls back for those (see openai_backend.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


class LocalServerError(RuntimeError):
    """The server could not be started; the message quotes the end of its log."""


#: a chat completion as the server's access log records it
_ANSWERED = re.compile(r'"POST /v1/chat/completions HTTP/[0-9.]+" 200')


@dataclass
class LocalServer:
    base_url: str  #: e.g. ``http://127.0.0.1:8011/v1``
    model: str  #: the name requests carry and ``/v1/models`` lists
    pid: int  #: the server process, leader of its own process group (a new one after a restart)
    log_path: Path
    restarts: int = 0  #: times the watchdog found the server wedged and started it again

    @property
    def spec(self) -> str:
        return f"openai:{self.model}"


def answered_requests(log_path: Path) -> int:
    """Chat completions the server has answered, counted in its access log (restarts included)."""
    try:
        return len(_ANSWERED.findall(log_path.read_text(errors="replace")))
    except OSError:
        return 0


def answers_chat(base_url: str, model: str, timeout_s: float) -> bool:
    """Whether the server completes a one-token chat request within `timeout_s`."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return bool(json.load(reply).get("choices"))
    except (OSError, ValueError):
        return False


class _Watchdog(threading.Thread):
    """Starts the server again when it stops answering.

    ``transformers serve --continuous-batching`` on CPU can wedge: it accepts requests and answers
    none of them, while its HTTP layer stays up, so clients only see time-outs until their retries
    run out. Every `every_s` the watchdog asks for one token; when that gets no answer within
    `probe_timeout_s` and no other chat completion was answered meanwhile (a busy server is not a
    wedged one), it stops the process group and starts the server again on the same port. Clients
    retry their cut requests (their SDK's retries); what was answered before is kept by them.
    """

    def __init__(
        self,
        server: LocalServer,
        start: Callable[[], subprocess.Popen],
        process: subprocess.Popen,
        every_s: float,
        probe_timeout_s: float,
        grace_s: float,
    ):
        super().__init__(name=f"watchdog {server.base_url}", daemon=True)
        self.server, self.start_server, self.process = server, start, process
        self.every_s, self.probe_timeout_s, self.grace_s = every_s, probe_timeout_s, grace_s
        self.stopped = threading.Event()
        self.lock = threading.Lock()  # held while a restart swaps the process

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            answered = answered_requests(self.server.log_path)
            if answers_chat(self.server.base_url, self.server.model, self.probe_timeout_s):
                continue
            if answered_requests(self.server.log_path) > answered or self.stopped.is_set():
                continue
            with self.lock:
                if self.stopped.is_set():
                    return
                logger.warning(
                    "%s answered nothing for %.0f s: restarting it (restart %d)",
                    self.server.base_url,
                    self.probe_timeout_s,
                    self.server.restarts + 1,
                )
                _stop_group(self.process, grace_s=min(self.grace_s, 2.0))
                try:
                    self.process = self.start_server()
                except LocalServerError as exc:
                    logger.error("%s could not be restarted: %s", self.server.base_url, exc)
                    return
                self.server.pid = self.process.pid
                self.server.restarts += 1

    def stop(self) -> subprocess.Popen:
        """Stops watching; returns the process that is running now."""
        self.stopped.set()
        with self.lock:
            return self.process


def list_models(base_url: str, timeout_s: float = 5.0) -> list[str]:
    """The model ids ``GET <base_url>/models`` lists; raises OSError when the server does not answer."""
    with urllib.request.urlopen(f"{base_url.rstrip('/')}/models", timeout=timeout_s) as reply:
        return [m.get("id", "") for m in json.load(reply).get("data", [])]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def _transformers_cli() -> list[str]:
    # The console script of the interpreter's own environment, not whatever `transformers` is on PATH.
    script = Path(sys.executable).with_name("transformers")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from transformers.cli.transformers import main; main()"]


def _sampling_view(model_dir: Path, view: Path) -> None:
    """`view`: the model's files as symlinks, with a generation config that samples (docstring above)."""
    view.mkdir()
    for entry in model_dir.iterdir():
        if entry.name != "generation_config.json":
            (view / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    source = model_dir / "generation_config.json"
    try:
        if source.is_file():
            config = json.loads(source.read_text())
        else:  # what transformers derives from the model config when the file is absent
            model_config = json.loads((model_dir / "config.json").read_text())
            config = {k: model_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in model_config}
    except ValueError as exc:
        raise LocalServerError(f"{model_dir}: cannot read its model config: {exc}") from exc
    (view / "generation_config.json").write_text(json.dumps({**config, "do_sample": True}, indent=2))


def _stop_group(process: subprocess.Popen, grace_s: float) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    # Children that outlived the leader (or a leader that ignored SIGTERM) go now.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@contextmanager
def serve_transformers(
    model_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    log_path: str | os.PathLike[str] | None = None,
    startup_timeout_s: float = 300.0,
    grace_s: float = 10.0,
    extra_args: tuple[str, ...] = (),
    watchdog_s: float | None = None,
    probe_timeout_s: float = 60.0,
) -> Iterator[LocalServer]:
    """Start ``transformers serve`` on `model_dir`, wait until it lists the model, stop it on exit.

    `name` is what requests and ``/v1/models`` call the model (default: the folder's name); `port`
    defaults to a free one; the log goes to `log_path` (default: a file in the server's temporary
    working directory, removed on exit). With `watchdog_s`, a watchdog probes the server that often
    and starts it again when it stops answering (`_Watchdog`).
    """
    model_dir = Path(model_dir).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise LocalServerError(f"{model_dir}: not a model folder (no config.json)")
    name = name or model_dir.name
    # A plain folder name: anything else would be read as a hub id, a revision or a GGUF file.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name.endswith(".gguf"):
        raise LocalServerError(f"server model name {name!r}: use letters, digits, '.', '_' and '-' only")
    port = port or free_port(host)
    base_url = f"http://{host}:{port}/v1"
    # Another server on the port would answer the readiness check in this one's place.
    with socket.socket() as probe:
        if probe.connect_ex((host, port)) == 0:
            raise LocalServerError(f"{host}:{port} is already in use: stop what listens there or choose another port")

    with tempfile.TemporaryDirectory(prefix="esvr-serve-") as workdir:
        _sampling_view(model_dir, Path(workdir) / name)
        log = Path(log_path) if log_path else Path(workdir) / "server.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log_named = f"its log {log}" if log_path else "its log"  # the default one is gone after exit
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "CUDA_VISIBLE_DEVICES": "",
        }
        cmd = [*_transformers_cli(), "serve", name, "--host", host, "--port", str(port), "--device", "cpu", *extra_args]

        def start() -> subprocess.Popen:
            with open(log, "ab") as out:  # a restart appends: the log counts every answer
                process = subprocess.Popen(
                    cmd,
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, stopped as a whole
                )
            try:
                _wait_until_listed(process, base_url, name, startup_timeout_s, f"{model_dir}", log, log_named)
            except BaseException:
                _stop_group(process, grace_s)
                raise
            return process

        process = start()
        server = LocalServer(base_url=base_url, model=name, pid=process.pid, log_path=log)
        watchdog = None
        if watchdog_s:
            watchdog = _Watchdog(server, start, process, watchdog_s, probe_timeout_s, grace_s)
            watchdog.start()
        try:
            yield server
        finally:
            if watchdog is not None:
                process = watchdog.stop()
            _stop_group(process, grace_s)


def _wait_until_listed(
    process: subprocess.Popen, base_url: str, name: str, timeout_s: float, model_dir: str, log: Path, log_named: str
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise LocalServerError(
                f"transformers serve for {model_dir} exited with code {process.returncode} before "
                f"answering on {base_url}; end of {log_named}:\n{_tail(log)}"
            )
        try:
            listed = list_models(base_url, timeout_s=2.0)
        except (OSError, ValueError):
            listed = None
        if listed is not None:
            if name not in listed:
                port = base_url.rsplit(":", 1)[-1].split("/")[0]
                raise LocalServerError(f"{base_url}/models lists {listed}, not {name!r}: is another server on port {port}?")
            return
        if time.monotonic() > deadline:
            raise LocalServerError(
                f"transformers serve for {model_dir} did not answer on {base_url} within "
                f"{timeout_s:.0f} s; end of {log_named}:\n{_tail(log)}"
            )
        time.sleep(0.5)
