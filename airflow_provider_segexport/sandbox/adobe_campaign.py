"""Adobe Campaign Standard REST + Adobe IMS + Adobe I/O Events journal emulator
(facts: ``shared/API-FACTS.md`` section 4).

IMS: ``POST /ims/token/v3`` (form ``grant_type=client_credentials``, ``client_id``, ``client_secret``,
``scope``; ``client_id`` may also be in the query) -> ``{"access_token", "token_type": "bearer",
"expires_in": <seconds>}``; tokens expire after ``sandbox.token_ttl`` seconds and there is no refresh
token. Errors ``{"error": "invalid_client" | "invalid_scope" | "unsupported_grant_type", "error_description"}``.

Campaign (``/adobe/<org>/campaign``): ``X-Api-Key`` (403 ``403000`` missing / ``403003`` not the client
id), ``Authorization: Bearer`` (401 ``{"error_code": "401013", "message": "Oauth token is not valid"}``),
the org in the URL must be the token's org (403 ``403023`` "Profile is not valid"); gateway throttling
429 ``{"error_code": "429050", "message": "Too many requests"}`` from a token bucket per API key.

- ``/profileAndServices/profile`` and ``/profileAndServicesExt/profile`` (the latter with the custom
  ``cus…`` fields of the resource extension; writing them through ``/profileAndServices`` is refused):
  ``POST`` -> 201 full profile with an opaque ``PKey`` and ``href``; ``GET /{PKey}``; ``PATCH /{PKey}``
  -> 200 ``{"PKey", "href"}`` (the custom key cannot change); ``DELETE /{PKey}`` -> 200;
  ``GET /profileAndServicesExt/profile/{customKey}``; filters ``byEmail?email=`` (index lookup),
  ``byText?text=&filterType=email|firstName|lastName`` (case-insensitive prefix, a scan) and the
  extension's ``byExternalId?externalId=``, chainable (``/byA/byB``); collections
  ``{"content", "count": {"href"}, "next": {"href"}, "serverSidePagination": true}`` with
  ``_lineCount`` (default 25), an opaque ``_lineStart`` cursor, ``_order=field[ desc]`` and, above
  ``big_table_threshold`` profiles, no ``next`` unless ``_forcePagination=true``; ``…/_count`` ->
  ``{"count": n}``; opt-out booleans ``blackList``, ``blackListEmail``, ``blackListFax``,
  ``blackListMobile``, ``blackListPhone``, ``blackListPostalMail``, ``blackListPushnotification``,
  ``ccpaOptOut``; metadata ``/profileAndServices/resourceType/profile`` and its ``filters``.
- one custom resource ``/customResources/cusSegmentMembership`` (GET/POST, ``/{PKey}`` GET/PATCH/DELETE).
- ``/history/{PKey}/events``: the profile's journal events (shape ❓, see below).
- Campaign errors ``{"code": <status>, "message": "RST-360011 An error has occurred - please contact your
  administrator. <detail>"}``.

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
``ignore``), ``by_email_filter`` (True; False -> ``byEmail`` is 404 as on instances without it),
``allowed_scopes`` (comma-separated; ``*`` = any), ``journal_default_limit`` (100),
``journal_retry_after`` (10).

Seed: ``{"profiles": [{"email", "firstName", "lastName", "externalId", "blackListEmail": true,
"cusCustomerKey": "..."}], "config": {...}}``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import struct
import sys
import time
import uuid
from datetime import UTC, datetime
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
           "unknown_fields", "by_email_filter", "allowed_scopes", "journal_default_limit", "journal_retry_after")
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
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class AdobeCampaignEmulator(Emulator):
    config_keys = _CONFIG
    name = "adobe_campaign"
    prefix = "/adobe"

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

    #: fields of the profile resource extension (only under /profileAndServicesExt) and the custom key
    ext_fields = {"cusCustomerKey": "string", "cusSegment": "string", "cusScore": "int", "cusLastExport": "datetime"}
    custom_key = "cusCustomerKey"
    custom_resource = "cusSegmentMembership"
    custom_resource_fields = {"cusSegmentId": "string", "cusEmail": "string", "cusExternalId": "string",
                              "cusScore": "int", "cusUpdatedOn": "datetime"}

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
        self.by_ext_id: dict[str, int] = {}
        self.by_custom_key: dict[str, int] = {}
        self.next_id = 1
        self.resources: dict[int, dict] = {}
        self.next_resource_id = 1
        self.events: list[dict] = []
        now = _stamp()
        for p in seed.get("profiles", []):
            self._write(None, dict(p), ext=True, now=now)

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
        return {"profiles": profiles, "count": len(self.profiles),
                "custom_resource": {self.custom_resource: [dict(r) for r in self.resources.values()]},
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
    def campaign_error(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"code": status, "message": f"{_RST} {detail}".strip()}, status_code=status)

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
        fault = await self.before(request, "ims-token")
        if fault is not None:
            return fault
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
        ]

    async def h_campaign(self, request: Request) -> Response:
        rest = request.path_params["rest"]
        method = request.method
        segs = [s for s in rest.split("/") if s]
        route = "/".join("{PKey}" if s.startswith("@") else s for s in segs)
        fault = await self.before(request, route, items=1 if method in ("POST", "PATCH", "DELETE") else 0)
        if fault is not None:
            return fault
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
            return self.campaign_error(exc.status, exc.detail)

    def dispatch(self, method: str, segs: list[str], q: dict, body, base: str) -> Response:
        if len(segs) >= 2 and segs[0] in ("profileAndServices", "profileAndServicesExt"):
            ext = segs[0] == "profileAndServicesExt"
            if segs[1] == "profile":
                return self.profiles_endpoint(method, segs[2:], q, body, base, ext)
            if segs[1] == "resourceType" and len(segs) >= 3:
                return self.resource_type(segs[2:], base, ext)
        if len(segs) >= 2 and segs[0] == "customResources" and segs[1] == self.custom_resource:
            return self.custom_resource_endpoint(method, segs[2:], q, body, base)
        if len(segs) == 3 and segs[0] == "history" and segs[2] == "events" and method == "GET":
            return self.history(segs[1], base)
        raise CampaignError(404, f"The resource '/{'/'.join(segs)}' does not exist.")

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
            for k, kind in self.ext_fields.items():
                out.setdefault(k, 0 if kind == "int" else "")
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
        if p.ext_id:
            if add:
                self.by_ext_id[p.ext_id] = p.id
            elif self.by_ext_id.get(p.ext_id) == p.id:
                del self.by_ext_id[p.ext_id]
        ck = (p.extra or {}).get(self.custom_key)
        if ck:
            if add:
                self.by_custom_key[ck] = p.id
            elif self.by_custom_key.get(ck) == p.id:
                del self.by_custom_key[ck]

    def _clean(self, body, ext: bool, creating: bool) -> dict:
        if not isinstance(body, dict):
            raise CampaignError(400, "The request body must be a JSON object.")
        data: dict[str, Any] = {}
        for k, v in body.items():
            if k in READ_ONLY:
                continue
            if k in STANDARD_STRINGS:
                if v is not None and not isinstance(v, str):
                    raise CampaignError(400, f"Value '{v}' of field '{k}' is not a string.")
                if v and len(v) > STANDARD_STRINGS[k]:
                    raise CampaignError(400, f"The value of field '{k}' is too long (maximum "
                                             f"{STANDARD_STRINGS[k]} characters).")
                data[k] = v or None
            elif k in _FLAG:
                if not isinstance(v, bool):
                    raise CampaignError(400, f"Value '{v}' of field '{k}' is not a boolean.")
                data[k] = v
            elif k in STANDARD_OTHER:
                choices = STANDARD_OTHER[k]
                if choices and v not in choices:
                    raise CampaignError(400, f"Value '{v}' is not valid for enumeration '{k}'.")
                data[k] = v
            elif k in self.ext_fields and ext:
                data[k] = _typed(k, self.ext_fields[k], v)
            elif self.unknown_fields == "reject":
                raise CampaignError(400, f"Property '{k}' unknown (document of type 'Profiles (profile)').")
        return data

    def _write(self, p: Profile | None, data: dict, ext: bool, now: str) -> Profile:
        data = self._clean(data, ext, creating=p is None)
        ck = data.get(self.custom_key)
        if p is not None and self.custom_key in data and ck != (p.extra or {}).get(self.custom_key) \
                and (p.extra or {}).get(self.custom_key):
            raise CampaignError(400, f"The custom key '{self.custom_key}' of a profile cannot be modified.")
        if ck and self.by_custom_key.get(ck) not in (None, p.id if p else None):
            raise CampaignError(400, f"Unique index violation: a profile with {self.custom_key}='{ck}' already exists.")
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
                text = (q.get("text") or "").lower()
                ftype = q.get("filterType")
                attrs = {"email": "email", "firstName": "first", "lastName": "last"}
                if ftype and ftype not in attrs:
                    raise CampaignError(400, f"Invalid value '{ftype}' for parameter 'filterType'.")
                wanted = [attrs[ftype]] if ftype else list(attrs.values())
                pool = result if result is not None else list(self.profiles)
                ids = [i for i in pool
                       if any((getattr(self.profiles[i], a) or "").lower().startswith(text) for a in wanted)]
            elif f == "byExternalId" and ext:
                value = q.get("externalId")
                ids = [self.by_ext_id[value]] if value in self.by_ext_id else []
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
                                    lambda _i, p: self._profile_json(p, base, ext))
        if len(segs) > 1:
            if len(segs) == 2 and segs[1] == "subscriptions" and method == "GET":
                return JSONResponse({"content": [], "serverSidePagination": True})
            raise CampaignError(404, f"The resource '{'/'.join(segs)}' does not exist.")
        key = segs[0]
        pid = self._pid(key)
        if pid is None and ext and not key.startswith("@"):
            pid = self.by_custom_key.get(key)
        p = self.profiles.get(pid) if pid is not None else None
        if p is None:
            raise CampaignError(404, f"Document of identifier '{key}' and type 'Profiles (profile)' not found.")
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
            self.sandbox.log.members(self.name, [log_key])
            return Response(b"", status_code=200, media_type="application/json")
        raise CampaignError(405, f"Method {method} is not allowed on this resource.")

    def _collection(self, ids: list[int] | None, q: dict, href: str, render, store: dict | None = None) -> Response:
        store = self.profiles if store is None else store
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
                source = (i for i in range(last + 1, self._next_of(store)) if i in store)
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

    def _next_of(self, store: dict) -> int:
        return self.next_id if store is self.profiles else self.next_resource_id

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
            filters.append({"name": "byText", "label": "By text",
                            "data": f"{root}/profile/byText?text=$value&filterType=$value"})
            if ext:
                filters.append({"name": "byExternalId", "label": "By external id",
                                "data": f"{root}/profile/byExternalId?externalId=$value"})
            return JSONResponse({"content": filters, "serverSidePagination": False})
        raise CampaignError(404, f"The resource 'resourceType/{'/'.join(segs)}' does not exist.")

    # -- custom resource ----------------------------------------------------------------------
    def _resource_json(self, rid: int, rec: dict, base: str) -> dict:
        pkey = self._pkey(rid, b"r")
        return {"PKey": pkey, "href": f"{base}/customResources/{self.custom_resource}/{pkey}", **rec}

    def custom_resource_endpoint(self, method: str, segs: list[str], q: dict, body, base: str) -> Response:
        href = f"{base}/customResources/{self.custom_resource}"
        if not segs or segs == ["_count"]:
            if method == "POST" and not segs:
                rec = self._resource_fields(body)
                rec.setdefault("created", _stamp())
                rec["lastModified"] = rec["created"]
                rid = self.next_resource_id
                self.next_resource_id += 1
                self.resources[rid] = rec
                return JSONResponse(self._resource_json(rid, rec, base), status_code=201)
            if method != "GET":
                raise CampaignError(405, f"Method {method} is not allowed on this resource.")
            if segs:
                return JSONResponse({"count": len(self.resources)})
            ids = sorted(self.resources)
            return self._collection(ids, q, href, lambda i, r: self._resource_json(i, r, base), store=self.resources)
        rid = self._pid(segs[0], b"r")
        rec = self.resources.get(rid) if rid is not None else None
        if rec is None or len(segs) != 1:
            raise CampaignError(404, f"Document of identifier '{segs[0]}' and type '{self.custom_resource}' not "
                                     "found.")
        if method == "GET":
            return JSONResponse(self._resource_json(rid, rec, base))
        if method == "PATCH":
            rec.update(self._resource_fields(body))
            rec["lastModified"] = _stamp()
            return JSONResponse({"PKey": segs[0], "href": f"{href}/{segs[0]}"})
        if method == "DELETE":
            del self.resources[rid]
            return Response(b"", status_code=200, media_type="application/json")
        raise CampaignError(405, f"Method {method} is not allowed on this resource.")

    def _resource_fields(self, body) -> dict:
        if not isinstance(body, dict):
            raise CampaignError(400, "The request body must be a JSON object.")
        out = {}
        for k, v in body.items():
            if k in ("PKey", "href", "created", "lastModified"):
                continue
            if k not in self.custom_resource_fields:
                if self.unknown_fields == "reject":
                    raise CampaignError(400, f"Property '{k}' unknown (document of type '{self.custom_resource}').")
                continue
            out[k] = _typed(k, self.custom_resource_fields[k], v)
        return out

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
        fault = await self.before(request, "journal")
        if fault is not None:
            return fault
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


def _order_key(rec, field: str):
    if isinstance(rec, Profile):
        value = {"email": rec.email, "firstName": rec.first, "lastName": rec.last, "externalId": rec.ext_id,
                 "created": rec.created, "lastModified": rec.modified}.get(field, (rec.extra or {}).get(field))
    else:
        value = rec.get(field)
    return (value is not None, str(value).lower() if isinstance(value, str) else value if value is not None else "")


def _typed(name: str, kind: str, v):
    if v is None:
        return None
    if kind == "string":
        if not isinstance(v, str):
            raise CampaignError(400, f"Value '{v}' of field '{name}' is not a string.")
        return v
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise CampaignError(400, f"Value '{v}' of field '{name}' is not an integer.")
        return v
    if kind == "datetime":
        try:
            datetime.fromisoformat(str(v).replace("Z", "+00:00"))
        except ValueError as exc:
            raise CampaignError(400, f"Value '{v}' of field '{name}' is not a valid date.") from exc
        return str(v)
    return v
