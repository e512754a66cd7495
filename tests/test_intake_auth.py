"""Hostile LAN: the RFID HTTP intake (POST /rfid/events) over real HTTP on 127.0.0.1, with reader tokens.

Requests without a token, with a wrong one, for another reader, with a wrong content type, and the
Content-Length tricks of tests/test_http_hardening.py: each gets its status, and nothing of theirs is
ingested: a good POST sent after all of them is the only one the pipeline ever sees (one worker drains the
intake in order, so anything taken in before it would have been seen first)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.config import ReaderHttpConfig
from edge_agent.rfid.pipeline import RfidPipeline
from edge_agent.rfid.sources import HttpReaderSource, ReaderIntake, needs_token
from edge_agent.sync.outbox import Outbox
from edge_agent.tokens import token_hash

from .helpers import wait_for
from .test_http_hardening import CASES, Server, exchange, head, read_reply, status
from .test_rfid_pipeline import EPCS, T0, generic, make

TOKEN = "rdr-canary-9a4d27-intake"  # canaries: tests/conftest.py fails the run if a log line shows one
OTHER = "rdr-canary-5e0c83-intake"
BEARER = f"Authorization: Bearer {TOKEN}"
JSON = "Content-Type: application/json"


def basic(user: str, password: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def intake(tmp_path: Path) -> Iterator[tuple[Server, RfidPipeline, Outbox]]:
    _clock, ob, _book, pipe = make(tmp_path)
    q = ReaderIntake(pipe, maxsize=100, tick_s=3600)
    src = HttpReaderSource(ReaderHttpConfig(enabled=True, port=0,
                                            tokens={"r1": token_hash(TOKEN), "r2": token_hash(OTHER)}), q)
    q.start()
    src.start()
    yield Server(src.port, "/rfid/events", 8 << 20, json.dumps([generic(EPCS[0], 1, T0)]).encode()), pipe, ob
    src.stop()
    q.stop()
    ob.close()


def post(srv: Server, *headers: str, body: bytes | None = None, path: str = "/rfid/events") -> bytes:
    body = srv.good if body is None else body
    srv_path = Server(srv.port, path, srv.limit, srv.good)
    return head(srv_path, f"Content-Length: {len(body)}", *headers) + body


HOSTILE = [
    ("no token", (JSON,), 401),
    ("a wrong token", ("Authorization: Bearer not-a-reader-token", JSON), 401),
    ("a token in the wrong scheme", (f"Authorization: Token {TOKEN}", JSON), 401),
    ("basic auth, wrong password", (basic("r1", "guess"), JSON), 401),
    ("basic auth, r1's token as r2", (basic("r2", TOKEN), JSON), 401),
    ("basic auth, no such reader", (basic("r9", TOKEN), JSON), 401),
    ("basic auth, not base64", ("Authorization: Basic %%%", JSON), 401),
    ("no content type", (BEARER,), 415),
    ("text/plain", (BEARER, "Content-Type: text/plain"), 415),
    ("a browser form", (BEARER, "Content-Type: application/x-www-form-urlencoded"), 415),
]


def test_hostile_requests_are_refused_and_nothing_is_ingested(intake: tuple[Server, RfidPipeline, Outbox]) -> None:
    srv, pipe, ob = intake
    for name, headers, want in HOSTILE:
        assert exchange(srv, post(srv, *headers)) == want, name
    # r1's token speaking for r2: the token's name is the reader.
    assert exchange(srv, post(srv, BEARER, JSON, path="/rfid/events?reader=r2")) == 403
    # The Content-Length tricks: without a token they are 401 before any length is looked at; with one,
    # each gets the status tests/test_http_hardening.py gives it.
    for name, headers, body, want in CASES:
        assert exchange(srv, head(srv, JSON, *headers) + body) == 401, name
        assert exchange(srv, head(srv, BEARER, JSON, *headers) + body) == want, name
    assert pipe.engine.reads_seen == 0 and ob.quarantined() == []
    # The fence: a good POST is taken in, and it is the only thing ever ingested.
    assert exchange(srv, post(srv, BEARER, JSON, path="/rfid/events?reader=r1")) == 202
    wait_for(lambda: pipe.engine.reads_seen >= 1, 10, "the good POST taken in")
    assert pipe.engine.reads_seen == 1 and ob.quarantined() == []


def test_each_way_a_reader_may_authenticate(intake: tuple[Server, RfidPipeline, Outbox]) -> None:
    srv, pipe, ob = intake
    assert exchange(srv, post(srv, BEARER, JSON)) == 202
    assert exchange(srv, post(srv, basic("r2", OTHER), "Content-Type: application/x-ndjson; charset=utf-8",
                              body=json.dumps(generic(EPCS[1], 1, T0, reader="r2")).encode())) == 202
    # r2 has no antenna mapped here: its read is taken in, then quarantined as such.
    wait_for(lambda: pipe.engine.reads_seen == 1 and len(ob.quarantined()) == 1, 10, "both POSTs taken in")
    assert "unknown antenna r2 port 1" in ob.quarantined()[0][2]


def test_a_401_challenges_for_basic_auth_and_reads_no_body(intake: tuple[Server, RfidPipeline, Outbox]) -> None:
    """Firmware that sends basic auth only when challenged needs the Basic challenge; the body (here 8 MB
    announced, none sent) is never waited for."""
    import socket

    srv, _pipe, _ob = intake
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(head(srv, JSON, f"Content-Length: {8 << 20}"))
        reply = read_reply(s)
    assert status(reply) == 401
    assert b'WWW-Authenticate: Basic realm="rfid-intake"' in reply and b"WWW-Authenticate: Bearer" in reply
    assert TOKEN.encode() not in reply


def test_who_needs_a_token() -> None:
    assert not needs_token(ReaderHttpConfig(host="127.0.0.1"))  # tools on the box itself
    assert not needs_token(ReaderHttpConfig(host="::1"))
    assert needs_token(ReaderHttpConfig(host="0.0.0.0"))  # the store LAN: refused without tokens
    assert needs_token(ReaderHttpConfig(host="10.1.2.3"))
    assert needs_token(ReaderHttpConfig(host="127.0.0.1", tokens={"r1": token_hash(TOKEN)}))


def test_the_reader_simulator_posts_with_each_readers_token(tmp_path: Path) -> None:
    """simulators/rfid_reader.py --http --token READER=TOKEN against the real intake: every payload of
    every reader is taken in; without the tokens its first POST is refused."""
    import urllib.error

    from simulators.rfid_reader import SimConfig, StoreSim, main

    sim = StoreSim(SimConfig(n_items=100, n_gtins=10))
    readers = sorted({a["reader"] for a in sim.layout()})
    tokens = {r: f"rdr-canary-{i:06x}-simulator" for i, r in enumerate(readers)}
    _clock, ob, _book, pipe = make(tmp_path, sim)
    q = ReaderIntake(pipe, maxsize=100, tick_s=3600)
    src = HttpReaderSource(ReaderHttpConfig(enabled=True, port=0, tokens={r: token_hash(t) for r, t in tokens.items()}), q)
    q.start()
    src.start()
    url = f"http://127.0.0.1:{src.port}/rfid/events"
    args = ["--items", "100", "--gtins", "10", "--hours", str(5 / 3600), "--http", url, "--quiet"]
    try:
        assert main(args + [f"--token={r}={t}" for r, t in tokens.items()]) == 0
        wait_for(lambda: pipe.engine.reads_seen > 0 and q._q.empty(), 20, "the simulator's reads taken in")
        with pytest.raises(urllib.error.HTTPError) as e:
            main(args)
        assert e.value.code == 401
    finally:
        src.stop()
        q.stop()
        ob.close()


def test_a_token_speaks_for_its_own_reader_only(intake: tuple[Server, RfidPipeline, Outbox]) -> None:
    """r1's token on a payload whose events name r2 (an Impinj hostname, a generic reader): accepted as a
    request, but the reads that name another reader are quarantined, never counted; r1's own are kept."""
    srv, pipe, ob = intake
    mixed = json.dumps([generic(EPCS[1], 1, T0, reader="r2"), generic(EPCS[0], 1, T0)]).encode()
    assert exchange(srv, post(srv, BEARER, JSON, body=mixed)) == 202
    wait_for(lambda: len(ob.quarantined()) == 1 and pipe.engine.reads_seen == 1, 10, "the payload taken in")
    (_at, source, reason, raw), = ob.quarantined()
    assert source == "rfid.http" and reason == "names reader 'r2' but came with reader 'r1''s token"
    assert json.loads(raw or b"{}")["epc"] == EPCS[1]

