"""The esvr command: help, config show, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from esvr.flows.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    for command in ("run", "config", "bench"):
        assert command in out


def test_config_show_prints_the_resolved_paper_config(capsys):
    assert main(["config", "show", "--config", str(ROOT / "configs/paper.yaml"), "--set", "run.seed=5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["run"]["seed"] == 5
    assert shown["models"]["judge"]["spec"] == "openai:gpt-4o-mini"


def test_config_error_exits_2_with_key_and_file(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modelz: {}\n")
    assert main(["config", "show", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "modelz" in err and str(bad) in err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "esvr.flows.cli", "--help"], capture_output=True, text=True, check=True)
    assert "esvr" in out.stdout


def test_run_folder_is_set_before_prefect_loads(tmp_path: Path):
    """Prefect reads its settings on import; the CLI must point them at the run folder first."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"run:\n  out_dir: {tmp_path / 'from-recipe'}\n")
    code = f"""
import os, sys
os.environ.pop("PREFECT_HOME", None)
from esvr.flows import cli
args = cli.build_parser().parse_args(["run", "--config", {str(recipe)!r}])
assert "prefect" not in sys.modules, "importing the CLI loaded Prefect"
config = cli.prepared(args)
from prefect.settings import get_current_settings
print(get_current_settings().home)
"""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(str(tmp_path / "from-recipe" / ".prefect"))


def test_a_bench_count_below_one_is_a_usage_error_naming_the_option(capsys):
    for argv, shown in (
        (["bench", "ingest", "--repeats", "0"], "--repeats: 0 is not at least 1"),
        (["bench", "label", "--repeats", "two"], "--repeats: 'two' is not a whole number"),
        (["bench", "ingest", "--size-mb", "-5"], "--size-mb: -5 is not at least 1"),
    ):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
        assert shown in capsys.readouterr().err
