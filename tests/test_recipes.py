"""Recipe inheritance (`extends`), the companion recipes of paper.yaml, variants and row checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from esvr.flows.cli import main
from esvr.flows.config import ABSENT, ConfigError, config_diff, flatten, load_config
from esvr.flows.recipe import merge, own_keys, read_recipe, recipe_chain

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = CONFIGS / "paper.yaml"
COMPANIONS = sorted(p for p in CONFIGS.glob("paper-*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_child_overrides_parent_mappings_merge_lists_replace(tmp_path: Path):
    write(tmp_path / "base.yaml", "run: {name: base, seed: 3}\nsimulate: {splits: [train, dev], max_turns: 20}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nrun: {name: child}\nsimulate: {splits: [test]}\n")
    config = load_config(child)
    assert config.run.name == "child" and config.run.seed == 3  # merged mapping
    assert config.simulate.splits == ["test"] and config.simulate.max_turns == 20  # list replaced


def test_chains_resolve_relative_to_each_recipe(tmp_path: Path):
    (tmp_path / "a").mkdir()
    write(tmp_path / "root.yaml", "run: {seed: 1, name: root}\n")
    write(tmp_path / "a" / "mid.yaml", "extends: ../root.yaml\nrun: {seed: 2}\n")
    leaf = write(tmp_path / "a" / "leaf.yaml", "extends: mid.yaml\nrun: {name: leaf}\n")
    assert [p.name for p in recipe_chain(leaf)] == ["leaf.yaml", "mid.yaml", "root.yaml"]
    config = load_config(leaf)
    assert (config.run.seed, config.run.name) == (2, "leaf")


def test_cycle_is_an_error_naming_the_files(tmp_path: Path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as err:
        load_config(tmp_path / "a.yaml")
    assert "a.yaml" in str(err.value) and "b.yaml" in str(err.value)


def test_missing_parent_names_it_and_the_recipe_that_extends_it(tmp_path: Path):
    child = write(tmp_path / "child.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"child.yaml: 'extends: nowhere.yaml' names no file \(.*nowhere.yaml not found\)"):
        load_config(child)


def test_overrides_apply_after_the_chain(tmp_path: Path):
    write(tmp_path / "base.yaml", "simulate: {max_turns: 20}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nsimulate: {max_turns: 5}\n")
    assert load_config(child, ["simulate.max_turns=2"]).simulate.max_turns == 2


@pytest.mark.parametrize("path", COMPANIONS, ids=lambda p: p.name)
def test_companion_is_paper_plus_exactly_its_own_keys(path: Path):
    assert recipe_chain(path)[1] == PAPER.resolve()
    expected = load_config(None)  # validate paper + the companion's own keys, merged by hand
    expected = type(expected).model_validate(merge(read_recipe(PAPER), own_keys(path)))
    assert load_config(path) == expected
    # and nothing it does not say differs from paper.yaml (a list it sets is replaced whole)
    own = flatten(own_keys(path))
    for key in config_diff(load_config(path), load_config(PAPER)):
        whole = key.split("[")[0]
        assert any(whole == k or whole.startswith(k + ".") or k.startswith(whole + ".") for k in own), (
            f"{path.name}: {key} differs from paper.yaml but the recipe does not set it"
        )


def test_paper_sft_at_2048_tokens_runs_the_measured_setting_and_keeps_the_papers_batch():
    """Micro-batch 4 without checkpointing (66 GB on an 80 GB H100, docs/scale.md); the rest keep the CUDA default."""
    config = load_config(PAPER)
    rg = config.train_rg
    sft = [config.train_tvd.train, rg.single_turn.sft, rg.multi_turn.sft, config.evaluate.finetune_train]
    for section in sft:
        assert (section.max_length, section.batch_size, section.gradient_checkpointing) == (2048, 4, False)
    # measured only with checkpointing: DPO, and nothing at 4,096 tokens
    for section in (rg.single_turn.dpo, rg.multi_turn.dpo, config.train_supporter.sft, config.train_supporter.dpo):
        assert section.gradient_checkpointing is None
    for section in [*sft, rg.single_turn.dpo, rg.multi_turn.dpo, config.train_supporter.sft, config.train_supporter.dpo]:
        assert section.batch_size * section.grad_accum == 16


def test_paper_emotion_is_papers_emotion_variant():
    """configs/paper-emotion.yaml runs alone what paper.yaml trains as its `variants.emotion`."""
    alone, variant = load_config(CONFIGS / "paper-emotion.yaml"), load_config(PAPER).variant("emotion")
    for section in ("train_rg", "simulate", "train_supporter"):
        assert getattr(alone, section) == getattr(variant, section), section


def test_paper_has_every_table3_row_and_each_is_produced():
    config = load_config(PAPER)
    names = [row.name for row in config.evaluate.supporters]
    assert len(names) == 9
    produced = config.pipeline_artifacts()
    for row in config.evaluate.supporters:
        if row.component and row.component.startswith("pipeline:"):
            assert row.component.removeprefix("pipeline:") in produced
    emotion = config.variant("emotion")
    assert emotion.run.out_dir == config.run.out_dir / "variants" / "emotion"
    assert emotion.run.tracking_dir == config.run.out_dir  # one MLflow store for the whole run
    assert emotion.train_rg.with_values is False and emotion.train_supporter.reward == "emotion"


def test_row_naming_an_artifact_nothing_produces_fails_at_load(tmp_path: Path):
    child = write(tmp_path / "r.yaml", f"extends: {PAPER}\nvariants: null\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert "Emotion-Reinforced SFT" in str(err.value) and "pipeline:emotion_sft" in str(err.value)


def test_row_whose_stage_is_left_out_fails_at_load(tmp_path: Path):
    child = write(tmp_path / "r.yaml", f"extends: {PAPER}\nrun: {{stages: [personas, evaluate, report]}}\n")
    with pytest.raises(ConfigError, match="train_supporter"):
        load_config(child)


def test_unknown_stage_fails_at_load():
    with pytest.raises(ConfigError, match="run.stages.*simulat"):
        load_config(None, ["run.stages=[simulat]"])


def test_bad_set_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["simulate.splits=[train,"])
    with pytest.raises(ConfigError, match="simulate.max_turns"):
        load_config(None, ["simulate.max_turns.x=1"])


def test_config_show_diff_prints_only_the_childs_changes(capsys, tmp_path: Path):
    child = write(tmp_path / "child.yaml", f"extends: {PAPER}\nsimulate: {{max_turns: 3}}\n")
    assert main(["config", "show", "--config", str(child), "--diff"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert lines == ["simulate.max_turns: 3  # was 20"]


def test_config_diff_marks_keys_one_side_lacks():
    base = load_config(PAPER)
    child = base.model_copy(update={"variants": {}})
    diff = config_diff(child, base)
    assert diff and all(ABSENT in (before, after) for before, after in diff.values())
    assert diff["variants.emotion.train_supporter.reward"] == ("emotion", ABSENT)
