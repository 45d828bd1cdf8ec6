"""Export segments to a Mailchimp audience."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow_provider_segexport.destinations.mailchimp import (
    MailchimpBatchOperationsDestination,
    MailchimpDestination,
)
from airflow_provider_segexport.export.records import FieldMapping
from airflow_provider_segexport.export.report import summary_table
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
    :param mode: ``upsert`` (default) or ``mirror`` (keeps export state even with ``delta=False``).
    :param tag_segments: tag members with the segment name (default True).
    :param create_missing_merge_fields: create mapped merge fields the audience lacks (as text).
    :param mailchimp_conn_id: the ``mailchimp`` connection. Default ``mailchimp_default``.
    :param max_in_flight: batch calls in flight (at most 10, Mailchimp's connection limit).
    :param deferrable: queue the work as Mailchimp batch operations and wait in the triggerer (no worker
        slot held while Mailchimp processes it); the results archive gives the per-member outcomes.
    :param poll_interval: seconds between batch status checks when deferred.
    """

    template_fields: Sequence[str] = (
        *BaseSegmentExportOperator.template_fields, "audience_id", "mode", "merge_fields", "status_if_new",
    )
    text_template_fields: Sequence[str] = (*BaseSegmentExportOperator.text_template_fields, "audience_id", "mode",
                                           "status_if_new")
    operator_extra_links = (MailchimpAudienceLink(),)
    vendor = "mailchimp"

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
        deferrable: bool | None = None,
        poll_interval: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if deferrable is None:
            from airflow.configuration import conf

            deferrable = conf.getboolean("operators", "default_deferrable", fallback=False)
        self.deferrable = deferrable
        self.poll_interval = poll_interval
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

    def destination_conn_id(self) -> str:
        """The Mailchimp connection's id."""
        return self.mailchimp_conn_id

    def destination_target(self) -> str:
        """The audience ID."""
        return str(self.audience_id)

    def get_hook(self) -> MailchimpHook:
        """The Mailchimp hook, its pool sized to ``max_in_flight``."""
        return MailchimpHook(self.mailchimp_conn_id, concurrency=self.max_in_flight)

    def field_mapping(self) -> FieldMapping:
        """``email``, ``FNAME``, ``LNAME`` and the other merge fields, mapped to their source columns."""
        fields = {"email": self.email_field}
        if self.first_name_field:
            fields["FNAME"] = self.first_name_field
        if self.last_name_field:
            fields["LNAME"] = self.last_name_field
        fields.update(dict(self.merge_fields or {}))
        return FieldMapping(fields, key_column=self.key_column, email_field="email")

    def build_destination(self, hook: MailchimpHook, mapping: FieldMapping, context) -> MailchimpDestination:
        """The batch-subscribe destination, or in deferrable mode (not a dry run) the batch-operations one.

        :param hook: the Mailchimp hook.
        :param mapping: the field mapping.
        :param context: the task's context.
        """
        kwargs = dict(status_if_new=self.status_if_new, mode=self.mode, tag_segments=self.tag_segments,
                      create_missing_merge_fields=self.create_missing_merge_fields, refusals=self.open_refusals(),
                      max_in_flight=self.max_in_flight)
        if self.deferrable and not self.is_dry_run():
            work_dir = self.resolve_rejects_path(context).parent / f"{self.task_id}-batches"
            return MailchimpBatchOperationsDestination(hook, str(self.audience_id), mapping, work_dir=work_dir,
                                                       **kwargs)
        return MailchimpDestination(hook, str(self.audience_id), mapping, **kwargs)

    def after_export(self, destination, summary: dict, context) -> dict:
        """Deferrable mode: submit the last operations and wait for Mailchimp in the triggerer.

        :param destination: the destination adapter.
        :param summary: the engine's summary.
        :param context: the task's context.
        """
        if not isinstance(destination, MailchimpBatchOperationsDestination):
            return summary
        groups = destination.flush()
        if not groups:
            return summary
        from airflow_provider_segexport.triggers.mailchimp import MailchimpBatchTrigger

        self.log.info("Queued %d Mailchimp batch(es) of operations; waiting for Mailchimp in the triggerer",
                      len(groups))
        self.defer(
            trigger=MailchimpBatchTrigger(
                self.mailchimp_conn_id, [g["batch_id"] for g in groups], poll_interval=self.poll_interval,
                payload={"summary": summary, "groups": groups, "rejects_path": str(self.resolve_rejects_path(context))},
            ),
            method_name="execute_complete",
            timeout=self.execution_timeout or timedelta(hours=12),
        )
        return summary  # not reached: defer() raises

    def execute_complete(self, context, event: dict | None = None) -> dict:
        """Apply the batch operations' per-member outcomes; return the final summary.

        :param context: the task's context.
        :param event: the trigger's event (the finished batches and the payload :meth:`after_export` gave it).
        """
        if not event or event.get("status") != "success":
            raise RuntimeError(f"Waiting for the Mailchimp batch operations failed: {(event or {}).get('message')}. "
                               "Members already processed by Mailchimp are kept; clear the task to export again.")
        payload = event["payload"]
        hook = self.get_hook()
        try:
            destination = self.build_destination(hook, self.field_mapping(), context)
            summary = self.apply_deferred(context, destination, payload["summary"],
                                          {"groups": payload["groups"], "batches": event["batches"]},
                                          payload["rejects_path"])
        finally:
            hook.close()
        destination.discard(payload["groups"])
        summary["mailchimp_batches"] = [group["batch_id"] for group in payload["groups"]]
        self.log.info("Mailchimp processed the batch operations:\n%s", summary_table(summary))
        return summary

    def before_export(self, destination: MailchimpDestination, context) -> None:
        """Push the audience link first (the UI button works even if the export fails).

        :param destination: the destination adapter (it keeps the audience read here for its pre-flight).
        :param context: the task's context.
        """
        hook = destination.hook
        try:
            audience = destination.audience = hook.get_audience(str(self.audience_id))  # pre-flight needs it too
        except Exception:  # noqa: BLE001 - the pre-flight check reports it properly
            return
        host = hook.base_url.split("//", 1)[-1].split(".", 1)[0]
        dc = host if host[:2] in ("us", "eu") and host[2:].isdigit() else "us1"
        url = f"https://{dc}.admin.mailchimp.com/lists/members/?id={audience.get('web_id')}"
        context["ti"].xcom_push(key=MAILCHIMP_AUDIENCE_URL_KEY, value=url)
