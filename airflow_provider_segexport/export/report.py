"""What users see: progress lines at a steady pace, the rejects file, the summary table and the XCom
summary. Nothing here logs a profile: rejects carry the row number, the key and the reason."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from typing import Any

from airflow_provider_segexport.export.records import Reject

OUTCOMES = ("created", "updated", "unchanged", "skipped", "removed", "rejected", "planned")


class RejectsWriter:
    """Appends rejects as JSON Lines to an ``ObjectStoragePath`` (opened on the first reject).

    Lines are written in blocks of ``buffer_lines`` (object storage writes are costly per call) and on
    :meth:`close`.
    """

    buffer_lines = 500

    def __init__(self, path: Any, append: bool = False) -> None:
        self.path = path
        self.append = append
        self.count = 0
        self.by_reason: Counter = Counter()
        self._fh = None
        self._buffer: list[str] = []
        self._lock = threading.Lock()

    def write(self, reject: Reject) -> None:
        line = json.dumps(reject.as_json(), ensure_ascii=False) + "\n"
        with self._lock:
            self._buffer.append(line)
            self.count += 1
            self.by_reason[reject.reason] += 1
            if len(self._buffer) >= self.buffer_lines:
                self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a" if self.append and self.path.exists() else "w", encoding="utf-8")
        self._fh.write("".join(self._buffer))
        self._fh.flush()
        self._buffer = []

    def close(self) -> None:
        with self._lock:
            self._flush()
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class SegmentStats:
    def __init__(self, name: str, total: int) -> None:
        self.name = name
        self.total = total
        self.read = 0
        self.counts: Counter = Counter()
        self.started = time.monotonic()
        self.duration = 0.0

    def as_dict(self) -> dict:
        return {"rows": self.read, "total": self.total, **{k: self.counts.get(k, 0) for k in OUTCOMES},
                "duration_s": round(self.duration, 3)}


class Progress:
    """Logs count, percent, rate and ETA at most every ``interval`` seconds (thread-safe)."""

    def __init__(self, log: logging.Logger | Any, label: str, total: int, interval: float = 10.0) -> None:
        self.log = log
        self.label = label
        self.total = total
        self.interval = interval
        self.done = 0
        self.started = time.monotonic()
        self._last = self.started
        self._lock = threading.Lock()

    def advance(self, n: int, counts: Counter | None = None) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last < self.interval:
                return
            self._last = now
        self.emit(counts)

    def emit(self, counts: Counter | None = None) -> None:
        elapsed = max(1e-6, time.monotonic() - self.started)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 and self.total > self.done else 0.0
        detail = ""
        if counts:
            detail = " (" + ", ".join(f"{k}={counts[k]:,}" for k in OUTCOMES if counts.get(k)) + ")"
        if self.total < self.done:  # still being counted (e.g. a Dataverse table's count), no estimate yet
            self.log.info("%s: %s rows confirmed (the total is being counted), %s rows/s%s", self.label,
                          f"{self.done:,}", f"{rate:,.0f}", detail)
            return
        self.log.info("%s: %s/%s rows confirmed (%.1f%%), %s rows/s, ETA %s%s", self.label, f"{self.done:,}",
                      f"{self.total:,}", pct, f"{rate:,.0f}", _fmt_duration(eta), detail)


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def summary_table(summary: dict) -> str:
    """A plain-text table of the summary for the task log."""
    head = ("segment", "rows", "created", "updated", "unchanged", "skipped", "removed", "rejected", "not_sent",
            "planned", "seconds")
    rows = []
    for name, s in summary["segments"].items():
        rows.append((name, s["rows"], s["created"], s["updated"], s["unchanged"], s["skipped"], s["removed"],
                     s["rejected"], s.get("not_sent", 0), s["planned"], s["duration_s"]))
    t = summary["totals"]
    rows.append(("TOTAL", t["rows"], t["created"], t["updated"], t["unchanged"], t["skipped"], t["removed"],
                 t["rejected"], t.get("not_sent", 0), t["planned"], summary["duration_s"]))
    cells = [[f"{v:,}" if isinstance(v, int) else str(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    line = "-+-".join("-" * w for w in widths)
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), line]
    for i, c in enumerate(cells):
        if i == len(cells) - 1:
            out.append(line)
        out.append(" | ".join((v.ljust(w) if j == 0 else v.rjust(w)) for j, (v, w) in
                              enumerate(zip(c, widths, strict=True))))
    return "\n".join(out)


def default_rejects_path(dag_id: str | None, run_id: str | None, task_id: str | None, try_number: Any = None):
    """``$AIRFLOW_HOME/segexport/rejects/<dag>/<run>/<task>[-try<n>].jsonl`` as an ObjectStoragePath."""
    from airflow.sdk import ObjectStoragePath

    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    safe = [_safe(x or "manual") for x in (dag_id, run_id, task_id)]
    name = safe[2] + (f"-try{try_number}" if try_number else "") + ".jsonl"
    return ObjectStoragePath(f"file://{home}/segexport/rejects/{safe[0]}/{safe[1]}/{name}")


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))[:200]
