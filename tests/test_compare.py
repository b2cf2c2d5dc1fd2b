"""`esvr compare`: two runs of a real MLflow store (the run folder's SQLite) side by side."""

from __future__ import annotations

from pathlib import Path

import pytest

from esvr.flows import tracking
from esvr.flows.cli import main
from esvr.flows.config import load_config


@pytest.fixture()
def two_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str, str]:
    """Two training-like runs of one experiment, as the flows log them (tracking.flow_run)."""
    monkeypatch.setattr(tracking, "USER_TRACKING_URI", None)
    out = tmp_path / "run"
    ids = []
    for lr, loss, dumps in ((1e-4, 0.9, "RS_2021-06.zst"), (5e-5, 0.7, "RS_2021-06.zst,RS_2021-07.zst")):
        config = load_config(None, [f"run.out_dir={out}", "run.experiment=compare-test", f"train_tvd.train.learning_rate={lr}"])
        config.run.tags = {"esvr.dumps": dumps}
        with tracking.flow_run("train_tvd", config, section="train_tvd") as run:
            tracking.log_metrics({"train.loss": loss, "train_tvd.accuracy": 0.5})
            if lr < 1e-4:
                tracking.log_metrics({"train_tvd.f1": 0.25})
            ids.append(run.info.run_id)
    return out, ids[0], ids[1]


def test_compare_prints_metrics_side_by_side_and_the_params_that_differ(two_runs, capsys):
    out, a, b = two_runs
    assert main(["compare", a, f"mlflow:{b}", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"A: train_tvd ({a[:8]})" and lines[1] == f"B: train_tvd ({b[:8]})"
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith(("train.", "train_tvd."))}
    assert rows["train.loss"] == ["0.9", "0.7", "-0.2"]
    assert rows["train_tvd.accuracy"] == ["0.5", "0.5", "0"]
    assert rows["train_tvd.f1"] == ["-", "0.25", "-"]  # only B has it
    # the params that differ, and only they (the recipe's run.tags are params too); the dumps each run saw
    start = lines.index(next(x for x in lines if x.startswith("params that differ")))
    assert lines[start].startswith("params that differ (2 of ")
    assert lines[start + 3].split() == ["run.tags.esvr.dumps", "RS_2021-06.zst", "RS_2021-06.zst,RS_2021-07.zst"]
    assert lines[start + 4].split() == ["train_tvd.train.learning_rate", "0.0001", "5e-05"]
    assert lines[start + 5] == ""
    assert lines[-1].split() == ["esvr.dumps", "RS_2021-06.zst", "RS_2021-06.zst,RS_2021-07.zst"]


def test_compare_names_a_missing_run_in_one_line(two_runs, capsys):
    out, a, _ = two_runs
    assert main(["compare", a, "0123456789abcdef", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("esvr compare: no MLflow run '0123456789abcdef' in sqlite:") and "\n" not in err
