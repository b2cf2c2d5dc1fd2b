"""The project's cache policy: files by content, outputs by name, configs by value, code by source."""

from __future__ import annotations

from pathlib import Path

from esvr.flows.config import ModelConfig, SmokeConfig
from esvr.tasks.caching import path_digest, stable_form


def test_same_content_at_another_path_has_the_same_digest(tmp_path: Path):
    a = tmp_path / "a.zst"
    b = tmp_path / "sub" / "b.zst"
    b.parent.mkdir()
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    assert stable_form(a) == stable_form(b)
    b.write_bytes(b"other bytes")
    assert stable_form(a) != stable_form(b)


def test_folder_digest_follows_names_and_contents(tmp_path: Path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.txt").write_text("1")
    first = path_digest(d)
    (d / "y.txt").write_text("2")
    assert path_digest(d) != first
    second = path_digest(d)
    (d / "cache-0123abcd.arrow").write_bytes(b"written by a reader's .map()")
    assert path_digest(d) == second  # derived cache files are not input


def test_configs_hash_by_value_and_local_weights_by_content(tmp_path: Path):
    assert stable_form(SmokeConfig()) == stable_form(SmokeConfig())
    assert stable_form(SmokeConfig(max_tokens=1)) != stable_form(SmokeConfig())
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"v1")
    spec = ModelConfig(spec=f"hf:{tmp_path}+{adapter}")
    before = stable_form(spec)
    (adapter / "adapter_model.safetensors").write_bytes(b"v2 retrained")
    assert stable_form(spec) != before  # a retrained adapter at the same path invalidates
