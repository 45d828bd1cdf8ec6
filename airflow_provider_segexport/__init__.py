"""Airflow provider that exports customer segments to marketing and CRM systems.

Airflow discovers this package through the ``apache_airflow_provider`` entry point, which calls
:func:`get_provider_info`. The connection forms are declared here (``conn-fields`` and
``ui-field-behaviour``), the way the Airflow 3 UI reads them without importing any hook.
"""

from __future__ import annotations

__version__ = "0.1.0"

_PRIVACY_FIELD = {
    "label": "Data privacy acknowledged",
    "description": (
        "Required before any profile leaves your warehouse: tick to confirm that exporting customer "
        "data to this destination is covered by your privacy policy and the customers' consent."
    ),
    "schema": {"type": ["boolean", "null"], "default": False},
}
_ALLOWED_DAGS_FIELD = {
    "label": "Allowed DAG IDs",
    "description": "Optional comma-separated list of DAG IDs that may use this connection (empty: any DAG).",
    "schema": {"type": ["string", "null"]},
}
_CA_BUNDLE_FIELD = {
    "label": "CA bundle path",
    "description": "Optional path to a PEM CA bundle used to verify TLS (for a proxy or the local sandbox).",
    "schema": {"type": ["string", "null"]},
}
_VERIFY_FIELD = {
    "label": "Verify TLS",
    "description": "Verify the server's TLS certificate. Keep on outside local tests.",
    "schema": {"type": ["boolean", "null"], "default": True},
}
_TIMEOUT_FIELD = {
    "label": "Read timeout (seconds)",
    "description": "Seconds to wait for a response before retrying (connect timeout is 10 s).",
    "schema": {"type": ["integer", "null"], "minimum": 1, "maximum": 600},
}


def _common_fields() -> dict:
    return {
        "data_privacy_acknowledged": dict(_PRIVACY_FIELD),
        "allowed_dag_ids": dict(_ALLOWED_DAGS_FIELD),
        "ca_bundle": dict(_CA_BUNDLE_FIELD),
        "verify_ssl": dict(_VERIFY_FIELD),
        "timeout": dict(_TIMEOUT_FIELD),
    }


def _connection_types() -> list[dict]:
    return [
        {
            "connection-type": "mailchimp",
            "hook-class-name": "airflow_provider_segexport.hooks.mailchimp.MailchimpHook",
            "hook-name": "Mailchimp",
            "conn-fields": {
                "api_key": {
                    "label": "API key",
                    "description": "Mailchimp API key; its suffix names the data center (e.g. ...-us6).",
                    "schema": {"type": ["string", "null"], "format": "password"},
                },
                "access_token": {
                    "label": "OAuth access token",
                    "description": "Instead of an API key: an OAuth 2 access token (the data center is "
                    "read from the OAuth metadata endpoint).",
                    "schema": {"type": ["string", "null"], "format": "password"},
                },
                "oauth_metadata_url": {
                    "label": "OAuth metadata URL",
                    "description": "Only for OAuth tokens; default https://login.mailchimp.com/oauth2/metadata.",
                    "schema": {"type": ["string", "null"]},
                },
                **_common_fields(),
            },
            "ui-field-behaviour": {
                "hidden-fields": ["schema", "port", "login", "password", "extra"],
                "relabeling": {"host": "Base URL override"},
                "placeholders": {
                    "host": "optional, e.g. https://localhost:8443/mailchimp/3.0 (default: from the key)",
                    "api_key": "0123456789abcdef0123456789abcdef-us6",
                    "allowed_dag_ids": "segment_export, crm_sync",
                },
            },
        },
        {
            "connection-type": "campaign_monitor",
            "hook-class-name": "airflow_provider_segexport.hooks.campaign_monitor.CampaignMonitorHook",
            "hook-name": "Campaign Monitor",
            "conn-fields": {
                "api_key": {
                    "label": "API key",
                    "description": "Campaign Monitor API key (Account settings > API keys).",
                    "schema": {"type": ["string", "null"], "format": "password"},
                },
                "client_id": {
                    "label": "Client ID",
                    "description": "The Campaign Monitor client that owns the lists.",
                    "schema": {"type": ["string", "null"]},
                },
                "web_url": {
                    "label": "Web app URL",
                    "description": "Your Campaign Monitor web app's address, for the task's 'Campaign Monitor list' "
                                   "button (default https://app.createsend.com).",
                    "schema": {"type": ["string", "null"]},
                },
                **_common_fields(),
            },
            "ui-field-behaviour": {
                "hidden-fields": ["schema", "port", "login", "password", "extra"],
                "relabeling": {"host": "Base URL override"},
                "placeholders": {"host": "optional, default https://api.createsend.com/api/v3.3"},
            },
        },
        {
            "connection-type": "dynamics365",
            "hook-class-name": "airflow_provider_segexport.hooks.dynamics365.Dynamics365Hook",
            "hook-name": "Dynamics 365 (Dataverse)",
            "conn-fields": {
                "tenant_id": {
                    "label": "Tenant ID",
                    "description": "Microsoft Entra tenant (directory) ID.",
                    "schema": {"type": ["string", "null"]},
                },
                "client_id": {
                    "label": "Client (application) ID",
                    "description": "The app registration used as a Dataverse application user.",
                    "schema": {"type": ["string", "null"]},
                },
                "client_secret": {
                    "label": "Client secret",
                    "description": "The app registration's client secret.",
                    "schema": {"type": ["string", "null"], "format": "password"},
                },
                "authority": {
                    "label": "Authority URL",
                    "description": "Optional; default https://login.microsoftonline.com/<tenant ID>.",
                    "schema": {"type": ["string", "null"]},
                },
                "max_requests_per_window": {
                    "label": "Service protection: requests per window",
                    "description": "Optional; Dataverse's published 6,000 per user when empty. Set it only if your "
                                   "environment has other limits. Requests are paced to it; a 429 lowers it.",
                    "schema": {"type": ["integer", "null"], "minimum": 1},
                },
                "window_seconds": {
                    "label": "Service protection: window (seconds)",
                    "description": "Optional; the sliding window of the limits, 300 (5 minutes) when empty.",
                    "schema": {"type": ["number", "null"], "exclusiveMinimum": 0},
                },
                "max_execution_seconds_per_window": {
                    "label": "Service protection: execution time per window (seconds)",
                    "description": "Optional; combined execution time allowed per window, Dataverse's published "
                                   "1,200 (20 minutes) when empty.",
                    "schema": {"type": ["number", "null"], "exclusiveMinimum": 0},
                },
                "max_concurrent_requests": {
                    "label": "Service protection: concurrent requests",
                    "description": "Optional; Dataverse's published 52 per user when empty. The export's own "
                                   "max_in_flight (default 4) stays below it.",
                    "schema": {"type": ["integer", "null"], "minimum": 1},
                },
                **_common_fields(),
            },
            "ui-field-behaviour": {
                "hidden-fields": ["schema", "port", "login", "password", "extra"],
                "relabeling": {"host": "Environment URL"},
                "placeholders": {"host": "https://yourorg.crm.dynamics.com"},
            },
        },
        {
            "connection-type": "adobe_campaign",
            "hook-class-name": "airflow_provider_segexport.hooks.adobe_campaign.AdobeCampaignHook",
            "hook-name": "Adobe Campaign Standard",
            "conn-fields": {
                "client_id": {
                    "label": "Client ID (API key)",
                    "description": "OAuth server-to-server credential's client ID; also sent as X-Api-Key.",
                    "schema": {"type": ["string", "null"]},
                },
                "client_secret": {
                    "label": "Client secret",
                    "description": "OAuth server-to-server credential's client secret.",
                    "schema": {"type": ["string", "null"], "format": "password"},
                },
                "org_id": {
                    "label": "Organization ID",
                    "description": "Adobe organization (tenant) ID used in the Campaign URL.",
                    "schema": {"type": ["string", "null"]},
                },
                "ims_url": {
                    "label": "IMS token URL",
                    "description": "Optional; default https://ims-na1.adobelogin.com/ims/token/v3.",
                    "schema": {"type": ["string", "null"]},
                },
                "scopes": {
                    "label": "Scopes",
                    "description": "Comma-separated IMS scopes of the credential.",
                    "schema": {"type": ["string", "null"]},
                },
                "events_url": {
                    "label": "I/O Events journal URL",
                    "description": "Optional, for the email events: the event registration's Journaling API "
                                   "endpoint, as the Adobe Developer Console shows it.",
                    "schema": {"type": ["string", "null"]},
                },
                "ims_org_id": {
                    "label": "IMS organization ID",
                    "description": "Optional, for the email events: sent as x-ims-org-id to the journal "
                                   "(…@AdobeOrg).",
                    "schema": {"type": ["string", "null"]},
                },
                "max_requests_per_window": {
                    "label": "Gateway rate: requests per window",
                    "description": "Optional; Adobe publishes no rate. With the rate agreed with Adobe the calls "
                                   "keep to it; empty: the gateway's 429s pace them.",
                    "schema": {"type": ["integer", "null"], "minimum": 1},
                },
                "window_seconds": {
                    "label": "Gateway rate: window (seconds)",
                    "description": "Optional; 60 when empty.",
                    "schema": {"type": ["number", "null"], "exclusiveMinimum": 0},
                },
                **_common_fields(),
            },
            "ui-field-behaviour": {
                "hidden-fields": ["schema", "port", "login", "password", "extra"],
                "relabeling": {"host": "Campaign API base URL"},
                "placeholders": {"host": "https://mc.adobe.io/<ORGANIZATION>/campaign"},
            },
        },
    ]


def get_provider_info() -> dict:
    """Return the provider metadata Airflow reads through the entry point."""
    return {
        "package-name": "airflow-provider-segexport",
        "name": "Segment Export",
        "description": "Export customer segments to Mailchimp, Campaign Monitor and Dynamics 365 Sales; "
        "sync Adobe Campaign Standard with Dynamics 365.",
        "state": "ready",
        "source-date-epoch": 1795392000,
        "versions": [__version__],
        "integrations": [
            {"integration-name": "Mailchimp", "external-doc-url": "https://mailchimp.com/developer/marketing/",
             "tags": ["service"]},
            {"integration-name": "Campaign Monitor", "external-doc-url": "https://www.campaignmonitor.com/api/v3-3/",
             "tags": ["service"]},
            {"integration-name": "Dynamics 365 (Dataverse)",
             "external-doc-url": "https://learn.microsoft.com/power-apps/developer/data-platform/webapi/overview",
             "tags": ["azure", "service"]},
            {"integration-name": "Adobe Campaign Standard",
             "external-doc-url": "https://experienceleague.adobe.com/docs/campaign-standard/using/working-with-apis/"
                                 "get-started-apis.html", "tags": ["service"]},
        ],
        "connection-types": _connection_types(),
        "extra-links": ["airflow_provider_segexport.links.MailchimpAudienceLink",
                        "airflow_provider_segexport.links.CampaignMonitorListLink",
                        "airflow_provider_segexport.links.DynamicsMarketingListLink"],
    }
