"""The contract between the export engine and a destination adapter, and what adapters share.

A destination adapter (one file per vendor in ``destinations/``) subclasses :class:`Destination` (or
:class:`EmailDestination` for a vendor that identifies members by email address) and implements:

* :meth:`Destination.send` (required): one batch to the vendor; one :class:`Outcome` per record, or a
  :class:`BatchOutcome` (counts and the records not confirmed); :class:`BatchRefused` to have the batch split.
* :meth:`Destination.preflight`: check the target (fields, limits) before anything is sent.
* :meth:`Destination.prepare_many` / :meth:`Destination.prepare` when it declares ``converts_records``.
* :meth:`Destination.member_key` when it declares ``has_member_key``.
* :meth:`Destination.remove_members` when it supports mirror mode (``mirror``).
* :meth:`Destination.fingerprint_config`: the settings that shape every payload.
* :meth:`Destination.deferred_outcomes` when it declares ``confirms_later``.

What it can do is declared in class attributes (its *capabilities*), read by the engine to choose its
paths; the engine never inspects or sets a destination's methods or attributes. A subclass that overrides
:meth:`~Destination.prepare`, :meth:`~Destination.prepare_many` or :meth:`~Destination.member_key` without
declaring the matching capability is refused when the class is defined.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import msgspec

from airflow_provider_segexport.export.records import (
    PREVIOUSLY_REFUSED,
    VENDOR_REJECTED,
    FieldMapping,
    Record,
    Reject,
)
from airflow_provider_segexport.http import encode_json

if TYPE_CHECKING:
    from airflow_provider_segexport.export.sources import Segment
    from airflow_provider_segexport.export.state import RefusalStore

#: statuses of a record the destination took care of (journaled in the export state); "removed": a sync retired it
CONFIRMED = frozenset({"created", "updated", "unchanged", "removed"})
_status_of = operator.attrgetter("status")


class ExportError(RuntimeError):
    """The export stopped. The message says why and what to do."""


class ExportLimitExceeded(ExportError):
    """A segment or the whole export is larger than the destination accepts; nothing was sent."""


class BatchRefused(Exception):
    """The vendor refused a whole batch because of its content (e.g. one malformed member).

    The sender splits the batch to isolate the offending rows.

    :param message: the vendor's reason (kept as the rejected row's vendor message).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Outcome(msgspec.Struct, gc=False):
    """What the destination did with one record: created, updated, unchanged or rejected (``planned``
    in a dry run or when the destination confirms later).

    :param record: the record (the very object of the batch).
    :param status: created, updated, unchanged, rejected or planned.
    :param message: the vendor's message for a rejected record (no address in it).
    :param reason: the reject reason written to the rejects file.
    """

    record: Record
    status: str
    message: str | None = None
    reason: str = VENDOR_REJECTED


class BatchOutcome(msgspec.Struct, gc=False):
    """What the destination did with a whole batch, told without an :class:`Outcome` per record: how many
    records got each status, and an outcome for each record that was not confirmed (rejected, planned, ...).
    Every other record of the batch was confirmed (created, updated or unchanged).

    A destination whose answer gives counts and lists only the failures returns this from ``send``: the
    engine then touches no confirmed record until it journals them.

    :param counts: records per status; they add up to the batch's size.
    :param exceptions: an outcome for each record not confirmed.
    """

    counts: dict[str, int]
    exceptions: list[Outcome] = []

    @classmethod
    def of(cls, outcomes: list[Outcome]) -> BatchOutcome:
        """The same, from one outcome per record (what ``send`` may return instead).

        :param outcomes: one outcome per record of the batch.
        """
        return cls(dict(Counter(map(_status_of, outcomes))), [o for o in outcomes if o.status not in CONFIRMED])

    def __add__(self, other: BatchOutcome) -> BatchOutcome:
        return BatchOutcome(dict(Counter(self.counts) + Counter(other.counts)), self.exceptions + other.exceptions)

    def confirmed(self, records: list[Record]) -> list[Record]:
        """The records of the batch (in order) that the destination confirmed.

        :param records: the batch, as sent.
        """
        if not self.exceptions:
            return records
        left_out = {id(o.record) for o in self.exceptions}
        return [r for r in records if id(r) not in left_out]


_PREPARE_OVERRIDES = ("prepare", "prepare_many")


class Destination:
    """What a destination plugs into the engine. Vendor adapters subclass this.

    :param mapping: the field mapping (target field -> source column).
    :param target: the vendor object members are exported to (audience, list), shown in logs.
    """

    #: shown in logs and the summary, e.g. "Mailchimp"
    name = "destination"
    #: members per request (the vendor's documented maximum)
    batch_size = 100
    #: requests in flight at once (the vendor's documented concurrency)
    max_in_flight = 1
    #: members per export, all segments together (None: no limit)
    max_per_export: int | None = None
    #: members per segment (None: no limit)
    max_per_segment: int | None = None

    # -- capabilities: what the engine may rely on (declared, never inferred) --------------------------
    #: :meth:`prepare_many` converts (or rejects) each chunk's records before batching; when False the
    #: records are sent as validated and the engine skips the call
    converts_records = False
    #: :meth:`prepare_many` sets each record's ``body`` (the member as sent, JSON bytes); when False and
    #: export state is kept, the engine sets it from the validated payload (:meth:`encode`)
    encodes_bodies = False
    #: :meth:`member_key` is the member's key at the destination (the engine calls it per record); when
    #: False the key is the record's email, else its source key
    has_member_key = False
    #: ``send`` sets ``Record.dest_key`` on each record it confirms to the key the vendor assigned (e.g. a
    #: contact ID); the export state keeps that key for mirror removals instead of :meth:`member_key`'s. A
    #: record the state already holds reaches :meth:`prepare_many` with the key stored last time in ``dest_key``
    assigns_keys = False
    #: ``send`` only queues the work (outcome ``planned``) and the vendor confirms it after the engine
    #: returned (deferrable mode): :meth:`deferred_outcomes` reads the results and
    #: :func:`~airflow_provider_segexport.export.engine.apply_outcomes` applies them
    confirms_later = False
    #: members who left the segment are removed (:meth:`remove_members`); needs export state
    mirror = False
    #: the destination creates or finds an object per segment (e.g. a marketing list) whose ID the export state
    #: keeps: :meth:`recall_targets` gets the remembered IDs before :meth:`preflight`, and :meth:`target_of`
    #: is asked for each segment's ID when the segment was exported
    remembers_targets = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.converts_records and any(getattr(cls, m) is not getattr(Destination, m) for m in _PREPARE_OVERRIDES):
            raise TypeError(f"{cls.__name__} overrides prepare/prepare_many: declare converts_records = True")
        if not cls.has_member_key and cls.member_key is not Destination.member_key:
            raise TypeError(f"{cls.__name__} overrides member_key: declare has_member_key = True")

    def __init__(self, mapping: FieldMapping, target: str) -> None:
        self.mapping = mapping
        self.target = target

    def preflight(self, segments: list[Segment], dry_run: bool) -> None:
        """Check the destination before the first member is sent; raise :class:`ExportError` with a fix.

        :param segments: the segments about to be exported.
        :param dry_run: nothing may be changed at the destination.
        """

    def prepare(self, record: Record) -> Record | Reject:
        """Vendor-specific conversion of one mapped record (types, formats); may reject it.

        :param record: a validated record.
        """
        return record

    def prepare_many(self, records: list[Record]) -> tuple[list[Record], list[Reject]]:
        """:meth:`prepare` for a chunk: (records, rejects) in row order. Override for a faster loop.

        :param records: a chunk's validated records, in row order.
        """
        out: list[Record] = []
        rejects: list[Reject] = []
        for r in records:
            item = self.prepare(r)
            (out if item.__class__ is Record else rejects).append(item)
        return out, rejects

    def send(self, segment: Segment, records: list[Record]) -> list[Outcome] | BatchOutcome:
        """Send one batch; return one outcome per record, or a :class:`BatchOutcome`. Raise
        :class:`BatchRefused` to have it split; any other exception stops the export.

        :param segment: the segment the records belong to.
        :param records: at most ``batch_size`` records.
        """
        raise NotImplementedError

    def member_key(self, record: Record) -> str:
        """The member's key at the destination, kept in the export state for mirror removals (called
        before :meth:`prepare` when ``has_member_key``).

        :param record: a validated record.
        """
        return record.email or record.key

    def encode(self, record: Record) -> bytes:
        """The member's payload as sent (JSON).

        :param record: a prepared record.
        """
        return encode_json(record.payload)

    def fingerprint_config(self) -> bytes:
        """Everything besides a row's validated values that shapes its payload (the mapping, the vendor
        settings, the target's field types), called after :meth:`preflight`. A delta run re-sends every
        member when it changes; otherwise a member is sent again only when its values change."""
        return encode_json({"target": self.target, "fields": self.mapping.fields})

    def remove_members(self, segment: Segment, keys: list[str]) -> int:
        """Mirror mode: undo this export's effect for members who left the segment; return how many.

        :param segment: the segment they left.
        :param keys: their keys as the export state kept them (:meth:`member_key` or the assigned key).
        """
        raise NotImplementedError

    def deferred_outcomes(self, results: Any) -> Iterator[tuple[list[Outcome], bool]]:
        """``confirms_later``: the outcomes of the queued work, from what the wait for it returned (e.g. a
        trigger event): (outcomes, processed) per unit of work; ``processed`` False when the vendor did not
        process it (its segment's change-column watermark then stays). Each outcome's record holds what
        resuming needs (segment, row, key, member id, fingerprint), no profile data.

        :param results: what the wait returned, as the destination's operator passes it.
        """
        raise NotImplementedError

    def recall_targets(self, targets: dict[str, str | None]) -> None:
        """``remembers_targets``: the IDs the export state remembers, per segment (None: none yet).

        :param targets: segment name -> remembered ID or None.
        """

    def target_of(self, segment: Segment) -> str | None:
        """``remembers_targets``: the ID of the object the segment was exported to, for the export state.

        :param segment: a segment exported by this run.
        """
        return None

    def http_stats(self) -> dict[str, int]:
        """Counters of the HTTP layer (calls, retries, throttling) for the summary."""
        return {}

    def close(self) -> None:
        """Release threads and connections."""


class EmailDestination(Destination):
    """A destination that identifies members by email address: reads the address, rejects up front the
    members the vendor refused for good in earlier runs, matches per-member errors by address and
    remembers permanent refusals.

    :param mapping: the field mapping; its ``email_field`` (default ``email``) holds the address.
    :param target: the vendor object members are exported to.
    :param refusals: the store of addresses the vendor refused for good (None: not remembered).
    """

    #: lower-case phrases of a vendor message that mean the refusal is for good (the address was forgotten,
    #: permanently deleted, ...): such members are remembered and rejected up front by later runs
    permanent_markers: tuple[str, ...] = ()

    def __init__(self, mapping: FieldMapping, target: str, *, refusals: RefusalStore | None = None) -> None:
        super().__init__(mapping, target)
        self.refusals = refusals
        self.email_field = mapping.email_field or "email"

    def is_permanent_refusal(self, message: str | None) -> bool:
        """Whether the vendor's refusal is for good (one of :attr:`permanent_markers` is in it).

        :param message: the vendor's message.
        """
        return bool(message) and any(m in message.lower() for m in self.permanent_markers)

    def email_of(self, record: Record) -> str:
        """A record's address in lower case (records keep it in ``email``; else the payload's).

        :param record: a validated record.
        """
        return record.email or str(record.payload.get(self.email_field, "")).lower()

    def previously_refused(self, record: Record) -> Reject | None:
        """The reject of a member the vendor refused for good in an earlier run, else None.

        :param record: a validated record.
        """
        refusals = self.refusals
        if refusals is None or not refusals.known:  # an empty store (the usual case) costs nothing
            return None
        previous = refusals.get(self.email_of(record), record.member or None)
        if not previous:
            return None
        return Reject(record.segment, record.row, record.key, PREVIOUSLY_REFUSED, self.email_field,
                      f"{self.name} refused this address permanently in an earlier run; not sent again", previous)

    def refused_by_email(self, records: Sequence[Record], messages: dict[str, str]) -> list[Outcome]:
        """The rejected outcomes of the records whose address the vendor refused (``messages``: lower-case
        address -> message, no address in the message); permanent refusals are remembered.

        :param records: the batch, as sent.
        :param messages: the vendor's per-address errors.
        """
        refused = [Outcome(r, "rejected", messages[e]) for r in records if (e := self.email_of(r)) in messages]
        if refused and self.refusals is not None:
            self.refusals.add_members((o.record.member, o.message) for o in refused
                                      if self.is_permanent_refusal(o.message))
        return refused

    def close(self) -> None:
        """Close the refusal store."""
        if self.refusals is not None:
            self.refusals.close()

    def remember_refusals(self, outcomes: Iterable[Outcome]) -> None:
        """Remember the permanent refusals among outcomes whose records hold only member ids (deferred).

        :param outcomes: outcomes of any status.
        """
        if self.refusals is not None:
            self.refusals.add_members((o.record.member, o.message) for o in outcomes
                                      if o.status == "rejected" and self.is_permanent_refusal(o.message))


def in_chunks(items: Sequence[Any], size: int, call: Callable[[Sequence[Any]], int], workers: int) -> int:
    """Call ``call`` on ``items`` in chunks of ``size``, ``workers`` chunks at a time (the vendor's
    concurrency); return the sum of what the calls returned (e.g. members removed).

    :param items: e.g. the keys of the members to remove.
    :param size: the vendor's maximum per call.
    :param call: one vendor call for one chunk.
    :param workers: calls at once.
    """
    chunks = [items[i: i + size] for i in range(0, len(items), size)]
    if len(chunks) <= 1:
        return sum(map(call, chunks))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="segexport-chunks") as pool:
        return sum(pool.map(call, chunks))
