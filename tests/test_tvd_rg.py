"""TVD parsing and P/R/F1, the RG pairwise judge, component references, and the three flows."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from esvr.models.chat import ChatModel, ChatRequest
from esvr.prompts import value_names
from esvr.tasks.components.rg import PairwiseResult, pairwise_compare, parse_verdict, random_values, rg_messages
from esvr.tasks.components.tvd import adetect_values, evaluate_tvd, parse_value_list, render_history, set_prf, tvd_messages

V = value_names()


# --------------------------------------------------------------------------------------------
# parse_value_list
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Self-direction: action, Benevolence: caring, Security: personal",
            ["Self-direction: action", "Benevolence: caring", "Security: personal"],
        ),
        ("1. achievement\n2. HEDONISM\n3. face", ["Achievement", "Hedonism", "Face"]),
        (
            "self direction thought; Benevolance: caring and Tradition.",
            ["Self-direction: thought", "Benevolence: caring", "Tradition"],
        ),
        ("I think the patient needs Universalism: tolerance and also Humility here.", ["Universalism: tolerance", "Humility"]),
        ("The patient is lonely.\nValues: Stimulation, Hedonism", ["Stimulation", "Hedonism"]),
        ("Security, Power", []),  # families without the sub-value name nothing exactly
        ("Face, Face, Tradition, Humility, Achievement", ["Face", "Tradition", "Humility"]),
        ("", []),
    ],
)
def test_parse_value_list(text: str, expected: list[str]):
    assert parse_value_list(text) == expected


def test_parse_value_list_reads_back_what_the_detector_is_trained_on():
    assert parse_value_list(", ".join(V[5:8])) == V[5:8]


# --------------------------------------------------------------------------------------------
# P/R/F1 (Table 5)
# --------------------------------------------------------------------------------------------


def test_set_prf_hand_computed():
    pred = [["a", "b", "c"], ["a"], []]
    gold = [["a", "b", "d"], ["b", "c", "e"], ["a", "b", "c"]]
    m = set_prf(pred, gold)
    # hits 2 + 0 + 0 = 2; predicted 3 + 1 + 0 = 4; gold 9
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 9)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 9) / (0.5 + 2 / 9))
    # per example: P = 2/3, 0, 0 (empty); R = 2/3, 0, 0
    assert m["macro_precision"] == pytest.approx((2 / 3) / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3) / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3) / 3)
    assert m["n"] == 3 and m["empty_predictions"] == 1


def test_set_prf_perfect_and_paper_f1():
    assert set_prf([["x", "y", "z"]], [["z", "y", "x"]])["f1"] == 1.0
    # the paper's Table 5 F1 is the harmonic mean of its P and R
    p, r = 0.516, 0.540
    assert round(2 * p * r / (p + r), 3) == 0.528


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def test_prompts_follow_the_paper_structure():
    hist = render_history([{"role": "op", "text": "I lost my job."}, {"role": "commenter", "text": "That is hard."}])
    assert hist == "Patient: I lost my job.\nTherapist: That is hard."
    tvd = tvd_messages(hist)
    assert [m["role"] for m in tvd] == ["system", "user"]
    assert all(name in tvd[1]["content"] for name in V) and hist in tvd[1]["content"]
    with_defs = tvd_messages(hist, "value_info")[1]["content"]
    assert "It is good to have own ideas and interests." in with_defs
    rg = rg_messages(hist, [V[0], V[14]])
    assert "Be creative" in rg[1]["content"] and V[14] in rg[1]["content"] and V[1] not in rg[1]["content"]
    with pytest.raises(ValueError, match="unknown role"):
        render_history([{"role": "narrator", "text": "x"}])
    assert render_history([{"role": "seeker", "text": "a " * 50}], max_chars=10) == "Patient: a a a a..."


def test_random_values_avoid_the_originals():
    rng = random.Random(0)
    for _ in range(20):
        drawn = random_values(V[:3], 3, rng)
        assert len(set(drawn)) == 3 and not set(drawn) & set(V[:3])


# --------------------------------------------------------------------------------------------
# Reading the detector by score (tvd_method: score)
# --------------------------------------------------------------------------------------------


class RankingDetector(ChatModel):
    """Scores value names by a fixed ranking; its generated answers ignore the format."""

    cache_id = "scripted:ranking"

    def __init__(self, ranking: list[str]):
        super().__init__()
        self.ranking = ranking

    def _generate(self, requests):
        return [["The patient should feel better soon."] for _ in requests]

    def _score(self, messages, choices):
        assert "Dialogue history" in messages[-1]["content"]  # it is asked with the detector's prompt
        return {c: (len(self.ranking) - self.ranking.index(c) if c in self.ranking else 0.0) + 0.01 for c in choices}


def test_score_method_reads_the_ranking_where_generation_gives_nothing():
    detector = RankingDetector(["Humility", "Face", "Hedonism", "Tradition"])
    prompt = tvd_messages("Patient: I failed my exam.")
    generated, reply = asyncio.run(adetect_values(detector, prompt, "generate"))
    assert generated == [] and reply == "The patient should feel better soon."
    scored, reply = asyncio.run(adetect_values(detector, prompt, "score"))
    assert scored == ["Humility", "Face", "Hedonism"]
    assert parse_value_list(reply) == scored  # the raw form reads back like a generated answer


def test_simulation_agents_read_the_detector_by_the_configured_method():
    from esvr.tasks.simulation.simulate import Agents

    utts = [{"role": "seeker", "text": "I failed my exam and my parents will be furious."}]
    detector = RankingDetector(["Face", "Achievement", "Conformity: rules"])
    for method, expected in (("generate", []), ("score", ["Face", "Achievement", "Conformity: rules"])):
        agents = Agents(supporter=None, seeker=None, tvd=detector, tvd_method=method)  # type: ignore[arg-type]
        calls: dict[str, int] = {}
        assert asyncio.run(agents.target_values(utts, seed=0, calls=calls)) == expected
        assert calls == {"tvd": 1}


def test_score_method_on_a_real_model_gives_three_distinct_values(tiny_llama: Path):
    from esvr.models.backends import load_chat_model

    model = load_chat_model(f"hf:{tiny_llama}")
    found, _ = asyncio.run(adetect_values(model, tvd_messages("Patient: I failed my exam."), "score"))
    assert len(found) == 3 and len(set(found)) == 3 and set(found) <= set(V)


def test_evaluate_tvd_by_score_counts_hits():
    examples = [
        {
            "example_id": "a",
            "history": [{"role": "seeker", "text": "hi"}],
            "target_values": ["Humility", "Face", "Power: resources"],
        }
    ]
    result = evaluate_tvd(RankingDetector(["Humility", "Face", "Hedonism"]), examples, name="ranked", method="score")
    assert result.rows[0]["predicted"] == ["Humility", "Face", "Hedonism"]
    assert result.metrics["precision"] == pytest.approx(2 / 3) and result.metrics["recall"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------
# Pairwise judge with order swap, on scripted judges
# --------------------------------------------------------------------------------------------


class ScriptedJudge(ChatModel):
    """Answers by a rule over the prompt: 'first' always picks Comment A (pure position bias);
    'overlap' picks the comment sharing more words with the ground truth."""

    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule
        self.cache_id = f"scripted:{rule}"
        self.prompts: list[str] = []

    def _pick(self, text: str) -> str:
        self.prompts.append(text)
        if self.rule == "first":
            return "A"
        if self.rule == "garbage":
            return "?"
        gt = set(text.split("Ground-truth comment:\n")[1].split("\n\n")[0].split())
        a = set(text.split("Comment A:\n")[1].split("\n\n")[0].split())
        b = set(text.split("Comment B:\n")[1].split("\n\n")[0].split())
        return "A" if len(a & gt) >= len(b & gt) else "B"

    def _generate(self, requests: list[ChatRequest]) -> list[list[str]]:
        out = []
        for r in requests:
            letter = self._pick(r.messages[-1][1])
            out.append([f"Reasoning: compared both.\nSimilar comment: Comment {letter}" if letter in "AB" else "I cannot tell."])
        return out

    def _score(self, messages, choices):
        letter = self._pick(messages[-1]["content"])
        return {"Comment A": 0.9 if letter == "A" else 0.1, "Comment B": 0.1 if letter == "A" else 0.9}


ITEMS = [
    {"example_id": str(i), "thread": f"Patient: problem {i}", "ground_truth": f"you are strong and brave {i}"} for i in range(4)
]
GOOD = [f"you are strong and brave {i}" for i in range(4)]
BAD = [f"whatever man {i}" for i in range(4)]


@pytest.mark.parametrize("method", ["generate", "score"])
def test_order_swap_exposes_position_bias(method: str):
    res = pairwise_compare(ScriptedJudge("first"), ITEMS, BAD, GOOD, x="sft", y="dpo", method=method)
    assert res.order1 == {"sft": 4, "dpo": 0, "invalid": 0}  # order 1: X shown as A
    assert res.order2 == {"sft": 0, "dpo": 4, "invalid": 0}  # order 2: Y shown as A
    assert res.metrics("rg.cmp")["rg.cmp.win_rate.dpo"] == 0.5


@pytest.mark.parametrize("method", ["generate", "score"])
def test_content_judge_wins_in_both_orders(method: str):
    judge = ScriptedJudge("overlap")
    res = pairwise_compare(judge, ITEMS, BAD, GOOD, x="vanilla", y="sft", method=method)
    assert res.order1["sft"] == 4 and res.order2["sft"] == 4
    # the swap really swapped: order 1 shows X's reply first, order 2 Y's
    assert judge.prompts[0].split("Comment A:\n")[1].startswith("whatever man 0")
    assert judge.prompts[4].split("Comment A:\n")[1].startswith("you are strong and brave 0")
    m = res.metrics("t")
    assert m["t.order1.sft"] == 4 and m["t.win_rate.sft"] == 1.0
    assert {r["order"] for r in res.rows} == {"order1", "order2"} and len(res.rows) == 8


def test_unparseable_verdicts_count_as_invalid():
    res = pairwise_compare(ScriptedJudge("garbage"), ITEMS, BAD, GOOD, x="x", y="y", method="generate")
    assert res.order1["invalid"] == 4 and res.order2["invalid"] == 4
    assert PairwiseResult("x", "y", res.order1, res.order2).metrics("p")["p.win_rate.y"] == 0.5


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("Reasoning: ... Comment A is vague.\nSimilar comment: Comment B", "B"),
        ("**Similar comment:** A", "A"),
        ("comment b", "B"),
        ("neither", None),
    ],
)
def test_parse_verdict(text: str, letter: str | None):
    assert parse_verdict(text) == letter


# --------------------------------------------------------------------------------------------
# Component references
# --------------------------------------------------------------------------------------------


def test_resolve_component_specs_and_folders(tmp_path: Path):
    from esvr.tasks.common.roles import resolve_component, write_component

    assert resolve_component("hf:/m+/a") == "hf:/m+/a" and resolve_component("openai:gpt-4o-mini") == "openai:gpt-4o-mini"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    write_component(adapter, base="hf:/models/base", component="tvd", stage="sft", setting="multi_turn")
    assert resolve_component(str(adapter)) == f"hf:/models/base+{adapter.resolve()}"
    with pytest.raises(ValueError, match="expected 'hf:<base>"):
        resolve_component(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------------------------
# The flows, end to end on hand-built threads with the tiny Llama (real Prefect, real MLflow)
# --------------------------------------------------------------------------------------------


def demo_threads(tmp: Path, posts: int = 10) -> tuple[Path, Path]:
    from test_datasets import probs, sibling, turn, write_inputs

    chains, labels = [], {}
    for k in range(posts):
        u = [f"p{k}u{i}" for i in range(5)]
        texts = [
            "I lost my job and feel useless.",
            "That sounds hard; you still have skills.",
            "Thanks, that helps a bit.",
            "Maybe try a course?",
            "Good idea, I will look for one.",
        ]
        chains.append(
            {
                "thread_id": f"t{k}",
                "post_id": f"p{k}",
                "turns": [turn(u[i], "op" if i % 2 == 0 else "commenter", texts[i]) for i in range(5)],
                "siblings": [sibling(1, f"p{k}s1", [f"p{k}s1r"]), sibling(3, f"p{k}s3", [])],
            }
        )
        labels[u[2]] = (0.7, probs(k % 20, (k + 3) % 20, (k + 7) % 20))
        labels[u[4]] = (0.8, probs((k + 1) % 20, (k + 5) % 20, (k + 9) % 20))
        labels[f"p{k}s1r"] = (0.3, probs(k % 20, 19, 18))
    return write_inputs(tmp, chains, labels)


@pytest.fixture(scope="module")
def flows_run(prefect_harness, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    from esvr.flows.build_datasets import build_datasets_flow
    from esvr.flows.config import load_config
    from esvr.flows.train_rg import train_rg_flow
    from esvr.flows.train_tvd import train_tvd_flow

    tmp = tmp_path_factory.mktemp("flows")
    threads, labels = demo_threads(tmp)
    steps = "{max_steps: 2, batch_size: 2, max_length: 384, learning_rate: 0.001}"
    config = load_config(
        None,
        [
            f"run.out_dir={tmp / 'run'}",
            "run.experiment=tvd-rg-test",
            f"models.base=hf:{tiny_llama}",
            f"models.judge=hf:{tiny_llama}",
            "datasets.max_chars_per_utterance=80",
            "datasets.single_turn_max_turns=null",  # these chains all go on: single-turn from their first exchange
            "datasets.dev_size=2",
            "datasets.test_size=3",
            f"train_tvd.train={steps}",
            "train_tvd.eval.max_examples=2",
            "train_tvd.eval.max_new_tokens=6",
            "train_tvd.eval.variants=[zero_shot, value_info]",
            f"train_rg.single_turn.sft={steps}",
            f"train_rg.single_turn.dpo={steps}",
            f"train_rg.multi_turn.sft={steps}",
            f"train_rg.multi_turn.dpo={steps}",
            "train_rg.eval.max_examples=2",
            "train_rg.eval.max_new_tokens=6",
            "train_rg.eval.judge_method=score",
        ],
    )
    out = {}
    out.update(build_datasets_flow(config, threads, labels))
    out.update(train_tvd_flow(config, out["datasets"]))
    out.update(train_rg_flow(config, out["datasets"]))
    return config, out


def _runs(config, **tags):
    from esvr.flows import tracking
    from esvr.tasks.common.mlflow_runs import runs_by_tag

    tracking.setup(config)
    return runs_by_tag(config.run.experiment, **tags)


def test_flows_build_train_and_track(flows_run):
    from mlflow.tracking import MlflowClient

    config, out = flows_run
    manifest = json.loads(Path(out["datasets_manifest"]).read_text())
    assert manifest["stats"]["single_turn"]["tvd.test"] == 3 and manifest["stats"]["multi_turn"]["rg_dpo.train"] > 0
    client = MlflowClient()
    # every training is a tagged MLflow run with per-step metrics and its adapter
    trainings = _runs(config, **{"esvr.component": "rg"})
    assert sorted((r.data.tags["esvr.setting"], r.data.tags["esvr.training_stage"]) for r in trainings) == [
        ("multi_turn", "dpo"),
        ("multi_turn", "sft"),
        ("single_turn", "dpo"),
        ("single_turn", "sft"),
    ]
    for run in trainings + _runs(config, **{"esvr.component": "tvd"}):
        stage = run.data.tags["esvr.training_stage"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"{stage}/loss")] == [1, 2]
        assert run.data.params["train.max_steps"] == "2"
        names = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
        assert {"adapter/adapter_model.safetensors", "adapter/component.json"} <= names
    dpo = next(r for r in trainings if r.data.tags["esvr.training_stage"] == "dpo")
    assert "dpo/rewards/margins" in dpo.data.metrics
    assert out["rg"] == out["rg_single_turn_dpo"] and out["rg_run"].startswith("mlflow:")


def test_flows_evaluate_tvd_and_rg(flows_run):
    config, out = flows_run
    (tvd_flow_run,) = _runs(config, **{"esvr.stage": "train_tvd"})
    metrics = tvd_flow_run.data.metrics
    for system in ("tvd.zero_shot", "base.zero_shot", "base.value_info"):
        assert 0.0 <= metrics[f"tvd.eval.{system}.f1"] <= 1.0 and metrics[f"tvd.eval.{system}.n"] == 2
    assert "| tvd | zero_shot |" in Path(out["tvd_eval"]).read_text()
    (rg_flow_run,) = _runs(config, **{"esvr.stage": "train_rg"})
    m = rg_flow_run.data.metrics
    for setting in ("single_turn", "multi_turn"):
        for label, x, y in (
            ("vanilla_vs_sft", "vanilla", "sft"),
            ("sft_vs_dpo", "sft", "dpo"),
            ("dpo_original_vs_random", "original", "random"),
        ):
            for order in ("order1", "order2"):
                assert m[f"rg.{setting}.{label}.{order}.{x}"] + m[f"rg.{setting}.{label}.{order}.{y}"] == 2
    table = Path(out["rg_eval"]).read_text()
    assert "| sft_original_vs_random | order2 | original |" in table and "### multi-turn" in table


def test_trained_components_resolve_from_mlflow_and_chat(flows_run, tmp_path: Path):
    from esvr.models.backends import load_chat_model
    from esvr.tasks.common.roles import resolve_component
    from esvr.tasks.components.tvd import tvd_messages

    config, out = flows_run
    spec = resolve_component(out["tvd_run"], cache_dir=tmp_path)
    assert spec.startswith("hf:") and spec.endswith("/adapter") and str(tmp_path) in spec
    chat = load_chat_model(spec)
    try:
        assert isinstance(chat.chat(tvd_messages("Patient: hello"), max_tokens=4)[0], str)
    finally:
        chat.close()
    with pytest.raises(FileNotFoundError, match="cannot download"):
        resolve_component("mlflow:0123456789abcdef", cache_dir=tmp_path)


def test_prompt_without_values_names_none():
    plain = rg_messages("Patient: I lost my job.", None)[-1]["content"]
    assert "Patient: I lost my job." in plain and "Target values" not in plain
    assert "Target values" in rg_messages("Patient: I lost my job.", [])[-1]["content"]  # an empty detection is not 'no values'

    from esvr.tasks.simulation.simulate import rg_request

    utts = [{"role": "seeker", "text": "I lost my job."}]
    assert "Target values" not in rg_request(utts, None)[-1]["content"]  # no detector in the loop (App. G)
    assert "Target values" in rg_request(utts, [])[-1]["content"]


def test_generator_trained_without_values(flows_run):
    """App. G.1: SFT only, on the same rows with prompts that name no values; Table 8 skipped."""
    from datasets import load_from_disk

    from esvr.flows.train_rg import train_rg_flow

    config, out = flows_run
    config = config.model_copy(deep=True)
    config.train_rg.settings, config.train_rg.with_values = ["single_turn"], False
    config.run.out_dir = config.run.out_dir.parent / "run-no-values"
    arts = train_rg_flow(config, out["datasets"])
    assert arts["rg"] == arts["rg_single_turn_sft"] and "rg_single_turn_dpo" not in arts
    stripped = load_from_disk(str(config.run.out_dir / "train_rg" / "single_turn" / "sft_data_no_values"))["train"]
    original = load_from_disk(str(Path(out["datasets"]) / "single_turn" / "rg_sft"))["train"]
    assert stripped["completion"] == original["completion"] and len(stripped) == len(original)
    assert all("Target values" not in row["prompt"][-1]["content"] for row in stripped)
    (run,) = _runs(config, **{"esvr.component": "rg", "esvr.rg_values": "false"})
    assert run.data.tags["esvr.training_stage"] == "sft"
    replies = [
        json.loads(line)
        for line in (config.run.out_dir / "train_rg" / "single_turn" / "eval" / "replies.sft.none.jsonl").read_text().splitlines()
    ]
    assert replies and all(r["values_mode"] == "none" and r["target_values"] is None for r in replies)
    table = Path(arts["rg_eval"]).read_text()
    assert "vanilla_vs_sft" in table and "random" not in table
