"""The Campaign Monitor emulator answers as API v3.3 does (API-FACTS section 2)."""

from __future__ import annotations

import shutil

import createsend
import createsend.utils
import pytest
import requests


@pytest.fixture(autouse=True)
def _no_ca_env(monkeypatch):
    """requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override ``Session.verify``; drop them (see report)."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@pytest.fixture
def cm(sandbox):
    info = sandbox.info["campaign_monitor"]
    session = requests.Session()
    session.verify = sandbox.info["ca_bundle"]
    session.auth = (info["api_key"], "x")
    base = info["base_url"]
    list_id = info["list_id"]

    class CM:
        pass

    c = CM()
    c.info, c.session, c.base, c.list_id = info, session, base, list_id
    c.url = lambda path: base + path
    c.config = lambda **values: session.post(sandbox.admin + "/campaign_monitor/config", json=values,
                                             timeout=10).json()
    yield c
    session.close()


def _sub(email, name="", consent="Yes", **extra):
    out = {"EmailAddress": email, "Name": name, "ConsentToTrack": consent}
    out.update(extra)
    return out


def test_official_client_imports_and_reads_list(sandbox, cm, monkeypatch, tmp_path):
    # The SDK trusts only the cacert.pem next to createsend/utils.py: point that file's directory at ours.
    shutil.copy(sandbox.info["ca_bundle"], tmp_path / "cacert.pem")
    monkeypatch.setattr(createsend.utils, "__file__", str(tmp_path / "utils.py"))
    monkeypatch.setattr(createsend.CreateSend, "base_uri", cm.base)
    auth = {"api_key": cm.info["api_key"]}

    lst = createsend.List(auth, cm.list_id)
    details = lst.details()
    assert details.ListID == cm.list_id and details.Title
    assert lst.create_custom_field("Customer Id", "Text") == "[CustomerId]"

    result = createsend.Subscriber(auth).import_subscribers(cm.list_id, [
        _sub("ann@example.com", "Ann", CustomFields=[{"Key": "CustomerId", "Value": "42"}]),
        _sub("bob@example.com", "Bob"),
        _sub("not-an-email", "Bad"),
    ], False)
    # 400 Code 210: the SDK returns ResultData as if it were a success
    assert result.TotalNewSubscribers == 2
    assert [(f.EmailAddress, f.Code) for f in result.FailureDetails] == [("not-an-email", 1)]

    sub = createsend.Subscriber(auth, cm.list_id, "ann@example.com").get(include_tracking_preference=True)
    assert sub.State == "Active" and sub.Name == "Ann" and sub.ConsentToTrack == "Yes"
    # read back with the field name as Key, no brackets (createsend-python fixture subscriber_details.json)
    assert [(f.Key, f.Value) for f in sub.CustomFields] == [("Customer Id", "42")]

    with pytest.raises(createsend.BadRequest) as exc:
        createsend.Subscriber(auth, cm.list_id, "nobody@example.com").get()
    assert exc.value.data.Code == 203

    with pytest.raises(createsend.Unauthorized) as exc:
        createsend.List({"api_key": "wrong"}, cm.list_id).details()
    assert exc.value.data.Code == 100


def test_auth_errors_are_json(cm):
    r = requests.get(cm.url(f"/lists/{cm.list_id}.json"), verify=cm.session.verify, timeout=10)
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"Code": 50, "Message": "Must supply a valid HTTP Basic Authorization header"}
    r = requests.get(cm.url(f"/lists/{cm.list_id}.json"), auth=("nope", "x"), verify=cm.session.verify,
                     timeout=10)
    assert r.status_code == 401 and r.json() == {"Code": 100, "Message": "Invalid API Key"}
    r = cm.session.get(cm.url("/lists/unknownlist.json"), timeout=10)
    assert r.status_code == 400 and r.json()["Code"] == 101


def test_import_limit_209_and_success_201(sandbox, cm):
    too_many = [_sub(f"u{i}@example.com") for i in range(1001)]
    r = cm.session.post(cm.url(f"/subscribers/{cm.list_id}/import.json"),
                        json={"Subscribers": too_many, "Resubscribe": False}, timeout=30)
    assert r.status_code == 400
    assert r.json() == {"Code": 209, "Message": "Too many subscribers in this batch. You can only add 1000 "
                                                "subscribers in one call"}
    assert sandbox.state("campaign_monitor")["lists"][cm.list_id]["subscribers"] == {}

    r = cm.session.post(cm.url(f"/subscribers/{cm.list_id}/import.json"),
                        json={"Subscribers": too_many[:1000] + [], "Resubscribe": False}, timeout=30)
    assert r.status_code == 201
    assert r.json() == {"FailureDetails": [], "TotalUniqueEmailsSubmitted": 1000, "TotalExistingSubscribers": 0,
                        "TotalNewSubscribers": 1000, "DuplicateEmailsInSubmission": []}
    assert sandbox.requests()["items_received"]["campaign_monitor"] == 1000

    r = cm.session.post(cm.url(f"/subscribers/{cm.list_id}/import.json"),
                        json={"Subscribers": [_sub("u1@example.com", "New name"), _sub("U1@example.com")]},
                        timeout=30)
    assert r.status_code == 201
    assert r.json()["TotalExistingSubscribers"] == 1
    assert r.json()["DuplicateEmailsInSubmission"] == ["U1@example.com"]
    r = cm.session.post(cm.url(f"/subscribers/{cm.list_id}/import.json"), json={"Subscribers": []}, timeout=10)
    assert r.status_code == 400 and r.json()["Code"] == 212


def test_partial_import_210_keeps_inactive_and_requires_consent(sandbox, cm):
    lid = cm.list_id
    for email in ("gone@example.com", "unsub@example.com"):
        r = cm.session.post(cm.url(f"/subscribers/{lid}.json"), json=_sub(email, "X"), timeout=10)
        assert r.status_code == 201 and r.json() == email
    assert cm.session.post(cm.url(f"/subscribers/{lid}/unsubscribe.json"),
                           json={"EmailAddress": "unsub@example.com"}, timeout=10).status_code == 200
    assert cm.session.delete(cm.url(f"/subscribers/{lid}.json"), params={"email": "gone@example.com"},
                             timeout=10).status_code == 200

    body = {"Subscribers": [_sub("gone@example.com"), _sub("unsub@example.com"), _sub("ok@example.com"),
                            {"EmailAddress": "noconsent@example.com", "Name": "N"},
                            _sub("weird@example.com", consent="maybe")],
            "Resubscribe": False, "QueueSubscriptionBasedAutoresponders": False,
            "RestartSubscriptionBasedAutoresponders": False}
    r = cm.session.post(cm.url(f"/subscribers/{lid}/import.json"), json=body, timeout=10)
    assert r.status_code == 400
    data = r.json()
    assert data["Code"] == 210 and data["Message"] == "Subscriber Import had some failures"
    codes = {f["EmailAddress"]: f["Code"] for f in data["ResultData"]["FailureDetails"]}
    assert codes == {"gone@example.com": 205, "unsub@example.com": 206, "noconsent@example.com": 214,
                     "weird@example.com": 215}
    assert data["ResultData"]["TotalNewSubscribers"] == 1
    subs = sandbox.state("campaign_monitor")["lists"][lid]["subscribers"]
    assert subs["ok@example.com"]["state"] == "Active"          # the good row was imported
    assert subs["gone@example.com"]["state"] == "Deleted"        # not resubscribed
    assert subs["unsub@example.com"]["state"] == "Unsubscribed"

    body["Resubscribe"] = True
    body["Subscribers"] = body["Subscribers"][:2]
    r = cm.session.post(cm.url(f"/subscribers/{lid}/import.json"), json=body, timeout=10)
    assert r.status_code == 201 and r.json()["TotalExistingSubscribers"] == 2
    subs = sandbox.state("campaign_monitor")["lists"][lid]["subscribers"]
    assert subs["gone@example.com"]["state"] == subs["unsub@example.com"]["state"] == "Active"

    cm.config(require_consent_to_track=False)
    r = cm.session.post(cm.url(f"/subscribers/{lid}/import.json"),
                        json={"Subscribers": [{"EmailAddress": "lax@example.com"}]}, timeout=10)
    assert r.status_code == 201


def test_single_subscriber_update_get_delete(cm):
    lid = cm.list_id
    cm.session.post(cm.url(f"/lists/{lid}/customfields.json"),
                    json={"FieldName": "Tier", "DataType": "Text", "Options": [], "VisibleInPreferenceCenter": True},
                    timeout=10)
    r = cm.session.post(cm.url(f"/lists/{lid}/customfields.json"), json={"FieldName": "Tier", "DataType": "Text"},
                        timeout=10)
    assert r.status_code == 400 and r.json()["Code"] == 255
    fields = cm.session.get(cm.url(f"/lists/{lid}/customfields.json"), timeout=10).json()
    assert fields[0]["Key"] == "[Tier]" and fields[0]["DataType"] == "Text"

    r = cm.session.post(cm.url(f"/subscribers/{lid}.json"),
                        json=_sub("a@example.com", "A", CustomFields=[{"Key": "[Tier]", "Value": "gold"}]), timeout=10)
    assert r.status_code == 201
    r = cm.session.put(cm.url(f"/subscribers/{lid}.json"), params={"email": "a@example.com"},
                       json=_sub("b@example.com", "B", consent="Unchanged"), timeout=10)
    assert r.status_code == 200 and r.content == b""
    r = cm.session.put(cm.url(f"/subscribers/{lid}.json"), params={"email": "b@example.com"},
                       json=_sub("not valid", "B"), timeout=10)
    assert r.status_code == 400 and r.json()["Code"] == 211
    got = cm.session.get(cm.url(f"/subscribers/{lid}.json"), params={"email": "b@example.com"}, timeout=10).json()
    assert got["EmailAddress"] == "b@example.com" and got["Name"] == "B" and got["State"] == "Active"
    assert got["CustomFields"] == [{"Key": "Tier", "Value": "gold"}]
    assert cm.session.delete(cm.url(f"/subscribers/{lid}.json"), params={"email": "b@example.com"},
                             timeout=10).status_code == 200
    got = cm.session.get(cm.url(f"/subscribers/{lid}.json"), params={"email": "b@example.com"}, timeout=10).json()
    assert got["State"] == "Deleted"
    page = cm.session.get(cm.url(f"/lists/{lid}/deleted.json"), params={"page": 1, "pagesize": 10}, timeout=10).json()
    assert page["TotalNumberOfRecords"] == 1 and page["Results"][0]["EmailAddress"] == "b@example.com"
    r = cm.session.get(cm.url(f"/lists/{lid}/active.json"), params={"pagesize": 5}, timeout=10)
    assert r.status_code == 400 and r.json()["Code"] == 801


def test_rate_limit_429_with_headers(cm):
    cm.config(rate_limit=3, rate_period=30)
    url = cm.url("/systemdate.json")
    seen = []
    for _ in range(3):
        r = cm.session.get(url, timeout=10)
        assert r.status_code == 200
        seen.append(int(r.headers["X-RateLimit-Remaining"]))
        assert r.headers["X-RateLimit-Limit"] == "3"
    assert seen == [2, 1, 0]
    r = cm.session.get(url, timeout=10)
    assert r.status_code == 429
    assert r.json() == {"Code": 429, "Message": "Rate limit exceeded"}
    assert r.headers["X-RateLimit-Limit"] == "3" and r.headers["X-RateLimit-Remaining"] == "0"
    assert 0 < int(r.headers["X-RateLimit-Reset"]) <= 30


def test_injected_burst429_looks_like_the_real_one(sandbox, cm):
    sandbox.fault(kind="burst429", vendor="campaign_monitor", count=1)
    r = cm.session.get(cm.url(f"/lists/{cm.list_id}.json"), timeout=10)
    assert r.status_code == 429 and r.json() == {"Code": 429, "Message": "Rate limit exceeded"}
    assert r.headers["X-RateLimit-Remaining"] == "0" and int(r.headers["X-RateLimit-Reset"]) > 0
    sandbox.fault(kind="status", status=503, vendor="campaign_monitor", count=1)
    r = cm.session.get(cm.url(f"/lists/{cm.list_id}.json"), timeout=10)
    assert r.status_code == 503 and r.json()["Code"] == 503
