"""What every segment-export operator shares: sources, mapping, the engine run, the summary.

A destination operator adds its own parameters and builds its hook and destination adapter; it
contains no vendor protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from airflow_provider_segexport.export.engine import Destination, ExportEngine, ExportOptions, apply_outcomes
from airflow_provider_segexport.export.records import FieldMapping
from airflow_provider_segexport.export.report import default_rejects_path
from airflow_provider_segexport.export.sources import Segment, segments_from_spec
from airflow_provider_segexport.export.state import (
    ExportStateBackend,
    RefusalStore,
    open_export_state,
    open_refusal_store,
)
from airflow_provider_segexport.hooks.base import as_bool


class BaseSegmentExportOperator(BaseOperator):
    """Export one or more segments to a destination.

    :param segments: segment names (using ``sql`` or ``path``, where ``{segment}`` stands for the name)
        or dicts ``{"name": ..., "sql": ..., "conn_id": ...}`` / ``{"name": ..., "path": ...}``.
    :param sql: query returning a segment's members (one row per member); ``{segment}`` is replaced by
        the quoted segment name. Templated.
    :param sql_conn_id: Airflow connection of a SQL database (any common.sql DbApiHook).
    :param path: file source (CSV, JSON Lines, Parquet) on any ObjectStoragePath; ``{segment}`` allowed.
    :param key_column: source column identifying a member (shown in rejects). Default ``customer_id``.
    :param dry_run: do everything but send (validation, counts, rejects file).
    :param rejects_path: where the rejects JSON Lines file goes (default under ``$AIRFLOW_HOME``).
    :param state_dir: directory for state kept between runs (default ``$AIRFLOW_HOME/segexport/state``).
    :param state_conn_id: an Airflow SQL connection (e.g. PostgreSQL) holding the export state table;
        default: a SQLite file in state_dir. Use it when tasks may run on any of several workers.
        Templated.
    :param max_rejects_share: fail the task when more than this share of rows is rejected (e.g. 0.05).
    :param progress_interval: seconds between progress lines in the log.
    :param delta: keep export state and send only new and changed members (default True). With
        ``delta=False`` every member is sent; mirror mode still keeps the export state (the members who left
        are found there, and the circuit breakers compare with it).
    :param change_column: a source column that changes whenever a row's exported values change or the row
        joins the segment (e.g. ``updated_at``). With it, a delta run reads only the rows whose value is at
        least the highest one the last complete export read (the condition is pushed into the SQL query:
        index the column); the other rows count as skipped (unchanged) without being read. Every row is
        read in mirror mode, with ``full_refresh``, before a complete export recorded a watermark and after
        a change of the settings that shape the payloads. Rows the destination refused are tried again
        when they change. Templated.
    :param full_refresh: ignore the export state and send every member (a retried task still resumes).
    :param max_removal_share: mirror mode stops before removing more than this share of the members
        exported before (default 0.2), unless ``allow_large_changes``.
    :param max_size_change: stop before sending when a segment grew or shrank by more than this factor
        since the last export (default 2.0), unless ``allow_large_changes``.
    :param allow_large_changes: let a run through the two circuit breakers above (a DAG param).
    :param apply_plan: path of a plan written by an earlier dry run: send and remove exactly what it
        lists, nothing more. A dry run (with ``delta``) always writes its plan next to the rejects file.
    """

    template_fields: Sequence[str] = ("segments", "sql", "path", "rejects_path", "dry_run", "state_dir",
                                      "state_conn_id", "full_refresh", "allow_large_changes", "apply_plan",
                                      "change_column")
    template_fields_renderers = {"sql": "sql"}
    #: templated fields that are always text, even in a DAG with ``render_template_as_native_obj``
    #: (which would turn an all-digit ID such as "0000000000" into the number 0)
    text_template_fields: Sequence[str] = ("sql", "path", "rejects_path", "state_dir", "state_conn_id", "apply_plan",
                                           "change_column")
    ui_color = "#e8f4fd"

    def render_template_fields(self, context, jinja_env=None) -> None:
        raw = {f: getattr(self, f) for f in self.text_template_fields if isinstance(getattr(self, f, None), str)}
        super().render_template_fields(context, jinja_env)
        wrong = {f: t for f, t in raw.items()
                 if isinstance(getattr(self, f), (int, float)) and not isinstance(getattr(self, f), bool)}
        if wrong:  # rendered natively into a number: render those again as text
            text_env = self.dag.get_template_env(force_sandboxed=True)
            for f, template in wrong.items():
                setattr(self, f, text_env.from_string(template).render(context))

    def __init__(
        self,
        *,
        segments: Any,
        sql: str | None = None,
        sql_conn_id: str | None = None,
        path: str | None = None,
        file_format: str | None = None,
        key_column: str = "customer_id",
        dry_run: bool | str = False,
        rejects_path: str | None = None,
        state_dir: str | None = None,
        state_conn_id: str | None = None,
        max_rejects_share: float | None = None,
        progress_interval: float = 10.0,
        chunk_size: int = 5000,
        delta: bool = True,
        change_column: str | None = None,
        full_refresh: bool | str = False,
        max_removal_share: float = 0.2,
        max_size_change: float = 2.0,
        allow_large_changes: bool | str = False,
        apply_plan: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.apply_plan = apply_plan
        self.delta = delta
        self.change_column = change_column
        self.full_refresh = full_refresh
        self.max_removal_share = max_removal_share
        self.max_size_change = max_size_change
        self.allow_large_changes = allow_large_changes
        self.segments = segments
        self.sql = sql
        self.sql_conn_id = sql_conn_id
        self.path = path
        self.file_format = file_format
        self.key_column = key_column
        self.dry_run = dry_run
        self.rejects_path = rejects_path
        self.state_dir = state_dir
        self.state_conn_id = state_conn_id
        self.max_rejects_share = max_rejects_share
        self.progress_interval = progress_interval
        self.chunk_size = chunk_size
        self._destination: Destination | None = None

    #: the vendor's name in export-state scopes, e.g. ``mailchimp``
    vendor = ""

    # -- to implement per destination ---------------------------------------------------------
    def get_hook(self):
        """The destination's hook (from its connection id parameter)."""
        raise NotImplementedError

    def field_mapping(self) -> FieldMapping:
        """The mapping of destination fields to source columns, from the operator's parameters."""
        raise NotImplementedError

    def build_destination(self, hook, mapping: FieldMapping, context) -> Destination:
        """The destination adapter.

        :param hook: what :meth:`get_hook` returned.
        :param mapping: what :meth:`field_mapping` returned.
        :param context: the task's context.
        """
        raise NotImplementedError

    def destination_conn_id(self) -> str:
        """The destination connection's id (part of the export state's scope)."""
        raise NotImplementedError

    def destination_target(self) -> str:
        """The vendor object exported to, e.g. an audience ID (part of the export state's scope)."""
        raise NotImplementedError

    def before_export(self, destination: Destination, context) -> None:
        """Called before the engine runs (e.g. to push an extra link's URL).

        :param destination: the destination adapter.
        :param context: the task's context.
        """

    def after_export(self, destination: Destination, summary: dict, context) -> dict:
        """Called after the engine ran (e.g. to defer until the destination has processed the work).

        :param destination: the destination adapter.
        :param summary: the engine's summary.
        :param context: the task's context.
        """
        return summary

    # -- shared ---------------------------------------------------------------------------------
    def build_segments(self) -> list[Segment]:
        """The segments from ``segments`` (names, dicts, a JSON list or comma-separated names) and the source
        parameters."""
        segs = self.segments
        if isinstance(segs, str) and segs.strip().startswith("["):
            import json

            segs = json.loads(segs)
        if isinstance(segs, str) and "," in segs:
            segs = [s.strip() for s in segs.split(",") if s.strip()]
        return segments_from_spec(segs, sql=self.sql, sql_conn_id=self.sql_conn_id, path=self.path,
                                  file_format=self.file_format, chunk_size=self.chunk_size)

    def is_dry_run(self) -> bool:
        """Whether ``dry_run`` (possibly a rendered template) is true."""
        return as_bool(self.dry_run)

    def state_scope(self) -> str:
        """The export state's scope: vendor, destination connection and target (``<vendor>:<conn>:<target>``;
        the state keeps each segment under it)."""
        return f"{self.vendor}:{self.destination_conn_id()}:{self.destination_target()}"

    def open_refusals(self, suffix: str = "") -> RefusalStore:
        """The store of members the destination refused for good, where the export state is (``state_conn_id``,
        shared by every worker, else ``state_dir``).

        :param suffix: another store of the same destination (e.g. ``:removed``).
        """
        return open_refusal_store(self.state_scope() + suffix, state_dir=self.state_dir,
                                  state_conn_id=self.state_conn_id or None)

    def open_state(self, destination: Destination) -> ExportStateBackend | None:
        """The export state, when kept: with ``delta``, and always in mirror mode.

        :param destination: the destination adapter (its ``mirror`` capability).
        """
        if not (self.delta or destination.mirror):
            return None
        return open_export_state(self.state_scope(), state_dir=self.state_dir, state_conn_id=self.state_conn_id)

    def export_options(self, context) -> ExportOptions:
        """The engine's options from the operator's parameters.

        :param context: the task's context.
        """
        from airflow.sdk import ObjectStoragePath

        dry_run = self.is_dry_run()
        return ExportOptions(
            dry_run=dry_run, run_id=str(context.get("run_id") or "manual"),
            full_refresh=as_bool(self.full_refresh) or not self.delta, max_rejects_share=self.max_rejects_share,
            max_removal_share=self.max_removal_share, max_size_change=self.max_size_change,
            allow_large_changes=as_bool(self.allow_large_changes),
            change_column=(self.change_column or None) if self.delta else None,
            plan_out=self.plan_path(context) if dry_run and self.delta else None,
            plan_in=ObjectStoragePath(str(self.apply_plan)) if self.apply_plan else None,
            progress_interval=self.progress_interval)

    def resolve_rejects_path(self, context):
        """Where the rejects file goes: ``rejects_path``, else under ``$AIRFLOW_HOME``.

        :param context: the task's context.
        """
        from airflow.sdk import ObjectStoragePath

        if self.rejects_path:
            return ObjectStoragePath(str(self.rejects_path))
        ti = context.get("ti")
        return default_rejects_path(self.dag_id, context.get("run_id"), self.task_id,
                                    getattr(ti, "try_number", None))

    def plan_path(self, context):
        """Where a dry run's plan goes: beside the rejects file.

        :param context: the task's context.
        """
        rejects = self.resolve_rejects_path(context)
        return rejects.parent / rejects.name.replace(".jsonl", "-plan.jsonl")

    def execute(self, context) -> dict:
        """Run the export; return its summary (XCom).

        :param context: the task's context.
        """
        hook = self.get_hook()
        dag_id = getattr(context.get("dag"), "dag_id", None) or self.dag_id
        hook.check_export_allowed(dag_id)
        mapping = self.field_mapping()
        segments = self.build_segments()
        destination = self._destination = self.build_destination(hook, mapping, context)
        self.before_export(destination, context)
        state = None
        try:
            state = self.open_state(destination)
            engine = ExportEngine(destination, segments, rejects_path=self.resolve_rejects_path(context), state=state,
                                  options=self.export_options(context), logger=self.log)
            summary = engine.run()
            summary = self.after_export(destination, summary, context)
        finally:
            destination.close()
            hook.close()
            if state is not None:
                state.close()  # the SQL backend's connection pool, or the SQLite file
        return summary

    def apply_deferred(self, context, destination: Destination, summary: dict, results: Any, rejects_path: str) -> dict:
        """Deferrable mode, once the vendor processed the work: the destination's outcomes applied to the export
        state, the rejects file and the summary (:func:`~airflow_provider_segexport.export.engine.apply_outcomes`);
        the final summary returned.

        :param context: the task's context.
        :param destination: the destination adapter (it reads the outcomes: ``deferred_outcomes``).
        :param summary: the summary the export returned before deferring.
        :param results: what the destination reads its outcomes from (e.g. the trigger event's batches).
        :param rejects_path: the export's rejects file.
        """
        from airflow.sdk import ObjectStoragePath

        state = self.open_state(destination)
        try:
            summary = apply_outcomes(summary, destination.deferred_outcomes(results), destination=destination,
                                     state=state, rejects_path=ObjectStoragePath(rejects_path),
                                     run_id=str(context.get("run_id") or "manual"), logger=self.log)
        finally:
            destination.close()
            if state is not None:
                state.close()
        return summary

    def on_kill(self) -> None:
        """Release the destination's threads and connections."""
        if self._destination is not None:
            self._destination.close()
