"""Adobe Campaign Standard REST API with Adobe IMS server-to-server (OAuth client credentials) tokens.

The hook gets an IMS token (renewed before it expires and after a 401), tests the connection, and has the
endpoints the Dynamics 365 -> Campaign sync uses: profiles and custom resources linked to the profile, under
``/profileAndServicesExt``, found by a custom filter on their key field (never by a stored PKey: Adobe asks
integrations not to persist them), created, updated (PATCH: only the fields given) and deleted, one record a
call (Campaign Standard has no bulk REST write). Facts: ``shared/API-FACTS.md`` section 4.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from airflow_provider_segexport.hooks.base import SegexportBaseHook
from airflow_provider_segexport.http import (
    RETRY_STATUSES,
    RetryPolicy,
    VendorAPIError,
    VendorAuthError,
    VendorSession,
    encode_json,
    retry_after_seconds,
)

DEFAULT_IMS_URL = "https://ims-na1.adobelogin.com/ims/token/v3"
DEFAULT_SCOPES = "openid,AdobeID,read_organizations,additional_info.projectedProductContext,campaign_sdk"
EXT = "/profileAndServicesExt"
#: Campaign Standard answers a refused value (unknown field, too long, wrong type) with HTTP 500 and one of
#: these codes (AdobeDocs experience-cloud.en, help/campaign/api/limitations.md, "Error codes and messages"):
#: permanent, never retried
PERMANENT_500 = ("RST-360011", "RST-360012", "PGS-220000", "XTK-170036")
#: the gateway's throttling and transient errors are retried; a 500 is Campaign refusing the request itself
RETRIED = frozenset(RETRY_STATUSES - {500})


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
        self._expires = self._renew_at = 0.0

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
        """The IMS access token, fetched again a minute before it expires (a tenth of its lifetime before, for a
        token that lives less than ten minutes) or when ``force``d (after a 401)."""
        with self._lock:
            if self._token and not force and time.time() < self._renew_at:
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
            lifetime = float(answer.get("expires_in", 3600))
            self._expires = time.time() + lifetime
            # a token living less than a minute would otherwise be fetched again for every call
            self._renew_at = self._expires - min(60.0, lifetime / 10)
            return self._token

    def _build_session(self) -> VendorSession:
        client_id = str(self.extras.get("client_id") or "")

        def auth() -> dict[str, str]:
            return {"Authorization": f"Bearer {self._fetch_token()}", "X-Api-Key": client_id}

        def refresh() -> bool:
            self._fetch_token(force=True)
            return True

        return self.new_session(self.base_url, auth=auth, on_unauthorized=refresh,
                                retry=RetryPolicy(statuses=RETRIED))

    def _check_connection(self) -> str:
        self.http.get_json("/profileAndServices/profile", params={"_lineCount": 1})
        return f"Connected to Adobe Campaign Standard at {self.base_url}"

    # -- records (profiles and custom resources) ------------------------------------------------------------
    def find(self, resource: str, filter_name: str, param: str, value: str) -> list[dict]:
        """The records of ``resource`` a custom filter finds (e.g. profiles ``byCrmId?crmId=<contactid>``).

        :param resource: ``profile`` or a custom resource linked to the profile (``cusLoyaltyCard``).
        :param filter_name: the filter defined in Campaign (``byCrmId``).
        :param param: the filter's parameter (``crmId``).
        :param value: the value looked for.
        """
        answer = self.http.get_json(f"{EXT}/{resource}/{filter_name}", params={param: value})
        return list((answer or {}).get("content") or [])

    def find_all(self, resource: str, filter_name: str, params: dict[str, Any], page_size: int = 500
                 ) -> Iterator[dict]:
        """Every record a custom filter finds, page by page (``next.href`` followed; ``_forcePagination`` so that
        big tables page too).

        :param resource: ``profile`` or a custom resource.
        :param filter_name: the filter defined in Campaign (``byModifiedSince``).
        :param params: the filter's parameters.
        :param page_size: records per page (``_lineCount``).
        """
        answer = self.http.get_json(f"{EXT}/{resource}/{filter_name}", params=_page_params(params, page_size))
        while True:
            yield from (answer or {}).get("content") or []
            next_href = ((answer or {}).get("next") or {}).get("href")
            if not next_href or not (answer or {}).get("content"):
                return
            answer = self.http.get_json(next_href)

    def create(self, resource: str, body: dict) -> dict:
        """Create a record; the answer holds its ``PKey`` and ``href`` (not repeated when its answer is lost:
        find it before creating again).

        :param resource: ``profile`` or a custom resource.
        :param body: the record's fields (a link to the profile as ``{"profile": {"PKey": ...}}``).
        """
        return self.http.post_json(f"{EXT}/{resource}", body)

    def update(self, href: str, body: dict) -> None:
        """PATCH a record: only the fields given change.

        :param href: the record's ``href`` as Campaign gave it in this run (never stored).
        :param body: the fields to set.
        """
        self.http.request("PATCH", href, data=encode_json(body), idempotent=True,
                          headers={"Content-Type": "application/json"})

    def delete(self, href: str) -> bool:
        """Delete a record; False when it was already gone.

        :param href: the record's ``href`` as Campaign gave it in this run.
        """
        return self.http.request("DELETE", href, expected=(404,)).status_code != 404

    # -- email events: the Adobe I/O Events journal ------------------------------------------------------------
    def get_profile(self, pkey: str) -> dict | None:
        """One profile with its custom fields (``/profileAndServicesExt/profile/<PKey>``), or None when it is gone.

        :param pkey: the PKey an email event carries (used within the run, never stored).
        """
        response = self.http.request("GET", f"{EXT}/profile/{pkey}", expected=(404,))
        return None if response.status_code == 404 else response.json()

    @property
    def journal_url(self) -> str:
        """The Journaling API endpoint of the Adobe I/O Events registration (extra ``events_url``, as the Developer
        Console shows it: ``https://events-va6.adobe.io/events/organizations/<org>/integrations/<credential>/
        <registration>``)."""
        url = str(self.extras.get("events_url") or "").strip()
        if not url:
            raise VendorAuthError(self.vendor, None, f"Connection '{self.conn_id}' has no Adobe I/O Events journal "
                                  "URL (extra events_url: the registration's Journaling API endpoint).")
        return url

    def read_journal(self, *, since: str | None = None, latest: bool = False, limit: int | None = None,
                     url: str | None = None) -> JournalPage:
        """One page of the Adobe I/O Events journal: the events after ``since`` (from the oldest one kept without
        it, from now on with ``latest``), or the page ``url`` names (a ``Link: rel="next"`` given earlier).

        :param since: a position the journal gave (opaque).
        :param latest: start after the newest event (``latest=true``).
        :param limit: events per page at most (the journal may send fewer).
        :param url: the ``next`` link of an earlier page (followed as given).
        """
        base = self.journal_url
        if url is None:
            params: dict[str, Any] = {}
            if since:
                params["since"] = since
            elif latest:
                params["latest"] = "true"
            if limit:
                params["limit"] = int(limit)
            url = base + ("?" + urlencode(params) if params else "")
        elif urlsplit(url).netloc != urlsplit(base).netloc:  # never send the token elsewhere
            raise VendorAPIError(self.vendor, None, "the journal's next link points outside Adobe I/O Events")
        headers = {"x-ims-org-id": str(self.extras["ims_org_id"])} if self.extras.get("ims_org_id") else {}
        response = self.http.request("GET", url, headers=headers)
        next_url = (response.links.get("next") or {}).get("url")
        if response.status_code == 204 or not response.content:
            return JournalPage([], since, next_url, retry_after_seconds(response.headers))
        body = response.json() or {}
        events = list(body.get("events") or [])
        last = (body.get("_page") or {}).get("last") or (events[-1].get("position") if events else since)
        return JournalPage(events, last, next_url, None)


def is_permanent(exc: VendorAPIError) -> bool:
    """Whether Campaign refused the record itself (a 4xx, or a 500 carrying a validation code): not retried."""
    if exc.status is None:
        return False
    if exc.status == 500:
        return any(code in str(exc.message) for code in PERMANENT_500)
    return 400 <= exc.status < 500 and exc.status not in (401, 408, 429)


def _page_params(params: dict[str, Any], page_size: int) -> dict[str, Any]:
    return {**params, "_lineCount": page_size, "_forcePagination": "true"}


@dataclass
class JournalPage:
    """One answer of the Adobe I/O Events journal.

    :param events: the entries ``{"position", "event"}`` (empty when the journal had nothing newer: HTTP 204).
    :param last: the position of the last entry (the cursor to read on from); the one read from when empty.
    :param next_url: the ``Link: rel="next"`` URL (where the next page, or the next new events, will be).
    :param retry_after: on an empty answer, the seconds the journal asks to wait before asking again.
    """

    events: list[dict] = field(default_factory=list)
    last: str | None = None
    next_url: str | None = None
    retry_after: float | None = None
