"""The users file for password login (Flight Handshake with Basic credentials).

A JSON file, owner-readable only, that `lclstream user add/remove` edits and the server re-reads
when it changes, so adding a user needs no restart:

    {"version": 1, "users": {"alice": {"hash": "scrypt$16384$8$1$<salt>$<key>",
                                       "grants": {"read": ["tmox4*"]}}}}

Passwords are hashed with salted scrypt (stdlib `hashlib.scrypt`) and compared in constant time;
an unknown user costs the same hash as a known one, so timing does not reveal who exists.
Repeated failures for one user name are throttled (see LoginThrottle).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from flight_server.security.grants import Grants
from flight_server.security.keys import ensure_dir, write_private

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # about 50 ms and 16 MiB per check
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,127}$")
MIN_PASSWORD = 8


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                         dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(key).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n),
                                r=int(r), p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# Checked against when the user does not exist, so both paths cost one scrypt.
DUMMY_HASH = hash_password(secrets.token_hex(16))


@dataclass(frozen=True)
class User:
    name: str
    hash: str
    grants: Grants


class Users(Protocol):
    """Where password-login users are kept: this file, or a cluster's state (cluster/users)."""

    def exists(self) -> bool: ...

    def verify(self, name: str, password: str) -> User | None: ...


class UsersFile:
    """Read on demand and cached until the file's mtime or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, User] = {}

    def exists(self) -> bool:
        return self.path.is_file()

    def users(self) -> dict[str, User]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        with self._lock:
            if self._stamp != (st.st_mtime_ns, st.st_size):
                self._users = self._parse(json.loads(self.path.read_text()))
                self._stamp = (st.st_mtime_ns, st.st_size)
            return self._users

    @staticmethod
    def _parse(doc: dict) -> dict[str, User]:
        return {name: User(name, entry["hash"], Grants.from_claim(entry.get("grants")))
                for name, entry in doc.get("users", {}).items()}

    def verify(self, name: str, password: str) -> User | None:
        """The user when the password matches, else None; constant work either way."""
        user = self.users().get(name)
        ok = check_password(password, user.hash if user else DUMMY_HASH)
        return user if ok and user else None

    # -- editing (the CLI) -------------------------------------------------------------------

    def _save(self, users: dict[str, User]) -> None:
        doc = {"version": 1, "users": {
            u.name: {"hash": u.hash, "grants": u.grants.to_claim()} for u in users.values()}}
        ensure_dir(self.path.parent)
        write_private(self.path, (json.dumps(doc, indent=2) + "\n").encode())

    def add(self, name: str, password: str, grants: Grants) -> None:
        if not USER_NAME.match(name):
            raise ValueError(f"invalid user name {name!r}: letters, digits, '_', '.', '@', '-'")
        if len(password) < MIN_PASSWORD:
            raise ValueError(f"password too short: at least {MIN_PASSWORD} characters")
        users = dict(self.users())
        users[name] = User(name, hash_password(password), grants)
        self._save(users)

    def remove(self, name: str) -> None:
        users = dict(self.users())
        if name not in users:
            raise LookupError(f"no user '{name}' in {self.path}; users: "
                              f"{', '.join(sorted(users)) or 'none'}")
        del users[name]
        self._save(users)


class LoginThrottle:
    """At most `max_failures` failed logins per user name in `window` seconds.

    Per name rather than per address: pyarrow does not show the Handshake's peer address to the
    code that checks the password. A locked name is refused even with the right password until
    the window has passed, which is what stops guessing.
    """

    def __init__(self, max_failures: int = 5, window: float = 60.0) -> None:
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, name: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(name, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return failures

    def retry_after(self, name: str) -> float:
        """Seconds until `name` may try again; 0 when it may try now."""
        now = time.monotonic()
        with self._lock:
            failures = self._recent(name, now)
            if len(failures) < self.max_failures:
                return 0.0
            return failures[0] + self.window - now

    def failed(self, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent(name, now).append(now)
            if len(self._failures) > 100_000:  # bound memory under a spray of made-up names
                self._failures = {k: v for k, v in self._failures.items() if v}

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)
