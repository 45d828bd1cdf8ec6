"""The example DAGs users copy: they import cleanly and run end to end against the sandbox."""

from __future__ import annotations

import json

import pytest

from airflow_provider_segexport import warehouse
from tests.conftest import REPO, run_dag


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_dags_import_without_errors_or_warnings(dagbag):
    assert dagbag.import_errors == {}
    assert dagbag.captured_warnings == {}
    assert {"segment_export", "segment_consumers"} <= set(dagbag.dag_ids)


def test_dags_have_tags_owners_docs_retries(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, dag_id
        assert dag.doc_md, dag_id
        for t in dag.tasks:
            assert t.owner and t.owner != "airflow", (dag_id, t.task_id)
            assert t.retries >= 1, (dag_id, t.task_id)


def test_export_tasks_use_a_pool_named_after_their_connection(dagbag):
    dag = dagbag.dags["segment_export"]
    task = dag.get_task("export_mailchimp")
    assert task.pool == "mailchimp_default" and task.pool_slots == 10
    assert dag.schedule == "@daily" or str(dag.timetable.summary) == "@daily"
    assert "dry_run" in dag.params and "segments" in dag.params and "full_refresh" in dag.params
    # every param must be valid at its default, or the UI's Trigger form refuses to submit
    dag.params.validate()


@pytest.fixture
def demo_env(tmp_path, monkeypatch, sandbox, mailchimp_conn):
    wh = tmp_path / "warehouse.db"
    warehouse.build(wh, profiles=3000, seed=42)
    sandbox.session.post(f"{sandbox.admin}/seed", json=warehouse.sandbox_seed(wh), timeout=60).raise_for_status()
    monkeypatch.setenv("AIRFLOW_CONN_SEGEXPORT_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(wh)}))
    monkeypatch.setenv("AIRFLOW_VAR_MAILCHIMP_AUDIENCE_ID", mailchimp_conn["audience_id"])
    monkeypatch.setenv("SEGEXPORT_STATE_DIR", str(tmp_path / "state"))
    return wh


def test_segment_export_runs_the_chain(airflow_db, demo_env, sandbox):
    state, xcom = run_dag("segment_export", {"segments": ["vip_customers", "newsletter_fr"]}, bundle="dags-folder")
    assert state == "success"
    assert set(xcom["refresh"]) >= {"vip_customers", "newsletter_fr"}
    summary = xcom["export_mailchimp"]
    assert set(summary["segments"]) == {"vip_customers", "newsletter_fr"}
    assert summary["totals"]["created"] > 0
    report = xcom["report"]
    assert {r["segment"] for r in report} == {"vip_customers", "newsletter_fr"}
    members = sandbox.state("mailchimp")["audiences"][sandbox.info["mailchimp"]["audience_id"]]["members"]
    for row in report:
        tagged = sum(1 for m in members.values() if row["segment"] in m["tags"])
        assert tagged == row["sent"] > 0, row


def test_manual_dry_run_sends_nothing(airflow_db, demo_env, sandbox):
    state, xcom = run_dag("segment_export", {"segments": ["vip_customers"], "dry_run": True}, bundle="dags-folder")
    assert state == "success" and xcom["export_mailchimp"]["dry_run"] is True
    assert not any(k.startswith("mailchimp POST") for k in sandbox.requests()["counts"])


def test_destination_without_connection_is_skipped_not_failed(airflow_db, demo_env, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_MAILCHIMP_DEFAULT")
    state, xcom = run_dag("segment_export", {"segments": ["vip_customers"]}, bundle="dags-folder")
    assert state == "success" and "export_mailchimp" not in xcom and xcom["report"] == []


def test_export_with_connections_in_the_metadata_database(airflow_db, demo_env, sandbox, monkeypatch):
    """Connections kept in Airflow's database (as `make demo` and most deployments do) reach a task through
    the supervisor, one request at a time: the segment's count, its rows and the changed rows are read from
    several threads at once, and each of them must still find the connection."""
    from airflow.models import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == "segexport_warehouse").delete()
        session.add(Connection(conn_id="segexport_warehouse", conn_type="sqlite", host=str(demo_env)))
    monkeypatch.delenv("AIRFLOW_CONN_SEGEXPORT_WAREHOUSE")
    try:
        for _ in range(2):  # the second run reads the changed rows (prefetch) while counting
            state, xcom = run_dag("segment_export", {"segments": ["vip_customers", "newsletter_fr"]},
                                  bundle="dags-folder", retries=0)
            assert state == "success", xcom
            assert xcom["export_mailchimp"]["totals"]["rows"] > 0
    finally:
        with create_session() as session:
            session.query(Connection).filter(Connection.conn_id == "segexport_warehouse").delete()


def test_email_events_every_15_minutes_or_continuous(tmp_path):
    """The sync DAG file's switch: by default the events are a task of the 15-minute DAG; with CONTINUOUS_EVENTS
    they leave it for their own @continuous DAG (one run at a time, deferrable: waiting in the triggerer)."""
    from airflow.dag_processing.dagbag import DagBag

    source = (REPO / "dags" / "dynamics_campaign_sync.py").read_text()
    assert "\nCONTINUOUS_EVENTS = False\n" in source
    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / "dynamics_campaign_sync.py").write_text(source.replace("\nCONTINUOUS_EVENTS = False\n",
                                                                     "\nCONTINUOUS_EVENTS = True\n"))
    bag = DagBag(dag_folder=str(folder))
    assert bag.import_errors == {}
    scheduled, continuous = bag.dags["dynamics_campaign_sync"], bag.dags["campaign_email_events_continuous"]
    assert "email_events_to_dynamics" not in scheduled.task_ids
    assert type(continuous.timetable).__name__ == "ContinuousTimetable" and continuous.max_active_runs == 1
    task = continuous.get_task("email_events_to_dynamics")
    assert task.deferrable and task.event_types == ["sent", "open", "click", "bounce"]
    default = DagBag(dag_folder=str(REPO / "dags" / "dynamics_campaign_sync.py"))
    assert "email_events_to_dynamics" in default.dags["dynamics_campaign_sync"].task_ids
    assert "campaign_email_events_continuous" not in default.dags
