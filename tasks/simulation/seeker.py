"""The seeker simulator (paper §5.4, App. E.3, Table 28).

A persona-conditioned system prompt with a one-shot example dialogue; the conversation opens with
the supporter's fixed greeting and the persona's situation as the seeker's first utterance. The
seeker answers with one sentence per turn and says '[END]' when satisfied. In the seeker's
messages the supporter speaks as ``user`` and the seeker as ``assistant``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from esvr.models.chat import ChatModel, Message
from esvr.prompts import load_prompt
from esvr.tasks.simulation.replies import AgentFailure, ReplySettings

SEEKER_PROMPTS = ("seeker/system.txt", "seeker/opening.txt", "seeker/example.txt", "seeker/reask.txt")

END_TOKEN = "[END]"
_END = re.compile(r"\[\s*end\s*\]", re.IGNORECASE)
# a reply that runs on into the therapist's next line (small models continue the transcript)
_NEXT_SPEAKER = re.compile(r"\n\s*(therapist|supporter|counselor)\s*:", re.IGNORECASE)


def seeker_system_prompt(persona: Mapping[str, Any], one_shot: bool = True) -> str:
    """Table 28's system prompt with the persona's whole situation (every sentence of it: an
    imported role card's description runs to several); zero-shot drops the example paragraph, a
    persona without a situation drops its line."""
    no_example, no_situation = "\x00EXAMPLE\x00", "\x00SITUATION\x00"
    situation = " ".join(str(persona.get("situation") or "").split())
    text = (
        load_prompt("seeker/system.txt")
        .strip()
        .format(
            problem=persona.get("problem") or "an emotional difficulty",
            emotion=str(persona.get("emotion") or "distress").lower(),
            age=persona.get("age") or "unspecified",
            gender=persona.get("gender") or "unspecified",
            occupation=persona.get("occupation") or "unspecified",
            situation=situation or no_situation,
            example=load_prompt("seeker/example.txt").strip() if one_shot else no_example,
        )
    )
    text = "\n\n".join(p for p in text.split("\n\n") if no_example not in p)
    return "\n".join(line for line in text.split("\n") if no_situation not in line)


def opening_line() -> str:
    return load_prompt("seeker/opening.txt").strip()


def seeker_messages(persona: Mapping[str, Any], utterances: Sequence[Mapping[str, Any]]) -> list[Message]:
    """The seeker's view of the dialogue; ``utterances[0]`` is the persona's situation."""
    if not utterances or utterances[0].get("role") != "seeker":
        raise ValueError("a dialogue starts with the seeker's situation (utterances[0] must have role 'seeker')")
    messages: list[Message] = [
        {"role": "system", "content": seeker_system_prompt(persona)},
        {"role": "user", "content": opening_line()},
    ]
    for u in utterances:
        messages.append({"role": "assistant" if u["role"] == "seeker" else "user", "content": u["text"]})
    return messages


@dataclass
class SeekerReply:
    text: str
    ended: bool
    raw: str
    #: the reply held more than one sentence and was cut to the first
    truncated: bool = False


def clean_seeker_reply(raw: str) -> SeekerReply:
    """One sentence and whether the seeker ended the session.

    '[END]' anywhere ends the dialogue; text before it (usually the thanks) is kept. A reply that
    continues into the therapist's part is cut there; more than one sentence is cut to the first
    (the prompt asks for one), and the cut is recorded.
    """
    text = raw.replace("\r", "")
    m = _NEXT_SPEAKER.search(text)
    if m:
        text = text[: m.start()]
    ended = bool(_END.search(text))
    text = _END.sub(" ", text)
    text = " ".join(text.split())
    text = re.sub(r"^(patient|seeker|client)\s*:\s*", "", text, flags=re.IGNORECASE).strip().strip('"“”').strip()
    sentences = re.findall(r".+?(?:[.!?]+(?=\s|$)|$)", text)
    sentences = [s.strip() for s in sentences if s.strip()]
    truncated = len(sentences) > 1
    first = sentences[0] if sentences else ""
    return SeekerReply(text=first, ended=ended, raw=raw, truncated=truncated)


class SeekerFailure(AgentFailure):
    """The seeker gave no utterance after the re-asks."""


@dataclass
class SeekerSettings(ReplySettings):
    """The seeker's: the shared defaults (a seeker's utterance is short)."""


class Seeker:
    def __init__(self, model: ChatModel, settings: SeekerSettings | None = None):
        self.model = model
        self.settings = settings or SeekerSettings()

    async def reply(
        self,
        persona: Mapping[str, Any],
        utterances: Sequence[Mapping[str, Any]],
        *,
        seed: int = 0,
        calls: dict[str, int] | None = None,
    ) -> SeekerReply:
        calls = {} if calls is None else calls
        messages = seeker_messages(persona, utterances)
        replies = []
        for attempt in range(self.settings.reask + 1):
            calls["seeker"] = calls.get("seeker", 0) + 1
            out = await self.model.achat(
                messages, n=1, temperature=self.settings.temperature, max_tokens=self.settings.max_tokens, seed=seed + attempt
            )
            raw = out[0] if out else ""
            replies.append(raw)
            reply = clean_seeker_reply(raw)
            if reply.ended or re.search(r"[A-Za-z]", reply.text):
                return reply
            messages = messages + [
                {"role": "assistant", "content": raw},
                {"role": "user", "content": load_prompt("seeker/reask.txt").strip()},
            ]
        raise SeekerFailure(f"seeker produced no utterance in {len(replies)} tries", len(replies), replies)
