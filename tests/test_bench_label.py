"""`esvr bench label`: the encoder's speedup over the previous default and the verdict, last."""

from __future__ import annotations

import re


def test_bench_label_ends_with_its_ratios_and_verdict():
    from esvr.tasks.bench.label import bench_label

    lines: list[str] = []
    rate = bench_label(n=16, backends=("embedding", "embedding-onnx-int8", "embedding-torch-int8"), print_fn=lines.append)
    assert any(line.startswith("previous encoder (embedding-torch-int8: torch int8, all layers)") for line in lines)
    assert any(line.startswith("ONNX Runtime int8 per CPU-second over the previous: ") for line in lines)
    speedup = next(line for line in lines if line.startswith("encoder per CPU-second, default over the previous"))
    assert speedup.endswith("(target >= 2x)")
    last = re.fullmatch(
        r"label: ([\d.]+) utterances/s; encoder ([\d.]+)x per CPU-second, stage ([\d.]+) of the encoder: (PASS|MISSED)", lines[-1]
    )
    assert last and float(last[1]) == round(rate, 1)
    assert (last[4] == "PASS") == (float(last[2]) >= 2 and float(last[3]) >= 0.95)
