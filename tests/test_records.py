"""Mapping and validation: every reject reason, with the row's key and never the profile."""

from __future__ import annotations

import pytest

from airflow_provider_segexport.export import records as R
from airflow_provider_segexport.export.records import FieldMapping, MappingError, Record, Reject, RowValidator

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
