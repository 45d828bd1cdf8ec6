"""For tests/test_celery_deployment.py: one segment per run to the example's Mailchimp audience, two runs at
once. Each export holds 5 of the ``mailchimp_default`` pool's 10 slots and keeps 5 calls in flight, so two
run side by side and together stay within Mailchimp's 10 connections."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_segexport.operators.mailchimp import MailchimpSegmentExportOperator

with DAG(
    dag_id="segment_export_concurrent",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=2,
    render_template_as_native_obj=True,
    params={"segments": ["churn_risk"]},
    tags=["test"],
):
    MailchimpSegmentExportOperator(
        task_id="export_mailchimp",
        audience_id="{{ var.value.mailchimp_audience_id }}",
        segments="{{ params.segments }}",
        sql="SELECT * FROM segment_export WHERE segment_name = {segment} ORDER BY customer_id",
        sql_conn_id="segexport_warehouse",
        first_name_field="first_name",
        last_name_field="last_name",
        state_conn_id="{{ var.value.segexport_state_conn_id }}",
        pool="mailchimp_default",
        pool_slots=5,
        max_in_flight=5,
        retries=0,
    )
