"""The one HTTP layer, against a real local HTTP server (no mocking of requests)."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from airflow_provider_segexport.http import (
    RateLimiter,
    RequestBudget,
    RetryPolicy,
    VendorAPIError,
    VendorAuthError,
    VendorSession,
    retry_after_seconds,
)


class Script:
    """Responses the server gives in order: (status, headers, body); the last one repeats."""

    def __init__(self, *steps):
        self.steps = list(steps)
        self.received: list[tuple[str, str, dict]] = []
        self.times: list[float] = []

    def next(self):
        return self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]


@pytest.fixture
def server():
    script_holder: dict = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _handle(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            script: Script = script_holder["script"]
            script.received.append((self.command, self.path, dict(self.headers)))
            script.times.append(time.monotonic())
            status, headers, body = script.next()
            if status == "drop":
                self.close_connection = True
                self.request.shutdown(socket.SHUT_RDWR)
                return
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def use(*steps) -> tuple[Script, str]:
        script_holder["script"] = Script(*steps)
        return script_holder["script"], f"http://127.0.0.1:{httpd.server_port}"

    yield use
    httpd.shutdown()


def fast_policy(**kw) -> RetryPolicy:
    return RetryPolicy(**{"max_attempts": 5, "backoff_base": 0.01, "backoff_max": 0.05, **kw})


def test_429_honours_retry_after_then_succeeds(server):
    script, url = server((429, {"Retry-After": "1"}, {"detail": "slow down"}), (200, {}, {"ok": True}))
    s = VendorSession("Vendor", url, retry=fast_policy())
    assert s.get_json("/thing") == {"ok": True}
    assert len(script.received) == 2
    waited = script.times[1] - script.times[0]
    assert 1.0 <= waited < 2.0, waited  # the server's Retry-After, not the tiny backoff
    assert s.stats.as_dict() == {"requests": 2, "retries": 1, "throttled": 1}


def test_ratelimit_reset_header_is_honoured(server):
    script, url = server((429, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"}, {"Code": 429}),
                         (200, {}, {"ok": 1}))
    s = VendorSession("Vendor", url, retry=fast_policy())
    s.get_json("/x")
    assert script.times[1] - script.times[0] >= 1.0


def test_503s_are_retried_with_backoff_for_idempotent_requests(server):
    script, url = server((503, {}, {"message": "busy"}), (503, {}, {"message": "busy"}), (200, {}, {"ok": 1}))
    s = VendorSession("Vendor", url, retry=fast_policy())
    assert s.get_json("/x") == {"ok": 1}
    assert [r[0] for r in script.received] == ["GET", "GET", "GET"]


def test_non_idempotent_post_is_not_retried_on_503(server):
    script, url = server((503, {}, {"message": "busy"}), (200, {}, {"ok": 1}))
    s = VendorSession("Vendor", url, retry=fast_policy())
    with pytest.raises(VendorAPIError) as err:
        s.post_json("/create", {"a": 1})
    assert err.value.status == 503 and "busy" in str(err.value)
    assert len(script.received) == 1


def test_post_declared_idempotent_is_retried(server):
    script, url = server((502, {}, None), (200, {}, {"ok": 1}))
    s = VendorSession("Vendor", url, retry=fast_policy())
    assert s.post_json("/upsert", {"a": 1}, idempotent=True) == {"ok": 1}
    assert len(script.received) == 2


def test_429_is_retried_even_for_post(server):
    script, url = server((429, {}, {"title": "Too Many Requests"}), (200, {}, {"ok": 1}))
    s = VendorSession("Vendor", url, retry=fast_policy())
    assert s.post_json("/create", {}) == {"ok": 1}


def test_dropped_connection_is_retried_only_when_safe(server):
    script, url = server(("drop", {}, None), (200, {}, {"ok": 1}))
    s = VendorSession("Vendor", url, retry=fast_policy())
    assert s.get_json("/x") == {"ok": 1}
    script, url = server(("drop", {}, None), (200, {}, {"ok": 1}))
    with pytest.raises(VendorAPIError):
        s.post_json("/not-safe", {})
    assert len(script.received) == 1


def test_gives_up_after_max_attempts_with_vendor_message(server):
    script, url = server((500, {}, {"error": {"code": "0x1", "message": "Generic SQL error."}}))
    s = VendorSession("Dataverse", url, retry=fast_policy(max_attempts=3))
    with pytest.raises(VendorAPIError) as err:
        s.get_json("/contacts")
    assert len(script.received) == 3
    assert "Generic SQL error." in str(err.value) and err.value.code == "0x1"


def test_auth_error_is_not_retried_and_is_typed(server):
    script, url = server((401, {}, {"title": "API Key Invalid", "detail": "Your API key may be invalid"}))
    s = VendorSession("Mailchimp", url, retry=fast_policy())
    with pytest.raises(VendorAuthError) as err:
        s.get_json("/")
    assert "Your API key may be invalid" in str(err.value)
    assert len(script.received) == 1


def test_401_refreshes_token_once(server):
    script, url = server((401, {}, {"message": "expired"}), (200, {}, {"ok": 1}))
    tokens = iter(["old", "new"])
    current = {"token": next(tokens)}

    def refresh() -> bool:
        current["token"] = next(tokens)
        return True

    s = VendorSession("Vendor", url, auth=lambda: {"Authorization": f"Bearer {current['token']}"},
                      on_unauthorized=refresh, retry=fast_policy())
    assert s.get_json("/x") == {"ok": 1}
    assert [r[2]["Authorization"] for r in script.received] == ["Bearer old", "Bearer new"]


def test_retry_after_too_long_fails_fast(server):
    script, url = server((429, {"Retry-After": "3600"}, {"detail": "quota"}))
    s = VendorSession("Vendor", url, retry=fast_policy(max_retry_after=10))
    with pytest.raises(VendorAPIError, match="asked to wait 3600s"):
        s.get_json("/x")


def test_unknown_connection_fields_are_never_sent_as_headers(server):
    script, url = server((200, {}, {"ok": 1}))
    s = VendorSession("Vendor", url, auth=lambda: {"Authorization": "Bearer t"})
    s.get_json("/x")
    sent = {k.lower() for k in script.received[0][2]}
    assert sent <= {"host", "user-agent", "accept", "accept-encoding", "connection", "authorization"}


def test_retry_after_parsing():
    assert retry_after_seconds({"Retry-After": "7"}) == 7
    assert retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480) == 10
    assert retry_after_seconds({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(1_700_000_030)},
                               now=1_700_000_000) == 30
    assert retry_after_seconds({"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": "30"}) is None
    assert retry_after_seconds({}) is None


def test_proxy_environment_is_honoured_and_resolved_once_per_host(server, monkeypatch):
    """HTTP(S)_PROXY / NO_PROXY apply as with plain requests, but are not re-read on every call."""
    script, base = server((200, {}, {"ok": True}))
    monkeypatch.setenv("HTTP_PROXY", base)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    s = VendorSession("Vendor", "http://vendor.invalid/api", retry=fast_policy())
    assert s.get_json("/lists") == {"ok": True}
    assert s.get_json(f"{base}/direct") == {"ok": True}  # NO_PROXY: straight to the host
    monkeypatch.delenv("HTTP_PROXY")  # resolved already for this host: the session keeps using it
    assert s.get_json("/again") == {"ok": True}
    assert [p for _, p, _ in script.received] == ["http://vendor.invalid/api/lists", "/direct",
                                                  "http://vendor.invalid/api/again"]


def test_read_timeout_is_retried_only_when_safe(server):
    """A read timeout may mean the vendor processed the call: a safe call is repeated, an unsafe one is not."""
    script, url = server((200, {}, {"ok": 1}))
    slow = threading.Event()

    original_next = Script.next

    def next_step(self):  # the first answer of each part comes after the read timeout
        if not slow.is_set():
            slow.set()
            time.sleep(0.6)
        return original_next(self)

    Script.next = next_step
    try:
        s = VendorSession("Vendor", url, retry=fast_policy(), read_timeout=0.3)
        assert s.get_json("/safe") == {"ok": 1}
        assert len(script.received) == 2
        slow.clear()
        with pytest.raises(VendorAPIError, match="ReadTimeout"):
            s.post_json("/unsafe", {})
    finally:
        Script.next = original_next
    time.sleep(0.4)
    assert [p for _, p, _ in script.received] == ["/safe", "/safe", "/unsafe"]


def test_credentials_go_only_where_they_belong(server):
    """The auth headers are added to each call to the vendor; ``authenticate=False`` (a download URL outside
    the vendor's API) sends none, and a redirect to another host does not carry them along."""
    script, url = server((200, {}, {"ok": 1}))
    s = VendorSession("Vendor", url, retry=fast_policy(), auth=lambda: {"Authorization": "Bearer t0k"})
    s.get_json("/a")
    s.request("GET", f"{url}/download", authenticate=False)
    elsewhere = url.replace("127.0.0.1", "localhost")  # the same server under another host name
    script.steps = [(302, {"Location": f"{elsewhere}/public"}, None), (200, {}, {"ok": 1})]
    s.get_json("/private")
    sent = [(p, h.get("Authorization")) for _, p, h in script.received]
    assert sent == [("/a", "Bearer t0k"), ("/download", None), ("/private", "Bearer t0k"), ("/public", None)]


def test_tls_is_verified_against_the_given_ca_bundle(sandbox):
    """verify= is passed with each request: the sandbox's certificate passes with its CA bundle and fails
    without it, whatever REQUESTS_CA_BUNDLE says (the session does not read the environment)."""
    base = sandbox.info["mailchimp"]["base_url"]
    good = VendorSession("Mailchimp", base, verify=sandbox.info["ca_bundle"], retry=fast_policy(max_attempts=1))
    assert good.request("GET", "/ping", expected=(401,)).status_code == 401  # reached it (no credentials)
    bad = VendorSession("Mailchimp", base, retry=fast_policy(max_attempts=1))
    with pytest.raises(VendorAPIError, match="TLS verification failed"):
        bad.get_json("/ping")


# -- the proactive rate limiter ------------------------------------------------------------------------------

class FakeClock:
    """A monotonic clock that only moves when someone sleeps (or a test moves it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


def limiter(clock: FakeClock, budget: RequestBudget | None = None, wall: float = 0.0) -> RateLimiter:
    return RateLimiter("Vendor", budget, clock=clock, sleep=clock.sleep, wall=lambda: wall)


def test_a_published_budget_makes_requests_beyond_it_wait_for_the_sliding_window(caplog):
    clock = FakeClock()
    lim = limiter(clock, RequestBudget(3, 10.0))
    with caplog.at_level("INFO", logger="airflow_provider_segexport.http"):
        for _ in range(3):
            lim.acquire()
            lim.release()
            clock.now += 1  # requests at 1000, 1001, 1002
        assert clock.sleeps == []
        lim.acquire()  # at 1003: the window already holds 3; the first leaves it at 1010
        assert clock.sleeps == [7.0] and clock.now == 1010.0
        lim.acquire()  # the second leaves at 1011
        assert clock.sleeps == [7.0, 1.0]
        clock.now += 20
        lim.acquire()  # the window has room again
        assert clock.sleeps == [7.0, 1.0]
    pacing = [r for r in caplog.records if r.levelname == "INFO" and "request budget" in r.getMessage()]
    assert len(pacing) == 1 and "3 per 10 s: waiting 7.0 s" in pacing[0].getMessage()  # logged once, with numbers
    assert lim.waited == 8.0


def test_a_request_counts_in_the_window_until_a_window_after_its_answer():
    """A vendor may count a request when it ends (the sandbox's Dataverse does): a slow request leaves the
    limiter's window ``window`` seconds after its answer, not after its start; one in flight always counts."""
    clock = FakeClock()
    lim = limiter(clock, RequestBudget(2, 10.0))
    slow = lim.acquire()          # at 1000, answered at 1004
    clock.now += 4
    lim.release(ticket=slow)
    lim.acquire()                 # at 1004, still in flight
    lim.acquire()                 # 2 in the window: waits for the slow one to leave it, at 1014 (not 1010)
    assert clock.sleeps == [10.0] and clock.now == 1014.0


def test_an_answer_refused_with_429_does_not_count_toward_the_budget():
    clock = FakeClock()
    lim = limiter(clock, RequestBudget(2, 10.0))
    lim.release(ticket=lim.acquire(), refused=True)
    lim.release(ticket=lim.acquire())
    lim.acquire()
    assert clock.sleeps == []


def test_an_execution_time_budget_paces_requests_to_the_time_they_take(caplog):
    """10 s of execution time per 60 s: requests of 2 s each, one after another, fit 5 to a window (the sixth
    would make 12 s), then each waits for the oldest to leave the window."""
    clock = FakeClock()
    lim = limiter(clock, RequestBudget(1000, 60.0, execution=10.0))
    starts = []
    with caplog.at_level("INFO", logger="airflow_provider_segexport.http"):
        for _ in range(7):
            t = lim.acquire()
            starts.append(clock.now)
            clock.now += 2.0
            lim.release(ticket=t)
    assert starts[:5] == [1000.0, 1002.0, 1004.0, 1006.0, 1008.0]
    assert starts[5] == 1062.0  # 1002 + 60: the first request (answered at 1002) left the window
    assert starts[6] == 1064.0
    assert "budget of 10.0 s of execution time per 60 s" in caplog.text


def test_an_execution_time_budget_counts_the_requests_in_flight_as_long_as_answered_ones_took():
    clock = FakeClock()
    lim = limiter(clock, RequestBudget(1000, 60.0, execution=10.0))
    for _ in range(2):                    # two answered requests of 3 s: 6 s used
        t = lim.acquire()
        clock.now += 3.0
        lim.release(ticket=t)
    lim.acquire()                         # one in flight, expected to take 3 s: 9 s; a fourth would make 12 s
    assert clock.sleeps == []
    assert lim._wait(clock.now) == (57.0, "execution")  # until the first (answered at 1003) leaves the window
    clock.now += 57.0                     # the one in flight has now run 57 s: it counts that long
    assert lim._wait(clock.now) == (math.inf, "execution")  # only its answer can make room


def test_a_429_naming_the_number_of_requests_lowers_the_budget_to_what_the_vendor_allowed(caplog):
    """The connection says 100 per 10 s, the vendor allows 5 (it counts a request when it ends): a sequential
    export over 6 windows is refused once, then paced to 5 per window and never refused again."""
    clock = FakeClock()
    lim = limiter(clock, RequestBudget(100, 10.0))
    counted: list[float] = []  # the vendor's window: when each accepted request ended
    refused = answered = 0
    with caplog.at_level("WARNING", logger="airflow_provider_segexport.http"):
        while answered < 30:
            t = lim.acquire()
            counted[:] = [e for e in counted if e > clock.now - 10.0]
            if len(counted) >= 5:
                refused += 1
                lim.release(ticket=t, refused=True)
                lim.throttled("requests", t)
                lim.pause(min(counted) + 10.0 - clock.now)  # Retry-After
                continue
            clock.now += 0.3
            counted.append(clock.now)
            lim.release(ticket=t)
            answered += 1
    assert refused == 1
    assert lim.budget.requests == 5 and lim.budget.window == 10.0
    assert "(number of requests): at most 5 requests per 10 s (was 100) from now on" in caplog.text


def test_a_429_naming_the_execution_time_slows_the_requests_down():
    clock = FakeClock()
    lim = limiter(clock, RequestBudget(1000, 60.0, execution=1000.0, concurrent=52))
    for _ in range(4):
        t = lim.acquire()
        clock.now += 5.0
        lim.release(ticket=t)
    t = lim.acquire()
    lim.release(ticket=t, refused=True)
    lim.throttled("execution", t)
    assert lim.execution_budget == pytest.approx(18.0)  # 90 % of the 20 s the answered requests took
    assert lim.max_in_flight == 1                        # 18 s per 60 s sustains less than one request in flight
    lim.acquire()
    assert clock.sleeps == [50.0]  # 20 s + 5 s expected: 7 s over 18 s: the first two (1005, 1010) must leave


def test_a_429_naming_the_concurrency_lowers_the_requests_in_flight():
    clock = FakeClock()
    lim = limiter(clock, RequestBudget(1000, 60.0, concurrent=52))
    tickets = [lim.acquire() for _ in range(4)]
    lim.release(ticket=tickets[3], refused=True)  # the fourth was refused: three were in flight when it started
    lim.throttled("concurrency", tickets[3])
    assert lim.max_in_flight == 3
    lim.release(ticket=tickets[2])
    again = lim.acquire()
    lim.release(ticket=again, refused=True)
    lim.throttled("concurrency", again)             # refused again with 2 others in flight: 2 from now on
    assert lim.max_in_flight == 2
    lim.throttled(None, tickets[0])                 # an unnamed rule changes nothing
    lim.throttled("requests", None)
    assert lim.max_in_flight == 2 and lim.budget.requests == 1000
    # a request started with none in flight, another started after it and reached the vendor first: the refusal
    # counts the one in flight when it came
    lim = limiter(clock, RequestBudget(1000, 60.0, concurrent=52))
    first, _overtaker = lim.acquire(), lim.acquire()
    lim.release(ticket=first, refused=True)
    lim.throttled("concurrency", first)
    assert lim.max_in_flight == 1


def test_requests_beyond_the_concurrency_wait_for_an_answer():
    lim = RateLimiter("Vendor", RequestBudget(1000, 60.0, concurrent=2))
    first, _second = lim.acquire(), lim.acquire()
    started = threading.Event()

    def third():
        lim.acquire()
        started.set()

    thread = threading.Thread(target=third)
    thread.start()
    assert not started.wait(0.2)        # two in flight: the third waits
    lim.release(ticket=first)
    assert started.wait(2)              # an answer freed a place
    thread.join(2)


def test_a_vendor_429_code_is_mapped_to_its_rule_and_counted(server):
    script, url = server((200, {}, {}), (200, {}, {}),
                         (429, {"Retry-After": "0"}, {"error": {"code": "0x80072322", "message": "Number of requests "
                                                                "exceeded the limit of 2 over time window of 300 s."}}),
                         (200, {}, {"ok": 1}))
    s = VendorSession("Dataverse", url, retry=fast_policy(), budget=RequestBudget(6000, 1.0),
                      throttle_rules={"0x80072322": "requests"})
    s.get_json("/a")
    s.get_json("/b")
    assert s.get_json("/c") == {"ok": 1}
    assert s.stats.as_dict() == {"requests": 4, "retries": 1, "throttled": 1, "throttled_by": {"requests": 1}}
    assert s.limiter.budget.requests == 2
    # the repeat waited for the window to have room for it: a second after /a was answered
    assert script.times[3] - script.times[0] >= 1.0


def test_rate_limit_headers_pause_new_requests_when_remaining_reaches_those_in_flight(caplog):
    clock = FakeClock()
    lim = limiter(clock)
    for _ in range(4):
        lim.acquire()
    headers = {"X-RateLimit-Limit": "100", "X-RateLimit-Reset": "12"}
    lim.release({**headers, "X-RateLimit-Remaining": "50"})  # plenty left for the 3 still in flight
    lim.acquire()
    assert clock.sleeps == []
    with caplog.at_level("INFO", logger="airflow_provider_segexport.http"):
        lim.release({**headers, "X-RateLimit-Remaining": "3"})  # 3 left, 3 in flight: they will spend them
        lim.acquire()
    assert clock.sleeps == [12.0]
    assert "X-RateLimit-Remaining 3 of 100 with 3 request(s) in flight" in caplog.text and "12.0 s" in caplog.text
    lim.release({"X-RateLimit-Remaining": "0"})  # no reset given: nothing to wait for
    lim.acquire()
    assert clock.sleeps == [12.0]


def test_a_reset_given_as_a_unix_timestamp_is_read_as_one():
    clock = FakeClock()
    lim = limiter(clock, wall=1_700_000_000.0)
    lim.acquire()
    lim.release({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1700000030"})
    lim.acquire()
    assert clock.sleeps == [30.0]


def test_a_server_requested_wait_holds_every_thread():
    clock = FakeClock()
    lim = limiter(clock)
    lim.pause(5.0)
    lim.pause(2.0)  # a shorter wait does not shorten the longer one
    lim.acquire()
    assert clock.sleeps == [5.0]


def test_after_a_429_the_other_threads_wait_too(server):
    """One thread is answered 429 with Retry-After: 1; a request another thread starts meanwhile is held
    until the wait is over, instead of being refused too."""
    script, url = server((429, {"Retry-After": "1"}, {"detail": "slow down"}), (200, {}, {"ok": 1}))
    s = VendorSession("Vendor", url, retry=fast_policy())
    first = threading.Thread(target=s.get_json, args=("/first",))
    first.start()
    while not script.received:
        time.sleep(0.01)
    time.sleep(0.1)  # the 429 has been answered and read
    assert s.get_json("/second") == {"ok": 1}
    first.join(5)
    refused_at = script.times[0]
    later = [t for (_, path, _), t in zip(script.received, script.times, strict=True) if path == "/second"]
    assert later and later[0] - refused_at >= 1.0, later[0] - refused_at
    assert s.stats.as_dict()["throttled"] == 1


def test_a_burst_paced_by_campaign_monitors_headers_is_not_refused(sandbox, monkeypatch, caplog):
    """The sandbox's Campaign Monitor allows 10 requests per second per API key (a token bucket) and says so
    in X-RateLimit-* headers: 40 requests from 4 threads are paced by the headers and get at most one 429."""
    from concurrent.futures import ThreadPoolExecutor

    from airflow_provider_segexport.hooks.campaign_monitor import CampaignMonitorHook

    cm = sandbox.info["campaign_monitor"]
    sandbox.session.post(f"{sandbox.admin}/campaign_monitor/config", json={"rate_limit": 10, "rate_period": 1},
                         timeout=10).raise_for_status()
    monkeypatch.setenv("AIRFLOW_CONN_CM_BURST", json.dumps({
        "conn_type": "campaign_monitor", "host": cm["base_url"],
        "extra": {"api_key": cm["api_key"], "ca_bundle": sandbox.info["ca_bundle"]}}))
    hook = CampaignMonitorHook("cm_burst", concurrency=4)
    with caplog.at_level("INFO", logger="airflow_provider_segexport.http"), ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: hook.http.get_json("/systemdate.json"), range(40)))
    hook.close()
    assert all(a and "SystemDate" in a for a in answers)
    assert hook.http.stats.throttled <= 1, hook.http.stats.as_dict()
    assert hook.http.limiter.waited > 0
    assert "pacing requests to the vendor's rate limit (X-RateLimit-Remaining" in caplog.text


def test_a_throttled_run_logs_the_first_429s_then_counts_them(caplog, monkeypatch):
    """Hundreds of 429s must not bury a task log: the first 20 retries one line each, then one line every 30 s
    counting them (the retries themselves at DEBUG); a 503 retry keeps its own line."""
    import logging

    from airflow_provider_segexport import http

    clock = [1000.0]
    monkeypatch.setattr(http.time, "monotonic", lambda: clock[0])
    throttle = http._ThrottleLog("Adobe Campaign")
    with caplog.at_level(logging.DEBUG, logger="airflow_provider_segexport.http"):
        levels = []
        for _ in range(200):
            clock[0] += 0.5  # 200 retries over 100 s
            levels.append(throttle.level(429))
        assert throttle.level(503) == logging.WARNING
    assert levels[:20] == [logging.WARNING] * 20 and set(levels[20:]) == {logging.DEBUG}
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines[0].startswith("Adobe Campaign: 20 requests throttled (HTTP 429) so far")
    assert len(lines) == 1 + 3 and all("more requests throttled" in line for line in lines[1:])
    assert lines[-1].endswith("(200 in all)")
