"""No secret and no profile in the logs, on every path that exists today.

The full logs of real runs are captured: what reached stdout/stderr (capfd), every log record at DEBUG
and above (caplog, including third-party loggers such as urllib3 and msal) and any task log file under
``$AIRFLOW_HOME/logs``. They must not contain an API key (nor its part before the data-center suffix,
nor the Basic auth header built from it), a client secret, an access token the sandbox issued (read
from the emulators), a connection password, or any email address of the source.

Paths: the Mailchimp export (success with the key in the password field, wrong key, faults and retries,
deferrable), and ``test_connection()`` of the four hooks with good and bad credentials.
``tests/test_mailchimp_export.py::test_no_secret_or_email_in_task_logs`` covers one plain success run
(stdout only); this goes beyond it.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3

import pytest

from airflow_provider_segexport import warehouse
from tests.conftest import refreshed_warehouse, run_dag
from tests.test_mailchimp_export import audience

SQL = "SELECT * FROM segment_export WHERE segment_name = {segment} ORDER BY customer_id"
SEGMENTS = ["all_customers", "vip_customers"]
WRONG_KEY = "5e1f0c2d9a8b7c6d5e4f3a2b1c0d9e8f-us1"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secrets_of(sandbox) -> dict[str, str]:
    """Every credential the sandbox knows, and every token it has issued so far."""
    info = sandbox.info
    mc, cm, dv, ad = info["mailchimp"], info["campaign_monitor"], info["dynamics365"], info["adobe_campaign"]
    emulators = sandbox.server.sandbox.emulators
    found = {
        "Mailchimp API key": mc["api_key"],
        "Mailchimp API key without its data center": mc["api_key"].rpartition("-")[0],
        "Mailchimp Basic auth header": b64("anystring:" + mc["api_key"]),
        "Mailchimp OAuth access token": mc["access_token"],
        "wrong Mailchimp API key": WRONG_KEY,
        "wrong Mailchimp API key without its data center": WRONG_KEY.rpartition("-")[0],
        "Campaign Monitor API key": cm["api_key"],
        "Campaign Monitor Basic auth header": b64(cm["api_key"] + ":x"),
        "Dynamics 365 client secret": dv["client_secret"],
        "Adobe client secret": ad["client_secret"],
    }
    for n, token in enumerate(emulators["dynamics365"].tokens):
        found[f"Dynamics 365 access token #{n}"] = token
        found[f"Dynamics 365 access token #{n} signature"] = token.rpartition(".")[2]
    for n, token in enumerate(emulators["adobe_campaign"].tokens):
        found[f"Adobe IMS access token #{n}"] = token
    return found


@pytest.fixture
def all_logs(capfd, caplog, airflow_home):
    """Everything logged so far in this test: stdout/stderr, all log records from DEBUG up, task log files."""
    caplog.set_level(logging.DEBUG)
    before = {p: p.stat().st_size for p in (airflow_home / "logs").rglob("*") if p.is_file()}

    def read() -> str:
        out, err = capfd.readouterr()
        files = [p.read_text(errors="replace")[before.get(p, 0):] for p in sorted((airflow_home / "logs").rglob("*"))
                 if p.is_file()]
        records = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.__dict__.get('event', '')}"
                            for r in caplog.records)
        return "\n".join([out, err, caplog.text, records, *files])

    return read


def test_the_check_sees_a_secret_a_task_logger_writes(sandbox, all_logs):
    """The capture and the check can fail: a key prefix written by the operator's logger is found."""
    logger = logging.getLogger("airflow.task.operators.airflow_provider_segexport.operators.mailchimp."
                               "MailchimpSegmentExportOperator")
    logger.warning("key %s", sandbox.info["mailchimp"]["api_key"].rpartition("-")[0])
    print("reached", "ann.lee@example.com")
    with pytest.raises(AssertionError, match="Mailchimp API key without its data center"):
        assert_clean(all_logs(), sandbox)
    with pytest.raises(AssertionError, match="1 source email"):
        assert_clean("... Ann.Lee@Example.com ...", sandbox, ["ann.lee@example.com", "bob@example.com"])


def assert_clean(logs: str, sandbox, emails: list[str] = ()) -> None:
    leaked = [name for name, value in secrets_of(sandbox).items() if value and value in logs]
    assert not leaked, f"in the logs: {leaked}"
    lower = logs.lower()
    found = [e for e in emails if e.lower() in lower]
    assert not found, f"{len(found)} source email(s) in the logs, e.g. {found[:3]}"


@pytest.fixture(scope="module")
def wh_path(tmp_path_factory):
    return refreshed_warehouse(tmp_path_factory.mktemp("secrets-wh") / "warehouse.db", 2000, seed=11)


@pytest.fixture
def wh(wh_path, monkeypatch, sandbox):
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(wh_path)}))
    sandbox.session.post(f"{sandbox.admin}/seed", json=warehouse.sandbox_seed(wh_path), timeout=60).raise_for_status()
    return wh_path


def source_emails(wh_path) -> list[str]:
    db = sqlite3.connect(wh_path)
    emails = {e.strip() for (e,) in db.execute("SELECT email FROM segment_export WHERE email LIKE '%@%'")}
    emails |= {e.strip() for (e,) in db.execute("SELECT email FROM destination_state WHERE email LIKE '%@%'")}
    return sorted(e for e in emails if e)


def set_mailchimp(monkeypatch, sandbox, *, key: str | None = None, in_password: bool = False) -> None:
    info = sandbox.info
    key = key or info["mailchimp"]["api_key"]
    conn = {"conn_type": "mailchimp", "host": info["mailchimp"]["base_url"],
            "extra": {"ca_bundle": info["ca_bundle"], "data_privacy_acknowledged": True}}
    if in_password:
        conn["password"] = key
    else:
        conn["extra"]["api_key"] = key
    monkeypatch.setenv("AIRFLOW_CONN_MAILCHIMP_DEFAULT", json.dumps(conn))


def conf(sandbox, tmp_path, **kw) -> dict:
    return {"audience_id": sandbox.info["mailchimp"]["audience_id"], "segments": SEGMENTS, "sql": SQL,
            "state_dir": str(tmp_path / "state"), **kw}


# -- Mailchimp exports ------------------------------------------------------------------------------------

def test_export_with_the_key_in_the_password_field_then_a_delta_mirror_run(airflow_db, wh, sandbox, monkeypatch,
                                                                          tmp_path, all_logs):
    set_mailchimp(monkeypatch, sandbox, in_password=True)
    state, xcom = run_dag("mailchimp_export_test", conf(sandbox, tmp_path))
    assert state == "success" and xcom["export"]["totals"]["created"] > 1000
    assert xcom["export"]["rejects"]["by_reason"].get("vendor_rejected")  # Mailchimp's own refusals too
    db = sqlite3.connect(wh)
    db.execute("DELETE FROM segment_members WHERE segment_name = 'vip_customers' AND customer_id IN "
               "(SELECT customer_id FROM segment_members WHERE segment_name = 'vip_customers' LIMIT 3)")
    db.execute("UPDATE profiles SET last_name = last_name || 'x' WHERE customer_id IN "
               "(SELECT customer_id FROM segment_members WHERE segment_name = 'all_customers' LIMIT 5)")
    db.commit()
    try:
        state, xcom = run_dag("mailchimp_export_test", conf(sandbox, tmp_path, mode="mirror"))
    finally:
        warehouse.refresh(wh)
    assert state == "success" and xcom["export"]["totals"]["removed"] == 3
    logs = all_logs()
    assert "rows confirmed" in logs and "Summary of the export" in logs  # the task log was captured
    assert_clean(logs, sandbox, source_emails(wh))


def test_export_with_a_wrong_key_fails_without_showing_it(airflow_db, wh, sandbox, monkeypatch, tmp_path, all_logs):
    set_mailchimp(monkeypatch, sandbox, key=WRONG_KEY)
    state, _ = run_dag("mailchimp_export_test", conf(sandbox, tmp_path))
    logs = all_logs()
    assert state == "failed" and "API Key Invalid" in logs
    assert_clean(logs, sandbox, source_emails(wh))


def test_export_with_faults_and_retries(airflow_db, wh, sandbox, monkeypatch, tmp_path, all_logs):
    set_mailchimp(monkeypatch, sandbox)
    for rule in (dict(kind="burst429", count=3, skip=1), dict(kind="status", status=503, count=2, skip=2),
                 dict(kind="status", status=500, count=1, method="GET"), dict(kind="drop", count=1, skip=1),
                 dict(kind="drop", after=True, count=1, skip=3)):
        sandbox.fault(vendor="mailchimp", **({"method": "POST"} | rule))
    state, xcom = run_dag("mailchimp_export_test", conf(sandbox, tmp_path))
    assert state == "success" and xcom["export"]["http"]["retries"] >= 8
    logs = all_logs()
    assert "HTTP 429" in logs and "HTTP 503" in logs and ("ConnectionError" in logs or "ChunkedEncodingError" in logs)
    assert_clean(logs, sandbox, source_emails(wh))


def test_deferrable_export(airflow_db, wh, sandbox, monkeypatch, tmp_path, all_logs):
    set_mailchimp(monkeypatch, sandbox)
    state, xcom = run_dag("mailchimp_export_deferred_test", conf(sandbox, tmp_path))
    assert state == "success" and xcom["export"]["mailchimp_batches"]
    assert audience(sandbox)
    logs = all_logs()
    assert "Mailchimp processed the batch operations" in logs
    assert_clean(logs, sandbox, source_emails(wh))


def test_the_rejects_file_holds_no_email(airflow_db, wh, sandbox, monkeypatch, tmp_path):
    set_mailchimp(monkeypatch, sandbox)
    state, xcom = run_dag("mailchimp_export_test", conf(sandbox, tmp_path))
    assert state == "success"
    text = open(xcom["export"]["rejects"]["path"].removeprefix("file://"), encoding="utf-8").read().lower()
    assert "vendor_rejected" in text
    found = [e for e in source_emails(wh) if e.lower() in text]
    assert not found, found[:3]


# -- test_connection() of every hook ------------------------------------------------------------------------

def hook_connections(sandbox) -> dict[str, tuple[str, dict, bool]]:
    """name -> (hook class path, connection, should succeed)."""
    info, ca = sandbox.info, sandbox.info["ca_bundle"]
    mc, cm, dv, ad = info["mailchimp"], info["campaign_monitor"], info["dynamics365"], info["adobe_campaign"]
    mc_conn = {"conn_type": "mailchimp", "host": mc["base_url"], "extra": {"api_key": mc["api_key"], "ca_bundle": ca}}
    oauth = {"conn_type": "mailchimp", "extra": {"access_token": mc["access_token"], "ca_bundle": ca,
                                                 "oauth_metadata_url": mc["oauth_metadata_url"]}}
    cm_conn = {"conn_type": "campaign_monitor", "host": cm["base_url"],
               "extra": {"api_key": cm["api_key"], "client_id": cm["client_id"], "ca_bundle": ca}}
    dv_conn = {"conn_type": "dynamics365", "host": dv["base_url"],
               "extra": {"tenant_id": dv["tenant_id"], "client_id": dv["client_id"],
                         "client_secret": dv["client_secret"], "authority": dv["authority"], "ca_bundle": ca}}
    ad_conn = {"conn_type": "adobe_campaign", "host": ad["base_url"],
               "extra": {"client_id": ad["client_id"], "client_secret": ad["client_secret"], "org_id": ad["org_id"],
                         "ims_url": ad["ims_url"], "ca_bundle": ca}}

    def with_extra(conn, **extra):
        return {**conn, "extra": {**conn["extra"], **extra}}

    hooks = "airflow_provider_segexport.hooks."
    return {
        "mailchimp": (hooks + "mailchimp.MailchimpHook", mc_conn, True),
        "mailchimp_key_in_password": (hooks + "mailchimp.MailchimpHook",
                                      {**mc_conn, "password": mc["api_key"], "extra": {"ca_bundle": ca}}, True),
        "mailchimp_oauth": (hooks + "mailchimp.MailchimpHook", oauth, True),
        "mailchimp_wrong_key": (hooks + "mailchimp.MailchimpHook", with_extra(mc_conn, api_key=WRONG_KEY), False),
        "mailchimp_wrong_datacenter": (hooks + "mailchimp.MailchimpHook",
                                       with_extra(mc_conn, api_key=mc["api_key"].rpartition("-")[0] + "-us7"), False),
        "mailchimp_wrong_oauth_token": (hooks + "mailchimp.MailchimpHook",
                                        with_extra(oauth, access_token="mcoauth" + "0" * 32), False),
        "campaign_monitor": (hooks + "campaign_monitor.CampaignMonitorHook", cm_conn, True),
        "campaign_monitor_wrong_key": (hooks + "campaign_monitor.CampaignMonitorHook",
                                       with_extra(cm_conn, api_key=cm["api_key"][::-1]), False),
        "dynamics365": (hooks + "dynamics365.Dynamics365Hook", dv_conn, True),
        "dynamics365_wrong_secret": (hooks + "dynamics365.Dynamics365Hook",
                                     with_extra(dv_conn, client_secret=dv["client_secret"][::-1]), False),
        "adobe_campaign": (hooks + "adobe_campaign.AdobeCampaignHook", ad_conn, True),
        "adobe_campaign_wrong_secret": (hooks + "adobe_campaign.AdobeCampaignHook",
                                        with_extra(ad_conn, client_secret=ad["client_secret"][::-1]), False),
    }


CASES = ["mailchimp", "mailchimp_key_in_password", "mailchimp_oauth", "mailchimp_wrong_key",
         "mailchimp_wrong_datacenter", "mailchimp_wrong_oauth_token", "campaign_monitor", "campaign_monitor_wrong_key",
         "dynamics365", "dynamics365_wrong_secret", "adobe_campaign", "adobe_campaign_wrong_secret"]


@pytest.mark.parametrize("case", CASES)
def test_connection_test_shows_no_secret(case, sandbox, monkeypatch, all_logs):
    import importlib

    path, conn, should_work = hook_connections(sandbox)[case]
    monkeypatch.setenv("AIRFLOW_CONN_SECRETS_TEST", json.dumps(conn))
    module, _, cls = path.rpartition(".")
    hook = getattr(importlib.import_module(module), cls)("secrets_test")
    ok, message = hook.test_connection()
    hook.close()
    assert ok is should_work, message
    if should_work and getattr(hook, "_token", None):  # the token it was issued is among the secrets checked
        assert hook._token in secrets_of(sandbox).values()
    given = {k: v for k, v in conn["extra"].items() if k in ("api_key", "client_secret", "access_token")}
    if conn.get("password"):
        given["password"] = conn["password"]
    for k, v in list(given.items()):  # a Mailchimp key without its data center is as secret as the key
        if "-" in v and k in ("api_key", "password"):
            given[k + " without its data center"] = v.rpartition("-")[0]
    logs = all_logs() + "\n" + message
    leaked = [k for k, v in given.items() if v in logs]
    assert not leaked, f"{case}: {leaked} in the message or logs"
    if not should_work:  # the message says what was refused, in the vendor's words
        assert any(w in message for w in ("Invalid", "invalid", "refused", "Wrong Datacenter", "401", "403")), message
    assert_clean(logs, sandbox)


# -- no connection field ever travels as a header or in a query string --------------------------------------

#: Distinctive values for the connection fields that are not credentials the sandbox checks.
MARKERS = {
    "allowed_dag_ids": "dag_7f3e_allowed,dag_9c1d_allowed",
    "timeout": "123.456",
    "x_custom_secret": "custom-5e8a1f-do-not-send",
    "login": "conn-login-2b7c9e",
    "password": "conn-password-4d1a6f",
    "data_privacy_acknowledged": "true",
}


def every_field_connection(sandbox, vendor: str) -> tuple[str, dict, dict[str, str], dict[str, str]]:
    """(hook class path, a connection with every field set, the fields' values to look for, the headers
    allowed to carry one of them: {header name: field})."""
    info, ca = sandbox.info, sandbox.info["ca_bundle"]
    common = {k: MARKERS[k] for k in ("allowed_dag_ids", "timeout", "x_custom_secret", "data_privacy_acknowledged")}
    common["ca_bundle"] = ca
    hooks = "airflow_provider_segexport.hooks."
    if vendor in ("mailchimp", "mailchimp_oauth"):
        mc = info["mailchimp"]
        extra = {**common, "api_key": mc["api_key"]} if vendor == "mailchimp" else {
            **common, "access_token": mc["access_token"], "oauth_metadata_url": mc["oauth_metadata_url"]}
        conn = {"conn_type": "mailchimp", "login": MARKERS["login"], "extra": extra}
        if vendor == "mailchimp":  # (with OAuth the password field would be read as an API key)
            conn["host"], conn["password"] = mc["base_url"], MARKERS["password"]
        return hooks + "mailchimp.MailchimpHook", conn, {**extra, "login": conn["login"],
                                                          "password": conn.get("password")}, {}
    if vendor == "campaign_monitor":
        cm = info["campaign_monitor"]
        extra = {**common, "api_key": cm["api_key"], "client_id": cm["client_id"]}
        conn = {"conn_type": "campaign_monitor", "host": cm["base_url"], "login": MARKERS["login"],
                "password": MARKERS["password"], "extra": extra}
        return hooks + "campaign_monitor.CampaignMonitorHook", conn, {**extra, "login": conn["login"],
                                                                       "password": conn["password"]}, {}
    if vendor == "dynamics365":
        dv = info["dynamics365"]
        extra = {**common, "tenant_id": dv["tenant_id"], "client_id": dv["client_id"],
                 "client_secret": dv["client_secret"], "authority": dv["authority"]}
        conn = {"conn_type": "dynamics365", "host": dv["base_url"], "login": MARKERS["login"],
                "password": MARKERS["password"], "extra": extra}
        fields = {**extra, "login": conn["login"], "password": conn["password"]}
        del fields["authority"]  # the token endpoint's own URL
        return hooks + "dynamics365.Dynamics365Hook", conn, fields, {}
    ad = info["adobe_campaign"]
    extra = {**common, "client_id": ad["client_id"], "client_secret": ad["client_secret"], "org_id": ad["org_id"],
             "ims_url": ad["ims_url"]}
    conn = {"conn_type": "adobe_campaign", "host": ad["base_url"], "login": MARKERS["login"],
            "password": MARKERS["password"], "extra": extra}
    fields = {**extra, "login": conn["login"], "password": conn["password"]}
    del fields["ims_url"]  # the token endpoint's own URL
    # Adobe's API requires the client id (the "API key" of an Adobe Developer Console credential) in X-Api-Key
    return hooks + "adobe_campaign.AdobeCampaignHook", conn, fields, {"x-api-key": "client_id"}


def calls(hook, vendor: str) -> None:
    """Ad-hoc run() calls and the hook's own calls, as a DAG would make them."""
    ok, message = hook.test_connection()
    assert ok, message
    if vendor.startswith("mailchimp"):
        audience = hook.run("/ping").json() and hook.http.get_json("/lists")["lists"][0]["id"]
        hook.get_merge_fields(audience)
        hook.run(f"/lists/{audience}/members", data={"count": 1})
        hook.get_member(audience, "nobody@example.com")
    elif vendor == "campaign_monitor":
        hook.run("/systemdate.json")
        hook.run("/clients.json", data={"page": 1})
    elif vendor == "dynamics365":
        hook.run("/WhoAmI")
        hook.run("/contacts", data={"$top": 1}, extra_options={"check_response": False})
    else:
        hook.run("/profileAndServices/profile", data={"_lineCount": 1})


@pytest.mark.parametrize("vendor", ["mailchimp", "mailchimp_oauth", "campaign_monitor", "dynamics365",
                                    "adobe_campaign"])
def test_no_connection_field_is_sent_as_a_header_or_in_a_query_string(vendor, sandbox, monkeypatch):
    """Every field of the connection set to a value we can find; after ad-hoc and ordinary calls (and the
    trigger's way of building the client), no request the sandbox received carries a field's name as a
    header or a field's value in a header or query string; Authorization carries only the credential."""
    import asyncio
    import importlib

    path, conn, fields, allowed = every_field_connection(sandbox, vendor)
    monkeypatch.setenv("AIRFLOW_CONN_EVERY_FIELD", json.dumps(conn))
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    hook = cls("every_field")
    calls(hook, vendor)
    hook.close()
    from_trigger = asyncio.run(cls.afrom_conn_id("every_field"))  # the triggerer's way to the client
    calls(from_trigger, vendor)
    from_trigger.close()

    wire = sandbox.session.get(f"{sandbox.admin}/requests/wire", timeout=30).json()["requests"]
    assert len(wire) >= 5, wire
    names = {k.lower() for k in fields} | {k.lower().replace("_", "-") for k in fields}
    credential_fields = {"api_key", "access_token"}
    found = []
    for req in wire:
        where = f"{req['method']} {req['path']}"
        for field_name, value in fields.items():
            if field_name == "data_privacy_acknowledged":
                value = None  # "true" is no marker: its name is looked for instead
            if value and value in req["query"]:
                found.append(f"{where}: {field_name} in the query string")
        for header, header_value in req["headers"]:
            low = header.lower()
            if low in names:
                found.append(f"{where}: header {header} is a connection field")
            if low == "authorization":
                scheme, _, credential = header_value.partition(" ")
                decoded = base64.b64decode(credential).decode() if scheme.lower() == "basic" else credential
                others = [f for f, v in fields.items() if v and f not in credential_fields and len(str(v)) > 5
                          and str(v) in decoded]
                if others:
                    found.append(f"{where}: Authorization carries {others}")
                continue
            for field_name, value in fields.items():
                if allowed.get(low) == field_name:
                    continue
                if field_name == "data_privacy_acknowledged" or not value or len(str(value)) < 6:
                    continue
                if str(value) in header_value:
                    found.append(f"{where}: header {header} carries {field_name}")
    assert not found, found[:10]
    # the check can fail: the credential is in the Authorization header it inspected
    auths = [v for req in wire for h, v in req["headers"] if h.lower() == "authorization"]
    assert auths
