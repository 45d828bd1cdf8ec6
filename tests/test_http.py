"""The one HTTP layer, against a real local HTTP server (no mocking of requests)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from airflow_provider_segexport.http import (
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
        self.peers: list[int] = []  # the client's port of each call (one per connection)

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
            script.peers.append(self.client_address[1])
            if status == "wire":  # these bytes as the whole answer (status line, headers, body)
                self.wfile.write(body)
                self.wfile.flush()
                if (headers or {}).get("close"):  # then the connection's end (the end of the body, or a cut)
                    self.close_connection = True
                    self.request.shutdown(socket.SHUT_WR)
                return
            if status == "drop":
                self.close_connection = True
                self.request.shutdown(socket.SHUT_RDWR)
                return
            if status == "raw":  # these bytes as the body of a 200 (e.g. compressed)
                status, data = 200, body
            else:
                data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            if (headers or {}).get("X-Then-Close"):  # answered as kept alive, then closed while idle
                self.wfile.flush()
                self.close_connection = True

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


def test_plain_calls_skip_requests_machinery_with_the_same_headers_and_answers(server, monkeypatch):
    """A call with a body of bytes (or none) and no query parameters goes straight to http.client (requests'
    per-call work is ~1 ms of CPU); calls with params still use requests. Both send the same headers and
    give the same Response (status, headers, content, json)."""
    script, url = server((201, {"X-Request-Id": "abc"}, {"ok": 1}))
    s = VendorSession("Vendor", url, retry=fast_policy(), auth=lambda: {"Authorization": "Bearer t0k"})
    through_requests = []
    real = s.session.request
    monkeypatch.setattr(s.session, "request", lambda *a, **k: through_requests.append(a[1]) or real(*a, **k))
    direct = s.request("POST", "/members", data=b'{"a":1}', headers={"Content-Type": "application/json"})
    assert (direct.status_code, direct.json(), direct.headers["x-request-id"]) == (201, {"ok": 1}, "abc")
    assert s.get_json("/plain") == {"ok": 1}
    assert through_requests == []
    assert s.get_json("/paged", params={"count": 2}) == {"ok": 1}
    assert through_requests == [f"{url}/paged"]
    sent = [{k.lower(): v for k, v in h.items()} for _, _, h in script.received]
    for headers in sent:
        assert headers["authorization"] == "Bearer t0k"
        assert headers["user-agent"].startswith("airflow-provider-segexport/")
        assert headers["accept"] == "application/json"
        assert "gzip" in headers["accept-encoding"]
    assert sent[0]["content-type"] == "application/json"


def test_a_redirect_on_the_direct_path_is_followed_from_its_answer(server):
    """A redirect is followed from the answer, as requests follows one, without sending the call again: a POST
    answered 303 (processed: "see the result there") reaches the server once, then a GET without its body; a
    307 repeats the call, body and all, at the new place; a redirect to another host does not carry the
    credentials along."""
    script, url = server((303, {"Location": "/created/1"}, None), (200, {}, {"id": 1}))
    s = VendorSession("Vendor", url, retry=fast_policy(max_attempts=1), auth=lambda: {"Authorization": "Bearer t0k"})
    assert s.request("POST", "/orders", data=b'{"x": 1}', headers={"Content-Type": "application/json"}).json() == {
        "id": 1}
    assert [(m, p) for m, p, _ in script.received] == [("POST", "/orders"), ("GET", "/created/1")]
    assert "Content-Type" not in script.received[1][2]

    script.steps = [(307, {"Location": "/v2/orders"}, None), (201, {}, {"id": 2})]
    script.received.clear()
    assert s.request("POST", "/orders", data=b'{"x": 2}').json() == {"id": 2}
    assert [(m, p) for m, p, _ in script.received] == [("POST", "/orders"), ("POST", "/v2/orders")]

    # requests' rules for the other methods: a PUT answered 301 is repeated without its body, 302 and 303 make a
    # GET, 308 repeats a PATCH with its body
    for status, method, then in ((301, "PUT", "PUT"), (302, "PUT", "GET"), (303, "DELETE", "GET"),
                                 (308, "PATCH", "PATCH")):
        script.steps = [(status, {"Location": "/moved"}, None), (200, {}, {"ok": 1})]
        script.received.clear()
        assert s.request(method, "/thing", data=b'{"x": 3}', headers={"Content-Type": "application/json"}
                         ).status_code == 200
        assert [(m, p) for m, p, _ in script.received] == [(method, "/thing"), (then, "/moved")]
        resent = {k.lower(): v for k, v in script.received[1][2].items()}
        assert (resent.get("content-type") == "application/json") == (status == 308)
        assert resent.get("content-length", "0") == ("8" if status == 308 else "0")

    elsewhere = url.replace("127.0.0.1", "localhost")  # the same server under another host name
    script.steps = [(302, {"Location": f"{elsewhere}/public"}, None), (200, {}, {"ok": 1})]
    script.received.clear()
    assert s.get_json("/private") == {"ok": 1}
    assert [p for _, p, _ in script.received] == ["/private", "/public"]
    assert script.received[0][2]["Authorization"] == "Bearer t0k"
    assert "Authorization" not in script.received[1][2]


def test_the_direct_path_encodes_its_request_target_and_merges_headers_as_requests_does(server):
    """The path is percent-encoded as requests encodes it (a space, a non-ASCII character; a line break is
    dropped, as urllib.parse drops it: no request splitting); a call's header replaces the session's of the same name
    whatever its case, None removes one, a bytes value is sent as is."""
    script, url = server((200, {}, {"ok": 1}))
    s = VendorSession("Vendor", url, retry=fast_policy())
    assert s.get_json("/lists/my list €") == {"ok": 1}
    assert script.received[-1][1] == "/lists/my%20list%20%E2%82%AC"
    assert s.get_json("/lists/x\r\nX-Injected: 1") == {"ok": 1}  # the line break dropped (urllib.parse): no
    assert script.received[-1][1] == "/lists/xX-Injected:%201" and "X-Injected" not in script.received[-1][2]
    s.request("GET", "/h", headers={"accept": "text/csv", "User-Agent": None, "X-B": b"v"})
    sent = script.received[-1][2]
    assert [v for k, v in sent.items() if k.lower() == "accept"] == ["text/csv"]
    assert "User-Agent" not in sent and sent["X-B"] == "v"


def test_an_early_answer_while_the_body_is_sent_is_read():
    """A server that answers before reading the whole body (413: too large) and closes: the answer is read and
    reported (not a lost connection), as urllib3 does."""
    big = b"x" * (16 << 20)
    answer = b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n" \
             b'{"detail":"no"}'
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(answer)
        conn.shutdown(socket.SHUT_WR)
        time.sleep(0.2)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    s = VendorSession("Vendor", f"http://127.0.0.1:{port}", retry=fast_policy(max_attempts=1))
    with pytest.raises(VendorAPIError) as err:
        s.request("POST", "/upload", data=big)
    assert err.value.status == 413 and "no" in str(err.value)
    thread.join(5)
    listener.close()


def test_read_timeout_on_the_direct_path_is_retried_only_when_safe(server):
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


def test_a_kept_alive_connection_the_server_closed_is_not_used_again(server):
    """The direct path keeps connections alive; one the server closed while it was idle is noticed before use,
    so even a call that is never repeated (a POST that may not be retried) goes out on a fresh connection."""
    script, url = server((200, {"X-Then-Close": "1"}, {"n": 1}), (201, {}, {"n": 2}))
    s = VendorSession("Vendor", url, retry=fast_policy(max_attempts=1))
    assert s.get_json("/first") == {"n": 1}
    time.sleep(0.2)  # the server has closed its end by now
    assert s.post_json("/once", {"a": 1}) == {"n": 2}
    assert [p for _, p, _ in script.received] == ["/first", "/once"]
    assert s.stats.as_dict()["retries"] == 0


def test_gzip_and_deflate_answers_on_the_direct_path_are_inflated(server):
    import gzip
    import zlib

    payload = json.dumps({"ok": "x" * 2000}).encode()
    for encoding, body in (("gzip", gzip.compress(payload)), ("deflate", zlib.compress(payload)),
                           ("deflate", zlib.compress(payload)[2:-4]),  # zlib-wrapped, and raw deflate
                           ("gzip", gzip.compress(payload[:100]) + gzip.compress(payload[100:]))):  # two members
        script, url = server((200, {}, None))
        s = VendorSession("Vendor", url, retry=fast_policy())
        script.steps = [("raw", {"Content-Encoding": encoding}, body)]
        assert s.request("GET", "/z").json() == {"ok": "x" * 2000}


def test_the_direct_path_reads_chunked_interim_folded_and_close_delimited_answers(server):
    """The direct path speaks HTTP/1.1 itself: a chunked body (with a chunk extension and a trailer), an
    interim 100 answer before the real one, a folded header line, an answer without a body (204) and an
    HTTP/1.0 body that ends with the connection all read as requests would read them."""
    script, url = server((200, {}, None))
    s = VendorSession("Vendor", url, retry=fast_policy(max_attempts=1))
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Folded: a\r\n  b\r\n\r\n"
        b"4;ext=1\r\n{\"ok\r\n5\r\n\": 1}\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 8\r\n\r\n{\"ok\":2}",
        b"HTTP/1.1 204 No Content\r\nX-Id: 3\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"ok\": 4}",
    ]
    script.steps = [("wire", {"close": a.startswith(b"HTTP/1.0")}, a) for a in answers]
    first = s.request("POST", "/chunked", data=b"{}")
    assert (first.status_code, first.json(), first.headers["x-folded"]) == (200, {"ok": 1}, "a b")
    second = s.request("POST", "/interim", data=b"{}")
    assert (second.status_code, second.reason, second.json()) == (201, "Created", {"ok": 2})
    third = s.request("DELETE", "/nothing")
    assert (third.status_code, third.content, third.headers["X-Id"]) == (204, b"", "3")
    assert s.request("GET", "/old").json() == {"ok": 4}
    assert [p for _, p, _ in script.received] == ["/chunked", "/interim", "/nothing", "/old"]


def test_a_broken_answer_on_the_direct_path_is_a_connection_error(server):
    """An answer cut short (fewer bytes than its Content-Length), a status line that is not HTTP or a chunk
    size that is not hexadecimal: the connection is dropped and the call fails as a lost connection (a POST
    is not repeated: the vendor may have processed it; a GET is, on a fresh connection)."""
    for answer in (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"cut",
                   b"SSH-2.0-OpenSSH\r\n\r\n",
                   b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                   b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{}",  # which one?
                   b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n{}"):  # a digit, but not an ASCII one
        script, url = server(("wire", {"close": True}, answer), (200, {}, {"ok": 1}))
        s = VendorSession("Vendor", url, retry=fast_policy())
        with pytest.raises(VendorAPIError, match="ConnectionError"):
            s.post_json("/once", {"a": 1})
        assert len(script.received) == 1
        assert s.get_json("/safe") == {"ok": 1}
        assert script.peers[1] != script.peers[0]  # not on the broken connection


def test_the_direct_path_sends_one_host_and_only_the_encodings_it_decodes(server):
    """Host names the port; Accept-Encoding is what the direct path inflates (gzip, deflate) even when the
    session would announce more (requests adds br or zstd when those packages are installed); a header
    value with a line break is refused before anything is sent; a kept-alive connection is reused."""
    script, url = server((200, {}, {"ok": 1}))
    s = VendorSession("Vendor", url, retry=fast_policy())
    s.session.headers["Accept-Encoding"] = "gzip, deflate, br, zstd"
    assert s.get_json("/a") == {"ok": 1}
    assert s.post_json("/b", {"x": 1}) == {"ok": 1}
    for _, _, headers in script.received:
        low = {k.lower(): v for k, v in headers.items()}
        assert low["host"] == url.removeprefix("http://")
        assert low["accept-encoding"] == "gzip, deflate"
    assert script.peers[0] == script.peers[1]
    with pytest.raises(ValueError, match="invalid HTTP header 'X-Evil'"):
        s.request("GET", "/c", headers={"X-Evil": "a\r\nX-Injected: 1"})
    assert len(script.received) == 2
