"""How segment members become members of Dynamics 365 Sales static marketing lists of contacts. The one place
that knows the marketing list's rules.

What an export never does: create or change a contact (contacts are only read, in bulk, to check that each
exists and is active), add a contact twice, or take off a list a member it did not add (a member added by hand
stays, even in mirror mode).

One static marketing list (member type contact) per segment: the list whose ID the export state remembers, else
the one named ``list_name`` (one list of that name: several are an error naming them), else a new one, created
when the segment's first members are sent.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from airflow_provider_segexport.export.destination import (
    BatchOutcome,
    BatchRefused,
    Destination,
    ExportError,
    Outcome,
    in_chunks,
)
from airflow_provider_segexport.export.records import (
    CONTACT_INACTIVE,
    CONTACT_NOT_FOUND,
    INVALID_VALUE,
    FieldMapping,
    Record,
    Reject,
)
from airflow_provider_segexport.export.sources import Segment
from airflow_provider_segexport.hooks.dynamics365 import (
    ADD_MEMBERS_MAX,
    DEFAULT_CONCURRENCY,
    IN_FILTER_MAX,
    MAX_CONCURRENCY,
    MAX_PER_SEGMENT,
    MEMBER_TYPE_CONTACT,
    Dynamics365Hook,
    is_guid,
)
from airflow_provider_segexport.http import VendorAPIError
from airflow_provider_segexport.http import encode_json as _encode

log = logging.getLogger(__name__)

MODES = ("upsert", "mirror")
#: the payload's field holding the contact ID, or the value matched against ``match_on``
CONTACT, MATCH = "contactid", "match"
#: a state key for a member that was on the list before the export added it: never removed by mirror mode
_NOT_OURS = "~"
LIST_NAME_MAX = 128


def dynamics_sales_mapping(*, key_column: str, contact_id_field: str | None = None,
                           match_field: str | None = None) -> FieldMapping:
    """The mapping of a Dynamics 365 Sales export: the contact ID column, or the column matched to contacts.

    :param key_column: the column identifying a row (the customer ID).
    :param contact_id_field: the column holding the Dataverse ``contactid``.
    :param match_field: the column whose value is looked up in the contact attribute ``match_on``.
    """
    if bool(contact_id_field) == bool(match_field):
        raise ValueError("give contact_id_field (a column of Dataverse contact IDs) or match_on with match_field, "
                         "not both")
    dest = CONTACT if contact_id_field else MATCH
    return FieldMapping({dest: contact_id_field or match_field}, key_column=key_column, email_field=None,
                        required=(dest,), dedupe_field=dest)


class DynamicsSalesDestination(Destination):
    """Adds the members of segments to static marketing lists of existing Dynamics 365 contacts.

    :param hook: the Dynamics 365 hook.
    :param mapping: built by :func:`dynamics_sales_mapping`.
    :param list_name: the list's name for a segment; ``{segment}`` stands for the segment's name.
    :param match_on: the contact attribute (a column or alternate key, e.g. ``emailaddress1``) the mapping's
        ``match`` values are looked up in; None when the mapping carries contact IDs.
    :param mode: ``upsert`` or ``mirror`` (also takes off the list the members who left the segment and that an
        earlier export added).
    :param max_in_flight: calls in flight.
    """

    name = "Dynamics 365 Sales"
    batch_size = ADD_MEMBERS_MAX
    max_in_flight = DEFAULT_CONCURRENCY
    max_per_segment = MAX_PER_SEGMENT
    converts_records = True  # contact IDs checked (or resolved) in bulk; unknown and inactive contacts rejected
    has_member_key = True  # the contact ID, or the matched value
    assigns_keys = True  # the state keeps the contact ID (mirror removals), or that the member was not ours
    remembers_targets = True  # each segment's marketing list

    def __init__(self, hook: Dynamics365Hook, mapping: FieldMapping, *, list_name: str = "{segment}",
                 match_on: str | None = None, mode: str = "upsert", max_in_flight: int | None = None) -> None:
        super().__init__(mapping, "marketing lists")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if (CONTACT in mapping.fields) == bool(match_on):
            raise ValueError("match_on goes with a match column; contact_id_field without match_on")
        self.hook = hook
        self.list_name = list_name
        self.match_on = match_on
        self.field = MATCH if match_on else CONTACT
        self.mode = mode
        self.mirror = mode == "mirror"
        if max_in_flight:
            self.max_in_flight = max(1, min(MAX_CONCURRENCY, int(max_in_flight)))
        self.dry_run = False
        self._remembered: dict[str, str | None] = {}
        #: segment -> {"id", "name", "created", "url"}
        self.lists: dict[str, dict[str, Any]] = {}
        self._members: dict[str, set[str]] = {}  # segment -> contact IDs on its list
        self._pool: ThreadPoolExecutor | None = None  # contact lookups
        self._ours: set[tuple[str, str]] = set()  # (segment, contact ID) an earlier export added (state keys)
        self._lock = threading.Lock()

    # -- pre-flight ---------------------------------------------------------------------------------------
    def recall_targets(self, targets: dict[str, str | None]) -> None:
        """The marketing list IDs the export state remembers, per segment.

        :param targets: segment name -> list ID or None.
        """
        self._remembered = dict(targets)

    def target_of(self, segment: Segment) -> str | None:
        """The segment's marketing list ID (for the export state).

        :param segment: a segment exported by this run.
        """
        found = self.lists.get(segment.name)
        return found["id"] if found and found.get("id") else None

    def preflight(self, segments: list[Segment], dry_run: bool) -> None:
        """Find each segment's marketing list (created at the segment's first send when there is none) and read
        its members."""
        self.dry_run = dry_run
        names: dict[str, str] = {}
        for seg in segments:
            name = self.list_name.replace("{segment}", seg.name).strip()
            if not name or len(name) > LIST_NAME_MAX:
                raise ExportError(f"The marketing list name for segment '{seg.name}' is {len(name)} characters long "
                                  f"({name[:40]!r}); Dynamics 365 takes 1 to {LIST_NAME_MAX}. Change list_name.")
            if name in names.values():
                raise ExportError(f"Segments '{seg.name}' and "
                                  f"'{next(k for k, v in names.items() if v == name)}' would share the marketing list "
                                  f"'{name}'; give list_name a {{segment}} placeholder.")
            names[seg.name] = name
        for seg in segments:
            found = self._find_list(seg.name, names[seg.name])
            self.lists[seg.name] = found
            self._members[seg.name] = set(self.hook.list_member_ids(found["id"])) if found.get("id") else set()
            log.info("Segment '%s' -> marketing list '%s' (%s): %s member(s) on it now", seg.name, found["name"],
                     found.get("id") or ("created at the first send" if not dry_run else "would be created"),
                     f"{len(self._members[seg.name]):,}")

    def _find_list(self, segment: str, name: str) -> dict[str, Any]:
        remembered = self._remembered.get(segment)
        if remembered:
            row = self.hook.get_list(remembered)
            if row is not None:
                self._check_list(row, segment)
                return self._describe(row, created=False)
            log.warning("The marketing list %s the export state remembers for segment '%s' no longer exists; "
                        "looking for one named '%s'", remembered, segment, name)
        rows = self.hook.find_lists(name)
        if len(rows) > 1:
            raise ExportError(
                f"{len(rows)} marketing lists are named '{name}' (segment '{segment}'): "
                + ", ".join(f"{r['listid']} ({'static' if not r.get('type') else 'dynamic'})" for r in rows)
                + ". Rename or delete the extra ones in Dynamics 365, or give list_name another name.")
        if rows:
            self._check_list(rows[0], segment)
            return self._describe(rows[0], created=False)
        return {"id": None, "name": name, "created": False, "url": None}

    def _check_list(self, row: dict, segment: str) -> None:
        problems = []
        if row.get("type"):
            problems.append("it is dynamic (its members come from a query)")
        if row.get("createdfromcode") not in (None, MEMBER_TYPE_CONTACT):
            problems.append(f"its members are not contacts (member type {row.get('createdfromcode')})")
        if row.get("statecode") not in (None, 0):
            problems.append("it is inactive")
        if row.get("lockstatus"):
            problems.append("it is locked")
        if problems:
            raise ExportError(f"Marketing list '{row.get('listname')}' ({row['listid']}) for segment '{segment}' "
                              f"cannot take the segment's members: {'; '.join(problems)}. Use a static, active, "
                              "unlocked list of contacts (or another list_name).")

    def _describe(self, row: dict, created: bool) -> dict[str, Any]:
        list_id = str(row["listid"]).lower()
        return {"id": list_id, "name": row.get("listname"), "created": created, "url": self.hook.list_url(list_id)}

    def _list_id(self, segment: Segment) -> str:
        """The segment's list ID, creating the list at its first send."""
        info = self.lists[segment.name]
        if info["id"] is None:
            with self._lock:
                if info["id"] is None:
                    list_id = self.hook.create_list(info["name"], f"Members of segment '{segment.name}', exported "
                                                    "by Airflow (airflow-provider-segexport).")
                    info.update(self._describe({"listid": list_id, "listname": info["name"]}, created=True))
                    log.info("Created static marketing list '%s' (%s) for segment '%s'", info["name"], list_id,
                             segment.name)
        return info["id"]

    def fingerprint_config(self) -> bytes:
        """The mapping, the matching and the list names: a change sends every member again."""
        return _encode({"fields": self.mapping.fields, "match_on": self.match_on, "list_name": self.list_name})

    # -- per record -------------------------------------------------------------------------------------------
    def member_key(self, record: Record) -> str:
        """The contact ID (lower case), or the matched value (trimmed, lower case).

        :param record: a validated record.
        """
        return str(record.payload[self.field]).strip().lower()

    def prepare_many(self, records: list[Record]) -> tuple[list[Record], list[Reject]]:
        """The records whose contact exists and is active (their contact ID set in ``dest_key``); the others are
        rejects: a malformed ID ``invalid_value``, an unknown one ``contact_not_found``, an inactive one
        ``contact_inactive``. Contacts are read in bulk, never one request a member."""
        column = self.mapping.fields[self.field]
        out: list[Record] = []
        rejects: list[Reject] = []
        wanted: dict[str, list[Record]] = {}
        for r in records:
            if r.dest_key and not r.dest_key.startswith(_NOT_OURS):  # an earlier export added it to the list
                with self._lock:
                    self._ours.add((r.segment, r.dest_key))
            value = self.member_key(r)
            if self.field == CONTACT and not is_guid(value):
                rejects.append(Reject(r.segment, r.row, r.key, INVALID_VALUE, column,
                                      f"'{column}' is not a Dataverse contact ID (a GUID like "
                                      "00000000-0000-0000-0000-000000000000)"))
                continue
            wanted.setdefault(value, []).append(r)
        found: dict[str, list[dict]] = {}
        if wanted:
            attribute = self.match_on or "contactid"
            select = "contactid,statecode" + (f",{attribute}" if self.match_on else "")
            values = list(wanted)
            chunks = [values[i: i + IN_FILTER_MAX] for i in range(0, len(values), IN_FILTER_MAX)]
            # the chunk's queries at once, as many as the calls the export keeps in flight
            for rows in self._lookups().map(lambda c: list(self.hook.contacts_where_in(attribute, c, select)), chunks):
                for row in rows:
                    value = str(row.get(attribute) or "").strip().lower()
                    found.setdefault(value, []).append(row)
        for value, recs in wanted.items():
            contacts = found.get(value) or []
            for r in recs:
                if not contacts:
                    what = f"no contact has {self.match_on} = this value" if self.match_on else "no contact has this ID"
                    rejects.append(Reject(r.segment, r.row, r.key, CONTACT_NOT_FOUND, column,
                                          f"'{column}': {what}; the export never creates contacts"))
                elif len(contacts) > 1:
                    rejects.append(Reject(r.segment, r.row, r.key, INVALID_VALUE, column,
                                          f"'{column}': {len(contacts)} contacts have {self.match_on} = this value; "
                                          "match on a unique attribute (an alternate key)"))
                elif contacts[0].get("statecode") not in (0, None):
                    rejects.append(Reject(r.segment, r.row, r.key, CONTACT_INACTIVE, column,
                                          f"'{column}': the contact is inactive; an inactive contact is not added"))
                else:
                    r.dest_key = str(contacts[0]["contactid"]).lower()
                    out.append(r)
        if rejects and out:
            out.sort(key=_row)
        return out, rejects

    # -- per batch --------------------------------------------------------------------------------------------
    def send(self, segment: Segment, records: list[Record]) -> BatchOutcome:
        """Add the records' contacts that are not on the segment's list yet (one ``AddListMembersList``); those
        already on it are unchanged (and not ours to remove, unless an earlier export added them)."""
        list_id = self._list_id(segment)
        on_list = self._members[segment.name]
        new = [r for r in records if r.dest_key not in on_list]
        if new:
            try:
                self.hook.add_list_members(list_id, [r.dest_key for r in new])
            except VendorAPIError as exc:
                if exc.status in (400, 404):  # e.g. a contact deleted since it was checked: find which
                    raise BatchRefused(exc.message) from exc
                raise
            with self._lock:
                on_list.update(r.dest_key for r in new)
        new_ids = {id(r) for r in new}
        ours = self._ours
        for r in records:
            if id(r) not in new_ids and (r.segment, r.dest_key) not in ours:  # on the list, not added by an export
                r.dest_key = _NOT_OURS + r.dest_key
        unchanged = len(records) - len(new)
        counts = {"created": len(new), "unchanged": unchanged}
        return BatchOutcome({k: v for k, v in counts.items() if v})

    # -- mirror -----------------------------------------------------------------------------------------------
    def remove_members(self, segment: Segment, keys: list[str]) -> int:
        """Mirror: take off the segment's list the members who left the segment and that an earlier export
        added (a member that was on the list before, e.g. added by hand, stays).

        :param segment: the segment they left.
        :param keys: their contact IDs as the export state kept them.
        """
        ours = [k for k in keys if k and not k.startswith(_NOT_OURS)]
        kept = len(keys) - len(ours)
        if kept:
            log.info("Mirror: %d member(s) who left segment '%s' were on the list before the export added them "
                     "(e.g. by hand): they stay", kept, segment.name)
        if not ours:
            return 0
        list_id = self._list_id(segment)
        removed = in_chunks(ours, 1, lambda one: int(self.hook.remove_list_member(list_id, one[0])),
                            self.max_in_flight)
        with self._lock:
            self._members[segment.name].difference_update(ours)
        log.info("Mirror: took %d member(s) who left segment '%s' off its marketing list", removed, segment.name)
        return removed

    def _lookups(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="segexport-lookup")
        return self._pool

    def close(self) -> None:
        """Stop the lookup threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def http_stats(self) -> dict[str, int]:
        """The hook's request, retry and throttling counts."""
        return self.hook.http.stats.as_dict() if "http" in self.hook.__dict__ else {}


def _row(r: Record | Outcome) -> int:
    return r.row
