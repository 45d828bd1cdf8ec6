"""Campaign Monitor exports run as real Airflow DAGs (dag.test()) against the sandbox over HTTPS.

The expected list is computed from the warehouse's own ground truth (``profile_anomalies``,
``destination_state``), not from the exporter's validator; a check reads the list back through the
official ``createsend`` client.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter

import pytest

from airflow_provider_segexport import warehouse
from tests.conftest import refreshed_warehouse, run_dag

SQL = "SELECT * FROM segment_export WHERE segment_name = {segment} ORDER BY customer_id"
PROFILES = 3000
SEGMENTS = ["all_customers", "newsletter_fr"]
DAG_ID = "campaign_monitor_export_test"
BAD = {"invalid_email", "non_ascii_email", "duplicate_email", "long_first_name"}
#: custom fields the seeded list has (types to convert to), beside one the export creates
FIELDS = [{"FieldName": "LoyaltyPoints", "DataType": "Number"},
          {"FieldName": "Birthday", "DataType": "Date"},
          {"FieldName": "Country", "DataType": "MultiSelectOne", "Options": []}]  # options: the warehouse's countries
CUSTOM = {"LoyaltyPoints": "loyalty_points", "Birthday": "birthday", "Country": "country", "City": "city"}


@pytest.fixture(scope="module")
def wh_path(tmp_path_factory):
    return refreshed_warehouse(tmp_path_factory.mktemp("wh") / "warehouse.db", PROFILES)


def seed(sandbox, wh_path, foreign: dict | None = None) -> dict:
    """Seed the sandbox with the warehouse's destination state, the list's custom fields, a deleted and a
    suppressed address, and (``foreign``) subscribers who are not in any segment, with custom field values."""
    body = warehouse.sandbox_seed(wh_path)
    cm = body["campaign_monitor"]
    db = sqlite3.connect(wh_path)
    countries = [c for (c,) in db.execute("SELECT DISTINCT country FROM profiles WHERE country IS NOT NULL ORDER BY 1")]
    cm["custom_fields"] = [{**f, "Options": countries} if f["FieldName"] == "Country" else f for f in FIELDS]
    valid = [e.strip() for (e,) in db.execute(
        "SELECT email FROM profiles WHERE customer_id NOT IN (SELECT customer_id FROM profile_anomalies) "
        "AND lower(trim(email)) NOT IN (SELECT lower(email) FROM destination_state) ORDER BY customer_id LIMIT 2")]
    deleted, suppressed = valid
    cm["subscribers"].append({"EmailAddress": deleted, "Name": "Deleted Before", "State": "Deleted"})
    cm["suppression_list"] = [suppressed]
    for email, fields in (foreign or {}).items():
        cm["subscribers"].append({"EmailAddress": email, "Name": "Not In Segments", "State": "Active",
                                  "CustomFields": fields})
    sandbox.session.post(f"{sandbox.admin}/seed", json=body, timeout=60).raise_for_status()
    return {"deleted": deleted.lower(), "suppressed": suppressed.lower()}


@pytest.fixture
def cm_conn(sandbox, monkeypatch):
    info = sandbox.info
    monkeypatch.setenv("AIRFLOW_CONN_CAMPAIGN_MONITOR_DEFAULT", json.dumps({
        "conn_type": "campaign_monitor", "host": info["campaign_monitor"]["base_url"],
        "extra": {"api_key": info["campaign_monitor"]["api_key"], "ca_bundle": info["ca_bundle"],
                  "data_privacy_acknowledged": True},
    }))
    return info["campaign_monitor"]


@pytest.fixture
def wh(wh_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(wh_path)}))
    return wh_path


def expected(wh_path, segments, special: dict, sql_filter: str = ""):
    """Ground truth: the addresses that must end up Active with their segments, and the rows rejected."""
    db = sqlite3.connect(wh_path)
    anomalies: dict[str, set] = {}
    for cid, kind in db.execute("SELECT customer_id, anomaly FROM profile_anomalies"):
        anomalies.setdefault(cid, set()).add(kind)
    state = {e.strip().lower(): s for e, s in db.execute(
        "SELECT email, status FROM destination_state WHERE destination = 'campaign_monitor'")}
    state[special["deleted"]] = "Deleted"
    state[special["suppressed"]] = "Suppressed"
    members: dict[str, dict] = {}
    rejected: Counter = Counter()
    rows = 0
    for seg in segments:
        q = ("SELECT customer_id, email, first_name, last_name FROM segment_export WHERE segment_name = ?"
             + sql_filter)
        for cid, email, first, last in db.execute(q, (seg,)):
            rows += 1
            if anomalies.get(cid, set()) & BAD:
                rejected["bad_row"] += 1
                continue
            key = email.strip().lower()
            if key in state:
                rejected[state[key]] += 1
                continue
            m = members.setdefault(key, {"segments": set(), "name": f"{(first or '').strip()} {(last or '').strip()}"
                                         .strip()})
            m["segments"].add(seg)
    return members, rejected, rows, state


def the_list(sandbox) -> dict:
    st = sandbox.state("campaign_monitor")["lists"][sandbox.info["campaign_monitor"]["list_id"]]
    return {e.lower(): s for e, s in st["subscribers"].items()}


def segments_of(sub: dict) -> set[str]:
    return {f["Value"] for f in sub["custom_fields"] if f["Key"] in ("[Segments]", "Segments")}


def conf(sandbox, segments, tmp_path, **kw):
    return {"list_id": sandbox.info["campaign_monitor"]["list_id"], "segments": segments, "sql": SQL,
            "state_dir": str(tmp_path / "state"), "custom_fields": CUSTOM, **kw}


def test_export_holds_exactly_the_valid_subscribers_with_their_segments(airflow_db, cm_conn, wh, sandbox, tmp_path):
    foreign = {"someone.else@example.org": [{"Key": "City", "Value": "Lyon"}]}
    special = seed(sandbox, wh, foreign)
    before = the_list(sandbox)
    state, xcom = run_dag(DAG_ID, conf(sandbox, SEGMENTS, tmp_path))
    assert state == "success"
    summary = xcom["export"]
    want, rejected, rows, pre = expected(wh, SEGMENTS, special)
    got = the_list(sandbox)
    active = {e for e, s in got.items() if s["state"] == "Active"} - set(foreign)
    assert active == set(want)
    for email, m in want.items():
        sub = got[email]
        assert segments_of(sub) == m["segments"], email
        assert sub["name"] == m["name"]
    # nobody's state changed: unsubscribed, bounced, deleted and suppressed addresses stay as they were
    for email in pre:
        if email in before:
            assert got[email]["state"] == before[email]["state"], email
    assert special["suppressed"] not in got
    # a subscriber in no segment keeps its values
    assert got["someone.else@example.org"]["custom_fields"] == [{"Key": "City", "Value": "Lyon"}]
    # counts add up with the rejects, and rejects carry Campaign Monitor's codes
    t = summary["totals"]
    assert t["rows"] == rows
    assert t["created"] + t["updated"] + t["unchanged"] + t["rejected"] == rows
    assert t["rejected"] == sum(rejected.values()) + summary["rejects"]["by_reason"].get("invalid_value", 0)
    lines = [json.loads(line) for line in open(summary["rejects"]["path"].removeprefix("file://"), encoding="utf-8")]
    assert len(lines) == t["rejected"]
    codes = Counter(line["vendor_message"].split(":")[0] for line in lines if line.get("vendor_message"))
    assert codes["Campaign Monitor code 206"] == rejected["Unsubscribed"]
    assert codes["Campaign Monitor code 207"] == rejected["Bounced"]
    assert codes["Campaign Monitor code 205"] == rejected["Deleted"] >= 1
    assert codes["Campaign Monitor code 204"] == rejected["Suppressed"] >= 1
    assert not any(re.search(r"[\w.+-]+@[\w-]+\.[\w.]+", json.dumps(line)) for line in lines), "a reject holds an address"
    # custom fields: the Number, Date and MultiSelectOne values converted, City created as Text
    db = sqlite3.connect(wh)
    marks = ",".join("?" * len(want))
    email, points, birthday, country = db.execute(
        "SELECT lower(trim(email)), loyalty_points, birthday, country FROM segment_export WHERE segment_name = "
        f"'newsletter_fr' AND lower(trim(email)) IN ({marks}) AND birthday IS NOT NULL LIMIT 1", list(want)).fetchone()
    values = {f["Key"].strip("[]"): f["Value"] for f in got[email]["custom_fields"]}
    assert values["LoyaltyPoints"] == str(points)
    assert values["Birthday"] == birthday[:10]  # sent as YYYY/MM/DD, read back as YYYY-MM-DD
    assert values["Country"] == country


def test_official_client_reads_the_same_list(airflow_db, cm_conn, wh, sandbox, tmp_path, monkeypatch):
    special = seed(sandbox, wh)
    assert run_dag(DAG_ID, conf(sandbox, SEGMENTS, tmp_path))[0] == "success"
    want, _, _, _ = expected(wh, SEGMENTS, special)
    import shutil

    import createsend
    import createsend.utils

    # The SDK trusts only the cacert.pem next to createsend/utils.py: point that file's directory at ours.
    shutil.copy(sandbox.info["ca_bundle"], tmp_path / "cacert.pem")
    monkeypatch.setattr(createsend.utils, "__file__", str(tmp_path / "utils.py"))
    monkeypatch.setattr(createsend.CreateSend, "base_uri", cm_conn["base_url"])
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    lst = createsend.List({"api_key": cm_conn["api_key"]}, cm_conn["list_id"])
    emails, page = set(), 1
    while True:
        res = lst.active(page=page, page_size=1000)
        for s in res.Results:
            emails.add(s.EmailAddress.lower())
            # read back keyed by the field's name, without brackets, as Campaign Monitor answers
            assert {c.Value for c in s.CustomFields if c.Key == "Segments"} == want[s.EmailAddress.lower()]["segments"]
        if page >= res.NumberOfPages:
            break
        page += 1
    assert emails == set(want)


def test_mirror_takes_off_only_the_leavers_segment_and_remove_leavers_deletes_then_readds(
        airflow_db, cm_conn, wh, sandbox, tmp_path):
    special = seed(sandbox, wh)
    db = sqlite3.connect(wh)
    fr = [cid for (cid,) in db.execute(
        "SELECT customer_id FROM segment_export WHERE segment_name = 'newsletter_fr' AND customer_id NOT IN "
        "(SELECT customer_id FROM profile_anomalies) ORDER BY customer_id")]
    leave = fr[:15]
    ids = ",".join(repr(c) for c in leave)
    left_fr = f" AND (segment_name <> 'newsletter_fr' OR customer_id NOT IN ({ids}))"
    sql2 = SQL.replace(" ORDER BY", left_fr + " ORDER BY")
    # run 1: both segments; run 2: 15 members left newsletter_fr (they stay in all_customers)
    assert run_dag(DAG_ID, conf(sandbox, SEGMENTS, tmp_path, mode="mirror"))[0] == "success"
    state, xcom = run_dag(DAG_ID, {**conf(sandbox, SEGMENTS, tmp_path, mode="mirror"), "sql": sql2})
    assert state == "success"
    want, _, _, _ = expected(wh, SEGMENTS, special, left_fr)
    got = the_list(sandbox)
    emails = {cid: (e or "").strip().lower() for cid, e in db.execute("SELECT customer_id, email FROM profiles")}
    leavers = {emails[c] for c in leave if emails[c] in want}
    assert leavers
    for email in leavers:
        assert got[email]["state"] == "Active"
        assert segments_of(got[email]) == {"all_customers"}
    for email, m in want.items():
        assert segments_of(got[email]) == m["segments"]
    assert xcom["export"]["segments"]["newsletter_fr"]["removed"] == len(leavers)

    # run 3: the leavers leave all_customers too; with remove_leavers they are removed (Deleted), never unsubscribed
    gone = f" AND customer_id NOT IN ({ids})"
    sql3 = SQL.replace(" ORDER BY", gone + " ORDER BY")
    state, xcom = run_dag(DAG_ID, {**conf(sandbox, SEGMENTS, tmp_path, mode="mirror", remove_leavers=True),
                                   "sql": sql3})
    assert state == "success"
    got = the_list(sandbox)
    assert {got[e]["state"] for e in leavers} == {"Deleted"}
    # run 4: they all rejoin: the export brings back exactly the ones it removed, Active with their segments
    state, xcom = run_dag(DAG_ID, {**conf(sandbox, SEGMENTS, tmp_path, mode="mirror", remove_leavers=True)})
    assert state == "success"
    got = the_list(sandbox)
    assert {got[e]["state"] for e in leavers} == {"Active"}
    assert got[special["deleted"]]["state"] == "Deleted"  # deleted by someone else: never brought back
    for email in leavers:
        assert segments_of(got[email]) == {"all_customers", "newsletter_fr"}


def test_delta_sends_only_what_is_due_and_a_plan_applies_exactly(airflow_db, cm_conn, wh, sandbox, tmp_path):
    seed(sandbox, wh)
    first = run_dag(DAG_ID, conf(sandbox, SEGMENTS, tmp_path))[1]["export"]
    refused = first["rejects"]["by_reason"]["vendor_rejected"]  # unsubscribed, bounced, deleted, suppressed
    assert refused > 0

    def sent_since() -> int:
        n = sum(sandbox.requests()["items_received"].values())
        sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30).raise_for_status()
        return n

    sent_since()
    # a second run: every member the list confirmed is skipped; only the rows Campaign Monitor refused are
    # tried again (an address may have changed state since), and refused again
    again = run_dag(DAG_ID, conf(sandbox, SEGMENTS, tmp_path))[1]["export"]
    assert again["totals"]["skipped"] == first["totals"]["created"] + first["totals"]["updated"]
    assert again["totals"]["created"] == again["totals"]["updated"] == 0
    assert again["totals"]["rejected"] == first["totals"]["rejected"]
    assert sent_since() == refused
    # a dry run writes the plan (those rows again) and sends nothing; applying it sends exactly the plan
    dry = run_dag(DAG_ID, conf(sandbox, SEGMENTS, tmp_path, dry_run=True))[1]["export"]
    # (a row the destination itself rejects, e.g. a name too long, is a "reject" line, not an "add")
    assert dry["plan"]["counts"]["add"] == refused
    assert sent_since() == 0
    applied = run_dag(DAG_ID, conf(sandbox, SEGMENTS, tmp_path, apply_plan=dry["plan"]["path"]))[1]["export"]
    converted_away = first["rejects"]["by_reason"].get("too_long", 0)  # rejected by the destination: not planned
    assert applied["totals"]["rejected"] == first["totals"]["rejected"] - converted_away
    assert applied["totals"]["not_in_plan"] == converted_away
    assert sent_since() == refused
