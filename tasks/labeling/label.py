"""Stage 2, label: every utterance of threads.parquet gets valence, sentiment and 20 value probabilities.

The paper labels OP posts and comments with EmoLlama-chat-7B (sentiment strength) and Schroter et
al.'s value ensemble (§4); positive OP comments then mark successful target values. This module
holds the stage's config sections and its plain functions:

- `collect_utterances`: the unique utterances of threads.parquet (turns, siblings and the OP's
  replies to siblings), each utt_id once, in order of first appearance.
- `label_utterances`: labels the utterances the store has no label for. Labels are stored per
  utterance, keyed by utt_id, text digest and the labelers' fingerprint, in chunk files written
  as each chunk finishes: a crashed or repeated run redoes nothing, a new dump's utterances are
  labelled alone wherever they fall in the order, and a changed labeler (a new fingerprint)
  labels everything again.
- `label_threads`: the stage: threads.parquet in, labels.parquet (schema in docs/schemas.md) out.
- `label_on_runner`: the same stage with one task per chunk of new utterances, mapped by the
  runner the flow hands in (a Dask or Ray cluster: ``orchestration``); each worker process builds
  the labelers once (`process_labelers`) and writes to the same store, so either form reuses the
  other's work.

The labelers themselves are built by `esvr.tasks.common.roles.labelers`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from esvr.models.config import Section
from esvr.models.emotion import EmotionConfig
from esvr.models.text import normalize_texts
from esvr.models.value_detector import ValueDetectorConfig, marking_rates
from esvr.prompts import value_names
from esvr.tasks.common.roles import labelers
from esvr.tasks.common.tables import read_parquet

if TYPE_CHECKING:
    from esvr.models.emotion import EmotionScorer
    from esvr.models.value_detector import ValueDetector
    from esvr.tasks.common.shards import MapRunner

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


class LabelConfig(Section):
    values: ValueDetectorConfig = ValueDetectorConfig()
    emotion: EmotionConfig = EmotionConfig()
    #: utterances per cached chunk: large enough to batch well, small enough to lose little on a crash
    chunk_size: int = 2048
    progress: bool = True


# --------------------------------------------------------------------------------------------
# labels.parquet
# --------------------------------------------------------------------------------------------

N_VALUES = 20
LABELS_SCHEMA = pl.Schema({"utt_id": pl.String, "valence": pl.Float32, "sentiment": pl.Int8, "values": pl.List(pl.Float32)})


def validate_labels(df: pl.DataFrame, source: str = "labels.parquet") -> pl.DataFrame:
    """Check the labels.parquet contract; errors name the file and the column."""
    for name, dtype in LABELS_SCHEMA.items():
        if name not in df.columns:
            raise ValueError(f"{source}: column {name!r} missing (has {df.columns})")
        if df.schema[name] != dtype:
            raise ValueError(f"{source}: column {name!r} has type {df.schema[name]}, expected {dtype}")
    if df["utt_id"].null_count() or df["utt_id"].n_unique() != df.height:
        raise ValueError(f"{source}: column 'utt_id' must be unique and non-null")
    lengths = df["values"].list.len()
    if df.height and (lengths.min() != N_VALUES or lengths.max() != N_VALUES):
        raise ValueError(f"{source}: column 'values' must hold {N_VALUES} probabilities per row")
    if df.height and not (0 <= df["valence"].min() and df["valence"].max() <= 1):
        raise ValueError(f"{source}: column 'valence' outside [0, 1]")
    if df.height and not (-3 <= df["sentiment"].min() and df["sentiment"].max() <= 3):
        raise ValueError(f"{source}: column 'sentiment' outside -3..3")
    return df


def read_labels(path: str | Path) -> pl.DataFrame:
    """labels.parquet, validated. ``values`` follows prompts/values.yaml (`esvr.prompts.value_names()`)."""
    return validate_labels(read_parquet(path, "labels"), str(path))


def labels_frame(utt_ids: list[str], valence: np.ndarray, sentiment: np.ndarray, probs: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "utt_id": utt_ids,
            "valence": np.asarray(valence, dtype=np.float32),
            "sentiment": np.asarray(sentiment, dtype=np.int8),
            "values": [row for row in np.asarray(probs, dtype=np.float32).reshape(len(utt_ids), N_VALUES)],
        },
        schema=LABELS_SCHEMA,
    )


# --------------------------------------------------------------------------------------------
# threads.parquet -> utterances
# --------------------------------------------------------------------------------------------


def _need(df: pl.DataFrame, column: str, source: str, fields: tuple[str, ...] = ()) -> None:
    if column not in df.columns:
        raise ValueError(f"{source}: column {column!r} missing (has {df.columns})")
    dtype = df.schema[column]
    inner = dtype.inner if isinstance(dtype, pl.List) else None
    if fields:
        if not isinstance(inner, pl.Struct):
            raise ValueError(f"{source}: column {column!r} must be a list of structs, got {dtype}")
        have = {f.name for f in inner.fields}
        missing = [f for f in fields if f not in have]
        if missing:
            raise ValueError(f"{source}: column {column!r} lacks struct fields {missing}")


def collect_utterances(threads_path: str | Path) -> pl.DataFrame:
    """Unique (utt_id, text) of a threads.parquet: turns, siblings and their op_replies, the texts
    normalised (`esvr.models.text.normalize_text`): every labeler, and the label cache, sees them so."""
    threads_path = Path(threads_path)
    df = read_parquet(threads_path, "threads")
    src = str(threads_path)
    _need(df, "turns", src, ("utt_id", "text"))
    parts = [
        df.select(pl.col("turns").explode().alias("u")).drop_nulls().unnest("u").select("utt_id", "text"),
    ]
    if "siblings" in df.columns and df.height:
        _need(df, "siblings", src, ("utt_id", "text"))
        sib = df.select(pl.col("siblings").explode().alias("s")).drop_nulls().unnest("s")
        parts.append(sib.select("utt_id", "text"))
        if "op_replies" in sib.columns:
            replies = sib.select(pl.col("op_replies").explode().alias("r")).drop_nulls()
            if replies.height:
                parts.append(replies.unnest("r").select("utt_id", "text"))
    utts = pl.concat([p.with_columns(pl.col("utt_id").cast(pl.String), pl.col("text").cast(pl.String)) for p in parts])
    if utts["utt_id"].null_count():
        raise ValueError(f"{src}: an utterance has a null utt_id")
    utts = utts.unique("utt_id", keep="first", maintain_order=True)
    return utts.with_columns(pl.Series("text", normalize_texts(utts["text"].to_list()), dtype=pl.String))


# --------------------------------------------------------------------------------------------
# labeling
# --------------------------------------------------------------------------------------------


def chunk_key(utt_ids: list[str], texts: list[str], fingerprint: str) -> str:
    h = hashlib.sha256(fingerprint.encode())
    for u, t in zip(utt_ids, texts):
        h.update(u.encode())
        h.update(b"\x00")
        h.update(t.encode())
        h.update(b"\x01")
    return h.hexdigest()[:32]


def text_digests(texts: list[str]) -> list[str]:
    """Per text a short SHA-256: a stored label is reused only for the same utt_id *and* text."""
    return [hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts]


def identity_prefix(fingerprint: str) -> str:
    """The labelers' identity as a file-name prefix: a changed labeler reads none of the old files."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:12]


def chunk_path(chunk_dir: str | Path, utt_ids: list[str], texts: list[str], fingerprint: str) -> Path:
    return Path(chunk_dir) / f"{identity_prefix(fingerprint)}-{chunk_key(utt_ids, texts, fingerprint)}.parquet"


def stored_labels(chunk_dir: str | Path | None, fingerprint: str) -> pl.DataFrame:
    """Every label the store holds for these labelers: (utt_id, text_sha, valence, sentiment, values)."""
    files = sorted(Path(chunk_dir).glob(f"{identity_prefix(fingerprint)}-*.parquet")) if chunk_dir else []
    if not files:
        return store_frame([], [], labels_frame([], np.zeros(0), np.zeros(0), np.zeros((0, N_VALUES))))
    return pl.concat([read_parquet(f, "label store") for f in files]).unique(["utt_id", "text_sha"], keep="first")


def split_new(utts: pl.DataFrame, stored: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(utts with a ``text_sha`` column, those of them the store has no label for), in utts' order."""
    keyed = utts.with_columns(pl.Series("text_sha", text_digests(utts["text"].to_list()), dtype=pl.String))
    new = keyed.join(stored.select("utt_id", "text_sha"), on=["utt_id", "text_sha"], how="anti", maintain_order="left")
    return keyed, new


def assemble(keyed: pl.DataFrame, stored: pl.DataFrame, fresh: list[pl.DataFrame]) -> pl.DataFrame:
    """labels.parquet's rows in utts' order, from the stored and the freshly labelled chunks."""
    pool = pl.concat([stored, *fresh], how="vertical_relaxed").unique(["utt_id", "text_sha"], keep="first")
    return (
        keyed.select("utt_id", "text_sha")
        .join(pool, on=["utt_id", "text_sha"], how="left", maintain_order="left")
        .select(list(LABELS_SCHEMA))
    )


def store_frame(utt_ids: list[str], texts: list[str], labels: pl.DataFrame) -> pl.DataFrame:
    """A chunk file's rows: the labels with the digest of the text they were computed on."""
    return labels.with_columns(pl.Series("text_sha", text_digests(texts), dtype=pl.String))


def label_texts(texts: list[str], detector: ValueDetector, scorer: EmotionScorer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valence (n,), sentiment (n,), value probabilities (n, 20)) of some texts."""
    pending = scorer.submit(texts)  # a worker process scores while the detector encodes
    probs = detector.predict_proba(texts)
    scores = pending.result()
    valence = np.array([s.valence for s in scores], dtype=np.float32)
    sentiment = np.array([s.sentiment for s in scores], dtype=np.int8)
    return valence, sentiment, probs


def labelers_fingerprint(detector: ValueDetector, scorer: EmotionScorer) -> str:
    """What a chunk's labels depend on besides its texts: part of every chunk file's name."""
    return f"{detector.fingerprint}|{scorer.fingerprint}|{value_names()}"


def write_chunk(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    frame.write_parquet(tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written chunk


def label_utterances(
    utts: pl.DataFrame,
    detector: ValueDetector,
    scorer: EmotionScorer,
    *,
    chunk_dir: str | Path | None = None,
    chunk_size: int = 2048,
    progress: bool = True,
) -> tuple[pl.DataFrame, dict[str, float]]:
    """Label (utt_id, text) rows; returns (labels, stats).

    With `chunk_dir`, labels are stored per utterance (keyed by utt_id, text digest and the
    labelers' fingerprint) in chunk files: only utterances the store lacks are labelled, in chunks
    of `chunk_size`, whatever their order, and each finished chunk is written at once.
    """
    from tqdm.auto import tqdm

    fingerprint = labelers_fingerprint(detector, scorer)
    chunk_dir = Path(chunk_dir) if chunk_dir else None
    if chunk_dir:
        chunk_dir.mkdir(parents=True, exist_ok=True)
    stored = stored_labels(chunk_dir, fingerprint)
    keyed, new = split_new(utts, stored)
    ids, texts = new["utt_id"].to_list(), new["text"].to_list()
    frames, t0 = [], time.perf_counter()
    with tqdm(total=len(ids), desc="label", unit="utt", disable=not progress) as bar:
        for start in range(0, len(ids), chunk_size):
            cid, ctext = ids[start : start + chunk_size], texts[start : start + chunk_size]
            frame = store_frame(cid, ctext, labels_frame(cid, *label_texts(ctext, detector, scorer)))
            if chunk_dir is not None:
                write_chunk(frame, chunk_path(chunk_dir, cid, ctext, fingerprint))
            frames.append(frame)
            bar.update(len(cid))
    labels = assemble(keyed, stored, frames)
    return labels, _throughput(keyed.height, keyed.height - len(ids), time.perf_counter() - t0)


def _throughput(utterances: int, cached: int, seconds: float) -> dict[str, float]:
    fresh = utterances - cached
    return {
        "utterances": float(utterances),
        "new_utterances": float(fresh),
        "cached_utterances": float(cached),
        "seconds": round(seconds, 3),
        "utterances_per_s": round(fresh / seconds, 2) if fresh and seconds > 0 else 0.0,
    }


_process_labelers: dict[tuple[str, str, bool], tuple[ValueDetector, EmotionScorer]] = {}
_process_labelers_lock = threading.Lock()


def process_labelers(
    cfg: LabelConfig, run_dir: str | os.PathLike[str], use_cache: bool = True
) -> tuple[ValueDetector, EmotionScorer]:
    """The run's labelers, built once per process and label config: a task runner's worker labels
    many chunks with one loaded encoder."""
    key = (f"{cfg.values.model_dump_json()}|{cfg.emotion.model_dump_json()}", str(run_dir), use_cache)
    with _process_labelers_lock:
        if key not in _process_labelers:
            _process_labelers[key] = labelers(cfg.values, cfg.emotion, run_dir, use_cache)
        return _process_labelers[key]


def for_batches(scorer: EmotionScorer, cfg: EmotionConfig) -> EmotionScorer:
    """The scorer the label stage runs: VADER moves to a worker process (`worker_process`)."""
    from esvr.models.emotion import ProcessEmotionScorer, VaderEmotionScorer

    if cfg.worker_process and isinstance(scorer, VaderEmotionScorer):
        return ProcessEmotionScorer(scorer.sentence_words)
    return scorer


def _label_stats(
    labels: pl.DataFrame,
    stats: dict[str, float],
    threshold: float,
    failures: dict[str, int] | None,
    positive_valence: float,
) -> dict[str, float]:
    probs = np.stack(labels["values"].to_numpy()) if labels.height else np.zeros((0, N_VALUES))
    stats.update(
        {
            # positive: label.emotion.positive_valence, as in the datasets' success rule
            "positive_share": round(float((labels["valence"] > positive_valence).mean() or 0.0), 4) if labels.height else 0.0,
            "mean_valence": round(float(labels["valence"].mean() or 0.0), 4) if labels.height else 0.0,
            "mean_values_detected": round(float((probs >= threshold).sum(1).mean()), 4) if labels.height else 0.0,
        }
    )
    stats.update(marking_rates(probs, threshold))  # value_rate.<value>: the share of utterances marked
    if failures:
        stats.update({f"parse_failures_{k}": float(v) for k, v in failures.items()})
    return stats


def _write_outputs(labels: pl.DataFrame, stats: dict[str, float], out_dir: Path) -> dict[str, Path]:
    validate_labels(labels, "labels (before writing)")
    labels_path = out_dir / "labels.parquet"
    labels.write_parquet(labels_path)
    stats_path = out_dir / "label_stats.json"
    stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    return {"labels": labels_path, "stats": stats_path}


def label_threads(
    threads_path: str | Path,
    out_dir: str | Path,
    cfg: LabelConfig,
    *,
    detector: ValueDetector | None = None,
    scorer: EmotionScorer | None = None,
) -> dict[str, Path]:
    """The label stage: ``out_dir/labels.parquet`` and ``out_dir/label_stats.json``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    utts = collect_utterances(threads_path)
    if detector is None or scorer is None:
        d, s = labelers(cfg.values, cfg.emotion)
        detector, scorer = detector or d, scorer or s
    batch_scorer = for_batches(scorer, cfg.emotion)
    try:
        labels, stats = label_utterances(
            utts, detector, batch_scorer, chunk_dir=out_dir / "chunks", chunk_size=cfg.chunk_size, progress=cfg.progress
        )
    finally:
        if batch_scorer is not scorer:
            batch_scorer.close()  # the worker process this stage started
    stats = _label_stats(labels, stats, detector.threshold, getattr(scorer, "parse_failures", None), cfg.emotion.positive_valence)
    return _write_outputs(labels, stats, out_dir)


# --------------------------------------------------------------------------------------------
# the stage on a task runner: one task per chunk
# --------------------------------------------------------------------------------------------


def runner_labelers(cfg: LabelConfig, run_dir: str, use_cache: bool = True) -> dict:
    """The labelers' fingerprint and threshold, asked of a worker: the flow's process loads no model."""
    detector, scorer = process_labelers(cfg, run_dir, use_cache)
    return {"fingerprint": labelers_fingerprint(detector, scorer), "threshold": float(detector.threshold)}


def label_chunk(
    utt_ids: list[str], texts: list[str], cfg: LabelConfig, chunk_dir: str, run_dir: str, use_cache: bool = True
) -> dict:
    """Label one chunk of new utterances in this (worker) process and store it.

    Returns the chunk's labels and what happened where: chunk file name, ``worker_pid``, seconds
    and the scorer's new parse failures. VADER scores inline here: a worker process is already one
    of several, and Dask's are daemons, which may not start processes of their own.
    """
    t0 = time.perf_counter()
    detector, scorer = process_labelers(cfg, run_dir, use_cache)
    path = chunk_path(chunk_dir, utt_ids, texts, labelers_fingerprint(detector, scorer))
    before = dict(getattr(scorer, "parse_failures", None) or {})
    frame = store_frame(utt_ids, texts, labels_frame(utt_ids, *label_texts(texts, detector, scorer)))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_chunk(frame, path)
    after = getattr(scorer, "parse_failures", None) or {}
    return {
        "chunk": path.name,
        "utterances": len(utt_ids),
        "worker_pid": os.getpid(),
        "seconds": round(time.perf_counter() - t0, 3),
        "parse_failures": {k: v - before.get(k, 0) for k, v in after.items()},
        "labels": frame,
    }


def label_on_runner(
    threads_path: str | Path,
    out_dir: str | Path,
    cfg: LabelConfig,
    run: MapRunner,
    run_dir: str | os.PathLike[str],
    use_cache: bool = True,
) -> dict[str, Path]:
    """`label_threads` with one task per chunk of new utterances, mapped with `run`.

    The store, its chunk files and labels.parquet are those of `label_threads`. Besides its outputs
    it writes ``label_chunks.json``: per chunk labelled now its file, size, the worker's process id
    and seconds; ``label_stats.json`` gains ``workers``, the distinct worker processes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chunk_dir = out_dir / "chunks"
    utts = collect_utterances(threads_path)
    t0 = time.perf_counter()
    ident = run(runner_labelers, [{"cfg": cfg, "run_dir": str(run_dir), "use_cache": use_cache}], name="label-labelers")[0]
    stored = stored_labels(chunk_dir, ident["fingerprint"])
    keyed, new = split_new(utts, stored)
    ids, texts = new["utt_id"].to_list(), new["text"].to_list()
    size = cfg.chunk_size
    calls = [
        {
            "utt_ids": ids[i : i + size],
            "texts": texts[i : i + size],
            "cfg": cfg,
            "chunk_dir": str(chunk_dir),
            "run_dir": str(run_dir),
            "use_cache": use_cache,
        }
        for i in range(0, len(ids), size)
    ]
    runs = run(label_chunk, calls, name="label-chunk") if calls else []
    seconds = time.perf_counter() - t0
    labels = assemble(keyed, stored, [r.pop("labels") for r in runs])
    stats = {
        **_throughput(keyed.height, keyed.height - len(ids), seconds),
        "workers": float(len({r["worker_pid"] for r in runs})),
    }
    failures: dict[str, int] = {}
    for r in runs:
        for k, v in r["parse_failures"].items():
            failures[k] = failures.get(k, 0) + v
    stats = _label_stats(labels, stats, ident["threshold"], failures or None, cfg.emotion.positive_valence)
    paths = _write_outputs(labels, stats, out_dir)
    chunks_path = out_dir / "label_chunks.json"
    chunks_path.write_text(json.dumps(runs, indent=2) + "\n")
    return {**paths, "chunks": chunks_path}
