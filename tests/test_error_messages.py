"""Damaged or unusable files end in one error naming the file and what to do."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import polars as pl
import pytest

from esvr.flows.runtime import usable_run_folder
from esvr.models.chat import ResponseCache, ResponseCacheError
from esvr.models.config import ConfigError
from esvr.tasks.components.datasets import read_labels
from esvr.tasks.labeling.label import collect_utterances
from esvr.tasks.reddit.ingest import IngestError, read_threads


def _truncated(path: Path) -> Path:
    pl.DataFrame({"a": list(range(1000))}).write_parquet(path)
    path.write_bytes(path.read_bytes()[:200])  # a copy cut short
    return path


def test_a_truncated_threads_file_is_named(tmp_path):
    threads = _truncated(tmp_path / "threads.parquet")
    with pytest.raises(ValueError, match=r"threads\.parquet: not a readable threads parquet file.*truncated"):
        collect_utterances(threads)
    with pytest.raises(IngestError, match=r"threads\.parquet: not a readable threads"):
        read_threads(threads)


def test_a_truncated_labels_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"labels\.parquet: not a readable labels parquet file"):
        read_labels(_truncated(tmp_path / "labels.parquet"))


def test_a_damaged_response_cache_is_named(tmp_path):
    path = tmp_path / "responses.sqlite"
    path.write_bytes(b"this is not a database, it is text" * 100)
    with pytest.raises(ResponseCacheError, match=r"responses\.sqlite: the response cache cannot be opened.*move the file aside"):
        ResponseCache(path)


def test_a_cache_that_cannot_be_written_names_the_file_and_keeps_what_it_has(tmp_path):
    cache = ResponseCache(tmp_path / "responses.sqlite")
    cache.put("a", ["kept"])
    # the file is full: SQLite refuses new pages beyond its maximum (as on a full disk)
    con = cache._conn()
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    con.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(ResponseCacheError, match=r"responses\.sqlite: cannot store a reply.*replies stored so far are kept"):
        cache.put("b", ["x" * 100_000])
    assert cache.get("a") == ["kept"]
    assert isinstance(con, sqlite3.Connection)


def test_a_file_given_as_the_run_folder_is_refused(tmp_path):
    afile = tmp_path / "run"
    afile.write_text("")
    with pytest.raises(ConfigError, match=r"run folder .*run is a file: give --out"):
        usable_run_folder(afile)


def test_a_run_folder_that_cannot_be_made_is_refused(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"cannot be written.*writable folder"):
        usable_run_folder(blocker / "run")  # a folder below a file cannot exist
