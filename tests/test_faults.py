"""Faults injected mid-export: real DAG runs (dag.test()) against the sandbox over HTTPS, no mocking.

Every case ends the same way as a clean export of the same warehouse: the audience is exactly the
clean run's, every row is accounted for in the summary, and no member the destination had confirmed
is sent twice. The sandbox's request log counts, per member, how often a batch carrying it was
*processed*; an injected fault that answers before processing (429, 5xx, timeout, dropped connection)
does not count, so a member may appear more often than in the clean run only if it was in a request
that was processed but whose answer was lost (an ``after`` fault: the log's ``unanswered``).

Also here: a persistent outage that exhausts the retries (the task fails saying so; the retry of the
same run resumes from the export state), and a Dynamics 365 access token expiring between calls of
one hook (msal against the sandbox's Entra ID).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import Counter

import pytest

from airflow_provider_segexport import warehouse
from tests.conftest import REPO, SandboxClient, refreshed_warehouse
from tests.test_mailchimp_export import audience, expected

SQL = "SELECT * FROM segment_export WHERE segment_name = {segment} ORDER BY customer_id"
PROFILES = 3000  # 3,000 + ~250 rows: 7 batch-subscribe calls, several in flight at once
SEGMENTS = ["all_customers", "vip_customers"]
DAG_ID = "mailchimp_export_test"
#: read timeout (connection extra "timeout") for the timeout cases; the injected hang is much longer
READ_TIMEOUT = 1.0
HANG = 10.0


# -- set-up ---------------------------------------------------------------------------------------------

def set_mailchimp_conn(monkeypatch, sandbox, **extra) -> None:
    info = sandbox.info
    monkeypatch.setenv("AIRFLOW_CONN_MAILCHIMP_DEFAULT", json.dumps({
        "conn_type": "mailchimp", "host": info["mailchimp"]["base_url"],
        "extra": {"api_key": info["mailchimp"]["api_key"], "ca_bundle": info["ca_bundle"],
                  "data_privacy_acknowledged": True, **extra},
    }))


def seed(sandbox, wh_path) -> None:
    sandbox.session.post(f"{sandbox.admin}/seed", json=warehouse.sandbox_seed(wh_path), timeout=60).raise_for_status()
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30).raise_for_status()


def run_export(conf: dict, *, same_run_as=None):
    """One DAG run with dag.test(); returns (dag_run, {task_id: return_value}).

    ``same_run_as``: run again with that run's logical date and run_after, i.e. the same run_id. dag.test()
    replaces the old run, so for the export this is the retry of the same run (what "Clear" does).
    """
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    bag = DagBag(dag_folder=str(REPO / "tests" / "dags"))
    assert not bag.import_errors, bag.import_errors
    kwargs = {"logical_date": same_run_as[1], "run_after": same_run_as[2]} if same_run_as else {}
    dr = bag.dags[DAG_ID].test(run_conf=conf, **kwargs)
    with create_session() as session:
        rows = session.scalars(select(XComModel).where(XComModel.dag_id == DAG_ID, XComModel.run_id == dr.run_id,
                                                       XComModel.key == "return_value")).all()
        values = {row.task_id: XComModel.deserialize_value(row) for row in rows}
    return (dr.state, dr.logical_date, dr.run_after, dr.run_id), values


def conf(sandbox, state_dir, **kw) -> dict:
    return {"audience_id": sandbox.info["mailchimp"]["audience_id"], "segments": SEGMENTS, "sql": SQL,
            "state_dir": str(state_dir), **kw}


@pytest.fixture(scope="module")
def wh_path(tmp_path_factory):
    return refreshed_warehouse(tmp_path_factory.mktemp("faults-wh") / "warehouse.db", PROFILES)


@pytest.fixture(scope="module")
def baseline(sandbox_server, airflow_db, wh_path, tmp_path_factory):
    """A clean export of the warehouse: its audience, per-member send counts and summary."""
    client = SandboxClient(sandbox_server)
    client.reset()
    client.latency(0, 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(wh_path)}))
        set_mailchimp_conn(mp, client)
        seed(client, wh_path)
        (state, *_), xcom = run_export(conf(client, tmp_path_factory.mktemp("baseline-state")))
    assert state == "success"
    result = {"audience": audience(client), "sends": sandbox_server.sandbox.log.sends_of("mailchimp"),
              "summary": xcom["export"]}
    client.reset()
    return result


@pytest.fixture
def wh(wh_path, baseline, monkeypatch, sandbox):
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(wh_path)}))
    seed(sandbox, wh_path)
    sandbox.latency(base_ms=20)  # requests overlap: faults hit batches in flight
    return wh_path


# -- the checks every fault case ends with ----------------------------------------------------------------

def log_of(sandbox):
    return sandbox.server.sandbox.log


def assert_row_accounting(summary: dict, rows: int) -> None:
    t = summary["totals"]
    assert t["rows"] == rows
    assert t["rows"] == t["created"] + t["updated"] + t["unchanged"] + t["skipped"] + t["rejected"], t
    assert t["not_sent"] == 0 and t["planned"] == 0 and t["not_in_plan"] == 0, t
    assert summary["rejects"]["count"] == t["rejected"]


def assert_nothing_confirmed_sent_twice(sandbox, baseline_sends: dict[str, int]) -> Counter:
    """Per member: sends beyond the clean run's only for requests processed without an answer."""
    sends = log_of(sandbox).sends_of("mailchimp")
    unanswered = log_of(sandbox).unanswered_of("mailchimp")
    never = [m for m, n in baseline_sends.items() if sends.get(m, 0) < n]
    assert not never, f"{len(never)} member(s) sent fewer times than in a clean run"
    extra = Counter({m: n - baseline_sends.get(m, 0) for m, n in sends.items() if n > baseline_sends.get(m, 0)})
    confirmed_twice = {m: k for m, k in extra.items() if k > unanswered.get(m, 0)}
    assert not confirmed_twice, f"{len(confirmed_twice)} member(s) sent again although their send was answered"
    return extra


def assert_same_outcome_as_clean_run(sandbox, baseline, summary: dict, *, answers_lost: bool = False) -> Counter:
    assert audience(sandbox) == baseline["audience"]
    clean = baseline["summary"]["totals"]
    assert_row_accounting(summary, clean["rows"])
    t = summary["totals"]
    if answers_lost:  # a batch processed twice is "unchanged" the second time
        assert t["created"] + t["updated"] + t["unchanged"] == clean["created"] + clean["updated"] + clean["unchanged"]
        assert t["rejected"] == clean["rejected"]
    else:
        assert {k: t[k] for k in ("created", "updated", "unchanged", "rejected")} == \
               {k: clean[k] for k in ("created", "updated", "unchanged", "rejected")}
    assert summary["rejects"]["by_reason"] == baseline["summary"]["rejects"]["by_reason"]
    return assert_nothing_confirmed_sent_twice(sandbox, baseline["sends"])


def retry_delays(logs: str, status: int) -> list[float]:
    """The waits the HTTP layer logged before repeating after ``status``."""
    return [float(d) for d in re.findall(rf"HTTP {status} [^\n]*?; retry \d+/\d+ in ([0-9.]+)s", logs)]


def test_clean_run_is_the_ground_truth(baseline, wh_path):
    """The reference every fault case is compared with is itself right (warehouse ground truth)."""
    want, rejected, rows, _ = expected(wh_path, SEGMENTS)
    got = baseline["audience"]
    assert {e for e, m in got.items() if m["tags"]} == set(want)
    assert all(set(got[e]["tags"]) == w["tags"] for e, w in want.items())
    assert baseline["summary"]["totals"]["rows"] == rows
    assert baseline["summary"]["totals"]["rejected"] == sum(len(v) for v in rejected.values())
    # every valid member was sent exactly once per segment it is in, nobody twice in one segment
    assert sum(baseline["sends"].values()) == rows - sum(
        n for r, n in baseline["summary"]["rejects"]["by_reason"].items() if r != "vendor_rejected")


# -- transient faults: each case ends like the clean run ---------------------------------------------------

BATCH_POSTS = {"vendor": "mailchimp", "method": "POST", "path_contains": "/lists/"}

CASES = {
    # Mailchimp's own 429s carry no Retry-After; a proxy or a future API may send one: it is honoured.
    "burst_of_429_with_retry_after": [dict(kind="burst429", count=6, skip=2, retry_after=1, **BATCH_POSTS)],
    "500_burst": [dict(kind="status", status=500, count=4, skip=2, **BATCH_POSTS)],
    "502_burst": [dict(kind="status", status=502, count=4, skip=2, **BATCH_POSTS)],
    "503_burst_also_on_preflight_reads": [dict(kind="status", status=503, count=4, skip=2, **BATCH_POSTS),
                                          dict(kind="status", status=503, count=2, vendor="mailchimp", method="GET")],
    "connections_reset_before_processing": [dict(kind="drop", count=3, skip=2, **BATCH_POSTS)],
    "connections_reset_after_processing": [dict(kind="drop", after=True, count=2, skip=2, **BATCH_POSTS)],
    "502_after_processing": [dict(kind="status", status=502, after=True, count=2, skip=1, **BATCH_POSTS)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_transient_faults_end_in_the_clean_audience(case, airflow_db, wh, baseline, sandbox, monkeypatch, tmp_path,
                                                    task_log):
    set_mailchimp_conn(monkeypatch, sandbox)
    rules = CASES[case]
    for rule in rules:
        sandbox.fault(**rule)
    (state, *_), xcom = run_export(conf(sandbox, tmp_path / "state"))
    logs = task_log()
    assert state == "success", logs[-3000:]
    assert not sandbox.session.get(f"{sandbox.admin}/faults", timeout=10).json()["faults"], "faults not all hit"
    summary = xcom["export"]
    injected = sum(r["count"] for r in rules)
    assert summary["http"]["retries"] >= injected

    lost = any(r.get("after") for r in rules)
    extra = assert_same_outcome_as_clean_run(sandbox, baseline, summary, answers_lost=lost)
    if lost:  # the repeated members are exactly those of the batches whose answer was lost
        assert sum(extra.values()) == sum(log_of(sandbox).unanswered_of("mailchimp").values()) > 0
    else:
        assert not extra

    rule = rules[0]
    if rule["kind"] == "burst429":
        assert summary["http"]["throttled"] >= rule["count"]
        delays = retry_delays(logs, 429)
        assert len(delays) >= rule["count"] and min(delays) >= rule["retry_after"], delays
    elif rule["kind"] == "status":
        # the log quotes Mailchimp's own error (problem+json title and detail), not just a status
        title = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}[rule["status"]]
        assert f"HTTP {rule['status']} {title}: An unexpected internal error has occurred" in logs
    else:
        assert re.search(r"Mailchimp POST /lists/\w+: (ConnectionError|ChunkedEncodingError)[^\n]*; retry", logs)


@pytest.mark.parametrize("after", [False, True], ids=["hang_before_processing", "hang_after_processing"])
def test_read_timeouts_are_cut_by_the_connection_timeout_and_retried(after, airflow_db, wh, baseline, sandbox,
                                                                     monkeypatch, tmp_path, task_log):
    """The sandbox holds the answer for HANG seconds (then 504); the hook's read timeout (connection extra
    ``timeout``, default 130 s) cuts the wait at READ_TIMEOUT and repeats the idempotent upsert."""
    set_mailchimp_conn(monkeypatch, sandbox, timeout=READ_TIMEOUT)
    sandbox.fault(kind="timeout", seconds=HANG, count=2, skip=2, after=after, **BATCH_POSTS)
    (state, *_), xcom = run_export(conf(sandbox, tmp_path / "state"))
    logs = task_log()
    assert state == "success", logs[-3000:]
    assert len(re.findall(r"Mailchimp POST /lists/\w+: (?:Read)?Timeout[^\n]*; retry", logs)) >= 2, logs[-3000:]
    elapsed = xcom["export"]["duration_s"]
    assert "HTTP 504" not in logs and elapsed < HANG, f"the export waited for the hung requests ({elapsed:.1f}s)"
    extra = assert_same_outcome_as_clean_run(sandbox, baseline, xcom["export"], answers_lost=after)
    assert bool(extra) == after


# -- a persistent outage: the task fails clearly, the retry of the run resumes ------------------------------

OUTAGE_SKIP = 3  # batch-subscribe calls answered before the outage: 1,500 members confirmed


def outage_then_retry(sandbox, tmp_path, task_log, **kw):
    # 503 with Retry-After: 0 for every batch after the third: the retries (8 attempts) run out quickly
    sandbox.fault(kind="status", status=503, count=100_000, skip=OUTAGE_SKIP, retry_after=0, **BATCH_POSTS)
    run_conf = conf(sandbox, tmp_path / "state", **kw)
    (state, logical_date, run_after, run_id), xcom = run_export(run_conf)
    failed_logs = task_log()
    assert state == "failed" and "export" not in xcom
    confirmed = log_of(sandbox).sends_of("mailchimp")
    sandbox.session.delete(f"{sandbox.admin}/faults", timeout=10).raise_for_status()  # the outage is over
    (state2, *_, run_id2), xcom2 = run_export(run_conf, same_run_as=(state, logical_date, run_after))
    retry_logs = task_log()
    assert state2 == "success", retry_logs[-3000:]
    assert run_id2 == run_id
    return failed_logs, confirmed, xcom2["export"]


def not_sent_numbers(logs: str):
    m = re.search(r"The export to Mailchimp stopped: .*", logs)
    assert m, logs[-3000:]
    return m.group(0)


@pytest.mark.parametrize("full_refresh", [False, True], ids=["delta", "full_refresh"])
def test_outage_beyond_retries_fails_clearly_and_the_retry_resumes(full_refresh, airflow_db, wh, baseline, sandbox,
                                                                  monkeypatch, tmp_path, task_log):
    set_mailchimp_conn(monkeypatch, sandbox)
    failed_logs, confirmed, summary = outage_then_retry(sandbox, tmp_path, task_log, full_refresh=full_refresh)

    message = not_sent_numbers(failed_logs)
    assert "HTTP 503" in message and "Service Unavailable" in message  # the vendor and its words
    assert "clear the task to run it again" in message                   # what to do
    assert "retry 7/7" in failed_logs                                    # the retries were used up first
    assert 0 < sum(confirmed.values()) <= OUTAGE_SKIP * 500

    # The retry completes the audience and sends nothing the destination had confirmed again: over both
    # tries every member was sent exactly as often as in one clean run.
    assert audience(sandbox) == baseline["audience"]
    assert log_of(sandbox).sends_of("mailchimp") == baseline["sends"]
    t, clean = summary["totals"], baseline["summary"]["totals"]
    assert_row_accounting(summary, clean["rows"])
    refused_before = sum(1 for m in confirmed if m in _forgotten(sandbox))
    assert t["skipped"] == sum(confirmed.values()) - refused_before
    assert t["created"] + t["updated"] + t["unchanged"] + t["skipped"] == \
        clean["created"] + clean["updated"] + clean["unchanged"]


def test_outage_failure_message_counts_confirmed_and_not_sent(airflow_db, wh, baseline, sandbox, monkeypatch,
                                                             tmp_path, task_log):
    set_mailchimp_conn(monkeypatch, sandbox)
    sandbox.fault(kind="status", status=503, count=100_000, skip=OUTAGE_SKIP, retry_after=0, **BATCH_POSTS)
    (state, *_), _ = run_export(conf(sandbox, tmp_path / "state"))
    assert state == "failed"
    message = not_sent_numbers(task_log())
    processed = log_of(sandbox).sends_of("mailchimp")
    confirmed = sum(processed.values()) - len(set(processed) & _forgotten(sandbox))
    assert re.search(rf"\b({confirmed:,}|{confirmed})\b[^.]*confirmed", message), message
    assert re.search(r"\b[\d,]+\b[^.]*not sent", message), message


def _forgotten(sandbox) -> set[str]:
    """Emails the seed marks as permanently deleted (Mailchimp refuses them; a later run rejects them up front)."""
    return {m["email_address"].strip().lower() for m in sandbox.server.sandbox.seed["mailchimp"]["members"]
            if m.get("status") == "forgotten"}


# -- Dynamics 365: the access token expires between calls of one hook --------------------------------------

@pytest.fixture
def dataverse_conn(sandbox, monkeypatch):
    dv = sandbox.info["dynamics365"]
    monkeypatch.setenv("AIRFLOW_CONN_DV_FAULTS", json.dumps({
        "conn_type": "dynamics365", "host": dv["base_url"],
        "extra": {"tenant_id": dv["tenant_id"], "client_id": dv["client_id"], "client_secret": dv["client_secret"],
                  "authority": dv["authority"], "ca_bundle": sandbox.info["ca_bundle"]}}))
    return "dv_faults"


def set_token_ttl(sandbox, seconds: int) -> None:
    sandbox.session.post(f"{sandbox.admin}/token-ttl", json={"seconds": seconds}, timeout=10).raise_for_status()


def contact(cid: str) -> dict:
    return {"contactid": cid, "firstname": "Token", "lastname": "Expiry", "emailaddress1": f"{cid[:8]}@example.com"}


def test_dynamics365_token_expiry_mid_run_refreshes_and_repeats_only_the_refused_call(sandbox, dataverse_conn,
                                                                                     caplog):
    from airflow_provider_segexport.hooks.dynamics365 import Dynamics365Hook

    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30)
    emulator = sandbox.server.sandbox.emulators["dynamics365"]
    ids = [str(uuid.uuid4()) for _ in range(6)]
    hook = Dynamics365Hook(dataverse_conn)
    set_token_ttl(sandbox, 2)
    hook.http.post_json("/contacts", contact(ids[0]))           # the first token, valid for 2 s
    first = hook._token
    assert first in emulator.tokens
    set_token_ttl(sandbox, 3600)
    time.sleep(max(0.0, emulator.tokens[first][0] - time.time()) + 0.2)
    with caplog.at_level("INFO", logger="airflow_provider_segexport.http"):
        for cid in ids[1:]:                                      # the first of these meets the expired token
            hook.http.post_json("/contacts", contact(cid))
    counts = sandbox.requests()["counts"]
    assert counts.get("dynamics365 POST token") == 2            # one new token, fetched once
    assert hook._token != first and hook._token in emulator.tokens
    assert counts.get("dynamics365 POST contacts") == len(ids) + 1  # only the call refused with 401 was repeated
    assert log_of(sandbox).sends_of("dynamics365") == {cid: 1 for cid in ids}  # each contact created once
    assert "access token refreshed after 401" in caplog.text
    for cid in ids:  # and they all exist
        assert hook.http.get_json(f"/contacts({cid})")["contactid"] == cid
    hook.close()


def test_dynamics365_token_expiry_under_concurrency_every_call_succeeds(sandbox, dataverse_conn):
    """Several threads of one hook meet the expired token at once: every call succeeds, each contact is
    created once, and the only repeated calls are the ones refused with 401."""
    from concurrent.futures import ThreadPoolExecutor

    from airflow_provider_segexport.hooks.dynamics365 import Dynamics365Hook

    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30)
    emulator = sandbox.server.sandbox.emulators["dynamics365"]
    hook = Dynamics365Hook(dataverse_conn, concurrency=4)
    set_token_ttl(sandbox, 2)
    hook.http.get_json("/WhoAmI")
    first = hook._token
    set_token_ttl(sandbox, 3600)
    time.sleep(max(0.0, emulator.tokens[first][0] - time.time()) + 0.2)
    ids = [str(uuid.uuid4()) for _ in range(16)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda cid: hook.http.post_json("/contacts", contact(cid)), ids))
    counts = sandbox.requests()["counts"]
    refused = counts["dynamics365 POST contacts"] - len(ids)
    assert 1 <= refused <= 4                                     # at most the calls in flight at the expiry
    assert counts["dynamics365 POST token"] == 2                 # one refresh, however many calls were refused
    assert log_of(sandbox).sends_of("dynamics365") == {cid: 1 for cid in ids}
    hook.close()
