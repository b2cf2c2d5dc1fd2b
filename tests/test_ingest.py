"""Stage 1, Reddit ingestion: reader, filters, thread chains, outputs, incremental merge, flow."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import orjson
import polars as pl
import pytest
import zstandard

from esvr.flows.config import load_config
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
    assert [(t, s.id) for t, s, _ in chain_siblings(chain, "OP", max_siblings=1)] == [(1, "s2"), (3, "t1")]


def test_thread_rows_follow_the_contract():
    post_row = {
        "id": "p",
        "title": "Title",
        "selftext": "Body &amp; more",
        "author": "OP",
        "score": 3,
        "created_utc": T0,
        "subreddit": "offmychest",
        "dump": "RS_2021-06.zst",
    }
    comments = [
        ("c1", "t3_p", "A", "reach me at a@b.co", 2, T0 + 1),
        ("o2", "t1_c1", "OP", "thanks", 1, T0 + 2),
        ("s1", "t3_p", "B", "hug", 4, T0 + 3),
        ("r1", "t1_s1", "OP", "ty", 1, T0 + 4),
    ]
    rows = thread_rows(post_row, comments, Anonymizer("salt", scrub_pii=True), max_siblings=5)
    df = pl.DataFrame(rows, schema=THREADS_SCHEMA)
    assert sorted(df["thread_id"]) == ["p:o2", "p:r1"]
    row = next(r for r in rows if r["thread_id"] == "p:o2")
    assert [t["role"] for t in row["turns"]] == ["op", "commenter", "op"]
    assert row["turns"][0]["text"] == "Title\n\nBody & more"
    assert row["turns"][1]["text"] == "reach me at [email]"
    assert row["turns"][0]["author"] == row["turns"][2]["author"] != "OP" and len(row["turns"][0]["author"]) == 16
    assert row["siblings"] == [
        {
            "turn": 1,
            "utt_id": "s1",
            "author": Anonymizer("salt", True).author("B"),
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


def test_prefilter_is_case_and_space_insensitive():
    block = (
        b'{"subreddit":"offmychest","id":"a"}\n{"subreddit": "OffMyChest","id":"b"}\n'
        b'{"subreddit":"gaming","body":"see r/offmychest"}\n{"subreddit":"gaming","body":"\\"offmychest\\""}\n'
    )
    spans = _candidates(block, len(block), [b'"offmychest"'], _Scratch())
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
    assert len(rejects) == 3 and all(r["file"].endswith(".zst") and r["line"] > 1 for r in rejects)
    stats = json.loads(result.stats.read_text())
    t = stats["totals"]
    assert t["malformed"] == 3
    assert t["prefiltered_out"] > 20  # other subreddits' lines never reach the parser
    for reason in RecordFilter.REASONS:
        assert t["submissions"].get(reason, 0) + t["comments"].get(reason, 0) > 0, reason
    assert stats["threads"]["single_turn"] + stats["threads"]["multi_turn"] == df.height


def test_malformed_lines_reach_rejects_with_line_numbers(tmp_path):
    good = orjson.dumps(_comment())
    lines = [good, b'{"subreddit":"offmychest","body":"cut', good, b"", b'[1, "offmychest"]', b'{"subreddit":"gaming",']
    path = zst(tmp_path / "RC_m.zst", lines)
    result = stage_dump(path, tmp_path / "stage", IngestConfig())
    rejects = [json.loads(x) for x in (tmp_path / "stage" / "rejects.ndjson").read_text().splitlines()]
    assert [(r["line"], r["file"]) for r in rejects] == [(2, str(path)), (5, str(path))]
    assert result.stats["malformed"] == 2 and result.stats["comments"]["kept"] == 2  # the id repeats; merge dedupes
    assert result.stats["lines"] == 6


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
def test_ingest_flow_logs_counts_and_the_scheduled_flow_ingests_only_new_dumps(prefect_harness, sample, tmp_path):
    import mlflow

    from esvr.flows.ingest import ingest_flow, ingest_new_dumps

    run_dir = tmp_path / "run"
    config = load_config(None, [f"run.out_dir={run_dir}", "run.experiment=ingest-test"])
    artifacts = ingest_flow(config)  # no dumps: the sample dump
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
    assert ingest_new_dumps(config_path=str(recipe), min_age_s=0) == {}
    for p in sample["submissions"][1:] + sample["comments"][1:]:
        shutil.copy(p, folder / p.name)
    out = ingest_new_dumps(config_path=str(recipe), min_age_s=0)
    stats = json.loads(Path(out["ingest_stats"]).read_text())
    assert sorted(stats["staged_now"]) == ["RC_2021-07.zst", "RS_2021-07.zst"]
    assert sorted(stats["reused"]) == ["RC_2021-06.zst", "RS_2021-06.zst"]
    assert ingest_new_dumps(config_path=str(recipe), min_age_s=0) == {}
