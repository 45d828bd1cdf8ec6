"""As a person meets it: `airflow standalone`, a real browser (Debian's headless Chromium), sign in, the
Mailchimp connection form and its Test button, trigger `segment_export` with params from the UI, wait
for success, read the task log. Screenshots go to build/screenshots/."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import requests

from airflow_provider_segexport import demo, warehouse
from tests.conftest import REPO, refreshed_warehouse

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = REPO / "build" / "screenshots"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason="needs Debian's chromium and chromium-driver (make test installs them)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    work = tmp_path_factory.mktemp("ui")
    wh = refreshed_warehouse(work / "warehouse.db", 2000)
    seed = work / "seed.json"
    seed.write_text(json.dumps(warehouse.sandbox_seed(wh)))
    sandbox, info = demo.start_sandbox(work, seed, 0)
    port = _free_port()
    env = demo.airflow_env(work)
    env.update({"AIRFLOW__API__PORT": str(port), "AIRFLOW__API__BASE_URL": f"http://localhost:{port}",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2"})
    for key in list(env):
        if key.startswith("AIRFLOW_CONN_") or key.startswith("AIRFLOW_VAR_"):
            del env[key]
    demo.configure_airflow(env, info, wh)
    log = (work / "standalone.log").open("w")
    proc = subprocess.Popen([demo._bin("airflow"), "standalone"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                health = requests.get(f"{base}/api/v2/monitor/health", timeout=5).json()
                if health.get("scheduler", {}).get("status") == "healthy" and \
                        health.get("dag_processor", {}).get("status") == "healthy":
                    break
            except (requests.RequestException, ValueError):
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"airflow standalone did not become healthy; see {work / 'standalone.log'}")
            time.sleep(2)
        yield {"base": base, "info": info, "work": work}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        time.sleep(2)
        try:  # the scheduler can outlive standalone's SIGTERM: nothing of this test may keep running
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        sandbox.terminate()
        sandbox.wait(timeout=15)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(15)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def _body_text(driver) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return driver.find_element("tag name", "body").text
    except (StaleElementReferenceException, NoSuchElementException):  # the page re-rendered meanwhile
        return ""


def _retry(action, attempts: int = 10):
    """Run a UI action again when React re-rendered the element under it (stale reference)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for attempt in range(attempts):
        try:
            return action()
        except (StaleElementReferenceException, StopIteration):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)


def _wait_text(driver, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in _body_text(driver):
        if time.monotonic() > deadline:
            driver.save_screenshot(str(SHOTS / "failure.png"))
            raise AssertionError(f"{text!r} not on the page; it shows: {_body_text(driver)[-1500:]}")
        time.sleep(0.5)


def test_ui_connection_form_trigger_with_params_and_logs(standalone, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, d = standalone["base"], browser
    # sign in
    d.get(base + "/")
    fields = d.find_elements(By.CSS_SELECTOR, "input")
    fields[0].send_keys("admin")
    fields[1].send_keys("admin")
    fields[1].send_keys(Keys.ENTER)
    _wait_text(d, "Dags")
    d.save_screenshot(str(SHOTS / "01-home.png"))

    # the Mailchimp connection: its Test button and its form
    d.get(base + "/connections")
    _wait_text(d, "mailchimp_default")
    def mc_row():
        return next(r for r in d.find_elements(By.CSS_SELECTOR, "tbody tr") if "mailchimp_default" in r.text)

    _retry(lambda: mc_row().find_element(By.CSS_SELECTOR, "button[aria-label='Test Connection']").click())
    _wait_text(d, "Connected to Mailchimp account")
    d.save_screenshot(str(SHOTS / "02-connection-test.png"))
    time.sleep(1)
    _retry(lambda: mc_row().find_element(By.CSS_SELECTOR, "button[aria-label='Edit Connection']").click())
    _wait_text(d, "Base URL override")  # the relabelled host field (standard fields open first)
    _retry(lambda: d.find_element(By.XPATH, "//*[normalize-space(text())='Extra Fields']").click())
    _wait_text(d, "Data privacy acknowledged")
    labels = _retry(lambda: {e.text.strip() for e in d.find_elements(By.CSS_SELECTOR, "label")})
    assert {"API key", "Data privacy acknowledged", "CA bundle path"} <= labels
    d.save_screenshot(str(SHOTS / "03-mailchimp-connection-form.png"))

    # trigger segment_export with params from the form
    d.get(base + "/dags/segment_export")
    _retry(lambda: d.find_element(By.CSS_SELECTOR, "button[aria-label='Trigger Dag']").click())
    _wait_text(d, "Run Parameters")

    def fill_and_trigger():
        dialog = next(x for x in d.find_elements(By.CSS_SELECTOR, "[role='dialog']") if "Run Parameters" in x.text)
        assert "Dry run" in dialog.text and "Which segments to refresh-and-export." in dialog.text
        segments = dialog.find_element(By.CSS_SELECTOR, "textarea")
        segments.clear()
        segments.send_keys("vip_customers\nnewsletter_fr")
        d.save_screenshot(str(SHOTS / "04-trigger-form.png"))
        trigger = [b for b in dialog.find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == "Trigger"][-1]
        trigger.click()

    _retry(fill_and_trigger)

    # wait for the run (REST API), then look at it in the UI
    token = requests.post(f"{base}/auth/token", json={"username": "admin", "password": "admin"},
                          timeout=30).json()["access_token"]
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {token}"
    deadline = time.monotonic() + 300
    run = None
    time.sleep(3)
    if not [r for r in api.get(f"{base}/api/v2/dags/segment_export/dagRuns", timeout=30).json()["dag_runs"]
            if r["run_type"] == "manual"]:
        d.save_screenshot(str(SHOTS / "failure.png"))
        raise AssertionError("the Trigger form did not create a run (a param failed validation?)")
    while time.monotonic() < deadline:
        runs = api.get(f"{base}/api/v2/dags/segment_export/dagRuns", timeout=30).json()["dag_runs"]
        manual = [r for r in runs if r["run_type"] == "manual"]
        if manual and manual[0]["state"] in ("success", "failed"):
            run = manual[0]
            break
        time.sleep(3)
    assert run is not None, "the triggered run did not finish"
    assert run["conf"]["segments"] == ["vip_customers", "newsletter_fr"]
    d.get(f"{base}/dags/segment_export/runs/{run['dag_run_id']}")
    time.sleep(3)
    d.save_screenshot(str(SHOTS / "05-run.png"))
    assert run["state"] == "success"

    log = api.get(f"{base}/api/v2/dags/segment_export/dagRuns/{run['dag_run_id']}/taskInstances/export_mailchimp"
                  "/logs/1", params={"full_content": "true"}, headers={"Accept": "application/json"}, timeout=60).text
    assert "rows confirmed" in log and "Summary of the export" in log
    assert standalone["info"]["mailchimp"]["api_key"] not in log
    d.get(f"{base}/dags/segment_export/runs/{run['dag_run_id']}/tasks/export_mailchimp")
    time.sleep(3)
    d.save_screenshot(str(SHOTS / "06-task-log.png"))
