"""Run recipes: every shipped config loads; bad keys and types name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from esvr.flows.config import ConfigError, PipelineConfig, apply_overrides, flatten, load_config
from esvr.flows.tracking import safe_params

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_folder_has_demo_and_paper():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "paper.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    config = load_config(path)
    assert isinstance(config, PipelineConfig)
    # round trip: what `esvr config show` prints loads back to the same config
    again = PipelineConfig.model_validate(config.model_dump(mode="json"))
    assert again == config


def test_paper_config_uses_the_papers_models():
    config = load_config(Path("configs/paper.yaml") if Path("configs/paper.yaml").exists() else CONFIGS[-1])
    assert config.models.seeker.spec == "openai:gpt-4o-mini"
    assert config.models.judge.spec == "openai:gpt-4o-mini"
    assert "Llama-3-8B-Instruct" in config.models.base


def config_error(tmp_path: Path, text: str) -> str:
    """What `load_config` says of a recipe file holding `text`: it must refuse it, naming the file."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    return str(err.value)


def test_unknown_key_names_key_and_file(tmp_path: Path):
    message = config_error(tmp_path, "run:\n  name: x\n  nmae_typo: 3\n")
    assert "run.nmae_typo" in message and "unknown key" in message


def test_wrong_type_names_key_and_file(tmp_path: Path):
    assert "run.seed" in config_error(tmp_path, "run:\n  seed: not-a-number\n")


def test_unknown_model_backend_is_rejected(tmp_path: Path):
    assert "models.judge" in config_error(tmp_path, "models:\n  judge: gpt4:mini\n")


def test_overrides_are_typed_and_checked(tmp_path: Path):
    config = load_config(None, ["run.seed=7", "models.judge=openai:gpt-4o-mini", "models.cache=false"])
    assert config.run.seed == 7
    assert config.models.judge.spec == "openai:gpt-4o-mini"
    assert config.models.cache is False
    with pytest.raises(ConfigError) as err:
        load_config(None, ["run.no_such_key=1"])
    assert "run.no_such_key" in str(err.value) and "--set" in str(err.value)
    with pytest.raises(ConfigError):
        load_config(None, ["missing-equals-sign"])


def test_override_into_a_model_given_as_string():
    data = apply_overrides({"models": {"judge": "default"}}, ["models.judge.concurrency=3"])
    assert data["models"]["judge"] == {"spec": "default", "concurrency": 3}


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    assert "not valid YAML" in config_error(tmp_path, "run: [unclosed\n")


def test_flatten_and_secret_filtering():
    flat = flatten(
        {
            "a": {"b": 1, "api_key": "sk-123", "token": "t", "password": "p"},
            "models": {"judge": {"api_key_env": "OPENAI_API_KEY"}},
            "smoke": {"max_tokens": 40},
        }
    )
    assert flat["a.b"] == 1
    params = safe_params(flat)
    assert not {"a.api_key", "a.token", "a.password"} & set(params)  # credentials never reach MLflow
    assert params["smoke.max_tokens"] == "40"  # settings that merely mention tokens do
    assert params["models.judge.api_key_env"] == "OPENAI_API_KEY"  # the variable's name is fine
