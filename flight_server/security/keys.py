"""The server's own secrets, generated on first start and kept in its state directory.

Default location: `<data root>/.lclstream` (a dot directory is never taken for an experiment).
The directory is created owner-only (0700) and every secret file owner-readable only (0600):
a data root on a shared file system must not leak the keys that sign tokens and tickets.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flight_server.fsutil import atomic_write

SIGNING_ALGORITHMS = ("HS256", "EdDSA")


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the server state directory {path} ({exc.strerror}); "
                      "choose a writable one with --state-dir") from None
    return path


def write_private(path: Path, content: bytes, *, exclusive: bool = False) -> None:
    """Write `content` readable by the owner only, atomically and durably. Exclusive: fail if
    it exists (first start races between two servers must not leave them with different
    keys)."""
    atomic_write(path, content, mode=0o600, exclusive=exclusive)


def _load_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    if not path.exists():
        try:
            write_private(path, make(), exclusive=True)
        except FileExistsError:
            pass  # another server created it first; use theirs
    return path.read_bytes()


def random_secret() -> bytes:
    return base64.b64encode(secrets.token_bytes(32)) + b"\n"


def ticket_key(state_dir: Path) -> bytes:
    """The HMAC key that seals tickets; persistent so that tickets survive a restart."""
    return base64.b64decode(_load_or_create(ensure_dir(state_dir) / "ticket.key", random_secret))


def credential_key(state_dir: Path) -> bytes:
    """The AES-256 key that seals credentials the server holds for a while (a mirror job's
    token for the other site): on disk, in the job table, they are ciphertext."""
    return base64.b64decode(_load_or_create(ensure_dir(state_dir) / "credential.key",
                                            random_secret))


def shared_keys(state_dir: Path, algorithm: str, auth: bool) -> dict[str, bytes]:
    """The keys every node of a cluster must hold alike: a ticket, a token or a sealed
    credential one node made must open on every other."""
    found = {"ticket.key": ticket_key(state_dir), "credential.key": credential_key(state_dir)}
    if auth:
        found[f"token signing key ({algorithm})"] = signing_key(state_dir, algorithm)
    return found


def signing_key(state_dir: Path, algorithm: str) -> bytes:
    """The key the server signs its own tokens with: an HS256 secret or an Ed25519 private key
    in PEM."""
    if algorithm not in SIGNING_ALGORITHMS:
        raise ValueError(f"token_algorithm must be one of {', '.join(SIGNING_ALGORITHMS)}; "
                         f"got {algorithm!r}")
    directory = ensure_dir(state_dir)
    if algorithm == "HS256":
        return base64.b64decode(_load_or_create(directory / "token-hs256.key", random_secret))

    def make_ed25519() -> bytes:
        return Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())

    return _load_or_create(directory / "token-ed25519.pem", make_ed25519)
