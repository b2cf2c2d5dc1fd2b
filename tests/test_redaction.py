"""A key inside a base_url never reaches a log, a stored file, MLflow, Prefect or an error message."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from esvr.flows import tracking
from esvr.flows.config import PipelineConfig, dump_config, load_config
from esvr.models.chat import ChatError
from esvr.models.config import ModelConfig
from esvr.models.openai_backend import OpenAIChat
from esvr.models.redact import redact_url, redact_urls

SECRET = "sk-TOPSECRET123"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"https://user:{SECRET}@example.com/v1", "https://***@example.com/v1"),
        (f"https://{SECRET}@example.com:8443/v1", "https://***@example.com:8443/v1"),
        (
            f"https://x.azure.com/openai?api-version=2024-06-01&api-key={SECRET}",
            "https://x.azure.com/openai?api-version=2024-06-01&api-key=***",
        ),
        (f"http://h/v1?key={SECRET}&model=a", "http://h/v1?key=***&model=a"),
        (f"http://h/v1?access_token={SECRET}", "http://h/v1?access_token=***"),
        (f"http://h/v1?sig={SECRET}", "http://h/v1?sig=***"),
        (f"http://h/v1?subscription-key={SECRET}&x-api-key={SECRET}", "http://h/v1?subscription-key=***&x-api-key=***"),
        # nothing to hide: unchanged, character for character
        ("http://127.0.0.1:8011/v1", "http://127.0.0.1:8011/v1"),
        (
            "https://api.example.com/v1?api-version=2024-06-01&max_tokens=5",
            "https://api.example.com/v1?api-version=2024-06-01&max_tokens=5",
        ),
    ],
)
def test_redact_url(url: str, expected: str):
    assert redact_url(url) == expected


def test_redact_urls_in_text():
    text = f"connect to https://u:{SECRET}@h/v1 failed; see http://docs.example.com/x?token={SECRET}."
    out = redact_urls(text)
    assert SECRET not in out and "https://***@h/v1 failed" in out and "http://docs.example.com/x?token=***" in out
    assert redact_urls("no url here: key=abc") == "no url here: key=abc"
    assert redact_urls(f"HTTP 404: no route /v1/?api-key={SECRET}chat/completions") == "HTTP 404: no route /v1/?api-key=***"


def _url_with_keys(base: str) -> str:
    scheme, _, rest = base.partition("://")
    return f"{scheme}://user:{SECRET}@{rest}?api-key={SECRET}"


def test_error_messages_and_cache_id_hide_the_key(stub_server):
    # the server echoes the path and query it could not route: the cause is redacted too
    model = OpenAIChat("stub", base_url=_url_with_keys(stub_server.base_url), max_retries=0)
    with pytest.raises(ChatError, match="HTTP 404") as err:
        model.chat([{"role": "user", "content": "hi"}])
    assert SECRET not in str(err.value) and SECRET not in model.cache_id
    model = OpenAIChat("stub", base_url=_url_with_keys("http://127.0.0.1:9/v1"), max_retries=0, timeout_s=2)  # no server
    with pytest.raises(ChatError) as err:
        model.chat([{"role": "user", "content": "hi"}])
    assert SECRET not in str(err.value) and SECRET not in model.cache_id
    assert "127.0.0.1:9/v1" in str(err.value)  # still names the server


def test_smoke_json_hides_the_key(stub_server, tmp_path: Path):
    from esvr.tasks.smoke import SmokeConfig, smoke

    scheme, _, rest = stub_server.base_url.partition("://")
    spec = ModelConfig(spec="openai:stub", base_url=f"{scheme}://user:{SECRET}@{rest}")
    path = Path(smoke(spec, SmokeConfig(), tmp_path, use_cache=True))
    assert SECRET not in path.read_text()
    assert json.loads(path.read_text())["model"].startswith("openai:stub@http://***@127.0.0.1")
    for file in tmp_path.rglob("*"):  # the response cache neither
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file


def _config(tmp_path: Path) -> PipelineConfig:
    return load_config(
        None, [f"run.out_dir={tmp_path}", f"models.judge.base_url=https://u:{SECRET}@h.example/v1?api-key={SECRET}"]
    )


def test_the_config_keeps_the_key_for_use_and_shows_it_to_no_one(tmp_path: Path):
    config = _config(tmp_path)
    assert SECRET in config.models.judge.base_url  # the client needs it
    assert SECRET not in dump_config(config)  # esvr config show
    assert SECRET not in json.dumps(config.model_dump(mode="json"))
    # a variant is rebuilt from the config's data: it keeps the key
    config.variants["v"] = {}
    assert config.variant("v").models.judge.base_url == config.models.judge.base_url


def test_mlflow_params_hide_the_key(tmp_path: Path):
    config = _config(tmp_path)
    with tracking.flow_run("pipeline", config) as run:
        pass
    params = MlflowClient().get_run(run.info.run_id).data.params
    assert params["models.judge.base_url"] == "https://***@h.example/v1?api-key=***"
    assert not [k for k, v in params.items() if SECRET in v]
    assert tracking.safe_params({"x": f"http://a:{SECRET}@b"}) == {"x": "http://***@b"}


def test_prefect_stores_the_flow_parameters_without_the_key(prefect_harness, tmp_path: Path):
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="redaction-probe")
    def probe(config: PipelineConfig) -> str:
        return config.models.judge.base_url or ""

    state = probe(_config(tmp_path), return_state=True)
    assert SECRET in state.result()  # the flow itself gets the key

    async def stored() -> str:
        async with get_client() as client:
            run = await client.read_flow_run(state.state_details.flow_run_id)
            return json.dumps(run.parameters)

    text = asyncio.run(stored())
    assert "h.example" in text and SECRET not in text


def test_preflight_names_the_server_without_the_key(tmp_path: Path):
    from esvr.flows.preflight import format_report, preflight

    url = f"http://u:{SECRET}@127.0.0.1:9/v1"  # nothing listens on port 9
    config = load_config(
        None, [f"run.out_dir={tmp_path}", "run.stages=[smoke]", "models.supporter=openai:m", f"models.supporter.base_url={url}"]
    )
    problems = preflight(config, timeout_s=1.0)
    text = format_report(problems)
    assert "http://***@127.0.0.1:9/v1" in text and SECRET not in text
