"""The ``esvr`` command: a thin parser over the flows.

Every command that runs a flow takes ``--config FILE``, ``--set KEY=VALUE`` (repeatable) and
``--out DIR``; it prepares the embedded Prefect + MLflow runtime under the run folder *before*
importing Prefect, then calls the flow. The pipeline's stages each get a command from the stage
table (flows/stages.py), with the options of `STAGE_OPTIONS`. Errors in user input end with a
one-line message and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from esvr.models.config import ConfigError, InputFileError
from esvr.tasks.common.locks import LockBusy

if TYPE_CHECKING:
    from esvr.flows.config import PipelineConfig

#: an option of a command: add_argument's flags and keywords
Option = tuple[tuple[str, ...], dict[str, Any]]

DEFAULT_CONFIG = Path("configs/demo.yaml")


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the user's to fix (a bad recipe, a missing or malformed file, a damaged
    dump): `main` says them in one line with exit status 2. Imported when asked, so that
    `esvr --help` does not load the ingest."""
    from esvr.tasks.reddit.ingest import IngestError

    return (ConfigError, FileNotFoundError, InputFileError, IngestError)


class NoUserErrorTraceback(logging.Filter):
    """Keeps a flow's or task's log line for a user error but drops its traceback: the line and
    `main`'s message name what to fix, and a traceback would read as a crash of the program
    (``ESVR_TRACEBACK=1`` keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], user_errors()) and not os.environ.get("ESVR_TRACEBACK"):
            record.exc_info = record.exc_text = None
        return True


_NO_USER_ERROR_TRACEBACK = NoUserErrorTraceback()  # one instance: addFilter keeps it once per logger


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help=f"run recipe (YAML); default {DEFAULT_CONFIG} if present")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set simulate.max_turns=6 (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=None, help="run folder for every output (default: run.out_dir)")


def resolve_config(args: argparse.Namespace) -> PipelineConfig:
    from esvr.flows.config import load_config

    path = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    config = load_config(path, args.overrides)
    if args.out is not None:
        config.run.out_dir = args.out
    return config


def peek_out_dir(args: argparse.Namespace) -> Path:
    """The run folder, read from the recipe and the arguments alone (before any config class)."""
    if args.out is not None:
        return args.out
    for item in reversed(args.overrides):
        key, sep, value = item.partition("=")
        if sep and key.strip() == "run.out_dir":
            return Path(str(yaml.safe_load(value)))
    path = args.config if args.config is not None else DEFAULT_CONFIG
    from esvr.flows.recipe import read_recipe

    try:
        data = read_recipe(path)
        return Path(data.get("run", {}).get("out_dir") or "data")
    except (ConfigError, AttributeError):
        return Path("data")  # load_config reports the problem with the file properly


def prepared(args: argparse.Namespace) -> PipelineConfig:
    """Point Prefect/MLflow at the run folder, then load the config.

    Prefect reads its settings when first imported, so the run folder is peeked from the recipe
    before anything that might import Prefect is loaded.
    """
    from esvr.flows.runtime import detach_temporary_server, prepare, run_folder_lock

    config = resolve_config(args)  # a bad recipe is a one-line error before any folder is made
    prepare(peek_out_dir(args))
    if config.run.out_dir.resolve() != peek_out_dir(args).resolve():
        prepare(config.run.out_dir)
    run_lock = getattr(args, "run_lock", None)
    if run_lock is not None and hasattr(args, "held"):  # `main` holds it for the command's length
        args.held.enter_context(run_folder_lock(config.run.out_dir, shared=run_lock == "shared"))
    detach_temporary_server()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NO_USER_ERROR_TRACEBACK)
    from esvr.flows.tracking import use_tracking_uri

    use_tracking_uri(config)  # `mlflow:<run_id>` references resolve against the run's tracking store
    return config


def _print_artifacts(artifacts: dict[str, Any]) -> None:
    for name, path in artifacts.items():
        print(f"{name}: {path}")


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def checked(config: PipelineConfig, stages: list[str] | None = None) -> None:
    """Everything the stages (default: the run's) will need, found missing now rather than hours
    into the run, and before Prefect starts: a missing input or a stopped server is one line
    naming the recipe key, not a failed flow's traceback."""
    from esvr.flows.preflight import ensure_ready, format_report

    warnings = ensure_ready(config, stages)
    if warnings:
        print(format_report(warnings), file=sys.stderr)


def options_given(args: argparse.Namespace) -> bool:
    """Whether the command was given any of its stage options (--threads, --personas, ...)."""
    return any(getattr(args, dest) != default for dest, default in args.option_defaults.items())


def checked_stage(args: argparse.Namespace, config: PipelineConfig) -> None:
    """`checked` for a stage's own command; options that name other inputs than the recipe's
    leave the check to the stage's flow, which finds what is missing itself."""
    if not options_given(args):
        checked(config, [args.stage])


def cmd_run(args: argparse.Namespace) -> int:
    config = prepared(args)
    checked(config)
    from esvr.flows.pipeline import pipeline_flow

    _print_artifacts(pipeline_flow(config))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from esvr.flows.preflight import main_report

    config = resolve_config(args)
    report, status = main_report(config, args.stages or None)
    print(report)
    return status


def cmd_rehearse(args: argparse.Namespace) -> int:
    if args.config is None:
        args.config = Path("configs/rehearsal.yaml")
    config = prepared(args)
    from esvr.flows.rehearse import rehearse, summary

    print(summary(rehearse(config, str(args.config))))
    return 0


def cmd_build_value_detector(args: argparse.Namespace) -> int:
    from esvr.models.value_checkpoint import build_value_checkpoint

    print(build_value_checkpoint(args.out, **({"head": args.head} if args.head else {})))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from esvr.flows.config import config_diff, dump_config, load_config
    from esvr.flows.recipe import recipe_chain

    config = resolve_config(args)
    if not args.diff:
        print(dump_config(config), end="")
        return 0
    if args.config is None:
        raise ConfigError("config show --diff: give the recipe with --config")
    chain = recipe_chain(args.config)
    parent = load_config(chain[1]) if len(chain) > 1 else load_config(None)
    print(f"# {args.config} against {chain[1] if len(chain) > 1 else 'the defaults'}")
    for key, (before, after) in config_diff(config, parent).items():
        print(
            f"{key}: {yaml.safe_dump(after, default_flow_style=True).strip().removesuffix('...').strip()}"
            f"  # was {yaml.safe_dump(before, default_flow_style=True).strip().removesuffix('...').strip()}"
        )
    return 0


# ---- one command per pipeline stage (flows/stages.py), in pipeline order ----------------------


def _positive_int(text: str) -> int:
    """An argparse type: a bad value ends in a usage line naming it, not a traceback later."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _option(*flags: str, **kwargs: Any) -> Option:
    return flags, kwargs


def _path_option(flag: str, keyword: str, help: str) -> Option:
    """A path whose flow keyword is not the flag's name (``--personas`` -> personas_path)."""
    return _option(flag, dest=keyword, metavar=flag.removeprefix("--").upper(), type=Path, default=None, help=help)


_THREADS = _option("--threads", type=Path, default=None, help="threads.parquet (default: <run>/ingest/threads.parquet)")
_DATASETS = _option("--datasets", type=Path, default=None, help="datasets folder (default: <run>/datasets)")

#: each stage command's options beside --config/--set/--out. The flow gets them as keywords of
#: the same name (dest), but for the stages of `STAGE_COMMANDS`, whose command reads them itself.
STAGE_OPTIONS: dict[str, tuple[Option, ...]] = {
    "ingest": (
        _option(
            "--dumps",
            type=Path,
            nargs="+",
            default=None,
            metavar="PATH",
            help="RS_/RC_YYYY-MM.zst or <sub>_submissions/_comments.zst files (default: ingest.dumps)",
        ),
    ),
    "label": (_THREADS,),
    "analyze_esconv": (_option("--esconv", default=None, help="ESConv.json path, a folder holding it, or a hub dataset id"),),
    "build_datasets": (
        _THREADS,
        _option("--labels", type=Path, default=None, help="labels.parquet (default: <run>/label/labels.parquet)"),
    ),
    "train_tvd": (_DATASETS,),
    "train_rg": (_DATASETS,),
    "simulate": (
        _path_option("--personas", "personas_path", "personas.jsonl (default: <run>/personas/personas.jsonl)"),
        _option(
            "--split",
            dest="splits",
            action="append",
            choices=["train", "dev", "test"],
            default=[],
            help="persona split(s) to simulate (repeatable; default simulate.splits)",
        ),
        _option("--supporter", default=None, help="supporter model spec (default models.supporter)"),
        _option("--tvd", default=None, help="target value detector spec, e.g. hf:<base>+<adapter>; '' for none"),
        _option("--rg", default=None, help="reference generator spec; '' for none"),
        _option("--name", default="main", help="output folder under <run>/simulate/"),
    ),
    "train_supporter": (
        _path_option("--dialogues", "dialogues_path", "dialogues.jsonl (default: <run>/simulate/main/dialogues.jsonl)"),
        _path_option("--personas", "personas_path", "personas for the DPO (SFT) simulations (default: the dialogues' own)"),
        _option("--tvd", default=None, help="target value detector spec (default simulate.tvd; '' for none)"),
        _option("--rg", default=None, help="reference generator spec (default simulate.rg; '' for none)"),
    ),
    "evaluate": (
        _option(
            "--personas",
            type=Path,
            default=None,
            help="personas.jsonl (default: evaluate.personas or <run>/personas/personas.jsonl)",
        ),
        _option(
            "--supporter",
            action="append",
            default=[],
            metavar="NAME=SPEC",
            help="model of a row of evaluate.supporters: a spec, mlflow:<run_id> or an adapter folder (repeatable)",
        ),
        _option("--tvd", default=None, help="target value detector for rows that use it (default simulate.tvd)"),
        _option("--rg", default=None, help="reference generator for rows that use it (default simulate.rg)"),
        _option("--no-report", action="store_true", help="do not build the report afterwards"),
    ),
    "report": (
        _option("--runs", nargs="+", default=[], metavar="RUN_ID", help="MLflow run ids of evaluate runs"),
        _option("--tag", action="append", default=[], metavar="KEY=VALUE", help="choose evaluate runs by tag (repeatable)"),
        _option(
            "--summary", nargs="+", type=Path, default=[], metavar="FILE", help="evaluate/summary.json files instead of runs"
        ),
        _option("--title", default="ES-VR evaluation report"),
    ),
}


def cmd_stage(args: argparse.Namespace) -> int:
    """The stage's flow on the recipe, with the command's options as its keywords."""
    config = prepared(args)
    checked_stage(args, config)
    from esvr.flows.stages import STAGES_BY_NAME

    flow = STAGES_BY_NAME[args.stage].load()
    _print_artifacts(flow(config, **{dest: getattr(args, dest) for dest in args.flow_options}))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    config = prepared(args)
    if args.dumps:
        config.ingest.dumps = args.dumps
    checked(config, ["ingest"])
    from esvr.flows.ingest import ingest_flow

    _print_artifacts(ingest_flow(config))
    return 0


def _name_specs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise ConfigError(f"--supporter {item!r}: expected NAME=SPEC, e.g. 'Ours (SFT)=mlflow:<run_id>'")
        out[name.strip()] = spec.strip()
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    config = prepared(args)
    checked_stage(args, config)
    from esvr.flows.evaluate import evaluate_flow

    artifacts = evaluate_flow(
        config, personas_path=args.personas, supporters=_name_specs(args.supporter) or None, tvd=args.tvd, rg=args.rg
    )
    if not args.no_report:
        from esvr.flows.report import report_flow

        artifacts.update(report_flow(config, summaries=[artifacts["evaluate_summary"]]))
    _print_artifacts(artifacts)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    config = prepared(args)
    checked_stage(args, config)
    from esvr.flows.report import report_flow
    from esvr.tasks.evaluation.report import parse_tags

    try:
        tags = parse_tags(args.tag)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _print_artifacts(
        report_flow(config, run_ids=args.runs or None, tags=tags or None, summaries=args.summary or None, title=args.title)
    )
    return 0


#: stages whose options are more than the flow's keywords
STAGE_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ingest": cmd_ingest,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
}


def add_stage_commands(sub: argparse._SubParsersAction) -> None:
    """One subcommand per pipeline stage, listed in pipeline order."""
    from esvr.flows.stages import PIPELINE

    for stage in PIPELINE:
        func = STAGE_COMMANDS.get(stage.name, cmd_stage)
        # a stage's command runs beside another stage's, not beside `esvr run` (flows/runtime.py)
        add_command(sub, stage.command, stage.help, func, STAGE_OPTIONS.get(stage.name, ())).set_defaults(
            stage=stage.name, run_lock="shared"
        )


# ---- the tools beside the stages ------------------------------------------------------------


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    func: Callable[[argparse.Namespace], int],
    options: tuple[Option, ...] = (),
    common: bool = True,
) -> argparse.ArgumentParser:
    """A subcommand (with --config/--set/--out when `common`); `flow_options` names its options' dests."""
    p = sub.add_parser(name, help=help)
    if common:
        _common(p)
    dests = [p.add_argument(*flags, **kwargs).dest for flags, kwargs in options]
    p.set_defaults(func=func, flow_options=dests, option_defaults={dest: p.get_default(dest) for dest in dests})
    return p


def add_tool_commands(sub: argparse._SubParsersAction) -> None:
    from esvr.models.value_detector import DEFAULT_HEAD

    add_command(
        sub,
        "make-sample-dump",
        "write realistic Pushshift-format sample dumps (zstd, long window)",
        cmd_make_sample_dump,
        (
            _option("--out", type=Path, required=True, help="folder for RS_<month>.zst and RC_<month>.zst"),
            _option(
                "--months",
                nargs="+",
                default=["2021-06"],
                metavar="YYYY-MM",
                help="one pair of dumps per month; the first holds the hand-built cases",
            ),
            _option("--posts", type=int, default=150, help="random posts spread over the months"),
            _option("--seed", type=int, default=0),
        ),
        common=False,
    )
    add_command(
        sub,
        "train-value-head",
        "train the offline value detector's heads on Touché23-ValueEval",
        cmd_train_value_head,
        (
            _option("--data", type=Path, required=True, help="folder with arguments-*.tsv and labels-*.tsv"),
            _option("--out", type=Path, default=DEFAULT_HEAD, help=f"head file to write (default {DEFAULT_HEAD})"),
            _option("--max-seq-length", type=int, default=128),
            _option("--limit", type=int, default=None, help="use only the first N arguments of each split"),
            _option(
                "--conversational",
                type=Path,
                default=None,
                help="ESConv file (JSON or JSON Lines): no value may mark more than --max-conversational-rate of its seeker turns",
            ),
            _option("--max-conversational-rate", type=float, default=1 / 3),
            _option("--layers", type=int, default=None, help="read the encoder's first N layers only (default: all)"),
            _option(
                "--end-to-end",
                type=int,
                default=0,
                metavar="EPOCHS",
                help="train the encoder's layers with the head for up to EPOCHS epochs (the best on validation kept) "
                "instead of logistic heads on frozen embeddings",
            ),
        ),
        common=False,
    )
    add_command(
        sub,
        "chat",
        "talk to a trained supporter in the terminal (TVD and RG in the loop, crisis guard on)",
        cmd_chat,
        (
            _option(
                "--supporter",
                default="latest",
                metavar="REF",
                help="an MLflow run id, mlflow:<run_id>, an adapter folder, a model spec, or 'latest' (default: the "
                "newest train_supporter run of run.experiment)",
            ),
            _option(
                "--tvd",
                default=None,
                help="target value detector spec (default: the one the supporter was trained with, else simulate.tvd; "
                "'' for none)",
            ),
            _option("--rg", default=None, help="reference generator spec (default as for --tvd; '' for none)"),
            _option("--show-reasoning", action="store_true", help="print the supporter's four reasoning steps"),
            _option(
                "--max-tokens", type=int, default=None, help="tokens per supporter reply (default simulate.supporter_max_tokens)"
            ),
        ),
    )
    add_command(
        sub,
        "judge-vs-human",
        "Spearman correlation per criterion between human ratings (CSV) and the judge (paper App. H)",
        cmd_judge_vs_human,
        (
            _option("--ratings", type=Path, required=True, help="CSV: supporter,persona_id,<criterion>... (docs/evaluation.md)"),
            _option(
                "--evaluate-dir",
                type=Path,
                default=None,
                help="evaluation folder with */judgments.jsonl (default <run>/evaluate)",
            ),
        ),
    )
    add_command(
        sub,
        "simulator-fidelity",
        "seeker simulators and the ES-Intensity judge against ESConv (paper Tables 29 and 11)",
        cmd_simulator_fidelity,
        (
            _option(
                "--esconv", type=Path, default=None, help="ESConv.json or FailedESConv.json (default evaluate.fidelity.esconv)"
            ),
            _option("--no-intensity", action="store_true", help="skip the ES-Intensity predictor validation"),
        ),
    )
    add_command(
        sub,
        "compare",
        "two MLflow runs side by side: metrics (A, B, B - A), then the params and tags that differ",
        cmd_compare,
        (
            _option("run_a", metavar="RUN_A", help="MLflow run id (or mlflow:<run_id>)"),
            _option("run_b", metavar="RUN_B", help="MLflow run id (or mlflow:<run_id>)"),
        ),
    )
    # deployment (prefect.yaml, docker-compose.yml; docs/deployment.md)
    add_command(
        sub,
        "deploy",
        "register prefect.yaml's deployments on the Prefect server of PREFECT_API_URL",
        cmd_deploy,
        (
            _option(
                "--config",
                default="configs/paper.yaml",
                help="run recipe the deployments use, relative to the worker's project folder (default configs/paper.yaml); "
                "its ingest.schedule_cron schedules ingest-new-dumps",
            ),
            _option(
                "--name",
                dest="names",
                action="append",
                default=[],
                metavar="DEPLOYMENT",
                help="register only this deployment (repeatable; default: all)",
            ),
        ),
        common=False,
    )


def cmd_make_sample_dump(args: argparse.Namespace) -> int:
    from esvr.tasks.reddit.sample_dump import make_sample_dump

    paths = make_sample_dump(args.out, months=args.months, posts=args.posts, seed=args.seed)
    for kind, files in paths.items():
        for f in files:
            print(f"{kind}: {f}")
    return 0


def cmd_train_value_head(args: argparse.Namespace) -> int:
    import json

    from esvr.tasks.labeling.value_head import EndToEnd, metrics_table, train_value_head

    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"Touché23-ValueEval folder not found: {args.data}")
    conversational = None
    if args.conversational is not None:
        from esvr.tasks.common.esconv import load_esconv

        # seeker turns long enough to carry a value: the kind of text the detector labels
        conversational = [
            u.text
            for d in load_esconv(args.conversational)
            for u in d.utterances
            if u.role == "seeker" and len(u.text.split()) >= 8
        ]
    metrics = train_value_head(
        args.data,
        args.out,
        max_seq_length=args.max_seq_length,
        limit=args.limit,
        conversational_texts=conversational,
        max_conversational_rate=args.max_conversational_rate,
        layers=args.layers,
        end_to_end=EndToEnd(epochs=args.end_to_end) if args.end_to_end else None,
    )
    print(metrics_table(metrics))
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    config = prepared(args)
    from esvr.flows.chat import open_session, run_terminal

    with open_session(config, args.supporter, tvd=args.tvd, rg=args.rg, max_tokens=args.max_tokens) as (session, banner):
        print(banner, file=sys.stderr)
        return run_terminal(session, show_reasoning=args.show_reasoning)


def cmd_judge_vs_human(args: argparse.Namespace) -> int:
    config = prepared(args)
    from esvr.flows.evaluate import judge_vs_human_flow

    _print_artifacts(judge_vs_human_flow(config, args.ratings, args.evaluate_dir))
    return 0


def cmd_simulator_fidelity(args: argparse.Namespace) -> int:
    config = prepared(args)
    from esvr.flows.evaluate import simulator_fidelity_flow

    _print_artifacts(simulator_fidelity_flow(config, args.esconv, intensity=not args.no_intensity))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from esvr.flows.deploy import DeployError, deploy

    try:
        for name in deploy(args.config, names=args.names or None):
            print(f"registered {name}")
    except DeployError as exc:
        print(f"esvr deploy: {exc}", file=sys.stderr)
        return 2
    print("start a run: prefect deployment run 'pipeline-from-file/pipeline', or from the Prefect UI (Deployments)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from esvr.flows import tracking
    from esvr.flows.compare import CompareError, compare

    try:
        print("\n".join(compare(args.run_a, args.run_b, tracking.use_tracking_uri(resolve_config(args)))))
    except CompareError as exc:
        print(f"esvr compare: {exc}", file=sys.stderr)
        return 2
    return 0


# ---- benchmarks: numbers per stage that has a speed target ----------------------------------


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    from esvr.tasks.bench.ingest import run_bench

    run_bench(size_mb=args.size_mb, tmp_dir=args.tmp, repeats=args.repeats)
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from esvr.flows.recipe import read_recipe
    from esvr.tasks.bench.train import bench_train

    opts = {
        k: getattr(args, k)
        for k in (
            "config",
            "model",
            "sft",
            "dpo",
            "generate",
            "steps",
            "warmup",
            "max_length",
            "batch_size",
            "dpo_batch_size",
            "grad_accum",
            "gradient_checkpointing",
            "attn",
            "gen_batch_sizes",
            "gen_new_tokens",
            "peak_tflops",
        )
    }
    bench_train(recipe=read_recipe(args.config), **opts, json_path=args.json)
    return 0


def cmd_bench_simulate(args: argparse.Namespace) -> int:
    from esvr.tasks.bench.simulate import bench_simulate, format_bench

    results = bench_simulate(
        latency_s=args.latency,
        dialogues_c1=args.dialogues_c1,
        dialogues_cN=args.dialogues,
        concurrency=args.concurrency,
        end_after=args.end_after,
    )
    print(format_bench(results))
    return 0


def cmd_bench_label(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from esvr.tasks.bench.label import bench_label

    bench_label(n=args.n, threads_path=args.threads, repeats=args.repeats, max_seq_length=args.max_seq_length)
    return 0


def add_bench_commands(bench_sub: argparse._SubParsersAction) -> None:
    """One benchmark per stage that has a speed target."""
    add_label_bench(bench_sub)
    p = bench_sub.add_parser(
        "simulate", help="simulated dialogues/min at concurrency 1 and 32 against a fake OpenAI server with fixed latency"
    )
    p.add_argument(
        "--latency",
        type=float,
        default=1.0,
        help="seconds the fake server waits before each reply (an API reply of a few hundred tokens takes longer)",
    )
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--dialogues", type=int, default=32, help="dialogues simulated at --concurrency")
    p.add_argument("--dialogues-c1", type=int, default=2, help="dialogues simulated at concurrency 1")
    p.add_argument("--end-after", type=int, default=3, help="supporter turns before the scripted seeker says [END]")
    p.set_defaults(func=cmd_bench_simulate)
    p = bench_sub.add_parser("ingest", help="ingest throughput vs zstd decompression alone and a stdlib-json baseline")
    p.add_argument("--size-mb", type=_positive_int, default=520, help="decompressed size of the generated comments dump")
    p.add_argument("--tmp", type=Path, default=None, help="folder for the generated dump (deleted afterwards)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="rounds of the three phases; each keeps its median run")
    p.set_defaults(func=cmd_bench_ingest)
    p = bench_sub.add_parser(
        "train", help="LoRA SFT/DPO step time, tokens/s, memory and MFU through the trainers; --generate: hf backend tokens/s"
    )
    p.add_argument(
        "--config",
        type=Path,
        default=Path("configs/paper.yaml"),
        help="recipe whose train_tvd.train (SFT) and train_rg DPO settings are used",
    )
    p.add_argument(
        "--model",
        default="auto",
        choices=["auto", "llama3-8b", "tiny"],
        help="random model shape (auto: llama3-8b on CUDA, tiny on CPU)",
    )
    p.add_argument("--sft", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dpo", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--generate", action="store_true", help="also measure generation of the hf chat backend at --gen-batch-sizes")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after --warmup ones)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default: the recipe's on CUDA, 128 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="SFT micro-batch (default: the recipe's)")
    p.add_argument("--dpo-batch-size", type=int, default=None, help="DPO micro-batch of pairs (default: the recipe's)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: the recipe's setting (on with CUDA where it sets none)",
    )
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument(
        "--gen-batch-sizes", type=lambda s: tuple(int(x) for x in s.split(",")), default=(1, 8, 32, 64), metavar="B1,B2,..."
    )
    p.add_argument("--gen-new-tokens", type=int, default=None, help="new tokens per reply (default 32 on CUDA, 8 on CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, when its name is not known")
    p.add_argument("--json", type=Path, default=None, help="write every number to this file")
    p.set_defaults(func=cmd_bench_train)


def add_label_bench(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("label", help="utterances/s of the value detector and emotion scorer on this machine")
    p.add_argument("--n", type=int, default=1000, help="texts to label")
    p.add_argument("--threads", type=Path, default=None, help="label the utterances of this threads.parquet instead")
    p.add_argument("--repeats", type=_positive_int, default=1, help="best of this many passes")
    p.add_argument(
        "--max-seq-length",
        type=int,
        default=None,
        help="tokens per text for the value detector's encoder (default: label.values' default, 64)",
    )
    p.set_defaults(func=cmd_bench_label)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esvr",
        description="Emotional support dialogue systems via value reinforcement (Kim et al., ACL 2025): "
        "a Prefect + MLflow pipeline.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole pipeline (or run.stages) on a recipe")
    _common(p)
    p.set_defaults(func=cmd_run, run_lock="exclusive")

    p = sub.add_parser(
        "check", help="preflight: list everything the recipe's stages still lack (keys, servers, files), in seconds"
    )
    _common(p)
    p.add_argument(
        "--stage",
        dest="stages",
        action="append",
        default=[],
        metavar="STAGE",
        help="check only this stage's needs (repeatable; default: the stages `esvr run` selects)",
    )
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "rehearse",
        help="the paper recipe end to end on this machine, against local servers it starts (default configs/rehearsal.yaml)",
    )
    _common(p)
    p.set_defaults(func=cmd_rehearse, run_lock="exclusive")

    p = sub.add_parser(
        "build-value-detector",
        help="write a 20-value sequence-classification checkpoint from the "
        "bundled encoder and value head (for label.values.backend: hf)",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write (a no-op when it holds the same build)")
    p.add_argument("--head", type=Path, default=None, help="value head .npz (default: the bundled one)")
    p.set_defaults(func=cmd_build_value_detector)

    p = sub.add_parser("config", help="inspect run recipes")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the resolved config (recipe + extends chain + overrides + defaults)")
    _common(show)
    show.add_argument("--diff", action="store_true", help="print only the keys that differ from the recipe's parent")
    show.set_defaults(func=cmd_config_show)

    # Benchmarks print numbers; each stage adds its own under `esvr bench <stage>`.
    bench = sub.add_parser("bench", help="benchmarks that print numbers")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="STAGE")
    add_bench_commands(bench_sub)

    add_stage_commands(sub)
    add_personas_import(sub.choices["personas"])
    add_tool_commands(sub)
    return parser


def add_personas_import(personas: argparse.ArgumentParser) -> None:
    """`esvr personas import FILE...` beside the stage's own `esvr personas`."""
    p = personas.add_subparsers(dest="personas_command", metavar="ACTION").add_parser(
        "import", help="ESConv-style records (JSON / JSON Lines) and role cards (text) -> personas.jsonl"
    )
    _common(p)
    p.add_argument("files", nargs="+", type=Path, help="ESConv-style .json/.jsonl files or role-card text files")
    p.add_argument(
        "--personas", dest="personas_out", type=Path, default=None, help="where to write (default: <run>/personas/personas.jsonl)"
    )
    p.add_argument(
        "--split",
        choices=["train", "dev", "test"],
        default=None,
        help="one split for all (default: personas.split's proportions)",
    )
    p.add_argument("--no-writer", action="store_true", help="rules only: a record they cannot map is left out, no model starts")
    p.set_defaults(func=cmd_personas_import)


def cmd_personas_import(args: argparse.Namespace) -> int:
    from esvr.flows.personas import import_personas_files

    _print_artifacts(import_personas_files(resolve_config(args), args.files, args.personas_out, args.split, not args.no_writer))
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM does what Ctrl-C does (asyncio's handler, when a simulation runs, cancels its
    calls; else KeyboardInterrupt): the same clean stop for `kill` and for a scheduler's stop."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    try:
        with contextlib.ExitStack() as args.held:  # the run folder's lock, released on any exit
            return func(args)
    except LockBusy as exc:
        print(f"esvr: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"esvr: config error:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esvr: interrupted; rerun the same command to resume (finished work is kept and cached)", file=sys.stderr)
        return 130
    except Exception as exc:
        from esvr.models.local_server import LocalServerError

        if isinstance(exc, LocalServerError):
            print(f"esvr: local server: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, user_errors()):
            print(f"esvr: {exc}", file=sys.stderr)
            return 2
        if os.environ.get("ESVR_TRACEBACK"):
            raise
        # The flow's log above holds the traceback; finished stages stay cached in the run folder.
        runs_stages = hasattr(args, "stage") or args.command in ("run", "rehearse")
        resume = "finished stages are kept and cached: fix the cause and run the same command to resume " if runs_stages else ""
        print(
            f"esvr {args.command}: failed: {type(exc).__name__}: {exc}\n{resume}(ESVR_TRACEBACK=1 shows the traceback here)",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous is not None:  # main() called from Python (tests) leaves the handler as it was
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
