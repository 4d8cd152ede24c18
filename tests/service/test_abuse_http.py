"""Hostile clients against a real uvicorn server on loopback (issue 11): what a test client cannot show."""
from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.request

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import drop_keys, live_server, make_settings

MAX_BODY = 2 * 1024 * 1024
SLOTS, BODY_TIMEOUT_S, HEADER_TIMEOUT_S, KEEP_ALIVE_S = 2, 1.0, 1.0, 2.0


@pytest.fixture(scope="module")
def server(redis_available):
    settings = make_settings(max_body_bytes=MAX_BODY, max_concurrent_requests=SLOTS, body_timeout_s=BODY_TIMEOUT_S,
                             header_timeout_s=HEADER_TIMEOUT_S, keep_alive_s=KEEP_ALIVE_S)
    try:
        with live_server(settings) as running:
            yield running
    finally:
        drop_keys(settings)


def _requests(base: str) -> dict[tuple, float]:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name in ("faceset_requests_total", "faceset_errors_total")}


def _count(samples, **labels) -> float:
    return samples.get(tuple(sorted(labels.items())), 0.0)


def _wait(predicate, bound_s: float) -> bool:
    deadline = time.monotonic() + bound_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def test_a_client_hanging_up_mid_upload_is_not_a_server_error(server, caplog):
    base, port = server
    before = _requests(base)
    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 1048576\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"images\"; "
                  b"filename=\"a.jpg\"\r\n\r\n" + b"\xff" * 10_000)
        time.sleep(0.2)  # the server is reading the body when the client goes
    closed = dict(route="/embed", method="POST", status="499")
    assert _wait(lambda: _count(_requests(base), **closed) > _count(before, **closed), 5)
    after = _requests(base)
    grew = {k for k in after if after[k] > before.get(k, 0) and dict(k).get("status", "").startswith("5")}
    assert not grew
    assert _count(after, code="client_closed") - _count(before, code="client_closed") == 1
    assert _count(after, code="internal_error") == _count(before, code="internal_error")
    time.sleep(0.2)
    lines = [r for r in caplog.records if r.levelno >= logging.INFO and r.name not in ("uvicorn.access", "httpx")]
    assert len(lines) == 1 and lines[0].exc_info is None, [r.getMessage() for r in lines]


def test_urllib_sees_the_413_of_a_body_over_the_limit(server):
    """urllib sends the whole body before reading: the body is drained, so it reads the 413, not a reset."""
    base, _ = server
    request = urllib.request.Request(f"{base}/embed", data=b"\0" * (3 * MAX_BODY), method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())["error"]["code"] == "payload_too_large"


def _slow_body(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST /verify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n{")
    return s


def _until_closed(s: socket.socket, limit: int = 64_000) -> bytes:
    """What the server sends until it closes (each read within the socket's timeout)."""
    data = b""
    while len(data) < limit and (chunk := s.recv(4096)):
        data += chunk
    return data


def test_slow_bodies_take_no_admission_slot_and_get_408(server):
    base, port = server
    slow = [_slow_body(port) for _ in range(2 * SLOTS)]
    try:
        time.sleep(0.2)
        for s in slow:
            s.sendall(b" ")  # still sending, one byte at a time
        same = {"a": {"embedding": [1.0] * 128}, "b": {"embedding": [1.0] * 128}}
        assert httpx.post(f"{base}/verify", json=same, timeout=5).status_code == 200
        started = time.monotonic()
        answers = [_until_closed(s) for s in slow]
        assert all(a.startswith(b"HTTP/1.1 408") and b"request_timeout" in a for a in answers), answers
        assert time.monotonic() - started < BODY_TIMEOUT_S + 2
    finally:
        for s in slow:
            s.close()


def test_slow_headers_are_cut_off(server):
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        started, closed = time.monotonic(), False
        while not closed and time.monotonic() - started < HEADER_TIMEOUT_S + 3:  # one header line per 0.2 s
            try:
                s.sendall(b"X-Slow: 1\r\n")
                s.settimeout(0.2)
                closed = s.recv(4096) == b""
            except TimeoutError:
                continue
            except OSError:  # reset: closed as well
                closed = True
        assert closed and time.monotonic() - started < HEADER_TIMEOUT_S + 1


def _get_healthz(s: socket.socket) -> bytes:
    """One whole response (status line, headers, Content-Length bytes of body) read off a kept-alive socket."""
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(4096)
    return head


def test_an_idle_keep_alive_connection_lasts_the_keep_alive_allowance_then_closes(server):
    """Idle past the header deadline but within keep_alive_s, the connection still serves (a balancer's
    pooled connection is not reset under it); idle past keep_alive_s + header_timeout_s, it is closed."""
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert _get_healthz(s).startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_TIMEOUT_S + 0.5)  # < KEEP_ALIVE_S
        assert _get_healthz(s).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        s.settimeout(KEEP_ALIVE_S + HEADER_TIMEOUT_S + 2)
        assert s.recv(4096) == b""  # closed by the server, not by this client's timeout
        assert time.monotonic() - started < KEEP_ALIVE_S + HEADER_TIMEOUT_S + 1
