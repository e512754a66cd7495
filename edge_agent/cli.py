"""The ``edge-agent`` command."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .config import AgentConfig, ConfigError, HqFileConfig, M, load_config, state_dir
from .contract import write_schemas
from .logs import setup_logging


def _report(e: ConfigError) -> int:
    for issue in e.issues:
        print(issue.render(e.path), file=sys.stderr)
    print(f"{len(e.issues)} error(s) in {e.path}", file=sys.stderr)
    return 2


def _check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file, warn=lambda m: print(f"warning: {m}", file=sys.stderr), state=args.state_dir)
    except ConfigError as e:
        return _report(e)
    print(f"relative paths resolve against {state_dir(args.file, args.state_dir)}")
    if cfg.rfid.epcis:
        from .rfid.epcis import EpcisEvents

        for zone, sgln in EpcisEvents.from_config(cfg.rfid).locations.items():
            print(f"rfid.epcis: zone {zone!r} -> {sgln}")
    print(f"{args.file}: ok")
    if cfg.rfid.enabled:
        from .rfid.setups import describe

        for note in describe(cfg.rfid):
            print(f"note: {note}")
    return 0


def _load_or_exit(path: str, model: type[M] = AgentConfig, state: str | None = None) -> M:  # type: ignore[assignment]
    try:
        return load_config(path, model=model, state=state)
    except ConfigError as e:
        sys.exit(_report(e))


def _run(args: argparse.Namespace) -> int:
    cfg = _load_or_exit(args.config, state=args.state_dir)
    setup_logging(cfg.log.level, coalesce_s=cfg.log.coalesce_s)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from .agent import Agent

    Agent(cfg).run_until_signalled(lambda: load_config(args.config, state=args.state_dir))
    return 0


def _install(args: argparse.Namespace) -> int:
    from .service.install import InstallError, install

    try:
        for line in install(Path(args.root), args.user, create_user=args.create_user):
            print(line)
    except InstallError as e:
        print(f"install: {e}", file=sys.stderr)
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    """What a running agent sees, from its status server: 0 ready, 1 not ready, 3 not answering."""
    from .status.terminal import fetch, render

    cfg = _load_or_exit(args.config, state=args.state_dir)
    if not args.url and (not cfg.status.enabled or cfg.status.port == 0):
        why = "status.enabled is false" if not cfg.status.enabled else "status.port is 0 (the agent logs its port)"
        print(f"{args.config}: {why}; give --url", file=sys.stderr)
        return 3
    host = "127.0.0.1" if cfg.status.host in ("0.0.0.0", "::") else cfg.status.host  # bound to all: ask loopback
    url = args.url or f"http://{f'[{host}]' if ':' in host else host}:{cfg.status.port}"
    try:
        s = fetch(url, cfg.status.token.get_secret_value() if cfg.status.token else None)
    except OSError as e:
        print(f"cannot read the agent's status at {url}: {e}", file=sys.stderr)
        return 3
    print(s.model_dump_json(indent=1) if args.json else render(s))
    return 0 if s.ready else 1


def _record(args: argparse.Namespace) -> int:
    cfg = _load_or_exit(args.config, state=args.state_dir)
    setup_logging(cfg.log.level, coalesce_s=cfg.log.coalesce_s)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from .replay.taps import record

    return record(cfg, Path(args.out), lambda: load_config(args.config, state=args.state_dir))


def _replay(args: argparse.Namespace) -> int:
    cfg = _load_or_exit(args.config)
    setup_logging(cfg.log.level, coalesce_s=cfg.log.coalesce_s)
    from .replay.player import replay_command

    return replay_command(cfg, Path(args.file), 0.0 if args.speed == "max" else float(args.speed),
                          Path(args.out) if args.out else None, Path(args.workdir) if args.workdir else None)


def _speed(v: str) -> str:
    if v != "max" and not float(v) >= 0:
        raise argparse.ArgumentTypeError("a number >= 0, or max")
    return v


def _hq(args: argparse.Namespace) -> int:
    cfg = _load_or_exit(args.config, HqFileConfig)
    if args.db:
        cfg = cfg.model_copy(update={"hq": cfg.hq.model_copy(update={"db_path": Path(args.db), "database": None})})
    if args.http_port is not None:
        cfg = cfg.model_copy(update={"hq": cfg.hq.model_copy(update={"http_port": args.http_port})})
    setup_logging(cfg.log.level, coalesce_s=cfg.log.coalesce_s)
    from .hq.receiver import HqReceiver

    rx = HqReceiver(cfg)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    # A service manager's reload must not kill the receiver (SIGHUP's default): nothing of HQ's is live.
    signal.signal(signal.SIGHUP, lambda *_: logging.getLogger("edge_agent.hq").warning(
        "SIGHUP: HQ reloads nothing while it runs; restart it to apply a changed config"))
    rx.start()
    done.wait()
    rx.stop()
    return 0


def _schema(args: argparse.Namespace) -> int:
    for p in write_schemas(Path(args.out)):
        print(p)
    return 0


def _epcis_export(args: argparse.Namespace) -> int:
    """An EPCISDocument of one store's events in [--from, --to), from HQ's store of what it applied."""
    import json
    import math
    import time

    from .clock import parse_rfc3339
    from .hq.store import open_store
    from .rfid.epcis import document

    cfg = _load_or_exit(args.config, HqFileConfig)
    hq = cfg.hq.model_copy(update={"db_path": Path(args.db), "database": None}) if args.db else cfg.hq
    if hq.database is None and not hq.db_path.exists():
        print(f"no HQ database at {hq.db_path}", file=sys.stderr)
        return 1
    try:
        since, until = parse_rfc3339(args.since) if args.since else 0.0, parse_rfc3339(args.until) if args.until else math.inf
    except ValueError as e:
        print(f"--from/--to must be RFC 3339 times: {e}", file=sys.stderr)
        return 2
    store = open_store(hq)
    events, _ = store.epcis_events(args.store, since, until)
    doc = document(events, time.time())
    store.close()
    text = json.dumps(doc, indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"{args.out}: {len(doc['epcisBody']['eventList'])} events", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from pydantic import TypeAdapter, ValidationError

    from .contract import StoreId
    from .signing import write_keypair

    name = args.name or "hq"
    try:
        TypeAdapter(StoreId).validate_python(name)  # a file name, a TOML key and a topic level
        key, pub, text = write_keypair(Path(args.out), name)
    except ValidationError:
        print(f"--name {name!r}: a store id is 1-64 letters, digits, '-' or '_'", file=sys.stderr)
        return 2
    except OSError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"# wrote {key} (private, 0600) and {pub}", file=sys.stderr)
    if args.name:
        print("# for HQ's [hq.signing.keys] table or its hq.signing.keys_file:", file=sys.stderr)
        print(f'{name} = "{text}"')
    else:
        print("# for the [signing] table of every store:", file=sys.stderr)
        print(f'hq_public_key = "{text}"')
    return 0


def _hq_token(args: argparse.Namespace) -> int:
    """A new API token for HQ's write endpoints: the token once on stderr (HQ never stores it), the
    hash line for hq.api_tokens or hq.api_tokens_file on stdout."""
    from pydantic import TypeAdapter, ValidationError

    from .config import TokenName
    from .hq.api import new_token, token_hash

    try:
        TypeAdapter(TokenName).validate_python(args.name)
    except ValidationError:
        print(f"--name {args.name!r}: 1-64 letters, digits, '_', '.', '@' or '-'", file=sys.stderr)
        return 2
    token = new_token()
    print(f"# the token for {args.name} (shown once; send it as Authorization: Bearer <token>):", file=sys.stderr)
    print(f"# {token}", file=sys.stderr)
    print(f'{args.name} = "{token_hash(token)}"')
    return 0


def _demo(args: argparse.Namespace) -> int:
    from simulators.store_replay import run_demo

    return run_demo(seconds=args.seconds, workdir=Path(args.workdir), facts=args.facts, linger=args.linger)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-agent", description="Per-store smart-store IoT agent")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    state_help = ("folder relative paths in the config resolve against (default: $STATE_DIRECTORY, which systemd "
                  "sets, else the config file's folder)")
    c = sub.add_parser("check-config", help="validate a config file; exit 2 with every error")
    c.add_argument("file")
    c.add_argument("--state-dir", help=state_help)
    c.set_defaults(fn=_check_config)
    r = sub.add_parser("run", help="run the agent (SIGHUP re-reads the config, SIGTERM stops)")
    r.add_argument("-c", "--config", required=True)
    r.add_argument("--state-dir", help=state_help)
    r.set_defaults(fn=_run)
    st = sub.add_parser("status", help="what a running agent sees: readiness, outbox, cameras, readers, labels, alerts")
    st.add_argument("-c", "--config", required=True, help="the agent's config (status.host, port and token)")
    st.add_argument("--state-dir", help=state_help)
    st.add_argument("--url", help="the status server's address instead, e.g. http://127.0.0.1:8782")
    st.add_argument("--json", action="store_true", help="the whole snapshot as JSON")
    st.set_defaults(fn=_status)
    i = sub.add_parser("install", help="lay out /etc/edge-agent, /var/lib/edge-agent, the service user and the "
                                       "systemd unit (an existing config is kept)")
    i.add_argument("--root", default="/", help="install under this folder instead of / (an image, a test)")
    i.add_argument("--user", default="edge-agent", help="the unprivileged user the service runs as")
    i.add_argument("--no-create-user", dest="create_user", action="store_false",
                   help="do not create the user (default: create it when installing into / as root)")
    i.set_defaults(fn=_install)
    rec = sub.add_parser("record", help="run the agent and record its raw inputs (no images) into a file")
    rec.add_argument("-c", "--config", required=True)
    rec.add_argument("--out", required=True, help="the recording: JSON lines (gzip-compressed if it ends in .gz)")
    rec.add_argument("--state-dir", help=state_help)
    rec.set_defaults(fn=_record)
    rep = sub.add_parser("replay", help="feed a recording through the pipeline on a virtual clock; print its output")
    rep.add_argument("file")
    rep.add_argument("-c", "--config", required=True, help="the store's config (antennas, labels, cameras)")
    rep.add_argument("--speed", type=_speed, default="max", help="N times real time; 0 or max: as fast as it goes")
    rep.add_argument("--out", help="write the output here (default: standard output)")
    rep.add_argument("--workdir", help="keep the replay's outbox here (default: a temporary folder)")
    rep.set_defaults(fn=_replay)
    h = sub.add_parser("hq", help="run the reference HQ receiver")
    h.add_argument("-c", "--config", required=True)
    h.add_argument("--db", help="override hq.db_path (and hq.database): run on this SQLite file")
    h.add_argument("--http-port", type=int, help="override hq.http_port (0 = no HTTP)")
    h.set_defaults(fn=_hq)
    s = sub.add_parser("schema", help="write a JSON Schema per message type")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_schema)
    e = sub.add_parser("epcis", help="EPCIS 2.0 documents of what HQ applied").add_subparsers(dest="epcis_cmd",
                                                                                           required=True)
    x = e.add_parser("export", help="write an EPCISDocument of a store's events in a time range")
    x.add_argument("-c", "--config", required=True, help="HQ's config (hq.db_path)")
    x.add_argument("--db", help="override hq.db_path (and hq.database): read this SQLite file")
    x.add_argument("--store", required=True)
    x.add_argument("--from", dest="since", help="RFC 3339 time, inclusive (default: the first event)")
    x.add_argument("--to", dest="until", help="RFC 3339 time, exclusive (default: the last event)")
    x.add_argument("--out", help="file to write (default: standard output)")
    x.set_defaults(fn=_epcis_export)
    k = sub.add_parser("keygen", help="make an Ed25519 key pair: a store's (--name) or HQ's")
    k.add_argument("--out", required=True, help="folder for <name>.key (0600) and <name>.pub")
    k.add_argument("--name", help="the store id; without it, HQ's pair hq.key/hq.pub")
    k.set_defaults(fn=_keygen)
    t = sub.add_parser("hq-token", help="make an API token (HQ's POST /cmd and /prices, or a reader's for "
                                        "rfid.http.tokens); prints its hash line")
    t.add_argument("--name", required=True, help="who holds it: the name the audit log shows, or the reader's id")
    t.set_defaults(fn=_hq_token)
    d = sub.add_parser("demo", help="replay a simulated store: brokers, simulators, agent, HQ receiver, dashboard")
    d.add_argument("--seconds", type=float, default=20.0)
    d.add_argument("--facts", type=int, default=20_000)
    d.add_argument("--workdir", default="var/demo")
    d.add_argument("--linger", type=float, default=0.0,
                   help="keep everything running this many seconds after the checks, to look at the dashboard")
    d.set_defaults(fn=_demo)
    args = p.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
