"""The one HTTP layer every vendor hook uses.

One pooled :class:`requests.Session` per hook (sized to the concurrency in use), connect and read
timeouts, and one retry policy: exponential backoff with full jitter on 429, 5xx and connection
errors, honouring ``Retry-After`` and rate-limit reset headers, and only for requests that are safe
to repeat. Vendor error bodies become :class:`VendorAPIError` carrying the vendor's own message.

Nothing here logs a request or response body, a header value or a URL query string: bodies carry
profiles and headers carry credentials.
"""

from __future__ import annotations

import email.utils
import functools
import gzip
import http.client
import logging
import os
import random
import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

try:  # msgspec (an Airflow dependency) encodes and decodes JSON several times faster than json
    import msgspec

    _encode_json = msgspec.json.encode
    _decode_json = msgspec.json.decode
    encode_json = _encode_json
    decode_json = _decode_json
except ImportError:  # pragma: no cover
    import json

    def _encode_json(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    _decode_json = json.loads
    encode_json = _encode_json
    decode_json = _decode_json

log = logging.getLogger(__name__)

#: What a call may carry to take the direct http.client path (see VendorSession._transport).
_DIRECT_KWARGS = frozenset({"data", "timeout", "verify"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Methods that may be repeated without changing the outcome (RFC 9110 idempotent methods).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
#: Statuses worth retrying: throttling and transient server errors.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class VendorAPIError(Exception):
    """A vendor answered with an error. ``message`` is the vendor's own words (no request data)."""

    def __init__(
        self,
        vendor: str,
        status: int | None,
        message: str,
        *,
        code: str | int | None = None,
        body: Any = None,
        method: str = "",
        path: str = "",
    ) -> None:
        self.vendor = vendor
        self.status = status
        self.message = message
        self.code = code
        self.body = body
        self.method = method
        self.path = path
        where = f" ({method} {path})" if method else ""
        status_txt = f"HTTP {status}" if status is not None else "no response"
        code_txt = f" [{code}]" if code not in (None, "") else ""
        super().__init__(f"{vendor} API error{where}: {status_txt}{code_txt}: {message}")

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in RETRY_STATUSES


class VendorAuthError(VendorAPIError):
    """Credentials were refused (401/403). Retrying will not help; fix the connection."""


@dataclass
class RetryPolicy:
    """How many times and how long to wait. Delays are capped exponential backoff with full jitter."""

    max_attempts: int = 8
    backoff_base: float = 0.5
    backoff_max: float = 60.0
    #: Ceiling for a server-requested wait (Retry-After); longer waits fail fast with the vendor's words.
    max_retry_after: float = 300.0
    statuses: frozenset[int] = RETRY_STATUSES

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff for the given 1-based attempt number."""
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return random.uniform(ceiling / 2, ceiling)


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, from ``Retry-After`` or rate-limit reset headers.

    ``Retry-After`` may be delta-seconds or an HTTP date (RFC 9110). ``X-RateLimit-Reset`` is read
    as seconds-until-reset when small and as a Unix timestamp when it looks like one (vendors differ).
    """
    now = time.time() if now is None else now
    value = headers.get("Retry-After")
    if value:
        value = value.strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                parsed = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                parsed = None
            if parsed is not None:
                return max(0.0, parsed.timestamp() - now)
    remaining = headers.get("X-RateLimit-Remaining")
    reset = headers.get("X-RateLimit-Reset")
    if reset and (remaining is None or remaining.strip() in ("0", "0.0")):
        try:
            reset_f = float(reset)
        except ValueError:
            return None
        if reset_f > 1_000_000_000:  # a Unix timestamp
            return max(0.0, reset_f - now)
        return max(0.0, reset_f)
    return None


ErrorParser = Callable[[requests.Response], tuple[str, "str | int | None"]]


def default_error_parser(response: requests.Response) -> tuple[str, str | int | None]:
    """Extract (message, code) from common JSON error shapes; fall back to the reason phrase."""
    try:
        body = response.json()
    except ValueError:
        return (response.reason or f"HTTP {response.status_code}", None)
    if isinstance(body, dict):
        for msg_key, code_key in (("detail", "title"), ("Message", "Code"), ("message", "code"),
                                  ("message", "error_code"), ("error_description", "error")):
            if msg_key in body:
                return (str(body[msg_key]), body.get(code_key))
        if isinstance(body.get("error"), dict):
            err = body["error"]
            return (str(err.get("message", "")), err.get("code"))
    return (response.reason or f"HTTP {response.status_code}", None)


@dataclass
class HttpStats:
    """Counters a benchmark or the run summary can read. Thread-safe."""

    requests: int = 0
    retries: int = 0
    throttled: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, requests: int = 0, retries: int = 0, throttled: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.retries += retries
            self.throttled += throttled

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "retries": self.retries, "throttled": self.throttled}


class VendorSession:
    """A pooled, retrying HTTP client for one vendor account.

    :param vendor: name used in errors and logs ("Mailchimp").
    :param base_url: every ``path`` is appended to it.
    :param auth: callable returning the auth headers; called per request so refreshed tokens apply.
    :param on_unauthorized: called once after a 401 on a token-authenticated request; returning True
        means "credentials refreshed, try again" (token expiry mid-run).
    :param pool_size: connections kept per host: size it to the concurrency in use.
    :param verify: True, False or a CA bundle path.
    """

    def __init__(
        self,
        vendor: str,
        base_url: str,
        *,
        auth: Callable[[], Mapping[str, str]] | None = None,
        on_unauthorized: Callable[[], bool] | None = None,
        error_parser: ErrorParser = default_error_parser,
        pool_size: int = 10,
        verify: bool | str = True,
        connect_timeout: float = 10.0,
        read_timeout: float = 130.0,
        retry: RetryPolicy | None = None,
        user_agent: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        from airflow_provider_segexport import __version__

        self.vendor = vendor
        self.base_url = base_url.rstrip("/")
        self._auth = auth
        self._on_unauthorized = on_unauthorized
        self._error_parser = error_parser
        self.timeout = (connect_timeout, read_timeout)
        self.retry = retry or RetryPolicy()
        self.stats = HttpStats()
        self._sleep = sleep
        self.session = requests.Session()
        # No urllib3-level retries: this class owns retrying so it can honour vendor headers and
        # method safety, and count what it did.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(1, pool_size), max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.verify = verify
        self.session.verify = verify
        self.session.headers["User-Agent"] = user_agent or f"airflow-provider-segexport/{__version__}"
        self.session.headers["Accept"] = "application/json"
        # requests re-reads the proxy environment (and ~/.netrc) on every call when trust_env is on:
        # milliseconds per request. The proxies (HTTPS_PROXY, NO_PROXY, ...) are resolved once per host.
        self.session.trust_env = False
        self._proxies: dict[str, dict[str, str]] = {}
        self._pool_size = max(1, pool_size)
        self._direct: dict[tuple[str, str, bool | str], _Origin] = {}
        self._direct_lock = threading.Lock()

    def proxies_for(self, url: str) -> dict[str, str]:
        """The environment's proxies for ``url``'s host (honouring NO_PROXY), resolved once per host."""
        host = url.split("/", 3)[2] if "://" in url else url
        proxies = self._proxies.get(host)
        if proxies is None:
            proxies = self._proxies[host] = requests.utils.get_environ_proxies(url)
        return proxies

    def close(self) -> None:
        self.session.close()
        with self._direct_lock:
            origins = list(self._direct.values())
        for origin in origins:
            origin.clear()

    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    def request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool | None = None,
        expected: tuple[int, ...] = (),
        authenticate: bool = True,
        **kwargs: Any,
    ) -> requests.Response:
        """Send a request, retrying when that is safe; return the response or raise VendorAPIError.

        :param idempotent: whether the request may be repeated; defaults to the method's semantics
            (POST and PATCH are not, unless the caller knows the endpoint is an upsert).
        :param expected: extra non-2xx statuses the caller handles itself (returned, not raised).
        """
        method = method.upper()
        safe = (method in IDEMPOTENT_METHODS) if idempotent is None else idempotent
        url = self.url(path)
        short_path = path.split("?", 1)[0] if not path.startswith("http") else "<absolute URL>"
        kwargs.setdefault("timeout", self.timeout)
        # Per request: requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override session.verify otherwise.
        kwargs.setdefault("verify", self.verify)
        attempt = 0
        refreshed = False
        while True:
            attempt += 1
            headers = dict(kwargs.pop("headers", None) or {})
            if authenticate and self._auth is not None:
                headers.update(self._auth())
            try:
                self.stats.add(requests=1)
                response = self._transport(method, url, headers, kwargs)
            except requests.exceptions.SSLError as exc:
                raise VendorAPIError(
                    self.vendor, None, f"TLS verification failed for {self.base_url}: {_short(exc)}. Check the "
                    "connection's CA bundle (extra \"ca_bundle\") or the host name.", method=method, path=short_path,
                ) from exc
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                kwargs["headers"] = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                # A request that timed out or lost its connection may have been processed: repeat
                # it only when that is harmless.
                sent = not isinstance(exc, requests.ConnectTimeout)
                if (sent and not safe) or attempt >= self.retry.max_attempts:
                    raise VendorAPIError(
                        self.vendor, None, f"{type(exc).__name__}: {_short(exc)}", method=method, path=short_path
                    ) from exc
                delay = self.retry.backoff(attempt)
                log.warning(
                    "%s %s %s: %s; retry %d/%d in %.1fs",
                    self.vendor, method, short_path, type(exc).__name__, attempt, self.retry.max_attempts - 1, delay,
                )
                self.stats.add(retries=1)
                self._sleep(delay)
                continue
            kwargs["headers"] = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            status = response.status_code
            if status < 400 or status in expected:
                return response
            if status == 401 and authenticate and not refreshed and self._on_unauthorized is not None:
                refreshed = True
                if self._on_unauthorized():
                    log.info("%s: access token refreshed after 401; repeating %s %s", self.vendor, method, short_path)
                    continue
            message, code = self._error_parser(response)
            if status in self.retry.statuses and attempt < self.retry.max_attempts and (safe or status == 429):
                # 429 means "not processed": repeating is safe whatever the method.
                wait = retry_after_seconds(response.headers)
                if status == 429:
                    self.stats.add(throttled=1)
                if wait is not None and wait > self.retry.max_retry_after:
                    raise VendorAPIError(
                        self.vendor, status, f"{message} (asked to wait {wait:.0f}s; giving up)",
                        code=code, method=method, path=short_path,
                    )
                delay = wait + random.uniform(0, 0.25) if wait is not None else self.retry.backoff(attempt)
                log.warning(
                    "%s %s %s: HTTP %d %s; retry %d/%d in %.1fs",
                    self.vendor, method, short_path, status, _short(message), attempt,
                    self.retry.max_attempts - 1, delay,
                )
                self.stats.add(retries=1)
                response.close()
                self._sleep(delay)
                continue
            body = _safe_json(response)
            error_cls = VendorAuthError if status in (401, 403) else VendorAPIError
            raise error_cls(self.vendor, status, message, code=code, body=body, method=method, path=short_path)

    def _transport(self, method: str, url: str, headers: dict[str, str], kwargs: dict[str, Any]) -> requests.Response:
        """One HTTP exchange. A plain call (a body of bytes or none, no query parameters, no proxy) goes
        straight over a kept-alive connection (:class:`_Origin`, :meth:`_Origin.exchange`): requests' per-call
        machinery (request preparation, cookie jars, hooks, a generator reading the body in 10 KB pieces)
        costs ~1 ms of CPU a call, urllib3's ~0.5 more and http.client's header parsing (the email package)
        ~0.3 more: ~3.5 µs a member at 500 members a call. Anything else goes through requests. Both raise
        requests' exceptions and return a :class:`requests.Response` with its content read."""
        proxies = self.proxies_for(url)
        data = kwargs.get("data")
        if proxies or kwargs.keys() - _DIRECT_KWARGS or not (data is None or data.__class__ is bytes):
            return self.session.request(method, url, headers=headers, proxies=proxies, **kwargs)
        timeout = kwargs["timeout"]
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        scheme, host, target = _split_url(url)
        merged = {}  # the session's headers, then the call's (names compared without case; None drops one)
        for name, value in (*self.session.headers.items(), *headers.items()):
            merged[name.lower()] = (name, value.decode("latin-1") if value.__class__ is bytes else value)
        fields = {name: value for name, value in merged.values() if value is not None}
        origin = self._origin(scheme, host, kwargs["verify"])
        conn = origin.take()
        if conn.sock is None:
            origin.connect(conn, connect)  # raises requests' ConnectTimeout, SSLError or ConnectionError
        try:
            status, reason, answer_headers, content, will_close = origin.exchange(
                conn, method, target, fields, data, read)
        except TimeoutError as exc:
            conn.close()
            raise requests.ReadTimeout(f"{method} {host}: no answer within {read}s") from exc
        except (OSError, http.client.HTTPException) as exc:  # reset, closed mid-answer, malformed answer, ...
            conn.close()
            raise requests.ConnectionError(f"{method} {host}: {type(exc).__name__}: {exc}") from exc
        except BaseException:  # an invalid header (nothing sent), an interrupt: the connection is not reused
            conn.close()
            raise
        if will_close:
            conn.close()
        else:
            origin.give(conn)
        response_headers = CaseInsensitiveDict(answer_headers)
        if status in _REDIRECTS and response_headers.get("Location"):  # rare: followed from this answer
            return self._follow(method, url, status, response_headers["Location"], headers, kwargs)
        encoding = response_headers.get("Content-Encoding", "").strip().lower()
        if content and encoding in ("gzip", "x-gzip", "deflate"):
            try:
                content = gzip.decompress(content) if encoding != "deflate" else zlib.decompress(content)
            except (zlib.error, gzip.BadGzipFile, EOFError):
                try:  # a "deflate" answer without its zlib header (some servers send raw deflate)
                    content = zlib.decompress(content, -zlib.MAX_WBITS)
                except zlib.error as exc:
                    raise requests.exceptions.ContentDecodingError(f"{method} {host}: {encoding} answer: {exc}") from exc
        response = requests.Response()
        response.status_code = status
        response.headers = response_headers
        response.reason = reason
        response.url = url
        response._content = content
        response._content_consumed = True
        response.encoding = requests.utils.get_encoding_from_headers(response.headers)
        return response

    def _follow(self, method: str, url: str, status: int, location: str, headers: dict[str, str],
                kwargs: dict[str, Any]) -> requests.Response:
        """A redirect answered on the direct path, followed as requests follows one (it follows any further
        ones; ``Session.rebuild_method`` and ``resolve_redirects``): 302 and 303 become a GET (a HEAD stays one),
        so does a POST answered 301; the body is dropped unless the answer is 307 or 308, which repeat the call
        at the new place. The call itself is not sent again (a POST answered with a redirect was processed
        once)."""
        target = urllib.parse.urljoin(url, location)
        if status not in (307, 308):
            if method != "HEAD" and (status in (302, 303) or (status == 301 and method == "POST")):
                method = "GET"
            kwargs = {**kwargs, "data": None}
            headers = {k: v for k, v in headers.items()
                       if k.lower() not in ("content-type", "content-length", "transfer-encoding")}
        if self.session.should_strip_auth(url, target):  # requests' own rule: not to another host
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        return self.session.request(method, target, headers=headers, proxies=self.proxies_for(target), **kwargs)

    def _origin(self, scheme: str, host: str, verify: bool | str) -> _Origin:
        key = (scheme, host, verify)
        origin = self._direct.get(key)
        if origin is None:
            with self._direct_lock:
                origin = self._direct.get(key)
                if origin is None:
                    origin = self._direct[key] = _Origin(scheme, host, verify, self._pool_size)
        return origin

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return _safe_json(self.request("GET", path, **kwargs))

    def post_json(self, path: str, payload: Any, **kwargs: Any) -> Any:
        headers = {"Content-Type": "application/json", **(kwargs.pop("headers", None) or {})}
        return _safe_json(self.request("POST", path, data=_encode_json(payload), headers=headers, **kwargs))


class _Connection:
    """A kept-alive connection of the direct path: its socket (TLS-wrapped for https), None until connected."""

    __slots__ = ("sock",)

    def __init__(self) -> None:
        self.sock: socket.socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _Origin:
    """Kept-alive connections to one scheme://host[:port] for the direct path: at most ``size`` idle ones,
    the most recently used taken first; one found closed by the server while idle is dropped, not used.

    :meth:`exchange` speaks HTTP/1.1 itself (one write for the request; the status line and headers read
    line by line; a body delimited by Content-Length, chunked or the connection's end): http.client parses
    headers with the email package, ~0.3 ms of CPU a call.
    """

    def __init__(self, scheme: str, host: str, verify: bool | str, size: int) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme {scheme!r}")
        self.https = scheme == "https"
        where = urllib.parse.urlsplit(f"//{host}")  # host[:port], an IPv6 literal in brackets
        self.host = where.hostname or host
        self.port = where.port or (443 if self.https else 80)
        name = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = name if self.port == (443 if self.https else 80) else f"{name}:{self.port}"
        self.verify = verify
        self.size = size
        self._context: ssl.SSLContext | None = None
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    def take(self) -> _Connection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not _closed_while_idle(conn.sock):
                    return conn
                conn.close()
        return _Connection()

    def give(self, conn: _Connection) -> None:
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(conn)
                return
        conn.close()

    def connect(self, conn: _Connection, timeout: float) -> None:
        """Open the connection (and its TLS session) within ``timeout``; requests' exceptions."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.https:
                    sock = self.context().wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        except TimeoutError as exc:
            raise requests.ConnectTimeout(f"{self.host}:{self.port}: no connection within {timeout}s") from exc
        except ssl.SSLError as exc:
            raise requests.exceptions.SSLError(f"{self.host}:{self.port}: {exc}") from exc
        except OSError as exc:  # refused, unknown host, unreachable
            raise requests.ConnectionError(f"{self.host}:{self.port}: {type(exc).__name__}: {exc}") from exc
        conn.sock = sock

    def exchange(self, conn: _Connection, method: str, target: str, headers: Mapping[str, str], body: bytes | None,
                 timeout: float) -> tuple[int, str, list[tuple[str, str]], bytes, bool]:
        """Send one request and read its answer: (status, reason, headers, body, whether the connection
        must be closed). Raises OSError (TimeoutError for ``timeout``) or http.client's exceptions."""
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        for name, value in headers.items():
            low = name.lower()
            if low in _DIRECT_OWN_HEADERS:
                continue
            if not _HEADER_NAME(name) or not _HEADER_VALUE(value):
                raise ValueError(f"invalid HTTP header {name!r} (a line break or a control character)")
            lines.append(f"{name}: {value}\r\n")
        # Only what this path decodes (requests would announce brotli or zstd when those are installed).
        lines.append("Accept-Encoding: gzip, deflate\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body) if body else 0}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        sock = conn.sock
        sock.settimeout(timeout)
        unsent: OSError | None = None
        try:
            sock.sendall(head + body if body else head)
        except (BrokenPipeError, ConnectionResetError) as exc:  # the server may have answered early (413, 401)
            unsent = exc
        reader = sock.makefile("rb")
        try:
            for _ in range(_MAX_INTERIM + 1):
                try:
                    line = reader.readline(_MAX_LINE + 1)
                except OSError:
                    if unsent is not None:
                        raise unsent from None
                    raise
                if not line:
                    if unsent is not None:
                        raise unsent
                    raise http.client.RemoteDisconnected("the server closed the connection without an answer")
                if len(line) > _MAX_LINE:
                    raise http.client.LineTooLong("status line")
                version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
                code, _, reason = rest.partition(" ")
                if not version.startswith("HTTP/1.") or len(code) != 3 or not (code.isascii() and code.isdigit()):
                    raise http.client.BadStatusLine(repr(line[:100]))
                status = int(code)
                answer_headers = _read_headers(reader)
                if not 100 <= status < 200 or status == 101:
                    break  # (an interim 1xx answer is followed by the real one)
            else:
                raise http.client.HTTPException(f"more than {_MAX_INTERIM} interim answers")
            joined: dict[str, tuple[str, str]] = {}  # a repeated header's values joined with ", " (as urllib3)
            for name, value in answer_headers:
                low = name.lower()
                if low not in joined:
                    joined[low] = (name, value)
                elif low in _SINGLE_VALUED:
                    if joined[low][1] != value:
                        raise http.client.HTTPException(f"conflicting {name} headers")
                else:
                    joined[low] = (joined[low][0], f"{joined[low][1]}, {value}")
            answer_headers = list(joined.values())
            fields = {low: value for low, (_, value) in joined.items()}
            tokens = {t.strip().lower() for t in fields.get("connection", "").split(",")}
            will_close = (unsent is not None or status == 101 or "close" in tokens
                          or (version == "HTTP/1.0" and "keep-alive" not in tokens))
            length = fields.get("content-length")
            coding = fields.get("transfer-encoding")
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                content = b""
            elif coding is not None and coding.lower().rsplit(",", 1)[-1].strip() == "chunked":
                content = _read_chunked(reader)
            elif coding is None and length is not None:
                length = length.strip()
                if not (length.isascii() and length.isdigit()):
                    raise http.client.HTTPException(f"invalid Content-Length {length[:40]!r}")
                size = int(length)
                content = reader.read(size)
                if len(content) < size:
                    raise http.client.IncompleteRead(content, size - len(content))
            else:  # the body ends with the connection (no length, or a transfer coding other than chunked)
                content, will_close = reader.read(), True
        finally:
            reader.close()  # (the socket stays open)
        return status, reason, answer_headers, content, will_close

    def context(self) -> ssl.SSLContext:
        """The TLS settings of ``verify`` (as requests reads it: True, False or a CA bundle file or folder)."""
        if self._context is None:
            if self.verify is False:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            else:
                bundle = requests.utils.DEFAULT_CA_BUNDLE_PATH if self.verify is True else self.verify
                context = ssl.create_default_context(
                    **({"capath": bundle} if os.path.isdir(bundle) else {"cafile": bundle}))
            self._context = context
        return self._context

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


_MAX_LINE = 65536  # http.client's limits
_MAX_HEADERS = 100
_MAX_INTERIM = 10  # interim (1xx) answers before the real one
_SINGLE_VALUED = frozenset({"content-length"})  # (other repeated headers are joined with ", ", as urllib3 does)
_DIRECT_OWN_HEADERS = frozenset({"host", "content-length", "accept-encoding", "transfer-encoding"})
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z").match
_HEADER_VALUE = re.compile(r"(?![ \t])[^\x00-\x08\x0a-\x1f\x7f]*\Z").match  # (no leading white space either)


@functools.lru_cache(maxsize=256)
def _split_url(url: str) -> tuple[str, str, str]:
    """(scheme, host[:port], request target) of an absolute URL; the target percent-encoded as requests
    does it (white space and control characters included: urllib.parse drops line breaks and tabs)."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc, requests.utils.requote_uri(
        (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))


def _read_headers(reader: Any) -> list[tuple[str, str]]:
    """An answer's header lines up to the blank line, as (name, value); a folded line continues the value."""
    headers: list[tuple[str, str]] = []
    while True:
        line = reader.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n"):
            return headers
        if not line:
            raise http.client.IncompleteRead(b"", None)  # the connection ended within the headers
        text = line.decode("latin-1")
        if text[0] in " \t" and headers:  # obsolete line folding
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {text.strip()}")
            continue
        name, colon, value = text.partition(":")
        if colon:
            headers.append((name.strip(), value.strip()))
            if len(headers) > _MAX_HEADERS:
                raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")


def _read_chunked(reader: Any) -> bytes:
    """A chunked body (its trailer lines read and dropped)."""
    parts = []
    while True:
        line = reader.readline(_MAX_LINE + 1)
        if not line:
            raise http.client.IncompleteRead(b"".join(parts))
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise http.client.HTTPException(f"invalid chunk size {line[:40]!r}") from None
        if size < 0:
            raise http.client.HTTPException(f"invalid chunk size {line[:40]!r}")
        if size == 0:
            break
        chunk = reader.read(size)
        if len(chunk) < size or reader.readline(_MAX_LINE + 1) not in (b"\r\n", b"\n"):
            raise http.client.IncompleteRead(b"".join(parts) + chunk)
        parts.append(chunk)
    while reader.readline(_MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
        pass
    return b"".join(parts)


def _closed_while_idle(sock: socket.socket | None) -> bool:
    """An idle kept-alive connection that is readable was closed by the server (or sent what nobody asked)."""
    if sock is None:
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def _safe_json(response: requests.Response) -> Any:
    if not response.content:
        return None
    try:
        return _decode_json(response.content)
    except ValueError:
        return None


def _short(value: object, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
