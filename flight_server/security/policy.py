"""Who may do what: the caller's identity, the errors for "who are you" and "you may not", and
the checks the RPC methods make (grants per experiment, loopback, certificate binding)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pyarrow.flight as flight

from flight_server.security.grants import ALL, Grants


class Unauthenticated(flight.FlightUnauthenticatedError):
    """No credentials, or credentials that do not verify (UNAUTHENTICATED)."""


class Forbidden(flight.FlightUnauthorizedError):
    """A verified caller whose grants do not cover what they asked for (PERMISSION_DENIED)."""


@dataclass(frozen=True)
class Identity:
    subject: str
    issuer: str
    grants: Grants
    expires: float | None = None  # Unix time; None for the anonymous caller of --no-auth
    job: str | None = None  # a job's worker: it may only produce that job's stream

    @property
    def owner(self) -> tuple[str, str]:
        return self.subject, self.issuer

    def may(self, experiment: str, right: str) -> bool:
        return self.grants.allows(experiment, right)


ANONYMOUS = Identity("anonymous", "none (--no-auth)", ALL)


def authorize(identity: Identity, experiment: str, right: str = "read") -> None:
    """Refuse unless the caller's grants cover `right` on `experiment`."""
    if not identity.may(experiment, right):
        raise Forbidden(f"'{identity.subject}' may not {right} experiment '{experiment}' "
                        f"(grants: {identity.grants.describe()})")


def only_for_jobs(identity: Identity, what: str, reads: bool = False) -> None:
    """A job's token produces the job's stream and nothing else; a mirror job's, which holds
    `read` on the experiment it writes into, also `reads` there: the stream back, to compare
    it with the source, and its job's state."""
    if identity.job is not None and not (reads and identity.grants.read):
        raise Forbidden(f"a job's token (job {identity.job}) may only produce its stream, "
                        f"not {what}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_to_certificate(identity: Identity, certificate: str) -> None:
    """A deployment that requires both: the token must name the client certificate's holder."""
    if identity is ANONYMOUS:
        return
    if not certificate:
        raise Unauthenticated("this server requires a client certificate that names the "
                              "token's subject; none was presented")
    if certificate != identity.subject:
        raise Forbidden(f"token subject '{identity.subject}' does not match the client "
                        f"certificate's identity '{certificate}'")
