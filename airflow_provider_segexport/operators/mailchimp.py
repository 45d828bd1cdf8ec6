"""Export segments to a Mailchimp audience."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow_provider_segexport.destinations.mailchimp import MailchimpDestination
from airflow_provider_segexport.export.records import FieldMapping
from airflow_provider_segexport.export.state import RefusalStore
from airflow_provider_segexport.hooks.mailchimp import MailchimpHook
from airflow_provider_segexport.links import MAILCHIMP_AUDIENCE_URL_KEY, MailchimpAudienceLink
from airflow_provider_segexport.operators.base import BaseSegmentExportOperator


class MailchimpSegmentExportOperator(BaseSegmentExportOperator):
    """Add or update the members of one or more segments in a Mailchimp audience.

    New members get ``status_if_new``; existing members keep their status (an unsubscribed, cleaned or
    archived member is never resubscribed). Every exported member is tagged with its segment's name;
    ``mode="mirror"`` also removes that tag from members who left the segment (and nothing else).

    :param audience_id: the Mailchimp audience (list) ID. Templated.
    :param email_field: source column with the email address (required).
    :param first_name_field: source column for ``FNAME`` (optional).
    :param last_name_field: source column for ``LNAME`` (optional).
    :param merge_fields: more merge fields, ``{"TAG": "source_column"}``; values are converted to each
        field's declared type (numbers, dates and birthdays in the field's format, addresses).
    :param status_if_new: ``subscribed`` (default), ``pending`` (double opt-in) or ``transactional``.
    :param mode: ``upsert`` (default) or ``mirror``.
    :param tag_segments: tag members with the segment name (default True).
    :param create_missing_merge_fields: create mapped merge fields the audience lacks (as text).
    :param mailchimp_conn_id: the ``mailchimp`` connection. Default ``mailchimp_default``.
    :param max_in_flight: batch calls in flight (at most 10, Mailchimp's connection limit).
    """

    template_fields: Sequence[str] = (
        *BaseSegmentExportOperator.template_fields, "audience_id", "mode", "merge_fields", "status_if_new",
    )
    operator_extra_links = (MailchimpAudienceLink(),)

    def __init__(
        self,
        *,
        audience_id: str,
        email_field: str = "email",
        first_name_field: str | None = None,
        last_name_field: str | None = None,
        merge_fields: dict[str, str] | None = None,
        status_if_new: str = "subscribed",
        mode: str = "upsert",
        tag_segments: bool = True,
        create_missing_merge_fields: bool = False,
        mailchimp_conn_id: str = MailchimpHook.default_conn_name,
        max_in_flight: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.audience_id = audience_id
        self.email_field = email_field
        self.first_name_field = first_name_field
        self.last_name_field = last_name_field
        self.merge_fields = merge_fields
        self.status_if_new = status_if_new
        self.mode = mode
        self.tag_segments = tag_segments
        self.create_missing_merge_fields = create_missing_merge_fields
        self.mailchimp_conn_id = mailchimp_conn_id
        self.max_in_flight = max_in_flight

    def get_hook(self) -> MailchimpHook:
        return MailchimpHook(self.mailchimp_conn_id, concurrency=self.max_in_flight)

    def field_mapping(self) -> FieldMapping:
        fields = {"email": self.email_field}
        if self.first_name_field:
            fields["FNAME"] = self.first_name_field
        if self.last_name_field:
            fields["LNAME"] = self.last_name_field
        fields.update(dict(self.merge_fields or {}))
        return FieldMapping(fields, key_column=self.key_column, email_field="email")

    def build_destination(self, hook: MailchimpHook, mapping: FieldMapping, context) -> MailchimpDestination:
        refusals = RefusalStore(f"mailchimp:{self.mailchimp_conn_id}:{self.audience_id}", self.state_dir)
        destination = MailchimpDestination(
            hook, str(self.audience_id), mapping, status_if_new=self.status_if_new, mode=self.mode,
            tag_segments=self.tag_segments, create_missing_merge_fields=self.create_missing_merge_fields,
            refusals=refusals, max_in_flight=self.max_in_flight,
        )
        return destination

    def before_export(self, destination: MailchimpDestination, context) -> None:
        """Push the audience link first (the UI button works even if the export fails)."""
        hook = destination.hook
        try:
            audience = hook.get_audience(str(self.audience_id))
        except Exception:  # noqa: BLE001 - the pre-flight check reports it properly
            return
        host = hook.base_url.split("//", 1)[-1].split(".", 1)[0]
        dc = host if host[:2] in ("us", "eu") and host[2:].isdigit() else "us1"
        url = f"https://{dc}.admin.mailchimp.com/lists/members/?id={audience.get('web_id')}"
        context["ti"].xcom_push(key=MAILCHIMP_AUDIENCE_URL_KEY, value=url)
