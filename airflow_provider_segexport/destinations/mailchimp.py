"""How segment members become Mailchimp batch-subscribe calls, and how the answers become per-row
outcomes. The one place that knows Mailchimp's member payload and merge-field types."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterator
from typing import Any

from airflow_provider_segexport.export.destination import (
    BatchOutcome,
    BatchRefused,
    EmailDestination,
    ExportError,
    Outcome,
    in_chunks,
)
from airflow_provider_segexport.export.records import (
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
from airflow_provider_segexport.hooks.mailchimp import (
    BATCH_SUBSCRIBE_MAX,
    MAX_CONNECTIONS,
    MAX_PER_EXPORT,
    SEGMENT_MEMBERS_MAX,
    MailchimpHook,
)
from airflow_provider_segexport.http import VendorAPIError
from airflow_provider_segexport.http import encode_json as _encode

log = logging.getLogger(__name__)

STATUS_IF_NEW = ("subscribed", "pending", "transactional")
MODES = ("upsert", "mirror")
TEXT_MAX = 255
#: Refusals Mailchimp will repeat forever for the same address: remembered across runs.
PERMANENT_MARKERS = ("permanently deleted", "compliance state", "forgotten email")
_ABSENT = object()
_DATE_FORMATS = {"MM/DD/YYYY": "%m/%d/%Y", "DD/MM/YYYY": "%d/%m/%Y", "MM/DD": "%m/%d", "DD/MM": "%d/%m"}


class MailchimpDestination(EmailDestination):
    """Members of segments as members of a Mailchimp audience, upserted with batch-subscribe calls and tagged
    with their segment's name; in mirror mode the tag is taken off members who left the segment.

    :param hook: the Mailchimp hook.
    :param audience_id: the audience (list) ID.
    :param mapping: the field mapping (``email`` and merge-field tags -> source columns).
    :param status_if_new: subscribed, pending or transactional.
    :param mode: upsert or mirror.
    :param tag_segments: tag members with their segment's name (mirror mode needs it).
    :param create_missing_merge_fields: create mapped merge fields the audience lacks (as text).
    :param refusals: the addresses Mailchimp refused for good in earlier runs.
    :param max_in_flight: batch calls at once (at most Mailchimp's connection limit).
    """

    name = "Mailchimp"
    batch_size = BATCH_SUBSCRIBE_MAX
    max_in_flight = MAX_CONNECTIONS
    max_per_export = MAX_PER_EXPORT
    converts_records = True  # merge values to the fields' types; the member's JSON
    encodes_bodies = True  # the member's JSON is made where the member is (one pass over a chunk, not two)
    permanent_markers = PERMANENT_MARKERS

    def __init__(
        self,
        hook: MailchimpHook,
        audience_id: str,
        mapping: FieldMapping,
        *,
        status_if_new: str = "subscribed",
        mode: str = "upsert",
        tag_segments: bool = True,
        create_missing_merge_fields: bool = False,
        refusals: RefusalStore | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        super().__init__(mapping, audience_id, refusals=refusals)
        if status_if_new not in STATUS_IF_NEW:
            raise ValueError(f"status_if_new must be one of {STATUS_IF_NEW}, not {status_if_new!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if mode == "mirror" and not tag_segments:
            raise ValueError("mode='mirror' removes the segment's tag from leavers, so it needs tag_segments=True")
        self.hook = hook
        self.status_if_new = status_if_new
        self.mode = mode
        self.tag_segments = tag_segments
        self.create_missing = create_missing_merge_fields
        if max_in_flight:
            self.max_in_flight = max(1, min(MAX_CONNECTIONS, int(max_in_flight)))
        self.mirror = mode == "mirror"
        self.merge_map = {k: v for k, v in mapping.fields.items() if k != self.email_field}
        self.field_types: dict[str, dict] = {}
        self.audience: dict = {}
        self._segment_tags: dict[str, list[str]] = {}
        self._converter_cache: list | None = None
        self._converter_types: dict | None = None
    # -- pre-flight -------------------------------------------------------------------------------
    def preflight(self, segments: list[Segment], dry_run: bool) -> None:
        """Check the audience's merge fields against the mapping (create the missing ones when asked).

        :param segments: the segments about to be exported.
        :param dry_run: create nothing.
        """
        self.audience = self.audience or self.hook.get_audience(self.target)  # the operator may have read it
        fields = {f["tag"]: f for f in self.hook.get_merge_fields(self.target)}
        missing = [t for t in self.merge_map if t not in fields]
        bad_tags = [t for t in missing if not (t.isascii() and t.replace("_", "").isalnum() and len(t) <= 10)]
        if bad_tags:
            raise ExportError(f"Merge field tag(s) {bad_tags} are not valid Mailchimp tags (at most 10 letters, "
                              "digits or '_'); rename them in the mapping.")
        if missing and not self.create_missing:
            raise ExportError(
                f"Audience '{self.audience.get('name')}' ({self.target}) has no merge field(s) {missing}. Create "
                f"them in Mailchimp (Audience > Settings > Audience fields) or pass "
                f"create_missing_merge_fields=True. Existing merge fields: {sorted(fields)}."
            )
        for tag in missing:
            if dry_run:
                log.info("Dry run: would create merge field %s (text)", tag)
                fields[tag] = {"tag": tag, "type": "text", "required": False, "options": {}}
                continue
            log.info("Creating missing merge field %s (text) in audience %s", tag, self.target)
            fields[tag] = self.hook.create_merge_field(self.target, tag, tag.title(), "text")
        unmapped_required = [t for t, f in fields.items() if f.get("required") and t not in self.merge_map]
        if unmapped_required:
            raise ExportError(
                f"Merge field(s) {unmapped_required} are required in audience {self.target} but not in the mapping; "
                "map them to source columns (new members would be refused) or make them optional in Mailchimp."
            )
        self.field_types = {t: fields[t] for t in self.merge_map}
        for t, f in self.field_types.items():
            if f.get("required"):
                self.mapping.required = frozenset({*self.mapping.required, t})
        log.info("Audience '%s' (%s): merge fields %s", self.audience.get("name"), self.target,
                 ", ".join(f"{t}:{f.get('type')}" for t, f in self.field_types.items()) or "none mapped")

    def fingerprint_config(self) -> bytes:
        """The audience, mapping, merge-field types and formats, status_if_new and tagging.

        What shapes a member's payload besides its values: the merge fields' types and formats included
        (a date field switching to DD/MM changes every payload, so a delta run re-sends them all)."""
        types = {tag: [f.get("type", "text"), f.get("options") or {}] for tag, f in self.field_types.items()}
        return _encode({"target": self.target, "fields": self.mapping.fields, "email_field": self.email_field,
                        "status_if_new": self.status_if_new, "tags": self.tag_segments, "types": types})

    # -- per record -------------------------------------------------------------------------------
    def prepare(self, record: Record) -> Record | Reject:
        """The record's batch-subscribe member (``body``), its merge values converted to the fields' types; a
        reject for a value that does not fit or an address refused for good earlier.

        :param record: a validated record.
        """
        payload = record.payload
        email = payload[self.email_field]
        refused = self.previously_refused(record)
        if refused is not None:
            return refused
        merge: dict[str, Any] = {}
        for tag, convert in self._converters():
            value = payload.get(tag, _ABSENT)
            if value is _ABSENT:
                continue
            if convert is None:  # text field, text value: the common case
                if value.__class__ is str and len(value) <= TEXT_MAX:
                    merge[tag] = value
                    continue
                convert = convert_merge_value
            value, problem = convert(self.field_types.get(tag, {}), value)
            if problem:
                reason = TOO_LONG if "characters" in problem else INVALID_VALUE
                return Reject(record.segment, record.row, record.key, reason, tag,
                              f"merge field {tag} ({self.field_types.get(tag, {}).get('type', 'text')}): {problem}")
            merge[tag] = value
        record.body = _encode(self._member(email, merge, record.segment))  # the payload stays as validated
        return record

    def _member(self, email: str, merge: dict[str, Any], segment: str) -> dict[str, Any]:
        """The batch-subscribe member, keys in a fixed order (one tags list per segment: nothing changes it)."""
        member: dict[str, Any] = {"email_address": email, "status_if_new": self.status_if_new}
        if merge:
            member["merge_fields"] = merge
        if self.tag_segments:
            member["tags"] = self._segment_tags.get(segment) or self._segment_tags.setdefault(segment, [segment])
        return member

    def prepare_many(self, records: list[Record]) -> tuple[list[Record], list[Reject]]:
        """:meth:`prepare` for a chunk; text merge fields holding plain text (the usual case) are inlined.

        :param records: a chunk's validated records, in row order.
        """
        converters = self._converters()
        if any(c is not None for _, c in converters):
            return super().prepare_many(records)
        tags = [tag for tag, _ in converters]
        email_field, member, encode = self.email_field, self._member, _encode
        refused = self.refusals.known if self.refusals is not None else {}
        # The member's JSON cut from the validator's JSON of the payload (Record.payload_json: the address
        # first, then the merge fields in mapping order, all text) instead of a dict per member encoded again:
        # {"email":"a@b.c","FNAME":"Ann"} -> {"email_address":"a@b.c","status_if_new":..,"merge_fields":{"FNAME":"Ann"}}
        # A payload JSON of at most TEXT_MAX bytes holds no value over TEXT_MAX characters.
        start = len(_encode(email_field)) + 2  # past '{"<email field>":'
        segment = None  # a chunk's records are of one segment: its member's parts are made once
        out: list[Record] = []
        rejects: list[Reject] = []
        for r in records:
            if not (refused and r.member in refused):
                raw = r.payload_json  # set with the address (r.email) by the validator's usual path
                if raw is not None and len(raw) <= TEXT_MAX:
                    if r.segment is not segment:
                        segment = r.segment
                        head, merge_open, tail, plain_tail = self._member_json_parts(segment)
                    end = start + len(r.email) + 2  # past the address and its quotes
                    if end + 1 < len(raw):  # merge fields follow (after the comma)
                        r.body = head + raw[start:end] + merge_open + raw[end + 1:] + tail
                    else:
                        r.body = head + raw[start:end] + plain_tail
                    out.append(r)
                    continue
                payload = r.payload
                merge = {}
                for tag in tags:
                    value = payload.get(tag)
                    if value is not None:
                        if value.__class__ is not str or len(value) > TEXT_MAX:
                            break
                        merge[tag] = value
                else:
                    r.body = encode(member(payload[email_field], merge, r.segment))
                    out.append(r)
                    continue
            item = self.prepare(r)  # refused for good earlier, or a value to convert or refuse: one by one
            (out if item.__class__ is Record else rejects).append(item)
        return out, rejects

    def _member_json_parts(self, segment: str) -> tuple[bytes, bytes, bytes, bytes]:
        """A segment's member JSON around its address and merge fields, cut from :meth:`_member`'s own JSON
        (its shape in one place): (before the address, after it up to the merge fields' first key, after
        the merge fields' closing brace, after the address when there are no merge fields)."""
        address, field = "\0address", "\0field"  # escaped in JSON (\u0000): never part of the JSON around them
        with_merge = _encode(self._member(address, {field: ""}, segment))
        head, rest = with_merge.split(_encode(address))
        merge_open, tail = rest.split(_encode(field) + b':""}')
        plain_tail = _encode(self._member(address, {}, segment)).split(_encode(address))[1]
        return head, merge_open, tail, plain_tail

    def _converters(self) -> list:
        """(merge tag, converter or None for plain text) in mapping order, from the audience's field types
        (built again only when they change)."""
        if self._converter_cache is not None and self._converter_types is self.field_types:
            return self._converter_cache
        self._converter_types = self.field_types
        self._converter_cache = [
            (tag, None if self.field_types.get(tag, {}).get("type", "text") == "text" else convert_merge_value)
            for tag in self.merge_map
        ]
        return self._converter_cache

    # -- per batch ----------------------------------------------------------------------------------
    def send(self, segment: Segment, records: list[Record]) -> BatchOutcome:
        """One batch-subscribe call; a 400 for the whole batch is :class:`BatchRefused` (split to find the bad
        member).

        :param segment: the records' segment.
        :param records: at most 500 prepared records.
        """
        try:
            answer = self.hook.batch_subscribe(
                self.target, [r.body if r.body is not None else r.payload for r in records])
        except VendorAPIError as exc:
            if exc.status == 400:
                raise BatchRefused(exc.message) from exc
            raise
        return self.outcomes(records, answer)

    def outcomes(self, records: list[Record], answer: dict) -> BatchOutcome:
        """The batch's outcome from a batch-subscribe answer: as many created and updated as it counts
        (``total_created``, ``total_updated``; else as ``new_members`` and ``updated_members`` list), a
        rejected outcome per member in ``errors`` (matched by address), the others unchanged (Mailchimp
        counts no member it left as it was).

        :param records: the batch, as sent.
        :param answer: Mailchimp's answer.
        """
        created = answer.get("total_created")
        created = len(answer.get("new_members") or ()) if created is None else int(created)
        updated = answer.get("total_updated")
        updated = len(answer.get("updated_members") or ()) if updated is None else int(updated)
        refused = []
        errors = answer.get("errors")
        if errors:  # only the refused are looked up (most batches of a real audience have one or two)
            messages = {email: message for email, (_, message) in answer_statuses({"errors": errors}).items()}
            refused = self.refused_by_email(records, messages)
        unchanged = len(records) - created - updated - len(refused)
        if unchanged < 0:  # more members counted than sent (not Mailchimp's answer)
            if answer.get("new_members") or answer.get("updated_members"):  # listed: match each by address
                get = answer_statuses(answer).get
                return BatchOutcome.of([Outcome(r, *get(self.email_of(r), _UNCHANGED)) for r in records])
            log.warning("Mailchimp counted %d created and %d updated for a batch of %d members (%d refused); "
                        "counting the excess as unchanged", created, updated, len(records), len(refused))
            room = len(records) - len(refused)
            created = min(created, room)
            updated = min(updated, room - created)
            unchanged = room - created - updated
        counts = {"created": created, "updated": updated, "unchanged": unchanged, "rejected": len(refused)}
        return BatchOutcome({k: n for k, n in counts.items() if n}, refused)

    # -- mirror ------------------------------------------------------------------------------------------
    def remove_members(self, segment: Segment, keys: list[str]) -> int:
        """Take this segment's tag off members who left it (their subscription is not touched).

        :param segment: the segment they left.
        :param keys: their addresses (the export state's keys).
        """
        tag_id = self.hook.find_tag(self.target, segment.name)
        if tag_id is None or not keys:
            return 0
        log.info("Mirror: removing tag '%s' from %d member(s) who left the segment", segment.name, len(keys))

        def remove(chunk: list[str]) -> int:
            return int(self.hook.update_tag_members(self.target, tag_id, remove=chunk).get("total_removed", 0))

        return in_chunks(keys, SEGMENT_MEMBERS_MAX, remove, self.max_in_flight)

    def http_stats(self) -> dict[str, int]:
        """The hook's HTTP counters (calls, retries, throttling), once it made a call."""
        return self.hook.http.stats.as_dict() if "http" in self.hook.__dict__ else {}


def answer_statuses(answer: dict) -> dict[str, tuple[str, str | None]]:
    """email (lower case) -> (created | updated | rejected, vendor message) from a batch-subscribe answer.

    ``new_members`` / ``updated_members`` hold member objects (the API's answer) or just their emails
    (:func:`~airflow_provider_segexport.hooks.mailchimp.decode_batch_answer`). Members in none of the
    arrays were unchanged (Mailchimp reports no change for them).

    :param answer: a batch-subscribe answer (or a batch operation's response body).
    """
    status: dict[str, tuple[str, str | None]] = {}
    for key, outcome in (("new_members", _CREATED), ("updated_members", _UPDATED)):
        for m in answer.get(key) or []:
            email = m if m.__class__ is str else str(m.get("email_address", ""))
            status[email.lower()] = outcome
    for e in answer.get("errors") or []:
        msg = str(e.get("error") or e.get("error_code") or "refused")
        if e.get("field"):
            msg += f" [field {e['field']}" + (f": {e['field_message']}]" if e.get("field_message") else "]")
        # Mailchimp's messages quote the address ("x@y looks fake or invalid"): never copied into rejects
        status[str(e.get("email_address", "")).strip().lower()] = ("rejected", redact_emails(msg))
    return status


_CREATED = ("created", None)
_UPDATED = ("updated", None)
_UNCHANGED = ("unchanged", None)


class MailchimpBatchOperationsDestination(MailchimpDestination):
    """Deferrable mode: batch-subscribe calls are queued as Mailchimp batch operations (``/batches``).

    ``send`` only queues (outcome ``planned``); every ``ops_per_batch`` operations one ``/batches`` call
    is made. A work file per ``/batches`` call keeps, per member, what turns the results archive into
    per-row outcomes without holding the export in memory: the operation, segment, row, key, member id and
    fingerprint (no address: Mailchimp's per-member errors are matched by the member id of the address they
    name). :meth:`discard` deletes the files once the outcomes are applied.

    :param work_dir: where the work files go (an ``ObjectStoragePath``).
    """

    ops_per_batch = 100
    confirms_later = True

    def __init__(self, *args: Any, work_dir: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.work_dir = work_dir
        self.groups: list[dict] = []
        self._ops: list[dict] = []
        self._fh = None
        self._work_file = None
        self._op_lock = threading.Lock()

    def send(self, segment: Segment, records: list[Record]) -> list[Outcome]:
        """Queue one batch-subscribe call as a batch operation (a ``/batches`` call every ``ops_per_batch``).

        :param segment: the records' segment.
        :param records: at most 500 prepared records.
        """
        members = b",".join(r.body if r.body is not None else _encode(r.payload) for r in records)
        body = (b'{"members":[' + members + b'],"update_existing":true,"sync_tags":false}').decode("utf-8")
        with self._op_lock:
            if self._fh is None:
                self._work_file = self.work_dir / f"batch-{len(self.groups):05d}.jsonl"
                self._work_file.parent.mkdir(parents=True, exist_ok=True)
                self._fh = self._work_file.open("w", encoding="utf-8")
            op_id = f"{len(self.groups)}-{len(self._ops)}"
            self._ops.append({"method": "POST", "path": f"/lists/{self.target}", "operation_id": op_id,
                              "body": body})
            self._fh.write("".join(json.dumps([op_id, r.segment, r.row, r.key, r.member, r.fp],
                                              ensure_ascii=False) + "\n" for r in records))
            if len(self._ops) >= self.ops_per_batch:
                self._submit_locked()
        return [Outcome(r, "planned") for r in records]

    def flush(self) -> list[dict]:
        """Submit the operations not submitted yet; return every ``/batches`` call made (batch id, work file)."""
        with self._op_lock:
            if self._ops:
                self._submit_locked()
        return self.groups

    def _submit_locked(self) -> None:
        self._fh.close()
        self._fh = None
        answer = self.hook.submit_batch(self._ops)
        log.info("Queued Mailchimp batch %s: %d operation(s)", answer.get("id"), len(self._ops))
        self.groups.append({"batch_id": answer["id"], "work_file": str(self._work_file)})
        self._ops = []

    def deferred_outcomes(self, results: dict) -> Iterator[tuple[list[Outcome], bool]]:
        """The outcomes of every queued operation, from the finished batches' results archives: per member
        created, updated, unchanged or rejected (an operation Mailchimp answered with an error, or did not
        answer, rejects its members and counts as not processed). Permanent refusals are remembered.

        :param results: ``groups`` (what :meth:`flush` returned) and ``batches`` (the finished batches, with
            their ``response_body_url``).
        """
        from airflow.sdk import ObjectStoragePath

        batches = {b["id"]: b for b in results["batches"]}
        for group in results["groups"]:
            per_op: dict[str, dict[int, tuple[str, str | None]]] = {}
            op_error: dict[str, str] = {}
            for result in self.hook.batch_results(batches[group["batch_id"]]["response_body_url"]):
                op = str(result.get("operation_id"))
                try:
                    body = json.loads(result.get("response") or "{}")
                except ValueError:
                    body = {}
                if int(result.get("status_code", 500)) >= 400:
                    op_error[op] = redact_emails(f"{body.get('title', 'error')}: {body.get('detail', '')}")
                else:
                    per_op[op] = {member_id(email): status for email, status in answer_statuses(body).items()}
            op, outcomes = None, []
            with ObjectStoragePath(group["work_file"]).open("r", encoding="utf-8") as fh:
                for line in fh:
                    line_op, segment, row, key, member, fp = json.loads(line)
                    if line_op != op:
                        if outcomes:
                            yield self._finished(op, outcomes, op_error, per_op)
                        op, outcomes = line_op, []
                    outcomes.append(Record(segment, row, key, {}, None, member, fp))
            if outcomes:
                yield self._finished(op, outcomes, op_error, per_op)

    def _finished(self, op: str, records: list[Record], op_error: dict[str, str],
                  per_op: dict[str, dict]) -> tuple[list[Outcome], bool]:
        if op in op_error:
            outcomes = [Outcome(r, "rejected", op_error[op]) for r in records]
        elif op not in per_op:
            outcomes = [Outcome(r, "rejected", "Mailchimp returned no result for this operation") for r in records]
        else:
            get = per_op[op].get
            outcomes = [Outcome(r, *get(r.member, _UNCHANGED)) for r in records]
        self.remember_refusals(outcomes)
        return outcomes, op in per_op

    @staticmethod
    def discard(groups: list[dict]) -> None:
        """Delete the work files (and their folder once empty) after their outcomes were applied.

        :param groups: what :meth:`flush` returned.
        """
        from airflow.sdk import ObjectStoragePath

        folders = set()
        for group in groups:
            path = ObjectStoragePath(group["work_file"])
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        for folder in folders:
            try:
                if not any(folder.iterdir()):
                    folder.rmdir()
            except (FileNotFoundError, OSError):  # already gone, or a store without folders
                pass


def convert_merge_value(field: dict, value: Any) -> tuple[Any, str | None]:
    """Convert a source value to a merge field's declared type and format; (value, problem).

    :param field: the merge field as Mailchimp describes it (``type``, ``options``).
    :param value: the validated source value.
    """
    ftype = field.get("type", "text")
    options = field.get("options") or {}
    if ftype == "number":
        if isinstance(value, bool):
            return None, f"{value!r} is not a number"
        if isinstance(value, int):
            return value, None
        if isinstance(value, float):
            return (value, None) if math.isfinite(value) else (None, f"{value!r} is not a finite number")
        try:
            text = str(value).strip().replace(",", "")
            number = float(text)
        except ValueError:
            return None, f"{preview(value)} is not a number"
        if not math.isfinite(number):  # 'NaN', 'inf', '1e999' parse but would be sent as null
            return None, f"{preview(value)} is not a finite number"
        return (int(number) if number.is_integer() and "." not in text else number), None
    if ftype in ("date", "birthday"):
        parsed = parse_date(value)
        if parsed is None:
            return None, f"{preview(value)} is not a date (expected YYYY-MM-DD or a date value)"
        fmt = options.get("date_format") or ("MM/DD/YYYY" if ftype == "date" else "MM/DD")
        return parsed.strftime(_DATE_FORMATS.get(fmt.upper(), "%m/%d/%Y")), None
    if ftype == "address":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return None, "address must be an object with addr1, city, state, zip (and optionally country)"
        if not isinstance(value, dict) or any(not value.get(k) for k in ("addr1", "city", "state", "zip")):
            return None, "address must have addr1, city, state and zip"
        return {k: str(v) for k, v in value.items()}, None
    text = value if isinstance(value, str) else str(value)
    if len(text) > TEXT_MAX:
        return None, f"has {len(text)} characters; Mailchimp allows at most {TEXT_MAX}"
    if ftype in ("url", "imageurl") and not text.startswith(("http://", "https://")):
        return None, f"{preview(text)} is not an http(s) URL"
    if ftype in ("radio", "dropdown"):
        choices = options.get("choices") or []
        if choices and text not in choices:
            return None, f"{preview(text)} is not one of the field's choices {choices}"
    return text, None

