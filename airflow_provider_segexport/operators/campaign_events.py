"""Adobe Campaign email events (sent, open, click, bounce) -> activities on the Dynamics 365 contact's timeline."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from airflow_provider_segexport.export.report import RejectsWriter, default_rejects_path
from airflow_provider_segexport.export.state import open_export_state
from airflow_provider_segexport.hooks.adobe_campaign import AdobeCampaignHook, SignalRefused
from airflow_provider_segexport.hooks.base import as_bool
from airflow_provider_segexport.hooks.dynamics365 import Dynamics365Hook
from airflow_provider_segexport.sync.event_files import LOG_CURSOR_SEGMENT, LogContactResolver, LogFileSource
from airflow_provider_segexport.sync.events import (
    CURSOR_SEGMENT,
    DEFAULT_IN_FLIGHT,
    EVENT_TYPES,
    UPSERT_MAX,
    ContactResolver,
    EventEntity,
    EventsSync,
    event_types,
    load_cursor,
)

#: the sources of the events: the Adobe I/O Events journal, or the log files an ACS export workflow writes
SOURCES = ("journal", "log_files")


class CampaignEventsToDynamicsOperator(BaseOperator):
    """Write Adobe Campaign email events to Dynamics 365 as activities regarding the contact, exactly once.

    Each run reads the Adobe I/O Events journal from the cursor the last run left in the export state, writes the
    enabled event types as records of ``entity`` (``UpsertMultiple`` by the event-ID alternate key, in batches,
    concurrently) and moves the cursor after the events up to it are written. A failed or killed run leaves the cursor
    where it was: its retry reads the same events again and writes each once. Events whose profile has no Dynamics 365
    contact are rejects (rejects file, reason ``contact_not_found`` / ``profile_not_found``), not failures. Returns
    the summary (XCom): counts per type, created, already there (``updated``), rejected.

    Two ways to run it: on a schedule (e.g. hourly: each run syncs what arrived since the last one), or continuously
    with ``deferrable=True`` in a DAG with ``schedule="@continuous"`` and ``max_active_runs=1``: each run first waits
    in the triggerer (no worker slot) until the journal has an event after the cursor, then syncs.

    Two sources: ``source="journal"`` (the default, above) or ``source="log_files"``: the CSV delivery/tracking log
    files an ACS export workflow writes to storage (``log_path``, any ``ObjectStoragePath``), each file read once in
    name order from a cursor of its own (:mod:`~airflow_provider_segexport.sync.event_files`); with ``workflow_id``
    the task first starts that workflow (or triggers its External signal activity) and waits until Campaign says it
    finished. Writing is the same for both (the same records, by the same event IDs). The deferrable mode waits on
    the journal only: ``deferrable=True`` with ``source="log_files"`` is refused.

    :param adobe_campaign_conn_id: the ``adobe_campaign`` connection, with the journal's URL (extra ``events_url``).
    :param dynamics365_conn_id: the ``dynamics365`` connection (write access to the events table, read on contacts).
    :param event_types: the types written (``sent``, ``open``, ``click``, ``bounce``; a list or a comma-separated
        string). Events of the other types are read past. Templated.
    :param entity: the events table (see :class:`~airflow_provider_segexport.sync.events.EventEntity`; default the
        custom activity ``new_emailevent``). Templated.
    :param crm_id_field: the Campaign profile field holding the Dynamics 365 contact ID (the contacts sync's key).
    :param match_email: for a profile without the contact ID, use the one active contact with the same email.
    :param batch_size: records per UpsertMultiple call (at most 1,000).
    :param max_in_flight: calls at once (default 4).
    :param journal_limit: events per journal page asked for (None: the journal's default).
    :param max_events: stop after about this many events (the next run goes on); None: until the journal is empty.
    :param start_at: with no cursor yet: ``earliest`` (every event the journal holds: 7 days) or ``latest``.
    :param replay: forget the cursor and read everything the journal still holds again (each event is still written
        once: existing ones count as already there). Templated.
    :param state_dir: the export state's directory (default ``$AIRFLOW_HOME/segexport/state``). Templated.
    :param state_conn_id: an Airflow SQL connection for the export state (several workers). Templated.
    :param rejects_path: where the rejects JSON Lines go (default under ``$AIRFLOW_HOME``). Templated.
    :param progress_interval: seconds between progress lines.
    :param deferrable: first wait in the triggerer for an event after the cursor.
    :param poll_interval: seconds between journal polls while deferred (at least the journal's ``Retry-After``).
    :param wait_timeout: seconds to wait for an event while deferred; then the task is skipped.
    :param source: ``journal`` (default) or ``log_files``.
    :param log_path: with ``log_files``: the folder the export workflow's Transfer file activity writes to, as an
        ``ObjectStoragePath`` URL (``s3://bucket/acs/events/``, ``sftp://host/exports/``, ``file:///data/acs``).
        Templated.
    :param log_conn_id: the Airflow connection of that storage (None: the URL's default). Templated.
    :param log_pattern: a glob the file names must match (default ``*.csv``, ``*.txt`` and their ``.gz``).
    :param log_columns: event field -> the file's header name, for columns named otherwise (``{"id": "Delivery log
        ID", "timestamp": "Event date"}``; fields in
        :data:`~airflow_provider_segexport.sync.event_files.LOG_COLUMNS`). Templated.
    :param log_delimiter: the files' field delimiter (default ``,``).
    :param log_encoding: the files' encoding (default UTF-8, with or without a byte-order mark).
    :param workflow_id: with ``log_files``: the export workflow to run first (its ID in Campaign, ``WKF12``); None:
        the files are read as they are (the workflow runs on its own scheduler). Templated.
    :param workflow_signal: trigger the workflow's External signal activity (starting the workflow first when it is
        not running) instead of starting it; None: when the workflow has one.
    :param workflow_parameters: the parameters given with the signal (declared in the activity). Templated.
    :param workflow_poll_interval: seconds between two reads of the workflow's state while waiting for it.
    :param workflow_timeout: seconds to wait for the workflow to finish; then the task fails (nothing is read).
    :param write_with: how the records are written: ``auto`` (``UpsertMultiple``; when Dataverse answers that the
        table has no ``UpsertMultiple``, ``$batch`` upserts for the rest of the run, logged once), ``upsert_multiple``
        or ``batch`` (``$batch`` from the start: up to 1,000 ``PATCH`` upserts by the event-ID key a request, a record
        refused on its own is a reject). See :class:`~airflow_provider_segexport.sync.events.EventsSync`.
    """

    template_fields: Sequence[str] = ("event_types", "entity", "replay", "state_dir", "state_conn_id", "rejects_path",
                                      "log_path", "log_conn_id", "log_columns", "workflow_id", "workflow_parameters")
    ui_color = "#e8f1fb"

    def __init__(
        self,
        *,
        adobe_campaign_conn_id: str = AdobeCampaignHook.default_conn_name,
        dynamics365_conn_id: str = Dynamics365Hook.default_conn_name,
        event_types: Sequence[str] | str = EVENT_TYPES,
        entity: dict[str, Any] | None = None,
        crm_id_field: str = "cusCrmId",
        match_email: bool = False,
        batch_size: int = UPSERT_MAX,
        max_in_flight: int = DEFAULT_IN_FLIGHT,
        journal_limit: int | None = None,
        max_events: int | None = None,
        start_at: str = "earliest",
        replay: bool | str = False,
        state_dir: str | None = None,
        state_conn_id: str | None = None,
        rejects_path: str | None = None,
        progress_interval: float = 10.0,
        deferrable: bool = False,
        poll_interval: float = 60.0,
        wait_timeout: float = 3600.0,
        source: str = "journal",
        log_path: str | None = None,
        log_conn_id: str | None = None,
        log_pattern: str | None = None,
        log_columns: dict[str, str] | None = None,
        log_delimiter: str = ",",
        log_encoding: str = "utf-8-sig",
        workflow_id: str | None = None,
        workflow_signal: bool | None = None,
        workflow_parameters: dict[str, Any] | None = None,
        workflow_poll_interval: float = 30.0,
        workflow_timeout: float = 3600.0,
        write_with: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, not {source!r}.")
        if source == "log_files":
            if not log_path:
                raise ValueError("source='log_files' needs log_path: the folder the export workflow writes its files "
                                 "to (an ObjectStoragePath URL such as s3://bucket/acs/events/).")
            if deferrable:
                raise ValueError("deferrable=True waits on the Adobe I/O Events journal: it works with "
                                 "source='journal' only. With log files, schedule the DAG (or give workflow_id: the "
                                 "task starts the export workflow and waits for it).")
        elif workflow_id:
            raise ValueError("workflow_id runs an export workflow for source='log_files'; the journal needs none.")
        self.source = source
        self.log_path = log_path
        self.log_conn_id = log_conn_id
        self.log_pattern = log_pattern
        self.log_columns = log_columns
        self.log_delimiter = log_delimiter
        self.log_encoding = log_encoding
        self.workflow_id = workflow_id
        self.workflow_signal = workflow_signal
        self.workflow_parameters = workflow_parameters
        self.workflow_poll_interval = workflow_poll_interval
        self.workflow_timeout = workflow_timeout
        self.adobe_campaign_conn_id = adobe_campaign_conn_id
        self.dynamics365_conn_id = dynamics365_conn_id
        self.event_types = event_types
        self.entity = entity
        self.crm_id_field = crm_id_field
        self.match_email = match_email
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.journal_limit = journal_limit
        self.max_events = max_events
        self.start_at = start_at
        self.replay = replay
        self.state_dir = state_dir
        self.state_conn_id = state_conn_id
        self.rejects_path = rejects_path
        self.progress_interval = progress_interval
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.wait_timeout = wait_timeout
        self.write_with = write_with

    @property
    def scope(self) -> str:
        """The export state's scope: both connections."""
        return f"campaign-events:{self.adobe_campaign_conn_id}>{self.dynamics365_conn_id}"

    def _open_state(self):
        return open_export_state(self.scope, state_dir=self.state_dir or None, state_conn_id=self.state_conn_id or None)

    def execute(self, context) -> dict | None:
        """Sync the new events (in deferrable mode: first wait for one); return the summary.

        :param context: the task's context.
        """
        event_types(self.event_types)  # a typo fails before anything is read
        EventEntity.from_dict(self.entity)
        if self.deferrable and not as_bool(self.replay):
            from airflow_provider_segexport.triggers.campaign_events import CampaignEventsTrigger

            state = self._open_state()
            try:
                since = load_cursor(state.target(state.scope_id(self._segment())))
            finally:
                state.close()
            if since is None and self.start_at == "earliest":
                hook = AdobeCampaignHook(self.adobe_campaign_conn_id, concurrency=1)
                try:
                    waiting = bool(hook.read_journal(limit=1).events)
                finally:
                    hook.close()
                if waiting:  # no cursor yet and the journal holds events: they are all due, nothing to wait for
                    return self._sync(context)
            self.defer(trigger=CampaignEventsTrigger(self.adobe_campaign_conn_id, since=since,
                                                     poll_interval=self.poll_interval, timeout=self.wait_timeout),
                       method_name="execute_complete")
        return self._sync(context)

    def execute_complete(self, context, event: dict | None = None) -> dict:
        """Resume after the trigger: sync the new events (an error fails the task, a timeout skips it).

        :param context: the task's context.
        :param event: the trigger's event.
        """
        event = event or {}
        if event.get("status") == "timeout":
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException(event.get("message") or "no new Campaign email events")
        if event.get("status") != "success":
            from airflow.sdk.exceptions import AirflowException

            raise AirflowException(f"Waiting for Campaign email events failed: {event.get('message')}")
        # with no cursor yet, "earliest" reads the journal from its start (the trigger waited from "now" only
        # because the journal was empty); "latest" starts where the trigger started waiting
        return self._sync(context, since=event.get("since") if self.start_at == "latest" else None)

    def _segment(self) -> str:
        segment = LOG_CURSOR_SEGMENT if self.source == "log_files" else CURSOR_SEGMENT
        return f"{segment}:{EventEntity.from_dict(self.entity).logical_name}"

    def _sync(self, context, since: str | None = None) -> dict:
        ti = context.get("ti") if context else None
        run_id = str(getattr(ti, "run_id", None) or context.get("run_id") or "manual")
        entity = EventEntity.from_dict(self.entity)
        path = self.rejects_path
        if path:
            from airflow.sdk import ObjectStoragePath

            rejects_path = ObjectStoragePath(path)
        else:
            rejects_path = default_rejects_path(getattr(ti, "dag_id", None), run_id, getattr(ti, "task_id", None),
                                                getattr(ti, "try_number", None))
        rejects = RejectsWriter(rejects_path)
        campaign = AdobeCampaignHook(self.adobe_campaign_conn_id, concurrency=8)
        dataverse = Dynamics365Hook(self.dynamics365_conn_id, concurrency=self.max_in_flight)
        state = self._open_state()
        try:
            sid = state.scope_id(self._segment())
            if as_bool(self.replay):
                state.set_target(sid, "", run_id)
                self.log.info("Replay: the cursor is reset; every event the %s still holds is read again "
                              "(each written once)", "log folder" if self.source == "log_files" else "journal")
            source = resolver = workflow = None
            if self.source == "log_files":
                if self.workflow_id:
                    workflow = self._run_workflow(campaign)
                source = LogFileSource(self.log_path, conn_id=self.log_conn_id or None, pattern=self.log_pattern,
                                       columns=self.log_columns, delimiter=self.log_delimiter,
                                       encoding=self.log_encoding, crm_id_field=self.crm_id_field)
                resolver = LogContactResolver(campaign, dataverse, self.crm_id_field, as_bool(self.match_email))
            sync = EventsSync(
                campaign, dataverse, entity,
                resolver or ContactResolver(campaign, dataverse, self.crm_id_field, as_bool(self.match_email)),
                enabled=event_types(self.event_types), state=state, scope_id=sid, rejects=rejects, run_id=run_id,
                batch_size=self.batch_size, max_in_flight=self.max_in_flight, journal_limit=self.journal_limit,
                max_events=self.max_events, start_at=self.start_at, since=since,
                progress_interval=self.progress_interval, logger=self.log, write_with=self.write_with,
                source=source)
            try:
                summary = sync.run()
            finally:
                rejects.close()
                if rejects.count:
                    self.log.warning("%d event(s) rejected (%s); see %s", rejects.count,
                                     ", ".join(f"{k}: {v}" for k, v in rejects.by_reason.most_common()), rejects_path)
        finally:
            state.close()
            campaign.close()
            dataverse.close()
        if source is not None:
            summary["files_read"] = source.files_read
        if workflow is not None:
            summary["workflow"] = workflow
        summary["rejects"] = {"path": str(rejects_path) if rejects.count else None, "count": rejects.count,
                              "by_reason": dict(rejects.by_reason)}
        summary["http"] = {"dataverse": dataverse.http.stats.as_dict() if "http" in dataverse.__dict__ else {},
                           "adobe_campaign": campaign.http.stats.as_dict() if "http" in campaign.__dict__ else {}}
        self.log.info("%s", _table(summary))
        return summary

    # -- the export workflow (source="log_files") -------------------------------------------------------------------
    def _run_workflow(self, campaign: AdobeCampaignHook) -> dict[str, Any]:
        """Run the export workflow once and wait until Campaign says it finished (its files are then in storage).

        A workflow with an External signal activity (or ``workflow_signal=True``) is started when it is not running,
        then signalled; one without is started (if it is already running, e.g. from its own scheduler, the task
        waits for that execution). Paused, erroneous or still running after ``workflow_timeout``: the task fails and
        no file is read (the cursor stays: the next try reads whatever the workflow wrote by then).
        """
        from airflow.sdk.exceptions import AirflowException

        wid = str(self.workflow_id).strip()
        started = time.monotonic()
        wf = campaign.workflow(wid)
        if wf is None:
            raise AirflowException(f"Adobe Campaign has no workflow '{wid}' (workflow_id is the ID Campaign shows for "
                                   "the export workflow, e.g. WKF12; an ID changed in Campaign breaks the call).")
        signals = campaign.signal_activities(wf)
        use_signal = bool(signals) if self.workflow_signal is None else as_bool(self.workflow_signal)
        state = wf.get("state")
        self.log.info("Export workflow %s (%s) is %s; %s", wid, wf.get("label") or "", state or "of unknown state",
                      "triggering its External signal activity" if use_signal else "starting it")
        if state is None:
            raise AirflowException(f"Campaign's answer for workflow '{wid}' has no state: cannot tell when it ends.")
        if state in ("paused", "error"):
            raise AirflowException(f"The export workflow '{wid}' is {state} in Campaign: resume (or restart) it "
                                   "there, then run the task again.")
        # commands are asynchronous in Campaign: the state read just after one may still be the last execution's, so
        # "finished" counts once this execution was seen running (or its end date moved on)
        before_end = wf.get("lastEnd")
        if use_signal:
            if state != "started":
                campaign.start_workflow(wid)
                state = self._wait_workflow(campaign, wid, started, until_started=True)
                if state != "started":
                    raise AirflowException(f"The export workflow '{wid}' is {state} after the start command: see its "
                                           "log in Campaign; no file is read.")
            try:
                answer = campaign.signal_workflow(wid, self.workflow_parameters or None,
                                                  source=f"Airflow {self.dag_id}.{self.task_id}")
            except SignalRefused as exc:
                # e.g. the retry of a task that signalled minutes ago: the files that execution wrote are there
                self.log.warning("Workflow %s did not take the signal (%s): reading the files already exported", wid,
                                 exc.message)
                return {"id": wid, "signal": "refused", "state": state,
                        "waited_s": round(time.monotonic() - started, 1)}
            self.log.info("Signal sent to workflow %s (%s)", wid, ", ".join(sorted(answer)) or "no answer body")
        elif state == "started":
            self.log.info("Workflow %s is already running: waiting for that execution to finish", wid)
        else:
            campaign.start_workflow(wid)
        final = self._wait_workflow(campaign, wid, started, before_end=before_end,
                                    seen_started=use_signal or state == "started")
        if final != "finished":
            raise AirflowException(f"The export workflow '{wid}' ended '{final}' (not finished): see its log in "
                                   "Campaign; no file is read.")
        waited = round(time.monotonic() - started, 1)
        self.log.info("Export workflow %s finished after %ss", wid, waited)
        return {"id": wid, "signal": use_signal, "state": final, "waited_s": waited}

    def _wait_workflow(self, campaign: AdobeCampaignHook, wid: str, started: float, *, before_end: Any = None,
                       seen_started: bool = False, until_started: bool = False) -> str | None:
        """Read the workflow's state until it runs (``until_started``) or until this execution ended (finished,
        or paused / erroneous); fail after ``workflow_timeout``."""
        from airflow.sdk.exceptions import AirflowException

        while True:
            wf = campaign.workflow(wid) or {}
            state = wf.get("state")
            if state == "started":
                if until_started:
                    return state
                seen_started = True
            elif state in ("paused", "error"):
                return state
            elif not until_started and (seen_started or (wf.get("lastEnd") and wf.get("lastEnd") != before_end)):
                return state
            if time.monotonic() - started > float(self.workflow_timeout):
                raise AirflowException(
                    f"The export workflow '{wid}' did not {'start' if until_started else 'finish'} within "
                    f"{self.workflow_timeout}s (state {state!r}); no file is read. A workflow waiting on a Scheduler "
                    "activity never finishes when started: give it an External signal activity, or leave workflow_id "
                    "out and schedule the DAG after its execution.")
            time.sleep(max(0.05, float(self.workflow_poll_interval)))


def _table(summary: dict) -> str:
    head = ("type", "created", "already there", "rejected")
    rows = [(t, c["created"], c["updated"], c["rejected"]) for t, c in summary["by_type"].items()]
    t = summary["totals"]
    rows.append(("TOTAL", t["created"], t["updated"], t["rejected"]))
    widths = [max(len(str(h)), *(len(f"{r[i]:,}" if isinstance(r[i], int) else str(r[i])) for r in rows))
              for i, h in enumerate(head)]
    lines = [" | ".join(str(h).ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    for r in rows:
        lines.append(" | ".join((str(v).ljust(w) if i == 0 else f"{v:,}".rjust(w))
                                for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    lines.append(f"events read {summary['events_read']:,}; type disabled {t['type_disabled']:,}; "
                 f"cursor {'moved' if summary['cursor'] else 'none yet'}; {summary['duration_s']}s")
    return "\n".join(lines)
