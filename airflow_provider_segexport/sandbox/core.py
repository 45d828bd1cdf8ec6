"""The sandbox's shared machinery: configuration, latency model, fault injection, request log and the
``/_sandbox/`` admin API. Each vendor emulator is a module with a class deriving from :class:`Emulator`.

Mounted paths (``base_url`` in the start-up JSON = scheme://host:port + prefix):

- ``/mailchimp/3.0``                     Mailchimp Marketing API 3.0
- ``/createsend/api/v3.3``               Campaign Monitor API v3.3
- ``/dataverse/api/data/v9.2``           Dataverse Web API
- ``/login/<tenant>/...``                Microsoft identity platform (msal authority)
- ``/adobe/<org>/campaign``              Adobe Campaign Standard
- ``/ims/token/v3``                      Adobe IMS
- ``/_sandbox/...``                      admin: state, reset, faults, latency, request counts,
                                         ``requests/wire``: the latest requests' headers and query strings
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route


@dataclass
class Latency:
    """Latency model: every call waits ``base_ms`` plus ``per_item_ms`` per member it carries."""

    base_ms: float = 0.0
    per_item_ms: float = 0.0

    def seconds(self, items: int = 0) -> float:
        return (self.base_ms + self.per_item_ms * max(0, items)) / 1000.0


@dataclass
class FaultRule:
    """One injected fault.

    kind: ``status`` (answer ``status`` with the vendor's error shape), ``timeout`` (hold the request
    for ``seconds`` then answer 504), ``drop`` (start the response and cut the connection),
    ``burst429`` (answer 429 the vendor's way). ``count`` requests are affected (after ``skip``
    matching requests are let through); ``vendor``/``path_contains``/``method`` narrow the match.

    ``retry_after``: also send ``Retry-After: <seconds>`` with a ``status``/``burst429`` answer.
    ``after``: the request is **processed first** and only its answer is lost (``drop``: connection cut
    after the work was done; ``timeout``: the answer is held back; ``status``: e.g. a gateway's 502
    after the backend processed it). The members such requests carried are counted in the request
    log as ``unanswered``: a client may rightly send them again. Emulators that support it set
    ``after_faults`` (Mailchimp); others never take such a rule.
    """

    kind: str
    vendor: str = "*"
    count: int = 1
    skip: int = 0
    status: int = 503
    seconds: float = 30.0
    path_contains: str = ""
    method: str = ""
    retry_after: float | None = None
    after: bool = False
    id: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {', '.join(FAULT_KINDS)}")
        if self.after and self.kind == "burst429":
            raise ValueError("a 429 means the request was not processed: burst429 cannot be 'after'")

    def matches(self, vendor: str, method: str, path: str, after_ok: bool = True) -> bool:
        return (
            (after_ok or not self.after)
            and (self.vendor in ("*", vendor))
            and (not self.path_contains or self.path_contains in path)
            and (not self.method or self.method.upper() == method)
        )


class Faults:
    """Thread-safe list of fault rules consumed by matching requests."""

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            rule.id = next(self._ids)
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def take(self, vendor: str, method: str, path: str, after_ok: bool = True) -> FaultRule | None:
        with self._lock:
            for rule in self._rules:
                if not rule.matches(vendor, method, path, after_ok):
                    continue
                if rule.skip > 0:
                    rule.skip -= 1
                    continue
                rule.count -= 1
                if rule.count <= 0:
                    self._rules.remove(rule)
                return rule
        return None

    def as_list(self) -> list[dict]:
        with self._lock:
            return [asdict(r) for r in self._rules]

    @staticmethod
    def parse(spec: str) -> list[FaultRule]:
        """Parse the CLI form ``kind[:key=value,...][;kind...]``, e.g. ``burst429:vendor=mailchimp,count=5``."""
        rules = []
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            kind, _, rest = part.partition(":")
            kwargs: dict[str, Any] = {}
            for item in filter(None, rest.split(",")):
                key, _, value = item.partition("=")
                kwargs[key.strip()] = value.strip()
            for key in ("count", "skip", "status"):
                if key in kwargs:
                    kwargs[key] = int(kwargs[key])
            for key in ("seconds", "retry_after"):
                if key in kwargs:
                    kwargs[key] = float(kwargs[key])
            if "after" in kwargs:
                kwargs["after"] = str(kwargs["after"]).lower() in ("1", "true", "yes")
            rules.append(FaultRule(kind=kind.strip(), **kwargs))
        return rules


FAULT_KINDS = ("status", "timeout", "drop", "burst429")

#: member keys logged while the current request is handled (set only when an ``after`` fault is pending)
_request_members: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("_request_members", default=None)


class DropConnection(Exception):
    """Raised after the response has started so the server cuts the connection."""


class DropResponse(Response):
    """Sends the status line and part of a body, then fails: the client sees a reset connection."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]})
        await send({"type": "http.response.body", "body": b'{"partial":', "more_body": True})
        raise DropConnection("sandbox fault: connection dropped")


#: Requests whose headers and query string the request log keeps (the latest ones).
WIRE_LOG_MAX = 20_000


class WireRecorder:
    """ASGI middleware: records each emulator request's method, path, query string and headers in the
    request log (not its body; the admin API's own requests are left out)."""

    def __init__(self, app: Callable, log: RequestLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/_sandbox"):
            self.log.on_wire(scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"),
                             [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]])
        await self.app(scope, receive, send)


@dataclass
class RequestLog:
    """What each emulator received: request counts per (vendor, method, route) and items per vendor.

    ``items_received`` counts members carried by write calls; ``member_sends`` counts, per vendor and
    member key, how often that member was sent (to prove "nothing sent twice"); ``unanswered`` counts,
    per vendor and member key, how often that member was in a request that was processed but whose
    answer an ``after`` fault took away (the only sends a client may rightly repeat). ``wire`` keeps, for
    the latest requests to the emulators, the method, path, query string and every header name and value
    (not bodies): a test searches them for a connection field that must never leave the client.
    """

    counts: Counter = field(default_factory=Counter)
    items_received: Counter = field(default_factory=Counter)
    items_by_route: Counter = field(default_factory=Counter)
    member_sends: dict[str, Counter] = field(default_factory=dict)
    unanswered: dict[str, Counter] = field(default_factory=dict)
    track_members: bool = True
    wire: deque = field(default_factory=lambda: deque(maxlen=WIRE_LOG_MAX))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_wire(self, method: str, path: str, query: str, headers: list[tuple[str, str]]) -> None:
        """Keep what a request carried outside its body (method, path, query string, headers)."""
        with self.lock:
            self.wire.append({"method": method, "path": path, "query": query, "headers": headers})

    def wire_snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.wire)

    def request(self, vendor: str, method: str, route: str) -> None:
        with self.lock:
            self.counts[f"{vendor} {method} {route}"] += 1

    def members(self, vendor: str, keys: list[str], route: str = "") -> None:
        with self.lock:
            self.items_received[vendor] += len(keys)
            if route:
                self.items_by_route[f"{vendor} {route}"] += len(keys)
            if self.track_members:
                self.member_sends.setdefault(vendor, Counter()).update(keys)
        pending = _request_members.get()
        if pending is not None:
            pending.extend(keys)

    def lost_answer(self, vendor: str, keys: list[str]) -> None:
        with self.lock:
            self.unanswered.setdefault(vendor, Counter()).update(keys)

    def snapshot(self) -> dict:
        with self.lock:
            dup = {v: sum(1 for n in c.values() if n > 1) for v, c in self.member_sends.items()}
            return {
                "counts": dict(self.counts),
                "items_received": dict(self.items_received),
                "items_by_route": dict(self.items_by_route),
                "members_sent_more_than_once": dup,
                "members_unanswered": {v: sum(c.values()) for v, c in self.unanswered.items()},
            }

    def sends_of(self, vendor: str) -> dict[str, int]:
        with self.lock:
            return dict(self.member_sends.get(vendor, {}))

    def unanswered_of(self, vendor: str) -> dict[str, int]:
        with self.lock:
            return dict(self.unanswered.get(vendor, {}))

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.items_received.clear()
            self.items_by_route.clear()
            self.member_sends.clear()
            self.unanswered.clear()
            self.wire.clear()


class Emulator:
    """Base for one vendor emulator. Subclasses set ``name`` and ``prefix`` and implement ``routes``."""

    name = ""
    prefix = ""
    #: whether the emulator calls :meth:`after` once a request is processed (``after`` faults)
    after_faults = False

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def routes(self) -> list[BaseRoute]:  # pragma: no cover - abstract
        raise NotImplementedError

    def info(self, base: str) -> dict:
        """This emulator's entry in the start-up JSON line."""
        return {"base_url": base + self.prefix}

    def state(self) -> dict:
        """What the destination holds now (for ``GET /_sandbox/state/<name>``)."""
        return {}

    def reset(self) -> None:
        """Forget everything received; keep credentials and seeded objects."""

    def error_response(self, status: int, kind: str, headers: dict | None = None) -> Response:
        """The vendor's own error shape for an injected fault (``kind``: status, burst429, timeout)."""
        return JSONResponse({"error": kind, "status": status}, status_code=status, headers=headers)

    #: names of the class attributes that can be changed at run time (seed "config" or the admin API)
    config_keys: tuple[str, ...] = ()

    def reset_config(self) -> None:
        """Back to the class defaults, then the seed's ``config``."""
        for key in self.config_keys:
            setattr(self, key, getattr(type(self), key))
        self.configure(self.sandbox.seed.get(self.name, {}).get("config") or {})

    def check_setting(self, key: str, value: Any) -> Any:
        """Validate or convert a setting that plain type coercion cannot (override per vendor)."""
        default = getattr(type(self), key)
        if isinstance(default, bool):
            return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1")
        return type(default)(value)

    def configure(self, values: dict) -> dict:
        """Change this emulator's configurable behaviour at run time; return the current settings."""
        for key, value in values.items():
            if key not in self.config_keys:
                raise ValueError(f"unknown {self.name} setting {key!r}")
            setattr(self, key, self.check_setting(key, value))
        return {key: getattr(self, key) for key in self.config_keys}

    async def h_config(self, request: Request) -> Response:
        """``GET|POST /_sandbox/<vendor>/config``: read or change the emulator's configuration."""
        try:
            values = await request.json() if request.method == "POST" else {}
            return JSONResponse(self.configure(values))
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    # helpers for handlers ----------------------------------------------------------------
    async def before(self, request: Request, route: str, items: int = 0) -> Response | None:
        """Log the call, apply latency and any injected fault; a Response means "answer this"."""
        return await self.sandbox.before(self, request, route, items)

    async def after(self, request: Request, response: Response) -> Response:
        """Once the request is processed: the answer to send (``response``, or a pending ``after`` fault's)."""
        return await self.sandbox.after(self, request, response)


class Sandbox:
    """Holds the configuration, the emulators and the shared controls."""

    def __init__(
        self,
        *,
        latency: Latency | None = None,
        token_ttl: int = 3600,
        seed: dict | None = None,
        rng_seed: int | None = None,
    ) -> None:
        self.latency = latency or Latency()
        self.token_ttl = self._initial_token_ttl = token_ttl
        self.faults = Faults()
        self.log = RequestLog()
        self.random = random.Random(rng_seed)
        self.seed = seed or {}
        self.started_at = time.time()
        self.emulators: dict[str, Emulator] = {}
        from airflow_provider_segexport.sandbox import registry

        for cls in registry.emulator_classes():
            emulator = cls(self)
            self.emulators[emulator.name] = emulator

    def token(self, prefix: str = "") -> str:
        return prefix + "".join(self.random.choice("abcdef0123456789") for _ in range(32))

    # request hooks -----------------------------------------------------------------------
    async def before(self, emulator: Emulator, request: Request, route: str, items: int) -> Response | None:
        method = request.method
        self.log.request(emulator.name, method, route)
        rule = self.faults.take(emulator.name, method, request.url.path, after_ok=emulator.after_faults)
        delay = self.latency.seconds(items)
        if rule is None and emulator.after_faults:
            # The model is the whole call's duration from the request's arrival: the emulator's own
            # processing, and its waiting for the event loop while other calls are processed, count
            # towards it (after() sleeps what is left), so a busy emulator does not inflate the
            # vendor's latency (a real vendor serves concurrent calls in parallel).
            start = getattr(request.state, "arrived", None) or asyncio.get_running_loop().time()
            request.state.answer_at = start + delay
            return None
        if delay:
            await asyncio.sleep(delay)
        if rule is None:
            return None
        if rule.after:  # processed first; emulator.after() replaces the answer
            request.state.after_fault = rule
            _request_members.set([])
            return None
        return await self._fault_response(emulator, rule)

    async def after(self, emulator: Emulator, request: Request, response: Response) -> Response:
        answer_at = getattr(request.state, "answer_at", None)
        if answer_at is not None:
            left = answer_at - asyncio.get_running_loop().time()
            if left > 0:
                await asyncio.sleep(left)
        rule = getattr(request.state, "after_fault", None)
        if rule is None:
            return response
        request.state.after_fault = None
        self.log.lost_answer(emulator.name, _request_members.get() or [])
        _request_members.set(None)
        return await self._fault_response(emulator, rule)

    @staticmethod
    async def _fault_response(emulator: Emulator, rule: FaultRule) -> Response:
        if rule.kind == "timeout":
            await asyncio.sleep(rule.seconds)
            return emulator.error_response(504, "timeout")
        if rule.kind == "drop":
            return DropResponse()
        headers = {"Retry-After": f"{rule.retry_after:g}"} if rule.retry_after is not None else None
        if rule.kind == "burst429":
            response = emulator.error_response(429, "burst429")
        else:
            response = emulator.error_response(rule.status, "status")
        if headers:
            response.headers.update(headers)
        return response

    # admin API ---------------------------------------------------------------------------
    def admin_routes(self) -> list[BaseRoute]:
        async def state(request: Request) -> Response:
            name = request.path_params["vendor"]
            if name not in self.emulators:
                return JSONResponse({"error": f"unknown vendor {name}"}, status_code=404)
            return JSONResponse(self.emulators[name].state())

        async def reset(request: Request) -> Response:
            for emulator in self.emulators.values():
                emulator.reset()
            self.faults.clear()
            self.log.reset()
            self.token_ttl = self._initial_token_ttl
            return JSONResponse({"reset": True})

        async def faults(request: Request) -> Response:
            if request.method == "DELETE":
                self.faults.clear()
                return JSONResponse({"faults": []})
            if request.method == "POST":
                body = await request.json()
                items = body if isinstance(body, list) else [body]
                try:
                    rules = [FaultRule(**item) for item in items]
                except (TypeError, ValueError) as exc:
                    return JSONResponse({"error": str(exc)}, status_code=400)
                for rule in rules:
                    self.faults.add(rule)
            return JSONResponse({"faults": self.faults.as_list()})

        async def latency(request: Request) -> Response:
            if request.method == "POST":
                body = await request.json()
                self.latency = Latency(float(body.get("base_ms", 0)), float(body.get("per_item_ms", 0)))
            return JSONResponse(asdict(self.latency))

        async def seed(request: Request) -> Response:
            self.seed = await request.json()
            for emulator in self.emulators.values():
                emulator.reset()
            return JSONResponse({"seeded": sorted(self.seed)})

        async def requests_(request: Request) -> Response:
            if request.method == "DELETE":
                self.log.reset()
            return JSONResponse(self.log.snapshot())

        async def wire(request: Request) -> Response:
            return JSONResponse({"requests": self.log.wire_snapshot()})

        async def token_ttl(request: Request) -> Response:
            if request.method == "POST":
                self.token_ttl = int((await request.json())["seconds"])
            return JSONResponse({"seconds": self.token_ttl})

        return [
            Route("/_sandbox/state/{vendor}", state),
            Route("/_sandbox/reset", reset, methods=["POST"]),
            Route("/_sandbox/faults", faults, methods=["GET", "POST", "DELETE"]),
            Route("/_sandbox/latency", latency, methods=["GET", "POST"]),
            Route("/_sandbox/requests", requests_, methods=["GET", "DELETE"]),
            Route("/_sandbox/requests/wire", wire),
            Route("/_sandbox/seed", seed, methods=["POST"]),
            Route("/_sandbox/token-ttl", token_ttl, methods=["GET", "POST"]),
        ]

    def build_app(self) -> Callable:
        routes: list[BaseRoute] = list(self.admin_routes())
        for emulator in self.emulators.values():
            routes.extend(emulator.routes())
        return WireRecorder(Starlette(routes=routes), self.log)

    def info(self, base: str, ca_bundle: str | None) -> dict:
        out: dict[str, Any] = {"ca_bundle": ca_bundle, "admin_url": base + "/_sandbox"}
        for name, emulator in self.emulators.items():
            out[name] = emulator.info(base)
        return out


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def mount(prefix: str, routes: list[BaseRoute]) -> Mount:
    return Mount(prefix, routes=routes)
