"""Who a client of ``/api/v1`` is: a bearer token's SHA-256 matched to ``api.tokens``, and what its role allows.

No ``from __future__ import annotations``: FastAPI reads the dependencies' annotations at runtime.
"""

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from node.config import ApiToken, Config
from node.receive.spool import Spool


def check_token(tokens: list[ApiToken], presented: str | None) -> ApiToken | None:
    """The configured token whose hash is that of ``presented``; None for none (or no token presented)."""
    if not presented:
        return None
    digest = hashlib.sha256(presented.encode()).hexdigest()
    found = None
    for token in tokens:  # every hash compared, in constant time each
        if hmac.compare_digest(digest, token.sha256):
            found = token
    return found


def _nothing() -> None:
    return None


@dataclass
class ApiContext:
    """What the endpoints of one node work with: its config, database, spool, and whom to wake after an action."""

    config: Config
    sessions: sessionmaker[Session]
    spool: Spool
    #: Called after a job was queued again (wakes this process's workers).
    on_job_queued: Callable[[], None] = _nothing
    #: Called after a delivery was made due (wakes this process's outbox).
    on_delivery_due: Callable[[], None] = _nothing
    bearer: HTTPBearer = field(default_factory=lambda: HTTPBearer(auto_error=False))

    def client_dependency(self) -> Callable[..., ApiToken]:
        """A dependency answering 401 unless the request carries a configured token."""
        tokens = self.config.api.tokens if self.config.api is not None else []

        def client(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(self.bearer)]) -> ApiToken:
            token = check_token(tokens, credentials.credentials if credentials is not None else None)
            if token is None:
                raise HTTPException(401, "a valid token is needed (Authorization: Bearer <token>)",
                                    headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            return token

        return client


def admin_dependency(client: Callable[..., ApiToken]) -> Callable[..., ApiToken]:
    """A dependency answering 403 for a viewer's token (and 401 as ``client`` does)."""

    def admin(token: Annotated[ApiToken, Depends(client)]) -> ApiToken:
        if token.role != "admin":
            raise HTTPException(403, f"token {token.name!r} is a viewer; this needs an admin token")
        return token

    return admin
