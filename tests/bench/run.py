"""``make bench``: 1,000,000-profile exports to the sandbox under a fixed latency model, against the ideal
and against what a user would write instead (a PythonOperator looping over the official client).

Destinations (``--destinations``, default all three): Mailchimp (batches of 500 on 10 connections), Campaign
Monitor (imports of 1,000, ``--cm-max-in-flight`` calls in flight, under the sandbox's rate limit
``--cm-rate-limit`` requests per ``--cm-rate-period`` seconds; the ideal is the larger of the latency bound,
calls / in flight x a full call's latency, and the rate-limit bound, calls / the limit's rate) and Dynamics 365
Sales (a ``--d365-members`` segment of existing active contacts, seeded in the sandbox, added to a new marketing
list: contacts checked 250 a query, AddListMembersList of 1,000, ``--d365-max-in-flight`` calls in flight, under
the sandbox's Dataverse service protection, ``--d365-max-requests`` / ``--d365-max-execution-s`` per
``--d365-window-s``; the ideal is the largest of the latency bound, the request-budget bound and the
execution-time bound of the calls the export must make; the alternative is a plain ``requests`` + msal loop with
one ``AddMemberList`` call per contact, run on ``--d365-alternative-members`` contacts and scaled).

Writes ``docs/bench/results.json`` (a section per destination) and ``docs/bench/chart.png``; the README table is
made from the JSON.
Each export runs in its own process, so its CPU time and peak memory are the exporter's alone (the
sandbox runs in another process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "bench"
SQL = "SELECT * FROM segment_export WHERE segment_name = 'all_customers' ORDER BY customer_id"

OURS = textwrap.dedent("""
    import json, resource, sys, time

    def peak_mb():
        # VmHWM is this process's own peak RSS; ru_maxrss would also count the parent's pages inherited
        # through fork (Linux keeps the pre-exec peak), i.e. the benchmark driver's warehouse build.
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024

    class TI:
        try_number = 1
        def xcom_push(self, **kw):
            pass

    a = json.loads(sys.argv[1])
    common = dict(task_id="export", segments=["all_customers"],
        sql="SELECT * FROM segment_export WHERE segment_name = {segment} ORDER BY customer_id",
        sql_conn_id="warehouse", first_name_field="first_name", last_name_field="last_name",
        state_dir=a["state_dir"], rejects_path=a["rejects"], progress_interval=30, full_refresh=a["mode"] == "full",
        change_column=a.get("change_column"))
    if a["vendor"] == "campaign_monitor":
        from airflow_provider_segexport.operators.campaign_monitor import CampaignMonitorSegmentExportOperator
        op = CampaignMonitorSegmentExportOperator(list_id=a["target"], max_in_flight=a.get("max_in_flight"), **common)
    elif a["vendor"] == "dynamics_sales":
        from airflow_provider_segexport.operators.dynamics_sales import DynamicsSalesSegmentExportOperator
        common = {k: v for k, v in common.items() if k not in ("first_name_field", "last_name_field")}
        common.update(segments=[a["target"]], sql=a["sql"])
        op = DynamicsSalesSegmentExportOperator(contact_id_field="dataverse_contact_id",
                                                max_in_flight=a.get("max_in_flight"), **common)
    elif a["vendor"] == "sync":
        from airflow_provider_segexport.operators.dynamics_campaign_sync import DynamicsToCampaignSyncOperator
        op = DynamicsToCampaignSyncOperator(task_id="sync", table=a["table"], state_dir=a["state_dir"],
                                            rejects_path=a["rejects"], progress_interval=30,
                                            max_in_flight=a["max_in_flight"])
    else:
        from airflow_provider_segexport.operators.mailchimp import MailchimpSegmentExportOperator
        op = MailchimpSegmentExportOperator(audience_id=a["target"], **common)
    # What Airflow's task runner does before execute() (get_template_context): load the plugins. Without it the
    # first write of the rejects file would load them (~0.4 s), which no real task pays there.
    from airflow.sdk.plugins_manager import integrate_macros_plugins
    integrate_macros_plugins()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    summary = op.execute({"run_id": a["run_id"], "ti": TI(), "dag": None})
    wall = time.monotonic() - started
    ru = resource.getrusage(resource.RUSAGE_SELF)
    # cpu_s: the export's own CPU time (all its threads); process_cpu_s adds the interpreter's start-up and
    # the import of Airflow (~2.5 s, the same for 10 profiles or 1,000,000).
    print("RESULT " + json.dumps({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime - before.ru_utime
                                  - before.ru_stime, "process_cpu_s": ru.ru_utime + ru.ru_stime, "peak_mb": peak_mb(),
                                  "rows": summary["totals"]["rows"], "sent": summary["totals"]["rows"]
                                  - summary["totals"]["skipped"] - summary["totals"]["rejected"],
                                  "requests": summary["http"].get("requests", 0),
                                  "throttled": summary["http"].get("throttled", 0), "totals": summary["totals"]}))
""")

ALTERNATIVE = textwrap.dedent("""
    # What a user would write instead: a PythonOperator looping over the official client, batch calls one
    # after another (threads = 1), or spread over a pool of threads with one client per thread.
    import json, resource, sqlite3, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    import mailchimp_marketing

    def peak_mb():
        # VmHWM is this process's own peak RSS; ru_maxrss would also count the parent's pages inherited
        # through fork (Linux keeps the pre-exec peak), i.e. the benchmark driver's warehouse build.
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024

    base, key, audience, db, limit = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    threads = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    local = threading.local()

    def client():
        if getattr(local, "client", None) is None:
            local.client = mailchimp_marketing.Client()
            local.client.set_config({"api_key": key, "server": "us1"})
            local.client.api_client.host = base
        return local.client

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    rows = sqlite3.connect(db, check_same_thread=False).execute(
        "SELECT email, first_name, last_name FROM segment_export WHERE segment_name = 'all_customers' "
        "ORDER BY customer_id LIMIT ?", (limit,))

    def flush(batch):
        client().lists.batch_list_members(audience, {"members": batch, "update_existing": True})

    def batches():
        batch = []
        for email, first, last in rows:
            batch.append({"email_address": (email or "").strip(), "status_if_new": "subscribed",
                          "merge_fields": {"FNAME": first or "", "LNAME": (last or "")[:255]},
                          "tags": ["all_customers"]})
            if len(batch) == 500:
                yield batch
                batch = []
        if batch:
            yield batch

    sent = []
    if threads == 1:
        for batch in batches():
            flush(batch)
            sent.append(len(batch))
    else:
        def flush_counted(batch):
            flush(batch)
            return len(batch)

        with ThreadPoolExecutor(threads) as pool:
            sent = list(pool.map(flush_counted, batches()))
    n, calls = sum(sent), len(sent)
    wall = time.monotonic() - started
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print("RESULT " + json.dumps({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime - before.ru_utime
                                  - before.ru_stime, "peak_mb": peak_mb(), "rows": n, "requests": calls,
                                  "threads": threads}))
""")


ALTERNATIVE_CM = textwrap.dedent("""
    # What a user would write instead for Campaign Monitor: a PythonOperator looping over the official createsend
    # client's import_subscribers (1,000 subscribers a call, Resubscribe false), calls one after another
    # (threads = 1) or spread over a pool of threads with one client per thread.
    import json, os, resource, sqlite3, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    import createsend
    import createsend.utils

    def peak_mb():
        # VmHWM is this process's own peak RSS; ru_maxrss would also count the parent's pages inherited
        # through fork (Linux keeps the pre-exec peak), i.e. the benchmark driver's warehouse build.
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024

    base, key, list_id, db, limit = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    threads, ca_dir = int(sys.argv[6]), sys.argv[7]
    # The SDK trusts only the cacert.pem next to createsend/utils.py (the sandbox's CA is copied to ca_dir), and
    # takes its base URI from a class attribute.
    createsend.utils.__file__ = os.path.join(ca_dir, "utils.py")
    createsend.CreateSend.base_uri = base
    local = threading.local()

    def client():
        if getattr(local, "client", None) is None:
            local.client = createsend.Subscriber({"api_key": key})
        return local.client

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    rows = sqlite3.connect(db, check_same_thread=False).execute(
        "SELECT email, first_name, last_name FROM segment_export WHERE segment_name = 'all_customers' "
        "ORDER BY customer_id LIMIT ?", (limit,))

    def flush(batch):
        client().import_subscribers(list_id, batch, False)  # a partial failure comes back as its ResultData

    def batches():
        batch = []
        for email, first, last in rows:
            batch.append({"EmailAddress": (email or "").strip(),
                          "Name": " ".join(p.strip() for p in (first or "", last or "") if p.strip()),
                          "CustomFields": [{"Key": "Segments", "Value": "all_customers"}],
                          "ConsentToTrack": "Unchanged"})
            if len(batch) == 1000:
                yield batch
                batch = []
        if batch:
            yield batch

    sent = []
    if threads == 1:
        for batch in batches():
            flush(batch)
            sent.append(len(batch))
    else:
        def flush_counted(batch):
            flush(batch)
            return len(batch)

        with ThreadPoolExecutor(threads) as pool:
            sent = list(pool.map(flush_counted, batches()))
    n, calls = sum(sent), len(sent)
    wall = time.monotonic() - started
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print("RESULT " + json.dumps({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime - before.ru_utime
                                  - before.ru_stime, "peak_mb": peak_mb(), "rows": n, "requests": calls,
                                  "threads": threads}))
""")


ALTERNATIVE_D365 = textwrap.dedent("""
    # What a user would write instead for Dynamics 365 Sales, the way most examples show it: a token from msal,
    # then one AddMemberList call per contact with plain requests, one after another.
    import json, resource, sqlite3, sys, time
    import msal, requests

    def peak_mb():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024

    a = json.loads(sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    app = msal.ConfidentialClientApplication(a["client_id"], client_credential=a["client_secret"],
                                             authority=a["authority"], verify=a["ca_bundle"], instance_discovery=False)
    scope = [a["environment"] + "/.default"]
    session = requests.Session()
    session.verify = a["ca_bundle"]
    api = a["environment"] + "/api/data/v9.2"
    rows = sqlite3.connect(a["db"]).execute(a["sql"] + " LIMIT ?", (a["limit"],)).fetchall()
    calls = 0
    for _customer_id, contact_id in rows:
        token = app.acquire_token_for_client(scopes=scope)["access_token"]  # msal's cache answers most calls
        r = session.post(f"{api}/lists({a['list_id']})/Microsoft.Dynamics.CRM.AddMemberList",
                         json={"EntityId": contact_id}, headers={"Authorization": f"Bearer {token}"})
        r.raise_for_status()
        calls += 1
    wall = time.monotonic() - started
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print("RESULT " + json.dumps({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime - before.ru_utime
                                  - before.ru_stime, "peak_mb": peak_mb(), "rows": len(rows), "requests": calls,
                                  "threads": 1}))
""")

#: the Dynamics 365 segment: existing active contacts, one row each (a table the benchmark adds to the warehouse)
D365_TABLE = "bench_dynamics_segment"
D365_SQL = f"SELECT customer_id, dataverse_contact_id FROM {D365_TABLE} ORDER BY customer_id"


def d365_segment(wh: Path, members: int) -> list[str]:
    """Make the Dynamics 365 segment table of ``members`` rows in the warehouse (the first customers whose contact
    exists and is active, each contact once); return their contact IDs (to seed the sandbox with)."""
    import sqlite3

    db = sqlite3.connect(wh)
    try:
        db.execute(f"DROP TABLE IF EXISTS {D365_TABLE}")
        db.execute(f"""
            CREATE TABLE {D365_TABLE} AS
            SELECT min(s.customer_id) AS customer_id, lower(c.contactid) AS dataverse_contact_id
            FROM segment_export AS s JOIN dynamics365_contacts AS c ON c.contactid = s.dataverse_contact_id
            WHERE s.segment_name = 'all_customers' AND c.statecode = 0
            GROUP BY lower(c.contactid) ORDER BY min(s.customer_id) LIMIT ?""", (members,))
        db.commit()
        return [cid for (cid,) in db.execute(f"SELECT dataverse_contact_id FROM {D365_TABLE} ORDER BY customer_id")]
    finally:
        db.close()


def d365_ideal(members: int, in_flight: int, base_ms: float, per_item_ms: float, model: dict) -> dict:
    """The calls a Dynamics 365 export of ``members`` new members to a new list must make, and the least time they
    take: the largest of the latency bound (the calls' latency spread over ``in_flight`` lanes), the request-budget
    bound (beyond the first window's requests, a window per budget) and the execution-time bound (likewise for the
    calls' combined latency, the time the server spends on them)."""
    from airflow_provider_segexport.hooks.dynamics365 import ADD_MEMBERS_MAX, IN_FILTER_MAX

    lookups, adds = -(-members // IN_FILTER_MAX), -(-members // ADD_MEMBERS_MAX)
    list_calls = 2  # the list looked up by name (none yet), then created
    calls = lookups + adds + list_calls
    execution = ((lookups + list_calls) * base_ms + adds * (base_ms + ADD_MEMBERS_MAX * per_item_ms)) / 1000
    if members % ADD_MEMBERS_MAX:
        execution -= (ADD_MEMBERS_MAX - members % ADD_MEMBERS_MAX) * per_item_ms / 1000
    latency_bound = execution / in_flight
    request_bound = (calls - 1) // model["requests"] * model["window_s"]
    execution_bound = max(0, -(-execution // model["execution_s"]) - 1) * model["window_s"]
    return {"calls": {"contact_lookups": lookups, "add_list_members": adds, "list_lookup_and_create": list_calls,
                      "total": calls},
            "server_execution_s": round(execution, 1), "ideal_latency_bound_s": round(latency_bound, 1),
            "ideal_request_budget_bound_s": round(request_bound, 1),
            "ideal_execution_budget_bound_s": round(execution_bound, 1),
            "ideal_s": round(max(latency_bound, request_bound, execution_bound), 1)}


def reference_loop_us(db_path: Path, rows: int = 200_000) -> float:
    """This machine's speed right now: CPU µs per row of a fixed pure-Python loop (read a row from SQLite,
    check the address with a regular expression, hash it, build and encode a small payload). A shared VM's
    speed drifts over a day; the figure is measured before and after the exports so results can be compared."""
    import re
    import resource
    import sqlite3
    from hashlib import blake2b

    import msgspec

    pattern = re.compile(r"^[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,63}$")
    encode = msgspec.json.Encoder().encode
    db = sqlite3.connect(db_path)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = usage.ru_utime + usage.ru_stime
    seen: set[bytes] = set()
    cursor = db.execute("SELECT customer_id, email, first_name, last_name FROM profiles LIMIT ?", (rows,))
    while chunk := cursor.fetchmany(2000):
        for key, email, first, last in chunk:
            email = (email or "").strip()
            if not pattern.match(email):
                continue
            digest = blake2b(email.lower().encode(), digest_size=8).digest()
            if digest in seen:
                continue
            seen.add(digest)
            encode({"email_address": email, "merge_fields": {"FNAME": first or "", "LNAME": last or ""},
                    "key": key})
    db.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(1e6 * (usage.ru_utime + usage.ru_stime - started) / rows, 2)


def _result(proc: subprocess.CompletedProcess) -> dict:
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"no result; exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


DESTINATIONS = ("mailchimp", "campaign_monitor", "dynamics_sales", "dynamics_campaign_sync")
#: the Campaign Monitor list's segment field, in the seed so the official-client loops can send it too
CM_SEGMENT_FIELD = {"FieldName": "Segments", "DataType": "MultiSelectMany", "Options": ["all_customers"],
                    "VisibleInPreferenceCenter": False}


def main(argv: list[str] | None = None) -> int:
    from airflow_provider_segexport.hooks import dynamics365 as dv
    from airflow_provider_segexport.hooks.campaign_monitor import DEFAULT_CONCURRENCY, IMPORT_MAX

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--profiles", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latency-ms", type=float, default=200.0, help="base latency per call")
    p.add_argument("--per-item-ms", type=float, default=0.2, help="latency per member in a call")
    p.add_argument("--alternative-profiles", type=int, default=100_000,
                   help="the official-client loops run on this many profiles; their times are scaled")
    p.add_argument("--alternative-threads", type=int, default=10,
                   help="threads of the threaded official-client loop (one client per thread)")
    p.add_argument("--destinations", default=",".join(DESTINATIONS),
                   help=f"comma-separated destinations to benchmark (default: {','.join(DESTINATIONS)}); the "
                        "sections of the others are kept from an existing results.json of the same size and model")
    p.add_argument("--cm-max-in-flight", type=int, default=DEFAULT_CONCURRENCY,
                   help="Campaign Monitor import calls in flight (the operator's max_in_flight; default "
                        f"{DEFAULT_CONCURRENCY}, the operator's default)")
    p.add_argument("--cm-rate-limit", type=int, default=1000,
                   help="the sandbox's Campaign Monitor rate limit: requests per --cm-rate-period (a token bucket)")
    p.add_argument("--cm-rate-period", type=float, default=10.0,
                   help="seconds in which the sandbox's Campaign Monitor bucket refills (default 10: 100 requests a "
                        "second, which binds neither the export nor the official client's threads)")
    p.add_argument("--d365-members", type=int, default=dv.MAX_PER_SEGMENT,
                   help="members of the Dynamics 365 segment (existing active contacts, seeded in the sandbox)")
    p.add_argument("--d365-max-in-flight", type=int, default=dv.DEFAULT_CONCURRENCY,
                   help=f"Dynamics 365 calls in flight (the operator's max_in_flight; default {dv.DEFAULT_CONCURRENCY})")
    p.add_argument("--d365-max-requests", type=int, default=dv.SERVICE_PROTECTION_REQUESTS,
                   help="the sandbox's Dataverse service protection: requests per window (also the connection's)")
    p.add_argument("--d365-window-s", type=float, default=dv.SERVICE_PROTECTION_WINDOW_S,
                   help="the service protection's sliding window, seconds")
    p.add_argument("--d365-max-execution-s", type=float, default=dv.SERVICE_PROTECTION_EXECUTION_S,
                   help="the service protection's combined execution time per window, seconds")
    p.add_argument("--d365-max-concurrent", type=int, default=dv.MAX_CONCURRENCY,
                   help="the service protection's concurrent requests")
    p.add_argument("--d365-alternative-members", type=int, default=500,
                   help="the one-call-per-contact loop runs on this many contacts; its time is scaled")
    p.add_argument("--sync-contacts", type=int, default=100_000,
                   help="Dynamics 365 contacts synced to Adobe Campaign profiles (seeded in the sandbox)")
    p.add_argument("--sync-max-in-flight", type=int, default=25,
                   help="Campaign calls in flight (the sync operator's max_in_flight)")
    p.add_argument("--acs-rate-limit", type=int, default=6000,
                   help="the sandbox's Adobe Campaign gateway throttling: requests per --acs-rate-period (a token "
                        "bucket; also the connection's max_requests_per_window, the rate agreed with Adobe)")
    p.add_argument("--acs-rate-period", type=float, default=60.0,
                   help="seconds in which the sandbox's Adobe Campaign bucket refills (default 60: 100 requests a "
                        "second, the sandbox's default)")
    p.add_argument("--sync-repeats", type=int, default=1,
                   help="full syncs (each about --sync-contacts / the rate seconds) and incremental runs")
    p.add_argument("--out", type=Path, default=OUT,
                   help="where results.json and chart.png go (another folder for a trial run on a small size)")
    p.add_argument("--work", type=Path, default=REPO / "build" / "bench",
                   help="working folder (warehouse, scripts, sandbox TLS files)")
    args = p.parse_args(argv)
    dests = [d.strip() for d in args.destinations.split(",") if d.strip()]
    unknown = sorted(set(dests) - set(DESTINATIONS))
    if unknown or not dests:
        p.error(f"--destinations: unknown {unknown or 'none given'}; choose from {', '.join(DESTINATIONS)}")

    from airflow_provider_segexport import warehouse

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    wh = work / f"warehouse-{args.profiles}.db"
    t0 = time.monotonic()
    warehouse.build(wh, profiles=args.profiles, seed=42)
    warehouse.refresh(wh)
    seed = work / "seed.json"
    seed_parts = warehouse.sandbox_seed(wh)
    sandbox_seed = {}
    if "mailchimp" in dests:
        sandbox_seed["mailchimp"] = seed_parts["mailchimp"]
    if "campaign_monitor" in dests:
        sandbox_seed["campaign_monitor"] = {**seed_parts["campaign_monitor"], "custom_fields": [CM_SEGMENT_FIELD],
                                            "config": {"rate_limit": args.cm_rate_limit,
                                                       "rate_period": args.cm_rate_period}}
    seed.write_text(json.dumps(sandbox_seed))
    print(f"warehouse of {args.profiles:,} profiles built in {time.monotonic() - t0:.0f}s", flush=True)
    speed_before = reference_loop_us(wh)
    print(f"this machine now: {speed_before} µs per row of the reference loop", flush=True)

    info_file = work / "sandbox.json"
    info_file.unlink(missing_ok=True)
    sandbox = subprocess.Popen(
        [str(Path(sys.executable).parent / "segexport-sandbox"), "--port", "0", "--latency-ms", str(args.latency_ms),
         "--per-item-ms", str(args.per_item_ms), "--seed", str(seed), "--info-file", str(info_file),
         "--tls-dir", str(work / "tls")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sections: dict[str, dict] = {}
    rows = 0
    d365_model = {"requests": args.d365_max_requests, "window_s": args.d365_window_s,
                  "execution_s": args.d365_max_execution_s, "concurrent": args.d365_max_concurrent}
    try:
        for _ in range(600):
            if info_file.exists() and info_file.read_text().strip():
                break
            time.sleep(0.1)
        info = json.loads(info_file.read_text())
        admin = requests.Session()
        admin.verify, admin.trust_env = info["ca_bundle"], False
        mc, cm, d365 = info["mailchimp"], info["campaign_monitor"], info["dynamics365"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "REQUESTS_CA_BUNDLE": info["ca_bundle"],
               "AIRFLOW_CONN_WAREHOUSE": json.dumps({"conn_type": "sqlite", "host": str(wh)}),
               "AIRFLOW_CONN_MAILCHIMP_DEFAULT": json.dumps({
                   "conn_type": "mailchimp", "host": mc["base_url"],
                   "extra": {"api_key": mc["api_key"], "ca_bundle": info["ca_bundle"],
                             "data_privacy_acknowledged": True}}),
               "AIRFLOW_CONN_CAMPAIGN_MONITOR_DEFAULT": json.dumps({
                   "conn_type": "campaign_monitor", "host": cm["base_url"],
                   "extra": {"api_key": cm["api_key"], "ca_bundle": info["ca_bundle"],
                             "data_privacy_acknowledged": True}}),
               # the connection knows the environment's service protection (the sandbox's model)
               "AIRFLOW_CONN_DYNAMICS365_DEFAULT": json.dumps({
                   "conn_type": "dynamics365", "host": d365["base_url"],
                   "extra": {"tenant_id": d365["tenant_id"], "client_id": d365["client_id"],
                             "client_secret": d365["client_secret"], "authority": d365["authority"],
                             "ca_bundle": info["ca_bundle"], "data_privacy_acknowledged": True,
                             "max_requests_per_window": args.d365_max_requests,
                             "window_seconds": args.d365_window_s,
                             "max_execution_seconds_per_window": args.d365_max_execution_s,
                             "max_concurrent_requests": args.d365_max_concurrent}})}
        acs = info["adobe_campaign"]
        env["AIRFLOW_CONN_ADOBE_CAMPAIGN_DEFAULT"] = json.dumps({
            "conn_type": "adobe_campaign", "host": acs["base_url"],
            "extra": {"org_id": acs["org_id"], "client_id": acs["client_id"], "client_secret": acs["client_secret"],
                      "ims_url": acs["ims_url"], "scopes": acs["scope"], "ca_bundle": info["ca_bundle"],
                      "data_privacy_acknowledged": True,
                      # the rate agreed with Adobe (the sandbox's bucket): the calls keep to it, none refused
                      "max_requests_per_window": args.acs_rate_limit, "window_seconds": args.acs_rate_period}})
        script = work / "ours.py"
        script.write_text(OURS)

        def ours(vendor: str, target: str, state_dir: str, mode: str, run_id: str, change_column: str | None = None,
                 **extra) -> dict:
            spec = {"vendor": vendor, "target": target, "state_dir": state_dir, "rejects": f"file://{work}/rejects.jsonl",
                    "mode": mode, "run_id": run_id, "change_column": change_column, **extra}
            proc = subprocess.run([sys.executable, str(script), json.dumps(spec)], env=env, capture_output=True,
                                  text=True, timeout=3600)
            return _result(proc)

        def alternative(alt_script: Path, args_before_db: list[str], threads: int, full_rows: int,
                        *args_after: str) -> dict:
            admin.post(info["admin_url"] + "/reset", timeout=60)
            proc = subprocess.run([sys.executable, str(alt_script), *args_before_db, str(wh),
                                   str(args.alternative_profiles), str(threads), *args_after], env=env,
                                  capture_output=True, text=True, timeout=3600)
            r = _result(proc)
            scale = full_rows / r["rows"]
            print(f"official client in {threads} thread(s) on {r['rows']:,} profiles: {r['wall_s']:.1f}s "
                  f"(x{scale:.0f} = {r['wall_s'] * scale:.0f}s for {full_rows:,})", flush=True)
            return r

        if "mailchimp" in dests:
            print("== Mailchimp", flush=True)
            full_runs, delta_runs, every_row_runs = [], [], []
            for i in range(args.repeats):
                admin.post(info["admin_url"] + "/reset", timeout=60)
                with tempfile.TemporaryDirectory() as state_dir:
                    # change_column: the full run records the watermark, the delta run reads only the changed rows
                    r = ours("mailchimp", mc["audience_id"], state_dir, "full", f"bench-full-{i}", "updated_at")
                    full_runs.append(r)
                    print(f"ours, full run {i + 1}: {r['wall_s']:.1f}s, {r['requests']} requests, "
                          f"{1e6 * r['cpu_s'] / r['rows']:.1f} µs CPU/profile, peak {r['peak_mb']:.0f} MB", flush=True)
                    warehouse.mutate(wh, change_fraction=0.01, remove_fraction=0.0, seed=1, refresh_segments=True)
                    d = ours("mailchimp", mc["audience_id"], state_dir, "delta", f"bench-delta-{i}", "updated_at")
                    delta_runs.append(d)
                    print(f"ours, delta run after a 1% change (change_column): {d['wall_s']:.1f}s, {d['sent']:,} sent, "
                          f"{1e6 * d['cpu_s'] / d['rows']:.1f} µs CPU/profile", flush=True)
                    # without a change column every row is read, validated and compared with the export state
                    warehouse.mutate(wh, change_fraction=0.01, remove_fraction=0.0, seed=2, refresh_segments=True)
                    e = ours("mailchimp", mc["audience_id"], state_dir, "delta", f"bench-every-row-{i}")
                    every_row_runs.append(e)
                    print(f"ours, delta run after a 1% change (every row read): {e['wall_s']:.1f}s, {e['sent']:,} "
                          f"sent, {1e6 * e['cpu_s'] / e['rows']:.1f} µs CPU/profile", flush=True)
                    warehouse.build(wh, profiles=args.profiles, seed=42)  # undo the mutation for the next repeat
                    warehouse.refresh(wh)

            alt_script = work / "alternative.py"
            alt_script.write_text(ALTERNATIVE)
            rows = full_runs[0]["rows"]
            alt_args = [mc["base_url"], mc["api_key"], mc["audience_id"]]
            alt = alternative(alt_script, alt_args, 1, rows)
            alt_threads = alternative(alt_script, alt_args, args.alternative_threads, rows)
            scale = rows / alt["rows"]
            per_call = (args.latency_ms + 500 * args.per_item_ms) / 1000
            ideal = -(-rows // 500) / 10 * per_call  # ceil(calls) / 10 connections x latency of a full call
            med = _medians(full_runs)
            sections["mailchimp"] = {
                "ideal_s": round(ideal, 1),
                "ours": _ours_figures(full_runs, med, rows, ideal),
                "delta_after_1pct_change": _delta_figures(delta_runs, rows, med["wall_s"])
                | {"change_column": "updated_at"},
                "delta_after_1pct_change_reading_every_row": _delta_figures(every_row_runs, rows, med["wall_s"]),
                "alternative_official_client_sequential": _alternative_figures(alt, scale),
                "alternative_official_client_threads": _alternative_figures(alt_threads, scale),
            }

        if "campaign_monitor" in dests:
            print(f"== Campaign Monitor ({args.cm_max_in_flight} import calls of {IMPORT_MAX:,} in flight; sandbox "
                  f"rate limit {args.cm_rate_limit} requests per {args.cm_rate_period:g}s)", flush=True)
            full_runs, delta_runs = [], []
            for i in range(args.repeats):
                admin.post(info["admin_url"] + "/reset", timeout=60)
                with tempfile.TemporaryDirectory() as state_dir:
                    r = ours("campaign_monitor", cm["list_id"], state_dir, "full", f"bench-cm-full-{i}", "updated_at",
                             max_in_flight=args.cm_max_in_flight)
                    full_runs.append(r)
                    print(f"ours, full run {i + 1}: {r['wall_s']:.1f}s, {r['requests']} requests, "
                          f"{1e6 * r['cpu_s'] / r['rows']:.1f} µs CPU/profile, peak {r['peak_mb']:.0f} MB", flush=True)
                    warehouse.mutate(wh, change_fraction=0.01, remove_fraction=0.0, seed=1, refresh_segments=True)
                    d = ours("campaign_monitor", cm["list_id"], state_dir, "delta", f"bench-cm-delta-{i}", "updated_at",
                             max_in_flight=args.cm_max_in_flight)
                    delta_runs.append(d)
                    print(f"ours, delta run after a 1% change (change_column): {d['wall_s']:.1f}s, {d['sent']:,} sent, "
                          f"{1e6 * d['cpu_s'] / d['rows']:.1f} µs CPU/profile", flush=True)
                    warehouse.build(wh, profiles=args.profiles, seed=42)  # undo the mutation for the next repeat
                    warehouse.refresh(wh)

            alt_script = work / "alternative_campaign_monitor.py"
            alt_script.write_text(ALTERNATIVE_CM)
            ca_dir = work / "createsend-ca"  # the SDK reads cacert.pem next to its utils.py: pointed here
            ca_dir.mkdir(exist_ok=True)
            (ca_dir / "cacert.pem").write_bytes(Path(info["ca_bundle"]).read_bytes())
            rows = full_runs[0]["rows"]
            alt_args = [cm["base_url"], cm["api_key"], cm["list_id"]]
            alt = alternative(alt_script, alt_args, 1, rows, str(ca_dir))
            alt_threads = alternative(alt_script, alt_args, args.alternative_threads, rows, str(ca_dir))
            scale = rows / alt["rows"]
            calls = -(-rows // IMPORT_MAX)
            per_call = (args.latency_ms + IMPORT_MAX * args.per_item_ms) / 1000
            latency_bound = calls / args.cm_max_in_flight * per_call
            rate_bound = calls / (args.cm_rate_limit / args.cm_rate_period)
            ideal = max(latency_bound, rate_bound)
            med = _medians(full_runs)
            sections["campaign_monitor"] = {
                "batch_size": IMPORT_MAX, "max_in_flight": args.cm_max_in_flight, "import_calls": calls,
                "sandbox_rate_limit": {"requests": args.cm_rate_limit, "period_s": args.cm_rate_period},
                "ideal_s": round(ideal, 1), "ideal_latency_bound_s": round(latency_bound, 1),
                "ideal_rate_limit_bound_s": round(rate_bound, 1),
                "ours": _ours_figures(full_runs, med, rows, ideal),
                "delta_after_1pct_change": _delta_figures(delta_runs, rows, med["wall_s"])
                | {"change_column": "updated_at"},
                "alternative_official_client_sequential": _alternative_figures(alt, scale),
                "alternative_official_client_threads": _alternative_figures(alt_threads, scale),
            }
        if "dynamics_sales" in dests:
            sections["dynamics_sales"] = bench_dynamics(args, wh, work, info, admin, ours, d365_model)
        if "dynamics_campaign_sync" in dests:
            sections["dynamics_campaign_sync"] = bench_sync(args, wh, info, admin, ours)
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=30)
    speed_after = reference_loop_us(wh)
    print(f"this machine now: {speed_after} µs per row of the reference loop", flush=True)

    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "reference_loop_us_per_row": {"before": speed_before, "after": speed_after}},
        "latency_model": {"base_ms": args.latency_ms, "per_item_ms": args.per_item_ms},
        "profiles": rows or args.profiles,
        "repeats": args.repeats,
    }
    for section in sections.values():  # the machine's speed while this section was measured
        section["reference_loop_us_per_row"] = {"before": speed_before, "after": speed_after}
    previous = _previous(args.out / "results.json")
    if previous and previous.get("profiles") == results["profiles"] \
            and previous.get("latency_model") == results["latency_model"]:
        for name in DESTINATIONS:  # a destination not benchmarked this time keeps its figures
            if name not in sections and name in previous:
                results[name] = previous[name]
                results[name].setdefault("reference_loop_us_per_row",
                                         previous.get("machine", {}).get("reference_loop_us_per_row"))
                print(f"{name}: figures kept from the existing {args.out / 'results.json'}", flush=True)
    results.update(sections)
    results = _ordered(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.out / "chart.png")
    print(json.dumps(results, indent=2))
    return 0


def bench_dynamics(args, wh: Path, work: Path, info: dict, admin: requests.Session, ours, model: dict) -> dict:
    """The Dynamics 365 Sales part: the segment's contacts seeded in the sandbox (with the service-protection
    model), the export to a new marketing list ``--repeats`` times, the one-call-per-contact loop once."""
    from airflow_provider_segexport.hooks.dynamics365 import ADD_MEMBERS_MAX, IN_FILTER_MAX

    d365 = info["dynamics365"]
    contacts = d365_segment(wh, args.d365_members)
    members = len(contacts)
    seed = {"dynamics365": {"contacts": [{"contactid": c, "statecode": 0} for c in contacts], "config": {
        "max_requests": args.d365_max_requests, "window_seconds": args.d365_window_s,
        "max_execution_ms": int(args.d365_max_execution_s * 1000), "max_concurrent": args.d365_max_concurrent}}}
    admin.post(info["admin_url"] + "/seed", json=seed, timeout=600).raise_for_status()
    ideal = d365_ideal(members, args.d365_max_in_flight, args.latency_ms, args.per_item_ms, model)
    print(f"== Dynamics 365 Sales ({members:,} members; {ideal['calls']['total']} calls, "
          f"{args.d365_max_in_flight} in flight; service protection {model['requests']:,} requests and "
          f"{model['execution_s']:g} s per {model['window_s']:g} s, {model['concurrent']} concurrent; ideal "
          f"{ideal['ideal_s']:.1f} s)", flush=True)
    runs = []
    for i in range(args.repeats):
        admin.post(info["admin_url"] + "/reset", timeout=600)  # the list made by the last run is gone
        with tempfile.TemporaryDirectory() as state_dir:
            r = ours("dynamics_sales", "bench_dynamics_sales", state_dir, "full", f"bench-d365-{i}",
                     sql=D365_SQL.replace(" ORDER BY", " WHERE {segment} = {segment} ORDER BY"),
                     max_in_flight=args.d365_max_in_flight)
        state = admin.get(info["admin_url"] + "/state/dynamics365", timeout=600).json()
        on_list = max((v["membercount"] for v in state["lists"].values()), default=0)
        if r["totals"].get("created") != members or on_list != members or r["totals"].get("rejected"):
            raise RuntimeError(f"the Dynamics 365 export did not add the {members:,} members: {r['totals']}, "
                               f"{on_list:,} on the list")
        runs.append(r)
        print(f"ours, run {i + 1}: {r['wall_s']:.1f}s ({r['wall_s'] / ideal['ideal_s']:.2f}x the ideal), "
              f"{r['requests']} requests, {r['throttled']} throttled, {1e6 * r['cpu_s'] / members:.1f} µs CPU/member, "
              f"peak {r['peak_mb']:.0f} MB", flush=True)

    admin.post(info["admin_url"] + "/reset", timeout=600)
    alt_script = work / "alternative_dynamics_sales.py"
    alt_script.write_text(ALTERNATIVE_D365)
    spec = {"client_id": d365["client_id"], "client_secret": d365["client_secret"], "authority": d365["authority"],
            "ca_bundle": info["ca_bundle"], "environment": d365["base_url"], "list_id": d365["marketing_list_id"],
            "db": str(wh), "sql": D365_SQL, "limit": args.d365_alternative_members}
    proc = subprocess.run([sys.executable, str(alt_script), json.dumps(spec)], capture_output=True, text=True,
                          timeout=36000, env={**os.environ, "REQUESTS_CA_BUNDLE": info["ca_bundle"]})
    alt = _result(proc)
    scale = members / alt["rows"]
    print(f"requests + msal, one AddMemberList per contact, on {alt['rows']:,} contacts: {alt['wall_s']:.1f}s "
          f"(x{scale:.0f} = {alt['wall_s'] * scale:.0f}s for {members:,})", flush=True)
    med = _medians(runs)
    return {
        "members": members, "max_in_flight": args.d365_max_in_flight, "in_filter_size": IN_FILTER_MAX,
        "batch_size": ADD_MEMBERS_MAX, "service_protection": model, **ideal,
        "ours": _ours_figures(runs, med, members, ideal["ideal_s"])
        | {"cpu_us_per_member": round(1e6 * med["cpu_s"] / members, 1),
           "throttled": max(r["throttled"] for r in runs)},
        "alternative_requests_add_member_list_sequential": _alternative_figures(alt, scale),
    }


def bench_sync(args, wh: Path, info: dict, admin: requests.Session, ours) -> dict:
    """The Dynamics 365 -> Adobe Campaign part: ``--sync-contacts`` contacts seeded in the sandbox's Dataverse,
    synced to an empty Campaign (the example DAG's contacts table: mappings, replacement, filter) under the
    sandbox's gateway throttling, then an incremental run after 1 % of the contacts changed in Dynamics 365."""
    import sqlite3
    from concurrent.futures import ThreadPoolExecutor

    from airflow_provider_segexport.warehouse import ADOBE_CAMPAIGN_SEED
    from dags.dynamics_campaign_sync import SYNC_TABLES

    n = args.sync_contacts
    db = sqlite3.connect(wh)
    rows = db.execute("SELECT contactid, email, first_name, last_name FROM dynamics365_contacts WHERE statecode = 0 "
                      "ORDER BY customer_id LIMIT ?", (n,)).fetchall()
    db.close()
    # modified over the year before (as real contacts are), so that the watermark is the newest of them
    contacts = [{"contactid": cid, "emailaddress1": email, "firstname": first, "lastname": last, "statecode": 0,
                 "modifiedon": f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:{i // 60 % 60:02d}Z"}
                for i, (cid, email, first, last) in enumerate(rows)]
    n = len(contacts)
    rate = args.acs_rate_limit / args.acs_rate_period
    seed = {"dynamics365": {"contacts": contacts},
            "adobe_campaign": {**ADOBE_CAMPAIGN_SEED, "config": {"rate_limit": args.acs_rate_limit,
                                                                  "rate_period": args.acs_rate_period}}}
    per_call = (args.latency_ms + args.per_item_ms) / 1000
    inflight = args.sync_max_in_flight

    def ideal(records: int, calls_each: int) -> dict:
        # Campaign takes one record a call: a create for a new contact; a lookup by key and a PATCH for a
        # changed one (the lookup first, then its PATCH: calls_each one after another in each lane). The gateway
        # is a token bucket that starts full: the first --acs-rate-limit calls may go at once, the rest at its rate.
        calls = records * calls_each
        latency_bound = records * calls_each * per_call / inflight
        rate_bound = max(0, calls - args.acs_rate_limit) / rate
        return {"calls": calls, "ideal_s": round(max(latency_bound, rate_bound), 1),
                "latency_bound_s": round(latency_bound, 1), "rate_limit_bound_s": round(rate_bound, 1)}

    full_ideal = ideal(n, 1)  # again below with the contacts the filter lets through
    print(f"== Dynamics 365 -> Adobe Campaign ({n:,} contacts; {inflight} calls in flight; gateway "
          f"{args.acs_rate_limit:,} requests per {args.acs_rate_period:g} s; ideal about {full_ideal['ideal_s']:.0f} s)",
          flush=True)
    table = SYNC_TABLES["contacts"]
    full_runs, incremental_runs = [], []
    verify = info["ca_bundle"]
    d365 = info["dynamics365"]
    changed = contacts[:: 100][: max(1, n // 100)]
    for i in range(args.sync_repeats):
        admin.post(info["admin_url"] + "/seed", json=seed, timeout=600).raise_for_status()
        with tempfile.TemporaryDirectory() as state_dir:
            r = ours("sync", "profile", state_dir, "full", f"bench-sync-full-{i}", table=table,
                     max_in_flight=inflight)
            profiles = admin.get(info["admin_url"] + "/state/adobe_campaign", timeout=600).json()
            held, t = len(profiles.get("profiles") or {}), r["totals"]
            # every contact the filter lets through is created, or refused by Campaign (a reject: too long a name)
            if t["created"] + t["rejected"] != t["rows"] or held != t["created"] or t["rejected"] > t["rows"] // 100:
                raise RuntimeError(f"the sync did not create the {t['rows']:,} profiles: {t}, {held:,} in Campaign")
            full_runs.append(r)
            full_ideal = ideal(t["rows"], 1)
            print(f"ours, full sync {i + 1}: {r['wall_s']:.1f}s ({r['wall_s'] / full_ideal['ideal_s']:.2f}x the "
                  f"ideal), {r['requests']:,} Campaign requests, {r['throttled']} throttled, "
                  f"{1e6 * r['cpu_s'] / n:.1f} µs CPU/contact, peak {r['peak_mb']:.0f} MB", flush=True)
            # 1 % of the contacts change in Dynamics 365 (a person's edits, through the Web API)
            token = requests.post(f"{d365['authority']}/oauth2/v2.0/token", data={
                "grant_type": "client_credentials", "client_id": d365["client_id"],
                "client_secret": d365["client_secret"], "scope": d365["base_url"] + "/.default"},
                verify=verify, timeout=60).json()["access_token"]
            dv = requests.Session()
            dv.verify, dv.trust_env = verify, False
            dv.headers.update({"Authorization": f"Bearer {token}"})
            dv.mount("https://", requests.adapters.HTTPAdapter(pool_maxsize=16))

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda c, run=i, session=dv: session.patch(
                    f"{d365['base_url']}/api/data/v9.2/contacts({c['contactid']})",
                    json={"lastname": f"{c['lastname'] or ''}-{run}"}, timeout=120).raise_for_status(), changed))
            d = ours("sync", "profile", state_dir, "delta", f"bench-sync-incremental-{i}", table=table,
                     max_in_flight=inflight)
            t = d["totals"]
            if t["updated"] + t["rejected"] + t["skipped"] != t["rows"] or t["updated"] < 0.95 * len(changed):
                raise RuntimeError(f"the incremental sync did not update the {len(changed):,} changed contacts: "
                                   f"{d['totals']}")
            incremental_runs.append(d)
            print(f"ours, incremental sync after a 1% change: {d['wall_s']:.1f}s, {d['totals']['updated']:,} "
                  f"updated, {d['requests']:,} Campaign requests", flush=True)
    med = _medians(full_runs)
    inc_ideal = ideal(incremental_runs[0]["totals"]["updated"], 2)
    wall = statistics.median(r["wall_s"] for r in incremental_runs)
    return {
        "contacts": n, "synced": full_runs[0]["rows"], "rejected": full_runs[0]["totals"]["rejected"],
        "max_in_flight": inflight,
        "gateway_rate_limit": {"requests": args.acs_rate_limit, "period_s": args.acs_rate_period},
        **full_ideal,
        "ours": _ours_figures(full_runs, med, full_runs[0]["rows"], full_ideal["ideal_s"])
        | {"throttled": max(r["throttled"] for r in full_runs)},
        "incremental_after_1pct_change": {
            "changed": len(changed), "updated": incremental_runs[0]["totals"].get("updated"),
            "wall_s": round(wall, 1), "requests": incremental_runs[0]["requests"], **{
                f"ideal_{k}": v for k, v in inc_ideal.items()},
            "share_of_full_time": round(wall / med["wall_s"], 3),
            "runs_wall_s": [round(r["wall_s"], 1) for r in incremental_runs]},
    }


def _previous(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ordered(results: dict) -> dict:
    """The common keys first, then the destinations in DESTINATIONS order."""
    head = {k: v for k, v in results.items() if k not in DESTINATIONS}
    return head | {k: results[k] for k in DESTINATIONS if k in results}


def _medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "process_cpu_s", "peak_mb")}


def _ours_figures(runs: list[dict], med: dict, rows: int, ideal: float) -> dict:
    return {"wall_s": round(med["wall_s"], 1), "ratio_to_ideal": round(med["wall_s"] / ideal, 3),
            "requests": runs[0]["requests"], "cpu_us_per_profile": round(1e6 * med["cpu_s"] / rows, 1),
            "process_cpu_us_per_profile": round(1e6 * med["process_cpu_s"] / rows, 1),
            "peak_mb": round(med["peak_mb"]), "runs_wall_s": [round(r["wall_s"], 1) for r in runs]}


def _alternative_figures(r: dict, scale: float) -> dict:
    return {"threads": r["threads"], "measured_profiles": r["rows"], "measured_wall_s": round(r["wall_s"], 1),
            "wall_s_scaled_to_profiles": round(r["wall_s"] * scale, 1), "requests": r["requests"],
            "cpu_us_per_profile": round(1e6 * r["cpu_s"] / r["rows"], 1)}


def _delta_figures(runs: list[dict], rows: int, full_wall_s: float) -> dict:
    wall = statistics.median(r["wall_s"] for r in runs)
    return {"wall_s": round(wall, 1), "sent": runs[0]["sent"], "requests": runs[0]["requests"],
            "cpu_us_per_profile": round(1e6 * statistics.median(r["cpu_s"] for r in runs) / rows, 1),
            "share_of_full_time": round(wall / full_wall_s, 3), "runs_wall_s": [round(r["wall_s"], 1) for r in runs]}


def chart(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)")
        return
    panels = []  # (title, labels, values, colors) per destination benchmarked
    if "mailchimp" in results:
        m = results["mailchimp"]
        panels.append(("Mailchimp", [
            "ideal (10 lanes)", "airflow-provider-segexport", "delta, 1% changed, change_column",
            "delta, 1% changed, every row read", "official client, sequential",
            f"official client, {m['alternative_official_client_threads']['threads']} threads"], [
            m["ideal_s"], m["ours"]["wall_s"], m["delta_after_1pct_change"]["wall_s"],
            m["delta_after_1pct_change_reading_every_row"]["wall_s"],
            m["alternative_official_client_sequential"]["wall_s_scaled_to_profiles"],
            m["alternative_official_client_threads"]["wall_s_scaled_to_profiles"]],
            ["#9e9e9e", "#017cee", "#5fb3f9", "#90caf9", "#e57373", "#ef9a9a"]))
    if "campaign_monitor" in results:
        c = results["campaign_monitor"]
        panels.append((f"Campaign Monitor ({c['max_in_flight']} imports of {c['batch_size']:,} in flight)", [
            f"ideal ({c['max_in_flight']} in flight)", "airflow-provider-segexport",
            "delta, 1% changed, change_column", "official client, sequential",
            f"official client, {c['alternative_official_client_threads']['threads']} threads"], [
            c["ideal_s"], c["ours"]["wall_s"], c["delta_after_1pct_change"]["wall_s"],
            c["alternative_official_client_sequential"]["wall_s_scaled_to_profiles"],
            c["alternative_official_client_threads"]["wall_s_scaled_to_profiles"]],
            ["#9e9e9e", "#017cee", "#5fb3f9", "#e57373", "#ef9a9a"]))
    if "dynamics_sales" in results:
        d = results["dynamics_sales"]
        panels.append((f"Dynamics 365 Sales ({d['members']:,} members, {d['max_in_flight']} calls in flight)", [
            f"ideal ({d['max_in_flight']} in flight)", "airflow-provider-segexport",
            "requests + msal, one AddMemberList per contact"], [
            d["ideal_s"], d["ours"]["wall_s"],
            d["alternative_requests_add_member_list_sequential"]["wall_s_scaled_to_profiles"]],
            ["#9e9e9e", "#017cee", "#e57373"]))
    if "dynamics_campaign_sync" in results:
        y = results["dynamics_campaign_sync"]
        inc = y["incremental_after_1pct_change"]
        panels.append((f"Dynamics 365 -> Adobe Campaign ({y['synced']:,} contacts, "
                       f"{y['gateway_rate_limit']['requests']:,} requests per {y['gateway_rate_limit']['period_s']:g} s)", [
            "ideal (the gateway's rate)", "airflow-provider-segexport", f"incremental, {inc['changed']:,} changed"], [
            y["ideal_s"], y["ours"]["wall_s"], inc["wall_s"]], ["#9e9e9e", "#017cee", "#5fb3f9"]))
    lm = results["latency_model"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.6 * len(panels)), dpi=120, squeeze=False)
    for ax, (title, labels, values, colors) in zip(axes[:, 0], panels, strict=True):
        bars = ax.barh(labels[::-1], values[::-1], color=colors[::-1])
        for bar, v in zip(bars, values[::-1], strict=True):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:,.0f} s", va="center")
        what = "" if title.startswith("Dynamics") else f" of {results['profiles']:,} profiles"
        kind = " sync" if "Adobe" in title else " export"
        ax.set_title(f"{title}{kind}{what}\n"
                     f"(sandbox latency {lm['base_ms']:.0f} ms + {lm['per_item_ms']} ms/member per call)", fontsize=9)
        if max(values) > 50 * min(values):  # a baseline hours long next to seconds: a log scale
            ax.set_xscale("log")
            ax.set_xlim(min(values) / 2, max(values) * 5)
            ax.set_xlabel("wall time (s, log scale), lower is better")
        else:
            ax.set_xlabel("wall time (s), lower is better")
            ax.set_xlim(0, max(values) * 1.2)
    fig.tight_layout()
    fig.savefig(path)

if __name__ == "__main__":
    sys.exit(main())
