"""Bad input, end to end: a small SQLite table of crafted rows exported by a real DAG run (dag.test()) to the
sandbox's Mailchimp, and the inputs that must stop an export before anything is sent.

For every crafted row the test knows the outcome: either a reject with a given reason code (and a message
that says what is wrong) in the rejects file, or a member in the audience with exactly the given merge
fields. Inputs that cannot be exported at all (a mapping naming a missing column, a SQL error, an export
over Mailchimp's 1,000,000-profile limit, an unknown audience, a wrong API key) fail the task before the
first member is sent, with a message that says what to fix.

Row-level validation without a destination is unit-tested in ``tests/test_records.py``; the Mailchimp
type conversions are unit-tested at the end of this file.
"""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import date, datetime

import pytest

from airflow_provider_segexport.destinations.mailchimp import convert_merge_value
from airflow_provider_segexport.export import records as R
from tests.conftest import run_dag
from tests.test_mailchimp_export import audience

SQL = "SELECT * FROM people WHERE segment_name = {segment} ORDER BY row_no"
MERGE = {"POINTS": "points", "BIRTHDAY": "birthday", "NOTE": "note", "SINCE": "since"}
LONG_255 = "L" * 255

# (customer_id, email, first_name, last_name, points, birthday, note, since,
#  expected: a reject reason, or the member's merge fields at Mailchimp)
A = [
    ("C01", "ann@example.com", "Ann", "Lee", 10, "1990-05-17", "ok", "2024-01-02",
     {"FNAME": "Ann", "LNAME": "Lee", "POINTS": 10, "BIRTHDAY": "05/17", "NOTE": "ok", "SINCE": "02/01/2024"}),
    ("C02", " \tbob@example.com  ", "Bob", "Ray", "7", None, "ok", None,  # padded: trimmed, valid
     {"FNAME": "Bob", "LNAME": "Ray", "POINTS": 7, "NOTE": "ok"}),
    ("C03", "Carol.Mixed@Example.COM", "Carol", "Ng", None, None, "ok", None,
     {"FNAME": "Carol", "LNAME": "Ng", "NOTE": "ok"}),
    ("C04", "  carol.mixed@example.com ", "Caroline", "Ng", None, None, "ok", None, R.DUPLICATE),  # same, other case
    ("C05", "zoë@example.com", "Zoë", "Ñúñez", None, None, "ok", None, R.INVALID_EMAIL),  # non-ASCII local part
    ("C06", "jose@exämple.com", "José", "García", None, None, "ok", None, R.INVALID_EMAIL),  # non-ASCII domain
    ("C07", "not-an-email", "Nat", "Mail", None, None, "ok", None, R.INVALID_EMAIL),
    ("C08", "two@@example.com", "Two", "At", None, None, "ok", None, R.INVALID_EMAIL),
    ("C09", "dot@example.com.", "Dot", "Trail", None, None, "ok", None, R.INVALID_EMAIL),
    ("C10", "a" * 250 + "@example.com", "Long", "Mail", None, None, "ok", None, R.INVALID_EMAIL),
    ("C11", None, "Null", "Mail", None, None, "ok", None, R.MISSING_EMAIL),
    ("C12", "", "Empty", "Mail", None, None, "ok", None, R.MISSING_EMAIL),
    ("C13", "   ", "Blank", "Mail", None, None, "ok", None, R.MISSING_EMAIL),
    (None, "nokey@example.com", "No", "Key", None, None, "ok", None, R.MISSING_KEY),
    ("C15", "long@example.com", "F" * 256, "Name", None, None, "ok", None, R.TOO_LONG),  # FNAME: 255 at most
    ("C16", "edge@example.com", LONG_255, "Name", None, None, "ok", None,  # exactly 255: fine
     {"FNAME": LONG_255, "LNAME": "Name", "NOTE": "ok"}),
    ("C17", "nonames@example.com", None, None, None, None, "ok", None, {"NOTE": "ok"}),  # NULL names: omitted
    ("C18", "intl@example.com", "Zoë Łukasz", "山田 Müller-O'Brien", None, None, "ok", None,
     {"FNAME": "Zoë Łukasz", "LNAME": "山田 Müller-O'Brien", "NOTE": "ok"}),
    ("C19", "int.lname@example.com", "Int", 12345, None, None, "ok", None,  # an integer in a text field
     {"FNAME": "Int", "LNAME": "12345", "NOTE": "ok"}),
    ("C20", "date.lname@example.com", "Date", "2024-01-02", None, None, "ok", None,  # a date in a text field
     {"FNAME": "Date", "LNAME": "2024-01-02", "NOTE": "ok"}),
    ("C21", "text.points@example.com", "Text", "Points", "abc", None, "ok", None, R.INVALID_VALUE),  # NUMBER
    ("C22", "comma.points@example.com", "Comma", "Points", "1,234", None, "ok", None,
     {"FNAME": "Comma", "LNAME": "Points", "POINTS": 1234, "NOTE": "ok"}),
    ("C23", "real.points@example.com", "Real", "Points", 12.5, None, "ok", None,
     {"FNAME": "Real", "LNAME": "Points", "POINTS": 12.5, "NOTE": "ok"}),
    ("C24", "bad.birthday@example.com", "Bad", "Birthday", None, "1990-02-30", "ok", None, R.INVALID_VALUE),
    ("C25", "word.birthday@example.com", "Word", "Birthday", None, "next tuesday", "ok", None, R.INVALID_VALUE),
    ("C26", "bad.since@example.com", "Bad", "Since", None, None, "ok", 20240102, R.INVALID_VALUE),  # int date
    ("C27", "no.note@example.com", "No", "Note", None, None, None, None, R.MISSING_VALUE),  # NOTE is required
    ("C28", "blank.note@example.com", "Blank", "Note", None, None, "   ", None, R.MISSING_VALUE),
    ("C01", "ann@example.com", "Ann", "Lee", 10, "1990-05-17", "ok", "2024-01-02", R.DUPLICATE),  # twice here
]
# Segment b: C01 again is the same member with a second tag; another customer with Ann's email is not.
B = [
    ("C01", "ANN@example.com", "Ann", "Lee", 10, "1990-05-17", "ok", "2024-01-02", "tag"),
    ("C30", " Ann@Example.com", "Anne", "Other", None, None, "ok", None, R.DUPLICATE),
    ("C31", "dave@example.org", "Dave", "Bo", 0, "1985-12-01", "ok", "2023-12-31",
     {"FNAME": "Dave", "LNAME": "Bo", "POINTS": 0, "BIRTHDAY": "12/01", "NOTE": "ok", "SINCE": "31/12/2023"}),
]
SEGMENTS = {"crafted_a": A, "crafted_b": B}


@pytest.fixture(scope="module")
def bad_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "bad.db"
    db = sqlite3.connect(path)
    # No declared types: SQLite keeps each value's own type (text in a number column, integers in text).
    db.execute("CREATE TABLE people (row_no, segment_name, customer_id, email, first_name, last_name, points, "
               "birthday, note, since)")
    n = 0
    for seg, rows in SEGMENTS.items():
        for r in rows:
            n += 1
            db.execute("INSERT INTO people VALUES (?,?,?,?,?,?,?,?,?,?)", (n, seg, *r[:8]))
    # 1,000,001 generated profiles, never stored: Mailchimp's per-export limit is checked on the count
    db.execute("CREATE VIEW big AS WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
               "WHERE i < 1000001) SELECT printf('B%07d', i) AS customer_id, 'big' || i || '@example.com' AS email, "
               "'Big' AS first_name, 'Row' AS last_name FROM n")
    db.commit()
    db.close()
    return path


@pytest.fixture
def crafted(bad_db, monkeypatch, sandbox, mailchimp_conn):
    """The ``warehouse`` connection on the crafted table; an empty audience with the merge fields the mapping uses."""
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(bad_db)}))
    sandbox.session.post(f"{sandbox.admin}/seed", json={}, timeout=30).raise_for_status()  # an empty audience
    for body in ({"tag": "POINTS", "name": "Points", "type": "number"},
                 {"tag": "NOTE", "name": "Note", "type": "text", "required": True},
                 {"tag": "SINCE", "name": "Customer since", "type": "date", "options": {"date_format": "DD/MM/YYYY"}}):
        mailchimp_api(sandbox, "POST", "/lists/{aud}/merge-fields", json=body)
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30).raise_for_status()
    return bad_db


def mailchimp_api(sandbox, method: str, path: str, **kw):
    mc = sandbox.info["mailchimp"]
    r = sandbox.session.request(method, mc["base_url"] + path.format(aud=mc["audience_id"]),
                                auth=("anystring", mc["api_key"]), timeout=30, **kw)
    r.raise_for_status()
    return r.json()


def conf(sandbox, tmp_path, segments=("crafted_a", "crafted_b"), **kw):
    return {"audience_id": sandbox.info["mailchimp"]["audience_id"], "segments": list(segments), "sql": SQL,
            "merge_fields": MERGE, "state_dir": str(tmp_path / "state"), **kw}


def member_posts(sandbox) -> dict:
    return {k: v for k, v in sandbox.requests()["counts"].items() if k.startswith("mailchimp POST")}


# -- the crafted rows, end to end ----------------------------------------------------------------------

def test_each_bad_row_is_a_reject_with_its_reason_and_every_valid_row_arrives(airflow_db, crafted, sandbox,
                                                                              tmp_path, task_log):
    state, xcom = run_dag("mailchimp_export_test", conf(sandbox, tmp_path))
    logs = task_log()
    assert state == "success", logs[-3000:]
    summary = xcom["export"]

    want_rejects, want_members = {}, {}
    for seg, rows in SEGMENTS.items():
        for n, r in enumerate(rows, start=1):
            if isinstance(r[8], str) and r[8] != "tag":
                want_rejects[(seg, n)] = (r[0], r[8])
            elif isinstance(r[8], dict):
                want_members[r[1].strip().lower()] = (r[8], {seg})
    want_members["ann@example.com"][1].add("crafted_b")  # C01 is in both segments

    lines = [json.loads(x) for x in open(summary["rejects"]["path"].removeprefix("file://"), encoding="utf-8")]
    got_rejects = {(r["segment"], r["row"]): (r["key"], r["reason"]) for r in lines}
    assert got_rejects == want_rejects
    by_key = {r["key"]: r for r in lines if r["segment"] == "crafted_a"}
    # the message says what is wrong, naming the field (and never echoing the profile)
    assert "non-ASCII" in by_key["C05"]["message"] and "non-ASCII" in by_key["C06"]["message"]
    assert "exactly one @" in by_key["C08"]["message"] and "longer than 254" in by_key["C10"]["message"]
    assert by_key["C15"]["field"] == "FNAME" and "256 characters" in by_key["C15"]["message"] \
        and "at most 255" in by_key["C15"]["message"]
    assert by_key["C21"]["field"] == "POINTS" and "'abc' is not a number" in by_key["C21"]["message"]
    assert by_key["C24"]["field"] == "BIRTHDAY" and "is not a date" in by_key["C24"]["message"]
    assert by_key["C26"]["field"] == "SINCE"
    assert by_key["C27"]["field"] == "NOTE" and "required" in by_key["C27"]["message"]
    assert by_key[None]["reason"] == R.MISSING_KEY and "customer_id" in by_key[None]["message"]
    assert "another customer" in got_dup_message(lines, "crafted_b", "C30")
    assert not any(r.get("vendor_message") for r in lines)  # all caught before sending: Mailchimp refused none

    got = audience(sandbox)
    assert set(got) == set(want_members)  # nothing valid lost, nothing invalid sent
    for email, (fields, tags) in want_members.items():
        assert got[email]["merge_fields"] == fields, email
        assert set(got[email]["tags"]) == tags and got[email]["status"] == "subscribed"
    assert "bob@example.com" in {e for e in sandbox.state("mailchimp")["audiences"][
        sandbox.info["mailchimp"]["audience_id"]]["members"]}  # stored trimmed

    t = summary["totals"]
    assert t["rows"] == len(A) + len(B)
    assert t["rows"] == t["created"] + t["updated"] + t["unchanged"] + t["skipped"] + t["rejected"]
    assert t["rejected"] == len(want_rejects) and t["not_sent"] == 0
    assert summary["rejects"]["by_reason"] == dict(_count(r for _, r in want_rejects.values()))
    # the task log tells where the rejects are and how many of each reason, without a single email
    assert f"{len(want_rejects)} row(s) rejected" in logs and summary["rejects"]["path"] in logs
    assert not re.search(r"[\w.+-]+@[\w-]+\.(com|org)", logs.replace("owner@sandbox.example", ""))


def got_dup_message(lines, seg, key) -> str:
    (r,) = [r for r in lines if r["segment"] == seg and r["key"] == key]
    assert r["reason"] == R.DUPLICATE
    return r["message"]


def _count(items):
    from collections import Counter

    return Counter(items)


def test_not_a_finite_number_is_a_reject_not_an_erased_field(airflow_db, crafted, sandbox, tmp_path):
    db = sqlite3.connect(crafted)
    db.executemany("INSERT INTO people (row_no, segment_name, customer_id, email, first_name, last_name, points, "
                   "note) VALUES (?, 'nan', ?, ?, 'N', 'N', ?, 'ok')",
                   [(1001, "N1", "nan@example.com", "NaN"), (1002, "N2", "inf@example.com", "inf"),
                    (1003, "N3", "huge@example.com", "1e999"), (1004, "N4", "fine@example.com", "42")])
    db.commit()
    try:
        state, xcom = run_dag("mailchimp_export_test", conf(sandbox, tmp_path, segments=["nan"]))
    finally:
        db.execute("DELETE FROM people WHERE segment_name = 'nan'")
        db.commit()
    assert state == "success"
    got = audience(sandbox)
    assert got["fine@example.com"]["merge_fields"]["POINTS"] == 42
    assert xcom["export"]["rejects"]["by_reason"] == {R.INVALID_VALUE: 3}
    assert not {"nan@example.com", "inf@example.com", "huge@example.com"} & set(got)


# -- inputs that stop the export before anything is sent -----------------------------------------------

def assert_fails_before_sending(sandbox, task_log, run_conf, *phrases):
    state, xcom = run_dag("mailchimp_export_test", run_conf)
    logs = task_log()
    assert state == "failed" and "export" not in xcom
    assert not member_posts(sandbox), member_posts(sandbox)
    assert "mailchimp batch-subscribe" not in sandbox.requests()["items_by_route"]
    for phrase in phrases:
        assert phrase in logs, (phrase, logs[-4000:])
    return logs


def test_a_mapping_naming_a_missing_column_names_the_columns_that_exist(airflow_db, crafted, sandbox, tmp_path,
                                                                          task_log):
    assert_fails_before_sending(
        sandbox, task_log, conf(sandbox, tmp_path, merge_fields={**MERGE, "POINTS": "loyalty_points"}),
        "has no column 'loyalty_points'", "{'POINTS': 'loyalty_points'}",
        "Its columns are: birthday, customer_id, email, first_name", "Fix the mapping or the query")


@pytest.mark.parametrize(("sql", "words"), [
    ("SELECT * FROM no_such_table WHERE segment_name = {segment}", "no such table: no_such_table"),
    ("SELEC * FROM people WHERE segment_name = {segment}", "syntax error"),
], ids=["unknown_table", "syntax_error"])
def test_a_sql_error_names_the_connection_the_error_and_the_query(sql, words, airflow_db, crafted, sandbox, tmp_path,
                                                                   task_log):
    assert_fails_before_sending(sandbox, task_log, conf(sandbox, tmp_path, sql=sql),
                                "SQL query on connection 'warehouse' failed", words, ". SQL: ",
                                sql.replace("{segment}", "'crafted_a'"))


def test_a_merge_field_the_audience_lacks_is_named_with_the_fix(airflow_db, crafted, sandbox, tmp_path, task_log):
    assert_fails_before_sending(sandbox, task_log, conf(sandbox, tmp_path, merge_fields={**MERGE, "TIER": "note"}),
                                "has no merge field(s) ['TIER']", "create_missing_merge_fields=True",
                                "Audience > Settings > Audience fields")


BIG = "SELECT * FROM big"


@pytest.mark.parametrize(("segments", "words"), [
    ([{"name": "big", "sql": BIG}], "This export has 1,000,001 profiles (big: 1,000,001)"),
    ([{"name": "big_a", "sql": BIG + " LIMIT 600000"}, {"name": "big_b", "sql": BIG + " LIMIT 400001"}],
     "This export has 1,000,001 profiles (big_a: 600,000, big_b: 400,001)"),  # segments count together
], ids=["one_segment", "two_segments_together"])
def test_an_export_over_mailchimps_limit_is_refused_before_sending(segments, words, airflow_db, crafted, sandbox,
                                                                   tmp_path, task_log):
    assert_fails_before_sending(sandbox, task_log, conf(sandbox, tmp_path, segments=segments, merge_fields={}),
                                words, "Mailchimp accepts at most 1,000,000 per export", "Nothing was sent")


def test_exactly_the_limit_is_not_refused(airflow_db, crafted, sandbox, tmp_path, task_log):
    """1,000,000 profiles pass the limit check: the export goes on to the audience check (here an unknown
    audience stops it, so the million rows are never read)."""
    run_conf = conf(sandbox, tmp_path, segments=[{"name": "big", "sql": BIG + " LIMIT 1000000"}], merge_fields={},
                    audience_id="nope000000")
    logs = assert_fails_before_sending(sandbox, task_log, run_conf, "Audience 'nope000000' does not exist")
    assert "per export" not in logs


def test_an_unknown_audience_says_where_to_find_the_id(airflow_db, crafted, sandbox, tmp_path, task_log):
    assert_fails_before_sending(sandbox, task_log, conf(sandbox, tmp_path, audience_id="a1b2c3d4e5"),
                                "Audience 'a1b2c3d4e5' does not exist in this Mailchimp account",
                                "Check audience_id", "Audience ID")


def test_an_all_digit_audience_id_is_used_as_given(airflow_db, crafted, sandbox, tmp_path, task_log):
    assert_fails_before_sending(sandbox, task_log, conf(sandbox, tmp_path, audience_id="0000000000"),
                                "Audience '0000000000' does not exist")


@pytest.mark.parametrize("key", ["wrong", "wrong_datacenter"])
def test_a_wrong_api_key_fails_before_sending_and_names_the_connection_field(key, airflow_db, crafted, sandbox,
                                                                           monkeypatch, tmp_path, task_log):
    info = sandbox.info
    real = info["mailchimp"]["api_key"]
    bad = "0123456789abcdef0123456789abcdef-us1" if key == "wrong" else real.rpartition("-")[0] + "-us9"
    monkeypatch.setenv("AIRFLOW_CONN_MAILCHIMP_DEFAULT", json.dumps({
        "conn_type": "mailchimp", "host": info["mailchimp"]["base_url"],
        "extra": {"api_key": bad, "ca_bundle": info["ca_bundle"], "data_privacy_acknowledged": True}}))
    logs = assert_fails_before_sending(
        sandbox, task_log, conf(sandbox, tmp_path),
        "HTTP 401 [API Key Invalid]" if key == "wrong" else "HTTP 403 [Wrong Datacenter]",
        # what to fix: the connection and its field
        "Check the API key of connection 'mailchimp_default' (field 'API key', extra \"api_key\")")
    assert bad.rpartition("-")[0] not in logs


# -- Mailchimp's type conversions (the honest level for values a SQL source cannot produce) -------------------

@pytest.mark.parametrize(("field", "value", "result"), [
    ({"type": "text"}, 12345, "12345"),
    ({"type": "text"}, 12.5, "12.5"),
    ({"type": "text"}, date(2024, 1, 2), "2024-01-02"),
    ({"type": "text"}, "x" * 255, "x" * 255),
    ({"type": "number"}, " 12.50 ", 12.5),
    ({"type": "number"}, "1,234", 1234),
    ({"type": "number"}, 0, 0),
    ({"type": "date", "options": {"date_format": "DD/MM/YYYY"}}, date(2024, 1, 2), "02/01/2024"),
    ({"type": "date", "options": {"date_format": "MM/DD/YYYY"}}, datetime(2024, 1, 2, 10, 30), "01/02/2024"),
    ({"type": "date", "options": {"date_format": "MM/DD/YYYY"}}, "2024-01-02T10:30:00", "01/02/2024"),
    ({"type": "birthday", "options": {"date_format": "DD/MM"}}, "1990-05-17", "17/05"),
    ({"type": "address"}, '{"addr1": "1 Main St", "city": "X", "state": "Y", "zip": "12345"}',
     {"addr1": "1 Main St", "city": "X", "state": "Y", "zip": "12345"}),
    ({"type": "dropdown", "options": {"choices": ["gold", "silver"]}}, "gold", "gold"),
])
def test_values_are_converted_to_the_merge_fields_type(field, value, result):
    assert convert_merge_value(field, value) == (result, None)


@pytest.mark.parametrize(("field", "value", "words"), [
    ({"type": "text"}, "x" * 256, "has 256 characters; Mailchimp allows at most 255"),
    ({"type": "number"}, "abc", "'abc' is not a number"),
    ({"type": "number"}, True, "True is not a number"),
    ({"type": "number"}, date(2024, 1, 2), "is not a number"),
    ({"type": "date"}, "02/01/2024", "is not a date (expected YYYY-MM-DD"),
    ({"type": "birthday"}, 19900517, "is not a date"),
    ({"type": "address"}, "1 Main St", "address must be an object"),
    ({"type": "address"}, {"addr1": "1 Main St", "city": "X"}, "address must have addr1, city, state and zip"),
    ({"type": "url"}, "example.com/x", "is not an http(s) URL"),
    ({"type": "dropdown", "options": {"choices": ["gold", "silver"]}}, "bronze", "is not one of the field's choices"),
])
def test_values_that_do_not_fit_the_merge_field_say_why(field, value, words):
    converted, problem = convert_merge_value(field, value)
    assert converted is None and words in problem
