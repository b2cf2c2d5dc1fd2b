"""Advisory file locks that leave no file behind.

A lock is an ``flock`` on a small file beside what it guards. The holder of the last lock removes
the file on release, and whoever takes a lock checks that the file it locked is still the one at
that path (another process may have removed it meanwhile): so a finished run leaves no lock file,
and two writers never both believe they hold the lock. A killed holder's lock goes with its
process; the file it leaves is taken over by the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class LockBusy(RuntimeError):
    """Another process holds the lock."""


@contextlib.contextmanager
def held_lock(lock_path: Path, *, shared: bool = False, busy: str = "") -> Iterator[None]:
    """Hold ``lock_path`` (exclusive, or `shared` with other shared holders) or raise `LockBusy`
    with the message `busy` at once: no waiting."""
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(busy or f"{lock_path} is held by another process") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed by its last holder after we opened it: take the new one
    try:
        yield
    finally:
        try:
            # Only the last holder may remove the file: whoever can take it exclusively now.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock_path.unlink(missing_ok=True)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
