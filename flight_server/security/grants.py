"""Per-experiment rights carried by a token: which experiments a caller may read, write or admin.

A grant names an experiment or a glob of them (`tmox4*`). Tokens carry grants in one claim, in
either of two shapes so that an institution's identity provider can issue them without a plugin:

    {"read": ["tmox4*"], "write": ["tmox42619"], "admin": []}     # a JSON object
    "read:tmox4* write:tmox42619"                                  # OAuth-style scopes
    ["read:tmox4*", "write:tmox42619"]                             # scopes as a list

`admin` on an experiment implies `read` and `write` on it; `read` and `write` are independent, so a
data-acquisition producer can push a run without being able to read others.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

RIGHTS = ("read", "write", "admin")
# Globs are matched against experiment names, which never hold '/', so '*' cannot cross a path.
GLOB = re.compile(r"^[A-Za-z0-9_.\-*?\[\]!]{1,128}$")


class GrantError(ValueError):
    """A grants claim or option that is not one of the accepted shapes."""


@dataclass(frozen=True)
class Grants:
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()
    _compiled: dict[str, re.Pattern[str]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for right in RIGHTS:
            globs = getattr(self, right)
            for glob in globs:
                if not isinstance(glob, str) or not GLOB.match(glob):
                    raise GrantError(f"invalid experiment glob {glob!r} in '{right}' grant: use "
                                     "letters, digits, '_', '-', '.', and '*', '?', '[...]'")
            if globs:
                pattern = "|".join(fnmatch.translate(g) for g in globs)
                self._compiled[right] = re.compile(pattern)

    def allows(self, experiment: str, right: str) -> bool:
        if right not in RIGHTS:
            raise ValueError(f"unknown right {right!r}; rights: {', '.join(RIGHTS)}")
        for r in (right, "admin"):
            pattern = self._compiled.get(r)
            if pattern is not None and pattern.match(experiment):
                return True
        return False

    def to_claim(self) -> dict[str, list[str]]:
        return {r: list(getattr(self, r)) for r in RIGHTS if getattr(self, r)}

    def describe(self) -> str:
        """'read tmox4*; write tmox42619' for error messages; 'none' when empty."""
        parts = [f"{r} {', '.join(getattr(self, r))}" for r in RIGHTS if getattr(self, r)]
        return "; ".join(parts) or "none"

    @classmethod
    def build(cls, read: Iterable[str] = (), write: Iterable[str] = (),
              admin: Iterable[str] = ()) -> Grants:
        return cls(tuple(read), tuple(write), tuple(admin))

    @classmethod
    def from_claim(cls, claim: Any) -> Grants:
        """Parse a grants claim in any accepted shape; anything else is a GrantError."""
        if claim is None:
            return cls()
        if isinstance(claim, Mapping):
            unknown = set(claim) - set(RIGHTS)
            if unknown:
                raise GrantError(f"unknown rights {sorted(unknown)} in grants; rights: "
                                 f"{', '.join(RIGHTS)}")
            lists = {}
            for right, globs in claim.items():
                if isinstance(globs, str):
                    globs = [globs]
                if not isinstance(globs, list):
                    raise GrantError(f"grant '{right}' must be a list of experiment globs")
                lists[right] = tuple(globs)
            return cls(**lists)
        if isinstance(claim, str):
            claim = claim.split()
        if isinstance(claim, list):
            lists: dict[str, list[str]] = {r: [] for r in RIGHTS}
            for scope in claim:
                right, sep, glob = str(scope).partition(":")
                if not sep or right not in RIGHTS:
                    continue  # other scopes (openid, email, ...) belong to other services
                lists[right].append(glob)
            return cls(**{r: tuple(g) for r, g in lists.items()})
        raise GrantError(f"grants must be an object, a scope string or a list; got "
                         f"{type(claim).__name__}")


ALL = Grants(admin=("*",))
