"""Dynamics 365 Sales marketing-list exports run as real Airflow DAGs (dag.test()) against the sandbox's Dataverse
over HTTPS, with tokens from its Entra ID endpoint through msal.

The expected lists come from the warehouse's own ground truth (``dynamics365_contacts``, ``profile_anomalies``),
not from the exporter's checks.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter

import pytest

from airflow_provider_segexport import warehouse
from tests.conftest import refreshed_warehouse, run_dag

SQL = "SELECT * FROM segment_export WHERE segment_name = {segment} ORDER BY customer_id"
PROFILES = 3000
SEGMENTS = ["vip_customers", "churn_risk"]
DAG_ID = "dynamics_sales_export_test"


@pytest.fixture(scope="module")
def wh_path(tmp_path_factory):
    return refreshed_warehouse(tmp_path_factory.mktemp("wh") / "warehouse.db", PROFILES)


@pytest.fixture
def wh(wh_path, monkeypatch, sandbox):
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(wh_path)}))
    sandbox.session.post(f"{sandbox.admin}/seed", json=warehouse.sandbox_seed(wh_path), timeout=120).raise_for_status()
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30).raise_for_status()
    return wh_path


@pytest.fixture
def d365_conn(sandbox, monkeypatch):
    info = sandbox.info["dynamics365"]
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS365_DEFAULT", json.dumps({
        "conn_type": "dynamics365", "host": info["base_url"],
        "extra": {"tenant_id": info["tenant_id"], "client_id": info["client_id"], "client_secret": info["client_secret"],
                  "authority": info["authority"], "ca_bundle": sandbox.info["ca_bundle"],
                  "data_privacy_acknowledged": True},
    }))
    return info


def expected(wh_path, segment: str, where: str = "") -> tuple[set[str], Counter]:
    """The contact IDs that must end on the segment's list, and the rejects by reason."""
    db = sqlite3.connect(wh_path)
    contacts = dict(db.execute("SELECT lower(contactid), statecode FROM dynamics365_contacts"))
    want, rejected = set(), Counter()
    seen = set()
    for _cid, contact in db.execute(
            f"SELECT customer_id, lower(dataverse_contact_id) FROM segment_export WHERE segment_name = ?{where}",
            (segment,)):
        if contact in seen:
            rejected["duplicate"] += 1
        elif contact not in contacts:
            rejected["contact_not_found"] += 1
        elif contacts[contact] != 0:
            rejected["contact_inactive"] += 1
        else:
            want.add(contact)
        seen.add(contact)
    return want, rejected


def lists_by_name(sandbox) -> dict[str, dict]:
    return {v["listname"]: {**v, "id": k} for k, v in sandbox.state("dynamics365")["lists"].items()}


def writes_to_contacts(sandbox) -> dict:
    counts = sandbox.requests()["counts"]
    return {k: v for k, v in counts.items() if k.startswith("dynamics365 ") and "contact" in k.lower()
            and not k.startswith("dynamics365 GET")}


def conf(segments, tmp_path, **kw):
    return {"segments": segments, "sql": SQL, "state_dir": str(tmp_path / "state"), **kw}


def test_one_list_per_segment_of_exactly_the_existing_active_contacts(airflow_db, d365_conn, wh, sandbox, tmp_path):
    contacts_before = sandbox.state("dynamics365")["contacts"]
    state, xcom = run_dag(DAG_ID, conf(SEGMENTS, tmp_path))
    assert state == "success"
    summary = xcom["export"]
    lists = lists_by_name(sandbox)
    for seg in SEGMENTS:
        want, rejected = expected(wh, seg)
        assert lists[seg]["type"] is False and lists[seg]["createdfromcode"] == 2  # static, contacts
        assert {m.lower() for m in lists[seg]["members"]} == want
        assert lists[seg]["membercount"] == len(want)
        s = summary["segments"][seg]
        assert s["created"] == len(want)
        assert s["created"] + s["unchanged"] + s["rejected"] == s["rows"]
        assert summary["marketing_lists"][seg]["id"] == lists[seg]["id"]
        assert summary["marketing_lists"][seg]["created"] is True
    by_reason = summary["rejects"]["by_reason"]
    total = Counter()
    for seg in SEGMENTS:
        total.update(expected(wh, seg)[1])
    assert by_reason.get("contact_not_found", 0) == total["contact_not_found"] > 0
    assert by_reason.get("contact_inactive", 0) == total["contact_inactive"] > 0
    # never creates or changes a contact
    assert sandbox.state("dynamics365")["contacts"] == contacts_before
    assert writes_to_contacts(sandbox) == {}
    # contacts are checked in bulk, not one request a member
    gets = sum(v for k, v in sandbox.requests()["counts"].items() if k.startswith("dynamics365 GET contacts"))
    assert gets <= sum(s["rows"] for s in summary["segments"].values()) / 100

    # a second run creates no list and adds no member
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30).raise_for_status()
    state, xcom = run_dag(DAG_ID, conf(SEGMENTS, tmp_path))
    assert state == "success"
    assert len(lists_by_name(sandbox)) == len(lists)
    counts = sandbox.requests()["counts"]
    assert not any("AddListMembersList" in k or k.startswith("dynamics365 POST lists") for k in counts)
    assert all(not info["created"] for info in xcom["export"]["marketing_lists"].values())


def test_mirror_removes_the_leavers_and_keeps_a_hand_made_member(airflow_db, d365_conn, wh, sandbox, tmp_path):
    seg = "vip_customers"
    want, _ = expected(wh, seg)
    assert run_dag(DAG_ID, conf([seg], tmp_path, mode="mirror"))[0] == "success"
    lst = lists_by_name(sandbox)[seg]
    # a seller adds a contact by hand (not in the segment), and a member of the segment was already there
    db = sqlite3.connect(wh)
    outsider = db.execute("SELECT lower(contactid) FROM dynamics365_contacts WHERE statecode = 0 AND lower(contactid) "
                          f"NOT IN ({','.join(repr(c) for c in want)}) LIMIT 1").fetchone()[0]
    info = sandbox.info["dynamics365"]
    import requests

    token = requests.post(f"{info['authority']}/oauth2/v2.0/token", data={
        "grant_type": "client_credentials", "client_id": info["client_id"], "client_secret": info["client_secret"],
        "scope": info["base_url"] + "/.default"}, verify=sandbox.info["ca_bundle"],
        timeout=30).json()["access_token"]
    r = requests.post(f"{info['base_url']}/api/data/v9.2/lists({lst['id']})/Microsoft.Dynamics.CRM.AddMemberList",
                      json={"EntityId": outsider}, headers={"Authorization": f"Bearer {token}"},
                      verify=sandbox.info["ca_bundle"], timeout=30)
    assert r.status_code in (200, 204), r.text
    # 10 members leave the segment
    leavers = sorted(want)[:10]
    where = f" AND lower(dataverse_contact_id) NOT IN ({','.join(repr(c) for c in leavers)})"
    sql = SQL.replace(" ORDER BY", where + " ORDER BY")
    state, xcom = run_dag(DAG_ID, conf([seg], tmp_path, mode="mirror", sql=sql))
    assert state == "success"
    members = {m.lower() for m in lists_by_name(sandbox)[seg]["members"]}
    assert members == (want - set(leavers)) | {outsider}
    assert xcom["export"]["segments"][seg]["removed"] == len(leavers)


def test_match_on_an_attribute_resolves_contacts_in_bulk(airflow_db, d365_conn, wh, sandbox, tmp_path):
    seg = "vip_customers"
    state, xcom = run_dag("dynamics_sales_match_test", conf([seg], tmp_path, list_name="Matched {segment}"))
    assert state == "success"
    db = sqlite3.connect(wh)
    by_email: dict[str, list] = {}
    for contact, email, state_code in db.execute(
            "SELECT lower(contactid), lower(trim(email)), statecode FROM dynamics365_contacts WHERE email IS NOT NULL"):
        by_email.setdefault(email, []).append((contact, state_code))
    rows = Counter(e.strip().lower() for (e,) in db.execute(
        "SELECT email FROM segment_export WHERE segment_name = ? AND email IS NOT NULL", (seg,)))
    # a row's address matches one active contact: on the list; two contacts share it: a reject (ambiguous)
    want = {by_email[e][0][0] for e, n in rows.items()
            if len(by_email.get(e, ())) == 1 and by_email[e][0][1] == 0}
    members = {m.lower() for m in lists_by_name(sandbox)[f"Matched {seg}"]["members"]}
    assert members == want
    assert xcom["export"]["rejects"]["by_reason"].get("contact_not_found", 0) > 0


def test_more_than_100000_members_is_refused_before_anything_is_sent(airflow_db, d365_conn, wh, sandbox, tmp_path,
                                                                     task_log):
    big = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100001) "
           "SELECT 'C' || i AS customer_id, printf('%08x-0000-4000-8000-%012x', i, i) AS dataverse_contact_id "
           "FROM n WHERE {segment} = {segment}")
    state, _ = run_dag(DAG_ID, conf(["huge"], tmp_path, sql=big))
    assert state == "failed"
    assert "Segment 'huge' has 100,001 members" in task_log()
    counts = sandbox.requests()["counts"]
    assert not any(k.startswith(("dynamics365 POST", "dynamics365 GET contacts")) and k != "dynamics365 POST token"
                   for k in counts), counts


# -- service protection: the sandbox's Dataverse limits are smaller than the export ---------------------------

ALL = "all_customers"


def set_limits(sandbox, **config) -> None:
    sandbox.session.post(f"{sandbox.admin}/dynamics365/config", json=config, timeout=10).raise_for_status()


# The sandbox's window is 3 s instead of Dataverse's 300 (the connection says so: the window's length is
# Dataverse's, the same for every environment); the numbers allowed in it are not the connection's.
WINDOW = {"window_seconds": 3}


@pytest.mark.parametrize("rule, limits, latency_ms, extras", [
    # ~20 requests (12 contact lookups of 250, 3 AddListMembersList of 1,000, the list's look-up and creation)
    # under 6 a window: 4 windows
    pytest.param("requests", {**WINDOW, "max_requests": 6}, 10, WINDOW, id="requests"),
    # the connection knows the environment's limits: never refused
    pytest.param("requests", {**WINDOW, "max_requests": 6}, 10, {**WINDOW, "max_requests_per_window": 6},
                 id="requests-known"),
    # 50 ms+ a request against 400 ms of execution time a window: ~3 windows
    pytest.param("execution", {**WINDOW, "max_execution_ms": 400}, 50, WINDOW, id="execution"),
    # the 3 AddListMembersList calls go out together (4 in flight allowed) against 2 concurrent requests
    pytest.param("concurrency", {"max_concurrent": 2}, 300, {}, id="concurrency"),
])
def test_service_protection_smaller_than_the_export_refuses_at_most_once_per_rule(
        rule, limits, latency_ms, extras, airflow_db, d365_conn, wh, sandbox, tmp_path, monkeypatch, task_log):
    """Dataverse's service protection with limits far below the export's needs: the DAG run succeeds with every
    member on the list; the first 429 of a rule (the connection did not know the environment's number) teaches
    the HTTP layer that number, and no request is refused by that rule again; with the numbers in the
    connection's extras, none is refused at all."""
    if extras:
        conn = json.loads(__import__("os").environ["AIRFLOW_CONN_DYNAMICS365_DEFAULT"])
        conn["extra"].update(extras)
        monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS365_DEFAULT", json.dumps(conn))
    set_limits(sandbox, **limits)
    sandbox.latency(base_ms=latency_ms)
    task_log()
    state, xcom = run_dag(DAG_ID, conf([ALL], tmp_path))
    log_text = task_log()
    assert state == "success", log_text[-3000:]
    want, _ = expected(wh, ALL)
    assert {m.lower() for m in lists_by_name(sandbox)[ALL]["members"]} == want
    http = xcom["export"]["http"]
    refused = http.get("throttled_by", {})
    if "max_requests_per_window" in extras:
        assert http["throttled"] == 0, http
        assert "pacing requests to the request budget of 6 per 3 s" in log_text
    else:
        # only by the rule the export was too big for, and only requests already in flight when the first refusal
        # came back (the contact lookups and the member adds, each up to max_in_flight at once): the limiter
        # learns from that first answer, so no request it starts afterwards is refused
        assert set(refused) == {rule} and refused[rule] <= 2 * 4, http
        assert http["throttled"] == refused[rule]
        assert "Dataverse refused a request under its service protection" in log_text
    if rule == "requests":
        assert http["requests"] > 2 * limits["max_requests"]  # the export needed 3 windows or more


# -- the access token expires mid-export -----------------------------------------------------------------------

def test_an_access_token_expiring_mid_export_is_renewed_and_the_task_succeeds(airflow_db, d365_conn, wh, sandbox,
                                                                             tmp_path, task_log):
    """Tokens from the sandbox's Entra ID endpoint (real msal) live 2 s and the export takes several times that:
    each expiry is met by a 401, the hook gets a new token once and repeats only the refused call. The task
    succeeds, each list holds exactly its segment's members, and no member was sent twice."""
    sandbox.session.post(f"{sandbox.admin}/token-ttl", json={"seconds": 2}, timeout=10).raise_for_status()
    sandbox.latency(base_ms=400)  # ~30 calls, most one after another: ~8 s
    task_log()
    state, xcom = run_dag(DAG_ID, conf(SEGMENTS, tmp_path))
    log_text = task_log()
    assert state == "success", log_text[-3000:]
    lists = lists_by_name(sandbox)
    wanted: set[str] = set()
    for seg in SEGMENTS:
        want, _ = expected(wh, seg)
        assert {m.lower() for m in lists[seg]["members"]} == want
        assert xcom["export"]["segments"][seg]["created"] == len(want)
        wanted |= want
    assert "Dataverse: access token refreshed after 401" in log_text
    tokens = sandbox.requests()["counts"].get("dynamics365 POST token", 0)
    assert tokens >= 2, tokens  # the token expired mid-export, and a new one was fetched
    assert xcom["export"]["http"]["throttled"] == 0
    sends = sandbox.server.sandbox.log.sends_of("dynamics365")
    # every member sent once per list it is on (a call refused with 401 is not processed, so never counted)
    per_contact = Counter()
    for seg in SEGMENTS:
        per_contact.update(expected(wh, seg)[0])
    assert sends == dict(per_contact)
