"""Mapping source columns to destination fields, and validating values before anything is sent.

A source row becomes either a :class:`Record` (ready for the destination) or a :class:`Reject`
(with a reason code, the row number and the row's key; never the whole profile).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from hashlib import blake2b
from typing import Any

import msgspec
import numpy as np

from airflow_provider_segexport.http import encode_json

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
CONTACT_NOT_FOUND = "contact_not_found"
CONTACT_INACTIVE = "contact_inactive"

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
    CONTACT_NOT_FOUND: "no contact in Dynamics 365 has this ID (or matches this value); contacts are never created",
    CONTACT_INACTIVE: "the Dynamics 365 contact is inactive",
}

EMAIL_MAX_LENGTH = 254
# A practical ASCII address syntax (what Mailchimp, Campaign Monitor and Dataverse accept): dot-separated
# atoms, then domain labels of 1-63 letters, digits or inner hyphens, then a top-level domain of 2-63 letters.
# (A label is matched whole, then checked not to start or end with '-': less backtracking than nested groups.)
_EMAIL_ASCII = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:(?!-)[A-Za-z0-9-]{1,63}(?<!-)\.)+[A-Za-z]{2,63}$"
)


_ANY_EMAIL = re.compile(r"[^\s<>\"'(),;:@]+@[^\s<>\"'(),;:@]+\.[A-Za-z]{2,63}")


def redact_emails(text: str | None) -> str | None:
    """A vendor message with every email address replaced by ``<email>`` (rejects and logs hold no profile)."""
    return _ANY_EMAIL.sub("<email>", text) if text else text


class MappingError(ValueError):
    """The mapping does not fit the source (e.g. it names a column the source does not have)."""


class Record(msgspec.Struct, gc=False):
    """One member ready to send: its key, its dedupe value and the mapped payload.

    A msgspec struct, not a dataclass: one is made per row, and a struct is made in a third of the time. ``gc=False``: a
    record never takes part in a reference cycle (it holds strings, numbers and its payload dict).
    """

    segment: str
    row: int
    key: str
    payload: dict[str, Any]
    email: str | None = None
    #: the member's stable id (:func:`member_id` of the email, else of the key)
    member: int = 0
    #: set when export state is kept: the fingerprint of the payload's JSON
    fp: int = 0
    #: what is sent for this member, when the destination encodes it ahead of the batch
    body: bytes | None = None
    #: the payload's JSON as the validator made it, when the row took the usual path (else ``None``):
    #: ``{"<email field>":"<address>"``, then ``,"<field>":"<text>"`` for the other fields in mapping order,
    #: then ``}`` (msgspec's compact UTF-8 JSON; the address is ASCII without quotes or backslashes, so it
    #: is encoded as itself between quotes). A destination that sends the payload reshaped builds its member
    #: from these bytes instead of encoding it again (the fingerprint was made from them).
    payload_json: bytes | None = None
    #: the member's key as the destination assigned it when it confirmed the member (e.g. a contact ID), for
    #: destinations that declare ``assigns_keys``; the export state keeps it for mirror removals
    dest_key: str | None = None


class Reject(msgspec.Struct, gc=False):
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

    @property
    def source_columns(self) -> list[str]:
        """The source columns a row must carry, in order: the key column first, then the mapped ones."""
        return list(dict.fromkeys([self.key_column, *self.fields.values()]))

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


def member_id(value: str) -> int:
    """Stable 64-bit id of a member's destination key (email lower-cased, or an ID); kept in export state."""
    h = _MEMBER_HASHER.copy()  # copying a hasher is cheaper than making one (same digest)
    h.update(value.strip().lower().encode("utf-8"))
    return int.from_bytes(h.digest(), "big", signed=True)


_MEMBER_HASHER = blake2b(digest_size=8)


def payload_fingerprint(hasher: Any, payload: dict[str, Any]) -> int:
    """The export state's fingerprint of a validated payload: its JSON hashed with ``hasher`` (a blake2b keyed
    with the destination's settings; copying it is cheaper than making one, same digest)."""
    h = hasher.copy()
    h.update(encode_json(payload))
    return int.from_bytes(h.digest(), "big", signed=True)


class _IntMap:
    """A map of non-zero 64-bit integers to 64-bit integers in numpy arrays (open addressing, at most half
    full), probed a whole chunk of keys at a time: 16 bytes a slot instead of ~100 for a dict entry and
    its int objects (8 bytes a slot when it is only a set, ``values=False``), and the probing loop runs in
    numpy, not in Python."""

    def __init__(self, capacity: int, values: bool = True) -> None:
        self._keys = np.zeros(capacity, np.int64)  # 0 marks an empty slot
        self._vals = np.zeros(capacity, np.int64) if values else None
        self._mask = capacity - 1
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def setdefault_many(self, keys: np.ndarray, values: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per key, in order, as if one at a time: (found, stored value, slot). A key not found is stored with
        its value (``values[n]``); a key repeated within ``keys`` is found by its later occurrences."""
        if 2 * (self._n + len(keys)) > self._mask:
            self.reserve(self._n + len(keys))
        table, vals, mask = self._keys, self._vals, self._mask
        n = len(keys)
        found = np.zeros(n, bool)
        stored = np.zeros(n, np.int64)
        slots = keys & mask
        pending = np.arange(n)
        while pending.size:
            k = keys[pending]
            i = slots[pending]
            current = table[i]
            hit = current == k
            empty = current == 0
            if empty.any():
                # per empty slot the earliest pending key takes it (pending is in row order); the others
                # look again at the same slot next round (it holds their key, or they move on)
                where = np.flatnonzero(empty)
                _, first = np.unique(i[where], return_index=True)
                taken = where[first]
                table[i[taken]] = k[taken]
                if vals is not None:
                    vals[i[taken]] = values[pending[taken]]
                self._n += len(taken)
                settled = hit.copy()
                settled[taken] = True
            else:
                settled = hit
            if hit.any():
                found[pending[hit]] = True
                if vals is not None:
                    stored[pending[hit]] = vals[i[hit]]
            moving = ~(hit | empty)  # the slot holds another key: probe the next one
            slots[pending[moving]] = (i[moving] + 1) & mask
            pending = pending[~settled]
        return found, stored, slots

    def set_at(self, slots: np.ndarray, values: np.ndarray) -> None:
        self._vals[slots] = values

    def reserve(self, expected: int) -> None:
        """Room for ``expected`` keys (at most half full), rebuilt in one step if needed."""
        capacity = _capacity(expected)
        if capacity <= self._mask + 1:
            return
        used = np.flatnonzero(self._keys)
        keys = self._keys[used]
        vals = self._vals[used] if self._vals is not None else None
        self.__init__(capacity, vals is not None)
        if len(keys):
            self.setdefault_many(keys, vals)


class Deduper:
    """Duplicates across one whole export, in bounded memory (two :class:`_IntMap`: 48 MB for 1,000,000
    members, not dicts of objects).

    The same email (case-insensitive) or ID held by two different keys is a duplicate; the same key
    twice in one segment is a duplicate; the same key in two segments is one member in two segments.
    """

    def __init__(self, expected: int = 0) -> None:
        capacity = _capacity(expected)
        self._by_value = _IntMap(capacity)  # member id of the value -> key hash << 8 | segment
        self._keys = _IntMap(capacity, values=False)  # hashes of (key, segment)

    def __len__(self) -> int:
        return len(self._by_value)

    def reserve(self, expected: int) -> None:
        """Make room for ``expected`` members in one step (when the count arrives after reading began)
        instead of doubling again and again on the way there."""
        self._by_value.reserve(expected)
        self._keys.reserve(expected)

    def check(self, value: str, key: str, segment_index: int) -> bool:
        """True if ``value`` is new for this export (or the same member seen in another segment)."""
        hashes = np.array([hash(key)], np.int64)
        return not self._values_seen(hashes, [member_id(value)], segment_index & 0xFF)[0]

    def check_many(self, keys: list[str], vids: list[int], segment_index: int) -> list[int]:
        """Both checks for a chunk of rows in order: per row 0 (new), ``KEY_SEEN`` (the key twice in this
        segment) or ``VALUE_SEEN`` (the value held by another key, or twice in this segment)."""
        seg = segment_index & 0xFF
        hashes = np.fromiter(map(hash, keys), np.int64, len(keys))
        with np.errstate(over="ignore"):  # multiplication modulo 2**64: a mix of the key's hash and the segment
            key_ids = (hashes * _MIX_KEY + (seg + 1) * _MIX_SEG) & _POSITIVE
        key_ids[key_ids == 0] = 1
        key_seen, _, _ = self._keys.setdefault_many(key_ids)
        out = np.where(key_seen, KEY_SEEN, 0)
        fresh = np.flatnonzero(~key_seen)
        if fresh.size:
            out[fresh[self._values_seen(hashes[fresh], np.array(vids, np.int64)[fresh], seg)]] = VALUE_SEEN
        return out.tolist()

    def _values_seen(self, key_hashes: np.ndarray, vids: Any, seg: int) -> np.ndarray:
        """Per (key, value id) in order: True if another key holds the value, or this key already did in this
        segment; a value held by the same key in another segment is the same member (False; the value is
        now tagged with this segment)."""
        ids = np.asarray(vids, np.int64)
        ids[ids == 0] = 1
        tags = ((key_hashes & _KEY_BITS) << 8) | seg
        found, stored, slots = self._by_value.setdefault_many(ids, tags)
        moved = found & ((stored >> 8) == (tags >> 8)) & ((stored & 0xFF) != seg)
        if moved.any():
            self._by_value.set_at(slots[moved], tags[moved])
        return found & ~moved


KEY_SEEN, VALUE_SEEN = 1, 2
_MIX_KEY = np.int64(-7046029254386353131)  # 0x9E3779B97F4A7C15 as a signed 64-bit integer (odd: a bijection)
_MIX_SEG = np.int64(0x632BE59BD9B4E019)
_POSITIVE = np.int64(0x7FFFFFFFFFFFFFFF)
_KEY_BITS = np.int64(0x7FFFFFFFFFFFFF)  # 55 bits of the key's hash, then 8 bits of segment


def _capacity(expected: int) -> int:
    """Slots for ``expected`` members: a power of two, at most half full."""
    return 1 << max(12, (2 * max(1, expected) - 1).bit_length())


_EMAIL, _VALUE = 0, 1


class RowValidator:
    """Applies a :class:`FieldMapping` to the rows of one segment, deduplicating across the export.

    Rows are tuples of :attr:`columns` (what sources yield for the engine); a dict row is accepted too.
    Each record carries its :func:`member_id` (of the email, else of the key).
    """

    def __init__(self, mapping: FieldMapping, segment: str, deduper: Deduper | None = None,
                 segment_index: int = 0, fingerprint: Any = None) -> None:
        self.mapping = mapping
        #: a keyed blake2b hasher: when given, each record's ``fp`` is set to the hash of its encoded payload
        #: (the export state's fingerprint, made while the payload is at hand)
        self._fingerprint = fingerprint
        self.segment = segment
        self._deduper = deduper if deduper is not None else Deduper()
        self._segment_index = segment_index
        self._email_field = mapping.email_field
        self._dedupe_field = mapping.dedupe_field or mapping.email_field
        self._dedupe_by_email = self._dedupe_field is not None and self._dedupe_field == self._email_field
        #: the source columns a row must carry, in order (the key column first)
        self.columns: list[str] = mapping.source_columns
        self._plan = [
            (dest, col, self.columns.index(col), _EMAIL if dest == self._email_field else _VALUE,
             mapping.max_lengths.get(dest), dest in mapping.required)
            for dest, col in mapping.fields.items()
        ]
        emails = [index for _, _, index, kind, _, _ in self._plan if kind == _EMAIL]
        #: the inlined path of :meth:`many`: the email's column, and (field, column, limit) of the others
        self._email_index = emails[0] if emails else None
        self._fast_values = [(dest, index, limit, required)
                             for dest, _, index, kind, limit, required in self._plan if kind == _VALUE]

    def __call__(self, row_number: int, row: Any) -> Record | Reject:
        item = self._map(row_number, row)
        if item.__class__ is not Record:
            return item
        records, rejects = self._dedupe([item])
        return records[0] if records else rejects[0]

    def many(self, rows: list, first_row: int) -> tuple[list[Record], list[Reject]]:
        """Validate a chunk of rows numbered from ``first_row``: (records, rejects), each in row order.

        The usual row (text values, a plain valid address) takes an inlined path; any other row goes
        through the same checks one by one, so both paths give the same answer.
        """
        seg = self.segment
        slow = self._map
        match = _EMAIL_ASCII.match
        hasher, from_bytes = _MEMBER_HASHER, int.from_bytes
        fingerprint, encode = self._fingerprint, encode_json
        email_index = self._email_index
        values = self._fast_values
        mapped: list[Record] = []
        rejects: list[Reject] = []
        # The dedupe's inputs, collected on the way (a second pass over the records costs cache misses):
        # each record's key and the id of its dedupe value (the member id when that value is the email).
        keys: list[str] = []
        vids: list[int] | None = [] if self._dedupe_by_email else None
        row_number = first_row - 1
        for row in rows:
            row_number += 1
            key = row[0] if row.__class__ is tuple else None
            if key.__class__ is int:  # integer customer IDs: the same text as the one-by-one path gives
                key = str(key)
            if key.__class__ is not str or email_index is None:
                item = slow(row_number, row)
            else:
                key = key.strip()
                email = row[email_index]
                if not key or email.__class__ is not str or not key.isascii():
                    item = slow(row_number, row)
                else:
                    email = email.strip()
                    if not email or len(email) > EMAIL_MAX_LENGTH or not email.isascii() or not match(email):
                        item = slow(row_number, row)
                    else:
                        payload = {self._email_field: email}
                        for dest, index, limit, required in values:
                            value = row[index]
                            if value.__class__ is str:
                                value = value.strip()
                                if not value or (limit is not None and len(value) > limit):
                                    break  # empty (maybe required) or too long: the slow path says which
                                payload[dest] = value
                            elif value is not None or required:
                                break  # another type to convert, or a required field missing
                        else:
                            try:
                                encoded = encode(payload)  # the fingerprint's input, and the destination's
                            except UnicodeEncodeError:
                                pass  # a lone surrogate in a value: the one-by-one path below rejects the row
                            else:
                                lowered = email.lower()  # member_id(lowered), inlined (once per row)
                                h = hasher.copy()
                                h.update(lowered.encode("utf-8"))
                                member = from_bytes(h.digest(), "big", signed=True)
                                fp = 0
                                if fingerprint is not None:  # payload_fingerprint(fingerprint, payload), inlined
                                    h = fingerprint.copy()
                                    h.update(encoded)
                                    fp = from_bytes(h.digest(), "big", signed=True)
                                mapped.append(Record(seg, row_number, key, payload, lowered, member, fp, None, encoded))
                                keys.append(key)
                                if vids is not None:
                                    vids.append(member)
                                continue
                        item = slow(row_number, row)
            if item.__class__ is Record:
                if fingerprint is not None:
                    item.fp = payload_fingerprint(fingerprint, item.payload)
                mapped.append(item)
                keys.append(item.key)
                if vids is not None:
                    vids.append(self._value_id(item))
            else:
                rejects.append(item)
        if not mapped:
            return mapped, rejects
        records, duplicates = self._dedupe(mapped, keys, vids)
        if duplicates:
            rejects = sorted(rejects + duplicates, key=row_of) if rejects else duplicates
        return records, rejects

    def _map(self, row_number: int, row: Any) -> Record | Reject:
        """One row's mapping and field checks (no dedupe)."""
        if row.__class__ is not tuple and isinstance(row, Mapping):
            row = tuple(row.get(c) for c in self.columns)
        seg = self.segment
        raw_key = row[0]
        if raw_key.__class__ is str:
            key = raw_key.strip()
        else:
            key = "" if raw_key is None else str(_clean(raw_key)).strip()
        if not key:
            return Reject(seg, row_number, None, MISSING_KEY, self.mapping.key_column,
                          f"column '{self.mapping.key_column}' is empty")
        if not key.isascii() and not _is_unicode(key):
            return Reject(seg, row_number, _escaped(key), INVALID_VALUE, self.mapping.key_column,
                          f"column '{self.mapping.key_column}' {_NOT_UNICODE}")
        payload: dict[str, Any] = {}
        email = None
        for dest, col, index, kind, limit, required in self._plan:
            value = row[index]
            if kind == _EMAIL:
                email, problem = normalize_email(value)
                if email is None:
                    reason = MISSING_EMAIL if problem == "empty" else INVALID_EMAIL
                    return Reject(seg, row_number, key, reason, dest, f"email in column '{col}' {problem}")
                payload[dest] = email
                continue
            if value.__class__ is str:
                value = value.strip()
            elif value is not None:
                value = _clean(value)
            if value.__class__ is str and not value.isascii() and not _is_unicode(value):
                return Reject(seg, row_number, key, INVALID_VALUE, dest, f"'{dest}' (column '{col}') {_NOT_UNICODE}")
            if value is None or value == "":
                if required:
                    return Reject(seg, row_number, key, MISSING_VALUE, dest,
                                  f"'{dest}' (column '{col}') is required but empty")
                continue
            if limit is not None and value.__class__ is str and len(value) > limit:
                return Reject(seg, row_number, key, TOO_LONG, dest,
                              f"'{dest}' (column '{col}') has {len(value)} characters; at most {limit} allowed")
            payload[dest] = value
        lowered = email.lower() if email is not None else None
        return Record(seg, row_number, key, payload, lowered, member_id(lowered if lowered is not None else key))

    def _value_id(self, r: Record) -> int:
        """The id of the record's dedupe value: its member id when that value is the email, else the value's
        (the key's when it has none)."""
        if self._dedupe_by_email:
            return r.member if r.email is not None else member_id(r.key)
        value = r.payload.get(self._dedupe_field) if self._dedupe_field else None
        return member_id(str(value)) if value is not None else member_id(r.key)

    def _dedupe(self, records: list[Record], keys: list[str] | None = None,
                vids: list[int] | None = None) -> tuple[list[Record], list[Reject]]:
        """Records in order, without duplicates of a key in this segment or of a value in this export
        (``keys`` and ``vids``: the records' keys and value ids when the caller has them)."""
        dedupe = self._dedupe_field
        if vids is None:
            vids = list(map(self._value_id, records))
        if keys is None:
            keys = [r.key for r in records]
        verdicts = self._deduper.check_many(keys, vids, self._segment_index)
        if not any(verdicts):
            return records, []
        kept, rejects = [], []
        seg = self.segment
        key_column = self.mapping.key_column
        for r, verdict in zip(records, verdicts, strict=True):
            if verdict == 0:
                kept.append(r)
            elif verdict == KEY_SEEN:
                rejects.append(Reject(seg, r.row, r.key, DUPLICATE, key_column,
                                      f"this {key_column} appears more than once in segment '{seg}' (the first "
                                      "row is kept)"))
            else:
                what = f"'{dedupe}'" if dedupe and r.payload.get(dedupe) is not None else "key"
                rejects.append(Reject(seg, r.row, r.key, DUPLICATE, dedupe,
                                      f"the same {what} (case-insensitive) appears earlier in this export for "
                                      f"another customer, or twice for this customer in segment '{seg}'"))
        return kept, rejects


_NOT_UNICODE = ("holds a character that is not valid Unicode (a lone surrogate: text decoded with the wrong "
                "encoding or with errors='surrogateescape'); fix the text in the source")


def _is_unicode(text: str) -> bool:
    """True if ``text`` can be encoded as UTF-8 (it holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escaped(text: str) -> str:
    """``text`` with its lone surrogates written as ``\\udXXX`` (a reject's key must be writable)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def row_of(item: Reject) -> int:
    return item.row


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


def parse_date(value: Any) -> date | None:
    """A date from a date or datetime value, or from text starting ``YYYY-MM-DD`` or ``YYYY/MM/DD`` (a time after
    it ignored); None when it is none of these."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    text = str(value).strip()[:10]
    for fmt in ("%Y-%m-%d", "%Y/%m/%d"):
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    return None


def preview(value: Any) -> str:
    """A value as a reject message quotes it: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
