"""Stage 7: the supporter model, SFT on simulated dialogues, then DPO on look-ahead rewards (§5.3, App. D.3, G).

- SFT: every successful supporter turn of the simulated dialogues gives up to two examples (initial
  and alternative response, `esvr.tasks.supporter.sft_export`); the prompt is the supporter's full input
  (Table 18), the completion its four steps in the canonical template. Train/dev by persona split.
- DPO: the dialogues behind the preference data come from the prompted supporter (the SFT stage's
  dialogues: "DPO (GPT)") or from new simulations with the SFT model ("DPO (SFT)"),
  ``dpo_simulations``. Both candidates of every turn are continued (`esvr.tasks.supporter.preferences`),
  scored per seeker utterance, and turned into pairs for each (h, gamma, T_diff) setting of
  ``sweep``; the ``selected`` setting's pairs train the DPO adapter on top of the SFT model.
- ``reward: value`` is the paper's method; ``reward: emotion`` the emotion-reinforced variant of
  App. G (same code path, another per-utterance score).

The plain functions here build data sets; the simulations, rollouts and preferences load their own
models (`esvr.tasks.common.roles`). With ``orchestration.task_runner`` dask or ray the rollouts run
as shards of dialogues on the cluster's workers (`rollouts_on_runner`, the runner handed in by the
flow), each appending to its own shard file, merged into the rollouts file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
from pydantic import field_validator

from esvr.models.config import InputFileError, ModelConfig, Section
from esvr.models.emotion import EmotionConfig
from esvr.models.training import TrainConfig
from esvr.models.value_detector import ValueDetectorConfig
from esvr.tasks.common.jsonl import append_jsonl, exclusive, read_jsonl_repairing, write_jsonl
from esvr.tasks.common.roles import chat_model, value_detector
from esvr.tasks.common.shards import MapRunner, merge_shard_runs, shard_paths, shard_runs, split_shards
from esvr.tasks.simulation.simulate import Agents, SimulateConfig, load_dialogues, opened_agents, simulate_dialogues
from esvr.tasks.supporter.preferences import (
    CANDIDATES,
    Pair,
    RolloutSummary,
    candidate_replies,
    candidates_by_turn,
    emotion_scores,
    pair_counts,
    pairs_for_setting,
    rollout_candidates,
    value_counts,
)

SPLITS = ("train", "dev")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


class RewardSetting(Section):
    """One (h, gamma, T_diff) setting of Table 19. YAML: ``{h: 3, gamma: 1, t_diff: 2}``, ``h: all``."""

    #: look-ahead horizon in seeker utterances; null or 'all' = to the end of the dialogue
    h: int | None = 3
    gamma: float = 1.0
    t_diff: float = 2.0

    @field_validator("h", mode="before")
    @classmethod
    def _all(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in {"all", "none", ""}:
            return None
        return value

    @field_validator("h")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("h must be >= 1 (or 'all')")
        return value

    @property
    def name(self) -> str:
        h = "all" if self.h is None else str(self.h)
        return f"h={h},gamma={self.gamma:g},t_diff={self.t_diff:g}"


def _paper_sweep() -> list[RewardSetting]:
    """Table 19's grid for the value reward."""
    grid = [
        (None, 1.0, 1.0),
        (None, 1.0, 2.0),
        (None, 0.9, 1.0),
        (None, 0.9, 1.5),
        (3, 1.0, 1.0),
        (3, 1.0, 2.0),
        (5, 1.0, 1.0),
        (5, 1.0, 2.0),
    ]
    return [RewardSetting(h=h, gamma=g, t_diff=t) for h, g, t in grid]


class TrainSupporterConfig(Section):
    """Stage 7 (`train_supporter`): SFT, preference data, DPO."""

    #: the paper gives no supporter hyperparameters (only its GPU and durations, App. D.3); these
    #: are the trainers' defaults: LoRA r=8 on the attention projections, lr 5e-5 for SFT
    sft: TrainConfig = TrainConfig()
    #: DPO from the SFT model with a lower learning rate, as the paper does for its other DPO stages (Table 6)
    dpo: TrainConfig = TrainConfig(learning_rate=1e-5, lora_alpha=16)
    #: SFT examples from turns that the small-model fallback built field by field (simulate.fallback)
    include_stepwise: bool = True
    #: 'value': N_{t+k}, the turn's target values found in the seeker's utterances (eq. 3);
    #: 'emotion': S_{t+k}, the judged seeker state (App. G, eq. 5)
    reward: Literal["value", "emotion"] = "value"
    #: where the dialogues for DPO come from: the SFT stage's dialogues of the prompted supporter
    #: ('prompted': "DPO (GPT)") or new simulations with the SFT model ('sft': "DPO (SFT)", §5.3)
    dpo_simulations: Literal["prompted", "sft"] = "sft"
    #: personas simulated per split with the SFT model ('sft' source); None = all
    dpo_max_personas: int | None = None
    #: dialogues per split whose turns get rollouts; None = all
    dpo_max_dialogues: int | None = None
    #: supporter turns per dialogue (from the start) whose candidates get rollouts; None = all
    dpo_max_turns: int | None = None
    #: rollouts in flight at once (each model's own `concurrency` also caps its calls)
    rollout_concurrency: int = 16
    #: settings whose pair counts are reported (Table 19), one nested MLflow run each
    sweep: list[RewardSetting] = _paper_sweep()
    #: the setting whose pairs train the DPO model (Table 20's best DPO (SFT): h=3, gamma=1, T_diff=2)
    selected: RewardSetting = RewardSetting(h=3, gamma=1.0, t_diff=2.0)
    #: value reward: the detector that finds values in seeker utterances; null = `label.values`
    value_detector: ValueDetectorConfig | None = None
    #: emotion reward: 'sample' asks the judge (models.judge) n_samples times at temperature 1 and
    #: averages (the paper: 10 GPT answers); 'score' takes the expectation under the judge's
    #: distribution over the four answers, what that average converges to, in one forward pass
    emotion_judge: Literal["score", "sample"] = "sample"
    n_samples: int = 10
    judge_max_tokens: int = 24
    #: train the DPO model (off: stop after the preference data and Table 19)
    train_dpo: bool = True

    def rollout_horizon(self) -> int | None:
        """The longest horizon any setting needs: rollouts are computed once for it."""
        hs = [s.h for s in [*self.sweep, self.selected]]
        return None if any(h is None for h in hs) else max(h for h in hs if h is not None)

    def settings(self) -> list[RewardSetting]:
        """The sweep plus the selected setting (once)."""
        out = list(self.sweep)
        if self.selected not in out:
            out.append(self.selected)
        return out


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


#: a dialogue or persona record, as read from its JSONL file
RecordT = TypeVar("RecordT", bound=Mapping[str, Any])


def dialogues_by_split(dialogues: Sequence[RecordT], max_per_split: int | None = None) -> dict[str, list[RecordT]]:
    out: dict[str, list[RecordT]] = {s: [] for s in SPLITS}
    for d in dialogues:
        split = d.get("split")
        if split in out and (max_per_split is None or len(out[split]) < max_per_split):
            out[split].append(d)
    return out


def _save_dataset(
    rows_by_split: Mapping[str, list[dict[str, Any]]], out: Path, columns: tuple[str, ...] = ("prompt", "completion")
) -> Path:
    """A DatasetDict with train and dev (possibly empty) saved to `out`, plus JSONL copies."""
    from datasets import Dataset, DatasetDict

    out.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        write_jsonl(rows, out.parent / f"{out.name}_{split}.jsonl")
    # An empty split (the demo simulates no dev personas) takes the columns of a non-empty one.
    features = next((Dataset.from_list(list(r)).features for r in rows_by_split.values() if r), None)
    if features is None:  # no rows at all (e.g. no preference pair cleared T_diff): columns only
        from datasets import Features, Value

        features = Features({c: Value("string") for c in columns})

    def as_dataset(rows: list[dict[str, Any]]) -> Dataset:
        if rows or features is None:
            return Dataset.from_list(rows, features=features)
        return Dataset.from_dict({k: [] for k in features}, features=features)

    dd = DatasetDict({s: as_dataset(list(rows_by_split.get(s, []))) for s in SPLITS})
    tmp = out.with_name(out.name + ".partial")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(str(tmp), num_shards={s: 1 for s in SPLITS})  # an empty split reads back only as one shard
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build_sft_data(dialogues_path: Path, out_dir: Path, include_stepwise: bool = True) -> dict[str, Any]:
    """SFT examples of the simulated dialogues (train/dev) as a saved DatasetDict + Table 9 stats."""
    from esvr.tasks.simulation.simulate import load_dialogues
    from esvr.tasks.supporter.sft_export import sft_examples

    by_split = dialogues_by_split(load_dialogues(dialogues_path))
    rows, stats = {}, {}
    for split, dialogues in by_split.items():
        examples, st = sft_examples(dialogues, include_stepwise=include_stepwise)
        rows[split] = [
            {"prompt": e["prompt"], "completion": e["completion"], "kind": e["kind"], "dialogue_id": e["dialogue_id"]}
            for e in examples
        ]
        stats[split] = {k: v for k, v in st.items() if k != "strategy_distribution"}
    data = _save_dataset(rows, Path(out_dir) / "sft_data")
    (Path(out_dir) / "sft_data_stats.json").write_bytes(orjson.dumps(stats, option=orjson.OPT_INDENT_2))
    return {"data": str(data), "stats": stats}


def score_rollouts(
    rollouts: Sequence[Mapping[str, Any]],
    dialogues: Mapping[str, Mapping[str, Any]],
    cfg: TrainSupporterConfig,
    *,
    detect: Any = None,
    judge: Any = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Each rollout with its per-utterance ``scores`` (N_{t+k} or S_{t+k}) for the longest horizon."""
    if cfg.reward == "value":
        if detect is None:
            raise ValueError("the value reward needs a value detector's `detect`")
        scores = value_counts(rollouts, detect)
    else:
        if judge is None:
            raise ValueError("the emotion reward needs a judge chat model")
        scores = emotion_scores(
            rollouts,
            dialogues,
            judge,
            method=cfg.emotion_judge,
            n_samples=cfg.n_samples,
            max_tokens=cfg.judge_max_tokens,
            seed=seed,
        )
    return [{**r, "scores": s} for r, s in zip(rollouts, scores)]


def _prompt_and_replies(dialogue: Mapping[str, Any], turn_no: int) -> tuple[list[dict[str, str]], dict[str, str]]:
    from esvr.tasks.simulation.supporter import render_reply
    from esvr.tasks.supporter.sft_export import turn_prompt

    turn = next(t for t in dialogue["turns"] if int(t["turn"]) == int(turn_no))
    return turn_prompt(dialogue, turn), {k: render_reply(r) for k, r in candidate_replies(turn).items()}


def dpo_rows(pairs: Sequence[Pair], dialogues: Mapping[str, Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """TRL conversational preference rows per split: the turn's full supporter prompt, the chosen
    and the rejected four-step reply."""
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for p in pairs:
        d = dialogues[p.info["dialogue_id"]]
        prompt, replies = _prompt_and_replies(d, p.info["turn"])
        rows.setdefault(p.info["split"], []).append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": replies[p.chosen]}],
                "rejected": [{"role": "assistant", "content": replies[p.rejected]}],
                "chosen_kind": p.chosen,
                "margin": p.margin,
                "reward_initial": p.rewards["initial"],
                "reward_alternative": p.rewards["alternative"],
                "dialogue_id": p.info["dialogue_id"],
                "turn": p.info["turn"],
            }
        )
    return rows


def build_preferences(
    scored: Sequence[Mapping[str, Any]],
    dialogues: Mapping[str, Mapping[str, Any]],
    cfg: TrainSupporterConfig,
    out_dir: Path,
) -> dict[str, Any]:
    """Per setting: pairs, Table 19's counts, and a DatasetDict of the selected setting's pairs.

    Returns {'table19': {setting: {split: counts}}, 'selected': name, 'data': path,
    'pairs': {setting: path}}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    turns = candidates_by_turn(scored)
    n_turns = {s: sum(t["split"] == s for t in turns) for s in SPLITS}
    table: dict[str, dict[str, dict[str, int]]] = {}
    paths: dict[str, str] = {}
    data_path = None
    for setting in cfg.settings():
        pairs = pairs_for_setting(turns, setting.h, setting.gamma, setting.t_diff)
        table[setting.name] = {s: pair_counts([p for p in pairs if p.info["split"] == s], n_turns[s]) for s in SPLITS}
        rows = dpo_rows(pairs, dialogues)
        safe = setting.name.replace(",", "_").replace("=", "")
        pairs_path = out_dir / f"pairs_{safe}.jsonl"
        write_jsonl([{**r, "split": s} for s, rs in rows.items() for r in rs], pairs_path)
        paths[setting.name] = str(pairs_path)
        if setting == cfg.selected:
            data_path = str(_save_dataset(rows, out_dir / "dpo_data", columns=("prompt", "chosen", "rejected")))
    result = {"table19": table, "selected": cfg.selected.name, "data": data_path, "pairs": paths, "turns": n_turns}
    (out_dir / "table19.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (out_dir / "table19.md").write_text(table19_markdown(table, cfg.reward))
    return result


def table19_markdown(table: Mapping[str, Mapping[str, Mapping[str, int]]], reward: str = "value") -> str:
    lines = [
        f"Preference pairs per setting (reward: {reward}); candidates = turns with both responses rolled out.",
        "",
        "| h | gamma | T_diff | train pairs | chosen initial | chosen alternative | dev pairs | chosen initial | chosen alternative |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, by_split in table.items():
        parts = dict(kv.split("=") for kv in name.split(","))
        tr, dv = by_split["train"], by_split["dev"]
        lines.append(
            f"| {parts['h']} | {parts['gamma']} | {parts['t_diff']} | {tr['pairs']} | {tr['chosen_initial']} | {tr['chosen_alternative']} "
            f"| {dv['pairs']} | {dv['chosen_initial']} | {dv['chosen_alternative']} |"
        )
    return "\n".join(lines) + "\n"


def table19_metrics(counts: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    return {f"{split}.{k}": float(v) for split, c in counts.items() for k, v in c.items()}


# --------------------------------------------------------------------------------------------
# Simulations, rollouts and preferences (each loads its own models)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentSetup:
    """What the stage's simulations and rollouts open their agents from: the ``simulate`` section,
    the role models, the emotion scorer's settings (None: no valence end rule), the run folder and
    the cache switch. Picklable, so that a cluster worker opens its own."""

    simulate: SimulateConfig
    supporter: ModelConfig
    seeker: ModelConfig
    tvd: ModelConfig | None
    rg: ModelConfig | None
    emotion: EmotionConfig | None
    run_dir: Path
    use_cache: bool

    def with_supporter(self, supporter: ModelConfig) -> AgentSetup:
        return replace(self, supporter=supporter)

    def opened(self) -> AbstractContextManager[Agents]:
        """The agents; trained components are loaded for this use and closed on exit (training
        follows, and wants their memory)."""
        return opened_agents(
            self.simulate,
            self.supporter,
            self.seeker,
            tvd=self.tvd,
            rg=self.rg,
            emotion=self.emotion,
            run_dir=self.run_dir,
            use_cache=self.use_cache,
            own_adapters=True,
        )


def dpo_simulations(personas: Sequence[Mapping[str, Any]], out: Path, setup: AgentSetup, seed: int) -> dict[str, Any]:
    """'DPO (SFT)': dialogues of the SFT model (`setup`'s supporter) with alternatives; the dialogues
    file is itself the resumable record (`simulate_dialogues`)."""
    with setup.opened() as agents:
        summary = simulate_dialogues(personas, out, agents, concurrency=setup.simulate.concurrency, alternatives=True, seed=seed)
    return {"path": str(out), "metrics": summary.metrics("dpo_simulate"), "errors": summary.errors}


def rollout_shard(
    dialogues: list[dict[str, Any]], out: str, cfg: TrainSupporterConfig, setup: AgentSetup, seed: int
) -> dict[str, Any]:
    """Rollouts of some dialogues in this (worker) process; returns the summary and ``worker_pid``."""
    with setup.opened() as agents:
        summary = rollout_candidates(
            dialogues,
            agents,
            out,
            horizon=cfg.rollout_horizon(),
            concurrency=cfg.rollout_concurrency,
            max_turns_per_dialogue=cfg.dpo_max_turns,
            seed=seed,
        )
    return {"shard": Path(out).name, "dialogues": len(dialogues), "worker_pid": os.getpid(), "summary": summary}


def rollouts_on_runner(
    run: MapRunner,
    n_shards: int,
    dialogues: list[dict[str, Any]],
    out: Path,
    cfg: TrainSupporterConfig,
    setup: AgentSetup,
    seed: int,
) -> RolloutSummary:
    """`rollout_candidates` as one task per shard of dialogues (of `n_shards`), mapped with `run`.

    A shard file starts with the rollouts of its dialogues that `out` already holds, so each shard
    skips what any earlier run (sharded or not) finished; the shards are then merged into `out`.
    What each shard did, with its worker's process id, goes to ``<out>.shards/shards.json``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shards = split_shards(dialogues, n_shards)
    paths = shard_paths(shards, out, n_shards)
    merged = read_jsonl_repairing(out) if out.exists() else []
    for shard, path in zip(shards, paths):
        ids = {str(d["id"]) for d in shard}
        with exclusive(path):
            have = {r["key"] for r in read_jsonl_repairing(path)} if path.exists() else set()
            for rec in merged:
                if rec["dialogue_id"] in ids and rec["key"] not in have:
                    append_jsonl(path, rec)
    calls = [
        {"dialogues": shard, "out": str(path), "cfg": cfg, "setup": setup, "seed": seed} for shard, path in zip(shards, paths)
    ]
    runs = run(rollout_shard, calls, name="rollout-shard") if calls else []
    summary = RolloutSummary(path=str(out), horizon=cfg.rollout_horizon())
    summary.rollouts_written = merge_shard_runs(
        out,
        runs,
        lambda r: {"dialogues": r["dialogues"], "written": r["summary"].rollouts_written, "errors": len(r["summary"].errors)},
        key="key",
    )
    for shard_run in runs:
        summary.add(shard_run["summary"])
    return summary


def rollouts(
    dialogues_path: Path,
    out: Path,
    cfg: TrainSupporterConfig,
    setup: AgentSetup,
    seed: int,
    run: MapRunner | None = None,
    n_shards: int = 1,
) -> dict[str, Any]:
    """Look-ahead rollouts of both candidates of each turn. The rollouts file is resumable
    (candidates already in it are skipped). With a `run`ner the shards run as its tasks
    (`rollouts_on_runner`), in this process otherwise."""
    by_split = dialogues_by_split(load_dialogues(dialogues_path), cfg.dpo_max_dialogues)
    chosen = [d for s in SPLITS for d in by_split[s]]
    if run is None:
        summary = rollout_shard(chosen, str(out), cfg, setup, seed)["summary"]
        return {"path": str(out), "dialogues": len(chosen), "metrics": summary.metrics(), "errors": summary.errors}
    summary = rollouts_on_runner(run, n_shards, chosen, out, cfg, setup, seed)
    return {
        "path": str(out),
        "dialogues": len(chosen),
        "metrics": summary.metrics(),
        "errors": summary.errors,
        "workers": len({r["worker_pid"] for r in shard_runs(out)}),
    }


def read_rollouts(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    rows = read_jsonl_repairing(Path(path))
    for i, r in enumerate(rows, 1):
        for key in ("key", "dialogue_id", "turn", "kind", "at", "continuation"):
            if key not in r:
                raise InputFileError(f"{path}: line {i} has no '{key}' field")
        if r["kind"] not in CANDIDATES:
            raise InputFileError(f"{path}: line {i}: kind {r['kind']!r} is not one of {CANDIDATES}")
    return rows


def preferences(
    rollouts: Path,
    dialogues_path: Path,
    cfg: TrainSupporterConfig,
    value_cfg: ValueDetectorConfig | None,
    judge: ModelConfig | None,
    out_dir: Path,
    run_dir: str,
    use_cache: bool,
    seed: int,
) -> dict[str, Any]:
    """Score the rollouts (value detector or emotion judge), then pairs and Table 19 per setting."""
    rollouts_rows = read_rollouts(rollouts)
    dialogues = {str(d["id"]): d for d in load_dialogues(dialogues_path)}
    detect = judge_model = None
    if cfg.reward == "value":
        detect = value_detector(value_cfg or ValueDetectorConfig(), run_dir, use_cache).detect
    else:
        judge_model = chat_model(judge, run_dir, cache=use_cache)  # type: ignore[arg-type]
    scored = score_rollouts(rollouts_rows, dialogues, cfg, detect=detect, judge=judge_model, seed=seed)
    write_jsonl(scored, Path(out_dir) / "scored_rollouts.jsonl")
    return build_preferences(scored, dialogues, cfg, out_dir)
