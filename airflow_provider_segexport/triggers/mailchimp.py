"""Waits for Mailchimp batch operations to finish, in the triggerer (no worker slot held).

Read-only polling: running it twice (triggerer restart, HA) has no side effect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

_KEEP = ("id", "status", "total_operations", "finished_operations", "errored_operations", "response_body_url",
         "completed_at")


class MailchimpBatchTrigger(BaseTrigger):
    def __init__(self, conn_id: str, batch_ids: list[str], poll_interval: float = 10.0,
                 timeout: float = 6 * 3600, payload: dict | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.batch_ids = list(batch_ids)
        self.poll_interval = float(poll_interval)
        self.timeout = float(timeout)
        #: returned untouched in the event (what the task needs to resume: summary, sidecar files)
        self.payload = payload or {}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "airflow_provider_segexport.triggers.mailchimp.MailchimpBatchTrigger",
            {"conn_id": self.conn_id, "batch_ids": self.batch_ids, "poll_interval": self.poll_interval,
             "timeout": self.timeout, "payload": self.payload},
        )

    async def _hook(self):
        from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson

        from airflow_provider_segexport.hooks.mailchimp import MailchimpHook

        hook = MailchimpHook(self.conn_id)
        conn = await get_async_connection(self.conn_id, hook=hook)
        extras = await get_async_extra_dejson(conn)  # masks the secret extras without blocking the loop
        hook.__dict__["connection"] = conn
        hook.__dict__["extras"] = dict(extras or {})
        hook.mask_secrets = False  # already masked above; sync masking in the triggerer can stall it
        return hook

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            hook = await self._hook()
            deadline = time.monotonic() + self.timeout
            done: dict[str, dict] = {}
            while True:
                for bid in self.batch_ids:
                    if bid in done:
                        continue
                    batch = await asyncio.to_thread(hook.get_batch, bid)
                    if batch.get("status") == "finished":
                        done[bid] = {k: batch.get(k) for k in _KEEP}
                        self.log.info("Mailchimp batch %s finished: %s operation(s), %s errored", bid,
                                      batch.get("total_operations"), batch.get("errored_operations"))
                if len(done) == len(self.batch_ids):
                    yield TriggerEvent({"status": "success", "batches": [done[b] for b in self.batch_ids],
                                        "payload": self.payload})
                    return
                if time.monotonic() > deadline:
                    yield TriggerEvent({"status": "error", "message": f"Mailchimp batches {sorted(set(self.batch_ids) - set(done))} "
                                        f"not finished after {self.timeout:.0f}s"})
                    return
                await asyncio.sleep(self.poll_interval)
        except Exception as exc:  # noqa: BLE001 - reported to the task
            yield TriggerEvent({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
