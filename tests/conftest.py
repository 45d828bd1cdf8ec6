"""Shared fixtures. Airflow reads its configuration at import, so the environment is set first."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_AIRFLOW_HOME = Path(os.environ.get("SEGEXPORT_TEST_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="segexport-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
os.environ.setdefault("AIRFLOW__CORE__TEST_CONNECTION", "Enabled")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
# Two DAG bundles: the example DAGs users copy, and small DAGs that exercise one operator each.
os.environ["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"] = json.dumps([
    {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
     "kwargs": {"path": str(REPO / "dags")}},
    {"name": "test-dags", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
     "kwargs": {"path": str(REPO / "tests" / "dags")}},
])

import pytest  # noqa: E402
import requests  # noqa: E402

from airflow_provider_segexport.sandbox.runner import SandboxServer  # noqa: E402


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    return _AIRFLOW_HOME


@pytest.fixture(scope="session")
def sandbox_server():
    """One HTTPS sandbox for the whole test session (reset before each test that uses ``sandbox``)."""
    server = SandboxServer(rng_seed=7)
    server.start()
    server.initial_seed = json.loads(json.dumps(server.sandbox.seed))  # what a test that seeds its own restores
    yield server
    server.stop()


class SandboxClient:
    """Small helper around the ``/_sandbox/`` admin API."""

    def __init__(self, server: SandboxServer) -> None:
        self.server = server
        self.info = server.info
        self.admin = server.info["admin_url"]
        self.session = requests.Session()
        self.session.verify = server.info["ca_bundle"]
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE would override verify

    def state(self, vendor: str) -> dict:
        r = self.session.get(f"{self.admin}/state/{vendor}", timeout=30)
        r.raise_for_status()
        return r.json()

    def reset(self) -> None:
        self.session.post(f"{self.admin}/reset", timeout=30).raise_for_status()

    def fault(self, **rule) -> None:
        self.session.post(f"{self.admin}/faults", json=rule, timeout=30).raise_for_status()

    def requests(self) -> dict:
        return self.session.get(f"{self.admin}/requests", timeout=30).json()

    def latency(self, base_ms: float = 0, per_item_ms: float = 0) -> None:
        self.session.post(f"{self.admin}/latency", json={"base_ms": base_ms, "per_item_ms": per_item_ms},
                          timeout=30).raise_for_status()


@pytest.fixture
def sandbox(sandbox_server) -> SandboxClient:
    client = SandboxClient(sandbox_server)
    client.reset()
    client.latency(0, 0)
    yield client
    if sandbox_server.sandbox.seed != sandbox_server.initial_seed:  # a test seeded its own destination state
        client.session.post(f"{client.admin}/seed", json=sandbox_server.initial_seed, timeout=60).raise_for_status()
    client.reset()


@pytest.fixture(scope="session")
def airflow_db(airflow_home) -> Path:
    """A migrated SQLite metadata database (needed by dag.test())."""
    if not (airflow_home / ".migrated").exists():
        airflow = Path(sys.executable).parent / "airflow"
        subprocess.run([str(airflow), "db", "migrate"], check=True, env=os.environ.copy(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        (airflow_home / ".migrated").touch()
    return airflow_home


def refreshed_warehouse(path: Path, profiles: int, seed: int = 42) -> Path:
    """A sample warehouse at ``path``, built and with its segments refreshed (what the DAG's refresh task does)."""
    from airflow_provider_segexport import warehouse

    warehouse.build(path, profiles=profiles, seed=seed)
    warehouse.refresh(path)
    return path


def run_dag(dag_id: str, conf: dict | None = None, bundle: str = "test-dags", retries: int | None = None):
    """Run a DAG with dag.test(); return (state, {task_id: return_value XCom}). ``retries`` overrides the
    tasks' own (0: a failing task fails the run at once instead of waiting for its retry delay)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    folder = REPO / ("tests/dags" if bundle == "test-dags" else "dags")
    bag = DagBag(dag_folder=str(folder))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags[dag_id]
    if retries is not None:
        for task in dag.tasks:
            task.retries = retries
    dr = dag.test(run_conf=conf or {})
    values = {}
    with create_session() as session:
        rows = session.scalars(select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == dr.run_id,
                                                       XComModel.key == "return_value")).all()
        for row in rows:
            values[row.task_id] = XComModel.deserialize_value(row)
    return dr.state, values


@pytest.fixture
def mailchimp_conn(sandbox, monkeypatch):
    """``mailchimp_default`` pointing at the sandbox, privacy acknowledged."""
    info = sandbox.info
    monkeypatch.setenv("AIRFLOW_CONN_MAILCHIMP_DEFAULT", json.dumps({
        "conn_type": "mailchimp", "host": info["mailchimp"]["base_url"],
        "extra": {"api_key": info["mailchimp"]["api_key"], "ca_bundle": info["ca_bundle"],
                  "data_privacy_acknowledged": True},
    }))
    return info["mailchimp"]


def connect_sync(sandbox, monkeypatch, *, dataverse_privacy: bool = True) -> None:
    """``dynamics365_default`` and ``adobe_campaign_default`` pointing at the sandbox (the Campaign one with the
    events journal), as the sync, events and opt-out tests use them.

    :param dataverse_privacy: acknowledge data privacy on the Dataverse connection (needed by the opt-out sync,
        which writes contacts).
    """
    info = sandbox.info
    dv, acs = info["dynamics365"], info["adobe_campaign"]
    dv_extra = {"tenant_id": dv["tenant_id"], "client_id": dv["client_id"], "client_secret": dv["client_secret"],
                "authority": dv["authority"], "ca_bundle": info["ca_bundle"]}
    if dataverse_privacy:
        dv_extra["data_privacy_acknowledged"] = True
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS365_DEFAULT", json.dumps({
        "conn_type": "dynamics365", "host": dv["base_url"], "extra": dv_extra}))
    monkeypatch.setenv("AIRFLOW_CONN_ADOBE_CAMPAIGN_DEFAULT", json.dumps({
        "conn_type": "adobe_campaign", "host": acs["base_url"],
        "extra": {"client_id": acs["client_id"], "client_secret": acs["client_secret"], "org_id": acs["org_id"],
                  "ims_url": acs["ims_url"], "scopes": acs["scope"], "ca_bundle": info["ca_bundle"],
                  "events_url": acs["events_url"], "ims_org_id": acs["ims_org_id"],
                  "data_privacy_acknowledged": True}}))


# -- PostgreSQL (Debian's server binaries; no Docker) for the SQL-connection export state ----------------

def _postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb (Debian's postgresql package)."""
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(x) if x.isdigit() else x for x in Path(p).parent.parent.name.split(".")])
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL server for the session: initdb in a temporary directory, trust auth for
    user ``segexport`` on 127.0.0.1 and a free port, fsync off. Yields its connection details."""
    import shutil
    import socket
    import time

    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): run `make postgres` "
                    "(as root: apt-get install postgresql) to run the PostgreSQL export state tests")
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a `postgres` system user to run the PostgreSQL server as: "
                        "install Debian's postgresql package (`make postgres`)")
    root = Path(tempfile.mkdtemp(prefix="segexport-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run the server as the postgres user
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    init = subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "segexport",
                           "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
                          capture_output=True, text=True, timeout=180)
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed: {init.stdout[-2000:]}{init.stderr[-2000:]}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = root / "postgres.log"
    log_fh = open(log_path, "wb")  # kept open for the server's lifetime
    proc = subprocess.Popen([*prefix, str(bindir / "postgres"), "-D", str(data), "-k", str(sockets), "-p", str(port),
                             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                             "-c", "full_page_writes=off"], stdout=log_fh, stderr=subprocess.STDOUT)

    def stop() -> None:
        proc.terminate()  # SIGTERM: smart shutdown (runuser passes it on to the server)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if (data / "postmaster.pid").exists():  # the server outlived runuser: stop it directly
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate"],
                           capture_output=True, timeout=60)
        log_fh.close()
        shutil.rmtree(root, ignore_errors=True)

    deadline = time.monotonic() + 60
    while subprocess.run([str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            log = log_path.read_text(errors="replace")[-3000:]
            stop()
            pytest.fail(f"PostgreSQL did not start: {log}")
        time.sleep(0.2)
    dbname = "segexport_test"
    created = subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "segexport", dbname],
                             capture_output=True, text=True, timeout=60)
    if created.returncode != 0:
        stop()
        pytest.fail(f"createdb failed: {created.stderr}")
    try:
        yield {"host": "127.0.0.1", "port": port, "user": "segexport", "dbname": dbname,
               "url": f"postgresql+psycopg://segexport@127.0.0.1:{port}/{dbname}"}
    finally:
        stop()


@pytest.fixture
def state_pg(postgres_url, monkeypatch) -> str:
    """The Airflow connection ``state_pg`` (``AIRFLOW_CONN_STATE_PG``) to the session's PostgreSQL."""
    monkeypatch.setenv("AIRFLOW_CONN_STATE_PG", json.dumps({
        "conn_type": "postgres", "host": postgres_url["host"], "port": postgres_url["port"],
        "login": postgres_url["user"], "schema": postgres_url["dbname"],
    }))
    return "state_pg"


@pytest.fixture
def task_log(capfd, caplog):
    """Everything the task logged since the last call: what reached stdout/stderr and what went through
    logging (after the first DAG run of a session, dag.test() routes task logs through logging)."""
    caplog.set_level(logging.INFO)

    def read() -> str:
        out, err = capfd.readouterr()
        text = out + err + caplog.text
        caplog.clear()
        return text

    return read
