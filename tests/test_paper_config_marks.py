"""configs/paper.yaml says, key by key, which numbers are the paper's and which are ours.

Each section carries comment lines ``# paper (<where in the paper>): <keys>`` and ``# ours: <keys>``
(a line indented by three spaces after ``#`` continues the one above; parentheses are remarks).
Keys are dotted paths below the section, ``*`` a wildcard; lists count as one value. Every value in
the file must be claimed by exactly one of the two, and every claim must name a key that exists.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import yaml

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper.yaml"
MARK = re.compile(r"^\s*#\s?(paper \((?P<ref>[^)]+)\)|ours):\s*(?P<keys>.*)$")
CONTINUED = re.compile(r"^\s*#\s{3}(?P<more>\S.*)$")


def leaves(value, path: tuple[str, ...] = ()):
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from leaves(v, (*path, str(k)))
    else:
        yield ".".join(path)


def claims(text: str) -> dict[str, dict[str, list[str]]]:
    """Per top-level section: {'paper': [patterns], 'ours': [patterns]} from its comment lines."""
    out: dict[str, dict[str, list[str]]] = {}
    section, kind, buf = None, None, ""

    def flush() -> None:
        if section and kind:
            remarks_out = re.sub(r"\([^)]*\)", "", buf)
            out[section][kind] += [k.strip() for k in remarks_out.split(",") if k.strip()]

    for line in text.splitlines():
        top = re.match(r"^([A-Za-z_]\w*):", line)
        if top:
            flush()
            section, kind, buf = top.group(1), None, ""
            out[section] = {"paper": [], "ours": []}
            continue
        m = MARK.match(line)
        if m:
            flush()
            kind, buf = ("paper" if m.group(1).startswith("paper") else "ours"), m.group("keys")
            continue
        c = CONTINUED.match(line)
        if c and kind:
            buf += " " + c.group("more")
            continue
        flush()
        kind, buf = None, ""
    flush()
    return out


def test_every_value_in_the_paper_recipe_is_marked_paper_or_ours():
    text = PAPER.read_text()
    data = yaml.safe_load(text)
    marked = claims(text)
    problems = []
    for section, body in data.items():
        own = marked.get(section, {"paper": [], "ours": []})
        keys = [k for k in leaves(body)]
        for kind, patterns in own.items():
            for pattern in patterns:
                if not re.fullmatch(r"[\w.*]+", pattern):
                    problems.append(f"{section}: '{pattern}' in a '# {kind}:' line is not a key pattern")
                elif not any(fnmatchcase(k, pattern) for k in keys):
                    problems.append(f"{section}: '# {kind}:' names '{pattern}', which matches no key")
        for key in keys:
            kinds = [kind for kind, patterns in own.items() if any(fnmatchcase(key, p) for p in patterns)]
            if not kinds:
                problems.append(f"{section}.{key}: neither '# paper (<ref>):' nor '# ours:' names it")
            elif len(kinds) > 1:
                problems.append(f"{section}.{key}: marked both paper and ours")
    assert not problems, "\n".join(problems)


def test_the_check_catches_an_unmarked_key_and_a_stale_mark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    recipe = tmp_path / "paper.yaml"
    recipe.write_text(
        "datasets:\n"
        "  # paper (§5.1): top_k\n"
        "  # ours: dev_size (a remark, with a comma),\n"
        "  #   gone\n"
        "  top_k: 3\n"
        "  dev_size: 10\n"
        "  test_size: 5\n"
    )
    assert claims(recipe.read_text())["datasets"] == {"paper": ["top_k"], "ours": ["dev_size", "gone"]}
    monkeypatch.setattr(__import__(__name__), "PAPER", recipe)
    with pytest.raises(AssertionError) as err:
        test_every_value_in_the_paper_recipe_is_marked_paper_or_ours()
    assert "datasets.test_size: neither" in str(err.value) and "'gone', which matches no key" in str(err.value)
