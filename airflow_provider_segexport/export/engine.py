"""The destination-agnostic export engine.

stream rows in chunks -> map + validate + dedupe -> (delta: drop members unchanged since the destination
confirmed them) -> destination.prepare -> batch to the destination's size -> send with a bounded number
of batches in flight -> per-row outcomes -> export state -> report.

Backpressure: at most ``max_in_flight`` batches are being sent and as many more wait ready behind them
(a lane that frees up starts its next call at once, while the reader prepares more); the reader blocks
beyond that, so memory holds about ``2 * max_in_flight`` batches and one chunk of rows whatever the
segment size. When a vendor refuses a whole batch because of one bad row (:class:`BatchRefused`), the
batch is split in halves until the bad row is isolated and rejected with the vendor's reason; the rest
still goes through.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import operator
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from hashlib import blake2b
from typing import Any

import msgspec

from airflow_provider_segexport.export.records import (
    VENDOR_REJECTED,
    Deduper,
    FieldMapping,
    Record,
    Reject,
    RowValidator,
    member_id,
    row_of,
)
from airflow_provider_segexport.export.report import (
    OUTCOMES,
    Progress,
    RejectsWriter,
    SegmentStats,
    summary_table,
)
from airflow_provider_segexport.export.sources import Segment, decode_watermark, encode_watermark
from airflow_provider_segexport.export.state import ExportStateBackend, Watermark
from airflow_provider_segexport.http import encode_json

log = logging.getLogger(__name__)


_CONFIRMED = frozenset({"created", "updated", "unchanged"})
_status_of = operator.attrgetter("status")
_not_none = functools.partial(operator.is_not, None)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


class ExportError(RuntimeError):
    """The export stopped. The message says why and what to do."""


class ExportLimitExceeded(ExportError):
    """A segment or the whole export is larger than the destination accepts; nothing was sent."""


class BatchRefused(Exception):
    """The vendor refused a whole batch because of its content (e.g. one malformed member).

    The engine splits the batch to isolate the offending rows.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Outcome(msgspec.Struct, gc=False):
    """What the destination did with one record: created, updated, unchanged or rejected (a msgspec struct,
    like :class:`Record`)."""

    record: Record
    status: str
    message: str | None = None
    reason: str = VENDOR_REJECTED


#: the delta step's snapshot of a segment whose export state was empty when the run began
_NOTHING_KNOWN = object()


class BatchOutcome(msgspec.Struct, gc=False):
    """What the destination did with a whole batch, told without an :class:`Outcome` per record: how many
    records got each status, and an outcome for each record that was not confirmed (rejected, planned, ...).
    Every other record of the batch was confirmed (created, updated or unchanged).

    A destination whose answer gives counts and lists only the failures returns this from ``send``: the
    engine then touches no record the destination confirmed until it journals them (~1.5 µs a member less
    than one outcome each, mostly memory the records no longer have in cache by the time the answer comes).
    """

    counts: dict[str, int]
    exceptions: list[Outcome] = []

    @classmethod
    def of(cls, outcomes: list[Outcome]) -> BatchOutcome:
        """The same, from one outcome per record (what ``send`` may return instead; each outcome holds one of
        the batch's records, the very object)."""
        return cls(dict(Counter(map(_status_of, outcomes))), [o for o in outcomes if o.status not in _CONFIRMED])

    def __add__(self, other: BatchOutcome) -> BatchOutcome:
        return BatchOutcome(dict(Counter(self.counts) + Counter(other.counts)), self.exceptions + other.exceptions)

    def confirmed(self, records: list[Record]) -> list[Record]:
        """The records of the batch (in order) that the destination confirmed."""
        if not self.exceptions:
            return records
        left_out = {id(o.record) for o in self.exceptions}
        return [r for r in records if id(r) not in left_out]


class Destination:
    """What a destination plugs into the engine. Vendor adapters subclass this."""

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

    def __init__(self, mapping: FieldMapping, target: str) -> None:
        self.mapping = mapping
        self.target = target

    def preflight(self, segments: list[Segment], dry_run: bool) -> None:
        """Check the destination before the first member is sent; raise ExportError with a fix."""

    def prepare(self, record: Record) -> Record | Reject:
        """Vendor-specific conversion of a mapped record (types, formats); may reject it."""
        return record

    def prepare_many(self, records: list[Record]) -> tuple[list[Record], list[Reject]]:
        """:meth:`prepare` for a chunk: (records, rejects) in row order. Override for a faster loop."""
        out: list[Record] = []
        rejects: list[Reject] = []
        for r in records:
            item = self.prepare(r)
            (out if item.__class__ is Record else rejects).append(item)
        return out, rejects

    def send(self, segment: Segment, records: list[Record]) -> list[Outcome] | BatchOutcome:
        """Send one batch; return one outcome per record, or a :class:`BatchOutcome`. Raise BatchRefused to
        have it split."""
        raise NotImplementedError

    def finish_segment(self, segment: Segment, dry_run: bool) -> dict[str, int]:
        """After every batch of a segment is confirmed (e.g. mirror removals). Returns extra counts."""
        return {}

    #: True when the engine keeps export state (delta exports; mirror leavers come from the state)
    state_managed = False
    #: True when ``send`` only queues the work and the destination confirms it after the engine returns
    #: (deferrable mode): the change-column watermark is then advanced by whoever confirms it
    confirms_later = False
    #: whether members who left the segment are removed (mirror mode)
    mirror = False
    #: True when :meth:`prepare` / :meth:`prepare_many` set each record's ``body`` (the member as sent, JSON)
    #: while they convert it; otherwise the engine encodes the payload (:meth:`encode`) when state is kept
    encodes_bodies = False

    def member_key(self, record: Record) -> str:
        """The member's key at the destination (email for email destinations, else the mapped ID); called
        on the validated record, before :meth:`prepare`."""
        return record.email or record.key

    def encode(self, record: Record) -> bytes:
        """The member's payload as sent (JSON)."""
        return encode_json(record.payload)

    def fingerprint_config(self) -> bytes:
        """Everything besides a row's validated values that shapes its payload (the mapping, the vendor
        settings, the target's field types), called after :meth:`preflight`. A delta run re-sends every
        member when it changes; otherwise a member is sent again only when its values change."""
        return encode_json({"target": self.target, "fields": self.mapping.fields})

    def remove_members(self, segment: Segment, keys: list[str]) -> int:
        """Mirror mode: undo this export's effect for members who left the segment; return how many."""
        raise NotImplementedError

    def http_stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        """Release threads and connections."""


_END = object()


class _Prefetch:
    """A source's chunks, read by a thread ahead of the reader (at most ``depth`` chunks ahead). The
    source's connection and cursor live and die in that thread."""

    def __init__(self, source: Any, columns: list[str], depth: int = 4) -> None:
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source, columns), name="segexport-prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Any, columns: list[str]) -> None:
        try:
            chunks = source.chunks(columns)
            try:
                for chunk in chunks:
                    if not self._put(chunk):
                        return
            finally:
                chunks.close()
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - raised in the reader
            self._put(exc)

    def __iter__(self) -> Iterator[list]:
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a pending put
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=30)


@contextmanager
def _tuned_for_export() -> Iterator[None]:
    """The cyclic garbage collector tuned for an export, then restored: the records an export allocates
    by the million hold no reference cycles, yet every few hundred allocations the collector would walk
    the young objects, and now and then the whole heap (Airflow's included). During the export the
    objects that existed before it are left out of collections (``gc.freeze``) and young collections are
    100x rarer."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(thresholds[0], 70_000), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


class ExportEngine:
    def __init__(
        self,
        destination: Destination,
        segments: Iterable[Segment],
        *,
        rejects_path: Any,
        dry_run: bool = False,
        logger: logging.Logger | Any = None,
        progress_interval: float = 10.0,
        max_rejects_share: float | None = None,
        state: ExportStateBackend | None = None,
        run_id: str = "manual",
        full_refresh: bool = False,
        max_removal_share: float = 0.2,
        max_size_change: float = 2.0,
        allow_large_changes: bool = False,
        plan_out: Any = None,
        plan_in: Any = None,
        change_column: str | None = None,
    ) -> None:
        self.destination = destination
        self.segments = list(segments)
        self.dry_run = dry_run
        self.log = logger or log
        self.progress_interval = progress_interval
        self.max_rejects_share = max_rejects_share
        self.rejects = RejectsWriter(rejects_path)
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self._stats: dict[str, SegmentStats] = {}
        self._deduper = Deduper()
        self.state = state
        self.run_id = run_id
        self.full_refresh = full_refresh
        self.max_removal_share = max_removal_share
        self.max_size_change = max_size_change
        self.allow_large_changes = allow_large_changes
        self._scope_ids: dict[str, int] = {}
        self._snapshots: dict[int, Any] = {}
        self._fp_salt = b""  # set by run() from the destination's fingerprint_config()
        self.change_column = change_column or None
        self._totals: dict[str, int] | None = None  # row counts per segment, once counted (see _counts)
        self._estimates: dict[str, int] = {}
        self._members_before: dict[int, int] = {}  # scope id -> members with state before this run
        self._prefetch: tuple | None = None  # (segment, since, columns, _Prefetch) for the first segment
        self._watermarks: dict[str, dict] = {}  # segment -> what the summary reports about the change column
        destination.state_managed = state is not None
        self._custom_member_key = type(destination).member_key is not Destination.member_key
        if (plan_out is not None or plan_in is not None) and state is None:
            raise ExportError("Plans need export state: use delta=True to write or apply a plan.")
        self.plan_out = plan_out if dry_run else None
        self._plan_fh = None
        self._plan_lines: list[str] = []
        self.plan_counts: Counter = Counter()
        self._dry_seen: dict[int, set[int]] = {}
        self._plan: dict | None = self._load_plan(plan_in) if plan_in is not None and not dry_run else None
        self.plan_in = plan_in

    # -- pre-flight ------------------------------------------------------------------------------
    def _preflight(self) -> dict[str, int]:
        d = self.destination
        if not self.segments:
            raise ExportError("No segments to export.")
        names = [s.name for s in self.segments]
        if len(set(names)) != len(names):
            raise ExportError(f"Segment names must be unique in one export; got {names}.")
        for seg in self.segments:
            columns = seg.source.columns()
            d.mapping.check_columns(columns, f"Segment '{seg.name}' ({seg.source.description})")
            if self.change_column and self.change_column not in columns:
                raise ExportError(
                    f"change_column '{self.change_column}' is not a column of segment '{seg.name}' "
                    f"({seg.source.description}); its columns: {', '.join(columns)}. Name the column that changes "
                    "whenever a row changes (e.g. updated_at), or leave change_column unset.")
        if self.state is not None:
            for seg in self.segments:
                self._scope_ids[seg.name] = self.state.scope_id(seg.name)
        # While the destination is checked, the segments are counted (one query each, in the database) and the
        # first segment's rows start streaming in; on a repeat export the counts are awaited only before the
        # first send.
        self._counter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segexport-count")
        self._counting = self._counter.submit(self._count_segments)
        try:
            self._start_prefetch()
            d.preflight(self.segments, self.dry_run)
        except BaseException:
            self._counts()  # a source error or a limit is the first thing to fix: reported before the destination's
            raise
        finally:
            self._counter.shutdown(wait=False)

    def _counts(self) -> dict[str, int]:
        """The segments' row counts. The first call waits for the count queries and applies the limits and the
        size circuit breaker: it is made before anything is sent."""
        if self._totals is not None:
            return self._totals
        d = self.destination
        totals = self._counting.result()
        for seg in self.segments:
            if d.max_per_segment is not None and totals[seg.name] > d.max_per_segment:
                raise ExportLimitExceeded(
                    f"Segment '{seg.name}' has {totals[seg.name]:,} members; {d.name} accepts at most "
                    f"{d.max_per_segment:,} per segment. Nothing was sent. Split the segment (e.g. by a "
                    "column range) into several segments or exports."
                )
        total = sum(totals.values())
        if d.max_per_export is not None and total > d.max_per_export:
            raise ExportLimitExceeded(
                f"This export has {total:,} profiles ({', '.join(f'{k}: {v:,}' for k, v in totals.items())}); "
                f"{d.name} accepts at most {d.max_per_export:,} per export. Nothing was sent. Export fewer or "
                "smaller segments per task (e.g. one task per segment)."
            )
        if self.state is not None:
            for seg in self.segments:
                last = self.state.last_count(self._scope_ids[seg.name])
                now = totals[seg.name]
                if last and not self.allow_large_changes and self.max_size_change:
                    ratio = max(now, 1) / last if now >= last else last / max(now, 1)
                    if ratio > self.max_size_change:
                        raise ExportError(
                            f"Segment '{seg.name}' has {now:,} members; the last export to {d.name} '{d.target}' "
                            f"had {last:,} ({ratio:.1f}x {'growth' if now > last else 'shrinkage'}, more than the "
                            f"allowed {self.max_size_change:g}x). Nothing was sent. If this change is expected, "
                            "run again with allow_large_changes=True (DAG param); otherwise check the upstream "
                            "segment model."
                        )
        self._totals = totals
        if self._deduper is not None:
            self._deduper.reserve(total)
        self.log.info("Counted %s rows in all (%s)", f"{total:,}", ", ".join(f"{k}: {v:,}" for k, v in totals.items()))
        return totals

    def _size_text(self, rows: int, where: str = "") -> str:
        """How many rows, as known now: counted, estimated from the last export while counting, or not yet."""
        if self._totals is not None:
            return f"{rows:,} rows{where}"
        return f"about {rows:,} rows{where} (counting)" if rows else "rows being counted"

    def _count_segments(self) -> dict[str, int]:
        return {seg.name: seg.source.count() for seg in self.segments}

    # -- run ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        started = time.monotonic()
        d = self.destination
        mode = "DRY RUN: nothing will be sent" if self.dry_run else f"to {d.name} '{d.target}'"
        self.log.info("::group::Pre-flight checks")
        try:
            self._preflight()
            self._fp_salt = blake2b(d.fingerprint_config(), digest_size=16).digest()
            self._fp_hasher = blake2b(digest_size=8, salt=self._fp_salt)
            # Reading starts while the segments are still counted (the first send waits for the counts: the
            # limits). The last export's sizes (export state) size the dedupe tables meanwhile; without them
            # the tables are sized when the counts arrive.
            lasts = [self.state.last_count(self._scope_ids[s.name]) if self.state else None for s in self.segments]
            self._estimates = {s.name: n or 0 for s, n in zip(self.segments, lasts, strict=True)}
        except BaseException:
            self._stop_prefetch()
            raise
        estimate = sum(self._estimates.values())
        self._deduper = Deduper(estimate)
        self.log.info("Exporting %d segment(s), %s, %s; batches of %d, up to %d in flight", len(self.segments),
                      self._size_text(sum(self._totals.values()) if self._totals is not None else
                                      estimate if all(lasts) else 0, " in all"), mode, d.batch_size, d.max_in_flight)
        self.log.info("::endgroup::")
        try:
            with _tuned_for_export(), ThreadPoolExecutor(max_workers=d.max_in_flight,
                                                        thread_name_prefix="segexport") as pool:
                slots = threading.BoundedSemaphore(2 * d.max_in_flight)  # in flight + ready
                for seg in self.segments:
                    if self._failure is not None:  # segments never started: every row is not sent
                        total = self._counts()[seg.name]
                        stats = self._stats[seg.name] = SegmentStats(seg.name, total)
                        stats.read = total
                        stats.counts["not_sent"] = total
                        continue
                    self._run_segment(seg, pool, slots)
        finally:
            self._stop_prefetch()
            self.rejects.close()
            if self._plan_fh is not None:
                self._plan_fh.write("".join(self._plan_lines))
                self._plan_fh.close()
        summary = self._summary(time.monotonic() - started)
        if self.plan_out is not None:
            summary["plan"] = {"path": str(self.plan_out), "counts": dict(self.plan_counts)}
            self.log.info("Plan written to %s: %s. Apply exactly this plan with apply_plan=%r.", self.plan_out,
                          ", ".join(f"{k} {v:,}" for k, v in sorted(self.plan_counts.items())) or "nothing to do",
                          str(self.plan_out))
        elif self._plan is not None:
            summary["plan"] = {"applied": str(self.plan_in)}
        self.log.info("Summary of the export %s:\n%s", mode, summary_table(summary))
        if summary["rejects"]["count"]:
            self.log.warning("%s row(s) rejected (%s); details (row, key, reason, vendor message) in %s",
                             f"{summary['rejects']['count']:,}",
                             ", ".join(f"{k}: {v:,}" for k, v in summary["rejects"]["by_reason"].items()),
                             summary["rejects"]["path"])
        if self._failure is not None:
            t = summary["totals"]
            confirmed = t["created"] + t["updated"] + t["unchanged"]
            resume = ("the retry sends only what was not confirmed" if self.state is not None
                      else "re-sending is safe: members are upserted")
            raise ExportError(
                f"The export to {d.name} stopped: {str(self._failure).rstrip('.')}. {confirmed:,} member(s) "
                f"confirmed before the failure are kept at the destination; {t['not_sent']:,} row(s) were not "
                f"sent (not_sent in the summary). Fix the cause and clear the task to run it again ({resume})."
            ) from self._failure
        share = self.max_rejects_share
        rows = summary["totals"]["rows"]
        if share is not None and rows and summary["totals"]["rejected"] / rows > share:
            raise ExportError(
                f"{summary['totals']['rejected']:,} of {rows:,} rows were rejected, more than the allowed "
                f"{share:.0%}; see {summary['rejects']['path']}."
            )
        return summary

    def _run_segment(self, seg: Segment, pool: ThreadPoolExecutor, slots: threading.BoundedSemaphore) -> None:
        d = self.destination
        total = (self._totals or self._estimates)[seg.name]  # the count, or until it is known the last one
        stats = self._stats[seg.name] = SegmentStats(seg.name, total)
        progress = Progress(self.log, f"{d.name} segment '{seg.name}'", total, self.progress_interval)
        sid = self._scope_ids.get(seg.name)
        validate = RowValidator(d.mapping, seg.name, self._deduper, self.segments.index(seg),
                                fingerprint=self._fp_hasher if sid is not None else None)
        pending: list[Future] = []
        batch: list[Record] = []
        prev_members = self._member_count(sid) if sid is not None else 0
        source, since = seg.source, self._since(seg, sid, prev_members)
        if since is not None:  # only the rows changed since the last complete export are read
            source = seg.source.changed_since(self.change_column, since)
        elif sid is not None and prev_members:
            try:  # the segment's state in memory for the delta lookups (17 bytes a member)
                self._snapshots[sid] = self.state.snapshot(sid, self.run_id)
            except NotImplementedError:  # a backend that only answers lookups
                pass
        elif sid is not None:  # nothing in the state: no lookups (this run's own confirmations are not looked up)
            self._snapshots[sid] = _NOTHING_KNOWN

        def submit(records: list[Record]) -> None:
            if self._totals is None:
                stats.total = progress.total = self._counts()[seg.name]  # the limits, before the first send
            slots.acquire()
            if self._failure is not None:
                slots.release()
                self._not_sent(stats, records)
                return
            fut = pool.submit(self._send_batch, seg, records, stats, progress)
            fut.add_done_callback(lambda _f: slots.release())
            pending.append(fut)
            if len(pending) > 4 * d.max_in_flight:
                pending[:] = [f for f in pending if not f.done()]

        self.log.info("::group::Segment '%s' -> %s '%s': %s", seg.name, d.name, d.target, self._size_text(total))
        prepare = type(d).prepare is not Destination.prepare or type(d).prepare_many is not Destination.prepare_many
        size = d.batch_size
        row_number = 0
        columns, high, change = self._read_columns(), None, None
        if self.change_column and sid is not None:  # its highest value read: the next run's watermark
            change = operator.itemgetter(columns.index(self.change_column))
        chunks = self._prefetched(seg, since, columns) or source.chunks(columns)
        # Chunk by chunk: validate, drop what the export state says is unchanged (delta), let the
        # destination convert the rest, then cut it into batches of the destination's size.
        try:
            for rows in chunks:
                if change is not None:
                    high = self._highest(high, rows, change)
                records, rejects = validate.many(rows, row_number + 1)
                row_number += len(rows)
                if sid is not None and records:  # unchanged since the last confirmed export: not converted at all
                    records = self._delta(sid, records, stats, progress)
                if prepare and records:
                    records, refused = d.prepare_many(records)
                    if refused:
                        rejects = sorted(rejects + refused, key=row_of) if rejects else refused
                if rejects:
                    self._reject_many(stats, rejects)
                    progress.advance(len(rejects), stats.counts)
                if sid is not None and records and not d.encodes_bodies:  # sent as encoded here
                    if type(d).encode is Destination.encode:
                        for r in records:  # a payload not converted is sent as the validator encoded it
                            r.body = r.payload_json if r.payload_json is not None and not prepare \
                                else encode_json(r.payload)
                    else:
                        for r in records:
                            r.body = d.encode(r)
                batch.extend(records)
                while len(batch) >= size:
                    submit(batch[:size])
                    batch = batch[size:]
                if self._failure is not None:
                    break
        finally:
            chunks.close()  # the cursor (and the prefetch thread) even when the reading stopped early
        stats.total = progress.total = total = self._counts()[seg.name]
        if seg is self.segments[-1]:  # every row read: the dedupe tables (~48 MB at 1,000,000) go before the fold
            self._deduper = validate = None
        stats.read = row_number
        if self._failure is not None and total > row_number:  # rows never read are not sent either
            with self._lock:
                stats.counts["not_sent"] += total - row_number
            stats.read = total
        elif since is not None:  # the rows not read: unchanged since the watermark
            unread = max(0, total - row_number)
            with self._lock:
                stats.counts["skipped"] += unread
            stats.read = row_number + unread
            progress.advance(unread, stats.counts)
        while batch and self._failure is None:
            submit(batch[: d.batch_size])
            batch = batch[d.batch_size:]
        if batch:  # read and valid, but the export stopped before they were batched
            self._not_sent(stats, batch)
        for fut in pending:
            fut.result()
        if self._failure is None:
            extra = d.finish_segment(seg, self.dry_run)
            for key, value in extra.items():
                stats.counts[key] += value
            if sid is not None:
                self._finish_state(seg, sid, total, prev_members, stats)
                self._advance_watermark(seg, sid, since, high)
        self._snapshots.pop(sid, None)
        stats.duration = time.monotonic() - stats.started
        progress.emit(stats.counts)
        self.log.info("::endgroup::")

    # -- change column (watermark) ------------------------------------------------------------------
    def _since(self, seg: Segment, sid: int | None, prev_members: int) -> Any:
        """The watermark to read from (rows whose change column is >= it), or None to read every row."""
        col = self.change_column
        if col is None or sid is None:
            return None
        report = self._watermarks[seg.name] = {"column": col, "since": None}
        since, why = self._watermark_for(sid, prev_members, check_salt=True)
        if why is not None:
            self.log.info("Segment '%s': reading every row (%s).", seg.name, why)
            return None
        report["since"] = _text(since)
        self.log.info("Segment '%s': reading only the rows whose %s is >= %s (or NULL); the others are unchanged "
                      "since the last complete export.", seg.name, col, _text(since))
        return since

    def _watermark_for(self, sid: int, prev_members: int, check_salt: bool) -> tuple[Any, str | None]:
        """(the watermark, None) or (None, why every row is read)."""
        col, d = self.change_column, self.destination
        why = None
        wm = self.state.watermark(sid)
        if d.mirror:
            why = "mirror mode finds the members who left by reading the whole segment"
        elif self.full_refresh:
            why = "full_refresh"
        elif not prev_members or wm is None:
            why = "no complete export recorded a watermark yet"
        elif wm.column != col:
            why = f"the last export's change column was '{wm.column}'"
        elif check_salt and wm.salt != self._fp_salt:
            why = f"{d.name}'s settings or the mapping changed since the last export: every member is due"
        return (None, why) if why is not None else (decode_watermark(wm.value), None)

    def _read_columns(self) -> list[str]:
        """What is read: the mapped columns (the validator's), and the change column (its highest value is the
        next run's watermark)."""
        columns = self.destination.mapping.source_columns
        if self.change_column and self.state is not None and self.change_column not in columns:
            columns = [*columns, self.change_column]
        return columns

    def _start_prefetch(self) -> None:
        """With a watermark, the first segment's changed rows are queried while the destination is checked and the
        segments counted: the query scans the whole segment in the database and returns few rows. (A full read
        is not prefetched: its first rows come at once, and a reading thread would contend with the reader.)"""
        seg = self.segments[0]
        sid = self._scope_ids.get(seg.name)
        if not self.change_column or sid is None:
            return
        # optimistic: the destination's settings (the salt) are checked after the pre-flight
        since, _ = self._watermark_for(sid, self._member_count(sid), check_salt=False)
        if since is None:
            return
        source = seg.source.changed_since(self.change_column, since)
        columns = self._read_columns()
        self._prefetch = (seg.name, _text(since), columns, _Prefetch(source, columns))

    def _prefetched(self, seg: Segment, since: Any, columns: list[str]) -> Iterator[list] | None:
        """The prefetched chunks if they are what the segment reads now; else None (and the prefetch stops)."""
        if self._prefetch is None:
            return None
        name, prefetched_since, prefetched_columns, prefetch = self._prefetch
        if (name, prefetched_since, prefetched_columns) != (seg.name, _text(since), columns):
            self._stop_prefetch()
            return None
        self._prefetch = None
        return iter(prefetch)

    def _stop_prefetch(self) -> None:
        """The run stopped before reading the prefetched rows: stop the thread (and close its cursor)."""
        if self._prefetch is not None:
            self._prefetch[3].close()
            self._prefetch = None

    def _member_count(self, sid: int) -> int:
        if sid not in self._members_before:
            self._members_before[sid] = self.state.member_count(sid)
        return self._members_before[sid]

    def _highest(self, high: Any, rows: list, change: Any) -> Any:
        try:
            try:
                top = max(map(change, rows), default=None)
            except TypeError:  # a NULL among them (or values of different types): NULLs left out, in C
                top = max(filter(_not_none, map(change, rows)), default=None)
            return top if high is None or (top is not None and top > high) else high
        except TypeError as exc:
            raise ExportError(f"change_column '{self.change_column}' holds values of different types ({exc}); "
                              "use a timestamp, date or number column.") from exc

    def _advance_watermark(self, seg: Segment, sid: int, since: Any, high: Any) -> None:
        """After a complete export of the segment: the next run reads from the highest change-column value this
        one read. The rows were read in one query (one snapshot of the database): a row changed after it gets a
        higher value (the column must only grow), so the next run reads it; a row at the watermark itself is
        read again and found unchanged."""
        if self.change_column is None or self.dry_run or self.destination.mirror or high is None:
            return
        self._watermarks[seg.name]["high"] = _text(high)
        try:
            if since is not None and not high > since:  # nothing newer: the watermark stays
                return
        except TypeError:  # the column's type changed since: the new values decide
            pass
        wm = Watermark(self.change_column, encode_watermark(high), self._fp_salt)
        if self.destination.confirms_later:  # advanced once the destination confirms the work
            self._watermarks[seg.name]["pending"] = {"scope_id": sid, **wm.as_dict()}
        else:
            self.state.set_watermark(sid, wm, self.run_id)
            self._watermarks[seg.name]["advanced_to"] = _text(high)

    def _send_batch(self, seg: Segment, records: list[Record], stats: SegmentStats, progress: Progress) -> None:
        if self._failure is not None:  # a batch that was waiting when another one failed
            self._not_sent(stats, records)
            return
        try:
            if self.dry_run:
                outcome = BatchOutcome({"planned": len(records)})
            else:
                outcome = self._send_splitting(seg, records)
        except BaseException as exc:  # noqa: BLE001 - reported after the pool drains
            with self._lock:
                if self._failure is None:
                    self._failure = exc
            self._not_sent(stats, records)
            return
        refused = [o for o in outcome.exceptions if o.status == "rejected"]
        with self._lock:
            for o in refused:
                r = o.record
                self.rejects.write(Reject(seg.name, r.row, r.key, o.reason, None,
                                          f"{self.destination.name} refused the member", o.message))
            stats.counts.update(outcome.counts)
        sid = self._scope_ids.get(seg.name)
        if sid is not None and not self.dry_run:
            # Only what the destination confirmed is remembered; a rejected member is retried next run.
            confirmed = outcome.confirmed(records)
            if confirmed:
                if self._custom_member_key:
                    keys = list(map(self.destination.member_key, confirmed))
                else:
                    keys = [r.email or r.key for r in confirmed]  # Destination.member_key, inlined
                self.state.confirm_columns(sid, [r.member for r in confirmed], [r.fp for r in confirmed], keys,
                                           self.run_id)
            if refused:
                self.state.forget(sid, [o.record.member for o in refused])
        progress.advance(len(records), stats.counts)

    def _delta(self, sid: int, records: list[Record], stats: SegmentStats, progress: Progress) -> list[Record]:
        """Drop members whose values (and the destination's settings) are the same as when the destination
        confirmed them; return those to send, fingerprinted."""
        d = self.destination
        if self._custom_member_key:
            for r in records:
                r.member = member_id(d.member_key(r))
        # The fingerprint is of the validated values (mapping order), salted with the destination's settings
        # (fingerprint_config): what decides the payload, known before the destination converts anything.
        # The validator makes it (RowValidator(fingerprint=...)) while the payload is at hand: _run_segment gives
        # it the hasher whenever there is export state, so every record here has one.
        snapshot = self._snapshots.get(sid)
        if snapshot is _NOTHING_KNOWN:  # the segment's state was empty when the run began (a first export)
            known = {}
        elif snapshot is not None:
            known = snapshot.lookup([r.member for r in records], self.run_id)
        else:
            known = self.state.lookup(sid, [r.member for r in records])
        send: list[Record] = []
        skipped: list[int] = []
        not_planned = 0
        compare = records
        if not known and self._plan is None and self.plan_out is None:  # none known (a first run): all due
            send, compare = list(records), ()
        for r in compare:
            k = known.get(r.member)
            # Unchanged since the last confirmed export: skip. With full_refresh, skip only what this very
            # run already confirmed (a retried task resumes instead of resending).
            if k is not None and k[0] == r.fp and (not self.full_refresh or k[1] == self.run_id):
                skipped.append(r.member)
            elif self._plan is not None and self._plan["send"].get((r.segment, r.member)) != r.fp:
                not_planned += 1  # applying a plan: exactly what it lists, nothing more
            else:
                send.append(r)
                if self.plan_out is not None:
                    self._plan_write("update" if k is not None else "add", r.segment, row=r.row, key=r.key,
                                     member=r.member, fp=r.fp)
        if self.dry_run and d.mirror:  # nothing is written in a dry run: remember who was seen here
            self._dry_seen.setdefault(sid, set()).update(r.member for r in records)
        if not_planned:
            with self._lock:
                stats.counts["not_in_plan"] += not_planned
            progress.advance(not_planned, stats.counts)
        if skipped:
            if not self.dry_run and d.mirror:  # leavers are only needed for mirror removals
                self.state.seen(sid, skipped, self.run_id)
            with self._lock:
                stats.counts["skipped"] += len(skipped)
            progress.advance(len(skipped), stats.counts)
        return send

    def _finish_state(self, seg: Segment, sid: int, total: int, prev_members: int, stats: SegmentStats) -> None:
        d = self.destination
        if not self.dry_run:
            self.state.flush(sid)
        if d.mirror:
            leavers = self.state.leavers(sid, self.run_id)
            if self.dry_run:
                seen = self._dry_seen.pop(sid, set())
                leavers = [(m, k) for m, k in leavers if m not in seen]
            if self._plan is not None:
                planned = self._plan["remove"].get(seg.name, set())
                leavers = [(m, k) for m, k in leavers if m in planned]
            if leavers:
                share = len(leavers) / max(1, prev_members)
                if share > self.max_removal_share and not self.allow_large_changes:
                    raise ExportError(
                        f"Mirror: {len(leavers):,} of the {prev_members:,} members exported before left segment "
                        f"'{seg.name}' ({share:.0%}, more than the allowed {self.max_removal_share:.0%}). Nothing "
                        "was removed. If this is expected, run again with allow_large_changes=True (DAG param); "
                        "otherwise check the upstream segment model."
                    )
                if self.dry_run:
                    self.log.info("Dry run: would remove %s member(s) who left segment '%s'", f"{len(leavers):,}",
                                  seg.name)
                    stats.counts["planned_removals"] += len(leavers)
                    for m, _ in leavers:
                        self._plan_write("remove", seg.name, member=m)
                else:
                    removed = d.remove_members(seg, [k for _, k in leavers])
                    self.state.forget(sid, [m for m, _ in leavers])
                    stats.counts["removed"] += removed
        if not self.dry_run:
            self.state.set_last_count(sid, total, self.run_id)

    # -- plan, then apply -----------------------------------------------------------------------
    def _plan_write(self, action: str, segment: str, **fields: Any) -> None:
        """One line of the dry run's plan (member ids and row keys only; no profile, no email)."""
        if self.plan_out is None:
            return
        with self._lock:
            if self._plan_fh is None:
                self.plan_out.parent.mkdir(parents=True, exist_ok=True)
                self._plan_fh = self.plan_out.open("w", encoding="utf-8")
            # Buffered: a write through an ObjectStoragePath costs ~0.1 ms, a dry run writes a line per member.
            self._plan_lines.append(json.dumps({"action": action, "segment": segment, **fields}) + "\n")
            if len(self._plan_lines) >= 2000:
                self._plan_fh.write("".join(self._plan_lines))
                self._plan_lines.clear()
            self.plan_counts[action] += 1

    @staticmethod
    def _load_plan(path: Any) -> dict:
        send: dict[tuple[str, int], int] = {}
        remove: dict[str, set[int]] = {}
        try:
            fh = path.open("r", encoding="utf-8")
        except FileNotFoundError as exc:
            raise ExportError(f"The plan {path} does not exist; run a dry run first to write it.") from exc
        with fh:
            for line in fh:
                item = json.loads(line)
                if item["action"] in ("add", "update"):
                    send[(item["segment"], int(item["member"]))] = int(item["fp"])
                elif item["action"] == "remove":
                    remove.setdefault(item["segment"], set()).add(int(item["member"]))
        return {"send": send, "remove": remove}

    def _send_splitting(self, seg: Segment, records: list[Record]) -> BatchOutcome:
        try:
            outcome = self.destination.send(seg, records)
        except BatchRefused as exc:
            if len(records) == 1:
                return BatchOutcome({"rejected": 1}, [Outcome(records[0], "rejected", exc.message)])
            mid = len(records) // 2
            self.log.info("%s refused a batch of %d (%s); splitting to isolate the bad row(s)",
                          self.destination.name, len(records), exc.message)
            return self._send_splitting(seg, records[:mid]) + self._send_splitting(seg, records[mid:])
        if not isinstance(outcome, BatchOutcome):
            if len(outcome) != len(records):
                raise ExportError(f"{self.destination.name} adapter returned {len(outcome)} outcomes for "
                                  f"{len(records)} records")
            outcome = BatchOutcome.of(outcome)
        elif sum(outcome.counts.values()) != len(records):
            raise ExportError(f"{self.destination.name} adapter counted {sum(outcome.counts.values())} outcomes "
                              f"for {len(records)} records")
        return outcome

    def _reject_many(self, stats: SegmentStats, rejects: list[Reject]) -> None:
        if self.plan_out is not None:
            for reject in rejects:
                self._reject(stats, reject)
            return
        with self._lock:
            for reject in rejects:
                self.rejects.write(reject)
            stats.counts["rejected"] += len(rejects)

    def _reject(self, stats: SegmentStats, reject: Reject) -> None:
        with self._lock:
            self.rejects.write(reject)
            stats.counts["rejected"] += 1
        if self.plan_out is not None:
            action = "skip_consent" if reject.reason == "previously_refused" else "reject"
            self._plan_write(action, reject.segment, row=reject.row, key=reject.key, reason=reject.reason)

    def _not_sent(self, stats: SegmentStats, records: list[Record]) -> None:
        """Records never confirmed by the destination (the export stopped): counted, sent on the next run."""
        with self._lock:
            stats.counts["not_sent"] += len(records)

    # -- summary -----------------------------------------------------------------------------------
    def _summary(self, duration: float) -> dict:
        segs = {name: s.as_dict() | {"not_sent": s.counts.get("not_sent", 0),
                                     "not_in_plan": s.counts.get("not_in_plan", 0)}
                for name, s in self._stats.items()}
        totals: Counter = Counter()
        for s in segs.values():
            for k in (*OUTCOMES, "rows", "not_sent", "not_in_plan"):
                totals[k] += s[k]
        d = self.destination
        return {
            "destination": d.name,
            "target": d.target,
            "dry_run": self.dry_run,
            "segments": segs,
            "totals": {k: totals.get(k, 0) for k in ("rows", *OUTCOMES, "not_sent", "not_in_plan")},
            "rejects": {
                "count": self.rejects.count,
                "by_reason": dict(self.rejects.by_reason),
                "path": str(self.rejects.path) if self.rejects.count else None,
            },
            "duration_s": round(duration, 3),
            "rows_per_second": round(totals["rows"] / duration, 1) if duration > 0 else None,
            "http": d.http_stats(),
        } | ({"change_column": self._watermarks} if self._watermarks else {})
