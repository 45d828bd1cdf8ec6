"""Campaign Monitor under its rate limit and injected faults: real DAG runs (dag.test()) against the sandbox
over HTTPS, no mocking (issue #20, "How it is checked").

Every case ends as a clean export of the same warehouse does: the list (every subscriber's state, name,
consent and custom fields, the segment field included) is exactly the clean run's, every row is accounted
for in the summary, and no subscriber Campaign Monitor had confirmed is sent twice. The sandbox's request
log counts, per address, how often an import carrying it was *processed*; a 429 (the rate limit's or an
injected one), a 5xx or a connection reset before processing does not count, so an address may appear more
often than in the clean run only if it was in an import that was processed but whose answer was lost (an
``after`` fault: the log's ``unanswered``).

The warehouse's Unsubscribed and Bounced addresses (and a seeded Deleted and a suppressed one) make almost
every import a partial failure (HTTP 400 Code 210 with ``ResultData``): the faults hit those answers too.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import SandboxClient, refreshed_warehouse, run_dag
from tests.test_campaign_monitor_export import CUSTOM, DAG_ID, SQL, expected, seed, segments_of, the_list
from tests.test_faults import assert_row_accounting, log_of, retry_delays

PROFILES = 3000  # all_customers ~3,000 rows + newsletter_fr ~360: 4 import calls (1,000 a call), 4 in flight
SEGMENTS = ["all_customers", "newsletter_fr"]
VENDOR = "campaign_monitor"
IMPORTS = {"vendor": VENDOR, "method": "POST", "path_contains": "/import.json"}


# -- set-up -------------------------------------------------------------------------------------------------

def set_cm_conn(monkeypatch, sandbox) -> None:
    info = sandbox.info
    monkeypatch.setenv("AIRFLOW_CONN_CAMPAIGN_MONITOR_DEFAULT", json.dumps({
        "conn_type": "campaign_monitor", "host": info[VENDOR]["base_url"],
        "extra": {"api_key": info[VENDOR]["api_key"], "ca_bundle": info["ca_bundle"],
                  "data_privacy_acknowledged": True},
    }))


def configure(sandbox, **settings) -> dict:
    """Change the Campaign Monitor emulator's settings (rate limit...); the sandbox's reset restores them."""
    r = sandbox.session.post(f"{sandbox.admin}/{VENDOR}/config", json=settings, timeout=10)
    r.raise_for_status()
    return r.json()


def prepare(sandbox, wh_path) -> dict:
    """Seed the list (custom fields, a Deleted and a suppressed address) and empty the request log."""
    special = seed(sandbox, wh_path)
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30).raise_for_status()
    return special


def conf(sandbox, state_dir) -> dict:
    return {"list_id": sandbox.info[VENDOR]["list_id"], "segments": SEGMENTS, "sql": SQL,
            "state_dir": str(state_dir), "custom_fields": CUSTOM}


@pytest.fixture(scope="module")
def wh_path(tmp_path_factory):
    return refreshed_warehouse(tmp_path_factory.mktemp("cm-faults-wh") / "warehouse.db", PROFILES)


@pytest.fixture(scope="module")
def baseline(sandbox_server, airflow_db, wh_path, tmp_path_factory):
    """A clean export of the warehouse: its list, per-address send counts, summary and the seed's specials."""
    client = SandboxClient(sandbox_server)
    client.reset()
    client.latency(0, 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(wh_path)}))
        set_cm_conn(mp, client)
        special = prepare(client, wh_path)
        state, xcom = run_dag(DAG_ID, conf(client, tmp_path_factory.mktemp("cm-baseline-state")))
    assert state == "success"
    result = {"list": the_list(client), "sends": sandbox_server.sandbox.log.sends_of(VENDOR),
              "summary": xcom["export"], "special": special,
              "imports": sandbox_server.sandbox.log.snapshot()["counts"].get(f"{VENDOR} POST import", 0)}
    client.session.post(f"{client.admin}/seed", json=sandbox_server.initial_seed, timeout=60).raise_for_status()
    client.reset()
    return result


@pytest.fixture
def wh(wh_path, baseline, monkeypatch, sandbox):
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(wh_path)}))
    set_cm_conn(monkeypatch, sandbox)
    prepare(sandbox, wh_path)
    sandbox.latency(base_ms=20)  # imports overlap: faults hit calls in flight
    return wh_path


# -- the checks every case ends with ------------------------------------------------------------------------

def assert_nothing_confirmed_sent_twice(sandbox, baseline_sends: dict[str, int]) -> dict[str, int]:
    """Per address: sends beyond the clean run's only for imports processed without an answer; returns them."""
    sends = log_of(sandbox).sends_of(VENDOR)
    unanswered = log_of(sandbox).unanswered_of(VENDOR)
    never = [m for m, n in baseline_sends.items() if sends.get(m, 0) < n]
    assert not never, f"{len(never)} address(es) sent fewer times than in a clean run"
    extra = {m: n - baseline_sends.get(m, 0) for m, n in sends.items() if n > baseline_sends.get(m, 0)}
    confirmed_twice = {m: k for m, k in extra.items() if k > unanswered.get(m, 0)}
    assert not confirmed_twice, f"{len(confirmed_twice)} address(es) sent again although their import was answered"
    return extra


def assert_same_outcome_as_clean_run(sandbox, baseline, summary: dict, *, answers_lost: bool = False) -> dict:
    got = the_list(sandbox)
    want = baseline["list"]
    assert set(got) == set(want), f"{len(set(got) ^ set(want))} address(es) differ from the clean run's list"
    differ = [e for e in want if got[e] != want[e]]
    assert not differ, f"{len(differ)} subscriber(s) differ from the clean run's, e.g. {got[differ[0]]} != " \
                       f"{want[differ[0]]}"
    clean = baseline["summary"]["totals"]
    assert_row_accounting(summary, clean["rows"])
    t = summary["totals"]
    if answers_lost:  # an import processed twice counts its new subscribers as existing the second time
        assert t["created"] + t["updated"] + t["unchanged"] == clean["created"] + clean["updated"] + clean["unchanged"]
        assert t["rejected"] == clean["rejected"]
    else:
        assert {k: t[k] for k in ("created", "updated", "unchanged", "rejected")} == \
               {k: clean[k] for k in ("created", "updated", "unchanged", "rejected")}
    assert summary["rejects"]["by_reason"] == baseline["summary"]["rejects"]["by_reason"]
    return assert_nothing_confirmed_sent_twice(sandbox, baseline["sends"])


def test_clean_run_is_the_ground_truth(baseline, wh_path):
    """The reference every case is compared with is itself right (the warehouse's ground truth), and the
    export takes several import calls (faults hit some of them, with others in flight)."""
    want, rejected, rows, _ = expected(wh_path, SEGMENTS, baseline["special"])
    got = baseline["list"]
    assert {e for e, s in got.items() if s["state"] == "Active" and segments_of(s)} == set(want)
    assert all(segments_of(got[e]) == m["segments"] and got[e]["name"] == m["name"] for e, m in want.items())
    summary = baseline["summary"]
    assert summary["totals"]["rows"] == rows
    assert summary["rejects"]["by_reason"].get("vendor_rejected", 0) >= sum(
        n for k, n in rejected.items() if k != "bad_row")
    assert baseline["imports"] >= 4
    # every address sent once per segment it is in (a member of both segments twice), nobody more often
    assert sum(baseline["sends"].values()) == sum(len(m["segments"]) for m in want.values()) + sum(
        n for k, n in rejected.items() if k != "bad_row")


# -- the rate limit: paced by its headers, or backing off without them ---------------------------------------

#: a bucket of 3 requests refilled in 1.5 s: smaller than the export's calls (list, custom fields, creating
#: one, the segment field's options, 4 imports), so it must be paced
SMALL_BUCKET = {"rate_limit": 3, "rate_period": 1.5}


@pytest.mark.parametrize("headers", [True, False], ids=["with_ratelimit_headers", "without_headers_backoff"])
def test_rate_limit_smaller_than_the_export(headers, airflow_db, wh, baseline, sandbox, tmp_path, task_log):
    configure(sandbox, **SMALL_BUCKET, rate_limit_headers=headers)
    state, xcom = run_dag(DAG_ID, conf(sandbox, tmp_path / "state"))
    logs = task_log()
    assert state == "success", logs[-3000:]
    summary = xcom["export"]
    extra = assert_same_outcome_as_clean_run(sandbox, baseline, summary)
    assert not extra
    counts = sandbox.requests()["counts"]
    if headers:
        # the X-RateLimit-* headers pace the calls: new calls wait for the reset instead of being refused
        # (at most the calls already in flight when the bucket ran dry meet a 429)
        assert "pacing requests to the vendor's rate limit (X-RateLimit-Remaining" in logs, logs[-3000:]
        assert summary["http"]["throttled"] <= 4, summary["http"]
    else:
        # no headers: every refusal is a 429 retried after a backoff, and nothing paces by headers
        assert summary["http"]["throttled"] >= 1, summary["http"]
        assert "pacing requests to the vendor's rate limit" not in logs
        assert re.search(r"Campaign Monitor \w+ /\S+: HTTP 429 Rate limit exceeded; retry \d+/\d+", logs)
    assert summary["http"]["retries"] >= summary["http"]["throttled"]
    assert counts.get(f"{VENDOR} POST import", 0) >= baseline["imports"]


# -- injected faults: each case ends like the clean run -------------------------------------------------------

CASES = {
    # Campaign Monitor's own 429: X-RateLimit-Remaining 0 and a reset (1 s with this bucket), honoured by
    # every thread
    "burst_of_429_with_ratelimit_headers": ({"rate_limit": 1000, "rate_period": 1},
                                            [dict(kind="burst429", count=5, skip=1, **IMPORTS)]),
    # a 429 without any header (a proxy's, or headers switched off): exponential backoff
    "burst_of_429_without_headers": ({"rate_limit_headers": False},
                                     [dict(kind="burst429", count=5, skip=1, **IMPORTS)]),
    "503_burst_also_on_preflight_reads": ({}, [dict(kind="status", status=503, count=4, skip=1, **IMPORTS),
                                               dict(kind="status", status=503, count=2, vendor=VENDOR, method="GET")]),
    "connections_reset_before_processing": ({}, [dict(kind="drop", count=3, skip=1, **IMPORTS)]),
    # the import is processed, its answer (mostly a partial failure, HTTP 400 Code 210) is lost: the only
    # case where an address may be sent again, and only those of that import
    "connections_reset_after_processing": ({}, [dict(kind="drop", after=True, count=2, skip=1, **IMPORTS)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_faults_end_in_the_clean_list(case, airflow_db, wh, baseline, sandbox, tmp_path, task_log):
    settings, rules = CASES[case]
    lost = any(r.get("after") for r in rules)
    if lost and not sandbox.server.sandbox.emulators[VENDOR].after_faults:
        pytest.skip("the sandbox's Campaign Monitor emulator does not take 'after' faults (after_faults, and "
                    "Emulator.after() once an answer is ready)")
    if settings:
        configure(sandbox, **settings)
    for rule in rules:
        sandbox.fault(**rule)
    state, xcom = run_dag(DAG_ID, conf(sandbox, tmp_path / "state"))
    logs = task_log()
    assert state == "success", logs[-3000:]
    assert not sandbox.session.get(f"{sandbox.admin}/faults", timeout=10).json()["faults"], "faults not all hit"
    summary = xcom["export"]
    assert summary["http"]["retries"] >= sum(r["count"] for r in rules)

    extra = assert_same_outcome_as_clean_run(sandbox, baseline, summary, answers_lost=lost)
    if lost:  # the repeated addresses are exactly those of the imports whose answer was lost
        unanswered = log_of(sandbox).unanswered_of(VENDOR)
        assert extra == unanswered and sum(unanswered.values()) > 0
    else:
        assert not extra

    rule = rules[0]
    if rule["kind"] == "burst429":
        assert summary["http"]["throttled"] >= rule["count"]
        delays = retry_delays(logs, 429)
        assert len(delays) >= rule["count"], logs[-3000:]
        if settings.get("rate_limit_headers", True):  # the reset is honoured (1 s); without headers: backoff
            assert min(delays) >= 1.0, delays
            assert "the server asked for a wait" in logs
        else:
            assert min(delays) < 1.0, delays  # the first backoff is 0.25-0.5 s
    elif rule["kind"] == "status":
        # the log quotes Campaign Monitor's own words, not just a status
        assert "HTTP 503 Service Unavailable - please try again later." in logs
        assert re.search(r"Campaign Monitor GET /lists/\S+: HTTP 503", logs)
    else:
        assert re.search(r"Campaign Monitor POST /subscribers/\w+/import\.json: "
                         r"(ConnectionError|ChunkedEncodingError)[^\n]*; retry", logs), logs[-3000:]
