"""Export segments to Dynamics 365 Sales marketing lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow_provider_segexport.destinations.dynamics_sales import (
    DynamicsSalesDestination,
    dynamics_sales_mapping,
)
from airflow_provider_segexport.export.records import FieldMapping
from airflow_provider_segexport.hooks.dynamics365 import Dynamics365Hook
from airflow_provider_segexport.links import DYNAMICS_LIST_URL_KEY, DynamicsMarketingListLink
from airflow_provider_segexport.operators.base import BaseSegmentExportOperator


class DynamicsSalesSegmentExportOperator(BaseSegmentExportOperator):
    """Add the members of one or more segments to Dynamics 365 Sales static marketing lists of contacts, one list
    per segment.

    Contacts must already exist and are never created or changed: each row's contact is checked in bulk, and an
    unknown contact is a reject ``contact_not_found``, an inactive one ``contact_inactive``, a malformed ID
    ``invalid_value``. A segment of more than 100,000 members is refused before anything is sent.

    :param contact_id_field: source column holding the Dataverse contact ID (``contactid``).
    :param match_on: instead of ``contact_id_field``: a contact attribute or alternate key (e.g. ``emailaddress1``
        or a customer number column) whose value is in ``match_field``; contacts are looked up in bulk.
    :param match_field: the source column matched against ``match_on``.
    :param list_name: the marketing list's name; ``{segment}`` stands for the segment's name (default: the
        segment's name). The list is the one the export state remembers, else the one with this name, else a new
        static list of contacts. Templated.
    :param mode: ``upsert`` (default) or ``mirror``: also take off the list the members who left the segment and
        that an export added (members added by hand stay).
    :param dynamics365_conn_id: the ``dynamics365`` connection. Default ``dynamics365_default``.
    :param max_in_flight: calls in flight (default 4, at most 52, Dataverse's concurrency limit per user).
    """

    template_fields: Sequence[str] = (*BaseSegmentExportOperator.template_fields, "list_name", "mode")
    text_template_fields: Sequence[str] = (*BaseSegmentExportOperator.text_template_fields, "list_name", "mode")
    operator_extra_links = (DynamicsMarketingListLink(),)
    vendor = "dynamics365"

    def __init__(
        self,
        *,
        contact_id_field: str | None = None,
        match_on: str | None = None,
        match_field: str | None = None,
        list_name: str = "{segment}",
        mode: str = "upsert",
        dynamics365_conn_id: str = Dynamics365Hook.default_conn_name,
        max_in_flight: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if bool(contact_id_field) == bool(match_on):
            raise ValueError("Give contact_id_field (a column of Dataverse contact IDs) or match_on (a contact "
                             "attribute) with match_field (the column matched against it).")
        if match_on and not match_field:
            raise ValueError("match_on needs match_field: the source column whose values are looked up in it.")
        self.contact_id_field = contact_id_field
        self.match_on = match_on
        self.match_field = match_field
        self.list_name = list_name
        self.mode = mode
        self.dynamics365_conn_id = dynamics365_conn_id
        self.max_in_flight = max_in_flight

    def destination_conn_id(self) -> str:
        """The Dynamics 365 connection's id."""
        return self.dynamics365_conn_id

    def destination_target(self) -> str:
        """The kind of object exported to (one marketing list per segment)."""
        return "lists"

    def get_hook(self) -> Dynamics365Hook:
        """The Dynamics 365 hook, its pool sized to ``max_in_flight``."""
        return Dynamics365Hook(self.dynamics365_conn_id, concurrency=self.max_in_flight)

    def field_mapping(self) -> FieldMapping:
        """The contact ID column, or the column matched to contacts."""
        return dynamics_sales_mapping(key_column=self.key_column, contact_id_field=self.contact_id_field,
                                      match_field=self.match_field if self.match_on else None)

    def build_destination(self, hook: Dynamics365Hook, mapping: FieldMapping, context) -> DynamicsSalesDestination:
        """The marketing-list destination.

        :param hook: the Dynamics 365 hook.
        :param mapping: the field mapping.
        :param context: the task's context.
        """
        return DynamicsSalesDestination(hook, mapping, list_name=str(self.list_name or "{segment}"),
                                        match_on=self.match_on, mode=self.mode, max_in_flight=self.max_in_flight)

    def before_export(self, destination: DynamicsSalesDestination, context) -> None:
        """Push the marketing lists view for the "Dynamics 365 marketing list" button (the list's own page once
        the export knows it).

        :param destination: the destination adapter.
        :param context: the task's context.
        """
        context["ti"].xcom_push(key=DYNAMICS_LIST_URL_KEY, value=destination.hook.list_url())

    def after_export(self, destination: DynamicsSalesDestination, summary: dict, context) -> dict:
        """Add each segment's marketing list (ID, name, URL, whether created) to the summary; the button opens the
        list when the export had one segment.

        :param destination: the destination adapter.
        :param summary: the engine's summary.
        :param context: the task's context.
        """
        lists = {seg: dict(info) for seg, info in destination.lists.items()}
        summary["marketing_lists"] = lists
        for seg, info in lists.items():
            if info.get("id"):
                self.log.info("Segment '%s': marketing list '%s' %s", seg, info["name"], info["url"])
        ids = [info["url"] for info in lists.values() if info.get("url")]
        if len(ids) == 1:
            context["ti"].xcom_push(key=DYNAMICS_LIST_URL_KEY, value=ids[0])
        return summary
