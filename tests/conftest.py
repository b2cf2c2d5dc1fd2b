"""Shared fixtures. Prefect and MLflow run for real, in a temporary home per test session.

Prefect reads its settings at import time, so the environment is set here, before any test
module imports it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="esvr-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_SESSION_DIR / "prefect" / "results")
os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# author hashes alike in every run folder (without it each folder draws a random salt)
os.environ["ESVR_AUTHOR_SALT"] = "esvr-tests"
# Tests must never reach a real OpenAI account.
os.environ.pop("OPENAI_API_KEY", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402

#: the folder of the public data sets that a few tests read (ESConv, Touché23-ValueEval)
TEST_DATA_VARIABLE = "ESVR_TEST_DATA"


def shared_data(*parts: str) -> Path:
    """A path in the data folder named by $ESVR_TEST_DATA, or skip the test with the reason."""
    root = os.environ.get(TEST_DATA_VARIABLE)
    if not root:
        pytest.skip(f"needs the data sets folder: set {TEST_DATA_VARIABLE} (it should hold {Path(*parts)})")
    path = Path(root).joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path}, which is missing ({TEST_DATA_VARIABLE}={root})")
    return path


#: TVD and RG trained for one optimizer step and evaluated on one example: for tests about what
#: runs when, not about what training learns
ONE_STEP_TRAINING = {
    "train_tvd": {"setting": "single_turn", "train": {"max_steps": 1}, "eval": {"max_examples": 1, "baselines": []}},
    "train_rg": {"single_turn": {"sft": {"max_steps": 1}, "dpo": {"max_steps": 1}}, "eval": {"max_examples": 1}},
}


def demo_recipe(path: Path, out_dir: Path, dumps: Path, **sections: dict) -> Path:
    """A recipe at `path` that extends configs/demo.yaml (its offline labelers and few-step CPU
    training) with the run folder, the dumps folder and `sections` over it."""
    import yaml

    recipe: dict = {"extends": str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"), **sections}
    recipe["run"] = {**recipe.get("run", {}), "out_dir": str(out_dir)}
    recipe["ingest"] = {**recipe.get("ingest", {}), "dumps_dir": str(dumps)}
    recipe["label"] = {"progress": False, **recipe.get("label", {})}
    path.write_text(yaml.safe_dump(recipe))
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; one test's store must not leak."""
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (converted once per machine, then reused)."""
    from esvr.models.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def tiny_llama(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (the bench's 'tiny' shape) with SmolLM2's tokenizer, saved as a folder.

    Usable wherever a model path is: ``hf:<path>``, trainers, the value of `models.base`.
    """
    import torch
    from transformers import AutoTokenizer

    from esvr.tasks.bench.train import TINY, build_model

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = build_model({**TINY, "vocab_size": len(tokenizer)}, tokenizer, torch.float32, "cpu", "sdpa")
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def stub_server():
    """A scripted OpenAI-compatible server on 127.0.0.1 (tests/stub_server.py)."""
    from stub_server import StubServer

    with StubServer() as server:
        yield server
