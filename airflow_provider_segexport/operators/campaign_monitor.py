"""Export segments to a Campaign Monitor list."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow_provider_segexport.destinations.campaign_monitor import (
    CampaignMonitorDestination,
    campaign_monitor_mapping,
)
from airflow_provider_segexport.export.records import FieldMapping
from airflow_provider_segexport.hooks.base import as_bool
from airflow_provider_segexport.hooks.campaign_monitor import CampaignMonitorHook
from airflow_provider_segexport.links import CAMPAIGN_MONITOR_LIST_URL_KEY, CampaignMonitorListLink
from airflow_provider_segexport.operators.base import BaseSegmentExportOperator


class CampaignMonitorSegmentExportOperator(BaseSegmentExportOperator):
    """Add or update the members of one or more segments in a Campaign Monitor list.

    Imports never resubscribe: an unsubscribed, bounced, deleted or suppressed address stays as it is and is a
    reject carrying Campaign Monitor's code. Each subscriber's segments of this export are listed in a
    MultiSelectMany custom field (``segment_field``); ``mode="mirror"`` takes a segment off the subscribers who
    left it, and with ``remove_leavers=True`` removes (state Deleted, never unsubscribed) a subscriber the export
    sent who is now in none of its segments.

    :param list_id: the Campaign Monitor list's API ID. Templated.
    :param email_field: source column with the email address (required).
    :param name_field: source column with the subscriber's name; or ``first_name_field`` + ``last_name_field``
        (joined with a space).
    :param first_name_field: source column with the first name.
    :param last_name_field: source column with the last name.
    :param custom_fields: ``{"Custom field name": "source_column"}``; values are converted to each field's type
        (Text, Number, Date as YYYY/MM/DD, MultiSelectOne/Many among the field's options); a value that does not
        fit is a reject.
    :param consent_to_track: ``Yes``, ``No`` or ``Unchanged`` (default) for every subscriber: Campaign Monitor
        requires it on every subscriber. ``Unchanged`` never changes an existing subscriber's choice.
    :param consent_to_track_field: a source column holding Yes/No/Unchanged (or a boolean) per row; empty values
        take ``consent_to_track``.
    :param segment_field: the MultiSelectMany custom field listing the subscriber's segments (created when
        missing, options added as segments appear); None for no membership field. The export owns this field's
        values: give each export task to the same list its own field.
    :param mode: ``upsert`` (default) or ``mirror``.
    :param remove_leavers: mirror mode: remove from the list a subscriber this export sent who is in none of its
        segments now (Deleted, not unsubscribed; added back if they join a segment again).
    :param create_missing_custom_fields: create mapped custom fields the list lacks (as Text).
    :param queue_autoresponders: let new subscribers start the list's subscription-based autoresponders.
    :param campaign_monitor_conn_id: the ``campaign_monitor`` connection. Default ``campaign_monitor_default``.
    :param max_in_flight: import calls in flight (default 4, at most 10).
    """

    template_fields: Sequence[str] = (*BaseSegmentExportOperator.template_fields, "list_id", "mode", "custom_fields",
                                      "consent_to_track", "remove_leavers")
    text_template_fields: Sequence[str] = (*BaseSegmentExportOperator.text_template_fields, "list_id", "mode",
                                           "consent_to_track")
    operator_extra_links = (CampaignMonitorListLink(),)

    def __init__(
        self,
        *,
        list_id: str,
        email_field: str = "email",
        name_field: str | None = None,
        first_name_field: str | None = None,
        last_name_field: str | None = None,
        custom_fields: dict[str, str] | None = None,
        consent_to_track: str = "Unchanged",
        consent_to_track_field: str | None = None,
        segment_field: str | None = "Segments",
        mode: str = "upsert",
        remove_leavers: bool | str = False,
        create_missing_custom_fields: bool = False,
        queue_autoresponders: bool = False,
        campaign_monitor_conn_id: str = CampaignMonitorHook.default_conn_name,
        max_in_flight: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.list_id = list_id
        self.email_field = email_field
        self.name_field = name_field
        self.first_name_field = first_name_field
        self.last_name_field = last_name_field
        self.custom_fields = custom_fields
        self.consent_to_track = consent_to_track
        self.consent_to_track_field = consent_to_track_field
        self.segment_field = segment_field
        self.mode = mode
        self.remove_leavers = remove_leavers
        self.create_missing_custom_fields = create_missing_custom_fields
        self.queue_autoresponders = queue_autoresponders
        self.campaign_monitor_conn_id = campaign_monitor_conn_id
        self.max_in_flight = max_in_flight

    vendor = "campaign_monitor"

    def destination_conn_id(self) -> str:
        """The Campaign Monitor connection's id."""
        return self.campaign_monitor_conn_id

    def destination_target(self) -> str:
        """The list ID."""
        return str(self.list_id)

    def get_hook(self) -> CampaignMonitorHook:
        """The Campaign Monitor hook, its pool sized to ``max_in_flight``."""
        return CampaignMonitorHook(self.campaign_monitor_conn_id, concurrency=self.max_in_flight)

    def field_mapping(self) -> FieldMapping:
        """Email, name, custom fields and the consent column."""
        return campaign_monitor_mapping(
            email_field=self.email_field, key_column=self.key_column, name_field=self.name_field,
            first_name_field=self.first_name_field, last_name_field=self.last_name_field,
            custom_fields=dict(self.custom_fields or {}), consent_to_track_field=self.consent_to_track_field)

    def build_destination(self, hook: CampaignMonitorHook, mapping: FieldMapping, context) -> CampaignMonitorDestination:
        """The destination adapter for the list.

        :param hook: the Campaign Monitor hook.
        :param mapping: the field mapping.
        :param context: the task's context.
        """
        return CampaignMonitorDestination(
            hook, str(self.list_id), mapping, custom_fields=dict(self.custom_fields or {}),
            consent_to_track=self.consent_to_track, segment_field=self.segment_field, mode=self.mode,
            remove_leavers=as_bool(self.remove_leavers), create_missing_custom_fields=self.create_missing_custom_fields,
            queue_autoresponders=self.queue_autoresponders, max_in_flight=self.max_in_flight,
            removed=self.open_refusals(":removed"))

    def before_export(self, destination: CampaignMonitorDestination, context) -> None:
        """Push the list's URL for the "Campaign Monitor list" button first (it works even if the export fails).

        :param destination: the destination adapter.
        :param context: the task's context.
        """
        context["ti"].xcom_push(key=CAMPAIGN_MONITOR_LIST_URL_KEY,
                                value=destination.hook.list_url(str(self.list_id)))
