"""ESConv (Liu et al., 2021): loading and normalizing emotional-support conversations.

ESConv ships in several shapes that name the same things differently:

- ``ESConv.json`` (the publishers' release): speakers ``seeker`` / ``supporter``;
- ``FailedESConv.json`` (its failed conversations): speakers ``speaker`` / ``listener``;
- conversions on the hub (e.g. ``thu-coai/esconv``): one JSON document per row in a ``text``
  column, with ``usr`` / ``sys`` speakers and the strategy as a top-level key of each turn;
- JSON Lines (one dialogue per line, as PPDPP and other projects distribute ESConv), in the same
  ``usr`` / ``sys`` / per-turn ``strategy`` shape, often with no survey at all.

`load_esconv` turns any of them into `Dialogue` objects whose speakers are always ``seeker`` or
``supporter`` and whose survey scores are ints or None. A missing or malformed survey field never
fails the load: it becomes None and is counted in `LoadReport`, because every analysis skips such
dialogues itself and says how many.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from esvr.models.config import InputFileError

log = logging.getLogger(__name__)

Role = Literal["seeker", "supporter"]

#: every speaker name seen in ESConv variants, mapped to the role
SPEAKER_ROLES: dict[str, Role] = {
    "seeker": "seeker",
    "speaker": "seeker",
    "usr": "seeker",
    "user": "seeker",
    "supporter": "supporter",
    "listener": "supporter",
    "sys": "supporter",
    "system": "supporter",
}

SEEKER_SURVEY_FIELDS = ("initial_emotion_intensity", "final_emotion_intensity", "empathy", "relevance")


@dataclass
class Utterance:
    role: Role
    text: str
    #: the supporter's strategy annotation (e.g. "Question"), if any
    strategy: str | None = None
    #: the seeker's 1-5 feedback annotation, if any
    feedback: int | None = None


@dataclass
class Dialogue:
    dialog_id: str
    utterances: list[Utterance]
    emotion_type: str | None = None
    problem_type: str | None = None
    experience_type: str | None = None
    situation: str | None = None
    #: seeker's negative-emotion intensity before / after the conversation, 1 (lowest) .. 5
    initial_intensity: int | None = None
    final_intensity: int | None = None
    empathy: int | None = None
    relevance: int | None = None
    supporter_relevance: int | None = None

    def turns(self, role: Role | None = None) -> list[tuple[Role, str]]:
        """Consecutive messages of one speaker merged into one turn (ESConv splits turns into
        several messages), optionally only those of `role`."""
        merged: list[tuple[Role, list[str]]] = []
        for u in self.utterances:
            text = u.text.strip()
            if not text:
                continue
            if merged and merged[-1][0] == u.role:
                merged[-1][1].append(text)
            else:
                merged.append((u.role, [text]))
        out = [(r, " ".join(parts)) for r, parts in merged]
        return [t for t in out if role is None or t[0] == role]

    def seeker_turns(self) -> list[str]:
        return [text for _, text in self.turns("seeker")]


@dataclass
class LoadReport:
    dialogues: int = 0
    #: survey fields that were absent or not an integer, by field name
    missing_survey: Counter = field(default_factory=Counter)
    unknown_speakers: Counter = field(default_factory=Counter)
    skipped_utterances: int = 0


def _to_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        try:
            f = float(str(value).strip())
        except ValueError:
            return None
        return int(f) if f == int(f) else None


def _strategy(value: Any) -> str | None:
    # some conversions store a list of strategies per turn; ESConv annotates one
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value if v)
    return str(value) if value else None


def normalize_dialogue(raw: dict[str, Any], dialog_id: str, report: LoadReport) -> Dialogue:
    """One raw ESConv record -> `Dialogue`; survey gaps and unknown speakers go to `report`."""
    turns = raw.get("dialog")
    if not isinstance(turns, list):
        raise ValueError(f"dialogue {dialog_id}: no 'dialog' list (keys: {sorted(raw)})")
    utterances = []
    for t in turns:
        speaker = str(t.get("speaker", "")).strip().lower()
        role = SPEAKER_ROLES.get(speaker)
        if role is None:
            report.unknown_speakers[speaker] += 1
            report.skipped_utterances += 1
            continue
        ann = t.get("annotation") or {}
        text = t.get("content", t.get("text", "")) or ""
        strategy = _strategy(ann.get("strategy", t.get("strategy")))
        feedback = _to_int(ann.get("feedback", t.get("feedback")))
        utterances.append(Utterance(role, str(text), strategy, feedback))
    survey = raw.get("survey_score") or {}
    seeker = survey.get("seeker") or {}
    supporter = survey.get("supporter") or {}
    scores = {}
    for name in SEEKER_SURVEY_FIELDS:
        scores[name] = _to_int(seeker.get(name))
        if scores[name] is None:
            report.missing_survey[name] += 1
    report.dialogues += 1
    return Dialogue(
        dialog_id=dialog_id,
        utterances=utterances,
        emotion_type=raw.get("emotion_type"),
        problem_type=raw.get("problem_type"),
        experience_type=raw.get("experience_type"),
        situation=raw.get("situation"),
        initial_intensity=scores["initial_emotion_intensity"],
        final_intensity=scores["final_emotion_intensity"],
        empathy=scores["empathy"],
        relevance=scores["relevance"],
        supporter_relevance=_to_int(supporter.get("relevance")),
    )


def _records_from_hub(hub_id: str) -> list[dict[str, Any]]:
    try:
        from datasets import load_dataset
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RuntimeError("loading ESConv from the hub needs the datasets package") from exc
    try:
        ds = load_dataset(hub_id)
    except Exception as exc:  # the hub raises many types; say what was asked and why it failed
        raise FileNotFoundError(f"ESConv {hub_id!r} is neither a file nor a loadable hub dataset: {exc}") from exc
    records = []
    for split in ds:
        for row in ds[split]:
            # thu-coai/esconv keeps each dialogue as a JSON string in 'text'
            records.append(json.loads(row["text"]) if isinstance(row.get("text"), str) else dict(row))
    return records


def read_records(p: Path) -> list[Any]:
    """A JSON document (a list of dialogues, or an object wrapping one) or JSON Lines."""
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":  # "Extra data" = a second document follows: JSON Lines
            raise InputFileError(f"{p}: not valid JSON: {exc}") from exc
        return _json_lines(p, text)
    if isinstance(data, dict) and isinstance(data.get("dialog"), list):
        return [data]  # JSON Lines holding one dialogue
    if isinstance(data, dict):  # some conversions wrap the list
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise InputFileError(f"{p}: expected a list of dialogues or one dialogue per line")
    return data


def _json_lines(p: Path, text: str) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{p}:{lineno}: not valid JSON: {exc}") from exc
    return records


def is_hub_id(source: str) -> bool:
    """`owner/name` that is no path: `external/ESConv.json` is a missing file, not a dataset."""
    return (
        source.count("/") == 1
        and not source.startswith((".", "/", "~"))
        and Path(source).suffix.lower() not in (".json", ".jsonl", ".txt")
    )


def load_esconv(path: str | Path, report: LoadReport | None = None) -> list[Dialogue]:
    """ESConv dialogues from a JSON or JSON Lines file, a folder holding one, or a hub dataset id.

    Pass a `LoadReport` to learn how many survey fields were missing.
    """
    report = report if report is not None else LoadReport()
    p = Path(path)
    if p.is_dir():
        candidates = [p / "ESConv.json", *sorted(p.glob("*.json")), *sorted(p.glob("*.jsonl"))]
        p = next((c for c in candidates if c.is_file()), p / "ESConv.json")
        if not p.is_file():
            raise FileNotFoundError(f"no ESConv .json or .jsonl file in folder {path}")
    if p.is_file():
        records, source = read_records(p), str(p)
    elif is_hub_id(str(path)):
        records, source = _records_from_hub(str(path)), str(path)
    else:
        raise FileNotFoundError(f"ESConv file not found: {path}")
    dialogues = []
    for i, raw in enumerate(records):
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: dialogue {i} is a {type(raw).__name__}, expected an object")
        dialogues.append(normalize_dialogue(raw, str(raw.get("dialog_id", i)), report))
    if report.missing_survey:
        log.info("%s: missing survey fields %s", source, dict(report.missing_survey))
    if report.unknown_speakers:
        log.warning("%s: skipped utterances of unknown speakers %s", source, dict(report.unknown_speakers))
    return dialogues
