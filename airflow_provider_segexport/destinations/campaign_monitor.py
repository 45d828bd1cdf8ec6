"""How segment members become Campaign Monitor subscriber imports, and how the import answers become per-row
outcomes. The one place that knows Campaign Monitor's subscriber payload, custom-field types and import codes.

What an export never does: resubscribe anyone (``Resubscribe`` is always false on imports: an unsubscribed,
bounced, deleted or suppressed address stays as it is and comes back as a reject with Campaign Monitor's
code), queue autoresponders unless asked, or unsubscribe anyone. The one exception to "never resubscribe" is
a subscriber *this export removed* from the list (``remove_leavers``) who joins a segment again: Campaign
Monitor refuses a Deleted subscriber without ``Resubscribe``, so exactly those are added back one by one.

Segment membership is visible in Campaign Monitor as a MultiSelectMany custom field (``segment_field``,
default ``Segments``) listing the export's segments the subscriber is in. Campaign Monitor replaces a
multi-valued field with the values given, so each subscriber is sent with every segment of the export that
holds it (read before sending: :class:`~airflow_provider_segexport.export.membership.Membership`).
"""

from __future__ import annotations

import logging
import math
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

from airflow_provider_segexport.export.destination import (
    BatchOutcome,
    EmailDestination,
    ExportError,
    Outcome,
    in_chunks,
)
from airflow_provider_segexport.export.membership import Membership
from airflow_provider_segexport.export.records import (
    INVALID_EMAIL,
    INVALID_VALUE,
    TOO_LONG,
    FieldMapping,
    Record,
    Reject,
    member_id,
    parse_date,
    preview,
    redact_emails,
)
from airflow_provider_segexport.export.sources import Segment
from airflow_provider_segexport.export.state import RefusalStore
from airflow_provider_segexport.hooks.campaign_monitor import (
    DEFAULT_CONCURRENCY,
    IMPORT_MAX,
    MAX_CONCURRENCY,
    MAX_PER_EXPORT,
    CampaignMonitorHook,
)
from airflow_provider_segexport.http import encode_json as _encode

log = logging.getLogger(__name__)

CONSENT_VALUES = ("Yes", "No", "Unchanged")
MODES = ("upsert", "mirror")
#: "each custom field value has a data limit of 250 characters" (Campaign Monitor, Adding a subscriber)
VALUE_MAX = 250
#: "ensure the date is no earlier than 1900/01/01 and no later than 2076/06/06 or it will be ignored"
DATE_MIN, DATE_MAX = date(1900, 1, 1), date(2076, 6, 6)
#: FailureDetails codes: https://www.campaignmonitor.com/api/v3-3/subscribers/ (import)
CODE_INVALID_EMAIL = 1
CODE_DELETED = 205
#: field names in the mapping (the payload's keys) that are not custom fields
EMAIL, NAME, FIRST, LAST, CONSENT = "EmailAddress", "Name", "FirstName", "LastName", "ConsentToTrack"
CUSTOM = "cf:"
_TRUE = {"yes", "y", "true", "1", "on"}
_FALSE = {"no", "n", "false", "0", "off"}


def custom_field_key(name: str) -> str:
    """The payload key of a mapped custom field."""
    return CUSTOM + name


class CampaignMonitorDestination(EmailDestination):
    """Adds or updates the members of segments in a Campaign Monitor list.

    :param hook: the Campaign Monitor hook.
    :param list_id: the list's API ID.
    :param mapping: built by :func:`campaign_monitor_mapping`.
    :param custom_fields: Campaign Monitor field (its name or key) -> source column, as in the mapping.
    :param consent_to_track: ``Yes``, ``No`` or ``Unchanged`` for every subscriber (a consent column in the
        mapping overrides it per row).
    :param segment_field: name of the MultiSelectMany field listing the segments a subscriber is in (None: none).
    :param mode: ``upsert`` or ``mirror`` (also takes the segment off subscribers who left it).
    :param remove_leavers: mirror mode: remove from the list (state Deleted, not unsubscribed) a subscriber this
        export sent who is now in none of its segments.
    :param create_missing_custom_fields: create mapped custom fields the list lacks (as Text).
    :param queue_autoresponders: let Campaign Monitor queue subscription-based autoresponders for new subscribers.
    :param removed: the members this export removed from the list (re-added, and only they, when they rejoin).
    :param max_in_flight: import calls in flight.
    """

    name = "Campaign Monitor"
    batch_size = IMPORT_MAX
    max_in_flight = DEFAULT_CONCURRENCY
    max_per_export = MAX_PER_EXPORT
    converts_records = True  # values to the custom fields' types; the subscriber's JSON
    encodes_bodies = True

    def __init__(
        self,
        hook: CampaignMonitorHook,
        list_id: str,
        mapping: FieldMapping,
        *,
        custom_fields: dict[str, str] | None = None,
        consent_to_track: str = "Unchanged",
        segment_field: str | None = "Segments",
        mode: str = "upsert",
        remove_leavers: bool = False,
        create_missing_custom_fields: bool = False,
        queue_autoresponders: bool = False,
        removed: RefusalStore | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        super().__init__(mapping, list_id)
        consent = _consent(consent_to_track)
        if consent is None:
            raise ValueError(f"consent_to_track must be one of {CONSENT_VALUES}, not {consent_to_track!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if mode == "mirror" and not segment_field and not remove_leavers:
            raise ValueError("mode='mirror' takes the segment off subscribers who left it: it needs a segment_field "
                             "(or remove_leavers=True)")
        if remove_leavers and mode != "mirror":
            raise ValueError("remove_leavers=True needs mode='mirror' (leavers are found by mirroring)")
        self.hook = hook
        self.custom_fields = dict(custom_fields or {})
        self.consent = consent
        self.segment_field = segment_field or None
        self.mode = mode
        self.mirror = mode == "mirror"
        self.remove_leavers = remove_leavers
        self.create_missing = create_missing_custom_fields
        self.queue_autoresponders = queue_autoresponders
        self.removed = removed
        if max_in_flight:
            self.max_in_flight = max(1, min(MAX_CONCURRENCY, int(max_in_flight)))
        self.list: dict = {}
        #: payload key -> (Campaign Monitor key, the field's definition)
        self.fields: dict[str, tuple[str, dict]] = {}
        self.segment_key: str | None = None
        self.membership: Membership | None = None
        self.readded = 0

    # -- pre-flight -----------------------------------------------------------------------------------
    def preflight(self, segments: list[Segment], dry_run: bool) -> None:
        """Check the list and its custom fields (create what is missing when asked), then read which segments
        each member is in."""
        self.list = self.hook.get_list(self.target)
        existing = self.hook.custom_fields(self.target)
        by_name: dict[str, dict] = {}
        for f in existing:
            by_name[f["FieldName"]] = f
            by_name.setdefault(_bare(f["Key"]), f)
        missing = [n for n in self.custom_fields if _bare(n) not in by_name and n not in by_name]
        if missing and not self.create_missing:
            raise ExportError(
                f"List '{self.list.get('Title')}' ({self.target}) has no custom field(s) {missing}. Create them in "
                "Campaign Monitor (List > Custom fields) or pass create_missing_custom_fields=True. Its custom fields: "
                f"{sorted(f['FieldName'] for f in existing) or 'none'}.")
        for name in missing:
            field = {"FieldName": name, "Key": f"[{name}]", "DataType": "Text", "FieldOptions": []}
            if dry_run:
                log.info("Dry run: would create custom field '%s' (Text)", name)
            else:
                log.info("Creating missing custom field '%s' (Text) in list %s", name, self.target)
                field["Key"] = self.hook.create_custom_field(self.target, name, "Text")
            by_name[name] = field
        for name in self.custom_fields:
            f = by_name.get(name) or by_name[_bare(name)]
            self.fields[custom_field_key(name)] = (f["Key"], f)
        if self.segment_field:
            self.segment_key = self._segment_field(by_name, [s.name for s in segments], dry_run)
        if self.segment_field or self.remove_leavers:
            if len(segments) == 1:
                self.membership = None  # one segment: every member is in it
            else:
                log.info("Reading which of the %d segments each member is in (for the '%s' field)", len(segments),
                         self.segment_field)
                email_column = self.mapping.fields[self.mapping.email_field]
                self.membership = Membership.read(segments, email_column, self.mapping.key_column)
        self._segments = [s.name for s in segments]
        log.info("List '%s' (%s): custom fields %s; segment field %s; consent to track %s", self.list.get("Title"),
                 self.target, ", ".join(f"{k}:{f.get('DataType')}" for k, f in self.fields.values()) or "none mapped",
                 self.segment_field or "off", self.consent)

    def _segment_field(self, by_name: dict[str, dict], names: list[str], dry_run: bool) -> str:
        """The segment field's key; created (MultiSelectMany) or given the export's segments as options."""
        field = by_name.get(self.segment_field)
        if field is None:
            if dry_run:
                log.info("Dry run: would create custom field '%s' (MultiSelectMany, options %s)", self.segment_field,
                         names)
                return f"[{self.segment_field}]"
            log.info("Creating custom field '%s' (MultiSelectMany) for segment membership", self.segment_field)
            return self.hook.create_custom_field(self.target, self.segment_field, "MultiSelectMany", names)
        if field.get("DataType") != "MultiSelectMany":
            raise ExportError(
                f"Custom field '{self.segment_field}' of list {self.target} is {field.get('DataType')}; the segment "
                "field must be MultiSelectMany. Pass another segment_field name (it is created when missing).")
        new = [n for n in names if n not in (field.get("FieldOptions") or [])]
        if new:
            if dry_run:
                log.info("Dry run: would add option(s) %s to custom field '%s'", new, self.segment_field)
            else:
                log.info("Adding option(s) %s to custom field '%s'", new, self.segment_field)
                self.hook.update_custom_field_options(self.target, field["Key"], new, keep_existing=True)
        return field["Key"]

    def fingerprint_config(self) -> bytes:
        """The list, the mapping, the consent and segment settings and the fields' types: a change sends everyone."""
        types = {k: [key, f.get("DataType"), f.get("FieldOptions") or []] for k, (key, f) in self.fields.items()}
        return _encode({"target": self.target, "fields": self.mapping.fields, "consent": self.consent,
                        "segment_field": self.segment_field, "types": types})

    # -- per record ---------------------------------------------------------------------------------
    def prepare_many(self, records: list[Record]) -> tuple[list[Record], list[Reject]]:
        """Each record's subscriber JSON (its body), or a reject naming the field whose value does not fit."""
        segments = self._segments_of(records)
        out: list[Record] = []
        rejects: list[Reject] = []
        for r, segs in zip(records, segments, strict=True):
            item = self._subscriber(r, segs)
            if item.__class__ is Reject:
                rejects.append(item)
            else:
                r.body = _encode(item)
                out.append(r)
        return out, rejects

    def prepare(self, record: Record) -> Record | Reject:
        """:meth:`prepare_many` for one record."""
        out, rejects = self.prepare_many([record])
        return out[0] if out else rejects[0]

    def _segments_of(self, records: list[Record]) -> list[tuple[str, ...]]:
        if not self.segment_field:
            return [()] * len(records)
        if self.membership is None:
            return [(r.segment,) for r in records]
        found = self.membership.lookup([r.member for r in records])
        # a member the pre-flight did not see (a row added since): at least the segment it is sent for
        return [s if r.segment in s else (*s, r.segment) for r, s in zip(records, found, strict=True)]

    def _subscriber(self, r: Record, segments: tuple[str, ...]) -> dict | Reject:
        p = r.payload
        sub: dict[str, Any] = {"EmailAddress": p[EMAIL]}
        name = p.get(NAME)
        if name is None and (FIRST in p or LAST in p):
            name = " ".join(str(p[k]).strip() for k in (FIRST, LAST) if p.get(k) not in (None, ""))
        if name not in (None, ""):
            name = str(name)
            if len(name) > VALUE_MAX:
                return Reject(r.segment, r.row, r.key, TOO_LONG, self.mapping.fields.get(NAME) or
                              self.mapping.fields.get(FIRST), f"the name has {len(name)} characters; at most "
                              f"{VALUE_MAX} are kept")
            sub["Name"] = name
        custom: list[dict] = []
        for pkey, (key, field) in self.fields.items():
            if pkey not in p:
                continue
            values, problem = convert_custom_value(field, p[pkey])
            if problem:
                return Reject(r.segment, r.row, r.key, TOO_LONG if "characters" in problem else INVALID_VALUE,
                              field["FieldName"], f"custom field {field['FieldName']} ({field.get('DataType')}): {problem}")
            custom.extend({"Key": key, "Value": v} for v in values)
        if self.segment_key:
            custom.extend({"Key": self.segment_key, "Value": s} for s in segments)
        if custom:
            sub["CustomFields"] = custom
        consent = self.consent
        if p.get(CONSENT) not in (None, ""):
            consent = _consent(p[CONSENT])
            if consent is None:
                return Reject(r.segment, r.row, r.key, INVALID_VALUE, self.mapping.fields.get(CONSENT),
                              f"consent to track {str(p[CONSENT])[:40]!r} is not one of Yes, No, Unchanged (or a "
                              "boolean)")
        sub["ConsentToTrack"] = consent
        return sub

    # -- per batch ------------------------------------------------------------------------------------
    def send(self, segment: Segment, records: list[Record]) -> BatchOutcome:
        """Import one batch (``Resubscribe`` false); failures become rejects with Campaign Monitor's code."""
        result = self.hook.import_subscribers(self.target, [r.body for r in records], resubscribe=False,
                                              queue_autoresponders=self.queue_autoresponders)
        return self.outcomes(records, result)

    def outcomes(self, records: list[Record], result: dict) -> BatchOutcome:
        """The batch's outcome from an import result: ``TotalNewSubscribers`` created, ``TotalExistingSubscribers``
        updated, one reject per ``FailureDetails`` entry (matched by address) with Campaign Monitor's code and
        message; a Deleted subscriber this export removed is added back (and counted created)."""
        created = int(result.get("TotalNewSubscribers") or 0)
        updated = int(result.get("TotalExistingSubscribers") or 0)
        failures = {str(f.get("EmailAddress") or "").strip().lower(): f for f in result.get("FailureDetails") or []}
        duplicates = {str(e).strip().lower() for e in result.get("DuplicateEmailsInSubmission") or []}
        exceptions: list[Outcome] = []
        readd: list[Record] = []
        seen_dup: set[str] = set()
        if failures or duplicates:
            for r in records:
                f = failures.get(r.email)
                if f is not None:
                    code = f.get("Code")
                    if code == CODE_DELETED and self._removed_by_export(r):
                        readd.append(r)
                        continue
                    message = redact_emails(f"Campaign Monitor code {code}: {f.get('Message')}")
                    exceptions.append(Outcome(r, "rejected", message,
                                              INVALID_EMAIL if code == CODE_INVALID_EMAIL else "vendor_rejected"))
                elif r.email in duplicates:
                    if r.email in seen_dup:  # Campaign Monitor imported the first occurrence only
                        exceptions.append(Outcome(r, "rejected", "Campaign Monitor: duplicate address in one import "
                                                  "(DuplicateEmailsInSubmission); the first row was imported",
                                                  "duplicate"))
                    seen_dup.add(r.email)
        if readd:
            created += self._readd(readd)
        rejected = len(exceptions)
        unchanged = len(records) - created - updated - rejected
        if unchanged < 0:
            log.warning("Campaign Monitor counted %d new and %d existing subscribers for an import of %d (%d failed); "
                        "counting the excess as existing", created, updated, len(records), rejected)
            room = len(records) - rejected
            created = min(created, room)
            updated = room - created
            unchanged = 0
        counts = {"created": created, "updated": updated, "unchanged": unchanged, "rejected": rejected}
        return BatchOutcome({k: n for k, n in counts.items() if n}, exceptions)

    def _removed_by_export(self, r: Record) -> bool:
        return self.removed is not None and r.member in self.removed.known

    def _readd(self, records: list[Record]) -> int:
        """Add back, one by one (the import cannot), subscribers this export removed who joined a segment again."""
        from airflow_provider_segexport.http import decode_json

        done = 0
        for r in records:
            self.hook.add_subscriber(self.target, decode_json(r.body), resubscribe=True)
            done += 1
        self.removed.discard_members([r.member for r in records])
        self.readded += done
        log.info("Added back %d subscriber(s) this export had removed from the list and who joined a segment again",
                 done)
        return done

    # -- mirror -------------------------------------------------------------------------------------------
    def remove_members(self, segment: Segment, keys: list[str]) -> int:
        """Mirror: take ``segment`` off the subscribers who left it (their other segments stay); with
        ``remove_leavers`` a subscriber in none of the export's segments is removed from the list (Deleted, not
        unsubscribed).

        :param segment: the segment they left.
        :param keys: their addresses (the export state's member keys).
        """
        if not keys:
            return 0
        gone: list[str] = []
        if self.remove_leavers:
            now = self.membership.lookup([member_id(k) for k in keys]) if self.membership is not None \
                else [()] * len(keys)
            gone = [k for k, s in zip(keys, now, strict=True) if not s]
        keep = [k for k in keys if k not in set(gone)] if gone else keys
        done = 0
        if self.segment_key and keep:
            # "To remove a specific Multi-Valued Select Many option, pass the option name in the Value field along
            # with the Clear: true parameter" (Campaign Monitor, Importing many subscribers)
            done += self._import_updates([{"EmailAddress": k, "CustomFields": [
                {"Key": self.segment_key, "Value": segment.name, "Clear": True}], "ConsentToTrack": "Unchanged"}
                for k in keep])
        if gone:
            log.info("Mirror: removing %d subscriber(s) in none of the export's segments from list %s (state Deleted; "
                     "not unsubscribed)", len(gone), self.target)
            in_chunks(gone, 1, lambda one: self.hook.delete_subscriber(self.target, one[0]) or 1, self.max_in_flight)
            if self.removed is not None:
                self.removed.add_many((e, f"removed by the export: left segment {segment.name}") for e in gone)
            done += len(gone)
        log.info("Mirror: segment '%s' taken off %d subscriber(s) who left it", segment.name, done)
        return done

    def _import_updates(self, subscribers: list[dict]) -> int:
        """Import field updates (no name, consent unchanged, never resubscribing) in batches; how many took."""
        if not subscribers:
            return 0
        def one(batch: list[dict]) -> int:
            result = self.hook.import_subscribers(self.target, [_encode(s) for s in batch], resubscribe=False,
                                                  queue_autoresponders=False)
            return int(result.get("TotalExistingSubscribers") or 0) + int(result.get("TotalNewSubscribers") or 0)

        return in_chunks(subscribers, IMPORT_MAX, one, self.max_in_flight)

    def close(self) -> None:
        """Close the store of removed members."""
        super().close()
        if self.removed is not None:
            self.removed.close()

    def http_stats(self) -> dict[str, int]:
        """The hook's request, retry and throttling counts."""
        return self.hook.http.stats.as_dict() if "http" in self.hook.__dict__ else {}


def campaign_monitor_mapping(*, email_field: str, key_column: str, name_field: str | None = None,
                             first_name_field: str | None = None, last_name_field: str | None = None,
                             custom_fields: dict[str, str] | None = None,
                             consent_to_track_field: str | None = None) -> FieldMapping:
    """The field mapping of a Campaign Monitor export (payload key -> source column).

    :param email_field: the email column (required).
    :param key_column: the column identifying a row in rejects.
    :param name_field: the name column; or ``first_name_field`` and ``last_name_field``, joined with a space.
    :param custom_fields: custom field name (or key) -> column.
    :param consent_to_track_field: a column holding Yes/No/Unchanged (or a boolean) per row.
    """
    if name_field and (first_name_field or last_name_field):
        raise ValueError("give name_field or first_name_field/last_name_field, not both")
    fields = {EMAIL: email_field}
    if name_field:
        fields[NAME] = name_field
    if first_name_field:
        fields[FIRST] = first_name_field
    if last_name_field:
        fields[LAST] = last_name_field
    for name, column in (custom_fields or {}).items():
        fields[custom_field_key(name)] = column
    if consent_to_track_field:
        fields[CONSENT] = consent_to_track_field
    return FieldMapping(fields, key_column=key_column, email_field=EMAIL,
                        max_lengths={NAME: VALUE_MAX})


def convert_custom_value(field: dict, value: Any) -> tuple[list[str], str | None]:
    """A source value as the custom field's value(s) (one per option for MultiSelectMany); (values, problem).

    Campaign Monitor ignores a value that does not fit the field's type without saying so; here it is a reject.
    """
    kind = field.get("DataType", "Text")
    options = field.get("FieldOptions") or []
    if kind == "Number":
        if isinstance(value, bool):
            return [], f"{value!r} is not a number"
        try:
            number = Decimal(str(value).strip().replace(",", "")) if not isinstance(value, int | float) else value
        except InvalidOperation:
            return [], f"{preview(value)} is not a number"
        if isinstance(number, float) and not math.isfinite(number) or isinstance(number, Decimal) and not number.is_finite():
            return [], f"{preview(value)} is not a finite number"
        return [str(number)], None
    if kind == "Date":
        parsed = parse_date(value)
        if parsed is None:
            return [], f"{preview(value)} is not a date (YYYY-MM-DD, YYYY/MM/DD or a date value)"
        if not DATE_MIN <= parsed <= DATE_MAX:
            return [], f"{parsed.isoformat()} is outside 1900-01-01..2076-06-06, the dates Campaign Monitor keeps"
        return [parsed.strftime("%Y/%m/%d")], None
    if kind == "MultiSelectMany":
        items = value if isinstance(value, list | tuple | set) else str(value).split(",")
        values = [str(v).strip() for v in items if str(v).strip()]
        wrong = [v for v in values if v not in options]
        if wrong:
            return [], f"{preview(wrong)} not among the field's options {options}"
        return values, None
    text = value if isinstance(value, str) else str(value)
    if len(text) > VALUE_MAX:
        return [], f"has {len(text)} characters; Campaign Monitor keeps at most {VALUE_MAX}"
    if kind in ("MultiSelectOne", "Country", "USState") and options and text not in options:
        return [], f"{preview(text)} is not one of the field's options{' ' + str(options) if len(options) <= 20 else ''}"
    return [text], None


def _consent(value: Any) -> str | None:
    """Yes / No / Unchanged from a parameter or a column value (booleans and yes/no words too); None if neither."""
    if value is None or value == "":
        return "Unchanged"
    if isinstance(value, bool):
        return "Yes" if value else "No"
    text = str(value).strip().lower()
    if text in _TRUE:
        return "Yes"
    if text in _FALSE:
        return "No"
    return "Unchanged" if text == "unchanged" else None


def _bare(key: str) -> str:
    """A custom field key without its brackets."""
    return key[1:-1] if key.startswith("[") and key.endswith("]") else key

