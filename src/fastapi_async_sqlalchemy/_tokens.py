"""Read-your-writes tokens: signed, short-lived, holding the primary's position after a commit.

A token is ``POSITION.EXPIRES.SIGNATURE``: the position (a PostgreSQL WAL position in hex, a
MariaDB GTID position, or ``-``: "the primary until I expire"), a Unix time, and an HMAC-SHA256
of both under a key of the middleware's (its proxy's name in it, so one database's tokens mean
nothing to another's). A forged, damaged or expired token reads as none.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any

from ._config import InvalidTypeError
from ._positions import Position, is_gtid
from .exceptions import InvalidConfigurationError

# A token position no replica reaches: the primary serves until the token expires (databases
# without comparable positions, or a position that could not be read).
UNREACHABLE = 1 << 64


class Tokens:
    """Signed, short-lived tokens holding the primary's position after a request's commit."""

    __slots__ = ("_key", "cookie", "header", "lifetime", "name")

    def __init__(self, secret: bytes, mode: str, name: str, lifetime: float) -> None:
        self._key = secret
        self.cookie = mode == "cookie"
        self.name = name
        self.header = name.lower().encode("latin-1")
        self.lifetime = lifetime

    def issue(self, position: Position | None, secure: bool) -> tuple[bytes, bytes]:
        """The response header carrying a token for ``position`` (None: primary until expiry)."""
        expires = int(time.time() + self.lifetime)
        value = f"{_encode(position)}.{expires}"
        token = f"{value}.{self._sign(value)}"
        if not self.cookie:
            return self.header, token.encode("latin-1")
        attributes = f"; Max-Age={int(self.lifetime)}; Path=/; HttpOnly; SameSite=Lax"
        if secure:
            attributes += "; Secure"
        return b"set-cookie", f"{self.name}={token}{attributes}".encode("latin-1")

    def read(self, scope: Mapping[str, Any]) -> Position | None:
        """The position a request's token asks for; None without a valid, unexpired one."""
        token = self._find(scope)
        if token is None:
            return None
        value, _, signature = token.rpartition(".")
        position, _, expires = value.partition(".")
        if not hmac.compare_digest(signature.encode("latin-1"), self._sign(value).encode()):
            return None  # forged, damaged, or made with another secret (another database)
        try:
            if int(expires) < time.time():
                return None
            return _decode(position)
        except ValueError:
            return None

    def _find(self, scope: Mapping[str, Any]) -> str | None:
        for name, value in scope.get("headers", ()):
            if self.cookie:
                if name == b"cookie":
                    for part in value.decode("latin-1").split(";"):
                        key, _, found = part.strip().partition("=")
                        if key == self.name:
                            return str(found)
            elif name == self.header:
                return str(value.decode("latin-1"))
        return None

    def _sign(self, value: str) -> str:
        digest = hmac.new(self._key, value.encode("latin-1"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:18]).decode("ascii")


def _encode(position: Position | None) -> str:
    """A position in a token: a WAL position in hex; a GTID position with ``_`` for ``,`` (no
    comma in a cookie); ``-`` for none."""
    if position is None:
        return "-"
    if isinstance(position, int):
        return format(position, "x")
    return position.replace(" ", "").replace(",", "_")


def _decode(position: str) -> Position:
    if position == "-":
        return UNREACHABLE
    if "-" in position:
        gtids = position.replace("_", ",")
        if not is_gtid(gtids):
            raise ValueError(position)
        return gtids
    return int(position, 16)


def check_read_your_writes(mode: object, secret: object) -> None:
    """``read_your_writes`` and ``read_your_writes_secret``, checked at construction."""
    if mode not in (None, "cookie", "header"):
        raise InvalidConfigurationError(
            'read_your_writes must be "cookie", "header" or None (no read-your-writes tokens), '
            f"not {mode!r}."
        )
    if secret is not None and (not isinstance(secret, str | bytes) or len(secret) < 16):
        raise InvalidTypeError(
            "read_your_writes_secret must be a string or bytes of at least 16 characters (a "
            "random secret shared by every worker), or None to derive one from the primary's "
            "URL."
        )


def token_secret(secret: str | bytes | None, primary_url: str, proxy_name: str) -> bytes:
    """The key tokens are signed with: ``read_your_writes_secret``, else one derived from the
    primary's URL (password included) and the proxy, the same in every worker process. The
    proxy's name is in it either way, so one database's tokens mean nothing to another's."""
    if secret is None:
        secret = primary_url
    if isinstance(secret, str):
        secret = secret.encode()
    return hashlib.sha256(
        b"fastapi-async-sqlalchemy|" + proxy_name.encode() + b"|" + secret
    ).digest()
