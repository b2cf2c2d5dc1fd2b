"""Emotion scorer: per text a valence intensity in [0, 1] and a sentiment class in -3..3.

The paper scores utterances with EmoLlama-chat-7B (Liu et al., 2024, EmoLLMs) in two of its task
formats: valence intensity regression (V-reg, 0 most negative .. 1 most positive) and sentiment
classification (V-oc, seven ordinal classes -3..3). Backends (``EmotionConfig.backend``):

- ``emollama``: those two task formats (``prompts/labeling/emollama_*.txt``) sent to any chat
  backend (an OpenAI-compatible server running an EmoLLMs checkpoint, or a local ``hf:`` model);
  replies parsed by `parse_valence` / `parse_sentiment`, which tolerate the usual noise.
- ``vader`` (offline default): VADER (Hutto & Gilbert, 2014), a rule-based sentiment model whose
  lexicon ships inside the ``vaderSentiment`` wheel. It was built for social-media text, runs
  thousands of texts per second on one core and needs no hub. Its compound score c in [-1, 1]
  maps to valence (c + 1) / 2 and to the seven classes by fixed cut points (see `vader_class`).
  Its compound sums the words' valences, so on a long text it runs to +-1 whatever the balance
  (a long vent with a few kind words scored +0.99): a text of more than ``sentence_words`` words
  is scored sentence by sentence and c is the mean of the sentences' compounds, as VADER's own
  demo scores a paragraph. Texts are normalised first (`esvr.models.text`): VADER's negation
  rules only know ASCII apostrophes. Its limits are in docs/labeling.md: lexical, blind to most
  context and sarcasm, and its scale is not calibrated to EmoLLMs'.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from esvr.models.config import ModelConfig, Section
from esvr.models.text import normalize_text, split_sentences, word_count
from esvr.prompts import load_prompt

if TYPE_CHECKING:
    from esvr.models.chat import ChatModel

log = logging.getLogger(__name__)


#: the default of `EmotionConfig.positive_valence`: what "positive" means everywhere (the scale's
#: neutral midpoint; the paper gives no number)
POSITIVE_VALENCE = 0.5


@dataclass(frozen=True)
class EmotionScore:
    valence: float  # 0 (most negative) .. 1 (most positive)
    sentiment: int  # -3 (very negative) .. 3 (very positive)

    def is_positive(self, positive_valence: float = POSITIVE_VALENCE) -> bool:
        return self.valence > positive_valence


class EmotionScorer(ABC):
    @abstractmethod
    def score(self, texts: Sequence[str]) -> list[EmotionScore]:
        """One score per text, in order."""

    def submit(self, texts: Sequence[str]) -> Future[list[EmotionScore]]:
        """`score` as a future, so a caller can do other work meanwhile. Here it runs at once;
        `ProcessEmotionScorer` runs it in a worker process."""
        done: Future[list[EmotionScore]] = Future()
        done.set_result(self.score(texts))
        return done

    def close(self) -> None:  # noqa: B027 - optional: only a scorer with a worker process holds anything
        """Free what the scorer holds (a worker process)."""

    @property
    def fingerprint(self) -> str:
        """Identifies what this scorer computes: label caches key on it."""
        return type(self).__name__


# --------------------------------------------------------------------------------------------
# vader (offline default)
# --------------------------------------------------------------------------------------------

#: |compound| cut points between neutral / slightly / moderately / very. 0.05 is VADER's own
#: documented neutral band; 0.35 and 0.65 split the rest in roughly equal thirds of its range
#: where single sentences land (one mildly positive word ~0.3, two strong ones ~0.7+).
VADER_CUTS = (0.05, 0.35, 0.65)


def vader_class(compound: float, cuts: tuple[float, float, float] = VADER_CUTS) -> int:
    magnitude = abs(compound)
    level = sum(magnitude >= c for c in cuts)
    return int(level if compound >= 0 else -level)


#: texts longer than this (in words) are scored by sentence (`EmotionConfig.sentence_words`)
SENTENCE_WORDS = 60


class VaderEmotionScorer(EmotionScorer):
    def __init__(self, sentence_words: int | None = SENTENCE_WORDS) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise RuntimeError("the offline emotion scorer needs vaderSentiment (pip install vaderSentiment)") from exc
        self.analyzer = SentimentIntensityAnalyzer()
        self.sentence_words = sentence_words

    def compound(self, text: str) -> float:
        """VADER's compound of a text: whole, or over `sentence_words` words the mean of its
        sentences' compounds (neutral sentences count, as 0)."""
        # the label stage hands in normalised text already (a no-op then); the simulation's end
        # rule and the fidelity metrics hand in generated text as it came
        text = normalize_text(text)
        if self.sentence_words is not None and word_count(text) > self.sentence_words:
            sentences = split_sentences(text)
            if len(sentences) > 1:
                return sum(self.analyzer.polarity_scores(s)["compound"] for s in sentences) / len(sentences)
        return float(self.analyzer.polarity_scores(text)["compound"])

    def score(self, texts: Sequence[str]) -> list[EmotionScore]:
        out = []
        for text in texts:
            c = self.compound(text)
            out.append(EmotionScore(valence=(c + 1.0) / 2.0, sentiment=vader_class(c)))
        return out

    @property
    def fingerprint(self) -> str:
        return vader_fingerprint(self.sentence_words)


def vader_fingerprint(sentence_words: int | None) -> str:
    # "norm1": the text normalisation of esvr.models.text; a change to it must renew label caches
    return f"vader:{VADER_CUTS}:norm1:sentences>{sentence_words}"


_worker_scorers: dict[int | None, VaderEmotionScorer] = {}


def _vader_in_worker(texts: Sequence[str], sentence_words: int | None) -> list[EmotionScore]:
    if sentence_words not in _worker_scorers:
        _worker_scorers[sentence_words] = VaderEmotionScorer(sentence_words)
    return _worker_scorers[sentence_words].score(texts)


class ProcessEmotionScorer(EmotionScorer):
    """VADER in one worker process, scoring a chunk while the value detector encodes it.

    VADER is pure Python. Run in turn with the encoder it adds its time to the label stage; in a
    thread it fights torch for the GIL; in its own process it uses the share of the two cores that
    torch leaves idle between kernels (~10% faster, `esvr bench label`, docs/labeling.md). The
    worker starts with the first chunk (~0.2 s, once per label stage) and gives the same scores as
    VADER inline.
    The label stage uses it (`label.emotion.worker_process`); callers that score a few texts at a
    time (the simulation's end rule) keep VADER inline.
    """

    def __init__(self, sentence_words: int | None = SENTENCE_WORDS) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self.sentence_words = sentence_words

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the parent runs torch's thread pools, which a forked child inherits broken
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def submit(self, texts: Sequence[str]) -> Future[list[EmotionScore]]:
        return self._executor().submit(_vader_in_worker, list(texts), self.sentence_words)

    def score(self, texts: Sequence[str]) -> list[EmotionScore]:
        return self.submit(texts).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    @property
    def fingerprint(self) -> str:
        return vader_fingerprint(self.sentence_words)  # the same scores as VaderEmotionScorer: label caches stay valid


# --------------------------------------------------------------------------------------------
# emollama
# --------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.])([-+\u2212]?\s?(?:\d+(?:[.,]\d+)?|[.,]\d+))(?![\w])")
_CLASS_WORDS = [
    (re.compile(r"\bvery\s+negative\b"), -3),
    (re.compile(r"\bmoderately\s+negative\b"), -2),
    (re.compile(r"\bslightly\s+negative\b"), -1),
    (re.compile(r"\bvery\s+positive\b"), 3),
    (re.compile(r"\bmoderately\s+positive\b"), 2),
    (re.compile(r"\bslightly\s+positive\b"), 1),
    (re.compile(r"\b(neutral|mixed)\b"), 0),
]


def _clean(reply: str) -> str:
    # EmoLLMs' examples answer ">>0.879"; models also echo the field name or wrap in markdown
    text = reply.replace("\u2212", "-").replace("**", " ").replace(">>", " ")
    return re.sub(r"(intensity\s+(score|class)|score|class|answer)\s*[:=]", " ", text, flags=re.I)


def _numbers(text: str) -> list[float]:
    out = []
    for m in _NUMBER.finditer(text):
        raw = m.group(1).replace(" ", "").replace(",", ".")
        try:
            out.append(float(raw))
        except ValueError:
            continue
    return out


def parse_valence(reply: str) -> float | None:
    """The first number in [0, 1] of a V-reg reply ("0.879", ">>.75", "Intensity Score: 1"); None if none.

    A number in (1, 100] followed by '%' is read as a percentage.
    """
    text = _clean(reply or "")
    pct = re.search(r"(\d+(?:\.\d+)?)\s*%", text)
    if pct and 0 <= float(pct.group(1)) <= 100:
        return float(pct.group(1)) / 100.0
    for value in _numbers(text):
        if 0.0 <= value <= 1.0:
            return value
    return None


def parse_sentiment(reply: str) -> int | None:
    """The class -3..3 of a V-oc reply ("-3: very negative ...", "2", "moderately positive"); None if none."""
    text = _clean(reply or "")
    for value in _numbers(text):
        if value == int(value) and -3 <= value <= 3:
            return int(value)
    low = text.lower()
    for pattern, cls in _CLASS_WORDS:
        if pattern.search(low):
            return cls
    return None


class EmoLlamaScorer(EmotionScorer):
    """EmoLLMs' V-reg and V-oc task formats, served by any chat backend."""

    VALENCE_PROMPT = "labeling/emollama_valence.txt"
    SENTIMENT_PROMPT = "labeling/emollama_sentiment.txt"

    def __init__(self, chat_model: ChatModel, *, wrap_human_assistant: bool = True, max_tokens: int = 16):
        self.chat_model = chat_model
        self.wrap = wrap_human_assistant
        self.max_tokens = max_tokens
        self.valence_template = load_prompt(self.VALENCE_PROMPT)
        self.sentiment_template = load_prompt(self.SENTIMENT_PROMPT)
        #: replies that could not be parsed and fell back (logged by the label flow)
        self.parse_failures = {"valence": 0, "sentiment": 0}

    def _message(self, template: str, text: str) -> list[dict[str, str]]:
        task = template.format(text=" ".join((text or "").split())).rstrip("\n")
        # EmoLLMs were fine-tuned on "Human: ... Assistant:" transcripts; keeping those markers
        # inside the user turn stays closest to that format when a server applies a chat template
        content = f"Human: \n{task}\n\nAssistant:\n" if self.wrap else task
        return [{"role": "user", "content": content}]

    def score(self, texts: Sequence[str]) -> list[EmotionScore]:
        from esvr.models.chat import ChatRequest

        texts = list(texts)
        requests = [
            ChatRequest.build(self._message(tpl, t), max_tokens=self.max_tokens, temperature=0.0)
            for t in texts
            for tpl in (self.valence_template, self.sentiment_template)
        ]
        replies = self.chat_model.chat_batch(requests) if requests else []
        out = []
        for i in range(len(texts)):
            v_reply, s_reply = replies[2 * i][0], replies[2 * i + 1][0]
            out.append(self._combine(parse_valence(v_reply), parse_sentiment(s_reply), v_reply, s_reply))
        return out

    def _combine(self, valence: float | None, sentiment: int | None, v_reply: str, s_reply: str) -> EmotionScore:
        # each task falls back on the other one (the two scales describe the same polarity), and on
        # neutral when both replies are unusable
        if valence is None:
            self.parse_failures["valence"] += 1
            log.debug("unparsable valence reply %r", v_reply)
        if sentiment is None:
            self.parse_failures["sentiment"] += 1
            log.debug("unparsable sentiment reply %r", s_reply)
        if valence is None:
            valence = 0.5 if sentiment is None else (sentiment + 3) / 6.0
        if sentiment is None:
            sentiment = int(round(valence * 6 - 3))
        return EmotionScore(valence=float(min(1.0, max(0.0, valence))), sentiment=int(min(3, max(-3, sentiment))))

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256((self.valence_template + self.sentiment_template).encode()).hexdigest()[:12]
        return f"emollama:{self.chat_model.cache_id}:{self.wrap}:{digest}"


class EmotionConfig(Section):
    """Which emotion scorer labels utterances (the label stage's ``label.emotion``)."""

    backend: Literal["vader", "emollama"] = "vader"
    #: emollama: the chat model serving an EmoLLMs checkpoint (e.g. openai:lzw1008/Emollama-chat-7b on vLLM)
    model: ModelConfig = ModelConfig()
    #: emollama: wrap the task in EmoLLMs' "Human: ... Assistant:" transcript format
    wrap_human_assistant: bool = True
    #: emollama: the replies are a number or a short class name
    max_tokens: int = 16
    #: vader: score in a worker process while the value detector encodes (same scores, ~10% faster
    #: on 2 cores; off: inline, no extra process)
    worker_process: bool = True
    #: vader: a text of more than this many words is scored sentence by sentence (mean of the
    #: sentences' compounds); None = every text whole. Whole-text VADER saturates at +-1 on long
    #: posts (docs/labeling.md)
    sentence_words: int | None = SENTENCE_WORDS
    #: an utterance is *positive* when its valence (0 most negative .. 1 most positive) is strictly
    #: above this: the one definition that the datasets' success rule, the ESConv analysis and the
    #: label statistics share. 0.5 is the scale's neutral midpoint (the paper says "positive" and
    #: gives no number: the project's choice)
    positive_valence: float = POSITIVE_VALENCE


def load_emotion_scorer(cfg: EmotionConfig, chat_model: ChatModel | None = None) -> EmotionScorer:
    """Build the scorer a config section names. ``emollama`` needs the caller's `chat_model`."""
    if cfg.backend == "vader":
        return VaderEmotionScorer(cfg.sentence_words)
    if cfg.backend == "emollama":
        if chat_model is None:
            raise ValueError("the emollama emotion scorer needs a chat model: build it from emotion.model with load_chat_model")
        return EmoLlamaScorer(chat_model, wrap_human_assistant=cfg.wrap_human_assistant, max_tokens=cfg.max_tokens)
    raise ValueError(f"unknown emotion backend {cfg.backend!r}; expected vader or emollama")
