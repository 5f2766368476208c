"""The cluster token: read from `cluster.token_file`, compared in constant time, never shown.

The token lives only in memory as bytes inside a `Token`, whose repr hides it, so that a log
line or a STATUS dump of an object that holds one cannot print it.
"""

from __future__ import annotations

import hmac
from pathlib import Path


class Token:
    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("the cluster token is empty")
        self._secret = secret

    @classmethod
    def from_file(cls, path: str) -> Token:
        return cls(Path(path).read_bytes().strip())

    def header(self) -> str:
        """The Authorization header value a client sends."""
        return "Bearer " + self._secret.decode("latin-1")

    def matches(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries this token (constant-time compare)."""
        if not authorization or not authorization.startswith("Bearer "):
            return False
        offered = authorization[len("Bearer "):].strip().encode("latin-1", "replace")
        return hmac.compare_digest(offered, self._secret)

    def __repr__(self) -> str:
        return "Token(<redacted>)"

    __str__ = __repr__
