"""Run recipes: typed config classes loaded from YAML, with dotted overrides.

One YAML file describes one run (``configs/demo.yaml``, ``configs/paper.yaml``); ``--set a.b=c``
overrides single keys. Every section is a pydantic model that forbids unknown keys, so a typo is an
error that names the key and the file instead of a silently ignored setting.

Stage sections are defined next to the code that uses them (``esvr.tasks.<stage>``, and the
labelers' and trainers' in ``esvr.models``) and composed here into `PipelineConfig`; the base
class `Section`, the one model config `ModelConfig` and `ConfigError` come from
``esvr.models.config``, below every layer that uses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError, field_validator, model_validator

from esvr.flows.recipe import apply_overrides, read_recipe
from esvr.models.config import ConfigError, ModelConfig, Section
from esvr.tasks.components.datasets import DatasetsConfig
from esvr.tasks.components.rg import TrainRGConfig
from esvr.tasks.components.tvd import TrainTVDConfig
from esvr.tasks.evaluation.evaluate import EvaluateConfig
from esvr.tasks.labeling.analyze_esconv import AnalyzeESConvConfig
from esvr.tasks.labeling.label import LabelConfig
from esvr.tasks.reddit.ingest import IngestConfig
from esvr.tasks.simulation.personas import PersonasConfig
from esvr.tasks.simulation.simulate import SimulateConfig
from esvr.tasks.smoke import SmokeConfig
from esvr.tasks.supporter.train_supporter import TrainSupporterConfig


class RunConfig(Section):
    name: str = "esvr"
    #: every artifact of the run goes under this folder (stage outputs, Prefect results, MLflow, caches)
    out_dir: Path = Path("data")
    seed: int = 0
    #: MLflow experiment that the run's flows log to
    experiment: str = "esvr"
    #: which stages `esvr run` executes, in pipeline order; empty means all
    stages: list[str] = []
    #: folder of the embedded MLflow store (None: out_dir); a variant's run keeps its parent's
    tracking_dir: Path | None = None

    @field_validator("out_dir", mode="before")
    @classmethod
    def _names_a_folder(cls, value: Any) -> Any:
        # an empty value would put the run (and Prefect's home) in the current folder or in ./None
        if value is None or not str(value).strip():
            raise ValueError("must name the run folder, e.g. data or runs/demo")
        return value

    #: MLflow tags on every run of this recipe's flows (a scheduled re-run tags the dumps it saw)
    tags: dict[str, str] = {}


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


#: `esvr run`'s stages in pipeline order: the names of flows/stages.py's table (a test keeps them equal)
STAGES = [
    "ingest",
    "label",
    "analyze_esconv",
    "build_datasets",
    "train_tvd",
    "train_rg",
    "personas",
    "simulate",
    "train_supporter",
    "evaluate",
    "report",
]
#: stages that run only when named in run.stages
OPTIONAL_STAGES = ["smoke"]
#: the stages a variant's recipe runs inside `esvr run` (its rows are the parent's evaluation)
VARIANT_STAGES = ["train_rg", "simulate", "train_supporter"]


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
    #: supporters trained beside the main method in the same run, each a set of keys applied on top
    #: of this recipe for its reference generator, simulations and supporter (paper App. G's
    #: emotion-reinforced variant). Its artifacts go under <run>/variants/<name>/; evaluation rows
    #: take its supporters as `pipeline:<name>_sft` and `pipeline:<name>_dpo`.
    variants: dict[str, dict[str, Any]] = {}

    @field_validator("variants", mode="before")
    @classmethod
    def _no_variants(cls, value: Any) -> Any:
        return {} if value is None else value  # `variants: null` in a child recipe drops the parent's

    def selected(self, stage: str) -> bool:
        """Whether `esvr run` executes `stage` (run.stages, else every stage that has its input)."""
        if self.run.stages:
            return stage in self.run.stages
        if stage == "analyze_esconv":
            return bool(self.analyze_esconv.esconv)
        return stage in STAGES

    def pipeline_artifacts(self) -> dict[str, str]:
        """Supporters the pipeline trains, as `pipeline:<name>` rows name them -> producing stage."""
        names = {"supporter_sft": "train_supporter", "supporter_dpo": "train_supporter"}
        for variant in self.variants:
            names |= {f"{variant}_sft": "train_supporter", f"{variant}_dpo": "train_supporter"}
        return names

    def variant(self, name: str) -> PipelineConfig:
        """This recipe with the variant's keys applied, writing under <run>/variants/<name>/."""
        from esvr.flows.recipe import merge

        data = merge(self.model_dump(mode="json", exclude={"variants"}, context={"secrets": True}), self.variants[name])
        data["run"]["out_dir"] = str(self.run.out_dir / "variants" / name)
        data["run"]["tracking_dir"] = str(self.run.tracking_dir or self.run.out_dir)
        data["run"]["name"] = f"{self.run.name}-{name}"
        data["run"]["stages"] = list(VARIANT_STAGES)
        return PipelineConfig.model_validate(data)

    @model_validator(mode="after")
    def _runnable(self) -> PipelineConfig:
        unknown = [s for s in self.run.stages if s not in STAGES + OPTIONAL_STAGES]
        if unknown:
            raise ValueError(f"run.stages: unknown stage(s) {unknown}; known: {STAGES + OPTIONAL_STAGES}")
        for name in self.variants:
            if not name.isidentifier():
                raise ValueError(f"variants: {name!r} is not a plain name (letters, digits, _)")
            try:
                self.variant(name)
            except ValidationError as err:
                raise ValueError(_format_errors(err, f"variants.{name}")) from None
        if self.selected("evaluate"):
            produced = self.pipeline_artifacts()
            for row in self.evaluate.supporters:
                component = row.component or ""
                if not component.startswith("pipeline:"):
                    continue
                name = component.removeprefix("pipeline:")
                if name not in produced:
                    raise ValueError(
                        f"evaluate.supporters row {row.name!r}: component {row.component!r} names nothing the "
                        f"pipeline trains (known: {', '.join('pipeline:' + n for n in produced)})"
                    )
                if self.run.stages and not self.selected(produced[name]):
                    raise ValueError(
                        f"evaluate.supporters row {row.name!r}: {row.component!r} comes from the "
                        f"{produced[name]} stage, which run.stages leaves out"
                    )
        return self


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if p not in ("function-after[_known_backend(), str]",))
        where = f"key '{key}'" if key else "recipe"
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        elif isinstance(e.get("input"), dict) and e["type"].endswith("_type") and e["type"] != "model_type":
            # `--set a.b.c=1` where a.b is a single value: the override made it a mapping
            lines.append(f"{source}: {where} is a single value, not a section with keys ({message.lower()})")
        elif not key or isinstance(e.get("input"), (dict, list)):
            lines.append(f"{source}: {where}: {message}")
        else:
            lines.append(f"{source}: {where}: {message} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a recipe (following its ``extends`` chain), apply ``--set`` overrides, validate.

    Errors name the key and the file.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data = read_recipe(path)
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


def flatten_items(config: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """`flatten`, with lists of mappings expanded by index: ``evaluate.supporters[2].model.spec``."""
    flat: dict[str, Any] = {}
    for key, value in flatten(config).items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                flat.update({f"{key}[{i}].{k}": v for k, v in flatten(item).items()})
        else:
            flat[key] = value
    return flat


#: stands for a key one side of a `config_diff` does not have
ABSENT = "(absent)"


def config_diff(config: PipelineConfig, base: PipelineConfig) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ: ``{'simulate.max_turns': (base value, config value)}``."""
    mine, theirs = flatten_items(config), flatten_items(base)
    changed = {k: (theirs.get(k, ABSENT), v) for k, v in mine.items() if theirs.get(k, ABSENT) != v}
    return changed | {k: (v, ABSENT) for k, v in theirs.items() if k not in mine}
