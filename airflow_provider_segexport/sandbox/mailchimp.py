"""Mailchimp Marketing API 3.0 emulator (facts: ``shared/API-FACTS.md`` section 1).

Enforced: Basic / ``apikey`` / Bearer auth with 401 problem+json; the 10-simultaneous-connections
limit (429, no Retry-After); batch subscribe with at most 500 members, per-member errors in a 200
answer, ``status_if_new`` never changing an existing member's status, archived members staying
archived, compliance state and permanently deleted ("forgotten") emails refused; merge-field
validation by type; tags and static segments (at most 500 per add/remove array); batch operations
with a tar.gz results archive fetched without auth; OAuth metadata for access tokens.

Configurable (class attributes or ``seed["mailchimp"]``): ``fake_domains`` (domains refused as
"looks fake", empty by default although real Mailchimp refuses ``example.com``),
``report_unchanged`` (whether unchanged existing members appear in ``updated_members``; default
False: they appear in no array, as observed reports say); ``gzip_answers`` (answers of ``gzip_min_bytes``,
512 by default, or more gzip-compressed, ``Content-Encoding: gzip``, when the client's ``Accept-Encoding`` allows it, as
Mailchimp's servers have been reported to send them (gomfunkel/node-mailchimp#46, 2015;
mailchimp/mailchimp-client-lib-codegen#325, 2023: not in the API reference); off by default).

Partial responses (``fields`` / ``exclude_fields``, API fundamentals "Methods and parameters") apply to
every successful JSON answer, batch subscribe included; a path that names nothing gets 422
"Requested Fields Invalid".
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import gzip
import hashlib
import io
import json
import re
import tarfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from airflow_provider_segexport.sandbox.core import Emulator

MAX_BATCH_MEMBERS = 500
MAX_SEGMENT_ITEMS = 500
MAX_CONNECTIONS = 10
#: Calls carrying more members than this are processed off the event loop (see ``_wrap``).
_INLINE_ITEMS = 50
MAX_COUNT = 1000
STATUSES = {"subscribed", "unsubscribed", "cleaned", "pending", "transactional"}
_EMAIL_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")


def subscriber_hash(email: str) -> str:
    return hashlib.md5(email.strip().lower().encode("utf-8")).hexdigest()  # noqa: S324 - Mailchimp's id


_clock: list = [0, ""]


def _now() -> str:
    """Mailchimp's timestamps have a resolution of one second: formatted once per second."""
    now = int(time.time())
    if _clock[0] != now:
        _clock[1] = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")
        _clock[0] = now
    return _clock[1]


class Member:
    __slots__ = ("email", "status", "merge_fields", "tags", "last_changed", "created")

    def __init__(self, email: str, status: str, merge_fields: dict, tags: set[str]) -> None:
        self.email = email
        self.status = status
        self.merge_fields = merge_fields
        self.tags = tags
        self.created = self.last_changed = _now()


class Audience:
    def __init__(self, list_id: str, name: str) -> None:
        self.id = list_id
        self.name = name
        self.web_id = abs(hash(list_id)) % 1_000_000
        self.members: dict[str, Member] = {}
        self.forgotten: set[str] = set()
        self.merge_fields: list[dict] = []
        self.segments: dict[int, str] = {}  # segment id -> tag name (static segments are tags)
        self._segment_ids: dict[str, int] = {}  # tag name -> segment id (a cache of the above)
        self.next_merge_id = 1
        self.next_segment_id = 1000
        for tag, name, ftype, options in (
            ("FNAME", "First Name", "text", {}),
            ("LNAME", "Last Name", "text", {}),
            ("ADDRESS", "Address", "address", {"default_country": 164}),
            ("PHONE", "Phone Number", "phone", {"phone_format": "none"}),
            ("BIRTHDAY", "Birthday", "birthday", {"date_format": "MM/DD"}),
        ):
            self.add_merge_field({"tag": tag, "name": name, "type": ftype, "options": options})

    def add_merge_field(self, body: dict) -> dict:
        field = {
            "merge_id": self.next_merge_id,
            "tag": body["tag"],
            "name": body.get("name", body["tag"]),
            "type": body.get("type", "text"),
            "required": bool(body.get("required", False)),
            "default_value": body.get("default_value", ""),
            "public": bool(body.get("public", False)),
            "display_order": self.next_merge_id + 1,
            "options": body.get("options") or {},
            "help_text": body.get("help_text", ""),
            "list_id": self.id,
        }
        if field["type"] == "date" and "date_format" not in field["options"]:
            field["options"]["date_format"] = "MM/DD/YYYY"
        if field["type"] == "birthday" and "date_format" not in field["options"]:
            field["options"]["date_format"] = "MM/DD"
        self.next_merge_id += 1
        self.merge_fields.append(field)
        return field

    def segment_id(self, name: str) -> int:
        sid = self._segment_ids.get(name)
        if sid is not None and self.segments.get(sid) == name:
            return sid
        for sid, sname in self.segments.items():
            if sname == name:
                self._segment_ids[name] = sid
                return sid
        sid = self.next_segment_id
        self._segment_ids[name] = sid
        self.next_segment_id += 1
        self.segments[sid] = name
        return sid


class MailchimpEmulator(Emulator):
    name = "mailchimp"
    prefix = "/mailchimp/3.0"
    after_faults = True
    dc = "us1"
    fake_domains: set[str] = set()
    report_unchanged = False
    gzip_answers = False
    GZIP_MIN_BYTES = 512

    def __init__(self, sandbox) -> None:
        super().__init__(sandbox)
        self.api_key = sandbox.token() + "-" + self.dc
        self.access_token = sandbox.token("mcoauth")
        self.account_id = sandbox.token()[:24]
        self.audience_id = sandbox.token()[:10]
        self.in_flight = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailchimp-emulator")
        self._handling = threading.Lock()
        self.batches: dict[str, dict] = {}
        self.batch_results: dict[str, bytes] = {}
        self._batch_queue: asyncio.Queue | None = None
        seed = sandbox.seed.get("mailchimp", {})
        self.fake_domains = set(seed.get("fake_domains", self.fake_domains))
        self.report_unchanged = bool(seed.get("report_unchanged", self.report_unchanged))
        self.reset()

    # -- setup ------------------------------------------------------------------------------
    def reset(self) -> None:
        self.audiences: dict[str, Audience] = {self.audience_id: Audience(self.audience_id, "Sandbox audience")}
        self.batches.clear()
        self.batch_results.clear()
        seed = self.sandbox.seed.get("mailchimp", {})
        self.gzip_answers = bool(seed.get("gzip_answers", type(self).gzip_answers))
        self.gzip_min_bytes = int(seed.get("gzip_min_bytes", type(self).GZIP_MIN_BYTES))
        self.gzipped = 0  # answers sent compressed since the last reset
        audience = self.audiences[self.audience_id]
        for m in seed.get("members", []):
            email = m["email_address"].strip()
            h = subscriber_hash(email)
            if m.get("status") == "forgotten":
                audience.forgotten.add(h)
                continue
            audience.members[h] = Member(email, m.get("status", "subscribed"), dict(m.get("merge_fields") or {}),
                                         set(m.get("tags") or []))

    def info(self, base: str) -> dict:
        return {
            "base_url": base + self.prefix,
            "api_key": self.api_key,
            "audience_id": self.audience_id,
            "access_token": self.access_token,
            "oauth_metadata_url": base + "/mailchimp-login/oauth2/metadata",
        }

    def state(self) -> dict:
        out = {}
        for aid, aud in self.audiences.items():
            out[aid] = {
                "name": aud.name,
                "members": {
                    m.email: {"status": m.status, "merge_fields": m.merge_fields, "tags": sorted(m.tags)}
                    for m in aud.members.values()
                },
                "forgotten": len(aud.forgotten),
                "merge_fields": [f["tag"] for f in aud.merge_fields],
                "segments": {sid: name for sid, name in aud.segments.items()},
            }
        return {"audiences": out, "batches": {k: v["status"] for k, v in self.batches.items()}}

    # -- errors -----------------------------------------------------------------------------
    @staticmethod
    def problem(status: int, title: str, detail: str, errors: list | None = None) -> JSONResponse:
        instance = str(uuid.uuid4())
        body: dict[str, Any] = {
            "type": "https://mailchimp.com/developer/marketing/docs/errors/",
            "title": title, "status": status, "detail": detail, "instance": instance,
        }
        if errors is not None:
            body["errors"] = errors
        return JSONResponse(body, status_code=status, media_type="application/problem+json", headers={
            "X-Request-Id": instance,
            "Link": '<https://us1.api.mailchimp.com/schema/3.0/ProblemDetailDocument.json>; rel="describedBy"',
        })

    def error_response(self, status: int, kind: str, headers: dict | None = None) -> Response:
        if status == 429:
            return self.problem(429, "Too Many Requests",
                                "You have exceeded the limit of 10 simultaneous connections.")
        if status == 504:
            return self.problem(504, "Gateway Timeout", "The request timed out.")
        titles = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
        return self.problem(status, titles.get(status, "Error"),
                            "An unexpected internal error has occurred. Please try again later.")

    def authenticate(self, request: Request) -> Response | None:
        header = request.headers.get("authorization", "")
        if not header:
            return self.problem(401, "API Key Missing", "Your request did not include an API key.")
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        key = None
        if scheme == "basic":
            try:
                key = base64.b64decode(value).decode("utf-8").partition(":")[2]
            except ValueError:
                key = None
        elif scheme == "apikey":
            key = value.strip()
        elif scheme in ("bearer", "oauth"):
            if value.strip() == self.access_token:
                return None
            return self.problem(401, "API Key Invalid",
                                "Your API key may be invalid, or you've attempted to access the wrong datacenter.")
        if key == self.api_key:
            return None
        if key and key.rpartition("-")[0] == self.api_key.rpartition("-")[0]:
            return self.problem(403, "Wrong Datacenter",
                                "The API key provided is linked to a different datacenter.")
        return self.problem(401, "API Key Invalid",
                            "Your API key may be invalid, or you've attempted to access the wrong datacenter.")

    # -- routing ----------------------------------------------------------------------------
    def routes(self) -> list:
        r = self._wrap
        return [
            Mount(self.prefix, routes=[
                Route("/", r("root", self.h_root)),
                Route("/ping", r("ping", self.h_ping)),
                Route("/lists", r("lists", self.h_lists)),
                Route("/lists/{list_id}", r("list", self.h_list), methods=["GET", "POST"]),
                Route("/lists/{list_id}/merge-fields", r("merge-fields", self.h_merge_fields),
                      methods=["GET", "POST"]),
                Route("/lists/{list_id}/members", r("members", self.h_members), methods=["GET", "POST"]),
                Route("/lists/{list_id}/members/{hash}", r("member", self.h_member),
                      methods=["GET", "PUT", "PATCH", "DELETE"]),
                Route("/lists/{list_id}/members/{hash}/actions/delete-permanent",
                      r("member-delete-permanent", self.h_delete_permanent), methods=["POST"]),
                Route("/lists/{list_id}/members/{hash}/tags", r("member-tags", self.h_member_tags),
                      methods=["GET", "POST"]),
                Route("/lists/{list_id}/segments", r("segments", self.h_segments), methods=["GET", "POST"]),
                Route("/lists/{list_id}/segments/{segment_id}", r("segment", self.h_segment),
                      methods=["GET", "POST", "DELETE"]),
                Route("/lists/{list_id}/segments/{segment_id}/members", r("segment-members",
                      self.h_segment_members)),
                Route("/batches", r("batches", self.h_batches), methods=["GET", "POST"]),
                Route("/batches/{batch_id}", r("batch", self.h_batch), methods=["GET", "DELETE"]),
            ]),
            Route("/mailchimp-login/oauth2/metadata", self.h_oauth_metadata),
            Route("/mailchimp-batch-results/{batch_id}.tar.gz", self.h_batch_results),
        ]

    def _wrap(self, route: str, handler):
        async def endpoint(request: Request) -> Response:
            request.state.arrived = asyncio.get_running_loop().time()  # the latency model counts from here
            self._public_base = f"{request.url.scheme}://{request.url.netloc}"
            denied = self.authenticate(request)
            if denied is not None:
                self.sandbox.log.request(self.name, request.method, route)
                return denied
            self.in_flight += 1
            try:
                if self.in_flight > MAX_CONNECTIONS:
                    self.sandbox.log.request(self.name, request.method, route)
                    return self.error_response(429, "limit")
                body = None
                if request.method in ("POST", "PUT", "PATCH"):
                    raw = await request.body()
                    try:
                        body = msgspec.json.decode(raw) if raw else {}
                    except ValueError:
                        return self.problem(400, "JSON Parse Error",
                                            "We encountered an unspecified JSON parsing error.")
                items = len(body.get("members", [])) if isinstance(body, dict) and route == "list" else 0
                fault = await self.before(request, route, items)
                if fault is not None:
                    return fault
                args = (request.method, request.path_params, dict(request.query_params), body)
                gzip_ok = self.gzip_answers and "gzip" in request.headers.get("accept-encoding", "").lower()
                if items > _INLINE_ITEMS:
                    # A big call's work (~10 ms for 500 members) runs on the emulator's worker thread,
                    # one call at a time as before: the event loop keeps sending the answers that are due
                    # meanwhile instead of holding them until this call is processed (a real vendor
                    # serves concurrent calls in parallel; the latency model must not grow with the load).
                    status, body_or_response = await asyncio.get_running_loop().run_in_executor(
                        self._worker, contextvars.copy_context().run, self._handle_and_encode, handler, args,
                        gzip_ok)
                else:
                    status, body_or_response = self._handle_and_encode(handler, args, gzip_ok)
                response = body_or_response if isinstance(body_or_response, Response) else Response(
                    body_or_response, status_code=status, media_type="application/json")
                return await self.after(request, response)  # an injected "after" fault loses the answer
            finally:
                self.in_flight -= 1

        return endpoint

    def _handle_and_encode(self, handler, args, gzip_ok: bool = False) -> tuple[int, Response | bytes]:
        with self._handling:  # one handler at a time, on the worker thread or the event loop's
            status, payload = handler(*args)
        if status == 204:
            return status, Response(status_code=204)
        if status >= 400:
            return status, payload
        wanted, unwanted = args[2].get("fields"), args[2].get("exclude_fields")
        if (wanted or unwanted) and isinstance(payload, dict):
            payload = partial_response(payload, wanted, unwanted)
            if payload is None:
                return 422, self.problem(422, "Requested Fields Invalid",
                                         "The fields requested from this resource are invalid.")
        body = msgspec.json.encode(payload)
        if not (gzip_ok and len(body) >= self.gzip_min_bytes):
            return status, body
        with self._handling:
            self.gzipped += 1
        return status, Response(gzip.compress(body, compresslevel=1), status_code=status,
                                media_type="application/json",
                                headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})

    def _audience(self, list_id: str) -> Audience | JSONResponse:
        aud = self.audiences.get(list_id)
        if aud is None:
            return self.problem(404, "Resource Not Found", "The requested resource could not be found.")
        return aud

    # -- handlers: (method, path_params, query, body) -> (status, payload | error Response) ---------
    def h_root(self, method, p, q, body):
        return 200, {
            "account_id": self.account_id, "login_id": "1", "account_name": "Segexport Sandbox",
            "email": "owner@sandbox.example", "first_name": "Sandbox", "last_name": "Owner",
            "total_subscribers": sum(len(a.members) for a in self.audiences.values()),
        }

    def h_ping(self, method, p, q, body):
        return 200, {"health_status": "Everything's Chimpy!"}

    def _list_json(self, aud: Audience) -> dict:
        counts = {"member_count": 0, "unsubscribe_count": 0, "cleaned_count": 0}
        for m in aud.members.values():
            if m.status == "subscribed":
                counts["member_count"] += 1
            elif m.status == "unsubscribed":
                counts["unsubscribe_count"] += 1
            elif m.status == "cleaned":
                counts["cleaned_count"] += 1
        return {"id": aud.id, "web_id": aud.web_id, "name": aud.name, "stats": counts}

    def h_lists(self, method, p, q, body):
        lists = [self._list_json(a) for a in self.audiences.values()]
        return 200, {"lists": lists, "total_items": len(lists)}

    def h_list(self, method, p, q, body):
        aud = self._audience(p["list_id"])
        if not isinstance(aud, Audience):
            return 404, aud
        if method == "GET":
            return 200, self._list_json(aud)
        return self.batch_subscribe(aud, body or {}, q)

    def h_merge_fields(self, method, p, q, body):
        aud = self._audience(p["list_id"])
        if not isinstance(aud, Audience):
            return 404, aud
        if method == "GET":
            count, offset = _page(q)
            fields = aud.merge_fields[offset: offset + count]
            return 200, {"merge_fields": fields, "list_id": aud.id, "total_items": len(aud.merge_fields)}
        tag = str((body or {}).get("tag") or (body or {}).get("name", "")).upper().replace(" ", "")[:10]
        if not (body or {}).get("name") or not (body or {}).get("type"):
            return 400, self.problem(400, "Invalid Resource", "The resource submitted could not be validated.",
                                     [{"field": "name", "message": "This value should not be blank."}])
        if any(f["tag"] == tag for f in aud.merge_fields):
            return 400, self.problem(400, "Invalid Resource", f'A Merge Field with the tag "{tag}" already exists '
                                     "for this list.")
        return 200, aud.add_merge_field({**body, "tag": tag})

    def _member_json(self, aud: Audience, m: Member, h: str | None = None) -> dict:
        h = h or subscriber_hash(m.email)
        return {
            "id": h, "email_address": m.email, "unique_email_id": h[:10], "contact_id": h[10:20],
            "full_name": " ".join(filter(None, [str(m.merge_fields.get("FNAME", "")),
                                                str(m.merge_fields.get("LNAME", ""))])),
            "email_type": "html", "status": m.status, "merge_fields": m.merge_fields,
            "last_changed": m.last_changed, "timestamp_signup": m.created, "list_id": aud.id,
            "tags_count": len(m.tags),
            "tags": [{"id": aud.segment_id(t), "name": t} for t in sorted(m.tags)],
        }

    def h_members(self, method, p, q, body):
        aud = self._audience(p["list_id"])
        if not isinstance(aud, Audience):
            return 404, aud
        if method == "GET":
            count, offset = _page(q)
            status = q.get("status")
            members = [m for m in aud.members.values() if not status or m.status == status]
            return 200, {"members": [self._member_json(aud, m) for m in members[offset: offset + count]],
                         "list_id": aud.id, "total_items": len(members)}
        email = str((body or {}).get("email_address", "")).strip()
        if subscriber_hash(email) in aud.members:
            return 400, self.problem(400, "Member Exists", f"{email} is already a list member. Use PUT to insert "
                                     "or update list members.")
        return self._put_member(aud, subscriber_hash(email), {**(body or {}), "status_if_new": body.get("status")}, q)

    def h_member(self, method, p, q, body):
        aud = self._audience(p["list_id"])
        if not isinstance(aud, Audience):
            return 404, aud
        h = _hash_param(p["hash"])
        if method == "PUT" or method == "PATCH":
            if method == "PATCH" and h not in aud.members:
                return 404, self.problem(404, "Resource Not Found", "The requested resource could not be found.")
            return self._put_member(aud, h, body or {}, q, patch=method == "PATCH")
        m = aud.members.get(h)
        if m is None:
            return 404, self.problem(404, "Resource Not Found", "The requested resource could not be found.")
        if method == "DELETE":
            if m.status in ("cleaned", "pending", "archived"):
                resp = self.problem(405, "Method Not Allowed", "This list member cannot be removed. Can not "
                                    "archive a contact that is bounced, pending or archived")
                resp.headers["Allow"] = "GET, PUT"
                return 405, resp
            m.status = "archived"
            m.last_changed = _now()
            return 204, None
        return 200, self._member_json(aud, m)

    def _put_member(self, aud: Audience, h: str, body: dict, q: dict, patch: bool = False):
        email = str(body.get("email_address", "")).strip()
        if not patch and (not email or subscriber_hash(email) != h):
            return 400, self.problem(400, "Invalid Resource", "The resource submitted could not be validated.",
                                     [{"field": "email_address", "message": "This value should not be blank."}
                                      if not email else {"field": "email_address",
                                                         "message": "The email address does not match the hash."}])
        if not patch and not body.get("status_if_new") and h not in aud.members:
            return 400, self.problem(400, "Invalid Resource", "The resource submitted could not be validated.",
                                     [{"field": "status_if_new", "message": "This value should not be blank."}])
        item = {**body, "email_address": email or aud.members[h].email}
        outcome, payload = self._upsert(aud, item, update_existing=True, sync_tags=False,
                                        skip_merge_validation=_truthy(q.get("skip_merge_validation")))
        if outcome == "error":
            return 400, self.problem(400, payload["title"], payload["error"], payload.get("errors"))
        return 200, self._member_json(aud, aud.members[h])

    def h_delete_permanent(self, method, p, q, body):
        aud = self._audience(p["list_id"])
        if not isinstance(aud, Audience):
            return 404, aud
        h = _hash_param(p["hash"])
        if h not in aud.members:
            return 404, self.problem(404, "Resource Not Found", "The requested resource could not be found.")
        del aud.members[h]
        aud.forgotten.add(h)
        return 204, None

    def h_member_tags(self, method, p, q, body):
        aud = self._audience(p["list_id"])
        if not isinstance(aud, Audience):
            return 404, aud
        m = aud.members.get(_hash_param(p["hash"]))
        if m is None:
            return 404, self.problem(404, "Resource Not Found", "The requested resource could not be found.")
        if method == "GET":
            tags = [{"id": aud.segment_id(t), "name": t, "date_added": m.last_changed} for t in sorted(m.tags)]
            return 200, {"tags": tags, "total_items": len(tags)}
        for tag in (body or {}).get("tags", []):
            name = str(tag.get("name", "")).strip()
            if not name:
                continue
            if tag.get("status") == "inactive":
                m.tags.discard(name)
            else:
                m.tags.add(name)
                aud.segment_id(name)
        return 204, None

    def h_segments(self, method, p, q, body):
        aud = self._audience(p["list_id"])
        if not isinstance(aud, Audience):
            return 404, aud
        if method == "GET":
            count, offset = _page(q)
            segs = [self._segment_json(aud, sid) for sid in list(aud.segments)[offset: offset + count]]
            return 200, {"segments": segs, "list_id": aud.id, "total_items": len(aud.segments)}
        name = str((body or {}).get("name", "")).strip()
        if not name:
            return 400, self.problem(400, "Invalid Resource", "The resource submitted could not be validated.",
                                     [{"field": "name", "message": "This value should not be blank."}])
        if name in aud.segments.values():
            return 400, self.problem(400, "Invalid Resource", "Sorry, that tag already exists.")
        emails = (body or {}).get("static_segment") or []
        sid = aud.segment_id(name)
        for email in emails:
            m = aud.members.get(subscriber_hash(email))
            if m is not None:
                m.tags.add(name)
        return 200, self._segment_json(aud, sid)

    def _segment_json(self, aud: Audience, sid: int) -> dict:
        name = aud.segments[sid]
        return {"id": sid, "name": name, "type": "static", "list_id": aud.id,
                "member_count": sum(1 for m in aud.members.values() if name in m.tags)}

    def _segment(self, p) -> tuple[Audience, int] | JSONResponse:
        aud = self._audience(p["list_id"])
        if not isinstance(aud, Audience):
            return aud
        sid = int(p["segment_id"]) if str(p["segment_id"]).isdigit() else -1
        if sid not in aud.segments:
            return self.problem(404, "Resource Not Found", "The requested resource could not be found.")
        return aud, sid

    def h_segment(self, method, p, q, body):
        found = self._segment(p)
        if not isinstance(found, tuple):
            return 404, found
        aud, sid = found
        if method == "GET":
            return 200, self._segment_json(aud, sid)
        if method == "DELETE":
            name = aud.segments.pop(sid)
            for m in aud.members.values():
                m.tags.discard(name)
            return 204, None
        add = (body or {}).get("members_to_add") or []
        remove = (body or {}).get("members_to_remove") or []
        if len(add) > MAX_SEGMENT_ITEMS or len(remove) > MAX_SEGMENT_ITEMS:
            return 400, self.problem(400, "Invalid Resource", "Maximum allowed member items exceeded, please "
                                     "provide at most 500 items in members_to_add field or members_to_remove field")
        name = aud.segments[sid]
        added, removed, errors = [], [], []
        missing_add, missing_remove = [], []
        for email in add:
            m = aud.members.get(subscriber_hash(str(email)))
            if m is None:
                missing_add.append(email)
            elif name not in m.tags:
                m.tags.add(name)
                added.append(self._member_json(aud, m))
        for email in remove:
            m = aud.members.get(subscriber_hash(str(email)))
            if m is None:
                missing_remove.append(email)
            elif name in m.tags:
                m.tags.discard(name)
                removed.append(self._member_json(aud, m))
        self.sandbox.log.members(self.name, [str(e).strip().lower() for e in add], route="segment-add")
        self.sandbox.log.members(self.name, [str(e).strip().lower() for e in remove], route="segment-remove")
        if missing_add:
            errors.append({"email_addresses": missing_add, "error": "Email addresses do not belong to this list"})
        if missing_remove:
            errors.append({"email_addresses": missing_remove, "error": "Email addresses do not belong to this list"})
        return 200, {"members_added": added, "members_removed": removed, "errors": errors,
                     "total_added": len(added), "total_removed": len(removed),
                     "error_count": len(missing_add) + len(missing_remove), "_links": []}

    def h_segment_members(self, method, p, q, body):
        found = self._segment(p)
        if not isinstance(found, tuple):
            return 404, found
        aud, sid = found
        name = aud.segments[sid]
        count, offset = _page(q)
        members = [m for m in aud.members.values() if name in m.tags]
        page = members[offset: offset + count]
        return 200, {"members": [self._member_json(aud, m) for m in page], "total_items": len(members)}

    # -- the rules of batch subscribe ---------------------------------------------------------
    def batch_subscribe(self, aud: Audience, body: dict, q: dict):
        members = body.get("members")
        if not isinstance(members, list):
            return 400, self.problem(400, "Invalid Resource", "The resource submitted could not be validated.",
                                     [{"field": "members", "message": "Schema describes array, object found instead"}])
        if len(members) > MAX_BATCH_MEMBERS:
            return 400, self.problem(400, "Invalid Resource", "The resource submitted could not be validated.",
                                     [{"field": "members", "message": "Only 500 members may be added or updated "
                                       "with each API call."}])
        update_existing = _truthy(body.get("update_existing"))
        sync_tags = _truthy(body.get("sync_tags"))
        skip_merge = _truthy(q.get("skip_merge_validation"))
        skip_dup = _truthy(q.get("skip_duplicate_check"))
        new, updated, errors = [], [], []
        seen: set[str] = set()
        by_tag = {f["tag"]: f for f in aud.merge_fields}
        self.sandbox.log.members(self.name, [str(m.get("email_address", "")).strip().lower()
                                             for m in members if isinstance(m, dict)], route="batch-subscribe")
        for item in members:
            email = str(item.get("email_address", "")).strip() if isinstance(item, dict) else ""
            h = subscriber_hash(email)
            if h in seen:
                if not skip_dup:
                    errors.append(_member_error(email, "This email address is duplicated in this request.",
                                                "ERROR_GENERIC"))
                continue
            seen.add(h)
            outcome, payload = self._upsert(aud, item, update_existing, sync_tags, skip_merge, by_tag, h)
            if outcome == "new":
                new.append(self._member_json(aud, payload, h))
            elif outcome == "updated" or (outcome == "unchanged" and self.report_unchanged):
                updated.append(self._member_json(aud, payload, h))
            elif outcome == "error":
                errors.append(_member_error(email, payload["error"], payload.get("code", "ERROR_GENERIC"),
                                            payload.get("field", ""), payload.get("field_message", "")))
        return 200, {"new_members": new, "updated_members": updated, "errors": errors,
                     "total_created": len(new), "total_updated": len(updated), "error_count": len(errors),
                     "_links": []}

    def _upsert(self, aud: Audience, item: dict, update_existing: bool, sync_tags: bool,
                skip_merge_validation: bool, by_tag: dict | None = None, h: str | None = None) -> tuple[str, Any]:
        email = str(item.get("email_address", "")).strip()
        if not _EMAIL_RE.match(email) or email.rpartition("@")[2].lower() in self.fake_domains:
            return "error", {"title": "Invalid Resource",
                             "error": f"{email} looks fake or invalid, please enter a real email address.",
                             "code": "ERROR_GENERIC", "field": "email_address"}
        h = h or subscriber_hash(email)
        if h in aud.forgotten:
            return "error", {"title": "Forgotten Email Not Subscribed",
                             "error": f"{email} was permanently deleted and cannot be re-imported. The contact "
                                      "must re-subscribe to get back on the list.", "code": "ERROR_GENERIC"}
        status = item.get("status")
        status_if_new = item.get("status_if_new")
        for value, fname in ((status, "status"), (status_if_new, "status_if_new")):
            if value is not None and value not in STATUSES:
                return "error", {"title": "Invalid Resource", "error": f"Invalid {fname}: {value}",
                                 "code": "ERROR_GENERIC", "field": fname,
                                 "field_message": "Value is not one of the allowed values."}
        merge = item.get("merge_fields") or {}
        existing = aud.members.get(h)
        problems = self._check_merge(aud, merge, new=existing is None and not skip_merge_validation, by_tag=by_tag)
        if problems:
            first = problems[0]
            return "error", {"title": "Invalid Resource", "error": "Your merge fields were invalid.",
                             "code": "ERROR_GENERIC", "field": first["field"], "field_message": first["message"],
                             "errors": problems}
        tags = {str(t.get("name") if isinstance(t, dict) else t).strip() for t in (item.get("tags") or [])}
        tags.discard("")
        if existing is None:
            new_status = status or status_if_new
            if not new_status:
                return "error", {"title": "Invalid Resource", "error": "Please provide a status for new members.",
                                 "code": "ERROR_GENERIC", "field": "status_if_new"}
            member = Member(email, new_status, dict(merge), tags)
            aud.members[h] = member
            for t in tags:
                aud.segment_id(t)
            return "new", member
        if not update_existing:
            return "error", {"title": "Member Exists", "error": f"{email} is already a list member, do you want "
                             "to update? please provide update_existing:true in the request body",
                             "code": "ERROR_CONTACT_EXISTS"}
        changed = False
        if status and status != existing.status:
            if existing.status in ("unsubscribed", "cleaned") and status in ("subscribed", "pending"):
                return "error", {"title": "Member In Compliance State",
                                 "error": f"{email} is in a compliance state due to unsubscribe, bounce, or "
                                          "compliance review and cannot be subscribed.", "code": "ERROR_GENERIC"}
            existing.status = status
            changed = True
        for key, value in merge.items():
            if existing.merge_fields.get(key) != value:
                existing.merge_fields[key] = value
                changed = True
        new_tags = tags if sync_tags else existing.tags | tags
        if new_tags != existing.tags:
            existing.tags = set(new_tags)
            for t in tags:
                aud.segment_id(t)
            changed = True
        if changed:
            existing.last_changed = _now()
            return "updated", existing
        return "unchanged", existing

    def _check_merge(self, aud: Audience, merge: dict, new: bool, by_tag: dict | None = None) -> list[dict]:
        problems = []
        if by_tag is None:
            by_tag = {f["tag"]: f for f in aud.merge_fields}
        for tag, value in merge.items():
            field = by_tag.get(tag)
            if field is None:
                continue  # unknown keys are ignored (API-FACTS 1.7: believed silent)
            msg = _merge_value_problem(field, value)
            if msg:
                problems.append({"field": tag, "message": msg})
        if new:
            for f in aud.merge_fields:
                if f["required"] and merge.get(f["tag"]) in (None, ""):
                    problems.append({"field": f["tag"], "message": "Please enter a value"})
        return problems

    # -- batch operations ---------------------------------------------------------------------
    def h_batches(self, method, p, q, body):
        if method == "GET":
            count, offset = _page(q)
            items = list(self.batches.values())[offset: offset + count]
            return 200, {"batches": [_batch_public(b) for b in items], "total_items": len(self.batches)}
        ops = (body or {}).get("operations")
        if not isinstance(ops, list) or not ops:
            return 400, self.problem(400, "Invalid Resource", "The resource submitted could not be validated.",
                                     [{"field": "operations", "message": "This value should not be blank."}])
        pending = sum(1 for b in self.batches.values() if b["status"] != "finished")
        if pending >= 500:
            return 400, self.problem(400, "Invalid Resource", "You have more than 500 pending batches.")
        bid = uuid.uuid4().hex[:10]
        batch = {"id": bid, "status": "pending", "total_operations": len(ops), "finished_operations": 0,
                 "errored_operations": 0, "submitted_at": _now(), "completed_at": "", "response_body_url": "",
                 "_ops": ops}
        self.batches[bid] = batch
        self._ensure_worker()
        self._batch_queue.put_nowait(bid)
        return 200, _batch_public(batch)

    def h_batch(self, method, p, q, body):
        batch = self.batches.get(p["batch_id"])
        if batch is None:
            return 404, self.problem(404, "Resource Not Found", "The requested resource could not be found.")
        if method == "DELETE":
            batch["status"] = "finished"
            self.batches.pop(p["batch_id"], None)
            return 204, None
        return 200, _batch_public(batch)

    def _ensure_worker(self) -> None:
        if self._batch_queue is None:
            self._batch_queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._batch_worker())

    async def _batch_worker(self) -> None:
        """Processes batches one at a time per account, as Mailchimp does."""
        while True:
            bid = await self._batch_queue.get()
            batch = self.batches.get(bid)
            if batch is None:
                continue
            for status in ("preprocessing", "started"):
                batch["status"] = status
                await asyncio.sleep(0.05)
            results = []
            for op in batch["_ops"]:
                results.append(self._run_operation(op))
                batch["finished_operations"] += 1
                if results[-1]["status_code"] >= 400:
                    batch["errored_operations"] += 1
                await asyncio.sleep(self.sandbox.latency.seconds(_op_items(op)))
            batch["status"] = "finalizing"
            self.batch_results[bid] = _tar_results(bid, results)
            batch["response_body_url"] = f"{self._public_base}/mailchimp-batch-results/{bid}.tar.gz"
            batch["completed_at"] = _now()
            batch["status"] = "finished"

    _public_base = ""

    def _run_operation(self, op: dict) -> dict:
        method = str(op.get("method", "GET")).upper()
        path = str(op.get("path", ""))
        params = op.get("params") or {}
        try:
            body = json.loads(op["body"]) if op.get("body") else None
        except ValueError:
            body = None
        parts = [x for x in path.strip("/").split("/") if x]
        status, payload = 404, self.problem(404, "Resource Not Found", "The requested resource could not be found.")
        if len(parts) == 2 and parts[0] == "lists" and method == "POST":
            status, payload = self.h_list("POST", {"list_id": parts[1]}, params, body)
        elif len(parts) == 4 and parts[0] == "lists" and parts[2] == "members" and method in ("PUT", "PATCH"):
            status, payload = self.h_member(method, {"list_id": parts[1], "hash": parts[3]}, params, body)
        elif len(parts) == 5 and parts[2] == "members" and parts[4] == "tags" and method == "POST":
            status, payload = self.h_member_tags("POST", {"list_id": parts[1], "hash": parts[3]}, params, body)
        elif len(parts) == 4 and parts[2] == "segments" and method == "POST":
            status, payload = self.h_segment("POST", {"list_id": parts[1], "segment_id": parts[3]}, params, body)
        if isinstance(payload, Response):
            text = payload.body.decode("utf-8")
        elif payload is None:
            text = ""
        else:
            text = json.dumps(payload)
        return {"status_code": status, "operation_id": op.get("operation_id"), "response": text}

    async def h_batch_results(self, request: Request) -> Response:
        data = self.batch_results.get(request.path_params["batch_id"])
        if data is None:
            return Response("<Error><Code>NoSuchKey</Code></Error>", status_code=404, media_type="application/xml")
        return Response(data, media_type="application/x-gzip")

    async def h_oauth_metadata(self, request: Request) -> Response:
        self.sandbox.log.request(self.name, "GET", "oauth-metadata")
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "oauth" or token.strip() != self.access_token:
            return JSONResponse({"error": "invalid_token"})  # 200 with an error body, as the real endpoint
        base = f"{request.url.scheme}://{request.url.netloc}"
        return JSONResponse({"dc": self.dc, "role": "owner", "accountname": "Segexport Sandbox",
                             "user_id": 1, "login_url": "https://login.mailchimp.com",
                             "api_endpoint": base + "/mailchimp",
                             "login": {"email": "owner@sandbox.example", "login_id": 1, "login_name": "owner"}})


def _batch_public(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("_")} | {"_links": []}


def _op_items(op: dict) -> int:
    try:
        return len(json.loads(op.get("body") or "{}").get("members", []))
    except (ValueError, AttributeError):
        return 0


def _tar_results(bid: str, results: list[dict]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        # Mailchimp splits results over several JSON files; so do we, to keep readers honest.
        chunk = 50
        for i in range(0, max(1, len(results)), chunk):
            data = json.dumps(results[i: i + chunk]).encode("utf-8")
            info = tarfile.TarInfo(name=f"{bid}/{i // chunk}.json")
            info.size = len(data)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _member_error(email: str, error: str, code: str, field: str = "", field_message: str = "") -> dict:
    return {"email_address": email, "error": error, "error_code": code, "field": field,
            "field_message": field_message}


def _merge_value_problem(field: dict, value: Any) -> str | None:
    ftype = field["type"]
    if value in (None, ""):
        return None
    if ftype in ("text", "radio", "dropdown", "phone", "url", "imageurl", "zip"):
        if isinstance(value, (dict, list)):
            return "Please enter a text value"
        text = str(value)
        if len(text) > 255:
            return "Value must be no more than 255 characters"
        if ftype in ("url", "imageurl") and not re.match(r"^https?://", text):
            return "Please enter a valid URL"
        if ftype == "zip" and not re.match(r"^\d{5}(-\d{4})?$", text):
            return "Please enter a valid zip code"
        if ftype in ("radio", "dropdown"):
            choices = field.get("options", {}).get("choices") or []
            if choices and text not in choices:
                return "Please choose one of the options"
        return None
    if ftype == "number":
        try:
            float(value)
        except (TypeError, ValueError):
            return "Please enter a number"
        return None
    if ftype in ("date", "birthday"):
        fmt = field.get("options", {}).get("date_format", "MM/DD/YYYY" if ftype == "date" else "MM/DD")
        pattern = {"MM/DD/YYYY": r"^\d{2}/\d{2}/\d{4}$", "DD/MM/YYYY": r"^\d{2}/\d{2}/\d{4}$",
                   "MM/DD": r"^\d{2}/\d{2}$", "DD/MM": r"^\d{2}/\d{2}$"}.get(fmt, r".+")
        if not re.match(pattern, str(value)) and not re.match(r"^\d{4}-\d{2}-\d{2}$", str(value)):
            return f"Please enter the date in the format {fmt}"
        return None
    if ftype == "address":
        if not isinstance(value, dict):
            return "Please enter a complete address"
        missing = [k for k in ("addr1", "city", "state", "zip") if not value.get(k)]
        if missing:
            return "Please enter a complete address"
        return None
    return None


def _page(q: dict) -> tuple[int, int]:
    try:
        count = min(MAX_COUNT, max(1, int(q.get("count", 10))))
    except ValueError:
        count = 10
    try:
        offset = max(0, int(q.get("offset", 0)))
    except ValueError:
        offset = 0
    return count, offset


def _hash_param(value: str) -> str:
    return subscriber_hash(value) if "@" in value else value.lower()


def partial_response(payload: dict, fields: str | None, exclude_fields: str | None) -> dict | None:
    """Mailchimp's partial responses: ``fields`` keeps, ``exclude_fields`` drops, comma-separated
    paths with dot notation into sub-objects (applied to each object of an array). ``None`` when a path
    names nothing in the answer (Mailchimp's 422 ``RequestedFieldsInvalid``); paths under an empty
    array cannot be checked and pass."""
    def split(spec: str | None) -> list[list[str]]:
        return [part.strip().split(".") for part in (spec or "").split(",") if part.strip()]

    def known(node: Any, path: list[str]) -> bool:
        if isinstance(node, list):
            objects = [item for item in node if isinstance(item, dict)]
            return not objects or any(known(item, path) for item in objects)
        if not isinstance(node, dict) or path[0] not in node:
            return False
        return len(path) == 1 or known(node[path[0]], path[1:])

    def keep(node: Any, paths: list[list[str]]) -> Any:
        if isinstance(node, list):
            return [keep(item, paths) if isinstance(item, dict) else item for item in node]
        out = {}
        for name in dict.fromkeys(path[0] for path in paths):
            if name in node:
                deeper = [path[1:] for path in paths if path[0] == name]
                out[name] = node[name] if any(not d for d in deeper) else keep(node[name], deeper)
        return out

    def drop(node: Any, paths: list[list[str]]) -> Any:
        if isinstance(node, list):
            return [drop(item, paths) if isinstance(item, dict) else item for item in node]
        gone = {path[0] for path in paths if len(path) == 1}
        out = {}
        for name, value in node.items():
            if name in gone:
                continue
            deeper = [path[1:] for path in paths if path[0] == name]
            out[name] = drop(value, deeper) if deeper and isinstance(value, (dict, list)) else value
        return out

    wanted, unwanted = split(fields), split(exclude_fields)
    if not all(known(payload, path) for path in wanted + unwanted):
        return None
    if wanted:
        payload = keep(payload, wanted)
    return drop(payload, unwanted) if unwanted else payload


def _truthy(value: Any) -> bool:
    return str(value).lower() in ("true", "1") if not isinstance(value, bool) else value
