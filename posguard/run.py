"""`posguard run --config guard.toml`: the daemon.

Wires the reader port (any pyserial URL) to the engine and the host uplink, drains the reversal
queue in the background of the same loop, logs one JSON object per line to stderr (with journald's
priority prefix when stderr is the journal), holds the journal's writer lock from start to stop,
and stops cleanly on SIGTERM/SIGINT with a final signed checkpoint: every acknowledged request is
already committed, so stopping between two loop rounds loses nothing, and anything in flight is
reversed at the next start. SIGHUP is logged and ignored (no reload).
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

from guard.core.errors import JournalError, PosguardError
from guard.journal.keys import load_keys
from guard.journal.lock import WriterLock
from guard.runtime.retention import Retention
from guard.runtime.service import GuardService, open_guard

from posguard import config_signing
from posguard.config import Config, engine_config, load, make_uplink, retention_config

log = logging.getLogger("posguard.daemon")
STOP_GRACE_S = 5.0  # after SIGTERM/SIGINT, a loop round stuck this long (a blocked write) ends the process
EXIT_STOP_FORCED = 4  # like an internal error: the next start recovers from the journal


# syslog priorities (RFC 5424) by logging level: the "<N>" prefix journald reads from a stream
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (epoch seconds) beside ``utc`` (ISO 8601, UTC), level,
    logger, ``msg``, then the record's ``extra["fields"]`` as top-level JSON fields (counters,
    txn key, STAN, reason). With ``journald`` each line starts with the syslog priority ``<N>``,
    which journald strips and keeps as the entry's PRIORITY."""

    def __init__(self, *, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

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
        line = json.dumps(out, default=str)
        if self.journald:
            return f"<{_PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)}>{line}"
        return line


def stderr_is_journald() -> bool:
    """True when systemd connected stderr to the journal: ``JOURNAL_STREAM`` ("dev:inode") names
    the very file stderr is (sd_journal_stream_fd(3)), not one a parent passed down."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in want.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(journald=stderr_is_journald()))
    root = logging.getLogger("posguard")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def build(cfg: Config) -> tuple[GuardService, Any]:
    """Open everything the config names; errors carry the config key or a stable code.

    The journal is locked (``WriterLock``: JOURNAL_BUSY if another daemon, replay, compact or
    rotation holds it) before anything is read from it or written to it. A reader port that is
    missing is not an error: ``ReaderPort`` keeps retrying it from the loop. The config is
    journaled (``config_loaded``) last, once nothing else can fail."""
    from firmware_bridge.daemon import ReaderBridge
    from firmware_bridge.link import LinkEndpoint
    from firmware_bridge.reader_port import reader_link
    from firmware_bridge.serial_port import open_port

    signature = None
    if cfg.source is not None:  # over the bytes parsed (cfg.raw), before any named file is loaded
        signature = config_signing.check(cfg.source, Path(cfg["journal.keys"]), cfg.raw,
                                         config_signing.named_files(cfg))
    keys = load_keys(Path(cfg["journal.keys"]))
    uplink = make_uplink(cfg)
    ecfg = engine_config(cfg)
    jpath = Path(cfg["journal.path"])
    lock = WriterLock.acquire(jpath) if jpath.exists() else None
    try:
        svc = open_guard(jpath, keys, ecfg, uplink, rng=random.Random())
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    try:
        svc.journal.writer_lock = lock or WriterLock.acquire(jpath)  # released by svc.close()
        retention = retention_config(cfg)
        if retention is not None:
            svc.retention = Retention(svc, retention)
        record = None
        if signature is not None:
            record = {**signature, "identity": config_signing.identity(cfg, signature["files"])}
            last = svc.journal.last_of_kind("config_loaded")  # indexed: start-up never reads the whole journal
            changed = config_signing.changed_unsigned([last] if last else [], record)
            if changed:
                raise config_signing.unsigned_change_error(cfg.source or Path("guard.toml"), changed)
        url = cfg["reader.url"]
        port, link = reader_link(lambda: open_port(url, cfg["reader.baudrate"], cfg["reader.bytesize"],
                                                   cfg["reader.parity"], cfg["reader.stopbits"]),
                                 url, LinkEndpoint("guard", rng=random.Random()))
        bridge = ReaderBridge(svc, link, cfg["reader.reader_id"])
        port.attach(svc, link, bridge.pump)
        if record is not None:
            svc.journal.append([("config_loaded", None, {
                **record, "tid": cfg["terminal.terminal_id"], "mid": cfg["terminal.merchant_id"],
                "host": f"{cfg['host.address']}:{cfg['host.port']}", "tls": cfg["host.tls"]})], now=svc.clock())
    except BaseException:
        svc.close()
        raise
    return svc, bridge


def start_exit_code(e: PosguardError, cfg: Config) -> int:
    """2 for what the operator must fix in the config or key files (a journal path whose directory
    does not exist included); 3 for the journal (busy, read-only, full, cannot be opened, corrupt):
    the documented rule of every command."""
    if e.code == "JOURNAL_CREATE_FAILED" and not Path(cfg["journal.path"]).parent.is_dir():
        return 2
    return 3 if isinstance(e, JournalError) or e.code.startswith(("JOURNAL_", "VAULT_")) else 2


def run(config_path: Path, *, max_seconds: float | None = None) -> int:
    """Run until SIGTERM/SIGINT (or ``max_seconds``). Exit codes: 0 clean stop, 2 bad config/keys,
    3 journal busy or failed (or another fatal guard error), 4 internal error (restart: recovery
    resolves anything in flight from the journal). SIGHUP is ignored (logged): there is no reload;
    restart the daemon to apply a changed config."""
    try:
        cfg = load(config_path)
    except PosguardError as e:
        print(f"posguard: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg["log.level"])
    try:
        svc, bridge = build(cfg)
    except PosguardError as e:  # one line: the log is stderr
        log.error("posguard: %s", e, extra={"fields": {"event": "start_failed", "code": e.code}})
        return start_exit_code(e, cfg)
    stop = {"flag": False}

    def on_signal(signum: int, _frame: Any) -> None:
        if not stop["flag"]:
            signal.signal(signal.SIGALRM, _forced_exit)
            signal.setitimer(signal.ITIMER_REAL, STOP_GRACE_S)
        stop["flag"] = True
        log.info("signal %d: stopping after this loop round", signum)

    def on_hup(_signum: int, _frame: Any) -> None:
        log.warning("SIGHUP ignored: posguard does not reload its config; restart it to apply a change",
                    extra={"fields": {"event": "sighup_ignored"}})

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    log.info("posguard running: terminal %s, reader %s, host %s:%s",
             cfg["terminal.terminal_id"], cfg["reader.url"], cfg["host.address"], cfg["host.port"],
             extra={"fields": {"event": "started", "journal_last_seq": svc.journal.last_seq}})
    end = time.monotonic() + max_seconds if max_seconds else None
    rc = 0
    try:
        while not stop["flag"] and (end is None or time.monotonic() < end):
            svc.step(0.05)
        final_checkpoint(svc)
    except PosguardError as e:
        log.error("fatal: %s", e, extra={"fields": {"event": "fatal", "code": e.code}})
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
        log.info("stopped", extra={"fields": {"event": "stopped", "rc": rc, "counters": dict(svc.engine.stats),
                                              "reader": dict(bridge.stats)}})
        if stop["flag"]:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return rc


def final_checkpoint(svc: GuardService) -> None:
    """On a clean stop, sign a checkpoint over everything written since the last one, so the newest
    anchor (``journal anchor``) covers the whole run, not just the genesis."""
    j = svc.journal
    if j.latest_checkpoint().get("covers_seq", -1) + 1 < j.last_seq:
        seq = j.checkpoint(svc.clock())
        log.info("final checkpoint %d covers entries up to %d", seq, seq - 1,
                 extra={"fields": {"event": "final_checkpoint", "seq": seq}})


def _forced_exit(_signum: int, _frame: Any) -> None:
    """SIGTERM was not honoured within STOP_GRACE_S: a loop round is stuck (say, a write to a
    stderr pipe nobody reads). Exit at once, without logging (the logging lock may be the one
    held): every acknowledged request is committed, and the journal survives this like a SIGKILL."""
    os._exit(EXIT_STOP_FORCED)
