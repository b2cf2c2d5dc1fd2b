"""Evaluation (stage 8, paper §6): supporters under test talk with the seeker simulator over the
test personas; LLM judges score the dialogues; every model is compared with a reference supporter.

Per supporter under test (`SupporterUnderTest`):

1. *Dialogues*: the simulation engine of stage 6 (`esvr.tasks.simulation.simulate`) with the same end rules
   ([END], valence + gratitude, the turn limit) writes ``<run>/evaluate/<slug>/dialogues.jsonl``
   (resumable). Template supporters reason in four steps with or without target values and
   references (Table 2's ablation); ``style: plain`` supporters (fine-tuned baselines) answer with
   the utterance alone; ``self_disclosure`` removes or rephrases Self-disclosure turns (App. I).
   The paper scores only dialogues that ended within the limit (``complete_only``).
2. *Judgments* (``judgments.jsonl``): ES-Skills (10 criteria, parsed and expected 1-5 scores),
   ES-Intensity (the seeker's final negative-emotion level, 1-5), mean words per supporter turn.
3. *ES-Value* (``es_value.jsonl``): each model's dialogue against the reference's for the same
   persona, ``value_judgments`` times with the order alternated, from the seeker's and the
   supporter's perspective; win ratio in 0..1, ties half.
4. *Summary* (``<run>/evaluate/summary.json``): per model and metric the mean, the Mann-Whitney U
   p-value against the reference and the paper's mark (* p < 0.05, † p < 0.1). The report stage
   lays it out like Tables 2 and 3.

Significance: ES-Skills and ES-Intensity compare a model's per-dialogue scores with the
reference's (two-sided Mann-Whitney U). ES-Value compares a model's per-persona win ratios r_i with
the reference's 1 - r_i over the same pairs (the paper does not spell its test out; this is the
same test on the same numbers, asking whether one side wins more often than the other).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator, model_validator

from esvr.models.chat import ChatModel
from esvr.models.config import ModelConfig, Section
from esvr.models.emotion import EmotionConfig
from esvr.models.training import TrainConfig
from esvr.tasks.common import roles
from esvr.tasks.common.jsonl import write_jsonl
from esvr.tasks.evaluation.judges import (
    JudgeSettings,
    ajudge_intensity,
    ajudge_skills,
    ajudge_value_pair,
    ajudge_value_single,
    criterion_names,
    perspectives,
)
from esvr.tasks.evaluation.metrics import mann_whitney, mean_or_none, significance_mark, win_ratio_test, words_per_turn
from esvr.tasks.simulation.supporter import reference_used_share

log = logging.getLogger(__name__)


class SupporterUnderTest(Section):
    """One supporter in the comparison (a row of Table 2 or 3)."""

    name: str
    #: the table's category column (Prompt-based, Fine-tuned, Emotion-Reinforced, Ours, ...)
    category: str = "Prompt-based"
    #: its chat model; None = models.supporter. A spec string works: `openai:gpt-4o-mini`
    model: ModelConfig | None = None
    #: a trained component instead of `model`: `mlflow:<run_id>`, an adapter folder with
    #: component.json, or an hf: spec (esvr.tasks.common.roles.model_config)
    component: str | None = None
    #: 'template': the 4-step reasoning supporter of the simulation (paper Table 18);
    #: 'plain': the utterance alone (fine-tuned baselines, trained on that format)
    style: Literal["template", "plain"] = "template"
    #: give it target values from the TVD / references from the RG (Table 2's ablation)
    use_target_values: bool = True
    use_reference: bool = True
    #: TVD / RG models for this supporter; None = the evaluate flow's (the pipeline's trained
    #: components, else simulate.tvd / simulate.rg, else the supporter's own model zero-shot)
    tvd: ModelConfig | None = None
    rg: ModelConfig | None = None
    #: App. I: keep Self-disclosure, remove it (next most probable strategy), or rephrase it as
    #: other people's experience (with models.judge)
    self_disclosure: Literal["keep", "remove", "rephrase"] = "keep"
    #: fine-tune `models.base` on a corpus's supporter turns first (Llama-ESConv/ExTES/Psych8k)
    finetune: Literal["esconv", "extes", "psych8k"] | None = None
    #: the corpus file for `finetune` (ESConv.json, ExTES.json, Psych8k.json)
    finetune_data: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SupporterUnderTest:
        if self.model is not None and self.component is not None:
            raise ValueError(f"supporter {self.name!r}: give either 'model' or 'component', not both")
        if self.finetune is not None and self.finetune_data is None:
            raise ValueError(f"supporter {self.name!r}: 'finetune: {self.finetune}' needs 'finetune_data' (the corpus file)")
        if self.style == "plain" and self.self_disclosure != "keep":
            raise ValueError(f"supporter {self.name!r}: self_disclosure needs the template style (it reads the strategy)")
        return self

    @property
    def slug(self) -> str:
        return slugify(self.name)


class FidelityConfig(Section):
    """Simulator and ES-Intensity predictor fidelity on ESConv (App. E.2 Table 29, App. F.2 Table 11)."""

    #: ESConv.json (or FailedESConv.json); None = skip
    esconv: Path | None = None
    #: candidate seeker simulators; empty = models.seeker, one-shot and zero-shot
    simulators: list[ModelConfig] = []
    #: also try each without the prompt's example dialogue (the paper's zero-/one-shot rows)
    zero_shot: bool = True
    #: fine-tuned seeker simulators (Table 29's Llama-ESConv / Llama-ExTES rows): one row each,
    #: prompted without the example dialogue
    finetuned: list[ModelConfig] = []
    #: models.judge rates each simulated turn's content against the real one, 1-5 (Table 29's GPT column)
    content_judge: bool = True
    #: ESConv dialogues used (None: all); seeker turns per dialogue (None: all)
    max_dialogues: int | None = 50
    max_turns_per_dialogue: int | None = None
    seeker_max_tokens: int = 64
    #: sentence-transformers folder for BERTScore and the sentence cosine (None: all-MiniLM-L6-v2,
    #: bundled; the paper used all-mpnet-base-v2 via BERTScore)
    encoder: str | None = None


class EvaluateConfig(Section):
    """Stage 8. The judge is ``models.judge`` (may differ from the seeker: see docs/evaluation.md)."""

    #: the rows of the comparison, in table order
    supporters: list[SupporterUnderTest] = [
        SupporterUnderTest(name="Supporter (Both)", category="Prompt-based"),
    ]
    #: the supporter every other one is compared with (Table 2: GPT-4o-mini (Both); Table 3: Ours (DPO))
    reference: str = "Supporter (Both)"
    #: personas.jsonl; None = <run>/personas/personas.jsonl
    personas: Path | None = None
    split: Literal["train", "dev", "test"] = "test"
    #: None = every persona of the split (the paper: 120)
    max_personas: int | None = None
    #: supporter turns per dialogue (paper §6.1: 20)
    max_turns: int = 20
    #: judge only dialogues that ended by [END] or valence + gratitude (the paper); off keeps the
    #: cut ones too (the demo's dialogues are too short to end by themselves)
    complete_only: bool = True
    #: settings of stage 6 changed for the evaluation only (e.g. shorter replies on the demo)
    simulate_overrides: dict[str, Any] = {}
    #: ES-Value comparisons per pair (paper App. F.3: 10), order alternated
    value_judgments: int = 10
    #: the judge writes reasoning and then ratings (the paper's prompts), parsed; off: only
    #: score_choices (one forward pass per criterion; what small local judges can do)
    judge_reasoning: bool = True
    judge_max_tokens: int = 600
    #: ES-Value judgments in reasoning mode are sampled (each with its own seed)
    value_temperature: float = 1.0
    #: also rate each dialogue's value reinforcement alone, 1-5 (App. H's check against experts)
    value_single: bool = False
    #: which score the tables show: the parsed rating (paper) or the expected score (finer)
    table_score: Literal["parsed", "expected"] = "parsed"
    #: dialogues judged at once
    concurrency: int = 8
    #: a CSV of human ratings to correlate the judge with (docs/evaluation.md); None = skip
    human_ratings: Path | None = None
    fidelity: FidelityConfig = FidelityConfig()
    #: LoRA settings of the fine-tuned baselines (``finetune:`` rows), from models.base
    finetune_train: TrainConfig = TrainConfig()

    @field_validator("value_judgments")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("value_judgments must be at least 1")
        return v

    @model_validator(mode="after")
    def _reference_listed(self) -> EvaluateConfig:
        names = [s.name for s in self.supporters]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"supporter names must be unique; repeated: {sorted(dup)}")
        slugs = [s.slug for s in self.supporters]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"supporter names must differ in more than punctuation: {names}")
        if names and self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not one of the supporters {names}")
        return self

    def judge_settings(self, seed: int = 0) -> JudgeSettings:
        return JudgeSettings(
            reasoning=self.judge_reasoning,
            max_tokens=self.judge_max_tokens,
            value_temperature=self.value_temperature,
            value_judgments=self.value_judgments,
            value_single=self.value_single,
            concurrency=self.concurrency,
            seed=seed,
        )


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "supporter"


def supporter_texts(dialogue: Mapping[str, Any]) -> list[str]:
    return [u["text"] for u in dialogue["utterances"] if u["role"] == "supporter"]


def evaluable(dialogues: Sequence[Mapping[str, Any]], complete_only: bool) -> list[dict[str, Any]]:
    """The dialogues the judges see: complete ones (paper) or all with at least one supporter turn."""
    return [dict(d) for d in dialogues if (d["complete"] or not complete_only) and supporter_texts(d)]


# --------------------------------------------------------------------------------------------
# Judging
# --------------------------------------------------------------------------------------------


async def _gather_limited(coros: Sequence[Any], limit: int) -> list[Any]:
    sem = asyncio.Semaphore(max(1, limit))

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


def _seed(settings: JudgeSettings, *parts: str) -> int:
    import hashlib

    return int(hashlib.sha256(":".join([str(settings.seed), *parts]).encode()).hexdigest()[:8], 16)


async def ajudge_dialogues(
    judge: ChatModel, dialogues: Sequence[Mapping[str, Any]], settings: JudgeSettings, supporter: str
) -> list[dict[str, Any]]:
    """One record per dialogue: ES-Skills, ES-Intensity, words per turn (and single value scores)."""

    async def one(d: Mapping[str, Any]) -> dict[str, Any]:
        utts = d["utterances"]
        seed = _seed(settings, supporter, str(d["persona_id"]))
        skills, intensity = await asyncio.gather(
            ajudge_skills(judge, utts, settings, seed), ajudge_intensity(judge, utts, settings, seed)
        )
        reply = skills.pop("_reply", None)
        record = {
            "supporter": supporter,
            "persona_id": d["persona_id"],
            "n_turns": d.get("n_turns"),
            "end_reason": d.get("end_reason"),
            "complete": d.get("complete"),
            "words_per_turn": words_per_turn(supporter_texts(d)),
            "skills": skills,
            "intensity": intensity,
            "skills_reply": reply["text"] if reply else None,
        }
        if settings.value_single:
            record["value_single"] = await ajudge_value_single(judge, utts)
        return record

    return await _gather_limited([one(d) for d in dialogues], settings.concurrency)


async def ajudge_values(
    judge: ChatModel,
    test: Sequence[Mapping[str, Any]],
    reference: Sequence[Mapping[str, Any]],
    settings: JudgeSettings,
    supporter: str,
    reference_name: str,
) -> list[dict[str, Any]]:
    """ES-Value records for every persona both supporters have an evaluable dialogue for."""
    ref_by = {d["persona_id"]: d for d in reference}
    pairs = [(d, ref_by[d["persona_id"]]) for d in test if d["persona_id"] in ref_by]

    async def one(d: Mapping[str, Any], r: Mapping[str, Any]) -> dict[str, Any]:
        seed = _seed(settings, "value", supporter, reference_name, str(d["persona_id"]))
        res = await ajudge_value_pair(judge, d["utterances"], r["utterances"], settings, seed)
        return {"supporter": supporter, "reference": reference_name, "persona_id": d["persona_id"], **res}

    return await _gather_limited([one(d, r) for d, r in pairs], settings.concurrency)


# --------------------------------------------------------------------------------------------
# Summary and significance
# --------------------------------------------------------------------------------------------


def _stat(values: Sequence[float], ref_values: Sequence[float] | None) -> dict[str, Any]:
    p = mann_whitney(values, ref_values) if ref_values is not None else None
    return {"mean": mean_or_none(values), "n": len(values), "p": p, "mark": significance_mark(p)}


def summarize(
    judgments: Mapping[str, Sequence[Mapping[str, Any]]],
    values: Mapping[str, Sequence[Mapping[str, Any]]],
    reference: str,
    supporters: Sequence[SupporterUnderTest],
    *,
    dialogues: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    table_score: str = "parsed",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary.json contract the report reads (see docs/evaluation.md).

    `judgments`: per supporter name, its judgments.jsonl records; `values`: per supporter name
    (not the reference), its es_value.jsonl records. Each metric carries the mean over dialogues
    (or pairs), n, the p-value against the reference (Mann-Whitney; ES-Value: Wilcoxon signed-rank
    of the win ratios against 0.5) and the mark; ``skills`` and
    ``intensity`` carry them for the parsed score (``score``) and the expected score (``expected``).
    """
    if reference not in judgments:
        raise ValueError(f"no judgments for the reference supporter {reference!r}")
    ref = judgments[reference]
    models = []
    for s in supporters:
        recs = judgments.get(s.name, [])
        is_ref = s.name == reference
        row: dict[str, Any] = {
            "name": s.name,
            "slug": s.slug,
            "category": s.category,
            "is_reference": is_ref,
            "settings": {
                "style": s.style,
                "use_target_values": s.use_target_values,
                "use_reference": s.use_reference,
                "self_disclosure": s.self_disclosure,
                "finetune": s.finetune,
            },
            "n_dialogues": len(recs),
            "skills": {},
            "intensity": {},
            "value": {},
        }
        if dialogues is not None:
            ds = dialogues.get(s.name, [])
            row["n_simulated"] = len(ds)
            row["n_complete"] = sum(bool(d["complete"]) for d in ds)
            row["end_reasons"] = {k: sum(d["end_reason"] == k for d in ds) for k in sorted({d["end_reason"] for d in ds})}
            row["reference_used_share"] = reference_used_share(ds)
        for crit in criterion_names():
            row["skills"][crit] = {
                kind: _stat([r["skills"][crit][kind] for r in recs], None if is_ref else [r["skills"][crit][kind] for r in ref])
                for kind in ("score", "expected")
            }
        row["intensity"] = {
            "score": _stat([r["intensity"]["level"] for r in recs], None if is_ref else [r["intensity"]["level"] for r in ref]),
            "expected": _stat(
                [r["intensity"]["expected"] for r in recs], None if is_ref else [r["intensity"]["expected"] for r in ref]
            ),
        }
        single = [r for r in recs if r.get("value_single")]
        if single:
            row["value_single"] = {
                k: mean_or_none([r["value_single"][k]["expected"] for r in single]) for k in single[0]["value_single"]
            }
        row["words_per_turn"] = _stat([r["words_per_turn"] for r in recs], None if is_ref else [r["words_per_turn"] for r in ref])
        if not is_ref:
            pairs = values.get(s.name, [])
            for p in perspectives():
                name = p["name"]
                for kind in ("win_ratio", "expected"):
                    ratios = [v[name][kind] for v in pairs]
                    p_value = win_ratio_test(ratios)
                    stat = {"mean": mean_or_none(ratios), "n": len(ratios), "p": p_value, "mark": significance_mark(p_value)}
                    row["value"].setdefault(name, {})[kind] = stat
        models.append(row)
    return {
        "reference": reference,
        "table_score": table_score,
        "criteria": criterion_names(),
        "perspectives": [p["name"] for p in perspectives()],
        "models": models,
        **(dict(extra) if extra else {}),
    }


def summary_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics: ``<slug>.es_skills.<criterion>``, ``.es_intensity``, ``.es_value.<persp>``,
    ``.words_per_turn``, ``.reference_used_share``, ``.n_dialogues`` (parsed scores; ``..._expected``
    for expected ones)."""
    out: dict[str, float] = {}
    for m in summary["models"]:
        slug = m["slug"]
        for crit, st in m["skills"].items():
            for kind, suffix in (("score", ""), ("expected", "_expected")):
                if st[kind]["mean"] is not None:
                    out[f"{slug}.es_skills.{crit}{suffix}"] = st[kind]["mean"]
        for kind, suffix in (("score", ""), ("expected", "_expected")):
            if m["intensity"][kind]["mean"] is not None:
                out[f"{slug}.es_intensity{suffix}"] = m["intensity"][kind]["mean"]
        for persp, st in m["value"].items():
            for kind, suffix in (("win_ratio", ""), ("expected", "_expected")):
                if st[kind]["mean"] is not None:
                    out[f"{slug}.es_value.{persp}{suffix}"] = st[kind]["mean"]
        if m["words_per_turn"]["mean"] is not None:
            out[f"{slug}.words_per_turn"] = m["words_per_turn"]["mean"]
        if m.get("reference_used_share") is not None:
            out[f"{slug}.reference_used_share"] = m["reference_used_share"]
        out[f"{slug}.n_dialogues"] = float(m["n_dialogues"])
    return out


# --------------------------------------------------------------------------------------------
# Agents for a supporter under test (the simulation engine's, with the baseline variants)
# --------------------------------------------------------------------------------------------


def evaluation_simulate_config(simulate_cfg: Any, cfg: EvaluateConfig) -> Any:
    """Stage 6's settings with the evaluation's turn limit and overrides; no alternatives (only
    training needs them)."""
    from esvr.tasks.simulation.simulate import SimulateConfig

    data = {**simulate_cfg.model_dump(), "max_turns": cfg.max_turns, "alternatives": False, **cfg.simulate_overrides}
    try:
        return SimulateConfig.model_validate(data)
    except Exception as exc:  # noqa: BLE001 - any invalid override is the recipe's, named by its key
        raise ValueError(f"evaluate.simulate_overrides: {exc}") from None


def make_agents(
    s: SupporterUnderTest,
    sim_cfg: Any,
    supporter_model: ChatModel,
    seeker_model: ChatModel,
    *,
    tvd_model: ChatModel | None,
    rg_model: ChatModel | None,
    rephraser: ChatModel | None,
    emotion_scorer: Any | None,
) -> Any:
    """The engine's `Agents` for one supporter under test: TVD/RG only where the row uses them,
    and the plain or self-disclosure variants of the supporter.

    The reference generator is conditioned on target values by construction (eq. 2), so a row
    with the reference keeps the detector feeding it even when its supporter is not shown the
    values (Table 2's "+ Reference"); a generator trained without values comes with no detector."""
    from esvr.tasks.evaluation.baselines import PlainSupporter, SelfDisclosureAblation
    from esvr.tasks.simulation.simulate import build_agents

    plain = s.style == "plain"
    tvd = tvd_model if ((s.use_target_values or s.use_reference) and not plain) else None
    rg = rg_model if (s.use_reference and not plain) else None
    names = {"style": s.style, "self_disclosure": s.self_disclosure, "supporter_sees_values": str(s.use_target_values)}
    agents = build_agents(
        sim_cfg, supporter_model, seeker_model, tvd_model=tvd, rg_model=rg, emotion_scorer=emotion_scorer, names=names
    )
    agents.supporter.settings = replace(agents.supporter.settings, sees_target_values=s.use_target_values)
    if plain:
        agents.supporter = PlainSupporter(  # type: ignore[assignment]  # answers as a Supporter does
            supporter_model, max_tokens=min(sim_cfg.supporter_max_tokens, 256), temperature=sim_cfg.supporter_temperature
        )
    elif s.self_disclosure != "keep":
        agents.supporter = SelfDisclosureAblation(  # type: ignore[assignment]  # answers as a Supporter does
            agents.supporter, s.self_disclosure, rephraser, max_tokens=max(sim_cfg.stepwise_max_tokens, 60)
        )
    return agents


# --------------------------------------------------------------------------------------------
# The stage's work, per supporter under test
# --------------------------------------------------------------------------------------------


def evaluation_dialogues(personas: list[dict], out: Path, agents: Any, concurrency: int, seed: int) -> dict[str, Any]:
    """One supporter's dialogues with the test personas -> `out` (resumable: stage 6's engine)."""
    from esvr.tasks.simulation.simulate import simulate_dialogues

    summary = simulate_dialogues(personas, out, agents, concurrency=concurrency, alternatives=False, seed=seed)
    return {
        "path": str(out),
        "written": summary.written,
        "skipped": summary.skipped,
        "errors": summary.errors,
        "metrics": summary.metrics("evaluate.simulate"),
    }


def row_dialogues(
    row: SupporterUnderTest,
    sim_cfg: Any,
    models: Mapping[str, ModelConfig | None],
    emotion_cfg: EmotionConfig | None,
    personas: list[dict],
    out: Path,
    run_dir: Path,
    use_cache: bool,
    seed: int,
) -> dict[str, Any]:
    """`evaluation_dialogues` of one row in this (worker) process, the unit a task runner's worker
    runs: the models (supporter, seeker, judge, tvd, rg; tvd/rg None = the supporter zero-shot)
    come from the process's pool. Adds the agents' ``names`` and the ``worker_pid``."""
    import os

    def load(cfg: ModelConfig) -> ChatModel:
        return roles.chat_model(cfg, run_dir, cache=use_cache)

    sup = load(models["supporter"])  # type: ignore[arg-type]
    agents = make_agents(
        row,
        sim_cfg,
        sup,
        load(models["seeker"]),  # type: ignore[arg-type]
        tvd_model=load(models["tvd"]) if models.get("tvd") is not None else sup,  # type: ignore[arg-type]
        rg_model=load(models["rg"]) if models.get("rg") is not None else sup,  # type: ignore[arg-type]
        rephraser=load(models["judge"]) if row.self_disclosure == "rephrase" else None,  # type: ignore[arg-type]
        emotion_scorer=roles.emotion_scorer(emotion_cfg, run_dir, use_cache),
    )
    try:
        result = evaluation_dialogues(personas, out, agents, sim_cfg.concurrency, seed)
    finally:
        # Rows rarely share a supporter (each fine-tuned or trained one is its own merged model):
        # a worker that kept every row's models held ~5 GB after four rows of the rehearsal.
        roles.release_models()
    return {**result, "names": {k: agents.names.get(k) for k in ("supporter", "tvd", "rg")}, "worker_pid": os.getpid()}


class Judging(Section):
    """The judge and what it is shown: the same for every supporter of one evaluation."""

    judge: ModelConfig
    #: judge only the dialogues that ended on their own (not cut by the turn limit)
    complete_only: bool
    #: `JudgeSettings` as a dict (a task input: keyed by value)
    settings: dict[str, Any]

    def dialogues(self, path: Path) -> list[dict[str, Any]]:
        from esvr.tasks.simulation.simulate import load_dialogues

        return evaluable(load_dialogues(path), self.complete_only)

    def judged(
        self,
        run_dir: Path,
        use_cache: bool,
        out: Path,
        judging: Callable[[ChatModel, JudgeSettings], Awaitable[list[dict[str, Any]]]],
    ) -> str:
        """The records `judging` makes with the judge model -> `out` (JSONL); returns its path."""
        from esvr.tasks.simulation.simulate import run_coroutine

        model = roles.chat_model(self.judge, run_dir, cache=use_cache)
        return str(write_jsonl(run_coroutine(judging(model, JudgeSettings(**self.settings))), out))


def judge_dialogues(judging: Judging, dialogues: Path, supporter: str, out: Path, run_dir: Path, use_cache: bool = True) -> str:
    """ES-Skills, ES-Intensity and words per turn of one supporter's dialogues -> judgments.jsonl."""
    chosen = judging.dialogues(dialogues)
    return judging.judged(run_dir, use_cache, out, lambda model, settings: ajudge_dialogues(model, chosen, settings, supporter))


def judge_values(
    judging: Judging,
    dialogues: Path,
    reference_dialogues: Path,
    supporter: str,
    reference: str,
    out: Path,
    run_dir: Path,
    use_cache: bool = True,
) -> str:
    """ES-Value of one supporter against the reference, per shared persona -> es_value.jsonl."""
    test, ref = judging.dialogues(dialogues), judging.dialogues(reference_dialogues)
    return judging.judged(
        run_dir, use_cache, out, lambda model, settings: ajudge_values(model, test, ref, settings, supporter, reference)
    )
