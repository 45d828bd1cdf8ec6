"""Dynamics 365 (Dataverse Web API v9.2) with Microsoft Entra ID client-credentials tokens (msal).

The hook gets a token (cached by msal, refreshed after a 401: a token expiring mid-export), tests the
connection with WhoAmI, and has the endpoints the Dynamics 365 Sales marketing-list export uses: contacts read
in bulk (``Microsoft.Dynamics.CRM.In``), static marketing lists (``lists``) found, read and created, members
added with ``AddListMembersList`` and removed by disassociating them. Limits: ``shared/API-FACTS.md`` section 3.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import quote

from airflow_provider_segexport.hooks.base import SegexportBaseHook
from airflow_provider_segexport.http import (
    CONCURRENCY_RULE,
    EXECUTION_RULE,
    REQUESTS_RULE,
    RequestBudget,
    VendorAPIError,
    VendorAuthError,
    VendorSession,
    encode_json,
)

API_PATH = "/api/data/v9.2"
#: Dataverse service protection: 52 concurrent requests per user
MAX_CONCURRENCY = 52
#: Dataverse service protection: 6,000 requests per user in a sliding window of 300 seconds
SERVICE_PROTECTION_REQUESTS = 6000
SERVICE_PROTECTION_WINDOW_S = 300.0
#: Dataverse service protection: 20 minutes of combined execution time per user in the same window
SERVICE_PROTECTION_EXECUTION_S = 1200.0
#: the error codes of Dataverse's service-protection 429 answers (hexadecimal as the Web API writes them, and
#: decimal) -> the rule each says was exceeded (api-limits: "Service protection API limit errors returned")
THROTTLE_CODES = {
    "0x80072322": REQUESTS_RULE, "-2147015902": REQUESTS_RULE,      # number of requests
    "0x80072321": EXECUTION_RULE, "-2147015903": EXECUTION_RULE,    # combined execution time
    "0x80072326": CONCURRENCY_RULE, "-2147015898": CONCURRENCY_RULE,  # concurrent requests
}
#: the connection extras that change the service-protection numbers (some environments have higher limits):
#: extra -> (what it is, type, Dataverse's published number)
SERVICE_PROTECTION_EXTRAS = {
    "max_requests_per_window": ("requests per window", int, SERVICE_PROTECTION_REQUESTS),
    "window_seconds": ("the window's length in seconds", float, SERVICE_PROTECTION_WINDOW_S),
    "max_execution_seconds_per_window": ("seconds of combined execution time per window", float,
                                         SERVICE_PROTECTION_EXECUTION_S),
    "max_concurrent_requests": ("concurrent requests", int, MAX_CONCURRENCY),
}
#: the Customer Insights export's limit: members per segment (marketing list)
MAX_PER_SEGMENT = 100_000
#: members per AddListMembersList call. The action documents no maximum; Microsoft's guidance for bulk
#: operations is 100 to 1,000 records a call (bulk-operations: "start around 100-1,000"), a call must finish
#: within the server's ~2-minute timeout, and each call's execution time counts against the 20 minutes per
#: 5 minutes of the service-protection budget: 1,000, the largest the guidance names.
ADD_MEMBERS_MAX = 1000
#: contact IDs per ``Microsoft.Dynamics.CRM.In`` query: ~45 URL characters each once encoded, well inside the
#: 32,768 characters a Dataverse URL may have
IN_FILTER_MAX = 250
#: rows per page (``Prefer: odata.maxpagesize``; 5,000 is Dataverse's maximum and default)
PAGE_MAX = 5000
#: calls in flight by default: a modest share of the 52 concurrent requests Dataverse allows a user
DEFAULT_CONCURRENCY = 4
#: list.createdfromcode of a list of contacts
MEMBER_TYPE_CONTACT = 2
#: requests per ``$batch``: "Batch requests can contain up to 1000 individual requests and can't contain other batch
#: requests" (MS webapi/execute-batch-operations-using-web-api, "When to use batch requests")
BATCH_MAX = 1000
#: characters left as they are in an alternate-key value inside a URL (the OData literal's quotes and the key syntax)
_KEY_SAFE = "'()=,"
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_ENTITY_ID = re.compile(r"\(([0-9a-fA-F-]{36})\)\s*$")


def is_guid(value: str) -> bool:
    """Whether ``value`` is a GUID as Dataverse writes them (8-4-4-4-12 hexadecimal digits)."""
    return bool(_GUID.match(value))


def odata_string(value: str) -> str:
    """An OData string literal: in single quotes, a single quote doubled."""
    return "'" + value.replace("'", "''") + "'"


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
    fields. Requests are paced to Dataverse's published service-protection limits (6,000 requests and 1,200 s of
    combined execution time per 300 s, 52 concurrent requests, per user), or the connection's own numbers
    (extras ``max_requests_per_window``, ``window_seconds``, ``max_execution_seconds_per_window``,
    ``max_concurrent_requests``); a 429 naming one of them lowers it for the rest of the export.

    :param conn_id: the Airflow connection's id.
    :param kwargs: as for :class:`~airflow_provider_segexport.hooks.base.SegexportBaseHook`.
    """

    conn_type = "dynamics365"
    default_conn_name = "dynamics365_default"
    hook_name = "Dynamics 365 (Dataverse)"
    vendor = "Dataverse"
    request_budget = RequestBudget(SERVICE_PROTECTION_REQUESTS, SERVICE_PROTECTION_WINDOW_S,
                                   SERVICE_PROTECTION_EXECUTION_S, MAX_CONCURRENCY)

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

    @cached_property
    def service_protection(self) -> RequestBudget:
        """The service-protection limits the requests are paced to: Dataverse's published numbers, or the
        connection's extras (see :data:`SERVICE_PROTECTION_EXTRAS`)."""
        values = {}
        for extra, (what, kind, default) in SERVICE_PROTECTION_EXTRAS.items():
            raw = self.extras.get(extra)
            if raw in (None, ""):
                values[extra] = default
                continue
            try:
                value = kind(float(raw)) if kind is int else kind(raw)
            except (TypeError, ValueError):
                value = 0
            if value <= 0:
                raise ValueError(f"Connection '{self.conn_id}': extra {extra!r} ({what}) must be a positive number, "
                                 f"not {raw!r}; leave it empty for Dataverse's published {default:g}.")
            values[extra] = value
        return RequestBudget(values["max_requests_per_window"], values["window_seconds"],
                             values["max_execution_seconds_per_window"], values["max_concurrent_requests"])

    def _build_session(self) -> VendorSession:
        used = threading.local()  # the token this thread's last request carried

        def auth() -> dict[str, str]:
            used.token = self._fetch_token()
            return {"Authorization": f"Bearer {used.token}", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}

        def refresh() -> bool:
            self._fetch_token(force=True, stale=getattr(used, "token", None))
            return True

        return self.new_session(self.base_url, auth=auth, on_unauthorized=refresh, budget=self.service_protection,
                                throttle_rules=THROTTLE_CODES)

    def pool_size(self) -> int:
        """Connections kept per host: the concurrency in use (16 when not given), at most the concurrent requests
        allowed (Dataverse's 52 unless the connection says otherwise)."""
        return min(self.concurrency or 16, self.service_protection.concurrent or MAX_CONCURRENCY)

    def _check_connection(self) -> str:
        who = self.http.get_json("/WhoAmI")
        return f"Connected to Dataverse as user {who.get('UserId')} (organization {who.get('OrganizationId')})"

    # -- reading in bulk ----------------------------------------------------------------------------
    def paged(self, path: str, params: dict[str, Any] | None = None, page_size: int = PAGE_MAX,
              formatted: bool = False) -> Iterator[dict]:
        """Every row of a query, page by page (``Prefer: odata.maxpagesize``, ``@odata.nextLink`` followed as given).

        :param path: the entity set or navigation path, e.g. ``contacts``.
        :param params: ``$select``, ``$filter``...
        :param page_size: rows per page (at most 5,000).
        :param formatted: also read the formatted values (``<attribute>@OData.Community.Display.V1.FormattedValue``:
            option-set labels, booleans and dates as the app shows them).
        """
        prefer = [f"odata.maxpagesize={min(page_size, PAGE_MAX)}"]
        if formatted:
            prefer.append('odata.include-annotations="OData.Community.Display.V1.FormattedValue"')
        headers = {"Prefer": ",".join(prefer)}
        page = self.http.get_json(path, params=params, headers=headers)
        while True:
            yield from page.get("value") or []
            next_link = page.get("@odata.nextLink")
            if not next_link:
                return
            if not next_link.startswith(self.base_url):  # never send the token elsewhere
                raise VendorAPIError(self.vendor, None, "the next page's link points outside the environment")
            page = self.http.get_json(next_link, headers=headers)

    def contacts_where_in(self, attribute: str, values: Iterable[str], select: str = "contactid,statecode"
                          ) -> Iterator[dict]:
        """The contacts whose ``attribute`` is one of ``values``, read with ``Microsoft.Dynamics.CRM.In`` in
        queries of :data:`IN_FILTER_MAX` values.

        :param attribute: a contact column, e.g. ``contactid`` or ``emailaddress1``.
        :param values: the values to look for.
        :param select: the columns to read.
        """
        yield from self.rows_where_in("contacts", attribute, values, select)

    # -- marketing lists ------------------------------------------------------------------------------
    _LIST_COLUMNS = "listid,listname,type,createdfromcode,statecode,lockstatus,membercount"

    def get_list(self, list_id: str) -> dict | None:
        """A marketing list's columns, or None when it no longer exists.

        :param list_id: the list's ID.
        """
        response = self.http.request("GET", f"lists({list_id})", params={"$select": self._LIST_COLUMNS},
                                     expected=(404,))
        return None if response.status_code == 404 else response.json()

    def find_lists(self, name: str) -> list[dict]:
        """The marketing lists named ``name`` (any type, active or not).

        :param name: the list's name.
        """
        return list(self.paged("lists", {"$select": self._LIST_COLUMNS,
                                         "$filter": f"listname eq {odata_string(name)}"}))

    def create_list(self, name: str, description: str = "") -> str:
        """Create a static marketing list of contacts; return its ID.

        :param name: the list's name (at most 128 characters).
        :param description: shown on the list.
        """
        body = {"listname": name, "createdfromcode": MEMBER_TYPE_CONTACT, "type": False, "description": description}
        response = self.http.request("POST", "lists", data=encode_json(body),
                                     headers={"Content-Type": "application/json"})
        found = _ENTITY_ID.search(response.headers.get("OData-EntityId", ""))
        if found:
            return found.group(1).lower()
        return str(response.json()["listid"]).lower()

    def list_member_ids(self, list_id: str) -> Iterator[str]:
        """The contact IDs on a marketing list (paged).

        :param list_id: the list's ID.
        """
        for row in self.paged(f"lists({list_id})/listcontact_association", {"$select": "contactid"}):
            yield str(row["contactid"]).lower()

    def add_list_members(self, list_id: str, contact_ids: list[str]) -> None:
        """``AddListMembersList``: add contacts to a static marketing list in one call.

        :param list_id: the list's ID.
        :param contact_ids: at most :data:`ADD_MEMBERS_MAX` contact IDs.
        """
        if len(contact_ids) > ADD_MEMBERS_MAX:
            raise ValueError(f"at most {ADD_MEMBERS_MAX} members per AddListMembersList")
        body = {"List": {"@odata.type": "Microsoft.Dynamics.CRM.list", "listid": list_id},
                "Members": [{"@odata.type": "Microsoft.Dynamics.CRM.contact", "contactid": c} for c in contact_ids]}
        # Adding a contact that is already a member changes nothing: repeating the call after a lost answer is safe.
        self.http.request("POST", "AddListMembersList", data=encode_json(body), idempotent=True,
                          headers={"Content-Type": "application/json"})

    def remove_list_member(self, list_id: str, contact_id: str) -> bool:
        """Take a contact off a marketing list (the N:N disassociation; the contact is not touched); False when
        it was not a member.

        :param list_id: the list's ID.
        :param contact_id: the contact's ID.
        """
        response = self.http.request("DELETE", f"lists({list_id})/listcontact_association({contact_id})/$ref",
                                     expected=(404,))
        return response.status_code != 404

    def list_url(self, list_id: str | None = None) -> str:
        """A marketing list in the Dynamics 365 web app (the lists view without an ID).

        :param list_id: the list's ID.
        """
        if list_id:
            return f"{self.environment_url}/main.aspx?pagetype=entityrecord&etn=list&id={list_id}"
        return f"{self.environment_url}/main.aspx?pagetype=entitylist&etn=list"

    def update_record(self, entity_set: str, record_id: str, body: dict[str, Any]) -> None:
        """PATCH an existing record (``If-Match: *``: update only, never create); only the columns given change.

        :param entity_set: e.g. ``contacts``.
        :param record_id: the record's ID.
        :param body: the columns to set.
        """
        self.http.request("PATCH", f"{entity_set}({record_id})", data=encode_json(body), idempotent=True,
                          headers={"Content-Type": "application/json", "If-Match": "*"})

    # -- bulk writes by alternate key (the email events sync) ---------------------------------------------------
    def rows_where_in(self, entity_set: str, attribute: str, values: Iterable[str], select: str) -> Iterator[dict]:
        """The rows of ``entity_set`` whose ``attribute`` is one of ``values`` (``Microsoft.Dynamics.CRM.In`` in
        queries of :data:`IN_FILTER_MAX` values), e.g. which event IDs are already there.

        :param entity_set: e.g. ``new_emailevents``.
        :param attribute: a column, e.g. ``new_eventid``.
        :param values: the values looked for.
        :param select: the columns to read.
        """
        values = list(values)
        for i in range(0, len(values), IN_FILTER_MAX):
            chunk = values[i: i + IN_FILTER_MAX]
            # PropertyValues is a JSON array: double-quoted values (a single quote inside one is then plain text)
            in_filter = (f"Microsoft.Dynamics.CRM.In(PropertyName={odata_string(attribute)},PropertyValues="
                         + json.dumps([str(v) for v in chunk], ensure_ascii=False, separators=(",", ":")) + ")")
            yield from self.paged(entity_set, {"$select": select, "$filter": in_filter})

    def upsert_multiple(self, entity_set: str, logical_name: str, targets: list[dict]) -> None:
        """``UpsertMultiple``: create or update records of one table in one call, each identified by its
        ``@odata.id`` (an alternate-key URL such as ``new_emailevents(new_eventid='...')``). Dataverse answers 204
        without saying which were created; a standard table rolls the whole call back on one error
        (bulk-operations: "Any error that occurs in a bulk operation with a standard table causes the entire
        operation to roll back"). Repeating the call after a lost answer changes nothing more: it is idempotent.

        :param entity_set: e.g. ``new_emailevents``.
        :param logical_name: the table's logical name (``new_emailevent``), for each target's ``@odata.type``.
        :param targets: the records (at most about 1,000: bulk-operations "1,000 records per request is a
            reasonable place to start").
        """
        body = {"Targets": [{"@odata.type": f"Microsoft.Dynamics.CRM.{logical_name}", **t} for t in targets]}
        self.http.request("POST", f"{entity_set}/Microsoft.Dynamics.CRM.UpsertMultiple", data=encode_json(body),
                          idempotent=True, headers={"Content-Type": "application/json"})

    def upsert_batch(self, entity_set: str, key_column: str, records: list[tuple[str, dict[str, Any]]]
                     ) -> list[BatchAnswer]:
        """Upsert records by an alternate key in one ``$batch``: one ``PATCH <set>(<key>='<value>')`` per record, no
        change set, ``Prefer: odata.continue-on-error``; return each request's answer, in the order of ``records``.

        The ``$batch`` fallback for a table without ``UpsertMultiple`` (MS bulk-operations, "Availability with
        standard tables": the bulk messages work with "custom standard tables and many common standard tables, but
        not all"). What the docs say, and this method relies on:

        * ``PATCH`` by alternate key without ``If-Match``/``If-None-Match`` is an upsert: it "creates a new record if
          it doesn't find any records matching the keys in the URL ... The status response is 204 No Content in
          either case" (``If-Match: *`` would make it update-only, ``If-None-Match: *`` create-only); the key is
          left out of the body ("When you use alternate keys to identify a record, don't include the alternate key
          data in the portion of the request that represents the data to save") -- MS
          https://learn.microsoft.com/power-apps/developer/data-platform/use-upsert-insert-update-record.
          Repeating the batch (a retry after a lost answer, a replayed journal) updates the same records: no
          duplicate, so the request may be repeated (``idempotent``).
        * ``$batch``: ``POST [Organization URI]/api/data/v9.2/$batch`` with ``Content-Type: multipart/mixed;
          boundary="batch_<id>"``, each part ``Content-Type: application/http`` + ``Content-Transfer-Encoding:
          binary`` holding one request; "Batch requests can contain up to 1000 individual requests"; operations run
          "sequentially in the order they're specified. The order of the responses will match the order of the
          requests". A change set would be all-or-nothing, so none is used: each record stands alone. Without
          ``Prefer: odata.continue-on-error`` the first failure ends the batch; with it "The batch request will
          return 200 OK and individual response errors will be returned in the batch response body" (``HTTP/1.1 400
          Bad Request`` + ``{"error": {"code", "message"}}`` in that request's part) -- MS
          https://learn.microsoft.com/power-apps/developer/data-platform/webapi/execute-batch-operations-using-web-api.
        * Service protection: a batch "can contain up to 1000 operations and will avoid the number of requests
          limit. However, you will need to be prepared for the execution time limit" (MS api-limits); this client
          counts the ``$batch`` as one request, the execution time as it takes.

        The body is written by hand (CRLF lines; each record's JSON is one line, so no line can look like the
        boundary) and the answer read with the stdlib ``email`` parser (:func:`parse_batch_answer`). A whole-batch
        error (throttling, 5xx, a lost connection) is retried by the session like any request; a batch whose answer
        does not have one part per request raises :class:`VendorAPIError`.

        :param entity_set: e.g. ``new_emailevents``.
        :param key_column: the alternate key's column, e.g. ``new_eventid``.
        :param records: (key value, the columns to write) for at most :data:`BATCH_MAX` records; the key column and
            ``@odata.*`` annotations other than ``@odata.bind`` are left out of the body.
        """
        if not records:
            return []
        if len(records) > BATCH_MAX:
            raise ValueError(f"at most {BATCH_MAX} requests per $batch")
        boundary = f"batch_{uuid.uuid4()}"
        chunks = []
        for key, body in records:
            url = self.http.url(f"{entity_set}({key_column}={quote(odata_string(str(key)), safe=_KEY_SAFE)})")
            columns = {k: v for k, v in body.items()
                       if k != key_column and (not k.startswith("@odata.") or k.endswith("@odata.bind"))}
            chunks.append(f"--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
                          f"PATCH {url} HTTP/1.1\r\nContent-Type: application/json\r\n\r\n"
                          f"{encode_json(columns).decode('utf-8')}\r\n")
        chunks.append(f"--{boundary}--\r\n")
        response = self.http.request("POST", "$batch", data="".join(chunks).encode("utf-8"), idempotent=True,
                                     headers={"Content-Type": f'multipart/mixed; boundary="{boundary}"',
                                              "Prefer": "odata.continue-on-error"})
        try:
            answers = parse_batch_answer(response.headers.get("Content-Type", ""), response.content)
        except ValueError as exc:
            raise VendorAPIError(self.vendor, response.status_code, f"unreadable $batch answer: {exc}",
                                 method="POST", path="$batch") from exc
        if len(answers) != len(records):
            raise VendorAPIError(self.vendor, response.status_code, f"the $batch answer has {len(answers)} part(s) "
                                 f"for {len(records)} request(s)", method="POST", path="$batch")
        return answers


@dataclass(frozen=True)
class BatchAnswer:
    """The answer to one request inside a ``$batch``.

    :param status: its HTTP status (``204`` for an upsert done).
    :param code: Dataverse's error code (``0x80044331``...) for an error.
    :param message: Dataverse's error message for an error.
    """

    status: int
    code: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        """Whether the request succeeded (2xx)."""
        return 200 <= self.status < 300


def parse_batch_answer(content_type: str, body: bytes) -> list[BatchAnswer]:
    """The answers of a ``$batch`` response (``multipart/mixed``; a change set's answers in line), in order, read
    with the stdlib ``email`` parser; ValueError when the body is not such an answer.

    :param content_type: the response's ``Content-Type`` (with its boundary).
    :param body: the response's body.
    """
    if not content_type.lower().startswith("multipart/"):
        raise ValueError(f"Content-Type {content_type or 'none'!r} is not multipart")
    head = b"MIME-Version: 1.0\r\nContent-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ValueError("no parts found for the boundary in Content-Type")
    out: list[BatchAnswer] = []

    def walk(container) -> None:
        for part in container.iter_parts():
            if part.is_multipart():  # a change set's answers
                walk(part)
            else:
                out.append(_http_answer(part.get_payload(decode=True) or b""))

    walk(message)
    return out


def _http_answer(raw: bytes) -> BatchAnswer:
    """One ``application/http`` part: ``HTTP/1.1 <status> <reason>``, headers, an optional JSON body."""
    status_line, _, rest = raw.lstrip(b"\r\n").partition(b"\n")
    bits = status_line.decode("latin-1").split(None, 2)
    if len(bits) < 2 or not bits[0].startswith("HTTP/") or not bits[1].isdigit():
        raise ValueError(f"a part does not start with an HTTP status line: {status_line[:60]!r}")
    status = int(bits[1])
    reason = bits[2].strip() if len(bits) > 2 else ""
    if 200 <= status < 300:
        return BatchAnswer(status)
    inner = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(rest)
    payload = inner.get_payload(decode=True) or b""
    try:
        error = json.loads(payload).get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict):
        error = {}
    code = error.get("code")
    return BatchAnswer(status, str(code) if code not in (None, "") else None,
                       str(error.get("message") or reason or f"HTTP {status}"))
