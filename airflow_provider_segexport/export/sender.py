"""The sender: batches to a vendor with a bounded number in flight, split on refusal, per-record outcomes.

It knows nothing of segments, sources or export state: it calls ``send(context, records)`` on a thread
pool and hands each batch's :class:`BatchOutcome` to ``on_result(context, records, outcome)``. The
export engine and the sync use it alike.

Backpressure: at most ``max_in_flight`` batches are being sent and as many more wait ready behind them
(a lane that frees up starts its next call at once, while the caller prepares more); :meth:`submit`
blocks beyond that, so memory holds about ``2 * max_in_flight`` batches whatever the input's size.

When the vendor refuses a whole batch because of its content (:class:`BatchRefused`), the batch is split
in halves until the bad record is isolated and rejected with the vendor's reason; the rest still goes
through. Any other exception is the sender's :attr:`failure`: batches not sent yet are handed to
``on_not_sent`` and every later :meth:`submit` too, so the caller can account for them and stop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from airflow_provider_segexport.export.destination import BatchOutcome, BatchRefused, ExportError, Outcome
from airflow_provider_segexport.export.records import Record

log = logging.getLogger(__name__)

SendFn = Callable[[Any, list[Record]], "list[Outcome] | BatchOutcome"]


class BatchSender:
    """Sends batches on a pool of ``max_in_flight`` threads.

    :param send: one vendor call for one batch: ``send(context, records)`` returns one :class:`Outcome` per
        record or a :class:`BatchOutcome`; raises :class:`BatchRefused` to have the batch split.
    :param on_result: ``on_result(context, records, outcome)`` once a batch is answered (in a sender
        thread; several at once): the outcome's counts add up to the batch's size.
    :param on_not_sent: ``on_not_sent(context, records)`` for a batch not sent because the sender failed.
    :param max_in_flight: calls at once.
    :param name: the vendor's name, in messages.
    :param logger: where splits are logged.
    """

    def __init__(self, send: SendFn, on_result: Callable[[Any, list[Record], BatchOutcome], None],
                 on_not_sent: Callable[[Any, list[Record]], None], *, max_in_flight: int, name: str = "destination",
                 logger: logging.Logger | Any = None) -> None:
        self._send = send
        self._on_result = on_result
        self._on_not_sent = on_not_sent
        self.max_in_flight = max(1, int(max_in_flight))
        self.name = name
        self.log = logger or log
        #: the first exception a send raised (other than BatchRefused); None while all is well
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="segexport")
        self._slots = threading.BoundedSemaphore(2 * self.max_in_flight)  # in flight + ready
        self._pending: list[Future] = []

    def __enter__(self) -> BatchSender:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def submit(self, context: Any, records: list[Record]) -> None:
        """Queue one batch; blocks while ``2 * max_in_flight`` batches are in flight or ready.

        :param context: passed back to the callbacks (e.g. the segment and its counters).
        :param records: the batch.
        """
        self._slots.acquire()
        if self.failure is not None:
            self._slots.release()
            self._on_not_sent(context, records)
            return
        fut = self._pool.submit(self._run, context, records)
        fut.add_done_callback(self._release)
        self._pending.append(fut)
        if len(self._pending) > 4 * self.max_in_flight:
            self._pending[:] = [f for f in self._pending if not f.done()]

    def _release(self, _fut: Future) -> None:
        self._slots.release()

    def wait(self) -> None:
        """Wait until every batch submitted so far is answered (or not sent) and its callback returned."""
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    def close(self) -> None:
        """Wait for the batches in flight and stop the threads."""
        self._pool.shutdown(wait=True)

    def _run(self, context: Any, records: list[Record]) -> None:
        if self.failure is not None:  # a batch that was waiting when another one failed
            self._on_not_sent(context, records)
            return
        try:
            outcome = self.send_splitting(context, records)
        except BaseException as exc:  # noqa: BLE001 - the caller reports it once the batches drain
            with self._lock:
                if self.failure is None:
                    self.failure = exc
            self._on_not_sent(context, records)
            return
        self._on_result(context, records, outcome)

    def send_splitting(self, context: Any, records: list[Record]) -> BatchOutcome:
        """Send one batch now (in the calling thread), halving it on :class:`BatchRefused` until the refused
        records are single; return its outcome, checked to account for every record.

        :param context: passed to ``send``.
        :param records: the batch.
        """
        try:
            outcome = self._send(context, records)
        except BatchRefused as exc:
            if len(records) == 1:
                return BatchOutcome({"rejected": 1}, [Outcome(records[0], "rejected", exc.message)])
            mid = len(records) // 2
            self.log.info("%s refused a batch of %d (%s); splitting to isolate the bad row(s)", self.name,
                          len(records), exc.message)
            return self.send_splitting(context, records[:mid]) + self.send_splitting(context, records[mid:])
        if not isinstance(outcome, BatchOutcome):
            if len(outcome) != len(records):
                raise ExportError(f"{self.name} adapter returned {len(outcome)} outcomes for {len(records)} records")
            return BatchOutcome.of(outcome)
        if sum(outcome.counts.values()) != len(records):
            raise ExportError(f"{self.name} adapter counted {sum(outcome.counts.values())} outcomes for "
                              f"{len(records)} records")
        return outcome
