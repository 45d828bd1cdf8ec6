"""Mapping and validation: every reject reason, with the row's key and never the profile."""

from __future__ import annotations

import json

import msgspec
import pytest

from airflow_provider_segexport.export import records as R
from airflow_provider_segexport.export.records import FieldMapping, MappingError, Record, Reject, RowValidator
from airflow_provider_segexport.http import encode_json

MAPPING = FieldMapping({"email": "email", "FNAME": "first_name", "CITY": "city"}, key_column="customer_id",
                       required=["CITY"], max_lengths={"FNAME": 10})


def run(rows):
    v = RowValidator(MAPPING, "vip")
    return [v(i, row) for i, row in enumerate(rows, start=1)]


def row(key="C1", email="ann@example.com", first="Ann", city="Paris"):
    return {"customer_id": key, "email": email, "first_name": first, "city": city, "extra": "ignored"}


def test_valid_row_is_trimmed_and_mapped():
    (rec,) = run([row(email="  Ann.Lee+x@Example.COM ", first=" Zoë ")])
    assert isinstance(rec, Record)
    assert rec.payload == {"email": "Ann.Lee+x@Example.COM", "FNAME": "Zoë", "CITY": "Paris"}
    assert rec.email == "ann.lee+x@example.com" and rec.key == "C1" and rec.row == 1


@pytest.mark.parametrize(
    ("email", "reason", "words"),
    [
        (None, R.MISSING_EMAIL, "empty"),
        ("   ", R.MISSING_EMAIL, "empty"),
        ("no-at-sign.example.com", R.INVALID_EMAIL, "exactly one @"),
        ("two@@example.com", R.INVALID_EMAIL, "exactly one @"),
        ("has space@example.com", R.INVALID_EMAIL, "space"),
        ("trailing.dot@example.com.", R.INVALID_EMAIL, "not a valid address"),
        ("double..dot@example.com", R.INVALID_EMAIL, "not a valid address"),
        ("josé@example.com", R.INVALID_EMAIL, "non-ASCII"),
        ("a" * 250 + "@example.com", R.INVALID_EMAIL, "longer than 254"),
    ],
)
def test_invalid_emails_are_rejected_with_reason(email, reason, words):
    (rej,) = run([row(email=email)])
    assert isinstance(rej, Reject)
    assert (rej.reason, rej.key, rej.field, rej.row) == (reason, "C1", "email", 1)
    assert words in rej.message
    assert "ann" not in rej.message.lower() or email is None  # the message does not echo other profile data


def test_duplicate_email_case_insensitive_and_padded():
    out = run([row("C1", "Ann@Example.com"), row("C2", " ann@example.COM "), row("C3", "bob@example.com")])
    assert isinstance(out[0], Record) and isinstance(out[2], Record)
    assert isinstance(out[1], Reject) and out[1].reason == R.DUPLICATE and out[1].key == "C2"


def test_missing_key_required_and_too_long():
    out = run([row(key=None), row(key="C2", city=None), row(key="C3", first="x" * 11)])
    assert [o.reason for o in out] == [R.MISSING_KEY, R.MISSING_VALUE, R.TOO_LONG]
    assert out[2].field == "FNAME" and "11 characters" in out[2].message


def test_optional_null_is_omitted_not_rejected():
    (rec,) = run([row(first=None)])
    assert isinstance(rec, Record) and "FNAME" not in rec.payload


def test_mapping_naming_a_missing_column_fails_before_anything_is_sent():
    with pytest.raises(MappingError) as err:
        MAPPING.check_columns(["customer_id", "email", "first_name"], "Segment 'vip'")
    assert "'city'" in str(err.value) and "Its columns are" in str(err.value)


def test_mapping_without_email_is_refused_for_email_destinations():
    with pytest.raises(MappingError, match="requires an email"):
        FieldMapping({"FNAME": "first_name"})


def test_id_keyed_mapping_dedupes_on_the_key():
    mapping = FieldMapping({"contactid": "dataverse_contact_id"}, email_field=None, dedupe_field="contactid")
    v = RowValidator(mapping, "s")
    a = v(1, {"customer_id": "C1", "dataverse_contact_id": "ABC"})
    b = v(2, {"customer_id": "C2", "dataverse_contact_id": "abc"})
    assert isinstance(a, Record) and isinstance(b, Reject) and b.reason == R.DUPLICATE


def test_reject_json_has_no_profile_fields():
    (rej,) = run([row(email="bad")])
    assert set(rej.as_json()) == {"segment", "row", "key", "reason", "field", "message"}


def test_same_customer_in_two_segments_is_fine_but_two_customers_sharing_an_email_is_not():
    from airflow_provider_segexport.export.records import Deduper

    d = Deduper()
    a = RowValidator(MAPPING, "a", d, 0)
    b = RowValidator(MAPPING, "b", d, 1)
    assert isinstance(a(1, row("C1", "x@example.com")), Record)
    assert isinstance(b(1, row("C1", "X@example.com")), Record)  # same member, second segment
    dup = b(2, row("C2", "x@example.com"))  # another customer with the same email
    assert isinstance(dup, Reject) and dup.reason == R.DUPLICATE
    again = b(3, row("C1", "x@example.com"))  # the same customer twice in one segment
    assert isinstance(again, Reject) and again.reason == R.DUPLICATE


def test_dedupe_across_segments_holds_when_validators_are_made_before_any_row():
    """The engine makes every segment's validator up front; an empty shared deduper must still be shared."""
    from airflow_provider_segexport.export.records import Deduper

    d = Deduper(10)
    a = RowValidator(MAPPING, "a", d, 0)
    b = RowValidator(MAPPING, "b", d, 1)
    assert isinstance(a(1, row(key="C1", email="x@example.com")), Record)
    assert a(2, row(key="C2", email="\tX@EXAMPLE.COM")).reason == "duplicate"
    assert b(1, row(key="C2", email="X@example.com")).reason == "duplicate"
    assert isinstance(b(2, row(key="C1", email="x@example.com")), Record)  # same customer, other segment


def test_deduper_grows_past_its_expected_size_without_losing_members():
    from airflow_provider_segexport.export.records import Deduper

    d = Deduper(1)
    for i in range(20_000):
        assert d.check(f"m{i}@example.com", f"K{i}", 0)
    assert len(d) == 20_000
    assert not any(d.check(f"M{i}@EXAMPLE.com", f"other{i}", 0) for i in range(0, 20_000, 7))
    assert all(d.check(f"m{i}@example.com", f"K{i}", 1) for i in range(0, 20_000, 7))


def test_deduper_chunks_give_the_same_verdicts_as_checking_row_by_row():
    """The dedupe tables are probed a chunk at a time (numpy); the verdicts must be those of checking the rows
    one by one, in order: repeats inside a chunk, across chunks and segments, slots shared by several keys
    (a small table), and the tables growing on the way."""
    import random

    from airflow_provider_segexport.export.records import KEY_SEEN, VALUE_SEEN, Deduper

    def one_by_one(rows):
        keys_seen, holder, out = set(), {}, []
        for key, vid, seg in rows:
            if (key, seg) in keys_seen:
                out.append(KEY_SEEN)
                continue
            keys_seen.add((key, seg))
            vid = vid or 1
            held = holder.get(vid)
            if held is not None and (held[0] != key or held[1] == seg):
                out.append(VALUE_SEEN)
                continue
            holder[vid] = (key, seg)
            out.append(0)
        return out

    rng = random.Random(7)
    rows = []
    for seg in range(3):
        for _ in range(6000):
            rows.append((f"C{rng.randrange(5000)}", rng.choice([0, rng.randrange(1, 4000), rng.getrandbits(63)]),
                         seg))
    expected = one_by_one(rows)
    d, got, i = Deduper(1), [], 0
    while i < len(rows):
        seg = rows[i][2]
        n = rng.randrange(1, 3000)
        chunk = [r for r in rows[i: i + n] if r[2] == seg]
        got += d.check_many([k for k, _, _ in chunk], [v for _, v, _ in chunk], seg)
        i += len(chunk)
    assert got == expected
    assert {KEY_SEEN, VALUE_SEEN, 0} == set(got)


# -- more bad input at the row level (end to end with Mailchimp: tests/test_bad_input.py) --------------------

def test_tabs_and_newlines_around_an_email_are_trimmed_and_count_for_dedupe():
    out = run([row("C1", "\tann@example.com\n"), row("C2", " \r\nANN@example.com\t")])
    assert isinstance(out[0], Record) and out[0].payload["email"] == "ann@example.com"
    assert isinstance(out[1], Reject) and out[1].reason == R.DUPLICATE


def test_an_internationalised_domain_is_rejected_as_non_ascii():
    (rej,) = run([row(email="ann@exämple.com")])
    assert rej.reason == R.INVALID_EMAIL and "non-ASCII" in rej.message


@pytest.mark.parametrize(("extra", "ok"), [(0, True), (1, False)])
def test_email_length_limit_is_254_characters(extra, ok):
    email = "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * (57 + extra) + ".com"
    assert len(email) == 254 + extra
    (out,) = run([row(email=email)])
    assert isinstance(out, Record) is ok
    if not ok:
        assert out.reason == R.INVALID_EMAIL and "longer than 254" in out.message


def test_key_is_text_and_a_blank_key_is_missing():
    out = run([row(key=12), row(key=" \t ", email="b@example.com")])
    assert isinstance(out[0], Record) and out[0].key == "12"
    assert isinstance(out[1], Reject) and (out[1].reason, out[1].key) == (R.MISSING_KEY, None)


def test_values_of_other_types_keep_their_type_or_become_iso_text():
    """The validator does not guess types: numbers stay numbers (the destination converts them to the field's
    type), dates become ISO text, bytes are decoded and trimmed."""
    from datetime import date, datetime

    out = run([row("C1", "a@example.com", first=12345, city=date(2024, 1, 2)),
               row("C2", "b@example.com", first=b" Lyon ", city=datetime(2024, 1, 2, 3, 4, 5))])
    assert out[0].payload == {"email": "a@example.com", "FNAME": 12345, "CITY": "2024-01-02"}
    assert out[1].payload == {"email": "b@example.com", "FNAME": "Lyon", "CITY": "2024-01-02T03:04:05"}


def test_whitespace_only_is_empty_required_rejected_optional_omitted():
    out = run([row("C1", "a@example.com", first="  ", city="Paris"), row("C2", "b@example.com", city=" \t ")])
    assert isinstance(out[0], Record) and "FNAME" not in out[0].payload
    assert isinstance(out[1], Reject) and (out[1].reason, out[1].field) == (R.MISSING_VALUE, "CITY")


def test_max_length_counts_characters_not_bytes():
    out = run([row("C1", "a@example.com", first="é" * 10), row("C2", "b@example.com", first="山" * 11)])
    assert isinstance(out[0], Record)
    assert isinstance(out[1], Reject) and out[1].reason == R.TOO_LONG and "11 characters" in out[1].message


def test_a_missing_key_column_is_named_as_the_key():
    with pytest.raises(MappingError) as err:
        MAPPING.check_columns(["email", "first_name", "city"], "Segment 'vip'")
    assert "no column 'customer_id'" in str(err.value) and "{'key': 'customer_id'}" in str(err.value)


def test_the_same_customer_twice_in_a_segment_with_another_email_is_a_duplicate():
    out = run([row("C1", "ann@example.com"), row("C1", "ann.lee@example.com")])
    assert isinstance(out[0], Record)
    assert isinstance(out[1], Reject) and out[1].reason == R.DUPLICATE


def test_chunk_validation_gives_exactly_the_row_by_row_answers():
    """The engine validates chunk by chunk through an inlined path for ordinary rows; every kind of row must
    come out of it as it does one by one (same records, same rejects with the same reasons, same order)."""
    import datetime

    from airflow_provider_segexport.export.records import Deduper

    rows = [row("C1", "ann@example.com"), row("C2", " ANN@example.com "), row("C3", "bob@example.com", first=""),
            row("C4", "  "), row("C5", None), row("C6", "bad@@x.com"), row("C7", "zoé@example.com"),
            row("C8", "cy@example.com", city=None), row("C9", "di@example.com", city="  "),
            row("C10", "ed@example.com", first="A very long first name"), row("  ", "fay@example.com"),
            row(None, "gus@example.com"), row(12, "hal@example.com"), row("C1", "ivy@example.com"),
            row("C14", "jo@example.com", first=7), row("C15", "kim@example.com", city=datetime.date(2024, 1, 2)),
            row("C16", "Lea@Example.com", first="\tLéa\n"), row("C17", "lea@example.COM"),
            row("C18", "x" * 250 + "@example.com"), row("C19", "mo@example.com", first=None),
            row(20, "ned@example.com"), row(20, "oz@example.com"), row(True, "pat@example.com"),
            # a chunk's addresses are checked joined by line breaks: one holding a line break, a lone
            # surrogate, a character whose lower case is longer, labels at and past the limits
            row("C24", "quinn@example.com\nrae@example.com"), row("C25", "sam\ud800@example.com"),
            row("C26", "İvy@example.com"), row("C27", "tom@-example.com"), row("C28", "uma@example-.com"),
            row("C29", "vic@" + "a" * 63 + ".com"), row("C30", "wes@" + "a" * 64 + ".com"), row("C31", 42),
            row("C32", "xia@example.c0m"), row("C33", "yul@a.b-c.example.com"),
            row("C34", "zed@example.com", first="Lo\udce9s"), row("C\udc80", "amy@example.com")]
    tuples = [tuple(r[c] for c in ("customer_id", "email", "first_name", "city")) for r in rows]
    one = RowValidator(MAPPING, "vip", Deduper(), 0)
    expected = [one(i, t) for i, t in enumerate(tuples, start=1)]
    chunked = RowValidator(MAPPING, "vip", Deduper(), 0)
    assert chunked.columns == ["customer_id", "email", "first_name", "city"]
    records, rejects = [], []
    for start in range(0, len(tuples), 7):  # several chunks: the deduper carries across them
        got_records, got_rejects = chunked.many(tuples[start: start + 7], start + 1)
        records += got_records
        rejects += got_rejects
    # the inlined path also keeps the payload's JSON (the one-by-one path does not): the same bytes encode_json
    # makes of the payload, in the documented layout (the email field first)
    with_json = [r for r in records if r.payload_json is not None]
    assert len(with_json) >= 5
    for r in with_json:
        assert r.payload_json == encode_json(r.payload) and r.payload_json.startswith(b'{"email":"' + r.payload["email"].encode() + b'"')
    records = [msgspec.structs.replace(r, payload_json=None) for r in records]
    assert [r for r in expected if isinstance(r, Record)] == records
    assert [r for r in expected if isinstance(r, Reject)] == rejects
    assert {r.reason for r in rejects} >= {R.DUPLICATE, R.MISSING_EMAIL, R.INVALID_EMAIL, R.MISSING_VALUE,
                                           R.TOO_LONG, R.MISSING_KEY}
    assert len(records) + len(rejects) == len(rows)
    assert {r.key for r in records} >= {"C29", "C33"} and not {r.key for r in records} & {f"C{i}" for i in range(24, 33)
                                                                                      if i != 29}
    as_dicts = RowValidator(MAPPING, "vip", Deduper(), 0).many(rows, 1)  # rows as dicts: one by one
    assert as_dicts == ([r for r in expected if isinstance(r, Record)], [r for r in expected if isinstance(r, Reject)])


def test_a_value_or_key_that_is_not_valid_unicode_is_a_reject_naming_its_column(tmp_path):
    """Text holding a lone surrogate (decoded with the wrong encoding, or with errors='surrogateescape') cannot be
    sent as JSON: the row is rejected with its column named, on the inlined path as one by one, and the rejects
    file can still hold the reject (its key escaped); the valid rows around it go on."""
    from pathlib import Path

    from airflow_provider_segexport.export.records import Deduper
    from airflow_provider_segexport.export.report import RejectsWriter

    rows = [("C1", "ann@example.com", "Ann", "Paris"), ("C2", "bob@example.com", "Lo\udce9s", "Paris"),
            ("C3\udc80", "cy@example.com", "Cy", "Rome"), ("C4", "di@example.com", "Di", "\ud800"),
            ("C5", "ed@example.com", "Zoë", "Oslo")]
    records, rejects = RowValidator(MAPPING, "vip", Deduper(), 0, fingerprint=R._MEMBER_HASHER).many(rows, 1)
    assert [r.key for r in records] == ["C1", "C5"]
    assert [(r.row, r.key, r.reason, r.field) for r in rejects] == [
        (2, "C2", R.INVALID_VALUE, "FNAME"), (3, "C3\\udc80", R.INVALID_VALUE, "customer_id"),
        (4, "C4", R.INVALID_VALUE, "CITY")]
    assert all("not valid Unicode" in r.message and "fix the text in the source" in r.message for r in rejects)
    assert "column 'first_name'" in rejects[0].message
    writer = RejectsWriter(Path(tmp_path / "rejects.jsonl"))
    for r in rejects:
        writer.write(r)
    writer.close()
    assert [json.loads(x)["key"] for x in open(tmp_path / "rejects.jsonl", encoding="utf-8")] == [
        "C2", "C3\\udc80", "C4"]


def test_mailchimp_chunk_preparation_gives_exactly_the_one_by_one_answers(tmp_path):
    """Mailchimp's inlined chunk path (text merge fields) must answer as ``prepare`` does one by one, also when
    some members were refused for good in an earlier run (they are rejected up front, the others inlined)."""
    import copy

    from airflow_provider_segexport.destinations.mailchimp import MailchimpDestination
    from airflow_provider_segexport.export.records import Deduper
    from airflow_provider_segexport.export.state import RefusalStore

    mapping = FieldMapping({"email": "email", "FNAME": "first_name", "CITY": "city"})
    refusals = RefusalStore("mailchimp:test:aud", tmp_path)
    refusals.add("bob@example.com", "bob@example.com was permanently deleted and cannot be re-imported")
    refusals.add("cy@example.com", "")  # a reason Mailchimp left empty: still not a reject of its own
    dest = MailchimpDestination(None, "aud", mapping, refusals=refusals)
    dest.field_types = {"FNAME": {"type": "text"}, "CITY": {"type": "text"}}
    rows = [("C1", "ann@example.com", "Ann", "Paris"), ("C2", "Bob@Example.com", "Bob", None),
            ("C3", "cy@example.com", "Cy", "Rome"), ("C4", "di@example.com", "D" * 300, "Oslo"),
            ("C5", "ed@example.com", None, None)]
    records, _ = RowValidator(mapping, "vip", Deduper(), 0).many(rows, 1)
    expected = [dest.prepare(r) for r in copy.deepcopy(records)]
    got, rejected = dest.prepare_many(records)
    assert got == [r for r in expected if isinstance(r, Record)]
    assert rejected == [r for r in expected if isinstance(r, Reject)]
    assert [r.reason for r in rejected] == [R.PREVIOUSLY_REFUSED, R.TOO_LONG]
    refusals.close()


@pytest.mark.parametrize("fields, tag_segments, status", [
    ({"email": "email", "FNAME": "first_name", "CITY": "city"}, True, "subscribed"),
    ({"CITY": "city", "FNAME": "first_name", "EMAIL": "email"}, False, "pending"),  # the email mapped last
    ({"email": "email"}, True, "transactional"),  # no merge field at all
])
def test_mailchimp_member_json_cut_from_the_payload_json_is_the_one_encoded_from_a_dict(fields, tag_segments, status):
    """Mailchimp builds a member's JSON from the validator's JSON of the payload (bytes cut and joined, not a
    dict encoded again): it must be byte for byte the JSON ``prepare`` encodes from the member dict, whatever
    the values hold (accents, quotes, backslashes, emoji, control characters), the mapping's order and the
    options."""
    from airflow_provider_segexport.destinations.mailchimp import MailchimpDestination
    from airflow_provider_segexport.export.records import Deduper

    mapping = FieldMapping(fields, email_field="email" if "email" in fields else "EMAIL")
    dest = MailchimpDestination(None, "aud", mapping, tag_segments=tag_segments, status_if_new=status)
    dest.field_types = {tag: {"type": "text"} for tag in fields if tag.lower() != "email"}
    names = ["Ann", "Zoë", 'Jo "JJ"', "back\\slash", "tab\there", "émoji 🎉", "O'Brien", "<b>&amp;</b>", None, "x" * 200]
    validator = RowValidator(mapping, "vip segment", Deduper(), 0)
    values = [{"customer_id": f"C{i}", "email": f"User.{i}+tag@Example-{i % 3}.co.uk", "first_name": names[i % 10],
               "city": names[(i * 3) % 10]} for i in range(40)]
    rows = [tuple(v[c] for c in validator.columns) for v in values]
    records, rejects = validator.many(rows, 1)
    assert not rejects and all(r.payload_json is not None for r in records)
    by_dict = [dest.prepare(msgspec.structs.replace(r, payload_json=None)) for r in records]
    got, refused = dest.prepare_many(records)
    assert not refused and [r.body for r in got] == [r.body for r in by_dict]
    assert [r.payload for r in got] == [r.payload for r in records]  # the payload stays as validated
    member = json.loads(got[1].body)
    assert member["email_address"] == "User.1+tag@Example-1.co.uk" and member["status_if_new"] == status
    assert ("tags" in member) == tag_segments and ("merge_fields" in member) == (len(fields) > 1)


def test_mailchimp_batch_outcome_counts_the_answer_and_matches_only_the_errors(tmp_path):
    """A batch-subscribe answer becomes counts (created/updated as listed, the rest unchanged) and a rejected
    outcome for each member in ``errors``; only those records are left out of what the engine journals, and a
    permanent refusal is remembered. An answer listing more members than were sent is matched one by one."""
    from airflow_provider_segexport.destinations.mailchimp import MailchimpDestination
    from airflow_provider_segexport.export.records import Deduper
    from airflow_provider_segexport.export.state import RefusalStore

    mapping = FieldMapping({"email": "email"})
    refusals = RefusalStore("mailchimp:test:aud", tmp_path)
    dest = MailchimpDestination(None, "aud", mapping, refusals=refusals)
    rows = [(f"C{i}", f"U{i}@Example.com") for i in range(6)]
    records, _ = RowValidator(mapping, "vip", Deduper(), 0).many(rows, 1)
    answer = {"new_members": ["u0@example.com", "U1@example.com"], "updated_members": ["u2@example.com"],
              "errors": [{"email_address": "U4@example.com", "error": "U4@example.com was permanently deleted and "
                          "cannot be re-imported", "error_code": "ERROR_CONTACT_EXISTS"}]}
    outcome = dest.outcomes(records, answer)
    assert outcome.counts == {"created": 2, "updated": 1, "unchanged": 2, "rejected": 1}
    assert [(o.record.key, o.status) for o in outcome.exceptions] == [("C4", "rejected")]
    assert "<email>" in outcome.exceptions[0].message and "U4@" not in outcome.exceptions[0].message
    assert [r.key for r in outcome.confirmed(records)] == ["C0", "C1", "C2", "C3", "C5"]
    assert refusals.get("u4@example.com")

    odd = {"new_members": [f"u{i}@example.com" for i in range(4)] + ["stranger@example.com"],
           "updated_members": ["u4@example.com", "u5@example.com"], "errors": []}
    outcome = dest.outcomes(records, odd)  # 7 listed for 6 sent: each member matched by its address
    assert outcome.counts == {"created": 4, "updated": 2} and outcome.exceptions == []
    counted = {"total_created": 5, "total_updated": 3, "errors": []}  # counts only, more than were sent
    outcome = dest.outcomes(records, counted)
    assert outcome.counts == {"created": 5, "updated": 1} and outcome.exceptions == []
    refusals.close()


def test_the_validator_fingerprints_the_encoded_validated_payload():
    """With a fingerprint hasher the validator sets each record's ``fp`` while the payload is at hand: the keyed
    hash of the encoded validated payload, on the inlined path and the one-by-one path alike (the delta step
    compares it with the export state's)."""
    from hashlib import blake2b

    from airflow_provider_segexport.export.records import Deduper
    from airflow_provider_segexport.http import encode_json

    hasher = blake2b(digest_size=8, salt=b"settings-salt-16")
    rows = [("C1", "ann@example.com", "Ann", "Paris"), ("C2", "bob@example.com", 7, "Rome"),
            ("C3", " Cy@Example.com ", None, "Oslo")]
    records, rejects = RowValidator(MAPPING, "vip", Deduper(), 0, fingerprint=hasher).many(rows, 1)
    assert not rejects and len(records) == 3
    for r in records:
        h = hasher.copy()
        h.update(encode_json(r.payload))
        assert r.fp == int.from_bytes(h.digest(), "big", signed=True) != 0
    plain, _ = RowValidator(MAPPING, "vip", Deduper(), 0).many(rows, 1)
    assert [r.fp for r in plain] == [0, 0, 0]
