"""Stage 1: Reddit ingestion (paper §4, appendix B).

Pushshift-style dumps (NDJSON compressed by zstd with a 2 GiB window) are streamed in blocks of
complete lines, filtered, and the survivors staged per dump as small parquet files. The comment
trees are then rebuilt from link_id/parent_id and every maximal chain in which the original poster
(OP) and one commenter alternate becomes one row of ``threads.parquet`` (schema: docs/schemas.md).

Hot path, in order of cost: zstd decompression (the floor), a byte prefilter on a lowered copy of
each block (``"offmychest"`` with its quotes, so that case and spacing variants still match), then
orjson on the few lines that survive. Lines are never decoded before being split on ``\\n``, so a
UTF-8 character cut by a read boundary cannot break a record. Memory is one block plus the staged
survivors' write buffer, whatever the dump's size; the thread build works on the filtered, pruned
survivors, split into buckets by post when they are large.

Incremental: every dump is keyed by the SHA-256 of its bytes and by a fingerprint of the filters.
``manifest.json`` in the output folder records what is staged; a re-run stages only new dumps (or
all of them when a filter changed) and rebuilds the threads from every staged dump, because the
comments of one month's posts arrive in the next month's comment dump.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import os
import queue
import re
import secrets
import shutil
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl
import zstandard
from pydantic import field_validator

from esvr.models.config import Section
from esvr.tasks.common.tables import read_parquet

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


class IngestConfig(Section):
    """Which Reddit records become threads. The paper names r/offmychest, 2019-2023 and "metrics
    such as upvote ratio and score" without thresholds; the thresholds below are ours, each with
    its reason."""

    #: dump files (.zst); empty: the demo generates the sample dump (tasks/reddit/sample_dump.py) and uses it
    dumps: list[Path] = []
    #: random posts in the generated sample dump (beside its hand-built cases), when `dumps` is empty
    sample_posts: int = 150
    #: where the stage writes; None: ``run.out_dir / "ingest"``. The folder accumulates every dump
    #: ingested into it (incremental merge); use a new folder for a separate dataset.
    out_dir: Path | None = None
    #: folder the scheduled deployment scans for new dumps (``ingest_new_dumps``)
    dumps_dir: Path | None = None
    #: cron of the scheduled scan: daily at 03:00, well after Watchful1/Pushshift monthly uploads land
    schedule_cron: str = "0 3 * * *"
    #: the paper's source subreddit (§4); compared case-insensitively. Empty: every subreddit.
    subreddits: list[str] = ["offmychest"]
    #: the paper's collection window (§4: "from 2019 to 2023"), inclusive, in UTC, on the post's date
    start_date: date = date(2019, 1, 1)
    end_date: date = date(2023, 12, 31)
    #: comments are kept up to this many days after end_date: Reddit archives posts after about six
    #: months, so later comments cannot belong to a post in range
    comment_window_days: int = 183
    #: §4: "did not include private, deleted ..." content; off only to study what is lost
    drop_deleted: bool = True
    drop_removed: bool = True
    #: subreddit_type private/user/... (the field is absent in old dumps, which counts as public)
    drop_private: bool = True
    #: exact author names (case-insensitive) that are bots or moderation accounts
    bot_authors: list[str] = [
        "AutoModerator",
        "RemindMeBot",
        "sneakpeekbot",
        "WikiTextBot",
        "SaveVideo",
        "savevideobot",
        "RepostSleuthBot",
        "BotDefense",
        "of_patrol_bot",
        "timee_bot",
        "exclaim_bot",
        "haikusbot",
        "Reddit",
    ]
    #: names that end in "bot" are nearly always bots on Reddit; the rare human "Abbot" is a fair loss
    bot_author_pattern: str = r"(?i)(?:^bot[_-]|[_-]?bot$)"
    #: moderator-distinguished or stickied comments are rules reminders, not support
    drop_moderator_comments: bool = True
    #: a post is an emotional-support request worth learning from when other people upvoted it:
    #: Reddit starts every post at 1 (the author's own vote), so >= 2 means at least one other upvote
    min_post_score: int = 2
    #: below 0.7 a post is divisive (trolling, rule-breaking); offmychest's typical posts sit above 0.9
    min_upvote_ratio: float = 0.7
    #: a comment starts at 1; <= 0 means the community disliked it: not a reference supporter utterance
    min_comment_score: int = 1
    #: character bounds on the post's selftext and on comment bodies. Posts: a title with no story
    #: gives the seeker no situation; beyond 10000 characters a post exceeds the 8B models' context
    #: budget. Comments: "Thank you" (9 chars) is a meaningful OP reply, so the floor stays low;
    #: beyond 5000 characters a comment is an essay, not a dialogue turn.
    min_post_chars: int = 20
    max_post_chars: int = 10000
    min_comment_chars: int = 2
    max_comment_chars: int = 5000
    #: environment variable holding the salt of author hashes (a secret, never logged); when unset,
    #: a random salt is made once per output folder and kept in ``staged/author_salt`` (mode 600),
    #: so hashes match within a folder and cannot be reversed by hashing known user names
    author_salt_env: str = "ESVR_AUTHOR_SALT"
    #: replace e-mail addresses, phone numbers and u/username mentions (§4: no identifying information)
    scrub_pii: bool = True
    #: per commenter turn, siblings kept (those the OP replied to first, then by score): bounds row size
    max_siblings: int = 10
    #: compressed MB read from disk at a time, decoded in slices of 256 KiB (DECODE_SLICE): a block
    #: of lines is a slice times the compression ratio (about 10 for the dumps)
    read_mb: int = 2
    #: blocks decoded ahead by a second thread while this one parses (zstandard releases the GIL
    #: while it decodes, so decoding and parsing use two cores); 0: decode and parse in one thread
    read_ahead: int = 2
    #: the thread build processes posts in buckets of about this many surviving comments
    bucket_rows: int = 2_000_000
    #: after writing outputs, raise when a dump was truncated or corrupt (its complete records are kept)
    fail_on_corrupt: bool = True

    @field_validator("subreddits")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [v.strip().lower().removeprefix("r/") for v in value if v.strip()]


#: fields of IngestConfig that change what is staged; the others change only the thread build
_FILTER_FIELDS = (
    "subreddits",
    "start_date",
    "end_date",
    "comment_window_days",
    "drop_deleted",
    "drop_removed",
    "drop_private",
    "bot_authors",
    "bot_author_pattern",
    "drop_moderator_comments",
    "min_post_score",
    "min_upvote_ratio",
    "min_comment_score",
    "min_post_chars",
    "max_post_chars",
    "min_comment_chars",
    "max_comment_chars",
)

STAGE_VERSION = 2  # bump when the staged format or the filter semantics change

#: the per-folder salt's file, in the ``staged`` folder of the ingest's output (beside the staged dumps)
SALT_FILE = "author_salt"


def author_salt(cfg: IngestConfig, folder: str | Path) -> str:
    """The salt of author hashes: the environment variable's value, else the folder's random salt.

    Authors are hashed when staged, so staged parquet, rejects and threads never hold a user name.
    The salt itself is never logged: only the file that holds it is named.
    """
    salt = os.environ.get(cfg.author_salt_env)
    if salt:
        return salt
    path = Path(folder) / SALT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        salt = path.read_text().strip()
        if not salt:
            raise IngestError(f"{path} is empty: delete it and the staged folders beside it to re-stage every dump") from None
        return salt
    salt = secrets.token_hex(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(salt + "\n")
    log.info(
        "%s is not set: author hashes use a random salt kept in %s; set the variable to hash names alike across folders",
        cfg.author_salt_env,
        path,
    )
    return salt


def filters_fingerprint(cfg: IngestConfig, salt: str = "") -> str:
    """Identifies what staging keeps and how: the filters, the staged format and the salt (by a digest)."""
    data = {k: getattr(cfg, k) for k in _FILTER_FIELDS}
    salt_id = hashlib.sha256(b"esvr-author-salt\x00" + salt.encode()).hexdigest()[:12]
    blob = json.dumps(data, sort_keys=True, default=str) + f"|v{STAGE_VERSION}|{salt_id}|{cfg.scrub_pii}"
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class IngestError(RuntimeError):
    """Ingestion failed in a way the user must fix; the message says what and where."""


class DumpCorruptError(IngestError):
    """A .zst that is truncated or corrupt. Every complete record before the damage was yielded."""

    def __init__(self, path: Path, compressed_offset: int, decompressed_offset: int, reason: str):
        self.path, self.compressed_offset, self.decompressed_offset = path, compressed_offset, decompressed_offset
        super().__init__(
            f"{path}: {reason} at compressed byte {compressed_offset} (decompressed byte "
            f"{decompressed_offset}); the complete records before it were kept"
        )


class NoThreadsError(IngestError):
    """Nothing matched: said clearly instead of writing an empty table a later stage trips on."""


# --------------------------------------------------------------------------------------------
# Streaming reader
# --------------------------------------------------------------------------------------------


@dataclass
class Block:
    """Whole lines of a dump: ``data[start:end]``; the bytes after `end` begin a line that the next
    block completes."""

    data: bytes
    end: int
    first_line: int  # 1-based number of the block's first line in the file (0: not counted)
    offset: int  # decompressed byte offset of data[start]
    newlines: int = 0  # b"\n" in data[start:end]
    start: int = 0

    @property
    def lines(self) -> bytes:
        return self.data[self.start : self.end]


class _Scratch:
    """Reused buffers: fresh 16 MB allocations per block cost more in page faults than the work."""

    def __init__(self) -> None:
        self.size = 0

    def ensure(self, n: int) -> None:
        if n > self.size:
            self.size = max(n, int(self.size * 1.5))
            self.folded = bytearray(self.size)
            self.folded_np = np.frombuffer(self.folded, np.uint8)
            self.mask = np.empty(self.size, dtype=bool)

    def count_newlines(self, data: bytes, start: int, end: int) -> int:
        n = end - start
        self.ensure(n)
        view = np.frombuffer(data, np.uint8, count=n, offset=start)
        return int(np.count_nonzero(np.equal(view, 10, out=self.mask[:n])))

    def fold(self, data: bytes, start: int, end: int) -> bytearray:
        """data[start:end] with bit 0x20 set on every byte, at folded[0:end - start]: ASCII letters
        in lower case, positions kept."""
        n = end - start
        self.ensure(n)
        np.bitwise_or(np.frombuffer(data, np.uint8, count=n, offset=start), 0x20, out=self.folded_np[:n])
        return self.folded


#: output buffer of one decode call, larger than what a DECODE_SLICE decodes to: zstandard gives
#: up the GIL once per buffer it fills, and each time takes it back from a busy parsing thread only
#: after up to the 5 ms switch interval. With its default 128 KiB buffer (~20 hand-overs per
#: slice) the decoding thread spent a quarter of its time waiting for the GIL.
DECODE_OUTPUT = 8 << 20


class _Frames:
    """A zstd decoder over concatenated frames: `feed` returns what the bytes decode to."""

    def __init__(self) -> None:
        self.dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        self.dobj = self.dctx.decompressobj(write_size=DECODE_OUTPUT)
        self.in_frame = False  # fed bytes to a frame that has not ended yet

    def feed(self, raw: bytes) -> list[bytes]:
        out = []
        while raw:
            if self.dobj.eof:
                self.dobj = self.dctx.decompressobj(write_size=DECODE_OUTPUT)
            out.append(self.dobj.decompress(raw))
            self.in_frame = not self.dobj.eof
            raw = self.dobj.unused_data if self.dobj.eof else b""
        return out


def _salvage(path: Path, good_until: int, read_bytes: int, step: int = 1024) -> tuple[bytes, int, str]:
    """Decode `path` again and return what the bytes after `good_until` decode to before the damage.

    A failed ``decompress`` call returns nothing, so the read that hit the damage is decoded again
    in slices of `step` compressed bytes: everything zstd decoded before the damaged slice comes
    back (as ``zstd -d`` writes it out). Returns (that output, the damaged slice's offset, reason).
    """
    frames = _Frames()
    out: list[bytes] = []
    with open(path, "rb") as fh:
        pos = 0
        while pos < good_until:
            raw = fh.read(min(read_bytes, good_until - pos))
            frames.feed(raw)  # decoded before: only the decoder's state matters
            pos += len(raw)
        while raw := fh.read(step):
            try:
                out += frames.feed(raw)
            except zstandard.ZstdError as exc:
                return b"".join(out), pos, f"corrupt zstd data ({exc})"
            pos += len(raw)
    return b"".join(out), pos, "truncated zstd stream (the frame does not end)"


#: compressed bytes decoded per call: a block is this times the compression ratio (about 10 for
#: the dumps: 2.5 MB), small enough that the parsing thread reads it from the cache the decoding
#: thread wrote it to. Measured on 150 MB of the bench's dump (CPU seconds of the two threads):
#: 256 KiB slices cost both threads 10-25% less than 2 MiB ones; 64 KiB ones, more again.
DECODE_SLICE = 256 << 10


def iter_blocks(
    path: str | Path, read_bytes: int = 2 << 20, scratch: _Scratch | None = None, count_lines: bool = True
) -> Iterator[Block]:
    """Decompress `path` and yield blocks of whole lines: `read_bytes` of compressed input read at a
    time, decoded in slices of DECODE_SLICE bytes, a block per slice.

    A block is about DECODE_SLICE times the compression ratio. A line cut by a slice is completed
    by a small block of its own (the carried part and the next output up to its first newline),
    so records (and the UTF-8 characters in
    them) are never split, and the decoder's output is used where it lies, never copied. A
    truncated or corrupt stream raises DumpCorruptError after every complete line before the
    damage has been yielded (the read that hit it is decoded again in small slices). Concatenated
    frames are read. ``count_lines=False`` leaves `newlines` and `first_line` at 0 for a caller
    that counts lines itself.
    """
    path = Path(path)
    scratch = scratch or _Scratch()
    frames = _Frames()
    carry = b""
    line_no = 1
    offset = 0  # decompressed offset of carry[0]
    consumed = 0  # compressed bytes decoded without error

    def block(data: bytes, start: int, end: int) -> Block:
        nonlocal line_no, offset
        newlines = scratch.count_newlines(data, start, end) if count_lines else 0
        b = Block(data, end, line_no if count_lines else 0, offset, newlines, start)
        line_no += newlines
        offset += end - start
        return b

    def split(data: bytes) -> Iterator[Block]:
        """The blocks of `carry + data`; what follows their last newline becomes the carry."""
        nonlocal carry
        start = 0
        if carry:
            first = data.find(b"\n")
            if first == -1:
                carry += data  # a line longer than a read
                return
            bridge = carry + data[: first + 1]
            carry = b""
            yield block(bridge, 0, len(bridge))
            start = first + 1
        end = data.rfind(b"\n", start) + 1
        if end > start:
            yield block(data, start, end)
            carry = data[end:]
        else:
            carry = data[start:]

    with open(path, "rb") as fh:
        while chunk := fh.read(read_bytes):
            for i in range(0, len(chunk), DECODE_SLICE):
                raw = chunk[i : i + DECODE_SLICE]
                try:
                    out = frames.feed(raw)
                except zstandard.ZstdError:
                    tail, at, reason = _salvage(path, consumed, read_bytes)
                    yield from split(tail)
                    raise DumpCorruptError(path, at, offset + len(carry), reason) from None
                consumed += len(raw)
                data = out[0] if len(out) == 1 else b"".join(out)
                if data:
                    yield from split(data)
    if frames.in_frame:
        raise DumpCorruptError(path, consumed, offset + len(carry), "truncated zstd stream (the frame does not end)")
    if carry:
        yield block(carry, 0, len(carry))


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER_FORMATS = {
    b"\x1f\x8b": "gzip-compressed",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
    b"PK\x03\x04": "a zip archive",
    b"PAR1": "a parquet file",
}


def dump_problem(path: str | Path) -> str | None:
    """Why `path` cannot be a zstd dump (empty, another format), or None when it starts like one."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        return "is empty (0 bytes)"
    magic = int.from_bytes(head[:4], "little")
    if head[:4] == _ZSTD_MAGIC or 0x184D2A50 <= magic <= 0x184D2A5F:  # a frame, or a skippable frame
        return None
    for prefix, what in _OTHER_FORMATS.items():
        if head.startswith(prefix):
            return f"is {what}, not zstd: decompress it and compress it with `zstd --long=31`"
    if head.lstrip()[:1] in (b"{", b"["):
        return "is uncompressed JSON, not zstd: compress it with `zstd --long=31`"
    return f"is not a zstd file (it starts with bytes {head[:4].hex()}; zstd files start with 28b52ffd)"


_END = object()


def read_ahead(blocks: Iterator[Block], depth: int, cpu: dict[str, float] | None = None) -> Iterator[Block]:
    """Yield `blocks`, produced by a second thread at most `depth` blocks ahead.

    The decoder's work (zstd, newline counting in numpy) runs without the GIL, so it overlaps the
    caller's parsing; memory is `depth` + 2 blocks. The producer's exception (a damaged dump) is
    raised here after the blocks before it; leaving early stops the producer. `cpu` receives the
    decoding thread's CPU seconds under "decode".
    """
    if depth <= 0:
        yield from blocks
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        t0 = time.thread_time()
        try:
            for block in blocks:
                if not put(block):
                    return
            put(_END)
        except Exception as exc:  # noqa: BLE001  # not swallowed: the consumer raises it
            put(exc)
        finally:
            blocks.close()  # type: ignore[attr-defined]  # a generator: closes the file
            if cpu is not None:
                cpu["decode"] = time.thread_time() - t0

    thread = threading.Thread(target=produce, name="ingest-decode", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def dump_kind(path: str | Path) -> str | None:
    """'submissions' or 'comments' from a Pushshift file name (RS_/RC_ monthly, <sub>_x per subreddit)."""
    name = Path(path).name
    if name.startswith("RS_") or "_submissions" in name:
        return "submissions"
    if name.startswith("RC_") or "_comments" in name:
        return "comments"
    return None  # decided per record: comments carry parent_id


def file_sha256(path: str | Path) -> str:
    # hashlib.file_digest would do this, from Python 3.11 on; the project supports 3.10
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------

POST_COLUMNS = {
    "id": pl.String,
    "subreddit": pl.String,
    "author": pl.String,
    "title": pl.String,
    "selftext": pl.String,
    "score": pl.Int64,
    "upvote_ratio": pl.Float64,
    "created_utc": pl.Int64,
    "dump": pl.String,
}
COMMENT_COLUMNS = {
    "id": pl.String,
    "link_id": pl.String,
    "parent_id": pl.String,
    "author": pl.String,
    "body": pl.String,
    "score": pl.Int64,
    "created_utc": pl.Int64,
}

_DELETED = {"[deleted]", "[deleted by user]"}
_REMOVED = {"[removed]", "[ removed by reddit ]", "[removed by reddit]"}
_PUBLIC = {"public", "restricted", "gold_restricted", "archived"}  # restricted: readable by all


def _as_int(value: Any) -> int | None:
    """An int64 from an int, a float or a numeric string (old dumps store created_utc as a string,
    some scores arrive as floats); None for anything else, and for values beyond int64, which
    the staged parquet cannot hold."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = int(value)
    if not isinstance(value, int) or not -(2**63) <= value < 2**63:
        return None
    return value


def _epoch(d: date) -> int:
    return int(datetime(d.year, d.month, d.day, tzinfo=timezone.utc).timestamp())


class RecordFilter:
    """Decides for one parsed record: the reason it is dropped, or the row to stage."""

    REASONS = (
        "other_subreddit",
        "out_of_date_range",
        "deleted",
        "removed",
        "private",
        "bot",
        "low_score",
        "low_upvote_ratio",
        "too_short",
        "too_long",
        "missing_field",
        "invalid_field",
    )

    def __init__(self, cfg: IngestConfig, dump_name: str, anon: Anonymizer | None = None):
        self.cfg = cfg
        self.dump = dump_name
        #: authors are hashed here, before staging: no user name is written to disk (texts are
        #: cleaned when threads are built, for the few records that end up in one)
        self.anon = anon or Anonymizer("", cfg.scrub_pii)
        #: the field behind the last missing_field / invalid_field, for the reject's entry
        self.field = ""
        self.subs = set(cfg.subreddits)
        self.t0 = _epoch(cfg.start_date)
        self.t1 = _epoch(cfg.end_date + timedelta(days=1))
        self.t1_comments = _epoch(cfg.end_date + timedelta(days=1 + cfg.comment_window_days))
        self.bots = {b.lower() for b in cfg.bot_authors}
        self.bot_re = re.compile(cfg.bot_author_pattern) if cfg.bot_author_pattern else None

    def _bad(self, rec: dict, name: str) -> str:
        self.field = name
        return "missing_field" if rec.get(name) is None else "invalid_field"

    def _common(self, rec: dict, text_field: str, t_end: int) -> tuple[str | None, int]:
        sub = rec.get("subreddit")
        if not isinstance(sub, str):
            return self._bad(rec, "subreddit"), 0
        if self.subs and sub.lower() not in self.subs:
            return "other_subreddit", 0
        created = _as_int(rec.get("created_utc"))
        if created is None:
            return self._bad(rec, "created_utc"), 0
        if not (self.t0 <= created < t_end):
            return "out_of_date_range", created
        for name in ("id", "author", text_field):
            if not isinstance(rec.get(name), str):
                return self._bad(rec, name), created
        author, text = rec["author"], rec[text_field]
        if self.cfg.drop_deleted and (author in _DELETED or text in _DELETED):
            return "deleted", created
        if self.cfg.drop_removed and text.strip().lower() in _REMOVED:
            return "removed", created
        if self.cfg.drop_private and rec.get("subreddit_type", "public") not in _PUBLIC:
            return "private", created
        low = author.lower()
        if low in self.bots or (self.bot_re is not None and self.bot_re.search(author)):
            return "bot", created
        return None, created

    def post(self, rec: dict) -> tuple[str | None, tuple | None]:
        if "selftext" not in rec:  # a link post: no text, which the length bound drops
            rec["selftext"] = ""
        reason, created = self._common(rec, "selftext", self.t1)
        if reason:
            return reason, None
        text = rec["selftext"]
        cat = rec.get("removed_by_category")
        if cat:
            if cat in ("deleted", "author") and self.cfg.drop_deleted:
                return "deleted", None
            if self.cfg.drop_removed and cat not in ("deleted", "author"):
                return "removed", None
        title = rec.get("title")
        if not isinstance(title, str):
            return self._bad(rec, "title"), None
        score = _as_int(rec.get("score"))
        if score is None:
            return self._bad(rec, "score"), None
        if score < self.cfg.min_post_score:
            return "low_score", None
        ratio = rec.get("upvote_ratio")
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio):
            if self.cfg.min_upvote_ratio > 0 or ratio is not None:
                return self._bad(rec, "upvote_ratio"), None
        elif ratio < self.cfg.min_upvote_ratio:
            return "low_upvote_ratio", None
        n = len(text.strip())
        if n < self.cfg.min_post_chars:
            return "too_short", None
        if n > self.cfg.max_post_chars:
            return "too_long", None
        return None, (
            rec["id"],
            rec["subreddit"].lower(),
            self.anon.author(rec["author"]),
            title,
            text,
            score,
            float(ratio) if isinstance(ratio, (int, float)) else None,
            created,
            self.dump,
        )

    def comment(self, rec: dict) -> tuple[str | None, tuple | None]:
        reason, created = self._common(rec, "body", self.t1_comments)
        if reason:
            return reason, None
        text = rec["body"]
        if self.cfg.drop_moderator_comments and (rec.get("distinguished") == "moderator" or rec.get("stickied") is True):
            return "bot", None
        link, parent = rec.get("link_id"), rec.get("parent_id")
        for name, value in (("link_id", link), ("parent_id", parent)):
            if not isinstance(value, str):
                return self._bad(rec, name), None
        score = _as_int(rec.get("score"))
        if score is None:
            return self._bad(rec, "score"), None
        if score < self.cfg.min_comment_score:
            return "low_score", None
        n = len(text.strip())
        if n < self.cfg.min_comment_chars:
            return "too_short", None
        if n > self.cfg.max_comment_chars:
            return "too_long", None
        return None, (
            rec["id"],
            link.removeprefix("t3_"),  # type: ignore[union-attr]  # checked above
            parent,
            self.anon.author(rec["author"]),
            text,
            score,
            created,
        )


# --------------------------------------------------------------------------------------------
# Staging one dump
# --------------------------------------------------------------------------------------------


class _PartWriter:
    """Buffers rows and writes them as numbered parquet parts: memory stays bounded."""

    def __init__(self, folder: Path, prefix: str, schema: dict[str, pl.DataType], flush_rows: int = 100_000):
        self.folder, self.prefix, self.schema, self.flush_rows = folder, prefix, schema, flush_rows
        self.rows: list[tuple] = []
        self.parts = 0
        self.count = 0

    def add(self, row: tuple) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        df = pl.DataFrame(self.rows, schema=self.schema, orient="row")
        df.write_parquet(self.folder / f"{self.prefix}-{self.parts:05d}.parquet")
        self.parts += 1
        self.count += len(self.rows)
        self.rows = []


@dataclass
class StageResult:
    stats: dict[str, Any]
    error: str | None = None


def _candidates(data: bytes, start: int, end: int, needles: list[bytes], scratch: _Scratch) -> list[tuple[int, int]]:
    """(start, end) of the lines of ``data[start:end]`` that may hold one of the subreddits.

    The needle is the quoted name with bit 0x20 set on every byte, searched in a copy of the block
    folded the same way (numpy, several GB/s; bytes.lower is about 0.7): "OffMyChest" and
    ``"subreddit": "offmychest"`` match too. A superset: a body that quotes "offmychest", or the
    few non-letters that folding merges, only add candidates that the exact field check drops.
    """
    if not needles:
        spans = []
        while start < end:
            stop = data.find(b"\n", start, end)
            stop = end if stop == -1 else stop
            spans.append((start, stop))
            start = stop + 1
        return spans
    folded = scratch.fold(data, start, end)  # folded[i] is data[start + i]
    n = end - start
    lines: dict[int, int] = {}
    for needle in needles:
        pos = folded.find(needle, 0, n)
        while pos != -1:
            at = start + pos
            s = max(data.rfind(b"\n", start, at), start - 1) + 1
            e = data.find(b"\n", at, end)
            e = end if e == -1 else e
            lines[s] = e
            pos = folded.find(needle, e - start, n)
    return sorted(lines.items()) if len(needles) > 1 else list(lines.items())


def _misshapen(data: bytes, start: int, end: int, scratch: _Scratch) -> tuple[list[tuple[int, int]], int, int]:
    """The lines of ``data[start:end]`` that cannot be a JSON object, as (start, end) spans, the
    number of blank lines, and the number of newlines.

    A shape check, not a parse: a line must start with ``{`` and end with ``}`` (after stripping
    whitespace). Vectorised over the block (numpy: the newline positions, then one byte on each
    side of them), so every line is checked, not only the prefilter's candidates, at a cost the
    ingest bench shows.
    """
    n = end - start
    scratch.ensure(n)
    arr = np.frombuffer(data, np.uint8, count=n, offset=start)
    nl = np.flatnonzero(np.equal(arr, 10, out=scratch.mask[:n]))
    starts = np.concatenate(([0], nl + 1))
    stops = np.append(nl, n)
    if data[end - 1 : end] == b"\n":  # the block ends with its last line's newline: no line after it
        starts, stops = starts[:-1], stops[:-1]
    nonempty = stops > starts
    ok = nonempty & (arr[np.minimum(starts, n - 1)] == 0x7B) & (arr[np.maximum(stops - 1, 0)] == 0x7D)
    bad: list[tuple[int, int]] = []
    blank = 0
    for i in np.flatnonzero(~ok).tolist():
        s, e = start + int(starts[i]), start + int(stops[i])
        line = data[s:e].strip()
        if not line:
            blank += 1
        elif not (line[:1] == b"{" and line[-1:] == b"}"):  # whitespace or \r around an object is fine
            bad.append((s, e))
    return bad, blank, len(nl)


def stage_dump(path: str | Path, stage_dir: str | Path, cfg: IngestConfig, salt: str | None = None) -> StageResult:
    """Stream one dump, filter it and stage the survivors in `stage_dir`.

    Writes posts-*.parquet, comments-*.parquet (authors hashed with `salt`, by default the one of
    `author_salt` for the folder above `stage_dir`), rejects.ndjson (one row per line that is not a
    JSON object or whose record has a missing or invalid field: file, line number, reason; no raw
    text, which could hold user names) and stats.json. A damaged .zst keeps every complete line
    before the damage and returns the error instead of raising, so the caller can merge the rest
    and then report it.
    """
    path = Path(path)
    stage_dir = Path(stage_dir)
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    anon = Anonymizer(salt if salt is not None else author_salt(cfg, stage_dir.parent), cfg.scrub_pii)
    flt = RecordFilter(cfg, path.name, anon)
    kind = dump_kind(path)
    posts = _PartWriter(stage_dir, "posts", POST_COLUMNS)
    comments = _PartWriter(stage_dir, "comments", COMMENT_COLUMNS)
    counts: dict[str, Counter[str]] = {"submissions": Counter(), "comments": Counter()}
    lines = decompressed = malformed = blank = 0
    shape_seconds = 0.0
    cpu: dict[str, float] = {}
    t_cpu = time.thread_time()
    needles = [bytes(b | 0x20 for b in f'"{s}"'.encode()) for s in cfg.subreddits]
    error = None
    t_start = time.perf_counter()
    loads = orjson.loads
    file_name = str(path)
    with open(stage_dir / "rejects.ndjson", "wb") as rejects:
        # the last reject's block, position and line number: the next one counts lines from there
        at_block: Block | None = None
        at_pos = at_line = 0

        def reject(block: Block, s: int, reason: str, error: str, field: str | None = None) -> None:
            nonlocal at_block, at_pos, at_line
            if at_block is not block or at_pos > s:
                at_block, at_pos, at_line = block, block.start, block.first_line
            at_line += block.data.count(b"\n", at_pos, s)
            at_pos = s
            entry = {"file": file_name, "line": at_line, "reason": reason, "error": error}
            if field:
                entry["field"] = field
            rejects.write(orjson.dumps(entry) + b"\n")

        scratch = _Scratch()
        try:
            # lines are counted here, by the shape check: the decoding thread only decodes
            blocks = iter_blocks(path, read_bytes=cfg.read_mb << 20, count_lines=False)
            line_no = 1
            for block in read_ahead(blocks, cfg.read_ahead, cpu):
                data, start, end = block.data, block.start, block.end
                t_shape = time.thread_time()
                bad, n_blank, newlines = _misshapen(data, start, end, scratch)
                shape_seconds += time.thread_time() - t_shape
                block.first_line, block.newlines = line_no, newlines
                line_no += newlines
                lines += newlines + (data[end - 1 : end] != b"\n")
                decompressed += end - start
                blank += n_blank
                for s, e in bad:
                    malformed += 1
                    head = data[s:e].strip()[:1].decode("utf-8", "replace")
                    reject(block, s, "malformed", f"not a JSON object (the line starts with {head!r})")
                skip = {s for s, _ in bad}
                view = memoryview(data)
                for s, e in _candidates(data, start, end, needles, scratch):
                    if s in skip or not data[s:e].strip():
                        continue
                    try:
                        rec = loads(view[s:e])
                    except orjson.JSONDecodeError as exc:
                        malformed += 1
                        reject(block, s, "malformed", f"invalid JSON: {exc}")
                        continue
                    if not isinstance(rec, dict):
                        malformed += 1
                        reject(block, s, "malformed", f"not a JSON object but {type(rec).__name__}")
                        continue
                    is_comment = kind == "comments" or (kind is None and "parent_id" in rec)
                    if is_comment:
                        reason, row = flt.comment(rec)
                        bucket, writer = counts["comments"], comments
                    else:
                        reason, row = flt.post(rec)
                        bucket, writer = counts["submissions"], posts
                    if reason:
                        bucket[reason] += 1
                        if reason in ("missing_field", "invalid_field"):
                            value = rec.get(flt.field)
                            shown = "" if value is None or flt.field == "author" else f": {orjson.dumps(value)[:80].decode()}"
                            reject(block, s, reason, f"{flt.field} {reason.replace('_field', '')}{shown}", flt.field)
                    else:
                        bucket["kept"] += 1
                        writer.add(row)  # type: ignore[arg-type]  # a kept record has its row
        except DumpCorruptError as exc:
            error = str(exc)
            log.error("%s", exc)
    posts.flush()
    comments.flush()
    seconds = time.perf_counter() - t_start
    cpu["parse"] = time.thread_time() - t_cpu  # with read_ahead 0, decoding included
    parsed = sum(sum(c.values()) for c in counts.values())
    stats = {
        "dump": path.name,
        "kind": kind or "mixed",
        "lines": lines,
        "decompressed_bytes": decompressed,
        "malformed": malformed,
        "blank": blank,
        # object-shaped lines without the subreddit's name: other subreddits, never parsed
        "prefiltered_out": lines - malformed - blank - parsed,
        "submissions": dict(counts["submissions"]),
        "comments": dict(counts["comments"]),
        "seconds": round(seconds, 3),
        "shape_check_cpu_seconds": round(shape_seconds, 3),
        # CPU seconds per thread: on a quiet machine, throughput follows the larger one
        "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
        "error": error,
    }
    (stage_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    return StageResult(stats, error)


# --------------------------------------------------------------------------------------------
# Threads: tree and chains
# --------------------------------------------------------------------------------------------


@dataclass
class Utt:
    """One node of a post's tree: the post itself (fullname t3_) or a comment (t1_)."""

    id: str
    fullname: str
    author: str
    text: str
    score: int
    created_utc: int
    children: list[Utt] = field(default_factory=list)


def build_tree(post: Utt, comments: list[tuple[str, str, str, str, int, int]]) -> dict[str, Utt]:
    """Attach (id, parent_id, author, text, score, created_utc) comments under `post`.

    parent_id is a fullname (t3_<post> or t1_<comment>). Comments whose parent was filtered out
    are unreachable and stay out. Children are ordered by time, then id, for stable output.
    """
    nodes = {post.fullname: post}
    items = [
        (Utt(cid, f"t1_{cid}", author, text, score, created), parent) for cid, parent, author, text, score, created in comments
    ]
    for utt, _ in items:
        nodes[utt.fullname] = utt
    for utt, parent in items:
        node = nodes.get(parent)
        if node is not None and node is not utt:
            node.children.append(utt)
    for node in nodes.values():
        if len(node.children) > 1:
            node.children.sort(key=lambda u: (u.created_utc, u.id))
    return nodes


def extract_chains(post: Utt) -> list[list[Utt]]:
    """Every maximal chain o1, c1, o2, c2, o3, ... in which the OP and one commenter alternate.

    c1 is a non-OP reply to the post, o_{t+1} an OP reply to c_t, and c_{t+1} a reply by c1's author
    to o_{t+1}. A chain ends with an OP turn and is not a prefix of a longer one; each ends at a
    distinct OP comment, so there are at most as many chains as OP comments.
    """
    op = post.author
    chains: list[list[Utt]] = []
    stack: list[tuple[list[Utt], str | None]] = [([post], None)]
    while stack:
        path, commenter = stack.pop()
        extensions = [
            (c, o)
            for c in path[-1].children
            if c.author != op and (commenter is None or c.author == commenter)
            for o in c.children
            if o.author == op
        ]
        if not extensions:
            if len(path) >= 3:
                chains.append(path)
            continue
        for c, o in reversed(extensions):  # reversed: the stack pops them in time order
            stack.append((path + [c, o], c.author))
    return chains


def turn_siblings(parent: Utt, chosen: Utt, op: str, max_siblings: int) -> list[tuple[Utt, list[Utt]]]:
    """The siblings of commenter turn `chosen` (the other non-OP replies to `parent`), each with the
    OP's direct replies to it.

    Those the OP answered come first (the DPO stage needs the OP's reaction to a rejected
    sibling), then by score. Over `max_siblings`, the kept ones are a uniform sample of all
    (ordered by a digest of their ids), so that the DPO stage's random rejected sibling is still
    drawn from all of them (§5.2).
    """
    sibs = []
    for s in parent.children:
        if s is chosen or s.author == op:
            continue
        replies = [r for r in s.children if r.author == op]
        sibs.append((s, replies))
    if len(sibs) > max_siblings:
        sibs = sorted(sibs, key=lambda x: hashlib.blake2b(x[0].id.encode(), digest_size=8).digest())[:max_siblings]
    sibs.sort(key=lambda x: (not x[1], -x[0].score, x[0].created_utc, x[0].id))
    return sibs[:max_siblings]


def chain_siblings(chain: list[Utt], op: str, max_siblings: int) -> list[tuple[int, Utt, list[Utt]]]:
    """For each commenter turn c_t of `chain`: (turn index, sibling, OP's direct replies to the
    sibling), as `turn_siblings` orders and caps them."""
    return [
        (turn, s, replies)
        for turn in range(1, len(chain), 2)
        for s, replies in turn_siblings(chain[turn - 1], chain[turn], op, max_siblings)
    ]


# --------------------------------------------------------------------------------------------
# Threads: the table
# --------------------------------------------------------------------------------------------

TURN = pl.Struct(
    {"utt_id": pl.String, "role": pl.String, "author": pl.String, "text": pl.String, "score": pl.Int64, "created_utc": pl.Int64}
)
OP_REPLY = pl.Struct({"utt_id": pl.String, "text": pl.String})
SIBLING = pl.Struct(
    {
        "turn": pl.Int32,
        "utt_id": pl.String,
        "author": pl.String,
        "text": pl.String,
        "score": pl.Int64,
        "op_replies": pl.List(OP_REPLY),
    }
)
THREADS_SCHEMA = pl.Schema(
    {
        "thread_id": pl.String,
        "post_id": pl.String,
        "subreddit": pl.String,
        "created_utc": pl.Int64,
        "dump": pl.String,
        "turns": pl.List(TURN),
        "siblings": pl.List(SIBLING),
    }
)

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_PHONE = re.compile(r"(?<!\w)(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{3}\)|\d{3})[\s.-]?\d{3}[\s.-]?\d{4}(?!\w)")
_USER = re.compile(r"(?<![\w/])/?u/[A-Za-z0-9_-]{3,20}")
#: every match of _PHONE holds one: two groups of three digits with at most ")" and one separator
#: between them (years and counts, which hold three digits in a row, do not run _PHONE)
_PHONE_HINT = re.compile(r"\d{3}\)?[\s.-]?\d{3}")


class Anonymizer:
    """Salted author hashes and text cleanup, applied only to what ends up in threads."""

    def __init__(self, salt: str, scrub_pii: bool):
        self.salt = salt.encode()
        self.scrub = scrub_pii
        self._cache: dict[str, str] = {}

    def author(self, name: str) -> str:
        h = self._cache.get(name)
        if h is None:
            h = hashlib.sha256(self.salt + b"\x00" + name.encode()).hexdigest()[:16]
            self._cache[name] = h
        return h

    def text(self, text: str) -> str:
        text = html.unescape(text).strip()  # the dumps store &amp; &lt; &gt; as Reddit's API does
        if self.scrub:
            # Each pattern runs only where its required characters occur: a plain substring test is
            # ~100x faster than the patterns' scan, and most texts hold none of them.
            if "@" in text:
                text = _EMAIL.sub("[email]", text)
            if _PHONE_HINT.search(text):
                text = _PHONE.sub("[phone]", text)
            if "u/" in text:
                text = _USER.sub("[user]", text)
        return text


def thread_rows(post_row: dict, comments: list[tuple], anon: Anonymizer, max_siblings: int) -> list[dict]:
    """The threads.parquet rows of one post. `comments`: (id, parent_id, author, body, score, created_utc),
    authors hashed when staged; `anon` cleans the texts."""
    text = post_row["title"].strip() + "\n\n" + post_row["selftext"].strip()
    post = Utt(post_row["id"], f"t3_{post_row['id']}", post_row["author"], text, post_row["score"], post_row["created_utc"])
    build_tree(post, comments)
    op = post.author
    # chains of a post share their first turns: each turn's dict, text and siblings are built once
    # per post and shared by the rows (the thread build's main cost on dense data, docs/ingest.md)
    cleaned: dict[str, str] = {}
    turn_rows: dict[tuple[int, str], dict[str, Any]] = {}
    sibling_row_of: dict[tuple[int, str], dict[str, Any]] = {}
    sibling_rows: dict[str, list[dict[str, Any]]] = {}

    def clean(u: Utt) -> str:
        if u.id not in cleaned:
            cleaned[u.id] = anon.text(u.text)
        return cleaned[u.id]

    def turn_row(i: int, u: Utt) -> dict[str, Any]:
        key = (i, u.id)
        if key not in turn_rows:
            turn_rows[key] = {
                "utt_id": u.id,
                "role": "op" if i % 2 == 0 else "commenter",
                "author": u.author,
                "text": clean(u),
                "score": u.score,
                "created_utc": u.created_utc,
            }
        return turn_rows[key]

    def sibling_row(turn: int, s: Utt, replies: list[Utt]) -> dict[str, Any]:
        key = (turn, s.id)
        if key not in sibling_row_of:
            sibling_row_of[key] = {
                "turn": turn,
                "utt_id": s.id,
                "author": s.author,
                "text": clean(s),
                "score": s.score,
                "op_replies": [{"utt_id": r.id, "text": clean(r)} for r in replies],
            }
        return sibling_row_of[key]

    def siblings_of(turn: int, parent: Utt, chosen: Utt) -> list[dict[str, Any]]:
        if chosen.id not in sibling_rows:
            sibling_rows[chosen.id] = [sibling_row(turn, s, r) for s, r in turn_siblings(parent, chosen, op, max_siblings)]
        return sibling_rows[chosen.id]

    rows = []
    for chain in extract_chains(post):
        rows.append(
            {
                "thread_id": f"{post.id}:{chain[-1].id}",
                "post_id": post.id,
                "subreddit": post_row["subreddit"],
                "created_utc": post.created_utc,
                "dump": post_row["dump"],
                "turns": [turn_row(i, u) for i, u in enumerate(chain)],
                "siblings": [row for t in range(1, len(chain), 2) for row in siblings_of(t, chain[t - 1], chain[t])],
            }
        )
    return rows


def build_threads(stage_dirs: list[Path], out_path: Path, cfg: IngestConfig) -> dict[str, Any]:
    """Rebuild every post's tree from the staged survivors and write threads.parquet.

    Only what a chain can use is loaded: posts the OP answered a commenter in, and of their
    comments the OP's, the replies to the post and the replies to the OP. Large inputs are split
    into buckets of posts (by hash of the post id) so memory stays bounded.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    post_files = [str(p) for d in stage_dirs for p in sorted(d.glob("posts-*.parquet"))]
    comment_files = [str(p) for d in stage_dirs for p in sorted(d.glob("comments-*.parquet"))]
    stats: dict[str, Any] = {
        "posts": 0,
        "comments": 0,
        "threads": 0,
        "single_turn": 0,
        "multi_turn": 0,
        "utterances": 0,
        "max_turns": 0,
    }
    if not post_files:
        return stats
    posts = pl.scan_parquet(post_files, schema=POST_COLUMNS).unique(subset="id", keep="first", maintain_order=True)
    stats["posts"] = posts.select(pl.len()).collect().item()
    if not comment_files:
        return stats
    comments = (
        pl.scan_parquet(comment_files, schema=COMMENT_COLUMNS)
        .unique(subset="id", keep="first", maintain_order=True)
        .join(posts.select(pl.col("id").alias("link_id"), pl.col("author").alias("op")), on="link_id")
        .with_columns(is_op=pl.col("author") == pl.col("op"))
    )
    op_ids = comments.filter("is_op").select(("t1_" + pl.col("id")).alias("parent_id"), pl.lit(True).alias("parent_is_op"))
    comments = comments.join(op_ids, on="parent_id", how="left").with_columns(pl.col("parent_is_op").fill_null(False))
    relevant = comments.filter(pl.col("is_op") | pl.col("parent_is_op") | (pl.col("parent_id") == "t3_" + pl.col("link_id")))
    # posts where the OP answered some commenter: the only ones with a chain
    answered = (
        comments.filter(pl.col("is_op") & pl.col("parent_id").str.starts_with("t1_"))
        .select(pl.col("parent_id").str.slice(3).alias("id"))
        .join(comments.filter(~pl.col("is_op")).select("id", "link_id"), on="id")
        .select("link_id")
        .unique()
    )
    relevant = relevant.join(answered, on="link_id", how="semi").select(
        "id", "link_id", "parent_id", "author", "body", "score", "created_utc"
    )
    # buckets from the staged rows (parquet metadata: no pass over the data); the relevant ones,
    # a share of them, are counted as the buckets are collected
    n_staged = pl.scan_parquet(comment_files, schema=COMMENT_COLUMNS).select(pl.len()).collect().item()
    n_buckets = max(1, math.ceil(n_staged / max(1, cfg.bucket_rows)))
    utt_ids: set[str] = set()
    anon = Anonymizer("", cfg.scrub_pii)  # texts only: authors were hashed when staged
    writer = None
    tmp_path = out_path.with_suffix(".parquet.tmp")
    arrow_schema = pl.DataFrame(schema=THREADS_SCHEMA).to_arrow().schema  # what polars writes and reads back
    try:
        for b in range(n_buckets):
            part = relevant if n_buckets == 1 else relevant.filter(pl.col("link_id").hash(seed=0) % n_buckets == b)
            part = part.sort("link_id", "created_utc", "id").collect(engine="streaming")
            stats["comments"] += part.height
            bucket_posts = (
                posts.join(part.lazy().select(pl.col("link_id").unique().alias("id")), on="id", how="semi")
                .collect()
                .sort("created_utc", "id")
            )
            by_post: dict[str, list[tuple]] = defaultdict(list)
            for cid, link, parent, author, body, score, created in part.iter_rows():
                by_post[link].append((cid, parent, author, body, score, created))
            del part
            rows = []
            for post_row in bucket_posts.iter_rows(named=True):
                rows.extend(thread_rows(post_row, by_post.pop(post_row["id"], []), anon, cfg.max_siblings))
            if not rows:
                continue
            # pyarrow builds the nested rows 4-5x faster than polars' DataFrame(rows) (docs/ingest.md)
            table = pa.Table.from_pylist(rows, schema=arrow_schema)
            if writer is None:
                writer = pq.ParquetWriter(tmp_path, table.schema, compression="zstd")
            writer.write_table(table)
            for r in rows:
                utt_ids.update(t["utt_id"] for t in r["turns"])
                n = len(r["turns"])
                stats["threads"] += 1
                stats["single_turn" if n == 3 else "multi_turn"] += 1
                stats["max_turns"] = max(stats["max_turns"], n)
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        tmp_path.replace(out_path)
        stats["utterances"] = len(utt_ids)  # a post's utterances are all in its bucket
    return stats


# --------------------------------------------------------------------------------------------
# Manifest, incremental merge, the whole stage
# --------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"


def load_manifest(path: str | Path) -> dict[str, Any]:
    """The record of staged dumps: {"dumps": {sha256: entry}, "hashes": {abs path: [size, mtime_ns, sha256]}}."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.exists():
        return {"version": STAGE_VERSION, "dumps": {}, "hashes": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IngestError(f"{path}: manifest is not valid JSON ({exc}); delete it to re-ingest every dump") from None
    data.setdefault("dumps", {})
    data.setdefault("hashes", {})
    return data


def save_manifest(manifest: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
    tmp.replace(path)  # atomic: a crash never leaves half a manifest


def remembered_hash(path: Path, manifest: dict[str, Any]) -> str | None:
    """The SHA-256 the manifest holds for `path`, while its size and mtime are unchanged."""
    st = path.stat()
    known = manifest["hashes"].get(str(path.resolve()))
    return known[2] if known and known[0] == st.st_size and known[1] == st.st_mtime_ns else None


def remember_hash(path: Path, before: os.stat_result, sha: str, manifest: dict[str, Any]) -> str:
    """Record `sha` for `path` under the size and mtime it had before it was read (`before`): a file
    changed while it was hashed is hashed again next time."""
    manifest["hashes"][str(path.resolve())] = [before.st_size, before.st_mtime_ns, sha]
    return sha


def dump_hash(path: Path, manifest: dict[str, Any]) -> str:
    """SHA-256 of the file, remembered per (path, size, mtime) so an unchanged file is hashed once."""
    if sha := remembered_hash(path, manifest):
        return sha
    before = path.stat()
    return remember_hash(path, before, file_sha256(path), manifest)


class _HashAhead:
    """The SHA-256 of the given dumps. Those the manifest does not remember are hashed in a thread,
    smallest file first, so staging one dump overlaps hashing the next (hashlib gives up the GIL
    while it hashes); a hash is recorded in the manifest by the thread that asks for it."""

    def __init__(self, paths: Sequence[Path], manifest: dict[str, Any]):
        self.manifest = manifest
        unknown = {p.resolve(): p for p in paths if remembered_hash(p, manifest) is None}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ingest-hash")
        # the size and mtime before hashing are what the hash is remembered under (`remember_hash`)
        self.futures: dict[Path, tuple[os.stat_result, Future[str]]] = {
            key: (p.stat(), self.pool.submit(file_sha256, p))
            for key, p in sorted(unknown.items(), key=lambda kv: kv[1].stat().st_size)
        }

    def pending(self, paths: Sequence[Path]) -> list[Path]:
        """`paths` whose hash is being computed, in the order the thread computes them."""
        rank = {key: i for i, key in enumerate(self.futures)}
        return sorted((p for p in paths if p.resolve() in rank), key=lambda p: rank[p.resolve()])

    def sha(self, path: Path) -> str:
        pending = self.futures.get(path.resolve())
        if pending is None:
            return dump_hash(path, self.manifest)
        before, future = pending
        return remember_hash(path, before, future.result(), self.manifest)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def find_new_dumps(folder: str | Path, manifest: str | Path | dict[str, Any], min_age_s: float = 60.0) -> list[Path]:
    """The .zst files in `folder` whose content is not in the manifest yet.

    Files modified less than `min_age_s` ago are skipped: they may still be downloading. A file
    renamed or copied since it was ingested has the same hash and is not new.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise IngestError(f"dumps folder not found: {folder}")
    data = manifest if isinstance(manifest, dict) else load_manifest(manifest)
    known = set(data["dumps"])
    now = time.time()
    new = []
    for path in sorted(folder.glob("*.zst")):
        if not path.is_file() or now - path.stat().st_mtime < min_age_s:
            continue
        if dump_hash(path, data) not in known:
            new.append(path)
    return new


@dataclass
class IngestResult:
    threads: Path
    rejects: Path
    stats: Path
    manifest: Path
    summary: dict[str, Any]
    staged_now: list[str]
    reused: list[str]
    errors: list[str]

    def paths(self) -> dict[str, Path]:
        return {"threads": self.threads, "rejects": self.rejects, "stats": self.stats, "manifest": self.manifest}


def ingest_dumps(dumps: Sequence[str | Path], out_dir: str | Path, cfg: IngestConfig, stage_fn: Any = None) -> IngestResult:
    """The whole stage: stage the dumps not staged yet, merge every staged dump, write the outputs.

    Outputs in `out_dir`: threads.parquet, rejects.ndjson, stats.json, manifest.json, staged/.
    Dumps recorded in the manifest are merged too (a new month's comments complete the last
    month's posts). When the filters changed, recorded dumps that still exist are re-staged; a
    recorded dump whose file now holds other bytes (a damaged download fetched again) is replaced
    by the new content. `stage_fn(path, stage_dir, cfg) -> StageResult` lets the flow wrap staging
    in a cached task; it finds the salt of author hashes as `stage_dump` does.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage_fn = stage_fn or stage_dump
    manifest_path = out_dir / MANIFEST
    manifest = load_manifest(manifest_path)
    given = [Path(d) for d in dumps]
    missing = [str(p) for p in given if not p.is_file()]
    if missing:
        raise IngestError(f"dump file(s) not found: {', '.join(missing)}")
    problems = [f"{p} {why}" for p in given if (why := dump_problem(p))]
    if problems:
        raise IngestError("not a Pushshift dump (NDJSON compressed by zstd): " + "; ".join(problems))
    fp = filters_fingerprint(cfg, author_salt(cfg, out_dir / "staged"))
    hashes = _HashAhead(given, manifest)
    try:
        # recorded dumps first, then the given ones; a dump seen twice (same bytes) is staged once
        todo: dict[str, Path] = {}
        for sha, entry in list(manifest["dumps"].items()):
            on_disk = {p: hashes.sha(Path(p)) for p in entry.get("paths", [entry["path"]]) if Path(p).is_file()}
            same = [p for p, h in on_disk.items() if h == sha]
            if on_disk and not same:
                # every copy still there holds other bytes: the new content replaces the recorded one
                log.info("%s changed since it was staged: staging its new content", ", ".join(on_disk))
                shutil.rmtree(out_dir / entry["stage"], ignore_errors=True)
                del manifest["dumps"][sha]
                todo.update({h: Path(p) for p, h in on_disk.items()})
            elif entry.get("filters") == fp:
                todo[sha] = Path(same[0] if same else entry["path"])
            elif same:
                todo[sha] = Path(same[0])
            else:
                log.warning(
                    "%s was staged with other filters and is gone from %s: left out of the merge", entry["name"], entry["path"]
                )
        waiting = hashes.pending(given)
        for p in given:
            if p not in waiting:
                todo[hashes.sha(p)] = p
        staged_now: set[str] = set()
        handled: set[str] = set()

        def stage(sha: str, path: Path) -> None:
            entry = manifest["dumps"].get(sha)
            if sha in handled:  # the same bytes under a second name, given in this run
                if entry and str(path.resolve()) not in entry["paths"]:
                    entry["paths"].append(str(path.resolve()))
                return
            handled.add(sha)
            stage_dir = out_dir / "staged" / f"{sha[:24]}-{fp}"
            if entry and entry.get("filters") == fp and (out_dir / entry["stage"] / "stats.json").exists():
                if path.is_file() and str(path.resolve()) not in entry["paths"]:
                    entry["paths"].append(str(path.resolve()))
                return
            log.info("staging %s", path)
            result = stage_fn(path, stage_dir, cfg)
            if entry and entry.get("stage") and entry["stage"] != str(stage_dir.relative_to(out_dir)):
                shutil.rmtree(out_dir / entry["stage"], ignore_errors=True)
            manifest["dumps"][sha] = {
                "name": path.name,
                "path": str(path.resolve()),
                "paths": [str(path.resolve())],
                "kind": dump_kind(path) or "mixed",
                "filters": fp,
                "stage": str(stage_dir.relative_to(out_dir)),
                "error": result.error,
                "ingested_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            staged_now.add(sha)
            save_manifest(manifest, manifest_path)  # a crash later keeps what was staged

        for sha, path in todo.items():
            stage(sha, path)
        # each dump still being hashed is staged as soon as its hash is known
        for p in waiting:
            stage(hashes.sha(p), p)
        order = list(dict.fromkeys([*todo, *(hashes.sha(p) for p in given)]))
    finally:
        hashes.close()
    save_manifest(manifest, manifest_path)
    entries = [manifest["dumps"][sha] for sha in order]
    staged_names = [e["name"] for sha, e in zip(order, entries) if sha in staged_now]
    reused = [e["name"] for sha, e in zip(order, entries) if sha not in staged_now]
    errors = [e["error"] for e in entries if e.get("error")]
    stage_dirs = [out_dir / e["stage"] for e in entries]

    per_dump = [json.loads((d / "stats.json").read_text()) for d in stage_dirs]
    rejects_path = out_dir / "rejects.ndjson"
    with open(rejects_path, "wb") as out:
        for d in stage_dirs:
            with open(d / "rejects.ndjson", "rb") as src:
                shutil.copyfileobj(src, out)
    totals: dict[str, Any] = {
        "lines": 0,
        "decompressed_bytes": 0,
        "malformed": 0,
        "blank": 0,
        "prefiltered_out": 0,
        "submissions": Counter(),
        "comments": Counter(),
    }
    for s in per_dump:
        for k in ("lines", "decompressed_bytes", "malformed", "blank", "prefiltered_out"):
            totals[k] += s[k]
        totals["submissions"].update(s["submissions"])
        totals["comments"].update(s["comments"])
    threads_path = out_dir / "threads.parquet"
    build = build_threads(stage_dirs, threads_path, cfg)
    summary = {
        "dumps": per_dump,
        "totals": {k: dict(v) if isinstance(v, Counter) else v for k, v in totals.items()},
        "threads": build,
        "staged_now": staged_names,
        "reused": reused,
        "errors": errors,
        "filters_fingerprint": fp,
    }
    stats_path = out_dir / "stats.json"
    stats_path.write_text(json.dumps(summary, indent=1, default=str))
    names = ", ".join(s["dump"] for s in per_dump) or "(none)"
    if errors and (cfg.fail_on_corrupt or build["threads"] == 0):
        # the damage is the error, also when it left nothing to build threads from
        outcome = (
            f"their complete records were kept and merged into {threads_path}"
            if build["threads"]
            else "their complete records were kept, and no thread could be built from what was read"
        )
        if not build["threads"]:
            threads_path.unlink(missing_ok=True)
        raise IngestError(f"damaged dump(s), {outcome}:\n" + "\n".join(errors))
    if build["threads"] == 0:
        threads_path.unlink(missing_ok=True)
        kept_posts = totals["submissions"].get("kept", 0)
        kept_comments = totals["comments"].get("kept", 0)
        empty = [s["dump"] for s in per_dump if s["lines"] == 0]
        why = (
            f"{', '.join(empty)} hold(s) no lines"
            if empty
            else "no post matched the filters"
            if kept_posts == 0
            else "no comment matched the filters"
            if kept_comments == 0
            else "no post has an OP reply to a commenter among the kept records"
        )
        raise NoThreadsError(
            f"ingest produced no thread from {names}: {why} (subreddits={cfg.subreddits}, "
            f"dates {cfg.start_date}..{cfg.end_date}); kept {kept_posts} posts and {kept_comments} comments; "
            f"drops per reason: posts {dict(totals['submissions'])}, comments {dict(totals['comments'])}; "
            f"{totals['malformed']} malformed lines (see {rejects_path}); details in {stats_path}"
        )
    return IngestResult(threads_path, rejects_path, stats_path, manifest_path, summary, staged_names, reused, errors)


def read_threads(path: str | Path) -> pl.DataFrame:
    """Load threads.parquet and check it against the contract; errors name the file and the column."""
    path = Path(path)
    if not path.exists():
        raise IngestError(f"{path}: threads file not found; run `esvr ingest` first")
    try:
        df = read_parquet(path, "threads")
    except ValueError as exc:
        raise IngestError(str(exc)) from None
    for name, dtype in THREADS_SCHEMA.items():
        if name not in df.columns:
            raise IngestError(f"{path}: column '{name}' is missing (expected {dtype})")
        if df.schema[name] != dtype:
            raise IngestError(f"{path}: column '{name}' has type {df.schema[name]}, expected {dtype}")
    if df.height == 0:
        raise IngestError(f"{path}: no threads")
    return df


def flat_counts(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers worth a metric each: per-reason drops, kept records, threads."""
    t = summary["totals"]
    out: dict[str, float] = {
        "lines": t["lines"],
        "decompressed_mb": t["decompressed_bytes"] / 1e6,
        "malformed": t["malformed"],
        "blank": t["blank"],
        "prefiltered_out": t["prefiltered_out"],
    }
    for kind in ("submissions", "comments"):
        for reason, n in t[kind].items():
            out[f"{kind}.{reason}"] = n
    for k, v in summary["threads"].items():
        out[f"threads.{k}" if k != "threads" else "threads"] = v
    out["dumps_staged_now"] = len(summary["staged_now"])
    out["dumps_reused"] = len(summary["reused"])
    out["dumps_damaged"] = len(summary["errors"])
    return out
