"""The supporter: four reasoning steps, a strategy and a response (paper §5.3, Table 18).

Inputs per turn are the dialogue history, the target values (from the target value detector, or
none) and a reference response (from the reference generator, or none). Without a detector in the
loop (target values None, or a supporter set not to see them) the prompt has no target-values
section at all: App. G.2's prompt (dialogue history and reference response only), which Table 2's
"+ Reference" row uses too; a detector that found nothing keeps the section and says so. The reply follows a fixed
template; `parse_supporter_reply` extracts Step 1-3, the Step-3 decision (Yes/No: was the reference
used), the Step-4 strategy and the response. A reply that ignores the template is re-asked (the bad
reply and a correction go back into the conversation) up to ``reask`` times and then either fails
the turn or, when configured, is produced field by field (``stepwise``, for models too small to
keep the template; the turn is marked so). Nothing unparsed is ever accepted.

The alternative response (§5.3, App. D.3) reverses the Step-3 decision and regenerates Steps 3-4.

`reference_usage` counts the Step-3 decisions over a simulation's turns: the share of turns that
used the reference (the paper: GPT declines it in about 90% of turns, which motivates the
alternative responses).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from typing import Any, Literal

from esvr.models.chat import ChatModel, Message
from esvr.prompts import load_prompt, load_taxonomy, values
from esvr.tasks.simulation.replies import AgentFailure, ReplySettings

#: the prompt files the supporter uses (flows log them to MLflow)
SUPPORTER_PROMPTS = (
    "supporter/system.txt",
    "supporter/user.txt",
    "supporter/user_no_values.txt",
    "supporter/alternative.txt",
    "supporter/reask.txt",
    "supporter/no_reference.txt",
    "supporter/no_target_values.txt",
    "supporter/stepwise_step1.txt",
    "supporter/stepwise_step2.txt",
    "supporter/stepwise_decision.txt",
    "supporter/stepwise_strategy.txt",
    "supporter/stepwise_response.txt",
    "supporter/stepwise_values.txt",
    "strategies.yaml",
)

NO_REFERENCE_STEP2 = "No reference response"


# --------------------------------------------------------------------------------------------
# Taxonomy and prompt pieces
# --------------------------------------------------------------------------------------------


@cache
def strategies() -> tuple[tuple[str, str], ...]:
    """The 8 strategies of appendix C as (name, description), in canonical order."""
    return tuple((s["name"], s["description"]) for s in load_taxonomy("strategies"))


def strategy_names() -> list[str]:
    return [name for name, _ in strategies()]


def strategies_block() -> str:
    return "\n".join(f"- {name}: {desc}" for name, desc in strategies())


def _norm_key(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


@cache
def _strategy_aliases() -> dict[str, str]:
    aliases: dict[str, str] = {}
    for name in strategy_names():
        key = _norm_key(name)
        aliases[key] = name
        # singular/plural slips ("Suggestion", "Informations") name the same strategy
        aliases[key.rstrip("s")] = name
        aliases[key + "s"] = name
    return aliases


def canonical_strategy(raw: str) -> str | None:
    """The taxonomy name a Step-4 strategy field means, or None when it names none of the 8.

    Accepts case, spacing, hyphen and plural slips and a trailing explanation after a separator
    ("Affirmation - to encourage ..."); anything else (e.g. "Empathy") is not one of the 8.
    """
    head = re.split(r"\s[-–—:(]|[,;:(]|\.\s|\.$|\n", raw.strip().strip("*\"'`[]"), maxsplit=1)[0]
    return _strategy_aliases().get(_norm_key(head))


def format_history(utterances: Sequence[Mapping[str, Any]]) -> str:
    """The dialogue as the supporter's prompt shows it: 'Patient: ...' / 'Therapist: ...' lines."""
    names = {"seeker": "Patient", "supporter": "Therapist"}
    lines = []
    for i, u in enumerate(utterances):
        role = u.get("role")
        if role not in names:
            raise ValueError(f"utterance {i}: role must be 'seeker' or 'supporter', got {role!r}")
        lines.append(f"{names[role]}: {u['text']}")
    return "\n".join(lines)


def format_target_values(target_values: Sequence[str] | None) -> str:
    if not target_values:
        return load_prompt("supporter/no_target_values.txt").strip()
    by_name = {v.name: v for v in values()}
    lines = []
    for name in target_values:
        v = by_name.get(name)
        if v is None:
            raise ValueError(f"unknown target value {name!r}; expected one of the 20 in prompts/values.yaml")
        lines.append(f"- {v.describe()}")
    return "\n".join(lines)


def stepwise_values_section(target_values: Sequence[str] | None) -> str:
    """The stepwise prompts' target-values paragraph; none without a detector (App. G.2)."""
    if target_values is None:
        return ""
    return load_prompt("supporter/stepwise_values.txt").format(target_values=format_target_values(target_values))


def supporter_messages(
    utterances: Sequence[Mapping[str, Any]],
    target_values: Sequence[str] | None,
    reference: str | None,
) -> list[Message]:
    """The prompt for the next supporter turn (also the SFT/DPO prompt): Table 18's, or App. G.2's
    (no target-values section) when `target_values` is None: no detector in the loop."""
    fields = {
        "strategies": strategies_block(),
        "dialogue_history": format_history(utterances),
        "reference": reference.strip() if reference else load_prompt("supporter/no_reference.txt").strip(),
    }
    if target_values is None:
        user = load_prompt("supporter/user_no_values.txt").format(**fields)
    else:
        user = load_prompt("supporter/user.txt").format(target_values=format_target_values(target_values), **fields)
    return [
        {"role": "system", "content": load_prompt("supporter/system.txt").strip()},
        {"role": "user", "content": user},
    ]


# --------------------------------------------------------------------------------------------
# The reply and its parser
# --------------------------------------------------------------------------------------------


class TemplateError(ValueError):
    """A reply that does not follow the template; the message says what is missing."""


@dataclass
class SupporterReply:
    step1: str
    step2: str
    step3: str
    #: the Step-3 decision: did the supporter use the reference response
    reference_used: bool
    #: the Step-4 strategy as written
    strategy_raw: str
    #: one of the 8 taxonomy names, or None when the written strategy names none of them
    strategy: str | None
    response: str
    #: the text the model produced (for stepwise: the assembled template)
    raw: str = ""
    #: 'template' (one reply in the template) or 'stepwise' (fallback, one call per field)
    method: Literal["template", "stepwise"] = "template"
    #: how many replies were asked for (1 = accepted at the first try)
    attempts: int = 1
    problems: list[str] = field(default_factory=list)

    @property
    def steps(self) -> dict[str, str]:
        return {
            "step1": self.step1,
            "step2": self.step2,
            "step3": self.step3,
            "step4": f"Strategy: {self.strategy_raw}\nResponse: {self.response}",
        }

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> SupporterReply:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


_HEADER = re.compile(r"^[ \t>#*_\-]*step[ \t]*([1-4])[ \t]*[.:)\-–]?", re.IGNORECASE | re.MULTILINE)
_FIELD = r"^[ \t>*_\-•]*{name}[ \t*_]*:[ \t*_]*"
_PLACEHOLDER = re.compile(
    r"^\(?(your analysis|the result of your analysis|exactly one strategy name from item 1|"
    r"only the therapist's next utterance, nothing else|begin with .*|yes, then your analysis|"
    r"no, then your analysis)\)?$",
    re.IGNORECASE,
)
_MAX_FIELD = 4000


def _clean(text: str) -> str:
    # markdown emphasis is formatting, not content
    text = text.replace("\r", "").replace("**", "").replace("__", "")
    return re.sub(r"[ \t]+", " ", text).strip().strip("*_").strip()


def _sections(text: str) -> dict[int, str]:
    """Body of each Step header, taking the first header of each step that follows the previous one."""
    found: dict[int, tuple[int, int]] = {}
    last_step, last_end = 0, 0
    for m in _HEADER.finditer(text):
        step = int(m.group(1))
        if step == last_step + 1 and m.start() >= last_end:
            found[step] = (m.start(), m.end())
            last_step, last_end = step, m.end()
    bodies: dict[int, str] = {}
    steps = sorted(found)
    for i, step in enumerate(steps):
        start = found[step][1]
        end = found[steps[i + 1]][0] if i + 1 < len(steps) else len(text)
        # the rest of the header line is the step's title, not its content
        body = text[start:end]
        nl = body.find("\n")
        bodies[step] = body[nl + 1 :] if nl >= 0 else ""
    return bodies


def _field(body: str, name: str) -> str | None:
    """The text after '-Name:' up to the next field or a blank line; None when absent."""
    m = re.search(_FIELD.format(name=name), body, re.IGNORECASE | re.MULTILINE)
    if not m:
        return None
    rest = body[m.end() :]
    nxt = re.search(r"^[ \t>*_\-•]*(reasoning|strategy|response)[ \t*_]*:", rest, re.IGNORECASE | re.MULTILINE)
    if nxt:
        rest = rest[: nxt.start()]
    return rest


def _reasoning(body: str) -> str:
    value = _field(body, "reasoning")
    text = _clean(value if value is not None else body)
    return text


def _check(name: str, text: str) -> str:
    if not text or not re.search(r"[A-Za-z]", text):
        raise TemplateError(f"{name} is empty")
    if _PLACEHOLDER.match(text):
        raise TemplateError(f"{name} still holds the template's placeholder")
    if len(text) > _MAX_FIELD:
        raise TemplateError(f"{name} is longer than {_MAX_FIELD} characters")
    return text


_DECISION = re.compile(r"^[\W_]*(?:(?:decision|answer|use(?: the)? reference(?: response)?)[\W_]*)?(yes|no)\b", re.IGNORECASE)


def _decision(step3: str) -> bool:
    m = _DECISION.match(step3)
    if not m:
        raise TemplateError("Step 3 does not begin with 'Yes' or 'No'")
    return m.group(1).lower() == "yes"


def _response(body: str) -> str:
    value = _field(body, "response")
    if value is None:
        raise TemplateError("Step 4 has no '-Response:' field")
    # the utterance is the first paragraph; anything after a blank line is commentary
    first = re.split(r"\n[ \t]*\n", value.strip(), maxsplit=1)[0]
    text = _clean(" ".join(first.split("\n")))
    text = text.strip().strip('"“”').strip()
    text = re.sub(r"^(therapist|supporter)\s*:\s*", "", text, flags=re.IGNORECASE)
    return _check("the response", text)


def _strategy(body: str) -> tuple[str, str | None]:
    value = _field(body, "strategy")
    if value is None:
        raise TemplateError("Step 4 has no '-Strategy:' field")
    raw = _check("the strategy", _clean(value.strip().split("\n")[0]))
    return raw, canonical_strategy(raw)


def parse_supporter_reply(text: str) -> SupporterReply:
    """All four steps of a reply; raises `TemplateError` naming the first thing missing."""
    if not isinstance(text, str) or not text.strip():
        raise TemplateError("the reply is empty")
    sections = _sections(text.replace("\r", ""))
    for step in (1, 2, 3, 4):
        if step not in sections:
            raise TemplateError(f"'Step {step}' is missing")
    step1 = _check("Step 1", _reasoning(sections[1]))
    step2 = _check("Step 2", _reasoning(sections[2]))
    step3 = _check("Step 3", _reasoning(sections[3]))
    used = _decision(step3)
    raw_strategy, strategy = _strategy(sections[4])
    response = _response(sections[4])
    return SupporterReply(step1, step2, step3, used, raw_strategy, strategy, response, raw=text)


def parse_alternative_reply(text: str, initial: SupporterReply) -> SupporterReply:
    """Steps 3-4 regenerated with the reversed decision; Steps 1-2 are the initial reply's.

    Raises `TemplateError` when Step 3 or 4 is missing or the decision was not reversed.
    """
    if not isinstance(text, str) or not text.strip():
        raise TemplateError("the reply is empty")
    body = text.replace("\r", "")
    # the model may repeat Steps 1-2 or start directly at Step 3: find the first Step 3 header
    m = re.search(r"^[ \t>#*_\-]*step[ \t]*3", body, re.IGNORECASE | re.MULTILINE)
    if not m:
        raise TemplateError("'Step 3' is missing")
    sections = _sections("Step 1.\nx\nStep 2.\nx\n" + body[m.start() :])
    if 3 not in sections or 4 not in sections:
        raise TemplateError("'Step 4' is missing")
    step3 = _check("Step 3", _reasoning(sections[3]))
    used = _decision(step3)
    if used == initial.reference_used:
        want = "No" if initial.reference_used else "Yes"
        raise TemplateError(f"Step 3 must begin with '{want}' (the reversed decision)")
    raw_strategy, strategy = _strategy(sections[4])
    response = _response(sections[4])
    return SupporterReply(initial.step1, initial.step2, step3, used, raw_strategy, strategy, response, raw=text)


def render_reply(reply: SupporterReply) -> str:
    """The reply in the canonical template (the SFT completion; re-parses to the same fields)."""
    return (
        "Step 1. The patient's issues and current state\n"
        f"-Reasoning: {reply.step1}\n"
        "Step 2. Key points of the reference response\n"
        f"-Reasoning: {reply.step2}\n"
        "Step 3. Whether to use the reference response\n"
        f"-Reasoning: {reply.step3}\n"
        "Step 4. The therapist's next strategy and utterance\n"
        f"-Strategy: {reply.strategy_raw}\n"
        f"-Response: {reply.response}"
    )


# --------------------------------------------------------------------------------------------
# The supporter agent
# --------------------------------------------------------------------------------------------


class SupporterFailure(AgentFailure):
    """No reply in the template (or no stepwise response) after the re-asks."""


@dataclass
class SupporterSettings(ReplySettings):
    max_tokens: int = 1024
    #: after the re-asks: 'fail' the turn, or build the reply field by field ('stepwise');
    #: 'stepwise_only' skips the one-call template (for models that never keep it: saves its tokens)
    fallback: Literal["fail", "stepwise", "stepwise_only"] = "fail"
    #: token budget of each stepwise field (reasoning sentences and the one-sentence response)
    stepwise_max_tokens: int = 60
    #: False: the supporter is not shown the detector's values even when the reference generator
    #: is conditioned on them (Table 2's "+ Reference"); its prompt has no target-values section
    sees_target_values: bool = True


def reference_usage(turns: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """(turns that used the reference response, turns that had one) over supporter-turn records
    (a dialogue's ``turns``): the Step-3 decision, counted where there was a reference to use."""
    offered = [t for t in turns if not t.get("failed") and t.get("reference")]
    return sum(bool(t.get("reference_used")) for t in offered), len(offered)


def reference_used_share(dialogues: Iterable[Mapping[str, Any]]) -> float | None:
    """The share of supporter turns that used the reference over dialogue records, or None when no
    turn had one."""
    used = offered = 0
    for d in dialogues:
        u, o = reference_usage(d.get("turns") or [])
        used, offered = used + u, offered + o
    return used / offered if offered else None


def _one_sentence(text: str) -> str:
    text = _clean(text.split("\n\n")[0].replace("\n", " "))
    text = re.sub(r"^(therapist|supporter|response)\s*:\s*", "", text, flags=re.IGNORECASE).strip('"“” ')
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else text


def decision_note(reference: str | None, used: bool) -> str:
    """The stepwise prompts' line on the reference response: build on it, or say something else."""
    if not reference:
        return ""
    if used:
        return f"Build on this reply another therapist gave in a similar situation: {reference}\n"
    return f"Do not build on this reply another therapist gave in a similar situation; say something different: {reference}\n"


class Supporter:
    """The supporter agent over any `ChatModel`. ``calls`` counters name each LLM call it makes."""

    def __init__(self, model: ChatModel, settings: SupporterSettings | None = None):
        self.model = model
        self.settings = settings or SupporterSettings()

    async def _chat(self, messages: list[Message], seed: int, calls: dict[str, int], kind: str, max_tokens: int) -> str:
        calls[kind] = calls.get(kind, 0) + 1
        out = await self.model.achat(messages, n=1, temperature=self.settings.temperature, max_tokens=max_tokens, seed=seed)
        return out[0] if out else ""

    async def _score(self, messages: list[Message], choices: list[str], calls: dict[str, int], kind: str) -> str:
        calls[kind] = calls.get(kind, 0) + 1
        dist = await self.model.ascore_choices(messages, choices)
        return max(choices, key=lambda c: (dist.get(c, 0.0), -choices.index(c)))

    async def respond(
        self,
        utterances: Sequence[Mapping[str, Any]],
        target_values: Sequence[str] | None,
        reference: str | None,
        *,
        seed: int = 0,
        calls: dict[str, int] | None = None,
    ) -> SupporterReply:
        """The next supporter reply; raises `SupporterFailure` when no acceptable reply came."""
        calls = {} if calls is None else calls
        target_values = target_values if self.settings.sees_target_values else None
        if self.settings.fallback == "stepwise_only":
            return await self._stepwise(utterances, target_values, reference, None, seed, calls)
        messages = supporter_messages(utterances, target_values, reference)
        try:
            return await self._template(messages, parse_supporter_reply, seed, calls, "supporter")
        except SupporterFailure as err:
            if self.settings.fallback != "stepwise":
                raise
            reply = await self._stepwise(utterances, target_values, reference, None, seed, calls)
            return replace(reply, attempts=err.attempts + 1, problems=err.problems)

    async def alternative(
        self,
        utterances: Sequence[Mapping[str, Any]],
        target_values: Sequence[str] | None,
        reference: str | None,
        initial: SupporterReply,
        *,
        seed: int = 0,
        calls: dict[str, int] | None = None,
    ) -> SupporterReply:
        """The reply with the Step-3 decision reversed and Steps 3-4 regenerated (App. D.3)."""
        calls = {} if calls is None else calls
        target_values = target_values if self.settings.sees_target_values else None
        if initial.method == "stepwise":
            return await self._stepwise(utterances, target_values, reference, not initial.reference_used, seed, calls)
        previous = "Yes" if initial.reference_used else "No"
        reverse = "No" if initial.reference_used else "Yes"
        messages = supporter_messages(utterances, target_values, reference) + [
            {"role": "assistant", "content": render_reply(initial)},
            {
                "role": "user",
                "content": load_prompt("supporter/alternative.txt").strip().format(previous=previous, reverse=reverse),
            },
        ]
        return await self._template(messages, lambda text: parse_alternative_reply(text, initial), seed, calls, "alternative")

    async def _template(
        self, messages: list[Message], parse: Callable[[str], SupporterReply], seed: int, calls: dict[str, int], kind: str
    ) -> SupporterReply:
        """A reply in the template: one that does not parse is asked again, naming its problem, up
        to `reask` times; then `SupporterFailure` with every try."""
        problems: list[str] = []
        replies: list[str] = []
        for attempt in range(self.settings.reask + 1):
            text = await self._chat(messages, seed + attempt, calls, kind, self.settings.max_tokens)
            replies.append(text)
            try:
                reply = parse(text)
            except TemplateError as err:
                problems.append(str(err))
                messages = messages + [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": load_prompt("supporter/reask.txt").strip().format(problem=err)},
                ]
                continue
            return replace(reply, attempts=attempt + 1, problems=problems)
        what = "supporter reply ignored the template" if kind == "supporter" else "alternative reply failed"
        raise SupporterFailure(f"{what} {len(replies)} times (last: {problems[-1]})", len(replies), replies, problems)

    async def _stepwise(
        self,
        utterances: Sequence[Mapping[str, Any]],
        target_values: Sequence[str] | None,
        reference: str | None,
        forced_decision: bool | None,
        seed: int,
        calls: dict[str, int],
    ) -> SupporterReply:
        """One call per field: free-text steps by generation, the decision and the strategy by
        scoring the allowed answers. The template is enforced by construction; the turn is marked."""
        history = format_history(utterances)
        tv = stepwise_values_section(target_values)
        max_tokens = self.settings.stepwise_max_tokens
        system = {"role": "system", "content": load_prompt("supporter/system.txt").strip()}

        def msgs(name: str, **fields: str) -> list[Message]:
            return [system, {"role": "user", "content": load_prompt(f"supporter/{name}.txt").format(**fields)}]

        step1 = _clean(await self._chat(msgs("stepwise_step1", dialogue_history=history), seed, calls, "stepwise", max_tokens))
        if reference:
            step2 = _clean(await self._chat(msgs("stepwise_step2", reference=reference), seed, calls, "stepwise", max_tokens))
            if forced_decision is None:
                choice = await self._score(
                    msgs("stepwise_decision", dialogue_history=history, reference=reference), ["Yes", "No"], calls, "stepwise"
                )
                used = choice == "Yes"
            else:
                used = forced_decision
        else:
            step2, used = NO_REFERENCE_STEP2, False
        note = decision_note(reference, used)
        strategy = await self._score(
            msgs(
                "stepwise_strategy", strategies=strategies_block(), dialogue_history=history, target_values=tv, decision_note=note
            ),
            strategy_names(),
            calls,
            "stepwise",
        )
        desc = dict(strategies())[strategy]
        response = ""
        for attempt in range(self.settings.reask + 1):
            text = await self._chat(
                msgs(
                    "stepwise_response",
                    dialogue_history=history,
                    target_values=tv,
                    decision_note=note,
                    strategy=strategy,
                    strategy_description=desc,
                ),
                seed + attempt,
                calls,
                "stepwise",
                max_tokens,
            )
            response = _one_sentence(text)
            if re.search(r"[A-Za-z]", response):
                break
        else:
            raise SupporterFailure(
                "stepwise response was empty after every try", self.settings.reask + 1, [response], ["empty response"]
            )
        step3 = ("Yes." if used else "No.") + (" (decided by scoring Yes/No)" if forced_decision is None and reference else "")
        reply = SupporterReply(
            step1=step1 or "(no analysis produced)",
            step2=step2 or "(no analysis produced)",
            step3=step3,
            reference_used=used,
            strategy_raw=strategy,
            strategy=strategy,
            response=response,
            method="stepwise",
        )
        reply.raw = render_reply(reply)
        return reply
