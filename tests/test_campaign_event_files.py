"""Campaign email events from the log files an ACS export workflow writes (the second source of the events sync),
through real DAG runs (dag.test()) against the sandbox over HTTPS: the operator starts the export workflow through
Campaign's workflow API, waits until it finished, reads the CSV files it wrote to a folder (file:// through
ObjectStoragePath) and writes each enabled event once to Dataverse; the sandbox's workflow API itself."""

from __future__ import annotations

import os
import time
from datetime import datetime

import pytest
import requests

from tests import test_campaign_events
from tests.conftest import run_dag
from tests.test_campaign_events import (
    TYPES,
    check_first_run_of_mixed_events,
    check_once,
    expected,
    generate,
    journal,
    mixed_events,
    rejects_of,
    written,
)

#: the journal tests' world (contacts, their profiles, the two profiles without a contact, the connections)
world = test_campaign_events.world

DAG_ID = "campaign_event_files_test"
WF = "WKF12"


@pytest.fixture
def folder(world, sandbox, tmp_path):
    """The export workflow WKF12 declared in Campaign (Incremental query -> Extract file -> Transfer file to a
    folder); returns the folder."""
    out = tmp_path / "acs-exports"
    declare(sandbox, {WF: {"label": "Export email events to storage", "folder": str(out)}})
    return out


def declare(sandbox, workflows: dict) -> dict:
    r = sandbox.session.post(f"{sandbox.admin}/adobe_campaign/workflows", json=workflows, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def sync(folder, conf: dict | None = None, ok: bool = True, workflow: str | None = WF) -> dict:
    conf = {"log_path": f"file://{folder}", "workflow_id": workflow, **(conf or {})}
    state, xcom = run_dag(DAG_ID, conf, retries=0)
    assert (state == "success") == ok, state
    return xcom.get("events") or {}


def files(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def test_workflow_export_each_enabled_event_once_disabled_absent_unknown_profiles_rejected(airflow_db, world, sandbox,
                                                                                          folder):
    mixed_events(sandbox, world)
    enabled = ["sent", "open", "click"]
    first = sync(folder, {"event_types": enabled})
    assert first["source"] == "log_files" and first["workflow"]["state"] == "finished"
    assert first["files_read"] == files(folder) and len(files(folder)) == 1
    rejects = check_first_run_of_mixed_events(sandbox, world, first, enabled)
    want = expected(sandbox, world, enabled)
    assert all(files(folder)[0] in r["message"] and r["row"] > 0 for r in rejects)  # the file and its row
    assert first["profiles_read"] == 0  # the file carries cusCrmId: no profile read

    # a second run: the workflow exports nothing new (a file with its header only), nothing is written again
    second = sync(folder, {"event_types": enabled})
    assert len(files(folder)) == 2 and second["files_read"] == files(folder)[1:]
    assert second["events_read"] == 0 and second["totals"]["created"] == 0
    check_once(sandbox, want)
    # new events: only they are exported, read and written
    generate(sandbox, [{"type": "open", "email": e} for e in list(world.values())[:3]])
    third = sync(folder, {"event_types": enabled})
    assert third["events_read"] == 3 and third["totals"]["created"] == 3
    check_once(sandbox, expected(sandbox, world, enabled))
    # a replay re-reads every file still in the folder: nothing doubled, bounce now on
    replay = sync(folder, {"event_types": list(TYPES), "replay": True}, workflow=None)
    all_want = expected(sandbox, world)
    check_once(sandbox, all_want)
    assert replay["files_read"] == files(folder)
    assert replay["totals"]["updated"] == len(expected(sandbox, world, enabled))
    assert replay["totals"]["created"] == len(all_want) - len(expected(sandbox, world, enabled))


def test_a_run_dying_mid_file_then_retried_writes_each_event_once(airflow_db, world, sandbox, folder):
    mixed_events(sandbox, world, rounds=3)
    rows = len(journal(sandbox))
    # windows of 28 events, 4 UpsertMultiple calls each: the 6th call (2nd window) is refused for good
    sandbox.fault(kind="status", status=403, vendor="dynamics365", path_contains="UpsertMultiple", skip=5, count=1)
    assert sync(folder, ok=False) == {}
    partial = written(sandbox)
    assert 28 <= len(partial) < len(expected(sandbox, world))
    retried = sync(folder)
    want = expected(sandbox, world)
    check_once(sandbox, want)
    # the retry went on in the same file after the first window (written before the failure), then read the
    # second execution's file (empty: nothing new since the first)
    assert retried["events_read"] == rows - 28 and len(retried["files_read"]) == 2
    t = retried["totals"]
    assert t["created"] + t["updated"] == len(want) - 28 and t["updated"] >= 1
    assert sync(folder)["events_read"] == 0


def test_malformed_rows_are_rejects_naming_file_row_and_column(airflow_db, world, sandbox, folder):
    generate(sandbox, [{"type": t, "email": e} for e in list(world.values())[:2] for t in ("open", "click")])
    events = journal(sandbox)
    crm = {e: c for c, e in world.items()}
    folder.mkdir()
    good = [[ev["id"], ev["data"]["eventType"], ev["time"].replace("T", " "), ev["data"]["deliveryName"],
             ev["data"].get("url", ""), crm[ev["data"]["profile"]["email"]]] for ev in events]
    contact = good[0][5]
    bad = [
        ["", "open", "2026-01-02T10:00:00Z", "DM", "", contact],                     # row 5: no event ID
        ["ev-forward", "forward", "2026-01-02T10:00:00Z", "DM", "", contact],        # row 6: unknown type
        ["ev-date", "open", "yesterday", "DM", "", contact],                         # row 7: not a date
        ["ev-guid", "open", "2026-01-02T10:00:00Z", "DM", "", "not-a-guid"],         # row 8: contact ID not a GUID
        ["ev-noone", "open", "2026-01-02T10:00:00Z", "DM", "", ""],                  # row 9: no profile
        ["ev-short", "open", "2026-01-02T10:00:00Z"],                                # row 10: fields missing
    ]
    name = "emailEvents_20260102_100000.txt"
    with open(folder / name, "w", encoding="utf-8", newline="") as fh:
        fh.write("Delivery log ID;Event type;Event date;deliveryLabel;url;cusCrmId\n")
        for row in good + bad:
            fh.write(";".join(row) + "\n")
    with open(folder / ".emailEvents_20260102_110000.txt.part", "w") as fh:  # a transfer in progress: left alone
        fh.write("half a file")
    columns = {"id": "Delivery log ID", "type": "Event type", "timestamp": "Event date"}
    state, xcom = run_dag(DAG_ID, {"log_path": f"file://{folder}", "log_columns": columns,
                                   "workflow_id": None}, retries=0)
    assert state == "failed"  # the delimiter is ';': the header is one column, the file is refused
    state, xcom = run_dag("campaign_event_files_semicolon_test", {"log_path": f"file://{folder}",
                                                                  "log_columns": columns}, retries=0)
    assert state == "success", state
    summary = xcom["events"]
    assert summary["files_read"] == [name]
    assert summary["totals"]["created"] == len(good) and summary["events_read"] == len(good) + len(bad)
    rejects = {r["row"]: r for r in rejects_of(summary)}
    assert {r: (v["reason"], v["field"]) for r, v in rejects.items()} == {
        5: ("missing_key", "Delivery log ID"), 6: ("invalid_value", "Event type"),
        7: ("invalid_value", "Event date"), 8: ("invalid_value", "cusCrmId"), 9: ("missing_value", "cusCrmId"),
        10: ("invalid_value", None)}
    assert all(r["file"] == name and r["message"].startswith(f"{name}, row ") for r in rejects.values())
    assert "forward" in rejects[6]["message"] and "yesterday" in rejects[7]["message"]
    # the Campaign date format ("2026-01-02 10:00:00.123Z") became ISO 8601: the journal's dates (Dataverse keeps
    # seconds)
    def second(text: str) -> datetime:
        return datetime.fromisoformat(text).replace(microsecond=0)

    by_id = {r["new_eventid"]: r for r in written(sandbox)}
    assert {ev["id"]: second(ev["time"]) for ev in events} == {k: second(v["new_eventdate"]) for k, v in by_id.items()}


def test_journal_and_log_files_give_the_same_records(airflow_db, world, sandbox, folder):
    """The same events read from the journal, then from the export workflow's file: the file's run finds every
    record already there (same event IDs) and leaves them as the journal's run wrote them."""
    mixed_events(sandbox, world)
    state, xcom = run_dag("campaign_events_test", {}, retries=0)
    assert state == "success"
    want = expected(sandbox, world)
    check_once(sandbox, want)
    columns = ("new_eventid", "new_eventtype", "_regardingobjectid_value", "subject", "new_eventdate", "actualend",
               "new_deliveryname", "new_trackingurl", "new_bouncetype")
    before = {r["new_eventid"]: {c: r.get(c) for c in columns} for r in written(sandbox)}
    from_files = sync(folder)
    t = from_files["totals"]
    assert (t["created"], t["updated"]) == (0, len(want)) and t["rejected"] == xcom["events"]["totals"]["rejected"]
    check_once(sandbox, want)
    after = {r["new_eventid"]: {c: r.get(c) for c in columns} for r in written(sandbox)}
    assert after == before


def test_signal_workflow_and_the_ten_minute_rule(airflow_db, world, sandbox, tmp_path):
    """A workflow starting with an External signal activity: the operator starts it, triggers the signal and waits;
    a retry within 10 minutes is not taken by Campaign, and the task reads the files already exported."""
    out = tmp_path / "signal-exports"
    declare(sandbox, {"WKF20": {"folder": str(out), "signal": {"name": "signal1",
                                                               "parameters": {"requestedBy": "string"}}}})
    mixed_events(sandbox, world, rounds=1)
    first = sync(out, workflow="WKF20")
    assert first["workflow"]["signal"] is True and first["workflow"]["state"] == "finished"
    want = expected(sandbox, world)
    check_once(sandbox, want)
    wf = sandbox.session.get(f"{sandbox.admin}/adobe_campaign/workflows", timeout=10).json()["WKF20"]
    assert wf["source"].startswith("Airflow campaign_event_files_test") and wf["executions"] == 1
    generate(sandbox, [{"type": "click", "email": e} for e in list(world.values())[:2]])
    again = sync(out, workflow="WKF20")
    assert again["workflow"]["signal"] == "refused" and again["events_read"] == 0  # not exported yet
    check_once(sandbox, want)  # nothing lost, nothing doubled; the new clicks come with the next execution


# -- the sandbox's workflow API -------------------------------------------------------------------------------------
def _acs(sandbox) -> tuple[requests.Session, str]:
    acs = sandbox.info["adobe_campaign"]
    s = requests.Session()
    s.verify = sandbox.info["ca_bundle"]
    s.trust_env = False
    token = s.post(acs["ims_url"], data={"grant_type": "client_credentials", "client_id": acs["client_id"],
                                         "client_secret": acs["client_secret"], "scope": acs["scope"]},
                   timeout=10).json()["access_token"]
    s.headers.update({"Authorization": f"Bearer {token}", "X-Api-Key": acs["client_id"],
                      "Content-Type": "application/json", "Cache-Control": "no-cache"})
    return s, acs["base_url"]


def _wait_state(s, url: str, state: str) -> dict:
    deadline = time.monotonic() + 10
    while True:
        wf = s.get(url, timeout=10).json()
        if wf["state"] == state or time.monotonic() > deadline:
            return wf
        time.sleep(0.05)


def test_sandbox_workflow_api_shapes(world, sandbox, tmp_path):
    out = tmp_path / "exports"
    declare(sandbox, {"WKF12": {"label": "Export email events", "folder": str(out)},
                      "WKF13": {"label": "With a signal", "folder": str(out), "file_label": "signalled",
                                "signal": {"parameters": {"segmentCode": "string"}}}})
    s, base = _acs(sandbox)
    sandbox.session.post(f"{sandbox.admin}/adobe_campaign/events", json={"count": 6}, timeout=10).raise_for_status()
    # GET: the workflow, its state and activities
    r = s.get(f"{base}/workflow/execution/WKF12", timeout=10)
    assert r.status_code == 200
    wf = r.json()
    assert wf["PKey"].startswith("@") and wf["internalName"] == "WKF12" and wf["state"] == "editing"
    assert {"incrementalQuery", "extractFile", "transferFile", "end"} <= set(wf["activities"]["activity"])
    assert s.get(wf["href"], timeout=10).json()["internalName"] == "WKF12"  # by its PKey too
    # commands: start -> started at once, the execution (the export) a moment later -> finished
    r = s.post(f"{base}/workflow/execution/WKF12/commands", json={"method": "start"}, timeout=10)
    assert r.status_code == 200 and r.json()["state"] == "started"
    wf = _wait_state(s, f"{base}/workflow/execution/WKF12", "finished")
    assert wf["state"] == "finished" and wf["lastEnd"]
    (name,) = os.listdir(out)
    assert name.startswith("emailEvents_") and name.endswith(".csv")
    with open(out / name, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    assert lines[0] == "eventId,eventType,logDate,deliveryLabel,url,bounceType,email,cusCrmId,externalId"
    assert [line.split(",")[0] for line in lines[1:]] == [ev["id"] for ev in journal(sandbox)]
    # pause / resume / stop and an unknown command
    assert s.post(f"{base}/workflow/execution/WKF12/commands", json={"method": "pause"}, timeout=10).status_code == 400
    r = s.post(f"{base}/workflow/execution/WKF12/commands", json={"method": "jump"}, timeout=10)
    assert r.status_code == 400 and r.json()["message"].startswith("RST-360011")
    # the signal: the trigger URL of the activity, on a started workflow only, one trigger per 10 minutes
    wf = s.get(f"{base}/workflow/execution/WKF13", timeout=10).json()
    trigger = wf["activities"]["activity"]["signal1"]["trigger"]["href"]
    assert trigger.startswith(f"{base}/workflow/execution/{wf['PKey']}/activities/activity/@")
    r = s.post(trigger, json={"source": "API"}, timeout=10)
    assert r.status_code == 500 and "not started" in r.json()["message"]
    s.post(f"{base}/workflow/execution/WKF13/commands", json={"method": "start"}, timeout=10).raise_for_status()
    r = s.post(trigger, json={"source": "API", "parameters": {"contentURL": "http://www.adobe.com"}}, timeout=10)
    assert r.status_code == 500 and "'contentURL' parameter isn't defined in signal activity" in r.json()["message"]
    r = s.post(trigger, json={"source": "API", "parameters": {"segmentCode": "my segment"}}, timeout=10)
    assert r.status_code == 200 and r.json()["parameters"] == {"segmentCode": "my segment"}
    assert _wait_state(s, f"{base}/workflow/execution/WKF13", "finished")["state"] == "finished"
    assert any(n.startswith("signalled_") for n in os.listdir(out))
    s.post(f"{base}/workflow/execution/WKF13/commands", json={"method": "start"}, timeout=10).raise_for_status()
    r = s.post(trigger, json={"source": "API"}, timeout=10)
    assert r.status_code == 200 and not r.headers["content-type"].startswith("application/json")
    assert s.post(f"{base}/workflow/execution/WKF13/commands", json={"method": "stop"},
                  timeout=10).json()["state"] == "finished"
    # an unknown workflow: 404; the gateway applies (no API key: 403)
    r = s.get(f"{base}/workflow/execution/WKF999", timeout=10)
    assert r.status_code == 404 and r.json()["code"] == 404
    r = requests.get(f"{base}/workflow/execution/WKF12", verify=sandbox.info["ca_bundle"], timeout=10,
                     headers={"Authorization": s.headers["Authorization"]})
    assert r.status_code == 403 and r.json()["error_code"] == "403000"
