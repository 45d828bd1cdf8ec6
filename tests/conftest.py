"""Shared fixtures. Airflow reads its configuration at import, so the environment is set first."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_AIRFLOW_HOME = Path(os.environ.get("SEGEXPORT_TEST_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="segexport-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
os.environ.setdefault("AIRFLOW__CORE__TEST_CONNECTION", "Enabled")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(Path(__file__).resolve().parent.parent / "dags"))

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
