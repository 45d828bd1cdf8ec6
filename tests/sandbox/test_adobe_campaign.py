"""The Adobe Campaign Standard + IMS + I/O Events emulator answers as the real services do (API-FACTS §4)."""

from __future__ import annotations

import json
import re
import time

import pytest
import requests


@pytest.fixture(autouse=True)
def _no_ca_env(monkeypatch):
    """requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override ``Session.verify``; drop them (see report)."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


class ACS:
    def __init__(self, sandbox) -> None:
        self.sandbox = sandbox
        self.info = sandbox.info["adobe_campaign"]
        self.verify = sandbox.info["ca_bundle"]
        self.session = requests.Session()
        self.session.verify = self.verify
        self.base = self.info["base_url"]
        self.session.headers.update({"Authorization": "Bearer " + self.token(), "X-Api-Key": self.info["client_id"],
                                     "Content-Type": "application/json", "Cache-Control": "no-cache"})

    def ims(self, **overrides) -> requests.Response:
        form = {"grant_type": "client_credentials", "client_id": self.info["client_id"],
                "client_secret": self.info["client_secret"], "scope": "openid,AdobeID,campaign_sdk", **overrides}
        return requests.post(self.info["ims_url"], data=form, verify=self.verify, timeout=10)

    def token(self) -> str:
        r = self.ims()
        assert r.status_code == 200, r.text
        return r.json()["access_token"]

    def config(self, **values):
        r = self.session.post(self.sandbox.admin + "/adobe_campaign/config", json=values, timeout=10)
        assert r.status_code == 200, r.text

    def create(self, path="/profileAndServices/profile", **fields):
        r = self.session.post(self.base + path, json=fields, timeout=10)
        assert r.status_code == 201, r.text
        return r.json()


@pytest.fixture
def acs(sandbox):
    a = ACS(sandbox)
    yield a
    a.session.close()


def test_ims_token_and_profile_create_read_patch_delete(acs):
    r = acs.ims()
    assert r.status_code == 200
    assert r.json()["token_type"] == "bearer" and r.json()["expires_in"] > 0 and "refresh_token" not in r.json()

    created = acs.create(firstName="Ann", lastName="Lee", email="ann@example.com", blackListEmail=True)
    assert created["PKey"].startswith("@") and created["href"].endswith("/profileAndServices/profile/" + created["PKey"])
    assert created["email"] == "ann@example.com" and created["blackListEmail"] is True and created["blackList"] is False
    assert {"created", "lastModified"} <= set(created)

    got = acs.session.get(created["href"], timeout=10)
    assert got.status_code == 200 and got.json()["firstName"] == "Ann"
    r = acs.session.patch(created["href"], json={"lastName": "Lee-Smith", "blackListEmail": False}, timeout=10)
    assert r.status_code == 200 and r.json() == {"PKey": created["PKey"], "href": created["href"]}
    got = acs.session.get(created["href"], timeout=10).json()
    assert got["lastName"] == "Lee-Smith" and got["blackListEmail"] is False

    r = acs.session.patch(created["href"], json={"blackList": "yes"}, timeout=10)
    # ACS answers invalid values with 500 + RST-360011 (experience-cloud.en help/campaign/api/limitations.md)
    assert r.status_code == 500 and r.json()["code"] == 500 and r.json()["message"].startswith("RST-360011")
    assert acs.session.delete(created["href"], timeout=10).status_code == 200
    r = acs.session.get(created["href"], timeout=10)
    assert r.status_code == 404 and r.json()["code"] == 404
    state = acs.sandbox.state("adobe_campaign")
    assert state["count"] == 0
    assert acs.sandbox.requests()["items_received"]["adobe_campaign"] == 3  # create, patch, delete


def test_gateway_auth_errors(acs):
    url = acs.base + "/profileAndServices/profile"
    r = requests.get(url, headers={"X-Api-Key": acs.info["client_id"], "Authorization": "Bearer nope"},
                     verify=acs.verify, timeout=10)
    assert r.status_code == 401 and r.json() == {"error_code": "401013", "message": "Oauth token is not valid"}
    good = acs.session.headers["Authorization"]
    r = requests.get(url, headers={"Authorization": good}, verify=acs.verify, timeout=10)
    assert r.status_code == 403 and r.json()["error_code"] == "403000"
    r = requests.get(url, headers={"Authorization": good, "X-Api-Key": "other"}, verify=acs.verify, timeout=10)
    assert r.status_code == 403 and r.json()["error_code"] == "403003"
    wrong_org = url.replace(f"/{acs.info['org_id']}/", "/someoneelse/")
    r = acs.session.get(wrong_org, timeout=10)
    assert r.status_code == 403 and r.json() == {"error_code": "403023", "message": "Profile is not valid"}

    r = acs.ims(client_secret="wrong")
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = acs.ims(scope="openid,not_a_scope")
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"
    r = acs.ims(grant_type="password")
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"


def test_ims_token_expiry(acs):
    admin = acs.sandbox.admin + "/token-ttl"
    acs.sandbox.session.post(admin, json={"seconds": 1}, timeout=10).raise_for_status()
    try:
        r = acs.ims()
        assert r.json()["expires_in"] == 1
        headers = {"Authorization": "Bearer " + r.json()["access_token"], "X-Api-Key": acs.info["client_id"]}
        url = acs.base + "/profileAndServices/profile"
        assert requests.get(url, headers=headers, verify=acs.verify, timeout=10).status_code == 200
        time.sleep(1.2)
        r = requests.get(url, headers=headers, verify=acs.verify, timeout=10)
        assert r.status_code == 401 and r.json()["error_code"] == "401013"
    finally:
        acs.sandbox.session.post(admin, json={"seconds": 3600}, timeout=10).raise_for_status()


def test_filters_and_paging(acs):
    for i in range(5):
        acs.create(email=f"p{i}@example.com", firstName=f"Pat{i}", lastName="Page")
    acs.create(email="other@example.com", firstName="Zed")
    r = acs.session.get(acs.base + "/profileAndServices/profile/byEmail", params={"email": "P3@example.com"},
                        timeout=10)
    assert [p["email"] for p in r.json()["content"]] == ["p3@example.com"]
    r = acs.session.get(acs.base + "/profileAndServices/profile/byText",
                        params={"text": "p", "filterType": "email"}, timeout=10)
    assert len(r.json()["content"]) == 5

    url, seen, pages = acs.base + "/profileAndServices/profile?_lineCount=2", [], 0
    while url:
        body = acs.session.get(url, timeout=10).json()
        assert body["serverSidePagination"] is True and "/_count?" in body["count"]["href"]
        seen += [p["email"] for p in body["content"]]
        url = body.get("next", {}).get("href")
        assert url is None or re.search(r"_lineStart=%40", url)
        pages += 1
    assert pages == 3 and len(seen) == 6 and len(set(seen)) == 6
    assert acs.session.get(acs.base + "/profileAndServices/profile/_count", timeout=10).json() == {"count": 6}
    body = acs.session.get(acs.base + "/profileAndServices/profile",
                           params={"_lineCount": 3, "_order": "email desc"}, timeout=10).json()
    assert [p["email"] for p in body["content"]] == ["p4@example.com", "p3@example.com", "p2@example.com"]

    acs.config(big_table_threshold=3)          # "large" tables: no next unless _forcePagination=true
    body = acs.session.get(acs.base + "/profileAndServices/profile", params={"_lineCount": 2}, timeout=10).json()
    assert "next" not in body
    body = acs.session.get(acs.base + "/profileAndServices/profile",
                           params={"_lineCount": 2, "_forcePagination": "true"}, timeout=10).json()
    assert "next" in body


def test_extension_fields_custom_key_and_custom_resource(acs):
    r = acs.session.post(acs.base + "/profileAndServices/profile", json={"email": "x@example.com", "cusSegment": "A"},
                         timeout=10)
    assert r.status_code == 500 and "'cusSegment' property is not valid for the 'profile' resource" in r.json()["message"]
    p = acs.create("/profileAndServicesExt/profile", email="x@example.com", cusCustomerKey="CK-1", cusSegment="A",
                   cusScore=7, externalId="d365-1")
    assert p["cusSegment"] == "A" and p["href"].split("/")[-3] == "profileAndServicesExt"
    r = acs.session.get(acs.base + "/profileAndServicesExt/profile/CK-1", timeout=10)
    assert r.status_code == 200 and r.json()["PKey"] == p["PKey"]
    std = acs.session.get(acs.base + "/profileAndServices/profile/" + p["PKey"], timeout=10).json()
    assert "cusSegment" not in std
    r = acs.session.patch(p["href"], json={"cusCustomerKey": "CK-2"}, timeout=10)
    assert r.status_code == 500 and "RST-360012" in r.json()["message"]
    r = acs.session.get(acs.base + "/profileAndServicesExt/profile/byExternalId", params={"externalId": "d365-1"},
                        timeout=10)
    assert [x["PKey"] for x in r.json()["content"]] == [p["PKey"]]

    res = acs.base + "/customResources/cusSegmentMembership"
    r = acs.session.post(res, json={"cusSegmentId": "seg-1", "cusEmail": "x@example.com", "cusScore": 3}, timeout=10)
    assert r.status_code == 201 and r.json()["PKey"].startswith("@")
    href = r.json()["href"]
    assert acs.session.patch(href, json={"cusScore": 4}, timeout=10).status_code == 200
    assert acs.session.get(res, timeout=10).json()["content"][0]["cusScore"] == 4
    assert acs.session.post(res, json={"nope": 1}, timeout=10).status_code == 500
    assert acs.session.delete(href, timeout=10).status_code == 200


def test_events_journal(acs):
    p = acs.create(email="ev@example.com")
    r = acs.session.post(acs.sandbox.admin + "/adobe_campaign/events", json={"events": [
        {"type": "sent", "email": "ev@example.com"}, {"type": "open", "email": "ev@example.com"},
        {"type": "click", "PKey": p["PKey"], "url": "https://x.example/a"},
        {"type": "bounce", "email": "ev@example.com"}]}, timeout=10)
    assert r.json() == {"generated": 4, "total": 4}

    url = acs.info["events_url"] + "?limit=3"
    got = []
    r = acs.session.get(url, timeout=10)
    assert r.status_code == 200 and r.json()["_page"]["count"] == 3
    got += r.json()["events"]
    assert r.json()["_page"]["last"] == got[-1]["position"]
    r = acs.session.get(r.links["next"]["url"], timeout=10)
    got += r.json()["events"]
    types = [e["event"]["data"]["eventType"] for e in got]
    assert types == ["sent", "open", "click", "bounce"]
    assert all(e["event"]["data"]["profile"] == {"PKey": p["PKey"], "email": "ev@example.com", "externalId": ""}
               for e in got)
    assert got[2]["event"]["data"]["url"] == "https://x.example/a" and got[0]["event"]["time"]
    r = acs.session.get(r.links["next"]["url"], timeout=10)
    assert r.status_code == 204 and "next" in r.links and int(r.headers["Retry-After"]) > 0
    r = requests.get(acs.info["events_url"], headers={"X-Api-Key": acs.info["client_id"]}, verify=acs.verify,
                     timeout=10)
    assert r.status_code == 401
    hist = acs.session.get(acs.base + f"/history/{p['PKey']}/events", timeout=10).json()
    assert len(hist["content"]) == 4


def test_gateway_throttling_429(acs):
    acs.config(rate_limit=2, rate_period=60)
    url = acs.base + "/profileAndServices/profile"
    assert [acs.session.get(url, timeout=10).status_code for _ in range(3)] == [200, 200, 429]
    r = acs.session.get(url, timeout=10)
    assert r.json() == {"error_code": "429050", "message": "Too many requests"} and "Retry-After" not in r.headers
    acs.config(throttle_retry_after=5)
    assert acs.session.get(url, timeout=10).headers["Retry-After"] == "5"
    acs.sandbox.reset()
    acs.sandbox.fault(kind="burst429", vendor="adobe_campaign", count=1)
    r = acs.session.get(url, timeout=10)
    assert r.status_code == 429 and r.json()["error_code"] == "429050"
    assert acs.session.get(url, timeout=10).status_code == 200


# -- the Dynamics 365 -> Campaign sync's needs -----------------------------------------------------------------


def _ext(acs, path=""):
    return acs.base + "/profileAndServicesExt" + path


def test_custom_resource_linked_to_profile(acs):
    """/profileAndServicesExt/<cusResource> with a profile link [ACS custom-resources.md, updating-profile-
    organizational-unit.md for the {"PKey"} link body, retrieving-subscriptions.md for the link read shape]."""
    ann = acs.create("/profileAndServicesExt/profile", email="ann@example.com", lastName="Lee",
                     cusCrmId="0f8fad5b-d9cb-469f-a165-70867728950e")
    bob = acs.create("/profileAndServicesExt/profile", email="bob@example.com", lastName="Bo")
    r = acs.session.get(_ext(acs, "/profile/byCrmId"), params={"crmId": "0f8fad5b-d9cb-469f-a165-70867728950e"},
                        timeout=10)
    assert [p["PKey"] for p in r.json()["content"]] == [ann["PKey"]]

    cards = _ext(acs, "/cusLoyaltyCard")
    r = acs.session.post(cards, json={"cusCardId": "card-1", "cusCardNumber": "123", "cusTier": "gold",
                                      "cusPoints": 10, "profile": {"PKey": ann["PKey"]}}, timeout=10)
    assert r.status_code == 201, r.text
    card = r.json()
    assert card["PKey"].startswith("@") and card["href"] == f"{cards}/{card['PKey']}"
    assert card["profile"]["PKey"] == ann["PKey"] and card["profile"]["href"].endswith("/profile/" + ann["PKey"])
    assert card["cusUnlinked"] is False and card["cusValidUntil"] == "" and card["created"] == card["lastModified"]
    for n in (2, 3):
        acs.create("/profileAndServicesExt/cusLoyaltyCard", cusCardId=f"card-{n}", cusPoints=n,
                   profile={"PKey": bob["PKey"]})

    r = acs.session.get(cards + "/byCardId", params={"cardId": "card-1"}, timeout=10)
    assert [c["PKey"] for c in r.json()["content"]] == [card["PKey"]]
    r = acs.session.get(cards + "/byProfile", params={"profile": bob["PKey"]}, timeout=10)
    assert sorted(c["cusCardId"] for c in r.json()["content"]) == ["card-2", "card-3"]
    assert acs.session.get(cards + "/byCardId/_count", params={"cardId": "nope"}, timeout=10).json() == {"count": 0}
    url, seen = cards + "?_lineCount=2", []
    while url:
        body = acs.session.get(url, timeout=10).json()
        seen += [c["cusCardId"] for c in body["content"]]
        url = body.get("next", {}).get("href")
    assert seen == ["card-1", "card-2", "card-3"]
    body = acs.session.get(cards, params={"_order": "cusPoints desc"}, timeout=10).json()
    assert [c["cusPoints"] for c in body["content"]] == [10, 3, 2]

    time.sleep(0.01)
    r = acs.session.patch(card["href"], json={"cusPoints": 11, "profile": {"PKey": bob["PKey"]}}, timeout=10)
    assert r.status_code == 200 and r.json() == {"PKey": card["PKey"], "href": card["href"]}
    got = acs.session.get(card["href"], timeout=10).json()
    assert got["cusPoints"] == 11 and got["cusTier"] == "gold" and got["profile"]["PKey"] == bob["PKey"]
    assert got["lastModified"] > got["created"]

    # errors: duplicate ID field, unknown property, too long, link by a PKey that does not decrypt, wrong family
    r = acs.session.post(cards, json={"cusCardId": "card-2"}, timeout=10)
    assert r.status_code == 500 and "duplicate key value violates unique constraint" in r.json()["message"]
    r = acs.session.post(cards, json={"cusCardId": "x", "cusColour": "red"}, timeout=10)
    assert r.status_code == 500 and r.json()["message"] == ("RST-360011 An error has occurred - please contact your "
                                                            "administrator. 'cusColour' property is not valid for "
                                                            "the 'cusLoyaltyCard' resource.")
    r = acs.session.post(cards, json={"cusCardId": "x", "cusTier": "t" * 21}, timeout=10)
    assert r.status_code == 500 and "varying(20)" in r.json()["message"]
    r = acs.session.post(cards, json={"cusCardId": "x", "profile": {"PKey": "@jksad"}}, timeout=10)
    assert r.status_code == 500 and "XTK-170036" in r.json()["message"]
    r = acs.session.post(cards, json={"cusCardId": "x2", "profile": {"email": "ann@example.com"}}, timeout=10)
    assert r.status_code == 201 and r.json()["profile"] is None  # a link by fields is ignored (limitations.md)
    assert acs.session.get(acs.base + "/customResources/cusLoyaltyCard", timeout=10).status_code == 404
    assert acs.session.get(_ext(acs, "/cusSegmentMembership"), timeout=10).status_code == 404
    assert acs.session.get(cards + "/card-1", timeout=10).status_code == 500   # no custom keys on custom resources
    root = acs.session.get(_ext(acs, "/"), timeout=10).json()
    assert root["cusLoyaltyCard"]["data"] == "/profileAndServicesExt/cusLoyaltyCard/"
    assert "cusSegmentMembership" not in root

    # the unlinked flag, then deletes: the row keeps an empty link when its profile goes (default "keep")
    assert acs.session.patch(card["href"], json={"cusUnlinked": True}, timeout=10).status_code == 200
    assert acs.session.delete(bob["href"], timeout=10).status_code == 200
    assert acs.session.get(card["href"], timeout=10).json()["profile"] is None
    assert acs.session.delete(card["href"], timeout=10).status_code == 200
    assert acs.session.get(card["href"], timeout=10).status_code == 404
    state = acs.sandbox.state("adobe_campaign")["custom_resource"]["cusLoyaltyCard"]
    assert sorted(c["cusCardId"] for c in state) == ["card-2", "card-3", "x2"]


def test_custom_resources_declared_in_seed_and_at_run_time(acs):
    seed = json.loads(json.dumps(acs.sandbox.server.initial_seed))
    seed["adobe_campaign"] = {
        "profiles": [{"email": "ann@example.com", "externalId": "c-1", "cusD365Id": "c-1"}],
        "profile_fields": {"cusD365Id": {"type": "string", "length": 36}},
        "profile_filters": {"byD365Id": {"field": "cusD365Id", "param": "d365Id"},
                            "byModifiedSince": {"field": "lastModified", "param": "since", "operator": ">="}},
        "custom_resources": {"cusPolicy": {"fields": {"cusPolicyId": {"type": "string", "length": 20},
                                                      "cusAmount": "double"},
                                           "id_field": "cusPolicyId",
                                           "link": {"name": "holder", "on_profile_delete": "cascade"},
                                           "filters": {"byPolicyId": "cusPolicyId"}}},
        "rows": {"cusPolicy": [{"cusPolicyId": "P-1", "cusAmount": 9.5, "holder": {"externalId": "c-1"}}]},
    }
    acs.sandbox.session.post(acs.sandbox.admin + "/seed", json=seed, timeout=30).raise_for_status()
    ann = acs.session.get(_ext(acs, "/profile/byD365Id"), params={"d365Id": "c-1"}, timeout=10).json()["content"][0]
    r = acs.session.get(_ext(acs, "/cusPolicy/byPolicyId"), params={"cusPolicyId": "P-1"}, timeout=10)
    row = r.json()["content"][0]
    assert row["holder"]["PKey"] == ann["PKey"] and row["cusAmount"] == 9.5
    r = acs.session.get(_ext(acs, "/profile/byModifiedSince"), params={"since": "2000-01-01T00:00:00Z"}, timeout=10)
    assert len(r.json()["content"]) == 1
    r = acs.session.get(_ext(acs, "/profile/byModifiedSince"), params={"since": "2999-01-01 00:00:00.000Z"},
                        timeout=10)
    assert r.json()["content"] == []
    filters = acs.session.get(_ext(acs, "/resourceType/profile/filters"), timeout=10).json()["content"]
    assert {"byD365Id", "byModifiedSince", "byExternalId", "byText"} <= {f["name"] for f in filters}
    # cascade: deleting the profile deletes its rows
    assert acs.session.delete(ann["href"], timeout=10).status_code == 200
    assert acs.session.get(_ext(acs, "/cusPolicy/_count"), timeout=10).json() == {"count": 0}

    # run time: POST /_sandbox/adobe_campaign/schema
    r = acs.session.post(acs.sandbox.admin + "/adobe_campaign/schema", json={
        "custom_resources": {"cusVehicle": {"fields": {"cusVin": "string"}, "link": "profile"}}}, timeout=10)
    assert r.status_code == 200 and "cusVehicle" in r.json()["custom_resources"]
    assert acs.session.post(_ext(acs, "/cusVehicle"), json={"cusVin": "V1"}, timeout=10).status_code == 201
    r = acs.session.post(acs.sandbox.admin + "/adobe_campaign/schema",
                         json={"custom_resources": {"vehicle": {"fields": {}}}}, timeout=10)
    assert r.status_code == 400


def test_profile_custom_fields_patch_semantics_and_lookup(acs):
    p = acs.create("/profileAndServicesExt/profile", email="x@example.com", firstName="Xa", lastName="Lee",
                   externalId="d365-1", cusCrmId="crm-1", cusScore=3)
    time.sleep(0.01)
    r = acs.session.patch(p["href"], json={"cusScore": 4}, timeout=10)
    assert r.status_code == 200
    got = acs.session.get(p["href"], timeout=10).json()
    assert got["cusScore"] == 4 and got["firstName"] == "Xa" and got["cusCrmId"] == "crm-1"
    assert got["lastModified"] > got["created"] == p["created"]
    r = acs.session.get(_ext(acs, "/profile/byExternalId"), params={"externalId": "d365-1"}, timeout=10)
    assert [x["PKey"] for x in r.json()["content"]] == [p["PKey"]]
    acs.create("/profileAndServicesExt/profile", email="y@example.com", externalId="d365-1")  # not unique in ACS
    r = acs.session.get(_ext(acs, "/profile/byExternalId/_count"), params={"externalId": "d365-1"}, timeout=10)
    assert r.json() == {"count": 2}
    r = acs.session.patch(p["href"], json={"cusCrmId": "c" * 37}, timeout=10)
    assert r.status_code == 500 and r.json()["code"] == 500 and "varying(36)" in r.json()["message"]
    r = acs.session.patch(p["href"], json={"email": "e" * 129}, timeout=10)
    assert r.status_code == 500 and "varying(128)" in r.json()["message"]
    r = acs.session.patch(p["href"], json={"cusNope": 1}, timeout=10)
    assert r.status_code == 500 and "'cusNope' property is not valid for the 'profile' resource" in r.json()["message"]
    r = acs.session.patch(p["href"], json={"gender": "invalid"}, timeout=10)
    assert r.json()["message"].endswith("The value 'invalid' is not valid for the 'nms:recipient:gender' enumeration "
                                        "of the '@gender' field")
    r = acs.session.get(acs.base + "/profileAndServices/profile/@jksad", timeout=10)
    assert r.status_code == 500 and r.json()["message"].startswith("'jksad' attribute unknown")


def test_by_text_is_case_sensitive_prefix_on_email_and_last_name(acs):
    acs.create(email="doe@example.com", firstName="Ann", lastName="Smith")
    acs.create(email="ann@example.com", firstName="Bob", lastName="Doe")
    acs.create(email="zed@example.com", firstName="Doe", lastName="Zed")

    def by_text(**params):
        r = acs.session.get(acs.base + "/profileAndServices/profile/byText", params=params, timeout=10)
        return sorted(p["email"] for p in r.json()["content"])

    assert by_text(text="Doe") == ["ann@example.com"]             # last name; not firstName without filterType
    assert by_text(text="doe") == ["doe@example.com"]             # email; case-sensitive
    assert by_text(text="oe") == []                               # prefix only
    assert by_text(text="Doe", filterType="firstName") == ["zed@example.com"]
    assert by_text(text="DOE", filterType="lastName") == []


def test_wrong_uri_and_order_on_sortable_fields(acs):
    r = acs.session.get(acs.base + "/profileAndService/profile", timeout=10)
    assert r.status_code == 500 and r.json() == {"code": 500, "message": "Oops. Something went wrong. Check your URI "
                                                                         "and try again."}
    r = acs.session.get(acs.base.replace("/campaign", "/campaing") + "/profileAndServices/profile", timeout=10)
    assert r.status_code == 500 and r.json()["code"] == 500
    r = acs.session.get(acs.base + "/profileAndServices/profile", params={"_order": "externalId"}, timeout=10)
    assert r.status_code == 500 and "sort" in r.json()["message"]
    r = acs.session.get(acs.base + "/profileAndServices/profile", params={"_order": "lastName desc"}, timeout=10)
    assert r.status_code == 200
    acs.config(order_check=False)
    assert acs.session.get(acs.base + "/profileAndServices/profile", params={"_order": "externalId"},
                           timeout=10).status_code == 200


def test_throttling_retry_after_and_recovery(acs):
    acs.config(rate_limit=1, rate_period=0.5, throttle_retry_after=1)
    url = acs.base + "/profileAndServices/profile"
    assert acs.session.get(url, timeout=10).status_code == 200
    r = acs.session.get(url, timeout=10)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json() == {"error_code": "429050", "message": "Too many requests"}
    time.sleep(0.6)
    assert acs.session.get(url, timeout=10).status_code == 200
