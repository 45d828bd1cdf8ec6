"""Waits for new Adobe Campaign email events in the Adobe I/O Events journal, in the triggerer (no worker slot).

Read-only polling from a position: reading the journal consumes nothing (each reader keeps its own cursor), so
running it twice (triggerer restart, HA) has no side effect. Each poll asks for one event after the position; an
answer 204 means nothing newer yet, and its ``Retry-After`` is honoured (the next poll waits at least that long).
Without a position (``latest``), the first answer's ``Link: rel="next"`` gives the position to wait from, so events
that arrive between two polls are not missed (an empty journal gives none: it is then read from its start).

The connection is read with the async helpers (``AdobeCampaignHook.afrom_conn_id``), and each poll runs the
worker's own client in a thread (``asyncio.to_thread``), as the Mailchimp trigger does (see its docstring for why
not the http provider's ``HttpAsyncHook``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_segexport.http import RetryPolicy, VendorAPIError

#: Retries within one poll: few and short, as the next poll tries again anyway.
POLL_RETRY = RetryPolicy(max_attempts=3, backoff_base=0.5, backoff_max=5.0)


class CampaignEventsTrigger(BaseTrigger):
    """Polls the Adobe I/O Events journal until an event newer than ``since`` is there.

    Yields one event: ``{"status": "success", "since": <position read from>, "first": <position of the first new
    event>}``, ``{"status": "timeout", "since": ...}`` when ``timeout`` passes first, or ``{"status": "error",
    "message": ...}`` when the journal refuses the read (credentials, an unknown registration). A poll that finds the
    journal unreachable, throttling or failing transiently is made again at the next one.

    :param conn_id: the Adobe Campaign connection (extra ``events_url``).
    :param since: the position to wait after (the sync's cursor); None: wait for events from now on.
    :param poll_interval: seconds between polls (at least the journal's ``Retry-After``).
    :param timeout: seconds to wait in all.
    """

    def __init__(self, conn_id: str, since: str | None = None, poll_interval: float = 60.0,
                 timeout: float = 3600.0) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.since = since
        self.poll_interval = float(poll_interval)
        self.timeout = float(timeout)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """The class path and keyword arguments that re-create this trigger on any triggerer."""
        return (
            "airflow_provider_segexport.triggers.campaign_events.CampaignEventsTrigger",
            {"conn_id": self.conn_id, "since": self.since, "poll_interval": self.poll_interval,
             "timeout": self.timeout},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until a new event (success), the timeout, or a refusal (error)."""
        from airflow_provider_segexport.hooks.adobe_campaign import AdobeCampaignHook
        from airflow_provider_segexport.sync.events import since_of

        hook = None
        since = self.since
        try:
            hook = await AdobeCampaignHook.afrom_conn_id(self.conn_id, concurrency=1, retry=POLL_RETRY)
            deadline = time.monotonic() + self.timeout
            polls = 0
            latest = since is None
            while True:
                wait = self.poll_interval
                try:
                    page = await asyncio.to_thread(hook.read_journal, since=since, latest=latest and since is None,
                                                   limit=1)
                except VendorAPIError as exc:
                    if not exc.retryable:
                        raise
                    self.log.warning("Adobe I/O Events journal: poll failed (%s); polling again in %.0fs", exc, wait)
                else:
                    polls += 1
                    if page.events:
                        self.log.info("New Campaign email events after %d poll(s)", polls)
                        yield TriggerEvent({"status": "success", "since": since,
                                            "first": page.events[0].get("position")})
                        return
                    if since is None:  # from now on: the position the journal gave for "now"
                        since = since_of(page.next_url)
                        # an empty journal has no position: read it from its start from now on (nothing is older)
                        latest = False
                    if page.retry_after:
                        wait = max(wait, page.retry_after)
                if time.monotonic() + wait > deadline:
                    yield TriggerEvent({"status": "timeout", "since": since,
                                        "message": f"no new Campaign email events in {self.timeout:.0f}s"})
                    return
                await asyncio.sleep(wait)
        except Exception as exc:  # noqa: BLE001 - reported to the task
            yield TriggerEvent({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
        finally:
            if hook is not None:
                hook.close()
