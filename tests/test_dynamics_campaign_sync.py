"""The Dynamics 365 -> Adobe Campaign sync runs as the example DAG (dag.test()) against both emulators over HTTPS:
real msal tokens from the sandbox's Entra ID, real IMS tokens from its Adobe IMS."""

from __future__ import annotations

import json

import pytest
import requests

from airflow_provider_segexport import warehouse
from tests.conftest import connect_sync, refreshed_warehouse, run_dag

DAG_ID = "dynamics_campaign_sync"
PROFILES = 400


@pytest.fixture(scope="module")
def wh_path(tmp_path_factory):
    return refreshed_warehouse(tmp_path_factory.mktemp("wh") / "warehouse.db", PROFILES)


class Dataverse:
    """Changes made in Dynamics 365 by a person (through the Web API, with a token of its own)."""

    def __init__(self, sandbox) -> None:
        info = sandbox.info["dynamics365"]
        self.verify = sandbox.info["ca_bundle"]
        self.api = info["base_url"] + "/api/data/v9.2"
        token = requests.post(f"{info['authority']}/oauth2/v2.0/token", data={
            "grant_type": "client_credentials", "client_id": info["client_id"], "client_secret": info["client_secret"],
            "scope": info["base_url"] + "/.default"}, verify=self.verify, timeout=30).json()["access_token"]
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    def get(self, path: str, **params) -> list[dict]:
        r = requests.get(f"{self.api}/{path}", params=params, headers=self.headers, verify=self.verify, timeout=30)
        r.raise_for_status()
        return r.json()["value"]

    def patch(self, path: str, body: dict) -> None:
        requests.patch(f"{self.api}/{path}", json=body, headers=self.headers, verify=self.verify,
                       timeout=30).raise_for_status()

    def delete(self, path: str) -> None:
        requests.delete(f"{self.api}/{path}", headers=self.headers, verify=self.verify, timeout=30).raise_for_status()


@pytest.fixture
def both(sandbox, wh_path, monkeypatch, tmp_path):
    """Dataverse seeded with the warehouse's contacts (and sample loyalty cards); Campaign with the unlink field
    (the warehouse's seed);
    the two connections; a state directory of the test's own."""
    sandbox.session.post(f"{sandbox.admin}/seed", json=warehouse.sandbox_seed(wh_path), timeout=120).raise_for_status()
    connect_sync(sandbox, monkeypatch)  # the opt-out sync writes to Dynamics 365 too
    monkeypatch.setenv("SEGEXPORT_STATE_DIR", str(tmp_path / "state"))
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30).raise_for_status()
    return Dataverse(sandbox)


def profiles(sandbox) -> dict[str, dict]:
    """Campaign's profiles by the contactid they carry."""
    return {p["cusCrmId"]: p for p in sandbox.state("adobe_campaign")["profiles"].values() if p.get("cusCrmId")}


def cards(sandbox) -> dict[str, dict]:
    return {r["cusCardId"]: r for r in sandbox.state("adobe_campaign")["custom_resource"]["cusLoyaltyCard"]}


def sync(conf: dict | None = None):
    state, xcom = run_dag(DAG_ID, conf or {}, bundle="dags", retries=0)
    assert state == "success"
    return xcom


def calls(sandbox, vendor: str = "adobe_campaign") -> dict[str, int]:
    counts = sandbox.requests()["counts"]
    sandbox.session.delete(f"{sandbox.admin}/requests", timeout=30).raise_for_status()
    return {k.split(" ", 1)[1]: v for k, v in counts.items() if k.startswith(vendor + " ")}


def test_contacts_become_profiles_and_cards_linked_rows(airflow_db, both, sandbox):
    xcom = sync()
    contacts = {c["contactid"]: c for c in both.get("contacts", **{
        "$select": "contactid,emailaddress1,firstname,lastname,statecode", "$filter": "emailaddress1 ne null"})}
    got = profiles(sandbox)
    active = {k for k, c in contacts.items() if c["statecode"] == 0}
    s = xcom["sync_contacts"]["totals"]
    # a first name over Campaign's 30 characters: Campaign refuses that record, a reject with its words
    rejected = {json.loads(line)["key"]: json.loads(line) for line in open(
        xcom["sync_contacts"]["rejects"]["path"].removeprefix("file://"), encoding="utf-8")}
    assert all("value too long" in r["vendor_message"] for r in rejected.values())
    assert s["rejected"] == len(rejected) == sum(1 for c in active if len(contacts[c]["firstname"] or "") > 30)
    # every active contact the filter selects, once (an inactive one is not created)
    assert set(got) == active - set(rejected)
    for cid in active - set(rejected):
        p, c = got[cid], contacts[cid]
        assert (p["email"], p["firstName"], p["lastName"]) == (c["emailaddress1"], c["firstname"] or "",
                                                              c["lastname"] or "")
        assert not p.get("cusCrmUnlinked")
    assert s["created"] == len(active) - len(rejected)
    # a first sync reads Campaign's profiles once (a count, then pages of 1,000) instead of one lookup a contact:
    # one call per record sent, and a handful besides
    assert s["rows"] > 100 and xcom["sync_contacts"]["http"]["requests"] <= s["created"] + s["rejected"] + 3
    # the cards: one row per card, linked to its contact's profile, the option set's label as the tier
    dv_cards = both.get("new_loyaltycards", **{"$select": "new_loyaltycardid,new_cardnumber,new_points,"
                                                          "_new_contactid_value", "$filter": "statecode eq 0"})
    rows = cards(sandbox)
    linked = [c for c in dv_cards if c["_new_contactid_value"] in got]  # a card of a contact not synced: a reject
    assert set(rows) == {c["new_loyaltycardid"] for c in linked}
    for c in linked:
        row = rows[c["new_loyaltycardid"]]
        assert row["cusCardNumber"] == c["new_cardnumber"] and row["cusPoints"] == c["new_points"]
        assert row["cusTier"] in ("Bronze", "Silver", "Gold", "Platinum")
        assert row["profile"] == got[c["_new_contactid_value"]]["PKey"]  # linked to the contact's profile
    # the profiles the cards link to were read once (link.profile_key), not looked up a card at a time: the
    # cards' count and page, the profiles' count and page, one create a card (a card refused for its link
    # makes no call, one Campaign refuses does)
    c = xcom["sync_loyalty_cards"]
    assert 4 + c["totals"]["created"] <= c["http"]["requests"] <= 4 + c["totals"]["created"] + c["totals"]["rejected"]


def test_incremental_sends_only_what_changed_and_overwrites_campaign_edits(airflow_db, both, sandbox, task_log):
    first = sync()
    refused = first["sync_contacts"]["totals"]["rejected"]
    calls(sandbox)
    # nothing changed: nothing is written to Campaign but the records it refused, tried again (and refused again)
    again = sync()
    sent = calls(sandbox)
    writes = {k: v for k, v in sent.items() if k.startswith(("POST", "PATCH", "DELETE")) and "token" not in k}
    assert writes == ({"POST profileAndServicesExt/profile": refused} if refused else {}), sent
    assert again["sync_contacts"]["totals"]["created"] == again["sync_contacts"]["totals"]["updated"] == 0
    got = profiles(sandbox)
    cid = next(k for k, p in got.items() if not p.get("cusCrmUnlinked") and p["lastName"])
    pkey = got[cid]["PKey"]
    # marketing edits the synced last name and the create-only phone in Campaign
    acs = sandbox.info["adobe_campaign"]
    token = requests.post(acs["ims_url"], data={"grant_type": "client_credentials", "client_id": acs["client_id"],
                                                "client_secret": acs["client_secret"], "scope": acs["scope"]},
                          verify=sandbox.info["ca_bundle"], timeout=30).json()["access_token"]
    requests.patch(f"{acs['base_url']}/profileAndServicesExt/profile/{pkey}",
                   json={"lastName": "EditedInCampaign", "phone": "+33 1 00 00 00 00"},
                   headers={"Authorization": f"Bearer {token}", "X-Api-Key": acs["client_id"]},
                   verify=sandbox.info["ca_bundle"], timeout=30).raise_for_status()
    # a seller changes the first name in Dynamics 365
    both.patch(f"contacts({cid})", {"firstname": "Renamed"})
    task_log()
    calls(sandbox)
    xcom = sync()
    p = profiles(sandbox)[cid]
    assert p["firstName"] == "Renamed", json.dumps(xcom["sync_contacts"])
    assert p["lastName"] != "EditedInCampaign"  # Dynamics 365 is the source of truth: set back, and said so
    assert p["phone"] == "+33 1 00 00 00 00"  # apply_updates off: Campaign's value stays
    assert "set to Dynamics 365's" in task_log()
    assert xcom["sync_contacts"]["totals"]["updated"] == 1
    assert xcom["sync_contacts"]["sync"]["fields_overwritten"] == 2  # the first and the last name
    sent = calls(sandbox)
    writes = {k: v for k, v in sent.items() if k.startswith(("PATCH", "DELETE"))}
    assert sum(writes.values()) == 1, writes  # one PATCH: the changed contact, nothing else
    # one change: looked up by its key (not the whole table read): the count, the lookup, the PATCH (and a lookup
    # and a create for each record Campaign refused before, tried again)
    assert xcom["sync_contacts"]["http"]["requests"] == 3 + 2 * refused, sent


def test_deactivated_and_deleted_contacts_are_unlinked_and_replay_resends_once(airflow_db, both, sandbox):
    sync()
    got = profiles(sandbox)
    live = [k for k, p in got.items() if not p.get("cusCrmUnlinked")]
    deactivated, deleted = live[0], live[1]
    both.patch(f"contacts({deactivated})", {"statecode": 1})
    both.delete(f"contacts({deleted})")
    xcom = sync({"detect_deletions": True})
    got = profiles(sandbox)
    assert got[deactivated]["cusCrmUnlinked"] is True
    assert got[deleted]["cusCrmUnlinked"] is True
    s = xcom["sync_contacts"]
    assert s["totals"]["removed"] == 2 and s["sync"]["deactivated"] == 1 and s["sync"]["deleted_in_source"] == 1
    # the deleted contact's card lost its link (Dataverse clears the lookup): the row is kept, unlinked
    calls(sandbox)
    xcom = sync({"replay": True, "tables": ["contacts"]})
    t = xcom["sync_contacts"]["totals"]
    assert t["skipped"] == 0 and t["created"] == 0  # every record sent once, none created twice
    assert len(profiles(sandbox)) == len(got)
    assert "sync_loyalty_cards" not in xcom  # not chosen: skipped


def test_replacements_written_in_json_match_like_python_ones():
    """A replacement map from JSON (a DAG param, a JSON file: string keys) maps like the same map in Python: a
    cleared gender gets "unknown" instead of a null that Campaign's enumeration refuses."""
    import json as _json

    from airflow_provider_segexport.sync.tables import Mapping

    for python, probes, want in (({1: "male", 2: "female", None: "unknown"}, (1, 2, None, 3),
                                  ["male", "female", "unknown", 3]),
                                 ({True: "yes", False: "no"}, (True, False, None), ["yes", "no", None])):
        from_json = _json.loads(_json.dumps(python))
        assert all(isinstance(k, str) for k in from_json)
        for replace in (python, from_json):
            m = Mapping("source", "target", replace=replace)
            assert [m.value(v) for v in probes] == want, replace


def test_the_state_in_a_sql_connection_when_the_variable_names_one(airflow_db, both, sandbox, monkeypatch, tmp_path):
    """With the Variable segexport_state_conn_id (as docker-compose.yaml sets it), every task of the DAG keeps its
    state in that SQL connection (watermarks, sent records, the events cursor, agreed opt-outs): nothing in the
    state folder, and a second run sends nothing."""
    import sqlite3

    db = tmp_path / "shared-state.db"
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_STATE", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    monkeypatch.setenv("AIRFLOW_VAR_SEGEXPORT_STATE_CONN_ID", "sync_state")
    first = sync()
    assert first["sync_contacts"]["totals"]["created"] > 100
    again = sync()
    assert again["sync_contacts"]["totals"]["created"] == again["sync_contacts"]["totals"]["updated"] == 0
    state_dir = tmp_path / "state"
    assert not state_dir.exists() or not any(state_dir.rglob("*.sqlite")), list(state_dir.rglob("*"))
    with sqlite3.connect(db) as conn:
        scopes = {r[0] for r in conn.execute("SELECT scope FROM segexport_scopes")}
        watermarks = conn.execute("SELECT COUNT(*) FROM segexport_watermarks").fetchone()[0]
    assert any(s.startswith("dynamics365-campaign:") for s in scopes) and any("optouts" in s or "campaign-events" in s
                                                                              for s in scopes), scopes
    assert watermarks >= 2  # contacts and loyalty cards


def test_the_segment_source_parameters_are_refused_not_ignored():
    """The sync reads Dataverse: a segment export's sql/path given to it is an error, and the task's rendered
    fields (the Airflow UI) list no sql or path."""
    from airflow_provider_segexport.operators.dynamics_campaign_sync import DynamicsToCampaignSyncOperator
    from dags.dynamics_campaign_sync import SYNC_TABLES

    with pytest.raises(TypeError, match="sql, sql_conn_id do"):
        DynamicsToCampaignSyncOperator(task_id="t", table=SYNC_TABLES["contacts"], sql="SELECT 1", sql_conn_id="wh")
    op = DynamicsToCampaignSyncOperator(task_id="t", table=SYNC_TABLES["contacts"])
    assert "sql" not in op.template_fields and "path" not in op.template_fields and "table" in op.template_fields
    assert "state_conn_id" in op.template_fields
