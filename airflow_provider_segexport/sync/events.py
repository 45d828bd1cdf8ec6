"""Email events Adobe Campaign -> Dynamics 365: sent, open, click and bounce events as activities on the contact's
timeline, the way Adobe's own integration shows the marketing history to sellers.

Where the events come from: the Adobe I/O Events journal of the Campaign registration (the way Campaign offers
them in bulk; API-FACTS 4.6), read page by page from a cursor kept in the export state between runs, following
each answer's ``Link: rel="next"``; an answer 204 means nothing newer yet (its ``Retry-After`` says when to ask
again). Events are read in windows of a few batches; a window's events are written, and only then does the cursor
move past them. A run that fails (or is killed) leaves the cursor before the window it was writing: the retry
reads those events again, and writing them again changes nothing, because each event's ID is the alternate key of
its Dataverse record and the records are written with ``UpsertMultiple`` by that key (exactly once however often
the journal or a retry replays an event).
The journal is one source (:class:`JournalSource`); the other is the log files an ACS export workflow writes to
storage (:class:`~airflow_provider_segexport.sync.event_files.LogFileSource`): both give windows of events and a
cursor move per window, and share everything below.

Which contact an event belongs to: the event names the Campaign profile (its PKey, used within the run only); the
profile's ``cusCrmId`` is the contact ID the contacts sync (Dynamics 365 -> Campaign) wrote there. That link is
exact (one contact, chosen by the sync, surviving an email change on either side), whereas an email address may
belong to several contacts or none in Dynamics 365. Each profile is read once a run, and the contact IDs are
checked in Dataverse in bulk (``Microsoft.Dynamics.CRM.In``): a contact deleted since, a profile without the ID
(not created by the sync) or a profile deleted since the event are rejects with their reason, not failures.
``match_email=True`` falls back, for a profile without the ID, to the one active contact with the profile's email
address (several: a reject).

How they are written: ``UpsertMultiple`` on the events table, ``batch_size`` records a call (Microsoft: "1,000
records per request is a reasonable place to start"; a standard table rolls the whole call back on one error, so
a refused call is halved until the bad record is isolated and rejected), ``max_in_flight`` calls at once through
the engine's :class:`~airflow_provider_segexport.export.sender.BatchSender`. Dataverse's answer does not say which
records were new: the IDs already there are read first (one ``In`` query per 250), so the summary can tell created
from already there ("updated").

A table without ``UpsertMultiple`` (Microsoft: the bulk messages work with "custom standard tables and many common
standard tables, but not all"): with ``write_with="auto"`` the first call's answer says so, and the rest of the run
writes with ``$batch`` instead (one ``PATCH`` upsert by the event-ID key per record, up to 1,000 a request, each
answered on its own: a refused record is a reject, the others are written); ``write_with="batch"`` goes straight to
it. See :meth:`EventsSync._send` and :meth:`~airflow_provider_segexport.hooks.dynamics365.Dynamics365Hook.upsert_batch`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from airflow_provider_segexport.export.destination import BatchRefused, Outcome
from airflow_provider_segexport.export.records import (
    CONTACT_NOT_FOUND,
    VENDOR_REJECTED,
    Record,
    Reject,
    redact_emails,
)
from airflow_provider_segexport.export.sender import BatchSender
from airflow_provider_segexport.http import VendorAPIError

log = logging.getLogger(__name__)

#: the email event types the sync knows (Campaign's names)
EVENT_TYPES = ("sent", "open", "click", "bounce")
_ALIASES = {"send": "sent", "sent": "sent", "delivered": "sent", "open": "open", "opened": "open", "click": "click",
            "clicked": "click", "urlclick": "click", "bounce": "bounce", "bounced": "bounce"}
#: records per UpsertMultiple call: "Generally, we expect that 1,000 records per request is a reasonable place to
#: start if the size of the record data is small and there are no plug-ins" (MS bulk-operations, "Number of records
#: with standard tables"); configurable, as the same page recommends
UPSERT_MAX = 1000
#: calls in flight by default (a modest share of Dataverse's 52 concurrent requests per user)
DEFAULT_IN_FLIGHT = 4
#: Campaign profiles read at once when resolving contacts
PROFILE_LOOKUPS_IN_FLIGHT = 8
#: batches read ahead of the cursor: a window is this many batches (its events are written before the cursor moves)
WINDOW_BATCHES = 4
#: the export-state segment name of the journal cursor
CURSOR_SEGMENT = "journal"
PROFILE_NOT_FOUND = "profile_not_found"
AMBIGUOUS_CONTACT = "ambiguous_contact"
DUPLICATE_EVENT = "duplicate_event"
#: how the records are written: ``auto`` (``UpsertMultiple``; ``$batch`` for the rest of the run once Dataverse says
#: the table has no ``UpsertMultiple``), ``upsert_multiple`` (only it), ``batch`` (only ``$batch``)
WRITE_WITH = ("auto", "upsert_multiple", "batch")
#: Dataverse's error codes for "this table has no such message" (SdkEntityDoesNotSupportMessage: hexadecimal as the
#: Web API writes it, and decimal); see :func:`message_unsupported`
MESSAGE_UNSUPPORTED_CODES = frozenset({"0x80040800", "-2147219456"})
#: statuses of a request inside a ``$batch`` that refuse that record (a reject); any other error fails the write
BATCH_REJECT_STATUSES = frozenset({400, 404, 409, 412, 413, 422})


def message_unsupported(exc: VendorAPIError, message: str = "UpsertMultiple") -> bool:
    """Whether Dataverse's error says the table has no ``message`` (so ``$batch`` is the way to write to it).

    Microsoft documents how to test availability (MS bulk-operations, "Availability with standard tables",
    https://learn.microsoft.com/power-apps/developer/data-platform/bulk-operations: ``GET sdkmessagefilters?$select=
    sdkmessagefilterid&$filter=sdkmessageid/name eq @message and primaryobjecttypecode eq @table&@message=
    'CreateMultiple'&@table='sample_example'``, an empty ``value`` when the table lacks it) but not the error of a
    call to a table without it, and a Microsoft reviewer notes that "Standard table does not have UpsertMultiple
    filter for every entity" (microsoft/PowerApps-Samples#495): the query may deny a message that works. So the
    call's own answer decides. Recognised: the platform's ``SdkEntityDoesNotSupportMessage`` fault, code
    ``0x80040800``, "The 'UpsertMultiple' method does not support entities of type '<table>'. MessageProcessorCache
    returned MessageProcessor.Empty." (public code records it; not in Microsoft's docs); the documented
    "<message> has not yet been implemented." (bulk-operations, DeleteMultiple on a standard table); and 404
    ``0x8006088a`` "Resource not found for the segment '...UpsertMultiple'" (an environment without the action; MS
    troubleshoot web-api-client-errors).

    :param exc: the error of the call.
    :param message: the message called.
    """
    if exc.status is None or exc.retryable or exc.status in (401, 403):
        return False
    code = str(exc.code or "").strip().lower()
    text = str(exc.message or "")
    return (code in MESSAGE_UNSUPPORTED_CODES or "does not support entities of type" in text
            or f"{message} has not yet been implemented" in text
            or (code == "0x8006088a" and message in text))


class EventsConfigError(ValueError):
    """The events sync's configuration is not usable; the message names the setting."""


def event_types(value: Iterable[str] | str | None) -> tuple[str, ...]:
    """The enabled event types, checked (a comma-separated string or a list; None: all four)."""
    if value is None:
        return EVENT_TYPES
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    out = []
    for item in filter(None, items):
        t = _ALIASES.get(item.lower())
        if t is None:
            raise EventsConfigError(f"Unknown email event type {item!r}; the types are {', '.join(EVENT_TYPES)}.")
        if t not in out:
            out.append(t)
    return tuple(out)


@dataclass(frozen=True)
class CampaignEvent:
    """One email event read from the journal or from a log file (what the sync uses of it).

    ``crm_id`` is the profile's contact ID when the source carries it (a log file's column: no profile read);
    ``row`` and ``origin`` say where a log file's event came from (its data row and file, for the rejects).
    """

    id: str
    type: str | None
    timestamp: str | None
    pkey: str | None
    email: str | None
    delivery: str | None = None
    url: str | None = None
    bounce_type: str | None = None
    campaign: str | None = None
    mirror_page: str | None = None
    crm_id: str | None = None
    row: int | None = field(default=None, compare=False)
    origin: str | None = field(default=None, compare=False)

    @classmethod
    def from_journal(cls, entry: dict) -> CampaignEvent | None:
        """The event of a journal entry ``{"position", "event"}`` (a CloudEvents envelope whose ``data`` is the
        Campaign event; the payload is not published by Adobe, see the sandbox's docstring), None without an ID."""
        ev = entry.get("event") if isinstance(entry.get("event"), dict) else entry
        data = ev.get("data") if isinstance(ev.get("data"), dict) else {}
        eid = ev.get("id") or data.get("eventId")
        if not eid:
            return None
        raw_type = data.get("eventType") or str(ev.get("type") or "").rsplit(".", 1)[-1]
        profile = data.get("profile") if isinstance(data.get("profile"), dict) else {}
        return cls(id=str(eid), type=_ALIASES.get(str(raw_type).lower()), timestamp=data.get("timestamp") or ev.get("time"),
                   pkey=profile.get("PKey"), email=profile.get("email") or None, delivery=data.get("deliveryName"),
                   url=data.get("url"), bounce_type=data.get("bounceType"), campaign=data.get("campaignName"),
                   mirror_page=data.get("mirrorPageUrl"))


_DEFAULT_SUBJECTS = {"sent": "Email sent: {delivery}", "open": "Email opened: {delivery}",
                     "click": "Email link clicked: {delivery}", "bounce": "Email bounced: {delivery}"}
_DEFAULT_TYPE_VALUES = {"sent": 100000000, "open": 100000001, "click": 100000002, "bounce": 100000003}
_DEFAULT_COLUMNS = {"delivery": "new_deliveryname", "url": "new_trackingurl", "bounce_type": "new_bouncetype",
                    "campaign": "new_campaignname", "mirror_page": "new_mirrorpageurl"}


@dataclass(frozen=True)
class EventEntity:
    """The Dataverse table the events become records of: a custom activity regarding the contact.

    :param logical_name: the table's logical name (``new_emailevent``, ``adobe_emailevent``...).
    :param entity_set: its entity set (``new_emailevents``).
    :param event_id: the text column holding the Campaign event's ID: an alternate key of the table.
    :param regarding: the regarding lookup's navigation property for a contact
        (``regardingobjectid_contact_<logical name>``).
    :param type_column: the choice column of the event type (None: not written).
    :param type_values: event type -> the choice's value.
    :param date_columns: the columns given the event's time (``new_eventdate``, ``actualend``...).
    :param columns: event field (``delivery``, ``url``, ``bounce_type``, ``campaign``, ``mirror_page``) -> column
        (a field left out is not written).
    :param subjects: event type -> the activity's subject, with ``{delivery}``, ``{url}``, ``{type}`` filled in.
    """

    logical_name: str = "new_emailevent"
    entity_set: str = "new_emailevents"
    event_id: str = "new_eventid"
    regarding: str = ""
    type_column: str | None = "new_eventtype"
    type_values: dict[str, Any] = field(default_factory=lambda: dict(_DEFAULT_TYPE_VALUES))
    date_columns: tuple[str, ...] = ("new_eventdate", "actualend")
    columns: dict[str, str] = field(default_factory=lambda: dict(_DEFAULT_COLUMNS))
    subjects: dict[str, str] = field(default_factory=lambda: dict(_DEFAULT_SUBJECTS))

    @classmethod
    def from_dict(cls, spec: dict[str, Any] | None) -> EventEntity:
        """The entity from a configuration dict (every key optional; see the README)."""
        spec = dict(spec or {})
        known = {"logical_name", "entity_set", "event_id", "regarding", "type_column", "type_values", "date_columns",
                 "columns", "subjects"}
        unknown = set(spec) - known
        if unknown:
            raise EventsConfigError(f"Events entity: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}.")
        logical = spec.get("logical_name") or cls.logical_name
        out = cls(
            logical_name=logical,
            entity_set=spec.get("entity_set") or (logical + "s"),
            event_id=spec.get("event_id") or cls.event_id,
            regarding=spec.get("regarding") or f"regardingobjectid_contact_{logical}",
            type_column=spec.get("type_column", cls.type_column),
            type_values={**_DEFAULT_TYPE_VALUES, **(spec.get("type_values") or {})},
            date_columns=tuple(spec.get("date_columns", cls.date_columns) or ()),
            columns={**_DEFAULT_COLUMNS, **(spec.get("columns") or {})} if "columns" not in spec or spec["columns"]
            else {},
            subjects={**_DEFAULT_SUBJECTS, **(spec.get("subjects") or {})},
        )
        unknown_fields = set(out.columns) - set(_DEFAULT_COLUMNS)
        if unknown_fields:
            raise EventsConfigError(f"Events entity: unknown event field(s) {sorted(unknown_fields)} in 'columns'; "
                                    f"the fields are {sorted(_DEFAULT_COLUMNS)}.")
        return out

    def record(self, event: CampaignEvent, contact_id: str) -> dict[str, Any]:
        """The event's Dataverse record (an UpsertMultiple target identified by the event ID key)."""
        key = event.id.replace("'", "''")
        values = {"delivery": event.delivery, "url": event.url, "type": event.type}
        subject = self.subjects.get(event.type or "", "Email event: {delivery}").format_map(_Blank(values)).strip()
        body: dict[str, Any] = {"@odata.id": f"{self.entity_set}({self.event_id}='{key}')", self.event_id: event.id,
                                "subject": subject.rstrip(": ")[:400],
                                f"{self.regarding}@odata.bind": f"/contacts({contact_id})"}
        if self.type_column and event.type in self.type_values:
            body[self.type_column] = self.type_values[event.type]
        for column in self.date_columns:
            if event.timestamp:
                body[column] = event.timestamp
        for name, column in self.columns.items():
            value = getattr(event, name)
            if column and value not in (None, ""):
                body[column] = value
        return body


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return ""

    def __getitem__(self, key: str) -> str:
        value = super().get(key)
        return "" if value is None else str(value)


def load_cursor(raw: str | None) -> str | None:
    """The journal position kept in the export state (JSON ``{"since": ...}``), or None."""
    if not raw:
        return None
    try:
        return json.loads(raw).get("since") or None
    except (ValueError, AttributeError):
        return raw


def since_of(url: str | None) -> str | None:
    """The ``since`` position of a journal link (a 204's ``rel="next"``), or None."""
    if not url:
        return None
    values = parse_qs(urlsplit(url).query).get("since")
    return values[0] if values else None


class ContactResolver:
    """Campaign profile -> Dynamics 365 contact ID, for the events of a run (profiles read once, contacts checked in
    bulk).

    :param campaign: the Adobe Campaign hook.
    :param dataverse: the Dynamics 365 hook.
    :param crm_id_field: the profile field holding the contact ID (``cusCrmId``).
    :param match_email: for a profile without the contact ID, the one contact with its email address.
    """

    def __init__(self, campaign, dataverse, crm_id_field: str = "cusCrmId", match_email: bool = False) -> None:
        self.campaign = campaign
        self.dataverse = dataverse
        self.crm_id_field = crm_id_field
        self.match_email = match_email
        self._profiles: dict[str, tuple[str | None, str | None]] = {}  # PKey -> (contact ID, email); None: gone
        self._contacts: dict[str, bool] = {}  # contact ID -> exists
        self._emails: dict[str, list[str]] = {}  # lower-cased email -> contact IDs
        self.profile_reads = 0

    def _read_profile(self, pkey: str) -> tuple[str, tuple[str | None, str | None] | None]:
        profile = self.campaign.get_profile(pkey)
        if profile is None:
            return pkey, None
        crm = str(profile.get(self.crm_id_field) or "").strip().lower() or None
        return pkey, (crm, profile.get("email") or None)

    def resolve(self, events: Sequence[CampaignEvent]) -> dict[str, tuple[str | None, str, str]]:
        """event ID -> (contact ID, reason, message): the contact ID, or None with the reject's reason and words."""
        wanted = sorted({e.pkey for e in events if e.pkey and e.pkey not in self._profiles})
        if wanted:
            with ThreadPoolExecutor(min(PROFILE_LOOKUPS_IN_FLIGHT, len(wanted)), thread_name_prefix="acs-profile") as pool:
                for pkey, found in pool.map(self._read_profile, wanted):
                    self._profiles[pkey] = found  # type: ignore[assignment]
            self.profile_reads += len(wanted)
        ids = {p[0] for e in events if e.pkey and (p := self._profiles.get(e.pkey)) and p[0]}
        unchecked = [c for c in ids if c not in self._contacts]
        if unchecked:
            found = {str(r["contactid"]).lower() for r in self.dataverse.contacts_where_in("contactid", unchecked,
                                                                                           select="contactid")}
            self._contacts.update({c: c in found for c in unchecked})
        if self.match_email:
            emails = {(p[1] or "").lower() for e in events if e.pkey and (p := self._profiles.get(e.pkey))
                      and not p[0] and p[1]} - set(self._emails)
            if emails:
                for e in emails:
                    self._emails[e] = []
                for row in self.dataverse.contacts_where_in("emailaddress1", sorted(emails),
                                                            select="contactid,emailaddress1,statecode"):
                    if row.get("statecode") in (0, None) and row.get("emailaddress1"):
                        self._emails.setdefault(row["emailaddress1"].lower(), []).append(str(row["contactid"]).lower())
        out: dict[str, tuple[str | None, str, str]] = {}
        for e in events:
            out[e.id] = self._one(e)
        return out

    def _one(self, e: CampaignEvent) -> tuple[str | None, str, str]:
        if not e.pkey:
            return None, PROFILE_NOT_FOUND, "the event names no Campaign profile"
        profile = self._profiles.get(e.pkey)
        if profile is None:
            return None, PROFILE_NOT_FOUND, "the Campaign profile of the event no longer exists"
        crm, email = profile
        if crm:
            if self._contacts.get(crm):
                return crm, "", ""
            return None, CONTACT_NOT_FOUND, f"no Dynamics 365 contact has the ID the profile carries ({crm})"
        if self.match_email and email:
            hits = self._emails.get(email.lower()) or []
            if len(hits) == 1:
                return hits[0], "", ""
            if len(hits) > 1:
                return None, AMBIGUOUS_CONTACT, f"{len(hits)} active Dynamics 365 contacts have the profile's email"
            return None, CONTACT_NOT_FOUND, (f"the Campaign profile carries no {self.crm_id_field} and no active "
                                             "Dynamics 365 contact has its email")
        return None, CONTACT_NOT_FOUND, (f"the Campaign profile carries no {self.crm_id_field} (it was not created by "
                                         "the contacts sync)")


@dataclass
class EventCounts:
    """Counts of a run, per event type and in all (thread-safe through :attr:`lock`)."""

    by_type: dict[str, Counter] = field(default_factory=dict)
    read: int = 0
    skipped_type: int = 0
    unknown_type: int = 0
    duplicates: int = 0
    not_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, etype: str | None, status: str, n: int = 1) -> None:
        with self.lock:
            self.by_type.setdefault(etype or "unknown", Counter())[status] += n

    def totals(self) -> Counter:
        out: Counter = Counter()
        for c in self.by_type.values():
            out.update(c)
        return out


@dataclass
class EventWindow:
    """A window of a source: its entries (journal entries or :class:`CampaignEvent` objects), and what moves the
    source's cursor past them once they are written (or rejected)."""

    entries: list
    commit: Callable[[], None]


class JournalSource:
    """The Adobe I/O Events journal, read from the cursor kept in the export state (the default source).

    ``windows`` yields about ``size`` entries at a time, following ``Link: rel="next"``, until the journal has nothing
    newer (its 204's ``Retry-After`` is kept in ``sync.retry_after``) or ``sync.max_events`` are read.
    """

    name = "journal"

    def windows(self, sync: EventsSync, size: int) -> Iterator[EventWindow]:
        stored = load_cursor(sync.state.target(sync.scope_id))
        sync.cursor = stored or sync.since
        sync.log.info("Reading Adobe I/O Events from %s; writing %s to Dataverse %s (event ID key %s)",
                      "the cursor kept by the last run" if stored else ("the trigger's position" if sync.since else
                                                                        f"the {sync.start_at} event"),
                      ", ".join(sync.enabled) or "no event type", sync.entity.entity_set, sync.entity.event_id)
        next_url: str | None = None
        done = False
        while not done:
            window: list[dict] = []
            position = sync.cursor
            while len(window) < size:
                if next_url:
                    page = sync.campaign.read_journal(url=next_url)
                else:
                    page = sync.campaign.read_journal(since=position, limit=sync.journal_limit,
                                                      latest=position is None and sync.start_at == "latest")
                if not page.events:
                    sync.retry_after = page.retry_after
                    if position is None:  # nothing read yet and no cursor: start from where the journal is now
                        position = since_of(page.next_url) or position
                    done = True
                    break
                window.extend(page.events)
                position = page.last
                next_url = page.next_url
                if sync.max_events and sync.counts.read + len(window) >= sync.max_events:
                    done = True
                    break
            yield EventWindow(window, lambda position=position: self._move(sync, position))

    @staticmethod
    def _move(sync: EventsSync, position: str | None) -> None:
        if position and position != sync.cursor:
            # every event up to here is written (or rejected): the cursor moves past them
            sync.state.set_target(sync.scope_id, json.dumps({"since": position}), sync.run_id)
            sync.cursor = position


class EventsSync:
    """One run of the events sync: read the source (the journal, or log files) from its cursor, write the events,
    move the cursor.

    :param campaign: the Adobe Campaign hook (the journal and the profiles).
    :param dataverse: the Dynamics 365 hook.
    :param entity: the events table.
    :param resolver: the profile -> contact resolver.
    :param enabled: the event types written (the others are read past and counted).
    :param state: the export state backend; ``scope_id`` its segment of the cursor.
    :param rejects: a :class:`~airflow_provider_segexport.export.report.RejectsWriter`.
    :param run_id: the Airflow run (recorded with the cursor).
    :param batch_size: records per UpsertMultiple call or ``$batch`` (at most :data:`UPSERT_MAX`).
    :param max_in_flight: calls at once.
    :param write_with: ``auto`` (``UpsertMultiple``, then ``$batch`` for the rest of the run if the table has no
        ``UpsertMultiple``), ``upsert_multiple`` or ``batch`` (:data:`WRITE_WITH`).
    :param journal_limit: events per journal page asked for (None: the journal's default).
    :param max_events: stop after about this many events (the rest waits for the next run); None: until the journal
        has nothing newer.
    :param start_at: without a cursor: ``earliest`` (every event the journal still holds: 7 days) or ``latest``.
    :param since: a position to start from when the state holds none (the trigger's).
    :param progress_interval: seconds between progress lines.
    :param source: where the events come from: an object whose ``windows(sync, size)`` yields
        :class:`EventWindow` objects (default :class:`JournalSource`; the log files:
        :class:`~airflow_provider_segexport.sync.event_files.LogFileSource`).
    """

    def __init__(self, campaign, dataverse, entity: EventEntity, resolver: ContactResolver, *,
                 enabled: Sequence[str], state, scope_id: int, rejects, run_id: str, batch_size: int = UPSERT_MAX,
                 max_in_flight: int = DEFAULT_IN_FLIGHT, journal_limit: int | None = None,
                 max_events: int | None = None, start_at: str = "earliest", since: str | None = None,
                 progress_interval: float = 10.0, logger: logging.Logger | Any = None,
                 write_with: str = "auto", source: Any = None) -> None:
        if write_with not in WRITE_WITH:
            raise EventsConfigError(f"write_with must be one of {', '.join(WRITE_WITH)}, not {write_with!r}.")
        if not 1 <= int(batch_size) <= UPSERT_MAX:
            raise EventsConfigError(f"batch_size must be between 1 and {UPSERT_MAX} (records per UpsertMultiple).")
        if start_at not in ("earliest", "latest"):
            raise EventsConfigError("start_at must be 'earliest' or 'latest'.")
        self.campaign = campaign
        self.dataverse = dataverse
        self.entity = entity
        self.resolver = resolver
        self.enabled = tuple(enabled)
        self.state = state
        self.scope_id = scope_id
        self.rejects = rejects
        self.run_id = run_id
        self.batch_size = int(batch_size)
        self.max_in_flight = max(1, int(max_in_flight))
        self.journal_limit = journal_limit
        self.max_events = max_events
        self.start_at = start_at
        self.since = since
        self.progress_interval = progress_interval
        self.log = logger or log
        self.source = source if source is not None else JournalSource()
        self.counts = EventCounts()
        self.retry_after: float | None = None
        self.cursor: str | None = None
        self._seen: set[str] = set()
        self._row = 0
        self.write_with = write_with
        #: how the records are being written (``upsert_multiple`` or ``batch``); None: ``auto``, not known yet
        self._mode: str | None = None if write_with == "auto" else write_with
        self._probe = threading.Lock()  # one call at a time while _mode is unknown
        self._mode_lock = threading.Lock()

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Sync every event newer than the source's cursor (or ``max_events`` of them); return the summary."""
        started = time.monotonic()
        last_line = time.monotonic()
        with BatchSender(self._send, self._on_result, self._on_not_sent, max_in_flight=self.max_in_flight,
                         name="Dataverse", logger=self.log) as sender:
            for window in self.source.windows(self, self.batch_size * WINDOW_BATCHES):
                if window.entries:
                    self._write(sender, window.entries)
                    sender.wait()
                    if sender.failure is not None:
                        self.log.error("Dataverse refused a write (%s); the cursor stays before these %d events: the "
                                       "next try reads them again and writes each once", sender.failure,
                                       len(window.entries))
                        raise sender.failure
                window.commit()  # every event of the window is written (or rejected): the cursor moves past them
                if time.monotonic() - last_line >= self.progress_interval:
                    last_line = time.monotonic()
                    self._progress(started)
        self._progress(started)
        return self.summary(time.monotonic() - started)

    def _progress(self, started: float) -> None:
        t = self.counts.totals()
        elapsed = max(1e-6, time.monotonic() - started)
        self.log.info("Campaign email events: %s read (%s/s): created=%s, already there=%s, rejected=%s, "
                      "type off=%s", f"{self.counts.read:,}", f"{self.counts.read / elapsed:,.0f}", f"{t['created']:,}",
                      f"{t['updated']:,}", f"{t['rejected']:,}", f"{self.counts.skipped_type:,}")

    def _write(self, sender: BatchSender, entries: list) -> None:
        """Parse a window's entries (journal entries, or events a source parsed), resolve their contacts, reject
        what cannot be written, send the rest."""
        events: list[tuple[int, CampaignEvent]] = []
        for entry in entries:
            self._row += 1
            self.counts.read += 1
            ev = entry if isinstance(entry, CampaignEvent) else CampaignEvent.from_journal(entry)
            if ev is None or ev.type is None:
                self.counts.unknown_type += 1
                continue
            if ev.type not in self.enabled:
                self.counts.skipped_type += 1
                continue
            if ev.id.lower() in self._seen:  # the journal gave it twice within this run: written once
                self.counts.duplicates += 1
                continue
            self._seen.add(ev.id.lower())
            events.append((ev.row if ev.row is not None else self._row, ev))
        if not events:
            return
        resolved = self.resolver.resolve([e for _, e in events])
        records: list[Record] = []
        for row, ev in events:
            contact, reason, message = resolved[ev.id]
            if contact is None:
                self.counts.add(ev.type, "rejected")
                if ev.origin:
                    message = f"{message} ({ev.origin}, row {row})"
                self.rejects.write(Reject(ev.type, row, ev.id, reason, message=message))
                continue
            records.append(Record(ev.type, row, ev.id, self.entity.record(ev, contact)))
        for i in range(0, len(records), self.batch_size):
            sender.submit(None, records[i: i + self.batch_size])

    def _send(self, _context: Any, records: list[Record]) -> list[Outcome]:
        """One write of a batch (the IDs already there read first, to tell created from already there): an
        ``UpsertMultiple`` call, or a ``$batch`` of upserts (:meth:`_send_batch`) when ``write_with="batch"`` or once
        Dataverse said the table has no ``UpsertMultiple`` (``auto``).

        In ``auto`` mode the first call goes alone (the batches behind it wait for its answer), so a table without
        ``UpsertMultiple`` gets one such call a run, not one per batch in flight; the answer that switches is the one
        :func:`message_unsupported` recognises, logged once at WARNING.
        """
        e = self.entity
        existing = {str(r.get(e.event_id) or "").lower()
                    for r in self.dataverse.rows_where_in(e.entity_set, e.event_id, [r.key for r in records],
                                                          select=e.event_id)}
        if self._mode is None:
            with self._probe:
                if self._mode is None:
                    return self._upsert(records, existing)
        return self._upsert(records, existing)

    def _upsert(self, records: list[Record], existing: set[str]) -> list[Outcome]:
        if self._mode == "batch":
            return self._send_batch(records, existing)
        e = self.entity
        try:
            self.dataverse.upsert_multiple(e.entity_set, e.logical_name, [r.payload for r in records])
        except VendorAPIError as exc:
            if message_unsupported(exc):
                if self.write_with != "auto":  # not a record's fault: halving would reject every event
                    raise
                self._fall_back_to_batch(exc)
                return self._send_batch(records, existing)
            if exc.status in (400, 404, 412, 413):  # the content: the call is halved until the bad record is alone
                self._decided("upsert_multiple")  # the table has the message: it refused a record
                raise BatchRefused(redact_emails(str(exc.message)) or "refused") from exc
            raise
        self._decided("upsert_multiple")
        outcomes = [Outcome(r, "updated" if r.key.lower() in existing else "created") for r in records]
        for o in outcomes:  # written: counted per type here (the batch's outcome only counts statuses)
            self.counts.add(o.record.segment, o.status)
        return outcomes

    def _decided(self, mode: str) -> None:
        with self._mode_lock:
            if self._mode is None:
                self._mode = mode

    def _fall_back_to_batch(self, exc: VendorAPIError) -> None:
        """The table has no ``UpsertMultiple``: ``$batch`` for the rest of the run (said once, at WARNING)."""
        with self._mode_lock:
            if self._mode == "batch":
                return
            self._mode = "batch"
        self.log.warning(
            "Dataverse has no UpsertMultiple for the table %s (%s%s); writing the events with $batch for the rest "
            "of this run: one PATCH upsert by the %s key per event, up to %d a request. Slower than UpsertMultiple "
            "(each event is a separate operation for Dataverse), still exactly once. write_with='batch' skips the "
            "UpsertMultiple attempt.", self.entity.logical_name, f"{exc.code}: " if exc.code else "",
            redact_emails(str(exc.message)).strip(), self.entity.event_id, self.batch_size)

    def _send_batch(self, records: list[Record], existing: set[str]) -> list[Outcome]:
        """The records as one ``$batch`` of upserts by the event-ID key
        (:meth:`~airflow_provider_segexport.hooks.dynamics365.Dynamics365Hook.upsert_batch`, where the documented
        behaviour is cited), each answered on its own (``Prefer: odata.continue-on-error``).

        A request answered 400/404/409/412/413/422 is that record's reject with Dataverse's message (e.g. "A
        validation error occurred. The length of the 'subject' attribute ... exceeded the maximum allowed length",
        MS execute-batch-operations "Handling errors"); the others are written. Any other error inside the batch
        (401/403, throttling, 5xx) fails the write like a refused call: the cursor stays, and the retry upserts the
        same keys again (a PATCH by alternate key updates the record it created: no duplicate).
        """
        e = self.entity
        answers = self.dataverse.upsert_batch(e.entity_set, e.event_id, [(r.key, r.payload) for r in records])
        for a in answers:
            if not a.ok and a.status not in BATCH_REJECT_STATUSES:
                raise VendorAPIError("Dataverse", a.status, redact_emails(a.message), code=a.code, method="PATCH",
                                     path=f"$batch {e.entity_set}({e.event_id}=...)")
        outcomes = []
        for r, a in zip(records, answers, strict=True):
            if a.ok:
                o = Outcome(r, "updated" if r.key.lower() in existing else "created")
                self.counts.add(r.segment, o.status)  # a reject is counted by _on_result
            else:
                o = Outcome(r, "rejected", message=redact_emails(a.message + (f" ({a.code})" if a.code else "")))
            outcomes.append(o)
        return outcomes

    def _on_result(self, _context: Any, records: list[Record], outcome) -> None:
        rejected = {id(o.record): o for o in outcome.exceptions if o.status == "rejected"}
        for r in records:
            o = rejected.get(id(r))
            if o is None:
                continue
            self.counts.add(r.segment, "rejected")
            self.rejects.write(Reject(r.segment, r.row, r.key, o.reason or VENDOR_REJECTED,
                                      message="Dataverse refused the event's record", vendor_message=o.message))

    def _on_not_sent(self, _context: Any, records: list[Record]) -> None:
        with self.counts.lock:
            self.counts.not_sent += len(records)

    # -- summary ------------------------------------------------------------------------------------------------
    def summary(self, duration: float) -> dict[str, Any]:
        t = self.counts.totals()
        by_type = {k: {s: c.get(s, 0) for s in ("created", "updated", "rejected")}
                   for k, c in sorted(self.counts.by_type.items())}
        return {
            "events_read": self.counts.read,
            "event_types": list(self.enabled),
            "by_type": by_type,
            "totals": {"created": t.get("created", 0), "updated": t.get("updated", 0),
                       "rejected": t.get("rejected", 0), "type_disabled": self.counts.skipped_type,
                       "unknown_type": self.counts.unknown_type, "duplicates_in_journal": self.counts.duplicates,
                       "not_sent": self.counts.not_sent},
            "profiles_read": self.resolver.profile_reads,
            "written_with": self._mode,
            "source": getattr(self.source, "name", "journal"),
            "cursor": self.cursor,
            "journal_retry_after_s": self.retry_after,
            "duration_s": round(duration, 3),
        }
