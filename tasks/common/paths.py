"""Where a run keeps its artifacts: one folder per run (stage outputs, Prefect results, MLflow,
the response cache), so a run can be deleted, copied or compared as a whole."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    out_dir: Path

    @property
    def prefect_home(self) -> Path:
        return self.out_dir / ".prefect"

    @property
    def results(self) -> Path:
        return self.out_dir / ".prefect" / "results"

    @property
    def mlflow_db(self) -> Path:
        return self.out_dir / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.out_dir / "mlartifacts"

    @property
    def response_cache(self) -> Path:
        return self.out_dir / "cache" / "responses.sqlite"

    def stage(self, name: str) -> Path:
        """The folder a stage writes its artifacts to."""
        path = self.out_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path
