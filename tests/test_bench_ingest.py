"""`esvr bench ingest` (tasks/bench/ingest.py): its phases, its figures and its verdict, on a small dump."""

from __future__ import annotations

import pytest

from esvr.tasks.bench.ingest import CORES, run_bench


@pytest.mark.slow
def test_bench_ingest_reports_inputs_figures_ratios_and_a_verdict_last(tmp_path, capsys):
    results = run_bench(size_mb=50, tmp_dir=tmp_path, repeats=2)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "PASS" or out[-1].startswith("MISSED: ")
    assert results["passed"] == (out[-1] == "PASS")
    text = "\n".join(out)
    for target in ("ingest / floor >= 85%", "ingest / naive >= 6x", "ingest memory <= decoder + 200 MB"):
        assert target in text
    assert "CPU-time bound" in text and "shape check of every line" in text
    # each phase ran twice, taking turns, and reports the faster run (the lower median of two)
    assert sum(line.lstrip().startswith(("floor ", "ingest ", "naive ")) and "(median of 2: " in line for line in out) == 3
    floor, ingest, naive = results["floor"], results["ingest"], results["naive"]
    # every phase read both dumps whole
    assert floor["bytes"] > 50e6 and naive["bytes"] == floor["bytes"] == ingest["bytes"]
    # ingest decoded in one thread and parsed in the other; the shape check is part of the parsing
    assert ingest["decode_cpu_seconds"] > 0 and 0 < ingest["shape_cpu_seconds"] < ingest["parse_cpu_seconds"]
    assert CORES == {"floor": 1, "ingest": 2, "naive": 1}
    assert not list(tmp_path.iterdir())  # the generated dump is deleted
