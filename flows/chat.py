"""`esvr chat`: talk to a trained supporter, with the target value detector and reference generator in the loop.

`ChatSession` is the function API (tests and other front ends use it): ``respond(user_text)``
returns a `Reply`; ``respond_stream(user_text, on_text)`` hands the reply's text to `on_text` piece
by piece as the model writes it (the four reasoning steps too with ``show_reasoning``). Each turn
runs exactly the simulation's supporter turn (`esvr.tasks.simulation.simulate.Agents`, `esvr.tasks.simulation.supporter`):
TVD -> target values, RG -> reference response, supporter -> four steps and the response; a reply
that ignores the template is re-asked / built stepwise as configured in ``simulate``.

Before any of that, every user message passes the crisis guard (`esvr.tasks.simulation.crisis`): a sign of
suicidal intent or self-harm gets the fixed safe reply instead of value reinforcement, and the
event is logged. `run_terminal` is the interactive loop on top.

`resolve_supporter` turns ``--supporter REF`` into a chat model spec: an MLflow run id (a training
run with an ``adapter`` artifact, or a `train_supporter` run, whose DPO model is taken, else its
SFT model), ``mlflow:<run_id>``, an adapter folder with component.json, a model spec, or
``latest`` (the newest `train_supporter` run of the experiment).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from esvr.models.chat import ChatModel
from esvr.models.config import ConfigError, ModelConfig
from esvr.prompts import load_prompt
from esvr.tasks.common import roles
from esvr.tasks.components.tvd import TVDMethod
from esvr.tasks.simulation.crisis import CrisisGuard
from esvr.tasks.simulation.simulate import Agents, run_coroutine, supporter_settings
from esvr.tasks.simulation.supporter import (
    Supporter,
    SupporterFailure,
    SupporterReply,
    SupporterSettings,
    TemplateError,
    parse_supporter_reply,
    supporter_messages,
)

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_RESPONSE_FIELD = re.compile(r"^[ \t>*_\-•]*response[ \t*_]*:[ \t*_]*", re.IGNORECASE | re.MULTILINE)


@dataclass
class Reply:
    text: str
    #: the four steps (step1..step4) of the supporter's reasoning; None for a crisis reply
    reasoning: dict[str, str] | None
    crisis: bool = False
    target_values: list[str] | None = None
    reference: str | None = None
    #: 'template', 'stepwise' (the small-model fallback), 'crisis', or 'failed'
    method: str = "template"
    strategy: str | None = None
    raw: str = ""


@dataclass
class ChatSession:
    """One conversation with a supporter. The first user message is the seeker's situation."""

    supporter: ChatModel
    tvd: ChatModel | None = None
    rg: ChatModel | None = None
    guard: CrisisGuard = field(default_factory=CrisisGuard)
    settings: SupporterSettings = field(default_factory=SupporterSettings)
    tvd_method: TVDMethod = "generate"
    tvd_max_tokens: int = 48
    rg_max_tokens: int = 160
    seed: int = 0

    def __post_init__(self) -> None:
        self.utterances: list[dict[str, Any]] = []
        self.replies: list[Reply] = []
        # the simulation's agents; the seeker is the person at the terminal
        self._agents = Agents(
            supporter=Supporter(self.supporter, self.settings),
            seeker=None,  # type: ignore[arg-type]  # the person at the terminal answers, not a model
            tvd=self.tvd,
            rg=self.rg,  # type: ignore[arg-type]
            tvd_method=self.tvd_method,
            tvd_max_tokens=self.tvd_max_tokens,
            rg_max_tokens=self.rg_max_tokens,
        )

    @staticmethod
    def opening() -> str:
        return load_prompt("seeker/opening.txt").strip()

    @property
    def turn(self) -> int:
        return len(self.replies) + 1

    def _turn_seed(self) -> int:
        return self.seed + 1000 * self.turn

    def _crisis(self, user_text: str) -> Reply | None:
        earlier = [u["text"] for u in self.utterances[:-1] if u["role"] == "seeker"]
        check = self.guard.check(user_text, turn=self.turn, recent=earlier)
        if not check.flagged:
            return None
        return Reply(self.guard.reply(), None, crisis=True, method="crisis")

    def _inputs(self) -> tuple[list[str] | None, str | None]:
        calls: dict[str, int] = {}
        seed = self._turn_seed()
        tv = run_coroutine(self._agents.target_values(self.utterances, seed, calls))
        ref = run_coroutine(self._agents.reference(self.utterances, tv, seed, calls))
        return tv, ref

    def _finish(self, reply: Reply) -> Reply:
        self.utterances.append({"role": "supporter", "text": reply.text})
        self.replies.append(reply)
        return reply

    def _from(self, r: SupporterReply, tv: list[str] | None, ref: str | None) -> Reply:
        return Reply(r.response, r.steps, False, tv, ref, r.method, r.strategy, r.raw)

    def _fallback(self, tv: list[str] | None, ref: str | None) -> Reply:
        """The simulation's path: re-asks, then the stepwise fallback when configured."""
        try:
            r = run_coroutine(self._agents.supporter.respond(self.utterances, tv, ref, seed=self._turn_seed()))
        except SupporterFailure as err:
            text = "I'm sorry, I lost my train of thought. Could you tell me a little more about what's on your mind?"
            return Reply(text, None, False, tv, ref, "failed", None, "\n---\n".join(err.replies))
        return self._from(r, tv, ref)

    def respond(self, user_text: str) -> Reply:
        """The supporter's reply to one user message (no streaming)."""
        self.utterances.append({"role": "seeker", "text": user_text.strip()})
        crisis = self._crisis(user_text)
        if crisis is not None:
            return self._finish(crisis)
        tv, ref = self._inputs()
        return self._finish(self._fallback(tv, ref))

    def respond_stream(self, user_text: str, on_text: Callable[[str], None], *, show_reasoning: bool = False) -> Reply:
        """Like `respond`, handing text to `on_text` as the model writes it.

        Without `show_reasoning` only the response (the text after '-Response:') is streamed. When
        the streamed reply breaks the template, the re-ask / stepwise path produces the reply and
        its response is handed over whole, after a line break.
        """
        self.utterances.append({"role": "seeker", "text": user_text.strip()})
        crisis = self._crisis(user_text)
        if crisis is not None:
            on_text(crisis.text)
            return self._finish(crisis)
        tv, ref = self._inputs()
        messages = supporter_messages(self.utterances, tv, ref)
        kwargs = dict(max_tokens=self.settings.max_tokens, temperature=self.settings.temperature, seed=self._turn_seed())
        raw = "".join(_stream_response(self.supporter.stream(messages, **kwargs), on_text, show_reasoning))
        try:
            reply = self._from(parse_supporter_reply(raw), tv, ref)
        except TemplateError:
            reply = self._fallback(tv, ref)
            on_text(("\n" if raw.strip() else "") + (_render_steps(reply) if show_reasoning and reply.reasoning else reply.text))
        return self._finish(reply)


def _stream_response(pieces: Iterator[str], on_text: Callable[[str], None], show_reasoning: bool) -> Iterator[str]:
    """Yield every piece; pass to `on_text` all of them (show_reasoning) or only the response's text."""
    buf = ""
    sent = 0  # characters of the response already handed over
    for piece in pieces:
        yield piece
        if show_reasoning:
            on_text(piece)
            continue
        buf += piece
        m = _RESPONSE_FIELD.search(buf)
        if not m:
            continue
        body = buf[m.end() :]
        stop = re.search(r"\n[ \t]*\n", body)  # the response is the first paragraph
        body = body[: stop.start()] if stop else body
        if len(body) > sent:
            on_text(body[sent:])
            sent = len(body)


def _render_steps(reply: Reply) -> str:
    steps = reply.reasoning or {}
    return "\n".join(f"[{k}] {v}" for k, v in steps.items())


def run_terminal(
    session: ChatSession,
    *,
    show_reasoning: bool = False,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    prompt: str = "you> ",
) -> int:
    """The interactive loop: read a line, stream the reply; '/quit' or end of input stops."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    write(f"supporter> {session.opening()}\n(type /quit to leave)\n")
    while True:
        write(prompt)
        line = stdin.readline()
        if not line or line.strip() in {"/quit", "/exit"}:
            write("\n")
            return 0
        if not line.strip():
            continue
        write("supporter> ")
        reply = session.respond_stream(line, write, show_reasoning=show_reasoning)
        write("\n")
        if show_reasoning and not reply.crisis:
            write(
                f"  (target values: {', '.join(reply.target_values or []) or 'none'}; "
                f"reference used: {_reference_used(reply)}; strategy: {reply.strategy or '-'}; {reply.method})\n"
            )
            write(f"supporter (response)> {reply.text}\n")


def _reference_used(reply: Reply) -> str:
    step3 = (reply.reasoning or {}).get("step3", "")
    return "yes" if step3.lower().startswith("yes") else "no" if step3 else "-"


# --------------------------------------------------------------------------------------------
# --supporter REF
# --------------------------------------------------------------------------------------------


@dataclass
class ResolvedSupporter:
    spec: str
    #: where it came from (for the banner), and the TVD/RG specs the training run recorded
    source: str
    tvd: str | None = None
    rg: str | None = None


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _children(client: Any, run: Any) -> list[Any]:
    return client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
        order_by=["attributes.start_time DESC"],
    )


def _recorded(run: Any, key: str) -> str | None:
    value = run.data.tags.get(key)
    return None if value in (None, "", "none") else value


def _from_train_supporter_run(client: Any, run: Any) -> ResolvedSupporter:
    kids = _children(client, run)
    for stage in ("dpo", "sft"):
        for kid in kids:
            if kid.data.tags.get("esvr.training_stage") == stage and kid.info.status == "FINISHED":
                spec = roles.resolve_component(f"mlflow:{kid.info.run_id}")
                return ResolvedSupporter(
                    spec,
                    f"{stage} model of train_supporter run {run.info.run_id}",
                    _recorded(run, "esvr.tvd"),
                    _recorded(run, "esvr.rg"),
                )
    raise FileNotFoundError(f"MLflow run {run.info.run_id} is a train_supporter run without a finished SFT or DPO training run")


def resolve_supporter(ref: str, experiment: str | None = None) -> ResolvedSupporter:
    """A chat spec for ``--supporter REF`` (see the module docstring)."""
    ref = ref.strip()
    if ref == "latest":
        client = _client()
        exp = client.get_experiment_by_name(experiment) if experiment else None
        if exp is None:
            raise FileNotFoundError(
                f"no MLflow experiment {experiment!r}: train a supporter first (esvr train-supporter) or pass --supporter"
            )
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string="tags.`esvr.stage` = 'train_supporter' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            raise FileNotFoundError(f"no finished train_supporter run in MLflow experiment {experiment!r}; pass --supporter")
        return _from_train_supporter_run(client, runs[0])
    run_id = ref[len("mlflow:") :] if ref.startswith("mlflow:") and "/" not in ref[len("mlflow:") :] else ref
    if _RUN_ID.match(run_id):
        from mlflow.exceptions import MlflowException

        client = _client()
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise FileNotFoundError(f"--supporter {ref!r}: {exc.message} in the MLflow store {client.tracking_uri}") from None
        if run.data.tags.get("esvr.stage") == "train_supporter":
            return _from_train_supporter_run(client, run)
        parent = run.data.tags.get("mlflow.parentRunId")
        tvd = rg = None
        if parent:
            p = client.get_run(parent)
            tvd, rg = _recorded(p, "esvr.tvd"), _recorded(p, "esvr.rg")
        return ResolvedSupporter(roles.resolve_component(f"mlflow:{run_id}"), f"MLflow run {run_id}", tvd, rg)
    try:
        return ResolvedSupporter(roles.resolve_component(ref), ref)
    except ValueError:
        raise ConfigError(
            f"--supporter {ref!r}: expected an MLflow run id (32 hex digits), mlflow:<run_id>, an adapter folder "
            "with component.json, a model spec (default, hf:<path>[+<adapter>], openai:<model>) or 'latest'"
        ) from None


@contextmanager
def open_session(
    config: Any,
    ref: str,
    *,
    tvd: str | None = None,
    rg: str | None = None,
    max_tokens: int | None = None,
) -> Iterator[tuple[ChatSession, str]]:
    """(session, banner) for a config and ``--supporter REF``; models are closed on exit.

    TVD and RG: the given specs ('' for none), else the ones the supporter was trained with (recorded
    on its train_supporter run), else ``simulate.tvd`` / ``simulate.rg``. Crisis events go to
    ``<run>/chat/crisis_events.jsonl``; an ``openai:`` ``models.judge`` reads what the crisis rules
    let through.
    """
    resolved = resolve_supporter(ref, config.run.experiment)
    sim = config.simulate

    def pick(given: str | None, recorded: str | None, configured: Any) -> str | None:
        if given is not None:
            chosen = roles.model_config(given)
            return chosen.spec if chosen is not None else None
        if recorded:
            return recorded
        return configured.spec if configured is not None else None

    def load(spec: str) -> ChatModel:
        # the session's own models, not the shared pool: closed when the session ends
        return roles.own_model(ModelConfig(spec=spec))

    tvd_spec = pick(tvd, resolved.tvd, sim.tvd)
    rg_spec = pick(rg, resolved.rg, sim.rg)
    models: list[ChatModel] = []
    try:
        supporter = load(resolved.spec)
        models.append(supporter)
        tvd_model = load(tvd_spec) if tvd_spec else None
        rg_model = load(rg_spec) if rg_spec else None
        models += [m for m in (tvd_model, rg_model) if m is not None]
        # a second pass over what the crisis rules let through, when the judge is a real chat model
        judge = roles.own_model(config.models.judge) if config.models.judge.backend == "openai" else None
        models += [judge] if judge is not None else []
        guard = CrisisGuard(config.run.out_dir.resolve() / "chat" / "crisis_events.jsonl", judge=judge)
        session = ChatSession(
            supporter,
            tvd=tvd_model,
            rg=rg_model,
            guard=guard,
            settings=supporter_settings(sim, max_tokens),
            tvd_method=sim.tvd_method,
            tvd_max_tokens=sim.tvd_max_tokens,
            rg_max_tokens=sim.rg_max_tokens,
            seed=config.run.seed,
        )
        banner = (
            f"supporter: {resolved.spec} ({resolved.source})\n"
            f"target value detector: {tvd_spec or 'none'}\nreference generator: {rg_spec or 'none'}\n"
            f"crisis guard: rules{f' + {judge.cache_id}' if judge is not None else ''}; events log: {guard.log_path}"
        )
        yield session, banner
    finally:
        for m in models:
            m.close()
