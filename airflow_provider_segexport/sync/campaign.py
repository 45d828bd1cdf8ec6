"""Dynamics 365 records as Adobe Campaign Standard profiles or custom-resource rows: the sync's destination.

Dynamics 365 is the source of truth for the synced attributes: a record the sync sends is compared with what
Campaign holds, and every synced field that differs is set to Dynamics 365's value (a value edited in Campaign is
overwritten, and the log counts it) - except the fields whose mapping writes them on creation only
(``apply_updates`` off). Campaign records are found by their key field (a custom filter on the Dynamics 365
key); their PKeys are used within a run and never kept. Campaign Standard writes one record a call: records go
out concurrently, a handful a batch, each with its own outcome.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from airflow_provider_segexport.export.destination import Destination, Outcome
from airflow_provider_segexport.export.records import VENDOR_REJECTED, FieldMapping, Record, redact_emails
from airflow_provider_segexport.export.sources import Segment
from airflow_provider_segexport.hooks.adobe_campaign import AdobeCampaignHook, is_permanent
from airflow_provider_segexport.http import VendorAPIError, encode_json
from airflow_provider_segexport.sync.tables import MODIFIED, STATE, TableSync

log = logging.getLogger(__name__)

#: records a batch (each one its own calls) and batches in flight by default: Adobe publishes no rate for
#: Campaign Standard; its gateway answers 429 when a client goes too fast, which the HTTP layer waits out
BATCH, DEFAULT_CONCURRENCY = 5, 8
LINK_NOT_FOUND = "link_not_found"
DUPLICATE_IN_CAMPAIGN = "duplicate_in_campaign"
#: records a page when the whole Campaign table is read at once (the index: see ``CampaignSyncDestination``)
INDEX_PAGE = 1000
#: a create answered with one of these (a gateway's timeout or error: the HTTP layer does not repeat a POST) may
#: have been processed, as one without an answer may: the record is looked for before it is created again
UNKNOWN_OUTCOME = frozenset({408, 502, 503, 504})


def sync_mapping(table: TableSync) -> FieldMapping:
    """The engine's mapping of a table: each source column kept under its own name (the key is the row key)."""
    fields = {c: c for c in table.columns if c not in (table.key, MODIFIED)}
    return FieldMapping(fields, key_column=table.key, email_field=None)


class CampaignSyncDestination(Destination):
    """Creates, updates, unlinks or deletes Campaign records for Dynamics 365 records of one table.

    :param hook: the Adobe Campaign hook.
    :param table: the table's sync configuration.
    :param mapping: :func:`sync_mapping` of the table.
    :param detect_deletions: read every row and treat a record that is gone from Dynamics 365 (or no longer
        passes the filter) as deleted (the engine's mirror mode).
    :param max_in_flight: batches in flight.
    """

    name = "Adobe Campaign"
    batch_size = BATCH
    max_in_flight = DEFAULT_CONCURRENCY
    converts_records = True  # prepare_many counts what is about to be sent (the index's decision)

    def __init__(self, hook: AdobeCampaignHook, table: TableSync, mapping: FieldMapping, *,
                 detect_deletions: bool = False, max_in_flight: int | None = None) -> None:
        super().__init__(mapping, f"{table.target} <- {table.entity_set}")
        self.hook = hook
        self.table = table
        self.mirror = detect_deletions
        if max_in_flight:
            self.max_in_flight = max(1, int(max_in_flight))
        self._profiles: dict[str, str | None] = {}  # contactid -> profile PKey (this run only)
        self._lock = threading.Lock()
        self.counters = {"fields_overwritten": 0, "deactivated": 0, "deleted_in_source": 0, "ignored": 0}
        # The index: every Campaign record of the target by key, read once (this run only, never stored), used
        # instead of one lookup a record once enough records are to be sent (see prepare_many).
        self._index: dict[str, list[dict]] | None = None
        self._pending = 0
        self._index_threshold: int | None = None
        self.index_pages = 0
        self._profiles_complete = False  # _profiles holds every profile (read once): a contact not in it has none
        self._link_pending = 0
        self._profile_threshold: int | None = None

    # -- the index ------------------------------------------------------------------------------------------
    def prepare_many(self, records: list[Record]) -> tuple[list[Record], list]:
        """Count the records about to be sent; once they are more than reading the whole table costs, read it.

        One lookup a record costs a call each, ``max_in_flight`` at a time; the index costs a call per
        :data:`INDEX_PAGE` records of the target, one after another (paging is sequential). So the table is
        read once the records to send reach its pages x ``max_in_flight``: a first sync or a replay reads it,
        an incremental run of a few changes looks its records up one by one.

        :param records: a chunk's records to be sent.
        """
        if records and self._index is None:
            self._pending += len(records)
            if self._index_threshold is None:
                pages = -(-self.hook.count(self.table.target) // INDEX_PAGE)
                self._index_threshold = max(1, pages) * self.max_in_flight
            if self._pending >= self._index_threshold:
                self._build_index()
        link = self.table.link
        if records and link and link.get("profile_key") and not self._profiles_complete:
            # the same reckoning for the profiles the rows link to (one lookup per contact not yet known)
            attribute = link["attribute"]
            self._link_pending += sum(1 for r in records if r.payload.get(attribute)
                                      and str(r.payload[attribute]).lower() not in self._profiles)
            if self._profile_threshold is None:
                pages = -(-self.hook.count("profile") // INDEX_PAGE)
                self._profile_threshold = max(1, pages) * self.max_in_flight
            if self._link_pending >= self._profile_threshold:
                self._build_profile_index(link["profile_key"])
        return records, []

    def _build_profile_index(self, key_field: str) -> None:
        """Every profile's PKey by the contact it holds (``key_field``), read once; a contact held by two
        profiles links to none (as its lookup would)."""
        started = time.monotonic()
        seen: dict[str, str | None] = {}
        rows = 0
        for row in self.hook.find_all("profile", None, {}, page_size=INDEX_PAGE):
            rows += 1
            contact = row.get(key_field)
            if contact not in (None, ""):
                contact = str(contact).lower()
                seen[contact] = None if contact in seen else row.get("PKey")
        with self._lock:
            self._profiles = seen
            self._profiles_complete = True
        log.info("Read Campaign's profiles once to link the rows to them (%d profiles, %d with a %s; %.1fs)", rows,
                 len(seen), key_field, time.monotonic() - started)

    def _build_index(self) -> None:
        t = self.table
        keep = {m.target for m in t.mappings} | {"PKey", "href", t.target_key}
        if t.unlink_field:
            keep.add(t.unlink_field)
        if t.link:
            keep.add("profile")
        started = time.monotonic()
        index: dict[str, list[dict]] = {}
        rows = 0
        for row in self.hook.find_all(t.target, None, {}, page_size=INDEX_PAGE):
            rows += 1
            key = row.get(t.target_key)
            if key not in (None, ""):
                index.setdefault(str(key).lower(), []).append({k: v for k, v in row.items() if k in keep})
        self.index_pages = max(1, -(-rows // INDEX_PAGE))
        self._index = index
        log.info("Read Campaign's %s records once (%d records, %d with a %s; %d page(s) in %.1fs): the records "
                 "to send are looked up there instead of one call each", t.target, rows, len(index), t.target_key,
                 self.index_pages, time.monotonic() - started)

    def fingerprint_config(self) -> bytes:
        """The table's target, key and mappings: a change sends every record again."""
        t = self.table
        return encode_json({"target": t.target, "key": t.target_key, "link": t.link, "on_delete": t.on_delete,
                            "mappings": [[m.source, m.target, m.apply_updates, m.label, sorted(map(str, m.replace.items()))]
                                         for m in t.mappings]})

    # -- per batch ------------------------------------------------------------------------------------------
    def send(self, segment: Segment, records: list[Record]) -> list[Outcome]:
        """Sync each record (find it in Campaign by its key, then create, update or leave it); one outcome each."""
        return [self._one(r) for r in records]

    def _one(self, r: Record) -> Outcome:
        try:
            return self._sync(r)
        except VendorAPIError as exc:
            if is_permanent(exc):
                return Outcome(r, "rejected", redact_emails(f"Adobe Campaign refused the record: {exc.message}"),
                               VENDOR_REJECTED)
            raise

    def _find(self, key: str) -> list[dict]:
        t = self.table
        return self.hook.find(t.target, t.find["filter"], t.find["param"], key)

    def _sync(self, r: Record) -> Outcome:
        t, p = self.table, r.payload
        index = self._index
        found = index.get(str(r.key).lower(), []) if index is not None else self._find(r.key)
        if len(found) > 1:
            return Outcome(r, "rejected", f"{len(found)} Campaign {t.target} records have {t.target_key} = this "
                           "key; merge them in Campaign", DUPLICATE_IN_CAMPAIGN)
        existing = found[0] if found else None
        if p.get(STATE) not in (None, 0, "0"):  # deactivated in Dynamics 365
            with self._lock:
                self.counters["deactivated"] += 1
            return Outcome(r, self._retire(existing))
        desired = {m.target: m.value(p.get(m.column)) for m in t.mappings}
        if t.link:
            contact = p.get(t.link["attribute"])
            pkey = self._profile_of(str(contact).lower()) if contact else None
            if contact and pkey is None:
                return Outcome(r, "rejected", f"no Campaign profile has the contact this row references "
                               f"({t.link['attribute']}); sync the contacts first", LINK_NOT_FOUND)
            desired["profile"] = {"PKey": pkey} if pkey else None
        if existing is None:
            body = {k: v for k, v in desired.items() if v is not None}
            body[t.target_key] = r.key
            if t.unlink_field:
                body[t.unlink_field] = False
            self._create(body, r.key)
            return Outcome(r, "created")
        changes: dict[str, Any] = {}
        for m in t.mappings:
            if m.apply_updates and not _same(desired[m.target], existing.get(m.target)):
                changes[m.target] = desired[m.target]
        if t.link and (existing.get("profile") or {}).get("PKey") != (desired["profile"] or {}).get("PKey"):
            changes["profile"] = desired["profile"]
        if t.unlink_field and existing.get(t.unlink_field):
            changes[t.unlink_field] = False  # back in Dynamics 365 (or active again): linked again
        if not changes:
            return Outcome(r, "unchanged")
        self.hook.update(existing["href"], changes)
        overwritten = sum(1 for k in changes if k in desired and existing.get(k) not in (None, ""))
        if overwritten:
            with self._lock:
                self.counters["fields_overwritten"] += overwritten
        return Outcome(r, "updated")

    def _create(self, body: dict, key: str) -> None:
        """Create the record; when the answer is lost (the record may exist), find it before creating again.

        A create is repeated as often as the HTTP layer repeats a safe request (its retry policy, with its
        backoff), each time only once the record was looked for and not found: a run of lost answers or cut
        connections on one record neither fails the sync at the first repeat nor creates the record twice.
        """
        retry = self.hook.http.retry
        attempt = 0
        while True:
            attempt += 1
            try:
                self.hook.create(self.table.target, body)
                return
            except VendorAPIError as exc:
                if (exc.status is not None and exc.status not in UNKNOWN_OUTCOME) or attempt >= retry.max_attempts:
                    raise
                outcome = "lost" if exc.status is None else f"HTTP {exc.status}"
            if self._find(key):
                log.info("Campaign's answer to a create was lost (%s); the record exists: not created again", outcome)
                return
            delay = retry.backoff(attempt)
            log.warning("Campaign's answer to a create was lost (%s) and the record does not exist: creating it "
                        "again in %.1fs (%d/%d)", outcome, delay, attempt, retry.max_attempts - 1)
            time.sleep(delay)

    def _profile_of(self, contact: str) -> str | None:
        """The PKey of the profile holding a contact (found by the link's filter, kept for this run only)."""
        if contact in self._profiles or self._profiles_complete:
            return self._profiles.get(contact)
        f = self.table.link["find"]
        found = self.hook.find("profile", f["filter"], f["param"], contact)
        pkey = found[0]["PKey"] if len(found) == 1 else None
        with self._lock:
            self._profiles[contact] = pkey
        return pkey

    def _retire(self, existing: dict | None) -> str:
        """A deactivated or deleted source record, as configured: the outcome's status."""
        t = self.table
        if existing is None:
            return "unchanged"
        if t.on_delete == "ignore":
            with self._lock:
                self.counters["ignored"] += 1
            return "unchanged"
        if t.on_delete == "delete":
            self.hook.delete(existing["href"])
            return "removed"
        if existing.get(t.unlink_field):
            return "unchanged"
        self.hook.update(existing["href"], {t.unlink_field: True})
        return "removed"

    # -- deletions (mirror) -----------------------------------------------------------------------------------
    def remove_members(self, segment: Segment, keys: list[str]) -> int:
        """Records gone from Dynamics 365 (or from the filter): unlinked, deleted or left, as configured.

        :param segment: the table.
        :param keys: the Dynamics 365 keys of the records gone.
        """
        t = self.table
        with self._lock:
            self.counters["deleted_in_source"] += len(keys)
        if t.on_delete == "ignore":
            log.warning("%d %s record(s) are gone from Dynamics 365 (deleted, or no longer pass the filter); "
                        "on_delete='ignore' leaves their Campaign records as they are", len(keys), t.name)
            return 0
        done = 0
        for key in keys:
            found = self._find(key)
            if len(found) == 1 and self._retire(found[0]) == "removed":
                done += 1
        log.info("%d %s record(s) gone from Dynamics 365: %d Campaign record(s) %s", len(keys), t.name, done,
                 "deleted" if t.on_delete == "delete" else f"unlinked ({t.unlink_field} = true)")
        return done

    def http_stats(self) -> dict[str, int]:
        """The hook's request, retry and throttling counts."""
        return self.hook.http.stats.as_dict() if "http" in self.hook.__dict__ else {}


def _same(want: Any, have: Any) -> bool:
    if want is None or want == "":
        return have is None or have == ""
    if isinstance(want, bool) or isinstance(have, bool):
        return want == have
    if isinstance(want, int | float) and isinstance(have, int | float):
        return float(want) == float(have)
    return str(want) == str(have)
