"""Campaign Monitor API v3.3 emulator (facts: ``shared/API-FACTS.md`` section 2).

Mounted at ``/createsend/api/v3.3``; every resource ends in ``.json``. Enforced:

- HTTP Basic with the API key as username (password ignored, the SDK sends ``x``); a missing header
  answers 401 ``{"Code": 50, ...}``, a wrong key 401 ``{"Code": 100, "Message": "Invalid API Key"}``,
  a Bearer token 401 ``{"Code": 120, "Message": "Invalid OAuth Token"}`` (no OAuth apps here).
- ``POST /subscribers/{listid}/import.json``: at most 1,000 subscribers (else 400 Code 209), none
  (400 Code 212); invalid emails -> FailureDetails Code 1; unsubscribed / deleted / bounced /
  unconfirmed / suppressed addresses are not re-added without ``"Resubscribe": true`` (FailureDetails
  206 / 205 / 207 / 208 / 204); ``ConsentToTrack`` per subscriber (214 missing, 215 invalid);
  duplicates in one payload -> ``DuplicateEmailsInSubmission`` (first occurrence wins). Any failure
  makes the answer HTTP 400 Code 210 with the full result under ``ResultData``; the good rows are
  imported. A clean import answers 201 with the result object.
- add (201, body = the email as a JSON string), update (``PUT ?email=``, 200 empty, 211 for an
  invalid new address), get (``GET ?email=``, 400 Code 203 when unknown), unsubscribe, delete
  (-> state ``Deleted``), history; lists, list details, stats, custom fields (``[Key]``, 255 for an
  existing name), paged state listings (``active.json`` ... with 800/801 page checks), clients,
  ``systemdate.json``.
- Rate limiting: a token bucket per API key; every authenticated answer carries ``X-RateLimit-Limit``,
  ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset`` (seconds until the bucket is full again); an
  empty bucket answers 429 ``{"Code": 429, "Message": "Rate limit exceeded"}`` with the same headers.
- Every body is JSON (the official SDK crashes on non-JSON error bodies).

Configurable (class attributes, ``seed["campaign_monitor"]["config"]`` or at run time with
``POST /_sandbox/campaign_monitor/config``; ``reset()`` restores them):
``rate_limit`` / ``rate_period`` (bucket size and seconds to refill it; default 1000 per 60 s - CM
publishes no number), ``rate_limit_headers`` (send the X-RateLimit-* headers; default True),
``require_consent_to_track`` (214/215 on import; default True), ``resubscribe_bounced`` and
``resubscribe_suppressed`` (whether ``Resubscribe: true`` re-activates bounced / suppressed
addresses; default True), ``import_success_status`` (201).

Seed: ``{"subscribers": [{"EmailAddress", "Name", "State", "CustomFields": [{"Key", "Value"}]}],
"custom_fields": [{"FieldName", "DataType", "Options"}], "suppression_list": ["a@x.com"],
"config": {...}}``.
"""

from __future__ import annotations

import base64
import json
import math
import re
import sys
import time
from datetime import datetime
from itertools import islice

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from airflow_provider_segexport.sandbox.core import Emulator

MAX_IMPORT = 1000
STATES = ("Active", "Unconfirmed", "Unsubscribed", "Bounced", "Deleted")
_LISTING_STATE = {"active": "Active", "unconfirmed": "Unconfirmed", "unsubscribed": "Unsubscribed",
                  "bounced": "Bounced", "deleted": "Deleted"}
_INACTIVE_CODES = {"Deleted": (205, "Is Deleted"), "Unsubscribed": (206, "Is Unsubscribed"),
                   "Bounced": (207, "Is Bounced"), "Unconfirmed": (208, "Is Unconfirmed")}
DATA_TYPES = ("Text", "Number", "MultiSelectOne", "MultiSelectMany", "Date", "Country", "USState")
CONSENT_VALUES = {"yes": "Yes", "no": "No", "unchanged": "Unchanged"}
_EMAIL_RE = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")
_CONFIG_DEFAULTS = ("rate_limit", "rate_period", "rate_limit_headers", "require_consent_to_track",
                    "resubscribe_bounced", "resubscribe_suppressed", "import_success_status")


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


class Subscriber:
    """One subscriber on one list. ``fields`` is a tuple of (Key, Value) pairs or None."""

    __slots__ = ("email", "name", "state", "fields", "date", "consent")

    def __init__(self, email: str, name: str, state: str, fields: tuple | None, date: str, consent: str) -> None:
        self.email = email
        self.name = _intern(name)
        self.state = state
        self.fields = fields
        self.date = date
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
        self.version = 0  # bumped on every write; invalidates the listing cache
        self._listing: tuple[int, str, list[str]] | None = None

    # custom fields --------------------------------------------------------------------
    def field_key(self, key: str) -> str | None:
        """The canonical ``[Key]`` for a key given with or without brackets, or None if unknown."""
        wanted = key.strip().strip("[]").lower()
        for f in self.custom_fields:
            if f["Key"][1:-1].lower() == wanted:
                return f["Key"]
        return None

    def add_field(self, name: str, data_type: str, options: list | None, visible: bool) -> dict:
        key = "[" + re.sub(r"[^A-Za-z0-9]", "", name) + "]"
        field = {"FieldName": name, "Key": key, "DataType": data_type, "FieldOptions": list(options or []),
                 "VisibleInPreferenceCenter": bool(visible)}
        self.custom_fields.append(field)
        return field

    # listings -------------------------------------------------------------------------
    def keys_in_state(self, state: str) -> list[str]:
        cached = self._listing
        if cached is not None and cached[0] == self.version and cached[1] == state:
            return cached[2]
        keys = [k for k, s in self.subscribers.items() if s.state == state]
        self._listing = (self.version, state, keys)
        return keys


class CampaignMonitorEmulator(Emulator):
    config_keys = _CONFIG_DEFAULTS
    name = "campaign_monitor"
    prefix = "/createsend/api/v3.3"

    rate_limit = 1000
    rate_period = 60.0
    rate_limit_headers = True
    require_consent_to_track = True
    resubscribe_bounced = True
    resubscribe_suppressed = True
    import_success_status = 201

    def __init__(self, sandbox) -> None:
        super().__init__(sandbox)
        self.api_key = sandbox.token()
        self.client_id = sandbox.token()
        self.list_id = sandbox.token()
        self.reset()

    # -- setup ------------------------------------------------------------------------------
    def reset(self) -> None:
        seed = self.sandbox.seed.get("campaign_monitor", {})
        self.reset_config()
        self.buckets: dict[str, list[float]] = {}  # api key -> [tokens, last refill time]
        self.suppression: set[str] = {str(e).strip().lower() for e in seed.get("suppression_list", [])}
        lst = SubscriberList(self.list_id, seed.get("list_title", "Sandbox list"), self.client_id)
        for f in seed.get("custom_fields", []):
            lst.add_field(f["FieldName"], f.get("DataType", "Text"), f.get("Options"),
                          f.get("VisibleInPreferenceCenter", True))
        now = _now()
        for s in seed.get("subscribers", []):
            email = str(s["EmailAddress"]).strip()
            state = s.get("State", "Active")
            if state not in STATES:
                raise ValueError(f"campaign_monitor seed: unknown State {state!r}")
            fields = tuple((lst.field_key(f["Key"]) or "[" + f["Key"].strip("[]") + "]", str(f.get("Value", "")))
                           for f in s.get("CustomFields", []))
            lst.subscribers[_key(email)] = Subscriber(email, s.get("Name", ""), state, fields or None,
                                                        s.get("Date", now), s.get("ConsentToTrack", "Yes"))
        self.lists: dict[str, SubscriberList] = {lst.id: lst}

    def info(self, base: str) -> dict:
        return {"base_url": base + self.prefix, "api_key": self.api_key, "client_id": self.client_id,
                "list_id": self.list_id}

    def state(self) -> dict:
        out = {}
        for lid, lst in self.lists.items():
            counts = dict.fromkeys(STATES, 0)
            subs = {}
            for s in lst.subscribers.values():
                counts[s.state] += 1
                subs[s.email] = {"name": s.name, "state": s.state, "consent_to_track": s.consent,
                                 "custom_fields": _fields_json(s.fields)}
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
                return denied
            allowed, headers = self.take_token(key)
            if not allowed:
                return self.error(429, 429, "Rate limit exceeded", headers=headers)
            if body is ValueError:
                resp = self.error(400, 400, "Failed to deserialize your request. Please check the documentation "
                                  "and try again.")
            else:
                resp = handler(request.method, request.path_params, request.query_params, body)
            resp.headers.update(headers)
            return resp

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
                return self.error(400, 250, "List title must be unique and not empty")
            if any(lst.title == title for lst in self.lists.values()):
                return self.error(400, 250, "List title must be unique")
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
        lst = self._list(p["list_id"])
        if lst is None:
            return self.error(400, 101, "Invalid ListID")
        counts = dict.fromkeys(STATES, 0)
        for s in lst.subscribers.values():
            counts[s.state] += 1
        out = {"TotalActiveSubscribers": counts["Active"], "TotalUnsubscribes": counts["Unsubscribed"],
               "TotalDeleted": counts["Deleted"], "TotalBounces": counts["Bounced"]}
        for period in ("Today", "Yesterday", "ThisWeek", "ThisMonth", "ThisYear"):
            out.update({f"NewActiveSubscribers{period}": 0, f"UnsubscribesThis{period}": 0})
        return JSONResponse(out)

    def h_customfields(self, method, p, q, body):
        lst = self._list(p["list_id"])
        if lst is None:
            return self.error(400, 101, "Invalid ListID")
        if method == "GET":
            return JSONResponse(lst.custom_fields)
        body = body if isinstance(body, dict) else {}
        name = str(body.get("FieldName") or "").strip()
        data_type = body.get("DataType")
        if not name:
            return self.error(400, 251, "Field name cannot be empty")
        if data_type not in DATA_TYPES:
            return self.error(400, 251, "Invalid Field Type")
        key = "[" + re.sub(r"[^A-Za-z0-9]", "", name) + "]"
        if any(f["FieldName"].lower() == name.lower() or f["Key"].lower() == key.lower()
               for f in lst.custom_fields):
            return self.error(400, 255, "Field Name Already Exists")
        options = body.get("Options") or []
        if data_type in ("MultiSelectOne", "MultiSelectMany") and not options:
            return self.error(400, 254, "Field Options must be provided for multi-option fields")
        field = lst.add_field(name, data_type, options, body.get("VisibleInPreferenceCenter", True))
        lst.version += 1
        return JSONResponse(field["Key"], status_code=201)

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
        keys = lst.keys_in_state(state)
        since = q.get("date")
        if since:
            keys = [k for k in keys if lst.subscribers[k].date[:10] >= since[:10]]
        total = len(keys)
        results = [self._subscriber_json(lst.subscribers[k], tracking=True)
                   for k in islice(keys, (page - 1) * size, page * size)]
        order_dir = "desc" if str(q.get("orderdirection", "asc")).lower() == "desc" else "asc"
        if order_dir == "desc":
            results.reverse()
        return JSONResponse({"Results": results, "ResultsOrderedBy": q.get("orderfield", "date"),
                             "OrderDirection": order_dir, "PageNumber": page, "PageSize": size,
                             "RecordsOnThisPage": len(results), "TotalNumberOfRecords": total,
                             "NumberOfPages": max(1, math.ceil(total / size)) if total else 0})

    @staticmethod
    def _subscriber_json(s: Subscriber, tracking: bool) -> dict:
        out = {"EmailAddress": s.email, "Name": s.name, "Date": s.date, "ListJoinedDate": s.date,
               "State": s.state, "CustomFields": _fields_json(s.fields), "ReadsEmailWith": ""}
        if tracking:
            out["ConsentToTrack"] = s.consent
        return out

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
            tracking = str(q.get("includetrackingpreference", "false")).lower() == "true"
            return JSONResponse(self._subscriber_json(sub, tracking))
        if sub is None:
            return self.error(400, 203, "Subscriber not in list or has already been removed.")
        if method == "DELETE":
            sub.state = "Deleted"
            lst.version += 1
            self.sandbox.log.members(self.name, [email.lower()])
            return self.empty()
        return self._update(lst, sub, body if isinstance(body, dict) else {})

    def _consent(self, body: dict) -> tuple[str | None, JSONResponse | None]:
        if "ConsentToTrack" not in body or body["ConsentToTrack"] in (None, ""):
            return None, self.error(400, 214, "ConsentToTrack is required")
        value = CONSENT_VALUES.get(str(body["ConsentToTrack"]).strip().lower())
        if value is None:
            return None, self.error(400, 215, "Invalid ConsentToTrack value - must be Yes, No or Unchanged")
        return value, None

    def _add(self, lst: SubscriberList, body: dict) -> Response:
        email = str(body.get("EmailAddress") or "").strip()
        if not _EMAIL_RE.match(email):
            return self.error(400, 1, "Invalid Email Address")
        consent, bad = self._consent(body)
        if bad is not None:
            return bad
        self.sandbox.log.members(self.name, [email.lower()])
        key = _key(email)
        resubscribe = _truthy(body.get("Resubscribe"))
        sub = lst.subscribers.get(key)
        fields = self._merge_fields(lst, sub.fields if sub else None, body.get("CustomFields"))
        if sub is None:
            suppressed = key in self.suppression
            if suppressed and not (resubscribe and self.resubscribe_suppressed):
                return JSONResponse(email, status_code=201)  # accepted, but nothing is added
            if suppressed:
                self.suppression.discard(key)
            state = "Unconfirmed" if lst.confirmed_opt_in else "Active"
            lst.subscribers[key] = Subscriber(email, str(body.get("Name") or ""), state, fields, _now(),
                                              "Unchanged" if consent == "Unchanged" else consent)
        else:
            if body.get("Name") is not None:
                sub.name = str(body["Name"])
            sub.fields = fields
            if consent != "Unchanged":
                sub.consent = consent
            if sub.state != "Active" and resubscribe and self._may_resubscribe(sub.state):
                sub.state = "Active"
                sub.date = _now()
        lst.version += 1
        return JSONResponse(email, status_code=201)

    def _update(self, lst: SubscriberList, sub: Subscriber, body: dict) -> Response:
        new_email = str(body.get("EmailAddress") or sub.email).strip()
        if not _EMAIL_RE.match(new_email):
            return self.error(400, 211, "Invalid New Email Address")
        consent, bad = self._consent(body)
        if bad is not None:
            return bad
        self.sandbox.log.members(self.name, [sub.email.lower()])
        old_key, new_key = _key(sub.email), _key(new_email)
        if new_key != old_key:
            if new_key in lst.subscribers:
                return self.error(400, 211, "Invalid New Email Address - the address is already on the list")
            del lst.subscribers[old_key]
            lst.subscribers[new_key] = sub
        sub.email = new_email
        if body.get("Name") is not None:
            sub.name = str(body["Name"])
        sub.fields = self._merge_fields(lst, sub.fields, body.get("CustomFields"))
        if consent != "Unchanged":
            sub.consent = consent
        if sub.state != "Active" and _truthy(body.get("Resubscribe")) and self._may_resubscribe(sub.state):
            sub.state = "Active"
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
        sub.state = "Unsubscribed"
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

    def _merge_fields(self, lst: SubscriberList, current: tuple | None, given) -> tuple | None:
        """Apply ``CustomFields`` ([{Key, Value, Clear}]) to the stored pairs; unknown keys are ignored."""
        if not given or not isinstance(given, list):
            return current
        values: dict[str, list[str]] = {}
        for k, v in current or ():
            values.setdefault(k, []).append(v)
        replaced: set[str] = set()
        for item in given:
            if not isinstance(item, dict) or "Key" not in item:
                continue
            key = lst.field_key(str(item["Key"]))
            if key is None:
                continue
            if _truthy(item.get("Clear")):
                values.pop(key, None)
                continue
            value = item.get("Value")
            if value is None or value == "":
                continue
            value = str(value)[:250]
            if key not in replaced:  # a key given in the request replaces the stored value(s)
                values[key] = []
                replaced.add(key)
            values[key].append(value)
        pairs = tuple((k, _intern(v)) for k, vs in values.items() for v in vs)
        return pairs or None

    # -- import -----------------------------------------------------------------------------
    def h_import(self, method, p, q, body):
        lst = self._list(p["list_id"])
        if lst is None:
            return self.error(400, 101, "Invalid ListID")
        if not isinstance(body, dict) or not isinstance(body.get("Subscribers"), list) or not body["Subscribers"]:
            return self.error(400, 212, "No subscribers provided")
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
            if sub is None and key in self.suppression:
                if not (resubscribe and self.resubscribe_suppressed):
                    failures.append({"EmailAddress": email, "Code": 204, "Message": "In Suppression List"})
                    continue
                self.suppression.discard(key)
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


def _intern(value):
    """Share repeated short strings (names, custom field values) between subscribers."""
    return sys.intern(value) if isinstance(value, str) and len(value) <= 40 else value


def _fields_json(fields: tuple | None) -> list[dict]:
    return [{"Key": k, "Value": v} for k, v in fields or ()]


def _truthy(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1")
