"""Campaign Monitor API v3.3: connection, authentication and documented limits.

Endpoints the Campaign Monitor export uses: list details, custom fields (read, create, options), the subscriber
import, single add and delete, and the paged listings. Limits (``shared/API-FACTS.md`` section 2): 1,000
subscribers per import call ("You can only add 1000 subscribers in one call", error 209). Campaign Monitor
publishes no concurrency limit for its subscriber endpoints; it paces clients with ``X-RateLimit-*`` headers and
429 answers, which the session's rate limiter follows.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from urllib.parse import quote

from airflow_provider_segexport.hooks.base import SegexportBaseHook
from airflow_provider_segexport.http import (
    VendorAPIError,
    VendorAuthError,
    VendorSession,
    decode_json,
    encode_json,
)

#: subscribers per import call (error 209 above it)
IMPORT_MAX = 1000
#: the Customer Insights export's limit per export
MAX_PER_EXPORT = 1_000_000
#: import calls in flight by default: Campaign Monitor publishes no concurrency limit (it paces by rate-limit
#: headers), so a modest default; raise it with ``max_in_flight`` up to MAX_CONCURRENCY
DEFAULT_CONCURRENCY = 4
MAX_CONCURRENCY = 10
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

    # -- lists and custom fields ------------------------------------------------------------------
    def get_list(self, list_id: str) -> dict:
        """The list's details (``Title``, ``ConfirmedOptIn``...); an unknown list is an error saying what to check.

        :param list_id: the list's API ID.
        """
        try:
            return self.http.get_json(f"/lists/{list_id}.json")
        except VendorAPIError as exc:
            if exc.status in (400, 404) and str(exc.code) in ("101", "None"):
                raise VendorAPIError(self.vendor, exc.status, f"List '{list_id}' not found ({exc.message}). Check the "
                                     "list's API ID (List > Settings: 'API ID') and that the connection's API key "
                                     "belongs to its client.", code=exc.code, method="GET", path="/lists/{id}.json"
                                     ) from exc
            raise

    def custom_fields(self, list_id: str) -> list[dict]:
        """The list's custom fields: ``FieldName``, ``Key`` (``[Key]``), ``DataType``, ``FieldOptions``.

        :param list_id: the list's API ID.
        """
        return self.http.get_json(f"/lists/{list_id}/customfields.json") or []

    def create_custom_field(self, list_id: str, name: str, data_type: str, options: list[str] | None = None,
                            visible: bool = True) -> str:
        """Create a custom field; returns its key (``[Name]``).

        :param list_id: the list's API ID.
        :param name: the field's name.
        :param data_type: Text, Number, Date, MultiSelectOne, MultiSelectMany, Country or USState.
        :param options: the options of a multi-select field.
        :param visible: shown in the subscriber preference center.
        """
        body = {"FieldName": name, "DataType": data_type, "Options": list(options or []),
                "VisibleInPreferenceCenter": visible}
        return str(self.http.post_json(f"/lists/{list_id}/customfields.json", body))

    def update_custom_field_options(self, list_id: str, key: str, options: list[str], keep_existing: bool = True
                                    ) -> None:
        """Set a multi-select field's options (``PUT .../customfields/{key}/options.json``).

        :param list_id: the list's API ID.
        :param key: the field's key (``[Name]``).
        :param options: the options to set or add.
        :param keep_existing: add to the existing options instead of replacing them.
        """
        self.http.request("PUT", f"/lists/{list_id}/customfields/{quote(key, safe='')}/options.json",
                          data=encode_json({"Options": list(options), "KeepExistingOptions": keep_existing}),
                          headers={"Content-Type": "application/json"})

    # -- subscribers --------------------------------------------------------------------------------
    def import_subscribers(self, list_id: str, subscribers: list[bytes], *, resubscribe: bool = False,
                           queue_autoresponders: bool = False) -> dict:
        """``POST /subscribers/{list_id}/import.json``: the import result, also for a partial failure.

        Campaign Monitor answers a partial failure with HTTP 400 Code 210 and the result under ``ResultData``
        (the good subscribers are imported); that is returned like a success.

        :param list_id: the list's API ID.
        :param subscribers: at most 1,000 subscribers, each already JSON-encoded.
        :param resubscribe: re-add unsubscribed, deleted, bounced and suppressed addresses (the export: never).
        :param queue_autoresponders: queue subscription-based autoresponders for new subscribers.
        """
        if len(subscribers) > IMPORT_MAX:
            raise ValueError(f"at most {IMPORT_MAX} subscribers per import")
        flag = b"true" if queue_autoresponders else b"false"
        data = (b'{"Subscribers":[' + b",".join(subscribers) + b'],"Resubscribe":'
                + (b"true" if resubscribe else b"false") + b',"QueueSubscriptionBasedAutoresponders":' + flag
                + b',"RestartSubscriptionBasedAutoresponders":false}')
        # An import is an upsert per address: repeating it after a lost answer changes nothing more.
        response = self.http.request("POST", f"/subscribers/{list_id}/import.json", data=data, idempotent=True,
                                     expected=(400,), headers={"Content-Type": "application/json"})
        body = decode_json(response.content) if response.content else {}
        if response.status_code == 400:
            if isinstance(body, dict) and body.get("Code") == 210 and isinstance(body.get("ResultData"), dict):
                return body["ResultData"]
            message = body.get("Message") if isinstance(body, dict) else None
            raise VendorAPIError(self.vendor, 400, str(message or response.reason),
                                 code=body.get("Code") if isinstance(body, dict) else None, method="POST",
                                 path="/subscribers/{list_id}/import.json")
        return body or {}

    def add_subscriber(self, list_id: str, subscriber: dict, *, resubscribe: bool) -> None:
        """``POST /subscribers/{list_id}.json``: add or update one subscriber.

        :param list_id: the list's API ID.
        :param subscriber: ``EmailAddress``, ``Name``, ``CustomFields``, ``ConsentToTrack``.
        :param resubscribe: bring back a Deleted (or unsubscribed...) subscriber.
        """
        body = {**subscriber, "Resubscribe": resubscribe, "RestartSubscriptionBasedAutoresponders": False}
        self.http.request("POST", f"/subscribers/{list_id}.json", data=encode_json(body), idempotent=True,
                          headers={"Content-Type": "application/json"})

    def delete_subscriber(self, list_id: str, email: str) -> None:
        """Move a subscriber to the Deleted state (not unsubscribed: they may be added again).

        :param list_id: the list's API ID.
        :param email: the subscriber's address.
        """
        self.http.request("DELETE", f"/subscribers/{list_id}.json", params={"email": email}, expected=(400,))

    def get_subscriber(self, list_id: str, email: str) -> dict | None:
        """A subscriber's details (``State``, ``CustomFields``...), or None when not on the list.

        :param list_id: the list's API ID.
        :param email: the subscriber's address.
        """
        response = self.http.request("GET", f"/subscribers/{list_id}.json", params={"email": email},
                                     expected=(400, 404))
        return None if response.status_code in (400, 404) else decode_json(response.content)

    def subscribers(self, list_id: str, state: str = "active", page_size: int = 1000) -> Iterator[dict]:
        """Every subscriber of the list in a state (``active``, ``unsubscribed``, ``deleted``, ``bounced``), paged.

        :param list_id: the list's API ID.
        :param state: which listing.
        :param page_size: subscribers per page (10 to 1000).
        """
        page = 1
        while True:
            answer = self.http.get_json(f"/lists/{list_id}/{state}.json",
                                        params={"page": page, "pagesize": page_size, "orderfield": "email"})
            yield from answer.get("Results") or []
            if page >= int(answer.get("NumberOfPages") or 0):
                return
            page += 1

    def list_url(self, list_id: str) -> str:
        """The list in Campaign Monitor's web app (extra ``web_url`` overrides the app's address).

        :param list_id: the list's API ID.
        """
        base = str(self.extras.get("web_url") or "https://app.createsend.com").rstrip("/")
        return f"{base}/subscribers/listDetail.aspx?listID={list_id}"
