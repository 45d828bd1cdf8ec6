"""Sync a Dynamics 365 table (contacts or a custom entity) to Adobe Campaign Standard."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow_provider_segexport.export.records import FieldMapping
from airflow_provider_segexport.export.sources import Segment
from airflow_provider_segexport.hooks.adobe_campaign import AdobeCampaignHook
from airflow_provider_segexport.hooks.base import as_bool
from airflow_provider_segexport.hooks.dynamics365 import Dynamics365Hook
from airflow_provider_segexport.operators.base import BaseSegmentExportOperator
from airflow_provider_segexport.sync.campaign import CampaignSyncDestination, sync_mapping
from airflow_provider_segexport.sync.dataverse import DataverseSource
from airflow_provider_segexport.sync.tables import MODIFIED, TableSync

#: the segment exports' source parameters, which a sync (reading Dataverse) refuses rather than ignores
_SOURCE_ONLY = ("sql", "sql_conn_id", "path", "file_format", "chunk_size", "key_column")


class DynamicsToCampaignSyncOperator(BaseSegmentExportOperator):
    """Sync one Dynamics 365 table to Adobe Campaign Standard: contacts to profiles, or a custom entity to a custom
    resource linked to the profile. Dynamics 365 is the source of truth for the synced attributes.

    Each run reads the rows changed since the last complete run (``modifiedon``, a watermark in the export
    state), sends only records whose mapped values changed (the export state's fingerprints), finds each one in
    Campaign by its key field, and creates or updates it; deactivated records (and, with ``detect_deletions``,
    deleted ones) are handled as the table's ``on_delete`` says. Rejects, summary (XCom), progress lines, resume
    and plan/apply are the export engine's.

    :param table: the table's sync configuration (a dict; see :class:`~airflow_provider_segexport.sync.tables.TableSync`).
        Templated.
    :param replay: a full resync of the table: every row read and every record sent once, the watermark reset.
    :param detect_deletions: read every row (not only the changed ones) and treat records gone from Dynamics 365,
        or no longer passing the table's filter, as deleted (run it e.g. nightly; the removal circuit breaker
        applies).
    :param dynamics365_conn_id: the ``dynamics365`` connection (read access is enough).
    :param adobe_campaign_conn_id: the ``adobe_campaign`` connection.
    :param max_in_flight: batches of records in flight (default 8).
    :param enabled: False skips the task (a DAG's form choosing tables). Templated.
    :param kwargs: the export engine's parameters (``dry_run``, ``rejects_path``, ``state_dir``, ``state_conn_id``,
        ``max_rejects_share``, ``progress_interval``, ``max_removal_share``, ``allow_large_changes``,
        ``apply_plan``) and ``BaseOperator``'s; a segment source's (``sql``, ``path``...) is refused.
    """

    # the rows come from the table's Dataverse entity set: the segment sources' parameters do not apply
    template_fields: Sequence[str] = (*(f for f in BaseSegmentExportOperator.template_fields if f not in _SOURCE_ONLY),
                                      "table", "replay", "detect_deletions", "enabled")
    template_fields_renderers: dict[str, str] = {}
    text_template_fields: Sequence[str] = tuple(f for f in BaseSegmentExportOperator.text_template_fields
                                                if f not in _SOURCE_ONLY)
    vendor = "dynamics365-campaign"

    def __init__(
        self,
        *,
        table: dict[str, Any],
        replay: bool | str = False,
        detect_deletions: bool | str = False,
        dynamics365_conn_id: str = Dynamics365Hook.default_conn_name,
        adobe_campaign_conn_id: str = AdobeCampaignHook.default_conn_name,
        max_in_flight: int | None = None,
        enabled: bool | str = True,
        **kwargs: Any,
    ) -> None:
        given = sorted(k for k in _SOURCE_ONLY if k in kwargs)
        if given:
            raise TypeError(f"DynamicsToCampaignSyncOperator reads its rows from the table's Dataverse entity set "
                            f"(table['entity_set'], table['filter']): {', '.join(given)} do(es) not apply.")
        kwargs.setdefault("segments", [table.get("name", "table") if isinstance(table, dict) else "table"])
        kwargs.setdefault("change_column", MODIFIED)
        kwargs.setdefault("max_size_change", 0)  # a table is not a segment: its size is what it is
        super().__init__(**kwargs)
        self.table = table
        self.replay = replay
        self.detect_deletions = detect_deletions
        self.dynamics365_conn_id = dynamics365_conn_id
        self.adobe_campaign_conn_id = adobe_campaign_conn_id
        self.max_in_flight = max_in_flight
        self.enabled = enabled
        self._source_hook: Dynamics365Hook | None = None

    @property
    def sync(self) -> TableSync:
        """The table's configuration, checked."""
        return TableSync.from_dict(dict(self.table))

    def destination_conn_id(self) -> str:
        """Both connections (the export state's scope)."""
        return f"{self.dynamics365_conn_id}>{self.adobe_campaign_conn_id}"

    def destination_target(self) -> str:
        """The Campaign resource synced to."""
        return self.sync.target

    def get_hook(self) -> AdobeCampaignHook:
        """The Adobe Campaign hook (the records go there)."""
        return AdobeCampaignHook(self.adobe_campaign_conn_id, concurrency=self.max_in_flight or 8)

    def field_mapping(self) -> FieldMapping:
        """Each read column under its own name, the table's key as the row key."""
        return sync_mapping(self.sync)

    def build_segments(self) -> list[Segment]:
        """One segment: the table, read from Dataverse."""
        t = self.sync
        self._source_hook = Dynamics365Hook(self.dynamics365_conn_id)
        return [Segment(t.name, DataverseSource(self._source_hook, t.entity_set, t.columns, t.filter))]

    def build_destination(self, hook: AdobeCampaignHook, mapping: FieldMapping, context) -> CampaignSyncDestination:
        """The Campaign destination of the table.

        :param hook: the Adobe Campaign hook.
        :param mapping: the field mapping.
        :param context: the task's context.
        """
        return CampaignSyncDestination(hook, self.sync, mapping, detect_deletions=as_bool(self.detect_deletions),
                                       max_in_flight=self.max_in_flight)

    def export_options(self, context):
        """The engine's options; ``replay`` is a full refresh (every row read and sent, the watermark reset).

        :param context: the task's context.
        """
        import dataclasses

        options = super().export_options(context)
        return dataclasses.replace(options, full_refresh=True) if as_bool(self.replay) else options

    def after_export(self, destination: CampaignSyncDestination, summary: dict, context) -> dict:
        """Add the sync's counters to the summary and say what was overwritten, retired or left.

        :param destination: the destination adapter.
        :param summary: the engine's summary.
        :param context: the task's context.
        """
        summary["sync"] = dict(destination.counters)
        c = destination.counters
        if c["fields_overwritten"]:
            self.log.info("%d field value(s) held differently in Campaign were set to Dynamics 365's (the source of "
                          "truth for synced attributes)", c["fields_overwritten"])
        if c["deactivated"] or c["deleted_in_source"]:
            self.log.info("Deactivated in Dynamics 365: %d; gone from it: %d; on_delete=%s (left as they are: %d)",
                          c["deactivated"], c["deleted_in_source"], destination.table.on_delete, c["ignored"])
        return summary

    def execute(self, context) -> dict:
        """Run the sync; return its summary (XCom).

        :param context: the task's context.
        """
        if not as_bool(self.enabled):
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException(f"Table '{self.sync.name}' was not chosen for this run.")
        try:
            return super().execute(context)
        finally:
            if self._source_hook is not None:
                self._source_hook.close()
