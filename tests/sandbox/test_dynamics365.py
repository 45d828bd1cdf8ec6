"""The Dataverse + Entra ID emulator answers as the real services do (API-FACTS section 3)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import msal
import pytest
import requests

NS = "Microsoft.Dynamics.CRM."


@pytest.fixture(autouse=True)
def _no_ca_env(monkeypatch):
    """requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override ``Session.verify``; drop them (see report)."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


class DV:
    def __init__(self, sandbox) -> None:
        self.sandbox = sandbox
        self.info = sandbox.info["dynamics365"]
        self.session = requests.Session()
        self.session.verify = sandbox.info["ca_bundle"]
        self.api = self.info["base_url"] + "/api/data/v9.2/"
        self.token_url = self.info["authority"] + "/oauth2/v2.0/token"
        self.scope = self.info["base_url"] + "/.default"
        self.session.headers.update({"Accept": "application/json", "OData-MaxVersion": "4.0",
                                     "OData-Version": "4.0", "Authorization": "Bearer " + self.token()})

    def token(self, **overrides) -> str:
        form = {"grant_type": "client_credentials", "client_id": self.info["client_id"],
                "client_secret": self.info["client_secret"], "scope": self.scope, **overrides}
        r = requests.post(self.token_url, data=form, verify=self.session.verify, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["access_token"]

    def get(self, path, **kw):
        return self.session.get(self.api + path, timeout=30, **kw)

    def post(self, path, body, **kw):
        return self.session.post(self.api + path, json=body, timeout=30, **kw)

    def config(self, **values):
        r = self.session.post(self.sandbox.admin + "/dynamics365/config", json=values, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def create_contacts(self, n, prefix="c"):
        targets = [{"@odata.type": NS + "contact", "firstname": f"F{i}", "lastname": f"L{i}",
                    "emailaddress1": f"{prefix}{i}@example.com"} for i in range(n)]
        r = self.post("contacts/Microsoft.Dynamics.CRM.CreateMultiple", {"Targets": targets})
        assert r.status_code == 200, r.text
        return r.json()["Ids"]


@pytest.fixture
def dv(sandbox):
    d = DV(sandbox)
    yield d
    d.session.close()


def test_msal_client_credentials_token_and_whoami(sandbox):
    info = sandbox.info["dynamics365"]
    http = requests.Session()
    http.verify = sandbox.info["ca_bundle"]
    scope = [info["base_url"] + "/.default"]
    # the sandbox authority is not a Microsoft host: disable instance discovery (or point it at the sandbox)
    app = msal.ConfidentialClientApplication(info["client_id"], client_credential=info["client_secret"],
                                             authority=info["authority"], http_client=http, instance_discovery=False)
    result = app.acquire_token_for_client(scopes=scope)
    assert result["token_type"] == "Bearer" and result["expires_in"] > 0, result
    app2 = msal.ConfidentialClientApplication(info["client_id"], client_credential=info["client_secret"],
                                              authority=info["authority"], http_client=http,
                                              instance_discovery=info["instance_discovery_url"])
    assert "access_token" in app2.acquire_token_for_client(scopes=scope)

    r = http.get(info["base_url"] + "/api/data/v9.2/WhoAmI",
                 headers={"Authorization": "Bearer " + result["access_token"]}, timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["@odata.context"].endswith("/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse")
    assert {"BusinessUnitId", "UserId", "OrganizationId"} <= set(body)
    assert r.headers["OData-Version"] == "4.0"

    bad = msal.ConfidentialClientApplication(info["client_id"], client_credential="wrong",
                                             authority=info["authority"], http_client=http, instance_discovery=False)
    err = bad.acquire_token_for_client(scopes=scope)
    assert err["error"] == "invalid_client" and 7000215 in err["error_codes"]
    http.close()


def test_token_endpoint_errors(dv):
    r = requests.post(dv.token_url, data={"grant_type": "client_credentials", "client_id": dv.info["client_id"],
                                          "client_secret": dv.info["client_secret"],
                                          "scope": dv.info["base_url"]}, verify=dv.session.verify, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope" and r.json()["error_codes"] == [1002012]
    r = requests.post(dv.token_url, data={"grant_type": "client_credentials", "client_id": str(uuid.uuid4()),
                                          "client_secret": "x", "scope": dv.scope}, verify=dv.session.verify,
                      timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "unauthorized_client"
    assert r.json()["error_description"].startswith("AADSTS700016:")
    r = dv.session.get(dv.info["authority"].rsplit("/", 1)[0] + "/nosuchtenant/v2.0/.well-known/openid-configuration",
                       timeout=10)
    assert r.status_code == 400 and r.json()["error_codes"] == [90002]


def test_401_without_valid_bearer_token(dv):
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        r = requests.get(dv.api + "WhoAmI", headers=headers, verify=dv.session.verify, timeout=10)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")
        assert f"resource_id={dv.info['base_url']}/" in r.headers["WWW-Authenticate"]
        assert r.json()["error"]["code"] == "0x80072560"


def test_token_expires_after_ttl(dv):
    admin = dv.sandbox.admin + "/token-ttl"
    dv.sandbox.session.post(admin, json={"seconds": 1}, timeout=10).raise_for_status()
    try:
        r = requests.post(dv.token_url, data={"grant_type": "client_credentials", "client_id": dv.info["client_id"],
                                              "client_secret": dv.info["client_secret"], "scope": dv.scope},
                          verify=dv.session.verify, timeout=10)
        assert r.json()["expires_in"] == 1
        headers = {"Authorization": "Bearer " + r.json()["access_token"]}
        assert requests.get(dv.api + "WhoAmI", headers=headers, verify=dv.session.verify, timeout=10).status_code == 200
        time.sleep(1.2)
        r = requests.get(dv.api + "WhoAmI", headers=headers, verify=dv.session.verify, timeout=10)
        assert r.status_code == 401 and "WWW-Authenticate" in r.headers
    finally:
        dv.sandbox.session.post(admin, json={"seconds": 3600}, timeout=10).raise_for_status()


def test_contacts_filter_select_and_paging(dv):
    ids = dv.create_contacts(12)
    r = dv.post("contacts", {"firstname": "Solo", "emailaddress1": "solo@example.com"})
    assert r.status_code == 204 and "/contacts(" in r.headers["OData-EntityId"]
    r = dv.post("contacts", {"firstname": "Rep"}, headers={"Prefer": "return=representation"})
    assert r.status_code == 201 and r.json()["firstname"] == "Rep" and r.json()["contactid"]

    flt = f"Microsoft.Dynamics.CRM.In(PropertyName='contactid',PropertyValues=['{ids[0]}','{ids[3]}'])"
    r = dv.get("contacts", params={"$select": "emailaddress1", "$filter": flt})
    assert sorted(v["emailaddress1"] for v in r.json()["value"]) == ["c0@example.com", "c3@example.com"]
    assert set(r.json()["value"][0]) == {"@odata.etag", "emailaddress1", "contactid"}
    r = dv.get("contacts", params={"$filter": "(emailaddress1 eq 'C1@example.com' or firstname eq 'F2') "
                                              "and statecode eq 0", "$select": "firstname"})
    assert sorted(v["firstname"] for v in r.json()["value"]) == ["F1", "F2"]

    seen, url, pages = [], dv.api + "contacts?$select=emailaddress1&$filter=startswith(emailaddress1,'c')", 0
    while url:
        r = dv.session.get(url, headers={"Prefer": "odata.maxpagesize=5"}, timeout=10)
        assert r.status_code == 200 and r.headers["Preference-Applied"] == "odata.maxpagesize=5"
        seen += [v["emailaddress1"] for v in r.json()["value"]]
        url = r.json().get("@odata.nextLink")
        assert url is None or "$skiptoken=" in url
        pages += 1
    assert pages == 3 and sorted(seen) == sorted(f"c{i}@example.com" for i in range(12))

    r = dv.get("contacts", params={"$select": "nosuchcolumn"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "0x80060888"
    r = dv.get(f"contacts({uuid.uuid4()})")
    assert r.status_code == 404 and r.json()["error"]["code"] == "0x80040217"
    r = dv.session.patch(dv.api + "contacts(new_customerid='C-42')", json={"firstname": "Alt"}, timeout=10)
    assert r.status_code == 204
    r = dv.get("contacts(new_customerid='C-42')", params={"$select": "firstname,new_customerid"})
    assert r.json()["firstname"] == "Alt" and r.json()["new_customerid"] == "C-42"


def test_marketing_list_members(dv):
    ids = dv.create_contacts(5, prefix="m")
    r = dv.post("lists", {"listname": "Segment X", "createdfromcode": 2, "type": False},
                headers={"Prefer": "return=representation"})
    assert r.status_code == 201 and r.json()["type"] is False and r.json()["createdfromcode"] == 2
    lid = r.json()["listid"]
    r = dv.get("lists", params={"$select": "listid,listname",
                                "$filter": "listname eq 'Segment X' and createdfromcode eq 2"})
    assert [v["listid"] for v in r.json()["value"]] == [lid]

    def add(members):
        return dv.post("AddListMembersList", {
            "List": {"listid": lid, "@odata.type": NS + "list"},
            "Members": [{"contactid": m, "@odata.type": NS + "contact"} for m in members]})

    assert add(ids[:3]).status_code == 204
    assert add(ids[:4]).status_code == 204                       # already-members are fine
    unknown = str(uuid.uuid4())
    r = add([ids[4], unknown])
    assert r.status_code == 404 and unknown in r.json()["error"]["message"]
    r = dv.get(f"lists({lid})/listcontact_association", params={"$select": "contactid"},
               headers={"Prefer": "odata.maxpagesize=3"})
    assert len(r.json()["value"]) == 3 and "@odata.nextLink" in r.json()
    rest = dv.session.get(r.json()["@odata.nextLink"], headers={"Prefer": "odata.maxpagesize=3"}, timeout=10).json()
    assert sorted(v["contactid"] for v in r.json()["value"] + rest["value"]) == sorted(ids[:4])

    r = dv.post(f"lists({lid})/Microsoft.Dynamics.CRM.RemoveMemberList", {"ListId": lid, "EntityId": ids[0]})
    assert r.status_code == 400 and "'ListId'" in r.json()["error"]["message"]   # the .NET name is not a parameter
    r = dv.post(f"lists({lid})/Microsoft.Dynamics.CRM.RemoveMemberList", {"EntityId": ids[0]})
    assert r.status_code == 204
    r = dv.session.delete(dv.api + f"lists({lid})/listcontact_association({ids[1]})/$ref", timeout=10)
    assert r.status_code == 204
    r = dv.get("listmembers", params={"$filter": f"_listid_value eq {lid}", "$select": "_entityid_value"})
    assert sorted(v["_entityid_value"] for v in r.json()["value"]) == sorted(ids[2:4])
    state = dv.sandbox.state("dynamics365")
    assert sorted(state["lists"][lid]["members"]) == sorted(ids[2:4])
    assert dv.info["marketing_list_id"] in state["lists"]
    r = dv.post("AddListMembersList", {"List": {"listid": lid},
                                       "Members": [{"contactid": ids[0]}]})          # no @odata.type
    assert r.status_code == 400 and "crmbaseentity" in r.json()["error"]["message"]


def test_batch_changesets_and_limit(dv):
    lid = dv.info["marketing_list_id"]
    cs = "changeset_1"
    api_path = dv.api.split("://", 1)[1].split("/", 1)[1]
    body = (
        "--batch_1\r\nContent-Type: multipart/mixed; boundary=changeset_1\r\n\r\n"
        f"--{cs}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\n"
        f"POST /{api_path}contacts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n"
        '{"firstname": "Batch", "emailaddress1": "batch@example.com"}\r\n'
        f"--{cs}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 2\r\n\r\n"
        f"POST /{api_path}lists({lid})/listcontact_association/$ref HTTP/1.1\r\n"
        "Content-Type: application/json\r\n\r\n"
        '{"@odata.id": "$1"}\r\n'
        f"--{cs}--\r\n"
        "--batch_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        f"GET /{api_path}contacts?$select=firstname&$filter=firstname%20eq%20'Batch' HTTP/1.1\r\n"
        "Accept: application/json\r\n\r\n"
        "--batch_1--\r\n")
    r = dv.session.post(dv.api + "$batch", data=body, timeout=30,
                        headers={"Content-Type": "multipart/mixed; boundary=batch_1"})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("multipart/mixed; boundary=batchresponse_")
    assert r.text.count("HTTP/1.1 204 No Content") == 2 and "HTTP/1.1 200 OK" in r.text
    assert '"firstname":"Batch"' in r.text
    assert len(dv.sandbox.state("dynamics365")["lists"][lid]["members"]) == 1

    failing = body.replace('"firstname": "Batch"', '"firstname": "Rolled"').replace(
        '{"@odata.id": "$1"}', '{"@odata.id": "/contacts(' + str(uuid.uuid4()) + ')"}')
    r = dv.session.post(dv.api + "$batch", data=failing, timeout=30,
                        headers={"Content-Type": "multipart/mixed; boundary=batch_1"})
    assert r.status_code == 200 and "HTTP/1.1 404 Not Found" in r.text
    assert "HTTP/1.1 200 OK" not in r.text                        # stopped at the failed change set
    assert dv.get("contacts", params={"$filter": "firstname eq 'Rolled'"}).json()["value"] == []

    part = ("--b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            f"GET /{api_path}WhoAmI HTTP/1.1\r\n\r\n")
    r = dv.session.post(dv.api + "$batch", data=part * 1001 + "--b--\r\n", timeout=30,
                        headers={"Content-Type": "multipart/mixed; boundary=b"})
    assert r.status_code == 400 and "1000" in r.json()["error"]["message"]


def test_custom_entity_and_email_activity(dv):
    cid = dv.create_contacts(1, prefix="act")[0]
    r = dv.post("new_segmentmemberships", {"new_name": "VIP", "new_segmentid": "seg-1", "new_externalkey": "k1",
                                           "new_ContactId@odata.bind": f"/contacts({cid})"})
    assert r.status_code == 204
    r = dv.session.patch(dv.api + "new_segmentmemberships(new_externalkey='k1')", json={"new_name": "VIP2"},
                         timeout=10)
    assert r.status_code == 204
    r = dv.post("new_emailevents", {"subject": "Email open", "new_eventtype": 100000001,
                                    "new_eventdate": "2024-05-01T10:00:00Z",
                                    "regardingobjectid_contact_new_emailevent@odata.bind": f"/contacts({cid})"})
    assert r.status_code == 204
    r = dv.post("new_emailevents", {"subject": "x", "regardingobjectid_contact_new_emailevent@odata.bind":
                                    f"/contacts({uuid.uuid4()})"})
    assert r.status_code == 404
    state = dv.sandbox.state("dynamics365")
    assert [(r["new_name"], r["_new_contactid_value"]) for r in state["new_segmentmemberships"]] == [("VIP2", cid)]
    assert [(e["new_eventtype"], e["_regardingobjectid_value"]) for e in state["new_emailevents"]] == [
        (100000001, cid)]


def test_service_protection_request_count_and_execution_time(dv):
    dv.config(max_requests=3)
    for _ in range(3):
        assert dv.get("WhoAmI").status_code == 200
    r = dv.get("WhoAmI")
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert r.json()["error"]["code"] == "0x80072322"
    assert "6000" not in r.json()["error"]["message"] and "3" in r.json()["error"]["message"]

    dv.sandbox.reset()
    dv.config(max_execution_ms=5)
    dv.sandbox.latency(base_ms=20)
    assert dv.get("WhoAmI").status_code == 200
    r = dv.get("WhoAmI")
    assert r.status_code == 429 and r.json()["error"]["code"] == "0x80072321" and "Retry-After" in r.headers


def test_service_protection_concurrency(dv):
    dv.config(max_concurrent=2)
    dv.sandbox.latency(base_ms=400)
    results = []

    def call():
        results.append(dv.get("WhoAmI"))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) == 2 and codes.count(429) == 2, codes
    limited = [r for r in results if r.status_code == 429][0]
    assert limited.json()["error"]["code"] == "0x80072326" and limited.headers["Retry-After"] == "1"


def test_injected_429_is_odata_shaped(dv):
    dv.sandbox.fault(kind="burst429", vendor="dynamics365", count=1)
    r = dv.get("WhoAmI")
    assert r.status_code == 429 and "Retry-After" in r.headers
    assert json.loads(r.text)["error"]["code"] == "0x80072322"
