"""A small Campaign Monitor export DAG for the integration tests: every argument comes from the run's conf."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_segexport.operators.campaign_monitor import CampaignMonitorSegmentExportOperator

PARAMS = {"list_id": "", "segments": [], "sql": "", "mode": "upsert", "dry_run": False, "custom_fields": {},
          "state_dir": None, "full_refresh": False, "allow_large_changes": False, "apply_plan": "",
          "change_column": "", "consent_to_track": "Unchanged", "remove_leavers": False,
          "max_removal_share": 0.2, "delta": True}

with DAG(
    "campaign_monitor_export_test",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    render_template_as_native_obj=True,
    params=PARAMS,
    tags=["test"],
) as campaign_monitor_export_test:
    CampaignMonitorSegmentExportOperator(
        task_id="export",
        list_id="{{ params.list_id }}",
        segments="{{ params.segments }}",
        sql="{{ params.sql }}",
        sql_conn_id="warehouse",
        first_name_field="first_name",
        last_name_field="last_name",
        custom_fields="{{ params.custom_fields }}",
        consent_to_track="{{ params.consent_to_track }}",
        create_missing_custom_fields=True,
        remove_leavers="{{ params.remove_leavers }}",
        mode="{{ params.mode }}",
        dry_run="{{ params.dry_run }}",
        state_dir="{{ params.state_dir }}",
        full_refresh="{{ params.full_refresh }}",
        allow_large_changes="{{ params.allow_large_changes }}",
        apply_plan="{{ params.apply_plan }}",
        change_column="{{ params.change_column }}",
        progress_interval=1,
        retries=0,
    )
