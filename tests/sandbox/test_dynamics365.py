"""The Dataverse + Entra ID emulator answers as the real services do (API-FACTS section 3)."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote

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


# -- fidelity: $filter literals, In/NotIn, URL limits, metadata, membercount (SANDBOX-FIDELITY §4 items 1, 8-10) --

def test_filter_datetime_and_guid_literals_unquoted(dv):
    ids = dv.create_contacts(3, prefix="lit")
    for flt in ("modifiedon ge 2024-01-01T00:00:00Z", "modifiedon ge 2024-01-01T00:00:00.123Z",
                "modifiedon ge 2024-01-01T01:00:00+01:00", "createdon gt 2024-01-01",
                f"contactid eq {ids[1]}", f"contactid eq {ids[1].upper()}"):
        r = dv.get("contacts", params={"$select": "contactid", "$filter": flt})
        assert r.status_code == 200, (flt, r.text)
        got = {v["contactid"] for v in r.json()["value"]}
        assert (got == {ids[1]}) if "contactid" in flt else set(ids) <= got, flt
    r = dv.get("contacts", params={"$select": "contactid", "$filter": "modifiedon lt 2000-01-01T00:00:00Z"})
    assert r.json()["value"] == []
    r = dv.get("contacts", params={"$select": "contactid", "$filter": "modifiedon ge 2999-12-31T23:59:59.999999Z"})
    assert r.json()["value"] == []

    # quoted values are Edm.String: ODataLib refuses the comparison with a DateTimeOffset / Guid column
    r = dv.get("contacts", params={"$filter": "modifiedon ge '2024-01-01T00:00:00Z'"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "0x80060888"
    assert r.json()["error"]["message"] == (
        "A binary operator with incompatible types was detected. Found operand types 'Edm.DateTimeOffset' and "
        "'Edm.String' for operator kind 'GreaterThanOrEqual'.")
    r = dv.get("contacts", params={"$filter": f"contactid eq '{ids[0]}'"})
    assert r.status_code == 400 and "'Edm.Guid' and 'Edm.String' for operator kind 'Equal'" in r.text
    r = dv.get("contacts", params={"$filter": f"emailaddress1 eq {ids[0]}"})     # a Guid against a string column
    assert r.status_code == 400 and "'Edm.String' and 'Edm.Guid'" in r.text
    r = dv.get("contacts", params={"$filter": "lastname eq 'O'Bryan'"})
    assert r.status_code == 400 and "unterminated literal" in r.json()["error"]["message"]
    # the lenient mode, for whoever wants the old behaviour
    dv.config(strict_literal_types=False)
    r = dv.get("contacts", params={"$select": "contactid", "$filter": f"contactid eq '{ids[0]}'"})
    assert [v["contactid"] for v in r.json()["value"]] == [ids[0]]


def test_in_and_notin_forms(dv):
    ids = dv.create_contacts(4, prefix="in")
    for last, cid in zip(["OBrian", "O'Brian", "Smith", "Jones"], ids, strict=True):
        assert dv.session.patch(dv.api + f"contacts({cid})", json={"lastname": last}, timeout=10).status_code == 204

    def names(query: str):
        r = dv.session.get(dv.api + "contacts?$select=lastname&" + query, timeout=10)
        assert r.status_code == 200, r.text
        return sorted(v["lastname"] for v in r.json()["value"])

    pn = "PropertyName='contactid'"
    assert names(f'$filter=Microsoft.Dynamics.CRM.In({pn},PropertyValues=["{ids[0]}","{ids[2]}"])') == [
        "OBrian", "Smith"]                                                     # what Microsoft's client emits
    assert names(f"$filter=Microsoft.Dynamics.CRM.In({pn},PropertyValues=['{ids[0]}','{ids[2]}'])") == [
        "OBrian", "Smith"]
    alias = ("$filter=Microsoft.Dynamics.CRM.In(PropertyName=@p1,PropertyValues=@p2)&@p1='lastname'"
             "&@p2=" + requests.utils.quote('["OBrian","OBryan","O\'Brian","O\'Bryan"]', safe=""))
    assert names(alias) == ["O'Brian", "OBrian"]                               # the documented example
    assert names(f'$filter=Microsoft.Dynamics.CRM.NotIn({pn},PropertyValues=["{ids[0]}","{ids[1]}"]) and '
                 "startswith(emailaddress1,'in')") == ["Jones", "Smith"]
    r = dv.session.get(dv.api + "contacts?$filter=Microsoft.Dynamics.CRM.In(PropertyName='lastname',"
                                "PropertyValues=['OBrian','O'Brian'])", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(
        "Invalid JSON. A comma character ',' was expected in scope 'Array'.")
    r = dv.session.get(dv.api + f"contacts?$filter=Microsoft.Dynamics.CRM.In({pn},PropertyValues=[{ids[0]}])",
                       timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("Invalid JSON.")  # unquoted GUIDs
    for guid in ("0123abcd-0000-4000-8000-000000000000", "12e45678-0000-4000-8000-000000000000",
                 "98765432-0000-4000-8000-000000000000"):  # unquoted GUIDs that start like JSON numbers
        r = dv.session.get(dv.api + f"contacts?$filter=Microsoft.Dynamics.CRM.In({pn},PropertyValues=[{guid}])",
                           timeout=10)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("Invalid JSON."), (guid, r.text)

    # GET URLs are limited to 32,768 characters; a GET inside $batch to 65,536 (compose-http-requests-handle-errors)
    many = ",".join(f'"{uuid.uuid4()}"' for _ in range(900)) + f',"{ids[3]}"'
    long_query = f"$select=lastname&$filter=Microsoft.Dynamics.CRM.In({pn},PropertyValues=[{many}])"
    assert len(dv.api) + len("contacts?") + len(long_query) > 32768
    r = dv.session.get(dv.api + "contacts?" + long_query, timeout=10)
    assert r.status_code == 414 and "HTTP Error 414" in r.text
    api_path = dv.api.split("://", 1)[1].split("/", 1)[1]
    body = ("--b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            f"GET /{api_path}contacts?{long_query} HTTP/1.1\r\nAccept: application/json\r\n\r\n--b--\r\n")
    r = dv.session.post(dv.api + "$batch", data=body, headers={"Content-Type": "multipart/mixed; boundary=b"},
                        timeout=30)
    assert r.status_code == 200 and "HTTP/1.1 200 OK" in r.text and '"lastname":"Jones"' in r.text
    r = dv.session.get(dv.api + "contacts(new_customerid='" + "x" * 300 + "')", timeout=10)
    assert r.status_code == 400 and "Invalid URL" in r.text                      # a segment over 260 characters


def test_entity_definitions(dv):
    r = dv.get("EntityDefinitions", params={"$select": "LogicalName,EntitySetName,PrimaryIdAttribute",
                                            "$filter": "LogicalName eq 'contact'"})
    assert r.status_code == 200, r.text
    (item,) = r.json()["value"]
    assert item["EntitySetName"] == "contacts" and item["PrimaryIdAttribute"] == "contactid" and item["MetadataId"]
    assert set(item) == {"LogicalName", "EntitySetName", "PrimaryIdAttribute", "MetadataId"}
    for logical, set_name in (("list", "lists"), ("listmember", "listmembers"),
                              ("new_segmentmembership", "new_segmentmemberships"),
                              ("new_emailevent", "new_emailevents")):
        r = dv.get("EntityDefinitions", params={"$select": "EntitySetName", "$filter": f"LogicalName eq '{logical}'"})
        assert [v["EntitySetName"] for v in r.json()["value"]] == [set_name]
    assert dv.get("EntityDefinitions", params={"$filter": "LogicalName eq 'nosuch'"}).json()["value"] == []
    r = dv.get("EntityDefinitions(LogicalName='contact')", params={"$select": "SchemaName,PrimaryNameAttribute"})
    assert r.json()["SchemaName"] == "Contact" and r.json()["PrimaryNameAttribute"] == "fullname"
    mid = r.json()["MetadataId"]
    assert dv.get(f"EntityDefinitions({mid})").json()["LogicalName"] == "contact"
    assert dv.get("EntityDefinitions(LogicalName='nosuch')").status_code == 404

    r = dv.get(f"EntityDefinitions({mid})/Attributes", params={"$select": "LogicalName,AttributeType",
                                                              "$filter": "LogicalName eq 'emailaddress1'"})
    assert [(a["LogicalName"], a["AttributeType"]) for a in r.json()["value"]] == [("emailaddress1", "String")]
    for cast, name, options in (("StateAttributeMetadata", "statecode", {0: "Active", 1: "Inactive"}),
                                ("StatusAttributeMetadata", "statuscode", {1: "Active", 2: "Inactive"})):
        r = dv.get(f"EntityDefinitions(LogicalName='contact')/Attributes/Microsoft.Dynamics.CRM.{cast}",
                   params={"$select": "LogicalName", "$expand": "OptionSet"})
        (attr,) = r.json()["value"]
        assert attr["LogicalName"] == name
        got = {o["Value"]: o["Label"]["UserLocalizedLabel"]["Label"] for o in attr["OptionSet"]["Options"]}
        assert got == options
    r = dv.get("EntityDefinitions(LogicalName='list')/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
               params={"$select": "LogicalName", "$expand": "OptionSet($select=Options)"})
    pick = {a["LogicalName"]: [o["Value"] for o in a["OptionSet"]["Options"]] for a in r.json()["value"]}
    assert pick == {"createdfromcode": [1, 2, 4]}
    r = dv.get("EntityDefinitions(LogicalName='list')/Attributes(LogicalName='membercount')")
    assert r.json()["IsValidForCreate"] is False and r.json()["IsValidForUpdate"] is False


def test_list_membercount_follows_membership_and_is_read_only(dv):
    ids = dv.create_contacts(5, prefix="mc")
    r = dv.post("lists", {"listname": "Counted", "createdfromcode": 2, "type": False, "membercount": 99},
                headers={"Prefer": "return=representation"})
    assert r.status_code == 201 and r.json()["membercount"] == 0                 # read-only: ignored on create
    lid = r.json()["listid"]

    def count():
        return dv.get(f"lists({lid})", params={"$select": "membercount"}).json()["membercount"]

    assert dv.post("AddListMembersList", {"List": {"@odata.type": NS + "list", "listid": lid}, "Members": [
        {"@odata.type": NS + "contact", "contactid": c} for c in ids[:4]]}).status_code == 204
    assert count() == 4
    assert dv.post(f"lists({lid})/Microsoft.Dynamics.CRM.AddMemberList", {"EntityId": ids[4]}).status_code == 200
    assert count() == 5
    assert dv.post(f"lists({lid})/Microsoft.Dynamics.CRM.RemoveMemberList", {"EntityId": ids[0]}).status_code == 204
    assert dv.session.delete(dv.api + f"lists({lid})/listcontact_association({ids[1]})/$ref",
                             timeout=10).status_code == 204
    lm = dv.get("listmembers", params={"$filter": f"_listid_value eq {lid}", "$select": "_entityid_value"}).json()
    target = next(v["listmemberid"] for v in lm["value"] if v["_entityid_value"] == ids[2])
    assert dv.session.delete(dv.api + f"listmembers({target})", timeout=10).status_code == 204
    assert count() == 2
    assert dv.post("RemoveListMembersList", {"List": {"@odata.type": NS + "list", "listid": lid}, "Members": [
        {"@odata.type": NS + "contact", "contactid": ids[3]}]}).status_code == 204
    assert count() == 1
    assert dv.session.patch(dv.api + f"lists({lid})", json={"membercount": 50}, timeout=10).status_code == 204
    assert count() == 1                                                          # read-only: ignored on update
    r = dv.get("lists", params={"$select": "listid,listname,type,createdfromcode,statecode,membercount",
                                "$filter": "listname eq 'Counted'"})
    assert [(v["listid"], v["membercount"], v["type"], v["statecode"]) for v in r.json()["value"]] == [
        (lid, 1, False, 0)]
    assert dv.sandbox.state("dynamics365")["lists"][lid]["membercount"] == 1


def test_members_paging_and_inactive_contacts(dv):
    ids = dv.create_contacts(7, prefix="pg")
    lid = dv.info["marketing_list_id"]
    assert dv.session.patch(dv.api + f"contacts({ids[6]})", json={"statecode": 1, "statuscode": 2},
                            timeout=10).status_code == 204

    def add(members):
        return dv.post("AddListMembersList", {"List": {"@odata.type": NS + "list", "listid": lid}, "Members": [
            {"@odata.type": NS + "contact", "contactid": c} for c in members]})

    assert add(ids).status_code == 204              # the inactive contact is left out (skip_inactive_members)
    seen, url = [], dv.api + f"lists({lid})/listcontact_association?$select=contactid"
    while url:
        r = dv.session.get(url, headers={"Prefer": "odata.maxpagesize=2"}, timeout=10)
        seen += [v["contactid"] for v in r.json()["value"]]
        url = r.json().get("@odata.nextLink")
    assert sorted(seen) == sorted(ids[:6])
    seen, url = [], dv.api + f"listmembers?$filter=_listid_value eq {lid}&$select=_entityid_value"
    while url:
        r = dv.session.get(url, headers={"Prefer": "odata.maxpagesize=4"}, timeout=10)
        assert r.status_code == 200, r.text
        seen += [v["_entityid_value"] for v in r.json()["value"]]
        url = r.json().get("@odata.nextLink")
    assert sorted(seen) == sorted(ids[:6])
    dv.config(skip_inactive_members=False)
    assert add([ids[6]]).status_code == 204
    assert len(dv.sandbox.state("dynamics365")["lists"][lid]["members"]) == 7


def test_official_dataverse_client(dv, monkeypatch):
    """Microsoft's own Python client (powerplatform-dataverse-client) against the sandbox: only its URL and CA."""
    azure_identity = pytest.importorskip("azure.identity")
    dataverse = pytest.importorskip("PowerPlatform.Dataverse.client")
    filters = pytest.importorskip("PowerPlatform.Dataverse.models.filters")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", dv.sandbox.info["ca_bundle"])
    monkeypatch.setenv("SSL_CERT_FILE", dv.sandbox.info["ca_bundle"])
    info = dv.info
    host = info["authority"].split("/login/", 1)[0]
    cred = azure_identity.ClientSecretCredential(info["tenant_id"], info["client_id"], info["client_secret"],
                                                 authority=host + "/login", disable_instance_discovery=True)
    client = dataverse.DataverseClient(info["base_url"], cred)
    cid = client.records.create("contact", {"firstname": "Ada", "lastname": "Lovelace",
                                            "emailaddress1": "ada@example.com"})
    rec = client.records.retrieve("contact", cid, select=["firstname", "emailaddress1"])
    assert rec["firstname"] == "Ada" and rec["emailaddress1"] == "ada@example.com"
    client.records.update("contact", cid, {"lastname": "King"})
    assert client.records.retrieve("contact", cid, select=["lastname"])["lastname"] == "King"
    more = client.records.create("contact", [{"firstname": f"B{i}", "emailaddress1": f"b{i}@example.com"}
                                             for i in range(3)])
    assert len(more) == 3
    found = client.records.list("contact", select=["emailaddress1"], filter="startswith(emailaddress1,'b')",
                                page_size=2)
    assert sorted(r["emailaddress1"] for r in found) == [f"b{i}@example.com" for i in range(3)]
    # the client's own filter builder: unquoted datetimes and GUIDs, In with double-quoted values
    col = filters.col
    since = datetime.now(UTC) - timedelta(hours=1)
    found = client.records.list("contact", select=["contactid"],
                                filter=(col("modifiedon") >= since) & col("contactid").in_([cid, more[0]]))
    assert sorted(r["contactid"] for r in found) == sorted([cid, more[0]])
    found = client.records.list("contact", select=["contactid"], filter=col("contactid") == uuid.UUID(more[1]))
    assert [r["contactid"] for r in found] == [more[1]]
    found = client.records.list("contact", select=["contactid"],
                                filter=col("modifiedon") > datetime.now(UTC) + timedelta(days=1))
    assert len(found) == 0


# -- what the Dynamics 365 -> Adobe Campaign sync reads: formatted values, custom entities, change tracking ----------
FV = "@OData.Community.Display.V1.FormattedValue"
ALL = {"Prefer": 'odata.include-annotations="*"'}
C1, C2, C3 = (str(uuid.uuid5(uuid.NAMESPACE_URL, f"fv-contact-{i}")) for i in range(3))
SYNC_SEED = {"dynamics365": {
    "columns": {"contact": {"new_tier": {"type": "choice", "options": {"100000000": "Bronze", "100000001": "Gold"}},
                            "new_vip": {"type": "boolean", "labels": {"true": "VIP", "false": "Regular"}},
                            "new_points": "integer"}},
    "contacts": [
        {"contactid": C1, "firstname": "Ada", "lastname": "Lovelace", "emailaddress1": "ada@example.com",
         "gendercode": 2, "preferredcontactmethodcode": 2, "donotbulkemail": True, "new_tier": 100000001,
         "new_vip": True, "new_points": 12500, "createdon": "2023-05-01T08:00:00Z",
         "modifiedon": "2023-06-01T14:05:00Z"},
        {"contactid": C2, "firstname": "Alan", "lastname": "Turing", "emailaddress1": "alan@example.com",
         "createdon": "2024-02-01T09:00:00Z", "modifiedon": "2024-03-01T10:00:00Z"},
        {"contactid": C3, "firstname": "Grace", "lastname": "Hopper", "emailaddress1": "grace@example.com",
         "statecode": 1, "createdon": "2024-02-02T09:00:00Z", "modifiedon": "2024-04-01T10:00:00Z"},
    ]}}


@pytest.fixture
def sync_dv(dv):
    r = dv.session.post(dv.sandbox.admin + "/seed", json=SYNC_SEED, timeout=30)
    assert r.status_code == 200, r.text
    return dv


def test_formatted_values_for_choice_boolean_lookup_datetime_and_numbers(sync_dv):
    dv = sync_dv
    select = ("firstname,gendercode,preferredcontactmethodcode,donotbulkemail,donotemail,new_tier,new_vip,"
              "new_points,statecode,statuscode,modifiedon")
    r = dv.get("contacts", params={"$select": select, "$filter": f"contactid eq {C1}"}, headers=ALL)
    assert r.status_code == 200, r.text
    assert r.headers["Preference-Applied"] == 'odata.include-annotations="*"'
    (row,) = r.json()["value"]
    expected = {"gendercode": (2, "Female"), "preferredcontactmethodcode": (2, "Email"),
                "donotbulkemail": (True, "Do Not Allow"), "donotemail": (False, "Allow"),
                "new_tier": (100000001, "Gold"), "new_vip": (True, "VIP"), "new_points": (12500, "12,500"),
                "statecode": (0, "Active"), "statuscode": (1, "Active"),
                "modifiedon": ("2023-06-01T14:05:00Z", "6/1/2023 2:05 PM")}
    for name, (value, text) in expected.items():
        assert (row[name], row[name + FV]) == (value, text), name
    assert "firstname" + FV not in row and "contactid" + FV not in row  # strings and keys have none
    keys = list(row)
    assert keys.index("gendercode" + FV) == keys.index("gendercode") - 1  # the annotation comes first
    # a null column has no annotation; only the formatted-value term when only that one is asked for
    r = dv.get(f"contacts({C2})", params={"$select": "gendercode,donotbulkemail"},
               headers={"Prefer": f'odata.include-annotations="{FV[1:]}"'})
    assert r.headers["Preference-Applied"] == f'odata.include-annotations="{FV[1:]}"'
    assert r.json()["gendercode"] is None and "gendercode" + FV not in r.json()
    assert r.json()["donotbulkemail" + FV] == "Allow"
    # no preference: no annotations and no Preference-Applied
    r = dv.get("contacts", params={"$select": "gendercode"})
    assert "Preference-Applied" not in r.headers and not any("@" in k for v in r.json()["value"] for k in v
                                                             if k != "@odata.etag")
    # several Prefer headers in one line (as Microsoft's examples send them)
    r = dv.get("contacts", params={"$select": "gendercode"},
               headers={"Prefer": 'odata.include-annotations="*", odata.maxpagesize=1'})
    assert r.headers["Preference-Applied"] == 'odata.maxpagesize=1, odata.include-annotations="*"'
    assert len(r.json()["value"]) == 1 and "@odata.nextLink" in r.json()

    # the option sets through EntityDefinitions, as the sync reads the labels
    r = dv.get("EntityDefinitions(LogicalName='contact')/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
               params={"$select": "LogicalName", "$expand": "OptionSet"})
    pick = {a["LogicalName"]: {o["Value"]: o["Label"]["UserLocalizedLabel"]["Label"]
                               for o in a["OptionSet"]["Options"]} for a in r.json()["value"]}
    assert pick["gendercode"] == {1: "Male", 2: "Female"}
    assert pick["preferredcontactmethodcode"] == {1: "Any", 2: "Email", 3: "Phone", 4: "Fax", 5: "Mail"}
    assert pick["new_tier"] == {100000000: "Bronze", 100000001: "Gold"}
    r = dv.get("EntityDefinitions(LogicalName='contact')/Attributes/Microsoft.Dynamics.CRM.BooleanAttributeMetadata",
               params={"$select": "LogicalName", "$expand": "OptionSet", "$filter": "LogicalName eq 'donotbulkemail'"})
    (attr,) = r.json()["value"]
    opts = attr["OptionSet"]
    assert (opts["TrueOption"]["Value"], opts["TrueOption"]["Label"]["UserLocalizedLabel"]["Label"]) == (1, "Do Not Allow")
    assert opts["FalseOption"]["Label"]["UserLocalizedLabel"]["Label"] == "Allow"
    # a value outside the option set is refused
    r = dv.session.patch(dv.api + f"contacts({C1})", json={"new_tier": 5}, timeout=10)
    assert r.status_code == 400


def test_loyalty_card_custom_entity_with_contact_lookup(sync_dv):
    dv = sync_dv
    r = dv.get("new_loyaltycards", params={"$select": "new_cardnumber,new_points,new_tier,_new_contactid_value"},
               headers=ALL)
    cards = r.json()["value"]
    assert len(cards) == 3 and {c["_new_contactid_value"] for c in cards} == {C1, C2, C3}  # one sample per contact
    ada = next(c for c in cards if c["_new_contactid_value"] == C1)
    assert ada["_new_contactid_value" + FV] == "Ada Lovelace"
    assert ada["_new_contactid_value@Microsoft.Dynamics.CRM.associatednavigationproperty"] == "new_ContactId"
    assert ada["_new_contactid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "contact"
    assert ada["new_tier" + FV] in ("Bronze", "Silver", "Gold", "Platinum")

    # create with the navigation property (SchemaName, case-sensitive); the lookup property is read-only
    body = {"new_name": "Card X", "new_cardnumber": "X-1", "new_points": 10, "new_tier": 100000002,
            "new_ContactId@odata.bind": f"/contacts({C2})"}
    r = dv.post("new_loyaltycards", body, headers={"Prefer": "return=representation"})
    assert r.status_code == 201, r.text
    assert r.json()["_new_contactid_value"] == C2 and r.json()["statecode"] == 0
    assert dv.post("new_loyaltycards", {**body, "new_cardnumber": "X-2", "new_ContactId@odata.bind": None,
                                        "new_contactid@odata.bind": f"/contacts({C2})"}).status_code == 400
    assert dv.post("new_loyaltycards", {"new_cardnumber": "X-3", "_new_contactid_value": C2}).status_code == 400
    # the alternate key: upsert and a duplicate refused
    r = dv.session.patch(dv.api + "new_loyaltycards(new_cardnumber='X-1')", json={"new_points": 20}, timeout=10)
    assert r.status_code == 204
    assert dv.post("new_loyaltycards", {"new_cardnumber": "X-1"}).status_code == 412
    r = dv.get("new_loyaltycards", params={"$select": "new_points", "$filter": f"_new_contactid_value eq {C2}"})
    assert sorted(c["new_points"] for c in r.json()["value"]) != [] and 20 in [c["new_points"] for c in r.json()["value"]]

    # metadata: the table, its lookup and its key
    r = dv.get("EntityDefinitions", params={"$select": "EntitySetName,PrimaryIdAttribute,ChangeTrackingEnabled",
                                            "$filter": "LogicalName eq 'new_loyaltycard'"})
    assert r.json()["value"][0]["EntitySetName"] == "new_loyaltycards"
    assert r.json()["value"][0]["ChangeTrackingEnabled"] is True
    r = dv.get("EntityDefinitions(LogicalName='new_loyaltycard')/Attributes(LogicalName='new_contactid')")
    assert (r.json()["AttributeType"], r.json()["SchemaName"], r.json()["Targets"]) == ("Lookup", "new_ContactId",
                                                                                        ["contact"])
    r = dv.get("EntityDefinitions(LogicalName='new_loyaltycard')/Keys")
    assert [k["KeyAttributes"] for k in r.json()["value"]] == [["new_cardnumber"]]

    # deleting a contact removes the link on its cards (Referential, Remove Link)
    assert dv.session.delete(dv.api + f"contacts({C2})", timeout=10).status_code == 204
    r = dv.get("new_loyaltycards", params={"$select": "new_cardnumber,_new_contactid_value",
                                           "$filter": "new_cardnumber eq 'X-1'"})
    assert r.json()["value"][0]["_new_contactid_value"] is None


def test_change_tracking_delta_links_and_deleted_records(sync_dv):
    dv = sync_dv
    track = {"Prefer": "odata.track-changes, odata.maxpagesize=2"}
    r = dv.get("contacts", params={"$select": "firstname,statecode"}, headers=track)
    assert r.status_code == 200, r.text
    assert "odata.track-changes" in r.headers["Preference-Applied"]
    first = r.json()
    assert "@odata.nextLink" in first and "@odata.deltaLink" not in first  # the delta link comes on the last page
    r = dv.session.get(first["@odata.nextLink"], headers=track, timeout=10)
    last = r.json()
    assert "@odata.nextLink" not in last and len(first["value"]) + len(last["value"]) == 3
    delta = last["@odata.deltaLink"]
    assert "$select=firstname,statecode" in delta and "$deltatoken=" in delta
    # no change yet: an empty delta with a new delta link
    r = dv.session.get(delta, timeout=10)
    assert r.status_code == 200 and r.json()["value"] == [] and "@odata.deltaLink" in r.json()

    # update, deactivate, create, delete (a contact created and deleted in between comes back as deleted too)
    assert dv.session.patch(dv.api + f"contacts({C1})", json={"firstname": "Augusta"}, timeout=10).status_code == 204
    assert dv.session.patch(dv.api + f"contacts({C2})", json={"statecode": 1}, timeout=10).status_code == 204
    new = dv.create_contacts(2, prefix="ct")
    assert dv.session.delete(dv.api + f"contacts({new[1]})", timeout=10).status_code == 204
    assert dv.session.delete(dv.api + f"contacts({C3})", timeout=10).status_code == 204
    assert dv.session.get(dv.api + "contacts/$count", params={"$deltatoken": unquote(delta.split("$deltatoken=")[1])},
                          timeout=10).text == "5"
    r = dv.session.get(delta, headers={"Prefer": "odata.maxpagesize=2"}, timeout=10)
    body = r.json()
    assert body["@odata.context"].endswith("/$metadata#contacts(firstname,statecode)/$delta")
    values = body["value"]
    while "@odata.nextLink" in body:
        body = dv.session.get(body["@odata.nextLink"], headers={"Prefer": "odata.maxpagesize=2"}, timeout=10).json()
        values += body["value"]
    changed = [v for v in values if "reason" not in v]
    deleted = [v for v in values if "reason" in v]
    assert values[:3] == changed  # new or updated first, deleted last
    assert {(v["contactid"], v["firstname"], v["statecode"]) for v in changed} == {
        (C1, "Augusta", 0), (C2, "Alan", 1), (new[0], "F0", 0)}
    assert sorted(v["id"] for v in deleted) == sorted([new[1], C3])
    assert all(v == {"@odata.context": dv.api + "$metadata#contacts/$deletedEntity", "id": v["id"],
                     "reason": "deleted"} for v in deleted)
    assert dv.session.get(body["@odata.deltaLink"], timeout=10).json()["value"] == []
    # the same delta link can be read again (tokens are versions)
    assert len(dv.session.get(delta, timeout=10).json()["value"]) == 5

    # query options the documentation says are refused with change tracking
    for opt, value in (("$filter", "statecode eq 0"), ("$orderby", "modifiedon"), ("$top", "1")):
        r = dv.get("contacts", params={"$select": "firstname", opt: value}, headers={"Prefer": "odata.track-changes"})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == (f'The "{opt}" query parameter isn\'t supported when Change Tracking '
                                                "is enabled.")
    assert dv.session.get(delta + "&$filter=statecode eq 0", timeout=10).status_code == 400
    assert dv.get("contacts", params={"$deltatoken": "garbage"}).status_code == 400

    # a table without change tracking: the preference is not applied (no delta link)
    r = dv.get("lists", params={"$select": "listname"}, headers={"Prefer": "odata.track-changes"})
    assert r.status_code == 200 and "@odata.deltaLink" not in r.json() and "Preference-Applied" not in r.headers
    dv.config(change_tracking_unsupported="error")
    assert dv.get("lists", headers={"Prefer": "odata.track-changes"}).status_code == 400
    r = dv.get("EntityDefinitions", params={"$select": "LogicalName", "$filter": "ChangeTrackingEnabled eq true"})
    assert {v["LogicalName"] for v in r.json()["value"]} == {"contact", "new_loyaltycard"}
    # per table and seedable
    seed = json.loads(json.dumps(SYNC_SEED))
    seed["dynamics365"]["change_tracking"] = {"contact": False, "list": True}
    dv.session.post(dv.sandbox.admin + "/seed", json=seed, timeout=30).raise_for_status()
    r = dv.get("contacts", headers={"Prefer": "odata.track-changes"})
    assert "@odata.deltaLink" not in r.json()
    assert "@odata.deltaLink" in dv.get("lists", headers={"Prefer": "odata.track-changes"}).json()


def test_change_tracking_on_loyalty_cards_and_rolled_back_change_sets(sync_dv):
    dv = sync_dv
    r = dv.get("new_loyaltycards", params={"$select": "new_cardnumber"}, headers={"Prefer": "odata.track-changes"})
    delta = r.json()["@odata.deltaLink"]
    card = r.json()["value"][0]["new_loyaltycardid"]
    assert dv.session.patch(dv.api + f"new_loyaltycards({card})", json={"statecode": 1},
                            timeout=10).status_code == 204
    # a failed UpsertMultiple changes nothing and records nothing
    r = dv.post("new_loyaltycards/Microsoft.Dynamics.CRM.CreateMultiple", {"Targets": [
        {"@odata.type": NS + "new_loyaltycard", "new_cardnumber": "ok-1"},
        {"@odata.type": NS + "new_loyaltycard", "new_cardnumber": "ok-1"}]})
    assert r.status_code == 412
    values = dv.session.get(delta, timeout=10).json()["value"]
    assert [(v["new_loyaltycardid"]) for v in values] == [card]
    r = dv.get(f"new_loyaltycards({card})", params={"$select": "statecode,statuscode"}, headers=ALL)
    assert (r.json()["statecode" + FV], r.json()["statuscode" + FV]) == ("Inactive", "Inactive")


def test_modifiedon_watermark_and_deactivation(sync_dv):
    dv = sync_dv
    r = dv.get("contacts", params={"$select": "contactid,modifiedon,statecode", "$orderby": "modifiedon desc",
                                   "$filter": "modifiedon ge 2024-01-01T00:00:00Z and statecode eq 0"})
    assert r.status_code == 200, r.text
    assert [v["contactid"] for v in r.json()["value"]] == [C2]
    r = dv.get("contacts", params={"$select": "modifiedon", "$orderby": "modifiedon"})
    stamps = [v["modifiedon"] for v in r.json()["value"]]
    assert stamps == sorted(stamps) and stamps[0] == "2023-06-01T14:05:00Z"
    before = datetime.now(UTC).replace(microsecond=0)
    assert dv.session.patch(dv.api + f"contacts({C1})", json={"statecode": 1}, timeout=10).status_code == 204
    rec = dv.get(f"contacts({C1})", params={"$select": "modifiedon,createdon,statecode,statuscode"}).json()
    assert rec["createdon"] == "2023-05-01T08:00:00Z" and (rec["statecode"], rec["statuscode"]) == (1, 2)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rec["modifiedon"])
    watermark = before.strftime("%Y-%m-%dT%H:%M:%SZ")
    r = dv.get("contacts", params={"$select": "contactid,statecode", "$filter": f"modifiedon ge {watermark}"})
    assert [(v["contactid"], v["statecode"]) for v in r.json()["value"]] == [(C1, 1)]
    new = dv.create_contacts(1, prefix="wm")[0]
    rec = dv.get(f"contacts({new})", params={"$select": "createdon,modifiedon"}).json()
    assert rec["createdon"] == rec["modifiedon"] >= watermark


# -- UpsertMultiple by alternate key; the email events' event-ID key (SANDBOX-FIDELITY section 4 item 2) ----------

def _event(event_id: str, cid: str, subject: str = "Email open", **extra) -> dict:
    return {"@odata.type": NS + "new_emailevent", "@odata.id": f"new_emailevents(new_eventid='{event_id}')",
            "subject": subject, "new_eventtype": 100000001,
            "regardingobjectid_contact_new_emailevent@odata.bind": f"/contacts({cid})", **extra}


def test_upsert_multiple_identifies_targets_by_alternate_key_and_answers_204(dv):
    cid = dv.create_contacts(1, prefix="ups")[0]
    r = dv.post("new_emailevents/Microsoft.Dynamics.CRM.UpsertMultiple",
                {"Targets": [_event("ev-1", cid), _event("ev-2", cid)]})
    assert r.status_code == 204 and not r.content  # no UpsertMultipleResponse, no Ids
    # the same keys again (a replay): updated, not created twice; a new key: created
    r = dv.post("new_emailevents/Microsoft.Dynamics.CRM.UpsertMultiple",
                {"Targets": [_event("ev-1", cid, "Email open (again)"), _event("ev-3", cid)]})
    assert r.status_code == 204
    rows = dv.get("new_emailevents", params={"$select": "new_eventid,subject,_regardingobjectid_value"}).json()["value"]
    assert sorted((e["new_eventid"], e["subject"]) for e in rows) == [
        ("ev-1", "Email open (again)"), ("ev-2", "Email open"), ("ev-3", "Email open")]
    assert {e["_regardingobjectid_value"] for e in rows} == {cid}
    # the key columns in the body identify the record too; an absolute @odata.id as well
    body = _event("ev-2", cid, "by body")
    del body["@odata.id"]
    body["new_eventid"] = "ev-2"
    absolute = _event("ev-3", cid, "absolute")
    absolute["@odata.id"] = dv.api + "new_emailevents(new_eventid='ev-3')"
    assert dv.post("new_emailevents/Microsoft.Dynamics.CRM.UpsertMultiple",
                   {"Targets": [body, absolute]}).status_code == 204
    got = {e["new_eventid"]: e["subject"] for e in dv.get("new_emailevents", params={
        "$select": "new_eventid,subject"}).json()["value"]}
    assert got == {"ev-1": "Email open (again)", "ev-2": "by body", "ev-3": "absolute"}
    # one record via PATCH by the key as well
    r = dv.get("new_emailevents(new_eventid='ev-1')", params={"$select": "subject"})
    assert r.status_code == 200 and r.json()["subject"] == "Email open (again)"


def test_upsert_multiple_is_all_or_nothing_and_refuses_a_key_of_another_set(dv):
    cid = dv.create_contacts(1, prefix="upa")[0]
    missing = str(uuid.uuid4())
    r = dv.post("new_emailevents/Microsoft.Dynamics.CRM.UpsertMultiple",
                {"Targets": [_event("ok-1", cid), _event("bad-1", missing)]})
    assert r.status_code == 404 and missing in r.json()["error"]["message"]
    assert dv.get("new_emailevents", params={"$select": "new_eventid"}).json()["value"] == []
    wrong = _event("x", cid)
    wrong["@odata.id"] = "contacts(new_customerid='x')"
    assert dv.post("new_emailevents/Microsoft.Dynamics.CRM.UpsertMultiple", {"Targets": [wrong]}).status_code == 400
    # an alternate key not defined on the table
    wrong["@odata.id"] = "new_emailevents(subject='x')"
    assert dv.post("new_emailevents/Microsoft.Dynamics.CRM.UpsertMultiple", {"Targets": [wrong]}).status_code == 400


def test_upsert_multiple_by_primary_key_and_contacts_alternate_key(dv):
    cid = dv.create_contacts(1, prefix="upk")[0]
    new_id = str(uuid.uuid4())
    r = dv.post("contacts/Microsoft.Dynamics.CRM.UpsertMultiple", {"Targets": [
        {"@odata.type": NS + "contact", "@odata.id": f"contacts({cid})", "firstname": "Changed"},
        {"@odata.type": NS + "contact", "@odata.id": f"contacts({new_id})", "lastname": "New"},
        {"@odata.type": NS + "contact", "@odata.id": "contacts(new_customerid='C-77')", "lastname": "Keyed"}]})
    assert r.status_code == 204
    assert dv.get(f"contacts({cid})").json()["firstname"] == "Changed"
    assert dv.get(f"contacts({new_id})").json()["lastname"] == "New"
    keyed = dv.get("contacts(new_customerid='C-77')").json()
    assert keyed["lastname"] == "Keyed"
    r = dv.post("contacts/Microsoft.Dynamics.CRM.UpsertMultiple", {"Targets": [
        {"@odata.type": NS + "contact", "@odata.id": "contacts(new_customerid='C-77')", "lastname": "Again"}]})
    assert r.status_code == 204
    assert dv.get("contacts(new_customerid='C-77')").json()["contactid"] == keyed["contactid"]
    assert len(dv.get("contacts", params={"$filter": "new_customerid eq 'C-77'"}).json()["value"]) == 1


def test_email_event_id_is_an_alternate_key(dv):
    cid = dv.create_contacts(1, prefix="evk")[0]
    body = {"subject": "s", "new_eventid": "E-1", "regardingobjectid_contact_new_emailevent@odata.bind": f"/contacts({cid})"}
    assert dv.post("new_emailevents", body).status_code == 204
    r = dv.post("new_emailevents", body)
    assert r.status_code == 412  # the key is unique
    keys = dv.get("EntityDefinitions(LogicalName='new_emailevent')/Keys").json()["value"]
    assert [k["KeyAttributes"] for k in keys] == [["new_eventid"]]
    attrs = dv.get("EntityDefinitions(LogicalName='new_emailevent')/Attributes",
                   params={"$select": "LogicalName"}).json()["value"]
    assert {"new_eventid", "new_bouncetype"} <= {a["LogicalName"] for a in attrs}
