"""`esvr personas import`: ESConv-style records and role cards mapped onto the taxonomies, and
personas.jsonl validated against them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esvr.tasks.simulation.personas import PersonasConfig, import_personas, read_personas, read_role_cards
from esvr.tasks.simulation.seeker import seeker_system_prompt

ESCONV_RECORDS = [
    {
        "experience_type": "Current Experience",
        "emotion_type": "anxiety",
        "problem_type": "job crisis",
        "situation": "I am on short term disability and I am afraid I will lose my job if I don't go back soon.",
        "value": "Security: personal",
        "dialog": [{"speaker": "usr", "text": "Hello."}],
    },
    {
        "emotion_type": "nervousness",
        "problem_type": "breakup with partner",
        "situation": "My girlfriend of five years left me for my best friend.",
        "value": "Benevolence: dependability",
    },
    {
        "emotion_type": "pain",
        "problem_type": "alcohol abuse",
        "situation": "I have been drinking every night since I moved out and I hate who I am becoming.",
    },
]

ROLE_CARDS = """Age: 34
Gender: female
Occupation: nurse
Emotion: worried
Value: Achievement
Problem description: My boss humiliated me in front of everyone and I think I will be fired.
I have not slept properly in weeks.

---
Age range: twenties
Sex: M
Occupation: graduate student
Problem: I failed my thesis defence and my supervisor stopped answering my emails.
"""


def _sources(tmp_path: Path) -> list[Path]:
    records = tmp_path / "esconv_personas.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in ESCONV_RECORDS) + "\n")
    cards = tmp_path / "cards.txt"
    cards.write_text(ROLE_CARDS)
    return [records, cards]


def test_role_cards_keep_multi_line_descriptions(tmp_path: Path):
    path = tmp_path / "cards.txt"
    path.write_text(ROLE_CARDS)
    (where1, card1), (where2, card2) = read_role_cards(path)
    assert where1.endswith("cards.txt:1") and where2.endswith("cards.txt:10")
    assert card1["situation"].endswith("I think I will be fired. I have not slept properly in weeks.")
    assert card2 == {
        "age": "twenties",
        "gender": "M",
        "occupation": "graduate student",
        "situation": "I failed my thesis defence and my supervisor stopped answering my emails.",
    }


def test_rules_map_what_they_can_and_report_the_rest(tmp_path: Path):
    personas, report = import_personas(_sources(tmp_path), None, PersonasConfig(), split="test")
    by_situation = {p["situation"][:20]: p for p in personas}
    job = by_situation["I am on short term d"]
    assert (job["problem"], job["subcategory"], job["emotion"]) == (
        "Career and Work-Related Challenges",
        "Job loss or career setbacks",
        "Anxiety",
    )
    assert job["mapping"]["problem"] == "rule" and job["mapping"]["emotion"] == "given" and job["split"] == "test"
    breakup = by_situation["My girlfriend of fiv"]
    assert breakup["problem"] == "Romantic Relationship Challenges" and breakup["emotion"] == "Anxiety"
    card = by_situation["My boss humiliated m"]
    assert (card["problem"], card["emotion"], card["value"]) == ("Career and Work-Related Challenges", "Anxiety", "Achievement")
    assert (card["age"], card["gender"], card["occupation"]) == ("30s", "Female", "Nurse")
    assert card["situation"].endswith("I have not slept properly in weeks.")
    # no rule maps alcohol abuse / pain, and no card says which value is at stake: left out, with the reason
    assert len(personas) == 3 and report.personas == 3
    reasons = {d["source"].rsplit("/", 1)[-1]: d["reason"] for d in report.dropped}
    assert (
        "problem" in reasons["esconv_personas.jsonl: record 3"]
        and "no persona writer" in reasons["esconv_personas.jsonl: record 3"]
    )
    assert "value" in reasons["cards.txt:10"]
    # every record is counted, kept or not: 4 categories by rule, 1 left out; 3 values given, 2 left out
    assert report.fields["problem"] == {"rule": 4, "left out": 1} and report.fields["value"] == {"given": 3, "left out": 2}
    assert report.fields["age"] == {"given": 2, "left out": 3}
    # what was written is what read_personas accepts
    path = tmp_path / "personas.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in personas))
    assert len(read_personas(path, ["test"])) == 3


def test_the_writer_guesses_what_the_rules_leave(stub_server, tmp_path: Path):
    from esvr.models.openai_backend import OpenAIChat

    def reply(req):
        text = req["messages"][-1]["content"]
        if "problem categories" in text:
            return '<dist>{"Self-Esteem, Identity, and Personal Growth": 0.9, "Family Dynamics and Conflicts": 0.1}'
        if "emotions does the person" in text:
            return '<dist>{"Sadness": 0.8, "Shame": 0.2}'
        if "Human values" in text:
            return '<dist>{"Achievement": 1.0}'
        return '<dist>{"Issues with self-esteem and confidence": 1.0}'

    stub_server.reply = reply
    built = []

    def writer():
        built.append(1)
        return OpenAIChat("stub-writer", base_url=stub_server.base_url, max_retries=1)

    personas, report = import_personas(_sources(tmp_path), writer, PersonasConfig(), seed=0)
    assert len(personas) == 5 and not report.dropped and built == [1]
    drinking = next(p for p in personas if p["situation"].startswith("I have been drinking"))
    assert (drinking["problem"], drinking["emotion"], drinking["value"]) == (
        "Self-Esteem, Identity, and Personal Growth",
        "Sadness",
        "Achievement",
    )
    assert drinking["mapping"] == {
        "problem": "model",
        "emotion": "model",
        "value": "model",
        "subcategory": "model",
        "age": "left out",
        "gender": "left out",
        "occupation": "left out",
    }
    assert report.fields["value"] == {"given": 3, "model": 2} and {p["split"] for p in personas} <= {"train", "dev", "test"}
    # a file the rules fully map never starts the writer
    built.clear()
    only = tmp_path / "one.jsonl"
    only.write_text(json.dumps(ESCONV_RECORDS[0]) + "\n")
    import_personas([only], writer, PersonasConfig(), split="dev")
    assert built == []


def test_read_personas_names_file_line_and_field_of_every_problem(tmp_path: Path):
    good = {
        "id": "p1",
        "split": "test",
        "problem": "Career and Work-Related Challenges",
        "value": "Achievement",
        "situation": "I lost my job.",
        "emotion": "Anxiety",
    }
    path = tmp_path / "personas.jsonl"
    lines = [
        good,
        {**good, "problem": "job crisis"},
        {**good, "emotion": "pain", "value": "Kindness"},
        {**good, "split": "holdout"},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{oops\n")
    with pytest.raises(ValueError) as exc:
        read_personas(path)
    message = str(exc.value)
    assert str(path) in message
    assert "line 2, problem: 'job crisis' is not one of" in message
    assert "line 3, emotion: 'pain'" in message and "line 3, value: 'Kindness'" in message
    assert "line 4, split: 'holdout'" in message and "line 5: not valid JSON" in message
    assert "line 1," not in message and "line 1:" not in message


def test_the_seeker_prompt_holds_the_whole_situation(tmp_path: Path):
    personas, _ = import_personas(_sources(tmp_path)[1:], None, PersonasConfig(), split="test")
    prompt = seeker_system_prompt(personas[0])
    assert "I think I will be fired. I have not slept properly in weeks." in prompt
    assert "Occupation: Nurse" in prompt and "Age range: 30s" in prompt


def test_cli_imports_and_the_stage_command_still_runs(tmp_path: Path, capsys):
    from esvr.flows.cli import build_parser, main

    assert build_parser().parse_args(["personas"]).stage == "personas"  # the stage itself is unchanged
    sources = _sources(tmp_path)
    out = tmp_path / "run" / "personas" / "personas.jsonl"
    code = main(
        [
            "personas",
            "import",
            *map(str, sources),
            "--no-writer",
            "--split",
            "test",
            "--personas",
            str(out),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0
    assert len(read_personas(out)) == 3
    report = json.loads((out.parent / "import_report.json").read_text())
    assert report["personas"] == 3 and len(report["dropped"]) == 2
    assert "3 personas, 2 records left out" in capsys.readouterr().out
    assert main(["personas", "import", str(tmp_path / "absent.jsonl"), "--no-writer"]) == 2
    assert "no persona source file" in capsys.readouterr().err
