"""Persona generation (App. E.1): parsing, de-duplication, steps on a scripted fake OpenAI server
and on the tiny random Llama, the stratified split, personas.jsonl, and the personas + simulate
flows end to end."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from esvr.models.backends import load_chat_model
from esvr.models.config import ModelConfig
from esvr.prompts import load_taxonomy
from esvr.tasks.bench.simulate import FakeOpenAIServer, Script
from esvr.tasks.simulation.personas import (
    PERSONA_FIELDS,
    PersonasConfig,
    assign_splits,
    dedup_situations,
    demographics,
    generate_personas,
    label_emotions,
    majority,
    parse_demographics,
    parse_ratings,
    parse_situations,
    rate_alignment,
    read_personas,
    select_pairs,
    split_sizes,
    write_personas,
)


def test_taxonomies_are_complete() -> None:
    problems = load_taxonomy("problems")
    assert len(problems) == 6 and sum(len(p["subcategories"]) for p in problems) == 27
    assert len(load_taxonomy("strategies")) == 8 and len(load_taxonomy("emotions")) == 10


@pytest.mark.parametrize(
    "reply",
    [
        "1. I just moved here and it's hard to make friends.\n2. My boss ignores every idea I bring to meetings.",
        "- I just moved here and it's hard to make friends.\n* My boss ignores every idea I bring to meetings.",
        '["I just moved here and it\'s hard to make friends.", "My boss ignores every idea I bring to meetings."]',
        "Here are some situations:\n\n1) I just moved here and it's hard to make friends.\n\n2) My boss ignores every idea I bring to meetings.\nI hope these help.",
    ],
)
def test_situation_lists_in_any_common_format(reply: str) -> None:
    assert parse_situations(reply) == [
        "I just moved here and it's hard to make friends.",
        "My boss ignores every idea I bring to meetings.",
    ]


def test_invalid_lines_are_dropped() -> None:
    junk = "Situations\n\n1. Tradition\n2. The weather is nice today in the park.\n3. " + " ".join(["I am"] * 30) + "\n4. x y z"
    assert parse_situations(junk) == []


def test_dedup_drops_exact_and_near_duplicates() -> None:
    items = [
        "I just moved in this week, and it's so hard to make friends.",
        "i just moved in this week and it's SO hard to make friends!",
        "I just moved in this week, and it's really so hard to make friends.",
        "My sister and I have not spoken since the funeral.",
    ]
    assert dedup_situations(items) == [items[0], items[3]]


def test_rating_emotion_and_demographics_parsers() -> None:
    text = "situation: a\n- Reasoning: x\n- Rating: 4\nsituation: b\n- Reasoning: y\n- **Rating:** 2"
    assert parse_ratings(text, 2) == [4, 2] and parse_ratings(text, 3) is None
    assert majority(["Fear", "Anxiety", "Fear", "Anxiety"], ["Frustration", "Anxiety", "Fear"]) == "Anxiety"
    assert parse_demographics("Age: 40s / Gender: Male / Occupation: Nurse") == {
        "age": "40s",
        "gender": "Male",
        "occupation": "Nurse",
    }
    assert parse_demographics("**Age:** late twenties\n**Gender:** female\n**Occupation:** software engineer") == {
        "age": "20s", "gender": "Female", "occupation": "Software Engineer"
    }  # fmt: skip
    assert parse_demographics("Age: 40s / Gender: Male / Occupation: I am a person who works a lot") is None
    assert parse_demographics("A nurse in her forties") is None


def test_pairs_cover_categories_round_robin() -> None:
    assert len(select_pairs(None)) == 120 and len(set((c["name"], v.name) for c, v in select_pairs(None))) == 120
    assert len({c["name"] for c, _ in select_pairs(6)}) == 6


def test_split_sizes_and_stratification() -> None:
    assert split_sizes(2036, {"train": 1796, "dev": 120, "test": 120}) == {"train": 1796, "dev": 120, "test": 120}
    assert split_sizes(6, {"train": 4, "dev": 0, "test": 2}) == {"train": 4, "dev": 0, "test": 2}
    assert sum(split_sizes(101, {"train": 1796, "dev": 120, "test": 120}).values()) == 101
    cats = [c["name"] for c in load_taxonomy("problems")]
    items = [{"problem": cats[i % 6], "id": i} for i in range(120)]
    assign_splits(items, {"train": 96, "dev": 12, "test": 12}, seed=1)
    counts = Counter(it["split"] for it in items)
    assert counts == {"train": 96, "dev": 12, "test": 12}
    for split in ("dev", "test"):
        assert Counter(it["problem"] for it in items if it["split"] == split) == {c: 2 for c in cats}


@pytest.fixture()
def fake_writer():
    os.environ.setdefault("ESVR_TEST_KEY", "unused")
    with FakeOpenAIServer(Script(situations=4)) as server:
        model = load_chat_model(ModelConfig(spec="openai:fake-writer", base_url=server.base_url, api_key_env="ESVR_TEST_KEY"))
        yield model, server
        model.close()


def test_all_steps_on_a_scripted_fake_server(fake_writer, tmp_path: Path) -> None:
    model, _ = fake_writer
    cfg = PersonasConfig(pairs=6, min_situations=2, max_situations=4, split={"train": 8, "dev": 2, "test": 2})
    personas, rejected, stats = generate_personas(model, cfg, seed=0)
    # 6 pairs x 4 situations; the script rates every third one 2 (dropped: not above 3)
    assert stats["situations.kept"] == 24 and stats["alignment.rejected"] == 12 == len(rejected)
    assert len(personas) == 12 and Counter(p["split"] for p in personas) == {"train": 8, "dev": 2, "test": 2}
    for p in personas:
        assert set(p) == set(PERSONA_FIELDS)
        assert p["alignment"] == 5 and p["alignment_method"] == "rate"
        assert p["emotion"] == "Anxiety" and len(p["emotion_votes"]) == 5 and p["emotion_method"] == "vote"
        assert (p["age"], p["gender"], p["occupation"], p["demographics_method"]) == ("30s", "Female", "Graphic Designer", "chat")
        assert p["subcategory"] in next(c["subcategories"] for c in load_taxonomy("problems") if c["name"] == p["problem"])
    assert len({p["id"] for p in personas}) == 12
    paths = write_personas(personas, rejected, stats, tmp_path)
    assert read_personas(paths["personas"], ["test"]) == [p for p in personas if p["split"] == "test"]
    assert json.loads(paths["personas_stats"].read_text())["split.train"] == 8


def test_count_keeps_a_stratified_subset(fake_writer) -> None:
    model, _ = fake_writer
    cfg = PersonasConfig(pairs=6, min_situations=2, max_situations=4, count=6, split={"train": 4, "dev": 0, "test": 2})
    personas, _, _ = generate_personas(model, cfg)
    assert len(personas) == 6 and len({p["problem"] for p in personas}) == 6


@pytest.mark.parametrize("key", ["pairs", "max_pairs"])
def test_zero_pairs_is_refused_at_load_rather_than_looping(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        PersonasConfig(**{key: 0, "count": 4})


def test_a_weak_writer_gets_more_pairs_until_count_pass_bounded_by_max_pairs(fake_writer, caplog) -> None:
    model, _ = fake_writer
    # 4 situations per pair, a third of them rated 2: one pair cannot give 6 personas
    cfg = PersonasConfig(
        pairs=1, min_situations=2, max_situations=4, count=6, max_pairs=10, split={"train": 4, "dev": 1, "test": 1}
    )
    personas, rejected, stats = generate_personas(model, cfg)
    assert len(personas) == 6 and 1 < stats["situations.rounds"] < 10
    assert stats["situations.pairs"] == stats["situations.rounds"] and stats["alignment.kept"] >= 6
    assert len({(p["problem"], p["value"]) for p in personas}) >= 2
    bounded = cfg.model_copy(update={"max_pairs": 2})
    personas, _, stats = generate_personas(model, bounded)
    assert stats["situations.rounds"] == 2 and stats["situations.pairs"] == 2 and len(personas) < 6
    assert "max_pairs" in caplog.text
    # without `count` (the paper's setting) the configured pairs are written once
    _, _, stats = generate_personas(model, cfg.model_copy(update={"count": None, "pairs": 2}))
    assert stats["situations.rounds"] == 1 and stats["situations.pairs"] == 2


def test_a_broken_personas_file_names_the_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "personas.jsonl"
    path.write_text(
        '{"id": "p1", "split": "train", "problem": "x", "value": "y", "situation": "z", "emotion": "Fear"}\n{"id": "p2", "split": "train"}\n'
    )
    with pytest.raises(ValueError, match=r"line 2.*problem"):
        read_personas(path)


def test_steps_run_on_the_tiny_model_without_crashing(tiny_llama: Path) -> None:
    """A random model writes no parseable list: the run completes, empty, with the failure counted;
    the scoring steps work on any model."""
    model = load_chat_model(f"hf:{tiny_llama}")
    cfg = PersonasConfig(
        pairs=2, situations_max_tokens=24, reask=1, alignment_method="score", emotion_method="score", demographics_method="chat"
    )
    personas, rejected, stats = generate_personas(model, cfg)
    assert personas == [] and stats["situations.pairs_failed"] == 2 and stats["situations.calls"] == 4
    items = [
        {
            "problem": "Career and Work-Related Challenges",
            "value": "Achievement",
            "situation": "I was passed over for a promotion I worked hard for.",
        },
        {
            "problem": "Family Dynamics and Conflicts",
            "value": "Tradition",
            "situation": "My parents want me to take over the family shop.",
        },
    ]
    rate_alignment(model, items, cfg)
    label_emotions(model, items, cfg)
    demographics(model, items, cfg.model_copy(update={"reask": 0}))
    for it in items:
        assert 1 <= it["alignment"] <= 5 and it["alignment_method"] == "score"
        assert it["emotion_method"] == "score" and it["subcategory"]
        assert it["demographics_method"] in ("chat", "score") and it["age"] and it["gender"] in ("Female", "Male")
    model.close()


@pytest.mark.slow
def test_personas_and_simulate_flows_end_to_end(prefect_harness, tmp_path: Path) -> None:
    from esvr.flows.config import load_config
    from esvr.flows.personas import personas_flow
    from esvr.flows.simulate import simulate_flow
    from esvr.tasks.simulation.simulate import load_dialogues

    os.environ.setdefault("ESVR_TEST_KEY", "unused")
    with FakeOpenAIServer(Script(end_after=2, situations=3)) as server:
        fake = {"base_url": server.base_url, "api_key_env": "ESVR_TEST_KEY"}
        config = load_config(None)
        config.run.out_dir = tmp_path / "run"
        for role in ("supporter", "seeker", "persona_writer"):
            setattr(config.models, role, {"spec": f"openai:fake-{role}", **fake})  # validated on assignment
        config.personas = PersonasConfig(pairs=3, min_situations=2, max_situations=3, split={"train": 2, "dev": 1, "test": 1})
        config.simulate.max_turns = 4
        config.simulate.tvd = {"spec": "openai:fake-tvd", **fake}
        config.simulate.rg = {"spec": "openai:fake-rg", **fake}
        out = personas_flow(config)
        personas = read_personas(out["personas"])
        assert len(personas) == 6 and Counter(p["split"] for p in personas) == {"train": 3, "dev": 2, "test": 1}
        art = simulate_flow(config)
        dialogues = load_dialogues(art["dialogues"])
        assert len(dialogues) == 5 and all(d["end_reason"] == "seeker_end" for d in dialogues)
        assert Path(art["sft_train"]).read_bytes().count(b"\n") == 3 * 2 * 2  # 3 dialogues x 2 turns x (initial + alternative)
        again = simulate_flow(config)  # a rerun finds everything done
        assert load_dialogues(again["dialogues"]) == dialogues


@pytest.mark.slow
def test_no_persona_kept_names_the_step_that_dropped_them(prefect_harness, tmp_path: Path) -> None:
    """Situations that parse but all fail the alignment filter are named as such, not as a format
    problem of the situations."""
    from esvr.flows.config import load_config
    from esvr.flows.personas import personas_flow

    os.environ.setdefault("ESVR_TEST_KEY", "unused")
    with FakeOpenAIServer(Script(situations=3)) as server:
        config = load_config(None)
        config.run.out_dir = tmp_path / "run"
        config.models.persona_writer = {"spec": "openai:fake-writer", "base_url": server.base_url, "api_key_env": "ESVR_TEST_KEY"}
        # the script rates 5 or 2: nothing reaches 6
        config.personas = PersonasConfig(pairs=2, min_situations=2, max_situations=3, min_alignment=6)
        with pytest.raises(ValueError, match=r"none kept \(all 6 situations were rated below personas.min_alignment=6\)"):
            personas_flow(config)


def test_each_step_uses_its_own_model() -> None:
    """App. E.1: situations and alignment by the writer (GPT-4o), emotion votes by GPT-4o-mini."""
    from esvr.tasks.bench.simulate import ScriptedChat

    writer, emotion, demo = (ScriptedChat(Script(situations=3), cache_id=n) for n in ("writer", "emotion", "demo"))
    cfg = PersonasConfig(pairs=2, min_situations=2, max_situations=3, split={"train": 2, "dev": 1, "test": 1})
    personas, _, stats = generate_personas(writer, cfg, 0, emotion, demo)
    assert personas and all(p["emotion_method"] == "vote" and p["demographics_method"] == "chat" for p in personas)
    # the writer did steps 1-2 only; one vote request per persona (5 samples each) plus the subcategory scores
    assert writer.usage.calls == stats["situations.calls"] + stats.get("alignment.calls", 0)
    assert emotion.usage.calls == stats["emotion.calls"] + len(personas)
    assert demo.usage.calls >= len(personas)
    # without step models the writer does everything, as before
    alone = ScriptedChat(Script(situations=3), cache_id="alone")
    generate_personas(alone, cfg, 0)
    assert alone.usage.calls == writer.usage.calls + emotion.usage.calls + demo.usage.calls


def test_the_paper_recipe_names_a_model_per_persona_step() -> None:
    from esvr.flows.config import load_config

    config = load_config(Path(__file__).parents[1] / "configs" / "paper.yaml")
    assert config.models.persona_writer.spec == "openai:gpt-4o"
    assert config.personas.emotion_model is not None and config.personas.emotion_model.spec == "openai:gpt-4o-mini"
    header = (Path(__file__).parents[1] / "configs" / "paper.yaml").read_text().split("run:")[0]
    assert "persona writer is GPT-4o" in header and "GPT-4o-mini plays seeker simulator, persona writer" not in header
