"""The API key check, as a pure ASGI middleware: a request without a valid key is answered
401 from its headers alone, before a byte of its body is read or stored.

Whether a key is required is decided by CXR_AUTH when set; otherwise it is required once
CXR_API_KEYS is set or any key was ever stored in the database (revoked keys count), so
revoking the last key never opens the API. With no key ever, the API is open (`cxr api`
binds to 127.0.0.1 and logs a warning).
"""

from __future__ import annotations

import hmac
import json
import logging

import anyio
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Receive, Scope, Send

from cxr import apikeys
from cxr.db import repo
from cxr.db.session import database_problem, session_factory
from cxr.settings import Settings, get_settings

log = logging.getLogger(__name__)

HEADER = b"x-api-key"
# Readable without a key: the probes, and the description of the API (not its data).
PUBLIC_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
CHECKED = "cxr.api_key_checked"  # set in the request's scope once the key was accepted
LOOKUPS_AT_ONCE = 4  # database look-ups of keys in flight; each holds a connection for about a millisecond


def env_key_matches(settings: Settings, key: str) -> bool:
    """True when ``key`` is one of CXR_API_KEYS (constant-time comparison)."""
    return any(hmac.compare_digest(key.encode(), k.get_secret_value().encode()) for k in settings.api_keys)


class ApiKeyAuth:
    """ASGI middleware: 401 (``WWW-Authenticate: APIKey``) unless the request's X-API-Key is
    accepted or the path is public (PUBLIC_PATHS). 503 with ``Retry-After`` when a key must
    be looked up and the database cannot be read: never open on an error.

    A refused request is answered without reading its body, with ``Connection: close`` so
    the rest of a large upload is never received."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._keys_exist = False  # once keys were seen in the database they always count (rows are never deleted)
        self._limiter: anyio.CapacityLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        settings = get_settings()
        key = next((v.decode("latin-1") for k, v in scope["headers"] if k == HEADER), None)
        try:
            allowed = await self._allowed(settings, key)
        except SQLAlchemyError as e:
            # The sentence says what is wrong and what to run (cxr.db.session.database_problem):
            # "no database at ...: run `cxr db upgrade`", "cannot reach Postgres at host:port ...".
            problem = database_problem(settings.database_url, e)
            why = str(problem) if problem is not None else "the database cannot be read; retry later"
            log.error("cannot check an API key: %s", why)
            await _answer(scope, send, 503, f"cannot check the API key: {why}", [(b"retry-after", b"5")])
            return
        if not allowed:
            await _answer(scope, send, 401, "missing or invalid X-API-Key", [(b"www-authenticate", b"APIKey")])
            return
        scope[CHECKED] = True
        await self.app(scope, receive, send)

    async def _allowed(self, settings: Settings, key: str | None) -> bool:
        if settings.auth == "open":
            return True
        if key and env_key_matches(settings, key):
            return True
        if not key and (settings.auth == "required" or settings.api_keys or self._keys_exist):
            return False  # decided without the database
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(LOOKUPS_AT_ONCE)
        keys_exist, match = await anyio.to_thread.run_sync(self._lookup, settings, key, limiter=self._limiter)
        self._keys_exist = self._keys_exist or keys_exist
        if match:
            return True
        return settings.auth is None and not settings.api_keys and not keys_exist

    @staticmethod
    def _lookup(settings: Settings, key: str | None) -> tuple[bool, bool]:
        """(any key was ever stored, ``key`` is an active stored key), in a session of its own
        that is closed (its connection returned) before the request goes on."""
        with session_factory(settings.database_url)() as session:
            return repo.api_key_status(session, key_sha256=apikeys.digest(key) if key else None)


async def _answer(scope: Scope, send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})
