"""The one HTTP layer every vendor hook uses.

One pooled :class:`requests.Session` per hook (urllib3's pool sized to the concurrency in use), connect
and read timeouts, TLS verified against the connection's CA bundle, and one retry policy: exponential
backoff with full jitter on 429, 5xx and connection errors, honouring ``Retry-After`` and rate-limit
reset headers, and only for requests that are safe to repeat. A :class:`RateLimiter` shared by the
session's threads keeps within a vendor's published budget before the vendor has to refuse anything.
Vendor error bodies become :class:`VendorAPIError` carrying the vendor's own message.

HTTP itself (framing, TLS, compression, redirects, connection reuse) is requests' and urllib3's.

Nothing here logs a request or response body, a header value or a URL query string: bodies carry
profiles and headers carry credentials.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import requests
from airflow.sdk.exceptions import AirflowException
from requests.adapters import HTTPAdapter

#: JSON bodies are encoded and decoded with msgspec (bytes in, bytes out).
encode_json = msgspec.json.encode
decode_json = msgspec.json.decode

log = logging.getLogger(__name__)

#: Methods that may be repeated without changing the outcome (RFC 9110 idempotent methods).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
#: Statuses worth retrying: throttling and transient server errors.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class VendorAPIError(AirflowException):
    """A vendor answered with an error, or could not be reached; ``message`` is the vendor's own words.

    An :class:`~airflow.sdk.exceptions.AirflowException`, as ``HttpHook.run()`` raises on an error answer, so
    code written for ``HttpHook`` keeps catching it. It never carries request data.

    :param vendor: the vendor's name ("Mailchimp").
    :param status: the HTTP status, or None when no answer came (connection error, timeout, TLS).
    :param message: the vendor's error message.
    :param code: the vendor's error code, when its error body has one.
    :param body: the decoded error body (for callers that read per-field details).
    :param method: the request's method.
    :param path: the request's path, without its query string.
    """

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
        """Whether the same request may succeed later (no answer, throttling or a transient server error)."""
        return self.status is None or self.status in RETRY_STATUSES

    def serialize(self) -> tuple[str, tuple, dict]:
        """Class path and arguments that re-create this error (Airflow serializes exceptions this way)."""
        cls = type(self)
        return (f"{cls.__module__}.{cls.__name__}", (self.vendor, self.status, self.message),
                {"code": self.code, "method": self.method, "path": self.path})


class VendorAuthError(VendorAPIError):
    """Credentials were refused (401/403). Retrying will not help; fix the connection."""


@dataclass
class RetryPolicy:
    """How many times and how long to wait. Delays are capped exponential backoff with full jitter.

    :param max_attempts: attempts in all, the first included.
    :param backoff_base: the first backoff's ceiling in seconds; it doubles with each attempt.
    :param backoff_max: the ceiling of any backoff in seconds.
    :param max_retry_after: the longest server-requested wait (``Retry-After``) honoured; a longer one fails
        at once with the vendor's words.
    :param statuses: the HTTP statuses that are retried.
    """

    max_attempts: int = 8
    backoff_base: float = 0.5
    backoff_max: float = 60.0
    max_retry_after: float = 300.0
    statuses: frozenset[int] = RETRY_STATUSES

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff for the given 1-based attempt number.

        :param attempt: the number of the attempt that failed.
        """
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return random.uniform(ceiling / 2, ceiling)


def _reset_seconds(value: str, now: float) -> float | None:
    """``X-RateLimit-Reset`` in seconds from now: seconds-until-reset when small, a Unix timestamp when it
    looks like one (vendors differ)."""
    try:
        reset = float(value)
    except ValueError:
        return None
    if reset > 1_000_000_000:
        return max(0.0, reset - now)
    return max(0.0, reset)


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, from ``Retry-After`` or rate-limit reset headers.

    ``Retry-After`` may be delta-seconds or an HTTP date (RFC 9110); ``X-RateLimit-Reset`` counts only when
    ``X-RateLimit-Remaining`` is 0 or absent.

    :param headers: the answer's headers.
    :param now: the current Unix time (for HTTP dates and timestamps); defaults to ``time.time()``.
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
        return _reset_seconds(reset, now)
    return None


ErrorParser = Callable[[requests.Response], tuple[str, "str | int | None"]]


def default_error_parser(response: requests.Response) -> tuple[str, str | int | None]:
    """Extract (message, code) from common JSON error shapes; fall back to the reason phrase.

    :param response: an error answer.
    """
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


#: the service-protection rules a vendor's throttling answer may name (a hook maps its error codes to them):
#: the number of requests in the window, their combined execution time, the requests in flight at once
REQUESTS_RULE, EXECUTION_RULE, CONCURRENCY_RULE = "requests", "execution", "concurrency"
THROTTLE_RULES = (REQUESTS_RULE, EXECUTION_RULE, CONCURRENCY_RULE)


@dataclass
class HttpStats:
    """Counters a benchmark or the run summary can read. Thread-safe."""

    requests: int = 0
    retries: int = 0
    throttled: int = 0
    #: 429 answers by the rule the vendor named (when its hook knows the vendor's codes)
    throttled_by: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, requests: int = 0, retries: int = 0, throttled: int = 0, rule: str | None = None) -> None:
        """Add to the counters.

        :param requests: requests sent.
        :param retries: requests repeated.
        :param throttled: answers that were 429.
        :param rule: the rule those 429 answers named (``requests``, ``execution``, ``concurrency``).
        """
        with self._lock:
            self.requests += requests
            self.retries += retries
            self.throttled += throttled
            if rule and throttled:
                self.throttled_by[rule] = self.throttled_by.get(rule, 0) + throttled

    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict (for XCom and logs); ``throttled_by`` only when a rule was named."""
        with self._lock:
            out: dict[str, Any] = {"requests": self.requests, "retries": self.retries, "throttled": self.throttled}
            if self.throttled_by:
                out["throttled_by"] = dict(self.throttled_by)
            return out


@dataclass(frozen=True)
class RequestBudget:
    """A vendor's published service-protection budget over a sliding window of ``window`` seconds.

    :param requests: requests allowed in one window.
    :param window: the window's length in seconds (a sliding window).
    :param execution: seconds of combined execution time allowed in one window (Dataverse: 1,200 per 300), if the
        vendor publishes such a budget.
    :param concurrent: requests allowed in flight at once (Dataverse: 52), if published.
    """

    requests: int
    window: float
    execution: float | None = None
    concurrent: int | None = None


class Ticket:
    """One request let through by a :class:`RateLimiter`: when it started, and how many others were in flight."""

    __slots__ = ("started", "others")

    def __init__(self, started: float, others: int) -> None:
        self.started = started
        self.others = others


#: how long a request waiting for an answer to free a place re-checks anyway (seconds of real time)
_ANSWER_POLL = 0.5


class RateLimiter:
    """Decides when a request may start; shared by every thread of one :class:`VendorSession`.

    Its rules, so that a vendor that publishes its limits rarely has to refuse a request:

    * a published :class:`RequestBudget` (Dataverse: 6,000 requests, 1,200 s of combined execution time per
      5 minutes per user, 52 in flight): a request starts only while the sliding window has room for it. A
      request counts from its start until ``window`` seconds after its answer (a vendor may count it at either
      end); its execution time is the time it took, as this client measured it (never less than the server's);
      a request in flight is expected to take at least as long as the answered ones typically did. An answer
      refused with 429 ("not processed") does not count;
    * the vendor's ``X-RateLimit-Limit``/``-Remaining``/``-Reset`` answers (Campaign Monitor sends them on
      every answer): once ``Remaining`` is down to the requests still in flight (each of them spends one),
      new requests wait until the reset;
    * a server-requested wait (``Retry-After`` or a reset on a 429): every thread waits it out, not only the
      one that was refused (:meth:`pause`);
    * what a 429 says (:meth:`throttled`, when the vendor's hook names the rule from the answer's error code):
      the limiter lowers that rule's number to what the vendor evidently allows, so the same export is not
      refused again: the request budget to the requests answered in the window before the refused one
      started; the execution budget to 90 % of their execution time, and the requests in flight to what that
      budget sustains; the requests in flight to those in flight when the refused one started or was refused.

    It logs at INFO the first time each rule makes a request wait, with the numbers, then at DEBUG; each
    lowered limit at WARNING.

    :param vendor: the vendor's name, for the log.
    :param budget: the vendor's published budget, if any.
    :param clock: monotonic seconds (a test passes a fake clock).
    :param sleep: how to wait (a test passes one that advances its fake clock).
    :param wall: Unix time, to read a reset given as a timestamp.
    """

    def __init__(
        self,
        vendor: str,
        budget: RequestBudget | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.vendor = vendor
        #: the request budget in use (lowered after a 429 naming the number of requests)
        self.budget = budget
        #: seconds of execution time allowed per window (lowered after a 429 naming the execution time)
        self.execution_budget = budget.execution if budget is not None else None
        #: requests allowed in flight at once (lowered after a 429 naming the concurrency)
        self.max_in_flight = budget.concurrent if budget is not None else None
        self._clock = clock
        self._sleep = sleep
        self._wall = wall
        self._lock = threading.Lock()
        self._answered_cond = threading.Condition(self._lock)
        self._open: dict[Ticket, None] = {}  # requests in flight, oldest first
        self._done: deque[tuple[float, float]] = deque()  # (answered at, seconds taken) of the window's requests
        self._done_seconds = 0.0
        self._typical = 0.0  # seconds an answered request typically took (moving average)
        self._not_before = 0.0  # no request starts before this (clock) time
        self._pause_reason = ""
        self._logged: set[str] = set()
        #: seconds requests waited, all threads together
        self.waited = 0.0

    @property
    def in_flight(self) -> int:
        """Requests started and not yet answered."""
        return len(self._open)

    def acquire(self) -> Ticket:
        """Wait until a request may start, then count it as started and in flight; return its ticket (for
        :meth:`release` and :meth:`throttled`)."""
        while True:
            with self._lock:
                now = self._clock()
                wait, reason = self._wait(now)
                if wait <= 0:
                    ticket = Ticket(now, len(self._open))
                    self._open[ticket] = None
                    return ticket
                if wait == math.inf:  # until an answer frees a place
                    began = time.monotonic()
                    self._answered_cond.wait(_ANSWER_POLL)
                    self.waited += time.monotonic() - began
                else:
                    self.waited += wait
            self._note(reason, wait)
            if wait != math.inf:
                self._sleep(wait)

    def _prune(self, now: float) -> None:
        if self.budget is None:
            return
        horizon = now - self.budget.window
        done = self._done
        while done and done[0][0] <= horizon:
            self._done_seconds -= done.popleft()[1]
        if not done:
            self._done_seconds = 0.0  # no float drift

    def _wait(self, now: float) -> tuple[float, str]:
        """How long a request starting ``now`` must wait (``math.inf``: until an answer), and which rule says so
        (called under the lock)."""
        if self._not_before > now:
            return self._not_before - now, self._pause_reason
        cap = self.max_in_flight
        if cap is not None and len(self._open) >= cap:
            return math.inf, "concurrency"
        budget = self.budget
        if budget is None:
            return 0.0, ""
        self._prune(now)
        done = self._done
        excess = len(self._open) + len(done) - budget.requests
        if excess >= 0:  # excess + 1 answered requests must leave the window first
            if excess >= len(done):
                return math.inf, "budget"
            return done[excess][0] + budget.window - now, "budget"
        limit = self.execution_budget
        if limit is not None and (self._open or done):
            typical = self._typical
            over = (self._done_seconds + sum(max(now - t.started, typical) for t in self._open) + typical) - limit
            if over > 0:
                for answered, seconds in done:
                    over -= seconds
                    if over <= 0:
                        return answered + budget.window - now, "execution"
                return math.inf, "execution"
        return 0.0, ""

    def release(self, headers: Mapping[str, str] | None = None, ticket: Ticket | None = None,
                refused: bool = False) -> None:
        """Count a request as answered (or failed) and read the vendor's rate-limit headers of its answer.

        :param headers: the answer's headers; None when no answer came.
        :param ticket: the request's ticket from :meth:`acquire` (the oldest request in flight when not given).
        :param refused: the answer was a 429 (not processed: it does not count toward the budget).
        """
        with self._lock:
            if ticket is None:
                ticket = next(iter(self._open), None)
            if ticket is not None and ticket in self._open:
                del self._open[ticket]
                if not refused and self.budget is not None:
                    now = self._clock()
                    seconds = max(0.0, now - ticket.started)
                    self._done.append((now, seconds))
                    self._done_seconds += seconds
                    self._typical = seconds if not self._typical else 0.8 * self._typical + 0.2 * seconds
            self._answered_cond.notify_all()
            if not headers:
                return
            remaining, reset = headers.get("X-RateLimit-Remaining"), headers.get("X-RateLimit-Reset")
            if remaining is None or reset is None:
                return
            try:
                left = float(remaining)
            except ValueError:
                return
            in_flight = len(self._open)
            if left > in_flight:
                return
            seconds = _reset_seconds(reset, self._wall())
            if not seconds:
                return
            self._hold(seconds, "headers")
        self._note("headers", seconds, f"X-RateLimit-Remaining {remaining} of {headers.get('X-RateLimit-Limit', '?')} "
                                       f"with {in_flight} request(s) in flight")

    def pause(self, seconds: float) -> None:
        """Hold every thread's next request for ``seconds`` (the server asked for a wait, e.g. with a 429).

        :param seconds: how long no request may start.
        """
        if seconds <= 0:
            return
        with self._lock:
            self._hold(seconds, "server")
        self._note("server", seconds)

    def throttled(self, rule: str | None, ticket: Ticket | None) -> None:
        """A request was refused with 429 under a service-protection ``rule`` the vendor named: lower that rule's
        number to what the vendor evidently allows (see the class's description). Nothing for an unnamed rule.

        :param rule: ``requests``, ``execution`` or ``concurrency`` (:data:`THROTTLE_RULES`), or None.
        :param ticket: the refused request's ticket.
        """
        if rule not in THROTTLE_RULES or ticket is None:
            return
        with self._lock:
            budget = self.budget
            before = [(end, seconds) for end, seconds in self._done if end <= ticket.started]
            if rule == REQUESTS_RULE and budget is not None:
                was = budget.requests
                self.budget = budget = RequestBudget(max(1, len(before)), budget.window, budget.execution,
                                                     budget.concurrent)
                what = f"at most {budget.requests:,} requests per {budget.window:g} s (was {was:,})"
            elif rule == EXECUTION_RULE and budget is not None and before:
                was = self.execution_budget
                self.execution_budget = 0.9 * sum(seconds for _, seconds in before)
                sustained = max(1, int(self.execution_budget / budget.window))
                if self.max_in_flight is None or sustained < self.max_in_flight:
                    self.max_in_flight = sustained
                what = (f"at most {self.execution_budget:.1f} s of execution time per {budget.window:g} s (was "
                        f"{'unlimited' if was is None else f'{was:.1f} s'}) and {self.max_in_flight} request(s) in "
                        "flight")
            elif rule == CONCURRENCY_RULE:
                # in flight at the vendor when it arrived: those in flight when it started, or when its refusal
                # came (another thread's request may overtake it on the way), whichever is more
                was = self.max_in_flight
                allowed = max(1, ticket.others, len(self._open))
                self.max_in_flight = allowed if was is None or allowed < was else max(1, was - 1)
                what = f"at most {self.max_in_flight} request(s) in flight (was {was if was is not None else 'unlimited'})"
            else:
                return
        log.warning("%s refused a request under its service protection (%s): %s from now on", self.vendor,
                    {REQUESTS_RULE: "number of requests", EXECUTION_RULE: "combined execution time",
                     CONCURRENCY_RULE: "concurrent requests"}[rule], what)

    def _hold(self, seconds: float, reason: str) -> None:
        until = self._clock() + seconds
        if until > self._not_before:
            self._not_before, self._pause_reason = until, reason

    def _note(self, reason: str, wait: float, detail: str = "") -> None:
        """Log a wait: at INFO the first time a rule makes requests wait, at DEBUG after that."""
        with self._lock:
            first = reason not in self._logged
            self._logged.add(reason)
        level = logging.INFO if first else logging.DEBUG
        if not log.isEnabledFor(level):
            return
        until = "for an answer" if wait == math.inf else f"{wait:.1f} s"
        if reason == "budget":
            log.log(level, "%s: pacing requests to the request budget of %d per %g s: waiting %s",
                    self.vendor, self.budget.requests, self.budget.window, until)
        elif reason == "execution":
            log.log(level, "%s: pacing requests to the budget of %.1f s of execution time per %g s: waiting %s",
                    self.vendor, self.execution_budget, self.budget.window, until)
        elif reason == "concurrency":
            log.log(level, "%s: at most %d request(s) in flight: waiting %s", self.vendor, self.max_in_flight, until)
        elif reason == "headers":
            log.log(level, "%s: pacing requests to the vendor's rate limit (%s): new requests wait %s for the "
                    "reset", self.vendor, detail or "rate-limit headers", until)
        else:
            log.log(level, "%s: the server asked for a wait: every thread's requests wait %s", self.vendor, until)


class _ThrottleLog:
    """Keeps a throttled run's log readable: the first :attr:`DETAILED` 429s are logged one by one (WARNING), after
    that one line every :attr:`INTERVAL` seconds counts those since the last line, the others go to DEBUG. Other
    retried statuses (5xx) are always logged one by one: they are rare and each says something."""

    DETAILED = 20
    INTERVAL = 30.0

    def __init__(self, vendor: str) -> None:
        self.vendor = vendor
        self._lock = threading.Lock()
        self._count = 0
        self._since_line = 0
        self._line_at = 0.0

    def level(self, status: int) -> int:
        """The level of this retry's own line (a summary line may be logged first)."""
        if status != 429:
            return logging.WARNING
        with self._lock:
            self._count += 1
            if self._count <= self.DETAILED:
                if self._count == self.DETAILED:
                    self._line_at = time.monotonic()
                    log.warning("%s: %d requests throttled (HTTP 429) so far, each retried; from now on the count "
                                "every %g s (set the connection's request rate to pace the calls instead)",
                                self.vendor, self._count, self.INTERVAL)
                return logging.WARNING
            self._since_line += 1
            now = time.monotonic()
            if now - self._line_at >= self.INTERVAL:
                log.warning("%s: %d more requests throttled (HTTP 429) and retried in the last %.0f s (%d in all)",
                            self.vendor, self._since_line, now - self._line_at, self._count)
                self._line_at, self._since_line = now, 0
        return logging.DEBUG


class _HeaderAuth(requests.auth.AuthBase):
    """requests' auth hook over a callable that returns the auth headers (called per request, so a refreshed
    token applies)."""

    def __init__(self, headers: Callable[[], Mapping[str, str]]) -> None:
        self.headers = headers

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers.update(self.headers())
        return request


def _no_auth(request: requests.PreparedRequest) -> requests.PreparedRequest:
    """Per-request auth that sends no credentials (overrides the session's auth)."""
    return request


class VendorSession:
    """A pooled, retrying, rate-limited HTTP client for one vendor account.

    :param vendor: name used in errors and logs ("Mailchimp").
    :param base_url: every ``path`` is appended to it.
    :param auth: callable returning the auth headers; called per request so refreshed tokens apply.
    :param on_unauthorized: called once after a 401 on a token-authenticated request; returning True
        means "credentials refreshed, try again" (token expiry mid-run).
    :param error_parser: turns an error answer into (message, code).
    :param pool_size: connections kept per host: size it to the concurrency in use.
    :param verify: True, False or a CA bundle path.
    :param connect_timeout: seconds to establish a connection.
    :param read_timeout: seconds to wait for each read of the answer.
    :param retry: the retry policy.
    :param budget: the vendor's published request budget, if any (see :class:`RateLimiter`).
    :param throttle_rules: the vendor's error codes of a 429 (lower case) -> the service-protection rule each
        names (:data:`THROTTLE_RULES`), so that the rate limiter learns from a refusal.
    :param user_agent: the User-Agent header; defaults to the provider's name and version.
    :param sleep: how to wait between attempts (a test passes a fake one).
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
        budget: RequestBudget | None = None,
        throttle_rules: Mapping[str, str] | None = None,
        user_agent: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        from airflow_provider_segexport import __version__

        self.vendor = vendor
        self.base_url = base_url.rstrip("/")
        self._on_unauthorized = on_unauthorized
        self._error_parser = error_parser
        self.timeout = (connect_timeout, read_timeout)
        self.retry = retry or RetryPolicy()
        self.stats = HttpStats()
        self.limiter = RateLimiter(vendor, budget)
        self._throttle_rules = {str(k).lower(): v for k, v in (throttle_rules or {}).items()}
        self._tickets = threading.local()  # each thread's last request's ticket
        self._throttle_log = _ThrottleLog(vendor)
        self._sleep = sleep
        self.session = requests.Session()
        # No urllib3-level retries: this class owns retrying so it can honour vendor headers and
        # method safety, and count what it did.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(1, pool_size), max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.verify = verify
        self.session.verify = verify
        self.session.auth = _HeaderAuth(auth) if auth is not None else None
        self.session.headers["User-Agent"] = user_agent or f"airflow-provider-segexport/{__version__}"
        self.session.headers["Accept"] = "application/json"
        # With trust_env on, requests re-reads the proxy environment and ~/.netrc on every call (and
        # REQUESTS_CA_BUNDLE replaces the connection's CA bundle): the proxies (HTTPS_PROXY, NO_PROXY, ...)
        # are resolved once per host instead, and TLS settings are passed with each request.
        self.session.trust_env = False
        self._proxies: dict[str, dict[str, str]] = {}

    def proxies_for(self, url: str) -> dict[str, str]:
        """The environment's proxies for ``url``'s host (honouring NO_PROXY), resolved once per host.

        :param url: an absolute URL.
        """
        host = url.split("/", 3)[2] if "://" in url else url
        proxies = self._proxies.get(host)
        if proxies is None:
            proxies = self._proxies[host] = requests.utils.get_environ_proxies(url)
        return proxies

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` (an absolute URL is returned as is).

        :param path: a path under the base URL, or an absolute URL.
        """
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

        :param method: the HTTP method.
        :param path: a path under the base URL, or an absolute URL.
        :param idempotent: whether the request may be repeated; defaults to the method's semantics
            (POST and PATCH are not, unless the caller knows the endpoint is an upsert).
        :param expected: extra non-2xx statuses the caller handles itself (returned, not raised).
        :param authenticate: send the vendor credentials (False for a URL outside the vendor's API).
        :param kwargs: passed to :meth:`requests.Session.request` (``params``, ``data``, ``json``,
            ``headers``, ``timeout``, ...).
        """
        method = method.upper()
        safe = (method in IDEMPOTENT_METHODS) if idempotent is None else idempotent
        url = self.url(path)
        short_path = path.split("?", 1)[0] if not path.startswith("http") else "<absolute URL>"
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("verify", self.verify)
        kwargs.setdefault("proxies", self.proxies_for(url))
        if not authenticate:
            kwargs["auth"] = _no_auth
        attempt = 0
        refreshed = False
        while True:
            attempt += 1
            try:
                response = self._send(method, url, kwargs)
            except requests.exceptions.SSLError as exc:
                raise VendorAPIError(
                    self.vendor, None, f"TLS verification failed for {self.base_url}: {_short(exc)}. Check the "
                    "connection's CA bundle (extra \"ca_bundle\") or the host name.", method=method, path=short_path,
                ) from exc
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
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
            status = response.status_code
            if status < 400 or status in expected:
                return response
            if status == 401 and authenticate and not refreshed and self._on_unauthorized is not None:
                refreshed = True
                if self._on_unauthorized():
                    log.info("%s: access token refreshed after 401; repeating %s %s", self.vendor, method, short_path)
                    continue
            message, code = self._error_parser(response)
            rule = None
            if status == 429:
                # what the vendor said was exceeded: the limiter lowers that limit
                rule = self._throttle_rules.get(str(code).lower()) if code is not None else None
                self.limiter.throttled(rule, getattr(self._tickets, "last", None))
            if status in self.retry.statuses and attempt < self.retry.max_attempts and (safe or status == 429):
                # 429 means "not processed": repeating is safe whatever the method.
                wait = retry_after_seconds(response.headers)
                if status == 429:
                    self.stats.add(throttled=1, rule=rule)
                if wait is not None and wait > self.retry.max_retry_after:
                    raise VendorAPIError(
                        self.vendor, status, f"{message} (asked to wait {wait:.0f}s; giving up)",
                        code=code, method=method, path=short_path,
                    )
                if wait is not None:
                    self.limiter.pause(wait)  # the other threads wait too: the server throttles the account
                delay = wait + random.uniform(0, 0.25) if wait is not None else self.retry.backoff(attempt)
                level = self._throttle_log.level(status)
                if log.isEnabledFor(level):
                    log.log(level, "%s %s %s: HTTP %d %s; retry %d/%d in %.1fs",
                            self.vendor, method, short_path, status, _short(message), attempt,
                            self.retry.max_attempts - 1, delay)
                self.stats.add(retries=1)
                response.close()
                self._sleep(delay)
                continue
            body = _safe_json(response)
            error_cls = VendorAuthError if status in (401, 403) else VendorAPIError
            raise error_cls(self.vendor, status, message, code=code, body=body, method=method, path=short_path)

    def _send(self, method: str, url: str, kwargs: dict[str, Any]) -> requests.Response:
        """One exchange through the pooled session, started when the rate limiter allows it."""
        ticket = self._tickets.last = self.limiter.acquire()
        response = None
        try:
            self.stats.add(requests=1)
            response = self.session.request(method, url, **kwargs)
            return response
        finally:
            if response is None:
                self.limiter.release(None, ticket)
            else:
                self.limiter.release(response.headers, ticket, refused=response.status_code == 429)

    def get_json(self, path: str, **kwargs: Any) -> Any:
        """``GET`` ``path`` and decode its JSON answer (None for an empty one).

        :param path: a path under the base URL, or an absolute URL.
        :param kwargs: as for :meth:`request`.
        """
        return _safe_json(self.request("GET", path, **kwargs))

    def post_json(self, path: str, payload: Any, **kwargs: Any) -> Any:
        """``POST`` ``payload`` as JSON to ``path`` and decode the JSON answer (None for an empty one).

        :param path: a path under the base URL, or an absolute URL.
        :param payload: what to encode as the JSON body.
        :param kwargs: as for :meth:`request` (``idempotent=True`` for an upsert).
        """
        headers = {"Content-Type": "application/json", **(kwargs.pop("headers", None) or {})}
        return _safe_json(self.request("POST", path, data=encode_json(payload), headers=headers, **kwargs))


def _safe_json(response: requests.Response) -> Any:
    if not response.content:
        return None
    try:
        return decode_json(response.content)
    except ValueError:
        return None


def _short(value: object, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
