"""Credentials the server keeps for a while, sealed with its own key (AES-256-GCM): a mirror
job's token for the other site lives in the job table as ciphertext that only this server (or
another with its state directory) can open, bound to the job it was given for."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12


class CredentialSeal:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, secret: str, bound_to: str) -> bytes:
        """`secret` encrypted and authenticated; `bound_to` (a job id) must match to open it."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, secret.encode(), bound_to.encode())

    def open(self, sealed: bytes, bound_to: str) -> str:
        try:
            plain = self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                                       bound_to.encode())
        except InvalidTag:
            raise ValueError("sealed credentials do not open with this server's key (the "
                             "state directory's credential.key changed?)") from None
        return plain.decode()
