"""Small Campaign email events -> Dynamics 365 DAGs for the integration tests: the arguments come from the run's conf."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_segexport.operators.campaign_events import CampaignEventsToDynamicsOperator

PARAMS = {"event_types": ["sent", "open", "click", "bounce"], "state_dir": None, "replay": False}

for dag_id, kwargs in (("campaign_events_test", {}),
                       ("campaign_events_deferred_test", {"deferrable": True, "poll_interval": 0.2,
                                                          "wait_timeout": 30}),
                       ("campaign_events_batch_test", {"write_with": "batch"})):
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
            batch_size=7,          # many UpsertMultiple calls for a few dozen events
            journal_limit=10,      # several journal pages, followed by their Link: rel="next"
            max_in_flight=3,
            progress_interval=1,
            retries=0,
            **kwargs,
        )
    globals()[dag_id] = dag
