"""Run recipes: typed config classes loaded from YAML, with dotted overrides.

One YAML file describes one run (``configs/demo.yaml``, ``configs/paper.yaml``); ``--set a.b=c``
overrides single keys. Every section is a pydantic model that forbids unknown keys, so a typo is an
error that names the key and the file instead of a silently ignored setting.

Stage sections are defined next to the code that uses them (``tasks/<stage>.py``) and composed
here into `PipelineConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from esvr.flows.errors import ConfigError  # noqa: F401  (re-exported: raised by load_config)
from esvr.models.chat import ModelSpec


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    """A chat model. YAML may give just the spec string: ``supporter: openai:gpt-4o-mini``."""

    spec: str = "default"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5
    batch_size: int = 8
    device: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"spec": value} if isinstance(value, str) else value

    @field_validator("spec")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        ModelSpec(spec=value).backend  # raises on an unknown backend
        return value

    def to_spec(self) -> ModelSpec:
        return ModelSpec(**self.model_dump())


class RunConfig(Section):
    name: str = "esvr"
    #: every artifact of the run goes under this folder (stage outputs, Prefect results, MLflow, caches)
    out_dir: Path = Path("data")
    seed: int = 0
    #: MLflow experiment that the run's flows log to
    experiment: str = "esvr"
    #: which stages `esvr run` executes, in pipeline order; empty means all
    stages: list[str] = []


class ModelsConfig(Section):
    """The chat models, by role. Each is a spec string or a full ModelConfig."""

    supporter: ModelConfig = ModelConfig()
    seeker: ModelConfig = ModelConfig()
    persona_writer: ModelConfig = ModelConfig()
    judge: ModelConfig = ModelConfig()
    #: base checkpoint that LoRA training starts from ('default' = the bundled SmolLM2-135M-Instruct)
    base: str = "default"
    #: the response cache makes re-runs free and a crashed run resumable; off only to measure
    cache: bool = True


class OrchestrationConfig(Section):
    #: where map-style tasks (labeling, simulation) run: threads here, a Dask or Ray cluster at scale
    task_runner: Literal["threads", "dask", "ray"] = "threads"
    max_workers: int = 2
    #: address of an existing Dask scheduler or Ray cluster; empty starts a local one
    address: str | None = None


class SmokeConfig(Section):
    """The foundation's minimal stage: one reply and one scored choice from the configured model."""

    prompt: str = "In one sentence, what helps a friend who feels overwhelmed?"
    choices: list[str] = ["Yes", "No"]
    question: str = "Is listening without judgment a way to support someone? Answer Yes or No."
    max_tokens: int = 40


# Stage sections live beside the code that uses them; imported after Section, which they subclass.
from esvr.tasks.ingest import IngestConfig  # noqa: E402
from esvr.tasks.label import LabelConfig  # noqa: E402
from esvr.tasks.analyze_esconv import AnalyzeESConvConfig  # noqa: E402
from esvr.tasks.datasets import DatasetsConfig  # noqa: E402
from esvr.tasks.tvd import TrainTVDConfig  # noqa: E402
from esvr.tasks.rg import TrainRGConfig  # noqa: E402
from esvr.tasks.personas import PersonasConfig  # noqa: E402
from esvr.tasks.simulate import SimulateConfig  # noqa: E402
from esvr.tasks.train_supporter import TrainSupporterConfig  # noqa: E402
from esvr.tasks.evaluate import EvaluateConfig  # noqa: E402


class PipelineConfig(Section):
    """A whole run; sections in pipeline order (flows/pipeline.py)."""

    run: RunConfig = RunConfig()
    models: ModelsConfig = ModelsConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    smoke: SmokeConfig = SmokeConfig()
    ingest: IngestConfig = IngestConfig()
    label: LabelConfig = LabelConfig()
    analyze_esconv: AnalyzeESConvConfig = AnalyzeESConvConfig()
    datasets: DatasetsConfig = DatasetsConfig()
    train_tvd: TrainTVDConfig = TrainTVDConfig()
    train_rg: TrainRGConfig = TrainRGConfig()
    personas: PersonasConfig = PersonasConfig()
    simulate: SimulateConfig = SimulateConfig()
    train_supporter: TrainSupporterConfig = TrainSupporterConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if p not in ("function-after[_known_backend(), str]",))
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            lines.append(f"{source}: key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a','b','c'], value parsed as YAML, so 3, true, [1,2] and null work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. simulate.max_turns=6")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else {"spec": child} if isinstance(child, str) else child
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a recipe, apply ``--set`` overrides, validate. Errors name the key and the file."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} (with --set {' '.join(overrides)})"
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def flatten(config: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``: the form MLflow params take."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def dump_config(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
