"""The project's cache policy: files by content, outputs by name, configs by value, code by source."""

from __future__ import annotations

from pathlib import Path

from esvr.models.config import ModelConfig
from esvr.tasks.common.hashing import path_digest, stable_form
from esvr.tasks.smoke import SmokeConfig


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


def test_flow_file_tasks_are_keyed_on_the_domain_modules_doing_the_work():
    from esvr.flows.caching import work_modules

    # the label task lives in a flow file; its work is in tasks/labeling/label.py and the models it loads
    modules = work_modules("esvr.flows.label")
    assert {"esvr.tasks.labeling.label", "esvr.models.value_detector", "esvr.models.emotion"} <= set(modules)
    # a stage subpackage counts with every module in it, imported by the task or not
    stage = work_modules("esvr.tasks.labeling")
    assert {"esvr.tasks.labeling", "esvr.tasks.labeling.analyze_esconv", "esvr.tasks.labeling.value_head"} <= set(stage)
    assert "esvr.tasks.labeling.value_head" not in modules


def test_editing_the_module_that_does_the_work_reruns_the_task(tmp_path: Path, monkeypatch, prefect_harness):
    """A task wrapper in one module, its work in another: a fix there must not hit the old cache."""
    import importlib
    import sys
    import time

    from prefect import flow

    pkg = tmp_path / "esvr_cache_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    calls = tmp_path / "calls.txt"
    (pkg / "work.py").write_text(
        f"def compute(x):\n    with open({str(calls)!r}, 'a') as f:\n        f.write('ran\\n')\n    return x + 1\n"
    )
    (pkg / "wrapper.py").write_text(
        "from prefect import task\n"
        "from esvr.flows.caching import cache_policy\n\n"
        "@task(cache_policy=cache_policy(packages=('esvr_cache_probe',)), persist_result=True)\n"
        "def probe(x: int) -> int:\n"
        "    from esvr_cache_probe.work import compute\n"
        "    return compute(x)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = importlib.import_module("esvr_cache_probe.wrapper").probe

    @flow
    def run_probe() -> int:
        return probe(41)

    assert run_probe() == 42 and run_probe() == 42
    assert calls.read_text().count("ran") == 1  # the second run was cached
    time.sleep(0.01)  # a new mtime, even on coarse clocks
    (pkg / "work.py").write_text((pkg / "work.py").read_text() + "\n# a fix in the work module\n")
    assert run_probe() == 42
    assert calls.read_text().count("ran") == 2
    for name in [m for m in sys.modules if m.startswith("esvr_cache_probe")]:
        del sys.modules[name]


def test_editing_a_prompt_the_task_names_reruns_it(tmp_path: Path, monkeypatch, prefect_harness):
    """`cache_policy(prompts=...)`: new wording of a prompt file is a new result."""
    from prefect import flow, task

    import esvr.prompts
    from esvr.flows.caching import cache_policy

    prompt = tmp_path / "judge.txt"
    prompt.write_text("Rate the reply from 1 to 5.")
    monkeypatch.setattr(esvr.prompts, "prompt_path", lambda name: tmp_path / name)
    calls = []

    @task(cache_policy=cache_policy(prompts=["judge.txt"]), persist_result=True)
    def judged(x: int) -> int:
        calls.append(x)
        return x

    @flow
    def run_judged() -> int:
        return judged(7)

    assert run_judged() == 7 and run_judged() == 7 and len(calls) == 1
    prompt.write_text("Rate the reply from 1 to 10.")
    assert run_judged() == 7 and len(calls) == 2
