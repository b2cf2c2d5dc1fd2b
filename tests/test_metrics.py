"""The evaluation's arithmetic: score parsing, expected scores, win ratios, significance marks."""

from __future__ import annotations

import math

import pytest
from scipy.stats import mannwhitneyu, wilcoxon

from esvr.tasks.evaluation.judges import parse_intensity, parse_skill_ratings, parse_value_verdicts
from esvr.tasks.evaluation.metrics import (
    classification_metrics,
    cosine,
    euclidean,
    expected_score,
    expected_win,
    mann_whitney,
    pair_outcome,
    parse_score,
    shown_side,
    significance_mark,
    win_ratio,
    win_ratio_test,
    words_per_turn,
)


@pytest.mark.parametrize(
    "text, score",
    [
        ("4", 4),
        ("Score: 5", 5),
        ("**3** because the therapist ...", 3),
        ("2/5", 2),
        ("I'd say 4 out of 5", 4),
        ("10", None),
        ("4.5", None),
        ("in 2024 it was fine", None),
        ("no rating", None),
        ("", None),
    ],
)
def test_parse_score(text, score):
    assert parse_score(text) == score


def test_expected_score_is_the_mean_of_the_distribution():
    assert expected_score({"1": 0, "2": 0, "3": 0, "4": 0.5, "5": 0.5}) == pytest.approx(4.5)
    # unnormalized input is normalized; missing answers count as zero
    assert expected_score({"1": 2.0, "5": 2.0}) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="no mass"):
        expected_score({"Yes": 1.0})


def test_win_ratio_counts_ties_half():
    assert win_ratio(["win"] * 6 + ["loss"] * 2 + ["tie"] * 2) == pytest.approx(0.7)
    assert win_ratio(["tie"] * 10) == 0.5
    assert win_ratio(["loss"]) == 0.0
    with pytest.raises(ValueError):
        win_ratio([])


def test_order_alternation_cancels_a_judge_that_always_picks_the_first_dialogue():
    sides = [shown_side(i) for i in range(10)]
    assert sides == ["A", "B"] * 5
    outcomes = [pair_outcome("Dialogue A", s) for s in sides]
    assert win_ratio(outcomes) == 0.5
    # a judge that always prefers the model under test, wherever it is shown
    assert win_ratio([pair_outcome(s, s) for s in sides]) == 1.0
    assert pair_outcome("Tie", "B") == "tie"
    assert pair_outcome("b", "B") == "win" and pair_outcome("A", "B") == "loss"
    with pytest.raises(ValueError):
        pair_outcome("C", "A")


def test_expected_win_from_a_distribution():
    dist = {"Dialogue A": 0.6, "Dialogue B": 0.2, "Tie": 0.2}
    assert expected_win(dist, "A") == pytest.approx(0.7)
    assert expected_win(dist, "B") == pytest.approx(0.3)


SAMPLES = [
    ([4, 5, 5, 4, 5, 5, 4, 5], [3, 4, 3, 4, 3, 3, 4, 3]),
    ([4.1, 4.3, 3.9, 4.6, 4.0], [4.0, 4.4, 3.8, 4.5, 4.2]),
    ([1, 2, 2, 3, 1, 2, 2, 1, 3, 2], [2, 3, 3, 2, 3, 2, 3, 3, 2, 2]),
]


@pytest.mark.parametrize("x, y", SAMPLES)
def test_mann_whitney_matches_scipy_and_marks(x, y):
    p = mann_whitney(x, y)
    assert p == pytest.approx(mannwhitneyu(x, y, alternative="two-sided").pvalue)
    assert significance_mark(p) == ("*" if p < 0.05 else "†" if p < 0.1 else "")


def test_marks_at_the_thresholds():
    assert significance_mark(0.049) == "*"
    assert significance_mark(0.05) == "†"
    assert significance_mark(0.0999) == "†"
    assert significance_mark(0.1) == ""
    assert significance_mark(None) == ""
    assert mann_whitney([], [1, 2]) is None
    assert mann_whitney([5, 5], [5, 5, 5]) == 1.0


def test_win_ratio_test_asks_whether_the_ratio_differs_from_one_half():
    # five personas all slightly won: a one-sample question, so p is the signed-rank test's
    # exact 2 / 2^5 (a two-sample test against the mirror 1 - r would claim 0.007)
    ratios = [0.6] * 5
    assert win_ratio_test(ratios) == pytest.approx(wilcoxon([0.1] * 5).pvalue) == pytest.approx(0.0625)
    assert significance_mark(win_ratio_test(ratios)) == "†"
    assert mannwhitneyu(ratios, [0.4] * 5).pvalue < 0.05
    mixed = [0.9, 0.8, 0.5, 0.7, 0.2, 1.0, 0.6, 0.9]
    assert win_ratio_test(mixed) == pytest.approx(wilcoxon([r - 0.5 for r in mixed if r != 0.5]).pvalue)
    assert win_ratio_test([0.5, 0.5, 0.5]) == 1.0
    assert win_ratio_test([]) is None


def test_words_per_turn_and_distances():
    assert words_per_turn(["one two three", "four"]) == 2.0
    assert words_per_turn([]) == 0.0
    assert cosine([1, 0], [0, 1]) == 0.0 and cosine([1, 1], [2, 2]) == pytest.approx(1.0)
    assert euclidean([0, 0], [3, 4]) == 5.0


def test_classification_metrics_of_table_11():
    m = classification_metrics([1, 2, 2, 3, 5], [1, 2, 3, 3, 4])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["mse"] == pytest.approx(2 / 5)
    assert 0 < m["f1_weighted"] <= 1 and m["spearman"] > 0.8
    # the expected level is rounded for accuracy/F1 but used as is for MSE
    m2 = classification_metrics([2, 2], [2.4, 1.6])
    assert m2["accuracy"] == 1.0 and m2["mse"] == pytest.approx(0.16)


def test_weighted_f1_by_hand():
    # per level F1 (support): 1 -> 1 (1), 2 -> 2/3 (2), 3 -> 2/3 (1), 5 -> 0 (1); 4 is never true
    m = classification_metrics([1, 2, 2, 3, 5], [1, 2, 3, 3, 4])
    assert m["f1_weighted"] == pytest.approx((1 + 2 * 2 / 3 + 2 / 3 + 0) / 5)


def test_parse_skill_ratings_from_the_reasoning_template():
    text = (
        "Reasoning: The therapist asks 2 questions and gives 1 suggestion.\n"
        "Ratings:\nIdentification: 4\nComforting: 5\nSuggestions: 3\nExperience: 1\nInformativeness: 3\n"
        "Consistency: 5\nRole-adherence: **5**\nExpression: 3/5\nHumanness: 4\nOverall: 4"
    )
    r = parse_skill_ratings(text)
    assert r == {
        "identification": 4,
        "comforting": 5,
        "suggestions": 3,
        "experience": 1,
        "informativeness": 3,
        "consistency": 5,
        "role_adherence": 5,
        "expression": 3,
        "humanness": 4,
        "overall": 4,
    }
    assert parse_skill_ratings("Ratings:\nOverall: great")["overall"] is None


def test_parse_value_verdicts_and_intensity():
    text = "1. Reasoning: A explores achievement...\n2. Results:\n1) Patient's perspective: Dialogue B\n2) Therapist's perspective: Tie"
    assert parse_value_verdicts(text) == {"seeker": "B", "supporter": "Tie"}
    assert parse_value_verdicts("no idea") == {"seeker": None, "supporter": None}
    assert parse_intensity("The patient shows a low amount of negative emotion.") == 2
    assert parse_intensity("very low amount of negative emotions can be inferred") == 1
    assert parse_intensity("extreme") == 5
    assert parse_intensity("nothing") is None
    assert not math.isnan(expected_score({"2": 1.0}))


def test_set_prf_on_sets_of_any_size():
    """Table 5's set scores: gold sets of 1-3 observed values let recall exceed precision; one
    label in all is still a set problem (not sklearn's binary case)."""
    from esvr.tasks.components.tvd import set_prf

    m = set_prf([["a", "b", "c"], ["a", "d", "e"]], [["a"], ["d", "e"]])
    assert m["precision"] == pytest.approx(3 / 6) and m["recall"] == 1.0 and m["f1"] == pytest.approx(2 / 3)
    assert m["macro_precision"] == pytest.approx((1 / 3 + 2 / 3) / 2) and m["macro_f1"] == pytest.approx((0.5 + 0.8) / 2)
    one = set_prf([["a"], []], [["a"], ["a"]])
    assert (one["precision"], one["recall"], one["macro_recall"], one["empty_predictions"]) == (1.0, 0.5, 0.5, 1.0)
    assert set_prf([], [])["f1"] == 0.0 and set_prf([[]], [[]])["macro_f1"] == 0.0
