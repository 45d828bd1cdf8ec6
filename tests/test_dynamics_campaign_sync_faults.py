"""The Dynamics 365 -> Adobe Campaign sync under injected faults (issue #22, the fault check): real runs of the
example DAG (dag.test(), both tables) against both emulators over HTTPS, no mocking.

A clean run gives the reference: Campaign's profiles by ``cusCrmId`` (their fields) and loyalty-card rows by
``cusCardId`` (their fields and the ``cusCrmId`` of the profile they are linked to), PKeys and timestamps left
out. Each case starts from a fresh seed, injects its faults and must end the same way: the DAG run succeeds,
Campaign holds exactly the reference, no ``cusCrmId`` or ``cusCardId`` is on two records (nothing created
twice, even when Campaign processed a create whose answer was lost), and each table's summary accounts for
every row as the clean run's does.

Campaign is read from the emulator itself (every profile, by its id): the admin API's state is keyed by email,
which would fold two profiles of one contact into one.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from airflow_provider_segexport import warehouse
from tests.conftest import SandboxClient, connect_sync, refreshed_warehouse, run_dag
from tests.test_dynamics_campaign_sync import DAG_ID
from tests.test_faults import retry_delays

PROFILES = 400
TABLES = ("sync_contacts", "sync_loyalty_cards")
ACS = "adobe_campaign"
DV = "dynamics365"
#: Dataverse pages of 100 rows: the contacts are read in several pages (faults hit some of them)
PAGE = 100
#: the contacts sync's reads of profiles: the count, then the pages of the whole table (a first sync reads it once
#: instead of one lookup a contact), the lookups by key
PROFILE_READS = {"vendor": ACS, "method": "GET", "path_contains": "/profileAndServicesExt/profile"}
PROFILE_CREATES = {"vendor": ACS, "method": "POST", "path_contains": "/profileAndServicesExt/profile"}
CARD_CREATES = {"vendor": ACS, "method": "POST", "path_contains": "/profileAndServicesExt/cusLoyaltyCard"}
CONTACT_PAGES = {"vendor": DV, "method": "GET", "path_contains": "/contacts"}


# -- set-up -------------------------------------------------------------------------------------------------

def connect(sandbox: SandboxClient, wh_path, mp: pytest.MonkeyPatch, state_dir) -> None:
    """Seed both emulators from the warehouse, point the two connections at them, a state directory of its own,
    Dataverse pages of PAGE rows, an empty request log."""
    sandbox.session.post(f"{sandbox.admin}/seed", json=warehouse.sandbox_seed(wh_path), timeout=120).raise_for_status()
    connect_sync(sandbox, mp)  # the opt-out task writes to Dataverse; the DAG's email events task reads the journal
    mp.setenv("SEGEXPORT_STATE_DIR", str(state_dir))
    sandbox.session.post(f"{sandbox.admin}/{DV}/config", json={"max_page_size": PAGE}, timeout=10).raise_for_status()
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30).raise_for_status()


def campaign(sandbox: SandboxClient) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Every Campaign profile by its cusCrmId and every loyalty-card row by its cusCardId (a list: two records
    with one key would be a duplicate), without PKeys and timestamps; a row's link as its profile's cusCrmId."""
    em = sandbox.server.sandbox.emulators[ACS]
    volatile = ("PKey", "href", "created", "lastModified")
    crm_of: dict[int, str | None] = {}
    profiles: dict[str, list[dict]] = defaultdict(list)
    for pid, p in list(em.profiles.items()):
        fields = {k: v for k, v in em._fields(p, ext=True).items() if k not in volatile}
        crm_of[pid] = fields.get("cusCrmId")
        profiles[fields.get("cusCrmId")].append(fields)
    rows: dict[str, list[dict]] = defaultdict(list)
    for rec in list(em.rows["cusLoyaltyCard"].values()):
        row = {k: v for k, v in rec.items() if k not in volatile and k != "@link"}
        row["profile"] = crm_of[rec["@link"]] if rec.get("@link") is not None else None
        rows[rec.get("cusCardId")].append(row)
    return dict(profiles), dict(rows)


def flat(records: dict[str, list[dict]]) -> dict[str, dict]:
    return {k: v[0] for k, v in records.items()}


def run(conf: dict | None = None) -> tuple[str, dict]:
    return run_dag(DAG_ID, conf or {}, bundle="dags", retries=0)


@pytest.fixture(scope="module")
def wh_path(tmp_path_factory):
    return refreshed_warehouse(tmp_path_factory.mktemp("dcs-faults-wh") / "warehouse.db", PROFILES)


@pytest.fixture(scope="module")
def baseline(sandbox_server, airflow_db, wh_path, tmp_path_factory):
    """A clean run of the example DAG: Campaign's profiles and card rows, and each table's summary."""
    client = SandboxClient(sandbox_server)
    client.reset()
    client.latency(0, 0)
    with pytest.MonkeyPatch.context() as mp:
        connect(client, wh_path, mp, tmp_path_factory.mktemp("dcs-baseline-state"))
        state, xcom = run()
        profiles, rows = campaign(client)
    assert state == "success"
    client.session.post(f"{client.admin}/seed", json=sandbox_server.initial_seed, timeout=60).raise_for_status()
    client.reset()
    return {"profiles": profiles, "cards": rows, "summary": {t: xcom[t] for t in TABLES}}


@pytest.fixture
def fresh(sandbox, wh_path, baseline, monkeypatch, tmp_path):
    """A fresh seed (what the clean run started from), the connections, a state directory of the test's own."""
    connect(sandbox, wh_path, monkeypatch, tmp_path / "state")
    return sandbox


# -- the checks every case ends with ------------------------------------------------------------------------

def assert_no_duplicates(profiles: dict[str, list[dict]], rows: dict[str, list[dict]]) -> None:
    twice = {k: len(v) for k, v in profiles.items() if len(v) > 1}
    assert not twice, f"{len(twice)} contact(s) have more than one Campaign profile: {twice}"
    twice = {k: len(v) for k, v in rows.items() if len(v) > 1}
    assert not twice, f"{len(twice)} card(s) have more than one Campaign row: {twice}"


def assert_every_row_accounted_for(summary: dict, clean: dict) -> None:
    t, c = summary["totals"], clean["totals"]
    assert t["rows"] == c["rows"]
    assert t["rows"] == t["created"] + t["updated"] + t["unchanged"] + t["skipped"] + t["rejected"], t
    assert t["not_sent"] == 0 and t["planned"] == 0 and t["not_in_plan"] == 0, t
    # every record ends as it did in the clean run (a record whose create answer was lost is still "created")
    assert {k: t[k] for k in ("created", "updated", "unchanged", "rejected", "removed")} == \
           {k: c[k] for k in ("created", "updated", "unchanged", "rejected", "removed")}
    assert summary["rejects"]["count"] == t["rejected"]
    assert summary["rejects"]["by_reason"] == clean["rejects"]["by_reason"]


def failure(logs: str) -> str:
    """What a failed task said (its exception's last lines), else the log's tail."""
    i = logs.find("Task failed with exception")
    if i < 0:
        return logs[-3000:]
    block = logs[i:].splitlines()[1:]
    end = next((n for n, line in enumerate(block) if line[:2] == "20" or line.startswith("INFO")), len(block))
    return "\n".join(line for line in block[:end] if line and not line.startswith(" "))[-3000:]


def assert_same_end_state_as_clean_run(sandbox, baseline, state: str, xcom: dict, logs: str) -> None:
    assert state == "success", failure(logs)
    assert set(TABLES) <= set(xcom), xcom.keys()
    profiles, rows = campaign(sandbox)
    assert_no_duplicates(profiles, rows)
    want_p, want_r = flat(baseline["profiles"]), flat(baseline["cards"])
    got_p, got_r = flat(profiles), flat(rows)
    assert set(got_p) == set(want_p), f"{len(set(got_p) ^ set(want_p))} profile(s) differ from the clean run's"
    differ = [k for k in want_p if got_p[k] != want_p[k]]
    assert not differ, f"{len(differ)} profile(s) differ, e.g. {got_p[differ[0]]} != {want_p[differ[0]]}"
    assert got_r == want_r, f"{sum(1 for k in set(got_r) | set(want_r) if got_r.get(k) != want_r.get(k))} card " \
                            "row(s) differ from the clean run's"
    for table in TABLES:
        assert_every_row_accounted_for(xcom[table], baseline["summary"][table])


def faults_left(sandbox) -> list[dict]:
    return sandbox.session.get(f"{sandbox.admin}/faults", timeout=10).json()["faults"]


def http_total(xcom: dict, key: str) -> int:
    return sum(xcom[t]["http"].get(key, 0) for t in TABLES)


def test_clean_run_is_the_reference(baseline):
    """The reference is itself a whole sync: several hundred profiles, each contact once, and card rows linked
    to their contacts' profiles."""
    profiles, rows = baseline["profiles"], baseline["cards"]
    assert_no_duplicates(profiles, rows)
    contacts = baseline["summary"]["sync_contacts"]["totals"]
    assert len(profiles) == contacts["created"] > 100
    assert rows and all(r[0]["profile"] in profiles for r in rows.values())
    cards = baseline["summary"]["sync_loyalty_cards"]["totals"]
    assert len(rows) == cards["created"]
    for table in TABLES:
        t = baseline["summary"][table]["totals"]
        assert t["rows"] == t["created"] + t["updated"] + t["unchanged"] + t["skipped"] + t["rejected"], t


# -- the cases ----------------------------------------------------------------------------------------------

CASES = {
    # the ACS gateway throttles finds and creates: 429 {"error_code": "429050", "message": "Too many requests"}
    # (no Retry-After by default: its presence is unverified; a proxy may add one, which is honoured)
    "acs_429_bursts_with_retry_after": [dict(kind="burst429", count=4, skip=1, retry_after=1, **PROFILE_READS),
                                        dict(kind="burst429", count=4, skip=20, retry_after=1, **PROFILE_CREATES)],
    "acs_429_bursts_without_retry_after": [dict(kind="burst429", count=6, skip=1, **PROFILE_READS),
                                           dict(kind="burst429", count=6, skip=20, **PROFILE_CREATES),
                                           dict(kind="burst429", count=3, skip=5, **CARD_CREATES)],
    # Dataverse answers 503 on contact pages (the count's read and the rows' read)
    "dataverse_503_on_contact_pages": [dict(kind="status", status=503, count=2, skip=1, **CONTACT_PAGES),
                                       dict(kind="status", status=503, count=2, skip=5, **CONTACT_PAGES)],
    # Campaign created the profile (or the card row) but its answer was lost: cut connections, a gateway 502
    "acs_create_answers_lost": [dict(kind="drop", after=True, count=3, skip=10, **PROFILE_CREATES),
                                dict(kind="status", status=502, after=True, count=2, skip=40, **PROFILE_CREATES),
                                dict(kind="drop", after=True, count=2, skip=10, **CARD_CREATES)],
    # connections reset before the call reached Campaign (creates and finds) or Dataverse
    "connections_reset_before_processing": [dict(kind="drop", count=3, skip=10, **PROFILE_CREATES),
                                            dict(kind="drop", count=3, skip=1, **PROFILE_READS),
                                            dict(kind="drop", count=2, skip=5, **CARD_CREATES),
                                            dict(kind="drop", count=1, skip=2, **CONTACT_PAGES)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_faults_end_in_the_clean_runs_campaign(case, airflow_db, fresh, baseline, task_log):
    """Each case's faults are all hit, the run succeeds and Campaign ends as after the clean run, nothing twice;
    what each fault looks like in the log (the gateway's words, Retry-After honoured, a create found before it
    would have been repeated, a create repeated after a reset that it did not survive)."""
    sandbox = fresh
    sandbox.latency(base_ms=5)  # calls overlap: faults hit calls in flight
    rules = CASES[case]
    for rule in rules:
        sandbox.fault(**rule)
    state, xcom = run()
    logs = task_log()
    assert_same_end_state_as_clean_run(sandbox, baseline, state, xcom, logs)
    assert not faults_left(sandbox), "faults not all hit"
    log = sandbox.server.sandbox.log
    if case.startswith("acs_429"):
        throttled = sum(r["count"] for r in rules)
        assert http_total(xcom, "throttled") >= throttled
        delays = retry_delays(logs, 429)
        assert len(delays) >= throttled, delays
        assert "HTTP 429 Too many requests" in logs  # the gateway's own words
        if rules[0].get("retry_after"):
            assert min(delays) >= rules[0]["retry_after"], delays
    elif case.startswith("dataverse_503"):
        assert len(retry_delays(logs, 503)) >= sum(r["count"] for r in rules), logs[-3000:]
    elif case == "acs_create_answers_lost":
        lost = log.unanswered_of(ACS)  # the profiles created without an answer, by email
        assert sum(lost.values()) == 5
        emails = [p.email.lower() for p in sandbox.server.sandbox.emulators[ACS].profiles.values() if p.email]
        assert all(emails.count(e) == 1 for e in lost), lost  # each found, not created again
        assert logs.count("the record exists: not created again") >= 7  # 5 profiles, 2 card rows
    else:
        assert "ConnectionError" in logs or "ChunkedEncodingError" in logs, logs[-3000:]
        # a create cut before it reached Campaign: looked for, not found, created again
        assert logs.count("the record does not exist: creating it again") >= 5


def test_tokens_of_both_expiring_mid_run(airflow_db, fresh, baseline, task_log):
    """IMS and Entra ID tokens that live a second, 40 ms calls and Dataverse pages of 10 rows: each task outlives
    several tokens of each. The Campaign hook renews its IMS token before it expires; the Dataverse hook meets
    the expired token (401 between two pages of one read), gets a new one and repeats only that call. Nothing
    is lost or done twice."""
    sandbox = fresh
    sandbox.latency(base_ms=40)
    sandbox.session.post(f"{sandbox.admin}/{DV}/config", json={"max_page_size": 10}, timeout=10).raise_for_status()
    sandbox.session.post(f"{sandbox.admin}/token-ttl", json={"seconds": 1}, timeout=10).raise_for_status()
    state, xcom = run()
    logs = task_log()
    assert_same_end_state_as_clean_run(sandbox, baseline, state, xcom, logs)
    counts = sandbox.requests()["counts"]
    tasks = len(xcom)  # each task's hooks fetch their first tokens
    assert xcom["sync_contacts"]["duration_s"] > 2  # the contacts' task outlived its first tokens
    assert counts.get(f"{ACS} POST ims-token", 0) > tasks, counts
    assert counts.get(f"{DV} POST token", 0) > tasks, counts
    assert "Dataverse: access token refreshed after 401" in logs
