"""Opt-out sync between Dynamics 365 and Adobe Campaign: the conflict rule on its own, then real DAG runs against
both emulators (contacts first synced to Campaign profiles by the example sync DAG)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
import requests

from airflow_provider_segexport.sync.optouts import ACS, D365, Side, decide, decode, encode
from tests.conftest import run_dag
from tests.test_dynamics_campaign_sync import both, profiles, sync, wh_path  # noqa: F401,F811 - fixtures

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


def side(value: bool, seconds: float) -> Side:
    return Side((value,), T0 + timedelta(seconds=seconds))


@pytest.mark.parametrize(("d", "a", "agreed", "winner", "values"), [
    (side(True, 10), side(False, 5), (False,), D365, (True,)),       # only Dynamics 365 changed: it wins
    (side(False, 10), side(True, 5), (False,), ACS, (True,)),        # only Campaign changed, though older
    (side(True, 10), side(False, 5), None, D365, (True,)),           # nothing agreed: the newer opt-out wins
    (side(False, 5), side(True, 10), None, ACS, (True,)),
    (side(False, 10), side(True, 5), None, "both", (True,)),         # a newer consent never takes an opt-out over
    (side(True, 5), side(False, 10), None, "both", (True,)),
    (side(True, 5.2), side(False, 5.7), None, "both", (True,)),      # the same second: the opt-out wins
    (side(False, 5.9), side(True, 5.1), None, "both", (True,)),
])
def test_the_conflict_rule(d, a, agreed, winner, values):
    decision = decide("c", d, a, agreed)
    assert (decision.winner, decision.values) == (winner, values)


def test_a_side_that_did_not_change_never_turns_an_opt_out_into_a_consent():
    # Dynamics 365's record changed last (another field), its opt-out value did not: Campaign's opt-out stands
    decision = decide("c", side(False, 100), side(True, 5), (False,))
    assert decision.winner == ACS and decision.values == (True,)
    assert decide("c", side(True, 1), side(True, 2), (False,)) is None  # they agree: nothing to do


def test_the_state_encoding_round_trips():
    for values in [(True,), (False,), (True, False), (False, False, True)]:
        assert decode(encode(values), len(values)) == values
    assert decode(0, 1) is None


# -- against the sandbox ------------------------------------------------------------------------------------------

def campaign_patch(sandbox, pkey: str, body: dict) -> None:
    acs = sandbox.info["adobe_campaign"]
    token = requests.post(acs["ims_url"], data={"grant_type": "client_credentials", "client_id": acs["client_id"],
                                                "client_secret": acs["client_secret"], "scope": acs["scope"]},
                          verify=sandbox.info["ca_bundle"], timeout=30).json()["access_token"]
    requests.patch(f"{acs['base_url']}/profileAndServicesExt/profile/{pkey}", json=body,
                   headers={"Authorization": f"Bearer {token}", "X-Api-Key": acs["client_id"]},
                   verify=sandbox.info["ca_bundle"], timeout=30).raise_for_status()


def optouts(tmp_path, direction="bidirectional") -> dict:
    state, xcom = run_dag("optout_sync_test", {"direction": direction, "state_dir": str(tmp_path / "optouts")},
                          retries=0)
    assert state == "success"
    return xcom["optouts"]


def opted_out(dataverse, cid: str) -> bool:
    return dataverse.get("contacts", **{"$select": "donotbulkemail", "$filter": f"contactid eq {cid}"})[0]["donotbulkemail"]


def test_each_direction_and_the_newer_change_wins(airflow_db, both, sandbox, tmp_path):  # noqa: F811
    sync()
    first = optouts(tmp_path)  # both sides agree (nobody opted out): nothing to do, the agreement remembered
    assert first["changed"] == {"campaign": 0, "dynamics365": 0}
    live = [(k, p) for k, p in profiles(sandbox).items() if not p.get("cusCrmUnlinked")]
    (d_first, _), (a_first, a_profile), (one_way, one_way_profile) = live[0], live[1], live[2]
    # a seller opts contact 1 out in Dynamics 365; marketing records an opt-out of contact 2 in Campaign
    both.patch(f"contacts({d_first})", {"donotbulkemail": True})
    campaign_patch(sandbox, a_profile["PKey"], {"blackListEmail": True})
    run = optouts(tmp_path)
    assert profiles(sandbox)[d_first]["blackListEmail"] is True  # Dynamics 365 changed: Campaign follows
    assert opted_out(both, a_first) is True  # Campaign changed: Dynamics 365 follows
    assert run["changed"] == {"campaign": 1, "dynamics365": 1}
    assert {c["contact"]: c["why"] for c in run["changes"]} == {
        d_first: "only Dynamics 365 changed since the last sync", a_first: "only Campaign changed since the last sync"}
    # nothing changes on a second run
    again = optouts(tmp_path)
    assert again["changed"] == {"campaign": 0, "dynamics365": 0} and not again["not_written"]
    # a re-consent in Dynamics 365 (its own latest change) goes to Campaign; a record changed elsewhere does not
    both.patch(f"contacts({d_first})", {"donotbulkemail": False})
    run = optouts(tmp_path)
    assert profiles(sandbox)[d_first]["blackListEmail"] is False
    campaign_patch(sandbox, profiles(sandbox)[d_first]["PKey"], {"blackListEmail": True})
    both.patch(f"contacts({d_first})", {"firstname": "Edited later"})  # newer, but not about the opt-out
    run = optouts(tmp_path)
    assert opted_out(both, d_first) is True  # Campaign's opt-out was the only opt-out change: it stands
    # without any earlier agreement (a new state): a consent never overwrites a newer opt-out
    fresh = tmp_path / "fresh"
    cid, prof = live[3]
    both.patch(f"contacts({cid})", {"firstname": "Older change"})
    time.sleep(1.1)
    campaign_patch(sandbox, prof["PKey"], {"blackListEmail": True})
    run = optouts(fresh)
    assert opted_out(both, cid) is True
    assert next(c["why"] for c in run["changes"] if c["contact"] == cid).startswith("Campaign changed last")
    # one way only: Dynamics 365 -> Campaign writes Campaign, and reports (not writes) the other way
    campaign_patch(sandbox, one_way_profile["PKey"], {"blackListEmail": True})
    run = optouts(tmp_path, "dynamics_to_campaign")
    assert opted_out(both, one_way) is False and run["changed"] == {"campaign": 0, "dynamics365": 0}
    assert [c["contact"] for c in run["not_written"]] == [one_way]


def test_campaign_to_dynamics_only_writes_dynamics_and_reports_the_other_way(airflow_db, both, sandbox,  # noqa: F811
                                                                            tmp_path):
    """direction=campaign_to_dynamics: Campaign's opt-outs reach Dynamics 365; a Dynamics 365 opt-out is reported
    (not written) and Campaign keeps its value; a second run changes nothing; a later bidirectional run writes the
    reported one (its watermark did not move past it)."""
    sync()
    optouts(tmp_path, "campaign_to_dynamics")  # the first comparison: both agree, remembered
    live = [(k, p) for k, p in profiles(sandbox).items() if not p.get("cusCrmUnlinked")]
    (from_campaign, prof), (from_dynamics, _) = live[0], live[1]
    campaign_patch(sandbox, prof["PKey"], {"blackListEmail": True})
    both.patch(f"contacts({from_dynamics})", {"donotbulkemail": True})
    run = optouts(tmp_path, "campaign_to_dynamics")
    assert opted_out(both, from_campaign) is True
    assert profiles(sandbox)[from_dynamics]["blackListEmail"] is not True  # the other way: not written
    assert run["changed"] == {"campaign": 0, "dynamics365": 1}
    assert [c["contact"] for c in run["not_written"]] == [from_dynamics]
    again = optouts(tmp_path, "campaign_to_dynamics")
    assert again["changed"] == {"campaign": 0, "dynamics365": 0}
    both_ways = optouts(tmp_path)
    assert profiles(sandbox)[from_dynamics]["blackListEmail"] is True
    assert both_ways["changed"] == {"campaign": 1, "dynamics365": 0}
