"""Hooks against the sandbox: connection test, credentials, consent and access checks, masking."""

from __future__ import annotations

import json

import pytest

from airflow_provider_segexport.hooks.base import ExportNotAllowed
from airflow_provider_segexport.hooks.mailchimp import MailchimpHook, decode_batch_answer, subscriber_hash
from airflow_provider_segexport.http import VendorAPIError, VendorAuthError


def set_conn(monkeypatch, conn_id, **conn):
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


def mc_conn(sandbox, **extra):
    info = sandbox.info
    return {"conn_type": "mailchimp", "host": info["mailchimp"]["base_url"],
            "extra": {"api_key": info["mailchimp"]["api_key"], "ca_bundle": info["ca_bundle"], **extra}}


def test_test_connection_names_the_account(sandbox, monkeypatch):
    set_conn(monkeypatch, "mc", **mc_conn(sandbox))
    ok, message = MailchimpHook("mc").test_connection()
    assert ok and "Segexport Sandbox" in message and "Chimpy" in message


def test_wrong_key_fails_clearly_without_echoing_it(sandbox, monkeypatch):
    conn = mc_conn(sandbox)
    conn["extra"]["api_key"] = "0123456789abcdef0123456789abcdef-us1"
    set_conn(monkeypatch, "mc", **conn)
    ok, message = MailchimpHook("mc").test_connection()
    assert not ok and "API Key Invalid" in message and "0123456789abcdef" not in message


def test_tls_is_verified_by_default(sandbox, monkeypatch):
    conn = mc_conn(sandbox)
    del conn["extra"]["ca_bundle"]
    set_conn(monkeypatch, "mc", **conn)
    with pytest.raises(VendorAPIError, match="TLS verification failed"):
        MailchimpHook("mc").http.get_json("/ping")


def test_oauth_token_gets_its_data_center_from_metadata(sandbox, monkeypatch):
    info = sandbox.info
    set_conn(monkeypatch, "mc", conn_type="mailchimp", extra={
        "access_token": info["mailchimp"]["access_token"], "ca_bundle": info["ca_bundle"],
        "oauth_metadata_url": info["mailchimp"]["oauth_metadata_url"]})
    hook = MailchimpHook("mc")
    assert hook.base_url == info["mailchimp"]["base_url"]
    assert hook.http.get_json("/ping")["health_status"]


def test_bad_oauth_token_is_refused_even_though_metadata_answers_200(sandbox, monkeypatch):
    info = sandbox.info
    set_conn(monkeypatch, "mc", conn_type="mailchimp", extra={
        "access_token": "nope", "ca_bundle": info["ca_bundle"],
        "oauth_metadata_url": info["mailchimp"]["oauth_metadata_url"]})
    with pytest.raises(VendorAuthError, match="invalid_token"):
        _ = MailchimpHook("mc").base_url


def test_base_url_from_key_data_center(monkeypatch):
    set_conn(monkeypatch, "mc", conn_type="mailchimp", extra={"api_key": "abc-us6"})
    assert MailchimpHook("mc").base_url == "https://us6.api.mailchimp.com/3.0"


def test_export_refused_without_privacy_acknowledgement(sandbox, monkeypatch):
    set_conn(monkeypatch, "mc", **mc_conn(sandbox))
    with pytest.raises(ExportNotAllowed, match="'Data privacy acknowledged'.*data_privacy_acknowledged"):
        MailchimpHook("mc").check_export_allowed("any_dag")


def test_allowed_dag_ids(sandbox, monkeypatch):
    set_conn(monkeypatch, "mc", **mc_conn(sandbox, data_privacy_acknowledged=True, allowed_dag_ids="a, b"))
    hook = MailchimpHook("mc")
    hook.check_export_allowed("a")
    with pytest.raises(ExportNotAllowed, match="DAG 'c' may not use connection 'mc'.*'Allowed DAG IDs'"):
        hook.check_export_allowed("c")


def test_unknown_audience_says_what_to_check(sandbox, monkeypatch):
    set_conn(monkeypatch, "mc", **mc_conn(sandbox))
    with pytest.raises(VendorAPIError, match="Audience 'nope' does not exist.*audience_id"):
        MailchimpHook("mc").get_audience("nope")


def test_batch_answers_come_trimmed_and_a_full_answer_reads_the_same(sandbox, monkeypatch):
    """Batch subscribe asks for a partial response (the emails and errors, not ~1 KB member objects); a
    server that ignores ``fields`` sends the full answer, which gives the same outcomes."""
    import requests

    set_conn(monkeypatch, "mc", **mc_conn(sandbox))
    hook = MailchimpHook("mc")
    audience = sandbox.info["mailchimp"]["audience_id"]
    sizes = []
    transport = hook.http._send

    def measured(*args, **kwargs):
        response = transport(*args, **kwargs)
        sizes.append(len(response.content))
        return response

    monkeypatch.setattr(hook.http, "_send", measured)

    def members(tag):
        return [{"email_address": f"{tag}{i}@example.com", "status_if_new": "subscribed",
                 "merge_fields": {"FNAME": "Ann", "LNAME": "Lee"}} for i in range(20)] + [{"email_address": "nope"}]

    trimmed = hook.batch_subscribe(audience, members("trim"))
    full = requests.post(f"{hook.http.base_url}/lists/{audience}", json={"members": members("full"), "update_existing": True},
                         auth=("any", sandbox.info["mailchimp"]["api_key"]), verify=sandbox.info["ca_bundle"])
    assert full.status_code == 200 and len(full.json()["new_members"][0]) > 5  # full member objects
    decoded = decode_batch_answer(full.content)
    assert trimmed["new_members"] == trimmed["updated_members"] == []  # not asked for: only the counts
    assert decoded["new_members"] == [f"full{i}@example.com" for i in range(20)]
    assert (trimmed["total_created"], trimmed["total_updated"]) == (decoded["total_created"], decoded["total_updated"]) \
        == (20, 0)
    without_totals = decode_batch_answer(json.dumps({k: v for k, v in full.json().items() if k.startswith(
        ("new_", "updated_", "errors"))}).encode())  # totals left out: counted from the arrays
    assert (without_totals["total_created"], without_totals["total_updated"]) == (20, 0)
    assert [e["email_address"] for e in trimmed["errors"]] == [e["email_address"] for e in decoded["errors"]] == ["nope"]
    assert trimmed["errors"][0]["error"] == decoded["errors"][0]["error"]
    assert sizes[-1] * 5 < len(full.content)


def test_subscriber_hash_is_md5_of_trimmed_lowercase():
    assert subscriber_hash("  Ann@Example.COM ") == "257c57037d384ae37ea27a07e8a01665"
    assert subscriber_hash("  Ann@Example.COM ") == subscriber_hash("ann@example.com")


def test_fetched_secrets_are_registered_with_the_masker(sandbox, monkeypatch):
    from airflow.sdk.log import mask_secret  # noqa: F401 - the API the hooks use

    try:
        from airflow.sdk._shared.secrets_masker import _secrets_masker
    except ImportError:  # pragma: no cover
        pytest.skip("secrets masker internals moved")
    set_conn(monkeypatch, "mc", **mc_conn(sandbox))
    hook = MailchimpHook("mc")
    _ = hook.http
    masker = _secrets_masker()
    key = sandbox.info["mailchimp"]["api_key"]
    assert key not in masker.redact(f"the key is {key}")


def test_every_connection_types_test_button_works_against_the_sandbox(sandbox, monkeypatch):
    from airflow_provider_segexport.hooks.adobe_campaign import AdobeCampaignHook
    from airflow_provider_segexport.hooks.campaign_monitor import CampaignMonitorHook
    from airflow_provider_segexport.hooks.dynamics365 import Dynamics365Hook

    info, ca = sandbox.info, sandbox.info["ca_bundle"]
    cm, dv, ad = info["campaign_monitor"], info["dynamics365"], info["adobe_campaign"]
    set_conn(monkeypatch, "cm", conn_type="campaign_monitor", host=cm["base_url"],
             extra={"api_key": cm["api_key"], "client_id": cm["client_id"], "ca_bundle": ca})
    set_conn(monkeypatch, "dv", conn_type="dynamics365", host=dv["base_url"],
             extra={"tenant_id": dv["tenant_id"], "client_id": dv["client_id"], "client_secret": dv["client_secret"],
                    "authority": dv["authority"], "ca_bundle": ca})
    set_conn(monkeypatch, "ad", conn_type="adobe_campaign", host=ad["base_url"],
             extra={"client_id": ad["client_id"], "client_secret": ad["client_secret"], "org_id": ad["org_id"],
                    "ims_url": ad["ims_url"], "ca_bundle": ca})
    for hook in (CampaignMonitorHook("cm"), Dynamics365Hook("dv"), AdobeCampaignHook("ad")):
        ok, message = hook.test_connection()
        assert ok, (hook.conn_type, message)
    set_conn(monkeypatch, "dv", conn_type="dynamics365", host=dv["base_url"],
             extra={"tenant_id": dv["tenant_id"], "client_id": dv["client_id"], "client_secret": "wrong",
                    "authority": dv["authority"], "ca_bundle": ca})
    ok, message = Dynamics365Hook("dv").test_connection()
    assert not ok and "refused the client credentials" in message


# -- the vendor hooks are HttpHooks: ad-hoc calls with the vendor's authentication ---------------------------

def vendor_connections(sandbox) -> dict[str, tuple[type, dict, str]]:
    """conn_id -> (hook class, connection, a cheap authenticated endpoint)."""
    from airflow_provider_segexport.hooks.adobe_campaign import AdobeCampaignHook
    from airflow_provider_segexport.hooks.campaign_monitor import CampaignMonitorHook
    from airflow_provider_segexport.hooks.dynamics365 import Dynamics365Hook

    info, ca = sandbox.info, sandbox.info["ca_bundle"]
    cm, dv, ad = info["campaign_monitor"], info["dynamics365"], info["adobe_campaign"]
    return {
        "mc": (MailchimpHook, mc_conn(sandbox), "/ping"),
        "cm": (CampaignMonitorHook, {"conn_type": "campaign_monitor", "host": cm["base_url"],
                                     "extra": {"api_key": cm["api_key"], "ca_bundle": ca}}, "/systemdate.json"),
        "dv": (Dynamics365Hook, {"conn_type": "dynamics365", "host": dv["base_url"],
                                 "extra": {"tenant_id": dv["tenant_id"], "client_id": dv["client_id"],
                                           "client_secret": dv["client_secret"], "authority": dv["authority"],
                                           "ca_bundle": ca}}, "/WhoAmI"),
        "ad": (AdobeCampaignHook, {"conn_type": "adobe_campaign", "host": ad["base_url"],
                                   "extra": {"client_id": ad["client_id"], "client_secret": ad["client_secret"],
                                             "org_id": ad["org_id"], "ims_url": ad["ims_url"], "ca_bundle": ca}},
               "/profileAndServices/profile"),
    }


def test_every_vendor_hook_is_an_http_hook_and_runs_authenticated_ad_hoc_calls(sandbox, monkeypatch):
    from airflow.providers.http.hooks.http import HttpHook

    for conn_id, (cls, conn, endpoint) in vendor_connections(sandbox).items():
        set_conn(monkeypatch, conn_id, **conn)
        hook = cls(conn_id)
        assert isinstance(hook, HttpHook)
        response = hook.run(endpoint)
        assert response.status_code == 200 and response.json(), (conn_id, response.text[:200])
        assert hook.run(endpoint).status_code == 200  # the same session again
        assert hook.get_conn() is hook.get_conn() is hook.http.session
        hook.close()


def test_run_reads_the_connection_once_and_keeps_httphooks_data_contract(sandbox, monkeypatch):
    set_conn(monkeypatch, "mc", **mc_conn(sandbox))
    reads = []
    real = MailchimpHook.get_connection

    def counting(conn_id):
        reads.append(conn_id)
        return real(conn_id)

    monkeypatch.setattr(MailchimpHook, "get_connection", staticmethod(counting))
    hook = MailchimpHook("mc")
    audience = sandbox.info["mailchimp"]["audience_id"]
    for _ in range(3):
        assert hook.run("/ping").json()["health_status"]
    page = hook.run(f"/lists/{audience}/members", data={"count": 1, "fields": "total_items"}).json()
    assert set(page) == {"total_items"}  # GET: data is the query string, as with HttpHook
    post = MailchimpHook("mc", method="POST")
    created = post.run(f"/lists/{audience}/merge-fields", json={"tag": "ADHOC", "name": "Ad hoc", "type": "text"})
    assert created.json()["tag"] == "ADHOC"
    assert reads == ["mc", "mc"]  # one read per hook, not per call


def test_run_raises_the_vendors_words_or_returns_the_answer_when_asked(sandbox, monkeypatch):
    from airflow.sdk.exceptions import AirflowException

    set_conn(monkeypatch, "mc", **mc_conn(sandbox))
    hook = MailchimpHook("mc")
    with pytest.raises(VendorAPIError, match="HTTP 404.*Resource Not Found") as err:
        hook.run("/lists/nope")
    assert isinstance(err.value, AirflowException)  # what code written for HttpHook.run() catches
    assert hook.run("/lists/nope", extra_options={"check_response": False}).status_code == 404
    with pytest.raises(ValueError, match="only the Mailchimp API"):
        hook.run("https://elsewhere.example/steal")  # the credentials go to the vendor's API only
    with pytest.raises(ValueError, match="not supported"):
        hook.run("/ping", extra_options={"verify": False})
    with pytest.raises(ValueError, match="shared session"):
        hook.get_conn(headers={"X-Any": "1"})


def test_test_connection_uses_a_short_retry_policy_and_restores_the_hooks(sandbox, monkeypatch):
    set_conn(monkeypatch, "mc", **mc_conn(sandbox))
    sandbox.fault(vendor="mailchimp", kind="status", status=503, count=100, retry_after=0)
    hook = MailchimpHook("mc")
    ok, message = hook.test_connection()
    assert not ok and "HTTP 503" in message
    assert sandbox.requests()["counts"].get("mailchimp GET root") == 2  # two attempts, not eight
    assert hook.http.retry.max_attempts == 8


def test_a_hook_built_from_a_connection_already_read_does_not_read_it_again(sandbox, monkeypatch):
    from airflow.sdk import Connection

    conn = Connection(conn_id="given", **{k: v for k, v in mc_conn(sandbox).items() if k != "extra"},
                      extra=json.dumps(mc_conn(sandbox)["extra"]))
    hook = MailchimpHook.from_connection(conn, dict(conn.extra_dejson))
    monkeypatch.setattr(MailchimpHook, "get_connection", None)  # any read by id would fail
    assert hook.conn_id == "given" and hook.run("/ping").json()["health_status"]
