"""The valence end rule's gratitude: thanks to the supporter, not any word of appreciation."""

from __future__ import annotations

import pytest

from esvr.tasks.simulation.simulate import EndRules, SimulateConfig, end_reason, has_gratitude

PHRASES = SimulateConfig().gratitude_phrases

THANKS = [
    "Thank you, that helps.",
    "thanks, I feel a bit lighter now",
    "Thx for listening.",
    "I really appreciate it.",
    "I appreciate your help with this.",
    "I appreciate you taking the time.",
    "I'm grateful for your advice.",
    "I'm so thankful for you listening to me.",
    "Talking to you means a lot.",
    "You helped me see it differently.",
    "You've helped more than you know.",
    "Thanks to you I have a plan now.",
]

NOT_THANKS = [
    "I am willing to appreciate the value of my own work again.",
    "I should appreciate the small things more.",
    "I'm grateful for my family, but they don't understand.",
    "My therapist told me to keep a gratitude journal.",
    "No thanks, I don't want to talk to her.",
    "Thanks to the layoffs I lost my job.",
    "I was thinking about quitting.",
    "Nobody has ever appreciated what I do.",
]


@pytest.mark.parametrize("text", THANKS)
def test_thanks_to_the_supporter_counts(text: str) -> None:
    assert has_gratitude(text, PHRASES)


@pytest.mark.parametrize("text", NOT_THANKS)
def test_appreciation_of_something_else_does_not_count(text: str) -> None:
    assert not has_gratitude(text, PHRASES)


def test_false_thanks_with_high_valence_does_not_end_the_dialogue() -> None:
    text = "I am willing to appreciate the value of my own work again."
    rules = EndRules(gratitude_phrases=tuple(PHRASES))
    assert end_reason(False, 0.71, has_gratitude(text, PHRASES), 1, rules) is None
    assert end_reason(False, 0.71, has_gratitude("Thank you, really.", PHRASES), 1, rules) == "valence_gratitude"
