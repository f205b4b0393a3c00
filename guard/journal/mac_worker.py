"""The MAC worker of journal verification: a second process checks the MACs along the ratchet
while the verifier reads and hashes (guard.journal.verify)."""

from __future__ import annotations

import subprocess
import sys

from guard.core.constants import JOURNAL_RATCHET_LABEL

# Run with ``python -I -S -c``: no site, no PYTHONPATH, so it cannot import guard.journal.mac and
# spells out the same RFC 2104 steps as ``mac_and_next`` (tests pin both to ``hmac.digest``).
_WORKER_SRC = r"""
import hashlib, sys
def main():
    rd, wr = sys.stdin.buffer, sys.stdout.buffer
    def exact(n):
        b = rd.read(n)
        if len(b) != n:
            raise SystemExit(3)
        return b
    key = exact(32)
    label = exact(exact(1)[0])
    x36, x5c = bytes(b ^ 0x36 for b in range(256)), bytes(b ^ 0x5C for b in range(256))
    p36, p5c = b"\x36" * 32, b"\x5c" * 32
    sha = hashlib.sha256
    done, bad = 0, -1
    while True:
        n = int.from_bytes(exact(4), "big")
        if not n:
            break
        buf = exact(64 * n)
        if bad >= 0:
            continue
        for off in range(0, 64 * n, 64):
            ki = key.translate(x36) + p36
            ko = key.translate(x5c) + p5c
            if sha(ko + sha(ki + buf[off:off + 32]).digest()).digest() != buf[off + 32:off + 64]:
                bad = done + off // 64
                break
            key = sha(ko + sha(ki + label).digest()).digest()
        done += n
    wr.write((bad + 1).to_bytes(8, "big") + key)
    wr.flush()
main()
"""


class _WorkerLost(Exception):
    """The MAC worker died or answered short: the scan is redone in this process."""


class _MacWorker:
    """A child process checking mac == HMAC-SHA256(k_seq, entry_hash) along the ratchet (RFC 2104 with
    SHA-256 one-shots, as ``mac_and_next``). It gets exactly the bytes this process read (one SQLite
    snapshot), in seq order, and answers once: the index of the first bad MAC and the key there, or
    none and the key after the last entry. The key goes through a pipe, never argv or a file.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc, self.stdin, self.stdout = proc, proc.stdin, proc.stdout
        self.batch: list[bytes] = []  # entry_hash, mac, entry_hash, mac, ...
        self.running = True

    @classmethod
    def start(cls, key: bytes) -> _MacWorker | None:
        """The worker, or None where no child interpreter can be started (the caller checks in-process)."""
        if not sys.executable or getattr(sys, "frozen", False):  # no interpreter to run ``-c`` with
            return None
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WORKER_SRC], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except (OSError, ValueError):
            return None
        w = cls(proc)
        try:
            import fcntl  # a 1 MiB pipe: this process keeps going while the worker starts up
            fcntl.fcntl(w.stdin.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        except (ImportError, AttributeError, OSError):
            pass
        try:
            w.stdin.write(key + bytes([len(JOURNAL_RATCHET_LABEL)]) + JOURNAL_RATCHET_LABEL)
        except OSError:
            w.close()
            return None
        return w

    def flush(self) -> None:
        """Send the batch shipped so far."""
        if self.batch:
            try:
                self.stdin.write((len(self.batch) // 2).to_bytes(4, "big") + b"".join(self.batch))
            except (OSError, ValueError) as e:
                raise _WorkerLost("MAC worker gone") from e
            self.batch.clear()

    def finish(self) -> tuple[int | None, bytes]:
        """(index of the first bad MAC among the shipped entries or None, k at it or after the last)."""
        self.flush()
        self.running = False
        try:
            self.stdin.write(bytes(4))
            self.stdin.close()
            out = self.stdout.read(40)
        except (OSError, ValueError) as e:
            raise _WorkerLost("MAC worker gone") from e
        if len(out) != 40 or self.proc.wait() != 0:
            raise _WorkerLost(f"MAC worker answered {len(out)} bytes, exit {self.proc.returncode}")
        n = int.from_bytes(out[:8], "big")
        return (n - 1 if n else None), out[8:]

    def close(self) -> None:
        """Stop the worker if it is still running and reap it."""
        self.running = False
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.stdin, self.stdout):
            try:
                f.close()
            except OSError:
                pass

