"""How one Dynamics 365 table syncs to Adobe Campaign: its source, its target, the mappings (with their
apply-updates switch and replacements), the filter, the matching key, the link to the profile and what happens
to deactivated and deleted records. Built from a plain dict (what a DAG keeps next to it, e.g. in YAML).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ON_DELETE = ("ignore", "unlink", "delete")
#: the source columns every sync reads besides the mapped ones
STATE, MODIFIED = "statecode", "modifiedon"


class SyncConfigError(ValueError):
    """A table's sync configuration is not usable; the message names the table and the setting."""


@dataclass(frozen=True)
class Mapping:
    """One Dynamics 365 attribute -> one Campaign field.

    :param source: the attribute (``firstname``, a lookup's ``_x_value``...).
    :param target: the Campaign field (``firstName``, ``cusTier``...).
    :param apply_updates: written on every change (True) or only when Campaign's record is created (False).
    :param label: send the attribute's formatted value (an option set's label) instead of its value.
    :param replace: value map applied to what is sent (e.g. ``{True: "yes", False: "no"}``, ``{1: "Gold"}``);
        a value not in it is sent as it is.
    """

    source: str
    target: str
    apply_updates: bool = True
    label: bool = False
    replace: dict = field(default_factory=dict)

    @property
    def column(self) -> str:
        """The source column read for it (``<attribute>@label`` for a formatted value)."""
        return f"{self.source}@label" if self.label else self.source

    def value(self, raw: Any) -> Any:
        """What Campaign gets for the attribute's value (replacements applied)."""
        if not self.replace:
            return raw
        # a map written in JSON (a DAG param, a JSON file) has string keys: "1", "true", "null"
        json_spelling = "null" if raw is None else str(raw).lower() if isinstance(raw, bool) else raw
        for probe in (raw, json_spelling, str(raw)):
            try:
                if probe in self.replace:
                    return self.replace[probe]
            except TypeError:  # an unhashable value
                break
        return raw


@dataclass(frozen=True)
class TableSync:
    """One table's sync.

    :param name: the table's name in logs, the summary and the export state (e.g. ``contacts``).
    :param entity_set: the Dataverse entity set (``contacts``, ``new_loyaltycards``).
    :param key: its primary key attribute (``contactid``, ``new_loyaltycardid``).
    :param target: ``profile`` or a custom resource linked to the profile (``cusLoyaltyCard``).
    :param target_key: the Campaign field holding the Dynamics 365 key (``cusCrmId``, ``cusCardId``).
    :param find: the Campaign custom filter that finds a record by ``target_key``: ``{"filter": "byCrmId",
        "param": "crmId"}`` (created by the customer in Campaign: Adobe asks integrations not to keep PKeys).
    :param mappings: the attribute mappings.
    :param filter: an OData ``$filter``: which records sync.
    :param link: for a custom resource row that references a contact: ``{"attribute": "_new_contactid_value",
        "find": {"filter": "byCrmId", "param": "crmId"}}`` (how the profile of that contact is found), optionally
        ``"profile_key": "cusCrmId"`` (the profile field the filter searches: with it, a run linking many rows
        reads the profiles once instead of one lookup per contact).
    :param on_delete: what a deactivated or deleted source record does in Campaign: ``ignore`` (counted and
        logged), ``unlink`` (``unlink_field`` set to true) or ``delete`` (the Campaign record deleted).
    :param unlink_field: the Campaign boolean field ``unlink`` sets (and clears when the record returns).
    """

    name: str
    entity_set: str
    key: str
    target: str
    target_key: str
    find: dict[str, str]
    mappings: tuple[Mapping, ...]
    filter: str | None = None
    link: dict[str, Any] | None = None
    on_delete: str = "ignore"
    unlink_field: str | None = None

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> TableSync:
        """A table's sync from its configuration dict (see the README's example)."""
        name = spec.get("name") or spec.get("entity_set")
        where = f"Sync table '{name}'"
        missing = [k for k in ("name", "entity_set", "key", "target", "target_key", "find", "mappings") if not spec.get(k)]
        if missing:
            raise SyncConfigError(f"{where}: missing {', '.join(missing)}.")
        find = dict(spec["find"])
        if not find.get("filter") or not find.get("param"):
            raise SyncConfigError(f"{where}: 'find' needs the Campaign filter's name and parameter, e.g. "
                                  '{"filter": "byCrmId", "param": "crmId"}.')
        mappings = []
        for source, target in dict(spec["mappings"]).items():
            m = {"target": target} if isinstance(target, str) else dict(target)
            if "field" in m:
                m["target"] = m.pop("field")
            if not m.get("target"):
                raise SyncConfigError(f"{where}: the mapping of '{source}' names no Campaign field.")
            unknown = set(m) - {"target", "apply_updates", "label", "replace"}
            if unknown:
                raise SyncConfigError(f"{where}: the mapping of '{source}' has unknown setting(s) {sorted(unknown)}.")
            mappings.append(Mapping(source, m["target"], bool(m.get("apply_updates", True)), bool(m.get("label")),
                                    dict(m.get("replace") or {})))
        targets = [m.target for m in mappings]
        if len(set(targets)) != len(targets) or spec["target_key"] in targets:
            raise SyncConfigError(f"{where}: each Campaign field may be mapped once (and not the key field "
                                  f"'{spec['target_key']}', which the sync fills).")
        on_delete = spec.get("on_delete", "ignore")
        if on_delete not in ON_DELETE:
            raise SyncConfigError(f"{where}: on_delete must be one of {ON_DELETE}, not {on_delete!r}.")
        if on_delete == "unlink" and not spec.get("unlink_field"):
            raise SyncConfigError(f"{where}: on_delete 'unlink' needs unlink_field (a Campaign boolean field).")
        link = spec.get("link")
        if link and (not link.get("attribute") or not (link.get("find") or {}).get("filter")):
            raise SyncConfigError(f"{where}: 'link' needs the lookup 'attribute' and the profile's 'find' filter.")
        return cls(name=str(name), entity_set=spec["entity_set"], key=spec["key"], target=spec["target"],
                   target_key=spec["target_key"], find=find, mappings=tuple(mappings), filter=spec.get("filter"),
                   link=dict(link) if link else None, on_delete=on_delete, unlink_field=spec.get("unlink_field"))

    @property
    def columns(self) -> list[str]:
        """The source columns read: the key, the mapped attributes, the link, the state and the change time."""
        cols = [self.key, *(m.column for m in self.mappings)]
        if self.link:
            cols.append(self.link["attribute"])
        return list(dict.fromkeys([*cols, STATE, MODIFIED]))
