"""Where segment members come from: a SQL query on any Airflow SQL connection, or a file.

Both stream: SQL rows are fetched with ``fetchmany`` in chunks, files are read line by line (or
Parquet batch by batch), so a segment is never held whole in memory.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import itertools
import json
import operator
import queue
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

_SEGMENT_NAME = re.compile(r"^[A-Za-z0-9_.: -]{1,100}$")


class SourceError(RuntimeError):
    """The source could not be read (bad SQL, missing file, unsupported format)."""


class Source:
    """A stream of rows (dicts) for one segment."""

    description = "source"

    def columns(self) -> list[str]:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def changed_since(self, column: str, value: Any) -> Source:
        """The rows whose ``column`` is ``>= value`` or NULL (a NULL change column always counts as changed).

        This generic version still reads every row (and skips the others before any other work); SQL
        sources push the condition into the query, where an index on the column makes it cheap."""
        return _ChangedSince(self, column, value)

    def rows(self) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def tuples(self, columns: list[str]) -> Iterator[tuple]:
        """The rows as tuples of ``columns`` (in that order): what the export engine reads.

        Cheaper than dicts; sources that can, fetch only these columns.
        """
        for row in self.rows():
            yield tuple(row.get(c) for c in columns)

    def chunks(self, columns: list[str], size: int = 2000) -> Iterator[list[tuple]]:
        """:meth:`tuples` in lists of up to ``size`` rows (the export engine works chunk by chunk)."""
        rows = self.tuples(columns)
        while chunk := list(itertools.islice(rows, size)):
            yield chunk


@dataclass
class _ChangedSince(Source):
    source: Source
    column: str
    since: Any

    @property
    def description(self) -> str:
        return self.source.description

    def columns(self) -> list[str]:
        return self.source.columns()

    def count(self) -> int:
        return sum(1 for _ in self.rows())

    def rows(self) -> Iterator[dict[str, Any]]:
        column, since = self.column, self.since
        for number, row in enumerate(self.source.rows(), 1):
            value = row.get(column)
            try:
                if value is None or value >= since:
                    yield row
            except TypeError:
                raise SourceError(
                    f"change_column '{column}' of {self.source.description}: row {number} holds a "
                    f"{type(value).__name__}, which cannot be compared with the last export's watermark (a "
                    f"{type(since).__name__}); use a timestamp, date or number column of one type.") from None


@dataclass
class SqlSource(Source):
    """Rows of ``sql`` run on the Airflow connection ``conn_id`` (any common.sql ``DbApiHook``)."""

    conn_id: str
    sql: str
    parameters: Mapping[str, Any] | tuple | None = None
    chunk_size: int = 5000
    _hook: Any = field(default=None, repr=False)

    @property
    def description(self) -> str:
        return f"SQL query on connection '{self.conn_id}'"

    def hook(self):
        if self._hook is None:
            from airflow.providers.common.sql.hooks.sql import DbApiHook
            from airflow.sdk import BaseHook

            connection = BaseHook.get_connection(self.conn_id)
            hook = connection.get_hook()
            if not isinstance(hook, DbApiHook):
                raise SourceError(
                    f"Connection '{self.conn_id}' is of type '{getattr(hook, 'conn_type', '?')}', not a SQL "
                    "database: use a connection whose hook is a common.sql DbApiHook (sqlite, postgres, ...)."
                )
            # Opening a database connection makes many hooks (SQLite's among them) look their Airflow connection
            # up again, and the count, the rows and the changed rows are opened from threads of their own. Inside
            # a task that lookup goes to the task supervisor, which cannot serve several threads at once (the
            # lookup then fails: "conn_id ... isn't defined"), so the hook keeps the connection found here, on
            # the task's thread (the pre-flight's column check comes first).
            conn_id = self.conn_id
            hook.get_connection = lambda cid: connection if cid == conn_id else BaseHook.get_connection(cid)
            self._hook = hook
        return self._hook

    def _execute(self, sql: str):
        conn = self.hook().get_conn()
        cursor = conn.cursor()
        try:
            if self.parameters:
                cursor.execute(sql, self.parameters)
            else:
                cursor.execute(sql)
        except Exception as exc:
            cursor.close()
            conn.close()
            raise SourceError(f"{self.description} failed: {exc}. SQL: {_short_sql(sql)}") from exc
        return conn, cursor

    def columns(self) -> list[str]:
        conn, cursor = self._execute(f"SELECT * FROM ({self.sql.rstrip().rstrip(';')}) segexport_q WHERE 1 = 0")
        try:
            return [d[0] for d in cursor.description]
        finally:
            cursor.close()
            conn.close()

    def count(self) -> int:
        # A final ORDER BY does not change how many rows there are, and some databases (SQLite) would sort
        # the whole segment just to count it.
        sql = _without_final_order_by(self.sql.rstrip().rstrip(";"))
        conn, cursor = self._execute(f"SELECT COUNT(*) FROM ({sql}) segexport_q")
        try:
            return int(cursor.fetchone()[0])
        finally:
            cursor.close()
            conn.close()

    def changed_since(self, column: str, value: Any) -> SqlSource:
        """The query wrapped in ``WHERE column >= <value> OR column IS NULL`` (the value as a SQL literal, so
        the query's own parameters keep their places)."""
        quote = _quote_for(_dialect_of(self.hook()))
        col = quote(column)
        sql = (f"SELECT * FROM ({self.sql.rstrip().rstrip(';')}) segexport_c "
               f"WHERE {col} >= {sql_literal(value)} OR {col} IS NULL")
        return dataclasses.replace(self, sql=sql)

    def _fetch(self, conn, cursor) -> Iterator[list[tuple]]:
        """The result in ``chunk_size`` chunks (fetchmany); closes the cursor and connection at the end."""
        try:
            while True:
                chunk = cursor.fetchmany(self.chunk_size)
                if not chunk:
                    break
                yield chunk
        finally:
            cursor.close()
            conn.close()

    def rows(self) -> Iterator[dict[str, Any]]:
        conn, cursor = self._execute(self.sql)
        names = [d[0] for d in cursor.description]
        for chunk in self._fetch(conn, cursor):
            for values in chunk:
                yield dict(zip(names, values, strict=False))

    def tuples(self, columns: list[str]) -> Iterator[tuple]:
        for chunk in self.chunks(columns):
            yield from chunk

    def chunks(self, columns: list[str], size: int = 2000) -> Iterator[list[tuple]]:
        """Only ``columns`` are fetched, ``chunk_size`` rows at a time, whatever ``size`` (the query is wrapped
        in a projection; if the database refuses the wrapped query, the query runs as written and the
        columns are picked)."""
        quote = _quote_for(_dialect_of(self.hook()))
        projected = (f"SELECT {', '.join(quote(c) for c in columns)} FROM "
                     f"({self.sql.rstrip().rstrip(';')}) segexport_q")
        try:
            conn, cursor = self._execute(projected)
        except SourceError:
            conn, cursor = self._execute(self.sql)
            names = [d[0] for d in cursor.description]
            index = [names.index(c) for c in columns]
            pick = operator.itemgetter(*index) if len(index) > 1 else (lambda values, i=index[0]: (values[i],))
            for chunk in self._fetch(conn, cursor):
                yield list(map(pick, chunk))
            return
        for chunk in self._fetch(conn, cursor):
            yield chunk if chunk.__class__ is list else list(chunk)


@dataclass
class FileSource(Source):
    """Rows of a CSV, JSON Lines or Parquet file on any ``ObjectStoragePath`` (local, s3://, gs://...).

    CSV and JSON Lines are read as ``encoding`` (UTF-8 by default, a byte-order mark skipped); a byte that
    does not decode stops the export with the row it follows and the fix.
    """

    path: Any
    format: str | None = None
    conn_id: str | None = None
    csv_options: Mapping[str, Any] = field(default_factory=dict)
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        from airflow.sdk import ObjectStoragePath

        if not isinstance(self.path, ObjectStoragePath):
            self.path = ObjectStoragePath(str(self.path), conn_id=self.conn_id)
        fmt = (self.format or "").lower() or _format_from_name(str(self.path))
        if fmt not in ("csv", "jsonl", "parquet"):
            raise SourceError(
                f"Cannot tell the format of {self.path}: name it .csv, .jsonl/.ndjson or .parquet, or pass "
                "format='csv'|'jsonl'|'parquet'."
            )
        self.format = fmt
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise SourceError(f"Unknown encoding {self.encoding!r} for {self.path}: use a Python codec name such "
                              "as 'utf-8', 'cp1252' or 'latin-1'.") from None

    @property
    def description(self) -> str:
        return f"file {self.path}"

    def _open_text(self, newline: str | None = "") -> Any:
        """The file as text in its encoding (UTF-8 with or without a byte-order mark by default); ``newline``
        as :func:`open` takes it (CSV: ``""``)."""
        utf8 = codecs.lookup(self.encoding).name == "utf-8"
        return self.path.open("r", encoding="utf-8-sig" if utf8 else self.encoding, newline=newline)

    def _decoded(self, items: Iterator[Any], header: bool = False) -> Iterator[Any]:
        """``items`` as read (after a header line if ``header``), a byte that does not decode reported with the
        row it follows and the fix."""
        n = -1 if header else 0
        try:
            for item in items:
                yield item
                n += 1
        except UnicodeDecodeError as exc:
            where = f"after row {n:,}" if n > 0 else "in its first lines"
            raise SourceError(
                f"{self.description} is not {self.encoding} text: {where} a byte (0x{exc.object[exc.start]:02x}) "
                f"cannot be decoded ({exc.reason}). Save the file as {self.encoding}, or give the segment the file's "
                "encoding (a segment dict's 'encoding', e.g. 'cp1252')."
            ) from None

    def _check(self) -> None:
        if not self.path.exists():
            raise SourceError(f"{self.description} does not exist")

    def columns(self) -> list[str]:
        self._check()
        if self.format == "csv":
            with self._open_text() as fh:
                return next(self._decoded(csv.reader(fh, **self.csv_options)), [])
        if self.format == "parquet":
            return list(self._parquet().schema_arrow.names)
        for row in self.rows():
            return list(row)
        return []

    def count(self) -> int:
        if self.format == "parquet":
            self._check()
            return self._parquet().metadata.num_rows
        return sum(1 for _ in self.rows())

    def rows(self) -> Iterator[dict[str, Any]]:
        self._check()
        if self.format == "csv":
            with self._open_text() as fh:
                for row in self._decoded(csv.DictReader(fh, **self.csv_options)):
                    yield {k: (v if v != "" else None) for k, v in row.items()}
        elif self.format == "jsonl":
            with self._open_text(newline=None) as fh:
                for n, line in enumerate(self._decoded(fh), start=1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as exc:
                        raise SourceError(f"{self.description} line {n} is not valid JSON: {exc}") from exc
                    if not isinstance(obj, dict):
                        raise SourceError(f"{self.description} line {n} is not a JSON object")
                    yield obj
        else:
            pf = self._parquet()
            for batch in pf.iter_batches(batch_size=10_000):
                yield from batch.to_pylist()

    def tuples(self, columns: list[str]) -> Iterator[tuple]:
        if self.format != "csv":
            yield from super().tuples(columns)
            return
        self._check()
        with self._open_text() as fh:
            reader = self._decoded(csv.reader(fh, **self.csv_options), header=True)
            header = next(reader, [])
            index = [header.index(c) if c in header else None for c in columns]
            width = len(header)
            for raw in reader:
                if len(raw) < width:
                    raw = raw + [""] * (width - len(raw))
                yield tuple(None if i is None or raw[i] == "" else raw[i] for i in index)

    def _parquet(self):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise SourceError("Reading Parquet needs pyarrow: pip install 'airflow-provider-segexport[parquet]'") from exc
        fh = self.path.open("rb")
        return pq.ParquetFile(fh if not isinstance(fh, io.TextIOBase) else fh.buffer)


_WORD = re.compile(r"[A-Za-z_]+")
_BY = re.compile(r"\s+BY\b", re.IGNORECASE)


def _without_final_order_by(sql: str) -> str:
    """``sql`` without its final top-level ``ORDER BY ...`` clause, when that is the last clause (no LIMIT,
    OFFSET, FETCH or FOR after it); otherwise ``sql`` unchanged. Quotes, comments and parentheses are
    skipped, so an ORDER BY inside a window, a subquery or a string is never touched."""
    depth, i, n = 0, 0, len(sql)
    order_at = None
    after: list[str] = []
    while i < n:
        c = sql[i]
        if c in "'\"`":
            end = sql.find(c, i + 1)
            while end != -1 and c == "'" and sql[end + 1: end + 2] == "'":  # '' inside a string
                end = sql.find(c, end + 2)
            if end == -1:
                return sql
            i = end + 1
            continue
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end == -1 else end + 1
            continue
        if sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            if end == -1:
                return sql
            i = end + 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0 and (c.isalpha() or c == "_") and (i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] == "_")):
            word = _WORD.match(sql, i).group().upper()
            if word == "ORDER":
                if _BY.match(sql, i + 5):
                    order_at, after = i, []
            elif order_at is not None:
                after.append(word)
            i += len(word)
            continue
        i += 1
    if order_at is None or depth != 0 or {"LIMIT", "OFFSET", "FETCH", "FOR", "UNION", "EXCEPT", "INTERSECT"} & set(after):
        return sql
    return sql[:order_at].rstrip()


def sql_literal(value: Any) -> str:
    """A change column's value as a SQL literal: numbers as they are, text and date/times quoted (ISO 8601,
    which PostgreSQL, MySQL, Snowflake, BigQuery and SQLite's text dates all compare correctly)."""
    if isinstance(value, bool) or value is None:
        raise SourceError(f"A change column cannot hold {value!r}: use a timestamp, date, number or sortable text.")
    if isinstance(value, (int, float, Decimal)):
        return str(value)
    if isinstance(value, datetime):
        text = value.isoformat(sep=" ")
    elif isinstance(value, date):
        text = value.isoformat()
    elif isinstance(value, str):
        text = value
    else:
        raise SourceError(f"A change column of type {type(value).__name__} is not supported: use a timestamp, "
                          "date, number or sortable text.")
    if "\\" in text or "\x00" in text:
        raise SourceError("A change column's text value holds a backslash or NUL character; use a timestamp, "
                          "date or number column.")
    return "'" + text.replace("'", "''") + "'"


def encode_watermark(value: Any) -> str:
    """A change column's value as stored in the export state (its type kept)."""
    sql_literal(value)  # the same types are accepted
    if isinstance(value, datetime):
        return json.dumps({"datetime": value.isoformat()})
    if isinstance(value, date):
        return json.dumps({"date": value.isoformat()})
    if isinstance(value, Decimal):
        return json.dumps({"decimal": str(value)})
    return json.dumps({type(value).__name__: value})


def decode_watermark(text: str) -> Any:
    ((kind, value),) = json.loads(text).items()
    if kind == "datetime":
        return datetime.fromisoformat(value)
    if kind == "date":
        return date.fromisoformat(value)
    if kind == "decimal":
        return Decimal(value)
    return value


def _dialect_of(hook: Any) -> str:
    try:
        return str(hook.dialect_name or "")
    except Exception:  # noqa: BLE001 - an unknown dialect just means ANSI quoting
        return str(getattr(hook, "conn_type", "") or "")


def _quote_for(dialect: str):
    """Identifier quoting: backticks for MySQL/MariaDB, ANSI double quotes elsewhere."""
    if dialect.lower() in ("mysql", "mariadb"):
        return lambda name: "`" + name.replace("`", "``") + "`"
    return lambda name: '"' + name.replace('"', '""') + '"'


def _format_from_name(name: str) -> str:
    lower = name.lower()
    for suffix, fmt in ((".csv", "csv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"),
                        (".parquet", "parquet"), (".pq", "parquet")):
        if lower.endswith(suffix):
            return fmt
    return ""


def _short_sql(sql: str, limit: int = 300) -> str:
    sql = " ".join(sql.split())
    return sql if len(sql) <= limit else sql[: limit - 1] + "…"


@dataclass
class Segment:
    """A named segment and where its members come from."""

    name: str
    source: Source

    def __post_init__(self) -> None:
        if not _SEGMENT_NAME.match(self.name or ""):
            raise ValueError(
                f"Segment name {self.name!r} is not allowed: use 1-100 letters, digits, spaces, '_', '-', '.', ':'."
            )


def segments_from_spec(
    spec: Any, *, sql: str | None = None, sql_conn_id: str | None = None, path: str | None = None,
    file_format: str | None = None, chunk_size: int = 5000,
) -> list[Segment]:
    """Build segments from an operator's ``segments`` argument.

    Each item is a segment name (using the operator-level ``sql``, where ``{segment}`` is replaced by
    the quoted segment name, or ``path`` with ``{segment}`` in it) or a dict with ``name`` and one of
    ``sql`` (+ optional ``conn_id``) or ``path`` (+ optional ``format``, ``encoding``).
    """
    if isinstance(spec, (str, dict)):
        spec = [spec]
    if not spec:
        raise ValueError("No segments given: pass segments=['name', ...] or [{'name': ..., 'sql': ...}].")
    out = []
    for item in spec:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"Segment {item!r} must be a name or a dict with 'name' and 'sql' or 'path'.")
        name = str(item["name"]).strip()
        quoted = "'" + name.replace("'", "''") + "'"
        if item.get("path") or (path and not item.get("sql") and not sql):
            p = str(item.get("path") or path).replace("{segment}", name)
            source: Source = FileSource(p, format=item.get("format") or file_format, conn_id=item.get("conn_id"),
                                        encoding=item.get("encoding") or "utf-8")
        else:
            query = item.get("sql") or sql
            conn_id = item.get("conn_id") or sql_conn_id
            if not query or not conn_id:
                raise ValueError(f"Segment '{name}' needs a SQL query and a connection (sql=..., sql_conn_id=...) "
                                 "or a file path.")
            source = SqlSource(conn_id, query.replace("{segment}", quoted), item.get("parameters"), chunk_size)
        out.append(Segment(name, source))
    return out


_END = object()


class Prefetch:
    """A source's chunks, read by a thread ahead of the reader (at most ``depth`` chunks ahead). The
    source's connection and cursor live and die in that thread.

    :param source: the source to read.
    :param columns: the columns to read.
    :param depth: chunks read ahead at most.
    """

    def __init__(self, source: Source, columns: list[str], depth: int = 4) -> None:
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

    def _run(self, source: Source, columns: list[str]) -> None:
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
        """Stop the thread (and close its cursor)."""
        self._stop.set()
        while True:  # unblock a pending put
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=30)
