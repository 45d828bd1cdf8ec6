"""The Adobe Campaign Standard + IMS + I/O Events emulator answers as the real services do (API-FACTS §4)."""

from __future__ import annotations

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
