"""The checks that stop an export before it does damage: the destination's limits, and the two circuit
breakers against a broken upstream segment model (a segment that grew or shrank too much, a mirror run
that would remove too many members). Each raises :class:`ExportError` saying what it found and the fix.

The limits and the size breaker need only the segments' row counts; the removal breaker compares them
with the members the export state holds. The engine applies all of them once the counts are known and
before the first batch is sent, and the removal breaker again at a segment's end on the actual leavers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow_provider_segexport.export.destination import ExportError, ExportLimitExceeded

_OVERRIDE = ("If this is expected, run again with allow_large_changes=True (DAG param); otherwise check the "
             "upstream segment model.")


def check_limits(destination: Any, totals: Mapping[str, int]) -> None:
    """The destination's per-segment and per-export maximums (``max_per_segment``, ``max_per_export``)."""
    d = destination
    for name, count in totals.items():
        if d.max_per_segment is not None and count > d.max_per_segment:
            raise ExportLimitExceeded(
                f"Segment '{name}' has {count:,} members; {d.name} accepts at most {d.max_per_segment:,} per "
                "segment. Nothing was sent. Split the segment (e.g. by a column range) into several segments or "
                "exports.")
    total = sum(totals.values())
    if d.max_per_export is not None and total > d.max_per_export:
        raise ExportLimitExceeded(
            f"This export has {total:,} profiles ({', '.join(f'{k}: {v:,}' for k, v in totals.items())}); "
            f"{d.name} accepts at most {d.max_per_export:,} per export. Nothing was sent. Export fewer or smaller "
            "segments per task (e.g. one task per segment).")


def check_size_change(segment: str, now: int, last: int | None, max_change: float, destination: Any) -> None:
    """Stop when the segment's row count is ``max_change`` times its last export's or more, or that many
    times smaller (``max_change`` 2: 100 -> 200 and 100 -> 50 both stop; 0 or None: no check)."""
    if not last or not max_change:
        return
    ratio = max(now, 1) / last if now >= last else last / max(now, 1)
    if ratio >= max_change:
        raise ExportError(
            f"Segment '{segment}' has {now:,} members; the last export to {destination.name} "
            f"'{destination.target}' had {last:,} ({ratio:.1f}x {'growth' if now > last else 'shrinkage'}; a change "
            f"by a factor of max_size_change={max_change:g} or more stops the export). Nothing was sent. "
            + _OVERRIDE)


def check_removals(segment: str, now: int, members: int, max_share: float) -> None:
    """Mirror mode, before the first send: a segment of ``now`` rows whose export state holds ``members``
    loses at least ``members - now`` of them; stop when that is more than ``max_share`` of ``members``."""
    gone = members - now
    if members and gone > 0 and gone / members > max_share:
        raise ExportError(
            f"Mirror: segment '{segment}' has {now:,} rows and the export state holds {members:,} members exported "
            f"before, so at least {gone:,} ({gone / members:.0%}) would be removed, more than "
            f"max_removal_share={max_share:.0%}. Nothing was sent. " + _OVERRIDE)


def check_leavers(segment: str, leavers: int, members: int, max_share: float) -> None:
    """Mirror mode, at the segment's end: the members that left (not seen by this run), before any is
    removed (a segment can keep its size while members are replaced)."""
    share = leavers / max(1, members)
    if leavers and share > max_share:
        raise ExportError(
            f"Mirror: {leavers:,} of the {members:,} members exported before left segment '{segment}' ({share:.0%}, "
            f"more than max_removal_share={max_share:.0%}). Nothing was removed. " + _OVERRIDE)
