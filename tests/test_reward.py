"""The look-ahead reward (eq. 3 / eq. 5) and pair selection, on hand-computed cases."""

from __future__ import annotations

import pytest

from esvr.tasks.supporter.preferences import (
    EMOTION_STATES,
    candidates_by_turn,
    emotion_score,
    lookahead_reward,
    pair_counts,
    pairs_for_setting,
    parse_emotion_state,
    select_pairs,
    value_counts,
)
from esvr.tasks.supporter.train_supporter import RewardSetting, TrainSupporterConfig

SCORES = [2, 0, 1, 3, 1]  # N_{t+1..t+5}


@pytest.mark.parametrize(
    ("h", "gamma", "expected"),
    [
        (1, 1.0, 2.0),
        (3, 1.0, 2 + 0 + 1),
        (5, 1.0, 2 + 0 + 1 + 3 + 1),
        (None, 1.0, 7.0),  # All
        (3, 0.9, 2 + 0.9 * 0 + 0.81 * 1),  # 2.81
        (5, 0.9, 2 + 0 + 0.81 + 0.729 * 3 + 0.6561 * 1),  # 5.6531
        (None, 0.9, 5.6531),
        (10, 1.0, 7.0),  # a rollout that ended early contributes what it has
    ],
)
def test_lookahead_reward_hand_computed(h, gamma, expected):
    assert lookahead_reward(SCORES, h, gamma) == pytest.approx(expected)


def test_lookahead_reward_edge_cases():
    assert lookahead_reward([], 3, 1.0) == 0.0
    assert lookahead_reward([], None, 0.9) == 0.0
    # emotion scores are fractional and can be negative
    assert lookahead_reward([-0.5, 0.5, 1.0], 2, 0.9) == pytest.approx(-0.5 + 0.45)
    with pytest.raises(ValueError, match="h must be"):
        lookahead_reward([1], 0, 1.0)


def test_select_pairs_exceeds_threshold_strictly_and_picks_the_higher():
    cands = [
        {"id": "a", "initial": 3.0, "alternative": 0.0},  # diff 3 -> initial
        {"id": "b", "initial": 1.0, "alternative": 3.0},  # diff 2 -> alternative when t_diff < 2
        {"id": "c", "initial": 2.0, "alternative": 1.0},  # diff 1
        {"id": "d", "initial": 1.0, "alternative": 1.0},  # tie: never a pair
    ]
    assert [(p.info["id"], p.chosen) for p in select_pairs(cands, 0)] == [
        ("a", "initial"),
        ("b", "alternative"),
        ("c", "initial"),
    ]
    assert [(p.info["id"], p.chosen) for p in select_pairs(cands, 1)] == [("a", "initial"), ("b", "alternative")]
    assert [(p.info["id"], p.chosen) for p in select_pairs(cands, 2)] == [("a", "initial")]
    assert select_pairs(cands, 3) == []
    p = select_pairs(cands, 2)[0]
    assert p.rejected == "alternative" and p.margin == 3.0 and p.rewards == {"initial": 3.0, "alternative": 0.0}
    counts = pair_counts(select_pairs(cands, 0), candidates=4)
    assert counts == {"candidates": 4, "pairs": 3, "chosen_initial": 2, "chosen_alternative": 1}


def test_select_pairs_names_a_missing_reward():
    with pytest.raises(ValueError, match="alternative"):
        select_pairs([{"initial": 1.0}], 0)


def _rollout(kind, targets, seeker_texts, turn=1, split="train"):
    cont = []
    for s in seeker_texts:
        cont += [{"role": "seeker", "text": s}, {"role": "supporter", "text": "..."}]
    return {
        "dialogue_id": "d1",
        "turn": turn,
        "kind": kind,
        "split": split,
        "at": 2,
        "target_values": targets,
        "continuation": cont,
    }


def test_value_counts_intersect_detected_with_target_values():
    detected = {"I will try again": ["Achievement", "Self-direction: action"], "thanks": ["Benevolence: caring"], "meh": []}
    rollouts = [
        _rollout("initial", ["Achievement", "Benevolence: caring"], ["I will try again", "thanks", "meh"]),
        _rollout("alternative", ["Achievement", "Benevolence: caring"], ["meh"]),
        _rollout("initial", None, ["thanks"], turn=2),  # no target values: nothing to count
    ]
    calls = []

    def detect(texts):
        calls.append(list(texts))
        return [detected[t] for t in texts]

    assert value_counts(rollouts, detect) == [[1.0, 1.0, 0.0], [0.0], [0.0]]
    assert len(calls) == 1  # one batch


def test_settings_derive_from_one_rollout_per_candidate():
    scored = [
        {**_rollout("initial", [], []), "scores": [0, 0, 3, 3]},
        {**_rollout("alternative", [], []), "scores": [1, 1, 0, 0]},
        {**_rollout("initial", [], [], turn=2, split="dev"), "scores": [1]},  # lacks its alternative
    ]
    turns = candidates_by_turn(scored)
    assert len(turns) == 1
    # h=1: 0 vs 1; h=3: 3 vs 2; All: 6 vs 2; gamma 0.9 h=All: 0.81*3+0.729*3=4.617 vs 1.9
    assert [(p.chosen, p.margin) for p in pairs_for_setting(turns, 1, 1.0, 0)] == [("alternative", 1.0)]
    assert [(p.chosen, p.margin) for p in pairs_for_setting(turns, 3, 1.0, 0)] == [("initial", 1.0)]
    assert pairs_for_setting(turns, 3, 1.0, 1) == []
    assert [p.chosen for p in pairs_for_setting(turns, None, 1.0, 2)] == ["initial"]
    assert pairs_for_setting(turns, None, 0.9, 1.5)[0].margin == pytest.approx(4.617 - 1.9)


def test_config_horizon_is_the_longest_needed_and_all_parses():
    cfg = TrainSupporterConfig(
        sweep=[{"h": 3, "gamma": 1, "t_diff": 2}, {"h": 5, "gamma": 1, "t_diff": 1}], selected={"h": 3, "gamma": 1, "t_diff": 2}
    )
    assert cfg.rollout_horizon() == 5 and len(cfg.settings()) == 2
    cfg = TrainSupporterConfig(sweep=[{"h": "all", "gamma": 0.9, "t_diff": 1.5}], selected={"h": 3})
    assert cfg.rollout_horizon() is None
    assert cfg.sweep[0].name == "h=all,gamma=0.9,t_diff=1.5"
    with pytest.raises(ValueError):
        RewardSetting(h=0)


class FakeJudge:
    """Just enough ChatModel for the emotion score: a fixed distribution and fixed samples."""

    def __init__(self, dist, samples):
        self.dist, self.samples = dist, samples

    def score_choices(self, messages, choices):
        return {c: self.dist.get(c, 0.0) for c in choices}

    def chat(self, messages, n=1, **kw):
        return self.samples[:n]


def test_emotion_score_expectation_and_sample_mean():
    sentences = {k: s for k, s, _ in EMOTION_STATES}
    judge = FakeJudge(
        {sentences["better"]: 0.5, sentences["solved"]: 0.25, sentences["worse"]: 0.25},
        ["No, but the patient feels better.", "Yes, the issue has been solved.", "gibberish", "feels the same"],
    )
    assert emotion_score(judge, [], method="score", n_samples=10, max_tokens=8, seed=0) == pytest.approx(
        0.5 * 0.5 + 0.25 * 1 - 0.25
    )
    # samples: better 0.5, solved 1.0, (unparsed), same -0.5 -> mean over parsed = 1/3
    assert emotion_score(judge, [], method="sample", n_samples=4, max_tokens=8, seed=0) == pytest.approx(1.0 / 3)
    assert parse_emotion_state("No, the Patient feels WORSE.") == -1.0
    assert parse_emotion_state("no idea") is None
