"""What Ray Serve's HTTP proxy runs of rerankd (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=
rerankd.api.ray_proxy:proxy_middlewares): Ray's own error answers made JSON errors of the server's shape. Light on
purpose: the proxy imports it at start-up, within Ray's 5 s readiness check, so it must not pull in torch."""

from __future__ import annotations

from typing import Any

from .errors import send_error


def proxy_middlewares() -> list:
    """Starlette middlewares for Ray's HTTP proxy: its own error answers (plain text: no replica, queue full, a
    replica lost mid-request) become JSON errors of the server's shape, with the status kept."""
    from starlette.middleware import Middleware

    return [Middleware(JsonErrorsMiddleware)]


class JsonErrorsMiddleware:
    """Ray's proxy's own answers as JSON errors of the server's shape: a non-JSON error response (status >= 400) is
    rewritten, status and headers kept (a 429/503 without Retry-After gets `Retry-After: 1`, as the server's own
    have); a request that ends with no response at all (its replica died mid-request: Ray sends nothing, and uvicorn
    would answer a plain 'Internal Server Error') gets a JSON 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict[str, Any] = {}
        state = {"started": False, "done": False}

        async def send_json(status: int, message: str, headers: list) -> None:
            keep = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers
                    if k.lower() not in (b"content-type", b"content-length")}  # fmt: skip
            if status in (429, 503) and not any(k.lower() == "retry-after" for k in keep):
                keep["retry-after"] = "1"  # Ray's full queue says when to come back only if configured to
            state["done"] = True
            await send_error(send, status, message, headers=keep)

        async def json_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                headers = dict(message.get("headers") or [])
                if message["status"] >= 400 and not headers.get(b"content-type", b"").startswith(b"application/json"):
                    held.update(start=message, body=b"")
                    return None
            elif message["type"] == "http.response.body" and held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return None
                text = held["body"].decode("utf-8", "replace").strip() or "the request failed in Ray's proxy"
                start = held["start"]
                return await send_json(start["status"], f"Ray Serve: {text}", start.get("headers") or [])
            return await send(message)

        try:
            await self.app(scope, receive, json_send)
        finally:
            if held and not state["done"]:  # an error response cut short: its status, as JSON
                await send_json(held["start"]["status"], "Ray Serve: the request failed in Ray's proxy",
                                held["start"].get("headers") or [])  # fmt: skip
            elif not state["started"]:
                await send_json(500, "Ray Serve: the replica serving this request was lost before it answered; "
                                "retry (Ray replaces failed replicas)", [])  # fmt: skip
