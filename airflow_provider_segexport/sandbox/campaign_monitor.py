"""Campaign Monitor API v3.3 emulator (facts: ``shared/API-FACTS.md`` section 2).

Mounted at ``/createsend/api/v3.3``; every resource ends in ``.json``. Enforced:

- HTTP Basic with the API key as username (password ignored, the SDK sends ``x``); a missing header
  answers 401 ``{"Code": 50, ...}``, a wrong key 401 ``{"Code": 100, "Message": "Invalid API Key"}``,
  a Bearer token 401 ``{"Code": 120, "Message": "Invalid OAuth Token"}`` (no OAuth apps here).
- ``POST /subscribers/{listid}/import.json``: at most 1,000 subscribers (else 400 Code 209), none
  (400 Code 212); invalid emails -> FailureDetails Code 1; suppressed / deleted / unsubscribed /
  bounced / unconfirmed addresses are not re-added without ``"Resubscribe": true`` (FailureDetails
  204 / 205 / 206 / 207 / 208; 204 wins for a suppressed address, whatever its state on the list:
  "Email Address has existed in the selected list before, and currently exists in suppression list");
  ``ConsentToTrack`` per subscriber (214 missing, 215 invalid); duplicates in one payload ->
  ``DuplicateEmailsInSubmission`` (first occurrence wins). Any failure makes the answer HTTP 400
  Code 210 with the full result under ``ResultData`` (fixture ``import_subscribers_partial_success.json``);
  the good rows are imported. A clean import answers 201 with the result object.
- add (``POST /subscribers/{listid}.json``, 201, body = the email as a JSON string; an existing address
  gets its name and custom fields updated; a Deleted / Unsubscribed / Bounced / Unconfirmed / suppressed
  one is brought back to Active only with ``"Resubscribe": true``, otherwise it keeps its state:
  "If Resubscribe is specified as false, the subscriber will not be re-added to the active list"
  [CM subscribers]), update (``PUT ?email=``, 200 empty, 211 for an invalid new address), get
  (``GET ?email=``, 400 Code 203 when unknown), unsubscribe, delete (-> state ``Deleted``, not
  suppressed), history; lists, list details, stats (key names as fixture ``list_stats.json``), custom
  fields, paged state listings (``active.json`` ... with 800/801 page checks), clients,
  ``systemdate.json``.
- Rate limiting: a token bucket per API key; every authenticated answer carries ``X-RateLimit-Limit``,
  ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset`` (seconds until the bucket is full again); an
  empty bucket answers 429 ``{"Code": 429, "Message": "Rate limit exceeded"}`` with the same headers.
- Every body is JSON (the official SDK crashes on non-JSON error bodies).

Subscriber fields as read back (get, every listing). Verified against campaignmonitor/createsend-python
9.1.4 ``test/fixtures/subscriber_details.json``, ``active_subscribers.json``,
``active_subscribers_with_tracking_preference.json``, ``custom_fields.json`` and ``test/test_subscriber.py``
(``CustomFields[0].Key == 'website'``), ``test/test_list.py``:

- ``{"EmailAddress", "Name", "Date", "ListJoinedDate", "State", "CustomFields", "ReadsEmailWith"}``;
  ``Date`` is when the state last changed ("the Date will change whenever the subscribers state
  changes", CM staff in www.campaignmonitor.com/forums/topic/636/), ``ListJoinedDate`` when the address joined the list.
- ``CustomFields`` ``Key`` is the field's **FieldName**, without brackets: the list's field
  ``{"FieldName": "subscription date", "Key": "[subscriptiondate]"}`` reads back as
  ``{"Key": "subscription date", "Value": "2010-03-09"}``. Entries come in the list's field order; a
  MultiSelectMany field gives one ``{Key, Value}`` entry per selected option (``"multi select field"``
  twice in ``active_subscribers.json``). Dates read back as ``YYYY-MM-DD``.
- ``ConsentToTrack`` is present only with ``includetrackingpreference=true`` (get and listings).

Custom field values written (add, update, import). On input ``Key`` is the field key with or without
brackets (``[CustomerId]`` or ``CustomerId``, compared case-insensitively); the FieldName is **not**
accepted when it differs from the key (``"subscription date"`` does not address ``[subscriptiondate]``:
createsend-php issue #3, closed: "Subscriber sample suggests custom field key should be 'Field name'
rather than 'Field key'" - the sample was wrong to use the name; ❓ whether CM also resolves names). A key that matches no field is ignored (the
subscriber is still added; cf. createsend-ruby issue #4, values for an unknown key read back empty).
CM docs [CM subscribers = https://www.campaignmonitor.com/api/v3-3/subscribers/]: "When specifying a
value for a date custom field, ensure the date is no earlier than 1900/01/01 and no later than
2076/06/06 or it will be ignored. Ambiguous date formats like dd/mm/yyyy and mm/dd/yyyy should also be
avoided, use an explicit format like yyyy/mm/dd instead." "Please note that each custom field value has
a data limit of 250 characters." "Existing custom field data is not cleared if new custom field values
are not provided. Multi-Valued Select Many custom fields are set by providing multiple Custom Field array
items with the same key. Date type custom fields may be cleared by passing in a value of '0000-00-00'."
For update/import (the same page's later sections, as quoted in the docblocks of
wp-api-libraries/wp-campaignmonitor-api ``wp-campaignmonitor-api.php``; the stored copy of the CM page
holds only its beginning): "all options that are selected for that customer need to be passed through
each time ... all historically selected options will be replaced with what's included in your most
recent call";
"To clear the value of a custom field, pass a parameter of Clear with a value of true ... To remove a
specific Multi-Valued Select Many option, pass the option name in the Value field along with the Clear:
true parameter. To clear all values of a Multi-Valued Select Many field, pass an empty Value along with
the Clear: true parameter." So, per value (the subscriber is always imported/updated; only that value
is dropped - documented for out-of-range dates, 🟡 by analogy for invalid dates, numbers and options):

- Date: ``YYYY/MM/DD`` (documented) or ``YYYY-MM-DD`` (the read-back form, so a value read can be
  written back), month/day with one or two digits; a non-date (``2021/02/30``, ``31/12/2020``, text) or a
  date outside 1900/01/01-2076/06/06 is ignored; ``0000-00-00`` clears. Nothing else is accepted: the
  ambiguous forms are parsed by the account's locale on CM's side (❓), so the sandbox refuses them.
- Number: an optional sign, digits, an optional decimal point (``42``, ``-3.5``); anything else is
  ignored. Stored as sent.
- MultiSelectOne: must be one of ``FieldOptions`` (exact match), the last valid one wins;
  MultiSelectMany: each value must be one of ``FieldOptions``; the valid values replace the selection
  (invalid ones are dropped; none valid -> the field is unchanged).
- Text / Country / USState: any text. A value longer than 250 characters is ignored
  (``long_value = "ignore"``, default) or cut to 250 (``"truncate"``): what CM does with it is not
  documented (❓); ignoring makes an exporter that does not enforce the limit visibly lose the value.
- An empty ``Value`` without ``Clear`` changes nothing; ``"Clear": true`` clears the field (for
  MultiSelectMany with a ``Value``: removes only that option).

Custom field routes [CS-py ``lib/createsend/list.py``; codes from CM lists docs as transcribed in
api-evangelist/campaignmonitor ``errors/campaignmonitor-error-codes.yml``]:

- ``POST /lists/{listid}/customfields.json`` ``{FieldName, DataType, Options, VisibleInPreferenceCenter}``
  -> 201 ``"[Key]"`` (key = FieldName without non-alphanumerics: "new date field" -> ``[newdatefield]``,
  test_list.py). 254 empty FieldName, 255 "The Field Name already exists in this list", 256 Options
  given for a non-multi-valued field, 257 no Options for MultiSelectOne/Many, 259 bad DataType.
- ``PUT /lists/{listid}/customfields/{key}.json`` ``{FieldName, VisibleInPreferenceCenter}`` -> 200 with
  the new key (fixture ``update_custom_field.json``: renaming to "my renamed custom field" answers
  ``"[myrenamedcustomfield]"``); stored values follow the field.
- ``DELETE /lists/{listid}/customfields/{key}.json`` -> 200; the field's values go with it.
- ``PUT /lists/{listid}/customfields/{key}/options.json`` ``{"Options": [...], "KeepExistingOptions":
  bool}`` -> 200 empty; true adds the new options after the existing ones, false replaces them
  (createsend-php ``update_field_options``: "Whether to remove any existing options not contained in
  $new_options"). Values already stored are kept (❓ not documented). A non-multi-valued field -> 400
  Code 256 (🟡 the closest documented code), empty Options -> 257.
- In these paths the key must be the bracketed key (the SDK sends ``quote("[Key]")``); anything else
  -> 400 Code 253 "Invalid Key. Keys must be surrounded with [ ]".

Listings (``/lists/{listid}/{active|unconfirmed|unsubscribed|bounced|deleted}.json``): ``orderfield``
``email`` | ``name`` | ``date`` (absent or unknown -> ``date``; the official SDK always sends ``email``),
``orderdirection`` ``asc`` | ``desc``, applied to the whole result before paging; ties keep the order
the subscribers joined. ``date`` keeps subscribers whose ``Date`` is on or after that day.
``ResultsOrderedBy`` / ``OrderDirection`` say what was used.

Configurable (class attributes, ``seed["campaign_monitor"]["config"]`` or at run time with
``POST /_sandbox/campaign_monitor/config``; ``reset()`` restores them):
``rate_limit`` / ``rate_period`` (bucket size and seconds to refill it; default 1000 per 60 s - CM
publishes no number), ``rate_limit_headers`` (send the X-RateLimit-* headers; default True),
``require_consent_to_track`` (214/215 on import; default True), ``resubscribe_bounced`` and
``resubscribe_suppressed`` (whether ``Resubscribe: true`` re-activates bounced / suppressed
addresses; default True), ``import_success_status`` (201), ``long_value`` (``ignore`` | ``truncate``),
``per_address_limit`` / ``per_address_period`` (0 = off, the default: more than that many add/update
calls for one address within the period answer 429 ``{"Code": 429, "Message": "Subscriber was added too
many times too quickly, try again later."}``, 🟡 createsend-ruby PR #67; the rate-limit headers as usual).

Seed (``seed["campaign_monitor"]``)::

    {"list_title": "Sandbox list",
     "custom_fields": [{"FieldName": "CustomerId", "DataType": "Text"},
                       {"FieldName": "Segments", "DataType": "MultiSelectMany", "Options": ["vip", "churn"],
                        "VisibleInPreferenceCenter": false}],
     "subscribers": [
        {"EmailAddress": "a@x.com", "Name": "Ann", "State": "Active", "ConsentToTrack": "Yes",
         "CustomFields": [{"Key": "[CustomerId]", "Value": "42"}, {"Key": "Segments", "Value": "vip"},
                          {"Key": "Segments", "Value": "churn"}]},
        {"EmailAddress": "u@x.com", "State": "Unsubscribed", "Date": "2024-05-01 10:00:00",
         "ListJoinedDate": "2023-01-01 09:00:00"},
        {"EmailAddress": "b@x.com", "State": "Bounced"},
        {"EmailAddress": "d@x.com", "State": "Deleted"},
        {"EmailAddress": "s@x.com", "State": "Unsubscribed", "Suppressed": true}],
     "suppression_list": ["never-on-the-list@x.com"],
     "config": {...}}

Every key but ``EmailAddress`` is optional. ``State`` is one of Active (default), Unconfirmed,
Unsubscribed, Bounced, Deleted; ``"Suppressed": true`` also puts the address on the client's suppression
list (as unsubscribing from a list that adds unsubscribers to it does); ``suppression_list`` holds
addresses suppressed without being on the list. A seed ``CustomFields`` ``Key`` may be ``[Key]``, the key
or the FieldName; a key that no ``custom_fields`` entry declares declares a Text field named after it.
Seed values follow the rules above, but a value the API would ignore is a ``ValueError`` (a seed mistake).
``Date``/``ListJoinedDate`` default to now, ``ConsentToTrack`` to ``Yes``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import sys
import time
from collections import deque
from datetime import date as _date
from datetime import datetime
from itertools import islice

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from airflow_provider_segexport.sandbox.core import Emulator

MAX_IMPORT = 1000
MAX_VALUE = 250
STATES = ("Active", "Unconfirmed", "Unsubscribed", "Bounced", "Deleted")
_LISTING_STATE = {"active": "Active", "unconfirmed": "Unconfirmed", "unsubscribed": "Unsubscribed",
                  "bounced": "Bounced", "deleted": "Deleted"}
_INACTIVE_CODES = {"Deleted": (205, "Is Deleted"), "Unsubscribed": (206, "Is Unsubscribed"),
                   "Bounced": (207, "Is Bounced"), "Unconfirmed": (208, "Is Unconfirmed")}
DATA_TYPES = ("Text", "Number", "MultiSelectOne", "MultiSelectMany", "Date", "Country", "USState")
MULTI = ("MultiSelectOne", "MultiSelectMany")
ORDER_FIELDS = ("email", "name", "date")
CONSENT_VALUES = {"yes": "Yes", "no": "No", "unchanged": "Unchanged"}
_EMAIL_RE = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")
_DATE_RE = re.compile(r"^(\d{4})([/-])(\d{1,2})\2(\d{1,2})$")
_NUMBER_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_DATE_MIN, _DATE_MAX = _date(1900, 1, 1), _date(2076, 6, 6)
_CONFIG_DEFAULTS = ("rate_limit", "rate_period", "rate_limit_headers", "require_consent_to_track",
                    "resubscribe_bounced", "resubscribe_suppressed", "import_success_status", "long_value",
                    "per_address_limit", "per_address_period")
_BAD_KEY = (253, "Invalid Key. Keys must be surrounded with [ ]")
_CLEAR = object()  # a parsed value meaning "clear this field"


_NOW_CACHE: list = [0, ""]


def _now() -> str:
    """The account-time stamp CM shows; one shared string per second (subscribers share it)."""
    second = int(time.time())
    if _NOW_CACHE[0] != second:
        _NOW_CACHE[0], _NOW_CACHE[1] = second, datetime.fromtimestamp(second).strftime("%Y-%m-%d %H:%M:%S")
    return _NOW_CACHE[1]


def _key(email: str) -> str:
    """The lower-cased email used as key; the same object as ``email`` when it is already lower case."""
    low = email.lower()
    return email if low == email else low


def field_key_for(name: str) -> str:
    """The key CM derives from a field name: its letters and digits in brackets ("new date field" ->
    ``[newdatefield]``, createsend-python test_list.py)."""
    return "[" + re.sub(r"[^A-Za-z0-9]", "", name) + "]"


class Subscriber:
    """One subscriber on one list. ``fields`` is a tuple of (``[Key]``, Value) pairs in the list's field
    order (several pairs for a MultiSelectMany field) or None. ``date``: when the state last changed;
    ``joined``: when the address joined the list."""

    __slots__ = ("email", "name", "state", "fields", "date", "joined", "consent")

    def __init__(self, email: str, name: str, state: str, fields: tuple | None, date: str, consent: str,
                 joined: str | None = None) -> None:
        self.email = email
        self.name = _intern(name)
        self.state = state
        self.fields = fields
        self.date = date
        self.joined = date if joined is None else joined
        self.consent = consent


class SubscriberList:
    def __init__(self, list_id: str, title: str, client_id: str) -> None:
        self.id = list_id
        self.title = title
        self.client_id = client_id
        self.unsubscribe_page = ""
        self.unsubscribe_setting = "AllClientLists"
        self.confirmed_opt_in = False
        self.confirmation_success_page = ""
        self.subscribers: dict[str, Subscriber] = {}  # lower-cased email -> subscriber
        self.custom_fields: list[dict] = []
        self._by_key: dict[str, dict] = {}  # lower-cased key without brackets -> field
        self.names: dict[str, str] = {}  # "[Key]" -> FieldName (what CustomFields read back as Key)
        self.order: dict[str, int] = {}  # "[Key]" -> position in the list's fields
        self.version = 0  # bumped on every write; invalidates the listing cache
        self._listing: tuple | None = None

    # custom fields --------------------------------------------------------------------
    def _index(self) -> None:
        self._by_key = {f["Key"][1:-1].lower(): f for f in self.custom_fields}
        self.names = {f["Key"]: f["FieldName"] for f in self.custom_fields}
        self.order = {f["Key"]: i for i, f in enumerate(self.custom_fields)}

    def field(self, key: str) -> dict | None:
        """The field for a key given with or without brackets (case-insensitive), or None if unknown."""
        wanted = key.strip()
        if wanted.startswith("[") and wanted.endswith("]"):
            wanted = wanted[1:-1]
        return self._by_key.get(wanted.lower())

    def field_by_path_key(self, key: str) -> dict | None:
        """The field a URL path names: the bracketed key only (code 253 otherwise)."""
        key = key.strip()
        if len(key) < 3 or not (key.startswith("[") and key.endswith("]")):
            return None
        return self._by_key.get(key[1:-1].lower())

    def add_field(self, name: str, data_type: str, options: list | None, visible: bool) -> dict:
        field = {"FieldName": name, "Key": field_key_for(name), "DataType": data_type,
                 "FieldOptions": [str(o) for o in options or []], "VisibleInPreferenceCenter": bool(visible)}
        self.custom_fields.append(field)
        self._index()
        return field

    def name_taken(self, name: str, ignore: dict | None = None) -> bool:
        key = field_key_for(name).lower()
        return any(f is not ignore and (f["FieldName"].lower() == name.lower() or f["Key"].lower() == key)
                   for f in self.custom_fields)

    def rekey(self, old: str, new: str | None) -> None:
        """Move (``new``) or drop (None) the stored values of field ``old`` on every subscriber."""
        for s in self.subscribers.values():
            if s.fields and any(k == old for k, _ in s.fields):
                pairs = tuple((new, v) for k, v in s.fields if k == old) if new else ()
                s.fields = tuple((k, v) for k, v in s.fields if k != old) + pairs or None
                if s.fields:
                    s.fields = self.ordered(s.fields)
        self.version += 1

    def ordered(self, pairs) -> tuple:
        order = self.order
        return tuple(sorted(pairs, key=lambda kv: order.get(kv[0], len(order))))

    # listings -------------------------------------------------------------------------
    def keys_in_state(self, state: str, order_field: str = "", direction: str = "asc") -> list[str]:
        cached = self._listing
        wanted = (self.version, state, order_field, direction)
        if cached is not None and cached[0] == wanted:
            return cached[1]
        subs = self.subscribers
        keys = [k for k, s in subs.items() if s.state == state]  # insertion order = join order
        if order_field == "email":
            keys.sort()
        elif order_field == "name":
            keys.sort(key=lambda k: (subs[k].name.lower(), k))
        elif order_field == "date":
            keys.sort(key=lambda k: subs[k].date)
        if direction == "desc":
            keys.reverse()
        self._listing = (wanted, keys)
        return keys


class CampaignMonitorEmulator(Emulator):
    config_keys = _CONFIG_DEFAULTS
    name = "campaign_monitor"
    prefix = "/createsend/api/v3.3"
    after_faults = True

    rate_limit = 1000
    rate_period = 60.0
    rate_limit_headers = True
    require_consent_to_track = True
    resubscribe_bounced = True
    resubscribe_suppressed = True
    import_success_status = 201
    long_value = "ignore"
    per_address_limit = 0
    per_address_period = 60.0

    def __init__(self, sandbox) -> None:
        super().__init__(sandbox)
        self.api_key = sandbox.token()
        self.client_id = sandbox.token()
        self.list_id = sandbox.token()
        self.reset()

    def check_setting(self, key: str, value):
        if key == "long_value":
            if value not in ("ignore", "truncate"):
                raise ValueError("long_value must be 'ignore' or 'truncate'")
            return value
        return super().check_setting(key, value)

    # -- setup ------------------------------------------------------------------------------
    def reset(self) -> None:
        seed = self.sandbox.seed.get("campaign_monitor", {})
        self.reset_config()
        self.buckets: dict[str, list[float]] = {}  # api key -> [tokens, last refill time]
        self.address_calls: dict[str, deque] = {}  # list id + email -> recent add/update times
        self.suppression: set[str] = {str(e).strip().lower() for e in seed.get("suppression_list", [])}
        lst = SubscriberList(self.list_id, seed.get("list_title", "Sandbox list"), self.client_id)
        for f in seed.get("custom_fields", []):
            data_type = f.get("DataType", "Text")
            if data_type not in DATA_TYPES:
                raise ValueError(f"campaign_monitor seed: custom field {f.get('FieldName')!r}: unknown DataType "
                                 f"{data_type!r}")
            lst.add_field(f["FieldName"], data_type, f.get("Options") or f.get("FieldOptions"),
                          f.get("VisibleInPreferenceCenter", True))
        now = _now()
        for s in seed.get("subscribers", []):
            email = str(s["EmailAddress"]).strip()
            state = s.get("State", "Active")
            if state not in STATES:
                raise ValueError(f"campaign_monitor seed: unknown State {state!r} (one of {', '.join(STATES)})")
            fields = self._seed_fields(lst, email, s.get("CustomFields") or [])
            date = s.get("Date", now)
            lst.subscribers[_key(email)] = Subscriber(email, s.get("Name", ""), state, fields, date,
                                                        s.get("ConsentToTrack", "Yes"), s.get("ListJoinedDate", date))
            if s.get("Suppressed"):
                self.suppression.add(email.lower())
        self.lists: dict[str, SubscriberList] = {lst.id: lst}

    def _seed_fields(self, lst: SubscriberList, email: str, given: list) -> tuple | None:
        if not given:
            return None
        for item in given:
            key = str(item["Key"])
            if lst.field(key) is None and not any(f["FieldName"] == key for f in lst.custom_fields):
                lst.add_field(key.strip().strip("[]"), "Text", None, True)
        items = []
        for item in given:
            field = lst.field(str(item["Key"])) or next(f for f in lst.custom_fields if f["FieldName"] == item["Key"])
            value = self._parse_value(field, item.get("Value"))
            if value is None or value is _CLEAR:
                raise ValueError(f"campaign_monitor seed: {email}: {field['FieldName']!r} = {item.get('Value')!r} "
                                 f"is not a valid {field['DataType']} value (the API would ignore it)")
            items.append({"Key": field["Key"], "Value": value})
        return self._merge_fields(lst, None, items)

    def info(self, base: str) -> dict:
        return {"base_url": base + self.prefix, "api_key": self.api_key, "client_id": self.client_id,
                "list_id": self.list_id}

    def state(self) -> dict:
        out = {}
        for lid, lst in self.lists.items():
            counts = dict.fromkeys(STATES, 0)
            subs = {}
            names = lst.names
            for s in lst.subscribers.values():
                counts[s.state] += 1
                subs[s.email] = {"name": s.name, "state": s.state, "consent_to_track": s.consent,
                                 "custom_fields": _fields_json(s.fields, names)}
            out[lid] = {"title": lst.title, "counts": counts, "subscribers": subs,
                        "custom_fields": [f["Key"] for f in lst.custom_fields]}
        return {"lists": out, "suppression_list": sorted(self.suppression)}

    # -- errors -----------------------------------------------------------------------------
    @staticmethod
    def error(status: int, code: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
        return JSONResponse({"Code": code, "Message": message, **extra}, status_code=status, headers=headers)

    def _rate_headers(self, tokens: float) -> dict:
        if not self.rate_limit_headers:
            return {}
        missing = self.rate_limit - tokens
        reset = math.ceil(missing * self.rate_period / self.rate_limit) if missing > 0 else 0
        return {"X-RateLimit-Limit": str(self.rate_limit), "X-RateLimit-Remaining": str(int(tokens)),
                "X-RateLimit-Reset": str(reset)}

    def error_response(self, status: int, kind: str, headers: dict | None = None) -> Response:
        if status == 429:
            return self.error(429, 429, "Rate limit exceeded", headers=self._rate_headers(0))
        messages = {500: "Sorry, an internal error occurred. Please try again later.",
                    502: "Bad Gateway", 503: "Service Unavailable - please try again later.",
                    504: "Gateway Timeout"}
        return self.error(status, status, messages.get(status, "Error"), headers=headers)

    def authenticate(self, request: Request) -> tuple[str | None, Response | None]:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                key = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[0]
            except (ValueError, UnicodeDecodeError):
                key = ""
            if key == self.api_key:
                return key, None
            return None, self.error(401, 100, "Invalid API Key")
        if scheme.lower() == "bearer" and value.strip():
            return None, self.error(401, 120, "Invalid OAuth Token")
        return None, self.error(401, 50, "Must supply a valid HTTP Basic Authorization header")

    def take_token(self, key: str) -> tuple[bool, dict]:
        now = time.monotonic()
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = [float(self.rate_limit), now]
        rate = self.rate_limit / self.rate_period if self.rate_period > 0 else float("inf")
        bucket[0] = min(float(self.rate_limit), bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if bucket[0] < 1:
            return False, self._rate_headers(bucket[0])
        bucket[0] -= 1
        return True, self._rate_headers(bucket[0])

    def _too_quick(self, list_id: str, email: str) -> bool:
        """Per-address throttling of add/update (off unless ``per_address_limit`` > 0)."""
        if self.per_address_limit <= 0 or not email:
            return False
        now = time.monotonic()
        calls = self.address_calls.setdefault(list_id + " " + email.lower(), deque())
        while calls and now - calls[0] >= self.per_address_period:
            calls.popleft()
        if len(calls) >= self.per_address_limit:
            return True
        calls.append(now)
        return False

    # -- routing ----------------------------------------------------------------------------
    def routes(self) -> list:
        r = self._wrap
        return [
            Mount(self.prefix, routes=[
                Route("/systemdate.json", r("systemdate", self.h_systemdate)),
                Route("/clients.json", r("clients", self.h_clients)),
                Route("/clients/{client_id}/lists.json", r("client-lists", self.h_client_lists)),
                Route("/lists/{list_id}.json", r("list", self.h_list), methods=["GET", "POST", "PUT", "DELETE"]),
                Route("/lists/{list_id}/stats.json", r("list-stats", self.h_stats)),
                Route("/lists/{list_id}/customfields.json", r("customfields", self.h_customfields),
                      methods=["GET", "POST"]),
                Route("/lists/{list_id}/customfields/{key}/options.json",
                      r("customfield-options", self.h_customfield_options), methods=["PUT"]),
                Route("/lists/{list_id}/customfields/{key}.json", r("customfield", self.h_customfield),
                      methods=["PUT", "DELETE"]),
                Route("/lists/{list_id}/{listing}.json", r("list-listing", self.h_listing)),
                Route("/subscribers/{list_id}.json", r("subscriber", self.h_subscriber),
                      methods=["GET", "POST", "PUT", "DELETE"]),
                Route("/subscribers/{list_id}/import.json", r("import", self.h_import), methods=["POST"]),
                Route("/subscribers/{list_id}/unsubscribe.json", r("unsubscribe", self.h_unsubscribe),
                      methods=["POST"]),
                Route("/subscribers/{list_id}/history.json", r("history", self.h_history)),
                Route("/{rest:path}", r("unknown", self.h_unknown), methods=["GET", "POST", "PUT", "DELETE"]),
            ]),
            Route("/_sandbox/campaign_monitor/config", self.h_config, methods=["GET", "POST"]),
        ]

    def _wrap(self, route: str, handler):
        async def endpoint(request: Request) -> Response:
            request.state.arrived = asyncio.get_running_loop().time()  # the latency model counts from here
            raw = await request.body() if request.method in ("POST", "PUT") else b""
            body = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = ValueError
            items = 0
            if route == "import" and isinstance(body, dict) and isinstance(body.get("Subscribers"), list):
                items = len(body["Subscribers"])
            elif route in ("subscriber", "unsubscribe") and request.method != "GET":
                items = 1
            fault = await self.before(request, route, items)
            if fault is not None:
                return fault
            key, denied = self.authenticate(request)
            if denied is not None:
                return await self.after(request, denied)
            allowed, headers = self.take_token(key)
            if not allowed:
                return await self.after(request, self.error(429, 429, "Rate limit exceeded", headers=headers))
            if body is ValueError:
                resp = self.error(400, 400, "Failed to deserialize your request. Please check the documentation "
                                  "and try again.")
            else:
                resp = handler(request.method, request.path_params, request.query_params, body)
            resp.headers.update(headers)
            return await self.after(request, resp)  # an injected "after" fault loses the answer

        return endpoint

    def _list(self, list_id: str) -> SubscriberList | None:
        return self.lists.get(list_id)

    @staticmethod
    def empty(status: int = 200) -> Response:
        return Response(b"", status_code=status, media_type="application/json")

    # -- handlers: (method, path params, query, body) -> Response ----------------------------
    def h_unknown(self, method, p, q, body):
        return self.error(404, 404, "Resource not found")

    def h_systemdate(self, method, p, q, body):
        return JSONResponse({"SystemDate": _now()})

    def h_clients(self, method, p, q, body):
        return JSONResponse([{"ClientID": self.client_id, "Name": "Sandbox client"}])

    def h_client_lists(self, method, p, q, body):
        if p["client_id"] != self.client_id:
            return self.error(400, 102, "Invalid ClientID")
        return JSONResponse([{"ListID": lst.id, "Name": lst.title} for lst in self.lists.values()])

    def _list_details(self, lst: SubscriberList) -> dict:
        return {"ListID": lst.id, "Title": lst.title, "UnsubscribePage": lst.unsubscribe_page,
                "UnsubscribeSetting": lst.unsubscribe_setting, "ConfirmedOptIn": lst.confirmed_opt_in,
                "ConfirmationSuccessPage": lst.confirmation_success_page}

    def h_list(self, method, p, q, body):
        if method == "POST":  # create a list: the path parameter is the client id
            if p["list_id"] != self.client_id:
                return self.error(400, 102, "Invalid ClientID")
            body = body if isinstance(body, dict) else {}
            title = str(body.get("Title") or "").strip()
            if not title:
                return self.error(400, 251, "List Title Empty")
            if any(lst.title == title for lst in self.lists.values()):
                return self.error(400, 250, "Duplicate list title")
            lst = SubscriberList(self.sandbox.token(), title, self.client_id)
            lst.unsubscribe_page = body.get("UnsubscribePage") or ""
            lst.confirmed_opt_in = bool(body.get("ConfirmedOptIn", False))
            lst.confirmation_success_page = body.get("ConfirmationSuccessPage") or ""
            lst.unsubscribe_setting = body.get("UnsubscribeSetting") or "AllClientLists"
            self.lists[lst.id] = lst
            return JSONResponse(lst.id, status_code=201)
        lst = self._list(p["list_id"])
        if lst is None:
            return self.error(400, 101, "Invalid ListID")
        if method == "DELETE":
            del self.lists[lst.id]
            return self.empty()
        if method == "PUT":
            body = body if isinstance(body, dict) else {}
            if body.get("Title"):
                lst.title = str(body["Title"])
            for attr, key in (("unsubscribe_page", "UnsubscribePage"), ("confirmed_opt_in", "ConfirmedOptIn"),
                              ("confirmation_success_page", "ConfirmationSuccessPage"),
                              ("unsubscribe_setting", "UnsubscribeSetting")):
                if key in body:
                    setattr(lst, attr, body[key])
            return self.empty()
        return JSONResponse(self._list_details(lst))

    def h_stats(self, method, p, q, body):
        """Key names as createsend-python ``test/fixtures/list_stats.json``; the per-period counts are 0
        (their period boundaries are not documented)."""
        lst = self._list(p["list_id"])
        if lst is None:
            return self.error(400, 101, "Invalid ListID")
        counts = dict.fromkeys(STATES, 0)
        for s in lst.subscribers.values():
            counts[s.state] += 1
        out: dict = {"TotalActiveSubscribers": counts["Active"]}
        periods = ("Today", "Yesterday", "ThisWeek", "ThisMonth", "ThisYear")
        out.update({f"NewActiveSubscribers{p_}": 0 for p_ in periods})
        out["TotalUnsubscribes"] = counts["Unsubscribed"]
        out.update({f"Unsubscribes{p_}": 0 for p_ in periods})
        out["TotalDeleted"] = counts["Deleted"]
        out.update({f"Deleted{p_}": 0 for p_ in periods})
        out["TotalBounces"] = counts["Bounced"]
        out.update({f"Bounces{p_}": 0 for p_ in periods})
        return JSONResponse(out)

    # -- custom fields ----------------------------------------------------------------------
    def h_customfields(self, method, p, q, body):
        lst = self._list(p["list_id"])
        if lst is None:
            return self.error(400, 101, "Invalid ListID")
        if method == "GET":
            return JSONResponse(lst.custom_fields)
        body = body if isinstance(body, dict) else {}
        name = str(body.get("FieldName") or "").strip()
        data_type = body.get("DataType")
        if not name or field_key_for(name) == "[]":
            return self.error(400, 254, "Invalid Field Name")
        if data_type not in DATA_TYPES:
            return self.error(400, 259, "Data type is incorrect")
        if lst.name_taken(name):
            return self.error(400, 255, "The Field Name already exists in this list")
        options = body.get("Options") or []
        if not isinstance(options, list):
            options = [options]
        if data_type in MULTI and not options:
            return self.error(400, 257, "No options defined for Multi-Valued field")
        if data_type not in MULTI and options:
            return self.error(400, 256, "Options defined for Text or Number Field")
        field = lst.add_field(name, data_type, _unique(options), body.get("VisibleInPreferenceCenter", True))
        lst.version += 1
        return JSONResponse(field["Key"], status_code=201)

    def h_customfield(self, method, p, q, body):
        lst = self._list(p["list_id"])
        if lst is None:
            return self.error(400, 101, "Invalid ListID")
        field = lst.field_by_path_key(p["key"])
        if field is None:
            return self.error(400, *_BAD_KEY)
        old_key = field["Key"]
        if method == "DELETE":
            lst.custom_fields.remove(field)
            lst._index()
            lst.rekey(old_key, None)
            return self.empty()
        body = body if isinstance(body, dict) else {}
        name = str(body.get("FieldName") or "").strip()
        if not name or field_key_for(name) == "[]":
            return self.error(400, 254, "Invalid Field Name")
        if lst.name_taken(name, ignore=field):
            return self.error(400, 255, "The Field Name already exists in this list")
        field["FieldName"] = name
        field["Key"] = field_key_for(name)
        if "VisibleInPreferenceCenter" in body:
            field["VisibleInPreferenceCenter"] = bool(body["VisibleInPreferenceCenter"])
        lst._index()
        if field["Key"] != old_key:
            lst.rekey(old_key, field["Key"])
        lst.version += 1
        return JSONResponse(field["Key"])

    def h_customfield_options(self, method, p, q, body):
        lst = self._list(p["list_id"])
        if lst is None:
            return self.error(400, 101, "Invalid ListID")
        field = lst.field_by_path_key(p["key"])
        if field is None:
            return self.error(400, *_BAD_KEY)
        if field["DataType"] not in MULTI:
            return self.error(400, 256, "Options defined for Text or Number Field")
        body = body if isinstance(body, dict) else {}
        options = body.get("Options") or []
        if not isinstance(options, list):
            options = [options]
        options = [str(o) for o in options]
        if not options:
            return self.error(400, 257, "No options defined for Multi-Valued field")
        if _truthy(body.get("KeepExistingOptions", False)):
            field["FieldOptions"] = _unique(field["FieldOptions"] + options)
        else:
            field["FieldOptions"] = _unique(options)
        lst.version += 1
        return self.empty()

    # -- listings ---------------------------------------------------------------------------
    def h_listing(self, method, p, q, body):
        lst = self._list(p["list_id"])
        if lst is None:
            return self.error(400, 101, "Invalid ListID")
        state = _LISTING_STATE.get(p["listing"])
        if state is None:
            return self.error(404, 404, "Resource not found")
        try:
            page = int(q.get("page", 1))
        except ValueError:
            page = 0
        try:
            size = int(q.get("pagesize", 1000))
        except ValueError:
            size = 0
        if page < 1:
            return self.error(400, 800, "Invalid page number")
        if not 10 <= size <= 1000:
            return self.error(400, 801, "Invalid page size - must be between 10 and 1000")
        order_field = str(q.get("orderfield") or "date").strip().lower()
        if order_field not in ORDER_FIELDS:
            order_field = "date"
        order_dir = "desc" if str(q.get("orderdirection", "asc")).strip().lower() == "desc" else "asc"
        keys = lst.keys_in_state(state, order_field, order_dir)
        since = q.get("date")
        subs = lst.subscribers
        if since:
            keys = [k for k in keys if subs[k].date[:10] >= since[:10]]
        total = len(keys)
        tracking = str(q.get("includetrackingpreference", "false")).strip().lower() == "true"
        names = lst.names
        results = [_subscriber_json(subs[k], tracking, names)
                   for k in islice(keys, (page - 1) * size, page * size)]
        return JSONResponse({"Results": results, "ResultsOrderedBy": order_field,
                             "OrderDirection": order_dir, "PageNumber": page, "PageSize": size,
                             "RecordsOnThisPage": len(results), "TotalNumberOfRecords": total,
                             "NumberOfPages": max(1, math.ceil(total / size)) if total else 0})

    # -- subscribers ------------------------------------------------------------------------
    def h_subscriber(self, method, p, q, body):
        lst = self._list(p["list_id"])
        if lst is None:
            return self.error(400, 101, "Invalid ListID")
        if method == "POST":
            return self._add(lst, body if isinstance(body, dict) else {})
        email = str(q.get("email") or "").strip()
        sub = lst.subscribers.get(email.lower())
        if method == "GET":
            if sub is None:
                return self.error(400, 203, "Subscriber not in list or has already been removed.")
            tracking = str(q.get("includetrackingpreference", "false")).strip().lower() == "true"
            return JSONResponse(_subscriber_json(sub, tracking, lst.names))
        if sub is None:
            return self.error(400, 203, "Subscriber not in list or has already been removed.")
        if method == "DELETE":
            if sub.state != "Deleted":
                sub.state = "Deleted"
                sub.date = _now()
            lst.version += 1
            self.sandbox.log.members(self.name, [email.lower()])
            return self.empty()
        return self._update(lst, sub, body if isinstance(body, dict) else {})

    def _consent(self, body: dict) -> tuple[str | None, JSONResponse | None]:
        if "ConsentToTrack" not in body or body["ConsentToTrack"] in (None, ""):
            return None, self.error(400, 214, "Please provide a consent to track value")
        value = CONSENT_VALUES.get(str(body["ConsentToTrack"]).strip().lower())
        if value is None:
            return None, self.error(400, 215, "Please provide a valid consent to track value")
        return value, None

    def _throttled(self) -> JSONResponse:
        return self.error(429, 429, "Subscriber was added too many times too quickly, try again later.")

    def _reactivate(self, sub: Subscriber, key: str, resubscribe: bool, now: str) -> bool:
        """Bring an inactive or suppressed subscriber back to Active if ``Resubscribe`` allows it."""
        suppressed = key in self.suppression
        if sub.state == "Active" and not suppressed:
            return True
        if not resubscribe:
            return False
        if suppressed and not self.resubscribe_suppressed:
            return False
        if sub.state != "Active" and not self._may_resubscribe(sub.state):
            return False
        self.suppression.discard(key)
        if sub.state != "Active":
            sub.state = "Active"
            sub.date = now
        return True

    def _add(self, lst: SubscriberList, body: dict) -> Response:
        email = str(body.get("EmailAddress") or "").strip()
        if not _EMAIL_RE.match(email):
            return self.error(400, 1, "Invalid Email Address")
        consent, bad = self._consent(body)
        if bad is not None:
            return bad
        if self._too_quick(lst.id, email):
            return self._throttled()
        self.sandbox.log.members(self.name, [email.lower()])
        key = _key(email)
        resubscribe = _truthy(body.get("Resubscribe"))
        sub = lst.subscribers.get(key)
        fields = self._merge_fields(lst, sub.fields if sub else None, body.get("CustomFields"))
        now = _now()
        if sub is None:
            suppressed = key in self.suppression
            if suppressed and not (resubscribe and self.resubscribe_suppressed):
                return JSONResponse(email, status_code=201)  # accepted, but nothing is added
            if suppressed:
                self.suppression.discard(key)
            state = "Unconfirmed" if lst.confirmed_opt_in else "Active"
            lst.subscribers[key] = Subscriber(email, str(body.get("Name") or ""), state, fields, now,
                                              "Unchanged" if consent == "Unchanged" else consent)
        else:
            if body.get("Name") is not None:
                sub.name = _intern(str(body["Name"]))
            sub.fields = fields
            if consent != "Unchanged":
                sub.consent = consent
            self._reactivate(sub, key, resubscribe, now)
        lst.version += 1
        return JSONResponse(email, status_code=201)

    def _update(self, lst: SubscriberList, sub: Subscriber, body: dict) -> Response:
        new_email = str(body.get("EmailAddress") or sub.email).strip()
        if not _EMAIL_RE.match(new_email):
            return self.error(400, 211, "Invalid New Email Address")
        consent, bad = self._consent(body)
        if bad is not None:
            return bad
        if self._too_quick(lst.id, sub.email):
            return self._throttled()
        self.sandbox.log.members(self.name, [sub.email.lower()])
        old_key, new_key = _key(sub.email), _key(new_email)
        if new_key != old_key:
            if new_key in lst.subscribers:
                return self.error(400, 211, "Invalid New Email Address - the address is already on the list")
            del lst.subscribers[old_key]
            lst.subscribers[new_key] = sub
        sub.email = new_email
        if body.get("Name") is not None:
            sub.name = _intern(str(body["Name"]))
        sub.fields = self._merge_fields(lst, sub.fields, body.get("CustomFields"))
        if consent != "Unchanged":
            sub.consent = consent
        self._reactivate(sub, new_key, _truthy(body.get("Resubscribe")), _now())
        lst.version += 1
        return self.empty()

    def h_unsubscribe(self, method, p, q, body):
        lst = self._list(p["list_id"])
        if lst is None:
            return self.error(400, 101, "Invalid ListID")
        email = str((body or {}).get("EmailAddress") or "").strip() if isinstance(body, dict) else ""
        sub = lst.subscribers.get(email.lower())
        if sub is None:
            return self.error(400, 203, "Subscriber not in list or has already been removed.")
        self.sandbox.log.members(self.name, [email.lower()])
        if sub.state != "Unsubscribed":
            sub.state = "Unsubscribed"
            sub.date = _now()
        lst.version += 1
        return self.empty()

    def h_history(self, method, p, q, body):
        lst = self._list(p["list_id"])
        if lst is None:
            return self.error(400, 101, "Invalid ListID")
        if str(q.get("email") or "").strip().lower() not in lst.subscribers:
            return self.error(400, 203, "Subscriber not in list or has already been removed.")
        return JSONResponse([])

    def _may_resubscribe(self, state: str) -> bool:
        return state != "Bounced" or self.resubscribe_bounced

    # -- custom field values ----------------------------------------------------------------
    def _parse_value(self, field: dict, value):
        """The value to store for ``field``, ``_CLEAR`` for "clear it", or None for "ignore it"."""
        if value is None or isinstance(value, (dict, list)):
            return None
        raw = value if isinstance(value, str) else str(value)
        value = raw.strip()
        if value == "":
            return None
        data_type = field["DataType"]
        if data_type == "Date":
            if value == "0000-00-00":
                return _CLEAR
            m = _DATE_RE.match(value)
            if m is None:
                return None
            try:
                day = _date(int(m.group(1)), int(m.group(3)), int(m.group(4)))
            except ValueError:
                return None
            return day.isoformat() if _DATE_MIN <= day <= _DATE_MAX else None
        if data_type == "Number":
            return value if _NUMBER_RE.match(value) else None
        if data_type in MULTI:
            return value if value in field["FieldOptions"] else None
        if len(raw) > MAX_VALUE:  # Text, Country, USState: stored as sent
            return raw[:MAX_VALUE] if self.long_value == "truncate" else None
        return raw

    def _merge_fields(self, lst: SubscriberList, current: tuple | None, given) -> tuple | None:
        """Apply ``CustomFields`` ([{Key, Value, Clear}]) to the stored pairs (rules in the module doc)."""
        if not given or not isinstance(given, list):
            return current
        values: dict[str, list[str]] = {}
        for k, v in current or ():
            values.setdefault(k, []).append(v)
        replaced: set[str] = set()
        changed = False
        for item in given:
            if not isinstance(item, dict) or "Key" not in item:
                continue
            field = lst.field(str(item["Key"]))
            if field is None:
                continue  # unknown key: ignored
            key = field["Key"]
            if _truthy(item.get("Clear")):
                raw = item.get("Value")
                if field["DataType"] == "MultiSelectMany" and raw not in (None, ""):
                    option = str(raw).strip()
                    if option in values.get(key, ()):
                        values[key] = [v for v in values[key] if v != option]
                        changed = True
                elif key in values:
                    del values[key]
                    changed = True
                continue
            value = self._parse_value(field, item.get("Value"))
            if value is None:
                continue  # ignored, as CM ignores it
            changed = True
            if value is _CLEAR:
                values.pop(key, None)
                continue
            if field["DataType"] == "MultiSelectMany":
                if key not in replaced:  # the values given replace the whole selection
                    values[key] = []
                    replaced.add(key)
                if value not in values[key]:
                    values[key].append(value)
            else:
                values[key] = [value]  # one value; the last valid one wins
        if not changed:
            return current
        order = lst.order
        pairs = tuple((k, _intern(v)) for k in sorted(values, key=lambda k: order.get(k, len(order)))
                      for v in values[k])
        return pairs or None

    # -- import -----------------------------------------------------------------------------
    def h_import(self, method, p, q, body):
        lst = self._list(p["list_id"])
        if lst is None:
            return self.error(400, 101, "Invalid ListID")
        if not isinstance(body, dict) or not isinstance(body.get("Subscribers"), list) or not body["Subscribers"]:
            return self.error(400, 212, "No subscribers were provided in this batch")
        subscribers = body["Subscribers"]
        if len(subscribers) > MAX_IMPORT:
            return self.error(400, 209, "Too many subscribers in this batch. You can only add 1000 subscribers in "
                              "one call")
        resubscribe = _truthy(body.get("Resubscribe"))
        self.sandbox.log.members(self.name, [str(s.get("EmailAddress") or "").strip().lower()
                                             for s in subscribers if isinstance(s, dict)])
        failures: list[dict] = []
        duplicates: list[str] = []
        seen: set[str] = set()
        new = existing = 0
        now = _now()
        suppression = self.suppression
        for item in subscribers:
            if not isinstance(item, dict):
                failures.append({"EmailAddress": None, "Code": 1, "Message": "Invalid Email Address"})
                continue
            email = str(item.get("EmailAddress") or "").strip()
            key = _key(email)
            if key in seen:
                if email not in duplicates:
                    duplicates.append(email)
                continue
            seen.add(key)
            if not _EMAIL_RE.match(email):
                failures.append({"EmailAddress": email, "Code": 1, "Message": "Invalid Email Address"})
                continue
            consent = "Unchanged"
            if self.require_consent_to_track or "ConsentToTrack" in item:
                consent, bad = self._consent(item)
                if bad is not None:
                    failures.append({"EmailAddress": email, **json.loads(bad.body)})
                    continue
            sub = lst.subscribers.get(key)
            if suppression and key in suppression:
                if not (resubscribe and self.resubscribe_suppressed
                        and (sub is None or sub.state == "Active" or self._may_resubscribe(sub.state))):
                    failures.append({"EmailAddress": email, "Code": 204, "Message": "In Suppression List"})
                    continue
                suppression.discard(key)
            if sub is not None and sub.state != "Active":
                if not (resubscribe and self._may_resubscribe(sub.state)):
                    code, message = _INACTIVE_CODES[sub.state]
                    failures.append({"EmailAddress": email, "Code": code, "Message": message})
                    continue
                sub.state = "Active"
                sub.date = now
            fields = self._merge_fields(lst, sub.fields if sub else None, item.get("CustomFields"))
            if sub is None:
                lst.subscribers[key] = Subscriber(email, str(item.get("Name") or ""), "Active", fields, now,
                                                  consent)
                new += 1
            else:
                if item.get("Name") is not None:
                    sub.name = _intern(str(item["Name"]))
                sub.fields = fields
                if consent != "Unchanged":
                    sub.consent = consent
                existing += 1
        lst.version += 1
        result = {"FailureDetails": failures, "TotalUniqueEmailsSubmitted": len(seen),
                  "TotalExistingSubscribers": existing, "TotalNewSubscribers": new,
                  "DuplicateEmailsInSubmission": duplicates}
        if failures:
            return self.error(400, 210, "Subscriber Import had some failures", ResultData=result)
        return JSONResponse(result, status_code=self.import_success_status)


def _subscriber_json(s: Subscriber, tracking: bool, names: dict) -> dict:
    out = {"EmailAddress": s.email, "Name": s.name, "Date": s.date, "ListJoinedDate": s.joined,
           "State": s.state, "CustomFields": _fields_json(s.fields, names), "ReadsEmailWith": ""}
    if tracking:
        out["ConsentToTrack"] = s.consent
    return out


def _intern(value):
    """Share repeated short strings (names, custom field values) between subscribers."""
    return sys.intern(value) if isinstance(value, str) and len(value) <= 40 else value


def _fields_json(fields: tuple | None, names: dict) -> list[dict]:
    """Stored pairs as CM reads them back: ``Key`` is the field name, without brackets."""
    return [{"Key": names.get(k, k[1:-1]), "Value": v} for k, v in fields or ()]


def _unique(values) -> list[str]:
    return list(dict.fromkeys(str(v) for v in values))


def _truthy(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1")
