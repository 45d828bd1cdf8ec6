"""The opt-out sync for the integration tests: direction and state directory from the run's conf."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_segexport.operators.optout_sync import OptOutSyncOperator

with DAG(
    "optout_sync_test",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    render_template_as_native_obj=True,
    params={"direction": "bidirectional", "state_dir": None, "dry_run": False},
    tags=["test"],
) as optout_sync_test:
    OptOutSyncOperator(task_id="optouts", direction="{{ params.direction }}", state_dir="{{ params.state_dir }}",
                       dry_run="{{ params.dry_run }}", retries=0)
