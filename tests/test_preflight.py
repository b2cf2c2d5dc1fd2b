"""Preflight (`esvr check`): what a recipe still lacks, found in seconds before any stage starts.

Real files in tmp_path, the scripted OpenAI-compatible server on 127.0.0.1, closed ports and
sockets that never answer. The hub cache is pointed at an empty folder: the hub is the edge of
the world here.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
import zstandard
from stub_server import StubServer

from esvr.flows.config import ConfigError, PipelineConfig, load_config
from esvr.flows.preflight import PreflightError, Problem, ensure_ready, exit_code, format_report, preflight

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No hub checkpoint is cached, downloads are allowed, no OpenAI key is set."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hf-hub"
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return cache


@pytest.fixture
def server() -> Iterator[StubServer]:
    with StubServer() as s:  # lists one model: 'stub'
        yield s


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe(tmp_path: Path, data: dict) -> PipelineConfig:
    """A recipe file in tmp_path, loaded as `esvr` loads one; the run folder is in tmp_path too."""
    data = {**data, "run": {"out_dir": str(tmp_path / "run"), **data.get("run", {})}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def stub_model(server: StubServer, name: str = "stub") -> dict:
    return {"spec": f"openai:{name}", "base_url": server.base_url}


def errors(problems: list[Problem]) -> dict[str, str]:
    return {p.key: p.what for p in problems if p.severity == "error"}


def warnings(problems: list[Problem]) -> dict[str, str]:
    return {p.key: p.what for p in problems if p.severity == "warning"}


def zst(path: Path, lines: list[dict]) -> Path:
    path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(json.dumps(x).encode() + b"\n" for x in lines)))
    return path


def esconv_dialogue(initial: str | None, final: str | None) -> dict:
    seeker = {} if initial is None else {"initial_emotion_intensity": initial, "final_emotion_intensity": final}
    return {
        "emotion_type": "anxiety",
        "problem_type": "job crisis",
        "situation": "layoffs",
        "survey_score": {"seeker": seeker},
        "dialog": [
            {"speaker": "seeker", "content": "I might lose my job.", "annotation": {}},
            {
                "speaker": "supporter",
                "content": "That sounds hard. What worries you most?",
                "annotation": {"strategy": "Question"},
            },
            {"speaker": "seeker", "content": "Thanks, talking helps.", "annotation": {}},
        ],
    }


def datasets_built(tmp_path: Path) -> None:
    """The run folder as an earlier build_datasets left it, for the training stages alone."""
    (tmp_path / "run" / "datasets").mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / "datasets" / "manifest.json").write_text("{}")


def finetuned(name: str, corpus: str, data: Path) -> dict:
    """An evaluate row fine-tuned on a corpus file first (a plain-style baseline)."""
    return {"name": name, "style": "plain", "finetune": corpus, "finetune_data": str(data)}


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------------------------
# the recipes of the repository
# --------------------------------------------------------------------------------------------


def test_paper_recipe_without_key_dumps_or_servers_lists_every_missing_thing(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe's relative dumps/ and external/ are not here
    port = closed_port()
    config = load_config(
        ROOT / "configs/paper.yaml",
        [f"run.out_dir={tmp_path / 'run'}", f"label.emotion.model.base_url=http://127.0.0.1:{port}/v1"],
    )
    start = time.perf_counter()
    problems = preflight(config)
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\npreflight of configs/paper.yaml: {elapsed:.2f} s, {len(problems)} problems")
    assert elapsed < 10

    errs, warns = errors(problems), warnings(problems)
    for role in ("supporter", "seeker", "persona_writer", "judge"):
        assert "OPENAI_API_KEY is not set" in errs[f"models.{role}"]
    assert "OPENAI_API_KEY is not set" in errs["evaluate.supporters[0].model"]  # the GPT row
    assert "dumps/offmychest_submissions.zst does not exist" in errs["ingest.dumps[0]"]
    assert "dumps/offmychest_comments.zst does not exist" in errs["ingest.dumps[1]"]
    assert f"server at http://127.0.0.1:{port}/v1 does not answer" in errs["label.emotion.model"]
    for i, corpus in ((2, "ESConv"), (3, "ExTES"), (4, "Psych8k")):
        assert f"external/{corpus}.json does not exist" in errs[f"evaluate.supporters[{i}].finetune_data"]
    # hub checkpoints are downloaded on first use: warnings, not errors
    assert "will be downloaded from the hub on first use" in warns["models.base"]
    assert "will be downloaded" in warns["label.values.checkpoints[0]"]
    # the analysis reads the publishers' file, which has the survey intensities
    assert "external/ESConv.json does not exist" in errs["analyze_esconv.esconv"]
    assert "will be downloaded" in warns["evaluate.supporters[1].model"]  # the Llama row
    # the run folder was writable, the dask extra is installed, pipeline:* rows come from this run
    assert not any(k.startswith(("run.", "orchestration.")) or k.endswith(".component") for k in errs)

    assert exit_code(problems) == 1
    report = format_report(problems).splitlines()
    assert len(report) == len(problems) + 1
    assert report[0].startswith("error    ") and report[-1].startswith(f"{len(errs)} error(s), {len(warns)} warning(s)")
    with pytest.raises(PreflightError, match=r"ingest\.dumps\[0\]") as raised:
        ensure_ready(config)
    assert isinstance(raised.value, ConfigError)  # the CLI prints it as one message, no traceback


def test_demo_recipe_passes(tmp_path: Path):
    config = load_config(ROOT / "configs/demo.yaml", [f"run.out_dir={tmp_path / 'run'}"])
    assert preflight(config) == []
    assert ensure_ready(config) == []
    assert format_report([]) == "nothing missing"


# --------------------------------------------------------------------------------------------
# chat models and servers
# --------------------------------------------------------------------------------------------


def test_recipe_whose_servers_answer_and_list_the_models_passes(tmp_path: Path, server: StubServer):
    with StubServer() as emotion_server:
        dumps = [zst(tmp_path / "RS_2021-06.zst", [{"id": "p1"}]), zst(tmp_path / "RC_2021-06.zst", [{"id": "c1"}])]
        esconv = write_json(tmp_path / "ESConv.json", [esconv_dialogue("5", "1"), esconv_dialogue("5", "4")])
        config = recipe(
            tmp_path,
            {
                "models": {role: stub_model(server) for role in ("supporter", "seeker", "persona_writer", "judge")},
                "ingest": {"dumps": [str(d) for d in dumps]},
                "label": {"emotion": {"backend": "emollama", "model": stub_model(emotion_server)}},
                "analyze_esconv": {"esconv": str(esconv)},
                "evaluate": {
                    "supporters": [
                        {"name": "Prompted", "model": stub_model(server)},
                        finetuned("ESConv-FT", "esconv", esconv),
                        finetuned("ExTES-FT", "extes", FIXTURES / "extes_sample.json"),
                        finetuned("Psych8k-FT", "psych8k", FIXTURES / "psych8k_sample.json"),
                        {"name": "Ours", "component": "pipeline:supporter_dpo"},
                    ],
                    "reference": "Ours",
                },
            },
        )
        assert preflight(config) == []


def test_a_server_that_does_not_serve_the_model_is_named(tmp_path: Path, server: StubServer):
    config = recipe(
        tmp_path,
        {
            "run": {"stages": ["personas", "evaluate"]},
            "models": {
                "persona_writer": stub_model(server, "llama3-70b"),
                "seeker": stub_model(server),
                "judge": stub_model(server, "llama3-70b"),
                "supporter": stub_model(server),
            },
        },
    )
    problems = preflight(config)
    assert problems == [
        Problem(
            "models.persona_writer, models.judge",
            f"server at {server.base_url} answers but does not serve llama3-70b; it serves: stub",
            "correct the model name in the spec, or serve that model there",
        )
    ]


def test_a_server_that_never_answers_costs_only_the_timeout(tmp_path: Path):
    with socket.socket() as silent:  # accepts connections (backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        config = recipe(tmp_path, {"run": {"stages": ["smoke"]}, "models": {"supporter": {"spec": "openai:m", "base_url": url}}})
        start = time.perf_counter()
        problems = preflight(config, timeout_s=1.0)
        assert time.perf_counter() - start < 3
    assert errors(problems) == {"models.supporter": f"server at {url} did not answer GET /models within 1 s"}


def test_a_server_that_wants_a_key_gets_the_one_in_api_key_env(tmp_path: Path, monkeypatch):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class KeyedModels(BaseHTTPRequestHandler):  # a vLLM started with --api-key secret
        def do_GET(self) -> None:
            ok = self.headers.get("Authorization") == "Bearer secret"
            body = json.dumps({"object": "list", "data": [{"id": "m"}]} if ok else {"error": "unauthorized"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), KeyedModels)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        config = recipe(
            tmp_path,
            {
                "run": {"stages": ["smoke"]},
                "models": {"supporter": {"spec": "openai:m", "base_url": url, "api_key_env": "VLLM_KEY"}},
            },
        )
        monkeypatch.setenv("VLLM_KEY", "wrong")
        assert errors(preflight(config)) == {"models.supporter": f"server at {url} refuses the key in VLLM_KEY (HTTP 401)"}
        monkeypatch.setenv("VLLM_KEY", "secret")
        assert preflight(config) == []
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_openai_needs_only_its_key_variable(tmp_path: Path, monkeypatch):
    config = recipe(
        tmp_path,
        {
            "run": {"stages": ["personas"]},
            "models": {"persona_writer": {"spec": "openai:gpt-4o", "api_key_env": "MY_OPENAI_KEY"}},
        },
    )
    monkeypatch.delenv("MY_OPENAI_KEY", raising=False)
    assert errors(preflight(config)) == {
        "models.persona_writer": "MY_OPENAI_KEY is not set (needed for openai:gpt-4o on the OpenAI API)"
    }
    monkeypatch.setenv("MY_OPENAI_KEY", "sk-test")
    assert preflight(config) == []


def test_only_the_models_of_the_selected_stages_are_checked(tmp_path: Path):
    # supporter, seeker and judge are OpenAI models without a key, but only personas runs
    config = recipe(
        tmp_path,
        {
            "run": {"stages": ["personas"]},
            "models": {"supporter": "openai:gpt-4o-mini", "seeker": "openai:gpt-4o-mini", "judge": "openai:gpt-4o-mini"},
        },
    )
    assert preflight(config) == []
    assert set(errors(preflight(config, ["personas", "evaluate"]))) >= {"models.seeker", "models.judge", "models.supporter"}


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def test_dumps_must_be_readable_zstd_files(tmp_path: Path):
    good = zst(tmp_path / "RS_2021-06.zst", [{"id": "p1"}])
    plain = tmp_path / "RC_2021-06.zst"
    plain.write_text('{"id": "c1"}\n')
    empty = tmp_path / "RC_2021-07.zst"
    empty.touch()
    config = recipe(
        tmp_path, {"run": {"stages": ["ingest"]}, "ingest": {"dumps": [str(good), str(plain), str(empty), str(tmp_path)]}}
    )
    errs = errors(preflight(config))
    assert set(errs) == {"ingest.dumps[1]", "ingest.dumps[2]", "ingest.dumps[3]"}
    assert "is not a zstd file" in errs["ingest.dumps[1]"]
    assert "is empty" in errs["ingest.dumps[2]"]
    assert "is not a file" in errs["ingest.dumps[3]"]
    # no dumps: the generated sample dump
    assert preflight(recipe(tmp_path, {"run": {"stages": ["ingest"]}}), ["ingest"]) == []


def test_esconv_for_the_analysis_needs_its_survey_intensities(tmp_path: Path):
    def check(data: object) -> list[Problem]:
        path = tmp_path / "ESConv.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return preflight(recipe(tmp_path, {"analyze_esconv": {"esconv": str(path)}}), ["analyze_esconv"])

    assert check([esconv_dialogue("5", "1"), esconv_dialogue("5", "3")]) == []
    no_survey = errors(check([esconv_dialogue(None, None)] * 3))
    assert "no dialogue falls in either group" in no_survey["analyze_esconv.esconv"]
    assert "initial_emotion_intensity" in no_survey["analyze_esconv.esconv"]
    fix = next(p.fix for p in check([esconv_dialogue(None, None)]) if p.key == "analyze_esconv.esconv")
    assert "github.com/thu-coai/Emotional-Support-Conversation" in fix
    assert (
        "the low group is empty" in warnings(check(FIXTURES.joinpath("esconv_sample.json").read_text()))["analyze_esconv.esconv"]
    )
    assert "not valid JSON" in errors(check("[{"))["analyze_esconv.esconv"]
    missing = preflight(
        recipe(tmp_path, {"analyze_esconv": {"esconv": str(tmp_path / "none" / "ESConv.json")}}), ["analyze_esconv"]
    )
    assert "does not exist" in errors(missing)["analyze_esconv.esconv"]


def test_fine_tuning_corpora_parse_with_the_fields_the_loaders_read(tmp_path: Path):
    bad = write_json(tmp_path / "Psych8k.json", [{"instruction": "x", "input": "I feel low"}])
    config = recipe(
        tmp_path,
        {
            "evaluate": {
                "supporters": [
                    finetuned("Psych8k-FT", "psych8k", bad),
                    finetuned("ExTES-FT", "extes", FIXTURES / "psych8k_sample.json"),
                ],
                "reference": "Psych8k-FT",
            },
        },
    )
    errs = errors(preflight(config, ["evaluate"]))
    assert "record 0 needs 'input' and 'output'" in errs["evaluate.supporters[0].finetune_data"]
    assert "no 'content' list" in errs["evaluate.supporters[1].finetune_data"]  # a Psych8k file given as ExTES


def test_simulator_fidelity_reads_esconv_final_intensities(tmp_path: Path):
    unrated = write_json(tmp_path / "FailedESConv.json", [esconv_dialogue(None, None)])
    config = recipe(tmp_path, {"evaluate": {"fidelity": {"esconv": str(unrated)}}})
    # the command skips Table 11 with a warning and still runs Table 29: a warning here too
    problems = preflight(config, ["simulator_fidelity"])
    assert "Table 11) will be skipped" in warnings(problems)["evaluate.fidelity.esconv"] and not errors(problems)
    config = recipe(tmp_path, {"evaluate": {"fidelity": {"esconv": str(FIXTURES / "esconv_sample.json")}}})
    assert preflight(config, ["simulator_fidelity"]) == []
    finetuned = {
        "esconv": str(FIXTURES / "esconv_sample.json"),
        "finetuned": [{"spec": "openai:ft-seeker", "api_key_env": "ESVR_UNSET_KEY"}],
    }
    assert (
        "ESVR_UNSET_KEY"
        in errors(preflight(recipe(tmp_path, {"evaluate": {"fidelity": finetuned}}), ["simulator_fidelity"]))[
            "evaluate.fidelity.finetuned[0]"
        ]
    )
    # not part of `esvr run`: the pipeline's check leaves it alone
    assert preflight(recipe(tmp_path, {"evaluate": {"fidelity": {"esconv": str(tmp_path / "absent.json")}}}), ["report"]) == []


def test_stage_inputs_from_stages_outside_the_run_must_be_in_the_run_folder(tmp_path: Path):
    config = recipe(tmp_path, {"run": {"stages": ["train_tvd"]}})
    errs = errors(preflight(config))
    assert "train_tvd reads" in errs["run.stages"] and "datasets/manifest.json" in errs["run.stages"]
    assert "build_datasets stage writes" in errs["run.stages"]
    datasets_built(tmp_path)
    assert preflight(config) == []
    # with the writer in the run, nothing is expected yet
    assert preflight(recipe(tmp_path / "other", {"run": {"stages": ["personas", "simulate"]}})) == []


# --------------------------------------------------------------------------------------------
# checkpoints, adapters, components
# --------------------------------------------------------------------------------------------


def test_local_checkpoints_must_exist_hub_ids_missing_from_the_cache_are_warnings(tmp_path: Path, empty_hub: Path, monkeypatch):
    import huggingface_hub.constants as hub

    datasets_built(tmp_path)

    def check(base: str) -> list[Problem]:
        return preflight(
            recipe(tmp_path, {"models": {"base": base}, "train_tvd": {"eval": {"baselines": ["base"]}}}), ["train_tvd"]
        )

    assert "checkpoint ./checkpoints/llama does not exist" in errors(check("./checkpoints/llama"))["models.base"]
    (tmp_path / "llama").mkdir()
    assert check(str(tmp_path / "llama")) == []
    assert "will be downloaded from the hub on first use" in warnings(check("org/model"))["models.base"]
    (empty_hub / "models--org--model" / "snapshots" / "0123abc").mkdir(parents=True)
    assert check("org/model") == []
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    assert "not in the local HF cache" in errors(check("org/other"))["models.base"]


def test_adapters_and_component_folders(tmp_path: Path):
    adapter = tmp_path / "adapters" / "tvd"
    config = recipe(
        tmp_path,
        {
            "simulate": {"tvd": f"hf:default+{adapter}"},
            "evaluate": {"supporters": [{"name": "Trained", "component": str(adapter)}], "reference": "Trained"},
        },
    )
    errs = errors(preflight(config, ["personas", "simulate", "evaluate"]))
    assert f"adapter {adapter} does not exist" in errs["simulate.tvd"]
    assert f"{adapter} does not exist" in errs["evaluate.supporters[0].component"]
    adapter.mkdir(parents=True)
    assert "no component.json in it" in errors(preflight(config, ["personas", "evaluate"]))["evaluate.supporters[0].component"]
    (adapter / "component.json").write_text(json.dumps({"base": "default", "component": "tvd"}))
    assert preflight(config, ["personas", "simulate", "evaluate"]) == []
    # this run trains the detector: simulate.tvd is not what the simulation uses
    assert "simulate.tvd" not in errors(
        preflight(recipe(tmp_path, {"simulate": {"tvd": "hf:default+/nowhere"}}), ["train_tvd", "personas", "simulate"])
    )


def test_mlflow_components_warn_only_when_the_tracking_store_is_missing(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("ESVR_CACHE_DIR", str(tmp_path / "esvr-cache"))  # nothing downloaded before
    config = recipe(tmp_path, {"evaluate": {"supporters": [{"name": "Ours", "component": "mlflow:abc123"}], "reference": "Ours"}})
    warns = warnings(preflight(config, ["personas", "evaluate"]))
    assert "mlflow:abc123: the tracking store" in warns["evaluate.supporters[0].component"]
    (tmp_path / "run").mkdir(exist_ok=True)
    sqlite3.connect(tmp_path / "run" / "mlflow.db").close()
    assert preflight(config, ["personas", "evaluate"]) == []


def test_pipeline_rows_need_the_stage_that_trains_them(tmp_path: Path):
    config = recipe(
        tmp_path, {"evaluate": {"supporters": [{"name": "Ours", "component": "pipeline:supporter_sft"}], "reference": "Ours"}}
    )
    assert preflight(config, ["personas", "train_supporter", "simulate", "evaluate"]) == []
    errs = errors(preflight(config, ["personas", "evaluate"]))
    assert "comes from the train_supporter stage, which this run leaves out" in errs["evaluate.supporters[0].component"]


def test_keys_a_variant_overrides_are_named_with_the_variant(tmp_path: Path):
    if "variants" not in PipelineConfig.model_fields:
        pytest.skip("this recipe format has no variants")
    datasets_built(tmp_path)
    config = recipe(
        tmp_path,
        {
            "run": {"stages": ["train_rg"]},
            "train_rg": {"judge": "default"},
            "variants": {"emotion": {"train_rg": {"judge": "openai:gpt-4o-mini", "with_values": False}}},
        },
    )
    assert errors(preflight(config)) == {
        "variants.emotion.train_rg.judge": "OPENAI_API_KEY is not set (needed for openai:gpt-4o-mini on the OpenAI API)"
    }


# --------------------------------------------------------------------------------------------
# run folder and orchestration
# --------------------------------------------------------------------------------------------


def test_run_folder_must_be_writable(tmp_path: Path):
    (tmp_path / "a-file").write_text("")
    config = recipe(tmp_path, {"run": {"out_dir": str(tmp_path / "a-file" / "run"), "stages": ["report"]}})
    assert "cannot write to" in errors(preflight(config))["run.out_dir"]
    config = recipe(tmp_path, {"run": {"out_dir": str(tmp_path / "new" / "run"), "stages": ["report"]}})
    assert preflight(config) == [] and (tmp_path / "new" / "run").is_dir()


def test_task_runner_extra_and_scheduler(tmp_path: Path):
    import importlib.util

    port = closed_port()
    config = recipe(
        tmp_path, {"run": {"stages": ["report"]}, "orchestration": {"task_runner": "dask", "address": f"tcp://127.0.0.1:{port}"}}
    )
    assert "dask scheduler at tcp://127.0.0.1:" in errors(preflight(config))["orchestration.address"]
    with socket.socket() as scheduler:
        scheduler.bind(("127.0.0.1", 0))
        scheduler.listen(1)
        address = f"127.0.0.1:{scheduler.getsockname()[1]}"
        assert (
            preflight(
                recipe(tmp_path, {"run": {"stages": ["report"]}, "orchestration": {"task_runner": "dask", "address": address}})
            )
            == []
        )
    threads = recipe(tmp_path, {"run": {"stages": ["report"]}, "orchestration": {"task_runner": "threads", "address": address}})
    assert "task_runner is threads" in warnings(preflight(threads))["orchestration.address"]
    if importlib.util.find_spec("prefect_ray") is None:
        ray = recipe(tmp_path, {"run": {"stages": ["report"]}, "orchestration": {"task_runner": "ray"}})
        assert "ray needs prefect_ray" in errors(preflight(ray))["orchestration.task_runner"]


def test_evaluation_overrides_that_do_not_validate(tmp_path: Path):
    config = recipe(tmp_path, {"evaluate": {"simulate_overrides": {"max_turnz": 3}}})
    assert "max_turnz" in errors(preflight(config, ["personas", "evaluate"]))["evaluate.simulate_overrides"]
