"""Waits for Mailchimp batch operations to finish, in the triggerer (no worker slot held).

Read-only polling: running it twice (triggerer restart, HA) has no side effect.

How it talks to Mailchimp: the connection is read with the async helpers of common-compat
(``get_async_connection``, ``get_async_extra_dejson``: a synchronous read or secret masking inside the
triggerer's event loop can stall it or raise ``DeadlockImminentError``), and the client is built from it by
the same code as the worker's (:meth:`MailchimpHook.afrom_conn_id` then ``hook.http``). Each status
check, one GET per batch per poll, runs in a thread (``asyncio.to_thread``) so the loop never blocks.

The http provider's ``HttpAsyncHook`` (aiohttp) does not fit here: it turns every unknown connection
extra into an HTTP header (``api_key``, ``data_privacy_acknowledged``, ... would reach Mailchimp), takes
TLS settings from ``verify`` rather than the connection's ``ca_bundle``, does not retry 429 nor read
``Retry-After``, and would duplicate the credentials, error parsing and retry policy the worker already
has, for a poll that makes one request every ``poll_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_segexport.http import RetryPolicy, VendorAPIError

#: Retries within one status check: few and short, as the next poll tries again anyway.
POLL_RETRY = RetryPolicy(max_attempts=3, backoff_base=0.5, backoff_max=5.0)
_KEEP = ("id", "status", "total_operations", "finished_operations", "errored_operations", "response_body_url",
         "completed_at")


class MailchimpBatchTrigger(BaseTrigger):
    """Polls Mailchimp batch operations until every one has finished, then yields their status.

    Yields one event: ``{"status": "success", "batches": [...], "payload": payload}`` (each batch reduced to
    its id, status, counts, ``response_body_url`` and ``completed_at``, in the order of ``batch_ids``), or
    ``{"status": "error", "message": ...}`` when Mailchimp refuses a status check (an unknown batch, refused
    credentials) or ``timeout`` passes first. A check that finds Mailchimp unreachable, throttling or failing
    transiently is made again at the next poll.

    :param conn_id: the Mailchimp connection's id.
    :param batch_ids: the batch operations to wait for.
    :param poll_interval: seconds between status checks.
    :param timeout: seconds to wait in all before giving up.
    :param payload: returned untouched in the success event (what the task needs to resume).
    """

    def __init__(self, conn_id: str, batch_ids: list[str], poll_interval: float = 10.0,
                 timeout: float = 6 * 3600, payload: dict | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.batch_ids = list(batch_ids)
        self.poll_interval = float(poll_interval)
        self.timeout = float(timeout)
        self.payload = payload or {}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """The class path and keyword arguments that re-create this trigger on any triggerer."""
        return (
            "airflow_provider_segexport.triggers.mailchimp.MailchimpBatchTrigger",
            {"conn_id": self.conn_id, "batch_ids": self.batch_ids, "poll_interval": self.poll_interval,
             "timeout": self.timeout, "payload": self.payload},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll every batch until all have finished (a success event) or an error or the timeout (an error event)."""
        from airflow_provider_segexport.hooks.mailchimp import MailchimpHook

        hook = None
        try:
            hook = await MailchimpHook.afrom_conn_id(self.conn_id, concurrency=1, retry=POLL_RETRY)
            deadline = time.monotonic() + self.timeout
            done: dict[str, dict] = {}
            last_error: VendorAPIError | None = None
            while True:
                for bid in self.batch_ids:
                    if bid in done:
                        continue
                    try:
                        batch = await asyncio.to_thread(hook.get_batch, bid)
                    except VendorAPIError as exc:
                        if not exc.retryable:
                            raise
                        last_error = exc
                        self.log.warning("Mailchimp batch %s: status check failed (%s); checking again in %.0fs", bid,
                                         exc, self.poll_interval)
                        continue
                    last_error = None
                    if batch.get("status") == "finished":
                        done[bid] = {k: batch.get(k) for k in _KEEP}
                        self.log.info("Mailchimp batch %s finished: %s operation(s), %s errored", bid,
                                      batch.get("total_operations"), batch.get("errored_operations"))
                if len(done) == len(self.batch_ids):
                    yield TriggerEvent({"status": "success", "batches": [done[b] for b in self.batch_ids],
                                        "payload": self.payload})
                    return
                if time.monotonic() > deadline:
                    cause = f" (last status check: {last_error})" if last_error is not None else ""
                    yield TriggerEvent({"status": "error", "message": f"Mailchimp batches {sorted(set(self.batch_ids) - set(done))} "
                                        f"not finished after {self.timeout:.0f}s{cause}"})
                    return
                await asyncio.sleep(self.poll_interval)
        except Exception as exc:  # noqa: BLE001 - reported to the task
            yield TriggerEvent({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
        finally:
            if hook is not None:
                hook.close()
