"""Realistic Pushshift-format sample dumps: the demo's input and the ingestion tests' fixture.

`make_sample_dump` writes monthly RS_YYYY-MM.zst / RC_YYYY-MM.zst files (NDJSON, zstd with a long
window, as Watchful1's dumps are), holding hand-written scenarios with known outcomes for every case
the filters and the thread builder handle, plus seeded random filler in r/offmychest and other
subreddits. Records are assigned to the month of their created_utc, so comments on a post from late
in one month land in the next month's comment dump, as in the real dumps.

`make_bench_dump` writes a large comments dump shaped like a monthly RC file (many subreddits,
r/offmychest a small share) for `esvr bench ingest`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import zstandard

#: scenario outcomes the tests assert on: thread ids (post:last OP comment) and chain lengths
EXPECTED_SCENARIO_THREADS = {
    "smx1aa:smo1a3": 7,  # OP and one commenter alternate three times
    "smx1aa:smo1b1": 3,  # a second commenter under the same post, single turn
    "smx2bb:smo2a1": 3,  # the OP answered c1 twice: two chains
    "smx2bb:smo2a2": 3,
    "smx3cc:smo3a1": 3,  # c2 was removed: the chain stops at o2
    "smx4dd:smo4a1": 3,  # c2 came from another commenter: the chain stops at o2
    "smx7gg:smo7a1": 3,  # unicode, emoji, HTML entities, created_utc as a string, edited as a number
    "smx8hh:smo8a1": 3,  # subreddit spelled "OffMyChest" with spaces in the JSON
}

POST_OPENERS = [
    "I don't really have anyone else to tell this to.",
    "Throwaway because people I know use this site.",
    "I just need to get this off my chest.",
    "This has been eating at me for months.",
    "I've never posted here before, so bear with me.",
    "Long time lurker, first time posting.",
]
SITUATIONS = [
    "My dad was diagnosed with cancer last spring and I moved back home to take care of him.",
    "I got laid off two weeks ago and I haven't told my partner yet.",
    "My best friend of ten years stopped talking to me and I don't know why.",
    "I failed my licensing exam for the second time even though I studied every night.",
    "My mom keeps comparing me to my older sister, no matter what I achieve.",
    "I finally left a relationship that was slowly crushing me.",
    "I'm 34 and I feel like everyone around me has their life figured out except me.",
    "Work has been so stressful that I cry in the car before every shift.",
    "My dog passed away on Sunday and the house feels empty.",
    "I moved to a new city for a job and I haven't made a single friend in six months.",
    "I've been sober for 200 days and nobody in my family acknowledged it.",
    "My roommate keeps eating my food and when I bring it up I'm the bad guy.",
    "I dropped out of college and my parents still think I'm enrolled.",
    "I was the one who found my grandfather after his fall, and I keep replaying it.",
]
FEELINGS = [
    "I feel like I'm failing at everything.",
    "Some days I can barely get out of bed.",
    "I'm so tired of pretending I'm fine.",
    "I feel guilty for even feeling this way.",
    "Part of me is relieved and part of me is terrified.",
    "I don't know who I am without this anymore.",
    "I keep wondering if it was my fault.",
    "I just want someone to tell me it gets better.",
]
COMMENTS = [
    "That sounds incredibly hard, and it makes sense that you feel this way.",
    "I went through something really similar last year. It does get easier, slowly.",
    "Have you been able to talk to anyone about this, like a counselor or a close friend?",
    "You are doing so much more than you give yourself credit for.",
    "It's okay to grieve. There's no timeline for this.",
    "What would you say to a friend who was in your exact situation?",
    "Taking care of a parent is exhausting. Please make sure someone takes care of you too.",
    "200 days is huge. I'm proud of you, even if I'm just a stranger on the internet.",
    "Honestly, setting that boundary was the right call.",
    "Is there one small thing you could do for yourself this week?",
    "You're not behind. Everyone is on their own timeline, even if social media says otherwise.",
    "I'm so sorry. Losing a pet is losing family.",
    "Maybe try writing down what you want to say to your partner first? It helped me.",
    "Sending you a hug. You matter.",
]
OP_REPLIES = [
    "Thank you, I really needed to hear that today.",
    "You're right. I think I've been so focused on everyone else that I forgot about me.",
    "I haven't, but maybe I should. My work has an assistance program.",
    "That actually means a lot. My family has always been the most important thing to me.",
    "I'm going to try that. I want to be honest with her, she deserves that.",
    "Thanks. I'm trying to be proud of how far I've come.",
    "I guess I'd tell them they're doing their best. Hard to say it to myself though.",
    "Yeah. I want to feel safe in my own home again.",
    "I think I'll sign up for that pottery class I keep putting off.",
    "It helps to know I'm not the only one. Thank you for sharing.",
    "I'm still sad, but this made me smile a little.",
    "Honestly I just want some peace and quiet and a stable job.",
]
OTHER_SUBS = ["AskReddit", "gaming", "personalfinance", "relationships", "CasualConversation", "worldnews"]
OTHER_TEXT = [
    "What's a movie you can watch over and over?",
    "The patch notes say they fixed the matchmaking but it's still broken.",
    "Should I pay off my car loan early or invest the extra money?",
    "Source? This seems misleading.",
    "This is the way.",
    "Lol same",
    "Index funds, always index funds.",
]


def _b36(n: int) -> str:
    chars = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = chars[r] + out
        if n == 0:
            return out


def _ts(y: int, m: int, d: int, h: int = 12) -> int:
    return int(datetime(y, m, d, h, tzinfo=timezone.utc).timestamp())


def post_record(
    pid: str, author: str, title: str, selftext: str, created: int | str, subreddit: str = "offmychest", **extra: Any
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "all_awardings": [],
        "author": author,
        "author_flair_text": None,
        "created_utc": created,
        "domain": f"self.{subreddit}",
        "edited": False,
        "gilded": 0,
        "id": pid,
        "is_self": True,
        "link_flair_text": None,
        "name": f"t3_{pid}",
        "num_comments": 0,
        "over_18": False,
        "permalink": f"/r/{subreddit}/comments/{pid}/post/",
        "removed_by_category": None,
        "retrieved_on": int(created) + 36 * 3600,
        "score": 25,
        "selftext": selftext,
        "stickied": False,
        "subreddit": subreddit,
        "subreddit_id": "t5_2ranw",
        "subreddit_type": "public",
        "title": title,
        "total_awards_received": 0,
        "upvote_ratio": 0.96,
        "url": f"https://www.reddit.com/r/{subreddit}/comments/{pid}/",
    }
    rec.update(extra)
    return rec


def comment_record(
    cid: str, post_id: str, parent: str, author: str, body: str, created: int, subreddit: str = "offmychest", **extra: Any
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "all_awardings": [],
        "author": author,
        "author_flair_text": None,
        "body": body,
        "controversiality": 0,
        "created_utc": created,
        "distinguished": None,
        "edited": False,
        "gilded": 0,
        "id": cid,
        "is_submitter": False,
        "link_id": f"t3_{post_id}",
        "parent_id": parent,
        "permalink": f"/r/{subreddit}/comments/{post_id}/post/{cid}/",
        "retrieved_on": created + 36 * 3600,
        "score": 4,
        "stickied": False,
        "subreddit": subreddit,
        "subreddit_id": "t5_2ranw",
        "subreddit_type": "public",
    }
    rec.update(extra)
    return rec


@dataclass
class _Dump:
    posts: list[Any] = field(default_factory=list)  # dicts, or raw bytes lines (malformed cases)
    comments: list[Any] = field(default_factory=list)


def _chain(
    d: _Dump,
    pid: str,
    op: str,
    title: str,
    selftext: str,
    t: int,
    turns: list[tuple[str, str, str, int]],
    flag_op: bool = False,
    **post_extra: Any,
) -> None:
    """A post and a chain of comments under it, each answering the one before.

    `turns` are (comment id, author, body, seconds after the post); `flag_op` marks the OP's comments
    is_submitter, as only some dumps do.
    """
    d.posts.append(post_record(pid, op, title, selftext, t, **post_extra))
    parent = f"t3_{pid}"
    for cid, author, body, dt in turns:
        extra: dict[str, Any] = {"is_submitter": True} if flag_op and author == op else {}
        d.comments.append(comment_record(cid, pid, parent, author, body, t + dt, **extra))
        parent = f"t1_{cid}"


def _scenarios(d: _Dump, y: int, m: int) -> None:
    """Hand-built posts with known outcomes (EXPECTED_SCENARIO_THREADS); all in the first month."""
    t = _ts(y, m, 10)
    P, C = d.posts.append, d.comments.append
    story = "My dad was diagnosed with cancer last spring and I moved back home. " * 2

    # 1: a 7-turn chain, siblings with and without OP replies, a bot, a deleted commenter
    _chain(
        d,
        "smx1aa",
        "op_maya",
        "I feel like I'm losing myself caring for my dad",
        story,
        t,
        [
            ("smc1a1", "kind_stranger", COMMENTS[6], 600),
            ("smo1a1", "op_maya", OP_REPLIES[3], 1200),
            ("smc1a2", "kind_stranger", COMMENTS[9], 1800),
            ("smo1a2", "op_maya", OP_REPLIES[8], 2400),
            ("smc1a3", "kind_stranger", "That sounds perfect. Be gentle with yourself 💛", 3000),
            ("smo1a3", "op_maya", OP_REPLIES[0], 3600),
        ],
        flag_op=True,
    )
    C(comment_record("smd1a2", "smx1aa", "t1_smo1a1", "another_helper", COMMENTS[4], t + 2000))  # sibling of c2
    C(comment_record("smo1d1", "smx1aa", "t1_smd1a2", "op_maya", OP_REPLIES[10], t + 2600, is_submitter=True))
    C(comment_record("smc1b1", "smx1aa", "t3_smx1aa", "listener42", COMMENTS[0], t + 700))  # sibling of c1
    C(comment_record("smo1b1", "smx1aa", "t1_smc1b1", "op_maya", OP_REPLIES[9], t + 900, is_submitter=True))
    C(comment_record("smc1c1", "smx1aa", "t3_smx1aa", "quiet_reader", COMMENTS[13], t + 800, score=9))  # no reply
    C(
        comment_record(
            "smbot1",
            "smx1aa",
            "t3_smx1aa",
            "AutoModerator",
            "Please remember the rules of r/offmychest.",
            t + 5,
            distinguished="moderator",
            stickied=True,
        )
    )
    C(comment_record("smdel1", "smx1aa", "t3_smx1aa", "[deleted]", "[deleted]", t + 650))
    C(comment_record("smo1x1", "smx1aa", "t1_smdel1", "op_maya", "Why would you say that?", t + 660))  # orphaned

    # 2: the OP answered c1 twice; a third party's reply to o2 does not extend the chain
    t2 = t + 86400
    _chain(
        d,
        "smx2bb",
        "op_jon",
        "I got laid off and haven't told my partner",
        "Two weeks now. I leave the house every morning like I'm going to work.",
        t2,
        [
            ("smc2a1", "been_there_too", COMMENTS[12], 300),
            ("smo2a1", "op_jon", OP_REPLIES[4], 900),
            ("smc2e1", "drive_by", "Good luck man", 1200),
        ],
        edited=t2 + 500,
    )
    C(comment_record("smo2a2", "smx2bb", "t1_smc2a1", "op_jon", "Also, thank you for not judging me.", t2 + 950))

    # chains whose outcome is decided by their shape alone: (seconds after the first scenario, post id,
    # OP, title, body, comments as in _chain)
    plain_chains: list[tuple[int, str, str, str, str, list[tuple[str, str, str, int]]]] = [
        # 3: c2 removed by moderators; the OP's reply to it is unreachable
        (2 * 86400, "smx3cc", "op_lee", "My best friend ghosted me",
         "Ten years of friendship and she just stopped answering my texts.",
         [("smc3a1", "pal_pat", COMMENTS[5], 300), ("smo3a1", "op_lee", OP_REPLIES[6], 600),
          ("smc3a2", "pal_pat", "[removed]", 900), ("smo3a2", "op_lee", "Wow, okay.", 1200)]),
        # 4: c2 from a different commenter: not the same alternation
        (3 * 86400, "smx4dd", "op_ana", "Nobody noticed my 200 days sober",
         "I've been sober for 200 days and nobody in my family acknowledged it.",
         [("smc4a1", "cheer_bear", COMMENTS[7], 300), ("smo4a1", "op_ana", OP_REPLIES[5], 600),
          ("smc4b2", "someone_else", "Proud of you too!", 900), ("smo4b2", "op_ana", "Thank you both!", 1200)]),
        # 5: no OP reply at all
        (4 * 86400, "smx5ee", "op_kim", "Work is crushing me",
         "I cry in the car before every shift and I'm so tired.",
         [("smc5a1", "helper_five", COMMENTS[1], 300)]),
        # 6: the OP only comments on their own post
        (4 * 86400 + 60, "smx6ff", "op_sam", "Update on my situation",
         "I promised an update, so here it is: still hard.",
         [("smo6a1", "op_sam", "Edit: thanks for reading.", 340)]),
    ]  # fmt: skip
    for offset, pid, op, title, body, turns in plain_chains:
        _chain(d, pid, op, title, body, t + offset, turns)

    # 7: unicode, emoji, HTML entities, created_utc as a string, edited as a number, a missing field,
    # invalid fields
    t7 = t + 5 * 86400
    P(
        post_record(
            "smx7gg",
            "op_yuna",
            "엄마가 그리워요 — I miss my mom 😢",
            "It's been a year &amp; I still set two cups of tea every morning. 😔 "
            "Ça me brise le cœur. Mail me at yuna.k@example.com if you want to talk.",
            str(t7),
            edited=t7 + 3600,
        )
    )
    C(
        comment_record(
            "smc7a1",
            "smx7gg",
            "t3_smx7gg",
            "tea_friend",
            "Two cups of tea 🍵🍵 &lt;3 that's love. Ask u/grief_helper_bot... no, ask a person: call 555-123-4567.",
            t7 + 300,
            edited=t7 + 900,
        )
    )
    C(comment_record("smo7a1", "smx7gg", "t1_smc7a1", "op_yuna", "고마워요 🙏 Thank you, family is everything to me.", t7 + 600))
    rec = comment_record("smc7b1", "smx7gg", "t3_smx7gg", "no_score_user", "A comment without a score.", t7 + 700)
    del rec["score"], rec["edited"], rec["author_flair_text"]
    C(rec)
    # fields of the wrong type or beyond int64: rejected one by one, with file and line
    C(comment_record("smc7c1", "smx7gg", "t3_smx7gg", "huge_score", "A score no int64 holds.", t7 + 710, score=1e20))
    C(comment_record("smc7d1", "smx7gg", "t3_smx7gg", "text_score", "A score that is a word.", t7 + 720, score="abc"))

    # 8: "OffMyChest" spelled otherwise, written with spaces: the prefilter must still find it
    t8 = t + 6 * 86400
    P(
        (
            "json",
            post_record(
                "smx8hh",
                "op_zoe",
                "I finally left",
                "I finally left a relationship that was slowly crushing me.",
                t8,
                subreddit="OffMyChest",
            ),
        )
    )
    C(("json", comment_record("smc8a1", "smx8hh", "t3_smx8hh", "brave_one", COMMENTS[8], t8 + 300, subreddit="OffMyChest")))
    C(comment_record("smo8a1", "smx8hh", "t1_smc8a1", "op_zoe", OP_REPLIES[7], t8 + 600))

    # posts each filter drops, every one with a chain that would otherwise be kept
    t9 = t + 7 * 86400
    drops: list[tuple[str, dict[str, Any]]] = [
        ("smxd01", dict(author="[deleted]", selftext="[deleted]", removed_by_category="deleted")),
        ("smxd02", dict(selftext="[removed]", removed_by_category="moderator")),
        ("smxd03", dict(score=1)),  # low score
        ("smxd04", dict(upvote_ratio=0.41)),  # low upvote ratio
        ("smxd05", dict(created_utc=_ts(2018, 6, 1))),  # before 2019
        ("smxd06", dict(subreddit="AskReddit")),  # another subreddit
        ("smxd07", dict(subreddit_type="private")),
        ("smxd08", dict(selftext="ok")),  # too short
        ("smxd09", dict(author="SaveVideo")),  # a bot
    ]
    for i, (pid, changes) in enumerate(drops):
        base = post_record(pid, f"op_drop{i}", "This should not survive", SITUATIONS[i] + " " + FEELINGS[i % 8], t9 + i)
        base.update(changes)
        P(base)
        sub = base["subreddit"]
        C(comment_record(f"smdc{i:02d}", pid, f"t3_{pid}", "steady_friend", COMMENTS[i], t9 + 300 + i, subreddit=sub))
        C(comment_record(f"smdo{i:02d}", pid, f"t1_smdc{i:02d}", base["author"], OP_REPLIES[i], t9 + 600 + i, subreddit=sub))
    rec = post_record("smxd10", "op_drop10", "No upvote ratio here", SITUATIONS[10], t9 + 20)
    del rec["upvote_ratio"]
    P(rec)
    # comments each filter drops (under post 1, so a kept one would show up as a sibling)
    # a user named like the subreddit, in another subreddit: the prefilter lets it through, the
    # field check drops it
    C(
        comment_record(
            "smoth1", "smxd06", "t3_smxd06", "offmychest", "Wrong sub, try r/offmychest", t9 + 900, subreddit="AskReddit"
        )
    )
    dropped_comments: list[tuple[str, str, dict[str, Any]]] = [
        ("downvoted_guy", "Just get over it.", dict(score=-3)),
        ("RemindMeBot", "I will be messaging you in 2 days to remind you of this link", {}),
        ("essay_writer", "I understand. " * 400, {}),  # too long
        ("time_traveler", COMMENTS[2], dict(created_utc=_ts(2018, 12, 1))),
        ("mod_team", "Removed: rule 3.", dict(distinguished="moderator")),
        ("[deleted]", "this author deleted their account", {}),
    ]
    for i, (author, body, extra) in enumerate(dropped_comments):
        C(comment_record(f"smcx{i:02d}", "smx1aa", "t3_smx1aa", author, body, t + 1000 + i, **extra))


def _filler(dumps: dict[str, _Dump], months: Sequence[tuple[int, ...]], n_posts: int, rng: random.Random) -> None:
    """Random posts and comment trees; comments land in the dump of their own month."""

    def month_of(ts: int) -> str:
        dt = datetime.fromtimestamp(ts, tz=timezone.utc)
        return f"{dt.year:04d}-{dt.month:02d}"

    counter = 1000
    users = [f"user_{rng.getrandbits(32):08x}" for _ in range(400)]
    for i in range(n_posts):
        y, m = months[i % len(months)]
        created = _ts(y, m, 1) + rng.randrange(0, 28 * 86400)
        sub = "offmychest" if rng.random() < 0.7 else rng.choice(OTHER_SUBS)
        counter += 1
        pid = "p" + _b36(counter * 7919)
        op = rng.choice(users)
        if sub == "offmychest":
            title = rng.choice(FEELINGS).rstrip(".")
            text = " ".join([rng.choice(POST_OPENERS), rng.choice(SITUATIONS), rng.choice(FEELINGS), rng.choice(FEELINGS)])
        else:
            title, text = rng.choice(OTHER_TEXT), rng.choice(OTHER_TEXT) + " " + rng.choice(OTHER_TEXT)
        rec = post_record(
            pid,
            op,
            title,
            text,
            created,
            subreddit=sub,
            score=rng.choice([1, 3, 8, 40, 250]),
            upvote_ratio=rng.choice([0.55, 0.86, 0.93, 1.0]),
            edited=rng.choice([False, False, created + 7200]),
        )
        dumps[month_of(created)].posts.append(rec)
        # comment tree: some top-level comments; the OP answers some; the commenter follows up
        t = created
        for _ in range(rng.randint(0, 5)):
            counter += 1
            helper = rng.choice(users)
            t += rng.randint(60, 20000)
            cid = "c" + _b36(counter * 104729)
            body = rng.choice(COMMENTS if sub == "offmychest" else OTHER_TEXT)
            dumps[month_of(t)].comments.append(
                comment_record(cid, pid, f"t3_{pid}", helper, body, t, subreddit=sub, score=rng.choice([-1, 1, 2, 5, 30]))
            )
            parent, depth = cid, 0
            while rng.random() < 0.55 and depth < 4:
                counter += 1
                t += rng.randint(60, 40000)
                oid = "c" + _b36(counter * 104729)
                body = rng.choice(OP_REPLIES if sub == "offmychest" else OTHER_TEXT)
                dumps[month_of(t)].comments.append(
                    comment_record(
                        oid, pid, f"t1_{parent}", op, body, t, subreddit=sub, is_submitter=True, score=rng.choice([1, 2, 3])
                    )
                )
                if rng.random() < 0.5:
                    break
                counter += 1
                t += rng.randint(60, 40000)
                nid = "c" + _b36(counter * 104729)
                body = rng.choice(COMMENTS if sub == "offmychest" else OTHER_TEXT)
                dumps[month_of(t)].comments.append(comment_record(nid, pid, f"t1_{oid}", helper, body, t, subreddit=sub))
                parent, depth = nid, depth + 1


MALFORMED_LINES = [
    b'{"id":"smbad1","subreddit":"offmychest","body":"this line was cut o',
    b'{"id":"smbad2","subreddit":"offmychest","body":"bad bytes \xff\xfe here","author":"x"}',
    b'["offmychest", "not an object"]',
]


def _write(path: Path, records: list[Any], level: int = 10) -> None:
    lines = []
    for rec in records:
        if isinstance(rec, bytes):
            lines.append(rec)
        elif isinstance(rec, tuple):  # ("json", rec): stdlib formatting with spaces, as some tools write
            lines.append(json.dumps(rec[1], ensure_ascii=False).encode())
        else:
            lines.append(orjson.dumps(rec))
    data = b"\n".join(lines) + b"\n"
    # like `zstd --long=31` of the real dumps: 2 GiB window, long-distance matching, a checksum
    params = zstandard.ZstdCompressionParameters.from_level(level, window_log=31, enable_ldm=True, write_checksum=True)
    path.write_bytes(zstandard.ZstdCompressor(compression_params=params).compress(data))


def make_sample_dump(
    out_dir: str | Path, months: list[str] | tuple[str, ...] = ("2021-06",), posts: int = 150, seed: int = 0
) -> dict[str, list[Path]]:
    """Write RS_<month>.zst and RC_<month>.zst per month into `out_dir`; returns their paths.

    The first month holds the scenarios (EXPECTED_SCENARIO_THREADS) and the malformed lines; a blank
    line too. `posts` random posts are spread over the months (about 70% in r/offmychest).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parsed = [tuple(int(x) for x in m.split("-")) for m in months]
    dumps = {m: _Dump() for m in months}
    rng = random.Random(seed)
    _scenarios(dumps[months[0]], *parsed[0])
    extra: dict[str, _Dump] = {}

    class _Months(dict):
        def __missing__(self, key: str) -> _Dump:  # a comment after the last month: a later dump we drop
            return extra.setdefault(key, _Dump())

    _filler(_Months(dumps), parsed, posts, rng)
    for d in dumps.values():  # dumps are ordered by time
        d.posts.sort(key=_created)
        d.comments.sort(key=_created)
    first = dumps[months[0]]
    # malformed lines and a blank line in the middle of the first month's files
    first.comments[len(first.comments) // 2 : len(first.comments) // 2] = [MALFORMED_LINES[0], b"", MALFORMED_LINES[2]]
    first.posts[len(first.posts) // 2 : len(first.posts) // 2] = [MALFORMED_LINES[1]]
    paths: dict[str, list[Path]] = {"submissions": [], "comments": []}
    for m in months:
        rs, rc = out / f"RS_{m}.zst", out / f"RC_{m}.zst"
        _write(rs, dumps[m].posts)
        _write(rc, dumps[m].comments)
        paths["submissions"].append(rs)
        paths["comments"].append(rc)
    return paths


def _created(rec: Any) -> int:
    return int((rec[1] if isinstance(rec, tuple) else rec)["created_utc"])


# --------------------------------------------------------------------------------------------
# Benchmark dump
# --------------------------------------------------------------------------------------------


def make_bench_dump(
    out_dir: str | Path, target_mb: int = 520, offmychest_share: float = 0.01, seed: int = 0, level: int = 3
) -> dict[str, Path]:
    """A monthly-style pair: RS_2022-01.zst (posts) and RC_2022-01.zst (`target_mb` MB of comments).

    Like a real monthly dump, r/offmychest is a small share of the records (about 1%, its share of
    Reddit's comment volume is far smaller); bodies are random word sequences so the data compresses
    like text, not like repeated templates. Written in a streaming way: memory stays small.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    vocab = [
        w.encode()
        for w in (
            " ".join(COMMENTS + OP_REPLIES + SITUATIONS + FEELINGS + OTHER_TEXT)
            .replace(".", "")
            .replace(",", "")
            .replace("?", "")
            .split()
        )
    ]
    vocab += [_b36(rng.getrandbits(30)).encode() for _ in range(20000)]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    cum = []
    acc = 0.0
    for weight in weights:
        acc += weight
        cum.append(acc)
    subs = [
        b"AskReddit",
        b"gaming",
        b"politics",
        b"funny",
        b"worldnews",
        b"nba",
        b"relationships",
        b"personalfinance",
        b"memes",
        b"pics",
    ]
    t0 = _ts(2022, 1, 1, 0)
    n_posts = 3000
    post_ids = [f"b{_b36(i * 7919 + 1000)}" for i in range(n_posts)]
    ops = [f"op_{i}" for i in range(n_posts)]
    params = zstandard.ZstdCompressionParameters.from_level(
        level, window_log=31, enable_ldm=True, threads=-1, write_checksum=True
    )
    rs_path, rc_path = out / "RS_2022-01.zst", out / "RC_2022-01.zst"
    with open(rs_path, "wb") as fh, zstandard.ZstdCompressor(compression_params=params).stream_writer(fh) as w:
        for i, post_id in enumerate(post_ids):
            body = " ".join(rng.choice(SITUATIONS + FEELINGS) for _ in range(4))
            w.write(orjson.dumps(post_record(post_id, ops[i], rng.choice(FEELINGS), body, t0 + i * 60)) + b"\n")
    # the field set of a 2019+ RC record: most of a real line is small fields, which is what
    # makes stdlib json slow on the real dumps (docs/benchmarks.md: the naive reader's figures)
    template = (
        b'{"all_awardings":[],"associated_award":null,"author":"%s","author_flair_background_color":null,'
        b'"author_flair_css_class":null,"author_flair_richtext":[],"author_flair_template_id":null,'
        b'"author_flair_text":null,"author_flair_text_color":null,"author_flair_type":"text",'
        b'"author_fullname":"t2_%s","author_patreon_flair":false,"author_premium":false,"awarders":[],'
        b'"body":"%s","can_gild":true,"can_mod_post":false,"collapsed":false,"collapsed_because_crowd_control":null,'
        b'"collapsed_reason":null,"comment_type":null,"controversiality":0,"created_utc":%d,'
        b'"distinguished":null,"edited":false,"gilded":0,"gildings":{},"id":"%s","is_submitter":%s,'
        b'"link_id":"t3_%s","locked":false,"no_follow":true,"parent_id":"%s",'
        b'"permalink":"/r/%s/comments/%s/comment/%s/","retrieved_on":%d,"score":%d,"send_replies":true,'
        b'"stickied":false,"subreddit":"%s","subreddit_id":"t5_2qh1i","subreddit_name_prefixed":"r/%s",'
        b'"subreddit_type":"public","top_awarded_type":null,"total_awards_received":0,"treatment_tags":[]}\n'
    )
    target = target_mb * 1_000_000
    written = 0
    i = 0
    choices = rng.choices
    state: dict[int, tuple[str, bytes, bytes]] = {}
    with open(rc_path, "wb") as fh, zstandard.ZstdCompressor(compression_params=params).stream_writer(fh) as w:
        buf = []
        size = 0
        while written < target:
            i += 1
            cid = _b36(i * 104729 + 7).encode()
            # comment lengths are skewed: many short replies, a few long ones (mean about 30 words)
            words = b" ".join(choices(vocab, cum_weights=cum, k=1 + int(rng.expovariate(1 / 30))))
            created = t0 + i // 20
            if rng.random() < offmychest_share:
                # per post: a top-level comment, the OP's answer to it, the commenter's follow-up ...
                p = rng.randrange(n_posts)
                pid = post_ids[p].encode()
                last = state.get(p)
                roll = rng.random()
                if last and last[0] == "c" and roll < 0.5:
                    author, parent, is_sub = ops[p].encode(), b"t1_" + last[1], b"true"
                    state[p] = ("o", cid, last[2])
                elif last and last[0] == "o" and roll < 0.4:
                    author, parent, is_sub = last[2], b"t1_" + last[1], b"false"
                    state[p] = ("c", cid, last[2])
                else:
                    author, parent, is_sub = b"u%d" % rng.randrange(100000), b"t3_" + pid, b"false"
                    state[p] = ("c", cid, author)
                sub = b"offmychest"
            else:
                pid = _b36(rng.getrandbits(28)).encode()
                author, parent, is_sub = b"u%d" % rng.randrange(1000000), b"t3_" + pid, b"false"
                sub = subs[i % len(subs)]
            line = template % (
                author,
                _b36(hash(author) & 0xFFFFFFF).encode(),
                words,
                created,
                cid,
                is_sub,
                pid,
                parent,
                sub,
                pid,
                cid,
                created + 90000,
                rng.randint(-5, 200),
                sub,
                sub,
            )
            buf.append(line)
            size += len(line)
            if size >= 4 << 20:
                w.write(b"".join(buf))
                written += size
                buf, size = [], 0
        if buf:
            w.write(b"".join(buf))
    return {"submissions": rs_path, "comments": rc_path}
