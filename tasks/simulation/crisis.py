"""Crisis guard for the chat front end: signs of suicidal intent or self-harm get a fixed safe reply.

Every user message of `esvr chat` passes `CrisisGuard.check` before anything else. A message that
matches gets the fixed reply in ``prompts/crisis/reply.txt`` (crisis lines, emergency numbers)
instead of value reinforcement, and the event is logged: to the ``esvr.crisis`` logger and as one
JSON line per event (time, session, category, the id of the rule that matched, message length;
never the message itself).

The rules are regular expressions over a normalized message (`normalize`): Unicode folded (NFKC,
accents and zero-width characters dropped), lower case, apostrophes dropped and contractions and
chat spellings written out ("dont" and "don't" -> "do not", "wanna" -> "want to", "rn" -> "right
now"), symbols and digits inside words read as letters ("k1ll", "$uicide", "d!e"), spaced or
hyphenated letters joined ("k i l l", "s-u-i-c-i-d-e"), and stretched letters shortened ("dieeee").
They cover direct statements, indirect ones and euphemisms ("end it", "I can't do this anymore",
"everyone would be better off without me"), acts already done ("I took all my pills"), plans and
means with a time ("I'm going to end it tonight", "the rope is ready"), and self-harm.

A message is judged with the recent turns of the session: after a sign ("I have been saving up my
pills for weeks"), a follow-up that names no risk by itself ("Tonight I'm going to take them all",
"I'll do it tomorrow") gets the safe reply too, and so does "I'm going to take all of them" after
a mention of pills, or "I'm going to use it" after one of a gun or a rope.

Known harmless idioms ("this exam is killing me", "I'd kill for a coffee", "dying to see it", "cut
myself some slack", "end it with my boyfriend") are removed before matching, so they neither
trigger the guard nor hide a real sign elsewhere in the message. It is a conservative keyword
screen, not a risk assessment: it errs towards the safe reply, and it cannot see intent phrased in
ways its rules do not cover. `CrisisGuard` can add a chat model's second pass over what the rules
let through (``judge``; never removing a sign they found). Its recall and false alarms on a
labelled set of phrasings:
``python -m esvr.tasks.simulation.crisis tests/fixtures/crisis_phrasings.jsonl`` (docs/supporter.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import threading
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from esvr.models.chat import ChatError, ChatModel
from esvr.models.text import normalize_text
from esvr.prompts import load_prompt

log = logging.getLogger("esvr.crisis")

CRISIS_PROMPTS = ("crisis/reply.txt", "crisis/judge.txt")

#: how many earlier user messages of the session a message is judged with
RECENT_TURNS = 5

# --------------------------------------------------------------------------------------------
# normalization
# --------------------------------------------------------------------------------------------

#: chat spellings and contractions (apostrophes already dropped) -> the words the rules are written in
_WORDS = {
    "dont": "do not",
    "doesnt": "does not",
    "didnt": "did not",
    "cant": "can not",
    "cannot": "can not",
    "couldnt": "could not",
    "wont": "will not",
    "wouldnt": "would not",
    "isnt": "is not",
    "aint": "is not",
    "im": "i am",
    "ive": "i have",
    "id": "i would",
    "iam": "i am",
    "imma": "i am going to",
    "wanna": "want to",
    "wana": "want to",
    "gonna": "going to",
    "gona": "going to",
    "gotta": "got to",
    "tryna": "trying to",
    "hafta": "have to",
    "u": "you",
    "ur": "your",
    "youre": "you are",
    "r": "are",
    "rn": "right now",
    "tn": "tonight",
    "tonite": "tonight",
    "2nite": "tonight",
    "2night": "tonight",
    "tmrw": "tomorrow",
    "tmr": "tomorrow",
    "tomoro": "tomorrow",
    "2moro": "tomorrow",
    "cuz": "because",
    "bc": "because",
    "ppl": "people",
    "every1": "everyone",
    "some1": "someone",
    "no1": "no one",
    "thats": "that is",
    "theres": "there is",
    "its": "it is",
    "tonights": "tonight is",
    "everyones": "everyone is",
    "whats": "what is",
    "mself": "myself",
    "meself": "myself",
    "myslef": "myself",
    "anymore": "any more",
    "anylonger": "any longer",
    "ded": "dead",
    "od": "overdose",
    "oded": "overdosed",
    "kys": "kill yourself",
    # fillers that sit inside the phrases the rules look for
    "just": "",
    "really": "",
    "rly": "",
    "honestly": "",
    "literally": "",
    "kinda": "",
    "sorta": "",
    "lowkey": "",
    "tbh": "",
    "ngl": "",
    "actually": "",
    "seriously": "",
    "truly": "",
    "fucking": "",
    "fking": "",
    "freaking": "",
    "so": "",
    "simply": "",
    "totally": "",
    "genuinely": "",
}
# "ill" is also "sick": read as "i will" only where a verb follows
_ILL = re.compile(
    r"ill (?=(?:be|do|take|kill|end|jump|go|never|finally|probably|use|make|try|off|hang|cut|overdose|swallow|not))"
)
_LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i", "|": "l", "+": "t"}
# a symbol or digit between letters, or a symbol opening a word ("k1ll", "d!e", "$uicide")
_LEET_RE = re.compile(r"(?<=[a-z])[0134573@$!|+](?=[a-z])|(?<![a-z0-9])[@$](?=[a-z])")
# single letters joined by spaces or marks: "k i l l", "s-u-i-c-i-d-e", "d.i.e"
_SPACED = re.compile(r"(?<![a-z])[a-z](?:[ .\-_*~]{1,2}[a-z](?![a-z])){2,}")
_SENTENCE = re.compile(r"[.!?;:,\n]+")


def _fold(text: str) -> str:
    # the labelers' canonical form first (entities, NFKC, ASCII apostrophes, zero-width characters)
    text = normalize_text(text)
    # then any other invisible format character, and accents ("kíll" -> "kill")
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return text.lower()


def normalize(text: str) -> str:
    """The message in the form the rules are written for (see the module docstring)."""
    text = _fold(text).replace("`", "'")  # an ASCII text skips normalize_text's table
    text = re.sub(r"\bod'd\b", "overdosed", text)
    text = re.sub(r"(?<=[a-z])'(?=[a-z])", "", text)  # don't -> dont, i'm -> im
    text = _LEET_RE.sub(lambda m: _LEET[m.group(0)], text)
    text = _SPACED.sub(lambda m: re.sub(r"[^a-z]", "", m.group(0)), text)
    text = re.sub(r"([a-z])\1{2,}", r"\1", text)  # dieeee -> die, sooo -> so
    text = _SENTENCE.sub(" . ", text)
    text = re.sub(r"[^a-z0-9. ]+", " ", text)
    words = [_WORDS.get(w, w) for w in text.split()]
    text = " ".join(w for w in words if w)
    return _ILL.sub("i will ", text)


# --------------------------------------------------------------------------------------------
# rules (written over `normalize`'s output: no apostrophes, "do not", "i am", "want to")
# --------------------------------------------------------------------------------------------

_SELF = r"(?:myself|my self)"
_TIME = (
    r"(?:tonight|today|tomorrow|right now|now|soon|this (?:weekend|week|evening|morning|afternoon|night)"
    r"|on (?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)|before (?:morning|dawn|sunrise))"
)
_PILLS = (
    r"(?:\w+ )?(?:pills|meds|medication|medications|medicine|tablets|tylenol|paracetamol|acetaminophen|ibuprofen"
    r"|advil|aspirin|painkillers|xanax|antidepressants|insulin|sleeping pills)"
)
_MANY = r"(?:all|all of|a whole bottle of|the whole bottle(?: of)?|a bottle of|a handful of|too many|a bunch of|lots of|loads of|\d{2,}|every one of)\b"

#: (rule id, category, pattern). Ids name the rule in the event log instead of the user's words.
RULES: tuple[tuple[str, str, str], ...] = (
    # direct statements of suicidal intent
    (
        "kill_self",
        "suicide",
        rf"\b(?:kil+|kil+s|kil+ing|kil+ed|hang|hanging|hanged|shoot|shooting|off|offing|drown|drowning|unalive|end|ending)\s*{_SELF}\b"
        r"|\b(?:want|wish|need)\s+(?:someone|somebody|something|it)\s+(?:would\s+|to\s+|could\s+)?(?:kill|end)\s+me\b",
    ),
    ("suicide_word", "suicide", r"\bsuicid(?:e|al)\b|\bkms\b|\bunaliv(?:e|ing)\b|\bctb\b"),
    (
        "take_own_life",
        "suicide",
        r"\b(?:take|taking|took|end|ending|ended)\s+my\s+(?:own\s+)?life\b"
        r"|\b(?:end|ending)\s+(?:it|it all|everything|things|this)\b|\b(?:finish|finishing)\s+(?:it all|everything|myself|my life)\b",
    ),
    (
        "want_to_die",
        "suicide",
        r"\b(?:want|wants|wanted|wanting|wish|wishes|going|plan|planning|ready|deserve|prefer|trying|try|about)\s+to\s+(?:die|be dead)\b"
        r"|\bwish\s+i\s+(?:was|were|had been)\s+(?:dead|killed|never born)\b|\bwish\s+i\s+had\s+died\b|\bbetter\s+off\s+dead\b|\blet me die\b|\bwant death\b",
    ),
    (
        "not_wake_up",
        "suicide",
        r"\b(?:do not|never|not)\s+(?:want\s+to\s+)?wake\s+up\b|\bsleep\s+and\s+never\s+wake\b|\b(?:go to )?sleep forever\b",
    ),
    # indirect phrasings and euphemisms
    (
        "not_be_here",
        "suicide",
        r"\b(?:do not|does not|no longer|not)\s+(?:want|wanting|wish)\s+to\s+(?:be here|be alive|exist|live|go on|keep going|keep living|be around)\b"
        r"|\bwant to (?:stop|quit) (?:existing|living|breathing)\b|\bwant to not (?:exist|be here|be alive|wake up)\b",
    ),
    (
        "better_off_without",
        "suicide",
        r"\bbetter\s+off\s+without\s+me\b"
        r"|\b(?:happier|better|easier)\s+(?:if|when|once)\s+i\s+(?:was|were|am|is)\s+(?:gone|dead|not here|not around|never born)\b"
        r"|\b(?:nobody|no one)\s+would\s+(?:miss|notice|care)\s+if\s+i\s+(?:died|was gone|were gone|disappeared|killed)\b",
    ),
    (
        "no_reason_to_live",
        "suicide",
        r"\bno\s+(?:reason|point)\s+(?:to|in|of)\s+(?:live|living|going on|being alive|life|keep going|keep living|existing|it all|any of this)\b"
        r"|\bcan not\s+go\s+on\s+(?:living|like this|any more|any longer)\b|\bnothing\s+(?:left\s+)?(?:for me\s+)?to\s+live\s+for\b"
        r"|\b(?:can not|can no longer|do not think i can)\s+(?:keep|go on)\s+(?:living|going)\b(?!\s+to\b)"
        r"|\b(?:tired|sick|weary)\s+of\s+(?:being alive|living|life|existing)\b"
        r"|\bsee (?:the|any) point (?:in|of) (?:living|life|going on|being alive)\b"
        r"|\bdone (?:with )?(?:living|life)\b|\bdone with (?:everything|it all)\b|\bgive up on (?:life|living)\b",
    ),
    (
        "cannot_anymore",
        "suicide",
        r"\bcan not (?:do|take|handle|bear|stand|live) (?:this|it|life|this life)\s+(?:any more|any longer)\b",
    ),
    (
        "want_it_to_end",
        "suicide",
        r"\bwant (?:it all|everything|all of it|my life|all this) to (?:end|stop|be over)\b"
        r"|\bwant (?:it|this|the pain) to (?:end|stop|be over) (?:for good|forever|permanently)\b",
    ),
    (
        "disappear_forever",
        "suicide",
        r"\b(?:disappear|vanish|be gone|go away)\s+(?:forever|for good|permanently)\b"
        r"|\b(?:will not|not)\s+be\s+(?:around|here|a burden|a problem)\s+(?:much longer|for long|any more|any longer|after tonight)\b"
        r"|\bwill not be (?:a burden|a problem) (?:to|for) (?:anyone|anybody|everyone)\b"
        r"|\b(?:i will|i am going to|i will be|be) gone (?:by|before) (?:tomorrow|morning|tonight|the morning|the weekend|monday|sunday)\b"
        r"|\bcheck(?:ing)? out (?:for good|permanently|of (?:life|this world))\b|\bleave this world\b"
        r"|\b(?:my )?last (?:night|day|week|weekend) (?:alive|on earth|on this earth|here)\b|\blast (?:night|day) of my life\b",
    ),
    (
        "goodbye_note",
        "suicide",
        r"\b(?:suicide|goodbye|farewell)\s+(?:note|notes|letter|letters)\b|\bwr(?:ote|itten|iting)\s+(?:my|a)\s+(?:goodbye|farewell|last)\b"
        r"|\bgiving\s+away\s+(?:all\s+)?my\s+(?:things|stuff|belongings|possessions)\b|\bthis is (?:my )?goodbye\b"
        r"|\b(?:notes|letters)\b[^.]{0,40}\b(?:picked|chose|set)\s+(?:a|the)\s+(?:date|day)\b",
    ),
    (
        "method",
        "suicide",
        r"\boverdose\s+on\b"
        r"|\bjump\s+(?:off|from|in front of)\s+(?:a|the|my)\s+(?:\w+\s+)?(?:bridge|roof|building|cliff|balcony|ledge|tower|window|train|car|bus)\b"
        r"|\b(?:step|throw myself|walk)\s+(?:in front of|under)\s+(?:a|the)\s+(?:train|bus|truck|car)\b"
        rf"|\b(?:stockpil|sav|collect|hoard|stash)(?:e|ed|es|ing)\s+(?:up\s+)?(?:my\s+|the\s+)?{_PILLS}\b"
        r"|\b(?:rope|noose)\s+(?:is\s+)?(?:ready|tied|set up|up)\b|\b(?:tied|bought|got|made)\s+(?:a|the|my)\s+noose\b",
    ),
    (
        "act_done",
        "suicide",
        rf"\b(?:took|taken|swallowed|downed)\s+(?:like\s+|about\s+|around\s+|over\s+)?{_MANY}\s+(?:of\s+)?(?:my\s+|the\s+|those\s+|these\s+)?{_PILLS}\b"
        r"|\b(?:took|taken|swallowed|downed|drank|drunk)\s+(?:a|the)\s+whole\s+bottle\b"
        r"|\b(?:i|i have|i had|already)\s+overdosed\b|\btook\s+an\s+overdose\b|\boverdosed\s+(?:on|an hour|last|this)\b"
        r"|\bdr(?:ank|unk)\s+(?:some\s+)?(?:bleach|antifreeze|poison|drain cleaner|pesticide)\b"
        r"|\b(?:cut|slit|slashed|sliced)\s+my\s+(?:wrists?|throat)\b",
    ),
    (
        "plan_time",
        "suicide",
        rf"\b(?:decided to|about to|ready to)\s+(?:do it|go through with it)\s+(?:{_TIME}|after)\b"
        rf"|\b(?:tonight|tomorrow) is the (?:night|day)\b|\bhave (?:a|the) plan\b[^.]{{0,40}}\b(?:do it|go through with it)\b"
        rf"|\b(?:have|got)\s+(?:the|my|enough)\s+{_PILLS}\b[^.]{{0,40}}\b(?:take|swallow)\s+(?:them all|all of them)\b"
        rf"|\b(?:going to|will|about to|plan to|planning to)\s+(?:take|swallow)\s+(?:all|every one of|the whole bottle of)\s+(?:of\s+)?(?:my\s+|the\s+)?{_PILLS}\b",
    ),
    # self-harm
    ("self_harm_word", "self_harm", r"\bself\s?(?:harm|harming|harmed|injury|injure|injuring|injured|mutilation)\b"),
    (
        "hurt_self",
        "self_harm",
        rf"\b(?:hurt|hurting|cut|cutting|burn|burned|burnt|burning|harm|harming|punish|punishing|starve|starving"
        rf"|scratch|scratching|scratched|hit|hitting|punch|punching|punched|bruise|bruising|bite|biting)\s*{_SELF}\b",
    ),
    (
        "cutting",
        "self_harm",
        r"\b(?:started|been|keep|still|go back to)\s+cutting\s+(?:again|myself)?\b|\bcut\s+my\s+(?:arms?|legs?|skin|thighs?)\b"
        r"|\brelapsed?\s+(?:on|into|with)\s+(?:cutting|self\s?harm)\b",
    ),
)

#: harmless idioms removed before matching ("i would kill for", "killing me" about things, "dying to")
IDIOMS: tuple[str, ...] = (
    r"\b(?:i would|i)\s+kill\s+for\b",
    r"\b(?:this|that|it|the|these|those|my|your|his|her|our)(?:\s+\w+){0,2}\s+(?:is|are|was|were|will be|is going to be)\s+(?:killing me|the death of me)\b",
    r"\b(?:it is|that is|this is)\s+killing me\b",
    r"\bkilling\s+me\s+(?:softly|with\s+kindness)\b",
    r"\b(?:you are|that is|he is|she is|they are)\s+killing\s+me\b",
    r"\b(?:will|going to|would)\s+kill\s+me\s+if\b",
    r"\b(?:dying|die)\s+(?:to|for)\s+(?:see|try|know|hear|go|get|meet|watch|read|a\b)",
    r"\b(?:die|died|dying|dead)\s+(?:of|from|with)\s+(?:laughter|laughing|embarrassment|boredom|shame|cuteness|envy|jealousy|curiosity)\b",
    r"\b(?:laughed|laughing|died laughing)\b|\bto die for\b|\b(?:bored|scared|sick|worried|frightened)\s+to\s+death\b",
    r"\brather\s+die\s+than\b|\bdead\s+tired\b|\b(?:phone|battery|laptop|plant|plants|car)\s+(?:is|are)\s+dying\b",
    r"\bkill\s+(?:time|the\s+lights|it\s+(?:at|on)\b)|\bkilled\s+it\b|\bkill\s+(?:this|that|the)\s+(?:presentation|exam|test|interview|game|workout)\b",
    r"\bcut\s+myself\s+(?:some|a\s+break|a\s+slice|off\s+from)\b|\bbeat\s+myself\s+up\b|\bshot\s+myself\s+in\s+the\s+foot\b",
    r"\b(?:cut|burned|burnt|hurt|hit|scratched|bumped)\s+myself\s+(?:shaving|cooking|on\s+(?:the|a|my)|at\s+(?:the|work|gym)|by accident|accidentally|while|when|playing|lifting|running|in the kitchen)\b",
    r"\bsuicide\s+(?:squad|squeeze|sprints?|drills?|doors?|runs?|mission)\b",
    r"\b(?:end|ending|ended)\s+(?:it|things)\s+(?:with|between)\b|\bend\s+it\s+(?:here|there)\b",
    r"\bdo not want to wake up (?:early|at|before|so early|for)\b",
    r"\bembarrass\w*\b[^.]{0,30}\b(?:want to|could|going to|wanted to) die\b",
    r"\boverdos(?:e|ed|ing)\s+on\s+(?:coffee|caffeine|sugar|chocolate|candy|netflix|tv|work|news|social media)\b",
)

# a follow-up that is a sign only after one: acts, plans and means that refer back ("take them all")
_FOLLOW_UP = re.compile(
    # "I'll take them all", "I am going to do it": the person's own act, not "you can do it"
    r"\b(?:i|to|will|gonna)\b[^.]{0,24}\b(?:take|swallow|use|do|try)\s+(?:them|it|those|all of them|them all|all|the lot|the pills|my pills)\b"
    r"|\bgo through with it\b|\b(?:tonight|tomorrow|today|now)\s+is\s+the\s+(?:night|day|time)\b"
    r"|\bwr(?:ote|itten|iting)\s+(?:the|my|all the|all my)\s+(?:letters?|notes?)\b|\bhave enough\b|\bmade up my mind\b"
    r"|\bgoodbye\b|\bit will (?:all )?be over\b|\b(?:no one|nobody|nothing) (?:can|will) stop me\b|\bready to go\b"
)
# means of suicide named earlier in the session, and the follow-ups that refer to them
_PILL_MEANS = re.compile(rf"\b{_PILLS}\b")
_PILL_FOLLOW_UP = re.compile(
    r"\b(?:take|swallow)\s+(?:them all|all of them|all|every one|the whole (?:bottle|lot))\b|\bhave enough\b"
)
_OTHER_MEANS = re.compile(r"\b(?:gun|pistol|rifle|firearm|rope|noose|bleach|poison|razor|razors|blades?)\b")
_USE_IT = re.compile(r"\buse\s+(?:it|them|that|this)\b")

_RULES = tuple((rid, cat, re.compile(p)) for rid, cat, p in RULES)
_IDIOMS = tuple(re.compile(p) for p in IDIOMS)


@dataclass(frozen=True)
class CrisisCheck:
    flagged: bool
    category: str | None = None
    rule: str | None = None


def _without_idioms(text: str) -> str:
    norm = normalize(text)
    for idiom in _IDIOMS:
        norm = idiom.sub(" ", norm)
    return norm


def _alone(norm: str) -> CrisisCheck:
    for rid, cat, pattern in _RULES:
        if pattern.search(norm):
            return CrisisCheck(True, cat, rid)
    return CrisisCheck(False)


def check_message(text: str, recent: Sequence[str] = ()) -> CrisisCheck:
    """Whether a message shows signs of suicidal intent or self-harm, and which rule saw them.

    ``recent``: the session's earlier user messages, oldest first (the last `RECENT_TURNS` count).
    """
    norm = _without_idioms(text)
    alone = _alone(norm)
    if alone.flagged or not recent:
        return alone
    earlier = [_without_idioms(t) for t in list(recent)[-RECENT_TURNS:]]
    if _FOLLOW_UP.search(norm) and any(_alone(e).flagged for e in earlier):
        return CrisisCheck(True, "suicide", "follow_up_after_sign")
    if _PILL_FOLLOW_UP.search(norm) and any(_PILL_MEANS.search(e) for e in earlier):
        return CrisisCheck(True, "suicide", "follow_up_on_means")
    if _USE_IT.search(norm) and any(_OTHER_MEANS.search(e) for e in earlier):
        return CrisisCheck(True, "suicide", "follow_up_on_means")
    return alone


def safe_reply() -> str:
    return load_prompt("crisis/reply.txt").strip()


#: the judge's answers: a category, or none
JUDGE_CHOICES = ("suicide", "self_harm", "none")


def judge_messages(text: str, recent: Sequence[str] = ()) -> list[dict[str, str]]:
    earlier = "\n".join(f"- {t.strip()}" for t in list(recent)[-RECENT_TURNS:]) or "(none)"
    return [{"role": "user", "content": load_prompt("crisis/judge.txt").format(recent=earlier, message=text.strip())}]


def judge_check(judge: ChatModel, text: str, recent: Sequence[str] = (), threshold: float = 0.5) -> CrisisCheck:
    """The chat model's reading: a sign when it puts at least `threshold` on suicide or self-harm."""
    dist = judge.score_choices(judge_messages(text, recent), list(JUDGE_CHOICES))
    risk = {c: dist.get(c, 0.0) for c in JUDGE_CHOICES[:2]}
    if sum(risk.values()) < threshold:
        return CrisisCheck(False)
    return CrisisCheck(True, max(risk, key=lambda c: risk[c]), "llm_judge")


class CrisisGuard:
    """`check_message` plus event logging. ``log_path``: the JSONL event file (None: logger only).

    ``judge``: a chat model asked about every message the rules let through (a second pass that
    can add a sign, never remove one); it costs one scored call per such message. When it fails,
    the rules' answer stands and a warning says so.
    """

    def __init__(
        self,
        log_path: str | os.PathLike[str] | None = None,
        session: str | None = None,
        judge: ChatModel | None = None,
        judge_threshold: float = 0.5,
    ):
        self.log_path = Path(log_path) if log_path else None
        self.session = session or time.strftime("%Y%m%dT%H%M%S")
        self.judge = judge
        self.judge_threshold = judge_threshold
        self.events = 0
        self._lock = threading.Lock()

    def check(self, text: str, turn: int | None = None, recent: Sequence[str] = ()) -> CrisisCheck:
        """`check_message` with the session's earlier user messages, then the judge; a sign is logged."""
        result = check_message(text, recent)
        if not result.flagged and self.judge is not None:
            try:
                result = judge_check(self.judge, text, recent, self.judge_threshold)
            except ChatError as exc:
                log.warning("crisis guard: the judge failed (%s); the rules found no sign", exc)
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


# --------------------------------------------------------------------------------------------
# recall and false alarms on a labelled set of phrasings
# --------------------------------------------------------------------------------------------


def score_phrasings(rows: Iterable[dict]) -> list[dict]:
    """Per kind of phrasing: how many, how many the guard flags (rows: text, label, kind, [recent])."""
    kinds: dict[tuple[int, str], dict] = {}
    for row in rows:
        label = int(row["label"])
        entry = kinds.setdefault((label, row["kind"]), {"kind": row["kind"], "label": label, "n": 0, "flagged": 0})
        entry["n"] += 1
        entry["flagged"] += check_message(row["text"], row.get("recent", ())).flagged
    return sorted(kinds.values(), key=lambda e: (-e["label"], e["kind"]))


def phrasings_table(scores: list[dict]) -> str:
    """The markdown table docs/supporter.md shows: recall on risk, false alarms on the rest."""
    lines = ["| kind | label | phrasings | flagged | rate |", "|---|---|---|---|---|"]

    def row(kind: str, label: str, n: int, flagged: int) -> str:
        return f"| {kind} | {label} | {n} | {flagged} | {flagged / n:.0%} |"

    for label, name, total in ((1, "risk", "**recall**"), (0, "no risk", "**false alarms**")):
        part = [e for e in scores if e["label"] == label]
        lines += [row(e["kind"], name, e["n"], e["flagged"]) for e in part]
        lines.append(row(total, name, sum(e["n"] for e in part), sum(e["flagged"] for e in part)))
    return "\n".join(lines)


def scan_conversations(dialogues: Iterable[dict]) -> tuple[int, list[tuple[int, str, str]]]:
    """ESConv-schema conversations read as the chat reads them: (seeker messages, [(conversation,
    rule, message) flagged]). For unlabelled text: every flag is to be read by hand."""
    seen, flagged = 0, []
    for i, dialogue in enumerate(dialogues):
        recent: list[str] = []
        for turn in dialogue.get("dialog", []):
            if turn.get("speaker") not in {"seeker", "speaker", "usr"}:
                continue
            seen += 1
            result = check_message(turn["content"], recent)
            if result.flagged:
                flagged.append((i, result.rule or "", turn["content"].strip()))
            recent.append(turn["content"])
    return seen, flagged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The crisis guard's recall and false alarms on a labelled JSONL set.")
    parser.add_argument("phrasings", type=Path, help="JSONL: text, label (1 risk, 0 none), kind, optional recent")
    parser.add_argument("--misses", action="store_true", help="also list the phrasings the guard gets wrong")
    parser.add_argument("--esconv", action="store_true", help="the file is ESConv JSON: list what the guard flags")
    args = parser.parse_args(argv)
    try:
        text = args.phrasings.read_text(encoding="utf-8")
        rows = json.loads(text) if args.esconv else [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{args.phrasings}: cannot read the phrasings ({exc})") from None
    if args.esconv:
        seen, flagged = scan_conversations(rows)
        print(f"{len(rows)} conversations, {seen} seeker messages, {len(flagged)} flagged")
        for i, rule, message in flagged:
            print(f"conversation {i} ({rule}): {message}")
        return 0
    print(phrasings_table(score_phrasings(rows)))
    if args.misses:
        for row in rows:
            if check_message(row["text"], row.get("recent", ())).flagged != bool(row["label"]):
                print(("missed: " if row["label"] else "false alarm: ") + json.dumps(row, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
