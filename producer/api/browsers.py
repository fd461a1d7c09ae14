"""What another web site must not make a browser do here: post across origins (CSRF) or frame a page.

A browser that has the dashboard's Basic credentials sends them with any request to this server, also one
a foreign page starts — a form that posts to /dashboard/batches/…/cancel or /v1/files. So a state-changing
request that a browser marks as coming from elsewhere is refused, with the check Go's
net/http.CrossOriginProtection makes (no token, so no server secret for the stateless servers to share):
`Sec-Fetch-Site` must be `same-origin` or `none` (typed by the user); a browser too old to send it is
judged by `Origin` against `Host`; a request with neither is no browser's (curl, OpenAI's clients) and
passes. Every response also forbids framing, and the dashboard's page may load nothing but its own style.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.api.errors import ApiError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


def cross_origin(method: str, headers: dict[str, str]) -> bool:
    """Whether a browser sent this state-changing request on behalf of another site."""
    if method in SAFE_METHODS:
        return False
    if fetch_site := headers.get("sec-fetch-site"):
        return fetch_site not in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return False
    return urlsplit(origin).netloc.lower() != headers.get("host", "").lower()


class BrowserGuard:
    """ASGI middleware: refuses cross-origin state changes (403) and adds SECURITY_HEADERS to every answer."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        if cross_origin(scope["method"], headers):
            refusal = ApiError(403, f"a {scope['method']} from another site (Origin {headers.get('origin')!r}) is "
                               "refused: use this server's own pages, or an API client", code="cross_origin_request")
            await refusal.response()(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)
