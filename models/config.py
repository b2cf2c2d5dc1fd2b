"""The config base class, the model config and the user-error classes: the bottom of the package.

Every layer builds its settings from `Section` (models' trainers and labelers, the stages' sections
in ``esvr.tasks``, the recipe in ``esvr.flows.config``), and every chat model of a recipe is a
`ModelConfig`, so they live here, below everything that uses them.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import annotated_types
from pydantic import BaseModel, ConfigDict, FieldSerializationInfo, field_serializer, field_validator, model_validator

from esvr.models.redact import redact_url

BACKENDS = ("default", "openai", "hf")


class ConfigError(ValueError):
    """A recipe that does not validate; the message names the key and the file."""


class InputFileError(ValueError):
    """A file a stage reads is not what it should be (not JSON, a column or field missing, a
    damaged parquet); the message names the file and, where it can, the line. Like a
    `ConfigError` it is the user's to fix: the CLI prints it in one line."""


_AT_LEAST_1 = """
    concurrency batch_size eval_batch_size max_workers rollout_concurrency num_threads num_processes
    max_tokens max_new_tokens max_new_tokens_reasoning max_judge_tokens judge_max_tokens supporter_max_tokens
    seeker_max_tokens stepwise_max_tokens tvd_max_tokens rg_max_tokens situations_max_tokens alignment_max_tokens
    max_length max_seq_length grad_accum lora_r lora_alpha logging_steps eval_steps
    max_turns max_personas max_dialogues max_turns_per_dialogue dpo_max_personas dpo_max_dialogues dpo_max_turns
    max_pairs pairs count min_situations max_situations n_samples value_judgments emotion_votes h
    max_examples max_train_examples max_eval_examples max_chars_per_utterance top_k dpo_candidate_values
    last_turns multi_turn_min_turns single_turn_max_turns sentence_words chunk_size
    sample_posts comment_window_days max_post_chars max_comment_chars read_mb bucket_rows
"""
_AT_LEAST_0 = """
    seed max_retries reask max_siblings read_ahead min_post_chars min_comment_chars min_alignment weight_decay beta gamma t_diff
    dev_size test_size
    supporter_temperature seeker_temperature situations_temperature value_temperature
"""
_SHARE = """
    min_upvote_ratio alpha max_failed_share lora_dropout warmup_ratio threshold value_threshold
    valence_threshold positive_valence
"""

#: The range of every number a recipe sets, by key name, for every section. A value outside is an
#: error at load naming the key and the file, not a stage that quietly drops data
#: (``simulate.max_personas: -1`` dropping a persona, ``ingest.read_mb: 0`` reading nothing). A
#: count of things to make or read is at least 1 (its "no limit" is null, not 0 or -1), a number
#: where 0 means none at least 0, a share or threshold within [0, 1] (``dev_size`` and
#: ``test_size`` are shares or counts: at least 0). Unbounded on purpose:
#: ``max_steps`` (-1: the trainer's "no limit"), Reddit score floors (``min_post_score`` may be
#: negative), ``initial_intensity``. A section's own ``Field(ge=...)`` takes precedence.
RANGES: dict[str, tuple[annotated_types.BaseMetadata, ...]] = {
    **{name: (annotated_types.Ge(1),) for name in _AT_LEAST_1.split()},
    **{name: (annotated_types.Ge(0),) for name in _AT_LEAST_0.split()},
    **{name: (annotated_types.Ge(0), annotated_types.Le(1)) for name in _SHARE.split()},
    **{name: (annotated_types.Gt(0),) for name in ("timeout_s", "learning_rate", "epochs")},
}
_BOUNDS = (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt, annotated_types.Interval)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated on assignment,
    numbers are checked against `RANGES`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        bounded = False
        for name, field in cls.model_fields.items():
            union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
            numeric = set(typing.get_args(field.annotation) if union else (field.annotation,)) <= {int, float, type(None)}
            if name in RANGES and numeric and not any(isinstance(m, _BOUNDS) for m in field.metadata):
                field.metadata.extend(RANGES[name])
                bounded = True
        if bounded:
            cls.model_rebuild(force=True)


def backend_of(spec: str) -> str:
    """The backend a model spec names: 'default', 'openai' or 'hf'."""
    if spec == "default":
        return "default"
    backend, sep, _ = spec.partition(":")
    if not sep or backend not in {"openai", "hf"}:
        raise ValueError(f"model spec {spec!r}: expected 'default', 'openai:<model>' or 'hf:<path>[+<adapter>]'")
    return backend


class ModelConfig(Section):
    """A chat model: where it comes from and how to talk to it.

    The key comes from the variable named by ``api_key_env``. A server that takes its key in the
    URL (``https://user:key@host/v1``, ``?api-key=``) may be given so in ``base_url``: its JSON
    form (MLflow params, Prefect's parameters, `esvr config show`) masks the credentials.
    YAML may give just the spec string: ``supporter: openai:gpt-4o-mini``.
    """

    spec: str = "default"
    base_url: str | None = None
    #: name of the environment variable that holds the API key (the key itself is never stored)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5
    batch_size: int = 8
    device: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"spec": value} if isinstance(value, str) else value

    @field_validator("spec")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        backend_of(value)  # raises on an unknown backend
        return value

    @field_serializer("base_url", when_used="json")
    def _without_credentials(self, value: str | None, info: FieldSerializationInfo) -> str | None:
        # JSON is what leaves the process (MLflow params, Prefect's parameters, `esvr config show`):
        # a key in the URL stays behind unless the caller rebuilds a config from it (context secrets)
        if value is None or (info.context or {}).get("secrets"):
            return value
        return redact_url(value)

    @property
    def backend(self) -> str:
        return backend_of(self.spec)
