"""Campaign email events -> Dynamics 365 timeline activities, through real DAG runs (dag.test()) against the sandbox's
Adobe I/O Events journal and Dataverse over HTTPS: each enabled event written once (two runs, a run that dies
mid-write and its retry, a journal replay), disabled types absent, unknown profiles rejected; faults (journal 204 +
Retry-After, 429s, tokens expiring mid-run) lose nothing and double nothing."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter

import pytest

from tests.conftest import connect_sync, run_dag

DAG_ID = "campaign_events_test"
CONTACTS = 12
TYPES = ("sent", "open", "click", "bounce")


def _cid(i: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"events-contact-{i}"))


@pytest.fixture
def world(sandbox, monkeypatch, tmp_path):
    """Dataverse with CONTACTS contacts; Campaign with their profiles (cusCrmId = the contact, as the contacts sync
    leaves them), a profile not from the sync (no cusCrmId) and one whose contact was deleted; both connections."""
    contacts = [{"contactid": _cid(i), "firstname": f"F{i}", "lastname": f"L{i}",
                 "emailaddress1": f"ev{i}@example.com"} for i in range(CONTACTS)]
    profiles = [{"email": c["emailaddress1"], "firstName": c["firstname"], "lastName": c["lastname"],
                 "cusCrmId": c["contactid"]} for c in contacts]
    profiles += [{"email": "stranger@example.com", "lastName": "Stranger"},
                 {"email": "gone@example.com", "lastName": "Gone", "cusCrmId": str(uuid.uuid4())}]
    seed = json.loads(json.dumps(sandbox.server.initial_seed))
    seed["dynamics365"] = {**seed.get("dynamics365", {}), "contacts": contacts}
    seed["adobe_campaign"] = {**seed.get("adobe_campaign", {}), "profiles": profiles}
    sandbox.session.post(f"{sandbox.admin}/seed", json=seed, timeout=60).raise_for_status()
    connect_sync(sandbox, monkeypatch, dataverse_privacy=False)
    monkeypatch.setenv("SEGEXPORT_STATE_DIR", str(tmp_path / "state"))
    return {c["contactid"]: c["emailaddress1"] for c in contacts}


def generate(sandbox, specs: list[dict]) -> None:
    r = sandbox.session.post(f"{sandbox.admin}/adobe_campaign/events", json={"events": specs}, timeout=30)
    assert r.status_code == 200, r.text


def journal(sandbox) -> list[dict]:
    """Every event the journal holds (its CloudEvents), from the emulator."""
    return list(sandbox.server.sandbox.emulators["adobe_campaign"].events)


def written(sandbox) -> list[dict]:
    return sandbox.state("dynamics365")["new_emailevents"]


def mixed_events(sandbox, contacts: dict[str, str], rounds: int = 2) -> None:
    """Every type for every contact ``rounds`` times, plus events of the two profiles without a contact."""
    specs = [{"type": t, "email": email, "url": "https://shop.example.com/sale"}
             for _ in range(rounds) for email in contacts.values() for t in TYPES]
    specs += [{"type": t, "email": e} for e in ("stranger@example.com", "gone@example.com") for t in TYPES]
    generate(sandbox, specs)


def expected(sandbox, contacts: dict[str, str], enabled=TYPES) -> dict[str, tuple[str, str]]:
    """event ID -> (type, contact) of the journal's events that must be in Dataverse."""
    by_email = {e: c for c, e in contacts.items()}
    return {ev["id"]: (ev["data"]["eventType"], by_email[ev["data"]["profile"]["email"]]) for ev in journal(sandbox)
            if ev["data"]["eventType"] in enabled and ev["data"]["profile"]["email"] in by_email}


def check_once(sandbox, want: dict[str, tuple[str, str]]) -> None:
    rows = written(sandbox)
    ids = Counter(r["new_eventid"] for r in rows)
    assert not [k for k, n in ids.items() if n > 1], "an event written twice"
    assert set(ids) == set(want)
    codes = {"sent": 100000000, "open": 100000001, "click": 100000002, "bounce": 100000003}
    for r in rows:
        etype, contact = want[r["new_eventid"]]
        assert (r["new_eventtype"], r["_regardingobjectid_value"]) == (codes[etype], contact)
        assert r["subject"].startswith("Email ") and r["new_eventdate"] and r["new_deliveryname"] == "DM-sandbox-1"
        assert bool(r["new_trackingurl"]) == (etype == "click") and bool(r["new_bouncetype"]) == (etype == "bounce")


def rejects_of(summary: dict) -> list[dict]:
    path = summary["rejects"]["path"]
    if not path:
        return []
    with open(path.removeprefix("file://"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def sync(conf: dict | None = None, dag_id: str = DAG_ID, ok: bool = True) -> dict:
    state, xcom = run_dag(dag_id, conf or {}, retries=0)
    assert (state == "success") == ok, state
    return xcom.get("events") or {}


def check_first_run_of_mixed_events(sandbox, world, first: dict, enabled: list[str]) -> list[dict]:
    """What a first run over :func:`mixed_events` with ``bounce`` off must have done (whatever the source): each
    enabled event once, no bounce, every event read, the two profiles without a contact rejected; the rejects."""
    want = expected(sandbox, world, enabled)
    check_once(sandbox, want)
    assert not any(r["new_eventtype"] == 100000003 for r in written(sandbox))  # bounce is off
    t = first["totals"]
    assert first["events_read"] == len(journal(sandbox))
    assert (t["created"], t["updated"]) == (len(want), 0)
    assert t["type_disabled"] == sum(1 for ev in journal(sandbox) if ev["data"]["eventType"] == "bounce")
    assert first["by_type"]["open"]["created"] == 2 * CONTACTS
    # the two profiles without a contact: one reject per enabled event, with the reason
    rejects = rejects_of(first)
    assert t["rejected"] == len(rejects) == 2 * len(enabled)
    assert {r["reason"] for r in rejects} == {"contact_not_found"}
    assert "@" not in json.dumps(rejects)  # no address in the rejects file
    return rejects


def test_each_enabled_event_once_disabled_types_absent_unknown_profiles_rejected(airflow_db, world, sandbox):
    mixed_events(sandbox, world)
    enabled = ["sent", "open", "click"]
    first = sync({"event_types": enabled})
    rejects = check_first_run_of_mixed_events(sandbox, world, first, enabled)
    want = expected(sandbox, world, enabled)
    assert all("cusCrmId" in r["message"] or "no Dynamics 365 contact" in r["message"] for r in rejects)
    assert first["profiles_read"] == CONTACTS + 2  # each profile read once

    # a second run: nothing new, nothing written again
    second = sync({"event_types": enabled})
    assert second["events_read"] == 0 and second["totals"]["created"] == 0
    check_once(sandbox, want)
    # new events: only they are read and written
    generate(sandbox, [{"type": "open", "email": e} for e in list(world.values())[:3]])
    third = sync({"event_types": enabled})
    assert third["events_read"] == 3 and third["totals"]["created"] == 3
    check_once(sandbox, expected(sandbox, world, enabled))

    # a replay (the whole journal read again): nothing doubled, bounce now on
    replay = sync({"event_types": list(TYPES), "replay": True})
    all_want = expected(sandbox, world)
    check_once(sandbox, all_want)
    assert replay["totals"]["updated"] == len(expected(sandbox, world, enabled))
    assert replay["totals"]["created"] == len(all_want) - len(expected(sandbox, world, enabled))


def test_a_run_dying_mid_write_then_retried_writes_each_event_once(airflow_db, world, sandbox):
    mixed_events(sandbox, world, rounds=3)
    # the 4th UpsertMultiple is refused for good (the task fails mid-write: 3 calls of 7 events are in Dataverse)
    sandbox.fault(kind="status", status=403, vendor="dynamics365", path_contains="UpsertMultiple", skip=3, count=1)
    failed = sync(ok=False)
    assert failed == {}
    partial = written(sandbox)
    assert 0 < len(partial) < len(expected(sandbox, world))
    retried = sync()
    want = expected(sandbox, world)
    check_once(sandbox, want)
    t = retried["totals"]
    assert t["created"] + t["updated"] == len(want) and t["updated"] >= 1  # some were there from the failed try
    assert sync()["events_read"] == 0  # the cursor moved past them all


def test_faults_lose_nothing_and_double_nothing(airflow_db, world, sandbox):
    """429s from Dataverse (its concurrent-requests limit: 2, for 3 calls in flight) and from the Adobe gateway on
    the journal, a Dataverse token that expires every second and IMS tokens that live one second."""
    mixed_events(sandbox, world)
    r = sandbox.session.post(f"{sandbox.admin}/dynamics365/config", json={"max_concurrent": 2}, timeout=10)
    r.raise_for_status()
    sandbox.fault(kind="burst429", vendor="adobe_campaign", path_contains="adobe-io-events", count=2, retry_after=0.1)
    sandbox.session.post(f"{sandbox.admin}/token-ttl", json={"seconds": 1}, timeout=10).raise_for_status()
    sandbox.latency(base_ms=40)  # the run lasts a few seconds: the tokens expire under it
    try:
        summary = sync()
    finally:
        sandbox.session.post(f"{sandbox.admin}/token-ttl", json={"seconds": 3600}, timeout=10).raise_for_status()
        sandbox.latency(0)
    want = expected(sandbox, world)
    check_once(sandbox, want)
    assert summary["totals"]["created"] == len(want)
    assert summary["http"]["dataverse"]["throttled"] >= 1
    assert summary["http"]["adobe_campaign"]["throttled"] == 2
    counts = sandbox.requests()["counts"]
    assert counts.get("dynamics365 POST token", 0) >= 2  # a new Dataverse token was needed mid-run


def test_deferred_mode_waits_in_the_triggerer_honouring_retry_after(airflow_db, world, sandbox):
    """The continuous mode: with the cursor at the journal's end the task defers; the trigger polls (a 204 with
    Retry-After: 1 spaces the polls, not the operator's 0.2 s interval) until events arrive, then the task syncs."""
    mixed_events(sandbox, world, rounds=1)
    sync()  # the cursor is at the end of the journal
    before = expected(sandbox, world)
    emulator = sandbox.server.sandbox.emulators["adobe_campaign"]
    emulator.journal_retry_after = 1
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30).raise_for_status()
    started = time.monotonic()
    timer = threading.Timer(2.5, generate, (sandbox, [{"type": "click", "email": e} for e in world.values()]))
    timer.start()
    try:
        summary = sync(dag_id="campaign_events_deferred_test")
    finally:
        timer.cancel()
    waited = time.monotonic() - started
    assert waited >= 2.5
    polls = sum(v for k, v in sandbox.requests()["counts"].items() if "adobe-io-events" in k or "journal" in k)
    assert 2 <= polls <= waited / 1 + 4  # spaced by Retry-After (1 s), not by the 0.2 s poll interval
    assert summary["events_read"] == CONTACTS and summary["totals"]["created"] == CONTACTS
    want = expected(sandbox, world)
    assert len(want) == len(before) + CONTACTS
    check_once(sandbox, want)


KILLED_RUN = """
import sys
from airflow_provider_segexport.operators.campaign_events import CampaignEventsToDynamicsOperator

class TI:
    try_number = 1
    def xcom_push(self, **kwargs):
        pass

op = CampaignEventsToDynamicsOperator(task_id="events", batch_size=7, journal_limit=10, max_in_flight=1,
                                      progress_interval=1)
op.execute({"run_id": "killed", "ti": TI()})
"""


def test_a_run_killed_mid_write_then_run_again_writes_each_event_once(airflow_db, world, sandbox, tmp_path):
    """The task's process is killed (SIGKILL, as a lost worker) after a few UpsertMultiple calls: the cursor in the
    export state is where the last finished window left it, so the next run reads those events again and writes
    each once (UpsertMultiple by the event-ID key), nothing lost."""
    import os
    import signal
    import subprocess
    import sys

    mixed_events(sandbox, world, rounds=3)
    want = expected(sandbox, world)
    sandbox.latency(base_ms=150)  # each call takes a while: the kill lands between two writes
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "REQUESTS_CA_BUNDLE":
                                                                 sandbox.info["ca_bundle"]},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            counts = sandbox.requests()["counts"]
            if sum(n for k, n in counts.items() if k.startswith("dynamics365 POST") and "UpsertMultiple" in k) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        sandbox.latency(0)
    partial = written(sandbox)
    assert 0 < len(partial) < len(want)
    again = sync()
    check_once(sandbox, want)
    t = again["totals"]
    # every event read again; those the killed run wrote (a call in flight at the kill may have landed after
    # the count above) are "already there", the rest created
    assert t["created"] + t["updated"] == len(want) and t["updated"] >= len(partial) > 0
    assert sync()["events_read"] == 0  # the cursor moved past them all
