"""Adobe Campaign Standard REST + Adobe IMS + Adobe I/O Events journal emulator
(facts: ``shared/API-FACTS.md`` section 4).

IMS: ``POST /ims/token/v3`` (form ``grant_type=client_credentials``, ``client_id``, ``client_secret``,
``scope``; ``client_id`` may also be in the query) -> ``{"access_token", "token_type": "bearer",
"expires_in": <seconds>}``; tokens expire after ``sandbox.token_ttl`` seconds and there is no refresh
token. Errors ``{"error": "invalid_client" | "invalid_scope" | "unsupported_grant_type", "error_description"}``.

Campaign (``/adobe/<org>/campaign``): ``X-Api-Key`` (403 ``403000`` missing / ``403003`` not the client
id), ``Authorization: Bearer`` (401 ``{"error_code": "401013", "message": "Oauth token is not valid"}``),
the org in the URL must be the token's org (403 ``403023`` "Profile is not valid"); gateway throttling
429 ``{"error_code": "429050", "message": "Too many requests"}`` from a token bucket per API key. Injected
faults may be ``after`` ones (the call is processed, then its answer is lost: e.g. a profile created whose
201 never arrives); the profiles such calls carried are the request log's ``unanswered``.

- ``/profileAndServices/profile`` and ``/profileAndServicesExt/profile`` (the latter with the custom
  ``cus…`` fields of the resource extension; writing them through ``/profileAndServices`` is refused):
  ``POST`` -> 201 full profile with an opaque ``PKey`` and ``href``; ``GET /{PKey}``; ``PATCH /{PKey}``
  -> 200 ``{"PKey", "href"}``, only the given fields change, ``lastModified`` moves on every write
  [creating-profiles-api.md, updating-profiles.md]; ``DELETE /{PKey}`` -> 200;
  ``GET /profileAndServicesExt/profile/{customKey}`` (top-level profile only; a changed custom key ->
  500 ``RST-360012 Inconsistent operation``) [must-read.md "Custom keys", limitations.md error table];
  filters ``byEmail?email=`` (🟡 Adobe samples), ``byText?text=&filterType=email|firstName|lastName|<cus field
  declared searchable>``: case-sensitive, prefix only, without ``filterType`` email and last name only
  [retrieving-profiles.md "Searches are case-sensitive and performed on prefixes only"; filtering.md "the
  byText filter searchs into both the email and last name fields"]; custom filters declared in the schema
  (default ``byExternalId?externalId=`` and ``byCrmId?crmId=`` on ``cusCrmId``), Ext only, chainable
  (``/byA/byB``) - in ACS they exist only once the customer created them in the ACS interface [filtering.md
  "Custom filters"]; collections ``{"content", "count": {"href"}, "next": {"href"}, "serverSidePagination":
  true}`` with ``_lineCount`` (default 25), an opaque ``_lineStart`` cursor, above ``big_table_threshold``
  rows no ``next`` unless ``_forcePagination=true`` [pagination.md]; ``…/_count`` -> ``{"count": n}``
  [counting.md]; ``_order=field[ desc]`` only on sortable fields [sorting.md: "check the sortable parameter"
  - which standard fields are sortable is inferred: email, firstName, lastName, birthDate, created,
  lastModified; custom fields declared ``sortable``; refusal shape inferred; ``order_check=False`` lifts it];
  opt-out booleans ``blackList``, ``blackListEmail``, ``blackListFax``, ``blackListMobile``, ``blackListPhone``,
  ``blackListPostalMail``, ``blackListPushnotification``, ``ccpaOptOut``; metadata
  ``/profileAndServices/resourceType/profile`` and its ``filters`` (lists the declared filters) [filtering.md].
- custom resources (all sources: AdobeDocs/campaign-standard.en ``help/api/using/``): linked to the profile ->
  only under ``/profileAndServicesExt/<cusName>`` [custom-resources.md], not linked -> only under
  ``/customResources/<cusName>`` ("The custom resources that are available under /profileAndServicesExt are
  not exposed in the /customResources API" [interacting-with-custom-resources.md]); the other family answers
  404. ``GET`` collection (same paging/count/_order as profiles), ``GET|PATCH|DELETE /{PKey}``, ``POST`` -> 201
  the row, ``PATCH`` -> ``{"PKey", "href"}``, filters ``/<name>/by<Filter>?<param>=`` as declared (custom
  filters, created by the customer in ACS [filtering.md]). ``GET /profileAndServicesExt/`` lists the linked
  resources (``{"apiName": "resourceType", "<name>": {"data", "href", "name", "type": "collection", …}}``)
  [custom-resources.md]. The profile link is written ``"<link>": {"PKey": "<profile PKey>"}`` (the documented
  form for links: ``"orgUnit": {"PKey": …}`` [updating-profile-organizational-unit.md], ``"service": {"PKey":
  …}`` [perform-subscriptions.md]); a link given by other fields is ignored and stays null ("The link
  information is ignored … the link remains null" - AdobeDocs/experience-cloud.en
  ``help/campaign/api/limitations.md``, "POST with linked resources", the Campaign Standard behaviour);
  ``null`` clears it (inferred). Read back as ``{"PKey", "href", "email", "firstName", "lastName", "title"}``
  (shape of a linked profile in [retrieving-subscriptions.md]; the exact fields are inferred) or ``null``.
  A custom resource key can not be used in the URI (custom keys are for "top-level profile resources only"
  [must-read.md]): look rows up with a filter on their ID field. The ID field is unique (a unique index, as
  the customer would define it - inferred). When the profile is deleted its rows are kept with a null link
  (``on_profile_delete: keep``, inferred) or deleted (``cascade``: the link option "Deleting the target record
  implies deleting records referenced by the link", chosen per link under "Behavior if deleted/duplicated"
  [AdobeDocs/campaign-standard.en help/developing/using/configuring-the-resource-s-data-structure.md; the option
  name from the privacy-request page, help/start/using/privacy-requests.md, read in a translation]).
- errors (Campaign): ``{"code": <status>, "message": "RST-360011 An error has occurred - please contact your
  administrator. <detail>"}``. Invalid values are **500** in ACS, not 400 (limitations.md error table, "Campaign
  Standard" column: an invalid enumeration value -> "500 - RST-360011 … The value 'invalid' is not valid for
  the 'nms:recipient:gender' enumeration of the '@gender' field"); an unknown property -> 500 "'<f>' property
  is not valid for the 'profile' resource." (troubleshooting.md, a commented-out note: "500 … 'age' property is
  not valid for the 'profile' resource"); a too-long value -> 500 "PGS-220000 PostgreSQL error: ERROR:  value
  too long for type character varying(<n>)" (❓ inferred, modelled on the documented PGS-220000 duplicate-key
  message); a type mismatch -> 500 (inferred). ``validation_status`` (default 500) changes that status.
  A PKey that does not decrypt (URI or body) -> 500 "'<x>' attribute unknown (see definition of 'Profiles
  (nms:recipient)' schema). XTK-170036 Unable to parse expression '@id = @<x>'." (no RST prefix) and a
  duplicate key -> 500 "A '<label>' with the same key '<v>' already exists. PGS-220000 PostgreSQL error: ERROR:
  duplicate key value violates unique constraint …" [limitations.md]; a valid PKey of a deleted record -> 404
  "Unable to find document with path …" (wording from the raw-id rows of that table; inferred for PKeys).
- gateway: a URI outside the known roots (``/profileAndServices``, ``/profileAndServicesExt``,
  ``/customResources``, ``/history``, ``/workflow``, ``/mc``, ``/privacy``) or outside ``/<org>/campaign/`` ->
  500 ``{"code": 500, "message": "Oops. Something went wrong. Check your URI and try again."}``
  [troubleshooting.md] (after the key/token checks - inferred); an injected ``status`` fault of 502 still
  answers ``{"code": 502, …}``.
- ``/history/{PKey}/events``: the profile's journal events (shape ❓, see below).
- ``/workflow/execution/<workflowID>`` (GET), ``…/commands`` (start, pause, resume, stop) and the External
  signal trigger, with export workflows that write the journal's email events to CSV log files
  [controlling-a-workflow.md, triggering-a-signal-activity.md]: see the emulator's workflow section.

Schema (what the customer built in ACS) - seed keys next to ``profiles``, or ``POST
/_sandbox/adobe_campaign/schema`` with the same keys (added to the current schema until the next reset;
``GET`` returns it)::

    "profile_fields": {"cusCrmId": {"type": "string", "length": 36, "sortable": true, "searchable": true},
                       "cusScore": "int"},          # types: string (length, default 255), int, double,
                                                    # boolean, date, datetime; names start with "cus"
    "custom_key": "cusCustomerKey",                  # one of the profile fields
    "profile_filters": {"byCrmId": {"field": "cusCrmId", "param": "crmId"},
                        "byModifiedSince": {"field": "lastModified", "param": "since", "operator": ">="}},
    "custom_resources": {"cusLoyaltyCard": {"label": "Loyalty cards", "fields": {...}, "id_field": "cusCardId",
                         "link": "profile" | {"name": "profile", "on_profile_delete": "keep" | "cascade"},
                         "filters": {"byCardId": {"field": "cusCardId", "param": "cardId"},
                                     "byProfile": {"field": "profile", "param": "profile"}}}},
    "rows": {"cusLoyaltyCard": [{"cusCardId": "c1", "profile": {"externalId": "…"}}]}   # seed only

A filter is ``"<field>"`` (param = the field name, operator ``=``) or ``{"field", "param", "operator" (=, >=,
>, <=, <), "label"}``; a filter on the link field takes the profile's PKey. Defaults: profile fields
``cusCustomerKey`` (the custom key), ``cusSegment``, ``cusScore``, ``cusLastExport``, ``cusCrmId`` (string 36);
filters ``byExternalId``, ``byCrmId``; resources ``cusSegmentMembership`` (not linked, ``/customResources``) and
``cusLoyaltyCard`` (linked as ``profile``: ``cusCardId`` string 36 (ID field), ``cusCardNumber`` string 30,
``cusTier`` string 20 sortable, ``cusPoints`` int sortable, ``cusValidUntil`` date, ``cusUnlinked`` boolean;
filters ``byCardId?cardId=``, ``byProfile?profile=<PKey>``).

Adobe I/O Events journal (``events_url`` in the start-up JSON): ``GET`` with the same Bearer token and
``x-api-key``; query ``since=<position>``, ``limit=<n>`` and ``latest=true``; answers 200
``{"events": [{"position", "event"}], "_page": {"last", "count"}}`` with ``Link: <…?since=<last>>;
rel="next"`` (the documented way to page; the position is opaque), or 204 with ``Link`` and
``Retry-After`` when no newer event exists. Each ``event`` is a CloudEvents 1.0 envelope with type
``com.adobe.campaign.email.<sent|open|click|bounce>`` and ``data`` = ``{"eventType", "timestamp",
"profile": {"PKey", "email", "externalId"}, "deliveryName", "url" (click), "bounceType" (bounce)}``
(the real payload of the Campaign pipeline is not published - ❓). Generate events with
``POST /_sandbox/adobe_campaign/events`` ``{"events": [{"type": "open", "email": "a@x.com"}]}`` or
``{"count": n, "types": ["sent", "open"]}`` (spread over existing profiles), or ``generate_events()``.

Configurable (class attributes, ``seed["adobe_campaign"]["config"]`` or
``POST /_sandbox/adobe_campaign/config``; ``reset()`` restores them): ``rate_limit``/``rate_period``
(bucket, default 6000 per 60 s - ACS publishes no number), ``throttle_retry_after`` (seconds sent as
``Retry-After`` on 429; 0 = no header, the default because its presence is unverified),
``line_count_default`` (25), ``big_table_threshold`` (100000), ``unknown_fields`` (``reject`` or
``ignore``), ``validation_status`` (500), ``order_check`` (True), ``by_email_filter`` (True; False ->
``byEmail`` is 404 as on instances without it),
``allowed_scopes`` (comma-separated; ``*`` = any), ``journal_default_limit`` (100),
``journal_retry_after`` (10).

Seed: ``{"profiles": [{"email", "firstName", "lastName", "externalId", "blackListEmail": true,
"cusCustomerKey": "..."}], "config": {...}}`` plus the schema keys above. Sources in ``[…]`` are
AdobeDocs/campaign-standard.en ``help/api/using/<page>``; "limitations.md" is AdobeDocs/experience-cloud.en
``help/campaign/api/limitations.md`` (its "Error codes and messages" table lists the Campaign Standard answers).
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import hmac
import json
import math
import os
import struct
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from airflow_provider_segexport.sandbox.core import Emulator

BLACKLIST_FIELDS = ("blackList", "blackListEmail", "blackListFax", "blackListMobile", "blackListPhone",
                    "blackListPostalMail", "blackListPushnotification", "ccpaOptOut")
_FLAG = {name: 1 << i for i, name in enumerate(BLACKLIST_FIELDS)}
STANDARD_STRINGS = {"email": 128, "firstName": 30, "lastName": 50, "middleName": 30, "externalId": 100,
                    "mobilePhone": 32, "phone": 32, "preferredLanguage": 10}
STANDARD_OTHER = {"gender": ("unknown", "male", "female"), "birthDate": None, "title": None}
READ_ONLY = {"PKey", "href", "created", "lastModified", "subscriptions", "title"}
EVENT_TYPES = ("sent", "open", "click", "bounce")
_CONFIG = ("rate_limit", "rate_period", "throttle_retry_after", "line_count_default", "big_table_threshold",
           "unknown_fields", "by_email_filter", "allowed_scopes", "journal_default_limit", "journal_retry_after",
           "validation_status", "order_check", "signal_min_interval", "workflow_run_seconds")
FIELD_TYPES = ("string", "int", "double", "boolean", "date", "datetime")
#: standard profile fields ``_order`` accepts (inferred: ACS tells per field with "sortable" in the metadata)
SORTABLE_STANDARD = {"email", "firstName", "lastName", "birthDate", "created", "lastModified"}
FILTER_OPERATORS = ("=", ">=", ">", "<=", "<")
_OOPS = "Oops. Something went wrong. Check your URI and try again."
_ROOTS = {"profileAndServices", "profileAndServicesExt", "customResources", "history", "workflow", "mc", "privacy"}
_RST = "RST-360011 An error has occurred - please contact your administrator."


_STAMP_CACHE: list = [0, ""]


def _stamp() -> str:
    """ACS date format; one shared string per millisecond (a profile's created/lastModified share it)."""
    ms = int(time.time() * 1000)
    if _STAMP_CACHE[0] != ms:
        dt = datetime.fromtimestamp(ms / 1000, UTC)
        _STAMP_CACHE[0], _STAMP_CACHE[1] = ms, dt.strftime("%Y-%m-%d %H:%M:%S.") + f"{ms % 1000:03d}Z"
    return _STAMP_CACHE[1]


def _lower(value: str) -> str:
    low = value.lower()
    return value if low == value else low


def _intern(value):
    return sys.intern(value) if isinstance(value, str) and len(value) <= 40 else value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Profile:
    __slots__ = ("id", "email", "first", "last", "ext_id", "flags", "created", "modified", "extra")

    def __init__(self, pid: int, now: str) -> None:
        self.id = pid
        self.email = self.first = self.last = self.ext_id = None
        self.flags = 0
        self.created = self.modified = now
        self.extra: dict | None = None


class CampaignError(Exception):
    def __init__(self, status: int, detail: str, rst: bool = True) -> None:
        super().__init__(detail)
        self.status, self.detail, self.rst = status, detail, rst


class AdobeCampaignEmulator(Emulator):
    config_keys = _CONFIG
    name = "adobe_campaign"
    prefix = "/adobe"
    #: takes ``after`` faults: a call processed whose answer is lost (a create made, its 201 never received)
    after_faults = True

    rate_limit = 6000
    rate_period = 60.0
    throttle_retry_after = 0
    line_count_default = 25
    big_table_threshold = 100_000
    unknown_fields = "reject"
    by_email_filter = True
    allowed_scopes = "openid,AdobeID,campaign_sdk,additional_info.projectedProductContext,additional_info.roles," \
                     "read_organizations,session"
    journal_default_limit = 100
    journal_retry_after = 10

    validation_status = 500
    order_check = True
    #: seconds between two triggers of one External signal activity ("cannot be triggered more often than every 10
    #: minutes" [triggering-a-signal-activity.md]) and how long an export workflow's execution takes
    signal_min_interval = 600.0
    workflow_run_seconds = 0.2

    #: fields of the profile resource extension (only under /profileAndServicesExt) and the custom key
    #: (defaults; the seed's ``profile_fields`` / ``custom_key`` and ``POST /_sandbox/adobe_campaign/schema`` add more)
    default_profile_fields = {"cusCustomerKey": "string", "cusSegment": "string", "cusScore": "int",
                              "cusLastExport": "datetime", "cusCrmId": {"type": "string", "length": 36}}
    default_custom_key = "cusCustomerKey"
    #: custom filters the customer defined in ACS on the profile (only under /profileAndServicesExt)
    default_profile_filters = {"byExternalId": {"field": "externalId", "param": "externalId"},
                               "byCrmId": {"field": "cusCrmId", "param": "crmId"}}
    #: custom resources: linked to the profile (``link``) -> /profileAndServicesExt/<name>, else /customResources/<name>
    default_custom_resources = {
        "cusSegmentMembership": {"fields": {"cusSegmentId": "string", "cusEmail": "string", "cusExternalId": "string",
                                            "cusScore": "int", "cusUpdatedOn": "datetime"}},
        "cusLoyaltyCard": {"label": "Loyalty cards",
                           "fields": {"cusCardId": {"type": "string", "length": 36},
                                      "cusCardNumber": {"type": "string", "length": 30},
                                      "cusTier": {"type": "string", "length": 20, "sortable": True},
                                      "cusPoints": {"type": "int", "sortable": True},
                                      "cusValidUntil": "date", "cusUnlinked": "boolean"},
                           "id_field": "cusCardId", "link": "profile",
                           "filters": {"byCardId": {"field": "cusCardId", "param": "cardId"},
                                       "byProfile": {"field": "profile", "param": "profile"}}},
    }

    def __init__(self, sandbox) -> None:
        super().__init__(sandbox)
        self.client_id = sandbox.token()
        self.client_secret = "p8e-" + sandbox.token()
        self.org_id = "sbx" + sandbox.token()[:9]
        self.ims_org = sandbox.token()[:24].upper() + "@AdobeOrg"
        self.integration_id = str(sandbox.random.randint(10000, 99999))
        self.registration_id = str(uuid.UUID(sandbox.token()))
        self._mac_key = sandbox.token().encode()
        self._mask = int.from_bytes(hashlib.sha256(self._mac_key).digest()[:8], "big")  # PKeys look random
        self.tokens: dict[str, float] = {}
        self.reset()

    # -- setup ------------------------------------------------------------------------------
    def reset(self) -> None:
        seed = self.sandbox.seed.get("adobe_campaign", {})
        self.reset_config()
        self.buckets: dict[str, list[float]] = {}
        self.profiles: dict[int, Profile] = {}
        self.by_email: dict[str, Any] = {}
        self.next_id = 1
        self.ext_fields: dict[str, dict] = {}
        self.custom_key = self.default_custom_key
        self.profile_filters: dict[str, dict] = {}
        self.custom_resources: dict[str, dict] = {}
        self.rows: dict[str, dict[int, dict]] = {}
        self.row_keys: dict[str, dict[Any, int]] = {}
        self.next_resource_id = 1
        self.events: list[dict] = []
        self._reset_workflows(seed.get("workflows") or {})
        self.field_index: dict[str, dict[Any, list[int]]] = {}
        self.declare({"profile_fields": self.default_profile_fields, "profile_filters": self.default_profile_filters,
                      "custom_resources": self.default_custom_resources})
        self.declare({k: seed[k] for k in ("profile_fields", "custom_key", "profile_filters", "custom_resources")
                      if k in seed})
        now = _stamp()
        for p in seed.get("profiles", []):
            self._write(None, dict(p), ext=True, now=now)
        for name, rows in (seed.get("rows") or {}).items():
            for row in rows:
                self._seed_row(name, dict(row), now)

    # -- schema (what the customer built in ACS: resource extension, custom resources, custom filters) ----------
    def declare(self, schema: dict) -> dict:
        """Add profile extension fields, the custom key, custom filters and custom resources (seed keys
        ``profile_fields``, ``custom_key``, ``profile_filters``, ``custom_resources``, or
        ``POST /_sandbox/adobe_campaign/schema``). Returns the resulting schema."""
        if not isinstance(schema, dict):
            raise ValueError("the schema must be a JSON object")
        unknown = set(schema) - {"profile_fields", "custom_key", "profile_filters", "custom_resources"}
        if unknown:
            raise ValueError(f"unknown schema keys {sorted(unknown)}")
        fields = {n: _field_spec(n, f) for n, f in (schema.get("profile_fields") or {}).items()}
        clash = [n for n in fields if n in STANDARD_STRINGS or n in _FLAG or n in STANDARD_OTHER or n in READ_ONLY]
        if clash:
            raise ValueError(f"{clash} are standard profile fields")
        self.ext_fields.update(fields)
        if schema.get("custom_key"):
            if schema["custom_key"] not in self.ext_fields:
                raise ValueError("custom_key must be one of the profile_fields")
            self.custom_key = schema["custom_key"]
        for name, spec in (schema.get("profile_filters") or {}).items():
            f = _filter_spec(name, spec)
            if f["field"] not in self.ext_fields and f["field"] not in STANDARD_STRINGS \
                    and f["field"] not in ("created", "lastModified") and f["field"] not in _FLAG:
                raise ValueError(f"filter {name}: unknown profile field {f['field']!r}")
            self.profile_filters[name] = f
        for name, spec in (schema.get("custom_resources") or {}).items():
            if not name.startswith("cus") or name in ("profile", "resourceType"):
                raise ValueError(f"custom resource {name!r}: names start with 'cus'")
            if not isinstance(spec, dict) or not isinstance(spec.get("fields", {}), dict):
                raise ValueError(f"custom resource {name}: {{'fields': {{...}}, 'id_field', 'link', 'filters'}}")
            link = spec.get("link")
            if isinstance(link, str):
                link = {"name": link}
            if link is not None:
                if not isinstance(link, dict) or not link.get("name"):
                    raise ValueError(f"custom resource {name}: link is 'profile' or {{'name', 'on_profile_delete'}}")
                link = {"name": link["name"], "on_profile_delete": link.get("on_profile_delete", "keep")}
                if link["on_profile_delete"] not in ("keep", "cascade"):
                    raise ValueError(f"custom resource {name}: on_profile_delete is keep or cascade")
            res = {"label": spec.get("label", name), "link": link,
                   "fields": {n: _field_spec(n, f) for n, f in (spec.get("fields") or {}).items()},
                   "id_field": spec.get("id_field"), "filters": {}}
            if res["id_field"] and res["id_field"] not in res["fields"]:
                raise ValueError(f"custom resource {name}: id_field must be one of its fields")
            for fname, fspec in (spec.get("filters") or {}).items():
                f = _filter_spec(fname, fspec)
                if f["field"] not in res["fields"] and f["field"] not in ("created", "lastModified") \
                        and not (link and f["field"] == link["name"]):
                    raise ValueError(f"custom resource {name}, filter {fname}: unknown field {f['field']!r}")
                res["filters"][fname] = f
            self.custom_resources[name] = res
            self.rows.setdefault(name, {})
            self.row_keys[name] = {}
            if res["id_field"]:
                for rid, rec in self.rows[name].items():
                    if rec.get(res["id_field"]) is not None:
                        self.row_keys[name][rec[res["id_field"]]] = rid
        indexed = {f["field"] for f in self.profile_filters.values()
                   if f["operator"] == "=" and f["field"] not in ("email", "created", "lastModified")}
        indexed.add(self.custom_key)
        if indexed != set(self.field_index):
            self.field_index = {f: {} for f in indexed}
            for p in self.profiles.values():
                self._index_fields(p, True)
        return self.schema()

    def schema(self) -> dict:
        return {"profile_fields": self.ext_fields, "custom_key": self.custom_key,
                "profile_filters": self.profile_filters, "custom_resources": self.custom_resources}

    async def h_schema(self, request: Request) -> Response:
        """``GET|POST /_sandbox/adobe_campaign/schema``: read or extend what the customer declared in ACS."""
        try:
            return JSONResponse(self.declare(await request.json()) if request.method == "POST" else self.schema())
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    def _seed_row(self, name: str, row: dict, now: str) -> None:
        res = self.custom_resources.get(name)
        if res is None:
            raise ValueError(f"seed rows for undeclared custom resource {name!r}")
        link = res["link"]
        pid = None
        if link and isinstance(row.get(link["name"]), dict) and "PKey" not in row[link["name"]]:
            (field, value), = row.pop(link["name"]).items()       # seed only: {"email"|"externalId"|<cus field>: v}
            pid = next((p.id for p in self.profiles.values() if _profile_value(p, field) == value), None)
            if pid is None:
                raise ValueError(f"seed row of {name}: no profile with {field}={value!r}")
        rid = self._create_row(name, row, now)
        if pid is not None:
            self.rows[name][rid]["@link"] = pid

    def check_setting(self, key: str, value: Any) -> Any:
        if key == "unknown_fields" and value not in ("reject", "ignore"):
            raise ValueError("unknown_fields must be reject or ignore")
        if key == "allowed_scopes" and isinstance(value, list):
            return ",".join(value)
        return super().check_setting(key, value)

    def info(self, base: str) -> dict:
        return {"base_url": f"{base}{self.prefix}/{self.org_id}/campaign", "ims_url": f"{base}/ims/token/v3",
                "client_id": self.client_id, "client_secret": self.client_secret, "org_id": self.org_id,
                "ims_org_id": self.ims_org, "scope": self.allowed_scopes,
                "events_url": f"{base}/adobe-io-events/organizations/{self.ims_org}/integrations/"
                              f"{self.integration_id}/{self.registration_id}"}

    def state(self) -> dict:
        profiles = {}
        for p in self.profiles.values():
            key = p.email if p.email else self._pkey(p.id)
            profiles[key] = {"PKey": self._pkey(p.id), **self._fields(p, ext=True)}
        resources = {}
        for name, rows in self.rows.items():
            link = self.custom_resources[name]["link"]
            out = []
            for rid, rec in rows.items():
                row = {"PKey": self._pkey(rid, self._kind(name)), **{k: v for k, v in rec.items() if k != "@link"}}
                if link:
                    pid = rec.get("@link")
                    row[link["name"]] = self._pkey(pid) if pid is not None else None
                out.append(row)
            resources[name] = out
        return {"profiles": profiles, "count": len(self.profiles), "custom_resource": resources,
                "events": len(self.events)}

    # -- keys -------------------------------------------------------------------------------
    def _pkey(self, pid: int, kind: bytes = b"p") -> str:
        raw = struct.pack(">Q", pid ^ self._mask)
        mac = hmac.new(self._mac_key, kind + raw, hashlib.sha256).digest()[:18]
        return "@" + _b64(raw + mac)

    def _pid(self, pkey: str, kind: bytes = b"p") -> int | None:
        if not pkey.startswith("@"):
            return None
        try:
            data = _unb64(pkey[1:])
        except (ValueError, TypeError):
            return None
        if len(data) != 26:
            return None
        raw, mac = data[:8], data[8:]
        if not hmac.compare_digest(mac, hmac.new(self._mac_key, kind + raw, hashlib.sha256).digest()[:18]):
            return None
        return struct.unpack(">Q", raw)[0] ^ self._mask

    def _cursor(self, payload: dict) -> str:
        raw = json.dumps(payload, separators=(",", ":")).encode()
        return "@" + _b64(raw + hmac.new(self._mac_key, b"c" + raw, hashlib.sha256).digest()[:8])

    def _uncursor(self, token: str) -> dict:
        try:
            data = _unb64(token.lstrip("@"))
            raw, mac = data[:-8], data[-8:]
            if hmac.compare_digest(mac, hmac.new(self._mac_key, b"c" + raw, hashlib.sha256).digest()[:8]):
                return json.loads(raw)
        except (ValueError, TypeError):
            pass
        raise CampaignError(400, f"Invalid value for _lineStart: '{token}'.")

    # -- errors -----------------------------------------------------------------------------
    @staticmethod
    def gateway_error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error_code": code, "message": message}, status_code=status, headers=headers)

    @staticmethod
    def campaign_error(status: int, detail: str, rst: bool = True) -> JSONResponse:
        message = f"{_RST} {detail}".strip() if rst else detail
        return JSONResponse({"code": status, "message": message}, status_code=status)

    def _throttled(self) -> JSONResponse:
        headers = {"Retry-After": str(self.throttle_retry_after)} if self.throttle_retry_after else None
        return self.gateway_error(429, "429050", "Too many requests", headers)

    def error_response(self, status: int, kind: str, headers: dict | None = None) -> Response:
        if status == 429:
            return self._throttled()
        if status == 502:
            return JSONResponse({"code": 502, "message": "Oops. Something went wrong. Check your URI and try again."},
                                status_code=502)
        messages = {500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout"}
        return self.gateway_error(status, f"{status}000", messages.get(status, "Error"), headers)

    # -- IMS ----------------------------------------------------------------------------------
    async def h_ims(self, request: Request) -> Response:
        request.state.arrived = asyncio.get_running_loop().time()  # the latency model counts from here
        fault = await self.before(request, "ims-token")
        if fault is not None:
            return fault
        return await self.after(request, await self._ims(request))

    async def _ims(self, request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
        for k, v in request.query_params.items():
            form.setdefault(k, v)
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type",
                                 "error_description": "unsupported grant_type parameter"}, status_code=400)
        if not form.get("client_id") or form["client_id"] != self.client_id:
            return JSONResponse({"error": "invalid_client", "error_description": "invalid client_id parameter"},
                                status_code=400)
        if form.get("client_secret") != self.client_secret:
            return JSONResponse({"error": "invalid_client", "error_description": "invalid client_secret parameter"},
                                status_code=401)
        scopes = [s.strip() for s in form.get("scope", "").replace(" ", ",").split(",") if s.strip()]
        allowed = {s.strip() for s in self.allowed_scopes.split(",")}
        bad = [s for s in scopes if s not in allowed] if "*" not in allowed else []
        if bad:
            return JSONResponse({"error": "invalid_scope", "error_description": f"Invalid scope(s): {','.join(bad)}"},
                                status_code=400)
        ttl = int(self.sandbox.token_ttl)
        now = time.time()
        header = _b64(json.dumps({"alg": "RS256", "x5u": "ims_na1-key-at-1.cer", "kid": "ims_na1-key-at-1",
                                  "itt": "at"}).encode())
        payload = _b64(json.dumps({
            "id": str(uuid.uuid4()), "type": "access_token", "client_id": self.client_id, "user_id":
            f"{self.client_id}@techacct.adobe.com", "as": "ims-na1", "aa_id": f"{self.client_id}@techacct.adobe.com",
            "ctp": 0, "org": self.ims_org, "scope": ",".join(scopes), "created_at": str(int(now * 1000)),
            "expires_in": str(ttl * 1000),
        }).encode())
        token = f"{header}.{payload}.{_b64(uuid.uuid4().bytes * 2)}"
        if len(self.tokens) > 1000:
            self.tokens = {t: e for t, e in self.tokens.items() if e > now}
        self.tokens[token] = now + ttl
        return JSONResponse({"access_token": token, "token_type": "bearer", "expires_in": ttl})

    # -- gateway checks -------------------------------------------------------------------------
    def _gateway(self, request: Request, org: str | None) -> Response | None:
        api_key = request.headers.get("x-api-key")
        if not api_key:
            return self.gateway_error(403, "403000", "Api Key is required")
        if api_key != self.client_id:
            return self.gateway_error(403, "403003", "Api Key is invalid")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expiry = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if expiry is None or expiry <= time.time():
            return self.gateway_error(401, "401013", "Oauth token is not valid")
        if org is not None and org != self.org_id:
            return self.gateway_error(403, "403023", "Profile is not valid")
        if not self._take_token(api_key):
            return self._throttled()
        return None

    def _take_token(self, key: str) -> bool:
        now = time.monotonic()
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = [float(self.rate_limit), now]
        rate = self.rate_limit / self.rate_period if self.rate_period > 0 else math.inf
        bucket[0] = min(float(self.rate_limit), bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if bucket[0] < 1:
            return False
        bucket[0] -= 1
        return True

    # -- routing ----------------------------------------------------------------------------
    def routes(self) -> list:
        return [
            Route("/ims/token/v3", self.h_ims, methods=["POST"]),
            Route(self.prefix + "/{org}/campaign/{rest:path}", self.h_campaign,
                  methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
            Route("/adobe-io-events/organizations/{ims_org}/integrations/{integration}/{registration}",
                  self.h_journal),
            Route("/_sandbox/adobe_campaign/events", self.h_generate, methods=["POST"]),
            Route("/_sandbox/adobe_campaign/config", self.h_config, methods=["GET", "POST"]),
            Route("/_sandbox/adobe_campaign/schema", self.h_schema, methods=["GET", "POST"]),
            Route("/_sandbox/adobe_campaign/workflows", self.h_workflows, methods=["GET", "POST"]),
            Route(self.prefix + "/{rest:path}", self.h_wrong_uri, methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
        ]

    async def h_campaign(self, request: Request) -> Response:
        rest = request.path_params["rest"]
        method = request.method
        segs = [s for s in rest.split("/") if s]
        route = "/".join("{PKey}" if s.startswith("@") else s for s in segs)
        request.state.arrived = asyncio.get_running_loop().time()  # the latency model counts from here
        fault = await self.before(request, route, items=1 if method in ("POST", "PATCH", "DELETE") else 0)
        if fault is not None:
            return fault
        # an injected "after" fault loses the answer once the call is processed
        return await self.after(request, await self._campaign(request, method, segs))

    async def _campaign(self, request: Request, method: str, segs: list[str]) -> Response:
        denied = self._gateway(request, request.path_params["org"])
        if denied is not None:
            return denied
        body = None
        if method in ("POST", "PATCH", "PUT"):
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                return self.campaign_error(400, "The request body is not valid JSON.")
        base = f"{request.url.scheme}://{request.url.netloc}{self.prefix}/{self.org_id}/campaign"
        try:
            return self.dispatch(method, segs, dict(request.query_params), body, base)
        except CampaignError as exc:
            return self.campaign_error(exc.status, exc.detail, exc.rst)

    async def h_wrong_uri(self, request: Request) -> Response:
        """Anything under the gateway that is not ``/<org>/campaign/...``: the adobe.io answer to a wrong URI
        [ACS troubleshooting.md] (after the key/token checks - inferred)."""
        denied = self._gateway(request, None)
        if denied is not None:
            return denied
        return JSONResponse({"code": 500, "message": _OOPS}, status_code=500)

    def dispatch(self, method: str, segs: list[str], q: dict, body, base: str) -> Response:
        if not segs or segs[0] not in _ROOTS:
            return JSONResponse({"code": 500, "message": _OOPS}, status_code=500)
        if segs == ["profileAndServicesExt"] and method == "GET":
            return self.ext_root(base)
        if len(segs) >= 2 and segs[0] in ("profileAndServices", "profileAndServicesExt"):
            ext = segs[0] == "profileAndServicesExt"
            if segs[1] == "profile":
                return self.profiles_endpoint(method, segs[2:], q, body, base, ext)
            if segs[1] == "resourceType" and len(segs) >= 3:
                return self.resource_type(segs[2:], base, ext)
            res = self.custom_resources.get(segs[1])
            if ext and res is not None and res["link"]:
                return self.custom_resource_endpoint(segs[1], method, segs[2:], q, body, base)
        if len(segs) >= 2 and segs[0] == "customResources":
            res = self.custom_resources.get(segs[1])
            if res is not None and not res["link"]:
                return self.custom_resource_endpoint(segs[1], method, segs[2:], q, body, base)
        if len(segs) == 3 and segs[0] == "history" and segs[2] == "events" and method == "GET":
            return self.history(segs[1], base)
        if len(segs) >= 3 and segs[:2] == ["workflow", "execution"]:
            return self.workflow_endpoint(method, segs[2:], body, base)
        raise CampaignError(404, f"The resource '/{'/'.join(segs)}' does not exist.")

    def ext_root(self, base: str) -> Response:
        """``GET /profileAndServicesExt/``: the resources linked to the profile [ACS custom-resources.md]."""
        out: dict[str, Any] = {"apiName": "resourceType"}
        for name, res in [("profile", {"label": "Profiles"})] + [
                (n, r) for n, r in self.custom_resources.items() if r["link"]]:
            out[name] = {"content": f"{base}/profileAndServicesExt/{name}/", "data": f"/profileAndServicesExt/{name}/",
                         "help": res["label"], "href": f"{base}/profileAndServicesExt/{name}/metadata",
                         "name": name, "type": "collection"}
        return JSONResponse(out)

    # -- validation ---------------------------------------------------------------------------
    def _invalid(self, detail: str) -> CampaignError:
        return CampaignError(self.validation_status, detail)

    def _bad_pkey(self, key: str, label: str = "Profiles (nms:recipient)") -> CampaignError:
        """An undecryptable PKey (URI or body) [experience-cloud.en help/campaign/api/limitations.md, ACS column]."""
        raw = key.lstrip("@")
        return CampaignError(500, f"'{raw}' attribute unknown (see definition of '{label}' schema). XTK-170036 "
                                  f"Unable to parse expression '@id = @{raw}'.", rst=False)

    def _typed(self, name: str, spec: dict, v, resource: str):
        if v is None:
            return None
        kind = spec["type"]
        if kind == "string":
            if not isinstance(v, str):
                raise self._invalid(f"Value '{v}' of field '{name}' is not a string.")
            if len(v) > spec["length"]:
                raise self._invalid(f"PGS-220000 PostgreSQL error: ERROR:  value too long for type character "
                                    f"varying({spec['length']}) (field '@{name}' of resource '{resource}').")
            return v
        if kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise self._invalid(f"Value '{v}' of field '{name}' is not an integer.")
            return v
        if kind == "double":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise self._invalid(f"Value '{v}' of field '{name}' is not a number.")
            return v
        if kind == "boolean":
            if not isinstance(v, bool):
                raise self._invalid(f"Value '{v}' of field '{name}' is not a boolean.")
            return v
        try:
            if kind == "date":
                return datetime.strptime(str(v)[:10], "%Y-%m-%d").strftime("%Y-%m-%d")
            datetime.fromisoformat(str(v).replace("Z", "+00:00").replace(" ", "T"))
        except ValueError as exc:
            raise self._invalid(f"Value '{v}' of field '{name}' is not a valid date.") from exc
        return str(v)

    # -- profiles -----------------------------------------------------------------------------
    def _fields(self, p: Profile, ext: bool) -> dict:
        out = {"email": p.email or "", "firstName": p.first or "", "lastName": p.last or "",
               "externalId": p.ext_id or ""}
        for name, bit in _FLAG.items():
            out[name] = bool(p.flags & bit)
        for k, v in (p.extra or {}).items():
            if k in self.ext_fields and not ext:
                continue
            out[k] = v
        if ext:
            for k, spec in self.ext_fields.items():
                out.setdefault(k, _empty(spec))
        out["created"] = p.created
        out["lastModified"] = p.modified
        return out

    def _profile_json(self, p: Profile, base: str, ext: bool) -> dict:
        root = "profileAndServicesExt" if ext else "profileAndServices"
        pkey = self._pkey(p.id)
        href = f"{base}/{root}/profile/{pkey}"
        return {"PKey": pkey, "href": href, **self._fields(p, ext), "gender": (p.extra or {}).get("gender", "unknown"),
                "subscriptions": {"href": f"{href}/subscriptions/"}, "title": p.email or ""}

    def _index(self, p: Profile, add: bool) -> None:
        if p.email:
            key = _lower(p.email)
            cur = self.by_email.get(key)
            if add:
                self.by_email[key] = p.id if cur is None else ((cur if isinstance(cur, tuple) else (cur,)) + (p.id,))
            elif cur == p.id:
                del self.by_email[key]
            elif isinstance(cur, tuple):
                rest = tuple(i for i in cur if i != p.id)
                self.by_email[key] = rest[0] if len(rest) == 1 else rest
        self._index_fields(p, add)

    def _index_fields(self, p: Profile, add: bool) -> None:
        for field, index in self.field_index.items():
            value = _profile_value(p, field)
            if value is None or value == "":
                continue
            ids = index.get(value)
            if add:
                if ids is None:
                    index[value] = [p.id]
                else:
                    ids.append(p.id)
            elif ids is not None and p.id in ids:
                ids.remove(p.id)
                if not ids:
                    del index[value]

    def _clean(self, body, ext: bool, creating: bool) -> dict:
        if not isinstance(body, dict):
            raise CampaignError(400, "The request body must be a JSON object.")
        data: dict[str, Any] = {}
        for k, v in body.items():
            if k in READ_ONLY:
                continue
            if k in STANDARD_STRINGS:
                if v is not None and not isinstance(v, str):
                    raise self._invalid(f"Value '{v}' of field '{k}' is not a string.")
                if v and len(v) > STANDARD_STRINGS[k]:
                    raise self._invalid(f"PGS-220000 PostgreSQL error: ERROR:  value too long for type character "
                                        f"varying({STANDARD_STRINGS[k]}) (field '@{k}' of resource 'profile').")
                data[k] = v or None
            elif k in _FLAG:
                if not isinstance(v, bool):
                    raise self._invalid(f"Value '{v}' of field '{k}' is not a boolean.")
                data[k] = v
            elif k in STANDARD_OTHER:
                choices = STANDARD_OTHER[k]
                if choices and v not in choices:
                    raise self._invalid(f"The value '{v}' is not valid for the 'nms:recipient:{k}' enumeration of "
                                        f"the '@{k}' field")
                data[k] = v
            elif k in self.ext_fields and ext:
                data[k] = self._typed(k, self.ext_fields[k], v, "profile")
            elif self.unknown_fields == "reject":
                raise self._invalid(f"'{k}' property is not valid for the 'profile' resource.")
        return data

    def _write(self, p: Profile | None, data: dict, ext: bool, now: str) -> Profile:
        data = self._clean(data, ext, creating=p is None)
        ck = data.get(self.custom_key)
        if p is not None and self.custom_key in data and ck != (p.extra or {}).get(self.custom_key) \
                and (p.extra or {}).get(self.custom_key):
            raise CampaignError(500, f"RST-360012 Inconsistent operation on resource 'profile' - Cannot update key "
                                     f"'{(p.extra or {}).get(self.custom_key)}' to '{ck}'.")
        if ck and any(i != (p.id if p else None) for i in self.field_index[self.custom_key].get(ck, ())):
            raise CampaignError(500, f"A 'Profiles' with the same key '{ck}' already exists. PGS-220000 PostgreSQL "
                                     f"error: ERROR:  duplicate key value violates unique constraint "
                                     f"\"nmsrecipient_{self.custom_key.lower()}\"", rst=False)
        if p is None:
            p = Profile(self.next_id, now)
            self.next_id += 1
            self.profiles[p.id] = p
        else:
            self._index(p, False)
            p.modified = now
        for k, v in data.items():
            if k == "email":
                p.email = v
            elif k == "firstName":
                p.first = _intern(v)
            elif k == "lastName":
                p.last = _intern(v)
            elif k == "externalId":
                p.ext_id = v
            elif k in _FLAG:
                p.flags = (p.flags | _FLAG[k]) if v else (p.flags & ~_FLAG[k])
            else:
                if p.extra is None:
                    p.extra = {}
                p.extra[k] = v
        self._index(p, True)
        return p

    def _filter_ids(self, filters: list[str], q: dict, ext: bool) -> list[int] | None:
        """The ids matching a chain of filters (None = no filter)."""
        result: list[int] | None = None
        for f in filters:
            if f == "byEmail":
                if not self.by_email_filter:
                    raise CampaignError(404, "The filter 'byEmail' does not exist on resource 'profile'.")
                email = q.get("email")
                if email is None:
                    raise CampaignError(400, "The parameter 'email' of filter 'byEmail' is mandatory.")
                hit = self.by_email.get(email.strip().lower())
                ids = [] if hit is None else list(hit) if isinstance(hit, tuple) else [hit]
            elif f == "byText":
                # case-sensitive prefix; without filterType: email and last name [retrieving-profiles.md, filtering.md]
                text = q.get("text") or ""
                ftype = q.get("filterType")
                attrs = {"email": "email", "firstName": "firstName", "lastName": "lastName"}
                if ext:
                    attrs.update({n: n for n, spec in self.ext_fields.items() if spec.get("searchable")})
                if ftype and ftype not in attrs:
                    raise self._invalid(f"Invalid value '{ftype}' for parameter 'filterType'.")
                wanted = [attrs[ftype]] if ftype else ["email", "lastName"]
                pool = result if result is not None else list(self.profiles)
                ids = [i for i in pool if any(str(_profile_value(self.profiles[i], a) or "").startswith(text)
                                              for a in wanted)]
            elif f in self.profile_filters and ext:
                spec = self.profile_filters[f]
                value = q.get(spec["param"])
                if value is None:
                    raise CampaignError(400, f"The parameter '{spec['param']}' of filter '{f}' is mandatory.")
                value = self._param_value(value, spec, self.ext_fields.get(spec["field"]))
                index = self.field_index.get(spec["field"])
                if index is not None:
                    ids = list(index.get(value, ()))
                else:
                    pool = result if result is not None else list(self.profiles)
                    ids = [i for i in pool if _compare(_profile_value(self.profiles[i], spec["field"]),
                                                       spec["operator"], value)]
            else:
                raise CampaignError(404, f"The filter '{f}' does not exist on resource 'profile'.")
            if result is None:
                result = ids
            else:
                keep = set(ids)
                result = [i for i in result if i in keep]
        if result is not None:
            result.sort()
        return result

    def _param_value(self, value: str, spec: dict, field: dict | None):
        kind = (field or {}).get("type", "string")
        if spec["field"] in ("created", "lastModified"):
            return value.replace("T", " ")
        try:
            if kind == "int":
                return int(value)
            if kind == "double":
                return float(value)
        except ValueError as exc:
            raise self._invalid(f"Invalid value '{value}' for parameter '{spec['param']}'.") from exc
        if kind == "boolean":
            return value.strip().lower() in ("true", "1")
        return value

    def _find_profile(self, key: str, ext: bool) -> Profile:
        if key.startswith("@"):
            pid = self._pid(key)
            if pid is None:
                raise self._bad_pkey(key)
        elif ext:
            ids = self.field_index[self.custom_key].get(key)
            pid = ids[0] if ids else None
        else:
            raise self._bad_pkey(key)
        p = self.profiles.get(pid) if pid is not None else None
        if p is None:
            raise CampaignError(404, f"Unable to find document with path 'Profiles' from key '{key}' (document with "
                                     f"schema 'profile').")
        return p

    def profiles_endpoint(self, method: str, segs: list[str], q: dict, body, base: str, ext: bool) -> Response:
        root = f"{base}/{'profileAndServicesExt' if ext else 'profileAndServices'}/profile"
        now = _stamp()
        if not segs or all(s.startswith("by") or s == "_count" for s in segs):
            count_only = bool(segs) and segs[-1] == "_count"
            filters = [s for s in segs if s != "_count"]
            if method == "POST" and not segs:
                p = self._write(None, body, ext, now)
                self.sandbox.log.members(self.name, [p.email.lower() if p.email else self._pkey(p.id)])
                return JSONResponse(self._profile_json(p, base, ext), status_code=201)
            if method != "GET":
                raise CampaignError(405, f"Method {method} is not allowed on this resource.")
            ids = self._filter_ids(filters, q, ext)
            if count_only:
                return JSONResponse({"count": len(self.profiles) if ids is None else len(ids)})
            return self._collection(ids, q, f"{root}{''.join('/' + f for f in filters)}",
                                    lambda _i, p: self._profile_json(p, base, ext), self.profiles, self.next_id,
                                    self._profile_sortable(ext))
        if len(segs) > 1:
            if len(segs) == 2 and segs[1] == "subscriptions" and method == "GET":
                self._find_profile(segs[0], ext)
                return JSONResponse({"content": [], "serverSidePagination": True})
            raise CampaignError(404, f"The resource '{'/'.join(segs)}' does not exist.")
        p = self._find_profile(segs[0], ext)
        if method == "GET":
            return JSONResponse(self._profile_json(p, base, ext))
        log_key = p.email.lower() if p.email else self._pkey(p.id)
        if method == "PATCH":
            self._write(p, body, ext, now)
            self.sandbox.log.members(self.name, [p.email.lower() if p.email else log_key])
            return JSONResponse({"PKey": self._pkey(p.id), "href": f"{root}/{self._pkey(p.id)}"})
        if method == "DELETE":
            self._index(p, False)
            del self.profiles[p.id]
            self._profile_deleted(p.id)
            self.sandbox.log.members(self.name, [log_key])
            return Response(b"", status_code=200, media_type="application/json")
        raise CampaignError(405, f"Method {method} is not allowed on this resource.")

    def _profile_deleted(self, pid: int) -> None:
        """Rows linked to a deleted profile: deleted with the option "Deleting the target record implies deleting
        records referenced by the link" (``on_profile_delete: cascade``), else kept with an empty link (inferred)."""
        for name, res in self.custom_resources.items():
            if not res["link"]:
                continue
            rows = self.rows[name]
            for rid in [r for r, rec in rows.items() if rec.get("@link") == pid]:
                if res["link"]["on_profile_delete"] == "cascade":
                    self._drop_row(name, rid)
                else:
                    rows[rid]["@link"] = None

    def _profile_sortable(self, ext: bool) -> set[str]:
        out = set(SORTABLE_STANDARD)
        if ext:
            out.update(n for n, spec in self.ext_fields.items() if spec.get("sortable"))
        return out

    def _collection(self, ids: list[int] | None, q: dict, href: str, render, store: dict, next_id: int,
                    sortable: set[str]) -> Response:
        try:
            count = int(q.get("_lineCount", self.line_count_default))
        except ValueError as exc:
            raise CampaignError(400, f"Invalid value for _lineCount: '{q.get('_lineCount')}'.") from exc
        if count < 1:
            raise CampaignError(400, f"Invalid value for _lineCount: '{count}'.")
        cursor = self._uncursor(q["_lineStart"]) if q.get("_lineStart") else {}
        order = q.get("_order")
        rows = []
        more = False
        if order:
            field, _, direction = order.partition(" ")
            if self.order_check and field not in sortable:
                raise self._invalid(f"The field '{field}' cannot be used to sort (it is not 'sortable').")
            pool = [(i, store[i]) for i in (ids if ids is not None else store)]
            pool.sort(key=lambda ir: _order_key(ir[1], field), reverse=direction.strip().lower() == "desc")
            offset = cursor.get("o", 0)
            rows = pool[offset: offset + count]
            more = offset + count < len(pool)
            next_cursor = {"o": offset + count}
        else:
            last = cursor.get("i", 0)
            if ids is not None:
                source = (i for i in ids if i > last)
            else:
                source = (i for i in range(last + 1, next_id) if i in store)
            for i in source:
                if len(rows) == count:
                    more = True
                    break
                rows.append((i, store[i]))
                last = i
            next_cursor = {"i": last}
        params = {k: v for k, v in q.items() if k not in ("_lineStart",)}
        params["_lineCount"] = str(count)
        out: dict[str, Any] = {"content": [render(i, r) for i, r in rows]}
        count_params = dict(params)
        if q.get("_lineStart"):
            count_params["_lineStart"] = q["_lineStart"]
        out["count"] = {"href": f"{href}/_count?{urlencode(count_params, quote_via=quote)}"}
        big = len(store) > self.big_table_threshold and str(q.get("_forcePagination", "")).lower() != "true"
        if more and not big:
            params["_lineStart"] = self._cursor(next_cursor)
            out["next"] = {"href": f"{href}?{urlencode(params, quote_via=quote)}"}
        out["serverSidePagination"] = True
        return JSONResponse(out)

    def resource_type(self, segs: list[str], base: str, ext: bool) -> Response:
        root = f"{base}/{'profileAndServicesExt' if ext else 'profileAndServices'}"
        rt_key = "@" + _b64(b"resourceType/profile")
        if segs == ["profile"]:
            return JSONResponse({"PKey": rt_key, "name": "profile", "label": "Profiles",
                                 "href": f"{root}/resourceType/profile",
                                 "filters": {"href": f"{root}/resourceType/{rt_key}/filters/"}})
        if len(segs) == 2 and segs[1] == "filters" and segs[0] in (rt_key, "profile"):
            filters = []
            if self.by_email_filter:
                filters.append({"name": "byEmail", "label": "By email",
                                "data": f"{root}/profile/byEmail?email=$value"})
            filters.append({"name": "byText", "label": "By name or email",
                            "data": f"{root}/profile/byText?text=$value&filterType=$value"})
            if ext:
                for name, spec in self.profile_filters.items():
                    filters.append({"name": name, "label": spec["label"],
                                    "data": f"{root}/profile/{name}?{spec['param']}=$value"})
            return JSONResponse({"content": filters, "serverSidePagination": False})
        raise CampaignError(404, f"The resource 'resourceType/{'/'.join(segs)}' does not exist.")

    # -- custom resources ---------------------------------------------------------------------
    @staticmethod
    def _kind(name: str) -> bytes:
        return b"r" if name == "cusSegmentMembership" else b"r:" + name.encode()

    def _resource_root(self, name: str, base: str) -> str:
        family = "profileAndServicesExt" if self.custom_resources[name]["link"] else "customResources"
        return f"{base}/{family}/{name}"

    def _resource_json(self, name: str, rid: int, rec: dict, base: str) -> dict:
        pkey = self._pkey(rid, self._kind(name))
        res = self.custom_resources[name]
        out = {"PKey": pkey, "href": f"{self._resource_root(name, base)}/{pkey}"}
        for k, spec in res["fields"].items():
            out[k] = rec.get(k, _empty(spec))
        if res["link"]:
            pid = rec.get("@link")
            p = self.profiles.get(pid) if pid is not None else None
            out[res["link"]["name"]] = None if p is None else {
                "PKey": self._pkey(p.id), "href": f"{base}/profileAndServicesExt/profile/{self._pkey(p.id)}",
                "email": p.email or "", "firstName": p.first or "", "lastName": p.last or "", "title": p.email or ""}
        out["created"] = rec["created"]
        out["lastModified"] = rec["lastModified"]
        return out

    def custom_resource_endpoint(self, name: str, method: str, segs: list[str], q: dict, body, base: str) -> Response:
        href = self._resource_root(name, base)
        res = self.custom_resources[name]
        rows = self.rows[name]
        if not segs or all(s.startswith("by") or s == "_count" for s in segs):
            count_only = bool(segs) and segs[-1] == "_count"
            filters = [s for s in segs if s != "_count"]
            if method == "POST" and not segs:
                rid = self._create_row(name, body, _stamp())
                return JSONResponse(self._resource_json(name, rid, rows[rid], base), status_code=201)
            if method != "GET":
                raise CampaignError(405, f"Method {method} is not allowed on this resource.")
            ids = self._row_filter(name, filters, q)
            if count_only:
                return JSONResponse({"count": len(rows) if ids is None else len(ids)})
            sortable = {n for n, spec in res["fields"].items() if spec.get("sortable")} | {"created", "lastModified"}
            return self._collection(ids, q, f"{href}{''.join('/' + f for f in filters)}",
                                    lambda i, r: self._resource_json(name, i, r, base), rows, self.next_resource_id,
                                    sortable)
        key = segs[0]
        rid = self._pid(key, self._kind(name))
        if rid is None:
            raise self._bad_pkey(key, f"{res['label']} ({name})")
        rec = rows.get(rid)
        if rec is None or len(segs) != 1:
            raise CampaignError(404, f"Unable to find document with path '{name}' from key '{key}' (document with "
                                     f"schema '{name}').")
        if method == "GET":
            return JSONResponse(self._resource_json(name, rid, rec, base))
        if method == "PATCH":
            data, link = self._resource_fields(name, body)
            self._check_unique(name, data, rid)
            idf = res["id_field"]
            if idf and idf in data and rec.get(idf) is not None and data[idf] != rec[idf]:
                self.row_keys[name].pop(rec[idf], None)
            rec.update(data)
            if idf and rec.get(idf) is not None:
                self.row_keys[name][rec[idf]] = rid
            if link is not _NO_LINK:
                rec["@link"] = link
            rec["lastModified"] = _stamp()
            return JSONResponse({"PKey": key, "href": f"{href}/{key}"})
        if method == "DELETE":
            self._drop_row(name, rid)
            return Response(b"", status_code=200, media_type="application/json")
        raise CampaignError(405, f"Method {method} is not allowed on this resource.")

    def _create_row(self, name: str, body, now: str) -> int:
        data, link = self._resource_fields(name, body)
        self._check_unique(name, data, None)
        rec = {**data, "created": now, "lastModified": now}
        if self.custom_resources[name]["link"]:
            rec["@link"] = None if link is _NO_LINK else link
        rid = self.next_resource_id
        self.next_resource_id += 1
        self.rows[name][rid] = rec
        idf = self.custom_resources[name]["id_field"]
        if idf and rec.get(idf) is not None:
            self.row_keys[name][rec[idf]] = rid
        return rid

    def _drop_row(self, name: str, rid: int) -> None:
        rec = self.rows[name].pop(rid)
        idf = self.custom_resources[name]["id_field"]
        if idf and self.row_keys[name].get(rec.get(idf)) == rid:
            del self.row_keys[name][rec[idf]]

    def _check_unique(self, name: str, data: dict, rid: int | None) -> None:
        idf = self.custom_resources[name]["id_field"]
        if idf and data.get(idf) is not None and self.row_keys[name].get(data[idf], rid) != rid:
            raise CampaignError(500, f"A '{self.custom_resources[name]['label']}' with the same key '{data[idf]}' "
                                     f"already exists. PGS-220000 PostgreSQL error: ERROR:  duplicate key value "
                                     f"violates unique constraint \"{name.lower()}_{idf.lower()}\"", rst=False)

    def _row_filter(self, name: str, filters: list[str], q: dict) -> list[int] | None:
        res = self.custom_resources[name]
        rows = self.rows[name]
        result: list[int] | None = None
        for f in filters:
            spec = res["filters"].get(f)
            if spec is None:
                raise CampaignError(404, f"The filter '{f}' does not exist on resource '{name}'.")
            value = q.get(spec["param"])
            if value is None:
                raise CampaignError(400, f"The parameter '{spec['param']}' of filter '{f}' is mandatory.")
            field = spec["field"]
            if res["link"] and field == res["link"]["name"]:
                pid = self._pid(value) if value.startswith("@") else None
                if pid is None:
                    raise self._bad_pkey(value)
                pool = result if result is not None else list(rows)
                ids = [i for i in pool if rows[i].get("@link") == pid]
            elif field == res["id_field"] and spec["operator"] == "=":
                rid = self.row_keys[name].get(self._param_value(value, spec, res["fields"][field]))
                ids = [] if rid is None else [rid]
            else:
                value = self._param_value(value, spec, res["fields"].get(field))
                pool = result if result is not None else list(rows)
                ids = [i for i in pool if _compare(rows[i].get(field), spec["operator"], value)]
            if result is None:
                result = ids
            else:
                keep = set(ids)
                result = [i for i in result if i in keep]
        if result is not None:
            result.sort()
        return result

    def _resource_fields(self, name: str, body) -> tuple[dict, Any]:
        """The typed fields of a row and its profile link (``_NO_LINK`` when the body does not set it)."""
        if not isinstance(body, dict):
            raise CampaignError(400, "The request body must be a JSON object.")
        res = self.custom_resources[name]
        link_name = res["link"]["name"] if res["link"] else None
        out = {}
        link: Any = _NO_LINK
        for k, v in body.items():
            if k in ("PKey", "href", "created", "lastModified"):
                continue
            if k == link_name:
                if v is None:
                    link = None
                elif isinstance(v, dict) and "PKey" in v:
                    pid = self._pid(str(v["PKey"])) if str(v["PKey"]).startswith("@") else None
                    if pid is None:
                        raise self._bad_pkey(str(v["PKey"]))
                    if pid not in self.profiles:
                        raise CampaignError(404, f"Unable to find document with path 'Profiles' from key "
                                                 f"'{v['PKey']}' (document with schema 'profile').")
                    link = pid
                # a link given by other fields than the PKey is ignored [limitations.md "POST with linked resources"]
                continue
            if k not in res["fields"]:
                if self.unknown_fields == "reject":
                    raise self._invalid(f"'{k}' property is not valid for the '{name}' resource.")
                continue
            out[k] = self._typed(k, res["fields"][k], v, name)
        return out, link

    # -- events -------------------------------------------------------------------------------
    def generate_events(self, specs: list[dict] | None = None, count: int = 0, types: list[str] | None = None) -> int:
        """Append email events to the journal: explicit ``specs`` ({type, email|PKey, url, bounceType,
        deliveryName, timestamp}) and/or ``count`` events spread over existing profiles."""
        specs = list(specs or [])
        if count:
            types = list(types or EVENT_TYPES)
            pids = list(self.profiles)
            if not pids:
                raise ValueError("no profiles to generate events for")
            for n in range(count):
                specs.append({"type": types[n % len(types)], "PKey": self._pkey(pids[n % len(pids)])})
        made = []
        for s in specs:
            etype = s.get("type")
            if etype not in EVENT_TYPES:
                raise ValueError(f"event type must be one of {EVENT_TYPES}")
            p = None
            if s.get("PKey"):
                pid = self._pid(s["PKey"])
                p = self.profiles.get(pid) if pid else None
            elif s.get("email"):
                hit = self.by_email.get(str(s["email"]).lower())
                p = self.profiles.get(hit[0] if isinstance(hit, tuple) else hit) if hit is not None else None
            if p is None:
                raise ValueError(f"no profile for event {s}")
            ts = s.get("timestamp") or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            data: dict[str, Any] = {"eventType": etype, "timestamp": ts,
                                    "profile": {"PKey": self._pkey(p.id), "email": p.email or "",
                                                "externalId": p.ext_id or ""},
                                    "deliveryName": s.get("deliveryName", "DM-sandbox-1")}
            if etype == "click":
                data["url"] = s.get("url", "https://www.example.com/landing")
            if etype == "bounce":
                data["bounceType"] = s.get("bounceType", "hard")
            made.append({"specversion": "1.0", "type": f"com.adobe.campaign.email.{etype}",
                         "source": f"urn:uuid:{self.registration_id}", "id": str(uuid.uuid4()), "time": ts,
                         "datacontenttype": "application/json", "data": data})
        self.events.extend(made)
        return len(made)

    async def h_generate(self, request: Request) -> Response:
        try:
            body = await request.json()
            n = self.generate_events(body.get("events"), int(body.get("count", 0)), body.get("types"))
        except (ValueError, TypeError, AttributeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"generated": n, "total": len(self.events)})

    def _position(self, index: int) -> str:
        return self._cursor({"e": index})

    async def h_journal(self, request: Request) -> Response:
        request.state.arrived = asyncio.get_running_loop().time()  # the latency model counts from here
        fault = await self.before(request, "journal")
        if fault is not None:
            return fault
        return await self.after(request, await self._journal(request))

    async def _journal(self, request: Request) -> Response:
        denied = self._gateway(request, None)
        if denied is not None:
            return denied
        p = request.path_params
        if p["ims_org"] != self.ims_org or p["integration"] != self.integration_id \
                or p["registration"] != self.registration_id:
            return self.gateway_error(404, "404000", "Journal not found")
        q = request.query_params
        try:
            limit = max(1, int(q.get("limit", self.journal_default_limit)))
        except ValueError:
            return self.gateway_error(400, "400000", "Invalid limit parameter")
        if q.get("since"):
            try:
                start = self._uncursor(q["since"])["e"] + 1
            except (CampaignError, KeyError):
                return self.gateway_error(400, "400000", "Invalid since parameter")
        elif str(q.get("latest", "")).lower() == "true":
            start = len(self.events)
        else:
            start = 0
        url = f"{request.url.scheme}://{request.url.netloc}{request.url.path}"
        batch = self.events[start: start + limit]
        if not batch:
            since = q.get("since") or (self._position(start - 1) if start else "")
            nxt = f"{url}?" + urlencode({"since": since, "limit": limit} if since else {"limit": limit})
            return Response(status_code=204, headers={"Link": f'<{nxt}>; rel="next"',
                                                      "Retry-After": str(self.journal_retry_after)})
        events = [{"position": self._position(start + i), "event": ev} for i, ev in enumerate(batch)]
        last = events[-1]["position"]
        nxt = f"{url}?" + urlencode({"since": last, "limit": limit})
        latest = f"{url}?latest=true"
        return JSONResponse({"events": events, "_page": {"last": last, "count": len(events)}},
                            headers={"Link": f'<{nxt}>; rel="next", <{latest}>; rel="latest"'})

    def history(self, pkey: str, base: str) -> Response:
        pid = self._pid(pkey)
        if pid is None or pid not in self.profiles:
            raise CampaignError(404, f"Document of identifier '{pkey}' and type 'Profiles (profile)' not found.")
        content = [{"eventType": ev["data"]["eventType"], "date": ev["time"],
                    "deliveryName": ev["data"]["deliveryName"], **({"url": ev["data"]["url"]}
                                                                  if "url" in ev["data"] else {})}
                   for ev in self.events if ev["data"]["profile"]["PKey"] == pkey]
        return JSONResponse({"content": content, "serverSidePagination": False,
                             "href": f"{base}/history/{pkey}/events"})

    # =========================================================================================================
    # -- workflows: the workflow API and an email-events log export ----------------------------------------------
    # =========================================================================================================
    # Campaign Standard's workflow API as Adobe documents it (AdobeDocs/campaign-standard.en help/api/using/
    # controlling-a-workflow.md, triggering-a-signal-activity.md; experienceleague.adobe.com/docs/campaign-standard/
    # using/working-with-apis/managing-workflows/...; the Swagger of adobe/aio-lib-campaign-standard spec/api.json:
    # getWorkflow, controlWorkflow with ``method`` in start|pause|resume|stop, WorkflowParameters {source (required),
    # parameters}):
    #
    # - ``GET /workflow/execution/<workflowID>``: the workflow; documented: ``PKey`` and ``activities.activity.
    #   <name>.trigger.href`` for each External signal activity. ❓ inferred: ``internalName`` (the ID), ``label``,
    #   ``state`` (``editing``, ``started``, ``paused``, ``finished``, ``error``: the UI's Editing / In progress /
    #   Paused / Finished / Erroneous of help/automating/using/workflow-life-cycle.md, monitoring-workflow-
    #   execution.md), ``lastStart``, ``lastEnd``, ``href``, and the other activities listed with their ``type``.
    #   ``<workflowID>`` is the workflow's ID (``WKF12``); its PKey is accepted too.
    # - ``POST /workflow/execution/<workflowID>/commands`` ``{"method": "start"|"pause"|"resume"|"stop"}`` -> 200
    #   (❓ the answer is not published: ``{"PKey", "href", "state"}`` here). "Execution related actions (start,
    #   stop, pause, etc.) are asynchronous processes" (about-workflow-execution.md): the state changes at once,
    #   the execution (the export) ``workflow_run_seconds`` later. ❓ inferred: start on a started workflow changes
    #   nothing; pause/resume on a workflow that is not started/paused and an unknown method -> 400.
    # - ``POST <trigger href>`` ``{"source": "...", "parameters": {...}}``: triggers the External signal activity;
    #   "the destination workflow must be already running" and the activity "cannot be triggered more often than
    #   every 10 minutes" (``signal_min_interval``; a trigger within it gets a 200 whose body is not JSON, as
    #   aio-lib-campaign-standard's ``triggerSignalActivity`` handles it - ❓ the exact answer); a parameter not
    #   declared in the activity -> the documented "RST-360011 … '<p>' parameter isn't defined in signal activity.
    #   XTK-170006 …" (status ``validation_status``, ❓). A missing ``source`` / a workflow not started -> the same
    #   status with an inferred message.
    # - 404 for an unknown workflow (❓ message). The gateway (Bearer + X-Api-Key, org, throttling) applies as to
    #   every Campaign route.
    #
    # The export workflow (what the customer builds, help/automating/using/exporting-logs.md: [External signal ->]
    # Incremental query on the delivery/tracking logs -> Extract file -> Transfer file -> End): each execution
    # writes one CSV file with the email events (the journal's events: same IDs) newer than the previous
    # execution's (the incremental query's "processed data" date), one row per event, into ``folder`` (a local
    # directory standing for the SFTP/S3/Azure location of the Transfer file activity). Written to a hidden name
    # then renamed (a reader never sees half a file). File name: ``<file_label>_<YYYYMMDD_HHMMSS>.<ext>`` (Extract
    # file's "Add date and time to the file name": "recipients_20150815_081532.txt", extract-file.md); names
    # sort in export order (a second within the same second is moved one second on). Columns (Extract file output
    # columns, labels as the header; ❓ Adobe has no fixed layout, the customer chooses): ``eventId`` (the event's
    # ID: for delivery logs the "Delivery log ID", for tracking logs the tracking log ``id``), ``eventType``
    # (sent|open|click|bounce), ``logDate`` (ISO 8601: broadLogRcp ``eventDate`` / trackingLogRcp ``logDate``),
    # ``deliveryLabel`` (``deliveryLabel``), ``url`` (click), ``bounceType`` (bounce), ``email``, ``cusCrmId``,
    # ``externalId`` (the profile's fields at export time, "data coming from related resources such as delivery
    # or profile information"), ``profilePKey`` (not in the default columns: Adobe asks not to persist PKeys).
    # The broadLogRcp/trackingLogRcp field names are those of help/api/using/retrieving-privacy-data-files.md.
    #
    # Workflows are declared by the seed's ``workflows`` key or ``POST /_sandbox/adobe_campaign/workflows``
    # ``{"WKF12": {"label", "export": "email_events" | null, "folder", "file_label" ("emailEvents"), "extension"
    # ("csv"), "columns" [...], "delimiter" (","), "types" [...], "skip_empty" (false: an execution with no new
    # event writes a header-only file), "signal": true | {"name": "signal1", "parameters": {"<p>": "string"}},
    # "fail": false (the execution ends in ``error``)}}`` (replaces the workflow, its state and export date);
    # ``GET`` lists them with their state, executions and files.

    def _reset_workflows(self, specs: dict) -> None:
        for wf in getattr(self, "workflows", {}).values():
            if wf.get("timer") is not None:
                wf["timer"].cancel()
        self.workflows: dict[str, dict] = {}
        self._workflow_serial = getattr(self, "_workflow_serial", 0)
        self.declare_workflows(specs)

    def declare_workflows(self, specs: dict) -> dict:
        """Add or replace workflows (seed key ``workflows`` or ``POST /_sandbox/adobe_campaign/workflows``)."""
        if not isinstance(specs, dict):
            raise ValueError("workflows: {\"<workflow ID>\": {...}}")
        known = {"label", "export", "folder", "file_label", "extension", "columns", "delimiter", "types",
                 "skip_empty", "signal", "fail"}
        for wid, spec in specs.items():
            if not isinstance(spec, dict) or set(spec) - known:
                raise ValueError(f"workflow {wid}: a dict with keys among {sorted(known)}")
            export = spec.get("export", "email_events")
            if export not in ("email_events", None):
                raise ValueError(f"workflow {wid}: export is 'email_events' or null")
            if export and not spec.get("folder"):
                raise ValueError(f"workflow {wid}: an export workflow needs 'folder' (where Transfer file writes)")
            columns = list(spec.get("columns") or WORKFLOW_LOG_COLUMNS)
            bad = [c for c in columns if c not in WORKFLOW_LOG_COLUMNS + ("profilePKey",)]
            if bad:
                raise ValueError(f"workflow {wid}: unknown columns {bad}")
            types = list(spec.get("types") or EVENT_TYPES)
            if set(types) - set(EVENT_TYPES):
                raise ValueError(f"workflow {wid}: types among {EVENT_TYPES}")
            signal = spec.get("signal")
            if signal is True:
                signal = {}
            if signal is not None and signal is not False:
                if not isinstance(signal, dict):
                    raise ValueError(f"workflow {wid}: signal is true or {{'name', 'parameters'}}")
                signal = {"name": signal.get("name", "signal1"), "parameters": dict(signal.get("parameters") or {})}
            else:
                signal = None
            old = self.workflows.get(wid)
            if old is not None and old.get("timer") is not None:
                old["timer"].cancel()
            self._workflow_serial += 1
            self.workflows[wid] = {
                "id": wid, "serial": self._workflow_serial, "label": spec.get("label", wid), "export": export,
                "folder": spec.get("folder"), "file_label": spec.get("file_label", "emailEvents"),
                "extension": str(spec.get("extension", "csv")).lstrip("."), "columns": columns,
                "delimiter": spec.get("delimiter", ","), "types": types, "skip_empty": bool(spec.get("skip_empty")),
                "signal": signal, "fail": bool(spec.get("fail")), "state": "editing", "exported": 0,
                "armed": False, "last_signal": None, "timer": None, "run_at": None, "remaining": None,
                "executions": 0, "files": [], "last_stamp": None, "last_start": None, "last_end": None,
                "parameters": {}, "source": None,
            }
        return self.workflows_state()

    def workflows_state(self) -> dict:
        return {wid: {k: v for k, v in wf.items() if k not in ("timer", "run_at", "remaining", "serial", "last_stamp")}
                for wid, wf in self.workflows.items()}

    async def h_workflows(self, request: Request) -> Response:
        """``GET|POST /_sandbox/adobe_campaign/workflows``: the workflows (state, executions, files); declare more."""
        try:
            if request.method == "POST":
                return JSONResponse(self.declare_workflows(await request.json()))
            return JSONResponse(self.workflows_state())
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    def _workflow(self, key: str) -> dict:
        wf = self.workflows.get(key)
        if wf is None and key.startswith("@"):
            serial = self._pid(key, b"w")
            wf = next((w for w in self.workflows.values() if w["serial"] == serial), None)
        if wf is None:
            raise CampaignError(404, f"The workflow '{key}' does not exist.")
        return wf

    def _workflow_json(self, wf: dict, base: str) -> dict:
        wkey = self._pkey(wf["serial"], b"w")
        href = f"{base}/workflow/execution/{wkey}"
        activities: dict[str, Any] = {}
        if wf["signal"]:
            name = wf["signal"]["name"]
            akey = self._pkey(wf["serial"], b"a")
            activities[name] = {"PKey": akey, "name": name, "label": "External signal", "type": "signal",
                                "parameters": wf["signal"]["parameters"],
                                "trigger": {"href": f"{href}/activities/activity/{akey}/trigger/"}}
        if wf["export"]:
            for name, label, kind in (("incrementalQuery", "Incremental query", "incrementalQuery"),
                                      ("extractFile", "Extract file", "extractFile"),
                                      ("transferFile", "Transfer file", "transferFile")):
                activities[name] = {"name": name, "label": label, "type": kind}
        activities["end"] = {"name": "end", "label": "End", "type": "end"}
        return {"PKey": wkey, "internalName": wf["id"], "label": wf["label"], "state": wf["state"],
                "lastStart": wf["last_start"], "lastEnd": wf["last_end"], "href": href,
                "activities": {"activity": activities}}

    def workflow_endpoint(self, method: str, segs: list[str], body, base: str) -> Response:
        """``/workflow/execution/<id>`` (GET), ``…/commands`` (POST), ``…/activities/activity/<PKey>/trigger``."""
        wf = self._workflow(segs[0])
        if len(segs) == 1 and method == "GET":
            return JSONResponse(self._workflow_json(wf, base))
        if segs[1:] == ["commands"] and method == "POST":
            return self._workflow_command(wf, (body or {}).get("method") if isinstance(body, dict) else None, base)
        if len(segs) == 5 and segs[1:3] == ["activities", "activity"] and segs[4] == "trigger" and method == "POST":
            if not wf["signal"] or self._pid(segs[3], b"a") != wf["serial"]:
                raise CampaignError(404, f"The activity '{segs[3]}' does not exist.")
            return self._trigger(wf, body if isinstance(body, dict) else {}, base)
        raise CampaignError(404, f"The resource '/workflow/execution/{'/'.join(segs)}' does not exist.")

    def _workflow_command(self, wf: dict, command, base: str) -> Response:
        command = str(command or "").lower()
        state = wf["state"]
        if command == "start":
            if state == "paused":
                raise CampaignError(400, f"The workflow '{wf['id']}' is paused: resume it.")
            if state != "started":
                wf["state"], wf["last_start"], wf["remaining"] = "started", _stamp(), None
                if wf["signal"]:
                    wf["armed"] = True  # the External signal activity waits for its trigger
                else:
                    self._run_later(wf, self.workflow_run_seconds)
        elif command == "pause":
            if state != "started":
                raise CampaignError(400, f"The workflow '{wf['id']}' is not started.")
            wf["state"] = "paused"
            if wf["timer"] is not None:
                wf["timer"].cancel()
                wf["timer"] = None
                wf["remaining"] = max(0.0, wf["run_at"] - asyncio.get_running_loop().time())
        elif command == "resume":
            if state != "paused":
                raise CampaignError(400, f"The workflow '{wf['id']}' is not paused.")
            wf["state"] = "started"
            if wf["remaining"] is not None:
                self._run_later(wf, wf["remaining"])
                wf["remaining"] = None
        elif command == "stop":
            if state in ("started", "paused"):
                if wf["timer"] is not None:
                    wf["timer"].cancel()
                wf.update(state="finished", timer=None, remaining=None, armed=False, last_end=_stamp())
        else:
            raise CampaignError(400, f"Unknown workflow command '{command}': start, pause, resume or stop.")
        out = self._workflow_json(wf, base)
        return JSONResponse({"PKey": out["PKey"], "href": out["href"], "state": wf["state"]})

    def _trigger(self, wf: dict, body: dict, base: str) -> Response:
        signal = wf["signal"]
        now = time.monotonic()
        if wf["last_signal"] is not None and now - wf["last_signal"] < self.signal_min_interval:
            return Response(f"The External signal activity '{signal['name']}' of workflow '{wf['id']}' cannot be "
                            "triggered more often than every 10 minutes; the call is ignored.",
                            media_type="text/plain")
        if not body.get("source"):
            raise CampaignError(self.validation_status, "The 'source' attribute is mandatory.")
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise CampaignError(self.validation_status, "'parameters' must be an object.")
        for name in params:
            if name not in signal["parameters"]:
                raise CampaignError(self.validation_status, (
                    f"'{name}' parameter isn't defined in signal activity.\nXTK-170006 Unable to parse expression "
                    "'HandleTrigger(@name, $(source), $({parameters}))'.\nRST-360000 Error while assessing "
                    "'HandleTrigger(@name, $(source), $({parameters}))' expression "
                    "('xtk:workflow:execution/activities/signal/trigger' resource)"))
        if wf["state"] != "started" or not wf["armed"]:
            raise CampaignError(self.validation_status, f"The workflow '{wf['id']}' is not started: its External "
                                f"signal activity '{signal['name']}' is not waiting for a signal.")
        wf.update(armed=False, last_signal=now, parameters=params, source=body["source"])
        self._run_later(wf, self.workflow_run_seconds)
        return JSONResponse({"PKey": self._pkey(wf["serial"], b"a"), "name": signal["name"],
                             "source": body["source"], "parameters": params})

    def _run_later(self, wf: dict, delay: float) -> None:
        loop = asyncio.get_running_loop()
        wf["run_at"] = loop.time() + delay
        wf["timer"] = loop.call_later(delay, self._execute, wf)

    def _execute(self, wf: dict) -> None:
        """One execution: the incremental query, the file extracted and transferred, the workflow finished."""
        wf["timer"] = None
        if self.workflows.get(wf["id"]) is not wf or wf["state"] != "started":
            return
        wf["executions"] += 1
        if wf["fail"]:
            wf.update(state="error", last_end=_stamp())
            return
        if wf["export"]:
            self._export_events(wf)
        wf.update(state="finished", last_end=_stamp())

    def _export_events(self, wf: dict) -> None:
        upto = len(self.events)
        events = [ev for ev in self.events[wf["exported"]:upto] if ev["data"]["eventType"] in wf["types"]]
        wf["exported"] = upto
        if not events and wf["skip_empty"]:
            return
        now = datetime.now(UTC).replace(microsecond=0)
        if wf["last_stamp"] is not None and now <= wf["last_stamp"]:
            now = wf["last_stamp"] + timedelta(seconds=1)
        wf["last_stamp"] = now
        name = f"{wf['file_label']}_{now:%Y%m%d_%H%M%S}.{wf['extension']}"
        os.makedirs(wf["folder"], exist_ok=True)
        tmp = os.path.join(wf["folder"], f".{name}.part")
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, delimiter=wf["delimiter"])
            writer.writerow(wf["columns"])
            for ev in events:
                writer.writerow([self._log_value(ev, c) for c in wf["columns"]])
        os.replace(tmp, os.path.join(wf["folder"], name))
        wf["files"].append(name)

    def _log_value(self, ev: dict, column: str) -> str:
        data = ev["data"]
        if column == "eventId":
            return ev["id"]
        if column == "eventType":
            return data["eventType"]
        if column == "logDate":
            return ev["time"]
        if column == "deliveryLabel":
            return data.get("deliveryName") or ""
        if column in ("url", "bounceType"):
            return data.get(column) or ""
        if column == "profilePKey":
            return data["profile"]["PKey"]
        pid = self._pid(data["profile"]["PKey"])
        p = self.profiles.get(pid) if pid is not None else None
        value = _profile_value(p, column) if p is not None else None  # the profile as it is at export time
        return "" if value is None else str(value)


#: the sandbox export workflow's default output columns (see the workflow section of the emulator)
WORKFLOW_LOG_COLUMNS = ("eventId", "eventType", "logDate", "deliveryLabel", "url", "bounceType", "email",
                        "cusCrmId", "externalId")


_NO_LINK = object()


def _field_spec(name: str, spec) -> dict:
    """``"string"`` or ``{"type", "length", "sortable", "searchable"}`` -> the full spec."""
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or spec.get("type") not in FIELD_TYPES:
        raise ValueError(f"field {name}: type must be one of {FIELD_TYPES}")
    if not name.startswith("cus"):
        raise ValueError(f"field {name}: custom fields start with 'cus'")
    out = {"type": spec["type"]}
    if spec["type"] == "string":
        out["length"] = int(spec.get("length", 255))
    for flag in ("sortable", "searchable"):
        if spec.get(flag):
            out[flag] = True
    return out


def _filter_spec(name: str, spec) -> dict:
    """``"<field>"`` or ``{"field", "param" (default: the field), "operator" ("=", ">=", ">", "<=", "<"), "label"}``."""
    if not name.startswith("by") or len(name) < 3:
        raise ValueError(f"filter {name}: filter names start with 'by'")
    if isinstance(spec, str):
        spec = {"field": spec}
    if not isinstance(spec, dict) or not spec.get("field"):
        raise ValueError(f"filter {name}: {{'field', 'param', 'operator'}}")
    op = spec.get("operator", "=")
    if op not in FILTER_OPERATORS:
        raise ValueError(f"filter {name}: operator must be one of {FILTER_OPERATORS}")
    return {"field": spec["field"], "param": spec.get("param", spec["field"]), "operator": op,
            "label": spec.get("label", name)}


def _empty(spec: dict):
    return {"string": "", "int": 0, "double": 0, "boolean": False}.get(spec["type"], "")


def _profile_value(p: Profile, field: str):
    if field == "email":
        return p.email
    if field == "firstName":
        return p.first
    if field == "lastName":
        return p.last
    if field == "externalId":
        return p.ext_id
    if field == "created":
        return p.created
    if field == "lastModified":
        return p.modified
    if field in _FLAG:
        return bool(p.flags & _FLAG[field])
    return (p.extra or {}).get(field)


def _compare(value, op: str, wanted) -> bool:
    if value is None or value == "":
        return False
    try:
        if op == "=":
            return value == wanted
        if op == ">=":
            return value >= wanted
        if op == ">":
            return value > wanted
        if op == "<=":
            return value <= wanted
        return value < wanted
    except TypeError:
        return False


def _order_key(rec, field: str):
    if isinstance(rec, Profile):
        value = _profile_value(rec, field)
    else:
        value = rec.get(field)
    return (value is not None, str(value).lower() if isinstance(value, str) else value if value is not None else "")
