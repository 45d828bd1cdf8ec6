"""Adobe Campaign Standard REST API with Adobe IMS server-to-server (OAuth client credentials) tokens.

The sync comes with its own issue; today the hook gets a token and tests the connection.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from airflow_provider_segexport.hooks.base import SegexportBaseHook
from airflow_provider_segexport.http import VendorAuthError, VendorSession

DEFAULT_IMS_URL = "https://ims-na1.adobelogin.com/ims/token/v3"
DEFAULT_SCOPES = "openid,AdobeID,read_organizations,additional_info.projectedProductContext,campaign_sdk"


class AdobeCampaignHook(SegexportBaseHook):
    """Talks to one Adobe Campaign Standard instance (an ``HttpHook``: ``hook.run("/profileAndServices/profile")``
    works).

    Connection (type ``adobe_campaign``): extras ``client_id``, ``client_secret`` and ``org_id`` (an Adobe
    Developer Console server-to-server credential), optional ``ims_url`` and ``scopes``, optional ``host``
    to override the base URL, plus the common fields.

    :param conn_id: the Airflow connection's id.
    :param kwargs: as for :class:`~airflow_provider_segexport.hooks.base.SegexportBaseHook`.
    """

    conn_type = "adobe_campaign"
    default_conn_name = "adobe_campaign_default"
    hook_name = "Adobe Campaign Standard"
    vendor = "Adobe Campaign"

    def __init__(self, conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(conn_id, **kwargs)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires = 0.0

    def _resolve_base_url(self) -> str:
        host = (self.connection.host or "").strip().rstrip("/")
        if host:
            return host if host.startswith(("http://", "https://")) else "https://" + host
        org = self.extras.get("org_id")
        if not org:
            raise VendorAuthError(self.vendor, None, f"Connection '{self.conn_id}' needs 'Organization ID' "
                                  "(extra org_id) or a Campaign API base URL (host).")
        return f"https://mc.adobe.io/{org}/campaign"

    def _fetch_token(self, force: bool = False) -> str:
        """The IMS access token, fetched again a minute before it expires or when ``force``d (after a 401)."""
        with self._lock:
            if self._token and not force and time.time() < self._expires - 60:
                return self._token
            client_id = self.extras.get("client_id")
            secret = self.secret("client_secret")
            if not client_id or not secret:
                raise VendorAuthError(self.vendor, None, f"Connection '{self.conn_id}' needs 'Client ID' and "
                                      "'Client secret' (extras client_id, client_secret).")
            ims = VendorSession("Adobe IMS", self.extras.get("ims_url") or DEFAULT_IMS_URL, verify=self.verify,
                                pool_size=1)
            try:
                answer = ims.request("POST", "", data={
                    "grant_type": "client_credentials", "client_id": client_id, "client_secret": secret,
                    "scope": self.extras.get("scopes") or DEFAULT_SCOPES,
                }, idempotent=True).json()
            finally:
                ims.close()
            self._token = answer["access_token"]
            self._mask(self._token)
            self._expires = time.time() + float(answer.get("expires_in", 3600))
            return self._token

    def _build_session(self) -> VendorSession:
        client_id = str(self.extras.get("client_id") or "")

        def auth() -> dict[str, str]:
            return {"Authorization": f"Bearer {self._fetch_token()}", "X-Api-Key": client_id}

        def refresh() -> bool:
            self._fetch_token(force=True)
            return True

        return self.new_session(self.base_url, auth=auth, on_unauthorized=refresh)

    def _check_connection(self) -> str:
        self.http.get_json("/profileAndServices/profile", params={"_lineCount": 1})
        return f"Connected to Adobe Campaign Standard at {self.base_url}"
