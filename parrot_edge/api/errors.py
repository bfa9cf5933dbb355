"""Every error the API returns: an OpenAI-style `{"error": {...}}` body whose message says what to do."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None, **extra):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": type, "code": code, "param": param, **extra}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)


def busy(message: str, retry_after: int, code: str, status: int = 503) -> ApiError:
    """Come back later: a full queue (503), a client over its share (429), a request that timed out queued."""
    return ApiError(status, message, type="server_error" if status == 503 else "rate_limit_error", code=code,
                    headers={"Retry-After": str(max(1, retry_after))})


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        invalid = next((error for error in errors if error["type"] == "json_invalid"), None)
        if invalid is not None:
            detail = invalid.get("ctx", {}).get("error", "")
            return error_response(ApiError(400, f"the request body is not valid JSON ({detail})", code="invalid_json"))
        problems = []
        for error in errors:
            where = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
            problems.append(f"{where}: {error['msg']}")
        param = ".".join(str(p) for p in errors[0]["loc"][1:]) if errors else None
        return error_response(ApiError(400, "invalid request: " + "; ".join(problems), param=param or None))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, exc: StarletteHTTPException):
        return error_response(ApiError(exc.status_code, str(exc.detail), code=None))
