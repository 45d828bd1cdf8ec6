"""Campaign email events -> Dynamics 365 when the events table has no ``UpsertMultiple``: the sync falls back to
``$batch`` upserts by the event-ID key (real DAG runs, real HTTPS to the sandbox configured without the message).
Each event lands once after two runs, a replay and a run dying mid-write then retried; ``write_with="batch"`` works
where ``UpsertMultiple`` exists; a record refused inside a batch is a reject with Dataverse's words while the others
are written; the request log shows one ``UpsertMultiple`` try a run and ``$batch`` after it."""

from __future__ import annotations

import math

from tests import test_campaign_events
from tests.test_campaign_events import (
    CONTACTS,
    TYPES,
    check_once,
    expected,
    generate,
    journal,
    mixed_events,
    rejects_of,
    sync,
    written,
)

#: the same world as the UpsertMultiple tests: contacts, their Campaign profiles, both connections (a fixture)
world = test_campaign_events.world

UPSERT_MULTIPLE = "dynamics365 POST new_emailevents/Microsoft.Dynamics.CRM.UpsertMultiple"
BATCH = "dynamics365 POST $batch"
INNER_PATCH = "dynamics365 PATCH $batch:new_emailevents(id)"
BATCH_SIZE = 7  # the test DAGs' batch_size


def without_upsert_multiple(sandbox) -> None:
    """The events table loses UpsertMultiple (reset with the sandbox before the next test)."""
    r = sandbox.session.post(f"{sandbox.admin}/dynamics365/config",
                             json={"upsert_multiple_unavailable": ["new_emailevent"]}, timeout=10)
    r.raise_for_status()
    assert r.json()["upsert_multiple_unavailable"] == ["new_emailevent"]


def clear_requests(sandbox) -> None:
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30).raise_for_status()


def counts(sandbox) -> dict[str, int]:
    return sandbox.requests()["counts"]


def test_the_sandbox_answers_upsert_multiple_with_the_platform_fault_when_the_table_lacks_it(world, sandbox):
    from airflow_provider_segexport.hooks.dynamics365 import Dynamics365Hook
    from airflow_provider_segexport.http import VendorAPIError
    from airflow_provider_segexport.sync.events import message_unsupported

    without_upsert_multiple(sandbox)
    hook = Dynamics365Hook()
    target = {"@odata.id": "new_emailevents(new_eventid='probe-1')", "new_eventid": "probe-1", "subject": "x",
              "regardingobjectid_contact_new_emailevent@odata.bind": f"/contacts({next(iter(world))})"}
    try:
        try:
            hook.upsert_multiple("new_emailevents", "new_emailevent", [target])
            raise AssertionError("UpsertMultiple was accepted")
        except VendorAPIError as exc:
            assert (exc.status, exc.code) == (400, "0x80040800")
            assert exc.message.startswith("The 'UpsertMultiple' method does not support entities of type "
                                          "'new_emailevent'.")
            assert message_unsupported(exc)
        assert written(sandbox) == []  # nothing written by the refused call
        # the same records through $batch: created, then updated (204 both times), one record each; a key with a
        # quote, a space and an accent travels in the URL as an OData literal
        odd = "probe 'two' \u00e9/x"
        for _ in range(2):
            answers = hook.upsert_batch("new_emailevents", "new_eventid", [("probe-1", target), (odd, target)])
            assert [(a.ok, a.status) for a in answers] == [(True, 204), (True, 204)]
        assert sorted(r["new_eventid"] for r in written(sandbox)) == sorted(["probe-1", odd])
    finally:
        hook.close()


def test_without_upsert_multiple_each_event_lands_once_through_batch(airflow_db, world, sandbox, capfd):
    without_upsert_multiple(sandbox)
    mixed_events(sandbox, world)
    clear_requests(sandbox)
    capfd.readouterr()
    first = sync()
    task_log = capfd.readouterr().out  # the task's log lines (Airflow writes them to stdout under dag.test())
    want = expected(sandbox, world)
    check_once(sandbox, want)
    t = first["totals"]
    assert first["written_with"] == "batch"
    assert (t["created"], t["updated"]) == (len(want), 0)
    assert t["rejected"] == len(rejects_of(first)) == 2 * len(TYPES)  # the two profiles without a contact
    assert first["by_type"]["open"]["created"] == 2 * CONTACTS
    seen = counts(sandbox)
    assert seen.get(UPSERT_MULTIPLE) == 1  # tried once; the other batches waited for its answer, then $batch
    assert seen.get(INNER_PATCH) == len(want)  # each event upserted once, none halved or repeated
    assert seen.get(BATCH, 0) >= math.ceil(len(want) / BATCH_SIZE)
    switches = [line for line in task_log.splitlines() if "Dataverse has no UpsertMultiple" in line]
    assert len(switches) == 1, switches  # said once, at WARNING, with why and that it is slower
    assert "warning" in switches[0].lower() and "0x80040800" in switches[0] and "Slower" in switches[0]

    # a second run: nothing new, nothing written (and no UpsertMultiple try: there is nothing to write)
    clear_requests(sandbox)
    second = sync()
    assert second["events_read"] == 0 and second["totals"]["created"] == 0
    assert not any(k in counts(sandbox) for k in (UPSERT_MULTIPLE, BATCH))
    check_once(sandbox, want)

    # new events, then a replay of the whole journal: each event still once; the replay updates
    generate(sandbox, [{"type": "click", "email": e, "url": "https://shop.example.com/new"}
                       for e in list(world.values())[:3]])
    third = sync()
    assert third["events_read"] == 3 and third["totals"]["created"] == 3
    clear_requests(sandbox)
    replay = sync({"replay": True})
    all_want = expected(sandbox, world)
    check_once(sandbox, all_want)
    assert (replay["totals"]["created"], replay["totals"]["updated"]) == (0, len(all_want))
    seen = counts(sandbox)
    assert seen.get(UPSERT_MULTIPLE) == 1 and seen.get(INNER_PATCH) == len(all_want)


def test_without_upsert_multiple_a_run_dying_mid_write_then_retried_writes_each_event_once(airflow_db, world,
                                                                                            sandbox):
    without_upsert_multiple(sandbox)
    mixed_events(sandbox, world, rounds=3)
    # the 4th $batch is refused for good: the task fails with 3 batches of the window in Dataverse
    sandbox.fault(kind="status", status=403, vendor="dynamics365", path_contains="$batch", skip=3, count=1)
    assert sync(ok=False) == {}
    partial = {r["new_eventid"] for r in written(sandbox)}
    want = expected(sandbox, world)
    assert 0 < len(partial) < len(want)
    clear_requests(sandbox)
    retried = sync()
    check_once(sandbox, want)  # the window written again: the same keys upserted, no duplicate
    t = retried["totals"]
    assert retried["written_with"] == "batch"
    assert t["created"] + t["updated"] == len(want) and t["updated"] >= len(partial)
    assert t["created"] == len(want) - len(partial)
    assert counts(sandbox).get(INNER_PATCH) == len(want)
    assert sync()["events_read"] == 0  # the cursor moved past them all


def test_write_with_batch_where_upsert_multiple_exists(airflow_db, world, sandbox):
    mixed_events(sandbox, world, rounds=1)
    clear_requests(sandbox)
    summary = sync(dag_id="campaign_events_batch_test")
    want = expected(sandbox, world)
    check_once(sandbox, want)
    assert summary["written_with"] == "batch" and summary["totals"]["created"] == len(want)
    seen = counts(sandbox)
    assert UPSERT_MULTIPLE not in seen
    assert seen.get(INNER_PATCH) == len(want) and seen.get(BATCH, 0) >= math.ceil(len(want) / BATCH_SIZE)
    # the default (auto) run on the same table keeps UpsertMultiple
    generate(sandbox, [{"type": "open", "email": e} for e in world.values()])
    clear_requests(sandbox)
    auto = sync()
    assert auto["written_with"] == "upsert_multiple" and auto["totals"]["created"] == CONTACTS
    assert BATCH not in counts(sandbox)
    check_once(sandbox, expected(sandbox, world))


def test_a_record_refused_inside_a_batch_is_a_reject_and_the_others_are_written(airflow_db, world, sandbox):
    without_upsert_multiple(sandbox)
    emails = list(world.values())
    # a tracking URL longer than the column's 2,000 characters: Dataverse refuses that record only
    long_url = "https://shop.example.com/" + "x" * 2100
    generate(sandbox, [{"type": "open", "email": e} for e in emails[:5]]
             + [{"type": "click", "email": emails[5], "url": long_url}]
             + [{"type": "sent", "email": e} for e in emails[6:]])
    bad = next(ev["id"] for ev in journal(sandbox) if ev["data"]["eventType"] == "click")
    clear_requests(sandbox)
    summary = sync()
    want = {k: v for k, v in expected(sandbox, world).items() if k != bad}
    check_once(sandbox, want)  # every other event of the batch is written, once
    t = summary["totals"]
    assert (t["created"], t["rejected"]) == (len(want), 1)
    [reject] = rejects_of(summary)
    assert (reject["key"], reject["segment"], reject["reason"]) == (bad, "click", "vendor_rejected")
    assert "new_trackingurl" in reject["vendor_message"] and "maximum allowed length of '2000'" in \
        reject["vendor_message"]
    seen = counts(sandbox)
    # the refused record was sent once, in its batch: no halving, no retry, the batch was not failed
    assert seen.get(INNER_PATCH) == len(want) + 1 and seen.get(UPSERT_MULTIPLE) == 1
