"""`esvr compare RUN_A RUN_B`: two MLflow runs side by side, as a table in the terminal.

Any two runs of the tracking store: pipeline runs, stage runs, training runs (their metric keys
are the same from run to run: ``train_tvd.*``, ``train.loss``, ...). It prints the metrics of
either run with both values and B - A, then the params and the ``esvr.*`` tags that differ (keys
one run lacks show ``-``). The store is the user's ``MLFLOW_TRACKING_URI``, else the run folder's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

MISSING = "-"


class CompareError(RuntimeError):
    """A run that is not in the store; the message names it and the store."""


def load_run(client: MlflowClient, ref: str) -> Run:
    """A run by id (``mlflow:<id>`` too, as components are addressed)."""
    run_id = ref.removeprefix("mlflow:")
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise CompareError(f"no MLflow run {ref!r} in {client.tracking_uri}") from None


def _fmt(value: object) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return [line.format(*header).rstrip(), line.format(*("-" * w for w in widths)).rstrip()] + [
        line.format(*r).rstrip() for r in rows
    ]


def differing(a: Mapping[str, str], b: Mapping[str, str]) -> list[tuple[str, str | None, str | None]]:
    """(key, value in a, value in b) for every key whose values differ, sorted by key."""
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def compare_runs(run_a: Run, run_b: Run) -> list[str]:
    """The comparison's lines: a title per run, the metrics, then the differing params and tags."""
    name = {r.info.run_id: f"{r.info.run_name or ''} ({r.info.run_id[:8]})".strip() for r in (run_a, run_b)}
    a_label, b_label = name[run_a.info.run_id], name[run_b.info.run_id]
    lines = [f"A: {a_label}", f"B: {b_label}", ""]
    ma, mb = run_a.data.metrics, run_b.data.metrics
    rows = []
    for key in sorted(ma.keys() | mb.keys()):
        va, vb = ma.get(key), mb.get(key)
        delta = _fmt(vb - va) if va is not None and vb is not None else MISSING
        rows.append((key, _fmt(va), _fmt(vb), delta))
    lines += _table(("metric", "A", "B", "B - A"), rows) if rows else ["no metrics in either run"]
    params = differing(run_a.data.params, run_b.data.params)
    lines += ["", f"params that differ ({len(params)} of {len(run_a.data.params.keys() | run_b.data.params.keys())})"]
    if params:
        lines += _table(("param", "A", "B"), [(k, _fmt(va), _fmt(vb)) for k, va, vb in params])
    esvr_tags = [t for t in differing(run_a.data.tags, run_b.data.tags) if t[0].startswith("esvr.") and t[0] != "esvr.run_name"]
    if esvr_tags:
        lines += ["", "tags that differ"] + _table(("tag", "A", "B"), [(k, _fmt(va), _fmt(vb)) for k, va, vb in esvr_tags])
    return lines


def compare(ref_a: str, ref_b: str, tracking_uri: str | None = None) -> list[str]:
    client = MlflowClient(tracking_uri=tracking_uri)
    return compare_runs(load_run(client, ref_a), load_run(client, ref_b))
