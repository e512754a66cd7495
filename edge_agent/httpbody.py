"""Request bodies for the agent's and HQ's HTTP servers, read only once their length is known to be sane.

``http.server`` leaves the body to the handler, and ``rfile.read(int(Content-Length))`` trusts the
client twice: a length of -1 reads until the client stops sending (300 MB streamed took the agent
from 86 to 390 MB), and a body cut short comes back as it is, as if it were whole. Here:

- no Content-Length: 411; a Transfer-Encoding (chunked) body is not read either: 411, saying why;
- a length that is not plain decimal digits, or two different lengths: 400; over the limit: 413.
  All three are answered before a byte of the body is read, and the connection is then closed after
  a short lingering read, so a client still sending gets its answer instead of a reset;
- the body must arrive whole within ``BODY_TIMEOUT_S`` (one deadline for all of it, so trickling a
  byte at a time cannot hold a server thread): if it stops short, 400;
- a client that goes away mid-request costs one log line (the agent and HQ log structured JSON
  lines), never a traceback.

``HeadersInTime`` does for the request line and headers what the body deadline does for the body: all of
them within ``HEADER_TIMEOUT_S`` of the connection, or it is closed. The handler's per-read socket timeout
alone lets a client send a byte every few seconds and hold a server thread for as long as it likes.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

log = logging.getLogger(__name__)

BODY_TIMEOUT_S = 10.0
HEADER_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 5.0
LINGER_S = 1.0
LINGER_BYTES = 1 << 20
_DIGITS = re.compile(r"[0-9]+")  # int() would also take "-1", "+5", " 5", "5_0" and non-ASCII digits
_CHUNK = 64 * 1024

Reply = Callable[[int, str], None]


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _Short(Exception):
    def __init__(self, got: int, want: int, why: str, gone: bool) -> None:
        super().__init__(f"body incomplete: {got} of {want} bytes, {why}")
        self.gone = gone


class HeadersInTime(BaseHTTPRequestHandler):
    """A request handler whose request line and headers must arrive within ``HEADER_TIMEOUT_S``."""

    def setup(self) -> None:
        super().setup()
        self._headers_due = threading.Timer(HEADER_TIMEOUT_S, self._headers_late)
        self._headers_due.daemon = True
        self._headers_due.start()

    def parse_request(self) -> bool:  # reads the headers; called once the request line is in
        ok = super().parse_request()
        self._headers_due.cancel()
        return ok

    def finish(self) -> None:
        self._headers_due.cancel()
        super().finish()

    def _headers_late(self) -> None:
        log.info("HTTP from %s: request line and headers not in within %g s; connection closed",
                 self.client_address[0], HEADER_TIMEOUT_S)
        try:
            self.connection.shutdown(socket.SHUT_RDWR)  # the blocked read returns, the handler ends
        except OSError:
            pass


def read_body(handler: BaseHTTPRequestHandler, limit: int, reply: Reply) -> bytes | None:
    """The request's body; or None once the request has been answered with an error through ``reply``
    (status, reason), or its client has gone. Either way the connection is closed afterwards."""
    where = f"{handler.command} {handler.path.split('?')[0][:200]} from {handler.client_address[0]}"
    try:
        return _read(handler, _length(handler, limit))
    except _Refused as e:
        refuse(handler, e.status, str(e), reply)
    except _Short as e:
        handler.close_connection = True
        gone = e.gone or _answer(handler, reply, 400, str(e))
        log.info("HTTP %s: %s; %s", where, e, "the client had gone" if gone else "answered 400")
    return None


def refuse(handler: BaseHTTPRequestHandler, status: int, reason: str, reply: Reply) -> None:
    """Answer a request whose body will not be read (too long, unauthorised, ...), then close its
    connection after a short lingering read, so a client still sending sees the answer, not a reset."""
    where = f"{handler.command} {handler.path.split('?')[0][:200]} from {handler.client_address[0]}"
    handler.close_connection = True
    gone = _answer(handler, reply, status, reason)
    if not gone:
        _linger(handler.connection)
    log.info("HTTP %s: %d, %s%s", where, status, reason, "; the client had gone" if gone else "")


def _length(handler: BaseHTTPRequestHandler, limit: int) -> int:
    headers = handler.headers
    if headers.get("Transfer-Encoding") is not None:
        raise _Refused(411, "Transfer-Encoding bodies are not read; send Content-Length")
    values = {v.strip() for v in headers.get_all("Content-Length") or ()}
    if not values:
        raise _Refused(411, "Content-Length required")
    if len(values) > 1:
        raise _Refused(400, "conflicting Content-Length headers")
    raw = values.pop()
    if not _DIGITS.fullmatch(raw):
        raise _Refused(400, f"Content-Length {raw[:40]!r} is not a length")
    if len(raw) > 18 or int(raw) > limit:  # 18 digits: no int() of a megabyte of them
        raise _Refused(413, f"a body of {raw[:40]} bytes is over the limit of {limit}")
    return int(raw)


def _read(handler: BaseHTTPRequestHandler, n: int) -> bytes:
    deadline = time.monotonic() + BODY_TIMEOUT_S
    parts: list[bytes] = []
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            handler.connection.settimeout(left)
            chunk = handler.rfile.read1(min(n - got, _CHUNK))
        except TimeoutError:
            raise _Short(got, n, f"not sent within {BODY_TIMEOUT_S:g} s", gone=False) from None
        except OSError as e:
            raise _Short(got, n, f"connection lost ({e.strerror or e})", gone=True) from None
        if not chunk:
            raise _Short(got, n, "the client stopped sending", gone=False)
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _answer(handler: BaseHTTPRequestHandler, reply: Reply, status: int, reason: str) -> bool:
    """Send the error; True if the client had already gone."""
    try:
        handler.connection.settimeout(REPLY_TIMEOUT_S)
        reply(status, reason)
        return False
    except OSError:
        return True


def _linger(sock: socket.socket) -> None:
    """Discard, for a moment, what the client is still sending: closing a socket with unread data resets
    the connection, and a client still busy sending would see the reset instead of the answer."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_S
        left = LINGER_BYTES
        while left > 0 and (wait := deadline - time.monotonic()) > 0:
            sock.settimeout(wait)
            data = sock.recv(min(left, _CHUNK))
            if not data:
                return
            left -= len(data)
    except OSError:
        pass
