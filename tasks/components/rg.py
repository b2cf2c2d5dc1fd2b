"""Reference generator (paper §5.2, App. D.2): a supporter reply that promotes given target values.

Given the dialogue history o_1, c_1, ..., o_t and target values v_{t+1} (with their definitions),
the generator writes c_t. It trains by SFT on successful Reddit comments, then by DPO against a
sibling comment (tasks/components/datasets.py builds both datasets). This module holds the prompt (Table 16's
structure), the training config per setting (Table 6), and the two evaluations of App. D.2:

- Table 7: a judge picks which of two systems' replies is closer to the ground-truth comment,
  asked twice with the order of the two replies swapped (position bias shows as a gap between
  the orders).
- Table 8: the same judge compares one system's replies from the original target values with
  its replies from random target values.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from esvr.models.config import ModelConfig, Section
from esvr.models.training import TrainConfig
from esvr.prompts import load_prompt, value_names, values
from esvr.tasks.common.jsonl import read_jsonl, write_jsonl
from esvr.tasks.common.roles import opened_model
from esvr.tasks.components.tvd import EvalSplit, render_history

PROMPT_FILES = [
    "rg/system.txt",
    "rg/user.txt",
    "rg/user_no_values.txt",
    "judge_rg/system.txt",
    "judge_rg/user.txt",
    "judge_rg/user_direct.txt",
]
Setting = Literal["single_turn", "multi_turn"]


def target_values_text(names: Sequence[str]) -> str:
    """Each target value with its definition and contained values (Table 16's 'target values information')."""
    by_name = {v.name: v for v in values()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown value name(s) {unknown}; expected names from prompts/values.yaml")
    return "\n".join(f"- {by_name[n].describe()}" for n in names)


def rg_messages(dialogue_history: str, target_values: Sequence[str] | None) -> list[dict[str, str]]:
    """The generator's prompt: dialogue history and target values -> the therapist's next turn.

    ``None`` (no target values at all, not an empty detection) gives the prompt without values of
    the generator trained without them (App. G.1: the emotion-reinforced variant).
    """
    if target_values is None:
        user = load_prompt("rg/user_no_values.txt").format(dialogue_history=dialogue_history)
    else:
        user = load_prompt("rg/user.txt").format(
            dialogue_history=dialogue_history, target_values=target_values_text(target_values)
        )
    return [
        {"role": "system", "content": load_prompt("rg/system.txt").strip()},
        {"role": "user", "content": user.strip()},
    ]


def random_values(original: Sequence[str], k: int, rng: random.Random) -> list[str]:
    """k values drawn from those not among `original`: Table 8's 'random target values'.

    Drawing outside the original set makes the contrast real; a random set that happened to
    repeat the originals would measure nothing.
    """
    pool = [n for n in value_names() if n not in set(original)]
    return rng.sample(pool, min(k, len(pool)))


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


class RGSettingConfig(Section):
    """SFT then DPO for one setting (Table 6)."""

    sft: TrainConfig
    dpo: TrainConfig


def _table6(lr: float, r: int, alpha: int, dropout: float) -> TrainConfig:
    return TrainConfig(learning_rate=lr, lora_r=r, lora_alpha=alpha, lora_dropout=dropout)


class RGEvalConfig(Section):
    #: test examples evaluated (None: the whole test split; the paper used its 1,000)
    max_examples: int | None = None
    #: tokens per generated reply (Reddit comments run long; the demo keeps them short)
    max_new_tokens: int = 256
    #: Table 7: (vanilla base vs SFT) and (SFT vs DPO); Table 8: original vs random values
    compare_systems: bool = True
    compare_random_values: bool = True
    #: 'generate': the judge reasons and then names a comment (Table 17, for API models);
    #: 'score': the judge's log-probabilities of 'Comment A' / 'Comment B' decide (robust on small
    #: local models, one forward pass)
    judge_method: Literal["generate", "score"] = "generate"
    max_judge_tokens: int = 384


class TrainRGConfig(Section):
    """Training and evaluation of the reference generator, per setting."""

    settings: list[Setting] = ["single_turn", "multi_turn"]
    single_turn: RGSettingConfig = RGSettingConfig(sft=_table6(1e-4, 8, 8, 0.1), dpo=_table6(1e-5, 8, 16, 0.05))
    multi_turn: RGSettingConfig = RGSettingConfig(sft=_table6(1e-5, 8, 16, 0.05), dpo=_table6(1e-5, 8, 16, 0.05))
    #: the setting whose DPO model the simulation uses: the paper kept single-turn (App. D.2)
    final_setting: Setting = "single_turn"
    #: false: the generator of the emotion-reinforced variant (App. G.1): SFT only, on the same
    #: comments that raised the OP's emotion, with the prompt that names no target values
    #: (prompts/rg/user_no_values.txt); Table 7 compares it with the base, Table 8 does not apply
    with_values: bool = True
    #: the judge of Tables 7-8 (a chat model spec; 'judge' = config.models.judge)
    judge: str = "judge"
    eval: RGEvalConfig = RGEvalConfig()

    def for_setting(self, setting: Setting) -> RGSettingConfig:
        return getattr(self, setting)


# --------------------------------------------------------------------------------------------
# Pairwise judge with order swap
# --------------------------------------------------------------------------------------------

_CHOICES = ("Comment A", "Comment B")
_VERDICT = re.compile(r"similar\s+comment\s*:?\s*\**\s*(?:comment\s*)?([ab])\b", re.IGNORECASE)
_ANY = re.compile(r"comment\s*([ab])\b", re.IGNORECASE)


def judge_messages(thread: str, ground_truth: str, comment_a: str, comment_b: str, method: str) -> list[dict[str, str]]:
    template = load_prompt("judge_rg/user.txt" if method == "generate" else "judge_rg/user_direct.txt")
    user = template.format(thread=thread, ground_truth=ground_truth, comment_a=comment_a, comment_b=comment_b)
    return [
        {"role": "system", "content": load_prompt("judge_rg/system.txt").strip()},
        {"role": "user", "content": user.strip()},
    ]


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or None from a judge's answer: the 'Similar comment:' line, else the last mention."""
    m = _VERDICT.findall(text)
    if m:
        return m[-1].upper()
    m = _ANY.findall(text)
    return m[-1].upper() if m else None


@dataclass
class PairwiseResult:
    """Wins of systems X and Y per order (Tables 7-8). Order 1 shows X as Comment A."""

    x: str
    y: str
    order1: dict[str, int] = field(default_factory=dict)
    order2: dict[str, int] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self, prefix: str) -> dict[str, float]:
        out: dict[str, float] = {}
        total_x = total_y = 0
        for order, counts in (("order1", self.order1), ("order2", self.order2)):
            for who in (self.x, self.y, "invalid"):
                out[f"{prefix}.{order}.{who}"] = float(counts.get(who, 0))
            total_x += counts.get(self.x, 0)
            total_y += counts.get(self.y, 0)
        decided = total_x + total_y
        out[f"{prefix}.win_rate.{self.y}"] = total_y / decided if decided else 0.5
        return out


def pairwise_compare(
    judge: Any,
    items: Sequence[dict[str, Any]],
    replies_x: Sequence[str],
    replies_y: Sequence[str],
    *,
    x: str,
    y: str,
    method: Literal["generate", "score"] = "generate",
    max_tokens: int = 384,
) -> PairwiseResult:
    """Ask `judge` (a ChatModel) which reply is closer to the ground truth, in both orders.

    `items` carry ``thread`` (rendered history) and ``ground_truth``. Order 1 shows X's reply as
    Comment A and Y's as B; order 2 swaps them; each verdict is counted for the system behind the
    chosen letter. Unparseable verdicts count as 'invalid'.
    """
    from esvr.models.chat import ChatRequest

    if not (len(items) == len(replies_x) == len(replies_y)):
        raise ValueError(f"{len(items)} items but {len(replies_x)} and {len(replies_y)} replies")
    result = PairwiseResult(x=x, y=y, order1={x: 0, y: 0, "invalid": 0}, order2={x: 0, y: 0, "invalid": 0})
    for order, counts in (("order1", result.order1), ("order2", result.order2)):
        pairs = [(rx, ry) if order == "order1" else (ry, rx) for rx, ry in zip(replies_x, replies_y)]
        names = (x, y) if order == "order1" else (y, x)
        prompts = [judge_messages(it["thread"], it["ground_truth"], a, b, method) for it, (a, b) in zip(items, pairs)]
        if method == "generate":
            answers = [r[0] for r in judge.chat_batch([ChatRequest.build(p, max_tokens=max_tokens) for p in prompts])]
            letters = [parse_verdict(a) for a in answers]
        else:
            dists = [judge.score_choices(p, list(_CHOICES)) for p in prompts]
            answers = [f"{d[_CHOICES[0]]:.4f}/{d[_CHOICES[1]]:.4f}" for d in dists]
            letters = ["A" if d[_CHOICES[0]] >= d[_CHOICES[1]] else "B" for d in dists]
        for it, answer, letter in zip(items, answers, letters):
            winner = "invalid" if letter is None else names[0] if letter == "A" else names[1]
            counts[winner] += 1
            result.rows.append({"example_id": it.get("example_id"), "order": order, "winner": winner, "answer": answer})
    return result


def generate_replies(
    model: Any, histories: Sequence[str], target_sets: Sequence[Sequence[str] | None], max_tokens: int
) -> list[str]:
    """Greedy replies of a generator (a ChatModel) for rendered histories and target values."""
    from esvr.models.chat import ChatRequest

    requests = [
        ChatRequest.build(rg_messages(h, v), temperature=0.0, max_tokens=max_tokens) for h, v in zip(histories, target_sets)
    ]
    return [r[0].strip() for r in model.chat_batch(requests)] if requests else []


def eval_items(split: EvalSplit) -> list[dict[str, Any]]:
    """The judge's view of RG test rows: rendered thread, ground-truth comment, target values."""
    return [
        {
            "example_id": ex["example_id"],
            "thread": render_history(ex["history"], split.max_chars),
            "ground_truth": ex["reply"],
            "target_values": list(ex["target_values"]),
        }
        for ex in split.examples()
    ]


# --------------------------------------------------------------------------------------------
# The stage's datasets and evaluation (Tables 7 and 8)
# --------------------------------------------------------------------------------------------


def without_target_values(data: Path, out: Path, max_chars: int | None) -> str:
    """The RG-SFT dataset with every prompt rebuilt without target values (App. G.1), saved to `out`.

    Rows, splits and completions stay as they are: the same comments that raised the OP's
    emotion, so the two generators differ only in what their prompt tells them.
    """
    from datasets import load_from_disk

    ds = load_from_disk(str(data))
    stripped = ds.map(lambda row: {"prompt": rg_messages(render_history(row["history"], max_chars), None)})
    stripped.save_to_disk(str(out), num_shards={split: 1 for split in stripped})
    return str(out)


def rg_generate(
    model: ModelConfig,
    split: EvalSplit,
    values_mode: str,
    max_new_tokens: int,
    out: Path,
    run_dir: str,
    use_cache: bool,
) -> str:
    """Replies of one generator on the RG test split, from the 'original' or 'random' target values,
    or with no values in the prompt ('none': the generator trained without values, App. G.1).

    Random values are seeded per example, so every system gets the same random set for an example.
    """
    if values_mode not in ("original", "random", "none"):
        raise ValueError(f"values_mode must be 'original', 'random' or 'none', got {values_mode!r}")
    items = eval_items(split)
    targets: list[list[str] | None] = [
        None
        if values_mode == "none"
        else it["target_values"]
        if values_mode == "original"
        else random_values(it["target_values"], len(it["target_values"]) or 3, random.Random(f"{split.seed}:{it['example_id']}"))
        for it in items
    ]
    with opened_model(model, Path(run_dir), use_cache) as chat:
        replies = generate_replies(chat, [it["thread"] for it in items], targets, max_new_tokens)
    rows = [
        {"example_id": it["example_id"], "target_values": t, "values_mode": values_mode, "model": model.spec, "reply": r}
        for it, t, r in zip(items, targets, replies)
    ]
    return str(write_jsonl(rows, out))


def rg_judge(
    judge: ModelConfig,
    split: EvalSplit,
    replies_x: Path,
    replies_y: Path,
    x: str,
    y: str,
    cfg: RGEvalConfig,
    out: Path,
    run_dir: str,
    use_cache: bool,
) -> dict[str, Any]:
    """Pairwise judgement of two reply files in both orders; verdicts go to `out` (JSONL)."""
    items = eval_items(split)
    by_x = {r["example_id"]: r["reply"] for r in read_jsonl(replies_x)}
    by_y = {r["example_id"]: r["reply"] for r in read_jsonl(replies_y)}
    missing = [it["example_id"] for it in items if it["example_id"] not in by_x or it["example_id"] not in by_y]
    if missing:
        raise ValueError(f"replies for {len(missing)} test example(s) missing in {replies_x} or {replies_y}: {missing[:3]}")
    with opened_model(judge, Path(run_dir), use_cache) as chat:
        result = pairwise_compare(
            chat,
            items,
            [by_x[it["example_id"]] for it in items],
            [by_y[it["example_id"]] for it in items],
            x=x,
            y=y,
            method=cfg.judge_method,
            max_tokens=cfg.max_judge_tokens,
        )
    write_jsonl(result.rows, out)
    return {"x": x, "y": y, "order1": result.order1, "order2": result.order2, "verdicts": str(out)}


def pairwise_markdown(title: str, results: Sequence[dict[str, Any]]) -> str:
    """Judge results as Tables 7-8: per comparison, wins of each system in order 1 and order 2."""
    lines = [f"### {title}", "", "| comparison | order | X | wins X | Y | wins Y | invalid |", "|---|---|---|---|---|---|---|"]
    for r in results:
        label = r.get("label", f"{r['x']}_vs_{r['y']}")
        for order in ("order1", "order2"):
            c = r[order]
            lines.append(
                f"| {label} | {order} | {r['x']} | {c.get(r['x'], 0)} | {r['y']} | {c.get(r['y'], 0)} | {c.get('invalid', 0)} |"
            )
    return "\n".join(lines) + "\n"
