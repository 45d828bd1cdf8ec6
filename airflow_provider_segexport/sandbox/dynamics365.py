"""Dataverse Web API v9.2 + Microsoft identity platform emulator (facts: ``shared/API-FACTS.md`` section 3).

Identity (``/login/<tenant>``, the msal authority): ``GET /v2.0/.well-known/openid-configuration``,
``POST /oauth2/v2.0/token`` (client credentials only; form ``client_id``/``client_secret`` or HTTP Basic;
scope ``<base_url>/.default``; errors with the AADSTS codes of the Entra reference), and the instance
discovery document at ``/login/common/discovery/instance`` (msal only calls it when given that URL as
``instance_discovery``; with ``instance_discovery=False`` it goes straight to tenant discovery).
Tokens expire after ``sandbox.token_ttl`` seconds.

Web API (``/dataverse/api/data/v9.2``): bearer tokens from the endpoint above only (401 +
``WWW-Authenticate: Bearer authorization_uri=..., resource_id=...``); ``WhoAmI``; entity sets
``contacts``, ``lists`` (marketing lists), ``listmembers`` (read / delete), ``organizations``, the custom
tables ``new_segmentmemberships`` and ``new_loyaltycards`` and the custom activity ``new_emailevents`` (email
events from Adobe Campaign: ``new_eventid`` the event's ID, an alternate key; ``new_eventtype`` choice
100000000 Send / 100000001 Open / 100000002 Click / 100000003 Bounce, ``new_eventdate``, ``new_deliveryname``,
``new_campaignname``, ``new_trackingurl``, ``new_mirrorpageurl``, ``new_bouncetype``; regarding a contact through
``regardingobjectid_contact_new_emailevent@odata.bind``); ``$select``, ``$filter``
(``eq ne gt ge lt le``, ``and or not``, parentheses, ``contains/startswith/endswith``,
``Microsoft.Dynamics.CRM.In``/``NotIn``), ``$top``, ``$count``, ``$orderby``, ``Prefer:
odata.maxpagesize`` (max 5000, echoed in ``Preference-Applied``) with an opaque ``@odata.nextLink``
(``$skiptoken`` paging cookie); ``Prefer: return=representation``; create / upsert (``PATCH`` by id or
alternate key, ``If-Match: *`` / ``If-None-Match: *``) / delete; ``CreateMultiple`` / ``UpdateMultiple`` /
``UpsertMultiple`` (each target identified by its ``@odata.id`` key URL or its key columns, updated or
created; 204 No Content as MS webapi/reference/upsertmultiple says); ``AddListMembersList`` (``List`` + ``Members``; unknown contacts -> 404 naming the
id, nothing added; members already on the list are skipped), bound ``AddMemberList`` and
``RemoveMemberList``, ``lists(<id>)/listcontact_association`` (read, ``$ref`` associate / disassociate);
``$batch`` (multipart/mixed, at most 1,000 requests, change sets all-or-nothing with ``Content-ID``
/ ``$n`` references, ``Prefer: odata.continue-on-error``); ``RemoveListMembersList``; ``EntityDefinitions``
(table and attribute metadata, option sets). Errors use ``{"error": {"code", "message"}}``.

Service protection (per application user, sliding window): number of requests (``0x80072322``),
combined execution time (``0x80072321``, measured as wall time including the latency model) and
concurrent requests (``0x80072326``), answered with 429 + ``Retry-After`` before any work is done.

Configurable (class attributes, ``seed["dynamics365"]["config"]`` or ``POST /_sandbox/dynamics365/config``;
``reset()`` restores them): ``window_seconds`` (300), ``max_requests`` (6000), ``max_execution_ms``
(1,200,000), ``max_concurrent`` (52), ``concurrency_retry_after`` (1), ``batch_inner_requests_count``
(True: each request inside ``$batch`` counts toward ``max_requests``), ``max_batch_requests`` (1000),
``max_page_size`` (5000), ``max_add_list_members`` (0 = no limit; the real limit is undocumented),
``skip_inactive_members`` (True: ``AddListMembersList`` leaves inactive contacts out),
``remove_member_entity_id`` (``record``: RemoveMemberList's ``EntityId`` is the contact id;
``listmember``: it is the listmemberid; ``either``), ``remove_member_list_available`` (True),
``application_user`` (True; False -> 403 ``0x80072560`` for every call).

Change tracking and formatted values: ``change_tracking_unsupported`` ("ignore": ``Prefer: odata.track-changes``
on a table without change tracking is not applied; "error": 400), ``change_tracking_expire_days`` (7),
``formatted_utc_offset_minutes`` (0: the calling user's time zone for datetime formatted values).

More configuration: ``strict_literal_types`` (True: a quoted string compared with a Guid or DateTimeOffset
column is refused as ODataLib does; False: converted, the sandbox's old behaviour), ``max_url_length`` (32768),
``max_batch_url_length`` (65536, a GET inside ``$batch``), ``max_url_segment_length`` (260).

``UpsertMultiple`` availability per table: ``upsert_multiple_unavailable`` (a list of table logical names, or a
comma-separated string; entity set names are accepted too; default none): ``POST <set>/Microsoft.Dynamics.CRM.
UpsertMultiple`` on such a table is answered 400 ``{"error": {"code": "0x80040800", "message": "The 'UpsertMultiple'
method does not support entities of type 'new_emailevent'. MessageProcessorCache returned MessageProcessor.Empty. "}}``
before anything is written (the tables that have no bulk messages at all here, ``lists`` and ``organizations``, answer
the same for ``CreateMultiple``/``UpdateMultiple``/``UpsertMultiple``). Sources: MS ``bulk-operations.md``
"Availability with standard tables": "You can use the CreateMultiple and UpdateMultiple bulk operation messages with
custom standard tables and many common standard tables, but not all. You should test whether individual standard
tables support these messages" with ``GET sdkmessagefilters?$select=sdkmessagefilterid&$filter=sdkmessageid/name eq
@message and primaryobjecttypecode eq @table&@message='CreateMultiple'&@table='sample_example'`` ("If the table
supports the message, an sdkmessagefilterid value is returned. Otherwise, the value is an empty array"; the sandbox
does not serve ``sdkmessagefilters``); MS ``webapi/reference/upsertmultiple``: "The list of Entities doesn't represent
all the tables that support the UpsertMultiple action"; a Microsoft reviewer on microsoft/PowerApps-Samples#495:
"Standard table does not have UpsertMultiple filter for every entity. Since UpsertMultiple is eventually executing
CreateMultiple or UpdateMultiple" (so the filter query can miss a table that works). The answer for an unsupported
message is not documented by Microsoft (only "DeleteMultiple has not yet been implemented." for DeleteMultiple on a
standard table); the code and message are the platform's ``SdkEntityDoesNotSupportMessage`` fault as public code
records it ("0x80040800: The 'Delete' method does not support entities of type 'appmodulecomponent'.
MessageProcessorCache returned MessageProcessor.Empty.", and daryllabar/XrmUnitTest's fake of the SDK); the HTTP
status 400 is inferred.

Upsert by alternate key (MS ``use-upsert-insert-update-record.md`` "Use Web API"; alone or inside ``$batch``):
``PATCH <set>(<key>='<value>')`` without ``If-Match`` creates the record when no record has the key and updates it
otherwise, "The status response is 204 No Content in either case" (``OData-EntityId`` names the record);
``If-Match: *`` makes it update-only (404 when missing), ``If-None-Match: *`` create-only (412 when present);
``Prefer: return=representation`` answers 201 (created) / 200 (updated). Key columns in the body: on update they are
dropped ("The server removes the data set in the body of the request for those alternate key values in the URL"),
on create the body's value wins and the URL's is used only when the body has none.

``$batch`` (MS ``webapi/execute-batch-operations-using-web-api.md``): "Batch requests can contain up to 1000
individual requests" (``max_batch_requests``); without ``Prefer: odata.continue-on-error`` the first failing request
ends the batch, with it "more requests be processed when errors occur. The batch request will return 200 OK and
individual response errors will be returned in the batch response body", each part ``HTTP/1.1 <status>`` with its
``{"error": {...}}``, in the order of the requests. Service protection: MS ``api-limits.md`` says a batch "can contain
up to 1000 operations and will avoid the number of requests limit" (but not the execution-time limit); the sandbox
counts each inner request toward ``max_requests`` while ``batch_inner_requests_count`` (the stricter default, for
clients that must not rely on that), one request when it is False. Inner requests are logged as
``dynamics365 <METHOD> $batch:<route>`` in ``/_sandbox/requests``.

Sources per behaviour (MS = learn.microsoft.com/power-apps/developer/data-platform/, repo
MicrosoftDocs/powerapps-docs ``powerapps-docs/developer/data-platform/``; DV-sdk =
microsoft/PowerPlatform-DataverseClient-Python 1.1.0; "inferred" = not documented, chosen and configurable
where it matters):

- ``$filter`` literals: GUIDs and ``Edm.DateTimeOffset`` (``2024-01-01T00:00:00Z``, fractional seconds,
  ``+01:00`` offsets) and ``Edm.Date`` (``2024-01-01``, compared as midnight UTC: inferred) are unquoted, as
  DV-sdk ``models/filters.py`` ``_format_value`` writes them and OData v4 ABNF defines them. A quoted value is
  an ``Edm.String``; against a Guid/DateTimeOffset column (or an unquoted Guid against a string column) the
  answer is 400 ``0x80060888`` "A binary operator with incompatible types was detected. Found operand types
  'Edm.DateTimeOffset' and 'Edm.String' for operator kind 'GreaterThanOrEqual'." — ODataLib's wording as
  reported in OData/ODataLib users' issues (e.g. rosostolato/odata-fluent-query#3, XrmDefinitelyTyped#35 for
  Dynamics); the code ``0x80060888`` is the one Dataverse uses for its other $filter/$select errors (inferred
  here). Caveat: MS ``webapi/query/filter-rows.md`` shows ``_owninguser_value eq '<systemuserid value>'``
  (quoted) in one example, so Dataverse may be lenient for lookups; ``strict_literal_types=False`` emulates
  that. Unbalanced quotes: "There is an unterminated literal at position N in '…'" (filter-rows.md).
- ``Microsoft.Dynamics.CRM.In``/``NotIn``: ``PropertyValues`` is a JSON array (double-quoted values, what
  DV-sdk ``_InFilter.to_odata`` emits; single-quoted values also read), parameter aliases
  ``In(PropertyName=@p1,PropertyValues=@p2)&@p1='lastname'&@p2=["OBrian",…]`` and the documented error for a
  single-quoted value containing ``'``: "Invalid JSON. A comma character ',' was expected in scope 'Array'. …"
  (filter-rows.md "Manage single quotes"); the same error for unquoted GUIDs in the array
  (context-and-oss/XrmDefinitelyTyped#309). Values are converted to the column's type. No documented limit on
  the number of values: the URL length limit below is what bounds it.
- URL limits: "The maximum length of URL accepted is 32 KB (32768 characters)… inside the body of a $batch
  request … URLs up to 64 KB (65,536 characters)", and a URL segment over 260 characters gives "400 Bad
  Request - Invalid URL" (MS ``webapi/compose-http-requests-handle-errors.md`` "Maximum URL length",
  "Maximum OData Segment length"; ``fetchxml/retrieve-data.md``). The status/body for an over-long URL is not
  documented: the sandbox answers HTTP.sys's page "HTTP Error 414. The request URL is too long." (inferred),
  and HTTP.sys's "HTTP Error 400. The request URL is invalid." for a long segment. Neither counts toward
  service protection (refused before the Web API).
- ``EntityDefinitions`` (GET only): collection with ``$select``/``$filter`` (``LogicalName eq 'contact'``),
  ``EntityDefinitions(LogicalName='x')`` / ``(MetadataId)``, ``…/Attributes`` (``$select``, ``$filter``),
  ``…/Attributes(LogicalName='x')``, the casts ``…/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata``
  / ``StateAttributeMetadata`` / ``StatusAttributeMetadata`` with ``$expand=OptionSet`` or
  ``OptionSet($select=Options)``, and ``…/Keys`` (MS ``webapi/query-metadata-web-api.md``; DV-sdk
  ``data/_odata.py`` ``_entity_set_from_schema_name``, ``_bulk_fetch_picklists``). statecode/statuscode are
  State/Status attributes (not Picklist) as in Dataverse; their labels come from the table references. The
  metadata API does not page (DV-sdk comment). Object type codes from the table references; custom tables'
  codes, MetadataIds (stable uuid5) and the 404 wording for an unknown table are inferred.
- ``list.membercount`` is computed from the membership, so every add/remove path (AddListMembersList,
  AddMemberList, ``$ref`` associate/disassociate, RemoveMemberList, RemoveListMembersList, DELETE listmembers,
  contact deletion, change-set rollback) keeps it right; it is read-only ("Shows the sum of all members in the
  marketing list", IsValidForCreate/IsValidForUpdate False — list entity reference) and a value sent on
  create/update is ignored, as the platform ignores read-only columns (inferred: not documented for this
  column).
- ``AddListMembersList`` (MS ``webapi/reference/addlistmemberslist``: parameters ``List``/``Members``, "does not
  return a value"): what happens with unknown, inactive or already-present members is not documented. The
  sandbox refuses the whole call with 404 naming the first unknown contact (FakeXrmEasy's executor does the
  same: secondary), skips already-present members, and skips inactive contacts while
  ``skip_inactive_members`` (the list's ``ignoreinactivelistmembers`` default is true). ``RemoveListMembersList``
  (an action listed for the list table in the Dynamics 365 table reference) takes the same body; members not
  on the list are skipped (inferred).
- Service protection codes, messages and ``Retry-After`` (MS ``api-limits.md``), paging cookie and
  ``Preference-Applied`` (MS ``webapi/query/page-results.md``), ``$batch`` (MS
  ``webapi/execute-batch-operations-using-web-api.md``), token lifetime: ``sandbox.token_ttl`` (admin
  ``/_sandbox/token-ttl``; msal re-requests a token when fewer than 5 minutes remain).

- Formatted values (MS ``webapi/query/select-columns.md`` "Formatted values" and "Lookup property data"; response
  examples in MS ``webapi/query-data-web-api.md`` and the OrganizationData.svc -> Web API migration page): with
  ``Prefer: odata.include-annotations="*"`` (or the term ``OData.Community.Display.V1.FormattedValue``, a
  ``Namespace.*`` pattern, ``-term`` exclusions) each non-null property gets ``<name>@OData.Community.Display.V1.
  FormattedValue`` placed before it: choice / state / status labels, Yes/No labels (``donotbulkemail`` true "Do Not
  Allow", false "Allow"; ``donotsendmm`` "Do Not Send"/"Send"; ``followemail`` "Allow"/"Do Not Allow" — contact table
  reference), the lookup record's primary name plus ``@Microsoft.Dynamics.CRM.associatednavigationproperty`` and
  ``@Microsoft.Dynamics.CRM.lookuplogicalname``, datetimes as ``6/1/2023 2:05 PM`` (en-US, user time zone: the
  sandbox user is on UTC unless ``formatted_utc_offset_minutes``; inferred) and whole numbers grouped (``12,500``).
  Strings and primary keys get none. ``Preference-Applied: odata.include-annotations="<as sent>"`` only on answers
  that return records (collections, retrieve, ``return=representation``). Labels of Yes/No columns nobody declared
  default to "Yes"/"No" (Dataverse's default for a new Yes/No column; inferred for the sandbox's own tables).
  Several ``Prefer`` headers are read as one list, commas inside quotes kept.
- Choice columns on contact: ``gendercode`` (1 Male, 2 Female), ``preferredcontactmethodcode`` (1 Any, 2 Email,
  3 Phone, 4 Fax, 5 Mail) from the contact table reference; values outside an option set are refused (400). In
  ``EntityDefinitions`` choice columns are ``PicklistAttributeMetadata`` with their ``OptionSet``, Yes/No columns
  ``BooleanAttributeMetadata`` whose ``OptionSet`` has ``TrueOption``/``FalseOption`` (values 1 / 0).
- ``new_loyaltycard`` (entity set ``new_loyaltycards``, PK ``new_loyaltycardid``, primary name ``new_name``,
  ``new_cardnumber`` alternate key, ``new_points``, ``new_tier`` choice 100000000 Bronze … 100000003 Platinum,
  ``new_issuedon``, ``statecode``/``statuscode``): a custom lookup to contact whose single-valued navigation property
  is its SchemaName ``new_ContactId`` (case-sensitive, set with ``new_ContactId@odata.bind: "/contacts(<id>)"``)
  and whose read-only lookup property is ``_new_contactid_value`` (MS ``webapi/web-api-properties.md`` "Lookup
  properties", ``webapi/web-api-navigation-properties.md``: "the <name> found in the lookup property will match the
  name of the navigation property"; the SchemaName casing of custom navigation properties is common knowledge, 🟡).
  Deleting a contact clears the lookup on its cards (a new custom 1:N relationship is Referential, "Remove Link":
  inferred for this table) and so changes them.
- Change tracking (MS ``use-change-tracking-synchronize-data-external-systems.md``): per table
  (``ChangeTrackingEnabled`` in ``EntityDefinitions``, filterable; seed ``change_tracking``: on for contact and
  new_loyaltycard). ``Prefer: odata.track-changes`` on an entity-set GET -> ``Preference-Applied:
  odata.track-changes`` and ``@odata.deltaLink`` on the last page (``<set>?$select=…&$deltatoken=<version>!<MM/dd/yyyy
  HH:mm:ss>`` as in the doc's example; changes made while paging come in the next delta). GET of the delta link:
  context ``…#<set>(<select>)/$delta``, new or updated records first (by version), then deleted ones as
  ``{"@odata.context": "…#<set>/$deletedEntity", "id": "<guid>", "reason": "deleted"}`` ("Usually, the caller will get
  all new or updated records first … followed by deleted records"; a record created and deleted between two reads
  comes back as deleted), paged with ``Prefer: odata.maxpagesize``, and a new delta link; ``<set>/$count?$deltatoken=``
  counts the changes. ``$filter``/``$orderby``/``$expand``/``$top`` with change tracking -> 400 with the documented
  text ``The "$filter" query parameter isn't supported when Change Tracking is enabled.`` (status and error code
  inferred). Inferred: an empty delta is ``"value": []`` with a new delta link (the doc says "An empty JSON response"),
  a token is a version and may be read again, tokens older than ``change_tracking_expire_days``
  (``ExpireChangeTrackingInDays``, default 7 per the doc) and malformed tokens get 400, and the preference on a table
  without change tracking is silently not applied (``change_tracking_unsupported``).
- ``createdon``/``modifiedon``: set on create, ``modifiedon`` on every update (also deactivation and membership
  changes), UTC ``2023-04-07T21:59:01Z`` as in the docs' responses; PATCH of ``statecode`` alone sets ``statuscode``
  to that state's default status (SetState semantics; inferred for the Web API).

Seed: ``{"contacts": [{"contactid", "emailaddress1", "firstname", "lastname", "statecode", "createdon",
"modifiedon", <any declared column>, ...}], "lists": [{"listid", "listname", "createdfromcode", "type",
"members": [contactid]}], "columns": {"contact": {"new_tier": {"type": "choice", "options": {"100000000":
"Gold"}}, "new_vip": {"type": "boolean", "labels": {"true": "VIP", "false": "Regular"}}, "new_code": {"type":
"string", "max_length": 20}, "new_points": "integer", "new_since": "datetime"}, "new_loyaltycard": {...}},
"new_loyaltycards": [{"new_loyaltycardid", "new_cardnumber", "new_contactid": <contact guid>, ...}] (without the
key: one sample card for each of the first 20 seeded contacts), "change_tracking": {"contact": true, "list": false},
"contact_alternate_keys": ["new_customerid"], "config": {...}}``.
A static contact list (``marketing_list_id`` in the start-up JSON) always exists.
"""

from __future__ import annotations

import base64
import json
import math
import re
import sys
import time
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import islice
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from airflow_provider_segexport.sandbox.core import Emulator

API = "/api/data/v9.2"
NS = "Microsoft.Dynamics.CRM."
JSON_TYPE = "application/json; odata.metadata=minimal"
E_NOT_FOUND = "0x80040217"
E_PROPERTY = "0x80060888"
E_SEGMENT = "0x8006088a"
E_ARGUMENT = "0x80040203"
E_DUPLICATE = "0x80040237"
E_LENGTH = "0x80044331"
E_AUTH = "0x80072560"
E_BATCH = "0x80060891"
E_REQUESTS = "0x80072322"
E_TIME = "0x80072321"
E_CONCURRENCY = "0x80072326"
#: SdkEntityDoesNotSupportMessage: the table has no such message (e.g. no UpsertMultiple)
E_MESSAGE_UNSUPPORTED = "0x80040800"
FORMATTED = "OData.Community.Display.V1.FormattedValue"
NAV_PROPERTY = "Microsoft.Dynamics.CRM.associatednavigationproperty"
LOOKUP_TABLE = "Microsoft.Dynamics.CRM.lookuplogicalname"
_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_SEGMENT_RE = re.compile(r"^(?P<name>[A-Za-z_$][A-Za-z0-9_.$]*)(?:\((?P<key>.*)\))?$")
_CONFIG = ("window_seconds", "max_requests", "max_execution_ms", "max_concurrent", "concurrency_retry_after",
           "batch_inner_requests_count", "max_batch_requests", "max_page_size", "max_add_list_members",
           "skip_inactive_members", "remove_member_entity_id", "remove_member_list_available",
           "application_user", "strict_literal_types", "max_url_length", "max_batch_url_length",
           "max_url_segment_length", "change_tracking_unsupported", "change_tracking_expire_days",
           "formatted_utc_offset_minutes", "upsert_multiple_unavailable")
_STATUS_TEXT = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
                403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 412: "Precondition Failed",
                413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error",
                501: "Not Implemented", 503: "Service Unavailable", 504: "Gateway Timeout"}


class ODataError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


_NOW_CACHE: list = [0, ""]


def _now() -> str:
    """The current time as Dataverse writes it; one shared string per second (records share it)."""
    second = int(time.time())
    if _NOW_CACHE[0] != second:
        _NOW_CACHE[0], _NOW_CACHE[1] = second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return _NOW_CACHE[1]


def _lower(value: str) -> str:
    """``value.lower()`` that returns ``value`` itself when it is already lower case (saves a copy)."""
    low = value.lower()
    return value if low == value else low


def _guid(value: str) -> str | None:
    value = value.strip().strip("{}")
    return value.lower() if _GUID_RE.match(value) else None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
class Attr:
    """A column: ``kind`` string/int/bool/datetime/guid; ``labels`` the option labels of a choice column
    ({value: label}) or of a Yes/No column ({True: label, False: label}); ``schema`` its SchemaName."""

    __slots__ = ("kind", "max_len", "readonly", "default", "choices", "labels", "schema")

    def __init__(self, kind: str, max_len: int = 0, readonly: bool = False, default: Any = None,
                 choices: tuple | None = None, labels: dict | None = None, schema: str | None = None) -> None:
        self.kind, self.max_len, self.readonly, self.default, self.choices = kind, max_len, readonly, default, choices
        self.labels, self.schema = labels, schema
        if labels and kind == "int" and choices is None:
            self.choices = tuple(labels)


def _choice(labels: dict, default: Any = None) -> Attr:
    return Attr("int", default=default, labels=labels)


def _yes_no(true_label: str, false_label: str, default: bool = False) -> Attr:
    return Attr("bool", default=default, labels={True: true_label, False: false_label})


_ALLOW = {True: "Do Not Allow", False: "Allow"}  # donot* columns: 1 "Do Not Allow", 0 "Allow" (contact reference)
#: new_loyaltycard.new_tier: a custom choice (values from the publisher's 100000000 prefix, as Dataverse numbers them)
_TIER_LABELS = {100000000: "Bronze", 100000001: "Silver", 100000002: "Gold", 100000003: "Platinum"}
_SEED_KINDS = {"string": "string", "text": "string", "memo": "string", "integer": "int", "int": "int",
               "boolean": "bool", "bool": "bool", "datetime": "datetime", "choice": "int", "picklist": "int",
               "guid": "guid"}


def _seed_columns(spec: dict | None) -> dict[str, Attr]:
    """Extra columns declared by the seed: ``{"new_tier": {"type": "choice", "options": {"100000000": "Gold"}},
    "donotsms": {"type": "boolean", "labels": {"true": "Do Not Allow", "false": "Allow"}},
    "new_loyaltyid": {"type": "string", "max_length": 100}, "new_points": {"type": "integer"}}``."""
    out: dict[str, Attr] = {}
    for name, col in (spec or {}).items():
        if isinstance(col, str):
            col = {"type": col}
        kind = _SEED_KINDS.get(str(col.get("type", "string")).lower())
        if kind is None or name != name.lower():
            raise ValueError(f"dynamics365 seed: column {name!r} must be lower case with a type in {sorted(_SEED_KINDS)}")
        labels = None
        if col.get("options"):
            labels = {int(v): str(text) for v, text in col["options"].items()}
        elif kind == "bool":
            given = {str(k).lower(): v for k, v in (col.get("labels") or {}).items()}
            labels = {True: given.get("true", "Yes"), False: given.get("false", "No")}
        max_len = int(col.get("max_length", 100 if kind == "string" else 0))
        out[name] = Attr(kind, max_len, default=col.get("default"), labels=labels, schema=col.get("schema_name"))
    return out


def _utc_text(value) -> str:
    """A seeded datetime in Dataverse's format (``2024-01-01T00:00:00Z``)."""
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _s(n: int) -> Attr:
    return Attr("string", n)


class Table:
    """A generic table: records are dicts keyed by the primary key, kept in creation order."""

    def __init__(self, logical: str, set_name: str, pk: str, attrs: dict[str, Attr],
                 lookups: dict[str, tuple[str, str]] | None = None, alternate_keys: tuple = (),
                 required: tuple = ()) -> None:
        self.logical, self.set_name, self.pk = logical, set_name, pk
        self.attrs = {pk: Attr("guid", readonly=True), **attrs}
        self.lookups = lookups or {}  # navigation property -> (target set, "_x_value" attribute)
        for _, value_attr in self.lookups.values():
            self.attrs[value_attr] = Attr("guid", readonly=True)
        self.alternate_keys = alternate_keys
        self.required = required
        self.clear()

    def clear(self) -> None:
        self.rows: dict[str, dict] = {}
        self.order: list[str | None] = []
        self.pos: dict[str, int] = {}
        #: alternate key column -> normalised value -> record id (Dataverse enforces a key with a unique index)
        self.key_index: dict[str, dict[Any, str]] = {k: {} for k in self.alternate_keys}

    def _index(self, rec, add: bool) -> None:
        for k, index in self.key_index.items():
            v = rec.get(k)
            if v is None:
                continue
            if add:
                index[_norm(v)] = rec[self.pk]
            elif index.get(_norm(v)) == rec[self.pk]:
                del index[_norm(v)]

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, rid: str):
        return self.rows.get(rid)

    def position(self, rec) -> int:
        return self.pos[self.rid(rec)]

    def rid(self, rec) -> str:
        return rec[self.pk]

    def value(self, rec, attr: str):
        if attr in rec:
            return rec[attr]
        a = self.attrs.get(attr)
        return a.default if a else None

    def row(self, rec) -> dict:
        return {a: self.value(rec, a) for a in self.attrs}

    def insert(self, data: dict, rid: str, now: str):
        # createdon / modifiedon only come in from a seed (the API drops read-only columns before this)
        created = data.get("createdon") or now
        rec = {self.pk: rid, **data, "createdon": created, "modifiedon": data.get("modifiedon") or created}
        self.rows[rid] = rec
        self.pos[rid] = len(self.order)
        self.order.append(rid)
        self._index(rec, True)
        return rec

    def apply(self, rec, data: dict, now: str) -> None:
        self._index(rec, False)
        rec.update(data)
        rec["modifiedon"] = now
        self._index(rec, True)

    def snapshot(self, rec) -> Any:
        return dict(rec)

    def restore(self, rec, snap) -> None:
        self._index(rec, False)
        rec.clear()
        rec.update(snap)
        self._index(rec, True)

    def remove(self, rid: str) -> None:
        rec = self.rows.pop(rid, None)
        if rec is not None:
            self._index(rec, False)
        pos = self.pos.pop(rid, None)
        if pos is not None:
            self.order[pos] = None

    def scan(self, start: int):
        order, rows = self.order, self.rows
        for i in range(start, len(order)):
            rid = order[i]
            if rid is not None:
                yield i, rows[rid]

    def lookup(self, attr: str, values: list) -> list | None:
        """Records whose ``attr`` equals one of ``values`` through an index, or None when not indexed."""
        if attr == self.pk:
            return [self.rows[v] for v in {str(v).lower() for v in values if v is not None} if v in self.rows]
        return None

    def find_by_alternate_key(self, attr: str, value: Any):
        index = getattr(self, "key_index", {}).get(attr)
        if index is not None:
            rid = index.get(_norm(value))
            return self.rows.get(rid) if rid is not None else None
        for rec in self.rows.values():
            if _norm(self.value(rec, attr)) == _norm(value):
                return rec
        return None


class Contact:
    __slots__ = ("id", "email", "first", "last", "state", "created", "modified", "extra", "pos")

    def __init__(self, cid: str, email, first, last, state: int, now: str, extra: dict | None, pos: int) -> None:
        self.id, self.email, self.first, self.last, self.state = cid, email, first, last, state
        self.created = self.modified = now
        self.extra, self.pos = extra, pos


_CONTACT_SLOTS = {"contactid": "id", "emailaddress1": "email", "firstname": "first", "lastname": "last",
                  "statecode": "state", "createdon": "created", "modifiedon": "modified"}


class ContactTable(Table):
    """Contacts kept compact (``__slots__`` records) and indexed by id, email and alternate keys."""

    def __init__(self, custom_attrs: dict[str, Attr], alternate_keys: tuple) -> None:
        attrs = {
            "firstname": _s(50), "lastname": _s(50), "fullname": Attr("string", 160, readonly=True),
            "emailaddress1": _s(100), "emailaddress2": _s(100), "telephone1": _s(50), "mobilephone": _s(50),
            "jobtitle": _s(100), "statecode": Attr("int", default=0, choices=(0, 1)),
            "statuscode": Attr("int", default=1, choices=(1, 2)),
            "gendercode": _choice({1: "Male", 2: "Female"}),
            "preferredcontactmethodcode": _choice({1: "Any", 2: "Email", 3: "Phone", 4: "Fax", 5: "Mail"}),
            **{k: Attr("bool", default=False, labels=_ALLOW) for k in (
                "donotbulkemail", "donotemail", "donotphone", "donotfax", "donotpostalmail", "donotbulkpostalmail")},
            "donotsendmm": _yes_no("Do Not Send", "Send"), "followemail": _yes_no("Allow", "Do Not Allow", True),
            "createdon": Attr("datetime", readonly=True), "modifiedon": Attr("datetime", readonly=True),
            **custom_attrs,
        }
        super().__init__("contact", "contacts", "contactid", attrs, alternate_keys=alternate_keys)

    def clear(self) -> None:
        self.rows: dict[str, Contact] = {}
        self.order: list[Contact | None] = []
        self.by_email: dict[str, Any] = {}  # lower-cased email -> Contact or tuple of Contacts
        self.by_key: dict[str, dict[str, Contact]] = {k: {} for k in getattr(self, "alternate_keys", ())}

    def position(self, rec) -> int:
        return rec.pos

    def rid(self, rec) -> str:
        return rec.id

    def value(self, rec: Contact, attr: str):
        slot = _CONTACT_SLOTS.get(attr)
        if slot is not None:
            return getattr(rec, slot)
        if attr == "fullname":
            return " ".join(x for x in (rec.first, rec.last) if x) or None
        if attr == "statuscode" and (rec.extra is None or attr not in rec.extra):
            return 2 if rec.state == 1 else 1
        if rec.extra and attr in rec.extra:
            return rec.extra[attr]
        a = self.attrs.get(attr)
        return a.default if a else None

    def _index(self, rec: Contact, add: bool) -> None:
        if rec.email:
            key = _lower(rec.email)
            cur = self.by_email.get(key)
            if add:
                self.by_email[key] = rec if cur is None else (cur + (rec,) if isinstance(cur, tuple) else (cur, rec))
            elif cur is rec:
                del self.by_email[key]
            elif isinstance(cur, tuple):
                rest = tuple(c for c in cur if c is not rec)
                self.by_email[key] = rest[0] if len(rest) == 1 else rest
        for k, index in self.by_key.items():
            v = self.value(rec, k)
            if v is not None:
                if add:
                    index[_norm(v)] = rec
                elif index.get(_norm(v)) is rec:
                    del index[_norm(v)]

    def insert(self, data: dict, rid: str, now: str):
        extra = {k: v for k, v in data.items() if k not in _CONTACT_SLOTS} or None
        rec = Contact(rid, data.get("emailaddress1"), _intern(data.get("firstname")), _intern(data.get("lastname")),
                      int(data.get("statecode") or 0), now, extra, len(self.order))
        if data.get("createdon") or data.get("modifiedon"):  # from a seed only (the API drops read-only columns)
            rec.created = data.get("createdon") or now
            rec.modified = data.get("modifiedon") or rec.created
        self.rows[rid] = rec
        self.order.append(rec)
        self._index(rec, True)
        return rec

    def apply(self, rec: Contact, data: dict, now: str) -> None:
        self._index(rec, False)
        for k, v in data.items():
            slot = _CONTACT_SLOTS.get(k)
            if slot is not None:
                if k in ("firstname", "lastname"):
                    v = _intern(v)
                setattr(rec, slot, v if k != "statecode" else int(v or 0))
            else:
                if rec.extra is None:
                    rec.extra = {}
                rec.extra[k] = v
        rec.modified = now
        self._index(rec, True)

    def snapshot(self, rec: Contact):
        return (rec.email, rec.first, rec.last, rec.state, rec.modified, dict(rec.extra) if rec.extra else None)

    def restore(self, rec: Contact, snap) -> None:
        self._index(rec, False)
        rec.email, rec.first, rec.last, rec.state, rec.modified, rec.extra = snap
        self._index(rec, True)

    def remove(self, rid: str) -> None:
        rec = self.rows.pop(rid, None)
        if rec is not None:
            self._index(rec, False)
            self.order[rec.pos] = None

    def scan(self, start: int):
        order = self.order
        for i in range(start, len(order)):
            rec = order[i]
            if rec is not None:
                yield i, rec

    def lookup(self, attr: str, values: list) -> list | None:
        if attr == "contactid":
            return super().lookup(attr, values)
        if attr == "emailaddress1":
            out = []
            for v in {str(v).lower() for v in values if v is not None}:
                hit = self.by_email.get(v)
                if hit is not None:
                    out.extend(hit if isinstance(hit, tuple) else (hit,))
            return out
        if attr in self.by_key:
            index = self.by_key[attr]
            return [index[n] for n in {_norm(v) for v in values} if n in index]
        return None

    def find_by_alternate_key(self, attr: str, value: Any):
        if attr in self.by_key:
            return self.by_key[attr].get(_norm(value))
        return super().find_by_alternate_key(attr, value)


class MarketingList:
    """Membership of one marketing list: contact ids in insertion order (an ordered set)."""

    __slots__ = ("members",)

    def __init__(self) -> None:
        self.members: dict[str, None] = {}


class ListTable(Table):
    """Marketing lists: ``membercount`` is read from the membership itself, so it follows every add / remove
    (and their rollback in change sets) — "Shows the sum of all members in the marketing list" (list entity
    reference, ``MemberCount``: IsValidForCreate/IsValidForUpdate False)."""

    def __init__(self, members_of, *args, **kwargs) -> None:
        self.members_of = members_of
        super().__init__(*args, **kwargs)

    def value(self, rec, attr: str):
        if attr == "membercount":
            ml = self.members_of(rec["listid"])
            return len(ml.members) if ml is not None else 0
        return super().value(rec, attr)


# ---------------------------------------------------------------------------------------------
# metadata (EntityDefinitions)
# ---------------------------------------------------------------------------------------------
#: per table: SchemaName, ObjectTypeCode, PrimaryNameAttribute, display name, ownership, activity, custom.
#: Standard tables' values from the Dataverse table references (contact 2, list 4300, listmember 4301,
#: organization 1019); custom tables get codes >= 10000 as Dataverse assigns them.
_ENTITY_META = {
    "contact": ("Contact", 2, "fullname", "Contact", "UserOwned", False, False),
    "list": ("List", 4300, "listname", "Marketing List", "UserOwned", False, False),
    "listmember": ("ListMember", 4301, None, "Marketing List Member", "None", False, False),
    "new_segmentmembership": ("new_SegmentMembership", 10000, "new_name", "Segment Membership", "UserOwned",
                              False, True),
    "new_emailevent": ("new_EmailEvent", 10001, "subject", "Email Event", "UserOwned", True, True),
    "new_loyaltycard": ("new_LoyaltyCard", 10002, "new_name", "Loyalty Card", "UserOwned", False, True),
    "organization": ("Organization", 1019, "name", "Organization", "None", False, False),
}
#: option labels of the choice columns (state/status per the table references; new_eventtype is the
#: sandbox's own custom choice). Status options carry the state they belong to.
_OPTION_LABELS: dict[tuple[str, str], dict[int, str]] = {
    ("contact", "statecode"): {0: "Active", 1: "Inactive"},
    ("contact", "statuscode"): {1: "Active", 2: "Inactive"},
    ("list", "statecode"): {0: "Active", 1: "Inactive"},
    ("list", "statuscode"): {0: "Active", 1: "Inactive"},
    ("list", "createdfromcode"): {1: "Account", 2: "Contact", 4: "Lead"},
    ("new_segmentmembership", "statecode"): {0: "Active", 1: "Inactive"},
    ("new_segmentmembership", "statuscode"): {1: "Active", 2: "Inactive"},
    ("new_emailevent", "statecode"): {0: "Open", 1: "Completed", 2: "Canceled", 3: "Scheduled"},
    ("new_emailevent", "statuscode"): {1: "Open", 2: "Completed", 3: "Canceled", 4: "Scheduled"},
    ("new_emailevent", "new_eventtype"): {100000000: "Send", 100000001: "Open", 100000002: "Click",
                                          100000003: "Bounce"},
    ("new_loyaltycard", "statecode"): {0: "Active", 1: "Inactive"},
    ("new_loyaltycard", "statuscode"): {1: "Active", 2: "Inactive"},
}
_STATUS_STATE = {("contact", 1): 0, ("contact", 2): 1, ("list", 0): 0, ("list", 1): 1,
                 ("new_segmentmembership", 1): 0, ("new_segmentmembership", 2): 1,
                 ("new_emailevent", 1): 0, ("new_emailevent", 2): 1, ("new_emailevent", 3): 2,
                 ("new_emailevent", 4): 3, ("new_loyaltycard", 1): 0, ("new_loyaltycard", 2): 1}
_ATTRIBUTE_CLASS = {"String": "StringAttributeMetadata", "Memo": "MemoAttributeMetadata",
                    "Boolean": "BooleanAttributeMetadata", "Integer": "IntegerAttributeMetadata",
                    "DateTime": "DateTimeAttributeMetadata", "Uniqueidentifier": "UniqueIdentifierAttributeMetadata",
                    "Lookup": "LookupAttributeMetadata", "State": "StateAttributeMetadata",
                    "Status": "StatusAttributeMetadata", "Picklist": "PicklistAttributeMetadata"}
_OPTION_CASTS = ("PicklistAttributeMetadata", "StateAttributeMetadata", "StatusAttributeMetadata",
                 "BooleanAttributeMetadata")
_NOT_UPDATABLE = {("list", "createdfromcode"), ("list", "type")}


def _meta_id(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "segexport-dataverse-metadata:" + ":".join(parts)))


def _label(text: str) -> dict:
    loc = {"Label": text, "LanguageCode": 1033, "IsManaged": True, "MetadataId": _meta_id("label", text),
           "HasChanged": None}
    return {"LocalizedLabels": [loc] if text else [], "UserLocalizedLabel": loc if text else None}


def _labels(table: Table, name: str) -> dict:
    """The option labels of a choice / state / status / Yes-No column ({} for other columns)."""
    attr = table.attrs.get(name)
    if attr is not None and attr.labels:
        return attr.labels
    return _OPTION_LABELS.get((table.logical, name), {})


def _entity_metadata(table: Table, change_tracking: bool = False) -> dict:
    schema, otc, primary_name, display, ownership, activity, custom = _ENTITY_META[table.logical]
    return {
        "MetadataId": _meta_id(table.logical), "LogicalName": table.logical, "SchemaName": schema,
        "EntitySetName": table.set_name, "LogicalCollectionName": table.set_name,
        "CollectionSchemaName": schema + "s", "PrimaryIdAttribute": table.pk, "PrimaryNameAttribute": primary_name,
        "ObjectTypeCode": otc, "IsCustomEntity": custom, "IsActivity": activity,
        "IsIntersect": table.logical == "listmember", "OwnershipType": ownership, "TableType": "Standard",
        "IsValidForAdvancedFind": True, "DisplayName": _label(display), "DisplayCollectionName": _label(display + "s"),
        "Description": _label(""), "ChangeTrackingEnabled": change_tracking,
        "CanChangeTrackingBeEnabled": {"Value": table.logical != "listmember", "CanBeChanged": True,
                                       "ManagedPropertyLogicalName": "canchangetrackingbeenabled"},
    }


def _attribute_metadata(table: Table, name: str, attr: Attr) -> dict:
    logical, targets, schema = name, None, attr.schema or name
    if name.startswith("_") and name.endswith("_value"):
        logical, kind = name[1:-len("_value")], "Lookup"
        navs = [(nav, t) for nav, (t, value_attr) in table.lookups.items() if value_attr == name]
        targets = [t for _, t in navs]
        # a custom lookup's SchemaName is its navigation property name (new_ContactId), as Dataverse names them
        schema = navs[0][0] if len(navs) == 1 and navs[0][0].lower() == logical else logical
    elif name == table.pk or attr.kind == "guid":
        kind = "Uniqueidentifier"
    elif name in ("statecode", "statuscode"):
        kind = "State" if name == "statecode" else "Status"
    elif attr.kind == "int" and (attr.choices or _labels(table, name)):
        kind = "Picklist"
    else:
        kind = {"string": "Memo" if attr.max_len > 4000 or attr.max_len == 0 and name == "query" else "String",
                "bool": "Boolean", "int": "Integer", "datetime": "DateTime"}.get(attr.kind, "String")
    primary_name = _ENTITY_META[table.logical][2]
    writable = name == table.pk or not attr.readonly
    out = {
        "@odata.type": f"#{NS}{_ATTRIBUTE_CLASS[kind]}", "MetadataId": _meta_id(table.logical, logical),
        "LogicalName": logical, "SchemaName": schema, "EntityLogicalName": table.logical, "AttributeType": kind,
        "AttributeTypeName": {"Value": f"{kind}Type"}, "AttributeOf": None, "IsPrimaryId": name == table.pk,
        "IsPrimaryName": logical == primary_name, "IsCustomAttribute": logical.startswith("new_"),
        "IsLogical": False, "IsValidForCreate": writable,
        "IsValidForUpdate": writable and name != table.pk and (table.logical, name) not in _NOT_UPDATABLE,
        "IsValidForRead": True, "DisplayName": _label(logical), "Description": _label(""),
        "RequiredLevel": {"Value": "SystemRequired" if name in table.required or name == table.pk else "None",
                          "CanBeChanged": False, "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings"},
    }
    if kind in ("String", "Memo"):
        out["MaxLength"] = attr.max_len or 1048576
    if kind == "Lookup":
        out["Targets"] = [t.removesuffix("s") for t in targets or []]
    if kind in ("Picklist", "State", "Status"):
        out["DefaultFormValue"] = attr.default if isinstance(attr.default, int) else -1
    return out


def _option(value, text: str) -> dict:
    return {"Value": value, "Label": _label(text), "Description": _label(""), "Color": None, "IsManaged": True,
            "ExternalValue": None, "ParentValues": [], "Tag": None, "IsHidden": False,
            "MetadataId": None, "HasChanged": None}


def _option_set(table: Table, attr_meta: dict) -> dict:
    logical, kind = attr_meta["LogicalName"], attr_meta["AttributeType"]
    labels = _labels(table, logical)
    common = {"MetadataId": _meta_id(table.logical, logical, "optionset"), "HasChanged": None,
              "IsCustomOptionSet": logical.startswith("new_"), "IsGlobal": False, "IsManaged": True,
              "Name": f"{table.logical}_{logical}", "ExternalTypeName": None, "IntroducedVersion": "5.0.0.0",
              "Description": _label(""), "DisplayName": _label(logical)}
    if kind == "Boolean":  # BooleanOptionSetMetadata: TrueOption / FalseOption (values 1 / 0)
        return {**common, "OptionSetType": "Boolean", "TrueOption": _option(1, labels.get(True, "Yes")),
                "FalseOption": _option(0, labels.get(False, "No"))}
    options = []
    for value, text in labels.items():
        opt = _option(value, text)
        if kind == "State":
            opt.update({"@odata.type": f"#{NS}StateOptionMetadata", "InvariantName": text,
                        "DefaultStatus": next((s for (t, s), st in _STATUS_STATE.items()
                                               if t == table.logical and st == value), None)})
        elif kind == "Status":
            opt.update({"@odata.type": f"#{NS}StatusOptionMetadata",
                        "State": _STATUS_STATE.get((table.logical, value)), "TransitionData": None})
        options.append(opt)
    return {**common, "OptionSetType": kind, "Options": options}


def _metadata_view(logical: str, fields: dict[str, str]) -> Table:
    """A Table over metadata dicts so $filter and its type checks work on PascalCase properties."""
    view = Table(logical, "EntityDefinitions", "MetadataId", {k: Attr(v) for k, v in fields.items()})
    view.value = lambda rec, a: rec.get(a)  # type: ignore[method-assign]
    return view


_ENTITY_FIELDS = {"LogicalName": "string", "SchemaName": "string", "EntitySetName": "string",
                  "LogicalCollectionName": "string", "CollectionSchemaName": "string", "PrimaryIdAttribute": "string",
                  "PrimaryNameAttribute": "string", "ObjectTypeCode": "int", "IsCustomEntity": "bool",
                  "IsActivity": "bool", "IsIntersect": "bool", "OwnershipType": "string", "TableType": "string",
                  "IsValidForAdvancedFind": "bool", "DisplayName": "complex", "DisplayCollectionName": "complex",
                  "Description": "complex", "ChangeTrackingEnabled": "bool", "CanChangeTrackingBeEnabled": "complex"}
_ATTRIBUTE_FIELDS = {"LogicalName": "string", "SchemaName": "string", "EntityLogicalName": "string",
                     "AttributeType": "string", "AttributeTypeName": "complex", "AttributeOf": "string",
                     "IsPrimaryId": "bool", "IsPrimaryName": "bool", "IsCustomAttribute": "bool", "IsLogical": "bool",
                     "IsValidForCreate": "bool", "IsValidForUpdate": "bool", "IsValidForRead": "bool",
                     "DisplayName": "complex", "Description": "complex", "RequiredLevel": "complex",
                     "MaxLength": "int", "Targets": "complex", "DefaultFormValue": "int"}


def _intern(value):
    """Share repeated short strings (first / last names) between records."""
    return sys.intern(value) if isinstance(value, str) and len(value) <= 40 else value


def _norm(value):
    if isinstance(value, str):
        return value.lower()
    return value


def _listmember_id(listid: str, entityid: str) -> str:
    """A stable, reversible listmemberid: the XOR of the list and member GUIDs (no storage per member)."""
    return str(uuid.UUID(int=uuid.UUID(listid).int ^ uuid.UUID(entityid).int))


# ---------------------------------------------------------------------------------------------
# $filter
# ---------------------------------------------------------------------------------------------
_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>'(?:[^']|'')*')
  | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,12})?)?(?:Z|[+-]\d{2}:\d{2})(?![\w:.+-]))
  | (?P<date>\d{4}-\d{2}-\d{2}(?![\w:.-]))
  | (?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![\w-]))
  | (?P<num>-?\d+(?:\.\d+)?(?![\w]))
  | (?P<ident>[A-Za-z_@][A-Za-z0-9_./@]*)
  | (?P<punct>[()\],=])
""", re.VERBOSE)
_COMPARISONS = {"eq", "ne", "gt", "ge", "lt", "le"}
_OPERATOR_KIND = {"eq": "Equal", "ne": "NotEqual", "gt": "GreaterThan", "ge": "GreaterThanOrEqual",
                  "lt": "LessThan", "le": "LessThanOrEqual"}
_LITERALS = {"true": (True, "Edm.Boolean"), "false": (False, "Edm.Boolean"), "null": (None, None)}
#: the Edm type of a column kind, and the literal types ODataLib accepts in a comparison with it
_EDM = {"guid": "Edm.Guid", "datetime": "Edm.DateTimeOffset", "string": "Edm.String", "int": "Edm.Int32",
        "bool": "Edm.Boolean"}
_ACCEPTS = {"guid": {"Edm.Guid"}, "datetime": {"Edm.DateTimeOffset", "Edm.Date"}, "string": {"Edm.String"}}
#: documented on learn.microsoft.com/power-apps/developer/data-platform/webapi/query/filter-rows ("Manage
#: single quotes"); the same text comes back for unquoted GUIDs in PropertyValues (XrmDefinitelyTyped#309)
_INVALID_JSON = ("Invalid JSON. A comma character ',' was expected in scope 'Array'. Every two elements in an array "
                 "and properties of an object must be separated by commas.")
_NO_TOKEN = (None, None, None, "")


def _parse_datetime_literal(text: str) -> datetime:
    """An OData ``Edm.DateTimeOffset`` literal (``2024-01-01T00:00:00Z``, ``…T10:00:00.123+01:00``) in UTC."""
    head, _, frac = text.partition(".")
    tz = ""
    if frac:
        m = re.match(r"(\d+)(.*)$", frac)
        digits, tz = m.group(1), m.group(2)
        text = f"{head}.{digits[:6].ljust(6, '0')}{tz}"
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


@lru_cache(maxsize=4096)
def _stored_datetime(value: str):
    """A datetime column's stored string (``%Y-%m-%dT%H:%M:%SZ``) as an aware datetime (shared strings: cached)."""
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


def _read_json_array(text: str) -> list:
    """``PropertyValues`` as Dataverse reads it: a JSON array (ODataLib's reader also takes single-quoted strings,
    without ``''`` escapes). Anything else fails with the documented ``Invalid JSON`` message."""
    i, n, out = 1, len(text), []
    ws = " \t\r\n"

    def skip(j: int) -> int:
        while j < n and text[j] in ws:
            j += 1
        return j

    i = skip(i)
    if i < n and text[i] == "]":
        return out
    while True:
        i = skip(i)
        if i >= n:
            raise ODataError(400, E_PROPERTY, _INVALID_JSON)
        ch = text[i]
        if ch == '"':
            m = re.compile(r'"(?:[^"\\]|\\.)*"').match(text, i)
            if m is None:
                raise ODataError(400, E_PROPERTY, "Invalid JSON. Unterminated string in 'PropertyValues'.")
            out.append(json.loads(m.group()))
            i = m.end()
        elif ch == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise ODataError(400, E_PROPERTY, "Invalid JSON. Unterminated string in 'PropertyValues'.")
            out.append(text[i + 1:end])
            i = end + 1
        else:
            # a JSON number (no leading zero: an unquoted GUID such as 0123abcd-... is invalid JSON, not a 500)
            m = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null").match(text, i)
            if m is None:
                raise ODataError(400, E_PROPERTY, _INVALID_JSON)
            out.append(json.loads(m.group()))
            i = m.end()
        i = skip(i)
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]" and skip(i + 1) == n:
            return out
        raise ODataError(400, E_PROPERTY, _INVALID_JSON)


class FilterParser:
    """``$filter`` as Dataverse's ODataLib parses it: typed literals (unquoted ``Edm.Guid``,
    ``Edm.DateTimeOffset``, ``Edm.Date``; quoted ``Edm.String``), a 400 for incompatible operand types,
    ``Microsoft.Dynamics.CRM.In``/``NotIn`` with JSON ``PropertyValues`` and ``@alias`` parameters."""

    def __init__(self, text: str, table: Table, aliases: dict | None = None, strict: bool = True) -> None:
        self.table, self.aliases, self.strict = table, aliases or {}, strict
        self.tokens: list[tuple] = []
        pos = 0
        while pos < len(text):
            if text[pos] == "[":  # a JSON array (PropertyValues): up to the matching bracket outside "strings"
                depth, j, in_str = 0, pos, False
                while j < len(text):
                    c = text[j]
                    if in_str:
                        if c == "\\":
                            j += 1
                        elif c == '"':
                            in_str = False
                    elif c == '"':
                        in_str = True
                    elif c == "[":
                        depth += 1
                    elif c == "]":
                        depth -= 1
                        if depth == 0:
                            break
                    j += 1
                if j >= len(text):
                    raise ODataError(400, E_PROPERTY, f"Syntax error: ']' expected in '{text}'.")
                self.tokens.append(("array", text[pos:j + 1], None, text[pos:j + 1]))
                pos = j + 1
                continue
            m = _TOKEN_RE.match(text, pos)
            if m is None:
                if text[pos] == "'":
                    raise ODataError(400, E_PROPERTY, f"There is an unterminated literal at position {pos} in "
                                                      f"'{text}'.")
                raise ODataError(400, E_PROPERTY, f"Syntax error at position {pos} in '{text}'.")
            pos = m.end()
            kind = m.lastgroup
            if kind == "ws":
                continue
            val = m.group()
            if kind == "str":
                self.tokens.append(("lit", val[1:-1].replace("''", "'"), "Edm.String", val))
            elif kind == "datetime":
                try:
                    self.tokens.append(("lit", _parse_datetime_literal(val), "Edm.DateTimeOffset", val))
                except ValueError as exc:
                    raise ODataError(400, E_PROPERTY, f"Unrecognized 'Edm.DateTimeOffset' literal '{val}' at "
                                                      f"'{m.start()}' in '{text}'.") from exc
            elif kind == "date":
                try:
                    d = datetime.fromisoformat(val).replace(tzinfo=UTC)
                except ValueError as exc:
                    raise ODataError(400, E_PROPERTY, f"Unrecognized 'Edm.Date' literal '{val}' at '{m.start()}' "
                                                      f"in '{text}'.") from exc
                self.tokens.append(("lit", d, "Edm.Date", val))
            elif kind == "guid":
                self.tokens.append(("lit", val.lower(), "Edm.Guid", val))
            elif kind == "num":
                self.tokens.append(("lit", float(val) if "." in val else int(val),
                                    "Edm.Double" if "." in val else "Edm.Int32", val))
            elif kind == "ident" and val.lower() in _LITERALS:
                self.tokens.append(("lit", *_LITERALS[val.lower()], val))
            else:
                self.tokens.append((kind, val, None, val))
        self.i = 0
        self.text = text

    def peek(self, offset: int = 0):
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else _NO_TOKEN

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def expect(self, value: str) -> None:
        tok = self.take()
        if tok[1] != value or tok[0] not in ("punct", "ident"):
            raise ODataError(400, E_PROPERTY, f"Syntax error: '{value}' expected in '{self.text}'.")

    def parse(self):
        node = self.parse_or()
        if self.i != len(self.tokens):
            raise ODataError(400, E_PROPERTY, f"Syntax error at token {self.peek()[3]!r} in '{self.text}'.")
        return node

    def _word(self, word: str) -> bool:
        kind, val = self.peek()[:2]
        return kind == "ident" and val.lower() == word

    def parse_or(self):
        node = self.parse_and()
        while self._word("or"):
            self.take()
            node = ("or", node, self.parse_and())
        return node

    def parse_and(self):
        node = self.parse_not()
        while self._word("and"):
            self.take()
            node = ("and", node, self.parse_not())
        return node

    def parse_not(self):
        if self._word("not"):
            self.take()
            return ("not", self.parse_not())
        return self.parse_primary()

    def prop(self, name: str) -> str:
        if "/" in name:
            raise ODataError(501, E_PROPERTY, f"Navigation paths in $filter ('{name}') are not supported by the "
                                              "sandbox.")
        if name not in self.table.attrs:
            raise ODataError(400, E_PROPERTY, f"Could not find a property named '{name}' on type "
                                              f"'{NS}{self.table.logical}'.")
        return name

    def _alias(self, name: str) -> FilterParser | None:
        """A parser over the text of parameter alias ``name`` (``&@p1=...``); None when it has no value."""
        text = self.aliases.get(name)
        if text is None:
            return None
        return FilterParser(text, self.table, None, self.strict)

    def operand(self):
        kind, val, edm, _ = self.take()
        if kind == "lit":
            return ("lit", val, edm)
        if kind == "ident" and val.startswith("@"):
            sub = self._alias(val)
            if sub is None:
                return ("lit", None, None)  # OData: an alias without a value is null
            node = sub.operand()
            if sub.i != len(sub.tokens):
                raise ODataError(400, E_PROPERTY, f"Syntax error in the value of parameter alias '{val}'.")
            return node
        if kind == "ident":
            return ("prop", self.prop(val))
        raise ODataError(400, E_PROPERTY, f"Syntax error in '{self.text}'.")

    def _check_types(self, op: str, left, right):
        """ODataLib refuses comparisons of incompatible types (a quoted string with a Guid or DateTimeOffset
        column); the emulator checks literals against the column's type."""
        for prop, lit, prop_first in ((left, right, True), (right, left, False)):
            if prop[0] != "prop" or lit[0] != "lit" or lit[2] is None:
                continue
            kind = self.table.attrs[prop[1]].kind
            accepted = _ACCEPTS.get(kind)
            if accepted is None or lit[2] in accepted:
                return left, right
            if not self.strict and lit[2] == "Edm.String":  # lenient mode: convert the string as before
                value = lit[1]
                if kind == "guid":
                    value = _guid(value) or value
                elif kind == "datetime":
                    try:
                        value = _parse_datetime_literal(value)
                    except ValueError:
                        pass
                new = ("lit", value, _EDM[kind])
                return (left, new) if prop_first else (new, right)
            a, b = (_EDM[kind], lit[2]) if prop_first else (lit[2], _EDM[kind])
            raise ODataError(400, E_PROPERTY, f"A binary operator with incompatible types was detected. Found "
                                              f"operand types '{a}' and '{b}' for operator kind "
                                              f"'{_OPERATOR_KIND[op]}'.")
        return left, right

    def parse_primary(self):
        kind, val = self.peek()[:2]
        if val == "(" and kind == "punct":
            self.take()
            node = self.parse_or()
            self.expect(")")
            return node
        if kind == "ident" and self.peek(1)[1] == "(":
            return self.parse_function()
        left = self.operand()
        op_kind, op = self.take()[:2]
        if op_kind != "ident" or op.lower() not in _COMPARISONS:
            raise ODataError(400, E_PROPERTY, f"Syntax error: comparison operator expected in '{self.text}'.")
        right = self.operand()
        left, right = self._check_types(op.lower(), left, right)
        return ("cmp", op.lower(), left, right)

    def _argument(self, name: str):
        """One function argument: a literal, a JSON array, or a parameter alias holding either."""
        kind, val, edm, raw = self.take()
        if kind == "ident" and val.startswith("@"):
            sub = self._alias(val)
            if sub is None:
                return None
            value = sub._argument(name)
            if sub.i != len(sub.tokens):
                raise ODataError(400, E_PROPERTY, f"Syntax error in the value of parameter alias '{val}'.")
            return value
        if kind == "array":
            return _read_json_array(raw)
        if kind == "lit":
            return val
        raise ODataError(400, E_PROPERTY, f"Syntax error in the value of parameter '{name}' in '{self.text}'.")

    def _coerce_in_value(self, attr: str, value):
        """PropertyValues is Collection(Edm.String): each value is converted to the column's type."""
        if value is None:
            return None
        kind = self.table.attrs[attr].kind
        text = value if isinstance(value, str) else json.dumps(value)
        try:
            if kind == "guid":
                gid = _guid(text)
                if gid is None:
                    raise ValueError(text)
                return gid
            if kind == "int":
                return int(text)
            if kind == "bool":
                return {"true": True, "false": False, "1": True, "0": False}[text.lower()]
            if kind == "datetime":
                return _parse_datetime_literal(text) if "T" in text else datetime.fromisoformat(text).replace(
                    tzinfo=UTC)
        except (ValueError, KeyError) as exc:
            raise ODataError(400, E_ARGUMENT, f"Cannot convert the literal '{text}' to the expected type "
                                              f"'{_EDM.get(kind, 'Edm.String')}'.") from exc
        return text

    def parse_function(self):
        name = self.take()[1]
        self.expect("(")
        lname = name.lower()
        if lname in ("contains", "startswith", "endswith"):
            prop = self.operand()
            self.expect(",")
            value = self.operand()
            self.expect(")")
            if prop[0] != "prop" or value[0] != "lit":
                raise ODataError(400, E_PROPERTY, f"Unsupported use of {name} in '{self.text}'.")
            return ("func", lname, prop[1], value[1])
        if lname in ("microsoft.dynamics.crm.in", "microsoft.dynamics.crm.notin"):
            args: dict[str, Any] = {}
            while True:
                kind, key = self.take()[:2]
                if kind != "ident":
                    raise ODataError(400, E_PROPERTY, f"Syntax error: parameter name expected in '{self.text}'.")
                self.expect("=")
                args[str(key)] = self._argument(str(key))
                if self.peek()[1] == ",":
                    self.take()
                    continue
                self.expect(")")
                break
            unknown = [k for k in args if k not in ("PropertyName", "PropertyValues")]
            if unknown:
                raise ODataError(400, E_PROPERTY, f"The parameter '{unknown[0]}' is not a parameter of {name}.")
            if not isinstance(args.get("PropertyName"), str) or not isinstance(args.get("PropertyValues"), list):
                raise ODataError(400, E_ARGUMENT, f"{name} requires PropertyName and PropertyValues.")
            attr = self.prop(args["PropertyName"])
            values = [self._coerce_in_value(attr, v) for v in args["PropertyValues"]]
            return ("in", attr, values, lname.endswith("notin"))
        raise ODataError(501, E_PROPERTY, f"The function '{name}' is not supported by the sandbox.")


def _cmp_value(v):
    if isinstance(v, str):
        return v.lower()
    return v


def _comparable(a, b):
    """A datetime column's stored string against a DateTimeOffset/Date literal: both as datetimes."""
    if isinstance(b, datetime) and isinstance(a, str):
        return _stored_datetime(a), b
    if isinstance(a, datetime) and isinstance(b, str):
        return a, _stored_datetime(b)
    return a, b


def evaluate(node, table: Table, rec) -> bool:
    kind = node[0]
    if kind == "and":
        return evaluate(node[1], table, rec) and evaluate(node[2], table, rec)
    if kind == "or":
        return evaluate(node[1], table, rec) or evaluate(node[2], table, rec)
    if kind == "not":
        return not evaluate(node[1], table, rec)
    if kind == "in":
        v = table.value(rec, node[1])
        values = node[2]
        if values and isinstance(values[0], datetime) and isinstance(v, str):
            v = _stored_datetime(v)
        hit = _cmp_value(v) in {_cmp_value(x) for x in values}
        return hit != node[3]
    if kind == "func":
        v = table.value(rec, node[2])
        if not isinstance(v, str):
            return False
        v, arg = v.lower(), str(node[3]).lower()
        return {"contains": arg in v, "startswith": v.startswith(arg), "endswith": v.endswith(arg)}[node[1]]
    _, op, left, right = node
    a = table.value(rec, left[1]) if left[0] == "prop" else left[1]
    b = table.value(rec, right[1]) if right[0] == "prop" else right[1]
    if isinstance(a, datetime) or isinstance(b, datetime):
        a, b = _comparable(a, b)
    else:
        a, b = _cmp_value(a), _cmp_value(b)
    if op == "eq":
        return a == b
    if op == "ne":
        return a != b
    if a is None or b is None:
        return False
    try:
        return {"gt": a > b, "ge": a >= b, "lt": a < b, "le": a <= b}[op]
    except TypeError:
        return False


def candidates(node, table: Table) -> list | None:
    """Records that can match, found through indexes; None means "scan everything"."""
    kind = node[0]
    if kind == "cmp" and node[1] == "eq":
        left, right = node[2], node[3]
        if left[0] == "prop" and right[0] == "lit":
            return table.lookup(left[1], [right[1]])
        if right[0] == "prop" and left[0] == "lit":
            return table.lookup(right[1], [left[1]])
        return None
    if kind == "in" and not node[3]:
        return table.lookup(node[1], node[2])
    if kind == "or":
        a, b = candidates(node[1], table), candidates(node[2], table)
        if a is None or b is None:
            return None
        seen = {id(r) for r in a}
        return a + [r for r in b if id(r) not in seen]
    if kind == "and":
        a, b = candidates(node[1], table), candidates(node[2], table)
        if a is None:
            return b
        if b is None:
            return a
        ids = {id(r) for r in b}
        return [r for r in a if id(r) in ids]
    return None


# ---------------------------------------------------------------------------------------------
# the emulator
# ---------------------------------------------------------------------------------------------
class DataverseEmulator(Emulator):
    config_keys = _CONFIG
    name = "dynamics365"
    prefix = "/dataverse"

    window_seconds = 300.0
    max_requests = 6000
    max_execution_ms = 1_200_000
    max_concurrent = 52
    concurrency_retry_after = 1
    batch_inner_requests_count = True
    max_batch_requests = 1000
    max_page_size = 5000
    max_add_list_members = 0
    skip_inactive_members = True
    remove_member_entity_id = "record"
    remove_member_list_available = True
    application_user = True
    strict_literal_types = True
    max_url_length = 32768
    max_batch_url_length = 65536
    max_url_segment_length = 260
    #: ``Prefer: odata.track-changes`` on a table without change tracking: "ignore" (no delta link, no
    #: Preference-Applied) or "error" (400)
    change_tracking_unsupported = "ignore"
    change_tracking_expire_days = 7.0
    #: the calling user's time zone for datetime formatted values (minutes east of UTC)
    formatted_utc_offset_minutes = 0
    #: tables (logical names) that have no UpsertMultiple message (see the module docstring)
    upsert_multiple_unavailable: tuple[str, ...] = ()

    #: extra contact columns and the contact alternate keys (a publisher-prefixed customer id)
    contact_custom_attributes = {"new_customerid": _s(100)}
    contact_alternate_keys = ("new_customerid",)

    def __init__(self, sandbox) -> None:
        super().__init__(sandbox)
        self.tenant_id = str(uuid.UUID(sandbox.token()))
        self.client_id = str(uuid.UUID(sandbox.token()))
        self.client_secret = sandbox.token("dv~")
        self.marketing_list_id = str(uuid.UUID(sandbox.token()))
        self.user_id = str(uuid.UUID(sandbox.token()))
        self.business_unit_id = str(uuid.UUID(sandbox.token()))
        self.organization_id = str(uuid.UUID(sandbox.token()))
        self.tokens: dict[str, tuple[float, str]] = {}  # access token -> (expiry, audience)
        self.contacts = ContactTable(dict(self.contact_custom_attributes), tuple(self.contact_alternate_keys))
        self.loyalty_cards = self._loyalty_table({})
        self.lists = ListTable(lambda lid: self.memberships.get(lid), "list", "lists", "listid", {
            "listname": _s(128), "createdfromcode": Attr("int", choices=(1, 2, 4)),
            "type": Attr("bool", default=False), "membertype": Attr("int", readonly=True),
            "membercount": Attr("int", readonly=True, default=0), "lockstatus": Attr("bool", default=False),
            "statecode": Attr("int", default=0, choices=(0, 1)), "statuscode": Attr("int", default=0),
            "donotsendonoptout": Attr("bool", default=True), "ignoreinactivelistmembers": Attr("bool", default=True),
            "purpose": _s(512), "source": _s(128), "description": Attr("string", 2000), "query": Attr("string", 0),
            "createdon": Attr("datetime", readonly=True), "modifiedon": Attr("datetime", readonly=True),
        }, required=("listname", "createdfromcode"))
        self.segment_rows = Table("new_segmentmembership", "new_segmentmemberships", "new_segmentmembershipid", {
            "new_name": _s(100), "new_segmentid": _s(100), "new_externalkey": _s(100),
            "new_lastexportedon": Attr("datetime"), "statecode": Attr("int", default=0, choices=(0, 1)),
            "statuscode": Attr("int", default=1),
            "createdon": Attr("datetime", readonly=True), "modifiedon": Attr("datetime", readonly=True),
        }, lookups={"new_ContactId": ("contacts", "_new_contactid_value")}, alternate_keys=("new_externalkey",),
            required=("new_name",))
        self.email_events = Table("new_emailevent", "new_emailevents", "activityid", {
            "subject": _s(400), "description": Attr("string", 2000), "actualstart": Attr("datetime"),
            "actualend": Attr("datetime"),
            "new_eventtype": Attr("int", choices=(100000000, 100000001, 100000002, 100000003)),
            "new_campaignname": _s(200), "new_deliveryname": _s(200), "new_trackingurl": _s(2000),
            "new_mirrorpageurl": _s(2000), "new_eventdate": Attr("datetime"), "new_eventid": _s(100),
            "new_bouncetype": _s(100),
            "activitytypecode": Attr("string", readonly=True, default="new_emailevent"),
            "statecode": Attr("int", default=0, choices=(0, 1, 2, 3)), "statuscode": Attr("int", default=1),
            "createdon": Attr("datetime", readonly=True), "modifiedon": Attr("datetime", readonly=True),
        }, lookups={"regardingobjectid_contact_new_emailevent": ("contacts", "_regardingobjectid_value")},
            alternate_keys=("new_eventid",), required=("subject",))
        self.organizations = Table("organization", "organizations", "organizationid", {"name": _s(160)})
        #: listmember is served by ``listmembers()``; this Table only describes it for EntityDefinitions
        self.listmember_meta = Table("listmember", "listmembers", "listmemberid", {
            "entitytype": _s(100), "createdon": Attr("datetime", readonly=True),
            "modifiedon": Attr("datetime", readonly=True)},
            lookups={"listid": ("lists", "_listid_value"), "entityid": ("contacts", "_entityid_value")})
        self.tables: dict[str, Table] = {}
        self.memberships: dict[str, MarketingList] = {}
        self.change_tracking: dict[str, bool] = {}
        self.version = 0
        self.row_versions: dict[str, dict[str, int]] = {}  # entity set -> record id -> version of its last change
        self.tombstones: dict[str, dict[str, int]] = {}  # entity set -> deleted record id -> version of the delete
        self._tx: list | None = None
        self.reset()

    # -- setup ------------------------------------------------------------------------------
    @staticmethod
    def _loyalty_table(columns: dict) -> Table:
        """``new_loyaltycard``: a custom table referencing a contact through the custom lookup ``new_ContactId``
        (lookup property ``_new_contactid_value``), alternate key ``new_cardnumber``."""
        return Table("new_loyaltycard", "new_loyaltycards", "new_loyaltycardid", {
            "new_name": _s(100), "new_cardnumber": _s(100), "new_points": Attr("int"),
            "new_tier": _choice(dict(_TIER_LABELS)), "new_issuedon": Attr("datetime"),
            "statecode": Attr("int", default=0, choices=(0, 1)), "statuscode": Attr("int", default=1, choices=(1, 2)),
            "createdon": Attr("datetime", readonly=True), "modifiedon": Attr("datetime", readonly=True),
            **columns,
        }, lookups={"new_ContactId": ("contacts", "_new_contactid_value")}, alternate_keys=("new_cardnumber",))

    def reset(self) -> None:
        seed = self.sandbox.seed.get("dynamics365", {})
        self.reset_config()
        self.usage: deque[tuple[float, float]] = deque()
        self.usage_ms = 0.0
        self.in_flight = 0
        columns = seed.get("columns") or {}
        self.contacts = ContactTable({**self.contact_custom_attributes, **_seed_columns(columns.get("contact"))},
                                     tuple(seed.get("contact_alternate_keys") or self.contact_alternate_keys))
        self.loyalty_cards = self._loyalty_table(_seed_columns(columns.get("new_loyaltycard")))
        self.tables = {t.set_name: t for t in (self.contacts, self.lists, self.segment_rows, self.email_events,
                                               self.loyalty_cards, self.organizations)}
        self.change_tracking = {"contact": True, "new_loyaltycard": True, **(seed.get("change_tracking") or {})}
        # versions only grow (also across resets), like Dataverse's row versions: an old delta token stays valid
        self.version = max(self.version, int(time.time() * 1000))
        self.row_versions = {name: {} for name in self.tables}
        self.tombstones = {name: {} for name in self.tables}
        for table in self.tables.values():
            table.clear()
        self.memberships = {}
        now = _now()
        self.organizations.insert({"name": "Sandbox organization"}, self.organization_id, now)
        for n, c in enumerate(seed.get("contacts", [])):
            data = {k: (_utc_text(v) if k in ("createdon", "modifiedon") and v else v)
                    for k, v in c.items() if k != "contactid"}
            cid = c.get("contactid") or uuid.uuid5(uuid.NAMESPACE_URL, f"segexport-contact:{n}:{c.get('emailaddress1')}")
            self.contacts.insert(data, str(cid).lower(), now)
        self._seed_loyalty_cards(seed, now)
        self._create_list({"listname": "Sandbox static contact list", "createdfromcode": 2, "type": False},
                          self.marketing_list_id, now)
        for lst in seed.get("lists", []):
            lid = str(lst.get("listid") or uuid.uuid5(uuid.NAMESPACE_URL, f"segexport-list:{lst.get('listname')}")).lower()
            data = {k: v for k, v in lst.items() if k not in ("listid", "members")}
            self._create_list({"createdfromcode": 2, "type": False, **data}, lid, now)
            for cid in lst.get("members", []):
                rec = self.contacts.get(str(cid).lower())
                if rec is not None:
                    self.memberships[lid].members[rec.id] = None

    def _seed_loyalty_cards(self, seed: dict, now: str) -> None:
        """Seeded ``new_loyaltycards`` rows (the contact as ``_new_contactid_value``); without the key, one sample
        card for each of the first 20 seeded contacts."""
        rows = seed.get("new_loyaltycards")
        if rows is None:
            rows = []
            for n, rec in enumerate(islice(self.contacts.rows.values(), 20)):
                rows.append({"new_loyaltycardid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"segexport-card:{rec.id}")),
                             "new_name": f"Card LC-{n + 1:06d}", "new_cardnumber": f"LC-{n + 1:06d}",
                             "new_points": (n + 1) * 150, "new_tier": 100000000 + n % 4,
                             "_new_contactid_value": rec.id, "statecode": 1 if n % 7 == 6 else 0})
        for n, row in enumerate(rows):
            data = {k: (_utc_text(v) if k in ("createdon", "modifiedon", "new_issuedon") and v else v)
                    for k, v in row.items() if k != "new_loyaltycardid"}
            contact = data.pop("new_contactid", None) or data.get("_new_contactid_value")
            if contact is not None:
                data["_new_contactid_value"] = str(contact).lower()
            if data.get("statecode") and "statuscode" not in data:
                data["statuscode"] = 2
            rid = str(row.get("new_loyaltycardid") or uuid.uuid5(uuid.NAMESPACE_URL, f"segexport-card:{n}")).lower()
            self.loyalty_cards.insert(data, rid, now)

    def _tracked(self, table: Table) -> bool:
        return bool(self.change_tracking.get(table.logical))

    def _touch(self, table: Table, rid: str) -> None:
        """Record a create / update for change tracking (undone with its change set)."""
        self.version += 1
        versions, tombs = self.row_versions[table.set_name], self.tombstones[table.set_name]
        old_v, old_t = versions.get(rid), tombs.pop(rid, None)
        versions[rid] = self.version

        def undo() -> None:
            if old_v is None:
                versions.pop(rid, None)
            else:
                versions[rid] = old_v
            if old_t is not None:
                tombs[rid] = old_t

        self._undo(undo)

    def _tombstone(self, table: Table, rid: str) -> None:
        """Record a delete for change tracking: the delta link answers it as a ``$deletedEntity``."""
        self.version += 1
        versions, tombs = self.row_versions[table.set_name], self.tombstones[table.set_name]
        old_v = versions.pop(rid, None)
        tombs[rid] = self.version

        def undo() -> None:
            tombs.pop(rid, None)
            if old_v is not None:
                versions[rid] = old_v

        self._undo(undo)

    def _create_list(self, data: dict, lid: str, now: str):
        data = {**data, "membertype": data.get("createdfromcode"), "statuscode": 0 if not data.get("statecode") else 1}
        rec = self.lists.insert(data, lid, now)
        self.memberships[lid] = MarketingList()
        return rec

    def check_setting(self, key: str, value: Any) -> Any:
        if key == "remove_member_entity_id" and value not in ("record", "listmember", "either"):
            raise ValueError("remove_member_entity_id must be record, listmember or either")
        if key == "upsert_multiple_unavailable":
            items = value.split(",") if isinstance(value, str) else list(value or ())
            return tuple(str(v).strip().lower() for v in items if str(v).strip())
        return super().check_setting(key, value)

    def info(self, base: str) -> dict:
        return {"base_url": base + self.prefix, "authority": f"{base}/login/{self.tenant_id}",
                "tenant_id": self.tenant_id, "client_id": self.client_id, "client_secret": self.client_secret,
                "marketing_list_id": self.marketing_list_id,
                "instance_discovery_url": f"{base}/login/common/discovery/instance"}

    def state(self) -> dict:
        lists = {}
        for lid, rec in self.lists.rows.items():
            lists[lid] = {"listname": rec.get("listname"), "createdfromcode": rec.get("createdfromcode"),
                          "type": rec.get("type", False), "lockstatus": rec.get("lockstatus", False),
                          "membercount": self.lists.value(rec, "membercount"),
                          "members": list(self.memberships[lid].members)}
        return {
            "contacts": len(self.contacts),
            "lists": lists,
            "new_segmentmemberships": [self.segment_rows.row(r) for r in self.segment_rows.rows.values()],
            "new_emailevents": [self.email_events.row(r) for r in self.email_events.rows.values()],
            "new_loyaltycards": [self.loyalty_cards.row(r) for r in self.loyalty_cards.rows.values()],
            "service_protection": {"requests_in_window": len(self.usage),
                                   "execution_ms_in_window": round(self.usage_ms), "in_flight": self.in_flight},
        }

    # -- errors -----------------------------------------------------------------------------
    @staticmethod
    def odata_error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                            headers={"OData-Version": "4.0", **(headers or {})})

    def error_response(self, status: int, kind: str, headers: dict | None = None) -> Response:
        if status == 429:
            return self.odata_error(429, E_REQUESTS, self._requests_message(), {"Retry-After": "5"})
        messages = {500: "An unexpected error occurred.", 502: "Bad Gateway",
                    503: "The service is temporarily unavailable. Please try again later.",
                    504: "The request timed out."}
        return self.odata_error(status, "0x80040216" if status == 500 else f"0x{status:08x}",
                                messages.get(status, "Error"), headers)

    def _requests_message(self) -> str:
        return (f"Number of requests exceeded the limit of {self.max_requests} over time window of "
                f"{int(self.window_seconds)} seconds.")

    # -- Entra ID ---------------------------------------------------------------------------
    def _aad_error(self, status: int, error: str, code: int, description: str) -> JSONResponse:
        trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        return JSONResponse({
            "error": error,
            "error_description": f"AADSTS{code}: {description} Trace ID: {trace} Correlation ID: {corr} "
                                 f"Timestamp: {stamp}",
            "error_codes": [code], "timestamp": stamp, "trace_id": trace, "correlation_id": corr,
            "error_uri": f"https://login.microsoftonline.com/error?code={code}",
        }, status_code=status)

    def _tenant_error(self, tenant: str) -> JSONResponse:
        return self._aad_error(400, "invalid_tenant", 90002,
                               f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and "
                               "are signing into the correct cloud.")

    async def h_openid(self, request: Request) -> Response:
        self.sandbox.log.request(self.name, "GET", "openid-configuration")
        tenant = request.path_params["tenant"]
        if tenant.lower() != self.tenant_id:
            return self._tenant_error(tenant)
        base = f"{request.url.scheme}://{request.url.netloc}/login/{self.tenant_id}"
        return JSONResponse({
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt",
                                                      "client_secret_basic"],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{base}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": f"{request.url.scheme}://{request.url.netloc}/login/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True, "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr", "nonce", "tid", "ver"],
            "kerberos_endpoint": f"{base}/kerberos",
            "tenant_region_scope": "EU", "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net", "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        })

    async def h_instance_discovery(self, request: Request) -> Response:
        self.sandbox.log.request(self.name, "GET", "instance-discovery")
        endpoint = request.query_params.get("authorization_endpoint", "")
        parts = urlsplit(endpoint)
        segs = [s for s in parts.path.split("/") if s]
        host = request.url.netloc
        # msal sends the authority host without its port (it keeps only the host name)
        if parts.hostname != request.url.hostname or len(segs) < 2 or segs[0] != "login":
            return JSONResponse({"error": "invalid_instance", "error_description": "AADSTS50049: Unknown or "
                                 "invalid instance.", "error_codes": [50049]}, status_code=400)
        tenant = segs[1]
        return JSONResponse({
            "tenant_discovery_endpoint": f"https://{host}/login/{tenant}/v2.0/.well-known/openid-configuration",
            "api-version": "1.1",
            "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
        })

    async def h_token(self, request: Request) -> Response:
        fault = await self.before(request, "token")
        if fault is not None:
            return fault
        tenant = request.path_params["tenant"]
        if tenant.lower() != self.tenant_id:
            return self._tenant_error(tenant)
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
        client_id, secret = form.get("client_id"), form.get("client_secret")
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                user, _, pwd = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
                client_id, secret = unquote(user), unquote(pwd)
            except (ValueError, UnicodeDecodeError):
                pass
        grant = form.get("grant_type")
        if not grant:
            return self._aad_error(400, "invalid_request", 900144,
                                   "The request body must contain the following parameter: 'grant_type'.")
        if grant != "client_credentials":
            return self._aad_error(400, "unsupported_grant_type", 70003,
                                   "The app requested an unsupported grant type.")
        if not client_id:
            return self._aad_error(400, "invalid_request", 900144,
                                   "The request body must contain the following parameter: 'client_id'.")
        if client_id != self.client_id:
            return self._aad_error(400, "unauthorized_client", 700016,
                                   f"Application with identifier '{client_id}' was not found in the directory "
                                   f"'{self.tenant_id}'. This can happen if the application has not been installed "
                                   "by the administrator of the tenant or consented to by any user in the tenant.")
        if not secret and not form.get("client_assertion"):
            return self._aad_error(401, "invalid_client", 7000218,
                                   "The request body must contain the following parameter: 'client_assertion' "
                                   "or 'client_secret'.")
        if secret != self.client_secret:
            return self._aad_error(401, "invalid_client", 7000215,
                                   "Invalid client secret provided. Ensure the secret being sent in the request is "
                                   f"the client secret value, not the client secret ID, for a secret added to app "
                                   f"'{self.client_id}'.")
        resource = f"{request.url.scheme}://{request.url.netloc}{self.prefix}"
        scopes = [s for s in form.get("scope", "").split() if s not in ("openid", "profile", "offline_access")]
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            return self._aad_error(400, "invalid_scope", 1002012,
                                   f"The provided value for scope {form.get('scope', '')} is not valid. Client "
                                   "credential flows must have a scope value with /.default suffixed to the "
                                   "resource identifier (application ID URI).")
        wanted = scopes[0][: -len("/.default")].rstrip("/")
        if wanted.lower() != resource.lower():
            return self._aad_error(400, "invalid_resource", 500011,
                                   f"The resource principal named {wanted} was not found in the tenant named "
                                   f"{self.tenant_id}. This can happen if the application has not been installed by "
                                   "the administrator of the tenant or consented to by any user in the tenant. You "
                                   "might have sent your authentication request to the wrong tenant.")
        ttl = int(self.sandbox.token_ttl)
        now = time.time()
        header_b = _b64(json.dumps({"typ": "JWT", "alg": "RS256", "kid": "sandbox"}).encode())
        payload = _b64(json.dumps({
            "aud": resource + "/", "iss": f"https://sts.windows.net/{self.tenant_id}/", "iat": int(now),
            "nbf": int(now), "exp": int(now) + ttl, "appid": self.client_id, "tid": self.tenant_id,
            "oid": self.user_id, "sub": self.user_id, "idtyp": "app", "ver": "1.0",
            "jti": uuid.uuid4().hex,
        }).encode())
        token = f"{header_b}.{payload}.{_b64(uuid.uuid4().bytes + uuid.uuid4().bytes)}"
        if len(self.tokens) > 1000:
            self.tokens = {t: v for t, v in self.tokens.items() if v[0] > now}
        self.tokens[token] = (now + ttl, resource.lower())
        return JSONResponse({"token_type": "Bearer", "expires_in": ttl, "ext_expires_in": ttl,
                             "access_token": token})

    # -- routing ----------------------------------------------------------------------------
    def routes(self) -> list:
        return [
            Route("/login/common/discovery/instance", self.h_instance_discovery),
            Mount("/login/{tenant}", routes=[
                Route("/v2.0/.well-known/openid-configuration", self.h_openid),
                Route("/oauth2/v2.0/token", self.h_token, methods=["POST"]),
            ]),
            Route(self.prefix + API + "/{rest:path}", self.h_api,
                  methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
            Route("/_sandbox/dynamics365/config", self.h_config, methods=["GET", "POST"]),
        ]

    # -- service protection -------------------------------------------------------------------
    def _prune(self, now: float) -> None:
        horizon = now - self.window_seconds
        usage = self.usage
        while usage and usage[0][0] < horizon:
            self.usage_ms -= usage.popleft()[1]

    def _limit(self, now: float) -> Response | None:
        self._prune(now)
        if self.in_flight >= self.max_concurrent:
            return self.odata_error(429, E_CONCURRENCY, f"Number of concurrent requests exceeded the limit of "
                                    f"{self.max_concurrent}.", {"Retry-After": str(self.concurrency_retry_after)})
        if len(self.usage) >= self.max_requests:
            wait = self.usage[0][0] + self.window_seconds - now
            return self.odata_error(429, E_REQUESTS, self._requests_message(),
                                    {"Retry-After": str(max(1, math.ceil(wait)))})
        if self.usage_ms >= self.max_execution_ms:
            excess, wait = self.usage_ms - self.max_execution_ms, 0.0
            for t, ms in self.usage:
                excess -= ms
                wait = t + self.window_seconds - now
                if excess < 0:
                    break
            return self.odata_error(429, E_TIME, f"Combined execution time of incoming requests exceeded limit of "
                                    f"{self.max_execution_ms:,} milliseconds over time window of "
                                    f"{int(self.window_seconds)} seconds. Decrease number of concurrent requests or "
                                    "reduce the duration of requests and try again later.",
                                    {"Retry-After": str(max(1, math.ceil(wait)))})
        return None

    def _authenticate(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        entry = self.tokens.get(token.strip())
        if entry is None or entry[0] <= time.time():
            return False
        return entry[1] == f"{request.url.scheme}://{request.url.netloc}{self.prefix}".lower()

    def _unauthorized(self, request: Request) -> Response:
        base = f"{request.url.scheme}://{request.url.netloc}"
        return self.odata_error(401, E_AUTH, "The access token is missing, invalid or has expired.", {
            "WWW-Authenticate": f"Bearer authorization_uri={base}/login/{self.tenant_id}/oauth2/authorize, "
                                f"resource_id={base}{self.prefix}/"})

    @staticmethod
    def _http_sys_error(status: int) -> Response:
        """The front end's own refusals (HTTP.sys pages, not OData errors): URL too long, segment too long."""
        title, text = {414: ("Request URL Too Long", "HTTP Error 414. The request URL is too long."),
                       400: ("Bad Request - Invalid URL", "HTTP Error 400. The request URL is invalid.")}[status]
        body = ('<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01//EN""http://www.w3.org/TR/html4/strict.dtd">\r\n'
                f"<HTML><HEAD><TITLE>{title}</TITLE>\r\n"
                '<META HTTP-EQUIV="Content-Type" Content="text/html; charset=us-ascii"></HEAD>\r\n'
                f"<BODY><h2>{title}</h2>\r\n<hr><p>{text}</p>\r\n</BODY></HTML>\r\n")
        return Response(body, status_code=status, media_type="text/html; charset=us-ascii")

    def _url_refusal(self, url: str, rest: str, limit: int) -> Response | None:
        if len(url) > limit:
            return self._http_sys_error(414)
        if any(len(seg) > self.max_url_segment_length for seg in rest.split("/")):
            return self._http_sys_error(400)
        return None

    async def h_api(self, request: Request) -> Response:
        rest = request.path_params["rest"]
        refused = self._url_refusal(str(request.url), rest, self.max_url_length)
        if refused is not None:
            self.sandbox.log.request(self.name, request.method, "url-refused")
            return refused
        raw = await request.body() if request.method in ("POST", "PATCH", "PUT") else b""
        route = _route_name(request.method, rest)
        items = _count_items(rest, raw, request.headers.get("content-type", ""))
        authed = self._authenticate(request)
        start = time.monotonic()
        if authed:
            limited = self._limit(start)
            if limited is not None:
                self.sandbox.log.request(self.name, request.method, route)
                return limited
            self.in_flight += 1
        try:
            fault = await self.before(request, route, items)
            if fault is not None:
                return fault
            if not authed:
                return self._unauthorized(request)
            if not self.application_user:
                return self.odata_error(403, E_AUTH, "The user is not a member of the organization.")
            base = f"{request.url.scheme}://{request.url.netloc}"
            headers = {k.lower(): v for k, v in request.headers.items()}
            if len(request.headers.getlist("prefer")) > 1:  # the docs send one Prefer header per preference
                headers["prefer"] = ", ".join(request.headers.getlist("prefer"))
            if rest == "$batch":
                resp = await self.batch(request.method, headers, raw, base)
            else:
                resp = self.dispatch(request.method, rest, request.url.query, headers, raw, base)
            self._rate_headers(resp)
            return resp
        finally:
            if authed:
                self.in_flight -= 1
                now = time.monotonic()
                ms = (now - start) * 1000.0
                self.usage.append((now, ms))
                self.usage_ms += ms

    def _rate_headers(self, resp: Response) -> None:
        resp.headers["x-ms-ratelimit-burst-remaining-xrm-requests"] = str(max(0, self.max_requests - len(self.usage)))
        resp.headers["x-ms-ratelimit-time-remaining-xrm-requests"] = f"{max(0.0, self.max_execution_ms - self.usage_ms):.2f}"
        resp.headers["x-ms-service-request-id"] = str(uuid.uuid4())
        resp.headers.setdefault("OData-Version", "4.0")

    # -- dispatch -----------------------------------------------------------------------------
    def dispatch(self, method: str, rest: str, query: str, headers: dict, raw: bytes, base: str) -> Response:
        try:
            return self._dispatch(method, rest, query, headers, raw, base)
        except ODataError as exc:
            return self.odata_error(exc.status, exc.code, exc.message, exc.headers)

    def _dispatch(self, method, rest, query, headers, raw, base) -> Response:
        api = base + self.prefix + API
        q = dict(parse_qsl(query, keep_blank_values=True))
        prefer = _parse_prefer(headers.get("prefer", ""))
        body = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise ODataError(400, E_ARGUMENT, "The request body is not valid JSON.") from exc
        segments = _split_path(rest)
        if not segments:
            raise ODataError(404, E_SEGMENT, "Resource not found for the segment ''.")
        first = _SEGMENT_RE.match(segments[0])
        if first is None:
            raise ODataError(404, E_SEGMENT, f"Resource not found for the segment '{segments[0]}'.")
        name, key = first.group("name"), first.group("key")
        if name in ("WhoAmI", NS + "WhoAmI") and len(segments) == 1:
            self._method(method, "GET")
            return self.json({"@odata.context": f"{api}/$metadata#{NS}WhoAmIResponse",
                              "BusinessUnitId": self.business_unit_id, "UserId": self.user_id,
                              "OrganizationId": self.organization_id})
        if name in ("AddListMembersList", NS + "AddListMembersList") and len(segments) == 1:
            self._method(method, "POST")
            return self.add_list_members(body)
        if name in ("RemoveListMembersList", NS + "RemoveListMembersList") and len(segments) == 1:
            self._method(method, "POST")
            return self.remove_list_members(body)
        if name == "listmembers":
            return self.listmembers(method, key, segments, q, headers, prefer, api)
        if name == "EntityDefinitions":
            return self.entity_definitions(method, key, segments, q, api)
        table = self.tables.get(name)
        if table is None:
            raise ODataError(404, E_SEGMENT, f"Resource not found for the segment '{segments[0]}'.")
        if key is None:
            if len(segments) == 1:
                if method == "GET":
                    return self.query(table, q, prefer, api, rest, query, table.scan, None, track=True)
                self._method(method, "POST")
                return self.create(table, body, prefer, api, q)
            action = segments[1].removeprefix(NS)
            if len(segments) == 2 and action in ("CreateMultiple", "UpdateMultiple", "UpsertMultiple"):
                self._method(method, "POST")
                return self.multiple(table, action, body, api)
            if len(segments) == 2 and segments[1] == "$count":
                self._method(method, "GET")
                if "$deltatoken" in q:  # the number of changes since the delta token (change tracking doc)
                    self._require_tracking(table)
                    lo = self._read_deltatoken(q["$deltatoken"])
                    return Response(str(len(self._changes(table, lo, self.version))), media_type="text/plain")
                return Response(str(len(table)), media_type="text/plain")
            raise ODataError(404, E_SEGMENT, f"Resource not found for the segment '{segments[1]}'.")
        rec, key_desc = self._resolve_key(table, key)
        if len(segments) == 1:
            if method == "GET":
                if rec is None:
                    raise self._missing(table, key_desc)
                return self.single(table, rec, q, api, prefer)
            if method == "PATCH":
                return self.upsert(table, rec, key, body, headers, prefer, api, q)
            if method == "DELETE":
                if rec is None:
                    raise self._missing(table, key_desc)
                self.delete(table, rec)
                return Response(status_code=204, headers={"OData-Version": "4.0"})
            raise ODataError(405, E_ARGUMENT, f"The HTTP method '{method}' is not allowed on this resource.")
        if rec is None:
            raise self._missing(table, key_desc)
        return self.navigation(table, rec, method, segments[1:], q, body, prefer, api, rest, query)

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        if method != allowed:
            raise ODataError(405, E_ARGUMENT, f"The HTTP method '{method}' is not allowed on this resource.")

    @staticmethod
    def json(payload, status: int = 200, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(payload, status_code=status, media_type=JSON_TYPE,
                            headers={"OData-Version": "4.0", **(headers or {})})

    @staticmethod
    def _missing(table: Table, key_desc: str) -> ODataError:
        return ODataError(404, E_NOT_FOUND, f"{table.logical} With Id = {key_desc} Does Not Exist")

    def _resolve_key(self, table: Table, key: str):
        key = key.strip()
        gid = _guid(key)
        if gid is not None:
            return table.get(gid), gid
        pairs = {}
        for part in key.split(","):
            k, sep, v = part.partition("=")
            if not sep:
                raise ODataError(400, E_ARGUMENT, f"Bad Request - Error in query syntax: invalid key '{key}'.")
            v = v.strip()
            if v.startswith("'") and v.endswith("'"):
                v = v[1:-1].replace("''", "'")
            elif _guid(v):
                v = _guid(v)
            pairs[k.strip()] = v
        if len(pairs) == 1:
            (attr, value), = pairs.items()
            if attr == table.pk:
                gid = _guid(str(value))
                return (table.get(gid) if gid else None), str(value)
            if attr in table.alternate_keys:
                return table.find_by_alternate_key(attr, value), f"{attr}={value}"
        raise ODataError(400, E_ARGUMENT, f"The key '{key}' does not match an alternate key defined on "
                                          f"{table.logical}.")

    def _filter(self, q: dict, table: Table):
        """The parsed ``$filter`` of query ``q`` (None without one), with its ``@alias`` parameters."""
        if not q.get("$filter"):
            return None
        aliases = {k: v for k, v in q.items() if k.startswith("@")}
        return FilterParser(q["$filter"], table, aliases, self.strict_literal_types).parse()

    # -- metadata -------------------------------------------------------------------------------
    def _metadata_tables(self) -> list[Table]:
        return [self.contacts, self.lists, self.listmember_meta, self.segment_rows, self.email_events,
                self.loyalty_cards, self.organizations]

    @staticmethod
    def _meta_select(q: dict, fields: dict, type_name: str) -> list[str] | None:
        raw = q.get("$select")
        if not raw:
            return None
        names = [a.strip() for a in raw.split(",") if a.strip()]
        for a in names:
            if a not in fields and a not in ("MetadataId", "OptionSet", "GlobalOptionSet"):
                raise ODataError(400, E_PROPERTY, f"Could not find a property named '{a}' on type "
                                                  f"'{NS}{type_name}'.")
        return names

    @staticmethod
    def _meta_project(item: dict, select: list[str] | None) -> dict:
        if select is None:
            return dict(item)
        out = {k: item[k] for k in ("@odata.type",) if k in item}
        out.update({a: item.get(a) for a in select})
        out["MetadataId"] = item["MetadataId"]
        return out

    @staticmethod
    def _meta_expand(q: dict) -> tuple[bool, list[str] | None]:
        """``$expand=OptionSet`` / ``OptionSet($select=Options)`` (also GlobalOptionSet): (expand?, inner select)."""
        raw = q.get("$expand")
        if not raw:
            return False, None
        m = re.fullmatch(r"\s*(OptionSet|GlobalOptionSet)(?:\((.*)\))?\s*", raw)
        if m is None:
            prop = raw.split("(")[0].strip()
            raise ODataError(400, E_PROPERTY, f"Could not find a property named '{prop}' on type "
                                              f"'{NS}AttributeMetadata'.")
        inner = None
        if m.group(2):
            opts = dict(parse_qsl(m.group(2).replace(";", "&")))
            if "$select" in opts:
                inner = [x.strip() for x in opts["$select"].split(",") if x.strip()]
        return True, inner

    def _meta_entity(self, key: str) -> Table:
        key = key.strip()
        gid = _guid(key)
        for table in self._metadata_tables():
            if gid is not None and _meta_id(table.logical) == gid:
                return table
            m = re.fullmatch(r"LogicalName\s*=\s*'([^']*)'", key)
            if m is not None and m.group(1).lower() == table.logical:
                return table
        raise ODataError(404, E_NOT_FOUND, f"Could not find entity with key {key}.")

    def entity_definitions(self, method: str, key: str | None, segments: list[str], q: dict, api: str) -> Response:
        """``EntityDefinitions``: the table metadata Microsoft's clients read before any record call (GET only)."""
        if method != "GET":
            raise ODataError(501, E_ARGUMENT, "Metadata changes are not supported by the sandbox.")
        for opt in q:
            if opt.startswith("$") and opt not in ("$select", "$filter", "$expand"):
                raise ODataError(501, E_PROPERTY, f"The query option {opt} is not supported on metadata by the "
                                                  "sandbox.")
        ctx = f"{api}/$metadata#EntityDefinitions"
        if key is None:
            if len(segments) != 1:
                raise ODataError(404, E_SEGMENT, f"Resource not found for the segment '{segments[1]}'.")
            if q.get("$expand"):
                raise ODataError(501, E_PROPERTY, "$expand on EntityDefinitions is not supported by the sandbox.")
            select = self._meta_select(q, _ENTITY_FIELDS, "EntityMetadata")
            view = _metadata_view("EntityMetadata", {k: v for k, v in _ENTITY_FIELDS.items() if v != "complex"})
            node = self._filter(q, view)
            items = [_entity_metadata(t, self._tracked(t)) for t in self._metadata_tables()]
            items = [i for i in items if node is None or evaluate(node, view, i)]
            sel = f"({','.join(select)})" if select else ""
            return self.json({"@odata.context": ctx + sel, "value": [self._meta_project(i, select) for i in items]})
        table = self._meta_entity(key)
        ent = _entity_metadata(table, self._tracked(table))
        if len(segments) == 1:
            if q.get("$expand") or q.get("$filter"):
                raise ODataError(501, E_PROPERTY, "Only $select is supported on one entity's metadata by the "
                                                  "sandbox.")
            select = self._meta_select(q, _ENTITY_FIELDS, "EntityMetadata")
            sel = f"({','.join(select)})" if select else ""
            return self.json({"@odata.context": f"{ctx}{sel}/$entity", **self._meta_project(ent, select)})
        sub = _SEGMENT_RE.match(segments[1])
        ctx = f"{api}/$metadata#EntityDefinitions({ent['MetadataId']})"
        if sub is not None and sub.group("name") == "Keys" and len(segments) == 2:
            keys = [{"MetadataId": _meta_id(table.logical, k, "key"), "LogicalName": f"{k}_key",
                     "SchemaName": f"{k}_key", "EntityLogicalName": table.logical, "KeyAttributes": [k],
                     "EntityKeyIndexStatus": "Active", "DisplayName": _label(k)} for k in table.alternate_keys]
            return self.json({"@odata.context": f"{ctx}/Keys", "value": keys})
        if sub is None or sub.group("name") != "Attributes" or len(segments) > 3:
            raise ODataError(404, E_SEGMENT, f"Resource not found for the segment '{segments[-1]}'.")
        attrs = [_attribute_metadata(table, n, a) for n, a in table.attrs.items()]
        cast = None
        if len(segments) == 3:
            cast = segments[2].removeprefix(NS)
            if cast not in _ATTRIBUTE_CLASS.values():
                raise ODataError(404, E_SEGMENT, f"Resource not found for the segment '{segments[2]}'.")
            attrs = [a for a in attrs if a["@odata.type"] == f"#{NS}{cast}"]
        expand, inner = self._meta_expand(q)
        if expand and cast not in _OPTION_CASTS:
            raise ODataError(400, E_PROPERTY, f"Could not find a property named 'OptionSet' on type "
                                              f"'{NS}{cast or 'AttributeMetadata'}'.")
        select = self._meta_select(q, _ATTRIBUTE_FIELDS, cast or "AttributeMetadata")

        def shape(a: dict) -> dict:
            out = self._meta_project(a, select)
            if expand:
                opts = _option_set(table, a)
                if inner:
                    opts = {k: opts[k] for k in inner if k in opts} | {"MetadataId": opts["MetadataId"]}
                out["OptionSet"] = opts
            return out

        key_attr = sub.group("key")
        if key_attr is not None:
            gid = _guid(key_attr)
            m = re.fullmatch(r"LogicalName\s*=\s*'([^']*)'", key_attr.strip())
            hit = [a for a in attrs if (gid and a["MetadataId"] == gid) or (m and a["LogicalName"] == m.group(1))]
            if not hit:
                raise ODataError(404, E_NOT_FOUND, f"Could not find attribute with key {key_attr} on entity "
                                                   f"{table.logical}.")
            return self.json({"@odata.context": f"{ctx}/Attributes/$entity", **shape(hit[0])})
        view = _metadata_view("AttributeMetadata", {k: v for k, v in _ATTRIBUTE_FIELDS.items() if v != "complex"})
        node = self._filter(q, view)
        attrs = [a for a in attrs if node is None or evaluate(node, view, a)]
        cast_ctx = f"/{NS}{cast}" if cast else ""
        return self.json({"@odata.context": f"{ctx}/Attributes{cast_ctx}", "value": [shape(a) for a in attrs]})

    # -- records ----------------------------------------------------------------------------
    def _etag(self, table: Table, rec) -> str:
        return f'W/"{abs(hash((table.rid(rec), table.value(rec, "modifiedon")))) % 10**8}"'

    def _project(self, table: Table, rec, select: list[str] | None, ann=None) -> dict:
        out = {"@odata.etag": self._etag(table, rec)}
        if ann is None:
            if select is None:
                out.update(table.row(rec))
            else:
                for a in select:
                    out[a] = table.value(rec, a)
                out[table.pk] = table.rid(rec)
            return out
        for a in (table.attrs if select is None else select):
            v = table.value(rec, a)
            if v is not None and a != table.pk:
                self._annotate(out, table, a, v, ann)
            out[a] = v
        out[table.pk] = table.rid(rec)
        return out

    def _annotate(self, out: dict, table: Table, name: str, value, want) -> None:
        """The annotations Dataverse puts before a property (MS webapi/query/select-columns.md "Formatted values",
        "Lookup property data"): labels of choice / Yes-No / state / status columns, the primary name of a lookup's
        record with its navigation property and table, datetimes in the user's time zone, grouped whole numbers."""
        attr = table.attrs.get(name)
        if attr is None:
            return
        text = None
        if name.startswith("_") and name.endswith("_value"):
            navs = [(nav, t) for nav, (t, value_attr) in table.lookups.items() if value_attr == name]
            if not navs:
                return
            target = self.tables.get(navs[0][1])
            if target is not None:
                ref = target.get(str(value))
                primary = _ENTITY_META[target.logical][2]
                text = target.value(ref, primary) if ref is not None and primary else None
                if text is not None and want(FORMATTED):
                    out[f"{name}@{FORMATTED}"] = text
                if want(NAV_PROPERTY):
                    out[f"{name}@{NAV_PROPERTY}"] = navs[0][0]
                if want(LOOKUP_TABLE):
                    out[f"{name}@{LOOKUP_TABLE}"] = target.logical
            return
        if not want(FORMATTED):
            return
        if attr.kind == "bool":
            text = (attr.labels or {True: "Yes", False: "No"}).get(bool(value))
        elif attr.kind == "int":
            labels = _labels(table, name)
            text = labels.get(value) if labels else f"{value:,}"
        elif attr.kind == "datetime":
            when = _stored_datetime(value) if isinstance(value, str) else None
            if when is not None:
                local = when + timedelta(minutes=self.formatted_utc_offset_minutes)
                hour = local.hour % 12 or 12
                text = f"{local.month}/{local.day}/{local.year} {hour}:{local.minute:02d} {'AM' if local.hour < 12 else 'PM'}"
        if text is not None:
            out[f"{name}@{FORMATTED}"] = text

    @staticmethod
    def _annotations(prefer: dict):
        """``Prefer: odata.include-annotations="…"`` as (predicate over annotation terms, Preference-Applied value), or
        (None, None) when not asked. Patterns: ``*``, ``Namespace.*``, a term, ``-pattern`` to exclude (OData 4.0
        part 1, 8.2.8.4)."""
        raw = prefer.get("odata.include-annotations")
        if raw is None:
            return None, None
        include, exclude = [], []
        for pat in (p.strip() for p in raw.split(",") if p.strip()):
            (exclude if pat.startswith("-") else include).append(pat.lstrip("-").lower())

        def hit(term: str, pats: list[str]) -> bool:
            t = term.lower()
            return any(p == "*" or p == t or (p.endswith(".*") and t.startswith(p[:-1])) for p in pats)

        def want(term: str) -> bool:
            return hit(term, include) and not hit(term, exclude)

        return want, f'odata.include-annotations="{raw}"'

    def _select(self, table: Table, q: dict) -> list[str] | None:
        raw = q.get("$select")
        if not raw:
            return None
        attrs = [a.strip() for a in raw.split(",") if a.strip()]
        for a in attrs:
            if a not in table.attrs:
                raise ODataError(400, E_PROPERTY, f"Could not find a property named '{a}' on type "
                                                  f"'{NS}{table.logical}'.")
        return attrs

    def _context(self, api: str, table: Table, select: list[str] | None, entity: bool = False) -> str:
        sel = f"({','.join(select)})" if select else ""
        return f"{api}/$metadata#{table.set_name}{sel}" + ("/$entity" if entity else "")

    def single(self, table: Table, rec, q: dict, api: str, prefer: dict | None = None) -> Response:
        for opt in q:
            if opt.startswith("$") and opt not in ("$select",):
                raise ODataError(501, E_PROPERTY, f"The query option {opt} is not supported by the sandbox here.")
        select = self._select(table, q)
        ann, applied = self._annotations(prefer or {})
        return self.json({"@odata.context": self._context(api, table, select, entity=True),
                          **self._project(table, rec, select, ann)},
                         headers={"Preference-Applied": applied} if applied else None)

    def _clean(self, table: Table, body, creating: bool) -> dict:
        """Validate a request body for ``table``: known columns, types, lengths, lookups."""
        if not isinstance(body, dict):
            raise ODataError(400, E_ARGUMENT, "The request body must be a JSON object.")
        data: dict[str, Any] = {}
        for k, v in body.items():
            if k.startswith("@odata."):
                continue
            if k.endswith("@odata.bind"):
                nav = k[: -len("@odata.bind")]
                if nav not in table.lookups:
                    raise ODataError(400, E_PROPERTY, f"An undeclared property '{nav}' which only has property "
                                                      "annotations in the payload but no property value was found "
                                                      "in the payload.")
                target_set, value_attr = table.lookups[nav]
                target = self._bind_target(str(v), target_set)
                data[value_attr] = target
                continue
            attr = table.attrs.get(k)
            if attr is None or k.startswith("_"):
                raise ODataError(400, E_PROPERTY, f"The property '{k}' does not exist on type '{NS}{table.logical}'. "
                                                  "Make sure to only use property names that are defined by the type.")
            if k == table.pk:
                gid = _guid(str(v)) if v is not None else None
                if gid is None:
                    raise ODataError(400, E_ARGUMENT, f"Cannot convert the literal '{v}' to the expected type "
                                                      "'Edm.Guid'.")
                data[k] = gid
                continue
            if attr.readonly:
                continue  # read-only columns are ignored on write, as the platform does
            data[k] = self._coerce(table, k, attr, v)
        return data

    def _coerce(self, table: Table, name: str, attr: Attr, v):
        if v is None:
            return None
        kind = attr.kind
        if kind == "string":
            if not isinstance(v, str):
                raise ODataError(400, E_ARGUMENT, f"Cannot convert a value to target type 'Edm.String' for "
                                                  f"property '{name}'.")
            if attr.max_len and len(v) > attr.max_len:
                raise ODataError(400, E_LENGTH, f"A validation error occurred. The length of the '{name}' attribute "
                                                f"of the '{table.logical}' entity exceeded the maximum allowed "
                                                f"length of '{attr.max_len}'.")
            return v
        if kind == "bool":
            if not isinstance(v, bool):
                raise ODataError(400, E_ARGUMENT, f"Cannot convert the literal '{v}' to the expected type "
                                                  "'Edm.Boolean'.")
            return v
        if kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise ODataError(400, E_ARGUMENT, f"Cannot convert the literal '{v}' to the expected type "
                                                  "'Edm.Int32'.")
            if attr.choices and v not in attr.choices:
                raise ODataError(400, E_ARGUMENT, f"A validation error occurred. The value {v} of '{name}' on "
                                                  f"record of type '{table.logical}' is outside the valid range.")
            return v
        if kind == "datetime":
            try:
                parsed = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
            except ValueError as exc:
                raise ODataError(400, E_ARGUMENT, f"Cannot convert the literal '{v}' to the expected type "
                                                  "'Edm.DateTimeOffset'.") from exc
            if parsed.tzinfo is not None:
                parsed = parsed.astimezone(UTC)
            return parsed.strftime("%Y-%m-%dT%H:%M:%SZ")
        return v

    def _bind_target(self, ref: str, target_set: str) -> str:
        path = urlsplit(ref).path if "://" in ref else ref
        m = re.search(r"([A-Za-z_]+)\(([^)]*)\)\s*$", path)
        if m is None or m.group(1) != target_set:
            raise ODataError(400, E_ARGUMENT, f"The URI '{ref}' is not valid for the navigation property; expected "
                                              f"/{target_set}(<id>).")
        table = self.tables[target_set]
        rec, desc = self._resolve_key(table, m.group(2))
        if rec is None:
            raise self._missing(table, desc)
        return table.rid(rec)

    def _log_write(self, table: Table, recs: list) -> None:
        if table is self.contacts:
            self.sandbox.log.members(self.name, [r.id for r in recs])

    def _do_insert(self, table: Table, data: dict, rid: str | None = None):
        if rid is None:
            rid = data.pop(table.pk, None) or str(uuid.uuid4())
        else:
            data.pop(table.pk, None)
        if table.get(rid) is not None:
            raise ODataError(412 if table is not self.lists else 400, E_DUPLICATE,
                             "A record with matching key values already exists.")
        for k in table.alternate_keys:
            if data.get(k) is not None and table.find_by_alternate_key(k, data[k]) is not None:
                raise ODataError(412, E_DUPLICATE, f"A record that has the attribute values {k} already exists. The "
                                                   "entity key requires that this set of attributes contains unique "
                                                   "values. Select unique values and try again.")
        missing = [k for k in table.required if data.get(k) in (None, "")]
        if missing:
            raise ODataError(400, E_ARGUMENT, f"A validation error occurred. '{missing[0]}' is required.")
        now = _now()
        if table is self.lists:
            if data.get("type") and not data.get("query"):
                data.setdefault("query", "")
            rec = self._create_list(data, rid, now)
            self._undo(lambda: (self.lists.remove(rid), self.memberships.pop(rid, None)))
            self._touch(table, rid)
            return rec
        rec = table.insert(data, rid, now)
        self._undo(lambda: table.remove(rid))
        self._touch(table, rid)
        return rec

    def _do_update(self, table: Table, rec, data: dict) -> None:
        if table is self.lists:
            for k in ("createdfromcode", "type"):
                if k in data and data[k] != rec.get(k):
                    raise ODataError(400, E_ARGUMENT, f"The attribute '{k}' of a marketing list cannot be changed "
                                                      "after it has been created.")
        for k in table.alternate_keys:
            if data.get(k) is not None:
                other = table.find_by_alternate_key(k, data[k])
                if other is not None and other is not rec:
                    raise ODataError(412, E_DUPLICATE, f"A record that has the attribute values {k} already exists.")
        snap = table.snapshot(rec)
        data.pop(table.pk, None)
        if table is not self.lists and data.get("statecode") is not None and "statuscode" not in data:
            # statecode alone: statuscode becomes that state's default status (SetState semantics)
            data["statuscode"] = next((sc for (t, sc), st in _STATUS_STATE.items()
                                       if t == table.logical and st == data["statecode"]), None)
        table.apply(rec, data, _now())
        self._undo(lambda: table.restore(rec, snap))
        self._touch(table, table.rid(rec))

    def delete(self, table: Table, rec) -> None:
        rid = table.rid(rec)
        pos = table.position(rec)
        snap = table.snapshot(rec)
        removed_from = []
        members = None
        if table is self.contacts:
            for lid, ml in self.memberships.items():
                if rid in ml.members:
                    del ml.members[rid]
                    removed_from.append(lid)
        elif table is self.lists:
            members = self.memberships.pop(rid, None)
        table.remove(rid)
        self._tombstone(table, rid)
        if table is self.contacts:
            self._remove_links(rid)

        def undo() -> None:
            table.restore(rec, snap)
            if table is self.contacts:
                table.rows[rid] = rec
                table.order[pos] = rec
                for lid in removed_from:
                    self.memberships[lid].members[rid] = None
            else:
                table.rows[rid] = rec
                table.order[pos] = rid
                table.pos[rid] = pos
                if table is self.lists:
                    self.memberships[rid] = members

        self._undo(undo)

    def _remove_links(self, contact_id: str) -> None:
        """Deleting a contact clears ``new_loyaltycard.new_ContactId`` on its cards (and changes them): the
        default delete behaviour of a new custom 1:N relationship is "Remove Link" (Referential)."""
        for card in list(self.loyalty_cards.rows.values()):
            if card.get("_new_contactid_value") == contact_id:
                self._do_update(self.loyalty_cards, card, {"_new_contactid_value": None})

    def _undo(self, fn) -> None:
        if self._tx is not None:
            self._tx.append(fn)

    def _created(self, table: Table, rec, prefer: dict, api: str, q: dict, status_if_repr: int = 201) -> Response:
        url = f"{api}/{table.set_name}({table.rid(rec)})"
        if "return" in prefer and prefer["return"] == "representation":
            select = self._select(table, q)
            ann, applied = self._annotations(prefer)
            return self.json({"@odata.context": self._context(api, table, select, entity=True),
                              **self._project(table, rec, select, ann)}, status_if_repr,
                             {"Preference-Applied": ", ".join(x for x in ("return=representation", applied) if x),
                              "OData-EntityId": url})
        return Response(status_code=204, headers={"OData-Version": "4.0", "OData-EntityId": url, "Location": url})

    def create(self, table: Table, body, prefer: dict, api: str, q: dict) -> Response:
        if table is self.organizations:
            raise ODataError(405, E_ARGUMENT, "The HTTP method 'POST' is not allowed on organizations.")
        data = self._clean(table, body, creating=True)
        rec = self._do_insert(table, data)
        self._log_write(table, [rec])
        return self._created(table, rec, prefer, api, q)

    def upsert(self, table: Table, rec, key: str, body, headers: dict, prefer: dict, api: str, q: dict) -> Response:
        data = self._clean(table, body, creating=rec is None)
        if rec is None:
            if headers.get("if-match", "").strip() == "*":
                raise ODataError(404, E_NOT_FOUND, f"{table.logical} With Id = {key} Does Not Exist")
            if table is self.organizations:
                raise ODataError(405, E_ARGUMENT, "Organizations cannot be created.")
            gid = _guid(key)
            if gid is None:
                attr, _, value = key.partition("=")
                value = value.strip()
                if value.startswith("'") and value.endswith("'"):
                    value = value[1:-1].replace("''", "'")
                if attr.strip() == table.pk:
                    gid = _guid(value)
                elif data.get(attr.strip()) is None:
                    # "If there's no alternate key data in the body of the request, the server copies the alternate
                    # key data from the URL into the body of the request." (use-upsert-insert-update-record.md)
                    data[attr.strip()] = value
            rec = self._do_insert(table, data, gid)
            self._log_write(table, [rec])
            return self._created(table, rec, prefer, api, q)
        if headers.get("if-none-match", "").strip() == "*":
            raise ODataError(412, E_DUPLICATE, "A record with matching key values already exists.")
        if _guid(key) is None:
            # "The server removes the data set in the body of the request for those alternate key values in the URL"
            # (use-upsert-insert-update-record.md)
            attr = key.partition("=")[0].strip()
            if attr in table.alternate_keys:
                data.pop(attr, None)
        if_match = headers.get("if-match", "").strip()
        if if_match and if_match != "*" and if_match != self._etag(table, rec):
            raise ODataError(412, "0x80060882", "The version of the existing record doesn't match the RowVersion "
                                                "property provided.")
        self._do_update(table, rec, data)
        self._log_write(table, [rec])
        if prefer.get("return") == "representation":
            select = self._select(table, q)
            ann, applied = self._annotations(prefer)
            return self.json({"@odata.context": self._context(api, table, select, entity=True),
                              **self._project(table, rec, select, ann)}, 200,
                             {"Preference-Applied": ", ".join(x for x in ("return=representation", applied) if x)})
        url = f"{api}/{table.set_name}({table.rid(rec)})"
        return Response(status_code=204, headers={"OData-Version": "4.0", "OData-EntityId": url})

    def multiple(self, table: Table, action: str, body, api: str) -> Response:
        unavailable = action == "UpsertMultiple" and (table.logical in self.upsert_multiple_unavailable
                                                      or table.set_name in self.upsert_multiple_unavailable)
        if unavailable or table not in (self.contacts, self.segment_rows, self.email_events, self.loyalty_cards):
            # the platform's SdkEntityDoesNotSupportMessage fault (see the module docstring), nothing written
            raise ODataError(400, E_MESSAGE_UNSUPPORTED, f"The '{action}' method does not support entities of type "
                                                         f"'{table.logical}'. MessageProcessorCache returned "
                                                         "MessageProcessor.Empty. ")
        targets = body.get("Targets") if isinstance(body, dict) else None
        if not isinstance(targets, list) or not targets:
            raise ODataError(400, E_ARGUMENT, "The parameter 'Targets' is required and cannot be empty.")
        expected = NS + table.logical
        for t in targets:
            if not isinstance(t, dict) or t.get("@odata.type") != expected:
                raise ODataError(400, E_ARGUMENT, f"Each entry of Targets must carry \"@odata.type\": \"{expected}\".")
        outer, self._tx = self._tx, []
        try:
            ids, recs = [], []
            for t in targets:
                data = self._clean(table, t, creating=action == "CreateMultiple")
                if action == "UpsertMultiple":
                    rec = self._upsert_target(table, t, data)
                    if rec is None:
                        rec = self._do_insert(table, data)
                    else:
                        self._do_update(table, rec, data)
                    ids.append(table.rid(rec))
                    recs.append(rec)
                    continue
                rid = data.get(table.pk)
                rec = table.get(rid) if rid else None
                if action == "CreateMultiple":
                    rec = self._do_insert(table, data)
                elif rec is None:
                    raise ODataError(404, E_NOT_FOUND, f"{table.logical} With Id = {rid} Does Not Exist")
                else:
                    self._do_update(table, rec, data)
                ids.append(table.rid(rec))
                recs.append(rec)
        except ODataError:
            for fn in reversed(self._tx):
                fn()
            self._tx = []
            raise
        finally:
            done, self._tx = self._tx, outer
            if outer is not None:
                outer.extend(done)
        self._log_write(table, recs)
        if action in ("UpdateMultiple", "UpsertMultiple"):
            # "The UpsertMultiple action returns 204 NoContent. The UpsertMultipleResponse complex type is not
            # returned." (MS webapi/reference/upsertmultiple)
            return Response(status_code=204, headers={"OData-Version": "4.0"})
        return self.json({"@odata.context": f"{api}/$metadata#{NS}{action}Response", "Ids": ids})

    def _upsert_target(self, table: Table, target: dict, data: dict):
        """The existing record an ``UpsertMultiple`` target names, or None (then ``data`` gets the key values so
        the record is created with them).

        A target is identified, as Dataverse does (MS webapi/reference/upsertmultiple: "The @odata.id annotation
        identifies the record with a relative URL as described in Use an alternate key to reference a record",
        e.g. ``"@odata.id": "sample_examples(sample_keyattribute='0000001')"``; MS use-upsert-insert-update-record:
        the record is looked up by its key attributes, else by its primary key, and created when not found), by:
        its ``@odata.id`` (relative or absolute; the primary key or an alternate key of the table), else the
        primary key in the body, else the alternate key columns in the body. A target with none of them is
        created.
        """
        ref = target.get("@odata.id")
        if ref is not None:
            path = urlsplit(str(ref)).path if "://" in str(ref) else str(ref)
            m = re.search(r"([A-Za-z_0-9]+)\((.*)\)\s*$", path)
            if m is None or m.group(1) != table.set_name:
                raise ODataError(400, E_ARGUMENT, f"The @odata.id '{ref}' does not identify a record of the entity "
                                                  f"set '{table.set_name}'.")
            key = m.group(2).strip()
            rec, _ = self._resolve_key(table, key)
            if rec is None:
                gid = _guid(key)
                if gid is not None:
                    data[table.pk] = gid
                else:
                    attr, _, value = key.partition("=")
                    value = value.strip()
                    if value.startswith("'") and value.endswith("'"):
                        value = value[1:-1].replace("''", "'")
                    if attr.strip() == table.pk:
                        data[table.pk] = _guid(value)
                    else:
                        data[attr.strip()] = value
            return rec
        if data.get(table.pk):
            return table.get(data[table.pk])
        for k in table.alternate_keys:
            if data.get(k) is not None:
                return table.find_by_alternate_key(k, data[k])
        return None

    # -- queries ------------------------------------------------------------------------------
    def query(self, table: Table, q: dict, prefer: dict, api: str, rest: str, raw_query: str, scan, restrict,
              context: str | None = None, use_index: bool = True, track: bool = False) -> Response:
        """A collection read: $select/$filter/$orderby/$top/$count, paged with Prefer: odata.maxpagesize; on an
        entity set also change tracking (Prefer: odata.track-changes, $deltatoken)."""
        allowed = ("$select", "$filter", "$top", "$count", "$orderby", "$skiptoken") + (("$deltatoken",) if track else ())
        for opt in q:
            if opt.startswith("$") and opt not in allowed:
                raise ODataError(501, E_PROPERTY, f"The query option {opt} is not supported by the sandbox.")
        cookie = _decode_skiptoken(q.get("$skiptoken"))
        tracking = track and ("$deltatoken" in q or "odata.track-changes" in prefer or "ct" in cookie)
        if tracking and "$deltatoken" not in q and not self._tracked(table):
            if self.change_tracking_unsupported == "error":
                self._require_tracking(table)
            tracking = False  # the preference is not applied: no delta link, no Preference-Applied
        if tracking:
            self._require_tracking(table)
            for opt in ("$filter", "$orderby", "$expand", "$top"):
                if opt in q:
                    raise ODataError(400, E_PROPERTY, f'The "{opt}" query parameter isn\'t supported when Change '
                                                      "Tracking is enabled.")
        select = self._select(table, q)
        node = self._filter(q, table)
        page_size = self.max_page_size
        applied = []
        if "odata.maxpagesize" in prefer:
            try:
                page_size = max(1, min(self.max_page_size, int(prefer["odata.maxpagesize"])))
            except ValueError:
                pass
            applied.append(f"odata.maxpagesize={page_size}")
        ann, ann_applied = self._annotations(prefer)
        if ann_applied:
            applied.append(ann_applied)
        if tracking and "$deltatoken" in q:
            return self._delta(table, q, api, rest, raw_query, select, ann, applied, page_size, cookie)
        if tracking:
            applied.append("odata.track-changes")
        top = None
        if "$top" in q:
            try:
                top = int(q["$top"])
            except ValueError as exc:
                raise ODataError(400, E_ARGUMENT, f"Invalid value '{q['$top']}' for $top query option.") from exc
            page_size = min(page_size, top)

        def match(rec) -> bool:
            return (restrict is None or restrict(rec)) and (node is None or evaluate(node, table, rec))

        rows: list = []
        more = False
        if q.get("$orderby"):
            order = []
            for part in q["$orderby"].split(","):
                bits = part.split()
                attr = FilterParser(bits[0], table).prop(bits[0]) if bits else ""
                order.append((attr, len(bits) > 1 and bits[1].lower() == "desc"))
            everything = [rec for _, rec in scan(0) if match(rec)]
            for attr, desc in reversed(order):
                everything.sort(key=lambda r, a=attr: _sort_key(table.value(r, a)), reverse=desc)
            offset = cookie.get("o", 0)
            rows = everything[offset: offset + page_size]
            more = offset + page_size < len(everything)
            next_cookie = {"o": offset + page_size}
            total = len(everything)
        else:
            cands = candidates(node, table) if node is not None and use_index else None
            last = cookie.get("p", -1)
            if cands is not None:
                source = sorted(((table.position(r), r) for r in cands), key=lambda pr: pr[0])
                source = ((p, r) for p, r in source if p > last and table.rid(r) in table.rows)
            else:
                source = scan(last + 1)
            last_pos = last
            for p, rec in source:
                if not match(rec):
                    continue
                if len(rows) == page_size:
                    more = True
                    break
                rows.append(rec)
                last_pos = p
            next_cookie = {"p": last_pos}
            total = None
        out: dict[str, Any] = {"@odata.context": context or self._context(api, table, select)}
        if str(q.get("$count", "")).lower() == "true":
            if total is None:
                total = sum(1 for _, rec in scan(0) if match(rec))
            out["@odata.count"] = min(total, 5000)
        out["value"] = [self._project(table, r, select, ann) for r in rows]
        if tracking:
            next_cookie["ct"] = cookie.get("ct", self.version)  # changes from the first page on come in the delta
        if more and top is None:
            page = cookie.get("n", 1) + 1
            next_cookie["n"] = page
            out["@odata.nextLink"] = _next_link(api, rest, raw_query, _encode_skiptoken(next_cookie, page))
        elif tracking:
            out["@odata.deltaLink"] = self._delta_link(api, table, q, next_cookie["ct"])
        headers = {"Preference-Applied": ", ".join(applied)} if applied else None
        return self.json(out, headers=headers)

    # -- change tracking ------------------------------------------------------------------------
    def _require_tracking(self, table: Table) -> None:
        if not self._tracked(table):
            raise ODataError(400, E_ARGUMENT, f"Change tracking is not enabled for the entity '{table.logical}'. "
                                              "Enable Track changes (ChangeTrackingEnabled) on the table.")

    def _delta_link(self, api: str, table: Table, q: dict, version: int) -> str:
        stamp = datetime.now(UTC).strftime("%m/%d/%Y %H:%M:%S")
        parts = [f"$select={quote(q['$select'], safe=',')}"] if q.get("$select") else []
        parts.append("$deltatoken=" + quote(f"{version}!{stamp}", safe=""))
        return f"{api}/{table.set_name}?" + "&".join(parts)

    def _read_deltatoken(self, token: str) -> int:
        m = re.fullmatch(r"(\d+)!(\d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2})", token.strip())
        if m is None:
            raise ODataError(400, E_ARGUMENT, f"The delta token '{token}' is not valid.")
        issued = datetime.strptime(m.group(2), "%m/%d/%Y %H:%M:%S").replace(tzinfo=UTC)
        if (datetime.now(UTC) - issued).total_seconds() > self.change_tracking_expire_days * 86400:
            raise ODataError(400, E_ARGUMENT, "The delta token has expired: changes are kept for "
                                              f"{self.change_tracking_expire_days:g} days (ExpireChangeTrackingInDays). "
                                              "Read the table again with Prefer: odata.track-changes.")
        return int(m.group(1))

    def _changes(self, table: Table, lo: int, hi: int) -> list[tuple[str, str]]:
        """New or updated records (by version), then deleted ones, changed in (lo, hi]."""
        rows = sorted((v, rid) for rid, v in self.row_versions[table.set_name].items() if lo < v <= hi)
        gone = sorted((v, rid) for rid, v in self.tombstones[table.set_name].items() if lo < v <= hi)
        return [("row", rid) for _, rid in rows if table.get(rid) is not None] + [("deleted", rid) for _, rid in gone]

    def _delta(self, table: Table, q: dict, api: str, rest: str, raw_query: str, select, ann, applied: list,
               page_size: int, cookie: dict) -> Response:
        """GET of a delta link: changed records as usual, deleted ones as ``$deletedEntity`` entries, then the next
        delta link (MS use-change-tracking-synchronize-data-external-systems.md)."""
        lo = self._read_deltatoken(q["$deltatoken"])
        hi = cookie.get("hi", self.version)
        changes = self._changes(table, lo, hi)
        offset = cookie.get("o", 0)
        page = changes[offset: offset + page_size]
        sel = f"({','.join(select)})" if select else ""
        out: dict[str, Any] = {"@odata.context": f"{api}/$metadata#{table.set_name}{sel}/$delta"}
        if offset + page_size < len(changes):
            n = cookie.get("n", 1) + 1
            out["@odata.nextLink"] = _next_link(api, rest, raw_query,
                                                _encode_skiptoken({"o": offset + page_size, "hi": hi, "n": n}, n))
        else:
            out["@odata.deltaLink"] = self._delta_link(api, table, q, hi)
        deleted_ctx = f"{api}/$metadata#{table.set_name}/$deletedEntity"
        out["value"] = [self._project(table, table.get(rid), select, ann) if kind == "row"
                        else {"@odata.context": deleted_ctx, "id": rid, "reason": "deleted"} for kind, rid in page]
        if str(q.get("$count", "")).lower() == "true":
            out["@odata.count"] = len(changes)
        return self.json(out, headers={"Preference-Applied": ", ".join(applied)} if applied else None)

    # -- marketing lists ----------------------------------------------------------------------
    def _list_for_members(self, listid: str, adding: bool):
        gid = _guid(str(listid))
        rec = self.lists.get(gid) if gid else None
        if rec is None:
            raise ODataError(404, E_NOT_FOUND, f"list With Id = {listid} Does Not Exist")
        if adding:
            if rec.get("type"):
                raise ODataError(400, E_ARGUMENT, "Members cannot be added to a dynamic marketing list.")
            if rec.get("lockstatus"):
                raise ODataError(400, "0x8004f80f", "The marketing list is locked. Members cannot be added to a "
                                                    "locked marketing list.")
            if rec.get("statecode", 0) != 0:
                raise ODataError(400, E_ARGUMENT, "Members cannot be added to an inactive marketing list.")
        return rec

    def _member_table(self, list_rec) -> Table:
        if list_rec.get("createdfromcode") != 2:
            raise ODataError(400, E_ARGUMENT, "The sandbox holds contacts only; this list's member type "
                                              f"(createdfromcode={list_rec.get('createdfromcode')}) has no records.")
        return self.contacts

    def _add_members(self, list_rec, contact_ids: list[str]) -> int:
        ml = self.memberships[list_rec["listid"]]
        added = []
        for cid in contact_ids:
            rec = self.contacts.get(cid)
            if self.skip_inactive_members and rec.state != 0:
                continue
            if rec.id not in ml.members:
                ml.members[rec.id] = None
                added.append(rec.id)
        if added:
            self._undo(lambda: [ml.members.pop(c, None) for c in added])
        list_rec["modifiedon"] = _now()
        self._touch(self.lists, list_rec["listid"])
        return len(added)

    @staticmethod
    def _params(body, operation: str, allowed: tuple) -> None:
        """OData refuses parameters the action does not declare."""
        if not isinstance(body, dict):
            raise ODataError(400, E_ARGUMENT, f"The request body of '{operation}' must be a JSON object.")
        for k in body:
            if k not in allowed and not k.startswith("@"):
                raise ODataError(400, E_ARGUMENT, f"The parameter '{k}' in the request payload is not a valid "
                                                  f"parameter for the operation '{operation}'.")

    def add_list_members(self, body) -> Response:
        self._params(body, "AddListMembersList", ("List", "Members"))
        if not isinstance(body.get("List"), dict):
            raise ODataError(400, E_ARGUMENT, "The parameter 'List' is required.")
        members = body.get("Members")
        if not isinstance(members, list):
            raise ODataError(400, E_ARGUMENT, "The parameter 'Members' is required.")
        lst = body["List"]
        if lst.get("@odata.type") not in (None, NS + "list"):
            raise ODataError(400, E_ARGUMENT, f"The parameter 'List' must be of type '{NS}list'.")
        list_rec = self._list_for_members(lst.get("listid", ""), adding=True)
        if self.max_add_list_members and len(members) > self.max_add_list_members:
            raise ODataError(400, E_ARGUMENT, f"The number of members exceeds the limit of "
                                              f"{self.max_add_list_members}.")
        code = list_rec.get("createdfromcode")
        expected = {1: "account", 2: "contact", 4: "lead"}.get(code, "contact")
        ids = []
        for m in members:
            if not isinstance(m, dict):
                raise ODataError(400, E_ARGUMENT, "Each entry of 'Members' must be an entity object.")
            otype = m.get("@odata.type")
            if otype is None:
                prop = next((k for k in m if not k.startswith("@")), "")
                raise ODataError(400, E_PROPERTY, f"The property '{prop}' does not exist on type "
                                                  f"'{NS}crmbaseentity'. Make sure to only use property names that "
                                                  "are defined by the type.")
            if otype != NS + expected:
                raise ODataError(400, E_ARGUMENT, f"The member type '{otype}' does not match the marketing list's "
                                                  f"member type '{expected}'.")
            raw_id = m.get(f"{expected}id")
            gid = _guid(str(raw_id)) if raw_id else None
            if gid is None:
                raise ODataError(400, E_ARGUMENT, f"Cannot convert the literal '{raw_id}' to the expected type "
                                                  "'Edm.Guid'.")
            ids.append(gid)
        self._member_table(list_rec)
        for gid in ids:
            if gid not in self.contacts.rows:
                raise ODataError(404, E_NOT_FOUND, f"contact With Id = {gid} Does Not Exist")
        self.sandbox.log.members(self.name, ids)
        self._add_members(list_rec, ids)
        return Response(status_code=204, headers={"OData-Version": "4.0"})

    def remove_list_members(self, body) -> Response:
        """``RemoveListMembersList`` (``List`` + ``Members``, as AddListMembersList): members not on the list are
        skipped (not documented; inferred from AddListMembersList's handling of existing members)."""
        self._params(body, "RemoveListMembersList", ("List", "Members"))
        if not isinstance(body.get("List"), dict) or not isinstance(body.get("Members"), list):
            raise ODataError(400, E_ARGUMENT, "The parameters 'List' and 'Members' are required.")
        list_rec = self._list_for_members(body["List"].get("listid", ""), adding=False)
        expected = {1: "account", 2: "contact", 4: "lead"}.get(list_rec.get("createdfromcode"), "contact")
        ml = self.memberships[list_rec["listid"]]
        gone = []
        for m in body["Members"]:
            if not isinstance(m, dict) or m.get("@odata.type") != NS + expected:
                raise ODataError(400, E_ARGUMENT, f"Each entry of 'Members' must be a '{NS}{expected}' with its id.")
            gid = _guid(str(m.get(f"{expected}id") or ""))
            if gid is None:
                raise ODataError(400, E_ARGUMENT, f"Cannot convert the literal '{m.get(f'{expected}id')}' to the "
                                                  "expected type 'Edm.Guid'.")
            if gid in ml.members:
                self._remove_member(list_rec["listid"], gid)
                gone.append(gid)
        self.sandbox.log.members(self.name, gone)
        list_rec["modifiedon"] = _now()
        return Response(status_code=204, headers={"OData-Version": "4.0"})

    def navigation(self, table: Table, rec, method: str, segs: list[str], q: dict, body, prefer: dict, api: str,
                   rest: str, raw_query: str) -> Response:
        if table is not self.lists:
            raise ODataError(404, E_SEGMENT, f"Resource not found for the segment '{segs[0]}'.")
        listid = rec["listid"]
        first = segs[0].removeprefix(NS)
        if first == "AddMemberList" and len(segs) == 1:
            self._method(method, "POST")
            self._params(body, "AddMemberList", ("EntityId",))
            entity = _guid(str((body or {}).get("EntityId", ""))) if isinstance(body, dict) else None
            if entity is None:
                raise ODataError(400, E_ARGUMENT, "The parameter 'EntityId' is required.")
            list_rec = self._list_for_members(listid, adding=True)
            self._member_table(list_rec)
            if entity not in self.contacts.rows:
                raise ODataError(404, E_NOT_FOUND, f"contact With Id = {entity} Does Not Exist")
            self.sandbox.log.members(self.name, [entity])
            self._add_members(list_rec, [entity])
            return self.json({"@odata.context": f"{api}/$metadata#{NS}AddMemberListResponse",
                              "Id": _listmember_id(listid, entity)})
        if first == "RemoveMemberList" and len(segs) == 1:
            if not self.remove_member_list_available:
                raise ODataError(404, E_SEGMENT, f"Resource not found for the segment '{segs[0]}'.")
            self._method(method, "POST")
            self._params(body, "RemoveMemberList", ("EntityId",))
            entity = _guid(str((body or {}).get("EntityId", ""))) if isinstance(body, dict) else None
            if entity is None:
                raise ODataError(400, E_ARGUMENT, "The parameter 'EntityId' is required.")
            ml = self.memberships[listid]
            member = None
            if self.remove_member_entity_id in ("record", "either") and entity in ml.members:
                member = entity
            if member is None and self.remove_member_entity_id in ("listmember", "either"):
                cand = _listmember_id(listid, entity)
                if cand in ml.members:
                    member = cand
            if member is not None:
                self._remove_member(listid, member)
                self.sandbox.log.members(self.name, [member])
            return Response(status_code=204, headers={"OData-Version": "4.0"})
        nav = _SEGMENT_RE.match(segs[0])
        if nav is None or nav.group("name") != "listcontact_association":
            raise ODataError(404, E_SEGMENT, f"Resource not found for the segment '{segs[0]}'.")
        nav_key = nav.group("key")
        self._member_table(rec)
        ml = self.memberships[listid]
        if len(segs) == 1 and nav_key is None:
            if method != "GET":
                raise ODataError(405, E_ARGUMENT, f"The HTTP method '{method}' is not allowed on this resource.")
            contacts = self.contacts

            def scan(start: int):
                for i, cid in enumerate(islice(ml.members, start, None), start):
                    c = contacts.get(cid)
                    if c is not None:
                        yield i, c

            return self.query(self.contacts, q, prefer, api, rest, raw_query, scan, None,
                              context=f"{api}/$metadata#contacts", use_index=False)
        if len(segs) == 2 and segs[1] == "$ref" and nav_key is None:
            self._method(method, "POST")
            ref = (body or {}).get("@odata.id") if isinstance(body, dict) else None
            if not ref:
                raise ODataError(400, E_ARGUMENT, "The request body must contain '@odata.id'.")
            cid = self._bind_target(str(ref), "contacts")
            self._list_for_members(listid, adding=True)
            self.sandbox.log.members(self.name, [cid])
            self._add_members(rec, [cid])
            return Response(status_code=204, headers={"OData-Version": "4.0"})
        if len(segs) == 2 and segs[1] == "$ref" and nav_key is not None:
            self._method(method, "DELETE")
            cid = _guid(nav_key)
            if cid is None or cid not in ml.members:
                raise ODataError(404, E_NOT_FOUND, f"contact With Id = {nav_key} Does Not Exist")
            self._remove_member(listid, cid)
            self.sandbox.log.members(self.name, [cid])
            return Response(status_code=204, headers={"OData-Version": "4.0"})
        raise ODataError(404, E_SEGMENT, f"Resource not found for the segment '{segs[-1]}'.")

    def _remove_member(self, listid: str, cid: str) -> None:
        ml = self.memberships[listid]
        del ml.members[cid]
        self._undo(lambda: ml.members.__setitem__(cid, None))

    def listmembers(self, method, key, segments, q, headers, prefer, api) -> Response:
        if len(segments) != 1:
            raise ODataError(404, E_SEGMENT, f"Resource not found for the segment '{segments[1]}'.")
        if key is not None:
            lmid = _guid(key)
            self._method(method, "DELETE")
            if lmid is None:
                raise ODataError(400, E_ARGUMENT, f"Invalid key '{key}'.")
            for listid, ml in self.memberships.items():
                cid = _listmember_id(listid, lmid)
                if cid in ml.members:
                    self._remove_member(listid, cid)
                    self.sandbox.log.members(self.name, [cid])
                    return Response(status_code=204, headers={"OData-Version": "4.0"})
            raise ODataError(404, E_NOT_FOUND, f"listmember With Id = {lmid} Does Not Exist")
        self._method(method, "GET")
        for opt in q:
            if opt.startswith("$") and opt not in ("$select", "$filter", "$skiptoken"):
                raise ODataError(501, E_PROPERTY, f"The query option {opt} is not supported by the sandbox here.")
        attrs = {"listmemberid": Attr("guid"), "_listid_value": Attr("guid"), "_entityid_value": Attr("guid"),
                 "entitytype": Attr("string")}
        view = Table("listmember", "listmembers", "listmemberid", {})
        view.attrs = attrs
        view.value = lambda rec, a: rec.get(a)  # type: ignore[method-assign]
        node = self._filter(q, view)
        want_list = _eq_value(node, "_listid_value")
        select = self._select(view, q)
        page_size = self.max_page_size
        applied = None
        if "odata.maxpagesize" in prefer:
            try:
                page_size = max(1, min(self.max_page_size, int(prefer["odata.maxpagesize"])))
                applied = {"Preference-Applied": f"odata.maxpagesize={page_size}"}
            except ValueError:
                pass
        cookie = _decode_skiptoken(q.get("$skiptoken"))
        lists = [want_list] if want_list else list(self.memberships)
        li, off = cookie.get("l", 0), cookie.get("o", 0)
        rows, more = [], False
        while li < len(lists) and not more:
            ml = self.memberships.get(lists[li])
            if ml is not None:
                for cid in islice(ml.members, off, None):
                    off += 1
                    rec = {"listmemberid": _listmember_id(lists[li], cid), "_listid_value": lists[li],
                           "_entityid_value": cid, "entitytype": "contact"}
                    if node is not None and not evaluate(node, view, rec):
                        continue
                    if len(rows) == page_size:
                        more, off = True, off - 1
                        break
                    rows.append(rec)
            if not more:
                li, off = li + 1, 0
        out: dict[str, Any] = {"@odata.context": f"{api}/$metadata#listmembers",
                               "value": [{"@odata.etag": 'W/"1"', **({a: r[a] for a in select} if select else r),
                                          "listmemberid": r["listmemberid"]} for r in rows]}
        if more:
            page = cookie.get("n", 1) + 1
            token = _encode_skiptoken({"l": li, "o": off, "n": page}, page)
            raw_query = "&".join(p for p in _query_parts_without_skiptoken(q))
            out["@odata.nextLink"] = _next_link(api, "listmembers", raw_query, token)
        return self.json(out, headers=applied)

    # -- $batch -----------------------------------------------------------------------------
    async def batch(self, method: str, headers: dict, raw: bytes, base: str) -> Response:
        if method != "POST":
            return self.odata_error(405, E_ARGUMENT, "The HTTP method must be POST for $batch.")
        ctype = headers.get("content-type", "")
        boundary = _boundary(ctype)
        if not ctype.lower().startswith("multipart/mixed") or not boundary:
            return self.odata_error(400, E_BATCH, "The content type of a $batch request must be multipart/mixed "
                                                  "with a boundary.")
        text = raw.decode("utf-8", "replace")
        try:
            parts = _parse_multipart(text, boundary)
        except ValueError as exc:
            return self.odata_error(400, E_BATCH, str(exc))
        count = sum(len(p["requests"]) if p["changeset"] else 1 for p in parts)
        if count > self.max_batch_requests:
            return self.odata_error(400, E_BATCH, f"The number of requests in the batch ({count}) exceeds the "
                                                  f"limit of {self.max_batch_requests}.")
        for p in parts:
            reqs = p["requests"] if p["changeset"] else [p]
            for r in reqs:
                if r.get("nested"):
                    return self.odata_error(400, E_BATCH, "Nested $batch requests are not supported.")
                if p["changeset"] and r["method"] == "GET":
                    return self.odata_error(400, E_BATCH, "GET requests are not allowed inside a change set.")
        if self.batch_inner_requests_count and count > 1:
            now = time.monotonic()
            for _ in range(count - 1):
                self.usage.append((now, 0.0))
        continue_on_error = "odata.continue-on-error" in _parse_prefer(headers.get("prefer", ""))
        out_boundary = f"batchresponse_{uuid.uuid4()}"
        chunks: list[str] = []
        for p in parts:
            if p["changeset"]:
                ok, text_part = self._run_changeset(p["requests"], headers, base)
                chunks.append(text_part)
            else:
                resp = self._run_inner(p, headers, base, {})
                ok = resp.status_code < 400
                chunks.append(_http_part(resp, None))
            if not ok and not continue_on_error:
                break
        body = "".join(f"--{out_boundary}\r\n{c}" for c in chunks) + f"--{out_boundary}--\r\n"
        return Response(body.encode("utf-8"), status_code=200,
                        media_type=f"multipart/mixed; boundary={out_boundary}", headers={"OData-Version": "4.0"})

    def _run_inner(self, req: dict, outer_headers: dict, base: str, refs: dict) -> Response:
        url = req["url"]
        if len(url) > self.max_batch_url_length:
            return self._http_sys_error(414)
        for cid, entity_url in refs.items():
            if url.startswith(f"${cid}"):
                url = entity_url + url[len(cid) + 1:]
        parts = urlsplit(url)
        path = parts.path
        for pfx in (self.prefix + API + "/", API + "/"):
            if path.startswith(pfx):
                path = path[len(pfx):]
                break
        else:
            path = path.lstrip("/")
        headers = {**{k: v for k, v in outer_headers.items() if k in ("authorization",)}, **req["headers"]}
        body = req["body"].encode("utf-8") if req["body"].strip() else b""
        if body and refs:
            try:
                obj = json.loads(body)
                if isinstance(obj, dict):
                    for k, v in obj.items():
                        if isinstance(v, str) and v.startswith("$") and v[1:] in refs:
                            obj[k] = urlsplit(refs[v[1:]]).path
                    body = json.dumps(obj).encode("utf-8")
            except ValueError:
                pass
        self.sandbox.log.request(self.name, req["method"], "$batch:" + _route_name(req["method"], path))
        return self.dispatch(req["method"], path, parts.query, headers, body, base)

    def _run_changeset(self, requests: list[dict], headers: dict, base: str) -> tuple[bool, str]:
        outer, self._tx = self._tx, []
        refs: dict[str, str] = {}
        responses = []
        failed = None
        for r in requests:
            resp = self._run_inner(r, headers, base, refs)
            if resp.status_code >= 400:
                failed = (r, resp)
                break
            entity = resp.headers.get("odata-entityid")
            if r.get("content_id") and entity:
                refs[r["content_id"]] = entity
            responses.append((r, resp))
        if failed is not None:
            for fn in reversed(self._tx):
                fn()
            self._tx = outer
            return False, _http_part(failed[1], failed[0].get("content_id"))
        self._tx = outer
        cs = f"changesetresponse_{uuid.uuid4()}"
        inner = "".join(f"--{cs}\r\n{_http_part(resp, r.get('content_id'))}" for r, resp in responses)
        return True, f"Content-Type: multipart/mixed; boundary={cs}\r\n\r\n{inner}--{cs}--\r\n"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _sort_key(v):
    if v is None:
        return (0, "")
    if isinstance(v, str):
        return (1, v.lower())
    return (1, v)


def _eq_value(node, attr: str):
    if node is None:
        return None
    if node[0] == "cmp" and node[1] == "eq" and node[2] == ("prop", attr) and node[3][0] == "lit":
        return str(node[3][1]).lower()
    if node[0] == "and":
        return _eq_value(node[1], attr) or _eq_value(node[2], attr)
    return None


def _parse_prefer(value: str) -> dict:
    """``Prefer`` preferences (several headers arrive joined with commas); commas inside quotes stay in the value
    (``odata.include-annotations="A,B"``)."""
    out = {}
    for item in re.findall(r'(?:[^,"]|"[^"]*")+', value):
        item = item.strip()
        if not item:
            continue
        k, sep, v = item.partition("=")
        out[k.strip().lower()] = v.strip().strip('"') if sep else ""
    return out


def _split_path(rest: str) -> list[str]:
    """Split an OData path on '/' outside quotes and parentheses."""
    segs, cur, depth, quote_on = [], [], 0, False
    for ch in rest:
        if ch == "'":
            quote_on = not quote_on
        elif not quote_on and ch == "(":
            depth += 1
        elif not quote_on and ch == ")":
            depth -= 1
        if ch == "/" and depth == 0 and not quote_on:
            segs.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        segs.append("".join(cur))
    return [unquote(s) for s in segs if s]


def _route_name(method: str, rest: str) -> str:
    segs = _split_path(rest)
    out = []
    for s in segs:
        m = _SEGMENT_RE.match(s)
        if m and m.group("key") is not None:
            out.append(m.group("name") + "(id)")
        else:
            out.append(s)
    return "/".join(out) or "/"


def _count_items(rest: str, raw: bytes, ctype: str) -> int:
    if not raw:
        return 0
    if rest == "$batch":
        return raw.count(b"application/http")
    if rest.endswith("ListMembersList") or rest.endswith("Multiple"):
        try:
            body = json.loads(raw)
        except ValueError:
            return 0
        if isinstance(body, dict):
            return len(body.get("Members") or body.get("Targets") or [])
    return 1


def _encode_skiptoken(cookie: dict, page: int) -> str:
    inner = quote(quote(_b64(json.dumps(cookie, separators=(",", ":")).encode()), safe=""), safe="")
    return f'<cookie pagenumber="{page}" pagingcookie="{inner}" istracking="False" />'


def _decode_skiptoken(token: str | None) -> dict:
    if not token:
        return {}
    m = re.search(r'pagingcookie="([^"]*)"', token)
    if m is None:
        raise ODataError(400, E_ARGUMENT, "The $skiptoken is not valid. Follow @odata.nextLink unchanged.")
    try:
        data = unquote(unquote(m.group(1)))
        return json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    except (ValueError, TypeError) as exc:
        raise ODataError(400, E_ARGUMENT, "The $skiptoken is not valid. Follow @odata.nextLink unchanged.") from exc


def _query_parts_without_skiptoken(q: dict) -> list[str]:
    return [f"{quote(k, safe='$')}={quote(v, safe='')}" for k, v in q.items() if k != "$skiptoken"]


def _next_link(api: str, rest: str, raw_query: str, token: str) -> str:
    kept = [p for p in raw_query.split("&") if p and not unquote(p.partition("=")[0]) == "$skiptoken"]
    kept.append("$skiptoken=" + quote(token, safe=""))
    path = quote(rest, safe="/()'=,$@:-._~")
    return f"{api}/{path}?" + "&".join(kept)


def _boundary(ctype: str) -> str | None:
    m = re.search(r'boundary="?([^";]+)"?', ctype, re.IGNORECASE)
    return m.group(1).strip() if m else None


def _split_head(block: str) -> tuple[dict, str]:
    head, _, rest = block.partition("\n\n")
    headers = {}
    for line in head.split("\n"):
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return headers, rest


def _parse_http(block: str) -> dict:
    block = block.lstrip("\n")
    line, _, rest = block.partition("\n")
    bits = line.split()
    if len(bits) < 2:
        raise ValueError(f"Invalid request line in $batch part: {line!r}")
    headers, body = _split_head(rest) if not rest.startswith("\n") else ({}, rest[1:])
    return {"method": bits[0].upper(), "url": bits[1], "headers": headers, "body": body.strip("\n")}


def _parse_multipart(text: str, boundary: str) -> list[dict]:
    text = text.replace("\r\n", "\n")
    delim = "--" + boundary
    if delim not in text:
        raise ValueError("The $batch body does not contain the boundary given in Content-Type.")
    pieces = text.split(delim)[1:]
    out = []
    for piece in pieces:
        if piece.startswith("--"):
            break
        headers, content = _split_head(piece.lstrip("\n"))
        ctype = headers.get("content-type", "")
        if ctype.lower().startswith("multipart/mixed"):
            inner_boundary = _boundary(ctype)
            if not inner_boundary:
                raise ValueError("A change set must declare a boundary.")
            reqs = []
            for inner in content.split("--" + inner_boundary)[1:]:
                if inner.startswith("--"):
                    break
                ih, icontent = _split_head(inner.lstrip("\n"))
                req = _parse_http(icontent)
                req["content_id"] = ih.get("content-id") or req["headers"].get("content-id")
                req["nested"] = req["url"].rstrip("/").endswith("$batch")
                reqs.append(req)
            out.append({"changeset": True, "requests": reqs})
        elif ctype.lower().startswith("application/http"):
            req = _parse_http(content)
            req["changeset"] = False
            req["nested"] = req["url"].rstrip("/").endswith("$batch")
            out.append(req)
        else:
            raise ValueError(f"Unsupported part content type in $batch: {ctype!r}")
    return out


def _http_part(resp: Response, content_id: str | None) -> str:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id:
        lines.append(f"Content-ID: {content_id}")
    status = resp.status_code
    head = [f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, '')}".rstrip()]
    for k, v in resp.headers.items():
        if k.lower() in ("content-length",):
            continue
        head.append(f"{k}: {v}")
    body = bytes(resp.body or b"").decode("utf-8")
    return "\r\n".join(lines) + "\r\n\r\n" + "\r\n".join(head) + "\r\n\r\n" + body + "\r\n"
