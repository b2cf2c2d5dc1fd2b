"""`esvr rehearse`: the paper recipe's code path, end to end, against real servers on this machine.

``configs/rehearsal.yaml`` is ``configs/paper.yaml`` with only sizes and endpoints changed. This
module brings up what those endpoints name and runs the whole pipeline through them:

1. every local value-detector checkpoint the recipe names (``label.values.checkpoints``) is built
   from the bundled encoder and value head if it is not there yet;
2. one ``transformers serve`` per ``base_url`` on this machine that an ``openai:`` role names,
   serving the bundled model under the role's model name (one name per server);
3. the preflight check, so a missing piece is reported before anything runs;
4. ``esvr run`` on the recipe, in this process; then the servers stop, whatever happened.

It writes ``<run>/rehearsal.json``: wall time, peak memory, the requests each server answered (read
from its access log), and the run's artifacts. A second rehearsal into the same run folder is
served from the caches.
"""

from __future__ import annotations

import bisect
import json
import re
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from esvr.flows.config import ModelConfig, PipelineConfig
from esvr.flows.memory import StageMemory
from esvr.models.config import ConfigError
from esvr.models.local_server import answered_requests

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
#: Continuous batching answers concurrent requests together: 16 EmoLlama-sized prompts at once took
#: 4.3 s instead of 68 s on a 2-core machine. Its KV cache is sized here (512 blocks of 32 tokens,
#: ~0.75 GB for SmolLM2-135M): left to its default on CPU it took 9.7 GB.
CONTINUOUS_BATCHING = (
    "--continuous-batching",
    "--cb-block-size",
    "32",
    "--cb-num-blocks",
    "512",
    "--cb-max-batch-tokens",
    "2048",
)
#: How often each server is probed, and how long a probe may wait, before the watchdog starts a
#: server that stopped answering again (models/local_server.py, ``_Watchdog``).
WATCHDOG_S, PROBE_TIMEOUT_S = 30.0, 60.0


@dataclass
class Rehearsal:
    """What one rehearsal did; written to ``<run>/rehearsal.json``."""

    config: str
    out_dir: str
    wall_s: float = 0.0
    peak_total_mb: float = 0.0
    #: chat completions each local server answered in this rehearsal, by base_url
    server_requests: dict[str, int] = field(default_factory=dict)
    #: times a server stopped answering and was started again, by base_url
    server_restarts: dict[str, int] = field(default_factory=dict)
    #: the same, all servers together, by the stage (MLflow run name) that was running
    stage_requests: dict[str, int] = field(default_factory=dict)
    checkpoints_built: list[str] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)
    stage_peaks_mb: dict[str, float] = field(default_factory=dict)


def local_servers(config: PipelineConfig) -> dict[str, str]:
    """``{base_url: model name}`` for every ``openai:`` model of the recipe served on this machine.

    A recipe may name one model per local server: that is what a server of the bundled model can
    answer for. Variants are included (their keys may name other endpoints).
    """
    found: dict[str, tuple[str, str]] = {}
    configs = [config, *(config.variant(name) for name in config.variants)]
    for cfg in configs:
        for key, model in _openai_models(cfg):
            if not model.base_url or urlparse(model.base_url).hostname not in LOCAL_HOSTS:
                continue
            name = model.spec.partition(":")[2]
            url = model.base_url.rstrip("/")
            if url in found and found[url][0] != name:
                raise ConfigError(
                    f"{key}: names model {name!r} at {url}, where {found[url][1]} names {found[url][0]!r}; "
                    "a rehearsal serves one model name per local server"
                )
            found.setdefault(url, (name, key))
    return {url: name for url, (name, _) in found.items()}


def _openai_models(config: PipelineConfig) -> list[tuple[str, ModelConfig]]:
    """Every (config key, ModelConfig) of the recipe whose spec is ``openai:...``."""
    out: list[tuple[str, ModelConfig]] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, ModelConfig):
            if node.spec.startswith("openai:"):
                out.append((key, node))
        elif hasattr(node, "model_fields"):
            for name in type(node).model_fields:
                walk(getattr(node, name), f"{key}.{name}" if key else name)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{key}[{i}]")

    walk(config, "")
    return out


def build_checkpoints(config: PipelineConfig) -> list[str]:
    """Build the local value-detector checkpoints the recipe names but that do not exist yet."""
    from esvr.models.value_checkpoint import build_value_checkpoint

    if config.label.values.backend != "hf":
        return []
    built = []
    for name in config.label.values.checkpoints:
        path = Path(name)
        ours = (path / "esvr_build.json").is_file()
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None
        if ours or not (path.exists() or hub_id):  # never touch a user's checkpoint or a hub id
            build_value_checkpoint(path)  # a no-op when the same build is there
            built.append(str(path))
    return built


class RequestCounter(threading.Thread):
    """Samples the servers' request counts twice a second, so requests can be put to stages by time
    (the access log has no timestamps; MLflow has each stage's start and end)."""

    def __init__(self, logs: list[Path], every_s: float = 0.5):
        super().__init__(daemon=True, name="rehearsal-request-counter")
        self.logs, self.every_s = logs, every_s
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()

    def sample(self) -> None:
        self.samples.append((time.time(), sum(answered_requests(log) for log in self.logs)))

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()

    def at(self, when: float) -> int:
        """The count at time `when` (the last sample at or before it)."""
        index = bisect.bisect_right([t for t, _ in self.samples], when) - 1
        return self.samples[index][1] if index >= 0 else 0


def requests_by_stage(counter: RequestCounter, experiment: str, since: float) -> dict[str, int]:
    """Requests answered while each stage's MLflow runs were open, summed by stage name."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.start_time >= {int(since * 1000)}")
    by_stage: dict[str, int] = {}
    for run in runs:
        stage = run.data.tags.get("esvr.stage", run.info.run_name)
        if stage == "pipeline" or run.info.end_time is None:
            continue
        spent = counter.at(run.info.end_time / 1000) - counter.at(run.info.start_time / 1000)
        by_stage[stage] = by_stage.get(stage, 0) + spent
    return by_stage


def rehearse(config: PipelineConfig, config_path: str = "") -> Rehearsal:
    """Bring up the recipe's local endpoints, run the pipeline through them, take them down."""
    from esvr.flows.pipeline import pipeline_flow
    from esvr.flows.preflight import ensure_ready, format_report
    from esvr.models.default_model import ensure_default_model
    from esvr.models.local_server import LocalServer, serve_transformers

    out_dir = config.run.out_dir.resolve()
    report = Rehearsal(config=config_path, out_dir=str(out_dir))
    report.checkpoints_built = build_checkpoints(config)
    servers = local_servers(config)
    logs: dict[str, Path] = {}
    running: dict[str, LocalServer] = {}
    start, started_at = time.monotonic(), time.time()
    with ExitStack() as stack, StageMemory() as memory:
        memory.begin("servers")
        model_dir = ensure_default_model()
        for url, name in servers.items():
            parsed = urlparse(url)
            log = out_dir / "servers" / f"{parsed.hostname}-{parsed.port}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("")  # this rehearsal's requests only
            print(f"starting transformers serve for {name!r} on {url} (log: {log})")
            running[url] = stack.enter_context(
                serve_transformers(
                    model_dir,
                    name=name,
                    host=parsed.hostname or "127.0.0.1",
                    port=parsed.port,
                    log_path=log,
                    extra_args=CONTINUOUS_BATCHING,
                    watchdog_s=WATCHDOG_S,
                    probe_timeout_s=PROBE_TIMEOUT_S,
                )
            )
            logs[url] = log
        warnings = ensure_ready(config)
        if warnings:
            print(format_report(warnings))
        memory.begin("pipeline")
        counter = RequestCounter(list(logs.values()))
        counter.start()
        try:
            report.artifacts = pipeline_flow(config)
        finally:
            counter.stop()
    report.wall_s = round(time.monotonic() - start, 1)
    report.server_requests = {url: answered_requests(log) for url, log in logs.items()}
    report.server_restarts = {url: server.restarts for url, server in running.items()}
    report.stage_requests = requests_by_stage(counter, config.run.experiment, started_at)
    metrics = memory.metrics()
    report.stage_peaks_mb = {k: v for k, v in metrics.items() if k.endswith("peak_total_mb")}
    report.peak_total_mb = max(report.stage_peaks_mb.values(), default=0.0)
    (out_dir / "rehearsal.json").write_text(json.dumps(asdict(report), indent=1))
    return report


def summary(report: Rehearsal) -> str:
    lines = [
        f"rehearsal of {report.config or 'the recipe'} in {report.out_dir}",
        f"  wall time: {report.wall_s:.0f} s, peak memory (with servers and workers): {report.peak_total_mb / 1024:.2f} GiB",
    ]
    for url, count in report.server_requests.items():
        restarts = report.server_restarts.get(url, 0)
        again = f", started again {restarts}x after it stopped answering" if restarts else ""
        lines.append(f"  {url}: {count} chat completions{again}")
    stages = ", ".join(f"{stage} {count}" for stage, count in report.stage_requests.items() if count)
    lines.append(f"  requests by stage: {stages or '(none)'}")
    lines.append(f"  report: {report.artifacts.get('report', '(none)')}")
    return "\n".join(lines)
