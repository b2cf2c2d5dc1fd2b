"""Reading run recipes as plain data: YAML files, ``extends`` chains and ``--set`` overrides.

A recipe may start with ``extends: <path>`` (relative to the recipe's own folder): the parent is
read first and the child's keys override it, mappings merged key by key, everything else (lists,
scalars, a string over a mapping) replaced whole. Chains are allowed; a cycle is an error naming
the files. This module imports nothing heavy, so the CLI can read the run folder from a recipe
before Prefect is imported (Prefect reads its settings at import time).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from esvr.models.config import ConfigError


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except ValueError as exc:  # a value YAML reads but cannot build: an impossible date (2023-02-30)
        raise ConfigError(f"{path}: a value cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: mappings merge recursively, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def recipe_chain(path: str | Path) -> list[Path]:
    """The recipe and its ancestors, child first: ``[rehearsal.yaml, paper.yaml]``."""
    chain: list[Path] = []
    current: Path | None = Path(path)
    while current is not None:
        resolved = current.resolve()
        if resolved in chain:
            loop = " -> ".join(str(p) for p in [*chain, resolved])
            raise ConfigError(f"{chain[-1]}: 'extends' forms a cycle: {loop}")
        chain.append(resolved)
        parent = read_yaml_mapping(resolved).get("extends")
        if parent is None:
            current = None
        elif not isinstance(parent, str) or not parent.strip():
            raise ConfigError(f"{resolved}: 'extends' must be the path of another recipe, got {parent!r}")
        else:
            current = resolved.parent / parent
            if not current.exists():
                raise ConfigError(f"{resolved}: 'extends: {parent}' names no file ({current} not found)")
    return chain


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe's data with its ``extends`` chain resolved (the ``extends`` key removed)."""
    data: dict[str, Any] = {}
    for file in reversed(recipe_chain(path)):
        own = read_yaml_mapping(file)
        own.pop("extends", None)
        data = merge(data, own)
    return data


def own_keys(path: str | Path) -> dict[str, Any]:
    """What the recipe file itself sets, without its parent's keys."""
    data = read_yaml_mapping(Path(path))
    data.pop("extends", None)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a','b','c'], value parsed as YAML, so 3, true, [1,2] and null work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. simulate.max_turns=6")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc.problem or exc})") from None
    except ValueError as exc:  # YAML reads 2023-02-30 as a date that does not exist
        raise ConfigError(f"--set {item!r}: the value cannot be read ({exc})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if isinstance(child, str):  # a model given as its spec string: `supporter: default`
                child = {"spec": child}
            elif child is None:
                child = {}
            elif not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"--set {item!r}: '{where}' is {child!r}, not a section with keys")
            node[part] = child
            node = child
        node[path[-1]] = value
    return data
