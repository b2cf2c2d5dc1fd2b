"""Training data for the target value detector and the reference generator (paper §4-5, App. B).

From OP/commenter chains (threads.parquet) and per-utterance labels (labels.parquet):

- A commenter reply c_t is a *success* when the OP's next utterance o_{t+1} has positive valence
  (above `label.emotion.positive_valence`). The target values v_{t+1} that c_t promoted are the values
  *observed* in o_{t+1} (§5.1, App. D.1, Table 15's "up to 3"): those whose probability reaches
  the value detector's threshold, the `top_k` (3) most probable of them. An o_{t+1} in which no
  value is observed ("thanks!") promoted nothing and yields no example (counted
  ``no_observed_value``).
- TVD: history o_1..o_t -> 'v1, v2, v3' (Table 15's prompt).
- RG-SFT: history + v_{t+1} with definitions -> c_t (Table 16's prompt).
- RG-DPO (§5.2): chosen c_t, rejected a sibling c'_t drawn at random among the stored replies to
  o_t; the values v'_{t+1} observed in the OP's reply to c'_t (the same rule as v_{t+1}) are
  removed from v_{t+1}, so the rejected reply cannot have promoted what remains; pairs with none
  left are dropped and counted. A sibling the OP never answered shows no value it promoted:
  `dpo_sibling_without_reply` keeps its pair with v_{t+1} whole (default) or drops it.

Two settings (App. B): single-turn = three-part threads (OP, commenter, OP's final reply:
`single_turn_max_turns: 3`); multi-turn = every success in threads with further exchanges
(`multi_turn_min_turns: 5`). The two are disjoint. Examples repeated across overlapping chains are
kept once (same history utt_ids and same c_t). Splits are by Reddit post,
so no post (and hence no chain) is in two splits; the three datasets of a setting share them.

Everything is saved with `datasets` (``save_to_disk``) in TRL's conversational formats; see
docs/schemas.md for the layout.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import polars as pl

from esvr.models.config import InputFileError, Section
from esvr.models.emotion import POSITIVE_VALENCE
from esvr.prompts import value_names
from esvr.tasks.common.tables import read_parquet
from esvr.tasks.components.rg import rg_messages
from esvr.tasks.components.tvd import format_value_list, render_history, tvd_messages

Setting = Literal["single_turn", "multi_turn"]
SETTINGS: tuple[Setting, ...] = ("single_turn", "multi_turn")
KINDS = ("tvd", "rg_sft", "rg_dpo")
SPLITS = ("train", "dev", "test")


class DatasetsConfig(Section):
    """How threads and labels become TVD / RG-SFT / RG-DPO datasets."""

    #: a value is observed in an utterance when its probability reaches this; None = the label
    #: stage's detector threshold (label.values), which the build_datasets flow fills in
    value_threshold: float | None = None
    #: v_{t+1} = at most this many of the values observed in o_{t+1}, most probable first
    #: (paper §5.1 / Table 15: up to 3)
    top_k: int = 3
    settings: list[Setting] = ["single_turn", "multi_turn"]
    #: chains shorter than this (in utterances) are single exchanges and feed only single-turn
    multi_turn_min_turns: int = 5
    #: single-turn takes (o_1, c_1, o_2) from chains of at most this many utterances. 3 = the
    #: paper's three-part threads (App. B), disjoint from multi-turn; None = the first exchange of
    #: every chain, long threads included
    single_turn_max_turns: int | None = 3
    #: dev and test sizes: a fraction of the setting's examples (< 1) or a count (>= 1).
    #: Defaults are Table 4's single-turn proportions (2,000 and 1,000 of 21,459)
    dev_size: float = 0.093
    test_size: float = 0.047
    #: each utterance in a prompt is cut to this many characters (None: whole). Reddit posts can
    #: run to thousands of words; the cap keeps prompts within the trainers' max_length
    max_chars_per_utterance: int | None = None
    #: DPO: how many of o_{t+1}'s observed values (most probable first) are candidates before the
    #: rejected reply's values are removed. 3 = v_{t+1} exactly as the paper defines it; more lets
    #: removal back-fill from further observed values
    dpo_candidate_values: int = 3
    #: DPO: a drawn sibling the OP never replied to. 'keep': its pair keeps v_{t+1} whole (the
    #: sibling elicited no value from the OP, so it cannot have promoted one); 'drop': no pair
    dpo_sibling_without_reply: Literal["keep", "drop"] = "keep"
    seed: int = 0


# --------------------------------------------------------------------------------------------
# Reading and validating inputs
# --------------------------------------------------------------------------------------------

_THREAD_COLUMNS = {"thread_id", "post_id", "turns", "siblings"}
_TURN_FIELDS = {"utt_id", "role", "text"}
_LABEL_COLUMNS = {"utt_id", "valence", "values"}


def read_threads(path: str | Path) -> pl.DataFrame:
    path = Path(path)
    df = read_parquet(path, "threads", _THREAD_COLUMNS)
    turn_type = df.schema["turns"]
    if not isinstance(turn_type, pl.List) or not isinstance(turn_type.inner, pl.Struct):
        raise InputFileError(f"{path}: column 'turns' must be list<struct>, got {turn_type}")
    fields = {f.name for f in turn_type.inner.fields}
    if not _TURN_FIELDS <= fields:
        raise InputFileError(f"{path}: column 'turns' structs lack field(s) {sorted(_TURN_FIELDS - fields)}")
    return df


def read_labels(path: str | Path) -> dict[str, tuple[float, list[float]]]:
    """utt_id -> (valence, 20 value probabilities)."""
    path = Path(path)
    df = read_parquet(path, "labels", _LABEL_COLUMNS)
    n_values = len(value_names())
    out: dict[str, tuple[float, list[float]]] = {}
    for utt, valence, vals in zip(df["utt_id"].to_list(), df["valence"].to_list(), df["values"].to_list()):
        if vals is None or len(vals) != n_values:
            raise ValueError(
                f"{path}: column 'values' of utt_id {utt!r} has {None if vals is None else len(vals)} entries, expected {n_values}"
            )
        out[utt] = (float(valence), [float(v) for v in vals])
    return out


def top_values(probs: Sequence[float], k: int) -> list[str]:
    """The k value names with the highest probabilities, highest first (ties: taxonomy order)."""
    names = value_names()
    order = sorted(range(len(names)), key=lambda i: (-probs[i], i))
    return [names[i] for i in order[:k]]


def observed_values(probs: Sequence[float], threshold: float, k: int | None = None) -> list[str]:
    """The values observed in an utterance: probability >= `threshold`, most probable first, at
    most `k` of them (None: all)."""
    ranked = top_values(probs, len(probs))
    names = value_names()
    kept = [v for v in ranked if probs[names.index(v)] >= threshold]
    return kept if k is None else kept[:k]


def _threshold(cfg: DatasetsConfig) -> float:
    if cfg.value_threshold is None:
        raise ValueError(
            "datasets.value_threshold is unset: give the value detector's threshold "
            "(the build_datasets flow takes it from label.values)"
        )
    return cfg.value_threshold


# --------------------------------------------------------------------------------------------
# Success examples
# --------------------------------------------------------------------------------------------


def _example_id(history_ids: Sequence[str], reply_id: str) -> str:
    return hashlib.blake2b("|".join([*history_ids, "->", reply_id]).encode(), digest_size=8).hexdigest()


def extract_examples(
    threads: pl.DataFrame,
    labels: dict[str, tuple[float, list[float]]],
    cfg: DatasetsConfig,
    setting: Setting,
    positive_valence: float = POSITIVE_VALENCE,
) -> tuple[list[dict[str, Any]], Counter]:
    """Success examples of one setting, deduplicated, with counters of what was skipped.
    `positive_valence`: the label section's `emotion.positive_valence` (o_{t+1} is positive above it)."""
    stats: Counter = Counter()
    threshold = _threshold(cfg)
    seen: set[tuple[tuple[str, ...], str]] = set()
    examples: list[dict[str, Any]] = []
    for row in threads.iter_rows(named=True):
        turns = row["turns"]
        if len(turns) < 3 or len(turns) % 2 == 0:
            stats["malformed_chains"] += 1
            continue
        if setting == "multi_turn" and len(turns) < cfg.multi_turn_min_turns:
            continue
        if setting == "single_turn" and cfg.single_turn_max_turns is not None and len(turns) > cfg.single_turn_max_turns:
            continue
        stats["chains"] += 1
        # o_{t+1} sits at even indices 2, 4, ...; single-turn looks only at o_2
        positions = [2] if setting == "single_turn" else range(2, len(turns), 2)
        for i in positions:
            nxt, reply = turns[i], turns[i - 1]
            stats["op_replies"] += 1
            label = labels.get(nxt["utt_id"])
            if label is None:
                stats["unlabeled"] += 1
                continue
            valence, probs = label
            if not valence > positive_valence:
                stats["not_positive"] += 1
                continue
            observed = observed_values(probs, threshold)
            if not observed:
                stats["no_observed_value"] += 1
                continue
            history = turns[: i - 1]
            key = (tuple(t["utt_id"] for t in history), reply["utt_id"])
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
            stats["success"] += 1
            examples.append(
                {
                    "example_id": _example_id(*key),
                    "setting": setting,
                    "thread_id": row["thread_id"],
                    "post_id": row["post_id"],
                    "turn": (i - 1) // 2 + 1,  # t, 1-based: c_t answers o_t
                    "history": [{"utt_id": t["utt_id"], "role": t["role"], "text": t["text"]} for t in history],
                    "reply_utt_id": reply["utt_id"],
                    "reply": reply["text"],
                    "next_utt_id": nxt["utt_id"],
                    "next_valence": valence,
                    "target_values": observed[: cfg.top_k],
                    "_observed": observed,
                    "_siblings": [s for s in (row.get("siblings") or []) if s["turn"] == i - 1],
                }
            )
    return examples, stats


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _target(size: float, n: int) -> int:
    if size < 0:
        raise ValueError(f"split size must be >= 0, got {size}")
    count = round(size * n) if size < 1 else int(size)
    if size > 0 and count == 0 and n >= 3:
        count = 1  # a tiny dataset still gets a non-empty dev and test split
    return min(count, n)


def assign_splits(examples: Sequence[dict[str, Any]], dev_size: float, test_size: float, seed: int) -> dict[str, str]:
    """post_id -> 'train'|'dev'|'test', whole posts at a time (no post, hence no chain, in two splits).

    Posts are shuffled with `seed`; test fills first, then dev, each until it holds at least its
    target number of examples; everything else is train. Sizes that would leave no training
    example shrink.
    """
    per_post = Counter(ex["post_id"] for ex in examples)
    posts = sorted(per_post)
    random.Random(seed).shuffle(posts)
    n = len(examples)
    n_test, n_dev = _target(test_size, n), _target(dev_size, n)
    if n_test + n_dev >= n:
        # A small setting (few multi-turn chains, a demo) still keeps training data: counts meant
        # for a large dump shrink to leave at least one example for train.
        n_test = min(n_test, max(0, (n - 1) // 2))
        n_dev = min(n_dev, max(0, n - 1 - n_test))
    targets = [("test", n_test), ("dev", n_dev)]
    assignment: dict[str, str] = {}
    it = iter(posts)
    for split, target in targets:
        filled = 0
        while filled < target:
            post = next(it, None)
            if post is None:
                break
            assignment[post] = split
            filled += per_post[post]
    for post in it:
        assignment[post] = "train"
    return assignment


# --------------------------------------------------------------------------------------------
# DPO pairs
# --------------------------------------------------------------------------------------------


def dpo_pair(
    example: dict[str, Any], labels: dict[str, tuple[float, list[float]]], cfg: DatasetsConfig, stats: Counter
) -> dict[str, Any] | None:
    """The preference pair for a success example, or None (counted in `stats`)."""
    siblings = [s for s in example["_siblings"] if s["utt_id"] != example["reply_utt_id"] and (s.get("text") or "").strip()]
    if not siblings:
        stats["dpo_no_sibling"] += 1
        return None
    rng = random.Random(f"{cfg.seed}:{example['example_id']}")
    sibling = rng.choice(sorted(siblings, key=lambda s: s["utt_id"]))
    stats["dpo_siblings_drawn"] += 1
    replies = sibling.get("op_replies") or []
    if replies:
        stats["dpo_sibling_with_op_reply"] += 1
    elif cfg.dpo_sibling_without_reply == "drop":
        stats["dpo_sibling_without_reply_dropped"] += 1
        return None
    expressed: set[str] = set()  # v'_{t+1}: observed in the OP's reply (or replies) to c'_t
    for reply in replies:
        label = labels.get(reply["utt_id"])
        if label is None:
            stats["dpo_sibling_reply_unlabeled"] += 1
            continue
        expressed.update(observed_values(label[1], _threshold(cfg), cfg.top_k))
    candidates = example["_observed"][: cfg.dpo_candidate_values]
    remaining = [v for v in candidates if v not in expressed][: cfg.top_k]
    if not remaining:
        stats["dpo_no_values_left"] += 1
        return None
    if len(remaining) < len(example["target_values"]):
        stats["dpo_values_reduced"] += 1
    stats["dpo_pairs"] += 1
    return {
        "target_values": remaining,
        "original_target_values": list(example["target_values"]),
        "rejected_utt_id": sibling["utt_id"],
        "rejected_reply": sibling["text"],
        "rejected_expressed_values": sorted(expressed, key=value_names().index),
    }


# --------------------------------------------------------------------------------------------
# Formatting and saving
# --------------------------------------------------------------------------------------------


def _features(kind: str):
    from datasets import Features, List, Value

    msg = List({"role": Value("string"), "content": Value("string")})
    base = {
        "example_id": Value("string"),
        "setting": Value("string"),
        "thread_id": Value("string"),
        "post_id": Value("string"),
        "turn": Value("int32"),
        "history": List({"utt_id": Value("string"), "role": Value("string"), "text": Value("string")}),
        "reply_utt_id": Value("string"),
        "reply": Value("string"),
        "next_utt_id": Value("string"),
        "next_valence": Value("float32"),
        "target_values": List(Value("string")),
        "prompt": msg,
    }
    if kind == "rg_dpo":
        base.update(
            original_target_values=List(Value("string")),
            rejected_utt_id=Value("string"),
            rejected_reply=Value("string"),
            rejected_expressed_values=List(Value("string")),
            chosen=msg,
            rejected=msg,
        )
    else:
        base["completion"] = msg
    return Features(base)


def format_rows(example: dict[str, Any], kind: str, cfg: DatasetsConfig, pair: dict[str, Any] | None = None) -> dict[str, Any]:
    row = {k: v for k, v in example.items() if not k.startswith("_")}
    history = render_history(example["history"], cfg.max_chars_per_utterance)
    if kind == "tvd":
        row["prompt"] = tvd_messages(history, "zero_shot")
        row["completion"] = [{"role": "assistant", "content": format_value_list(example["target_values"])}]
    elif kind == "rg_sft":
        row["prompt"] = rg_messages(history, example["target_values"])
        row["completion"] = [{"role": "assistant", "content": example["reply"]}]
    else:
        assert pair is not None
        row.update(pair)
        row["prompt"] = rg_messages(history, pair["target_values"])
        row["chosen"] = [{"role": "assistant", "content": example["reply"]}]
        row["rejected"] = [{"role": "assistant", "content": pair["rejected_reply"]}]
    return row


def build_datasets(
    threads_path: str | Path,
    labels_path: str | Path,
    cfg: DatasetsConfig,
    out_dir: str | Path,
    positive_valence: float = POSITIVE_VALENCE,
) -> dict[str, Any]:
    """Build and save every dataset; returns the manifest (also written to ``manifest.json``).

    Manifest: ``{"root", "config", "paths": {setting: {kind: dir}}, "stats": {setting: {...}}}``.
    """
    from datasets import Dataset, DatasetDict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = read_threads(threads_path)
    labels = read_labels(labels_path)
    manifest: dict[str, Any] = {
        "root": str(out),
        "config": cfg.model_dump(mode="json"),
        "positive_valence": positive_valence,
        "paths": {},
        "stats": {},
    }
    for setting in cfg.settings:
        examples, stats = extract_examples(threads, labels, cfg, setting, positive_valence)
        split_of = assign_splits(examples, cfg.dev_size, cfg.test_size, cfg.seed)
        rows: dict[str, dict[str, list]] = {k: {s: [] for s in SPLITS} for k in KINDS}
        value_counts: Counter = Counter()
        for ex in examples:
            split = split_of[ex["post_id"]]
            value_counts.update(ex["target_values"])
            rows["tvd"][split].append(format_rows(ex, "tvd", cfg))
            rows["rg_sft"][split].append(format_rows(ex, "rg_sft", cfg))
            pair = dpo_pair(ex, labels, cfg, stats)
            if pair is not None:
                rows["rg_dpo"][split].append(format_rows(ex, "rg_dpo", cfg, pair))
        manifest["paths"][setting] = {}
        for kind in KINDS:
            features = _features(kind)
            dd = DatasetDict(
                {
                    # an empty split still needs its columns, which from_list([]) would not give it
                    s: Dataset.from_list(rows[kind][s], features=features)
                    if rows[kind][s]
                    else Dataset.from_dict({c: [] for c in features}, features=features)
                    for s in SPLITS
                }
            )
            path = out / setting / kind
            # one shard per split: datasets writes zero shards for an empty split and cannot read it back
            dd.save_to_disk(str(path), num_shards={s: 1 for s in SPLITS})
            manifest["paths"][setting][kind] = str(path)
            for s in SPLITS:
                stats[f"{kind}.{s}"] = len(rows[kind][s])
        stats["posts"] = len(split_of)
        for s in SPLITS:
            stats[f"posts.{s}"] = sum(1 for v in split_of.values() if v == s)
        manifest["stats"][setting] = {
            **{k: int(v) for k, v in sorted(stats.items())},
            "mean_next_valence": sum(ex["next_valence"] for ex in examples) / len(examples) if examples else 0.0,
            "mean_target_values": sum(len(ex["target_values"]) for ex in examples) / len(examples) if examples else 0.0,
            # §5.2's removal needs the OP's reply to the drawn sibling: how often there is one
            "dpo_sibling_op_reply_share": stats["dpo_sibling_with_op_reply"] / stats["dpo_siblings_drawn"]
            if stats["dpo_siblings_drawn"]
            else 0.0,
            "target_value_counts": {n: value_counts.get(n, 0) for n in value_names()},
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def load_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no datasets manifest at {path}; run the build_datasets stage first")
    return json.loads(path.read_text())


def load_split(manifest: dict[str, Any], setting: str, kind: str, split: str):
    """One split of one dataset, e.g. ``load_split(m, 'single_turn', 'rg_dpo', 'train')``."""
    from datasets import load_from_disk

    try:
        path = manifest["paths"][setting][kind]
    except KeyError:
        built = {s: sorted(k) for s, k in manifest.get("paths", {}).items()}
        raise KeyError(f"datasets manifest has no {setting}/{kind}; built: {built}") from None
    return load_from_disk(path)[split]


def stats_metrics(manifest: dict[str, Any]) -> dict[str, float]:
    """Flat numeric statistics for MLflow: ``<setting>.<counter>``."""
    out: dict[str, float] = {}
    for setting, stats in manifest["stats"].items():
        for key, value in stats.items():
            if isinstance(value, (int, float)):
                out[f"{setting}.{key}"] = float(value)
            elif isinstance(value, dict):
                for name, count in value.items():
                    out[f"{setting}.{key}.{name}"] = float(count)
    return out
