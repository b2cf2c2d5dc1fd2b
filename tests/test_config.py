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


# --------------------------------------------------------------------------------------------
# ranges and bad values: one line naming the key and where it came from
# --------------------------------------------------------------------------------------------


def set_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(None, list(overrides))
    message = str(err.value)
    assert "\n" not in message and "--set" in message, message
    return message


@pytest.mark.parametrize(
    ("override", "bound"),
    [
        ("simulate.max_personas=-1", "greater than or equal to 1"),
        ("simulate.max_turns=-3", "greater than or equal to 1"),
        ("simulate.max_turns=0", "greater than or equal to 1"),
        ("ingest.max_siblings=-1", "greater than or equal to 0"),
        ("ingest.read_mb=0", "greater than or equal to 1"),
        ("models.judge.concurrency=0", "greater than or equal to 1"),
        ("models.judge.timeout_s=0", "greater than 0"),
        ("personas.count=0", "greater than or equal to 1"),
        ("datasets.dev_size=-0.5", "greater than or equal to 0"),
        ("ingest.min_upvote_ratio=1.5", "less than or equal to 1"),
        ("simulate.max_failed_share=-0.1", "greater than or equal to 0"),
        ("train_supporter.selected.h=0", "greater than or equal to 1"),
        ("train_tvd.train.batch_size=0", "greater than or equal to 1"),
    ],
)
def test_counts_and_shares_out_of_range_are_refused(override: str, bound: str):
    key, _, value = override.partition("=")
    message = set_error(override)
    assert f"key '{key}'" in message and bound in message and f"(got {value}" in message


@pytest.mark.parametrize(
    "override",
    [
        "simulate.max_personas=null",  # no cap
        "ingest.max_siblings=0",  # no siblings: a choice, not a mistake
        "models.judge.max_retries=0",
        "simulate.reask=0",
        "train_tvd.train.max_steps=-1",  # the trainer's "no limit"
        "ingest.min_post_score=-5",  # Reddit scores go below zero
        "datasets.dev_size=0",
        "datasets.dev_size=2000",  # a count of dialogues, as the paper's recipe gives it
    ],
)
def test_meaningful_zeros_negatives_and_nulls_are_kept(override: str):
    load_config(None, [override])


def test_a_range_error_in_a_file_names_the_file(tmp_path: Path):
    message = config_error(tmp_path, "simulate:\n  max_turns: -3\n")
    assert "key 'simulate.max_turns'" in message and "\n" not in message


def test_every_number_of_the_recipe_has_a_range_or_is_unbounded_on_purpose():
    import types
    import typing

    from esvr.models.config import RANGES, Section

    unbounded = {"max_steps", "min_post_score", "min_comment_score", "initial_intensity"}

    def numbers(cls: type[Section]) -> set[str]:
        found = set()
        for name, field in cls.model_fields.items():
            union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
            kinds = typing.get_args(field.annotation) if union else (field.annotation,)
            for kind in kinds:
                if isinstance(kind, type) and issubclass(kind, Section):
                    found |= numbers(kind)
                elif kind in (int, float):
                    found.add(name)
        return found

    assert numbers(PipelineConfig) - set(RANGES) - unbounded == set()


@pytest.mark.parametrize("override", ["run.out_dir=", "run.out_dir=null", "run.out_dir=  "])
def test_an_empty_run_folder_is_refused(override: str):
    assert "key 'run.out_dir': must name the run folder" in set_error(override)


def test_an_empty_run_folder_makes_no_folder_anywhere(tmp_path: Path, monkeypatch, capsys):
    from esvr.flows.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--set", "run.out_dir="]) == 2
    assert "run.out_dir" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no ./None, no ./data


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("x=[1,", "not valid YAML"),
        ("a.b.c=1", "unknown key 'a'"),
        ("run.seed.x=1", "key 'run.seed' is a single value, not a section with keys"),
        ("run.name.x=1", "key 'run.name' is a single value, not a section with keys"),
        ("models.judge.spec.x=1", "key 'models.judge.spec' is a single value"),
        ("ingest.start_date=2023-02-30", "cannot be read (day is out of range for month)"),
        ("ingest.start_date=yesterday", "key 'ingest.start_date'"),
    ],
)
def test_bad_override_values_are_one_line_errors(override: str, says: str):
    message = set_error(override)
    assert says in message, message


def test_an_impossible_date_in_a_file_names_the_file(tmp_path: Path):
    assert "day is out of range for month" in config_error(tmp_path, "ingest:\n  start_date: 2023-02-30\n")


def test_a_range_applies_to_numbers_only():
    from esvr.models.config import Section

    class Odd(Section):
        count: list[int] = [0]  # a name of the table on a list: left alone
        max_turns: int | None = None

    assert Odd(count=[-1]).count == [-1] and Odd(max_turns=None).max_turns is None
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        Odd(max_turns=0)
