"""What every segment-export operator shares: sources, mapping, the engine run, the summary.

A destination operator adds its own parameters and builds its hook and destination adapter; it
contains no vendor protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from airflow_provider_segexport.export.engine import Destination, ExportEngine
from airflow_provider_segexport.export.records import FieldMapping
from airflow_provider_segexport.export.report import default_rejects_path
from airflow_provider_segexport.export.sources import Segment, segments_from_spec


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
    :param delta: keep export state and send only new and changed members (default True).
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

    # -- to implement per destination ---------------------------------------------------------
    def get_hook(self):
        raise NotImplementedError

    def field_mapping(self) -> FieldMapping:
        raise NotImplementedError

    def build_destination(self, hook, mapping: FieldMapping, context) -> Destination:
        raise NotImplementedError

    def before_export(self, destination: Destination, context) -> None:
        """Called before the engine runs (e.g. to push an extra link's URL)."""

    def after_export(self, destination: Destination, summary: dict, context) -> dict:
        """Called after the engine ran (e.g. to defer until the destination has processed the work)."""
        return summary

    # -- shared ---------------------------------------------------------------------------------
    def build_segments(self) -> list[Segment]:
        segs = self.segments
        if isinstance(segs, str) and segs.strip().startswith("["):
            import json

            segs = json.loads(segs)
        if isinstance(segs, str) and "," in segs:
            segs = [s.strip() for s in segs.split(",") if s.strip()]
        return segments_from_spec(segs, sql=self.sql, sql_conn_id=self.sql_conn_id, path=self.path,
                                  file_format=self.file_format, chunk_size=self.chunk_size)

    def is_dry_run(self) -> bool:
        return _flag(self.dry_run)

    def state_scope(self) -> str:
        """Export state key: destination connection + target (a segment is added per segment)."""
        raise NotImplementedError

    def open_state(self):
        from airflow_provider_segexport.export.state import open_export_state

        if not self.delta:
            return None
        return open_export_state(self.state_scope(), state_dir=self.state_dir, state_conn_id=self.state_conn_id)

    def resolve_rejects_path(self, context):
        from airflow.sdk import ObjectStoragePath

        if self.rejects_path:
            return ObjectStoragePath(str(self.rejects_path))
        ti = context.get("ti")
        return default_rejects_path(self.dag_id, context.get("run_id"), self.task_id,
                                    getattr(ti, "try_number", None))

    def plan_path(self, context):
        rejects = self.resolve_rejects_path(context)
        return rejects.parent / rejects.name.replace(".jsonl", "-plan.jsonl")

    def execute(self, context) -> dict:
        from airflow.sdk import ObjectStoragePath

        hook = self.get_hook()
        dag_id = getattr(context.get("dag"), "dag_id", None) or self.dag_id
        hook.check_export_allowed(dag_id)
        mapping = self.field_mapping()
        segments = self.build_segments()
        destination = self._destination = self.build_destination(hook, mapping, context)
        self.before_export(destination, context)
        state = None
        try:
            state = self.open_state()
            engine = ExportEngine(
                destination, segments, rejects_path=self.resolve_rejects_path(context),
                dry_run=self.is_dry_run(), logger=self.log, progress_interval=self.progress_interval,
                max_rejects_share=self.max_rejects_share, state=state,
                run_id=str(context.get("run_id") or "manual"), full_refresh=_flag(self.full_refresh),
                max_removal_share=self.max_removal_share, max_size_change=self.max_size_change,
                allow_large_changes=_flag(self.allow_large_changes),
                plan_out=self.plan_path(context) if self.delta and self.is_dry_run() else None,
                plan_in=ObjectStoragePath(str(self.apply_plan)) if self.apply_plan else None,
                change_column=self.change_column if self.delta else None,
            )
            summary = engine.run()
            summary = self.after_export(destination, summary, context)
        finally:
            destination.close()
            hook.close()
            if state is not None:
                state.close()  # the SQL backend's connection pool, or the SQLite file
        return summary

    def _advance_watermarks(self, state, summary: dict, incomplete: set[str], run_id: str) -> None:
        """Deferrable mode, once the destination processed the work: the change-column watermarks the export
        left pending are advanced for the segments whose every operation was processed (for the others the
        next run reads the same rows again and sends what is still due)."""
        from airflow_provider_segexport.export.state import Watermark

        for seg, info in (summary.get("change_column") or {}).items():
            pending = info.pop("pending", None)
            if pending is None:
                continue
            if seg in incomplete:
                self.log.warning("Segment '%s': some operations failed; the change-column watermark stays where it "
                                 "was, so the next run reads those rows again.", seg)
                continue
            state.set_watermark(int(pending["scope_id"]), Watermark.from_dict(pending), run_id)
            info["advanced_to"] = info.get("high")

    def on_kill(self) -> None:
        if self._destination is not None:
            self._destination.close()


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")
