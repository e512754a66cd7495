"""The recording: one JSON object per line, in the order the agent took the inputs in.

Every line has ``kind`` and ``t`` (when the input arrived, on the recording agent's clock). The kinds:

- ``start``: the first line: format version, store, agent version.
- ``reader``: one raw reader payload as a source handed it to the RFID intake (``source``, ``reader``).
- ``command``: one HQ command as the downlink received it (topic and payload).
- ``ap.http``: one request the agent made to a label access point and what came back (``body``, or the
  ``error`` the adapter raised); ``ap.push``: one message the access point pushed on its websocket.
- ``tracks``: the people a camera's tracker reported in one frame: frame time ``ts`` and per person
  ``[track id, x1, y1, x2, y2, score]``, numbers only; ``camera.done``: the camera's stream ended.

No image ever goes into a recording: a frame never leaves its camera process, and ``tracks`` admits
numbers and nothing else (``extra="forbid"``). Byte payloads are kept as text when they are UTF-8 and
as base64 otherwise. A file whose name ends in ``.gz`` is gzip-compressed.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Annotated, Literal, Union
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..clock import Clock

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TrackRow = tuple[int, float, float, float, float, float]  # id, x1, y1, x2, y2, score


class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    t: float


class _Bytes(_Line):
    """Raw bytes: ``text`` when they are UTF-8, else ``b64``."""

    text: str | None = None
    b64: str | None = None

    @property
    def data(self) -> bytes:
        return self.text.encode() if self.text is not None else base64.b64decode(self.b64 or "")

    @staticmethod
    def keep(data: bytes | str) -> dict[str, str]:
        if isinstance(data, str):
            return {"text": data}
        try:
            return {"text": data.decode()}
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(data).decode()}


class Start(_Line):
    kind: Literal["start"] = "start"
    v: Literal[1] = FORMAT_VERSION
    store: str
    agent: str


class ReaderPayload(_Bytes):
    kind: Literal["reader"] = "reader"
    source: str
    reader: str | None = None


class HqCommand(_Bytes):
    kind: Literal["command"] = "command"
    topic: str
    size: int


class ApHttp(_Bytes):
    kind: Literal["ap.http"] = "ap.http"
    ap: str
    method: Literal["GET", "POST"]
    path: str
    error: str | None = None  # the request failed with this (no body)


class ApPush(_Bytes):
    kind: Literal["ap.push"] = "ap.push"
    ap: str


class Tracks(_Line):
    kind: Literal["tracks"] = "tracks"
    camera: str
    ts: float
    tracks: list[TrackRow]


class CameraDone(_Line):
    kind: Literal["camera.done"] = "camera.done"
    camera: str


Entry = Annotated[Union[Start, ReaderPayload, HqCommand, ApHttp, ApPush, Tracks, CameraDone],  # noqa: UP007
                  Field(discriminator="kind")]
_ENTRY: TypeAdapter[Entry] = TypeAdapter(Entry)


class RecordingError(ValueError):
    pass


def _open(path: Path, mode: Literal["r", "w"]) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8")


def without_credentials(url: str) -> str:
    """An access point's URL as recorded: user and password taken out of it."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))) \
        if parts.hostname else url


class Recorder:
    """Writes a recording; every method may be called from any thread. Each line is flushed as written, so a
    recording cut short by a crash is readable up to its last whole line."""

    def __init__(self, path: Path, clock: Clock, store: str, agent: str) -> None:
        self.path = path
        self.clock = clock
        self._f = _open(path, "w")
        self._lock = threading.Lock()
        self.lines = 0
        self.write(Start(t=clock.now(), store=store, agent=agent))

    def write(self, entry: _Line) -> None:
        """Never raises: the taps run on the agent's input paths, and a recording must not break them."""
        line = entry.model_dump_json(exclude_none=True)
        with self._lock:
            if self._f.closed:
                return  # an input arriving while the agent stops, after the recording ended
            try:
                self._f.write(line + "\n")
                self._f.flush()
            except OSError as e:  # a full disk: the store goes on, the recording ends here
                log.error("recording %s stopped after %d lines: %s", self.path, self.lines, e)
                with contextlib.suppress(OSError):
                    self._f.close()
                return
            self.lines += 1

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._f.close()

    # ------------------------------------------------------------ taps

    def reader(self, payload: bytes, source: str, reader: str | None) -> None:
        self.write(ReaderPayload(t=self.clock.now(), source=source, reader=reader, **_Bytes.keep(payload)))

    def command(self, topic: str, payload: bytes, size: int) -> None:
        self.write(HqCommand(t=self.clock.now(), topic=topic, size=size, **_Bytes.keep(payload)))

    def ap_http(self, ap: str, method: Literal["GET", "POST"], path: str, body: bytes | None,
                error: str | None) -> None:
        self.write(ApHttp(t=self.clock.now(), ap=without_credentials(ap), method=method, path=path, error=error,
                          **(_Bytes.keep(body) if body is not None else {})))

    def ap_push(self, ap: str, message: bytes | str) -> None:
        self.write(ApPush(t=self.clock.now(), ap=without_credentials(ap), **_Bytes.keep(message)))

    def tracks(self, camera: str, ts: float, rows: Sequence[Sequence[float]]) -> None:
        self.write(Tracks(t=self.clock.now(), camera=camera, ts=ts, tracks=[tuple(r) for r in rows]))  # type: ignore[misc]

    def camera_done(self, camera: str) -> None:
        self.write(CameraDone(t=self.clock.now(), camera=camera))


def read_recording(path: Path) -> Iterator[Entry]:
    """The entries of a recording, validated; a bad line raises RecordingError with its number."""
    with _open(path, "r") as f:
        first = True
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = _ENTRY.validate_json(line)
            except ValidationError as e:
                raise RecordingError(f"{path}:{n}: {e}") from e
            if first and not isinstance(entry, Start):
                raise RecordingError(f"{path}:{n}: not a recording (its first line must be kind \"start\")")
            first = False
            yield entry
        if first:
            raise RecordingError(f"{path}: empty, not a recording")
