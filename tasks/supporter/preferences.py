"""DPO preference data for the supporter: look-ahead rollouts, rewards, pairs (paper §5.3, App. D.3, G.2).

Every supporter turn of a simulated dialogue has two candidates: the initial response and the
alternative one (the reversed Step-3 decision). Each candidate is put in the dialogue after the
turn's history and continued by the simulation engine (`esvr.tasks.simulation.simulate.continue_dialogue`:
the seeker simulator answers, the supporter goes on) for h seeker utterances, or to the end of the
dialogue for h = All. A per-utterance score is computed for each seeker utterance that follows,
and the candidate's reward is the discounted sum (paper eq. 3 and eq. 5):

    R(u_t) = sum_{k=1..h} gamma^(k-1) * score_{t+k}

- ``value`` reward: score = N_{t+k}(v_{t+1}), how many of the turn's target values the value
  detector finds (probability at or above its threshold) in the seeker's utterance at t+k.
- ``emotion`` reward (App. G): score = S_{t+k}, a judge's view of the seeker's state after the
  dialogue up to t+k, mapped worse/same/better/solved to -1/-0.5/0.5/1 and averaged over
  ``n_samples`` judge samples (Table 32's structure). With ``emotion_judge: score`` the average is
  the expectation under the judge's distribution over the four answers (`score_choices`): what
  the mean of many samples converges to, computed in one forward pass and with no sampling noise.

A pair enters the data set when the two rewards differ by more than T_diff (strictly: the paper's
"exceeds"); the higher one is chosen. Rollouts are computed once, for the longest horizon any
setting asks for; every (h, gamma, T_diff) setting is derived from the same rollouts, so a sweep
costs one set of simulations.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esvr.models.chat import ChatModel
from esvr.prompts import load_prompt
from esvr.tasks.common.jsonl import append_jsonl, exclusive, read_jsonl_repairing
from esvr.tasks.simulation.simulate import Agents, acontinue_dialogue, run_coroutine
from esvr.tasks.simulation.supporter import SupporterReply, format_history

log = logging.getLogger(__name__)

CANDIDATES = ("initial", "alternative")
EMOTION_PROMPTS = ("judge_emotion/system.txt", "judge_emotion/user.txt")

#: the judge's four answers (Table 32's structure, our wording) and their scores (App. G.2)
EMOTION_STATES: tuple[tuple[str, str, float], ...] = (
    ("worse", "No, the patient feels worse.", -1.0),
    ("same", "No, the patient feels the same.", -0.5),
    ("better", "No, but the patient feels better.", 0.5),
    ("solved", "Yes, the patient's issue has been solved.", 1.0),
)


# --------------------------------------------------------------------------------------------
# Reward and pair selection: pure functions
# --------------------------------------------------------------------------------------------


def lookahead_reward(scores: Sequence[float], h: int | None, gamma: float) -> float:
    """R = sum_{k=1..h} gamma^(k-1) * scores[k-1]; `h` None means All (every score there is).

    `scores` holds one score per seeker utterance after the candidate, in order. A rollout that
    ended before h utterances contributes what it has (the dialogue is over: nothing follows).
    """
    if h is not None and h < 1:
        raise ValueError(f"look-ahead horizon h must be >= 1 or None (All), got {h}")
    used = list(scores) if h is None else list(scores)[:h]
    return float(sum((gamma**k) * float(s) for k, s in enumerate(used)))


@dataclass
class Pair:
    """A preference pair at one supporter turn: which candidate won, and by how much."""

    chosen: str
    rejected: str
    margin: float
    rewards: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)


def select_pairs(candidates: Iterable[Mapping[str, Any]], t_diff: float) -> list[Pair]:
    """Pairs whose reward difference exceeds `t_diff` (strictly); the higher reward is chosen.

    Each candidate mapping holds the rewards of both responses under ``'initial'`` and
    ``'alternative'``; any other keys are carried into ``Pair.info`` (dialogue id, turn, split).
    """
    pairs = []
    for c in candidates:
        missing = [k for k in CANDIDATES if k not in c]
        if missing:
            raise ValueError(f"candidate {dict(c)!r} lacks reward(s) for {missing}")
        r_init, r_alt = float(c["initial"]), float(c["alternative"])
        diff = r_init - r_alt
        if abs(diff) <= t_diff:
            continue
        chosen, rejected = ("initial", "alternative") if diff > 0 else ("alternative", "initial")
        info = {k: v for k, v in c.items() if k not in CANDIDATES}
        pairs.append(Pair(chosen, rejected, abs(diff), {"initial": r_init, "alternative": r_alt}, info))
    return pairs


def pair_counts(pairs: Sequence[Pair], candidates: int) -> dict[str, int]:
    """Table 19's figures for one split: pairs, and how often each candidate was chosen."""
    return {
        "candidates": candidates,
        "pairs": len(pairs),
        "chosen_initial": sum(p.chosen == "initial" for p in pairs),
        "chosen_alternative": sum(p.chosen == "alternative" for p in pairs),
    }


# --------------------------------------------------------------------------------------------
# Candidates of a dialogue and their rollouts
# --------------------------------------------------------------------------------------------


def candidate_replies(turn: Mapping[str, Any]) -> dict[str, SupporterReply]:
    """The two responses of a recorded turn, or {} when the turn has no alternative."""
    if turn.get("failed") or not turn.get("alternative"):
        return {}
    from esvr.tasks.supporter.sft_export import initial_reply

    return {"initial": initial_reply(turn), "alternative": SupporterReply.from_record(turn["alternative"])}


def _history(dialogue: Mapping[str, Any], at: int) -> list[dict[str, Any]]:
    return [dict(u) for u in dialogue["utterances"][:at]]


@dataclass
class RolloutSummary:
    path: str
    horizon: int | None
    turns: int = 0
    skipped_turns_no_alternative: int = 0
    rollouts_written: int = 0
    rollouts_existing: int = 0
    errors: list[str] = field(default_factory=list)
    end_reasons: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def metrics(self, prefix: str = "rollouts") -> dict[str, float]:
        m: dict[str, float] = {
            f"{prefix}.turns_with_candidates": self.turns,
            f"{prefix}.turns_without_alternative": self.skipped_turns_no_alternative,
            f"{prefix}.written": self.rollouts_written,
            f"{prefix}.existing": self.rollouts_existing,
            f"{prefix}.errors": len(self.errors),
        }
        m.update({f"{prefix}.end.{k}": v for k, v in self.end_reasons.items()})
        m.update({f"{prefix}.calls.{k}": v for k, v in self.calls.items()})
        return m

    def add(self, part: RolloutSummary) -> None:
        """Count a shard's summary in this one (`rollouts_written` is what merging the shards appended)."""
        self.turns += part.turns
        self.skipped_turns_no_alternative += part.skipped_turns_no_alternative
        self.rollouts_existing += part.rollouts_existing
        self.errors += part.errors
        for k, v in part.end_reasons.items():
            self.end_reasons[k] = self.end_reasons.get(k, 0) + v
        for k, v in part.calls.items():
            self.calls[k] = self.calls.get(k, 0) + v


def rollout_key(dialogue_id: str, turn: int, kind: str) -> str:
    return f"{dialogue_id}#{turn}#{kind}"


async def arollout_candidates(
    dialogues: Sequence[Mapping[str, Any]],
    agents: Agents,
    out_path: str | os.PathLike[str],
    *,
    horizon: int | None,
    concurrency: int = 16,
    max_turns_per_dialogue: int | None = None,
    seed: int = 0,
) -> RolloutSummary:
    """Continue both candidates of every turn that has them; one JSON line per candidate.

    The file is append-only and resumable: candidates already in it are skipped (answered LLM
    calls of an interrupted run come from the response cache). Both candidates of a turn run under
    the same seeds, so the seeker's sampling noise is shared and the comparison is paired. A
    candidate whose rollout raised is reported in ``errors`` and retried by the next run.
    """
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = RolloutSummary(path=str(path), horizon=horizon)
    with exclusive(path):
        existing = read_jsonl_repairing(path)
        for rec in existing:
            if rec.get("horizon", "missing") != horizon:
                raise ValueError(
                    f"{path}: holds rollouts with horizon {rec.get('horizon')!r}, this run needs {horizon!r}; "
                    "delete the file or write elsewhere"
                )
        done = {rec["key"] for rec in existing}
        summary.rollouts_existing = len(done)
        jobs = []
        for d in dialogues:
            turns = [t for t in d["turns"] if not t.get("failed")]
            if max_turns_per_dialogue is not None:
                turns = turns[:max_turns_per_dialogue]
            for t in turns:
                replies = candidate_replies(t)
                if not replies:
                    summary.skipped_turns_no_alternative += 1
                    continue
                summary.turns += 1
                for kind, reply in replies.items():
                    key = rollout_key(str(d["id"]), int(t["turn"]), kind)
                    if key not in done:
                        jobs.append((d, t, kind, reply, key))
        sem = asyncio.Semaphore(max(1, concurrency))
        lock = asyncio.Lock()

        async def one(d: Mapping[str, Any], t: Mapping[str, Any], kind: str, reply: SupporterReply, key: str) -> None:
            at = int(t["at"])
            prefix = _history(d, at) + [{"role": "supporter", "text": reply.response}]
            async with sem:
                try:
                    roll = await acontinue_dialogue(d["persona"], prefix, agents, horizon=horizon, seed=seed)
                except Exception as exc:  # noqa: BLE001 - one rollout's backend error must not stop the rest
                    log.error("rollout %s: %s: %s", key, type(exc).__name__, exc)
                    summary.errors.append(f"{key}: {type(exc).__name__}: {exc}")
                    return
            rec = {
                "key": key,
                "dialogue_id": str(d["id"]),
                "split": d.get("split"),
                "turn": int(t["turn"]),
                "kind": kind,
                "at": at,
                "horizon": horizon,
                "target_values": t.get("target_values"),
                "response": reply.response,
                "continuation": roll.utterances[at + 1 :],
                "end_reason": roll.end_reason,
                "calls": roll.calls,
            }
            async with lock:
                await asyncio.to_thread(append_jsonl, path, rec)
                summary.rollouts_written += 1
                summary.end_reasons[roll.end_reason] = summary.end_reasons.get(roll.end_reason, 0) + 1
                for k, v in roll.calls.items():
                    summary.calls[k] = summary.calls.get(k, 0) + v

        await asyncio.gather(*(one(*job) for job in jobs))
    return summary


def rollout_candidates(
    dialogues: Sequence[Mapping[str, Any]], agents: Agents, out_path: str | os.PathLike[str], **kwargs: Any
) -> RolloutSummary:
    """Sync form of `arollout_candidates`."""
    return run_coroutine(arollout_candidates(dialogues, agents, out_path, **kwargs))


def seeker_texts(rollout: Mapping[str, Any]) -> list[str]:
    """The seeker's utterances after the candidate: t+1, t+2, ..."""
    return [u["text"] for u in rollout["continuation"] if u["role"] == "seeker"]


# --------------------------------------------------------------------------------------------
# Per-utterance scores: N_{t+k} (values) or S_{t+k} (emotion)
# --------------------------------------------------------------------------------------------


def value_counts(rollouts: Sequence[Mapping[str, Any]], detect: Callable[[list[str]], list[list[str]]]) -> list[list[float]]:
    """Per rollout, N_{t+k}: how many of its target values `detect` finds in each seeker utterance.

    `detect` is a value detector's thresholded decision (``ValueDetector.detect``); all texts go
    in one batch. A turn without target values scores 0 everywhere (nothing was targeted).
    """
    texts = [seeker_texts(r) for r in rollouts]
    flat = [s for ts in texts for s in ts]
    found = detect(flat) if flat else []
    out, i = [], 0
    for r, ts in zip(rollouts, texts):
        targets = set(r.get("target_values") or [])
        out.append([float(len(targets & set(found[i + k]))) for k in range(len(ts))])
        i += len(ts)
    return out


def emotion_judge_messages(persona: Mapping[str, Any], utterances: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Table 32's structure: the four allowed answers, the emotion and problem, the dialogue."""
    user = load_prompt("judge_emotion/user.txt").format(
        choices="\n".join(sentence for _, sentence, _ in EMOTION_STATES),
        emotion=str(persona.get("emotion", "distress")).lower(),
        problem=persona.get("problem", "a personal problem"),
        dialogue=format_history([{"role": u["role"], "text": u["text"]} for u in utterances]),
    )
    return [
        {"role": "system", "content": load_prompt("judge_emotion/system.txt").strip()},
        {"role": "user", "content": user.strip()},
    ]


def parse_emotion_state(text: str) -> float | None:
    """The score of a sampled judge answer, or None when it names none of the four states."""
    low = text.lower()
    for key, pattern in (("solved", r"\bsolved\b"), ("worse", r"\bworse\b"), ("better", r"\bbetter\b"), ("same", r"\bsame\b")):
        if re.search(pattern, low):
            return dict((k, s) for k, _, s in EMOTION_STATES)[key]
    return None


def emotion_score(
    judge: ChatModel, messages: list[dict[str, str]], *, method: str, n_samples: int, max_tokens: int, seed: int
) -> float:
    """S: the mean state score over `n_samples` judge answers ('sample'), or its expectation
    under the judge's distribution over the four answers ('score')."""
    if method == "score":
        dist = judge.score_choices(messages, [sentence for _, sentence, _ in EMOTION_STATES])
        return float(sum(dist[sentence] * score for _, sentence, score in EMOTION_STATES))
    answers = judge.chat(messages, n=n_samples, temperature=1.0, max_tokens=max_tokens, seed=seed)
    scores = [s for s in (parse_emotion_state(a) for a in answers) if s is not None]
    if not scores:
        log.warning("emotion judge: none of %d answers named a state; scoring the turn by the distribution", len(answers))
        return emotion_score(judge, messages, method="score", n_samples=n_samples, max_tokens=max_tokens, seed=seed)
    return float(sum(scores) / len(scores))


def emotion_scores(
    rollouts: Sequence[Mapping[str, Any]],
    dialogues: Mapping[str, Mapping[str, Any]],
    judge: ChatModel,
    *,
    method: str = "score",
    n_samples: int = 10,
    max_tokens: int = 24,
    seed: int = 0,
) -> list[list[float]]:
    """Per rollout, S_{t+k} for each seeker utterance after the candidate, judged on the dialogue
    up to that utterance (history, candidate, continuation)."""
    out = []
    for r in rollouts:
        d = dialogues[r["dialogue_id"]]
        seen = _history(d, r["at"]) + [{"role": "supporter", "text": r["response"]}]
        scores = []
        for u in r["continuation"]:
            seen.append(u)
            if u["role"] == "seeker":
                scores.append(
                    emotion_score(
                        judge,
                        emotion_judge_messages(d["persona"], seen),
                        method=method,
                        n_samples=n_samples,
                        max_tokens=max_tokens,
                        seed=seed,
                    )
                )
        out.append(scores)
    return out


# --------------------------------------------------------------------------------------------
# From scored rollouts to pairs, per setting
# --------------------------------------------------------------------------------------------


def candidates_by_turn(scored: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group scored rollouts into turns that have both candidates (a failed rollout drops its turn)."""
    turns: dict[tuple[str, int], dict[str, Any]] = {}
    for r in scored:
        entry = turns.setdefault(
            (r["dialogue_id"], r["turn"]), {"dialogue_id": r["dialogue_id"], "turn": r["turn"], "split": r["split"]}
        )
        entry[r["kind"]] = r
    return [t for t in turns.values() if all(k in t for k in CANDIDATES)]


def pairs_for_setting(turns: Sequence[Mapping[str, Any]], h: int | None, gamma: float, t_diff: float) -> list[Pair]:
    rewards = [
        {
            "dialogue_id": t["dialogue_id"],
            "turn": t["turn"],
            "split": t["split"],
            **{k: lookahead_reward(t[k]["scores"], h, gamma) for k in CANDIDATES},
        }
        for t in turns
    ]
    return select_pairs(rewards, t_diff)
