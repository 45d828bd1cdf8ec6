"""Campaign email events from the log files an ACS export workflow writes -> Dynamics 365, for the integration tests:
the folder, the workflow and the types come from the run's conf."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_segexport.operators.campaign_events import CampaignEventsToDynamicsOperator

PARAMS = {"event_types": ["sent", "open", "click", "bounce"], "state_dir": None, "replay": False, "log_path": "",
          "workflow_id": None, "log_columns": None}

for dag_id, kwargs in (("campaign_event_files_test", {}),
                       ("campaign_event_files_semicolon_test", {"log_delimiter": ";"})):
    with DAG(
        dag_id,
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        render_template_as_native_obj=True,
        params=PARAMS,
        tags=["test"],
    ) as dag:
        CampaignEventsToDynamicsOperator(
            task_id="events",
            source="log_files",
            log_path="{{ params.log_path }}",
            log_columns="{{ params.log_columns }}",
            workflow_id="{{ params.workflow_id }}",
            workflow_poll_interval=0.1,
            workflow_timeout=30,
            event_types="{{ params.event_types }}",
            replay="{{ params.replay }}",
            state_dir="{{ params.state_dir }}",
            batch_size=7,          # windows of 28 events (4 UpsertMultiple calls), several a file
            max_in_flight=3,
            progress_interval=1,
            retries=0,
            **kwargs,
        )
    globals()[dag_id] = dag
