"""Preflight: everything a recipe still lacks, found in seconds, before any stage starts.

A paper run meets a missing API key, a stopped model server or an absent dump only when the
stage that needs it starts, hours in. `preflight(config)` looks at what the stages that will run
(`PipelineConfig.selected`) are going to read, all at once: dump files, chat models (API key
variables; every OpenAI-compatible server is asked ``GET /models``, in parallel, with a short
timeout), local checkpoints and adapters, the corpora the evaluation and the ESConv analysis
parse, the run folder, the task runner's extra and scheduler, and the run-folder files a stage
reads when the stage that writes them is not part of this run.

It returns `Problem`s: an *error* stops the run; a *warning* is a slow or fragile path that may
be intended (a hub checkpoint that will be downloaded on first use). `format_report` prints one
line per problem, naming the config key; `exit_code` and `ensure_ready` turn them into an exit
status or a `PreflightError` (a `ConfigError`, which the CLI prints without a traceback).

Nothing here loads a model or calls a paid API: OpenAI itself is only checked for its key.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from esvr.flows.config import ConfigError, ModelConfig, PipelineConfig, flatten
from esvr.flows.stages import PIPELINE
from esvr.models.redact import redact_urls

Severity = Literal["error", "warning"]

#: seconds a server or scheduler gets to answer; every probe runs at the same time
PROBE_TIMEOUT_S = 3.0

# --------------------------------------------------------------------------------------------
# What each stage reads from the recipe
# --------------------------------------------------------------------------------------------

#: The recipe keys each stage reads (the stage table's `recipe_keys`). A model key is checked
#: only when its setting is in use: ``label.emotion`` when the backend is emollama,
#: ``simulate.tvd``/``simulate.rg`` when set and this run does not train its own, ``label.values``
#: by backend. `simulator_fidelity` is `esvr simulator-fidelity`, not a stage of `esvr run`.
STAGE_NEEDS: dict[str, tuple[str, ...]] = {stage.name: stage.recipe_keys for stage in PIPELINE} | {
    "simulator_fidelity": (
        "evaluate.fidelity.esconv",
        "evaluate.fidelity.simulators",
        "evaluate.fidelity.finetuned",
        "models.judge",
        "label.values",
        "label.emotion",
    ),
}

#: Files a stage reads from the run folder when the stage that writes them is not in this run.
RUN_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {stage.name: stage.run_files for stage in PIPELINE}

_ROLES = ("supporter", "seeker", "persona_writer", "judge")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class Problem:
    """One thing the recipe lacks: the config key, what is wrong, what to do about it."""

    key: str
    what: str
    fix: str = ""
    severity: Severity = "error"

    def line(self) -> str:
        return f"{self.key}: {self.what}" + (f" -> {self.fix}" if self.fix else "")


class PreflightError(ConfigError):
    """The recipe lacks something a stage of this run needs; the message is the report."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def run_stages(config: PipelineConfig) -> list[str]:
    """The stages `esvr run` executes for this recipe, in pipeline order."""
    from esvr.flows.config import OPTIONAL_STAGES, STAGES

    return [s for s in OPTIONAL_STAGES + STAGES if config.selected(s)]


def preflight(
    config: PipelineConfig, stages: Sequence[str] | None = None, *, timeout_s: float = PROBE_TIMEOUT_S
) -> list[Problem]:
    """Everything the `stages` (default: those `esvr run` selects) lack; errors first.

    Inputs that a stage outside `stages` would write are expected in the run folder.
    """
    stages = run_stages(config) if stages is None else list(stages)
    plan = _Plan(config, set(stages), timeout_s)
    plan.run_folder()
    plan.task_runner()
    for stage in stages:
        if stage not in STAGE_NEEDS:
            plan.problem("run.stages", f"unknown stage {stage!r}", f"known: {', '.join(STAGE_NEEDS)}")
            continue
        for key in STAGE_NEEDS[stage]:
            plan.need(key)
        plan.run_inputs(stage)
    # Variant branches (paper App. G) run some stages again with their own keys on top.
    for name in config.variants:
        vconfig = config.variant(name)  # validated when the recipe was loaded
        touched = list(flatten(config.variants[name]))
        branch = _Plan(vconfig, set(stages), timeout_s, parent=plan, label=f"variants.{name}", touched=touched)
        for stage in vconfig.run.stages:
            if stage in stages:
                for key in STAGE_NEEDS[stage]:
                    branch.need(key)
    return plan.run()


def format_report(problems: Sequence[Problem], stages: Sequence[str] | None = None, elapsed_s: float | None = None) -> str:
    """One line per problem, errors first, then a count."""
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity == "warning"]
    lines = [f"{p.severity:<8} {p.line()}" for p in errors + warnings]
    summary = f"{len(errors)} error(s), {len(warnings)} warning(s)" if problems else "nothing missing"
    if stages is not None:
        summary += f" for stages {', '.join(stages) or 'none'}"
    if elapsed_s is not None:
        summary += f" (checked in {elapsed_s:.1f} s)"
    return "\n".join([*lines, summary])


def exit_code(problems: Sequence[Problem]) -> int:
    """0 when nothing stops the run (warnings allowed), 1 when an error does."""
    return 1 if any(p.severity == "error" for p in problems) else 0


def ensure_ready(config: PipelineConfig, stages: Sequence[str] | None = None) -> list[Problem]:
    """`preflight`, raising `PreflightError` with the report when an error stops the run;
    returns the warnings for the caller to print."""
    start = time.perf_counter()
    problems = preflight(config, stages)
    if exit_code(problems):
        raise PreflightError(format_report(problems, stages, time.perf_counter() - start))
    return problems


# --------------------------------------------------------------------------------------------
# The plan: what to check, collected from the table; then every check at once
# --------------------------------------------------------------------------------------------


@dataclass
class _Server:
    """An OpenAI-compatible server and the models the recipe expects from it, by config key."""

    url: str
    api_key_env: str
    models: dict[str, list[str]] = field(default_factory=dict)


class _Plan:
    def __init__(
        self,
        config: PipelineConfig,
        stages: set[str],
        timeout_s: float,
        parent: _Plan | None = None,
        label: str = "",
        touched: Sequence[str] = (),
    ):
        self.config = config
        self.stages = stages
        self.timeout_s = timeout_s
        self.run_dir = config.run.out_dir.resolve()
        # a variant branch shares its parent's checks; keys its overrides change carry its label
        self.root: _Plan = parent.root if parent else self
        self.label = label
        self.touched = list(touched)
        if parent is None:
            self.checks: list[Callable[[], list[Problem]]] = []
            self.seen: set[tuple[str, str]] = set()
            self.servers: dict[str, _Server] = {}

    # -- bookkeeping --------------------------------------------------------------------------
    def key(self, key: str) -> str:
        if self.label and any(t == key or t.startswith(key + ".") or key.startswith(t + ".") for t in self.touched):
            return f"{self.label}.{key}"
        return key

    def first(self, key: str, value: Any) -> bool:
        """True the first time `key` is checked with this value (stages share their models)."""
        mark = (key, repr(value))
        if mark in self.root.seen:
            return False
        self.root.seen.add(mark)
        return True

    def problem(self, key: str, what: str, fix: str = "", severity: Severity = "error") -> None:
        found = Problem(self.key(key), what, fix, severity)
        self.later(lambda: [found])  # in line with the deferred checks: the report follows the table

    def later(self, check: Callable[[], list[Problem]]) -> None:
        self.root.checks.append(check)

    def run(self) -> list[Problem]:
        checks = list(self.checks) + [lambda s=s: self._probe(s) for s in self.servers.values()]
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(checks)))) as pool:
            results = list(pool.map(lambda c: c(), checks))
        problems = [p for r in results for p in r]
        return [p for p in problems if p.severity == "error"] + [p for p in problems if p.severity == "warning"]

    # -- the table's keys ---------------------------------------------------------------------
    def need(self, key: str) -> None:
        c = self.config
        runs_tvd, runs_rg = "train_tvd" in self.stages, "train_rg" in self.stages
        match key:
            case "models.supporter" | "models.seeker" | "models.persona_writer" | "models.judge":
                self.model(key, getattr(c.models, key.split(".")[1]))
            case "models.base":
                self.model(key, _base_model(c))
            case "ingest.dumps":
                for i, dump in enumerate(c.ingest.dumps):
                    self.file(f"ingest.dumps[{i}]", Path(dump), _check_dump)
            case "ingest.dumps_dir":
                self.dumps_dir()
            case "label.values":
                self.value_detector("label.values", c.label.values)
            case "label.emotion":
                self.emotion()
            case "analyze_esconv.esconv":
                if c.analyze_esconv.esconv:
                    self.esconv("analyze_esconv.esconv", c.analyze_esconv.esconv, analysis=True)
                else:
                    self.problem(key, "the analyze_esconv stage runs but names no ESConv", "set it to ESConv.json or a hub id")
            case "train_tvd.eval.baselines":
                for i, name in enumerate(c.train_tvd.eval.baselines):
                    self.role_or_spec(f"{key}[{i}]", name)
            case "train_rg.judge":
                self.role_or_spec(key, c.train_rg.judge)
            case "simulate.tvd" | "simulate.rg":
                trained_here = runs_tvd if key == "simulate.tvd" else runs_rg
                value = c.simulate.tvd if key == "simulate.tvd" else c.simulate.rg
                if value is not None and not trained_here:
                    self.model(key, value)
            case "simulate.emotion":
                if c.simulate.emotion:
                    self.emotion()
            case "train_supporter.dpo_simulations":
                if c.train_supporter.dpo_simulations == "prompted":
                    self.model("models.supporter", c.models.supporter)
            case "train_supporter.reward":
                if c.train_supporter.reward == "emotion":
                    self.model("models.judge", c.models.judge)
                elif c.train_supporter.value_detector is not None:
                    self.value_detector("train_supporter.value_detector", c.train_supporter.value_detector)
                else:
                    self.value_detector("label.values", c.label.values)
            case "evaluate.supporters":
                for i, row in enumerate(c.evaluate.supporters):
                    self.evaluate_row(i, row)
            case "evaluate.simulate_overrides":
                self.evaluate_simulation(runs_tvd, runs_rg)
            case "evaluate.personas":
                if c.evaluate.personas is not None and "personas" not in self.stages:
                    self.file(key, Path(c.evaluate.personas), lambda p: _check_personas(p, c.evaluate.split))
            case "evaluate.human_ratings":
                if c.evaluate.human_ratings is not None:
                    self.file(key, Path(c.evaluate.human_ratings), _check_readable)
            case "evaluate.fidelity.esconv":
                if c.evaluate.fidelity.esconv is None:
                    self.problem(key, "simulator fidelity needs ESConv", "set it to ESConv.json or FailedESConv.json")
                else:
                    self.esconv(key, str(c.evaluate.fidelity.esconv), analysis=False)
            case "evaluate.fidelity.finetuned":
                for i, sim in enumerate(c.evaluate.fidelity.finetuned):
                    self.model(f"{key}[{i}]", sim)
            case "personas.emotion_model" | "personas.demographics_model":
                step_model = getattr(c.personas, key.split(".")[1])
                if step_model is not None:
                    self.model(key, step_model)
            case "evaluate.fidelity.simulators":
                for i, sim in enumerate(c.evaluate.fidelity.simulators):
                    self.model(f"{key}[{i}]", sim)
                if not c.evaluate.fidelity.simulators:
                    self.model("models.seeker", c.models.seeker)
            case _:
                raise KeyError(f"preflight: no check for {key!r}")  # a table entry without a case

    def role_or_spec(self, key: str, name: str) -> None:
        """'base' = models.base, a role name = that model, else a spec (flows/train_tvd.py: model_for)."""
        if name == "base":
            self.model("models.base", _base_model(self.config))
        elif name in _ROLES:
            self.model(f"models.{name}", getattr(self.config.models, name))
        else:
            self.model(key, ModelConfig(spec=name))

    # -- chat models ----------------------------------------------------------------------------
    def model(self, key: str, mc: ModelConfig) -> None:
        if not self.first(key, mc.model_dump()):
            return
        spec, label = mc.spec, self.key(key)
        if spec == "default":
            self.later(lambda: _check_default_model(label))
        elif spec.startswith("openai:"):
            name = spec.partition(":")[2]
            if mc.base_url is None:
                if not os.environ.get(mc.api_key_env):
                    self.problem(
                        key,
                        f"{mc.api_key_env} is not set (needed for {spec} on the OpenAI API)",
                        f"export {mc.api_key_env}=<your key>, or set {label}.base_url to an OpenAI-compatible server",
                    )
            else:
                url = mc.base_url.rstrip("/")
                server = self.root.servers.setdefault(url, _Server(url, mc.api_key_env))
                server.models.setdefault(name, []).append(label)
        else:  # hf:<base>[+<adapter>]
            base, _, adapter = spec[3:].partition("+")
            self.checkpoint(key, base, "checkpoint")
            if adapter:
                self.checkpoint(key, adapter, "adapter")

    def checkpoint(self, key: str, name: str, what: str) -> None:
        label = self.key(key)
        if name == "default":
            self.later(lambda: _check_default_model(label))
        else:
            self.later(lambda: _check_checkpoint(label, name, what))

    def value_detector(self, key: str, cfg: Any) -> None:
        if not self.first(key, cfg.model_dump()):
            return
        if cfg.backend == "llm":
            self.model(f"{key}.model", cfg.model)
        elif cfg.backend == "hf":
            if not cfg.checkpoints:
                self.problem(
                    f"{key}.checkpoints",
                    "the hf value detector needs at least one checkpoint",
                    "list a path or hub id, e.g. tum-nlp/Deberta_Human_Value_Detector",
                )
            for i, ckpt in enumerate(cfg.checkpoints):
                self.checkpoint(f"{key}.checkpoints[{i}]", ckpt, "checkpoint")
        else:  # embedding
            if cfg.head is not None:
                self.file(f"{key}.head", Path(cfg.head), _check_readable)
            if cfg.encoder:
                self.checkpoint(f"{key}.encoder", cfg.encoder, "encoder")
            else:
                self.later(lambda: _check_bundled_encoder(self.key(f"{key}.encoder")))

    def emotion(self) -> None:
        cfg = self.config.label.emotion
        if cfg.backend == "emollama":
            self.model("label.emotion.model", cfg.model)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate_row(self, i: int, row: Any) -> None:
        c = self.config
        key = f"evaluate.supporters[{i}]"
        if row.component:
            comp = row.component
            if comp.startswith("pipeline:"):
                produced = c.pipeline_artifacts()
                name = comp.removeprefix("pipeline:")
                if name not in produced:
                    self.problem(
                        f"{key}.component",
                        f"row {row.name!r}: {comp} is nothing the pipeline trains",
                        f"use one of {', '.join('pipeline:' + n for n in produced)}, or mlflow:<run_id>",
                    )
                elif produced[name] not in self.stages:
                    self.problem(
                        f"{key}.component",
                        f"row {row.name!r}: {comp} comes from the {produced[name]} stage, which this run leaves out",
                        f"add {produced[name]} to run.stages, or give the row mlflow:<run_id>",
                    )
            elif comp.startswith("mlflow:"):
                self.later(lambda: _check_mlflow_ref(self.key(f"{key}.component"), comp, c))
            elif comp == "default" or comp.startswith(("hf:", "openai:")):
                self.model(f"{key}.component", ModelConfig(spec=comp))
            else:
                self.adapter_folder(f"{key}.component", comp)
        elif row.finetune is not None:
            self.model("models.base", _base_model(c))
            self.file(f"{key}.finetune_data", Path(row.finetune_data), lambda p: _check_corpus(row.finetune, p))
        elif row.model is not None:
            self.model(f"{key}.model", row.model)
        else:
            self.model("models.supporter", c.models.supporter)
        for part in ("tvd", "rg"):
            if getattr(row, part) is not None:
                self.model(f"{key}.{part}", getattr(row, part))

    def adapter_folder(self, key: str, ref: str) -> None:
        """A trained component's folder: its component.json names the base, which must exist too.
        (Read here rather than by `component_spec`, which would convert the default model.)"""
        from esvr.tasks.common.roles import COMPONENT_FILE

        folder = Path(ref)
        fix = "give an adapter folder with component.json, mlflow:<run_id> or an hf: spec"
        if not (folder / COMPONENT_FILE).is_file():
            what = f"{ref} is not a trained component (no {COMPONENT_FILE} in it)" if folder.is_dir() else f"{ref} does not exist"
            self.problem(key, what, fix)
            return
        try:
            base = str(json.loads((folder / COMPONENT_FILE).read_text())["base"])
        except (OSError, ValueError, KeyError) as exc:
            self.problem(key, f"{folder / COMPONENT_FILE} names no base checkpoint ({exc})", fix)
            return
        self.checkpoint(key, base.removeprefix("hf:"), "base checkpoint")

    def evaluate_simulation(self, runs_tvd: bool, runs_rg: bool) -> None:
        """The rows' default TVD/RG and valence scorer: stage 6's settings plus
        evaluate.simulate_overrides (tasks/evaluation/evaluate.py: evaluation_simulate_config)."""
        from esvr.tasks.evaluation.evaluate import evaluation_simulate_config

        c = self.config
        try:
            sim = evaluation_simulate_config(c.simulate, c.evaluate)
        except ValueError as exc:
            self.problem("evaluate.simulate_overrides", str(exc).removeprefix("evaluate.simulate_overrides: "))
            return
        overrides = c.evaluate.simulate_overrides
        for part, trained_here in (("tvd", runs_tvd), ("rg", runs_rg)):
            value = getattr(sim, part)
            if value is not None and not trained_here:
                self.model(f"evaluate.simulate_overrides.{part}" if part in overrides else f"simulate.{part}", value)
        if sim.emotion:
            self.emotion()

    # -- files and folders ----------------------------------------------------------------------
    def file(self, key: str, path: Path, check: Callable[[Path], list[tuple[str, str, Severity]]]) -> None:
        if not self.first(key, str(path)):
            return
        label = self.key(key)
        self.later(lambda: [Problem(label, what, fix, sev) for what, fix, sev in _guarded(check, path)])

    def esconv(self, key: str, source: str, analysis: bool) -> None:
        if not self.first(key, source):
            return
        label = self.key(key)
        cfg = self.config.analyze_esconv if analysis else None
        self.later(lambda: [Problem(label, w, f, s) for w, f, s in _guarded(lambda _: _check_esconv(source, cfg), Path(source))])

    def dumps_dir(self) -> None:
        folder = self.config.ingest.dumps_dir
        if folder is None or not self.first("ingest.dumps_dir", str(folder)):
            return
        if not Path(folder).exists():
            self.problem(
                "ingest.dumps_dir",
                f"folder {folder} does not exist (the scheduled ingest-new-dumps deployment "
                "watches it; esvr run reads only ingest.dumps)",
                f"mkdir -p {folder}",
                "warning",
            )
        elif not Path(folder).is_dir():
            self.problem("ingest.dumps_dir", f"{folder} is not a folder", "point it at the folder new .zst dumps arrive in")

    def run_folder(self) -> None:
        out = self.config.run.out_dir
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.run_dir, prefix=".preflight-"):
                pass
        except OSError as exc:
            self.problem(
                "run.out_dir",
                f"cannot write to {out}: {exc.strerror or exc}",
                "choose a writable folder (--set run.out_dir=PATH)",
            )

    def run_inputs(self, stage: str) -> None:
        for writer, rel in RUN_INPUTS.get(stage, ()):
            if writer in self.stages:
                continue
            if stage == "evaluate" and self.config.evaluate.personas is not None:
                continue  # evaluate.personas names the file instead
            path = self.run_dir / rel
            if not path.exists() and self.first("run.stages", rel):
                self.problem(
                    "run.stages",
                    f"{stage} reads {path}, which the {writer} stage writes, and it is not there",
                    f"add {writer} to run.stages, or run it first into {self.config.run.out_dir}",
                )

    def task_runner(self) -> None:
        orch = self.config.orchestration
        extras = {"dask": ("prefect_dask", "distributed"), "ray": ("prefect_ray", "ray")}
        if orch.task_runner in extras:
            missing = [m for m in extras[orch.task_runner] if importlib.util.find_spec(m) is None]
            if missing:
                self.problem(
                    "orchestration.task_runner",
                    f"{orch.task_runner} needs {', '.join(missing)}, which is not installed",
                    f"pip install -e '.[{orch.task_runner}]'",
                )
        if not orch.address:
            return
        if orch.task_runner == "threads":
            self.problem(
                "orchestration.address",
                f"{orch.address} is set but task_runner is threads, which does not use it",
                "set orchestration.task_runner to dask or ray, or drop the address",
                "warning",
            )
            return
        if orch.address in ("auto", "local"):  # Ray finds its own cluster
            return
        address = orch.address
        self.later(lambda: _check_scheduler(address, orch.task_runner, self.timeout_s))

    # -- servers --------------------------------------------------------------------------------
    def _probe(self, server: _Server) -> list[Problem]:
        import httpx

        def each(what: str, fix: str) -> list[Problem]:
            return [Problem(", ".join(keys), redact_urls(what), fix) for keys in server.models.values()]

        headers = {}
        if key := os.environ.get(server.api_key_env):
            headers["Authorization"] = f"Bearer {key}"
        start = f"start it (e.g. vllm serve <model> --port {urlsplit(server.url).port or 80}) or correct base_url"
        try:
            reply = httpx.get(f"{server.url}/models", headers=headers, timeout=self.timeout_s)
        except httpx.TimeoutException:
            return each(f"server at {server.url} did not answer GET /models within {self.timeout_s:g} s", start)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return each(f"server at {server.url} does not answer ({_reason(exc)})", start)
        if reply.status_code in (401, 403):
            return each(
                f"server at {server.url} refuses the key in {server.api_key_env} (HTTP {reply.status_code})",
                f"export {server.api_key_env} with the key the server expects",
            )
        if reply.status_code != 200:
            return each(
                f"server at {server.url} answers GET /models with HTTP {reply.status_code}",
                "base_url must end where /models and /chat/completions are (usually .../v1)",
            )
        try:
            served = [str(m["id"]) for m in reply.json()["data"]]
        except (ValueError, KeyError, TypeError):
            return each(
                f"server at {server.url} answers GET /models with something that is not a model list",
                "base_url must point at an OpenAI-compatible API",
            )
        # Ollama lists 'llama3:latest' and answers to 'llama3'
        return [
            Problem(
                ", ".join(keys),
                f"server at {server.url} answers but does not serve {model}; it serves: {', '.join(served) or 'nothing'}",
                "correct the model name in the spec, or serve that model there",
            )
            for model, keys in server.models.items()
            if model not in served and f"{model}:latest" not in served
        ]


# --------------------------------------------------------------------------------------------
# The checks themselves: plain functions of a path or a name
# --------------------------------------------------------------------------------------------

Found = list[tuple[str, str, Severity]]


def _guarded(check: Callable[[Path], Found], path: Path) -> Found:
    """A loader's error becomes a problem line, never a traceback."""
    try:
        return check(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        text = str(exc)
        return [(text if str(path) in text else f"{path}: {text}", "", "error")]


def _exists(path: Path, what: str = "file") -> Found:
    if not path.exists():
        return [(f"{what} {path} does not exist", "", "error")]
    if not path.is_file():
        return [(f"{path} is not a file", "", "error")]
    return []


def _check_readable(path: Path) -> Found:
    if found := _exists(path):
        return found
    with open(path, "rb") as f:
        f.read(1)
    return []


def _check_dump(path: Path) -> Found:
    if not path.exists():
        return [
            (
                f"dump {path} does not exist",
                "download it (the recipe's comment says from where), or remove it "
                "from ingest.dumps (none: the generated sample dump)",
                "error",
            )
        ]
    if found := _exists(path):
        return found
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return [(f"dump {path} is empty", "download it again", "error")]
    skippable = len(head) == 4 and head[1:] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50
    if path.suffix == ".zst" and head != _ZSTD_MAGIC and not skippable:
        return [(f"dump {path} is not a zstd file (it starts with {head!r})", "download it again", "error")]
    return []


def _check_personas(path: Path, split: str) -> Found:
    from esvr.tasks.simulation.personas import read_personas

    if found := _exists(path):
        return found
    if not read_personas(path, [split]):
        return [(f"{path} holds no persona in split {split!r}", "evaluate.split must name a split the file has", "error")]
    return []


def _check_corpus(kind: str, path: Path) -> Found:
    """Parsed by the loader the fine-tuning uses; at least one supporter turn after a seeker's."""
    from esvr.tasks.evaluation.baselines import load_corpus

    if not path.exists():  # checked first: the ESConv loader would take a missing 'a/b' for a hub id
        return [(f"{kind} corpus {path} does not exist", f"download it from its publishers to {path}", "error")]
    dialogues = load_corpus(kind, path)  # type: ignore[arg-type]
    turns = sum(
        1 for d in dialogues for i, u in enumerate(d) if u["role"] == "supporter" and any(h["role"] == "seeker" for h in d[:i])
    )
    if not turns:
        return [
            (
                f"{path} gives no supporter turn that answers a seeker ({len(dialogues)} dialogues)",
                f"is it the {kind} corpus?",
                "error",
            )
        ]
    return []


def _check_esconv(source: str, cfg: Any | None) -> Found:
    """ESConv through the loader the stage uses; for the analysis (cfg given) both intensity groups."""
    from esvr.tasks.common.esconv import LoadReport, is_hub_id, load_esconv
    from esvr.tasks.labeling.analyze_esconv import ESCONV_WITH_SURVEY, HIGH, LOW, split_groups

    path = Path(source)
    if not path.exists():
        if is_hub_id(source):
            if _hub_cached(source, "dataset"):
                return []
            return [
                (
                    f"{source} is not a local file; as a hub dataset it is not in the local HF cache: it will be "
                    "downloaded on first use",
                    "or download ESConv.json and give its path"
                    + (f" (the analysis needs the survey intensities {ESCONV_WITH_SURVEY} has)" if cfg is not None else ""),
                    _hub_severity(),
                )
            ]
        return [(f"ESConv file {source} does not exist", f"download {ESCONV_WITH_SURVEY} and give its path", "error")]
    report = LoadReport()
    dialogues = load_esconv(path, report)
    if not dialogues:
        return [(f"{source} holds no dialogue", "", "error")]
    if cfg is None:  # simulator fidelity: seeker turns, and final intensities for the ES-Intensity check
        if not any(d.final_intensity is not None and d.turns() for d in dialogues):
            return [
                (
                    f"{source}: no dialogue has a final_emotion_intensity rating: the ES-Intensity check (Table 11) "
                    "will be skipped",
                    f"for it, use {ESCONV_WITH_SURVEY}, whose survey_score holds them",
                    "warning",
                )
            ]
        return []
    groups, skipped = split_groups(dialogues, cfg)
    counts = {g: len(groups[g]) for g in (HIGH, LOW)}
    need = (
        f"initial intensity {cfg.initial_intensity}, final {cfg.high_final} (high) or {cfg.low_final} (low); "
        f"skipped: {dict(skipped)}"
    )
    if not counts[HIGH] and not counts[LOW]:
        missing = {k: v for k, v in report.missing_survey.items() if k.endswith("emotion_intensity")}
        return [
            (
                f"{source}: no dialogue falls in either group ({need}; missing survey fields: {missing})",
                f"the analysis needs the seekers' survey intensities (survey_score.seeker): {ESCONV_WITH_SURVEY} has them",
                "error",
            )
        ]
    empty = [g for g in (HIGH, LOW) if not counts[g]]
    if empty:
        return [
            (
                f"{source}: the {empty[0]} group is empty ({need}): the group comparison will be undefined",
                "use the full ESConv.json",
                "warning",
            )
        ]
    return []


def _check_default_model(key: str) -> list[Problem]:
    from esvr.models.default_model import DEFAULT_MODEL_NAME, cache_root, gguf_file

    if (cache_root() / "models" / DEFAULT_MODEL_NAME / "config.json").is_file():
        return []
    try:
        gguf_file()
    except RuntimeError as exc:
        return [Problem(key, f"the default model is not available: {exc}", "run `make setup`")]
    return []


def _check_bundled_encoder(key: str) -> list[Problem]:
    from esvr.models.value_detector import minilm_path

    try:
        minilm_path()
    except RuntimeError as exc:
        return [Problem(key, str(exc), "run `make setup`")]
    return []


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _check_checkpoint(key: str, name: str, what: str) -> list[Problem]:
    """A local folder must exist; a hub id should be in the local HF cache (else: downloaded later)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).expanduser().exists():
        return []
    if _looks_local(name):
        return [Problem(key, f"{what} {name} does not exist", "correct the path, or train / download it first")]
    try:
        validate_repo_id(name)
    except HFValidationError:
        return [Problem(key, f"{what} {name!r} is neither an existing path nor a hub id", "correct the name")]
    if _hub_cached(name, "model"):
        return []
    return [
        Problem(
            key,
            f"{what} {name} is not a local folder and not in the local HF cache: it will be downloaded from the hub on first use",
            f"pre-fetch it: hf download {name} (gated models need hf auth login)",
            _hub_severity(),
        )
    ]


def _hub_severity() -> Severity:
    import huggingface_hub.constants as hub

    return "error" if hub.HF_HUB_OFFLINE else "warning"


def _hub_cached(repo_id: str, repo_type: Literal["model", "dataset"]) -> bool:
    """In the hub cache (any revision), or for a dataset in the datasets library's own cache."""
    import huggingface_hub.constants as hub

    snapshots = Path(hub.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    if repo_type == "dataset":
        datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(hub.HF_HOME) / "datasets")
        return (datasets_cache / repo_id.replace("/", "___")).is_dir()
    return False


def _check_mlflow_ref(key: str, ref: str, config: PipelineConfig) -> list[Problem]:
    """Resolution is the stage's job; here only a tracking store that is not there at all."""
    from esvr.flows.tracking import USER_TRACKING_URI
    from esvr.models.default_model import cache_root

    run_id, _, artifact = ref.removeprefix("mlflow:").strip("/").partition("/")
    if (cache_root() / "components" / run_id / (artifact or "adapter") / "component.json").is_file():
        return []  # downloaded by an earlier run
    uri = USER_TRACKING_URI
    if uri is None:
        store = (Path(getattr(config.run, "tracking_dir", None) or config.run.out_dir) / "mlflow.db").resolve()
    elif uri.startswith("sqlite:///"):
        store = Path(uri.removeprefix("sqlite:///"))  # sqlite:////abs/path keeps its leading slash
    elif uri.startswith("file:"):
        store = Path(urlsplit(uri).path)
    elif "://" in uri:
        return []  # a tracking server: the stage asks it
    else:
        store = Path(uri)
    if store.exists():
        return []
    return [
        Problem(
            key,
            f"{ref}: the tracking store {store} does not exist, so the run cannot be found there",
            "set MLFLOW_TRACKING_URI to the store that holds the run, or run.out_dir to its run folder",
            "warning",
        )
    ]


def _check_scheduler(address: str, runner: str, timeout_s: float) -> list[Problem]:
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    port = parts.port or (10001 if runner == "ray" else 8786)
    host = parts.hostname or "127.0.0.1"
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return []
    except OSError as exc:
        return [
            Problem(
                "orchestration.address",
                f"{runner} scheduler at {address} is not reachable ({exc.strerror or exc})",
                f"start it (e.g. {'dask scheduler' if runner == 'dask' else 'ray start --head'}) or drop the "
                "address to start a local cluster",
            )
        ]


def _reason(exc: Exception) -> str:
    """The innermost cause of a connection error, e.g. 'Connection refused'."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _base_model(config: PipelineConfig) -> ModelConfig:
    from esvr.tasks.common.roles import base_model

    return base_model(config.models.base)


def main_report(config: PipelineConfig, stages: Sequence[str] | None = None) -> tuple[str, int]:
    """The report `esvr check` prints and its exit status."""
    stages = run_stages(config) if stages is None else list(stages)
    start = time.perf_counter()
    problems = preflight(config, stages)
    return format_report(problems, stages, time.perf_counter() - start), exit_code(problems)
