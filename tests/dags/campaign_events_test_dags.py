"""Small Campaign email events -> Dynamics 365 DAGs for the integration tests (the journal, and the log files an ACS
export workflow writes): the arguments come from the run's conf."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_segexport.operators.campaign_events import CampaignEventsToDynamicsOperator

PARAMS = {"event_types": ["sent", "open", "click", "bounce"], "state_dir": None, "replay": False, "log_path": "",
          "workflow_id": None, "log_columns": None}
#: the log-file source: the folder, the workflow and the column names come from the run's conf
FILES = {"source": "log_files", "log_path": "{{ params.log_path }}", "log_columns": "{{ params.log_columns }}",
         "workflow_id": "{{ params.workflow_id }}", "workflow_poll_interval": 0.1, "workflow_timeout": 30}

for dag_id, kwargs in (("campaign_events_test", {}),
                       ("campaign_events_deferred_test", {"deferrable": True, "poll_interval": 0.2,
                                                          "wait_timeout": 30}),
                       ("campaign_events_batch_test", {"write_with": "batch"}),
                       ("campaign_event_files_test", FILES),
                       ("campaign_event_files_semicolon_test", {**FILES, "log_delimiter": ";"})):
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
            event_types="{{ params.event_types }}",
            replay="{{ params.replay }}",
            state_dir="{{ params.state_dir }}",
            batch_size=7,          # many UpsertMultiple calls for a few dozen events (a log file: windows of 28)
            journal_limit=10,      # several journal pages, followed by their Link: rel="next"
            max_in_flight=3,
            progress_interval=1,
            retries=0,
            **kwargs,
        )
    globals()[dag_id] = dag
