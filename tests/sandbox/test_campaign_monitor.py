"""The Campaign Monitor emulator answers as API v3.3 does (API-FACTS section 2)."""

from __future__ import annotations

import json
import shutil

import createsend
import createsend.utils
import pytest
import requests

from airflow_provider_segexport.sandbox.campaign_monitor import CampaignMonitorEmulator


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


# -- fidelity: custom fields, listings, states (shared/SANDBOX-FIDELITY.md items 3, 11, 12, 15) -------------

@pytest.fixture
def official(sandbox, cm, monkeypatch, tmp_path):
    """The official createsend client pointed at the sandbox: (auth, List, Subscriber factory)."""
    shutil.copy(sandbox.info["ca_bundle"], tmp_path / "cacert.pem")
    monkeypatch.setattr(createsend.utils, "__file__", str(tmp_path / "utils.py"))
    monkeypatch.setattr(createsend.CreateSend, "base_uri", cm.base)
    auth = {"api_key": cm.info["api_key"]}
    return auth, createsend.List(auth, cm.list_id)


def _seed(sandbox, campaign_monitor: dict) -> None:
    """Seed only the Campaign Monitor part (the ``sandbox`` fixture restores the initial seed afterwards)."""
    seed = json.loads(json.dumps(sandbox.server.initial_seed))
    seed["campaign_monitor"] = campaign_monitor
    sandbox.session.post(f"{sandbox.admin}/seed", json=seed, timeout=60).raise_for_status()


FIXTURE_FIELDS = [("website", "Text", []), ("multi select field", "MultiSelectMany", ["option one", "option two"]),
                  ("age", "Number", []), ("subscription date", "Date", [])]


def test_custom_fields_read_back_keyed_by_field_name(official, cm):
    """createsend-python fixtures subscriber_details.json / active_subscribers.json: Key = FieldName, no brackets,
    one entry per selected MultiSelectMany option, dates as YYYY-MM-DD; ConsentToTrack only when asked for."""
    auth, lst = official
    keys = [lst.create_custom_field(name, kind, options) for name, kind, options in FIXTURE_FIELDS]
    assert keys == ["[website]", "[multiselectfield]", "[age]", "[subscriptiondate]"]
    fields = lst.custom_fields()
    assert [(f.FieldName, f.Key, f.DataType, f.FieldOptions) for f in fields] == [
        (n, k, t, o) for (n, t, o), k in zip(FIXTURE_FIELDS, keys, strict=True)]

    # input: the key with or without brackets, any case; given in any order
    custom = [{"Key": "[subscriptiondate]", "Value": "2010/03/09"}, {"Key": "AGE", "Value": "24"},
              {"Key": "website", "Value": "https://example.com"},
              {"Key": "multiselectfield", "Value": "option one"}, {"Key": "[multiselectfield]", "Value": "option two"}]
    sub_api = createsend.Subscriber(auth)
    assert sub_api.add(cm.list_id, "subs+7t8787Y@example.com", "Person One", custom, False, "Yes") == \
        "subs+7t8787Y@example.com"
    expected = [("website", "https://example.com"), ("multi select field", "option one"),
                ("multi select field", "option two"), ("age", "24"), ("subscription date", "2010-03-09")]

    got = createsend.Subscriber(auth, cm.list_id, "subs+7t8787Y@example.com").get()
    assert [(f.Key, f.Value) for f in got.CustomFields] == expected
    assert not hasattr(got, "ConsentToTrack")
    got = createsend.Subscriber(auth, cm.list_id, "subs+7t8787Y@example.com").get(include_tracking_preference=True)
    assert got.ConsentToTrack == "Yes" and got.Date == got.ListJoinedDate

    page = lst.active()  # the SDK sends orderfield=email&orderdirection=asc&includetrackingpreference=False
    assert (page.ResultsOrderedBy, page.OrderDirection, page.TotalNumberOfRecords) == ("email", "asc", 1)
    assert [(f.Key, f.Value) for f in page.Results[0].CustomFields] == expected
    assert not hasattr(page.Results[0], "ConsentToTrack")
    page = lst.active(include_tracking_preference=True)
    assert page.Results[0].ConsentToTrack == "Yes"

    # the FieldName is not a key: "subscription date" does not address [subscriptiondate]
    sub_api.add(cm.list_id, "subs+7t8787Y@example.com", "Person One",
                [{"Key": "subscription date", "Value": "2011/01/01"}], False, "Unchanged")
    got = createsend.Subscriber(auth, cm.list_id, "subs+7t8787Y@example.com").get()
    assert ("subscription date", "2010-03-09") in [(f.Key, f.Value) for f in got.CustomFields]

    # unsubscribed / deleted listings read the same way
    createsend.Subscriber(auth, cm.list_id, "subs+7t8787Y@example.com").unsubscribe()
    page = lst.unsubscribed()
    assert [(f.Key, f.Value) for f in page.Results[0].CustomFields] == expected
    createsend.Subscriber(auth, cm.list_id, "subs+7t8787Y@example.com").delete()
    page = lst.deleted()
    assert page.Results[0].State == "Deleted"
    assert [(f.Key, f.Value) for f in page.Results[0].CustomFields] == expected


def _import_one(cm, custom, email="v@example.com", **extra):
    """Import one subscriber with these CustomFields; the answer must be a clean 201. Returns its fields read back."""
    r = cm.session.post(cm.url(f"/subscribers/{cm.list_id}/import.json"),
                        json={"Subscribers": [_sub(email, "V", CustomFields=custom, **extra)], "Resubscribe": False},
                        timeout=10)
    assert r.status_code == 201, r.text
    assert r.json()["FailureDetails"] == []
    got = cm.session.get(cm.url(f"/subscribers/{cm.list_id}.json"), params={"email": email}, timeout=10).json()
    return [(f["Key"], f["Value"]) for f in got["CustomFields"]]


def test_custom_field_values_campaign_monitor_ignores(official, cm):
    """CM subscribers doc: a date before 1900/01/01 or after 2076/06/06 "will be ignored"; values are limited
    to 250 characters. Invalid numbers / dates and options not in FieldOptions are dropped too; the subscriber
    is imported all the same."""
    _, lst = official
    lst.create_custom_field("When", "Date")
    lst.create_custom_field("Score", "Number")
    lst.create_custom_field("Tier", "MultiSelectOne", ["gold", "silver"])
    lst.create_custom_field("Segments", "MultiSelectMany", ["a", "b", "c"])
    lst.create_custom_field("Note", "Text")

    def one(key, value, email):
        return _import_one(cm, [{"Key": key, "Value": value}], email=email)

    for i, (value, stored) in enumerate([("1900/01/01", "1900-01-01"), ("2076/06/06", "2076-06-06"),
                                         ("2020-12-31", "2020-12-31"), ("2010/3/9", "2010-03-09"),
                                         ("1899/12/31", None), ("2076/06/07", None), ("2021/02/30", None),
                                         ("31/12/2020", None), ("12/31/2020", None), ("tomorrow", None),
                                         ("2020/12/31 10:00", None)]):
        assert one("[When]", value, f"d{i}@example.com") == ([("When", stored)] if stored else []), value
    for i, (value, stored) in enumerate([("42", "42"), ("-3.5", "-3.5"), (7, "7"), ("4 2", None), ("abc", None),
                                         ("1e5", None), ("1,000", None)]):
        assert one("Score", value, f"n{i}@example.com") == ([("Score", stored)] if stored else []), value
    assert one("Tier", "gold", "t1@example.com") == [("Tier", "gold")]
    assert one("Tier", "Gold", "t2@example.com") == []
    assert one("Tier", "bronze", "t3@example.com") == []
    assert _import_one(cm, [{"Key": "Segments", "Value": v} for v in ("a", "zzz", "c", "a")],
                       email="m@example.com") == [("Segments", "a"), ("Segments", "c")]
    assert one("Note", "x" * 250, "l1@example.com") == [("Note", "x" * 250)]
    assert one("Note", "x" * 251, "l2@example.com") == []
    cm.config(long_value="truncate")
    assert one("Note", "y" * 300, "l3@example.com") == [("Note", "y" * 250)]
    assert one("Nope", "unknown keys are ignored", "u@example.com") == []

    # updates: a value that is ignored leaves the stored one; MultiSelectMany values replace the selection;
    # Clear clears (one option when a Value is given); 0000-00-00 clears a date; an empty Value changes nothing
    email = "m@example.com"
    assert _import_one(cm, [{"Key": "When", "Value": "2020/01/02"}, {"Key": "Tier", "Value": "silver"}],
                       email=email) == [("When", "2020-01-02"), ("Tier", "silver"), ("Segments", "a"), ("Segments", "c")]
    assert _import_one(cm, [{"Key": "When", "Value": "1800/01/01"}, {"Key": "Segments", "Value": "b"},
                            {"Key": "Tier", "Value": "platinum"}], email=email) == [
        ("When", "2020-01-02"), ("Tier", "silver"), ("Segments", "b")]
    assert _import_one(cm, [{"Key": "Segments", "Value": "a"}, {"Key": "Segments", "Value": "c"}], email=email) == [
        ("When", "2020-01-02"), ("Tier", "silver"), ("Segments", "a"), ("Segments", "c")]
    assert _import_one(cm, [{"Key": "Segments", "Value": "a", "Clear": True}, {"Key": "When", "Value": "0000-00-00"},
                            {"Key": "Tier", "Value": ""}], email=email) == [("Tier", "silver"), ("Segments", "c")]
    assert _import_one(cm, [{"Key": "Segments", "Value": "", "Clear": True},
                            {"Key": "Tier", "Value": "", "Clear": True}], email=email) == []

    # single add and update apply the same rules
    r = cm.session.put(cm.url(f"/subscribers/{cm.list_id}.json"), params={"email": email},
                       json=_sub(email, "V", CustomFields=[{"Key": "Score", "Value": "NaN"},
                                                           {"Key": "Score", "Value": "12"}]), timeout=10)
    assert r.status_code == 200
    got = cm.session.get(cm.url(f"/subscribers/{cm.list_id}.json"), params={"email": email}, timeout=10).json()
    assert got["CustomFields"] == [{"Key": "Score", "Value": "12"}]


def test_custom_field_definitions_and_options_official_client(official, cm):
    """createsend-python list.py create/update/delete custom field and update_custom_field_options; error codes
    as CM's lists documentation lists them (253-259)."""
    auth, lst = official
    assert lst.create_custom_field("Segments", "MultiSelectMany", ["vip"], False) == "[Segments]"
    assert lst.create_custom_field("Customer Id", "Text") == "[CustomerId]"
    for args, code in ((("segments", "Text"), 255), (("", "Text"), 254), (("Colour", "Colour"), 259),
                       (("Colour", "MultiSelectOne", []), 257), (("Colour", "Text", ["red"]), 256)):
        with pytest.raises(createsend.BadRequest) as exc:
            lst.create_custom_field(*args)
        assert exc.value.data.Code == code, args

    lst.update_custom_field_options("[Segments]", ["churn", "vip"], True)
    assert _field(lst, "[Segments]").FieldOptions == ["vip", "churn"]
    createsend.Subscriber(auth).add(cm.list_id, "a@example.com", "A", [
        {"Key": "[Segments]", "Value": "vip"}, {"Key": "[Segments]", "Value": "churn"},
        {"Key": "[CustomerId]", "Value": "42"}], False, "Yes")
    lst.update_custom_field_options("[Segments]", ["new"], False)
    assert _field(lst, "[Segments]").FieldOptions == ["new"]
    for key, options, code in (("[CustomerId]", ["x"], 256), ("[Nope]", ["x"], 253), ("Segments", ["x"], 253),
                               ("[Segments]", [], 257)):
        with pytest.raises(createsend.BadRequest) as exc:
            lst.update_custom_field_options(key, options, True)
        assert exc.value.data.Code == code, key

    # rename: the key follows the name (fixture update_custom_field.json) and stored values follow the field
    assert lst.update_custom_field("[Segments]", "Segment names", True) == "[Segmentnames]"
    f = _field(lst, "[Segmentnames]")
    assert (f.FieldName, f.VisibleInPreferenceCenter) == ("Segment names", True)
    got = createsend.Subscriber(auth, cm.list_id, "a@example.com").get()
    assert [(c.Key, c.Value) for c in got.CustomFields] == [
        ("Segment names", "vip"), ("Segment names", "churn"), ("Customer Id", "42")]
    with pytest.raises(createsend.BadRequest) as exc:
        lst.update_custom_field("[Segmentnames]", "Customer Id", True)
    assert exc.value.data.Code == 255

    lst.delete_custom_field("[Segmentnames]")
    assert [f.Key for f in lst.custom_fields()] == ["[CustomerId]"]
    got = createsend.Subscriber(auth, cm.list_id, "a@example.com").get()
    assert [(c.Key, c.Value) for c in got.CustomFields] == [("Customer Id", "42")]
    with pytest.raises(createsend.BadRequest) as exc:
        lst.delete_custom_field("[Segmentnames]")
    assert exc.value.data.Code == 253


def _field(lst, key):
    return next(f for f in lst.custom_fields() if f.Key == key)


def test_listings_sort_whole_set_before_paging(sandbox, cm, official):
    """orderfield email|name|date and orderdirection asc|desc apply to the whole result, then the page is cut."""
    subscribers = [{"EmailAddress": f"{c}{i}@example.com", "Name": f"{n} {i:02d}", "Date": f"2024-01-{d:02d} 10:00:00"}
                   for i, (c, n, d) in enumerate(zip("qwertyuiopasdfghjklz", "MKLBANOPCDQRSETFGHIJ",
                                                     [5, 3, 9, 1, 20, 7, 11, 2, 15, 4, 6, 8, 10, 12, 13, 14, 16, 17,
                                                      18, 19], strict=True))]
    _seed(sandbox, {"subscribers": subscribers})
    _, lst = official

    def whole(order_field, direction, pagesize=10):
        pages, page = [], 1
        while True:
            r = cm.session.get(cm.url(f"/lists/{cm.list_id}/active.json"),
                               params={"page": page, "pagesize": pagesize, "orderfield": order_field,
                                       "orderdirection": direction}, timeout=10).json()
            assert (r["ResultsOrderedBy"], r["OrderDirection"]) == (order_field or "date", direction)
            assert r["TotalNumberOfRecords"] == 20 and r["NumberOfPages"] == 2
            pages += r["Results"]
            if page >= r["NumberOfPages"]:
                return pages
            page += 1

    by_email = sorted(s["EmailAddress"] for s in subscribers)
    assert [s["EmailAddress"] for s in whole("email", "asc")] == by_email
    assert [s["EmailAddress"] for s in whole("email", "desc")] == by_email[::-1]
    by_name = sorted(s["Name"] for s in subscribers)
    assert [s["Name"] for s in whole("name", "asc")] == by_name
    assert [s["Name"] for s in whole("name", "desc")] == by_name[::-1]
    by_date = sorted(s["Date"] for s in subscribers)
    assert [s["Date"] for s in whole("date", "asc")] == by_date
    assert [s["Date"] for s in whole("", "desc")] == by_date[::-1]  # no orderfield: by date
    assert "ConsentToTrack" not in whole("email", "asc")[0]

    page = lst.active(page=2, page_size=10, order_field="email", order_direction="desc")
    assert [s.EmailAddress for s in page.Results] == by_email[::-1][10:]
    page = lst.active(date="2024-01-15", order_field="date")
    assert [s.Date[:10] for s in page.Results] == [f"2024-01-{d}" for d in range(15, 21)]


def test_seeded_states_with_custom_fields(sandbox, cm, official):
    """A seed holds subscribers in every state (and suppressed) with custom field values; import without
    Resubscribe refuses each inactive one with its code (204-208) and leaves it as it was; a single add with
    Resubscribe true brings a Deleted subscriber back to Active."""
    fields = lambda v: [{"Key": "[CustomerId]", "Value": v}, {"Key": "Segments", "Value": "vip"}]  # noqa: E731
    _seed(sandbox, {
        "custom_fields": [{"FieldName": "CustomerId", "DataType": "Text"},
                          {"FieldName": "Segments", "DataType": "MultiSelectMany", "Options": ["vip", "churn"]}],
        "subscribers": [
            {"EmailAddress": "active@example.com", "Name": "A", "State": "Active", "CustomFields": fields("1")},
            {"EmailAddress": "unsub@example.com", "State": "Unsubscribed", "CustomFields": fields("2"),
             "ConsentToTrack": "No", "Date": "2024-05-01 10:00:00", "ListJoinedDate": "2023-01-01 09:00:00"},
            {"EmailAddress": "bounced@example.com", "State": "Bounced", "CustomFields": fields("3")},
            {"EmailAddress": "deleted@example.com", "State": "Deleted", "CustomFields": fields("4")},
            {"EmailAddress": "unconfirmed@example.com", "State": "Unconfirmed", "CustomFields": fields("5")},
            {"EmailAddress": "suppressed@example.com", "State": "Unsubscribed", "Suppressed": True,
             "CustomFields": fields("6")},
            {"EmailAddress": "legacy@example.com", "CustomFields": [{"Key": "Region", "Value": "EU"}]},
        ],
        "suppression_list": ["never@example.com"],
    })
    auth, lst = official
    assert [f.Key for f in lst.custom_fields()] == ["[CustomerId]", "[Segments]", "[Region]"]
    listed = {name: [s.EmailAddress for s in getattr(lst, name)().Results]
              for name in ("active", "unsubscribed", "bounced", "deleted", "unconfirmed")}
    assert listed == {"active": ["active@example.com", "legacy@example.com"],
                      "unsubscribed": ["suppressed@example.com", "unsub@example.com"],
                      "bounced": ["bounced@example.com"], "deleted": ["deleted@example.com"],
                      "unconfirmed": ["unconfirmed@example.com"]}
    got = createsend.Subscriber(auth, cm.list_id, "unsub@example.com").get(include_tracking_preference=True)
    assert (got.State, got.Date, got.ListJoinedDate, got.ConsentToTrack) == (
        "Unsubscribed", "2024-05-01 10:00:00", "2023-01-01 09:00:00", "No")
    assert [(f.Key, f.Value) for f in got.CustomFields] == [("CustomerId", "2"), ("Segments", "vip")]
    state = sandbox.state("campaign_monitor")
    assert state["suppression_list"] == ["never@example.com", "suppressed@example.com"]

    emails = ["active", "unsub", "bounced", "deleted", "unconfirmed", "suppressed", "never"]
    result = createsend.Subscriber(auth).import_subscribers(cm.list_id, [
        _sub(f"{e}@example.com", CustomFields=[{"Key": "CustomerId", "Value": "changed"}]) for e in emails], False)
    assert {f.EmailAddress: f.Code for f in result.FailureDetails} == {
        "unsub@example.com": 206, "bounced@example.com": 207, "deleted@example.com": 205,
        "unconfirmed@example.com": 208, "suppressed@example.com": 204, "never@example.com": 204}
    assert (result.TotalExistingSubscribers, result.TotalNewSubscribers) == (1, 0)
    subs = sandbox.state("campaign_monitor")["lists"][cm.list_id]["subscribers"]
    assert subs["deleted@example.com"]["state"] == "Deleted"
    assert subs["deleted@example.com"]["custom_fields"][0] == {"Key": "CustomerId", "Value": "4"}  # untouched
    assert subs["active@example.com"]["custom_fields"][0] == {"Key": "CustomerId", "Value": "changed"}
    assert "never@example.com" not in subs

    # single add without Resubscribe: 201, but a Deleted subscriber stays Deleted
    sub_api = createsend.Subscriber(auth)
    sub_api.add(cm.list_id, "deleted@example.com", "D", [], False, "Yes")
    assert createsend.Subscriber(auth, cm.list_id, "deleted@example.com").get().State == "Deleted"
    # ... and with Resubscribe true it is Active again (what re-adding an address the export removed needs)
    sub_api.add(cm.list_id, "deleted@example.com", "D", [], True, "Yes")
    got = createsend.Subscriber(auth, cm.list_id, "deleted@example.com").get()
    assert got.State == "Active" and got.Date >= got.ListJoinedDate
    assert [(f.Key, f.Value) for f in got.CustomFields] == [("CustomerId", "4"), ("Segments", "vip")]
    # Resubscribe true also lifts a suppressed address (resubscribe_suppressed, the default)
    sub_api.add(cm.list_id, "suppressed@example.com", "S", [], True, "Yes")
    assert createsend.Subscriber(auth, cm.list_id, "suppressed@example.com").get().State == "Active"
    assert "suppressed@example.com" not in sandbox.state("campaign_monitor")["suppression_list"]



def test_seed_value_the_api_would_ignore_is_an_error():
    class FakeSandbox:
        seed = {"campaign_monitor": {"custom_fields": [{"FieldName": "When", "DataType": "Date"}],
                                     "subscribers": [{"EmailAddress": "x@example.com",
                                                      "CustomFields": [{"Key": "When", "Value": "1800/01/01"}]}]}}

        @staticmethod
        def token():
            return "t"

    with pytest.raises(ValueError, match="x@example.com: 'When'"):
        CampaignMonitorEmulator(FakeSandbox())


def test_per_address_429_is_off_by_default(cm):
    for _ in range(4):
        assert cm.session.post(cm.url(f"/subscribers/{cm.list_id}.json"), json=_sub("hot@example.com"),
                               timeout=10).status_code == 201
    cm.config(per_address_limit=2, per_address_period=30)
    codes = [cm.session.post(cm.url(f"/subscribers/{cm.list_id}.json"), json=_sub("Hot@example.com"),
                             timeout=10) for _ in range(3)]
    assert [r.status_code for r in codes] == [201, 201, 429]
    assert codes[2].json() == {"Code": 429, "Message": "Subscriber was added too many times too quickly, try again "
                                                       "later."}
    assert "X-RateLimit-Limit" in codes[2].headers
    assert cm.session.post(cm.url(f"/subscribers/{cm.list_id}.json"), json=_sub("other@example.com"),
                           timeout=10).status_code == 201


def test_list_stats_keys_as_the_sdk_fixture(sandbox, cm):
    """createsend-python test/fixtures/list_stats.json: UnsubscribesToday, DeletedThisWeek, BouncesThisYear, ..."""
    _seed(sandbox, {"subscribers": [{"EmailAddress": f"{s.lower()}{i}@example.com", "State": s}
                                    for i, s in enumerate(("Active", "Active", "Unsubscribed", "Deleted", "Bounced"))]})
    stats = cm.session.get(cm.url(f"/lists/{cm.list_id}/stats.json"), timeout=10).json()
    periods = ("Today", "Yesterday", "ThisWeek", "ThisMonth", "ThisYear")
    assert set(stats) == {f"{prefix}{p}" for prefix in ("NewActiveSubscribers", "Unsubscribes", "Deleted", "Bounces")
                          for p in periods} | {"TotalActiveSubscribers", "TotalUnsubscribes", "TotalDeleted",
                                                "TotalBounces"}
    assert (stats["TotalActiveSubscribers"], stats["TotalUnsubscribes"], stats["TotalDeleted"],
            stats["TotalBounces"]) == (2, 1, 1, 1)
