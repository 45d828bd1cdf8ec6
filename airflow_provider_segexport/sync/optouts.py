"""Opt-out status between Dynamics 365 contacts and Adobe Campaign profiles, in either or both directions.

Each run reads what changed on each side since its last run (Dynamics 365: contacts whose ``modifiedon`` is at
least the watermark; Campaign: profiles a ``lastModified`` custom filter finds), and compares each pair of
attributes (``donotbulkemail`` <-> ``blackListEmail`` by default) with the values both sides last agreed on (kept
in the export state):

- only one side's value changed since the last agreement: that side wins;
- nothing agreed yet (a first run, a new contact): the most recent change wins - Dynamics 365's ``modifiedon``
  (the record's last change, to the second; the attribute's own time would need auditing) against Campaign's
  ``lastModified`` (the profile's last change, to the millisecond), compared to the second - when it is an
  opt-out; a consent never wins on a time that may belong to another field; **on a tie the opt-out wins**;
- a value that did not change on its side never wins: no run turns an opt-out into a consent unless that side's
  own latest change says so.

In a one-way ``direction`` only that way is written; a decision the other way is reported and left. Each change
made is logged and listed in the summary with the side written and why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from airflow_provider_segexport.export.records import member_id
from airflow_provider_segexport.hooks.adobe_campaign import AdobeCampaignHook
from airflow_provider_segexport.hooks.dynamics365 import Dynamics365Hook

log = logging.getLogger(__name__)

DIRECTIONS = ("dynamics_to_campaign", "campaign_to_dynamics", "bidirectional")
DEFAULT_PAIRS = (("donotbulkemail", "blackListEmail"),)
#: profiles looked up one by one at most; beyond, every profile is read page by page (500 a call)
FIND_ONE_BY_ONE = 200
D365, ACS = "dynamics365", "campaign"
_NO_STATE = object()


@dataclass
class Side:
    """One record's opt-out values on one side and when the record last changed."""

    values: tuple[bool, ...]
    changed_at: datetime | None
    ref: Any = None  # what writing needs (a profile's href, a contact's id)


@dataclass
class Decision:
    """What to do with one contact."""

    contact: str
    winner: str | None  # D365, ACS or None (they agree)
    values: tuple[bool, ...]
    why: str


def decide(contact: str, d: Side | None, a: Side | None, agreed: tuple[bool, ...] | None) -> Decision | None:
    """The rule: a side whose value did not change since the last agreement never wins; when both changed, the
    most recent change wins (to the second), and on a tie the opt-out wins, attribute by attribute.

    :param contact: the contactid (for the report).
    :param d: Dynamics 365's values, or None when the contact is not there.
    :param a: Campaign's values, or None when no profile holds the contact.
    :param agreed: the values both sides last agreed on (None: never compared).
    """
    if d is None or a is None or d.values == a.values:
        return None
    d_moved = agreed is None or d.values != agreed
    a_moved = agreed is None or a.values != agreed
    if d_moved and not a_moved:
        return Decision(contact, D365, d.values, "only Dynamics 365 changed since the last sync")
    if a_moved and not d_moved:
        return Decision(contact, ACS, a.values, "only Campaign changed since the last sync")
    # Nothing agreed yet (a first run, a new contact) and the sides differ. A side's time is its record's last
    # change, not its opt-out's: the newer side wins when it holds the opt-out; a consent is never taken over an
    # opt-out on a time that may belong to another field; on a tie the opt-out wins.
    merged = tuple(x or y for x, y in zip(d.values, a.values, strict=True))
    dt, at = _second(d.changed_at), _second(a.changed_at)
    if dt is None or at is None or dt == at:
        return Decision(contact, "both", merged, "both changed at the same time: the opt-out wins")
    newer, older, name = (d, a, "Dynamics 365") if dt > at else (a, d, "Campaign")
    if newer.values == merged:
        return Decision(contact, D365 if newer is d else ACS, merged,
                        f"{name} changed last ({_stamp(newer.changed_at)} after {_stamp(older.changed_at)})")
    return Decision(contact, "both", merged, f"{name} changed last, but its consent may be older than the other "
                    "side's opt-out (no earlier agreement, and the time is the record's): the opt-out wins")


def encode(values: Iterable[bool]) -> int:
    """The values as the export state keeps them (bits, 0 reserved for "nothing agreed")."""
    out = 1
    for v in values:
        out = out << 1 | int(bool(v))
    return out


def decode(value: int, n: int) -> tuple[bool, ...] | None:
    """The values :func:`encode` kept, or None."""
    if not value or value >> n != 1:
        return None
    return tuple(bool(value >> (n - 1 - i) & 1) for i in range(n))


class OptOutSync:
    """One run of the opt-out sync.

    :param dynamics: the Dynamics 365 hook.
    :param campaign: the Adobe Campaign hook.
    :param state: an export state backend (the agreed values and both watermarks).
    :param direction: one of :data:`DIRECTIONS`.
    :param pairs: (Dynamics 365 attribute, Campaign field) pairs.
    :param key_field: the profile field holding the contactid; ``find``: its Campaign filter and parameter.
    :param changed_filter: the Campaign filter on ``lastModified`` (``>=``) and its parameter.
    :param dry_run: decide and report, write nothing.
    """

    def __init__(self, dynamics: Dynamics365Hook, campaign: AdobeCampaignHook, state: Any, *, direction: str,
                 pairs: Iterable[tuple[str, str]] = DEFAULT_PAIRS, key_field: str = "cusCrmId",
                 find: tuple[str, str] = ("byCrmId", "crmId"),
                 changed_filter: tuple[str, str] = ("byModifiedSince", "since"), run_id: str = "manual",
                 dry_run: bool = False, logger: Any = None) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        self.d, self.a, self.state = dynamics, campaign, state
        self.direction = direction
        self.pairs = tuple(tuple(p) for p in pairs)
        self.key_field, self.find, self.changed_filter = key_field, find, changed_filter
        self.run_id, self.dry_run = run_id, dry_run
        self.log = logger or log
        self.sid = state.scope_id("optouts")
        self.d_sid, self.a_sid = state.scope_id("optouts:dynamics365-watermark"), state.scope_id("optouts:campaign-watermark")
        # decisions the direction did not let a run write: compared again by every run (the watermarks moved past
        # their changes), so that a later run in a direction that writes them does
        self.p_sid = state.scope_id("optouts:not-written")

    # -- reading ------------------------------------------------------------------------------------------
    def _d_select(self) -> str:
        return ",".join(["contactid", "modifiedon", *(d for d, _ in self.pairs)])

    def _d_side(self, row: dict) -> Side:
        return Side(tuple(bool(row.get(d)) for d, _ in self.pairs), _parse(row.get("modifiedon")),
                    str(row["contactid"]).lower())

    def _a_side(self, profile: dict) -> Side:
        return Side(tuple(bool(profile.get(a)) for _, a in self.pairs), _parse(profile.get("lastModified")),
                    profile.get("href"))

    def read_changes(self) -> tuple[dict[str, Side], dict[str, Side], str | None, str | None]:
        """What changed on each side since the watermarks: (Dynamics 365 by contactid, Campaign by contactid,
        Dynamics 365's new watermark, Campaign's)."""
        d_since, a_since = self.state.target(self.d_sid), self.state.target(self.a_sid)
        params = {"$select": self._d_select()}
        if d_since:
            params["$filter"] = f"modifiedon ge {d_since}"
        d_changed: dict[str, Side] = {}
        d_high = d_since
        for row in self.d.paged("contacts", params):
            side = self._d_side(row)
            d_changed[side.ref] = side
            if row.get("modifiedon") and (d_high is None or row["modifiedon"] > d_high):
                d_high = row["modifiedon"]
        a_changed: dict[str, Side] = {}
        a_high = a_since
        f, p = self.changed_filter
        for profile in self.a.find_all("profile", f, {p: a_since or "1970-01-01 00:00:00.000Z"}):
            contact = str(profile.get(self.key_field) or "").lower()
            stamp = profile.get("lastModified")
            if stamp and (a_high is None or stamp > a_high):
                a_high = stamp
            if contact:  # a profile the contact sync did not make: not ours to compare
                a_changed[contact] = self._a_side(profile)
        return d_changed, a_changed, d_high, a_high

    def _other_sides(self, d_changed: dict[str, Side], a_changed: dict[str, Side]) -> None:
        """Complete each changed contact with the other side's current values."""
        missing_d = [c for c in a_changed if c not in d_changed]
        if missing_d:
            for row in self.d.contacts_where_in("contactid", missing_d, select=self._d_select()):
                side = self._d_side(row)
                d_changed[side.ref] = side
        missing_a = [c for c in d_changed if c not in a_changed]
        if len(missing_a) > FIND_ONE_BY_ONE:  # many: every profile read page by page costs fewer calls
            wanted = set(missing_a)
            f, p = self.changed_filter
            for profile in self.a.find_all("profile", f, {p: "1970-01-01 00:00:00.000Z"}):
                contact = str(profile.get(self.key_field) or "").lower()
                if contact in wanted:
                    a_changed[contact] = self._a_side(profile)
            return
        f, p = self.find
        for contact in missing_a:
            found = self.a.find("profile", f, p, contact)
            if len(found) == 1:
                a_changed[contact] = self._a_side(found[0])

    # -- the run --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Read both sides, decide, write what the direction allows, remember what was agreed; the summary."""
        d_changed, a_changed, d_high, a_high = self.read_changes()
        self.log.info("Opt-outs (%s): %d Dynamics 365 contact(s) and %d Campaign profile(s) changed since the last "
                      "run", self.direction, len(d_changed), len(a_changed))
        stored = json.loads(self.state.target(self.p_sid) or "[]")
        pending = [c for c in stored if c not in d_changed]
        if pending:  # decided earlier, not written in that run's direction: compared again
            self.log.info("Opt-outs: %d earlier decision(s) not written in their run's direction compared again",
                          len(pending))
            for row in self.d.contacts_where_in("contactid", pending, select=self._d_select()):
                side = self._d_side(row)
                d_changed[side.ref] = side
        self._other_sides(d_changed, a_changed)
        contacts = sorted(set(d_changed) & set(a_changed))
        agreed = self.state.lookup(self.sid, [member_id(c) for c in contacts]) if contacts else {}
        n = len(self.pairs)
        changes: list[dict] = []
        left: list[dict] = []
        confirm: list[tuple[int, int, str]] = []
        for contact in contacts:
            d, a = d_changed[contact], a_changed[contact]
            known = agreed.get(member_id(contact))
            decision = decide(contact, d, a, decode(known[0], n) if known else None)
            if decision is None:
                confirm.append((member_id(contact), encode(d.values), contact))
                continue
            writes = self._writes(decision, d, a)
            entry = {"contact": contact, "values": dict(zip([d for d, _ in self.pairs], decision.values, strict=True)),
                     "why": decision.why}
            if not writes:
                left.append({**entry, "not_written": f"the winner's side is not written in direction "
                                                    f"'{self.direction}'"})
                continue
            for side in writes:
                entry_side = {**entry, "written": side}
                changes.append(entry_side)
                self.log.info("Opt-out of contact %s: %s set to %s (%s)", contact,
                              "Campaign" if side == ACS else "Dynamics 365",
                              ", ".join(f"{k}={v}" for k, v in entry["values"].items()), decision.why)
                if not self.dry_run:
                    self._write(side, decision.values, d, a)
            confirm.append((member_id(contact), encode(decision.values), contact))
        if not self.dry_run:
            if confirm:
                self.state.confirm(self.sid, confirm, self.run_id)
                self.state.flush(self.sid)
            # the watermarks move only after everything read up to them was compared (and written)
            if d_high:
                self.state.set_target(self.d_sid, d_high, self.run_id)
            if a_high:
                self.state.set_target(self.a_sid, a_high, self.run_id)
            if left or stored:
                self.state.set_target(self.p_sid, json.dumps(sorted(e["contact"] for e in left)), self.run_id)
        summary = {"direction": self.direction, "dry_run": self.dry_run,
                   "read": {"dynamics365": len(d_changed), "campaign": len(a_changed), "compared": len(contacts)},
                   "changed": {"campaign": sum(1 for c in changes if c["written"] == ACS),
                               "dynamics365": sum(1 for c in changes if c["written"] == D365)},
                   "changes": changes[:1000], "not_written": left[:1000]}
        self.log.info("Opt-outs: %d change(s) written to Campaign, %d to Dynamics 365, %d decision(s) not written "
                      "(direction)", summary["changed"]["campaign"], summary["changed"]["dynamics365"], len(left))
        return summary

    def _writes(self, decision: Decision, d: Side, a: Side) -> list[str]:
        """The sides to write: those whose values differ from the decision, if the direction writes them."""
        out = []
        if d.values != decision.values and self.direction in ("campaign_to_dynamics", "bidirectional"):
            out.append(D365)
        if a.values != decision.values and self.direction in ("dynamics_to_campaign", "bidirectional"):
            out.append(ACS)
        return out

    def _write(self, side: str, values: tuple[bool, ...], d: Side, a: Side) -> None:
        if side == ACS:
            self.a.update(a.ref, {field: v for (_, field), v in zip(self.pairs, values, strict=True)})
        else:
            self.d.update_record("contacts", d.ref, {attr: v for (attr, _), v in zip(self.pairs, values, strict=True)})


def _parse(stamp: Any) -> datetime | None:
    """A Dataverse (``2024-01-01T12:00:00Z``) or Campaign (``2024-01-01 12:00:00.123Z``) time, in UTC."""
    if not stamp:
        return None
    text = str(stamp).strip().replace(" ", "T")
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _second(when: datetime | None) -> datetime | None:
    return when.replace(microsecond=0) if when is not None else None


def _stamp(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC") if when else "unknown"
