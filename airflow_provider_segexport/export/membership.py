"""Which of an export's segments each member belongs to, known before anything is sent.

A destination that shows segment membership in one field per member (Campaign Monitor's multi-select
custom field) must send every segment a member is in each time it sends the member: such a field is
replaced as a whole. :class:`Membership` reads the member key column of every segment once (one column,
streamed) and keeps, per member id, a bit mask of the segments holding it: two flat numpy arrays
(16 bytes a member), looked up a chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from airflow_provider_segexport.export.records import member_id, normalize_email

#: segments one export can track in a member's bit mask
MAX_SEGMENTS = 64


class Membership:
    """Member id -> the names of the export's segments that hold the member.

    :param names: the segments, in export order (bit ``i`` of a mask is ``names[i]``).
    :param ids: member ids (:func:`~airflow_provider_segexport.export.records.member_id`), sorted.
    :param masks: each id's segment bit mask (same order as ``ids``).
    """

    def __init__(self, names: Sequence[str], ids: np.ndarray, masks: np.ndarray) -> None:
        self.names = list(names)
        self._ids = ids
        self._masks = masks
        self._named: dict[int, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self._ids)

    @classmethod
    def read(cls, segments: Sequence[Any], column: str, key_column: str, *,
             key: Callable[[Any], str | None] | None = None) -> Membership:
        """Read ``key_column`` and ``column`` of every segment and index who is where.

        As the export's dedupe rules it: an address belongs to the first row key (customer ID) that holds it
        in export order; a row of another key with the same address is a duplicate the export rejects, so it
        makes no one a member of its segment.

        :param segments: :class:`~airflow_provider_segexport.export.sources.Segment` objects (``name``, ``source``).
        :param column: the source column identifying a member at the destination (e.g. the email column).
        :param key_column: the source column identifying a row (the mapping's key column).
        :param key: turns a ``column`` value into the member's key, or None to leave the row out (default: the
            address as the validator keeps it; invalid addresses are left out, they are rejected anyway).
        """
        if len(segments) > MAX_SEGMENTS:
            raise ValueError(f"at most {MAX_SEGMENTS} segments per export can be tracked in one membership field; "
                             f"got {len(segments)}: split the export into several tasks")
        key = key or _email_key
        ids: list[int] = []
        owners: list[int] = []
        bits: list[int] = []
        for bit, seg in enumerate(segments):
            for chunk in seg.source.chunks([key_column, column]):
                for row_key, value in chunk:
                    k = key(value)
                    if k is not None:
                        ids.append(member_id(k))
                        owners.append(hash(str(row_key).strip()))
                        bits.append(bit)
        if not ids:
            return cls.of([s.name for s in segments], [], [])
        all_ids = np.asarray(ids, dtype=np.int64)
        all_owners = np.asarray(owners, dtype=np.int64)
        _, first, inverse = np.unique(all_ids, return_index=True, return_inverse=True)
        kept = all_owners == all_owners[first][inverse]  # rows of the address's first key
        masks = np.left_shift(np.uint64(1), np.asarray(bits, dtype=np.uint64)[kept])
        return cls.of([s.name for s in segments], [all_ids[kept]], [masks])

    @classmethod
    def of(cls, names: Sequence[str], ids: Iterable[np.ndarray], masks: Iterable[np.ndarray]) -> Membership:
        """Index from per-segment arrays of ids and masks (ids may repeat across segments: their masks are or-ed)."""
        all_ids = np.concatenate(list(ids) or [np.empty(0, np.int64)])
        all_masks = np.concatenate(list(masks) or [np.empty(0, np.uint64)])
        if not len(all_ids):
            return cls(names, all_ids, all_masks)
        order = np.argsort(all_ids, kind="stable")
        all_ids, all_masks = all_ids[order], all_masks[order]
        unique, start = np.unique(all_ids, return_index=True)
        return cls(names, unique, np.bitwise_or.reduceat(all_masks, start))

    def masks(self, members: Sequence[int]) -> np.ndarray:
        """The bit masks of ``members`` (0 for a member in no segment of the export)."""
        wanted = np.asarray(members, dtype=np.int64)
        if not len(self._ids):
            return np.zeros(len(wanted), dtype=np.uint64)
        at = np.searchsorted(self._ids, wanted)
        at[at >= len(self._ids)] = 0
        found = self._ids[at] == wanted
        return np.where(found, self._masks[at], np.uint64(0))

    def segments_of(self, mask: int) -> tuple[str, ...]:
        """The segment names of a bit mask, in export order."""
        named = self._named.get(mask)
        if named is None:
            named = self._named[mask] = tuple(n for i, n in enumerate(self.names) if mask >> i & 1)
        return named

    def lookup(self, members: Sequence[int]) -> list[tuple[str, ...]]:
        """The segment names each of ``members`` belongs to."""
        return [self.segments_of(int(m)) for m in self.masks(members)]


def _email_key(value: Any) -> str | None:
    email, problem = normalize_email(value)
    return None if problem else email
