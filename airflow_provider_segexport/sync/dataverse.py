"""A Dataverse table as a source of the export engine: the rows of an entity set, read page by page.

The sync of Dynamics 365 to Adobe Campaign reads its tables through this, so it gets the engine's delta (a row
is sent only when its mapped values changed), the ``modifiedon`` watermark (``changed_since`` becomes an OData
``$filter``: only the rows changed since the last complete run are read), resume, rejects and the summary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_segexport.export.sources import Source

#: a source column ``<attribute>@label`` is the attribute's formatted value (an option set's label...)
LABEL_SUFFIX = "@label"
FORMATTED = "@OData.Community.Display.V1.FormattedValue"


@dataclass
class DataverseSource(Source):
    """The rows of a Dataverse entity set.

    :param hook: a :class:`~airflow_provider_segexport.hooks.dynamics365.Dynamics365Hook`.
    :param entity_set: e.g. ``contacts`` or ``new_loyaltycards``.
    :param attributes: the columns the sync may read (``<attribute>@label`` for a formatted value).
    :param filter: an OData ``$filter`` choosing the rows (None: every row).
    :param since: only the rows whose ``since_column`` is at least this (set by :meth:`changed_since`).
    """

    hook: Any
    entity_set: str
    attributes: Sequence[str]
    filter: str | None = None
    since: Any = None
    since_column: str | None = None
    page_size: int = 5000
    #: the count pages through every key (Dataverse counts at most 5,000 with ``$count``): the export engine does
    #: not hold the first send for it when nothing needs it before sending
    counts_cheaply = False
    _count: int | None = field(default=None, repr=False)

    @property
    def description(self) -> str:
        where = f" where {self.filter}" if self.filter else ""
        return f"Dataverse {self.entity_set}{where}"

    def columns(self) -> list[str]:
        return list(self.attributes)

    def _filter(self) -> str | None:
        parts = []
        if self.filter:
            parts.append(f"({self.filter})")
        if self.since is not None:
            # an unquoted DateTimeOffset literal, as Dataverse (and Microsoft's client) write it
            parts.append(f"({self.since_column} ge {self.since} or {self.since_column} eq null)")
        return " and ".join(parts) or None

    def _params(self, select: list[str]) -> dict[str, str]:
        params = {"$select": ",".join(dict.fromkeys(a.removesuffix(LABEL_SUFFIX) for a in select))}
        where = self._filter()
        if where:
            params["$filter"] = where
        return params

    def count(self) -> int:
        """The rows the filter selects (their keys read: Dataverse counts at most 5,000 rows itself)."""
        if self._count is None:
            first = self.attributes[0].removesuffix(LABEL_SUFFIX)
            self._count = sum(1 for _ in self.hook.paged(self.entity_set, self._params([first]),
                                                         page_size=self.page_size))
        return self._count

    def changed_since(self, column: str, value: Any) -> DataverseSource:
        """The rows whose ``column`` (``modifiedon``) is at least ``value``, filtered in Dataverse."""
        return DataverseSource(self.hook, self.entity_set, self.attributes, self.filter, value, column,
                               self.page_size)

    def rows(self) -> Iterator[dict[str, Any]]:
        for values in self.tuples(list(self.attributes)):
            yield dict(zip(self.attributes, values, strict=True))

    def tuples(self, columns: list[str]) -> Iterator[tuple]:
        labels = any(c.endswith(LABEL_SUFFIX) for c in columns)
        keys = [c.removesuffix(LABEL_SUFFIX) + FORMATTED if c.endswith(LABEL_SUFFIX) else c for c in columns]
        for row in self.hook.paged(self.entity_set, self._params(columns), page_size=self.page_size,
                                   formatted=labels):
            yield tuple(row.get(k) for k in keys)

    def chunks(self, columns: list[str], size: int = 2000) -> Iterator[list[tuple]]:
        chunk: list[tuple] = []
        for row in self.tuples(columns):
            chunk.append(row)
            if len(chunk) >= size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
