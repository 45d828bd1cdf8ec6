"""
### Segment consumers

An example of data-aware scheduling: this DAG runs whenever `segment_export`'s refresh has published
a fresh `vip_customers` segment (an Airflow Asset), e.g. to rebuild a dashboard or notify a team.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Asset, task

VIP = Asset(name="segment_vip_customers", uri="x-segexport://warehouse/segments/vip_customers")

with DAG(
    dag_id="segment_consumers",
    doc_md=__doc__,
    schedule=[VIP],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    default_args={"owner": "data-team", "retries": 1},
    tags=["segexport", "example", "assets"],
) as dag:

    @task(inlets=[VIP])
    def announce_fresh_vip_segment(**context) -> int:
        """Log how many members the fresh segment has (from the refresh's asset event)."""
        events = context["inlet_events"][VIP]
        members = events[-1].extra.get("members", 0) if events else 0
        print(f"vip_customers was refreshed: {members} member(s)")
        return members

    announce_fresh_vip_segment()
