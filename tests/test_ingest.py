"""Stage 1, Reddit ingestion: reader, filters, thread chains, outputs, incremental merge, flow."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import orjson
import polars as pl
import pytest
import zstandard

from esvr.flows.config import load_config
from esvr.tasks.reddit import ingest
from esvr.tasks.reddit.ingest import (
    THREADS_SCHEMA,
    Anonymizer,
    DumpCorruptError,
    IngestConfig,
    IngestError,
    NoThreadsError,
    RecordFilter,
    Utt,
    _candidates,
    _Scratch,
    build_tree,
    chain_siblings,
    extract_chains,
    find_new_dumps,
    ingest_dumps,
    iter_blocks,
    load_manifest,
    read_ahead,
    read_threads,
    stage_dump,
    thread_rows,
)
from esvr.tasks.reddit.sample_dump import EXPECTED_SCENARIO_THREADS, comment_record, make_sample_dump, post_record

T0 = 1_622_548_800  # 2021-06-01


@pytest.fixture(autouse=True)
def _salt(monkeypatch):
    monkeypatch.setenv("ESVR_AUTHOR_SALT", "test-salt")


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict[str, list[Path]]:
    return make_sample_dump(tmp_path_factory.mktemp("dumps"), months=["2021-06", "2021-07"], posts=60)


def zst(path: Path, lines: list[bytes], **params) -> Path:
    p = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, enable_ldm=True, write_checksum=True, **params)
    path.write_bytes(zstandard.ZstdCompressor(compression_params=p).compress(b"\n".join(lines) + b"\n"))
    return path


# --------------------------------------------------------------------------------------------
# chains on hand-built trees
# --------------------------------------------------------------------------------------------


def tree(edges: list[tuple[str, str, str]], op: str = "OP") -> Utt:
    """edges: (comment id, parent id or 'post', author)."""
    post = Utt("p", "t3_p", op, "title\n\nbody", 10, 0)
    comments = [
        (cid, "t3_p" if parent == "post" else f"t1_{parent}", author, f"text {cid}", 5, i)
        for i, (cid, parent, author) in enumerate(edges, 1)
    ]
    build_tree(post, comments)
    return post


def ids(chains):
    return sorted([u.id for u in c] for c in chains)


def alternation(pairs: int) -> list[tuple[str, str, str]]:
    """Commenter A and the OP taking turns under the post: c0, o0 (answering c0), c1, o1, ..."""
    edges, parent = [], "post"
    for i in range(pairs):
        edges += [(f"c{i}", parent, "A"), (f"o{i}", f"c{i}", "OP")]
        parent = f"o{i}"
    return edges


def test_single_turn():
    post = tree([("c1", "post", "A"), ("o2", "c1", "OP")])
    assert ids(extract_chains(post)) == [["p", "c1", "o2"]]


def test_multi_turn_alternation_to_depth():
    post = tree(alternation(3) + [("c3", "o2", "A")])  # c3 unanswered: dropped
    assert ids(extract_chains(post)) == [["p", "c0", "o0", "c1", "o1", "c2", "o2"]]


def test_deep_chain_has_no_recursion_limit():
    (chain,) = extract_chains(tree(alternation(1500)))
    assert len(chain) == 3001 and chain[-1].id == "o1499"


def test_no_chain_without_an_op_reply_to_a_commenter():
    assert extract_chains(tree([("c1", "post", "A"), ("c2", "c1", "B")])) == []
    assert extract_chains(tree([("o1", "post", "OP"), ("c1", "o1", "A")])) == []  # OP on their own post
    assert extract_chains(tree([])) == []


def test_branching_op_replies_give_one_chain_each():
    post = tree([("c1", "post", "A"), ("o2a", "c1", "OP"), ("o2b", "c1", "OP"), ("c2", "o2b", "A"), ("o3", "c2", "OP")])
    assert ids(extract_chains(post)) == [["p", "c1", "o2a"], ["p", "c1", "o2b", "c2", "o3"]]


def test_a_second_commenter_does_not_continue_the_chain():
    post = tree([("c1", "post", "A"), ("o2", "c1", "OP"), ("c2", "o2", "B"), ("o3", "c2", "OP")])
    assert ids(extract_chains(post)) == [["p", "c1", "o2"]]


def test_prefixes_are_not_emitted_and_every_chain_ends_at_a_distinct_op_comment():
    post = tree(
        [("c1", "post", "A"), ("o2", "c1", "OP"), ("c2", "o2", "A"), ("o3", "c2", "OP"), ("d1", "post", "B"), ("p2", "d1", "OP")]
    )
    chains = extract_chains(post)
    assert ids(chains) == [["p", "c1", "o2", "c2", "o3"], ["p", "d1", "p2"]]
    ends = [c[-1].id for c in chains]
    assert len(set(ends)) == len(ends)


def test_siblings_with_op_replies_first_then_by_score_and_capped():
    post = tree(
        [
            ("c1", "post", "A"),
            ("o2", "c1", "OP"),
            ("s1", "post", "B"),
            ("s2", "post", "C"),
            ("r2", "s2", "OP"),
            ("s3", "post", "D"),
            ("o_self", "post", "OP"),
            ("c2", "o2", "A"),
            ("o3", "c2", "OP"),
            ("t1", "o2", "E"),
        ]
    )
    chain = next(c for c in extract_chains(post) if c[1].id == "c1" and len(c) == 5)
    sibs = chain_siblings(chain, "OP", max_siblings=10)
    assert [(t, s.id, [r.id for r in rs]) for t, s, rs in sibs] == [
        (1, "s2", ["r2"]),
        (1, "s1", []),
        (1, "s3", []),  # OP's own top-level comment is no sibling
        (3, "t1", []),
    ]
    # capped: a uniform sample by a digest of the ids, not the answered one first (§5.2 draws from all)
    assert [(t, s.id) for t, s, _ in chain_siblings(chain, "OP", max_siblings=1)] == [(1, "s1"), (3, "t1")]


@pytest.mark.parametrize(
    "text, cleaned",
    [
        ("call (555) 123-4567 tonight", "call [phone] tonight"),
        ("call 555-123-4567", "call [phone]"),
        ("call +1 555 123 4567", "call [phone]"),
        ("call 555.123.4567.", "call [phone]."),
        ("text 5551234567!", "text [phone]!"),
        ("mail a.b+c@example.co.uk now", "mail [email] now"),
        ("ask u/some_user or /u/Other-User", "ask [user] or [user]"),
        ("in 2019 I owed 300 dollars, 12 345 people saw it", "in 2019 I owed 300 dollars, 12 345 people saw it"),
        ("Tom &amp; me", "Tom & me"),
    ],
)
def test_texts_lose_phone_numbers_emails_and_user_names_and_nothing_else(text, cleaned):
    assert Anonymizer("salt", scrub_pii=True).text(text) == cleaned
    assert Anonymizer("salt", scrub_pii=False).text(text) == text.replace("&amp;", "&")


def test_thread_rows_follow_the_contract():
    anon = Anonymizer("salt", scrub_pii=True)
    op, a, b = anon.author("OP"), anon.author("A"), anon.author("B")  # staged rows hold hashed authors
    post_row = {
        "id": "p",
        "title": "Title",
        "selftext": "Body &amp; more",
        "author": op,
        "score": 3,
        "created_utc": T0,
        "subreddit": "offmychest",
        "dump": "RS_2021-06.zst",
    }
    comments = [
        ("c1", "t3_p", a, "reach me at a@b.co", 2, T0 + 1),
        ("o2", "t1_c1", op, "thanks", 1, T0 + 2),
        ("s1", "t3_p", b, "hug", 4, T0 + 3),
        ("r1", "t1_s1", op, "ty", 1, T0 + 4),
    ]
    rows = thread_rows(post_row, comments, anon, max_siblings=5)
    df = pl.DataFrame(rows, schema=THREADS_SCHEMA)
    assert sorted(df["thread_id"]) == ["p:o2", "p:r1"]
    row = next(r for r in rows if r["thread_id"] == "p:o2")
    assert [t["role"] for t in row["turns"]] == ["op", "commenter", "op"]
    assert row["turns"][0]["text"] == "Title\n\nBody & more"
    assert row["turns"][1]["text"] == "reach me at [email]"
    assert [t["author"] for t in row["turns"]] == [op, a, op] and len(op) == 16
    assert row["siblings"] == [
        {
            "turn": 1,
            "utt_id": "s1",
            "author": b,
            "text": "hug",
            "score": 4,
            "op_replies": [{"utt_id": "r1", "text": "ty"}],
        }
    ]


# --------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------


def _post(**changes):
    rec = post_record("abc", "someone", "A title", "A story that is long enough to keep.", T0)
    rec.update(changes)
    return rec


def _comment(**changes):
    rec = comment_record("c1", "abc", "t3_abc", "helper", "That sounds hard.", T0 + 60)
    rec.update(changes)
    return rec


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({}, None),
        ({"subreddit": "OffMyChest"}, None),
        ({"created_utc": str(T0)}, None),
        ({"subreddit": "AskReddit"}, "other_subreddit"),
        ({"created_utc": 1_500_000_000}, "out_of_date_range"),
        ({"created_utc": 1_704_067_200}, "out_of_date_range"),  # 2024-01-01: after end_date
        ({"author": "[deleted]"}, "deleted"),
        ({"selftext": "[deleted]"}, "deleted"),
        ({"removed_by_category": "deleted"}, "deleted"),
        ({"selftext": "[removed]"}, "removed"),
        ({"removed_by_category": "moderator"}, "removed"),
        ({"subreddit_type": "private"}, "private"),
        ({"author": "AutoModerator"}, "bot"),
        ({"author": "some_helper_bot"}, "bot"),
        ({"score": 1}, "low_score"),
        ({"upvote_ratio": 0.5}, "low_upvote_ratio"),
        ({"upvote_ratio": None}, "missing_field"),
        ({"selftext": "short"}, "too_short"),
        ({"selftext": "x" * 10_001}, "too_long"),
        ({"title": None}, "missing_field"),
        ({"created_utc": None}, "missing_field"),
    ],
)
def test_post_filters(changes, reason):
    got, row = RecordFilter(IngestConfig(), "RS.zst").post(_post(**changes))
    assert got == reason
    assert (row is None) == (reason is not None)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({}, None),
        ({"edited": 1623456789}, None),
        ({"created_utc": 1_704_067_200 + 86400 * 30}, None),  # a late comment on a December post
        ({"created_utc": 1_704_067_200 + 86400 * 200}, "out_of_date_range"),
        ({"subreddit": "gaming"}, "other_subreddit"),
        ({"body": "[deleted]"}, "deleted"),
        ({"author": "[deleted]"}, "deleted"),
        ({"body": "[removed]"}, "removed"),
        ({"body": "[ Removed by Reddit ]"}, "removed"),
        ({"author": "RemindMeBot"}, "bot"),
        ({"distinguished": "moderator"}, "bot"),
        ({"stickied": True}, "bot"),
        ({"score": 0}, "low_score"),
        ({"score": None}, "missing_field"),
        ({"parent_id": None}, "missing_field"),
        ({"body": "k"}, "too_short"),
        ({"body": "y" * 5001}, "too_long"),
    ],
)
def test_comment_filters(changes, reason):
    got, row = RecordFilter(IngestConfig(), "RC.zst").comment(_comment(**changes))
    assert got == reason
    if reason is None:
        assert row[1] == "abc" and row[2] == "t3_abc"


def test_filters_are_configurable():
    cfg = IngestConfig(
        subreddits=["r/Depression"],
        min_post_score=0,
        min_upvote_ratio=0,
        bot_author_pattern="",
        drop_deleted=False,
        start_date="2010-01-01",
    )
    f = RecordFilter(cfg, "x")
    assert f.post(_post(subreddit="depression", score=0, upvote_ratio=None, created_utc=1_300_000_000))[0] is None
    assert f.comment(_comment(subreddit="depression", author="some_helper_bot"))[0] is None
    assert f.comment(_comment(subreddit="depression", body="[deleted]"))[0] is None


# --------------------------------------------------------------------------------------------
# streaming reader
# --------------------------------------------------------------------------------------------


def test_utf8_split_across_reads_keeps_every_record(tmp_path):
    recs = [{"id": f"x{i}", "subreddit": "offmychest", "body": "😢 엄마 ça " * (i % 7 + 1)} for i in range(300)]
    path = zst(tmp_path / "RC_x.zst", [orjson.dumps(r) for r in recs])
    for read_bytes in (1, 7, 64, 1 << 20):
        got = [orjson.loads(line) for b in iter_blocks(path, read_bytes=read_bytes) for line in b.lines.splitlines()]
        assert got == recs


def test_concatenated_frames_and_a_missing_final_newline(tmp_path):
    c = zstandard.ZstdCompressor()
    path = tmp_path / "multi.zst"
    path.write_bytes(c.compress(b'{"a":1}\n{"a":2}\n{"a"') + c.compress(b':3}\n{"a":4}'))
    blocks = list(iter_blocks(path, read_bytes=5))
    assert b"".join(b.lines for b in blocks).split(b"\n") == [b'{"a":1}', b'{"a":2}', b'{"a":3}', b'{"a":4}']
    assert [b.first_line for b in blocks if b.end][0] == 1


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_dump_names_file_and_offset_and_keeps_complete_records(tmp_path, damage):
    lines = [orjson.dumps({"id": f"r{i}", "body": os.urandom(40).hex()}) for i in range(20000)]
    path = zst(tmp_path / "RC_bad.zst", lines)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) * 2 // 3])
    else:
        bad = bytearray(data)
        bad[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
        path.write_bytes(bytes(bad))
    got = []
    with pytest.raises(DumpCorruptError) as err:
        for b in iter_blocks(path, read_bytes=4096):
            got += b.lines.splitlines()
    assert str(path) in str(err.value) and "compressed byte" in str(err.value)
    assert 0 < err.value.compressed_offset < len(data)
    if damage == "truncate":
        # the damage starts inside the first incomplete line, after every kept byte
        assert 0 <= err.value.decompressed_offset - sum(len(x) + 1 for x in got) < len(lines[0]) + 1
        assert 1000 < len(got) < 20000 and got == lines[: len(got)]
    else:  # without a checksum mismatch earlier, the frame's checksum catches it at the end
        assert got[:1000] == lines[:1000]


def _flip_middle(path: Path) -> int:
    """Overwrite 64 bytes in the middle of `path` (inside the frame, as a bad disk or download does)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return mid


def test_damage_in_the_middle_keeps_every_line_before_it_and_names_its_offset(tmp_path):
    lines = [orjson.dumps({"id": f"r{i}", "body": os.urandom(30).hex()}) for i in range(40000)]
    path = zst(tmp_path / "RC_mid.zst", lines)
    assert path.stat().st_size < 2 << 20  # one default read holds the whole dump, damage included
    _flip_middle(path)
    got: list[bytes] = []
    with pytest.raises(DumpCorruptError) as err:
        for b in iter_blocks(path):
            got += b.lines.splitlines()
    # every line before the damage is intact (bytes flipped inside literals decode to wrong text,
    # which only the frame's checksum at its end can tell: those lines reach the parser as they are)
    intact = next((i for i, (a, b) in enumerate(zip(got, lines)) if a != b), len(got))
    assert intact > 15000 and got[:intact] == lines[:intact]
    assert 0 < err.value.compressed_offset <= path.stat().st_size
    assert f"at compressed byte {err.value.compressed_offset} " in str(err.value)
    assert 0 <= err.value.decompressed_offset - sum(len(x) + 1 for x in got) < 100  # and a partial line
    if shutil.which("zstd"):  # the reference: every complete line `zstd -d` writes before it stops
        import subprocess

        out = subprocess.run(["zstd", "-dcq", str(path)], capture_output=True).stdout
        assert got == out[: out.rfind(b"\n") + 1].splitlines()


def test_a_damaged_dump_is_the_error_even_when_it_leaves_no_thread(tmp_path):
    big = make_sample_dump(tmp_path / "dumps", posts=500)
    rs, rc = big["submissions"][0], big["comments"][0]
    _flip_middle(rc)
    with pytest.raises(IngestError) as err:
        ingest_dumps([rs, rc], tmp_path / "out", IngestConfig())
    assert str(rc) in str(err.value) and "corrupt zstd data" in str(err.value)
    assert read_threads(tmp_path / "out" / "threads.parquet").height > 10  # the half before the damage
    # damage right after the header: nothing to build threads from, and the damage is still the error
    early = tmp_path / "early" / "RC_2021-06.zst"
    early.parent.mkdir()
    data = bytearray(zstandard.ZstdCompressor().compress(b"".join(orjson.dumps(_comment(id=f"e{i}")) + b"\n" for i in range(9))))
    data[8:40] = b"\xff" * 32
    early.write_bytes(bytes(data))
    for fail in (True, False):
        with pytest.raises(IngestError) as err:
            ingest_dumps([rs, early], tmp_path / f"out-early-{fail}", IngestConfig(fail_on_corrupt=fail))
        assert not isinstance(err.value, NoThreadsError) and str(early) in str(err.value)
        assert "no thread could be built" in str(err.value)


def test_a_damaged_dump_replaced_by_a_good_copy_is_staged_again(sample, tmp_path):
    rs, rc = sample["submissions"][0], sample["comments"][0]
    local = tmp_path / "RC_2021-06.zst"
    shutil.copy(rc, local)
    _flip_middle(local)
    with pytest.raises(IngestError, match="corrupt zstd data"):
        ingest_dumps([rs, local], tmp_path / "out", IngestConfig())
    shutil.copy(rc, local)  # the download fetched again, at the same path
    again = ingest_dumps([rs, local], tmp_path / "out", IngestConfig())
    assert not again.errors and local.name in again.staged_now
    clean = ingest_dumps([rs, rc], tmp_path / "clean", IngestConfig())
    assert sorted(read_threads(again.threads)["thread_id"]) == sorted(read_threads(clean.threads)["thread_id"])
    manifest = load_manifest(tmp_path / "out")
    assert len(manifest["dumps"]) == 2 and all(not e["error"] for e in manifest["dumps"].values())
    assert len(list((tmp_path / "out" / "staged").glob("*-*"))) == 2  # the damaged copy's stage is gone


def test_a_file_that_is_not_a_zstd_dump_is_named_with_what_it_is(sample, tmp_path):
    import gzip

    empty = tmp_path / "RC_empty.zst"
    empty.write_bytes(b"")
    plain = tmp_path / "RC_plain.zst"
    plain.write_bytes(orjson.dumps(_comment()) + b"\n")
    gz = tmp_path / "RC_gz.zst"
    gz.write_bytes(gzip.compress(orjson.dumps(_comment()) + b"\n"))
    rs = sample["submissions"][0]
    for path, what in ((empty, "is empty"), (plain, "is uncompressed JSON"), (gz, "is gzip-compressed")):
        with pytest.raises(IngestError, match=f"{path}.*{what}") as err:
            ingest_dumps([rs, path], tmp_path / "out", IngestConfig())
        assert not isinstance(err.value, NoThreadsError)
    nothing = zst(tmp_path / "RC_nothing.zst", [])  # a valid frame of one blank line
    nothing.write_bytes(zstandard.ZstdCompressor().compress(b""))
    with pytest.raises(NoThreadsError, match="RC_nothing.zst hold\\(s\\) no lines"):
        ingest_dumps([nothing], tmp_path / "out2", IngestConfig())


def test_prefilter_is_case_and_space_insensitive():
    block = (
        b'{"subreddit":"offmychest","id":"a"}\n{"subreddit": "OffMyChest","id":"b"}\n'
        b'{"subreddit":"gaming","body":"see r/offmychest"}\n{"subreddit":"gaming","body":"\\"offmychest\\""}\n'
    )
    spans = _candidates(block, 0, len(block), [b'"offmychest"'], _Scratch())
    assert len(spans) == 2 and b'"id":"a"' in block[slice(*spans[0])] and b'"id":"b"' in block[slice(*spans[1])]


# --------------------------------------------------------------------------------------------
# the whole stage on the generated sample
# --------------------------------------------------------------------------------------------


def test_sample_end_to_end(sample, tmp_path):
    dumps = sample["submissions"][:1] + sample["comments"][:1]
    result = ingest_dumps(dumps, tmp_path / "out", IngestConfig())
    df = read_threads(result.threads)
    assert df.schema == THREADS_SCHEMA
    scenario = df.filter(pl.col("post_id").str.starts_with("smx"))
    assert {r["thread_id"]: len(r["turns"]) for r in scenario.iter_rows(named=True)} == EXPECTED_SCENARIO_THREADS
    assert df["thread_id"].is_unique().all()
    assert df["dump"].unique().to_list() == ["RS_2021-06.zst"]
    for turns in df["turns"]:
        assert len(turns) % 2 == 1 and len(turns) >= 3
        assert [t["role"] for t in turns] == ["op", "commenter"] * (len(turns) // 2) + ["op"]
    text = df.write_ndjson()
    for raw in (
        "op_maya",
        "kind_stranger",
        "yuna.k@example.com",
        "555-123-4567",
        "[deleted]",
        "[removed]",
        "AutoModerator",
        "&amp;",
        "smbot1",
        "smdel1",
        "smcx0",
    ):
        assert raw not in text, raw
    big = df.filter(pl.col("thread_id") == "smx1aa:smo1a3").row(0, named=True)
    assert [(s["turn"], s["utt_id"], [o["utt_id"] for o in s["op_replies"]]) for s in big["siblings"]] == [
        (1, "smc1b1", ["smo1b1"]),
        (1, "smc1c1", []),
        (3, "smd1a2", ["smo1d1"]),
    ]
    rejects = [json.loads(line) for line in result.rejects.read_text().splitlines()]
    assert all(r["file"].endswith(".zst") and r["line"] > 1 for r in rejects)
    assert sorted(r["reason"] for r in rejects) == ["invalid_field"] * 2 + ["malformed"] * 3 + ["missing_field"] * 2
    assert {r["error"] for r in rejects if r["reason"] == "invalid_field"} == {"score invalid: 1e+20", 'score invalid: "abc"'}
    stats = json.loads(result.stats.read_text())
    t = stats["totals"]
    assert t["malformed"] == 3 and t["blank"] == 1
    assert t["prefiltered_out"] > 20  # other subreddits' lines never reach the parser
    for reason in RecordFilter.REASONS:
        assert t["submissions"].get(reason, 0) + t["comments"].get(reason, 0) > 0, reason
    assert stats["threads"]["single_turn"] + stats["threads"]["multi_turn"] == df.height


def test_every_dropped_line_is_counted_under_a_true_reason_and_rejects_carry_file_and_line(tmp_path):
    good = orjson.dumps(_comment())
    no_created = _comment(id="nc")
    del no_created["created_utc"]
    lines = [
        good,
        b'{"subreddit":"offmychest","body":"cut',  # 2: malformed, holds the name
        good,
        b"",  # 4: blank
        b'[1, "offmychest"]',  # 5: not an object
        b'{"subreddit":"gaming",',  # 6: cut, without the subreddit's name: not "another subreddit"
        b"Traceback (most recent call last):",  # 7: not JSON at all
        orjson.dumps({"subreddit": "gaming", "id": "g"}),  # 8: another subreddit, never parsed
        orjson.dumps(_comment(id="big", score=1e20)),  # 9: beyond int64
        orjson.dumps(_comment(id="abc", score="abc")),  # 10: a word for a number
        orjson.dumps(no_created),  # 11: missing
        b'  {"subreddit":"gaming","id":"h"}\r',  # 12: an object with whitespace around it
    ]
    path = zst(tmp_path / "RC_m.zst", lines)
    result = stage_dump(path, tmp_path / "stage", IngestConfig())
    rejects = [json.loads(x) for x in (tmp_path / "stage" / "rejects.ndjson").read_text().splitlines()]
    assert [(r["line"], r["reason"], r.get("field")) for r in rejects] == [
        (2, "malformed", None),
        (5, "malformed", None),
        (6, "malformed", None),
        (7, "malformed", None),
        (9, "invalid_field", "score"),
        (10, "invalid_field", "score"),
        (11, "missing_field", "created_utc"),
    ]
    assert all(r["file"] == str(path) and "text" not in r for r in rejects)
    s = result.stats
    assert (s["lines"], s["blank"], s["malformed"], s["prefiltered_out"]) == (12, 1, 4, 2)
    assert s["comments"] == {"kept": 2, "invalid_field": 2, "missing_field": 1}  # the id repeats; merge dedupes
    assert s["lines"] == s["blank"] + s["malformed"] + s["prefiltered_out"] + sum(s["comments"].values())


def test_line_numbers_and_counts_hold_across_reads_with_and_without_the_decoding_thread(tmp_path):
    rng = random.Random(1)
    lines, bad_at = [], []
    for i in range(1, 150001):
        if i % 9973 == 0:
            lines.append(b"not json " + os.urandom(8).hex().encode())
            bad_at.append(i)
        elif i % 50 == 0:
            lines.append(orjson.dumps(_comment(id=f"k{i}", body=os.urandom(20).hex())))
        else:
            lines.append(orjson.dumps({"subreddit": rng.choice(["gaming", "pics"]), "body": os.urandom(30).hex()}))
    path = zst(tmp_path / "RC_many.zst", lines)
    assert path.stat().st_size > 3 << 20  # several reads: lines cut by a read are completed
    got = {}
    for ahead in (0, 2):
        result = stage_dump(path, tmp_path / f"stage{ahead}", IngestConfig(read_mb=1, read_ahead=ahead))
        rejects = [json.loads(x) for x in (tmp_path / f"stage{ahead}" / "rejects.ndjson").read_text().splitlines()]
        assert [r["line"] for r in rejects] == bad_at
        s = result.stats
        assert (s["lines"], s["malformed"], s["comments"]["kept"]) == (150000, len(bad_at), 150000 // 50)
        assert s["decompressed_bytes"] == sum(len(x) + 1 for x in lines)
        got[ahead] = pl.read_parquet(tmp_path / f"stage{ahead}" / "comments-*.parquet")
    assert got[0].equals(got[2])


def test_the_decoding_thread_stops_when_the_reader_leaves_early_and_hands_on_the_damage(tmp_path):
    import threading

    lines = [orjson.dumps({"id": f"r{i}", "body": os.urandom(30).hex()}) for i in range(40000)]
    path = zst(tmp_path / "RC_t.zst", lines)
    before = threading.active_count()
    blocks = read_ahead(iter_blocks(path, read_bytes=64 << 10), depth=2)
    next(blocks)
    blocks.close()  # the caller stops (an error, Ctrl-C): the producer ends instead of decoding on
    assert threading.active_count() == before
    _flip_middle(path)
    got: list[bytes] = []
    with pytest.raises(DumpCorruptError):
        for b in read_ahead(iter_blocks(path, read_bytes=64 << 10), depth=2):
            got += b.lines.splitlines()
    assert got[:15000] == lines[:15000]
    assert threading.active_count() == before


def test_an_out_of_range_field_rejects_its_record_and_the_rest_becomes_threads(sample, tmp_path):
    rc = sample["comments"][0]
    lines = zstandard.ZstdDecompressor().decompress(rc.read_bytes(), max_output_size=1 << 30).splitlines()
    # a record like a kept one, with a score no int64 holds: staged as it was, it crashed the stage
    lines.insert(3, orjson.dumps(_comment(id="huge", score=1e20)))
    path = zst(tmp_path / "RC_2021-06.zst", lines)
    result = ingest_dumps([sample["submissions"][0], path], tmp_path / "out", IngestConfig())
    assert read_threads(result.threads).height > 10
    rejects = [json.loads(x) for x in result.rejects.read_text().splitlines()]
    assert {"file": str(path), "line": 4, "reason": "invalid_field", "error": "score invalid: 1e+20", "field": "score"} in rejects


def test_truncated_dump_keeps_records_and_raises_after_writing(tmp_path):
    big = make_sample_dump(tmp_path / "dumps", posts=500)
    rc = big["comments"][0]
    cut = tmp_path / "RC_2021-06.zst"
    cut.write_bytes(rc.read_bytes()[: rc.stat().st_size * 3 // 4])
    with pytest.raises(IngestError) as err:
        ingest_dumps([big["submissions"][0], cut], tmp_path / "out", IngestConfig())
    assert str(cut) in str(err.value) and "compressed byte" in str(err.value)
    df = read_threads(tmp_path / "out" / "threads.parquet")
    assert df.height > 10
    ok = ingest_dumps([big["submissions"][0], cut], tmp_path / "out", IngestConfig(fail_on_corrupt=False))
    assert ok.errors and ok.reused  # a known damaged dump is not re-read


def test_no_matching_record_gives_a_clear_message(sample, tmp_path):
    with pytest.raises(NoThreadsError, match="no post matched the filters.*subreddits=\\['depression'\\]"):
        ingest_dumps(
            sample["submissions"][:1] + sample["comments"][:1], tmp_path / "out", IngestConfig(subreddits=["depression"])
        )
    assert not (tmp_path / "out" / "threads.parquet").exists()


def test_no_user_name_at_rest_and_a_random_salt_per_folder_without_the_variable(sample, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("ESVR_AUTHOR_SALT")
    dumps = sample["submissions"][:1] + sample["comments"][:1]
    caplog.set_level("DEBUG")
    a = ingest_dumps(dumps, tmp_path / "a", IngestConfig())
    b = ingest_dumps(dumps, tmp_path / "b", IngestConfig())
    salt_file = tmp_path / "a" / "staged" / "author_salt"
    salt = salt_file.read_text().strip()
    assert len(salt) == 64 and salt_file.stat().st_mode & 0o777 == 0o600
    # staged parquet: hashed authors only; rejects: no raw text, no author
    staged = pl.concat(
        [pl.read_parquet(p).select("author") for p in (tmp_path / "a" / "staged").glob("*/*.parquet")], how="vertical"
    )
    assert staged.height > 50 and staged["author"].str.contains("^[0-9a-f]{16}$").all()
    at_rest = b"".join(p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file() and p != salt_file)
    for name in (b"op_maya", b"kind_stranger", b"no_score_user", b"huge_score", b"tea_friend"):
        assert name not in at_rest, name
    # the salt is in its file only: not in the logs, the manifest or the stats
    assert salt not in caplog.text and salt.encode() not in at_rest
    # the OP's hash is the folder's salt applied to the name; another folder's hash differs
    op = Anonymizer(salt, True).author("op_maya")
    ta, tb = (read_threads(r.threads).filter(pl.col("post_id") == "smx1aa") for r in (a, b))
    assert ta["turns"][0][0]["author"] == op != tb["turns"][0][0]["author"]
    # the same folder keeps its salt: a re-run reuses the staged dumps and the hashes
    again = ingest_dumps(dumps, tmp_path / "a", IngestConfig())
    assert again.reused and read_threads(again.threads).equals(read_threads(a.threads))
    # with the variable set, every folder hashes alike (what the tests and shared datasets use)
    monkeypatch.setenv("ESVR_AUTHOR_SALT", "shared")
    c = ingest_dumps(dumps, tmp_path / "c", IngestConfig())
    d = ingest_dumps(dumps, tmp_path / "a", IngestConfig())  # restaged: the salt changed
    assert read_threads(c.threads).equals(read_threads(d.threads)) and d.staged_now
    assert not (tmp_path / "c" / "staged" / "author_salt").exists()


# --------------------------------------------------------------------------------------------
# incremental merge, cache, scheduled scan
# --------------------------------------------------------------------------------------------


def test_incremental_same_dump_elsewhere_is_reused_new_dump_is_staged(sample, tmp_path):
    out = tmp_path / "out"
    rs6, rs7 = sample["submissions"]
    rc6, rc7 = sample["comments"]
    first = ingest_dumps([rs6, rc6], out, IngestConfig())
    assert sorted(first.staged_now) == ["RC_2021-06.zst", "RS_2021-06.zst"]
    moved = tmp_path / "elsewhere" / "renamed.zst"
    moved.parent.mkdir()
    shutil.copy(rc6, moved)
    again = ingest_dumps([moved], out, IngestConfig())
    assert again.staged_now == [] and sorted(again.reused) == ["RC_2021-06.zst", "RS_2021-06.zst"]
    assert read_threads(again.threads).equals(read_threads(first.threads))
    more = ingest_dumps([rs7, rc7], out, IngestConfig())
    assert sorted(more.staged_now) == ["RC_2021-07.zst", "RS_2021-07.zst"]
    assert sorted(more.reused) == ["RC_2021-06.zst", "RS_2021-06.zst"]
    merged = read_threads(more.threads)
    assert merged.height > first.summary["threads"]["threads"]
    # July's comments can extend June's chains (new thread ids), never lose a June post
    assert set(read_threads(first.threads)["post_id"]) <= set(merged["post_id"])
    assert set(merged["dump"]) == {"RS_2021-06.zst", "RS_2021-07.zst"}
    changed = ingest_dumps([], out, IngestConfig(min_comment_score=2))  # a filter changed: all re-staged
    assert len(changed.staged_now) == 4


def test_new_dumps_hash_smallest_first_stage_as_their_hash_arrives_and_merge_in_the_given_order(sample, tmp_path, monkeypatch):
    # hashed smallest first in a thread; each dump is staged as soon as its hash is known
    rs, rc = sample["submissions"][0], sample["comments"][0]
    assert rs.stat().st_size < rc.stat().st_size
    copy = tmp_path / "copy" / "RC_copy.zst"
    copy.parent.mkdir()
    shutil.copy(rc, copy)
    hashed, staged = [], []
    file_sha256 = ingest.file_sha256
    monkeypatch.setattr(ingest, "file_sha256", lambda p: hashed.append(p) or file_sha256(p))

    def stage_fn(path: Path, stage_dir: Path, cfg: IngestConfig):
        staged.append(path)
        return stage_dump(path, stage_dir, cfg)

    out = tmp_path / "out"
    result = ingest_dumps([rc, rs, copy], out, IngestConfig(), stage_fn=stage_fn)
    assert hashed == [rs, rc, copy]
    assert staged == [rs, rc]  # the copy holds the same bytes: staged once
    assert [d["dump"] for d in result.summary["dumps"]] == [rc.name, rs.name]
    assert result.staged_now == [rc.name, rs.name] and result.reused == []
    manifest = load_manifest(out)
    (entry,) = [e for e in manifest["dumps"].values() if e["name"] == rc.name]
    assert entry["paths"] == [str(rc.resolve()), str(copy.resolve())]
    assert set(manifest["hashes"]) == {str(p.resolve()) for p in (rc, rs, copy)}
    alone = ingest_dumps([rs, rc], tmp_path / "alone", IngestConfig())
    assert read_threads(result.threads).equals(read_threads(alone.threads))


def test_a_dump_whose_staging_fails_loses_nothing_staged_before_it(sample, tmp_path):
    rs, rc = sample["submissions"][0], sample["comments"][0]

    def stage_fn(path: Path, stage_dir: Path, cfg: IngestConfig):
        if path == rc:
            raise OSError(f"No space left on device: {stage_dir}")
        return stage_dump(path, stage_dir, cfg)

    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        ingest_dumps([rs, rc], out, IngestConfig(), stage_fn=stage_fn)
    assert [e["name"] for e in load_manifest(out)["dumps"].values()] == [rs.name]
    again = ingest_dumps([rs, rc], out, IngestConfig())
    assert again.reused == [rs.name] and again.staged_now == [rc.name]


def test_find_new_dumps_picks_only_new_files(sample, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    out = tmp_path / "out"
    for p in sample["submissions"][:1] + sample["comments"][:1]:
        shutil.copy(p, folder / p.name)
    (folder / "notes.txt").write_text("not a dump")
    assert [p.name for p in find_new_dumps(folder, out / "manifest.json", min_age_s=0)] == ["RC_2021-06.zst", "RS_2021-06.zst"]
    ingest_dumps(find_new_dumps(folder, out / "manifest.json", min_age_s=0), out, IngestConfig())
    assert find_new_dumps(folder, out / "manifest.json", min_age_s=0) == []
    shutil.copy(sample["comments"][0], folder / "copy_of_june.zst")  # same content: not new
    for p in sample["submissions"][1:] + sample["comments"][1:]:
        shutil.copy(p, folder / p.name)
    assert [p.name for p in find_new_dumps(folder, out / "manifest.json", min_age_s=0)] == ["RC_2021-07.zst", "RS_2021-07.zst"]
    assert find_new_dumps(folder, out / "manifest.json", min_age_s=3600) == []  # may still be downloading
    assert len(load_manifest(out)["dumps"]) == 2


# --------------------------------------------------------------------------------------------
# flow, config, CLI
# --------------------------------------------------------------------------------------------


def test_config_section_and_recipes():
    root = Path(__file__).resolve().parents[1]
    for recipe in ("demo.yaml", "paper.yaml"):
        cfg = load_config(root / "configs" / recipe)
        assert cfg.ingest.subreddits == ["offmychest"] and cfg.ingest.schedule_cron
    with pytest.raises(Exception, match="ingest.min_scor"):
        load_config(None, ["ingest.min_scor=3"])


def test_make_sample_dump_cli(tmp_path):
    from esvr.flows.cli import main

    assert main(["make-sample-dump", "--out", str(tmp_path), "--posts", "5"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RC_2021-06.zst", "RS_2021-06.zst"]
    head = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(open(tmp_path / "RS_2021-06.zst", "rb")).read(200)
    assert head.startswith(b"{") and zstandard.get_frame_parameters((tmp_path / "RS_2021-06.zst").read_bytes()).window_size > 0


@pytest.mark.slow  # three flow runs with MLflow: ~20-35 s on 2 cores (plus the shared Prefect harness)
def test_ingest_flow_logs_counts_and_the_scheduled_flow_ingests_only_new_dumps(prefect_harness, sample, tmp_path, monkeypatch):
    import mlflow

    from esvr.flows.ingest import ingest_flow, ingest_new_dumps
    from esvr.tasks.common import hashing

    digested = []
    file_digest = hashing.file_digest
    monkeypatch.setattr(hashing, "file_digest", lambda p: digested.append(Path(p)) or file_digest(p))
    run_dir = tmp_path / "run"
    config = load_config(None, [f"run.out_dir={run_dir}", "run.experiment=ingest-test"])
    artifacts = ingest_flow(config)  # no dumps: the sample dump
    # each dump is read once for its hash (the manifest's); the staging task's key does not read it again
    assert not [p for p in digested if p.suffix == ".zst"]
    assert Path(artifacts["threads"]).exists() and read_threads(artifacts["threads"]).height > 20
    mlflow.set_tracking_uri(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ingest-test"], filter_string="tags.`esvr.stage` = 'ingest'")
    assert len(runs) == 1
    assert runs["metrics.comments.low_score"].iloc[0] > 0 and runs["metrics.malformed"].iloc[0] == 3
    assert runs["metrics.threads"].iloc[0] == read_threads(artifacts["threads"]).height

    folder = tmp_path / "incoming"
    folder.mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"run:\n  out_dir: {run_dir}\n  experiment: ingest-test\ningest:\n  dumps_dir: {folder}\n")
    assert ingest_new_dumps(config_path=str(recipe), min_age_s=0, train="none") == {}
    for p in sample["submissions"][1:] + sample["comments"][1:]:
        shutil.copy(p, folder / p.name)
    out = ingest_new_dumps(config_path=str(recipe), min_age_s=0, train="none")
    stats = json.loads(Path(out["ingest_stats"]).read_text())
    assert sorted(stats["staged_now"]) == ["RC_2021-07.zst", "RS_2021-07.zst"]
    assert sorted(stats["reused"]) == ["RC_2021-06.zst", "RS_2021-06.zst"]
    assert ingest_new_dumps(config_path=str(recipe), min_age_s=0, train="none") == {}
