"""docker-compose.yml, prefect.yaml and the images, validated without Docker.

Docker (and `docker compose config`) is not available where the tests run, so the checks read
the files the way Compose and Prefect do: YAML with merge keys, ``${VAR:-default}`` interpolation
from .env.example, entry points loaded as Prefect flows.
"""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from esvr.flows.config import load_config
from esvr.flows.deploy import DeployError, deploy, resolve_deployments, work_pools
from esvr.tasks.reddit.ingest import IngestConfig

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
RAW_COMPOSE = (ROOT / "docker-compose.yml").read_text()
PREFECT = yaml.safe_load((ROOT / "prefect.yaml").read_text())
SERVICES = COMPOSE["services"]

CORE = {"postgres", "prefect-server", "mlflow", "worker"}
GPU = {"vllm-supporter", "vllm-seeker", "vllm-judge", "gpu-worker"}
SECRET_KEY = re.compile(r"PASSWORD|API_KEY|_TOKEN$|SECRET")
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    out = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}; $$ is a literal $."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op in (":-", "-"):
            return value if value else (arg if op == ":-" or value is None else value)
        if op in (":?", "?") and not value:
            raise KeyError(f"{name}: {arg}")
        return value or ""

    return VAR.sub(sub, text.replace("$$", "\0")).replace("\0", "$")


def strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


# --------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------


def test_the_compose_services_exist_with_the_gpu_ones_behind_a_profile():
    assert CORE | GPU <= set(SERVICES)
    for name in CORE:
        assert "profiles" not in SERVICES[name], name
    for name in GPU:
        assert SERVICES[name]["profiles"] == ["gpu"], name


def test_every_service_has_an_image_or_a_build_that_exists():
    for name, svc in SERVICES.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            ctx = ROOT / svc["build"]["context"]
            dockerfile = ctx / svc["build"].get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        if "image" in svc and "build" not in svc:
            image = interpolate(svc["image"], {})
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"


def test_the_project_image_copies_what_exists_and_runs_flows_from_the_pull_step_folder():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    assert text.lstrip().startswith("#") and "\nFROM " in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"infra/Dockerfile copies {src}, which does not exist"
    assert "WORKDIR /app" in text and "ESVR_PROJECT_DIR=/app" in text
    assert SERVICES["worker"]["environment"]["ESVR_PROJECT_DIR"] == "/app"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored and ".git" in ignored


@pytest.mark.parametrize("env", [{}, "example"], ids=["defaults", "env-example"])
def test_published_ports_bind_to_loopback(env):
    env = env_example() if env == "example" else {"POSTGRES_PASSWORD": "x", "VLLM_API_KEY": "x"}
    published = 0
    for name, svc in SERVICES.items():
        for port in svc.get("ports", []):
            resolved = interpolate(port, env)
            host = resolved.split(":")[0]
            assert resolved.count(":") == 2 and host == "127.0.0.1", f"{name}: port {port!r} -> {resolved!r}"
            published += 1
    assert "ports" not in SERVICES["postgres"]  # the database is reachable on the compose network only
    assert published == 5  # Prefect, MLflow and the three vLLM servers; nothing else
    assert env_example()["BIND_ADDRESS"] == "127.0.0.1"


class Names(dict):
    """Every variable interpolates to <ITS_NAME>: shows which variable a value came from."""

    def get(self, key, default=None):
        return f"<{key}>"


def assert_password_from_env(where: str, value: str) -> None:
    resolved = interpolate(value, Names())
    creds = re.search(r"://([^:/@]+):([^@]+)@", resolved)
    if creds:
        assert creds.group(2) == "<POSTGRES_PASSWORD>", f"{where}: a password that is not ${{POSTGRES_PASSWORD}}"


def test_no_secret_is_written_in_the_compose_file():
    for name, svc in SERVICES.items():
        env = svc.get("environment", {})
        items = env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env)
        for key, value in items:
            value = str(value)
            if SECRET_KEY.search(key):
                assert VAR.fullmatch(value), f"{name}: {key} must come from .env (${{...}}), not a literal"
            assert_password_from_env(f"{name}: {key}", value)
        for arg in strings(svc.get("command", [])):
            assert_password_from_env(f"{name}: command", arg)
            if arg.startswith("--api-key="):
                assert VAR.fullmatch(arg.split("=", 1)[1]), f"{name}: literal key in {arg!r}"
    # the passwords are required variables: a missing .env stops compose with a message
    assert "${POSTGRES_PASSWORD:?" in RAW_COMPOSE and "${VLLM_API_KEY:?" in RAW_COMPOSE


def test_env_example_documents_every_variable_and_holds_no_real_secret():
    used = {m.group(1) for m in VAR.finditer(RAW_COMPOSE)}
    example = env_example()
    assert used <= set(example), f"variables missing from .env.example: {sorted(used - set(example))}"
    for key, value in example.items():
        if SECRET_KEY.search(key):
            assert value in ("", "change-me"), f".env.example: {key} looks like a real secret"
    interpolate(RAW_COMPOSE, example)  # every required variable is set by the example


def test_env_file_is_not_committed():
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    out = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT).returncode
    assert out == 0, ".env must be ignored by git"
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=ROOT, capture_output=True, text=True).stdout
    assert tracked.strip() == ""


def test_healthchecks_and_start_order():
    for name, svc in SERVICES.items():
        assert "healthcheck" in svc and svc["healthcheck"]["test"], f"{name} has no healthcheck"
    healthy = lambda svc: {k for k, v in svc.get("depends_on", {}).items() if v.get("condition") == "service_healthy"}  # noqa: E731
    assert healthy(SERVICES["prefect-server"]) == {"postgres"}
    assert healthy(SERVICES["mlflow"]) == {"postgres"}
    for worker in ("worker", "gpu-worker"):
        assert healthy(SERVICES[worker]) == {"prefect-server", "mlflow"}


def test_state_survives_in_named_volumes():
    declared = set(COMPOSE["volumes"])
    mounts = {name: [v.split(":")[:2] for v in svc.get("volumes", [])] for name, svc in SERVICES.items()}
    for name, vols in mounts.items():
        for src, _dst in vols:
            if not src.startswith((".", "/")):
                assert src in declared, f"{name}: volume {src} is not declared"

    def target(service: str, path: str) -> str:
        return next(src for src, dst in mounts[service] if dst == path)

    assert target("postgres", "/var/lib/postgresql/data") in declared
    assert target("prefect-server", "/root/.prefect") in declared
    assert target("mlflow", "/mlartifacts") in declared
    # the run folders of both recipes, relative to the worker's /app
    for config in ("demo", "paper"):
        out = load_config(ROOT / "configs" / f"{config}.yaml").run.out_dir
        assert target("worker", f"/app/{out}") in declared


def test_servers_use_postgres_and_mlflow_proxies_artifacts():
    assert "postgresql+asyncpg://" in SERVICES["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    cmd = " ".join(SERVICES["mlflow"]["command"])
    assert "--backend-store-uri=postgresql://" in cmd and "@postgres:5432/mlflow" in cmd
    assert "--artifacts-destination=/mlartifacts" in cmd and "--no-serve-artifacts" not in cmd
    init = (ROOT / "infra" / "postgres" / "init-mlflow-db.sh").read_text()
    assert "CREATE DATABASE" in init
    assert SERVICES["postgres"]["environment"]["POSTGRES_DB"] == "prefect"
    assert SERVICES["worker"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert SERVICES["worker"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"


def test_vllm_serves_supporter_seeker_and_judge_on_gpus():
    for role in ("supporter", "seeker", "judge"):
        svc = SERVICES[f"vllm-{role}"]
        args = " ".join(svc["command"])
        assert f"--served-model-name={role}" in args and "--api-key=${VLLM_API_KEY" in args
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--enable-lora" in SERVICES["vllm-supporter"]["command"]
    assert SERVICES["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


# --------------------------------------------------------------------------------------------
# prefect.yaml
# --------------------------------------------------------------------------------------------


DEPLOYMENTS = {d["name"]: d for d in PREFECT["deployments"]}


def test_prefect_yaml_declares_the_deployments():
    assert set(DEPLOYMENTS) == {"ingest-new-dumps", "pipeline", "train-tvd", "train-rg", "train-supporter"}
    assert {DEPLOYMENTS[n]["work_pool"]["name"] for n in ("train-tvd", "train-rg", "train-supporter")} == {"gpu"}
    assert DEPLOYMENTS["pipeline"]["work_pool"]["name"] == "cpu"
    assert DEPLOYMENTS["ingest-new-dumps"]["work_pool"]["name"] == "cpu"


def test_compose_workers_poll_the_pools_the_deployments_use():
    pools = {SERVICES[w]["command"][SERVICES[w]["command"].index("--pool") + 1] for w in ("worker", "gpu-worker")}
    assert set(work_pools(PREFECT)) == pools == {"cpu", "gpu"}


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_entrypoints_are_flows_that_take_the_parameters(name):
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    dep = DEPLOYMENTS[name]
    path, func = dep["entrypoint"].split(":")
    assert (ROOT / path).is_file()
    flow = load_flow_from_entrypoint(str(ROOT / dep["entrypoint"]), use_placeholder_flow=False)
    assert isinstance(flow, Flow)
    params = inspect.signature(flow.fn).parameters
    assert set(dep["parameters"]) <= set(params), f"{name}: parameters the flow does not take"
    assert (ROOT / dep["parameters"]["config_path"]).is_file()
    load_config(ROOT / dep["parameters"]["config_path"])


def test_ingest_schedule_is_the_configs_cron_and_runs_from_the_project_folder():
    from prefect.client.schemas.schedules import CronSchedule

    schedules = DEPLOYMENTS["ingest-new-dumps"]["schedules"]
    assert len(schedules) == 1
    CronSchedule(cron=schedules[0]["cron"], timezone=schedules[0]["timezone"])  # valid
    for config in ("demo", "paper"):
        assert load_config(ROOT / "configs" / f"{config}.yaml").ingest.schedule_cron == schedules[0]["cron"]
    assert IngestConfig().schedule_cron == schedules[0]["cron"]
    for name in DEPLOYMENTS:
        assert "schedules" not in DEPLOYMENTS[name] or name == "ingest-new-dumps"
    (step,) = PREFECT["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $ESVR_PROJECT_DIR }}"
    assert PREFECT["prefect-version"] == __import__("prefect").__version__


def test_esvr_deploy_fills_in_the_recipe_and_its_cron(tmp_path):
    config = load_config(None)
    config.ingest.schedule_cron = "*/5 * * * *"
    resolved = resolve_deployments(PREFECT, "configs/mine.yaml", config)
    by_name = {d["name"]: d for d in resolved["deployments"]}
    assert by_name["ingest-new-dumps"]["schedules"][0]["cron"] == "*/5 * * * *"
    assert all(d["parameters"]["config_path"] == "configs/mine.yaml" for d in resolved["deployments"])
    assert DEPLOYMENTS["pipeline"]["parameters"]["config_path"] == "configs/paper.yaml"  # the file is not changed


def test_esvr_deploy_names_bad_input_before_it_needs_a_server():
    with pytest.raises(DeployError, match="config file not found: configs/nope.yaml"):
        deploy("configs/nope.yaml")
    with pytest.raises(DeployError, match=r"unknown deployment\(s\) \['typo'\]"):
        deploy("configs/demo.yaml", names=["typo"])


# --------------------------------------------------------------------------------------------
# docs
# --------------------------------------------------------------------------------------------


def test_deployment_docs_and_their_screenshots_exist():
    doc = (ROOT / "docs" / "deployment.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\((img/[^)]+\.png)\)", doc)
    assert {"img/prefect-deployments.png", "img/prefect-run.png", "img/mlflow-compare.png"} <= set(images)
    for image in images:
        path = ROOT / "docs" / image
        assert path.is_file() and path.stat().st_size < 500_000, path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    readme = (ROOT / "README.md").read_text()
    assert "## Deployment" in readme and "esvr deploy" in readme and "docs/deployment.md" in readme
    assert (ROOT / "docs" / "scale.md").is_file()
