"""Stage 8 end to end: supporters x personas -> dialogues -> judges -> summary -> report.

The models are a scripted OpenAI-compatible server on 127.0.0.1 (supporters, seeker, TVD, RG and
judge all answer through the real openai client); Prefect and MLflow run for real. The script
makes one supporter clearly better ("wonderful" replies, which the judge prefers), so the numbers
in the summary and the report can be checked exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import orjson
import pytest

from esvr.flows.config import PipelineConfig
from esvr.tasks.simulation.supporter import SupporterReply, render_reply

GOOD = "That sounds wonderful progress, and your courage shows how much you value growth."
PLAIN = "Okay."


def template(response: str, strategy: str = "Affirmation") -> str:
    return render_reply(
        SupporterReply(
            "The patient is stressed.", "The reference offers hope.", "Yes, it fits.", True, strategy, strategy, response
        )
    )


def scripted(request: dict) -> str:
    msgs = request["messages"]
    system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else ""
    last = msgs[-1]["content"]
    model = request.get("model", "")
    if request.get("logprobs"):
        if "Dialogue A:" in last:
            a = last.split("2. Dialogue A:")[1].split("3. Dialogue B:")[0]
            b = last.split("3. Dialogue B:")[1]
            if ("wonderful" in a) == ("wonderful" in b):
                return '<dist>{"Tie": 1.0}'
            return '<dist>{"Dialogue A": 0.9, "Tie": 0.1}' if "wonderful" in a else '<dist>{"Dialogue B": 0.9, "Tie": 0.1}'
        if "negative emotion" in last:
            level = "low" if "wonderful" in last else "high"
            return f'<dist>{{"The patient shows a {level} amount of negative emotion.": 1.0}}'
        if "Answer with the number only" in last:
            return '<dist>{"5": 0.75, "4": 0.25}' if "wonderful" in last else '<dist>{"2": 0.5, "3": 0.5}'
        return '<dist>{"Yes": 1.0}'
    if system.startswith("In the conversation that follows you play a patient"):
        said = sum(m["role"] == "assistant" for m in msgs)
        return "Thank you, that helps. [END]" if said >= 3 else "I still feel stuck at work."
    if system.startswith("Pick at most 3 values"):
        return "Achievement, Benevolence: caring"
    if "Step 1" in last or "Step 4" in last:
        return template(GOOD if "good" in model else PLAIN)
    if model.endswith("plain"):
        return PLAIN
    return "Someone I know found that small steps helped."


def write_personas(path: Path, n: int = 2) -> Path:
    rows = [
        {
            "id": f"p{i}",
            "split": "test",
            "problem": "Career and Work-Related Challenges",
            "value": "Achievement",
            "situation": f"I keep failing at my new job, attempt {i}.",
            "emotion": "Anxiety",
            "age": "20s",
            "gender": "female",
            "occupation": "nurse",
        }
        for i in range(n)
    ] + [
        {
            "id": "t0",
            "split": "train",
            "problem": "Family Dynamics and Conflicts",
            "value": "Achievement",
            "situation": "train only",
            "emotion": "Sadness",
        }
    ]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def stub_config(tmp_path: Path, base_url: str, **evaluate) -> PipelineConfig:
    def m(name: str) -> dict:
        return {"spec": f"openai:{name}", "base_url": base_url, "max_retries": 1}

    data = {
        "run": {"name": "eval-test", "out_dir": str(tmp_path / "run"), "experiment": "esvr-eval-test"},
        "models": {"supporter": m("stub"), "seeker": m("stub"), "judge": m("stub"), "persona_writer": m("stub")},
        "simulate": {"emotion": True, "concurrency": 4},
        "evaluate": {
            "supporters": [
                {"name": "Good (Both)", "model": m("stub-good")},
                {"name": "Good w/o components", "model": m("stub-good"), "use_target_values": False, "use_reference": False},
                {"name": "Plain baseline", "category": "Fine-tuned", "model": m("stub-plain"), "style": "plain"},
            ],
            "reference": "Good (Both)",
            "max_turns": 4,
            "value_judgments": 4,
            "judge_reasoning": False,
            "complete_only": True,
            "table_score": "parsed",
            **evaluate,
        },
    }
    return PipelineConfig.model_validate(data)


def test_evaluate_flow_and_report_end_to_end(tmp_path, stub_server, prefect_harness):
    from esvr.flows.evaluate import evaluate_flow
    from esvr.flows.report import report_flow

    stub_server.reply = scripted
    config = stub_config(tmp_path, stub_server.base_url)
    personas = write_personas(tmp_path / "personas.jsonl")
    out = evaluate_flow(config, personas_path=personas)
    summary = json.loads(Path(out["evaluate_summary"]).read_text())
    rows = {m["name"]: m for m in summary["models"]}
    assert summary["reference"] == "Good (Both)" and summary["personas"] == 2

    good, nocomp, plain = rows["Good (Both)"], rows["Good w/o components"], rows["Plain baseline"]
    # every dialogue ends by the seeker's [END] after 3 seeker utterances (situation + 2 replies)
    assert good["n_dialogues"] == 2 and good["end_reasons"] == {"seeker_end": 2}
    assert good["skills"]["overall"]["score"]["mean"] == 5.0
    assert good["skills"]["overall"]["expected"]["mean"] == pytest.approx(4.75)
    assert plain["skills"]["overall"]["score"]["mean"] == 2.0
    assert plain["skills"]["overall"]["expected"]["mean"] == pytest.approx(2.5)
    assert good["intensity"]["score"]["mean"] == 2.0 and plain["intensity"]["score"]["mean"] == 4.0
    # the judge always prefers the 'wonderful' dialogue wherever it is shown: 0 wins for plain,
    # ties for the same replies without components
    assert plain["value"]["seeker"]["win_ratio"]["mean"] == 0.0
    assert nocomp["value"]["supporter"]["win_ratio"]["mean"] == 0.5
    assert plain["value"]["seeker"]["expected"]["mean"] == pytest.approx(0.05)
    assert plain["words_per_turn"]["mean"] == 1.0
    assert good["words_per_turn"]["mean"] == len(GOOD.split())
    # two dialogues a side cannot reach p < 0.1 with Mann-Whitney U: no marks
    from scipy.stats import mannwhitneyu

    assert plain["skills"]["overall"]["score"]["p"] == pytest.approx(mannwhitneyu([2, 2], [5, 5], alternative="two-sided").pvalue)
    assert plain["skills"]["overall"]["score"]["mark"] == ""
    # the components the rows used: TVD and RG only where asked for, none for the plain style
    comps = summary["components"]
    assert comps["Good (Both)"]["tvd"] and comps["Good (Both)"]["rg"]
    assert comps["Good w/o components"]["tvd"] is None and comps["Plain baseline"]["rg"] is None
    d0 = [json.loads(line) for line in (Path(out["evaluate_dir"]) / "good-both" / "dialogues.jsonl").read_text().splitlines()][0]
    assert d0["turns"][0]["target_values"] and d0["turns"][0]["reference"]
    # every scripted reply's Step 3 says Yes: the row used its reference in every turn; no reference, no share
    assert good["reference_used_share"] == 1.0 and nocomp["reference_used_share"] is None

    # a second run is free: every call comes from the caches, the numbers are identical
    calls = stub_server.calls
    again = evaluate_flow(config, personas_path=personas)
    assert stub_server.calls == calls
    assert json.loads(Path(again["evaluate_summary"]).read_text())["models"] == summary["models"]

    report = report_flow(config, run_ids=[summary["run_id"]])
    text = Path(report["report"]).read_text()
    assert "| Prompt-based | **Good (Both)** (ref.) | 5.00 |" in text
    assert "| Fine-tuned | Plain baseline | 2.00 |" in text
    assert "0.00" in text and "![ES-Value win ratios]" in text
    assert "| Words/turn | n | Ref. used |" in text
    assert re.search(r"\| \*\*Good \(Both\)\*\* \(ref\.\) \|.*\| 2 \| 100% \|", text)
    assert re.search(r"\| Good w/o components \|.*\| 2 \| - \|", text)
    assert list(Path(report["report"]).parent.glob("*.png"))


@pytest.mark.slow
def test_demo_evaluation_on_the_tiny_model(tmp_path, tiny_llama, prefect_harness):
    """The demo's shape on a real local model: score_choices judges, stepwise supporter fallback."""
    from esvr.flows.evaluate import evaluate_flow

    spec = f"hf:{tiny_llama}"
    config = PipelineConfig.model_validate(
        {
            "run": {"name": "tiny", "out_dir": str(tmp_path / "run"), "experiment": "esvr-eval-tiny"},
            "models": {"supporter": spec, "seeker": spec, "judge": spec, "persona_writer": spec},
            "simulate": {
                "emotion": True,
                "fallback": "stepwise",
                "reask": 0,
                "supporter_max_tokens": 8,
                "stepwise_max_tokens": 6,
                "seeker_max_tokens": 8,
                "tvd_max_tokens": 6,
                "rg_max_tokens": 8,
            },
            "evaluate": {
                "supporters": [{"name": "Tiny (Both)"}, {"name": "Tiny plain", "style": "plain"}],
                "reference": "Tiny (Both)",
                "max_turns": 1,
                "value_judgments": 2,
                "judge_reasoning": False,
                "complete_only": False,
                "table_score": "expected",
            },
        }
    )
    out = evaluate_flow(config, personas_path=write_personas(tmp_path / "personas.jsonl", 1))
    summary = json.loads(Path(out["evaluate_summary"]).read_text())
    for m in summary["models"]:
        assert m["n_dialogues"] == 1
        assert 1.0 <= m["skills"]["overall"]["expected"]["mean"] <= 5.0
        assert 1.0 <= m["intensity"]["expected"]["mean"] <= 5.0
    plain = summary["models"][1]
    assert 0.0 <= plain["value"]["seeker"]["expected"]["mean"] <= 1.0


def test_evaluate_flow_takes_a_row_whose_own_generator_is_absent(tmp_path: Path):
    # The pipeline hands each trained row {"model", "rg"}; a branch that trained no generator
    # gives rg None, which must mean "the row's default", not a parameter error before the run.
    from esvr.flows.evaluate import evaluate_flow

    config = PipelineConfig.model_validate({"run": {"out_dir": str(tmp_path)}})
    params = evaluate_flow.validate_parameters(
        {"config": config, "supporters": {"Ours (DPO)": {"model": "hf:base+adapter", "rg": None}, "Other": "default"}}
    )
    assert params["supporters"] == {"Ours (DPO)": {"model": "hf:base+adapter", "rg": None}, "Other": "default"}


def test_es_value_significance_is_the_win_ratio_against_one_half():
    """summary.json's ES-Value p asks "is the win ratio different from 0.5" (Wilcoxon signed-rank),
    not a two-sample test of the ratios against their own mirror."""
    from scipy.stats import wilcoxon

    from esvr.tasks.evaluation.evaluate import SupporterUnderTest, summarize
    from esvr.tasks.evaluation.judges import criterion_names

    def judged(name: str) -> list[dict]:
        skills = {c: {"score": 4, "expected": 4.0} for c in criterion_names()}
        return [
            {
                "supporter": name,
                "persona_id": f"p{i}",
                "skills": skills,
                "intensity": {"level": 2, "expected": 2.0},
                "words_per_turn": 20.0,
            }
            for i in range(5)
        ]

    ratios = [0.6, 0.7, 0.6, 0.8, 0.6]
    values = [
        {"persona_id": f"p{i}", "seeker": {"win_ratio": r, "expected": r}, "supporter": {"win_ratio": 0.5, "expected": 0.5}}
        for i, r in enumerate(ratios)
    ]
    rows = [SupporterUnderTest(name="Ref"), SupporterUnderTest(name="Model")]
    summary = summarize({"Ref": judged("Ref"), "Model": judged("Model")}, {"Model": values}, "Ref", rows)
    seeker = summary["models"][1]["value"]["seeker"]["win_ratio"]
    assert seeker["p"] == pytest.approx(wilcoxon([r - 0.5 for r in ratios]).pvalue) == pytest.approx(0.0625)
    assert seeker["mark"] == "†" and seeker["n"] == 5 and seeker["mean"] == pytest.approx(0.66)
    # a side that is a tie on every persona differs from 0.5 in nothing
    assert summary["models"][1]["value"]["supporter"]["win_ratio"]["p"] == 1.0
