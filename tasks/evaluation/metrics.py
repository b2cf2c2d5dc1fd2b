"""The arithmetic of the evaluation (paper §6.2, App. F, H; Tables 2, 3, 11, 13, 29).

Plain functions on plain numbers, shared by the evaluate stage, the report, the judge-vs-human
check and the simulator-fidelity check:

- judge answers: `parse_score` (a 1-5 rating in free text), `expected_score` (sum of k * p(k) over a
  score_choices distribution);
- ES-Value: `pair_outcome` (one judgment mapped back to the model under test, whichever side it was
  shown on), `win_ratio` (wins + ties / 2 over the judgments of one pair, 0..1);
- significance: `mann_whitney` (two-sided Mann-Whitney U of a model's per-dialogue scores against the
  reference's), `win_ratio_test` (two-sided Wilcoxon signed-rank of per-persona win ratios against
  0.5) and `significance_mark` ('*' p < 0.05, '†' p < 0.1: the paper's marks);
- `words_per_turn` (the paper's length confound, §6.4.2);
- `classification_metrics` (Table 11: accuracy, weighted F1, MSE, Spearman), `spearman`;
- `cosine`, `euclidean` (value distributions, Table 29).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

SCORE_CHOICES = ("1", "2", "3", "4", "5")

Outcome = Literal["win", "loss", "tie"]

# --------------------------------------------------------------------------------------------
# Judge answers
# --------------------------------------------------------------------------------------------

_SCORE = re.compile(r"(?<![\d.])([1-5])(?:\s*(?:/|out of)\s*5)?(?![\d.])")


def parse_score(text: str) -> int | None:
    """The 1-5 rating a judge wrote, or None when there is none.

    Takes the first standalone digit 1-5 ("4", "Score: 4", "4/5", "**4** - because ..."); a digit
    inside a longer number ("10", "4.5", "2024") is not a rating.
    """
    if not isinstance(text, str):
        return None
    m = _SCORE.search(text)
    return int(m.group(1)) if m else None


def expected_score(dist: Mapping[str, float], choices: Sequence[str] = SCORE_CHOICES) -> float:
    """Sum of k * p(k) over a distribution on the answers "1".."5" (normalized here).

    A judge's rating as a continuous number: more stable than the argmax on small models, and
    what separates models whose argmax ratings all sit at 4-5 (the paper's ceiling problem).
    """
    total = sum(float(dist.get(c, 0.0)) for c in choices)
    if total <= 0:
        raise ValueError(f"distribution {dict(dist)} puts no mass on the scores {list(choices)}")
    return sum(int(c) * float(dist.get(c, 0.0)) for c in choices) / total


def argmax_choice(dist: Mapping[str, float], choices: Sequence[str]) -> str:
    """The most probable answer; ties go to the earlier choice (deterministic)."""
    return max(choices, key=lambda c: (float(dist.get(c, 0.0)), -list(choices).index(c)))


# --------------------------------------------------------------------------------------------
# ES-Value: pairwise judgments
# --------------------------------------------------------------------------------------------


def pair_outcome(verdict: str, test_side: Literal["A", "B"]) -> Outcome:
    """One judgment ("A", "B" or "Tie", as the judge named the dialogues) from the point of view of
    the model under test, which was shown as Dialogue `test_side`."""
    v = verdict.strip().lower()
    if v in ("tie", "t"):
        return "tie"
    if v.startswith("dialogue "):
        v = v[len("dialogue ") :]
    if v not in ("a", "b"):
        raise ValueError(f"verdict must be 'A', 'B' or 'Tie', got {verdict!r}")
    if test_side not in ("A", "B"):
        raise ValueError(f"test_side must be 'A' or 'B', got {test_side!r}")
    return "win" if v.upper() == test_side else "loss"


def shown_side(judgment_index: int) -> Literal["A", "B"]:
    """Where the model under test is shown in judgment i: alternating, A first, so that n
    judgments put it first ceil(n/2) times (position bias cancels for even n)."""
    return "A" if judgment_index % 2 == 0 else "B"


def win_ratio(outcomes: Sequence[Outcome]) -> float:
    """(wins + ties / 2) / judgments, in 0..1; 0.5 means as good as the reference."""
    if not outcomes:
        raise ValueError("no judgments to compute a win ratio from")
    wins = sum(o == "win" for o in outcomes)
    ties = sum(o == "tie" for o in outcomes)
    bad = [o for o in outcomes if o not in ("win", "loss", "tie")]
    if bad:
        raise ValueError(f"unknown outcomes {bad}")
    return (wins + 0.5 * ties) / len(outcomes)


def expected_win(dist: Mapping[str, float], test_side: Literal["A", "B"]) -> float:
    """P(the model under test wins) + P(tie) / 2 from a distribution over "Dialogue A",
    "Dialogue B", "Tie": the soft version of one judgment."""
    total = sum(dist.values())
    if total <= 0:
        return 0.5
    pa = float(dist.get("Dialogue A", dist.get("A", 0.0))) / total
    pb = float(dist.get("Dialogue B", dist.get("B", 0.0))) / total
    pt = float(dist.get("Tie", 0.0)) / total
    return (pa if test_side == "A" else pb) + 0.5 * pt


# --------------------------------------------------------------------------------------------
# Significance
# --------------------------------------------------------------------------------------------


def mann_whitney(sample: Sequence[float], reference: Sequence[float]) -> float | None:
    """Two-sided p-value of the Mann-Whitney U test (scipy), or None when either sample is empty
    or both are constant and equal (no test possible: nothing differs)."""
    from scipy.stats import mannwhitneyu

    x = [float(v) for v in sample if v is not None and not math.isnan(float(v))]
    y = [float(v) for v in reference if v is not None and not math.isnan(float(v))]
    if not x or not y:
        return None
    if len(set(x) | set(y)) == 1:
        return 1.0
    return float(mannwhitneyu(x, y, alternative="two-sided").pvalue)


def win_ratio_test(ratios: Sequence[float]) -> float | None:
    """Two-sided p-value of "the win ratio differs from 0.5": Wilcoxon signed-rank (scipy) of
    r_i - 0.5 over the per-persona win ratios, or None when there are none.

    Each r_i already compares the model with the reference on one persona, so the question is
    one-sample; a two-sample test of r_i against 1 - r_i would compare a sample with a function
    of itself. Ratios of exactly 0.5 carry no direction and are dropped (the classical Wilcoxon
    zero handling); when all are 0.5 nothing differs and p = 1.
    """
    from scipy.stats import wilcoxon

    d = [float(r) - 0.5 for r in ratios if r is not None and not math.isnan(float(r))]
    if not d:
        return None
    if all(x == 0 for x in d):
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def significance_mark(p: float | None) -> str:
    """'*' for p < 0.05, '†' for p < 0.1 (the paper's Tables 3, 20-23), '' otherwise."""
    if p is None:
        return ""
    if p < 0.05:
        return "*"
    if p < 0.1:
        return "†"
    return ""


# --------------------------------------------------------------------------------------------
# Lengths, correlations, distances
# --------------------------------------------------------------------------------------------


def word_count(text: str) -> int:
    return len(re.findall(r"\S+", text or ""))


def words_per_turn(turns: Sequence[str]) -> float:
    """Mean whitespace-separated words per turn (0 when there are no turns)."""
    return float(np.mean([word_count(t) for t in turns])) if turns else 0.0


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """Spearman's rho and its p-value; (None, None) with fewer than 3 pairs or a constant side."""
    from scipy.stats import spearmanr

    pairs = [(float(a), float(b)) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pairs) < 3:
        return None, None
    xs, ys = zip(*pairs)
    if len(set(xs)) == 1 or len(set(ys)) == 1:
        return None, None
    res = spearmanr(xs, ys)
    return float(res.statistic), float(res.pvalue)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[float]) -> dict[str, float | None]:
    """Table 11's metrics for ordinal 1-5 predictions: accuracy, weighted F1 (on the rounded
    prediction), MSE and Spearman's rho (on the prediction as given, e.g. an expected score)."""
    from sklearn.metrics import f1_score

    if len(y_true) != len(y_pred) or not y_true:
        raise ValueError(f"need equally many true and predicted labels, got {len(y_true)} and {len(y_pred)}")
    t = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    p_int = np.clip(np.rint(p), 1, 5).astype(int)
    rho, _ = spearman(t.tolist(), p.tolist())
    return {
        "accuracy": float(np.mean(p_int == t.astype(int))),
        "f1_weighted": float(f1_score(t.astype(int), p_int, average="weighted", zero_division=0)),
        "mse": float(np.mean((p - t) ** 2)),
        "spearman": rho,
        "n": float(len(t)),
    }


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    va, vb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    na, nb = np.linalg.norm(va), np.linalg.norm(vb)
    if na == 0 or nb == 0:
        return 0.0
    return float(va @ vb / (na * nb))


def euclidean(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)))


def mean_or_none(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None
