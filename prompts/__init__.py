"""Prompt templates and taxonomies, as files. See README.md in this folder.

Templates use ``str.format`` fields (``{dialogue_history}``); taxonomies are YAML lists. Flows log
every prompt file they used as an MLflow artifact, so a run's outputs always travel with the exact
wording that produced them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

PROMPTS_DIR = Path(__file__).resolve().parent


def prompt_path(name: str) -> Path:
    path = PROMPTS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file {name!r} in {PROMPTS_DIR}")
    return path


@cache
def load_prompt(name: str) -> str:
    """The text of ``prompts/<name>`` (e.g. ``supporter/system.txt``)."""
    return prompt_path(name).read_text(encoding="utf-8")


@cache
def load_taxonomy(name: str) -> list[dict]:
    """A YAML taxonomy (``values``, ``strategies``, ``problems``, ``emotions``) as a list of dicts."""
    return yaml.safe_load(prompt_path(f"{name}.yaml").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Value:
    name: str
    definition: str
    contains: tuple[str, ...]

    def describe(self) -> str:
        """The value as prompts present it: name, definition and contained values."""
        return f"{self.name}: {self.definition} (contained values: {', '.join(self.contains)})"


@cache
def values() -> tuple[Value, ...]:
    """The 20 values of the paper's Table 33, in the pipeline's canonical order."""
    return tuple(Value(v["name"], v["definition"], tuple(v["contains"])) for v in load_taxonomy("values"))


def value_names() -> list[str]:
    return [v.name for v in values()]
