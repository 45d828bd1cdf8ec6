"""The Mailchimp emulator answers as the real API does; the official client works against it unmodified."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
import threading
import time

import pytest
import requests


@pytest.fixture
def mc(sandbox):
    info = sandbox.info["mailchimp"]
    s = requests.Session()
    s.verify = sandbox.info["ca_bundle"]
    s.trust_env = False
    s.auth = ("anystring", info["api_key"])
    return s, info["base_url"], info["audience_id"]


def h(email: str) -> str:
    return hashlib.md5(email.strip().lower().encode()).hexdigest()


@pytest.fixture
def official(sandbox, monkeypatch):
    import mailchimp_marketing

    info = sandbox.info["mailchimp"]
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", sandbox.info["ca_bundle"])  # the client uses module-level requests
    client = mailchimp_marketing.Client()
    client.set_config({"api_key": info["api_key"], "server": "us1"})
    client.api_client.host = info["base_url"]  # the only change: the base URL
    return client, info["audience_id"]


def test_official_client_ping_batch_subscribe_and_read_member(official):
    client, list_id = official
    assert client.ping.get() == {"health_status": "Everything's Chimpy!"}
    answer = client.lists.batch_list_members(list_id, {
        "members": [{"email_address": "Ann@Example.com", "status_if_new": "subscribed",
                     "merge_fields": {"FNAME": "Ann"}, "tags": ["vip"]},
                    {"email_address": "not-an-email", "status_if_new": "subscribed"}],
        "update_existing": True})
    assert (answer["total_created"], answer["error_count"]) == (1, 1)
    assert answer["errors"][0]["error_code"] == "ERROR_GENERIC" and "looks fake or invalid" in answer["errors"][0]["error"]
    member = client.lists.get_list_member(list_id, h("ann@example.com"))
    assert member["status"] == "subscribed" and member["merge_fields"]["FNAME"] == "Ann"
    assert [t["name"] for t in member["tags"]] == ["vip"] and member["id"] == h("ann@example.com")


def test_official_client_error_is_api_client_error(official):
    from mailchimp_marketing.api_client import ApiClientError

    client, _ = official
    with pytest.raises(ApiClientError) as err:
        client.lists.get_list("nope")
    assert err.value.status_code == 404 and "Resource Not Found" in err.value.text


def test_auth_errors_are_problem_json(mc):
    s, base, _ = mc
    r = requests.get(base + "/ping", verify=s.verify)
    assert r.status_code == 401 and r.headers["Content-Type"].startswith("application/problem+json")
    assert r.json()["title"] == "API Key Missing" and r.headers["X-Request-Id"] == r.json()["instance"]
    r = requests.get(base + "/ping", auth=("x", "0000-us1"), verify=s.verify)
    assert r.status_code == 401 and r.json()["title"] == "API Key Invalid"
    key = s.auth[1]
    r = requests.get(base + "/ping", headers={"Authorization": f"apikey {key}"}, verify=s.verify)
    assert r.status_code == 200


def test_batch_over_500_is_refused(mc):
    s, base, list_id = mc
    members = [{"email_address": f"u{i}@example.com", "status_if_new": "subscribed"} for i in range(501)]
    r = s.post(f"{base}/lists/{list_id}", json={"members": members})
    assert r.status_code == 400 and r.json()["title"] == "Invalid Resource"
    assert s.get(f"{base}/lists/{list_id}/members/{h('u0@example.com')}").status_code == 404


def test_status_if_new_never_changes_an_existing_status(mc, sandbox):
    s, base, list_id = mc
    sandbox.session.post(f"{sandbox.admin}/seed", json={"mailchimp": {"members": [
        {"email_address": "gone@example.com", "status": "unsubscribed"},
        {"email_address": "bounced@example.com", "status": "cleaned"},
        {"email_address": "old@example.com", "status": "archived"},
        {"email_address": "forgot@example.com", "status": "forgotten"}]}}).raise_for_status()
    body = {"members": [{"email_address": e, "status_if_new": "subscribed", "merge_fields": {"FNAME": "X"}}
                        for e in ("gone@example.com", "bounced@example.com", "old@example.com", "forgot@example.com")],
            "update_existing": True}
    answer = s.post(f"{base}/lists/{list_id}", json=body).json()
    assert answer["total_updated"] == 3 and answer["error_count"] == 1
    assert "permanently deleted" in answer["errors"][0]["error"]
    states = {e: s.get(f"{base}/lists/{list_id}/members/{h(e)}").json()["status"]
              for e in ("gone@example.com", "bounced@example.com", "old@example.com")}
    assert states == {"gone@example.com": "unsubscribed", "bounced@example.com": "cleaned",
                      "old@example.com": "archived"}
    # explicitly resubscribing an unsubscribed member is refused (compliance state)
    r = s.put(f"{base}/lists/{list_id}/members/{h('gone@example.com')}",
              json={"email_address": "gone@example.com", "status": "subscribed", "status_if_new": "subscribed"})
    assert r.status_code == 400 and r.json()["title"] == "Member In Compliance State"
    sandbox.session.post(f"{sandbox.admin}/seed", json={}).raise_for_status()


def test_unchanged_members_appear_in_no_array_and_existing_need_update_existing(mc):
    s, base, list_id = mc
    body = {"members": [{"email_address": "same@example.com", "status_if_new": "subscribed"}], "update_existing": True}
    assert s.post(f"{base}/lists/{list_id}", json=body).json()["total_created"] == 1
    again = s.post(f"{base}/lists/{list_id}", json=body).json()
    assert (again["total_created"], again["total_updated"], again["error_count"]) == (0, 0, 0)
    body["update_existing"] = False
    err = s.post(f"{base}/lists/{list_id}", json=body).json()["errors"][0]
    assert err["error_code"] == "ERROR_CONTACT_EXISTS"


def test_merge_field_types_are_validated_per_member(mc):
    s, base, list_id = mc
    s.post(f"{base}/lists/{list_id}/merge-fields", json={"tag": "POINTS", "name": "Points", "type": "number"})
    answer = s.post(f"{base}/lists/{list_id}", json={"members": [
        {"email_address": "n1@example.com", "status_if_new": "subscribed", "merge_fields": {"POINTS": "abc"}},
        {"email_address": "n2@example.com", "status_if_new": "subscribed", "merge_fields": {"BIRTHDAY": "1990-13"}},
        {"email_address": "n3@example.com", "status_if_new": "subscribed", "merge_fields": {"POINTS": 5,
                                                                                             "BIRTHDAY": "02/29"}},
    ]}).json()
    assert answer["total_created"] == 1 and {e["field"] for e in answer["errors"]} == {"POINTS", "BIRTHDAY"}


def test_tags_segments_and_500_item_limit(mc):
    s, base, list_id = mc
    s.post(f"{base}/lists/{list_id}", json={"members": [
        {"email_address": f"t{i}@example.com", "status_if_new": "subscribed", "tags": ["seg"]} for i in range(3)]})
    seg = next(x for x in s.get(f"{base}/lists/{list_id}/segments", params={"type": "static"}).json()["segments"]
               if x["name"] == "seg")
    assert seg["member_count"] == 3 and seg["type"] == "static"
    r = s.post(f"{base}/lists/{list_id}/segments/{seg['id']}",
               json={"members_to_remove": ["t0@example.com", "nobody@example.com"]})
    assert r.json()["total_removed"] == 1 and r.json()["error_count"] == 1
    r = s.post(f"{base}/lists/{list_id}/segments/{seg['id']}", json={"members_to_add": ["x@example.com"] * 501})
    assert r.status_code == 400 and "at most 500 items" in r.json()["detail"]
    assert s.post(f"{base}/lists/{list_id}/members/{h('t1@example.com')}/tags",
                  json={"tags": [{"name": "seg", "status": "inactive"}]}).status_code == 204
    assert s.get(f"{base}/lists/{list_id}/segments/{seg['id']}").json()["member_count"] == 1


def test_eleventh_simultaneous_connection_gets_429(mc, sandbox):
    s, base, list_id = mc
    sandbox.latency(base_ms=400)
    statuses: list[int] = []

    def call():
        r = requests.get(f"{base}/ping", auth=s.auth, verify=s.verify)
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert r.json()["detail"] == "You have exceeded the limit of 10 simultaneous connections."
            assert "Retry-After" not in r.headers

    threads = [threading.Thread(target=call) for _ in range(14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses.count(200) == 10 and statuses.count(429) == 4


def test_batch_operations_and_results_archive_without_auth(mc):
    s, base, list_id = mc
    body = json.dumps({"members": [{"email_address": "b@example.com", "status_if_new": "subscribed"}]})
    batch = s.post(f"{base}/batches", json={"operations": [
        {"method": "POST", "path": f"/lists/{list_id}", "operation_id": "op-1", "body": body}]}).json()
    assert batch["status"] == "pending" and batch["total_operations"] == 1
    for _ in range(100):
        batch = s.get(f"{base}/batches/{batch['id']}").json()
        if batch["status"] == "finished":
            break
        time.sleep(0.05)
    assert batch["status"] == "finished" and batch["errored_operations"] == 0
    archive = requests.get(batch["response_body_url"], verify=s.verify)  # no auth, like the pre-signed URL
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        results = [r for m in tar.getmembers() if m.isfile() for r in json.load(tar.extractfile(m))]
    assert results[0]["operation_id"] == "op-1" and isinstance(results[0]["response"], str)
    assert json.loads(results[0]["response"])["total_created"] == 1


def test_injected_faults_use_the_vendor_shapes(mc, sandbox):
    s, base, _ = mc
    sandbox.fault(kind="burst429", vendor="mailchimp", count=1)
    r = s.get(f"{base}/ping")
    assert r.status_code == 429 and r.json()["title"] == "Too Many Requests"
    sandbox.fault(kind="status", status=503, vendor="mailchimp", count=1)
    assert s.get(f"{base}/ping").status_code == 503
    sandbox.fault(kind="drop", vendor="mailchimp", count=1)
    with pytest.raises(requests.exceptions.RequestException):
        s.get(f"{base}/ping")
    assert s.get(f"{base}/ping").status_code == 200


def test_fault_options_retry_after_and_after_processing(mc, sandbox):
    """``retry_after`` adds the header; ``after`` processes the request, then loses the answer (the members
    it carried are logged as unanswered); a 429 cannot be "after" and unknown kinds are refused."""
    s, base, list_id = mc
    sandbox.fault(kind="status", status=503, vendor="mailchimp", count=1, retry_after=2.5)
    r = s.get(f"{base}/ping")
    assert r.status_code == 503 and r.headers["Retry-After"] == "2.5"
    sandbox.fault(kind="drop", after=True, vendor="mailchimp", count=1, method="POST")
    with pytest.raises(requests.exceptions.RequestException):
        s.post(f"{base}/lists/{list_id}", json={"members": [{"email_address": "lost@example.com",
                                                             "status_if_new": "subscribed"}]})
    assert s.get(f"{base}/lists/{list_id}/members/{h('lost@example.com')}").status_code == 200  # it was processed
    sandbox.fault(kind="status", status=502, after=True, vendor="mailchimp", count=1, method="POST")
    r = s.post(f"{base}/lists/{list_id}", json={"members": [{"email_address": "lost@example.com",
                                                              "status_if_new": "subscribed"}]})
    assert r.status_code == 502 and r.json()["title"] == "Bad Gateway"
    log = sandbox.server.sandbox.log
    assert log.unanswered_of("mailchimp") == {"lost@example.com": 2} == log.sends_of("mailchimp")
    for bad in ({"kind": "burst429", "after": True}, {"kind": "nope"}):
        assert sandbox.session.post(f"{sandbox.admin}/faults", json=bad, timeout=10).status_code == 400


def test_latency_model_base_plus_per_item(mc, sandbox):
    s, base, list_id = mc
    sandbox.latency(base_ms=50, per_item_ms=1)
    members = [{"email_address": f"l{i}@example.com", "status_if_new": "subscribed"} for i in range(200)]
    started = time.monotonic()
    s.post(f"{base}/lists/{list_id}", json={"members": members})
    assert time.monotonic() - started >= 0.25


def test_latency_model_is_the_whole_call_processing_included(mc, sandbox):
    """The emulator's own processing counts towards the modelled duration instead of adding to it, so
    benchmarks against the model measure the client, not the emulator's speed."""
    s, base, list_id = mc
    members = [{"email_address": f"w{i}@example.com", "status_if_new": "subscribed",
                "merge_fields": {"FNAME": "Ann"}, "tags": ["t"]} for i in range(500)]
    started = time.monotonic()
    s.post(f"{base}/lists/{list_id}", json={"members": members}).raise_for_status()
    processing = time.monotonic() - started  # no latency: the emulator's own time
    sandbox.latency(base_ms=1000 * max(0.3, 3 * processing))
    members = [{**m, "email_address": "x" + m["email_address"]} for m in members]
    started = time.monotonic()
    s.post(f"{base}/lists/{list_id}", json={"members": members}).raise_for_status()
    took = time.monotonic() - started
    modelled = max(0.3, 3 * processing)
    assert modelled <= took < modelled + processing * 0.5 + 0.02, (took, modelled, processing)


def test_basic_auth_header_shape_of_the_official_client(mc):
    s, base, _ = mc
    token = base64.b64encode(f"user:{s.auth[1]}".encode()).decode()
    assert requests.get(f"{base}/", headers={"Authorization": f"Basic {token}"}, verify=s.verify).status_code == 200


def test_gzip_answers_only_when_configured_and_accepted(mc, sandbox):
    """``gzip_answers`` (seed option): big answers are gzip-compressed when the client's Accept-Encoding
    allows it, never when it asks for identity, never errors; off by default."""
    s, base, list_id = mc
    body = {"members": [{"email_address": f"gz{i}@example.com", "status_if_new": "subscribed"} for i in range(20)],
            "update_existing": True}

    def post(encoding: str) -> requests.Response:
        return s.post(f"{base}/lists/{list_id}", json=body, headers={"Accept-Encoding": encoding}, stream=True)

    assert "Content-Encoding" not in post("gzip").headers  # off by default
    sandbox.session.post(f"{sandbox.admin}/seed", json={"mailchimp": {"gzip_answers": True}}).raise_for_status()
    try:
        r = post("gzip, deflate")
        assert r.headers["Content-Encoding"] == "gzip" and r.headers["Vary"] == "Accept-Encoding"
        raw = r.raw.read(decode_content=False)
        assert raw[:2] == b"\x1f\x8b" and json.loads(gzip.decompress(raw))["total_created"] == 20
        assert "Content-Encoding" not in post("identity").headers
        small = s.get(f"{base}/ping", headers={"Accept-Encoding": "gzip"})  # under 512 bytes: plain
        assert "Content-Encoding" not in small.headers and small.json()["health_status"]
        bad = s.post(f"{base}/lists/{list_id}", json={"members": body["members"] * 30},
                     headers={"Accept-Encoding": "gzip"})  # an error (over 500 members) stays plain problem+json
        assert bad.status_code == 400 and "Content-Encoding" not in bad.headers
    finally:
        sandbox.session.post(f"{sandbox.admin}/seed", json={}).raise_for_status()


def test_partial_responses_keep_or_drop_the_named_fields(mc):
    """``fields`` / ``exclude_fields`` trim any successful answer (dot notation into the objects of an
    array), batch subscribe included; a path that names nothing is a 422."""
    s, base, list_id = mc
    body = {"members": [{"email_address": f"pr{i}@example.com", "status_if_new": "subscribed",
                         "merge_fields": {"FNAME": f"P{i}"}} for i in range(3)] + [{"email_address": "bad"}],
            "update_existing": True}
    full = s.post(f"{base}/lists/{list_id}", json=body).json()
    assert set(full["new_members"][0]) > {"email_address", "id", "merge_fields", "status"}  # created: full objects
    body["members"][0]["merge_fields"] = {"FNAME": "Changed"}
    trimmed = s.post(f"{base}/lists/{list_id}", json=body, params={
        "fields": "new_members.email_address,updated_members.email_address,errors,total_updated"}).json()
    assert trimmed == {"new_members": [], "updated_members": [{"email_address": "pr0@example.com"}],
                       "errors": [full["errors"][0]], "total_updated": 1}
    member = s.get(f"{base}/lists/{list_id}/members/{h('pr1@example.com')}",
                   params={"exclude_fields": "merge_fields.FNAME,tags"}).json()
    assert member["email_address"] == "pr1@example.com" and member["status"] == "subscribed"
    assert "FNAME" not in member["merge_fields"] and "tags" not in member
    wrong = s.post(f"{base}/lists/{list_id}", json=body, params={"fields": "new_member.email_address"})
    assert wrong.status_code == 422 and wrong.json()["title"] == "Requested Fields Invalid"
