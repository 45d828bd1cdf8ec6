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
