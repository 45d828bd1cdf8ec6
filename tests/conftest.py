"""Shared fixtures. Airflow reads its configuration at import, so the environment is set first."""

from __future__ import annotations

import json
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


def run_dag(dag_id: str, conf: dict | None = None, bundle: str = "test-dags"):
    """Run a DAG with dag.test(); return (state, {task_id: return_value XCom})."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    folder = REPO / ("tests/dags" if bundle == "test-dags" else "dags")
    bag = DagBag(dag_folder=str(folder))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags[dag_id]
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
