"""Mailchimp exports run as real Airflow DAGs (dag.test()) against the sandbox over HTTPS.

The expected audience is computed from the warehouse's own ground truth (``profile_anomalies``,
``destination_state``), not from the exporter's validator.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from airflow_provider_segexport import warehouse
from tests.conftest import refreshed_warehouse, run_dag

SQL = "SELECT * FROM segment_export WHERE segment_name = {segment} ORDER BY customer_id"
PROFILES = 4000


@pytest.fixture(scope="module")
def wh_path(tmp_path_factory):
    return refreshed_warehouse(tmp_path_factory.mktemp("wh") / "warehouse.db", PROFILES)


@pytest.fixture
def wh(wh_path, monkeypatch, sandbox, tmp_path):
    """The warehouse connection, and the sandbox seeded with the destination state."""
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(wh_path)}))
    sandbox.session.post(f"{sandbox.admin}/seed", json=warehouse.sandbox_seed(wh_path), timeout=60).raise_for_status()
    return wh_path


def expected(wh_path, segments):
    """Ground truth: which emails of the segments must end in the audience, and with what."""
    db = sqlite3.connect(wh_path)
    anomalies = {}
    for cid, kind in db.execute("SELECT customer_id, anomaly FROM profile_anomalies"):
        anomalies.setdefault(cid, set()).add(kind)
    bad = {"invalid_email", "non_ascii_email", "duplicate_email", "long_first_name"}
    state = {e.strip().lower(): s for e, s in db.execute(
        "SELECT email, status FROM destination_state WHERE destination = 'mailchimp'")}
    members: dict[str, dict] = {}
    rejected: dict[str, set] = {}
    rows = 0
    for seg in segments:
        q = "SELECT customer_id, email, first_name, last_name FROM segment_export WHERE segment_name = ?"
        for cid, email, first, last in db.execute(q, (seg,)):
            rows += 1
            if anomalies.get(cid, set()) & bad:
                rejected.setdefault(seg, set()).add(cid)
                continue
            key = email.strip().lower()
            if state.get(key) == "forgotten":
                rejected.setdefault(seg, set()).add(cid)
                continue
            m = members.setdefault(key, {"tags": set(), "first": (first or "").strip(), "last": (last or "").strip(),
                                         "status": state.get(key, "subscribed")})
            m["tags"].add(seg)
    return members, rejected, rows, state


def audience(sandbox):
    st = sandbox.state("mailchimp")["audiences"][sandbox.info["mailchimp"]["audience_id"]]
    return {e.lower(): m for e, m in st["members"].items()}


def conf(sandbox, segments, **kw):
    return {"audience_id": sandbox.info["mailchimp"]["audience_id"], "segments": segments, "sql": SQL, **kw}


SEGMENTS = ["all_customers", "vip_customers"]


def test_export_holds_exactly_the_valid_members(airflow_db, mailchimp_conn, wh, sandbox, tmp_path):
    state, xcom = run_dag("mailchimp_export_test", conf(sandbox, SEGMENTS, state_dir=str(tmp_path)))
    assert state == "success"
    summary = xcom["export"]
    want, rejected, rows, pre = expected(wh, SEGMENTS)
    got = audience(sandbox)

    exported = {e: m for e, m in got.items() if m["tags"]}
    assert set(exported) == set(want)
    for email, w in want.items():
        g = got[email]
        assert set(g["tags"]) == w["tags"], email
        assert g["merge_fields"].get("FNAME") == w["first"] and g["merge_fields"].get("LNAME") == w["last"]
        # never resubscribed: unsubscribed / cleaned / archived members keep their status
        assert g["status"] == w["status"], (email, g["status"], w["status"])
    assert any(w["status"] == "unsubscribed" for w in want.values()), "the sample must exercise unsubscribed"
    assert any(w["status"] == "archived" for w in want.values())
    # members that existed before and were not exported are untouched
    for email, status in pre.items():
        if email not in want and status != "forgotten":
            assert got[email]["status"] == status and got[email]["tags"] == []

    t = summary["totals"]
    assert t["rows"] == rows
    assert t["created"] + t["updated"] + t["unchanged"] + t["rejected"] == rows
    assert t["rejected"] == sum(len(v) for v in rejected.values())
    assert summary["rejects"]["count"] == t["rejected"]
    lines = [json.loads(x) for x in open(summary["rejects"]["path"].removeprefix("file://"), encoding="utf-8")]
    assert {(r["segment"], r["key"]) for r in lines} == {(s, c) for s, cs in rejected.items() for c in cs}
    reasons = {r["reason"] for r in lines}
    assert {"invalid_email", "duplicate", "vendor_rejected"} <= reasons
    forgotten = [r for r in lines if r["reason"] in ("vendor_rejected", "previously_refused")]
    assert forgotten and all("permanently deleted" in r["vendor_message"] for r in forgotten)
    assert all("email" not in r or "@" not in str(r.get("email")) for r in lines)

    # A second run sends the same members again: nothing changes, forgotten ones are now refused up
    # front (remembered), and the counts still add up.
    state, xcom = run_dag("mailchimp_export_test", conf(sandbox, SEGMENTS, state_dir=str(tmp_path)))
    t2 = xcom["export"]["totals"]
    assert state == "success" and t2["created"] == 0 and t2["updated"] == 0
    assert xcom["export"]["rejects"]["by_reason"].get("previously_refused") == len(forgotten)
    assert audience(sandbox) == got


@pytest.mark.parametrize("dag_id", ["mailchimp_export_test", "mailchimp_export_every_member_test"])
def test_mirror_removes_only_the_segment_tag_from_leavers(dag_id, airflow_db, mailchimp_conn, wh, sandbox, tmp_path):
    """Mirror mode removes the segment's tag from the members who left it, with delta (only changes sent) and
    with delta=False (every member sent; the export state still finds the leavers)."""
    state, _ = run_dag(dag_id, conf(sandbox, ["all_customers", "vip_customers"], mode="mirror",
                                    state_dir=str(tmp_path)))
    assert state == "success"
    before = audience(sandbox)
    db = sqlite3.connect(wh)
    leavers = [r[0] for r in db.execute(
        "SELECT customer_id FROM segment_members WHERE segment_name = 'vip_customers' ORDER BY customer_id LIMIT 7")]
    db.execute(f"DELETE FROM segment_members WHERE segment_name = 'vip_customers' AND customer_id IN "
               f"({','.join('?' * len(leavers))})", leavers)
    db.commit()
    try:
        leaver_emails = {e.strip().lower() for (e,) in db.execute(
            f"SELECT email FROM profiles WHERE customer_id IN ({','.join('?' * len(leavers))})", leavers)}
        # Same segments as before (duplicates across segments resolve in segment order).
        state, xcom = run_dag(dag_id, conf(sandbox, ["all_customers", "vip_customers"], mode="mirror",
                                           state_dir=str(tmp_path)))
        assert state == "success"
        after = audience(sandbox)
        removed = {e for e in before if "vip_customers" in before[e]["tags"] and "vip_customers" not in after[e]["tags"]}
        assert removed == {e for e in leaver_emails if e in before and "vip_customers" in before[e]["tags"]}
        assert xcom["export"]["totals"]["removed"] == len(removed) > 0
        for email in before:  # nobody else touched; leavers keep their status and other tags
            assert after[email]["status"] == before[email]["status"]
            expected_tags = set(before[email]["tags"]) - ({"vip_customers"} if email in removed else set())
            assert set(after[email]["tags"]) == expected_tags
    finally:
        warehouse.refresh(wh)


def test_mirror_without_delta_that_would_remove_too_many_sends_nothing(airflow_db, mailchimp_conn, wh, sandbox,
                                                                       tmp_path, task_log):
    """mode="mirror" with delta=False goes through the engine's circuit breakers: a segment that lost more than
    max_removal_share of the members exported before stops the run before anything is sent (no add, no update,
    no tag removed), naming the segment, the counts and the override."""
    cfg = conf(sandbox, ["all_customers", "vip_customers"], mode="mirror", state_dir=str(tmp_path))
    assert run_dag("mailchimp_export_every_member_test", cfg)[0] == "success"
    before = audience(sandbox)
    db = sqlite3.connect(wh)
    db.execute("DELETE FROM segment_members WHERE segment_name = 'vip_customers' "
               "AND CAST(substr(customer_id, 2) AS INTEGER) % 10 < 4")  # a broken upstream model: 40 % gone
    db.commit()
    try:
        sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30)
        task_log()  # only this run's log below
        state, xcom = run_dag("mailchimp_export_every_member_test", cfg)
        logs = task_log()
        assert state == "failed" and "export" not in xcom
        assert not any(k.startswith("mailchimp POST") for k in sandbox.requests()["counts"]), sandbox.requests()
        assert audience(sandbox) == before
        for words in ("Mirror: segment 'vip_customers' has", "members exported before, so at least",
                      "max_removal_share=20%", "Nothing was sent", "allow_large_changes=True"):
            assert words in logs, (words, logs[-3000:])
    finally:
        warehouse.refresh(wh)


def test_faults_mid_export_end_in_the_same_audience(airflow_db, mailchimp_conn, wh, sandbox, tmp_path):
    run_dag("mailchimp_export_test", conf(sandbox, ["all_customers"], state_dir=str(tmp_path / "a")))
    clean = audience(sandbox)
    sandbox.session.post(f"{sandbox.admin}/seed", json=warehouse.sandbox_seed(wh), timeout=60)
    sandbox.fault(kind="burst429", vendor="mailchimp", count=6, skip=1, path_contains="/lists/", method="POST")
    sandbox.fault(kind="status", status=503, vendor="mailchimp", count=2, skip=2, method="POST")
    sandbox.fault(kind="drop", vendor="mailchimp", count=2, skip=3, method="POST")
    state, xcom = run_dag("mailchimp_export_test", conf(sandbox, ["all_customers"], state_dir=str(tmp_path / "b")))
    assert state == "success"
    assert audience(sandbox) == clean
    http = xcom["export"]["http"]
    assert http["retries"] >= 10 and http["throttled"] >= 6


def test_dry_run_sends_nothing(airflow_db, mailchimp_conn, wh, sandbox, tmp_path):
    before = audience(sandbox)
    state, xcom = run_dag("mailchimp_export_test", conf(sandbox, ["vip_customers"], dry_run=True,
                                                        state_dir=str(tmp_path)))
    assert state == "success" and xcom["export"]["dry_run"] is True
    assert xcom["export"]["totals"]["planned"] > 0
    assert audience(sandbox) == before
    assert not any(k.startswith("mailchimp POST") for k in sandbox.requests()["counts"])


def test_no_secret_or_email_in_task_logs(airflow_db, mailchimp_conn, wh, sandbox, tmp_path, capfd):
    run_dag("mailchimp_export_test", conf(sandbox, ["vip_customers"], state_dir=str(tmp_path)))
    out, err = capfd.readouterr()
    logs = out + err
    assert "rows confirmed" in logs  # we did capture the task log
    assert mailchimp_conn["api_key"] not in logs
    assert mailchimp_conn["api_key"].rpartition("-")[0] not in logs
    db = sqlite3.connect(wh)
    emails = [e.strip() for (e,) in db.execute(
        "SELECT email FROM segment_export WHERE segment_name = 'vip_customers' AND email LIKE '%@%'")]
    leaked = [e for e in emails if e and e in logs]
    assert not leaked, leaked[:3]


def test_merge_field_checks_before_sending(airflow_db, mailchimp_conn, wh, sandbox, tmp_path):
    state, _ = run_dag("mailchimp_export_test", conf(sandbox, ["vip_customers"], merge_fields={"POINTS": "loyalty_points"},
                                                     state_dir=str(tmp_path)))
    assert state == "failed"
    assert not any(k.startswith("mailchimp POST") for k in sandbox.requests()["counts"])


def test_deferrable_reaches_the_same_audience(airflow_db, mailchimp_conn, wh, sandbox, tmp_path):
    state, sync_x = run_dag("mailchimp_export_test", conf(sandbox, SEGMENTS, state_dir=str(tmp_path / "a")))
    assert state == "success"
    sync_audience = audience(sandbox)
    sandbox.session.post(f"{sandbox.admin}/seed", json=warehouse.sandbox_seed(wh), timeout=60)
    state, xcom = run_dag("mailchimp_export_deferred_test", conf(sandbox, SEGMENTS, state_dir=str(tmp_path / "b")))
    assert state == "success"
    assert audience(sandbox) == sync_audience
    t, s = xcom["export"]["totals"], sync_x["export"]["totals"]
    assert t["planned"] == 0 and xcom["export"]["mailchimp_batches"]
    assert (t["created"], t["updated"], t["unchanged"], t["rejected"]) == (s["created"], s["updated"], s["unchanged"],
                                                                           s["rejected"])
    assert any(k.startswith("mailchimp POST batches") for k in sandbox.requests()["counts"])

    # No profile data left at rest: the work files (member ids, no address) are deleted once applied, and no file
    # of the rejects or state directories holds an address of the segments, except the export state, whose
    # member keys are the addresses Mailchimp's tag removal takes.
    rejects_dir = Path(xcom["export"]["rejects"]["path"].removeprefix("file://")).parent
    assert not list(rejects_dir.glob("*-batches"))
    db = sqlite3.connect(wh)
    emails = {e.strip().lower().encode() for (e,) in db.execute(
        f"SELECT email FROM segment_export WHERE segment_name IN ({','.join('?' * len(SEGMENTS))}) "
        "AND email LIKE '%_@_%'", SEGMENTS)}
    files = [p for d in (rejects_dir, tmp_path / "b") for p in d.rglob("*") if p.is_file()]
    assert any(p.name == "refusals.sqlite" for p in files) and any(p.suffix == ".jsonl" for p in files)
    holding = {p.name for p in files if (data := p.read_bytes().lower()) and any(e in data for e in emails)}
    assert holding <= {"export_state.sqlite"}, holding


def test_answers_compressed_with_gzip_are_read_the_same(airflow_db, mailchimp_conn, wh, sandbox, tmp_path):
    """Mailchimp's servers have been reported to gzip their answers (see the emulator's ``gzip_answers``): the
    export reads compressed answers (the batch calls' on the direct http.client path, the others' through
    requests) and ends with the same audience and the same outcomes as with plain answers."""
    state, plain = run_dag("mailchimp_export_test", conf(sandbox, SEGMENTS, state_dir=str(tmp_path / "plain")))
    assert state == "success"
    plain_audience = audience(sandbox)
    seed = warehouse.sandbox_seed(wh)
    seed["mailchimp"] = {**seed["mailchimp"], "gzip_answers": True, "gzip_min_bytes": 0}  # the batch answers are small
    sandbox.session.post(f"{sandbox.admin}/seed", json=seed, timeout=60).raise_for_status()
    emulator = sandbox.server.sandbox.emulators["mailchimp"]
    calls_before = sandbox.requests()["counts"]["mailchimp POST list"]
    state, gz = run_dag("mailchimp_export_test", conf(sandbox, SEGMENTS, state_dir=str(tmp_path / "gzip")))
    assert state == "success"
    assert audience(sandbox) == plain_audience
    assert gz["export"]["totals"] == plain["export"]["totals"]
    assert gz["export"]["rejects"]["by_reason"] == plain["export"]["rejects"]["by_reason"]
    batch_calls = sandbox.requests()["counts"]["mailchimp POST list"] - calls_before
    assert batch_calls >= 2 and emulator.gzipped > batch_calls  # every batch answer, and the audience's


def test_delta_fingerprint_follows_the_settings_that_shape_mailchimp_payloads():
    """What a delta run compares besides a member's values: a changed merge-field type or date format,
    status_if_new or tagging re-sends every member; the same settings (another instance) do not."""
    from airflow_provider_segexport.destinations.mailchimp import MailchimpDestination
    from airflow_provider_segexport.export.records import FieldMapping

    def config(status="subscribed", tags=True, date_format="MM/DD/YYYY"):
        d = MailchimpDestination(object(), "aud1", FieldMapping({"email": "email", "BDAY": "birthday"}),
                                 status_if_new=status, tag_segments=tags)
        d.field_types = {"BDAY": {"tag": "BDAY", "type": "date", "name": "Birthday", "display_order": 3,
                                  "options": {"date_format": date_format}}}
        return d.fingerprint_config()

    assert config() == config()
    assert len({config(), config(status="pending"), config(tags=False), config(date_format="DD/MM/YYYY")}) == 4
