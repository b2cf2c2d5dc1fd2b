"""What the seeker and the supporter share: the settings of asking a model for a reply, and the
failure raised when no acceptable reply came after the re-asks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class ReplySettings:
    max_tokens: int = 128
    temperature: float = 0.0
    #: a reply that is not acceptable (empty, or outside the template) is asked again this many times
    reask: int = 2


class AgentFailure(RuntimeError):
    """No acceptable reply after the re-asks; carries every try and, when known, what was wrong
    with each."""

    def __init__(self, message: str, attempts: int, replies: Sequence[str], problems: Sequence[str] = ()):
        super().__init__(message)
        self.attempts = attempts
        self.replies = list(replies)
        self.problems = list(problems)
