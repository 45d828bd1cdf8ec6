"""The demo: everything a new user needs to see an export work, on one machine, offline.

``make demo`` (``python -m airflow_provider_segexport.demo``): builds the sample warehouse, starts the
vendor sandbox in the background, sets up Airflow (SQLite) with connections, a variable and pools
pointing at it, runs the ``segment_export`` DAG with ``airflow dags test``, prints the summary and
what the sandbox destinations now hold, and stops what it started.

``make airflow`` (``--standalone``): the same set-up, then ``airflow standalone`` so a person can open
the UI (http://localhost:8080), see the connections with their forms, trigger the DAG with params and
read the task logs. Ctrl-C stops Airflow and the sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _run(cmd: list[str], env: dict, quiet: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, text=True, capture_output=quiet)
    if result.returncode != 0:
        if quiet:
            sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(cmd[:4])} ...")
    return result


def start_sandbox(workdir: Path, seed: Path, port: int) -> tuple[subprocess.Popen, dict]:
    log = (workdir / "sandbox.log").open("w")
    proc = subprocess.Popen(
        [_bin("segexport-sandbox"), "--port", str(port), "--seed", str(seed), "--tls-dir", str(workdir / "tls"),
         "--rng-seed", "1"],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the sandbox did not start; see {workdir / 'sandbox.log'}")
    info = json.loads(line)
    (workdir / "sandbox.json").write_text(json.dumps(info, indent=2))
    return proc, info


def airflow_env(workdir: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(workdir / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })
    return env


def configure_airflow(env: dict, info: dict, warehouse_path: Path) -> None:
    airflow = _bin("airflow")
    print("• Airflow: migrating the metadata database (SQLite) ...", flush=True)
    _run([airflow, "db", "migrate"], env)
    conns = {
        "segexport_warehouse": {"conn_type": "sqlite", "host": str(warehouse_path),
                                "description": "The bundled SQLite sample warehouse"},
        "mailchimp_default": {
            "conn_type": "mailchimp", "host": info["mailchimp"]["base_url"],
            # port 0 is what the UI form stores for a hidden port; Airflow 3.3.2's Test button sends 0 and
            # refuses a connection whose stored port differs (NULL), so store it the UI's way.
            "port": 0,
            "description": "Mailchimp (local sandbox)",
            "extra": json.dumps({"api_key": info["mailchimp"]["api_key"], "ca_bundle": info["ca_bundle"],
                                 "data_privacy_acknowledged": True}),
        },
        "dynamics365_default": {
            "conn_type": "dynamics365", "host": info["dynamics365"]["base_url"], "port": 0,
            "description": "Dynamics 365 / Dataverse (local sandbox)",
            "extra": json.dumps({"tenant_id": info["dynamics365"]["tenant_id"],
                                 "client_id": info["dynamics365"]["client_id"],
                                 "client_secret": info["dynamics365"]["client_secret"],
                                 "authority": info["dynamics365"]["authority"], "ca_bundle": info["ca_bundle"],
                                 "data_privacy_acknowledged": True}),
        },
        "adobe_campaign_default": {
            "conn_type": "adobe_campaign", "host": info["adobe_campaign"]["base_url"], "port": 0,
            "description": "Adobe Campaign Standard (local sandbox)",
            "extra": json.dumps({"client_id": info["adobe_campaign"]["client_id"],
                                 "client_secret": info["adobe_campaign"]["client_secret"],
                                 "org_id": info["adobe_campaign"]["org_id"], "ims_url": info["adobe_campaign"]["ims_url"],
                                 "scopes": info["adobe_campaign"]["scope"], "ca_bundle": info["ca_bundle"],
                                 "events_url": info["adobe_campaign"]["events_url"],
                                 "ims_org_id": info["adobe_campaign"]["ims_org_id"],
                                 # the gateway's rate (the sandbox's: Adobe publishes none; yours is agreed with
                                 # Adobe): the calls keep to it instead of meeting 429s
                                 "max_requests_per_window": 6000, "window_seconds": 60,
                                 "data_privacy_acknowledged": True}),
        },
        "campaign_monitor_default": {
            "conn_type": "campaign_monitor", "host": info["campaign_monitor"]["base_url"], "port": 0,
            "description": "Campaign Monitor (local sandbox)",
            "extra": json.dumps({"api_key": info["campaign_monitor"]["api_key"],
                                 "client_id": info["campaign_monitor"]["client_id"], "ca_bundle": info["ca_bundle"],
                                 "data_privacy_acknowledged": True}),
        },
    }
    # Through the ORM rather than `airflow connections add`, which stores port 0 as NULL.
    code = (
        "import json, sys\n"
        "from airflow.models import Connection\n"
        "from airflow.utils.session import create_session\n"
        "conns = json.loads(sys.argv[1])\n"
        "with create_session() as s:\n"
        "    for conn_id, c in conns.items():\n"
        "        s.query(Connection).filter(Connection.conn_id == conn_id).delete()\n"
        "        s.add(Connection(conn_id=conn_id, **c))\n"
    )
    _run([sys.executable, "-c", code, json.dumps(conns)], env)
    _run([airflow, "variables", "set", "mailchimp_audience_id", info["mailchimp"]["audience_id"]], env)
    _run([airflow, "variables", "set", "campaign_monitor_list_id", info["campaign_monitor"]["list_id"]], env)
    # A known password for the UI (SimpleAuthManager keeps it in this file; local demo only).
    pw_file = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    pw_file.write_text(json.dumps({"admin": "admin"}) + "\n")
    _run([airflow, "pools", "set", "mailchimp_default", "10",
          "Mailchimp: 10 simultaneous connections per API key"], env)
    _run([airflow, "pools", "set", "campaign_monitor_default", "4",
          "Campaign Monitor: import calls in flight per API key"], env)
    _run([airflow, "pools", "set", "adobe_campaign_default", "2", "Adobe Campaign: sync tasks at once"], env)
    _run([airflow, "pools", "set", "dynamics365_default", "4",
          "Dynamics 365: calls in flight (Dataverse allows 52 concurrent requests per user)"], env)
    print("• Airflow: connections segexport_warehouse, mailchimp_default, campaign_monitor_default and "
          "dynamics365_default, variables mailchimp_audience_id and campaign_monitor_list_id, pools "
          "mailchimp_default (10 slots), campaign_monitor_default (4) and dynamics365_default (4)", flush=True)


def show_destinations(info: dict) -> None:
    session = requests.Session()
    session.verify = info["ca_bundle"]
    session.trust_env = False
    state = session.get(info["admin_url"] + "/state/mailchimp", timeout=60).json()
    for audience_id, aud in state["audiences"].items():
        members = aud["members"]
        by_status: dict[str, int] = {}
        by_tag: dict[str, int] = {}
        for m in members.values():
            by_status[m["status"]] = by_status.get(m["status"], 0) + 1
            for t in m["tags"]:
                by_tag[t] = by_tag.get(t, 0) + 1
        print(f"\nMailchimp audience {audience_id} ({aud['name']}) now holds {len(members):,} members")
        print("  by status: " + ", ".join(f"{k} {v:,}" for k, v in sorted(by_status.items())))
        print("  by tag:    " + ", ".join(f"{k} {v:,}" for k, v in sorted(by_tag.items())))
    state = session.get(info["admin_url"] + "/state/campaign_monitor", timeout=60).json()
    for list_id, lst in state["lists"].items():
        subs = lst["subscribers"]
        by_segment: dict[str, int] = {}
        for sub in subs.values():
            for f in sub["custom_fields"]:
                if f["Key"].strip("[]") == "Segments":
                    by_segment[f["Value"]] = by_segment.get(f["Value"], 0) + 1
        print(f"\nCampaign Monitor list {list_id} ({lst['title']}) now holds {len(subs):,} subscribers")
        print("  by state:   " + ", ".join(f"{k} {v:,}" for k, v in sorted(lst["counts"].items()) if v))
        print("  by segment: " + ", ".join(f"{k} {v:,}" for k, v in sorted(by_segment.items())))
    state = session.get(info["admin_url"] + "/state/dynamics365", timeout=60).json()
    lists = {v["listname"]: v for v in state["lists"].values() if v["listname"].startswith("Segment: ")}
    print(f"\nDynamics 365 ({state['contacts']:,} contacts, none created or changed) now has {len(lists)} "
          "marketing list(s) from the export")
    for name, lst in sorted(lists.items()):
        print(f"  {name:<28} {lst['membercount']:>6,} members")
    events = len(session.get(info["admin_url"] + "/state/dynamics365", timeout=60).json()["new_emailevents"])
    print(f"\nDynamics 365 timelines hold {events:,} email events from Campaign")
    state = session.get(info["admin_url"] + "/state/adobe_campaign", timeout=60).json()
    synced = [p for p in state["profiles"].values() if p.get("cusCrmId")]
    cards = state["custom_resource"].get("cusLoyaltyCard", [])
    print(f"\nAdobe Campaign now holds {len(synced):,} profiles synced from Dynamics 365 contacts "
          f"({sum(1 for p in synced if p.get('cusCrmUnlinked')):,} unlinked) and {len(cards):,} loyalty cards "
          f"({sum(1 for c in cards if c.get('profile')):,} linked to their profile)")
    counts = session.get(info["admin_url"] + "/requests", timeout=60).json()["counts"]
    print("  requests the sandbox received: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


def show_summary(env: dict) -> bool:
    """Print the export summary (XCom) of the latest segment_export run; True if it succeeded."""
    code = (
        "import json\n"
        "from sqlalchemy import select\n"
        "from airflow.models.dagrun import DagRun\n"
        "from airflow.models.xcom import XComModel\n"
        "from airflow.utils.session import create_session\n"
        "with create_session() as s:\n"
        "    dr = s.scalars(select(DagRun).where(DagRun.dag_id == 'segment_export')"
        ".order_by(DagRun.id.desc())).first()\n"
        "    rows = s.scalars(select(XComModel).where(XComModel.dag_id == 'segment_export', "
        "XComModel.run_id == dr.run_id, XComModel.key == 'return_value')).all()\n"
        "    out = {r.task_id: XComModel.deserialize_value(r) for r in rows}\n"
        "    print(json.dumps({'state': str(dr.state), 'xcom': out}))\n"
    )
    result = _run([sys.executable, "-c", code], env)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nDAG run state: {data['state']}")
    summaries = {name: data["xcom"].get(task) for name, task in (("Mailchimp", "export_mailchimp"),
                                                                 ("Campaign Monitor", "export_campaign_monitor"),
                                                                 ("Dynamics 365 Sales", "export_dynamics_sales"))}
    for name, summary in summaries.items():
        if not summary:
            print(f"{name} export: no summary (the task did not run or failed)")
            continue
        t = summary["totals"]
        print(f"{name} export: {t['rows']:,} rows -> created {t['created']:,}, updated {t['updated']:,}, "
              f"unchanged {t['unchanged']:,}, rejected {t['rejected']:,} in {summary['duration_s']}s")
        if summary["rejects"]["path"]:
            print(f"  rejects (row, key, reason): {summary['rejects']['path']}")
    for row in data["xcom"].get("report") or []:
        print(f"  {row['destination']:<16} {row['segment']:<16} sent {row['sent']:>6,}  rejected {row['rejected']:>4,}"
              f"  {row['seconds']}s")
    return data["state"].endswith("success") and all(s and s["totals"]["created"] > 0 for s in summaries.values())


def show_sync(env: dict) -> bool:
    """Print the summaries of the latest dynamics_campaign_sync run; True if it succeeded."""
    code = (
        "import json\n"
        "from sqlalchemy import select\n"
        "from airflow.models.dagrun import DagRun\n"
        "from airflow.models.xcom import XComModel\n"
        "from airflow.utils.session import create_session\n"
        "with create_session() as s:\n"
        "    dr = s.scalars(select(DagRun).where(DagRun.dag_id == 'dynamics_campaign_sync')"
        ".order_by(DagRun.id.desc())).first()\n"
        "    rows = s.scalars(select(XComModel).where(XComModel.dag_id == 'dynamics_campaign_sync', "
        "XComModel.run_id == dr.run_id, XComModel.key == 'return_value')).all()\n"
        "    out = {r.task_id: XComModel.deserialize_value(r) for r in rows}\n"
        "    print(json.dumps({'state': str(dr.state), 'xcom': out}))\n"
    )
    data = json.loads(_run([sys.executable, "-c", code], env).stdout.strip().splitlines()[-1])
    print(f"\nSync DAG run state: {data['state']}")
    for task, summary in sorted(data["xcom"].items()):
        if "events_read" in summary:  # the email events
            t = summary["totals"]
            print(f"  {task}: {summary['events_read']:,} events read -> written {t['created']:,}, already there "
                  f"{t['updated']:,}, rejected {t['rejected']:,}")
            continue
        if "totals" not in summary:  # the opt-out sync
            c = summary["changed"]
            print(f"  {task} ({summary['direction']}): compared {summary['read']['compared']:,} contacts; opt-outs "
                  f"written to Campaign {c['campaign']:,}, to Dynamics 365 {c['dynamics365']:,}")
            continue
        t = summary["totals"]
        print(f"  {task}: {t['rows']:,} rows -> created {t['created']:,}, updated {t['updated']:,}, "
              f"unchanged {t['unchanged']:,}, removed {t['removed']:,}, rejected {t['rejected']:,}")
    return data["state"].endswith("success") and len(data["xcom"]) >= 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(REPO / ".demo"), help="where everything goes (default .demo/)")
    parser.add_argument("--profiles", type=int, default=20_000, help="size of the sample warehouse")
    parser.add_argument("--port", type=int, default=0, help="sandbox port (default: a free one)")
    parser.add_argument("--standalone", action="store_true", help="start `airflow standalone` instead of a test run")
    parser.add_argument("--segments", default="vip_customers,newsletter_fr,churn_risk")
    args = parser.parse_args(argv)

    from airflow_provider_segexport import warehouse

    workdir = Path(args.workdir).resolve()
    if workdir.exists() and not args.standalone:
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    wh_path = workdir / "warehouse.db"
    seed_path = workdir / "sandbox_seed.json"
    print(f"• Sample warehouse: {args.profiles:,} profiles -> {wh_path}", flush=True)
    warehouse.build(wh_path, profiles=args.profiles, seed=42)
    warehouse.refresh(wh_path)
    seed_path.write_text(json.dumps(warehouse.sandbox_seed(wh_path)))
    sandbox, info = start_sandbox(workdir, seed_path, args.port)
    print(f"• Sandbox: {info['mailchimp']['base_url'].rsplit('/mailchimp', 1)[0]} (pid {sandbox.pid}); "
          f"details in {workdir / 'sandbox.json'}", flush=True)
    env = airflow_env(workdir)
    try:
        configure_airflow(env, info, wh_path)
        if args.standalone:
            print("• Starting `airflow standalone`: open http://localhost:8080 (user admin, password admin). "
                  "Ctrl-C stops everything.", flush=True)
            proc = subprocess.Popen([_bin("airflow"), "standalone"], env=env)
            try:
                return proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)
                return 0
        segments = [s.strip() for s in args.segments.split(",") if s.strip()]
        print(f"• Running `airflow dags test segment_export` for segments {segments} ...", flush=True)
        started = time.monotonic()
        log_path = workdir / "dag_test.log"
        with log_path.open("w") as log:
            result = subprocess.run([_bin("airflow"), "dags", "test", "segment_export", "-c",
                                     json.dumps({"segments": segments})], env=env, stdout=log, stderr=subprocess.STDOUT)
        print(f"  finished in {time.monotonic() - started:.0f}s (exit {result.returncode}); full log: {log_path}")
        ok = show_summary(env) and result.returncode == 0
        print("• Running `airflow dags test dynamics_campaign_sync` (Dynamics 365 -> Adobe Campaign) ...", flush=True)
        sync_log = workdir / "dag_test_sync.log"
        with sync_log.open("w") as log:
            synced = subprocess.run([_bin("airflow"), "dags", "test", "dynamics_campaign_sync"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        ok = show_sync(env) and synced.returncode == 0 and ok
        # Campaign sends emails to the synced profiles: events (sent, open, click, bounce) in the journal, then
        # the next run of the sync DAG writes them to the contacts' timelines
        session = requests.Session()
        session.verify, session.trust_env = info["ca_bundle"], False
        session.post(info["admin_url"] + "/adobe_campaign/events", json={"count": 2000}, timeout=120).raise_for_status()
        print("• Campaign sent emails (2,000 events in its journal); running the sync DAG again ...", flush=True)
        with sync_log.open("a") as log:
            synced = subprocess.run([_bin("airflow"), "dags", "test", "dynamics_campaign_sync"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        ok = show_sync(env) and synced.returncode == 0 and ok
        show_destinations(info)
        print("\nDemo " + ("succeeded." if ok else "FAILED: see the log above."))
        return 0 if ok else 1
    finally:
        sandbox.terminate()
        try:
            sandbox.wait(timeout=15)
        except subprocess.TimeoutExpired:
            sandbox.kill()


if __name__ == "__main__":
    sys.exit(main())
