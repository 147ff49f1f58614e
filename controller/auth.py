"""Shared-secret authentication by challenge and HMAC-SHA256: the secret never crosses the wire.

Handshake, both steps through ``rpc.hello``:

1. client -> ``{"client": NAME, "nonce": CN}``; server -> ``{"challenge": SC,
   "proof": HMAC(secret, "server" | SC | CN), "authenticated": false, ...}``.
   The client checks ``proof`` to know it talks to a server holding the same secret.
2. client -> ``{"response": HMAC(secret, "client" | SC | CN)}``;
   server -> ``{"authenticated": true}``.

All digests are hex; comparisons use :func:`hmac.compare_digest` (constant time).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_ENV = "STATELINK_SECRET"  # noqa: S105 - the name of the variable, not a secret
MAX_NONCE = 128
MIN_SECRET = 16  #: bytes; shorter secrets are refused by load_secret


def new_nonce() -> str:
    return secrets.token_hex(16)


def digest(secret: bytes, role: str, challenge: str, nonce: str) -> str:
    message = f"{role}|{challenge}|{nonce}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def verify(secret: bytes, role: str, challenge: str, nonce: str, candidate: object) -> bool:
    if not isinstance(candidate, str):
        return False
    return hmac.compare_digest(digest(secret, role, challenge, nonce), candidate)


def load_secret(secret_file: str | Path | None = None) -> bytes | None:
    """The secret from ``secret_file`` (stripped), else ``$STATELINK_SECRET``, else ``None``.

    Raises ``ValueError`` with what to do when the file cannot be read or is empty, or when the
    secret is shorter than :data:`MIN_SECRET` bytes.
    """
    if secret_file is not None:
        try:
            value = Path(secret_file).read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the secret file {secret_file}: {exc.strerror}")
        if not value:
            raise ValueError(
                f"the secret file {secret_file} is empty; put a long random string in it"
            )
        return _long_enough(value, f"the secret in {secret_file}")
    env = os.environ.get(SECRET_ENV, "").strip()
    return _long_enough(env.encode(), f"${SECRET_ENV}") if env else None


def _long_enough(secret: bytes, where: str) -> bytes:
    if len(secret) < MIN_SECRET:
        raise ValueError(
            f"{where} is too short ({len(secret)} bytes): a shared secret needs at least "
            f"{MIN_SECRET} bytes; make one with: python3 -c 'import secrets; "
            "print(secrets.token_hex(32))'"
        )
    return secret
