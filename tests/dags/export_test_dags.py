"""Small DAGs for the integration tests: every argument comes from the run's conf (params)."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_segexport.operators.mailchimp import MailchimpSegmentExportOperator


def _export(**kw):
    return MailchimpSegmentExportOperator(
        task_id="export",
        audience_id="{{ params.audience_id }}",
        segments="{{ params.segments }}",
        sql="{{ params.sql }}",
        sql_conn_id="warehouse",
        first_name_field="first_name",
        last_name_field="last_name",
        merge_fields="{{ params.merge_fields }}",
        mode="{{ params.mode }}",
        dry_run="{{ params.dry_run }}",
        state_dir="{{ params.state_dir }}",
        state_conn_id="{{ params.state_conn_id }}",
        full_refresh="{{ params.full_refresh }}",
        allow_large_changes="{{ params.allow_large_changes }}",
        apply_plan="{{ params.apply_plan }}",
        change_column="{{ params.change_column }}",
        progress_interval=1,
        retries=0,
        **kw,
    )


PARAMS = {"audience_id": "", "segments": [], "sql": "", "mode": "upsert", "dry_run": False,
          "merge_fields": {}, "state_dir": None, "state_conn_id": None, "full_refresh": False,
          "allow_large_changes": False, "apply_plan": "", "change_column": ""}

for dag_id, kwargs in (("mailchimp_export_test", {}),
                       ("mailchimp_export_deferred_test", {"deferrable": True, "poll_interval": 0.5}),
                       ("mailchimp_export_every_member_test", {"delta": False})):
    with DAG(
        dag_id,
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        render_template_as_native_obj=True,
        params=PARAMS,
        tags=["test"],
    ) as dag:
        _export(**kwargs)
    globals()[dag_id] = dag
