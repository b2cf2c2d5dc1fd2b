"""How far the evaluation's instruments can be trusted (paper App. E.2, F.2, H).

- `run_simulator_fidelity` (Table 29): a candidate seeker simulator (zero-shot, one-shot, or a
  fine-tuned seeker) gets the real context of an ESConv dialogue up to each seeker turn and writes
  that turn; its utterances are compared with the real ones on length (Spearman of word counts),
  content (BERTScore F1 on the local encoder's token vectors, the sentence cosine, and the judge's
  1-5 content rating), emotion (Spearman of sentiment classes V-oc and valence V-reg from the
  emotion scorer) and values (cosine and Euclidean distance of the value detector's 20
  probabilities, averaged over turns). Reference rows (the supporter's turn repeated, shuffled
  real turns, a constant sentence) and a permutation interval per correlation show whether a
  simulator beats what needs no simulator at all.
- `intensity_validation` (Table 11): the ES-Intensity judge on ESConv dialogues against the
  seekers' own final intensity ratings: accuracy, weighted F1, MSE, Spearman; the paper's
  baseline predicts 2 for everything.
- `judge_vs_human` (Table 13): Spearman correlation per criterion between a user's human ratings
  (CSV, format in docs/evaluation.md) and the judge's scores in an evaluation folder.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esvr.models.chat import ChatModel, ChatRequest, Message
from esvr.models.config import InputFileError
from esvr.prompts import load_prompt
from esvr.tasks.evaluation.metrics import (
    classification_metrics,
    cosine,
    euclidean,
    mean_or_none,
    significance_mark,
    spearman,
    word_count,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Table 29: seeker simulators against real seeker turns
# --------------------------------------------------------------------------------------------

#: the constant reference row's reply: a plausible seeker sentence that answers nothing
CONSTANT_REPLY = "I don't know what to do anymore."
#: shuffles behind each correlation's null interval
PERMUTATIONS = 1000
CORRELATIONS = ("length_corr", "v_oc_corr", "v_reg_corr")
#: the table's comparable columns and which way is better
COLUMNS: dict[str, int] = {
    "length_corr": 1,
    "bertscore_f1": 1,
    "sentence_cosine": 1,
    "judge_content": 1,
    "v_oc_corr": 1,
    "v_reg_corr": 1,
    "value_cosine": 1,
    "value_euclidean": -1,
}
#: the value columns when the value detector is the offline one: on real dialogues a constant
#: sentence scores best on both, so they cannot rank simulators
VALUE_COLUMNS = ("value_cosine", "value_euclidean")


def context_messages(persona: Mapping[str, Any], turns: Sequence[tuple[str, str]], one_shot: bool) -> list[Message]:
    """The real ESConv context as the simulator sees it (supporter = user, seeker = assistant)."""
    from esvr.tasks.simulation.seeker import opening_line, seeker_system_prompt

    messages: list[Message] = [{"role": "system", "content": seeker_system_prompt(persona, one_shot)}]
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
        persona = {
            "problem": (d.problem_type or "").replace("_", " ") or None,
            "emotion": d.emotion_type,
            "situation": d.situation,
        }
        n = 0
        for k, (role, text) in enumerate(turns):
            if role != "seeker" or k == 0 or turns[k - 1][0] != "supporter":
                continue
            cases.append({"dialog_id": d.dialog_id, "persona": persona, "context": turns[:k], "real": text})
            n += 1
            if max_turns is not None and n >= max_turns:
                break
    return cases


def token_embeddings(encoder: Any, texts: Sequence[str]) -> list[np.ndarray]:
    """Unit-length token vectors of each text from the encoder's last layer, without [CLS]/[SEP]."""
    import torch

    with torch.inference_mode():
        out = encoder.model.encode(list(texts), output_value="token_embeddings", batch_size=encoder.batch_size)
    vecs = []
    for t in out:
        v = t.float().cpu().numpy()[1:-1]
        vecs.append(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))
    return vecs


def bertscore_f1(a: np.ndarray, b: np.ndarray) -> float:
    """BERTScore F1 (Zhang et al., 2020): greedy token matching, no idf weights, no rescaling."""
    if not len(a) or not len(b):
        return 0.0
    sim = a @ b.T
    p, r = float(sim.max(axis=1).mean()), float(sim.max(axis=0).mean())
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def null_interval(x: Sequence[float], y: Sequence[float], permutations: int = PERMUTATIONS, seed: int = 0) -> list[float] | None:
    """The central 95% of Spearman's rho over random pairings of `x` with `y`: a correlation inside
    it is what unrelated replies of the same distributions reach. None where rho is undefined."""
    from scipy.stats import rankdata

    if spearman(x, y)[0] is None:
        return None
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    rx, ry = rx / np.linalg.norm(rx), ry / np.linalg.norm(ry)
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((permutations, len(rx))), axis=1)
    null = rx[order] @ ry
    return [float(np.quantile(null, 0.025)), float(np.quantile(null, 0.975))]


def content_messages(case: Mapping[str, Any], generated: str) -> list[Message]:
    supporter = next((t for r, t in reversed(case["context"]) if r == "supporter"), "")
    text = load_prompt("evaluate/fidelity_content.txt").format(supporter=supporter, real=case["real"], generated=generated)
    return [{"role": "user", "content": text.strip()}]


def parse_rating(text: str) -> int | None:
    m = re.search(r"[1-5]", text or "")
    return int(m.group()) if m else None


@dataclass
class Scorers:
    """The instruments every row is measured with; the real turns are scored once."""

    emotion: Any
    detector: Any
    encoder: Any
    #: rates each reply's content against the real one (Table 29's GPT column); None: skipped
    judge: ChatModel | None = None

    def real(self, cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        texts = [c["real"] for c in cases]
        return {
            "texts": texts,
            "lengths": [word_count(t) for t in texts],
            "emotion": self.emotion.score(texts),
            "values": self.detector.predict_proba(texts),
            "sentence": self.encoder.encode(texts),
            "tokens": token_embeddings(self.encoder, texts),
        }

    def row(self, cases: Sequence[Mapping[str, Any]], real: Mapping[str, Any], generated: Sequence[str]) -> dict[str, Any]:
        gen_len = [word_count(t) for t in generated]
        e_gen = self.emotion.score(list(generated))
        v_gen = self.detector.predict_proba(list(generated))
        sentence = np.sum(self.encoder.encode(list(generated)) * real["sentence"], axis=1)
        tokens = token_embeddings(self.encoder, generated)
        pairs = {
            "length_corr": (gen_len, real["lengths"]),
            "v_oc_corr": ([e.sentiment for e in e_gen], [e.sentiment for e in real["emotion"]]),
            "v_reg_corr": ([e.valence for e in e_gen], [e.valence for e in real["emotion"]]),
        }
        metrics: dict[str, Any] = {
            "avg_length": float(np.mean(gen_len)),
            "real_avg_length": float(np.mean(real["lengths"])),
            "bertscore_f1": float(np.mean([bertscore_f1(a, b) for a, b in zip(tokens, real["tokens"])])),
            "sentence_cosine": float(np.mean(sentence)),
            "judge_content": None,
            "value_cosine": float(np.mean([cosine(a, b) for a, b in zip(v_gen, real["values"])])),
            "value_euclidean": float(np.mean([euclidean(a, b) for a, b in zip(v_gen, real["values"])])),
        }
        for key, (x, y) in pairs.items():
            metrics[key] = spearman(x, y)[0]
        if self.judge is not None:
            requests = [ChatRequest.build(content_messages(c, g), max_tokens=8) for c, g in zip(cases, generated)]
            ratings = [parse_rating(r[0] if r else "") for r in self.judge.chat_batch(requests)]
            metrics["judge_content"] = mean_or_none(ratings)
            metrics["judge_content_parsed"] = sum(r is not None for r in ratings)
        return {"metrics": metrics, "null_95": {key: null_interval(x, y) for key, (x, y) in pairs.items()}}


def reference_replies(cases: Sequence[Mapping[str, Any]], seed: int = 0) -> dict[str, list[str]]:
    """Replies any simulator must beat: the supporter's last turn repeated, the real seeker turns
    shuffled across cases (each case gets another case's turn), and one constant sentence."""
    real = [c["real"] for c in cases]
    order = np.random.default_rng(seed).permutation(len(real))
    shuffled = [""] * len(real)
    for k, i in enumerate(order):  # one cycle through the shuffled order: no case keeps its own turn
        shuffled[i] = real[order[(k + 1) % len(real)]]
    return {
        "Repeat the supporter": [next(t for r, t in reversed(c["context"]) if r == "supporter") for c in cases],
        "Shuffled real replies": shuffled,
        "Constant reply": [CONSTANT_REPLY] * len(real),
    }


def _slug(label: str, prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{label}-{prompt}".lower()).strip("-")


def simulator_fidelity(
    model: ChatModel,
    dialogues: Sequence[Any],
    cfg: Any,
    *,
    one_shot: bool,
    emotion: Any = None,
    detector: Any = None,
    encoder_path: str | None = None,
    name: str | None = None,
    scorers: Scorers | None = None,
    prompt: str | None = None,
) -> dict[str, Any]:
    """One row of Table 29 for `model` (one-shot, zero-shot, or a fine-tuned seeker's `prompt`)."""
    from esvr.models.value_detector import SentenceEncoder

    cases = seeker_cases(dialogues, cfg.max_dialogues, cfg.max_turns_per_dialogue)
    if not cases:
        raise ValueError("no seeker turn after a supporter turn in the ESConv dialogues given")
    scorers = scorers or Scorers(emotion, detector, SentenceEncoder(encoder_path))
    return simulator_row(model, cases, scorers.real(cases), scorers, cfg, one_shot=one_shot, name=name, prompt=prompt)


def simulator_row(
    model: ChatModel,
    cases: Sequence[Mapping[str, Any]],
    real: Mapping[str, Any],
    scorers: Scorers,
    cfg: Any,
    *,
    one_shot: bool,
    name: str | None = None,
    prompt: str | None = None,
) -> dict[str, Any]:
    from esvr.tasks.simulation.seeker import clean_seeker_reply

    # greedy replies: one seed for all, so that local backends batch them (they group by seed)
    requests = [
        ChatRequest.build(context_messages(c["persona"], c["context"], one_shot), max_tokens=cfg.seeker_max_tokens) for c in cases
    ]
    generated = [clean_seeker_reply(r[0] if r else "").text for r in model.chat_batch(requests)]
    label = name or model.cache_id
    prompt = prompt or ("one-shot" if one_shot else "zero-shot")
    return {
        "model": label,
        "kind": "simulator",
        "slug": _slug(label, prompt),
        "prompt": prompt,
        "n": len(cases),
        **scorers.row(cases, real, generated),
        "examples": [{"real": c["real"], "generated": g} for c, g in list(zip(cases, generated))[:5]],
    }


def reference_rows(cases: Sequence[Mapping[str, Any]], real: Mapping[str, Any], scorers: Scorers) -> list[dict[str, Any]]:
    return [
        {"model": label, "kind": "reference", "slug": _slug(label, "reference"), "prompt": "reference", "n": len(cases)}
        | scorers.row(cases, real, replies)
        for label, replies in reference_replies(cases).items()
    ]


def uninformative_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Columns where some reference row matches or beats every simulator: they cannot rank them."""
    sims = [r for r in rows if r["kind"] == "simulator"]
    refs = [r for r in rows if r["kind"] == "reference"]
    out = []
    for col, sign in COLUMNS.items():
        best_sim = [sign * r["metrics"][col] for r in sims if r["metrics"].get(col) is not None]
        best_ref = [sign * r["metrics"][col] for r in refs if r["metrics"].get(col) is not None]
        if best_sim and best_ref and max(best_ref) >= max(best_sim):
            out.append(col)
    return out


@dataclass
class Candidate:
    """One simulator row to run; the model is built only when its row runs."""

    name: str
    one_shot: bool
    model: Callable[[], ChatModel]
    #: "one-shot", "zero-shot" or "fine-tuned"
    prompt: str


def fidelity_plan(dialogues: Sequence[Any], cfg: Any, intensity: bool) -> tuple[list[dict[str, Any]], bool, list[str]]:
    """What the inputs support, checked before any model is asked: (seeker cases, whether the
    ES-Intensity table can run, what is skipped and why). No seeker case at all is an error."""
    cases = seeker_cases(dialogues, cfg.max_dialogues, cfg.max_turns_per_dialogue)
    if not cases:
        raise ValueError(
            f"no seeker turn after a supporter turn in the {len(dialogues)} ESConv dialogues given: nothing to compare"
        )
    skipped = []
    if intensity and not any(d.final_intensity is not None and d.turns() for d in dialogues):
        skipped.append(
            "ES-Intensity (Table 11): no dialogue has a final_emotion_intensity rating (survey_score.seeker); "
            "ESConv.json of github.com/thu-coai/Emotional-Support-Conversation has them"
        )
        intensity = False
    return cases, intensity, skipped


def run_simulator_fidelity(
    dialogues: Sequence[Any],
    cfg: Any,
    candidates: Sequence[Candidate],
    scorers: Scorers,
    out_dir: Path,
    *,
    source: str,
    intensity_judge: Callable[[], ChatModel] | None = None,
    judge_settings: Any = None,
) -> dict[str, Any]:
    """Table 29 (reference rows, then each candidate) and Table 11; fidelity.json and fidelity.md
    are rewritten after each row, so what was computed is kept if a later row fails."""
    cases, intensity, skipped = fidelity_plan(dialogues, cfg, intensity_judge is not None)
    if scorers.judge is None:
        skipped.append("the judge's content score (Table 29's GPT column): evaluate.fidelity.content_judge is off")
    for why in skipped:
        log.warning("simulator fidelity skips %s", why)
    result: dict[str, Any] = {"esconv": source, "simulators": [], "skipped": skipped}

    def write() -> None:
        result["uninformative_columns"] = uninformative_columns(result["simulators"])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "fidelity.json").write_text(json.dumps(result, indent=2))
        (out_dir / "fidelity.md").write_text(fidelity_markdown(result))

    real = scorers.real(cases)
    result["simulators"] += reference_rows(cases, real, scorers)
    write()
    for c in candidates:
        result["simulators"].append(
            simulator_row(c.model(), cases, real, scorers, cfg, one_shot=c.one_shot, name=c.name, prompt=c.prompt)
        )
        write()
    if intensity and intensity_judge is not None:
        result["intensity"] = intensity_validation(intensity_judge(), dialogues, judge_settings, cfg.max_dialogues)
        write()
    return result


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

    def corr(r: Mapping[str, Any], key: str) -> str:
        value, null = r["metrics"].get(key), (r.get("null_95") or {}).get(key)
        if value is None or null is None:
            return f(value)
        inside = " (in null)" if null[0] <= value <= null[1] else ""
        return f"{value:.3f} [{null[0]:.2f}, {null[1]:.2f}]{inside}"

    lines = [
        "## Seeker simulator fidelity (paper Table 29)",
        "",
        f"ESConv: `{result['esconv']}`",
        "",
        "| Model | Prompt | n | Avg len | Len corr | BERTScore F1 | Sent. cos | Judge 1-5 | V-oc corr | V-reg corr | Value cos ↑ | Value dist ↓ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["simulators"]:
        m = r["metrics"]
        lines.append(
            f"| {r['model']} | {r['prompt']} | {r['n']} | {f(m['avg_length'], 1)} | {corr(r, 'length_corr')} | "
            f"{f(m.get('bertscore_f1'))} | {f(m.get('sentence_cosine'))} | {f(m.get('judge_content'), 2)} | "
            f"{corr(r, 'v_oc_corr')} | {corr(r, 'v_reg_corr')} | {f(m['value_cosine'])} | {f(m['value_euclidean'])} |"
        )
    if result["simulators"]:
        lines += [
            "",
            f"Real seeker turns average {f(result['simulators'][0]['metrics']['real_avg_length'], 1)} words. "
            "Reference rows (prompt `reference`) are what a simulator must beat: the supporter's last turn "
            "repeated, the real seeker turns shuffled across contexts, one constant sentence. Each "
            "correlation has the central 95% of Spearman's rho over "
            f"{PERMUTATIONS} random pairings of the same replies in brackets; `(in null)`: no better than chance.",
        ]
    weak = result.get("uninformative_columns") or []
    if weak:
        lines += [
            "",
            f"A reference row matches or beats every simulator on: {', '.join(weak)}; on these columns no simulator "
            "does better than a reply that needs no simulator, so they cannot rank the simulators here.",
        ]
    for why in result.get("skipped") or []:
        lines += ["", f"Skipped: {why}."]
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
            raise InputFileError(f"{p}: missing column(s) {missing}; the header must start with supporter,persona_id")
        unknown = [c for c in cols if c not in known and c not in ID_COLUMNS]
        if unknown:
            raise InputFileError(f"{p}: unknown column(s) {unknown}; criteria are {sorted(known)}")
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
                    raise InputFileError(f"{p}: line {i}, column '{c}': {row[c]!r} is not a number") from None
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
