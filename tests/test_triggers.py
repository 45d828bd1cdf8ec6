"""The Mailchimp batch trigger: serialization, and run() against the sandbox (real HTTPS, env connections)."""

from __future__ import annotations

import asyncio
import importlib
import json
import time

from airflow_provider_segexport.hooks.mailchimp import MailchimpHook, subscriber_hash
from airflow_provider_segexport.triggers.mailchimp import MailchimpBatchTrigger


def first_event(trigger: MailchimpBatchTrigger, limit: float = 60) -> dict:
    """Run the trigger in a fresh event loop (as the triggerer does) and return its first event's payload."""

    async def go():
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(asyncio.wait_for(go(), limit))


def submit(operations: list[dict]) -> str:
    hook = MailchimpHook()
    try:
        return hook.submit_batch(operations)["id"]
    finally:
        hook.close()


def upsert(mailchimp: dict, email: str) -> dict:
    """A batch operation adding or updating one member."""
    return {"method": "PUT", "path": f"/lists/{mailchimp['audience_id']}/members/{subscriber_hash(email)}",
            "body": json.dumps({"email_address": email, "status_if_new": "subscribed"})}


def test_serialize_round_trips():
    trigger = MailchimpBatchTrigger("mc_conn", ["b1", "b2"], poll_interval=2.5, timeout=60,
                                    payload={"summary": {"created": 3}, "files": ["x"]})
    path, kwargs = trigger.serialize()
    module, _, name = path.rpartition(".")
    again = getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))
    assert type(again) is MailchimpBatchTrigger
    assert again.serialize() == (path, kwargs)
    assert kwargs == {"conn_id": "mc_conn", "batch_ids": ["b1", "b2"], "poll_interval": 2.5, "timeout": 60.0,
                      "payload": {"summary": {"created": 3}, "files": ["x"]}}


def test_finished_batches_yield_success_with_their_info(mailchimp_conn, sandbox):
    ids = [submit([upsert(mailchimp_conn, "t1@example.com")]),
           submit([upsert(mailchimp_conn, "t2@example.com"), upsert(mailchimp_conn, "not an email")])]
    payload = {"opaque": [1, "two"]}
    event = first_event(MailchimpBatchTrigger("mailchimp_default", ids, poll_interval=0.05, timeout=30,
                                              payload=payload))
    assert event["status"] == "success", event
    assert event["payload"] == payload
    assert [b["id"] for b in event["batches"]] == ids
    first, second = event["batches"]
    assert first["status"] == second["status"] == "finished"
    assert (first["total_operations"], first["errored_operations"]) == (1, 0)
    assert (second["total_operations"], second["finished_operations"], second["errored_operations"]) == (2, 2, 1)
    assert second["response_body_url"].endswith(f"/{ids[1]}.tar.gz") and second["completed_at"]


def test_an_unknown_batch_yields_an_error_at_once(mailchimp_conn, sandbox):
    started = time.monotonic()
    event = first_event(MailchimpBatchTrigger("mailchimp_default", ["nosuchbatch"], poll_interval=0.05, timeout=30))
    assert event["status"] == "error" and "HTTP 404" in event["message"] and "Resource Not Found" in event["message"]
    assert time.monotonic() - started < 10  # refused: not polled until the timeout


def test_an_unreachable_host_yields_an_error_naming_the_failure(sandbox, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AIRFLOW_CONN_MC_DOWN", json.dumps({
        "conn_type": "mailchimp", "host": f"https://127.0.0.1:{port}/3.0",
        "extra": {"api_key": sandbox.info["mailchimp"]["api_key"], "ca_bundle": sandbox.info["ca_bundle"]}}))
    event = first_event(MailchimpBatchTrigger("mc_down", ["b1"], poll_interval=0.05, timeout=0.5))
    assert event["status"] == "error" and "not finished after" in event["message"]
    assert "ConnectionError" in event["message"]


def test_a_missing_connection_yields_an_error():
    event = first_event(MailchimpBatchTrigger("no_such_connection", ["b1"], poll_interval=0.05, timeout=1))
    assert event["status"] == "error" and "no_such_connection" in event["message"]


def test_a_batch_not_finished_in_time_yields_an_error(mailchimp_conn, sandbox):
    bid = submit([upsert(mailchimp_conn, f"slow{i}@example.com") for i in range(3)])
    sandbox.latency(base_ms=600)  # each operation (and each status check) now takes 0.6 s
    event = first_event(MailchimpBatchTrigger("mailchimp_default", [bid], poll_interval=0.05, timeout=0.3))
    assert event["status"] == "error", event
    assert event["message"] == f"Mailchimp batches ['{bid}'] not finished after 0s"
    assert "payload" not in event


def test_the_trigger_reads_the_connection_with_the_async_helpers(mailchimp_conn, sandbox, monkeypatch):
    """The hook the trigger uses holds the connection the async helpers read (no sync read in the loop)."""
    calls = []
    import airflow.providers.common.compat.connection as compat

    real = compat.get_async_connection

    async def spy(conn_id, hook=None):
        calls.append(conn_id)
        return await real(conn_id, hook=hook)

    monkeypatch.setattr(compat, "get_async_connection", spy)
    hook = asyncio.run(MailchimpHook.afrom_conn_id("mailchimp_default"))
    assert calls == ["mailchimp_default"]
    assert {"api_key", "ca_bundle", "data_privacy_acknowledged"} <= set(hook.extras) and hook.mask_secrets is False
    hook.get_connection = None  # a sync read from here on would fail
    assert hook.http.get_json("/ping")["health_status"]
    hook.close()


# -- the Adobe I/O Events journal trigger (Campaign email events) ------------------------------------------------

def _acs_conn(sandbox, monkeypatch) -> str:
    acs = sandbox.info["adobe_campaign"]
    monkeypatch.setenv("AIRFLOW_CONN_ACS_EVENTS", json.dumps({
        "conn_type": "adobe_campaign", "host": acs["base_url"],
        "extra": {"client_id": acs["client_id"], "client_secret": acs["client_secret"], "org_id": acs["org_id"],
                  "ims_url": acs["ims_url"], "scopes": acs["scope"], "ca_bundle": sandbox.info["ca_bundle"],
                  "events_url": acs["events_url"]}}))
    return "acs_events"


def test_campaign_events_trigger_serialize_round_trips():
    from airflow_provider_segexport.triggers.campaign_events import CampaignEventsTrigger

    trigger = CampaignEventsTrigger("acs", since="pos-1", poll_interval=2.5, timeout=60)
    path, kwargs = trigger.serialize()
    module, _, name = path.rpartition(".")
    again = getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))
    assert type(again) is CampaignEventsTrigger and again.serialize() == (path, kwargs)
    assert kwargs == {"conn_id": "acs", "since": "pos-1", "poll_interval": 2.5, "timeout": 60.0}


def test_campaign_events_trigger_waits_honouring_retry_after_then_reports_new_events(sandbox, monkeypatch):
    import threading

    from airflow_provider_segexport.triggers.campaign_events import CampaignEventsTrigger

    conn = _acs_conn(sandbox, monkeypatch)
    emulator = sandbox.server.sandbox.emulators["adobe_campaign"]
    emulator.journal_retry_after = 1
    email = "trig@example.com"
    sandbox.session.post(f"{sandbox.admin}/seed", json={**sandbox.server.initial_seed, "adobe_campaign": {
        "profiles": [{"email": email}]}}, timeout=30).raise_for_status()
    emulator.journal_retry_after = 1
    # nothing in the journal: the trigger polls from "now" (latest), spaced by Retry-After, and times out
    started = time.monotonic()
    event = first_event(CampaignEventsTrigger(conn, poll_interval=0.05, timeout=2.5))
    assert event["status"] == "timeout" and time.monotonic() - started < 10
    polls = sum(v for k, v in sandbox.requests()["counts"].items() if k.startswith("adobe_campaign") and "journal" in k)
    assert 2 <= polls <= 4, sandbox.requests()["counts"]  # about one a second, not one every 0.05 s
    # events arriving while it waits (after the position it started from): success, with that position
    timer = threading.Timer(1.2, lambda: emulator.generate_events([{"type": "open", "email": email}]))
    timer.start()
    event = first_event(CampaignEventsTrigger(conn, since=event["since"], poll_interval=0.05, timeout=20))
    timer.cancel()
    assert event["status"] == "success" and event["first"]


def test_campaign_events_trigger_reports_a_refused_read(sandbox, monkeypatch):
    from airflow_provider_segexport.triggers.campaign_events import CampaignEventsTrigger

    conn = _acs_conn(sandbox, monkeypatch)
    extra = json.loads(__import__("os").environ["AIRFLOW_CONN_ACS_EVENTS"])
    extra["extra"]["events_url"] += "-nosuchregistration"
    monkeypatch.setenv("AIRFLOW_CONN_ACS_EVENTS", json.dumps(extra))
    event = first_event(CampaignEventsTrigger(conn, poll_interval=0.05, timeout=10))
    assert event["status"] == "error" and "404" in event["message"]
    assert first_event(CampaignEventsTrigger("no_such_connection", timeout=1))["status"] == "error"
