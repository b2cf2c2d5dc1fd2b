"""LLM judges of the evaluation: ES-Skills, ES-Intensity, ES-Value (paper §6.2, App. F, Tables 30-31).

Every judge runs on any `ChatModel` (``models.judge``), which may differ from the seeker simulator
(the paper used GPT-4o-mini for both, a circularity risk that the config lets a user avoid). All
calls go through the response cache and are seeded, so a re-run re-judges for free and identically.

Two ways to read a judge, recorded side by side:

- ``score_choices``: the probability of each allowed answer ("1".."5", the five intensity
  sentences, "Dialogue A"/"Dialogue B"/"Tie") in one forward pass. It gives the *expected* score
  (sum of k * p(k)) and the most probable answer. Robust on small models, cheap, no parsing.
- ``reasoning`` (config ``judge_reasoning``): the judge first writes its reasoning and then the
  ratings in a fixed template (the paper's prompts); the *parsed* score comes from that text. When
  it does not parse, the most probable answer stands in and the record says so.

ES-Value compares two dialogues of the same persona (the model under test and the reference
supporter) ``n`` times with their order alternated (test model shown first in even judgments), from
the seeker's and the supporter's perspective; the win ratio counts ties as half (`metrics.win_ratio`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from esvr.models.chat import ChatModel, Message
from esvr.prompts import load_prompt, load_taxonomy, values
from esvr.tasks.evaluation.metrics import (
    SCORE_CHOICES,
    argmax_choice,
    expected_score,
    expected_win,
    pair_outcome,
    parse_score,
    shown_side,
    win_ratio,
)
from esvr.tasks.simulation.supporter import format_history

JUDGE_PROMPTS = (
    "es_skills.yaml",
    "evaluate/es_skills_system.txt",
    "evaluate/es_skills_criterion.txt",
    "evaluate/es_skills_reasoning.txt",
    "evaluate/es_intensity_system.txt",
    "evaluate/es_intensity_user.txt",
    "evaluate/es_intensity_levels.yaml",
    "evaluate/es_value_system.txt",
    "evaluate/es_value_user.txt",
    "evaluate/es_value_direct.txt",
    "evaluate/es_value_single.txt",
    "evaluate/es_value_perspectives.yaml",
    "values.yaml",
)

VALUE_CHOICES = ("Dialogue A", "Dialogue B", "Tie")


@cache
def criteria() -> tuple[dict[str, str], ...]:
    """The 10 ES-Skills criteria (prompts/es_skills.yaml), in the paper's column order."""
    return tuple(dict(c) for c in load_taxonomy("es_skills"))


def criterion_names() -> list[str]:
    return [c["name"] for c in criteria()]


def criterion_labels() -> dict[str, str]:
    return {c["name"]: c["label"] for c in criteria()}


@cache
def perspectives() -> tuple[dict[str, str], ...]:
    return tuple(dict(p) for p in load_taxonomy("evaluate/es_value_perspectives"))


@cache
def intensity_levels() -> tuple[tuple[int, str], ...]:
    return tuple((int(x["level"]), str(x["sentence"])) for x in load_taxonomy("evaluate/es_intensity_levels"))


def values_block() -> str:
    return "\n".join(f"- {v.describe()}" for v in values())


def _messages(system: str, user: str, **fields: str) -> list[Message]:
    """A judge's request: the system prompt file, then the user prompt file filled with `fields`."""
    return [
        {"role": "system", "content": load_prompt(system).strip()},
        {"role": "user", "content": load_prompt(user).strip().format(**fields)},
    ]


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeSettings:
    #: also generate reasoning + ratings and parse them (the paper's way); off: scores only
    reasoning: bool = False
    max_tokens: int = 600
    #: ES-Value judgments are sampled at this temperature in reasoning mode, each with its own
    #: seed (temperature 0 would repeat one judgment n times)
    value_temperature: float = 1.0
    value_judgments: int = 10
    #: judge each dialogue's value reinforcement alone on 1-5 as well (App. H's check vs experts)
    value_single: bool = False
    concurrency: int = 8
    seed: int = 0


# --------------------------------------------------------------------------------------------
# ES-Skills
# --------------------------------------------------------------------------------------------


def _display(name: str) -> str:
    return name.replace("_", "-").capitalize()


def skills_criterion_messages(utterances: Sequence[Mapping[str, Any]], criterion: Mapping[str, str]) -> list[Message]:
    return _messages(
        "evaluate/es_skills_system.txt",
        "evaluate/es_skills_criterion.txt",
        dialogue=format_history(utterances),
        name=_display(criterion["name"]),
        question=criterion["question"],
    )


def skills_reasoning_messages(utterances: Sequence[Mapping[str, Any]]) -> list[Message]:
    crits = "\n".join(f"- {_display(c['name'])}: {c['question']}" for c in criteria())
    template = "\n".join(f"{_display(c['name'])}: (1-5)" for c in criteria())
    return _messages(
        "evaluate/es_skills_system.txt",
        "evaluate/es_skills_reasoning.txt",
        dialogue=format_history(utterances),
        criteria=crits,
        template=template,
    )


def parse_skill_ratings(text: str) -> dict[str, int | None]:
    """Per criterion, the rating written after its name ('Role-adherence: 4'), or None."""
    out: dict[str, int | None] = {}
    # the ratings come after the reasoning; look there first so a number in the reasoning that
    # happens to follow a criterion's name is not taken for its rating
    idx = text.lower().rfind("ratings")
    body = text[idx:] if idx >= 0 else text
    for c in criteria():
        words = re.split(r"[_\-\s]+", c["name"])
        pattern = r"[\-\s]*".join(re.escape(w) for w in words)
        m = re.search(rf"{pattern}\s*[*_]*\s*[:=\-–]\s*[*_]*\s*([^\n]*)", body, re.IGNORECASE)
        out[c["name"]] = parse_score(m.group(1)) if m else None
    return out


async def ajudge_skills(
    judge: ChatModel, utterances: Sequence[Mapping[str, Any]], settings: JudgeSettings, seed: int
) -> dict[str, dict[str, Any]]:
    """Per criterion: ``score`` (parsed, or the most probable answer), ``expected``, ``dist``,
    ``method`` ('parsed' | 'argmax')."""
    dists = await asyncio.gather(
        *(judge.ascore_choices(skills_criterion_messages(utterances, c), list(SCORE_CHOICES)) for c in criteria())
    )
    parsed: dict[str, int | None] = {}
    reply = None
    if settings.reasoning:
        out = await judge.achat(
            skills_reasoning_messages(utterances), n=1, temperature=0.0, max_tokens=settings.max_tokens, seed=seed
        )
        reply = out[0] if out else ""
        parsed = parse_skill_ratings(reply)
    result: dict[str, dict[str, Any]] = {}
    for c, dist in zip(criteria(), dists):
        p = parsed.get(c["name"])
        result[c["name"]] = {
            "score": int(p) if p is not None else int(argmax_choice(dist, SCORE_CHOICES)),
            "expected": expected_score(dist),
            "dist": {k: round(float(v), 6) for k, v in dist.items()},
            "method": "parsed" if p is not None else "argmax",
        }
    if reply is not None:
        result["_reply"] = {"text": reply}
    return result


# --------------------------------------------------------------------------------------------
# ES-Intensity
# --------------------------------------------------------------------------------------------


def intensity_messages(utterances: Sequence[Mapping[str, Any]]) -> list[Message]:
    options = "\n".join(f"- {s}" for _, s in intensity_levels())
    return _messages(
        "evaluate/es_intensity_system.txt", "evaluate/es_intensity_user.txt", dialogue=format_history(utterances), options=options
    )


def parse_intensity(text: str) -> int | None:
    """The level whose sentence (or distinctive word) the reply names; None when none or several."""
    low = text.lower()
    for level, sentence in intensity_levels():
        if sentence.lower().rstrip(".") in low:
            return level
    words = {1: r"very low", 2: r"(?<!very )low", 3: r"moderate", 4: r"high", 5: r"extreme"}
    hits = [lvl for lvl, w in words.items() if re.search(rf"\b{w}\b", low)]
    return hits[0] if len(hits) == 1 else None


async def ajudge_intensity(
    judge: ChatModel, utterances: Sequence[Mapping[str, Any]], settings: JudgeSettings, seed: int
) -> dict[str, Any]:
    """``level`` (1-5: parsed reply, or the most probable sentence), ``expected``, ``dist``."""
    sentences = [s for _, s in intensity_levels()]
    messages = intensity_messages(utterances)
    dist = await judge.ascore_choices(messages, sentences)
    by_level = {str(level): float(dist.get(s, 0.0)) for level, s in intensity_levels()}
    record: dict[str, Any] = {"expected": expected_score(by_level), "dist": {k: round(v, 6) for k, v in by_level.items()}}
    level = None
    if settings.reasoning:
        out = await judge.achat(messages, n=1, temperature=0.0, max_tokens=40, seed=seed)
        record["reply"] = out[0] if out else ""
        level = parse_intensity(record["reply"])
    record["level"] = level if level is not None else int(argmax_choice(by_level, SCORE_CHOICES))
    record["method"] = "parsed" if level is not None else "argmax"
    return record


# --------------------------------------------------------------------------------------------
# ES-Value
# --------------------------------------------------------------------------------------------


def value_messages(
    dialogue_a: Sequence[Mapping[str, Any]], dialogue_b: Sequence[Mapping[str, Any]], perspective: Mapping[str, str] | None = None
) -> list[Message]:
    """Dialogue A against B: both perspectives' verdicts after reasoning (the paper's prompt), or
    with a `perspective` its verdict alone (scored over 'Dialogue A' / 'Dialogue B' / 'Tie')."""
    return _messages(
        "evaluate/es_value_system.txt",
        "evaluate/es_value_user.txt" if perspective is None else "evaluate/es_value_direct.txt",
        values=values_block(),
        dialogue_a=format_history(dialogue_a),
        dialogue_b=format_history(dialogue_b),
        criterion=f"{perspective['label']}: {perspective['question']}" if perspective else "",
    )


def value_single_messages(dialogue: Sequence[Mapping[str, Any]], perspective: Mapping[str, str]) -> list[Message]:
    return _messages(
        "evaluate/es_skills_system.txt",
        "evaluate/es_value_single.txt",
        values=values_block(),
        dialogue=format_history(dialogue),
        criterion=perspective["single"],
    )


_VERDICT = re.compile(r"(dialogue\s*a|dialogue\s*b|\btie\b)", re.IGNORECASE)


def parse_value_verdicts(text: str) -> dict[str, str | None]:
    """Per perspective ('seeker', 'supporter'), 'A', 'B' or 'Tie' from the Results lines, or None."""
    out: dict[str, str | None] = {}
    idx = text.lower().rfind("results")
    body = text[idx:] if idx >= 0 else text
    for p in perspectives():
        key = p["label"].split("'")[0]  # "Patient" / "Therapist"
        m = re.search(rf"{key}['’]?s?\s+perspective\s*[*_]*\s*:?\s*[*_]*\s*([^\n]*)", body, re.IGNORECASE)
        verdict = None
        if m:
            v = _VERDICT.search(m.group(1))
            if v:
                word = re.sub(r"\s+", " ", v.group(1).lower())
                verdict = "Tie" if word == "tie" else word[-1].upper()
        out[p["name"]] = verdict
    return out


async def ajudge_value_pair(
    judge: ChatModel,
    test: Sequence[Mapping[str, Any]],
    reference: Sequence[Mapping[str, Any]],
    settings: JudgeSettings,
    seed: int,
) -> dict[str, Any]:
    """`settings.value_judgments` comparisons of the test dialogue against the reference's, order
    alternated. Per perspective: outcomes (win/loss/tie for the test model), ``win_ratio`` (ties
    half) and ``expected`` (mean of P(win) + P(tie)/2). The judgments themselves are kept."""
    n = settings.value_judgments
    if n < 1:
        raise ValueError(f"value_judgments must be at least 1, got {n}")
    # score_choices is deterministic: one distribution per order and perspective serves every
    # judgment shown in that order
    sides = {"A": (test, reference), "B": (reference, test)}
    dist_keys = [(side, p["name"]) for side in ("A", "B") for p in perspectives()]
    persp = {p["name"]: p for p in perspectives()}
    dists = await asyncio.gather(
        *(judge.ascore_choices(value_messages(*sides[side], persp[name]), list(VALUE_CHOICES)) for side, name in dist_keys)
    )
    dist_by = dict(zip(dist_keys, dists))
    replies: list[str | None] = [None] * n
    if settings.reasoning:
        outs = await asyncio.gather(
            *(
                judge.achat(
                    value_messages(*sides[shown_side(i)]),
                    n=1,
                    temperature=settings.value_temperature,
                    max_tokens=settings.max_tokens,
                    seed=seed + i,
                )
                for i in range(n)
            )
        )
        replies = [o[0] if o else "" for o in outs]
    judgments = []
    per: dict[str, dict[str, list]] = {p["name"]: {"outcomes": [], "expected": []} for p in perspectives()}
    for i in range(n):
        side = shown_side(i)
        reply = replies[i]
        parsed = parse_value_verdicts(reply) if reply is not None else {}
        record: dict[str, Any] = {"index": i, "test_side": side, "reply": replies[i]}
        for name in per:
            dist = dist_by[(side, name)]
            verdict = parsed.get(name)
            method = "parsed"
            if verdict is None:
                verdict = argmax_choice(dist, VALUE_CHOICES).replace("Dialogue ", "")
                method = "argmax"
            outcome = pair_outcome(verdict, side)
            per[name]["outcomes"].append(outcome)
            per[name]["expected"].append(expected_win(dist, side))
            record[name] = {
                "verdict": verdict,
                "outcome": outcome,
                "method": method,
                "dist": {k: round(float(v), 6) for k, v in dist.items()},
            }
        judgments.append(record)
    result: dict[str, Any] = {"judgments": judgments}
    for name, d in per.items():
        result[name] = {
            "win_ratio": win_ratio(d["outcomes"]),
            "expected": sum(d["expected"]) / len(d["expected"]),
            "wins": d["outcomes"].count("win"),
            "ties": d["outcomes"].count("tie"),
            "losses": d["outcomes"].count("loss"),
        }
    return result


async def ajudge_value_single(judge: ChatModel, utterances: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each perspective rated alone on 1-5 (App. H compares these with experts' ratings)."""
    dists = await asyncio.gather(
        *(judge.ascore_choices(value_single_messages(utterances, p), list(SCORE_CHOICES)) for p in perspectives())
    )
    return {
        f"value_{p['name']}": {
            "score": int(argmax_choice(d, SCORE_CHOICES)),
            "expected": expected_score(d),
            "dist": d,
            "method": "argmax",
        }
        for p, d in zip(perspectives(), dists)
    }
