"""Seeker personas (paper App. E.1): situations -> value alignment -> emotion -> demographics -> split.

1. Situations: per (problem category, value) pair, the persona writer lists 10-30 first-person,
   one-sentence situations; the list is parsed (numbered, bulleted, JSON or plain lines), invalid
   lines dropped, and near-duplicates removed.
2. Value alignment: each situation is rated 1-5 against its value (Table 26: reasoning + rating per
   situation, or the log-probabilities of "1".."5"); situations rated 3 or below are dropped.
3. Emotion: the majority of 5 sampled votes over the 10 negative emotions (or the most probable
   emotion by scoring). The subcategory (Table 24) is chosen by scoring too.
4. Demographics: age range, gender and occupation.
5. Split into train/dev/test with the paper's proportions (1,796/120/120 of 2,036), stratified by
   problem category.

Every step records how its answer was obtained (``*_method``); answers that do not parse are asked
again, then fall back to scoring the allowed answers (never silently accepted).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
from pydantic import Field, field_validator

from esvr.models.chat import ChatModel, ChatRequest, Message
from esvr.models.config import InputFileError, ModelConfig, Section
from esvr.prompts import load_prompt, load_taxonomy, values
from esvr.tasks.common.jsonl import write_jsonl
from esvr.tasks.common.roles import chat_model

log = logging.getLogger(__name__)

PERSONA_PROMPTS = tuple(
    f"personas/{n}.txt"
    for n in (
        "situations_system",
        "situations_user",
        "alignment_system",
        "alignment_user",
        "alignment_single_user",
        "emotion_system",
        "emotion_user",
        "subcategory_user",
        "demographics_system",
        "demographics_user",
        "occupation_user",
    )
) + ("problems.yaml", "emotions.yaml", "values.yaml")

SPLITS = ("train", "dev", "test")
AGE_RANGES = ["10s", "20s", "30s", "40s", "50s", "60s"]
GENDERS = ["Female", "Male"]

PERSONA_FIELDS = (
    "id", "split", "problem", "subcategory", "value", "situation", "alignment", "alignment_method",
    "emotion", "emotion_votes", "emotion_method", "age", "gender", "occupation", "demographics_method", "writer",
)  # fmt: skip


class PersonasConfig(Section):
    """Persona generation (stage 5). Situations and their value alignment come from
    ``models.persona_writer`` (paper: GPT-4o); the other steps may use their own model."""

    #: the emotion votes and the subcategory (step 3; paper: GPT-4o-mini); None: models.persona_writer
    emotion_model: ModelConfig | None = None
    #: age, gender and occupation (step 4; the paper does not say which model); None: models.persona_writer
    demographics_model: ModelConfig | None = None

    #: how many (problem category, value) pairs to write situations for; None = all 6 x 20 = 120.
    #: Pairs are taken round-robin over categories, so a few pairs still cover several categories.
    pairs: int | None = Field(default=None, ge=1)
    #: with `pairs` and `count` set: while fewer than `count` situations pass the alignment filter,
    #: write situations for the next `pairs` pairs of the same round-robin, up to this many pairs in
    #: all (None: all 120). A weak writer then still yields `count` personas, at a bounded cost.
    max_pairs: int | None = Field(default=None, ge=1)
    #: situations asked per pair (paper: 10-30, 2,940 written in all)
    min_situations: int = 10
    max_situations: int = 30
    situations_max_tokens: int = 2048
    #: the writer samples situations; seeded, so a rerun reproduces them (and hits the cache)
    situations_temperature: float = 1.0
    #: 'rate': Table 26's reasoning + rating per situation; 'score': most probable of "1".."5"
    alignment_method: Literal["rate", "score"] = "rate"
    alignment_max_tokens: int = 4096
    #: kept when the rating is at least this (paper: "scoring 3 or below are excluded")
    min_alignment: int = 4
    #: 'vote': majority of `emotion_votes` sampled answers (paper: 5); 'score': most probable emotion
    emotion_method: Literal["vote", "score"] = "vote"
    emotion_votes: int = 5
    #: 'chat': the writer fills "Age / Gender / Occupation"; 'score': age and gender by scoring,
    #: occupation by a short generation (for models that cannot keep the format)
    demographics_method: Literal["chat", "score"] = "chat"
    #: answers that do not parse are asked again this many times before the scoring fallback
    reask: int = 2
    #: keep at most this many personas after filtering (None: all), chosen round-robin by category
    count: int | None = None
    #: split sizes, used as proportions when the persona count differs (paper: 1,796/120/120)
    split: dict[str, int] = {"train": 1796, "dev": 120, "test": 120}
    #: parallel requests to the writer (the backend's own concurrency limit also applies)
    concurrency: int = 16

    @field_validator("split")
    @classmethod
    def _known_splits(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = set(value) - set(SPLITS)
        if unknown or any(v < 0 for v in value.values()) or sum(value.values()) <= 0:
            raise ValueError(f"split: keys must be among {SPLITS} with non-negative sizes, got {value}")
        return value


# --------------------------------------------------------------------------------------------
# Taxonomies
# --------------------------------------------------------------------------------------------


def problems() -> list[dict[str, Any]]:
    return load_taxonomy("problems")


def emotion_names() -> list[str]:
    return [e["name"] for e in load_taxonomy("emotions")]


def select_pairs(n: int | None, seed: int = 0) -> list[tuple[dict[str, Any], Any]]:
    """(category, Value) pairs: all 120, or the first `n` of a seeded round-robin over categories."""
    rng = random.Random(seed)
    cats = problems()
    per_cat = []
    for c in cats:
        vs = list(values())
        rng.shuffle(vs)
        per_cat.append([(c, v) for v in vs])
    order = [pair for group in zip(*per_cat) for pair in group]
    return order if n is None else order[:n]


# --------------------------------------------------------------------------------------------
# Step 1: situations
# --------------------------------------------------------------------------------------------

_BULLET = re.compile(r"^\s*(?:[-*•]+|\(?\d{1,3}[.):]|\(?[a-z][.)]|situation\s*\d*\s*:)\s*", re.IGNORECASE)
_FIRST_PERSON = re.compile(r"\b(i|i'm|i've|i'd|i'll|my|me)\b", re.IGNORECASE)


def _valid_situation(text: str) -> bool:
    """A first-person sentence of 5-40 words (two short sentences pass; a paragraph does not)."""
    words = text.split()
    if not 5 <= len(words) <= 40 or not _FIRST_PERSON.search(text):
        return False
    if len(re.findall(r"[.!?](?:\s|$)", text)) > 2:
        return False
    letters = sum(ch.isalpha() for ch in text)
    return letters >= 0.6 * len(text.replace(" ", ""))


_HEADING = re.compile(r"^[A-Z][\w ,&/'-]{0,30}:\s+(?=\S)")
_SENTENCE = re.compile(r"[^.!?]+(?:[.!?]+(?=\s|$)|$)")


def parse_situations(text: str) -> list[str]:
    """Situations from a reply: a JSON list, or one per line with any numbering or bullets.

    Each situation is one sentence (Table 25): a line holding several sentences gives each of
    them, and a short label before a colon ("Family: I ...") is dropped. Sentences that are not
    first-person with 5-40 words (headers, commentary, garbage) are dropped, so what comes back
    is only what the prompt asked for.
    """
    candidates: list[str] = []
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            data = json.loads(stripped[: stripped.rfind("]") + 1])
            candidates = [str(x) for x in data if isinstance(x, (str, int, float))]
        except (json.JSONDecodeError, ValueError):
            candidates = []
    if not candidates:
        candidates = stripped.replace("\r", "").split("\n")
    out = []
    for line in candidates:
        line = _BULLET.sub("", line).strip().strip('",').strip().strip("*").strip()
        line = _HEADING.sub("", line)
        for sentence in _SENTENCE.findall(line):
            sentence = sentence.strip().strip('"“”').strip()
            if _valid_situation(sentence):
                out.append(sentence)
    return out


def prompt_example() -> str:
    """The example situation the prompt itself gives: a copy of it is not a new situation."""
    m = re.search(r"\(for example: (.+?)\)", load_prompt("personas/situations_user.txt"))
    return m.group(1) if m else ""


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


class Deduper:
    """Remembers situations; `add` refuses exact (case/punctuation-insensitive) and near duplicates
    (word Jaccard above `max_jaccard`)."""

    def __init__(self, max_jaccard: float = 0.8):
        self.max_jaccard = max_jaccard
        self.seen: set[str] = set()
        self.kept_tokens: list[set[str]] = []

    def add(self, s: str) -> bool:
        key = re.sub(r"[^a-z0-9]", "", s.lower())
        if key in self.seen:
            return False
        toks = _tokens(s)
        if any(len(toks & t) / max(1, len(toks | t)) > self.max_jaccard for t in self.kept_tokens):
            return False
        self.seen.add(key)
        self.kept_tokens.append(toks)
        return True


def dedup_situations(items: Sequence[str], max_jaccard: float = 0.8) -> list[str]:
    d = Deduper(max_jaccard)
    return [s for s in items if d.add(s)]


def _value_fields(v: Any) -> dict[str, str]:
    return {"value": v.name, "definition": v.definition, "contains": ", ".join(v.contains)}


def situation_messages(category: Mapping[str, Any], value: Any, cfg: PersonasConfig) -> list[Message]:
    user = load_prompt("personas/situations_user.txt").format(
        category=category["name"],
        subcategories="\n".join(f"- {s}" for s in category["subcategories"]),
        min_situations=cfg.min_situations,
        max_situations=cfg.max_situations,
        **_value_fields(value),
    )
    return [
        {"role": "system", "content": load_prompt("personas/situations_system.txt").strip()},
        {"role": "user", "content": user},
    ]


@dataclass
class StepStats:
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n


K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def ask_until_parsed(
    model: ChatModel,
    keys: Sequence[K],
    request: Callable[[K, int], ChatRequest],
    parse: Callable[[K, str], T | None],
    tries: int,
    stats: StepStats,
    step: str,
) -> tuple[dict[K, T], list[K]]:
    """Ask for every key in one batch (``request(key, attempt)``), then again for the keys whose reply
    did not parse (None), up to `tries` batches: the parsed results and the keys left without one.
    The requests count as ``<step>.calls``."""
    found: dict[K, T] = {}
    pending = list(keys)
    for attempt in range(tries):
        if not pending:
            break
        reqs = [request(k, attempt) for k in pending]
        stats.add(f"{step}.calls", len(reqs))
        still = []
        for k, out in zip(pending, model.chat_batch(reqs)):
            parsed = parse(k, out[0] if out else "")
            if parsed is None:
                still.append(k)
            else:
                found[k] = parsed
        pending = still
    return found, pending


def generate_situations(
    model: ChatModel,
    cfg: PersonasConfig,
    seed: int = 0,
    stats: StepStats | None = None,
    pairs: Sequence[tuple[dict[str, Any], Any]] | None = None,
    dedup: Deduper | None = None,
) -> list[dict[str, Any]]:
    """Step 1 over `pairs` (default: the configured ones): situations with their category and value,
    de-duplicated against each other and against what `dedup` has already seen."""
    stats = stats or StepStats()
    pairs = select_pairs(cfg.pairs, seed) if pairs is None else pairs
    found, pending = ask_until_parsed(
        model,
        range(len(pairs)),
        lambda i, attempt: ChatRequest.build(
            situation_messages(*pairs[i], cfg),
            temperature=cfg.situations_temperature,
            max_tokens=cfg.situations_max_tokens,
            seed=seed + attempt,
        ),
        lambda i, text: parse_situations(text) or None,
        cfg.reask + 1,
        stats,
        "situations",
    )
    stats.add("situations.pairs", len(pairs))
    stats.add("situations.pairs_failed", len(pending))
    items: list[dict[str, Any]] = []
    if dedup is None:
        dedup = Deduper()  # across pairs too: the paper's situations are all unique
        dedup.add(prompt_example())  # small models copy the prompt's example
    for i, (cat, v) in enumerate(pairs):
        raw = found.get(i, [])
        kept = [s for s in raw if dedup.add(s)]
        stats.add("situations.parsed", len(raw))
        stats.add("situations.duplicates", len(raw) - len(kept))
        items.extend({"problem": cat["name"], "value": v.name, "situation": s} for s in kept)
    stats.add("situations.kept", len(items))
    if pending:
        log.warning(
            "%d of %d (category, value) pairs gave no parseable situation after %d tries", len(pending), len(pairs), cfg.reask + 1
        )
    return items


# --------------------------------------------------------------------------------------------
# Steps 2-4
# --------------------------------------------------------------------------------------------


def _run(coro: Any) -> Any:
    from esvr.tasks.simulation.simulate import run_coroutine

    return run_coroutine(coro)


def score_many(
    model: ChatModel, items: Sequence[tuple[list[Message], list[str]]], concurrency: int = 16
) -> list[dict[str, float]]:
    """score_choices over many prompts, `concurrency` at a time."""

    async def all_of() -> list[dict[str, float]]:
        sem = asyncio.Semaphore(max(1, concurrency))

        async def one(msgs: list[Message], choices: list[str]) -> dict[str, float]:
            async with sem:
                return await model.ascore_choices(msgs, choices)

        return list(await asyncio.gather(*(one(m, c) for m, c in items)))

    return _run(all_of())


def _argmax(dist: Mapping[str, float], choices: Sequence[str]) -> str:
    return max(choices, key=lambda c: (dist.get(c, 0.0), -list(choices).index(c)))


_RATING = re.compile(r"rating\W{0,5}([1-5])\b", re.IGNORECASE)


def parse_ratings(text: str, n: int) -> list[int] | None:
    """The n ratings of a Table-26 reply in order, or None when their number is not n."""
    found = [int(x) for x in _RATING.findall(text)]
    return found if len(found) == n else None


def rate_alignment(
    model: ChatModel, items: list[dict[str, Any]], cfg: PersonasConfig, seed: int = 0, stats: StepStats | None = None
) -> None:
    """Step 2: sets ``alignment`` (1-5) and ``alignment_method`` on every item."""
    stats = stats or StepStats()
    by_value = {v.name: v for v in values()}
    todo = list(range(len(items)))
    if cfg.alignment_method == "rate":
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            groups[(it["problem"], it["value"])].append(i)

        def request(key: tuple[str, str], attempt: int) -> ChatRequest:
            user = load_prompt("personas/alignment_user.txt").format(
                situations="\n".join(f"{k + 1}. {items[i]['situation']}" for k, i in enumerate(groups[key])),
                **_value_fields(by_value[key[1]]),
            )
            msgs: list[Message] = [
                {"role": "system", "content": load_prompt("personas/alignment_system.txt").strip()},
                {"role": "user", "content": user},
            ]
            return ChatRequest.build(msgs, max_tokens=cfg.alignment_max_tokens, seed=seed + attempt)

        rated, pending = ask_until_parsed(
            model,
            list(groups),
            request,
            lambda key, text: parse_ratings(text, len(groups[key])),
            cfg.reask + 1,
            stats,
            "alignment",
        )
        for key, ratings in rated.items():
            for i, r in zip(groups[key], ratings):
                items[i]["alignment"], items[i]["alignment_method"] = r, "rate"
        todo = [i for key in pending for i in groups[key]]
        stats.add("alignment.fallback", len(todo))
    choices = ["1", "2", "3", "4", "5"]
    prompts = []
    for i in todo:
        it = items[i]
        user = load_prompt("personas/alignment_single_user.txt").format(
            situation=it["situation"], **_value_fields(by_value[it["value"]])
        )
        prompts.append(
            (
                [
                    {"role": "system", "content": load_prompt("personas/alignment_system.txt").strip()},
                    {"role": "user", "content": user},
                ],
                choices,
            )
        )
    for i, dist in zip(todo, score_many(model, prompts, cfg.concurrency)):
        items[i]["alignment"], items[i]["alignment_method"] = int(_argmax(dist, choices)), "score"


def parse_emotion(text: str) -> str | None:
    """The first of the 10 emotions a reply names (whole word, any case), else None."""
    low = text.lower()
    hits = [(m.start(), name) for name in emotion_names() for m in [re.search(r"\b" + name.lower() + r"\b", low)] if m]
    return min(hits)[1] if hits else None


def majority(votes: Sequence[str], order: Sequence[str]) -> str:
    """Most frequent vote; ties go to the emotion listed first in the taxonomy."""
    counts = Counter(votes)
    return max(counts, key=lambda e: (counts[e], -list(order).index(e)))


def _emotion_msgs(situation: str) -> list[Message]:
    user = load_prompt("personas/emotion_user.txt").format(situation=situation, emotions=", ".join(emotion_names()))
    return [{"role": "system", "content": load_prompt("personas/emotion_system.txt").strip()}, {"role": "user", "content": user}]


def label_emotions(
    model: ChatModel, items: list[dict[str, Any]], cfg: PersonasConfig, seed: int = 0, stats: StepStats | None = None
) -> None:
    """Step 3: ``emotion`` (+ ``emotion_votes``, ``emotion_method``) and ``subcategory``."""
    stats = stats or StepStats()
    names = emotion_names()
    todo = list(range(len(items)))
    if cfg.emotion_method == "vote":
        reqs = [
            ChatRequest.build(
                _emotion_msgs(items[i]["situation"]), n=cfg.emotion_votes, temperature=1.0, max_tokens=16, seed=seed
            )
            for i in todo
        ]
        stats.add("emotion.calls", len(reqs))
        still = []
        for i, outs in zip(todo, model.chat_batch(reqs)):
            votes = [e for e in (parse_emotion(o) for o in outs) if e]
            stats.add("emotion.invalid_votes", len(outs) - len(votes))
            if votes:
                items[i].update(emotion=majority(votes, names), emotion_votes=votes, emotion_method="vote")
            else:
                still.append(i)
        todo = still
        stats.add("emotion.fallback", len(todo))
    for i, dist in zip(todo, score_many(model, [(_emotion_msgs(items[i]["situation"]), names) for i in todo], cfg.concurrency)):
        items[i].update(emotion=_argmax(dist, names), emotion_votes=[], emotion_method="score")
    cats = {c["name"]: c for c in problems()}
    sub_prompts = []
    for it in items:
        subs = cats[it["problem"]]["subcategories"]
        user = load_prompt("personas/subcategory_user.txt").format(
            situation=it["situation"], category=it["problem"], subcategories="; ".join(subs)
        )
        sub_prompts.append(([{"role": "user", "content": user}], list(subs)))
    for it, (_, subs), dist in zip(items, sub_prompts, score_many(model, sub_prompts, cfg.concurrency)):
        it["subcategory"] = _argmax(dist, subs)


_DEMO = re.compile(
    r"age(?:\s*range)?\s*[:\-]\s*(?P<age>[^/\n|;,]+?)\s*[/\n|;,]\s*"
    r"gender\s*[:\-]\s*(?P<gender>[^/\n|;,]+?)\s*[/\n|;,]\s*"
    r"occupation\s*[:\-]\s*(?P<occ>[^\n/|;]+)",
    re.IGNORECASE,
)


def normalize_age(text: str) -> str | None:
    """'30s', 'early 30s', '30-39', 'Thirties', '34' -> '30s'; None when no decade between 10s and 60s+."""
    words = {"teens": "10s", "twenties": "20s", "thirties": "30s", "forties": "40s", "fifties": "50s", "sixties": "60s"}
    low = text.lower()
    for w, age in words.items():
        if w in low:
            return age
    m = re.search(r"(\d{2})", low)
    if not m:
        return None
    decade = int(m.group(1)) // 10 * 10
    return f"{min(decade, 60)}s" if decade >= 10 else None


def parse_demographics(text: str) -> dict[str, str] | None:
    m = _DEMO.search(text.replace("**", ""))
    if not m:
        return None
    age = normalize_age(m.group("age"))
    gender = {"female": "Female", "male": "Male", "woman": "Female", "man": "Male"}.get(
        m.group("gender").strip().lower().strip(". ")
    )
    occ = _clean_occupation(m.group("occ"))
    if not (age and gender and occ):
        return None
    return {"age": age, "gender": gender, "occupation": occ}


def _clean_occupation(text: str) -> str | None:
    occ = text.strip().split("\n")[0].strip(" .*\"'()")
    occ = re.sub(r"^(occupation|job)\s*[:\-]\s*", "", occ, flags=re.IGNORECASE)
    words = occ.split()
    if not 1 <= len(words) <= 4 or not all(re.fullmatch(r"[A-Za-z][A-Za-z&'\-]*", w) for w in words):
        return None
    return " ".join(w if w.isupper() else w[:1].upper() + w[1:] for w in words)


def demographics(
    model: ChatModel, items: list[dict[str, Any]], cfg: PersonasConfig, seed: int = 0, stats: StepStats | None = None
) -> None:
    """Step 4: ``age``, ``gender``, ``occupation``, ``demographics_method``."""
    stats = stats or StepStats()
    todo = list(range(len(items)))
    if cfg.demographics_method == "chat":

        def request(i: int, attempt: int) -> ChatRequest:
            it = items[i]
            user = load_prompt("personas/demographics_user.txt").format(
                situation=it["situation"], category=it["problem"], emotion=it["emotion"]
            )
            msgs: list[Message] = [
                {"role": "system", "content": load_prompt("personas/demographics_system.txt").strip()},
                {"role": "user", "content": user},
            ]
            return ChatRequest.build(msgs, temperature=1.0, max_tokens=48, seed=seed + attempt)

        found, todo = ask_until_parsed(
            model,
            todo,
            request,
            lambda i, text: parse_demographics(text),
            cfg.reask + 1,
            stats,
            "demographics",
        )
        for i, parsed in found.items():
            items[i].update(parsed, demographics_method="chat")
        stats.add("demographics.fallback", len(todo))
    if not todo:
        return
    sys = {"role": "system", "content": load_prompt("personas/demographics_system.txt").strip()}
    age_q = [
        (
            [sys, {"role": "user", "content": f"Situation: {items[i]['situation']}\n\nThe person's age range is their:"}],
            AGE_RANGES,
        )
        for i in todo
    ]
    gen_q = [
        ([sys, {"role": "user", "content": f"Situation: {items[i]['situation']}\n\nThe person's gender is:"}], GENDERS)
        for i in todo
    ]
    ages = score_many(model, age_q, cfg.concurrency)
    genders = score_many(model, gen_q, cfg.concurrency)
    occ_reqs = [
        ChatRequest.build(
            [
                sys,
                {"role": "user", "content": load_prompt("personas/occupation_user.txt").format(situation=items[i]["situation"])},
            ],
            max_tokens=12,
            seed=seed,
        )
        for i in todo
    ]
    occs = model.chat_batch(occ_reqs)
    for i, a, g, o in zip(todo, ages, genders, occs):
        occ = _clean_occupation(o[0] if o else "")
        if occ is None:
            stats.add("demographics.occupation_unspecified")
        items[i].update(
            age=_argmax(a, AGE_RANGES), gender=_argmax(g, GENDERS), occupation=occ or "unspecified", demographics_method="score"
        )


# --------------------------------------------------------------------------------------------
# Step 5: selection and split
# --------------------------------------------------------------------------------------------


def persona_id(problem: str, value: str, situation: str) -> str:
    return "p" + hashlib.sha256(f"{problem}|{value}|{situation}".encode()).hexdigest()[:11]


def _round_robin(items: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Items reordered so that categories alternate (a random order within each category)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for it in items:
        groups[it["problem"]].append(it)
    cats = sorted(groups)
    rng.shuffle(cats)
    for c in cats:
        rng.shuffle(groups[c])
    out = []
    while any(groups[c] for c in cats):
        for c in cats:
            if groups[c]:
                out.append(groups[c].pop())
    return out


def split_sizes(n: int, weights: Mapping[str, int]) -> dict[str, int]:
    """Exact when the weights sum to n; otherwise proportional, by largest remainder."""
    total = sum(weights.values())
    exact = {s: n * weights.get(s, 0) / total for s in SPLITS}
    sizes = {s: int(exact[s]) for s in SPLITS}
    for s in sorted(SPLITS, key=lambda s: -(exact[s] - sizes[s]))[: n - sum(sizes.values())]:
        sizes[s] += 1
    return sizes


def assign_splits(items: list[dict[str, Any]], weights: Mapping[str, int], seed: int = 0) -> None:
    """Sets ``split``: test and dev are drawn round-robin over categories (stratified), the rest is train."""
    rng = random.Random(seed)
    sizes = split_sizes(len(items), weights)
    order = _round_robin(items, rng)
    pos = 0
    for s in ("test", "dev"):
        for it in order[pos : pos + sizes[s]]:
            it["split"] = s
        pos += sizes[s]
    for it in order[pos:]:
        it["split"] = "train"


def select_count(items: list[dict[str, Any]], count: int | None, seed: int = 0) -> list[dict[str, Any]]:
    if count is None or len(items) <= count:
        return items
    return _round_robin(items, random.Random(seed))[:count]


# --------------------------------------------------------------------------------------------
# The whole generation, and personas.jsonl
# --------------------------------------------------------------------------------------------


def generate_personas(
    model: ChatModel,
    cfg: PersonasConfig,
    seed: int = 0,
    emotion_model: ChatModel | None = None,
    demographics_model: ChatModel | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """(personas, rejected situations, step counts). Personas carry every field of `PERSONA_FIELDS`.
    `model` writes and rates the situations; steps 3 and 4 use their own model where given."""
    stats = StepStats()
    order = select_pairs(None, seed)
    step = len(order) if cfg.pairs is None else min(cfg.pairs, len(order))
    top_up = cfg.pairs is not None and cfg.count is not None
    limit = min(len(order), cfg.max_pairs or len(order)) if top_up else step
    dedup = Deduper()
    dedup.add(prompt_example())  # small models copy the prompt's example
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    used = 0
    while used < limit and (used == 0 or len(kept) < (cfg.count or 0)):
        items = generate_situations(model, cfg, seed, stats, order[used : min(used + step, limit)], dedup)
        used = min(used + step, limit)
        stats.add("situations.rounds")
        rate_alignment(model, items, cfg, seed, stats) if items else None
        kept += [it for it in items if it["alignment"] >= cfg.min_alignment]
        rejected += [
            dict(it, reason=f"alignment {it['alignment']} < {cfg.min_alignment}")
            for it in items
            if it["alignment"] < cfg.min_alignment
        ]
    if top_up and len(kept) < (cfg.count or 0):
        log.warning(
            "only %d of personas.count=%d situations passed the alignment filter after %d pairs (personas.max_pairs)",
            len(kept),
            cfg.count,
            used,
        )
    stats.add("alignment.kept", len(kept))
    stats.add("alignment.rejected", len(rejected))
    kept = select_count(kept, cfg.count, seed)
    if kept:
        label_emotions(emotion_model or model, kept, cfg, seed, stats)
        demographics(demographics_model or model, kept, cfg, seed, stats)
    for it in kept:
        it["id"] = persona_id(it["problem"], it["value"], it["situation"])
        it["writer"] = model.cache_id
    assign_splits(kept, cfg.split, seed)
    personas = [{k: it.get(k) for k in PERSONA_FIELDS} for it in kept]
    personas.sort(key=lambda p: (SPLITS.index(p["split"]), p["problem"], p["id"]))
    for s in SPLITS:
        stats.add(f"split.{s}", sum(p["split"] == s for p in personas))
    return personas, rejected, stats.counts


def persona_problems(p: Mapping[str, Any]) -> list[str]:
    """What in one persona does not fit the taxonomies: ``field: problem`` strings, empty if none."""
    out = [f"{k}: missing" for k in ("id", "split", "problem", "value", "situation", "emotion") if not p.get(k)]
    cats = {c["name"]: c for c in problems()}
    checks: list[tuple[str, Sequence[str]]] = [
        ("split", SPLITS),
        ("problem", list(cats)),
        ("value", [v.name for v in values()]),
        ("emotion", emotion_names()),
    ]
    for key, allowed in checks:
        if p.get(key) and p[key] not in allowed:
            out.append(f"{key}: {p[key]!r} is not one of {list(allowed)}")
    sub = p.get("subcategory")
    if sub and p.get("problem") in cats and sub not in cats[p["problem"]]["subcategories"]:
        out.append(f"subcategory: {sub!r} is not a subcategory of {p['problem']!r}")
    for key, allowed in (("age", AGE_RANGES), ("gender", GENDERS)):
        if str(p.get(key) or "unspecified").lower() not in ("unspecified", *(a.lower() for a in allowed)):
            out.append(f"{key}: {p[key]!r} is not one of {[*allowed, 'unspecified']}")
    return out


def validate_persona(p: Mapping[str, Any], where: str) -> None:
    found = persona_problems(p)
    if found:
        raise ValueError(f"{where}: " + "; ".join(found))


def read_personas(path: str | Path, splits: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """personas.jsonl, every persona validated against the taxonomies (problem categories,
    values, emotions, splits, age ranges, genders); every problem of the file is named with its
    line and field in one error. `splits` keeps only those splits."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no personas file {path}")
    out, found = [], []
    for i, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            p = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            found.append(f"line {i}: not valid JSON ({exc})")
            continue
        if not isinstance(p, dict):
            found.append(f"line {i}: a {type(p).__name__}, expected an object")
            continue
        found += [f"line {i}, {problem}" for problem in persona_problems(p)]
        if splits is None or p.get("split") in splits:
            out.append(p)
    if found:
        more = f" (and {len(found) - 10} more)" if len(found) > 10 else ""
        raise InputFileError(f"{path}: " + " | ".join(found[:10]) + more)
    return out


def write_personas(
    personas: Sequence[Mapping[str, Any]], rejected: Sequence[Mapping[str, Any]], stats: Mapping[str, int], out_dir: Path
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "personas": write_jsonl(personas, out_dir / "personas.jsonl"),
        "personas_rejected": write_jsonl(rejected, out_dir / "rejected.jsonl"),
    }
    stats_path = out_dir / "stats.json"
    stats_path.write_text(json.dumps(dict(stats), indent=2, sort_keys=True))
    paths["personas_stats"] = stats_path
    return paths


def make_personas(
    writer: ModelConfig, cfg: PersonasConfig, seed: int, out_dir: Path, run_dir: str, use_cache: bool = True
) -> dict[str, str]:
    """The stage: personas of the persona writer (`writer`) -> personas.jsonl, rejected.jsonl,
    stats.json; returns their paths."""
    model = chat_model(writer, run_dir, cache=use_cache)
    emotion = chat_model(cfg.emotion_model, run_dir, cache=use_cache) if cfg.emotion_model else None
    demo = chat_model(cfg.demographics_model, run_dir, cache=use_cache) if cfg.demographics_model else None
    generated, rejected, stats = generate_personas(model, cfg, seed, emotion, demo)
    return {k: str(v) for k, v in write_personas(generated, rejected, stats, out_dir).items()}


# --------------------------------------------------------------------------------------------
# Bring your own personas: ESConv-style records and free-text role cards -> personas.jsonl
# --------------------------------------------------------------------------------------------

#: ESConv's problem types -> (category, subcategory) of Table 24; the others go to the writer
ESCONV_PROBLEMS: dict[str, tuple[str, str | None]] = {
    "job crisis": ("Career and Work-Related Challenges", "Job loss or career setbacks"),
    "ongoing depression": ("Career and Work-Related Challenges", "Ongoing depression"),
    "breakup with partner": ("Romantic Relationship Challenges", "Breakups or divorce"),
    "problems with friends": ("Friendship and Interpersonal Challenges", "Conflicts with friends"),
    "academic pressure": ("Academic and Educational Stress", "Stress related to studies"),
    "procrastination": ("Academic and Educational Stress", "Lack or excess of motivation to study"),
    "issues with parents": ("Family Dynamics and Conflicts", "Sibling rivalry or family disputes"),
    "conflict with parents": ("Family Dynamics and Conflicts", "Sibling rivalry or family disputes"),
    "issues with children": ("Family Dynamics and Conflicts", "Challenges in parenthood and parenting"),
    "appearance anxiety": ("Self-Esteem, Identity, and Personal Growth", "Concerns about body image"),
}

#: words of a problem description that point to one category; a description that points to
#: exactly one is mapped by rule, any other goes to the writer
CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "Romantic Relationship Challenges": (
        "boyfriend",
        "girlfriend",
        "husband",
        "wife",
        "partner",
        "divorce",
        "breakup",
        "broke up",
        "dating",
        "marriage",
    ),  # fmt: skip
    "Family Dynamics and Conflicts": (
        "mother",
        "father",
        "mom",
        "dad",
        "parents",
        "sister",
        "brother",
        "sibling",
        "family",
        "son",
        "daughter",
    ),  # fmt: skip
    "Friendship and Interpersonal Challenges": ("friend", "friends", "friendship", "lonely", "classmates", "coworkers"),
    "Career and Work-Related Challenges": (
        "job",
        "boss",
        "work",
        "career",
        "fired",
        "laid off",
        "layoffs",
        "salary",
        "promotion",
        "unemployed",
    ),  # fmt: skip
    "Academic and Educational Stress": (
        "exam",
        "exams",
        "school",
        "college",
        "university",
        "grades",
        "studies",
        "studying",
        "thesis",
        "major",
    ),  # fmt: skip
    "Self-Esteem, Identity, and Personal Growth": (
        "confidence",
        "self-esteem",
        "worthless",
        "body image",
        "weight",
        "identity",
        "purpose",
        "meaning",
    ),  # fmt: skip
}

#: emotion words of ESConv and role cards -> the 10 emotions of the taxonomy
EMOTION_WORDS: dict[str, str] = {
    "frustrated": "Frustration", "anxious": "Anxiety", "nervousness": "Anxiety", "nervous": "Anxiety", "worry": "Anxiety",
    "worried": "Anxiety", "sad": "Sadness", "afraid": "Fear", "scared": "Fear", "guilty": "Guilt", "ashamed": "Shame",
    "embarrassed": "Shame", "angry": "Anger", "depressed": "Depression", "jealous": "Jealousy", "envy": "Jealousy",
    "disgusted": "Disgust",
}  # fmt: skip

#: role-card keys (any case, before a colon) -> persona field
CARD_KEYS: dict[str, str] = {
    "age": "age", "age range": "age", "gender": "gender", "sex": "gender", "occupation": "occupation", "job": "occupation",
    "profession": "occupation", "problem": "situation", "problem description": "situation", "description": "situation",
    "situation": "situation", "story": "situation", "emotion": "emotion", "emotion type": "emotion", "feeling": "emotion",
    "category": "problem", "problem type": "problem", "problem category": "problem", "value": "value",
}  # fmt: skip

IMPORT_PROMPTS = ("personas/category_user.txt", "personas/value_user.txt", "personas/emotion_user.txt", "personas/subcategory_user.txt")  # fmt: skip


def _key(text: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", str(text)).lower().split())


def read_role_cards(path: Path) -> list[tuple[str, dict[str, str]]]:
    """Free-text role cards, one per block (blocks apart by a blank line or ``---``): ``Key: value``
    lines (age, gender, occupation, problem description, ...); a line without a known key
    continues the field before it, so a description may run over several lines."""
    cards: list[tuple[str, dict[str, str]]] = []
    card: dict[str, str] = {}
    start, last = 0, None
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines() + [""], start=1):
        line = raw.strip()
        if not line or set(line) <= {"-", "="}:
            if card:
                cards.append((f"{path}:{start}", card))
            card, last = {}, None
            continue
        if not card:
            start = lineno
        m = re.match(r"^([A-Za-z][A-Za-z _\-]{0,30})\s*:\s*(.*)$", line)
        field = CARD_KEYS.get(_key(m.group(1))) if m else None
        if m and field:
            card[field] = (card.get(field, "") + " " + m.group(2)).strip()
            last = field
        else:
            last = last or "situation"
            card[last] = (card.get(last, "") + " " + line).strip()
    return cards


def read_persona_sources(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) from ESConv-style JSON / JSON Lines (emotion_type, problem_type,
    situation, any extra persona fields) or role-card text."""
    from esvr.tasks.common.esconv import read_records

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no persona source file {p}")
    head = p.read_text(encoding="utf-8").lstrip()[:1]
    if head not in ("[", "{"):
        return [(where, dict(card)) for where, card in read_role_cards(p)]
    out = []
    for i, rec in enumerate(read_records(p), start=1):
        if not isinstance(rec, dict):
            raise InputFileError(f"{p}: record {i} is a {type(rec).__name__}, expected an object")
        out.append((f"{p}: record {i}", rec))
    return out


@dataclass
class ImportReport:
    """How each field of each imported persona was obtained: given (valid as it came), rule,
    model (the writer's guess) or left out; and the records that did not become personas."""

    fields: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    dropped: list[dict[str, str]] = field(default_factory=list)
    personas: int = 0

    def note(self, name: str, how: str) -> None:
        self.fields[name][how] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"personas": self.personas, "fields": {k: dict(v) for k, v in self.fields.items()}, "dropped": self.dropped}


def _rule_problem(text: str, situation: str) -> tuple[str | None, str | None, str]:
    """(category, subcategory, how) by rule; (None, None, "") when the rules do not decide."""
    cats = {c["name"]: c for c in problems()}
    key = _key(text)
    for name, cat in cats.items():
        if key == _key(name):
            return name, None, "given"
        for sub in cat["subcategories"]:
            if key == _key(sub):
                return name, sub, "rule"
    if key in ESCONV_PROBLEMS:
        return *ESCONV_PROBLEMS[key], "rule"
    words = f" {_key(text)} {_key(situation)} "
    hits = [c for c, ws in CATEGORY_WORDS.items() if any(f" {w} " in words for w in ws)]
    return (hits[0], None, "rule") if len(hits) == 1 else (None, None, "")


def _rule_emotion(text: str) -> tuple[str | None, str]:
    names = {_key(n): n for n in emotion_names()}
    key = _key(text)
    if key in names:
        return names[key], "given"
    for word in key.split():
        if word in names:
            return names[word], "rule"
        if word in EMOTION_WORDS:
            return EMOTION_WORDS[word], "rule"
    return None, ""


def _rule_gender(text: str) -> str | None:
    return {"female": "Female", "f": "Female", "woman": "Female", "male": "Male", "m": "Male", "man": "Male"}.get(
        _key(text).strip(".")
    )


def import_personas(
    sources: Sequence[str | Path],
    writer: Callable[[], ChatModel] | None,
    cfg: PersonasConfig,
    split: str | None = None,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], ImportReport]:
    """Personas from ESConv-style records and role cards, mapped onto the taxonomies (categories,
    emotions, values) by rules and, where the rules fail, by the writer's most probable choice.
    `split`: every persona in that split; None: the configured proportions. The writer is built
    only when some field needs it; without one (`writer` None) such a persona is dropped."""
    report = ImportReport()
    cats = {c["name"]: c for c in problems()}
    value_list = list(values())
    items: list[dict[str, Any]] = []
    for path in sources:
        for where, rec in read_persona_sources(path):
            situation = " ".join(str(rec.get("situation") or "").split())
            if not situation:
                report.dropped.append({"source": where, "reason": "no situation or problem description"})
                continue
            it: dict[str, Any] = {"situation": situation, "source": where, "mapping": {}}
            problem, sub, how = _rule_problem(str(rec.get("problem") or rec.get("problem_type") or ""), situation)
            if problem:
                it.update(problem=problem, subcategory=sub)
                it["mapping"]["problem"] = how
            emotion, how = _rule_emotion(str(rec.get("emotion") or rec.get("emotion_type") or ""))
            if emotion:
                it["emotion"] = emotion
                it["mapping"]["emotion"] = how
            value = str(rec.get("value") or "")
            if _key(value) in {_key(v.name): v for v in value_list}:
                it["value"] = next(v.name for v in value_list if _key(v.name) == _key(value))
                it["mapping"]["value"] = "given"
            age = normalize_age(str(rec.get("age") or ""))
            gender = _rule_gender(str(rec.get("gender") or ""))
            occupation = _clean_occupation(str(rec.get("occupation") or ""))
            it.update(age=age or "unspecified", gender=gender or "unspecified", occupation=occupation or "unspecified")
            for name, got in (("age", age), ("gender", gender), ("occupation", occupation)):
                it["mapping"][name] = ("given" if got else "left out") if rec.get(name) else "left out"
            items.append(it)

    need = {
        "problem": [i for i, it in enumerate(items) if "problem" not in it],
        "emotion": [i for i, it in enumerate(items) if "emotion" not in it],
        "value": [i for i, it in enumerate(items) if "value" not in it],
    }
    if any(need.values()) and writer is not None:
        model = writer()
        names = list(cats)
        prompts = [
            (
                [
                    {
                        "role": "user",
                        "content": load_prompt("personas/category_user.txt").format(
                            situation=items[i]["situation"], categories="; ".join(names)
                        ),
                    }
                ],
                names,
            )  # fmt: skip
            for i in need["problem"]
        ]
        for i, dist in zip(need["problem"], score_many(model, prompts, cfg.concurrency)):
            items[i].update(problem=_argmax(dist, names), subcategory=None)
            items[i]["mapping"]["problem"] = "model"
        names = emotion_names()
        for i, dist in zip(need["emotion"], score_many(model, [(_emotion_msgs(items[i]["situation"]), names) for i in need["emotion"]], cfg.concurrency)):  # fmt: skip
            items[i]["emotion"] = _argmax(dist, names)
            items[i]["mapping"]["emotion"] = "model"
        names = [v.name for v in value_list]
        listing = "\n".join(f"- {v.name}: {v.definition}" for v in value_list)
        prompts = [
            (
                [
                    {
                        "role": "user",
                        "content": load_prompt("personas/value_user.txt").format(situation=items[i]["situation"], values=listing),
                    }
                ],
                names,
            )  # fmt: skip
            for i in need["value"]
        ]
        for i, dist in zip(need["value"], score_many(model, prompts, cfg.concurrency)):
            items[i]["value"] = _argmax(dist, names)
            items[i]["mapping"]["value"] = "model"
        no_sub = [i for i, it in enumerate(items) if not it.get("subcategory")]
        prompts = [
            (
                [
                    {
                        "role": "user",
                        "content": load_prompt("personas/subcategory_user.txt").format(
                            situation=items[i]["situation"],
                            category=items[i]["problem"],
                            subcategories="; ".join(cats[items[i]["problem"]]["subcategories"]),
                        ),
                    }
                ],
                list(cats[items[i]["problem"]]["subcategories"]),
            )  # fmt: skip
            for i in no_sub
        ]
        for i, (_, subs), dist in zip(no_sub, prompts, score_many(model, prompts, cfg.concurrency)):
            items[i]["subcategory"] = _argmax(dist, subs)
            items[i]["mapping"]["subcategory"] = "model"
        for it in items:
            it["writer"] = model.cache_id
    personas = []
    for it in items:  # every record's fields are counted, kept or not
        missing = [k for k in ("problem", "emotion", "value") if k not in it]
        it["mapping"].setdefault("subcategory", "rule" if it.get("subcategory") else "left out")
        for name in missing:
            it["mapping"][name] = "left out"
        for name, how in it["mapping"].items():
            report.note(name, how)
        if missing:
            report.dropped.append({"source": it["source"], "reason": f"no rule maps {missing} and no persona writer was given"})
            continue
        it["id"] = persona_id(it["problem"], it["value"], it["situation"])
        personas.append(it)
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {SPLITS}")
        for it in personas:
            it["split"] = split
    else:
        assign_splits(personas, cfg.split, seed)
    report.personas = len(personas)
    fields = (*PERSONA_FIELDS, "source", "mapping")
    out = [{k: it.get(k) for k in fields if k in it} for it in personas]
    for p in out:
        for k in ("alignment", "alignment_method", "emotion_votes", "emotion_method", "demographics_method"):
            p.pop(k, None)
    out.sort(key=lambda p: (SPLITS.index(p["split"]), p["problem"], p["id"]))
    return out, report
