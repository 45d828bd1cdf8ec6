"""The export run: one destination, one or more segments.

stream rows in chunks -> map + validate + dedupe -> (delta: drop members unchanged since the destination
confirmed them) -> destination.prepare_many -> batch to the destination's size -> the sender (bounded in
flight, split on refusal) -> per-row outcomes -> export state, rejects, summary.

The run orchestrates parts that each read alone: the destination contract (:mod:`.destination`), the
sender (:mod:`.sender`), the limits and circuit breakers (:mod:`.breakers`), the change column
(:mod:`.watermarks`), plans (:mod:`.plan`), the export state (:mod:`.state`) and the report
(:mod:`.report`). :func:`apply_outcomes` applies the outcomes a destination that confirms later (deferrable
mode) reads once the vendor processed the work.
"""

from __future__ import annotations

import gc
import logging
import operator
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

from airflow_provider_segexport.export.breakers import (
    check_leavers,
    check_limits,
    check_removals,
    check_size_change,
)
from airflow_provider_segexport.export.destination import (
    BatchOutcome,
    BatchRefused,
    Destination,
    EmailDestination,
    ExportError,
    ExportLimitExceeded,
    Outcome,
)
from airflow_provider_segexport.export.plan import Plan, PlanWriter
from airflow_provider_segexport.export.records import Deduper, Record, Reject, RowValidator, member_id, row_of
from airflow_provider_segexport.export.report import (
    OUTCOMES,
    Progress,
    RejectsWriter,
    SegmentStats,
    summary_table,
)
from airflow_provider_segexport.export.sender import BatchSender
from airflow_provider_segexport.export.sources import Prefetch, Segment
from airflow_provider_segexport.export.state import ExportStateBackend
from airflow_provider_segexport.export.watermarks import ChangeColumn, _text, advance_pending

__all__ = ["BatchOutcome", "BatchRefused", "Destination", "EmailDestination", "ExportEngine", "ExportError",
           "ExportLimitExceeded", "ExportOptions", "Outcome", "apply_outcomes"]

log = logging.getLogger(__name__)

#: the fingerprint journaled for a member sent to a destination that confirms later, until it confirms: it
#: matches no payload, so a run before the confirmation sends the member again
UNCONFIRMED_FP = 0

#: the delta step's snapshot of a segment whose export state was empty when the run began
_NOTHING_KNOWN = object()


@dataclass(frozen=True)
class ExportOptions:
    """How an export runs (the operator's parameters, resolved).

    :param dry_run: do everything but send (validation, counts, rejects file, plan).
    :param run_id: the run recorded in the export state (a retried task resumes its own run).
    :param full_refresh: send every member, whatever the export state says (a retried run still resumes).
    :param max_rejects_share: fail when more than this share of rows is rejected.
    :param max_removal_share: mirror mode stops before removing more than this share of the members exported
        before.
    :param max_size_change: stop when a segment grew or shrank by this factor or more since its last export.
    :param allow_large_changes: let the run through the two circuit breakers above.
    :param change_column: read only rows changed since the last complete export (needs export state).
    :param plan_out: a dry run writes its plan here (needs export state).
    :param plan_in: send and remove exactly what this plan lists (needs export state).
    :param progress_interval: seconds between progress lines.
    """

    dry_run: bool = False
    run_id: str = "manual"
    full_refresh: bool = False
    max_rejects_share: float | None = None
    max_removal_share: float = 0.2
    max_size_change: float = 2.0
    allow_large_changes: bool = False
    change_column: str | None = None
    plan_out: Any = None
    plan_in: Any = None
    progress_interval: float = 10.0


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


class _SegmentRun:
    """What the sender's callbacks need of the segment a batch belongs to."""

    __slots__ = ("progress", "segment", "sid", "stats")

    def __init__(self, segment: Segment, sid: int | None, stats: SegmentStats, progress: Progress) -> None:
        self.segment, self.sid, self.stats, self.progress = segment, sid, stats, progress


class ExportEngine:
    """Export segments to one destination.

    :param destination: the vendor adapter.
    :param segments: the segments, exported in this order.
    :param rejects_path: where the rejects file goes (an ``ObjectStoragePath``).
    :param state: the export state (None: none kept; mirror mode, change column and plans need it).
    :param options: how the export runs.
    :param logger: the task's logger.
    """

    def __init__(self, destination: Destination, segments: Iterable[Segment], *, rejects_path: Any,
                 state: ExportStateBackend | None = None, options: ExportOptions | None = None,
                 logger: logging.Logger | Any = None) -> None:
        o = self.options = options or ExportOptions()
        self.destination = destination
        self.segments = list(segments)
        self.state = state
        self.dry_run = o.dry_run
        self.run_id = o.run_id
        self.log = logger or log
        self.rejects = RejectsWriter(rejects_path)
        if state is None and (destination.mirror or o.plan_out is not None or o.plan_in is not None):
            raise ExportError("Mirror mode and plans need export state: the members exported before are found "
                              "there (pass a state backend).")
        self._lock = threading.Lock()
        self._sender: BatchSender | None = None
        self._stats: dict[str, SegmentStats] = {}
        self._deduper: Deduper | None = Deduper()
        self._scope_ids: dict[str, int] = {}
        self._snapshots: dict[int, Any] = {}
        self._fp_salt = b""  # set by run() from the destination's fingerprint_config()
        self._totals: dict[str, int] | None = None  # row counts per segment, once counted (see _counts)
        self._estimates: dict[str, int] = {}
        self._members_before: dict[int, int] = {}  # scope id -> members with state before this run
        self._prefetch: tuple | None = None  # (segment, since, columns, Prefetch) for the first segment
        self.changes = ChangeColumn(o.change_column, state, mirror=destination.mirror, full_refresh=o.full_refresh,
                                    dry_run=o.dry_run, confirms_later=destination.confirms_later, run_id=o.run_id,
                                    logger=self.log) if o.change_column and state is not None else None
        self.plan_out = PlanWriter(o.plan_out) if o.plan_out is not None and o.dry_run else None
        self._plan_updates: set[tuple[str, int]] = set()  # a dry run's members known to the state (plan "update")
        self._plan = Plan.load(o.plan_in) if o.plan_in is not None and not o.dry_run else None
        self._dry_seen: dict[int, set[int]] = {}

    @property
    def _failure(self) -> BaseException | None:
        return self._sender.failure if self._sender is not None else None

    # -- pre-flight ------------------------------------------------------------------------------
    def _preflight(self) -> None:
        d, column = self.destination, self.options.change_column
        if not self.segments:
            raise ExportError("No segments to export.")
        names = [s.name for s in self.segments]
        if len(set(names)) != len(names):
            raise ExportError(f"Segment names must be unique in one export; got {names}.")
        for seg in self.segments:
            columns = seg.source.columns()
            d.mapping.check_columns(columns, f"Segment '{seg.name}' ({seg.source.description})")
            if column and column not in columns:
                raise ExportError(
                    f"change_column '{column}' is not a column of segment '{seg.name}' ({seg.source.description}); "
                    f"its columns: {', '.join(columns)}. Name the column that changes whenever a row changes (e.g. "
                    "updated_at), or leave change_column unset.")
        if self.state is not None:
            for seg in self.segments:
                self._scope_ids[seg.name] = self.state.scope_id(seg.name)
            if d.remembers_targets:
                d.recall_targets({seg.name: self.state.target(self._scope_ids[seg.name]) for seg in self.segments})
        # While the destination is checked, the segments are counted (one query each, in the database) and the
        # first segment's rows start streaming in; on a repeat export the counts are awaited only before the
        # first send.
        counter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segexport-count")
        self._counting = counter.submit(lambda: {seg.name: seg.source.count() for seg in self.segments})
        try:
            self._start_prefetch()
            d.preflight(self.segments, self.dry_run)
        except BaseException:
            self._counts()  # a source error or a limit is the first thing to fix: reported before the destination's
            raise
        finally:
            counter.shutdown(wait=False)

    def _counts(self) -> dict[str, int]:
        """The segments' row counts. The first call waits for the count queries and applies the limits and the
        circuit breakers (:mod:`.breakers`): it is made before anything is sent."""
        if self._totals is not None:
            return self._totals
        d, o = self.destination, self.options
        totals = self._counting.result()
        check_limits(d, totals)
        if self.state is not None and not o.allow_large_changes:
            for seg in self.segments:
                sid, now = self._scope_ids[seg.name], totals[seg.name]
                check_size_change(seg.name, now, self.state.last_count(sid), o.max_size_change, d)
                if d.mirror:
                    check_removals(seg.name, now, self._member_count(sid), o.max_removal_share)
        self._totals = totals
        total = sum(totals.values())
        if self._deduper is not None:
            self._deduper.reserve(total)
        self.log.info("Counted %s rows in all (%s)", f"{total:,}", ", ".join(f"{k}: {v:,}" for k, v in totals.items()))
        return totals

    def _counts_gate_sending(self) -> bool:
        """Whether the first send waits for the counts: when a limit or a circuit breaker reads them, or when the
        sources count cheaply (a SQL ``COUNT(*)``: the dedupe tables are then sized once, before they grow). A
        source whose count is a read of its own (a Dataverse table: every key paged through, ``counts_cheaply``
        False) sent without limits or breakers starts sending at once; its count is awaited when the segment
        ends (the summary's skipped rows)."""
        d, o = self.destination, self.options
        breakers = self.state is not None and not o.allow_large_changes and (bool(o.max_size_change) or d.mirror)
        return (d.max_per_export is not None or d.max_per_segment is not None or breakers
                or all(getattr(s.source, "counts_cheaply", True) for s in self.segments))

    def _size_text(self, rows: int, where: str = "") -> str:
        """How many rows, as known now: counted, estimated from the last export while counting, or not yet."""
        if self._totals is not None:
            return f"{rows:,} rows{where}"
        return f"about {rows:,} rows{where} (counting)" if rows else "rows being counted"

    # -- run ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Export every segment; return the summary (also logged). Raises :class:`ExportError` when the export
        stopped (the summary's counts are in the message) or rejected more than ``max_rejects_share``."""
        started = time.monotonic()
        d = self.destination
        mode = "DRY RUN: nothing will be sent" if self.dry_run else f"to {d.name} '{d.target}'"
        self.log.info("::group::Pre-flight checks")
        try:
            self._preflight()
            self._fp_salt = blake2b(d.fingerprint_config(), digest_size=16).digest()
            self._fp_hasher = blake2b(digest_size=8, salt=self._fp_salt)
            if self.changes is not None:
                self.changes.salt = self._fp_salt
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
        send = self._plan_only if self.dry_run else self._send
        try:
            with _tuned_for_export(), BatchSender(send, self._on_result, self._on_not_sent,
                                                  max_in_flight=d.max_in_flight, name=d.name,
                                                  logger=self.log) as self._sender:
                for seg in self.segments:
                    if self._failure is not None:  # segments never started: every row is not sent
                        total = self._counts()[seg.name]
                        stats = self._stats[seg.name] = SegmentStats(seg.name, total)
                        stats.read = total
                        stats.counts["not_sent"] = total
                        continue
                    self._run_segment(seg)
        finally:
            self._stop_prefetch()
            self.rejects.close()
            if self.plan_out is not None:
                self.plan_out.close()
        summary = self._summary(time.monotonic() - started)
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
        share = self.options.max_rejects_share
        rows = summary["totals"]["rows"]
        if share is not None and rows and summary["totals"]["rejected"] / rows > share:
            raise ExportError(
                f"{summary['totals']['rejected']:,} of {rows:,} rows were rejected, more than the allowed "
                f"{share:.0%}; see {summary['rejects']['path']}."
            )
        return summary

    def _run_segment(self, seg: Segment) -> None:
        d, sender = self.destination, self._sender
        total = (self._totals or self._estimates)[seg.name]  # the count, or until it is known the last one
        stats = self._stats[seg.name] = SegmentStats(seg.name, total)
        progress = Progress(self.log, f"{d.name} segment '{seg.name}'", total, self.options.progress_interval)
        sid = self._scope_ids.get(seg.name)
        ctx = _SegmentRun(seg, sid, stats, progress)
        validate = RowValidator(d.mapping, seg.name, self._deduper, self.segments.index(seg),
                                fingerprint=self._fp_hasher if sid is not None else None)
        batch: list[Record] = []
        prev_members = self._member_count(sid) if sid is not None else 0
        source = seg.source
        since = self.changes.since(seg.name, sid, prev_members) if self.changes is not None else None
        if since is not None:  # only the rows changed since the last complete export are read
            source = seg.source.changed_since(self.changes.column, since)
        elif sid is not None and prev_members:
            try:  # the segment's state in memory for the delta lookups (17 bytes a member)
                self._snapshots[sid] = self.state.snapshot(sid, self.run_id)
            except NotImplementedError:  # a backend that only answers lookups
                pass
        elif sid is not None:  # nothing in the state: no lookups (this run's own confirmations are not looked up)
            self._snapshots[sid] = _NOTHING_KNOWN

        def submit(records: list[Record]) -> None:
            if self._totals is None and self._counts_gate_sending():
                stats.total = progress.total = self._counts()[seg.name]  # the limits, before the first send
            sender.submit(ctx, records)

        self.log.info("::group::Segment '%s' -> %s '%s': %s", seg.name, d.name, d.target, self._size_text(total))
        prepare, encode = d.converts_records, d.encode
        size = d.batch_size
        row_number = 0
        columns, high, change = self._read_columns(), None, None
        if self.changes is not None:  # its highest value read: the next run's watermark
            change = operator.itemgetter(columns.index(self.changes.column))
        chunks = self._prefetched(seg, since, columns) or source.chunks(columns)
        # Chunk by chunk: validate, drop what the export state says is unchanged (delta), let the
        # destination convert the rest, then cut it into batches of the destination's size.
        try:
            for rows in chunks:
                if change is not None:
                    high = self.changes.highest(high, rows, change)
                records, rejects = validate.many(rows, row_number + 1)
                row_number += len(rows)
                if sid is not None and records:  # unchanged since the last confirmed export: not converted at all
                    records = self._delta(ctx, records)
                    if d.assigns_keys and records and prev_members:  # the key the vendor assigned last time
                        stored = self.state.keys(sid, [r.member for r in records])
                        if stored:
                            for r in records:
                                r.dest_key = stored.get(r.member)
                if prepare and records:
                    if self._totals is None and d.max_per_segment is not None:
                        # a destination with a per-segment limit may look members up at the vendor while it
                        # converts them: the limits come first
                        stats.total = progress.total = self._counts()[seg.name]
                    records, refused = d.prepare_many(records)
                    if refused:
                        rejects = sorted(rejects + refused, key=row_of) if rejects else refused
                if rejects:
                    self._reject_many(stats, rejects)
                    progress.advance(len(rejects), stats.counts)
                if sid is not None and records and not d.encodes_bodies:  # sent as encoded here
                    if prepare:
                        for r in records:
                            r.body = encode(r)
                    else:
                        for r in records:  # a payload not converted is sent as the validator encoded it
                            r.body = r.payload_json if r.payload_json is not None else encode(r)
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
            submit(batch[:size])
            batch = batch[size:]
        if batch:  # read and valid, but the export stopped before they were batched
            self._on_not_sent(ctx, batch)
        sender.wait()
        if self._failure is None and sid is not None:
            if d.remembers_targets and not self.dry_run and (target := d.target_of(seg)) is not None:
                self.state.set_target(sid, target, self.run_id)
            self._finish_state(seg, sid, total, prev_members, stats)
            if self.changes is not None:
                self.changes.advance(seg.name, sid, since, high)
        self._snapshots.pop(sid, None)
        stats.duration = time.monotonic() - stats.started
        progress.emit(stats.counts)
        self.log.info("::endgroup::")

    # -- the sender's calls and callbacks ------------------------------------------------------------
    def _send(self, ctx: _SegmentRun, records: list[Record]) -> list[Outcome] | BatchOutcome:
        return self.destination.send(ctx.segment, records)

    def _plan_only(self, ctx: _SegmentRun, records: list[Record]) -> BatchOutcome:
        """A dry run's "send": the plan lists each member that would be sent (after the destination converted
        it: a member it rejects is a ``reject`` line, not an ``add``)."""
        plan_out, updates = self.plan_out, self._plan_updates
        if plan_out is not None:
            for r in records:
                plan_out.write("update" if (r.segment, r.member) in updates else "add", r.segment, row=r.row,
                               key=r.key, member=r.member, fp=r.fp)
        return BatchOutcome({"planned": len(records)})

    def _on_result(self, ctx: _SegmentRun, records: list[Record], outcome: BatchOutcome) -> None:
        d, stats = self.destination, ctx.stats
        refused = [o for o in outcome.exceptions if o.status == "rejected"]
        with self._lock:
            for o in refused:
                r = o.record
                self.rejects.write(Reject(ctx.segment.name, r.row, r.key, o.reason, None,
                                          f"{d.name} refused the member", o.message))
            stats.counts.update(outcome.counts)
        sid = ctx.sid
        if sid is not None and not self.dry_run:
            # Only what the destination confirmed is remembered; a rejected member is retried next run. A member
            # a destination that confirms later has queued is journaled as unconfirmed (sent again by any run
            # before the confirmation) with its key, so that a mirror run can remove it.
            confirmed = outcome.confirmed(records)
            if confirmed:
                self._journal(sid, confirmed)
            if d.confirms_later:
                queued = [o.record for o in outcome.exceptions if o.status == "planned"]
                if queued:
                    self._journal(sid, queued, [UNCONFIRMED_FP] * len(queued))
            if refused:
                self.state.forget(sid, [o.record.member for o in refused])
        ctx.progress.advance(len(records), stats.counts)

    def _on_not_sent(self, ctx: _SegmentRun, records: list[Record]) -> None:
        """Records never confirmed by the destination (the export stopped): counted, sent on the next run."""
        with self._lock:
            ctx.stats.counts["not_sent"] += len(records)

    def _journal(self, sid: int, records: list[Record], fps: list[int] | None = None) -> None:
        d = self.destination
        if d.assigns_keys:
            keys = [r.dest_key for r in records]
            if None in keys:
                raise ExportError(f"The {d.name} adapter confirmed a member without the key it assigned "
                                  "(Record.dest_key); its assigns_keys declaration is wrong.")
        elif d.has_member_key:
            keys = list(map(d.member_key, records))
        else:
            keys = [r.email or r.key for r in records]  # Destination.member_key, inlined
        self.state.confirm_columns(sid, [r.member for r in records], [r.fp for r in records] if fps is None else fps,
                                   keys, self.run_id)

    # -- delta and mirror ----------------------------------------------------------------------------
    def _member_count(self, sid: int) -> int:
        if sid not in self._members_before:
            self._members_before[sid] = self.state.member_count(sid)
        return self._members_before[sid]

    def _delta(self, ctx: _SegmentRun, records: list[Record]) -> list[Record]:
        """Drop members whose values (and the destination's settings) are the same as when the destination
        confirmed them; return those to send, fingerprinted."""
        d, sid, stats, progress = self.destination, ctx.sid, ctx.stats, ctx.progress
        if d.has_member_key:
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
        plan, plan_out, full_refresh = self._plan, self.plan_out, self.options.full_refresh
        send: list[Record] = []
        skipped: list[int] = []
        not_planned = 0
        compare = records
        if not known and plan is None and plan_out is None:  # none known (a first run): all due
            send, compare = list(records), ()
        for r in compare:
            k = known.get(r.member)
            # Unchanged since the last confirmed export: skip. With full_refresh, skip only what this very
            # run already confirmed (a retried task resumes instead of resending).
            if k is not None and k[0] == r.fp and (not full_refresh or k[1] == self.run_id):
                skipped.append(r.member)
            elif plan is not None and plan.send.get((r.segment, r.member)) != r.fp:
                not_planned += 1  # applying a plan: exactly what it lists, nothing more
            else:
                send.append(r)
                if plan_out is not None and k is not None:  # the plan's line is written once it is batched
                    self._plan_updates.add((r.segment, r.member))
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
                planned = self._plan.remove.get(seg.name, set())
                leavers = [(m, k) for m, k in leavers if m in planned]
            if leavers:
                if not self.options.allow_large_changes:
                    check_leavers(seg.name, len(leavers), prev_members, self.options.max_removal_share)
                if self.dry_run:
                    self.log.info("Dry run: would remove %s member(s) who left segment '%s'", f"{len(leavers):,}",
                                  seg.name)
                    stats.counts["planned_removals"] += len(leavers)
                    if self.plan_out is not None:
                        for m, _ in leavers:
                            self.plan_out.write("remove", seg.name, member=m)
                else:
                    removed = d.remove_members(seg, [k for _, k in leavers])
                    self.state.forget(sid, [m for m, _ in leavers])
                    stats.counts["removed"] += removed
        if not self.dry_run:
            self.state.set_last_count(sid, total, self.run_id)

    # -- change column: the first segment's changed rows read ahead ------------------------------------
    def _read_columns(self) -> list[str]:
        """What is read: the mapped columns (the validator's), and the change column (its highest value is the
        next run's watermark)."""
        columns = self.destination.mapping.source_columns
        if self.changes is not None and self.changes.column not in columns:
            columns = [*columns, self.changes.column]
        return columns

    def _start_prefetch(self) -> None:
        """With a watermark, the first segment's changed rows are queried while the destination is checked and the
        segments counted: the query scans the whole segment in the database and returns few rows. (A full read
        is not prefetched: its first rows come at once, and a reading thread would contend with the reader.)"""
        seg = self.segments[0]
        sid = self._scope_ids.get(seg.name)
        if self.changes is None or sid is None:
            return
        # optimistic: the destination's settings (the salt) are checked after the pre-flight
        since, _ = self.changes.watermark_for(sid, self._member_count(sid), check_salt=False)
        if since is None:
            return
        source = seg.source.changed_since(self.changes.column, since)
        columns = self._read_columns()
        self._prefetch = (seg.name, _text(since), columns, Prefetch(source, columns))

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

    # -- rejects and summary ---------------------------------------------------------------------------
    def _reject_many(self, stats: SegmentStats, rejects: list[Reject]) -> None:
        with self._lock:
            for reject in rejects:
                self.rejects.write(reject)
            stats.counts["rejected"] += len(rejects)
        if self.plan_out is not None:
            for reject in rejects:
                action = "skip_consent" if reject.reason == "previously_refused" else "reject"
                self.plan_out.write(action, reject.segment, row=reject.row, key=reject.key, reason=reject.reason)

    def _summary(self, duration: float) -> dict:
        segs = {name: s.as_dict() | {"not_sent": s.counts.get("not_sent", 0),
                                     "not_in_plan": s.counts.get("not_in_plan", 0)}
                for name, s in self._stats.items()}
        totals: Counter = Counter()
        for s in segs.values():
            for k in (*OUTCOMES, "rows", "not_sent", "not_in_plan"):
                totals[k] += s[k]
        d = self.destination
        summary = {
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
        }
        if self.changes is not None and self.changes.report:
            summary["change_column"] = self.changes.report
        if self.plan_out is not None:
            counts = self.plan_out.counts
            summary["plan"] = {"path": str(self.plan_out.path), "counts": dict(counts)}
            self.log.info("Plan written to %s: %s. Apply exactly this plan with apply_plan=%r.", self.plan_out.path,
                          ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())) or "nothing to do",
                          str(self.plan_out.path))
        elif self._plan is not None:
            summary["plan"] = {"applied": str(self.options.plan_in)}
        return summary


#: outcomes confirmed to the export state per statement when deferred results are applied
_APPLY_CHUNK = 50_000


def apply_outcomes(summary: dict, results: Iterable[tuple[list[Outcome], bool]], *, destination: Destination,
                   state: ExportStateBackend | None, rejects_path: Any, run_id: str,
                   logger: logging.Logger | Any = None) -> dict:
    """Apply the outcomes a destination that confirms later read once the vendor processed the work (what
    :meth:`Destination.deferred_outcomes` yields): export state, rejects file and the run's summary, as the
    engine applies a batch's outcome; then the change-column watermarks left pending. Needs no source: each
    outcome's record holds its segment, row, key, member id and fingerprint.

    :param summary: the summary :meth:`ExportEngine.run` returned (its ``planned`` counts become outcomes).
    :param results: (outcomes, processed) per unit of work; ``processed`` False: the vendor did not process it.
    :param destination: the destination (its name in the rejects).
    :param state: the export state the run used (None: none kept).
    :param rejects_path: the run's rejects file (appended to).
    :param run_id: the run recorded in the export state.
    :param logger: the task's logger.
    :returns: the summary, updated.
    """
    writer = RejectsWriter(rejects_path, append=True)
    prior = writer.count = summary["rejects"]["count"]
    counts: dict[str, Counter] = defaultdict(Counter)
    incomplete: set[str] = set()
    sids = {seg: state.scope_id(seg) for seg in summary["segments"]} if state is not None else {}
    confirmed: dict[str, list[Record]] = defaultdict(list)
    refused: dict[str, list[int]] = defaultdict(list)

    def write_state() -> None:
        for seg, records in confirmed.items():
            members = [r.member for r in records]
            known = state.keys(sids[seg], members)
            state.confirm_columns(sids[seg], members, [r.fp for r in records], [known[m] for m in members], run_id)
        for seg, members in refused.items():
            state.forget(sids[seg], members)
        confirmed.clear()
        refused.clear()

    pending = 0
    for outcomes, processed in results:
        for o in outcomes:
            r = o.record
            counts[r.segment][o.status] += 1
            if o.status == "rejected":
                writer.write(Reject(r.segment, r.row, r.key, o.reason, None, f"{destination.name} refused the member",
                                    o.message))
                if state is not None:
                    refused[r.segment].append(r.member)
            elif state is not None:
                confirmed[r.segment].append(r)
            if not processed:
                incomplete.add(r.segment)
        pending += len(outcomes)
        if state is not None and pending >= _APPLY_CHUNK:
            write_state()
            pending = 0
    writer.close()
    if state is not None:
        write_state()
        for sid in sids.values():
            state.flush(sid)
        advance_pending(state, summary.get("change_column") or {}, incomplete, run_id, logger)
    totals = summary["totals"]
    for seg, c in counts.items():
        s = summary["segments"][seg]
        done = sum(c.values())
        s["planned"] -= done
        totals["planned"] -= done
        for k, v in c.items():
            s[k] = s.get(k, 0) + v
            totals[k] = totals.get(k, 0) + v
    rejects = summary["rejects"]
    for reason, n in writer.by_reason.items():
        rejects["by_reason"][reason] = rejects["by_reason"].get(reason, 0) + n
    rejects["count"] = writer.count
    if writer.count > prior:
        rejects["path"] = str(rejects_path)
    return summary
