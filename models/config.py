"""The config base class, the model config and the config error: the bottom of the package.

Every layer builds its settings from `Section` (models' trainers and labelers, the stages' sections
in ``esvr.tasks``, the recipe in ``esvr.flows.config``), and every chat model of a recipe is a
`ModelConfig`, so they live here, below everything that uses them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, FieldSerializationInfo, field_serializer, field_validator, model_validator

from esvr.models.redact import redact_url

BACKENDS = ("default", "openai", "hf")


class ConfigError(ValueError):
    """A recipe that does not validate; the message names the key and the file."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def backend_of(spec: str) -> str:
    """The backend a model spec names: 'default', 'openai' or 'hf'."""
    if spec == "default":
        return "default"
    backend, sep, _ = spec.partition(":")
    if not sep or backend not in {"openai", "hf"}:
        raise ValueError(f"model spec {spec!r}: expected 'default', 'openai:<model>' or 'hf:<path>[+<adapter>]'")
    return backend


class ModelConfig(Section):
    """A chat model: where it comes from and how to talk to it; never holds a secret.

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
