"""SFT data for the supporter from simulated dialogues (paper §5.3, App. D.3, Tables 9 and 10).

Every supporter turn gives up to two examples with the same prompt (the Table-18 prompt for the
turn's history, target values and reference): the initial reply and the alternative reply (reversed
Step-3 decision, Steps 1-2 kept, Steps 3-4 regenerated). The completion is the reply in the
canonical template (`render_reply`), so the fine-tuned model learns one exact format.

Filter (Table 9): an example whose Step-4 strategy is not one of the 8 strategies the prompt asks
for is dropped (its `strategy` is None after parsing). Table 10: the strategy distribution of the
initial and the alternative replies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from esvr.tasks.common.jsonl import write_jsonl
from esvr.tasks.simulation.supporter import SupporterReply, render_reply, strategy_names, supporter_messages


def turn_prompt(dialogue: Mapping[str, Any], turn: Mapping[str, Any]) -> list[dict[str, str]]:
    """The supporter's prompt at a recorded turn (history = the utterances before it)."""
    history = [{"role": u["role"], "text": u["text"]} for u in dialogue["utterances"][: turn["at"]]]
    return supporter_messages(history, turn["target_values"], turn["reference"])


def initial_reply(turn: Mapping[str, Any]) -> SupporterReply:
    steps = turn["steps"]
    return SupporterReply(
        step1=steps["step1"],
        step2=steps["step2"],
        step3=steps["step3"],
        reference_used=turn["reference_used"],
        strategy_raw=turn["strategy_raw"],
        strategy=turn["strategy"],
        response=turn["response"],
        method=turn.get("method", "template"),
    )


def sft_examples(
    dialogues: Iterable[Mapping[str, Any]], *, include_stepwise: bool = True
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(examples, stats). Stats hold Table 9's counts and Table 10's strategy distribution."""
    examples: list[dict[str, Any]] = []
    n_dialogues = n_turns = n_candidates = 0
    dropped: Counter[str] = Counter()
    dist: dict[str, Counter[str]] = {"initial": Counter(), "alternative": Counter()}
    for d in dialogues:
        n_dialogues += 1
        for t in d["turns"]:
            if t.get("failed"):
                continue
            n_turns += 1
            prompt = turn_prompt(d, t)
            replies = [("initial", initial_reply(t))]
            if t.get("alternative"):
                replies.append(("alternative", SupporterReply.from_record(t["alternative"])))
            for kind, reply in replies:
                n_candidates += 1
                if reply.strategy is None:
                    dropped["strategy_mismatch"] += 1
                    continue
                if reply.method == "stepwise" and not include_stepwise:
                    dropped["stepwise"] += 1
                    continue
                dist[kind][reply.strategy] += 1
                examples.append(
                    {
                        "prompt": prompt,
                        "completion": [{"role": "assistant", "content": render_reply(reply)}],
                        "dialogue_id": d["id"],
                        "split": d.get("split"),
                        "turn": t["turn"],
                        "kind": kind,
                        "strategy": reply.strategy,
                        "reference_used": reply.reference_used,
                        "method": reply.method,
                    }
                )
    table10 = {}
    for kind, counts in dist.items():
        total = sum(counts.values())
        table10[kind] = {
            s: {"count": counts[s], "pct": round(100 * counts[s] / total, 1) if total else 0.0} for s in strategy_names()
        }
    stats = {
        "dialogues": n_dialogues,
        "turns": n_turns,
        "examples_before_filter": n_candidates,
        "examples": len(examples),
        "dropped": dict(dropped),
        "strategy_distribution": table10,
    }
    return examples, stats


def export_sft(
    dialogues_by_split: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path, *, include_stepwise: bool = True
) -> dict[str, Any]:
    """Writes ``sft_<split>.jsonl`` (TRL conversational prompt/completion) and ``sft_stats.json``.

    Returns {'paths': {split: path}, 'stats': {split: stats}}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, stats = {}, {}
    for split, dialogues in dialogues_by_split.items():
        examples, st = sft_examples(dialogues, include_stepwise=include_stepwise)
        path = write_jsonl(examples, out_dir / f"sft_{split}.jsonl")
        paths[split], stats[split] = str(path), st
    (out_dir / "sft_stats.json").write_bytes(orjson.dumps(stats, option=orjson.OPT_INDENT_2))
    (out_dir / "sft_strategies.md").write_text(strategy_table(stats))
    return {"paths": paths, "stats": stats, "stats_path": str(out_dir / "sft_stats.json")}


def strategy_table(stats: Mapping[str, Mapping[str, Any]]) -> str:
    """Table 10 as markdown, one block per split."""
    lines = []
    for split, st in stats.items():
        lines += [
            f"### {split}: {st['dialogues']} dialogues, {st['turns']} turns, "
            f"{st['examples_before_filter']} examples, {st['examples']} after the strategy filter",
            "",
            "| strategy | initial | % | alternative | % |",
            "|---|---:|---:|---:|---:|",
        ]
        d = st["strategy_distribution"]
        for s in strategy_names():
            i, a = d["initial"][s], d["alternative"][s]
            lines.append(f"| {s} | {i['count']} | {i['pct']} | {a['count']} | {a['pct']} |")
        lines.append("")
    return "\n".join(lines)


def sft_metrics(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    m: dict[str, float] = {}
    for split, st in stats.items():
        for k in ("dialogues", "turns", "examples_before_filter", "examples"):
            m[f"sft.{split}.{k}"] = st[k]
        for kind, counts in st["strategy_distribution"].items():
            for s, c in counts.items():
                m[f"sft.{split}.{kind}.{s}"] = c["count"]
    return m
