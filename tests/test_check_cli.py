"""`esvr check` and `esvr run` on a machine that lacks what the paper recipe needs: every missing
thing at once, in seconds, one line per config key, and no traceback or server start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _esvr(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "esvr.flows.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    return proc, time.monotonic() - start


def test_check_lists_everything_the_paper_recipe_lacks_within_seconds(tmp_path: Path):
    proc, seconds = _esvr("check", "--config", str(ROOT / "configs" / "paper.yaml"), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert seconds < 10, f"esvr check took {seconds:.1f} s"
    out = proc.stdout
    for key in (
        "ingest.dumps[0]",
        "models.judge",
        "models.seeker",
        "models.supporter",
        "models.persona_writer",
        "label.emotion.model",
        "evaluate.supporters[2].finetune_data",
    ):
        assert key in out, f"{key} not reported:\n{out}"
    assert "OPENAI_API_KEY" in out and "Traceback" not in proc.stderr


def test_run_refuses_to_start_before_prefect_when_the_recipe_lacks_things(tmp_path: Path):
    proc, seconds = _esvr("run", "--config", str(ROOT / "configs" / "paper.yaml"), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "ingest.dumps[0]" in proc.stderr
    assert "Starting temporary server" not in proc.stdout + proc.stderr  # Prefect never started
    assert seconds < 20, f"esvr run took {seconds:.1f} s to refuse"


def test_check_passes_the_demo_recipe(tmp_path: Path):
    proc, _ = _esvr("check", "--config", str(ROOT / "configs" / "demo.yaml"), "--out", str(tmp_path / "run"), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 error(s)" in proc.stdout or "nothing missing" in proc.stdout


def test_a_stage_command_refuses_before_prefect_when_an_earlier_stage_has_not_run(tmp_path: Path):
    run = tmp_path / "run"
    label, _ = _esvr("label", "--config", str(ROOT / "configs" / "demo.yaml"), "--out", str(run), cwd=ROOT)
    ingest, _ = _esvr(
        "ingest",
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--out",
        str(run),
        "--dumps",
        str(tmp_path / "RS_2021-06.zst"),
        cwd=ROOT,
    )
    for proc, line in (
        (label, f"label reads {run / 'ingest' / 'threads.parquet'}, which the ingest stage writes, and it is not there"),
        (ingest, f"ingest.dumps[0]: dump {tmp_path / 'RS_2021-06.zst'} does not exist"),
    ):
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert line in proc.stderr and "Traceback" not in proc.stderr
        assert "Starting temporary server" not in proc.stdout + proc.stderr  # Prefect never started


def test_a_stage_command_leaves_the_check_to_the_flow_when_its_options_name_other_inputs():
    from esvr.flows.cli import build_parser, options_given

    parser = build_parser()
    assert not options_given(parser.parse_args(["label"]))
    assert not options_given(parser.parse_args(["simulate", "--name", "main"]))  # the default, given again
    assert options_given(parser.parse_args(["label", "--threads", "other.parquet"]))
    assert options_given(parser.parse_args(["evaluate", "--supporter", "Ours (SFT)=mlflow:abc"]))
    assert options_given(parser.parse_args(["report", "--summary", "summary.json"]))


def test_a_missing_input_the_flow_finds_is_one_line_without_a_traceback(tmp_path: Path):
    args = ("label", "--config", str(ROOT / "configs" / "demo.yaml"), "--out", str(tmp_path / "run"))
    proc, _ = _esvr(*args, "--threads", str(tmp_path / "absent.parquet"), cwd=ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"esvr: label: threads file not found: {tmp_path / 'absent.parquet'}\n" in proc.stderr  # given: no "run ingest first"
    assert "Encountered exception during execution: FileNotFoundError" in proc.stdout + proc.stderr  # Prefect's line stays
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_malformed_input_file_is_one_line_naming_it_without_a_traceback(tmp_path: Path):
    summary = tmp_path / "summary.json"
    summary.write_text('{"rows": [')
    args = ("report", "--config", str(ROOT / "configs" / "demo.yaml"), "--out", str(tmp_path / "run"))
    proc, _ = _esvr(*args, "--summary", str(summary), cwd=ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"esvr: {summary}: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_damaged_dump_is_one_line_naming_it_and_where_without_a_traceback(tmp_path: Path):
    from esvr.tasks.reddit.sample_dump import make_sample_dump

    make_sample_dump(tmp_path / "dumps", months=["2021-06"], posts=20)
    posts, comments = tmp_path / "dumps" / "RS_2021-06.zst", tmp_path / "dumps" / "RC_2021-06.zst"
    comments.write_bytes(comments.read_bytes()[: comments.stat().st_size // 2])  # a download cut short
    args = ("ingest", "--config", str(ROOT / "configs" / "demo.yaml"), "--out", str(tmp_path / "run"))
    proc, _ = _esvr(*args, "--dumps", str(posts), str(comments), cwd=ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "esvr: damaged dump(s)" in proc.stderr and f"{comments}: truncated zstd stream" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_the_traceback_filter_drops_only_user_errors_and_only_without_esvr_traceback(monkeypatch):
    import logging

    from esvr.flows.cli import NoUserErrorTraceback
    from esvr.models.config import ConfigError, InputFileError
    from esvr.tasks.reddit.ingest import NoThreadsError

    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "failed", (), (type(exc), exc, None))

    monkeypatch.delenv("ESVR_TRACEBACK", raising=False)
    for user_error in (
        FileNotFoundError("absent.parquet"),
        ConfigError("bad key"),
        InputFileError("d.jsonl: line 3"),
        NoThreadsError("no thread"),
    ):
        kept = record(user_error)
        assert NoUserErrorTraceback().filter(kept) and kept.exc_info is None  # the line stays, its traceback goes
    crash = record(RuntimeError("a bug"))
    assert NoUserErrorTraceback().filter(crash) and crash.exc_info is not None
    monkeypatch.setenv("ESVR_TRACEBACK", "1")
    asked = record(FileNotFoundError("absent.parquet"))
    assert NoUserErrorTraceback().filter(asked) and asked.exc_info is not None


def test_the_failure_line_offers_a_resume_only_where_stages_resume(monkeypatch, capsys):
    from esvr.flows import cli

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.delenv("ESVR_TRACEBACK", raising=False)
    for command in ("cmd_stage", "cmd_run", "cmd_chat", "cmd_compare"):  # main's parser takes them from the module
        monkeypatch.setattr(cli, command, broken)
    for argv, resumes in ((["label"], True), (["run"], True), (["chat"], False), (["compare", "a", "b"], False)):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert f"esvr {argv[0]}: failed: RuntimeError: a bug" in err
        assert ("run the same command to resume" in err) == resumes, err
