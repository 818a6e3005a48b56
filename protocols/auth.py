"""Bearer tokens of the protected routes, checked before the body is read.

A protected route declares ``dependencies=[AdminAuth]`` (or ``FeedbackAuth``) and reads its body
itself afterwards (``rest.read_json``, documented with ``rest.openapi_body``): FastAPI parses a declared
body *before* it runs dependencies, so a caller without a token would otherwise reach the validator
and learn the schema.

Each token is a FastAPI ``HTTPBearer`` security scheme, so the OpenAPI document names the token each
protected route takes (instead of an optional ``Authorization`` header parameter).
"""

from __future__ import annotations

import hmac
import os

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import Request

from common.errors import ForbiddenError, UnauthorizedError

ADMIN_TOKEN_ENV = "BUNDLE_ADMIN_TOKEN"
FEEDBACK_TOKEN_ENV = "BUNDLE_FEEDBACK_TOKEN"


class Bearer(HTTPBearer):
    """Accepts the token in the server's ``env`` (constant-time compare), else raises 403 when the
    server has no token configured (``purpose`` disabled) or 401. Tests find the protected routes,
    and the token each takes, by this class among a route's dependencies."""

    def __init__(self, env: str, purpose: str, scheme_name: str):
        super().__init__(scheme_name=scheme_name, auto_error=False,
                         description=f"{purpose}: the token set in {env} on the server")
        self.env = env
        self.purpose = purpose

    async def __call__(self, request: Request) -> HTTPAuthorizationCredentials:  # type: ignore[override]
        token = os.environ.get(self.env)
        if not token:
            raise ForbiddenError("Authorization", f"{self.purpose} are disabled",
                                 f"set {self.env} on the server to enable them")
        given = await super().__call__(request)
        if given is None or not hmac.compare_digest(given.credentials.encode(), token.encode()):
            raise UnauthorizedError("Authorization", "a valid bearer token is required",
                                    f"Bearer <{self.purpose} token>")
        return given


AdminAuth = Depends(Bearer(ADMIN_TOKEN_ENV, "admin endpoints", "admin"))
FeedbackAuth = Depends(Bearer(FEEDBACK_TOKEN_ENV, "feedback endpoints", "feedback"))
