"""Mapping source columns to destination fields, and validating values before anything is sent.

A source row becomes either a :class:`Record` (ready for the destination) or a :class:`Reject`
(with a reason code, the row number and the row's key; never the whole profile).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

# Reason codes, one place. The rejects file and the summary use them.
MISSING_KEY = "missing_key"
MISSING_EMAIL = "missing_email"
INVALID_EMAIL = "invalid_email"
DUPLICATE = "duplicate"
MISSING_VALUE = "missing_value"
TOO_LONG = "too_long"
INVALID_VALUE = "invalid_value"
VENDOR_REJECTED = "vendor_rejected"
PREVIOUSLY_REFUSED = "previously_refused"
NOT_SENT = "not_sent"

REASONS = {
    MISSING_KEY: "the row has no value in the key column",
    MISSING_EMAIL: "the row has no email address",
    INVALID_EMAIL: "the email address is not valid",
    DUPLICATE: "the same key or email appears earlier in this segment",
    MISSING_VALUE: "a required field is empty",
    TOO_LONG: "a value is longer than the destination allows",
    INVALID_VALUE: "a value cannot be converted to the destination field's type",
    VENDOR_REJECTED: "the destination refused the member",
    PREVIOUSLY_REFUSED: "the destination refused this member permanently in an earlier run",
    NOT_SENT: "the export stopped before the destination confirmed this member",
}

EMAIL_MAX_LENGTH = 254
# A practical ASCII address syntax (what Mailchimp, Campaign Monitor and Dataverse accept).
_EMAIL_ASCII = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)


class MappingError(ValueError):
    """The mapping does not fit the source (e.g. it names a column the source does not have)."""


@dataclass(slots=True)
class Record:
    """One member ready to send: its key, its dedupe value and the mapped payload."""

    segment: str
    row: int
    key: str
    payload: dict[str, Any]
    email: str | None = None
    #: set when export state is kept: the member's id and the payload's fingerprint
    member: int = 0
    fp: int = 0


@dataclass(slots=True)
class Reject:
    segment: str
    row: int
    key: str | None
    reason: str
    field: str | None = None
    message: str = ""
    vendor_message: str | None = None

    def as_json(self) -> dict:
        out = {"segment": self.segment, "row": self.row, "key": self.key, "reason": self.reason,
               "field": self.field, "message": self.message}
        if self.vendor_message is not None:
            out["vendor_message"] = self.vendor_message
        return out


def normalize_email(value: Any) -> tuple[str | None, str | None]:
    """Return (email, problem): the trimmed address, or why it is not valid."""
    if value is None:
        return None, "empty"
    text = str(value).strip()
    if not text:
        return None, "empty"
    if len(text) > EMAIL_MAX_LENGTH:
        return None, f"longer than {EMAIL_MAX_LENGTH} characters"
    if not text.isascii():
        return None, "contains non-ASCII characters (internationalised addresses are not accepted by the destinations)"
    if " " in text:
        return None, "contains a space"
    if text.count("@") != 1:
        return None, "must contain exactly one @"
    if not _EMAIL_ASCII.match(text):
        return None, "is not a valid address (check the domain and dots)"
    return text, None


@dataclass
class FieldMapping:
    """Destination field -> source column.

    :param fields: e.g. ``{"email": "email", "FNAME": "first_name"}``.
    :param key_column: the source column that identifies a row (customer ID); shown in rejects.
    :param email_field: the destination field holding the email, validated and deduplicated
        case-insensitively; ``None`` for destinations keyed on an ID (Dynamics 365).
    :param required: destination fields that must not be empty.
    :param max_lengths: destination field -> maximum characters.
    :param dedupe_field: destination field deduplicated within a segment when there is no email.
    """

    fields: dict[str, str]
    key_column: str = "customer_id"
    email_field: str | None = "email"
    required: Iterable[str] = ()
    max_lengths: Mapping[str, int] = field(default_factory=dict)
    dedupe_field: str | None = None

    def __post_init__(self) -> None:
        if self.email_field and self.email_field not in self.fields:
            raise MappingError(
                f"The mapping has no '{self.email_field}' field; the destination requires an email. "
                f"Map it to a source column, e.g. fields={{'{self.email_field}': 'email', ...}}."
            )
        self.required = frozenset(self.required)

    def check_columns(self, columns: Iterable[str], source: str) -> None:
        have = set(columns)
        wanted = {self.key_column, *self.fields.values()}
        missing = sorted(c for c in wanted if c not in have)
        if missing:
            raise MappingError(
                f"{source} has no column {', '.join(repr(c) for c in missing)} (mapping "
                f"{ {k: v for k, v in self.fields.items() if v in missing} or {'key': self.key_column} }). "
                f"Its columns are: {', '.join(sorted(have))}. Fix the mapping or the query."
            )


class Deduper:
    """Duplicates across one whole export, in bounded memory (two ints per distinct member).

    The same email (case-insensitive) or ID held by two different keys is a duplicate; the same key
    twice in one segment is a duplicate; the same key in two segments is one member in two segments.
    """

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}

    def check(self, value: str, key: str, segment_index: int) -> bool:
        """True if ``value`` is new for this export (or the same member seen in another segment)."""
        v = int.from_bytes(hashlib.blake2b(value.lower().encode("utf-8"), digest_size=8).digest(), "big")
        k = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=7).digest(), "big")
        stored = self._seen.get(v)
        if stored is None:
            self._seen[v] = (k << 8) | (segment_index & 0xFF)
            return True
        if stored >> 8 != k or (stored & 0xFF) == (segment_index & 0xFF):
            return False
        self._seen[v] = (k << 8) | (segment_index & 0xFF)
        return True


class RowValidator:
    """Applies a :class:`FieldMapping` to the rows of one segment, deduplicating across the export."""

    def __init__(self, mapping: FieldMapping, segment: str, deduper: Deduper | None = None,
                 segment_index: int = 0) -> None:
        self.mapping = mapping
        self.segment = segment
        self._deduper = deduper or Deduper()
        self._segment_index = segment_index
        self._items = list(mapping.fields.items())
        self._email_field = mapping.email_field
        self._dedupe_field = mapping.dedupe_field or mapping.email_field

    def __call__(self, row_number: int, row: Mapping[str, Any]) -> Record | Reject:
        m = self.mapping
        raw_key = row.get(m.key_column)
        key = None if raw_key is None else str(raw_key).strip()
        if not key:
            return Reject(self.segment, row_number, None, MISSING_KEY, m.key_column,
                          f"column '{m.key_column}' is empty")
        payload: dict[str, Any] = {}
        email = None
        for dest, col in self._items:
            value = row.get(col)
            if dest == self._email_field:
                email, problem = normalize_email(value)
                if email is None:
                    reason = MISSING_EMAIL if problem == "empty" else INVALID_EMAIL
                    return Reject(self.segment, row_number, key, reason, dest,
                                  f"email in column '{col}' {problem}")
                payload[dest] = email
                continue
            value = _clean(value)
            if value is None or value == "":
                if dest in m.required:
                    return Reject(self.segment, row_number, key, MISSING_VALUE, dest,
                                  f"'{dest}' (column '{col}') is required but empty")
                continue
            limit = m.max_lengths.get(dest)
            if limit is not None and isinstance(value, str) and len(value) > limit:
                return Reject(self.segment, row_number, key, TOO_LONG, dest,
                              f"'{dest}' (column '{col}') has {len(value)} characters; at most {limit} allowed")
            payload[dest] = value
        dedupe_value = payload.get(self._dedupe_field) if self._dedupe_field else None
        if not self._deduper.check(str(dedupe_value if dedupe_value is not None else key), key,
                                   self._segment_index):
            what = f"'{self._dedupe_field}'" if dedupe_value is not None else "key"
            return Reject(self.segment, row_number, key, DUPLICATE, self._dedupe_field,
                          f"the same {what} (case-insensitive) appears earlier in this export for another "
                          f"customer, or twice for this customer in segment '{self.segment}'")
        return Record(self.segment, row_number, key, payload, email.lower() if email else None)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").strip()
    return value
