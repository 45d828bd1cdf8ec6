"""
### Segment export

Every day: **refresh** the unified profiles' segment membership in the warehouse, then **export** the
segments to each destination that has a connection (Mailchimp, Campaign Monitor, Dynamics 365 Sales
marketing lists), then **report** one table of what was sent.

**On demand:** press *Trigger* and fill the form: which segments, which destinations, a dry run
(validate and count, send nothing), a full refresh. Saving or unpausing this DAG never exports by
itself: DAGs start paused, and a scheduled run only happens once you unpause it.

Connections used (see the README): `segexport_warehouse` (the SQL database holding `segment_export`;
by default the bundled SQLite sample warehouse), `mailchimp_default`; the Airflow Variable
`mailchimp_audience_id` names the audience, `campaign_monitor_default` and the Variable
`campaign_monitor_list_id` the Campaign Monitor list, `dynamics365_default` the Dataverse environment (one
marketing list per segment, named "Segment: <name>"). A destination without a
connection is skipped with a log line. Export tasks run in a pool named after their connection
(`mailchimp_default`, 10 slots = Mailchimp's 10 simultaneous connections; `campaign_monitor_default`,
4 slots = the import calls this example keeps in flight; `dynamics365_default`, 4 slots of the 52
concurrent requests Dataverse allows a user) so that several DAGs and
workers together never exceed the vendor's limit.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Asset, Param, task

from airflow_provider_segexport.operators.campaign_monitor import CampaignMonitorSegmentExportOperator
from airflow_provider_segexport.operators.dynamics_sales import DynamicsSalesSegmentExportOperator
from airflow_provider_segexport.operators.mailchimp import MailchimpSegmentExportOperator

WAREHOUSE_CONN_ID = "segexport_warehouse"
SEGMENTS = ["vip_customers", "newsletter_fr", "churn_risk", "loyalty_gold", "recent_signups", "all_customers"]
DEFAULT_SEGMENTS = ["vip_customers", "newsletter_fr", "churn_risk"]
EXPORT_SQL = "SELECT * FROM segment_export WHERE segment_name = {segment} ORDER BY customer_id"

# One Asset per segment table: other DAGs can be scheduled on fresh segments (see segment_consumers.py).
SEGMENT_ASSETS = {name: Asset(name=f"segment_{name}", uri=f"x-segexport://warehouse/segments/{name}")
                  for name in SEGMENTS}

# destination -> (connection id, export task id, pool slots = the vendor's concurrency)
DESTINATIONS = {
    "mailchimp": ("mailchimp_default", "export_mailchimp", 10),
    "campaign_monitor": ("campaign_monitor_default", "export_campaign_monitor", 4),
    "dynamics_sales": ("dynamics365_default", "export_dynamics_sales", 4),
}

with DAG(
    dag_id="segment_export",
    description="Refresh segments in the warehouse, then export them to Mailchimp, Campaign Monitor and Dynamics 365.",
    doc_md=__doc__,
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    is_paused_upon_creation=True,
    max_active_runs=1,
    render_template_as_native_obj=True,
    default_args={"owner": "data-team", "retries": 2, "retry_delay": pendulum.duration(minutes=5),
                  "retry_exponential_backoff": True,
                  # Export state in a SQL connection (several workers): the Variable segexport_state_conn_id
                  # names it; unset, each export keeps its state in a SQLite file of its worker.
                  "state_conn_id": "{{ var.value.get('segexport_state_conn_id', none) }}"},
    tags=["segexport", "mailchimp", "campaign_monitor", "dynamics365", "example"],
    params={
        "segments": Param(DEFAULT_SEGMENTS, type="array", items={"type": "string", "enum": SEGMENTS},
                          title="Segments", description="Which segments to refresh-and-export."),
        "destinations": Param(list(DESTINATIONS), type="array", items={"type": "string", "enum": list(DESTINATIONS)},
                              title="Destinations", description="Where to export. A destination without a "
                              "connection is skipped."),
        "dry_run": Param(False, type="boolean", title="Dry run",
                         description="Validate, count and write the rejects file, but send nothing."),
        "full_refresh": Param(False, type="boolean", title="Full refresh",
                              description="Send every member, not only what changed since the last export."),
        "apply_plan": Param(None, type=["null", "string"], title="Apply plan",
                            description="Path of a plan written by an earlier dry run (see its log): send and "
                            "remove exactly what it lists, nothing more. Empty: a normal export."),
        "allow_large_changes": Param(False, type="boolean", title="Allow large changes",
                                     description="Let an export through when a segment grew or shrank more than "
                                     "2x since the last export (a broken upstream model must not wipe a list)."),
    },
) as dag:

    @task(outlets=list(SEGMENT_ASSETS.values()))
    def refresh(**context) -> dict:
        """Rebuild segment membership in the warehouse (the bundled SQLite sample warehouse by default)."""
        from airflow.sdk import BaseHook

        from airflow_provider_segexport import warehouse

        conn = BaseHook.get_connection(WAREHOUSE_CONN_ID)
        if conn.conn_type != "sqlite":
            raise ValueError(f"This example refreshes the SQLite sample warehouse; connection "
                             f"'{WAREHOUSE_CONN_ID}' is {conn.conn_type}. Replace this task with your own "
                             "refresh (dbt, SQL) for a real warehouse.")
        counts = warehouse.refresh(conn.host)
        for name, asset in SEGMENT_ASSETS.items():
            context["outlet_events"][asset].extra = {"members": counts.get(name, 0)}
        return counts

    @task.branch
    def choose_destinations(**context) -> list[str]:
        """Export tasks to run: the requested destinations that have a connection."""
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        chosen = []
        for name in context["params"]["destinations"]:
            conn_id, task_id, _ = DESTINATIONS[name]
            try:
                BaseHook.get_connection(conn_id)
            except AirflowNotFoundException:
                print(f"Skipping {name}: no connection '{conn_id}'. Add it (Admin > Connections) to export there.")
                continue
            chosen.append(task_id)
        if not chosen:
            print("No destination to export to.")
            return ["report"]
        return chosen

    exports = [
        MailchimpSegmentExportOperator(
            task_id="export_mailchimp",
            audience_id="{{ var.value.mailchimp_audience_id }}",
            segments="{{ params.segments }}",
            sql=EXPORT_SQL,
            sql_conn_id=WAREHOUSE_CONN_ID,
            first_name_field="first_name",
            last_name_field="last_name",
            dry_run="{{ params.dry_run }}",
            full_refresh="{{ params.full_refresh }}",
            allow_large_changes="{{ params.allow_large_changes }}",
            apply_plan="{{ params.apply_plan }}",
            # The sample warehouse bumps a profile's updated_at whenever it changes (and a profile joins a
            # segment only through such a change): a scheduled run reads only the rows changed since the last
            # complete export. full_refresh (or mirror mode) reads every row.
            change_column="updated_at",
            mailchimp_conn_id="mailchimp_default",
            pool="mailchimp_default",
            pool_slots=DESTINATIONS["mailchimp"][2],
            max_rejects_share=0.05,
        ),
        CampaignMonitorSegmentExportOperator(
            task_id="export_campaign_monitor",
            list_id="{{ var.value.campaign_monitor_list_id }}",
            segments="{{ params.segments }}",
            sql=EXPORT_SQL,
            sql_conn_id=WAREHOUSE_CONN_ID,
            first_name_field="first_name",
            last_name_field="last_name",
            custom_fields={"City": "city", "Country": "country"},
            create_missing_custom_fields=True,
            # Campaign Monitor requires a consent-to-track value on every subscriber: "Unchanged" keeps an
            # existing subscriber's choice and records none for a new one.
            consent_to_track="Unchanged",
            segment_field="Segments",  # a MultiSelectMany field listing each subscriber's segments
            dry_run="{{ params.dry_run }}",
            full_refresh="{{ params.full_refresh }}",
            allow_large_changes="{{ params.allow_large_changes }}",
            apply_plan="{{ params.apply_plan }}",
            change_column="updated_at",
            campaign_monitor_conn_id="campaign_monitor_default",
            pool="campaign_monitor_default",
            pool_slots=DESTINATIONS["campaign_monitor"][2],
            max_in_flight=DESTINATIONS["campaign_monitor"][2],
            max_rejects_share=0.05,
        ),
        DynamicsSalesSegmentExportOperator(
            task_id="export_dynamics_sales",
            segments="{{ params.segments }}",
            sql=EXPORT_SQL,
            sql_conn_id=WAREHOUSE_CONN_ID,
            # The warehouse keeps each profile's Dataverse contact ID; contacts are never created: a profile
            # without an (active) contact is a reject.
            contact_id_field="dataverse_contact_id",
            list_name="Segment: {segment}",  # one static marketing list per segment
            dry_run="{{ params.dry_run }}",
            full_refresh="{{ params.full_refresh }}",
            allow_large_changes="{{ params.allow_large_changes }}",
            apply_plan="{{ params.apply_plan }}",
            change_column="updated_at",
            dynamics365_conn_id="dynamics365_default",
            pool="dynamics365_default",
            pool_slots=DESTINATIONS["dynamics_sales"][2],
            max_in_flight=DESTINATIONS["dynamics_sales"][2],
            max_rejects_share=0.05,
        ),
    ]

    @task(trigger_rule="none_failed")
    def report(**context) -> list[dict]:
        """One table: destination, segment, sent, rejected, duration."""
        rows = []
        for name, (_, task_id, _) in DESTINATIONS.items():
            summary = context["ti"].xcom_pull(task_ids=task_id)
            if not summary:
                continue
            for segment, s in summary["segments"].items():
                sent = s["created"] + s["updated"] + s["unchanged"]
                rows.append({"destination": name, "segment": segment, "sent": sent, "rejected": s["rejected"],
                             "planned": s["planned"], "seconds": s["duration_s"]})
        head = ("destination", "segment", "sent", "rejected", "planned", "seconds")
        widths = [max(len(h), *(len(str(r[h])) for r in rows)) if rows else len(h) for h in head]
        lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
                 "-+-".join("-" * w for w in widths)]
        lines += [" | ".join(str(r[h]).ljust(w) for h, w in zip(head, widths, strict=True)) for r in rows]
        print("Export report\n" + "\n".join(lines))
        return rows

    refreshed = refresh()
    chosen = choose_destinations()
    done = report()
    refreshed >> chosen >> exports >> done
    chosen >> done
