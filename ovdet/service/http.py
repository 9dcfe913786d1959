"""The HTTP plumbing under the routes: JSON error answers, bearer-token checks, and a body-size cap applied while the
body streams in (so a huge upload is cut off, not buffered)."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
from typing import Any

from ovdet.service.metrics import Metrics
from ovdet.service.settings import ServiceError

__all__ = ["BodyLimit", "check_token", "error_body"]

OPEN_PATHS = ("/", "/health", "/docs", "/openapi.json", "/docs/oauth2-redirect")


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    """The JSON every refusal answers with: {"error": {"status", "code", "message"}}."""
    return {"error": {"status": status, "code": code, "message": message}}


def check_token(authorization: str | None, token: str | None) -> None:
    """Pass when no token is set, or `authorization` carries it as "Bearer TOKEN" (or as the password of HTTP Basic
    auth, which is what Label Studio's ML-backend settings send); ServiceError 401 otherwise."""
    if token is None:
        return
    given = ""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError, ValueError):
            given = ""
    if not given or not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
        raise ServiceError(401, "unauthorized", "missing or wrong token: send the header "
                           "'Authorization: Bearer TOKEN' with the server's --token / $OVDET_SERVE_TOKEN",
                           {"WWW-Authenticate": "Bearer"})


class BodyLimit:
    """ASGI middleware: answers 413 for a body over `max_bytes` (by Content-Length, or counted as it streams), 401
    before reading the body of an unauthenticated request, and records every answer in `metrics`."""

    def __init__(self, app: Any, max_bytes: int, metrics: Metrics, token: str | None):
        self.app, self.max_bytes, self.metrics, self.token = app, max_bytes, metrics, token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = scope.get("path", "")
        route = "/v1/vocabularies" if route.startswith("/v1/vocabularies/") else route
        status = {"code": 500}

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            if scope.get("path") not in OPEN_PATHS:
                check_token(headers.get("authorization"), self.token)
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                raise ServiceError(413, "body_too_large", f"the request body is {int(length):,} bytes, more than "
                                   f"this server's cap of {self.max_bytes:,}; send fewer or smaller images")
        except ServiceError as exc:
            await _answer(sending, exc)
            self.metrics.request(route, status["code"], time.perf_counter() - started)
            return
        seen = {"bytes": 0}

        async def receiving() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > self.max_bytes:
                    raise ServiceError(413, "body_too_large", f"the request body is more than this server's cap of "
                                       f"{self.max_bytes:,} bytes; send fewer or smaller images")
            return message

        try:
            await self.app(scope, receiving, sending)
        except ServiceError as exc:  # raised while the body streamed in, outside the app's own handlers
            if "started" in status:
                raise
            await _answer(sending, exc)
        self.metrics.request(route, status["code"], time.perf_counter() - started)


async def _answer(send: Any, exc: ServiceError) -> None:
    body = json.dumps(error_body(exc.status, exc.code, str(exc))).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
