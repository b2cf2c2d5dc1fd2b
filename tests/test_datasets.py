"""Dataset construction on hand-built threads and labels (tasks/components/datasets.py)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from esvr.prompts import value_names
from esvr.tasks.components.datasets import (
    DatasetsConfig,
    assign_splits,
    build_datasets,
    extract_examples,
    load_split,
    observed_values,
    read_labels,
    read_threads,
    stats_metrics,
    top_values,
)

V = value_names()
#: the value detector's decision threshold in these tests: probs() puts its ranked values at 0.9,
#: 0.8, 0.7 and everything else below 0.05
THRESHOLD = 0.5


def config(**kw) -> DatasetsConfig:
    return DatasetsConfig(value_threshold=THRESHOLD, **kw)


def probs(*top: int) -> list[float]:
    """20 probabilities where the given value indexes rank first, in the given order."""
    p = [0.01 * (i % 5) for i in range(20)]
    for rank, idx in enumerate(top):
        p[idx] = 0.9 - 0.1 * rank
    return p


def turn(utt: str, role: str, text: str | None = None) -> dict:
    return {
        "utt_id": utt,
        "role": role,
        "author": "op" if role == "op" else f"a_{utt}",
        "text": text or f"text {utt}",
        "score": 5,
        "created_utc": 0,
    }


def chain(thread_id: str, post_id: str, utts: str, siblings: list[dict] | None = None) -> dict:
    """A chain of turns (utterance ids separated by spaces) that starts with the OP and alternates."""
    ids = utts.split()
    turns = [turn(u, "op" if i % 2 == 0 else "commenter") for i, u in enumerate(ids)]
    return {"thread_id": thread_id, "post_id": post_id, "turns": turns, **({"siblings": siblings} if siblings else {})}


def sibling(at: int, utt: str, replies: list[str]) -> dict:
    return {
        "turn": at,
        "utt_id": utt,
        "author": f"a_{utt}",
        "text": f"sibling {utt}",
        "score": 1,
        "op_replies": [{"utt_id": r, "text": f"reply {r}"} for r in replies],
    }


def write_inputs(tmp: Path, chains: list[dict], labels: dict[str, tuple[float, list[float]]]) -> tuple[Path, Path]:
    rows = [
        {
            "thread_id": c["thread_id"],
            "post_id": c["post_id"],
            "subreddit": "offmychest",
            "created_utc": 0,
            "dump": "RS_x",
            "turns": c["turns"],
            "siblings": c.get("siblings", []),
        }
        for c in chains
    ]
    schema = {
        "thread_id": pl.String,
        "post_id": pl.String,
        "subreddit": pl.String,
        "created_utc": pl.Int64,
        "dump": pl.String,
        "turns": pl.List(
            pl.Struct(
                {
                    "utt_id": pl.String,
                    "role": pl.String,
                    "author": pl.String,
                    "text": pl.String,
                    "score": pl.Int64,
                    "created_utc": pl.Int64,
                }
            )
        ),
        "siblings": pl.List(
            pl.Struct(
                {
                    "turn": pl.Int32,
                    "utt_id": pl.String,
                    "author": pl.String,
                    "text": pl.String,
                    "score": pl.Int64,
                    "op_replies": pl.List(pl.Struct({"utt_id": pl.String, "text": pl.String})),
                }
            )
        ),
    }
    threads = tmp / "threads.parquet"
    pl.DataFrame(rows, schema=schema).write_parquet(threads)
    lab = pl.DataFrame(
        {
            "utt_id": list(labels),
            "valence": [v for v, _ in labels.values()],
            "sentiment": [1] * len(labels),
            "values": [p for _, p in labels.values()],
        },
        schema={"utt_id": pl.String, "valence": pl.Float32, "sentiment": pl.Int8, "values": pl.List(pl.Float32)},
    )
    label_path = tmp / "labels.parquet"
    lab.write_parquet(label_path)
    return threads, label_path


def hand_built(tmp: Path, extra_posts: int = 0) -> tuple[Path, Path]:
    """Post p1: two overlapping chains sharing (o1, c1, o2); p2: a negative reply; p3: no siblings."""
    chains = [
        chain("t1", "p1", "u1 u2 u3", [sibling(1, "s1", ["s1r"])]),
        chain("t2", "p1", "u1 u2 u3 u4 u5", [sibling(1, "s1", ["s1r"]), sibling(3, "s2", ["s2r"])]),
        chain("t3", "p2", "w1 w2 w3"),
        chain("t4", "p3", "x1 x2 x3"),
        chain("t5", "p4", "y1 y2 y3"),  # exactly at the threshold: not a success
    ]
    labels = {
        "u3": (0.8, probs(0, 1, 2)),  # success: v = V0, V1, V2
        "u5": (0.9, probs(3, 4, 5)),  # success: v = V3, V4, V5
        "s1r": (0.2, probs(1, 7, 8)),  # after sibling s1 the OP expressed V1 -> removed from v
        "s2r": (0.7, probs(5, 4, 3)),  # after sibling s2 the OP expressed all of V3..V5 -> pair dropped
        "w3": (0.1, probs(0, 1, 2)),
        "x3": (0.6, probs(9, 10, 11)),
        "y3": (0.5, probs(0, 1, 2)),
    }
    for k in range(extra_posts):
        chains.append(
            {
                "thread_id": f"e{k}",
                "post_id": f"ep{k}",
                "turns": [turn(f"e{k}a", "op"), turn(f"e{k}b", "commenter"), turn(f"e{k}c", "op")],
                "siblings": [sibling(1, f"e{k}s", [])],
            }
        )
        labels[f"e{k}c"] = (0.7, probs(k % 20, (k + 1) % 20, (k + 2) % 20))
    return write_inputs(tmp, chains, labels)


def test_top_values_orders_by_probability():
    assert top_values(probs(7, 2, 19), 3) == [V[7], V[2], V[19]]


def test_target_values_are_the_observed_ones():
    # observed = at or above the detector's threshold, most probable first, up to k
    p = probs(7, 2, 19)
    assert observed_values(p, 0.75) == [V[7], V[2]]
    assert observed_values(p, 0.8) == [V[7], V[2]]  # "reaches" the threshold
    assert observed_values(p, 0.5, 2) == [V[7], V[2]]
    assert observed_values(p, 0.95) == []
    assert observed_values(probs(1, 2, 3, 4, 5), 0.5, 3) == [V[1], V[2], V[3]]


def test_success_rule_top3_and_dedupe(tmp_path: Path):
    threads, labels = hand_built(tmp_path)
    df, lab = read_threads(threads), read_labels(labels)
    cfg = config()

    single, stats = extract_examples(df, lab, cfg, "single_turn")
    # u3 (0.8) and x3 (0.6) succeed; w3 (0.1) and y3 (exactly 0.5) do not
    assert sorted(e["next_utt_id"] for e in single) == ["u3", "x3"]
    assert stats["not_positive"] == 2
    ex = next(e for e in single if e["next_utt_id"] == "u3")
    assert ex["target_values"] == [V[0], V[1], V[2]]
    assert ex["reply"] == "text u2" and [h["utt_id"] for h in ex["history"]] == ["u1"]
    # single-turn = three-part threads (App. B): (u1, u2, u3) comes from t1, not from the
    # first exchange of the longer t2
    assert [e["thread_id"] for e in single if e["next_utt_id"] == "u3"] == ["t1"] and stats["chains"] == 4

    multi, _ = extract_examples(df, lab, cfg, "multi_turn")
    # only the 5-utterance chain t2 is multi-turn; both of its successes count
    assert [(e["next_utt_id"], e["turn"]) for e in multi] == [("u3", 1), ("u5", 2)]
    assert [h["utt_id"] for h in multi[1]["history"]] == ["u1", "u2", "u3"]
    assert multi[1]["target_values"] == [V[3], V[4], V[5]]

    # the one multi-turn example that is also a first exchange is not a single-turn one
    assert {e["example_id"] for e in single}.isdisjoint(e["example_id"] for e in multi if e["turn"] > 1)
    every_first, every_stats = extract_examples(df, lab, cfg.model_copy(update={"single_turn_max_turns": None}), "single_turn")
    assert every_stats["chains"] == 5 and every_stats["duplicates"] == 1  # (u1,u2)->u3 once only
    assert sorted(e["next_utt_id"] for e in every_first) == ["u3", "x3"]

    stricter, _ = extract_examples(df, lab, cfg, "single_turn", positive_valence=0.7)
    assert [e["next_utt_id"] for e in stricter] == ["u3"]


def test_an_op_reply_that_expresses_fewer_values_has_fewer_targets(tmp_path: Path):
    """v_{t+1} holds only the values observed in o_{t+1}; none observed -> no example."""
    low = [0.01] * 20
    one = list(low)
    one[6] = 0.6
    chains = [
        {
            "thread_id": f"t{k}",
            "post_id": f"p{k}",
            "turns": [turn(f"o{k}", "op"), turn(f"c{k}", "commenter"), turn(f"r{k}", "op")],
        }
        for k in range(3)
    ]
    labels = {"r0": (0.9, probs(4, 8, 12, 16)), "r1": (0.9, one), "r2": (0.9, low)}
    threads, labels_path = write_inputs(tmp_path, chains, labels)
    examples, stats = extract_examples(read_threads(threads), read_labels(labels_path), config(), "single_turn")
    assert {e["next_utt_id"]: e["target_values"] for e in examples} == {"r0": [V[4], V[8], V[12]], "r1": [V[6]]}
    assert stats["no_observed_value"] == 1 and stats["success"] == 2
    with pytest.raises(ValueError, match="datasets.value_threshold is unset"):
        extract_examples(read_threads(threads), read_labels(labels_path), DatasetsConfig(), "single_turn")


def test_dpo_sibling_rejection_and_value_removal(tmp_path: Path):
    threads, labels = hand_built(tmp_path)
    cfg = config(dev_size=0, test_size=0)
    manifest = build_datasets(threads, labels, cfg, tmp_path / "out")

    dpo = load_split(manifest, "multi_turn", "rg_dpo", "train")
    assert len(dpo) == 1  # u5's pair is dropped: the sibling's reply expressed all of V3..V5
    row = dpo[0]
    assert row["chosen"] == [{"role": "assistant", "content": "text u2"}]
    assert row["rejected"] == [{"role": "assistant", "content": "sibling s1"}]
    assert row["original_target_values"] == [V[0], V[1], V[2]]
    assert row["target_values"] == [V[0], V[2]]  # V1 was expressed after the rejected sibling
    assert V[1] not in row["prompt"][1]["content"] and V[2] in row["prompt"][1]["content"]
    stats = manifest["stats"]
    assert stats["multi_turn"]["dpo_no_values_left"] == 1
    assert stats["single_turn"]["dpo_no_sibling"] == 1  # x3's comment had no sibling
    assert stats["single_turn"]["rg_dpo.train"] == 1

    sft = load_split(manifest, "single_turn", "rg_sft", "train")
    tvd = load_split(manifest, "single_turn", "tvd", "train")
    assert len(sft) == len(tvd) == 2
    # TRL's conversational prompt/completion format
    first = tvd.filter(lambda r: r["next_utt_id"] == "u3")[0]
    assert [m["role"] for m in first["prompt"]] == ["system", "user"]
    assert first["completion"] == [{"role": "assistant", "content": f"{V[0]}, {V[1]}, {V[2]}"}]
    assert "Patient: text u1" in first["prompt"][1]["content"]
    metrics = stats_metrics(manifest)
    assert metrics["single_turn.success"] == 2.0


def test_splits_keep_posts_apart_and_follow_sizes(tmp_path: Path):
    threads, labels = hand_built(tmp_path, extra_posts=40)
    cfg = config(dev_size=0.2, test_size=5)
    manifest = build_datasets(threads, labels, cfg, tmp_path / "out")
    posts: dict[str, set[str]] = {}
    chains: dict[str, set[str]] = {}
    sizes = {}
    for kind in ("tvd", "rg_sft", "rg_dpo"):
        for split in ("train", "dev", "test"):
            ds = load_split(manifest, "single_turn", kind, split)
            sizes[(kind, split)] = len(ds)
            for row in ds:
                posts.setdefault(row["post_id"], set()).add(split)
                chains.setdefault(row["thread_id"], set()).add(split)
    assert all(len(s) == 1 for s in posts.values()), "a post appears in two splits"
    assert all(len(s) == 1 for s in chains.values()), "a thread appears in two splits"
    n = sum(sizes[("tvd", s)] for s in ("train", "dev", "test"))
    assert n == 42
    assert sizes[("tvd", "test")] == 5 and sizes[("tvd", "dev")] == round(0.2 * 42)
    assert sizes[("rg_sft", "test")] == sizes[("tvd", "test")]
    # the same post -> split map for every kind
    tvd_test = {r["example_id"] for r in load_split(manifest, "single_turn", "tvd", "test")}
    assert {r["example_id"] for r in load_split(manifest, "single_turn", "rg_dpo", "test")} <= tvd_test


def test_assign_splits_leaves_training_data_in_small_settings():
    examples = [{"post_id": f"p{i}"} for i in range(4)]
    split_of = assign_splits(examples, dev_size=1000, test_size=2000, seed=0)
    assert sorted(split_of.values()) == ["dev", "dev", "test", "train"]
    assert set(assign_splits(examples[:2], dev_size=0.5, test_size=0.5, seed=0).values()) == {"train", "dev"}


def test_bad_inputs_name_file_and_column(tmp_path: Path):
    bad = tmp_path / "threads.parquet"
    pl.DataFrame({"thread_id": ["a"], "post_id": ["b"]}).write_parquet(bad)
    with pytest.raises(ValueError, match=r"threads.parquet: missing column\(s\) \['siblings', 'turns'\]"):
        read_threads(bad)
    lab = tmp_path / "labels.parquet"
    pl.DataFrame({"utt_id": ["a"], "valence": [0.7], "values": [[0.1, 0.2]]}).write_parquet(lab)
    with pytest.raises(ValueError, match="column 'values' of utt_id 'a' has 2 entries, expected 20"):
        read_labels(lab)


def test_missing_inputs_name_the_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="threads file not found: .*threads.parquet"):
        read_threads(tmp_path / "threads.parquet")
    with pytest.raises(FileNotFoundError, match="labels file not found: .*labels.parquet"):
        read_labels(tmp_path / "labels.parquet")
    lab = tmp_path / "labels.parquet"
    pl.DataFrame({"utt_id": ["a"]}).write_parquet(lab)
    with pytest.raises(ValueError, match=r"labels.parquet: missing column\(s\) \['valence', 'values'\]"):
        read_labels(lab)


def test_dpo_removes_only_values_observed_after_the_sibling(tmp_path: Path):
    """v'_{t+1} follows v_{t+1}'s rule: a value below the threshold in the OP's reply to the
    sibling was not expressed and stays a target; a sibling without an OP reply is kept whole or
    dropped as configured, and the share of drawn siblings with a reply is reported."""
    below = probs(0, 1, 2)
    below[0] = 0.3  # V0 ranks in the sibling reply's top 3 but is not observed
    chains = [
        chain("t1", "p1", "a1 a2 a3", [sibling(1, "as", ["asr"])]),
        chain("t2", "p2", "b1 b2 b3", [sibling(1, "bs", [])]),
    ]
    labels = {"a3": (0.9, probs(0, 1, 2)), "asr": (0.2, below), "b3": (0.9, probs(3, 4, 5))}
    threads, labels_path = write_inputs(tmp_path, chains, labels)
    manifest = build_datasets(threads, labels_path, config(dev_size=0, test_size=0, settings=["single_turn"]), tmp_path / "keep")
    rows = {r["next_utt_id"]: r for r in load_split(manifest, "single_turn", "rg_dpo", "train")}
    assert rows["a3"]["target_values"] == [V[0]] and rows["a3"]["rejected_expressed_values"] == [V[1], V[2]]
    assert rows["b3"]["target_values"] == [V[3], V[4], V[5]] and rows["b3"]["rejected_expressed_values"] == []
    stats = manifest["stats"]["single_turn"]
    assert stats["dpo_siblings_drawn"] == 2 and stats["dpo_sibling_with_op_reply"] == 1
    assert stats["dpo_sibling_op_reply_share"] == 0.5

    drop = config(dev_size=0, test_size=0, settings=["single_turn"], dpo_sibling_without_reply="drop")
    manifest = build_datasets(threads, labels_path, drop, tmp_path / "drop")
    assert [r["next_utt_id"] for r in load_split(manifest, "single_turn", "rg_dpo", "train")] == ["a3"]
    assert manifest["stats"]["single_turn"]["dpo_sibling_without_reply_dropped"] == 1


def test_the_flow_takes_the_labelling_detectors_threshold():
    """Without datasets.value_threshold, 'observed' means what the label stage's detector marks."""
    from esvr.models.value_detector import DEFAULT_HEAD, SCHROTER_THRESHOLD, ValueDetectorConfig, ValueHead
    from esvr.tasks.common.roles import value_threshold

    assert value_threshold(ValueDetectorConfig()) == pytest.approx(ValueHead.load(DEFAULT_HEAD).threshold)
    assert value_threshold(ValueDetectorConfig(backend="hf")) == SCHROTER_THRESHOLD
    assert value_threshold(ValueDetectorConfig(backend="hf", threshold=0.4)) == 0.4


def test_a_capped_turn_stores_a_uniform_sample_of_its_siblings():
    """ingest.max_siblings bounds what is stored, not the draw: over the cap the stored siblings are
    a uniform sample of all, so the answered ones are not favoured and a random stored sibling is
    a random sibling (§5.2)."""
    from test_ingest import tree

    from esvr.tasks.reddit.ingest import chain_siblings

    # c1 answered by the OP, and 400 siblings of which the OP answered the first 100
    edges = [("c1", "post", "A"), ("o2", "c1", "OP")]
    for i in range(400):
        edges.append((f"s{i}", "post", f"U{i}"))
        if i < 100:
            edges.append((f"r{i}", f"s{i}", "OP"))
    post = tree(edges)
    chain = [post, *[c for c in post.children if c.id == "c1"], post.children[0].children[0]]
    kept = chain_siblings(chain, "OP", max_siblings=40)
    assert len(kept) == 40 and len({s.id for _, s, _ in kept}) == 40
    answered = sum(bool(replies) for _, _, replies in kept)
    assert 4 <= answered <= 17, answered  # a quarter of all siblings were answered: ~10 of 40, not 40
    assert {s.id for _, s, _ in chain_siblings(chain, "OP", max_siblings=40)} == {s.id for _, s, _ in kept}  # reproducible
