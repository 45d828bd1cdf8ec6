"""Plans: a dry run writes what it would do (JSON Lines: add, update, remove, reject, skip_consent), and a
later run applied with that plan sends and removes exactly what it lists, nothing more.

A plan holds member ids, fingerprints, row numbers and row keys: no profile data, no address.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any

from airflow_provider_segexport.export.destination import ExportError


class PlanWriter:
    """The dry run's plan, written to an ``ObjectStoragePath`` (opened on the first line; thread-safe).

    :param path: where the plan goes.
    """

    #: lines per write (a write through an object-storage path is costly per call; a dry run writes a line per
    #: member)
    buffer_lines = 2000

    def __init__(self, path: Any) -> None:
        self.path = path
        self.counts: Counter = Counter()
        self._fh = None
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def write(self, action: str, segment: str, **fields: Any) -> None:
        """One line of the plan.

        :param action: add, update, remove, reject or skip_consent.
        :param segment: the segment's name.
        :param fields: member, fp, row, key, reason (ids and keys only).
        """
        with self._lock:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = self.path.open("w", encoding="utf-8")
            self._lines.append(json.dumps({"action": action, "segment": segment, **fields}) + "\n")
            if len(self._lines) >= self.buffer_lines:
                self._fh.write("".join(self._lines))
                self._lines.clear()
            self.counts[action] += 1

    def close(self) -> None:
        """Write what is buffered and close the file."""
        with self._lock:
            if self._fh is not None:
                self._fh.write("".join(self._lines))
                self._lines.clear()
                self._fh.close()
                self._fh = None


class Plan:
    """A plan read back: what to send (segment, member) -> fingerprint, and what to remove per segment.

    :param send: (segment, member id) -> the fingerprint the dry run saw.
    :param remove: segment -> member ids to remove.
    """

    def __init__(self, send: dict[tuple[str, int], int], remove: dict[str, set[int]]) -> None:
        self.send = send
        self.remove = remove

    @classmethod
    def load(cls, path: Any) -> Plan:
        """Read a plan a dry run wrote.

        :param path: the plan's ``ObjectStoragePath``.
        """
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
        return cls(send, remove)
