"""Baseline supporters of the evaluation (paper §6.3, App. I): data loaders, fine-tuning, agents.

Fine-tuned baselines (Llama-ESConv, Llama-ExTES, Llama-Psych8k) are trained on the supporter turns
of an existing emotional-support corpus and answer with the utterance alone (no reasoning
template): `PlainSupporter`. Their training data and their evaluation prompt share one format,
`plain_messages`: a short system prompt, then the dialogue with the seeker as ``user`` and the
supporter as ``assistant``.

Corpus formats (`load_corpus`), all read from a path the user gives; nothing is downloaded:

- ``esconv``: ESConv.json / FailedESConv.json (via `esvr.tasks.common.esconv.load_esconv`).
- ``extes``: ExTES (Zheng et al., 2024), a JSON list of
  ``{"description", "scene", "content": [{"User": text}, {"AI": text, "AI Strategy": name}, ...]}``.
  Speaker keys are matched case-insensitively (``User``/``Seeker``/``Human`` and
  ``AI``/``Assistant``/``Supporter``); JSON Lines works too.
- ``psych8k``: Psych8k (Liu et al., 2023), a JSON list of ``{"instruction", "input", "output"}``:
  one patient message (``input``) and the counsellor's reply (``output``). Its ``instruction`` is the
  same boilerplate in every row and is replaced by our system prompt, so that training and
  evaluation prompts agree.

Self-disclosure ablation (App. I, Tables 22-23), `SelfDisclosureAblation` around a template
supporter: when a reply uses the Self-disclosure strategy, ``remove`` picks the next most probable
strategy (scored among the other seven) and writes the utterance again with it; ``rephrase`` has a
chat model retell the disclosed experience as other people's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from esvr.models.chat import ChatModel, Message
from esvr.models.config import InputFileError
from esvr.prompts import load_prompt
from esvr.tasks.simulation.supporter import (
    Supporter,
    SupporterReply,
    decision_note,
    format_history,
    stepwise_values_section,
    strategies,
    strategies_block,
    strategy_names,
)

log = logging.getLogger(__name__)

BASELINE_PROMPTS = ("evaluate/plain_system.txt", "evaluate/rephrase_disclosure.txt")

CorpusKind = Literal["esconv", "extes", "psych8k"]
SELF_DISCLOSURE = "Self-disclosure"

Utterances = list[dict[str, str]]

# --------------------------------------------------------------------------------------------
# Plain prompt format (fine-tuned baselines: training and evaluation)
# --------------------------------------------------------------------------------------------


def plain_messages(utterances: Sequence[Mapping[str, Any]]) -> list[Message]:
    """System prompt + the dialogue as chat turns (seeker = user, supporter = assistant)."""
    messages: list[Message] = [{"role": "system", "content": load_prompt("evaluate/plain_system.txt").strip()}]
    for i, u in enumerate(utterances):
        role = u.get("role")
        if role not in ("seeker", "supporter"):
            raise ValueError(f"utterance {i}: role must be 'seeker' or 'supporter', got {role!r}")
        messages.append({"role": "user" if role == "seeker" else "assistant", "content": str(u["text"])})
    return messages


# --------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------

_SEEKER_KEYS = {"user", "seeker", "human", "patient", "client", "usr"}
_SUPPORTER_KEYS = {"ai", "assistant", "supporter", "therapist", "counselor", "counsellor", "sys", "bot"}


def _read_json_records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        # JSON Lines
        data = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputFileError(f"{path}: line {i} is neither part of a JSON document nor a JSON line: {exc}") from None
    if isinstance(data, dict):  # some releases wrap the list, e.g. {"data": [...]}
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise InputFileError(f"{path}: expected a JSON list of records")
    return data


def _merge(utts: Utterances) -> Utterances:
    """Consecutive messages of one speaker joined into one turn."""
    out: Utterances = []
    for u in utts:
        text = u["text"].strip()
        if not text:
            continue
        if out and out[-1]["role"] == u["role"]:
            out[-1]["text"] += " " + text
        else:
            out.append({"role": u["role"], "text": text})
    return out


def _extes_dialogue(rec: Any, where: str) -> Utterances:
    if not isinstance(rec, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
    content = rec.get("content", rec.get("dialog", rec.get("conversation")))
    if not isinstance(content, list):
        raise ValueError(f"{where}: no 'content' list (keys: {sorted(rec)})")
    utts: Utterances = []
    for j, turn in enumerate(content):
        if not isinstance(turn, Mapping):
            raise ValueError(f"{where}, turn {j}: expected an object, got {type(turn).__name__}")
        role = None
        for key, value in turn.items():
            k = key.strip().lower()
            if k in _SEEKER_KEYS:
                role, text = "seeker", value
            elif k in _SUPPORTER_KEYS:
                role, text = "supporter", value
        if role is None:
            raise ValueError(f"{where}, turn {j}: no speaker key among {sorted(turn)} (expected 'User' or 'AI')")
        utts.append({"role": role, "text": str(text or "")})
    return _merge(utts)


def load_corpus(kind: CorpusKind, path: str | os.PathLike[str]) -> list[Utterances]:
    """Dialogues of a corpus as utterance lists ``[{'role': 'seeker'|'supporter', 'text'}]``.

    Errors name the file, the record and the missing field.
    """
    p = Path(path)
    if kind == "esconv":
        from esvr.tasks.common.esconv import load_esconv

        return [[{"role": r, "text": t} for r, t in d.turns()] for d in load_esconv(p)]
    if not p.is_file():
        raise FileNotFoundError(f"{kind} corpus not found: {p}")
    records = _read_json_records(p)
    if kind == "extes":
        return [_extes_dialogue(rec, f"{p}: record {i}") for i, rec in enumerate(records)]
    if kind == "psych8k":
        out = []
        for i, rec in enumerate(records):
            if not isinstance(rec, Mapping) or "input" not in rec or "output" not in rec:
                keys = sorted(rec) if isinstance(rec, Mapping) else type(rec).__name__
                raise InputFileError(f"{p}: record {i} needs 'input' and 'output' fields (has {keys})")
            out.append(_merge([{"role": "seeker", "text": str(rec["input"])}, {"role": "supporter", "text": str(rec["output"])}]))
        return out
    raise ValueError(f"unknown corpus kind {kind!r}; expected esconv, extes or psych8k")


def sft_rows(dialogues: Sequence[Utterances], max_context: int | None = 12) -> list[dict[str, Any]]:
    """One prompt/completion row per supporter turn that follows something the seeker said.

    `max_context`: utterances of history kept before each turn (long ESConv dialogues would
    otherwise not fit the training length); None keeps all.
    """
    rows = []
    for d in dialogues:
        for i, u in enumerate(d):
            if u["role"] != "supporter" or i == 0:
                continue
            history = d[:i] if max_context is None else d[max(0, i - max_context) : i]
            if not any(h["role"] == "seeker" for h in history):
                continue
            rows.append({"prompt": plain_messages(history), "completion": [{"role": "assistant", "content": u["text"]}]})
    return rows


def finetune_baseline(
    kind: CorpusKind,
    data_path: str | os.PathLike[str],
    base: str,
    cfg: Any,
    out_dir: str | os.PathLike[str],
    *,
    max_context: int | None = 12,
    dev_fraction: float = 0.05,
) -> str:
    """LoRA SFT of `base` on a corpus's supporter turns (models.training.train_sft); returns the
    chat spec ``hf:<base>+<adapter>`` of the fine-tuned baseline. `cfg` is a TrainConfig."""
    from datasets import Dataset

    from esvr.models.default_model import base_checkpoint
    from esvr.models.training import train_sft
    from esvr.tasks.common.roles import write_component

    rows = sft_rows(load_corpus(kind, data_path), max_context)
    if not rows:
        raise ValueError(f"{data_path}: no supporter turn to train on")
    n_dev = int(len(rows) * dev_fraction) if len(rows) >= 20 else 0
    train, dev = rows[n_dev:], rows[:n_dev]
    result = train_sft(
        base_checkpoint(base),
        Dataset.from_list(train),
        Dataset.from_list(dev) if dev else None,
        cfg,
        out_dir,
        metric_prefix=f"baseline.{kind}.",
    )
    write_component(result.adapter_dir, base=base, component=f"supporter-{kind}", corpus=str(data_path), examples=len(train))
    return f"hf:{base_checkpoint(base)}+{Path(result.adapter_dir).resolve()}"


# --------------------------------------------------------------------------------------------
# Agents with the Supporter interface (respond / alternative) that the simulation engine calls
# --------------------------------------------------------------------------------------------


class PlainSupporter:
    """A supporter that answers with the utterance alone (fine-tuned and plain prompt baselines).

    Target values and references are ignored: these models were not trained to use them.
    """

    def __init__(self, model: ChatModel, max_tokens: int = 128, temperature: float = 0.7):
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature

    async def respond(
        self, utterances, target_values, reference, *, seed: int = 0, calls: dict[str, int] | None = None
    ) -> SupporterReply:
        calls = {} if calls is None else calls
        calls["supporter"] = calls.get("supporter", 0) + 1
        out = await self.model.achat(
            plain_messages(utterances), n=1, temperature=self.temperature, max_tokens=self.max_tokens, seed=seed
        )
        text = " ".join((out[0] if out else "").split())
        # small models continue the transcript: keep the supporter's own message
        for marker in ("Patient:", "User:", "Seeker:", "Client:"):
            if marker in text:
                text = text.split(marker)[0].strip()
        if not text:
            text = "I hear you. Could you tell me more about how you are feeling?"
            problems = ["empty reply replaced by a neutral prompt to continue"]
        else:
            problems = []
        return SupporterReply("", "", "No.", False, "", None, text, raw=out[0] if out else "", method="plain", problems=problems)  # type: ignore[arg-type]

    async def alternative(self, *args: Any, **kwargs: Any) -> SupporterReply:
        from esvr.tasks.simulation.supporter import SupporterFailure

        raise SupporterFailure("plain supporters have no reasoning to reverse", 0, [])


class SelfDisclosureAblation:
    """A template supporter whose Self-disclosure turns are removed or rephrased (App. I)."""

    def __init__(
        self, inner: Supporter, mode: Literal["remove", "rephrase"], rephraser: ChatModel | None = None, max_tokens: int = 120
    ):
        if mode == "rephrase" and rephraser is None:
            raise ValueError("self_disclosure 'rephrase' needs a chat model to rephrase with")
        self.inner = inner
        self.mode = mode
        self.rephraser = rephraser
        self.max_tokens = max_tokens

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def respond(
        self, utterances, target_values, reference, *, seed: int = 0, calls: dict[str, int] | None = None
    ) -> SupporterReply:
        calls = {} if calls is None else calls
        reply = await self.inner.respond(utterances, target_values, reference, seed=seed, calls=calls)
        if reply.strategy != SELF_DISCLOSURE:
            return reply
        if self.mode == "remove":
            return await self._next_strategy(reply, utterances, target_values, reference, seed, calls)
        return await self._rephrase(reply, seed, calls)

    async def alternative(self, *args: Any, **kwargs: Any) -> SupporterReply:
        return await self.inner.alternative(*args, **kwargs)

    async def _next_strategy(
        self, reply: SupporterReply, utterances, target_values, reference, seed: int, calls: dict[str, int]
    ) -> SupporterReply:
        model = self.inner.model
        history = format_history(utterances)
        tv = stepwise_values_section(target_values)
        note = decision_note(reference, reply.reference_used)
        system = {"role": "system", "content": load_prompt("supporter/system.txt").strip()}
        others = [s for s in strategy_names() if s != SELF_DISCLOSURE]
        calls["self_disclosure"] = calls.get("self_disclosure", 0) + 2
        ask = load_prompt("supporter/stepwise_strategy.txt").format(
            strategies=strategies_block(), dialogue_history=history, target_values=tv, decision_note=note
        )
        dist = await model.ascore_choices([system, {"role": "user", "content": ask}], others)
        strategy = max(others, key=lambda s: (dist.get(s, 0.0), -others.index(s)))
        desc = dict(strategies())[strategy]
        prompt = load_prompt("supporter/stepwise_response.txt").format(
            dialogue_history=history, target_values=tv, decision_note=note, strategy=strategy, strategy_description=desc
        )
        out = await model.achat(
            [system, {"role": "user", "content": prompt}],
            n=1,
            temperature=self.inner.settings.temperature,
            max_tokens=self.max_tokens,
            seed=seed + 77,
        )
        problem = f"self-disclosure removed; next most probable strategy: {strategy}; original: {reply.response}"
        return _revised(reply, out, problem, strategy=strategy, strategy_raw=strategy)

    async def _rephrase(self, reply: SupporterReply, seed: int, calls: dict[str, int]) -> SupporterReply:
        assert self.rephraser is not None
        calls["self_disclosure"] = calls.get("self_disclosure", 0) + 1
        prompt = load_prompt("evaluate/rephrase_disclosure.txt").strip().format(response=reply.response)
        out = await self.rephraser.achat(
            [{"role": "user", "content": prompt}], n=1, temperature=0.0, max_tokens=self.max_tokens, seed=seed + 78
        )
        return _revised(reply, out, f"self-disclosure rephrased as others' experience; original: {reply.response}")


def _revised(reply: SupporterReply, out: list[str], problem: str, **fields: Any) -> SupporterReply:
    """The reply with the model's new response (and `fields`), the change recorded among its
    problems; the reply as it was when the model said nothing."""
    text = " ".join((out[0] if out else "").split()).strip('"“” ')
    if not text:
        return reply
    return replace(reply, response=text, problems=[*reply.problems, problem], **fields)
