"""One error shape for every failure: OpenAI's `{"error": {message, type, param, code}}`, real statuses."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# OpenAI's error `type` for each status we send.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class ErrorDetail(BaseModel):
    """The body of an error."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """What every failed request returns."""

    error: ErrorDetail


class ProxyError(Exception):
    """A failure with the HTTP status and error body the client should see."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> ErrorResponse:
        """The error as the response body model."""
        detail = ErrorDetail(
            message=self.message,
            type=_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error"),
            param=self.param,
            code=self.code,
        )
        return ErrorResponse(error=detail)

    def response(self) -> JSONResponse:
        """The error as an HTTP response."""
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers or None)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ProxyError:
    """A 400 naming the offending parameter."""
    return ProxyError(400, message, param=param, code=code)


def from_validation_error(exc: ValidationError | RequestValidationError) -> ProxyError:
    """Turn pydantic's validation errors into one 400 that names the first offending parameter."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    # FastAPI prefixes locations with "body"/"query"; the client only knows its own field names.
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return bad_request(message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Make every error, ours and the framework's, answer in the one error shape."""

    async def on_proxy_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ProxyError)
        return exc.response()

    async def on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return from_validation_error(exc).response()

    async def on_http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers) if exc.headers else None
        return ProxyError(exc.status_code, str(exc.detail), headers=headers).response()

    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return ProxyError(500, "internal error in the proxy").response()

    app.add_exception_handler(ProxyError, on_proxy_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
