"""The engine with an in-process destination: batching, bounded concurrency, splitting, limits, dry run,
and SQL/file sources (streaming, bounded memory)."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
import tracemalloc

import pytest

from airflow_provider_segexport.export.engine import (
    BatchRefused,
    Destination,
    ExportEngine,
    ExportError,
    ExportLimitExceeded,
    ExportOptions,
    Outcome,
)
from airflow_provider_segexport.export.records import FieldMapping
from airflow_provider_segexport.export.sources import (
    FileSource,
    Segment,
    Source,
    SourceError,
    SqlSource,
    segments_from_spec,
)

MAPPING = FieldMapping({"email": "email", "FNAME": "first_name"})


class ListSource(Source):
    description = "list"

    def __init__(self, rows):
        self._rows = rows

    def columns(self):
        return list(self._rows[0]) if self._rows else ["customer_id", "email", "first_name"]

    def count(self):
        return len(self._rows)

    def rows(self):
        yield from self._rows


class Recorder(Destination):
    name = "Recorder"
    batch_size = 10
    max_in_flight = 3

    def __init__(self, bad=(), delay=0.0, fail_after=None):
        super().__init__(MAPPING, "target")
        self.bad = set(bad)
        self.delay = delay
        self.fail_after = fail_after
        self.batches: list[int] = []
        self.sent: list[str] = []
        self.in_flight = 0
        self.peak = 0
        self.lock = threading.Lock()

    def send(self, segment, records):
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.batches.append(len(records))
            if self.fail_after is not None and len(self.batches) > self.fail_after:
                self.in_flight -= 1
                raise RuntimeError("vendor is down")
        time.sleep(self.delay)
        try:
            if any(r.payload["email"] in self.bad for r in records):
                raise BatchRefused("Invalid Resource: one member is malformed")
            with self.lock:
                self.sent.extend(r.payload["email"] for r in records)
            return [Outcome(r, "created") for r in records]
        finally:
            with self.lock:
                self.in_flight -= 1


def rows(n, start=0):
    return [{"customer_id": f"C{i}", "email": f"u{i}@example.com", "first_name": "A"} for i in range(start, start + n)]


def run(dest, segs, tmp_path, state=None, logger=None, **options):
    from airflow.sdk import ObjectStoragePath

    return ExportEngine(dest, segs, rejects_path=ObjectStoragePath(f"file://{tmp_path}/rejects.jsonl"), state=state,
                        options=ExportOptions(progress_interval=0, **options), logger=logger).run()


def test_batches_concurrency_and_counts(tmp_path):
    dest = Recorder(delay=0.02)
    summary = run(dest, [Segment("a", ListSource(rows(95))), Segment("b", ListSource(rows(5, 1000)))], tmp_path)
    assert sorted(dest.batches) == sorted([10] * 9 + [5, 5])
    assert dest.peak <= 3 and dest.peak >= 2
    assert summary["totals"]["created"] == 100 and summary["totals"]["rows"] == 100
    assert summary["segments"]["a"]["created"] == 95


def test_batch_refused_is_split_to_isolate_the_bad_row(tmp_path):
    data = rows(10)
    dest = Recorder(bad={"u7@example.com"})
    summary = run(dest, [Segment("a", ListSource(data))], tmp_path)
    assert summary["totals"]["created"] == 9 and summary["totals"]["rejected"] == 1
    assert "u7@example.com" not in dest.sent and len(dest.sent) == 9
    lines = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert lines == [{"segment": "a", "row": 8, "key": "C7", "reason": "vendor_rejected", "field": None,
                      "message": "Recorder refused the member",
                      "vendor_message": "Invalid Resource: one member is malformed"}]


def test_limits_are_checked_before_anything_is_sent(tmp_path):
    dest = Recorder()
    dest.max_per_export = 50
    with pytest.raises(ExportLimitExceeded, match="at most 50 per export. Nothing was sent"):
        run(dest, [Segment("a", ListSource(rows(30))), Segment("b", ListSource(rows(30, 100)))], tmp_path)
    dest.max_per_export, dest.max_per_segment = None, 20
    with pytest.raises(ExportLimitExceeded, match="Segment 'a' has 30 members"):
        run(dest, [Segment("a", ListSource(rows(30)))], tmp_path)
    assert dest.batches == []


def test_reading_starts_while_the_segment_is_counted_and_sending_waits_for_the_count(tmp_path):
    """A first export (no size in the export state) reads and validates while COUNT(*) runs; with a limit the
    first send waits for the count (the limits come first), and the dedupe tables are sized once it arrives.
    A source whose count is a read of its own (a Dataverse table's pages through every key), sent without a limit
    or a circuit breaker reading the count, does not hold the first send: the count is awaited when the segment
    ends, for the summary."""
    events: list[str] = []
    sent = threading.Event()

    class SlowCount(ListSource):
        wait_for_send = False

        def count(self):
            assert read_started.wait(10), "reading did not start while the segment was being counted"
            if self.wait_for_send:
                assert sent.wait(10), "sending waited for the count though nothing needs it"
            events.append("counted")
            return super().count()

        def rows(self):
            events.append("reading")
            read_started.set()
            yield from self._rows

    class Watching(Recorder):
        def send(self, segment, records):
            events.append("send")
            sent.set()
            return super().send(segment, records)

    read_started = threading.Event()
    dest = Watching()
    dest.max_per_segment = 1000  # a limit (not reached): counted before the first send
    data = rows(50) + [{"customer_id": "C999", "email": "U3@example.com", "first_name": "A"}]  # a duplicate
    summary = run(dest, [Segment("a", SlowCount(data))], tmp_path)
    assert events.index("reading") < events.index("counted") < events.index("send")
    assert summary["totals"]["created"] == 50 and summary["totals"]["rejected"] == 1
    # a source whose count is a read of its own (Dataverse), no limit, no breaker: the first send does not wait
    dest.max_per_segment = None
    events.clear()
    read_started.clear()
    sent.clear()
    source = SlowCount(data)
    source.wait_for_send, source.counts_cheaply = True, False
    summary = run(dest, [Segment("a", source)], tmp_path)
    assert events.index("send") < events.index("counted")
    assert summary["totals"]["rows"] == 51 and summary["totals"]["created"] == 50
    dest.max_per_segment = 20  # the limit still stops the export before anything is sent
    events.clear()
    read_started.clear()
    with pytest.raises(ExportLimitExceeded, match="Nothing was sent"):
        run(dest, [Segment("a", SlowCount(rows(30)))], tmp_path)
    assert "send" not in events


def test_deduper_reserve_keeps_what_it_has_seen():
    from airflow_provider_segexport.export.records import Deduper, member_id

    d = Deduper()
    values = [f"u{i}@example.com" for i in range(3000)]
    assert d.check_many([f"C{i}" for i in range(3000)], [member_id(v) for v in values], 0) == [0] * 3000
    d.reserve(1_000_000)
    assert d._by_value._mask + 1 == 1 << 21 and len(d) == 3000
    again = d.check_many(["C1", "X1"], [member_id(values[1]), member_id(values[2])], 0)
    assert again == [1, 2]  # the key twice in the segment; the value held by another key
    assert d.check_many(["C5"], [member_id(values[5])], 1) == [0]  # the same member in another segment


def test_dry_run_sends_nothing(tmp_path):
    dest = Recorder()
    data = rows(20) + [{"customer_id": "X", "email": "bad", "first_name": "A"}]
    summary = run(dest, [Segment("a", ListSource(data))], tmp_path, dry_run=True)
    assert dest.batches == [] and summary["totals"]["planned"] == 20 and summary["totals"]["rejected"] == 1
    assert summary["dry_run"] is True


def test_vendor_failure_stops_the_export_and_counts_unsent(tmp_path, caplog):
    dest = Recorder(fail_after=2)
    with pytest.raises(ExportError, match="vendor is down") as info:
        run(dest, [Segment("a", ListSource(rows(205))), Segment("b", ListSource(rows(50)))], tmp_path)
    assert len(dest.sent) <= 30
    # every row of both segments is accounted for: confirmed, or not sent (including rows never read and
    # the segment never started, and the last 5 rows, read but short of a batch), and the message gives both
    m = re.search(r"(\d+) member\(s\) confirmed .*; (\d+) row\(s\) were not sent", str(info.value))
    assert m and int(m.group(1)) == 20 and int(m.group(1)) + int(m.group(2)) == 255, str(info.value)


def test_counts_add_up_to_rows_read(tmp_path):
    data = rows(40) + [{"customer_id": "D", "email": "U1@example.com", "first_name": "B"},
                       {"customer_id": None, "email": "x@example.com", "first_name": "B"}]
    summary = run(Recorder(bad={"u3@example.com"}), [Segment("a", ListSource(data))], tmp_path)
    t = summary["totals"]
    assert t["created"] + t["updated"] + t["unchanged"] + t["rejected"] + t["planned"] == t["rows"] == 42
    assert summary["rejects"]["by_reason"] == {"duplicate": 1, "missing_key": 1, "vendor_rejected": 1}


def test_progress_lines_have_count_percent_rate_eta(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run(Recorder(), [Segment("a", ListSource(rows(30)))], tmp_path)
    lines = [r.getMessage() for r in caplog.records if "rows confirmed" in r.getMessage()]
    assert lines and "30/30 rows confirmed (100.0%)" in lines[-1] and "rows/s" in lines[-1] and "ETA" in lines[-1]


# -- sources ------------------------------------------------------------------------------------------

@pytest.fixture
def sqlite_conn(tmp_path, monkeypatch):
    path = tmp_path / "wh.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE p (customer_id TEXT, email TEXT, first_name TEXT, seg TEXT)")
    payload = "x" * 200
    db.executemany("INSERT INTO p VALUES (?, ?, ?, ?)",
                   ((f"C{i}", f"user{i}@example.com", payload, "big") for i in range(200_000)))
    db.commit()
    db.close()
    monkeypatch.setenv("AIRFLOW_CONN_WH", json.dumps({"conn_type": "sqlite", "host": str(path)}))
    return "wh"


def test_sql_source_streams_200k_rows_with_bounded_memory(sqlite_conn, tmp_path):
    """A 200,000-row segment (~50 MB of row data) in a dry run: peak traced memory stays far below."""
    (seg,) = segments_from_spec(["big"], sql="SELECT * FROM p WHERE seg = {segment}", sql_conn_id=sqlite_conn)
    dest = Recorder()
    dest.batch_size = 500
    tracemalloc.start()
    summary = run(dest, [seg], tmp_path, dry_run=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert summary["totals"]["planned"] == 200_000
    # 200,000 rows x ~250 bytes of values is ~50 MB as Python objects it would be several times more;
    # the dedupe set (8-byte digests) dominates what remains.
    assert peak < 35 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_sql_source_threads_open_connections_without_looking_the_airflow_connection_up_again(sqlite_conn,
                                                                                           monkeypatch):
    """The count, the rows and the changed rows are opened from threads; inside a task, looking an Airflow
    connection up from several threads at once fails (the supervisor serves one request at a time). The
    connection found first, on the task's thread, is the one every later opening uses."""
    source = SqlSource(sqlite_conn, "SELECT * FROM p WHERE seg = 'big'")
    assert "email" in source.columns()  # the pre-flight, on the task's thread
    monkeypatch.delenv("AIRFLOW_CONN_WH")  # a lookup from now on would fail ("isn't defined")
    counted: list = []
    worker = threading.Thread(target=lambda: counted.append(source.count()))
    worker.start()
    worker.join(60)
    assert counted == [200_000]
    changed = source.changed_since("customer_id", "C99999")  # text order: only C99999 itself is >= it
    assert [c for chunk in changed.chunks(["customer_id"]) for c in chunk] == [("C99999",)]


def test_sql_source_reports_sql_errors_clearly(sqlite_conn):
    source = SqlSource(sqlite_conn, "SELECT * FROM no_such_table")
    with pytest.raises(Exception, match="no such table: no_such_table"):
        source.count()


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_file_sources(tmp_path, fmt):
    data = rows(25)
    path = tmp_path / f"seg.{fmt}"
    if fmt == "csv":
        import csv

        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(data), path)
    src = FileSource(str(path))
    assert src.count() == 25 and set(src.columns()) == {"customer_id", "email", "first_name"}
    summary = run(Recorder(), [Segment("f", src)], tmp_path)
    assert summary["totals"]["created"] == 25


def test_a_file_in_another_encoding_says_where_and_how_to_read_it(tmp_path):
    """A CSV saved as Windows-1252 is not read as UTF-8 garbage nor stopped by a bare UnicodeDecodeError: the error
    names the file, the encoding, the row it follows and the fix; with the segment's ``encoding`` it is read."""
    lines = ["customer_id,email,first_name"] + [f"C{i},u{i}@example.com,Ann" for i in range(3000)]
    lines.insert(2500, "C-x,lois@example.com,Loïs")  # a byte 0xef well past the first decoded block
    path = tmp_path / "seg.csv"
    path.write_bytes(("\n".join(lines) + "\n").encode("cp1252"))
    with pytest.raises(SourceError) as caught:
        run(Recorder(), [Segment("f", FileSource(str(path)))], tmp_path)
    message = str(caught.value)
    assert "seg.csv is not utf-8 text" in message and "(0xef)" in message and "'encoding'" in message
    after = int(re.search(r"after row ([\d,]+)", message).group(1).replace(",", ""))
    assert 2000 < after < 2500  # rows before the bad byte were read; it lies after this one
    (seg,) = segments_from_spec([{"name": "f", "path": str(path), "encoding": "cp1252"}])
    dest = Recorder()
    summary = run(dest, [seg], tmp_path)
    assert summary["totals"]["created"] == 3001 and "lois@example.com" in dest.sent
    assert [r["first_name"] for r in seg.source.rows() if r["customer_id"] == "C-x"] == ["Loïs"]
    with pytest.raises(SourceError, match="Unknown encoding 'utf-9'"):
        FileSource(str(path), encoding="utf-9")


def test_a_json_lines_value_that_is_not_valid_unicode_is_a_reject(tmp_path):
    """JSON may escape a lone surrogate ("\\udce9"): that row is rejected naming its field, the others are sent."""
    path = tmp_path / "seg.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(4))
                    + '{"customer_id": "C9", "email": "x@example.com", "first_name": "Lo\\udce9s"}\n')
    summary = run(Recorder(), [Segment("f", FileSource(str(path)))], tmp_path)
    assert (summary["totals"]["created"], summary["totals"]["rejected"]) == (4, 1)
    (reject,) = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert (reject["key"], reject["reason"], reject["field"]) == ("C9", "invalid_value", "FNAME")
    assert "not valid Unicode" in reject["message"]


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(Exception, match="Cannot tell the format"):
        FileSource(str(tmp_path / "x.txt"))
    with pytest.raises(Exception, match="does not exist"):
        FileSource(str(tmp_path / "missing.csv")).count()


def test_delta_fingerprint_covers_values_and_destination_settings(tmp_path):
    """A delta run skips a member only when neither its validated values nor the destination's settings that
    shape its payload (fingerprint_config) changed since the destination confirmed it."""
    from airflow_provider_segexport.export.state import ExportState

    class Tagged(Recorder):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def fingerprint_config(self):
            return super().fingerprint_config() + self.tag.encode()

    data = rows(30)

    def export(dest, source_rows, run_id):
        state = ExportState("recorder:target", tmp_path / "state")
        try:
            summary = run(dest, [Segment("a", ListSource(source_rows))], tmp_path, state=state, run_id=run_id)
        finally:
            state.close()
        return summary["totals"], dest.sent

    totals, sent = export(Tagged("v1"), data, "r1")
    assert totals["created"] == 30 and len(sent) == 30
    totals, sent = export(Tagged("v1"), data, "r2")  # nothing changed
    assert totals["skipped"] == 30 and sent == []
    changed = [dict(r) for r in data]
    changed[4]["first_name"] = "Zed"
    changed[9]["first_name"] = " A "  # the same value once trimmed: not a change
    totals, sent = export(Tagged("v1"), changed, "r3")
    assert sent == ["u4@example.com"] and totals["skipped"] == 29
    totals, sent = export(Tagged("v2"), changed, "r4")  # a setting that shapes every payload changed
    assert len(sent) == 30 and totals["skipped"] == 0


def test_change_column_reads_only_rows_changed_since_the_last_complete_export(tmp_path, monkeypatch):
    """With a change column, a delta run reads only the rows whose value is >= the watermark the last complete
    export recorded (the highest value before it read anything); the rest count as unchanged, unread."""
    from airflow_provider_segexport.export.state import ExportState

    logged: list[str] = []
    logger = logging.getLogger("test.change_column")
    logger.setLevel(logging.INFO)
    logger.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: logged.append(r.getMessage())})())
    path = tmp_path / "wh.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE p (customer_id TEXT, email TEXT, first_name TEXT, updated_at TEXT)")
    db.executemany("INSERT INTO p VALUES (?, ?, 'A', ?)",
                   [(f"C{i:02d}", f"u{i}@example.com", f"2026-01-01T00:00:{i % 7:02d}Z") for i in range(50)])
    db.commit()
    monkeypatch.setenv("AIRFLOW_CONN_WH", json.dumps({"conn_type": "sqlite", "host": str(path)}))

    def export(run_id, dest=None, **kw):
        dest = dest or Recorder()
        (seg,) = segments_from_spec(["a"], sql="SELECT * FROM p ORDER BY customer_id", sql_conn_id="wh")
        state = ExportState("recorder:target", tmp_path / "state")
        try:
            summary = run(dest, [seg], tmp_path, state=state, run_id=run_id, change_column="updated_at", logger=logger,
                          **kw)
        finally:
            state.close()
        return summary, sorted(dest.sent)

    summary, sent = export("r1")
    assert len(sent) == 50 and summary["change_column"]["a"]["advanced_to"] == "2026-01-01T00:00:06Z"

    db.execute("UPDATE p SET first_name = 'B', updated_at = '2026-01-02T00:00:00Z' WHERE customer_id IN ('C01', 'C02')")
    db.execute("UPDATE p SET updated_at = '2026-01-02T00:00:00Z' WHERE customer_id = 'C03'")  # touched, same values
    db.execute("UPDATE p SET first_name = 'Z' WHERE customer_id = 'C04'")  # changed WITHOUT its change column
    db.execute("INSERT INTO p VALUES ('C98', 'new@example.com', 'N', NULL)")  # NULL: always read
    db.commit()
    summary, sent = export("r2")
    assert sent == ["new@example.com", "u1@example.com", "u2@example.com"]  # not u4: its row was not read
    t = summary["totals"]
    assert (t["rows"], t["created"], t["skipped"]) == (51, 3, 48)
    assert summary["change_column"]["a"]["since"] == "2026-01-01T00:00:06Z"
    assert any("reading only the rows whose updated_at is >= 2026-01-01T00:00:06Z" in m for m in logged)

    # a failed run does not move the watermark: the retry reads the same rows again
    db.execute("UPDATE p SET first_name = 'C', updated_at = '2026-01-03T00:00:00Z' WHERE customer_id = 'C05'")
    db.commit()
    with pytest.raises(ExportError):
        export("r3", Recorder(fail_after=0))
    summary, sent = export("r4")
    assert sent == ["u5@example.com"] and summary["change_column"]["a"]["since"] == "2026-01-02T00:00:00Z"

    # mirror mode, full_refresh and changed destination settings read every row (u4's change is found)
    mirror = Recorder()
    mirror.mirror = True
    mirror.remove_members = lambda segment, keys: len(keys)
    summary, sent = export("r5", mirror)
    assert sent == ["u4@example.com"] and summary["change_column"]["a"]["since"] is None
    assert any("reading every row (mirror mode" in m for m in logged)
    summary, sent = export("r6", full_refresh=True)
    assert len(sent) == 51

    # a destination setting that shapes the payloads changed: every row is read (the first segment's changed rows,
    # queried ahead while the destination was checked, are dropped unread) and every member sent
    class Retagged(Recorder):
        def fingerprint_config(self):
            return super().fingerprint_config() + b"v2"

    db.execute("UPDATE p SET first_name = 'D', updated_at = '2026-01-04T00:00:00Z' WHERE customer_id = 'C06'")
    db.commit()
    summary, sent = export("r7", Retagged())
    assert len(sent) == 51 and summary["change_column"]["a"]["since"] is None
    assert any("settings or the mapping changed since the last export" in m for m in logged)
    assert not [t for t in threading.enumerate() if t.name == "segexport-prefetch"]

    class Gone(Retagged):  # the pre-flight fails while the changed rows are being queried: the query stops too
        def preflight(self, segments, dry_run):
            raise ExportError("the audience is gone")

    with pytest.raises(ExportError, match="the audience is gone"):
        export("r8", Gone())
    assert not [t for t in threading.enumerate() if t.name == "segexport-prefetch"]

    with pytest.raises(ExportError, match="change_column 'changed' is not a column of segment 'a'"):
        (seg,) = segments_from_spec(["a"], sql="SELECT * FROM p", sql_conn_id="wh")
        run(Recorder(), [seg], tmp_path, state=ExportState("recorder:target", tmp_path / "state"),
            change_column="changed")


def test_change_column_watermark_skips_nulls_and_refuses_mixed_types(tmp_path):
    """The next watermark is the highest non-NULL value read (NULL rows are always read again); values of
    different types cannot be ordered: the export stops before sending and says what to use instead."""
    from airflow_provider_segexport.export.state import ExportState

    def export(updated, run_id, **kw):
        source = ListSource([{**r, "updated_at": u} for r, u in zip(rows(len(updated)), updated, strict=True)])
        state = ExportState("recorder:target", tmp_path / "state")
        dest = Recorder()
        try:
            return run(dest, [Segment("a", source)], tmp_path, state=state, run_id=run_id,
                       change_column="updated_at", **kw), dest
        finally:
            state.close()

    summary, _ = export(["2026-01-02", None, "2026-01-05", None, "2026-01-03"], "r1")
    assert summary["change_column"]["a"]["advanced_to"] == "2026-01-05"
    summary, _ = export([None] * 5, "r2")  # nothing but NULLs: the watermark stays where it was
    assert summary["change_column"]["a"].get("advanced_to") is None
    with pytest.raises(SourceError, match=r"change_column 'updated_at' of list: row 2 holds a int, which cannot be "
                                          r"compared with the last export's watermark \(a str\)"):
        export(["2026-01-02", 7, None, None, "2026-01-09"], "r3")  # the rows read since the watermark
    with pytest.raises(ExportError, match="change_column 'updated_at' holds values of different types"):
        export(["2026-01-02", 7, None, None, "2026-01-09"], "r4", full_refresh=True)  # every row read


@pytest.mark.parametrize("column_type", ["timestamptz", "timestamp", "date", "bigint", "text"])
def test_change_column_watermark_round_trips_through_postgres_types(column_type, state_pg, tmp_path):
    """The watermark is read from PostgreSQL as a Python value (datetime with or without a zone, date, int,
    text), kept in the export state, and written back into the next query as a literal PostgreSQL compares
    with the column: only the rows changed since are read."""
    sa = pytest.importorskip("sqlalchemy")
    from airflow_provider_segexport.export.state import ExportState

    values = {"timestamptz": ("TIMESTAMPTZ '2026-01-0{}T10:00:00+02:00'", "TIMESTAMPTZ '2026-02-01T00:00:00Z'"),
              "timestamp": ("TIMESTAMP '2026-01-0{} 10:00:00.5'", "TIMESTAMP '2026-02-01 00:00:00'"),
              "date": ("DATE '2026-01-0{}'", "DATE '2026-02-01'"),
              "bigint": ("{}", "100"),
              "text": ("'v0{}'", "'v10'")}[column_type]
    from airflow.sdk import BaseHook

    engine = BaseHook.get_connection(state_pg).get_hook().get_sqlalchemy_engine()
    table = f"people_{column_type}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        conn.execute(sa.text(f"CREATE TABLE {table} (customer_id TEXT, email TEXT, first_name TEXT, "
                             f"changed {column_type})"))
        for i in range(1, 10):
            conn.execute(sa.text(f"INSERT INTO {table} VALUES ('C{i}', 'u{i}@example.com', 'A', "
                                 f"{values[0].format(i)})"))

    def export(run_id):
        dest = Recorder()
        (seg,) = segments_from_spec(["a"], sql=f"SELECT * FROM {table}", sql_conn_id=state_pg)
        state = ExportState("recorder:target", tmp_path / "state")
        try:
            summary = run(dest, [seg], tmp_path, state=state, run_id=run_id, change_column="changed")
        finally:
            state.close()
        return summary, sorted(dest.sent)

    summary, sent = export("r1")
    assert len(sent) == 9 and summary["change_column"]["a"]["advanced_to"] is not None
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {table} SET first_name = 'B', changed = {values[1]} WHERE customer_id = 'C3'"))
        conn.execute(sa.text(f"UPDATE {table} SET first_name = 'Z' WHERE customer_id = 'C2'"))  # not bumped
    summary, sent = export("r2")
    assert sent == ["u3@example.com"], summary
    assert summary["totals"]["skipped"] == 8
    engine.dispose()


@pytest.mark.parametrize(("sql", "counted"), [
    ("SELECT * FROM t ORDER BY customer_id", "SELECT * FROM t"),
    ("SELECT * FROM t WHERE s = 'x ORDER BY y' ORDER BY a, b DESC", "SELECT * FROM t WHERE s = 'x ORDER BY y'"),
    ("SELECT 'it''s' AS x FROM t\norder\n  by lower(x) /* last */", "SELECT 'it''s' AS x FROM t"),
    ("SELECT * FROM border_by ORDER BY x -- newest first", "SELECT * FROM border_by"),
    # kept whole: a LIMIT/OFFSET/FOR after it, an ORDER BY in a window, a subquery, a comment or a quoted name
    ("SELECT * FROM t ORDER BY a LIMIT 10", None),
    ("SELECT * FROM t ORDER BY a OFFSET 5 ROWS", None),
    ("SELECT * FROM t ORDER BY a FOR UPDATE", None),
    ("SELECT row_number() OVER (ORDER BY a) FROM t", None),
    ("SELECT * FROM (SELECT * FROM t ORDER BY a) q", None),
    ("SELECT * FROM t -- ORDER BY a\n", None),
    ('SELECT * FROM t WHERE a = "ORDER BY"', None),
])
def test_the_count_query_drops_only_a_final_order_by(sql, counted):
    """COUNT(*) over a query that ends with ORDER BY made SQLite sort the whole segment just to count it."""
    from airflow_provider_segexport.export.sources import _without_final_order_by

    assert _without_final_order_by(sql) == (counted if counted is not None else sql)


# -- mirror, circuit breakers, destination-assigned keys ------------------------------------------------

class Mirror(Recorder):
    """A mirror destination: records the keys it was asked to remove."""

    mirror = True

    def __init__(self, **kw):
        super().__init__(**kw)
        self.removed: list[str] = []

    def remove_members(self, segment, keys):
        self.removed.extend(keys)
        return len(keys)


def state_run(tmp_path, dest, data, run_id, **options):
    from airflow_provider_segexport.export.state import ExportState

    state = ExportState("recorder:target", tmp_path / "state")
    try:
        return run(dest, [Segment("a", ListSource(data))], tmp_path, state=state, run_id=run_id, **options)
    finally:
        state.close()


@pytest.mark.parametrize("full_refresh", [False, True], ids=["delta", "every_member_sent"])
def test_mirror_that_would_remove_too_many_sends_nothing(tmp_path, full_refresh):
    """Mirror mode compares the segment's count with the members the export state holds before the first send:
    a segment that lost more than max_removal_share stops with nothing sent, whether members are sent by delta
    or all of them (delta=False); within the share the leavers are removed."""
    assert state_run(tmp_path, Mirror(), rows(100), "r1")["totals"]["created"] == 100
    dest = Mirror()
    with pytest.raises(ExportError) as info:
        state_run(tmp_path, dest, rows(70), "r2", full_refresh=full_refresh)
    assert dest.batches == [] and dest.removed == []
    message = str(info.value)
    for words in ("segment 'a' has 70 rows", "100 members", "at least 30 (30%)", "max_removal_share=20%",
                  "Nothing was sent", "allow_large_changes=True"):
        assert words in message, message
    dest = Mirror()
    summary = state_run(tmp_path, dest, rows(90), "r3", full_refresh=full_refresh)
    assert sorted(dest.removed) == sorted(f"u{i}@example.com" for i in range(90, 100))
    assert summary["totals"]["removed"] == 10
    assert len(dest.sent) == (90 if full_refresh else 0)
    dest = Mirror()
    summary = state_run(tmp_path, dest, rows(60), "r4", full_refresh=full_refresh, allow_large_changes=True)
    assert summary["totals"]["removed"] == 30


def test_the_size_breaker_stops_an_exact_halving(tmp_path):
    state_run(tmp_path, Recorder(), rows(100), "r1")
    dest = Recorder()
    with pytest.raises(ExportError, match=r"had 100 \(2.0x shrinkage; a change by a factor of max_size_change=2 or "
                                          r"more stops the export\). Nothing was sent"):
        state_run(tmp_path, dest, rows(50), "r2")
    assert dest.batches == []
    assert state_run(tmp_path, Recorder(), rows(51), "r3")["totals"]["skipped"] == 51


def test_mirror_needs_export_state(tmp_path):
    with pytest.raises(ExportError, match="Mirror mode and plans need export state"):
        run(Mirror(), [Segment("a", ListSource(rows(3)))], tmp_path)


def test_a_destination_assigned_key_is_kept_for_mirror_removals(tmp_path):
    """A destination that declares assigns_keys sets Record.dest_key on what it confirms (e.g. a contact ID from
    the vendor's answer); the export state keeps that key and mirror removals get it back."""

    class Assigning(Mirror):
        assigns_keys = True

        def send(self, segment, records):
            outcomes = super().send(segment, records)
            for r in records:
                r.dest_key = "contact-" + r.key
            return outcomes

    state_run(tmp_path, Assigning(), rows(10), "r1")
    dest = Assigning()
    state_run(tmp_path, dest, rows(9), "r2")
    assert dest.removed == ["contact-C9"]

    class Forgetful(Mirror):  # declares it, but assigns nothing: the export stops instead of keeping no key
        assigns_keys = True

    with pytest.raises(ExportError, match="without the key it assigned"):
        state_run(tmp_path / "other", Forgetful(), rows(3), "r1")


def test_capabilities_are_declared_not_inferred():
    class Converting(Destination):
        converts_records = True

        def prepare(self, record):
            return record.key

    assert Converting(MAPPING, "t").prepare_many([]) == ([], [])
    with pytest.raises(TypeError, match="declare converts_records = True"):
        type("Undeclared", (Destination,), {"prepare_many": lambda self, records: (records, [])})
    with pytest.raises(TypeError, match="declare has_member_key = True"):
        type("Undeclared", (Destination,), {"member_key": lambda self, record: record.key})


def test_progress_while_the_total_is_still_being_counted(caplog):
    """No count yet (a Dataverse table counted while sending starts): the line says so, no "x/0 (100%), ETA 0s"."""
    import logging

    from airflow_provider_segexport.export.report import Progress

    log = logging.getLogger("segexport.test.progress")
    with caplog.at_level(logging.INFO, logger=log.name):
        p = Progress(log, "Adobe Campaign segment 'contacts'", 0, 3600)
        p.advance(5995, None)
        p.emit()
        p.total = 19_590
        p.emit()
    first, second = (r.getMessage() for r in caplog.records)
    assert "5,995 rows confirmed (the total is being counted)" in first and "/0" not in first
    assert "5,995/19,590 rows confirmed" in second and "ETA" in second
