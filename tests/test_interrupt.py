"""What a stopped run leaves: Ctrl-C / SIGTERM / SIGKILL of a real `esvr simulate` process group
against a local OpenAI-style server, and the run folder's lock between commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml

from esvr.tasks.bench.simulate import FakeOpenAIServer, Script, bench_personas
from esvr.tasks.common.jsonl import read_jsonl
from esvr.tasks.simulation.simulate import load_dialogues

ESVR = str(Path(sys.executable).parent / "esvr")
PERSONAS = 24


def _recipe(tmp_path: Path, server: FakeOpenAIServer) -> list[str]:
    model = {"spec": "openai:fake", "base_url": server.base_url, "api_key_env": "ESVR_TEST_KEY", "max_retries": 1}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "run": {"out_dir": str(tmp_path / "run"), "experiment": "interrupt"},
                "models": {"supporter": model, "seeker": model},
                "simulate": {"emotion": False, "concurrency": 3, "alternatives": False, "splits": ["test"]},
            }
        )
    )
    personas = tmp_path / "personas.jsonl"
    personas.write_bytes(b"".join(orjson.dumps(p) + b"\n" for p in bench_personas(PERSONAS)))
    return [ESVR, "simulate", "--config", str(recipe), "--personas", str(personas)]


def _env() -> dict[str, str]:
    # the command's own run folder holds Prefect and MLflow, as for a user
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return env | {"ESVR_TEST_KEY": "unused", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "240"}


def _start_and_wait(cmd: list[str], out: Path, dialogues: int, log: Path) -> subprocess.Popen:
    """Start the command in its own process group; return once `out` holds `dialogues` lines."""
    proc = subprocess.Popen(
        cmd,
        start_new_session=True,
        env=_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        # as a terminal's foreground job: a test run in the background inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= dialogues:
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {dialogues} dialogues before the deadline:\n{log.read_text()[-3000:]}")


def _servers_of(run_dir: Path) -> list[int]:
    """Pids of live processes whose Prefect home is in `run_dir` (the temporary server)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if state != "Z" and f"PREFECT_HOME={run_dir}".encode() in [e[: len(f"PREFECT_HOME={run_dir}")] for e in environ]:
            pids.append(int(proc.name))
    return pids


def _mlflow_statuses(run_dir: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "interrupt"]
    return [r.info.status for r in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the server dies with its parent on Linux")
def test_ctrl_c_and_sigterm_stop_a_simulation_at_once_and_sigkill_leaves_no_server(tmp_path: Path) -> None:
    out = tmp_path / "run" / "simulate" / "main" / "dialogues.jsonl"
    with FakeOpenAIServer(Script(end_after=3), latency_s=0.3) as server:
        cmd = _recipe(tmp_path, server)

        # Ctrl-C: SIGINT to the whole process group, as a terminal sends it
        proc = _start_and_wait(cmd, out, 3, tmp_path / "first.log")
        requests = len(server.requests)
        os.killpg(proc.pid, signal.SIGINT)
        signalled = time.time()
        rc = proc.wait(timeout=180)
        stopped_s = time.time() - signalled
        log = (tmp_path / "first.log").read_text()
        assert rc == 130, log[-3000:]
        assert "interrupted; rerun the same command to resume" in log
        # no new call after the signal: only those in flight (3 dialogues, one call each) may land
        assert len(server.requests) - requests <= 3 + 3
        # Prefect's final report and its server's stop, then exit: seconds, not minutes
        assert stopped_s < 60, f"{stopped_s:.0f} s from SIGINT to exit"
        written = read_jsonl(out)  # whole lines only: each a finished dialogue
        assert 3 <= len(written) < PERSONAS and all(d["end_reason"] == "seeker_end" for d in written)
        assert not out.with_name("dialogues.jsonl.lock").exists() and not (tmp_path / "run" / ".esvr.lock").exists()
        assert _mlflow_statuses(tmp_path / "run") == ["KILLED"]
        assert _servers_of(tmp_path / "run") == []

        # SIGTERM (`kill PID`, a scheduler's stop) to the command alone: the same clean stop
        proc = _start_and_wait(cmd, out, len(written) + 2, tmp_path / "second.log")
        os.kill(proc.pid, signal.SIGTERM)
        log = (tmp_path / "second.log").read_text() if proc.wait(timeout=180) != 130 else ""
        assert proc.returncode == 130, log[-3000:]
        assert "interrupted; rerun the same command to resume" in (tmp_path / "second.log").read_text()
        assert _mlflow_statuses(tmp_path / "run") == ["KILLED", "KILLED"]
        assert not out.with_name("dialogues.jsonl.lock").exists() and _servers_of(tmp_path / "run") == []
        written = read_jsonl(out)

        # SIGKILL: nothing can clean up, yet the temporary server goes with its parent
        proc = _start_and_wait(cmd, out, len(written) + 2, tmp_path / "third.log")
        assert _servers_of(tmp_path / "run"), "the temporary server should be running"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while _servers_of(tmp_path / "run") and time.time() < deadline:
            time.sleep(0.2)
        assert _servers_of(tmp_path / "run") == []

        # the same command resumes: every persona once, the finished ones untouched
        assert subprocess.run(cmd, env=_env(), capture_output=True, timeout=400).returncode == 0
    dialogues = load_dialogues(out)
    assert sorted(d["id"] for d in dialogues) == sorted(p["id"] for p in bench_personas(PERSONAS))
    assert dialogues[: len(written)] == written


def test_sigterm_is_an_interrupt() -> None:
    code = "import os, signal, time\nfrom esvr.flows import cli\nsignal.signal(signal.SIGTERM, cli._interrupt)\n"
    code += "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(30)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    # an uncaught KeyboardInterrupt ends Python as SIGINT would
    assert out.returncode == -signal.SIGINT and "KeyboardInterrupt" in out.stderr


def test_a_second_command_on_a_run_folder_in_use_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two `esvr run` on one --out raced on Prefect's database migration; the second now stops at once."""
    from esvr.flows.cli import main
    from esvr.flows.runtime import run_folder_lock

    out = tmp_path / "run"
    with run_folder_lock(out, shared=False):  # an `esvr run` in progress
        for command in (["run"], ["simulate"], ["train-supporter"]):
            assert main([*command, "--config", "configs/demo.yaml", "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert f"run folder {out} is in use by another esvr command" in err and "another --out" in err
    with run_folder_lock(out, shared=True):  # a stage command in progress: a run waits its turn, other stages go on
        assert main(["run", "--config", "configs/demo.yaml", "--out", str(out)]) == 2
        assert "in use by another esvr command" in capsys.readouterr().err
        with run_folder_lock(out, shared=True):
            pass
    assert not (out / ".esvr.lock").exists()
