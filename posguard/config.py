"""`guard.toml`: a documented, validated configuration.

Every key is declared once below with its type, default and check. Unknown keys, wrong types and
out-of-range values fail at start with the dotted key name and the reason (ConfigError), never
later in the middle of a sale.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from guard.core import constants as C
from guard.core.errors import ConfigError
from guard.core.model import mask_pan

if TYPE_CHECKING:
    from guard.core.engine import EngineConfig


def _len(n: int) -> Callable[[Any], str | None]:
    return lambda v: None if len(v) == n else f"must be exactly {n} characters (got {len(v)})"


def _ans(n: int) -> Callable[[Any], str | None]:
    """An ISO 8583 "ans" field of exactly ``n`` characters: printable ASCII only (the host codec
    cannot carry anything else, so a sale would be journaled and then fail to encode)."""

    def check(v: str) -> str | None:
        if not (v.isascii() and v.isprintable()):
            return "must be printable ASCII (ISO 8583 ans)"
        return _len(n)(v)

    return check


def _range(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}"


def _one_of(*xs: Any) -> Callable[[Any], str | None]:
    return lambda v: None if v in xs else f"must be one of {', '.join(map(str, xs))}"


def _codes(v: list[Any]) -> str | None:
    if not all(isinstance(c, str) and len(c) == 2 and c.isascii() and c.isalnum() for c in v):
        return 'must be a list of 2-character response codes, e.g. ["00", "08"]'
    return None


def _hex(n: int) -> Callable[[Any], str | None]:
    def check(v: str) -> str | None:
        if v == "":
            return None
        try:
            b = bytes.fromhex(v)
        except ValueError:
            return "must be hex digits"
        if len(b) != n or b[0] != C.TPDU_ID:
            return f"must be {n} bytes (hex) starting with 60"
        return None

    return check


# (section, key): (type, default, check, doc). A default of ... means required.
SCHEMA: dict[tuple[str, str], tuple[type | tuple[type, ...], Any, Callable[[Any], str | None] | None, str]] = {
    ("terminal", "terminal_id"): (str, ..., _ans(8), "ISO 8583 field 41 (8 characters)"),
    ("terminal", "merchant_id"): (str, ..., _ans(15), "ISO 8583 field 42 (15 characters)"),
    ("reader", "url"): (str, ..., None, "pyserial URL: /dev/ttyS1, socket://host:port, rfc2217://, loop://, spy://"),
    ("reader", "baudrate"): (int, 115200, _one_of(9600, 19200, 38400, 57600, 115200, 230400), "line speed"),
    ("reader", "bytesize"): (int, 8, _one_of(7, 8), "data bits"),
    ("reader", "parity"): (str, "N", _one_of("N", "E", "O"), "parity"),
    ("reader", "stopbits"): (int, 1, _one_of(1, 2), "stop bits"),
    ("reader", "reader_id"): (str, "READER01", lambda v: None if 0 < len(v) <= 32 and ":" not in v else "1-32 characters, no ':'", "id used in idempotency keys"),
    ("reader", "partial_approvals"): (bool, True, None, "the reader shows PARTIAL and sends CONFIRM or CANCEL; "
                                      "false: a partial approval is reversed at once"),
    ("reader", "partial_expiry"): ((int, float), 120.0, _range(1, 3600), "seconds before an unanswered PARTIAL is reversed"),
    ("reader", "completion_timeout"): ((int, float), C.COMPLETION_TIMEOUT_S, _range(5, 600),
                                       "seconds a chip sale the host approved waits for the reader's COMPLETE, then "
                                       "it is reversed (above the reader's reboot time: PROTOCOL.md section 12.5)"),
    ("host", "address"): (str, ..., None, "acquirer host name or IP"),
    ("host", "port"): (int, ..., _range(1, 65535), "TCP port"),
    ("host", "header"): (str, C.HOST_HEADER_BINARY2, _one_of(*C.HOST_HEADERS), "length header: binary2 or ascii4"),
    ("host", "tpdu"): (str, "", _hex(C.TPDU_LEN), "optional 5-byte TPDU as hex, e.g. 6000010000"),
    ("host", "spec"): (str, "default", None, "ISO 8583 spec: default (binary bitmap), default_ascii (hex bitmap), "
                       "or a pyiso8583 spec JSON file"),
    ("host", "tls"): (bool, False, None, "use TLS (1.2+)"),
    ("host", "cafile"): (str, "", None, "CA bundle to verify the host"),
    ("host", "certfile"): (str, "", None, "client certificate (mTLS)"),
    ("host", "keyfile"): (str, "", None, "client key (mTLS)"),
    ("host", "server_hostname"): (str, "", None, "name to verify in the host certificate"),
    ("host", "connect_timeout"): ((int, float), 3.0, _range(0.1, 60), "seconds"),
    ("host", "timeout"): ((int, float), C.HOST_TIMEOUT_S, _range(0.1, 300), "seconds to wait for a 0210"),
    ("host", "reversal_timeout"): ((int, float), C.REVERSAL_TIMEOUT_S, _range(0.1, 300), "seconds to wait for a 0410"),
    ("host", "reversal_max_attempts"): (int, C.REVERSAL_MAX_ATTEMPTS, _range(1, 1000),
                                        "explicit refusals (0410 not 00/25/94) before NEEDS_MANUAL"),
    ("host", "reversal_max_age"): ((int, float), C.REVERSAL_MAX_AGE_S, _range(1, 30 * 86400),
                                   "seconds an unanswered reversal is repeated after its first send, then NEEDS_MANUAL"),
    ("host", "partial_amount_field"): (str, C.F_AMOUNT, _one_of(C.F_AMOUNT, C.F_ADDITIONAL_AMOUNTS),
                                       "where a partial approval (code 10) carries the approved amount: 4 or 54"),
    ("host", "stan_from_clock"): (bool, True, None, "STANs never below 1 + 11 per second since UTC midnight, so a "
                                  "replaced or restored journal cannot reuse one the same day"),
    ("host", "ksn_field"): (str, C.F_KSN, lambda v: None if v in ("53", "62", "63", "120", "123", "124", "125", "126")
                            else "one of 53, 62, 63, 120, 123-126", "field carrying the PIN block's DUKPT KSN (20 hex)"),
    ("host", "reversal_icc"): (bool, True, None, "a reversal (0400/0401) of a chip sale carries its fields 23 and 55"),
    ("host", "echo_idle"): ((int, float), C.ECHO_IDLE_S, _range(1, 3600), "send 0800 echo after this idle time"),
    ("response_codes", "approved"): (list, sorted(C.RC_APPROVED_CLASS), _codes, "field 39 codes that approve (must include 00)"),
    ("response_codes", "partial"): (list, sorted(C.RC_PARTIAL_CLASS), _codes, "codes that approve part of the amount"),
    ("response_codes", "declined"): (list, sorted(C.RC_DECLINED_CLASS), _codes, "codes that decline (no debit); "
                                     "any code in no class is reversed"),
    ("response_codes", "duplicate"): (list, sorted(C.RC_DUPLICATE_CLASS), _codes, "duplicate transmission"),
    ("journal", "path"): (str, ..., None, "SQLite journal file"),
    ("journal", "keys"): (str, ..., None, "directory with device keys (posguard keys init)"),
    ("journal", "checkpoint_every"): (int, C.CHECKPOINT_EVERY_ENTRIES, _range(1, 1_000_000), "entries between signed checkpoints"),
    ("journal", "checkpoint_interval"): ((int, float), C.CHECKPOINT_EVERY_S, _range(1, 86400), "seconds between checkpoints even when idle"),
    ("journal", "retain_days"): ((int, float), 1.0, _range(0, 3650), "days final transactions stay in the live journal "
                                 "(at least the counter rules' window); the daemon then moves them to a sealed archive "
                                 "on its own, at an idle minute (0: only the budget)"),
    ("journal", "max_live_mb"): ((int, float), 64.0, _range(0, 1_000_000), "MB of live journal data above which the daemon "
                                 "archives every final transaction older than the counter rules' window (0: no budget)"),
    ("journal", "archive_dir"): (str, "", None, "where the daemon's archives go (empty: archive/ beside the journal)"),
    ("journal", "archive_keep_days"): ((int, float), 0.0, _range(0, 36500), "delete archives older than this once a "
                                       "later checkpoint was deposited with the host (0: keep them)"),
    ("policy", "double_swipe_window"): ((int, float), 120.0, _range(0, 86400), "seconds; same card+amount is HELD (0: off)"),
    ("policy", "hold_on_pending_reversal"): (bool, True, None, "hold sales/refunds on a card with a pending reversal"),
    ("policy", "hold_expiry"): ((int, float), 300.0, _range(1, 86400), "seconds before an unconfirmed hold is DECLINED"),
    ("policy", "card_max_count"): (int, 5, _range(0, 100000), "sales per card per card_count_window (0: off)"),
    ("policy", "card_count_window"): ((int, float), 600.0, _range(1, 2592000), "seconds"),
    ("policy", "card_max_amount"): (int, 500000, _range(0, 10**12), "minor units per card per card_amount_window (0: off)"),
    ("policy", "card_amount_window"): ((int, float), 86400.0, _range(1, 2592000), "seconds"),
    ("policy", "terminal_max_count"): (int, 30, _range(0, 100000), "sales per terminal per terminal_count_window (0: off)"),
    ("policy", "terminal_count_window"): ((int, float), 60.0, _range(1, 2592000), "seconds"),
    ("policy", "terminal_max_amount"): (int, 0, _range(0, 10**12), "minor units per terminal per terminal_amount_window (0: off)"),
    ("policy", "terminal_amount_window"): ((int, float), 3600.0, _range(1, 2592000), "seconds"),
    ("policy", "confirm_amount"): (bool, False, None, "HOLD every sale/refund until the operator confirms its amount"),
    ("policy", "signature_above"): (int, 0, _range(0, 10**12), "approved sales above this (minor units) need SIGNED (0: never)"),
    ("policy", "signature_timeout"): ((int, float), 300.0, _range(1, 86400), "seconds before a missing signature is flagged"),
    ("offline", "enabled"): (bool, False, None, "approve offline (DEFERRED, sent later as 0220) while the host is down"),
    ("offline", "max_sale_amount"): (int, 5_000, _range(1, 10**12), "minor units: larger sales need the host"),
    ("offline", "max_total_amount"): (int, 50_000, _range(1, 10**12), "minor units stored offline at once"),
    ("offline", "max_count"): (int, 250, _range(1, 100_000), "offline sales stored at once (Moneris: 250/500)"),
    ("offline", "max_age"): ((int, float), 86_400.0, _range(60, 30 * 86400), "seconds; older unsent ones go NEEDS_MANUAL (Square: 24 h, Clover: 7 d)"),
    ("offline", "chip_floor_limit"): (int, 0, _range(0, 10**12), "minor units: largest chip sale stored offline "
                                      "(0: max_sale_amount, which also caps it); magstripe and fallback: never offline"),
    ("offline", "contactless_floor_limit"): (int, 0, _range(0, 10**12), "minor units: largest contactless sale stored offline (0: max_sale_amount)"),
    ("offline", "manual_floor_limit"): (int, 0, _range(0, 10**12), "minor units: largest keyed sale stored offline (0: max_sale_amount)"),
    ("log", "level"): (str, "INFO", _one_of("DEBUG", "INFO", "WARNING", "ERROR"), "log level"),
}

SECTIONS = {s for s, _ in SCHEMA}


@dataclass(frozen=True)
class Config:
    """Validated values; ``raw`` holds the exact bytes they were parsed from (what a signature must cover)."""

    values: dict[tuple[str, str], Any]
    source: Path | None = None
    raw: bytes | None = field(default=None, repr=False, compare=False)

    def __getitem__(self, dotted: str) -> Any:
        s, k = dotted.split(".", 1)
        return self.values[(s, k)]


_DIGIT_RUN = re.compile(r"\d(?:[ -]?\d)*")
ECHO_MAX = 40


def _echo(name: str) -> str:
    """An unknown section or key name as an error may show it: digit runs of 6 or more masked (a card
    number typed as a key; mask_pan keeps BIN and last 4 of 13+ digits), control characters
    replaced, at most ECHO_MAX characters."""

    def mask(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group())
        return m.group() if len(digits) < 6 else mask_pan(digits)

    safe = "".join(c if c.isprintable() else "?" for c in _DIGIT_RUN.sub(mask, name))
    return safe if len(safe) <= ECHO_MAX else safe[:ECHO_MAX] + "..."


def parse(data: dict[str, Any], source: Path | None = None, raw: bytes | None = None) -> Config:
    """Validate a parsed TOML document (parsed from ``raw``, if given); raise ConfigError naming the
    first bad key (unknown names are echoed masked, see ``_echo``)."""
    for section, body in data.items():
        if not section:
            raise ConfigError("[\"\"]", "a section with an empty name; remove it")
        if section not in SECTIONS:
            raise ConfigError(_echo(section), f"unknown section (known: {', '.join(sorted(SECTIONS))})")
        if not isinstance(body, dict):
            raise ConfigError(section, "must be a table, e.g. [" + section + "]")
        for key in body:
            if (section, key) not in SCHEMA:
                known = ", ".join(k for s, k in SCHEMA if s == section)
                raise ConfigError(f"{section}.{_echo(key)}", f"unknown key (known in [{section}]: {known})")
    values: dict[tuple[str, str], Any] = {}
    for (section, key), (typ, default, check, _doc) in SCHEMA.items():
        name = f"{section}.{key}"
        present = key in data.get(section, {})
        if not present:
            if default is ...:
                raise ConfigError(name, "is required")
            values[(section, key)] = default
            continue
        v = data[section][key]
        if isinstance(v, bool) and typ is not bool or not isinstance(v, typ):
            tname = typ.__name__ if isinstance(typ, type) else "number"
            raise ConfigError(name, f"must be a {tname}, got {type(v).__name__}")
        if check is not None and (why := check(v)):
            raise ConfigError(name, why)
        values[(section, key)] = v
    if values[("host", "certfile")] and not values[("host", "keyfile")]:
        raise ConfigError("host.keyfile", "is required when host.certfile is set (mTLS)")
    if (values[("host", "certfile")] or values[("host", "cafile")]) and not values[("host", "tls")]:
        raise ConfigError("host.tls", "must be true when TLS files are given")
    base = source.parent if source else Path.cwd()
    for key in (("journal", "path"), ("journal", "keys"), ("host", "cafile"), ("host", "certfile"), ("host", "keyfile")):
        if values[key]:
            if "\x00" in values[key]:
                raise ConfigError(f"{key[0]}.{key[1]}", "a path cannot contain a NUL character")
            values[key] = str((base / values[key]).resolve())
    for key in (("host", "cafile"), ("host", "certfile"), ("host", "keyfile")):
        if values[key] and not Path(values[key]).is_file():
            raise ConfigError(f"{key[0]}.{key[1]}", f"file not found: {values[key]}")
    from guard.hostlink.iso import BUILTIN_SPECS, load_spec

    if values[("host", "spec")] not in BUILTIN_SPECS:
        if "\x00" in values[("host", "spec")]:
            raise ConfigError("host.spec", "a path cannot contain a NUL character")
        values[("host", "spec")] = str((base / values[("host", "spec")]).resolve())
    load_spec(values[("host", "spec")])  # refuse a spec that cannot carry our messages now, not mid-sale
    config = Config(values, source, raw)
    host_profile(config)  # overlapping response-code classes are a config error at start
    return config


def make_uplink(cfg: Config) -> Any:
    """The host link the config describes: spec, framing, TLS (guard.hostlink.uplink.Uplink, not connected)."""
    from guard.hostlink.iso import HostCodec, load_spec
    from guard.hostlink.uplink import Uplink, make_client_context

    tpdu = bytes.fromhex(cfg["host.tpdu"]) if cfg["host.tpdu"] else None
    codec = HostCodec(load_spec(cfg["host.spec"]), header=cfg["host.header"], tpdu=tpdu)
    ctx = None
    if cfg["host.tls"]:
        ctx = make_client_context(cfg["host.cafile"] or None, cfg["host.certfile"] or None, cfg["host.keyfile"] or None)
    return Uplink(cfg["host.address"], cfg["host.port"], codec, ssl_context=ctx,
                  server_hostname=cfg["host.server_hostname"] or None, connect_timeout=cfg["host.connect_timeout"])


CONFIG_ENV = "POSGUARD_CONFIG"
DEFAULT_CONFIG = Path("/etc/posguard/guard.toml")


def discover(given: Path | None, env: dict[str, str] | None = None) -> Path:
    """The config file to use: ``--config`` if given, else ``$POSGUARD_CONFIG``, else
    /etc/posguard/guard.toml if it exists; ConfigError naming all three otherwise."""
    import os

    if given is not None:
        return given
    named = (os.environ if env is None else env).get(CONFIG_ENV, "")
    if named:
        return Path(named)
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    raise ConfigError("(file)", f"no config given: use --config FILE, set {CONFIG_ENV}, or create {DEFAULT_CONFIG} "
                      "(`posguard config-example` prints one)")


def load(path: Path) -> Config:
    """Read ``path`` ONCE and parse those bytes (``Config.raw``): a signature check over ``raw``
    verifies exactly what runs, even if the file changes afterwards."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError("(file)", f"cannot read {path}: {e.strerror}") from None
    return from_bytes(raw, path)


def from_bytes(raw: bytes, path: Path) -> Config:
    """Parse the config bytes ``raw`` read from ``path`` (relative paths resolve against its directory)."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("(file)", f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("(syntax)", f"{path}: {e}") from None
    except RecursionError:
        raise ConfigError("(syntax)", f"{path}: nested too deeply to be a posguard config") from None
    return parse(data, path, raw)


def documented_example() -> str:
    """A complete example config with every key and its meaning (used by docs and `--help`)."""
    lines = ["# posguard guard.toml: every key, with its default"]
    section = None
    for (s, k), (_t, default, _c, doc) in SCHEMA.items():
        if s != section:
            lines.append(f"\n[{s}]")
            section = s
        if default is ...:
            lines.append(f"# {k} = ...   # REQUIRED: {doc}")
        else:
            v = str(default).lower() if isinstance(default, bool) else repr(default).replace("'", '"')
            lines.append(f"{k} = {v}   # {doc}")
    return "\n".join(lines) + "\n"


def policy_config(cfg: Config) -> "Any":
    """The counter rules (guard.core.policies.PolicyConfig) from the [policy] section."""
    from guard.core.policies import PolicyConfig, VelocityLimit

    card = []
    if cfg["policy.card_max_count"]:
        card.append(VelocityLimit(float(cfg["policy.card_count_window"]), max_count=cfg["policy.card_max_count"]))
    if cfg["policy.card_max_amount"]:
        card.append(VelocityLimit(float(cfg["policy.card_amount_window"]), max_amount=cfg["policy.card_max_amount"]))
    term = []
    if cfg["policy.terminal_max_count"]:
        term.append(VelocityLimit(float(cfg["policy.terminal_count_window"]), max_count=cfg["policy.terminal_max_count"]))
    if cfg["policy.terminal_max_amount"]:
        term.append(VelocityLimit(float(cfg["policy.terminal_amount_window"]), max_amount=cfg["policy.terminal_max_amount"]))
    return PolicyConfig(
        double_swipe_window_s=float(cfg["policy.double_swipe_window"]),
        hold_on_pending_reversal=cfg["policy.hold_on_pending_reversal"],
        hold_expiry_s=float(cfg["policy.hold_expiry"]),
        card_limits=tuple(card),
        terminal_limits=tuple(term),
        confirm_amount=cfg["policy.confirm_amount"],
        signature_above=cfg["policy.signature_above"],
        signature_timeout_s=float(cfg["policy.signature_timeout"]),
    )


def host_profile(cfg: Config) -> dict[str, Any]:
    """EngineConfig keyword arguments for how this host answers (response-code classes, partial
    approvals, reversal horizon, STANs). A profile whose classes overlap or omit 00 is refused."""
    from guard.core.actions import check_response_classes

    classes = {k: frozenset(cfg[f"response_codes.{k}"]) for k in ("approved", "partial", "declined", "duplicate")}
    check_response_classes(classes["approved"], classes["partial"], classes["declined"], classes["duplicate"])
    return {"rc_approved": classes["approved"], "rc_partial": classes["partial"], "rc_declined": classes["declined"],
            "rc_duplicate": classes["duplicate"], "partial_amount_field": cfg["host.partial_amount_field"],
            "partial_approvals": cfg["reader.partial_approvals"], "partial_expiry_s": float(cfg["reader.partial_expiry"]),
            "reversal_max_age_s": float(cfg["host.reversal_max_age"]), "stan_clock_floor": cfg["host.stan_from_clock"],
            "completion_timeout_s": float(cfg["reader.completion_timeout"]), "ksn_field": cfg["host.ksn_field"],
            "reversal_icc": cfg["host.reversal_icc"]}


def offline_config(cfg: Config) -> "Any":
    """Deferred authorization limits (guard.core.policies.OfflineConfig) from the [offline] section."""
    from guard.core.policies import OfflineConfig

    return OfflineConfig(enabled=cfg["offline.enabled"], max_sale_amount=cfg["offline.max_sale_amount"],
                         max_total_amount=cfg["offline.max_total_amount"], max_count=cfg["offline.max_count"],
                         max_age_s=float(cfg["offline.max_age"]),
                         floor_limits=(("CHIP", cfg["offline.chip_floor_limit"]),
                                       ("CONTACTLESS", cfg["offline.contactless_floor_limit"]),
                                       ("MANUAL", cfg["offline.manual_floor_limit"])))


def retention_config(cfg: Config) -> Any:
    """The daemon's automatic retention (guard.runtime.retention), or None when both triggers are off."""
    from guard.runtime.retention import DAY_S, RetentionConfig

    if not cfg["journal.retain_days"] and not cfg["journal.max_live_mb"]:
        return None
    journal = Path(cfg["journal.path"])
    return RetentionConfig(retain_s=float(cfg["journal.retain_days"]) * DAY_S,
                           max_live_bytes=int(float(cfg["journal.max_live_mb"]) * 1024 * 1024),
                           archive_dir=Path(cfg["journal.archive_dir"] or journal.parent / "archive"),
                           archive_keep_s=float(cfg["journal.archive_keep_days"]) * DAY_S)


def engine_config(cfg: Config, **overrides: Any) -> EngineConfig:
    """The engine's settings from [terminal], [host], [policy] and [offline]; ``overrides`` (EngineConfig
    fields, e.g. replay's ``saf_window``) win. The one place a config becomes an EngineConfig."""
    from guard.core.engine import EngineConfig

    settings: dict[str, Any] = {
        "host_timeout_s": float(cfg["host.timeout"]), "reversal_timeout_s": float(cfg["host.reversal_timeout"]),
        "reversal_max_attempts": cfg["host.reversal_max_attempts"], "echo_idle_s": float(cfg["host.echo_idle"]),
        "policy": policy_config(cfg), "offline": offline_config(cfg), **host_profile(cfg),
    }
    return EngineConfig(cfg["terminal.terminal_id"], cfg["terminal.merchant_id"], **{**settings, **overrides})
