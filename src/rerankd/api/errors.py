"""The shape of every HTTP error rerankd answers, in a module light enough for Ray's proxy to import."""

from __future__ import annotations

import json

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error", 413: "request_too_large", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable", 504: "timeout_error"}  # fmt: skip


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """Every error's body: OpenAI-style `error`, and the message again as `detail` (FastAPI's and Jina's shape,
    which Jina clients read)."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param},
            "detail": message}  # fmt: skip


async def send_error(send, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
    """Answer an ASGI request with `error_body` as JSON (the app's middlewares, Ray's proxy)."""
    body = json.dumps(error_body(status, message, param)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
