"""Structural checks of docker-compose.yaml and docker/Dockerfile (no Docker engine needed)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"

AIRFLOW_SERVICES = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "celery worker",
}
LONG_RUNNING = {"postgres", "redis", "sandbox", *AIRFLOW_SERVICES}
HEALTHCHECKS = {
    "postgres": "pg_isready",
    "redis": "redis-cli ping",
    "airflow-apiserver": "http://localhost:8080/api/v2/monitor/health",
    "airflow-scheduler": "http://localhost:8974/health",
    "airflow-worker": "inspect ping",
    "airflow-triggerer": "airflow jobs check --job-type TriggererJob",
    "airflow-dag-processor": "airflow jobs check --job-type DagProcessorJob",
    "sandbox": "http://localhost:8443/_sandbox/requests",
}
POOLS = {"mailchimp_default": 10, "campaign_monitor_default": 4, "dynamics365_default": 52}
SANDBOX_BASE = "http://sandbox:8443"


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR-default}`` / ``${VAR}`` with an empty environment."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: interpolate(str(v)) for k, v in environment.items()}


def command_text(service: dict) -> str:
    cmd = service.get("command", "")
    return cmd if isinstance(cmd, str) else " ".join(str(c) for c in cmd)


def healthcheck_text(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def sandbox_args(services) -> list[str]:
    cmd = services["sandbox"]["command"]
    args = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    assert args[0] == "segexport-sandbox"
    return args[1:]


# -- services, images, health --------------------------------------------------------------------

def test_usage_comment_at_the_top():
    head = COMPOSE.read_text(encoding="utf-8").splitlines()[:15]
    assert all(line.startswith("#") for line in head[:5])
    assert any("docker compose up" in line for line in head)


def test_required_services(services):
    assert LONG_RUNNING | {"airflow-init"} <= set(services)
    for name, command in AIRFLOW_SERVICES.items():
        assert command_text(services[name]) == command, name


def test_images_are_pinned(services):
    for name, service in services.items():
        image = interpolate(service.get("image", ""))
        assert image, f"{name} has no image (a build needs a tag too)"
        repo, _, tag = image.rpartition(":")
        assert repo and tag and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and "latest" not in image, f"{name}: {image!r}"
    assert interpolate(services["postgres"]["image"]).startswith("postgres:16.")
    assert interpolate(services["redis"]["image"]).startswith("redis:7.2")


def test_every_long_running_service_has_a_healthcheck(services):
    for name in LONG_RUNNING:
        assert "healthcheck" in services[name], name
        text = healthcheck_text(services[name])
        assert HEALTHCHECKS[name] in text, (name, text)
        assert services[name].get("restart") in ("always", "unless-stopped"), name
    assert "healthcheck" not in services["airflow-init"]


def test_depends_on_uses_conditions(services):
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        for dep, spec in deps.items():
            expected = "service_completed_successfully" if dep == "airflow-init" else "service_healthy"
            assert spec == {"condition": expected}, (name, dep, spec)
    for name in AIRFLOW_SERVICES:
        assert {"postgres", "redis", "airflow-init"} <= set(services[name]["depends_on"]), name
    assert {"postgres", "redis"} <= set(services["airflow-init"]["depends_on"])
    assert "airflow-init" in services["sandbox"]["depends_on"]  # it loads the seed the init job writes
    assert "airflow-apiserver" in services["airflow-worker"]["depends_on"]  # the Execution API
    for name in ("airflow-worker", "airflow-triggerer", "airflow-apiserver"):
        assert "sandbox" in services[name]["depends_on"], name


def test_workers_are_scaled(services):
    assert services["airflow-worker"]["deploy"]["replicas"] >= 2


# -- shared Airflow configuration ----------------------------------------------------------------

def test_airflow_services_share_configuration(services):
    names = [*AIRFLOW_SERVICES, "airflow-init"]
    envs = {name: env(services[name]) for name in names}
    secrets = {e.get("AIRFLOW__API_AUTH__JWT_SECRET") for e in envs.values()}
    assert len(secrets) == 1 and secrets.pop(), "one JWT secret for every Airflow service"
    for name, e in envs.items():
        assert e["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/", name
        assert e["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert e["AIRFLOW__CORE__TEST_CONNECTION"] == "Enabled"
        assert e["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
        assert e["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "true"
        assert "postgres" in e["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        assert e["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
        assert e["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
        assert "admin:admin" in e["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]
    images = {interpolate(services[n]["image"]) for n in [*names, "sandbox"]}
    builds = {json.dumps(services[n]["build"], sort_keys=True) for n in [*names, "sandbox"]}
    assert len(images) == 1 and len(builds) == 1, "one image for every Airflow service and the sandbox"


def test_dags_folder_and_data_volume_are_mounted(services):
    for name in [*AIRFLOW_SERVICES, "airflow-init"]:
        volumes = services[name]["volumes"]
        assert "./dags:/opt/airflow/dags" in volumes, name
        assert any(v.endswith(":/opt/airflow/data") for v in volumes), name
    assert any(":/opt/airflow/data" in v for v in services["sandbox"]["volumes"])


def test_init_creates_the_pools(services):
    script = command_text(services["airflow-init"])
    created = {name: int(slots) for name, slots in re.findall(r"airflow pools set (\S+) (\d+)", script)}
    assert created == POOLS
    assert "airflow db migrate" in script
    assert "set -e" in script  # a failed step fails the job, and nothing starts


def test_init_admin_password_and_warehouse(services):
    from airflow_provider_segexport.sandbox.__main__ import build_parser as sandbox_parser
    from airflow_provider_segexport.warehouse import build_parser as warehouse_parser

    e = env(services["airflow-init"])
    script = command_text(services["airflow-init"])
    assert "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE" in script
    assert e["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"].startswith("/opt/airflow/config/")
    assert any(v.endswith(":/opt/airflow/config") for v in services["airflow-apiserver"]["volumes"])

    build = re.search(r"segexport-warehouse (build .*?)(?:\n(?!\s)|$)", script.replace("\\\n", " "), re.S)
    assert build, "the init job builds the sample warehouse"
    command = re.sub(r"\$\$\{(\w+)\}", lambda m: e[m.group(1)], build.group(1))  # the shell's variables
    args = warehouse_parser().parse_args(shlex.split(command))
    assert args.profiles == 20_000
    seed_file = sandbox_parser().parse_args(sandbox_args(services)).seed
    assert args.sandbox_seed == seed_file == "/opt/airflow/data/sandbox_seed.json"
    assert args.path == env(services["airflow-worker"])["SEGEXPORT_WAREHOUSE_PATH"]


# -- the sandbox and the connections -------------------------------------------------------------

def test_sandbox_command_matches_its_cli(services):
    from airflow_provider_segexport.sandbox.__main__ import build_parser

    args = build_parser().parse_args(sandbox_args(services))
    assert (args.host, args.port, args.plain_http) == ("0.0.0.0", 8443, True)  # noqa: S104
    assert args.tls_dir == "/opt/sandbox-tls"
    assert args.rng_seed is not None, "deterministic credentials are what the connections carry"


@pytest.fixture(scope="module")
def sandbox_info(services) -> dict:
    from airflow_provider_segexport.sandbox.__main__ import build_parser
    from airflow_provider_segexport.sandbox.core import Sandbox

    args = build_parser().parse_args(sandbox_args(services))
    return Sandbox(rng_seed=args.rng_seed).info(SANDBOX_BASE, None)


def connections(service: dict) -> dict[str, dict]:
    return {k[len("AIRFLOW_CONN_"):].lower(): json.loads(v) for k, v in env(service).items()
            if k.startswith("AIRFLOW_CONN_")}


def test_connections_point_at_the_sandbox(services, sandbox_info):
    from airflow_provider_segexport import get_provider_info

    conn_types = {c["connection-type"] for c in get_provider_info()["connection-types"]}
    conns = connections(services["airflow-worker"])
    assert {"mailchimp_default", "campaign_monitor_default", "segexport_warehouse"} <= set(conns)
    assert conns["segexport_warehouse"] == {"conn_type": "sqlite", "host": "/opt/airflow/data/warehouse.db"}
    for conn_id, conn in conns.items():
        if conn_id in ("segexport_warehouse", "segexport_state"):  # the source data and the export state
            continue
        vendor = conn["conn_type"]
        assert vendor in conn_types and conn_id == f"{vendor}_default"
        assert conn["host"].startswith(SANDBOX_BASE + "/"), conn_id
        assert conn["host"] == sandbox_info[vendor]["base_url"], conn_id
        assert conn["extra"]["data_privacy_acknowledged"] is True
    assert conns == connections(services["airflow-apiserver"]) == connections(services["airflow-triggerer"])


def test_connection_credentials_match_the_sandbox(services, sandbox_info):
    """The sandbox derives its credentials from --rng-seed: a change in an emulator shows up here."""
    conns = connections(services["airflow-worker"])
    mc = conns["mailchimp_default"]["extra"]
    assert mc["api_key"] == sandbox_info["mailchimp"]["api_key"]
    cm = conns["campaign_monitor_default"]["extra"]
    assert (cm["api_key"], cm["client_id"]) == (sandbox_info["campaign_monitor"]["api_key"],
                                                sandbox_info["campaign_monitor"]["client_id"])
    if "adobe_campaign_default" in conns:
        ac, info = conns["adobe_campaign_default"]["extra"], sandbox_info["adobe_campaign"]
        assert (ac["client_id"], ac["client_secret"], ac["org_id"], ac["ims_url"], ac["scopes"]) == (
            info["client_id"], info["client_secret"], info["org_id"], info["ims_url"], info["scope"])
    if "dynamics365_default" in conns:
        d365, info = conns["dynamics365_default"]["extra"], sandbox_info["dynamics365"]
        assert (d365["tenant_id"], d365["client_id"], d365["client_secret"]) == (
            info["tenant_id"], info["client_id"], info["client_secret"])
    e = env(services["airflow-worker"])
    assert e["AIRFLOW_VAR_MAILCHIMP_AUDIENCE_ID"] == sandbox_info["mailchimp"]["audience_id"]
    assert e["AIRFLOW_VAR_CAMPAIGN_MONITOR_LIST_ID"] == sandbox_info["campaign_monitor"]["list_id"]


def test_commented_dynamics365_connection_matches_the_sandbox(sandbox_info):
    """Dynamics 365 waits for HTTPS inside compose; the ready-to-use line must stay correct."""
    line = next((ln for ln in COMPOSE.read_text(encoding="utf-8").splitlines()
                 if ln.strip().startswith("# AIRFLOW_CONN_DYNAMICS365_DEFAULT:")), None)
    if line is None:
        pytest.skip("no commented Dynamics 365 connection")
    conn = json.loads(line.split(":", 1)[1].strip().strip("'"))
    info = sandbox_info["dynamics365"]
    assert (conn["extra"]["tenant_id"], conn["extra"]["client_id"], conn["extra"]["client_secret"]) == (
        info["tenant_id"], info["client_id"], info["client_secret"])
    assert conn["host"] == info["base_url"].replace("http://", "https://")


# -- the image -----------------------------------------------------------------------------------

def test_dockerfile_pins_airflow_and_installs_the_provider(services):
    text = DOCKERFILE.read_text(encoding="utf-8")
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms == ["apache/airflow:3.3.2-python3.11"]
    constraints = REPO / "constraints.txt"
    if constraints.exists():
        pin = re.search(r"^apache-airflow==(\S+)$", constraints.read_text(encoding="utf-8"), re.M)
        assert pin and pin.group(1) == "3.3.2", "the image's Airflow is the version constraints.txt froze"
        assert "--constraint constraints.txt" in text
    assert re.search(r"^COPY .*\bairflow_provider_segexport\b", text, re.M)
    assert re.search(r"^COPY .*\bpyproject\.toml\b", text, re.M)
    install = re.search(r"pip install[^\n]*", text.replace("\\\n", " "))
    assert install and "/opt/segexport-src" in install.group(0) and "apache-airflow==${AIRFLOW_VERSION}" in install.group(0)
    for name in ("pyproject.toml", "README.md", "airflow_provider_segexport"):
        assert (REPO / name).exists(), f"the Dockerfile copies {name}"
    # The api-server is built from this Dockerfile, like every other Airflow service.
    build = services["airflow-apiserver"]["build"]
    assert (REPO / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    ignore = DOCKERFILE.with_name("Dockerfile.dockerignore")
    assert ignore.exists() and "!airflow_provider_segexport/" in ignore.read_text(encoding="utf-8")


def test_image_paths_exist_in_the_dockerfile(services):
    """Named volumes copy the ownership of their mount point: the image must create them for airflow."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    for path in ("/opt/airflow/data", "/opt/airflow/config", "/opt/sandbox-tls"):
        assert re.search(rf"mkdir -p [^\n]*{re.escape(path)}\b", text), path


# -- docker compose config -----------------------------------------------------------------------

def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_validates():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "SEGEXPORT", "COMPOSE_"))}
    result = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], cwd=REPO, capture_output=True, text=True,
                            env=environment, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_connections_the_example_dag_uses_are_defined():
    """segment_export must find its warehouse, Mailchimp connection and audience variable in compose."""
    import yaml

    from tests.conftest import REPO

    env = yaml.safe_load((REPO / "docker-compose.yaml").read_text())["x-airflow-common"]["environment"]
    dag_src = (REPO / "dags" / "segment_export.py").read_text()
    assert 'WAREHOUSE_CONN_ID = "segexport_warehouse"' in dag_src
    assert "AIRFLOW_CONN_SEGEXPORT_WAREHOUSE" in env and "AIRFLOW_CONN_MAILCHIMP_DEFAULT" in env
    assert "AIRFLOW_VAR_MAILCHIMP_AUDIENCE_ID" in env and "SEGEXPORT_STATE_DIR" in env
    # the export state in the compose PostgreSQL, named by the Variable the example DAG reads
    assert "var.value.get('segexport_state_conn_id'" in dag_src
    state = json.loads(env["AIRFLOW_CONN_SEGEXPORT_STATE"])
    assert env["AIRFLOW_VAR_SEGEXPORT_STATE_CONN_ID"] == "segexport_state"
    assert (state["conn_type"], state["host"]) == ("postgres", "postgres")
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    assert compose["services"]["postgres"]["environment"]["POSTGRES_DB"] == state["schema"]
