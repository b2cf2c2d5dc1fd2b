"""Paper App. J: the reference supporter's lowest ES-Value dialogues, grouped by persona category,
in the summary and in the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from esvr.tasks.evaluation.evaluate import SupporterUnderTest, summarize
from esvr.tasks.evaluation.judges import criterion_names
from esvr.tasks.evaluation.lowest_value import lowest_value_dialogues, lowest_value_markdown
from esvr.tasks.evaluation.report import build_report

CATEGORIES = ["Career and Work-Related Challenges"] * 4 + ["Family Dynamics and Conflicts"] * 4


def dialogues() -> list[dict]:
    return [{"persona_id": f"p{i}", "persona": {"id": f"p{i}", "problem": c}} for i, c in enumerate(CATEGORIES)]


def judgment(name: str, i: int, single: float | None = None) -> dict:
    skills = {c: {"score": 4, "expected": 4.0, "dist": {}, "method": "argmax"} for c in criterion_names()}
    rec = {"supporter": name, "persona_id": f"p{i}", "skills": skills, "intensity": {"level": 2, "expected": 2.0}, "words_per_turn": 20.0}  # fmt: skip
    if single is not None:
        rec["value_single"] = {
            "value_seeker": {"score": round(single), "expected": single},
            "value_supporter": {"score": round(single), "expected": single + 0.5},
        }
    return rec


def test_single_scores_pick_the_lowest_and_group_them_by_category():
    # career dialogues score 3.0-3.3, family ones 4.5-4.8: the 3 lowest are all career
    singles = [3.0, 3.1, 3.2, 3.3, 4.5, 4.6, 4.7, 4.8]
    judged = [judgment("Ours (DPO)", i, s) for i, s in enumerate(singles)]
    entry = lowest_value_dialogues("Ours (DPO)", judged, {}, dialogues(), n=3)
    assert entry is not None and entry["n"] == 3 and entry["scored"] == 8
    assert entry["categories"] == [
        {"category": "Career and Work-Related Challenges", "lowest": 3, "scored": 4, "mean_score": pytest.approx(3.35)}
    ]
    assert [d["persona_id"] for d in entry["dialogues"]] == ["p0", "p1", "p2"]
    assert "single 1-5 value score" in entry["measure"]
    md = lowest_value_markdown(entry)
    assert "| Career and Work-Related Challenges | 3 | 4 | 75% | 3.35 |" in md


def test_without_single_scores_the_other_supporters_win_ratios_decide():
    # the baseline beats the reference on the family personas: those are the reference's lowest
    values = {
        "Baseline": [
            {"reference": "Ours (DPO)", "persona_id": f"p{i}", "seeker": {"win_ratio": r}, "supporter": {"win_ratio": r}}
            for i, r in enumerate([0.1, 0.2, 0.1, 0.2, 0.9, 0.8, 0.9, 0.7])
        ]
    }
    entry = lowest_value_dialogues("Ours (DPO)", [judgment("Ours (DPO)", i) for i in range(8)], values, dialogues(), n=4)
    assert entry is not None and entry["categories"][0]["category"] == "Family Dynamics and Conflicts"
    assert entry["categories"][0]["lowest"] == 4 and entry["dialogues"][0]["score"] == pytest.approx(0.1)
    assert lowest_value_dialogues("Ours (DPO)", [], {}, dialogues()) is None


def test_the_report_gains_the_section(tmp_path: Path):
    rows = [SupporterUnderTest(name="Ours (DPO)", category="Ours")]
    judged = {"Ours (DPO)": [judgment("Ours (DPO)", i, 3.0 + i / 10) for i in range(8)]}
    summary = summarize(judged, {}, "Ours (DPO)", rows, table_score="parsed", extra={"judge": "j", "seeker": "s", "personas": 8})
    summary["lowest_value"] = lowest_value_dialogues("Ours (DPO)", judged["Ours (DPO)"], {}, dialogues(), n=5)
    report = Path(build_report([("run", summary)], tmp_path)["report"]).read_text()
    assert "Lowest ES-Value dialogues of Ours (DPO), by persona category (paper App. J)" in report
    assert "| Career and Work-Related Challenges | 4 | 4 | 100% |" in report
