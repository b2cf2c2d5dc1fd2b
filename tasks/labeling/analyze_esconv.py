"""Stage 2b, analyze_esconv: do positive values mark effective emotional support? (paper §3.2, App. A)

The procedure, as the paper states it and where it is silent, as decided here (docs/labeling.md):

1. Dialogues whose seeker rated the initial negative-emotion intensity 5 are split by the final
   intensity into *high effectiveness* (1-2) and *low effectiveness* (3-4). Dialogues with a
   missing or unparsable intensity are skipped and counted, never fatal.
2. The seeker's **last 4 turns** are labelled; a turn is the seeker's consecutive messages merged
   (ESConv splits turns into several messages).
3. A turn is *positive* when its valence is above ``label.emotion.positive_valence`` (0.5, the
   scale's midpoint): the one definition of positive that the label statistics and the datasets'
   success rule use too. Values are counted only in positive turns: a value counts once per
   positive turn whose probability reaches the detector's threshold.
4. Per dialogue: the number of positive values (summed over the 4 turns; the paper reports 7.9 vs
   6.5) and, per value, the number of positive turns expressing it (0..4).
5. Per value, a two-sided Mann-Whitney U test between the groups (our choice: §3.2 names no test); per turn position (-4..-1), the
   mean predicted probability of each value, where non-positive turns count 0 (Figure 2, right).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import polars as pl

from esvr.models.config import Section
from esvr.models.emotion import POSITIVE_VALENCE
from esvr.models.text import normalize_texts
from esvr.prompts import value_names
from esvr.tasks.common.esconv import Dialogue, LoadReport, load_esconv

if TYPE_CHECKING:
    from esvr.models.emotion import EmotionScorer
    from esvr.models.value_detector import ValueDetector

log = logging.getLogger(__name__)

HIGH, LOW = "high", "low"


class AnalyzeESConvConfig(Section):
    """The paper's §3.2 analysis; labelers come from the `label` section."""

    #: ESConv.json path, a folder holding it, or a hub dataset id; empty = the stage is skipped
    esconv: str | None = None
    initial_intensity: int = 5
    high_final: list[int] = [1, 2]
    low_final: list[int] = [3, 4]
    last_turns: int = 4
    alpha: float = 0.05


# --------------------------------------------------------------------------------------------
# groups
# --------------------------------------------------------------------------------------------


def split_groups(dialogues: Sequence[Dialogue], cfg: AnalyzeESConvConfig) -> tuple[dict[str, list[Dialogue]], Counter]:
    """{'high': [...], 'low': [...]} and the count of dialogues skipped, by reason."""
    groups: dict[str, list[Dialogue]] = {HIGH: [], LOW: []}
    skipped: Counter = Counter()
    for d in dialogues:
        if d.initial_intensity is None:
            skipped["missing_initial_intensity"] += 1
        elif d.initial_intensity != cfg.initial_intensity:
            skipped["other_initial_intensity"] += 1
        elif d.final_intensity is None:
            skipped["missing_final_intensity"] += 1
        elif not d.seeker_turns():
            skipped["no_seeker_turns"] += 1
        elif d.final_intensity in cfg.high_final:
            groups[HIGH].append(d)
        elif d.final_intensity in cfg.low_final:
            groups[LOW].append(d)
        else:
            skipped["final_intensity_outside_groups"] += 1
    return groups, skipped


# --------------------------------------------------------------------------------------------
# labels of the last seeker turns
# --------------------------------------------------------------------------------------------


@dataclass
class SeekerTurns:
    """The labelled last seeker turns of one dialogue, oldest first."""

    dialog_id: str
    group: str
    texts: list[str]
    probs: np.ndarray  # (k, 20) value probabilities
    sentiment: np.ndarray  # (k,) int
    valence: np.ndarray  # (k,) float

    def positive(self, positive_valence: float) -> np.ndarray:
        return self.valence > positive_valence

    def value_counts(self, threshold: float, positive_valence: float) -> np.ndarray:
        """(20,) number of positive turns in which each value is detected."""
        detected = (self.probs >= threshold) & self.positive(positive_valence)[:, None]
        return detected.sum(0).astype(int)

    def gated_probs(self, positive_valence: float) -> np.ndarray:
        """(k, 20) probabilities with non-positive turns set to 0."""
        return self.probs * self.positive(positive_valence)[:, None]


def label_last_turns(
    groups: dict[str, list[Dialogue]], detector: ValueDetector, scorer: EmotionScorer, last_turns: int
) -> list[SeekerTurns]:
    """Label every group's last seeker turns in one batch, their texts normalised as the label stage's."""
    items: list[tuple[str, str, list[str]]] = []
    for group, dialogues in groups.items():
        for d in dialogues:
            items.append((d.dialog_id, group, normalize_texts(d.seeker_turns()[-last_turns:])))
    texts = [t for _, _, turns in items for t in turns]
    probs = detector.predict_proba(texts) if texts else np.zeros((0, 20), dtype=np.float32)
    scores = scorer.score(texts) if texts else []
    out, i = [], 0
    for dialog_id, group, turns in items:
        k = len(turns)
        out.append(
            SeekerTurns(
                dialog_id,
                group,
                turns,
                probs[i : i + k],
                np.array([s.sentiment for s in scores[i : i + k]], dtype=int),
                np.array([s.valence for s in scores[i : i + k]], dtype=float),
            )
        )
        i += k
    return out


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def mann_whitney(sample_a: npt.ArrayLike, sample_b: npt.ArrayLike) -> tuple[float, float]:
    """Two-sided Mann-Whitney U of `a` against `b`: (U of a, p). Identical samples give p = 1."""
    from scipy.stats import mannwhitneyu

    a, b = np.asarray(sample_a, dtype=float), np.asarray(sample_b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan")
    if np.unique(np.concatenate([a, b])).size == 1:
        return float(len(a) * len(b) / 2), 1.0
    res = mannwhitneyu(a, b, alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def group_statistics(
    records: Sequence[SeekerTurns], threshold: float, cfg: AnalyzeESConvConfig, positive_valence: float = POSITIVE_VALENCE
) -> dict[str, Any]:
    """Everything §3.2 reports: group sizes, mean positive values, per-value tests, per-turn means.
    A turn is positive when its valence is above `positive_valence` (``label.emotion.positive_valence``)."""
    names = value_names()
    by_group = {g: [r for r in records if r.group == g] for g in (HIGH, LOW)}
    counts = {
        g: np.array([r.value_counts(threshold, positive_valence) for r in rs]).reshape(-1, len(names))
        for g, rs in by_group.items()
    }
    totals = {g: c.sum(1) for g, c in counts.items()}
    u, p = mann_whitney(totals[HIGH], totals[LOW])
    rows = []
    for j, name in enumerate(names):
        uj, pj = mann_whitney(counts[HIGH][:, j], counts[LOW][:, j])
        rows.append(
            {
                "value": name,
                "mean_high": float(counts[HIGH][:, j].mean()) if len(counts[HIGH]) else float("nan"),
                "mean_low": float(counts[LOW][:, j].mean()) if len(counts[LOW]) else float("nan"),
                "U": uj,
                "p": pj,
                "significant": bool(pj < cfg.alpha),
            }
        )
    # per turn position, aligned on the end: position -1 is the last seeker turn
    per_turn: dict[str, list[list[float]]] = {}
    for g, rs in by_group.items():
        means = []
        for pos in range(cfg.last_turns, 0, -1):
            at = [r.gated_probs(positive_valence)[-pos] for r in rs if len(r.texts) >= pos]
            means.append(np.mean(at, axis=0).tolist() if at else [float("nan")] * len(names))
        per_turn[g] = means
    return {
        "n": {g: len(rs) for g, rs in by_group.items()},
        "threshold": threshold,
        "positive_valence": positive_valence,
        "positive_turn_share": {
            g: float(np.mean(np.concatenate([r.positive(positive_valence) for r in rs]))) if rs else float("nan")
            for g, rs in by_group.items()
        },
        "mean_positive_values": {g: float(t.mean()) if len(t) else float("nan") for g, t in totals.items()},
        "total_test": {"U": u, "p": p, "significant": bool(p < cfg.alpha)},
        "values": rows,
        "turn_positions": list(range(-cfg.last_turns, 0)),
        "per_turn_mean_prob": per_turn,
    }


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------


def values_table_markdown(stats: dict[str, Any]) -> str:
    n, mpv, tt = stats["n"], stats["mean_positive_values"], stats["total_test"]
    lines = [
        f"High effectiveness: {n[HIGH]} dialogues, low: {n[LOW]}. Mean number of positive values in the "
        f"last seeker turns: high {mpv[HIGH]:.2f}, low {mpv[LOW]:.2f} (Mann-Whitney U {tt['U']:.1f}, p {tt['p']:.3g}).",
        "",
        "| value | mean high | mean low | U | p | |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in stats["values"]:
        star = "*" if r["significant"] else ""
        lines.append(f"| {r['value']} | {r['mean_high']:.2f} | {r['mean_low']:.2f} | {r['U']:.1f} | {r['p']:.3g} | {star} |")
    return "\n".join(lines) + "\n"


def plot_figure(stats: dict[str, Any], path: str | Path, top_when_none: int = 3) -> Path:
    """A figure like the paper's Figure 2: per-value comparison and per-turn probabilities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["value"] for r in stats["values"]]
    high = np.array([r["mean_high"] for r in stats["values"]])
    low = np.array([r["mean_low"] for r in stats["values"]])
    sig = [r["significant"] for r in stats["values"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 7), gridspec_kw={"width_ratios": [1.3, 1]})
    y = np.arange(len(names))
    ax1.barh(y - 0.2, high, 0.4, label=f"high effectiveness (n={stats['n'][HIGH]})", color="#2b7bba")
    ax1.barh(y + 0.2, low, 0.4, label=f"low effectiveness (n={stats['n'][LOW]})", color="#f29e4c")
    ax1.set_yticks(y, [f"{n} *" if s else n for n, s in zip(names, sig)])
    ax1.invert_yaxis()
    ax1.set_xlabel("positive expressions per dialogue (last seeker turns)")
    mpv = stats["mean_positive_values"]
    ax1.set_title(f"Positive values: high {mpv[HIGH]:.1f} vs low {mpv[LOW]:.1f} (p={stats['total_test']['p']:.3g})")
    ax1.legend(loc="lower right")

    shown = [j for j, s in enumerate(sig) if s]
    note = ""
    if not shown:
        shown = list(np.argsort([r["p"] if np.isfinite(r["p"]) else 2 for r in stats["values"]])[:top_when_none])
        note = "\n(none significant: smallest p shown)"
    positions = stats["turn_positions"]
    colors = plt.cm.tab10.colors  # type: ignore[attr-defined]  # tab10 is a ListedColormap
    for k, j in enumerate(shown):
        c = colors[k % len(colors)]
        ax2.plot(positions, [row[j] for row in stats["per_turn_mean_prob"][HIGH]], "-o", color=c, label=f"{names[j]} (high)")
        ax2.plot(
            positions, [row[j] for row in stats["per_turn_mean_prob"][LOW]], "--s", color=c, alpha=0.7, label=f"{names[j]} (low)"
        )
    ax2.set_xticks(positions, [f"turn {p}" for p in positions])
    ax2.set_ylabel("mean predicted probability (non-positive turns = 0)")
    ax2.set_title("Per-turn probabilities" + note)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def turns_frame(records: Sequence[SeekerTurns]) -> pl.DataFrame:
    rows = []
    for r in records:
        k = len(r.texts)
        for i in range(k):
            rows.append(
                {
                    "dialog_id": r.dialog_id,
                    "group": r.group,
                    "position": i - k,
                    "text": r.texts[i],
                    "valence": float(r.valence[i]),
                    "sentiment": int(r.sentiment[i]),
                    "values": [float(x) for x in r.probs[i]],
                }
            )
    schema = {
        "dialog_id": pl.String,
        "group": pl.String,
        "position": pl.Int8,
        "text": pl.String,
        "valence": pl.Float32,
        "sentiment": pl.Int8,
        "values": pl.List(pl.Float32),
    }
    return pl.DataFrame(rows, schema=schema)


#: where the survey intensities the analysis needs are published (copies that convert ESConv,
#: such as some hub datasets and JSON Lines distributions, may drop survey_score)
ESCONV_WITH_SURVEY = "ESConv.json of github.com/thu-coai/Emotional-Support-Conversation"


def no_intensities_message(source: str | Path, report: LoadReport, skipped: Counter | dict) -> str:
    """Why no dialogue fell in either group, naming the file that has the intensities."""
    missing = {k: v for k, v in report.missing_survey.items() if k.endswith("emotion_intensity")}
    return (
        f"ESConv {source}: no dialogue falls in either effectiveness group "
        f"({report.dialogues} dialogues; missing survey intensities: {missing}; skipped: {dict(skipped)}); "
        f"the analysis needs survey_score.seeker's initial/final_emotion_intensity, which {ESCONV_WITH_SURVEY} has"
    )


def analyze_esconv(
    esconv: str | Path,
    out_dir: str | Path,
    cfg: AnalyzeESConvConfig,
    detector: ValueDetector,
    scorer: EmotionScorer,
    positive_valence: float = POSITIVE_VALENCE,
) -> dict[str, Path]:
    """The stage: load, split, label, test, write summary.json, values.csv/.md, turns.parquet, figure.png.
    `positive_valence`: the label section's ``emotion.positive_valence``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = LoadReport()
    dialogues = load_esconv(esconv, report)
    groups, skipped = split_groups(dialogues, cfg)
    if not groups[HIGH] and not groups[LOW]:
        raise ValueError(no_intensities_message(esconv, report, skipped))
    if not groups[HIGH] or not groups[LOW]:
        log.warning(
            "ESConv %s: a group is empty (high %d, low %d); statistics will be NaN", esconv, len(groups[HIGH]), len(groups[LOW])
        )
    records = label_last_turns(groups, detector, scorer, cfg.last_turns)
    stats = group_statistics(records, detector.threshold, cfg, positive_valence)
    stats["dialogues"] = len(dialogues)
    stats["skipped"] = dict(skipped)
    stats["missing_survey_fields"] = dict(report.missing_survey)
    stats["source"] = str(esconv)
    paths = {
        "summary": out_dir / "summary.json",
        "table_csv": out_dir / "values.csv",
        "table_md": out_dir / "values.md",
        "turns": out_dir / "turns.parquet",
        "figure": out_dir / "figure.png",
    }
    paths["summary"].write_text(json.dumps(stats, indent=2, default=float) + "\n")
    pl.DataFrame(stats["values"]).write_csv(paths["table_csv"])
    paths["table_md"].write_text(values_table_markdown(stats))
    turns_frame(records).write_parquet(paths["turns"])
    plot_figure(stats, paths["figure"])
    return paths
