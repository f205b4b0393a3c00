"""`posguard run --config guard.toml`: the daemon.

Wires the reader port (any pyserial URL) to the engine and the host uplink, drains the reversal
queue in the background of the same loop, logs one JSON object per line to stderr, and stops
cleanly on SIGTERM/SIGINT: every acknowledged request is already committed, so stopping between
two loop rounds loses nothing, and anything in flight is reversed at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from guard.core.errors import PosguardError
from guard.journal.keys import load_keys
from guard.runtime.retention import Retention
from guard.runtime.service import GuardService, open_guard

from posguard import config_signing
from posguard.config import Config, engine_config, load, make_uplink, retention_config

log = logging.getLogger("posguard.daemon")
STOP_GRACE_S = 5.0  # after SIGTERM/SIGINT, a loop round stuck this long (a blocked write) ends the process
EXIT_STOP_FORCED = 4  # like an internal error: the next start recovers from the journal


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "utc": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update((k, v) for k, v in fields.items() if k not in out)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("posguard")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def build(cfg: Config) -> tuple[GuardService, Any]:
    """Open everything the config names; errors carry the config key or a stable code."""
    from firmware_bridge.daemon import ReaderBridge
    from firmware_bridge.link import LinkEndpoint
    from firmware_bridge.serial_port import SerialLink, open_port

    signature = None
    if cfg.source is not None:  # over the bytes parsed (cfg.raw), before any named file is loaded
        signature = config_signing.check(cfg.source, Path(cfg["journal.keys"]), cfg.raw,
                                         config_signing.named_files(cfg))
    keys = load_keys(Path(cfg["journal.keys"]))
    uplink = make_uplink(cfg)
    ecfg = engine_config(cfg)
    svc = open_guard(Path(cfg["journal.path"]), keys, ecfg, uplink, rng=random.Random())
    retention = retention_config(cfg)
    if retention is not None:
        svc.retention = Retention(svc, retention)
    if signature is not None:
        try:
            last = svc.journal.last_of_kind("config_loaded")  # indexed: start-up never reads the whole journal
            previous = config_signing.changed_unsigned([last] if last else [], signature)
            if previous is not None:
                raise config_signing.ConfigSignatureError(
                    f"{cfg.source} changed since the last run (sha256 {previous[:12]}... -> {signature['sha256'][:12]}...) "
                    "and is not signed: terminal and merchant ids and the host may not change silently",
                    code="CONFIG_CHANGED_UNSIGNED")
            svc.journal.append([("config_loaded", None, {
                **signature, "tid": cfg["terminal.terminal_id"], "mid": cfg["terminal.merchant_id"],
                "host": f"{cfg['host.address']}:{cfg['host.port']}", "tls": cfg["host.tls"]})], now=svc.clock())
        except BaseException:
            svc.close()
            raise
    try:
        port = open_port(cfg["reader.url"], cfg["reader.baudrate"], cfg["reader.bytesize"], cfg["reader.parity"],
                         cfg["reader.stopbits"])
    except Exception as e:  # pyserial raises SerialException/ValueError/OSError
        svc.close()
        raise PosguardError(f"cannot open reader port {cfg['reader.url']}: {e}", code="READER_PORT_UNAVAILABLE") from None
    bridge = ReaderBridge(svc, SerialLink(port, LinkEndpoint("guard", rng=random.Random())), cfg["reader.reader_id"])
    bridge.attach()
    return svc, bridge


def run(config_path: Path, *, max_seconds: float | None = None) -> int:
    """Run until SIGTERM/SIGINT (or ``max_seconds``). Exit codes: 0 clean stop, 2 bad config/keys,
    3 journal or other fatal guard error, 4 internal error (restart: recovery resolves anything in
    flight from the journal)."""
    try:
        cfg = load(config_path)
    except PosguardError as e:
        print(f"posguard: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg["log.level"])
    try:
        svc, bridge = build(cfg)
    except PosguardError as e:
        log.error("%s", e)
        print(f"posguard: {e}", file=sys.stderr)
        return 2
    stop = {"flag": False}

    def on_signal(signum: int, _frame: Any) -> None:
        if not stop["flag"]:
            signal.signal(signal.SIGALRM, _forced_exit)
            signal.setitimer(signal.ITIMER_REAL, STOP_GRACE_S)
        stop["flag"] = True
        log.info("signal %d: stopping after this loop round", signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("posguard running: terminal %s, reader %s, host %s:%s",
             cfg["terminal.terminal_id"], cfg["reader.url"], cfg["host.address"], cfg["host.port"])
    end = time.monotonic() + max_seconds if max_seconds else None
    rc = 0
    try:
        while not stop["flag"] and (end is None or time.monotonic() < end):
            svc.step(0.05)
    except PosguardError as e:
        log.error("fatal: %s", e)
        rc = 3
    except Exception:  # a bug: stop rather than run on with memory that may differ from the journal
        log.exception("fatal internal error; restart recovers from the journal")
        rc = 4
    finally:
        try:
            bridge.link.port.close()
        except Exception:
            pass
        svc.close()
        log.info("stopped: %s", json.dumps(svc.engine.stats))
        if stop["flag"]:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return rc


def _forced_exit(_signum: int, _frame: Any) -> None:
    """SIGTERM was not honoured within STOP_GRACE_S: a loop round is stuck (say, a write to a
    stderr pipe nobody reads). Exit at once, without logging (the logging lock may be the one
    held): every acknowledged request is committed, and the journal survives this like a SIGKILL."""
    os._exit(EXIT_STOP_FORCED)
