"""State kept between runs, outside the worker (tasks may run on any worker).

* The members a destination refused for good (permanently deleted, compliance state), so later runs
  reject them up front instead of failing on them forever: :class:`RefusalStore`, a SQLite file in a
  configurable directory (default ``$AIRFLOW_HOME/segexport/state``).
* The export state of delta exports (what each destination last confirmed, per member):
  :class:`ExportState`, a SQLite file in the same directory (the default; tasks on one machine), or
  :class:`SqlConnectionExportState`, a table in any Airflow SQL connection (PostgreSQL first-class,
  also SQLite and MySQL), for deployments where a task may run on any of several workers.
  :func:`open_export_state` picks one.
"""

from __future__ import annotations

import logging
import os
import random
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from airflow_provider_segexport.export.records import member_id


@contextmanager
def _transaction(db: sqlite3.Connection, immediate: bool = True):
    """An explicit transaction on an autocommit connection (one commit for a whole executemany)."""
    db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def default_state_dir() -> Path:
    """``$SEGEXPORT_STATE_DIR``, else ``$AIRFLOW_HOME/segexport/state``."""
    if os.environ.get("SEGEXPORT_STATE_DIR"):
        return Path(os.environ["SEGEXPORT_STATE_DIR"])
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return Path(home) / "segexport" / "state"


def _open_sqlite(state_dir: str | Path | None, name: str, **connect: Any) -> tuple[Path, sqlite3.Connection]:
    """A SQLite file of the state directory (created if needed), shared by the engine's threads."""
    directory = Path(state_dir) if state_dir else default_state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    return path, sqlite3.connect(path, check_same_thread=False, **connect)


def _use_wal(db: sqlite3.Connection, attempts: int = 100) -> None:
    """Switch the file to WAL (it stays so). Switching needs the file to itself and SQLite answers "database
    is locked" at once instead of waiting, so several tasks opening a new state file together retry."""
    for attempt in range(attempts):
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.02 + 0.03 * random.random())


class RefusalStore:
    """Members a destination (``scope``, e.g. ``mailchimp:<conn>:<audience>``) will never take back.

    Kept by :func:`member_id` (a hash of the address, never the address itself).
    """

    def __init__(self, scope: str, state_dir: str | Path | None = None) -> None:
        self.scope = scope
        self.path, self._db = _open_sqlite(state_dir, "refusals.sqlite", timeout=30)
        # as the export state: WAL, no fsync per commit (a refusal lost with the machine's power is only sent
        # again, and refused again); a batch's refusals are one commit
        _use_wal(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS refused_members (scope TEXT NOT NULL, member INTEGER NOT NULL, reason TEXT, "
            "refused_at REAL, PRIMARY KEY (scope, member)) WITHOUT ROWID"
        )
        self._db.commit()
        #: member id -> the destination's reason (public: its truthiness is checked per member)
        self.known: dict[int, str] = dict(
            self._db.execute("SELECT member, reason FROM refused_members WHERE scope = ?", (scope,)))

    def get(self, email: str, member: int | None = None) -> str | None:
        """The reason the address was refused for good, or None; ``member`` is its :func:`member_id`."""
        return self.known.get(member_id(email) if member is None else member)

    def add(self, email: str, reason: str) -> None:
        self.add_many([(email, reason)])

    def add_many(self, refused: Iterable[tuple[str, str]]) -> None:
        """Remember (email, reason) pairs; one commit for them all (a batch's refusals)."""
        self.add_members((member_id(email), reason) for email, reason in refused)

    def add_members(self, refused: Iterable[tuple[int, str]]) -> None:
        """Remember (member id, reason) pairs, the ids as :func:`member_id` makes them from the address; one
        commit for them all."""
        now = time.time()
        with self._lock:
            rows = []
            for member, reason in refused:
                if member not in self.known:
                    self.known[member] = reason
                    rows.append((self.scope, member, reason, now))
            if rows:
                self._write(rows)

    def _write(self, rows: list[tuple[str, int, str, float]]) -> None:
        """Store new (scope, member, reason, refused at) rows (called under the lock)."""
        self._db.executemany("INSERT OR REPLACE INTO refused_members VALUES (?, ?, ?, ?)", rows)
        self._db.commit()

    def discard_members(self, members: Iterable[int]) -> None:
        """Forget members (ids as :func:`member_id` makes them); one commit for them all.

        :param members: the member ids to forget.
        """
        with self._lock:
            gone = [(self.scope, m) for m in members if self.known.pop(m, None) is not None]
            if gone:
                self._db.executemany("DELETE FROM refused_members WHERE scope = ? AND member = ?", gone)
                self._db.commit()

    def __len__(self) -> int:
        return len(self.known)

    def close(self) -> None:
        self._db.close()


class SqlRefusalStore(RefusalStore):
    """:class:`RefusalStore` in the export state's SQL connection (``<table_prefix>refused_members``, created on
    first use): every worker of a multi-worker deployment sees the same refusals (a file in ``state_dir`` is one
    machine's). Same interface; rows written with the dialect's insert-or-ignore (another worker may have
    recorded the same member), else one at a time with an integrity error taken as "already there".

    :param scope: e.g. ``mailchimp:<conn>:<audience>``.
    :param conn_id: the Airflow SQL connection of the export state.
    :param table_prefix: as the export state's.
    """

    def __init__(self, scope: str, conn_id: str, table_prefix: str = "segexport_") -> None:
        if not _IDENTIFIER.match(table_prefix or "x"):
            raise ValueError(f"table_prefix must be a plain SQL identifier prefix; got {table_prefix!r}.")
        self.scope = scope
        self.path = None
        self._lock = threading.Lock()
        self._engine = _sqlalchemy_engine(conn_id)
        self.dialect = self._engine.dialect.name
        self.table = sa.Table(
            f"{table_prefix}refused_members", sa.MetaData(),
            sa.Column("scope", sa.String(500), primary_key=True),
            sa.Column("member", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("reason", sa.Text),
            sa.Column("refused_at", sa.Float),
        )
        for attempt in range(3):
            try:
                self.table.create(self._engine, checkfirst=True)
                break
            except sa.exc.DBAPIError:  # another worker created it between the check and the CREATE
                if attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))
        t = self.table
        with self._engine.connect() as conn:
            self.known = dict(conn.execute(sa.select(t.c.member, t.c.reason).where(t.c.scope == scope)).all())

    def _insert_ignoring_duplicates(self):
        t = self.table
        if self.dialect == "postgresql":
            return pg_insert(t).on_conflict_do_nothing(index_elements=[t.c.scope, t.c.member])
        if self.dialect == "sqlite":
            return sqlite_insert(t).on_conflict_do_nothing(index_elements=[t.c.scope, t.c.member])
        if self.dialect in ("mysql", "mariadb"):
            return mysql_insert(t).prefix_with("IGNORE")
        return None

    def _write(self, rows: list[tuple[str, int, str, float]]) -> None:
        rows = [dict(zip(("scope", "member", "reason", "refused_at"), row, strict=True)) for row in rows]
        stmt = self._insert_ignoring_duplicates()
        if stmt is not None:
            with self._engine.begin() as conn:
                for i in range(0, len(rows), LOOKUP_CHUNK):
                    conn.execute(stmt, rows[i: i + LOOKUP_CHUNK])
            return
        for row in rows:  # another dialect: one insert each, "already there" is fine
            try:
                with self._engine.begin() as conn:
                    conn.execute(sa.insert(self.table), [row])
            except sa.exc.IntegrityError:
                pass

    def discard_members(self, members: Iterable[int]) -> None:
        t = self.table
        with self._lock:
            gone = [m for m in members if self.known.pop(m, None) is not None]
            if not gone:
                return
            with self._engine.begin() as conn:
                for i in range(0, len(gone), LOOKUP_CHUNK):
                    conn.execute(sa.delete(t).where(t.c.scope == self.scope, t.c.member.in_(gone[i: i + LOOKUP_CHUNK])))

    def close(self) -> None:
        self._engine.dispose()


def open_refusal_store(scope: str, *, state_dir: str | Path | None = None,
                       state_conn_id: str | None = None) -> RefusalStore:
    """The refusals of ``scope`` where the export state is: the SQL connection ``state_conn_id`` if given, else a
    SQLite file in ``state_dir``."""
    if state_conn_id:
        return SqlRefusalStore(scope, state_conn_id)
    return RefusalStore(scope, state_dir)


LOOKUP_CHUNK = 500
"""Members per ``IN (...)`` list (lookups, seen, forget) and per write statement."""
ANALYZE_AFTER_WRITES = 10_000
"""PostgreSQL: refresh the state table's statistics at a segment's end when the run wrote this many rows."""


class StateSnapshot:
    """A segment's export state in flat arrays sorted by member (8 + 8 + 1 bytes a member), with a bucket
    index on the ids' top bits (members are uniform 64-bit hashes: about one per bucket, ~4 bytes more)."""

    def __init__(self, members: array, fingerprints: array, mine: bytearray) -> None:
        self.members, self.fingerprints, self.mine = members, fingerprints, mine
        n = len(members)
        self._shift = 64 - max(1, n.bit_length())
        # starts[b]: index of the first member whose top bits are >= b (members are signed: offset by 2**63)
        buckets = 1 << (64 - self._shift)
        tops = (np.frombuffer(members, np.int64).view(np.uint64) ^ np.uint64(_I64_OFFSET)) >> np.uint64(self._shift)
        counts = np.zeros(buckets + 1, np.int64)
        np.cumsum(np.bincount(tops.astype(np.int64), minlength=buckets), out=counts[1:])
        self._starts = array("q", counts.tobytes())

    @classmethod
    def from_rows(cls, chunks: Iterable[list[tuple[int, int, int]]]) -> StateSnapshot:
        members, fps, mine = array("q"), array("q"), bytearray()
        for chunk in chunks:
            members.extend([r[0] for r in chunk])
            fps.extend([r[1] for r in chunk])
            mine.extend([r[2] for r in chunk])
        if any(members[i] >= members[i + 1] for i in range(len(members) - 1)):  # the database's order
            order = sorted(range(len(members)), key=members.__getitem__)
            members = array("q", [members[i] for i in order])
            fps = array("q", [fps[i] for i in order])
            mine = bytearray(mine[i] for i in order)
        return cls(members, fps, mine)

    def __len__(self) -> int:
        return len(self.members)

    def lookup(self, members: Iterable[int], run_id: str) -> dict[int, tuple[int, str | None]]:
        """What :meth:`ExportStateBackend.lookup` answers (the run is ``run_id`` or None)."""
        out: dict[int, tuple[int, str | None]] = {}
        table, fps, mine, starts, shift = self.members, self.fingerprints, self.mine, self._starts, self._shift
        for m in members:
            b = (m + _I64_OFFSET) >> shift
            i, end = starts[b], starts[b + 1]
            while i < end:
                if table[i] == m:
                    out[m] = (fps[i], run_id if mine[i] else None)
                    break
                i += 1
        return out


_I64_OFFSET = 1 << 63


@dataclass(frozen=True)
class Watermark:
    """How far a segment's change column had got when its last complete export started.

    ``value`` is the column's highest value then, encoded by :func:`sources.encode_watermark`; ``salt``
    identifies the destination settings of that export (a change there makes every member due again)."""

    column: str
    value: str
    salt: bytes

    def as_dict(self) -> dict[str, str]:
        """JSON-ready (a deferred task carries it in its trigger event until the destination confirmed)."""
        return {"column": self.column, "value": self.value, "salt": self.salt.hex()}

    @classmethod
    def from_dict(cls, item: Mapping[str, Any]) -> Watermark:
        return cls(item["column"], item["value"], bytes.fromhex(item["salt"]))


class ExportStateBackend(ABC):
    """The interface the export engine uses; the semantics are the same in every backend.

    A *scope* is a destination connection + target (e.g. ``mailchimp:<conn>:<audience>``); each segment
    exported to it has a scope id. Per scope id, one row per member: its 64-bit id, the 64-bit
    fingerprint of the payload the destination confirmed, its destination key (to remove it when it
    leaves the segment), the run that last confirmed it and the run that last saw it. Methods are
    called from several threads at once (the reader thread: lookup/seen; sender threads:
    confirm/forget). Nothing loads the whole state into memory except :meth:`leavers`, which returns
    only the members that left, and :class:`ExportState`'s lookups (ids, fingerprints and runs: 20 bytes a
    member).
    """

    scope: str

    @abstractmethod
    def scope_id(self, segment: str) -> int:
        """The id of (scope, segment), created on first use (race-safe)."""

    @abstractmethod
    def last_count(self, scope_id: int) -> int | None:
        """Segment size recorded by the last export (None before the first one)."""

    @abstractmethod
    def member_count(self, scope_id: int) -> int:
        """Members with state (confirmed by the destination)."""

    @abstractmethod
    def set_last_count(self, scope_id: int, count: int, run_id: str) -> None: ...

    @abstractmethod
    def lookup(self, scope_id: int, members: list[int]) -> dict[int, tuple[int, str | None]]:
        """member -> (fingerprint, confirmed_run) for the members that have state."""

    @abstractmethod
    def seen(self, scope_id: int, members: list[int], run_id: str) -> None:
        """Mark members as seen (still in the segment, unchanged) by this run."""

    @abstractmethod
    def confirm(self, scope_id: int, rows: list[tuple[int, int, str]], run_id: str) -> None:
        """Remember what the destination confirmed: (member, fingerprint, destination key)."""

    def confirm_columns(self, scope_id: int, members: list[int], fps: list[int], keys: list[str],
                        run_id: str) -> None:
        """:meth:`confirm` with the batch in three columns (how the engine has it; a backend may keep them so)."""
        self.confirm(scope_id, list(zip(members, fps, keys, strict=True)), run_id)

    @abstractmethod
    def forget(self, scope_id: int, members: list[int]) -> None: ...

    @abstractmethod
    def leavers(self, scope_id: int, run_id: str) -> list[tuple[int, str]]:
        """Members confirmed earlier that this run did not see: (member, destination key)."""

    @abstractmethod
    def keys(self, scope_id: int, members: Sequence[int]) -> dict[int, str]:
        """member -> destination key, for the members that have state (a destination that confirms later
        journals its members with their keys when it queues them; their confirmation keeps the keys)."""

    @abstractmethod
    def watermark(self, scope_id: int) -> Watermark | None:
        """The change-column watermark the last complete export of the segment recorded (None: none)."""

    @abstractmethod
    def set_watermark(self, scope_id: int, watermark: Watermark, run_id: str) -> None:
        """Record the watermark after every row changed up to it was confirmed (or refused) by the
        destination."""

    @abstractmethod
    def target(self, scope_id: int) -> str | None:
        """The destination object the segment was last exported to, as the destination identified it (e.g. the
        ID of the marketing list it created), or None."""

    @abstractmethod
    def set_target(self, scope_id: int, value: str, run_id: str) -> None:
        """Remember the destination object of the segment (see :meth:`target`)."""

    def snapshot(self, scope_id: int, run_id: str) -> StateSnapshot:
        """Every member's (fingerprint, confirmed by ``run_id``?) of a segment, in memory (17 bytes a member),
        for the lookups of a delta run: one ordered read instead of an indexed query per chunk of rows."""
        return StateSnapshot.from_rows(self._ordered_rows(scope_id, run_id))

    def _ordered_rows(self, scope_id: int, run_id: str) -> Iterator[list[tuple[int, int, int]]]:
        """Chunks of (member, fingerprint, 1 if confirmed by ``run_id`` else 0), ordered by member."""
        raise NotImplementedError

    def flush(self, scope_id: int) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Called when a segment's batches are all answered, before :meth:`leavers`: backends that journal
        writes during the run fold the journal into the member table here."""

    @abstractmethod
    def close(self) -> None: ...


class ExportState(ExportStateBackend):
    """What each destination last confirmed, per (destination connection, target, segment).

    Per member: its id, the fingerprint of the payload the destination confirmed, its destination key
    (needed to remove it when it leaves the segment: the email for Mailchimp, the contact ID for
    Dynamics 365), the run that last confirmed it and the run that last saw it. SQLite in ``state_dir``
    (WAL, one writer; tasks on one machine).

    Members are kept in *pages*: rows of ``member_pages`` holding up to :data:`PAGE_MEMBERS` members
    sorted by id, each column packed in a blob (ids and fingerprints as 64-bit integers, runs as numbers
    of rows of ``runs``, destination keys NUL-terminated). Reading or rewriting a page is one row, not
    thousands, so folding a run into the state touches one row per page, not one per member.

    During a run, confirmations and "seen" marks are appended to the segment's journal, a SQLite file of its
    own beside the state file (one row per batch, one small transaction: a crash loses at most the batches in
    flight), and folded into the pages in one sorted pass (numpy) when the segment ends (:meth:`flush`), or by
    the next run if this one died; the folded journal file is then deleted (its copies of the destination keys
    go with it, without zeroing and committing its pages in the state file first).
    """

    def __init__(self, scope: str, state_dir: str | Path | None = None) -> None:
        self.scope = scope
        self.path, self._db = _open_sqlite(state_dir, "export_state.sqlite", timeout=60, isolation_level=None)
        self._lock = threading.Lock()
        _use_wal(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Deleted rows are zeroed in the state file (a forgotten address, a rewritten page, a folded journal must
        # not linger in it; Debian's SQLite does so by default, others do not).
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS scopes (id INTEGER PRIMARY KEY, scope TEXT NOT NULL, segment TEXT NOT NULL,
                last_count INTEGER, last_run TEXT, updated_at REAL, UNIQUE (scope, segment));
            CREATE TABLE IF NOT EXISTS member_pages (scope_id INTEGER NOT NULL, first INTEGER NOT NULL,
                count INTEGER NOT NULL, members BLOB NOT NULL, fingerprints BLOB NOT NULL, confirmed_runs BLOB NOT NULL,
                seen_runs BLOB NOT NULL, dest_keys BLOB NOT NULL, PRIMARY KEY (scope_id, first));
            CREATE TABLE IF NOT EXISTS watermarks (scope_id INTEGER PRIMARY KEY, column_name TEXT NOT NULL,
                value TEXT NOT NULL, salt BLOB NOT NULL, run TEXT);
            CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, run TEXT NOT NULL UNIQUE);
            CREATE TABLE IF NOT EXISTS targets (scope_id INTEGER PRIMARY KEY, value TEXT NOT NULL, run TEXT);
            """
        )
        self._numbers: dict[str, int] = {}  # run id -> its row in runs
        self._run_ids: dict[int, str] = {}  # and back
        self._opened: set[int] = set()  # scope ids folded by this instance (a dead run's journal, older rows)
        self._cache: dict[int, _Pages] = {}  # scope id -> its pages in memory, for lookups (until they change)
        # The worker threads' own connection to the state file (run numbers), and the segments' journal files.
        self._aux = sqlite3.connect(self.path, check_same_thread=False, timeout=60, isolation_level=None)
        self._aux.execute("PRAGMA synchronous=NORMAL")
        self._aux.execute("PRAGMA secure_delete=ON")
        self._journal_lock = threading.Lock()
        self._journals: dict[int, sqlite3.Connection] = {}  # scope id -> its journal file, open

    # -- runs: a member's runs are numbers (rows of ``runs``); the journal names them "#<n>"
    def _number(self, run_id: str, db: sqlite3.Connection | None = None) -> int:
        """The run's number (its row of ``runs``, created on first use), through ``db`` when the caller holds
        a transaction on it, else through the worker threads' connection."""
        number = self._numbers.get(run_id)
        if number is None:
            if db is None:
                with self._journal_lock:
                    return self._number(run_id, self._aux)
            db.execute("INSERT OR IGNORE INTO runs (run) VALUES (?)", (run_id,))
            number = db.execute("SELECT id FROM runs WHERE run = ?", (run_id,)).fetchone()[0]
            self._numbers[run_id], self._run_ids[number] = number, run_id
        return number

    def _run_id(self, number: int) -> str | None:
        if not number:
            return None
        run = self._run_ids.get(number)
        if run is None:
            with self._journal_lock:
                row = self._aux.execute("SELECT run FROM runs WHERE id = ?", (number,)).fetchone()
            run = self._run_ids[number] = row[0] if row else f"#{number}"
        return run

    def scope_id(self, segment: str) -> int:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO scopes (scope, segment) VALUES (?, ?)", (self.scope, segment))
            sid = self._db.execute("SELECT id FROM scopes WHERE scope = ? AND segment = ?",
                                   (self.scope, segment)).fetchone()[0]
        self._open(sid)
        return sid

    def _open(self, scope_id: int) -> None:
        """Fold what a run that died had journaled, once per instance."""
        if scope_id not in self._opened:
            self.flush(scope_id)
            self._opened.add(scope_id)

    # -- the journal: a SQLite file per segment beside the state file, deleted once folded
    def _journal_path(self, scope_id: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.journal-{scope_id}.sqlite")

    def _journal(self, scope_id: int, create: bool = True) -> sqlite3.Connection | None:
        """The segment's journal file (the caller holds the journal lock); None if there is none and
        ``create`` is false."""
        db = self._journals.get(scope_id)
        if db is None:
            path = self._journal_path(scope_id)
            if not create and not path.exists():
                return None
            db = sqlite3.connect(path, check_same_thread=False, timeout=60, isolation_level=None)
            _use_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS batches (run TEXT NOT NULL, members BLOB NOT NULL, "
                       "fingerprints BLOB, dest_keys BLOB)")
            self._journals[scope_id] = db
        return db

    def _append(self, scope_id: int, row: tuple) -> None:
        """One batch (run, members, fingerprints, keys) in the segment's journal: one implicit transaction,
        durable when the call returns."""
        with self._journal_lock:
            self._journal(scope_id).execute("INSERT INTO batches VALUES (?, ?, ?, ?)", row)

    def _drop_journal(self, scope_id: int) -> None:
        """Delete the segment's journal file (folded: what it holds is in the pages now)."""
        with self._journal_lock:
            db = self._journals.pop(scope_id, None)
            if db is not None:
                db.close()
            path = self._journal_path(scope_id)
            for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                leftover.unlink(missing_ok=True)

    def flush(self, scope_id: int) -> None:
        """Fold the segment's journal into its pages: one sorted pass, in one transaction; then delete the
        journal file (a crash in between folds it again next time: the same confirmations, the same pages)."""
        with self._lock:
            self._fold(scope_id)
            self._drop_journal(scope_id)

    def _fold(self, scope_id: int) -> None:
        with _transaction(self._db):
            parts = self._journaled(scope_id)
            if not parts:
                return
            marks = [p for p in parts if p.keys is None]
            confirmed = [p for p in parts if p.keys is not None and p.members.size]
            del parts
            confirmed[:0] = self._read_pages(scope_id)  # the segment's state so far, then the journal
            merged = _Merged.of(confirmed)
            for mark in marks:  # the "seen" marks, after the confirmations (as a run's own marks are)
                merged.mark_seen(mark.members, mark.number)
            self._db.execute("DELETE FROM member_pages WHERE scope_id = ?", (scope_id,))
            self._db.executemany("INSERT INTO member_pages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 ((scope_id, *page) for page in merged.pages(PAGE_MEMBERS)))
            del merged
            self._cache.pop(scope_id, None)

    def _journaled(self, scope_id: int) -> list[_Pages]:
        """What the segment's journal holds, in order: parts of confirmations (with keys) and of "seen" marks
        (keys None)."""
        with self._journal_lock:
            journal = self._journal(scope_id, create=False)
            batches = [] if journal is None else journal.execute(
                "SELECT run, members, fingerprints, dest_keys FROM batches ORDER BY rowid").fetchall()
        parts = []
        for run, members, fps, keys in batches:
            number = int(run[1:])  # "#<n>"
            if fps is None:
                parts.append(_Pages.seen_marks(np.frombuffer(members, np.int64), number))
            else:
                parts.append(_Pages.journaled(members, fps, keys, number))
        return parts

    def _read_pages(self, scope_id: int) -> list[_Pages]:
        return [_Pages.from_page(*row) for row in self._db.execute(
            "SELECT members, fingerprints, confirmed_runs, seen_runs, dest_keys FROM member_pages WHERE scope_id = ? "
            "ORDER BY first", (scope_id,))]

    def _pages(self, scope_id: int) -> _Pages:
        """The segment's ids, fingerprints and confirming runs in memory (20 bytes a member), for its lookups;
        kept until a flush or a forget changes the pages."""
        self._open(scope_id)
        pages = self._cache.get(scope_id)
        if pages is None:
            with self._lock:  # (a forget or a flush drops the cache under the lock too)
                # the keys are the last column: their overflow pages are not read
                rows = self._db.execute("SELECT members, fingerprints, confirmed_runs FROM member_pages "
                                        "WHERE scope_id = ? ORDER BY first", (scope_id,)).fetchall()
                pages = self._cache[scope_id] = _Pages(*(
                    np.concatenate([np.frombuffer(row[i], dtype) for row in rows]) if rows else np.empty(0, dtype)
                    for i, dtype in enumerate((np.int64, np.int64, _RUN))))
        return pages

    def last_count(self, scope_id: int) -> int | None:
        row = self._db.execute("SELECT last_count FROM scopes WHERE id = ?", (scope_id,)).fetchone()
        return row[0] if row else None

    def member_count(self, scope_id: int) -> int:
        self._open(scope_id)
        with self._lock:
            return self._db.execute("SELECT coalesce(sum(count), 0) FROM member_pages WHERE scope_id = ?",
                                    (scope_id,)).fetchone()[0]

    def set_last_count(self, scope_id: int, count: int, run_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE scopes SET last_count = ?, last_run = ?, updated_at = ? WHERE id = ?",
                             (count, run_id, time.time(), scope_id))

    def watermark(self, scope_id: int) -> Watermark | None:
        with self._lock:
            row = self._db.execute("SELECT column_name, value, salt FROM watermarks WHERE scope_id = ?",
                                   (scope_id,)).fetchone()
        return Watermark(row[0], row[1], bytes(row[2])) if row else None

    def set_watermark(self, scope_id: int, watermark: Watermark, run_id: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO watermarks VALUES (?, ?, ?, ?, ?)",
                             (scope_id, watermark.column, watermark.value, watermark.salt, run_id))

    def target(self, scope_id: int) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM targets WHERE scope_id = ?", (scope_id,)).fetchone()
        return row[0] if row else None

    def set_target(self, scope_id: int, value: str, run_id: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO targets VALUES (?, ?, ?)", (scope_id, value, run_id))

    def lookup(self, scope_id: int, members: list[int]) -> dict[int, tuple[int, str | None]]:
        """member -> (fingerprint, confirmed_run) for the members that have state."""
        pages = self._pages(scope_id)
        if not members or not pages.members.size:
            return {}
        wanted = np.fromiter(members, np.int64, len(members))
        at, found = pages.find(wanted)
        run_id = self._run_id
        return {m: (fp, run_id(run)) for m, fp, run in zip(wanted[found].tolist(),
                                                           pages.fingerprints[at[found]].tolist(),
                                                           pages.confirmed[at[found]].tolist(), strict=True)}

    def snapshot(self, scope_id: int, run_id: str) -> StateSnapshot:
        pages = self._pages(scope_id)
        mine = pages.confirmed == self._number(run_id)
        snapshot = StateSnapshot(_to_array(pages.members), _to_array(pages.fingerprints), bytearray(mine.tobytes()))
        self._cache.pop(scope_id, None)  # the snapshot answers the run's lookups (the memory is held once)
        return snapshot

    def seen(self, scope_id: int, members: list[int], run_id: str) -> None:
        if members:
            self._append(scope_id, (f"#{self._number(run_id)}", array("q", members).tobytes(), None, None))

    def confirm(self, scope_id: int, rows: list[tuple[int, int, str]], run_id: str) -> None:
        """Remember what the destination confirmed: (member, fingerprint, destination key)."""
        if rows:
            self.confirm_columns(scope_id, *zip(*rows, strict=True), run_id)

    def confirm_columns(self, scope_id: int, members: Sequence[int], fps: Sequence[int], keys: Sequence[str],
                        run_id: str) -> None:
        if not members:
            return
        if not len(members) == len(fps) == len(keys):
            raise ValueError("confirm_columns: members, fingerprints and keys differ in length")
        self._append(scope_id, (f"#{self._number(run_id)}", array("q", members).tobytes(), array("q", fps).tobytes(),
                                _pack_keys(keys)))

    def forget(self, scope_id: int, members: list[int]) -> None:
        if not members:
            return
        gone = np.unique(np.fromiter(members, np.int64, len(members)))
        with self._lock, _transaction(self._db):  # the pages holding them, rewritten without them
            firsts = np.fromiter((f for (f,) in self._db.execute(
                "SELECT first FROM member_pages WHERE scope_id = ? ORDER BY first", (scope_id,))), np.int64)
            if not firsts.size:
                return
            for first in np.unique(firsts[np.maximum(np.searchsorted(firsts, gone, "right") - 1, 0)]).tolist():
                row = self._db.execute("SELECT members, fingerprints, confirmed_runs, seen_runs, dest_keys FROM "
                                       "member_pages WHERE scope_id = ? AND first = ?", (scope_id, first)).fetchone()
                page = _Pages.from_page(*row)
                keep = ~np.isin(page.members, gone)
                if keep.all():
                    continue
                self._db.execute("DELETE FROM member_pages WHERE scope_id = ? AND first = ?", (scope_id, first))
                if keep.any():
                    self._db.executemany("INSERT INTO member_pages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                         ((scope_id, *p) for p in _Merged(page, np.flatnonzero(keep)).pages(PAGE_MEMBERS)))
            self._cache.pop(scope_id, None)

    def keys(self, scope_id: int, members: Sequence[int]) -> dict[int, str]:
        self._open(scope_id)
        if not members:
            return {}
        wanted = np.unique(np.fromiter(members, np.int64, len(members)))
        out: dict[int, str] = {}
        with self._lock:  # only the pages that may hold them
            firsts = np.fromiter((f for (f,) in self._db.execute(
                "SELECT first FROM member_pages WHERE scope_id = ? ORDER BY first", (scope_id,))), np.int64)
            if not firsts.size:
                return out
            for first in np.unique(firsts[np.maximum(np.searchsorted(firsts, wanted, "right") - 1, 0)]).tolist():
                ids, keys = self._db.execute("SELECT members, dest_keys FROM member_pages WHERE scope_id = ? AND "
                                             "first = ?", (scope_id, first)).fetchone()
                page = _Pages(np.frombuffer(ids, np.int64), keys=np.frombuffer(keys, np.uint8))
                at, found = page.find(wanted)
                at = at[found]
                out.update(zip(page.members[at].tolist(), page.keys_at(at), strict=True))
        return out

    def leavers(self, scope_id: int, run_id: str) -> list[tuple[int, str]]:
        """Members confirmed earlier that this run did not see: (member, destination key); a page at a time."""
        self._open(scope_id)
        number, out = self._number(run_id), []
        with self._lock:
            rows = self._db.execute("SELECT members, seen_runs, dest_keys FROM member_pages WHERE scope_id = ? "
                                    "ORDER BY first", (scope_id,))
            for members, seen, keys in rows:
                page = _Pages(np.frombuffer(members, np.int64), seen=np.frombuffer(seen, _RUN),
                              keys=np.frombuffer(keys, np.uint8))
                gone = np.flatnonzero(page.seen != number)
                out.extend(zip(page.members[gone].tolist(), page.keys_at(gone), strict=True))
        return out

    def close(self) -> None:
        with self._journal_lock:  # (a journal not folded yet stays for the next run)
            for db in self._journals.values():
                db.close()
            self._journals.clear()
        self._aux.close()
        self._db.close()


#: Members per row of ``member_pages`` (~400 KB a page with addresses as keys)
PAGE_MEMBERS = 8192


def _pack_keys(keys: Sequence[str]) -> bytes:
    """Destination keys as the journal keeps them: a NUL (the journal's format mark), then
    each key NUL-terminated."""
    joined = "\0".join(keys)
    if joined.count("\0") != len(keys) - 1:
        raise ValueError("a destination key holds a NUL character (the export state cannot keep it)")
    return b"\0" + joined.encode("utf-8") + b"\0"


def _to_array(values: np.ndarray) -> array:
    out = array("q")
    out.frombytes(values.tobytes())
    return out


class _Pages:
    """Members with their state in numpy columns: ids, fingerprints, the runs (numbers) that confirmed and last
    saw them, and their destination keys in one buffer of NUL-terminated UTF-8 keys, side by side in member
    order, with the position of each key's NUL (its start is the previous key's NUL + 1)."""

    __slots__ = ("members", "fingerprints", "confirmed", "seen", "keys", "ends", "number")

    def __init__(self, members: np.ndarray, fingerprints: np.ndarray | None = None,
                 confirmed: np.ndarray | None = None, seen: np.ndarray | None = None, keys: np.ndarray | None = None,
                 ends: np.ndarray | None = None, number: int = 0) -> None:
        self.members, self.fingerprints, self.confirmed, self.seen = members, fingerprints, confirmed, seen
        self.keys, self.number = keys, number  # keys None: "seen" marks of the run ``number``
        if keys is not None and ends is None:
            ends = np.flatnonzero(keys == 0).astype(np.int32 if keys.size < 2**31 else np.int64)
            if ends.size != members.size:
                raise ValueError(f"export state: {ends.size} destination keys for {members.size} members")
        self.ends = ends

    @classmethod
    def empty(cls) -> _Pages:
        none = np.empty(0, np.int64)
        runs = np.empty(0, _RUN)
        return cls(none, none, runs, runs, np.empty(0, np.uint8), none)

    @classmethod
    def seen_marks(cls, members: Any, number: int) -> _Pages:
        return cls(np.asarray(members, np.int64), number=number)

    @classmethod
    def journaled(cls, members: bytes, fps: bytes, keys: bytes, number: int) -> _Pages:
        ids = np.frombuffer(members, np.int64)
        runs = np.full(ids.size, number, _RUN)
        return cls(ids, np.frombuffer(fps, np.int64), runs, runs, np.frombuffer(keys, np.uint8, offset=1))

    @classmethod
    def from_page(cls, members: bytes, fps: bytes, confirmed: bytes, seen: bytes, keys: bytes) -> _Pages:
        return cls(np.frombuffer(members, np.int64), np.frombuffer(fps, np.int64), np.frombuffer(confirmed, _RUN),
                   np.frombuffer(seen, _RUN), np.frombuffer(keys, np.uint8))

    @classmethod
    def concat(cls, parts: list[_Pages]) -> _Pages:
        """The parts one after the other; the list is emptied, and each part's columns released as they are
        copied (a 1,000,000-member fold holds each byte once, not twice)."""
        if len(parts) == 1:
            return parts.pop()
        size, key_bytes = sum(p.members.size for p in parts), sum(p.keys.size for p in parts)
        ends = np.empty(size, np.int32 if key_bytes < 2**31 else np.int64)
        at = shift = 0
        for p in parts:
            ends[at:at + p.ends.size] = p.ends + shift
            at, shift, p.ends = at + p.ends.size, shift + p.keys.size, None
        columns = {}
        for name, dtype, n in (("members", np.int64, size), ("fingerprints", np.int64, size), ("confirmed", _RUN, size),
                               ("seen", _RUN, size), ("keys", np.uint8, key_bytes)):
            out = columns[name] = np.empty(n, dtype)
            at = 0
            for p in parts:
                column = getattr(p, name)
                out[at:at + column.size] = column
                at += column.size
                setattr(p, name, None)
        parts.clear()
        return cls(ends=ends, **columns)

    def find(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _find(self.members, wanted)

    def _starts(self, at: np.ndarray) -> np.ndarray:
        """Where the keys of the members at these places start (one past the previous key's NUL)."""
        return np.where(at > 0, self.ends[np.maximum(at - 1, 0)] + 1, 0)

    def key_blob(self, at: np.ndarray) -> bytes:
        """The keys of the members at these places, each NUL-terminated, in one blob."""
        ends, starts = self.ends[at], self._starts(at)
        if np.array_equal(starts[1:], ends[:-1] + 1):  # already side by side
            return self.keys[starts[0]:ends[-1] + 1].tobytes() if at.size else b""
        lengths = ends - starts + 1
        offsets = np.cumsum(lengths) - lengths
        return self.keys[np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))].tobytes()

    def keys_at(self, at: np.ndarray) -> list[str]:
        keys = self.keys
        return [keys[s:e].tobytes().decode("utf-8") for s, e in zip(self._starts(at).tolist(), self.ends[at].tolist(),
                                                                     strict=True)]


def _find(ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each wanted member is in ``ids`` (sorted), and whether it is there at all."""
    if not ids.size:
        return np.zeros(wanted.size, np.int64), np.zeros(wanted.size, bool)
    at = np.minimum(np.searchsorted(ids, wanted), ids.size - 1)
    return at, ids[at] == wanted


class _Merged:
    """The members of a :class:`_Pages` at the places ``at`` (sorted by member): their ids and "seen" runs
    taken out (the fold marks what a run saw), the other columns read a page at a time when written."""

    def __init__(self, source: _Pages, at: np.ndarray, members: np.ndarray | None = None) -> None:
        self.source, self.at = source, at
        self.members = source.members[at] if members is None else members
        self.seen = source.seen[at]  # a copy: the marks change it
        source.members = source.seen = None  # taken out: not read again

    @classmethod
    def of(cls, parts: list[_Pages]) -> _Merged:
        """One state of the parts, in order (the list is emptied): for a member in several, the last one wins."""
        if not parts:
            return cls(_Pages.empty(), np.empty(0, np.int64))
        source = _Pages.concat(parts)
        order = np.argsort(source.members, kind="stable")
        ordered = source.members[order]
        source.members = None  # (memory: the sorted copy is what is kept)
        last = np.ones(ordered.size, bool)
        last[:-1] = ordered[:-1] != ordered[1:]
        keep = order[last]
        del order
        return cls(source, keep, ordered[last])

    def mark_seen(self, members: np.ndarray, number: int) -> None:
        at, found = _find(self.members, members)
        self.seen[at[found]] = number

    def pages(self, size: int) -> Iterator[tuple]:
        """Rows of ``member_pages`` (without the scope id): first member, count and the packed columns."""
        source = self.source
        for lo in range(0, self.members.size, size):
            hi = min(lo + size, self.members.size)
            at = self.at[lo:hi]
            yield (int(self.members[lo]), hi - lo, self.members[lo:hi].tobytes(), source.fingerprints[at].tobytes(),
                   source.confirmed[at].tobytes(), self.seen[lo:hi].tobytes(), source.key_blob(at))


#: how run numbers are packed in pages
_RUN = np.int32


log = logging.getLogger(__name__)


def _chunks(items: Sequence, size: int = LOOKUP_CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")


class SqlConnectionExportState(ExportStateBackend):
    """The export state in two tables of an Airflow SQL connection (for multi-worker deployments).

    ``<table_prefix>scopes`` (one row per scope + segment) and ``<table_prefix>members`` (one row per
    member, primary key (scope_id, member)), created on first use. PostgreSQL is first-class; SQLite
    and MySQL/MariaDB work too (each with its native upsert); other dialects fall back to
    delete + insert in one transaction. The engine comes from the connection's hook
    (``DbApiHook.get_sqlalchemy_engine``) with a connection pool: every call takes one connection for
    one short transaction, so the engine's threads share it safely. Tasks exporting different
    segments touch different rows (row locks in PostgreSQL/MySQL) and never wait for each other.
    Writes go straight to the member table (500 rows per statement), so :meth:`flush` has nothing to do.
    """

    _UPDATED = ("fingerprint", "dest_key", "confirmed_run", "seen_run")

    def __init__(self, scope: str, conn_id: str, table_prefix: str = "segexport_") -> None:
        if not _IDENTIFIER.match(table_prefix or "x"):
            raise ValueError(f"table_prefix must be a plain SQL identifier prefix (letters, digits, _); "
                             f"got {table_prefix!r}.")
        self.scope = scope
        self.conn_id = conn_id
        self._engine = _sqlalchemy_engine(conn_id)
        self.dialect = self._engine.dialect.name
        metadata = sa.MetaData()
        self.scopes = sa.Table(
            f"{table_prefix}scopes", metadata,
            # SQLite only auto-increments an INTEGER PRIMARY KEY (64-bit there anyway).
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                      autoincrement=True),
            # 500 + 250 characters keep the unique key within MySQL's 3,072-byte limit (utf8mb4).
            sa.Column("scope", sa.String(500), nullable=False),
            sa.Column("segment", sa.String(250), nullable=False),
            sa.Column("last_count", sa.BigInteger),
            sa.Column("last_run", sa.String(250)),
            sa.Column("updated_at", sa.DateTime(timezone=True)),
            sa.UniqueConstraint("scope", "segment", name=f"{table_prefix}scopes_scope_segment_key"),
        )
        self.members = sa.Table(
            f"{table_prefix}members", metadata,
            sa.Column("scope_id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("member", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("fingerprint", sa.BigInteger, nullable=False),
            sa.Column("dest_key", sa.Text, nullable=False),
            sa.Column("confirmed_run", sa.String(250)),
            sa.Column("seen_run", sa.String(250)),
        )  # no other index: every query filters on scope_id, the primary key's first column
        self._create_tables(metadata)
        # The watermarks (change_column) came later: a role that may not create tables keeps working without
        # them; the table is created here when this role may, else the first change_column export says how.
        self.watermarks = sa.Table(
            f"{table_prefix}watermarks", sa.MetaData(),
            sa.Column("scope_id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("column_name", sa.String(250), nullable=False),
            sa.Column("value", sa.Text, nullable=False),
            sa.Column("salt", sa.LargeBinary(64), nullable=False),
            sa.Column("run", sa.String(250)),
        )
        self._watermarks_error: Exception | None = None
        try:
            self.watermarks.create(self._engine, checkfirst=True)
        except sa.exc.DBAPIError as exc:
            self._watermarks_error = exc
        # The destination objects (e.g. Dynamics 365 marketing lists) came later too: without the table (a role
        # that may not create it) a destination finds its objects by name instead.
        self.targets = sa.Table(
            f"{table_prefix}targets", sa.MetaData(),
            sa.Column("scope_id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("value", sa.Text, nullable=False),
            sa.Column("run", sa.String(250)),
        )
        try:
            self.targets.create(self._engine, checkfirst=True)
            self._has_targets = True
        except sa.exc.DBAPIError:
            self._has_targets = False
        self._confirm_stmt = self._upsert_statement()
        self._lookup_stmt = self._pg_lookup_statement() if self.dialect == "postgresql" else None
        self._written: dict[int, int] = {}  # rows confirmed or forgotten per scope id (see set_last_count)
        self._written_lock = threading.Lock()

    # -- set-up ------------------------------------------------------------------------------------
    def _create_tables(self, metadata: sa.MetaData) -> None:
        for attempt in range(3):
            try:
                metadata.create_all(self._engine, checkfirst=True)
                return
            except sa.exc.DBAPIError:
                # Another worker created a table between our check and our CREATE (PostgreSQL: "already
                # exists" or a pg_type unique violation): check again and create what is still missing.
                if attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _upsert_statement(self):
        m = self.members
        if self.dialect in ("postgresql", "sqlite"):
            stmt = (pg_insert if self.dialect == "postgresql" else sqlite_insert)(m)
            return stmt.on_conflict_do_update(index_elements=[m.c.scope_id, m.c.member],
                                              set_={c: stmt.excluded[c] for c in self._UPDATED})
        if self.dialect in ("mysql", "mariadb"):
            stmt = mysql_insert(m)
            return stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in self._UPDATED})
        return None  # any other dialect: delete + insert in one transaction

    def _pg_lookup_statement(self):
        """PostgreSQL: one primary-key probe per member, whatever the statistics say.

        With ``member IN (...)``, a planner that believes the scope is small (a table never analyzed, or a
        new scope in a big table, as in any first export) reads the scope's rows by ``scope_id`` alone and
        filters them: every lookup then reads all the members confirmed so far in this run (quadratic).
        A LATERAL subquery with LIMIT is never flattened into a join, so each member is an index probe on
        (scope_id, member)."""
        table = self._engine.dialect.identifier_preparer.quote(self.members.name)
        return sa.text(
            "SELECT u.member, m.fingerprint, m.confirmed_run FROM unnest(CAST(:members AS BIGINT[])) AS u(member) "
            f"CROSS JOIN LATERAL (SELECT fingerprint, confirmed_run FROM {table} "
            "WHERE scope_id = :scope_id AND member = u.member LIMIT 1) AS m")

    def _count_writes(self, scope_id: int, n: int) -> None:
        with self._written_lock:
            self._written[scope_id] = self._written.get(scope_id, 0) + n

    # -- interface -----------------------------------------------------------------------------------
    def scope_id(self, segment: str) -> int:
        s = self.scopes
        values = {"scope": self.scope, "segment": segment}
        query = sa.select(s.c.id).where(s.c.scope == self.scope, s.c.segment == segment)
        with self._engine.begin() as conn:
            # Two workers may create the same scope at once: insert-if-absent, then read whichever won.
            if self.dialect in ("postgresql", "sqlite"):
                conn.execute((pg_insert if self.dialect == "postgresql" else sqlite_insert)(s).values(**values)
                             .on_conflict_do_nothing(index_elements=[s.c.scope, s.c.segment]))
            elif self.dialect in ("mysql", "mariadb"):
                conn.execute(sa.insert(s).values(**values).prefix_with("IGNORE"))
            elif conn.execute(query).scalar() is None:
                try:
                    with conn.begin_nested():
                        conn.execute(sa.insert(s).values(**values))
                except sa.exc.IntegrityError:
                    pass  # a concurrent insert won the race
            return int(conn.execute(query).scalar_one())

    def last_count(self, scope_id: int) -> int | None:
        with self._engine.connect() as conn:
            value = conn.execute(sa.select(self.scopes.c.last_count).where(self.scopes.c.id == scope_id)).scalar()
        return int(value) if value is not None else None

    def member_count(self, scope_id: int) -> int:
        m = self.members
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(m).where(m.c.scope_id == scope_id))
                       .scalar_one())

    def set_last_count(self, scope_id: int, count: int, run_id: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(sa.update(self.scopes).where(self.scopes.c.id == scope_id)
                         .values(last_count=count, last_run=run_id, updated_at=datetime.now(UTC)))
        with self._written_lock:
            written = self._written.pop(scope_id, 0)
        if self.dialect == "postgresql" and written >= ANALYZE_AFTER_WRITES:
            self._analyze()

    def _check_watermarks_table(self) -> None:
        if self._watermarks_error is None:
            return
        try:  # created by another role since?
            self.watermarks.create(self._engine, checkfirst=True)
            self._watermarks_error = None
        except sa.exc.DBAPIError as exc:
            ddl = str(sa.schema.CreateTable(self.watermarks).compile(self._engine)).strip()
            raise RuntimeError(
                f"change_column needs the export state table {self.watermarks.name} in connection "
                f"'{self.conn_id}', and this connection may not create it ({type(exc.orig).__name__}). Create it "
                f"once as the tables' owner and grant SELECT, INSERT, UPDATE on it to this role:\n{ddl}"
            ) from exc

    def watermark(self, scope_id: int) -> Watermark | None:
        self._check_watermarks_table()
        w = self.watermarks
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(w.c.column_name, w.c.value, w.c.salt).where(w.c.scope_id == scope_id)).first()
        return Watermark(row[0], row[1], bytes(row[2])) if row else None

    def set_watermark(self, scope_id: int, watermark: Watermark, run_id: str) -> None:
        self._check_watermarks_table()
        w = self.watermarks
        values = {"column_name": watermark.column, "value": watermark.value, "salt": watermark.salt, "run": run_id}
        with self._engine.begin() as conn:  # one writer per segment at a time (the task): update, else insert
            if not conn.execute(sa.update(w).where(w.c.scope_id == scope_id).values(**values)).rowcount:
                conn.execute(sa.insert(w).values(scope_id=scope_id, **values))

    def target(self, scope_id: int) -> str | None:
        if not self._has_targets:
            return None
        t = self.targets
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(t.c.value).where(t.c.scope_id == scope_id)).first()
        return row[0] if row else None

    def set_target(self, scope_id: int, value: str, run_id: str) -> None:
        if not self._has_targets:
            return
        t = self.targets
        with self._engine.begin() as conn:  # one writer per segment at a time (the task): update, else insert
            if not conn.execute(sa.update(t).where(t.c.scope_id == scope_id).values(value=value, run=run_id)).rowcount:
                conn.execute(sa.insert(t).values(scope_id=scope_id, value=value, run=run_id))

    def _analyze(self) -> None:
        """Refresh the planner's statistics after a run wrote many rows (a segment's end, once per run).

        The next run's ``seen``/``forget`` (``member IN (...)``) are planned from them: with statistics
        that still show a new scope as tiny, each of those statements would read the whole scope.
        Autovacuum may not analyze soon enough (a new scope of 1,000,000 rows is under its 10 % threshold
        in a table of 20,000,000). ANALYZE samples a fixed number of rows (fast on big tables) and does
        not block reads or writes. Only the table's owner may run it: PostgreSQL skips it (a warning in the
        server log) for a role that was only granted SELECT, INSERT, UPDATE and DELETE."""
        try:
            with self._engine.begin() as conn:
                conn.execute(sa.text(f"ANALYZE {self._engine.dialect.identifier_preparer.quote(self.members.name)}"))
        except sa.exc.DBAPIError as exc:
            log.warning("Could not ANALYZE the export state table %s (%s); relying on autovacuum.",
                        self.members.name, exc)

    def _ordered_rows(self, scope_id: int, run_id: str) -> Iterator[list[tuple[int, int, int]]]:
        m = self.members
        query = (sa.select(m.c.member, m.c.fingerprint, m.c.confirmed_run).where(m.c.scope_id == scope_id)
                 .order_by(m.c.member))
        with self._engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=10_000).execute(query)
            for part in result.partitions():
                yield [(int(member), int(fp), 1 if run == run_id else 0) for member, fp, run in part]

    def lookup(self, scope_id: int, members: list[int]) -> dict[int, tuple[int, str | None]]:
        m = self.members
        out: dict[int, tuple[int, str | None]] = {}
        if not members:
            return out
        with self._engine.connect() as conn:
            for chunk in _chunks(members):
                if self._lookup_stmt is not None:
                    result = conn.execute(self._lookup_stmt, {"members": list(chunk), "scope_id": scope_id})
                else:
                    result = conn.execute(sa.select(m.c.member, m.c.fingerprint, m.c.confirmed_run)
                                          .where(m.c.scope_id == scope_id, m.c.member.in_(list(chunk))))
                for member, fp, run in result:
                    out[int(member)] = (int(fp), run)
        return out

    def seen(self, scope_id: int, members: list[int], run_id: str) -> None:
        m = self.members
        if not members:
            return
        with self._engine.begin() as conn:
            # In member order (as confirm and forget): concurrent writers lock rows in the same order.
            for chunk in _chunks(sorted(members)):  # one UPDATE ... WHERE member IN (...) per 500
                conn.execute(sa.update(m).where(m.c.scope_id == scope_id, m.c.member.in_(list(chunk)))
                             .values(seen_run=run_id))

    def confirm(self, scope_id: int, rows: list[tuple[int, int, str]], run_id: str) -> None:
        m = self.members
        if not rows:
            return
        with self._engine.begin() as conn:
            for chunk in _chunks(sorted(rows)):
                params = [{"scope_id": scope_id, "member": member, "fingerprint": fp, "dest_key": key,
                           "confirmed_run": run_id, "seen_run": run_id} for member, fp, key in chunk]
                if self._confirm_stmt is not None:
                    conn.execute(self._confirm_stmt, params)  # executemany: one statement per 500 rows
                else:
                    conn.execute(sa.delete(m).where(m.c.scope_id == scope_id,
                                                    m.c.member.in_([r[0] for r in chunk])))
                    conn.execute(sa.insert(m), params)
        self._count_writes(scope_id, len(rows))

    def forget(self, scope_id: int, members: list[int]) -> None:
        m = self.members
        if not members:
            return
        with self._engine.begin() as conn:
            for chunk in _chunks(sorted(members)):
                conn.execute(sa.delete(m).where(m.c.scope_id == scope_id, m.c.member.in_(list(chunk))))
        self._count_writes(scope_id, len(members))

    def leavers(self, scope_id: int, run_id: str) -> list[tuple[int, str]]:
        m = self.members
        q = (sa.select(m.c.member, m.c.dest_key)
             .where(m.c.scope_id == scope_id, sa.or_(m.c.seen_run.is_(None), m.c.seen_run != run_id)))
        with self._engine.connect() as conn:
            return [(int(member), key) for member, key in conn.execute(q)]

    def keys(self, scope_id: int, members: Sequence[int]) -> dict[int, str]:
        m = self.members
        out: dict[int, str] = {}
        with self._engine.connect() as conn:
            for chunk in _chunks(list(members)):
                for member, key in conn.execute(sa.select(m.c.member, m.c.dest_key)
                                                .where(m.c.scope_id == scope_id, m.c.member.in_(list(chunk)))):
                    out[int(member)] = key
        return out

    def close(self) -> None:
        self._engine.dispose()


def _sqlalchemy_engine(conn_id: str):
    """A pooled SQLAlchemy engine for an Airflow SQL connection (its hook must be a DbApiHook)."""
    from airflow.sdk import BaseHook

    hook = BaseHook.get_connection(conn_id).get_hook()
    if not hasattr(hook, "get_sqlalchemy_engine"):
        raise ValueError(f"Connection '{conn_id}' is not a SQL connection (its hook, {type(hook).__name__}, "
                         "has no SQLAlchemy engine); use e.g. a PostgreSQL connection for the export state.")
    probe = hook.get_sqlalchemy_engine()  # engines connect lazily: this opens nothing
    dialect = probe.dialect.name
    probe.dispose()
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if dialect == "sqlite":
        # Writers take turns (one database lock): wait for the lock instead of failing at once.
        kwargs["connect_args"] = {"timeout": 60}
    else:
        # The engine's sender threads (up to ~10) and its reader thread, each holding a connection
        # only for one short transaction.
        kwargs.update(pool_size=4, max_overflow=16, pool_timeout=120, pool_recycle=1800)
    engine = hook.get_sqlalchemy_engine(engine_kwargs=kwargs)
    if dialect == "postgresql":
        sa.event.listen(engine, "connect", _plan_each_statement)
    return engine


def _plan_each_statement(dbapi_connection, _record) -> None:
    """PostgreSQL: plan every statement with the current statistics.

    psycopg 3 prepares a statement run 5 times, and PostgreSQL may then keep a generic plan, made when
    the table (filled from empty by a first export) looked tiny, and such a plan reads the whole scope for
    each statement. ``force_custom_plan`` plans each execution (cheap for these
    statements)."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SET plan_cache_mode = force_custom_plan")  # PostgreSQL 12+
    except Exception:  # noqa: BLE001 - an older server: keep its default
        dbapi_connection.rollback()
    else:
        dbapi_connection.commit()  # SET is transactional: keep it past the pool's reset
    finally:
        cursor.close()


def open_export_state(scope: str, *, state_dir: str | Path | None = None,
                      state_conn_id: str | None = None) -> ExportStateBackend:
    """The export state of ``scope``: in the SQL connection ``state_conn_id`` if given (multi-worker
    deployments), else in a SQLite file in ``state_dir`` (default ``$AIRFLOW_HOME/segexport/state``)."""
    if state_conn_id:
        return SqlConnectionExportState(scope, state_conn_id)
    return ExportState(scope, state_dir)
