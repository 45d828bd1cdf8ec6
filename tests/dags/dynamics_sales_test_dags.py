"""A small Dynamics 365 Sales export DAG for the integration tests: every argument comes from the run's conf."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_segexport.operators.dynamics_sales import DynamicsSalesSegmentExportOperator

PARAMS = {"segments": [], "sql": "", "mode": "upsert", "dry_run": False, "state_dir": None, "full_refresh": False,
          "allow_large_changes": False, "apply_plan": "", "change_column": "", "list_name": "{segment}"}

for dag_id, kwargs in (("dynamics_sales_export_test", {"contact_id_field": "dataverse_contact_id"}),
                       ("dynamics_sales_match_test", {"match_on": "emailaddress1", "match_field": "email"})):
    with DAG(
        dag_id,
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        render_template_as_native_obj=True,
        params=PARAMS,
        tags=["test"],
    ) as dag:
        DynamicsSalesSegmentExportOperator(
            task_id="export",
            segments="{{ params.segments }}",
            sql="{{ params.sql }}",
            sql_conn_id="warehouse",
            list_name="{{ params.list_name }}",
            mode="{{ params.mode }}",
            dry_run="{{ params.dry_run }}",
            state_dir="{{ params.state_dir }}",
            full_refresh="{{ params.full_refresh }}",
            allow_large_changes="{{ params.allow_large_changes }}",
            apply_plan="{{ params.apply_plan }}",
            change_column="{{ params.change_column }}",
            progress_interval=1,
            retries=0,
            **kwargs,
        )
    globals()[dag_id] = dag
