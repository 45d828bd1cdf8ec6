"""Dynamics 365 (Dataverse Web API v9.2) with Microsoft Entra ID client-credentials tokens (msal).

The marketing-list destination comes with its own issue; today the hook gets a token (cached by
msal, refreshed on expiry or after a 401) and tests the connection with WhoAmI.
"""

from __future__ import annotations

import threading
from functools import cached_property
from typing import Any

from airflow_provider_segexport.hooks.base import SegexportBaseHook, mask
from airflow_provider_segexport.http import VendorAuthError, VendorSession

API_PATH = "/api/data/v9.2"
#: Dataverse service protection: 52 concurrent requests per user
MAX_CONCURRENCY = 52
MAX_PER_SEGMENT = 100_000


class _VerifyingSession:
    """msal's HTTP client: TLS settings passed per request (REQUESTS_CA_BUNDLE would override a session's)."""

    def __init__(self, verify: bool | str) -> None:
        import requests

        self._session = requests.Session()
        self._verify = verify

    def get(self, url, **kwargs):
        kwargs.setdefault("verify", self._verify)
        kwargs.setdefault("timeout", 30)
        return self._session.get(url, **kwargs)

    def post(self, url, **kwargs):
        kwargs.setdefault("verify", self._verify)
        kwargs.setdefault("timeout", 30)
        return self._session.post(url, **kwargs)

    def close(self) -> None:
        self._session.close()


class Dynamics365Hook(SegexportBaseHook):
    conn_type = "dynamics365"
    default_conn_name = "dynamics365_default"
    hook_name = "Dynamics 365 (Dataverse)"
    vendor = "Dataverse"

    def __init__(self, conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(conn_id, **kwargs)
        self._token_lock = threading.Lock()
        self._token: str | None = None

    @cached_property
    def environment_url(self) -> str:
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
            mask(self._token)
            return self._token

    def _build_session(self) -> VendorSession:
        used = threading.local()  # the token this thread's last request carried

        def auth() -> dict[str, str]:
            used.token = self._fetch_token()
            return {"Authorization": f"Bearer {used.token}", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}

        def refresh() -> bool:
            self._fetch_token(force=True, stale=getattr(used, "token", None))
            return True

        return self.new_session(self.environment_url + API_PATH, auth=auth, on_unauthorized=refresh)

    def pool_size(self) -> int:
        return min(self.concurrency or 16, MAX_CONCURRENCY)

    def test_connection(self) -> tuple[bool, str]:
        try:
            self.http.retry.max_attempts = 2
            who = self.http.get_json("/WhoAmI")
            return True, f"Connected to Dataverse as user {who.get('UserId')} (organization {who.get('OrganizationId')})"
        except Exception as exc:  # noqa: BLE001
            return False, str(exc)
