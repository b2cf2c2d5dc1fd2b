"""Target value detector (paper §5.1, App. D.1): which values to reinforce in the seeker next.

Given the dialogue history o_1, c_1, ..., o_t, the detector names up to three of the 20 values
(v_{t+1}); the gold answer is the top-3 values the OP expressed in o_{t+1} after a successful
comment. This module holds the prompt (Table 15's structure), the parser of a generated value
list, the set-based precision/recall/F1 of Table 5, and the evaluation of any chat model on the
test split (the trained detector and the prompt baselines alike).

The simulation reuses `render_history`, `tvd_messages` and `parse_value_list` so that the detector
sees the same prompt at simulation time as in training.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from esvr.models.config import ModelConfig, Section
from esvr.models.training import TrainConfig
from esvr.prompts import load_prompt, value_names, values
from esvr.tasks.common.jsonl import write_jsonl
from esvr.tasks.common.roles import opened_model

# Speaker labels in prompts. The paper frames Reddit threads as patient/therapist talk (Tables
# 15-17), and the simulation uses the same labels for seeker/supporter, so both see one format.
_SPEAKER = {
    "op": "Patient",
    "seeker": "Patient",
    "user": "Patient",
    "commenter": "Therapist",
    "supporter": "Therapist",
    "assistant": "Therapist",
}

PROMPT_FILES = ["tvd/system.txt", "tvd/user.txt", "tvd/user_reasoning.txt"]
Variant = Literal["zero_shot", "value_info", "reasoning"]


def truncate(text: str, max_chars: int | None) -> str:
    text = " ".join(text.split())
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[: max(0, max_chars - 3)].rstrip() + "..."


def render_history(turns: Iterable[dict[str, Any]], max_chars: int | None = None) -> str:
    """``[{'role': 'op', 'text': ...}, ...]`` -> 'Patient: ...' / 'Therapist: ...' lines.

    Roles may be Reddit's (op/commenter), the simulation's (seeker/supporter) or chat roles
    (user/assistant). `max_chars` bounds each utterance so one long post cannot fill the context.
    """
    lines = []
    for i, turn in enumerate(turns):
        role = turn.get("role")
        if role not in _SPEAKER:
            raise ValueError(f"history turn {i}: unknown role {role!r}; expected one of {sorted(_SPEAKER)}")
        text = turn.get("text", turn.get("content", ""))
        lines.append(f"{_SPEAKER[role]}: {truncate(text, max_chars)}")
    return "\n".join(lines)


def value_list_text(with_definitions: bool) -> str:
    if with_definitions:
        return "\n".join(f"- {v.describe()}" for v in values())
    return "\n".join(f"- {name}" for name in value_names())


def tvd_messages(dialogue_history: str, variant: Variant = "zero_shot") -> list[dict[str, str]]:
    """The detector's prompt (Table 15's structure). The trained detector uses 'zero_shot'.

    'value_info' adds each value's definition (Table 5's "+ Value information" baseline);
    'reasoning' asks for a short analysis before the answer line (Table 5's "+ Reasoning").
    """
    template = load_prompt("tvd/user_reasoning.txt" if variant == "reasoning" else "tvd/user.txt")
    user = template.format(value_list=value_list_text(variant == "value_info"), dialogue_history=dialogue_history)
    return [
        {"role": "system", "content": load_prompt("tvd/system.txt").strip()},
        {"role": "user", "content": user.strip()},
    ]


def format_value_list(names: Sequence[str]) -> str:
    """The detector's target completion: 'v1, v2, v3', most probable first."""
    return ", ".join(names)


# --------------------------------------------------------------------------------------------
# Parsing generated value lists
# --------------------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


_SEGMENT_SPLIT = re.compile(r"[,;\n|]|\band\b|\s\d+[.)]\s", re.IGNORECASE)
_ANSWER_LINE = re.compile(r"^[\s*#]*(?:final\s+|target\s+)?values?\s*\**\s*:\s*(.+)$", re.IGNORECASE | re.MULTILINE)
_STRIP = re.compile(r"^[\s\-*\u2022\d.)(\"'`]+|[\s.\"'`*]+$")


def parse_value_list(text: str, max_values: int = 3) -> list[str]:
    """The value names a generated answer mentions, canonical spelling, in order, at most `max_values`.

    Robust to what small models write: any case, bullets and numbering, missing or extra
    punctuation ('self direction action'), small typos (matched with difflib at 0.8), a trailing
    'Values:' line after some reasoning, and names embedded in a sentence. Words that match no
    value (or only a family like 'Security' without its sub-value) are ignored.
    """
    names = value_names()
    by_norm = {_norm(n): n for n in names}
    # A reasoning answer ends with a 'Values: ...' line; only that line counts when present.
    answer_lines = _ANSWER_LINE.findall(text)
    if answer_lines:
        text = answer_lines[-1]
    found: list[str] = []

    def add(name: str) -> None:
        if name not in found:
            found.append(name)

    for raw in _SEGMENT_SPLIT.split(" " + text):
        segment = _STRIP.sub("", raw)
        key = _norm(segment)
        if not key:
            continue
        if key in by_norm:
            add(by_norm[key])
            continue
        close = difflib.get_close_matches(key, list(by_norm), n=1, cutoff=0.8)
        if close:
            add(by_norm[close[0]])
            continue
        # Names inside a longer sentence, in order of appearance; longest first so that
        # 'Self-direction: thought' is not also read as something shorter.
        hits: list[tuple[int, int, str]] = []
        for k, name in sorted(by_norm.items(), key=lambda kv: -len(kv[0])):
            pos = key.find(k)
            if pos >= 0 and not any(s <= pos < e for s, e, _ in hits):
                hits.append((pos, pos + len(k), name))
        for _, _, name in sorted(hits):
            add(name)
    return found[:max_values]


# --------------------------------------------------------------------------------------------
# Reading the detector: generated list, or its ranking of the 20 names
# --------------------------------------------------------------------------------------------

#: 'generate': greedy decoding, parsed with `parse_value_list` (the paper's way). 'score': the
#: detector's distribution over the 20 value names as the first item of its answer (one forward
#: pass, `score_choices`); the top k stand in for the list. The detector is trained to put the most
#: probable value first, so this reads its ranking even when a small model, a few steps into
#: training, does not yet write a list the parser accepts (the demo's 135M model).
TVDMethod = Literal["generate", "score"]


def top_ranked(dist: Mapping[str, float], k: int = 3) -> list[str]:
    """The k most probable names of a `score_choices` distribution, most probable first."""
    return [name for name, _ in sorted(dist.items(), key=lambda kv: -kv[1])[:k]]


async def adetect_values(
    model: Any,
    messages: list[dict[str, str]],
    method: TVDMethod = "generate",
    max_tokens: int = 48,
    seed: int | None = None,
    k: int = 3,
) -> tuple[list[str], str]:
    """(target values, the raw reply) from a detector chat model, by `method`."""
    if method == "score":
        found = top_ranked(await model.ascore_choices(messages, value_names()), k)
        return found, format_value_list(found)
    out = await model.achat(messages, n=1, temperature=0.0, max_tokens=max_tokens, seed=seed)
    reply = out[0] if out else ""
    return parse_value_list(reply, k), reply


# --------------------------------------------------------------------------------------------
# Precision / recall / F1 of predicted value sets (Table 5)
# --------------------------------------------------------------------------------------------


def set_prf(predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict[str, float]:
    """Precision, recall and F1 of predicted value sets against gold sets.

    Pooled over examples (micro): precision = sum |P∩G| / sum |P|, recall = sum |P∩G| / sum |G|,
    F1 = their harmonic mean. The paper's Table 5 F1 is the harmonic mean of its P and R
    (e.g. 0.516, 0.540 -> 0.528), which this matches; an empty prediction then lowers recall
    without making precision undefined. The example-averaged (macro) figures come alongside.
    sklearn's ``precision_recall_fscore_support`` over binarized sets: ``micro`` and ``samples``.
    Gold sets are the values observed in the OP's reply (up to 3), so recall can exceed precision.
    """
    from sklearn.metrics import precision_recall_fscore_support
    from sklearn.preprocessing import MultiLabelBinarizer

    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} gold sets")
    n = len(gold)
    classes = sorted({v for s in (*predicted, *gold) for v in s})
    scores = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "macro_precision": 0.0, "macro_recall": 0.0, "macro_f1": 0.0}
    if n and classes:  # sklearn needs at least one example and one label
        # a column no set holds changes no count and keeps one-label data multilabel for sklearn
        mlb = MultiLabelBinarizer(classes=[*classes, "\0"])
        y_true, y_pred = mlb.fit_transform(gold), mlb.transform(predicted)
        # an empty set counts as 0 (not undefined) on the side it empties
        for average, prefix in (("micro", ""), ("samples", "macro_")):
            p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
            scores.update({f"{prefix}precision": float(p), f"{prefix}recall": float(r), f"{prefix}f1": float(f)})
    return {
        **scores,
        "n": float(n),
        "empty_predictions": float(sum(1 for p in predicted if not p)),
    }


# --------------------------------------------------------------------------------------------
# Config and evaluation
# --------------------------------------------------------------------------------------------


class TVDEvalConfig(Section):
    #: test examples evaluated (None: the whole test split; the paper used its 1,000)
    max_examples: int | None = None
    #: three value names fit in ~25 tokens; reasoning answers get `max_new_tokens_reasoning`
    max_new_tokens: int = 32
    max_new_tokens_reasoning: int = 256
    #: prompt baselines evaluated on the same split: chat model specs, 'base' = the untrained
    #: checkpoint the detector starts from (the paper: Llama-3-8B-Instruct and GPT-4o-mini)
    baselines: list[str] = ["base"]
    #: Table 5's prompt variants for the baselines
    variants: list[Variant] = ["zero_shot", "value_info"]
    #: how predictions are read (see TVDMethod); 'score' ignores the reasoning variant's analysis
    method: TVDMethod = "generate"


class TrainTVDConfig(Section):
    """Training and evaluation of the target value detector."""

    #: the detector runs at every turn of a simulated dialogue, so it learns from multi-turn data
    setting: Literal["single_turn", "multi_turn"] = "multi_turn"
    #: App. D.1: LoRA r 8, alpha 16, lr 5e-5 (dropout and target modules are not reported)
    train: TrainConfig = TrainConfig(learning_rate=5e-5, lora_r=8, lora_alpha=16)
    eval: TVDEvalConfig = TVDEvalConfig()


@dataclass
class TVDEvaluation:
    name: str
    metrics: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)


def evaluate_tvd(
    model: Any,
    examples: Sequence[dict[str, Any]],
    *,
    name: str,
    variant: Variant = "zero_shot",
    max_new_tokens: int = 32,
    max_chars_per_utterance: int | None = None,
    method: TVDMethod = "generate",
) -> TVDEvaluation:
    """Greedy predictions of `model` (a ChatModel) on TVD examples, scored with `set_prf`.

    `examples` are rows of the TVD dataset (they carry `history` and `target_values`); the prompt
    is rebuilt from the history so that baselines can get another variant than the training one.
    """
    from esvr.models.chat import ChatRequest

    prompts = [tvd_messages(render_history(ex["history"], max_chars_per_utterance), variant) for ex in examples]
    if method == "score":
        predicted = [top_ranked(model.score_choices(p, value_names())) for p in prompts]
        replies = [format_value_list(p) for p in predicted]
    else:
        requests = [ChatRequest.build(p, temperature=0.0, max_tokens=max_new_tokens) for p in prompts]
        replies = [r[0] for r in model.chat_batch(requests)] if requests else []
        predicted = [parse_value_list(r) for r in replies]
    gold = [list(ex["target_values"]) for ex in examples]
    rows = [
        {"example_id": ex["example_id"], "reply": r, "predicted": p, "gold": g}
        for ex, r, p, g in zip(examples, replies, predicted, gold)
    ]
    return TVDEvaluation(name=name, metrics=set_prf(predicted, gold), rows=rows)


# --------------------------------------------------------------------------------------------
# The stage's evaluation (Table 5)
# --------------------------------------------------------------------------------------------


def eval_examples(data: Path, max_examples: int | None, seed: int) -> list[dict[str, Any]]:
    """The evaluated rows of a saved dataset's test split: all, or a seeded sample of `max_examples`."""
    from datasets import load_from_disk

    ds = load_from_disk(str(data))
    if "test" not in ds:
        raise ValueError(f"{data}: no 'test' split; has {list(ds)}")
    test = ds["test"]
    if max_examples is not None and len(test) > max_examples:
        test = test.shuffle(seed=seed).select(range(max_examples))
    return list(test)


class EvalSplit(Section):
    """The test rows every system of one comparison is scored on, and how long a rendered
    utterance may be. As a task input the dataset counts by its content, the rest by value."""

    data: Path
    #: None: the whole test split; else a sample of this many, the same for every system
    max_examples: int | None = None
    seed: int = 0
    max_chars: int | None = None

    def examples(self) -> list[dict[str, Any]]:
        return eval_examples(self.data, self.max_examples, self.seed)


def tvd_eval(
    model: ModelConfig,
    split: EvalSplit,
    name: str,
    variant: Variant,
    cfg: TVDEvalConfig,
    out: Path,
    run_dir: str,
    use_cache: bool,
) -> dict[str, Any]:
    """Evaluate one system x prompt variant on the TVD test split; predictions go to `out` (JSONL)."""
    examples = split.examples()
    tokens = cfg.max_new_tokens_reasoning if variant == "reasoning" else cfg.max_new_tokens
    with opened_model(model, Path(run_dir), use_cache) as chat:
        result = evaluate_tvd(
            chat,
            examples,
            name=name,
            variant=variant,
            max_new_tokens=tokens,
            max_chars_per_utterance=split.max_chars,
            method=cfg.method,
        )
    write_jsonl(result.rows, out)
    return {"name": name, "variant": variant, "model": model.spec, "metrics": result.metrics, "predictions": str(out)}


def table5_markdown(results: Sequence[dict[str, Any]]) -> str:
    """The evaluation as Table 5: one row per system and prompt variant."""
    lines = ["| system | prompt | precision | recall | F1 | n |", "|---|---|---|---|---|---|"]
    for r in results:
        m = r["metrics"]
        lines.append(
            f"| {r['name']} | {r['variant']} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {int(m['n'])} |"
        )
    return "\n".join(lines) + "\n"
