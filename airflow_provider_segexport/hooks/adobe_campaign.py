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
from functools import cached_property
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from airflow_provider_segexport.hooks.base import SegexportBaseHook
from airflow_provider_segexport.http import (
    RETRY_STATUSES,
    RequestBudget,
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
                                retry=RetryPolicy(statuses=RETRIED), budget=self.gateway_budget)

    @cached_property
    def gateway_budget(self) -> RequestBudget | None:
        """The request rate the calls are paced to: extras ``max_requests_per_window`` and ``window_seconds``
        (default 60). Adobe publishes no Campaign Standard rate: without them the gateway's 429s pace the calls
        (every thread waits, then goes on); with the rate agreed with Adobe (or seen in the 429s) no call is
        refused and the run keeps to it exactly."""
        raw = self.extras.get("max_requests_per_window")
        if raw in (None, ""):
            return None
        try:
            requests_, window = int(float(raw)), float(self.extras.get("window_seconds") or 60)
        except (TypeError, ValueError):
            requests_ = window = 0
        if requests_ <= 0 or window <= 0:
            raise ValueError(f"Connection '{self.conn_id}': extras 'max_requests_per_window' ({raw!r}) and "
                             "'window_seconds' must be positive numbers; leave them empty to be paced by the "
                             "gateway's 429s.")
        return RequestBudget(requests_, window)

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

    def find_all(self, resource: str, filter_name: str | None, params: dict[str, Any], page_size: int = 500
                 ) -> Iterator[dict]:
        """Every record a custom filter finds (every record of the resource without one), page by page
        (``next.href`` followed; ``_forcePagination`` so that big tables page too).

        :param resource: ``profile`` or a custom resource.
        :param filter_name: the filter defined in Campaign (``byModifiedSince``); None: no filter.
        :param params: the filter's parameters.
        :param page_size: records per page (``_lineCount``).
        """
        path = f"{EXT}/{resource}/{filter_name}" if filter_name else f"{EXT}/{resource}"
        answer = self.http.get_json(path, params=_page_params(params, page_size))
        while True:
            yield from (answer or {}).get("content") or []
            next_href = ((answer or {}).get("next") or {}).get("href")
            if not next_href or not (answer or {}).get("content"):
                return
            answer = self.http.get_json(next_href)

    def count(self, resource: str) -> int:
        """The number of records of ``resource`` (``.../_count``, Adobe's counting.md).

        :param resource: ``profile`` or a custom resource.
        """
        return int((self.http.get_json(f"{EXT}/{resource}/_count") or {}).get("count") or 0)

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

    # -- workflows (the log-file export of email events) ------------------------------------------------------
    def workflow(self, workflow_id: str) -> dict | None:
        """The workflow (``GET /workflow/execution/<workflowID>``: its ``state`` and its ``activities``, the
        External signal ones with their ``trigger.href``), or None when Campaign has no workflow with this ID.

        :param workflow_id: the workflow's ID as Campaign shows it (``WKF12``).
        """
        response = self.http.request("GET", f"/workflow/execution/{quote(str(workflow_id), safe='@')}",
                                     expected=(404,))
        return None if response.status_code == 404 else (response.json() or {})

    def workflow_command(self, workflow_id: str, method: str) -> dict:
        """Send an execution command (``POST …/commands {"method": ...}``: start, pause, resume, stop). Commands are
        asynchronous in Campaign: read :meth:`workflow` for the state they lead to.

        :param workflow_id: the workflow's ID.
        :param method: ``start``, ``pause``, ``resume`` or ``stop``.
        """
        method = str(method).lower()
        if method not in ("start", "pause", "resume", "stop"):
            raise ValueError(f"Unknown workflow command {method!r}: start, pause, resume or stop.")
        return self.http.post_json(f"/workflow/execution/{quote(str(workflow_id), safe='@')}/commands",
                                   {"method": method}) or {}

    def start_workflow(self, workflow_id: str) -> dict:
        """Start the workflow (``{"method": "start"}``).

        :param workflow_id: the workflow's ID.
        """
        return self.workflow_command(workflow_id, "start")

    @staticmethod
    def signal_activities(workflow: dict) -> dict[str, str]:
        """The workflow's External signal activities: name -> trigger URL (from a :meth:`workflow` answer)."""
        activities = ((workflow or {}).get("activities") or {}).get("activity") or {}
        out = {}
        for name, activity in activities.items():
            href = ((activity or {}).get("trigger") or {}).get("href") if isinstance(activity, dict) else None
            if href:
                out[name] = href
        return out

    def signal_workflow(self, workflow_id: str, parameters: dict[str, Any] | None = None, *,
                        source: str = "Airflow", activity: str | None = None) -> dict:
        """Trigger the workflow's External signal activity (its trigger URL, read from the workflow, gets
        ``{"source", "parameters"}``). The workflow must be started; Campaign accepts one trigger of an activity
        every 10 minutes, and answers a trigger within them with a text, not JSON: that raises here.

        :param workflow_id: the workflow's ID.
        :param parameters: the parameters declared in the activity (name -> string, number, boolean, date).
        :param source: the triggering request's source (mandatory for Campaign).
        :param activity: the activity's name when the workflow has several.
        """
        wf = self.workflow(workflow_id)
        if wf is None:
            raise VendorAPIError(self.vendor, 404, f"Campaign has no workflow '{workflow_id}'.")
        signals = self.signal_activities(wf)
        if activity is not None:
            url = signals.get(activity)
        else:
            url = next(iter(signals.values())) if len(signals) == 1 else None
        if not url:
            raise VendorAPIError(self.vendor, None, f"Workflow '{workflow_id}' has " + (
                f"no External signal activity '{activity}'" if activity else
                f"{len(signals)} External signal activities (name the one to trigger)" if signals else
                "no External signal activity") + f"; its signals: {sorted(signals) or 'none'}.")
        if urlsplit(url).netloc != urlsplit(self.base_url).netloc:  # never send the token elsewhere
            raise VendorAPIError(self.vendor, None, "the workflow's trigger URL points outside Campaign")
        body: dict[str, Any] = {"source": source}
        if parameters:
            body["parameters"] = parameters
        response = self.http.request("POST", url, data=encode_json(body),
                                     headers={"Content-Type": "application/json"})
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise SignalRefused(self.vendor, response.status_code, "Campaign did not take the signal (an External "
                                "signal activity takes one trigger every 10 minutes): " + response.text[:300])
        return answer


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


class SignalRefused(VendorAPIError):
    """Campaign answered a signal trigger without taking it (its text, not JSON: the activity was triggered less than
    10 minutes before)."""
