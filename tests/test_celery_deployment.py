"""docker-compose.yaml's CeleryExecutor deployment for real, without Docker (tests/celery_deployment.py):
PostgreSQL, Redis, api-server, scheduler, dag-processor, triggerer and two Celery workers, configured
from the compose file. The example ``segment_export`` DAG keeps its export state in PostgreSQL.

1. A worker is SIGKILLed (with every process it started, as when its machine is lost) while it runs
   ``export_mailchimp``; the scheduler notices the missing heartbeats, the retry runs on the other worker
   and resumes from the state in PostgreSQL: the destinations end as after a clean run, only members of
   the batches in flight at the kill were sent again, the summary accounts for every row, and neither
   worker's log holds a secret or an email.
2. Two runs export different segments to the same audience at once, one on each worker, each within the
   ``mailchimp_default`` pool's slots; no state row lock is waited on; the audience ends right.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import pytest
import requests

from tests.celery_deployment import Deployment, missing_prerequisites
from tests.test_faults import assert_row_accounting
from tests.test_mailchimp_export import expected

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
PROFILES = 30_000  # all_customers: 60 batch-subscribe calls of 500, 10 in flight
LATENCY = {"base_ms": 100, "per_item_ms": 10}  # 5.1 s a Mailchimp call: about 30 s for all_customers
BATCH, IN_FLIGHT = 500, 10

# Test-only settings on top of the compose file's: Airflow must notice the lost worker within seconds, retry
# at once, run one task per worker (so that each worker's share is known) and create no scheduled runs.
OVERRIDES = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "3",
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
    "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
    "AIRFLOW__API__WORKERS": "1",
}
# A cluster policy (the deployment's config/airflow_local_settings.py): the example DAG's retries, but a
# short delay instead of its 5 minutes.
LOCAL_SETTINGS = '''
from datetime import timedelta


def task_policy(task):
    if task.dag_id == "segment_export":
        task.retry_delay = timedelta(seconds=2)
        task.retry_exponential_backoff = 0
'''
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


@pytest.fixture(scope="module")
def deployment():
    missing = missing_prerequisites()
    if missing:
        pytest.skip("the Celery deployment needs: " + "; ".join(missing))
    dep = Deployment(workers=2, env={"SEGEXPORT_PROFILES": str(PROFILES)}, airflow_overrides=OVERRIDES,
                     dag_files=[REPO / "tests" / "celery_dags" / "segment_export_concurrent.py"],
                     local_settings=LOCAL_SETTINGS)
    started = time.monotonic()
    dep.start()
    dep.started_in = time.monotonic() - started
    try:
        dep.wait_dag("segment_export")
        dep.wait_dag("segment_export_concurrent")
        yield dep
    finally:
        dep.stop()


# -- the sandbox and the export state --------------------------------------------------------------------

def admin(dep: Deployment, method: str, path: str, **kw):
    r = requests.request(method, f"http://127.0.0.1:{dep.ports['sandbox']}/_sandbox/{path}", timeout=120, **kw)
    r.raise_for_status()
    return r.json() if r.content else None


def fresh_destinations(dep: Deployment) -> None:
    """The destinations as airflow-init seeded them, no request logged, no export state."""
    admin(dep, "POST", "reset")
    admin(dep, "POST", "seed", json=json.loads(Path(dep.sandbox.seed_file).read_text()))
    admin(dep, "DELETE", "requests")
    tables = dep.psql("SELECT string_agg(tablename, ', ') FROM pg_tables WHERE tablename LIKE 'segexport\\_%'")
    if tables:
        dep.psql(f"TRUNCATE {tables}")
    state_dir = Path(dep.service_env("airflow-scheduler").get("SEGEXPORT_STATE_DIR", dep.root / "segexport"))
    for f in state_dir.rglob("*"):
        if f.is_file():
            f.unlink()


def latency(dep: Deployment, base_ms: float = 0, per_item_ms: float = 0) -> None:
    admin(dep, "POST", "latency", json={"base_ms": base_ms, "per_item_ms": per_item_ms})


def destinations(dep: Deployment) -> dict:
    env = dep.service_env("airflow-scheduler")
    mc = admin(dep, "GET", "state/mailchimp")["audiences"][env["AIRFLOW_VAR_MAILCHIMP_AUDIENCE_ID"]]["members"]
    cm = admin(dep, "GET", "state/campaign_monitor")
    return {"mailchimp": {e.lower(): m for e, m in mc.items()}, "campaign_monitor": cm}


def log(dep: Deployment):
    return dep.sandbox.sandbox.log


def export_tasks(dep: Deployment, dag_id: str, run_id: str) -> dict[str, dict]:
    r = dep.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances")
    r.raise_for_status()
    return {t["task_id"]: t for t in r.json()["task_instances"]
            if t["task_id"].startswith("export_") and t["state"] != "skipped"}  # skipped: no connection


def warehouse_path(dep: Deployment) -> Path:
    return Path(dep.service_env("airflow-scheduler")["SEGEXPORT_WAREHOUSE_PATH"])


def secrets(dep: Deployment) -> set[str]:
    """Every credential the compose file gives Airflow: connection passwords and secret extras, the JWT key."""
    env = dep.service_env("airflow-scheduler")
    found = {env["AIRFLOW__API_AUTH__JWT_SECRET"]}
    for key, value in env.items():
        if key.startswith("AIRFLOW_CONN_") and value.startswith("{"):
            conn = json.loads(value)
            found |= {conn.get("password") or ""}
            found |= {str(v) for k, v in (conn.get("extra") or {}).items() if re.search("key|secret|token", k)}
    return {s for s in found if len(s) >= 8}


def assert_logs_clean(dep: Deployment, names: list[str]) -> None:
    """No secret and no email in the workers' logs, nor in the logs of the tasks they ran."""
    texts = {name: dep.log(name) for name in names}
    for path in (dep.root / "logs").glob("dag_id=*/**/*.log"):
        texts[str(path.relative_to(dep.root))] = path.read_text(errors="replace")
    assert any("export_mailchimp" in name for name in texts), list(texts)
    for name, text in texts.items():
        for secret in secrets(dep):
            assert secret not in text, f"a credential in {name}"
        emails = {m.group(0) for m in EMAIL.finditer(text)}
        assert not emails, f"{len(emails)} email address(es) in {name}, e.g. {sorted(emails)[:3]}"


def refusals_folded(summary: dict) -> dict:
    """Rejects by reason, a member the vendor refused during the lost try counted as refused by the vendor (the
    retry knows it from the refusal store and does not send it again)."""
    reasons = dict(summary["rejects"]["by_reason"])
    again = reasons.pop("previously_refused", 0)
    if again:
        reasons["vendor_rejected"] = reasons.get("vendor_rejected", 0) + again
    return reasons


# -- 1. a worker lost mid-export -----------------------------------------------------------------------------

def test_worker_killed_mid_export_the_retry_resumes_on_the_other_worker(deployment):
    dep = deployment
    conf = {"segments": ["all_customers"]}  # to every destination that has a connection
    rows = sqlite3.connect(warehouse_path(dep)).execute(
        "SELECT COUNT(*) FROM segment_members WHERE segment_name = 'all_customers'").fetchone()[0]
    assert rows >= PROFILES

    # the reference: a clean run of the same export
    fresh_destinations(dep)
    latency(dep)
    t0 = time.monotonic()
    clean_run = dep.trigger("segment_export", conf)
    assert dep.wait_run("segment_export", clean_run, 240) == "success"
    clean_seconds = time.monotonic() - t0
    clean = {"destinations": destinations(dep), "sends": log(dep).sends_of("mailchimp"),
             "summaries": {t: dep.xcom("segment_export", clean_run, t) for t in export_tasks(dep, "segment_export",
                                                                                          clean_run)}}
    assert set(clean["summaries"]) >= {"export_mailchimp", "export_campaign_monitor"}
    assert all(n == 1 for n in clean["sends"].values())

    # the same export with the vendor's latency; the worker running export_mailchimp is lost midway
    fresh_destinations(dep)
    latency(dep, **LATENCY)
    run = dep.trigger("segment_export", conf)
    deadline = time.monotonic() + 180
    while log(dep).snapshot()["items_by_route"].get("mailchimp batch-subscribe", 0) < 2.4 * BATCH * IN_FLIGHT:
        assert time.monotonic() < deadline, "export_mailchimp never got going"
        assert dep.dag_run("segment_export", run)["state"] in ("queued", "running")
        time.sleep(0.1)
    ti = dep.task_instance("segment_export", run, "export_mailchimp")
    assert ti["state"] == "running" and ti["try_number"] == 1, ti
    victim = dep.worker_of_host(ti["hostname"])  # the task instance's hostname and pid in Airflow's metadata
    killed = dep.kill_worker(victim, task_pid=ti["pid"])
    time.sleep(0.5)  # what the dead worker wrote to its sockets reaches the sandbox
    sent_before = set(log(dep).sends_of("mailchimp"))  # every member in a call made before the kill
    latency(dep)  # the retry need not wait for the vendor's latency
    assert len(sent_before) < rows - BATCH * IN_FLIGHT, "the export had nearly finished when its worker died"

    assert dep.wait_run("segment_export", run, 300) == "success"
    survivor = next(n for n in dep.procs if n.startswith("airflow-worker") and n != victim)

    # Airflow failed the lost try for its missing heartbeat and ran the retry on the other worker
    tries = {t["try_number"]: t for t in dep.tries("segment_export", run, "export_mailchimp")}
    assert tries[1]["hostname"] == victim and tries[1]["pid"] in killed and tries[1]["state"] == "failed", tries[1]
    final = dep.task_instance("segment_export", run, "export_mailchimp")
    assert final["try_number"] == 2 and final["state"] == "success" and final["hostname"] == survivor, final
    assert "without a heartbeat" in dep.log("airflow-scheduler")

    # the destinations hold exactly what a clean run leaves
    after = destinations(dep)
    assert after["mailchimp"] == clean["destinations"]["mailchimp"]
    assert after["campaign_monitor"] == clean["destinations"]["campaign_monitor"]

    # only members of the batches in flight at the kill were sent twice; everyone else as in the clean run
    sends = log(dep).sends_of("mailchimp")
    assert {m for m, n in clean["sends"].items() if sends.get(m, 0) < n} == set()
    twice = {m for m, n in sends.items() if n > clean["sends"].get(m, 0)}
    assert twice <= sent_before, "a member not sent before the kill was sent twice"
    assert len(twice) <= BATCH * IN_FLIGHT, f"{len(twice)} members sent twice: more than the calls in flight"
    assert max(sends.values()) <= 2

    # the summaries account for every row, with the clean run's outcome
    for task_id, clean_summary in clean["summaries"].items():
        summary = dep.xcom("segment_export", run, task_id)
        assert_row_accounting(summary, clean_summary["totals"]["rows"])
        assert summary["totals"]["rejected"] == clean_summary["totals"]["rejected"], task_id
        assert refusals_folded(summary) == refusals_folded(clean_summary), task_id
    assert clean["summaries"]["export_mailchimp"]["totals"]["rows"] == rows

    assert_logs_clean(dep, [n for n in dep.procs if n.startswith("airflow-worker")])
    print(f"\ndeployment healthy in {dep.started_in:.0f} s; clean run {clean_seconds:.0f} s; {len(twice)} members "
          f"sent twice after the kill of {victim}")


# -- 2. two runs at once, one per worker ---------------------------------------------------------------------

def test_two_runs_export_different_segments_to_one_audience_at_once(deployment):
    dep = deployment
    for name in [n for n, p in dep.procs.items() if n.startswith("airflow-worker") and p.poll() is not None]:
        dep.restart(name)  # the lost machine replaced (the compose file's restart: always)
    segments = ["churn_risk", "newsletter_fr"]
    # the reference: the same two exports one after the other
    fresh_destinations(dep)
    latency(dep)
    for segment in segments:
        run = dep.trigger("segment_export_concurrent", {"segments": [segment]})
        assert dep.wait_run("segment_export_concurrent", run, 180) == "success"
    one_after_the_other = destinations(dep)["mailchimp"]

    fresh_destinations(dep)
    latency(dep, **LATENCY)
    runs = [dep.trigger("segment_export_concurrent", {"segments": [s]}) for s in segments]
    pool_use, lock_waits, both_running = [], [], 0
    deadline = time.monotonic() + 240
    while True:
        states = [dep.dag_run("segment_export_concurrent", r)["state"] for r in runs]
        if all(s in ("success", "failed") for s in states):
            break
        assert time.monotonic() < deadline, states
        pool = dep.api("GET", "pools/mailchimp_default").json()
        pool_use.append(pool["running_slots"] + pool["queued_slots"] + pool.get("deferred_slots", 0))
        tis = [dep.task_instance("segment_export_concurrent", r, "export_mailchimp")["state"] for r in runs]
        both_running += tis == ["running", "running"]
        lock_waits.append(int(dep.psql("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                                       "WHERE NOT l.granted AND d.datname = 'segexport'")))
        time.sleep(0.5)
    assert states == ["success", "success"]

    tis = [dep.task_instance("segment_export_concurrent", r, "export_mailchimp") for r in runs]
    assert {t["hostname"] for t in tis} == {n for n in dep.procs if n.startswith("airflow-worker")}, tis
    assert max(t["start_date"] for t in tis) < min(t["end_date"] for t in tis), "the exports did not overlap"
    assert both_running >= 2
    assert max(pool_use) <= 10 and all(t["pool_slots"] == 5 for t in tis)
    assert max(lock_waits) == 0, "an export waited on the other's state rows"

    # The audience ends as when the two exports ran one after the other, and holds the warehouse's members.
    # An address of two profiles (duplicate_email), one in each segment, gets the names of whichever export
    # wrote last, whatever the order: either profile's is right.
    got = destinations(dep)["mailchimp"]
    assert set(got) == set(one_after_the_other)
    names: dict[str, set] = {}
    for email, first, last in sqlite3.connect(warehouse_path(dep)).execute(
            "SELECT DISTINCT email, first_name, last_name FROM segment_export WHERE segment_name IN (?, ?) "
            "AND email IS NOT NULL", segments):
        names.setdefault(email.strip().lower(), set()).add(((first or "").strip(), (last or "").strip()))
    for email, member in got.items():
        ref = one_after_the_other[email]
        assert (member["status"], member["tags"]) == (ref["status"], ref["tags"]), email
        if member["merge_fields"] != ref["merge_fields"]:
            assert len(names.get(email, ())) > 1, (email, member, ref)
            assert (member["merge_fields"]["FNAME"], member["merge_fields"]["LNAME"]) in names[email], email
    # every valid member, with at least its segments (a duplicate_email profile whose twin is in the other
    # segment is not a duplicate within its own export: it is sent too)
    want, *_ = expected(warehouse_path(dep), segments)
    assert all(w["tags"] <= set(got[e]["tags"]) for e, w in want.items())
    for run, segment in zip(runs, segments, strict=True):
        summary = dep.xcom("segment_export_concurrent", run, "export_mailchimp")
        assert_row_accounting(summary, sum(1 for _ in sqlite3.connect(warehouse_path(dep)).execute(
            "SELECT 1 FROM segment_members WHERE segment_name = ?", (segment,))))
    assert_logs_clean(dep, [n for n in dep.procs if n.startswith("airflow-worker")])
