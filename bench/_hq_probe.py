"""The reference HQ receiver (edge_agent.hq.receiver.HqReceiver, as run by ``edge-agent hq``), plus an
on_applied callback that records every applied message, for the latency benchmark.

Usage: python bench/_hq_probe.py HQ_CONFIG OUT_FILE     (stops on SIGTERM/SIGINT)

One line per applied message: ``stream seq facts ts at done`` where ts is the message's fact time
(Applied.ts), at is Applied.at (taken inside the apply transaction) and done is time.time() when the
callback runs, i.e. after the transaction committed. All are wall-clock epoch seconds.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.config import HqFileConfig, load_config  # noqa: E402
from edge_agent.hq.applier import Applied  # noqa: E402
from edge_agent.hq.receiver import HqReceiver  # noqa: E402
from edge_agent.logs import setup_logging  # noqa: E402


def main() -> int:
    cfg = load_config(sys.argv[1], model=HqFileConfig)
    setup_logging(cfg.log.level)
    lines: list[str] = []

    def on_applied(a: Applied) -> None:
        done = time.time()
        lines.append(f"{a.stream} {a.seq} {a.facts} {a.ts!r} {a.at!r} {done!r}\n")

    rx = HqReceiver(cfg, on_applied=on_applied)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    rx.start()
    stop.wait()
    rx.stop()
    with open(sys.argv[2], "w") as f:
        f.writelines(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
