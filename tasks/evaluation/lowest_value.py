"""Paper App. J: the dialogues where value reinforcement scored lowest, grouped by persona category.

The paper scored its DPO model's dialogues on a single 1-5 value scale (seeker and supporter
perspectives), took the 40 with the lowest score and sorted their shortcomings into categories.
Here the lowest dialogues of one supporter (the evaluation's reference, Table 3's "Ours (DPO)") are
counted per persona problem category, so a reader sees where value reinforcement fails most. The
score is the single value judgment when the evaluation ran with ``value_single: true`` (App. H's
scale), else 1 minus the other supporters' ES-Value win ratio against it on the same persona.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: how many of the lowest dialogues are grouped (the paper analysed 40)
LOWEST = 40


def _scores(model: str, judgments: Sequence[Mapping[str, Any]], values: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[dict[str, float], str]:  # fmt: skip
    single = [r for r in judgments if r.get("value_single")]
    if single:
        scores = {str(r["persona_id"]): float(np.mean([v["expected"] for v in r["value_single"].values()])) for r in single}
        return scores, "single 1-5 value score (expected), mean of the seeker and supporter perspectives"
    against: dict[str, list[float]] = defaultdict(list)
    for recs in values.values():
        for r in recs:
            if r.get("reference") != model:
                continue
            ratios = [v["win_ratio"] for v in r.values() if isinstance(v, Mapping) and v.get("win_ratio") is not None]
            if ratios:
                against[str(r["persona_id"])].append(1.0 - float(np.mean(ratios)))
    return {pid: float(np.mean(v)) for pid, v in against.items()}, "1 - the other supporters' ES-Value win ratio against it"


def lowest_value_dialogues(
    model: str,
    judgments: Sequence[Mapping[str, Any]],
    values: Mapping[str, Sequence[Mapping[str, Any]]],
    dialogues: Sequence[Mapping[str, Any]],
    n: int = LOWEST,
) -> dict[str, Any] | None:
    """The `n` lowest-scored dialogues of `model` and their count per persona category; None when
    no dialogue has a score (no single value judgments and no other supporter to compare)."""
    scores, measure = _scores(model, judgments, values)
    if not scores:
        return None
    category = {str(d["persona_id"]): (d.get("persona") or {}).get("problem") or "unknown" for d in dialogues}
    lowest = sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))[:n]
    per: dict[str, list[float]] = defaultdict(list)
    for pid, score in lowest:
        per[category.get(pid, "unknown")].append(score)
    totals: dict[str, int] = defaultdict(int)
    for pid in scores:
        totals[category.get(pid, "unknown")] += 1
    rows = [
        {"category": cat, "lowest": len(v), "scored": totals[cat], "mean_score": float(np.mean(v))}
        for cat, v in sorted(per.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    ]
    return {
        "model": model,
        "measure": measure,
        "n": len(lowest),
        "scored": len(scores),
        "categories": rows,
        "dialogues": [{"persona_id": pid, "problem": category.get(pid, "unknown"), "score": s} for pid, s in lowest],
    }


def lowest_value_markdown(entry: Mapping[str, Any]) -> str:
    lines = [
        f"### Lowest ES-Value dialogues of {entry['model']}, by persona category (paper App. J)",
        "",
        f"The {entry['n']} lowest of {entry['scored']} scored dialogues; score: {entry['measure']}.",
        "",
        "| Problem category | among the lowest | dialogues scored | share | mean score |",
        "|---|---|---|---|---|",
    ]
    for r in entry["categories"]:
        lines.append(
            f"| {r['category']} | {r['lowest']} | {r['scored']} | {r['lowest'] / r['scored']:.0%} | {r['mean_score']:.2f} |"
        )
    return "\n".join(lines) + "\n"
