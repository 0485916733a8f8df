"""Password-login users of a cluster, in its PostgreSQL state, so that every node knows the same
users at once (a single server keeps them in its state directory's users.json). The same
interface as `security.users.UsersFile`: the login path and `lclstream user ...` use either.
A cluster whose table is still empty takes the users.json a node finds, once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flight_server.cluster.state import ClusterState
from flight_server.security.grants import Grants
from flight_server.security.users import (
    DUMMY_HASH,
    MIN_PASSWORD,
    USER_NAME,
    User,
    UsersFile,
    check_password,
    hash_password,
)

log = logging.getLogger(__name__)


class UsersTable:
    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.path = f"the cluster's state ({state.describe()})"  # where, in messages

    def exists(self) -> bool:
        return bool(self.state.execute("SELECT 1 FROM lclstream_users LIMIT 1"))

    def users(self) -> dict[str, User]:
        return {name: User(name, hashed, Grants.from_claim(json.loads(grants)))
                for name, hashed, grants in self.state.execute(
                    "SELECT name, hash, grants FROM lclstream_users ORDER BY name")}

    def verify(self, name: str, password: str) -> User | None:
        """The user when the password matches, else None; constant work either way."""
        rows = self.state.execute("SELECT hash, grants FROM lclstream_users WHERE name = %s",
                                  (name,))
        user = User(name, rows[0][0], Grants.from_claim(json.loads(rows[0][1]))) if rows \
            else None
        ok = check_password(password, user.hash if user else DUMMY_HASH)
        return user if ok and user else None

    def add(self, name: str, password: str, grants: Grants) -> None:
        if not USER_NAME.match(name):
            raise ValueError(f"invalid user name {name!r}: letters, digits, '_', '.', '@', '-'")
        if len(password) < MIN_PASSWORD:
            raise ValueError(f"password too short: at least {MIN_PASSWORD} characters")
        self._put(User(name, hash_password(password), grants), replace=True)

    def remove(self, name: str) -> None:
        if not self.state.execute("DELETE FROM lclstream_users WHERE name = %s RETURNING name",
                                  (name,)):
            raise LookupError(f"no user '{name}' in {self.path}; users: "
                              f"{', '.join(self.users()) or 'none'}")

    def _put(self, user: User, replace: bool) -> None:
        on_conflict = ("DO UPDATE SET hash = excluded.hash, grants = excluded.grants"
                       if replace else "DO NOTHING")
        self.state.execute(f"INSERT INTO lclstream_users (name, hash, grants) "
                           f"VALUES (%s, %s, %s) ON CONFLICT (name) {on_conflict}",
                           (user.name, user.hash, json.dumps(user.grants.to_claim())))

    def adopt(self, path: Path) -> int:
        """Take the users of a users.json if the table has none yet; how many were taken."""
        found = UsersFile(path)
        if self.exists() or not found.exists():
            return 0
        for user in found.users().values():
            self._put(user, replace=False)
        log.info("cluster: took the %d users of %s into the cluster's state",
                 len(found.users()), path)
        return len(found.users())
