"""Crisis guard for the chat front end: signs of suicidal intent or self-harm get a fixed safe reply.

Every user message of `esvr chat` passes `CrisisGuard.check` before anything else. A message that
matches gets the fixed reply in ``prompts/crisis/reply.txt`` (crisis lines, emergency numbers)
instead of value reinforcement, and the event is logged: to the ``esvr.crisis`` logger and as one
JSON line per event (time, session, category, the id of the rule that matched, message length;
never the message itself).

The rules are regular expressions over a normalized message (lower case, curly quotes straightened,
whitespace collapsed). They cover direct statements ("I want to kill myself"), indirect ones
("I don't want to be here anymore", "everyone would be better off without me", "end it all",
"no reason to live"), method and plan mentions, and self-harm ("I've been cutting myself"). Known
harmless idioms ("this workout is killing me", "I'd kill for a coffee", "dying to see it") are
removed before matching, so they neither trigger the guard nor hide a real sign elsewhere in the
message. It is a conservative keyword screen, not a risk assessment: it errs towards the safe
reply, and it cannot see intent phrased in ways its rules do not cover (docs/supporter.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from esvr.prompts import load_prompt

log = logging.getLogger("esvr.crisis")

CRISIS_PROMPTS = ("crisis/reply.txt",)

_SELF = r"(?:myself|my\s*self)"
_I = r"(?:i|i'm|im|i\s+am|i've|ive|i\s+have|i'll|ill|i\s+will|i'd|id|i\s+would)"

#: (rule id, category, pattern). Ids name the rule in the event log instead of the user's words.
RULES: tuple[tuple[str, str, str], ...] = (
    # direct statements of suicidal intent
    (
        "kill_self",
        "suicide",
        r"\b(?:kill(?:ing|ed)?|hang(?:ing)?|shoot(?:ing)?|off(?:ing)?)\s+(?:myself|my\s*self)\b"
        r"|\b(?:want|wish|need)\s+(?:someone|somebody|something|it)\s+(?:would\s+|to\s+|could\s+)?(?:kill|end)\s+me\b",
    ),
    ("suicide_word", "suicide", r"\bsuicid(?:e|al)\b|\bkms\b|\bunalive\b"),
    ("take_own_life", "suicide", r"\b(?:take|taking|end|ending)\s+(?:my\s+(?:own\s+)?life|it\s+all|everything)\b"),
    (
        "want_to_die",
        "suicide",
        rf"\b{_I}?\s*(?:want|wanna|wish|going|plan(?:ning)?|ready|deserve)\s+(?:to\s+)?die\b|\bwish\s+i\s+(?:was|were)\s+dead\b|\bbetter\s+off\s+dead\b",
    ),
    (
        "not_wake_up",
        "suicide",
        r"\b(?:don't|do\s+not|never)\s+(?:want\s+to\s+)?wake\s+up\b|\bgo\s+to\s+sleep\s+(?:and|&)\s+never\b",
    ),
    # indirect phrasings
    (
        "not_be_here",
        "suicide",
        r"\b(?:don't|do\s+not|doesn't|no\s+longer)\s+want\s+to\s+(?:be\s+here|exist|be\s+alive|live|go\s+on)\b|\bnot\s+(?:want|wanting)\s+to\s+(?:be\s+here|exist|live)\b",
    ),
    (
        "better_off_without",
        "suicide",
        r"\b(?:everyone|everybody|they|people|my\s+\w+|the\s+world|all\s+of\s+them)(?:'d|\s+would|\s+will|'ll)?\s+be\s+better\s+off\s+without\s+me\b|\bbetter\s+off\s+without\s+me\b",
    ),
    (
        "no_reason_to_live",
        "suicide",
        r"\bno\s+(?:reason|point)\s+(?:to|in)\s+(?:live|living|going\s+on|being\s+alive)\b|\bcan't\s+go\s+on\s+(?:living|like\s+this\s+anymore)\b|\bnothing\s+(?:left\s+)?to\s+live\s+for\b",
    ),
    (
        "disappear_forever",
        "suicide",
        r"\b(?:disappear|vanish|be\s+gone)\s+(?:forever|for\s+good|permanently)\b|\bwon't\s+be\s+(?:around|here)\s+(?:much\s+longer|for\s+long|anymore)\b",
    ),
    (
        "goodbye_note",
        "suicide",
        r"\b(?:suicide|goodbye|farewell)\s+(?:note|letter)\b|\bwrote\s+(?:my|a)\s+(?:goodbye|farewell)\b|\bgiving\s+away\s+my\s+(?:things|stuff|belongings)\b",
    ),
    (
        "method",
        "suicide",
        r"\b(?:overdose|od)\s+on\b|\bjump\s+(?:off|from)\s+(?:a|the)\s+(?:bridge|roof|building)\b|\b(?:stockpil|sav)(?:e|ed|ing)\s+(?:up\s+)?(?:my\s+)?(?:pills|meds)\b",
    ),
    # self-harm
    ("self_harm_word", "self_harm", r"\bself[-\s]?harm(?:ing)?\b|\bself[-\s]?injur(?:y|e|ing)\b"),
    (
        "hurt_self",
        "self_harm",
        rf"\b(?:hurt(?:ing)?|cut(?:ting)?|burn(?:ing)?|harm(?:ing)?|punish(?:ing)?|starv(?:e|ing))\s+{_SELF}\b",
    ),
    (
        "cutting",
        "self_harm",
        r"\b(?:started|been|keep|still)\s+cutting\s+(?:again|myself)?\b|\bcut\s+my\s+(?:wrists?|arms?|legs?|skin)\b|\brelapsed?\s+(?:on|into)\s+(?:cutting|self[-\s]?harm)\b",
    ),
)

#: harmless idioms removed before matching ('I'd kill for', 'killing me' about things, 'dying to')
IDIOMS: tuple[str, ...] = (
    r"\b(?:i'd|i\s+would|id)\s+kill\s+for\b",
    r"\b(?:this|that|it|the|these|those|my|your|his|her|our)(?:\s+\w+){0,2}\s+(?:is|are|was|were)\s+(?:literally\s+|really\s+|just\s+)?killing\s+me\b",
    r"\bkilling\s+me\s+(?:softly|with\s+kindness)\b",
    r"\b(?:you're|you\s+are|that's|that\s+is|he's|she's)\s+killing\s+me\b",
    r"\b(?:dying|die)\s+(?:to|for)\s+(?:see|try|know|hear|go|get|a\b)",
    r"\b(?:laughed|laughing|died\s+laughing)\b",
    r"\bkill\s+(?:time|the\s+lights|it\s+(?:at|on)\b)",
    r"\bcut\s+myself\s+(?:some|a\s+break|a\s+slice|off\s+from)\b",
    r"\bbeat\s+myself\s+up\b",
)

_RULES = tuple((rid, cat, re.compile(p)) for rid, cat, p in RULES)
_IDIOMS = tuple(re.compile(p) for p in IDIOMS)


def normalize(text: str) -> str:
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class CrisisCheck:
    flagged: bool
    category: str | None = None
    rule: str | None = None


def check_message(text: str) -> CrisisCheck:
    """Whether a message shows signs of suicidal intent or self-harm, and which rule saw them."""
    norm = normalize(text)
    for idiom in _IDIOMS:
        norm = idiom.sub(" ", norm)
    for rid, cat, pattern in _RULES:
        if pattern.search(norm):
            return CrisisCheck(True, cat, rid)
    return CrisisCheck(False)


def safe_reply() -> str:
    return load_prompt("crisis/reply.txt").strip()


class CrisisGuard:
    """`check_message` plus event logging. ``log_path``: the JSONL event file (None: logger only)."""

    def __init__(self, log_path: str | os.PathLike[str] | None = None, session: str | None = None):
        self.log_path = Path(log_path) if log_path else None
        self.session = session or time.strftime("%Y%m%dT%H%M%S")
        self.events = 0
        self._lock = threading.Lock()

    def check(self, text: str, turn: int | None = None) -> CrisisCheck:
        result = check_message(text)
        if result.flagged:
            self._log(result, turn, len(text))
        return result

    def reply(self) -> str:
        return safe_reply()

    def _log(self, result: CrisisCheck, turn: int | None, length: int) -> None:
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "session": self.session,
            "turn": turn,
            "category": result.category,
            "rule": result.rule,
            "message_chars": length,
            "action": "safe_reply",
        }
        log.warning(
            "crisis guard: %s sign (rule %s) in session %s, turn %s; safe reply sent",
            result.category,
            result.rule,
            self.session,
            turn,
        )
        with self._lock:
            self.events += 1
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(event) + "\n")
