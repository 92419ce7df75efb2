"""Errors as OpenAI's API writes them: `{"error": {"message", "type", "param", "code"}}` and a status.

Every failure a client can cause or meet (bad field, too large, busy, unauthorized) is an `ApiError`;
anything else becomes a 500 with a generic message (the traceback goes to the server's log, never
to the client).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
SERVER = "server_error"


class ApiError(Exception):
    """A response with an OpenAI-style error body; `message` is one line."""

    def __init__(self, status: int, message: str, *, code: str, type: str = INVALID_REQUEST,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, " ".join(message.split()), code, type, param
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, code=self.code, type=self.type, param=self.param,
                              headers=self.headers)


def error_response(status: int, message: str, *, code: str, type: str = INVALID_REQUEST, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def busy(message: str, code: str, retry_after: int = 1) -> ApiError:
    """503 with Retry-After: the queue is full, the models are loading, or the server is shutting down."""
    return ApiError(503, message, code=code, type=SERVER, headers={"Retry-After": str(retry_after)})


def install_handlers(app: FastAPI) -> None:
    """ApiError, Starlette's HTTP errors (404, 405) and anything unexpected, all as OpenAI-style JSON."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, "internal server error (see the server's log)", code="internal_error", type=SERVER)
