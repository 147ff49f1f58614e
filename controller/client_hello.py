"""The client's side of ``rpc.hello``: announce itself and, with a shared secret, authenticate
both ways (see :mod:`controller.auth`), on a fresh socket before its reader thread starts."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

from statemachines.addresses import Address, format_address

from . import auth
from .errors import ConnectionLostError, UnauthorizedError, error_for
from .protocol import Decoder, ErrorResponse, Request, Response, encode

log = logging.getLogger("statelink.client")


def hello(
    sock: socket.socket,
    address: Address,
    *,
    client: str,
    secret: bytes | None,
    callback_port: int | None,
    ids: Iterator[int],
) -> dict[str, Any]:
    """Run the handshake on ``sock``; the server's ``rpc.hello`` answer (``max_inflight``, ...).

    With a ``secret`` the server must prove it holds the same one. Raises
    :class:`UnauthorizedError` saying what to fix, the server's error, or
    :class:`ConnectionLostError`. Request ids are ``"hello-<n>"`` with ``n`` from ``ids``.
    A server that cannot connect back to ``callback_port`` says so (``callback_error``,
    logged as a warning); its replies then come on ``sock``.
    """
    decoder = Decoder()
    nonce = auth.new_nonce()
    params: dict[str, Any] = {"client": client, "protocol": "1.0", "nonce": nonce}
    if callback_port is not None:
        params["callback_port"] = callback_port
    info = _exchange(sock, decoder, f"hello-{next(ids)}", params)
    where = format_address(address)
    if secret is None:
        if info.get("auth") and not info.get("authenticated"):
            raise UnauthorizedError(
                f"the server at {where} requires the shared secret: give it with "
                "--secret-file PATH or $STATELINK_SECRET (Client(secret=...) in Python)"
            )
        return _checked_callback(info, address)
    # With a secret, the server must prove it holds it too: a server that skips the
    # challenge (no secret, or an impostor) gets nothing more from this client.
    if not info.get("auth"):
        raise UnauthorizedError(
            f"the server at {where} did not ask for authentication, so it cannot "
            "prove it holds the secret; start it with --secret-file (or "
            "$STATELINK_SECRET), or drop the client secret"
        )
    challenge = info.get("challenge")
    if not isinstance(challenge, str) or not auth.verify(
        secret, "server", challenge, nonce, info.get("proof")
    ):
        raise UnauthorizedError(
            f"the server at {where} holds a different secret (its proof does not "
            "match ours): check --secret-file / $STATELINK_SECRET on both sides"
        )
    answer = {"response": auth.digest(secret, "client", challenge, nonce)}
    confirmed = _exchange(sock, decoder, f"hello-{next(ids)}", answer)
    if confirmed.get("authenticated") is not True:
        raise UnauthorizedError(f"the server at {where} did not confirm the authentication")
    info.update(confirmed)
    return _checked_callback(info, address)


def _checked_callback(info: dict[str, Any], address: Address) -> dict[str, Any]:
    error = info.get("callback_error")
    if error:
        log.warning(
            "the server at %s cannot deliver replies to the callback listener (%s); they come "
            "on the request connection instead",
            format_address(address),
            error,
        )
    return info


def _exchange(
    sock: socket.socket, decoder: Decoder, request_id: str, params: dict[str, Any]
) -> dict[str, Any]:
    """One ``rpc.hello`` request and its answer (a dict; anything else reads as ``{}``)."""
    sock.sendall(encode(Request("rpc.hello", params, request_id)))
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionLostError("the server closed the connection during the handshake")
        for event in decoder.feed(data):
            if isinstance(event, Response) and event.id == request_id:
                return event.result if isinstance(event.result, dict) else {}
            if isinstance(event, ErrorResponse) and event.id in (request_id, None):
                raise error_for(event.code, event.message, event.data)
