"""State kept between runs, outside the worker (tasks may run on any worker).

Today: the members a destination refused for good (permanently deleted, compliance state), so later
runs reject them up front instead of failing on them forever. A SQLite file in a configurable
directory (default ``$AIRFLOW_HOME/segexport/state``).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path


def default_state_dir() -> Path:
    """``$SEGEXPORT_STATE_DIR``, else ``$AIRFLOW_HOME/segexport/state``."""
    if os.environ.get("SEGEXPORT_STATE_DIR"):
        return Path(os.environ["SEGEXPORT_STATE_DIR"])
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return Path(home) / "segexport" / "state"


def member_digest(value: str) -> bytes:
    return hashlib.blake2b(value.strip().lower().encode("utf-8"), digest_size=16).digest()


class RefusalStore:
    """Members a destination (``scope``, e.g. ``mailchimp:<conn>:<audience>``) will never take back."""

    def __init__(self, scope: str, state_dir: str | Path | None = None) -> None:
        self.scope = scope
        directory = Path(state_dir) if state_dir else default_state_dir()
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "refusals.sqlite"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS refusals (scope TEXT NOT NULL, member BLOB NOT NULL, reason TEXT, "
            "refused_at REAL, PRIMARY KEY (scope, member)) WITHOUT ROWID"
        )
        self._db.commit()
        self._known = {
            bytes(m): r for m, r in self._db.execute("SELECT member, reason FROM refusals WHERE scope = ?", (scope,))
        }

    def get(self, email: str) -> str | None:
        return self._known.get(member_digest(email))

    def add(self, email: str, reason: str) -> None:
        digest = member_digest(email)
        with self._lock:
            if digest in self._known:
                return
            self._known[digest] = reason
            self._db.execute("INSERT OR REPLACE INTO refusals VALUES (?, ?, ?, ?)",
                             (self.scope, digest, reason, time.time()))
            self._db.commit()

    def __len__(self) -> int:
        return len(self._known)

    def close(self) -> None:
        self._db.close()


def _i64(data: bytes) -> int:
    return int.from_bytes(data, "big", signed=True)


def member_id(value: str) -> int:
    """64-bit id of a member's destination key (email lower-cased, or an ID)."""
    return _i64(hashlib.blake2b(value.strip().lower().encode("utf-8"), digest_size=8).digest())


def fingerprint(payload_json: bytes) -> int:
    """64-bit fingerprint of the mapped payload (canonical JSON)."""
    return _i64(hashlib.blake2b(payload_json, digest_size=8).digest())


class ExportState:
    """What each destination last confirmed, per (destination connection, target, segment).

    One row per member: its id, the fingerprint of the payload the destination confirmed, its
    destination key (needed to remove it when it leaves the segment: the email for Mailchimp, the
    contact ID for Dynamics 365), the run that last confirmed it and the run that last saw it.
    Lookups go batch by batch (no whole-state dict in memory), so 1,000,000 members per segment stay
    within a small memory budget. SQLite in ``state_dir`` (WAL, one writer; tasks on one machine).
    """

    def __init__(self, scope: str, state_dir: str | Path | None = None) -> None:
        self.scope = scope
        directory = Path(state_dir) if state_dir else default_state_dir()
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "export_state.sqlite"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS scopes (id INTEGER PRIMARY KEY, scope TEXT NOT NULL, segment TEXT NOT NULL,
                last_count INTEGER, last_run TEXT, updated_at REAL, UNIQUE (scope, segment));
            CREATE TABLE IF NOT EXISTS members (scope_id INTEGER NOT NULL, member INTEGER NOT NULL,
                fingerprint INTEGER NOT NULL, dest_key TEXT NOT NULL, confirmed_run TEXT, seen_run TEXT,
                PRIMARY KEY (scope_id, member)) WITHOUT ROWID;
            """
        )

    def scope_id(self, segment: str) -> int:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO scopes (scope, segment) VALUES (?, ?)", (self.scope, segment))
            return self._db.execute("SELECT id FROM scopes WHERE scope = ? AND segment = ?",
                                    (self.scope, segment)).fetchone()[0]

    def last_count(self, scope_id: int) -> int | None:
        row = self._db.execute("SELECT last_count FROM scopes WHERE id = ?", (scope_id,)).fetchone()
        return row[0] if row else None

    def member_count(self, scope_id: int) -> int:
        return self._db.execute("SELECT COUNT(*) FROM members WHERE scope_id = ?", (scope_id,)).fetchone()[0]

    def set_last_count(self, scope_id: int, count: int, run_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE scopes SET last_count = ?, last_run = ?, updated_at = ? WHERE id = ?",
                             (count, run_id, time.time(), scope_id))

    def lookup(self, scope_id: int, members: list[int]) -> dict[int, tuple[int, str | None]]:
        """member -> (fingerprint, confirmed_run) for the members that have state."""
        out: dict[int, tuple[int, str | None]] = {}
        for i in range(0, len(members), 500):
            chunk = members[i: i + 500]
            q = (f"SELECT member, fingerprint, confirmed_run FROM members WHERE scope_id = ? AND member IN "
                 f"({','.join('?' * len(chunk))})")
            with self._lock:
                for m, fp, run in self._db.execute(q, (scope_id, *chunk)):
                    out[m] = (fp, run)
        return out

    def seen(self, scope_id: int, members: list[int], run_id: str) -> None:
        with self._lock:
            self._db.executemany("UPDATE members SET seen_run = ? WHERE scope_id = ? AND member = ?",
                                 [(run_id, scope_id, m) for m in members])

    def confirm(self, scope_id: int, rows: list[tuple[int, int, str]], run_id: str) -> None:
        """Remember what the destination confirmed: (member, fingerprint, destination key)."""
        with self._lock:
            self._db.executemany(
                "INSERT INTO members (scope_id, member, fingerprint, dest_key, confirmed_run, seen_run) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (scope_id, member) DO UPDATE SET "
                "fingerprint = excluded.fingerprint, dest_key = excluded.dest_key, "
                "confirmed_run = excluded.confirmed_run, seen_run = excluded.seen_run",
                [(scope_id, m, fp, key, run_id, run_id) for m, fp, key in rows])

    def forget(self, scope_id: int, members: list[int]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM members WHERE scope_id = ? AND member = ?",
                                 [(scope_id, m) for m in members])

    def leavers(self, scope_id: int, run_id: str) -> list[tuple[int, str]]:
        """Members confirmed earlier that this run did not see: (member, destination key)."""
        with self._lock:
            return list(self._db.execute(
                "SELECT member, dest_key FROM members WHERE scope_id = ? AND (seen_run IS NULL OR seen_run != ?)",
                (scope_id, run_id)))

    def close(self) -> None:
        self._db.close()
