"""Bearer tokens of the protected routes, checked before the body is read.

A protected route declares ``dependencies=[AdminAuth]`` (or ``FeedbackAuth``) and reads its body
itself afterwards (``rest.read_json``): FastAPI parses a declared body *before* it runs dependencies,
so a caller without a token would otherwise reach the validator and learn the schema.
"""

from __future__ import annotations

import hmac
import os
from typing import Annotated, Callable

from fastapi import Depends, Header

from common.errors import ForbiddenError, UnauthorizedError

ADMIN_TOKEN_ENV = "BUNDLE_ADMIN_TOKEN"
FEEDBACK_TOKEN_ENV = "BUNDLE_FEEDBACK_TOKEN"


def bearer(env: str, purpose: str) -> Callable[[str | None], None]:
    """A dependency that accepts the token in ``env`` (constant-time compare), else raises 403 when
    the server has no token configured (``purpose`` disabled) or 401."""

    async def check(authorization: Annotated[str | None, Header()] = None) -> None:
        token = os.environ.get(env)
        if not token:
            raise ForbiddenError("Authorization", f"{purpose} are disabled", f"set {env} on the server to enable them")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise UnauthorizedError("Authorization", "a valid bearer token is required", f"Bearer <{purpose} token>")

    return check


AdminAuth = Depends(bearer(ADMIN_TOKEN_ENV, "admin endpoints"))
FeedbackAuth = Depends(bearer(FEEDBACK_TOKEN_ENV, "feedback endpoints"))
