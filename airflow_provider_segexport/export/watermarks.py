"""The change column: a delta run reads only the rows whose change column (e.g. ``updated_at``) is at least
the highest value the last complete export read (its *watermark*, kept in the export state per segment).

Every row is read instead in mirror mode (the leavers are the members not seen), with ``full_refresh``,
before a complete export recorded a watermark, after the change column was renamed, and when the
destination's settings that shape the payloads changed (the watermark's salt).
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable
from typing import Any

from airflow_provider_segexport.export.destination import ExportError
from airflow_provider_segexport.export.sources import decode_watermark, encode_watermark
from airflow_provider_segexport.export.state import ExportStateBackend, Watermark

log = logging.getLogger(__name__)

_not_none = functools.partial(operator.is_not, None)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


class ChangeColumn:
    """One export's use of the change column: where each segment reads from, and the next watermark.

    :param column: the change column's name.
    :param state: the export state (watermarks per segment).
    :param mirror: mirror mode (every row is read).
    :param full_refresh: every row is read and sent.
    :param dry_run: no watermark is advanced.
    :param confirms_later: the destination confirms after the run: the new watermarks are left pending in
        :attr:`report` for :func:`advance_pending`.
    :param run_id: the run recorded with a watermark.
    :param logger: where the choice is logged.
    """

    def __init__(self, column: str, state: ExportStateBackend, *, mirror: bool, full_refresh: bool, dry_run: bool,
                 confirms_later: bool, run_id: str, logger: logging.Logger | Any = None) -> None:
        self.column = column
        self.state = state
        self.mirror = mirror
        self.full_refresh = full_refresh
        self.dry_run = dry_run
        self.confirms_later = confirms_later
        self.run_id = run_id
        self.log = logger or log
        #: the destination's settings (fingerprint salt); set once the destination is checked
        self.salt = b""
        #: segment -> what the summary reports (column, since, high, advanced_to or pending)
        self.report: dict[str, dict] = {}

    def watermark_for(self, sid: int, members: int, check_salt: bool = True) -> tuple[Any, str | None]:
        """(the watermark to read from, None), or (None, why every row is read).

        :param sid: the segment's scope id.
        :param members: members the state holds for it.
        :param check_salt: compare the destination's settings too (known after the pre-flight).
        """
        wm = self.state.watermark(sid)
        why = None
        if self.mirror:
            why = "mirror mode finds the members who left by reading the whole segment"
        elif self.full_refresh:
            why = "full_refresh"
        elif not members or wm is None:
            why = "no complete export recorded a watermark yet"
        elif wm.column != self.column:
            why = f"the last export's change column was '{wm.column}'"
        elif check_salt and wm.salt != self.salt:
            why = "the destination's settings or the mapping changed since the last export: every member is due"
        return (None, why) if why is not None else (decode_watermark(wm.value), None)

    def since(self, segment: str, sid: int, members: int) -> Any:
        """The watermark the segment reads from (rows whose change column is >= it, or NULL), or None to read
        every row; logged and reported.

        :param segment: the segment's name.
        :param sid: its scope id.
        :param members: members the state holds for it.
        """
        report = self.report[segment] = {"column": self.column, "since": None}
        since, why = self.watermark_for(sid, members)
        if why is not None:
            self.log.info("Segment '%s': reading every row (%s).", segment, why)
            return None
        report["since"] = _text(since)
        self.log.info("Segment '%s': reading only the rows whose %s is >= %s (or NULL); the others are unchanged "
                      "since the last complete export.", segment, self.column, _text(since))
        return since

    def highest(self, high: Any, rows: list, change: Callable[[Any], Any]) -> Any:
        """The highest non-NULL change-column value so far, with a chunk of rows read.

        :param high: the highest so far (None: none).
        :param rows: a chunk of rows.
        :param change: the change column's getter on a row.
        """
        try:
            try:
                top = max(map(change, rows), default=None)
            except TypeError:  # a NULL among them (or values of different types): NULLs left out, in C
                top = max(filter(_not_none, map(change, rows)), default=None)
            return top if high is None or (top is not None and top > high) else high
        except TypeError as exc:
            raise ExportError(f"change_column '{self.column}' holds values of different types ({exc}); "
                              "use a timestamp, date or number column.") from exc

    def advance(self, segment: str, sid: int, since: Any, high: Any) -> None:
        """After a complete export of the segment: the next run reads from the highest change-column value this
        one read. The rows were read in one query (one snapshot of the database): a row changed after it gets a
        higher value (the column must only grow), so the next run reads it; a row at the watermark itself is
        read again and found unchanged.

        :param segment: the segment's name.
        :param sid: its scope id.
        :param since: the watermark it read from (None: every row).
        :param high: the highest value read (None: none).
        """
        if self.dry_run or self.mirror or high is None:
            return
        self.report[segment]["high"] = _text(high)
        try:
            if since is not None and not high > since:  # nothing newer: the watermark stays
                return
        except TypeError:  # the column's type changed since: the new values decide
            pass
        wm = Watermark(self.column, encode_watermark(high), self.salt)
        if self.confirms_later:  # advanced once the destination confirms the work
            self.report[segment]["pending"] = {"scope_id": sid, **wm.as_dict()}
        else:
            self.state.set_watermark(sid, wm, self.run_id)
            self.report[segment]["advanced_to"] = _text(high)


def advance_pending(state: ExportStateBackend, report: dict[str, dict], incomplete: set[str], run_id: str,
                    logger: logging.Logger | Any = None) -> None:
    """Once a destination that confirms later processed the work: the watermarks the export left pending in
    its summary's ``change_column`` report are advanced for the segments whose every unit of work was
    processed (for the others the next run reads the same rows again and sends what is still due).

    :param state: the export state.
    :param report: the summary's ``change_column`` report (``pending`` is taken out of it).
    :param incomplete: segments with work the vendor did not process.
    :param run_id: the run recorded with the watermark.
    :param logger: where a watermark left behind is logged.
    """
    for segment, info in report.items():
        pending = info.pop("pending", None)
        if pending is None:
            continue
        if segment in incomplete:
            (logger or log).warning("Segment '%s': some operations failed; the change-column watermark stays where "
                                    "it was, so the next run reads those rows again.", segment)
            continue
        state.set_watermark(int(pending["scope_id"]), Watermark.from_dict(pending), run_id)
        info["advanced_to"] = info.get("high")
