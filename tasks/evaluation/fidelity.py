"""How far the evaluation's instruments can be trusted (paper App. E.2, F.2, H).

- `simulator_fidelity` (Table 29): a candidate seeker simulator gets the real context of an ESConv
  dialogue up to each seeker turn and writes that turn; its utterances are compared with the real
  ones on length (Spearman of word counts), content (cosine of sentence embeddings; the paper used
  BERTScore with all-mpnet-base-v2), emotion (Spearman of sentiment classes V-oc and valence
  V-reg from the emotion scorer) and values (cosine and Euclidean distance of the value
  detector's 20 probabilities, averaged over turns).
- `intensity_validation` (Table 11): the ES-Intensity judge on ESConv dialogues against the
  seekers' own final intensity ratings: accuracy, weighted F1, MSE, Spearman; the paper's
  baseline predicts 2 for everything.
- `judge_vs_human` (Table 13): Spearman correlation per criterion between a user's human ratings
  (CSV, format in docs/evaluation.md) and the judge's scores in an evaluation folder.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from esvr.models.chat import ChatModel, Message
from esvr.prompts import load_prompt
from esvr.tasks.evaluation.metrics import classification_metrics, cosine, euclidean, significance_mark, spearman, word_count

# --------------------------------------------------------------------------------------------
# Table 29: seeker simulators against real seeker turns
# --------------------------------------------------------------------------------------------


def seeker_prompt(persona: Mapping[str, Any], one_shot: bool) -> str:
    """The seeker simulator's system prompt (stage 6's file); zero-shot drops the example paragraph."""
    marker = "\x00EXAMPLE\x00"
    text = (
        load_prompt("seeker/system.txt")
        .strip()
        .format(
            problem=persona.get("problem") or "an emotional difficulty",
            emotion=str(persona.get("emotion") or "distress").lower(),
            age=persona.get("age") or "unspecified",
            gender=persona.get("gender") or "unspecified",
            occupation=persona.get("occupation") or "unspecified",
            example=load_prompt("seeker/example.txt").strip() if one_shot else marker,
        )
    )
    if not one_shot:
        text = "\n\n".join(p for p in text.split("\n\n") if marker not in p)
    return text


def context_messages(persona: Mapping[str, Any], turns: Sequence[tuple[str, str]], one_shot: bool) -> list[Message]:
    """The real ESConv context as the simulator sees it (supporter = user, seeker = assistant)."""
    from esvr.tasks.simulation.seeker import opening_line

    messages: list[Message] = [{"role": "system", "content": seeker_prompt(persona, one_shot)}]
    if turns and turns[0][0] == "seeker":
        messages.append({"role": "user", "content": opening_line()})
    for role, text in turns:
        messages.append({"role": "assistant" if role == "seeker" else "user", "content": text})
    return messages


def seeker_cases(dialogues: Sequence[Any], max_dialogues: int | None, max_turns: int | None) -> list[dict[str, Any]]:
    """(persona, context, real seeker turn) for every seeker turn that follows a supporter turn."""
    cases = []
    for d in list(dialogues)[: max_dialogues if max_dialogues is not None else None]:
        turns = d.turns()
        persona = {"problem": (d.problem_type or "").replace("_", " ") or None, "emotion": d.emotion_type}
        n = 0
        for k, (role, text) in enumerate(turns):
            if role != "seeker" or k == 0 or turns[k - 1][0] != "supporter":
                continue
            cases.append({"dialog_id": d.dialog_id, "persona": persona, "context": turns[:k], "real": text})
            n += 1
            if max_turns is not None and n >= max_turns:
                break
    return cases


def simulator_fidelity(
    model: ChatModel,
    dialogues: Sequence[Any],
    cfg: Any,
    *,
    one_shot: bool,
    emotion: Any,
    detector: Any,
    encoder_path: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """One row of Table 29 for `model` (one-shot or zero-shot prompt)."""
    from esvr.models.chat import ChatRequest
    from esvr.models.value_detector import SentenceEncoder
    from esvr.tasks.simulation.seeker import clean_seeker_reply

    cases = seeker_cases(dialogues, cfg.max_dialogues, cfg.max_turns_per_dialogue)
    if not cases:
        raise ValueError("no seeker turn after a supporter turn in the ESConv dialogues given")
    requests = [
        ChatRequest.build(context_messages(c["persona"], c["context"], one_shot), max_tokens=cfg.seeker_max_tokens, seed=i)
        for i, c in enumerate(cases)
    ]
    replies = model.chat_batch(requests)
    generated = [clean_seeker_reply(r[0] if r else "").text for r in replies]
    real = [c["real"] for c in cases]
    gen_len = [word_count(t) for t in generated]
    real_len = [word_count(t) for t in real]
    enc = SentenceEncoder(encoder_path)
    sims = np.sum(enc.encode(generated) * enc.encode(real), axis=1).tolist()
    e_gen, e_real = emotion.score(generated), emotion.score(real)
    v_gen, v_real = detector.predict_proba(generated), detector.predict_proba(real)
    label = name or model.cache_id
    metrics = {
        "avg_length": float(np.mean(gen_len)),
        "real_avg_length": float(np.mean(real_len)),
        "length_corr": spearman(gen_len, real_len)[0],
        "semantic_similarity": float(np.mean(sims)),
        "v_oc_corr": spearman([e.sentiment for e in e_gen], [e.sentiment for e in e_real])[0],
        "v_reg_corr": spearman([e.valence for e in e_gen], [e.valence for e in e_real])[0],
        "value_cosine": float(np.mean([cosine(a, b) for a, b in zip(v_gen, v_real)])),
        "value_euclidean": float(np.mean([euclidean(a, b) for a, b in zip(v_gen, v_real)])),
    }
    return {
        "model": label,
        "slug": re.sub(r"[^a-z0-9]+", "-", f"{label}-{'one' if one_shot else 'zero'}-shot".lower()).strip("-"),
        "prompt": "one-shot" if one_shot else "zero-shot",
        "n": len(cases),
        "metrics": metrics,
        "examples": [{"real": r, "generated": g} for r, g in list(zip(real, generated))[:5]],
    }


# --------------------------------------------------------------------------------------------
# Table 11: the ES-Intensity judge against ESConv's final intensities
# --------------------------------------------------------------------------------------------


def intensity_validation(
    judge: ChatModel, dialogues: Sequence[Any], settings: Any, max_dialogues: int | None = None
) -> dict[str, Any]:
    """The judge's final-intensity level and expected level vs the seekers' ratings (1-5)."""
    from esvr.tasks.evaluation.judges import ajudge_intensity
    from esvr.tasks.simulation.simulate import run_coroutine

    rated = [d for d in dialogues if d.final_intensity is not None and d.turns()]
    rated = rated[: max_dialogues if max_dialogues is not None else None]
    if not rated:
        raise ValueError("no ESConv dialogue with a final_emotion_intensity rating")

    async def all_() -> list[dict[str, Any]]:
        import asyncio

        return await asyncio.gather(
            *(ajudge_intensity(judge, [{"role": r, "text": t} for r, t in d.turns()], settings, i) for i, d in enumerate(rated))
        )

    preds = run_coroutine(all_())
    truth = [int(d.final_intensity) for d in rated]
    return {
        "n": len(rated),
        "judge": classification_metrics(truth, [p["level"] for p in preds]),
        "judge_expected": classification_metrics(truth, [p["expected"] for p in preds]),
        "baseline_2": {**classification_metrics(truth, [2] * len(truth)), "spearman": None},
    }


def fidelity_markdown(result: Mapping[str, Any]) -> str:
    def f(v: Any, d: int = 3) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    lines = [
        "## Seeker simulator fidelity (paper Table 29)",
        "",
        f"ESConv: `{result['esconv']}`",
        "",
        "| Model | Prompt | n | Avg len | Len corr | Semantic sim | V-oc corr | V-reg corr | Value cos | Value dist |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["simulators"]:
        m = r["metrics"]
        lines.append(
            f"| {r['model']} | {r['prompt']} | {r['n']} | {f(m['avg_length'], 1)} | {f(m['length_corr'])} | {f(m['semantic_similarity'])} | "
            f"{f(m['v_oc_corr'])} | {f(m['v_reg_corr'])} | {f(m['value_cosine'])} | {f(m['value_euclidean'])} |"
        )
    if result["simulators"]:
        lines += ["", f"Real seeker turns average {f(result['simulators'][0]['metrics']['real_avg_length'], 1)} words."]
    if "intensity" in result:
        it = result["intensity"]
        lines += [
            "",
            "## ES-Intensity predictor (paper Table 11)",
            "",
            f"{it['n']} ESConv dialogues with a final intensity rating.",
            "",
            "| Predictor | Acc. | F1 (weighted) | MSE | Spearman |",
            "|---|---|---|---|---|",
        ]
        for key, label in (
            ("baseline_2", "Baseline (always 2)"),
            ("judge", "Judge (level)"),
            ("judge_expected", "Judge (expected level)"),
        ):
            m = it[key]
            lines.append(f"| {label} | {f(m['accuracy'])} | {f(m['f1_weighted'])} | {f(m['mse'])} | {f(m['spearman'])} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Table 13: the judge against human ratings
# --------------------------------------------------------------------------------------------

ID_COLUMNS = ("supporter", "persona_id")


def read_human_ratings(path: str | Path) -> list[dict[str, Any]]:
    """Rows of the ratings CSV: ``supporter``, ``persona_id`` and one column per rated criterion
    (1-5; empty = not rated). Criterion columns are ES-Skills names and ``value_seeker`` /
    ``value_supporter``."""
    from esvr.tasks.evaluation.judges import criterion_names

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"human ratings CSV not found: {p}")
    known = set(criterion_names()) | {"value_seeker", "value_supporter"}
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ID_COLUMNS if c not in cols]
        if missing:
            raise ValueError(f"{p}: missing column(s) {missing}; the header must start with supporter,persona_id")
        unknown = [c for c in cols if c not in known and c not in ID_COLUMNS]
        if unknown:
            raise ValueError(f"{p}: unknown column(s) {unknown}; criteria are {sorted(known)}")
        rows = []
        for i, raw in enumerate(reader, 2):
            row: dict[str, Any] = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            for c in cols:
                if c in ID_COLUMNS or row.get(c, "") == "":
                    row[c] = row.get(c) if c in ID_COLUMNS else None
                    continue
                try:
                    row[c] = float(row[c])
                except ValueError:
                    raise ValueError(f"{p}: line {i}, column '{c}': {row[c]!r} is not a number") from None
            rows.append(row)
    return rows


def judge_vs_human(ratings_csv: str | Path, evaluate_dir: str | Path) -> dict[str, Any]:
    """Spearman's rho per criterion between human ratings and the judge's scores (parsed and
    expected), matched by supporter (name or slug) and persona id."""
    from esvr.tasks.common.jsonl import read_jsonl
    from esvr.tasks.evaluation.evaluate import slugify

    rows = read_human_ratings(ratings_csv)
    folder = Path(evaluate_dir)
    judged: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(folder.glob("*/judgments.jsonl")):
        for rec in read_jsonl(path):
            scores = {k: v for k, v in rec["skills"].items()}
            scores.update(rec.get("value_single") or {})
            judged[(slugify(rec["supporter"]), str(rec["persona_id"]))] = scores
    if not judged:
        raise FileNotFoundError(f"no */judgments.jsonl under {folder}: run `esvr evaluate` first")
    criteria = [c for c in rows[0] if c not in ID_COLUMNS] if rows else []
    out_rows = []
    unmatched = 0
    for crit in criteria:
        human, parsed, expected = [], [], []
        for r in rows:
            if r.get(crit) is None:
                continue
            j = judged.get((slugify(str(r["supporter"])), str(r["persona_id"])))
            if j is None:
                unmatched += 1
                continue
            if crit not in j:
                continue
            human.append(r[crit])
            parsed.append(j[crit]["score"])
            expected.append(j[crit]["expected"])
        rho, p = spearman(human, parsed)
        rho_e, p_e = spearman(human, expected)
        out_rows.append(
            {
                "criterion": crit,
                "n": len(human),
                "spearman": rho,
                "p": p,
                "mark": significance_mark(p),
                "spearman_expected": rho_e,
                "p_expected": p_e,
                "mark_expected": significance_mark(p_e),
            }
        )
    return {"ratings": str(ratings_csv), "evaluate_dir": str(folder), "rows": out_rows, "unmatched_ratings": unmatched}


def judge_vs_human_markdown(result: Mapping[str, Any]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        "## Judge vs human ratings (paper Table 13)",
        "",
        "Spearman's rank correlation; * p < 0.05, † p < 0.1.",
        "",
        "| Criterion | n | Corr. (parsed) | Corr. (expected) |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['criterion']} | {r['n']} | {f(r['spearman'])}{r['mark']} | {f(r['spearman_expected'])}{r['mark_expected']} |"
        )
    if result.get("unmatched_ratings"):
        lines += ["", f"{result['unmatched_ratings']} ratings named a dialogue the evaluation folder does not hold."]
    return "\n".join(lines) + "\n"
