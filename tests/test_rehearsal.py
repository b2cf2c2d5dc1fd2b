"""The rehearsal: configs/rehearsal.yaml is paper.yaml with sizes and endpoints only, and
`esvr rehearse` runs it end to end against real servers on 127.0.0.1."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esvr.flows.config import ABSENT, config_diff, load_config
from esvr.flows.rehearse import local_servers
from esvr.models.local_server import answered_requests

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper.yaml"
REHEARSAL = ROOT / "configs" / "rehearsal.yaml"

#: the last part of a key that only says how much (examples, steps, tokens, workers, items)
SIZE_KEYS = {
    "max_steps",
    "batch_size",
    "grad_accum",
    "max_length",
    "max_eval_examples",
    "max_train_examples",
    "max_examples",
    "max_new_tokens",
    "max_new_tokens_reasoning",
    "max_judge_tokens",
    "concurrency",
    "max_workers",
    "sample_posts",
    "chunk_size",
    "max_seq_length",
    "dev_size",
    "test_size",
    "max_chars_per_utterance",
    "pairs",
    "max_pairs",
    "reask",
    "min_situations",
    "max_situations",
    "situations_max_tokens",
    "alignment_max_tokens",
    "emotion_votes",
    "n_samples",
    "count",
    "train",
    "dev",
    "test",
    "max_personas",
    "max_turns",
    "supporter_max_tokens",
    "seeker_max_tokens",
    "stepwise_max_tokens",
    "tvd_max_tokens",
    "rg_max_tokens",
    "dpo_max_personas",
    "dpo_max_dialogues",
    "dpo_max_turns",
    "rollout_concurrency",
    "judge_max_tokens",
    "value_judgments",
    "max_dialogues",
    "max_tokens",
}
#: keys that say where things are (servers, files, folders) rather than what the method does
ENDPOINT_KEYS = {
    "run.name",
    "run.out_dir",
    "models.base",
    "ingest.dumps",
    "ingest.dumps_dir",
    "label.values.checkpoints",
    "analyze_esconv.esconv",
    "evaluate.fidelity.esconv",
}
#: the only other changes, each with its reason
EXCEPTIONS = {
    # a 135M seeker never ends a dialogue within the rehearsal's turn; with complete dialogues only
    # the judges (ES-Skills, ES-Intensity, ES-Value) would have nothing to judge
    "evaluate.complete_only": (True, False),
    # a 135M persona writer rates most of its own situations 1 (in some runs all of them): at the
    # paper's threshold no persona would be left to simulate; the rating and the filter still run
    "personas.min_alignment": (4, 1),
}


def _backend(spec: object) -> str:
    text = str(spec)
    return "local" if text == "default" or text.startswith("hf:") else text.partition(":")[0]


def test_rehearsal_changes_only_sizes_and_endpoints():
    rehearsal, paper = load_config(REHEARSAL), load_config(PAPER)
    assert rehearsal.orchestration.task_runner == paper.orchestration.task_runner == "dask"
    offending = []
    for key, (before, after) in config_diff(rehearsal, paper).items():
        last = re.sub(r"\[\d+\]", "", key.rsplit(".", 1)[-1])
        # max_retries: how long a client waits out its endpoint (a local server the watchdog restarts)
        if last in SIZE_KEYS or key in ENDPOINT_KEYS or last in {"base_url", "finetune_data", "max_retries"}:
            continue
        if EXCEPTIONS.get(key) == (before, after):
            continue
        if last == "spec" and ABSENT not in (before, after) and _backend(before) == _backend(after):
            continue  # the same kind of backend at another address (openai -> openai, hf -> local)
        offending.append(f"{key}: {before!r} -> {after!r}")
    assert not offending, "rehearsal.yaml changes more than sizes and endpoints:\n" + "\n".join(offending)


def test_rehearsal_keeps_every_paper_method_and_row():
    rehearsal, paper = load_config(REHEARSAL), load_config(PAPER)
    assert [r.name for r in rehearsal.evaluate.supporters] == [r.name for r in paper.evaluate.supporters]
    assert rehearsal.train_supporter.sweep == paper.train_supporter.sweep
    assert rehearsal.label.values.backend == "hf" and rehearsal.label.emotion.backend == "emollama"
    assert rehearsal.personas.alignment_method == "rate" and rehearsal.simulate.tvd_method == "generate"


def test_one_local_server_answers_for_every_openai_role():
    servers = local_servers(load_config(REHEARSAL))
    assert servers == {"http://127.0.0.1:8765/v1": "SmolLM2-135M-Instruct"}


def test_request_counts_come_from_the_servers_access_log(tmp_path: Path):
    log = tmp_path / "server.log"
    log.write_text(
        'INFO:     127.0.0.1:5 - "POST /v1/chat/completions HTTP/1.1" 200 OK\n'
        'INFO:     127.0.0.1:5 - "GET /v1/models HTTP/1.1" 200 OK\n'
        'INFO:     127.0.0.1:6 - "POST /v1/chat/completions HTTP/1.1" 200 OK\n'
    )
    assert answered_requests(log) == 2
    assert answered_requests(tmp_path / "missing.log") == 0


def _rehearse(out: Path, checkpoint: Path) -> tuple[dict, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "esvr.flows.cli",
            "rehearse",
            "--out",
            str(out),
            "--set",
            f"label.values.checkpoints=[{checkpoint}]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=40 * 60,
    )
    assert proc.returncode == 0, f"esvr rehearse failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "rehearsal.json").read_text()), time.monotonic() - start


@pytest.mark.slow
@pytest.mark.rehearsal
def test_rehearsal_runs_the_paper_path_end_to_end_and_reruns_from_caches(tmp_path: Path):
    out, checkpoint = tmp_path / "run", tmp_path / "value-detector"
    first, first_s = _rehearse(out, checkpoint)
    artifacts = first["artifacts"]

    # every stage left its artifacts, both branches included
    for key in (
        "threads",
        "labels",
        "datasets",
        "tvd",
        "rg",
        "emotion_rg",
        "personas",
        "dialogues",
        "emotion_dialogues",
        "supporter_sft",
        "supporter_table19",
        "emotion_sft",
        "emotion_table19",
        "evaluate_summary",
        "report",
    ):
        assert artifacts.get(key), f"no {key} artifact: {sorted(artifacts)}"
    assert (checkpoint / "config.json").is_file()  # the hf value detector's local checkpoint
    # each branch trains DPO when its selected setting found training pairs; a 135M model's two
    # turns may give none at the paper's T_diff, and then the stage says so and keeps the SFT model
    for branch, dpo in (("supporter", "supporter_dpo"), ("emotion", "emotion_dpo")):
        table19 = json.loads(Path(artifacts[f"{branch}_table19"]).with_suffix(".json").read_text())
        selected = table19["table19"][table19["selected"]]["train"]["pairs"]
        assert bool(artifacts.get(dpo)) == (selected > 0), (branch, selected, artifacts.get(dpo))

    # the map-style stages ran on the local Dask cluster's two worker processes
    chunks = json.loads((out / "label" / "label_chunks.json").read_text())
    assert len({c["worker_pid"] for c in chunks}) >= 2, chunks

    # labels, simulations and judgments went through the local server
    assert sum(first["server_requests"].values()) > 0
    for stage in ("label", "personas", "simulate", "train_supporter", "evaluate"):
        sent = sum(n for name, n in first["stage_requests"].items() if name == stage or name.startswith(f"{stage}-"))
        assert sent > 0, f"{stage} sent no request: {first['stage_requests']}"

    # the report holds all nine rows of Table 3
    report = Path(artifacts["report"]).read_text()
    for row in load_config(REHEARSAL).evaluate.supporters:
        assert row.name in report, f"row {row.name!r} missing from the report"

    # MLflow holds Table 19's settings as nested runs (the main sweep and the emotion variant's)
    with sqlite3.connect(out / "mlflow.db") as db:
        settings = db.execute(
            "SELECT COUNT(DISTINCT r.run_uuid) FROM runs r JOIN params p ON p.run_uuid = r.run_uuid WHERE p.key = 't_diff'"
        ).fetchone()[0]
        workers = db.execute("SELECT MAX(value) FROM metrics WHERE key = 'evaluate.workers'").fetchone()[0]
    assert settings == len(load_config(REHEARSAL).train_supporter.sweep) + 2
    assert workers == 2  # the evaluation's simulations, one task per row

    # a second rehearsal into the same folder is served from the caches
    second, second_s = _rehearse(out, checkpoint)
    assert sum(second["server_requests"].values()) < 0.05 * sum(first["server_requests"].values())
    assert second_s < first_s / 2
    print(f"rehearsal: first {first_s:.0f} s, peak {first['peak_total_mb']:.0f} MB; second {second_s:.0f} s")


def test_every_openai_model_of_the_rehearsal_is_served_on_this_machine():
    # A role the paper gives its own API model (e.g. a step's model) must point at the local server,
    # or the rehearsal stops at the preflight asking for an API key.
    def openai_models(node: object, key: str = "") -> list[tuple[str, dict]]:
        found = []
        if isinstance(node, dict):
            if str(node.get("spec", "")).startswith("openai:"):
                found.append((key, node))
            for k, v in node.items():
                found += openai_models(v, f"{key}.{k}" if key else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                found += openai_models(v, f"{key}[{i}]")
        return found

    rehearsal = load_config(REHEARSAL).model_dump(mode="json")
    models = openai_models(rehearsal)
    assert models
    remote = [key for key, model in models if not str(model.get("base_url") or "").startswith("http://127.0.0.1:")]
    assert not remote, f"openai: models of rehearsal.yaml without a local base_url: {remote}"
