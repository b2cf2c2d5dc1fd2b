"""Baselines: corpus loaders (ESConv, ExTES, Psych8k fixtures in their published formats), SFT
rows, the plain and self-disclosure supporters, evaluation config validation, fidelity checks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from esvr.tasks.evaluation.baselines import PlainSupporter, SelfDisclosureAblation, load_corpus, sft_rows
from esvr.tasks.evaluation.evaluate import EvaluateConfig
from esvr.tasks.simulation.supporter import Supporter, SupporterReply, SupporterSettings, render_reply

FIXTURES = Path(__file__).parent / "fixtures"
HISTORY = [{"role": "seeker", "text": "I failed my exam."}]


def test_extes_loader_merges_turns_and_tolerates_speaker_keys():
    dialogues = load_corpus("extes", FIXTURES / "extes_sample.json")
    assert len(dialogues) == 2
    first = dialogues[0]
    assert [u["role"] for u in first] == ["seeker", "supporter", "seeker", "supporter"]
    assert first[2]["text"] == "Yes, I feel like nobody notices what I do. It makes me want to quit."
    assert dialogues[1][1]["role"] == "supporter"  # lower-case 'assistant' key
    rows = sft_rows(dialogues)
    assert len(rows) == 3
    assert rows[0]["prompt"][0]["role"] == "system" and rows[0]["prompt"][-1]["role"] == "user"
    assert rows[0]["completion"] == [{"role": "assistant", "content": first[1]["text"]}]


def test_psych8k_and_esconv_loaders():
    rows = sft_rows(load_corpus("psych8k", FIXTURES / "psych8k_sample.json"))
    assert len(rows) == 2
    assert rows[1]["prompt"][-1]["content"] == "My parents keep comparing me to my brother."
    esconv = load_corpus("esconv", FIXTURES / "esconv_sample.json")
    assert len(esconv) == 3
    # the opening supporter greeting has no seeker text before it: not a training example
    assert len(sft_rows(esconv)) == 6
    assert esconv[0][2]["text"] == "That sounds really stressful. Do you know when they will decide?"


def test_loaders_name_the_file_and_record(tmp_path):
    bad = tmp_path / "extes.json"
    bad.write_text(json.dumps([{"description": "x", "content": [{"User": "hi"}]}, {"scene": "no content"}]))
    with pytest.raises(ValueError, match=r"extes.json: record 1: no 'content' list"):
        load_corpus("extes", bad)
    bad.write_text(json.dumps([{"content": [{"Narrator": "hi"}]}]))
    with pytest.raises(ValueError, match=r"record 0, turn 0: no speaker key"):
        load_corpus("extes", bad)
    bad.write_text(json.dumps([{"instruction": "x", "input": "y"}]))
    with pytest.raises(ValueError, match=r"record 0 needs 'input' and 'output'"):
        load_corpus("psych8k", bad)
    with pytest.raises(FileNotFoundError):
        load_corpus("psych8k", tmp_path / "absent.json")
    # JSON Lines works too
    jl = tmp_path / "psych8k.jsonl"
    jl.write_text('{"input": "a", "output": "b"}\n{"input": "c", "output": "d"}\n')
    assert len(load_corpus("psych8k", jl)) == 2


def _openai(server):
    from esvr.models.openai_backend import OpenAIChat

    return OpenAIChat("stub", base_url=server.base_url, max_retries=1)


def test_plain_supporter_keeps_its_own_message(stub_server):
    stub_server.reply = lambda req: "That sounds hard. Patient: I know."
    reply = asyncio.run(PlainSupporter(_openai(stub_server)).respond(HISTORY, None, None, seed=1))
    assert reply.response == "That sounds hard." and reply.method == "plain"
    req = stub_server.requests[-1]
    assert req["messages"][-1] == {"role": "user", "content": "I failed my exam."}


def disclosing(req):
    last = req["messages"][-1]["content"]
    if req.get("logprobs"):
        return '<dist>{"Question": 0.6, "Affirmation": 0.4}'
    if "Rewrite it so that" in last:
        return "Many people who failed an exam found that the next try went better."
    if "Strategy to use:" in last:
        return "What do you think went wrong on the day?"
    return render_reply(
        SupporterReply(
            "a", "b", "No, not needed.", False, "Self-disclosure", "Self-disclosure", "When I failed an exam, I felt the same."
        )
    )


@pytest.mark.parametrize("mode", ["remove", "rephrase"])
def test_self_disclosure_ablation(stub_server, mode):
    stub_server.reply = disclosing
    model = _openai(stub_server)
    agent = SelfDisclosureAblation(Supporter(model, SupporterSettings(reask=0)), mode, rephraser=model)
    calls: dict[str, int] = {}
    reply = asyncio.run(agent.respond(HISTORY, None, None, seed=3, calls=calls))
    if mode == "remove":
        assert reply.strategy == "Question"
        assert reply.response == "What do you think went wrong on the day?"
        scored = [r for r in stub_server.requests if r.get("logprobs")]
        assert scored, "the next strategy is chosen by scoring the other seven"
    else:
        assert reply.strategy == "Self-disclosure"
        assert reply.response.startswith("Many people")
    assert "original: When I failed an exam" in reply.problems[-1]
    assert calls["self_disclosure"] >= 1


def test_evaluate_config_validation():
    with pytest.raises(ValidationError, match="reference 'X' is not one of the supporters"):
        EvaluateConfig(supporters=[{"name": "A"}], reference="X")
    with pytest.raises(ValidationError, match="needs 'finetune_data'"):
        EvaluateConfig(supporters=[{"name": "A", "finetune": "extes"}], reference="A")
    with pytest.raises(ValidationError, match="repeated"):
        EvaluateConfig(supporters=[{"name": "A"}, {"name": "A"}], reference="A")
    with pytest.raises(ValidationError, match="template style"):
        EvaluateConfig(supporters=[{"name": "A", "style": "plain", "self_disclosure": "remove"}], reference="A")
    ok = EvaluateConfig(supporters=[{"name": "GPT (Both)", "model": "openai:gpt-4o-mini"}], reference="GPT (Both)")
    assert ok.supporters[0].model.spec == "openai:gpt-4o-mini" and ok.supporters[0].slug == "gpt-both"


@pytest.mark.slow  # loads the sentence encoder and the value detector
def test_simulator_and_intensity_fidelity_on_esconv_fixture(stub_server):
    from esvr.models.emotion import VaderEmotionScorer
    from esvr.models.value_detector import ValueDetectorConfig, load_value_detector
    from esvr.tasks.common.esconv import load_esconv
    from esvr.tasks.evaluation.evaluate import FidelityConfig
    from esvr.tasks.evaluation.fidelity import fidelity_markdown, intensity_validation, simulator_fidelity
    from esvr.tasks.evaluation.judges import JudgeSettings

    def reply(req):
        if req.get("logprobs"):
            return '<dist>{"The patient shows a low amount of negative emotion.": 1.0}'
        return "I am still worried about it all. Therapist: ok"

    stub_server.reply = reply
    dialogues = load_esconv(FIXTURES / "esconv_sample.json")
    model = _openai(stub_server)
    row = simulator_fidelity(
        model,
        dialogues,
        FidelityConfig(),
        one_shot=False,
        emotion=VaderEmotionScorer(),
        detector=load_value_detector(ValueDetectorConfig()),
    )
    assert row["n"] == 9 and row["prompt"] == "zero-shot"
    assert row["metrics"]["avg_length"] == 7.0  # 'Therapist: ok' is cut off
    assert 0 <= row["metrics"]["bertscore_f1"] <= 1 and row["metrics"]["value_euclidean"] >= 0
    zero_shot_system = stub_server.requests[0]["messages"][0]["content"]
    assert "example" not in zero_shot_system.lower()
    it = intensity_validation(model, dialogues, JudgeSettings())
    assert it["n"] == 3
    assert it["judge"]["accuracy"] == pytest.approx(1 / 3)  # truths 2, 3, 1; always predicts 2
    assert it["baseline_2"]["mse"] == pytest.approx((0 + 1 + 1) / 3)
    md = fidelity_markdown({"esconv": "x", "simulators": [row], "intensity": it})
    assert "| Baseline (always 2) | 0.333 |" in md


@pytest.mark.slow
def test_finetune_baseline_on_tiny_model(tmp_path, tiny_llama):
    from esvr.models.training import TrainConfig
    from esvr.tasks.evaluation.baselines import finetune_baseline

    cfg = TrainConfig(max_steps=1, batch_size=2, max_length=256, lora_r=2, lora_alpha=4)
    spec = finetune_baseline("extes", FIXTURES / "extes_sample.json", f"hf:{tiny_llama}", cfg, tmp_path / "ft")
    base, adapter = spec[3:].split("+")
    assert Path(base) == Path(tiny_llama) and (Path(adapter) / "component.json").is_file()
