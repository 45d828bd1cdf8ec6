"""Delta exports, mirror removals from the export state, circuit breakers, and resume after SIGKILL,
measured by what the sandbox received."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from airflow_provider_segexport import warehouse
from tests.bench.run import OURS as EXPORT_DRIVER
from tests.conftest import REPO, refreshed_warehouse, run_dag

SQL = "SELECT * FROM segment_export WHERE segment_name = {segment} ORDER BY customer_id"


def clean_customers(db, n, offset=0):
    """Customers with no anomaly, no pre-existing destination state and no other profile sharing their
    email: their rows are always sent, and only for them."""
    return [r[0] for r in db.execute(
        "SELECT customer_id FROM profiles WHERE customer_id NOT IN (SELECT customer_id FROM profile_anomalies) "
        "AND customer_id NOT IN (SELECT customer_id FROM destination_state WHERE customer_id IS NOT NULL) "
        "AND customer_id NOT IN (SELECT detail FROM profile_anomalies WHERE anomaly = 'duplicate_email') "
        "AND email IS NOT NULL ORDER BY customer_id LIMIT ? OFFSET ?", (n, offset))]


def change_segment(db, *, changed: int, leaving: int, new: int, leaving_offset: int, new_offset: int):
    """Change a mapped field of ``changed`` clean profiles, take ``leaving`` out of 'all_customers' and add
    ``new`` members (copies of clean profiles with new IDs and emails); returns the three ID lists."""
    changed_ids = clean_customers(db, changed)
    leaving_ids = clean_customers(db, leaving, offset=leaving_offset)
    db.executemany("UPDATE profiles SET last_name = last_name || '-Neu' WHERE customer_id = ?",
                   [(c,) for c in changed_ids])
    db.executemany("DELETE FROM segment_members WHERE segment_name = 'all_customers' AND customer_id = ?",
                   [(c,) for c in leaving_ids])
    new_ids = [f"N{i:06d}" for i in range(new)]
    for new_id, src in zip(new_ids, clean_customers(db, new, offset=new_offset), strict=True):
        db.execute("INSERT INTO profiles SELECT ?, 'new.' || ? || '@example.com', first_name, last_name, phone, city, "
                   "country, birthday, signup_date, lifetime_value, loyalty_points, orders_count, last_order_date, "
                   "dataverse_contact_id, updated_at FROM profiles WHERE customer_id = ?", (new_id, new_id.lower(), src))
        db.execute("INSERT INTO segment_members VALUES ('all_customers', ?)", (new_id,))
    db.commit()
    return changed_ids, leaving_ids, new_ids


def make_warehouse(tmp_path, monkeypatch, profiles: int, seed: int):
    """A refreshed sample warehouse behind the ``warehouse`` connection."""
    wh = refreshed_warehouse(tmp_path / "wh.db", profiles, seed)
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(wh)}))
    return wh


@pytest.fixture
def big(tmp_path, monkeypatch, sandbox):
    wh = make_warehouse(tmp_path, monkeypatch, 100_000, 7)
    sandbox.session.post(f"{sandbox.admin}/seed", json=warehouse.sandbox_seed(wh), timeout=120).raise_for_status()
    return wh


def conf(sandbox, tmp_path, **kw):
    return {"audience_id": sandbox.info["mailchimp"]["audience_id"], "segments": ["all_customers"], "sql": SQL,
            "state_dir": str(tmp_path / "state"), "mode": "mirror", **kw}


def test_second_run_sends_only_changes_and_removes_only_leavers(airflow_db, mailchimp_conn, big, sandbox, tmp_path):
    state, xcom = run_dag("mailchimp_export_test", conf(sandbox, tmp_path))
    assert state == "success"
    first = xcom["export"]["totals"]
    assert first["created"] > 90_000

    db = sqlite3.connect(big)
    changed, leaving, new_ids = change_segment(db, changed=1000, leaving=500, new=100,  # 1 % / 0.5 % / 100 new
                                               leaving_offset=2000, new_offset=5000)

    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30)
    state, xcom = run_dag("mailchimp_export_test", conf(sandbox, tmp_path))
    assert state == "success"
    received = sandbox.requests()["items_by_route"]
    assert received.get("mailchimp batch-subscribe") == len(changed) + len(new_ids)
    assert received.get("mailchimp segment-remove") == len(leaving)
    t = xcom["export"]["totals"]
    assert (t["created"], t["updated"], t["removed"]) == (len(new_ids), len(changed), len(leaving))
    assert t["skipped"] == first["created"] + first["updated"] + first["unchanged"] - len(changed) - len(leaving)
    members = sandbox.state("mailchimp")["audiences"][sandbox.info["mailchimp"]["audience_id"]]["members"]
    leaver_emails = {e.strip().lower() for (e,) in db.execute(
        f"SELECT email FROM profiles WHERE customer_id IN ({','.join('?' * len(leaving))})", leaving)}
    lower = {e.lower(): m for e, m in members.items()}
    assert all(lower[e]["tags"] == [] and lower[e]["status"] == "subscribed" for e in leaver_emails)

    # full_refresh ignores the state and sends everything again
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30)
    state, xcom = run_dag("mailchimp_export_test", conf(sandbox, tmp_path, full_refresh=True))
    assert state == "success" and xcom["export"]["totals"]["skipped"] == 0
    assert sandbox.requests()["items_by_route"]["mailchimp batch-subscribe"] > 90_000


def test_circuit_breakers_stop_before_sending(airflow_db, mailchimp_conn, sandbox, tmp_path, monkeypatch):
    wh = make_warehouse(tmp_path, monkeypatch, 3000, 3)
    assert run_dag("mailchimp_export_test", conf(sandbox, tmp_path))[0] == "success"
    db = sqlite3.connect(wh)
    # a broken upstream model: the segment loses 30 % of its members
    db.execute("DELETE FROM segment_members WHERE segment_name = 'all_customers' AND CAST(substr(customer_id, 2) AS INTEGER) % 10 < 3")
    db.commit()
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30)
    state, _ = run_dag("mailchimp_export_test", conf(sandbox, tmp_path))
    assert state == "failed"
    assert "mailchimp segment-remove" not in sandbox.requests()["items_by_route"]
    state, xcom = run_dag("mailchimp_export_test", conf(sandbox, tmp_path, allow_large_changes=True))
    assert state == "success" and xcom["export"]["totals"]["removed"] > 0
    # ... and a segment that collapses (e.g. an empty join) is refused before anything is sent
    db.execute("DELETE FROM segment_members WHERE segment_name = 'all_customers' AND CAST(substr(customer_id, 2) AS INTEGER) % 10 < 9")
    db.commit()
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30)
    assert run_dag("mailchimp_export_test", conf(sandbox, tmp_path))[0] == "failed"
    assert not any(k.startswith("mailchimp POST") for k in sandbox.requests()["counts"])


# The same driver the benchmark uses: the operator's execute() in a process of its own (killable).
CRASH_SCRIPT = EXPORT_DRIVER


def test_sigkill_midway_then_retry_resumes_without_resending(mailchimp_conn, sandbox, tmp_path, monkeypatch):
    wh = make_warehouse(tmp_path, monkeypatch, 20_000, 5)
    sandbox.session.post(f"{sandbox.admin}/seed", json=warehouse.sandbox_seed(wh), timeout=60).raise_for_status()
    sandbox.latency(base_ms=150)  # slow enough to kill it midway
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    args = [sys.executable, str(script), json.dumps({
        "vendor": "mailchimp", "target": mailchimp_conn["audience_id"], "state_dir": str(tmp_path / "state"),
        "rejects": f"file://{tmp_path}/rejects.jsonl", "mode": "delta", "run_id": "scheduled__crash"})]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while sandbox.requests()["items_by_route"].get("mailchimp batch-subscribe", 0) < 8000:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the worker dies mid-export
    proc.wait()
    sent_before = sandbox.requests()["items_by_route"]["mailchimp batch-subscribe"]
    assert sent_before < 19_000, "the export finished before it was killed"

    sandbox.latency(0)
    retry = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)  # Airflow's retry
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    sends = sandbox.requests()
    twice = sends["members_sent_more_than_once"].get("mailchimp", 0)
    assert twice <= 10 * 500, twice  # at most the batches in flight when the worker died
    total_rows = sqlite3.connect(wh).execute(
        "SELECT COUNT(*) FROM segment_members WHERE segment_name = 'all_customers'").fetchone()[0]
    assert sends["items_by_route"]["mailchimp batch-subscribe"] < total_rows + 10 * 500
    members = sandbox.state("mailchimp")["audiences"][mailchimp_conn["audience_id"]]["members"]
    tagged = sum(1 for m in members.values() if "all_customers" in m["tags"])
    # every valid member is there: same as a clean export of the same warehouse would give
    valid = total_rows - sqlite3.connect(wh).execute(
        "SELECT COUNT(DISTINCT a.customer_id) FROM profile_anomalies a JOIN segment_members m USING (customer_id) "
        "WHERE m.segment_name = 'all_customers' AND a.anomaly IN ('invalid_email', 'non_ascii_email', "
        "'duplicate_email', 'long_first_name')").fetchone()[0]
    forgotten = sqlite3.connect(wh).execute(
        "SELECT COUNT(*) FROM destination_state WHERE destination = 'mailchimp' AND status = 'forgotten'").fetchone()[0]
    assert tagged == valid - forgotten


def test_dry_run_writes_a_plan_that_a_later_run_applies_exactly(airflow_db, mailchimp_conn, sandbox, tmp_path,
                                                                 monkeypatch):
    wh = make_warehouse(tmp_path, monkeypatch, 3000, 11)
    assert run_dag("mailchimp_export_test", conf(sandbox, tmp_path))[0] == "success"
    db = sqlite3.connect(wh)
    changed, leaving = clean_customers(db, 20), clean_customers(db, 10, offset=100)
    db.executemany("UPDATE profiles SET first_name = first_name || 'x' WHERE customer_id = ?", [(c,) for c in changed])
    db.executemany("DELETE FROM segment_members WHERE segment_name = 'all_customers' AND customer_id = ?",
                   [(c,) for c in leaving])
    db.commit()

    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30)
    state, xcom = run_dag("mailchimp_export_test", conf(sandbox, tmp_path, dry_run=True))
    assert state == "success" and not any(k.startswith("mailchimp POST") for k in sandbox.requests()["counts"])
    plan = xcom["export"]["plan"]
    dry_rejected = xcom["export"]["totals"]["rejected"]
    assert plan["counts"]["update"] == 20 and plan["counts"]["remove"] == 10
    lines = [json.loads(x) for x in open(plan["path"].removeprefix("file://"), encoding="utf-8")]
    assert all("@" not in json.dumps(x) for x in lines)  # ids and keys only, no email

    # the data moves on after the plan was reviewed: 5 more changes that are NOT in the plan
    later = clean_customers(db, 5, offset=200)
    db.executemany("UPDATE profiles SET first_name = first_name || 'y' WHERE customer_id = ?", [(c,) for c in later])
    db.commit()
    state, xcom = run_dag("mailchimp_export_test", conf(sandbox, tmp_path, apply_plan=plan["path"]))
    assert state == "success"
    received = sandbox.requests()["items_by_route"]
    assert received.get("mailchimp batch-subscribe") == 20 and received.get("mailchimp segment-remove") == 10
    # the 5 later changes, and the rows the destination refused in the dry run (its "skip_consent" / "reject"
    # lines are never to send: applying the plan leaves them too, instead of refusing them again)
    moved = dry_rejected - xcom["export"]["totals"]["rejected"]
    assert xcom["export"]["totals"]["not_in_plan"] == 5 + moved
    # the next normal run picks up what the plan did not cover
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30)
    assert run_dag("mailchimp_export_test", conf(sandbox, tmp_path))[0] == "success"
    assert sandbox.requests()["items_by_route"].get("mailchimp batch-subscribe") == 5


@pytest.mark.parametrize("dag_id", ["mailchimp_export_test", "mailchimp_export_deferred_test"])
def test_change_column_run_reads_only_changed_rows_and_misses_nothing(dag_id, airflow_db, mailchimp_conn, sandbox,
                                                                       tmp_path, monkeypatch):
    """change_column='updated_at': after a day of changes (1 %), the next run reads only the changed rows, and a
    run that reads every row afterwards finds nothing left to send. The deferrable path advances the watermark
    once Mailchimp processed the batch operations."""
    wh = make_warehouse(tmp_path, monkeypatch, 20_000, 13)
    sandbox.session.post(f"{sandbox.admin}/seed", json=warehouse.sandbox_seed(wh), timeout=120).raise_for_status()
    db = sqlite3.connect(wh)
    high = db.execute("SELECT MAX(updated_at) FROM segment_export WHERE segment_name = 'all_customers'").fetchone()[0]
    cfg = conf(sandbox, tmp_path, mode="upsert", change_column="updated_at")
    state, xcom = run_dag(dag_id, cfg)
    assert state == "success"
    assert xcom["export"]["change_column"]["all_customers"] == {"column": "updated_at", "since": None, "high": high,
                                                               "advanced_to": high}

    changed = warehouse.mutate(wh, change_fraction=0.01, remove_fraction=0.0, seed=5, refresh_segments=True)
    assert changed["changed"] == 200
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30)
    state, xcom = run_dag(dag_id, cfg)
    assert state == "success"
    export = xcom["export"]
    assert export["change_column"]["all_customers"]["since"] == high
    t = export["totals"]
    # only the changed rows (and any at the old watermark itself) were read; the rest are unchanged, unread.
    # A change of an unmapped column (phone, loyalty points) is read and found unchanged.
    names = db.execute("SELECT COUNT(*) FROM profile_changes WHERE kind = 'changed' AND (detail LIKE '%first_name%' "
                       "OR detail LIKE '%last_name%')").fetchone()[0]
    assert t["rows"] == 20_000 and t["rows"] - t["skipped"] <= 200 + 5, t
    assert 0.8 * names <= t["updated"] + t["rejected"] <= names, (t, names)
    if dag_id == "mailchimp_export_test":
        assert sandbox.requests()["items_by_route"]["mailchimp batch-subscribe"] == t["updated"] + t["created"]

    # reading every row (no change column) finds nothing the watermark run missed
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30)
    state, xcom = run_dag("mailchimp_export_test", {**cfg, "change_column": ""})
    t = xcom["export"]["totals"]
    assert state == "success" and t["created"] + t["updated"] == 0 and t["skipped"] + t["rejected"] == 20_000, t


def test_deferrable_watermark_stays_for_a_segment_whose_batch_operations_failed(tmp_path):
    """Deferrable mode: the engine leaves the watermark pending; once Mailchimp processed the operations it is
    advanced only for the segments whose every operation Mailchimp processed (a failed operation's rows must
    be read again by the next run, or their changes would never be sent)."""
    from airflow_provider_segexport.export.state import ExportState, Watermark
    from airflow_provider_segexport.export.watermarks import advance_pending

    state = ExportState("mailchimp:mc:aud", tmp_path)
    a, b = state.scope_id("a"), state.scope_id("b")
    old = Watermark("updated_at", '{"str": "2026-01-01"}', b"salt")
    state.set_watermark(a, old, "r1")
    state.set_watermark(b, old, "r1")
    pending = {"column": "updated_at", "value": '{"str": "2026-02-01"}', "salt": b"salt".hex()}
    summary = {"change_column": {
        "a": {"column": "updated_at", "since": "2026-01-01", "high": "2026-02-01", "pending": {"scope_id": a, **pending}},
        "b": {"column": "updated_at", "since": "2026-01-01", "high": "2026-02-01", "pending": {"scope_id": b, **pending}},
    }}
    advance_pending(state, summary["change_column"], incomplete={"a"}, run_id="r2")
    assert state.watermark(a) == old
    assert state.watermark(b) == Watermark("updated_at", '{"str": "2026-02-01"}', b"salt")
    assert "advanced_to" not in summary["change_column"]["a"] and summary["change_column"]["b"]["advanced_to"]
    assert not any("pending" in s for s in summary["change_column"].values())  # not left in the XCom
    state.close()
