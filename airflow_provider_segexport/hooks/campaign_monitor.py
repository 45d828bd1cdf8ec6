"""Campaign Monitor API v3.3: connection, authentication and documented limits.

The export destination comes with its own issue; today the hook authenticates and tests the connection.
Limits (``shared/API-FACTS.md`` section 2): 1,000 subscribers per import call.
"""

from __future__ import annotations

import base64

from airflow_provider_segexport.hooks.base import SegexportBaseHook
from airflow_provider_segexport.http import VendorAuthError, VendorSession

IMPORT_MAX = 1000
MAX_PER_EXPORT = 1_000_000
DEFAULT_BASE_URL = "https://api.createsend.com/api/v3.3"


class CampaignMonitorHook(SegexportBaseHook):
    """Talks to one Campaign Monitor account (an ``HttpHook``: ``hook.run("/clients.json")`` works).

    Connection (type ``campaign_monitor``): extra ``api_key`` (or the password field), optional
    ``client_id``, optional ``host`` to override the base URL, plus the common fields. Campaign Monitor
    sends ``X-RateLimit-*`` headers on every answer: the session's rate limiter paces requests by them.
    """

    conn_type = "campaign_monitor"
    default_conn_name = "campaign_monitor_default"
    hook_name = "Campaign Monitor"
    vendor = "Campaign Monitor"

    def _resolve_base_url(self) -> str:
        host = (self.connection.host or "").strip()
        return (host if host.startswith(("http://", "https://")) else f"https://{host}" if host
                else DEFAULT_BASE_URL).rstrip("/")

    def _build_session(self) -> VendorSession:
        key = self.secret("api_key") or self.connection.password
        if not key:
            raise VendorAuthError(self.vendor, None, f"Connection '{self.conn_id}' has no API key: set the field "
                                  "'API key' (extra \"api_key\").")
        header = {"Authorization": "Basic " + base64.b64encode(f"{key}:x".encode()).decode()}
        return self.new_session(self.base_url, auth=lambda: header)

    def _check_connection(self) -> str:
        client_id = self.extras.get("client_id")
        if client_id:
            lists = self.http.get_json(f"/clients/{client_id}/lists.json") or []
            return f"Connected to Campaign Monitor client {client_id}: {len(lists)} list(s)"
        clients = self.http.get_json("/clients.json")
        return f"Connected to Campaign Monitor ({len(clients or [])} client(s) visible)"
