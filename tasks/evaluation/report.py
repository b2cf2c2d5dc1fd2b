"""The evaluation report: Markdown tables laid out like the paper's Tables 2 and 3, and plots.

Input: evaluation summaries (``evaluate/summary.json``, the contract of `esvr.tasks.evaluation.evaluate.summarize`),
read from files or downloaded from MLflow runs chosen by id or by tag. Per summary, one table:

    | [Category] | Model | Iden. ... Over. | ES-Intensity ↓ | ES-Value Seeker ↑ | Supporter ↑ | Words/turn | n | [Ref. used] |

with the paper's marks after each number (* p < 0.05, † p < 0.1: Mann-Whitney U against the
reference row; for ES-Value, Wilcoxon signed-rank of the win ratios against 0.5) and "-" for the
reference's own ES-Value. "Ref. used" is the share of the row's supporter turns whose Step 3 used
the reference response (the paper: GPT declines it in about 90% of turns); "-" for a row without
one, and no column when the summary carries no dialogues. The category column appears when the
rows have more than one category (Table 3) and not otherwise (Table 2). A second table gives the
other score kind (expected scores when the table shows parsed ratings, and vice versa). Plots per
summary: ES-Skills per criterion (grouped bars) and ES-Value win ratios (bars around 0.5).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from esvr.models.config import InputFileError
from esvr.tasks.evaluation.judges import criterion_labels

PERSPECTIVE_LABELS = {"seeker": "Seeker", "supporter": "Supporter"}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(stat: Mapping[str, Any] | None, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.{digits}f}{stat.get('mark', '')}"


def load_summary(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no evaluation summary {p}") from None
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{p}: not valid JSON: {exc}") from None
    for key in ("reference", "criteria", "models"):
        if key not in data:
            raise InputFileError(f"{p}: not an evaluation summary (no '{key}' field)")
    return data


def summary_table(summary: Mapping[str, Any], score: str | None = None) -> str:
    """One Markdown table for one evaluation (Table 2's layout, or Table 3's with categories)."""
    kind = score or summary.get("table_score", "parsed")
    skill_kind = "score" if kind == "parsed" else "expected"
    value_kind = "win_ratio" if kind == "parsed" else "expected"
    labels = criterion_labels()
    crits = list(summary["criteria"])
    models = summary["models"]
    with_category = len({m["category"] for m in models}) > 1
    head = (["Category"] if with_category else []) + ["Model"] + [labels.get(c, c) for c in crits]
    head += ["ES-Intensity ↓"] + [
        f"ES-Value {PERSPECTIVE_LABELS.get(p, p)} ↑" for p in summary.get("perspectives", ["seeker", "supporter"])
    ]
    head += ["Words/turn", "n"]
    with_usage = any(m.get("reference_used_share") is not None for m in models)
    if with_usage:
        head.append("Ref. used")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    last_category = None
    for m in models:
        row = []
        if with_category:
            row.append(m["category"] if m["category"] != last_category else "")
            last_category = m["category"]
        row.append(f"**{m['name']}** (ref.)" if m.get("is_reference") else m["name"])
        row += [_cell(m["skills"][c][skill_kind]) for c in crits]
        row.append(_cell(m["intensity"][skill_kind]))
        for p in summary.get("perspectives", ["seeker", "supporter"]):
            row.append("-" if m.get("is_reference") else _cell((m["value"].get(p) or {}).get(value_kind)))
        row.append(_cell(m["words_per_turn"], 1))
        row.append(str(m["n_dialogues"]))
        if with_usage:
            share = m.get("reference_used_share")
            row.append("-" if share is None else f"{share:.0%}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def plot_skills(summary: Mapping[str, Any], path: Path, score: str | None = None) -> Path:
    """Grouped bars: one group per ES-Skills criterion, one bar per model (1-5 scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kind = "score" if (score or summary.get("table_score", "parsed")) == "parsed" else "expected"
    labels = criterion_labels()
    crits = list(summary["criteria"])
    models = summary["models"]
    x = np.arange(len(crits))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.0 * len(crits) + 0.4 * len(models)), 4.2), dpi=120)
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(models):
        ys = [m["skills"][c][kind]["mean"] or 0.0 for c in crits]
        bars = ax.bar(
            x - 0.4 + width * (i + 0.5),
            ys,
            width,
            label=m["name"] + (" (ref.)" if m.get("is_reference") else ""),
            color=cmap(i % 10),
        )
        for b, c in zip(bars, crits):
            mark = m["skills"][c][kind].get("mark", "")
            if mark:
                ax.annotate(mark, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([labels.get(c, c) for c in crits])
    ax.set_ylim(1, 5.3)
    ax.set_ylabel("score (1-5)" if kind == "score" else "expected score (1-5)")
    ax.set_title(
        f"ES-Skills per criterion ({'parsed ratings' if kind == 'score' else 'expected scores'}; * p<0.05, † p<0.1 vs reference)",
        fontsize=10,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(4, len(models)), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_values(summary: Mapping[str, Any], path: Path, score: str | None = None) -> Path | None:
    """Horizontal bars: each model's ES-Value win ratio against the reference, per perspective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kind = "win_ratio" if (score or summary.get("table_score", "parsed")) == "parsed" else "expected"
    models = [m for m in summary["models"] if not m.get("is_reference")]
    if not models:
        return None
    persps = summary.get("perspectives", ["seeker", "supporter"])
    y = np.arange(len(models))
    height = 0.8 / len(persps)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.6 * len(models) * len(persps)), dpi=120)
    colors = {"seeker": "#4C72B0", "supporter": "#DD8452"}
    for j, p in enumerate(persps):
        vals = [((m["value"].get(p) or {}).get(kind) or {}).get("mean") for m in models]
        pos = y - 0.4 + height * (j + 0.5)
        bars = ax.barh(
            pos, [v if v is not None else 0 for v in vals], height, label=PERSPECTIVE_LABELS.get(p, p), color=colors.get(p)
        )
        for b, m, v in zip(bars, models, vals):
            mark = ((m["value"].get(p) or {}).get(kind) or {}).get("mark", "")
            text = "n/a" if v is None else f"{v:.2f}{mark}"
            ax.annotate(
                text,
                (b.get_width(), b.get_y() + b.get_height() / 2),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels([m["name"] for m in models])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel(f"win ratio against {summary['reference']} (ties count half; 0.5 = even)")
    ax.set_title("ES-Value (* p<0.05, † p<0.1)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def build_report(
    summaries: Sequence[tuple[str, Mapping[str, Any]]], out_dir: str | Path, title: str = "ES-VR evaluation report"
) -> dict[str, Any]:
    """`summaries`: (label, summary) pairs, e.g. (MLflow run id, summary.json). Writes
    ``report.md`` and one pair of PNGs per summary into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not summaries:
        raise ValueError("no evaluation summary to report on")
    parts = [f"# {title}", ""]
    parts += [
        "ES-Skills: 1-5 per criterion (higher is better); ES-Intensity: the seeker's final negative-emotion "
        "level, 1-5 (lower is better); ES-Value: win ratio against the reference supporter on the same persona "
        "(ties count half; 0.5 = as good as the reference); Words/turn: mean words per supporter turn (longer "
        "replies can sway judges: the paper's length confound). Marks: Mann-Whitney U against the reference "
        "(ES-Value: Wilcoxon signed-rank of the win ratios against 0.5), * p < 0.05, † p < 0.1. "
        "Ref. used: share of supporter turns that used the reference response.",
        "",
    ]
    plots: list[str] = []
    for i, (label, s) in enumerate(summaries, 1):
        name = s.get("run_name") or label
        kind = s.get("table_score", "parsed")
        parts += [f"## {i}. {name}" + (f" (run `{label}`)" if label and label != name else ""), ""]
        facts = [
            f"reference: **{s['reference']}**",
            f"judge: `{s.get('judge', '?')}`",
            f"seeker simulator: `{s.get('seeker', '?')}`",
            f"personas: {s.get('personas', '?')} ({s.get('split', 'test')})",
            f"max turns: {s.get('max_turns', '?')}",
            f"ES-Value judgments per pair: {s.get('value_judgments', '?')}",
            "dialogues judged: "
            + ("complete only" if s.get("complete_only", True) else "all, including those cut at the turn limit"),
        ]
        parts += ["; ".join(facts) + ".", ""]
        if s.get("judge") and s.get("judge") == s.get("seeker"):
            parts += [
                "> The judge is the seeker simulator's model: scores may favour dialogues that model finds natural (circularity).",
                "",
            ]
        parts += [f"**Scores: {'parsed ratings' if kind == 'parsed' else 'expected scores'}**", "", summary_table(s, kind), ""]
        other = "expected" if kind == "parsed" else "parsed"
        parts += [
            f"<details><summary>The same with {'expected scores (sum of k·p(k))' if other == 'expected' else 'parsed ratings'}</summary>",
            "",
            summary_table(s, other),
            "",
            "</details>",
            "",
        ]
        ended = [m for m in s["models"] if m.get("end_reasons")]
        if ended:
            parts += ["| Model | simulated | complete | end reasons |", "|---|---|---|---|"]
            for m in ended:
                reasons = ", ".join(f"{k}: {v}" for k, v in m["end_reasons"].items())
                parts.append(f"| {m['name']} | {m.get('n_simulated', '-')} | {m.get('n_complete', '-')} | {reasons} |")
            parts.append("")
        if s.get("lowest_value"):  # App. J
            from esvr.tasks.evaluation.lowest_value import lowest_value_markdown

            parts += [lowest_value_markdown(s["lowest_value"]), ""]
        stem = f"{i:02d}-{_slug(str(name))}"
        skills_png = plot_skills(s, out / f"{stem}-es-skills.png", kind)
        plots.append(str(skills_png))
        parts += [f"![ES-Skills per criterion]({skills_png.name})", ""]
        values_png = plot_values(s, out / f"{stem}-es-value.png", kind)
        if values_png is not None:
            plots.append(str(values_png))
            parts += [f"![ES-Value win ratios]({values_png.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(parts))
    return {"report": str(report), "plots": plots}


# --------------------------------------------------------------------------------------------
# MLflow: which runs, and their summaries
# --------------------------------------------------------------------------------------------

SUMMARY_ARTIFACT = "evaluate/summary.json"


def parse_tags(items: Sequence[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--tag {item!r}: expected KEY=VALUE, e.g. esvr.run_name=demo")
        tags[key.strip()] = value.strip()
    return tags


def find_runs(experiment: str, run_ids: Sequence[str] = (), tags: Mapping[str, str] | None = None) -> list[str]:
    """Run ids: the given ones, else the evaluate runs matching `tags`, else the newest evaluate run."""
    from esvr.tasks.common.mlflow_runs import runs_by_tag

    if run_ids:
        return list(run_ids)
    query = {"esvr.stage": "evaluate", **(tags or {})}
    runs = runs_by_tag(experiment, **query)
    runs = [r for r in runs if r.info.status == "FINISHED"] or runs
    if not runs:
        raise FileNotFoundError(f"no evaluate run in MLflow experiment {experiment!r} with tags {query}")
    if not tags:
        runs = runs[:1]
    return [r.info.run_id for r in runs][::-1]


def summary_from_run(run_id: str, dst: str | Path) -> dict[str, Any]:
    import mlflow

    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=SUMMARY_ARTIFACT, dst_path=str(Path(dst) / run_id)
        )
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types; the message matters
        raise FileNotFoundError(
            f"MLflow run {run_id} has no artifact {SUMMARY_ARTIFACT} ({exc}); is it an evaluate run?"
        ) from None
    return load_summary(path)
