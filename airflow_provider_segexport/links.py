"""Operator extra links: buttons in the Airflow UI that open the destination."""

from __future__ import annotations

from airflow.sdk import BaseOperatorLink

MAILCHIMP_AUDIENCE_URL_KEY = "mailchimp_audience_url"


class MailchimpAudienceLink(BaseOperatorLink):
    """Opens the exported audience in Mailchimp. The operator pushes the URL once it knows the audience."""

    name = "Mailchimp audience"

    def get_link(self, operator, *, ti_key) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=MAILCHIMP_AUDIENCE_URL_KEY) or ""


CAMPAIGN_MONITOR_LIST_URL_KEY = "campaign_monitor_list_url"


class CampaignMonitorListLink(BaseOperatorLink):
    """Opens the exported list in Campaign Monitor. The operator pushes the URL once it knows the list."""

    name = "Campaign Monitor list"

    def get_link(self, operator, *, ti_key) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=CAMPAIGN_MONITOR_LIST_URL_KEY) or ""


DYNAMICS_LIST_URL_KEY = "dynamics365_marketing_list_url"


class DynamicsMarketingListLink(BaseOperatorLink):
    """Opens the segment's marketing list in Dynamics 365 (the marketing lists view when the export had several
    segments). The operator pushes the URL."""

    name = "Dynamics 365 marketing list"

    def get_link(self, operator, *, ti_key) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=DYNAMICS_LIST_URL_KEY) or ""
