"""Exceptions with stable codes.

Every error posguard raises carries a ``code`` (stable, machine-readable, registered in
``guard.core.codes.ErrorCode`` and listed in the doc its user reads) and a message a cashier or
integrator can act on. Messages never contain card data.
"""

from __future__ import annotations

from guard.core.codes import ErrorCode, is_registered


class PosguardError(Exception):
    """Base class: ``code`` is stable across releases; ``str()`` is the human message."""

    code: str = "POSGUARD_ERROR"

    def __init__(self, message: str, *, code: str | ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = str(code)
        assert is_registered(self.code), f"error code {self.code} is not in guard.core.codes.ErrorCode"

    def __str__(self) -> str:
        return f"[{self.code}] {self.args[0]}"


class ConfigError(PosguardError):
    """Configuration is missing, malformed or unsafe; ``key`` names the offending setting."""

    code = "CONFIG_INVALID"

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config key '{key}': {reason}")
        self.key = key
        self.reason = reason


class JournalError(PosguardError):
    """The journal cannot be opened or written safely."""

    code = "JOURNAL_ERROR"


class JournalDurabilityError(JournalError):
    """SQLite did not accept the durability pragmas we require (WAL + synchronous=FULL)."""

    code = "JOURNAL_NOT_DURABLE"


class KeyFileError(PosguardError):
    """A key file is missing, malformed or readable by others."""

    code = "KEY_FILE_INVALID"


class IdempotencyConflict(PosguardError):
    """The same reader transaction id arrived with a different request: never a new transaction."""

    code = "IDEMPOTENCY_MISMATCH"


class RequestInvalid(PosguardError):
    """A reader request is malformed (bad amount, PAN, currency...)."""

    code = "REQUEST_INVALID"


class HostProtocolError(PosguardError):
    """Bytes or a message from the host cannot be used. Codes: HOST_FRAME_TRUNCATED,
    HOST_BAD_LENGTH, HOST_BAD_TPDU, HOST_UNDECODABLE, HOST_BAD_MTI, and HOST_ENCODE_INVALID
    when a message we build does not fit the host spec."""

    code = "HOST_PROTOCOL"


class CodecError(HostProtocolError):
    """We were asked to encode something the spec cannot carry (code ``HOST_ENCODE_INVALID``).

    The message names the field and the reason, never its value.
    """

    code = "HOST_ENCODE_INVALID"


class LinkError(PosguardError):
    """The serial link to the reader failed (framing, CRC, sequence, resync)."""

    code = "LINK_ERROR"
