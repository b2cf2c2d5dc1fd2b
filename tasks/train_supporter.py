"""Stage 7: the supporter model, SFT on simulated dialogues, then DPO on look-ahead rewards (§5.3, App. D.3, G).

- SFT: every successful supporter turn of the simulated dialogues gives up to two examples (initial
  and alternative response, `esvr.tasks.sft_export`); the prompt is the supporter's full input
  (Table 18), the completion its four steps in the canonical template. Train/dev by persona split.
- DPO: the dialogues behind the preference data come from the prompted supporter (the SFT stage's
  dialogues: "DPO (GPT)") or from new simulations with the SFT model ("DPO (SFT)"),
  ``dpo_simulations``. Both candidates of every turn are continued (`esvr.tasks.preferences`),
  scored per seeker utterance, and turned into pairs for each (h, gamma, T_diff) setting of
  ``sweep``; the ``selected`` setting's pairs train the DPO adapter on top of the SFT model.
- ``reward: value`` is the paper's method; ``reward: emotion`` the emotion-reinforced variant of
  App. G (same code path, another per-utterance score).

The plain functions here build data sets; the cached tasks load their own models. With
``orchestration.task_runner`` dask or ray the rollouts run as shards of dialogues on the cluster's
workers (`rollouts_on_runner`), each appending to its own shard file, merged into the rollouts file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import orjson
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import field_validator

from esvr.flows.config import ModelConfig, OrchestrationConfig, Section
from esvr.models.training import TrainConfig
from esvr.tasks.caching import cache_policy
from esvr.tasks.label import ValueDetectorConfig
from esvr.tasks.preferences import (
    CANDIDATES,
    Pair,
    candidate_replies,
    candidates_by_turn,
    emotion_scores,
    pair_counts,
    pairs_for_setting,
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
    grid = [(None, 1.0, 1.0), (None, 1.0, 2.0), (None, 0.9, 1.0), (None, 0.9, 1.5), (3, 1.0, 1.0), (3, 1.0, 2.0), (5, 1.0, 1.0), (5, 1.0, 2.0)]
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
        return None if any(h is None for h in hs) else max(hs)

    def settings(self) -> list[RewardSetting]:
        """The sweep plus the selected setting (once)."""
        out = list(self.sweep)
        if self.selected not in out:
            out.append(self.selected)
        return out


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


def dialogues_by_split(dialogues: Sequence[Mapping[str, Any]], max_per_split: int | None = None) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {s: [] for s in SPLITS}
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
        (out.parent / f"{out.name}_{split}.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    # An empty split (the demo simulates no dev personas) takes the columns of a non-empty one.
    features = next((Dataset.from_list(list(r)).features for r in rows_by_split.values() if r), None)
    if features is None:  # no rows at all (e.g. no preference pair cleared T_diff): columns only
        from datasets import Features, Value

        features = Features({c: Value("string") for c in columns})
    def split(rows: list[dict[str, Any]]) -> Dataset:
        if rows or features is None:
            return Dataset.from_list(rows, features=features)
        return Dataset.from_dict({k: [] for k in features}, features=features)

    dd = DatasetDict({s: split(list(rows_by_split.get(s, []))) for s in SPLITS})
    tmp = out.with_name(out.name + ".partial")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(str(tmp), num_shards={s: 1 for s in SPLITS})  # an empty split reads back only as one shard
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build_sft_data(dialogues_path: Path, out_dir: Path, include_stepwise: bool = True) -> dict[str, Any]:
    """SFT examples of the simulated dialogues (train/dev) as a saved DatasetDict + Table 9 stats."""
    from esvr.tasks.sft_export import sft_examples
    from esvr.tasks.simulate import load_dialogues

    by_split = dialogues_by_split(load_dialogues(dialogues_path))
    rows, stats = {}, {}
    for split, dialogues in by_split.items():
        examples, st = sft_examples(dialogues, include_stepwise=include_stepwise)
        rows[split] = [{"prompt": e["prompt"], "completion": e["completion"], "kind": e["kind"], "dialogue_id": e["dialogue_id"]} for e in examples]
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
            rollouts, dialogues, judge, method=cfg.emotion_judge, n_samples=cfg.n_samples, max_tokens=cfg.judge_max_tokens, seed=seed
        )
    return [{**r, "scores": s} for r, s in zip(rollouts, scores)]


def _prompt_and_replies(dialogue: Mapping[str, Any], turn_no: int) -> tuple[list[dict[str, str]], dict[str, str]]:
    from esvr.tasks.sft_export import turn_prompt
    from esvr.tasks.supporter import render_reply

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
        pairs_path.write_bytes(b"".join(orjson.dumps({**r, "split": s}) + b"\n" for s, rs in rows.items() for r in rs))
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
# Tasks
# --------------------------------------------------------------------------------------------


@task(name="supporter_sft_data", cache_policy=cache_policy("esvr.tasks.sft_export", "esvr.tasks.supporter"), persist_result=True)
def sft_data_task(dialogues: Path, out_dir: Path, include_stepwise: bool = True) -> dict[str, Any]:
    return build_sft_data(dialogues, out_dir, include_stepwise)


@contextmanager
def rollout_agents(
    simulate_cfg: Any,
    supporter: ModelConfig,
    seeker: ModelConfig,
    tvd: ModelConfig | None,
    rg: ModelConfig | None,
    emotion_cfg: Any | None,
    out_dir: Path,
    use_cache: bool,
) -> Iterator[Any]:
    """The simulation agents for rollouts and DPO simulations; trained adapters are loaded for this
    use and closed on exit, plain models come from the shared pool."""
    from esvr.flows.runtime import RunPaths, chat_model
    from esvr.models.chat import ResponseCache, load_chat_model
    from esvr.tasks.simulate import build_agents

    closers = []

    def load(cfg: ModelConfig | None):
        if cfg is None:
            return None
        if cfg.spec.startswith("hf:") and "+" in cfg.spec:
            cache = ResponseCache(RunPaths(Path(out_dir).resolve()).response_cache) if use_cache else None
            model = load_chat_model(cfg.to_spec(), cache)
            closers.append(model)
            return model
        return chat_model(cfg, out_dir, cache=use_cache)

    scorer = None
    if emotion_cfg is not None:
        from esvr.models.emotion import load_emotion_scorer

        echat = chat_model(emotion_cfg.model, out_dir, cache=use_cache) if emotion_cfg.backend == "emollama" else None
        scorer = load_emotion_scorer(emotion_cfg, echat)
    try:
        yield build_agents(simulate_cfg, load(supporter), load(seeker), tvd_model=load(tvd), rg_model=load(rg), emotion_scorer=scorer)
    finally:
        for m in closers:
            m.close()


@task(name="supporter_dpo_simulations", cache_policy=NO_CACHE, persist_result=False)
def dpo_simulations_task(
    personas: list[dict],
    out: Path,
    simulate_cfg: Any,
    supporter: ModelConfig,
    seeker: ModelConfig,
    tvd: ModelConfig | None,
    rg: ModelConfig | None,
    emotion_cfg: Any | None,
    out_dir: Path,
    use_cache: bool,
    seed: int,
) -> dict[str, Any]:
    """'DPO (SFT)': dialogues of the SFT model with alternatives. Not cached by Prefect: the
    dialogues file is itself the resumable record (`simulate_dialogues`)."""
    from esvr.tasks.simulate import simulate_dialogues

    with rollout_agents(simulate_cfg, supporter, seeker, tvd, rg, emotion_cfg, out_dir, use_cache) as agents:
        summary = simulate_dialogues(personas, out, agents, concurrency=simulate_cfg.concurrency, alternatives=True, seed=seed)
    return {"path": str(out), "metrics": summary.metrics("dpo_simulate"), "errors": summary.errors}


def rollout_shard(
    dialogues: list[dict[str, Any]],
    out: str,
    cfg: TrainSupporterConfig,
    simulate_cfg: Any,
    roles: dict[str, ModelConfig | None],
    emotion_cfg: Any | None,
    out_dir: Path,
    use_cache: bool,
    seed: int,
) -> dict[str, Any]:
    """One shard's rollouts in this (worker) process; returns its summary and ``worker_pid``."""
    from esvr.tasks.preferences import rollout_candidates

    with rollout_agents(simulate_cfg, roles["supporter"], roles["seeker"], roles["tvd"], roles["rg"], emotion_cfg, out_dir, use_cache) as agents:
        summary = rollout_candidates(
            dialogues, agents, out, horizon=cfg.rollout_horizon(), concurrency=cfg.rollout_concurrency,
            max_turns_per_dialogue=cfg.dpo_max_turns, seed=seed,
        )
    return {"shard": Path(out).name, "dialogues": len(dialogues), "worker_pid": os.getpid(), "summary": summary}


def rollouts_on_runner(
    dialogues: list[dict[str, Any]],
    out: Path,
    cfg: TrainSupporterConfig,
    simulate_cfg: Any,
    roles: dict[str, ModelConfig | None],
    emotion_cfg: Any | None,
    out_dir: Path,
    use_cache: bool,
    seed: int,
    orchestration: OrchestrationConfig,
) -> Any:
    """`rollout_candidates` as one task per shard of dialogues on the runner `orchestration` names.

    A shard file starts with the rollouts of its dialogues that `out` already holds, so each shard
    skips what any earlier run (sharded or not) finished; the shards are then merged into `out`.
    What each shard did, with its worker's process id, goes to ``<out>.shards/shards.json``.
    """
    from esvr.flows.task_runners import merge_shards, run_on_runner, shard_dir, shard_paths, split_shards, write_shard_runs
    from esvr.tasks.preferences import RolloutSummary
    from esvr.tasks.simulate import _append, exclusive, read_jsonl_repairing

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = orchestration.max_workers
    shards = split_shards(dialogues, n)
    paths = shard_paths(shards, out, n)
    merged = read_jsonl_repairing(out) if out.exists() else []
    for shard, path in zip(shards, paths):
        ids = {str(d["id"]) for d in shard}
        with exclusive(path):
            have = {r["key"] for r in read_jsonl_repairing(path)} if path.exists() else set()
            for rec in merged:
                if rec["dialogue_id"] in ids and rec["key"] not in have:
                    _append(path, rec)
    calls = [
        {"dialogues": shard, "out": str(path), "cfg": cfg, "simulate_cfg": simulate_cfg, "roles": roles,
         "emotion_cfg": emotion_cfg, "out_dir": out_dir, "use_cache": use_cache, "seed": seed}
        for shard, path in zip(shards, paths)
    ]
    runs = run_on_runner(orchestration, rollout_shard, calls, name="rollout-shard") if calls else []
    summary = RolloutSummary(path=str(out), horizon=cfg.rollout_horizon())
    summary.rollouts_written = merge_shards(out, sorted(shard_dir(out).glob("shard-*.jsonl")), key="key")
    for run in runs:
        part = run["summary"]
        summary.turns += part.turns
        summary.skipped_turns_no_alternative += part.skipped_turns_no_alternative
        summary.rollouts_existing += part.rollouts_existing
        summary.errors += part.errors
        for k, v in part.end_reasons.items():
            summary.end_reasons[k] = summary.end_reasons.get(k, 0) + v
        for k, v in part.calls.items():
            summary.calls[k] = summary.calls.get(k, 0) + v
    write_shard_runs(out, [{"shard": r["shard"], "dialogues": r["dialogues"], "written": r["summary"].rollouts_written,
                            "errors": len(r["summary"].errors), "worker_pid": r["worker_pid"]} for r in runs])
    return summary


@task(name="supporter_rollouts", cache_policy=NO_CACHE, persist_result=False)
def rollouts_task(
    dialogues_path: Path,
    out: Path,
    cfg: TrainSupporterConfig,
    simulate_cfg: Any,
    supporter: ModelConfig,
    seeker: ModelConfig,
    tvd: ModelConfig | None,
    rg: ModelConfig | None,
    emotion_cfg: Any | None,
    out_dir: Path,
    use_cache: bool,
    seed: int,
    orchestration: OrchestrationConfig | None = None,
) -> dict[str, Any]:
    """Look-ahead rollouts of both candidates of each turn. The rollouts file is resumable
    (candidates already in it are skipped), so Prefect does not cache this task. With a dask or
    ray `orchestration` the shards run on the cluster (`rollouts_on_runner`)."""
    from esvr.flows.task_runners import shard_runs, uses_cluster
    from esvr.tasks.preferences import rollout_candidates
    from esvr.tasks.simulate import load_dialogues

    by_split = dialogues_by_split(load_dialogues(dialogues_path), cfg.dpo_max_dialogues)
    chosen = [d for s in SPLITS for d in by_split[s]]
    if orchestration is not None and uses_cluster(orchestration):
        roles = {"supporter": supporter, "seeker": seeker, "tvd": tvd, "rg": rg}
        summary = rollouts_on_runner(chosen, out, cfg, simulate_cfg, roles, emotion_cfg, out_dir, use_cache, seed, orchestration)
        return {"path": str(out), "dialogues": len(chosen), "metrics": summary.metrics(), "errors": summary.errors,
                "workers": len({r["worker_pid"] for r in shard_runs(out)})}
    with rollout_agents(simulate_cfg, supporter, seeker, tvd, rg, emotion_cfg, out_dir, use_cache) as agents:
        summary = rollout_candidates(
            chosen,
            agents,
            out,
            horizon=cfg.rollout_horizon(),
            concurrency=cfg.rollout_concurrency,
            max_turns_per_dialogue=cfg.dpo_max_turns,
            seed=seed,
        )
    return {"path": str(out), "dialogues": len(chosen), "metrics": summary.metrics(), "errors": summary.errors}


def read_rollouts(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    from esvr.tasks.simulate import read_jsonl_repairing

    rows = read_jsonl_repairing(Path(path))
    for i, r in enumerate(rows, 1):
        for key in ("key", "dialogue_id", "turn", "kind", "at", "continuation"):
            if key not in r:
                raise ValueError(f"{path}: line {i} has no '{key}' field")
        if r["kind"] not in CANDIDATES:
            raise ValueError(f"{path}: line {i}: kind {r['kind']!r} is not one of {CANDIDATES}")
    return rows


@task(
    name="supporter_preferences",
    cache_policy=cache_policy("esvr.tasks.preferences", "esvr.models.value_detector"),
    persist_result=True,
)
def preferences_task(
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
    from esvr.tasks.simulate import load_dialogues

    rollouts_rows = read_rollouts(rollouts)
    dialogues = {str(d["id"]): d for d in load_dialogues(dialogues_path)}
    detect = judge_model = None
    if cfg.reward == "value":
        from esvr.flows.runtime import chat_model
        from esvr.models.value_detector import load_value_detector

        vcfg = value_cfg or ValueDetectorConfig()
        vchat = chat_model(vcfg.model, run_dir, cache=use_cache) if vcfg.backend == "llm" else None
        detect = load_value_detector(vcfg, vchat).detect
    else:
        from esvr.flows.runtime import chat_model

        judge_model = chat_model(judge, run_dir, cache=use_cache)
    scored = score_rollouts(rollouts_rows, dialogues, cfg, detect=detect, judge=judge_model, seed=seed)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "scored_rollouts.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in scored))
    return build_preferences(scored, dialogues, cfg, out_dir)
