"""Hostile clients against a real uvicorn server on loopback (issue 11): what a test client cannot show."""
from __future__ import annotations

import logging
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from tests.helpers import drop_keys, free_port, make_settings

MAX_BODY = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def server(redis_available):
    """The app under uvicorn in a thread; uvicorn's loggers propagate (log_config=None) so caplog sees them."""
    settings = make_settings(max_body_bytes=MAX_BODY)
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start within 60 s"
    yield f"http://127.0.0.1:{port}", port
    srv.should_exit = True
    thread.join(30)
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
