"""Reading the pipeline's parquet files: an error names the file, what it should be and what to do."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from esvr.models.config import InputFileError


def read_parquet(path: str | Path, what: str, columns: frozenset[str] | set[str] = frozenset()) -> pl.DataFrame:
    """The `what` file at `path` (e.g. "threads"), which must have `columns`.

    Missing: FileNotFoundError; truncated or not parquet (a copy cut short, a full disk): ValueError
    saying so, rather than the reader's "out of specification" without a name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        df = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputFileError(
            f"{path}: not a readable {what} parquet file ({type(exc).__name__}: {exc}); it may be truncated: "
            "write it again (run the stage that makes it) or give another file"
        ) from None
    missing = columns - set(df.columns)
    if missing:
        raise InputFileError(f"{path}: missing column(s) {sorted(missing)}; has {df.columns}")
    return df
