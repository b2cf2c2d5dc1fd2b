"""What the supporter is shown (Table 18, App. G.2, Table 2's rows) and how often it uses the
reference response (the Step-3 decisions a simulation reports)."""

from __future__ import annotations

import asyncio

from test_supporter_parsing import GOOD, HISTORY, Replies

from esvr.tasks.evaluation.evaluate import SupporterUnderTest, make_agents
from esvr.tasks.simulation.simulate import SimulateConfig, SimulationSummary, _summarize, _supporter_step
from esvr.tasks.simulation.supporter import (
    Supporter,
    SupporterSettings,
    reference_usage,
    reference_used_share,
    supporter_messages,
)

REF = "Setbacks do not define who you are."


def user_prompt(request) -> str:
    return request.message_dicts()[-1]["content"]


def test_without_a_detector_the_prompt_is_app_g2s_history_and_reference_only():
    g2 = supporter_messages(HISTORY, None, REF)[-1]["content"]
    assert "Target values" not in g2 and "target values" not in g2
    assert "2. Dialogue history:\nPatient: I lost my job" in g2 and f"3. Reference response:\n{REF}" in g2
    assert "main message of the reference response (item 3)" in g2 and "Step 4." in g2
    # with a detector: Table 18's four items; one that found nothing keeps its section and says so
    found = supporter_messages(HISTORY, ["Achievement"], REF)[-1]["content"]
    assert "3. Target values:\n- Achievement" in found and f"4. Reference response:\n{REF}" in found
    assert "3. Target values:\n(none given" in supporter_messages(HISTORY, [], REF)[-1]["content"]


def test_a_supporter_not_shown_the_values_never_sees_them():
    model = Replies([GOOD])
    s = Supporter(model, SupporterSettings(sees_target_values=False))
    asyncio.run(s.respond(HISTORY, ["Achievement"], REF))
    assert user_prompt(model.requests[0]) == supporter_messages(HISTORY, None, REF)[-1]["content"]
    # the stepwise prompts too: no target-values paragraph, with or without the setting
    for settings, values in (
        (SupporterSettings(fallback="stepwise_only", sees_target_values=False), ["Achievement"]),
        (SupporterSettings(fallback="stepwise_only"), None),
    ):
        model = Replies(["The patient feels worthless.", "Setbacks pass.", "You matter."])
        asyncio.run(Supporter(model, settings).respond(HISTORY, values, REF))
        assert model.requests and all("Target values" not in user_prompt(r) for r in model.requests)
    model = Replies(["The patient feels worthless.", "Setbacks pass.", "You matter."])
    asyncio.run(Supporter(model, SupporterSettings(fallback="stepwise_only")).respond(HISTORY, ["Achievement"], REF))
    assert any("Target values to strengthen" in user_prompt(r) and "Achievement" in user_prompt(r) for r in model.requests)


def test_plus_reference_row_feeds_the_generator_values_but_not_the_supporter():
    """Table 2's "+ Reference": the reference generator is conditioned on target values (eq. 2), so
    the detector still runs for it; only the supporter's prompt goes without them."""
    tvd, rg, supporter, seeker = Replies(["Achievement, Hedonism"]), Replies([REF]), Replies([GOOD]), Replies([])
    row = SupporterUnderTest(name="+ Reference", use_target_values=False, use_reference=True)
    agents = make_agents(
        row, SimulateConfig(), supporter, seeker, tvd_model=tvd, rg_model=rg, rephraser=None, emotion_scorer=None
    )
    utts = [dict(u) for u in HISTORY]
    record = asyncio.run(_supporter_step({}, utts, agents, 1, 0, False))
    assert record["target_values"] == ["Achievement", "Hedonism"] and record["reference"] == REF
    assert "Target values" in user_prompt(rg.requests[0]) and "Achievement" in user_prompt(rg.requests[0])
    assert user_prompt(supporter.requests[0]) == supporter_messages(HISTORY, None, REF)[-1]["content"]

    # "+ Target values" shows them to the supporter and has no generator; the plain row has neither
    def row_agents(row: SupporterUnderTest):
        return make_agents(
            row, SimulateConfig(), supporter, seeker, tvd_model=tvd, rg_model=rg, rephraser=None, emotion_scorer=None
        )

    both = row_agents(SupporterUnderTest(name="+ Target values", use_reference=False))
    assert both.tvd is tvd and both.rg is None and both.supporter.settings.sees_target_values
    bare = row_agents(SupporterUnderTest(name="GPT", use_target_values=False, use_reference=False))
    assert bare.tvd is None and bare.rg is None


def turn(reference: str | None, used: bool, failed: bool = False) -> dict:
    return {
        "failed": failed,
        "reference": reference,
        "reference_used": used,
        "method": "template",
        "attempts": 1,
        "alternative": None,
    }


def test_reference_usage_counts_turns_that_had_a_reference():
    turns = [turn(REF, True), turn(REF, False), turn(REF, False), turn(None, False), turn(REF, True, failed=True)]
    assert reference_usage(turns) == (1, 3)
    dialogues = [{"turns": turns}, {"turns": [turn(REF, True)]}, {"turns": []}]
    assert reference_used_share(dialogues) == 0.5
    assert reference_used_share([{"turns": [turn(None, False)]}]) is None
    # every simulation reports it (and MLflow gets it with the other simulate metrics)
    summary = SimulationSummary(path="x")
    for d in dialogues:
        _summarize(summary, {"end_reason": "seeker_end", "calls": {}, **d})
    part = SimulationSummary(path="y")
    _summarize(part, {"end_reason": "seeker_end", "calls": {}, "turns": [turn(REF, False)]})
    summary.add(part)
    assert summary.metrics()["simulate.reference_used_share"] == 2 / 5
    assert "simulate.reference_used_share" not in SimulationSummary(path="z").metrics()
