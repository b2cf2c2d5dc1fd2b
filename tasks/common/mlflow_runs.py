"""Finding MLflow runs by their tags (the report's evaluate runs, the chat's trained supporter)."""

from __future__ import annotations

import mlflow
from mlflow.tracking import MlflowClient


def runs_by_tag(experiment: str, **tags: str) -> list[mlflow.entities.Run]:
    """Finished runs of an experiment whose tags match, newest first."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])
