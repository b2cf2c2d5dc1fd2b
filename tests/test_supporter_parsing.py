"""The supporter's 4-step template: parsing well-formed, partial and hostile replies; re-asks;
the alternative response; the stepwise fallback."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esvr.models.chat import ChatModel, ChatRequest
from esvr.tasks.simulation.supporter import (
    Supporter,
    SupporterFailure,
    SupporterReply,
    SupporterSettings,
    TemplateError,
    canonical_strategy,
    parse_alternative_reply,
    parse_supporter_reply,
    render_reply,
    strategy_names,
    supporter_messages,
)

WORD = st.from_regex(r"[A-Za-z][A-Za-z0-9,;'?!]{0,7}", fullmatch=True)
TEXT = st.lists(WORD, min_size=1, max_size=12).map(" ".join)


@st.composite
def replies(draw: st.DrawFn) -> SupporterReply:
    used = draw(st.booleans())
    strategy = draw(st.sampled_from(strategy_names()))
    return SupporterReply(
        step1=draw(TEXT),
        step2=draw(TEXT),
        step3=("Yes, " if used else "No, ") + draw(TEXT),
        reference_used=used,
        strategy_raw=strategy,
        strategy=strategy,
        response=draw(TEXT),
    )


def fields(r: SupporterReply) -> tuple:
    return (r.step1, r.step2, r.step3, r.reference_used, r.strategy_raw, r.strategy, r.response)


GOOD = """**Step 1. Understanding the patient's issues and current state**
- Reasoning: The patient lost her job and feels worthless.
**Step 2. Identifying the key points of the reference response**
- Reasoning: The reference says setbacks do not define us.
**Step 3. Determination of reference response usage**
- Reasoning: **Yes** - it fits her self-doubt.
**Step 4. Therapist's next strategy and response**
- Strategy: Affirmation (to rebuild confidence)
- Response: "Losing a job says nothing about your worth, and you have already shown real resilience."

I hope this helps!"""


# -- well-formed ---------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(replies())
def test_rendered_replies_parse_back_to_the_same_fields(reply: SupporterReply) -> None:
    assert fields(parse_supporter_reply(render_reply(reply))) == fields(reply)


def test_markdown_bullets_quotes_and_trailing_commentary() -> None:
    r = parse_supporter_reply(GOOD)
    assert r.reference_used is True
    assert r.step3.startswith("Yes")
    assert r.strategy == "Affirmation" and r.strategy_raw.startswith("Affirmation")
    assert r.response == "Losing a job says nothing about your worth, and you have already shown real resilience."
    assert "hope this helps" not in r.response


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Suggestion", "Suggestions"),
        ("self disclosure", "Self-disclosure"),
        ("**Question**", "Question"),
        ("Reflection of feelings", None),
        ("Information: share resources", "Information"),
        ("Empathy", None),
        ("Affirmation and Suggestions", None),
    ],
)
def test_strategy_names_map_to_the_taxonomy_or_to_none(raw: str, expected: str | None) -> None:
    assert canonical_strategy(raw) == expected


def test_an_off_taxonomy_strategy_is_kept_but_marked() -> None:
    r = parse_supporter_reply(GOOD.replace("Affirmation (to rebuild confidence)", "Empathy"))
    assert r.strategy is None and r.strategy_raw == "Empathy"


# -- partial -------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(replies(), st.integers(min_value=0, max_value=8))
def test_dropping_any_template_line_is_rejected(reply: SupporterReply, drop: int) -> None:
    lines = render_reply(reply).split("\n")
    assert len(lines) == 9
    del lines[drop]
    with pytest.raises(TemplateError):
        parse_supporter_reply("\n".join(lines))


@settings(max_examples=50, deadline=None)
@given(replies(), st.data())
def test_a_reply_cut_before_the_response_is_rejected(reply: SupporterReply, data: st.DataObject) -> None:
    text = render_reply(reply)
    cut = data.draw(st.integers(min_value=0, max_value=text.index("-Response:") + len("-Response:")))
    with pytest.raises(TemplateError):
        parse_supporter_reply(text[:cut])


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n ",
        "I think you should take a deep breath and relax.",
        GOOD.replace("**Yes** - it", "Maybe, it"),
        GOOD.replace("- Response:", "- Answer:"),
        GOOD.replace("- Strategy:", "- Approach:"),
        "Step 4. Therapist's next strategy\n-Strategy: Question\n-Response: How are you?",
    ],
)
def test_partial_or_off_template_replies_are_rejected(text: str) -> None:
    with pytest.raises(TemplateError):
        parse_supporter_reply(text)


def test_the_template_echoed_back_with_placeholders_is_rejected() -> None:
    prompt = supporter_messages([{"role": "seeker", "text": "I feel lost."}], None, None)[1]["content"]
    echoed = prompt[prompt.index("Answer using exactly this template:") :]
    with pytest.raises(TemplateError):
        parse_supporter_reply(echoed)


# -- hostile -------------------------------------------------------------------------------------


def _rejected_or_sane(text: str) -> None:
    """Any text either fails with TemplateError or parses to fields a turn record can hold."""
    try:
        r = parse_supporter_reply(text)
    except TemplateError:
        return
    assert all(isinstance(x, str) and x.strip() for x in (r.step1, r.step2, r.step3, r.strategy_raw, r.response))
    assert isinstance(r.reference_used, bool)
    assert r.strategy is None or r.strategy in strategy_names()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_arbitrary_text_is_rejected_or_gives_sane_fields(text: str) -> None:
    _rejected_or_sane(text)


TEMPLATE_PIECES = st.sampled_from(
    [
        "Step 1.", "Step 2.", "Step 3.", "Step 4.", "-Reasoning:", "-Strategy:", "-Response:", "Yes", "No",
        "**", "\n", "\n\n", " ", "Question", "Others", "(your analysis)", "Step 3: No", "Response: [END]", "\r\n",
    ]
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(TEMPLATE_PIECES, TEXT), max_size=40).map("".join))
def test_shuffled_template_fragments_are_rejected_or_give_sane_fields(text: str) -> None:
    _rejected_or_sane(text)


def test_a_repeated_template_takes_the_first_complete_steps_in_order() -> None:
    r = parse_supporter_reply(GOOD + "\n\n" + GOOD.replace("Losing a job", "Second copy:"))
    assert r.response.startswith("Losing a job")


# -- the alternative response ---------------------------------------------------------------------


def test_alternative_reply_must_reverse_the_decision() -> None:
    initial = parse_supporter_reply(GOOD)
    alt = parse_alternative_reply(
        "Step 3. Whether to use the reference response\n-Reasoning: No, asking works better.\n"
        "Step 4. Next\n-Strategy: Question\n-Response: What part of the job did you enjoy most?",
        initial,
    )
    assert alt.reference_used is False and alt.strategy == "Question"
    assert (alt.step1, alt.step2) == (initial.step1, initial.step2)
    with pytest.raises(TemplateError, match="reversed"):
        parse_alternative_reply("Step 3.\n-Reasoning: Yes, again.\nStep 4.\n-Strategy: Question\n-Response: Hi?", initial)


class Replies(ChatModel):
    """Answers from a fixed list, in order; records the requests."""

    cache_id = "replies"

    def __init__(self, answers: list[str]):
        super().__init__()
        self.answers = list(answers)
        self.requests: list[ChatRequest] = []

    def _generate(self, requests: list[ChatRequest]) -> list[list[str]]:
        self.requests += requests
        return [[self.answers.pop(0) if self.answers else "nothing"] for _ in requests]

    def _score(self, messages, choices):
        return {c: float(i == len(choices) - 1) for i, c in enumerate(choices)}


HISTORY = [{"role": "seeker", "text": "I lost my job and I feel worthless."}]


def test_reask_then_accept_and_the_correction_goes_back_to_the_model() -> None:
    model = Replies(["whatever", GOOD])
    calls: dict[str, int] = {}
    r = asyncio.run(
        Supporter(model, SupporterSettings(reask=2)).respond(HISTORY, ["Achievement"], "Be kind to yourself.", calls=calls)
    )
    assert r.attempts == 2 and r.problems and calls == {"supporter": 2}
    second = model.requests[1].message_dicts()
    assert second[-2] == {"role": "assistant", "content": "whatever"}
    assert "template" in second[-1]["content"]


def test_a_reply_that_never_keeps_the_template_fails_after_the_reasks() -> None:
    model = Replies(["no template"] * 5)
    with pytest.raises(SupporterFailure) as err:
        asyncio.run(Supporter(model, SupporterSettings(reask=2)).respond(HISTORY, None, None))
    assert err.value.attempts == 3 and len(model.requests) == 3


def test_alternative_via_the_model_reverses_the_decision() -> None:
    initial = parse_supporter_reply(GOOD)
    model = Replies(
        [
            "Step 3.\n-Reasoning: Yes, still.\nStep 4.\n-Strategy: Question\n-Response: Hm?",  # not reversed: re-asked
            "Step 3.\n-Reasoning: No, a question is better.\nStep 4.\n-Strategy: Question\n-Response: What did you enjoy?",
        ]
    )
    calls: dict[str, int] = {}
    alt = asyncio.run(Supporter(model).alternative(HISTORY, None, "Be kind to yourself.", initial, calls=calls))
    assert alt.reference_used is (not initial.reference_used)
    assert alt.attempts == 2 and calls == {"alternative": 2}
    assert "No" in model.requests[0].message_dicts()[-1]["content"]


def test_stepwise_fallback_builds_a_marked_reply_from_scored_and_generated_fields() -> None:
    model = Replies(["garbage", "garbage", "The patient feels worthless.", "Be kind.", "You matter. Extra sentence."])
    s = Supporter(model, SupporterSettings(reask=1, fallback="stepwise"))
    calls: dict[str, int] = {}
    r = asyncio.run(s.respond(HISTORY, ["Achievement"], "Be kind to yourself.", calls=calls))
    assert r.method == "stepwise" and r.strategy in strategy_names()
    assert r.response == "You matter."
    assert fields(parse_supporter_reply(r.raw)) == fields(r)
    alt = asyncio.run(s.alternative(HISTORY, ["Achievement"], "Be kind to yourself.", r, calls=calls))
    assert alt.reference_used is (not r.reference_used) and alt.method == "stepwise"
