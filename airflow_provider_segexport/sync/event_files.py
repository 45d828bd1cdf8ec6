"""The second source of the email-events sync: the delivery/tracking log files an Adobe Campaign Standard export
workflow writes to storage, read as CSV through Airflow's ``ObjectStoragePath``.

Why: the Adobe I/O Events journal keeps 7 days and is read an event at a time; Adobe's bulk way out of Campaign is a
workflow ("Incremental query on the delivery log / tracking log -> Extract file -> Transfer file", AdobeDocs
campaign-standard.en help/automating/using/exporting-logs.md): each execution exports the logs newer than the
previous one to one file on SFTP, Amazon S3 or Azure Blob storage. The operator can start that workflow (or trigger
its External signal activity) through the workflow API and wait until it finished
(:meth:`~airflow_provider_segexport.hooks.adobe_campaign.AdobeCampaignHook.workflow`), then reads the files here.

**Which files, once each.** The files under the folder (``ObjectStoragePath``: ``file://``, ``s3://``, ``sftp://``,
``abfs://``... with an Airflow connection), named ``*.csv``, ``*.txt`` (Extract file's default) or either ``.gz``
(its "Compression" post-processing), hidden and ``.part``/``.tmp`` names left out, are read in **name order**:
Extract file's "Add date and time to the file name" names them ``<label>_<YYYYMMDD_HHMMSS>`` so that name order is
export order. The cursor in the export state is ``{"done": <the last file read to its end>, "file": <the file being
read>, "row": <its rows written>}``: a file whose name sorts at or before ``done`` is never read again; a run that
failed in the middle of a file goes on from the row after the last written window (rows before it are read past,
not written). Each window's events are written before the cursor moves, as with the journal; writing an event again
(a retry, two exports overlapping) updates its record by the event-ID key: exactly once.

**The columns** (the header line; names matched case-insensitively; ``log_columns`` maps other names): the event's
ID (``eventId``, or "Delivery log ID" / ``id``: the ID must be the same as the journal's for the two sources to
write the same records), its type (``eventType``: sent, open, click, bounce, or a synonym such as delivered,
opened, clicked, bounced), its date (``logDate`` / ``eventDate``: ISO 8601 or Campaign's ``YYYY-MM-DD
HH:MM:SS.mmmZ``, without a zone taken as UTC), the profile: its contact ID (the ``crm_id_field``, ``cusCrmId``:
then no profile is read), else its ``profilePKey`` (the profile is read, as for the journal), else its ``email``
(with ``match_email=True``); optional ``deliveryLabel``, ``url``, ``bounceType``, ``campaignName``,
``mirrorPageUrl``. A file without the ID, type or date column, or without any profile column, fails the run (the
cursor stays before it): it was not made for this sync. A row that cannot be used is a **reject** naming the file,
the row (its data row number: the header is row 0), the column and why: no event ID, an unknown type, a date that
is not one, a contact ID that is not a GUID, no profile, a wrong number of fields; it is never dropped silently.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from airflow_provider_segexport.export.records import (
    INVALID_VALUE,
    MISSING_KEY,
    MISSING_VALUE,
    Reject,
    preview,
    redact_emails,
)
from airflow_provider_segexport.sync.events import (
    _ALIASES,
    EVENT_TYPES,
    CampaignEvent,
    ContactResolver,
    EventsConfigError,
    EventWindow,
)

log = logging.getLogger(__name__)

#: the export-state segment name of the log-file cursor (next to the journal's)
LOG_CURSOR_SEGMENT = "log_files"
#: the file names read when no ``pattern`` is given (Extract file writes .txt by default, .csv when asked; .gz
#: when compressed)
DEFAULT_SUFFIXES = (".csv", ".txt", ".csv.gz", ".txt.gz")
#: event field -> the header names recognised for it (case-insensitive); the first is what the sandbox's export
#: workflow writes. ``crm_id`` also takes the resolver's ``crm_id_field``.
LOG_COLUMNS: dict[str, tuple[str, ...]] = {
    "id": ("eventId", "event id", "Delivery log ID", "Tracking log ID", "logId", "id"),
    "type": ("eventType", "event type", "type"),
    "timestamp": ("logDate", "eventDate", "log date", "event date", "date", "timestamp"),
    "delivery": ("deliveryLabel", "deliveryName", "delivery"),
    "url": ("url", "trackingUrl", "clickedUrl"),
    "bounce_type": ("bounceType", "bounce type"),
    "email": ("email", "profileEmail"),
    "crm_id": ("cusCrmId", "crmId", "contactId"),
    "pkey": ("profilePKey", "PKey"),
    "campaign": ("campaignName", "campaignLabel", "campaign"),
    "mirror_page": ("mirrorPageUrl", "mirrorPage"),
}
REQUIRED = ("id", "type", "timestamp")
PROFILE_FIELDS = ("crm_id", "pkey", "email")
_GUID = re.compile(r"^\{?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}?$")
#: the type words of Campaign's logs and exports, beyond the sync's own aliases
_TYPE_ALIASES = {**_ALIASES, "email sent": "sent", "sending": "sent", "email open": "open", "opening": "open",
                 "email click": "click", "bounces": "bounce", "error": "bounce", "failed": "bounce"}


class FileReject(Reject, gc=False):
    """A reject that names the log file it comes from (``file`` in the rejects file)."""

    file: str | None = None

    def as_json(self) -> dict:
        out = super().as_json()
        out["file"] = self.file
        return out


def load_file_cursor(raw: str | None) -> dict[str, Any]:
    """The log-file cursor kept in the export state: ``{"done", "file", "row"}`` (empty without one)."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def normalize_date(text: str) -> str | None:
    """The date as ISO 8601 (kept as given when it is: the same text as the journal's), or None when it is not a
    date. Campaign's ``YYYY-MM-DD HH:MM:SS.mmmZ`` gets its ``T``; a date without a zone is taken as UTC."""
    text = text.strip()
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if len(text) > 10 and text[10] == " ":
        text = text[:10] + "T" + text[11:]
    if len(text) == 10:
        text += "T00:00:00"
    if dt.tzinfo is None:
        text += "Z"
    return text


class LogColumns:
    """Where each event field is in a file (from its header line).

    :param header: the header line's names.
    :param origin: the file's name (for the messages).
    :param overrides: event field -> the header name the customer gave it (``log_columns``).
    :param crm_id_field: the profile field holding the contact ID (a column of that name is the contact ID).
    """

    def __init__(self, header: Sequence[str], origin: str, overrides: dict[str, str] | None = None,
                 crm_id_field: str = "cusCrmId") -> None:
        self.header = [h.strip() for h in header]
        self.width = len(self.header)
        lowered = {h.lower(): i for i, h in reversed(list(enumerate(self.header)))}
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(LOG_COLUMNS)
        if unknown:
            raise EventsConfigError(f"log_columns: unknown event field(s) {sorted(unknown)}; the fields are "
                                    f"{sorted(LOG_COLUMNS)}.")
        self.index: dict[str, int] = {}
        self.names: dict[str, str] = {}
        for name, aliases in LOG_COLUMNS.items():
            if name in overrides:
                candidates: tuple[str, ...] = (overrides[name],)
            elif name == "crm_id":
                candidates = (crm_id_field, *aliases)
            else:
                candidates = aliases
            for candidate in candidates:
                i = lowered.get(str(candidate).strip().lower())
                if i is not None:
                    self.index[name] = i
                    self.names[name] = self.header[i]
                    break
            else:
                if name in overrides:
                    raise EventsConfigError(f"{origin}: log_columns names the column {overrides[name]!r} for "
                                            f"{name!r}, but the file's header has no such column ({self.header}).")
        missing = [n for n in REQUIRED if n not in self.index]
        if missing:
            raise EventsConfigError(
                f"{origin}: the header has no column for the event's {', '.join(missing)} (looked for "
                + "; ".join(f"{n}: {', '.join(LOG_COLUMNS[n])}" for n in missing)
                + f"). Its columns: {self.header}. Map them with log_columns, or fix the Extract file activity.")
        if not any(n in self.index for n in PROFILE_FIELDS):
            raise EventsConfigError(f"{origin}: the header names no profile column ({crm_id_field}, profilePKey or "
                                    f"email); its columns: {self.header}.")

    def label(self, name: str) -> str:
        return self.names.get(name) or LOG_COLUMNS[name][0]


def parse_log_row(values: Sequence[str], columns: LogColumns, row: int, origin: str) -> CampaignEvent | FileReject:
    """The event of a log file's data row, or the reject saying which column is wrong and why.

    :param values: the row's fields.
    :param columns: where each field is.
    :param row: the data row's number (the header is row 0).
    :param origin: the file's name.
    """
    def get(name: str) -> str:
        i = columns.index.get(name)
        return values[i].strip() if i is not None and i < len(values) else ""

    def reject(reason: str, name: str | None, message: str, key: str | None = None, etype: str | None = None):
        return FileReject(etype or "unknown", row, key, reason, field=columns.label(name) if name else None,
                          message=f"{origin}, row {row}: {message}", file=origin)

    eid = get("id")
    etype = _TYPE_ALIASES.get(get("type").lower())
    if len(values) != columns.width:
        return reject(INVALID_VALUE, None, f"{len(values)} fields where the header has {columns.width} (a delimiter "
                      "or quote out of place?)", eid or None, etype)
    if not eid:
        return reject(MISSING_KEY, "id", "no event ID", None, etype)
    if etype is None:
        return reject(INVALID_VALUE, "type", f"unknown event type {redact_emails(preview(get('type')))} (the types: "
                      f"{', '.join(EVENT_TYPES)})", eid)
    stamp = normalize_date(get("timestamp"))
    if stamp is None:
        return reject(INVALID_VALUE, "timestamp", f"{redact_emails(preview(get('timestamp')))} is not a date "
                      "(ISO 8601, or YYYY-MM-DD HH:MM:SS.mmmZ)", eid, etype)
    crm = get("crm_id")
    if crm and not _GUID.match(crm):
        return reject(INVALID_VALUE, "crm_id", f"{redact_emails(preview(crm))} is not a Dynamics 365 contact ID "
                      "(a GUID)", eid, etype)
    pkey, email = get("pkey"), get("email")
    if not (crm or pkey or email):
        named = [columns.label(n) for n in PROFILE_FIELDS if n in columns.index]
        return reject(MISSING_VALUE, next(n for n in PROFILE_FIELDS if n in columns.index),
                      f"the row names no profile (empty {', '.join(named)})", eid, etype)
    return CampaignEvent(id=eid, type=etype, timestamp=stamp, pkey=pkey or None, email=email or None,
                         delivery=get("delivery") or None, url=get("url") or None,
                         bounce_type=get("bounce_type") or None, campaign=get("campaign") or None,
                         mirror_page=get("mirror_page") or None, crm_id=crm.strip("{}").lower() or None,
                         row=row, origin=origin)


class LogContactResolver(ContactResolver):
    """The contacts of log-file events: a row carrying the contact ID (or, without a PKey, only the email) is
    resolved from the row itself (no profile read: the ID is checked in Dataverse in bulk, the email matched with
    ``match_email``), a row carrying only the profile's PKey as for the journal (the profile read once a run)."""

    def resolve(self, events: Sequence[CampaignEvent]) -> dict[str, tuple[str | None, str, str]]:
        mapped = []
        for e in events:
            if e.crm_id or not e.pkey:
                # the profile as the file gives it, under a key no PKey can have: nothing to read
                key = f"\x00row\x00{e.crm_id or ''}\x00{(e.email or '').lower()}"
                self._profiles.setdefault(key, (e.crm_id, e.email))
                e = replace(e, pkey=key)
            mapped.append(e)
        return super().resolve(mapped)


class LogFileSource:
    """The CSV log files under a folder, read in name order from the cursor kept in the export state.

    :param path: the folder (an ``ObjectStoragePath``, or a URL made into one with ``conn_id``).
    :param conn_id: the Airflow connection of the storage (``aws_default``, an SFTP connection...).
    :param pattern: a glob the file names must match (default: :data:`DEFAULT_SUFFIXES`).
    :param columns: event field -> header name, for headers named otherwise (see :data:`LOG_COLUMNS`).
    :param delimiter: the field delimiter (Extract file's "CSV": ``,``; ``;`` or a tab as configured there).
    :param encoding: the files' encoding (``utf-8-sig``: UTF-8 with or without a byte-order mark).
    :param crm_id_field: the profile field holding the contact ID (a column of that name is read as it).
    """

    name = "log_files"

    def __init__(self, path: Any, *, conn_id: str | None = None, pattern: str | None = None,
                 columns: dict[str, str] | None = None, delimiter: str = ",", encoding: str = "utf-8-sig",
                 crm_id_field: str = "cusCrmId") -> None:
        if not isinstance(path, str) and hasattr(path, "iterdir"):
            self.path = path
        else:
            from airflow.sdk import ObjectStoragePath

            self.path = ObjectStoragePath(str(path), conn_id=conn_id) if conn_id else ObjectStoragePath(str(path))
        if not delimiter or len(delimiter) != 1:
            raise EventsConfigError(f"log_delimiter must be one character, not {delimiter!r}.")
        self.pattern = pattern
        self.columns = {str(k): str(v) for k, v in (columns or {}).items()}
        unknown = set(self.columns) - set(LOG_COLUMNS)
        if unknown:  # fails before anything is read
            raise EventsConfigError(f"log_columns: unknown event field(s) {sorted(unknown)}; the fields are "
                                    f"{sorted(LOG_COLUMNS)}.")
        self.delimiter = delimiter
        self.encoding = encoding
        self.crm_id_field = crm_id_field
        self.files_read: list[str] = []
        self.rows_rejected = 0

    # -- the files ----------------------------------------------------------------------------------------------
    def _wanted(self, name: str) -> bool:
        if name.startswith(".") or name.endswith((".part", ".tmp", ".filepart")):
            return False
        if self.pattern:
            from fnmatch import fnmatchcase

            return fnmatchcase(name, self.pattern)
        return name.lower().endswith(DEFAULT_SUFFIXES)

    def pending(self, done: str | None) -> list:
        """The files not read to their end yet, in name order."""
        try:
            if not self.path.exists():
                raise EventsConfigError(f"The log folder {self.path} does not exist (log_path; the Transfer file "
                                        "activity of the export workflow writes there).")
            entries = list(self.path.iterdir())
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise EventsConfigError(f"Cannot list the log folder {self.path}: {exc}") from exc
        files = sorted((p for p in entries if self._wanted(p.name)), key=lambda p: p.name)
        return [p for p in files if done is None or p.name > done]

    def windows(self, sync, size: int) -> Iterator[EventWindow]:
        """The events of the files after the cursor, ``size`` at a time (windows do not span files; a file's last
        window moves the cursor past the file)."""
        cursor = load_file_cursor(sync.state.target(sync.scope_id))
        done = cursor.get("done") or None
        files = self.pending(done)
        sync.cursor = json.dumps(cursor) if cursor else None
        sync.log.info("Reading Campaign log files under %s: %d file(s) after %s; writing %s to Dataverse %s (event ID "
                      "key %s)", self.path, len(files), repr(done) if done else "none read yet",
                      ", ".join(sync.enabled) or "no event type", sync.entity.entity_set, sync.entity.event_id)
        for f in files:
            skip = int(cursor.get("row") or 0) if cursor.get("file") == f.name else 0
            if skip:
                sync.log.info("%s: going on after row %d (written by an earlier try)", f.name, skip)
            for events, row, finished in self._read(f, sync, size, skip):
                state = {"done": f.name} if finished else {"done": done, "file": f.name, "row": row}
                yield EventWindow(events, lambda state=state: self._move(sync, state))
            done = f.name
            self.files_read.append(f.name)
            if sync.max_events and sync.counts.read >= sync.max_events:
                break

    @staticmethod
    def _move(sync, state: dict) -> None:
        raw = json.dumps(state)
        if raw != sync.cursor:
            sync.state.set_target(sync.scope_id, raw, sync.run_id)
            sync.cursor = raw

    def _read(self, f, sync, size: int, skip: int) -> Iterator[tuple[list[CampaignEvent], int, bool]]:
        """(events, last row, whether the file ends there) for one file, streaming."""
        with f.open("rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if f.name.lower().endswith(".gz") else raw
            text = io.TextIOWrapper(stream, encoding=self.encoding, newline="")
            reader = csv.reader(text, delimiter=self.delimiter)
            try:
                header = next(reader, None)
            except csv.Error as exc:
                raise EventsConfigError(f"{f.name}: the header line cannot be read as CSV ({exc}).") from exc
            if header is None:  # an empty file (an export with no event)
                yield [], 0, True
                return
            columns = LogColumns(header, f.name, self.columns, self.crm_id_field)
            row = 0
            window: list[CampaignEvent] = []
            stuck_at = -1
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    row += 1
                    if reader.line_num == stuck_at:
                        raise EventsConfigError(f"{f.name}: cannot read on after line {reader.line_num} ({exc}).") \
                            from exc
                    stuck_at = reader.line_num
                    if row > skip:
                        self._reject(sync, FileReject("unknown", row, None, INVALID_VALUE, message=(
                            f"{f.name}, row {row}: not readable as CSV ({exc})"), file=f.name))
                    continue
                row += 1
                if row <= skip or not values or (len(values) == 1 and not values[0].strip()):
                    continue  # written by an earlier try / a blank line
                parsed = parse_log_row(values, columns, row, f.name)
                if isinstance(parsed, FileReject):
                    self._reject(sync, parsed)
                    continue
                window.append(parsed)
                if len(window) >= size:
                    yield window, row, False
                    window = []
            yield window, row, True

    def _reject(self, sync, reject: FileReject) -> None:
        with sync.counts.lock:
            sync.counts.read += 1
        sync.counts.add(reject.segment, "rejected")
        sync.rejects.write(reject)
        self.rows_rejected += 1

