"""Hostile request bodies on the agent's RFID intake (POST /rfid/events) and HQ's POST /cmd, over real
HTTP on 127.0.0.1 with raw sockets (http.client will not send a negative length). Each case gets its
status before the server reads a body it should not, memory stays put, and the server keeps serving."""

from __future__ import annotations

import json
import logging
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from edge_agent import httpbody
from edge_agent.config import ReaderHttpConfig
from edge_agent.hq.api import token_hash
from edge_agent.rfid.sources import MAX_PAYLOAD, HttpReaderSource, ReaderIntake
from simulators.mosquitto import Mosquitto, free_port

from .helpers import start_hq, wait_for
from .test_rfid_pipeline import EPCS, T0, generic, make

READER_TOKEN = "rdr-canary-4c1f9e-hardening"  # a canary: tests/conftest.py fails the run if a log shows it


@dataclass
class Server:
    port: int
    path: str
    limit: int
    good: bytes  # a body the server accepts with 202
    auth: tuple[str, ...] = ()  # the headers a write needs besides its body's: a token, JSON


@pytest.fixture(params=["agent", "hq"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    if request.param == "agent":
        _clock, ob, _book, pipe = make(tmp_path)
        intake = ReaderIntake(pipe, maxsize=100, tick_s=3600)
        src = HttpReaderSource(ReaderHttpConfig(enabled=True, port=0, tokens={"r1": token_hash(READER_TOKEN)}), intake)
        intake.start()
        src.start()
        yield Server(src.port, "/rfid/events", MAX_PAYLOAD, json.dumps([generic(EPCS[0], 1, T0)]).encode(),
                     (f"Authorization: Bearer {READER_TOKEN}", "Content-Type: application/json"))
        src.stop()
        intake.stop()
        ob.close()
    else:
        broker: Mosquitto = request.getfixturevalue("broker")
        hq = start_hq(tmp_path, broker.port, http_port=free_port(), api_tokens={"tester": token_hash("t0ken")})
        assert hq.http is not None
        with hq.db.tx() as c:  # a store HQ knows, so a command to it is taken
            c.execute("INSERT INTO status(store, state, at) VALUES ('S001', 'online', 0)")
        yield Server(hq.http.server_address[1], "/cmd", 1 << 20,
                     json.dumps({"store": "S001", "name": "inventory.resync", "args": {"reason": "test"}}).encode(),
                     ("Authorization: Bearer t0ken", "Content-Type: application/json"))
        hq.stop()


def head(srv: Server, *headers: str) -> bytes:
    return "\r\n".join([f"POST {srv.path} HTTP/1.1", "Host: 127.0.0.1", *srv.auth, *headers, "", ""]).encode()


def status(reply: bytes) -> int | None:
    parts = reply.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def read_reply(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def exchange(srv: Server, data: bytes, *, half_close: bool = True) -> int | None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return status(read_reply(s))


CASES = [
    ("no length", (), b"[]", 411),
    ("negative", ("Content-Length: -1",), b"[]", 400),
    ("not a number", ("Content-Length: ten",), b"[]", 400),
    ("signed", ("Content-Length: +2",), b"[]", 400),
    ("two lengths", ("Content-Length: 2", "Content-Length: 3"), b"[]", 400),
    ("chunked", ("Transfer-Encoding: chunked",), b"2\r\n[]\r\n0\r\n\r\n", 411),
    ("absurd", ("Content-Length: 99999999999999999999999999",), b"[]", 413),
    ("truncated", ("Content-Length: 100",), b"[1,2,3]", 400),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_bad_body_gets_its_status(server: Server, case: tuple) -> None:
    _name, headers, body, want = case
    assert exchange(server, head(server, *headers) + body) == want
    good = head(server, f"Content-Length: {len(server.good)}") + server.good
    assert exchange(server, good) == 202  # and the server keeps serving


def test_over_the_limit_is_refused_before_the_body_is_read(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head(server, f"Content-Length: {server.limit + 1}"))  # the body is never sent
        assert status(read_reply(s)) == 413


def test_a_negative_length_streamed_at_the_server_costs_it_no_memory(server: Server) -> None:
    """What the audit did with 300 MB; 64 MB make the point: the old server read until the client stopped."""
    me = psutil.Process()
    rss = me.memory_info().rss
    total, sent, reply = 64 << 20, 0, b""
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head(server, "Content-Length: -1"))
        while sent < total:
            readable, writable, _ = select.select([s], [s], [], 10)
            if readable:
                break  # the answer has come: stop sending, as a client should
            try:
                sent += s.send(chunk)
            except OSError:
                break
        try:
            reply = read_reply(s)
        except ConnectionResetError:
            pass
    assert status(reply) == 400, reply[:200]
    assert sent < 8 << 20, f"{sent} bytes taken before the answer"
    assert me.memory_info().rss - rss < 16 << 20
    assert exchange(server, head(server, f"Content-Length: {len(server.good)}") + server.good) == 202


def test_a_body_that_stops_coming_times_out_with_400(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpbody, "BODY_TIMEOUT_S", 0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(head(server, "Content-Length: 100") + b"[1,2,3]")  # and then nothing, the socket left open
        assert status(read_reply(s)) == 400
        assert 0.4 < time.monotonic() - t0 < 5


def test_a_client_gone_mid_body_is_one_log_line_not_a_traceback(
    server: Server, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.INFO, logger="edge_agent.httpbody"):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(head(server, "Content-Length: 1000") + b"[1,2,")
        time.sleep(0.2)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        s.close()
        wait_for(lambda: any(r.name == "edge_agent.httpbody" for r in caplog.records), 5, "the log line")
        time.sleep(0.3)
        assert exchange(server, head(server, f"Content-Length: {len(server.good)}") + server.good) == 202
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_agent.httpbody"]
    assert len(lines) == 1 and "5 of 1000 bytes" in lines[0], lines
    assert "Traceback" not in capfd.readouterr().err


def test_headers_trickled_a_byte_at_a_time_are_cut_off(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each byte within the socket timeout, the whole never done: closed at the header deadline, so a
    client cannot hold a server thread for ever; the server keeps serving."""
    monkeypatch.setattr(httpbody, "HEADER_TIMEOUT_S", 1.0)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST {server.path} HTTP/1.1\r\n".encode())
        t0 = time.monotonic()
        closed = False
        while not closed and time.monotonic() - t0 < 8:
            try:
                s.sendall(b"X")  # a header that never ends, one byte every 0.2 s
                s.settimeout(0.2)
                closed = s.recv(1024) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
        took = time.monotonic() - t0
    assert closed and 0.8 < took < 4, took
    assert exchange(server, head(server, f"Content-Length: {len(server.good)}") + server.good) == 202
