"""Wiring: sources -> engines -> outbox -> uplink, commands -> downlink -> handlers."""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Protocol

from ulid import ULID

from . import __version__
from .authenticity import downlink_check, store_signer
from .clock import Clock, RealClock
from .config import AgentConfig
from .contract import Command, CycleCountArgs, InventoryResyncArgs
from .health import HealthReporter
from .inventory.book import DELTA_STREAM, InventoryBook
from .service.notify import Notifier
from .service.reload import reload
from .sources.simulated_inventory import SimulatedInventorySource
from .status.server import StatusServer
from .status.snapshot import StatusSource
from .supervise import Backoff, Supervisor
from .sync.diskstate import WriteFailed
from .sync.downlink import CommandRejected, Downlink
from .sync.outbox import Outbox, SealedMessage
from .sync.uplink import Uplink

if TYPE_CHECKING:
    from .esl.service import EslService
    from .rfid.pipeline import RfidPipeline
    from .vision.service import VisionService

log = logging.getLogger(__name__)

# After SIGTERM, at most this long is spent flushing to HQ (what is left stays in the outbox for the next
# start), so the agent is gone within the 10 s a container engine gives before SIGKILL: the offline status
# takes up to 2 s more on a dead link, and the rest is for the sources, threads and interpreter of a busy box.
STOP_FLUSH_S = 3.0


class Startable(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


class Agent:
    def __init__(self, cfg: AgentConfig, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock = clock or RealClock()
        self.boot_id = str(ULID())
        signer = store_signer(cfg.signing, cfg.store.id)
        check = downlink_check(cfg.signing)
        self.outbox = self._open_outbox(sign=signer.sealed if signer else None)
        self.book = InventoryBook(self.outbox, self.clock)
        self.uplink = Uplink(
            cfg.mqtt,
            cfg.store.id,
            self.outbox,
            self.clock,
            windows=cfg.outbox,
            boot_id=self.boot_id,
            agent_version=__version__,
            on_rewind=self._on_rewind,
            check_ack=check,
            sign_status=signer.raw if signer else None,
        )
        self.downlink = Downlink(cfg.store.id, cfg.mqtt.topic_prefix, self.outbox, self.clock, check=check)
        self.downlink.register("inventory.resync", self._resync)
        self.downlink.register("replay", lambda _cmd, args: self.uplink.replay(args.stream, args.from_seq))
        self.uplink.subscribe(self.downlink.topic, self.downlink.on_message)
        self.health = HealthReporter(
            self.outbox,
            self.clock,
            cfg.health.interval_s,
            connected=lambda: self.uplink.connected,
            extra=self._figures,
            timezone=cfg.store.timezone,
        )
        self.sources: list[Startable] = []
        if cfg.sources.simulated_inventory.enabled:
            self.sources.append(SimulatedInventorySource(cfg.sources.simulated_inventory, self.book, self.clock))
        self.rfid: RfidPipeline | None = None
        if cfg.rfid.enabled:
            self._wire_rfid()
        self.vision: VisionService | None = None
        if cfg.vision.enabled and cfg.vision.cameras:
            from .vision.service import VisionService

            self.vision = VisionService(cfg.vision, self.outbox)
            self.sources.append(self.vision)
        self.esl: EslService | None = None
        if cfg.esl.enabled:
            self._wire_esl()
        sc = cfg.supervision
        self.supervisor = Supervisor([c for s in self.sources for c in getattr(s, "supervised", ())],
                                     Backoff(sc.restart_min_s, sc.restart_max_s, sc.stable_s), self.outbox.alert)
        self.notifier = Notifier()
        self._stop = threading.Event()
        self._housekeeper = threading.Thread(target=self._housekeep, name="housekeeper", daemon=True)
        self.heartbeat = time.monotonic()  # the main loop's last round: /healthz
        self.status: StatusServer | None = None
        if cfg.status.enabled:
            self.status = StatusServer(cfg.status, StatusSource(self))

    def _open_outbox(self, sign: Callable[[SealedMessage], str] | None) -> Outbox:
        """The outbox, once the disk lets SQLite open it (it needs room for its WAL and shared-memory files):
        a box that boots with its disk full waits for space, as a running agent does, instead of exiting."""
        oc = self.cfg.outbox
        first: tuple[float, str, str] | None = None  # when, kind, SQLite's words
        attempts = 0
        while True:
            try:
                outbox = Outbox(oc.path, self.clock, cap_bytes=oc.cap_bytes, max_message_bytes=oc.max_message_bytes,
                                synchronous=oc.synchronous, quarantine_keep=oc.quarantine_keep, sign=sign)
            except WriteFailed as e:
                if first is None:
                    first = (self.clock.now(), e.kind, str(e.__cause__))
                    log.error("outbox %s cannot be opened (%s): waiting for the disk", oc.path, e)
                attempts += 1
                time.sleep(1.0)
                continue
            if first is not None:
                # The wait is an episode like any other: the first commit reports it.
                began, kind, error = first
                outbox.disk.refused(kind, began, f"could not open the database: {error}", attempts)
            return outbox

    def _wire_rfid(self) -> None:
        from .rfid.pipeline import RfidPipeline
        from .rfid.sources import HttpReaderSource, MqttReaderSource, ReaderIntake

        rc = self.cfg.rfid
        self.rfid = RfidPipeline(rc, self.book, self.outbox, self.clock)
        self.rfid_intake = ReaderIntake(self.rfid, rc.queue_max, rc.tick_s)
        self.sources.append(self.rfid_intake)
        if rc.mqtt.enabled:
            self.sources.append(MqttReaderSource(rc.mqtt, self.rfid_intake, self.cfg.store.id))
        if rc.http.enabled:
            self.rfid_http = HttpReaderSource(rc.http, self.rfid_intake)
            self.sources.append(self.rfid_http)
        if rc.llrp:
            from .rfid.llrp import LlrpReaderSource

            for r in rc.llrp:
                self.sources.append(
                    LlrpReaderSource(r.host, self.rfid_intake.submit, port=r.port, name=r.name, antennas=r.antennas)
                )
        self.downlink.register("rfid.cycle_count", self._cycle_count)

    def _wire_esl(self) -> None:
        from .esl.group import ControllerGroup
        from .esl.openepaperlink import OpenEPaperLinkController
        from .esl.service import EslService

        ec = self.cfg.esl
        controller = ControllerGroup([OpenEPaperLinkController(u, timeout=ec.timeout_s) for u in ec.urls])
        self.esl = EslService(ec, controller, self.outbox, self.clock, stock=self.book.levels)
        self.sources.append(self.esl)
        self.downlink.register("price.set", self.esl.price_set)
        self.downlink.register("esl.bind", self.esl.bind)
        self.downlink.register("esl.flash", self.esl.flash)
        if self.rfid is not None and self.cfg.rfid.catalogue == "price_book":  # what HQ priced is what it sells
            self.rfid.catalogue = self.esl.book

    def _cycle_count(self, cmd: Command, args: CycleCountArgs) -> dict:  # type: ignore[override]
        assert self.rfid is not None
        try:
            c = self.rfid.start_count(args.zone, args.duration_s)
        except ValueError as e:
            raise CommandRejected(str(e)) from e
        return {"count_id": c.count_id, "zone": c.zone, "book_before": len(c.book_before), "ends": c.ends}

    def _figures(self) -> dict[str, float]:
        figures = self.uplink.figures()
        figures["outbox.writes_refused"] = self.outbox.disk.refused_total
        figures.update(self.supervisor.figures())
        if self.vision is not None:
            figures.update(self.vision.figures)
        if self.esl is not None:
            figures.update(self.esl.figures())
        if self.rfid is not None:
            figures.update(self.rfid.health())
            figures["rfid.intake_dropped"] = self.rfid_intake.dropped
        return figures

    def _resync(self, cmd: Command, args: InventoryResyncArgs) -> dict:  # type: ignore[override]
        info = self.book.snapshot(reason=f"resync {cmd.id}: {args.reason}")
        log.info("inventory resync %s: snapshot %s as of seq %d in %d parts", cmd.id, info.snapshot_id,
                 info.as_of_seq, info.parts)
        return {"snapshot_id": info.snapshot_id, "as_of_seq": info.as_of_seq, "parts": info.parts, "keys": info.keys}

    def _on_rewind(self, stream: str) -> None:
        """HQ applied inventory this outbox no longer has (see Outbox._rewind): send HQ the whole book."""
        if stream == DELTA_STREAM:
            info = self.book.snapshot(reason="rewind: HQ is ahead of this outbox")
            log.warning("outbox went back in time; snapshot %s as of seq %d sent", info.snapshot_id, info.as_of_seq)

    def _housekeep(self) -> None:
        interval = self.cfg.outbox.cap_check_interval_s
        forced = float("-inf")
        while not self._stop.wait(interval):
            self.heartbeat = time.monotonic()  # /healthz
            self.notifier.watchdog()  # every round that comes round, whatever it meets: the loop is alive
            try:
                # What the cap compacted or dropped goes to HQ at once, but a cap that keeps working (an
                # outage of undroppable facts) forces at most one extra health message per interval.
                now = time.monotonic()
                force = self.outbox.enforce_cap() is not None and now - forced >= self.health.interval_s
                if force:
                    forced = now
                self.health.tick(force=force)
            except WriteFailed:
                pass  # the next round tries again; the outbox logs the episode once
            except Exception:
                log.exception("housekeeping round failed")

    def start(self) -> None:
        log.info("edge-agent %s starting for store %s (boot %s)", __version__, self.cfg.store.id, self.boot_id)
        self.downlink.start()
        self.uplink.start()
        self._housekeeper.start()
        try:
            self.health.tick(force=True)
        except WriteFailed:
            pass  # the housekeeper tries again at every round
        for s in self.sources:
            s.start()
        self.supervisor.start()
        if self.status is not None:
            self.status.start()

    def stop(self, flush_timeout: float = 5.0) -> None:
        log.info("stopping: flushing for up to %.1fs", flush_timeout)
        self.notifier.stopping()
        if self.status is not None:
            self.status.stop()
        self.supervisor.stop()  # first: a source stopping is not one dying
        for s in self.sources:
            s.stop()
        self._stop.set()
        self._housekeeper.join(5)
        self.downlink.stop()
        drained = self.uplink.stop(flush_timeout)
        self.outbox.close()
        log.info("stopped (%s)", "outbox drained" if drained else "facts left in the outbox for next start")

    def run_until_signalled(self, reread: Callable[[], AgentConfig]) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP re-reads the config with ``reread`` (service/reload.py)."""
        signals: queue.SimpleQueue[int] = queue.SimpleQueue()  # put() is safe in a signal handler

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            signals.put(signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        self.start()
        self.notifier.ready("running")
        while (signum := signals.get()) == signal.SIGHUP:
            log.info("received SIGHUP: reloading the config")
            reload(self, reread)
        log.info("received %s", signal.Signals(signum).name)
        self.stop(STOP_FLUSH_S)
