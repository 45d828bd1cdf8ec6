"""The sample warehouse: determinism, anomaly rates, segments, sandbox seed, mutations, CLI."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from airflow_provider_segexport import warehouse as wh

N = 20_000
REFRESHED_AT = "2026-08-01T06:00:00Z"
EMAIL_RE = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
RESERVED_DOMAIN = re.compile(r"(^|\.)(example\.(com|org|net)|example|test)$")
PROFILE_COLUMNS = [
    ("customer_id", "TEXT"), ("email", "TEXT"), ("first_name", "TEXT"), ("last_name", "TEXT"),
    ("phone", "TEXT"), ("city", "TEXT"), ("country", "TEXT"), ("birthday", "TEXT"), ("signup_date", "TEXT"),
    ("lifetime_value", "REAL"), ("loyalty_points", "INTEGER"), ("orders_count", "INTEGER"),
    ("last_order_date", "TEXT"), ("dataverse_contact_id", "TEXT"), ("updated_at", "TEXT"),
]


def db(path) -> sqlite3.Connection:
    return sqlite3.connect(str(path))


def content_hash(path, skip=("segment_refresh_log",)) -> str:
    """SHA-256 over every table's rows in a canonical order."""
    h = hashlib.sha256()
    with db(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        for table in tables:
            if table in skip:
                continue
            ncols = len(conn.execute(f"PRAGMA table_info({table})").fetchall())
            order = ", ".join(str(i) for i in range(1, ncols + 1))
            h.update(table.encode())
            for row in conn.execute(f"SELECT * FROM {table} ORDER BY {order}"):  # noqa: S608
                h.update(repr(row).encode())
    return h.hexdigest()


def normalize(email: str | None) -> str:
    return (email or "").strip(" \t").lower()


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wh") / "warehouse.db"
    wh.build(path, profiles=N, seed=42)
    wh.refresh(path, refreshed_at=REFRESHED_AT)
    return path


@pytest.fixture
def conn(warehouse):
    c = db(warehouse)
    yield c
    c.close()


def anomalies(conn, kind: str) -> dict[str, str]:
    return dict(conn.execute("SELECT customer_id, detail FROM profile_anomalies WHERE anomaly = ?", (kind,)))


# -- determinism ---------------------------------------------------------------------------------

def test_same_arguments_give_identical_contents(tmp_path):
    a, b, c = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "c.db"
    for path, seed in ((a, 7), (b, 7), (c, 8)):
        wh.build(path, profiles=5_000, seed=seed)
        wh.refresh(path, refreshed_at=REFRESHED_AT)
    assert content_hash(a) == content_hash(b)
    assert content_hash(a, skip=()) == content_hash(b, skip=())  # refresh log too, with a fixed time
    assert content_hash(a) != content_hash(c)


def test_small_builds_have_every_destination_state(tmp_path):
    summary = wh.build(tmp_path / "w.db", profiles=2_000)
    assert set(summary["destination_state"]) == {
        "mailchimp:unsubscribed", "mailchimp:cleaned", "mailchimp:archived", "mailchimp:forgotten",
        "campaign_monitor:Unsubscribed", "campaign_monitor:Bounced"}


def test_build_replaces_the_file_and_smaller_builds_are_a_prefix(tmp_path):
    small, large = tmp_path / "small.db", tmp_path / "large.db"
    large.write_text("not a database")
    wh.build(small, profiles=2_000)
    wh.build(large, profiles=5_000)
    with db(small) as s, db(large) as big:
        rows = s.execute("SELECT * FROM profiles ORDER BY customer_id").fetchall()
        assert rows == big.execute("SELECT * FROM profiles ORDER BY customer_id LIMIT 2000").fetchall()
        contacts = s.execute("SELECT * FROM dynamics365_contacts ORDER BY customer_id").fetchall()
        assert contacts == big.execute(
            "SELECT * FROM dynamics365_contacts WHERE customer_id <= 'C0002000' ORDER BY customer_id").fetchall()


def test_contact_guid_is_uuid5():
    assert wh.contact_guid(42, "C0000001") == str(uuid.uuid5(wh.CONTACT_NAMESPACE, "42:C0000001"))


def test_rejects_bad_sizes(tmp_path):
    for n in (0, wh.MAX_PROFILES + 1):
        with pytest.raises(ValueError):
            wh.build(tmp_path / "x.db", profiles=n)


# -- profiles ------------------------------------------------------------------------------------

def test_schema(conn):
    cols = [(r[1], r[2]) for r in conn.execute("PRAGMA table_info(profiles)")]
    assert cols == PROFILE_COLUMNS
    pk = [r[1] for r in conn.execute("PRAGMA table_info(profiles)") if r[5]]
    assert pk == ["customer_id"]
    for table, columns in {
        "destination_state": ["destination", "email", "status"],
        "segment_definitions": ["name", "description", "predicate", "destinations"],
        "segment_members": ["segment_name", "customer_id"],
        "segment_refresh_log": ["segment_name", "refreshed_at", "member_count"],
        "dynamics365_contacts": ["contactid", "email", "first_name", "last_name", "customer_id", "statecode"],
    }.items():
        names = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
        assert names[: len(columns)] == columns, table
    assert conn.execute("SELECT sql FROM sqlite_master WHERE name = 'segment_members'").fetchone()[0].endswith(
        "WITHOUT ROWID")


def test_profile_values(conn):
    rows = conn.execute("SELECT * FROM profiles ORDER BY customer_id").fetchall()
    assert len(rows) == N
    assert rows[0][0] == "C0000001" and rows[-1][0] == f"C{N:07d}"
    countries = set()
    non_ascii = set()
    for (cid, _email, first, last, phone, city, country, birthday, signup, ltv, points, orders, last_order,
         contact, updated_at) in rows:
        countries.add(country)
        assert re.fullmatch(r"[A-Z]{2}", country)
        assert birthday is None or re.fullmatch(r"\d{4}-\d{2}-\d{2}", birthday)
        assert re.fullmatch(r"20\d\d-\d\d-\d\d", signup) and signup < wh.REFERENCE_DATE
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", updated_at) and updated_at[:10] >= signup
        assert (orders == 0) == (last_order is None)
        assert last_order is None or signup <= last_order < wh.REFERENCE_DATE
        assert ltv >= 0 and round(ltv, 2) == ltv and points >= 0
        assert contact == wh.contact_guid(42, cid)
        assert phone is None or re.fullmatch(r"\+[\d \-()]+", phone)
        for text in (first, last, city):
            if not text.isascii():
                non_ascii.add(text)
    assert len(countries) >= 12
    for name in ("José", "Zoë", "Łukasz", "Søren", "Ngọc", "山田", "Müller", "O'Brien"):
        assert name in non_ascii or conn.execute(
            "SELECT 1 FROM profiles WHERE first_name = ? OR last_name = ?", (name, name)).fetchone(), name
    assert conn.execute("SELECT count(DISTINCT dataverse_contact_id) FROM profiles").fetchone()[0] == N


def test_emails_use_reserved_domains_and_are_unique(conn):
    bad = set(anomalies(conn, "invalid_email")) | set(anomalies(conn, "duplicate_email"))
    seen: dict[str, str] = {}
    for cid, email in conn.execute("SELECT customer_id, email FROM profiles"):
        if cid in bad:
            continue
        domain = email.strip().rpartition("@")[2]
        assert RESERVED_DOMAIN.search(domain), email
        assert normalize(email) not in seen, (cid, seen.get(normalize(email)))
        seen[normalize(email)] = cid


def test_anomaly_rates(conn):
    counts = dict(conn.execute("SELECT anomaly, count(*) FROM profile_anomalies GROUP BY anomaly"))
    rate = {k: v / N for k, v in counts.items()}
    assert 0.003 <= rate["invalid_email"] <= 0.005
    assert 0.002 <= rate["duplicate_email"] <= 0.004
    assert 0.004 <= rate["padded_email"] <= 0.006
    assert 0.0005 <= rate["numeric_text"] <= 0.002
    assert counts["long_first_name"] == len(range(wh.LONG_NAME_OFFSET, N + 1, wh.LONG_NAME_EVERY))
    assert counts["non_ascii_email"] == len(range(wh.NON_ASCII_EMAIL_OFFSET, N + 1, wh.NON_ASCII_EMAIL_EVERY))


def test_anomalies_are_what_they_claim(conn):
    email = dict(conn.execute("SELECT customer_id, email FROM profiles"))
    invalid = anomalies(conn, "invalid_email")
    assert set(invalid.values()) == set(wh.INVALID_KINDS)
    for cid, kind in invalid.items():
        value = email[cid]
        assert value is None if kind == "null" else not EMAIL_RE.match(value.strip()), (kind, value)
        assert {"no_at": lambda v: "@" not in v, "two_at": lambda v: v.count("@") == 2,
                "space_inside": lambda v: " " in v.strip(), "trailing_dot": lambda v: v.endswith("."),
                "empty": lambda v: v == "", "null": lambda v: v is None}[kind](value)
    for cid, src in anomalies(conn, "duplicate_email").items():
        assert email[cid] != email[src] and normalize(email[cid]) == normalize(email[src])
    for cid in anomalies(conn, "padded_email"):
        assert email[cid] != email[cid].strip() and EMAIL_RE.match(email[cid].strip())
    for cid in anomalies(conn, "non_ascii_email"):
        local = email[cid].partition("@")[0]
        assert not local.isascii() and email[cid].partition("@")[2].isascii()
    for (first,) in conn.execute(
            "SELECT first_name FROM profiles JOIN profile_anomalies USING (customer_id) "
            "WHERE anomaly = 'long_first_name'"):
        assert len(first) > 255
    for cid, column in anomalies(conn, "numeric_text").items():
        value = conn.execute(f"SELECT {column} FROM profiles WHERE customer_id = ?", (cid,)).fetchone()[0]  # noqa: S608
        assert value in wh._NUMERIC_STRINGS
    # Every other email is valid as stored.
    flagged = set(invalid) | set(anomalies(conn, "padded_email")) | set(anomalies(conn, "non_ascii_email")) \
        | set(anomalies(conn, "duplicate_email"))
    for cid, value in email.items():
        if cid not in flagged:
            assert EMAIL_RE.match(value), value


def test_destination_state(conn):
    valid = N - conn.execute(
        "SELECT count(DISTINCT customer_id) FROM profile_anomalies "
        "WHERE anomaly IN ('invalid_email', 'duplicate_email', 'non_ascii_email')").fetchone()[0]
    counts = {(d, s): n for d, s, n in conn.execute(
        "SELECT destination, status, count(*) FROM destination_state GROUP BY 1, 2")}
    assert set(counts) <= {("mailchimp", s) for s in ("unsubscribed", "cleaned", "archived", "forgotten")} | {
        ("campaign_monitor", s) for s in ("Unsubscribed", "Bounced")}
    assert 0.007 <= counts["mailchimp", "unsubscribed"] / valid <= 0.013
    assert 0.001 <= counts["mailchimp", "cleaned"] / valid <= 0.0035
    assert 0.007 <= counts["campaign_monitor", "Unsubscribed"] / valid <= 0.013
    for destination, status, every, offset in wh.POSITIONAL_STATES:
        positions = len(range(offset, N + 1, every))
        assert counts[destination, status] in (positions, positions - 1), (status, counts[destination, status])
    # Trimmed, valid, ASCII, and each profile's own email.
    for email, stored in conn.execute(
            "SELECT d.email, p.email FROM destination_state d JOIN profiles p USING (customer_id)"):
        assert EMAIL_RE.match(email) and email == stored.strip(" \t")
    assert conn.execute(
        "SELECT count(*) FROM (SELECT destination, lower(email) FROM destination_state GROUP BY 1, 2 "
        "HAVING count(*) > 1)").fetchone()[0] == 0


def test_dynamics365_contacts(conn):
    exists = dict(conn.execute("SELECT contact_exists, count(*) FROM dataverse_contact_exists GROUP BY 1"))
    assert exists[0] + exists[1] == N
    assert 0.01 <= exists[0] / N <= 0.03
    assert conn.execute("SELECT count(*) FROM dynamics365_contacts").fetchone()[0] == exists[1]
    assert conn.execute(
        "SELECT count(*) FROM dynamics365_contacts c JOIN profiles p ON p.dataverse_contact_id = c.contactid "
        "AND p.customer_id = c.customer_id").fetchone()[0] == exists[1]
    assert conn.execute("SELECT max(length(first_name)) FROM dynamics365_contacts").fetchone()[0] <= 50


# -- segments ------------------------------------------------------------------------------------

def test_segment_definitions(conn):
    defs = conn.execute("SELECT name, description, predicate, destinations FROM segment_definitions").fetchall()
    assert 4 <= len(defs) <= 6
    for name, description, predicate, destinations in defs:
        assert re.fullmatch(r"[a-z][a-z0-9_]{2,30}", name)
        assert description
        assert "now" not in predicate.lower() and "random" not in predicate.lower()
        assert set(destinations.split(",")) <= {"mailchimp", "campaign_monitor", "dynamics365"}


def test_segment_membership_matches_predicates(conn):
    sizes = {}
    for name, predicate in conn.execute("SELECT name, predicate FROM segment_definitions").fetchall():
        expected = {r[0] for r in conn.execute(f"SELECT customer_id FROM profiles WHERE {predicate}")}  # noqa: S608
        members = {r[0] for r in conn.execute(
            "SELECT customer_id FROM segment_members WHERE segment_name = ?", (name,))}
        assert members == expected, name
        sizes[name] = len(members) / N
    assert sizes["all_customers"] == 1.0
    assert all(0.05 <= share <= 0.30 for name, share in sizes.items() if name != "all_customers"), sizes
    log = conn.execute("SELECT segment_name, refreshed_at, member_count FROM segment_refresh_log").fetchall()
    assert {(n, REFRESHED_AT, round(s * N)) for n, s in sizes.items()} == set(log)


def test_segment_export_view(conn):
    rows = conn.execute(
        "SELECT * FROM segment_export WHERE segment_name = 'vip_customers' ORDER BY customer_id").fetchall()
    names = [d[0] for d in conn.execute("SELECT * FROM segment_export LIMIT 1").description]
    assert names == ["segment_name"] + [c for c, _ in PROFILE_COLUMNS]
    assert rows and all(r[0] == "vip_customers" and r[names.index("lifetime_value")] >= 750 for r in rows)
    assert [r[1] for r in rows] == sorted(r[1] for r in rows)
    plan = " ".join(r[-1] for r in conn.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM segment_export WHERE segment_name = 'vip_customers' "
        "ORDER BY customer_id"))
    assert "TEMP B-TREE" not in plan  # ordered by the primary key, no sort


def test_refresh_is_repeatable(tmp_path):
    path = tmp_path / "w.db"
    wh.build(path, profiles=3_000)
    first = wh.refresh(path, refreshed_at="2026-08-01T00:00:00Z")
    second = wh.refresh(path)
    assert first == second and first["all_customers"] == 3_000
    with db(path) as conn:
        assert conn.execute("SELECT count(*) FROM segment_refresh_log").fetchone()[0] == 2 * len(first)
        assert conn.execute("SELECT count(*) FROM segment_members").fetchone()[0] == sum(first.values())


def test_refresh_rejects_unusable_segment_names(tmp_path):
    path = tmp_path / "w.db"
    wh.build(path, profiles=500)
    with db(path) as conn:
        conn.execute("INSERT INTO segment_definitions VALUES ('VIP Customers!', '', '1 = 1', 'mailchimp')")
    with pytest.raises(ValueError, match="snake_case"):
        wh.refresh(path)


def test_missing_warehouse(tmp_path):
    with pytest.raises(FileNotFoundError, match="segexport-warehouse build"):
        wh.refresh(tmp_path / "nope.db")


# -- sandbox seed --------------------------------------------------------------------------------

def test_sandbox_seed_format(warehouse, conn, tmp_path):
    seed = wh.sandbox_seed(warehouse)
    assert list(seed) == ["mailchimp", "campaign_monitor", "dynamics365", "adobe_campaign"]
    assert seed["adobe_campaign"]["profiles"] == []  # Campaign starts empty (with the sync's unlink field)
    members = seed["mailchimp"]["members"]
    assert members and all(set(m) == {"email_address", "status", "merge_fields"} for m in members)
    assert {m["status"] for m in members} == {"unsubscribed", "cleaned", "archived", "forgotten"}
    assert all(set(m["merge_fields"]) == {"FNAME", "LNAME"} for m in members)
    subscribers = seed["campaign_monitor"]["subscribers"]
    assert {s["State"] for s in subscribers} == {"Unsubscribed", "Bounced"}
    assert all(set(s) == {"EmailAddress", "Name", "State"} and s["Name"] for s in subscribers)
    contacts = seed["dynamics365"]["contacts"]
    assert len(contacts) == conn.execute("SELECT count(*) FROM dynamics365_contacts").fetchone()[0]
    assert all(set(c) == {"contactid", "emailaddress1", "firstname", "lastname", "statecode"} for c in contacts)
    inactive = [c for c in contacts if c["statecode"] == 1]
    assert inactive and len(inactive) < len(contacts) / 100  # a few deactivated contacts, on purpose
    assert all(uuid.UUID(c["contactid"]).version == 5 for c in contacts[:100])
    dest = {(d, e) for d, e in conn.execute("SELECT destination, email FROM destination_state")}
    assert {("mailchimp", m["email_address"]) for m in members} | {
        ("campaign_monitor", s["EmailAddress"]) for s in subscribers} == dest

    out = tmp_path / "seed.json"
    counts = wh.write_sandbox_seed(warehouse, out)
    assert json.loads(out.read_text(encoding="utf-8")) == seed
    assert counts == {"mailchimp": len(members), "campaign_monitor": len(subscribers),
                      "dynamics365": len(contacts)}


def test_sandbox_loads_the_seed(warehouse):
    from airflow_provider_segexport.sandbox.core import Sandbox

    seed = wh.sandbox_seed(warehouse)
    sandbox = Sandbox(seed=seed, rng_seed=1)
    mc = sandbox.emulators["mailchimp"].state()["audiences"]
    (audience,) = mc.values()
    kept = [m for m in seed["mailchimp"]["members"] if m["status"] != "forgotten"]
    assert len(audience["members"]) == len(kept)
    assert audience["forgotten"] == len(seed["mailchimp"]["members"]) - len(kept)
    if "campaign_monitor" in sandbox.emulators:
        state = json.dumps(sandbox.emulators["campaign_monitor"].state())
        assert seed["campaign_monitor"]["subscribers"][0]["EmailAddress"] in state


# -- mutations -----------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    return dst


def test_mutate(warehouse, tmp_path):
    a, b = _copy(warehouse, tmp_path / "a.db"), _copy(warehouse, tmp_path / "b.db")
    with db(a) as conn:
        before = dict(conn.execute("SELECT customer_id, updated_at FROM profiles"))
        newest = max(before.values())
    result = wh.mutate(a, change_fraction=0.01, remove_fraction=0.005, seed=3)
    assert result["mutation"] == 1
    assert result["changed"] == len(result["changed_ids"]) == round(N * 0.01)
    assert result["left_segment"] == len(result["left_ids"]) == round(N * 0.005)
    assert not set(result["changed_ids"]) & set(result["left_ids"])
    assert result["updated_at"] > newest
    with db(a) as conn:
        after = dict(conn.execute("SELECT customer_id, updated_at FROM profiles"))
        touched = {cid for cid in after if after[cid] != before[cid]}
        assert touched == set(result["changed_ids"]) | set(result["left_ids"])
        log = conn.execute("SELECT kind, count(*) FROM profile_changes WHERE mutation = 1 GROUP BY kind").fetchall()
        assert dict(log) == {"changed": result["changed"], "left_segment": result["left_segment"]}
        left = conn.execute("SELECT customer_id, detail FROM profile_changes WHERE kind = 'left_segment'").fetchall()
    counts = wh.refresh(a, refreshed_at=REFRESHED_AT)
    with db(a) as conn:
        for cid, segment in left:
            assert not conn.execute("SELECT 1 FROM segment_members WHERE segment_name = ? AND customer_id = ?",
                                    (segment, cid)).fetchone()
    with db(warehouse) as conn:
        old = dict(conn.execute("SELECT segment_name, count(*) FROM segment_members GROUP BY 1"))
    assert counts["all_customers"] == old["all_customers"]
    assert sum(old[s] - counts[s] for s in old) >= result["left_segment"] * 0.5

    # Deterministic, and the next mutation touches other profiles.
    again = wh.mutate(b, change_fraction=0.01, remove_fraction=0.005, seed=3, refresh_segments=True)
    assert again["changed_ids"] == result["changed_ids"] and again["left_ids"] == result["left_ids"]
    assert again["segments"] == counts
    assert content_hash(a) == content_hash(b)
    second = wh.mutate(b, change_fraction=0.01, remove_fraction=0.0, seed=3)
    assert second["mutation"] == 2 and second["updated_at"] > again["updated_at"]
    assert len(set(second["changed_ids"]) & set(again["changed_ids"])) < 20


def test_mutate_rejects_bad_fractions(warehouse):
    with pytest.raises(ValueError):
        wh.mutate(warehouse, change_fraction=0.8, remove_fraction=0.5)


# -- CLI -----------------------------------------------------------------------------------------

def _run(*args: str, script: bool = False) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("segexport-warehouse")
    cmd = [str(exe), *args] if script else [sys.executable, "-m", "airflow_provider_segexport.warehouse", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_cli(tmp_path):
    path, seed_file = tmp_path / "w.db", tmp_path / "seed.json"
    r = _run("build", "--path", str(path), "--profiles", "3000", "--seed", "5", "--sandbox-seed", str(seed_file))
    assert r.returncode == 0, r.stderr
    assert "3,000 profiles" in r.stdout and "invalid_email" in r.stdout and "vip_customers" in r.stdout
    assert json.loads(seed_file.read_text(encoding="utf-8")) == wh.sandbox_seed(path)

    script = Path(sys.executable).with_name("segexport-warehouse").exists()
    r = _run("refresh", "--path", str(path), script=script)
    assert r.returncode == 0 and "all_customers 3,000" in r.stdout, r.stderr
    r = _run("seed", "--path", str(path), "--out", str(tmp_path / "again.json"), script=script)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again.json").read_bytes() == seed_file.read_bytes()
    r = _run("mutate", "--path", str(path), "--change-fraction", "0.02", "--remove-fraction", "0.01", "--refresh",
             script=script)
    assert r.returncode == 0 and "60 profiles changed, 30 left a segment" in r.stdout, r.stdout + r.stderr
    r = _run("summary", "--path", str(path), script=script)
    assert r.returncode == 0 and "3,000 profiles" in r.stdout

    r = _run("refresh", "--path", str(tmp_path / "missing.db"))
    assert r.returncode == 1 and "no warehouse" in r.stderr
    r = _run("build", "--path", str(path), "--profiles", "0")
    assert r.returncode == 1 and "profiles must be" in r.stderr


# -- scale ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_200k_profiles(tmp_path):
    path = tmp_path / "w.db"
    started = time.perf_counter()
    summary = wh.build(path, profiles=200_000)
    counts = wh.refresh(path)
    elapsed = time.perf_counter() - started
    assert elapsed < 60, f"200,000 profiles took {elapsed:.1f} s"  # ~8 s on 2 cores
    n = 200_000
    assert summary["profiles"] == n and counts["all_customers"] == n
    assert 0.0035 <= summary["anomalies"]["invalid_email"] / n <= 0.0045
    assert 0.0025 <= summary["anomalies"]["duplicate_email"] / n <= 0.0035
    assert 0.0045 <= summary["anomalies"]["padded_email"] / n <= 0.0055
    with db(path) as conn:
        dup = conn.execute("""
            SELECT count(*) FROM (
                SELECT lower(trim(email, ' ' || char(9))) AS e FROM profiles
                WHERE email IS NOT NULL AND customer_id NOT IN (
                    SELECT customer_id FROM profile_anomalies WHERE anomaly IN ('invalid_email', 'duplicate_email'))
                GROUP BY e HAVING count(*) > 1)""").fetchone()[0]
    assert dup == 0
