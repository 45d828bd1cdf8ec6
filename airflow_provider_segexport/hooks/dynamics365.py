"""Dynamics 365 (Dataverse Web API v9.2) with Microsoft Entra ID client-credentials tokens (msal).

The marketing-list destination comes with its own issue; today the hook gets a token (cached by
msal, refreshed on expiry or after a 401) and tests the connection with WhoAmI.
"""

from __future__ import annotations

import threading
from functools import cached_property
from typing import Any

from airflow_provider_segexport.hooks.base import SegexportBaseHook
from airflow_provider_segexport.http import RequestBudget, VendorAuthError, VendorSession

API_PATH = "/api/data/v9.2"
#: Dataverse service protection: 52 concurrent requests per user
MAX_CONCURRENCY = 52
#: Dataverse service protection: 6,000 requests per user in a sliding window of 300 seconds
SERVICE_PROTECTION_REQUESTS = 6000
SERVICE_PROTECTION_WINDOW_S = 300.0
MAX_PER_SEGMENT = 100_000


class _VerifyingSession:
    """msal's HTTP client: the connection's TLS settings and a timeout passed with each request (with
    trust_env on, REQUESTS_CA_BUNDLE would replace a session's verify)."""

    def __init__(self, verify: bool | str) -> None:
        import requests

        self._session = requests.Session()
        self._verify = verify

    def get(self, url, **kwargs):
        """GET with the connection's TLS settings and a timeout.

        :param url: the URL (msal's).
        """
        kwargs.setdefault("verify", self._verify)
        kwargs.setdefault("timeout", 30)
        return self._session.get(url, **kwargs)

    def post(self, url, **kwargs):
        """POST with the connection's TLS settings and a timeout.

        :param url: the URL (msal's).
        """
        kwargs.setdefault("verify", self._verify)
        kwargs.setdefault("timeout", 30)
        return self._session.post(url, **kwargs)

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()


class Dynamics365Hook(SegexportBaseHook):
    """Talks to one Dataverse environment (an ``HttpHook``: ``hook.run("/WhoAmI")`` works).

    Connection (type ``dynamics365``): ``host`` (the Environment URL), extras ``tenant_id`` (or
    ``authority``), ``client_id`` and ``client_secret`` (an Entra ID app registration), plus the common
    fields. Requests are paced to Dataverse's published service-protection budget.

    :param conn_id: the Airflow connection's id.
    :param kwargs: as for :class:`~airflow_provider_segexport.hooks.base.SegexportBaseHook`.
    """

    conn_type = "dynamics365"
    default_conn_name = "dynamics365_default"
    hook_name = "Dynamics 365 (Dataverse)"
    vendor = "Dataverse"
    request_budget = RequestBudget(SERVICE_PROTECTION_REQUESTS, SERVICE_PROTECTION_WINDOW_S)

    def __init__(self, conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(conn_id, **kwargs)
        self._token_lock = threading.Lock()
        self._token: str | None = None

    @cached_property
    def environment_url(self) -> str:
        """The Dataverse environment's URL (the connection's host), e.g. https://yourorg.crm.dynamics.com."""
        host = (self.connection.host or "").strip().rstrip("/")
        if not host:
            raise VendorAuthError(self.vendor, None, f"Connection '{self.conn_id}' has no Environment URL (host), "
                                  "e.g. https://yourorg.crm.dynamics.com")
        return host if host.startswith(("http://", "https://")) else "https://" + host

    @cached_property
    def _msal_app(self):
        import msal

        tenant = self.extras.get("tenant_id")
        client_id = self.extras.get("client_id")
        secret = self.secret("client_secret")
        if not (tenant or self.extras.get("authority")) or not client_id or not secret:
            raise VendorAuthError(self.vendor, None, f"Connection '{self.conn_id}' needs 'Tenant ID', 'Client ID' "
                                  "and 'Client secret' (extras tenant_id, client_id, client_secret).")
        authority = self.extras.get("authority") or f"https://login.microsoftonline.com/{tenant}"
        http = _VerifyingSession(self.verify)
        return msal.ConfidentialClientApplication(
            client_id, client_credential=secret, authority=authority, http_client=http,
            instance_discovery=not bool(self.extras.get("authority")),
        )

    def _fetch_token(self, force: bool = False, stale: str | None = None) -> str:
        """The access token; ``force``: a new one, unless ``stale`` (the refused token) was already replaced
        by another thread (one refresh when several requests in flight meet the expiry)."""
        with self._token_lock:
            if self._token and (not force or (stale is not None and self._token != stale)):
                return self._token
            scope = [self.environment_url + "/.default"]
            if force:  # msal refuses force_refresh for client credentials: drop its cached token instead
                self._msal_app.remove_tokens_for_client()
            result = self._msal_app.acquire_token_for_client(scopes=scope)
            if "access_token" not in result:
                raise VendorAuthError(self.vendor, 401, f"Entra ID refused the client credentials: "
                                      f"{result.get('error')}: {result.get('error_description', '')[:300]}")
            self._token = result["access_token"]
            self._mask(self._token)
            return self._token

    def _resolve_base_url(self) -> str:
        return self.environment_url + API_PATH

    def _build_session(self) -> VendorSession:
        used = threading.local()  # the token this thread's last request carried

        def auth() -> dict[str, str]:
            used.token = self._fetch_token()
            return {"Authorization": f"Bearer {used.token}", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}

        def refresh() -> bool:
            self._fetch_token(force=True, stale=getattr(used, "token", None))
            return True

        return self.new_session(self.base_url, auth=auth, on_unauthorized=refresh)

    def pool_size(self) -> int:
        """Connections kept per host: the concurrency in use (16 when not given), at most Dataverse's 52."""
        return min(self.concurrency or 16, MAX_CONCURRENCY)

    def _check_connection(self) -> str:
        who = self.http.get_json("/WhoAmI")
        return f"Connected to Dataverse as user {who.get('UserId')} (organization {who.get('OrganizationId')})"
