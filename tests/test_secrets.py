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
