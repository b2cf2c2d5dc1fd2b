"""Text normalisation: what every labeler reads instead of the raw Reddit text.

Reddit bodies arrive HTML-escaped (``&amp;``, ``&gt;``, ``&#x200B;``) and, from phones and
editors, with typographic apostrophes, quotes and dashes. Rule-based labelers match ASCII forms:
VADER's negation list has "don't", not "don’t", so "I don’t like this" scored +0.36 and "I don't
like this" -0.28; a tokenizer splits "don’t" into other pieces than "don't". `normalize_text`
maps every such variant to one ASCII form once, before any labeler sees the text
(docs/labeling.md, "Text normalisation").

`split_sentences` cuts a text into sentences for scorers that saturate on long texts (VADER).
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterable

#: typographic forms -> the ASCII form labelers were built on. NFKC (applied first) already maps
#: the ellipsis, full-width forms and non-breaking spaces; these it leaves alone
_CHARS = str.maketrans(
    {
        **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u02bc\u0060\u00b4", "'"),
        **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", '"'),
        # hyphens inside a word stay inside it
        **dict.fromkeys("\u2010\u2011\u2212", "-"),
        # dashes between words: spaced, so "sad—really" stays two words
        **dict.fromkeys("\u2012\u2013\u2014\u2015", " - "),
        # zero-width characters (Reddit's "&#x200B;" paragraph filler) and the byte-order mark
        **dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff", ""),
    }
)
_SPACES = re.compile(r"[^\S\n]+")  # runs of whitespace other than newlines
_LINE_EDGES = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str | None) -> str:
    """One canonical form of a text: HTML entities decoded, NFKC, ASCII apostrophes, quotes and
    dashes, zero-width characters dropped, spaces collapsed (paragraph breaks kept, at most one
    blank line), ends stripped. Idempotent: normalising twice gives the same text."""
    if not text:
        return ""
    if "&" in text:
        text = html.unescape(text)
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text).translate(_CHARS)
    text = _SPACES.sub(" ", text)
    if "\n" in text:
        text = _BLANK_LINES.sub("\n\n", _LINE_EDGES.sub("\n", text))
    return text.strip()


def normalize_texts(texts: Iterable[str | None]) -> list[str]:
    return [normalize_text(t) for t in texts]


# a sentence ends at . ! ? (possibly repeated, possibly closed by a quote or bracket) followed by
# whitespace, or at a line break: Reddit posts often drop the final full stop of a paragraph
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """The non-empty sentences of a (normalised) text, in order."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def word_count(text: str) -> int:
    return len(text.split())
