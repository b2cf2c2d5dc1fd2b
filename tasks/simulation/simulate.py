"""Dialogue simulation: a supporter and the seeker simulator talk over a set of personas (§5.3, §6.1).

Each supporter turn: the target value detector (optional) predicts the values to reinforce, the
reference generator (optional) writes a reference response, the supporter reasons in four steps
and answers, and (when a reference exists) an alternative response with the reversed Step-3
decision is recorded. Then the seeker answers. Without a TVD or an RG the turn simply has no target
values / no reference: the paper's Table 2 ablation settings.

A dialogue ends when the seeker says [END], when the seeker's valence reaches the threshold (0.6)
together with an expression of gratitude, or at the turn limit (20 supporter turns); the first two
make it *complete*. A supporter reply that keeps ignoring the template ends the dialogue as
*failed*. Both kinds are kept in dialogues.jsonl and marked; `load_dialogues(complete_only=True)`
gives what the paper evaluates.

Throughput and resumability: dialogues run concurrently under a semaphore (the openai backend runs
calls in parallel; the hf backend gathers concurrent calls into batches); each finished dialogue is
appended as one JSON line and fsynced; a restart skips persona ids already in the file, and the
response cache answers every call made before the kill. The same engine continues a dialogue
prefix for DPO look-ahead rollouts: `continue_dialogue`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from esvr.models.chat import ChatModel
from esvr.models.config import InputFileError, ModelConfig, Section
from esvr.models.emotion import EmotionConfig
from esvr.tasks.common import roles
from esvr.tasks.common.jsonl import append_jsonl, exclusive, read_jsonl_repairing
from esvr.tasks.simulation.seeker import SEEKER_PROMPTS, Seeker, SeekerFailure, SeekerSettings, opening_line
from esvr.tasks.simulation.supporter import (
    SUPPORTER_PROMPTS,
    Supporter,
    SupporterFailure,
    SupporterReply,
    SupporterSettings,
    reference_usage,
)

log = logging.getLogger(__name__)

SIMULATE_PROMPTS = SUPPORTER_PROMPTS + SEEKER_PROMPTS

#: phrases that count as thanks to the supporter for the valence end rule (§6.1: "e.g. thank you");
#: bare "appreciate" / "grateful" / "gratitude" are not among them: "willing to appreciate the value
#: of ..." or "grateful for my family" thank nobody
DEFAULT_GRATITUDE = [
    *("thank you", "thank u", "thanks", "thx", "ty for"),
    *("thankful for you", "thankful to you", "grateful for you", "grateful to you", "grateful for this"),
    *("grateful for talking", "appreciate it", "appreciate that", "appreciate this", "appreciate you"),
    *("means a lot", "that helps", "this helps", "that helped", "this helped", "really helped", "you helped"),
    *("you've helped", "you have helped"),
]
#: "thanks" that thank nobody here
NOT_GRATITUDE = re.compile(r"\b(?:no,? thanks|thanks to (?!you\b))", re.IGNORECASE)

END_REASONS = ("seeker_end", "valence_gratitude", "max_turns", "horizon", "supporter_failure", "seeker_failure")
COMPLETE_REASONS = ("seeker_end", "valence_gratitude")


class SimulateConfig(Section):
    """Dialogue simulation (stage 6). The supporter and seeker are ``models.supporter/seeker``."""

    #: which persona split `esvr simulate` runs by default; the pipeline simulates train+dev for SFT
    splits: list[Literal["train", "dev", "test"]] = ["train", "dev"]
    #: simulate at most this many personas per split (None: all); the demo keeps it tiny
    max_personas: int | None = None
    #: supporter turns before a dialogue is cut (paper §6.1: 20, from ESConv's ~15-turn average)
    max_turns: int = 20
    #: seeker valence (0..1) that, with gratitude, ends a dialogue (paper §6.1)
    valence_threshold: float = 0.6
    gratitude_phrases: list[str] = DEFAULT_GRATITUDE
    #: dialogues in flight at once; each model's own `concurrency` also caps its parallel calls
    concurrency: int = 32
    #: the 4-step reply of a large model runs to ~300-600 tokens; truncation breaks the template
    supporter_max_tokens: int = 1024
    seeker_max_tokens: int = 128
    #: the paper does not give sampling settings; calls are seeded, so any setting is reproducible
    supporter_temperature: float = 0.7
    seeker_temperature: float = 0.7
    #: replies that ignore the template are asked again this many times before the turn fails
    reask: int = 2
    #: after the re-asks: 'fail' the dialogue (paper setting) or build the reply field by field
    #: ('stepwise'; for models too small to keep the template, e.g. the demo's SmolLM2-135M);
    #: 'stepwise_only' does not try the template at all (saves its ~1k tokens per turn)
    fallback: Literal["fail", "stepwise", "stepwise_only"] = "fail"
    stepwise_max_tokens: int = 60
    #: simulate the alternative response (reversed Step-3 decision) at each turn (§5.3)
    alternatives: bool = True
    #: target value detector and reference generator as chat models (e.g. hf:<base>+<adapter>);
    #: null leaves them out (Table 2's ablations); the pipeline passes the trained adapters
    tvd: ModelConfig | None = None
    rg: ModelConfig | None = None
    #: how the detector is read: its generated list, or its ranking of the 20 names (esvr.tasks.components.tvd.TVDMethod)
    tvd_method: Literal["generate", "score"] = "generate"
    tvd_max_tokens: int = 48
    rg_max_tokens: int = 160
    #: score the seeker's valence with `label.emotion` for the valence end rule (off: [END]/limit only)
    emotion: bool = True
    #: share of this run's dialogues that may fail (a backend error after the retries: not written)
    #: before `esvr simulate` fails; 0.0: any failure fails it, 1.0: never
    max_failed_share: float = 0.0


# --------------------------------------------------------------------------------------------
# End rules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndRules:
    max_turns: int = 20
    valence_threshold: float = 0.6
    gratitude_phrases: tuple[str, ...] = tuple(DEFAULT_GRATITUDE)


def has_gratitude(text: str, phrases: Iterable[str]) -> bool:
    """Whether the text thanks the supporter (word-boundary match of any phrase, any case)."""
    low = NOT_GRATITUDE.sub(" ", text.lower())
    return any(re.search(r"\b" + re.escape(p.lower()), low) for p in phrases)


def end_reason(ended: bool, valence: float | None, gratitude: bool, supporter_turns: int, rules: EndRules) -> str | None:
    """Why the dialogue ends after this seeker utterance, or None to go on. [END] wins over the
    valence rule, which wins over the turn limit."""
    if ended:
        return "seeker_end"
    if valence is not None and valence >= rules.valence_threshold and gratitude:
        return "valence_gratitude"
    if supporter_turns >= rules.max_turns:
        return "max_turns"
    return None


# --------------------------------------------------------------------------------------------
# Agents: supporter, seeker, and the optional TVD / RG / emotion scorer
# --------------------------------------------------------------------------------------------


def _history_text(utterances: Sequence[Mapping[str, Any]]) -> str:
    from esvr.tasks.components.tvd import render_history

    return render_history([{"role": u["role"], "text": u["text"]} for u in utterances])


def tvd_request(utterances: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The trained detector's prompt (esvr.tasks.components.tvd, zero-shot variant) for this history."""
    from esvr.tasks.components.tvd import tvd_messages

    return tvd_messages(_history_text(utterances))


def rg_request(utterances: Sequence[Mapping[str, Any]], target_values: Sequence[str] | None) -> list[dict[str, str]]:
    """The reference generator's prompt (Table 16's structure) for this history and values.

    No detector in the loop (None) gives the prompt without values, which the generator trained
    without values (App. G.1) learned on; an empty detection keeps the prompt with values.
    """
    from esvr.tasks.components.rg import rg_messages  # the component's own builder: simulation prompts = training prompts

    return rg_messages(_history_text(utterances), None if target_values is None else list(target_values))


def _clean_reference(text: str) -> str:
    text = " ".join(text.replace("\r", "").split("\n\n")[0].split())
    return re.sub(r"^(therapist|supporter|commenter)\s*:\s*", "", text, flags=re.IGNORECASE).strip('"“” ')


@dataclass
class Agents:
    """Everything a dialogue needs. TVD, RG and the emotion scorer are optional."""

    supporter: Supporter
    seeker: Seeker
    tvd: ChatModel | None = None
    rg: ChatModel | None = None
    #: an `esvr.models.emotion.EmotionScorer` (``.score(texts)``); None disables the valence rule
    emotion: Any | None = None
    tvd_method: Literal["generate", "score"] = "generate"
    tvd_max_tokens: int = 48
    rg_max_tokens: int = 160
    rules: EndRules = field(default_factory=EndRules)
    #: the models that made the file's dialogues (by role); a resumed run must match them
    names: dict[str, str | None] = field(default_factory=dict)
    #: `dialogue_settings`: a resumed run must match them too
    settings: dict[str, Any] = field(default_factory=dict)

    async def target_values(self, utterances: Sequence[Mapping[str, Any]], seed: int, calls: dict[str, int]) -> list[str] | None:
        if self.tvd is None:
            return None
        from esvr.tasks.components.tvd import adetect_values

        calls["tvd"] = calls.get("tvd", 0) + 1
        found, _ = await adetect_values(self.tvd, tvd_request(utterances), self.tvd_method, self.tvd_max_tokens, seed)
        return found

    async def reference(
        self, utterances: Sequence[Mapping[str, Any]], target_values: Sequence[str] | None, seed: int, calls: dict[str, int]
    ) -> str | None:
        if self.rg is None:
            return None
        calls["rg"] = calls.get("rg", 0) + 1
        out = await self.rg.achat(
            rg_request(utterances, target_values), n=1, temperature=0.0, max_tokens=self.rg_max_tokens, seed=seed
        )
        text = _clean_reference(out[0] if out else "")
        return text or None

    async def emotion_of(self, text: str, calls: dict[str, int]) -> tuple[float | None, int | None]:
        if self.emotion is None or not text:
            return None, None
        calls["emotion"] = calls.get("emotion", 0) + 1
        score = (await asyncio.to_thread(self.emotion.score, [text]))[0]
        return float(score.valence), int(score.sentiment)


#: the `SimulateConfig` keys that change what a dialogue says or where it ends; a resumed file made
#: under other values is moved aside (the rest, e.g. concurrency, only change how fast it is made)
DIALOGUE_KEYS = (
    "max_turns",
    "valence_threshold",
    "gratitude_phrases",
    "supporter_max_tokens",
    "seeker_max_tokens",
    "supporter_temperature",
    "seeker_temperature",
    "reask",
    "fallback",
    "stepwise_max_tokens",
    "tvd_method",
    "tvd_max_tokens",
    "rg_max_tokens",
)


def dialogue_settings(cfg: SimulateConfig) -> dict[str, Any]:
    """The settings that shape a dialogue, besides the models, the seed and `alternatives`
    (`run_settings` adds those two): recorded in every dialogue and compared on resume."""
    from esvr.tasks.common.hashing import prompts_digest

    return {**{key: getattr(cfg, key) for key in DIALOGUE_KEYS}, "prompts": prompts_digest(list(SIMULATE_PROMPTS))}


def dialogue_seed(persona_id: str, seed: int) -> int:
    """Every call of a dialogue is seeded from its persona and the run seed: reruns replay it."""
    return int(hashlib.sha256(f"{seed}:{persona_id}".encode()).hexdigest()[:8], 16)


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """The result of `continue_dialogue`: the whole utterance list and the new supporter turns."""

    utterances: list[dict[str, Any]]
    turns: list[dict[str, Any]]
    end_reason: str
    calls: dict[str, int]

    @property
    def complete(self) -> bool:
        return self.end_reason in COMPLETE_REASONS

    @property
    def failed(self) -> bool:
        return self.end_reason in ("supporter_failure", "seeker_failure")

    def seeker_utterances_after(self, index: int) -> list[str]:
        """Seeker texts after utterance `index` (for the look-ahead reward N_{t+k})."""
        return [u["text"] for u in self.utterances[index + 1 :] if u["role"] == "seeker"]


def _add(total: dict[str, int], part: Mapping[str, int]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v


async def _seeker_step(
    persona: Mapping[str, Any], utts: list[dict[str, Any]], agents: Agents, seed: int, calls: dict[str, int], supporter_turns: int
) -> str | None:
    reply = await agents.seeker.reply(persona, utts, seed=seed, calls=calls)
    valence, sentiment = await agents.emotion_of(reply.text, calls)
    gratitude = has_gratitude(reply.text, agents.rules.gratitude_phrases)
    if reply.text:
        utts.append(
            {
                "role": "seeker",
                "text": reply.text,
                "valence": valence,
                "sentiment": sentiment,
                "gratitude": gratitude,
                "end": reply.ended,
                "truncated": reply.truncated,
            }
        )
    return end_reason(reply.ended, valence, gratitude, supporter_turns, agents.rules)


async def _supporter_step(
    persona: Mapping[str, Any], utts: list[dict[str, Any]], agents: Agents, turn_no: int, seed: int, alternatives: bool
) -> dict[str, Any]:
    """One supporter turn; appends the response to `utts` unless the turn failed."""
    calls: dict[str, int] = {}
    started = time.perf_counter()
    target_values = await agents.target_values(utts, seed, calls)
    reference = await agents.reference(utts, target_values, seed, calls)
    record: dict[str, Any] = {"turn": turn_no, "at": None, "target_values": target_values, "reference": reference}
    try:
        reply = await agents.supporter.respond(utts, target_values, reference, seed=seed, calls=calls)
    except SupporterFailure as err:
        record.update(failed=True, error=str(err), problems=err.problems, replies=err.replies, calls=calls)
        record["elapsed_s"] = round(time.perf_counter() - started, 3)
        return record
    alternative: SupporterReply | None = None
    alt_error = None
    if alternatives:
        if not reference:
            alt_error = "no reference response: nothing to reverse"
        else:
            try:
                alternative = await agents.supporter.alternative(
                    utts, target_values, reference, reply, seed=seed + 50, calls=calls
                )
            except SupporterFailure as err:
                alt_error = str(err)
    record.update(
        at=len(utts),
        failed=False,
        steps=reply.steps,
        reference_used=reply.reference_used,
        strategy=reply.strategy,
        strategy_raw=reply.strategy_raw,
        response=reply.response,
        method=reply.method,
        attempts=reply.attempts,
        problems=reply.problems,
        raw=reply.raw,
        alternative=alternative.to_record() if alternative else None,
        alternative_error=alt_error,
        calls=calls,
        elapsed_s=round(time.perf_counter() - started, 3),
    )
    utts.append({"role": "supporter", "text": reply.response})
    return record


async def acontinue_dialogue(
    persona: Mapping[str, Any],
    prefix: Sequence[Mapping[str, Any]],
    agents: Agents,
    *,
    horizon: int | None = None,
    alternatives: bool = False,
    seed: int = 0,
) -> Rollout:
    """Continue a dialogue from `prefix` until it ends, or after `horizon` seeker utterances.

    `prefix` is a list of utterances ``{'role': 'seeker'|'supporter', 'text': ...}`` starting with
    the persona's situation. When it ends with a supporter utterance (e.g. a DPO candidate), the
    seeker answers it first. The turn limit counts the prefix's supporter turns too. Returns the
    full utterance list and the new supporter turns (`Rollout`).
    """
    utts = [dict(u) for u in prefix]
    if not utts or utts[0].get("role") != "seeker":
        raise ValueError("a dialogue prefix starts with the seeker's situation")
    turns: list[dict[str, Any]] = []
    calls: dict[str, int] = {}
    supporter_turns = sum(1 for u in utts if u["role"] == "supporter")
    seeker_said = 0
    base = dialogue_seed(str(persona.get("id", "")), seed)

    def turn_seed() -> int:
        return base + 1000 * supporter_turns

    try:
        if utts[-1]["role"] == "supporter":
            seeker_calls: dict[str, int] = {}
            reason = await _seeker_step(persona, utts, agents, turn_seed() + 7, seeker_calls, supporter_turns)
            _add(calls, seeker_calls)
            seeker_said += 1
            if reason:
                return Rollout(utts, turns, reason, calls)
        while True:
            if horizon is not None and seeker_said >= horizon:
                return Rollout(utts, turns, "horizon", calls)
            if supporter_turns >= agents.rules.max_turns:
                return Rollout(utts, turns, "max_turns", calls)
            record = await _supporter_step(persona, utts, agents, supporter_turns + 1, turn_seed(), alternatives)
            supporter_turns += 1
            turns.append(record)
            _add(calls, record["calls"])
            if record["failed"]:
                return Rollout(utts, turns, "supporter_failure", calls)
            reason = await _seeker_step(persona, utts, agents, turn_seed() + 7, record["calls"], supporter_turns)
            _add(calls, {k: v for k, v in record["calls"].items() if k in ("seeker", "emotion")})
            seeker_said += 1
            record["seeker_reply_at"] = len(utts) - 1 if utts[-1]["role"] == "seeker" and len(utts) - 1 > record["at"] else None
            if reason:
                return Rollout(utts, turns, reason, calls)
    except SeekerFailure as err:
        log.warning("persona %s: %s", persona.get("id"), err)
        return Rollout(utts, turns, "seeker_failure", calls)


def continue_dialogue(persona: Mapping[str, Any], prefix: Sequence[Mapping[str, Any]], agents: Agents, **kwargs: Any) -> Rollout:
    """Sync form of `acontinue_dialogue` (usable from plain code, Prefect tasks and running loops)."""
    return run_coroutine(acontinue_dialogue(persona, prefix, agents, **kwargs))


def run_coroutine(coro: Any) -> Any:
    """Run `coro` to its end from sync code; Ctrl-C cancels it (its calls stop at once).

    Without a running loop asyncio.run does that itself. Inside one (a caller's loop) the
    coroutine runs on a loop of its own in a thread, and an interrupt of the waiting thread
    cancels it there rather than waiting for it to finish."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    loop = asyncio.new_event_loop()
    main = loop.create_task(coro)

    def run() -> Any:
        try:
            return loop.run_until_complete(main)
        finally:  # as asyncio.run ends: writes handed to threads finish before the loop closes
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        done = pool.submit(run)
        try:
            return done.result()
        except KeyboardInterrupt:
            loop.call_soon_threadsafe(main.cancel)
            raise


async def simulate_dialogue(
    persona: Mapping[str, Any], agents: Agents, *, alternatives: bool = True, seed: int = 0
) -> dict[str, Any]:
    """One whole dialogue for a persona, as a dialogues.jsonl record."""
    started = time.perf_counter()
    prefix = [
        {
            "role": "seeker",
            "text": persona["situation"],
            "valence": None,
            "sentiment": None,
            "gratitude": False,
            "end": False,
            "truncated": False,
        }
    ]
    roll = await acontinue_dialogue(persona, prefix, agents, alternatives=alternatives, seed=seed)
    supporter_turns = [t for t in roll.turns if not t["failed"]]
    return {
        "id": persona["id"],
        "persona_id": persona["id"],
        "split": persona.get("split"),
        "persona": dict(persona),
        **{k: v for k, v in agents.names.items()},
        "opening": opening_line(),
        "utterances": roll.utterances,
        "turns": roll.turns,
        "n_turns": len(supporter_turns),
        "end_reason": roll.end_reason,
        "complete": roll.complete,
        "failed": roll.failed,
        "calls": roll.calls,
        "seed": seed,
        "settings": run_settings(agents, alternatives=alternatives, seed=seed),
        "elapsed_s": round(time.perf_counter() - started, 3),
    }


# --------------------------------------------------------------------------------------------
# dialogues.jsonl: append-only, resumable (esvr.tasks.common.jsonl)
# --------------------------------------------------------------------------------------------


def load_dialogues(path: str | os.PathLike[str], *, complete_only: bool = False) -> list[dict[str, Any]]:
    """dialogues.jsonl records; `complete_only` keeps what the paper evaluates (ended by [END] or
    by valence + gratitude within the turn limit)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dialogues file {path}")
    out = []
    for i, rec in enumerate(read_jsonl_repairing(path), 1):
        for key in ("id", "utterances", "turns", "end_reason", "complete"):
            if key not in rec:
                raise InputFileError(f"{path}: line {i} has no '{key}' field")
        if not complete_only or rec["complete"]:
            out.append(rec)
    return out


@dataclass
class SimulationSummary:
    path: str
    total: int = 0
    skipped: int = 0
    written: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    end_reasons: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    supporter_turns: int = 0
    failed_turns: int = 0
    stepwise_turns: int = 0
    reasked_turns: int = 0
    alternatives: int = 0
    #: supporter turns that had a reference response, and those whose Step 3 used it
    reference_turns: int = 0
    reference_used_turns: int = 0

    @property
    def dialogues_per_min(self) -> float:
        return 60.0 * self.written / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def calls_per_supporter_turn(self) -> float:
        return sum(self.calls.values()) / self.supporter_turns if self.supporter_turns else 0.0

    def metrics(self, prefix: str = "simulate") -> dict[str, float]:
        m = {
            f"{prefix}.dialogues_total": self.total,
            f"{prefix}.dialogues_skipped_existing": self.skipped,
            f"{prefix}.dialogues_written": self.written,
            f"{prefix}.dialogues_errors": len(self.errors),
            f"{prefix}.dialogues_per_min": self.dialogues_per_min,
            f"{prefix}.supporter_turns": self.supporter_turns,
            f"{prefix}.failed_turns": self.failed_turns,
            f"{prefix}.stepwise_turns": self.stepwise_turns,
            f"{prefix}.reasked_turns": self.reasked_turns,
            f"{prefix}.alternatives": self.alternatives,
            f"{prefix}.calls_per_supporter_turn": self.calls_per_supporter_turn,
        }
        m.update({f"{prefix}.end.{k}": v for k, v in self.end_reasons.items()})
        m.update({f"{prefix}.calls.{k}": v for k, v in self.calls.items()})
        if self.reference_turns:
            m[f"{prefix}.reference_used_share"] = self.reference_used_turns / self.reference_turns
        return m

    def add(self, part: SimulationSummary) -> None:
        """Count a shard's summary in this one (`written` is what merging the shards appended)."""
        self.errors += part.errors
        self.elapsed_s = max(self.elapsed_s, part.elapsed_s)
        self.supporter_turns += part.supporter_turns
        self.failed_turns += part.failed_turns
        self.stepwise_turns += part.stepwise_turns
        self.reasked_turns += part.reasked_turns
        self.alternatives += part.alternatives
        self.reference_turns += part.reference_turns
        self.reference_used_turns += part.reference_used_turns
        _add(self.end_reasons, part.end_reasons)
        _add(self.calls, part.calls)


def run_settings(agents: Agents, *, alternatives: bool, seed: int) -> dict[str, Any]:
    """What a dialogue of this run records as its ``settings``."""
    return {**agents.settings, "alternatives": alternatives, "seed": seed}


def stale_reasons(existing: list[dict[str, Any]], names: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """How the file's dialogues were made otherwise than this run would make them: models (by role)
    and `dialogue_settings`, as ``key: old -> new``. A dialogue from before settings were recorded
    has none, which differs too."""
    changed: dict[str, str] = {}
    for rec in existing:
        for key, want in names.items():
            if rec.get(key) != want:
                changed.setdefault(key, f"{key}: {rec.get(key)!r} -> {want!r}")
        had = rec.get("settings") or {}
        for key, want in settings.items():
            if had.get(key) != want:
                changed.setdefault(key, f"{key}: {had.get(key)!r} -> {want!r}")
    return list(changed.values())


def _archive(path: Path) -> Path:
    """Move a dialogues file aside (never deleted): `dialogues.stale-1.jsonl`, `-2`, ..."""
    n = 1
    while (target := path.with_name(f"{path.stem}.stale-{n}{path.suffix}")).exists():
        n += 1
    path.rename(target)
    return target


def move_aside(path: Path, changed: Sequence[str]) -> Path:
    """Archive a dialogues file made under other models or settings, saying which and where."""
    kept = _archive(path)
    log.warning("%s: made under other models or settings (%s); earlier dialogues moved to %s", path, "; ".join(changed), kept)
    return kept


def _summarize(summary: SimulationSummary, rec: dict[str, Any]) -> None:
    summary.written += 1
    summary.end_reasons[rec["end_reason"]] = summary.end_reasons.get(rec["end_reason"], 0) + 1
    _add(summary.calls, rec["calls"])
    for t in rec["turns"]:
        if t["failed"]:
            summary.failed_turns += 1
            continue
        summary.supporter_turns += 1
        summary.stepwise_turns += t["method"] == "stepwise"
        summary.reasked_turns += t["attempts"] > 1
        summary.alternatives += t["alternative"] is not None
    used, offered = reference_usage(rec["turns"])
    summary.reference_used_turns += used
    summary.reference_turns += offered


async def asimulate_dialogues(
    personas: Sequence[Mapping[str, Any]],
    out_path: str | os.PathLike[str],
    agents: Agents,
    *,
    concurrency: int = 32,
    alternatives: bool = True,
    seed: int = 0,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> SimulationSummary:
    """Simulate every persona not yet in `out_path`, `concurrency` dialogues at a time.

    Finished dialogues are appended (fsynced) as they end, in completion order. A dialogue that
    raised (a backend error after its retries) is not written: it is reported in
    ``summary.errors`` and a rerun tries it again, with answered calls coming from the cache.
    """
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = [str(p["id"]) for p in personas]
    dup = [i for i, n in Counter(ids).items() if n > 1]
    if dup:
        raise ValueError(f"persona ids must be unique; repeated: {dup[:5]}")
    summary = SimulationSummary(path=str(path), total=len(personas))
    started = time.perf_counter()
    with exclusive(path):
        path.touch()  # an empty run still leaves its (empty) file for the next stage
        existing = read_jsonl_repairing(path)
        changed = stale_reasons(existing, agents.names, run_settings(agents, alternatives=alternatives, seed=seed))
        if changed:
            # A model upstream changed (e.g. a retrained TVD) or a setting did (the turn limit): the
            # old dialogues no longer belong to this run. They are kept beside it, and the
            # simulation starts over.
            existing = []
            move_aside(path, changed)
            path.touch()
        done = {rec["id"] for rec in existing}
        todo = [p for p in personas if str(p["id"]) not in done]
        summary.skipped = len(personas) - len(todo)
        sem = asyncio.Semaphore(max(1, concurrency))
        write_lock = asyncio.Lock()

        async def one(persona: Mapping[str, Any]) -> None:
            async with sem:
                try:
                    rec = await simulate_dialogue(persona, agents, alternatives=alternatives, seed=seed)
                except Exception as exc:  # noqa: BLE001 - one dialogue's backend error must not stop the others
                    log.error("persona %s: %s: %s", persona["id"], type(exc).__name__, exc)
                    summary.errors.append(f"{persona['id']}: {type(exc).__name__}: {exc}")
                    return
            async with write_lock:
                await asyncio.to_thread(append_jsonl, path, rec)
                _summarize(summary, rec)
            if on_done is not None:
                on_done(rec)

        await asyncio.gather(*(one(p) for p in todo))
    summary.elapsed_s = time.perf_counter() - started
    return summary


class SimulationFailed(RuntimeError):
    """The simulation gave nothing usable, or more of its dialogues failed than allowed."""


def check_simulation(summary: SimulationSummary, dialogues: Sequence[Mapping[str, Any]], max_failed_share: float) -> None:
    """Raise `SimulationFailed`, naming why, when the run's `dialogues` (those of its personas)
    hold no supporter response, or when the share of this run's dialogues that hit backend errors
    is above `max_failed_share` (``simulate.max_failed_share``)."""
    tried = summary.total - summary.skipped
    failed = len(summary.errors)
    rerun = "finished dialogues are kept; fix the cause and rerun the same command to retry the rest"
    if tried and failed / tried > max_failed_share:
        raise SimulationFailed(
            f"{failed} of {tried} dialogues failed after the backend's retries (simulate.max_failed_share="
            f"{max_failed_share}); first: {summary.errors[0]}; {rerun}"
        )
    if not any(d.get("n_turns") for d in dialogues):
        ends = Counter(str(d.get("end_reason")) for d in dialogues)
        why = f"all {len(dialogues)} ended without a supporter response ({dict(ends)})" if dialogues else "none was written"
        raise SimulationFailed(f"{summary.path}: no usable dialogue: {why}; {rerun}")


def simulate_dialogues(
    personas: Sequence[Mapping[str, Any]], out_path: str | os.PathLike[str], agents: Agents, **kwargs: Any
) -> SimulationSummary:
    """Sync form of `asimulate_dialogues`."""
    return run_coroutine(asimulate_dialogues(personas, out_path, agents, **kwargs))


# --------------------------------------------------------------------------------------------
# Building agents from a config
# --------------------------------------------------------------------------------------------


def supporter_settings(cfg: SimulateConfig, max_tokens: int | None = None) -> SupporterSettings:
    """The supporter's settings in a ``simulate`` section (`esvr chat`'s too, which may give its
    own `max_tokens`)."""
    return SupporterSettings(
        max_tokens=max_tokens or cfg.supporter_max_tokens,
        temperature=cfg.supporter_temperature,
        reask=cfg.reask,
        fallback=cfg.fallback,
        stepwise_max_tokens=cfg.stepwise_max_tokens,
    )


def build_agents(
    cfg: SimulateConfig,
    supporter_model: ChatModel,
    seeker_model: ChatModel,
    *,
    tvd_model: ChatModel | None = None,
    rg_model: ChatModel | None = None,
    emotion_scorer: Any | None = None,
    names: Mapping[str, str | None] | None = None,
) -> Agents:
    """The engine's agents; their `names` (what a resumed file must match) are the models' cache
    ids and whatever else `names` adds (the evaluation's supporter variants)."""
    supporter = Supporter(supporter_model, supporter_settings(cfg))
    seeker = Seeker(
        seeker_model, SeekerSettings(max_tokens=cfg.seeker_max_tokens, temperature=cfg.seeker_temperature, reask=cfg.reask)
    )
    rules = EndRules(cfg.max_turns, cfg.valence_threshold, tuple(cfg.gratitude_phrases))
    model_names = {
        "supporter": supporter_model.cache_id,
        "seeker": seeker_model.cache_id,
        "tvd": tvd_model.cache_id if tvd_model is not None else None,
        "rg": rg_model.cache_id if rg_model is not None else None,
        # the valence end rule's scorer (None: the rule is off)
        "emotion_scorer": getattr(emotion_scorer, "fingerprint", type(emotion_scorer).__name__)
        if emotion_scorer is not None
        else None,
    }
    return Agents(
        supporter=supporter,
        seeker=seeker,
        tvd=tvd_model,
        rg=rg_model,
        emotion=emotion_scorer,
        tvd_method=cfg.tvd_method,
        tvd_max_tokens=cfg.tvd_max_tokens,
        rg_max_tokens=cfg.rg_max_tokens,
        rules=rules,
        names={**model_names, **(names or {})},
        settings=dialogue_settings(cfg),
    )


@contextmanager
def opened_agents(
    cfg: SimulateConfig,
    supporter: ModelConfig,
    seeker: ModelConfig,
    *,
    tvd: ModelConfig | None = None,
    rg: ModelConfig | None = None,
    emotion: EmotionConfig | None = None,
    run_dir: str | os.PathLike[str],
    use_cache: bool = True,
    own_adapters: bool = False,
) -> Iterator[Agents]:
    """The agents of a ``simulate`` section and the role models (`esvr.tasks.common.roles`),
    with the emotion scorer of ``label.emotion`` when the valence end rule is on (`emotion`).

    Models come from the shared pool; with `own_adapters` trained components are loaded for this
    use and closed on exit (the supporter stage's rollouts, which train right after).
    """
    opened: list[ChatModel] = []

    def load(model: ModelConfig | None) -> ChatModel | None:
        if model is None:
            return None
        if own_adapters and roles.is_adapter(model):
            opened.append(roles.own_model(model, run_dir, use_cache))
            return opened[-1]
        return roles.chat_model(model, run_dir, cache=use_cache)

    try:
        yield build_agents(
            cfg,
            load(supporter),  # type: ignore[arg-type]
            load(seeker),  # type: ignore[arg-type]
            tvd_model=load(tvd),
            rg_model=load(rg),
            emotion_scorer=roles.emotion_scorer(emotion, run_dir, use_cache),
        )
    finally:
        for model in opened:
            model.close()
